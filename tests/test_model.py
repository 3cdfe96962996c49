"""GPTConfig validation and the GPT module: sizes, init, attention paths, KV cache, padding."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from scratchgpt.config import GPTConfig
from scratchgpt.model.gpt import GPT, KVCache

TOL = 1e-5


def tiny_config(**overrides) -> GPTConfig:
    base = dict(vocab_size=53, n_positions=24, n_embd=32, n_layer=2, n_head=4)
    return GPTConfig(**{**base, **overrides})


def tiny_model(*, attn_impl: str = "sdpa", seed: int = 0, **overrides) -> GPT:
    """A small GPT in eval mode with non-zero biases, so padding and cache bugs cannot hide behind zeros."""
    model = GPT(tiny_config(**overrides), attn_impl=attn_impl, generator=torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def tokens(batch: int, length: int, *, seed: int = 0, vocab: int = 53) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# ---------------------------------------------------------------------------------------------
# GPTConfig
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (dict(n_embd=30, n_head=4), "n_embd"),
        (dict(embd_pdrop=1.0), "embd_pdrop"),
        (dict(resid_pdrop=-0.1), "resid_pdrop"),
        (dict(attn_pdrop=1.5), "attn_pdrop"),
        (dict(pos_encoding="rotary"), "pos_encoding"),
        (dict(activation="swish"), "activation"),
        (dict(n_layer=0), "n_layer"),
    ],
)
def test_config_validation_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        tiny_config(**overrides)


def test_unknown_preset_is_refused():
    with pytest.raises(ValueError, match="gpt3"):
        GPTConfig.from_name("gpt3")


def test_config_dict_round_trip():
    config = tiny_config(pos_encoding="sinusoidal", activation="relu", bias=False)
    assert GPTConfig.from_dict(config.to_dict()) == config


# ---------------------------------------------------------------------------------------------
# Sizes (meta device: no memory, no init)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "tied", "expected"),
    [
        ("gpt2", True, 124_439_808),
        ("gpt2", False, 163_037_184),
        ("gpt2-medium", True, 354_823_168),
        ("gpt2-large", True, 774_030_080),
        ("gpt2-xl", True, 1_557_611_200),
    ],
)
def test_parameter_counts(name, tied, expected):
    model = GPT(GPTConfig.from_name(name, tie_word_embeddings=tied), device="meta")
    assert model.num_parameters() == expected


def test_sinusoidal_model_has_no_position_parameters():
    model = GPT(tiny_config(pos_encoding="sinusoidal"))
    assert not any(name.startswith("transformer.wpe") for name, _ in model.named_parameters())
    learned = GPT(tiny_config())
    assert learned.num_parameters() - model.num_parameters() == 24 * 32  # exactly the wpe table


# ---------------------------------------------------------------------------------------------
# Forward and loss
# ---------------------------------------------------------------------------------------------


def test_forward_shapes_and_loss():
    torch.manual_seed(0)
    model = tiny_model()
    idx, targets = tokens(3, 10), tokens(3, 10, seed=1)
    logits, loss = model(idx)
    assert logits.shape == (3, 10, 53) and loss is None
    logits, loss = model(idx, targets)
    assert loss.shape == () and torch.isfinite(loss)
    # An untrained model is close to uniform: loss near ln(V).
    assert abs(loss.item() - math.log(53)) < 0.5
    last, _ = model(idx, last_token_only=True)
    assert last.shape == (3, 1, 53)
    assert max_diff(last[:, 0], logits[:, -1]) <= TOL


def test_loss_ignores_minus_100_targets():
    torch.manual_seed(0)
    model = tiny_model()
    idx, targets = tokens(2, 8), tokens(2, 8, seed=1)
    masked = targets.clone()
    masked[0, :3] = -100
    masked[1, 5] = -100
    logits, loss = model(idx, masked)
    keep = masked != -100
    expected = F.cross_entropy(logits[keep], targets[keep])
    assert torch.allclose(loss, expected, atol=1e-6)


def test_too_long_sequence_is_refused():
    torch.manual_seed(0)
    model = tiny_model()
    with pytest.raises(ValueError, match="n_positions"):
        model(tokens(1, 25))


def test_relu_activation():
    torch.manual_seed(0)
    relu = tiny_model(activation="relu")
    assert isinstance(relu.transformer.h[0].mlp.act, nn.ReLU)
    gelu = tiny_model(activation="gelu")  # same seed, so the same weights
    idx = tokens(2, 6)
    relu_logits, gelu_logits = relu(idx)[0], gelu(idx)[0]
    assert torch.isfinite(relu_logits).all()
    assert max_diff(relu_logits, gelu_logits) > 1e-4


def test_dropout_active_in_train_mode_only():
    torch.manual_seed(0)
    model = tiny_model(embd_pdrop=0.2, resid_pdrop=0.2, attn_pdrop=0.2)
    idx = tokens(2, 8)
    with torch.no_grad():
        assert torch.equal(model(idx)[0], model(idx)[0])
        model.train()
        assert not torch.equal(model(idx)[0], model(idx)[0])


# ---------------------------------------------------------------------------------------------
# Initialisation
# ---------------------------------------------------------------------------------------------


def test_init_statistics():
    torch.manual_seed(0)
    config = tiny_config(n_embd=64, n_layer=4, n_head=4)
    model = GPT(config, generator=torch.Generator().manual_seed(0))
    proj_std = 0.02 / math.sqrt(2 * config.n_layer)
    for name, p in model.named_parameters():
        if name.endswith("c_proj.weight"):
            assert p.std().item() == pytest.approx(proj_std, rel=0.1), name
        elif name.endswith(("c_attn.weight", "c_fc.weight", "wte.weight", "wpe.weight")):
            assert p.std().item() == pytest.approx(0.02, rel=0.1), name
        elif name.endswith("bias"):
            assert torch.count_nonzero(p) == 0, name
        elif "ln_" in name:
            assert torch.equal(p, torch.ones_like(p)), name
    assert model.lm_head.weight is model.transformer.wte.weight


def test_seeded_init_is_reproducible():
    config = tiny_config()
    a = GPT(config, generator=torch.Generator().manual_seed(7))
    b = GPT(config, generator=torch.Generator().manual_seed(7))
    c = GPT(config, generator=torch.Generator().manual_seed(8))
    for (name, pa), pb, pc in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values(),
                                  strict=True):
        assert torch.equal(pa, pb), name
        if name.endswith("weight") and "ln_" not in name:
            assert not torch.equal(pa, pc), name


# ---------------------------------------------------------------------------------------------
# Attention implementations
# ---------------------------------------------------------------------------------------------


def test_sdpa_and_eager_agree():
    torch.manual_seed(0)
    model = tiny_model()
    idx = tokens(2, 12)
    with torch.no_grad():
        sdpa = model(idx)[0]
        model.set_attn_impl("eager")
        eager = model(idx)[0]
    assert max_diff(sdpa, eager) <= TOL
    with pytest.raises(ValueError, match="attn_impl"):
        model.set_attn_impl("flash")


def test_eager_attention_weights_are_causal_and_normalised():
    torch.manual_seed(0)
    model = tiny_model(attn_impl="eager")
    x = torch.randn(2, 9, 32)
    _, weights = model.transformer.h[0].attn(x, return_weights=True)
    assert weights.shape == (2, 4, 9, 9)
    assert torch.count_nonzero(torch.triu(weights, diagonal=1)) == 0
    assert torch.allclose(weights.sum(-1), torch.ones(2, 4, 9), atol=1e-6)


# ---------------------------------------------------------------------------------------------
# KV cache and left padding
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attn_impl", ["sdpa", "eager"])
@pytest.mark.parametrize("pos_encoding", ["learned", "sinusoidal"])
def test_kv_cache_one_token_at_a_time_matches_full_forward(attn_impl, pos_encoding):
    torch.manual_seed(0)
    model = tiny_model(attn_impl=attn_impl, pos_encoding=pos_encoding)
    idx = tokens(2, 11)
    with torch.no_grad():
        full = model(idx)[0]
        cache = KVCache.empty(model.config, batch_size=2)
        steps = [model(idx[:, :5], kv_cache=cache)[0]]
        steps += [model(idx[:, t : t + 1], kv_cache=cache)[0] for t in range(5, 11)]
    assert cache.length == 11
    assert max_diff(torch.cat(steps, dim=1), full) <= TOL


@pytest.mark.parametrize("attn_impl", ["sdpa", "eager"])
def test_kv_cache_multi_token_chunks_match_full_forward(attn_impl):
    # Several new tokens after a cached prefix must still be causal among themselves.
    torch.manual_seed(0)
    model = tiny_model(attn_impl=attn_impl)
    idx = tokens(2, 12)
    with torch.no_grad():
        full = model(idx)[0]
        cache = KVCache.empty(model.config, batch_size=2, max_len=12)
        chunks = [model(idx[:, a:b], kv_cache=cache)[0] for a, b in ((0, 4), (4, 9), (9, 12))]
    assert max_diff(torch.cat(chunks, dim=1), full) <= TOL


def test_kv_cache_overflow_is_refused():
    torch.manual_seed(0)
    model = tiny_model()
    cache = KVCache.empty(model.config, batch_size=1, max_len=4)
    with torch.no_grad():
        model(tokens(1, 4), kv_cache=cache)
        with pytest.raises(ValueError, match="KV cache"):
            model(tokens(1, 1), kv_cache=cache)


def left_pad(rows: list[torch.Tensor], *, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(idx, attention_mask, position_ids) for rows left-padded to the longest."""
    T = max(len(r) for r in rows)
    idx = torch.full((len(rows), T), pad_id)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        idx[i, T - len(r) :] = r
        mask[i, T - len(r) :] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return idx, mask, position_ids


