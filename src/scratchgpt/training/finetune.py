"""What every fine-tuning mode shares, and `run_mode`, which hands a mode to the one driver.

A mode (`classify.py`, `instruct.py`, `dpo.py`) is only what it gives `train.train`: its examples per
split with a collate function, a loss `loss_fn(model, batch)`, an evaluation, maybe a new head, and
the parameters that train. AdamW, the schedule, clipping, logging, checkpoints and exact resume are
the loop's, the same as for pretraining. This module holds the rest they have in common: splitting,
a resumable batch source over examples, the starting model, dropout, freezing, LoRA-aware export and
the run directory's reports (`splits.json`, `metrics.json`).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch
from torch import Tensor, nn

from scratchgpt.checkpoint import (
    HF_MODEL_NAMES,
    checkpoint_kind,
    load_any,
    load_model,
    read_run_config,
    save_model,
    unwrap,
)
from scratchgpt.config import (
    FinetuneConfig,
    GPTConfig,
    LoRAConfig,
    Trainable,
    TrainConfig,
    config_from_dict,
    config_to_dict,
)
from scratchgpt.data.sources import DataError
from scratchgpt.data.tokenizers import CharTokenizer, Tokenizer, gpt2_tokenizer, load_tokenizer
from scratchgpt.files import check_overwrite, write_json
from scratchgpt.model.gpt import GPT, CausalSelfAttention
from scratchgpt.tensor_files import CheckpointError
from scratchgpt.training.driver import Job, drive
from scratchgpt.training.lora import (
    apply_lora,
    count_parameters,
    lora_config,
    lora_parameters,
    merge_lora,
    save_adapters,
)
from scratchgpt.training.plots import plot_metric
from scratchgpt.training.run_state import folder_contents
from scratchgpt.training.runtime import Runtime, all_reduce_sums, distributed_info, is_main, model_device, to_device
from scratchgpt.training.train import TrainResult

E = TypeVar("E")

SPLITS = ("train", "val", "test")
SPLITS_FILE = "splits.json"
METRICS_FILE = "metrics.json"

# ---------------------------------------------------------------------------------------------
# Data: splitting, batching
# ---------------------------------------------------------------------------------------------


def split_indices(n: int, fractions: Sequence[float], *, shuffle: bool = True, seed: int = 123) -> dict[str, list[int]]:
    """Indices of the train/val/test splits: int(n·f) each, the remainder to test when the fractions sum to 1."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist() if shuffle else list(range(n))
    n_train, n_val = int(n * fractions[0]), int(n * fractions[1])
    # Fractions summing to 1 give test everything left over, so no entry is lost to rounding.
    n_test = n - n_train - n_val if abs(sum(fractions) - 1.0) < 1e-9 else int(n * fractions[2])
    bounds = [0, n_train, n_train + n_val, n_train + n_val + n_test]
    return {name: order[bounds[i] : bounds[i + 1]] for i, name in enumerate(SPLITS)}


def check_splits(
    parts: dict[str, Sequence[Any]], fractions: Sequence[float], *, source: str, dropped: int = 0,
    max_length: int | None = None,
) -> None:
    """Raise DataError for a split that was asked for (fraction > 0) but holds nothing; report dropped entries."""
    too_long = (f"{dropped} entries were dropped as longer than max_length {max_length} (see --too-long, "
                f"--max-length)") if dropped else ""
    for name, frac in zip(SPLITS, fractions, strict=True):
        if frac > 0 and not parts[name]:
            total = sum(len(v) for v in parts.values())
            raise DataError(
                f"{source}: the {name} split is empty ({total} usable entries × {frac:g} rounds to 0"
                f"{'; ' + too_long if too_long else ''}); use more data or a larger --split fraction"
            )
    if too_long and is_main():
        print(f"note: {source}: {too_long}", file=sys.stderr, flush=True)


def split_record(source: str | Path, splits: dict[str, list[int]], **extra: Any) -> dict[str, Any]:
    """What splits.json holds: the data file, how it was split, and each split's 0-based entry indices."""
    return {"data": str(source), **extra, **{k: list(splits[k]) for k in SPLITS}}


