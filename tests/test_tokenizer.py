"""Tokenizers: exact GPT-2 ids, tiktoken parity of the pure-Python BPE, training, save/load, errors."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections import Counter
from itertools import pairwise
from pathlib import Path

import pytest
import regex
import tiktoken.load
from hypothesis import given, settings
from hypothesis import strategies as st

from scratchgpt.data.tokenizers import (
    EOT_TEXT,
    GPT2_PATTERN,
    ByteBPETokenizer,
    CharTokenizer,
    GPT2Tokenizer,
    Tokenizer,
    build_tokenizer,
    gpt2_tokenizer,
    load_tokenizer,
    safe_cut,
)
from scratchgpt.data.tokenizers.bpe_train import merge, train_merges

FEW = settings(max_examples=200, deadline=None)


@pytest.fixture(scope="module")
def verdict(data_dir: Path) -> str:
    return (data_dir / "text" / "the-verdict.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def small_bpe(verdict: str) -> ByteBPETokenizer:
    """A byte-level BPE with 300 merges learned on The Verdict."""
    return ByteBPETokenizer.train(verdict, 256 + 300 + 1)


@pytest.fixture(scope="module")
def gpt2_bpe(data_dir: Path) -> ByteBPETokenizer:
    """The pure-Python BPE loaded with GPT-2's own merges."""
    gpt2_dir = data_dir / "gpt2"
    return ByteBPETokenizer.from_gpt2_files(gpt2_dir / "encoder.json", gpt2_dir / "vocab.bpe")


@pytest.fixture(scope="module")
def char_tok(tiny_shakespeare: str) -> CharTokenizer:
    return CharTokenizer.train(tiny_shakespeare)


@pytest.fixture(params=["gpt2", "bpe", "char"])
def any_tokenizer(request: pytest.FixtureRequest) -> Tokenizer:
    fixture = {"gpt2": "gpt2_tokenizer", "bpe": "small_bpe", "char": "char_tok"}[request.param]
    return request.getfixturevalue(fixture)


# ---------------------------------------------------------------------------------------------
# GPT-2 through tiktoken
# ---------------------------------------------------------------------------------------------


def test_gpt2_known_ids(gpt2_tokenizer: GPT2Tokenizer) -> None:
    assert gpt2_tokenizer.encode("Hello, I am") == [15496, 11, 314, 716]
    assert gpt2_tokenizer.decode([15496, 11, 314, 716]) == "Hello, I am"
    assert (gpt2_tokenizer.name, gpt2_tokenizer.vocab_size, gpt2_tokenizer.eot_id) == ("gpt2", 50257, 50256)


def test_gpt2_corpus_token_counts(gpt2_tokenizer: GPT2Tokenizer, tiny_shakespeare: str, verdict: str) -> None:
    assert len(gpt2_tokenizer.encode(tiny_shakespeare)) == 338_025
    n = int(0.9 * len(tiny_shakespeare))
    assert len(gpt2_tokenizer.encode(tiny_shakespeare[:n])) == 301_966
    assert len(gpt2_tokenizer.encode(tiny_shakespeare[n:])) == 36_059
    assert len(gpt2_tokenizer.encode(verdict)) == 5_145


def test_gpt2_ranks_equal_tiktokens_own_loader(
    gpt2_tokenizer: GPT2Tokenizer, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Our side-effect-free parser must give exactly what tiktoken.load builds (cache disabled here).
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")
    ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
        str(data_dir / "gpt2" / "vocab.bpe"), str(data_dir / "gpt2" / "encoder.json")
    )
    ours = {gpt2_tokenizer.decode_bytes([i]): i for i in range(gpt2_tokenizer.eot_id)}
    assert ours == ranks


def test_gpt2_eot(gpt2_tokenizer: GPT2Tokenizer) -> None:
    with pytest.raises(ValueError, match="allowed_special=True"):
        gpt2_tokenizer.encode("a<|endoftext|>b")
    assert gpt2_tokenizer.encode("a<|endoftext|>b", allowed_special=True) == [64, 50256, 65]
    assert gpt2_tokenizer.decode([64, 50256, 65]) == "a<|endoftext|>b"


def test_gpt2_files_are_the_files_it_read(gpt2_tokenizer: GPT2Tokenizer, data_dir: Path) -> None:
    # GGUF export writes these into the file llama.cpp loads: they must be GPT-2's own, byte for byte.
    files = gpt2_tokenizer.files
    assert dict(files) == {name: (data_dir / "gpt2" / name).read_bytes() for name in ("encoder.json", "vocab.bpe")}
    with pytest.raises(TypeError):
        files["vocab.bpe"] = b""  # type: ignore[index]  # read-only: nothing can change them under the tokenizer


