"""A conversation with an instruction-tuned model: the history, rendered with its template, replies streamed.

Used by `scratchgpt chat`; it needs only generation, not the training stack.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

from scratchgpt.config import SamplingConfig
from scratchgpt.data.chat import Message, TemplateName, render_chat, stop_strings
from scratchgpt.data.tokenizer import Tokenizer
from scratchgpt.inference.generate import stream_text
from scratchgpt.model.gpt import GPT


class ChatSession:
    """A conversation with an instruction-tuned model: the history, rendered with its template, replies streamed."""

    def __init__(self, model: GPT, tokenizer: Tokenizer, *, template: TemplateName, sampling: SamplingConfig,
                 system: str | None = None) -> None:
        self.model, self.tokenizer, self.template, self.system = model, tokenizer, template, system
        # The template's turn markers end a reply, besides end-of-text and the user's own stop strings.
        stops = tuple(dict.fromkeys((*sampling.stop, *stop_strings(template))))
        self.sampling = dataclasses.replace(sampling, stop=stops)
        self.messages: list[Message] = []

    def reset(self) -> None:
        """Forget the conversation (the system message stays)."""
        self.messages = []

    def reply(self, text: str) -> Iterator[str]:
        """Add the user's turn, stream the assistant's answer in pieces, and keep it in the history."""
        self.messages.append({"role": "user", "content": text})
        pieces: list[str] = []
        try:
            for piece in stream_text(self.model, self.tokenizer, self.prompt(), self.sampling):
                pieces.append(piece)
                yield piece
        except ValueError:
            self.messages.pop()  # e.g. text the tokenizer cannot encode: forget the turn, keep the history
            raise
        finally:
            # Also when the caller stops reading early (Ctrl-C): the turns keep alternating.
            if self.messages and self.messages[-1]["role"] == "user":
                self.messages.append({"role": "assistant", "content": "".join(pieces).strip()})

    def prompt(self) -> str:
        """The history (ending in the user's turn) rendered for the reply; oldest exchanges dropped to fit."""
        n_ctx = self.model.config.n_positions
        budget = n_ctx - min(self.sampling.max_new_tokens, n_ctx // 2)
        system: list[Message] = [{"role": "system", "content": self.system}] if self.system else []
        while True:
            text = render_chat(system + self.messages, self.template)
            if len(self.messages) <= 1 or len(self.tokenizer.encode(text)) <= budget:
                return text
            self.messages = self.messages[2:]
