"""Tiny Shakespeare, character level, nanoGPT's small CPU recipe (configs/shakespeare_char.toml).

nanoGPT reports val loss 1.8857 after 2,000 iterations (117-135 s on this machine kind). This trains the
same recipe through `scratchgpt.train.pretrain` and prints one JSON line: wall time, final val loss, tok/s.

    flock /tmp/scratchgpt-bench.lock .venv/bin/python bench/shakespeare_char.py [--out-dir runs/bench_char]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from scratchgpt.config import read_toml
from scratchgpt.device import cpu_capability
from scratchgpt.training.modes.pretrain import pretrain, resolve_run_config

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT.parent / "shared" / "data" / "text" / "tinyshakespeare.txt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default=str(ROOT / "runs" / "bench_shakespeare_char"))
    parser.add_argument("--data-dir", default=str(ROOT / ".cache" / "data" / "shakespeare_char"))
    parser.add_argument("--text", default=str(TEXT), help="Tiny Shakespeare (default: the shared data copy)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: PyTorch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shutil.rmtree(args.out_dir, ignore_errors=True)  # a fresh run every time

    toml = read_toml(ROOT / "configs" / "shakespeare_char.toml")
    flags = {"data": {"source": args.text, "dir": args.data_dir},
             "train": {"out_dir": args.out_dir, "progress": False, "sample_interval": 0}}
    t0 = time.perf_counter()
    run = resolve_run_config([toml, flags], source="configs/shakespeare_char.toml")
    result = pretrain(run, log=lambda msg: None)  # prepares the data on the first run (~1 s)
    wall = time.perf_counter() - t0
    out = {
        "bench": "shakespeare_char", "recipe": "nanoGPT CPU: 4L/4H/128, block 64, batch 12, 2000 iters, lr 1e-3",
        "val_loss": round(result.metrics["val_loss"], 4), "train_loss": round(result.metrics["train_loss"], 4),
        "best_val_loss": round(result.best_val_loss, 4), "wall_s": round(wall, 1),
        "train_s": round(result.elapsed_s, 1), "tokens_per_s": round(result.tokens_per_s, 1),
        "mfu": round(result.mfu, 4) if result.mfu is not None else None, "threads": torch.get_num_threads(),
        "target_val_loss": 1.89, "ok": result.metrics["val_loss"] <= 1.89, **cpu_capability(),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
