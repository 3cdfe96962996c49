"""The tokenizer interface every kind implements, and `safe_cut`: where text may be cut for streaming.

Every tokenizer saves itself into a run directory as `tokenizer.json` (GPT-2 adds its two vocabulary
files). The text `<|endoftext|>` is treated like tiktoken treats it: encoding it raises unless
`allowed_special=True`, so a document that merely quotes it can never smuggle in a document boundary.
"""

from __future__ import annotations

import hashlib
import json
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

TokenizerKind = Literal["gpt2", "bpe", "char", "hf"]

EOT_TEXT = "<|endoftext|>"
TOKENIZER_FILE = "tokenizer.json"
FORMAT_VERSION = 1  # of our own tokenizer.json (a Hugging Face one has none: see hf.py)


# ---------------------------------------------------------------------------------------------
# Where text may be cut so that its pieces tokenize to the same ids as the whole
# ---------------------------------------------------------------------------------------------

# A cut goes just before an ASCII whitespace character w that is followed by a non-whitespace
# character c. Why this never changes GPT-2's pre-tokens ('(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++|
# ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s), so never the ids of tiktoken, of ByteBPETokenizer (same
# regex, merges stay inside a pre-token) or of CharTokenizer (any cut is safe for it):
# - Whole text: let W be the run of whitespace that ends with w. No pre-token but a whitespace one
#   holds whitespace, except one space leading a letter/number/punctuation run, and inside W every
#   character is followed by whitespace. So a pre-token starts where W starts, and `\s+(?!\S)` takes
#   all of W but w (the lookahead sees w; `\s++$` cannot match mid-text). Then a pre-token starts at w:
#   w alone (`\s`), or w + the run after it when w is a space (` ?\p{L}++` ...).
# - Left piece: it ends with W minus w, preceded by non-whitespace. The pre-tokens before W end where
#   they ended in the whole text (each run stops at whitespace or at the end alike: the quantifiers are
#   possessive, contractions have fixed length), and W minus w, if not empty, is one `\s++$`: the same.
# - Right piece: it starts at w, where the whole text also starts a pre-token, and the regex has no
#   lookbehind, so everything from w on is matched as in the whole text until the next cut.
# - `<|endoftext|>` holds no whitespace, so a cut never falls inside it.
# Whitespace differs between engines: tiktoken (Rust) and `regex` read \s as Unicode White_Space, which
# str.isspace() (Python's `re` \s) contains (it adds U+001C..U+001F). So w is taken from [ \t\n\r\f\v]
# (whitespace everywhere) and c must not be str.isspace() (whitespace nowhere); tests check both facts.
_SAFE_CUT = re.compile(r"[ \t\n\r\f\v](?=\S)")


def safe_cut(text: str, end: int | None = None) -> int:
    """The largest index i in [1, end] where text[:i] and text[i:] tokenize to the ids of text; -1 if none."""
    end = len(text) if end is None else min(end, len(text))
    window = 256
    while True:
        lo = max(1, end - window)
        # endpos end + 2 lets the lookahead see text[end + 1] and no further, so no match lies past `end`.
        last = -1
        for m in _SAFE_CUT.finditer(text, lo, end + 2):
            last = m.start()
        if last > 0 or lo == 1:
            return last
        window *= 16


# ---------------------------------------------------------------------------------------------
# The interface
# ---------------------------------------------------------------------------------------------


