"""Hugging Face interop for the Llama / Qwen2 / Qwen3 family: logits parity both ways, shards, presets.

GPT-2's import/export is tested in test_checkpoint.py. Here every model is a random tiny one that
transformers builds at test time, with odd shapes (3 query heads over 1 key/value head, vocab 97,
an odd MLP width) so that a wrong split, transpose or head grouping cannot cancel out.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from scratchgpt.checkpoint import load_any, load_hf, save_hf  # noqa: E402
from scratchgpt.config import GPTConfig  # noqa: E402
from scratchgpt.hf import config_from_hf, config_to_hf, hf_to_scratchgpt  # noqa: E402
from scratchgpt.model.gpt import GPT, KVCache, rope_inv_freq  # noqa: E402
from scratchgpt.tensor_files import CheckpointError  # noqa: E402

TOL = 1e-5

_TINY = dict(vocab_size=97, hidden_size=30, intermediate_size=37, num_hidden_layers=2, num_attention_heads=3,
             num_key_value_heads=1, max_position_embeddings=64)
# Each family with the options that make it itself: Llama 3 RoPE scaling, Qwen2's q/k/v biases,
# Qwen3's QK-norm and a head_dim that is not hidden_size / heads.
FAMILIES = {
    "llama": lambda tied: transformers.LlamaConfig(
        **_TINY, rms_norm_eps=1e-5, tie_word_embeddings=tied,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    "qwen2": lambda tied: transformers.Qwen2Config(
        **_TINY, rms_norm_eps=1e-6, tie_word_embeddings=tied,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    "qwen3": lambda tied: transformers.Qwen3Config(
        **_TINY, head_dim=8, rms_norm_eps=1e-6, tie_word_embeddings=tied,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
}


def random_hf_model(family: str, *, tied: bool, seed: int = 0):
    """A transformers model of `family` with every parameter random (norm gains and biases too)."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(FAMILIES[family](tied), attn_implementation="eager")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def ids(batch: int = 2, length: int = 11, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 97, (batch, length), generator=torch.Generator().manual_seed(seed))


