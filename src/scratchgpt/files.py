"""Atomic file and folder writes (a reader sees the old file or the new one, never half of either), and the
one rule for replacing what is there (`check_overwrite`).

Shared by the data stage (prepared folders) and checkpoints, so neither imports the other to write a file.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from contextlib import suppress
from pathlib import Path
from typing import Any

from safetensors import SafetensorError


class WriteError(ValueError):
    """A file could not be written (disk full, no permission); the previous version of it is intact."""


def file_mode() -> int:
    """The mode a plain `open(path, "w")` would give a new file: 0o666 less the process umask."""
    try:  # Linux reports the umask without changing it (os.umask can only set-and-return)
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def _write_failure(path: Path, e: BaseException) -> WriteError:
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    full = isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) or any(
        s in msg for s in ("No space left", "StorageFull", "File too large", "FileTooLarge", "Disk quota")
    )
    what = "disk full: cannot write" if full else "cannot write"
    return WriteError(f"{what} {path}: {msg}; the previous version of the file is intact "
                      f"({'free some space' if full else 'check the folder and its permissions'}, then retry)")


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp_path)` then rename tmp over `path`: readers see the old file or the new one.

    The file ends with the mode a normal write would give it (0o666 less the umask), whatever `write`
    did (mkstemp makes files 0600, and safetensors replaces the file it is given). A failed write
    (disk full, no permission) removes the temporary file and raises a one-line `WriteError`.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
    except OSError as e:
        raise _write_failure(path, e) from None
    try:
        write(Path(tmp))
        os.chmod(tmp, file_mode())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, SafetensorError) as e:
        with suppress(OSError):
            os.unlink(tmp)
        raise _write_failure(path, e) from None
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text))


def write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def check_overwrite(path: str | Path, *, overwrite: bool, flag: str, held: Sequence[str] | None = None) -> None:
    """The rule for every file or folder a command writes: what is there is replaced only with --overwrite.

    A file that exists, or a folder holding `held` (the outputs it would replace; by default anything in
    it), is refused with one line naming it and both ways out. Call it before any work, so a refusal
    costs nothing. An empty or missing folder, a missing file, and `overwrite` pass.
    """
    path = Path(path)
    if overwrite:
        return
    if path.is_dir():
        held = list(held) if held is not None else sorted(p.name for p in path.iterdir())
        if not held:
            return
        shown = ", ".join(held[:6]) + (f" and {len(held) - 6} more" if len(held) > 6 else "")
        what = f"already holds {shown}"
    elif path.exists() or path.is_symlink():
        what = "already exists"
    else:
        return
    raise ValueError(f"{path} {what}; pass --overwrite to replace it, or choose another {flag}")


def fsync_dir(path: str | Path) -> None:
    """Make the renames inside folder `path` durable (where the platform can open a directory)."""
    with suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def replace_dir(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Replace folder `path` with one that `write(tmp)` fills: built aside, then swapped in by rename.

    Between the two renames `path` is briefly absent; a process killed right there leaves
    `.old-<name>-<pid>` and the complete `.tmp-<name>-<pid>`, from which `recover_replaced_dir` (training
    runs it when it next starts in that folder) puts `path` back.
    """
    path = Path(path)
    tmp = path.parent / f".tmp-{path.name}-{os.getpid()}"
    old = path.parent / f".old-{path.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    if old.is_dir():
        shutil.rmtree(old, ignore_errors=True)
    else:  # a file the folder replaces (--overwrite)
        old.unlink(missing_ok=True)
    return path


def recover_replaced_dir(path: str | Path) -> Path | None:
    """Undo a `replace_dir` that was killed between its two renames: the new folder if complete, else the old.

    Complete means it holds config.json: every folder swapped in this way is a model, whose files end with it.
    """
    path = Path(path)
    if path.exists():
        return None
    for kind in ("tmp", "old"):  # the new copy first: it is what the interrupted swap was installing
        found = sorted(path.parent.glob(f".{kind}-{path.name}-*"), key=lambda p: p.stat().st_mtime, reverse=True)
        for candidate in found:
            if candidate.is_dir() and (candidate / "config.json").is_file():
                os.replace(candidate, path)
                fsync_dir(path.parent)
                return path
    return None
