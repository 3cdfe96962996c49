"""Multiple-choice log-likelihood tasks: a context, N choices, the gold index.

Each choice is scored by the summed log-probability of its tokens given the context. Context and
choice are tokenized as lm-evaluation-harness does (encode context + choice as one string, then split
at the context's token count; trailing spaces of the context move to the choice), so accuracy equals
its Hugging Face backend's on the same model and items.

Batching: the N choices of an item share its context, so the context is run once (left-padded
prefill of several items into one KV cache), the cache is copied to one row per choice, and the
choices' tokens run in a few more passes, rows of similar length together (right padding is wasted
work). The V-wide head runs only where a choice token is predicted. An item costs about
len(context) + sum(len(choice)) positions, not N * (len(context) + len(choice)).

Shape legend: B items (contexts) in a batch, R choice rows, T time, V vocab.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from scratchgpt.data.records import read_objects
from scratchgpt.data.sources import DataError
from scratchgpt.eval.perplexity import head_scores
from scratchgpt.inference.generate import left_pad
from scratchgpt.model.gpt import KVCache

# ---------------------------------------------------------------------------------------------
# Scoring (context ids, continuation ids) requests
# ---------------------------------------------------------------------------------------------

Request = tuple[Sequence[int], Sequence[int]]


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) split the way lm-evaluation-harness splits them (causal models)."""
    if not context:
        # No context: the end-of-text token stands in, so the first choice token is still predicted.
        ids = tokenizer.encode(continuation, allowed_special=True)
        return (ids[:1], ids[1:]) if ids and ids[0] == tokenizer.eot_id else ([tokenizer.eot_id], ids)
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        # "Answer: " + "Paris" tokenizes as "Answer:" + " Paris" in BPE; keep that boundary.
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tokenizer.encode(context + continuation, allowed_special=True)
    ctx = tokenizer.encode(context, allowed_special=True)
    return ctx, whole[len(ctx) :]


