"""model/fused_ops.py: RMSNorm and relu² with written-out backward passes, against autograd's own."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from scratchgpt.config import GPTConfig
from scratchgpt.model.fused_ops import relu_squared, rms_norm
from scratchgpt.model.gpt import GPT


def _grads(fn, *inputs: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    leaves = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    y = fn(*leaves)
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=y.dtype))
    return y.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("shape", [(3, 7, 16), (2, 5, 4, 8), (6, 1)])
@pytest.mark.parametrize("with_weight", [True, False])
def test_rms_norm_gradients_pass_gradcheck_in_float64(shape: tuple[int, ...], with_weight: bool) -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(shape[-1], generator=gen, dtype=torch.float64, requires_grad=True) if with_weight else None
    inputs = (x, w) if with_weight else (x,)
    assert torch.autograd.gradcheck(lambda *t: rms_norm(t[0], t[1] if with_weight else None, 1e-6), inputs)


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_rms_norm_matches_autograd_of_f_rms_norm_in_float32(layout: str) -> None:
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(4, 6, 3, 32, generator=gen) * 3 + 1
    if layout == "transposed":  # the (B, nh, T, hs) views attention hands a QK-norm
        x = x.transpose(1, 2)
    x.requires_grad_(True)
    w = (torch.rand(32, generator=gen) + 0.5).requires_grad_(True)
    y_ref, (gx_ref, gw_ref) = _grads(lambda a, b: F.rms_norm(a, (32,), b, 1e-5), x, w)
    y, (gx, gw) = _grads(lambda a, b: rms_norm(a, b, 1e-5), x, w)
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-5, atol=1e-4)
    assert gx.abs().max() > 0.1 and gw.abs().max() > 1.0  # real gradients, not zeros


def test_rms_norm_computes_only_the_gradients_wanted() -> None:
    x = torch.randn(5, 8, requires_grad=True)
    frozen = torch.ones(8)  # a LoRA fine-tune freezes the norms' gains
    rms_norm(x, frozen, 1e-6).sum().backward()
    assert x.grad is not None and frozen.grad is None
    x2 = torch.randn(5, 8)
    w = torch.ones(8, requires_grad=True)
    rms_norm(x2, w, 1e-6).square().sum().backward()
    assert w.grad is not None and x2.grad is None
    with torch.no_grad():  # decoding: the fused forward alone, no graph
        assert rms_norm(x, w, 1e-6).grad_fn is None


def test_relu_squared_gradient_equals_autograd_to_the_bit() -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(64, 129, generator=gen).requires_grad_(True)
    y_ref, (g_ref,) = _grads(lambda a: F.relu(a).square(), x, seed=4)
    y, (g,) = _grads(relu_squared, x, seed=4)
    assert torch.equal(y, y_ref)
    # Where x <= 0 autograd writes +0 and the product 2·0·g may be -0: equal once zeros are normalised.
    assert torch.equal(g + 0.0, g_ref + 0.0)
    assert (g != 0).sum() > 1000
    with torch.no_grad():
        assert torch.equal(relu_squared(x), y_ref)


def test_a_speedrun_shaped_model_trains_with_the_same_gradients_as_autograds_ops(monkeypatch) -> None:
    """RMSNorm (blocks and QK-norm, normalised per head before the heads are transposed) and relu² in a
    whole model: logits and every parameter's gradient as with torch's composite ops."""
    config = GPTConfig(vocab_size=40, n_positions=16, n_embd=32, n_layer=2, n_head=4, norm="rmsnorm",
                       activation="relu2", qk_norm=True, pos_encoding="rope", bias=False, embd_pdrop=0.0,
                       resid_pdrop=0.0, attn_pdrop=0.0)
    model = GPT(config, generator=torch.Generator().manual_seed(5))
    x = torch.randint(0, 40, (3, 16), generator=torch.Generator().manual_seed(6))

    def run() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        logits, loss = model(x, x)
        loss.backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    logits, grads = run()
    import scratchgpt.model.gpt as gpt

    monkeypatch.setattr(gpt, "rms_norm", lambda t, w, eps: F.rms_norm(t, (t.size(-1),), w, eps))
    monkeypatch.setattr(gpt, "relu_squared", lambda t: F.relu(t).square())
    logits_ref, grads_ref = run()
    torch.testing.assert_close(logits, logits_ref, rtol=1e-5, atol=1e-5)
    assert grads.keys() == grads_ref.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-4, atol=1e-5, msg=name)
    assert any("q_norm" in n for n in grads) and all(g.abs().sum() > 0 for g in grads.values())


def test_exported_and_compiled_models_trace_torchs_plain_ops() -> None:
    """torch.export (what the ONNX export runs on) and torch.compile see F.rms_norm and relu: ops every exporter
    knows and the compiler fuses, not the autograd Functions or torch's CPU-only fused RMSNorm."""
    config = GPTConfig(vocab_size=40, n_positions=16, n_embd=32, n_layer=2, n_head=4, norm="rmsnorm",
                       activation="relu2", qk_norm=True, pos_encoding="rope", bias=False, embd_pdrop=0.0,
                       resid_pdrop=0.0, attn_pdrop=0.0)
    model = GPT(config, generator=torch.Generator().manual_seed(5)).eval()
    x = torch.randint(0, 40, (2, 16), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        program = torch.export.export(model, (x,))
        ops = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
        assert "aten.rms_norm.default" in ops and not any("fused_rms_norm" in op for op in ops), ops
        torch.testing.assert_close(program.module()(x)[0], model(x)[0])
    model.train()
    compiled = torch.compile(model, backend="eager")  # dynamo's tracing only: quick
    loss = compiled(x, x)[1]
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    model(x, x)[1].backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-6, msg=name)
