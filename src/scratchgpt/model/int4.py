"""int4 weights, group-wise symmetric: `Int4Linear`, `Int4Embedding` and the kernel chosen by measurement.

Each row w of a weight matrix (out, in) is cut into groups of `group_size` (32, 64 or 128) consecutive
values; each group g gets one float16 scale and 4-bit integers:
    s_g = max|w_g| / 7 (rounded to float16),   q = round(w / s_g) in [-7, 7],   w ≈ s_g · q
stored as `weight` (out, ceil(in / 2)) uint8 holding q + 8 two to a byte (column 2j in the low nibble,
2j + 1 in the high one) and `weight_scale` (out, ceil(in / group_size)) float16: 4.5 bits per weight at
group 32, about 1/7 of float32 (1/8 plus the scales). A last group shorter than group_size is allowed.
`Int4Linear.reference` (dequantize, then F.linear) is the readable definition every kernel is tested
against.

Kernels (`Int4Linear.kernel`):
  - "reference": dequantize on every call (off the CPU the only one besides "dense").
  - "int4pack": torch's CPU int4 kernel `_weight_int4pack_mm_for_cpu`, weights kept at 4 bits in memory.
  - "dense": the weight dequantized once into a float copy (not saved) and an ordinary F.linear; the
    int4 file is small, the memory is float32's.
  - "native": scratchgpt's own kernel (model/csrc/quantized_linear.cpp, compiled on first use by
    model/native.py): the weights read as stored, 4.5 bits each, the activation quantized to int8 per
    32 columns as llama.cpp's Q4_0 x Q8_0 product does, integer multiply-adds (AVX512-VNNI or AVX2).
    Where it cannot be built, or a layer's `in` is not a multiple of 128, the layer runs "fbgemm"; so do
    products of more than native.MAX_ROWS rows (a prompt's prefill), where fbgemm's matrix product wins.
  - "fbgemm": the int4 weight re-quantized once to int8 with one scale per row (not saved) and run by
    fbgemm's int8 kernel (model/fbgemm.py), as `--quantize int8` runs: a quarter of float32's memory and
    int8's speed. Not exact: fbgemm's per-row scales cannot express per-group ones, so each weight moves
    by up to half an int8 step of its row (max|w| / 254), an error far below int4's own (up to half an
    int4 step of its group, max|w_g| / 14).
Measured on the 2-core AMD EPYC (Zen 3, AVX2 only, no AVX-512) this project develops on, torch 2.13,
a busy shared machine: one 2304x768 product at batch 1 took 0.19-0.30 ms in float32 vs 5.7-12 ms with
int4pack (float32 or bf16 activations alike); a whole one-token GPT-2 124M step, best of 8
interleaved, float32 31.4 ms, dense 32.5 ms, int4pack 125.9 ms (4x slower): the kernel unpacks nibbles
with AVX2 more slowly than DRAM streams float32. It may win on AVX-512 CPUs (Zen 4, Xeon), which we
could not measure. So nothing is assumed: on the CPU
`choose_int4_kernel` times whole batch-1 forward steps of the model (one token: every weight streams
once, as in a decode step, not one matrix left in the cache by a hot loop) with every kernel this CPU
has, interleaved, and keeps the fastest of int4pack and fbgemm only when its step was at least 10%
faster than dense (the exact, known-good path); a log line says which ran and why. On that AMD EPYC
fbgemm wins: int4 then decodes at int8's speed in int8's memory (bench/decode_race.py). "native" (our
own kernel) joined the candidates since: on a 2-core Intel Xeon with AMX it streams the 4-bit weights
at ~21 GB/s with both cores (fbgemm's int8 copy: twice the bytes) and wins the whole step there.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scratchgpt.model.fbgemm import fbgemm_available, fbgemm_linear, fbgemm_pack
from scratchgpt.model.native import INT4_COLUMNS, MAX_ROWS, native_kernels

logger = logging.getLogger(__name__)

Int4Kernel = Literal["reference", "int4pack", "dense", "fbgemm", "native"]
INT4_KERNELS: tuple[str, ...] = ("reference", "int4pack", "dense", "fbgemm", "native")
INT4_GROUP_SIZES: tuple[int, ...] = (32, 64, 128)
# The smallest positive float16 (a subnormal): the scale of an all-zero group, which any scale represents.
_MIN_SCALE = 2.0**-24
_MAX_SCALE = float(torch.finfo(torch.float16).max)


# ---------------------------------------------------------------------------------------------
# The format: pack, quantize, dequantize
# ---------------------------------------------------------------------------------------------


def pack_int4(q: Tensor) -> Tensor:
    """(rows, n) integers in [-8, 7] -> (rows, ceil(n / 2)) uint8: q + 8, column 2j low nibble, 2j + 1 high."""
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    if u.size(-1) % 2:
        u = F.pad(u, (0, 1), value=8)  # an odd row ends with a zero (8 means 0)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4(packed: Tensor, n: int) -> Tensor:
    """Inverse of pack_int4: (rows, ceil(n / 2)) uint8 -> (rows, n) int8 in [-8, 7]."""
    nibbles = torch.stack([packed & 0xF, packed >> 4], dim=-1)  # (rows, n/2, 2): low nibble first
    return nibbles.reshape(*packed.shape[:-1], -1)[..., :n].to(torch.int8) - 8


def quantize_int4(weight: Tensor, *, group_size: int = 32) -> tuple[Tensor, Tensor]:
    """Group-wise symmetric int4 of a (rows, n) matrix: (packed (rows, ceil(n/2)) uint8, scale (rows,
    ceil(n/group_size)) float16) with w ≈ scale · q per group (see the module docstring)."""
    w = weight.detach().float().contiguous()  # a weight stored input-major (model/fast_linear.py) is a view
    rows, n = w.shape
    groups = F.pad(w, (0, (-n) % group_size)).view(rows, -1, group_size)  # (rows, G, group_size)
    # Rounded to float16 first, then q against the rounded scale: dequantizing gives back exactly
    # scale·q, and a matrix already on this grid quantizes to itself.
    scale = (groups.abs().amax(dim=-1) / 7.0).clamp(_MIN_SCALE, _MAX_SCALE).half()  # (rows, G)
    q = torch.round(groups / scale.float()[..., None]).clamp(-8, 7).view(rows, -1)[:, :n]
    return pack_int4(q), scale


def dequantize_int4(packed: Tensor, scale: Tensor, *, n: int, group_size: int,
                    dtype: torch.dtype = torch.float32) -> Tensor:
    """The float matrix (rows, n) that packed int4 values and their group scales stand for."""
    per_column = scale.float().repeat_interleave(group_size, dim=-1)[..., :n]  # (rows, n)
    # In float32, where q · s is exact (4-bit q, float16 s); a narrower dtype rounds only once, at the end.
    w = unpack_int4(packed, n).float() * per_column
    return w if dtype == torch.float32 else w.to(dtype)


# ---------------------------------------------------------------------------------------------
# The layers
# ---------------------------------------------------------------------------------------------


def buffers_unchanged(snapshot: tuple | None, tensors: tuple[Tensor | None, ...]) -> bool:
    """Whether `tensors` are the very tensors of `snapshot` (see `snapshot_of`), unwritten since.

    How a layer knows a cache built from its buffers is still valid: replaced buffers (load_state_dict
    with assign=True, .to(), a dtype cast) fail the identity check, in-place writes the version check.
    """
    if snapshot is None or len(snapshot) != len(tensors):
        return False
    return all(t is s and (t is None or t._version == v) for (s, v), t in zip(snapshot, tensors, strict=True))


def snapshot_of(tensors: tuple[Tensor | None, ...]) -> tuple:
    """What `buffers_unchanged` compares against later: each tensor and its version counter now."""
    return tuple((t, None if t is None else t._version) for t in tensors)


def int4pack_available() -> bool:
    """Whether this torch has the CPU int4 kernel (torch >= 2.5 on x86 and ARM builds)."""
    return hasattr(torch, "_weight_int4pack_mm_for_cpu") and hasattr(torch, "_convert_weight_to_int4pack_for_cpu")


class Int4Linear(nn.Module):
    """A linear layer whose weight is group-wise int4 (see the module docstring).

    Buffers (saved): `weight` (out, ceil(in/2)) uint8, `weight_scale` (out, ceil(in/group_size)) float16,
    `bias` (out,) or None. Kernel caches (the dense copy, torch's packed layout) are never saved.
    """

    def __init__(self, in_features: int, out_features: int, *, bias: bool = True, group_size: int = 32,
                 kernel: Int4Kernel = "reference", device=None, bias_dtype: torch.dtype = torch.float32):
        super().__init__()
        if group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"int4 group size {group_size} is not one of {INT4_GROUP_SIZES}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        groups = math.ceil(in_features / group_size)
        self.register_buffer("weight", torch.full((out_features, (in_features + 1) // 2), 0x88, dtype=torch.uint8,
                                                  device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, groups, dtype=torch.float16, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype, device=device) if bias else None)
        self.kernel: Int4Kernel = kernel
        # (kernel, dtype) -> (snapshot of the buffers it was built from, the prepared weight)
        self._cache: dict[tuple[str, torch.dtype], tuple[tuple, object]] = {}

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, group_size: int = 32, kernel: Int4Kernel = "reference") -> Int4Linear:
        packed, scale = quantize_int4(linear.weight, group_size=group_size)
        bias = linear.bias
        layer = cls(linear.in_features, linear.out_features, bias=bias is not None, group_size=group_size,
                    kernel=kernel, device=linear.weight.device,
                    bias_dtype=bias.dtype if bias is not None else torch.float32)
        layer.weight.copy_(packed)
        layer.weight_scale.copy_(scale)
        if bias is not None:
            layer.bias.copy_(bias.detach())
        return layer

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
                f"kernel={self.kernel}")

    def dequantized(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The float weight (out, in) this layer stands for: scale · q per group."""
        return dequantize_int4(self.weight, self.weight_scale, n=self.in_features, group_size=self.group_size,
                               dtype=dtype)

    def reference(self, x: Tensor) -> Tensor:
        """Plain definition: dequantize the weight, then an ordinary linear layer in x's dtype."""
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, self.dequantized(x.dtype), bias)

    def use(self, kernel: Int4Kernel) -> None:
        """Switch to `kernel` and free the caches the other kernels built (a dense copy is float32-sized)."""
        self.kernel = kernel
        self._cache = {key: v for key, v in self._cache.items() if key[0] == kernel}

    def int4pack_fits(self) -> bool:
        """Whether torch's int4 kernel takes this shape (whole groups along `in`; `out` is padded to 16)."""
        return int4pack_available() and self.in_features % self.group_size == 0

    def native_fits(self) -> bool:
        """Whether scratchgpt's own kernel takes this layer here: `in` a multiple of 128 and the kernel built
        (compiled on the first call that asks: see model/native.py)."""
        return self.in_features % INT4_COLUMNS == 0 and native_kernels() is not None

    def forward(self, x: Tensor) -> Tensor:
        kernel = self.kernel
        if kernel == "native":
            # Reshapes, casts and the bias are done in C++ (native.py): ~50 calls a decode step, where each
            # Python-side step costs about what a small product does.
            usable = x.is_cpu and self.in_features % INT4_COLUMNS == 0 and not (
                x.requires_grad and torch.is_grad_enabled())
            many_rows = x.numel() > MAX_ROWS * self.in_features and fbgemm_available()  # a prefill: a matrix product
            kernels = native_kernels() if usable and not many_rows else None
            if kernels is not None:
                return kernels.int4_linear(x, self.weight, self.weight_scale, self.bias, self.group_size)
            # many rows, no backward, another device, a shape it does not take: the next fastest
            kernel = "fbgemm" if fbgemm_available() and not x.requires_grad else "dense"
        if kernel == "int4pack" and not (x.is_cpu and self.int4pack_fits()):
            kernel = "dense"  # a shape the kernel does not take: the next fastest, not the slow reference
        if kernel == "fbgemm" and not x.is_cpu:
            kernel = "dense"
        if kernel == "reference" or x.numel() == 0:
            return self.reference(x)
        if kernel == "fbgemm":  # the bias is packed with the weight
            return fbgemm_linear(x, self._prepared("fbgemm", torch.float32))
        bias = self.bias if self.bias is None or self.bias.dtype == x.dtype else self.bias.to(x.dtype)
        if kernel == "dense":
            return F.linear(x, self._prepared("dense", x.dtype), bias)
        packed, scales_and_zeros = self._prepared("int4pack", x.dtype)
        flat = x.reshape(-1, self.in_features)  # (rows, in)
        y = torch._weight_int4pack_mm_for_cpu(flat, packed, self.group_size, scales_and_zeros)
        y = y[:, : self.out_features]  # the rows padded to a multiple of 16 drop out
        if bias is not None:
            y = y + bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def _prepared(self, kernel: str, dtype: torch.dtype):
        """The weight as `kernel` wants it in `dtype`, rebuilt whenever a buffer changed since it was built."""
        buffers = (self.weight, self.weight_scale, self.bias)
        cached = self._cache.get((kernel, dtype))
        if cached is not None and buffers_unchanged(cached[0], buffers):
            return cached[1]
        # Plain tensors, even when first built under inference_mode (a decode step, the kernel choice): an
        # inference tensor could never be used again by a forward that records gradients.
        with torch.inference_mode(False), torch.no_grad():
            if kernel == "dense":
                value = self.dequantized(dtype)
            elif kernel == "fbgemm":
                w = self.dequantized(torch.float32)  # (out, in), one layer at a time
                value = fbgemm_pack(w, (w.abs().amax(dim=1) / 127.0).clamp(min=_MIN_SCALE), self.bias)
            else:
                value = self._int4pack(dtype)
        self._cache[(kernel, dtype)] = (snapshot_of(buffers), value)
        return value

    def _int4pack(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """(torch's packed weight, scales_and_zeros (in/group, out padded, 2) in `dtype`) for int4pack.

        The kernel computes W = (u - 8)·scale + zero from unsigned nibbles u: ours are stored as q + 8,
        so u is our nibble and zero is 0. It wants `out` in multiples of 16: padded with zero rows.
        """
        u = unpack_int4(self.weight, self.in_features).to(torch.int32) + 8  # (out, in) in [0, 15]
        scale = self.weight_scale.float()  # (out, in/group)
        pad = (-self.out_features) % 16
        if pad:
            u, scale = F.pad(u, (0, 0, 0, pad), value=8), F.pad(scale, (0, 0, 0, pad))
        packed = torch._convert_weight_to_int4pack_for_cpu(u.contiguous(), 1)
        scales_and_zeros = torch.stack([scale.t(), torch.zeros_like(scale.t())], dim=-1).to(dtype).contiguous()
        return packed, scales_and_zeros


class Int4Embedding(nn.Module):
    """An embedding table stored as Int4Linear stores a weight: rows of int4 groups with float16 scales.

    Buffers (saved): `weight` (num, ceil(dim/2)) uint8, `weight_scale` (num, ceil(dim/group_size)) float16.
    A lookup dequantizes only the rows it reads. A tied LM head (an Int4Linear over the same (V, C)
    matrix, whose groups also run along C) shares both buffers, so the file holds the matrix once.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, *, group_size: int = 32, device=None):
        super().__init__()
        if group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"int4 group size {group_size} is not one of {INT4_GROUP_SIZES}")
        self.num_embeddings, self.embedding_dim, self.group_size = num_embeddings, embedding_dim, group_size
        groups = math.ceil(embedding_dim / group_size)
        self.register_buffer("weight", torch.full((num_embeddings, (embedding_dim + 1) // 2), 0x88,
                                                  dtype=torch.uint8, device=device))
        self.register_buffer("weight_scale", torch.ones(num_embeddings, groups, dtype=torch.float16, device=device))
        self.out_dtype = torch.float32  # what lookups return: the model's float dtype (cast_weights sets it)

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, *, group_size: int = 32) -> Int4Embedding:
        packed, scale = quantize_int4(embedding.weight, group_size=group_size)
        layer = cls(embedding.num_embeddings, embedding.embedding_dim, group_size=group_size,
                    device=embedding.weight.device)
        layer.weight.copy_(packed)
        layer.weight_scale.copy_(scale)
        layer.out_dtype = embedding.weight.dtype
        return layer

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, group_size={self.group_size}"

    def forward(self, idx: Tensor) -> Tensor:
        """The dequantized rows for the ids in idx: (...) -> (..., dim)."""
        flat = idx.reshape(-1)
        rows = dequantize_int4(self.weight[flat], self.weight_scale[flat], n=self.embedding_dim,
                               group_size=self.group_size, dtype=self.out_dtype)
        return rows.view(*idx.shape, self.embedding_dim)


# ---------------------------------------------------------------------------------------------
# Which kernel, by measurement
# ---------------------------------------------------------------------------------------------


def pick_int4_kernel(step_seconds: dict[str, float], *, margin: float = 0.9) -> Int4Kernel:
    """From measured step times of "dense" and (where measured) "int4pack", "fbgemm" and "native": the
    fastest of the others when its whole step was at least 1 - `margin` (10%) faster than dense, the
    known-good path; otherwise dense. Deterministic."""
    fast = min(("int4pack", "fbgemm", "native"), key=lambda k: step_seconds.get(k, math.inf))
    return fast if step_seconds.get(fast, math.inf) < margin * step_seconds["dense"] else "dense"


@torch.inference_mode()
def time_kernels(model: nn.Module, layers: list[nn.Module], candidates: list[str], *, repeats: int = 3,
                 step_time: Callable[[str], float] | None = None) -> dict[str, float]:
    """Best-of-`repeats` seconds of a batch-1 forward step of `model` (one token) with every layer in `layers`
    on each candidate kernel, rounds interleaved (a machine that slows down mid-way slows every candidate).

    A one-token forward streams every weight once, like a decode step, so the caches hold what they would
    hold while decoding; the first round also builds every kernel's weights (best-of discards it).
    `step_time(kernel)` replaces the measurement (seconds for one step), for tests. The layers are left on
    the last candidate: the caller switches them to its choice.
    """
    best = dict.fromkeys(candidates, math.inf)
    if len(candidates) > 1:
        step_time = step_time or _forward_timer(model, layers)
        # Timed as it decodes: in eval mode (no dropout) and without autograd's bookkeeping. (no_grad rather than
        # inference_mode: weights a kernel builds on its first call may later be used by a step with gradients.)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                for _ in range(repeats):
                    for c in candidates:
                        best[c] = min(best[c], step_time(c))
        finally:
            model.train(was_training)
    return best


def choose_int4_kernel(model: nn.Module, *, repeats: int = 3,
                       step_time: Callable[[str], float] | None = None) -> Int4Kernel:
    """Time batch-1 forward steps of `model` with every Int4Linear on "dense", "int4pack", "fbgemm" and
    "native" (those this torch and CPU have; `time_kernels`); switch them all to the winner (see
    `pick_int4_kernel`) and log which and why. `step_time`: for tests, then every kernel is a candidate.
    """
    layers = [m for m in model.modules() if isinstance(m, Int4Linear)]
    if not layers:
        return "dense"
    candidates = ["dense"]
    if step_time is not None or any(m.int4pack_fits() for m in layers):
        candidates.append("int4pack")
    if step_time is not None or fbgemm_available():
        candidates.append("fbgemm")
    if step_time is not None or any(m.native_fits() for m in layers):
        candidates.append("native")
    best = time_kernels(model, layers, candidates, repeats=repeats, step_time=step_time)
    kernel = pick_int4_kernel(best)
    for m in layers:
        m.use(kernel)
    measured = ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in best.items() if math.isfinite(v))
    capability = torch.backends.cpu.get_cpu_capability()
    if kernel == "dense":
        logger.warning("int4: no int4 kernel is faster than float32 on this CPU (%s; one step: %s); the weights "
                       "are dequantized to float at load, so int4 saves file size, not memory or time",
                       capability, measured or "no other kernel available")
    elif kernel == "fbgemm":
        logger.info("int4: run by fbgemm's int8 kernel, re-quantized per row at load (%s; one step: %s): int8's "
                    "speed and memory", capability, measured)
    elif kernel == "native":
        logger.info("int4: run by scratchgpt's int4 kernel (%s, %s; one step: %s)", capability,
                    native_kernels().instruction_set(), measured)
    return kernel


def _forward_timer(model: nn.Module, layers: list[Int4Linear]) -> Callable[[str], float]:
    """Seconds for one forward step of `model` on a single token with every layer on the given kernel."""
    device = next(model.buffers()).device
    token = torch.zeros(1, 1, dtype=torch.long, device=device)

    def step_time(kernel: str) -> float:
        for m in layers:
            m.kernel = kernel  # not use(): both kernels' caches stay built while they are compared
        t0 = time.perf_counter()
        model(token)
        return time.perf_counter() - t0

    return step_time
