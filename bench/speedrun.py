"""CPU speedrun: nanoGPT's Tiny Shakespeare recipe against the speedrun recipe, in one run, on the same eval.

Three trainings through the one loop, one after the other in this process:
  1. baseline  - configs/shakespeare_char.toml: nanoGPT's CPU recipe as scratchgpt reproduces it (GPT-2
                 blocks, AdamW, cosine, 2,000 steps, float32);
  2. speedrun  - configs/shakespeare_char_speedrun.toml (RoPE/RMSNorm/ReLU²/QK-norm/untied zero-init
                 head/soft-cap, Muon + AdamW, warmdown, dtype auto): the short run aimed at val <= 1.886;
  3. long      - the speedrun recipe with as many steps as fit in the baseline's training time (measured
                 from run 2's speed), for the best val loss each recipe reaches in that time.
Every run is scored by the same evaluator: the same held-out windows (val split, fixed seed), the same
number of batches of the same size. Training time excludes evaluation (each eval is timed and
subtracted), so evaluating often to find the crossing costs neither recipe anything.

    flock /tmp/scratchgpt-bench.lock .venv/bin/python bench/speedrun.py [--png docs/speedrun.png]
    .venv/bin/python bench/speedrun.py --baseline-steps 100 --speedrun-steps 60 --long-steps -1   # smoke test

Prints one JSON line: CPU capability, bf16 flag, each run's dtype, steps, seconds, tok/s, time and steps
to val <= target, best val, and the ratios the issue asks for.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from scratchgpt.config import RunConfig, read_toml
from scratchgpt.data.samplers import make_sampler
from scratchgpt.data.token_files import open_dataset
from scratchgpt.device import native_bf16
from scratchgpt.training.driver import Job, drive
from scratchgpt.training.modes.pretrain import build_model, check_data, lm_evaluator, resolve_run_config
from scratchgpt.training.optim import resolve_ns_dtype
from scratchgpt.training.runtime import resolve_dtype
from scratchgpt.training.train import lm_loss

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT.parent / "shared" / "data" / "text" / "tinyshakespeare.txt"


class TimedEval:
    """Wraps an evaluator: records (training seconds so far, val loss) at each call, eval time excluded."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn
        self.t0: float | None = None
        self.eval_s = 0.0
        self.points: list[tuple[float, float]] = []

    def __call__(self, model: Any) -> dict[str, float]:
        start = time.perf_counter()
        if self.t0 is None:
            self.t0 = start  # the step-0 evaluation comes right before the first step
        out = self.fn(model)
        self.points.append((start - self.t0 - self.eval_s, out["loss"]))
        self.eval_s += time.perf_counter() - start
        return out


def train_recipe(name: str, run: RunConfig, args: argparse.Namespace) -> dict[str, Any]:
    """Train `run` with the shared evaluator; its curve of (step, train seconds, val loss) and summary."""
    ds = open_dataset(run.data.dir)
    block = check_data(ds, run)
    evaluator = TimedEval(lm_evaluator(ds.tokens("val"), block_size=block, batch_size=args.eval_batch,
                                       steps=args.eval_steps, seed=args.eval_seed))
    cfg = run.train

    def build(runtime: Any) -> Job:
        model = build_model(run)
        batches = make_sampler(ds.tokens("train"), kind=run.data.sampler, block_size=block,
                               batch_size=cfg.batch_size, seed=cfg.seed, rank=0, world_size=1)
        return Job(model, batches, loss_fn=lm_loss, evals={"val": evaluator}, tokenizer=ds.tokenizer(),
                   run_config=run.to_dict())

    messages: list[str] = []
    result, _ = drive(cfg, build, log=messages.append)
    steps = [0, *range(cfg.eval_interval, cfg.max_steps, cfg.eval_interval), cfg.max_steps]
    curve = [(s, round(t, 3), round(v, 4)) for s, (t, v) in zip(steps, evaluator.points, strict=True)]
    train_s = curve[-1][1]
    hit = next(((s, t) for s, t, v in curve if v <= args.target), None)
    model = build_model(run)
    return {
        "name": name, "steps": cfg.max_steps, "batch_size": cfg.batch_size, "train_s": train_s,
        "tokens_per_s": round(cfg.max_steps * cfg.batch_size * block / train_s, 1) if train_s else None,
        "autocast": str(resolve_dtype(cfg.dtype, torch.device("cpu"))).removeprefix("torch."),
        "ns_dtype": (str(resolve_ns_dtype(cfg.ns_dtype, "cpu")).removeprefix("torch.")
                     if cfg.optimizer == "muon" else None),
        "optimizer": cfg.optimizer, "schedule": cfg.schedule,
        "parameters": sum(p.numel() for p in model.parameters()),
        "steps_to_target": hit[0] if hit else None, "s_to_target": hit[1] if hit else None,
        "best_val": min(v for _, _, v in curve), "final_val": curve[-1][2], "curve": curve,
        "precision_line": next((m for m in messages if m.startswith("precision")), None),
    }


def best_within(curve: list[tuple[int, float, float]], seconds: float) -> float | None:
    vals = [v for _, t, v in curve if t <= seconds]
    return min(vals) if vals else None


