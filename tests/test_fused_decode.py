"""The one-call decode step of the blocks (model/fused_decode.py, model/csrc/decode_block.cpp): the same logits
and KV cache as the blocks' modules, for every weight format and block shape it takes (GPT-2, Llama, Qwen2,
Qwen3, the speedrun's), and the modules wherever it does not apply."""

from __future__ import annotations

import copy

import pytest
import torch

from scratchgpt import GPT, GPTConfig
from scratchgpt.inference.generate import NATIVE, decode_one_token, prefill, set_decode_path
from scratchgpt.model import fused_decode
from scratchgpt.model.fused_decode import fuse_decode_steps
from scratchgpt.model.gpt import KVCache
from scratchgpt.model.native import native_kernels
from scratchgpt.model.quantize import quantize_model, set_kernel

pytestmark = pytest.mark.skipif(native_kernels() is None, reason="scratchgpt's kernels do not build here")

PROMPT, STEPS = [[3, 1, 4, 1, 5]], 12


def tiny(**overrides) -> GPT:
    config = GPTConfig(**{"vocab_size": 97, "n_positions": 32, "n_embd": 128, "n_layer": 2, "n_head": 4, **overrides})
    return GPT(config, generator=torch.Generator().manual_seed(0)).eval().requires_grad_(False)


def on_kernels(model: GPT, fmt: str) -> GPT:
    """`model` with every product on scratchgpt's kernels: float `Linear.native`, int8 / int4 kernel "native"."""
    if fmt in ("float32", "bfloat16"):
        model = model.to(getattr(torch, fmt))
        set_decode_path(model, NATIVE)
        return model
    model = quantize_model(copy.deepcopy(model), fmt)
    set_kernel(model, "native")
    return model


CHUNKS = [[40, 41, 42], [50, 51, 52, 53]]  # several new tokens in one pass (a speculative check)


def decode(model: GPT, fused: bool) -> tuple[torch.Tensor, KVCache]:
    """Logits of a prefill, STEPS single-token steps and two chunks of new tokens (every position's), and the
    cache they leave."""
    fuse_decode_steps(model, fused)
    dtype = next(model.parameters()).dtype
    cache = KVCache.empty(model.config, batch_size=1, max_len=24, dtype=dtype)
    with torch.inference_mode():
        out = [prefill(model, torch.tensor(PROMPT), cache, mask=None, positions=None)]
        for t in range(STEPS):
            out.append(decode_one_token(model, torch.tensor([[7 + t]]), cache, positions=None))
        for chunk in CHUNKS:
            logits, _ = model(torch.tensor([chunk]), kv_cache=cache)  # (1, T, V)
            out += list(logits[0, :, None, :])
    assert cache.length == len(PROMPT[0]) + STEPS + sum(map(len, CHUNKS)) == cache.max_len
    return torch.stack(out).float(), cache


LLAMA = {"pos_encoding": "rope", "norm": "rmsnorm", "activation": "swiglu", "bias": False, "n_kv_head": 2}


