"""The training loop: schedule, optimizer groups, accumulation, learning, checkpoints and exact resume."""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from scratchgpt.checkpoint import load_any, load_model
from scratchgpt.cli import main
from scratchgpt.config import GPTConfig, RunConfig, TrainConfig
from scratchgpt.device import native_bf16
from scratchgpt.model.gpt import GPT
from scratchgpt.tensor_files import CheckpointError
from scratchgpt.training.modes.pretrain import lm_evaluator, pretrain, resolve_run_config
from scratchgpt.training.optim import lr_at, make_optimizer, param_groups
from scratchgpt.training.run_state import latest_checkpoint, list_checkpoints
from scratchgpt.training.runlog import flops_per_token, gpu_peak_flops
from scratchgpt.training.train import lm_loss, train, train_step

# ---------------------------------------------------------------------------------------------
# Pure pieces
# ---------------------------------------------------------------------------------------------


def test_lr_schedule_warmup_cosine_floor() -> None:
    cfg = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=110)
    assert lr_at(0, cfg) == pytest.approx(1e-3 / 11)
    assert lr_at(9, cfg) == pytest.approx(1e-3 * 10 / 11)
    assert lr_at(10, cfg) == pytest.approx(1e-3)  # peak right after warmup
    assert lr_at(60, cfg) == pytest.approx(5.5e-4)  # half way down the cosine
    assert lr_at(110, cfg) == lr_at(500, cfg) == pytest.approx(1e-4)
    lrs = [lr_at(s, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))
    assert TrainConfig(lr=6e-4).floor_lr == pytest.approx(6e-5)


def test_param_groups_decay_only_matrices() -> None:
    model = GPT(GPTConfig(vocab_size=10, n_positions=8, n_embd=8, n_layer=1, n_head=2))
    decay, no_decay = param_groups(model.parameters(), 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    opt = make_optimizer(model.parameters(), TrainConfig(), device_type="cpu")
    assert opt.defaults["fused"] and opt.defaults["betas"] == (0.9, 0.95)


def test_flops_per_token_gpt2_124m() -> None:
    model = GPT(GPTConfig.from_name("gpt2"), device="meta")
    n = 124_439_808 - 1024 * 768  # every parameter but the position table
    assert flops_per_token(model, 1024) == 6 * n + 12 * 12 * 768 * 1024
    assert gpu_peak_flops("NVIDIA H100 80GB HBM3", torch.bfloat16) == 989e12
    assert gpu_peak_flops("NVIDIA A100-SXM4-40GB", torch.bfloat16) == 312e12
    assert gpu_peak_flops("Some Future GPU", torch.bfloat16) is None


def test_grad_accumulation_matches_one_big_batch() -> None:
    cfg = GPTConfig(vocab_size=20, n_positions=8, n_embd=16, n_layer=1, n_head=2,
                    embd_pdrop=0.0, resid_pdrop=0.0, attn_pdrop=0.0)
    x = torch.randint(20, (8, 8), generator=torch.Generator().manual_seed(0))
    y = torch.roll(x, -1, dims=1)
    models = [GPT(cfg, generator=torch.Generator().manual_seed(1)) for _ in range(2)]
    losses = []
    for model, chunks in zip(models, ([(x, y)], [(x[:4], y[:4]), (x[4:], y[4:])]), strict=True):
        params = list(model.parameters())
        opt = make_optimizer(params, TrainConfig(), device_type="cpu")
        loss, tokens = train_step(model, opt, chunks, params=params, grad_accum_steps=len(chunks), grad_clip=1.0)
        losses.append(loss.item())
        assert tokens == 64
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------
# Whole runs on a tiny char-level corpus
# ---------------------------------------------------------------------------------------------

# A 2-layer, 32-wide GPT: a few milliseconds per step. Dropout stays on (GPTConfig's 0.1), so exact
# resume must also restore the RNG that dropout draws from.
TINY = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "32", "--batch-size", "4",
        "--eval-steps", "2", "--log-interval", "5", "--progress", "false", "--plot", "false",
        "--warmup-steps", "5", "--lr", "3e-3", "--seed", "5"]


def _train(char_data: Path, out: Path, *extra: str) -> int:
    return main(["train", "--dir", str(char_data), "--out-dir", str(out), *TINY, *extra])


