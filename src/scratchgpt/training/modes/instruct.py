"""Instruction fine-tuning: instructions and conversations rendered with a chat template, loss on the answers.

The data file holds Alpaca entries (`instruction`, optional `input`, `output`), OpenAI-style `messages`
or ShareGPT `conversations`, as a JSON list, JSONL or Parquet (see `data.records`). An Alpaca entry
under a text template becomes prompt + response + end-of-text, the prompt `chat.render_prompt(template,
...)`; a conversation is rendered as `chat.render_chat` renders a history — the same text the chat
command and the server send, so the model is always asked in the format it learned. With the
"tokenizer" template (a Hugging Face folder's own Jinja chat template) every entry is a conversation
(an Alpaca one: one user turn, instruction, blank line, input) rendered by that template.
`chat.conversation_segments` splits a rendering into what is learnt, every assistant turn with the
marker that ends it, and what is not. "auto" is the start's template: the run's own, else its
tokenizer's, else alpaca. Batches are padded per batch with the end-of-text id; the targets are the
inputs shifted by one, with -100 (ignored) on the padding after the first end-of-text and, by default,
on every token that is not learnt. config.json records the template (`"chat_template"`). After training,
`test_responses.json` holds greedy answers for the test split.

Shape legend: B batch, T time, V vocab.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scratchgpt.checkpoint import unwrap
from scratchgpt.config import InstructConfig, LoRAConfig, SamplingConfig, TrainConfig
from scratchgpt.data.chat import (
    TOKENIZER_TEMPLATE,
    Message,
    Segment,
    TemplateName,
    check_chat_template,
    conversation_segments,
    default_chat_template,
    encode_chat,
    encode_segments,
    instruction_messages,
    render_prompt,
    response_suffix,
    stop_strings,
)
from scratchgpt.data.records import read_instructions
from scratchgpt.data.sources import DataError
from scratchgpt.data.tokenizers import Tokenizer
from scratchgpt.inference.generate import iter_generate
from scratchgpt.model.gpt import GPT
from scratchgpt.training.finetune import (
    FinetuneResult,
    Mode,
    StartModel,
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
from scratchgpt.training.runtime import is_main
from scratchgpt.training.train import lm_loss

TEST_RESPONSES_FILE = "test_responses.json"

# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


@dataclass
class InstructExample:
    """Token ids of a conversation + end-of-text (at most max_length + 1), which of them are learnt, and its entry.

    `prompt_len` ids come before the first learnt one; `learnt` (per id) defaults to every id after them
    (one answer). A multi-turn conversation learns each assistant turn, so later ones follow unlearnt turns.
    """

    ids: list[int]
    prompt_len: int
    entry: int
    learnt: list[bool] | None = None

    def __post_init__(self) -> None:
        if self.learnt is None:
            self.learnt = [i >= self.prompt_len for i in range(len(self.ids))]


def resolve_template(template: str, start: StartModel) -> str:
    """The template a fine-tune renders with: "auto" is the start's (its run's, else its tokenizer's
    own chat template, else alpaca); "tokenizer" needs a tokenizer with a chat template (one ValueError)."""
    if template == "auto":
        template = default_chat_template(start.run_config.get("chat_template"), start.tokenizer)
    try:
        check_chat_template(template, start.tokenizer)
    except ValueError as e:
        raise ValueError(f"{start.source}: {e}") from None
    return template


def entry_messages(entry: dict[str, Any]) -> list[Message]:
    """The conversation an entry asks its answer of: its "messages", or an Alpaca entry's one user turn."""
    if "messages" in entry:
        return entry["messages"]
    return instruction_messages(entry["instruction"], entry.get("input", ""))


def entry_segments(entry: dict[str, Any], template: str, tokenizer: Tokenizer | None, *,
                   response_key: str = "output") -> list[Segment]:
    """The entry's conversation with `response_key` as its last answer, as `chat.conversation_segments` renders
    it; an Alpaca entry under a text template keeps `render_prompt`'s rendering (alpaca's "### Input:")."""
    answer = entry[response_key]
    if "messages" not in entry and template != TOKENIZER_TEMPLATE:
        return [(render_prompt(template, entry["instruction"], entry.get("input", "")), False),
                (answer + response_suffix(template), True)]
    return conversation_segments([*entry_messages(entry), {"role": "assistant", "content": answer}], template,
                                 tokenizer=tokenizer)


