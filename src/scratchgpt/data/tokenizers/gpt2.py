"""GPT-2's BPE (50,257 tokens) through tiktoken, and GPT-2's two files: where they are found, how they
are downloaded (once, checked against tiktoken's pinned hashes) and how they are read.

The file format (encoder.json + vocab.bpe) is read here without tiktoken's file cache; the pure-Python
`ByteBPETokenizer` reads the same files (`bpe.py`), and a Hugging Face tokenizer.json spells bytes with
the same byte-to-unicode map (`hf.py`).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

import tiktoken
from tiktoken_ext.openai_public import r50k_pat_str

from scratchgpt.data.tokenizers.base import EOT_TEXT, TOKENIZER_FILE, Tokenizer, write_tokenizer_json

GPT2_DIR_ENV = "SCRATCHGPT_GPT2_DIR"
# GPT-2's pre-tokenisation regex as tiktoken spells it (possessive quantifiers, same splits as OpenAI's).
GPT2_PATTERN = r50k_pat_str

# The files tiktoken fetches for "gpt2", with the hashes tiktoken pins for them.
_GPT2_FILES: dict[str, tuple[str, str]] = {
    "encoder.json": (
        "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
        "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    ),
    "vocab.bpe": (
        "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
        "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    ),
}


# ---------------------------------------------------------------------------------------------
# GPT-2's file format (encoder.json + vocab.bpe), read without tiktoken's file cache
# ---------------------------------------------------------------------------------------------


def gpt2_byte_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte to the printable character that stands for it in its files."""
    # Printable Latin-1 bytes stand for themselves; the other 68 are shifted past 255 so that
    # whitespace and control bytes never appear raw in encoder.json or vocab.bpe.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    mapping = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + shifted)
            shifted += 1
    return mapping


def parse_gpt2_files(
    encoder_json: bytes, vocab_bpe: bytes, *, source: str = "GPT-2 files"
) -> tuple[list[int], list[tuple[int, int]], dict[str, int]]:
    """(byte_order, merges, special_tokens) from GPT-2's files; merge i makes token 256 + i."""
    try:
        encoder: dict[str, int] = json.loads(encoder_json)
        lines = vocab_bpe.decode("utf-8").split("\n")
        if lines and lines[0].startswith("#version"):
            lines = lines[1:]
        byte_order = [-1] * 256
        for b, char in gpt2_byte_to_unicode().items():
            byte_order[encoder[char]] = b
        merges = []
        for rank, line in enumerate(ln for ln in lines if ln):
            left, right = line.split()
            if encoder[left + right] != 256 + rank:
                raise ValueError(f"merge {rank} ({line!r}) has id {encoder[left + right]}, not {256 + rank}")
            merges.append((encoder[left], encoder[right]))
    except (ValueError, KeyError, IndexError) as err:
        kind = type(err).__name__
        raise ValueError(f"{source}: not a GPT-2 encoder.json/vocab.bpe pair ({kind}: {err})") from None
    n_merged = 256 + len(merges)
    specials = {text: i for text, i in encoder.items() if i >= n_merged}
    if -1 in byte_order or len(encoder) != n_merged + len(specials) or EOT_TEXT not in specials:
        raise ValueError(f"{source}: encoder.json does not match vocab.bpe (or lacks {EOT_TEXT!r})")
    return byte_order, merges, specials


def token_bytes(byte_order: Sequence[int], merges: Sequence[tuple[int, int]]) -> list[bytes]:
    """The bytes of every non-special token: the 256 single bytes, then one per merge."""
    vocab = [bytes([b]) for b in byte_order]
    for left, right in merges:
        vocab.append(vocab[left] + vocab[right])
    return vocab


# ---------------------------------------------------------------------------------------------
# Finding the files: a folder, $SCRATCHGPT_GPT2_DIR, or the user cache (downloaded once)
# ---------------------------------------------------------------------------------------------


