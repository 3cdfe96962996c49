"""What `prepare` (and fine-tuning) reads: text, JSONL, Parquet and Arrow files, plain or compressed, as streams.

A source file is one of
    text       any file not named below: one document (read in pieces by `dataset.iter_text_pieces`)
    jsonl      *.jsonl, *.ndjson: one JSON object per line, one document per record
    parquet    *.parquet: one document per row, streamed a batch of rows at a time
    arrow      *.arrow: Arrow IPC stream or file, as `datasets.save_to_disk` writes (and a local
               dataset's cache holds); one document per row
Text and JSONL may be compressed: *.gz, *.xz (standard library), *.zst (the `zstandard` package).
A record's text is at `field`: a top-level name, or a dotted path into nested objects (`meta.body`)
(`iter_records`; `iter_blocks` and `block_texts` split that into reading and parsing, so that several
processes can parse one file); fine-tuning reads whole records (`iter_objects`, used by `records.read_objects`).
Parquet and Arrow need `pyarrow`; the `data` extra installs both: pip install 'scratchgpt[data]'.
Nothing is read whole: memory holds a block of lines or rows (a few MB) at a time.
"""

from __future__ import annotations

import codecs
import glob
import gzip
import importlib
import io
import json
import lzma
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal

Format = Literal["text", "jsonl", "parquet", "arrow"]

RECORD_SUFFIXES: dict[str, Format] = {".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".arrow": "arrow"}
COMPRESSIONS = {".gz": "gzip", ".xz": "xz", ".zst": "zstd", ".zstd": "zstd"}
# A folder source takes these (a glob or a named file takes any file; unknown suffixes are text).
FOLDER_SUFFIXES = (".txt", ".jsonl", ".ndjson", ".parquet", ".arrow")
BATCH_ROWS = 1024  # Parquet rows decoded per step
PARQUET_BUFFER_BYTES = 1 << 20  # how much of a Parquet column is read from disk at a time
INSTALL_DATA = "pip install 'scratchgpt[data]'"


class DataError(ValueError):
    """Input data the user must fix (empty, too short, not UTF-8, not prepared): a one-line message."""


@dataclass(frozen=True)
class Source:
    """One input file, its format and its compression (None: stored plain)."""

    path: Path
    format: Format
    compression: str | None = None

    @classmethod
    def of(cls, path: str | Path) -> Source:
        """The format and compression a file's name says: `notes.jsonl.zst` is zstd-compressed JSONL."""
        path = Path(path)
        suffixes = [s.lower() for s in path.suffixes]
        compression = COMPRESSIONS.get(suffixes[-1]) if suffixes else None
        inner = suffixes[-2 if compression else -1] if len(suffixes) > bool(compression) else ""
        fmt = RECORD_SUFFIXES.get(inner, "text")
        if compression and fmt in ("parquet", "arrow"):
            raise DataError(f"{path}: a compressed {fmt} file; {fmt} compresses inside the file, so decompress it "
                            f"first (or write it with compression={compression!r} inside)")
        return cls(path, fmt, compression)

    @property
    def holds_records(self) -> bool:
        """A file of records (one document each), as opposed to a text file (one document)."""
        return self.format != "text"

    def meta(self) -> dict[str, Any]:
        """What meta.json records beside a non-plain-text file's path."""
        return {"format": self.format, **({"compression": self.compression} if self.compression else {})}


def find_sources(source: str | Path) -> list[Source]:
    """The files a source names: a file, a folder, a `datasets.save_to_disk` folder or a glob; never empty.

    A folder gives every *.txt, *.jsonl, *.ndjson, *.parquet and *.arrow under it (each also compressed),
    sorted; a `save_to_disk` folder (state.json) gives its Arrow files in the order state.json lists them.
    """
    path = Path(source)
    if path.is_file():
        return [Source.of(path)]
    if path.is_dir():
        return _folder_sources(path)
    if glob.has_magic(str(source)):
        files = sorted(Path(p) for p in glob.glob(str(source), recursive=True) if Path(p).is_file())
        if not files:
            raise DataError(f"{source}: the pattern matches no files")
        return [Source.of(p) for p in files]
    raise FileNotFoundError(f"{source}: no such file, folder or glob match")


def _folder_sources(path: Path) -> list[Source]:
    if (path / "dataset_dict.json").is_file():
        splits = sorted(p.name for p in path.iterdir() if (p / "state.json").is_file())
        raise DataError(f"{path}: a DatasetDict saved with save_to_disk; name one split's folder, e.g. "
                        f"--source {path / (splits[0] if splits else 'train')} (splits: {', '.join(splits) or 'none'})")
    state = path / "state.json"
    if state.is_file():
        try:
            names = [entry["filename"] for entry in json.loads(state.read_text(encoding="utf-8"))["_data_files"]]
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"{state}: not a `datasets` state file ({type(e).__name__}: {e}); save the dataset "
                            f"again with save_to_disk") from None
        missing = [n for n in names if not (path / n).is_file()]
        if missing or not names:
            raise DataError(f"{state}: lists {missing or 'no'} Arrow files that the folder lacks; save the dataset "
                            f"again with save_to_disk")
        return [Source(path / n, "arrow") for n in names]

    def wanted(p: Path) -> bool:
        name = p.name.lower()
        for suffix in COMPRESSIONS:
            name = name.removesuffix(suffix)
        return name.endswith(FOLDER_SUFFIXES) and not p.name.startswith(".") and p.is_file()

    files = sorted(p for p in path.rglob("*") if wanted(p))
    if not files:
        raise DataError(f"{path}: folder holds no .txt, .jsonl, .parquet or .arrow files")
    return [Source.of(p) for p in files]


