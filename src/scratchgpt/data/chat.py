"""Prompt templates: how instructions and chat messages become the text a model was tuned on.

Instruction fine-tuning renders training examples with these functions, and the chat command and
HTTP server render conversations with the same ones, so a model always sees the format it learned.
A checkpoint records its template name in config.json (`"chat_template"`).

Besides these text templates, chat and fine-tuning can use "tokenizer": the model's own Jinja chat
template from its Hugging Face tokenizer_config.json (Llama 3 Instruct, Qwen2.5 Instruct, ...),
rendered by `HFTokenizer.apply_chat_template`; its turn markers are special tokens, and they end a
reply. `conversation_segments` splits a rendered training conversation into what is learnt (every
assistant turn, with the marker that ends it) and what is not (system and user turns, markup).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal, TypedDict

Role = Literal["system", "user", "assistant"]
TemplateName = Literal["alpaca", "chatml"]
TEMPLATES: tuple[str, ...] = ("alpaca", "chatml")  # text templates, rendered here
# Chat, serving and fine-tuning also accept "tokenizer": the checkpoint tokenizer's own chat template.
TOKENIZER_TEMPLATE = "tokenizer"
CHAT_TEMPLATES: tuple[str, ...] = (*TEMPLATES, TOKENIZER_TEMPLATE)


class Message(TypedDict):
    role: Role
    content: str


Segment = tuple[str, bool]  # a piece of a rendered training conversation, and whether its tokens are learnt


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


def _turn_pieces(messages: Sequence[Message], template: str) -> list[Segment]:
    """A text template's rendering of `messages` as (text, whether it is an assistant's answer) pieces, each
    assistant turn followed by what closes it; what comes next (a generation prompt) is the caller's."""
    if template == "chatml":
        pieces: list[Segment] = []
        for m in messages:
            if m["role"] == "assistant":
                pieces += [("<|im_start|>assistant\n", False), (m["content"] + "<|im_end|>", True), ("\n", False)]
            else:
                pieces.append((f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n", False))
        return pieces
    if template != "alpaca":
        raise ValueError(f"unknown chat template {template!r}; choose one of {list(CHAT_TEMPLATES)}")
    # Alpaca knows one instruction and one response; earlier turns are replayed as earlier
    # instruction/response pairs, and a system message becomes the preamble. Nothing closes a response
    # but the next "### Instruction:" (a stop string) or, at the end, the end-of-text token.
    system = " ".join(m["content"] for m in messages if m["role"] == "system")
    pieces = [(system or ALPACA_PREAMBLE, False)]
    for m in messages:
        if m["role"] == "user":
            pieces.append((f"\n\n### Instruction:\n{m['content']}", False))
        elif m["role"] == "assistant":
            pieces += [("\n\n### Response:\n", False), (m["content"], True)]
    return pieces


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
    generation_prompt = "<|im_start|>assistant\n" if template == "chatml" else "\n\n### Response:\n"
    return "".join(text for text, _ in _turn_pieces(messages, template)) + generation_prompt


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


def check_conversation(messages: Sequence[Message]) -> None:
    """A training conversation: each message a role and a string, ending in an assistant turn; else one ValueError."""
    if not messages or messages[-1].get("role") != "assistant":
        raise ValueError("a training conversation must end with an assistant turn (the answer learnt)")
    check_messages([*messages[:-1], {"role": "user", "content": ""}])  # roles and contents of every turn
    if not isinstance(messages[-1].get("content"), str):
        raise ValueError(f"messages[{len(messages) - 1}].content must be a string")


def conversation_segments(messages: Sequence[Message], template: str, *, tokenizer: Any = None) -> list[Segment]:
    """A training conversation (ending in an assistant turn) rendered as (text, learnt) segments, neighbours merged.

    Every assistant turn's content and the marker that ends its turn are learnt (True); system and user
    turns and the template's markup are not. For the text templates that is `render_chat`'s rendering
    of the history, the last turn ending in its marker (chatml's <|im_end|>; end-of-text follows, see
    `encode_segments`). For "tokenizer", assistant turn i's segments are the chat template's rendering of
    turns 0..i-1 with add_generation_prompt=True, less what earlier segments hold, and the rest of its
    rendering of turns 0..i: the answer, its end-of-turn marker and whatever the template writes after it.
    The prompt's rendering is exactly what chat and serving send. A template whose renderings do not
    extend each other (one that rewrites earlier turns) has no such split: one ValueError. No message may
    hold a special-token text (it would forge a turn).
    """
    check_conversation(messages)
    if template != TOKENIZER_TEMPLATE:
        pieces = _turn_pieces(messages, template)
        if template == "chatml":
            pieces.pop()  # the "\n" after the last <|im_end|>: the conversation ends there
    else:
        check_chat_template(template, tokenizer)
        tokenizer.check_chat_content(messages)
        pieces, done = [], ""
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prompt = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True)
            whole = tokenizer.apply_chat_template(messages[: i + 1], add_generation_prompt=False)
            if not (prompt.startswith(done) and whole.startswith(prompt)):
                raise ValueError(f"{tokenizer.chat_template_path}: the chat template's rendering of a conversation "
                                 f"up to answer {i} does not start with its rendering of the turns before it (and "
                                 f"the prompt, add_generation_prompt=True), so the answer cannot be split off for "
                                 f"training; choose --template alpaca or chatml")
            pieces += [(prompt[len(done):], False), (whole[len(prompt):], True)]
            done = whole
    merged: list[Segment] = []
    for text, learnt in pieces:
        if merged and merged[-1][1] == learnt:
            merged[-1] = (merged[-1][0] + text, learnt)
        elif text:
            merged.append((text, learnt))
    return merged


def encode_conversation(messages: Sequence[Message], template: str, tokenizer: Any, *,
                        encode_text: Callable[[str, bool], list[int]] | None = None) -> tuple[list[int], list[bool]]:
    """(token ids, per id whether it is learnt) of a training conversation ending in an assistant turn:
    `encode_segments` of its `conversation_segments`."""
    return encode_segments(conversation_segments(messages, template, tokenizer=tokenizer), template, tokenizer,
                           encode_text=encode_text)


def encode_segments(segments: Sequence[Segment], template: str, tokenizer: Any, *,
                    encode_text: Callable[[str, bool], list[int]] | None = None) -> tuple[list[int], list[bool]]:
    """(token ids, per id whether it is learnt) of a training conversation's segments, then end-of-text.

    Each segment is tokenized apart, as generation sees a prompt and its answer. A text template's
    segments go through `encode_text(text, learnt)` (the caller's rule for user text, and what its errors
    name; default `tokenizer.encode`); the tokenizer's template writes its markers as special tokens.
    The end-of-text token is learnt after the last answer, except under a tokenizer template whose last
    answer already holds one of its stop tokens (its end-of-turn marker), so the reply always ends.
    """
    ids: list[int] = []
    learnt: list[bool] = []
    last: list[int] = []
    for text, target in segments:
        if template == TOKENIZER_TEMPLATE:
            last = tokenizer.encode(text, allowed_special=True)
        else:
            last = encode_text(text, target) if encode_text else tokenizer.encode(text)
        ids += last
        learnt += [target] * len(last)
    if template == TOKENIZER_TEMPLATE:
        stops = {i for t in tokenizer.chat_stop_texts for i in tokenizer.encode(t, allowed_special=True)}
        if segments and segments[-1][1] and stops.intersection(last):
            return ids, learnt
    return [*ids, tokenizer.eot_id], [*learnt, True]
