"""Export a model to GGUF, the file llama.cpp, Ollama and LM Studio load.

GGUF holds key-value metadata plus named tensors. We write what llama.cpp's converter writes for
the matching Hugging Face model, under llama.cpp's tensor names (taken from the `gguf` package's
own tables), so the file runs in llama.cpp as if it had been converted from the HF folder:

    family (hf.hf_model_type)   GGUF architecture   extra tensors
    GPT-2                       gpt2                position_embd; fused attn_qkv
    Llama (3.x)                 llama               rope_freqs (Llama 3 RoPE scaling only)
    Qwen2 / Qwen2.5             qwen2               attn_q/k/v biases
      (custom head_dim or RoPE scaling)  llama      the same, q/k rows permuted (see below)
    Qwen3                       qwen3               attn_q_norm / attn_k_norm

GPT-2 names: h.N.ln_1 / attn.c_attn / attn.c_proj / ln_2 / mlp.c_fc / mlp.c_proj -> blk.N.attn_norm /
attn_qkv / attn_output / ffn_norm / ffn_up / ffn_down; a model without biases gets zero ones (llama.cpp's
gpt2 requires them). The Llama family goes through the one HF name
map (hf.scratchgpt_to_hf, which splits our fused c_attn into q/k/v and c_fc into gate/up) and then
gguf's own HF -> GGUF table: blk.N.attn_q, attn_k, attn_v, attn_output, attn_norm, ffn_gate, ffn_up,
ffn_down, ffn_norm; token_embd, output_norm, and output unless tied to the embedding.

Our nn.Linear weights are (out, in), the layout llama.cpp expects, so no transposes are needed. The
tokenizer goes in as byte-level BPE (tokenizer.ggml.model "gpt2": tokens, token types, merges,
bos/eos ids, and the pre-tokenizer name that selects llama.cpp's splitting regex): GPT-2's own, or
a Llama 3 / Qwen tokenizer.json. Anything llama.cpp could not reproduce exactly is refused with a
one-line reason rather than written as a file that would run wrongly.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from scratchgpt.config import GPTConfig
from scratchgpt.data.tokenizers import EOT_TEXT, GPT2_PATTERN, gpt2_byte_to_unicode
from scratchgpt.model.gpt import GPT, rope_inv_freq
from scratchgpt.model.quantize import quantized_mode

GGUF_DTYPES = ("float32", "float16", "q8_0", "q4_0")

# The splitting regex of a byte-level BPE tokenizer.json -> the pre-tokenizer name llama.cpp knows it
# by (llama.cpp carries its own copy of each regex and picks it by this name).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_TOKENIZERS = {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}


class GGUFVocab(NamedTuple):
    """What a GGUF file says about its tokenizer (tokenizer.ggml.*)."""

    tokens: list[str]  # id order, byte-level strings ("Ġthe"); "[PAD{i}]" fills ids the tokenizer lacks
    types: list[int]  # gguf.TokenType per token
    merges: list[str]  # "a b", rank order
    pre: str  # llama.cpp's pre-tokenizer name: gpt-2, llama-bpe, qwen2
    bos_id: int | None
    eos_id: int
    add_bos: bool | None  # whether the tokenizer itself prepends BOS (None: leave llama.cpp's default)
    chat_template: str | None


# ---------------------------------------------------------------------------------------------
# What can be exported
# ---------------------------------------------------------------------------------------------


def gguf_architecture(config: GPTConfig) -> str:
    """llama.cpp's architecture for `config` (gpt2, llama, qwen2, qwen3); a one-line ValueError if none fits."""
    if config.pos_encoding == "rope" or config.norm == "rmsnorm" or config.activation == "swiglu":
        return _llama_family_architecture(config)
    unsupported = []
    if config.pos_encoding != "learned":
        unsupported.append(f"pos_encoding={config.pos_encoding!r}")
    if config.activation != "gelu":
        unsupported.append(f"activation={config.activation!r}")
    for field, plain in (("n_kv_head", None), ("qk_norm", False), ("logit_softcap", None), ("n_inner", None)):
        value = getattr(config, field, plain)
        if value != plain and not (field == "n_kv_head" and value == config.n_head) and not (
            field == "n_inner" and value == 4 * config.n_embd
        ):
            unsupported.append(f"{field}={value!r}")
    if config.head_dim not in (None, config.n_embd // config.n_head):
        unsupported.append(f"head_dim={config.head_dim}")
    if unsupported:
        raise ValueError(f"GGUF export supports GPT-2 (learned positions, LayerNorm, GELU) and Llama/Qwen2/Qwen3 "
                         f"models (RoPE, RMSNorm, SwiGLU); this one has {', '.join(unsupported)}")
    return "gpt2"


def _llama_family_architecture(config: GPTConfig) -> str:
    from scratchgpt.hf import hf_model_type

    try:
        family = hf_model_type(config)  # the same rules that decide the HF export's model_type
    except ValueError as err:
        raise ValueError(f"GGUF export: {err}") from None
    if family == "qwen3" and config.attn_bias:
        raise ValueError("GGUF export: llama.cpp's qwen3 architecture has no attention biases; this Qwen3-style "
                         "model (qk_norm=True) has bias=True")
    if family == "qwen2" and (config.head_size * config.n_head != config.n_embd
                              or config.rope_scaling_factor is not None):
        # llama.cpp's qwen2 sizes the query and output projections as n_embd x n_embd (it refuses to load
        # heads that do not span n_embd) and reads no rope_freqs. Its llama architecture reads both, and
        # q/k/v biases too: with the rows permuted for its RoPE layout it computes this model exactly.
        return "llama"
    if family != "llama" and config.rope_scaling_factor is not None:
        raise ValueError(f"GGUF export: Llama 3 RoPE scaling is read only by llama.cpp's llama architecture; this "
                         f"model is {family} (rope_scaling_factor={config.rope_scaling_factor})")
    return family


def check_gguf_supported(model: GPT, tokenizer: Any) -> str:
    """llama.cpp's architecture for this model and tokenizer; a one-line ValueError if it cannot run them."""
    arch = gguf_architecture(model.config)
    if quantized_mode(model):
        raise ValueError("GGUF export takes a float model; export the checkpoint without --quantize "
                         "(--gguf-dtype q8_0 or q4_0 quantizes it for llama.cpp)")
    if any(".lora_" in name for name, _ in model.named_parameters()):
        raise ValueError("GGUF export takes a plain model; this one has LoRA adapters attached: merge them first "
                         "(scratchgpt finetune merge, or training.lora.merge_lora)")
    kind = getattr(tokenizer, "name", type(tokenizer).__name__)
    if not ((kind == "gpt2" and hasattr(tokenizer, "files")) or (kind == "hf" and hasattr(tokenizer, "tokenizer_json"))
            or (kind == "char" and hasattr(tokenizer, "chars")) or (kind == "bpe" and hasattr(tokenizer, "merges"))):
        raise ValueError(f"GGUF export embeds a byte-level BPE tokenizer (GPT-2's, a trained one, or a Llama 3 / "
                         f"Qwen tokenizer.json) or a char alphabet; this model uses {kind!r}, which llama.cpp "
                         f"cannot run")
    return arch


# ---------------------------------------------------------------------------------------------
# Tokenizer -> tokenizer.ggml.*
# ---------------------------------------------------------------------------------------------


def gpt2_vocab(tokenizer: Any) -> tuple[list[str], list[int], list[str]]:
    """(tokens in id order as GPT-2's byte-to-unicode strings, token types, merges "a b") of a GPT2Tokenizer."""
    import gguf

    encoder: dict[str, int] = json.loads(tokenizer.files["encoder.json"])
    tokens = [""] * len(encoder)
    for text, i in encoder.items():
        tokens[i] = text
    specials = set(tokenizer.special_tokens.values())
    types = [int(gguf.TokenType.CONTROL if i in specials else gguf.TokenType.NORMAL) for i in range(len(tokens))]
    lines = tokenizer.files["vocab.bpe"].decode("utf-8").split("\n")
    merges = [ln for ln in lines if ln and not ln.startswith("#version")]
    return tokens, types, merges


def _pre_tokenizer_name(spec: dict[str, Any]) -> str | None:
    """llama.cpp's name for a tokenizer.json `pre_tokenizer`, or None when it has none that matches exactly."""
    kind = spec.get("type")
    if kind == "ByteLevel":  # GPT-2: the byte mapping with GPT-2's own regex built in
        return "gpt-2" if spec.get("use_regex", True) and not spec.get("add_prefix_space") else None
    if kind != "Sequence" or len(spec.get("pretokenizers", [])) != 2:
        return None
    split, byte_level = spec["pretokenizers"]
    if (split.get("type") != "Split" or split.get("behavior") != "Isolated" or split.get("invert")
            or byte_level.get("type") != "ByteLevel" or byte_level.get("use_regex", True)
            or byte_level.get("add_prefix_space")):
        return None
    return _PRE_TOKENIZERS.get((split.get("pattern") or {}).get("Regex"))


def hf_vocab(tokenizer: Any, vocab_size: int) -> GGUFVocab:
    """The GGUF vocabulary of an HFTokenizer (byte-level BPE tokenizer.json); ValueError if llama.cpp
    could not tokenize exactly as it does."""
    import gguf

    spec = json.loads(tokenizer.tokenizer_json)
    model = spec.get("model") or {}
    decoder = spec.get("decoder") or {}
    decoders = [decoder.get("type")] + [d.get("type") for d in decoder.get("decoders", [])]

    def refuse(why: str) -> ValueError:
        return ValueError(f"GGUF export: this tokenizer.json {why}; llama.cpp's byte-level BPE could not "
                          f"reproduce it, so no file was written")

    if model.get("type") != "BPE" or "ByteLevel" not in decoders:
        raise refuse(f"is not byte-level BPE (model {model.get('type')!r}, decoder {decoders})")
    if model.get("byte_fallback") or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise refuse("uses byte_fallback or subword prefixes/suffixes")
    normalizer = (spec.get("normalizer") or {}).get("type")
    if normalizer not in (None, "NFC"):  # NFC leaves ordinary text unchanged; llama.cpp's converter ignores it too
        raise refuse(f"has a {normalizer} normalizer")
    pre = _pre_tokenizer_name(spec.get("pre_tokenizer") or {})
    if pre is None:
        raise refuse("splits text with a pre-tokenizer other than GPT-2's, Llama 3's or Qwen2's")
    # Llama 3 looks whole words up before merging (ignore_merges); llama.cpp does so exactly for llama-bpe.
    if bool(model.get("ignore_merges")) != (pre == "llama-bpe"):
        raise refuse(f"has ignore_merges={bool(model.get('ignore_merges'))}, which llama.cpp's {pre!r} "
                     f"pre-tokenizer does not")

    rust = tokenizer.backend
    vocab: dict[str, int] = rust.get_vocab(with_added_tokens=True)
    if max(vocab.values()) >= vocab_size:
        raise ValueError(f"the tokenizer has ids up to {max(vocab.values())} but the model's vocabulary is "
                         f"{vocab_size}; they do not belong together")
    added = rust.get_added_tokens_decoder()  # id -> AddedToken
    tokens, types = [], []
    by_id = {i: text for text, i in vocab.items()}
    for i in range(vocab_size):
        if i not in by_id:  # the embedding is padded past the tokenizer (Qwen: 151936 rows, 151665 tokens)
            tokens.append(f"[PAD{i}]")
            types.append(int(gguf.TokenType.UNUSED))
            continue
        tokens.append(by_id[i])
        if i in added:
            types.append(int(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED))
        else:
            types.append(int(gguf.TokenType.NORMAL))
    merges = []
    for merge in model.get("merges") or []:
        pair = merge.split(" ") if isinstance(merge, str) else list(merge)
        if len(pair) != 2 or any(" " in part for part in pair):
            raise refuse(f"has a merge {merge!r} that is not two space-free byte-level pieces")
        merges.append(" ".join(pair))

    bos = tokenizer.config.get("bos_token")
    if isinstance(bos, dict):
        bos = bos.get("content")
    bos_id = rust.token_to_id(bos) if isinstance(bos, str) else None
    # Whether BOS is added is the tokenizer's post-processor's business (Llama 3 adds <|begin_of_text|>):
    # ask it rather than parse its template.
    add_bos = bos_id is not None and rust.encode("a", add_special_tokens=True).ids[:1] == [bos_id]
    if bos_id is None:
        # No BOS (Qwen): llama.cpp would take id 11 (an ordinary token, "," in Qwen's vocabulary) as BOS.
        # Qwen's config.json names <|endoftext|>, so llama.cpp's converter writes that; it is never added.
        bos_id = rust.token_to_id(EOT_TEXT)
    return GGUFVocab(tokens, types, merges, pre, bos_id, tokenizer.eot_id, add_bos, tokenizer.chat_template)


def char_vocab(tokenizer: Any, vocab_size: int) -> GGUFVocab:
    """A char tokenizer as byte-level BPE: one token per character (its UTF-8 bytes in GPT-2's byte-to-unicode
    spelling), then <|endoftext|>, padded to `vocab_size`.

    ASCII characters are single bytes, so an ASCII alphabet needs no merges: BPE leaves every character
    its own token, exactly as the char tokenizer splits text. A multi-byte character (é, ’) is rebuilt
    from its bytes by a chain of merges (lead byte + next byte, then + the next, ...); every merge starts
    at a lead byte, so none can join two characters.
    """
    import gguf

    spell = gpt2_byte_to_unicode()
    tokens, merges = [], []
    for char in tokenizer.chars:
        pieces = [spell[b] for b in char.encode("utf-8")]
        for i in range(1, len(pieces)):
            merge = f"{''.join(pieces[:i])} {pieces[i]}"
            if merge not in merges:  # "—" and "“" share their first two bytes, so the first merge too
                merges.append(merge)
        tokens.append("".join(pieces))
    if not merges:
        # llama.cpp refuses a BPE vocabulary without a merges list, and gguf-py drops empty lists: one
        # merge that never applies (a word's symbols start as single characters; this left side is two).
        merges.append(f"{spell[32] * 2} {spell[32]}")
    types = [int(gguf.TokenType.NORMAL)] * len(tokens)
    tokens.append(EOT_TEXT)
    types.append(int(gguf.TokenType.CONTROL))
    if len(tokens) > vocab_size:
        raise ValueError(f"the tokenizer has {len(tokens)} tokens but the model's vocabulary is {vocab_size}")
    for i in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{i}]")
        types.append(int(gguf.TokenType.UNUSED))
    eot = tokenizer.eot_id
    return GGUFVocab(tokens, types, merges, "gpt-2", eot, eot, False, getattr(tokenizer, "chat_template", None))


