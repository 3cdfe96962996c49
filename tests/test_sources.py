"""prepare's inputs besides text files: JSONL, Parquet, Arrow (`datasets.save_to_disk`), compressed files.

Every format must give the token files of its equivalent plain text: one .txt file per record (each
record is a document, as each file is), or the decompressed text file.
"""

from __future__ import annotations

import gzip
import itertools
import json
import lzma
import re
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from scratchgpt.cli import main
from scratchgpt.data.dataset import prepare
from scratchgpt.data.sources import DataError, Source, block_texts, find_sources, iter_blocks, iter_records

# Records as a corpus has them: short and long, several lines, non-ASCII, whitespace only, empty, a
# literal end-of-text marker (a document separator inside the text, as in a text file).
TEXTS = [
    "First record: the quick brown fox jumps over the lazy dog.",
    "Zweiter Datensatz – naïve café, 東京, emoji 🙂 and a tab\there.\nSecond line.\n",
    "",
    "   \n  ",
    "A long one. " * 40 + "\nIt ends here.",
    "before<|endoftext|>after the marker",
    "last",
]


def _text_folder(folder: Path, texts: list[str]) -> Path:
    """The equivalent plain text: one file per record, in record order."""
    folder.mkdir(parents=True)
    for i, text in enumerate(texts):
        (folder / f"doc{i:05d}.txt").write_bytes(text.encode("utf-8"))
    return folder


def _jsonl(path: Path, texts: list[str], *, field: str = "text", opener: Callable = open) -> Path:
    with opener(path, "wb") as f:
        for i, text in enumerate(texts):
            f.write((json.dumps({"id": i, field: text}) + "\n").encode("utf-8"))
    return path


def _zst_opener(path: Path, mode: str):
    zstd = pytest.importorskip("zstandard")
    return zstd.open(path, mode)


def _table(texts: list[str]):
    pa = pytest.importorskip("pyarrow")
    return pa.table({"id": list(range(len(texts))), "text": texts})


def _arrow_stream(path: Path, texts: list[str]) -> Path:
    pa = pytest.importorskip("pyarrow")
    table = _table(texts)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        for batch in table.to_batches(max_chunksize=3):  # several batches, as `datasets` writes
            writer.write_batch(batch)
    return path


def _hf_folder(folder: Path, texts: list[str]) -> Path:
    """A folder laid out as `datasets.save_to_disk` writes it: Arrow stream files named by state.json."""
    folder.mkdir()
    _arrow_stream(folder / "data-00000-of-00002.arrow", texts[:4])
    _arrow_stream(folder / "data-00001-of-00002.arrow", texts[4:])
    state = {"_data_files": [{"filename": "data-00000-of-00002.arrow"}, {"filename": "data-00001-of-00002.arrow"}]}
    (folder / "state.json").write_text(json.dumps(state))
    (folder / "dataset_info.json").write_text("{}")
    return folder


def _write_source(kind: str, tmp_path: Path, texts: list[str]) -> Path:
    if kind == "jsonl":
        return _jsonl(tmp_path / "c.jsonl", texts)
    if kind == "jsonl.gz":
        return _jsonl(tmp_path / "c.jsonl.gz", texts, opener=gzip.open)
    if kind == "jsonl.xz":
        return _jsonl(tmp_path / "c.jsonl.xz", texts, opener=lzma.open)
    if kind == "jsonl.zst":
        return _jsonl(tmp_path / "c.jsonl.zst", texts, opener=_zst_opener)
    if kind == "parquet":
        pq = pytest.importorskip("pyarrow.parquet")
        pq.write_table(_table(texts), tmp_path / "c.parquet", row_group_size=2)  # several row groups
        return tmp_path / "c.parquet"
    if kind == "arrow-stream":
        return _arrow_stream(tmp_path / "c.arrow", texts)
    if kind == "arrow-file":
        pa = pytest.importorskip("pyarrow")
        with pa.OSFile(str(tmp_path / "c.arrow"), "wb") as sink, pa.ipc.new_file(sink, _table(texts).schema) as w:
            w.write_table(_table(texts), max_chunksize=3)
        return tmp_path / "c.arrow"
    if kind == "save_to_disk-layout":
        return _hf_folder(tmp_path / "hf", texts)
    raise AssertionError(kind)


