"""plots.py: loss and metric plots drawn without pyplot, each file whole; the loss plot drawn by another process."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from scratchgpt.training.plots import DrawingInBackground, plot_log, plot_metric
from scratchgpt.training.runlog import CsvLog

PNG = b"\x89PNG\r\n\x1a\n"


def _log(path: Path, steps: range) -> None:
    log = CsvLog(path / "log.csv")
    for step in steps:
        log.add({"step": step, "tokens": step * 64, "train_loss": 4 - step / 30, "val_loss": 4.2 - step / 40,
                 "eval_train_accuracy": step / 60, "eval_val_accuracy": step / 70})


def test_one_plotter_for_loss_and_metrics(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    _log(tmp_path, range(0, 60, 10))
    png = plot_log(tmp_path / "log.csv", tmp_path / "loss.png")
    assert png is not None and png.read_bytes()[:8] == PNG
    acc = plot_metric(tmp_path, "accuracy")
    assert acc == tmp_path / "accuracy.png" and acc.stat().st_size > 5_000
    assert plot_metric(tmp_path, "margin") is None  # no such column: no file
    import matplotlib.pyplot as plt

    assert plt.get_fignums() == []  # no pyplot figure left open (the Agg canvas directly)


def test_the_background_drawing_is_the_same_picture(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    _log(tmp_path, range(0, 60, 10))
    here = plot_log(tmp_path / "log.csv", tmp_path / "here.png")
    drawing = DrawingInBackground(tmp_path / "log.csv", tmp_path / "loss.png")
    assert drawing.wait() is True
    assert here is not None and (tmp_path / "loss.png").read_bytes() == here.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["here.png", "log.csv", "loss.png"]  # no temporary left


def test_the_background_drawing_ignores_modules_in_the_working_folder(tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("matplotlib")
    _log(tmp_path, range(0, 30, 10))
    work = tmp_path / "work"
    work.mkdir()
    for name in ("csv", "random", "matplotlib"):  # a user's files where the run was started
        (work / f"{name}.py").write_text("raise RuntimeError('not the standard library')\n")
    monkeypatch.chdir(work)
    assert DrawingInBackground(tmp_path / "log.csv", tmp_path / "loss.png").wait() is True


def test_a_failed_background_drawing_says_so_and_leaves_no_file(tmp_path: Path) -> None:
    (tmp_path / "log.csv").write_text("step,train_loss\n1,not-a-number\n")  # the child's float() fails
    assert DrawingInBackground(tmp_path / "log.csv", tmp_path / "loss.png").wait() is False
    assert not (tmp_path / "loss.png").exists() and [p.name for p in tmp_path.iterdir()] == ["log.csv"]


def test_without_matplotlib_the_background_drawing_says_none(tmp_path: Path, monkeypatch) -> None:
    _log(tmp_path, range(0, 30, 10))
    # A child that cannot import matplotlib (a module of that name that raises ImportError, first on its path).
    (tmp_path / "shadow").mkdir()
    (tmp_path / "shadow" / "matplotlib.py").write_text("raise ImportError('no matplotlib here')\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "shadow"))
    assert DrawingInBackground(tmp_path / "log.csv", tmp_path / "loss.png").wait() is None
    assert not (tmp_path / "loss.png").exists()


@pytest.mark.parametrize("python", ["no-such-python", ""])  # a missing interpreter; none known (embedded Python)
def test_a_drawing_that_cannot_start_says_so(tmp_path: Path, monkeypatch, python: str) -> None:
    monkeypatch.setattr(sys, "executable", str(tmp_path / python) if python else python)
    assert DrawingInBackground(tmp_path / "log.csv", tmp_path / "loss.png").wait() is False