def _fit(request: Request, n_ctx: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Left-truncate context + continuation to the model's window (the continuation is kept whole)."""
    ctx, cont = tuple(request[0]), tuple(request[1])
    if not cont:
        raise ValueError("a continuation with no tokens cannot be scored (is a choice empty?)")
    if not ctx:
        raise ValueError("a context with no tokens cannot be scored (an empty context needs the end-of-text id)")
    if len(cont) > n_ctx:
        raise ValueError(f"a continuation of {len(cont)} tokens does not fit the model's context of {n_ctx}")
    if len(ctx) + len(cont) - 1 > n_ctx:
        ctx = ctx[len(ctx) + len(cont) - 1 - n_ctx :]
    return ctx, cont


def _expand(cache: KVCache, index: torch.Tensor) -> KVCache:
    """A cache with row i holding a copy of row index[i] of `cache`."""
    return KVCache(k=cache.k[:, index], v=cache.v[:, index], length=cache.length,
                   key_valid=None if cache.key_valid is None else cache.key_valid[index])


@torch.inference_mode()
def score_requests(
    model: nn.Module, requests: Sequence[Request], *, batch_size: int = 16, progress: bool = False,
) -> list[tuple[float, bool]]:
    """(sum of log p(continuation | context), whether greedy decoding would produce it) per request.

    Requests with the same context (the choices of one item) share one pass over that context.
    Contexts longer than the model's window keep their last tokens, as lm-evaluation-harness does.
    """
    n_ctx = model.config.n_positions
    device = next(model.parameters()).device
    groups: dict[tuple[int, ...], list[int]] = {}
    fitted = []
    for i, r in enumerate(requests):
        ctx, cont = _fit(r, n_ctx)
        fitted.append(cont)
        groups.setdefault(ctx, []).append(i)
    # Longest first: similar lengths share a batch (less padding), and memory trouble shows at once.
    order = sorted(groups.items(), key=lambda kv: -(len(kv[0]) + max(len(fitted[i]) for i in kv[1])))
    results: list[tuple[float, bool] | None] = [None] * len(requests)
    was_training = model.training
    model.eval()
    from tqdm.auto import tqdm

    bar = tqdm(total=len(requests), desc="scoring", unit="req", disable=not progress, leave=False)
    try:
        for chunk in _batches(order, fitted, batch_size=batch_size, n_ctx=n_ctx):
            for i, value in _score_batch(model, chunk, fitted, device):
                results[i] = value
            bar.update(sum(len(ids) for _, ids in chunk))
    finally:
        bar.close()
        model.train(was_training)
    return results  # type: ignore[return-value]


def _batches(order, fitted, *, batch_size: int, n_ctx: int):
    """Up to batch_size contexts per batch, whose longest context + longest continuation fit one window."""
    chunk: list = []
    tc = tl = 0
    for ctx, members in order:
        longest = max(len(fitted[i]) for i in members)
        if chunk and (len(chunk) == batch_size or max(tc, len(ctx)) + max(tl, longest) - 1 > n_ctx):
            yield chunk
            chunk, tc, tl = [], 0, 0
        chunk.append((ctx, members))
        tc, tl = max(tc, len(ctx)), max(tl, longest)
    if chunk:
        yield chunk


def _score_batch(model: nn.Module, chunk, fitted, device, *, rows_per_pass: int = 16,
                 ) -> list[tuple[int, tuple[float, bool]]]:
    contexts = [list(ctx) for ctx, _ in chunk]
    ids, mask, positions = left_pad(contexts, device=device)  # (B, Tc)
    padded = bool((mask == 0).any())
    rows = [(g, i) for g, (_, members) in enumerate(chunk) for i in members]  # one row per continuation
    longest = max(len(fitted[i]) for _, i in rows)
    cache = KVCache.empty(model.config, batch_size=len(chunk), max_len=ids.size(1) + longest - 1, device=device,
                          dtype=next(model.parameters()).dtype)
    last = model.hidden_states(ids, kv_cache=cache, attention_mask=mask if padded else None,
                               position_ids=positions if padded else None)[:, -1]  # (B, C)
    ctx_len = mask.sum(dim=1)  # (B,) real context tokens per item
    out = []
    # The choices of one item differ in length, and right padding in a pass is wasted work: run the
    # continuations shortest first, a few rows of similar length per pass.
    by_length = sorted(rows, key=lambda gi: len(fitted[gi[1]]))
    for p in range(0, len(by_length), rows_per_pass):
        part = by_length[p : p + rows_per_pass]
        n = max(len(fitted[i]) for _, i in part)
        index = torch.tensor([g for g, _ in part], device=device)
        y = torch.zeros((len(part), n), dtype=torch.long, device=device)  # continuation tokens, right-padded
        valid = torch.zeros((len(part), n), dtype=torch.bool, device=device)
        for r, (_, i) in enumerate(part):
            y[r, : len(fitted[i])] = torch.as_tensor(fitted[i], device=device)
            valid[r, : len(fitted[i])] = True
        # Token 0 of a row is predicted by its context's last hidden state, tokens 1.. by the
        # continuation's own; the head then runs only where a real token is predicted.
        states = last[index][:, None]  # (R, 1, C)
        if n > 1:
            pos = ctx_len[index][:, None] + torch.arange(n - 1, device=device)[None]  # (R, T)
            # Right padding is harmless: causal attention never looks ahead.
            rest = model.hidden_states(y[:, :-1], kv_cache=_expand(cache, index), position_ids=pos)  # (R, T, C)
            states = torch.cat([states, rest], dim=1)  # (R, n, C)
        nll, hit = head_scores(model, states[valid], y[valid], greedy=True)  # (N,) over real tokens
        row = torch.arange(len(part), device=device)[:, None].expand(-1, n)[valid]
        sums = torch.zeros(len(part), dtype=torch.float64, device=device).index_add_(0, row, -nll.double())
        misses = torch.zeros(len(part), dtype=torch.long, device=device).index_add_(0, row, (~hit).long())
        out += [(i, (s, m == 0)) for (_, i), s, m in zip(part, sums.tolist(), misses.tolist(), strict=True)]
    return out


# ---------------------------------------------------------------------------------------------
# Task files
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChoiceFields:
    """Where a task file's rows keep their parts. Dotted names reach into objects ("choices.text").

    `choices` is one field holding a list, or several fields each holding one choice (PIQA's sol1, sol2).
    `label` holds the gold index (an int or a digit string), or, with `choice_labels`, a name looked up
    in that list (ARC's answerKey "B" in choices.label ["A", "B", "C", "D"]).
    """

    context: str = "context"
    choices: tuple[str, ...] = ("choices",)
    label: str = "label"
    choice_labels: str | None = None


PRESETS: dict[str, ChoiceFields] = {
    "generic": ChoiceFields(),
    "hellaswag": ChoiceFields(context="ctx", choices=("endings",), label="label"),
    "arc": ChoiceFields(context="question", choices=("choices.text",), label="answerKey",
                        choice_labels="choices.label"),
    "piqa": ChoiceFields(context="goal", choices=("sol1", "sol2"), label="label"),
}


@dataclass
class ChoiceItem:
    context: str
    choices: list[str]
    gold: int
    where: str


def _get(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(obj, dict) or part not in obj:
            raise KeyError(dotted)
        obj = obj[part]
    return obj


def read_choice_items(path: str | Path, fields: ChoiceFields, *, template: str = "{context}",
                      limit: int | None = None) -> list[ChoiceItem]:
    """Items of a JSONL (or JSON list) task file; any bad row is a DataError naming file and line."""
    items = []
    for where, row in read_objects(path):
        if limit and len(items) == limit:
            break
        items.append(_item(row, fields, template, where))
    if not items:
        raise DataError(f"{path}: no items (the file is empty)")
    return items


def _item(row: Any, fields: ChoiceFields, template: str, where: str) -> ChoiceItem:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")

    def get(name: str, flag: str) -> Any:
        try:
            return _get(row, name)
        except KeyError:
            raise DataError(f"{where}: no {name!r} field (it has {sorted(row)}); set {flag} or --preset") from None

    context = get(fields.context, "--context-field")
    if len(fields.choices) == 1:
        choices = get(fields.choices[0], "--choices-field")
    else:
        choices = [get(name, "--choices-field") for name in fields.choices]
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        raise DataError(f"{where}: choices must be a list of at least two strings, got {choices!r:.80}")
    if any(not c.strip() for c in choices):
        raise DataError(f"{where}: an empty choice cannot be scored")
    label = get(fields.label, "--label-field")
    if fields.choice_labels:
        names = [str(n) for n in get(fields.choice_labels, "--choice-labels-field")]
        if str(label) not in names:
            raise DataError(f"{where}: label {label!r} is not one of the choice labels {names}")
        gold = names.index(str(label))
    else:
        try:
            gold = int(label)
        except (TypeError, ValueError):
            raise DataError(f"{where}: label {label!r} is not a choice index") from None
    if not 0 <= gold < len(choices):
        raise DataError(f"{where}: gold index {gold} is out of range for {len(choices)} choices (0-based)")
    if not isinstance(context, str):
        raise DataError(f"{where}: context must be a string, got {type(context).__name__}")
    return ChoiceItem(template.format(context=context), list(choices), gold, where)


# ---------------------------------------------------------------------------------------------
# The eval
# ---------------------------------------------------------------------------------------------


def _mean_stderr(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and its standard error (sample standard deviation / sqrt(n), as lm-evaluation-harness)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def _argmax(xs: Sequence[float]) -> int:
    return max(range(len(xs)), key=lambda i: (xs[i], -i))  # first maximum, like numpy


def evaluate_choices(
    model: nn.Module, tokenizer: Any, items: Sequence[ChoiceItem], *, delimiter: str = " ",
    batch_size: int = 16, progress: bool = False,
    score: Callable[[Sequence[Request]], list[tuple[float, bool]]] | None = None,
) -> dict[str, Any]:
    """Accuracy (raw, per character, per byte of the choice) with standard errors, and per-item scores."""
    requests, spans = [], []
    for it in items:
        start = len(requests)
        for c in it.choices:
            ctx, cont = encode_pair(tokenizer, it.context, delimiter + c)
            if not cont:
                raise DataError(f"{it.where}: choice {c!r} has no tokens after the context")
            requests.append((ctx, cont))
        spans.append((start, len(requests)))
    t0 = time.perf_counter()
    if score is None:
        scored = score_requests(model, requests, batch_size=batch_size, progress=progress)
    else:
        scored = score(requests)
    seconds = time.perf_counter() - t0
    acc, acc_norm, acc_bytes, per_item = [], [], [], []
    for it, (a, b) in zip(items, spans, strict=True):
        lls = [s for s, _ in scored[a:b]]
        pred = _argmax(lls)
        pred_norm = _argmax([ll / len(c) for ll, c in zip(lls, it.choices, strict=True)])
        pred_bytes = _argmax([ll / len(c.encode("utf-8")) for ll, c in zip(lls, it.choices, strict=True)])
        acc.append(float(pred == it.gold))
        acc_norm.append(float(pred_norm == it.gold))
        acc_bytes.append(float(pred_bytes == it.gold))
        per_item.append({"where": it.where, "gold": it.gold, "pred": pred, "pred_bytes": pred_bytes,
                         "loglikelihoods": lls})
    out: dict[str, Any] = {"items": len(items), "requests": len(requests),
                           "tokens": sum(len(c) for c, _ in requests) + sum(len(e) for _, e in requests)}
    for name, values in (("acc", acc), ("acc_norm", acc_norm), ("acc_bytes", acc_bytes)):
        out[name], out[f"{name}_stderr"] = _mean_stderr(values)
    out.update(seconds=seconds, items_per_s=len(items) / max(seconds, 1e-9), per_item=per_item)
    return out
