"""A conversation with an instruction-tuned model: the history, rendered with its template, replies streamed.

Used by `scratchgpt chat`; it needs only generation, not the training stack.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

from scratchgpt.config import ChatTemplateName, SamplingConfig
from scratchgpt.data.chat import Message, check_chat_template, encode_chat, render_chat, stop_strings
from scratchgpt.data.tokenizers import Tokenizer
from scratchgpt.inference.generate import iter_generate
from scratchgpt.model.gpt import GPT


class ChatSession:
    """A conversation with an instruction-tuned model: the history, rendered with its template, replies streamed.

    `template` is "alpaca", "chatml" or "tokenizer" (the tokenizer's own chat template: each turn
    re-renders the whole conversation with it, and its end-of-turn tokens end a reply unseen).
    """

    def __init__(self, model: GPT, tokenizer: Tokenizer, *, template: ChatTemplateName, sampling: SamplingConfig,
                 system: str | None = None) -> None:
        check_chat_template(template, tokenizer)
        self.model, self.tokenizer, self.template, self.system = model, tokenizer, template, system
        # The template's turn markers end a reply, besides end-of-text and the user's own stop strings.
        stops = tuple(dict.fromkeys((*sampling.stop, *stop_strings(template, tokenizer=tokenizer))))
        self.sampling = dataclasses.replace(sampling, stop=stops)
        self.messages: list[Message] = []
        # Render once now, so a broken template or one that refuses the system message is one error
        # before the first turn rather than one per line.
        render_chat([*self._system(), {"role": "user", "content": "hi"}], template, tokenizer=tokenizer)

    def reset(self) -> None:
        """Forget the conversation (the system message stays)."""
        self.messages = []

    def reply(self, text: str) -> Iterator[str]:
        """Add the user's turn, stream the assistant's answer in pieces, and keep it in the history."""
        self.messages.append({"role": "user", "content": text})
        pieces: list[str] = []
        try:
            ids = self.prompt_ids()
            for steps in iter_generate(self.model, [ids], self.sampling, eot_id=self.tokenizer.eot_id,
                                       tokenizer=self.tokenizer):
                for s in steps:
                    if s.text:
                        pieces.append(s.text)
                        yield s.text
        except ValueError:
            self.messages.pop()  # e.g. text the tokenizer cannot encode: forget the turn, keep the history
            raise
        finally:
            # Also when the caller stops reading early (Ctrl-C): the turns keep alternating.
            if self.messages and self.messages[-1]["role"] == "user":
                self.messages.append({"role": "assistant", "content": "".join(pieces).strip()})

    def _system(self) -> list[Message]:
        return [{"role": "system", "content": self.system}] if self.system else []

    def _encode(self, messages: list[Message]) -> list[int]:
        # An empty prompt starts from end-of-text, the token GPT-2 saw between documents.
        return encode_chat(messages, self.template, self.tokenizer, encode_text=self.tokenizer.encode) or [
            self.tokenizer.eot_id]

    def prompt_ids(self) -> list[int]:
        """Token ids of the history (ending in the user's turn), ready for the reply; oldest exchanges
        dropped to fit the context."""
        n_ctx = self.model.config.n_positions
        budget = n_ctx - min(self.sampling.max_new_tokens, n_ctx // 2)
        while True:
            ids = self._encode(self._system() + self.messages)
            if len(self.messages) <= 1 or len(ids) <= budget:
                return ids
            self.messages = self.messages[2:]

    def prompt(self) -> str:
        """The history (ending in the user's turn) rendered for the reply; oldest exchanges dropped to fit."""
        self.prompt_ids()  # drops what does not fit
        return render_chat(self._system() + self.messages, self.template, tokenizer=self.tokenizer)
