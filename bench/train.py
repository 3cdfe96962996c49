"""Training-step throughput: scratchgpt against Hugging Face's GPT2LMHeadModel, on the CPU, float32.

One step = forward + backward + grad clip + fused AdamW, through `scratchgpt.train.train_step` for both
models (same config, same batch, same loss, same optimizer settings), so the models are what differs.
Each model is timed with eager and SDPA attention; steps of all variants are interleaved round by round
so that drift on a shared machine hits them alike. Interference from other processes only ever slows a
step down, so the fastest step of each variant is the headline figure (the median is reported too).

    flock /tmp/scratchgpt-bench.lock .venv/bin/python bench/train.py [--rounds N] [--only small|gpt2]

Prints one JSON line: tokens/s per model and attention path, and scratchgpt-best / transformers-best.
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
from scratchgpt.model.gpt import GPT
from scratchgpt.training.train import lm_loss, make_optimizer, train_step

# name: (model config, batch size, sequence length, timed rounds)
SETUPS: dict[str, tuple[GPTConfig, int, int, int]] = {
    "gpt2_124m": (GPTConfig.from_name("gpt2", embd_pdrop=0.0, resid_pdrop=0.0, attn_pdrop=0.0), 4, 256, 3),
    "small_6l_384": (GPTConfig(vocab_size=65, n_positions=256, n_embd=384, n_layer=6, n_head=6,
                               embd_pdrop=0.0, resid_pdrop=0.0, attn_pdrop=0.0), 12, 256, 5),
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


def bench_setup(name: str, *, rounds: int | None = None) -> dict:
    config, B, T, default_rounds = SETUPS[name]
    rounds = rounds or default_rounds
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(config.vocab_size, (B, T), generator=gen)
    y = torch.randint(config.vocab_size, (B, T), generator=gen)
    batch = (x, y)

    ours = GPT(config, generator=torch.Generator().manual_seed(0)).train()
    theirs = hf_model(config)
    steppers: dict[tuple[str, str], Callable[[], None]] = {}
    for label, model, loss_fn in (("scratchgpt", ours, lm_loss), ("transformers", theirs, hf_loss)):
        params = [p for p in model.parameters() if p.requires_grad]
        opt = make_optimizer(params, OPTIM, device_type="cpu")
        for impl in ("eager", "sdpa"):
            def step(model=model, opt=opt, params=params, loss_fn=loss_fn, impl=impl, label=label) -> None:
                (model.set_attn_impl if label == "scratchgpt" else lambda i: set_hf_attn(model, i))(impl)
                train_step(model, opt, [batch], loss_fn=loss_fn, params=params, grad_accum_steps=1,
                           grad_clip=OPTIM.grad_clip)
            steppers[(label, impl)] = step

    times: dict[tuple[str, str], list[float]] = {k: [] for k in steppers}
    for step in steppers.values():  # warm-up: allocator, kernels, optimizer state
        step()
    for _ in range(rounds):
        for key, step in steppers.items():
            t0 = time.perf_counter()
            step()
            times[key].append(time.perf_counter() - t0)
    result: dict = {"batch": [B, T], "rounds": rounds}
    for stat, pick in (("best", min), ("median", statistics.median)):
        tok_s = {k: B * T / pick(v) for k, v in times.items()}
        for label in ("scratchgpt", "transformers"):
            result.setdefault(label, {})[stat] = {impl: round(tok_s[(label, impl)], 1) for impl in ("eager", "sdpa")}
        best_ours = max(result["scratchgpt"][stat].values())
        best_hf = max(result["transformers"][stat].values())
        result.setdefault("ratio", {})[stat] = round(best_ours / best_hf, 3)
    fastest = result["scratchgpt"]["best"]
    result["faster_attn_scratchgpt"] = max(fastest, key=fastest.get)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, help="timed steps per variant (default: 3 for 124M, 5 for small)")
    parser.add_argument("--only", choices=list(SETUPS), help="run one setup")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    out: dict = {"bench": "train_step", "dtype": "float32", "threads": torch.get_num_threads(),
                 "torch": torch.__version__, "transformers": transformers.__version__}
    t0 = time.perf_counter()
    for name in [args.only] if args.only else list(SETUPS):
        out[name] = bench_setup(name, rounds=args.rounds)
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