@pytest.mark.slow  # a whole run: CI runs it (scripts/test.sh); the default suite skips it
def test_loss_decreases_and_run_directory_is_loadable(char_data: Path, tmp_path: Path) -> None:
    run = resolve_run_config([{
        "model": {"n_layer": 2, "n_head": 2, "n_embd": 32},
        "data": {"dir": str(char_data), "block_size": 32},
        "train": {"out_dir": str(tmp_path / "run"), "max_steps": 150, "batch_size": 8, "lr": 3e-3,
                  "warmup_steps": 10, "eval_interval": 50, "eval_steps": 4, "checkpoint_interval": 50,
                  "keep_last": 2, "sample_interval": 150, "sample_tokens": 20, "progress": False},
    }])
    assert run.model.vocab_size == json.loads((char_data / "meta.json").read_text())["vocab_size"]
    assert run.model.n_positions == 32  # from block_size
    result = pretrain(run, log=lambda msg: None)
    rows = list(csv.DictReader((tmp_path / "run" / "log.csv").open()))
    vals = [float(r["val_loss"]) for r in rows if r["val_loss"]]
    assert vals[0] > 4.0 and vals[-1] < vals[0] - 1.0  # from ~ln(60) to well below
    assert result.metrics["val_loss"] == pytest.approx(vals[-1], rel=1e-4)
    assert result.metrics["val_ppl"] == pytest.approx(math.exp(vals[-1]), rel=1e-3)
    assert {"step", "tokens", "lr", "train_loss", "val_loss", "tok_per_s", "mfu", "elapsed_s"} <= set(rows[0])
    assert rows[-1]["step"] == "150" and int(rows[-1]["tokens"]) == 150 * 8 * 32
    assert 0 < float(rows[-1]["mfu"]) < 1 and float(rows[-1]["tok_per_s"]) > 0
    assert (tmp_path / "run" / "loss.png").stat().st_size > 10_000

    run_dir = tmp_path / "run"
    assert [p.name for p in list_checkpoints(run_dir)] == ["ckpt-00000100", "ckpt-00000150"]  # keep_last 2
    model, cfg = load_model(run_dir)  # the run directory itself holds the final model
    assert cfg["run"]["train"]["max_steps"] == 150 and cfg["run"]["data"]["dir"] == str(char_data)
    final = latest_checkpoint(run_dir)
    assert (final / "model.safetensors").read_bytes() == (run_dir / "model.safetensors").read_bytes()
    best, _ = load_model(run_dir / "best")
    assert result.best_val_loss == pytest.approx(min(vals), rel=1e-5)  # log.csv keeps 6 significant digits
    model, tok = load_any(run_dir)
    assert tok.name == "char" and tok.vocab_size == model.config.vocab_size


def test_eval_train_false_scores_only_val_with_the_same_numbers(char_data: Path, tmp_path: Path) -> None:
    """--eval-train false drops the train split from each evaluation (half its cost); val is scored on the
    same windows, so its losses and the trained weights are exactly those of a run that scores both."""
    common = ["--max-steps", "12", "--eval-interval", "6"]
    assert _train(char_data, tmp_path / "both", *common) == 0
    assert _train(char_data, tmp_path / "val", *common, "--eval-train", "false") == 0
    rows = {k: list(csv.DictReader((tmp_path / k / "log.csv").open())) for k in ("both", "val")}
    vals = {k: [(r["step"], r["val_loss"]) for r in v if r["val_loss"]] for k, v in rows.items()}
    assert len(vals["val"]) == 3 and vals["val"] == vals["both"]  # steps 0, 6, 12
    assert any(r.get("eval_train_loss") for r in rows["both"])
    assert not any(r.get("eval_train_loss") for r in rows["val"])
    assert (tmp_path / "val" / "model.safetensors").read_bytes() == \
        (tmp_path / "both" / "model.safetensors").read_bytes()


def test_loss_plot_is_redrawn_at_checkpoints_only_when_the_end_is_not_near(char_data: Path, tmp_path: Path,
                                                                           monkeypatch) -> None:
    """A redraw at a checkpoint comes a minute after the last one, but not when the end of the run (which
    draws the plot anyway) is due within that minute; with no interval every checkpoint but the last redraws."""
    import scratchgpt.training.runlog as runlog
    import scratchgpt.training.train as train_module

    assert runlog.plot_due(since_last=65.0, seconds_left=200.0)
    assert not runlog.plot_due(since_last=65.0, seconds_left=21.0)  # a 95 s run at its 1,500th of 2,000 steps
    assert not runlog.plot_due(since_last=30.0, seconds_left=200.0)
    assert not runlog.plot_due(since_last=1e9, seconds_left=0.0)  # the last step: the end draws it
    drawn: list[int] = []
    monkeypatch.setattr(train_module, "plot_log", lambda csv_path, png_path: drawn.append(1) or Path(png_path))
    monkeypatch.setattr(runlog, "PLOT_EVERY_S", 0.0)
    args = ["--max-steps", "12", "--checkpoint-interval", "4", "--plot", "true"]
    assert _train(char_data, tmp_path / "run", *args) == 0
    assert len(drawn) == 2  # checkpoints at steps 4 and 8 (not step 12's checkpoint too) ...
    assert (tmp_path / "run" / "loss.png").read_bytes()[:4] == b"\x89PNG"  # ... and the end, by another process


