"""The textbook formulation (separate q/k/v, hand-written LayerNorm/GELU) computes what GPT computes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

import scratchgpt
from scratchgpt.config import GPTConfig
from scratchgpt.model.gpt import GPT, sinusoidal_table
from scratchgpt.model.textbook import (
    GPT_CONFIG_124M,
    GPTModel,
    config_to_gptconfig,
    gpt_from_textbook,
    gptconfig_to_config,
    textbook_from_gpt,
)

TOL = 1e-5


def tiny_config(**overrides) -> GPTConfig:
    base = dict(vocab_size=61, n_positions=16, n_embd=32, n_layer=2, n_head=4)
    return GPTConfig(**{**base, **overrides})


def tiny_textbook_cfg(**overrides) -> dict:
    small = dict(vocab_size=61, context_length=16, emb_dim=32, n_heads=4, n_layers=2)
    return {**GPT_CONFIG_124M, **small, **overrides}


@torch.no_grad()
def randomize(model: nn.Module, *, seed: int = 0) -> None:
    """Give every parameter (biases and LayerNorms too) random values, so no mapping hides behind zeros."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def tokens(*, seed: int = 0, batch: int = 2, length: int = 12, vocab: int = 61) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("pos_encoding", ["learned", "sinusoidal"])
@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("tied", [True, False])
def test_textbook_from_gpt_same_logits(pos_encoding, per_head, tied):
    torch.manual_seed(0)
    gpt = GPT(tiny_config(pos_encoding=pos_encoding, tie_word_embeddings=tied)).eval()
    randomize(gpt)
    book = textbook_from_gpt(gpt, per_head_attention=per_head).eval()
    idx = tokens()
    with torch.no_grad():
        assert max_diff(book(idx), gpt(idx)[0]) <= TOL
    # The textbook's out_head is its own matrix, even when the GPT shares one.
    assert book.out_head.weight.data_ptr() != book.tok_emb.weight.data_ptr()
    assert all(
        p.data_ptr() != q.data_ptr() for p in book.parameters() for q in gpt.parameters()
    ), "the converted model must hold copies, not views of the original"


@pytest.mark.parametrize("pos_encoding", ["learned", "sinusoidal"])
@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("qkv_bias", [False, True])
def test_gpt_from_textbook_same_logits(pos_encoding, per_head, qkv_bias):
    torch.manual_seed(0)
    cfg = tiny_textbook_cfg(pos_encoding=pos_encoding, per_head_attention=per_head, qkv_bias=qkv_bias)
    book = GPTModel(cfg).eval()
    randomize(book)
    gpt = gpt_from_textbook(book, cfg).eval()
    idx = tokens(seed=1)
    with torch.no_grad():
        assert max_diff(gpt(idx)[0], book(idx)) <= TOL
    assert not gpt.config.tie_word_embeddings  # random out_head differs from tok_emb
    if not qkv_bias:
        # The textbook had no q/k/v biases; the GPT stands in zeros for them.
        assert all(torch.count_nonzero(b.attn.c_attn.bias) == 0 for b in gpt.transformer.h)


def test_gpt_from_textbook_ties_when_out_head_equals_tok_emb():
    torch.manual_seed(0)
    cfg = tiny_textbook_cfg()
    book = GPTModel(cfg)
    with torch.no_grad():
        book.out_head.weight.copy_(book.tok_emb.weight)
    gpt = gpt_from_textbook(book, cfg)
    assert gpt.config.tie_word_embeddings
    assert gpt.lm_head.weight is gpt.transformer.wte.weight


@pytest.mark.parametrize("pos_encoding", ["learned", "sinusoidal"])
@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("tied", [True, False])
def test_round_trip_gpt_textbook_gpt_is_exact(pos_encoding, per_head, tied):
    torch.manual_seed(0)
    gpt = GPT(tiny_config(pos_encoding=pos_encoding, tie_word_embeddings=tied))
    randomize(gpt)
    back = gpt_from_textbook(textbook_from_gpt(gpt, per_head_attention=per_head),
                             gptconfig_to_config(gpt.config, per_head_attention=per_head))
    assert back.config == gpt.config
    before, after = gpt.state_dict(), back.state_dict()
    assert before.keys() == after.keys()
    for name, tensor in before.items():
        assert torch.equal(tensor, after[name]), name


def test_sinusoidal_positions_use_the_shared_table():
    cfg = tiny_textbook_cfg(pos_encoding="sinusoidal")
    book = GPTModel(cfg)
    assert book.pos_emb is None
    assert torch.equal(book.pos_table, sinusoidal_table(16, 32))
    assert not any("pos" in name for name, _ in book.named_parameters())


def test_per_head_variant_holds_a_module_per_head():
    book = GPTModel(tiny_textbook_cfg(per_head_attention=True))
    att = book.trf_blocks[0].att
    assert isinstance(att.heads, nn.ModuleList) and len(att.heads) == 4
    assert att.heads[0].W_query.weight.shape == (8, 32)


def test_textbook_124m_matches_gpt2_parameter_count():
    # The book's 124M model has its own out_head, so it counts as GPT-2 untied.
    with torch.device("meta"):
        book = GPTModel({**GPT_CONFIG_124M, "qkv_bias": True})
    assert sum(p.numel() for p in book.parameters()) == 163_037_184


def test_config_conversions():
    config = config_to_gptconfig(GPT_CONFIG_124M)
    assert (config.n_embd, config.n_layer, config.n_head, config.n_positions) == (768, 12, 12, 1024)
    assert config.bias and config.activation == "gelu" and config.attn_pdrop == 0.1
    cfg = gptconfig_to_config(config, per_head_attention=True)
    assert cfg == {**GPT_CONFIG_124M, "qkv_bias": True, "per_head_attention": True}
    # The book's own dict, without this module's two extra keys, means learned positions, fused heads.
    book_only = {k: v for k, v in GPT_CONFIG_124M.items() if k not in ("pos_encoding", "per_head_attention")}
    assert config_to_gptconfig(book_only) == config


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (dict(bias=False), "bias"),
        (dict(activation="relu"), "activation"),
        (dict(layer_norm_epsilon=1e-6), "layer_norm_epsilon"),
        (dict(attn_pdrop=0.0), "attn_pdrop"),
    ],
)
def test_gptconfig_to_config_refuses_what_the_textbook_cannot_express(overrides, field):
    with pytest.raises(ValueError, match=field):
        gptconfig_to_config(tiny_config(**overrides))


def test_production_code_never_imports_the_textbook():
    package = Path(scratchgpt.__file__).parent
    imports_textbook = re.compile(r"^\s*(from|import)\s.*\btextbook\b", re.MULTILINE)
    production = [p for p in package.glob("*.py") if p.name != "textbook.py"]
    assert [p.name for p in production if imports_textbook.search(p.read_text())] == []


@pytest.mark.parametrize("overrides", [dict(pos_encoding="rope"), dict(norm="rmsnorm"), dict(n_kv_head=2),
                                       dict(n_inner=40), dict(qk_norm=True), dict(logit_softcap=5.0),
                                       dict(head_dim=4), dict(qkv_bias=False)])
def test_family_options_the_book_cannot_express_are_refused(overrides):
    from scratchgpt.model.textbook import gptconfig_to_config

    name = next(iter(overrides))
    with pytest.raises(ValueError, match=name):
        gptconfig_to_config(tiny_config(**overrides))
