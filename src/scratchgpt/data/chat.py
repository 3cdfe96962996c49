"""Prompt templates: how instructions and chat messages become the text a model was tuned on.

Instruction fine-tuning renders training examples with these functions, and the chat command and
HTTP server render conversations with the same ones, so a model always sees the format it learned.
A checkpoint records its template name in config.json (`"chat_template"`).

Besides these text templates, chat and fine-tuning can use "tokenizer": the model's own Jinja chat
template from its Hugging Face tokenizer_config.json (Llama 3 Instruct, Qwen2.5 Instruct, ...),
rendered by `HFTokenizer.apply_chat_template`; its turn markers are special tokens, and they end a
reply. `encode_chat_example` splits a rendered training conversation into prompt and response.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal, TypedDict

Role = Literal["system", "user", "assistant"]
TemplateName = Literal["alpaca", "chatml"]
TEMPLATES: tuple[str, ...] = ("alpaca", "chatml")  # text templates, rendered here
# Chat, serving and fine-tuning also accept "tokenizer": the checkpoint tokenizer's own chat template.
ChatTemplateName = Literal["alpaca", "chatml", "tokenizer"]
TOKENIZER_TEMPLATE = "tokenizer"
CHAT_TEMPLATES: tuple[str, ...] = (*TEMPLATES, TOKENIZER_TEMPLATE)


class Message(TypedDict):
    role: Role
    content: str


ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)


def alpaca_prompt(instruction: str, input: str = "") -> str:
    """The Alpaca prompt up to and including '### Response:\\n'; the answer follows it directly."""
    text = f"{ALPACA_PREAMBLE}\n\n### Instruction:\n{instruction}"
    if input:
        text += f"\n\n### Input:\n{input}"
    return text + "\n\n### Response:\n"


def chatml_prompt(instruction: str, input: str = "") -> str:
    """A ChatML-style single-turn prompt (markers are plain text to a GPT-2 vocabulary)."""
    user = f"{instruction}\n\n{input}" if input else instruction
    return f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


def render_prompt(template: TemplateName, instruction: str, input: str = "") -> str:
    """Render one instruction (+ optional input) with the named template, ready for the response."""
    if template == "alpaca":
        return alpaca_prompt(instruction, input)
    if template == "chatml":
        return chatml_prompt(instruction, input)
    raise ValueError(f"unknown chat template {template!r}; choose one of {list(TEMPLATES)}")


def response_suffix(template: TemplateName) -> str:
    """What closes an assistant turn in the template (before the end-of-text token)."""
    return "<|im_end|>" if template == "chatml" else ""


def has_chat_template(tokenizer: Any) -> bool:
    """Whether `tokenizer` brings its own chat template (a Hugging Face folder's, e.g. an Instruct model)."""
    return getattr(tokenizer, "chat_template", None) is not None


def default_chat_template(saved: str | None, tokenizer: Any) -> str:
    """The template a chat (or a fine-tune's "auto") uses unless told: the one the run was fine-tuned
    with (`saved`), else the tokenizer's own, else Alpaca. (`checkpoint.saved_chat_template` reads
    `saved` from a run.)"""
    if saved:
        return saved
    return TOKENIZER_TEMPLATE if has_chat_template(tokenizer) else "alpaca"


def check_chat_template(template: str, tokenizer: Any = None) -> None:
    """Raise a one-line ValueError when `template` is not a chat template this tokenizer can use."""
    if template not in CHAT_TEMPLATES:
        raise ValueError(f"unknown chat template {template!r}; choose one of {list(CHAT_TEMPLATES)}")
    if template == TOKENIZER_TEMPLATE and not has_chat_template(tokenizer):
        raise ValueError("the 'tokenizer' chat template needs a tokenizer with its own chat_template (a Hugging "
                         "Face folder's tokenizer_config.json); this checkpoint's has none: choose alpaca or chatml")


def stop_strings(template: str, *, tokenizer: Any = None) -> tuple[str, ...]:
    """Strings that mean the model has ended its turn or started a new one: generation stops there
    (and they are never shown). For "tokenizer", the special tokens that close or open a turn."""
    if template == TOKENIZER_TEMPLATE:
        check_chat_template(template, tokenizer)
        return tokenizer.chat_stop_texts
    if template == "chatml":
        return ("<|im_end|>", "<|im_start|>")
    return ("### Instruction:", "\n### Input:", "\n\n### Response:")


def check_messages(messages: Sequence[Message]) -> None:
    """A conversation ending in a user turn, each message a role and a string; else one ValueError."""
    if not messages:
        raise ValueError("a chat needs at least one message")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise ValueError(f"messages[{i}] needs a role of 'system', 'user' or 'assistant'")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{i}].content must be a string")
    if messages[-1]["role"] != "user":
        raise ValueError("the last message must come from the user")


