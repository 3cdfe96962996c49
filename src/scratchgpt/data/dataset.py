"""Text -> token files, and token files -> (x, y) training windows.

`prepare` turns text files into a folder the trainer reads:
    train.bin, val.bin   token ids back to back (uint16 when the vocabulary fits, else uint32);
                         documents are separated by the end-of-text id
    meta.json            tokenizer kind, vocab size, dtype, token counts, split, source files
    tokenizer.json (+)   the tokenizer itself, so training and generation use the same one

By default each document's first (1 - val_fraction) of characters goes to train and the rest to val, as
nanoGPT splits Tiny Shakespeare (301,966 / 36,059 GPT-2 tokens). For corpora of many small documents
(one per file), `split_by="documents"` sends whole files to val instead, spread evenly over the sorted list.

The samplers read those files through `numpy.memmap` and yield (x, y) pairs of (B, T) int64 tensors
(y is x shifted by one token). Both are rank-aware: at every step the *global* batch of B * world_size
windows is the same whatever the world size, and rank r takes rows [r*B, (r+1)*B) of it. Their
state is one JSON-able dict, identical on every rank, so a resumed run continues at the same batch.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from scratchgpt.data.tokenizer import Tokenizer, build_tokenizer, load_tokenizer
from scratchgpt.files import write_json

META_FILE = "meta.json"
SPLIT_FILES = {"train": "train.bin", "val": "val.bin"}
META_FORMAT = "scratchgpt-tokens"

Split = Literal["train", "val"]


class DataError(ValueError):
    """Input data the user must fix (empty, too short, not UTF-8, not prepared): a one-line message."""


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


def read_text(path: str | Path, *, errors: Literal["strict", "replace"] = "strict") -> str:
    """A file's text as UTF-8; undecodable bytes raise DataError with the byte offset (or become U+FFFD)."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8", errors=errors)
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path}: not valid UTF-8 at byte offset {e.start} (byte 0x{data[e.start]:02x}); fix the file "
            f"or pass --errors replace to substitute U+FFFD"
        ) from None


def split_text(text: str, val_fraction: float) -> tuple[str, str]:
    """(train, val): the first (1 - val_fraction) of the characters, and the rest."""
    cut = int(len(text) * (1.0 - val_fraction))
    return text[:cut], text[cut:]


# ---------------------------------------------------------------------------------------------
# prepare: text files -> train.bin / val.bin / meta.json / tokenizer
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


Encoded = tuple[np.ndarray, np.ndarray, int]  # (train ids, val ids, characters) of one document


def _encode_file(tok: Tokenizer, path: str, val_share: float, errors: str, dtype: str) -> Encoded:
    """(train ids, val ids, characters) of one document."""
    text = read_text(path, errors=errors)  # type: ignore[arg-type]
    # allowed_special: a corpus that already separates documents with <|endoftext|> keeps them as ids.
    parts = [np.asarray(tok.encode(part, allowed_special=True), dtype=dtype) for part in split_text(text, val_share)]
    return parts[0], parts[1], len(text)


# The tokenizer of a pool worker process, loaded once from the output folder by `_init_worker`, so that
# nothing but file names crosses between processes. The main process never sets it.
_WORKER_TOKENIZER: list[Tokenizer] = []


def _init_worker(tokenizer_dir: str) -> None:
    _WORKER_TOKENIZER[:] = [load_tokenizer(tokenizer_dir)]