def test_gpt2_encode_batch(gpt2_tokenizer: GPT2Tokenizer) -> None:
    texts = ["Hello, I am", "", "a<|endoftext|>b"]
    with pytest.raises(ValueError, match="allowed_special"):
        gpt2_tokenizer.encode_batch(texts)
    expected = [[15496, 11, 314, 716], [], [64, 50256, 65]]
    assert gpt2_tokenizer.encode_batch(texts, allowed_special=True) == expected
    assert gpt2_tokenizer.encode_batch(texts[:2]) == [[15496, 11, 314, 716], []]


@FEW
@given(st.text())
def test_gpt2_round_trip(gpt2_tokenizer: GPT2Tokenizer, text: str) -> None:
    text = text.replace(EOT_TEXT, "")
    assert gpt2_tokenizer.decode(gpt2_tokenizer.encode(text)) == text


def test_decode_bytes_keeps_a_split_character(gpt2_tokenizer: GPT2Tokenizer) -> None:
    ids = gpt2_tokenizer.encode("😀")
    assert ids == [47249, 222]  # GPT-2 cuts the emoji's 4 UTF-8 bytes into 3 + 1
    assert gpt2_tokenizer.decode_bytes(ids[:1]) == "😀".encode()[:3]
    assert gpt2_tokenizer.decode(ids[:1]) == "\ufffd"
    assert gpt2_tokenizer.decode_bytes(ids[:1]) + gpt2_tokenizer.decode_bytes(ids[1:]) == "😀".encode()


# ---------------------------------------------------------------------------------------------
# All three kinds behind one interface
# ---------------------------------------------------------------------------------------------


def test_eot_needs_allowed_special(any_tokenizer: Tokenizer) -> None:
    with pytest.raises(ValueError, match="allowed_special=True"):
        any_tokenizer.encode(f"a{EOT_TEXT}b")
    ids = any_tokenizer.encode(f"a{EOT_TEXT}b", allowed_special=True)
    assert ids == [*any_tokenizer.encode("a"), any_tokenizer.eot_id, *any_tokenizer.encode("b")]
    assert any_tokenizer.eot_id == any_tokenizer.vocab_size - 1
    assert any_tokenizer.decode(ids) == f"a{EOT_TEXT}b"


def test_encode_ordinary_reads_special_texts_as_plain_text(gpt2_tokenizer: GPT2Tokenizer,
                                                           small_bpe: ByteBPETokenizer) -> None:
    # What a server does with a user's text: a quoted <|endoftext|> is characters, never the end-of-text id.
    text = f"a{EOT_TEXT}b"
    assert gpt2_tokenizer.encode_ordinary(text) == [64, 27, 91, 437, 1659, 5239, 91, 29, 65]
    char = CharTokenizer("<>abdefnotx|")
    assert char.encode_ordinary(text) == [2, 0, 11, 5, 7, 4, 8, 6, 9, 5, 10, 9, 11, 1, 3]
    for tok in (gpt2_tokenizer, small_bpe, char):
        ids = tok.encode_ordinary(text)
        assert tok.eot_id not in ids and tok.decode(ids) == text
        assert tok.encode_ordinary("bad") == tok.encode("bad")  # without specials it is `encode`


def test_invalid_ids_raise(any_tokenizer: Tokenizer) -> None:
    for bad in (any_tokenizer.vocab_size, -1):
        with pytest.raises(ValueError, match="out of range|invalid token id"):
            any_tokenizer.decode([0, bad])


def test_save_load_round_trip(any_tokenizer: Tokenizer, tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"")  # a run directory holds other files too
    any_tokenizer.save(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert type(loaded) is type(any_tokenizer)
    assert (loaded.name, loaded.vocab_size, loaded.eot_id) == (
        any_tokenizer.name, any_tokenizer.vocab_size, any_tokenizer.eot_id
    )
    text = f"First Citizen:\nBefore we proceed any further, hear me speak.{EOT_TEXT}"
    assert loaded.encode(text, allowed_special=True) == any_tokenizer.encode(text, allowed_special=True)


def test_load_tokenizer_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        "[1, 2]",
        '{"type": "sentencepiece", "format_version": 1}',
        '{"type": "char", "format_version": 1}',
        '{"type": "char", "format_version": 99, "chars": "ab"}',
        '{"type": "char", "format_version": 1, "chars": "aa"}',
        '{"type": "bpe", "format_version": 1, "merges": 3}',
    ],
)
def test_load_tokenizer_corrupt_file(tmp_path: Path, content: str) -> None:
    (tmp_path / "tokenizer.json").write_text(content)
    with pytest.raises(ValueError, match="tokenizer.json") as info:
        load_tokenizer(tmp_path)
    assert "\n" not in str(info.value)