@pytest.mark.parametrize("fmt", ["float32", "bfloat16", "int8", "int4"])
@pytest.mark.parametrize("overrides", [
    {}, {"n_kv_head": 2}, {"bias": False, "activation": "gelu_exact"},
    LLAMA,  # RMSNorm, SwiGLU, RoPE, grouped-query attention
    {**LLAMA, "qkv_bias": True},  # Qwen2: biases on q, k and v
    {**LLAMA, "qk_norm": True},  # Qwen3: RMSNorm per head on queries and keys
    {**LLAMA, "activation": "relu2", "qk_norm": True, "n_kv_head": 4},  # the speedrun's block
], ids=["gpt2", "gqa", "exact-gelu", "llama", "qwen2", "qwen3", "speedrun"])
def test_fused_step_equals_the_modules(fmt, overrides, monkeypatch):
    """Logits and the cache's keys and values match the modules' to float rounding (bf16: to bf16 rounding,
    since the fused step keeps the residual stream in float32 within a block), and every step was fused."""
    model = on_kernels(tiny(**overrides), fmt)
    ran = []
    monkeypatch.setattr(fused_decode, "stack_decode",  # records whether each call ran the C++ (not None)
                        lambda *a, f=fused_decode.stack_decode: ran.append((y := f(*a)) is not None) or y)
    want, want_cache = decode(model, fused=False)
    assert not ran
    got, cache = decode(model, fused=True)
    assert ran == [False] + [True] * (STEPS + len(CHUNKS))  # the prefill (5 tokens, over MAX_ROWS) ran the modules
    # int8/int4 products quantize their input row per block of 32: a last-bit difference in a norm's output
    # (C++ against torch's kernel) can move one activation by one int8 step, and later layers and steps carry
    # it on: logits moved by up to 6e-3 here (an Intel Xeon); another CPU's rounding may move them more.
    tol = {"float32": dict(rtol=1e-4, atol=1e-5), "bfloat16": dict(rtol=3e-2, atol=3e-2)}.get(
        fmt, dict(rtol=3e-2, atol=3e-2))
    torch.testing.assert_close(got, want, **tol)
    n = cache.max_len
    if fmt in ("int8", "int4") and overrides.get("qk_norm"):
        # A key's RMSNorm scales it to unit size, magnifying such steps (2.7e-2 here); a wrong rotation or
        # position would still be off by ~1.
        tol = dict(rtol=1e-1, atol=1e-1)
    torch.testing.assert_close(cache.k[..., :n, :].float(), want_cache.k[..., :n, :].float(), **tol)
    torch.testing.assert_close(cache.v[..., :n, :].float(), want_cache.v[..., :n, :].float(), **tol)
    if fmt != "bfloat16":  # the same greedy token wherever the top two are not a near-tie (any CPU's rounding)
        top2 = want.topk(2, dim=-1).values
        clear = (top2[..., 0] - top2[..., 1]) > (1e-4 if fmt == "float32" else 6e-2)
        assert clear.any() and torch.equal(got.argmax(-1)[clear], want.argmax(-1)[clear])


