"""Tensor files: safetensors read and written pickle-free, JSON read with one-line errors.

What checkpoints, training state and LoRA adapters share: `save_tensors` (atomic), `load_tensors` (memory-
mapped, or converted to another dtype a chunk at a time so a file never needs two copies in memory),
`read_json`, and `CheckpointError`, the one-line error for a missing, truncated or corrupted file.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from scratchgpt.files import atomic_write


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated, corrupted or of an unknown kind (one-line message)."""


def read_json(path: str | Path) -> Any:
    """Parse a JSON file, turning every failure into a one-line CheckpointError naming the file."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}); the file is corrupted, restore or re-create it") from None


def save_tensors(tensors: dict[str, Tensor], path: str | Path, *, metadata: dict[str, str] | None = None) -> None:
    """Atomically save a flat dict of tensors as safetensors."""
    flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda p: save_file(flat, str(p), metadata=metadata))


# safetensors' dtype names: the ones a model, an int8 file or a training state holds.
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}
_READ_CHUNK_BYTES = 1 << 20  # how much of a tensor is converted at a time when it changes dtype on the way in


def load_tensors(
    path: str | Path, *, device: torch.device | str = "cpu", dtype: torch.dtype | None = None, mmap: bool = True,
) -> dict[str, Tensor]:
    """Load a safetensors file (floating tensors as `dtype` when given); a missing, truncated or corrupted file
    gives a one-line CheckpointError.

    With `mmap` and no `dtype`, the tensors share safetensors' memory map of the file (no copy; pages come in
    as they are used). Otherwise each tensor is read into its own memory, through one small buffer when its
    dtype changes, so a load peaks at its result plus one chunk: converting from the map would hold both
    copies, and every page a tensor touched stays in the process while any tensor of the map lives (pass
    mmap=False when the caller copies the tensors anyway, e.g. to transpose them).
    """
    path = Path(path)
    check_header(path)  # safetensors' own checks of the header and the file's size; reads no tensor data
    device = torch.device(device)
    if mmap and dtype is None:
        try:
            return load_file(str(path), device=str(device))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise _safetensors_error(path, e) from None
    try:
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
            header.pop("__metadata__", None)
            out: dict[str, Tensor] = {}
            buffer = torch.empty(_READ_CHUNK_BYTES, dtype=torch.uint8)  # one for the file: no allocator churn
            for name in sorted(header):
                info = header[name]
                stored = _SAFETENSORS_DTYPES.get(info["dtype"])
                if stored is None:
                    raise CheckpointError(f"{path}: {name} has dtype {info['dtype']}, which scratchgpt does not read")
                f.seek(8 + header_len + info["data_offsets"][0])
                target = dtype if dtype is not None and stored.is_floating_point else stored
                tensor = _read_tensor(f, info["shape"], stored, target, buffer=buffer)
                out[name] = tensor if device.type == "cpu" else tensor.to(device)
            return out
    except CheckpointError:
        raise
    except (OSError, ValueError, KeyError, struct.error) as e:
        raise _safetensors_error(path, e) from None


def _read_tensor(f: Any, shape: list[int], stored: torch.dtype, dtype: torch.dtype, *, buffer: Tensor) -> Tensor:
    """The next tensor of open file `f`, stored as `stored`, returned as `dtype`: read in place, or through the
    uint8 `buffer` one piece at a time when the dtypes differ."""
    out = torch.empty(shape, dtype=dtype)
    if dtype == stored:
        _read_exact(f, out)
        return out
    flat, per = out.view(-1), max(buffer.numel() // stored.itemsize, 1)
    staging = buffer[: per * stored.itemsize].view(stored)
    for i in range(0, flat.numel(), per):
        part = staging[: min(per, flat.numel() - i)]
        _read_exact(f, part)
        flat[i : i + part.numel()].copy_(part)
    return out


def _read_exact(f: Any, tensor: Tensor) -> None:
    """Fill contiguous `tensor` with its size in bytes from `f` (one read may return less: large or slow files)."""
    view = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
    done = 0
    while done < len(view):
        n = f.readinto(view[done:])
        if not n:
            raise ValueError("file ends inside a tensor")
        done += n


def check_header(path: Path) -> None:
    """Read a safetensors file's header only (no tensor data): a missing or corrupted file is a CheckpointError."""
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise _safetensors_error(path, e) from None


def _safetensors_error(path: Path, e: Exception) -> CheckpointError:
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    return CheckpointError(
        f"{path}: truncated or corrupted safetensors file ({msg}); restore it or use another checkpoint"
    )


def nbytes(t: Tensor) -> int:
    """Bytes of the tensor's elements."""
    return t.numel() * t.element_size()


def write_safetensors(path: Path, specs: dict[str, Tensor], tensors: Iterator[tuple[str, Tensor]]) -> None:
    """Write a safetensors file whose header lists `specs` (name -> a tensor of that dtype and shape, e.g. on the
    meta device), then the data of `tensors` in the same order, each dropped once written (one in memory)."""
    names = {v: k for k, v in _SAFETENSORS_DTYPES.items()}
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, t in specs.items():
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes(t)]}
        offset += nbytes(t)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)  # the data starts 8-byte aligned, as safetensors' own writer does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for (name, spec), (got, tensor) in zip(specs.items(), tensors, strict=True):
            if got != name or tensor.dtype != spec.dtype or tensor.shape != spec.shape:
                raise AssertionError(f"{path}: wrote {got} {tuple(tensor.shape)} where the header says {name}")
            f.write(memoryview(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))
