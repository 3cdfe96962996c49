"""The run log: log.csv (one row per log step, evaluations as columns), throughput and MFU, the precision
line a run starts with, and the plots.

Every mode writes the same log.csv through `CsvLog`, reads it back through `read_log`, and draws it with
`plot_log` (the loss) or `plot_metric` (any evaluated metric, e.g. classification accuracy): one
matplotlib policy (the Agg canvas, no pyplot global state) for all of them.
"""

from __future__ import annotations

import csv
import io
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from scratchgpt.checkpoint import unwrap
from scratchgpt.config import TrainConfig
from scratchgpt.device import native_bf16
from scratchgpt.model.gpt import GPT
from scratchgpt.training.optim import ns_dtype_of

# ---------------------------------------------------------------------------------------------
# Throughput and model FLOPs utilisation
# ---------------------------------------------------------------------------------------------

# Dense peak TFLOP/s per GPU: (bf16/fp16 tensor cores, tf32, fp32). Matched against the device name.
GPU_PEAK_TFLOPS: tuple[tuple[str, tuple[float, float, float]], ...] = (
    ("H200", (989.0, 494.5, 67.0)),
    ("H100 PCIe", (756.0, 378.0, 51.0)),
    ("H100", (989.0, 494.5, 67.0)),  # SXM
    ("A100", (312.0, 156.0, 19.5)),
    ("L40S", (362.0, 181.0, 91.6)),
    ("L4", (121.0, 60.0, 30.3)),
    ("A10", (125.0, 62.5, 31.2)),
    ("RTX 4090", (165.0, 82.6, 82.6)),
    ("RTX 3090", (71.0, 35.6, 35.6)),
    ("V100", (125.0, 15.7, 15.7)),
    ("T4", (65.0, 8.1, 8.1)),
)


def gpu_peak_flops(name: str, dtype: torch.dtype, *, tf32: bool = False) -> float | None:
    """Peak FLOP/s of a GPU from the table above, or None for an unknown GPU."""
    for key, (half, tf32_peak, fp32) in GPU_PEAK_TFLOPS:
        if key.lower() in name.lower():
            tflops = half if dtype in (torch.bfloat16, torch.float16) else tf32_peak if tf32 else fp32
            return tflops * 1e12
    return None


