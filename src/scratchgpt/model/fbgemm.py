"""fbgemm's dynamic int8 linear: the one place that packs a weight for it and knows when it exists.

fbgemm (`torch.ops.quantized.linear_dynamic`, x86 CPUs with AVX2 or better) multiplies float
activations by an int8 weight with one scale per output row: it quantizes each activation block to
uint8 on the fly, multiplies in integers and rescales. It is the fastest batch-1 kernel measured on
every CPU here (model/quantize.py), so two layers use it: `Int8Linear` (weights stored int8 per row)
and `Int4Linear`'s "fbgemm" kernel (group-wise int4 weights re-quantized to int8 per row at load, on
CPUs where torch's own int4 kernel loses to it; see model/int4.py).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from scratchgpt.device import cpu_has

# (the operator's C++ entry point, fbgemm's packed weight, reduce_range): what a layer keeps and calls as
# op(x, packed, reduce_range).
FbgemmPack = tuple[Callable, object, bool]


def fbgemm_available() -> bool:
    """Whether this torch ships fbgemm and this CPU runs it (x86 with AVX2 or AVX-512)."""
    return "fbgemm" in torch.backends.quantized.supported_engines and \
        torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def fbgemm_pack(weight: Tensor, scale: Tensor, bias: Tensor | None) -> FbgemmPack:
    """Pack a float weight (out, in) for fbgemm at per-row scales `scale` (out,): q = round(w / s) in int8.

    A weight already on the grid (s ⊙ q, from an int8 layer) packs to exactly its own q.
    """
    out_features = weight.size(0)
    with warnings.catch_warnings():
        # torch warns that quantized tensors are deprecated; one only feeds fbgemm's packing routine,
        # and the models store plain integer + float tensors.
        warnings.simplefilter("ignore")
        qw = torch.quantize_per_channel(weight.float(), scale.double(), torch.zeros(out_features, dtype=torch.long),
                                        0, torch.qint8)
        # clone: the pack keeps a reference to the float32 bias it is given.
        packed = torch.ops.quantized.linear_prepack(qw, None if bias is None else bias.float().clone())
    # `.default._op`: the resolved overload's C++ entry point. The bare packet re-resolves the overload per
    # call, and the Python wrapper re-checks every argument for fake script objects: ~10 µs per call
    # together, ~5% of an int8 decode step at 49 calls per token.
    op = torch.ops.quantized.linear_dynamic.default._op
    # reduce_range avoids int16 overflow in the multiply-add of CPUs without VNNI, at the cost of one bit
    # of activation precision.
    return op, packed, not (cpu_has("avx512_vnni") or cpu_has("avx_vnni"))


def fbgemm_linear(x: Tensor, pack: FbgemmPack) -> Tensor:
    """y = x · Wᵀ + b through fbgemm (the bias was packed with W), for x of shape (..., in) in any float dtype:
    fbgemm takes float32, so other dtypes go through it and back."""
    op, packed, reduce_range = pack
    y = op(x if x.dtype == torch.float32 else x.float(), packed, reduce_range)
    return y if y.dtype == x.dtype else y.to(x.dtype)
