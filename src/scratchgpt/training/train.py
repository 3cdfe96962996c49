"""ONE training loop for pretraining and every fine-tuning mode.

The contract of `train()` (fine-tuning builds on exactly this; nothing else changes between modes):

    result = train(
        model,                      # nn.Module (a GPT, or a GPT with another head / LoRA adapters)
        batches,                    # BatchSource: next_batch() -> batch; state_dict(); load_state_dict()
        config=TrainConfig(...),    # optimisation, schedule, eval/log/checkpoint cadence, hardware
        loss_fn=lm_loss,            # loss_fn(model, batch) -> scalar Tensor (mean over the batch)
        params=None,                # trainable parameters (default: all with requires_grad)
        evals={"val": fn},          # name -> fn(model) -> {"loss": float, ...any other metrics}
        sample_fn=None,             # fn(model) -> str, printed on rank 0 every sample_interval steps
        tokenizer=tok,              # saved into every checkpoint, so the run directory is self-contained
        run_config=run.to_dict(),   # the resolved config, stored in config.json under "run"
        export_fn=None,             # fn(model, directory) writing a loadable model (default: save_model)
        runtime=None,               # where it runs (runtime.Runtime, from the driver); None: from config
    )

- A *batch* is whatever `next_batch()` returns: a Tensor, a tuple/list of Tensors or a dict of them. The
  loop moves it to the device (recursively) and hands it to `loss_fn` unchanged. Tokens per batch (for
  tok/s and MFU) are the element count of its first tensor (`x` for LM batches).
- `loss_fn(model, batch)` receives the *wrapped* model (DDP/FSDP/compiled), so call it (`model(...)`)
  rather than reaching into attributes; use `checkpoint.unwrap(model)` for attributes. It returns the
  mean loss of that micro-batch; the loop divides by `grad_accum_steps` itself.
- `params`: only these are optimised (AdamW; weight decay on tensors with >= 2 dims). Frozen parameters
  should also have requires_grad=False so no gradients are computed for them.
- `evals[name](model)` runs every `eval_interval` steps and at the end, in eval mode under no_grad, on
  every rank (shard the work and all-reduce, see `evaluate_lm`). Keys become log.csv columns
  `<name>_<key>`; `evals["val"]["loss"]` (else the first eval's "loss") picks the best checkpoint.
- The batch source's `state_dict()` must be JSON-able and identical on every rank (rank-aware
  sources derive their shard from the rank themselves), so that resuming continues at exactly the
  same batch. Both samplers in `scratchgpt.data.dataset` do this.
- Checkpoints: `out_dir/ckpt-<step>/` (full training state), a `latest` pointer, and the model alone
  exported to `out_dir/` (latest) and `out_dir/best/` (best by validation loss): `load_model(out_dir)`
  and `load_any(out_dir)` work on both.

Only the loop lives here. Where a run executes (device, dtype, attention path, the torchrun process
group) is `runtime.py`, resolved once by the driver and handed in as `runtime`; the files of a run
directory (step checkpoints, lock, resume) are `run_state.py`; log.csv, throughput, MFU and the plots
are `runlog.py`; what to train on is a mode (`modes/pretrain.py`, `modes/classify.py`, ...), and
`driver.py` hands a mode's job to this loop.
"""
from __future__ import annotations

import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from scratchgpt.checkpoint import float32_weights, model_state, save_model_files, unwrap
from scratchgpt.config import TrainConfig
from scratchgpt.device import ThreadChoice, choose_threads, native_bf16, set_threads, threads_left_to_others
from scratchgpt.files import replace_dir
from scratchgpt.model.gpt import GPT
from scratchgpt.tensor_files import CheckpointError
from scratchgpt.training.memory import estimate_memory
from scratchgpt.training.optim import lr_at, make_optimizer, set_lr
from scratchgpt.training.plots import LOG_FILE, PLOT_FILE, DrawingInBackground, plot_log
from scratchgpt.training.run_state import (
    BEST_DIR,
    RunLock,
    capture_rng_state,
    check_run_dir,
    checkpoint_name,
    clean_leftovers,
    clear_run_dir,
    export_model_files,
    load_module_state,
    named_optimizer_state,
    optimizer_state_from_flat,
    optimizer_state_to_flat,
    read_training_checkpoint,
    restore_rng_state,
    write_training_checkpoint,
)
from scratchgpt.training.runlog import (
    CsvLog,
    flops_per_token,
    peak_flops,
    plot_due,
    precision_line,
    progress_line,
)
from scratchgpt.training.runtime import (
    Runtime,
    StopRequest,
    all_reduce_mean,
    batch_tokens,
    grad_sync,
    resolve_runtime,
    to_device,
    wrap_model,
)


class BatchSource(Protocol):
    """Where training batches come from; its state resumes it at exactly the same batch."""

    def next_batch(self) -> Any: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


