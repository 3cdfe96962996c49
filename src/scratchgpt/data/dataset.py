"""Text -> token files (`prepare`); `samplers.py` turns them into (x, y) training windows.

`prepare` turns text files, or records of JSONL, Parquet and Arrow files (`sources.py`: what it reads), into
a folder the trainer reads: train.bin and val.bin (or their shards), meta.json and the tokenizer
(`token_files.py` describes the layout and reads it back: `open_dataset`, `check_token_files`).

The corpus is streamed: each file is read a few MB at a time and cut only where the pieces tokenize to
the ids of the whole text (`tokenizers.safe_cut`), the pieces are tokenized by a pool of processes, and
their ids are written in order, so memory stays bounded and the output is the same for any number of
workers. A record file is read in blocks of whole records (`sources.iter_blocks`) that the pool's
processes parse as well as tokenize, in both passes: one process reads each file (a compressed stream
cannot be split), and parsing records (JSON, Python strings) costs far more than reading them, so the
reading process must not parse. A Parquet file whose row groups are of moderate size is not even read
there: its blocks are row-group numbers, planned from its metadata, that each process reads itself. By
default each document's first (1 - val_fraction) of characters goes to train and the rest to val, as
nanoGPT splits Tiny Shakespeare (301,966 / 36,059 GPT-2 tokens). For corpora of many small documents (one
per file), `split_by="documents"` sends whole files to val instead, spread evenly over the sorted list.
Each record of a record file is a document as a file is: the output is that of one text file per record
(short records are joined with `<|endoftext|>` into pieces of about the same size).
"""

from __future__ import annotations

import codecs
import glob
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from scratchgpt.data.sources import DataError, RecordBlock, Source, block_texts, find_sources, iter_blocks, open_stream
from scratchgpt.data.token_files import (
    META_FILE,
    META_FORMAT,
    META_VERSION,
    SPLIT_FILES,
    TOKEN_FILE_NAME,
    Split,
)
from scratchgpt.data.tokenizers import EOT_TEXT, Tokenizer, build_tokenizer, load_tokenizer, safe_cut
from scratchgpt.files import write_json

# ---------------------------------------------------------------------------------------------
# Reading text
# ---------------------------------------------------------------------------------------------


def find_text_files(source: str | Path) -> list[Path]:
    """The files a source names: a file, every *.txt under a folder, or a glob; sorted, never empty."""
    path = Path(source)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file() and not p.name.startswith("."))
        if not files:
            raise DataError(f"{path}: folder holds no .txt files")
        return files
    if glob.has_magic(str(source)):
        files = sorted(Path(p) for p in glob.glob(str(source), recursive=True) if Path(p).is_file())
        if not files:
            raise DataError(f"{source}: the pattern matches no files")
        return files
    raise FileNotFoundError(f"{source}: no such file, folder or glob match")


# Byte order marks of encodings other than UTF-8 (UTF-32's first: its little-endian mark starts like UTF-16's).
_FOREIGN_BOMS = ((codecs.BOM_UTF32_LE, "UTF-32 (little-endian)", "UTF-32"),
                 (codecs.BOM_UTF32_BE, "UTF-32 (big-endian)", "UTF-32"),
                 (codecs.BOM_UTF16_LE, "UTF-16 (little-endian)", "UTF-16"),
                 (codecs.BOM_UTF16_BE, "UTF-16 (big-endian)", "UTF-16"))
HEAD_BYTES = 4096  # how much of a file the encoding checks look at


def _convert_hint(path: str | Path, encoding: str) -> str:
    return f"convert it to UTF-8 first: iconv -f {encoding} -t UTF-8 {path} > {Path(path).stem}.utf8.txt"