def test_exact_resume_stop_and_continue(char_data: Path, tmp_path: Path) -> None:
    common = ["--lr-decay-steps", "24", "--eval-interval", "6", "--checkpoint-interval", "8",
              "--grad-accum-steps", "2"]
    assert _train(char_data, tmp_path / "straight", *common, "--max-steps", "24") == 0
    assert _train(char_data, tmp_path / "parts", *common, "--max-steps", "12") == 0  # stops at an eval step
    assert _train(char_data, tmp_path / "parts", *common, "--max-steps", "24", "--resume") == 0
    straight = (tmp_path / "straight" / "model.safetensors").read_bytes()
    assert (tmp_path / "parts" / "model.safetensors").read_bytes() == straight
    # best/ too: the step-12 checkpoint recorded the best loss *including* its own evaluation.
    best = {k: tmp_path / k / "best" for k in ("straight", "parts")}
    assert (best["parts"] / "model.safetensors").read_bytes() == (best["straight"] / "model.safetensors").read_bytes()
    configs = [json.loads((b / "config.json").read_text()) for b in best.values()]
    assert configs[0]["model"] == configs[1]["model"]  # (their run sections differ in out_dir only)
    vals = {int(r["step"]): float(r["val_loss"]) for r in csv.DictReader((tmp_path / "straight" / "log.csv").open())
            if r["val_loss"]}
    state = json.loads((tmp_path / "straight" / "ckpt-00000024" / "train_state.json").read_text())
    assert state["best_val_loss"] == pytest.approx(min(vals.values()), rel=1e-5)  # log.csv keeps 6 significant digits
    assert state["best_step"] == min(vals, key=vals.get)
    # The log keeps one row per step across the two processes.
    steps = [int(r["step"]) for r in csv.DictReader((tmp_path / "parts" / "log.csv").open())]
    assert steps == sorted(set(steps)) and steps[-1] == 24


def _start_training(char_data: Path, out: Path, *extra: str) -> subprocess.Popen:
    argv = [sys.executable, "-m", "scratchgpt", "train", "--dir", str(char_data), "--out-dir", str(out),
            *TINY, *extra]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_checkpoint(proc: subprocess.Popen, out: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not (out / "latest").is_file():
        assert proc.poll() is None, f"training ended early: {proc.communicate()}"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.01)


# Runs that are stopped pass a huge --max-steps, so they cannot finish first; the schedule is pinned by
# --lr-decay-steps, so it is the same as in the run that goes straight to step 300.
INTERRUPTIBLE = ["--lr-decay-steps", "300", "--eval-interval", "100", "--checkpoint-interval", "10"]


@pytest.fixture(scope="module")
def straight_300(char_data: Path, tmp_path_factory: pytest.TempPathFactory) -> bytes:
    out = tmp_path_factory.mktemp("straight")
    assert main(["train", "--dir", str(char_data), "--out-dir", str(out / "run"), *TINY, *INTERRUPTIBLE,
                 "--max-steps", "300", "--sampler", "sequential"]) == 0
    return (out / "run" / "model.safetensors").read_bytes()


@pytest.mark.slow  # a whole run: CI runs it (scripts/test.sh); the default suite skips it
# Its fixture trains 300 steps first: on a crowded 2-core machine that alone can take minutes.
@pytest.mark.timeout(900)
@pytest.mark.skipif(os.name != "posix", reason="needs POSIX signals")
def test_exact_resume_after_kill_9(char_data: Path, tmp_path: Path, straight_300: bytes) -> None:
    out = tmp_path / "run"
    proc = _start_training(char_data, out, *INTERRUPTIBLE, "--max-steps", "1000000", "--sampler", "sequential")
    _wait_for_checkpoint(proc, out)
    proc.kill()  # SIGKILL: no handler runs, whatever was being written stays half-written
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    step = int(latest_checkpoint(out).name.split("-")[1])
    assert 0 < step < 300
    assert _train(char_data, out, *INTERRUPTIBLE, "--max-steps", "300", "--sampler", "sequential", "--resume") == 0
    assert (out / "model.safetensors").read_bytes() == straight_300


@pytest.mark.slow  # a whole run: CI runs it (scripts/test.sh); the default suite skips it
# Its fixture trains 300 steps first: on a crowded 2-core machine that alone can take minutes.
@pytest.mark.timeout(900)
@pytest.mark.skipif(os.name != "posix", reason="needs POSIX signals")
def test_ctrl_c_saves_and_resumes_exactly(char_data: Path, tmp_path: Path, straight_300: bytes) -> None:
    out = tmp_path / "run"
    proc = _start_training(char_data, out, *INTERRUPTIBLE, "--max-steps", "1000000", "--sampler", "sequential")
    _wait_for_checkpoint(proc, out)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "stopped at step" in stdout
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["interrupted"] and 0 < summary["step"] < 300
    # Step 0 was evaluated: the summary reports it, as the best so far and as the last evaluation.
    assert summary["eval_step"] == 0 and summary["best_val_loss"] == pytest.approx(summary["val_loss"], rel=1e-3)
    assert latest_checkpoint(out).name == f"ckpt-{summary['step']:08d}"  # saved at the step it stopped
    assert _train(char_data, out, *INTERRUPTIBLE, "--max-steps", "300", "--sampler", "sequential", "--resume") == 0
    assert (out / "model.safetensors").read_bytes() == straight_300


@pytest.fixture
def finished_run(char_data: Path, tmp_path: Path) -> Path:
    assert _train(char_data, tmp_path / "run", "--max-steps", "4", "--eval-interval", "0") == 0
    return tmp_path / "run"


def test_refuses_to_overwrite_a_run(char_data: Path, finished_run: Path, capsys) -> None:
    assert _train(char_data, finished_run, "--max-steps", "4") == 2
    assert "--resume" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["truncate_model", "truncate_state", "garble_json", "dangling_latest"])