# ---------------------------------------------------------------------------------------------
# Bytes: plain or decompressed
# ---------------------------------------------------------------------------------------------


def _optional(module: str, path: Path, what: str) -> Any:
    """An optional package, or a DataError saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise DataError(f"{path}: reading {what} needs the {module} package: {INSTALL_DATA}") from None


@contextmanager
def open_stream(source: Source) -> Iterator[tuple[BinaryIO, BinaryIO]]:
    """(the file's bytes, decompressed; the file itself): read the first, ask the second's tell() for progress.

    Damaged or truncated compressed data raises DataError naming the file.
    """
    with open(source.path, "rb") as raw:
        if source.compression is None:
            yield raw, raw
            return
        damaged: tuple[type[BaseException], ...] = (OSError, EOFError, lzma.LZMAError)
        if source.compression == "gzip":
            stream: Any = gzip.GzipFile(fileobj=raw, mode="rb")
        elif source.compression == "xz":
            stream = lzma.LZMAFile(raw)  # noqa: SIM115 (closed by the `with` below)
        else:
            zstd = _optional("zstandard", source.path, "a .zst file")
            damaged += (zstd.ZstdError,)
            # read_across_frames: `zstd` and `cat a.zst b.zst` write files of several frames.
            reader = zstd.ZstdDecompressor().stream_reader(raw, read_across_frames=True, closefd=False)
            stream = io.BufferedReader(reader, buffer_size=1 << 20)
        try:
            with stream:
                yield stream, raw
        except damaged as e:
            raise DataError(f"{source.path}: damaged or truncated {source.compression} data ({e or type(e).__name__}); "
                            f"check the file (e.g. with `{_CHECK[source.compression]} {source.path}`)") from None


_CHECK = {"gzip": "gzip -t", "xz": "xz -t", "zstd": "zstd -t"}


# ---------------------------------------------------------------------------------------------
# Records: the text at `field` of each JSONL line, Parquet row or Arrow row
# ---------------------------------------------------------------------------------------------
#
# A record file is read in blocks (`iter_blocks`): whole JSONL lines, or the text column of consecutive
# rows, about `block_bytes` at a time, still unparsed. Reading them is cheap (zstd, Parquet pages); parsing
# them (JSON, UTF-8, Python strings) is not, so `block_texts` does that part, in whichever process holds
# the block: `prepare` sends blocks to its workers, so the one process that reads a stream (a compressed
# one cannot be split) does little more than read it.

BLOCK_BYTES = 4 << 20  # raw bytes (JSONL) or text bytes (Parquet, Arrow) per block
# A Parquet file whose row groups hold at most this much of the text column (uncompressed, as its metadata
# says) is cut into blocks of whole row groups that the parsing process reads itself: the reading process
# then only plans, and no text crosses a pipe. Bigger row groups are streamed by the reading process, so
# that no process holds more than a few blocks.
WORKER_READ_BYTES = 64 << 20


@dataclass(frozen=True)
class RowGroups:
    """Whole row groups of a Parquet file, not read yet: `block_texts` reads them where it runs."""

    indexes: tuple[int, ...]
    rows: int


@dataclass(frozen=True)
class RecordBlock:
    """Consecutive records of one file, read but not parsed: `data` holds whole JSONL lines (bytes), the text
    column of Parquet or Arrow rows (pyarrow string arrays), or Parquet `RowGroups` to read. `first` is the
    line number of its first line (JSONL, from 1) or the row of its first row (from 0); `nbytes`, how far
    reading it went into the (compressed) file: the progress it stands for."""

    source: Source
    first: int
    data: Any
    nbytes: int


def iter_blocks(source: Source, *, field: str = "text", block_bytes: int = BLOCK_BYTES) -> Iterator[RecordBlock]:
    """The blocks of a record file, in order; `block_texts` gives their records. Only the file's format (a
    Parquet or Arrow column missing or not text) is checked here; the records are checked as they are parsed."""
    if source.format == "jsonl":
        yield from _jsonl_blocks(source, block_bytes)
    elif source.format in ("parquet", "arrow"):
        yield from _arrow_blocks(source, field, block_bytes)
    else:
        raise ValueError(f"{source.path}: a {source.format} file holds no records")


def block_texts(block: RecordBlock, *, field: str = "text",
                errors: Literal["strict", "replace"] = "strict") -> Iterator[str]:
    """The text at `field` of each record of a block, in order.

    A missing field or column, a value that is not a string (null included), a line that is not a JSON
    object: DataError naming the file and the line or row. Blank JSONL lines hold no record.
    """
    if block.source.format != "jsonl":
        row = block.first
        arrays = _read_row_groups(block, field) if isinstance(block.data, RowGroups) else block.data
        for values in arrays:
            if values.null_count:
                at = row + values.is_null().to_pylist().index(True)
                raise DataError(f"{block.source.path}: row {at} (from 0): {field!r} is null, not text; fill or "
                                f"drop such rows")
            yield from values.to_pylist()
            row += len(values)
        return
    for number, line, record in _block_lines(block, errors, errors_flag=True):
        where = f"{block.source.path}: line {number}"
        text = _json_field(record, field, where)
        # A lone \ud800-\udfff escape decodes to a surrogate, which no UTF-8 tokenizer can encode
        # (a line without any \u escape cannot hold one, so most lines skip the search).
        if b"\\u" in line and _SURROGATE.search(text):
            if errors == "strict":
                raise DataError(f"{where}: field {field!r} holds an unpaired UTF-16 surrogate escape (\\ud800-"
                                f"\\udfff); fix the record, or pass --errors replace to substitute U+FFFD")
            text = _SURROGATE.sub("\ufffd", text)
        yield text


def iter_records(source: Source, *, field: str = "text",
                 errors: Literal["strict", "replace"] = "strict") -> Iterator[tuple[str, int]]:
    """(text, bytes of the file read since the last record) for each record of a record file, in order: the
    records of its blocks, read and parsed in this process (errors as `block_texts` raises them)."""
    for block in iter_blocks(source, field=field):
        step = block.nbytes  # reported with the block's first record
        for text in block_texts(block, field=field, errors=errors):
            yield text, step
            step = 0


def iter_objects(source: Source) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, record) for each whole record of a JSONL, Parquet or Arrow file, in order: fine-tuning's reader.

    `where` names the file and the line (JSONL) or row (from 0); a Parquet or Arrow row is a dict of its
    columns (list and struct columns as lists and dicts, nulls as None). A line that is not a JSON
    object, or not UTF-8: DataError naming it.
    """
    if source.format == "jsonl":
        for block in _jsonl_blocks(source, BLOCK_BYTES):
            for number, _, record in _block_lines(block, "strict", errors_flag=False):
                if not isinstance(record, dict):
                    raise DataError(f"{source.path}: line {number}: {_JSON_KINDS.get(type(record), 'a value')}, "
                                    f"not a JSON object; each line must hold one object")
                yield f"{source.path}: line {number}", record
    elif source.format in ("parquet", "arrow"):
        row = 0
        for batch, _ in _arrow_batches(source, None, _optional("pyarrow", source.path, f"a {source.format} file")):
            for record in batch.to_pylist():
                yield f"{source.path}: row {row} (from 0)", record
                row += 1
    else:
        raise ValueError(f"{source.path}: a {source.format} file holds no records")


