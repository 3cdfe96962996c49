"""Classification fine-tuning: (text, label) rows, a Linear(C, K) head read at the last real token.

The LM head is replaced by a classification head; rows are right-padded per batch and the class
logits are read at each row's last real token (with causal attention it is the only position that
has seen the whole text, and it never sees the padding). The run directory's config.json records
the task, the label names and the head, so `load_classifier(dir)` rebuilds the model for inference.

Shape legend: B batch, T time, C channels, K classes.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scratchgpt.checkpoint import load_model, read_run_config
from scratchgpt.config import ClassifyConfig, LoRAConfig, TrainConfig
from scratchgpt.data.dataset import read_text
from scratchgpt.data.records import RECORD_FORMATS, read_objects
from scratchgpt.data.sources import DataError, Source
from scratchgpt.data.tokenizers import Tokenizer, load_tokenizer
from scratchgpt.model.gpt import GPT
from scratchgpt.tensor_files import CheckpointError
from scratchgpt.training.finetune import (
    FinetuneResult,
    Mode,
    add_classification_head,
    check_splits,
    context_limit,
    encode_checked,
    evaluate_sums,
    load_start_model,
    run_mode,
    split_indices,
    split_record,
    train_config,
)
from scratchgpt.training.lora import base_load_dtype
from scratchgpt.training.runtime import model_device, to_device

# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


@dataclass
class LabeledText:
    """One (text, label) row; `entry` is its 0-based position among the file's rows, `where` names it."""

    text: str
    label: str
    entry: int
    where: str


def data_format(path: str | Path, fmt: str = "auto") -> str:
    """The format `fmt` names, or for 'auto' the one the file's name implies (anything unknown is TSV)."""
    if fmt != "auto":
        return fmt
    if Path(path).suffix.lower() in (".csv", ".json"):
        return Path(path).suffix.lower()[1:]
    source = Source.of(path)  # also *.ndjson, *.arrow and compressed JSONL (notes.jsonl.gz)
    return source.format if source.holds_records else "tsv"


def read_labeled_texts(
    path: str | Path, *, format: str = "auto", text_field: str = "text", label_field: str = "label"
) -> list[LabeledText]:
    """(text, label) rows of a TSV, CSV, JSONL, JSON, Parquet or Arrow file; errors name the file and line, entry
    or row. A label may be a string or an integer (JSON numbers, integer columns); a text is a string.

    A TSV whose first line names neither field has no header and is `label<TAB>text`, split on the
    FIRST tab: texts may hold tabs and unbalanced quotes (csv's default quoting would merge lines).
    """
    path = Path(path)
    fmt = data_format(path, format)
    if fmt in RECORD_FORMATS:
        rows = [_labeled_record(obj, where, entry, text_field, label_field)
                for entry, (where, obj) in enumerate(read_objects(path, format=fmt))]  # type: ignore[arg-type]
    elif fmt in ("csv", "tsv"):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such data file")
        text = read_text(path)
        rows = _read_csv(path, text, text_field, label_field) if fmt == "csv" else _read_tsv(
            path, text, text_field, label_field)
    else:
        raise ValueError(f"unknown data format {fmt!r}; choose tsv, csv, {', '.join(RECORD_FORMATS)}")
    if not rows:
        raise DataError(f"{path}: no rows")
    for r in rows:
        if not r.label:
            raise DataError(f"{r.where}: empty label")
    return rows


def _labeled_record(obj: dict[str, Any], where: str, entry: int, text_field: str, label_field: str) -> LabeledText:
    """A JSON object's (or a Parquet/Arrow row's) text and label."""
    for key, flag in ((label_field, "--label-field"), (text_field, "--text-field")):
        if key not in obj:
            raise DataError(f"{where}: no {key!r} field (it has {sorted(obj)}); pass {flag}")
    text, label = obj[text_field], obj[label_field]
    if not isinstance(text, str):
        raise DataError(f"{where}: {text_field!r} is {'null' if text is None else type(text).__name__}, not a string")
    if isinstance(label, bool) or not isinstance(label, str | int):
        raise DataError(f"{where}: {label_field!r} is {'null' if label is None else type(label).__name__}, not a "
                        f"string or an integer")
    return LabeledText(text, str(label).strip(), entry, where)


