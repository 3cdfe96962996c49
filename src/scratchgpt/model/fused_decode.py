"""One decode step of all transformer blocks in one call of scratchgpt's C++ (model/csrc/decode_block.cpp).

A speed trick for batch-1 decoding, kept out of model/gpt.py as `fast_linear` is: `GPT.hidden_states` calls
`model.decode_step(x, cache, start, rope)` when it is set and the call is new tokens of one sequence after a
KV cache, no padding mask (`stack_decode` takes up to native.MAX_ROWS of them); `fuse_decode_steps(model)`
sets it. The step runs only where every block's four products already run on scratchgpt's kernels (float
`Linear` with `native` on, int8 and int4 layers on kernel "native") and the blocks' parts are ones the C++
computes, the same kind in every block: LayerNorm or RMSNorm; GELU (tanh or erf), SwiGLU or relu²; RoPE or
none; QK-norm (RMSNorm per head) or none; anywhere else it returns None and the blocks run their modules. So
the products and their numbers are the ones the layers compute; what changes is the ~25 small tensor
operations a block between them (norms, heads, RoPE, the cache write, attention, the activation, the residual
adds), which at GPT-2 124M cost 3-6 ms a token on the Intel Xeon here against ~18 ms of weight streaming, and
the Python around a call per block (~1 ms a token: see the C++ file). Results equal the modules' up to float
rounding (bf16 models: the residual stream stays float32 from the first block to the last).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from scratchgpt.model.fast_linear import Linear
from scratchgpt.model.gpt import GELU, GPT, Block, KVCache, LayerNorm, ReLUSquared, RMSNorm, SwiGLU
from scratchgpt.model.int4 import Int4Linear
from scratchgpt.model.native import INT4_COLUMNS, INT8_COLUMNS, MAX_ROWS, native_kernels
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


def _block_args(block: Block) -> tuple[list[Tensor], list[int], tuple[float, float], tuple[Tensor, Tensor],
                                       tuple[bool, int, float]] | None:
    """What decode_block.cpp takes for one block: its 16 tensors, 4 group sizes, the norms' epsilons, the
    QK-norm weights and (RMSNorm?, activation code, QK-norm eps); None where the block cannot run there."""
    if block.training:
        return None
    attn, mlp = block.attn, block.mlp
    layers = [_layer_args(m) for m in (attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj)]
    shape = _block_shape(block)
    if any(a is None for a in layers) or shape is None:
        return None
    rms, act, q_norm, k_norm, qk_eps = shape
    ln_1, ln_2 = block.ln_1, block.ln_2
    bias_1, bias_2 = getattr(ln_1, "bias", None), getattr(ln_2, "bias", None)
    # The norms' vectors as float32 (the C++ side computes in float32; a bf16 model's would otherwise be
    # converted there at every step: kept once per generation with the step memo).
    f32 = [_NONE if t is None else t.float() for t in (ln_1.weight, bias_1, ln_2.weight, bias_2, q_norm, k_norm)]
    params = [f32[0], f32[1], *layers[0][:3], *layers[1][:3], f32[2], f32[3], *layers[2][:3], *layers[3][:3]]
    return params, [a[3] for a in layers], (ln_1.eps, ln_2.eps), (f32[4], f32[5]), (rms, act, qk_eps)


StackArgs = tuple[list[Tensor], list[int], list[float], list[Tensor], tuple[bool, int, float]]


def _stack_args(model: GPT) -> StackArgs | None:
    """Every block's arguments for decode_block.cpp, in one list each, and their kind (RMSNorm?, activation
    code, QK-norm eps); None where a block cannot run there or the blocks differ in kind."""
    params: list[Tensor] = []
    groups: list[int] = []
    eps: list[float] = []
    qk_norms: list[Tensor] = []
    kind = None
    for block in model.transformer.h:
        args = _block_args(block)
        if args is None:
            return None
        block_params, block_groups, block_eps, block_qk, block_kind = args
        if kind is not None and block_kind != kind:
            return None  # every block in C++ or none (one kind of norm and activation for all)
        params += block_params
        groups += block_groups
        eps += block_eps
        qk_norms += block_qk
        kind = block_kind
    return None if kind is None else (params, groups, eps, qk_norms, kind)


def stack_decode(model: GPT, x: Tensor, cache: KVCache, start: int,
                 rope: tuple[Tensor, Tensor] | None = None) -> Tensor | None:
    """The residual stream after every block for x (1, T, C), T new tokens of one sequence after `start` cached
    ones (causal), each layer's cache written at start .. start + T - 1 (RoPE's (cos, sin), (T, hs), for those
    positions when the model rotates); None where it cannot run here (the blocks run).

    T is at most native.MAX_ROWS (4): the products then read each weight once for all T rows, as the layers'
    own products do for so few rows (a decoding token: T = 1; a speculative check of up to 3 guesses; a short
    prompt). More rows, a prefill or a longer check, run the modules (their matrix products).

    The blocks' arguments are gathered from the modules at every call, except for a cache with a `step_memo`
    (one generation's own): there at its first call only. Gathering walks ~50 modules' attributes: 0.4 ms a
    token at GPT-2 124M, once the token's weights have pushed the interpreter's data out of the caches; keeping
    them made decoding 3% (float32) and 8% (bf16) faster on the Intel Xeon here."""
    kernels = native_kernels()
    T = x.size(1) if x.dim() == 3 else 0
    if kernels is None or not x.is_cpu or x.size(0) != 1 or not 1 <= T <= MAX_ROWS:
        return None
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in model.transformer.h.parameters())):
        return None  # no backward in C++: a step that needs gradients runs the modules
    cos, sin = rope if rope is not None else (_NONE, _NONE)
    rope_size = T * model.config.head_size
    if rope is not None and (cos.numel() != rope_size or sin.numel() != rope_size):
        return None  # (angles for these positions of one sequence only)
    memo = cache.step_memo
    if memo is not None and memo.get("model") is model:
        args = memo["blocks"]
    else:
        args = _stack_args(model)
        if memo is not None:
            memo.update(model=model, blocks=args)
    if args is None:
        return None
    params, groups, eps, qk_norms, (rms, act, qk_eps) = args
    return kernels.blocks_decode(x, params, groups, cache.k, cache.v, start, model.config.n_head, eps, rms, act,
                                 cos, sin, qk_norms, qk_eps)


def fuse_decode_steps(model: GPT, on: bool = True) -> None:
    """Give `model` the one-call decode step of its blocks (or, with `on` False, take it away)."""
    model.decode_step = functools.partial(stack_decode, model) if on else None
