"""Process set-up for a run: where it runs (device, dtype, attention path) and the torchrun process group.

Every driver starts and stops a run through `process_group()`; `is_main()` is the one answer to "does
this process speak for the job" (print, write files). Nothing here trains: the loop (`train.py`) and
the modes use these pieces.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from scratchgpt.device import native_bf16
from scratchgpt.device import resolve_device as pick_device
from scratchgpt.model.gpt import GPT


@dataclass(frozen=True)
class Distributed:
    """This process's place in a torchrun job (rank 0 of 1 when run alone)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def distributed_info() -> Distributed:
    """Rank and world size of the initialised process group, or a single process."""
    if dist.is_available() and dist.is_initialized():
        rank = dist.get_rank()
        return Distributed(rank, dist.get_world_size(), int(os.environ.get("LOCAL_RANK", rank)))
    return Distributed()


def init_distributed(device: str = "auto") -> bool:
    """Join the process group when started by torchrun (gloo on CPU, NCCL on CUDA); True if this call did."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available() or dist.is_initialized():
        return False
    _stop_with_launcher()
    use_cuda = torch.cuda.is_available() and not device.startswith("cpu")
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return True


def _stop_with_launcher() -> None:
    """Ask the kernel for a SIGTERM when the process that started this worker (torchrun's agent) dies.

    Why: `kill -9` of torchrun alone leaves its workers training on, orphans that keep writing the run
    folder. SIGTERM instead makes them stop as Ctrl-C does (agree on a step, save a checkpoint, exit 143).
    Linux only (prctl PR_SET_PDEATHSIG); elsewhere nothing changes. If the launcher died before the request
    took effect (the parent changed meanwhile), stop at once.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGTERM)


class StopRequest:
    """Turns the first SIGINT/SIGTERM into a request to stop after the current step; a second SIGINT aborts.

    The loop stops at the next step boundary and saves a checkpoint (torchrun's SIGTERM, see
    `_stop_with_launcher`, takes the same way out)."""

    def __init__(self) -> None:
        self.requested = False
        self.signum: int | None = None  # the signal that asked first (the run's exit code is 128 + it)
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if not self.requested:
            self.signum = signum
        self.requested = True

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def resolve_device(name: str, dist_info: Distributed) -> torch.device:
    """'auto' picks CUDA when present; under torchrun each process takes the GPU of its local rank."""
    return pick_device(name, local_rank=dist_info.local_rank if dist_info.enabled else None)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The autocast dtype. 'auto': bfloat16 on CUDA (float16 on GPUs without it) and on CPUs with native
    bf16 units (AVX512_BF16 / AMX: measured 1.7x float32's training speed on a 6-layer 384-wide model),
    float32 on other CPUs (emulated bf16 is ~100x slower) and other devices. Weights and optimizer state
    stay float32 (autocast only lowers the precision of the matmuls), except with 'bf16-true' (see
    `resolve_weights_dtype`), whose autocast to bfloat16 keeps the ops it lists (cross-entropy) in float32."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if device.type == "cpu" and native_bf16(device) else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
            "bf16-true": torch.bfloat16}[name]


def resolve_weights_dtype(name: str) -> torch.dtype:
    """The dtype weights, gradients and optimizer state are trained in: bfloat16 for 'bf16-true' (half the
    memory of float32; the optimizer then compensates its rounding, see optim.KahanAdamW), else float32."""
    return torch.bfloat16 if name == "bf16-true" else torch.float32


def resolve_attn_impl(name: str, device: torch.device) -> str:
    """The attention path to train with: 'auto' means SDPA."""
    # Measured for training on the 2-core CPU: SDPA 3-10% faster than eager (char 4L/128/T64 ~22.6k vs
    # ~21.3k tok/s; 6L/256/T128 ~5.1k vs ~4.6k; GPT-2 124M about equal). On GPUs it is flash attention.
    return "sdpa" if name == "auto" else name


