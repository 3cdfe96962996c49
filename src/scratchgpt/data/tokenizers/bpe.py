"""Byte-level BPE in pure Python: trained from scratch (`bpe_train.py`), or loaded from GPT-2's merges.

GPT-2's regex cuts text into pre-token chunks (`Pretokenizer`, which agrees with tiktoken on every
character), then each chunk's bytes are joined by the ranked merges. Loaded with GPT-2's own files it
gives exactly tiktoken's ids, which makes it the readable twin of `GPT2Tokenizer`.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from itertools import pairwise
from pathlib import Path
from typing import Any

import regex
import tiktoken

from scratchgpt.data.tokenizers.base import EOT_TEXT, Tokenizer, write_tokenizer_json
from scratchgpt.data.tokenizers.bpe_train import merge, train_merges
from scratchgpt.data.tokenizers.gpt2 import GPT2_PATTERN, parse_gpt2_files, token_bytes

# Chunks remembered by each tokenizer before the memo starts afresh: bounds memory on unbounded text.
_CHUNK_CACHE_LIMIT = 100_000


def _utf8(text: str) -> bytes:
    """UTF-8 of `text`, with lone surrogates (not encodable) made U+FFFD as tiktoken does."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace").encode("utf-8")


class Pretokenizer:
    """Splits text into chunks with a GPT-2-style regex, agreeing with tiktoken on every character.

    The `regex` package and tiktoken's Rust regex ship different Unicode versions, so for recently
    assigned characters they disagree on `\\p{L}` / `\\p{N}` (e.g. U+18EB9 is a letter to `regex`
    2026, unassigned to tiktoken: `chr(0x18EB9) + "'ve"` splits differently). tiktoken is the
    reference, so each non-ASCII character is classified once by tiktoken itself (a pattern matching
    one class; text it does not match is skipped) and, where the two disagree, the pattern's classes
    are amended for exactly those characters. ASCII text takes the plain compiled pattern.
    """

    _CLASSES = (r"\p{L}", r"\p{N}")

    def __init__(self, pattern: str = GPT2_PATTERN) -> None:
        self.pattern = pattern
        self._plain = regex.compile(pattern)
        self._compiled = self._plain
        self._amend = any(c in pattern for c in self._CLASSES)
        self._seen: set[str] = set()
        self._extra: dict[str, set[str]] = {c: set() for c in self._CLASSES}  # tiktoken says yes, regex no
        self._missing: dict[str, set[str]] = {c: set() for c in self._CLASSES}  # regex says yes, tiktoken no
        self._probes: dict[str, tiktoken.Encoding] = {}

    def findall(self, text: str) -> list[str]:
        if text.isascii() or not self._amend:
            return self._plain.findall(text)
        new = {c for c in set(text) - self._seen if ord(c) > 127 and not 0xD800 <= ord(c) <= 0xDFFF}
        if new:
            self._classify(new)
        return self._compiled.findall(text)

    def _in_class_per_tiktoken(self, cls: str, chars: str) -> set[str]:
        probe = self._probes.get(cls)
        if probe is None:
            probe = self._probes[cls] = tiktoken.Encoding(
                f"scratchgpt-probe-{len(self._probes)}", pat_str=cls,
                mergeable_ranks={bytes([b]): b for b in range(256)}, special_tokens={},
            )
        return set(probe.decode(probe.encode_ordinary(chars)))

    def _classify(self, chars: set[str]) -> None:
        self._seen |= chars
        text = "".join(sorted(chars))
        changed = False
        for cls in self._CLASSES:
            theirs = self._in_class_per_tiktoken(cls, text)
            ours = set(regex.findall(cls, text))
            extra, missing = theirs - ours, ours - theirs
            if extra or missing:
                self._extra[cls] |= extra
                self._missing[cls] |= missing
                changed = True
        if changed:
            pattern = self.pattern
            for cls in self._CLASSES:
                add = "".join(regex.escape(c) for c in sorted(self._extra[cls]))
                drop = "".join(regex.escape(c) for c in sorted(self._missing[cls]))
                amended = f"[{cls}{add}" + (f"--[{drop}]" if drop else "") + "]"
                pattern = pattern.replace(cls, amended)
            self._compiled = regex.compile(pattern, flags=regex.V1)