class ExampleBatches(Generic[E]):
    """Every example once per epoch, shuffled per epoch: a resumable batch source for the training loop.

    Like `data.SequentialWindows`: the epochs form one stream, global batch n is stream positions
    [n·G, (n+1)·G) with G = batch_size · world_size, rank r takes its batch_size of them, and the
    state (one integer position) is identical on every rank. Rank and world size default to the
    process group's when a batch is drawn, since the loop may start the group after this is built.
    """

    def __init__(
        self, examples: Sequence[E], collate: Callable[[list[E]], Any], *, batch_size: int, seed: int = 0,
        shuffle: bool = True, rank: int | None = None, world_size: int | None = None,
    ) -> None:
        if not examples:
            raise DataError("no training examples")
        self.examples, self.collate, self.batch_size = examples, collate, batch_size
        self.seed, self.shuffle, self.rank, self.world_size = seed, shuffle, rank, world_size
        self.position = 0  # examples consumed so far, over all ranks and epochs
        self._order: tuple[int, list[int]] | None = None  # (epoch, permutation) cache

    @property
    def epoch(self) -> int:
        return self.position // len(self.examples)

    def _epoch_order(self, epoch: int) -> list[int]:
        if self._order is None or self._order[0] != epoch:
            n = len(self.examples)
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._order = (epoch, torch.randperm(n, generator=gen).tolist() if self.shuffle else list(range(n)))
        return self._order[1]

    def next_batch(self) -> Any:
        """The collated batch of this rank's next batch_size examples (a batch may straddle two epochs)."""
        group = distributed_info()
        rank = group.rank if self.rank is None else self.rank
        world = group.world_size if self.world_size is None else self.world_size
        first = self.position + rank * self.batch_size
        items = []
        for p in range(first, first + self.batch_size):
            epoch, offset = divmod(p, len(self.examples))
            items.append(self.examples[self._epoch_order(epoch)[offset]])
        self.position += self.batch_size * world
        return self.collate(items)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "examples", "seed": self.seed, "position": self.position, "num_examples": len(self.examples)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "examples" or state.get("num_examples") != len(self.examples):
            raise DataError(
                f"batch state is for {state.get('num_examples')} examples, this data has {len(self.examples)}; "
                f"resume with the same data, split and length settings"
            )
        self.seed, self.position, self._order = int(state["seed"]), int(state["position"]), None


def eval_batches(
    examples: Sequence[E], collate: Callable[[list[E]], Any], *, batch_size: int, max_batches: int | None = None,
) -> Iterator[Any]:
    """This rank's share of the first `max_batches` batches of `examples`, in order (all when None)."""
    group = distributed_info()
    n = len(examples) if max_batches is None else min(len(examples), max_batches * batch_size)
    mine = list(examples[:n])[group.rank :: group.world_size]
    for i in range(0, len(mine), batch_size):
        yield collate(mine[i : i + batch_size])


@torch.no_grad()
def evaluate_sums(
    model: nn.Module, examples: Sequence[E], collate: Callable[[list[E]], Any],
    score: Callable[[nn.Module, Any], dict[str, float]], *, keys: Sequence[str], batch_size: int,
    max_batches: int | None = None,
) -> dict[str, float]:
    """`score(model, batch)` summed over this rank's evaluation batches, then over ranks: the one eval set-up.

    The model runs unwrapped (DDP would sync buffers on every forward, and ranks may score unequal batch
    counts) in eval mode, put back as it was after. Every rank returns the same `keys`, even with no batch.
    """
    model = unwrap(model)
    device = model_device(model)
    was_training = model.training
    model.eval()
    sums = dict.fromkeys(keys, 0.0)
    try:
        for batch in eval_batches(examples, collate, batch_size=batch_size, max_batches=max_batches):
            for k, v in score(model, to_device(batch, device)).items():
                sums[k] += v
    finally:
        model.train(was_training)
    return all_reduce_sums(sums, device)


# ---------------------------------------------------------------------------------------------
# The model: where it starts, its dropout, what trains
# ---------------------------------------------------------------------------------------------


@dataclass
class StartModel:
    """The model a fine-tune starts from, its tokenizer, and its config.json (empty unless a run directory)."""

    model: GPT
    tokenizer: Tokenizer
    source: str
    run_config: dict[str, Any] = field(default_factory=dict)