LossFn = Callable[[nn.Module, Any], Tensor]
EvalFn = Callable[[nn.Module], Mapping[str, float]]
SampleFn = Callable[[nn.Module], str]
ExportFn = Callable[[nn.Module, Path], None]
LogFn = Callable[[str], None]


# ---------------------------------------------------------------------------------------------
# Losses, optimizer, schedule
# ---------------------------------------------------------------------------------------------


def lm_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    """Mean next-token cross-entropy of an (x, y) batch of (B, T) ids; -100 in y is ignored."""
    x, y = batch
    _, loss = model(x, y)
    return loss


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    """What a training run ended with."""

    step: int
    tokens: int
    elapsed_s: float
    tokens_per_s: float
    mfu: float | None
    train_loss: float | None
    metrics: dict[str, float] = field(default_factory=dict)  # last evaluation, as "<eval>_<metric>"
    metrics_step: int | None = None  # the step that evaluation ran at
    best_val_loss: float | None = None
    best_step: int | None = None
    run_dir: Path | None = None
    interrupted: bool = False
    stop_signal: int | None = None  # what stopped an interrupted run (SIGINT, SIGTERM); None: another rank's


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: Iterable[Any],
    *,
    loss_fn: LossFn = lm_loss,
    params: list[nn.Parameter],
    grad_accum_steps: int,
    grad_clip: float = 0.0,
    scaler: torch.amp.GradScaler | None = None,
    amp: AbstractContextManager | Callable[[], AbstractContextManager] = nullcontext,
) -> tuple[Tensor, int]:
    """One optimizer step over `grad_accum_steps` micro-batches: (mean loss as a device tensor, tokens).

    Gradients are synchronised across processes only on the last micro-batch, and nothing here waits
    for the device (no .item()), so the CPU can queue the next step while the GPU works. The returned
    loss is non-finite when the loss or the gradient norm is (one device-side value for the caller to
    check; without a GradScaler, which skips such steps itself, the optimizer has then stepped on them).
    """
    loss_sum: Tensor | None = None
    tokens = 0
    for i, batch in enumerate(micro_batches):
        with grad_sync(model, i == grad_accum_steps - 1), (amp() if callable(amp) else amp):
            loss = loss_fn(model, batch)
        scaled = loss / grad_accum_steps  # mean over micro-batches, as one big batch would give
        (scaler.scale(scaled) if scaler is not None else scaled).backward()
        loss_sum = loss.detach().float() if loss_sum is None else loss_sum + loss.detach().float()
        tokens += batch_tokens(batch)
    if scaler is not None:
        scaler.unscale_(optimizer)
    if grad_clip > 0:
        norm = clip_grad_norm(params, grad_clip)
    elif scaler is None:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    assert loss_sum is not None, "no micro-batches"
    mean = loss_sum / grad_accum_steps
    if scaler is None:
        # 0 * norm is 0 for a finite norm and nan for inf/nan: the loss carries the gradient's verdict.
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        mean = mean + 0.0 * norm.to(mean.device, torch.float32)
    return mean, tokens


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> Tensor:
    """torch.nn.utils.clip_grad_norm_ (the same total norm, the same scaling, the same result), except that
    on the CPU the scaling is skipped when its factor is 1, and the per-tensor ops are one call each.

    Why: torch multiplies every gradient by min(1, max_norm / (norm + 1e-6)) whatever the norm, so that a
    GPU never waits for it. On the CPU the norm is at hand, and where it is below max_norm multiplying by
    exactly 1 would change nothing and cost a pass over every gradient. And on the CPU torch loops over the
    gradients in Python (its foreach kernels are for GPUs); `torch._foreach_norm` / `_foreach_mul_` run the
    same per-tensor ops in one C++ loop: 0.1 ms less a step for nanoGPT's 27 tensors (Intel Xeon, 2 cores).
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads or grads[0].device.type != "cpu" or any(type(g) is not Tensor for g in grads) \
            or len({g.dtype for g in grads}) > 1:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)  # GPUs, FSDP's sharded tensors, mixed dtypes
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))  # get_total_norm's reduction
    factor = max_norm / (norm + 1e-6)  # torch's factor, unclamped (nan: scale, as torch does)
    if not factor.item() >= 1.0:
        torch._foreach_mul_(grads, torch.clamp(factor, max=1.0))
    return norm


def train(
    model: nn.Module,
    batches: BatchSource,
    *,
    config: TrainConfig,
    loss_fn: LossFn = lm_loss,
    params: Iterable[nn.Parameter] | None = None,
    evals: Mapping[str, EvalFn] | None = None,
    sample_fn: SampleFn | None = None,
    tokenizer: Any = None,
    run_config: dict[str, Any] | None = None,
    export_fn: ExportFn | None = None,
    log: LogFn | None = None,
    runtime: Runtime | None = None,
) -> TrainResult:
    """Train `model` on `batches` for config.max_steps optimizer steps (see the module docstring).

    `runtime` is where the run executes, as the driver resolved it; None resolves it here from config's
    device, dtype and attn_impl (for a caller outside the driver).
    """
    runtime = runtime or resolve_runtime(config.device, config.dtype, config.attn_impl)
    return _Trainer(model, batches, config=config, runtime=runtime, loss_fn=loss_fn, params=params,
                    evals=evals or {}, sample_fn=sample_fn, tokenizer=tokenizer, run_config=run_config,
                    export_fn=export_fn, log=log).run()


class TrainingDiverged(ValueError):
    """The loss or the gradient norm became non-finite; nothing after the last good checkpoint was saved."""


class _Interval:
    """Training loss, tokens and wall time since the last log row (the loss stays on the device until read)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.loss_sum: Tensor | None = None
        self.steps = 0
        self.tokens = 0
        self.t0 = time.perf_counter()

    def add(self, loss: Tensor, tokens: int) -> None:
        self.loss_sum = loss if self.loss_sum is None else self.loss_sum + loss
        self.steps += 1
        self.tokens += tokens


