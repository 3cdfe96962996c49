"""Tokenizers behind one interface: GPT-2 BPE (tiktoken), byte-level BPE trained from scratch, characters,
and a model's own Hugging Face tokenizer.json (the `tokenizers` library).

Every tokenizer saves itself into a run directory as `tokenizer.json` (GPT-2 adds its two vocabulary
files), and `load_tokenizer(run_dir)` restores whichever kind is there. The text `<|endoftext|>` is
treated like tiktoken treats it: encoding it raises unless `allowed_special=True`, so a document that
merely quotes it can never smuggle in a document boundary.
"""

from __future__ import annotations

import functools
import hashlib
import heapq
import json
import os
import re
import tempfile
import time
import urllib.request
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from itertools import pairwise
from pathlib import Path
from typing import Any, ClassVar, Literal

import regex
import tiktoken
from tiktoken_ext.openai_public import r50k_pat_str

TokenizerKind = Literal["gpt2", "bpe", "char", "hf"]

EOT_TEXT = "<|endoftext|>"
TOKENIZER_FILE = "tokenizer.json"
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
_FORMAT_VERSION = 1
_CHUNK_CACHE_LIMIT = 100_000


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
    """Text <-> token ids. Subclasses supply ordinary-text encoding, byte decoding and saving."""

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
        """Ids of `text`, reading special-token texts as plain text."""

    def encode_ordinary(self, text: str) -> list[int]:
        """Ids of `text`, reading special-token texts as plain text (`<|endoftext|>` is 13 characters)."""
        return self._encode_ordinary(text)

    @abstractmethod
    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        """The raw bytes of `ids`; may end inside a multi-byte UTF-8 character."""

    @abstractmethod
    def save(self, directory: str | Path) -> None:
        """Write this tokenizer into `directory` (as `tokenizer.json` plus any files it names)."""

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