def _encode_in_worker(path: str, val_share: float, errors: str, dtype: str) -> Encoded:
    return _encode_file(_WORKER_TOKENIZER[0], path, val_share, errors, dtype)


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
) -> dict[str, Any]:
    """Tokenize the text files of `source` into `out_dir` (train.bin, val.bin, meta.json, tokenizer); returns meta."""
    from tqdm.auto import tqdm

    files = find_text_files(source)
    out_dir = Path(out_dir)
    # Read (and so validate) every file before writing anything: a bad byte fails in seconds.
    sizes = [p.stat().st_size for p in files]
    if sum(sizes) == 0:
        raise DataError(f"{files[0] if len(files) == 1 else source}: empty corpus (no text to tokenize)")
    if tokenizer == "gpt2":
        for p in files:
            read_text(p, errors=errors)
        tok = build_tokenizer("gpt2", gpt2_dir=gpt2_dir)
    else:
        # bpe and char learn their vocabulary from the whole corpus (documents joined by newlines).
        text = "\n".join(read_text(p, errors=errors) for p in files)
        if not text.strip():
            raise DataError(f"{files[0] if len(files) == 1 else source}: empty corpus (only whitespace)")
        tok = build_tokenizer(tokenizer, text=text, vocab_size=bpe_vocab_size if tokenizer == "bpe" else None)
        del text
    out_dir.mkdir(parents=True, exist_ok=True)
    # Until the new meta.json is written, the folder must not look complete to the trainer.
    (out_dir / META_FILE).unlink(missing_ok=True)
    tok.save(out_dir)
    dtype = token_dtype(tok.vocab_size)
    eot = np.asarray([tok.eot_id], dtype=dtype)

    n_workers = min(workers or os.cpu_count() or 1, len(files))
    shares = [val_share(i, len(files), val_fraction, split_by) for i in range(len(files))]
    tmp = {split: out_dir / f".{name}.tmp" for split, name in SPLIT_FILES.items()}
    counts = {"train": 0, "val": 0}
    chars = []
    bar = tqdm(total=sum(sizes), unit="B", unit_scale=True, desc="tokenizing", disable=not progress)
    try:
        with open(tmp["train"], "wb") as f_train, open(tmp["val"], "wb") as f_val:
            outs = {"train": f_train, "val": f_val}
            for (train_ids, val_ids, n_chars), size in zip(
                _encode_all(files, tok, out_dir, shares, errors, dtype, n_workers), sizes, strict=True
            ):
                for split, ids in (("train", train_ids), ("val", val_ids)):
                    if not len(ids):
                        continue
                    if counts[split]:  # documents are separated (not terminated) by end-of-text
                        outs[split].write(eot.tobytes())
                        counts[split] += 1
                    outs[split].write(ids.tobytes())
                    counts[split] += len(ids)
                chars.append(n_chars)
                bar.update(size)
                bar.set_postfix(tokens=counts["train"] + counts["val"])
        for split, name in SPLIT_FILES.items():
            os.replace(tmp[split], out_dir / name)
    finally:
        bar.close()
        for path in tmp.values():
            path.unlink(missing_ok=True)

    meta = {
        "format": META_FORMAT, "format_version": 1,
        "tokenizer": tok.name, "vocab_size": tok.vocab_size, "eot_id": tok.eot_id, "dtype": dtype.name,
        "train_tokens": counts["train"], "val_tokens": counts["val"], "val_fraction": val_fraction,
        "split_by": split_by,
        "errors": errors, "source": str(source),
        "files": [{"path": str(p), "bytes": b, "chars": c, "val_share": v}
                  for p, b, c, v in zip(files, sizes, chars, shares, strict=True)],
    }
    write_json(out_dir / META_FILE, meta)  # written last: its presence marks a complete folder
    return meta


def _encode_all(
    files: Sequence[Path], tok: Tokenizer, tok_dir: Path, shares: Sequence[float], errors: str, dtype: np.dtype,
    n_workers: int,
) -> Iterator[Encoded]:
    """Encoded files in order, from a process pool when there is more than one file to share out."""
    args = [(str(p), share, errors, dtype.name) for p, share in zip(files, shares, strict=True)]
    if n_workers <= 1:
        yield from (_encode_file(tok, *a) for a in args)
        return
    with ProcessPoolExecutor(n_workers, initializer=_init_worker, initargs=(str(tok_dir),)) as pool:
        # map keeps file order, so the output is the same for any number of workers.
        yield from pool.map(_encode_in_worker, *zip(*args, strict=True))