def hf_logits(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).logits


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_import_matches_transformers(tmp_path, family, tied):
    hf = random_hf_model(family, tied=tied)
    hf.save_pretrained(tmp_path)
    ours = load_hf(tmp_path)
    cfg = ours.config
    assert (cfg.pos_encoding, cfg.norm, cfg.activation, cfg.n_head, cfg.kv_heads) == ("rope", "rmsnorm", "swiglu", 3, 1)
    assert cfg.qk_norm == (family == "qwen3") and cfg.attn_bias == (family == "qwen2")
    assert cfg.tie_word_embeddings == tied
    x = ids()
    with torch.no_grad():
        logits, _ = ours(x)
    assert (logits - hf_logits(hf, x)).abs().max().item() < TOL
    # The KV cache (one key/value head per layer) reproduces the same logits token by token.
    cache = KVCache.empty(cfg, batch_size=2, max_len=11)
    assert cache.k.shape[2] == 1
    with torch.no_grad():
        steps = torch.cat([ours(x[:, t : t + 1], kv_cache=cache)[0] for t in range(11)], dim=1)
    assert (steps - logits).abs().max().item() < TOL


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_export_loads_in_transformers_with_same_logits(tmp_path, family):
    hf = random_hf_model(family, tied=False, seed=1)
    hf.save_pretrained(tmp_path / "src")
    ours = load_hf(tmp_path / "src")
    save_hf(ours, tmp_path / "out")
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["model_type"] == family
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    assert type(again).__name__ == type(hf).__name__
    x = ids(seed=2)
    with torch.no_grad():
        logits, _ = ours(x)
    assert (hf_logits(again, x) - logits).abs().max().item() < TOL


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_our_own_random_model_round_trips_through_transformers(tmp_path, family):
    """Export a model scratchgpt initialised itself (not one that came from HF), for both directions."""
    config = GPTConfig(vocab_size=97, n_positions=64, n_embd=30, n_layer=2, n_head=3, n_kv_head=1, n_inner=37,
                       pos_encoding="rope", norm="rmsnorm", activation="swiglu", bias=False,
                       qk_norm=family == "qwen3", head_dim=8 if family == "qwen3" else None,
                       rope_theta=10000.0, layer_norm_epsilon=1e-6, tie_word_embeddings=True,
                       embd_pdrop=0.0, resid_pdrop=0.0, attn_pdrop=0.0)
    ours = GPT(config, generator=torch.Generator().manual_seed(3)).eval()
    save_hf(ours, tmp_path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    x = ids(seed=4)
    with torch.no_grad():
        logits, _ = ours(x)
    assert (hf_logits(theirs, x) - logits).abs().max().item() < TOL
    assert load_hf(tmp_path).config == config


def test_sharded_folders_both_ways(tmp_path):
    hf = random_hf_model("llama", tied=False, seed=5)
    hf.save_pretrained(tmp_path / "hf_sharded", max_shard_size="20KB")
    assert (tmp_path / "hf_sharded" / "model.safetensors.index.json").is_file()
    ours = load_hf(tmp_path / "hf_sharded")
    x = ids(seed=6)
    with torch.no_grad():
        logits, _ = ours(x)
    assert (logits - hf_logits(hf, x)).abs().max().item() < TOL

    save_hf(ours, tmp_path / "ours_sharded", max_shard_bytes=20_000)
    index = json.loads((tmp_path / "ours_sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (tmp_path / "ours_sharded" / "model.safetensors").exists()
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours_sharded").eval()
    assert (hf_logits(again, x) - logits).abs().max().item() < TOL
    with torch.no_grad():
        assert (load_hf(tmp_path / "ours_sharded")(x)[0] - logits).abs().max().item() == 0.0

    # A shard that the index names but the folder lacks is a clear error, not a half-loaded model.
    first = sorted(set(index["weight_map"].values()))[0]
    (tmp_path / "ours_sharded" / first).unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_hf(tmp_path / "ours_sharded")


def test_llama3_rope_scaling_matches_transformers():
    hf_cfg = FAMILIES["llama"](False)
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    theirs, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, "cpu")
    ours = rope_inv_freq(config_from_hf(hf_cfg.to_dict()))
    assert torch.allclose(ours, theirs, rtol=1e-6, atol=0)
    plain = rope_inv_freq(config_from_hf({**hf_cfg.to_dict(), "rope_parameters": {"rope_theta": 500000.0}}))
    assert not torch.allclose(ours, plain)  # the scaling really changed the low frequencies


def test_published_checkpoint_config_spelling(tmp_path):
    """Published Llama 3.2 config.json files spell RoPE as rope_theta + rope_scaling (transformers 4)."""
    published = {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 128256, "hidden_size": 2048,
        "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
        "head_dim": 64, "max_position_embeddings": 131072, "hidden_act": "silu", "rms_norm_eps": 1e-05,
        "rope_theta": 500000.0, "tie_word_embeddings": True, "attention_bias": False, "mlp_bias": False,
        "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    }
    config = config_from_hf(published)
    assert config == GPTConfig.from_name("llama-3.2-1b", initializer_range=config.initializer_range)
    assert config_from_hf(config_to_hf(config)) == config


def test_unsupported_hf_configs_are_refused_with_the_reason():
    good = FAMILIES["llama"](False).to_dict()
    with pytest.raises(ValueError, match="hidden_act"):
        config_from_hf({**good, "hidden_act": "gelu"})
    with pytest.raises(ValueError, match="yarn"):
        config_from_hf({**good, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}})
    with pytest.raises(ValueError, match="model_type"):
        config_from_hf({**good, "model_type": "mistral"})
    with pytest.raises(ValueError, match="unexpected weight"):
        hf_to_scratchgpt({"model.layers.0.self_attn.rotary.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="no Hugging Face architecture"):
        config_to_hf(GPTConfig(vocab_size=97, n_positions=8, n_embd=16, n_layer=1, n_head=2, pos_encoding="rope"))
    with pytest.raises(ValueError, match="logit_softcap"):
        config_to_hf(GPTConfig.from_name("qwen3-0.6b", logit_softcap=30.0))
    with pytest.raises(ValueError, match="qkv_bias=False with bias=True"):
        config_to_hf(GPTConfig.from_name("llama-3.2-1b", bias=True, qkv_bias=False))
    with pytest.raises(ValueError, match="relu2"):
        config_to_hf(GPTConfig.from_name("llama-3.2-1b", activation="relu2"))
    assert config_to_hf(GPTConfig.from_name("llama-3.2-1b", bias=True))["attention_bias"] is True


def test_load_hf_names_the_file_for_a_bad_family_config(tmp_path):
    random_hf_model("llama", tied=False).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "hidden_act": "gelu"}))
    with pytest.raises(CheckpointError, match="config.json: hidden_act"):
        load_hf(tmp_path)


def test_load_any_reads_tokenizer_json_and_chat_template(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    hf = random_hf_model("qwen3", tied=True, seed=7)
    hf.save_pretrained(tmp_path)
    write_tiny_tokenizer(tmp_path, tokenizers)
    model, tok = load_any(tmp_path)
    assert type(tok).__name__ == "HFTokenizer"
    assert tok.eot_id == 95 and tok.special_tokens["<|im_start|>"] == 96
    assert tok.decode(tok.encode("hello")) == "hello"
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids_ = tok.encode_chat([{"role": "user", "content": "hi"}])
    assert ids_[0] == 96 and ids_.count(95) == 1 and tok.decode(ids_) == text
    with pytest.raises(ValueError, match="messages\\[0\\]"):
        tok.encode_chat([{"role": "user", "content": "hi<|im_end|>"}])  # content cannot forge a turn
    # Saved into a scratchgpt run directory, the tokenizer reloads as itself (with its template).
    from scratchgpt.checkpoint import save_model

    save_model(model, tmp_path / "run", tokenizer=tok)
    _, tok2 = load_any(tmp_path / "run")
    assert tok2.encode_chat([{"role": "user", "content": "hi"}]) == ids_
    # Streaming decodes token by token: byte-level tokens map back to their bytes.
    assert b"".join(tok.decode_bytes([i]) for i in tok.encode("hello")) == b"hello"
    assert tok.decode_bytes([200]) == b""  # beyond the tokenizer, inside a rounded-up embedding
    with pytest.raises(ValueError, match="negative"):
        tok.decode_bytes([-1])


def write_tiny_tokenizer(directory, tokenizers) -> None:
    """A byte-level BPE over a 97-token vocabulary (95 byte tokens, no merges, + 2 specials)."""
    from tokenizers import decoders, models, pre_tokenizers

    from scratchgpt.data.tokenizers import gpt2_byte_to_unicode

    byte_char = gpt2_byte_to_unicode()
    needed = [byte_char[b] for b in sorted(set(b"hello hi user assistant\n"))]
    rest = [c for c in sorted(pre_tokenizers.ByteLevel.alphabet()) if c not in needed]
    vocab = {c: i for i, c in enumerate((needed + rest)[:95])}
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|im_end|>", "<|im_start|>"])
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": "<|im_end|>",
        "chat_template": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    }))


