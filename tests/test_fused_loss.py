from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from scratchgpt.model.fused_loss import linear_cross_entropy
from scratchgpt.model.gpt import softcap as apply_softcap


def _inputs(n: int = 37, c: int = 16, v: int = 50, *, dtype=torch.float32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(n, c, generator=gen).to(dtype).requires_grad_()
    w = (0.5 * torch.randn(v, c, generator=gen)).to(dtype).requires_grad_()
    b = (0.1 * torch.randn(v, generator=gen)).requires_grad_()
    t = torch.randint(v, (n,), generator=gen)
    t[3:11] = -100  # an ignored run that crosses a chunk boundary
    return h, w, b, t


def _reference(h, w, b, t, cap):
    logits = F.linear(h, w, b)
    if cap is not None:
        logits = apply_softcap(logits, cap)
    return F.cross_entropy(logits.float(), t, ignore_index=-100)


@pytest.mark.parametrize("cap", [None, 3.0])
@pytest.mark.parametrize("rows", [1, 8, 64])
def test_loss_and_gradients_match_cross_entropy(cap, rows):
    h, w, b, t = _inputs()
    ours = linear_cross_entropy(h, w, b, t, softcap=cap, rows=rows)
    (ours * 0.25).backward()  # a scaled loss (gradient accumulation): the backward scales the forward's gradients
    got = [h.grad, w.grad, b.grad]
    for x in (h, w, b):
        x.grad = None
    ref = _reference(h, w, b, t, cap)
    (ref * 0.25).backward()
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    for g, r in zip(got, [h.grad, w.grad, b.grad], strict=True):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)  # chunked products sum in another order
    assert h.grad[3:11].abs().sum() == 0  # ignored tokens get no gradient


def test_frozen_head_and_no_bias_make_only_the_hidden_gradient():
    h, w, _, t = _inputs()
    w.requires_grad_(False)
    linear_cross_entropy(h, w, None, t, rows=5).backward()
    got = h.grad
    h.grad = None
    _reference(h, w, None, t, None).backward()
    torch.testing.assert_close(got, h.grad, rtol=1e-5, atol=1e-7)
    assert w.grad is None


def test_under_bf16_autocast_it_matches_autocasts_own_loss():
    """float32 weights under bf16 autocast: bf16 products, float32 loss, gradients in the inputs' dtypes."""
    h, w, b, t = _inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = linear_cross_entropy(h, w, b, t, rows=8)
        ref = _reference(h, w, b, t, None)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, rtol=1e-3, atol=1e-3)
    ours.backward()
    got = [h.grad, w.grad, b.grad]
    for x in (h, w, b):
        x.grad = None
    ref.backward()
    for g, r in zip(got, [h.grad, w.grad, b.grad], strict=True):
        assert g.dtype == r.dtype == torch.float32
        torch.testing.assert_close(g, r, rtol=0.05, atol=2e-3)  # bf16 products: ~3 significant digits


def test_bf16_weights_get_bf16_gradients():
    h, w, _, t = _inputs(dtype=torch.bfloat16)
    linear_cross_entropy(h, w, None, t, rows=8).backward()
    assert h.grad.dtype == w.grad.dtype == torch.bfloat16
    ref_h, ref_w = h.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    _reference(ref_h, ref_w, None, t, None).backward()
    torch.testing.assert_close(w.grad.float(), ref_w.grad, rtol=0.05, atol=2e-3)
    torch.testing.assert_close(h.grad.float(), ref_h.grad, rtol=0.05, atol=2e-3)


def test_without_grad_only_the_loss():
    h, w, b, t = _inputs()
    with torch.no_grad():
        loss = linear_cross_entropy(h, w, b, t, rows=4)
    torch.testing.assert_close(loss, _reference(h, w, b, t, None).detach(), rtol=1e-6, atol=1e-6)


def test_a_second_backward_is_refused():
    h, w, b, t = _inputs()
    loss = linear_cross_entropy(h, w, b, t, rows=8)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def test_grad_into_param_sets_or_adds_to_the_weights_grad():
    """The tied-embedding case: the head's gradient goes into weight.grad directly (autograd then adds the
    lookup's sparse gradient to it in place); the sum is the plain loss's gradient."""
    h, w, _, t = _inputs()
    w = torch.nn.Parameter(w.detach())
    idx = torch.randint(w.shape[0], (5,), generator=torch.Generator().manual_seed(3))
    for accumulate in (False, True):
        w.grad = torch.ones_like(w) if accumulate else None
        emb = F.embedding(idx, w, sparse=True).sum()  # used "before" the head, as the token embedding is
        (linear_cross_entropy(h + emb, w, None, t, rows=8, grad_into_param=True)).backward()
        got = w.grad.clone()
        assert got.layout == torch.strided
        w.grad = torch.ones_like(w) if accumulate else None
        emb = F.embedding(idx, w).sum()
        _reference(h + emb, w, None, t, None).backward()
        torch.testing.assert_close(got, w.grad, rtol=1e-5, atol=1e-6)