def load_start_model(
    init: str, *, tokenizer: str = "auto", corpus: Callable[[], str] | None = None,
    model_overrides: dict[str, Any] | None = None, seed: int = 1337, dtype: torch.dtype | None = None,
) -> StartModel:
    """The starting model: a scratchgpt run directory, a Hugging Face GPT-2 directory/name, or 'scratch'.

    A scratch model uses GPT-2's tokenizer, or with tokenizer='char' one trained on `corpus()`. A
    checkpoint brings its own; naming a different kind is an error. `dtype`: load a checkpoint's weights
    straight into it (LoRA over a bf16 or int8 base: lora.base_load_dtype).
    """
    if init == "scratch":
        if tokenizer == "char":
            if corpus is None:
                raise ValueError("a char tokenizer for a scratch model is trained on the data; pass corpus=")
            tok: Tokenizer = CharTokenizer.train(corpus())
        elif tokenizer in ("auto", "gpt2"):
            tok = gpt2_tokenizer()
        else:
            raise ValueError(f"a scratch model can use a 'gpt2' or 'char' tokenizer, not {tokenizer!r}")
        config = GPTConfig.from_dict({"vocab_size": tok.vocab_size, **(model_overrides or {})}, source="model flags")
        return StartModel(GPT(config, generator=torch.Generator().manual_seed(seed)), tok, "scratch")
    if model_overrides:
        raise ValueError(f"model flags {sorted(model_overrides)} shape a scratch model; --init {init} has its own")
    if not Path(init).exists() and (init.startswith((".", "/", "~")) or init.count("/") != 1) \
            and init not in HF_MODEL_NAMES:
        raise FileNotFoundError(f"{init}: no such checkpoint directory (nor a Hugging Face name like gpt2)")
    if checkpoint_kind(init) == "scratchgpt":
        if read_run_config(init).get("task") == "classification":
            raise CheckpointError(f"{init}: is a classifier (its head scores labels, not tokens); start from "
                                  f"the language model it was fine-tuned from")
        model, run_config = load_model(init, dtype=dtype)
        if (Path(init) / "tokenizer.json").is_file():
            tok = load_tokenizer(init)
        elif tokenizer == "gpt2":
            tok = gpt2_tokenizer()
        else:
            raise CheckpointError(
                f"{init}: has no tokenizer.json; pass --tokenizer gpt2 if it was trained with GPT-2's"
            )
    else:
        model, tok = load_any(init, dtype=dtype)
        run_config = {}
    if tokenizer != "auto" and tok.name != tokenizer:
        raise CheckpointError(
            f"{init}: was trained with a {tok.name!r} tokenizer, not {tokenizer!r}; drop --tokenizer to use its own"
        )
    if tok.vocab_size > model.config.vocab_size:
        raise CheckpointError(f"{init}: its tokenizer has {tok.vocab_size} tokens but the model only "
                              f"{model.config.vocab_size}; they do not belong together")
    return StartModel(model.train(), tok, str(init), run_config)


def encode_checked(tokenizer: Tokenizer, text: str, *, vocab_size: int, where: str) -> list[int]:
    """Token ids of `text`, every one below vocab_size; errors name `where` (file and entry)."""
    try:
        ids = tokenizer.encode(text)
    except ValueError as e:
        # A character-level model (the demo's) cannot learn new characters here: say what to start from.
        hint = (" (a character-level model reads only the characters it was pretrained on: fine-tune one with "
                "GPT-2's BPE instead, e.g. `scratchgpt train -c configs/shakespeare_gpt2bpe_small.toml` or --init gpt2)"
                if tokenizer.name == "char" else "")
        raise DataError(f"{where}: {e}{hint}") from None
    if ids and max(ids) >= vocab_size:
        raise DataError(f"{where}: encodes to token id {max(ids)} but the model's vocabulary has {vocab_size} "
                        f"tokens; the checkpoint was trained with another tokenizer")
    return ids


def context_limit(model: GPT, max_length: int | None) -> int:
    """max_length, or the model's context when unset; longer than the context is an error."""
    n_ctx = model.config.n_positions
    if max_length is not None and max_length > n_ctx:
        raise ValueError(f"--max-length {max_length} exceeds the model's context of {n_ctx} tokens")
    return max_length or n_ctx