# ---------------------------------------------------------------------------------------------
# Presets: parameter counts equal the published models' (meta device: no memory, no init)
# ---------------------------------------------------------------------------------------------

# The published models' config.json values, and their parameter counts (unique tensors; the four
# models tie lm_head to the embedding). The literals are the models' published totals.
PUBLISHED = {
    "llama-3.2-1b": ("LlamaConfig", dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                         tie_word_embeddings=True), 1_235_814_400),
    "llama-3.2-3b": ("LlamaConfig", dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                                         num_attention_heads=24, num_key_value_heads=8, vocab_size=128256,
                                         tie_word_embeddings=True), 3_212_749_824),
    "qwen3-0.6b": ("Qwen3Config", dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                                       num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                                       vocab_size=151936, tie_word_embeddings=True), 596_049_920),
    "qwen3-1.7b": ("Qwen3Config", dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                                       num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                                       vocab_size=151936, tie_word_embeddings=True), 1_720_574_976),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_parameter_counts_equal_published_models(name):
    cls_name, hf_values, published = PUBLISHED[name]
    with torch.device("meta"):
        reference = transformers.AutoModelForCausalLM.from_config(getattr(transformers, cls_name)(**hf_values))
    reference_count = sum(p.numel() for p in reference.parameters())
    ours = GPT(GPTConfig.from_name(name), device="meta")
    assert ours.num_parameters() == reference_count == published
    # And the shapes agree tensor by tensor, through the one name map.
    theirs = {k: tuple(v.shape) for k, v in hf_to_scratchgpt(reference.state_dict()).items()}
    mine = {k: tuple(v.shape) for k, v in ours.state_dict().items() if k != "lm_head.weight"}
    theirs.pop("lm_head.weight", None)
    assert mine == theirs


def test_lora_on_an_imported_qwen3_merges_and_exports(tmp_path):
    """LoRA's default targets (attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj) are the fused
    projections, so they adapt q/k/v and gate/up of a Llama/Qwen import too; merged, it exports."""
    from scratchgpt.config import LoRAConfig
    from scratchgpt.training.lora import apply_lora, merge_lora

    random_hf_model("qwen3", tied=True, seed=8).save_pretrained(tmp_path / "hf")
    model = load_hf(tmp_path / "hf")
    wrapped = apply_lora(model, LoRAConfig(rank=2, alpha=4, dropout=0.0), generator=torch.Generator().manual_seed(0))
    assert "transformer.h.0.attn.c_attn" in wrapped and "transformer.h.1.mlp.c_fc" in wrapped
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.1)
    x = ids(seed=9)
    with torch.no_grad():
        adapted, _ = model(x)
        merge_lora(model)
        merged, _ = model(x)
    assert (merged - adapted).abs().max().item() < TOL
    save_hf(model, tmp_path / "merged")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", attn_implementation="eager")
    assert (hf_logits(theirs.eval(), x) - merged).abs().max().item() < TOL