class Tokenizer(ABC):
    """Text <-> token ids. Subclasses supply ordinary-text encoding (`_encode_ordinary`), byte decoding and saving."""

    name: ClassVar[TokenizerKind]

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of token ids; every id lies in [0, vocab_size)."""

    @property
    @abstractmethod
    def special_tokens(self) -> Mapping[str, int]:
        """Special token texts and their ids (always holds `<|endoftext|>`)."""

    @property
    def eot_id(self) -> int:
        """Id of the `<|endoftext|>` token that separates documents."""
        return self.special_tokens[EOT_TEXT]

    @abstractmethod
    def _encode_ordinary(self, text: str) -> list[int]:
        """Ids of `text`, reading special-token texts as plain text (the hook `encode_ordinary` calls)."""

    @abstractmethod
    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        """The raw bytes of `ids`; may end inside a multi-byte UTF-8 character."""

    @abstractmethod
    def save(self, directory: str | Path) -> None:
        """Write this tokenizer into `directory` (as `tokenizer.json` plus any files it names)."""

    def encode_ordinary(self, text: str) -> list[int]:
        """Ids of `text`, reading special-token texts as plain text: a quoted `<|endoftext|>` is ordinary
        text here, never the end-of-text id (tiktoken's `encode_ordinary`)."""
        return self._encode_ordinary(text)

    def encode(self, text: str, *, allowed_special: bool = False) -> list[int]:
        """Ids of `text`; special-token texts raise ValueError unless `allowed_special`, then map to ids."""
        if not allowed_special:
            self._reject_specials(text)
            return self._encode_ordinary(text)
        ids: list[int] = []
        # The capturing group keeps the specials: pieces alternate plain text, special, plain text...
        for i, piece in enumerate(self._special_splitter().split(text)):
            if i % 2:
                ids.append(self.special_tokens[piece])
            elif piece:
                ids.extend(self._encode_ordinary(piece))
        return ids

    def encode_batch(self, texts: Iterable[str], *, allowed_special: bool = False) -> list[list[int]]:
        """`encode` applied to each text."""
        # Sequential on purpose: tiktoken's threaded encode_ordinary_batch measured 3x slower on
        # Tiny Shakespeare's 7,222 speeches (thread hand-offs cost more than the Rust encoding).
        return [self.encode(t, allowed_special=allowed_special) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        """The text of `ids`; invalid UTF-8 (e.g. a character cut in half) becomes U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, eot_id={self.eot_id})"

    def fingerprint(self) -> str:
        """sha256 of what every id stands for (its bytes; which ids are special): equal for tokenizers whose
        ids mean the same text, whatever their kind (GPT-2's files, a Hugging Face GPT-2 tokenizer.json)."""
        cached = self.__dict__.get("_fingerprint")
        if cached is None:
            h = hashlib.sha256(json.dumps(sorted(self.special_tokens.items())).encode())
            for i in range(self.vocab_size):
                token = self.decode_bytes([i])
                h.update(len(token).to_bytes(4, "little") + token)  # length first: no two tables hash alike
            cached = self.__dict__["_fingerprint"] = h.hexdigest()
        return cached

    def describe(self) -> str:
        """For messages: "a 'char' tokenizer (65 tokens)"."""
        return f"a {self.name!r} tokenizer ({self.vocab_size:,} tokens)"

    def _reject_specials(self, text: str) -> None:
        for special, token_id in self.special_tokens.items():
            if special in text:
                raise ValueError(
                    f"text contains the special token {special!r}; pass allowed_special=True to encode it "
                    f"as id {token_id}, or remove it from the text"
                )

    def _special_splitter(self) -> re.Pattern[str]:
        # Longest first, so a special that is a prefix of another cannot win.
        alternatives = sorted(self.special_tokens, key=len, reverse=True)
        return re.compile("(" + "|".join(map(re.escape, alternatives)) + ")")

    def _check_ids(self, ids: Sequence[int]) -> None:
        if len(ids) and (min(ids) < 0 or max(ids) >= self.vocab_size):
            bad = next(i for i in ids if not 0 <= i < self.vocab_size)
            raise ValueError(f"token id {bad} is out of range for a vocabulary of {self.vocab_size}")


def write_tokenizer_json(directory: str | Path, meta: dict[str, Any]) -> Path:
    """Write `meta` (with our format_version) as `directory`/tokenizer.json; returns its path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / TOKENIZER_FILE
    path.write_text(json.dumps({"format_version": FORMAT_VERSION, **meta}) + "\n", encoding="utf-8")
    return path
