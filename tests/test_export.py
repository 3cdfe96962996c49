"""GGUF export (read back with gguf.GGUFReader) and ONNX export (onnxruntime logits == PyTorch)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from scratchgpt import GPT, GPTConfig, SamplingConfig
from scratchgpt.checkpoint import save_model

gguf = pytest.importorskip("gguf")


def tiny(vocab_size: int, *, tie: bool = True, seed: int = 0) -> GPT:
    config = GPTConfig(vocab_size=vocab_size, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                       tie_word_embeddings=tie)
    return GPT(config, generator=torch.Generator().manual_seed(seed)).eval()


# -- GGUF ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tie", [True, False])
def test_gguf_round_trip_names_shapes_values_and_vocabulary(tmp_path, gpt2_tokenizer, tie):
    from scratchgpt.export.gguf import export_gguf, read_gguf_state

    model = tiny(gpt2_tokenizer.vocab_size, tie=tie)
    path = export_gguf(model, gpt2_tokenizer, tmp_path / "m.gguf")
    tensors, meta = read_gguf_state(path)
    sd = model.state_dict()
    expected = {
        "token_embd.weight": sd["transformer.wte.weight"], "position_embd.weight": sd["transformer.wpe.weight"],
        "output_norm.weight": sd["transformer.ln_f.weight"], "output_norm.bias": sd["transformer.ln_f.bias"],
    }
    for i in range(2):
        h = f"transformer.h.{i}."
        for ours, theirs in (("ln_1", "attn_norm"), ("attn.c_attn", "attn_qkv"), ("attn.c_proj", "attn_output"),
                             ("ln_2", "ffn_norm"), ("mlp.c_fc", "ffn_up"), ("mlp.c_proj", "ffn_down")):
            for p in ("weight", "bias"):
                expected[f"blk.{i}.{theirs}.{p}"] = sd[h + f"{ours}.{p}"]
    if not tie:
        expected["output.weight"] = sd["lm_head.weight"]
    assert set(tensors) == set(expected)
    for name, value in expected.items():
        assert tensors[name].shape == value.shape, name
        assert torch.equal(tensors[name], value), name
    assert tensors["blk.0.attn_qkv.weight"].shape == (96, 32)  # (out, in), as llama.cpp reads it
    assert meta["general.architecture"] == "gpt2" and meta["tokenizer.ggml.model"] == "gpt2"
    assert (meta["gpt2.context_length"], meta["gpt2.embedding_length"], meta["gpt2.block_count"],
            meta["gpt2.attention.head_count"]) == (64, 32, 2, 4)
    tokens = meta["tokenizer.ggml.tokens"]
    assert len(tokens) == 50257 and tokens[50256] == "<|endoftext|>" and tokens[262] == "Ġthe"
    assert meta["tokenizer.ggml.eos_token_id"] == 50256
    assert meta["tokenizer.ggml.token_type"][50256] == int(gguf.TokenType.CONTROL)
    assert meta["tokenizer.ggml.token_type"][0] == int(gguf.TokenType.NORMAL)
    merges = meta["tokenizer.ggml.merges"]
    assert len(merges) == 50000 and merges[0] == "Ġ t"
    # Every merge's pieces join to the token with id 256 + its rank, as GPT-2's files define.
    assert all(tokens[256 + r] == merges[r].replace(" ", "") for r in (0, 1, 999, 49999))


def gguf_gpt2_reference_logits(tensors: dict, meta: dict, ids: list[int]) -> torch.Tensor:
    """Logits (T, V) computed the way llama.cpp's gpt2 architecture runs the file, from its tensors and
    metadata only: LayerNorm with bias, fused q/k/v with bias, tanh GELU, learned positions."""
    n_head, eps = meta["gpt2.attention.head_count"], meta["gpt2.attention.layer_norm_epsilon"]
    T, F = len(ids), torch.nn.functional

    def norm(x, name):
        return F.layer_norm(x, x.shape[-1:], tensors[name + ".weight"], tensors[name + ".bias"], eps)

    def lin(x, name):  # llama.cpp's gpt2 reads every bias: a missing one would raise KeyError here
        return x @ tensors[name + ".weight"].T + tensors[name + ".bias"]

    x = tensors["token_embd.weight"][ids] + tensors["position_embd.weight"][:T]
    for i in range(meta["gpt2.block_count"]):
        p = f"blk.{i}."
        q, k, v = lin(norm(x, p + "attn_norm"), p + "attn_qkv").view(T, 3, n_head, -1).unbind(1)
        att = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True)
        x = x + lin(att.transpose(0, 1).reshape(T, -1), p + "attn_output")
        x = x + lin(F.gelu(lin(norm(x, p + "ffn_norm"), p + "ffn_up"), approximate="tanh"), p + "ffn_down")
    return norm(x, "output_norm") @ tensors.get("output.weight", tensors["token_embd.weight"]).T


@pytest.mark.parametrize("qkv_bias", [None, True])
def test_gguf_gpt2_without_biases_gets_zero_biases_and_the_same_logits(tmp_path, gpt2_tokenizer, qkv_bias):
    """configs/demo.toml trains bias=False: llama.cpp's gpt2 needs every bias, so zeros are written."""
    from scratchgpt.export.gguf import export_gguf, read_gguf_state

    config = GPTConfig(vocab_size=gpt2_tokenizer.vocab_size, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                       bias=False, qkv_bias=qkv_bias)
    model = GPT(config, generator=torch.Generator().manual_seed(5)).eval()
    with torch.no_grad():  # non-trivial norm gains and (where present) q/k/v biases
        for name, p in model.named_parameters():
            if name.endswith("bias") or "ln_" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    tensors, meta = read_gguf_state(export_gguf(model, gpt2_tokenizer, tmp_path / "m.gguf"))
    assert meta["general.architecture"] == "gpt2"
    assert torch.equal(tensors["blk.1.ffn_down.bias"], torch.zeros(32))
    assert torch.equal(tensors["output_norm.bias"], torch.zeros(32))
    qkv = model.transformer.h[0].attn.c_attn.bias
    assert torch.equal(tensors["blk.0.attn_qkv.bias"], torch.zeros(96) if qkv is None else qkv.detach())
    ids = gpt2_tokenizer.encode("Hello, my name is")
    with torch.no_grad():
        ref = model(torch.tensor([ids]))[0][0]
    # Float32 throughout; only the order of the additions differs from scratchgpt's forward.
    torch.testing.assert_close(gguf_gpt2_reference_logits(tensors, meta, ids), ref, rtol=1e-4, atol=1e-4)


