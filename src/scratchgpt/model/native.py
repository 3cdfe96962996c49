"""scratchgpt's own CPU kernels in C++ (model/csrc/), compiled on first use for the CPU they run on.

Two kernels (model/csrc/quantized_linear.cpp), for the batch sizes a decode step has, written the way
llama.cpp's Q4_0 x Q8_0 and Q8_0 x Q8_0 dot products are: the activation quantized to int8 per 32
columns, integer multiply-adds of weights and activation bytes (AVX512-VNNI, or AVX2), one float
multiply-add per 4-8 columns. `int4_linear` runs model/int4.py's group-wise int4 layers, `int8_linear`
model/quantize.py's per-row int8 ones, each on the weights exactly as stored (no second copy). Neither
torch's own int4 kernel nor fbgemm's int8 one streams the weights at the memory's speed on these CPUs,
and a decode step is that stream: which kernel runs is still measured per model (`choose_int4_kernel`,
`choose_int8_kernel`).

model/csrc/float_linear.cpp (`float_linear`) does the same for float32 and bfloat16 weights in nn.Linear's
layout (model/fast_linear.py's `Linear.native`, chosen per model by `choose_decode_path`), and
model/csrc/decode_block.cpp (`blocks_decode`) runs all blocks (GPT-2, Llama, Qwen) for one decoding token on
these products (model/fused_decode.py). All three kernels read each thread's band of weight rows as
several sequential streams (see float_linear.cpp): one core keeps more reads in flight that way.

How it is built: `torch.utils.cpp_extension.load` (PyTorch's documented way to JIT-compile an extension;
it needs a C++ compiler and ninja, which the `ninja` package provides) with `-O3 -march=native`, once per
CPU model and source version, into `$XDG_CACHE_HOME/scratchgpt/kernels` (or ~/.cache); later processes
load the built library in ~0.1 s. Where it cannot be built (no compiler, another platform, a build
error) `native_kernels()` returns None with the reason in `native_unavailable()`, and the int4 and int8
layers run on the kernels torch has. `SCRATCHGPT_NATIVE=0` turns it off.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shutil
import sys
import threading
import time
from pathlib import Path
from types import ModuleType

logger = logging.getLogger(__name__)

CSRC = Path(__file__).with_name("csrc")
SOURCES = (CSRC / "bindings.cpp", CSRC / "quantized_linear.cpp", CSRC / "float_linear.cpp",  # one extension
           CSRC / "decode_block.cpp")  # bindings.cpp first: the slowest to compile, started first
HEADERS = (CSRC / "kernels.h",)
# The kernels are built for a decode step's few activation rows: int4 loads each weight chunk once for up to
# four rows, int8 once per row. Up to this many rows (a decode step, a small batch) they beat fbgemm's int8
# matrix product; above it (a prompt's prefill, evaluation, a speculative check of 5+ rows) the layers hand
# the product to fbgemm. Measured on the Intel Xeon (AMX), 768 -> 3072 and 3072 -> 768 layers, hot in cache,
# ms, int4 / int8 / fbgemm: 1 row 0.04 / 0.04 / 0.08, 4 rows 0.08 / 0.12-0.13 / 0.10-0.11, 8 rows
# 0.15-0.17 / 0.21-0.23 / 0.12-0.13, 1,024 rows (before int4's four-row tiles) 24 / 27 / 6.6 (float32: 18).
MAX_ROWS = 4
# The columns one step of each kernel takes (64 bytes of weights): a layer's `in` must be a multiple of it.
INT4_COLUMNS, INT8_COLUMNS = 128, 64  # kChunk and kChunk8 in the C++ file

# A build lock older than this was left by a killed build (a build takes ~20 s on two cores).
STALE_LOCK_S = 600.0
FLAGS = ("-O3", "-std=c++17", "-fopenmp")  # OpenMP: at::parallel_for runs on torch's threads

# One build or load at a time in this process (torch's builder also locks the folder against other processes).
_lock = threading.Lock()


def kernel_dir() -> Path:
    """Where built kernels live: `$XDG_CACHE_HOME/scratchgpt/kernels` or `~/.cache/scratchgpt/kernels`."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "scratchgpt" / "kernels"