def set_dropout(model: GPT, p: float) -> None:
    """Set every dropout rate of `model` to p, in its modules and its config (so a saved model records it)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = p
        if isinstance(module, CausalSelfAttention):
            module.attn_pdrop = p  # the fused attention path reads this, not the Dropout module
    model.config = dataclasses.replace(model.config, embd_pdrop=p, resid_pdrop=p, attn_pdrop=p)


def set_trainable(model: GPT, trainable: Trainable, *, head_trains: bool = False) -> list[nn.Parameter]:
    """Freeze all but the chosen weights; returns the parameters that train.

    all: everything. last-block: the last transformer block, the final LayerNorm and the head.
    head: the head alone (GPT-2's LM head shares its matrix with the token embeddings, which then
    train too). lora: the adapters (apply_lora first), plus the head when `head_trains` (a new one).
    """
    if trainable == "lora":
        if not lora_parameters(model):
            raise ValueError("trainable='lora' needs adapters: call apply_lora(model, LoRAConfig(...)) first")
        keep = {id(p) for p in lora_parameters(model)}
        if head_trains:
            keep |= {id(p) for p in model.lm_head.parameters()}
    elif trainable == "all":
        keep = {id(p) for p in model.parameters()}
    elif trainable == "head":
        keep = {id(p) for p in model.lm_head.parameters()}
    elif trainable == "last-block":
        modules = (model.transformer.h[-1], model.transformer.ln_f, model.lm_head)
        keep = {id(p) for m in modules for p in m.parameters()}
    else:
        raise ValueError(f"trainable={trainable!r}; choose all, last-block, head or lora")
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    return [p for p in model.parameters() if p.requires_grad]


def add_classification_head(model: GPT, num_classes: int, *, generator: torch.Generator | None = None) -> GPT:
    """Replace the LM head by Linear(C, num_classes) (with bias), untied from the token embeddings."""
    w = model.transformer.wte.weight
    head = nn.Linear(model.config.n_embd, num_classes, bias=True, device=w.device, dtype=w.dtype)
    if w.device.type != "meta":
        nn.init.normal_(head.weight, std=model.config.initializer_range, generator=generator)
        nn.init.zeros_(head.bias)
    model.lm_head = head
    # vocab_size stays (the embeddings need it), but the head is no longer the embedding matrix.
    model.config = dataclasses.replace(model.config, tie_word_embeddings=False)
    return model


def prepare_model(
    model: GPT, cfg: FinetuneConfig, *, mode: str, lora: LoRAConfig | None, seed: int,
    add_head: Callable[[GPT], Any] | None = None,
) -> tuple[list[nn.Parameter], Trainable]:
    """Set dropout, add the mode's head, apply LoRA and freeze: (parameters that train, the choice made)."""
    if cfg.dropout is not None:
        set_dropout(model, cfg.dropout)
    if add_head is not None:
        add_head(model)
    trainable: Trainable = cfg.trainable or ("lora" if lora is not None else type(cfg).default_trainable)
    if trainable == "lora":
        # A new head trains beside the adapters: it stays float32 whatever the frozen base is held in.
        apply_lora(model, lora or LoRAConfig(), generator=torch.Generator().manual_seed(seed),
                   keep=("lm_head",) if add_head is not None else ())
    elif lora is not None:
        raise ValueError(f"--lora-* flags need --trainable lora (got --trainable {trainable})")
    return set_trainable(model, trainable, head_trains=add_head is not None), trainable


def train_config(cfg: FinetuneConfig, train: TrainConfig | dict[str, Any] | None = None) -> TrainConfig:
    """The mode's typed TrainConfig: its class's defaults (`type(cfg).train_config`) with `train`'s fields set."""
    if isinstance(train, TrainConfig):
        return train
    return config_from_dict(type(cfg).train_config, dict(train or {}), source="train settings")


def resolve_train_config(cfg: FinetuneConfig, train: TrainConfig, *, n_train: int) -> TrainConfig:
    """`train` with max_steps set: as given, else cfg.epochs passes over n_train examples at the global batch."""
    if train.max_steps is not None:
        return train
    per_step = train.batch_size * train.grad_accum_steps * int(os.environ.get("WORLD_SIZE", "1"))
    return dataclasses.replace(train, max_steps=max(1, math.ceil(cfg.epochs * n_train / per_step)))


