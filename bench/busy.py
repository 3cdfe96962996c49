"""A busy machine: the demo's training, alone and beside CPU-bound busy loops, as the CLI runs it.

Each variant trains configs/demo.toml's model (4 layers x 128, block 128, batch 12) for a fixed number of
steps on Tiny Shakespeare through `python -m scratchgpt train`, once alone and once beside 2 and 4 busy loops
(separate processes spinning `while True: pass`). The figure per run is the training time the run itself
reports (start-up excluded, the same for every variant); each is the best of --repeats runs. Variants:

- `cli`: the command as a user types it (scratchgpt's own choice of how idle OpenMP threads wait);
- `unaided`: what PyTorch does unaided: one thread per core whatever the load, libgomp's default spin
  (`GOMP_SPINCOUNT=300000`) at every barrier, the behaviour that collapsed under load before;
- `one-thread`: `OMP_NUM_THREADS=1`, for reference.

A fair share of 2 CPUs among 4 runnable processes (ours with 2 threads + 2 loops) is 2x the time alone; the
target for the `cli` variant is <= 2.5x with 2 busy loops.

    flock /tmp/scratchgpt-bench.lock .venv/bin/python bench/busy.py [--steps 60] [--repeats 2]

Prints one JSON line: the CPU, per variant the seconds alone / beside 2 / beside 4 loops and the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from scratchgpt.device import cpu_capability, default_threads, usable_cpus

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT.parent / "shared" / "data" / "text" / "tinyshakespeare.txt"

VARIANTS = {
    "cli": {},
    "unaided": {"GOMP_SPINCOUNT": "300000", "OMP_NUM_THREADS": str(default_threads())},
    "one-thread": {"OMP_NUM_THREADS": "1"},
}


def _clean_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    return {**env, **extra}


def train_seconds(data_dir: Path, out_dir: Path, steps: int, env: dict[str, str]) -> float:
    """Run the demo's training for `steps` steps; the training time it reports (start-up excluded)."""
    argv = [sys.executable, "-m", "scratchgpt", "train", "-c", str(ROOT / "configs" / "demo.toml"),
            "--dir", str(data_dir), "--out-dir", str(out_dir), "--overwrite", "true", "--max-steps", str(steps),
            "--eval-interval", "0", "--checkpoint-interval", "0", "--sample-interval", "0", "--log-interval",
            str(steps), "--progress", "false", "--plot", "false", "--seed", "1"]
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=3600)
    if proc.returncode != 0:
        raise SystemExit(f"bench/busy.py: training failed: {proc.stderr.strip()[-500:]}")
    summary = json.loads(next(ln for ln in reversed(proc.stdout.splitlines()) if ln.startswith("{")))
    return float(summary["elapsed_s"])


def beside_loops(n: int, fn):
    """Run `fn()` while `n` busy-loop processes keep CPUs busy; stop them after."""
    loops = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        time.sleep(0.5)  # let them start spinning before the run looks at the machine
        return fn()
    finally:
        for p in loops:
            p.kill()
        for p in loops:
            p.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="training steps per run (default 60)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per figure; the best counts (default 2)")
    parser.add_argument("--loops", type=int, nargs="+", default=[2, 4], help="busy-loop counts (default 2 4)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="scratchgpt-busy-") as tmp:
        tmp_path = Path(tmp)
        data_dir = tmp_path / "data"
        subprocess.run([sys.executable, "-m", "scratchgpt", "prepare", "--source", str(TEXT), "--dir", str(data_dir),
                        "--tokenizer", "char", "--quiet"], check=True, env=_clean_env({}))
        results: dict[str, dict[str, float]] = {v: {} for v in args.variants}
        for load in (0, *args.loops):
            for variant in args.variants:  # variants interleaved within each load level
                env = _clean_env(VARIANTS[variant])
                best = min(beside_loops(load, lambda env=env: train_seconds(data_dir, tmp_path / "run", args.steps,
                                                                            env))
                           for _ in range(args.repeats))
                results[variant][f"busy{load}_s"] = round(best, 2)
        for r in results.values():
            for load in args.loops:
                r[f"busy{load}_vs_alone"] = round(r[f"busy{load}_s"] / r["busy0_s"], 2)
    out = {"bench": "busy", **cpu_capability(), "usable_cpus": usable_cpus(), "steps": args.steps,
           "repeats": args.repeats, "fair_share_2_loops": 2.0, "target_cli_busy2_vs_alone": 2.5,
           "variants": results,
           "ok": results.get("cli", {}).get("busy2_vs_alone", 99) <= 2.5 if 2 in args.loops else None}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