def test_corrupted_checkpoint_is_a_one_line_error(char_data: Path, finished_run: Path, capsys, damage: str) -> None:
    ckpt = latest_checkpoint(finished_run)
    if damage == "truncate_model":
        bad = ckpt / "model.safetensors"
        bad.write_bytes(bad.read_bytes()[:1000])
    elif damage == "truncate_state":
        bad = ckpt / "train_state.safetensors"
        bad.write_bytes(bad.read_bytes()[:-10])
    elif damage == "garble_json":
        bad = ckpt / "train_state.json"
        bad.write_text('{"step": 4, ')
    else:
        bad = finished_run / "latest"
        bad.write_text("ckpt-00000099\n")
    assert _train(char_data, finished_run, "--max-steps", "8", "--resume") == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(bad) in err, err
    if damage != "dangling_latest":
        with pytest.raises(CheckpointError, match=str(bad)):
            from scratchgpt.training.run_state import read_training_checkpoint

            read_training_checkpoint(ckpt)


def test_custom_loss_params_and_batches_through_train(tmp_path: Path) -> None:
    """The loop's contract for fine-tuning: any batch source, loss, parameter subset and evals."""

    class Fixed:
        def __init__(self) -> None:
            self.n = 0

        def next_batch(self) -> dict[str, torch.Tensor]:
            self.n += 1
            x = torch.arange(16).view(2, 8) % 10
            return {"x": x, "y": torch.roll(x, -1, dims=1)}

        def state_dict(self) -> dict:
            return {"n": self.n}

        def load_state_dict(self, state: dict) -> None:
            self.n = state["n"]

    model = GPT(GPTConfig(vocab_size=10, n_positions=8, n_embd=16, n_layer=1, n_head=2),
                generator=torch.Generator().manual_seed(0))
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    head = [model.transformer.ln_f.weight, model.transformer.ln_f.bias]
    calls = []
    result = train(
        model, Fixed(), config=TrainConfig(out_dir=str(tmp_path / "ft"), max_steps=6, eval_interval=3,
                                           log_interval=1, checkpoint_interval=0, warmup_steps=0, lr=1e-2,
                                           progress=False, plot=False),
        loss_fn=lambda m, b: lm_loss(m, (b["x"], b["y"])), params=head,
        evals={"val": lambda m: calls.append(m.training) or {"loss": 1.0 / (len(calls)), "accuracy": 0.5}},
        log=lambda msg: None,
    )
    assert result.step == 6 and result.tokens == 6 * 16 and calls == [False, False, False]
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, frozen[k])}
    assert changed == {"transformer.ln_f.weight", "transformer.ln_f.bias"}
    rows = list(csv.DictReader((tmp_path / "ft" / "log.csv").open()))
    assert rows[-1]["eval_val_accuracy"] == "0.5" and rows[-1]["val_loss"]
    assert load_model(tmp_path / "ft" / "best")[0] is not None


def test_configs_parse() -> None:
    from scratchgpt.config import read_toml

    # Every shipped run file builds (no unknown keys, no wrong types) and is self-consistent; the tunable
    # values themselves (steps, learning rate, sizes) are the file's business, not this test's.
    root = Path(__file__).resolve().parents[1] / "configs"
    paths = sorted(root.glob("*.toml"))
    assert paths
    for path in paths:
        raw = read_toml(path)
        run = RunConfig.from_dict(raw, source=str(path))
        block = run.data.block_size or run.model.n_positions
        if "n_positions" in raw.get("model", {}):
            assert block <= run.model.n_positions, path
        assert run.train.decay_steps >= run.train.warmup_steps, path


def test_cli_flags_override_toml(tmp_path: Path, char_data: Path) -> None:
    toml = tmp_path / "run.toml"
    toml.write_text(f'[model]\nn_layer = 1\nn_head = 1\nn_embd = 8\n[data]\ndir = "{char_data}"\nblock_size = 8\n'
                    f'[train]\nmax_steps = 2\nlr = 1e-3\nout_dir = "{tmp_path / "run"}"\nprogress = false\n')
    assert main(["train", "-c", str(toml), "--lr", "2e-3", "--max-steps", "3", "--eval-interval", "0"]) == 0
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["run"]
    assert saved["train"]["lr"] == 2e-3 and saved["train"]["max_steps"] == 3 and saved["model"]["n_layer"] == 1


# ---------------------------------------------------------------------------------------------
# Hardening: nothing silently wrong, nothing overwritten, one-line errors
# ---------------------------------------------------------------------------------------------


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("lr", ["1e30", "1e38"])
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(char_data: Path, tmp_path: Path, capsys,
                                                                  lr: str) -> None:
    from safetensors.torch import load_file

    out = tmp_path / "run"
    assert _train(char_data, out, "--max-steps", "40", "--lr", lr, "--checkpoint-interval", "1",
                  "--eval-interval", "0", "--grad-clip", "0") == 2
    err = _one_line(capsys)
    assert "non-finite" in err and "--lr" in err
    saved = [*out.glob("ckpt-*/*.safetensors"), *out.glob("*.safetensors"), *out.glob("best/*.safetensors")]
    assert saved
    for path in saved:
        assert all(torch.isfinite(t).all() for t in load_file(path).values() if t.is_floating_point()), path
    step = int(latest_checkpoint(out).name.split("-")[1])
    assert f"step {step + 1}:" in err  # stopped at the first bad step, right after the last good checkpoint