def autocast(device: torch.device, dtype: torch.dtype) -> AbstractContextManager:
    """Mixed precision for the forward pass; a no-op in float32."""
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def to_device(batch: Any, device: torch.device) -> Any:
    """Move a Tensor, or tuples/lists/dicts of them, to `device` (asynchronously from pinned memory on CUDA)."""
    if isinstance(batch, Tensor):
        if device.type == "cuda":
            return batch.pin_memory().to(device, non_blocking=True)
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def batch_tokens(batch: Any) -> int:
    """Tokens in a batch: the element count of its first tensor (x for (x, y) batches)."""
    if isinstance(batch, Tensor):
        return batch.numel()
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (tuple, list)) else ()
    for v in values:
        n = batch_tokens(v)
        if n:
            return n
    return 0


def model_device(model: nn.Module) -> torch.device:
    """The device of a model's first parameter."""
    return next(model.parameters()).device


def wrap_model(
    model: nn.Module, *, dist_info: Distributed, device: torch.device, fsdp: bool = False, compile: bool = False
) -> nn.Module:
    """FSDP-shard (in place) or DDP-wrap for several processes, optionally torch.compile; returns the module to call."""
    wrapped = model
    if fsdp and dist_info.enabled:
        from torch.distributed.fsdp import fully_shard

        # One FSDP unit per transformer block, then the rest (embeddings, final LayerNorm, head).
        blocks = model.transformer.h if isinstance(model, GPT) else []
        for block in blocks:
            fully_shard(block)
        fully_shard(model)
    if compile:
        wrapped = torch.compile(wrapped)
    if dist_info.enabled and not fsdp:
        # No buffer broadcast: GPT's buffers (causal mask) are constants, and eval must not need all ranks.
        wrapped = nn.parallel.DistributedDataParallel(
            wrapped, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False
        )
    return wrapped


@contextmanager
def grad_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce (DDP no_sync / FSDP) for micro-steps before the last one."""
    if enabled:
        yield
    elif isinstance(model, nn.parallel.DistributedDataParallel):
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def all_reduce_mean(value: Tensor, dist_info: Distributed) -> Tensor:
    if dist_info.enabled:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= dist_info.world_size
    return value


def is_main() -> bool:
    """Whether this process speaks for the job: rank 0 of the process group, of torchrun before the group
    exists (RANK), or a process on its own."""
    info = distributed_info()
    if info.enabled:
        return info.is_main
    return int(os.environ.get("RANK", "0")) == 0


@dataclass(frozen=True)
class Runtime:
    """Where one run executes: its place in the job, its device, its autocast dtype and its weights' dtype."""

    dist: Distributed
    device: torch.device
    dtype: torch.dtype
    attn_impl: str
    weights_dtype: torch.dtype = torch.float32
    malloc_kept: bool = False  # glibc keeps freed memory for the next step (device.keep_freed_memory)

    def precision(self) -> AbstractContextManager:
        """A fresh autocast context for this run's dtype (a no-op in float32)."""
        return autocast(self.device, self.dtype)

    def place(self, model: nn.Module) -> nn.Module:
        """Move `model` to the run's device (and weights' dtype) with the run's attention path, as the loop will
        run it."""
        model.to(self.device)
        if self.weights_dtype != torch.float32:
            model.to(self.weights_dtype)
        if hasattr(model, "set_attn_impl"):
            model.set_attn_impl(self.attn_impl)
        return model


def resolve_runtime(device: str = "auto", dtype: str = "auto", attn_impl: str = "auto") -> Runtime:
    """The Runtime for config names ('auto' or explicit) in the current process group."""
    info = distributed_info()
    dev = resolve_device(device, info)
    return Runtime(info, dev, resolve_dtype(dtype, dev), resolve_attn_impl(attn_impl, dev),
                   resolve_weights_dtype(dtype))


@contextmanager
def process_group(device: str = "auto", dtype: str = "auto", attn_impl: str = "auto") -> Iterator[Runtime]:
    """Join torchrun's process group for the length of a run (leaving it after), and say where the run executes.

    Outside torchrun, or when a group already exists (a caller manages it), this joins nothing.
    """
    joined = init_distributed(device)
    try:
        yield resolve_runtime(device, dtype, attn_impl)
    finally:
        if joined and dist.is_initialized():
            dist.destroy_process_group()


def all_reduce_sums(sums: Mapping[str, float], device: torch.device) -> dict[str, float]:
    """Each value summed over ranks (unchanged in a single process)."""
    if not distributed_info().enabled:
        return dict(sums)
    t = torch.tensor(list(sums.values()), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(sums, t.tolist(), strict=True))