def check_base_dtype(lora: LoRAConfig | None, train: TrainConfig) -> TrainConfig:
    """`train` fitted to LoRA's frozen base: a bfloat16 base computes in bf16, so dtype 'auto' becomes bf16 autocast
    (float32 activations would need the weights cast every step); combinations that cannot work are errors."""
    base = lora.base_dtype if lora is not None else "float32"
    if base == "bfloat16" and train.dtype == "auto":
        return dataclasses.replace(train, dtype="bfloat16")
    if base == "bfloat16" and train.dtype in ("float32", "float16"):
        raise ValueError(f"LoRAConfig.base_dtype='bfloat16' computes in bfloat16, not dtype={train.dtype!r}; use "
                         f"--dtype bfloat16 (autocast) or bf16-true, or --lora-base-dtype float32")
    if base == "int8" and train.dtype == "bf16-true":
        raise ValueError("LoRAConfig.base_dtype='int8' keeps the int8 scales and the adapters in float32; "
                         "dtype='bf16-true' would cast them: use --dtype auto or bfloat16 (autocast)")
    return train


def export_fn(tokenizer: Tokenizer, extra: dict[str, Any], *, base: str) -> Callable[[nn.Module, str | Path], None]:
    """The loop's export_fn: save_model with `extra` in config.json; with LoRA, merged plus the adapters alone."""

    def export(model: nn.Module, directory: str | Path) -> None:
        inner = unwrap(model)
        config = lora_config(inner)
        if config is None:
            save_model(inner, directory, tokenizer=tokenizer, extra=extra)
            return
        # Both forms: the merged model is a plain GPT that every command (and the HF export) loads; the
        # adapter file is the few MB that re-create it from the base.
        info = {k: v for k, v in extra.items() if k != "finetune"}
        save_adapters(inner, directory, base=base, extra={"info": info})
        merged = merge_lora(copy.deepcopy(inner))
        save_model(merged, directory, tokenizer=tokenizer,
                   extra={**extra, "lora": {**config_to_dict(config), "merged": True, "base": base}})

    return export


# ---------------------------------------------------------------------------------------------
# Running a mode on the loop
# ---------------------------------------------------------------------------------------------


@dataclass
class Mode(Generic[E]):
    """A fine-tuning mode: its examples per split and how to batch, score, evaluate and save them.

    `evaluate(model, examples, batch_size=, max_batches=, final=)` returns {"loss": ..., ...}; with
    final=True it may add non-scalar reports (a confusion matrix) for metrics.json. `splits` is what
    splits.json records (see `split_record`). `setup(model, batch_size)` runs once before training,
    with the model ready on its device (DPO computes the reference log-probabilities there).
    """

    name: str
    parts: dict[str, list[E]]
    splits: dict[str, Any]
    collate: Callable[[list[E]], Any]
    loss_fn: Callable[[nn.Module, Any], Tensor]
    evaluate: Callable[..., dict[str, Any]]
    info: dict[str, Any]
    add_head: Callable[[GPT], Any] | None = None
    sample_fn: Callable[[nn.Module], str] | None = None
    setup: Callable[[GPT, int], None] | None = None
    plots: tuple[str, ...] = ()  # metrics (besides the loop's loss) to draw from log.csv as <metric>.png
    report: dict[str, Any] = field(default_factory=dict)  # added to metrics.json as is (e.g. label names)


@dataclass
class FinetuneResult:
    """What a fine-tuning run produced: its directory, final metrics and the trained model."""

    out_dir: Path
    metrics: dict[str, Any]
    model: GPT
    tokenizer: Tokenizer
    interrupted: bool = False
    stop_signal: int | None = None  # as TrainResult's


