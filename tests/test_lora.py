"""LoRA: adapters start equal to the base, train alone, merge exactly, and save / load on their own."""

from __future__ import annotations

import pytest
import torch

from scratchgpt.checkpoint import load_model, save_hf, save_model
from scratchgpt.config import GPTConfig, LoRAConfig
from scratchgpt.model.gpt import GPT
from scratchgpt.tensor_files import CheckpointError
from scratchgpt.training.lora import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_FILE,
    LoRALinear,
    apply_lora,
    count_parameters,
    load_adapters,
    lora_layers,
    lora_parameters,
    merge_lora,
    save_adapters,
)

CONFIG = GPTConfig(vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                   embd_pdrop=0.0, resid_pdrop=0.0, attn_pdrop=0.0)


def tiny_gpt(seed: int = 0, **overrides) -> GPT:
    config = GPTConfig.from_dict({**CONFIG.to_dict(), **overrides})
    return GPT(config, generator=torch.Generator().manual_seed(seed)).eval()


def tokens(seed: int = 1, shape=(2, 12)) -> torch.Tensor:
    return torch.randint(0, CONFIG.vocab_size, shape, generator=torch.Generator().manual_seed(seed))


def perturb_adapters(model: torch.nn.Module, seed: int = 2) -> None:
    """Give every B a non-zero value, as training would (B starts at zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.05)


def test_adapted_model_starts_equal_to_base_and_keeps_names():
    base = tiny_gpt()
    adapted = tiny_gpt()
    names_before = set(adapted.state_dict())
    wrapped = apply_lora(adapted, LoRAConfig(rank=4, alpha=8))
    assert len(wrapped) == 4 * CONFIG.n_layer  # c_attn, attn.c_proj, c_fc, mlp.c_proj per block
    added = set(adapted.state_dict()) - names_before
    assert names_before <= set(adapted.state_dict())  # the base weights keep their names
    assert added and all(".lora_A" in n or ".lora_B" in n for n in added)
    x = tokens()
    assert torch.equal(base(x)[0], adapted(x)[0])  # B = 0: exactly the base


def test_only_adapters_train_and_counts():
    model = tiny_gpt()
    apply_lora(model, LoRAConfig(rank=4, targets=("attn.c_attn",)))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    # c_attn: A (r, C) + B (3C, r) per block.
    expected = CONFIG.n_layer * (4 * 32 + 3 * 32 * 4)
    assert count_parameters(model)["trainable"] == expected == sum(p.numel() for p in lora_parameters(model))
    loss = model(tokens(), tokens(3))[1]
    loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if ".lora_" not in n)
    # A receives gradient only through B, which is zero at the start; B's gradient is non-zero.
    assert all(layer.lora_B.grad.abs().sum() > 0 for layer in lora_layers(model).values())


@pytest.mark.parametrize("targets", [("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"), ("c_proj", "lm_head")])
def test_merged_logits_equal_adapted_logits(targets):
    model = tiny_gpt()
    apply_lora(model, LoRAConfig(rank=4, alpha=8, targets=targets))
    perturb_adapters(model)
    x = tokens()
    adapted_logits = model(x)[0]
    merge_lora(model)
    assert not lora_layers(model)
    assert (model(x)[0] - adapted_logits).abs().max().item() <= 1e-5


def test_merged_model_is_a_plain_gpt_with_base_names(tmp_path):
    base = tiny_gpt()
    model = tiny_gpt()
    apply_lora(model, LoRAConfig(rank=2, targets=("c_attn", "c_fc", "lm_head")))
    perturb_adapters(model)
    x = tokens()
    expected = model(x)[0]
    merge_lora(model)
    # The LM head got its own update, so it can no longer share the embedding matrix.
    assert model.config.tie_word_embeddings is False
    assert torch.equal(model.transformer.wte.weight, base.transformer.wte.weight)
    assert set(model.state_dict()) == set(base.state_dict())
    save_model(model, tmp_path / "merged")
    loaded, _ = load_model(tmp_path / "merged")
    assert (loaded(x)[0] - expected).abs().max().item() <= 1e-5
    save_hf(model, tmp_path / "hf")  # the one HF name map still applies


def test_adapters_save_small_and_load_onto_the_base(tmp_path):
    model = tiny_gpt()
    apply_lora(model, LoRAConfig(rank=4, alpha=4, dropout=0.1))
    perturb_adapters(model)
    model.eval()
    x = tokens()
    expected = model(x)[0]
    save_adapters(model, tmp_path, base="runs/base")
    meta = (tmp_path / ADAPTER_CONFIG_FILE).read_text()
    assert '"rank": 4' in meta and "runs/base" in meta
    full = sum(t.numel() for t in tiny_gpt().state_dict().values()) * 4
    assert (tmp_path / ADAPTER_FILE).stat().st_size < full / 2

    fresh = tiny_gpt()
    load_adapters(fresh, tmp_path)
    fresh.eval()
    assert torch.equal(fresh(x)[0], expected)
    assert isinstance(fresh.transformer.h[0].attn.c_attn, LoRALinear)


def test_adapters_refuse_another_base(tmp_path):
    model = tiny_gpt()
    apply_lora(model, LoRAConfig(rank=2))
    save_adapters(model, tmp_path)
    with pytest.raises(CheckpointError, match="different base model.*n_embd"):
        load_adapters(tiny_gpt(n_embd=64), tmp_path)


def test_unknown_target_names_the_choices():
    with pytest.raises(ValueError, match=r"'attn\.q_proj' matches no Linear layer.*attn\.c_attn"):
        apply_lora(tiny_gpt(), LoRAConfig(targets=("attn.q_proj",)))


def test_applying_twice_is_refused():
    model = tiny_gpt()
    apply_lora(model, LoRAConfig(rank=2))
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        apply_lora(model, LoRAConfig(rank=2))


def test_lora_config_validation():
    with pytest.raises(ValueError, match="rank"):
        LoRAConfig(rank=0)
    with pytest.raises(ValueError, match="dropout"):
        LoRAConfig(dropout=1.0)
    assert LoRAConfig(rank=8, alpha=16).scaling == 2.0


def test_activation_checkpointing_with_adapters_gives_the_same_gradients():
    """LoRA's own dropout runs inside the recomputed blocks too: its masks replay, so gradients are identical."""
    x = tokens()
    grads = []
    for on in (False, True):
        torch.manual_seed(3)  # the adapters' init and the dropout masks
        model = tiny_gpt(resid_pdrop=0.1, attn_pdrop=0.1).train()
        apply_lora(model, LoRAConfig(rank=4, alpha=8, dropout=0.2))
        perturb_adapters(model)
        model.activation_checkpointing = on
        _, loss = model(x, torch.roll(x, -1, dims=1))
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and all(".lora_" in n for n in grads[0])
    for name, grad in grads[0].items():
        assert torch.equal(grad, grads[1][name]), name


