"""Direct preference optimisation (DPO): prefer the chosen answer over the rejected one, relative to a reference.

For a prompt x with a chosen answer c and a rejected answer r, and a frozen reference model (the
starting model), the loss is

    -log σ( β · [ (log π(c|x) - log π_ref(c|x)) - (log π(r|x) - log π_ref(r|x)) ] )

where log π(y|x) is the SUM of the answer's token log-probabilities (`logp="mean"` divides by its
length). β·(log π - log π_ref) is the answer's implicit reward; the reported margin is chosen minus
rejected, and the accuracy the fraction of pairs whose margin is positive.

The reference never changes, so its log-probabilities are computed once, before training, from the
starting model in eval mode: the same numbers a frozen copy would give at every step, at no cost
per step and without a second model in memory.

The data (`data.records.read_preferences`): a prompt, a string or a conversation ending in a user turn,
with a chosen and a rejected answer, or Alpaca's instruction + input; prompt and answer are rendered as
instruction tuning renders them, and only the final answer's tokens are scored.

Shape legend: B pairs, N = 2B sequences (chosen rows first), T time, V vocab.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scratchgpt.config import DPOConfig, LoRAConfig, TrainConfig
from scratchgpt.data.chat import TemplateName
from scratchgpt.data.records import read_preferences
from scratchgpt.data.sources import DataError
from scratchgpt.data.tokenizers import Tokenizer
from scratchgpt.training.finetune import (
    FinetuneResult,
    Mode,
    check_splits,
    context_limit,
    evaluate_sums,
    load_start_model,
    run_mode,
    split_indices,
    split_record,
    train_config,
)
from scratchgpt.training.lora import base_load_dtype
from scratchgpt.training.modes.instruct import (
    InstructExample,
    collate_instruct,
    encode_instruction,
    entry_segments,
    fit_length,
    resolve_template,
)
from scratchgpt.training.runtime import model_device, to_device

# ---------------------------------------------------------------------------------------------
# The loss (pure functions)
# ---------------------------------------------------------------------------------------------


def sequence_logprobs(logits: Tensor, targets: Tensor, *, reduction: str = "sum") -> Tensor:
    """Log-probability of each row's targets (-100 = not part of the answer): (N, T, V), (N, T) -> (N,)."""
    mask = targets != -100
    # cross_entropy is -log p of each target, without materialising an (N, T, V) log-softmax.
    token_logp = -F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100,
                                  reduction="none").view_as(targets)  # (N, T), 0 where masked
    total = token_logp.sum(-1)
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / mask.sum(-1).clamp(min=1)
    raise ValueError(f"reduction={reduction!r}; choose 'sum' or 'mean'")


