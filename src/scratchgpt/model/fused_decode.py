"""One decode step of a transformer block in one call of scratchgpt's C++ (model/csrc/decode_block.cpp).

A speed trick for batch-1 decoding, kept out of model/gpt.py as `fast_linear` is: the `Block` calls
`block.decode_step(x, kv, start, rope)` when it is set and the call is one new token of one sequence with a
KV cache and no mask; `fuse_decode_steps(model)` sets it. The step runs only where every one of the block's
four products already runs on scratchgpt's kernels (float `Linear` with `native` on, int8 and int4 layers
on kernel "native") and the block's parts are ones the C++ computes: LayerNorm or RMSNorm; GELU (tanh or
erf), SwiGLU or relu²; RoPE or none; QK-norm (RMSNorm per head) or none; anywhere else it returns None and
the block runs its modules. So the products and their numbers are the ones the layers compute; what
changes is the ~25 small tensor operations between them (norms, heads, RoPE, the cache write, attention,
the activation, the residual adds), which at GPT-2 124M cost 3-6 ms a token on the Intel Xeon here
against ~18 ms of weight streaming (see the C++ file). Results equal the modules' up to float rounding.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from scratchgpt.model.fast_linear import Linear
from scratchgpt.model.gpt import GELU, GPT, Block, LayerNorm, ReLUSquared, RMSNorm, SwiGLU
from scratchgpt.model.int4 import Int4Linear
from scratchgpt.model.native import INT4_COLUMNS, INT8_COLUMNS, native_kernels
from scratchgpt.model.quantize import Int8Linear

_NONE = torch.empty(0)  # stands for a missing bias (the C++ side takes a list of tensors)


def _layer_args(layer: nn.Module) -> tuple[Tensor, Tensor, Tensor, int] | None:
    """(weight, scale, bias, group) as decode_block.cpp takes one product, or None where the layer does not
    run on scratchgpt's kernels now."""
    bias = layer.bias if getattr(layer, "bias", None) is not None else _NONE
    if type(layer) is Linear:
        w = layer.weight
        ok = layer.native and w.is_contiguous() and w.dtype in (torch.float32, torch.bfloat16)
        return (w, _NONE, bias, 0) if ok else None
    if type(layer) is Int8Linear:
        ok = layer.kernel == "native" and layer.in_features % INT8_COLUMNS == 0
        return (layer.weight, layer.weight_scale, bias, 0) if ok else None
    if type(layer) is Int4Linear:
        ok = layer.kernel == "native" and layer.in_features % INT4_COLUMNS == 0
        return (layer.weight, layer.weight_scale, bias, layer.group_size) if ok else None
    return None


def _activation_code(act: nn.Module) -> int | None:
    """decode_block.cpp's code for the MLP's activation, or None where it has none."""
    if type(act) is GELU:
        return 0
    if type(act) is nn.GELU:
        return 1 if act.approximate == "none" else 0
    return {SwiGLU: 2, ReLUSquared: 3}.get(type(act))


def _block_shape(block: Block) -> tuple[bool, int, Tensor, Tensor, float] | None:
    """(RMSNorm?, activation code, q_norm weight, k_norm weight, QK-norm eps) where decode_block.cpp computes
    the block's parts (two LayerNorms or two RMSNorms, a known activation, QK-norm as RMSNorm or none), or None."""
    norms = {type(block.ln_1), type(block.ln_2)}
    act = _activation_code(block.mlp.act)
    if norms not in ({LayerNorm}, {RMSNorm}) or act is None:
        return None
    attn = block.attn
    if attn.q_norm is None:
        return norms == {RMSNorm}, act, _NONE, _NONE, 0.0
    if type(attn.q_norm) is not RMSNorm or type(attn.k_norm) is not RMSNorm or attn.q_norm.eps != attn.k_norm.eps:
        return None
    return norms == {RMSNorm}, act, attn.q_norm.weight, attn.k_norm.weight, attn.q_norm.eps


def block_decode(block: Block, x: Tensor, kv: tuple[Tensor, Tensor], start: int,
                 rope: tuple[Tensor, Tensor] | None = None) -> Tensor | None:
    """The block's output for x (1, 1, C), its cache written at `start` (RoPE's (cos, sin) for this position
    when the model rotates); None where it cannot run here."""
    kernels = native_kernels()
    if kernels is None or block.training or not x.is_cpu:
        return None
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in block.parameters())):
        return None  # no backward in C++: a step that needs gradients runs the modules
    attn, mlp = block.attn, block.mlp
    layers = [_layer_args(m) for m in (attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj)]
    shape = _block_shape(block)
    if any(a is None for a in layers) or shape is None:
        return None
    cos, sin = rope if rope is not None else (_NONE, _NONE)
    if rope is not None and (cos.numel() != attn.head_size or sin.numel() != attn.head_size):
        return None  # (one position of one sequence only)
    rms, act, q_norm, k_norm, qk_eps = shape
    ln_1, ln_2 = block.ln_1, block.ln_2
    bias_1, bias_2 = getattr(ln_1, "bias", None), getattr(ln_2, "bias", None)
    params = [ln_1.weight, _NONE if bias_1 is None else bias_1, *layers[0][:3], *layers[1][:3],
              ln_2.weight, _NONE if bias_2 is None else bias_2, *layers[2][:3], *layers[3][:3]]
    return kernels.block_decode(x, params, [a[3] for a in layers], kv[0], kv[1], start, attn.n_head, ln_1.eps,
                                ln_2.eps, rms, act, cos.reshape(-1), sin.reshape(-1), q_norm, k_norm, qk_eps)


def fuse_decode_steps(model: GPT, on: bool = True) -> None:
    """Give every block of `model` the one-call decode step (or, with `on` False, take it away)."""
    for block in model.transformer.h:
        block.decode_step = functools.partial(block_decode, block) if on else None