def encode_instruction(
    entry: dict[str, Any], tokenizer: Tokenizer, *, template: TemplateName | str, vocab_size: int,
    response_key: str = "output",
) -> tuple[list[int], list[bool]]:
    """(token ids, per id whether it is learnt) of one entry: `chat.encode_segments` of `entry_segments`.

    Every assistant turn and the end of its turn are learnt (under the text templates the last is
    followed by end-of-text; under "tokenizer" by the template's end-of-turn marker). Any failure to
    render or encode is a DataError naming the entry and the field.
    """
    where = entry.get("where", "entry")
    field = "messages" if "messages" in entry and response_key == "output" else response_key

    def encode_text(text: str, learnt: bool) -> list[int]:
        return encode_checked(tokenizer, text, vocab_size=vocab_size, where=f"{where} ({field!r})" if learnt else where)

    try:
        ids, learnt = encode_segments(entry_segments(entry, template, tokenizer, response_key=response_key),
                                      template, tokenizer, encode_text=encode_text)
    except DataError:
        raise
    except ValueError as e:
        raise DataError(f"{where} ({field!r}): {e}") from None
    if max(ids) >= vocab_size:
        raise DataError(f"{where}: encodes to token id {max(ids)} but the model's vocabulary has {vocab_size} "
                        f"tokens; the checkpoint was trained with another tokenizer")
    return ids, learnt


def fit_length(ids: list[int], prompt_len: int, *, max_length: int, too_long: str, where: str) -> list[int] | None:
    """ids cut to max_length + 1 tokens (inputs and targets are those shifted by one), or None to drop them.

    Truncation cuts the end of the response; an entry whose prompt alone fills the window has nothing
    left to learn from and is dropped even under 'truncate'.
    """
    if len(ids) <= max_length + 1:
        return ids
    if too_long == "error":
        raise DataError(f"{where}: {len(ids) - 1} tokens, longer than max_length {max_length}; "
                        f"pass --too-long truncate or drop, or a larger --max-length")
    if too_long == "drop" or prompt_len > max_length:
        return None
    return ids[: max_length + 1]


def encode_instructions(
    entries: Sequence[dict[str, Any]], tokenizer: Tokenizer, *, template: TemplateName | str, vocab_size: int,
    max_length: int, too_long: str = "truncate",
) -> list[InstructExample]:
    """Tokenize entries for instruction tuning; over-long ones are truncated, dropped or an error."""
    out = []
    for i, e in enumerate(entries):
        ids, learnt = encode_instruction(e, tokenizer, template=template, vocab_size=vocab_size)
        prompt_len = learnt.index(True)
        kept = fit_length(ids, prompt_len, max_length=max_length, too_long=too_long, where=e.get("where", f"entry {i}"))
        if kept is not None:
            out.append(InstructExample(kept, prompt_len, e.get("index", i), learnt[: len(kept)]))
    return out


def collate_instruct(
    examples: Sequence[InstructExample], *, pad_id: int, mask_prompt: bool = True
) -> tuple[Tensor, Tensor]:
    """(x, y), each (B, T): x padded with pad_id; y = x shifted by one, -100 on padding (and on what is not learnt:
    the prompt, and in a conversation every turn but the assistant's)."""
    T = max(len(e.ids) for e in examples) - 1
    x = torch.full((len(examples), T), pad_id, dtype=torch.long)
    y = torch.full((len(examples), T), -100, dtype=torch.long)
    for i, e in enumerate(examples):
        ids = torch.tensor(e.ids, dtype=torch.long)
        n = len(e.ids) - 1
        x[i, :n], y[i, :n] = ids[:-1], ids[1:]
        if mask_prompt:
            # Target t predicts token t+1, so it counts when token t+1 is learnt: with one answer, targets
            # 0 .. prompt_len-2 are prompt tokens and the one at prompt_len-1 is the answer's first token.
            y[i, :n].masked_fill_(~torch.tensor(e.learnt[1:], dtype=torch.bool), -100)
    return x, y


def evaluate_lm(
    model: nn.Module, examples: Sequence[InstructExample], *, pad_id: int, mask_prompt: bool = True,
    batch_size: int = 8, max_batches: int | None = None, final: bool = False,
) -> dict[str, float]:
    """{"loss"}: cross-entropy per target token over (the first max_batches batches of) examples."""

    def score(m: nn.Module, batch: tuple[Tensor, Tensor]) -> dict[str, float]:
        x, y = batch
        logits, _ = m(x)  # (B, T, V)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-100, reduction="sum")
        return {"loss": loss.item(), "count": int((y != -100).sum())}

    collate = lambda items: collate_instruct(items, pad_id=pad_id, mask_prompt=mask_prompt)  # noqa: E731
    sums = evaluate_sums(model, examples, collate, score, keys=("loss", "count"), batch_size=batch_size,
                         max_batches=max_batches)
    # Summed over tokens, then divided once: every target token weighs the same, whatever its batch.
    return {"loss": sums["loss"] / max(sums["count"], 1), **({"tokens": int(sums["count"])} if final else {})}


