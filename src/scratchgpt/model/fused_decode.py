"""One decode step of a GPT-2 block in one call of scratchgpt's C++ (model/csrc/decode_block.cpp).

A speed trick for batch-1 decoding, kept out of model/gpt.py as `fast_linear` is: the `Block` calls
`block.decode_step(x, kv, start)` when it is set and the call is one new token of one sequence with a KV
cache (no mask, no RoPE); `fuse_decode_steps(model)` sets it. The step runs only where every one of the
block's four products already runs on scratchgpt's kernels (float `Linear` with `native` on, int8 and int4
layers on kernel "native") and the block is GPT-2's shape (LayerNorm, GELU, no QK-norm); anywhere else it
returns None and the block runs its modules. So the products and their numbers are the ones the layers
compute; what changes is the ~25 small tensor operations between them (norms, heads, the cache write,
attention, GELU, the residual adds), which at GPT-2 124M cost 3-6 ms a token on the Intel Xeon here
against ~18 ms of weight streaming (see the C++ file). Results equal the modules' up to float rounding.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from scratchgpt.model.fast_linear import Linear
from scratchgpt.model.gpt import GELU, GPT, Block, LayerNorm
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


def _gpt2_shaped(block: Block) -> bool:
    """LayerNorms, GELU (tanh or exact), no QK-norm: what decode_block.cpp computes."""
    act = block.mlp.act
    gelu = type(act) is GELU or (type(act) is nn.GELU and act.approximate == "none")
    return type(block.ln_1) is LayerNorm and type(block.ln_2) is LayerNorm and gelu and block.attn.q_norm is None


def block_decode(block: Block, x: Tensor, kv: tuple[Tensor, Tensor], start: int) -> Tensor | None:
    """The block's output for x (1, 1, C), its cache written at `start`; None where it cannot run here."""
    kernels = native_kernels()
    if kernels is None or block.training or not x.is_cpu:
        return None
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in block.parameters())):
        return None  # no backward in C++: a step that needs gradients runs the modules
    attn, mlp = block.attn, block.mlp
    layers = [_layer_args(m) for m in (attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj)]
    if any(a is None for a in layers) or not _gpt2_shaped(block):
        return None
    ln_1, ln_2 = block.ln_1, block.ln_2
    params = [ln_1.weight, ln_1.bias if ln_1.bias is not None else _NONE, *layers[0][:3], *layers[1][:3],
              ln_2.weight, ln_2.bias if ln_2.bias is not None else _NONE, *layers[2][:3], *layers[3][:3]]
    return kernels.gpt2_block_decode(x, params, [a[3] for a in layers], kv[0], kv[1], start, attn.n_head,
                                     ln_1.eps, ln_2.eps, type(mlp.act) is nn.GELU)


def fuse_decode_steps(model: GPT, on: bool = True) -> None:
    """Give every block of `model` the one-call decode step (or, with `on` False, take it away)."""
    for block in model.transformer.h:
        block.decode_step = functools.partial(block_decode, block) if on else None
