"""Devices: names to torch devices (one rule for every command: 'auto' = CUDA when present, else the
CPU), and what a device can do (native bfloat16). The one place that asks the hardware.

torch is imported inside the functions that need it: the CLI reads the machine's load (below) before torch
loads, since OpenMP's waiting policy must be in the environment by then."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def resolve_device(name: str = "auto", *, local_rank: int | None = None) -> torch.device:
    """The device `name` means: 'auto' picks CUDA when present; a bare 'cuda' takes GPU `local_rank` (torchrun's)
    or the current one. Asking for CUDA where there is none is a one-line error."""
    import torch

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
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    caps = torch.cpu.get_capabilities()
    return bool(caps.get("avx512_bf16") or caps.get("amx_bf16") or caps.get("bf16") or caps.get("sve_bf16"))


def cpu_has(feature: str) -> bool:
    """Whether PyTorch's CPU probe reports `feature` (e.g. 'avx512_vnni', 'amx_int8')."""
    import torch

    return bool(torch.cpu.get_capabilities().get(feature))


def cpu_capability() -> dict[str, Any]:
    """What benchmarks print about the CPU: torch's capability string, its name, native bf16, AMX."""
    import torch

    caps = torch.cpu.get_capabilities()
    return {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu_name": caps.get("cpu_name"),
            "native_bf16": native_bf16("cpu"), "amx_bf16": bool(caps.get("amx_bf16"))}


# ---------------------------------------------------------------------------------------------
# CPU threads on a shared machine
# ---------------------------------------------------------------------------------------------
#
# Why this exists: PyTorch's OpenMP threads meet at a barrier after every parallel operator. When the
# machine has more runnable threads than cores, one of ours is often descheduled while the other waits
# for it, so every operator costs a scheduler time slice: on 2 cores under load 6-9 training ran > 11x
# slower than alone, and int8 decoding 22x slower. One thread per core that is actually free avoids the
# barrier waits, so the run slows in proportion to the load instead of collapsing.


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask; a container's cpuset shows up here too)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def default_threads() -> int:
    """One torch thread per usable physical core: what PyTorch itself starts with, but computed afresh (a
    process may have changed torch's setting since), so that training picks the same count every time."""
    import torch

    physical = torch.cpu.get_capabilities().get("num_physical_cores") if hasattr(torch.cpu, "get_capabilities") \
        else None
    return max(1, min(usable_cpus(), int(physical or os.cpu_count() or 1)))


def _own_running_threads() -> int:
    """Threads of this process that are running or runnable now (our idle OpenMP workers may still spin)."""
    count = 0
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return 1
    for tid in tasks:
        try:
            with open(f"/proc/self/task/{tid}/stat", "rb") as f:
                # The state follows the command name in parentheses, which may itself hold spaces.
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        count += state == b"R"
    return max(1, count)


def other_runnable_threads(*, samples: int = 5, gap_s: float = 0.02) -> int | None:
    """How many threads of *other* processes keep a CPU busy now: the least of a few looks at the kernel's
    `procs_running` over ~0.1 s (the least, so that a brief blip of other work does not count), or None
    where the kernel does not say (not Linux)."""
    seen = []
    for i in range(samples):
        try:
            with open("/proc/stat", "rb") as f:
                line = next(ln for ln in f if ln.startswith(b"procs_running"))
        except (OSError, StopIteration):
            return None
        seen.append(max(0, int(line.split()[1]) - _own_running_threads()))
        if i + 1 < samples:
            time.sleep(gap_s)
    return min(seen)


# glibc's mallopt parameters (malloc.h) and the values we set; see keep_freed_memory.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MALLOC_SETTINGS = {"MALLOC_MMAP_THRESHOLD_": 32 << 20, "MALLOC_TRIM_THRESHOLD_": 1 << 30}


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed blocks for reuse instead of handing them back to the kernel; True if set.

    Why: by default glibc serves every block above a moving threshold (128 KB at first) with fresh pages from
    mmap and returns the free top of the heap to the kernel. A training step frees and re-allocates the same
    activations every step, so each step page-faults its memory in again: nanoGPT's CPU recipe (4 x 128,
    batch 12 x 64) took ~1,450 page faults and ~10 ms of CPU per 55 ms step on an AMD EPYC (Zen 3, KVM). With
    the mmap threshold fixed at glibc's maximum (32 MB) and trimming only above 1 GiB of free heap, the same
    step takes ~4 faults and 12-20% less time.

    The training driver calls it once the model is loaded, in each process, and only then: during a load it
    would keep the load's freed temporaries too (loading a GPT-2 folder peaked at 1.6x the model's bytes
    instead of 1.1x). It changes this process only (no environment variables, so nothing leaks into processes
    started later), and nothing where the user set MALLOC_MMAP_THRESHOLD_ or MALLOC_TRIM_THRESHOLD_, preloads
    another allocator (LD_PRELOAD), or the C library is not glibc.
    """
    import ctypes
    import platform

    if any(k in os.environ for k in MALLOC_SETTINGS) or os.environ.get("LD_PRELOAD"):
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return (mallopt(_M_MMAP_THRESHOLD, MALLOC_SETTINGS["MALLOC_MMAP_THRESHOLD_"]) == 1
            and mallopt(_M_TRIM_THRESHOLD, MALLOC_SETTINGS["MALLOC_TRIM_THRESHOLD_"]) == 1)


@dataclass(frozen=True)
class ThreadChoice:
    """The torch thread count picked for this process, and why (one line for the log)."""

    threads: int
    reason: str
    busy: bool = False  # fewer threads than usable CPUs because other work keeps some busy


def choose_threads(requested: int = 0, *, others: int | None = None, cpus: int | None = None) -> ThreadChoice:
    """Torch CPU threads: `requested` if > 0, else OMP_NUM_THREADS if set, else one per usable core, fewer
    only on a heavily loaded machine: when other processes keep at least as many threads busy as we could
    use, we take the cores they leave (at least one). A light load is left to the OpenMP waiting policy
    (see cli._set_openmp_waiting), so that on most machines the count, and with it every result's last
    bits, does not depend on what else happens to run. `others`/`cpus`: tests."""
    if requested > 0:
        return ThreadChoice(requested, f"{requested}, as asked")
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return ThreadChoice(int(env), f"{env}, from OMP_NUM_THREADS")
    cpus = default_threads() if cpus is None else cpus
    others = other_runnable_threads() if others is None else others
    if others is None or others < cpus:
        return ThreadChoice(cpus, f"{cpus}, one per usable core")
    threads = max(1, min(cpus, (os.cpu_count() or cpus) - others))
    if threads == cpus:
        return ThreadChoice(cpus, f"{cpus}, one per usable core")
    return ThreadChoice(threads, f"{threads} of {cpus} usable cores: {others} threads of other processes keep the "
                                 f"rest busy (a busy machine; --num-threads or OMP_NUM_THREADS fixes the count)",
                        busy=True)


def set_threads(choice: ThreadChoice) -> ThreadChoice:
    """Apply `choice` to torch (intra-op threads) and return it."""
    import torch

    if torch.get_num_threads() != choice.threads:
        torch.set_num_threads(choice.threads)
    return choice


@contextmanager
def threads_left_to_others(cores: int) -> Iterator[None]:
    """Inside the block torch uses `cores` fewer intra-op threads (at least one); the count is restored after.

    For work that runs beside another process of ours for a moment (the training loop's background drawing
    of loss.png): an OpenMP thread whose core is taken holds every other thread at each op's barrier, which
    made a 2-thread sample ~2x slower on 2 cores beside the drawing, against ~1.4x slower on one thread.
    """
    import torch

    before = torch.get_num_threads()
    if cores > 0 and before > 1:
        torch.set_num_threads(max(1, before - cores))
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


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