def test_nan_validation_loss_is_never_the_best(tmp_path: Path) -> None:
    model = GPT(GPTConfig(vocab_size=10, n_positions=8, n_embd=16, n_layer=1, n_head=2),
                generator=torch.Generator().manual_seed(0))

    class Batches:
        def next_batch(self):
            x = torch.arange(16).view(2, 8) % 10
            return x, torch.roll(x, -1, dims=1)

        def state_dict(self) -> dict:
            return {}

        def load_state_dict(self, state: dict) -> None:
            pass

    result = train(model, Batches(), config=TrainConfig(out_dir=str(tmp_path / "r"), max_steps=4, eval_interval=2,
                                                         progress=False, plot=False),
                   evals={"val": lambda m: {"loss": float("nan")}}, log=lambda msg: None)
    assert result.best_val_loss is None and not (tmp_path / "r" / "best").exists()


@pytest.mark.parametrize("latest", ["deleted", "dangling"])
def test_resume_without_checkpoints_refuses_to_retrain_over_the_run(char_data: Path, finished_run: Path,
                                                                   capsys, latest: str) -> None:
    import shutil

    for ckpt in list_checkpoints(finished_run):
        shutil.rmtree(ckpt)
    if latest == "deleted":
        (finished_run / "latest").unlink()
    model = (finished_run / "model.safetensors").read_bytes()
    log = (finished_run / "log.csv").read_bytes()
    assert _train(char_data, finished_run, "--max-steps", "8", "--resume") == 2
    err = _one_line(capsys)
    assert str(finished_run) in err and "--overwrite" in err
    assert ("no complete checkpoint" if latest == "deleted" else "not a complete checkpoint") in err
    assert (finished_run / "model.safetensors").read_bytes() == model and (finished_run / "log.csv").read_bytes() == log
    assert _train(char_data, finished_run, "--max-steps", "4", "--resume", "--overwrite") == 0
    assert latest_checkpoint(finished_run).name == "ckpt-00000004"


@pytest.mark.parametrize("where", ["best", "run", "data"])
def test_training_into_a_folder_holding_a_model_refuses(char_data: Path, tmp_path: Path, capsys, where: str) -> None:
    run = tmp_path / "run"
    assert _train(char_data, run, "--max-steps", "2", "--eval-interval", "1") == 0
    capsys.readouterr()
    target = {"best": run / "best", "run": run, "data": char_data}[where]
    before = {p: p.read_bytes() for p in target.iterdir() if p.is_file()}
    assert _train(char_data, target, "--max-steps", "2") == 2
    err = _one_line(capsys)
    assert str(target) in err and "--overwrite" in err
    assert {p: p.read_bytes() for p in target.iterdir() if p.is_file()} == before
    if where == "best":
        assert _train(char_data, target, "--max-steps", "2", "--overwrite") == 0


def test_resume_at_or_past_max_steps_says_so(char_data: Path, finished_run: Path, capsys) -> None:
    assert _train(char_data, finished_run, "--max-steps", "2", "--resume") == 2
    err = _one_line(capsys)
    assert "step 4, past --max-steps 2" in err
    assert _train(char_data, finished_run, "--max-steps", "4", "--resume") == 0
    assert "already at step 4" in capsys.readouterr().out