@pytest.mark.parametrize("attn_impl", ["sdpa", "eager"])
def test_left_padded_batch_matches_each_row_alone(attn_impl):
    torch.manual_seed(0)
    model = tiny_model(attn_impl=attn_impl)
    rows = [tokens(1, n, seed=n)[0] for n in (5, 9, 2)]
    idx, mask, position_ids = left_pad(rows)
    next_ids = tokens(3, 1, seed=99)
    with torch.no_grad():
        batched = model(idx, attention_mask=mask, position_ids=position_ids)[0][:, -1]
        # Then one decode step through the cache, as generation does.
        cache = KVCache.empty(model.config, batch_size=3)
        model(idx, attention_mask=mask, position_ids=position_ids, kv_cache=cache)
        next_pos = position_ids[:, -1:] + 1
        decoded = model(next_ids, kv_cache=cache, position_ids=next_pos)[0][:, -1]
        for i, row in enumerate(rows):
            alone = model(row[None])[0][0, -1]
            assert max_diff(batched[i], alone) <= TOL, f"row {i}"
            alone_next = model(torch.cat([row, next_ids[i]])[None])[0][0, -1]
            assert max_diff(decoded[i], alone_next) <= TOL, f"row {i} after one decode step"


# ---------------------------------------------------------------------------------------------
# The model family: RoPE, RMSNorm, SwiGLU / ReLU², grouped-query attention, QK-norm, soft-cap
# ---------------------------------------------------------------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from scratchgpt.config import SamplingConfig  # noqa: E402
from scratchgpt.inference.generate import generate  # noqa: E402
from scratchgpt.model.gpt import RMSNorm, RotaryEmbedding, apply_rotary, softcap  # noqa: E402


