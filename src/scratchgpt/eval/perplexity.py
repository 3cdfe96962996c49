"""Perplexity and bits per byte of a causal LM on text files, prepared token files or token ids.

The strided sliding window (the standard method for models with a fixed context): the targets of a
document are cut into chunks of `stride` tokens (the first chunk fills a whole context); each chunk
is scored by one forward pass over the `context` tokens that end at it, so every token is scored
exactly once and all but the first chunk's tokens see at least `context - stride` tokens of left
context. `stride == context` is the plain non-overlapping mean; a smaller stride costs
`context / stride` times the compute and gives each prediction more history.

Bits per byte (total NLL in nats / ln 2 / UTF-8 bytes of the scored text) does not depend on the
tokenizer, so models with different vocabularies compare on it.

Shape legend: B windows in a batch, T time, V vocab.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from scratchgpt.data.dataset import find_text_files, read_text
from scratchgpt.data.sources import DataError
from scratchgpt.data.token_files import check_token_files, open_dataset


@dataclass
class Document:
    """Token ids to score, with the size of the text they stand for (for bits per byte, word perplexity)."""

    name: str
    tokens: np.ndarray  # (n,) int64
    n_bytes: int | None = None
    n_words: int | None = None


@dataclass
class PerplexityResult:
    """The numbers one perplexity eval reports."""

    loss: float  # mean NLL per scored token, nats
    ppl: float
    bits_per_byte: float | None
    byte_perplexity: float | None
    word_perplexity: float | None
    nll_sum: float  # total NLL in nats
    tokens: int  # tokens scored
    bytes: int | None
    words: int | None
    documents: int
    windows: int
    context: int
    stride: int
    seconds: float
    tokens_per_s: float
    per_document: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def count_words(text: str) -> int:
    """Words as lm-evaluation-harness counts them for word perplexity (whitespace-separated pieces)."""
    return len(re.split(r"\s+", text))


def text_document(text: str, tokenizer: Any, *, name: str = "text") -> Document:
    """A Document of `text` (special-token texts such as <|endoftext|> become their ids)."""
    ids = tokenizer.encode(text, allowed_special=True)
    return Document(name, np.asarray(ids, dtype=np.int64), len(text.encode("utf-8")), count_words(text))


def _token_file_document(path: Path, tokenizer: Any, vocab_size: int | None) -> Document:
    """A prepared token file: DIR (its val.bin) or DIR/train.bin | DIR/val.bin (dtype from DIR/meta.json),
    checked against the model's tokenizer and `vocab_size` (`check_token_files`)."""
    directory, split = (path, "val") if path.is_dir() else (path.parent, path.stem)
    ds = open_dataset(directory)
    if split not in ("train", "val"):
        raise DataError(f"{path}: a prepared token file is train.bin or val.bin inside a `scratchgpt prepare` folder")
    check_token_files(ds, tokenizer=tokenizer, vocab_size=vocab_size, splits=(split,),
                      hint="pass the text itself to --data (the model's tokenizer encodes it)")
    tokens = np.asarray(ds.tokens(split), dtype=np.int64)
    n_bytes = None
    if tokenizer is not None:
        # Special tokens (document separators) are scored but stand for no text: they count no bytes.
        specials = set(tokenizer.special_tokens.values())
        plain = tokens[~np.isin(tokens, list(specials))] if specials else tokens
        n_bytes = len(tokenizer.decode_bytes(plain.tolist()))
    return Document(str(ds.path(split)), tokens, n_bytes, None)


def load_documents(source: Any, tokenizer: Any, *, vocab_size: int | None = None) -> list[Document]:
    """Documents from a path (text file, folder of .txt, glob, prepared folder or .bin), a list of paths,
    token ids (one document) or a list of token-id lists; every document must hold at least one token.
    Prepared files must come from `tokenizer` and fit `vocab_size` (the model's), else DataError."""
    if isinstance(source, Document):
        docs = [source]
    elif isinstance(source, (str, Path)):
        path = Path(source)
        if path.suffix == ".bin" or (path.is_dir() and (path / "meta.json").is_file()):
            docs = [_token_file_document(path, tokenizer, vocab_size)]
        else:
            if tokenizer is None:
                raise ValueError("scoring text needs the model's tokenizer")
            docs = [text_document(read_text(p), tokenizer, name=str(p)) for p in find_text_files(path)]
    elif isinstance(source, (np.ndarray, torch.Tensor)) or (
        isinstance(source, Sequence) and source and isinstance(source[0], (int, np.integer))
    ):
        tokens = np.asarray(source.cpu() if isinstance(source, torch.Tensor) else source, dtype=np.int64).ravel()
        docs = [Document("tokens", tokens)]
    elif isinstance(source, Sequence) and source:
        docs = [d for item in source for d in load_documents(item, tokenizer, vocab_size=vocab_size)]
    else:
        raise ValueError(f"nothing to score in {source!r}: pass text files, a prepared folder or token ids")
    for d in docs:
        if len(d.tokens) == 0:
            raise DataError(f"{d.name}: empty (0 tokens); a text to score needs at least one token")
    return docs


