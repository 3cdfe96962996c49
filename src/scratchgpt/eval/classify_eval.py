"""Classifier evaluation: accuracy, per-class precision/recall/F1 and the confusion matrix on a labelled file.

Reads the file with `finetune classify`'s own reader and labels it with its own `classify_texts`, so
the numbers are those of the checkpoint exactly as `scratchgpt classify` would use it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from scratchgpt.data.sources import DataError


def classification_metrics(gold: Sequence[str], pred: Sequence[str], labels: Sequence[str]) -> dict[str, Any]:
    """Accuracy, macro F1, per-class precision/recall/F1/support and confusion[true][pred] in `labels` order."""
    index = {name: i for i, name in enumerate(labels)}
    K = len(labels)
    confusion = [[0] * K for _ in range(K)]
    for g, p in zip(gold, pred, strict=True):
        confusion[index[g]][index[p]] += 1
    per_class = {}
    for k, name in enumerate(labels):
        tp = confusion[k][k]
        predicted = sum(confusion[j][k] for j in range(K))
        support = sum(confusion[k])
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
    n = len(gold)
    present = [c for c in per_class.values() if c["support"]]
    return {"examples": n, "accuracy": sum(confusion[k][k] for k in range(K)) / n if n else 0.0,
            "macro_f1": sum(c["f1"] for c in present) / len(present) if present else 0.0,
            "per_class": per_class, "labels": list(labels), "confusion": confusion}


def evaluate_classifier_file(
    checkpoint: str | Path, data: str | Path, *, format: str = "auto", text_field: str = "text",
    label_field: str = "label", batch_size: int = 16, device: str = "cpu", limit: int | None = None,
) -> dict[str, Any]:
    """Label every row of `data` with the classifier at `checkpoint` and compare with the file's labels."""
    from scratchgpt.training.modes.classify import classify_texts, load_classifier, read_labeled_texts

    rows = read_labeled_texts(data, format=format, text_field=text_field, label_field=label_field)
    rows = rows[:limit] if limit else rows
    model, tokenizer, labels = load_classifier(checkpoint, device=device)
    unknown = sorted({r.label for r in rows} - set(labels))
    if unknown:
        raise DataError(f"{data}: label(s) {unknown} are not among the classifier's labels {labels}")
    t0 = time.perf_counter()
    out = classify_texts(model, tokenizer, [r.text for r in rows], labels, batch_size=batch_size)
    seconds = time.perf_counter() - t0
    metrics = classification_metrics([r.label for r in rows], [o["label"] for o in out], labels)
    metrics.update(seconds=seconds, texts_per_s=len(rows) / max(seconds, 1e-9))
    return metrics