class _Trainer:
    """One call of `train()`: setup, resume, the loop, evaluation, samples and checkpoints."""

    def __init__(
        self, model: nn.Module, batches: BatchSource, *, config: TrainConfig, runtime: Runtime, loss_fn: LossFn,
        params: Iterable[nn.Parameter] | None, evals: Mapping[str, EvalFn], sample_fn: SampleFn | None,
        tokenizer: Any, run_config: dict[str, Any] | None, export_fn: ExportFn | None, log: LogFn | None,
    ) -> None:
        self.cfg = config
        self.inner = unwrap(model)
        self.batches = batches
        self.loss_fn = loss_fn
        self.evals = dict(evals)
        self.sample_fn = sample_fn
        self.tokenizer = tokenizer
        self.run_config = run_config
        self.export_fn = export_fn
        # Where the run executes comes from the one Runtime; these names only shorten the loop's lines.
        self.runtime = runtime
        self.dist, self.device = runtime.dist, runtime.device
        self.amp_dtype, self.weights_dtype = runtime.dtype, runtime.weights_dtype
        self.fsdp = config.fsdp and self.dist.enabled
        self.out_dir = Path(config.out_dir)
        self._log = log
        self._bar: Any = None
        self._requested_params = list(params) if params is not None else None
        # Counters that a checkpoint carries over.
        self.step = 0
        self.tokens = 0
        self.elapsed_before = 0.0
        self.best_val: float | None = None
        self.best_step: int | None = None
        self.peak: float | None = None
        self.ckpt_step: int | None = None  # step of the newest checkpoint written or resumed from
        self._lock: RunLock | None = None
        self._first_bad: Tensor | None = None  # device-side: step and loss of the first non-finite step

    # -- output -----------------------------------------------------------------------------------

    def say(self, message: str) -> None:
        """Print on rank 0 only (above the progress bar when there is one)."""
        if not self.dist.is_main:
            return
        if self._log is not None:
            self._log(message)
        elif self._bar is not None and not self._bar.disable:
            self._bar.write(message)
        else:
            print(message, flush=True)

    # -- setup ------------------------------------------------------------------------------------

    def _trainable(self) -> list[nn.Parameter]:
        if self._requested_params is None:
            return [p for p in self.inner.parameters() if p.requires_grad]
        return self._requested_params

    def _param_names(self, params: list[nn.Parameter]) -> list[str]:
        by_id = {id(p): n for n, p in self.inner.named_parameters()}
        missing = [i for i, p in enumerate(params) if id(p) not in by_id]
        if missing:
            raise ValueError(f"params[{missing[0]}] is not a parameter of the model being trained")
        return [by_id[id(p)] for p in params]

    def _open_run_dir(self) -> Path | None:
        """Lock the run directory, decide between resuming and a fresh start, tidy what killed runs left.

        Rank 0 holds an exclusive lock on out_dir for the whole run, so the leftovers it deletes
        (temporary files and folders of our own naming) cannot belong to another writer.
        """
        ckpt = check_run_dir(self.out_dir, resume=self.cfg.resume, overwrite=self.cfg.overwrite)  # before writing
        if self.dist.is_main:
            self._lock = RunLock(self.out_dir).acquire()
            # Again under the lock: another process may have been writing here a moment ago.
            ckpt = check_run_dir(self.out_dir, resume=self.cfg.resume, overwrite=self.cfg.overwrite)
        if self.dist.enabled:
            dist.barrier()  # every rank has looked before rank 0 changes anything
        if self.dist.is_main:
            if ckpt is None and self.cfg.overwrite:
                clear_run_dir(self.out_dir)
            clean_leftovers(self.out_dir)
            if ckpt is None and self.cfg.resume:
                self.say(f"no checkpoint in {self.out_dir} to resume from; starting from step 0")
        if self.dist.enabled:
            dist.barrier()
        return ckpt

    def _seed(self) -> None:
        # Python and numpy for any code that uses them; torch for dropout. Each rank gets its own dropout
        # stream; init and data order come from explicit generators elsewhere.
        random.seed(self.cfg.seed)
        np.random.seed(self.cfg.seed % 2**32)
        torch.manual_seed(self.cfg.seed + self.dist.rank)

    def _pick_threads(self, state: dict[str, Any] | None) -> ThreadChoice:
        """Torch CPU threads for the whole run (float results depend in their last bits on the count, so it
        never changes mid-run): --num-threads if given; on a resume, the count the run used before (a bit-exact
        resume); else device.choose_threads (OMP_NUM_THREADS, else one per usable core, fewer on a heavily
        loaded machine). Saved in every checkpoint and logged."""
        recorded = int((state or {}).get("threads") or 0)
        if self.cfg.num_threads:
            choice = ThreadChoice(self.cfg.num_threads, f"{self.cfg.num_threads}, as asked (--num-threads)")
        elif recorded:
            choice = ThreadChoice(recorded, f"{recorded}, as the run being resumed used (a bit-exact resume)")
        else:
            choice = choose_threads()
        return set_threads(choice)

    def _state_options(self) -> Any:
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(full_state_dict=True, cpu_offload=True)

    # -- the run ----------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        try:
            return self._run()
        finally:
            if self._bar is not None:
                self._bar.close()
            if self._lock is not None:
                self._lock.release()

    def _run(self) -> TrainResult:
        cfg, device = self.cfg, self.device
        if self.amp_dtype != torch.float32 and device.type == "cpu" and not native_bf16(device) \
                and self.weights_dtype == torch.float32:  # (bf16-true says it in its precision line)
            self.say(f"note: {self.amp_dtype} autocast on a CPU without native bf16 (capability "
                     f"{torch.backends.cpu.get_cpu_capability()}): emulated, ~100x slower than float32")
        if self.fsdp and self.export_fn is not None:
            raise ValueError("a custom export_fn is not supported with FSDP (the model is sharded)")
        if hasattr(self.inner, "activation_checkpointing"):
            self.inner.activation_checkpointing = cfg.activation_checkpointing
        elif cfg.activation_checkpointing:
            raise ValueError(f"activation_checkpointing recomputes a GPT's blocks; {type(self.inner).__name__} "
                             f"is not a GPT: turn it off")

        ckpt = self._open_run_dir()
        loaded = read_training_checkpoint(ckpt) if ckpt is not None else None
        self.threads = self._pick_threads(loaded[2] if loaded is not None else None)
        if loaded is not None and not self.fsdp:
            load_module_state(self.inner, loaded[0], source=ckpt / "model.safetensors")  # type: ignore[operator]
        trainable = self._trainable()
        if not trainable:
            raise ValueError("no trainable parameters: every parameter has requires_grad=False")
        names = self._param_names(trainable)
        self.runtime.place(self.inner)  # bf16-true: the same Parameter objects, now bfloat16
        self.model = wrap_model(self.inner, dist_info=self.dist, device=device, fsdp=self.fsdp, compile=cfg.compile)
        if self.fsdp:  # sharding replaced the parameters with DTensors: select them again by name
            named = dict(self.inner.named_parameters())
            trainable = [named[n] for n in names]
        self.params = trainable
        self.optimizer = make_optimizer(trainable, cfg, device_type=device.type, model=self.inner)
        self.scaler = torch.amp.GradScaler(device.type) if self.amp_dtype == torch.float16 else None
        if loaded is not None:
            self._restore(ckpt, *loaded)  # type: ignore[arg-type]
            if self.step >= cfg.max_steps:
                return self._nothing_to_do(ckpt)  # type: ignore[arg-type]
        else:
            self._seed()
        if self.peak is None:
            self.peak = peak_flops(device, self.amp_dtype)
        if self.dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        return self._loop(resumed=loaded is not None)

    def _loop(self, *, resumed: bool) -> TrainResult:
        from tqdm.auto import tqdm

        cfg, device = self.cfg, self.device
        csv_log = CsvLog(self.out_dir / LOG_FILE, keep_through_step=self.step if resumed else None) \
            if self.dist.is_main else None
        n_params = sum(p.numel() for p in self.inner.parameters())
        self.say(f"training {type(self.inner).__name__} ({n_params / 1e6:.2f}M parameters, "
                 f"{sum(p.numel() for p in self.params) / 1e6:.2f}M trainable) on {device} "
                 f"({self.amp_dtype}, {self.dist.world_size} process(es)) from step {self.step} to {cfg.max_steps}; "
                 f"run directory {self.out_dir}")
        self.say(precision_line(cfg, device, self.amp_dtype, self.weights_dtype, self.optimizer))
        if device.type == "cpu":
            spins = os.environ.get("GOMP_SPINCOUNT")
            waiting = os.environ.get("OMP_WAIT_POLICY", "").lower() or (
                f"spin {spins} rounds, then sleep" if spins else "OpenMP's default")
            malloc = "kept for reuse" if self.runtime.malloc_kept else "the C library's default"
            self.say(f"CPU threads: {self.threads.reason}; idle threads wait: {waiting}; freed memory: {malloc}")
        fpt: float | None = None
        t_start = time.perf_counter()
        self._plotted = time.monotonic()  # the first redraw comes a minute in (see _checkpoint)
        self._pace = (time.monotonic(), self.step)  # for the time left, which decides a redraw (see _checkpoint)
        metrics: dict[str, float] = {}
        train_loss: float | None = None
        interval = _Interval()
        tok_rates: list[tuple[int, float]] = []  # (tokens, seconds) of each logged interval
        last_mfu: float | None = None
        # Into a log file rather than a terminal, a redraw every 30 s is plenty.
        self._bar = tqdm(total=cfg.max_steps, initial=self.step, unit="step", dynamic_ncols=True, desc="train",
                         disable=not (cfg.progress and self.dist.is_main),
                         mininterval=0.2 if sys.stderr.isatty() else 30.0)

        metrics_step: int | None = None
        if not resumed and self.evals and cfg.eval_interval > 0:
            metrics, metrics_step = self._evaluate(), 0
            self._record(csv_log, {"step": 0, "tokens": 0, "lr": lr_at(0, cfg), "elapsed_s": 0.0}, metrics)
            if self._update_best(metrics):  # the starting point counts: best/ is never worse than it
                self._export_best()
        interrupted, stop_signal = False, None
        drawing: DrawingInBackground | None = None
        with StopRequest() as stop:
            while self.step < cfg.max_steps:
                lr = set_lr(self.optimizer, self.step, cfg)
                micro = [to_device(self.batches.next_batch(), device) for _ in range(cfg.grad_accum_steps)]
                if fpt is None:  # the first step: the batch's shape is known, nothing has run yet
                    fpt = flops_per_token(self.inner, _seq_len(micro[0]))
                    act = self.amp_dtype if self.amp_dtype != torch.float32 else self.weights_dtype
                    self.say(estimate_memory(self.inner, self.optimizer, tokens=batch_tokens(micro[0]), dtype_bytes=
                                             act.itemsize, checkpointing=cfg.activation_checkpointing).line())
                loss, n_tok = train_step(self.model, self.optimizer, micro, loss_fn=self.loss_fn, params=self.params,
                                         grad_accum_steps=cfg.grad_accum_steps, grad_clip=cfg.grad_clip,
                                         scaler=self.scaler, amp=self.runtime.precision)
                self.step += 1
                if device.type != "cuda" and not self.dist.enabled:
                    # No queue to keep full on the CPU, and the loss is already in host memory: read it and
                    # stop at once (one read, instead of the device-side bookkeeping below).
                    value = loss.item()
                    if not math.isfinite(value):
                        self._first_bad = torch.tensor([float(self.step), value])
                        self._stop_if_diverged()
                else:
                    self._note_finite(loss)
                self.tokens += n_tok * self.dist.world_size
                interval.add(loss, n_tok * self.dist.world_size)
                self._bar.update(1)

                last = self.step == cfg.max_steps
                # Alone, look at Ctrl-C every step; in a job, agree on it at log steps only (a collective,
                # and on GPUs a sync that would keep the CPU from queueing ahead).
                stopping = stop.requested if not self.dist.enabled else (
                    (last or self.step % cfg.log_interval == 0) and self._agree(stop.requested))
                do_eval = bool(self.evals) and not stopping and (last or _every(self.step, cfg.eval_interval))
                ckpt_due = last or stopping or _every(self.step, cfg.checkpoint_interval)
                if do_eval or ckpt_due or self.step % cfg.log_interval == 0:
                    self._stop_if_diverged()  # never log, evaluate or save after a non-finite step
                if do_eval or stopping or last or self.step % cfg.log_interval == 0:
                    train_loss = all_reduce_mean(interval.loss_sum / interval.steps, self.dist).item()  # one sync
                    seconds = time.perf_counter() - interval.t0
                    tok_s = interval.tokens / max(seconds, 1e-9)
                    tok_rates.append((interval.tokens, seconds))
                    if self.peak and fpt and fpt * tok_s > self.peak * self.dist.world_size:
                        # The CPU peak was measured while other processes competed for the cores; what
                        # the model just achieved is a better lower bound for it.
                        self.peak = fpt * tok_s / self.dist.world_size
                    last_mfu = fpt * tok_s / (self.peak * self.dist.world_size) if self.peak and fpt else None
                    row = {"step": self.step, "tokens": self.tokens, "lr": lr, "train_loss": train_loss,
                           "tok_per_s": tok_s, "mfu": last_mfu,
                           "elapsed_s": self.elapsed_before + time.perf_counter() - t_start}
                    if do_eval:
                        metrics, metrics_step = self._evaluate(), self.step
                    self._record(csv_log, row, metrics if do_eval else {})
                    if not do_eval and not self._bar.disable:
                        self._bar.set_postfix(loss=f"{train_loss:.4f}", tok_s=f"{tok_s:.0f}")
                    elif self._bar.disable and not do_eval:
                        self.say(progress_line(row, cfg.max_steps))
                if last and csv_log is not None and cfg.plot:
                    # log.csv has its last row: loss.png is drawn by another process while this one writes
                    # the last checkpoint and generates the sample (plots.py); the end of the run collects it.
                    drawing = DrawingInBackground(self.out_dir / LOG_FILE, self.out_dir / PLOT_FILE)
                # The best loss is updated before the checkpoint of this step is written, so that the
                # checkpoint records it: a run resumed from it then ends with the same best/.
                improved = do_eval and self._update_best(metrics)
                if ckpt_due:
                    self._checkpoint(elapsed=self.elapsed_before + time.perf_counter() - t_start, lr=lr)
                if improved:
                    self._export_best()
                if self.sample_fn is not None and not stopping and (last or _every(self.step, cfg.sample_interval)):
                    with threads_left_to_others(1 if drawing is not None else 0):  # a core for the drawing
                        self._sample()
                if do_eval or ckpt_due:
                    interval.reset()  # evaluation and saving are not training time
                elif interval.steps and self.step % cfg.log_interval == 0:
                    interval.reset()
                if stopping:
                    interrupted, stop_signal = True, stop.signum
                    self.say(f"stopped at step {self.step}: checkpoint saved in {self.out_dir}; "
                             f"resume with --resume")
                    break
        self._bar.close()
        if csv_log is not None and cfg.plot:
            self._plot(drawing)
        total_tokens = sum(t for t, _ in tok_rates)
        total_seconds = sum(s for _, s in tok_rates)
        return TrainResult(
            step=self.step, tokens=self.tokens, elapsed_s=self.elapsed_before + time.perf_counter() - t_start,
            tokens_per_s=total_tokens / total_seconds if total_seconds else 0.0, mfu=last_mfu,
            train_loss=train_loss, metrics=metrics, metrics_step=metrics_step, best_val_loss=self.best_val,
            best_step=self.best_step,
            run_dir=self.out_dir, interrupted=interrupted, stop_signal=stop_signal,
        )

    def _nothing_to_do(self, ckpt: Path) -> TrainResult:
        """--resume of a run already at (or past) max_steps: say so; past it is an error (exit 2)."""
        if self.step > self.cfg.max_steps:
            raise ValueError(
                f"{ckpt}: the run is at step {self.step}, past --max-steps {self.cfg.max_steps}; nothing to train "
                f"(a run cannot go back: raise --max-steps above {self.step} to continue it)"
            )
        self.say(f"{ckpt}: the run is already at step {self.step} = --max-steps; nothing to train "
                 f"(raise --max-steps to continue it)")
        return TrainResult(step=self.step, tokens=self.tokens, elapsed_s=self.elapsed_before, tokens_per_s=0.0,
                           mfu=None, train_loss=None, best_val_loss=self.best_val, best_step=self.best_step,
                           run_dir=self.out_dir)

    def _note_finite(self, loss: Tensor) -> None:
        """Remember (on the device, no sync) the first step whose loss or gradient norm was non-finite."""
        bad = ~torch.isfinite(loss)
        entry = torch.stack([torch.tensor(float(self.step), device=loss.device), loss.float()])
        if self._first_bad is None:
            self._first_bad = torch.where(bad, entry, torch.full_like(entry, -1.0))
        else:
            self._first_bad = torch.where(bad & (self._first_bad[0] < 0), entry, self._first_bad)

    def _stop_if_diverged(self) -> None:
        """Raise TrainingDiverged if any rank saw a non-finite loss; called before anything is logged or saved."""
        if self._first_bad is None:
            return
        first = self._first_bad
        if self.dist.enabled:
            first = first.clone()
            dist.all_reduce(first, op=dist.ReduceOp.MAX)
        step, value = first.tolist()
        if step < 0:
            return
        last = f"the last good checkpoint, {self.out_dir / checkpoint_name(self.ckpt_step)}, is kept" \
            if self.ckpt_step is not None else "no checkpoint had been saved yet"
        raise TrainingDiverged(
            f"step {int(step)}: the training loss or gradient norm became non-finite (loss {value}); stopped "
            f"without saving ({last}). Lower --lr (now {self.cfg.lr:g}), keep --grad-clip on, or check the data"
        )

    def _agree(self, flag: bool) -> bool:
        """True on every rank if any rank saw Ctrl-C, so all of them stop at the same step."""
        if not self.dist.enabled:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def _record(self, csv_log: CsvLog | None, row: dict[str, Any], metrics: dict[str, float]) -> None:
        """Write one log.csv row (plus evaluation metrics) and report evaluations on screen."""
        row = dict(row)
        if metrics:
            row["val_loss"] = self._val_metric(metrics)
            row.update({f"eval_{k}": v for k, v in metrics.items()})
            shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
            self.say(f"step {row['step']}: {shown}")
            if not self._bar.disable:
                # Before the first step (the step-0 evaluation) there is no training loss yet: "-", not "nan",
                # which would read as the divergence that stops a run.
                train_loss = row.get("train_loss")
                self._bar.set_postfix(loss=f"{train_loss:.4f}" if train_loss is not None else "-",
                                      val=f"{row['val_loss']:.4f}" if row["val_loss"] is not None else "-")
        if csv_log is not None:
            csv_log.add(row)

    def _val_metric(self, metrics: dict[str, float]) -> float | None:
        """The loss that picks the best checkpoint: evals['val']['loss'], else the first eval's loss."""
        if "val_loss" in metrics:
            return metrics["val_loss"]
        return next((v for k, v in metrics.items() if k.endswith("_loss")), None)

    def _rng_fork(self) -> AbstractContextManager:
        # Evaluation, sampling and exports must not move the training RNG, or resuming would diverge.
        return torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else [])

    def _evaluate(self) -> dict[str, float]:
        out: dict[str, float] = {}
        self.model.eval()
        try:
            with self._rng_fork(), torch.no_grad(), self.runtime.precision():
                for name, fn in self.evals.items():
                    out.update({f"{name}_{k}": float(v) for k, v in fn(self.model).items()})
        finally:
            self.model.train()
        return out

    def _sample(self) -> None:
        if self.fsdp:
            return  # the model is sharded across ranks; generation needs it whole
        if self.dist.is_main:
            self.inner.eval()
            try:
                with self._rng_fork(), torch.no_grad(), self.runtime.precision():
                    text = self.sample_fn(self.inner)  # type: ignore[misc]
            finally:
                self.inner.train()
            self.say(f"--- sample at step {self.step} ---\n{text}\n---")

    def _seconds_left(self) -> float:
        """The time to max_steps at this session's pace so far (0 at the last step)."""
        since, first = self._pace
        if self.step >= self.cfg.max_steps:
            return 0.0
        done = self.step - first
        return (self.cfg.max_steps - self.step) * (time.monotonic() - since) / done if done else math.inf

    def _plot(self, drawing: DrawingInBackground | None = None) -> None:
        """Draw loss.png, or collect the one `drawing` made (drawn here after all if it did not)."""
        self._plotted = time.monotonic()
        drawn = drawing.wait() if drawing is not None else False
        if drawn is False:  # (here an error shows as it would anywhere)
            drawn = plot_log(self.out_dir / LOG_FILE, self.out_dir / PLOT_FILE) is not None
        if not drawn:
            self.say("note: matplotlib is not installed, so no loss plot (pip install 'scratchgpt[plot]')")

    # -- checkpoints ------------------------------------------------------------------------------

    def _gathered_model_state(self) -> dict[str, Tensor]:
        """Full weights of the unwrapped model (gathered from all ranks under FSDP; collective)."""
        if not self.fsdp:
            return model_state(self.inner)
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        state = get_model_state_dict(self.inner, options=self._state_options())
        if isinstance(self.inner, GPT) and self.inner.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        return float32_weights(state)

    def _write_model(self, folder: Path, state: dict[str, Tensor]) -> None:
        model_cfg = self.inner.config.to_dict() if isinstance(self.inner, GPT) else None
        save_model_files(state, folder, model_config=model_cfg, tokenizer=self.tokenizer,
                         extra={"run": self.run_config} if self.run_config is not None else None)

    def _gather_rng(self) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """Every rank's torch RNG states (collective), and rank 0's python/numpy states."""
        rng_json, local = capture_rng_state()
        tensors: dict[str, Tensor] = {}
        for key, t in sorted(local.items()):
            if self.dist.enabled:
                comm = t.to(self.device) if self.device.type == "cuda" else t
                parts = [torch.empty_like(comm) for _ in range(self.dist.world_size)]
                dist.all_gather(parts, comm)
                for r, part in enumerate(parts):
                    tensors[f"rng/rank{r}/{key}"] = part.cpu()
            else:
                tensors[f"rng/rank0/{key}"] = t
        return rng_json, tensors

    def _checkpoint(self, *, elapsed: float, lr: float) -> None:
        state = self._gathered_model_state()
        if self.fsdp:  # gathered from every rank (collective)
            from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

            osd = get_optimizer_state_dict(self.inner, self.optimizer, options=self._state_options())
        else:
            osd = named_optimizer_state(self.inner, self.optimizer)
        rng_json, rng_tensors = self._gather_rng()
        if self.dist.is_main:
            opt_tensors, opt_json = optimizer_state_to_flat(osd)
            train_state = {
                "step": self.step, "tokens": self.tokens, "elapsed_s": elapsed, "lr": lr,
                "best_val_loss": self.best_val, "best_step": self.best_step, "peak_flops": self.peak,
                "world_size": self.dist.world_size, "threads": self.threads.threads,
                "batches": self.batches.state_dict(), "rng": rng_json,
                "scaler": self.scaler.state_dict() if self.scaler is not None else None, "optimizer": opt_json,
            }
            ckpt = write_training_checkpoint(
                self.out_dir, self.step, write_model=lambda d: self._write_model(d, state),
                tensors={**opt_tensors, **rng_tensors}, state=train_state, keep_last=self.cfg.keep_last,
            )
            # The run directory itself always holds the latest model, loadable by load_model/load_any.
            if self.export_fn is None:
                export_model_files(ckpt, self.out_dir)
            else:
                with self._rng_fork():  # an export may draw (LoRA's merge builds new layers); resume must not see it
                    self.export_fn(self.inner, self.out_dir)
            # At most once a minute, and not when the run's end (which draws it) is due within the minute.
            since_last = time.monotonic() - self._plotted
            if self.cfg.plot and plot_due(since_last=since_last, seconds_left=self._seconds_left()):
                self._plot()
        self.ckpt_step = self.step
        if self.dist.enabled:
            dist.barrier()

    def _update_best(self, metrics: dict[str, float]) -> bool:
        """Record this evaluation as the best if its loss is finite and lower than every earlier one."""
        val = self._val_metric(metrics)
        if val is None or not math.isfinite(val) or (self.best_val is not None and val >= self.best_val):
            return False
        self.best_val, self.best_step = val, self.step
        return True

    def _export_best(self) -> None:
        """Write the current model to out_dir/best/ (swapped in whole; see checkpoint.replace_dir)."""
        best = self.out_dir / BEST_DIR
        if self.export_fn is not None:
            if self.dist.is_main:
                with self._rng_fork():
                    replace_dir(best, lambda d: self.export_fn(self.inner, d))  # type: ignore[misc]
        elif self.ckpt_step == self.step:
            if self.dist.is_main:  # the checkpoint of this very step: share its files
                replace_dir(best, lambda d: export_model_files(self.out_dir / checkpoint_name(self.step), d))
        else:
            state = self._gathered_model_state()
            if self.dist.is_main:
                replace_dir(best, lambda d: self._write_model(d, state))
        if self.dist.enabled:
            dist.barrier()

    def _restore(
        self, ckpt: Path, model_sd: dict[str, Tensor], tensors: dict[str, Tensor], state: dict[str, Any]
    ) -> None:
        """Put model (under FSDP), optimizer, scaler, sampler, RNGs and counters back as the checkpoint has them."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        source = ckpt / "train_state.safetensors"
        try:
            if self.fsdp:
                if isinstance(self.inner, GPT) and self.inner.config.tie_word_embeddings:
                    model_sd = {**model_sd, "lm_head.weight": model_sd["transformer.wte.weight"]}
                set_model_state_dict(self.inner, model_sd, options=StateDictOptions(full_state_dict=True))
            osd = optimizer_state_from_flat(tensors, state["optimizer"])
            set_optimizer_state_dict(self.inner, self.optimizer, osd, options=StateDictOptions(full_state_dict=True))
            self.batches.load_state_dict(state["batches"])
            if self.scaler is not None and state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
        except (KeyError, ValueError, RuntimeError) as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise CheckpointError(f"{source}: does not fit this model, optimizer or data ({msg})") from None
        rank = self.dist.rank
        if f"rng/rank{rank}/torch_cpu" not in tensors:
            self.say(f"note: {ckpt} was saved by {state.get('world_size')} process(es); reusing rank 0's RNG state")
            rank = 0
        prefix = f"rng/rank{rank}/"
        restore_rng_state(state["rng"], {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        self.step, self.tokens = int(state["step"]), int(state["tokens"])
        self.elapsed_before = float(state.get("elapsed_s", 0.0))
        self.best_val, self.best_step = state.get("best_val_loss"), state.get("best_step")
        self.peak = state.get("peak_flops")
        self.ckpt_step = self.step
        self.say(f"resumed from {ckpt} (step {self.step}, {self.tokens:,} tokens)")


def _every(step: int, interval: int) -> bool:
    """True at multiples of `interval`; never when it is 0 (off)."""
    return interval > 0 and step % interval == 0


def _seq_len(batch: Any) -> int:
    """T of a batch: the last dimension of its first tensor."""
    if isinstance(batch, Tensor):
        return batch.shape[-1]
    values = batch.values() if isinstance(batch, Mapping) else batch
    return _seq_len(next(iter(values)))