def test_cli_generates_and_streams_from_a_qwen3_folder(tmp_path, capsys):
    from scratchgpt.cli import main

    random_hf_model("qwen3", tied=True, seed=10).save_pretrained(tmp_path)
    write_tiny_tokenizer(tmp_path, pytest.importorskip("tokenizers"))
    args = ["generate", "--checkpoint", str(tmp_path), "--prompt", "hello", "--max-new-tokens", "8",
            "--temperature", "0", "--stop-at-eot", "false"]
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert plain.startswith("hello") and len(plain) > len("hello")
    assert main([*args, "--stream"]) == 0
    assert capsys.readouterr().out == plain
    assert main(["info", "--checkpoint", str(tmp_path)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["tokenizer"] == "hf" and info["config"]["qk_norm"] is True


def test_llama_with_all_biases_round_trips(tmp_path):
    cfg = FAMILIES["llama"](False)
    cfg.attention_bias, cfg.mlp_bias = True, True
    torch.manual_seed(11)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.2)
    hf.save_pretrained(tmp_path / "hf")
    ours = load_hf(tmp_path / "hf")
    assert ours.config.bias and ours.config.attn_bias
    x = ids(seed=12)
    with torch.no_grad():
        logits, _ = ours(x)
    assert (logits - hf_logits(hf, x)).abs().max().item() < TOL
    save_hf(ours, tmp_path / "out")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert (hf_logits(again, x) - logits).abs().max().item() < TOL


# -- GPT.from_pretrained: nanoGPT's entry point, loading through checkpoint.load_hf ------------------------------


def random_hf_gpt2(seed: int = 0):
    """A tiny GPT2LMHeadModel (vocab 97, 3 heads of 10) with every parameter random, in eval mode."""
    config = transformers.GPT2Config(vocab_size=97, n_positions=64, n_embd=30, n_layer=2, n_head=3)
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen3"])
def test_from_pretrained_matches_transformers(tmp_path, family):
    hf = random_hf_gpt2(seed=7) if family == "gpt2" else random_hf_model(family, tied=False, seed=7)
    hf.save_pretrained(tmp_path)
    ours = GPT.from_pretrained(tmp_path)
    assert isinstance(ours, GPT) and not ours.training
    assert ours.config.pos_encoding == ("learned" if family == "gpt2" else "rope")
    x = ids(seed=8)
    with torch.no_grad():
        logits, _ = ours(x)
    assert (logits - hf_logits(hf, x)).abs().max().item() < TOL
    # dtype and config overrides reach the loader (nanoGPT's override_args: dropout).
    half = GPT.from_pretrained(str(tmp_path), dtype=torch.bfloat16, resid_pdrop=0.0)
    assert half.transformer.wte.weight.dtype == torch.bfloat16 and half.config.resid_pdrop == 0.0


def test_from_pretrained_hub_name_offline_is_one_line(monkeypatch, tmp_path):
    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache: nothing to fall back on
    monkeypatch.chdir(tmp_path)  # so "gpt2" cannot resolve to a local folder
    for name in ("gpt2", "gpt2-xl"):
        with pytest.raises(CheckpointError, match=f"{name}: could not download") as err:
            GPT.from_pretrained(name)
        assert "\n" not in str(err.value)
    with pytest.raises(CheckpointError, match="not a known hub name"):
        GPT.from_pretrained("gpt3")


def test_from_pretrained_without_the_loader_says_what_to_import(monkeypatch):
    from scratchgpt.model import gpt

    monkeypatch.setattr(gpt, "_pretrained_loader", None)
    with pytest.raises(RuntimeError, match="from scratchgpt import GPT"):
        GPT.from_pretrained("gpt2")


def test_the_package_gpt_has_its_loader_in_a_fresh_interpreter(tmp_path):
    # The import order a reader uses: nothing but `from scratchgpt import GPT`, as in nanoGPT's README.
    random_hf_gpt2(seed=9).save_pretrained(tmp_path)
    code = ("import sys; from scratchgpt import GPT; m = GPT.from_pretrained(sys.argv[1]); "
            "print(m.config.n_layer, m.num_parameters())")
    src = Path(__file__).resolve().parents[1] / "src"
    env = {**os.environ, "PYTHONPATH": f"{src}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, env=env,
                         check=True).stdout
    assert out.split() == ["2", str(load_hf(tmp_path).num_parameters())]
