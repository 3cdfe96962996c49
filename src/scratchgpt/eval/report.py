"""Eval reports: one JSON file per eval (numbers, model, data, settings, versions) and a markdown table."""

from __future__ import annotations

import math
import platform
import re
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from scratchgpt.files import write_json

# The headline numbers each task's table shows (the JSON holds everything).
HEADLINE: dict[str, tuple[str, ...]] = {
    "perplexity": ("loss", "ppl", "bits_per_byte", "tokens", "tokens_per_s"),
    "choice": ("acc", "acc_norm", "acc_bytes", "items", "items_per_s"),
    "classify": ("accuracy", "macro_f1", "examples"),
    "judge": ("mean_score", "scored", "unparsable", "answers"),
}


def versions() -> dict[str, str | None]:
    """Versions of what produced the numbers."""
    import torch

    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    import scratchgpt

    return {"scratchgpt": scratchgpt.__version__, "torch": torch.__version__, "python": platform.python_version(),
            "numpy": version("numpy"), "lm_eval": version("lm_eval"),
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def model_info(model: Any, checkpoint: str) -> dict[str, Any]:
    """What a report says about the model."""
    return {"checkpoint": str(checkpoint), "parameters": model.num_parameters(),
            "config": model.config.to_dict(), "dtype": str(next(model.parameters()).dtype).replace("torch.", "")}


def build_report(task: str, *, model: dict[str, Any], data: Any, settings: dict[str, Any],
                 results: dict[str, Any]) -> dict[str, Any]:
    return {"task": task, "model": model, "data": data, "settings": settings, "results": results,
            "versions": versions(), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def markdown_table(reports: Sequence[dict[str, Any]]) -> str:
    """One row per (eval, headline metric): | task | data | metric | value | stderr |."""
    lines = ["| task | data | metric | value | ± stderr |", "|---|---|---|---|---|"]
    for rep in reports:
        data = rep["data"] if isinstance(rep["data"], str) else ", ".join(map(str, rep["data"]))
        res = rep["results"]
        for key in HEADLINE.get(rep["task"], ()):
            if key in res:
                err = res.get(f"{key}_stderr")
                lines.append(f"| {rep['task']} | {Path(data).name if data else '-'} | {key} | {_fmt(res[key])} | "
                             f"{_fmt(err) if err is not None else ''} |")
    return "\n".join(lines)


def report_stem(task: str, data: Any, name: str | None) -> str:
    if name:
        return name
    first = data if isinstance(data, str) else (data[0] if data else "")
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(str(first)).stem) or "data"
    return f"{task}-{stem}"


def write_report(report: dict[str, Any], out_dir: str | Path, stem: str) -> tuple[Path, Path]:
    """Write out_dir/stem.json and out_dir/stem.md (atomically); their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{stem}.json", out / f"{stem}.md"
    write_json(json_path, report)
    from scratchgpt.files import atomic_write_text

    title = f"# {report['task']} eval of {report['model'].get('checkpoint', '?')}\n\n"
    atomic_write_text(md_path, title + markdown_table([report]) + "\n")
    return json_path, md_path