def bpe_encode(text: str, tokens: list[str], merges: list[str]) -> list[int]:
    """Byte-level BPE as llama.cpp applies a GGUF vocabulary with the gpt-2 pre-tokenizer: GPT-2's regex
    splits the text; in each piece every byte is one symbol (GPT-2's spelling), then the lowest-ranked
    (then leftmost) adjacent pair is merged until no pair is in `merges`; symbols are looked up by text."""
    from scratchgpt.data.tokenizers import GPT2_PATTERN, Pretokenizer, gpt2_byte_to_unicode

    spell, rank = gpt2_byte_to_unicode(), {tuple(m.split(" ")): r for r, m in enumerate(merges)}
    ids, out = {t: i for i, t in enumerate(tokens)}, []
    for piece in Pretokenizer(GPT2_PATTERN).findall(text):
        symbols = [spell[b] for b in piece.encode("utf-8")]
        while True:
            pairs = enumerate(zip(symbols[:-1], symbols[1:], strict=True))
            ranked = [(rank[pair], i) for i, pair in pairs if pair in rank]
            if not ranked:
                break
            _, i = min(ranked)
            symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
        out += [ids[s] for s in symbols]
    return out


@pytest.mark.parametrize("text", ["First Citizen:\nBefore we proceed any further, hear me speak.\n",
                                  "café — “quoted” 🙂 naïve\n"])
def test_gguf_char_tokenizer_model_same_ids_and_logits(tmp_path, text):
    """The demo and the speedrun train char-level models: their alphabet goes in as byte-level BPE that
    splits text exactly as the char tokenizer does (ASCII: no merges; multi-byte characters: merge chains)."""
    from scratchgpt.cli import main
    from scratchgpt.data.tokenizers import build_tokenizer
    from scratchgpt.export.gguf import read_gguf_state

    tok = build_tokenizer("char", text=text)
    config = GPTConfig(vocab_size=tok.vocab_size, n_positions=64, n_embd=32, n_layer=2, n_head=4, bias=False)
    model = GPT(config, generator=torch.Generator().manual_seed(7)).eval()
    save_model(model, tmp_path / "run", tokenizer=tok)
    assert main(["export", "--checkpoint", str(tmp_path / "run"), "--format", "gguf", "--out",
                 str(tmp_path / "m.gguf")]) == 0
    tensors, meta = read_gguf_state(tmp_path / "m.gguf")
    tokens, merges = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.merges"]
    assert len(tokens) == tok.vocab_size and tokens[tok.eot_id] == "<|endoftext|>"
    assert meta["tokenizer.ggml.token_type"][tok.eot_id] == int(gguf.TokenType.CONTROL)
    assert meta["tokenizer.ggml.eos_token_id"] == tok.eot_id and meta["tokenizer.ggml.pre"] == "gpt-2"
    ids = tok.encode(text)
    assert bpe_encode(text, tokens, merges) == ids
    assert len(merges) == len(set(merges))
    with torch.no_grad():
        ref = model(torch.tensor([ids[:64]]))[0][0]
    # Float32 throughout; only the order of the additions differs from scratchgpt's forward.
    torch.testing.assert_close(gguf_gpt2_reference_logits(tensors, meta, ids[:64]), ref, rtol=1e-4, atol=1e-4)


def test_gguf_trained_bpe_tokenizer_model_same_ids_and_logits(tmp_path):
    """`tokenizer = "bpe"` (byte-level BPE trained by scratchgpt) goes in with its merges, spelled as GPT-2's."""
    from scratchgpt.data.tokenizers import build_tokenizer
    from scratchgpt.export.gguf import export_gguf, read_gguf_state

    corpus = "First Citizen:\nBefore we proceed any further, hear me speak.\nAll: Speak, speak. café café\n" * 3
    tok = build_tokenizer("bpe", text=corpus, vocab_size=300)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, n_positions=64, n_embd=32, n_layer=2, n_head=4),
                generator=torch.Generator().manual_seed(8)).eval()
    tensors, meta = read_gguf_state(export_gguf(model, tok, tmp_path / "m.gguf"))
    tokens, merges = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.merges"]
    assert len(tokens) == tok.vocab_size and len(merges) == len(tok.merges)
    assert meta["tokenizer.ggml.token_type"][tok.eot_id] == int(gguf.TokenType.CONTROL)
    for text in ("Before we speak, citizen: café!\n", "All: further\n\nhear  me"):
        ids = tok.encode(text)
        assert bpe_encode(text, tokens, merges) == ids, text
    with torch.no_grad():
        ref = model(torch.tensor([ids]))[0][0]
    # Float32 throughout; only the order of the additions differs from scratchgpt's forward.
    torch.testing.assert_close(gguf_gpt2_reference_logits(tensors, meta, ids), ref, rtol=1e-4, atol=1e-4)


def test_gguf_float16_halves_matrices_and_keeps_vectors_float32(tmp_path, gpt2_tokenizer):
    from scratchgpt.export.gguf import export_gguf

    model = tiny(gpt2_tokenizer.vocab_size)
    path = export_gguf(model, gpt2_tokenizer, tmp_path / "m16.gguf", dtype="float16")
    reader = gguf.GGUFReader(str(path))
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["token_embd.weight"] == gguf.GGMLQuantizationType.F16
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    data = {t.name: np.array(t.data) for t in reader.tensors}
    ref = model.transformer.h[0].mlp.c_fc.weight.detach().numpy()
    assert np.abs(data["blk.0.ffn_up.weight"].reshape(ref.shape).astype(np.float32) - ref).max() < 1e-4


