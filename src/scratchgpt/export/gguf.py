"""Export a GPT-2-family model to GGUF, the file llama.cpp, Ollama and LM Studio load.

GGUF holds key-value metadata plus named tensors. We write what llama.cpp's "gpt2" architecture
reads: hyperparameters under `gpt2.*`, the tokenizer (GPT-2 byte-level BPE: token strings, token
types, merges, bos/eos ids) under `tokenizer.ggml.*`, and the weights under llama.cpp's tensor names
(taken from the `gguf` package's own tables, so they match what its converter writes):

    transformer.wte.weight        -> token_embd.weight         transformer.wpe.weight -> position_embd.weight
    h.N.ln_1 / ln_2               -> blk.N.attn_norm / ffn_norm
    h.N.attn.c_attn / c_proj      -> blk.N.attn_qkv / attn_output
    h.N.mlp.c_fc / c_proj         -> blk.N.ffn_up / ffn_down
    transformer.ln_f              -> output_norm               lm_head (untied only) -> output.weight

Our nn.Linear weights are (out, in), the layout llama.cpp expects, so no transposes are needed.
Supported: GPT-2 models (learned positions, LayerNorm, GELU) with the GPT-2 tokenizer. Other
families and tokenizers are refused with a one-line reason.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scratchgpt.model.gpt import GPT

GGUF_DTYPES = ("float32", "float16")


def _tensor_names(n_layer: int) -> dict[str, str]:
    """scratchgpt parameter name -> GGUF tensor name, from gguf's own name tables."""
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


def check_gguf_supported(model: GPT, tokenizer: Any) -> None:
    """A one-line error unless llama.cpp's gpt2 architecture can run this model and tokenizer."""
    c = model.config
    unsupported = []
    if c.pos_encoding != "learned":
        unsupported.append(f"pos_encoding={c.pos_encoding!r}")
    if c.activation != "gelu":
        unsupported.append(f"activation={c.activation!r}")
    for field, plain in (("norm", "layernorm"), ("n_kv_head", None), ("qk_norm", False), ("logit_softcap", None),
                         ("n_inner", None)):
        value = getattr(c, field, plain)
        if value != plain and not (field == "n_kv_head" and value == c.n_head) and not (
            field == "n_inner" and value == 4 * c.n_embd
        ):
            unsupported.append(f"{field}={value!r}")
    if not c.bias:
        unsupported.append("bias=False")
    if unsupported:
        raise ValueError(f"GGUF export supports GPT-2 models (llama.cpp's gpt2 architecture); this one has "
                         f"{', '.join(unsupported)}")
    if any(type(m).__name__ == "Int8Linear" for m in model.modules()):
        raise ValueError("GGUF export takes a float model; export the checkpoint without --quantize "
                         "(llama.cpp's llama-quantize makes Q8_0/Q4_K files from the exported one)")
    if getattr(tokenizer, "name", None) != "gpt2" or not hasattr(tokenizer, "_files"):
        raise ValueError(f"GGUF export embeds a GPT-2 BPE tokenizer; this model uses "
                         f"{getattr(tokenizer, 'name', type(tokenizer).__name__)!r}, which llama.cpp cannot run")


def gpt2_vocab(tokenizer: Any) -> tuple[list[str], list[int], list[str]]:
    """(tokens in id order as GPT-2's byte-to-unicode strings, token types, merges "a b") of a GPT2Tokenizer."""
    import gguf

    encoder: dict[str, int] = json.loads(tokenizer._files["encoder.json"])
    tokens = [""] * len(encoder)
    for text, i in encoder.items():
        tokens[i] = text
    specials = set(tokenizer.special_tokens.values())
    types = [int(gguf.TokenType.CONTROL if i in specials else gguf.TokenType.NORMAL) for i in range(len(tokens))]
    lines = tokenizer._files["vocab.bpe"].decode("utf-8").split("\n")
    merges = [ln for ln in lines if ln and not ln.startswith("#version")]
    return tokens, types, merges


def export_gguf(model: GPT, tokenizer: Any, path: str | Path, *, dtype: str = "float32",
                name: str = "scratchgpt") -> Path:
    """Write `model` and its GPT-2 tokenizer as a GGUF file for llama.cpp; returns the path.

    dtype "float16" halves the file (LayerNorms, biases and position embeddings stay float32,
    as llama.cpp's own converter does for 1-D tensors).
    """
    import gguf

    from scratchgpt.checkpoint import atomic_write

    if dtype not in GGUF_DTYPES:
        raise ValueError(f"unknown GGUF dtype {dtype!r}; choose one of {', '.join(GGUF_DTYPES)}")
    check_gguf_supported(model, tokenizer)
    c = model.config
    tokens, types, merges = gpt2_vocab(tokenizer)
    if len(tokens) != c.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokens)} tokens but the model's vocabulary is {c.vocab_size}")
    names = _tensor_names(c.n_layer)
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    if c.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # llama.cpp falls back to token_embd when output is absent

    def write(tmp: Path) -> None:
        w = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.GPT2])
        w.add_name(name)
        w.add_context_length(c.n_positions)
        w.add_embedding_length(c.n_embd)
        w.add_feed_forward_length(4 * c.n_embd)
        w.add_block_count(c.n_layer)
        w.add_head_count(c.n_head)
        w.add_layer_norm_eps(c.layer_norm_epsilon)
        w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if dtype == "float16" else gguf.LlamaFileType.ALL_F32)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("gpt-2")
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        w.add_bos_token_id(tokenizer.eot_id)  # GPT-2 uses <|endoftext|> for both
        w.add_eos_token_id(tokenizer.eot_id)
        for ours, tensor in state.items():
            if ours not in names:
                raise ValueError(f"no GGUF name for parameter {ours!r}")
            array = tensor.numpy()
            if dtype == "float16" and array.ndim == 2 and ours != "transformer.wpe.weight":
                array = array.astype(np.float16)
            w.add_tensor(names[ours], np.ascontiguousarray(array))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    path = Path(path)
    atomic_write(path, write)
    return path


def read_gguf_state(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors by GGUF name, a few metadata fields) read back with gguf.GGUFReader (for tests and checks)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    tensors = {}
    for t in reader.tensors:
        # GGUF lists dimensions fastest-first (ne); numpy's shape is the reverse.
        shape = tuple(int(d) for d in reversed(t.shape))
        tensors[t.name] = torch.from_numpy(np.array(t.data).reshape(shape).astype(np.float32))
    meta = {}
    for key in ("general.architecture", "tokenizer.ggml.model", "gpt2.context_length", "gpt2.embedding_length",
                "gpt2.block_count", "gpt2.attention.head_count", "tokenizer.ggml.eos_token_id"):
        field = reader.get_field(key)
        if field is not None:
            meta[key] = field.contents()
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type"):
        field = reader.get_field(key)
        if field is not None:
            meta[key] = field.contents()
    return tensors, meta
