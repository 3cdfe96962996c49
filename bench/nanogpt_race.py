"""nanoGPT's CPU recipe on Tiny Shakespeare, run by nanoGPT itself and by scratchgpt, in one sitting.

Three whole runs, each launched as a user would and timed from launch to exit:
  1. nanoGPT's own `train.py` (a checkout of karpathy/nanoGPT given with --nanogpt; nothing of it is kept
     here) with its README's CPU recipe: 4 layers x 128, block 64, batch 12, 2,000 iterations, eval 20
     batches every 250, `--compile=False`;
  2. `scratchgpt train -c configs/shakespeare_char.toml` (the same recipe);
  3. `scratchgpt train -c configs/shakespeare_char_speedrun.toml` (the recipe that reaches val <= 1.886
     in fewer steps).
Then, in this process, the loop's own cost: the recipe's model trained through `train()` (the one loop
with its safety checks, logging and bookkeeping; evaluation and checkpoints off) against a bare loop of
`train_step` on the same model and batches, rounds interleaved; the difference per step is the overhead.

    flock /tmp/scratchgpt-bench.lock .venv/bin/python bench/nanogpt_race.py --nanogpt PATH/TO/nanoGPT
    .venv/bin/python bench/nanogpt_race.py --overhead-only          # no nanoGPT checkout: the loop's overhead

With --rounds N the three runs repeat N times in mirrored order (nanoGPT first in odd rounds, last in even
ones), so that a machine whose speed drifts over minutes weighs on both sides alike.

Prints one JSON line: the CPU, per run wall seconds, median ms per step and final val loss (per round with
--rounds > 1), the ratios (scratchgpt wall / nanoGPT wall: target <= 0.85; the speedrun's time from launch
to val <= 1.886 / nanoGPT's wall: target <= 0.25; the median of the rounds') and the loop overhead as a
share of a step (target <= 5%).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from scratchgpt.config import TrainConfig, read_toml
from scratchgpt.device import MALLOC_SETTINGS, cpu_capability, keep_freed_memory
from scratchgpt.training.modes.pretrain import build_model, resolve_run_config
from scratchgpt.training.optim import make_optimizer
from scratchgpt.training.train import train, train_step

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT.parent / "shared" / "data" / "text" / "tinyshakespeare.txt"
CONFIGS = {"scratchgpt": "configs/shakespeare_char.toml", "speedrun": "configs/shakespeare_char_speedrun.toml"}
TARGET_VAL = 1.886  # nanoGPT's final val loss on this recipe (1.8857)
NANOGPT_ARGS = ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--eval_iters=20",
                "--log_interval=1", "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4",
                "--n_embd=128", "--max_iters=2000", "--lr_decay_iters=2000", "--dropout=0.0"]


def timed(argv: list[str], cwd: Path, env: dict[str, str] | None = None) -> tuple[float, str]:
    """(seconds from launch to exit, stdout) of a command that must succeed."""
    t0 = time.perf_counter()
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=3600, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"bench/nanogpt_race.py: {' '.join(argv[:4])} failed: {proc.stderr.strip()[-800:]}")
    return wall, proc.stdout


def run_nanogpt(checkout: Path, work: Path, *, kept_memory: bool = False) -> dict[str, float]:
    """nanoGPT's train.py on its own prepared data (its prepare.py over the shared Tiny Shakespeare).

    kept_memory: with glibc told to keep freed memory, as scratchgpt's training driver does (device.keep_freed_memory),
    through the environment variables glibc reads at start-up: what nanoGPT's own code would gain from it.
    """
    tree = work / "nanogpt"
    if not tree.exists():
        shutil.copytree(checkout, tree, ignore=shutil.ignore_patterns(".git", "out*"))
        data = tree / "data" / "shakespeare_char"
        shutil.copy(TEXT, data / "input.txt")  # prepare.py downloads only when input.txt is missing
        subprocess.run([sys.executable, "prepare.py"], cwd=data, check=True, capture_output=True)
    env = {k: v for k, v in os.environ.items() if k not in MALLOC_SETTINGS}  # as a user launches it
    env.update({k: str(v) for k, v in MALLOC_SETTINGS.items()} if kept_memory else {})
    wall, out = timed([sys.executable, "train.py", *NANOGPT_ARGS, f"--out_dir={work / 'nanogpt-out'}"], tree, env)
    iters = [float(m.group(2)) for m in re.finditer(r"^iter (\d+): loss [\d.]+, time ([\d.]+)ms", out, re.M)
             if int(m.group(1)) % 250 != 0]  # eval iterations carry the evaluation's time
    val = [float(v) for v in re.findall(r"^step \d+: train loss [\d.]+, val loss ([\d.]+)", out, re.M)]
    return {"wall_s": round(wall, 1), "ms_per_step": round(statistics.median(iters[10:]), 2), "val_loss": val[-1]}


def run_scratchgpt(config: str, work: Path, name: str) -> dict[str, float]:
    """`scratchgpt train -c config` as a user types it (progress bar off: its output is not a terminal)."""
    out = work / name
    wall, stdout = timed([sys.executable, "-m", "scratchgpt", "train", "-c", config, "--out-dir", str(out),
                          "--overwrite", "true", "--progress", "false"], ROOT)
    rows = list(csv.DictReader((out / "log.csv").open()))
    tokens = [int(r["tokens"]) for r in rows]
    rates = [(float(r["tok_per_s"]), tokens[i] - tokens[i - 1]) for i, r in enumerate(rows)
             if i > 1 and r.get("tok_per_s")]
    steps = [int(r["step"]) for r in rows]
    per_step = [(t / (steps[i] - steps[i - 1])) / rate * 1e3 for i, (rate, t) in enumerate(rates, start=2)
                if steps[i] > steps[i - 1]]
    summary = json.loads(next(ln for ln in reversed(stdout.splitlines()) if ln.startswith("{")))
    # From launch to the first evaluation at or below nanoGPT's final val loss: start-up (wall minus the
    # training time the run reports) plus the training time logged at that evaluation.
    crossed = [float(r["elapsed_s"]) for r in rows if r.get("val_loss") and float(r["val_loss"]) <= TARGET_VAL]
    return {"wall_s": round(wall, 1), "train_s": summary["elapsed_s"],
            "ms_per_step": round(statistics.median(per_step), 2), "val_loss": summary.get("val_loss"),
            "to_target_s": round(wall - summary["elapsed_s"] + crossed[0], 1) if crossed else None}


def loop_overhead(work: Path, steps: int, rounds: int) -> dict[str, float]:
    """ms per step through `train()` (evals and checkpoints off) and through a bare `train_step` loop."""
    run = resolve_run_config([read_toml(ROOT / "configs" / "shakespeare_char.toml"),
                              {"train": {"progress": False, "plot": False}}], source="shakespeare_char.toml",
                             progress=False)
    from scratchgpt.data.samplers import RandomWindows
    from scratchgpt.data.token_files import open_dataset

    ds = open_dataset(run.data.dir)
    model = build_model(run)
    cfg = run.train
    batch, block = cfg.batch_size, run.data.block_size

    def windows(seed: int) -> RandomWindows:
        return RandomWindows(ds.tokens("train"), block_size=block, batch_size=batch, seed=seed)

    def through_train() -> float:
        tc = TrainConfig(**{**cfg.__dict__, "out_dir": str(work / "overhead"), "overwrite": True, "resume": False,
                            "max_steps": steps, "eval_interval": 0, "checkpoint_interval": 0, "sample_interval": 0,
                            "log_interval": steps // 4})
        result = train(model, windows(1), config=tc, log=lambda msg: None)
        return batch * block / result.tokens_per_s * 1e3

    def bare() -> float:
        params = [p for p in model.parameters() if p.requires_grad]
        opt = make_optimizer(params, cfg, device_type="cpu", model=model)
        source = windows(1)
        for _ in range(3):
            train_step(model, opt, [source.next_batch()], params=params, grad_accum_steps=1, grad_clip=cfg.grad_clip)
        t0 = time.perf_counter()
        for _ in range(steps):
            loss, _ = train_step(model, opt, [source.next_batch()], params=params, grad_accum_steps=1,
                                 grad_clip=cfg.grad_clip)
        loss.item()
        return (time.perf_counter() - t0) / steps * 1e3

    looped, plain = [], []
    for _ in range(rounds):
        looped.append(through_train())
        plain.append(bare())
    lo, pl = statistics.median(looped), statistics.median(plain)
    return {"loop_ms_per_step": round(lo, 3), "bare_ms_per_step": round(pl, 3), "overhead_ms": round(lo - pl, 3),
            "overhead_share": round((lo - pl) / pl, 4), "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nanogpt", type=Path, help="a checkout of karpathy/nanoGPT (its train.py and data/)")
    parser.add_argument("--overhead-only", action="store_true", help="only the loop-overhead measurement")
    parser.add_argument("--nanogpt-kept-memory", action="store_true",
                        help="also run nanoGPT with glibc keeping freed memory, as scratchgpt's CLI runs")
    parser.add_argument("--rounds", type=int, default=1,
                        help="race rounds, in mirrored order (ratios: the median of the rounds')")
    parser.add_argument("--overhead-steps", type=int, default=300)
    parser.add_argument("--overhead-rounds", type=int, default=5)
    args = parser.parse_args()
    if not args.overhead_only and (args.nanogpt is None or not (args.nanogpt / "train.py").is_file()):
        raise SystemExit("bench/nanogpt_race.py: --nanogpt must name a checkout of karpathy/nanoGPT "
                         "(git clone it anywhere outside this repo), or pass --overhead-only")
    out: dict = {"bench": "nanogpt_race", **cpu_capability(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}
    with tempfile.TemporaryDirectory(prefix="scratchgpt-race-") as tmp:
        work = Path(tmp)
        if not args.overhead_only:
            # Rounds in mirrored order (nanoGPT first, then last, ...): a machine that drifts over minutes
            # (measured here: the same command 28% slower 20 minutes later) then weighs on both sides alike,
            # and each round's ratios compare runs minutes apart, not a quarter of an hour.
            rounds = []
            for r in range(args.rounds):
                order = ["nanogpt", "scratchgpt", "speedrun"] if r % 2 == 0 else ["speedrun", "scratchgpt", "nanogpt"]
                runs = {}
                for name in order:
                    runs[name] = (run_nanogpt(args.nanogpt, work) if name == "nanogpt" else
                                  run_scratchgpt(CONFIGS[name], work, name))
                n = runs["nanogpt"]["wall_s"]
                runs["scratchgpt_wall_vs_nanogpt"] = round(runs["scratchgpt"]["wall_s"] / n, 3)
                runs["speedrun_wall_vs_nanogpt"] = round(runs["speedrun"]["wall_s"] / n, 3)
                if runs["speedrun"]["to_target_s"] is not None:
                    runs["speedrun_to_target_vs_nanogpt"] = round(runs["speedrun"]["to_target_s"] / n, 3)
                rounds.append(runs)
            out.update(rounds[0] if len(rounds) == 1 else {"rounds": rounds})
            for key in ("scratchgpt_wall_vs_nanogpt", "speedrun_wall_vs_nanogpt", "speedrun_to_target_vs_nanogpt"):
                values = [r[key] for r in rounds if key in r]
                if len(rounds) > 1 and values:
                    out[key] = round(statistics.median(values), 3)  # the median of the rounds' ratios
            if args.nanogpt_kept_memory:
                out["nanogpt_kept_memory"] = run_nanogpt(args.nanogpt, work, kept_memory=True)
            out["targets"] = {"scratchgpt_wall_vs_nanogpt": 0.85, "speedrun_to_target_vs_nanogpt": 0.25,
                              "overhead_share": 0.05}
        keep_freed_memory()  # what the driver does: the loop is measured as `scratchgpt train` runs it
        out["loop"] = loop_overhead(work, args.overhead_steps, args.overhead_rounds)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