def text_start(path: str | Path, head: bytes) -> int:
    """Bytes to skip at the start of a text file whose first bytes are `head`: 3 for a UTF-8 byte order mark
    (dropped, as editors do), else 0. UTF-16/32 text, with or without a byte order mark, raises DataError
    saying how to convert it: read as UTF-8 it would decode to a NUL between characters, or not at all."""
    if head.startswith(codecs.BOM_UTF8):
        return len(codecs.BOM_UTF8)
    for bom, name, encoding in _FOREIGN_BOMS:
        if head.startswith(bom):
            raise DataError(f"{path}: {name} text (byte order mark {bom.hex(' ').upper()}), not UTF-8; "
                            f"{_convert_hint(path, encoding)}")
    head = head[:HEAD_BYTES]
    # A stray NUL is the text's business; a tenth of the bytes is not text.
    if not head or head.count(0) * 10 < len(head):
        return 0
    # ASCII in UTF-16LE is "h\0e\0", in UTF-32LE "h\0\0\0": NULs sit at fixed positions modulo 2 or 4.
    nul = [head[i::4].count(0) / max(1, len(head[i::4])) for i in range(4)]
    layouts = (((1, 2, 3), "UTF-32 (little-endian)", "UTF-32LE"), ((0, 1, 2), "UTF-32 (big-endian)", "UTF-32BE"),
               ((1, 3), "UTF-16 (little-endian)", "UTF-16LE"), ((0, 2), "UTF-16 (big-endian)", "UTF-16BE"))
    for positions, name, encoding in layouts:
        if all(nul[i] > 0.5 for i in positions):
            raise DataError(f"{path}: looks like {name} text without a byte order mark (a NUL byte between "
                            f"characters), not UTF-8; {_convert_hint(path, encoding)}")
    raise DataError(f"{path}: {head.count(0)} of its first {len(head)} bytes are NUL: a binary file, or text in an "
                    f"encoding other than UTF-8; if it is text, {_convert_hint(path, 'ENCODING')}")


def _not_utf8(path: str | Path, offset: int, byte: int, *, errors_flag: bool) -> DataError:
    # --errors replace only helps a file that is UTF-8 but for a few damaged bytes; a file in another
    # encoding would come out as U+FFFD for every accented letter, so conversion is suggested first.
    replace = "; if only a few bytes are damaged, --errors replace substitutes U+FFFD for them" if errors_flag else ""
    return DataError(f"{path}: not valid UTF-8 at byte offset {offset} (byte 0x{byte:02x}); if the file is in "
                     f"another encoding, {_convert_hint(path, 'LATIN1')} (name its real encoding){replace}")


def read_text(path: str | Path, *, errors: Literal["strict", "replace"] = "strict", errors_flag: bool = False) -> str:
    """A file's text as UTF-8 (a byte order mark dropped); UTF-16/32 text or undecodable bytes raise DataError
    naming the file and the byte offset (with `errors="replace"` undecodable bytes become U+FFFD).
    `errors_flag`: the command has `--errors replace`, so the message may suggest it."""
    data = Path(path).read_bytes()
    skip = text_start(path, data[:HEAD_BYTES])
    try:
        return data[skip:].decode("utf-8", errors=errors)
    except UnicodeDecodeError as e:
        raise _not_utf8(path, skip + e.start, data[skip + e.start], errors_flag=errors_flag) from None


def split_text(text: str, val_fraction: float) -> tuple[str, str]:
    """(train, val): the first (1 - val_fraction) of the characters, and the rest."""
    cut = int(len(text) * (1.0 - val_fraction))
    return text[:cut], text[cut:]


# ---------------------------------------------------------------------------------------------
# Streaming text: a file in pieces that tokenize like the whole
# ---------------------------------------------------------------------------------------------

# Bytes read per step; pieces come out about this long, so memory stays bounded whatever the file size.
CHUNK_BYTES = 4 << 20
# A trained `bpe` tokenizer learns its merges from at most this many characters of the corpus.
BPE_SAMPLE_CHARS = 32 << 20