# ---------------------------------------------------------------------------------------------
# A frozen base held in fewer bytes: int8 (QLoRA-style) or bfloat16, adapters in float32
# ---------------------------------------------------------------------------------------------


def _adapted(base_dtype: str, **overrides) -> GPT:
    """tiny_gpt with rank-4 adapters over a `base_dtype` base, B perturbed (the same values for every base)."""
    model = tiny_gpt(**overrides)
    apply_lora(model, LoRAConfig(rank=4, alpha=8, base_dtype=base_dtype), generator=torch.Generator().manual_seed(5))
    perturb_adapters(model)
    return model


def _loss_and_grads(model: GPT, *, autocast: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    x = tokens()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits, loss = model(x, torch.roll(x, -1, dims=1))
    loss.backward()
    return logits.float().detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("kernel", ["reference", "fbgemm"])
def test_int8_base_forward_and_adapter_gradients_track_the_float_base(kernel):
    from scratchgpt.model.quantize import Int8Embedding, Int8Linear, set_kernel

    if kernel == "fbgemm" and "fbgemm" not in torch.backends.quantized.supported_engines:
        pytest.skip("no fbgemm in this PyTorch")
    ref_logits, ref_grads = _loss_and_grads(_adapted("float32"))
    model = _adapted("int8")
    set_kernel(model, kernel)
    # Every matrix of the base is int8 (the tied head shares the embedding's), and only the adapters train.
    assert all(isinstance(m.base, Int8Linear) for m in lora_layers(model).values())
    assert isinstance(model.transformer.wte, Int8Embedding) and model.lm_head.weight is model.transformer.wte.weight
    assert all(p.dtype == torch.float32 for p in lora_parameters(model))
    logits, grads = _loss_and_grads(model)
    # int8 weights are within half a step (max|w|/254 per row) of the float ones; fbgemm also rounds activations.
    assert ((logits - ref_logits).norm() / ref_logits.norm()).item() < (0.01 if kernel == "reference" else 0.03)
    assert grads.keys() == ref_grads.keys() and all(".lora_" in n for n in grads)
    for name, g in grads.items():
        assert ((g - ref_grads[name]).norm() / ref_grads[name].norm()).item() < 0.1, name


def test_int8_base_merges_to_a_float_model_with_the_same_logits(tmp_path):
    from scratchgpt.model.quantize import set_kernel

    model = _adapted("int8", tie_word_embeddings=True).eval()
    set_kernel(model, "reference")  # dequantize-then-matmul: the merged float model computes exactly this
    x = tokens()
    expected = model(x)[0]
    merge_lora(model)
    assert not lora_layers(model) and {p.dtype for p in model.parameters()} == {torch.float32}
    assert model.lm_head.weight is model.transformer.wte.weight  # the head had no adapter: tied again
    assert (model(x)[0] - expected).abs().max().item() < 1e-5
    save_model(model, tmp_path / "merged")  # a plain float run directory
    assert (load_model(tmp_path / "merged")[0](x)[0] - expected).abs().max().item() < 1e-5


def test_bfloat16_base_keeps_float32_adapters_and_merges_exactly():
    float_model, model = _adapted("float32"), _adapted("bfloat16")
    assert {p.dtype for n, p in model.named_parameters() if ".lora_" not in n} == {torch.bfloat16}
    assert {p.dtype for p in lora_parameters(model)} == {torch.float32}
    ref_logits, ref_grads = _loss_and_grads(float_model)
    logits, grads = _loss_and_grads(model, autocast=True)
    assert ((logits - ref_logits).norm() / ref_logits.norm()).item() < 0.02
    for name, g in grads.items():
        assert g.dtype == torch.float32 and ((g - ref_grads[name]).norm() / ref_grads[name].norm()).item() < 0.1
    layer = model.transformer.h[0].attn.c_attn
    expected = layer.weight.float() + layer.delta_weight()  # bf16 base + float32 update, not rounded to bf16
    merge_lora(model)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert torch.equal(model.transformer.h[0].attn.c_attn.weight, expected)
    assert torch.equal(model.transformer.wte.weight, float_model.transformer.wte.weight.bfloat16().float())


def test_int8_base_adapters_save_and_load_onto_the_float_base(tmp_path):
    """The adapter file records the base dtype, so loading re-creates the int8 base it was trained on."""
    model = _adapted("int8").eval()
    x = tokens()
    expected = model(x)[0]
    save_adapters(model, tmp_path)
    fresh = tiny_gpt()
    load_adapters(fresh, tmp_path)
    assert torch.equal(fresh.eval()(x)[0], expected)


def test_int8_base_loss_goes_down_like_the_float_base():
    """A repeating 5-token pattern: adapters over either base learn it (the head's own adapter scales the logits)."""
    x = (torch.arange(17) % 5 + 10).repeat(4, 1)  # (4, 17): inputs x[:, :-1], targets x[:, 1:]
    curves = {}
    for base in ("float32", "int8"):
        model = tiny_gpt().train()
        apply_lora(model, LoRAConfig(rank=4, alpha=8, base_dtype=base, targets=("c_attn", "c_fc", "lm_head")),
                   generator=torch.Generator().manual_seed(0))
        opt = torch.optim.AdamW(lora_parameters(model), lr=3e-2)
        curves[base] = []
        for _ in range(20):
            _, loss = model(x[:, :-1], x[:, 1:])
            loss.backward()
            opt.step()
            opt.zero_grad()
            curves[base].append(loss.item())
    assert curves["int8"][-1] < 0.25 * curves["int8"][0]
    assert abs(curves["int8"][4] - curves["float32"][4]) < 0.05  # the same curve while the updates are large


@pytest.mark.parametrize("base_dtype", ["int8", "bfloat16"])
def test_a_base_loaded_straight_into_bfloat16_is_the_base_a_float32_load_gives(tmp_path, base_dtype):
    """Fine-tuning loads a bf16/int8 base in bfloat16 (no float32 copy of a 1B model in memory); `finetune
    merge` loads the float32 checkpoint. Both must hold the same frozen base, or a merge would not be what
    trained."""
    from scratchgpt.training.lora import base_load_dtype

    save_model(tiny_gpt(), tmp_path / "run")
    config = LoRAConfig(rank=4, base_dtype=base_dtype)
    assert base_load_dtype(config) == torch.bfloat16 and base_load_dtype(LoRAConfig(rank=4)) is None
    straight, _ = load_model(tmp_path / "run", dtype=base_load_dtype(config))
    assert {p.dtype for p in straight.parameters()} == {torch.bfloat16}
    float32, _ = load_model(tmp_path / "run")
    for model in (straight, float32):
        apply_lora(model, config, generator=torch.Generator().manual_seed(0))
    a, b = straight.state_dict(), float32.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    x = tokens()
    assert torch.equal(straight.eval()(x)[0], float32.eval()(x)[0])


def test_int8_base_runs_the_reference_kernel_a_block_of_rows_at_a_time(monkeypatch):
    """The int8 base never builds fbgemm's pack (a second copy of its weights); a weight over BLOCK_BYTES is
    dequantized a block of output rows at a time, forward and backward, with the one-block results."""
    import scratchgpt.model.quantize as quantize

    results = []
    for block_bytes in (quantize.BLOCK_BYTES, 4 * 32 * 7):  # 7 rows of 32 float32 inputs: the head in 14 blocks
        monkeypatch.setattr(quantize, "BLOCK_BYTES", block_bytes)
        model = tiny_gpt(tie_word_embeddings=False).train()
        apply_lora(model, LoRAConfig(rank=4, alpha=8, base_dtype="int8", targets=("c_attn", "c_fc", "lm_head")),
                   generator=torch.Generator().manual_seed(5))
        perturb_adapters(model)
        assert {m.kernel for m in model.modules() if isinstance(m, quantize.Int8Linear)} == {"reference"}
        assert len(model.lm_head.base.row_blocks(torch.float32)) == (1 if block_bytes > 4096 else 14)
        logits, grads = _loss_and_grads(model)
        assert all(m._packed is None for m in model.modules() if isinstance(m, quantize.Int8Linear))
        results.append((logits, grads))
    (logits0, grads0), (logits1, grads1) = results
    assert torch.allclose(logits1, logits0, rtol=1e-5, atol=1e-6)
    for name, grad in grads0.items():
        assert torch.allclose(grads1[name], grad, rtol=1e-5, atol=1e-7), name


def test_int8_base_frees_each_float_matrix_once_it_is_quantized(monkeypatch):
    """Lowering a base to int8 holds the float matrices not yet quantized and no others (a 1B build's peak)."""
    import weakref

    from scratchgpt.model.quantize import Int8Linear

    model = tiny_gpt(tie_word_embeddings=True)
    floats = [weakref.ref(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    alive_at_each_layer = []
    real = Int8Linear.from_linear.__func__

    def counting(cls, linear, **kw):
        alive_at_each_layer.append(sum(ref() is not None for ref in floats))
        return real(cls, linear, **kw)

    monkeypatch.setattr(Int8Linear, "from_linear", classmethod(counting))
    apply_lora(model, LoRAConfig(rank=4, base_dtype="int8"))
    # The 8 block matrices first, each freed as it goes, then the table and the head tied to it.
    assert alive_at_each_layer == list(range(len(floats), 0, -1)) and len(floats) == 9
    assert all(ref() is None for ref in floats)
