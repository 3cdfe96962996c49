"""Training-step throughput: scratchgpt against Hugging Face's GPT2LMHeadModel, on the CPU, float32 and bf16.

One step = forward + backward + grad clip + fused AdamW, through `scratchgpt.train.train_step` for both
models (same config, same batch, same loss, same optimizer settings), so the models are what differs.
Each model is timed with eager and SDPA attention, in float32 and under bf16 autocast (bf16 only where
the CPU has native bf16, unless --bf16 always); steps of all variants are interleaved round by round
so that drift on a shared machine hits them alike. Interference from other processes only ever slows a
step down, so the fastest step of each variant is the headline figure (the median is reported too).

Each dtype's tokens/s is also given as a fraction of what the CPU's matmul peak of that dtype allows:
peak-bounded tokens/s = (measured matmul FLOP/s of that dtype, 2048², best of 10, in this run) /
(training FLOPs per token: 6·N + 12·L·C·T, `runlog.flops_per_token`), so the fraction is the model
FLOPs utilisation against a peak measured here rather than a datasheet.

    flock /tmp/scratchgpt-bench.lock .venv/bin/python bench/train.py [--rounds N] [--only small|gpt2]

Prints one JSON line: CPU capability and bf16 flag, the measured peaks, tokens/s per model, dtype and
attention path, scratchgpt-best / transformers-best per dtype, fractions of peak, and bf16 / float32.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scratchgpt.config import GPTConfig, TrainConfig
from scratchgpt.device import native_bf16
from scratchgpt.model.gpt import GPT
from scratchgpt.training.optim import make_optimizer
from scratchgpt.training.runlog import flops_per_token, measure_cpu_flops
from scratchgpt.training.runtime import autocast
from scratchgpt.training.train import lm_loss, train_step

# name: (model config, batch size, sequence length, timed rounds)
SETUPS: dict[str, tuple[GPTConfig, int, int, int]] = {
    "gpt2_124m": (GPTConfig.from_name("gpt2", embd_pdrop=0.0, resid_pdrop=0.0, attn_pdrop=0.0), 4, 256, 3),
    "small_6l_384": (GPTConfig(vocab_size=65, n_positions=256, n_embd=384, n_layer=6, n_head=6,
                               embd_pdrop=0.0, resid_pdrop=0.0, attn_pdrop=0.0), 12, 256, 5),
    # nanoGPT's Tiny Shakespeare CPU model (and the speedrun's size class): small matmuls, overhead shows.
    "char_4l_128": (GPTConfig(vocab_size=65, n_positions=64, n_embd=128, n_layer=4, n_head=4, bias=False,
                              embd_pdrop=0.0, resid_pdrop=0.0, attn_pdrop=0.0), 12, 64, 20),
}
OPTIM = TrainConfig(lr=6e-4, weight_decay=0.1, beta1=0.9, beta2=0.95, grad_clip=1.0, fused_adamw=True)


def hf_model(config: GPTConfig) -> nn.Module:
    """GPT2LMHeadModel with the same hyper-parameters (and the same init std) as `config`."""
    from transformers import GPT2Config, GPT2LMHeadModel

    hf_cfg = GPT2Config(
        vocab_size=config.vocab_size, n_positions=config.n_positions, n_embd=config.n_embd,
        n_layer=config.n_layer, n_head=config.n_head, resid_pdrop=config.resid_pdrop,
        embd_pdrop=config.embd_pdrop, attn_pdrop=config.attn_pdrop, layer_norm_epsilon=config.layer_norm_epsilon,
        bos_token_id=None, eos_token_id=None,
    )
    return GPT2LMHeadModel(hf_cfg).train()


def set_hf_attn(model: nn.Module, impl: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(impl)
    else:  # older transformers read the config field at call time
        model.config._attn_implementation = impl


def hf_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    """The same loss as scratchgpt's: mean cross-entropy of logits (B, T, V) against y (B, T)."""
    x, y = batch
    logits = model(input_ids=x).logits
    return F.cross_entropy(logits.flatten(0, 1), y.flatten())


