"""Peak training memory: activation checkpointing and bf16-true weights against the float32 baseline.

Each setting runs in a process of its own (peak RSS belongs to a process: resource.getrusage's ru_maxrss),
builds a GPT with random weights as the trainer does (float32, then cast for bf16-true), and takes --steps
optimizer steps with the loop's own pieces (make_optimizer, train_step, autocast), batch 1. The second step
is the steady state: weights, gradients, optimizer state and one step's activations all alive at once.
One JSON line per setting: peak RSS after building the model, peak RSS over the steps, seconds per step.

Real run (GPT-2 124M shape, seq 512):  python bench/memory.py
Small run to check it works:          python bench/memory.py --layers 2 --embd 128 --heads 2 --seq 128
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

SETTINGS = ("float32", "float32+ckpt", "bf16-true", "bf16-true+ckpt")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def one(args: argparse.Namespace, setting: str) -> dict:
    from scratchgpt.config import GPTConfig, TrainConfig
    from scratchgpt.device import cpu_capability
    from scratchgpt.model.gpt import GPT
    from scratchgpt.training.optim import make_optimizer
    from scratchgpt.training.runtime import autocast, resolve_dtype, resolve_weights_dtype
    from scratchgpt.training.train import train_step

    torch.set_num_threads(args.threads)
    dtype = setting.split("+")[0]
    device = torch.device("cpu")
    cfg = GPTConfig(vocab_size=args.vocab, n_positions=args.seq, n_embd=args.embd, n_layer=args.layers,
                    n_head=args.heads)
    model = GPT(cfg, generator=torch.Generator().manual_seed(0)).train()
    weights = resolve_weights_dtype(dtype)
    if weights != torch.float32:
        model.to(weights)
    model.activation_checkpointing = setting.endswith("+ckpt")
    params = list(model.parameters())
    opt = make_optimizer(params, TrainConfig(dtype=dtype), device_type="cpu")
    built = peak_rss_mb()
    amp = resolve_dtype(dtype, device)
    gen = torch.Generator().manual_seed(1)
    times = []
    for _ in range(args.steps):
        x = torch.randint(args.vocab, (1, args.seq), generator=gen)
        t0 = time.perf_counter()
        train_step(model, opt, [(x, torch.roll(x, -1, dims=1))], params=params, grad_accum_steps=1,
                   amp=lambda: autocast(device, amp))
        times.append(time.perf_counter() - t0)
    return {"setting": setting, "optimizer": type(opt).__name__, "params_M": round(model.num_parameters() / 1e6, 1),
            "peak_rss_built_mb": round(built), "peak_rss_mb": round(peak_rss_mb()),
            "s_per_step": [round(t, 2) for t in times], "threads": args.threads,
            "cpu": cpu_capability()["cpu_capability"], "native_bf16": cpu_capability()["native_bf16"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--embd", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--settings", nargs="+", choices=SETTINGS, default=list(SETTINGS))
    p.add_argument("--one", choices=SETTINGS, help=argparse.SUPPRESS)  # the child process of one setting
    args = p.parse_args()
    if args.one:
        print(json.dumps(one(args, args.one)))
        return
    shape = [f"--{k}={getattr(args, k)}" for k in ("layers", "embd", "heads", "vocab", "seq", "steps", "threads")]
    for setting in args.settings:
        out = subprocess.run([sys.executable, __file__, *shape, "--one", setting], capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"{setting}: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode}")
        print(out.stdout.strip(), flush=True)


if __name__ == "__main__":
    main()