def run_mode(
    mode: Mode, start: StartModel, cfg: FinetuneConfig, *, train: TrainConfig, lora: LoRAConfig | None = None,
    verbose: bool = True,
) -> FinetuneResult:
    """Prepare the model for `mode`, train it through the one driver, and write metrics.json for every split.

    `train` is the mode's TrainConfig as `train_config` built it; only an unset max_steps is filled in here.

    metrics.json holds the final metrics per split, "start" (val before the first step), the time
    taken and the parameter counts. Under torchrun every rank calls this; rank 0 writes the files.
    """
    model = start.model
    tcfg = check_base_dtype(lora, resolve_train_config(cfg, train, n_train=len(mode.parts["train"])))
    params, trainable = prepare_model(model, cfg, mode=mode.name, lora=lora, seed=tcfg.seed, add_head=mode.add_head)
    finetune = {"mode": mode.name, **config_to_dict(cfg), "trainable": trainable, "init": start.source,
                "lora": config_to_dict(lora_config(model)) if lora_config(model) else None}
    counts = count_parameters(model)
    before: dict[str, Any] = {}
    timing: dict[str, float] = {}

    def setup(runtime: Runtime) -> None:
        # The model is where and how the loop will run it (device, attention path; autocast below), so
        # numbers computed before training (the DPO reference, the starting metrics) match the loop's.
        with torch.no_grad(), runtime.precision():
            if mode.setup is not None:
                mode.setup(model, tcfg.batch_size)
            # The starting point, for "did it learn": the val split before the first step.
            before.update({name: mode.evaluate(model, part, batch_size=tcfg.batch_size)
                           for name, part in mode.parts.items() if name == "val" and part})
        if verbose and is_main():
            sizes = "/".join(str(len(mode.parts[k])) for k in SPLITS)
            base = lora_config(model).base_dtype if lora_config(model) is not None else "float32"
            print(f"{mode.name}: train/val/test {sizes}, trainable {trainable}: {counts['trainable']:,} of "
                  f"{counts['total']:,} parameters{'' if base == 'float32' else f' (frozen base in {base})'}, "
                  f"{tcfg.max_steps} steps of {tcfg.batch_size}", flush=True)
        timing["t0"] = time.perf_counter()

    def final(result: TrainResult, runtime: Runtime) -> tuple[dict[str, Any], bool]:
        timing["seconds"] = time.perf_counter() - timing["t0"]
        with torch.no_grad(), runtime.precision():
            metrics = {name: mode.evaluate(model, part, batch_size=tcfg.batch_size, final=True)
                       for name, part in mode.parts.items() if part}
        return metrics, is_main()

    splits = ("train", "val") if tcfg.eval_train else ("val",)

    def job(runtime: Runtime) -> Job:
        return Job(
            model, ExampleBatches(mode.parts["train"], mode.collate, batch_size=tcfg.batch_size, seed=tcfg.seed),
            loss_fn=mode.loss_fn, params=params,
            evals={name: (lambda m, part=part: mode.evaluate(m, part, batch_size=tcfg.batch_size,
                                                             max_batches=tcfg.eval_steps))
                   for name, part in mode.parts.items() if name in splits and part},
            sample_fn=mode.sample_fn, tokenizer=start.tokenizer,
            run_config={"finetune": finetune, "train": config_to_dict(tcfg)},
            export_fn=export_fn(start.tokenizer, {**mode.info, "finetune": finetune}, base=start.source),
            before=setup, after=final,
        )

    result, (metrics, main) = drive(tcfg, job)
    metrics.update(mode.report, start=before, train_seconds=round(timing["seconds"], 1), steps=result.step,
                   trainable=trainable, trainable_parameters=counts["trainable"], total_parameters=counts["total"])
    if lora_config(model) is not None:
        metrics["lora_parameters"] = sum(p.numel() for p in lora_parameters(model))
    if result.interrupted:
        metrics["interrupted"] = True
    if main:  # written after the loop, which refuses a directory that holds another run's checkpoints
        write_json(Path(tcfg.out_dir) / SPLITS_FILE, mode.splits)
        write_json(Path(tcfg.out_dir) / METRICS_FILE, metrics)
        for metric in mode.plots if tcfg.plot else ():
            plot_metric(tcfg.out_dir, metric)
    return FinetuneResult(Path(tcfg.out_dir), metrics, model, start.tokenizer, interrupted=result.interrupted,
                          stop_signal=result.stop_signal)


def merge_adapters(base: str, adapters: str | Path, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Apply saved LoRA adapters to `base`, fold them into its weights, and save a plain run directory
    (`out_dir` must not hold a model or run unless `overwrite`)."""
    from scratchgpt.training.lora import load_adapters, read_adapter_config

    check_overwrite(out_dir, overwrite=overwrite, flag="--out-dir", held=folder_contents(out_dir))
    meta = read_adapter_config(adapters)
    info = meta.get("info") or {}
    model, tokenizer = load_any(base)
    if info.get("task") == "classification":
        add_classification_head(model, len(info["classifier"]["labels"]))
    load_adapters(model, adapters)
    merge_lora(model)
    save_model(model, out_dir, tokenizer=tokenizer,
               extra={**info, "lora": {**meta["lora"], "merged": True, "base": str(base)}})
    return Path(out_dir)