def _token_files(out: Path) -> dict[str, bytes]:
    return {name: (out / name).read_bytes() for name in ("train.bin", "val.bin", "tokenizer.json")}


KINDS = ["jsonl", "jsonl.gz", "jsonl.xz", "jsonl.zst", "parquet", "arrow-stream", "arrow-file", "save_to_disk-layout"]


@pytest.mark.parametrize("kind", KINDS)
def test_every_record_format_gives_the_token_files_of_its_plain_text(tmp_path: Path, kind: str) -> None:
    texts = TEXTS * 3  # 21 records: both splits hold several
    src = _write_source(kind, tmp_path, texts)
    plain = _text_folder(tmp_path / "plain", texts)
    for split_by in ("chars", "documents"):
        # chunk_bytes 40: records are batched and the long ones cut into pieces, so the batching shows.
        common = dict(tokenizer="char", val_fraction=0.2, split_by=split_by, chunk_bytes=40, progress=False)
        want = prepare(plain, tmp_path / f"want-{split_by}", workers=1, **common)
        for workers in (1, 2):
            out = tmp_path / f"{split_by}-{workers}"
            meta = prepare(src, out, workers=workers, **common)
            assert _token_files(out) == _token_files(tmp_path / f"want-{split_by}"), (split_by, workers)
            assert (meta["train_tokens"], meta["val_tokens"]) == (want["train_tokens"], want["val_tokens"])
            assert sum(f["records"] for f in meta["files"]) == len(texts)
            assert sum(f["chars"] for f in meta["files"]) == sum(map(len, texts))
            assert meta["text_field"] == "text"
    # split_by="documents": records 4, 9, 14, 19 of 21 are held out (where int(i * 0.2) steps up).
    assert round(sum(f["val_share"] * f["records"] for f in meta["files"])) == 4


def test_gpt2_jsonl_matches_its_text_files(data_dir: Path, tmp_path: Path) -> None:
    texts = TEXTS * 2
    plain = _text_folder(tmp_path / "plain", texts)
    common = dict(gpt2_dir=data_dir / "gpt2", val_fraction=0.25, split_by="documents", progress=False)
    prepare(plain, tmp_path / "want", workers=1, **common)
    prepare(_jsonl(tmp_path / "c.jsonl", texts), tmp_path / "got", workers=2, chunk_bytes=64, **common)
    assert _token_files(tmp_path / "got") == _token_files(tmp_path / "want")


def test_a_mixed_folder_numbers_documents_across_files_and_blocks(tmp_path: Path) -> None:
    """Text, JSONL and Parquet files in one folder, records read in many blocks: whole documents held out
    by split_by="documents" are those of the folder of one text file per document."""
    pq = pytest.importorskip("pyarrow.parquet")
    texts = TEXTS * 3
    src = tmp_path / "mixed"
    src.mkdir()
    (src / "a.txt").write_text("A text file of its own, one document.")
    _jsonl(src / "b.jsonl", texts)
    pq.write_table(_table(texts[::-1]), src / "c.parquet", row_group_size=4)
    plain = _text_folder(tmp_path / "plain", ["A text file of its own, one document.", *texts, *texts[::-1]])
    common = dict(tokenizer="char", val_fraction=0.3, split_by="documents", chunk_bytes=40, progress=False)
    prepare(plain, tmp_path / "want", workers=1, **common)
    for workers in (1, 2):
        meta = prepare(src, tmp_path / f"got{workers}", workers=workers, **common)
        assert _token_files(tmp_path / f"got{workers}") == _token_files(tmp_path / "want"), workers
        assert [f.get("records") for f in meta["files"]] == [None, 21, 21]


def test_blocks_hold_whole_lines_and_number_them(tmp_path: Path) -> None:
    src = tmp_path / "b.jsonl"
    lines = [b'{"text": "one"}\n', b"\n", b'{"text": "' + b"x" * 30 + b'"}\n', b'{"text": "two"}\n', b'{"text": "end"}']
    src.write_bytes(b"".join(lines))
    blocks = list(iter_blocks(Source.of(src), block_bytes=20))
    # 20 bytes a read: a block ends at the last line end read so far; the 41-byte line is a block of its own.
    assert [(b.first, b.data) for b in blocks] == [(1, lines[0] + lines[1]), (3, lines[2]), (4, lines[3]),
                                                   (5, lines[4])]
    assert sum(b.nbytes for b in blocks) == src.stat().st_size
    assert [t for b in blocks for t in block_texts(b)] == ["one", "x" * 30, "two", "end"]
    # An error in a later block still names the file's line.
    (tmp_path / "bad.jsonl").write_bytes(b"".join(lines[:4]) + b'{"text": 5}\n')
    with pytest.raises(DataError, match=r"bad.jsonl: line 5: field 'text' is a number"):
        [t for b in iter_blocks(Source.of(tmp_path / "bad.jsonl"), block_bytes=20) for t in block_texts(b)]