def bpe_vocab(tokenizer: Any, vocab_size: int) -> GGUFVocab:
    """A byte-level BPE trained by scratchgpt (`tokenizer = "bpe"`) in GGUF's terms: every token's bytes in
    GPT-2's byte-to-unicode spelling, its merges as "left right", GPT-2's splitting regex.

    llama.cpp merges by token text, so two tokens with the same bytes (different merge paths can build
    the same string) or another splitting regex could not be run exactly: both are refused.
    """
    import gguf

    if tokenizer.pattern != GPT2_PATTERN:
        raise ValueError("GGUF export: this trained BPE tokenizer splits text with its own regex; llama.cpp's "
                         "gpt-2 pre-tokenizer knows only GPT-2's, so no file was written")
    spell = gpt2_byte_to_unicode()
    specials = {i: text for text, i in tokenizer.special_tokens.items()}
    tokens = [specials[i] if i in specials else "".join(spell[b] for b in tokenizer.decode_bytes([i]))
              for i in range(tokenizer.vocab_size)]
    seen: dict[str, int] = {}
    for i, text in enumerate(tokens):
        if text in seen:
            raise ValueError(f"GGUF export: tokens {seen[text]} and {i} of this trained BPE tokenizer are the same "
                             f"bytes ({text!r}); llama.cpp looks tokens up by text, so no file was written")
        seen[text] = i
    if len(tokens) > vocab_size:
        raise ValueError(f"the tokenizer has {len(tokens)} tokens but the model's vocabulary is {vocab_size}")
    types = [int(gguf.TokenType.CONTROL if i in specials else gguf.TokenType.NORMAL) for i in range(len(tokens))]
    for i in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{i}]")
        types.append(int(gguf.TokenType.UNUSED))
    merges = [f"{tokens[a]} {tokens[b]}" for a, b in tokenizer.merges]
    if not merges:  # llama.cpp needs the list, gguf-py drops an empty one (see char_vocab)
        merges.append(f"{spell[32] * 2} {spell[32]}")
    eot = tokenizer.eot_id
    return GGUFVocab(tokens, types, merges, "gpt-2", eot, eot, False, getattr(tokenizer, "chat_template", None))