def _write_tokenizer_json(directory: str | Path, meta: dict[str, Any]) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / TOKENIZER_FILE
    path.write_text(json.dumps({"format_version": _FORMAT_VERSION, **meta}) + "\n", encoding="utf-8")
    return path


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
    if _is_hf_tokenizer_json(meta):
        return HFTokenizer.from_dir(directory)  # a model's own tokenizer.json (Llama, Qwen, ...)
    loaders = {"gpt2": GPT2Tokenizer._from_saved, "bpe": ByteBPETokenizer._from_saved,
               "char": CharTokenizer._from_saved}
    kind = meta.get("type") if isinstance(meta, dict) else None
    if kind not in loaders:
        raise ValueError(f"{path} has tokenizer type {kind!r}; expected one of {sorted(loaders)}")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > _FORMAT_VERSION:
        raise ValueError(
            f"{path} has format_version {version!r} but this scratchgpt reads <= {_FORMAT_VERSION}; upgrade"
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


# ---------------------------------------------------------------------------------------------
# GPT-2's file format (encoder.json + vocab.bpe), read without tiktoken's file cache
# ---------------------------------------------------------------------------------------------


def _gpt2_byte_to_unicode() -> dict[int, str]:
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


def _parse_gpt2_files(
    encoder_json: bytes, vocab_bpe: bytes, *, source: str = "GPT-2 files"
) -> tuple[list[int], list[tuple[int, int]], dict[str, int]]:
    """(byte_order, merges, special_tokens) from GPT-2's files; merge i makes token 256 + i."""
    try:
        encoder: dict[str, int] = json.loads(encoder_json)
        lines = vocab_bpe.decode("utf-8").split("\n")
        if lines and lines[0].startswith("#version"):
            lines = lines[1:]
        byte_order = [-1] * 256
        for b, char in _gpt2_byte_to_unicode().items():
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


def _token_bytes(byte_order: Sequence[int], merges: Sequence[tuple[int, int]]) -> list[bytes]:
    """The bytes of every non-special token: the 256 single bytes, then one per merge."""
    vocab = [bytes([b]) for b in byte_order]
    for left, right in merges:
        vocab.append(vocab[left] + vocab[right])
    return vocab


# ---------------------------------------------------------------------------------------------
# 1. GPT-2 BPE through tiktoken
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


class GPT2Tokenizer(Tokenizer):
    """OpenAI's GPT-2 BPE (50,257 tokens), encoded by tiktoken's Rust core."""

    name = "gpt2"

    def __init__(self, encoder_json: bytes, vocab_bpe: bytes) -> None:
        byte_order, merges, specials = _parse_gpt2_files(encoder_json, vocab_bpe)
        ranks = {token: i for i, token in enumerate(_token_bytes(byte_order, merges))}
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
    def _from_saved(cls, directory: Path, meta: dict[str, Any]) -> GPT2Tokenizer:
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
        _write_tokenizer_json(
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


# ---------------------------------------------------------------------------------------------
# 2. Byte-level BPE in pure Python: trained from scratch, or loaded from GPT-2's merges
# ---------------------------------------------------------------------------------------------


def _utf8(text: str) -> bytes:
    """UTF-8 of `text`, with lone surrogates (not encodable) made U+FFFD as tiktoken does."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace").encode("utf-8")


def _merge(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """`ids` with every non-overlapping occurrence of `pair`, left to right, replaced by `new_id`."""
    left, right = pair
    out = []
    i, n = 0, len(ids)
    while i < n:
        if i + 1 < n and ids[i] == left and ids[i + 1] == right:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def _train_merges(chunk_counts: Mapping[bytes, int], n_merges: int) -> list[tuple[int, int]]:
    """Up to `n_merges` BPE merges over byte chunks; the most frequent pair wins, ties to the smallest."""
    words = [list(chunk) for chunk in chunk_counts]  # token ids of each distinct chunk
    freqs = list(chunk_counts.values())
    pair_counts: Counter[tuple[int, int]] = Counter()
    where: dict[tuple[int, int], set[int]] = {}  # pair -> indices of the words holding it
    for w, (ids, freq) in enumerate(zip(words, freqs, strict=True)):
        for pair in pairwise(ids):
            pair_counts[pair] += freq
            where.setdefault(pair, set()).add(w)
    # A max-heap by (count, then smallest pair); an entry is stale once its count no longer matches.
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)
    merges: list[tuple[int, int]] = []
    while heap and len(merges) < n_merges:
        neg_count, pair = heapq.heappop(heap)
        if pair_counts.get(pair) != -neg_count:
            continue
        new_id = 256 + len(merges)
        merges.append(pair)
        # Only the words holding `pair` change; recount just their pairs.
        delta: Counter[tuple[int, int]] = Counter()
        for w in where.pop(pair):
            old, freq = words[w], freqs[w]
            new = _merge(old, pair, new_id)
            words[w] = new
            old_pairs, new_pairs = list(pairwise(old)), list(pairwise(new))
            for p in old_pairs:
                delta[p] -= freq
            for p in new_pairs:
                delta[p] += freq
            for p in set(old_pairs) - set(new_pairs) - {pair}:
                where[p].discard(w)
            for p in set(new_pairs) - set(old_pairs):
                where.setdefault(p, set()).add(w)
        for p, d in delta.items():
            if d == 0:
                continue
            count = pair_counts[p] + d
            if count > 0:
                pair_counts[p] = count
                heapq.heappush(heap, (-count, p))
            else:
                del pair_counts[p]
                where.pop(p, None)
    return merges


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
        self._vocab = _token_bytes(byte_order, self._merges)
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
        merges = _train_merges(byte_counts, n_merges)
        n_merged = 256 + len(merges)
        return cls(merges, special_tokens={s: n_merged + i for i, s in enumerate(special_tokens)})

    @classmethod
    def from_gpt2_files(cls, encoder_json: str | Path, vocab_bpe: str | Path) -> ByteBPETokenizer:
        """GPT-2's own vocabulary; encodes to exactly the ids tiktoken gives."""
        byte_order, merges, specials = _parse_gpt2_files(
            Path(encoder_json).read_bytes(), Path(vocab_bpe).read_bytes(), source=str(vocab_bpe)
        )
        return cls(merges, special_tokens=specials, byte_order=byte_order)

    @classmethod
    def _from_saved(cls, directory: Path, meta: dict[str, Any]) -> ByteBPETokenizer:
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
            ids = _merge(ids, pair, new_id)
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
        _write_tokenizer_json(
            directory,
            {"type": "bpe", "pattern": self._pattern, "special_tokens": self._specials,
             "byte_order": self._byte_order, "merges": [list(pair) for pair in self._merges]},
        )


# ---------------------------------------------------------------------------------------------
# 3. Characters
# ---------------------------------------------------------------------------------------------


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
    def _from_saved(cls, directory: Path, meta: dict[str, Any]) -> CharTokenizer:
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
        _write_tokenizer_json(directory, {"type": "char", "chars": self._chars})


# ---------------------------------------------------------------------------------------------
# 4. A Hugging Face tokenizer.json (Llama 3, Qwen, ...), run by the `tokenizers` library
# ---------------------------------------------------------------------------------------------

HF_TOKENIZER_CONFIG = "tokenizer_config.json"
HF_CHAT_TEMPLATE_FILE = "chat_template.jinja"
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class _TemplateRefusal(Exception):
    """A chat template's own `raise_exception(message)`: it refuses the conversation it was given."""


def _raise_exception(message: str) -> None:
    raise _TemplateRefusal(message)


@functools.lru_cache(maxsize=1)
def _chat_template_env() -> Any:
    """The Jinja environment chat templates run in: a template is code from a downloaded folder.

    ImmutableSandboxedEnvironment refuses underscore attributes (no way to Python internals) and
    any mutation of the data passed in; on top, `namespace()` refuses underscore names, and `dict`
    is a plain constructor. The globals and filters are the ones transformers gives templates.
    """
    try:
        import jinja2
        from jinja2.ext import Extension
        from jinja2.sandbox import ImmutableSandboxedEnvironment
        from jinja2.utils import Namespace
    except ImportError:  # a ValueError, like every other reason a template cannot render: one line
        raise ValueError("chat templates need the `jinja2` library: pip install 'jinja2>=3.1.6'") from None
    if tuple(int(p) for p in re.findall(r"\d+", jinja2.__version__)[:3]) < (3, 1, 6):
        # Older releases have published sandbox escapes.
        raise ValueError(f"chat templates need jinja2>=3.1.6 (found {jinja2.__version__}): "
                         f"pip install -U 'jinja2>=3.1.6'")

    class SafeNamespace(Namespace):
        def __init__(*args: Any, **kwargs: Any) -> None:  # Namespace's signature: `self` may be a key
            self, rest = args[0], args[1:]
            for name in dict(*rest, **kwargs):
                SafeNamespace.check(name)
            Namespace.__init__(self, *rest, **kwargs)

        def __setitem__(self, name: str, value: Any) -> None:
            SafeNamespace.check(name)
            Namespace.__setitem__(self, name, value)

        @staticmethod
        def check(name: Any) -> None:
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"a namespace cannot hold the name {name!r}")

    class GenerationBlock(Extension):
        """`{% generation %}...{% endgeneration %}` marks the assistant's tokens for training masks;
        rendering a prompt only needs the body."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, "jinja2.ext.loopcontrols"])
    env.globals.update(
        raise_exception=_raise_exception, namespace=SafeNamespace, dict=lambda *a, **k: dict(*a, **k),
        strftime_now=lambda fmt: time.strftime(fmt),  # Llama 3.1+ templates print today's date
    )
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    return env


def _generation_eos_ids(path: Path) -> list[int]:
    """generation_config.json's eos_token_id (an id or a list: Llama 3 Instruct stops at three), else []."""
    try:
        eos = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id") if path.is_file() else None
    except (OSError, ValueError, AttributeError):
        return []  # the file only adds stop tokens; a broken one must not block loading the tokenizer
    eos = [eos] if isinstance(eos, int) else eos
    return [i for i in eos if isinstance(i, int) and not isinstance(i, bool)] if isinstance(eos, list) else []


def _is_hf_tokenizer_json(meta: Any) -> bool:
    """True for the `tokenizers` library's own file format (it has a "model"; ours has a "type")."""
    return isinstance(meta, dict) and "model" in meta and "type" not in meta


class HFTokenizer(Tokenizer):
    """A model's own `tokenizer.json`, encoded by Hugging Face's `tokenizers` (Rust), plus the
    special tokens and chat template of its `tokenizer_config.json` when present.

    End of text is the config's `eos_token` (e.g. `<|im_end|>` for Qwen3 chat, `<|eot_id|>` for
    Llama 3.2 Instruct), else `<|endoftext|>` / `<|end_of_text|>`. `encode` adds no BOS token,
    like the other tokenizers here; chat templates write it themselves.
    """

    name = "hf"

    def __init__(self, tokenizer_json: str, tokenizer_config: Mapping[str, Any] | None = None, *,
                 source: str | Path | None = None, extra_eos_ids: Sequence[int] = ()) -> None:
        try:
            from tokenizers import Tokenizer as RustTokenizer
        except ImportError:
            raise ImportError("tokenizer.json files need the `tokenizers` library: pip install tokenizers") from None
        self._json = tokenizer_json
        self._tok = RustTokenizer.from_str(tokenizer_json)
        self.config: dict[str, Any] = dict(tokenizer_config or {})
        self.source = source  # the folder it came from: errors in its chat template name it
        self._template_file = HF_TOKENIZER_CONFIG  # or chat_template.jinja (see from_dir)
        self._compiled: tuple[str, Any] | None = None  # (template text, compiled Jinja template)
        self._extra_eos = tuple(extra_eos_ids)
        self._specials = {t.content: i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
        self._eot = self._find_eot()
        decoder = (json.loads(tokenizer_json).get("decoder") or {})
        kinds = [decoder.get("type")] + [d.get("type") for d in decoder.get("decoders", [])]
        # Byte-level BPE (GPT-2, Llama 3, Qwen) spells bytes as printable characters: map them back, so
        # one token can end inside a UTF-8 character and streaming still never splits one.
        self._byte_level = "ByteLevel" in kinds
        self._unicode_to_byte = {c: b for b, c in _gpt2_byte_to_unicode().items()}

    def _find_eot(self) -> int:
        eos = self.config.get("eos_token")
        if isinstance(eos, dict):
            eos = eos.get("content")
        for text in (eos, EOT_TEXT, "<|end_of_text|>", "</s>"):
            if isinstance(text, str) and self._tok.token_to_id(text) is not None:
                return self._tok.token_to_id(text)
        raise ValueError("tokenizer.json has no end-of-text token (no eos_token in tokenizer_config.json, no "
                         f"{EOT_TEXT!r}); add eos_token to tokenizer_config.json")

    @classmethod
    def from_dir(cls, directory: str | Path) -> HFTokenizer:
        """The tokenizer of an HF model folder: tokenizer.json (+ tokenizer_config.json if present)."""
        directory = Path(directory)
        path = directory / TOKENIZER_FILE
        config_path = directory / HF_TOKENIZER_CONFIG
        try:
            config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
        except (OSError, ValueError) as err:
            raise ValueError(f"{config_path}: not valid JSON ({err}); restore the model's original file") from None
        config = config if isinstance(config, dict) else {}
        jinja = directory / HF_CHAT_TEMPLATE_FILE
        from_jinja = "chat_template" not in config and jinja.is_file()
        if from_jinja:  # newer transformers save the template beside the config rather than inside it
            config["chat_template"] = jinja.read_text(encoding="utf-8")
        try:
            tok = cls(path.read_text(encoding="utf-8"), config, source=directory,
                      extra_eos_ids=_generation_eos_ids(directory / "generation_config.json"))
            if from_jinja:
                tok._template_file = HF_CHAT_TEMPLATE_FILE
            return tok
        except Exception as err:  # noqa: BLE001 - the Rust parser raises its own exception type
            raise ValueError(f"{path}: cannot be read by the tokenizers library ({str(err).splitlines()[0]}); "
                             f"restore the model's original tokenizer.json") from None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def special_tokens(self) -> Mapping[str, int]:
        return self._specials

    @property
    def eot_id(self) -> int:
        return self._eot

    @property
    def chat_template(self) -> str | None:
        """The Jinja chat template from tokenizer_config.json, or None."""
        template = self.config.get("chat_template")
        if isinstance(template, list):  # several named templates: take the default one
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        return template if isinstance(template, str) else None

    @property
    def chat_template_path(self) -> str:
        """Where the chat template came from (the folder's tokenizer_config.json or chat_template.jinja)."""
        return str(Path(self.source) / self._template_file) if self.source else self._template_file

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True,
                            **variables: Any) -> str:
        """Render `messages` with the model's own chat template (Jinja, sandboxed as transformers does).

        Any failure, a syntax error or the template's own `raise_exception` (e.g. "System role not
        supported"), is one ValueError naming the file the template came from.
        """
        template = self.chat_template
        where = self.chat_template_path
        if template is None:
            raise ValueError(f"{where}: no chat_template; choose --chat-template alpaca or chatml")
        env = _chat_template_env()
        from jinja2 import TemplateError

        try:
            if self._compiled is None or self._compiled[0] != template:
                self._compiled = (template, env.from_string(template))
            # As transformers calls it: tools and documents are None unless given, the config's
            # special tokens (bos_token, eos_token, ...) are variables.
            specials = {k: (v.get("content") if isinstance(v, dict) else v) for k, v in self.config.items()
                        if k.endswith("_token") and isinstance(v, str | dict)}
            return self._compiled[1].render(**{
                "tools": None, "documents": None, **specials, **variables,
                "messages": [dict(m) for m in messages], "add_generation_prompt": add_generation_prompt})
        except _TemplateRefusal as e:
            raise ValueError(f"{where}: the chat template refuses this conversation: {e}") from None
        except (TemplateError, TypeError, AttributeError, KeyError, IndexError, ValueError) as e:
            first = (str(e).splitlines() or [""])[0]
            raise ValueError(f"{where}: the chat template fails ({type(e).__name__}: {first}); "
                             f"fix chat_template or choose --chat-template alpaca or chatml") from None

    @functools.cached_property
    def chat_stop_texts(self) -> tuple[str, ...]:
        """Special-token texts that end an assistant reply under the chat template: the end-of-text
        token(s) (tokenizer_config's eos_token, generation_config.json's eos_token_id) and every
        special token the template itself writes (end-of-turn markers such as <|im_end|> or
        <|eot_id|>, and the markers that open a turn, which the reply must not produce either)."""
        ids = (self._eot, *self._extra_eos)
        texts = [self._tok.id_to_token(i) for i in ids if self._tok.id_to_token(i) in self._specials]
        sample = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                  {"role": "user", "content": "c"}]
        rendered = ""
        for messages in ([{"role": "system", "content": "s"}, *sample], sample):
            try:
                rendered = self.apply_chat_template(messages, add_generation_prompt=True)
                break
            except ValueError:
                continue  # e.g. a template without a system role: try the plain conversation
        if self._specials and rendered:
            texts += [t for t in self._special_splitter().split(rendered)[1::2]
                      if self._specials[t] not in self._bos_ids()]
        return tuple(dict.fromkeys(texts))

    def _bos_ids(self) -> set[int]:
        bos = self.config.get("bos_token")
        bos = bos.get("content") if isinstance(bos, dict) else bos
        return {self._specials[bos]} if isinstance(bos, str) and bos in self._specials else set()

    def encode_chat(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True) -> list[int]:
        """Ids of `messages` rendered with the chat template: the template's markers become special
        tokens, while a special-token text inside a message's content is refused (it cannot forge a turn)."""
        self.check_chat_content(messages)
        text = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        return self.encode(text, allowed_special=True)

    def check_chat_content(self, messages: Sequence[Mapping[str, Any]]) -> None:
        """One ValueError when a message's content holds a special-token text (it would forge a turn)."""
        for i, m in enumerate(messages):
            content = str(m.get("content", ""))
            for special in self.special_tokens:
                if special in content:
                    raise ValueError(f"messages[{i}]: the content holds the special token {special!r}, which would "
                                     f"forge the chat template's markup; remove it")

    def _encode_ordinary(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        if any(i < 0 for i in ids):
            raise ValueError(f"token id {min(ids)} is negative")
        out = bytearray()
        for i in ids:
            token = self._tok.id_to_token(i)
            if token is None:
                # Models round their embedding up (Qwen3: 151,936 rows for 151,669 tokens); the extra
                # rows are never trained, and an id there decodes to nothing rather than failing a stream.
                continue
            if token in self._specials or not (self._byte_level or token.startswith("<0x") or "▁" in token):
                out += token.encode("utf-8")
            elif self._byte_level:
                out += bytes(self._unicode_to_byte.get(c, 0x3F) for c in token)
            elif m := _BYTE_FALLBACK.fullmatch(token):
                out.append(int(m.group(1), 16))  # SentencePiece byte fallback
            else:
                out += token.replace("▁", " ").encode("utf-8")  # SentencePiece marks spaces with ▁
        return bytes(out)

    def save(self, directory: str | Path) -> None:
        self.save_hf(directory)

    def save_hf(self, directory: str | Path) -> None:
        """Write tokenizer.json (+ tokenizer_config.json) as the `tokenizers` library reads them."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / TOKENIZER_FILE).write_text(self._json, encoding="utf-8")
        if self.config:
            (directory / HF_TOKENIZER_CONFIG).write_text(json.dumps(self.config, indent=2) + "\n", encoding="utf-8")
        generation = directory / "generation_config.json"
        if self._extra_eos and not generation.exists():  # keep the extra stop ids (e.g. in a run directory)
            generation.write_text(json.dumps({"eos_token_id": list(self._extra_eos)}) + "\n", encoding="utf-8")