@pytest.mark.parametrize("fmt", ["float32", "bfloat16"])
@pytest.mark.parametrize("overrides", [{}, LLAMA], ids=["gpt2", "llama"])
def test_fused_step_with_a_head_size_off_the_vector_width(fmt, overrides, monkeypatch):
    """Head size 24: attention runs decode_block.cpp's portable loops (its AVX-512 path takes head sizes that
    are multiples of 16; the other shapes here are 32), to the same tolerance as test_fused_step_equals_the_modules."""
    model = on_kernels(tiny(**{**overrides, "n_embd": 96}), fmt)
    ran = []
    monkeypatch.setattr(fused_decode, "stack_decode",
                        lambda *a, f=fused_decode.stack_decode: ran.append((y := f(*a)) is not None) or y)
    want, want_cache = decode(model, fused=False)
    got, cache = decode(model, fused=True)
    assert ran == [False] + [True] * (STEPS + len(CHUNKS))
    tol = dict(rtol=1e-4, atol=1e-5) if fmt == "float32" else dict(rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(got, want, **tol)
    torch.testing.assert_close(cache.v.float(), want_cache.v.float(), **tol)

def test_not_fused_where_it_does_not_apply():
    """A layer off scratchgpt's kernels, an activation the C++ lacks (plain ReLU), a block in training mode, two
    kinds of block in one model, or a batch of two rows: the step returns None / is never asked, and the
    modules decode as before."""
    model = on_kernels(tiny(), "float32")
    fuse_decode_steps(model)
    x = torch.randn(1, 1, 128)
    cache = KVCache.empty(model.config, batch_size=1, max_len=8)
    with torch.inference_mode():
        assert model.decode_step(x, cache, 0) is not None
        model.transformer.h[1].mlp.c_fc.native = False  # one product on another path: not fused, the modules run
        assert model.decode_step(x, cache, 0) is None
        model.transformer.h[1].mlp.c_fc.native = True
        model.transformer.h[1].train()
        assert model.decode_step(x, cache, 0) is None
        model.eval()
        assert model.decode_step(x, cache, 0) is not None
    model.transformer.h[1].requires_grad_(True)  # grad on and a parameter that wants it: no backward in C++
    assert model.decode_step(x, cache, 0) is None
    with torch.no_grad():
        assert model.decode_step(x, cache, 0) is not None
    model.requires_grad_(False)
    relu = on_kernels(tiny(activation="relu"), "float32")
    fuse_decode_steps(relu)
    with torch.inference_mode():
        assert relu.decode_step(x, cache, 0) is None
        mixed = on_kernels(tiny(), "float32")  # block 1 with exact GELU, block 0 with tanh: one kind per call
        mixed.transformer.h[1].mlp.act = torch.nn.GELU()
        fuse_decode_steps(mixed)
        assert mixed.decode_step(x, cache, 0) is None
    # Two rows: the model never asks (the C++ step takes one token of one sequence).
    asked = []
    model.decode_step = lambda *a: asked.append(1)
    cache = KVCache.empty(model.config, batch_size=2, max_len=8)
    with torch.inference_mode():
        prefill(model, torch.tensor([[1, 2], [3, 4]]), cache, mask=None, positions=None)
        decode_one_token(model, torch.tensor([[5], [6]]), cache, positions=None)
    assert not asked


def test_bad_arguments_are_refused():
    kernels = native_kernels()
    model = on_kernels(tiny(), "float32")
    x = torch.randn(1, 1, 128)
    cache = KVCache.empty(model.config, batch_size=1, max_len=8)
    cache.k.zero_(), cache.v.zero_()
    none = torch.empty(0)
    params = fused_decode._block_args(model.transformer.h[0])[0]
    args = (cache.k, cache.v, 0, 4, [1e-5] * 4, False, 0, none, none, [none] * 4, 0.0)
    with torch.inference_mode():
        with pytest.raises(RuntimeError, match="outside the cache"):
            fused_decode.stack_decode(model, x, cache, 8)
        with pytest.raises(RuntimeError, match="outside the cache"):  # positions 6 to 8 of 8
            fused_decode.stack_decode(model, torch.randn(1, 3, 128), cache, 6)
        with pytest.raises(RuntimeError, match="one sequence"):
            kernels.blocks_decode(torch.randn(2, 1, 128), params * 2, [0] * 8, *args)
        assert fused_decode.stack_decode(model, torch.randn(2, 1, 128), cache, 0) is None  # the modules run
        assert fused_decode.stack_decode(model, torch.randn(1, 5, 128), cache, 0) is None  # over MAX_ROWS tokens
        with pytest.raises(RuntimeError, match="caches"):
            fused_decode.stack_decode(model, x, KVCache(cache.k, cache.v.double()), 0)
        with pytest.raises(RuntimeError, match="caches"):  # a batch of two in the cache
            fused_decode.stack_decode(model, x, KVCache.empty(model.config, batch_size=2, max_len=8), 0)
        with pytest.raises(RuntimeError, match="16·L parameters"):
            kernels.blocks_decode(x, [], [0] * 8, *args)
        with pytest.raises(RuntimeError, match="activation"):
            kernels.blocks_decode(x, params * 2, [0] * 8, *args[:6], 7, *args[7:])
        with pytest.raises(RuntimeError, match="rope cos"):  # angles for one token, two new tokens
            kernels.blocks_decode(torch.randn(1, 2, 128), params * 2, [0] * 8, *args[:7], torch.ones(32),
                                  torch.ones(32), *args[9:])
        swapped = params[:2] + params[5:8] + params[2:5] + params[8:]  # c_attn and c_proj swapped: refused
        with pytest.raises(RuntimeError, match="rows where"):
            kernels.blocks_decode(x, params + swapped, [0] * 8, *args)
        assert not cache.k.any() and not cache.v.any()  # each refused before a block wrote its cache
        # RoPE angles for other positions than the new tokens' (or a missing half): the modules run.
        assert fused_decode.stack_decode(model, x, cache, 0, (torch.ones(32), torch.empty(0))) is None
        assert fused_decode.stack_decode(model, x, cache, 0, (torch.ones(2, 32), torch.ones(2, 32))) is None


def test_a_generations_cache_gathers_the_blocks_arguments_once(monkeypatch):
    """A cache with a step memo (one generation's own) gathers the blocks' arguments at its first fused step
    only, for its own model only; a plain cache (choose_decode_path's timer switches paths between steps on
    one) gathers them at every step. Either way the same logits."""
    from scratchgpt import SamplingConfig
    from scratchgpt.inference.generate import generate

    model, other = on_kernels(tiny(), "float32"), on_kernels(tiny(n_layer=3), "float32")
    fuse_decode_steps(model)
    fuse_decode_steps(other)
    gathered = []
    monkeypatch.setattr(fused_decode, "_stack_args",
                        lambda m, f=fused_decode._stack_args: gathered.append(m) or f(m))
    logits = {}
    with torch.inference_mode():
        for memo in (False, True):
            cache = KVCache.empty(model.config, batch_size=1, max_len=24, step_memo=memo)
            prefill(model, torch.tensor(PROMPT), cache, mask=None, positions=None)  # 5 tokens: the modules
            logits[memo] = [decode_one_token(model, torch.tensor([[7 + t]]), cache, positions=None)
                            for t in range(STEPS)]
            assert gathered == [model] * (1 if memo else STEPS)
            gathered.clear()
        assert all(torch.equal(a, b) for a, b in zip(logits[False], logits[True], strict=True))
        # The memo belongs to the model that filled it: another model on the same cache gathers its own.
        cache = KVCache.empty(model.config, batch_size=1, max_len=24, step_memo=True)
        decode_one_token(model, torch.tensor([[1]]), cache, positions=None)
        cache3 = KVCache.empty(other.config, batch_size=1, max_len=24, step_memo=True)
        cache3.step_memo = cache.step_memo
        decode_one_token(other, torch.tensor([[1]]), cache3, positions=None)
        assert gathered == [model, other]
    # generate() decodes on a cache of its own with the memo: one gathering for a whole generation (after its
    # first call's choose_decode_path, which times steps on a plain cache).
    sampling = SamplingConfig(max_new_tokens=STEPS, temperature=0.0)
    generate(model, PROMPT[0], sampling)
    gathered.clear()
    out = generate(model, PROMPT[0], sampling)
    assert len(out[0]) == STEPS and gathered == [model]


def test_a_generations_rope_rows_come_from_one_table(monkeypatch):
    """With a step memo, a RoPE model's decode steps slice (cos, sin) from a table of positions the memo keeps
    (extended by doubling past 256 positions), for its own model only: the same values as computing them per
    step (the same logits; bit for bit on the Intel Xeon here, to float rounding wherever torch's cos/sin
    rounds an angle differently by its place in a tensor), and RotaryEmbedding runs once per table instead of
    once per step."""
    from scratchgpt.model.gpt import RotaryEmbedding

    rope = {"n_positions": 600, "pos_encoding": "rope", "norm": "rmsnorm", "activation": "swiglu", "bias": False}
    model = on_kernels(tiny(**rope), "float32")
    other = on_kernels(tiny(**rope, rope_theta=500.0), "float32")
    calls = []
    monkeypatch.setattr(RotaryEmbedding, "forward",
                        lambda self, ids, f=RotaryEmbedding.forward: calls.append(ids.numel()) or f(self, ids))
    prompt = torch.arange(250)[None] % 97  # decoding then crosses the table's first 256 positions
    logits = {}
    with torch.inference_mode():
        for memo in (False, True):
            fuse_decode_steps(model)
            cache = KVCache.empty(model.config, batch_size=1, max_len=600, step_memo=memo)
            calls.clear()
            prefill(model, prompt, cache, mask=None, positions=None)  # 250 tokens (the modules run them)
            logits[memo] = [decode_one_token(model, torch.tensor([[7 + t]]), cache, positions=None)
                            for t in range(STEPS)]
            # memo: a table of 256 positions (the prefill's), then one of 512 at position 256; without:
            # the prefill's 250 positions, then one per step
            assert calls == ([256, 512] if memo else [250] + [1] * STEPS)
        torch.testing.assert_close(torch.stack(logits[True]), torch.stack(logits[False]), rtol=1e-5, atol=1e-6)
        # Another model (other frequencies) on the same memo builds its own table: its logits are those it
        # computes without a memo (a table of the first model's angles would move them by far more).
        fuse_decode_steps(other)
        plain = KVCache.empty(other.config, batch_size=1, max_len=600)
        shared = KVCache.empty(other.config, batch_size=1, max_len=600, step_memo=True)
        shared.step_memo = cache.step_memo
        for c in (plain, shared):
            prefill(other, prompt, c, mask=None, positions=None)
        for t in range(3):
            token = torch.tensor([[7 + t]])
            torch.testing.assert_close(decode_one_token(other, token, shared, positions=None),
                                       decode_one_token(other, token, plain, positions=None), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_nan_in_the_cache_poisons_the_fused_step_as_the_modules(dtype):
    """Attention's exponentials (decode_block.cpp's vectorised softmax) keep a NaN score NaN, as std::exp and the
    modules' softmax do: a corrupted cache shows in the logits instead of being weighted away."""
    model = on_kernels(tiny(), dtype)
    out = {}
    for fused in (False, True):
        fuse_decode_steps(model, fused)
        cache = KVCache.empty(model.config, batch_size=1, max_len=24, dtype=getattr(torch, dtype))
        with torch.inference_mode():
            prefill(model, torch.tensor(PROMPT), cache, mask=None, positions=None)
            cache.k[0, 0, 1, 2, 3] = float("nan")  # one channel of one key of layer 0
            out[fused] = decode_one_token(model, torch.tensor([[7]]), cache, positions=None)
    assert torch.isnan(out[False]).all() and torch.isnan(out[True]).all()
