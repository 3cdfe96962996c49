"""The run log's plots: log.csv read back, loss.png and <metric>.png drawn with matplotlib.

No torch here, so that a Python process that only draws starts quickly (`python -m scratchgpt.training.plots
LOG PNG`): the training loop draws its last loss.png in such a process (`DrawingInBackground`) while it writes
its last checkpoint and generates its sample; matplotlib's import and the drawing (~0.5 s on a 2-core Xeon)
then overlap that work instead of adding to the run. One matplotlib policy for every plot: the Agg canvas, no
pyplot (no global backend switch, no figure registry); each file is written whole or not at all.
"""

from __future__ import annotations

import contextlib
import csv
import subprocess
import sys
from pathlib import Path
from typing import Any

from scratchgpt.files import atomic_write

LOG_FILE = "log.csv"
PLOT_FILE = "loss.png"
# `python -m scratchgpt.training.plots` exits with this when matplotlib is missing (0: drawn).
NO_MATPLOTLIB = 3


def read_log_table(path: str | Path) -> tuple[list[str], list[dict[str, str]]]:
    """(columns, rows) of a log.csv (a run directory or the file itself); empty when there is none."""
    path = Path(path)
    if path.is_dir():
        path = path / LOG_FILE
    if not path.is_file():
        return [], []
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        return list(reader.fieldnames or []), rows


def read_log(path: str | Path) -> list[dict[str, str]]:
    """The rows of a log.csv (a run directory or the file itself); empty when there is none."""
    return read_log_table(path)[1]


def _figure(size: tuple[float, float]) -> Any:
    """A matplotlib Figure on the Agg canvas (no pyplot: no global backend switch, no figure registry); None
    without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _series(rows: list[dict[str, str]], x_key: str, y_key: str) -> tuple[list[float], list[float]]:
    pts = [(float(r[x_key]), float(r[y_key])) for r in rows if r.get(y_key) not in (None, "")]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_log(csv_path: str | Path, png_path: str | Path) -> Path | None:
    """Plot train and val loss against steps and against tokens seen; None (with no file) without matplotlib."""
    fig = _figure((11, 4))
    if fig is None:
        return None
    rows = read_log(csv_path)
    for ax, x_key, label in zip(fig.subplots(1, 2), ("step", "tokens"), ("step", "tokens seen"), strict=True):
        ax.plot(*_series(rows, x_key, "train_loss"), label="train (running)", lw=1, alpha=0.7)
        if any(r.get("eval_train_loss") for r in rows):
            ax.plot(*_series(rows, x_key, "eval_train_loss"), "o-", ms=3, label="train (eval)")
        ax.plot(*_series(rows, x_key, "val_loss"), "o-", ms=3, label="val")
        ax.set_xlabel(label)
        ax.set_ylabel("cross-entropy loss")
        ax.grid(alpha=0.3)
        ax.legend()
    atomic_write(png_path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    return Path(png_path)


def plot_metric(out_dir: str | Path, metric: str) -> Path | None:
    """<metric>.png from every `<split>_<metric>` column of log.csv against the step; None without matplotlib."""
    rows = read_log(out_dir)
    columns = [c for c in (rows[0] if rows else {}) if c.endswith(f"_{metric}")]
    if not columns:
        return None
    fig = _figure((6, 4))
    if fig is None:
        return None
    ax = fig.subplots()
    for col in columns:
        xs, ys = _series(rows, "step", col)
        if xs:
            ax.plot(xs, ys, marker="o", label=col.removeprefix("eval_").removesuffix(f"_{metric}"))
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.legend()
    path = Path(out_dir) / f"{metric}.png"
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    return path



class DrawingInBackground:
    """loss.png drawn from log.csv by another Python process, started now; `wait()` for the verdict.

    Start it only once log.csv holds every row the plot should show: the process reads the file as it is.
    A failure to start it, or any failure of it, is not reported here: `wait()` returns False and the
    caller draws in its own process (where an error surfaces as it always did).
    """

    def __init__(self, csv_path: str | Path, png_path: str | Path) -> None:
        # The child imports scratchgpt as this process would (same environment), and falls back on the folder
        # this very module came from (a source tree put on sys.path by hand), last so that it can shadow
        # nothing; `-c` would put the working folder first, where a user's csv.py or random.py would shadow the
        # standard library: it is taken off. Its output is not the run's: a Ctrl-C reaches it too (same process
        # group) and it dies of it quietly; the run reports.
        package_root = str(Path(__file__).resolve().parents[2])
        code = (f"import sys; sys.path[:1] = [p for p in sys.path[:1] if p]; sys.path.append({package_root!r}); "
                "from scratchgpt.training.plots import main; sys.exit(main(sys.argv[1:]))")
        self._proc: subprocess.Popen | None = None
        if sys.executable:  # (empty or None where Python is embedded)
            with contextlib.suppress(OSError):  # (then wait() says False, and the run draws it itself)
                self._proc = subprocess.Popen([sys.executable, "-c", code, str(csv_path), str(png_path)],
                                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                              stderr=subprocess.DEVNULL)

    def wait(self, timeout: float = 120.0) -> bool | None:
        """True when the file was drawn, None when matplotlib is missing, False on any other outcome."""
        if self._proc is None:
            return False
        try:
            code = self._proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
            return False
        return True if code == 0 else None if code == NO_MATPLOTLIB else False


def main(argv: list[str] | None = None) -> int:
    """`python -m scratchgpt.training.plots LOG_CSV PNG`: draw the loss plot (what DrawingInBackground runs)."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m scratchgpt.training.plots LOG_CSV PNG", file=sys.stderr)
        return 2
    return 0 if plot_log(args[0], args[1]) is not None else NO_MATPLOTLIB


if __name__ == "__main__":
    sys.exit(main())