def test_gguf_q8_0_dequantizes_to_within_half_a_step_and_runs_to_the_same_logits(tmp_path, gpt2_tokenizer, capsys):
    from scratchgpt.cli import main
    from scratchgpt.export.gguf import export_gguf, read_gguf_state

    # n_embd 48: rows of 48 values are not whole Q8_0 blocks (32) and fall back to float16, as in
    # llama.cpp's converter; ffn_down's rows (192 values) quantize.
    config = GPTConfig(vocab_size=gpt2_tokenizer.vocab_size, n_positions=64, n_embd=48, n_layer=2, n_head=4)
    model = GPT(config, generator=torch.Generator().manual_seed(6)).eval()
    save_model(model, tmp_path / "run", tokenizer=gpt2_tokenizer)
    path = tmp_path / "m.gguf"
    assert main(["export", "--checkpoint", str(tmp_path / "run"), "--format", "gguf", "--gguf-dtype", "q8_0",
                 "--out", str(path)]) == 0
    capsys.readouterr()
    reader = gguf.GGUFReader(str(path))
    types = {t.name: t.tensor_type for t in reader.tensors}
    Q8, F16, F32 = gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F32
    assert (types["blk.0.ffn_down.weight"], types["blk.0.attn_qkv.weight"], types["token_embd.weight"]) == (
        Q8, F16, F16)
    assert types["position_embd.weight"] == types["blk.0.attn_norm.weight"] == types["blk.0.ffn_down.bias"] == F32
    assert int(reader.get_field("general.file_type").contents()) == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    tensors, meta = read_gguf_state(path)
    # Q8_0: per block of 32 weights, d = max|w| / 127, q = round(w / d), d then stored as float16: the
    # error is at most half a step plus |q| ≤ 127 times d's float16 rounding.
    w = model.transformer.h[0].mlp.c_proj.weight.detach().view(-1, 32)
    d = w.abs().amax(dim=1, keepdim=True) / 127
    bound = d / 2 + 127 * (d.half().float() - d).abs() + 1e-7
    assert ((tensors["blk.0.ffn_down.weight"].view(-1, 32) - w).abs() <= bound).all()
    ids = gpt2_tokenizer.encode("Hello, my name is")
    with torch.no_grad():
        ref = model(torch.tensor([ids]))[0][0]
    got = gguf_gpt2_reference_logits(tensors, meta, ids)
    # Q8_0 tolerance: 8-bit blocks (and float16 elsewhere) move the logits by well under 1% of their norm.
    assert (got - ref).norm() / ref.norm() < 0.01
    assert not torch.equal(got, ref)  # the weights really were rounded
    f32 = export_gguf(model, gpt2_tokenizer, tmp_path / "f32.gguf")
    sizes = {t.name: int(t.n_bytes) for t in gguf.GGUFReader(str(f32)).tensors}
    assert {t.name: int(t.n_bytes) for t in reader.tensors}["blk.0.ffn_down.weight"] * 128 == (
        sizes["blk.0.ffn_down.weight"] * 34)  # 34 bytes per 32 weights instead of 128


def test_gguf_q4_0_writes_4_bit_blocks_that_read_back_within_a_step(tmp_path, gpt2_tokenizer, capsys):
    """`--gguf-dtype q4_0`: llama.cpp's int4 through gguf-py's quantizer, read back with the right types."""
    from scratchgpt.cli import main
    from scratchgpt.export.gguf import export_gguf, read_gguf_state

    # n_embd 48: rows of 48 values are not whole Q4_0 blocks (32) and fall back to float16, as for Q8_0.
    config = GPTConfig(vocab_size=gpt2_tokenizer.vocab_size, n_positions=64, n_embd=48, n_layer=2, n_head=4)
    model = GPT(config, generator=torch.Generator().manual_seed(6)).eval()
    save_model(model, tmp_path / "run", tokenizer=gpt2_tokenizer)
    path = tmp_path / "m.gguf"
    assert main(["export", "--checkpoint", str(tmp_path / "run"), "--format", "gguf", "--gguf-dtype", "q4_0",
                 "--out", str(path)]) == 0
    capsys.readouterr()
    reader = gguf.GGUFReader(str(path))
    types = {t.name: t.tensor_type for t in reader.tensors}
    Q4, F16, F32 = gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F32
    assert (types["blk.0.ffn_down.weight"], types["blk.1.ffn_down.weight"], types["blk.0.attn_qkv.weight"],
            types["token_embd.weight"]) == (Q4, Q4, F16, F16)
    assert types["position_embd.weight"] == types["blk.0.attn_norm.weight"] == types["blk.0.ffn_down.bias"] == F32
    assert int(reader.get_field("general.file_type").contents()) == int(gguf.LlamaFileType.MOSTLY_Q4_0)
    tensors, meta = read_gguf_state(path)
    # Q4_0: per block of 32 weights, d = (the value of largest |w|) / -8, q = round(w / d) in [-8, 7], d then
    # stored as float16: the error is at most one step (+8 clamps to 7) plus |q - 8| ≤ 8 times d's rounding.
    w = model.transformer.h[0].mlp.c_proj.weight.detach().view(-1, 32)
    d = w.abs().amax(dim=1, keepdim=True) / 8
    bound = d + 8 * (d.half().float() - d).abs() + 1e-7
    err = (tensors["blk.0.ffn_down.weight"].view(-1, 32) - w).abs()
    assert (err <= bound).all() and (err > 0).any()
    ids = gpt2_tokenizer.encode("Hello, my name is")
    with torch.no_grad():
        ref = model(torch.tensor([ids]))[0][0]
    got = gguf_gpt2_reference_logits(tensors, meta, ids)
    # Only the two ffn_down matrices are 4-bit here: the logits move by a few % of their norm at most.
    assert (got - ref).norm() / ref.norm() < 0.05 and not torch.equal(got, ref)
    f32 = export_gguf(model, gpt2_tokenizer, tmp_path / "f32.gguf")
    sizes = {t.name: int(t.n_bytes) for t in gguf.GGUFReader(str(f32)).tensors}
    assert {t.name: int(t.n_bytes) for t in reader.tensors}["blk.0.ffn_down.weight"] * 128 == (
        sizes["blk.0.ffn_down.weight"] * 18)  # 18 bytes per 32 weights (16 of nibbles, a float16 d) instead of 128