def test_resume_with_another_width_is_one_line(char_data: Path, finished_run: Path, capsys) -> None:
    assert _train(char_data, finished_run, "--max-steps", "8", "--resume", "--n-embd", "64") == 2
    err = _one_line(capsys)
    assert "has shape" in err and "model.safetensors" in err


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
def test_run_files_get_the_default_mode(finished_run: Path) -> None:
    import stat

    mask = os.umask(0o022)
    os.umask(mask)
    ckpt = latest_checkpoint(finished_run)
    for path in (finished_run / "model.safetensors", ckpt / "train_state.safetensors", ckpt / "train_state.json",
                 finished_run / "config.json"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask, path


def test_leftovers_are_cleaned_on_the_next_start(char_data: Path, finished_run: Path) -> None:
    (finished_run / ".tmp-best-999999").mkdir()
    (finished_run / ".old-best-999999").mkdir()
    (finished_run / ".latest.x1y2.tmp").write_text("ckpt")
    (finished_run / ".model.safetensors.999999.tmp").write_text("half a model")
    (finished_run / ".tmp-ckpt-00000008-999999").mkdir()
    assert _train(char_data, finished_run, "--max-steps", "6", "--resume", "--eval-interval", "0") == 0
    assert not [p for p in finished_run.iterdir() if p.name.startswith(".") and p.name != ".scratchgpt.lock"]


@pytest.mark.slow  # six interpreter start-ups: CI runs it (scripts/test.sh); the default suite skips it
@pytest.mark.skipif(os.name != "posix", reason="needs POSIX signals")
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.parametrize("command", ["info", "train"])
def test_a_signal_during_start_up_is_one_line(tmp_path: Path, sig: int, command: str) -> None:
    # Whenever it lands (while torch is imported, or while the command runs), no traceback. (Not in the
    # interpreter's own first ~50 ms: a signal while Python imports `site` is Python's to report.) `train`
    # imports less up front than `info` (no torch._dynamo): its start-up is a window of its own.
    text = tmp_path / "text.txt"
    text.write_text("to be or not to be, that is the question\n" * 40)
    argv = ["info", "--model", "gpt2"] if command == "info" else [
        "train", "--source", str(text), "--dir", str(tmp_path / "data"), "--tokenizer", "char", "--n-layer", "1",
        "--n-embd", "16", "--n-head", "2", "--block-size", "16", "--batch-size", "2", "--max-steps", "100000",
        "--progress", "false", "--sample-interval", "0", "--overwrite", "true"]
    for delay in (0.3, 0.8, 2.0):
        run_argv = argv if command == "info" else [*argv, "--out-dir", str(tmp_path / f"run-{delay}")]
        proc = subprocess.Popen([sys.executable, "-m", "scratchgpt", *run_argv],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(delay)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        expected = {signal.SIGINT: 130, signal.SIGTERM: 143}[sig]
        assert proc.returncode in (expected, 0, -sig), (delay, proc.returncode, err)
        assert "Traceback" not in err and err.count("\n") <= 1, (delay, err)


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_FSIZE and SIGXFSZ")
def test_disk_full_while_training_is_one_line(char_data: Path, tmp_path: Path) -> None:
    import resource

    def small_disk() -> None:  # files may not grow past 40 kB: the tiny model's 100 kB cannot be saved
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (40_000, 40_000))

    out = tmp_path / "run"
    argv = [sys.executable, "-m", "scratchgpt", "train", "--dir", str(char_data), "--out-dir", str(out), *TINY,
            "--max-steps", "2", "--eval-interval", "0"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=240, preexec_fn=small_disk)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("scratchgpt train: error: disk full: cannot write ") and "model.safetensors" in \
        proc.stderr
    assert not list(out.glob(".tmp-*")) and not list(out.glob("ckpt-*"))  # nothing half-written is left


def test_init_and_resume_refuse_data_of_another_tokenizer(char_data: Path, finished_run: Path, tmp_path: Path,
                                                         gpt2_tokenizer, capsys) -> None:
    from scratchgpt.checkpoint import save_model
    from scratchgpt.data.dataset import prepare

    # --init: weights that know GPT-2's ids, data of character ids.
    config = GPTConfig(vocab_size=gpt2_tokenizer.vocab_size, n_positions=32, n_embd=8, n_layer=1, n_head=1)
    bpe_run = save_model(GPT(config, generator=torch.Generator().manual_seed(0)), tmp_path / "bpe-run",
                         tokenizer=gpt2_tokenizer)
    assert main(["train", "--dir", str(char_data), "--init-from", str(bpe_run), "--out-dir", str(tmp_path / "ft"),
                 "--block-size", "32", "--max-steps", "1", "--progress", "false"]) == 2
    err = _one_line(capsys)
    assert f"{char_data} was prepared with a 'char' tokenizer" in err and f"--init {bpe_run} uses a 'gpt2'" in err
    assert not (tmp_path / "ft").exists()
    # --resume on a folder prepared from another text: a char alphabet of its own, so other ids.
    (tmp_path / "other.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 200)
    prepare(tmp_path / "other.txt", tmp_path / "other", tokenizer="char", progress=False)
    before = (finished_run / "model.safetensors").read_bytes()
    assert _train(tmp_path / "other", finished_run, "--max-steps", "6", "--resume") == 2
    err = _one_line(capsys)
    assert f"{tmp_path / 'other'} was prepared with a 'char' tokenizer" in err
    assert f"the checkpoint {finished_run / 'ckpt-00000004'} uses a 'char' tokenizer" in err
    assert (finished_run / "model.safetensors").read_bytes() == before


def test_resume_refuses_a_log_resaved_by_a_spreadsheet(char_data: Path, finished_run: Path, capsys) -> None:
    log = finished_run / "log.csv"
    log.write_bytes(log.read_bytes().replace(b",", b";"))
    before = log.read_bytes()
    assert _train(char_data, finished_run, "--max-steps", "6", "--resume") == 2
    err = _one_line(capsys)
    assert f"{log}: its header" in err and "separated by ';'" in err and f"mv {log} {log}.old" in err
    assert log.read_bytes() == before
    log.rename(log.with_name("log.csv.old"))  # what the message says to do
    assert _train(char_data, finished_run, "--max-steps", "6", "--resume") == 0
    capsys.readouterr()
    assert [r["step"] for r in csv.DictReader(log.open())][-1] == "6"


def test_activation_checkpointing_trains_the_same_weights(char_data: Path, tmp_path: Path) -> None:
    """--activation-checkpointing changes memory, not results: the same bytes after 6 steps with dropout on."""
    common = ["--max-steps", "6", "--eval-interval", "3", "--checkpoint-interval", "0"]
    assert _train(char_data, tmp_path / "plain", *common) == 0
    assert _train(char_data, tmp_path / "ckpt", *common, "--activation-checkpointing") == 0
    plain = (tmp_path / "plain" / "model.safetensors").read_bytes()
    assert (tmp_path / "ckpt" / "model.safetensors").read_bytes() == plain
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["run"]["train"]["activation_checkpointing"] is True


def test_memory_estimate_is_printed_before_the_first_step(char_data: Path, tmp_path: Path, capsys) -> None:
    """One line says what the run will need (training/memory.py has its arithmetic), from the first batch's shape."""
    assert _train(char_data, tmp_path / "run", "--max-steps", "2", "--eval-interval", "0", "--grad-accum-steps", "2",
                  "--activation-checkpointing") == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("memory estimate per process:"))
    # 4 sequences of 32 tokens per micro-batch (accumulation does not multiply it), checkpointing on.
    assert "× 128 tokens, activation checkpointing on)" in line and "optimizer state" in line


# ---------------------------------------------------------------------------------------------
# bf16-true: weights, gradients and optimizer state in bfloat16
# ---------------------------------------------------------------------------------------------


def _losses(run: Path) -> dict[int, float]:
    return {int(r["step"]): float(r["train_loss"]) for r in csv.DictReader((run / "log.csv").open())
            if r["train_loss"]}


@pytest.mark.skipif(not native_bf16("cpu"), reason="this CPU emulates bf16 (~100x slower)")
def test_bf16_true_tracks_float32(char_data: Path, tmp_path: Path, capsys) -> None:
    common = ["--max-steps", "40", "--eval-interval", "0", "--checkpoint-interval", "0"]
    assert _train(char_data, tmp_path / "f32", *common, "--dtype", "float32") == 0
    assert _train(char_data, tmp_path / "bf16", *common, "--dtype", "bf16-true") == 0
    out = capsys.readouterr().out
    assert "precision: bf16-true (weights, gradients and optimizer state in bfloat16; fast: native bf16)" in out
    assert "optimizer: KahanAdamW" in out
    f32, bf16 = _losses(tmp_path / "f32"), _losses(tmp_path / "bf16")
    assert list(f32) == list(bf16) == [5, 10, 15, 20, 25, 30, 35, 40]
    assert f32[40] < f32[5] - 0.4  # it learns
    # bf16 keeps 8 significant bits (weights and activations rounded to ~0.4%): each logged loss may differ by
    # a few thousandths (measured <= 0.002 on an AVX512 + AMX Xeon); 0.03 (~1%) still catches lost updates.
    for step, loss in f32.items():
        assert bf16[step] == pytest.approx(loss, abs=0.03), step


def test_bf16_true_resumes_exactly_and_saves_float32(char_data: Path, tmp_path: Path) -> None:
    from scratchgpt.tensor_files import load_tensors

    common = ["--dtype", "bf16-true", "--lr-decay-steps", "16", "--eval-interval", "8", "--checkpoint-interval", "8"]
    assert _train(char_data, tmp_path / "straight", *common, "--max-steps", "16") == 0
    assert _train(char_data, tmp_path / "parts", *common, "--max-steps", "8") == 0
    assert _train(char_data, tmp_path / "parts", *common, "--max-steps", "16", "--resume") == 0
    straight = (tmp_path / "straight" / "model.safetensors").read_bytes()
    assert (tmp_path / "parts" / "model.safetensors").read_bytes() == straight
    weights = load_tensors(tmp_path / "straight" / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.float32}  # on disk as every other run saves them
    assert all(torch.equal(t, t.bfloat16().float()) for t in weights.values())  # exactly the bf16 weights
    state = load_tensors(tmp_path / "straight" / "ckpt-00000016" / "train_state.safetensors")
    comp = [t for k, t in state.items() if k.endswith("/compensation")]
    assert comp and {t.dtype for t in comp} == {torch.bfloat16}


def test_bf16_true_precision_line_says_whether_it_is_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    import scratchgpt.training.runlog as runlog_module
    from scratchgpt.training.optim import KahanAdamW

    opt = KahanAdamW([torch.nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))])
    cfg, cpu = TrainConfig(dtype="bf16-true"), torch.device("cpu")
    for native, says in ((True, "fast: native bf16"), (False, "saves memory only: bf16 is emulated here")):
        monkeypatch.setattr(runlog_module, "native_bf16", lambda device, native=native: native)
        line = runlog_module.precision_line(cfg, cpu, torch.bfloat16, torch.bfloat16, opt)
        assert line.startswith(f"precision: bf16-true (weights, gradients and optimizer state in bfloat16; {says}")
        assert "optimizer: KahanAdamW" in line


