"""Several processes on the CPU (gloo): DDP and FSDP end where one process with the same global batch ends."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from scratchgpt.checkpoint import model_state
from scratchgpt.cli import main
from scratchgpt.config import GPTConfig, TrainConfig
from scratchgpt.data.samplers import RandomWindows
from scratchgpt.data.token_files import open_dataset
from scratchgpt.model.gpt import GPT
from scratchgpt.training.modes.pretrain import lm_evaluator
from scratchgpt.training.train import train

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

MODEL = GPTConfig(vocab_size=66, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                  embd_pdrop=0.0, resid_pdrop=0.0, attn_pdrop=0.0)  # no dropout: ranks draw different masks
GLOBAL_BATCH = 8


def _run(data_dir: str, out_dir: str, rank: int, world: int) -> None:
    """Train through the library loop as rank `rank` of `world`; every rank saves its own final weights."""
    ds = open_dataset(data_dir)
    cfg = TrainConfig(out_dir=out_dir, max_steps=12, batch_size=GLOBAL_BATCH // world, grad_accum_steps=2,
                      lr=3e-3, warmup_steps=2, eval_interval=6, eval_steps=2, log_interval=3,
                      checkpoint_interval=6, progress=False, plot=False, seed=11,
                      dtype="float32")  # to 2e-5: bf16 autocast (dtype auto on native-bf16 CPUs) rounds coarser
    model = GPT(MODEL, generator=torch.Generator().manual_seed(cfg.seed))
    batches = RandomWindows(ds.tokens("train"), block_size=32, batch_size=cfg.batch_size, seed=cfg.seed,
                            rank=rank, world_size=world)
    evals = {"val": lm_evaluator(ds.tokens("val"), block_size=32, batch_size=cfg.batch_size, steps=2, seed=1)}
    train(model, batches, config=cfg, evals=evals, tokenizer=ds.tokenizer(), log=lambda msg: None)
    save_file({k: v.clone() for k, v in model_state(model).items()}, f"{out_dir}/rank{rank}.safetensors")


def _ddp_worker(rank: int, world: int, init_file: str, data_dir: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        _run(data_dir, out_dir, rank, world)
    finally:
        dist.destroy_process_group()


def _log(out_dir: Path) -> list[dict[str, str]]:
    return list(csv.DictReader((out_dir / "log.csv").open()))


@pytest.mark.slow  # a whole run: CI runs it (scripts/test.sh); the default suite skips it
def test_ddp_two_processes_match_one(char_data: Path, tmp_path: Path) -> None:
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    _run(str(char_data), str(single), 0, 1)
    ddp.mkdir()
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(char_data), str(ddp)), nprocs=2, join=True)

    ranks = [load_file(ddp / f"rank{r}.safetensors") for r in range(2)]
    ref = load_file(single / "rank0.safetensors")
    for name, tensor in ranks[0].items():
        assert torch.equal(tensor, ranks[1][name]), f"ranks disagree on {name}"
        torch.testing.assert_close(tensor, ref[name], atol=2e-5, rtol=0)
    # Same global batch, so the same loss curve (train running mean and the all-reduced val loss).
    for a, b in zip(_log(single), _log(ddp), strict=True):
        assert a["step"] == b["step"] and a["tokens"] == b["tokens"]
        for key in ("train_loss", "val_loss"):
            if a[key]:
                assert float(a[key]) == pytest.approx(float(b[key]), abs=1e-4)
    assert (ddp / "model.safetensors").is_file() and (ddp / "best" / "model.safetensors").is_file()


TINY = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "32", "--max-steps", "8",
        "--eval-interval", "4", "--eval-steps", "2", "--checkpoint-interval", "4", "--log-interval", "2",
        "--embd-pdrop", "0", "--resid-pdrop", "0", "--attn-pdrop", "0", "--progress", "false", "--plot", "false",
        "--dtype", "float32"]


@pytest.mark.slow  # a whole run: CI runs it (scripts/test.sh); the default suite skips it
@pytest.mark.parametrize("mode", ["ddp", "fsdp", "fsdp+checkpointing"])
def test_torchrun_cli(char_data: Path, tmp_path: Path, mode: str) -> None:
    """`torchrun -m scratchgpt train` as documented; FSDP gathers a full checkpoint on rank 0 (and its blocks,
    recomputed under activation checkpointing, gather their shards again in the backward pass)."""
    assert main(["train", "--dir", str(char_data), "--out-dir", str(tmp_path / "one"), *TINY,
                 "--batch-size", "8"]) == 0
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "-m", "scratchgpt", "train", "--dir", str(char_data), "--out-dir", str(tmp_path / "two"), *TINY,
            "--batch-size", "4", *(["--fsdp"] if mode.startswith("fsdp") else []),
            *(["--activation-checkpointing"] if mode.endswith("checkpointing") else [])]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summaries = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(summaries) == 1 and summaries[0]["step"] == 8  # only rank 0 prints
    one, two = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(one[name], two[name], atol=2e-5, rtol=0)


def _children(pid: int) -> list[int]:
    """Processes whose parent is `pid` (Linux /proc)."""
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(entry.name))
    return kids


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited; only its parent's wait is missing


@pytest.mark.slow  # a whole run: CI runs it (scripts/test.sh); the default suite skips it
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux-only")
def test_workers_stop_and_save_when_torchrun_is_killed(char_data: Path, tmp_path: Path) -> None:
    """kill -9 of the launcher alone: its workers stop (SIGTERM from the kernel), save, and leave no orphans."""
    out = tmp_path / "run"
    tiny = list(TINY)
    tiny[tiny.index("--max-steps") + 1] = "100000"  # far more than the test waits for
    tiny[tiny.index("--checkpoint-interval") + 1] = "0"  # no periodic checkpoint: only the one saved on the way out
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "-m", "scratchgpt", "train", "--dir", str(char_data), "--out-dir", str(out), *tiny, "--batch-size", "4"]
    launcher = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 180
        while len(_rows(out)) < 3 and time.monotonic() < deadline:  # training is under way
            assert launcher.poll() is None, launcher.stderr.read()[-2000:]
            time.sleep(0.5)
        workers = _children(launcher.pid)
        assert len(workers) == 2, workers
        launcher.kill()
        launcher.wait(timeout=30)
        deadline = time.monotonic() + 120
        while any(_alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not any(_alive(w) for w in workers), "workers outlived their launcher"
    finally:
        launcher.kill()
        for w in _children(launcher.pid):
            os.kill(w, 9)
    ckpts = sorted(out.glob("ckpt-*"))
    assert len(ckpts) == 1, ckpts  # the one they saved on the way out
    state = json.loads((ckpts[0] / "train_state.json").read_text())
    assert state["step"] >= 4 and state["threads"] == 1 and state["world_size"] == 2


def _rows(out: Path) -> list[str]:
    try:
        return (out / "log.csv").read_text().splitlines()
    except OSError:
        return []