def test_gguf_refuses_other_tokenizers_and_quantized_models(tmp_path, gpt2_tokenizer):
    from scratchgpt.export.gguf import export_gguf
    from scratchgpt.model.quantize import quantize_model

    class Words:
        name = "words"

    with pytest.raises(ValueError, match="embeds a byte-level BPE tokenizer .*; this model uses 'words'"):
        export_gguf(tiny(gpt2_tokenizer.vocab_size), Words(), tmp_path / "c.gguf")
    from scratchgpt.data.tokenizers import ByteBPETokenizer

    # Two merge paths to the same bytes ("ab"+"c" and "a"+"bc"): llama.cpp looks tokens up by text.
    twice = ByteBPETokenizer([(97, 98), (98, 99), (256, 99), (97, 257)])
    with pytest.raises(ValueError, match="tokens 258 and 259 .* are the same bytes"):
        export_gguf(tiny(twice.vocab_size), twice, tmp_path / "b.gguf")
    own_regex = ByteBPETokenizer([(97, 98)], pattern=r"\w+|\s+|.")
    with pytest.raises(ValueError, match="splits text with its own regex"):
        export_gguf(tiny(own_regex.vocab_size), own_regex, tmp_path / "r.gguf")
    for mode in ("int8", "int4"):
        with pytest.raises(ValueError, match="takes a float model"):
            export_gguf(quantize_model(tiny(gpt2_tokenizer.vocab_size), mode, kernel="reference"), gpt2_tokenizer,
                        tmp_path / "q.gguf")
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_cli_export_gguf_and_lora_adapters_without_merge(tmp_path, gpt2_tokenizer, capsys):
    from scratchgpt.cli import main
    from scratchgpt.config import LoRAConfig
    from scratchgpt.training.lora import apply_lora, save_adapters

    model = tiny(gpt2_tokenizer.vocab_size)
    save_model(model, tmp_path / "run", tokenizer=gpt2_tokenizer)
    assert main(["export", "--checkpoint", str(tmp_path / "run"), "--format", "gguf",
                 "--out", str(tmp_path / "m.gguf")]) == 0
    assert json.loads(capsys.readouterr().out)["format"] == "gguf" and (tmp_path / "m.gguf").is_file()

    lora = tiny(gpt2_tokenizer.vocab_size)
    apply_lora(lora, LoRAConfig(rank=2))
    save_adapters(lora, tmp_path / "adapters", base=str(tmp_path / "run"))
    assert main(["export", "--checkpoint", str(tmp_path / "adapters"), "--format", "gguf",
                 "--out", str(tmp_path / "a.gguf")]) == 2
    err = capsys.readouterr().err
    assert "LoRA adapters only; merge them" in err and err.count("\n") == 1
    assert not (tmp_path / "a.gguf").exists()


def test_gguf_runs_in_llama_cpp_with_the_same_greedy_tokens(tmp_path, gpt2_tokenizer):
    """Optional: needs llama-cpp-python (not installed by default; it builds from source)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from scratchgpt.export.gguf import export_gguf

    model = tiny(gpt2_tokenizer.vocab_size, seed=4)
    path = export_gguf(model, gpt2_tokenizer, tmp_path / "m.gguf")
    prompt = gpt2_tokenizer.encode("Hello, my name is")
    assert_llama_cpp_runs_like_scratchgpt(llama_cpp, path, model, prompt)
    # llama.cpp's own tokenizer (the gpt-2 pre-tokenizer and the merges in the file) splits text as GPT-2 does.
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, verbose=False, vocab_only=True)
    for text in _TOKENIZER_TEXTS:
        assert llm.tokenize(text.encode(), add_bos=False) == gpt2_tokenizer.encode(text), text
        assert llm.detokenize(gpt2_tokenizer.encode(text)) == text.encode(), text
    eot = "<|endoftext|>"
    assert llm.token_bos() == llm.token_eos() == gpt2_tokenizer.eot_id
    assert llm.tokenize(f"a{eot}b".encode(), add_bos=True, special=True) == gpt2_tokenizer.encode(
        f"a{eot}b", allowed_special=True)  # GPT-2 adds no BOS token


def greedy16(model, prompt: list[int]) -> list[int]:
    from scratchgpt.inference.generate import generate

    return generate(model, prompt, SamplingConfig(max_new_tokens=16, temperature=0.0, stop_at_eot=False))[0]


def llama_cpp_run(llama_cpp, path, prompt: list[int], n: int = 16) -> tuple[list[int], list[int], np.ndarray]:
    """llama.cpp on the GGUF file at `path`: (its first n greedy tokens after `prompt`, the ids it
    evaluated to choose them, its logits (T, V) at each of those positions)."""
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_batch=64, verbose=False, logits_all=True)
    out = []
    for tok in llm.generate(prompt, temp=0.0, top_k=1):
        out.append(tok)
        if len(out) == n:
            break
    return out, llm.input_ids[: llm.n_tokens].tolist(), np.array(llm.scores[: llm.n_tokens])


def assert_llama_cpp_runs_like_scratchgpt(llama_cpp, path, model, prompt: list[int]) -> float:
    """llama.cpp's greedy tokens equal scratchgpt's, and its logits at every position agree to within
    its float16 KV cache's rounding; returns the largest logit difference."""
    greedy, evaluated, theirs = llama_cpp_run(llama_cpp, path, prompt)
    assert greedy == greedy16(model, prompt)
    assert evaluated == prompt + greedy[:-1]
    with torch.no_grad():
        ours = model(torch.tensor([evaluated]))[0][0].numpy()
    diff = float(np.abs(theirs - ours).max())
    print(f"llama.cpp {path.name}: max |logit difference| {diff:.2e} (logits up to {np.abs(ours).max():.1f})")
    assert diff <= 2e-3 * max(1.0, float(np.abs(ours).max())), diff
    return diff


# Contractions, digits, runs of spaces, newlines, tabs, punctuation and non-ASCII text: the places where
# pre-tokenizer regexes differ.
_TOKENIZER_TEXTS = ["Hello, my name is", "I'm sure they'll say it's 12345 or 3.14159!",
                    "  two  spaces\n\nand\ttabs \n", "héllo wörld ünïcödé — 東京 😀", "hello world hell"]


# -- GGUF: the Llama family (Llama 3, Qwen2, Qwen3) ------------------------------------------------
#
# Each model is a random tiny one that transformers builds at test time, with shapes that make a wrong
# split or permutation show: 4 query heads over 2 key/value heads, Qwen3's head size 12 != 32 / 4, an
# MLP width (40) unlike anything else, and an embedding padded past its tokenizer (as Qwen's is).

_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_MERGES = [("h", "e"), ("l", "l"), ("he", "ll"), ("Ġ", "w")]
_SPECIALS = {"llama": ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"],
             "qwen2": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]}
