"""The run log: log.csv written, resumed and read back by one reader; the plots drawn without pyplot."""

from __future__ import annotations

from pathlib import Path

import pytest

from scratchgpt.training.runlog import LOG_COLUMNS, CsvLog, plot_log, plot_metric, read_log, read_log_table


def test_csv_log_adds_columns_and_resume_drops_redone_steps(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    log = CsvLog(path)
    for step in (5, 10, 15):
        log.add({"step": step, "tokens": step * 8, "lr": 1e-3, "train_loss": 3.0 - step / 10})
    log.add({"step": 20, "val_loss": 1.25, "eval_val_accuracy": 0.5})  # a new column rewrites the header
    columns, rows = read_log_table(tmp_path)  # a run directory or the file itself
    assert columns == [*LOG_COLUMNS, "eval_val_accuracy"]
    assert [r["step"] for r in rows] == ["5", "10", "15", "20"] and rows[-1]["eval_val_accuracy"] == "0.5"
    assert read_log(path) == rows

    resumed = CsvLog(path, keep_through_step=10)  # steps 15 and 20 are about to be redone
    assert [r["step"] for r in read_log(path)] == ["5", "10"]
    assert resumed.columns == columns  # the eval column stays for the rows to come
    assert read_log(tmp_path / "missing") == []


def test_one_plotter_for_loss_and_metrics(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    log = CsvLog(tmp_path / "log.csv")
    for step in range(0, 60, 10):
        log.add({"step": step, "tokens": step * 64, "train_loss": 4 - step / 30, "val_loss": 4.2 - step / 40,
                 "eval_train_accuracy": step / 60, "eval_val_accuracy": step / 70})
    png = plot_log(tmp_path / "log.csv", tmp_path / "loss.png")
    assert png is not None and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    acc = plot_metric(tmp_path, "accuracy")
    assert acc == tmp_path / "accuracy.png" and acc.stat().st_size > 5_000
    assert plot_metric(tmp_path, "margin") is None  # no such column: no file
    import matplotlib.pyplot as plt

    assert plt.get_fignums() == []  # no pyplot figure left open (the Agg canvas directly)