def iter_text_pieces(
    path: str | Path | Source, *, errors: Literal["strict", "replace"] = "strict", chunk_bytes: int = CHUNK_BYTES,
    errors_flag: bool = False,
) -> Iterator[tuple[str, int]]:
    """(piece, bytes read for it): the file's text in pieces cut by `safe_cut`, joined they give `read_text`.

    A file is read `chunk_bytes` at a time through an incremental UTF-8 decoder (which decodes exactly as
    one `bytes.decode` does) and cut at the last safe place of what has been read; the rest waits for
    the next read. A stretch without any safe place (no whitespace at all) stays one piece, however long.
    A compressed Source is decompressed as it is read: offsets in messages are of the decompressed text,
    and bytes read are of the compressed file.
    """
    source = path if isinstance(path, Source) else Source(Path(path), "text")
    path = source.path
    decoder = codecs.getincrementaldecoder("utf-8")(errors=errors)
    with open_stream(source) as (f, raw):
        head = f.read(HEAD_BYTES)
        offset = text_start(path, head)  # of the next byte to decode
        spare = head[offset:]  # read already: the first blocks come from it (a stream may not seek back)

        def next_block() -> bytes:
            nonlocal spare
            block, spare = spare[:chunk_bytes], spare[chunk_bytes:]
            return block + f.read(chunk_bytes - len(block)) if len(block) < chunk_bytes else block

        block, pending, reported = next_block(), "", 0
        while True:
            held = len(decoder.getstate()[0])  # bytes of an incomplete character kept from the last read
            try:
                pending += decoder.decode(block, final=not block)
            except UnicodeDecodeError as e:
                raise _not_utf8(path, offset - held + e.start, e.object[e.start], errors_flag=errors_flag) from None
            offset += len(block)
            if not block:
                if pending or raw.tell() > reported:
                    yield pending, raw.tell() - reported
                return
            cut = safe_cut(pending)
            if cut > 0:
                position = raw.tell()
                yield pending[:cut], position - reported
                pending, reported = pending[cut:], position
            block = next_block()


# ---------------------------------------------------------------------------------------------
# prepare: text files -> token files (one per split, or shards) / meta.json / tokenizer
# ---------------------------------------------------------------------------------------------


