"""Token files from text (prepare), their validation, and the two window samplers."""

from __future__ import annotations

import codecs
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from scratchgpt.cli import main
from scratchgpt.data.dataset import (
    _survey,
    find_text_files,
    iter_text_pieces,
    prepare,
    read_text,
    split_text,
    token_dtype,
)
from scratchgpt.data.samplers import RandomWindows, SequentialWindows
from scratchgpt.data.sources import DataError
from scratchgpt.data.token_files import ShardedTokens, check_token_files, first_id_at_or_above, open_dataset
from scratchgpt.data.tokenizers import load_tokenizer

# ---------------------------------------------------------------------------------------------
# prepare on the real data
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shakespeare_gpt2(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ts_gpt2")
    prepare(data_dir / "text" / "tinyshakespeare.txt", out, tokenizer="gpt2", gpt2_dir=data_dir / "gpt2",
            progress=False)
    return out


def test_tiny_shakespeare_gpt2_split_matches_nanogpt(shakespeare_gpt2: Path) -> None:
    meta = json.loads((shakespeare_gpt2 / "meta.json").read_text())
    # nanoGPT splits the text at 90% of its characters and encodes each part: 301,966 + 36,059 = 338,025,
    # which is also the whole file's count (the cut falls between two tokens).
    assert (meta["train_tokens"], meta["val_tokens"]) == (301_966, 36_059)
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 50257 and meta["tokenizer"] == "gpt2"
    ds = open_dataset(shakespeare_gpt2)
    train = ds.tokens("train")
    assert isinstance(train, np.memmap) and train.dtype == np.uint16 and len(train) == 301_966
    assert (shakespeare_gpt2 / "train.bin").stat().st_size == 2 * 301_966
    tok = load_tokenizer(shakespeare_gpt2)  # saved beside the data
    assert tok.decode(train[:5].tolist()) == "First Citizen:\nBefore"
    assert 50256 not in set(np.asarray(train).tolist())  # one document: no separator


def test_whole_file_token_counts(data_dir: Path, gpt2_tokenizer) -> None:
    text = (data_dir / "text" / "tinyshakespeare.txt").read_text()
    assert len(text) == 1_115_394 and len(set(text)) == 65
    assert len(gpt2_tokenizer.encode(text)) == 338_025
    train, val = split_text(text, 0.1)
    assert len(train) == 1_003_854 and train + val == text


def test_the_verdict_all_train(data_dir: Path, tmp_path: Path) -> None:
    meta = prepare(data_dir / "text" / "the-verdict.txt", tmp_path, val_fraction=0.0, gpt2_dir=data_dir / "gpt2",
                   progress=False)
    assert (meta["train_tokens"], meta["val_tokens"]) == (5145, 0)
    assert len(open_dataset(tmp_path).tokens("val")) == 0


def test_char_level_tiny_shakespeare(data_dir: Path, tmp_path: Path) -> None:
    meta = prepare(data_dir / "text" / "tinyshakespeare.txt", tmp_path, tokenizer="char", progress=False)
    # nanoGPT's shakespeare_char: 1,003,854 / 111,540; 65 characters plus end-of-text.
    assert (meta["train_tokens"], meta["val_tokens"], meta["vocab_size"]) == (1_003_854, 111_540, 66)


# ---------------------------------------------------------------------------------------------
# prepare on small synthetic corpora
# ---------------------------------------------------------------------------------------------


def _write_docs(folder: Path, texts: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, text in enumerate(texts):
        (folder / f"doc{i:02d}.txt").write_text(text)
    return folder


def test_folder_documents_separated_by_eot_and_parallel_is_deterministic(tmp_path: Path) -> None:
    docs = _write_docs(tmp_path / "docs", [f"document number {i}: " + "abcdefghij" * (i + 3) for i in range(5)])
    (tmp_path / "docs" / "notes.md").write_text("ignored: not a .txt file")
    one = prepare(docs, tmp_path / "w1", tokenizer="char", workers=1, progress=False)
    two = prepare(docs, tmp_path / "w2", tokenizer="char", workers=2, progress=False)
    assert (tmp_path / "w1" / "train.bin").read_bytes() == (tmp_path / "w2" / "train.bin").read_bytes()
    assert (tmp_path / "w1" / "val.bin").read_bytes() == (tmp_path / "w2" / "val.bin").read_bytes()
    assert len(one["files"]) == 5 and one["train_tokens"] == two["train_tokens"]
    ds = open_dataset(tmp_path / "w1")
    tok = ds.tokenizer()
    train = np.asarray(ds.tokens("train")).tolist()
    assert train.count(tok.eot_id) == 4  # between the 5 documents, not after the last
    first = tok.decode(train[: train.index(tok.eot_id)])
    assert first == split_text((docs / "doc00.txt").read_text(), 0.1)[0]


def test_split_by_documents_holds_out_whole_files(tmp_path: Path) -> None:
    docs = _write_docs(tmp_path / "docs", [f"doc {i} " * 20 for i in range(10)])
    meta = prepare(docs, tmp_path / "out", tokenizer="char", val_fraction=0.2, split_by="documents", progress=False)
    held_out = [f["path"] for f in meta["files"] if f["val_share"] == 1.0]
    assert [Path(p).name for p in held_out] == ["doc04.txt", "doc09.txt"]
    tok = open_dataset(tmp_path / "out").tokenizer()
    val = tok.decode(np.asarray(open_dataset(tmp_path / "out").tokens("val")).tolist())
    assert val == "doc 4 " * 20 + "<|endoftext|>" + "doc 9 " * 20


def test_glob_source_and_bpe_tokenizer(data_dir: Path, tmp_path: Path) -> None:
    meta = prepare(str(data_dir / "text" / "the-verdict*"), tmp_path, tokenizer="bpe", bpe_vocab_size=300,
                   progress=False)
    assert meta["tokenizer"] == "bpe" and meta["vocab_size"] == 300 and meta["dtype"] == "uint16"
    ds = open_dataset(tmp_path)
    text = (data_dir / "text" / "the-verdict.txt").read_text()
    assert ds.tokenizer().decode(np.asarray(ds.tokens("train")).tolist()) == split_text(text, 0.1)[0]


def test_token_dtype_switches_to_uint32() -> None:
    assert token_dtype(65_536) == np.uint16 and token_dtype(65_537) == np.uint32


# ---------------------------------------------------------------------------------------------
# Bad input: one line naming the file, before any training
# ---------------------------------------------------------------------------------------------


def _error_line(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    return err


def test_empty_corpus(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    err = _error_line(capsys, ["prepare", "--source", str(empty), "--dir", str(tmp_path / "out"), "--quiet"])
    assert str(empty) in err and "empty corpus" in err


def test_non_utf8_names_file_and_offset_or_is_replaced(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"caf" + b"\xe9 au lait, " * 3)
    out = tmp_path / "out"
    err = _error_line(capsys, ["prepare", "--source", str(bad), "--dir", str(out), "--tokenizer", "char", "--quiet"])
    assert str(bad) in err and "byte offset 3" in err and "--errors replace" in err
    assert f"iconv -f LATIN1 -t UTF-8 {bad}" in err  # another encoding is converted, not replaced
    assert not (out / "meta.json").exists()
    assert main(["prepare", "--source", str(bad), "--dir", str(out), "--tokenizer", "char", "--quiet",
                 "--errors", "replace"]) == 0
    assert "\ufffd" in load_tokenizer(out).chars
    with pytest.raises(DataError, match="byte offset 3"):
        read_text(bad)


@pytest.mark.parametrize(("encoding", "bom", "named", "iconv"), [
    ("utf-16-le", codecs.BOM_UTF16_LE, "UTF-16 (little-endian)", "-f UTF-16 "),
    ("utf-16-be", codecs.BOM_UTF16_BE, "UTF-16 (big-endian)", "-f UTF-16 "),
    ("utf-32-le", codecs.BOM_UTF32_LE, "UTF-32 (little-endian)", "-f UTF-32 "),
    ("utf-32-be", codecs.BOM_UTF32_BE, "UTF-32 (big-endian)", "-f UTF-32 "),
    ("utf-16-le", b"", "UTF-16 (little-endian)", "-f UTF-16LE "),
    ("utf-16-be", b"", "UTF-16 (big-endian)", "-f UTF-16BE "),
    ("utf-32-le", b"", "UTF-32 (little-endian)", "-f UTF-32LE "),
    ("utf-32-be", b"", "UTF-32 (big-endian)", "-f UTF-32BE "),
])
def test_utf16_and_utf32_are_named_with_how_to_convert(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                       encoding: str, bom: bytes, named: str, iconv: str) -> None:
    # Before: "pass --errors replace", which then "succeeded" with a NUL between every character (and
    # UTF-16 without a byte order mark, all valid UTF-8 bytes, went through with no message at all).
    src = tmp_path / "wide.txt"
    src.write_bytes(bom + ("First Citizen: before we proceed any further, hear me speak.\n" * 20).encode(encoding))
    for errors in ("strict", "replace"):
        err = _error_line(capsys, ["prepare", "--source", str(src), "--dir", str(tmp_path / "out"), "--tokenizer",
                                   "char", "--errors", errors, "--quiet"])
        assert str(src) in err and named in err and f"iconv {iconv}-t UTF-8 {src}" in err
        assert "--errors" not in err
    assert not (tmp_path / "out" / "meta.json").exists()
    with pytest.raises(DataError, match=re.escape(named)):
        read_text(src, errors="replace")


def test_a_nul_heavy_binary_file_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "blob.txt"
    src.write_bytes(bytes(range(256)) * 8 + b"\0" * 1024)
    with pytest.raises(DataError, match="bytes are NUL: a binary file"):
        read_text(src)


def test_a_utf8_byte_order_mark_is_dropped(tmp_path: Path) -> None:
    plain, marked = tmp_path / "plain.txt", tmp_path / "marked.txt"
    text = "Hello, world.\nHow are you?\n" * 10
    plain.write_text(text, encoding="utf-8")
    marked.write_text(text, encoding="utf-8-sig")
    assert marked.read_bytes()[:3] == codecs.BOM_UTF8
    assert read_text(marked) == text
    a = prepare(plain, tmp_path / "a", tokenizer="char", progress=False)
    b = prepare(marked, tmp_path / "b", tokenizer="char", progress=False)
    assert "\ufeff" not in load_tokenizer(tmp_path / "b").chars
    assert load_tokenizer(tmp_path / "b").chars == load_tokenizer(tmp_path / "a").chars
    assert (tmp_path / "a" / "train.bin").read_bytes() == (tmp_path / "b" / "train.bin").read_bytes()
    assert (a["train_tokens"], a["val_tokens"]) == (b["train_tokens"], b["val_tokens"])
    # An undecodable byte after the mark is reported at its offset in the file.
    (tmp_path / "bad.txt").write_bytes(codecs.BOM_UTF8 + b"caf\xe9")
    with pytest.raises(DataError, match="byte offset 6 "):
        read_text(tmp_path / "bad.txt")
    with pytest.raises(DataError, match="byte offset 6 "):
        list(iter_text_pieces(tmp_path / "bad.txt", chunk_bytes=2))


def test_missing_source(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = _error_line(capsys, ["prepare", "--source", str(tmp_path / "nope.txt"), "--dir", str(tmp_path), "--quiet"])
    assert "nope.txt" in err
    with pytest.raises(DataError, match="no .txt files"):
        find_text_files(tmp_path)


@pytest.fixture
def tiny_char_data(tmp_path: Path) -> Path:
    text = tmp_path / "tiny.txt"
    text.write_text("to be or not to be, that is the question\n" * 3)
    prepare(text, tmp_path / "data", tokenizer="char", progress=False)
    return tmp_path / "data"


_TINY = ["--n-layer", "1", "--n-head", "1", "--n-embd", "8", "--max-steps", "1", "--progress", "false"]


def test_corpus_shorter_than_one_window(tiny_char_data: Path, tmp_path: Path, capsys) -> None:
    meta = json.loads((tiny_char_data / "meta.json").read_text())
    block = meta["train_tokens"]  # needs block + 1 tokens
    err = _error_line(capsys, ["train", "--dir", str(tiny_char_data), "--out-dir", str(tmp_path / "run"),
                               "--block-size", str(block), *_TINY])
    assert str(tiny_char_data / "train.bin") in err and "shorter than one window" in err
    assert not (tmp_path / "run").exists()


def test_tokenizer_larger_than_model_vocab(tiny_char_data: Path, tmp_path: Path, capsys) -> None:
    err = _error_line(capsys, ["train", "--dir", str(tiny_char_data), "--out-dir", str(tmp_path / "run"),
                               "--vocab-size", "5", "--block-size", "8", *_TINY])
    assert str(tiny_char_data / "meta.json") in err and "vocab_size is 5" in err


def test_missing_train_bin_and_meta(tiny_char_data: Path, tmp_path: Path, capsys) -> None:
    (tiny_char_data / "train.bin").unlink()
    err = _error_line(capsys, ["train", "--dir", str(tiny_char_data), "--out-dir", str(tmp_path / "run"),
                               "--vocab-size", "50", "--block-size", "8", *_TINY])
    assert str(tiny_char_data / "train.bin") in err and "not found" in err
    err = _error_line(capsys, ["train", "--dir", str(tmp_path / "nowhere"), "--out-dir", str(tmp_path / "run"),
                               "--vocab-size", "50", "--block-size", "8", *_TINY])
    assert str(tmp_path / "nowhere" / "meta.json") in err and "scratchgpt prepare" in err


def test_truncated_token_file(tiny_char_data: Path) -> None:
    path = tiny_char_data / "val.bin"
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(DataError, match="val.bin: .* truncated"):
        open_dataset(tiny_char_data)


def _patch_id(path: Path, position: int, value: int, dtype: str = "uint16") -> None:
    ids = np.fromfile(path, dtype=dtype)
    ids[position] = value
    ids.tofile(path)


@pytest.mark.parametrize("shard_tokens", [0, 40])
def test_ids_outside_the_vocabulary_name_the_file(tmp_path: Path, capsys, shard_tokens: int) -> None:
    # Before: a train.bin of the promised size holding an id >= vocab_size trained until the embedding
    # raised "IndexError: index out of range in self" (a device-side assert on a GPU).
    text = tmp_path / "tiny.txt"
    text.write_text("to be or not to be, that is the question\n" * 6)
    meta = prepare(text, tmp_path / "data", tokenizer="char", shard_tokens=shard_tokens, progress=False)
    ds = open_dataset(tmp_path / "data")
    check_token_files(ds, vocab_size=meta["vocab_size"])  # as prepared: every id fits
    path, n = ds.shards("train")[-1]
    _patch_id(path, n - 3, meta["vocab_size"])
    with pytest.raises(DataError, match=re.escape(f"{path}: token id {meta['vocab_size']} at position {n - 3} is "
                                                  f"outside the tokenizer's vocabulary of {meta['vocab_size']}")):
        check_token_files(ds)
    check_token_files(ds, splits=("val",))  # only the files read are scanned
    err = _error_line(capsys, ["train", "--dir", str(tmp_path / "data"), "--out-dir", str(tmp_path / "run"),
                               "--block-size", "8", *_TINY])
    assert str(path) in err and "outside the tokenizer's vocabulary" in err
    assert not (tmp_path / "run").exists()


@given(ids=st.lists(st.integers(0, 70), min_size=1, max_size=60), chunk=st.integers(1, 8))
@settings(max_examples=50, deadline=None)
def test_the_chunked_scan_finds_the_first_id_past_the_limit(tmp_path_factory, ids: list[int], chunk: int) -> None:
    path = tmp_path_factory.mktemp("scan") / "t.bin"
    np.asarray(ids, dtype=np.uint16).tofile(path)
    first = next(((i, v) for i, v in enumerate(ids) if v >= 65), None)
    assert first_id_at_or_above(path, np.dtype(np.uint16), 65, chunk=chunk) == first


def test_a_folder_is_checked_against_the_model_tokenizer(tiny_char_data: Path, gpt2_tokenizer) -> None:
    from scratchgpt.data.tokenizers import ByteBPETokenizer, CharTokenizer

    ds = open_dataset(tiny_char_data)
    with pytest.raises(DataError, match=re.escape(
            f"{tiny_char_data} was prepared with a 'char' tokenizer (16 tokens), but the model uses a 'gpt2' "
            f"tokenizer (50,257 tokens): its ids would be read as other text; prepare the text again with "
            f"--tokenizer gpt2")):
        check_token_files(ds, tokenizer=gpt2_tokenizer)
    # Same kind and size is not enough: a char alphabet one letter apart gives every id another meaning.
    other = CharTokenizer(ds.tokenizer().chars.replace("a", "A"))
    with pytest.raises(DataError, match="prepared with a 'char' tokenizer"):
        check_token_files(ds, tokenizer=other)
    check_token_files(ds, tokenizer=CharTokenizer(ds.tokenizer().chars))  # an equal tokenizer passes
    # Another kind whose ids mean the same bytes passes: GPT-2's files read as a byte-level BPE.
    gpt2_dir = Path(os.environ["SCRATCHGPT_GPT2_DIR"])
    as_bpe = ByteBPETokenizer.from_gpt2_files(gpt2_dir / "encoder.json", gpt2_dir / "vocab.bpe")
    assert as_bpe.fingerprint() == gpt2_tokenizer.fingerprint()


def test_meta_json_that_disagrees_with_its_folder_is_refused(tiny_char_data: Path) -> None:
    meta_path = tiny_char_data / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "vocab_size": 65}))
    with pytest.raises(DataError, match="vocab_size 65 disagrees with its tokenizer.json \\(16 tokens\\)"):
        check_token_files(open_dataset(tiny_char_data))
    for bad in ({"dtype": "float32"}, {"dtype": "uint8"}, {"vocab_size": "20"}):
        meta_path.write_text(json.dumps({**meta, **bad}))
        with pytest.raises(DataError, match="must be uint16 or uint32 and a positive integer"):
            open_dataset(tiny_char_data)
    outside = {**meta, "shards": {**meta["shards"], "val": [{"file": "../val.bin", "tokens": meta["val_tokens"]}]}}
    meta_path.write_text(json.dumps(outside))
    with pytest.raises(DataError, match="malformed shard index .*not a token file of this folder"):
        open_dataset(tiny_char_data)


# ---------------------------------------------------------------------------------------------
# Streaming: pieces, workers, shards, old folders, bounded bpe sample
# ---------------------------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(data=st.binary(max_size=300) | st.text(max_size=100).map(lambda t: t.encode("utf-8", "surrogatepass")),
       chunk=st.integers(1, 16))
def test_pieces_join_to_the_decoded_file(tmp_path_factory: pytest.TempPathFactory, data: bytes, chunk: int) -> None:
    path = tmp_path_factory.mktemp("pieces") / "f.txt"
    path.write_bytes(data)
    try:
        whole = read_text(path, errors="replace")
    except DataError as e:  # UTF-16/32 by its byte order mark or its NULs: the stream refuses it alike
        assert data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE, codecs.BOM_UTF32_BE)) or \
            data.count(0) * 10 >= len(data) > 0
        with pytest.raises(DataError, match=re.escape(str(e))):
            list(iter_text_pieces(path, errors="replace", chunk_bytes=chunk))
        return
    bom = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    assert whole == data[bom:].decode("utf-8", errors="replace")
    pieces = list(iter_text_pieces(path, errors="replace", chunk_bytes=chunk))
    assert "".join(p for p, _ in pieces) == whole
    assert sum(n for _, n in pieces) == len(data)
    try:
        data[bom:].decode("utf-8")
    except UnicodeDecodeError as e:  # strict: the offset of the first bad byte, whatever the chunk size
        with pytest.raises(DataError, match=f"byte offset {bom + e.start} "):
            list(iter_text_pieces(path, chunk_bytes=chunk))


