"""Devices: names to torch devices (one rule for every command: 'auto' = CUDA when present, else the
CPU), and what a device can do (native bfloat16). The one place that asks the hardware."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def resolve_device(name: str = "auto", *, local_rank: int | None = None) -> torch.device:
    """The device `name` means: 'auto' picks CUDA when present; a bare 'cuda' takes GPU `local_rank` (torchrun's)
    or the current one. Asking for CUDA where there is none is a one-line error."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device={name!r} is not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={name!r} but no CUDA device is available; use --device cpu")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device() if local_rank is None else local_rank)
    return device


def native_bf16(device: torch.device | str = "cpu") -> bool:
    """True where bfloat16 matmuls run on native units: CUDA GPUs that support it, and CPUs with
    AVX512_BF16 or AMX-BF16 (x86) or the BF16 extension (Arm). Elsewhere PyTorch emulates bf16 in
    software, which measured ~100x slower than float32 on an AVX2-only CPU.

    Read from `torch.cpu.get_capabilities()` (PyTorch's own CPU probe, on every OS), never assumed.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    caps = torch.cpu.get_capabilities()
    return bool(caps.get("avx512_bf16") or caps.get("amx_bf16") or caps.get("bf16") or caps.get("sve_bf16"))


def cpu_has(feature: str) -> bool:
    """Whether PyTorch's CPU probe reports `feature` (e.g. 'avx512_vnni', 'amx_int8')."""
    return bool(torch.cpu.get_capabilities().get(feature))


def cpu_capability() -> dict[str, Any]:
    """What benchmarks print about the CPU: torch's capability string, its name, native bf16, AMX."""
    caps = torch.cpu.get_capabilities()
    return {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu_name": caps.get("cpu_name"),
            "native_bf16": native_bf16("cpu"), "amx_bf16": bool(caps.get("amx_bf16"))}


def last_level_cache_bytes(cache_dir: Path = Path("/sys/devices/system/cpu/cpu0/cache")) -> int | None:
    """Size of the last-level data cache, from Linux sysfs (`cache_dir`: one CPU's), or None where unknown."""
    sizes = {}
    for index in cache_dir.glob("index*"):
        try:
            kind, level = (index / "type").read_text().strip(), int((index / "level").read_text())
            size = (index / "size").read_text().strip()  # e.g. "266240K", "32M"
        except (OSError, ValueError):
            continue
        unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(size[-1:].upper(), 1)
        digits = size[:-1] if unit > 1 else size
        if kind in ("Data", "Unified") and digits.isdigit():
            sizes[level] = int(digits) * unit
    return sizes[max(sizes)] if sizes else None
