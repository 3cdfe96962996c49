"""Fine-tuning experiments on the CPU: spam classification, instruction tuning, DPO and LoRA.

Each experiment runs the real `scratchgpt` commands (printed before they run) and prints one JSON line
with what it measured. There are no pretrained GPT-2 weights offline, so the base model is a small GPT
(4 layers, 128 wide, 256-token context, GPT-2 BPE) pretrained here on Tiny Shakespeare for a few
minutes (`base`, run first by every experiment; it is kept and reused). `spam` also fine-tunes the
same architecture from random weights, to show what the pretraining is worth.

    python bench/finetune.py base        # prepare Tiny Shakespeare + pretrain the base model
    python bench/finetune.py spam        # SMS Spam Collection, balanced 747/747, 70/10/20
    python bench/finetune.py instruct    # instruction-data.json, 935/110/55
    python bench/finetune.py dpo         # instruction-data-with-preference.json, from the instruct run
    python bench/finetune.py lora        # LoRA spam + instruct runs; merge check; GPT-2 124M adapter sizes

Run it under `flock /tmp/scratchgpt-bench.lock` when others share the machine; `--threads` sets torch's
threads for every command. Outputs go to runs/bench-finetune/ (override with --work-dir).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SCRATCHGPT_DATA_DIR") or REPO.parent / "shared" / "data")
SMS = DATA / "spam" / "SMSSpamCollection"
INSTRUCT = DATA / "instruct" / "instruction-data.json"
PREFERENCE = DATA / "instruct" / "instruction-data-with-preference.json"

BASE_MODEL = ["--n-layer", "4", "--n-head", "4", "--n-embd", "128", "--n-positions", "256",
              "--embd-pdrop", "0", "--resid-pdrop", "0", "--attn-pdrop", "0"]
QUIET = ["--progress", "false"]


def scratchgpt(*args: str, threads: int | None) -> float:
    """Run `python -m scratchgpt ARGS`, echoing the command; returns its wall time in seconds."""
    env = dict(os.environ)
    env.setdefault("SCRATCHGPT_GPT2_DIR", str(DATA / "gpt2"))
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
        args = (*args, "--num-threads", str(threads)) if args[0] in ("train", "finetune") else args
    print("$ scratchgpt " + " ".join(args), file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    # The commands' own output goes to stderr: stdout carries only this script's JSON lines.
    subprocess.run([sys.executable, "-m", "scratchgpt", *args], check=True, env=env, cwd=REPO, stdout=sys.stderr)
    return time.perf_counter() - t0


def fresh(run_dir: Path) -> Path:
    """An empty run directory: an experiment always trains anew (the loop refuses to overwrite checkpoints)."""
    shutil.rmtree(run_dir, ignore_errors=True)
    return run_dir


def metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def rounded(d: dict, digits: int = 4) -> dict:
    return {k: round(v, digits) if isinstance(v, float) else v for k, v in d.items()}


def base(work: Path, threads: int | None, steps: int) -> dict:
    """Tiny Shakespeare -> GPT-2 BPE tokens -> a small GPT pretrained for `steps` steps."""
    tokens, run = work / "shakespeare-tokens", work / "shakespeare"
    if not (tokens / "meta.json").is_file():
        scratchgpt("prepare", "--source", str(DATA / "text" / "tinyshakespeare.txt"), "--dir", str(tokens),
                   "--tokenizer", "gpt2", "--quiet", threads=threads)
    if not (run / "config.json").is_file():
        scratchgpt("train", "--dir", str(tokens), *BASE_MODEL, "--block-size", "256", "--batch-size", "8",
                   "--max-steps", str(steps), "--lr", "2e-3", "--warmup-steps", "30", "--eval-interval", "100",
                   "--eval-steps", "10", "--log-interval", "25", "--checkpoint-interval", "0", "--out-dir", str(run),
                   *QUIET, threads=threads)
    rows = [line.split(",") for line in (run / "log.csv").read_text().splitlines()]
    header = rows[0]
    last = [r for r in rows[1:] if r[header.index("val_loss")]][-1]
    return {"experiment": "base", "run": str(run), "steps": int(last[0]),
            "train_loss": round(float(last[header.index("eval_train_loss")]), 4),
            "val_loss": round(float(last[header.index("val_loss")]), 4),
            "train_seconds": round(float(last[header.index("elapsed_s")]), 1), "tokens": int(last[1])}


def spam(work: Path, threads: int | None, *, init: str, name: str, extra: tuple[str, ...] = ()) -> dict:
    """Balanced SMS spam (747/747), 70/10/20: 1045 / 149 / 300 messages, 5 epochs."""
    run = fresh(work / name)
    seconds = scratchgpt("finetune", "classify", "--data", str(SMS), "--balance", "--split", "0.7", "0.1", "0.2",
                         "--init", init, *(BASE_MODEL if init == "scratch" else ()), "--trainable", "all",
                         "--lr", "3e-4", "--dropout", "0.1", "--batch-size", "8", "--epochs", "5",
                         "--eval-interval", "100",
                         "--out-dir", str(run), *QUIET, *extra, threads=threads)
    m = metrics(run)
    return {"experiment": name, "init": init, "test_accuracy": round(m["test"]["accuracy"], 4),
            "val_accuracy": round(m["val"]["accuracy"], 4), "train_accuracy": round(m["train"]["accuracy"], 4),
            "test_loss": round(m["test"]["loss"], 4), "test_confusion": m["test"]["confusion"],
            "start_val_accuracy": round(m["start"]["val"]["accuracy"], 4), "steps": m["steps"],
            "train_seconds": m["train_seconds"], "wall_seconds": round(seconds, 1), "trainable": m["trainable"],
            "trainable_parameters": m["trainable_parameters"], "total_parameters": m["total_parameters"]}


def instruct(work: Path, threads: int | None, *, init: str, name: str = "instruct",
             extra: tuple[str, ...] = ()) -> dict:
    """instruction-data.json, 85/10/5: 935 / 110 / 55, 2 epochs; val loss from log.csv, start to end."""
    run = fresh(work / name)
    seconds = scratchgpt("finetune", "instruct", "--data", str(INSTRUCT), "--init", init,
                         *(BASE_MODEL if init == "scratch" else ()), "--lr", "5e-4", "--batch-size", "8",
                         "--epochs", "2", "--eval-interval", "20", "--eval-steps", "14", "--response-tokens", "64",
                         "--out-dir", str(run), *QUIET, *extra, threads=threads)
    m = metrics(run)
    rows = [r.split(",") for r in (run / "log.csv").read_text().splitlines()]
    header = rows[0]
    curve = [(int(r[0]), round(float(r[header.index("eval_val_loss")]), 3)) for r in rows[1:]
             if r[header.index("eval_val_loss")]]
    responses = json.loads((run / "test_responses.json").read_text())
    return {"experiment": name, "init": init, "val_loss_start": round(m["start"]["val"]["loss"], 4),
            "val_loss_end": round(m["val"]["loss"], 4), "val_loss_curve": curve,
            "test_loss": round(m["test"]["loss"], 4), "steps": m["steps"], "train_seconds": m["train_seconds"],
            "wall_seconds": round(seconds, 1), "trainable_parameters": m["trainable_parameters"],
            "test_responses": len(responses), "example": responses[0]}


def dpo(work: Path, threads: int | None, *, init: str) -> dict:
    """Preference pairs, 85/10/5, 1 epoch from the instruction-tuned model; val metrics start to end."""
    run = fresh(work / "dpo")
    seconds = scratchgpt("finetune", "dpo", "--data", str(PREFERENCE), "--init", init, "--beta", "0.1",
                         "--lr", "5e-5", "--batch-size", "8", "--epochs", "1", "--eval-interval", "20",
                         "--eval-steps", "14", "--out-dir", str(run), *QUIET, threads=threads)
    m = metrics(run)
    start, end = m["start"]["val"], m["val"]
    keys = ("accuracy", "logp_accuracy", "margin", "loss", "chosen_reward", "rejected_reward")
    return {"experiment": "dpo", "init": init, "val_start": rounded({k: start[k] for k in keys}),
            "val_end": rounded({k: end[k] for k in keys}), "steps": m["steps"], "train_seconds": m["train_seconds"],
            "wall_seconds": round(seconds, 1)}


def lora(work: Path, threads: int | None, *, init: str) -> dict:
    """LoRA (rank 8) through the same commands; merged == adapted logits; adapter sizes, here and for GPT-2 124M."""
    import torch

    from scratchgpt.checkpoint import load_model
    from scratchgpt.config import GPTConfig, LoRAConfig
    from scratchgpt.model.gpt import GPT
    from scratchgpt.training.lora import apply_lora, count_parameters, load_adapters, merge_lora
    from scratchgpt.training.modes.classify import load_classifier

    flags = ("--trainable", "lora", "--lora-rank", "8", "--lora-alpha", "16", "--lr", "1e-3")
    cls = spam(work, threads, init=init, name="spam-lora", extra=flags)
    sft = instruct(work, threads, init=init, name="instruct-lora", extra=flags)
    # The run directory holds the merged model; re-applying the saved adapters to the base must agree.
    merged, _ = load_model(work / "instruct-lora")
    adapted, _ = load_model(init)
    load_adapters(adapted, work / "instruct-lora")
    x = torch.randint(0, merged.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (merged(x)[0] - adapted.eval()(x)[0]).abs().max().item()
        unmerged = adapted(x)[0]
        merge_lora(adapted)
        fold = (adapted(x)[0] - unmerged).abs().max().item()
    load_classifier(work / "spam-lora")
    # GPT-2 124M shapes on the meta device: parameter counts without allocating the model.
    gpt2 = GPT(GPTConfig.from_name("gpt2"), device="meta")
    apply_lora(gpt2, LoRAConfig(rank=8))
    gpt2_params = count_parameters(gpt2)["trainable"]
    return {
        "experiment": "lora", "rank": 8, "alpha": 16,
        "spam": {k: cls[k] for k in ("test_accuracy", "val_accuracy", "trainable_parameters", "total_parameters",
                                     "train_seconds")},
        "instruct": {k: sft[k] for k in ("val_loss_start", "val_loss_end", "trainable_parameters", "train_seconds")},
        "adapter_bytes": {"spam": (work / "spam-lora" / "adapter.safetensors").stat().st_size,
                          "instruct": (work / "instruct-lora" / "adapter.safetensors").stat().st_size},
        "model_bytes": (work / "instruct-lora" / "model.safetensors").stat().st_size,
        "merged_vs_adapted_max_abs_diff": diff, "merge_lora_max_abs_diff": fold,
        "gpt2_124m": {"lora_parameters": gpt2_params, "adapter_megabytes_fp32": round(gpt2_params * 4 / 1e6, 2),
                      "model_parameters": 124_439_808},
    }


def main() -> None:
    from scratchgpt.device import cpu_capability

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment", choices=["base", "spam", "instruct", "dpo", "lora", "all"])
    parser.add_argument("--work-dir", default=str(REPO / "runs" / "bench-finetune"))
    parser.add_argument("--threads", type=int, default=None, help="torch threads per command")
    parser.add_argument("--base-steps", type=int, default=300, help="pretraining steps of the base model")
    args = parser.parse_args()
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    init = str(work / "shakespeare")
    cpu = cpu_capability()  # which CPU these figures come from, on every line

    def emit(result: dict) -> None:
        print(json.dumps({**result, **cpu}), flush=True)

    emit(base(work, args.threads, args.base_steps))
    todo = ["spam", "instruct", "dpo", "lora"] if args.experiment == "all" else [args.experiment]
    for name in todo:
        if name == "spam":
            emit(spam(work, args.threads, init=init, name="spam"))
            emit(spam(work, args.threads, init="scratch", name="spam-scratch"))
        elif name == "instruct":
            emit(instruct(work, args.threads, init=init))
        elif name == "dpo":
            if not (work / "instruct" / "config.json").is_file():
                instruct(work, args.threads, init=init)
            emit(dpo(work, args.threads, init=str(work / "instruct")))
        elif name == "lora":
            emit(lora(work, args.threads, init=init))


if __name__ == "__main__":
    main()