def _cpu_tag() -> str:
    """A short name of this CPU model and its flags: a library built with -march=native for one CPU may
    not run on another, so each gets its own build."""
    text = ""
    try:
        lines = Path("/proc/cpuinfo").read_text(errors="replace").splitlines()
        wanted = ("vendor_id", "cpu family", "model", "model name", "flags")
        text = "\n".join(sorted({ln for ln in lines if ln.split(":")[0].strip() in wanted}))
    except OSError:
        text = platform.processor()
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def _name(march: str = "native") -> str:
    """The extension's name: its source, flags and CPU, so a changed source or another CPU builds anew."""
    text = b"".join(p.read_bytes() for p in (*SOURCES, *HEADERS))
    h = hashlib.sha256(text + " ".join((*FLAGS, march)).encode() + _cpu_tag().encode())
    return f"scratchgpt_kernels_{march.replace('-', '_')}_{h.hexdigest()[:12]}"


def _ninja_on_path() -> None:
    """torch's builder runs `ninja` from PATH; the `ninja` package installs it beside this interpreter."""
    if shutil.which("ninja"):
        return
    candidates = [Path(sys.executable).parent]
    try:
        import ninja  # type: ignore[import-not-found]

        candidates.insert(0, Path(ninja.BIN_DIR))
    except ImportError:
        pass
    for d in candidates:
        if (d / "ninja").exists():
            os.environ["PATH"] = f"{d}{os.pathsep}{os.environ.get('PATH', '')}"
            return


def build(march: str = "native") -> ModuleType:
    """Compile (once; later a load of the built library) the kernels for `-march=<march>`: "native" is this
    CPU's every instruction set; the tests also build "haswell" (AVX2, the code path of CPUs without
    AVX512-VNNI) and "x86-64" (the plain C++ one) to check those on a machine that would not choose them.
    Raises where it cannot be built."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        raise RuntimeError(f"the kernel is written for x86-64 CPUs, not {platform.machine()}")
    missing = [str(p) for p in (*SOURCES, *HEADERS) if not p.is_file()]
    if missing:
        raise RuntimeError(f"{', '.join(missing)} missing from the installed package")
    _ninja_on_path()
    from torch.utils import cpp_extension

    name = _name(march)
    folder = kernel_dir() / name
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / "lock"  # torch's builder holds it while compiling, and waits forever while it exists
    try:
        if time.time() - lock.stat().st_mtime > STALE_LOCK_S:
            lock.unlink()  # left by a build that was killed: no build takes that long
    except FileNotFoundError:
        pass
    if not any(folder.glob(f"{name}*.so")):
        # A warning so the CLI shows it (it configures no logging): the pause is explained, once per CPU.
        logger.warning("compiling scratchgpt's CPU kernels for this CPU, once (~20 s), into %s", folder)
    return cpp_extension.load(name=name, sources=[str(p) for p in SOURCES],
                              extra_cflags=[*FLAGS, f"-march={march}", f"-I{CSRC}"],
                              extra_ldflags=["-fopenmp"], build_directory=str(folder), verbose=False)


@functools.cache
def _loaded() -> tuple[ModuleType | None, str | None]:
    """(the built module, None) or (None, why not): decided once per process."""
    if os.environ.get("SCRATCHGPT_NATIVE", "").strip() == "0":
        return None, "turned off (SCRATCHGPT_NATIVE=0)"
    try:
        with _lock:
            return build(), None
    except Exception as e:  # a missing compiler or ninja, a build error: torch's kernels still run
        reason = " ".join(str(e).split())[-300:] or type(e).__name__
        logger.info("scratchgpt's CPU kernels are not available here (%s); torch's run", reason)
        return None, reason


def native_kernels() -> ModuleType | None:
    """The compiled kernels (built on first use, then loaded), or None where they cannot be built here.

    Called on every quantized product, so no lock here: two threads that both ask first may both load the
    built library (the build itself is locked, in `_loaded` and by torch's builder)."""
    return _loaded()[0]


def native_unavailable() -> str | None:
    """Why `native_kernels()` returns None here, or None when it returns the kernels."""
    return _loaded()[1]


def code_paths() -> dict[str, str] | None:
    """Which code path each kernel family of this build runs ("avx512_vnni"/"avx2"/"scalar" for int8 and
    int4, "avx512"/"avx2"/"scalar" for float: a CPU with AVX-512 but no VNNI differs), for benchmarks to
    report beside the CPU; None where the kernels are not available."""
    kernels = native_kernels()
    if kernels is None:
        return None
    return {"quantized": kernels.instruction_set(), "float": kernels.float_instruction_set()}