def windows(tokens: np.ndarray, *, context: int, stride: int, prefix: int | None) -> Iterator[tuple[list, list]]:
    """(inputs, targets) per window; targets are -100 where a token was already scored by an earlier window.

    With `prefix` (the end-of-text id) the first token is scored too, predicted from the prefix alone, as
    lm-evaluation-harness's rolling log-likelihood does; without it the first token is context only.
    """
    seq = ([prefix] if prefix is not None else []) + tokens.tolist()
    n_targets = len(seq) - 1  # targets are seq[1 .. n_targets]
    if n_targets < 1:
        return
    a = 1
    b = min(context, n_targets) + 1  # the first window scores a whole context of targets
    while a <= n_targets:
        lo = max(0, b - 1 - context)
        x, y = seq[lo : b - 1], seq[lo + 1 : b]
        already = len(y) - (b - a)  # targets in this window that an earlier window scored
        yield x, [-100] * already + y[already:]
        a, b = b, min(b + stride, n_targets + 1)


@torch.inference_mode()
def evaluate_perplexity(
    model: nn.Module,
    tokenizer: Any,
    source: Any,
    *,
    context: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    prefix_eot: bool = True,
    progress: bool = False,
) -> PerplexityResult:
    """Loss, perplexity and bits per byte of `model` on `source` (see `load_documents`), strided windows.

    `context` defaults to the model's n_positions, `stride` to `context` (non-overlapping). With
    `prefix_eot` each document starts after an end-of-text token, so its first token is scored too.
    """
    context = context or model.config.n_positions
    stride = stride or context
    if not 1 <= context <= model.config.n_positions:
        raise ValueError(f"context={context} must lie in [1, {model.config.n_positions}] (the model's n_positions)")
    if not 1 <= stride <= context:
        raise ValueError(f"stride={stride} must lie in [1, context={context}]")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    docs = load_documents(source, tokenizer, vocab_size=model.config.vocab_size)
    prefix = None
    if prefix_eot:
        if tokenizer is None:
            raise ValueError("prefix_eot needs the tokenizer's end-of-text id; pass a tokenizer or prefix_eot=False")
        prefix = tokenizer.eot_id
    for d in docs:
        if prefix is None and len(d.tokens) < 2:
            raise DataError(f"{d.name}: {len(d.tokens)} token; without an end-of-text prefix a text needs two "
                            f"(one to read, one to score)")
        if int(d.tokens.max()) >= model.config.vocab_size or int(d.tokens.min()) < 0:
            raise DataError(f"{d.name}: token id {int(d.tokens.max())} is outside the model's vocabulary of "
                            f"{model.config.vocab_size}; was it prepared with another tokenizer?")

    start = time.perf_counter()
    nll_per_doc, tokens_per_doc, n_windows = score_documents(
        model, [d.tokens for d in docs], context=context, stride=stride, prefix=prefix, batch_size=batch_size,
        device=device, progress=progress)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start

    nll = sum(nll_per_doc)
    n_tokens = sum(tokens_per_doc)
    n_bytes = sum(d.n_bytes for d in docs) if all(d.n_bytes is not None for d in docs) else None
    n_words = sum(d.n_words for d in docs) if all(d.n_words is not None for d in docs) else None
    loss = nll / n_tokens
    return PerplexityResult(
        loss=loss, ppl=math.exp(min(loss, 700.0)),
        bits_per_byte=nll / math.log(2) / n_bytes if n_bytes else None,
        byte_perplexity=math.exp(min(nll / n_bytes, 700.0)) if n_bytes else None,
        word_perplexity=math.exp(min(nll / n_words, 700.0)) if n_words else None,
        nll_sum=nll, tokens=n_tokens, bytes=n_bytes, words=n_words, documents=len(docs), windows=n_windows,
        context=context, stride=stride, seconds=seconds, tokens_per_s=n_tokens / max(seconds, 1e-9),
        per_document=[{"name": d.name, "tokens": t, "nll": s, "bytes": d.n_bytes}
                      for d, t, s in zip(docs, tokens_per_doc, nll_per_doc, strict=True)],
    )