_SPECIALS["qwen3"] = _SPECIALS["qwen2"]
VOCAB = 256 + len(_MERGES) + 3 + 2  # bytes, merges, specials, and 2 embedding rows no token uses
_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def write_family_tokenizer(directory, family: str, *, split: str | None = None, ignore_merges: bool | None = None):
    """A byte-level BPE tokenizer.json shaped like the family's own: Llama 3's or Qwen2's split regex,
    Llama 3's ignore_merges and BOS post-processor, its special tokens and tokenizer_config.json."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import Regex, decoders, models, pre_tokenizers, processors

    from scratchgpt.data.tokenizers import gpt2_byte_to_unicode

    llama = family == "llama"
    vocab = {c: i for i, c in enumerate(gpt2_byte_to_unicode()[b] for b in range(256))}
    for a, b in _MERGES:
        vocab[a + b] = len(vocab)
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=_MERGES,
                                          ignore_merges=llama if ignore_merges is None else ignore_merges))
    if split == "gpt2":  # GPT-2's tokenizer.json: the byte mapping with GPT-2's regex built in
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split or (_LLAMA3_SPLIT if llama else _QWEN2_SPLIT)), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(_SPECIALS[family])
    config = {"eos_token": "<|end_of_text|>" if llama else "<|im_end|>", "chat_template": _TEMPLATE}
    if llama:
        tok.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", vocab.__len__())])
        config["bos_token"] = "<|begin_of_text|>"
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(config))


def hf_family_model(family: str, *, tied: bool, seed: int = 0, **overrides):
    """A transformers Llama / Qwen2 / Qwen3 with every parameter random (norm gains and biases too)."""
    transformers = pytest.importorskip("transformers")
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tied)
    if family == "llama":  # with Llama 3's RoPE frequency scaling, which GGUF carries as rope_freqs
        config = transformers.LlamaConfig(**common, rms_norm_eps=1e-5, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}, **overrides)
    elif family == "qwen2":
        config = transformers.Qwen2Config(**common, rms_norm_eps=1e-6,
                                          rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    else:
        config = transformers.Qwen3Config(**common, head_dim=12, rms_norm_eps=1e-6,
                                          rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


@pytest.fixture(scope="module", params=[("llama", False, {}),
                                        ("llama", True, {"attention_bias": True, "mlp_bias": True}),
                                        ("qwen2", True, {}), ("qwen3", False, {})],
                ids=["llama", "llama-biases-tied", "qwen2", "qwen3"])
def exported_family(request, tmp_path_factory):
    """(family, transformers model, its folder, scratchgpt model, tokenizer, GGUF tensors, GGUF metadata)."""
    from scratchgpt.checkpoint import load_any
    from scratchgpt.export.gguf import export_gguf, read_gguf_state

    family, tied, overrides = request.param
    folder = tmp_path_factory.mktemp(family)
    hf = hf_family_model(family, tied=tied, seed=3, **overrides)
    hf.save_pretrained(folder)
    write_family_tokenizer(folder, family)
    model, tok = load_any(folder)
    path = export_gguf(model, tok, folder / "m.gguf", name="tiny")
    tensors, meta = read_gguf_state(path)
    return family, hf, folder, model, tok, tensors, meta


def _heads_to_adjacent_pairs(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Expected llama GGUF rows, spelled out row by row: in each head, HF rows j and j + hs/2 (one
    rotate-half RoPE pair) become rows 2j and 2j + 1 (llama.cpp's adjacent pair)."""
    hs = w.shape[0] // n_head
    rows = []
    for h in range(n_head):
        for j in range(hs // 2):
            rows += [w[h * hs + j], w[h * hs + hs // 2 + j]]
    return torch.stack(rows)


def test_gguf_llama_family_tensors_equal_the_transformers_weights(exported_family):
    family, hf, _, model, _, tensors, _ = exported_family
    c = hf.config
    sd = {k: v.detach() for k, v in hf.state_dict().items()}
    expected = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"]}
    if not c.tie_word_embeddings:
        expected["output.weight"] = sd["lm_head.weight"]
    for i in range(c.num_hidden_layers):
        hf_p, g = f"model.layers.{i}.", f"blk.{i}."
        pairs = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
                 "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                 "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}
        for theirs, ours in pairs.items():
            for kind in ("weight", "bias"):
                if f"{hf_p}{theirs}.{kind}" in sd:
                    expected[f"{g}{ours}.{kind}"] = sd[f"{hf_p}{theirs}.{kind}"]
        if family == "llama":  # llama.cpp's llama rotates adjacent pairs: q and k rows reordered per head
            for ours, heads in (("attn_q", c.num_attention_heads), ("attn_k", c.num_key_value_heads)):
                for kind in ("weight", "bias"):  # a bias row belongs to its weight row
                    if f"{g}{ours}.{kind}" in expected:
                        expected[f"{g}{ours}.{kind}"] = _heads_to_adjacent_pairs(expected[f"{g}{ours}.{kind}"], heads)
    if family == "llama":
        # llama.cpp divides each plain frequency by rope_freqs; transformers' own scaled frequencies say by what.
        hs = c.hidden_size // c.num_attention_heads
        plain = 1.0 / (500000.0 ** (torch.arange(0, hs, 2, dtype=torch.float64) / hs))
        factors = plain / hf.model.rotary_emb.inv_freq.double()
        assert factors.max() == pytest.approx(8.0) and 1.0 < factors.min() < 8.0  # scaled and blended bands
        assert torch.allclose(tensors["rope_freqs.weight"].double(), factors, rtol=1e-6)
        expected["rope_freqs.weight"] = tensors["rope_freqs.weight"]
    assert set(tensors) == set(expected)
    for name, value in expected.items():
        assert tensors[name].shape == value.shape, name
        assert torch.equal(tensors[name], value), name
    if family == "llama":  # and the inverse the module offers restores transformers' rows exactly
        from scratchgpt.export.gguf import rope_from_interleaved

        assert torch.equal(rope_from_interleaved(tensors["blk.1.attn_k.weight"], c.num_key_value_heads),
                           sd["model.layers.1.self_attn.k_proj.weight"])
    # The split halves are the ones the scratchgpt model computes with: gate first, then up (SwiGLU).
    gate, up = model.transformer.h[1].mlp.c_fc.weight.detach().chunk(2)
    assert torch.equal(tensors["blk.1.ffn_gate.weight"], gate) and torch.equal(tensors["blk.1.ffn_up.weight"], up)
    if family == "qwen2":
        assert {f"blk.0.attn_{x}.bias" for x in "qkv"} <= set(tensors) and "blk.0.attn_output.bias" not in tensors
    if c.tie_word_embeddings:
        assert "output.weight" not in tensors  # llama.cpp reads token_embd for the head then
    if family == "qwen3":
        assert tensors["blk.0.attn_q.weight"].shape == (4 * 12, 32) and tensors["blk.0.attn_k.weight"].shape == (24, 32)


def gguf_reference_logits(tensors: dict, meta: dict, ids: list[int]) -> torch.Tensor:
    """Logits (T, V) computed the way llama.cpp runs the file: from the GGUF tensors and metadata only,
    rotating adjacent channel pairs for "llama" (rope type NORM) and half-split pairs for qwen2/qwen3
    (NEOX), with rope_freqs dividing the frequencies when present."""
    arch = meta["general.architecture"]
    n_head, n_kv = meta[f"{arch}.attention.head_count"], meta[f"{arch}.attention.head_count_kv"]
    hs, eps = meta[f"{arch}.attention.key_length"], meta[f"{arch}.attention.layer_norm_rms_epsilon"]
    base, T = meta[f"{arch}.rope.freq_base"], len(ids)
    freq = base ** (-torch.arange(0, hs, 2, dtype=torch.float64) / hs)
    if "rope_freqs.weight" in tensors:
        freq = freq / tensors["rope_freqs.weight"].double()
    angle = torch.arange(T, dtype=torch.float64)[:, None, None] * freq  # (T, 1, hs/2)
    cos, sin = angle.cos().float(), angle.sin().float()

    def rope(x):  # (T, heads, hs)
        if arch == "llama":
            a, b = x[..., 0::2], x[..., 1::2]
            return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)
        a, b = x[..., : hs // 2], x[..., hs // 2 :]
        return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    def lin(x, name):
        y = x @ tensors[name + ".weight"].T
        return y + tensors[name + ".bias"] if name + ".bias" in tensors else y

    x = tensors["token_embd.weight"][ids]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for i in range(meta[f"{arch}.block_count"]):
        p = f"blk.{i}."
        h = rms(x, tensors[p + "attn_norm.weight"])
        q, k, v = (lin(h, p + n).view(T, -1, hs) for n in ("attn_q", "attn_k", "attn_v"))
        if p + "attn_q_norm.weight" in tensors:
            q, k = rms(q, tensors[p + "attn_q_norm.weight"]), rms(k, tensors[p + "attn_k_norm.weight"])
        q, k = rope(q), rope(k)
        k, v = k.repeat_interleave(n_head // n_kv, dim=1), v.repeat_interleave(n_head // n_kv, dim=1)
        scores = torch.einsum("thd,shd->hts", q, k) / hs**0.5
        att = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        x = x + lin(torch.einsum("hts,shd->thd", att, v).reshape(T, n_head * hs), p + "attn_output")
        h = rms(x, tensors[p + "ffn_norm.weight"])
        x = x + lin(torch.nn.functional.silu(lin(h, p + "ffn_gate")) * lin(h, p + "ffn_up"), p + "ffn_down")
    head = tensors.get("output.weight", tensors["token_embd.weight"])
    return rms(x, tensors["output_norm.weight"]) @ head.T


def test_gguf_llama_family_runs_to_the_transformers_logits(exported_family):
    """The file, read the way llama.cpp reads it (interleaved RoPE for llama, NeoX for Qwen), gives
    transformers' logits: a wrong permutation, split or RoPE setting would not."""
    _, hf, _, _, _, tensors, meta = exported_family
    ids = torch.randint(0, VOCAB, (17,), generator=torch.Generator().manual_seed(5)).tolist()
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits[0]
    assert (gguf_reference_logits(tensors, meta, ids) - theirs).abs().max().item() < 1e-4


def test_gguf_llama_family_metadata_and_vocabulary(exported_family):
    family, hf, _, _, tok, _, meta = exported_family
    c = hf.config
    arch = family
    hs = 12 if family == "qwen3" else 8
    assert meta["general.architecture"] == arch and meta["general.name"] == "tiny"
    assert meta["general.file_type"] == int(gguf.LlamaFileType.ALL_F32)
    assert {k: meta[f"{arch}.{k}"] for k in (
        "context_length", "embedding_length", "block_count", "feed_forward_length", "attention.head_count",
        "attention.head_count_kv", "attention.key_length", "attention.value_length", "rope.dimension_count",
        "vocab_size")} == {
        "context_length": 64, "embedding_length": 32, "block_count": 2, "feed_forward_length": 40,
        "attention.head_count": 4, "attention.head_count_kv": 2, "attention.key_length": hs,
        "attention.value_length": hs, "rope.dimension_count": hs, "vocab_size": VOCAB}
    assert meta[f"{arch}.rope.freq_base"] == (500000.0 if family == "llama" else 1000000.0)
    assert meta[f"{arch}.attention.layer_norm_rms_epsilon"] == pytest.approx(c.rms_norm_eps, rel=1e-6)
    # The tokenizer: byte-level BPE under the pre-tokenizer name llama.cpp picks its regex by.
    assert meta["tokenizer.ggml.model"] == "gpt2"
    assert meta["tokenizer.ggml.pre"] == ("llama-bpe" if family == "llama" else "qwen2")
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == VOCAB
    assert tokens[:3] == ["Ā", "ā", "Ă"] and tokens[32] == "Ġ" and tokens[104] == "h"  # bytes 0, 1, 2, space, h
    assert tokens[256:260] == ["he", "ll", "hell", "Ġw"]
    specials = _SPECIALS[family]
    assert tokens[260:263] == specials and tokens[263:] == ["[PAD263]", "[PAD264]"]
    assert types[:260] == [int(gguf.TokenType.NORMAL)] * 260
    assert types[260:263] == [int(gguf.TokenType.CONTROL)] * 3
    assert types[263:] == [int(gguf.TokenType.UNUSED)] * 2
    assert meta["tokenizer.ggml.merges"] == ["h e", "l l", "he ll", "Ġ w"]
    assert all(tokens[tok.encode(t)[0]] == t for t in ("hell", "he", "!"))  # ids agree with the tokenizer
    assert meta["tokenizer.ggml.eos_token_id"] == tok.eot_id == tokens.index(
        "<|end_of_text|>" if family == "llama" else "<|im_end|>")
    if family == "llama":  # Llama 3's tokenizer prepends <|begin_of_text|>; Qwen's adds nothing
        assert meta["tokenizer.ggml.bos_token_id"] == 260 and meta["tokenizer.ggml.add_bos_token"] is True
    else:  # and names <|endoftext|> as BOS (its config.json does; llama.cpp would take id 11 otherwise)
        assert meta["tokenizer.ggml.bos_token_id"] == 260 and meta["tokenizer.ggml.add_bos_token"] is False
        assert tokens[260] == "<|endoftext|>"
    assert meta["tokenizer.chat_template"] == _TEMPLATE


def test_gguf_llama_family_float16(exported_family, tmp_path):
    from scratchgpt.export.gguf import export_gguf

    family, _, _, model, tok, tensors32, _ = exported_family
    reader = gguf.GGUFReader(str(export_gguf(model, tok, tmp_path / "m16.gguf", dtype="float16")))
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == types["token_embd.weight"] == gguf.GGMLQuantizationType.F16
    assert types["blk.0.attn_norm.weight"] == types["output_norm.weight"] == gguf.GGMLQuantizationType.F32
    if family == "llama":
        assert types["rope_freqs.weight"] == gguf.GGMLQuantizationType.F32
    data = {t.name: np.array(t.data).astype(np.float32) for t in reader.tensors}
    ref = tensors32["blk.0.attn_k.weight"].numpy()
    assert np.abs(data["blk.0.attn_k.weight"].reshape(ref.shape) - ref).max() < 1e-3


def test_gguf_llama_family_q8_0_runs_to_the_transformers_logits(exported_family, tmp_path):
    from scratchgpt.export.gguf import export_gguf, read_gguf_state

    _, hf, _, model, tok, _, _ = exported_family
    path = export_gguf(model, tok, tmp_path / "m8.gguf", dtype="q8_0")
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(str(path)).tensors}
    assert gguf.GGMLQuantizationType.Q8_0 in types.values()
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    tensors, meta = read_gguf_state(path)  # dequantized
    ids = torch.randint(0, VOCAB, (17,), generator=torch.Generator().manual_seed(5)).tolist()
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits[0]
    # Q8_0 tolerance: 8-bit blocks of 32 move the logits by well under 1% of their norm.
    assert (gguf_reference_logits(tensors, meta, ids) - theirs).norm() / theirs.norm() < 0.01


def test_cli_exports_a_qwen3_folder(tmp_path, capsys):
    from scratchgpt.cli import main

    hf_family_model("qwen3", tied=True).save_pretrained(tmp_path / "hf")
    write_family_tokenizer(tmp_path / "hf", "qwen3")
    out = tmp_path / "q.gguf"
    assert main(["export", "--checkpoint", str(tmp_path / "hf"), "--format", "gguf", "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["format"] == "gguf"
    assert gguf.GGUFReader(str(out)).get_field("general.architecture").contents() == "qwen3"


def test_gguf_gpt2_model_with_a_tokenizer_json(tmp_path):
    """A GPT-2 model whose tokenizer is an HF tokenizer.json (e.g. a GPT-2 hub folder) exports too."""
    from scratchgpt.data.tokenizers import HFTokenizer
    from scratchgpt.export.gguf import export_gguf, read_gguf_state

    write_family_tokenizer(tmp_path, "qwen2", split="gpt2")
    tok = HFTokenizer.from_dir(tmp_path)
    model = tiny(VOCAB)
    tensors, meta = read_gguf_state(export_gguf(model, tok, tmp_path / "m.gguf"))
    assert meta["general.architecture"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    assert meta["tokenizer.ggml.tokens"][256:260] == ["he", "ll", "hell", "Ġw"]
    assert torch.equal(tensors["blk.0.attn_qkv.weight"], model.transformer.h[0].attn.c_attn.weight.detach())


def test_gguf_refuses_what_llama_cpp_would_run_differently(tmp_path):
    from scratchgpt.checkpoint import load_any
    from scratchgpt.config import LoRAConfig
    from scratchgpt.export.gguf import export_gguf
    from scratchgpt.training.lora import apply_lora

    def folder(name, family, **tok_kw):
        d = tmp_path / name
        hf_family_model(family, tied=True).save_pretrained(d)
        write_family_tokenizer(d, family, **tok_kw)
        return load_any(d)

    out = tmp_path / "out"
    out.mkdir()
    # A tokenizer llama.cpp has no regex for, or Llama 3's regex without Llama 3's whole-word lookup.
    model, tok = folder("odd_split", "qwen2", split=r"\p{L}+|\s+|.")
    with pytest.raises(ValueError, match="pre-tokenizer other than GPT-2's, Llama 3's or Qwen2's"):
        export_gguf(model, tok, out / "a.gguf")
    model, tok = folder("no_ignore", "llama", ignore_merges=False)
    with pytest.raises(ValueError, match="ignore_merges=False, which llama.cpp's 'llama-bpe'"):
        export_gguf(model, tok, out / "b.gguf")
    # Model variants llama.cpp's qwen architectures do not read.
    model, tok = folder("qwen3", "qwen3")
    biased = type(model)(dataclasses.replace(model.config, bias=True))
    with pytest.raises(ValueError, match="qwen3 architecture has no attention biases"):
        export_gguf(biased, tok, out / "c.gguf")
    scaled = type(model)(dataclasses.replace(model.config, rope_scaling_factor=8.0))
    with pytest.raises(ValueError, match="read only by llama.cpp's llama architecture; this model is qwen3"):
        export_gguf(scaled, tok, out / "d.gguf")
    softcap = type(model)(dataclasses.replace(model.config, logit_softcap=30.0))
    with pytest.raises(ValueError, match="GGUF export: .*logit_softcap"):
        export_gguf(softcap, tok, out / "e.gguf")
    apply_lora(model, LoRAConfig(rank=2))
    with pytest.raises(ValueError, match="LoRA adapters attached: merge them first"):
        export_gguf(model, tok, out / "f.gguf")
    assert not list(out.iterdir())  # nothing written, not even a partial file


def test_gguf_llama_family_runs_in_llama_cpp_with_the_same_greedy_tokens(exported_family):
    """Optional: needs llama-cpp-python (not installed by default; it builds from source)."""
    llama_cpp = pytest.importorskip("llama_cpp")

    family, _, folder, model, tok, _, _ = exported_family
    prompt = [104, 101, 108, 108, 111, 32, 119]
    assert_llama_cpp_runs_like_scratchgpt(llama_cpp, folder / "m.gguf", model, prompt)
    # llama.cpp's tokenizer (the pre-tokenizer named in the file, its merges, ignore_merges for Llama 3)
    # splits text as the tokenizer.json does, and adds BOS exactly when the tokenizer itself does.
    llm = llama_cpp.Llama(model_path=str(folder / "m.gguf"), n_ctx=64, verbose=False, vocab_only=True)
    for text in _TOKENIZER_TEXTS:
        assert llm.tokenize(text.encode(), add_bos=False) == tok.encode(text), text
        assert llm.detokenize(tok.encode(text)) == text.encode(), text
    end = "<|end_of_text|>" if family == "llama" else "<|im_end|>"
    bos = [tok.special_tokens["<|begin_of_text|>"]] if family == "llama" else []
    assert llm.token_bos() == tok.special_tokens["<|begin_of_text|>" if family == "llama" else "<|endoftext|>"]
    assert llm.token_eos() == tok.eot_id
    assert llm.tokenize(f"hello{end}".encode(), add_bos=True, special=True) == bos + tok.encode(
        f"hello{end}", allowed_special=True)


@pytest.fixture(scope="module", params=[{"head_dim": 12}, {"rope_scaling_factor": 8.0, "rope_theta": 500000.0}],
                ids=["head_dim", "rope_scaling"])
def qwen2_as_llama(request, tmp_path_factory):
    """A Qwen2-style scratchgpt model that llama.cpp's qwen2 architecture cannot hold (heads not spanning
    n_embd: it refuses to load them; Llama 3 RoPE scaling: it ignores rope_freqs), exported."""
    from scratchgpt.data.tokenizers import HFTokenizer
    from scratchgpt.export.gguf import export_gguf, read_gguf_state

    folder = tmp_path_factory.mktemp("qwen2_as_llama")
    write_family_tokenizer(folder, "qwen2")
    config = GPTConfig(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4, n_kv_head=2, n_inner=40,
                       pos_encoding="rope", norm="rmsnorm", activation="swiglu", bias=False, qkv_bias=True,
                       tie_word_embeddings=False, rope_original_n_positions=16, **request.param)
    model = GPT(config, generator=torch.Generator().manual_seed(0)).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # every parameter random, norm gains and biases too
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    path = export_gguf(model, HFTokenizer.from_dir(folder), folder / "m.gguf")
    return model, path, *read_gguf_state(path)


def test_gguf_qwen2_that_llama_cpps_qwen2_cannot_hold_is_written_as_llama(qwen2_as_llama):
    model, _, tensors, meta = qwen2_as_llama
    assert meta["general.architecture"] == "llama" and meta["tokenizer.ggml.pre"] == "qwen2"
    assert {"blk.0.attn_q.bias", "blk.0.attn_k.bias", "blk.0.attn_v.bias"} <= set(tensors)
    assert "blk.0.attn_output.bias" not in tensors
    assert ("rope_freqs.weight" in tensors) == (model.config.rope_scaling_factor is not None)
    ids = torch.randint(0, VOCAB, (17,), generator=torch.Generator().manual_seed(5)).tolist()
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0][0]
    assert (gguf_reference_logits(tensors, meta, ids) - ours).abs().max().item() < 1e-4


def test_gguf_qwen2_written_as_llama_runs_in_llama_cpp(qwen2_as_llama):
    """Optional: needs llama-cpp-python."""
    llama_cpp = pytest.importorskip("llama_cpp")
    model, path, _, _ = qwen2_as_llama
    assert_llama_cpp_runs_like_scratchgpt(llama_cpp, path, model, [104, 101, 108, 108, 111, 32, 119])


# -- ONNX ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def onnx_session(tmp_path_factory):
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    from scratchgpt.export.onnx import export_onnx

    model = tiny(97, seed=1)
    path = export_onnx(model, tmp_path_factory.mktemp("onnx") / "m.onnx")
    return model, ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _run(session, ids: torch.Tensor, keys: np.ndarray, values: np.ndarray):
    return session.run(None, {"input_ids": ids.numpy(), "past_keys": keys, "past_values": values})


def test_onnx_logits_match_pytorch_at_two_lengths_and_with_a_cache(onnx_session):
    from scratchgpt.export.onnx import empty_past

    model, session = onnx_session
    ids = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids)[0].numpy()
    keys, values = (t.numpy() for t in empty_past(model, batch_size=2))
    for T in (5, 17):  # two sequence lengths, no cache
        logits, k, v = _run(session, ids[:, :T], keys, values)
        assert np.abs(logits - ref[:, :T]).max() <= 1e-4
        assert k.shape == (2, 2, 4, T, 8)
    # With a cache: 10 tokens, then one, then a block of 13, each continuing the previous outputs.
    logits, k, v = _run(session, ids[:, :10], keys, values)
    step, k, v = _run(session, ids[:, 10:11], k, v)
    assert np.abs(step - ref[:, 10:11]).max() <= 1e-4
    block, k, v = _run(session, ids[:, 11:24], k, v)
    assert np.abs(block - ref[:, 11:24]).max() <= 1e-4
    assert k.shape[3] == 24


def test_onnx_export_prints_nothing(tmp_path):
    """torch's exporter warns and logs about itself on every export (a deprecated pytree class, axis
    names it shares, torchvision ops it skips); none of that reaches the user."""
    import os
    import subprocess
    import sys

    pytest.importorskip("onnxscript")
    script = ("import sys, torch\n"
              "from scratchgpt import GPT, GPTConfig\n"
              "from scratchgpt.export.onnx import export_onnx\n"
              "config = GPTConfig(vocab_size=97, n_positions=64, n_embd=32, n_layer=2, n_head=4)\n"
              "export_onnx(GPT(config, generator=torch.Generator().manual_seed(0)), sys.argv[1])\n")
    # A fresh process: the exporter says each thing once per process, and with Python's default warning
    # filters, as a user's run has them.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    run = subprocess.run([sys.executable, "-c", script, str(tmp_path / "m.onnx")], capture_output=True, text=True,
                         env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    assert (run.stdout, run.stderr) == ("", "")
    assert (tmp_path / "m.onnx").stat().st_size > 0


def test_onnx_greedy_decoding_with_the_cache_equals_scratchgpt(onnx_session):
    from scratchgpt.export.onnx import empty_past
    from scratchgpt.inference.generate import generate

    model, session = onnx_session
    prompt = [3, 1, 4, 1, 5]
    ours = generate(model, prompt, SamplingConfig(max_new_tokens=12, temperature=0.0, stop_at_eot=False))[0]
    keys, values = (t.numpy() for t in empty_past(model))
    ids, theirs = torch.tensor([prompt]), []
    for _ in range(12):
        logits, keys, values = _run(session, ids, keys, values)
        theirs.append(int(logits[0, -1].argmax()))
        ids = torch.tensor([[theirs[-1]]])
    assert theirs == ours