def test_one_big_file_is_streamed_in_bounded_pieces(data_dir: Path, tmp_path: Path, shakespeare_gpt2: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import scratchgpt.data.dataset as dataset

    seen: list[int] = []
    encode = dataset._encode_text

    def spy(tok, text: str, dtype: str) -> np.ndarray:
        seen.append(len(text))
        return encode(tok, text, dtype)

    monkeypatch.setattr(dataset, "_encode_text", spy)
    src = data_dir / "text" / "tinyshakespeare.txt"
    meta = prepare(src, tmp_path / "w1", gpt2_dir=data_dir / "gpt2", workers=1, chunk_bytes=50_000, progress=False)
    assert len(seen) > 20 and max(seen) < 51_000  # 23 pieces (+1 where train ends), none near the whole file
    assert (meta["train_tokens"], meta["val_tokens"]) == (301_966, 36_059)
    for split in ("train", "val"):  # same bytes as the fixture's one piece per split (default chunk of 4 MB)
        assert (tmp_path / "w1" / f"{split}.bin").read_bytes() == (shakespeare_gpt2 / f"{split}.bin").read_bytes()


def test_one_file_same_bytes_with_one_or_two_workers(data_dir: Path, tmp_path: Path) -> None:
    src = data_dir / "text" / "tinyshakespeare.txt"
    outs = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        prepare(src, out, tokenizer="char", workers=workers, chunk_bytes=100_000, shard_tokens=300_000, progress=False)
        outs.append({p.name: p.read_bytes() for p in sorted(out.glob("*.bin"))})
    assert list(outs[0]) == ["train-00000.bin", "train-00001.bin", "train-00002.bin", "train-00003.bin",
                             "val-00000.bin"]
    assert outs[0] == outs[1]


def test_shards_read_like_the_single_file(data_dir: Path, tmp_path: Path, shakespeare_gpt2: Path) -> None:
    src = data_dir / "text" / "tinyshakespeare.txt"
    meta = prepare(src, tmp_path, gpt2_dir=data_dir / "gpt2", shard_tokens=100_000, progress=False)
    assert [s["tokens"] for s in meta["shards"]["train"]] == [100_000, 100_000, 100_000, 1_966]
    assert meta["shards"]["val"] == [{"file": "val-00000.bin", "tokens": 36_059}]
    sharded, single = open_dataset(tmp_path), open_dataset(shakespeare_gpt2)
    train = sharded.tokens("train")
    assert isinstance(train, ShardedTokens) and len(train) == 301_966
    assert np.array_equal(np.asarray(train), np.asarray(single.tokens("train")))
    assert isinstance(sharded.tokens("val"), np.memmap)  # one shard: a plain memmap
    # Windows cross shard boundaries, so every batch, and every resume, is that of the single file.
    block = 64
    for kind in (RandomWindows, SequentialWindows):
        a, b = (kind(ds.tokens("train"), block_size=block, batch_size=8, seed=5) for ds in (sharded, single))
        for _ in range(3):
            a.next_batch(), b.next_batch()
        assert a.state_dict() == b.state_dict()
        for _ in range(20):
            (xa, ya), (xb, yb) = a.next_batch(), b.next_batch()
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    crossing = SequentialWindows(train, block_size=block, batch_size=1, stride=1, shuffle=False)
    crossing.position = 100_000 - 10  # the window over tokens 99,990 .. 100,054 spans shards 0 and 1
    x, y = crossing.next_batch()
    assert x[0].tolist() == np.asarray(single.tokens("train")[99_990:100_054], dtype=np.int64).tolist()


@settings(max_examples=50, deadline=None)
@given(lengths=st.lists(st.integers(0, 7), max_size=5), start=st.integers(-30, 30), stop=st.integers(-30, 30))
def test_sharded_tokens_slice_like_their_concatenation(lengths: list[int], start: int, stop: int) -> None:
    parts = [np.arange(sum(lengths[:i]), sum(lengths[: i + 1]), dtype=np.uint16) for i in range(len(lengths))]
    whole = np.arange(sum(lengths), dtype=np.uint16)
    view = ShardedTokens(parts)
    assert len(view) == len(whole)
    assert np.array_equal(view[start:stop], whole[start:stop]) and np.array_equal(view[start:], whole[start:])
    if -len(whole) <= start < len(whole):
        assert view[start] == whole[start]


def test_version_1_folder_still_loads(tiny_char_data: Path) -> None:
    meta_path = tiny_char_data / "meta.json"
    meta = json.loads(meta_path.read_text())
    expected = np.asarray(open_dataset(tiny_char_data).tokens("train")).tolist()
    for key in ("shards", "shard_tokens"):  # what a folder from before shards lacks
        del meta[key]
    meta["format_version"] = 1
    meta_path.write_text(json.dumps(meta))
    ds = open_dataset(tiny_char_data)
    assert np.asarray(ds.tokens("train")).tolist() == expected and ds.path("train") == tiny_char_data / "train.bin"
    meta["format_version"] = 99
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(DataError, match="format_version 99"):
        open_dataset(tiny_char_data)


def test_reprepare_switches_layout_and_checks_shards(tmp_path: Path) -> None:
    src = tmp_path / "t.txt"
    src.write_text("the quick brown fox jumps over the lazy dog\n" * 50)
    out = tmp_path / "out"
    prepare(src, out, tokenizer="char", progress=False)
    prepare(src, out, tokenizer="char", shard_tokens=500, progress=False)
    assert sorted(p.name for p in out.glob("*.bin")) == [f"train-{i:05d}.bin" for i in range(4)] + ["val-00000.bin"]
    (out / "train-00002.bin").write_bytes(b"\0")
    with pytest.raises(DataError, match="train-00002.bin: 1 bytes"):
        open_dataset(out)
    (out / "train-00002.bin").unlink()
    with pytest.raises(DataError, match="train-00002.bin: not found"):
        open_dataset(out)
    prepare(src, out, tokenizer="char", progress=False)  # back to one file per split: the shards go
    assert sorted(p.name for p in out.glob("*.bin")) == ["train.bin", "val.bin"]


def test_bpe_learns_from_a_bounded_deterministic_sample(data_dir: Path, tmp_path: Path) -> None:
    src = data_dir / "text" / "tinyshakespeare.txt"
    survey = _survey([src], [src.stat().st_size], tokenizer="bpe", errors="strict", chunk_bytes=20_000,
                     sample_chars=100_000, bar=_NoBar())
    sampled = sum(map(len, survey.sample))
    assert 80_000 <= sampled <= 100_000 and len(survey.sample) >= 4  # evenly spread pieces, within budget
    text = src.read_text()
    assert text.index(survey.sample[-1]) > len(text) // 2  # not just the beginning
    metas, toks = [], []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        metas.append(prepare(src, out, tokenizer="bpe", bpe_vocab_size=300, workers=workers, chunk_bytes=20_000,
                             bpe_sample_chars=100_000, progress=False))
        toks.append((out / "tokenizer.json").read_bytes() + (out / "train.bin").read_bytes())
    assert toks[0] == toks[1] and metas[0]["bpe_sample_chars"] == 100_000
    from scratchgpt.data.tokenizers import ByteBPETokenizer

    assert load_tokenizer(tmp_path / "w1").merges == ByteBPETokenizer.train(survey.sample, 300).merges


class _NoBar:
    def update(self, n: int) -> None:
        pass


def test_prepare_memory_does_not_grow_with_the_corpus(data_dir: Path, tmp_path: Path) -> None:
    import tracemalloc

    from scratchgpt.data.tokenizers import build_tokenizer

    def peak_of(fn) -> int:
        tracemalloc.start()
        try:
            fn()
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    text = (data_dir / "text" / "tinyshakespeare.txt").read_text()
    tables = peak_of(lambda: build_tokenizer("gpt2", gpt2_dir=data_dir / "gpt2"))  # GPT-2's merge tables
    peaks = []
    for copies in (1, 3):
        src = tmp_path / f"x{copies}.txt"
        src.write_text(text * copies)
        peaks.append(peak_of(lambda src=src: prepare(src, tmp_path / "out", gpt2_dir=data_dir / "gpt2", workers=1,
                                                     chunk_bytes=64 << 10, progress=False)))
    # Streaming 64 KB pieces, the Python heap holds little beyond the tokenizer, for 1.1 MB or 3.3 MB of
    # text; reading the 3.3 MB whole would add ~60 MB (its text and a million token ints).
    assert peaks[1] < peaks[0] + (1 << 20) and peaks[1] < tables + (4 << 20), (tables, peaks)
