"""The one Hugging Face name map: GPT-2, Llama, Qwen2 and Qwen3 weights and config.json, both ways.

Pure functions on state dicts and config dicts (no I/O; `checkpoint.load_hf` / `save_hf` read and
write the folders). scratchgpt keeps GPT-2's parameter names for every family, so the map is:

    GPT2LMHeadModel                       scratchgpt
    transformer.*                         transformer.*     (Conv1D weights transposed)

    LlamaForCausalLM / Qwen2 / Qwen3      scratchgpt
    model.embed_tokens                    transformer.wte
    model.layers.{i}.input_layernorm      transformer.h.{i}.ln_1
    ...self_attn.{q,k,v}_proj             ...attn.c_attn    (stacked along the output rows: q; k; v)
    ...self_attn.o_proj                   ...attn.c_proj
    ...self_attn.{q,k}_norm               ...attn.{q,k}_norm   (Qwen3's QK-norm)
    ...post_attention_layernorm           ...ln_2
    ...mlp.{gate,up}_proj                 ...mlp.c_fc       (stacked: gate; up; see model.gpt.SwiGLU)
    ...mlp.down_proj                      ...mlp.c_proj
    model.norm                            transformer.ln_f
    lm_head                               lm_head           (absent when tied to the embedding)
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor

from scratchgpt.config import GPTConfig

# model_type in config.json -> the transformers class that reads it.
HF_ARCHITECTURES = {
    "gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
}


# ---------------------------------------------------------------------------------------------
# GPT-2: identity names, four transposes
# ---------------------------------------------------------------------------------------------

# HF's GPT-2 uses Conv1D, which stores weights as (in, out); nn.Linear stores (out, in). These four
# are the only weights that differ; every other name and tensor maps unchanged.
_TRANSPOSED_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def _is_transposed(name: str) -> bool:
    return name.endswith(_TRANSPOSED_SUFFIXES)


def _gpt2_to_scratchgpt(hf_items: Iterable[tuple[str, Tensor]]) -> dict[str, Tensor]:
    out = {}
    for name, tensor in hf_items:
        if name.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # old transformers saved its causal-mask buffers; we derive ours
        if not name.startswith(("transformer.", "lm_head.")):
            name = "transformer." + name  # saved from GPT2Model (e.g. OpenAI's own hub files)
        out[name] = tensor.t().contiguous() if _is_transposed(name) else tensor
    return out


# ---------------------------------------------------------------------------------------------
# Llama / Qwen2 / Qwen3: renamed, with q/k/v and gate/up stacked into our fused projections
# ---------------------------------------------------------------------------------------------

# Per-layer one-to-one renames (HF name inside model.layers.{i} -> ours inside transformer.h.{i}).
_LLAMA_LAYER_NAMES = {
    "input_layernorm": "ln_1",
    "post_attention_layernorm": "ln_2",
    "self_attn.o_proj": "attn.c_proj",
    "self_attn.q_norm": "attn.q_norm",
    "self_attn.k_norm": "attn.k_norm",
    "mlp.down_proj": "mlp.c_proj",
}
# Our fused projections and the HF projections stacked into them, in row order.
_LLAMA_STACKED = {
    "attn.c_attn": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.c_fc": ("mlp.gate_proj", "mlp.up_proj"),
}
_LLAMA_TOP_NAMES = {"model.embed_tokens": "transformer.wte", "model.norm": "transformer.ln_f", "lm_head": "lm_head"}
_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)")


def _llama_to_scratchgpt(hf_items: Iterable[tuple[str, Tensor]]) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    stacked: dict[tuple[str, str, str], dict[str, Tensor]] = {}  # (layer, ours, weight|bias) -> parts so far
    part_of = {hf: ours for ours, parts in _LLAMA_STACKED.items() for hf in parts}
    for name, tensor in hf_items:
        top, _, kind = name.rpartition(".")
        if top in _LLAMA_TOP_NAMES:
            out[f"{_LLAMA_TOP_NAMES[top]}.{kind}"] = tensor
            continue
        m = _LAYER.fullmatch(name)
        if m is None:
            if name.endswith("rotary_emb.inv_freq"):
                continue  # old transformers saved its RoPE buffer; ours is derived from the config
            raise ValueError(f"unexpected weight {name!r}: not part of a Llama/Qwen causal LM")
        layer, inner, kind = m.groups()
        if inner in _LLAMA_LAYER_NAMES:
            out[f"transformer.h.{layer}.{_LLAMA_LAYER_NAMES[inner]}.{kind}"] = tensor
        elif inner in part_of:
            ours = part_of[inner]
            parts = stacked.setdefault((layer, ours, kind), {})
            parts[inner] = tensor
            if len(parts) == len(_LLAMA_STACKED[ours]):  # complete: stack it now, so that its parts can go
                out[f"transformer.h.{layer}.{ours}.{kind}"] = torch.cat([parts[p] for p in _LLAMA_STACKED[ours]], dim=0)
                del stacked[(layer, ours, kind)]
        elif inner.endswith("rotary_emb.inv_freq"):
            continue
        else:
            raise ValueError(f"unexpected weight {name!r}: not part of a Llama/Qwen causal LM")
    if stacked:  # a group still waiting for some of its parts
        (layer, ours, kind), parts = next(iter(stacked.items()))
        missing = [p for p in _LLAMA_STACKED[ours] if p not in parts]
        raise ValueError(f"layer {layer}: {ours}.{kind} needs {missing} as well; the weights are incomplete")
    return out


def _scratchgpt_to_llama(state: dict[str, Tensor], config: GPTConfig) -> dict[str, Tensor]:
    ours_to_hf = {ours: hf for hf, ours in _LLAMA_LAYER_NAMES.items()}
    top = {ours: hf for hf, ours in _LLAMA_TOP_NAMES.items()}
    q, kv = config.n_head * config.head_size, config.kv_heads * config.head_size
    split_rows = {"attn.c_attn": [q, kv, kv], "mlp.c_fc": [config.mlp_hidden, config.mlp_hidden]}
    out: dict[str, Tensor] = {}
    for name, tensor in state.items():
        stem, _, kind = name.rpartition(".")
        if stem in top:
            out[f"{top[stem]}.{kind}"] = tensor
            continue
        _, _, layer, inner = stem.split(".", 3)  # transformer.h.{i}.{inner}
        if inner in ours_to_hf:
            out[f"model.layers.{layer}.{ours_to_hf[inner]}.{kind}"] = tensor
        elif inner in _LLAMA_STACKED:
            for hf, part in zip(_LLAMA_STACKED[inner], tensor.split(split_rows[inner], dim=0), strict=True):
                out[f"model.layers.{layer}.{hf}.{kind}"] = part.contiguous()
        else:
            raise ValueError(f"{name}: no Hugging Face Llama/Qwen name for this weight")
    return out


# ---------------------------------------------------------------------------------------------
# The name map (both directions) and config.json
# ---------------------------------------------------------------------------------------------


def hf_to_scratchgpt(hf_state: dict[str, Tensor], *, consume: bool = False) -> dict[str, Tensor]:
    """Map a GPT-2, Llama, Qwen2 or Qwen3 causal-LM state dict to scratchgpt names and layouts.

    consume=True empties `hf_state` entry by entry as it converts, so that each HF tensor can be freed once its
    transposed or stacked copy exists: loading a model then never holds its weights twice.
    """
    llama = any(name.startswith("model.") for name in hf_state)
    items = _drain(hf_state) if consume else hf_state.items()
    return _llama_to_scratchgpt(items) if llama else _gpt2_to_scratchgpt(items)


def _drain(state: dict[str, Tensor]) -> Iterator[tuple[str, Tensor]]:
    """(name, tensor) pairs of `state`, each removed from it as it is handed out."""
    while state:
        name = next(iter(state))
        yield name, state.pop(name)


def scratchgpt_to_hf(state: dict[str, Tensor], config: GPTConfig | None = None) -> dict[str, Tensor]:
    """Map scratchgpt weights to the HF family of `config` (GPT-2 when None): inverse of the above."""
    if config is not None and hf_model_type(config) != "gpt2":
        return _scratchgpt_to_llama(state, config)
    return {name: (t.t().contiguous() if _is_transposed(name) else t) for name, t in state.items()}


def hf_model_type(config: GPTConfig) -> str:
    """The HF model_type that expresses `config` exactly: gpt2, llama, qwen2 or qwen3; else ValueError."""
    gpt2_like = (config.pos_encoding == "learned" and config.norm == "layernorm"
                 and config.activation in ("gelu", "gelu_exact", "relu"))
    llama_like = config.pos_encoding == "rope" and config.norm == "rmsnorm" and config.activation == "swiglu"
    problems = []
    if config.logit_softcap is not None:
        problems.append(f"logit_softcap={config.logit_softcap}")
    if gpt2_like:
        if config.kv_heads != config.n_head or config.head_dim not in (None, config.n_embd // config.n_head):
            problems.append("grouped-query attention or a custom head_dim")
        if config.qk_norm:
            problems.append("qk_norm")
        if config.n_inner not in (None, 4 * config.n_embd):
            problems.append(f"n_inner={config.n_inner}")
        if not config.bias or config.attn_bias != config.bias:
            problems.append(f"bias={config.bias}, qkv_bias={config.qkv_bias} (GPT-2 always has biases in every "
                            f"Linear and LayerNorm)")
        model_type = "gpt2"
    elif llama_like:
        if config.qk_norm:
            model_type = "qwen3"  # Qwen3: q/k/v/o biases all on or all off, like Llama
            if config.attn_bias != config.bias:
                problems.append("qkv_bias differing from bias (Qwen3 has no such option)")
        elif config.attn_bias and not config.bias:
            model_type = "qwen2"  # Qwen2: biases on q, k, v only
        else:
            model_type = "llama"  # Llama: attention_bias and mlp_bias, both following `bias`
            if config.attn_bias != config.bias:
                problems.append("qkv_bias=False with bias=True (Llama's attention_bias covers q, k, v and o)")
    else:
        raise ValueError(
            "no Hugging Face architecture matches this model: GPT-2 needs pos_encoding=learned, norm=layernorm, "
            "activation=gelu|gelu_exact|relu; Llama/Qwen need pos_encoding=rope, norm=rmsnorm, activation=swiglu "
            "(this model: "
            f"{config.pos_encoding}, {config.norm}, {config.activation})"
        )
    if problems:
        raise ValueError(f"cannot export to Hugging Face {model_type}: it cannot express {'; '.join(problems)}")
    return model_type


# Hugging Face's names -> ours. Theirs "gelu" is the exact (erf) GELU; GPT-2's tanh approximation is "gelu_new".
_HF_ACTIVATIONS = {"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "gelu": "gelu_exact", "relu": "relu"}


def config_from_hf(hf: dict[str, Any], *, source: str = "config.json") -> GPTConfig:
    """GPTConfig from a Hugging Face config.json dict (gpt2, llama, qwen2, qwen3); unsupported variants refused."""
    model_type = hf.get("model_type")
    if model_type == "gpt2":
        return _gpt2_config_from_hf(hf, source)
    if model_type in ("llama", "qwen2", "qwen3"):
        try:
            return _llama_config_from_hf(hf, source)
        except KeyError as e:
            raise ValueError(f"{source}: {model_type} config lacks {e}") from None
    raise ValueError(f"{source}: model_type {model_type!r} is not one of {sorted(HF_ARCHITECTURES)}")


def _gpt2_config_from_hf(hf: dict[str, Any], source: str) -> GPTConfig:
    act = hf.get("activation_function", "gelu_new")
    if act not in _HF_ACTIVATIONS:
        raise ValueError(
            f"{source}: activation_function {act!r} is not supported; use one of {list(_HF_ACTIVATIONS)}"
        )
    n_inner = hf.get("n_inner")
    if n_inner not in (None, 4 * hf["n_embd"]):
        raise ValueError(f"{source}: n_inner={n_inner} is not supported (scratchgpt uses 4 * n_embd)")
    for flag, ok in (("scale_attn_by_inverse_layer_idx", False), ("reorder_and_upcast_attn", False),
                     ("scale_attn_weights", True)):
        if hf.get(flag, ok) != ok:
            raise ValueError(f"{source}: {flag}={hf[flag]} is not supported")
    return GPTConfig(
        vocab_size=hf["vocab_size"], n_positions=hf["n_positions"], n_embd=hf["n_embd"],
        n_layer=hf["n_layer"], n_head=hf["n_head"],
        embd_pdrop=hf.get("embd_pdrop", 0.1), resid_pdrop=hf.get("resid_pdrop", 0.1),
        attn_pdrop=hf.get("attn_pdrop", 0.1), layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
        initializer_range=hf.get("initializer_range", 0.02),
        tie_word_embeddings=hf.get("tie_word_embeddings", True), activation=_HF_ACTIVATIONS[act],
    )


def _rope_from_hf(hf: dict[str, Any], source: str) -> dict[str, Any]:
    """RoPE fields from either spelling: `rope_theta` + `rope_scaling` (published checkpoints,
    transformers 4) or `rope_parameters` (transformers 5)."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or {})
    theta = hf.get("rope_theta", params.get("rope_theta", 10000.0))
    merged = {**params, **scaling}
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    out: dict[str, Any] = {"rope_theta": float(theta)}
    if rope_type == "llama3":
        out.update(rope_scaling_factor=float(merged["factor"]), rope_low_freq_factor=float(merged["low_freq_factor"]),
                   rope_high_freq_factor=float(merged["high_freq_factor"]),
                   rope_original_n_positions=int(merged["original_max_position_embeddings"]))
    elif rope_type != "default":
        raise ValueError(f"{source}: RoPE scaling type {rope_type!r} is not supported (default or llama3 only)")
    return out