@pytest.mark.parametrize("kind", ["jsonl.zst", "parquet"])
def test_workers_parse_the_records_and_name_the_bad_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        kind: str) -> None:
    """With workers, the reading process parses no record (both passes), and a bad record far into the
    file fails with the line or row of the file, not of its block."""
    import os

    import scratchgpt.data.dataset as dataset

    main_pid, real = os.getpid(), dataset.block_texts

    def only_in_workers(*args, **kwargs):
        assert os.getpid() != main_pid, "a record was parsed by the reading process"
        return real(*args, **kwargs)

    monkeypatch.setattr(dataset, "block_texts", only_in_workers)  # forked workers inherit the spy
    texts = [f"record {i}: " + "words " * (i % 7) for i in range(300)]
    common = dict(tokenizer="char", val_fraction=0.1, chunk_bytes=256, progress=False)
    prepare(_write_source(kind, tmp_path, texts), tmp_path / "two", workers=2, **common)
    monkeypatch.setattr(dataset, "block_texts", real)
    prepare(_text_folder(tmp_path / "plain", texts), tmp_path / "want", workers=1, **common)
    assert _token_files(tmp_path / "two") == _token_files(tmp_path / "want")
    if kind == "parquet":
        pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
        pq.write_table(pa.table({"text": [*texts[:250], None, *texts[251:]]}), tmp_path / "bad.parquet",
                       row_group_size=16)
        bad, where = tmp_path / "bad.parquet", r"row 250 \(from 0\): 'text' is null"
    else:
        bad, where = _jsonl(tmp_path / "bad.jsonl.zst", texts[:250] + [7] + texts[251:], opener=_zst_opener), \
            "line 251: field 'text' is a number"
    with pytest.raises(DataError, match=f"{bad.name}: {where}"):
        prepare(bad, tmp_path / "bad", workers=2, **common)
    assert not (tmp_path / "bad" / "meta.json").exists()


def test_datasets_save_to_disk_folder(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    texts = TEXTS * 2
    ds = datasets.Dataset.from_dict({"body": texts, "n": list(range(len(texts)))})
    ds.save_to_disk(str(tmp_path / "hf"), num_shards=2)
    plain = _text_folder(tmp_path / "plain", texts)
    common = dict(tokenizer="char", chunk_bytes=40, progress=False)
    prepare(plain, tmp_path / "want", **common)
    meta = prepare(tmp_path / "hf", tmp_path / "got", text_field="body", **common)
    assert _token_files(tmp_path / "got") == _token_files(tmp_path / "want")
    assert [Path(f["path"]).name for f in meta["files"]] == ["data-00000-of-00002.arrow", "data-00001-of-00002.arrow"]
    # A DatasetDict holds one folder per split: the message names them.
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match=r"DatasetDict .* --source .*dd/test \(splits: test, train\)"):
        find_sources(tmp_path / "dd")


@pytest.mark.parametrize("suffix", [".gz", ".xz", ".zst"])
def test_compressed_text_gives_the_token_files_of_the_plain_file(tiny_shakespeare: str, tmp_path: Path,
                                                                 suffix: str) -> None:
    text = tiny_shakespeare[:200_000]
    plain = tmp_path / "plain.txt"
    plain.write_text(text, encoding="utf-8")
    packed = tmp_path / f"packed.txt{suffix}"
    opener = {".gz": gzip.open, ".xz": lzma.open, ".zst": _zst_opener}[suffix]
    with opener(packed, "wb") as f:
        f.write(text.encode("utf-8"))
    common = dict(tokenizer="char", chunk_bytes=16 << 10, progress=False)
    want = prepare(plain, tmp_path / "want", workers=1, **common)
    for workers in (1, 2):
        got = prepare(packed, tmp_path / f"got{workers}", workers=workers, **common)
        assert _token_files(tmp_path / f"got{workers}") == _token_files(tmp_path / "want")
        assert got["files"][0]["chars"] == want["files"][0]["chars"] == len(text)
        assert got["files"][0]["compression"] == {".gz": "gzip", ".xz": "xz", ".zst": "zstd"}[suffix]