def render_chat(messages: Sequence[Message], template: str = "alpaca", *, tokenizer: Any = None) -> str:
    """Render a conversation ending in a user turn, ready for the assistant's reply.

    "tokenizer" renders the whole message list with the tokenizer's chat template and
    add_generation_prompt=True; a system message goes to the template as it is, and a template
    that has no system role refuses it with one ValueError (nothing is folded silently).
    """
    check_messages(messages)
    if template == TOKENIZER_TEMPLATE:
        check_chat_template(template, tokenizer)
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    if template == "chatml":
        return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages) + (
            "<|im_start|>assistant\n"
        )
    if template != "alpaca":
        raise ValueError(f"unknown chat template {template!r}; choose one of {list(CHAT_TEMPLATES)}")
    # Alpaca knows one instruction and one response; earlier turns are replayed as earlier
    # instruction/response pairs, and a system message becomes the preamble.
    system = " ".join(m["content"] for m in messages if m["role"] == "system")
    text = system or ALPACA_PREAMBLE
    for m in messages:
        if m["role"] == "user":
            text += f"\n\n### Instruction:\n{m['content']}"
        elif m["role"] == "assistant":
            text += f"\n\n### Response:\n{m['content']}"
    return text + "\n\n### Response:\n"


def encode_chat(messages: Sequence[Message], template: str, tokenizer: Any, *,
                encode_text: Callable[[str], list[int]]) -> list[int]:
    """Token ids of the rendered conversation, ready for the reply.

    A text template's markers are text, so the rendering goes through `encode_text` (the caller's
    rule for user text). The tokenizer's template writes its markers as special tokens; a message
    whose content holds a special-token text is refused, so no message can forge a turn.
    """
    if template == TOKENIZER_TEMPLATE:
        check_messages(messages)
        check_chat_template(template, tokenizer)
        return tokenizer.encode_chat(messages, add_generation_prompt=True)
    return encode_text(render_chat(messages, template))


def instruction_messages(instruction: str, input: str = "") -> list[Message]:
    """An Alpaca entry as a conversation: one user turn, the input after the instruction and a blank
    line (where chatml_prompt puts it), so every template asks the same question."""
    return [{"role": "user", "content": f"{instruction}\n\n{input}" if input else instruction}]


def encode_chat_example(messages: Sequence[Message], response: str, tokenizer: Any) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) of one training conversation under the tokenizer's chat template.

    The prompt is exactly what chat and serving send for `messages` (add_generation_prompt=True).
    The response is the rest of the whole conversation's rendering, `messages` + the assistant's
    `response`: its content and the template's end-of-turn marker (and whatever the template writes
    after it), so a model tuned on it learns to end its turn. The two are tokenized apart, as
    generation sees them. A template whose whole rendering does not start with the prompt's has no
    such split: one ValueError. A template that closes the turn with no stop token gets the
    end-of-text token appended, so the reply still ends.
    """
    check_messages(messages)
    check_chat_template(TOKENIZER_TEMPLATE, tokenizer)
    full = [*messages, {"role": "assistant", "content": response}]
    tokenizer.check_chat_content(full)  # no content may forge a turn, the answer's included
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    whole = tokenizer.apply_chat_template(full, add_generation_prompt=False)
    if not whole.startswith(prompt):
        raise ValueError(f"{tokenizer.chat_template_path}: the chat template's rendering of a conversation with "
                         f"its answer does not start with its rendering of the prompt (add_generation_prompt=True), "
                         f"so the answer cannot be split off for training; choose --template alpaca or chatml")
    response_ids = tokenizer.encode(whole[len(prompt):], allowed_special=True)
    stops = {i for t in tokenizer.chat_stop_texts for i in tokenizer.encode(t, allowed_special=True)}
    if not stops.intersection(response_ids):
        response_ids.append(tokenizer.eot_id)
    return tokenizer.encode(prompt, allowed_special=True), response_ids
