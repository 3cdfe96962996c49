"""LoRA: adapters start equal to the base, train alone, merge exactly, and save / load on their own."""

from __future__ import annotations

import pytest
import torch

from scratchgpt.checkpoint import CheckpointError, load_model, save_hf, save_model
from scratchgpt.config import GPTConfig, LoRAConfig
from scratchgpt.model.gpt import GPT
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