def test_thread_count_is_logged_kept_on_resume_and_idle_threads_sleep(char_data: Path, tmp_path: Path) -> None:
    """The CLI picks how OpenMP's idle threads wait (a busy machine must not collapse) and logs it with the thread
    count, and a resume reuses the count the run started with (float results depend on it: bit-exact resume)."""
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")}
    argv = [sys.executable, "-m", "scratchgpt", "train", "--dir", str(char_data), "--out-dir", str(out), *TINY,
            "--eval-interval", "0", "--sample-interval", "0"]
    first = subprocess.run([*argv, "--max-steps", "4"], capture_output=True, text=True,
                           env={**env, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert first.returncode == 0, first.stderr
    assert "CPU threads: 1, from OMP_NUM_THREADS; idle threads wait: " in first.stdout
    assert ("wait: passive" in first.stdout) or ("wait: spin 30000 rounds, then sleep" in first.stdout)
    if platform.libc_ver()[0] == "glibc":  # the driver keeps freed memory for the next step (device.keep_freed_memory)
        assert "; freed memory: kept for reuse" in first.stdout
    again = subprocess.run([*argv, "--max-steps", "8", "--resume"], capture_output=True, text=True,
                           env={**env, "OMP_WAIT_POLICY": "active"}, timeout=120)
    assert again.returncode == 0, again.stderr
    assert "CPU threads: 1, as the run being resumed used (a bit-exact resume); idle threads wait: active" \
        in again.stdout  # and a policy the user set is kept
    state = json.loads((out / "ckpt-00000008" / "train_state.json").read_text())
    assert state["threads"] == 1


def test_progress_bar_never_shows_a_nan_loss_before_the_first_step(char_data: Path, tmp_path: Path, capsys) -> None:
    """The step-0 evaluation has no training loss yet: the bar shows '-', not 'nan' (which reads as divergence)."""
    assert main(["train", "--dir", str(char_data), "--out-dir", str(tmp_path / "run"), *TINY, "--progress", "true",
                 "--max-steps", "2", "--eval-interval", "2", "--sample-interval", "0"]) == 0  # the last flag wins
    err = capsys.readouterr().err
    assert "loss=-" in err and "nan" not in err, err


def test_lm_evaluation_in_grouped_forwards_gives_the_batch_by_batch_loss() -> None:
    tokens = np.random.default_rng(0).integers(0, 50, 5000).astype(np.uint16)
    model = GPT(GPTConfig(vocab_size=50, n_positions=16, n_embd=32, n_layer=2, n_head=2),
                generator=torch.Generator().manual_seed(0)).eval()
    kwargs = dict(block_size=16, batch_size=4, steps=7, seed=3)
    with torch.no_grad():
        grouped = lm_evaluator(tokens, **kwargs)(model)  # lm_loss: 7 batches as one forward
        one_by_one = lm_evaluator(tokens, loss_fn=lambda m, b: lm_loss(m, b), **kwargs)(model)
    # Other row counts may take other BLAS kernels (float sums in another order): equal to float32 noise.
    assert grouped["loss"] == pytest.approx(one_by_one["loss"], rel=1e-5)
    assert 3.0 < grouped["loss"] < 5.0  # ~ln(50) for an untrained model: real windows were scored


def test_lm_evaluation_groups_are_bounded_by_the_mlp_activation() -> None:
    """Batches are grouped while the MLP's hidden activation of a group stays within 8 MB (cache-sized
    forwards): 512 x 16 tokens x 128 hidden floats = 4 MB a batch, so 5 batches take 3 forwards."""
    tokens = np.random.default_rng(0).integers(0, 50, 20000).astype(np.uint16)
    model = GPT(GPTConfig(vocab_size=50, n_positions=16, n_embd=32, n_layer=1, n_head=2),
                generator=torch.Generator().manual_seed(0)).eval()
    forwards = []
    model.register_forward_hook(lambda m, args, out: forwards.append(args[0].shape))
    kwargs = dict(block_size=16, batch_size=512, steps=5, seed=3)
    with torch.no_grad():
        grouped = lm_evaluator(tokens, **kwargs)(model)
        assert forwards == [(1024, 16), (1024, 16), (512, 16)]
        one_by_one = lm_evaluator(tokens, loss_fn=lambda m, b: lm_loss(m, b), **kwargs)(model)
    assert grouped["loss"] == pytest.approx(one_by_one["loss"], rel=1e-5)


def test_a_training_sample_decodes_on_the_plain_path_unmeasured(char_data: Path, monkeypatch) -> None:
    """The sample printed during training is a few hundred tokens: no timed decode steps for it (nor the build of
    scratchgpt's kernels they could start); the plain path is kept on the model."""
    from scratchgpt.data.tokenizers import load_tokenizer
    from scratchgpt.inference import generate as gen
    from scratchgpt.training.modes.pretrain import make_sample_fn

    def refuse(*args, **kwargs):
        raise AssertionError("a training sample measured decode paths")

    monkeypatch.setattr(gen, "_measure_decode_path", refuse)
    tok = load_tokenizer(char_data)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, n_positions=16, n_embd=32, n_layer=1, n_head=2),
                generator=torch.Generator().manual_seed(0))
    text = make_sample_fn(tok, TrainConfig(sample_tokens=20, sample_prompt="a"))(model)
    assert text.startswith("a") and len(text) > 1
    assert model._decode_path == gen.DecodePath() and model.training  # (generation gives the mode back)


@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3, float("nan")])
def test_clip_grad_norm_gives_torchs_gradients_and_norm_to_the_bit(scale: float) -> None:
    from scratchgpt.training.train import clip_grad_norm

    def params_with_grads() -> list[torch.nn.Parameter]:
        gen = torch.Generator().manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in ((7, 5), (5,), (3, 4, 2))]
        for p in ps:
            p.grad = torch.randn(p.shape, generator=gen) * scale
        return ps

    ours, ref = params_with_grads(), params_with_grads()
    norm, norm_ref = clip_grad_norm(ours, 1.0), torch.nn.utils.clip_grad_norm_(ref, 1.0)
    assert torch.equal(norm, norm_ref) or (norm.isnan() and norm_ref.isnan())
    for a, b in zip(ours, ref, strict=True):
        assert torch.equal(a.grad.nan_to_num(7.0), b.grad.nan_to_num(7.0))
    if scale == 1e3:  # clipped: the total norm is now max_norm
        assert torch.nn.utils.get_total_norm([p.grad for p in ours]).item() == pytest.approx(1.0, rel=1e-5)
