"""RMSNorm and relu² with hand-written backward passes: fewer trips over the activations on the CPU.

Why: on the CPU, PyTorch computes `F.rms_norm` and `relu(x).square()` as chains of small element-wise
ops, and autograd differentiates each link: RMSNorm's forward and backward make ~15 passes over a
(B, T, C) tensor (a fused LayerNorm makes ~3), relu² makes 6. In the small models these recipes train
(the speedrun: RMSNorm 17 times and relu² 4 times a step), those passes, not the matrix products, are a
fifth of a step. Here the forward is one fused kernel where torch has one (`aten::_fused_rms_norm`, which
has no CPU backward), and the backward is written out with the fewest passes the formulas allow.

The gradients are the same functions, computed in a different order: equal to autograd's up to
float32 rounding (tests/test_fused_ops.py checks them in float64 with `gradcheck` and against autograd
in float32). RMSNorm takes this path for float32 on the CPU only (CUDA has its own fused backward, and
other dtypes keep the float32 upcast model/gpt.py does); relu² takes it everywhere gradients flow. Under
torch.compile and torch.export the modules keep torch's plain ops (the compiler fuses them; exporters know
them). Pure `torch`, like the rest of the model package.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable


def _rms_norm_forward(x: Tensor, weight: Tensor | None, eps: float) -> tuple[Tensor, Tensor]:
    """(y, rstd): y = x · rstd · weight with rstd = 1/sqrt(mean(x²) + eps) over the last dim, (..., 1)."""
    return torch.ops.aten._fused_rms_norm(x, [x.size(-1)], weight, eps)


class _RMSNorm(torch.autograd.Function):
    """y = x̂ · w, x̂ = x · r, r = 1/sqrt(mean(x²) + eps) over the last dim (C channels).

    Backward, with g = dL/dy:  dL/dw = Σ_rows g · x̂,   dL/dx = r · (g·w − x̂ · mean_C(g·w·x̂)).
    The row sums mean_C(g·w·x̂) are (g·x̂) @ w: one matrix-vector product over the product dL/dw needs too.
    """

    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
        y, rstd = _rms_norm_forward(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        x, weight, rstd = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[0], weight is not None and ctx.needs_input_grad[1]
        x_hat = x * rstd  # (..., C)
        g_x_hat = grad * x_hat  # (..., C): dL/dw before the sum over rows
        grad_w = g_x_hat.flatten(0, -2).sum(0) if need_w else None  # (C,)
        grad_x = None
        if need_x:
            C = x.size(-1)
            if weight is None:
                row = g_x_hat.sum(-1, keepdim=True)  # (..., 1)
                gw = grad.clone()
            else:
                row = (g_x_hat @ weight).unsqueeze(-1)  # (..., 1): Σ_c g·w·x̂
                gw = grad * weight
            grad_x = gw.addcmul_(x_hat, row, value=-1.0 / C).mul_(rstd)  # r · (g·w − x̂ · mean)
        return grad_x, grad_w, None


def rms_norm(x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    """RMSNorm over the last dim of a float32 CPU tensor: torch's fused forward, the backward above.

    Without gradients (decoding, evaluation) it is the fused forward alone: one pass instead of F.rms_norm's
    chain of small ops.
    """
    if torch.is_grad_enabled() and (x.requires_grad or (weight is not None and weight.requires_grad)):
        return _RMSNorm.apply(x, weight, eps)
    return _rms_norm_forward(x, weight, eps)[0]


class _ReLUSquared(torch.autograd.Function):
    """y = relu(x)²; dL/dx = 2 · relu(x) · g (zero where x ≤ 0): one saved tensor, two passes back."""

    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor) -> Tensor:
        r = F.relu(x)
        ctx.save_for_backward(r)
        return r * r

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: Tensor) -> Tensor:
        (r,) = ctx.saved_tensors
        return torch.mul(r, 2.0).mul_(grad)  # 2·r exactly, then times g: autograd's grad · (2·r), same order


def relu_squared(x: Tensor) -> Tensor:
    """relu(x)² with the two-pass backward above where gradients flow; two plain ops where they do not."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _ReLUSquared.apply(x)
    r = F.relu(x)
    return r * r