def _check_header(path: Path, header: Sequence[str], text_field: str, label_field: str) -> None:
    for name, flag in ((label_field, "--label-field"), (text_field, "--text-field")):
        if name not in header:
            raise DataError(f"{path}: line 1: no {name!r} column in the header {list(header)}; pass {flag}")


def _read_csv(path: Path, text: str, text_field: str, label_field: str) -> list[LabeledText]:
    reader = csv.DictReader(text.splitlines(keepends=True))
    _check_header(path, reader.fieldnames or [], text_field, label_field)
    rows = []
    for entry, rec in enumerate(reader):
        where = f"{path}: line {reader.line_num}"
        if rec.get(text_field) is None or rec.get(label_field) is None:
            raise DataError(f"{where}: fewer columns than the header")
        rows.append(LabeledText(rec[text_field], rec[label_field].strip(), entry, where))
    return rows


def _read_tsv(path: Path, text: str, text_field: str, label_field: str) -> list[LabeledText]:
    lines = text.split("\n")
    header = lines[0].rstrip("\r").split("\t")
    has_header = label_field in header or text_field in header
    if has_header:
        _check_header(path, header, text_field, label_field)
        t_col, l_col = header.index(text_field), header.index(label_field)
    rows = []
    for lineno, line in enumerate(lines[1:] if has_header else lines, start=2 if has_header else 1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        where = f"{path}: line {lineno}"
        if has_header:
            cols = line.split("\t")
            if len(cols) != len(header):
                raise DataError(f"{where}: {len(cols)} tab-separated columns, the header has {len(header)}")
            label, body = cols[l_col], cols[t_col]
        elif "\t" in line:
            label, body = line.split("\t", 1)
        else:
            raise DataError(f"{where}: no tab between label and text (expected label<TAB>text)")
        rows.append(LabeledText(body, label.strip(), len(rows), where))
    return rows


def label_names(rows: Sequence[LabeledText], given: Sequence[str] = ()) -> list[str]:
    """The label set in class-id order: `given`, else the sorted distinct labels; a label outside `given` raises."""
    if not given:
        return sorted({r.label for r in rows})
    if len(set(given)) != len(given):
        raise ValueError(f"--labels {list(given)} repeats a label")
    for r in rows:
        if r.label not in given:
            raise DataError(f"{r.where}: label {r.label!r} is not one of --labels {list(given)}")
    return list(given)


def balance_classes(rows: Sequence[LabeledText], *, seed: int) -> list[LabeledText]:
    """Undersample every label to the rarest one's count (a seeded random subset), keeping file order."""
    by_label: dict[str, list[LabeledText]] = {}
    for r in rows:
        by_label.setdefault(r.label, []).append(r)
    n = min(len(v) for v in by_label.values())
    gen = torch.Generator().manual_seed(seed)
    kept = []
    for label in sorted(by_label):
        group = by_label[label]
        kept += [group[i] for i in torch.randperm(len(group), generator=gen)[:n].tolist()]
    return sorted(kept, key=lambda r: r.entry)


@dataclass
class ClassExample:
    """A tokenized row: its ids (at most max_length), class id, and entry in the data file."""

    ids: list[int]
    label: int
    entry: int


def encode_labeled(
    rows: Sequence[LabeledText], tokenizer: Tokenizer, labels: Sequence[str], *, vocab_size: int,
    max_length: int, too_long: str = "truncate",
) -> list[ClassExample]:
    """Tokenize rows; one longer than max_length keeps its first max_length tokens, is dropped, or raises."""
    index = {name: i for i, name in enumerate(labels)}
    out = []
    for r in rows:
        ids = encode_checked(tokenizer, r.text, vocab_size=vocab_size, where=r.where)
        if not ids:
            raise DataError(f"{r.where}: empty text")
        if len(ids) > max_length:
            if too_long == "error":
                raise DataError(f"{r.where}: {len(ids)} tokens, longer than max_length {max_length}; "
                                f"pass --too-long truncate or drop")
            if too_long == "drop":
                continue
            ids = ids[:max_length]
        out.append(ClassExample(ids, index[r.label], r.entry))
    return out


def collate_classification(examples: Sequence[ClassExample], *, pad_id: int) -> dict[str, Tensor]:
    """Right-pad to the batch's longest row: x (B, T), lengths (B,), labels (B,)."""
    T = max(len(e.ids) for e in examples)
    x = torch.full((len(examples), T), pad_id, dtype=torch.long)
    for i, e in enumerate(examples):
        x[i, : len(e.ids)] = torch.tensor(e.ids, dtype=torch.long)
    lengths = torch.tensor([len(e.ids) for e in examples], dtype=torch.long)
    labels = torch.tensor([e.label for e in examples], dtype=torch.long)
    return {"x": x, "lengths": lengths, "labels": labels}


# ---------------------------------------------------------------------------------------------
# Head, loss, evaluation
# ---------------------------------------------------------------------------------------------


def pooled_logits(model: nn.Module, x: Tensor, lengths: Tensor) -> Tensor:
    """Class logits (B, K) read at each right-padded row's last real token."""
    logits, _ = model(x)  # (B, T, K)
    return logits[torch.arange(x.size(0), device=x.device), lengths - 1]


def classification_loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Mean cross-entropy of the pooled class logits against the labels."""
    return F.cross_entropy(pooled_logits(model, batch["x"], batch["lengths"]), batch["labels"])


def evaluate_classifier(
    model: nn.Module, examples: Sequence[ClassExample], *, num_classes: int, pad_id: int, batch_size: int = 16,
    max_batches: int | None = None, final: bool = False,
) -> dict[str, Any]:
    """{"loss", "accuracy"} over (the first max_batches batches of) examples; final adds "confusion" [true][pred]."""
    K = num_classes

    def score(m: nn.Module, batch: dict[str, Tensor]) -> dict[str, float]:
        logits = pooled_logits(m, batch["x"], batch["lengths"]).float()  # (B, K)
        pairs = (batch["labels"] * K + logits.argmax(-1)).cpu()  # flattened [true, predicted]
        counts = torch.bincount(pairs, minlength=K * K).double().tolist()
        return {"loss": F.cross_entropy(logits, batch["labels"], reduction="sum").item(),
                **{f"c{i}": v for i, v in enumerate(counts)}}

    sums = evaluate_sums(model, examples, lambda items: collate_classification(items, pad_id=pad_id), score,
                         keys=("loss", *(f"c{i}" for i in range(K * K))), batch_size=batch_size,
                         max_batches=max_batches)
    confusion = torch.tensor([sums[f"c{i}"] for i in range(K * K)]).view(K, K)
    n = max(confusion.sum().item(), 1.0)
    out: dict[str, Any] = {"loss": sums["loss"] / n, "accuracy": confusion.trace().item() / n}
    if final:
        out.update(examples=int(confusion.sum().item()), confusion=confusion.long().tolist())
    return out


# ---------------------------------------------------------------------------------------------
# The mode, and inference with its result
# ---------------------------------------------------------------------------------------------


def finetune_classify(
    cfg: ClassifyConfig, *, train: TrainConfig | dict[str, Any] | None = None, lora: LoRAConfig | None = None,
    model: dict[str, Any] | None = None, verbose: bool = True,
) -> FinetuneResult:
    """Fine-tune a classifier on cfg.data; writes the run directory (model, splits.json, metrics.json, curves).

    `train` is the mode's TrainConfig (or fields overriding its defaults), `model` GPTConfig fields of a
    scratch model.
    """
    if not cfg.data:
        raise ValueError("pass the data file (--data)")
    rows = read_labeled_texts(cfg.data, format=cfg.format, text_field=cfg.text_field, label_field=cfg.label_field)
    labels = label_names(rows, cfg.labels)
    if len(labels) < 2:
        raise DataError(f"{cfg.data}: needs at least two labels, found {labels}")
    if cfg.balance:
        rows = balance_classes(rows, seed=cfg.split_seed)
    train = train_config(cfg, train)
    seed = train.seed
    start = load_start_model(cfg.init, tokenizer=cfg.tokenizer, corpus=lambda: "".join(r.text for r in rows),
                             model_overrides=model, seed=seed, dtype=base_load_dtype(lora))
    max_length = context_limit(start.model, cfg.max_length)
    examples = encode_labeled(rows, start.tokenizer, labels, vocab_size=start.model.config.vocab_size,
                              max_length=max_length, too_long=cfg.too_long)
    positions = split_indices(len(examples), cfg.split, shuffle=cfg.split_shuffle, seed=cfg.split_seed)
    parts = {name: [examples[i] for i in idx] for name, idx in positions.items()}
    check_splits(parts, cfg.split, source=cfg.data, dropped=len(rows) - len(examples), max_length=max_length)

    K, pad = len(labels), start.tokenizer.eot_id
    head_generator = torch.Generator().manual_seed(seed)
    entries = {k: [e.entry for e in v] for k, v in parts.items()}
    mode = Mode(
        name="classify", parts=parts,
        splits=split_record(cfg.data, entries, format=data_format(cfg.data, cfg.format), labels=labels,
                            balance=cfg.balance, seed=cfg.split_seed, shuffle=cfg.split_shuffle,
                            note="0-based entries of the data file (its rows, header excluded)"),
        collate=lambda items: collate_classification(items, pad_id=pad),
        loss_fn=classification_loss,
        evaluate=lambda m, part, **kw: evaluate_classifier(m, part, num_classes=K, pad_id=pad, **kw),
        info={"task": "classification",
              "classifier": {"labels": labels, "num_classes": K, "head": "linear", "pooling": "last_token",
                             "max_length": max_length}},
        add_head=lambda m: add_classification_head(m, K, generator=head_generator),
        plots=("accuracy",),
        report={"labels": labels},  # the confusion matrices' row and column order
    )
    return run_mode(mode, start, cfg, train=train, lora=lora, verbose=verbose)


def load_classifier(run_dir: str | Path, *, device: torch.device | str = "cpu") -> tuple[GPT, Tokenizer, list[str]]:
    """A classifier saved by `finetune classify`: (model in eval mode, tokenizer, label names)."""
    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    head = cfg.get("classifier")
    if cfg.get("task") != "classification" or not isinstance(head, dict) or not head.get("labels"):
        raise CheckpointError(f"{run_dir / 'config.json'}: not a classifier (no \"task\": \"classification\"); "
                              f"fine-tune one with `scratchgpt finetune classify`")
    model, _ = load_model(run_dir, device=device,
                          prepare=lambda m, _cfg: add_classification_head(m, len(head["labels"])))
    return model, load_tokenizer(run_dir), list(head["labels"])


@torch.no_grad()
def classify_texts(
    model: GPT, tokenizer: Tokenizer, texts: Sequence[str], labels: Sequence[str], *, batch_size: int = 16,
) -> list[dict[str, Any]]:
    """[{"label", "probs": {label: p}, "text"}] per text; texts longer than the context keep their start."""
    device = model_device(model)
    n_ctx = model.config.n_positions
    out = []
    for i in range(0, len(texts), batch_size):
        chunk = texts[i : i + batch_size]
        examples = []
        for j, text in enumerate(chunk):
            ids = encode_checked(tokenizer, text, vocab_size=model.config.vocab_size, where=f"text {i + j + 1}")
            if not ids:
                raise ValueError(f"text {i + j + 1} is empty")
            examples.append(ClassExample(ids[:n_ctx], 0, i + j))
        batch = to_device(collate_classification(examples, pad_id=tokenizer.eot_id), device)
        probs = pooled_logits(model, batch["x"], batch["lengths"]).float().softmax(-1).cpu()  # (B, K)
        for text, p in zip(chunk, probs, strict=True):
            out.append({"label": labels[int(p.argmax())],
                        "probs": {name: round(float(v), 6) for name, v in zip(labels, p, strict=True)}, "text": text})
    return out
