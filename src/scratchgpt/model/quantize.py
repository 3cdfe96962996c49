"""Smaller weights for faster CPU decoding: int8 and int4 weight quantization, and bfloat16 weights.

Decoding one token at a time is bound by how fast the weights stream from memory (~0.5 GB per token
for GPT-2 124M in float32), so storing them in fewer bytes is the next speed-up after a good kernel.

int8, per output channel, symmetric: each row w of a weight matrix (out, in) is stored as
    q = round(w / s) clamped to [-127, 127] (int8),   s = max|w| / 127 (one float per output row)
and the layer computes y = x · (s ⊙ q)ᵀ + b. `Int8Linear.reference` does exactly that (dequantize,
then an ordinary matmul): it is the readable definition every fast kernel is tested against.

Which fast kernel (measured at batch 1 on a 768x2304 linear, µs; two-core cloud machines, busy):
  - Zen 4 (AVX-512, avx512_bf16; PERF_NOTES): fp32 167, `torch._weight_int8pack_mm` + bf16
    activations 100, fbgemm dynamic int8 (`torch.ops.quantized.linear_dynamic`) 57.
  - Sapphire Rapids (AVX512, avx512_bf16, AMX, VNNI; this branch): fp32 193-327, int8pack + bf16 103,
    fbgemm dynamic 62-86, bf16 weights 250-295 (slower than fp32 at batch 1 here).
fbgemm was the fastest of torch's kernels everywhere we measured, so it is the default where PyTorch
ships it (x86 with AVX2 or better). scratchgpt's own kernel ("native", model/native.py: the int8 weights
as stored times the activation quantized to int8 per 32 columns, VNNI or AVX2 multiply-adds, no packed
copy) competes with it per model: `choose_int8_kernel` times whole one-token forward steps with each and
keeps the faster (on the Intel Xeon with AMX here: 42 vs 67 µs for a 4096x768 product, and it won the
GPT-2 and Llama-1B decode steps; past native.MAX_ROWS rows, a prefill, fbgemm's matrix product runs).
fbgemm quantizes each input row-block to uint8 on the fly (per tensor), and the native kernel each 32
columns of an input row to int8, so neither is purely weight-only; tests bound their difference from the
reference, and bench/generate.py checks perplexity and greedy text. `int8pack` (bf16 activations, weights
exactly as stored) is the choice where fbgemm is missing but bf16 is native; elsewhere the reference runs.
Off the CPU (CUDA) only the reference exists here: fbgemm and `_weight_int8pack_mm` are CPU kernels, so
an int8 model on a GPU dequantizes each weight and multiplies with the GPU's own matmul: a quarter of
the memory for the stored weights, no speed-up. Asking for a CPU kernel there is refused.
`torch.ao.quantization` is deprecated: we do not use its module swapping, only the two kernels.

Embedding tables are quantized the same way (`Int8Embedding`, one scale per row), and a tied LM head
shares the embedding's int8 matrix, so a quantized model is about a quarter of its float32 bytes.

Training through an int8 layer (LoRA over an int8 frozen base, training/lora.py): the weight stays
frozen, but the gradient must reach the layer's input. Neither fast kernel has a backward (fbgemm's
silently returns none), and the reference's would keep each dequantized float weight alive until the
backward pass. So an input that needs a gradient goes through `_FrozenInt8Matmul`: the forward runs the
layer's kernel, the backward multiplies by the dequantized weight made for that call and freed after it.
A LoRA base runs the reference kernel (lora.lower_base says why: fbgemm's pack is a second copy of the
weights), which dequantizes a large weight a block of rows at a time, in the forward as in the backward.
`dequantize_model` turns a quantized model back into a float one (merging LoRA over an int8 base).

int4 (`--quantize int4`, group 32; `int4-g64`, `int4-g128`): group-wise symmetric 4-bit weights with a
float16 scale per group, about an eighth of float32 plus the scales; the layers, the format and which
kernel runs (measured, see its docstring) are in model/int4.py. Here: both modes for whole models.

A quantized model saves as a normal run directory (checkpoint.save_quantized): model.safetensors
holds `<layer>.weight` (int8, or packed int4 as uint8) and `<layer>.weight_scale` (float32, or
float16 per int4 group) for each quantized layer; config.json says {"quantization": {"mode": "int8",
...}} or {"mode": "int4", "group_size": 32, ...}. No pickle anywhere. This module is pure torch (no
I/O), so checkpoint.py can rebuild quantized models from it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scratchgpt.config import Quantize
from scratchgpt.device import native_bf16
from scratchgpt.model.fbgemm import FbgemmPack, fbgemm_available, fbgemm_linear, fbgemm_pack
from scratchgpt.model.int4 import (
    INT4_KERNELS,
    Int4Embedding,
    Int4Linear,
    buffers_unchanged,
    choose_int4_kernel,
    snapshot_of,
    time_kernels,
)
from scratchgpt.model.native import INT8_COLUMNS, MAX_ROWS, native_kernels

# The one list of modes (`--quantize`, `export --format`): config.py's Literal, which the CLI reads too.
QUANT_MODES: tuple[str, ...] = get_args(Quantize)
INT4_GROUPS: dict[str, int] = {"int4": 32, "int4-g64": 64, "int4-g128": 128}  # int4 mode -> group size
INT8_KERNELS: tuple[str, ...] = ("reference", "fbgemm", "int8pack", "native")
Kernel = Literal["reference", "fbgemm", "int8pack", "native", "int4pack", "dense"]  # int8's four, then int4's
INFERENCE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


# ---------------------------------------------------------------------------------------------
# What this CPU can do
# ---------------------------------------------------------------------------------------------


CPU_KERNELS: tuple[str, ...] = ("fbgemm", "int8pack", "native", "int4pack")


def default_kernel(device: torch.device | str = "cpu") -> Kernel:
    """The fastest int8 kernel for `device`: on the CPU see the measurements in the module docstring;
    elsewhere the reference (the fast kernels are CPU-only)."""
    if torch.device(device).type != "cpu":
        return "reference"
    if fbgemm_available():
        return "fbgemm"
    if native_bf16("cpu"):
        return "int8pack"
    return "reference"


# ---------------------------------------------------------------------------------------------
# The quantized layer
# ---------------------------------------------------------------------------------------------


# Float32 bytes of a weight handled at a time: quantizing, and rebuilding it in _FrozenInt8Matmul's backward.
BLOCK_BYTES = 64 << 20


def quantize_weight(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Per-output-channel symmetric int8: (q (out, in) int8, scale (out,) float32) with w ≈ scale·q.

    Rows are independent, so they are quantized a block at a time (<= BLOCK_BYTES of float32):
    a 1B model's embedding table (1 GB in float32) never needs whole float copies beside it.
    """
    out_features, in_features = weight.shape
    q = torch.empty(out_features, in_features, dtype=torch.int8, device=weight.device)
    scale = torch.empty(out_features, dtype=torch.float32, device=weight.device)
    rows = max(1, BLOCK_BYTES // (in_features * 4))
    for start in range(0, out_features, rows):
        w = weight[start:start + rows].detach().to(torch.float32, copy=True)  # a copy: scaled in place below
        # An all-zero row would give scale 0 and 0/0 below; any positive scale represents it exactly.
        # max|w| as max(max w, -min w): no |w| block beside w (the transient of quantizing a loaded 1B base).
        s = (torch.maximum(w.amax(dim=1), w.amin(dim=1).neg()) / 127.0).clamp(min=torch.finfo(torch.float32).tiny)
        q[start:start + rows] = w.div_(s[:, None]).round_().clamp_(-127, 127)  # whole numbers: exact in int8
        scale[start:start + rows] = s
    return q, scale


class Int8Linear(nn.Module):
    """A linear layer whose weight is int8 with one float scale per output channel (see module doc).

    Buffers (saved): `weight` (out, in) int8, `weight_scale` (out,) float32, `bias` (out,) or None.
    """

    def __init__(self, in_features: int, out_features: int, *, bias: bool = True, kernel: Kernel = "reference",
                 device=None, bias_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype, device=device) if bias else None)
        self.kernel: Kernel = kernel
        self._packed: tuple | None = None  # fbgemm's pre-packed weight, built on first use (never saved)
        self._packed_src: tuple | None = None  # the buffers and their versions it was packed from

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, kernel: Kernel = "reference",
                    quantized: tuple[Tensor, Tensor] | None = None) -> Int8Linear:
        """The int8 version of `linear`; `quantized`: its weight's (q, scale) when already made (a tied head)."""
        q, scale = quantized if quantized is not None else quantize_weight(linear.weight)
        bias = linear.bias
        layer = cls(linear.in_features, linear.out_features, bias=bias is not None, kernel=kernel, device="meta")
        # The tensors themselves become the buffers (no zeroed ones copied into: a 1B model's 128k-row table
        # would be held twice while it is quantized).
        layer.weight, layer.weight_scale = q, scale
        layer.bias = None if bias is None else bias.detach().clone()
        return layer

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel={self.kernel}"

    def dequantized(self, dtype: torch.dtype = torch.float32, rows: slice = slice(None)) -> Tensor:
        """The float weight (out, in) this layer stands for, scale ⊙ q, or the block of its output `rows`."""
        # In place on the fresh copy: one temporary, not two (a backward makes this per call).
        return self.weight[rows].to(dtype).mul_(self.weight_scale[rows].to(dtype)[:, None])

    def row_blocks(self, dtype: torch.dtype) -> list[slice]:
        """Output rows in blocks of <= BLOCK_BYTES of dequantized `dtype` weight (one block for most layers)."""
        rows = max(1, BLOCK_BYTES // (self.in_features * dtype.itemsize))
        return [slice(start, start + rows) for start in range(0, self.out_features, rows)]

    def reference(self, x: Tensor) -> Tensor:
        """Plain definition: dequantize the weight, then an ordinary linear layer in x's dtype.

        A weight over BLOCK_BYTES (a 1B model's 128k-row head: 1 GB in float32) is dequantized and multiplied
        a block of output rows at a time, so its float copy never exists whole; each output column is the
        same product either way.
        """
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        blocks = self.row_blocks(x.dtype)
        if len(blocks) == 1:
            return F.linear(x, self.dequantized(x.dtype), bias)
        y = x.new_empty(*x.shape[:-1], self.out_features)  # (..., out)
        for rows in blocks:
            y[..., rows] = F.linear(x, self.dequantized(x.dtype, rows), None if bias is None else bias[rows])
        return y

    def forward(self, x: Tensor) -> Tensor:
        if x.requires_grad and torch.is_grad_enabled():  # training something below this frozen layer
            return _FrozenInt8Matmul.apply(x, self)
        return self._kernel_forward(x)

    def _kernel_forward(self, x: Tensor) -> Tensor:
        kernel = self.kernel
        if kernel == "native" and x.is_cpu:
            # scratchgpt's own kernel (model/native.py), the int8 weight as stored, for the few rows of a decode
            # step; a prefill's many rows (native.MAX_ROWS) go to fbgemm's matrix product, as do shapes it does
            # not take (`in` not a multiple of 64) and CPUs where it was not built.
            many_rows = x.numel() > MAX_ROWS * self.in_features and fbgemm_available()
            kernels = native_kernels() if self.in_features % INT8_COLUMNS == 0 and not many_rows else None
            if kernels is not None:
                return kernels.int8_linear(x, self.weight, self.weight_scale, self.bias)
            kernel = "fbgemm" if fbgemm_available() else "reference"
        if kernel == "fbgemm" and x.is_cpu and x.numel():
            # fbgemm quantizes the activations per call (reduce_range avoids int16 overflow in the
            # multiply-add of CPUs without VNNI, at the cost of one bit of activation precision) and
            # adds the bias packed with the weight. It takes (..., in) as it is: decoding calls this
            # ~50 times per token, so every extra reshape, add or Python check here is measurable.
            return fbgemm_linear(x, self._fbgemm_packed())
        if not x.is_cpu or kernel == "reference" or x.numel() == 0:
            # Off the CPU (a layer quantized on the CPU, then moved) the reference is the only kernel.
            return self.reference(x)
        # int8pack: weights stay int8, activations go through bf16 (native on these CPUs)
        flat = x.reshape(-1, self.in_features)  # (rows, in)
        y = torch._weight_int8pack_mm(flat.to(torch.bfloat16), self.weight,
                                      self.weight_scale.to(torch.bfloat16)).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def _fbgemm_packed(self) -> FbgemmPack:
        """(kernel, fbgemm's packed weight, reduce_range), rebuilt whenever a buffer changed since packing.

        Changed means replaced (load_state_dict(assign=True), a dtype cast) or written in place
        (load_state_dict, copy_): the tensor's identity and its version counter are both checked.
        The pack can even share memory with a float32 bias, so a stale one would mix old and new.
        """
        w, s, b = self.weight, self.weight_scale, self.bias
        if not buffers_unchanged(self._packed_src, (w, s, b)):
            self._packed = fbgemm_pack(w.float() * s[:, None], s, b)
            self._packed_src = snapshot_of((w, s, b))
        return self._packed


class _FrozenInt8Matmul(torch.autograd.Function):
    """y = layer(x) by the layer's kernel; dL/dx = dL/dy · (s ⊙ q), the weight dequantized only for the backward.

    The weight and its scales are frozen (buffers), so x is the only input with a gradient, and nothing is
    saved but the layer: every backward rebuilds its float weight, (out, in), and frees it after use.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, layer: Int8Linear) -> Tensor:
        ctx.layer = layer
        return layer._kernel_forward(x)

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor) -> tuple[Tensor, None]:
        # (..., out) @ (out, in) -> (..., in), in the gradient's dtype (bfloat16 under autocast). The float
        # weight is rebuilt a block of rows (<= 64 MB) at a time: a large head, V x C, never exists whole (at
        # Llama-3.2-1B's 128,256 x 2,048 it would be 1 GB of float32). One block: exactly the whole product.
        layer, dtype = ctx.layer, grad_y.dtype
        grad_x: Tensor | None = None
        for rows in layer.row_blocks(dtype):
            part = grad_y[..., rows] @ layer.dequantized(dtype, rows)  # (..., rows) @ (rows, in)
            grad_x = part if grad_x is None else grad_x.add_(part)
        return grad_x, None


class Int8Embedding(nn.Module):
    """An embedding table stored as int8 rows with one float32 scale per row (Int8Linear's scheme).

    Buffers (saved): `weight` (num, dim) int8, `weight_scale` (num,) float32. A lookup dequantizes only
    the rows it reads. A tied LM head (an Int8Linear) shares both buffers: its per-output-channel
    quantization of the same (V, C) matrix is exactly this per-row one, so the file holds it once.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, *, device=None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.register_buffer("weight", torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(num_embeddings, dtype=torch.float32, device=device))
        self.out_dtype = torch.float32  # what lookups return: the model's float dtype (cast_weights sets it)

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding) -> Int8Embedding:
        q, scale = quantize_weight(embedding.weight)
        layer = cls(embedding.num_embeddings, embedding.embedding_dim, device="meta")
        layer.weight, layer.weight_scale = q, scale  # as in Int8Linear.from_linear: no zeroed copies
        layer.out_dtype = embedding.weight.dtype
        return layer

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"

    def forward(self, idx: Tensor) -> Tensor:
        """Rows of scale ⊙ q for the ids in idx: (...) -> (..., dim)."""
        rows = self.weight[idx].float() * self.weight_scale[idx].unsqueeze(-1)
        return rows if self.out_dtype == torch.float32 else rows.to(self.out_dtype)


# ---------------------------------------------------------------------------------------------
# Whole models
# ---------------------------------------------------------------------------------------------

QUANTIZED_LINEARS: tuple[type[nn.Module], ...] = (Int8Linear, Int4Linear)
QUANTIZED_EMBEDDINGS: tuple[type[nn.Module], ...] = (Int8Embedding, Int4Embedding)


def quantization_of(model: nn.Module) -> dict[str, object] | None:
    """What config.json records of a quantized model: {"mode": "int8"} or {"mode": "int4", "group_size": G};
    None for a float model."""
    for m in model.modules():
        if isinstance(m, Int4Linear | Int4Embedding):
            return {"mode": "int4", "group_size": m.group_size}
        if isinstance(m, Int8Linear | Int8Embedding):
            return {"mode": "int8"}
    return None


def mode_name(quantization: dict[str, object]) -> str:
    """The `--quantize` name of a recorded quantization: "int8", "int4", "int4-g64", "int4-g128"."""
    if quantization.get("mode") == "int4":
        return {g: name for name, g in INT4_GROUPS.items()}[quantization["group_size"]]
    return str(quantization.get("mode"))


def quantized_mode(model: nn.Module) -> str | None:
    """The mode of the model's quantized layers ('int8', 'int4', 'int4-g64', ...), or None for a float model."""
    quantization = quantization_of(model)
    return None if quantization is None else mode_name(quantization)


def _children_of_type(model: nn.Module, kind: type[nn.Module]) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute, child) for every submodule of type `kind` (e.g. every nn.Linear of a GPT)."""
    return [(parent, attr, child) for parent in model.modules() for attr, child in parent.named_children()
            if isinstance(child, kind)]


def _replace_each(model: nn.Module, kind: type[nn.Module], make: Callable[[Any], nn.Module], *,
                  skip: Collection[int] = (), only: Callable[[Any], bool] = lambda child: True) -> None:
    """Replace every submodule of type `kind` that `only` accepts (but those whose id is in `skip`) by make(it).
    One at a time, and nothing here holds a replaced module afterwards: its float weight is freed at once, so
    quantizing a 1B model never holds much more than its float bytes."""
    pending = [entry for entry in _children_of_type(model, kind) if only(entry[2]) and id(entry[2]) not in skip]
    pending.reverse()  # popped from the end: in model order
    while pending:
        parent, attr, child = pending.pop()
        setattr(parent, attr, make(child))


def quantize_model(model: nn.Module, mode: str = "int8", *, kernel: Kernel | None = None,
                   skip: Collection[str] = ()) -> nn.Module:
    """Replace every linear layer and embedding table of `model` (in place) by its int8 or int4 version.

    Every matrix is quantized, so the model takes about a quarter (int8) or an eighth plus scales
    (int4) of its float32 bytes; norms and biases stay float (they are small). A tied LM head shares
    the embedding's quantized matrix. `kernel` None: the default for the device (for int4 on the CPU,
    measured: see model/int4.py). `skip`: module names left float (a head that trains). Returns the
    model, in eval mode.
    """
    if mode not in QUANT_MODES:
        raise ValueError(f"unknown quantization {mode!r}; choose one of {', '.join(QUANT_MODES)}")
    done = quantized_mode(model)
    if done is not None:
        raise ValueError(f"this model is already {done}-quantized; quantizing twice would round twice: "
                         f"start from the float checkpoint")
    if any("lora_A" in name for name, _ in model.named_parameters()):
        raise ValueError("this model has unmerged LoRA adapters; merge them first (scratchgpt finetune merge)")
    device = _device_of(model)
    if kernel is not None:
        _check_kernel(kernel, device, mode=mode)
    group = INT4_GROUPS.get(mode)

    tables: dict[int, nn.Module] = {}  # id of the float table -> its quantized version

    def table(embedding: nn.Embedding) -> nn.Module:
        quantized = Int8Embedding.from_embedding(embedding) if group is None else \
            Int4Embedding.from_embedding(embedding, group_size=group)
        tables[id(embedding.weight)] = quantized
        return quantized

    def layer(linear: nn.Linear) -> nn.Module:
        # A head tied to a quantized table: the same rounding of the same matrix, so it shares the table's.
        tied = tables.get(id(linear.weight))
        if group is None:
            shared = (tied.weight, tied.weight_scale) if tied is not None else None
            return Int8Linear.from_linear(linear, kernel="reference", quantized=shared)
        quantized = Int4Linear.from_linear(linear, group_size=group, kernel="reference")
        if tied is not None:
            quantized.weight, quantized.weight_scale = tied.weight, tied.weight_scale
        return quantized

    with torch.no_grad():
        kept = {id(m) for name, m in model.named_modules() if name in skip}
        table_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
        # The block layers first, each freeing its float matrix: the large tables (a 1B model's 128k x 2048)
        # are quantized once the model has shrunk. Then the tables, then any head tied to one (sharing it).
        _replace_each(model, nn.Linear, layer, skip=kept, only=lambda linear: id(linear.weight) not in table_weights)
        _replace_each(model, nn.Embedding, table, skip=kept)
        _replace_each(model, nn.Linear, layer, skip=kept)
    model.eval()
    if kernel is None:
        use_default_kernel(model)
    else:
        set_kernel(model, kernel)
    return model


def choose_int8_kernel(model: nn.Module, *, repeats: int = 3,
                       step_time: Callable[[str], float] | None = None) -> Kernel:
    """The int8 kernel for a model on the CPU: `default_kernel`'s, or scratchgpt's own ("native", model/native.py)
    where it is built here and a whole one-token forward step with it is faster (timed as for int4,
    `time_kernels`: every weight streamed once, rounds interleaved). Switches the layers and returns it."""
    layers = [m for m in model.modules() if isinstance(m, Int8Linear)]
    base = default_kernel("cpu")
    candidates = [base]
    fits = any(m.in_features % INT8_COLUMNS == 0 for m in layers)
    if step_time is not None or (fits and native_kernels() is not None):
        candidates.append("native")
    best = time_kernels(model, layers, candidates, repeats=repeats, step_time=step_time)
    kernel = "native" if best.get("native", math.inf) < best[base] else base
    for m in layers:
        m.kernel = kernel
    return kernel


def kernels_in_use(model: nn.Module) -> str:
    """The kernels the quantized linear layers of `model` are set to, sorted and joined ("native",
    "fbgemm,native" where some layers' shapes fall back): what benchmarks report."""
    return ",".join(sorted({m.kernel for m in model.modules() if isinstance(m, QUANTIZED_LINEARS)}))


def use_default_kernel(model: nn.Module) -> None:
    """Put the quantized layers of `model` on the default kernel for where they live: on the CPU the faster
    of the feature-chosen kernel and scratchgpt's own for int8 (`choose_int8_kernel`), int4 by timing
    forward steps (`choose_int4_kernel`); elsewhere the reference."""
    device = _device_of(model)
    if any(isinstance(m, Int8Linear) for m in model.modules()):
        if device.type == "cpu":
            choose_int8_kernel(model)
        else:
            set_kernel(model, default_kernel(device))
    if any(isinstance(m, Int4Linear) for m in model.modules()):
        if device.type == "cpu":
            choose_int4_kernel(model)
        else:
            set_kernel(model, "reference")


@torch.no_grad()
def dequantize_model(model: nn.Module, *, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The inverse of `quantize_model`, in place: every Int8Linear / Int8Embedding becomes an nn.Linear /
    nn.Embedding holding scale ⊙ q in `dtype`; a head that shared the embedding's int8 matrix shares its float
    one again. Returns the model."""
    tables: dict[int, nn.Embedding] = {}  # id of the int8 matrix -> the float table made from it
    for parent, attr, layer in _children_of_type(model, Int8Embedding):
        table = nn.utils.skip_init(nn.Embedding, layer.num_embeddings, layer.embedding_dim,
                                   device=layer.weight.device, dtype=dtype)  # skip_init: no draw from the RNG
        table.weight = nn.Parameter(layer.weight.to(dtype) * layer.weight_scale.to(dtype)[:, None])
        tables[id(layer.weight)] = table
        setattr(parent, attr, table)
    for parent, attr, layer in _children_of_type(model, Int8Linear):
        linear = nn.utils.skip_init(nn.Linear, layer.in_features, layer.out_features, bias=layer.bias is not None,
                                    device=layer.weight.device, dtype=dtype)
        tied = tables.get(id(layer.weight))
        linear.weight = tied.weight if tied is not None else nn.Parameter(layer.dequantized(dtype))
        if layer.bias is not None:
            linear.bias = nn.Parameter(layer.bias.to(dtype))
        setattr(parent, attr, linear)
    return model


def set_kernel(model: nn.Module, kernel: Kernel) -> None:
    """Switch every quantized linear layer of `model` to `kernel`: int8 layers take 'reference',
    'fbgemm' or 'int8pack', int4 layers 'reference', 'int4pack' or 'dense'."""
    _check_kernel(kernel, _device_of(model), mode=quantized_mode(model))
    for m in model.modules():
        if isinstance(m, Int8Linear):
            m.kernel = kernel
        elif isinstance(m, Int4Linear):
            m.use(kernel)


def _device_of(model: nn.Module) -> torch.device:
    """Where the model's weights live (its first parameter or buffer; the CPU for an empty module)."""
    tensor = next(model.parameters(), None)
    if tensor is None:
        tensor = next(model.buffers(), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def _check_kernel(kernel: str, device: torch.device, *, mode: str | None = None) -> None:
    """A one-line ValueError for an unknown kernel, one the mode's layers do not have, or a CPU-only
    kernel asked for off the CPU."""
    family = "int4" if mode in INT4_GROUPS else "int8"
    own = INT4_KERNELS if family == "int4" else INT8_KERNELS
    if kernel not in own:
        raise ValueError(f"unknown {family} kernel {kernel!r}; choose one of {', '.join(own)}")
    if kernel in CPU_KERNELS and device.type != "cpu":
        raise ValueError(f"{family} kernel {kernel!r} runs on the CPU only; on {device.type} the {family} layers use "
                         f"'reference' (dequantize, then the device's own matmul)")


def cast_weights(model: nn.Module, dtype: str | torch.dtype, *, device: torch.device | str = "cpu") -> nn.Module:
    """Cast the float weights to `dtype` for inference ('float32' or 'bfloat16').

    bfloat16 halves the bytes streamed per token. On a CPU without native bf16 its matmuls are
    emulated (~100x slower than float32), so that combination is refused.
    """
    if isinstance(dtype, str):
        if dtype not in INFERENCE_DTYPES:
            raise ValueError(f"unknown --dtype {dtype!r}; choose one of {', '.join(INFERENCE_DTYPES)}")
        dtype = INFERENCE_DTYPES[dtype]
    if dtype == torch.bfloat16 and torch.device(device).type == "cpu" and not native_bf16("cpu"):
        raise ValueError(
            f"--dtype bfloat16 needs a CPU with native bf16 (avx512_bf16 or AMX); this one "
            f"({torch.backends.cpu.get_cpu_capability()}) emulates it ~100x slower than float32: "
            f"use --quantize int8 instead"
        )
    for p in model.parameters():
        if p.is_floating_point():
            p.data = p.data.to(dtype)
    for m in model.modules():
        if isinstance(m, Int8Embedding | Int4Embedding):
            m.out_dtype = dtype  # its lookups feed the (now `dtype`) blocks
        # Keep the scales as stored (int8: float32, int4: float16); cast biases and the other float buffers.
        for name, b in list(m.named_buffers(recurse=False)):
            if b is not None and b.is_floating_point() and name != "weight_scale":
                setattr(m, name, b.to(dtype))
    return model


def prepare_for_inference(model: nn.Module, *, quantize: str | None = None, dtype: str | None = None,
                          device: torch.device | str = "cpu") -> nn.Module:
    """Apply `--quantize` and `--dtype` to a loaded model (the one place the CLI and eval call)."""
    if quantize:
        quantize_model(model, quantize, kernel="reference")
    if dtype and dtype != "float32":
        cast_weights(model, dtype, device=device)
    if quantize or (dtype and dtype != "float32" and quantized_mode(model)):
        use_default_kernel(model)  # after the cast: int4's choice is measured in the dtype it will run in
    return model
