"""A tokenizer from a run directory (`load_tokenizer`, whatever its kind) or made for a corpus (`build_tokenizer`)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from scratchgpt.data.tokenizers.base import FORMAT_VERSION, TOKENIZER_FILE, Tokenizer, TokenizerKind
from scratchgpt.data.tokenizers.bpe import ByteBPETokenizer
from scratchgpt.data.tokenizers.char import CharTokenizer
from scratchgpt.data.tokenizers.gpt2 import GPT2Tokenizer, gpt2_tokenizer
from scratchgpt.data.tokenizers.hf import HFTokenizer, is_hf_tokenizer_json


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """The tokenizer saved in `directory` by `Tokenizer.save`, of whatever kind it is."""
    path = Path(directory) / TOKENIZER_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found; point at a run directory that holds one, or write it with Tokenizer.save()"
        )
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); re-save it with Tokenizer.save()") from None
    if is_hf_tokenizer_json(meta):
        return HFTokenizer.from_dir(directory)  # a model's own tokenizer.json (Llama, Qwen, ...)
    loaders = {"gpt2": GPT2Tokenizer.from_saved, "bpe": ByteBPETokenizer.from_saved,
               "char": CharTokenizer.from_saved}
    kind = meta.get("type") if isinstance(meta, dict) else None
    if kind not in loaders:
        raise ValueError(f"{path} has tokenizer type {kind!r}; expected one of {sorted(loaders)}")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(
            f"{path} has format_version {version!r} but this scratchgpt reads <= {FORMAT_VERSION}; upgrade"
        )
    try:
        return loaders[kind](Path(directory), meta)
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path} is malformed ({type(err).__name__}: {err}); re-save it") from None


def build_tokenizer(
    kind: TokenizerKind,
    *,
    text: str | Iterable[str] | None = None,
    vocab_size: int | None = None,
    gpt2_dir: str | Path | None = None,
) -> Tokenizer:
    """A tokenizer of `kind`: "gpt2" loads GPT-2's files; "bpe" and "char" train on `text` (or its pieces)."""
    if kind == "gpt2":
        tok = gpt2_tokenizer(gpt2_dir)
        if vocab_size is not None and vocab_size != tok.vocab_size:
            raise ValueError(f"the gpt2 tokenizer has {tok.vocab_size} tokens, not vocab_size={vocab_size}")
        return tok
    if kind not in ("bpe", "char"):
        raise ValueError(f"unknown tokenizer kind {kind!r}; choose one of ['gpt2', 'bpe', 'char']")
    if text is None:
        raise ValueError(f"a {kind!r} tokenizer is trained on text; pass text=")
    if kind == "bpe":
        if vocab_size is None:
            raise ValueError("a 'bpe' tokenizer needs vocab_size= (256 bytes + merges + 1 end-of-text token)")
        return ByteBPETokenizer.train(text, vocab_size)
    if vocab_size is not None:
        raise ValueError("a 'char' tokenizer's vocab_size follows from its text; leave vocab_size unset")
    return CharTokenizer.train(text)