def test_a_folder_takes_every_known_format_and_nothing_else(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("one")
    _jsonl(tmp_path / "b.jsonl.gz", ["two"], opener=gzip.open)
    (tmp_path / "notes.md").write_text("not data")
    (tmp_path / "sub").mkdir()
    _jsonl(tmp_path / "sub" / "c.ndjson", ["three"])
    found = [(s.path.name, s.format, s.compression) for s in find_sources(tmp_path)]
    assert found == [("a.txt", "text", None), ("b.jsonl.gz", "jsonl", "gzip"), ("c.ndjson", "jsonl", None)]
    assert Source.of("x/data.tar.gz") == Source(Path("x/data.tar.gz"), "text", "gzip")  # unknown inner: text
    with pytest.raises(DataError, match="decompress it first"):
        Source.of("rows.parquet.gz")


def test_dotted_paths_reach_nested_fields(tmp_path: Path) -> None:
    src = tmp_path / "n.jsonl"
    src.write_text('{"meta": {"body": "nested one"}}\n\n{"meta": {"body": "nested two"}, "meta.body": "flat wins"}\n')
    assert [t for t, _ in iter_records(Source.of(src), field="meta.body")] == ["nested one", "flat wins"]
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = pa.table({"meta": [{"body": "p1", "n": 1}, {"body": "p2", "n": 2}]})
    pq.write_table(table, tmp_path / "n.parquet")
    assert [t for t, _ in iter_records(Source.of(tmp_path / "n.parquet"), field="meta.body")] == ["p1", "p2"]


# ---------------------------------------------------------------------------------------------
# Bad records: one line naming the file and the line or row
# ---------------------------------------------------------------------------------------------


def _error_line(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    return err


@pytest.mark.parametrize(("lines", "expected"), [
    ('{"text": "ok"}\n{"body": "x", "id": 3}\n', r"line 2: no field 'text' \(the record's keys: 'body', 'id'\); "
                                                 r"pass --text-field NAME"),
    ('{"text": "ok"}\n{"text": 7}\n', "line 2: field 'text' is a number, not a string"),
    ('{"text": null}\n', "line 1: field 'text' is null, not a string"),
    ('["a list"]\n', "line 1: an array, not a JSON object with a 'text' field"),
    ('{"text": "ok"}\n{"text": "cut', r"line 2: not valid JSON \(Unterminated string starting at: column 10\)"),
    ('{"text": "lone \\udc00 half"}\n', "line 1: field 'text' holds an unpaired UTF-16 surrogate"),
])
def test_bad_jsonl_records_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], lines: str,
                                        expected: str) -> None:
    src = tmp_path / "bad.jsonl"
    src.write_text(lines)
    err = _error_line(capsys, ["prepare", "--source", str(src), "--dir", str(tmp_path / "out"), "--quiet"])
    assert str(src) in err
    assert re.search(expected, err), err
    assert not (tmp_path / "out" / "meta.json").exists()


def test_errors_replace_mends_bytes_and_surrogates(tmp_path: Path) -> None:
    src = tmp_path / "mend.jsonl"
    src.write_bytes(b'{"text": "caf\xe9 \\ud800!"}\n')
    with pytest.raises(DataError, match="line 1: not valid UTF-8 at byte 13 of the line \\(byte 0xe9\\)"):
        list(iter_records(Source.of(src)))
    assert [t for t, _ in iter_records(Source.of(src), errors="replace")] == ["caf\ufffd \ufffd!"]


def test_bad_parquet_columns_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"text": ["a", None, "c"], "n": [1, 2, 3]}), tmp_path / "t.parquet", row_group_size=1)
    base = ["prepare", "--source", str(tmp_path / "t.parquet"), "--dir", str(tmp_path / "out"), "--quiet"]
    err = _error_line(capsys, [*base, "--text-field", "body"])
    assert "t.parquet: no column 'body' (its columns: 'text', 'n'); pass --text-field NAME" in err
    err = _error_line(capsys, [*base, "--text-field", "n"])
    assert "t.parquet: column 'n' holds int64, not text" in err
    assert "t.parquet: row 1 (from 0): 'text' is null, not text" in _error_line(capsys, base)


