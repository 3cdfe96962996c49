"""GGUF export (read back with gguf.GGUFReader) and ONNX export (onnxruntime logits == PyTorch)."""

from __future__ import annotations

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


def test_gguf_refuses_other_tokenizers_and_quantized_models(tmp_path, gpt2_tokenizer):
    from scratchgpt.data.tokenizer import build_tokenizer
    from scratchgpt.export.gguf import export_gguf
    from scratchgpt.inference.quantize import quantize_model

    chars = build_tokenizer("char", text="hello world")
    with pytest.raises(ValueError, match="embeds a GPT-2 BPE tokenizer; this model uses 'char'"):
        export_gguf(tiny(chars.vocab_size), chars, tmp_path / "c.gguf")
    with pytest.raises(ValueError, match="takes a float model"):
        export_gguf(quantize_model(tiny(gpt2_tokenizer.vocab_size)), gpt2_tokenizer, tmp_path / "q.gguf")
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
    from scratchgpt.inference.generate import generate

    model = tiny(gpt2_tokenizer.vocab_size, seed=4)
    path = export_gguf(model, gpt2_tokenizer, tmp_path / "m.gguf")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, verbose=False, logits_all=False)
    prompt = gpt2_tokenizer.encode("Hello, my name is")
    ours = generate(model, prompt, SamplingConfig(max_new_tokens=16, temperature=0.0, stop_at_eot=False))[0]
    theirs = []
    for tok in llm.generate(prompt, temp=0.0, top_k=1):
        theirs.append(tok)
        if len(theirs) == 16:
            break
    assert theirs == ours


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