@torch.inference_mode()
def score_documents(
    model: nn.Module, documents: Sequence[np.ndarray | Sequence[int]], *, context: int, stride: int,
    prefix: int | None, batch_size: int = 8, device: torch.device | str | None = None, progress: bool = False,
) -> tuple[list[float], list[int], int]:
    """(total NLL in nats per document, tokens scored per document, windows run): the strided windows of
    every document, batched across documents."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    documents = [np.asarray(d, dtype=np.int64) for d in documents]
    nll_per_doc = [0.0] * len(documents)
    tokens_per_doc = [0] * len(documents)
    n_windows = 0
    bar = _progress(sum(max(len(d) - (prefix is None), 0) for d in documents), progress)

    def flush(batch: list[tuple[int, list, list]]) -> None:
        T = max(len(x) for _, x, _ in batch)
        # Right padding is harmless under causal attention: no real position can look at a later pad.
        x = torch.zeros((len(batch), T), dtype=torch.long)
        y = torch.full((len(batch), T), -100, dtype=torch.long)
        for i, (_, xi, yi) in enumerate(batch):
            x[i, : len(xi)] = torch.as_tensor(xi)
            y[i, : len(yi)] = torch.as_tensor(yi)
        x, y = x.to(device), y.to(device)
        scored = y != -100  # (B, T): prefix and padding positions are never run through the head
        hidden = model.hidden_states(x)[scored]  # (N, C)
        nll, _ = head_scores(model, hidden, y[scored])  # (N,)
        row = torch.arange(len(batch), device=device)[:, None].expand(-1, T)[scored]
        per_row = torch.zeros(len(batch), dtype=torch.float64, device=device).index_add_(0, row, nll.double())
        counts = scored.sum(dim=1).tolist()
        for (d, _, _), s, c in zip(batch, per_row.tolist(), counts, strict=True):
            nll_per_doc[d] += s
            tokens_per_doc[d] += c
        bar.update(sum(counts))

    was_training = model.training
    model.eval()
    batch: list[tuple[int, list, list]] = []
    try:
        for i, tokens in enumerate(documents):
            for x, y in windows(tokens, context=context, stride=stride, prefix=prefix):
                batch.append((i, x, y))
                n_windows += 1
                if len(batch) == batch_size:
                    flush(batch)
                    batch = []
        if batch:
            flush(batch)
    finally:
        bar.close()
        model.train(was_training)
    return nll_per_doc, tokens_per_doc, n_windows


def head_scores(
    model: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, *, rows: int = 64, greedy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """NLL in nats (N,) float32 of `targets` (N,) under `model.head(hidden)`, hidden (N, C); with
    `greedy`, also whether each target is the argmax (N,) bool.

    The head runs `rows` positions at a time: a chunk's V-wide logits stay in cache for the
    log-softmax, the max and the gather, and (N, V) logits never exist at once (GPT-2's vocabulary is
    50,257 wide: 1,024 positions of logits are 200 MB). Measured on CPU, this made scoring faster than a
    plain forward pass that only returns the logits.
    """
    nll = torch.empty(targets.shape, dtype=torch.float32, device=hidden.device)
    hit = torch.empty(targets.shape, dtype=torch.bool, device=hidden.device) if greedy else None
    for i in range(0, hidden.size(0), rows):
        logits = model.head(hidden[i : i + rows]).float()  # (rows, V)
        t = targets[i : i + rows]
        nll[i : i + rows] = F.cross_entropy(logits, t, reduction="none")
        if hit is not None:
            hit[i : i + rows] = logits.gather(1, t[:, None])[:, 0] >= logits.amax(dim=1)
    return nll, hit


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="perplexity", unit="tok", disable=not enabled, leave=False)
