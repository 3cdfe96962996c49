"""Characters as tokens: one id per character of a fixed alphabet, then `<|endoftext|>`."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from scratchgpt.data.tokenizers.base import EOT_TEXT, Tokenizer, write_tokenizer_json


class CharTokenizer(Tokenizer):
    """One id per character of a fixed alphabet, then `<|endoftext|>` as id len(alphabet)."""

    name = "char"

    def __init__(self, chars: str) -> None:
        if len(set(chars)) != len(chars):
            raise ValueError("chars must not repeat a character")
        self._chars = chars
        self._stoi = {c: i for i, c in enumerate(chars)}
        self._itos = [*chars, EOT_TEXT]
        self._specials = {EOT_TEXT: len(chars)}

    @classmethod
    def train(cls, text: str | Iterable[str]) -> CharTokenizer:
        """The sorted distinct characters of `text` or its pieces (`<|endoftext|>` markers aside) as the alphabet.

        Pieces are read once, so a stream of any length works; a marker must not straddle two pieces.
        """
        alphabet: set[str] = set()
        for part in [text] if isinstance(text, str) else text:
            alphabet.update(part.replace(EOT_TEXT, ""))
        chars = "".join(sorted(alphabet))
        if not chars:
            raise ValueError("cannot train a char tokenizer on empty text")
        return cls(chars)

    @classmethod
    def from_saved(cls, directory: Path, meta: dict[str, Any]) -> CharTokenizer:
        """The tokenizer `directory`'s tokenizer.json (`meta`) holds."""
        return cls(meta["chars"])

    @property
    def chars(self) -> str:
        """The alphabet; character i has id i."""
        return self._chars

    @property
    def vocab_size(self) -> int:
        return len(self._itos)

    @property
    def special_tokens(self) -> Mapping[str, int]:
        return self._specials

    def _encode_ordinary(self, text: str) -> list[int]:
        stoi = self._stoi
        try:
            return [stoi[c] for c in text]
        except KeyError as err:
            char = err.args[0]
            raise ValueError(
                f"character {char!r} (U+{ord(char):04X}) at position {text.index(char)} is not in this "
                f"char tokenizer's alphabet of {len(self._chars)}; train it on text that includes it"
            ) from None

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        self._check_ids(ids)
        itos = self._itos
        return "".join([itos[i] for i in ids]).encode("utf-8", errors="surrogatepass")

    def save(self, directory: str | Path) -> None:
        write_tokenizer_json(directory, {"type": "char", "chars": self._chars})