# ---------------------------------------------------------------------------------------------
# Using the tuned model: test responses and chat
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def generate_responses(
    model: GPT, tokenizer: Tokenizer, entries: Sequence[dict[str, Any]], *, template: TemplateName | str,
    max_new_tokens: int = 256, batch_size: int = 8,
) -> list[dict[str, str]]:
    """Greedy answers: [{"instruction", "input" (or "messages"), "output", "model_response"}] per entry.

    `template` is a text template (alpaca, chatml) or "tokenizer": the model's own chat template, with
    instruction and input as one user message (an imported Instruct model answers in its own format).
    A conversation entry is asked its "messages", the turns before its last answer.
    """
    stops = stop_strings(template, tokenizer=tokenizer)
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0, stop=stops)

    def prompt(e: dict[str, Any]) -> list[int]:
        if template == TOKENIZER_TEMPLATE or "messages" in e:
            return encode_chat(entry_messages(e), template, tokenizer, encode_text=tokenizer.encode)
        return tokenizer.encode(render_prompt(template, e["instruction"], e.get("input", "")))

    def asked(e: dict[str, Any]) -> dict[str, Any]:
        if "messages" in e:
            return {"messages": e["messages"]}
        return {"instruction": e["instruction"], "input": e.get("input", "")}

    out = []
    for i in range(0, len(entries), batch_size):
        chunk = entries[i : i + batch_size]
        prompts = [prompt(e) for e in chunk]
        texts = [""] * len(chunk)
        for steps in iter_generate(model, prompts, sampling, eot_id=tokenizer.eot_id, tokenizer=tokenizer):
            for s in steps:
                texts[s.row] += s.text
        out += [{**asked(e), "output": e.get("output", ""), "model_response": t.strip()}
                for e, t in zip(chunk, texts, strict=True)]
    return out


# ---------------------------------------------------------------------------------------------
# The mode
# ---------------------------------------------------------------------------------------------


def finetune_instruct(
    cfg: InstructConfig, *, train: TrainConfig | dict[str, Any] | None = None, lora: LoRAConfig | None = None,
    model: dict[str, Any] | None = None, verbose: bool = True,
) -> FinetuneResult:
    """Instruction-tune on cfg.data; writes the run directory (model, splits, metrics, test_responses.json).

    `train` is the mode's TrainConfig (or fields overriding its defaults), `model` GPTConfig fields of a
    scratch model.
    """
    if not cfg.data:
        raise ValueError("pass the data file (--data)")
    entries = read_instructions(cfg.data)
    train = train_config(cfg, train)
    seed = train.seed
    # Only a scratch model's char tokenizer reads the corpus; it has no chat template of its own.
    text_template = cfg.template if cfg.template in ("alpaca", "chatml") else "alpaca"
    start = load_start_model(
        cfg.init, tokenizer=cfg.tokenizer, model_overrides=model, seed=seed, dtype=base_load_dtype(lora),
        corpus=lambda: "".join(text for e in entries for text, _ in entry_segments(e, text_template, None)),
    )
    template = resolve_template(cfg.template, start)
    max_length = context_limit(start.model, cfg.max_length)
    positions = split_indices(len(entries), cfg.split, shuffle=cfg.split_shuffle, seed=cfg.split_seed)
    split_entries = {k: [entries[i] for i in v] for k, v in positions.items()}
    parts = {k: encode_instructions(v, start.tokenizer, template=template, max_length=max_length,
                                    vocab_size=start.model.config.vocab_size, too_long=cfg.too_long)
             for k, v in split_entries.items()}
    dropped = sum(map(len, positions.values())) - sum(map(len, parts.values()))
    check_splits(parts, cfg.split, source=cfg.data, dropped=dropped, max_length=max_length)

    pad, tok = start.tokenizer.eot_id, start.tokenizer
    sample_entry = (split_entries["val"] or split_entries["train"])[0]
    mode = Mode(
        name="instruct", parts=parts,
        splits=split_record(cfg.data, {k: [e.entry for e in v] for k, v in parts.items()}, seed=cfg.split_seed,
                            shuffle=cfg.split_shuffle, note="0-based entries of the data file"),
        collate=lambda items: collate_instruct(items, pad_id=pad, mask_prompt=cfg.mask_prompt),
        loss_fn=lm_loss,
        evaluate=lambda m, part, **kw: evaluate_lm(m, part, pad_id=pad, mask_prompt=cfg.mask_prompt, **kw),
        info={"task": "instruct", "chat_template": template},
        sample_fn=lambda m: generate_responses(unwrap(m), tok, [sample_entry], template=template,
                                               max_new_tokens=64)[0]["model_response"],
    )
    result = run_mode(mode, start, cfg, train=train, lora=lora, verbose=verbose)
    test = split_entries["test"]
    if cfg.response_tokens and test and is_main():
        responses = generate_responses(result.model, tok, test, template=template,
                                       max_new_tokens=cfg.response_tokens)
        path = Path(result.out_dir) / TEST_RESPONSES_FILE
        path.write_text(json.dumps(responses, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return result