def randomise(model: GPT, seed: int) -> GPT:
    """Every parameter (norm gains and zero-initialised projections too) drawn at random, so no
    option can pass a test by contributing zeros or ones."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


def test_family_config_validation():
    with pytest.raises(ValueError, match="n_kv_head"):
        tiny_config(n_head=4, n_kv_head=3)
    with pytest.raises(ValueError, match="head size"):
        tiny_config(pos_encoding="rope", n_embd=30, n_head=2, head_dim=15)
    with pytest.raises(ValueError, match="norm"):
        tiny_config(norm="batchnorm")
    with pytest.raises(ValueError, match="logit_softcap"):
        tiny_config(logit_softcap=0.0)
    config = tiny_config(pos_encoding="rope", norm="rmsnorm", activation="swiglu", n_kv_head=2, head_dim=6,
                         n_inner=40, qk_norm=True, qkv_bias=True, bias=False, rope_scaling_factor=8.0,
                         rope_original_n_positions=16, logit_softcap=15.0, zero_init=True)
    assert GPTConfig.from_dict(config.to_dict()) == config


def test_old_config_json_still_loads_as_gpt2():
    old = dict(vocab_size=53, n_positions=24, n_embd=32, n_layer=2, n_head=4, embd_pdrop=0.1, resid_pdrop=0.1,
               attn_pdrop=0.1, layer_norm_epsilon=1e-5, initializer_range=0.02, bias=True,
               tie_word_embeddings=True, pos_encoding="learned", activation="gelu")
    config = GPTConfig.from_dict(old)
    assert (config.norm, config.kv_heads, config.head_size, config.mlp_hidden) == ("layernorm", 4, 8, 128)


def test_family_parameter_shapes():
    config = tiny_config(pos_encoding="rope", norm="rmsnorm", activation="swiglu", n_head=3, n_kv_head=1,
                         n_embd=30, head_dim=8, n_inner=20, qk_norm=True, qkv_bias=True, bias=False,
                         tie_word_embeddings=False)
    shapes = {n: tuple(p.shape) for n, p in GPT(config, device="meta").named_parameters()}
    assert shapes["transformer.h.0.attn.c_attn.weight"] == ((3 + 2 * 1) * 8, 30)
    assert shapes["transformer.h.0.attn.c_attn.bias"] == (40,)
    assert shapes["transformer.h.0.attn.c_proj.weight"] == (30, 24)
    assert shapes["transformer.h.0.attn.q_norm.weight"] == (8,)
    assert shapes["transformer.h.0.mlp.c_fc.weight"] == (40, 30)  # gate and up stacked
    assert shapes["transformer.h.0.mlp.c_proj.weight"] == (30, 20)
    assert shapes["transformer.h.0.ln_1.weight"] == (30,)
    assert not any(n.endswith("ln_1.bias") or n.endswith("c_proj.bias") or "wpe" in n for n in shapes)
    assert "lm_head.weight" in shapes
    cache = KVCache.empty(config, batch_size=2, max_len=10)
    assert cache.k.shape == (2, 2, 1, 10, 8)  # only the one key/value head is cached


def test_rmsnorm_formula():
    norm = RMSNorm(6, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.arange(1.0, 7.0))
    x = torch.randn(2, 3, 6, generator=torch.Generator().manual_seed(0))
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * torch.arange(1.0, 7.0)
    assert max_diff(norm(x), expected) < 1e-6


def test_rope_scores_depend_only_on_distance():
    rotary = RotaryEmbedding(tiny_config(pos_encoding="rope", n_head=2, rope_theta=100.0))  # hs 16
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, 16, generator=g), torch.randn(1, 1, 1, 16, generator=g)

    def score(i: int, j: int) -> float:
        cq, sq = rotary(torch.tensor([i]))
        ck, sk = rotary(torch.tensor([j]))
        return (apply_rotary(q, cq, sq) * apply_rotary(k, ck, sk)).sum().item()

    assert score(5, 2) == pytest.approx(score(13, 10), abs=1e-5)
    assert score(5, 2) != pytest.approx(score(5, 3), abs=1e-3)
    cos, sin = rotary(torch.tensor([0]))
    assert torch.equal(apply_rotary(q, cos, sin), q)  # position 0 is not rotated


def test_rope_angles_stay_float32_in_a_bf16_model():
    model = GPT(tiny_config(pos_encoding="rope", norm="rmsnorm", n_positions=2048)).to(torch.bfloat16)
    exact_freq = RotaryEmbedding(tiny_config(pos_encoding="rope", n_positions=2048)).inv_freq
    # .to()/.half() cast every floating buffer; RotaryEmbedding keeps its frequencies float32 and exact
    assert model.transformer.wpe.inv_freq.dtype == torch.float32
    assert torch.equal(model.transformer.wpe.inv_freq, exact_freq)
    assert torch.equal(model.half().float().transformer.wpe.inv_freq, exact_freq)
    model = model.to(torch.bfloat16)
    cos, sin = model.transformer.wpe(torch.tensor([1000, 1001]))
    exact = RotaryEmbedding(tiny_config(pos_encoding="rope", n_positions=2048))(torch.tensor([1000, 1001]))
    assert cos.dtype == torch.float32 and torch.equal(cos, exact[0]) and torch.equal(sin, exact[1])
    model.transformer.wpe.inv_freq = exact_freq.to(torch.bfloat16)  # assigned by hand: recomputed in forward
    cos, sin = model.transformer.wpe(torch.tensor([1000, 1001]))
    assert torch.equal(cos, exact[0]) and torch.equal(sin, exact[1])
    x = tokens(1, 6)
    logits, _ = model(x)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


def test_softcap_bounds_logits():
    x = torch.tensor([-1e4, -1.0, 0.0, 0.01, 1e4])
    y = softcap(x, 30.0)
    assert y.abs().max() <= 30.0 and y[3] == pytest.approx(0.01, rel=1e-4)
    model = randomise(GPT(tiny_config(logit_softcap=0.5)), 0)
    logits, _ = model(tokens(1, 5))
    assert logits.abs().max() <= 0.5


def test_forward_is_the_head_over_hidden_states():
    # Eval runs the V-wide head only at the positions it scores: the split must not change any logit.
    # Not bit-exact: the head over 14, 2 or 1 rows is a matmul of another shape, and BLAS may pick another
    # kernel (another summation order) per shape; 2.4e-7 was seen on an AMD Zen 4. Float32 rounding of
    # these sums is ~1e-7 relative, so TOL (1e-5) is a hundred times the hardware's freedom and far below
    # any real difference (a wrong position or a missing soft-cap moves logits by > 1e-2).
    model = randomise(GPT(tiny_config(logit_softcap=3.0)), 0).eval()
    x = tokens(2, 7)
    with torch.no_grad():
        logits, _ = model(x)
        hidden = model.hidden_states(x)
        assert hidden.shape == (2, 7, model.config.n_embd)
        assert max_diff(model.head(hidden), logits) <= TOL
        assert max_diff(model.head(hidden[:, 3]), logits[:, 3]) <= TOL
        assert max_diff(model.head(hidden[:, 3]), model.head(hidden[:, 4])) > 1e-2  # positions really differ
        last, _ = model(x, last_token_only=True)
        assert last.shape == (2, 1, model.config.vocab_size) and max_diff(last, logits[:, -1:]) <= TOL


def test_zero_init_starts_projections_and_untied_head_at_zero():
    model = GPT(tiny_config(zero_init=True, tie_word_embeddings=False), generator=torch.Generator().manual_seed(0))
    for name, p in model.named_parameters():
        if name.endswith("c_proj.weight") or name == "lm_head.weight":
            assert torch.count_nonzero(p) == 0, name
    assert torch.count_nonzero(model.transformer.h[0].attn.c_attn.weight) > 0
    logits, _ = model(tokens(1, 4))
    assert torch.count_nonzero(logits) == 0  # uniform first predictions
    tied = GPT(tiny_config(zero_init=True), generator=torch.Generator().manual_seed(0))
    assert torch.count_nonzero(tied.lm_head.weight) > 0  # the tied head is the embedding: never zeroed


@st.composite
def family_configs(draw) -> tuple[GPTConfig, str]:
    n_head = draw(st.sampled_from([1, 2, 3, 4]))
    n_kv_head = draw(st.sampled_from([d for d in (1, 2, 3, 4) if n_head % d == 0]))
    head_dim = draw(st.sampled_from([4, 6, 8]))
    pos = draw(st.sampled_from(["learned", "sinusoidal", "rope"]))
    config = GPTConfig(
        vocab_size=37, n_positions=20, n_layer=draw(st.integers(1, 2)), n_head=n_head, n_kv_head=n_kv_head,
        n_embd=draw(st.sampled_from([12, 16])), head_dim=head_dim, pos_encoding=pos,
        norm=draw(st.sampled_from(["layernorm", "rmsnorm"])),
        activation=draw(st.sampled_from(["gelu", "relu", "relu2", "swiglu"])),
        n_inner=draw(st.sampled_from([None, 10])), qk_norm=draw(st.booleans()), bias=draw(st.booleans()),
        qkv_bias=draw(st.sampled_from([None, True, False])), tie_word_embeddings=draw(st.booleans()),
        logit_softcap=draw(st.sampled_from([None, 3.0])), zero_init=draw(st.booleans()),
        rope_theta=draw(st.sampled_from([10000.0, 50.0])),
        rope_scaling_factor=draw(st.sampled_from([None, 4.0])) if pos == "rope" else None,
        rope_original_n_positions=8,
    )
    return config, draw(st.sampled_from(["sdpa", "eager"]))


@settings(max_examples=15, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(drawn=family_configs(), seed=st.integers(0, 2**16))
def test_random_option_combinations_cache_and_batch_consistent(drawn, seed):
    config, attn_impl = drawn
    model = randomise(GPT(config, attn_impl=attn_impl, generator=torch.Generator().manual_seed(seed)), seed)
    x = tokens(1, 9, seed=seed, vocab=37)
    full, _ = model(x)

    # KV cache, a chunk and then one token at a time, equals the full forward.
    cache = KVCache.empty(config, batch_size=1, max_len=12)
    assert cache.k.size(2) == config.kv_heads
    steps = [model(x[:, :4], kv_cache=cache)[0]] + [model(x[:, t : t + 1], kv_cache=cache)[0] for t in range(4, 9)]
    assert max_diff(torch.cat(steps, dim=1), full) < TOL

    # Each row of a left-padded batch equals that row run alone, with and without the cache.
    prompts = [x[0, :9].tolist(), x[0, 2:5].tolist(), x[0, 4:10].tolist()]
    greedy = SamplingConfig(max_new_tokens=4, temperature=0.0)
    alone = [generate(model, [p], greedy, use_cache=False)[0] for p in prompts]
    assert generate(model, prompts, greedy) == alone
    assert generate(model, prompts, greedy, use_cache=False) == alone
    ids, mask, positions = left_pad([torch.tensor(p) for p in prompts])
    batch, _ = model(ids, attention_mask=mask, position_ids=positions)
    for i, p in enumerate(prompts):
        solo, _ = model(torch.tensor([p]))
        assert max_diff(batch[i, -len(p):], solo[0]) < TOL


# ---------------------------------------------------------------------------------------------
# A Llama-style model through the CLI: train, resume bit-exact, generate, serve
# ---------------------------------------------------------------------------------------------

LLAMA_FLAGS = ["--pos-encoding", "rope", "--norm", "rmsnorm", "--activation", "swiglu", "--n-kv-head", "1",
               "--bias", "false", "--tie-word-embeddings", "false", "--qk-norm", "true"]


def test_llama_style_training_resumes_bit_exact_generates_and_serves(char_data, tmp_path, capsys, start_server):
    import json as _json

    from scratchgpt.checkpoint import load_any, load_model
    from scratchgpt.cli import main
    from scratchgpt.config import read_toml
    from scratchgpt.inference.serve import create_app

    # The shipped example config is this family.
    shipped = read_toml(Path(__file__).resolve().parents[1] / "configs" / "shakespeare_char_llama.toml")["model"]
    assert (shipped["pos_encoding"], shipped["norm"], shipped["activation"], shipped["n_kv_head"]) == (
        "rope", "rmsnorm", "swiglu", 1)

    tiny = ["--dir", str(char_data), "--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--n-inner", "40",
            "--block-size", "32", "--batch-size", "4", "--eval-steps", "2", "--eval-interval", "6",
            "--checkpoint-interval", "8", "--lr-decay-steps", "24", "--log-interval", "4", "--progress", "false",
            "--plot", "false", "--warmup-steps", "4", "--lr", "3e-3", "--seed", "5", *LLAMA_FLAGS]
    assert main(["train", "--out-dir", str(tmp_path / "straight"), *tiny, "--max-steps", "24"]) == 0
    assert main(["train", "--out-dir", str(tmp_path / "parts"), *tiny, "--max-steps", "10"]) == 0
    assert main(["train", "--out-dir", str(tmp_path / "parts"), *tiny, "--max-steps", "24", "--resume"]) == 0
    straight = (tmp_path / "straight" / "model.safetensors").read_bytes()
    assert (tmp_path / "parts" / "model.safetensors").read_bytes() == straight

    model, cfg = load_model(tmp_path / "straight")
    c = model.config
    assert (c.pos_encoding, c.norm, c.activation, c.kv_heads, c.qk_norm, c.bias) == (
        "rope", "rmsnorm", "swiglu", 1, True, False)
    assert not any("wpe" in n for n, _ in model.named_parameters())
    capsys.readouterr()

    args = ["generate", "--checkpoint", str(tmp_path / "straight"), "--prompt", "ROMEO:", "--max-new-tokens", "16",
            "--temperature", "0", "--stop-at-eot", "false"]
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert plain.startswith("ROMEO:") and len(plain.rstrip("\n")) == len("ROMEO:") + 16
    assert main([*args, "--stream"]) == 0
    assert capsys.readouterr().out == plain
    assert main([*args, "--no-cache"]) == 0
    assert capsys.readouterr().out == plain

    model, tok = load_any(tmp_path / "straight")
    base = start_server(create_app(model, tok, model_name="llama-tiny"))
    import httpx

    r = httpx.post(f"{base}/v1/completions", json={"model": "llama-tiny", "prompt": "ROMEO:", "max_tokens": 16,
                                                   "temperature": 0}, timeout=30)
    assert r.status_code == 200, r.text
    assert "ROMEO:" + _json.loads(r.text)["choices"][0]["text"] == plain.rstrip("\n")


# ---------------------------------------------------------------------------------------------
# Activation checkpointing
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pos_encoding", ["learned", "rope"])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(pos_encoding):
    """Recomputed blocks replay dropout's RNG state, so with dropout on everything is bit-identical: the
    recomputation runs the very same kernels on the very same inputs (checked exact on this CPU)."""
    cfg = GPTConfig(vocab_size=50, n_positions=16, n_embd=32, n_layer=3, n_head=4, pos_encoding=pos_encoding,
                    embd_pdrop=0.1, resid_pdrop=0.1, attn_pdrop=0.1)
    x = torch.randint(50, (2, 16), generator=torch.Generator().manual_seed(0))
    y = torch.roll(x, -1, dims=1)
    results = []
    for on in (False, True):
        model = GPT(cfg, generator=torch.Generator().manual_seed(1)).train()
        model.activation_checkpointing = on
        torch.manual_seed(7)  # the dropout stream
        saved: list[int] = []  # bytes the autograd graph keeps for the backward pass (what checkpointing cuts)
        with torch.autograd.graph.saved_tensors_hooks(lambda t, saved=saved: saved.append(t.nbytes) or t,
                                                      lambda t: t):
            _, loss = model(x, y)
        loss.backward()
        after = torch.rand(1)  # where the RNG stands afterwards: checkpointing must not move it
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}, after, sum(saved)))
    (loss0, grads0, after0, saved0), (loss1, grads1, after1, saved1) = results
    assert saved1 < saved0 / 2
    assert torch.equal(loss0, loss1) and torch.equal(after0, after1)
    assert grads0.keys() == grads1.keys()
    for name in grads0:
        assert torch.equal(grads0[name], grads1[name]), name


class _WrappedHead(nn.Linear):
    """A head that is not a plain linear layer (as a LoRA or int8 one is not): the loss cannot fuse with it."""


@pytest.mark.parametrize("head", ["plain", "plain-untied", "wrapped"])
@pytest.mark.parametrize("checkpointing", [True, False])
def test_chunked_loss_matches_the_plain_loss(monkeypatch, head, checkpointing):
    """Logits over LOSS_CHUNK_BYTES are scored a chunk of tokens at a time (none kept whole): the same mean
    over the scored tokens (-100 ignored) and the same gradients as F.cross_entropy on the whole logits. A plain
    head runs fused with the loss (model/fused_loss.py), with or without checkpointing; any other head runs
    chunk by chunk under checkpoint, and only where activation checkpointing is on."""
    import scratchgpt.model.gpt as gpt_module

    cfg = GPTConfig(vocab_size=50, n_positions=16, n_embd=32, n_layer=2, n_head=4, embd_pdrop=0.1, resid_pdrop=0.1,
                    tie_word_embeddings=head != "plain-untied")
    x = torch.randint(50, (2, 16), generator=torch.Generator().manual_seed(0))
    y = torch.roll(x, -1, dims=1)
    y[0, :9] = -100  # a chunk boundary inside the ignored run, and chunks with no scored token at all
    results = []
    for chunk_tokens in (None, 5):  # None: the plain path; 5 tokens a chunk: 7 chunks of 32 tokens, the last of 2
        monkeypatch.setattr(gpt_module, "LOSS_CHUNK_BYTES", 4 * 50 * chunk_tokens if chunk_tokens else 1 << 30)
        heads: list[int] = []
        model = GPT(cfg, generator=torch.Generator().manual_seed(1)).train()
        if head == "wrapped":
            wrapped = _WrappedHead(32, 50, bias=False)
            wrapped.weight = model.lm_head.weight  # still tied to the token embedding
            model.lm_head = wrapped
        model.lm_head.register_forward_hook(lambda m, i, o, heads=heads: heads.append(o.shape[0]))
        model.activation_checkpointing = checkpointing
        torch.manual_seed(7)  # the dropout stream
        logits, loss = model(x, y)
        (loss / 3).backward()  # as with 3 accumulation steps: the backward scales what the fused forward made
        results.append((logits, loss.detach(), {n: p.grad for n, p in model.named_parameters()}, heads))
    (logits0, loss0, grads0, heads0), (logits1, loss1, grads1, heads1) = results
    assert logits0.shape == (2, 16, 50)
    assert heads0 == [2]
    if head.startswith("plain"):  # fused: the head's weight is used directly, never called
        assert logits1 is None and heads1 == []
    elif checkpointing:  # the forward, then the backward recomputing each chunk, last first
        assert logits1 is None and heads1 == [5] * 6 + [2] + [2] + [5] * 6
    else:  # a wrapped head without checkpointing: the plain path
        assert logits1.shape == (2, 16, 50) and heads1 == [2]
    expected = F.cross_entropy(logits0.detach().flatten(0, 1), y.flatten(), ignore_index=-100)
    assert torch.allclose(loss0, expected) and torch.allclose(loss1, loss0, rtol=1e-6, atol=0)
    # Tied: a fused head makes the lookup's gradient sparse ...
    assert (model.lm_head.weight is model.transformer.wte.weight) == (head != "plain-untied")
    for name, grad in grads0.items():
        assert grads1[name].layout == torch.strided, name  # ... and the sum is dense, as the optimizer needs
        assert torch.allclose(grads1[name], grad, rtol=1e-5, atol=1e-7), name
    with torch.no_grad():  # no backward follows: the plain path, logits returned
        assert model(x, y)[0].shape == (2, 16, 50)
    model.eval()
    assert model(x, y)[0].shape == (2, 16, 50)


def test_activation_checkpointing_saves_nothing_outside_training(monkeypatch):
    """Eval, no-grad and KV-cache calls never checkpoint (no backward follows); training calls do, per block."""
    import scratchgpt.model.gpt as gpt_module

    cfg = GPTConfig(vocab_size=50, n_positions=16, n_embd=32, n_layer=2, n_head=4)
    model = GPT(cfg, generator=torch.Generator().manual_seed(1))
    model.activation_checkpointing = True
    x = torch.randint(50, (1, 8), generator=torch.Generator().manual_seed(0))
    calls = []
    real = gpt_module.checkpoint
    monkeypatch.setattr(gpt_module, "checkpoint", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    model.eval()
    with torch.no_grad():
        model(x, kv_cache=KVCache.empty(cfg, batch_size=1))
    model(x)  # eval mode, grad on
    model.train()
    with torch.no_grad():
        model(x)
    assert calls == []
    model(x)
    assert len(calls) == cfg.n_layer