def dpo_loss(
    policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor, *, beta: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """(mean loss, chosen rewards (B,), rejected rewards (B,)) from sequence log-probabilities, each (B,)."""
    chosen_rewards = beta * (policy_chosen - ref_chosen)
    rejected_rewards = beta * (policy_rejected - ref_rejected)
    loss = -F.logsigmoid(chosen_rewards - rejected_rewards).mean()
    return loss, chosen_rewards.detach(), rejected_rewards.detach()


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


@dataclass
class PreferencePair:
    """Token ids of prompt+chosen and prompt+rejected (each + end-of-text), and the reference's log-probs."""

    chosen: list[int]
    rejected: list[int]
    prompt_len: int
    entry: int
    ref_chosen: float = float("nan")
    ref_rejected: float = float("nan")


def answer_start(learnt: Sequence[bool]) -> int:
    """Where the last run of learnt ids begins: the final answer (earlier assistant turns are prompt to DPO)."""
    return len(learnt) - next((i for i, v in enumerate(reversed(learnt)) if not v), len(learnt))


def encode_preferences(
    entries: Sequence[dict[str, Any]], tokenizer: Tokenizer, *, template: TemplateName | str, vocab_size: int,
    max_length: int, too_long: str = "truncate",
) -> list[PreferencePair]:
    """Tokenize (prompt, chosen, rejected) entries; a pair is dropped when either side must be.

    Both sides share the prompt ids (the prompt is rendered without the answer) and differ only after it.
    The prompt may be a conversation: only the final answer is scored, its earlier assistant turns are prompt.
    """
    pairs = []
    for e in entries:
        (chosen, learnt), (rejected, _) = (
            encode_instruction(e, tokenizer, template=template, vocab_size=vocab_size, response_key=key)
            for key in ("chosen", "rejected"))
        prompt_len = answer_start(learnt)
        if chosen[:prompt_len] != rejected[:prompt_len]:  # a template that renders the prompt after the answer
            raise DataError(f"{e['where']}: the chat template renders the prompt differently before the chosen and "
                            f"the rejected answer, so they cannot be compared; choose --template alpaca or chatml")
        fit = [fit_length(side, prompt_len, max_length=max_length, too_long=too_long, where=e["where"])
               for side in (chosen, rejected)]
        if fit[0] is not None and fit[1] is not None:
            pairs.append(PreferencePair(fit[0], fit[1], prompt_len, e["index"]))
    return pairs


def collate_preferences(pairs: Sequence[PreferencePair], *, pad_id: int) -> dict[str, Tensor]:
    """x, y (2B, T) with the B chosen rows first; y is -100 except on answer tokens; ref (2B,)."""
    # The same padding, shift and prompt masking as instruction tuning: only answer tokens count.
    rows = [InstructExample(p.chosen, p.prompt_len, p.entry) for p in pairs]
    rows += [InstructExample(p.rejected, p.prompt_len, p.entry) for p in pairs]
    x, y = collate_instruct(rows, pad_id=pad_id, mask_prompt=True)
    ref = torch.tensor([p.ref_chosen for p in pairs] + [p.ref_rejected for p in pairs], dtype=torch.float32)
    return {"x": x, "y": y, "ref": ref}


# ---------------------------------------------------------------------------------------------
# Reference log-probabilities, loss on a batch, evaluation
# ---------------------------------------------------------------------------------------------


def batch_logprobs(model: nn.Module, batch: dict[str, Tensor], *, reduction: str) -> tuple[Tensor, Tensor]:
    """(chosen, rejected) sequence log-probabilities, each (B,), from one forward pass over both."""
    logits, _ = model(batch["x"])  # (2B, T, V)
    return sequence_logprobs(logits, batch["y"], reduction=reduction).chunk(2)


@torch.no_grad()
def add_reference_logprobs(
    model: nn.Module, pairs: Sequence[PreferencePair], *, pad_id: int, reduction: str, batch_size: int = 8,
) -> None:
    """Fill each pair's ref_chosen / ref_rejected from `model` (eval mode), batched as evaluation batches them."""
    device = model_device(model)
    was_training = model.training
    model.eval()
    # Same batches (order, size, padding) as evaluate_dpo uses in one process: at step 0 the policy
    # then reproduces the reference bit for bit, so the starting margins are exactly 0. Under several
    # processes evaluation strides examples across ranks, so batch shapes differ and step-0 margins
    # are 0 only up to float rounding.
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i : i + batch_size]
        chosen, rejected = batch_logprobs(model, to_device(collate_preferences(chunk, pad_id=pad_id), device),
                                          reduction=reduction)
        for p, c, r in zip(chunk, chosen.tolist(), rejected.tolist(), strict=True):
            p.ref_chosen, p.ref_rejected = c, r
    model.train(was_training)


def dpo_batch_loss(model: nn.Module, batch: dict[str, Tensor], *, beta: float, reduction: str) -> Tensor:
    """The DPO loss of one collated batch (the loop's loss_fn)."""
    chosen, rejected = batch_logprobs(model, batch, reduction=reduction)
    ref_chosen, ref_rejected = batch["ref"].chunk(2)
    return dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=beta)[0]