def _llama_config_from_hf(hf: dict[str, Any], source: str) -> GPTConfig:
    model_type = hf["model_type"]
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{source}: hidden_act {hf['hidden_act']!r} is not supported (SwiGLU uses silu)")
    if hf.get("use_sliding_window"):
        raise ValueError(f"{source}: use_sliding_window=true is not supported (full attention only)")
    if hf.get("pretraining_tp", 1) != 1:
        raise ValueError(f"{source}: pretraining_tp={hf['pretraining_tp']} is not supported")
    n_embd, n_head = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or n_embd // n_head
    if model_type == "qwen2":
        bias, qkv_bias = False, True  # Qwen2: biases on q, k, v and nowhere else
    else:
        bias = bool(hf.get("attention_bias", False))
        if model_type == "llama" and bool(hf.get("mlp_bias", False)) != bias:
            raise ValueError(f"{source}: attention_bias={bias} with mlp_bias={hf.get('mlp_bias')} is not "
                                  f"supported (scratchgpt has one `bias` switch for attention output and MLP)")
        qkv_bias = None
    try:
        return GPTConfig(
            vocab_size=hf["vocab_size"], n_positions=hf["max_position_embeddings"], n_embd=n_embd,
            n_layer=hf["num_hidden_layers"], n_head=n_head, n_kv_head=hf.get("num_key_value_heads") or n_head,
            head_dim=head_dim if head_dim * n_head != n_embd else None, n_inner=hf["intermediate_size"],
            pos_encoding="rope", norm="rmsnorm", activation="swiglu", qk_norm=model_type == "qwen3",
            bias=bias, qkv_bias=qkv_bias, layer_norm_epsilon=float(hf.get("rms_norm_eps", 1e-6)),
            initializer_range=hf.get("initializer_range", 0.02),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            embd_pdrop=0.0, resid_pdrop=0.0, attn_pdrop=float(hf.get("attention_dropout", 0.0)),
            **_rope_from_hf(hf, source),
        )
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None


