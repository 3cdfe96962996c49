"""Device names to torch devices: one rule for every command ('auto' = CUDA when present, else the CPU)."""

from __future__ import annotations

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