def bench_setup(name: str, *, rounds: int | None = None, dtypes: tuple[torch.dtype, ...] = (torch.float32,),
                peaks: dict[torch.dtype, float] | None = None) -> dict:
    config, B, T, default_rounds = SETUPS[name]
    rounds = rounds or default_rounds
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(config.vocab_size, (B, T), generator=gen)
    y = torch.randint(config.vocab_size, (B, T), generator=gen)
    batch = (x, y)
    cpu = torch.device("cpu")

    ours = GPT(config, generator=torch.Generator().manual_seed(0)).train()
    theirs = hf_model(config)
    steppers: dict[tuple[str, str, str], Callable[[], None]] = {}
    for label, model, loss_fn in (("scratchgpt", ours, lm_loss), ("transformers", theirs, hf_loss)):
        params = [p for p in model.parameters() if p.requires_grad]
        opt = make_optimizer(params, OPTIM, device_type="cpu")
        for dtype in dtypes:
            for impl in ("eager", "sdpa"):
                def step(model=model, opt=opt, params=params, loss_fn=loss_fn, impl=impl, label=label,
                         dtype=dtype) -> None:
                    (model.set_attn_impl if label == "scratchgpt" else lambda i: set_hf_attn(model, i))(impl)
                    # Master weights and optimizer state stay float32; autocast lowers the matmuls only.
                    train_step(model, opt, [batch], loss_fn=loss_fn, params=params, grad_accum_steps=1,
                               grad_clip=OPTIM.grad_clip, amp=lambda dtype=dtype: autocast(cpu, dtype))
                steppers[(label, _name(dtype), impl)] = step

    times: dict[tuple[str, str, str], list[float]] = {k: [] for k in steppers}
    for step in steppers.values():  # warm-up: allocator, kernels, optimizer state
        step()
    for _ in range(rounds):
        for key, step in steppers.items():
            t0 = time.perf_counter()
            step()
            times[key].append(time.perf_counter() - t0)
    fpt = flops_per_token(ours, T)  # the same architecture: the same FLOPs per token for both
    result: dict = {"batch": [B, T], "rounds": rounds, "flops_per_token": fpt}
    for stat, pick in (("best", min), ("median", statistics.median)):
        tok_s = {k: B * T / pick(v) for k, v in times.items()}
        for (label, dt, impl), value in tok_s.items():
            result.setdefault(label, {}).setdefault(stat, {}).setdefault(dt, {})[impl] = round(value, 1)
        for dt in map(_name, dtypes):
            best_ours = max(result["scratchgpt"][stat][dt].values())
            best_hf = max(result["transformers"][stat][dt].values())
            result.setdefault("ratio", {}).setdefault(stat, {})[dt] = round(best_ours / best_hf, 3)
            if peaks:
                bound = peaks[_DTYPES[dt]] / fpt  # tokens/s if every FLOP ran at the measured matmul peak
                for label, best in (("scratchgpt", best_ours), ("transformers", best_hf)):
                    result.setdefault("fraction_of_peak", {}).setdefault(stat, {}).setdefault(label, {})[dt] = \
                        round(best / bound, 3)
        if "bfloat16" in result["scratchgpt"][stat]:
            result.setdefault("bf16_over_fp32", {})[stat] = round(
                max(result["scratchgpt"][stat]["bfloat16"].values())
                / max(result["scratchgpt"][stat]["float32"].values()), 3)
    fastest = result["scratchgpt"]["best"]["float32"]
    result["faster_attn_scratchgpt"] = max(fastest, key=fastest.get)
    return result


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int,
                        help="timed steps per variant (default: 3 for 124M, 5 for 6L/384, 20 for 4L/128)")
    parser.add_argument("--only", choices=list(SETUPS), help="run one setup")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    parser.add_argument("--bf16", choices=["auto", "always", "never"], default="auto",
                        help="also time bf16 autocast: auto = where the CPU has native bf16 (emulated is ~100x slower)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    native = native_bf16("cpu")
    bf16 = args.bf16 == "always" or (args.bf16 == "auto" and native)
    dtypes = (torch.float32, torch.bfloat16) if bf16 else (torch.float32,)
    peaks = {d: measure_cpu_flops(n=2048 if d == torch.float32 or native else 256, dtype=d) for d in dtypes}
    caps = torch.cpu.get_capabilities()
    out: dict = {"bench": "train_step", "dtypes": [_name(d) for d in dtypes],
                 "cpu_capability": torch.backends.cpu.get_cpu_capability(), "native_bf16": native,
                 "avx512_bf16": bool(caps.get("avx512_bf16")), "amx_bf16": bool(caps.get("amx_bf16")),
                 "matmul_peak_gflops": {_name(d): round(p / 1e9, 1) for d, p in peaks.items()},
                 "threads": torch.get_num_threads(), "torch": torch.__version__,
                 "transformers": transformers.__version__}
    t0 = time.perf_counter()
    for name in [args.only] if args.only else list(SETUPS):
        out[name] = bench_setup(name, rounds=args.rounds, dtypes=dtypes, peaks=peaks)
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