class ByteBPETokenizer(Tokenizer):
    """Byte-level BPE in pure Python: GPT-2's regex splits text, then ranked merges join bytes."""

    name = "bpe"

    def __init__(
        self,
        merges: Sequence[tuple[int, int]],
        *,
        special_tokens: Mapping[str, int] | None = None,
        byte_order: Sequence[int] | None = None,
        pattern: str = GPT2_PATTERN,
    ) -> None:
        """Merge i joins pair `merges[i]` into id 256 + i; `byte_order[i]` is the byte of id i (< 256)."""
        byte_order = list(range(256)) if byte_order is None else [int(b) for b in byte_order]
        if sorted(byte_order) != list(range(256)):
            raise ValueError("byte_order must be a permutation of the 256 byte values")
        self._merges = tuple((int(a), int(b)) for a, b in merges)
        for i, (a, b) in enumerate(self._merges):
            if not (0 <= a < 256 + i and 0 <= b < 256 + i):
                raise ValueError(f"merge {i} ({a}, {b}) refers to a token that does not exist yet")
        self._merge_ids = {pair: 256 + i for i, pair in enumerate(self._merges)}
        if len(self._merge_ids) != len(self._merges):
            raise ValueError("merges hold the same pair twice")
        n_merged = 256 + len(self._merges)
        if special_tokens is None:
            special_tokens = {EOT_TEXT: n_merged}
        self._specials = dict(special_tokens)
        if sorted(self._specials.values()) != list(range(n_merged, n_merged + len(self._specials))):
            raise ValueError(f"special token ids must run {n_merged}, {n_merged + 1}, ... after the merges")
        if EOT_TEXT not in self._specials:
            raise ValueError(f"special_tokens must include {EOT_TEXT!r}")
        self._byte_order = byte_order
        self._byte_ids = [0] * 256
        for token_id, b in enumerate(byte_order):
            self._byte_ids[b] = token_id
        self._vocab = token_bytes(byte_order, self._merges)
        for text, _ in sorted(self._specials.items(), key=lambda item: item[1]):
            self._vocab.append(text.encode("utf-8"))
        self._pattern = pattern
        self._regex = Pretokenizer(pattern)
        # Memo of chunk -> ids: natural text repeats a few thousand words, so this is most of the speed.
        self._chunk_cache: dict[str, list[int]] = {}

    @classmethod
    def train(
        cls, text: str | Iterable[str], vocab_size: int, *, special_tokens: Sequence[str] = (EOT_TEXT,)
    ) -> ByteBPETokenizer:
        """Learn vocab_size - 256 - len(special_tokens) merges on `text` (fewer if no pair is left).

        `text` may be one string or an iterable of pieces, read once and pre-tokenized one by one (so
        pieces cut by `safe_cut` give exactly the merges of their concatenation, without joining them).
        Each step merges the pair with the highest count over all pre-token chunks; ties go to the
        lexicographically smallest (left id, right id), so the same text always gives the same merges.
        """
        special_tokens = list(dict.fromkeys(special_tokens))
        n_merges = vocab_size - 256 - len(special_tokens)
        if n_merges < 0:
            raise ValueError(f"vocab_size={vocab_size} is below 256 bytes + {len(special_tokens)} specials")
        if EOT_TEXT not in special_tokens:
            raise ValueError(f"special_tokens must include {EOT_TEXT!r}")
        # Special tokens are document boundaries, never material for merges.
        splitter = re.compile("|".join(map(re.escape, sorted(special_tokens, key=len, reverse=True))))
        pattern = Pretokenizer(GPT2_PATTERN)
        chunk_counts: Counter[str] = Counter()
        for part in [text] if isinstance(text, str) else text:
            for piece in splitter.split(part):
                chunk_counts.update(pattern.findall(piece))
        byte_counts: Counter[bytes] = Counter()
        for chunk, count in chunk_counts.items():
            byte_counts[_utf8(chunk)] += count
        merges = train_merges(byte_counts, n_merges)
        n_merged = 256 + len(merges)
        return cls(merges, special_tokens={s: n_merged + i for i, s in enumerate(special_tokens)})

    @classmethod
    def from_gpt2_files(cls, encoder_json: str | Path, vocab_bpe: str | Path) -> ByteBPETokenizer:
        """GPT-2's own vocabulary; encodes to exactly the ids tiktoken gives."""
        byte_order, merges, specials = parse_gpt2_files(
            Path(encoder_json).read_bytes(), Path(vocab_bpe).read_bytes(), source=str(vocab_bpe)
        )
        return cls(merges, special_tokens=specials, byte_order=byte_order)

    @classmethod
    def from_saved(cls, directory: Path, meta: dict[str, Any]) -> ByteBPETokenizer:
        """The tokenizer `directory`'s tokenizer.json (`meta`) holds."""
        return cls(
            [tuple(pair) for pair in meta["merges"]],
            special_tokens=meta["special_tokens"],
            byte_order=meta["byte_order"],
            pattern=meta["pattern"],
        )

    @property
    def vocab_size(self) -> int:
        return len(self._vocab)

    @property
    def special_tokens(self) -> Mapping[str, int]:
        return self._specials

    @property
    def merges(self) -> tuple[tuple[int, int], ...]:
        """The merges in priority order; merge i makes token 256 + i."""
        return self._merges

    @property
    def pattern(self) -> str:
        """The regex that cuts text into pre-token chunks (GPT-2's unless trained with another)."""
        return self._pattern

    def _encode_chunk(self, chunk: bytes) -> list[int]:
        ids = [self._byte_ids[b] for b in chunk]
        merge_ids = self._merge_ids
        no_merge = len(self._vocab)  # larger than every merged id
        while len(ids) > 1:
            # Merged ids grow with merge priority, so the smallest merged id is the first merge to apply.
            pair = min(pairwise(ids), key=lambda p: merge_ids.get(p, no_merge))
            new_id = merge_ids.get(pair)
            if new_id is None:
                break
            ids = merge(ids, pair, new_id)
        return ids

    def _encode_ordinary(self, text: str) -> list[int]:
        cache = self._chunk_cache
        if len(cache) > _CHUNK_CACHE_LIMIT:
            cache.clear()
        out: list[int] = []
        for chunk in self._regex.findall(text):
            ids = cache.get(chunk)
            if ids is None:
                ids = cache[chunk] = self._encode_chunk(_utf8(chunk))
            out.extend(ids)
        return out

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        self._check_ids(ids)
        vocab = self._vocab
        return b"".join([vocab[i] for i in ids])

    def save(self, directory: str | Path) -> None:
        write_tokenizer_json(
            directory,
            {"type": "bpe", "pattern": self._pattern, "special_tokens": self._specials,
             "byte_order": self._byte_order, "merges": [list(pair) for pair in self._merges]},
        )
