"""Prompt templates: how instructions and chat messages become the text a model was tuned on.

Instruction fine-tuning renders training examples with these functions, and the chat command and
HTTP server render conversations with the same ones, so a model always sees the format it learned.
A checkpoint records its template name in config.json (`"chat_template"`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, TypedDict

Role = Literal["system", "user", "assistant"]
TemplateName = Literal["alpaca", "chatml"]
TEMPLATES: tuple[str, ...] = ("alpaca", "chatml")


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


def stop_strings(template: TemplateName) -> tuple[str, ...]:
    """Strings that mean the model has started a new turn: generation stops there."""
    if template == "chatml":
        return ("<|im_end|>", "<|im_start|>")
    return ("### Instruction:", "\n### Input:", "\n\n### Response:")


def render_chat(messages: Sequence[Message], template: TemplateName = "alpaca") -> str:
    """Render a conversation ending in a user turn, ready for the assistant's reply."""
    if not messages:
        raise ValueError("a chat needs at least one message")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise ValueError(f"messages[{i}] needs a role of 'system', 'user' or 'assistant'")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{i}].content must be a string")
    if messages[-1]["role"] != "user":
        raise ValueError("the last message must come from the user")
    if template == "chatml":
        return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages) + (
            "<|im_start|>assistant\n"
        )
    if template != "alpaca":
        raise ValueError(f"unknown chat template {template!r}; choose one of {list(TEMPLATES)}")
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