def test_load_gpt2_without_its_files(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text('{"type": "gpt2", "format_version": 1, "vocab_size": 50257}')
    with pytest.raises(FileNotFoundError, match="encoder.json"):
        load_tokenizer(tmp_path)


# ---------------------------------------------------------------------------------------------
# Byte-level BPE
# ---------------------------------------------------------------------------------------------


def test_bpe_with_gpt2_merges_equals_tiktoken_on_all_of_tiny_shakespeare(
    gpt2_bpe: ByteBPETokenizer, gpt2_tokenizer: GPT2Tokenizer, tiny_shakespeare: str
) -> None:
    assert gpt2_bpe.vocab_size == 50257 and gpt2_bpe.eot_id == 50256
    assert gpt2_bpe.encode("Hello, I am") == [15496, 11, 314, 716]
    assert gpt2_bpe.encode(tiny_shakespeare) == gpt2_tokenizer.encode(tiny_shakespeare)


@FEW
@given(st.text())
def test_bpe_with_gpt2_merges_equals_tiktoken(
    gpt2_bpe: ByteBPETokenizer, gpt2_tokenizer: GPT2Tokenizer, text: str
) -> None:
    text = text.replace(EOT_TEXT, "")
    assert gpt2_bpe.encode(text) == gpt2_tokenizer.encode(text)


@FEW
@given(st.text())
def test_trained_bpe_round_trip(small_bpe: ByteBPETokenizer, text: str) -> None:
    text = text.replace(EOT_TEXT, "")
    assert small_bpe.decode(small_bpe.encode(text)) == text


def test_training_is_deterministic_and_compresses(verdict: str, small_bpe: ByteBPETokenizer) -> None:
    again = ByteBPETokenizer.train(verdict, 256 + 300 + 1)
    assert again.merges == small_bpe.merges
    assert (small_bpe.vocab_size, small_bpe.eot_id, len(small_bpe.merges)) == (557, 556, 300)
    ids = small_bpe.encode(verdict)
    assert len(ids) < len(verdict.encode("utf-8")) * 0.6
    assert small_bpe.decode(ids) == verdict


def test_training_picks_the_most_frequent_pair_then_the_smallest() -> None:
    # "abab ab cd" -> chunks "abab", " ab", " cd": (a, b) occurs 3 times; every other pair once.
    tok = ByteBPETokenizer.train("abab ab cd", 256 + 4 + 1)
    a, b, c, space = (ord(ch) for ch in "abc ")
    ab, space_c, space_ab, abab = 256, 257, 258, 259
    # Then every pair left occurs once; ties go to the smallest pair of ids:
    # (space, c) < (space, ab) < (c, d) < (ab, ab), then (space, ab) < (ab, ab) < (space_c, d).
    assert tok.merges == ((a, b), (space, c), (space, ab), (ab, ab))
    assert tok.encode("abab ab cd") == [abab, space_ab, space_c, ord("d")]


def test_training_stops_when_no_pair_is_left() -> None:
    tok = ByteBPETokenizer.train("ab", 1000)
    assert tok.merges == ((ord("a"), ord("b")),)
    assert (tok.vocab_size, tok.eot_id) == (258, 257)


def test_training_ignores_special_tokens_in_the_text() -> None:
    tok = ByteBPETokenizer.train(f"xy{EOT_TEXT}xy", 256 + 10 + 1)
    assert tok.merges == ((ord("x"), ord("y")),)
    assert tok.encode(f"xy{EOT_TEXT}", allowed_special=True) == [256, tok.eot_id]


def _reference_merges(text: str, n_merges: int) -> list[tuple[int, int]]:
    """Textbook BPE training: recount every pair of every chunk before each merge."""
    words = [list(chunk.encode()) for chunk in regex.findall(GPT2_PATTERN, text)]
    merges = []
    for new_id in range(256, 256 + n_merges):
        counts = Counter(pair for w in words for pair in pairwise(w))
        if not counts:
            break
        pair = min(counts, key=lambda p: (-counts[p], p))
        merges.append(pair)
        for k, w in enumerate(words):
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == pair:
                    out.append(new_id)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            words[k] = out
    return merges


def test_incremental_training_equals_textbook_training(verdict: str) -> None:
    text = verdict[:5000]
    assert list(ByteBPETokenizer.train(text, 256 + 120 + 1).merges) == _reference_merges(text, 120)


def test_the_trainer_alone_on_counted_chunks() -> None:
    # "aaab" twice, "ab" once: (a, a) counts 4 (pairs overlap when counted), (a, b) 3; after a+a -> 256,
    # "aaab" is [256, a, b] and (a, b) counts 3; then (256, 257) is the one pair left.
    assert merge([97, 97, 97, 98], (97, 97), 256) == [256, 97, 98]  # left to right, never overlapping
    assert train_merges({b"aaab": 2, b"ab": 1}, 5) == [(97, 97), (97, 98), (256, 257)]
    assert train_merges({b"aaab": 2, b"ab": 1}, 1) == [(97, 97)]


def test_bpe_train_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        ByteBPETokenizer.train("abc", 100)
    with pytest.raises(ValueError, match="endoftext"):
        ByteBPETokenizer.train("abc", 300, special_tokens=("<pad>",))


# ---------------------------------------------------------------------------------------------
# Characters
# ---------------------------------------------------------------------------------------------


def test_char_tokenizer_on_tiny_shakespeare(char_tok: CharTokenizer, tiny_shakespeare: str) -> None:
    assert len(char_tok.chars) == 65
    assert (char_tok.vocab_size, char_tok.eot_id, char_tok.name) == (66, 65, "char")
    assert char_tok.chars[:3] == "\n !" and char_tok.encode("Hi!") == [20, 47, 2]
    ids = char_tok.encode(tiny_shakespeare)
    assert len(ids) == 1_115_394 and char_tok.decode(ids) == tiny_shakespeare


def test_char_unknown_character(char_tok: CharTokenizer) -> None:
    with pytest.raises(ValueError, match=r"'é' \(U\+00E9\) at position 3"):
        char_tok.encode("caf\u00e9")


@FEW
@given(st.data())
def test_char_round_trip(char_tok: CharTokenizer, data: st.DataObject) -> None:
    text = data.draw(st.text(alphabet=st.sampled_from(char_tok.chars)))
    assert char_tok.decode(char_tok.encode(text)) == text


# ---------------------------------------------------------------------------------------------
# Finding (and downloading) GPT-2's files, never over the real network
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def empty_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No $SCRATCHGPT_GPT2_DIR and an empty user cache; returns where the GPT-2 files would go."""
    monkeypatch.delenv("SCRATCHGPT_GPT2_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    return tmp_path / "scratchgpt" / "gpt2"


def test_offline_download_gives_one_clear_line(empty_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(url: str, *args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(FileNotFoundError, match="SCRATCHGPT_GPT2_DIR") as info:
        gpt2_tokenizer()
    assert "\n" not in str(info.value) and "no network" in str(info.value)
    assert not empty_cache.exists() or not any(empty_cache.iterdir())


class _FakeResponse:
    def __init__(self, data: bytes) -> None:
        self._data = data

    def read(self) -> bytes:
        return self._data

    def __enter__(self) -> _FakeResponse:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def test_download_fills_the_cache_once(
    empty_cache: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fetched = []

    def serve_local(url: str, *args: object, **kwargs: object) -> _FakeResponse:
        fetched.append(url.rsplit("/", 1)[1])
        return _FakeResponse((data_dir / "gpt2" / fetched[-1]).read_bytes())

    monkeypatch.setattr(urllib.request, "urlopen", serve_local)
    assert gpt2_tokenizer().encode("Hello, I am") == [15496, 11, 314, 716]
    assert sorted(fetched) == ["encoder.json", "vocab.bpe"]
    assert sorted(p.name for p in empty_cache.iterdir()) == ["encoder.json", "vocab.bpe"]
    gpt2_tokenizer()
    assert len(fetched) == 2  # the second call reads the cache


def test_download_with_a_wrong_hash_writes_nothing(
    empty_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, *a, **k: _FakeResponse(b"{}"))
    with pytest.raises(ValueError, match="sha256"):
        gpt2_tokenizer()
    assert not empty_cache.exists() or not any(empty_cache.iterdir())


def test_gpt2_dir_lookup_order(tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(FileNotFoundError, match="lacks encoder.json"):
        gpt2_tokenizer(tmp_path)
    monkeypatch.setenv("SCRATCHGPT_GPT2_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="SCRATCHGPT_GPT2_DIR"):
        gpt2_tokenizer()
    assert gpt2_tokenizer(data_dir / "gpt2").vocab_size == 50257  # an explicit folder wins over the env


def test_corrupt_gpt2_files(tmp_path: Path, data_dir: Path) -> None:
    (tmp_path / "encoder.json").write_bytes((data_dir / "gpt2" / "encoder.json").read_bytes())
    (tmp_path / "vocab.bpe").write_text("#version: 0.2\nĠ t\nĠ x\n")
    with pytest.raises(ValueError, match="not a GPT-2 encoder.json/vocab.bpe pair"):
        GPT2Tokenizer.from_dir(tmp_path)


# ---------------------------------------------------------------------------------------------
# The factory used by data preparation
# ---------------------------------------------------------------------------------------------


def test_build_tokenizer(data_dir: Path, verdict: str) -> None:
    assert isinstance(build_tokenizer("gpt2", gpt2_dir=data_dir / "gpt2"), GPT2Tokenizer)
    bpe = build_tokenizer("bpe", text=verdict, vocab_size=300)
    assert isinstance(bpe, ByteBPETokenizer) and bpe.vocab_size == 300
    char = build_tokenizer("char", text="hello")
    assert isinstance(char, CharTokenizer) and char.chars == "ehlo" and char.vocab_size == 5
    with pytest.raises(ValueError, match="text="):
        build_tokenizer("char")
    with pytest.raises(ValueError, match="vocab_size"):
        build_tokenizer("bpe", text=verdict)
    with pytest.raises(ValueError, match="unknown tokenizer kind"):
        build_tokenizer("wordpiece", text=verdict)  # type: ignore[arg-type]


def test_saved_files_are_plain_json(small_bpe: ByteBPETokenizer, tmp_path: Path) -> None:
    small_bpe.save(tmp_path)
    meta = json.loads((tmp_path / "tokenizer.json").read_text())
    assert meta["type"] == "bpe" and len(meta["merges"]) == 300 and meta["special_tokens"] == {EOT_TEXT: 556}


# ---------------------------------------------------------------------------------------------
# Safe cuts: pieces tokenize to the ids of the whole (what lets `prepare` stream and parallelise)
# ---------------------------------------------------------------------------------------------

# Pieces that stress GPT-2's pre-tokenizer: whitespace runs of every kind (Unicode White_Space and
# the four str.isspace()-only separators), contractions, numbers, punctuation, combining marks, specials.
_TRICKY = st.sampled_from([
    " ", "  ", "\n", "\n\n", "\n\n\n", "\r\n", "\t", " \t ", "\u00a0", "\u3000", "\u2028", "\x85", "\x1c", "\x1f",
    "\x0b", "\x0c", "a", "word", "Word", "'s", "'ll", "don't", "123", "4", ".", ",!?", "--", "é", "e\u0301",
    "日本語", "😀", EOT_TEXT, "<|", "|>",
])
_TRICKY_TEXT = st.lists(st.one_of(_TRICKY, st.text(max_size=4)), max_size=40).map("".join)


def _cut_at(text: str, sizes: list[int]) -> list[str]:
    """`text` in pieces, cutting with safe_cut at most `size` characters into what is left."""
    pieces, rest = [], text
    for size in sizes:
        cut = safe_cut(rest, size)
        if cut > 0:
            pieces.append(rest[:cut])
            rest = rest[cut:]
    return [*pieces, rest] if rest else pieces


def _assert_pieces_encode_like_whole(tokenizers: list[Tokenizer], text: str, pieces: list[str]) -> None:
    assert "".join(pieces) == text
    for tok in tokenizers:
        joined = [i for piece in pieces for i in tok.encode(piece, allowed_special=True)]
        assert joined == tok.encode(text, allowed_special=True), (type(tok).__name__, pieces)


@FEW
@given(text=_TRICKY_TEXT, sizes=st.lists(st.integers(1, 30), max_size=12))
def test_safe_cut_pieces_encode_like_the_whole_text(
    gpt2_tokenizer: GPT2Tokenizer, gpt2_bpe: ByteBPETokenizer, small_bpe: ByteBPETokenizer, text: str,
    sizes: list[int],
) -> None:
    pieces = _cut_at(text, sizes)
    toks: list[Tokenizer] = [gpt2_tokenizer, gpt2_bpe, small_bpe]
    if text.replace(EOT_TEXT, ""):
        toks.append(CharTokenizer.train(text))
    _assert_pieces_encode_like_whole(toks, text, pieces)


def test_every_safe_cut_of_real_text_is_safe(gpt2_tokenizer: GPT2Tokenizer, gpt2_bpe: ByteBPETokenizer,
                                             tiny_shakespeare: str) -> None:
    # All 1,000+ cut positions of a stretch of Shakespeare, with CRLF and odd whitespace mixed in.
    text = tiny_shakespeare[:3000].replace("\n\n", "\r\n\n", 5).replace(" the", "\u00a0 \tthe", 5)
    cuts = [i for i in range(1, len(text)) if safe_cut(text, i) == i]
    assert len(cuts) > 500
    whole = gpt2_tokenizer.encode(text)
    for i in cuts:
        assert gpt2_tokenizer.encode(text[:i]) + gpt2_tokenizer.encode(text[i:]) == whole, i
    assert all(gpt2_bpe.encode(text[:i]) + gpt2_bpe.encode(text[i:]) == gpt2_bpe.encode(text) for i in cuts[::25])


def test_safe_cut_avoids_the_unsafe_places(gpt2_tokenizer: GPT2Tokenizer) -> None:
    enc = gpt2_tokenizer.encode
    # The naive places would change the ids: after the space of "foo bar" (" bar" is one token), between
    # newlines of a run ("\n\n" + "\n" before a word), after a whitespace run's end ("\n\n" is one token
    # at the end of a piece, two before a word).
    for text, bad in (("foo bar", 4), ("x\n\n\nabc", 2), ("foo\n\nBar", 5)):
        assert enc(text[:bad]) + enc(text[bad:]) != enc(text)
        assert safe_cut(text, bad) != bad
    assert safe_cut("foo bar", 7) == 3 and safe_cut("x\n\n\nabc", 7) == 3 and safe_cut("foo\n\nBar", 8) == 4
    assert safe_cut("nowhitespaceatall", 10) == -1 and safe_cut("ends with space ", 16) == 9
    assert safe_cut(" leading", 5) == -1  # never an empty first piece


def test_whitespace_facts_the_safe_cut_proof_relies_on() -> None:
    import re
    import sys

    # Everything tiktoken / `regex` call whitespace (Unicode White_Space) is whitespace to str.isspace()
    # and to `re`, so a character `re` sees as \S is non-whitespace for every engine.
    every = "".join(map(chr, range(sys.maxunicode + 1)))
    isspace = {c for c in every if c.isspace()}
    assert set(regex.findall(r"\s", every)) < isspace  # U+001C..U+001F are str.isspace() only
    assert set(re.findall(r"\s", every)) == isspace
    assert len(regex.findall(r"\s", every)) == 25  # Unicode White_Space


def test_training_on_pieces_equals_training_on_the_whole(verdict: str, small_bpe: ByteBPETokenizer) -> None:
    pieces = _cut_at(verdict, [97] * 400)
    assert len(pieces) > 100 and "".join(pieces) == verdict
    assert ByteBPETokenizer.train(iter(pieces), 256 + 300 + 1).merges == small_bpe.merges
    assert CharTokenizer.train(iter(pieces)).chars == CharTokenizer.train(verdict).chars


# The `regex` package and tiktoken carry different Unicode versions: U+18EB9 is a letter to one and
# unassigned to the other. tiktoken is the reference, so the pure-Python BPE must split as it does.
RECENT_UNICODE = [chr(0x18EB9) + "'ve", "a" + chr(0x18EB9) + "b 12" + chr(0x1CCF0), "x" + chr(0x31350) + "'s"]


@pytest.mark.parametrize("text", RECENT_UNICODE)
def test_bpe_with_gpt2_merges_equals_tiktoken_on_recent_unicode(
    gpt2_bpe: ByteBPETokenizer, gpt2_tokenizer: GPT2Tokenizer, text: str
) -> None:
    assert gpt2_bpe.encode(text) == gpt2_tokenizer.encode(text)
    assert gpt2_bpe.decode(gpt2_bpe.encode(text)) == text


@FEW
@given(st.text(alphabet=st.characters(min_codepoint=0x10000, max_codepoint=0x3FFFF, exclude_categories=("Cs",)))
       .map(lambda t: t + "'ve 1"))
def test_bpe_equals_tiktoken_on_astral_text(
    gpt2_bpe: ByteBPETokenizer, gpt2_tokenizer: GPT2Tokenizer, text: str
) -> None:
    assert gpt2_bpe.encode(text) == gpt2_tokenizer.encode(text)
