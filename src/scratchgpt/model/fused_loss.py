"""The LM head and cross-entropy as one chunked step whose (N, V) logits never exist whole.

At a 1B model's sizes the head is the largest tensor of a training step: Llama-3.2-1B's 128,256-token
vocabulary makes one 512-token sequence's float32 logits 263 MB, and the plain loss keeps several such tensors
(logits, the float32 copy autocast makes, log-probabilities, their gradient), each a fresh mmap'ed allocation
that page-faults in on every step. Measured on Llama-3.2-1B LoRA (bf16, 512 tokens, AMD EPYC Zen 4): the
loss's casts, log-softmax and its backward took ~1.2 s of a 9.4 s step, several times their arithmetic.

`linear_cross_entropy` runs a chunk of tokens at a time: logits of the chunk (in the matmul dtype, then
float32), their log-sum-exp, the loss, and, since the loss is a scalar whose gradient is known up to one
factor, the gradient right away: softmax - one-hot, through the soft-cap if any, back through the head to
the hidden states (and into the head's weight when it trains). The backward pass only scales what the
forward left (by the incoming gradient, 1 / grad_accum_steps). So each token's logits are made once, no
logits are kept for the backward, and the working set is one chunk's. Same loss and gradients as
`F.cross_entropy(softcap(h @ Wᵀ + b))` with ignore_index -100, up to float rounding (tested).

It computes gradients in the forward, so GPT.forward uses it only in a training forward with grad enabled.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

# float32 products run with FLOAT32_ROWS times `rows` tokens a chunk: each chunk streams the whole (V, C) head,
# and MKL's float32 product is slow at few rows. Measured on Llama-3.2-1B's head (128,256 x 2048), 2 threads,
# AMD EPYC Zen 4: 112 GFLOP/s at 130 rows, 141 at 256, 146-191 at 512; bfloat16 ran ~400 at every count.
FLOAT32_ROWS = 4


def fused_chunk_rows(rows: int, dtype_bytes: int) -> int:
    """Tokens a chunk of the fused step holds for products of `dtype_bytes` per value, `rows` being
    `gpt.loss_chunk_rows`'s count (what the training loop runs and the memory estimate counts)."""
    return rows * FLOAT32_ROWS if dtype_bytes == 4 else rows