_JSON_KINDS = {type(None): "null", bool: "a boolean", int: "a number", float: "a number", list: "an array",
               dict: "an object", str: "a string"}
_FIELD_HINT = "pass --text-field NAME (a dotted path such as meta.body reaches into nested objects)"
_SURROGATE = re.compile("[\ud800-\udfff]")


def _jsonl_blocks(source: Source, block_bytes: int) -> Iterator[RecordBlock]:
    """Whole lines of a JSONL file, about block_bytes of them at a time (a longer line is one block)."""
    with open_stream(source) as (stream, raw):
        number, parts, reported = 1, [], 0  # parts: read already, no line end among them yet
        while data := stream.read(block_bytes):
            cut = data.rfind(b"\n") + 1
            if not cut:
                parts.append(data)
                continue
            lines = b"".join([*parts, data[:cut]]) if parts else data[:cut]
            parts = [data[cut:]] if cut < len(data) else []
            position = raw.tell()
            yield RecordBlock(source, number, lines, position - reported)
            number, reported = number + lines.count(b"\n"), position
        if parts:  # the last line, without a line end
            yield RecordBlock(source, number, b"".join(parts), raw.tell() - reported)


def _block_lines(block: RecordBlock, errors: str, *, errors_flag: bool) -> Iterator[tuple[int, bytes, Any]]:
    """(line number, the line, its JSON value) per non-blank line of a JSONL block."""
    for number, line in enumerate(block.data.split(b"\n"), block.first):
        if number == 1 and line.startswith(codecs.BOM_UTF8):
            line = line[len(codecs.BOM_UTF8):]  # dropped, as editors do
        if line.isspace() or not line:
            continue
        try:
            record = json.loads(line.decode("utf-8", errors=errors))
        except UnicodeDecodeError as e:
            fix = "convert the file to UTF-8" + (" (or, for a few damaged bytes, pass --errors replace)"
                                                 if errors_flag else "")
            raise DataError(f"{block.source.path}: line {number}: not valid UTF-8 at byte {e.start} of the line "
                            f"(byte 0x{line[e.start]:02x}); {fix}") from None
        except json.JSONDecodeError as e:
            raise DataError(f"{block.source.path}: line {number}: not valid JSON ({e.msg}: column {e.colno}); "
                            f"each line must hold one JSON object") from None
        yield number, line, record