def plot(runs: list[dict[str, Any]], target: float, budget_s: float, png: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for r in runs:
        ts, vs = [t for _, t, _ in r["curve"]], [v for _, _, v in r["curve"]]
        ax.plot(ts, vs, "o-", ms=2.5, lw=1.2,
                label=f"{r['name']}: {r['optimizer']}, {r['autocast']}, {r['steps']} steps")
    ax.axhline(target, color="grey", ls="--", lw=0.8, label=f"val {target}")
    ax.axvline(0.25 * budget_s, color="grey", ls=":", lw=0.8, label="25% of the baseline's time")
    ax.set_xlabel("training seconds (evaluation excluded)")
    ax.set_ylabel("val loss (same held-out windows)")
    ax.set_ylim(1.4, 3.0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline-config", default=str(ROOT / "configs" / "shakespeare_char.toml"))
    parser.add_argument("--speedrun-config", default=str(ROOT / "configs" / "shakespeare_char_speedrun.toml"))
    parser.add_argument("--baseline-steps", type=int, help="override the baseline's max_steps (default: its 2,000)")
    parser.add_argument("--speedrun-steps", type=int, help="override the speedrun's max_steps")
    parser.add_argument("--long-steps", type=int, default=0,
                        help="steps of the long speedrun run: 0 = what fits in the baseline's time, -1 = skip it")
    parser.add_argument("--baseline-eval-every", type=int, default=50)
    parser.add_argument("--speedrun-eval-every", type=int, default=25)
    parser.add_argument("--eval-steps", type=int, default=20, help="val batches per evaluation (nanoGPT: 20)")
    parser.add_argument("--eval-batch", type=int, default=12, help="windows per val batch (nanoGPT: 12)")
    parser.add_argument("--eval-seed", type=int, default=1338, help="which held-out windows")
    parser.add_argument("--target", type=float, default=1.886, help="val loss to reach (nanoGPT's 1.8857)")
    parser.add_argument("--dtype", help="override the speedrun's dtype (e.g. float32 to time the AVX2 path)")
    parser.add_argument("--ns-dtype", help="override the speedrun's Newton-Schulz dtype")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: PyTorch's choice)")
    parser.add_argument("--out-dir", default=str(ROOT / "runs" / "bench_speedrun"))
    parser.add_argument("--data-dir", default=str(ROOT / ".cache" / "data" / "shakespeare_char"))
    parser.add_argument("--text", default=str(TEXT), help="Tiny Shakespeare (default: the shared data copy)")
    parser.add_argument("--png", help="write the val-loss-vs-seconds plot of all runs here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out_dir = Path(args.out_dir)
    shutil.rmtree(out_dir, ignore_errors=True)  # fresh runs every time

    def resolve(toml_path: str, name: str, steps: int | None, eval_every: int, extra: dict) -> RunConfig:
        train = {"out_dir": str(out_dir / name), "progress": False, "plot": False, "sample_interval": 0,
                 "checkpoint_interval": 0, "eval_interval": eval_every, "resume": False, **extra}
        if steps:
            train.update(max_steps=steps, lr_decay_steps=steps)
        flags = {"data": {"source": args.text, "dir": args.data_dir}, "train": train}
        return resolve_run_config([read_toml(toml_path), flags], source=toml_path, progress=False)

    speed_extra = {k: v for k, v in (("dtype", args.dtype), ("ns_dtype", args.ns_dtype)) if v}
    t0 = time.perf_counter()
    runs = [train_recipe("baseline", resolve(args.baseline_config, "baseline", args.baseline_steps,
                                             args.baseline_eval_every, {}), args)]
    speed = resolve(args.speedrun_config, "speedrun", args.speedrun_steps, args.speedrun_eval_every, speed_extra)
    runs.append(train_recipe("speedrun", speed, args))
    base, short = runs
    budget = base["train_s"]
    if args.long_steps >= 0:
        long_steps = args.long_steps or int(0.97 * budget / (short["train_s"] / short["steps"]))
        if long_steps > short["steps"]:
            every = max(args.speedrun_eval_every, long_steps // 40)
            long_run = resolve(args.speedrun_config, "long", long_steps, every, speed_extra)
            runs.append(train_recipe("speedrun-long", long_run, args))
    caps = torch.cpu.get_capabilities()
    out = {
        "bench": "speedrun", "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_name": caps.get("cpu_name"), "native_bf16": native_bf16("cpu"),
        "avx512_bf16": bool(caps.get("avx512_bf16")), "amx_bf16": bool(caps.get("amx_bf16")),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "target": args.target,
        "eval": {"batches": args.eval_steps, "batch": args.eval_batch, "seed": args.eval_seed},
        "baseline_train_s": budget,
        "speedrun_s_to_target": short["s_to_target"],
        "speedrun_fraction_of_baseline_time": (round(short["s_to_target"] / budget, 3)
                                               if short["s_to_target"] is not None else None),
        "best_val_in_baseline_time": {r["name"]: best_within(r["curve"], budget) for r in runs},
        "runs": runs, "wall_s": round(time.perf_counter() - t0, 1),
    }
    if args.png:
        plot(runs, args.target, budget, Path(args.png))
        out["png"] = args.png
    print(json.dumps(out))


if __name__ == "__main__":
    main()