def config_to_hf(config: GPTConfig) -> dict[str, Any]:
    """A Hugging Face config.json dict for `config` (GPT-2, Llama, Qwen2 or Qwen3, whichever expresses it)."""
    model_type = hf_model_type(config)
    if model_type == "gpt2":
        return {
            "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
            "vocab_size": config.vocab_size, "n_positions": config.n_positions, "n_ctx": config.n_positions,
            "n_embd": config.n_embd, "n_layer": config.n_layer, "n_head": config.n_head, "n_inner": None,
            "activation_function": {"gelu": "gelu_new", "gelu_exact": "gelu"}.get(config.activation, "relu"),
            "embd_pdrop": config.embd_pdrop, "resid_pdrop": config.resid_pdrop, "attn_pdrop": config.attn_pdrop,
            "layer_norm_epsilon": config.layer_norm_epsilon, "initializer_range": config.initializer_range,
            "tie_word_embeddings": config.tie_word_embeddings,
            # GPT-2's <|endoftext|> is 50256; a smaller (custom) vocabulary has no such id.
            "bos_token_id": 50256 if config.vocab_size > 50256 else None,
            "eos_token_id": 50256 if config.vocab_size > 50256 else None,
        }
    hf: dict[str, Any] = {
        "architectures": [HF_ARCHITECTURES[model_type]], "model_type": model_type,
        "vocab_size": config.vocab_size, "max_position_embeddings": config.n_positions,
        "hidden_size": config.n_embd, "intermediate_size": config.mlp_hidden,
        "num_hidden_layers": config.n_layer, "num_attention_heads": config.n_head,
        "num_key_value_heads": config.kv_heads, "head_dim": config.head_size, "hidden_act": "silu",
        "rms_norm_eps": config.layer_norm_epsilon, "initializer_range": config.initializer_range,
        "tie_word_embeddings": config.tie_word_embeddings, "attention_dropout": config.attn_pdrop,
        "rope_theta": config.rope_theta, "rope_scaling": None, "torch_dtype": "float32",
    }
    if config.rope_scaling_factor is not None:
        hf["rope_scaling"] = {
            "rope_type": "llama3", "factor": config.rope_scaling_factor,
            "low_freq_factor": config.rope_low_freq_factor, "high_freq_factor": config.rope_high_freq_factor,
            "original_max_position_embeddings": config.rope_original_n_positions,
        }
    if model_type == "llama":
        hf.update(attention_bias=config.bias, mlp_bias=config.bias)
    elif model_type == "qwen3":
        hf.update(attention_bias=config.bias)
    if model_type != "llama":
        hf.update(use_sliding_window=False, sliding_window=None)
    return hf