# ---------------------------------------------------------------------------------------------
# Opening a prepared folder
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenDataset:
    """A prepared folder: its meta.json and memory-mapped train/val token files."""

    dir: Path
    meta: dict[str, Any]

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.meta["dtype"])

    def path(self, split: Split) -> Path:
        return self.dir / SPLIT_FILES[split]

    def tokens(self, split: Split) -> np.ndarray:
        """The split's ids as a read-only memmap (nothing is loaded until indexed); empty if no tokens."""
        n = int(self.meta[f"{split}_tokens"])
        if n == 0:
            return np.zeros(0, dtype=self.dtype)
        return np.memmap(self.path(split), dtype=self.dtype, mode="r", shape=(n,))

    def tokenizer(self) -> Tokenizer:
        return load_tokenizer(self.dir)

    def check_window(self, split: Split, block_size: int) -> None:
        """DataError naming the file when the split cannot fill one window of block_size + 1 tokens."""
        n = int(self.meta[f"{split}_tokens"])
        if n < block_size + 1:
            raise DataError(
                f"{self.path(split)}: {n} tokens is shorter than one window (block_size {block_size} + 1); "
                f"use more text or a smaller block_size"
            )


def open_dataset(directory: str | Path) -> TokenDataset:
    """Open a folder written by `prepare`, checking that meta.json and the token files agree."""
    directory = Path(directory)
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        hint = "" if directory.is_dir() else " (no such folder)"
        raise DataError(f"{meta_path}: not found{hint}; run `scratchgpt prepare` to create it")
    try:
        meta = json.loads(meta_path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{meta_path}: not valid JSON ({e}); run `scratchgpt prepare` again") from None
    if not isinstance(meta, dict) or meta.get("format") != META_FORMAT:
        raise DataError(f"{meta_path}: not a scratchgpt token folder; run `scratchgpt prepare` again")
    ds = TokenDataset(directory, meta)
    for split in SPLIT_FILES:
        path = ds.path(split)
        if not path.is_file():
            raise DataError(f"{path}: not found; run `scratchgpt prepare` to create it")
        expected = int(meta[f"{split}_tokens"]) * ds.dtype.itemsize
        if path.stat().st_size != expected:
            raise DataError(
                f"{path}: {path.stat().st_size} bytes, but meta.json promises {expected}; the file is truncated "
                f"or from another run of prepare"
            )
    return ds


# ---------------------------------------------------------------------------------------------
# Samplers: (x, y) windows of block_size tokens
# ---------------------------------------------------------------------------------------------

_MASK64 = (1 << 64) - 1


def _mix_seed(*values: int) -> int:
    """A well-spread 63-bit seed from several integers (splitmix64), for per-batch generators."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v & _MASK64)) * 0xBF58476D1CE4E5B9 & _MASK64
        h = (h ^ (h >> 27)) * 0x94D049BB133111EB & _MASK64
        h ^= h >> 31
    return h & ((1 << 63) - 1)


def _windows(tokens: np.ndarray, starts: Sequence[int], block_size: int) -> tuple[Tensor, Tensor]:
    """(x, y), each (B, T) int64, for windows beginning at `starts`."""
    rows = np.stack([np.asarray(tokens[s : s + block_size + 1], dtype=np.int64) for s in starts])  # (B, T+1)
    rows_t = torch.from_numpy(rows)
    return rows_t[:, :-1], rows_t[:, 1:]


class RandomWindows:
    """Windows at uniformly random offsets (with replacement), for pretraining.

    Global batch n draws its B * world_size offsets from a torch.Generator seeded with (seed, n), so the
    state is just n and any batch can be recomputed; rank r keeps rows [r*B, (r+1)*B).
    """

    def __init__(
        self, tokens: np.ndarray, *, block_size: int, batch_size: int, seed: int = 0,
        rank: int = 0, world_size: int = 1,
    ) -> None:
        if len(tokens) < block_size + 1:
            raise DataError(f"{len(tokens)} tokens is shorter than one window (block_size {block_size} + 1)")
        self.tokens, self.block_size, self.batch_size = tokens, block_size, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.batches_drawn = 0
        self._gen = torch.Generator()

    def next_batch(self) -> tuple[Tensor, Tensor]:
        """(x, y), each (B, T) int64 on the CPU."""
        self._gen.manual_seed(_mix_seed(self.seed, self.batches_drawn))
        G = self.batch_size * self.world_size
        starts = torch.randint(len(self.tokens) - self.block_size, (G,), generator=self._gen)  # (G,)
        self.batches_drawn += 1
        mine = starts[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        return _windows(self.tokens, mine.tolist(), self.block_size)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "random", "seed": self.seed, "batches_drawn": self.batches_drawn}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _expect_kind(state, "random")
        self.seed, self.batches_drawn = int(state["seed"]), int(state["batches_drawn"])


class SequentialWindows:
    """Every window once per epoch, without replacement: starts 0, stride, 2*stride, ... (GPTDataset).

    The windows of all epochs form one stream (each epoch shuffled by a generator seeded with
    (seed, epoch) when `shuffle`); global batch n is stream positions [n*G, (n+1)*G), G = B * world_size,
    and rank r takes its B of them. A batch may straddle two epochs, so none is ever dropped.
    """

    def __init__(
        self, tokens: np.ndarray, *, block_size: int, batch_size: int, stride: int | None = None,
        shuffle: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1,
    ) -> None:
        if len(tokens) < block_size + 1:
            raise DataError(f"{len(tokens)} tokens is shorter than one window (block_size {block_size} + 1)")
        self.tokens, self.block_size, self.batch_size = tokens, block_size, batch_size
        self.stride = stride or block_size
        self.shuffle, self.seed, self.rank, self.world_size = shuffle, seed, rank, world_size
        # Window i covers tokens[i*stride : i*stride + T + 1]; the last must end inside the file.
        self.num_windows = (len(tokens) - block_size - 1) // self.stride + 1
        self.position = 0  # windows consumed so far, over all ranks and epochs
        self._order: tuple[int, Tensor] | None = None  # (epoch, permutation) cache

    def __len__(self) -> int:
        return self.num_windows

    @property
    def epoch(self) -> int:
        return self.position // self.num_windows

    def _epoch_order(self, epoch: int) -> Tensor:
        if self._order is None or self._order[0] != epoch:
            if self.shuffle:
                gen = torch.Generator().manual_seed(_mix_seed(self.seed, epoch))
                order = torch.randperm(self.num_windows, generator=gen)
            else:
                order = torch.arange(self.num_windows)
            self._order = (epoch, order)
        return self._order[1]

    def next_batch(self) -> tuple[Tensor, Tensor]:
        """(x, y), each (B, T) int64 on the CPU."""
        first = self.position + self.rank * self.batch_size
        starts = []
        for p in range(first, first + self.batch_size):
            epoch, offset = divmod(p, self.num_windows)
            starts.append(int(self._epoch_order(epoch)[offset]) * self.stride)
        self.position += self.batch_size * self.world_size
        return _windows(self.tokens, starts, self.block_size)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "sequential", "seed": self.seed, "position": self.position,
                "num_windows": self.num_windows, "stride": self.stride, "shuffle": self.shuffle}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _expect_kind(state, "sequential")
        if (state["num_windows"], state["stride"]) != (self.num_windows, self.stride):
            raise DataError(
                f"sampler state is for {state['num_windows']} windows of stride {state['stride']}, but this data "
                f"has {self.num_windows} of stride {self.stride}; resume with the same data and block size"
            )
        self.seed, self.position, self.shuffle = int(state["seed"]), int(state["position"]), bool(state["shuffle"])
        self._order = None


def _expect_kind(state: dict[str, Any], kind: str) -> None:
    if state.get("kind") != kind:
        raise DataError(f"sampler state is for a {state.get('kind')!r} sampler, not {kind!r}")


def make_sampler(
    tokens: np.ndarray, *, kind: Literal["random", "sequential"], block_size: int, batch_size: int, seed: int,
    stride: int | None = None, shuffle: bool = True, rank: int = 0, world_size: int = 1,
) -> RandomWindows | SequentialWindows:
    """The sampler DataConfig.sampler names."""
    common = dict(block_size=block_size, batch_size=batch_size, seed=seed, rank=rank, world_size=world_size)
    if kind == "random":
        return RandomWindows(tokens, **common)
    return SequentialWindows(tokens, stride=stride, shuffle=shuffle, **common)