def gguf_vocab(tokenizer: Any, vocab_size: int) -> GGUFVocab:
    """The GGUF vocabulary of a GPT-2 tokenizer, a trained byte-level BPE, an HF tokenizer.json one or a
    char alphabet, padded to `vocab_size`."""
    if getattr(tokenizer, "name", None) == "hf":
        return hf_vocab(tokenizer, vocab_size)
    if getattr(tokenizer, "name", None) == "char":
        return char_vocab(tokenizer, vocab_size)
    if getattr(tokenizer, "name", None) == "bpe":
        return bpe_vocab(tokenizer, vocab_size)
    tokens, types, merges = gpt2_vocab(tokenizer)
    if len(tokens) != vocab_size:
        raise ValueError(f"the tokenizer has {len(tokens)} tokens but the model's vocabulary is {vocab_size}")
    # GPT-2 uses <|endoftext|> for both; llama.cpp's gpt2 default (no BOS added) stays.
    return GGUFVocab(tokens, types, merges, "gpt-2", tokenizer.eot_id, tokenizer.eot_id, None, None)


# ---------------------------------------------------------------------------------------------
# Weights -> GGUF tensors
# ---------------------------------------------------------------------------------------------


def _gpt2_tensor_names(n_layer: int) -> dict[str, str]:
    """scratchgpt parameter name -> GGUF tensor name for GPT-2, from gguf's own name tables."""
    import gguf

    T, names = gguf.MODEL_TENSOR, gguf.TENSOR_NAMES
    out = {"transformer.wte.weight": names[T.TOKEN_EMBD] + ".weight",
           "transformer.wpe.weight": names[T.POS_EMBD] + ".weight",
           "lm_head.weight": names[T.OUTPUT] + ".weight"}
    for p in ("weight", "bias"):
        out[f"transformer.ln_f.{p}"] = f"{names[T.OUTPUT_NORM]}.{p}"
        for i in range(n_layer):
            ours = {"ln_1": T.ATTN_NORM, "attn.c_attn": T.ATTN_QKV, "attn.c_proj": T.ATTN_OUT,
                    "ln_2": T.FFN_NORM, "mlp.c_fc": T.FFN_UP, "mlp.c_proj": T.FFN_DOWN}
            for src, kind in ours.items():
                out[f"transformer.h.{i}.{src}.{p}"] = f"{names[kind].format(bid=i)}.{p}"
    return out