def val_share(index: int, n_files: int, val_fraction: float, split_by: str) -> float:
    """The fraction of file `index` (of `n_files`, sorted) that goes to val."""
    if split_by == "chars":
        return val_fraction
    # Whole documents: file i is held out when i * f crosses an integer, which spreads them evenly.
    return 1.0 if int((index + 1) * val_fraction) > int(index * val_fraction) else 0.0


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (GPT-2's 50,257 does), else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


# ---------------------------------------------------------------------------------------------
# Work for the pool: the same functions in this process (one worker) or in the pool's processes
# ---------------------------------------------------------------------------------------------

# A job: (what the main process keeps for the result, the function, its arguments).
_Job = tuple[Any, Callable[..., Any], tuple[Any, ...]]


def _in_order(jobs: Iterable[_Job], pool: Executor | None, n_workers: int) -> Iterator[tuple[Any, Any]]:
    """(kept, fn(*args)) for each job, in job order: run here when `pool` is None, else on the pool with at
    most 2 jobs per worker in flight: enough to keep every worker busy, few enough that memory stays
    bounded. Results are taken in submission order, so the output is the same for any number of workers."""
    if pool is None:
        for kept, fn, args in jobs:
            yield kept, fn(*args)
        return
    in_flight: deque[tuple[Any, Future[Any]]] = deque()
    for kept, fn, args in jobs:
        in_flight.append((kept, pool.submit(fn, *args)))
        if len(in_flight) >= 2 * n_workers:
            kept, future = in_flight.popleft()
            yield kept, future.result()
    while in_flight:
        kept, future = in_flight.popleft()
        yield kept, future.result()


def _pool_workers(workers: int, units: int) -> int:
    """Processes for `units` pieces of work: `workers` (0: one per core), no more than there are units
    (more would only cost start-up time)."""
    return max(1, min(workers or os.cpu_count() or 1, units))


# ---------------------------------------------------------------------------------------------
# Pass 1: the survey
# ---------------------------------------------------------------------------------------------


@dataclass
class _Counts:
    """What reading some documents learns: records, characters, any non-whitespace, the alphabet."""

    records: int = 0
    chars: int = 0
    has_text: bool = False
    alphabet: set[str] = dataclass_field(default_factory=set)

    def see(self, piece: str, *, alphabet: bool) -> None:
        """Count a piece of a document (not a record: `records` is counted by the caller)."""
        self.chars += len(piece)
        if not self.has_text and piece and not piece.isspace():
            self.has_text = True
        if alphabet:
            self.alphabet.update(piece.replace(EOT_TEXT, ""))


@dataclass
class _Survey:
    """What one streaming pass over the corpus learns before anything is written."""

    chars: list[int]  # characters per source file (a text file's train/val cut needs its length)
    records: list[int | None]  # records per source file (None: a text file, one document)
    blocks: list[list[int]]  # records per block (`sources.iter_blocks`) of each record file ([] for text)
    alphabet: set[str]  # distinct characters, `<|endoftext|>` markers aside (char tokenizer only)
    sample: list[str]  # pieces a bpe tokenizer trains on
    has_text: bool  # any non-whitespace at all


def _record_pieces(text: str, size: int) -> Iterator[str]:
    """A record's text in pieces of about `size` characters cut by `safe_cut` (joined, they give the text),
    so that one long record is tokenized a piece at a time, in bounded memory."""
    start = 0
    while len(text) - start > size:
        end = start + size
        while (cut := safe_cut(text, end)) <= start and end < len(text):
            end = start + 2 * (end - start)  # no safe place yet: look further
        if not start < cut < len(text):
            break
        yield text[start:cut]
        start = cut
    if start < len(text):
        yield text[start:]


def _survey_block(block: RecordBlock, field: str, errors: str, chunk_bytes: int, alphabet: bool,
                  sample: Callable[[str], None] | None = None) -> _Counts:
    """Parse (and so validate) a block of records and count them; `sample` sees every piece of them
    (`_record_pieces`, as pass 2 cuts them). Runs in a pool worker, or here when `sample` is given."""
    counts = _Counts()
    for text in block_texts(block, field=field, errors=errors):  # type: ignore[arg-type]
        counts.records += 1
        counts.see(text, alphabet=alphabet)
        if sample is not None:
            for piece in _record_pieces(text, chunk_bytes):
                sample(piece)
    return counts


def _survey(
    files: Sequence[Path | Source], sizes: Sequence[int], *, tokenizer: str, errors: str, chunk_bytes: int,
    sample_chars: int, bar: Any, text_field: str = "text", workers: int = 1,
) -> _Survey:
    """Read every file once: validate its UTF-8 (and records), count its characters, gather what a trained
    tokenizer needs. Blocks of records are parsed by `workers` processes (text files are read here)."""
    sources = [file if isinstance(file, Source) else Source.of(file) for file in files]
    counts = [_Counts() for _ in sources]
    blocks: list[list[int]] = [[] for _ in sources]
    alphabet = tokenizer == "char"
    # bpe: a deterministic sample spread evenly over the corpus. A piece is taken when the running
    # quota (rate * characters seen so far) covers it; rate * total bytes <= sample_chars, and a file has
    # at most as many characters as bytes, so the sample never exceeds sample_chars. Small corpora
    # (rate 1) are taken whole, so their merges are those of the full text. A compressed file holds more
    # characters than bytes: the cap keeps the bound, and the sample then favours the corpus's start.
    # Which piece is taken depends on every piece before it, so a bpe survey runs in this process.
    rate = min(1.0, sample_chars / max(1, sum(sizes)))
    quota, taken, picked = 0.0, 0, []

    def sample(piece: str) -> None:
        nonlocal quota, taken
        quota += len(piece) * rate
        if quota >= taken + len(piece) and taken + len(piece) <= sample_chars:
            picked.append(piece)
            taken += len(piece)

    sampler = sample if tokenizer == "bpe" else None

    def jobs() -> Iterator[_Job]:
        for index, (source, size) in enumerate(zip(sources, sizes, strict=True)):
            if source.holds_records:
                reported = 0
                for block in iter_blocks(source, field=text_field, block_bytes=chunk_bytes):
                    yield index, _survey_block, (block, text_field, errors, chunk_bytes, alphabet, sampler)
                    bar.update(block.nbytes)
                    reported += block.nbytes
                bar.update(max(0, size - reported))  # what lies past the last record
                continue
            # A text file is read here (its pieces come one after another from one stream) while the
            # workers parse the blocks before it.
            for piece, nbytes in iter_text_pieces(source, errors=errors,  # type: ignore[arg-type]
                                                  chunk_bytes=chunk_bytes, errors_flag=True):
                counts[index].see(piece, alphabet=alphabet)
                if sampler is not None:
                    sampler(piece)
                bar.update(nbytes)

    n_workers = 1 if sampler is not None else _pool_workers(workers, -(-sum(sizes) // chunk_bytes))
    with ProcessPoolExecutor(n_workers) if n_workers > 1 else nullcontext() as pool:
        for index, found in _in_order(jobs(), pool, n_workers):
            blocks[index].append(found.records)
            file = counts[index]
            file.records += found.records
            file.chars += found.chars
            file.has_text |= found.has_text
            file.alphabet |= found.alphabet
    return _Survey(chars=[c.chars for c in counts],
                   records=[c.records if s.holds_records else None for c, s in zip(counts, sources, strict=True)],
                   blocks=blocks, alphabet=set().union(*(c.alphabet for c in counts)), sample=picked,
                   has_text=any(c.has_text for c in counts))


# ---------------------------------------------------------------------------------------------
# Pass 2: documents -> ids
# ---------------------------------------------------------------------------------------------


def _encode_text(tok: Tokenizer, text: str, dtype: str) -> np.ndarray:
    # allowed_special: a corpus that already separates documents with <|endoftext|> keeps them as ids.
    return np.asarray(tok.encode(text, allowed_special=True), dtype=dtype)


# The tokenizer of a pool worker process, loaded once from the output folder by `_init_worker`, so that
# only text and ids cross between processes. The main process never sets it.
_WORKER_TOKENIZER: list[Tokenizer] = []


def _init_worker(tokenizer_dir: str) -> None:
    _WORKER_TOKENIZER[:] = [load_tokenizer(tokenizer_dir)]


def _with_worker_tokenizer(fn: Callable[..., Any], *args: Any) -> Any:
    return fn(_WORKER_TOKENIZER[0], *args)


# One piece of work: (first document, last document, split, text): the text of one document's part, or of
# several records' parts joined by `<|endoftext|>` (which tokenizes to the id the writer puts between documents).
_Task = tuple[int, int, Split, str]
# Its ids: (first document, last document, split, ids).
_Encoded = tuple[int, int, Split, np.ndarray]


@dataclass
class _RecordBatch:
    """Pieces of records waiting to be tokenized as one task, so that short records cost few tasks."""

    split: Split
    parts: list[str] = dataclass_field(default_factory=list)
    first: int = -1
    last: int = -1
    chars: int = 0

    def add(self, doc: int, piece: str, size: int) -> _Task | None:
        """Append a piece of document `doc`; the batch as a task once it holds `size` characters."""
        if not self.parts:
            self.first = doc
        elif doc != self.last:  # a new record: separated from the last, as files are
            self.parts.append(EOT_TEXT)
        self.parts.append(piece)
        self.last, self.chars = doc, self.chars + len(piece)
        return self.flush() if self.chars >= size else None

    def flush(self) -> _Task | None:
        if not self.parts:
            return None
        task = (self.first, self.last, self.split, "".join(self.parts))
        self.parts, self.chars = [], 0
        return task


@dataclass(frozen=True)
class _SplitRule:
    """How pass 2 cuts documents into train and val and tokenizes them: what a worker needs besides its work."""

    n_files: int
    val_fraction: float
    split_by: str
    text_field: str
    errors: str
    chunk_bytes: int
    dtype: str

    def cut(self, doc: int, chars: int) -> int:
        """Characters of document `doc` (of `chars`) that go to train (the same cut as split_text)."""
        return int(chars * (1.0 - val_share(doc, self.n_files, self.val_fraction, self.split_by)))


def _encode_task(tok: Tokenizer, task: _Task, dtype: str) -> list[_Encoded]:
    first, last, split, text = task
    return [(first, last, split, _encode_text(tok, text, dtype))]


def _encode_block(tok: Tokenizer, block: RecordBlock, first_doc: int, rule: _SplitRule) -> list[_Encoded]:
    """The ids of a block of records, documents first_doc, first_doc + 1, ...: each record's train part then
    its val part, batched into tasks of about chunk_bytes characters."""
    batches = {split: _RecordBatch(split) for split in SPLIT_FILES}
    out = []
    for doc, text in enumerate(block_texts(block, field=rule.text_field, errors=rule.errors),  # type: ignore[arg-type]
                               first_doc):
        cut = rule.cut(doc, len(text))
        for split, part in (("train", text[:cut]), ("val", text[cut:])):
            if not part:
                continue
            # Most records are one piece: no generator for them (a corpus holds millions of records).
            pieces = (part,) if len(part) <= rule.chunk_bytes else _record_pieces(part, rule.chunk_bytes)
            for piece in pieces:
                if (task := batches[split].add(doc, piece, rule.chunk_bytes)) is not None:  # type: ignore[index]
                    out += _encode_task(tok, task, rule.dtype)
    for batch in batches.values():
        if (task := batch.flush()) is not None:
            out += _encode_task(tok, task, rule.dtype)
    return out


def _encode_jobs(files: Sequence[Source], sizes: Sequence[int], survey: _Survey, rule: _SplitRule,
                 tok: Tokenizer | None, bar: Any) -> Iterator[_Job]:
    """Every document's train part then its val part, in file order, as jobs that return `_Encoded` lists.
    `tok` None: the jobs run on pool workers, with theirs.

    A text file is one document, read here in pieces; each record of a record file is one, and its
    blocks are parsed by the jobs. Documents are numbered across the corpus, so `val_share` of
    split_by="documents" spreads whole records as it spreads files.
    """

    def job(fn: Callable[..., Any], *args: Any) -> _Job:
        return (None, _with_worker_tokenizer, (fn, *args)) if tok is None else (None, fn, (tok, *args))

    doc = 0
    for source, size, n_chars, blocks in zip(files, sizes, survey.chars, survey.blocks, strict=True):
        if source.holds_records:
            reported = 0
            for block, records in zip(iter_blocks(source, field=rule.text_field, block_bytes=rule.chunk_bytes),
                                      blocks, strict=True):
                yield job(_encode_block, block, doc, rule)
                doc += records
                bar.update(block.nbytes)
                reported += block.nbytes
            bar.update(max(0, size - reported))
            continue
        cut, pos = rule.cut(doc, n_chars), 0
        for piece, nbytes in iter_text_pieces(source, errors=rule.errors,  # type: ignore[arg-type]
                                              chunk_bytes=rule.chunk_bytes, errors_flag=True):
            head = max(0, min(len(piece), cut - pos))
            if head:
                yield job(_encode_task, (doc, doc, "train", piece[:head]), rule.dtype)
            if head < len(piece):
                yield job(_encode_task, (doc, doc, "val", piece[head:]), rule.dtype)
            pos += len(piece)
            bar.update(nbytes)
        doc += 1


class _SplitWriter:
    """One split's ids, appended to `train.bin` (shard_tokens 0) or to shards `train-00000.bin`, ... of
    shard_tokens ids each (the last one shorter); written under temporary names until `commit`."""

    def __init__(self, out_dir: Path, split: Split, shard_tokens: int) -> None:
        self.out_dir, self.split, self.shard_tokens = out_dir, split, shard_tokens
        self.shards: list[dict[str, Any]] = []  # {"file", "tokens"}, the index meta.json keeps
        self.total = 0
        self._f: Any = None
        if not shard_tokens:
            self._open(SPLIT_FILES[split])  # the single-file layout always has its file, even when empty

    def _tmp(self, name: str) -> Path:
        return self.out_dir / f".{name}.tmp"

    def _open(self, name: str) -> None:
        if self._f is not None:
            self._f.close()
        self.shards.append({"file": name, "tokens": 0})
        self._f = open(self._tmp(name), "wb")  # noqa: SIM115 (closed by close())

    def write(self, ids: np.ndarray) -> None:
        while len(ids):
            if self.shard_tokens and (not self.shards or self.shards[-1]["tokens"] == self.shard_tokens):
                self._open(f"{self.split}-{len(self.shards):05d}.bin")
            room = self.shard_tokens - self.shards[-1]["tokens"] if self.shard_tokens else len(ids)
            part, ids = ids[:room], ids[room:]
            self._f.write(part.tobytes())
            self.shards[-1]["tokens"] += len(part)
            self.total += len(part)

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def commit(self) -> None:
        self.close()
        for shard in self.shards:
            os.replace(self._tmp(shard["file"]), self.out_dir / shard["file"])

    def discard(self) -> None:
        self.close()
        for shard in self.shards:
            self._tmp(shard["file"]).unlink(missing_ok=True)


def _file_entries(files: Sequence[Source], sizes: Sequence[int], survey: _Survey, *, val_fraction: float,
                  split_by: str) -> list[dict[str, Any]]:
    """meta.json's line per source file: path, bytes, characters, the share of them held out (and, for a
    compressed or record file, its format and records)."""
    entries, doc = [], 0
    for source, size, chars, records in zip(files, sizes, survey.chars, survey.records, strict=True):
        entry: dict[str, Any] = {"path": str(source.path), "bytes": size, "chars": chars}
        if records is None:
            entry["val_share"] = val_share(doc, len(files), val_fraction, split_by)
            doc += 1
        else:
            # Documents [doc, doc + records) are held out where int(i * f) steps up (see val_share).
            held = int((doc + records) * val_fraction) - int(doc * val_fraction)
            entry["val_share"] = val_fraction if split_by == "chars" else held / max(1, records)
            entry["records"] = records
            doc += records
        if source.format != "text" or source.compression:
            entry.update(source.meta())
        entries.append(entry)
    return entries


def prepare(
    source: str | Path,
    out_dir: str | Path,
    *,
    tokenizer: Literal["gpt2", "bpe", "char"] = "gpt2",
    bpe_vocab_size: int = 4096,
    val_fraction: float = 0.1,
    split_by: Literal["chars", "documents"] = "chars",
    errors: Literal["strict", "replace"] = "strict",
    workers: int = 0,
    gpt2_dir: str | Path | None = None,
    progress: bool = True,
    shard_tokens: int = 0,
    chunk_bytes: int = CHUNK_BYTES,
    bpe_sample_chars: int = BPE_SAMPLE_CHARS,
    text_field: str = "text",
) -> dict[str, Any]:
    """Tokenize the files of `source` into `out_dir` (token files, meta.json, tokenizer); returns meta.

    `source` names text, JSONL, Parquet or Arrow files (see `sources.find_sources`); a text file is one
    document, a record file holds one per record, its text at `text_field`; documents are separated by
    end-of-text.

    The corpus is streamed twice, `chunk_bytes` at a time: once to validate it and learn what the split
    and a trained tokenizer need, once to tokenize pieces on `workers` processes (0: one per core); the
    workers parse the records of record files in both passes (a bpe survey runs in this process).
    Memory stays bounded whatever the corpus size, and the bytes written are the same for any number
    of workers or any chunk size (for `bpe`, the sample it learns from is made of pieces, so past
    `bpe_sample_chars` of text the chunk size picks the sample). `shard_tokens` > 0 writes each split as
    shards of that many ids. A stretch of text with no whitespace at all is one piece, held whole.
    """
    from tqdm.auto import tqdm

    if shard_tokens < 0 or chunk_bytes < 1:
        raise ValueError(f"shard_tokens={shard_tokens} must be >= 0 and chunk_bytes={chunk_bytes} >= 1")
    files = find_sources(source)
    out_dir = Path(out_dir)
    sizes = [f.path.stat().st_size for f in files]
    where = files[0].path if len(files) == 1 else source
    if sum(sizes) == 0:
        raise DataError(f"{where}: empty corpus (no text to tokenize)")
    # Pass 1 validates every file before anything is written: a bad byte or record fails in seconds.
    with tqdm(total=sum(sizes), unit="B", unit_scale=True, desc="reading", disable=not progress) as bar:
        survey = _survey(files, sizes, tokenizer=tokenizer, errors=errors, chunk_bytes=chunk_bytes,
                         sample_chars=bpe_sample_chars, bar=bar, text_field=text_field, workers=workers)
    if not sum(survey.chars):  # e.g. a compressed empty file, records whose texts are all empty
        n_records = [r for r in survey.records if r is not None]
        detail = f": {sum(n_records):,} records, all of them empty" if n_records else ""
        raise DataError(f"{where}: empty corpus (no text to tokenize{detail})")
    if tokenizer == "gpt2":
        tok = build_tokenizer("gpt2", gpt2_dir=gpt2_dir)
    else:
        if not survey.has_text:
            raise DataError(f"{where}: empty corpus (only whitespace)")
        # char: the streaming pass saw every character, so the alphabet is exact. bpe: merges learned
        # on the bounded sample (the whole corpus when it fits in bpe_sample_chars).
        material: Iterable[str] = survey.sample if tokenizer == "bpe" else ["".join(sorted(survey.alphabet))]
        tok = build_tokenizer(tokenizer, text=material, vocab_size=bpe_vocab_size if tokenizer == "bpe" else None)
        survey.sample.clear()
    out_dir.mkdir(parents=True, exist_ok=True)
    # Until the new meta.json is written, the folder must not look complete to the trainer.
    (out_dir / META_FILE).unlink(missing_ok=True)
    tok.save(out_dir)
    dtype = token_dtype(tok.vocab_size)
    eot = np.asarray([tok.eot_id], dtype=dtype)

    # More workers than pieces would only cost start-up time (pieces are counted in characters: a
    # compressed file holds more than its size).
    n_workers = _pool_workers(workers, -(-max(sum(sizes), sum(survey.chars)) // chunk_bytes))
    rule = _SplitRule(n_files=len(files), val_fraction=val_fraction, split_by=split_by, text_field=text_field,
                      errors=errors, chunk_bytes=chunk_bytes, dtype=dtype.name)
    writers = {split: _SplitWriter(out_dir, split, shard_tokens) for split in SPLIT_FILES}
    last_doc = {split: -1 for split in SPLIT_FILES}
    bar = tqdm(total=sum(sizes), unit="B", unit_scale=True, desc="tokenizing", disable=not progress)
    try:
        # The workers load the tokenizer from the output folder, so that only text and ids cross between
        # processes.
        pool = (ProcessPoolExecutor(n_workers, initializer=_init_worker, initargs=(str(out_dir),))
                if n_workers > 1 else nullcontext())
        with pool as executor:
            jobs = _encode_jobs(files, sizes, survey, rule, None if executor else tok, bar)
            for _, encoded in _in_order(jobs, executor, n_workers):
                for first, last, split, ids in encoded:
                    if not len(ids):
                        continue
                    # Documents are separated (not terminated) by end-of-text; a task that goes on with the
                    # document of the last one continues it.
                    if first != last_doc[split] and writers[split].total:
                        writers[split].write(eot)
                    last_doc[split] = last
                    writers[split].write(ids)
                bar.set_postfix(tokens=writers["train"].total + writers["val"].total, refresh=False)
        for w in writers.values():
            w.close()
        # Token files of an earlier prepare into this folder that the new layout does not name go first.
        keep = {shard["file"] for w in writers.values() for shard in w.shards}
        for path in out_dir.iterdir():
            if TOKEN_FILE_NAME.fullmatch(path.name) and path.name not in keep:
                path.unlink()
        for w in writers.values():
            w.commit()
    finally:
        bar.close()
        for w in writers.values():
            w.discard()

    meta = {
        "format": META_FORMAT, "format_version": META_VERSION,
        "tokenizer": tok.name, "vocab_size": tok.vocab_size, "eot_id": tok.eot_id, "dtype": dtype.name,
        "train_tokens": writers["train"].total, "val_tokens": writers["val"].total, "val_fraction": val_fraction,
        "split_by": split_by,
        "errors": errors, "source": str(source),
        "files": _file_entries(files, sizes, survey, val_fraction=val_fraction, split_by=split_by),
        # The index: which files hold each split, in order, and how many ids each holds.
        "shard_tokens": shard_tokens,
        "shards": {split: w.shards for split, w in writers.items()},
    }
    if tokenizer == "bpe":
        meta["bpe_sample_chars"] = bpe_sample_chars
    if any(f.holds_records for f in files):
        meta["text_field"] = text_field
    write_json(out_dir / META_FILE, meta)  # written last: its presence marks a complete folder
    return meta