def evaluate_dpo(
    model: nn.Module, pairs: Sequence[PreferencePair], *, beta: float, reduction: str, pad_id: int,
    batch_size: int = 8, max_batches: int | None = None, final: bool = False,
) -> dict[str, float]:
    """loss, reward margin / chosen / rejected (means), reward accuracy (margin > 0) and logp accuracy.

    logp_accuracy is the policy's own preference: log π(chosen) > log π(rejected), whatever the reference.
    """

    def score(m: nn.Module, batch: dict[str, Tensor]) -> dict[str, float]:
        chosen, rejected = batch_logprobs(m, batch, reduction=reduction)
        ref_chosen, ref_rejected = batch["ref"].chunk(2)
        loss, c_reward, r_reward = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=beta)
        n = chosen.numel()
        return {"loss": loss.item() * n, "margin": (c_reward - r_reward).sum().item(),
                "chosen_reward": c_reward.sum().item(), "rejected_reward": r_reward.sum().item(),
                "accuracy": (c_reward > r_reward).sum().item(), "logp_accuracy": (chosen > rejected).sum().item(),
                "pairs": n}

    keys = ("loss", "margin", "chosen_reward", "rejected_reward", "accuracy", "logp_accuracy", "pairs")
    sums = evaluate_sums(model, pairs, lambda items: collate_preferences(items, pad_id=pad_id), score, keys=keys,
                         batch_size=batch_size, max_batches=max_batches)
    n = max(sums.pop("pairs"), 1.0)
    return {k: v / n for k, v in sums.items()}


# ---------------------------------------------------------------------------------------------
# The mode
# ---------------------------------------------------------------------------------------------


def finetune_dpo(
    cfg: DPOConfig, *, train: TrainConfig | dict[str, Any] | None = None, lora: LoRAConfig | None = None,
    model: dict[str, Any] | None = None, verbose: bool = True,
) -> FinetuneResult:
    """Preference-tune on cfg.data (prompt or instruction + input, chosen, rejected); writes the run directory.

    `train` is the mode's TrainConfig (or fields overriding its defaults), `model` GPTConfig fields of a
    scratch model.
    """
    if not cfg.data:
        raise ValueError("pass the data file (--data)")
    entries = read_preferences(cfg.data)
    train = train_config(cfg, train)
    seed = train.seed
    # Only a scratch model's char tokenizer reads the corpus; it has no checkpoint template to follow.
    text_template = cfg.template if cfg.template in ("alpaca", "chatml") else "alpaca"
    start = load_start_model(
        cfg.init, tokenizer=cfg.tokenizer, model_overrides=model, seed=seed, dtype=base_load_dtype(lora),
        corpus=lambda: "".join(text for e in entries for key in ("chosen", "rejected")
                               for text, _ in entry_segments(e, text_template, None, response_key=key)),
    )
    template = resolve_template(cfg.template, start)
    max_length = context_limit(start.model, cfg.max_length)
    positions = split_indices(len(entries), cfg.split, shuffle=cfg.split_shuffle, seed=cfg.split_seed)
    parts = {k: encode_preferences([entries[i] for i in v], start.tokenizer, template=template,
                                   vocab_size=start.model.config.vocab_size, max_length=max_length,
                                   too_long=cfg.too_long) for k, v in positions.items()}
    dropped = sum(map(len, positions.values())) - sum(map(len, parts.values()))
    check_splits(parts, cfg.split, source=cfg.data, dropped=dropped, max_length=max_length)

    pad, beta, reduction = start.tokenizer.eot_id, cfg.beta, cfg.logp

    def evaluate(m: nn.Module, part: Sequence[PreferencePair], **kw: Any) -> dict[str, float]:
        return evaluate_dpo(m, part, beta=beta, reduction=reduction, pad_id=pad, **kw)

    def reference(m: nn.Module, batch_size: int) -> None:
        # Before any update the model IS the reference (LoRA's B = 0 adds exactly nothing).
        for part in parts.values():
            add_reference_logprobs(m, part, pad_id=pad, reduction=reduction, batch_size=batch_size)

    mode = Mode(
        name="dpo", parts=parts,
        splits=split_record(cfg.data, {k: [p.entry for p in v] for k, v in parts.items()}, seed=cfg.split_seed,
                            shuffle=cfg.split_shuffle, note="0-based entries of the data file"),
        collate=lambda items: collate_preferences(items, pad_id=pad),
        loss_fn=lambda m, batch: dpo_batch_loss(m, batch, beta=beta, reduction=reduction),
        evaluate=evaluate,
        info={"task": "dpo", "chat_template": template, "dpo": {"beta": beta, "logp": reduction}},
        setup=reference,
        plots=("accuracy", "margin"),
    )
    return run_mode(mode, start, cfg, train=train, lora=lora, verbose=verbose)