def _gpt2_tensors(state: dict[str, Tensor], config: GPTConfig) -> dict[str, Tensor]:
    names = _gpt2_tensor_names(config.n_layer)
    out = {}
    for ours, tensor in state.items():
        if ours not in names:
            raise ValueError(f"no GGUF name for parameter {ours!r}")
        out[names[ours]] = tensor
    # llama.cpp's gpt2 architecture requires every bias (norms and projections). A model trained
    # without them (bias=False) computes exactly what zero biases compute, so those are written.
    for ours, theirs in names.items():
        weight = state.get(ours.removesuffix(".bias") + ".weight")
        if ours.endswith(".bias") and ours not in state and weight is not None:
            out[theirs] = torch.zeros(weight.shape[0], dtype=weight.dtype)
    return out


def rope_to_interleaved(w: Tensor, n_head: int) -> Tensor:
    """Reorder the rows of a q or k projection (weight (nh·hs, C) or bias (nh·hs,)) from rotate-half
    RoPE pairs to adjacent pairs: within each head, row i -> 2i and row i + hs/2 -> 2i + 1.

    Why: scratchgpt (like HF Llama/Qwen) rotates channel pairs (i, i + hs/2), the GPT-NeoX layout;
    llama.cpp's "llama" architecture rotates (2i, 2i + 1), the original GPT-J/Meta layout. RoPE acts
    on q and k only through these pairs and attention only uses q·k, so moving each pair's two rows
    together (the same permutation for q and k) leaves every score unchanged. llama.cpp's "qwen2" and
    "qwen3" use the NeoX layout themselves and take the rows as they are.
    """
    hs = w.shape[0] // n_head
    # (nh, 2, hs/2, ...) = [head][which half][pair index] -> (nh, hs/2, 2, ...) = [head][pair][member]
    return w.reshape(n_head, 2, hs // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def rope_from_interleaved(w: Tensor, n_head: int) -> Tensor:
    """The inverse of `rope_to_interleaved`: adjacent pairs back to rotate-half (for checks and readers)."""
    hs = w.shape[0] // n_head
    return w.reshape(n_head, hs // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def llama3_rope_factors(config: GPTConfig) -> Tensor:
    """(hs/2,) float32 divisors llama.cpp applies to the plain RoPE frequencies (its rope_freqs tensor):
    1 for fast rotations, `rope_scaling_factor` for slow ones, the Llama 3 blend between."""
    plain = rope_inv_freq(dataclasses.replace(config, rope_scaling_factor=None))
    return (plain.double() / rope_inv_freq(config).double()).float()


def _llama_tensors(state: dict[str, Tensor], config: GPTConfig, arch: str) -> dict[str, Tensor]:
    import gguf

    from scratchgpt.hf import scratchgpt_to_hf

    # Through the one HF name map (it splits c_attn into q/k/v and c_fc into gate/up), then gguf's
    # HF -> GGUF table, exactly the names llama.cpp's own converter reads.
    hf_state = scratchgpt_to_hf(state, config)
    table = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config.n_layer)
    out = {}
    for name, tensor in hf_state.items():
        if arch == "llama" and ".self_attn.q_proj." in name:
            tensor = rope_to_interleaved(tensor, config.n_head)
        elif arch == "llama" and ".self_attn.k_proj." in name:
            tensor = rope_to_interleaved(tensor, config.kv_heads)
        gguf_name = table.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ValueError(f"no GGUF {arch} tensor for {name!r}")
        out[gguf_name] = tensor
    if config.rope_scaling_factor is not None:  # only "llama" gets here (gguf_architecture)
        out[gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"] = llama3_rope_factors(config)
    return out


def gguf_tensors(model: GPT, arch: str) -> dict[str, Tensor]:
    """GGUF tensor name -> float32 CPU tensor, in llama.cpp's layout for `arch`."""
    c = model.config
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    if c.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # llama.cpp falls back to token_embd when output is absent
    return _gpt2_tensors(state, c) if arch == "gpt2" else _llama_tensors(state, c, arch)


# ---------------------------------------------------------------------------------------------
# The file
# ---------------------------------------------------------------------------------------------


def export_gguf(model: GPT, tokenizer: Any, path: str | Path, *, dtype: str = "float32",
                name: str = "scratchgpt") -> Path:
    """Write `model` and its tokenizer as a GGUF file for llama.cpp; returns the path.

    dtype "float16" halves the file, "q8_0" (llama.cpp's int8: blocks of 32 weights with one float16
    scale, quantized by gguf-py's bit-exact port of ggml's quantizer) nearly quarters it, "q4_0" (its
    int4: blocks of 32 4-bit weights with one float16 scale, 18 bytes per 32 weights, by the same port)
    takes about a seventh. Whatever the dtype only matrices change: norms, biases, position embeddings
    and rope_freqs stay float32, and a matrix whose rows are not a multiple of 32 goes to float16, as
    llama.cpp's own converter does.
    """
    import gguf

    from scratchgpt.files import atomic_write

    if dtype not in GGUF_DTYPES:
        raise ValueError(f"unknown GGUF dtype {dtype!r}; choose one of {', '.join(GGUF_DTYPES)}")
    arch = check_gguf_supported(model, tokenizer)
    c = model.config
    vocab = gguf_vocab(tokenizer, c.vocab_size)
    tensors = gguf_tensors(model, arch)
    keep_f32 = {gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.POS_EMBD] + ".weight"}

    def write(tmp: Path) -> None:
        w = gguf.GGUFWriter(str(tmp), arch)
        w.add_name(name)
        w.add_context_length(c.n_positions)
        w.add_embedding_length(c.n_embd)
        w.add_block_count(c.n_layer)
        w.add_head_count(c.n_head)
        if arch == "gpt2":
            w.add_feed_forward_length(4 * c.n_embd)
            w.add_layer_norm_eps(c.layer_norm_epsilon)
        else:
            w.add_feed_forward_length(c.mlp_hidden)
            w.add_head_count_kv(c.kv_heads)
            w.add_key_length(c.head_size)  # Qwen3's head size is not n_embd / n_head
            w.add_value_length(c.head_size)
            w.add_rope_dimension_count(c.head_size)
            w.add_rope_freq_base(c.rope_theta)
            w.add_layer_norm_rms_eps(c.layer_norm_epsilon)
            w.add_vocab_size(c.vocab_size)
        w.add_file_type({"float32": gguf.LlamaFileType.ALL_F32, "float16": gguf.LlamaFileType.MOSTLY_F16,
                         "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[dtype])
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(vocab.pre)
        w.add_token_list(vocab.tokens)
        w.add_token_types(vocab.types)
        w.add_token_merges(vocab.merges)
        if vocab.bos_id is not None:
            w.add_bos_token_id(vocab.bos_id)
        w.add_eos_token_id(vocab.eos_id)
        if vocab.add_bos is not None:
            w.add_add_bos_token(vocab.add_bos)
        if vocab.chat_template:
            w.add_chat_template(vocab.chat_template)
        for gguf_name, tensor in tensors.items():
            array, raw_dtype = tensor.numpy(), None
            if dtype != "float32" and array.ndim == 2 and gguf_name not in keep_f32:
                array, raw_dtype = _encode_matrix(array, dtype)
            w.add_tensor(gguf_name, np.ascontiguousarray(array), raw_dtype=raw_dtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    path = Path(path)
    atomic_write(path, write)
    return path


def _encode_matrix(array: np.ndarray, dtype: str) -> tuple[np.ndarray, Any]:
    """A 2-D float32 matrix as GGUF stores it for `dtype`: (data, raw GGML type or None for numpy's own)."""
    import gguf

    kind = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}.get(dtype)
    if kind is not None:
        try:
            return gguf.quants.quantize(array, kind), kind
        except gguf.QuantError:  # rows not a multiple of the 32-value blocks
            pass
    return array.astype(np.float16), None


def read_gguf_state(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors by GGUF name as float32, quantized ones dequantized; every metadata field but the GGUF
    header's) read back with gguf.GGUFReader (for tests and checks)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    tensors = {}
    for t in reader.tensors:
        # GGUF lists dimensions fastest-first (ne); numpy's shape is the reverse.
        shape = tuple(int(d) for d in reversed(t.shape))
        values = gguf.quants.dequantize(np.array(t.data), t.tensor_type)
        tensors[t.name] = torch.from_numpy(values.reshape(shape).astype(np.float32))
    meta = {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}
    return tensors, meta