def test_an_empty_result_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = _jsonl(tmp_path / "empty.jsonl", ["", ""])
    err = _error_line(capsys, ["prepare", "--source", str(src), "--dir", str(tmp_path / "o"), "--quiet"])
    assert err.endswith("empty.jsonl: empty corpus (no text to tokenize: 2 records, all of them empty)")
    (tmp_path / "blank.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="blank.jsonl: empty corpus .*0 records"):
        prepare(tmp_path / "blank.jsonl", tmp_path / "o", tokenizer="char", progress=False)
    with gzip.open(tmp_path / "nothing.txt.gz", "wb"):
        pass
    with pytest.raises(DataError, match=r"nothing.txt.gz: empty corpus \(no text to tokenize\)"):
        prepare(tmp_path / "nothing.txt.gz", tmp_path / "o", tokenizer="char", progress=False)


def test_damaged_compressed_data_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    whole = gzip.compress(b"some text " * 1000)
    (tmp_path / "cut.txt.gz").write_bytes(whole[: len(whole) // 2])
    err = _error_line(capsys, ["prepare", "--source", str(tmp_path / "cut.txt.gz"), "--dir", str(tmp_path / "o"),
                               "--quiet", "--tokenizer", "char"])
    assert "cut.txt.gz: damaged or truncated gzip data" in err and "gzip -t" in err


def test_a_missing_optional_package_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "a.jsonl.zst").write_bytes(b"")
    (tmp_path / "b.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "zstandard", None)  # import fails as if not installed
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(DataError, match=r"a.jsonl.zst: reading a .zst file needs the zstandard package: "
                                        r"pip install 'scratchgpt\[data\]'"):
        list(iter_records(Source.of(tmp_path / "a.jsonl.zst")))
    with pytest.raises(DataError, match=r"b.parquet: reading a parquet file needs the pyarrow package"):
        list(iter_records(Source.of(tmp_path / "b.parquet")))


def test_unreadable_parquet_and_arrow_are_one_line(tmp_path: Path) -> None:
    pytest.importorskip("pyarrow")
    for name in ("junk.parquet", "junk.arrow"):
        (tmp_path / name).write_bytes(b"not columnar data at all" * 10)
        with pytest.raises(DataError, match=f"{name}: not a readable {name.split('.')[1]} file"):
            list(iter_records(Source.of(tmp_path / name)))


# ---------------------------------------------------------------------------------------------
# Bounded memory, and workers for compressed input
# ---------------------------------------------------------------------------------------------


def test_a_compressed_file_gets_workers_for_its_text_not_its_size(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import scratchgpt.data.dataset as dataset

    pools: list[int] = []
    real = dataset.ProcessPoolExecutor

    def spy(n: int, **kwargs):
        pools.append(n)
        return real(n, **kwargs)

    monkeypatch.setattr(dataset, "ProcessPoolExecutor", spy)
    src = _jsonl(tmp_path / "c.jsonl.gz", ["the same words again " * 20] * 50, opener=gzip.open)
    assert src.stat().st_size < 4096 < 50 * 420  # under one piece compressed, several once decompressed
    prepare(src, tmp_path / "o", tokenizer="char", workers=2, chunk_bytes=4096, progress=False)
    assert pools == [2]


@pytest.mark.parametrize("where", ["parsing process", "reading process"])
def test_parquet_is_read_a_little_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    """pyarrow's own memory (which tracemalloc does not see) holds a batch of rows, not the file (its default
    pre-buffering read a whole 700 MB file ahead), whether the row groups are read where the block is parsed
    (small row groups) or streamed by the reading process (row groups over WORKER_READ_BYTES)."""
    import random

    import scratchgpt.data.sources as sources

    if where == "reading process":
        monkeypatch.setattr(sources, "WORKER_READ_BYTES", 1 << 10)

    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    letters = bytes(b"abcdefghij klmnopqrstuvwxyz"[i % 27] for i in range(256))
    noise = random.Random(0).randbytes(8_000_000).translate(letters).decode()
    texts = [noise[i : i + 400] for i in range(0, len(noise), 400)]
    src = tmp_path / "big.parquet"
    pq.write_table(pa.table({"text": texts}), src, row_group_size=2000, compression="snappy")
    assert src.stat().st_size > 6 << 20  # ~8 MB: random letters barely compress
    base, peak, got = pa.total_allocated_bytes(), 0, []
    for block in iter_blocks(Source.of(src), block_bytes=64 << 10):
        assert isinstance(block.data, sources.RowGroups) == (where == "parsing process")
        for text in block_texts(block):
            peak = max(peak, pa.total_allocated_bytes() - base)
            got.append(text)
    assert got == texts and peak < 3 << 20, peak


def test_parquet_blocks_of_whole_row_groups(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Small row groups are planned from the metadata alone (nothing of the column is read by the reading
    process) into blocks of whole row groups of about block_bytes of text; their rows and progress add up,
    nested columns and a bad row are found where the block is parsed, and prepare writes the same ids as
    when the reading process streams the column."""
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    import scratchgpt.data.sources as sources

    texts = [f"row {i} " + "x" * (i % 50) for i in range(1000)]
    src = tmp_path / "n.parquet"
    pq.write_table(pa.table({"meta": [{"body": t} for t in texts]}), src, row_group_size=100)
    monkeypatch.setattr(sources, "_arrow_batches", None)  # the planned path never streams the column
    blocks = list(iter_blocks(Source.of(src), field="meta.body", block_bytes=4096))
    assert all(isinstance(b.data, sources.RowGroups) for b in blocks) and 1 < len(blocks) < 10
    assert [i for b in blocks for i in b.data.indexes] == list(range(10))  # each row group once, in order
    assert [b.first for b in blocks] == [0, *itertools.accumulate(b.data.rows for b in blocks[:-1])]
    assert sum(b.nbytes for b in blocks) == src.stat().st_size
    assert [t for b in blocks for t in block_texts(b, field="meta.body")] == texts
    monkeypatch.undo()
    # A top-level column whose own name holds a dot is sized by its chunks too (one block each here).
    dotted = tmp_path / "dotted.parquet"
    pq.write_table(pa.table({"meta.body": texts, "n": list(range(1000))}), dotted, row_group_size=100)
    assert len(list(iter_blocks(Source.of(dotted), field="meta.body", block_bytes=1000))) == 10

    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"text": [*texts[:950], None, *texts[951:]]}), bad, row_group_size=100)
    with pytest.raises(DataError, match=r"bad.parquet: row 950 \(from 0\): 'text' is null"):
        [t for b in iter_blocks(Source.of(bad), block_bytes=4096) for t in block_texts(b)]

    common = dict(tokenizer="char", val_fraction=0.1, chunk_bytes=2048, progress=False, text_field="meta.body")
    prepare(src, tmp_path / "planned", workers=2, **common)
    monkeypatch.setattr(sources, "WORKER_READ_BYTES", 0)  # every row group too big: streamed by the reader
    assert not any(isinstance(b.data, sources.RowGroups) for b in iter_blocks(Source.of(src), field="meta.body"))
    prepare(src, tmp_path / "streamed", workers=1, **common)
    assert _token_files(tmp_path / "planned") == _token_files(tmp_path / "streamed")


@pytest.mark.parametrize(("kind", "workers"), [("jsonl.gz", 1), ("parquet", 1), ("jsonl.gz", 2)])
def test_records_stream_in_bounded_memory(tiny_shakespeare: str, tmp_path: Path, kind: str, workers: int) -> None:
    """The process that reads (with workers=2: the one that reads blocks and writes ids) holds a few blocks."""
    import tracemalloc

    paragraphs = tiny_shakespeare.split("\n\n")
    peaks = []
    for copies in (1, 3):
        if kind == "parquet":
            pq = pytest.importorskip("pyarrow.parquet")
            src = tmp_path / f"x{copies}.parquet"
            pq.write_table(_table(paragraphs * copies), src, row_group_size=1000)
        else:
            src = _jsonl(tmp_path / f"x{copies}.jsonl.gz", paragraphs * copies, opener=gzip.open)
        tracemalloc.start()
        try:
            prepare(src, tmp_path / "out", tokenizer="char", workers=workers, chunk_bytes=64 << 10, progress=False)
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
    # 1.1 MB or 3.3 MB of text in 7,000 or 21,000 records: the heap holds a few 64 KB blocks and batches, not the
    # corpus (reading 3.3 MB of records whole would add tens of MB of strings and ids).
    assert peaks[1] < peaks[0] + (1 << 20), peaks
