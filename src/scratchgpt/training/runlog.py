"""The run log: log.csv (one row per log step, evaluations as columns), throughput and MFU, and the precision
line a run starts with.

Every mode writes the same log.csv through `CsvLog`; `plots.py` reads it back (`read_log`) and draws it
(`plot_log` for the loss, `plot_metric` for any evaluated metric, e.g. classification accuracy).
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