def _json_field(record: Any, field: str, where: str) -> str:
    """The string at `field` (a key, else a dotted path) of a JSON object."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: {_JSON_KINDS.get(type(record), 'a value')}, not a JSON object with a {field!r} "
                        f"field; each line must hold one object")
    if field in record:
        value = record[field]
    else:
        value = record
        for key in field.split("."):
            if not isinstance(value, dict) or key not in value:
                keys = ", ".join(map(repr, list(record)[:8])) + (", ..." if len(record) > 8 else "")
                raise DataError(f"{where}: no field {field!r} (the record's keys: {keys or 'none'}); {_FIELD_HINT}")
            value = value[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {field!r} is {_JSON_KINDS.get(type(value), 'a value')}, not a string")
    return value


def _arrow_blocks(source: Source, field: str, block_bytes: int) -> Iterator[RecordBlock]:
    """The text column (`field`, a dotted path reaching into structs) of a Parquet or Arrow file's rows,
    about block_bytes of text at a time: Parquet row groups to read (`_row_group_blocks`) where they are
    small enough, else the column itself, read here."""
    pa = _optional("pyarrow", source.path, f"a {source.format} file")
    if source.format == "parquet" and (planned := _row_group_blocks(source, field, block_bytes, pa)) is not None:
        yield from planned
        return
    size = source.path.stat().st_size
    arrays: list[Any] = []
    row, held, reported = 0, 0, 0
    for batch, position in _arrow_batches(source, field, pa):
        values = _text_column(batch, field)
        arrays.append(values)
        held += values.nbytes
        if held >= block_bytes:
            position = min(size, position)
            yield RecordBlock(source, row, arrays, position - reported)
            row, reported = row + sum(map(len, arrays)), position
            arrays, held = [], 0
    if arrays:
        yield RecordBlock(source, row, arrays, max(0, size - reported))


def _text_column(batch: Any, field: str) -> Any:
    """The string array at `field` of a record batch of one column (the top of `field`'s path)."""
    import pyarrow.compute as pc

    values = batch.column(0)
    for name in _column_path(batch.schema, field)[1:]:
        values = pc.struct_field(values, [values.type.get_field_index(name)])  # null where the struct is null
    return values


def _row_group_blocks(source: Source, field: str, block_bytes: int, pa: Any) -> list[RecordBlock] | None:
    """Blocks of whole row groups, about block_bytes of text each, planned from the file's metadata alone;
    None when a row group holds more than WORKER_READ_BYTES of the column (or the metadata is unreadable:
    the streaming reader then says why)."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(source.path)
    except (pa.ArrowInvalid, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        return None
    meta = pf.metadata
    top = _check_field(pf.schema_arrow, source, field, pa)[0]  # the schema the streaming reader checks
    groups = [meta.row_group(i) for i in range(meta.num_row_groups)]
    # The leaf columns under `top` (itself, or a struct's fields: "meta.body" under "meta"; a top-level name
    # may hold dots itself), found once: a row group's size is theirs.
    leaves = [j for j in range(meta.num_columns)
              if (path := meta.schema.column(j).path) == top or path.startswith(top + ".")]
    sizes = [sum(g.column(j).total_uncompressed_size for j in leaves) for g in groups]
    if any(n > WORKER_READ_BYTES for n in sizes):
        return None
    size, total = source.path.stat().st_size, max(1, meta.num_rows)
    blocks: list[RecordBlock] = []
    indexes: list[int] = []
    row, rows, held, reported = 0, 0, 0, 0
    for i, (group, n) in enumerate(zip(groups, sizes, strict=True)):
        indexes.append(i)
        rows, held = rows + group.num_rows, held + n
        if held >= block_bytes or i == len(groups) - 1:
            position = size if i == len(groups) - 1 else size * (row + rows) // total
            blocks.append(RecordBlock(source, row, RowGroups(tuple(indexes), rows), position - reported))
            row, reported, indexes, rows, held = row + rows, position, [], 0, 0
    return blocks


def _read_row_groups(block: RecordBlock, field: str) -> Iterator[Any]:
    """The text column of a block's `RowGroups`, a batch of rows at a time (read as `_arrow_batches` reads)."""
    pa = _optional("pyarrow", block.source.path, "a parquet file")
    with _readable(block.source, pa):
        pf = _open_parquet(block.source.path)
        top = _column_path(pf.schema_arrow, field)[0]
        for batch in _parquet_batches(pf, [top], row_groups=list(block.data.indexes)):
            yield _text_column(batch, field)


@contextmanager
def _readable(source: Source, pa: Any) -> Iterator[None]:
    """pyarrow's errors reading a Parquet or Arrow file, as one DataError line (a missing file stays as it is)."""
    try:
        yield
    except (pa.ArrowInvalid, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise DataError(f"{source.path}: not a readable {source.format} file ({e}); write it again with "
                        f"pyarrow or `datasets`") from None


def _open_parquet(path: Path) -> Any:
    import pyarrow.parquet as pq

    # pre_buffer (pyarrow's default) reads ahead the whole file: a 700 MB file took 700 MB of memory.
    return pq.ParquetFile(path, pre_buffer=False, buffer_size=PARQUET_BUFFER_BYTES)


def _parquet_batches(pf: Any, columns: list[str] | None, *, row_groups: list[int] | None = None) -> Iterator[Any]:
    # use_threads=False: one column, decoded 1,024 rows at a time, gains nothing from Arrow's threads, which
    # took the cores from the tokenizer (one worker, 1 GB: 224 s threaded, 168 s without).
    return pf.iter_batches(batch_size=BATCH_ROWS, row_groups=row_groups, columns=columns, use_threads=False)


def _arrow_batches(source: Source, field: str | None, pa: Any) -> Iterator[tuple[Any, int]]:
    """(record batch of the column holding `field` (None: of every column), how far into the file it ends) of a
    Parquet or Arrow file."""

    def columns(schema: Any) -> list[str] | None:
        return None if field is None else [_check_field(schema, source, field, pa)[0]]

    size = source.path.stat().st_size
    with _readable(source, pa):
        if source.format == "parquet":
            pf = _open_parquet(source.path)
            top = columns(pf.schema_arrow)
            total, done = max(1, pf.metadata.num_rows), 0
            for batch in _parquet_batches(pf, top):
                done += batch.num_rows
                yield batch, size * done // total
            return
        with pa.memory_map(str(source.path)) as mm:
            if mm.read(6) == b"ARROW1":  # the IPC file format; `datasets` writes the stream format
                reader = pa.ipc.open_file(mm)
                top = columns(reader.schema)
                for i in range(reader.num_record_batches):
                    batch = reader.get_batch(i)
                    yield batch if top is None else batch.select(top), size * (i + 1) // reader.num_record_batches
                return
            mm.seek(0)
            stream = pa.ipc.open_stream(mm)
            top = columns(stream.schema)
            for batch in stream:
                yield batch if top is None else batch.select(top), mm.tell()


def _column_path(schema: Any, field: str) -> list[str]:
    """The names leading to `field`: itself when a column has that name, else its dotted parts."""
    return [field] if field in schema.names else field.split(".")


def _check_field(schema: Any, source: Source, field: str, pa: Any) -> list[str]:
    """`_column_path` of `field`, checked against the schema: DataError unless it leads to a string column."""
    names = _column_path(schema, field)
    typ: Any = schema
    for depth, name in enumerate(names):
        index = typ.get_field_index(name) if depth == 0 or pa.types.is_struct(typ) else -1
        if index < 0:
            columns = ", ".join(map(repr, schema.names[:8])) + (", ..." if len(schema.names) > 8 else "")
            raise DataError(f"{source.path}: no column {field!r} (its columns: {columns or 'none'}); {_FIELD_HINT}")
        typ = typ.field(index).type
    if not (pa.types.is_string(typ) or pa.types.is_large_string(typ)
            or (hasattr(pa.types, "is_string_view") and pa.types.is_string_view(typ))):
        raise DataError(f"{source.path}: column {field!r} holds {typ}, not text (a string column)")
    return names