def measure_cpu_flops(*, n: int = 1024, repeats: int = 10, dtype: torch.dtype = torch.float32) -> float:
    """Achievable matmul FLOP/s of `dtype` on this CPU with the current thread count (the best of `repeats`)."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=gen).to(dtype), torch.randn(n, n, generator=gen).to(dtype)
    a @ b  # warm up the kernels and thread pool
    best = 0.0
    for _ in range(repeats):  # other processes only ever slow a run down: keep the fastest
        t0 = time.perf_counter()
        a @ b
        best = max(best, 2 * n**3 / (time.perf_counter() - t0))
    return best


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """Peak FLOP/s of `device` for `dtype`: the GPU table, or a measured matmul rate on the CPU."""
    if device.type == "cuda":
        return gpu_peak_flops(torch.cuda.get_device_name(device), dtype,
                              tf32=torch.backends.cuda.matmul.allow_tf32)
    if device.type == "cpu":
        if dtype in (torch.bfloat16, torch.float16) and not native_bf16(device):
            # Emulated half precision is ~100x slower: a small matrix measures it in a fraction of a second.
            return measure_cpu_flops(n=256, repeats=3, dtype=dtype)
        return measure_cpu_flops(dtype=dtype)
    return None


def flops_per_token(model: nn.Module, seq_len: int) -> float:
    """Training FLOPs per token (PaLM, appendix B): 6·N plus 12·L·C·T for attention scores and values.

    N counts every parameter except learned position embeddings (a lookup, not a matmul); a tied
    input/output embedding counts once, for the output projection (an untied one is a lookup). A model
    that is not a GPT gets 6·N.
    """
    inner = unwrap(model)
    n = sum(p.numel() for p in inner.parameters())
    if not isinstance(inner, GPT):
        return 6.0 * n
    cfg = inner.config
    if isinstance(inner.transformer.wpe, nn.Embedding):
        n -= inner.transformer.wpe.weight.numel()
    if inner.lm_head.weight is not inner.transformer.wte.weight:
        # Untied (e.g. a classifier's Linear(C, K) head): the token embedding is only a lookup too.
        n -= inner.transformer.wte.weight.numel()
    return 6.0 * n + 12.0 * cfg.n_layer * cfg.n_embd * seq_len


def precision_line(cfg: TrainConfig, device: torch.device, amp_dtype: torch.dtype, weights_dtype: torch.dtype,
                   optimizer: torch.optim.Optimizer) -> str:
    """What the run computes in, and why: the dtype choice, the hardware it was made for, the optimizer."""
    native = native_bf16(device)
    if device.type == "cpu":
        hw = f"CPU capability {torch.backends.cpu.get_cpu_capability()}, native bf16 {'yes' if native else 'no'}"
    else:
        hw = f"{device.type} {torch.cuda.get_device_name(device) if device.type == 'cuda' else ''}".strip()
    mode = "float32" if amp_dtype == torch.float32 else f"{str(amp_dtype).removeprefix('torch.')} autocast"
    if weights_dtype == torch.bfloat16:
        # bf16 weights halve the memory of weights, gradients and optimizer state on any device; they are
        # only faster where the matmuls run on bf16 units.
        speed = "fast: native bf16" if native else "saves memory only: bf16 is emulated here, ~100x slower"
        mode = f"bf16-true (weights, gradients and optimizer state in bfloat16; {speed})"
    ns = ns_dtype_of(optimizer)
    opt = (f"Muon (Newton-Schulz in {str(ns).removeprefix('torch.')}, ns_dtype={cfg.ns_dtype}) + AdamW"
           if ns is not None else type(optimizer).__name__)
    return f"precision: {mode} (dtype={cfg.dtype}; {hw}); optimizer: {opt}; schedule: {cfg.schedule}"


# ---------------------------------------------------------------------------------------------
# log.csv and its plots
# ---------------------------------------------------------------------------------------------

LOG_FILE = "log.csv"
PLOT_FILE = "loss.png"
LOG_COLUMNS = ("step", "tokens", "lr", "train_loss", "val_loss", "tok_per_s", "mfu", "elapsed_s")


class CsvLog:
    """log.csv: fixed columns, then `eval_<name>_<metric>` columns as evaluations first report them."""

    def __init__(self, path: Path, *, keep_through_step: int | None = None) -> None:
        self.path = path
        self.columns = list(LOG_COLUMNS)
        self.rows: list[dict[str, Any]] = []
        if keep_through_step is not None and path.is_file():
            # Resuming: rows past the checkpoint came from steps that are about to be redone.
            columns, rows = read_log_to_resume(path)
            self.columns = columns
            self.rows = [r for r in rows if int(r["step"]) <= keep_through_step]
        self._rewrite()

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        new = [k for k in row if k not in self.columns]
        if new:
            self.columns += new
            self._rewrite()
        else:
            with self.path.open("a", newline="") as f:
                csv.DictWriter(f, self.columns).writerow(_format_row(row))

    def _rewrite(self) -> None:
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, self.columns)
            writer.writeheader()
            writer.writerows(_format_row(r) for r in self.rows)
        os.replace(tmp, self.path)


def _format_row(row: dict[str, Any]) -> dict[str, Any]:
    return {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()}


def read_log_to_resume(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """(columns, rows) of a log.csv a resumed run appends to: every row kept, or a one-line ValueError.

    The log is data: rewriting it with rows this reader could not parse would lose them. So a file whose
    header is not ours (a spreadsheet re-saved it with ';' separators, a column renamed), a row of the wrong
    width or a cell that is not a number is refused, saying what to do. What a crash mid-write leaves (a
    last line without its line break that does not parse) is dropped with a note. A byte order mark and
    CRLF or LF line ends are read as they are.
    """
    aside = (f"restore it as scratchgpt wrote it, or move it aside (mv {path} {path}.old) and resume again to "
             f"start a new log at the checkpoint's step")
    try:
        text = path.read_bytes().decode("utf-8-sig")  # drops a byte order mark an editor added
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 (byte offset {e.start}); {aside}") from None
    records = [r for r in csv.reader(io.StringIO(text, newline="")) if r]  # blank lines hold no row
    if not records:
        return list(LOG_COLUMNS), []
    header = records[0]
    if header[: len(LOG_COLUMNS)] != list(LOG_COLUMNS) or len(set(header)) != len(header) or "" in header:
        first = text.splitlines()[0]
        sep = next((f" (its fields are separated by {c!r}, not ',')" for c in ";\t|" if c in first and
                    len(header) == 1), "")
        raise ValueError(f"{path}: its header {first[:60]!r}{'...' if len(first) > 60 else ''} is not the one "
                         f"scratchgpt writes ({','.join(LOG_COLUMNS)},...){sep}; resuming would drop its rows: "
                         f"{aside}")
    rows: list[dict[str, str]] = []
    cut_short = not text.endswith(("\n", "\r"))
    for number, record in enumerate(records[1:], start=2):
        problem = _row_problem(header, record)
        if problem is None:
            rows.append(dict(zip(header, record, strict=True)))
        elif cut_short and number == len(records):
            print(f"note: {path}: dropped its last line ({problem}): a run stopped while writing it",
                  file=sys.stderr)
        else:
            raise ValueError(f"{path}: line {number}: {problem}; resuming would drop the rows it cannot read: "
                             f"{aside}")
    return header, rows


def _row_problem(header: list[str], record: list[str]) -> str | None:
    """Why a log.csv row cannot be kept, or None: it needs one cell per column, each empty or a number."""
    if len(record) != len(header):
        return f"{len(record)} fields where the header has {len(header)}"
    for name, cell in zip(header, record, strict=True):
        if not cell:
            continue
        try:
            int(cell) if name == "step" else float(cell)
        except ValueError:
            return f"{name} is {cell[:30]!r}, not a number"
    if not record[0]:
        return "no step"
    return None


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
    fig.savefig(png_path, dpi=110)
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
    fig.savefig(path, dpi=100)
    return path


# Seconds between redraws of loss.png at checkpoints (and always at the end of a run).
PLOT_EVERY_S = 60.0


def plot_due(*, since_last: float, seconds_left: float, every: float | None = None) -> bool:
    """Whether a checkpoint redraws loss.png: `every` seconds (PLOT_EVERY_S) after the last redraw, unless the
    end of the run, which draws it anyway, is due sooner than that (each redraw costs ~0.5 s)."""
    every = PLOT_EVERY_S if every is None else every
    return since_last >= every and seconds_left > every


def progress_line(row: dict[str, Any], max_steps: int) -> str:
    """The one-line progress report of a log row, printed when there is no progress bar."""
    mfu = f" | mfu {row['mfu'] * 100:.1f}%" if row.get("mfu") is not None else ""
    return (f"step {row['step']}/{max_steps} | loss {row['train_loss']:.4f} | lr {row['lr']:.2e} | "
            f"{row['tok_per_s']:.0f} tok/s{mfu}")
