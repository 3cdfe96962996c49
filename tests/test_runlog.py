"""The run log: log.csv written, resumed and read back by one reader (plots.py's)."""

from __future__ import annotations

from pathlib import Path

import pytest

from scratchgpt.training.plots import read_log, read_log_table
from scratchgpt.training.runlog import LOG_COLUMNS, CsvLog


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


def _written_log(tmp_path: Path) -> tuple[Path, bytes]:
    path = tmp_path / "log.csv"
    log = CsvLog(path)
    for step in (5, 10, 15):
        log.add({"step": step, "tokens": step * 8, "lr": 1e-3, "train_loss": 3.0 - step / 10})
    log.add({"step": 20, "val_loss": 1.25, "eval_val_accuracy": 0.5})
    return path, path.read_bytes()


@pytest.mark.parametrize(("damage", "message"), [
    # A spreadsheet re-saved it: before, resume read one column named "step;tokens;..." and kept no row.
    (lambda b: b.replace(b",", b";"), r"is not the one scratchgpt writes .*separated by ';', not ','"),
    (lambda b: b.replace(b",", b"\t"), r"separated by '\\t'"),
    (lambda b: b.replace(b"train_loss", b"Train loss", 1), "is not the one scratchgpt writes"),
    (lambda b: b.split(b"\r\n", 1)[1], "is not the one scratchgpt writes"),  # the header is gone
    (lambda b: b.replace(b"\r\n10,", b"\r\nten,"), "line 3: step is 'ten', not a number"),
    (lambda b: b.replace(b"0.001", b"1e-3 (warmup)", 1), "line 2: lr is '1e-3 \\(warmup\\)', not a number"),
    (lambda b: b.replace(b"\r\n15,", b"\r\n15,1,", 1), "line 4: 10 fields where the header has 9"),
])
def test_resume_refuses_a_log_it_cannot_read_and_leaves_it_alone(tmp_path: Path, damage, message: str) -> None:
    path, written = _written_log(tmp_path)
    path.write_bytes(damage(written))
    before = path.read_bytes()
    with pytest.raises(ValueError, match=message) as err:
        CsvLog(path, keep_through_step=20)
    assert str(err.value).startswith(f"{path}: ") and f"mv {path} {path}.old" in str(err.value)
    assert "\n" not in str(err.value)
    assert path.read_bytes() == before  # nothing rewritten, nothing lost


@pytest.mark.parametrize("variant", ["bom", "lf", "crlf", "blank_lines"])
def test_resume_reads_what_editors_change_harmlessly(tmp_path: Path, variant: str) -> None:
    path, written = _written_log(tmp_path)
    expected = read_log_table(path)
    changed = {"bom": b"\xef\xbb\xbf" + written, "lf": written.replace(b"\r\n", b"\n"), "crlf": written,
               "blank_lines": written.replace(b"\r\n", b"\r\n\r\n")}[variant]
    path.write_bytes(changed)
    log = CsvLog(path, keep_through_step=20)
    assert (log.columns, log.rows) == expected
    assert read_log_table(path) == expected


def test_resume_keeps_the_good_rows_of_a_log_cut_mid_line(tmp_path: Path, capsys) -> None:
    path, written = _written_log(tmp_path)
    path.write_bytes(written[:-8])  # a crash while writing step 20's row
    log = CsvLog(path, keep_through_step=20)
    assert [r["step"] for r in log.rows] == ["5", "10", "15"]
    assert "dropped its last line (6 fields where the header has 9)" in capsys.readouterr().err
    assert [r["step"] for r in read_log(path)] == ["5", "10", "15"]
    # Cut right after a complete row's last cell (no line break yet): that row is whole and stays.
    path.write_bytes(written[:-2])
    assert [r["step"] for r in CsvLog(path, keep_through_step=20).rows] == ["5", "10", "15", "20"]