class _LinearCrossEntropy(torch.autograd.Function):
    """Sum over tokens of cross-entropy(softcap(h Wᵀ + b), targets); the gradients are made in the forward."""

    @staticmethod
    def forward(ctx: Any, h: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, softcap: float | None,
                rows: int, dtype: torch.dtype, grad_into_param: bool) -> Tensor:
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        with torch.autocast(h.device.type, enabled=False):  # the casts below are the ones autocast would make
            w = weight.to(dtype)  # (V, C); no copy when it is already in dtype
            x_all = h.to(dtype)  # (N, C)
            grad_h = torch.empty_like(x_all) if need_h else None
            # The weight's gradient accumulates over chunks in the weight's own dtype, as autograd would sum them.
            grad_w = torch.zeros_like(weight) if need_w else None
            grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=h.device) if need_b else None
            total = torch.zeros((), dtype=torch.float32, device=h.device)
            # One chunk's logits in the matmul dtype and in float32 (the same buffer in float32), made once and
            # reused by every chunk: a fresh (rows, V) tensor per chunk would page-fault in each time (tens of
            # MB, over glibc's mmap threshold).
            n_rows = min(rows, x_all.shape[0])
            low = torch.empty(n_rows, w.shape[0], dtype=dtype, device=h.device)  # (rows, V)
            high = low if dtype == torch.float32 else torch.empty_like(low, dtype=torch.float32)
            for start in range(0, x_all.shape[0], rows):
                x, t = x_all[start:start + rows], targets[start:start + rows]  # (r, C), (r,)
                r = x.shape[0]
                torch.mm(x, w.T, out=low[:r])
                z = high[:r]  # (r, V) logits, float32
                if high is not low:
                    z.copy_(low[:r])
                if bias is not None:
                    z += bias.float()
                tanh = None
                if softcap is not None:
                    tanh = z.div_(softcap).tanh_().clone()  # (the clone keeps tanh for the gradient)
                    z.mul_(softcap)
                valid = t != -100
                picked = z.gather(1, t.clamp(min=0)[:, None]).squeeze(1)  # (r,) logit of the target
                # log-sum-exp in place: z becomes exp(z - max), its row sums give the log-sum-exp.
                top = z.amax(dim=-1)  # (r,)
                z.sub_(top[:, None]).exp_()
                sums = z.sum(dim=-1)  # (r,)
                total += torch.where(valid, sums.log() + top - picked, 0.0).sum()
                if not (need_h or need_w or need_b):
                    continue
                g = z.div_(sums[:, None])  # softmax, in place
                g[torch.arange(r, device=g.device), t.clamp(min=0)] -= 1.0  # minus the one-hot target
                g *= valid[:, None]  # ignored tokens contribute nothing
                if tanh is not None:
                    g *= 1.0 - tanh.square_()  # d(cap·tanh(z/cap))/dz
                if need_b:
                    grad_b += g.sum(0)
                if high is not low:
                    g = low[:r].copy_(g)  # (r, V) in the matmul dtype
                if need_h:
                    torch.mm(g, w, out=grad_h[start:start + rows])  # (r, C)
                if need_w:
                    grad_w.addmm_(g.T.to(weight.dtype), x.to(weight.dtype))  # (V, C) += (V, r) @ (r, C)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.h_dtype, ctx.used = h.dtype, False
        ctx.param = weight if grad_into_param and need_w else None
        return total

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        if ctx.used:
            raise RuntimeError("linear_cross_entropy's backward ran twice (retain_graph): its gradients were made "
                               "once, in the forward; compute the loss again for a second backward")
        ctx.used = True
        grad_h, grad_w, grad_b = ctx.saved_tensors
        # In place: these buffers are this call's own, and a (V, C) copy is the size of the head.
        grad_h = grad_h.mul_(grad_out.to(grad_h.dtype)).to(ctx.h_dtype) if grad_h is not None else None
        grad_w = grad_w.mul_(grad_out.to(grad_w.dtype)) if grad_w is not None else None
        grad_b = grad_b.mul_(grad_out) if grad_b is not None else None
        if ctx.param is not None:  # straight into .grad (see linear_cross_entropy)
            param, ctx.param = ctx.param, None
            if param.grad is None:
                param.grad = grad_w
            else:
                param.grad.add_(grad_w)
            grad_w = None
        return grad_h, grad_w, grad_b, None, None, None, None, None


def linear_cross_entropy(h: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, *,
                         softcap: float | None = None, rows: int, dtype: torch.dtype | None = None,
                         grad_into_param: bool = False) -> Tensor:
    """Mean cross-entropy of logits softcap(h Wᵀ + b) against `targets` (-100 = ignored), `rows` tokens at a time.

    h (N, C) hidden states after the final norm, weight (V, C), bias (V,) or None, targets (N,) int64.
    `dtype` is the matmuls' dtype (autocast's when it is on; default h's); the loss is float32. In float32 the
    chunks are FLOAT32_ROWS times `rows`.

    `grad_into_param`: the backward puts the weight's gradient straight into `weight.grad` (set, or added to
    it) instead of handing it to autograd. Only for a weight (a Parameter) that autograd will still accumulate
    a gradient into later in the same backward pass, as the token embedding tied to the head does (its
    lookup is the last op backwards): that one arrives sparse and autograd adds it to the dense .grad in place.
    Handed to autograd, both would meet in its input buffer, which adds a sparse gradient to a dense one out
    of place: one more (V, C) tensor at the peak (311 MB at Qwen3-0.6B in bf16). Hooks on the parameter then
    run once, when the tied lookup's gradient has been added, with the whole gradient.
    """
    if dtype is None:
        dtype = torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else h.dtype
    rows = fused_chunk_rows(rows, dtype.itemsize)
    total = _LinearCrossEntropy.apply(h, weight, bias, targets, softcap, rows, dtype, grad_into_param)
    return total / (targets != -100).sum()