def default_gpt2_cache_dir() -> Path:
    """Where downloaded GPT-2 files live: `$XDG_CACHE_HOME/scratchgpt/gpt2` or `~/.cache/scratchgpt/gpt2`."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "scratchgpt" / "gpt2"


# Hugging Face folders hold the same two files under other names.
_HF_NAMES = {"encoder.json": "vocab.json", "vocab.bpe": "merges.txt"}


def _gpt2_file(directory: Path, name: str) -> Path:
    """`directory/name`, or its Hugging Face-named twin when only that exists."""
    path = directory / name
    twin = directory / _HF_NAMES[name]
    return twin if not path.is_file() and twin.is_file() else path


def _has_gpt2_files(directory: Path) -> bool:
    return all(_gpt2_file(directory, name).is_file() for name in _GPT2_FILES)


def _download_gpt2_files(directory: Path) -> None:
    """Fetch the GPT-2 files missing from `directory`, checking tiktoken's pinned hashes."""
    for name, (url, sha256) in _GPT2_FILES.items():
        target = directory / name
        if target.is_file():
            continue
        try:
            with urllib.request.urlopen(url, timeout=60) as response:
                data = response.read()
        except OSError as err:  # URLError, timeouts and refused connections are all OSErrors
            reason = getattr(err, "reason", err)
            raise FileNotFoundError(
                f"GPT-2 BPE files are not in {directory} and downloading {url} failed ({reason}); "
                f"set {GPT2_DIR_ENV} to a folder holding encoder.json and vocab.bpe, or pass that folder"
            ) from None
        digest = hashlib.sha256(data).hexdigest()
        if digest != sha256:
            raise ValueError(f"download of {url} has sha256 {digest}, expected {sha256}; try again")
        directory.mkdir(parents=True, exist_ok=True)
        # Write then rename, so an interrupted download never leaves a truncated file behind.
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def find_gpt2_dir(path: str | Path | None = None) -> Path:
    """The folder with GPT-2's files: `path`, else $SCRATCHGPT_GPT2_DIR, else the cache (downloaded once)."""
    for directory, origin in ((path, "the given folder"), (os.environ.get(GPT2_DIR_ENV), f"${GPT2_DIR_ENV}")):
        if directory:
            directory = Path(directory)
            if not _has_gpt2_files(directory):
                raise FileNotFoundError(
                    f"{directory} ({origin}) lacks encoder.json and/or vocab.bpe; "
                    f"point at a folder holding GPT-2's two BPE files"
                )
            return directory
    cache = default_gpt2_cache_dir()
    if not _has_gpt2_files(cache):
        _download_gpt2_files(cache)
    return cache


# ---------------------------------------------------------------------------------------------
# The tokenizer
# ---------------------------------------------------------------------------------------------


class GPT2Tokenizer(Tokenizer):
    """OpenAI's GPT-2 BPE (50,257 tokens), encoded by tiktoken's Rust core."""

    name = "gpt2"

    def __init__(self, encoder_json: bytes, vocab_bpe: bytes) -> None:
        byte_order, merges, specials = parse_gpt2_files(encoder_json, vocab_bpe)
        ranks = {token: i for i, token in enumerate(token_bytes(byte_order, merges))}
        # Built from bytes in memory rather than tiktoken.load, which copies files into a cache dir.
        self._encoding = tiktoken.Encoding(
            name="gpt2",
            pat_str=GPT2_PATTERN,
            mergeable_ranks=ranks,
            special_tokens=specials,
            explicit_n_vocab=len(ranks) + len(specials),
        )
        self._specials = dict(specials)
        # Kept so `save` can write a run directory that reloads offline.
        self._files = {"encoder.json": encoder_json, "vocab.bpe": vocab_bpe}

    @classmethod
    def from_dir(cls, path: str | Path) -> GPT2Tokenizer:
        """The tokenizer from `path`/encoder.json + vocab.bpe (or HF's vocab.json + merges.txt)."""
        path = Path(path)
        if not _has_gpt2_files(path):
            raise FileNotFoundError(f"{path} lacks encoder.json and/or vocab.bpe; pass GPT-2's BPE folder")
        return cls(_gpt2_file(path, "encoder.json").read_bytes(), _gpt2_file(path, "vocab.bpe").read_bytes())

    @classmethod
    def from_saved(cls, directory: Path, meta: dict[str, Any]) -> GPT2Tokenizer:
        """The tokenizer `directory`'s tokenizer.json (`meta`) describes: GPT-2's files beside it."""
        tok = cls.from_dir(directory)
        if tok.vocab_size != meta["vocab_size"]:
            raise ValueError(
                f"{directory / TOKENIZER_FILE} says {meta['vocab_size']} tokens but the GPT-2 files hold "
                f"{tok.vocab_size}; re-save the tokenizer"
            )
        return tok

    @property
    def vocab_size(self) -> int:
        return self._encoding.n_vocab

    @property
    def files(self) -> Mapping[str, bytes]:
        """GPT-2's two files as read, by their OpenAI names: {"encoder.json": ..., "vocab.bpe": ...}."""
        return MappingProxyType(self._files)

    @property
    def special_tokens(self) -> Mapping[str, int]:
        return self._specials

    def _encode_ordinary(self, text: str) -> list[int]:
        return self._encoding.encode_ordinary(text)

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        try:
            return self._encoding.decode_bytes(ids)
        except (KeyError, OverflowError) as err:
            raise ValueError(f"invalid token id for a vocabulary of {self.vocab_size} ({err})") from None

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for name, data in self._files.items():
            (directory / name).write_bytes(data)
        write_tokenizer_json(
            directory,
            {"type": "gpt2", "vocab_size": self.vocab_size, "eot_id": self.eot_id,
             "files": sorted(self._files)},
        )

    def save_hf(self, directory: str | Path) -> None:
        """Write the files under Hugging Face's names, so `GPT2TokenizerFast.from_pretrained` reads them."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for name, data in self._files.items():
            (directory / _HF_NAMES[name]).write_bytes(data)


def gpt2_tokenizer(path: str | Path | None = None) -> GPT2Tokenizer:
    """GPT-2's tokenizer from `path`, $SCRATCHGPT_GPT2_DIR or the user cache (downloading once)."""
    return GPT2Tokenizer.from_dir(find_gpt2_dir(path))
