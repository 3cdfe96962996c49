"""HTTP serving: an OpenAI-compatible API and a chat page over one model, batching concurrent requests.

    scratchgpt serve --checkpoint runs/sft      # then open http://127.0.0.1:8000/

Four layers, top to bottom of this file:
  parsing    JSON body -> `GenerationRequest`; every client mistake is an `APIError` (4xx) naming its field
  decoding   `DecodeBatch`: rows join and leave one KV-cached batch between decode steps
  scheduling `Scheduler`: one thread owns the model, gathers queued rows, streams events to requests
  HTTP       `create_app` (FastAPI) and `serve` (uvicorn); both are imported lazily (the `serve` extra)

Each row samples with its own `torch.Generator` and sits right-aligned in the shared cache with the
columns to its left masked out, so its text does not depend on what else is being decoded.
"""

# No `from __future__ import annotations` here: FastAPI reads the handlers' annotations (`request:
# Request`) at runtime, and the handlers live inside create_app where fastapi is imported.

import asyncio
import hmac
import ipaddress
import json
import logging
import os
import re
import secrets
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Collection, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from scratchgpt.config import (
    API_KEY_ENV,
    DEFAULT_HOST,
    DEFAULT_PORT,
    SamplingConfig,
    ServeLimits,
    check_temperature,
)
from scratchgpt.data.chat import (
    TOKENIZER_TEMPLATE,
    ChatTemplateName,
    Message,
    check_chat_template,
    default_chat_template,
    encode_chat,
    render_chat,
    stop_strings,
)
from scratchgpt.device import resolve_device
from scratchgpt.inference.generate import (
    Completion,
    choose_decode_path,
    decode_one_token,
    left_pad,
    prefill,
    sample_rows,
)
from scratchgpt.model.gpt import GPT, KVCache

if TYPE_CHECKING:
    from fastapi import FastAPI

logger = logging.getLogger(__name__)

MAX_STOP_STRINGS = 4  # OpenAI's limit
# The chat page's script and style (static/), with their media types; the page loads them from /static/.
_PAGE_ASSETS = {"chat.css": "text/css", "chat.js": "text/javascript"}
# The page and its files hold no data; health checks rarely carry keys.
_OPEN_PATHS = frozenset({"/", "/health", *(f"/static/{name}" for name in _PAGE_ASSETS)})
# Sent with every response. An API answer is JSON that loads and embeds nothing, and no response may be
# framed by another site's page (clickjacking) or sniffed into another type; the page has its own CSP.
_SECURITY_HEADERS = (
    (b"content-security-policy", b"default-src 'none'; frame-ancestors 'none'"),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
)
# The chat page runs only its own script and style from this server (no inline code, so an injected
# <script> cannot run) and talks only to this server.
PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
            "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
_LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")


class APIError(Exception):
    """A request the server refuses: HTTP status plus OpenAI's error fields."""

    def __init__(
        self, status: int, message: str, *, kind: str = "invalid_request_error",
        param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        """The JSON error object OpenAI clients parse."""
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# =============================================================================================
# Parsing: JSON body -> GenerationRequest
# =============================================================================================


@dataclass(frozen=True)
class GenerationRequest:
    """A validated completion or chat request: token prompts and how to sample each."""

    chat: bool
    prompts: tuple[tuple[int, ...], ...]
    samplings: tuple[SamplingConfig, ...]  # one per prompt (max_new_tokens is clamped per prompt)
    n: int
    seed: int | None
    stream: bool
    include_usage: bool = False
    echo: tuple[str, ...] | None = None  # prompt texts to put before each completion (echo=true)

    @property
    def n_choices(self) -> int:
        return len(self.prompts) * self.n


def _is_token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return {str: "a string", list: "an array", dict: "an object"}.get(type(value), type(value).__name__)


class _Fields:
    """Typed access to a JSON object's fields; a wrong one raises a 400 APIError naming it.

    JSON null means "use the default", as in OpenAI's API.
    """

    def __init__(self, body: Any, known: Collection[str], *, path: str = ""):
        # `path` names a nested object (e.g. "messages[0]"); every object of a request, top level or
        # nested, goes through here, so unknown keys and wrong types are refused the same way everywhere.
        self.path = path
        if not isinstance(body, dict):
            what = f"`{path}`" if path else "the request body"
            raise APIError(400, f"{what} must be a JSON object, got {_json_type(body)}", param=path or None)
        for key in body:
            if key not in known:
                where = f" in `{path}`" if path else ""
                raise APIError(400, f"Unrecognized request argument supplied{where}: {key}", param=self.name(key))
        self.body = body

    def name(self, key: str) -> str:
        """The parameter's full name for error messages: `key`, or `path.key` inside a nested object."""
        return f"{self.path}.{key}" if self.path else key

    def get(self, name: str, types: type | tuple[type, ...], what: str, *, required: bool = False) -> Any:
        value = self.body.get(name)
        full = self.name(name)
        if value is None:
            if required:
                raise APIError(400, f"you must provide the `{full}` parameter", param=full,
                               code="missing_required_parameter")
            return None
        types = types if isinstance(types, tuple) else (types,)
        # bool is an int subclass in Python, but `true` is not a number in JSON.
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise APIError(400, f"`{full}` must be {what}, got {_json_type(value)}", param=full)
        return value

    def integer(self, name: str, *, default: int | None = None, lo: int | None = None, hi: int | None = None,
                hi_reason: str = "") -> int | None:
        value = self.get(name, int, "an integer")
        if value is None:
            return default
        if lo is not None and value < lo:
            raise APIError(400, f"`{name}`={value} is too small; the minimum is {lo}", param=name)
        if hi is not None and value > hi:
            raise APIError(400, f"`{name}`={value} is too large; the maximum is {hi}{hi_reason}", param=name)
        return value

    def number(self, name: str, *, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
        value = self.get(name, (int, float), "a number")
        if value is None:
            return default
        if not (lo < value if lo_open else lo <= value) or value > hi:
            interval = f"{'(' if lo_open else '['}{lo}, {hi}]"
            raise APIError(400, f"`{name}`={value} is out of range; it must lie in {interval}", param=name)
        return float(value)

    def checked(self, name: str, check: Callable[[str, str, float], None], *, default: float) -> float:
        """A number that a config rule accepts (`check(owner, name, value)` raises ValueError); else a 400."""
        value = self.get(name, (int, float), "a number")
        if value is None:
            return default
        try:
            check("request", self.name(name), value)
        except ValueError as e:
            raise APIError(400, str(e), param=self.name(name)) from None
        return float(value)

    def boolean(self, name: str, *, default: bool = False) -> bool:
        value = self.get(name, bool, "a boolean")
        return default if value is None else value

    def unsupported(self, name: str, *, allowed: Sequence[Any] = ()) -> None:
        """Refuse a known OpenAI field this server cannot honour, unless it asks for the default."""
        value = self.body.get(name)
        if value is not None and value not in allowed and value is not False:
            raise APIError(400, f"`{name}` is not supported by this server", param=name, code="unsupported_parameter")


_COMMON_FIELDS = frozenset({
    "model", "max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "stop", "seed",
    "n", "stream", "stream_options", "presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "user",
})
_COMPLETION_FIELDS = _COMMON_FIELDS | {"prompt", "echo", "best_of", "suffix"}
_CHAT_FIELDS = _COMMON_FIELDS | {
    "messages", "max_completion_tokens", "top_logprobs", "response_format", "tools", "tool_choice",
    "parallel_tool_calls",
}
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_MESSAGE_FIELDS = frozenset({"role", "content"})
_CONTENT_PART_FIELDS = frozenset({"type", "text"})
_STREAM_OPTION_FIELDS = frozenset({"include_usage"})
DEFAULT_MAX_TOKENS = 16  # completions, as OpenAI's
DEFAULT_CHAT_MAX_TOKENS = 256  # chat: an answer, not the rest of the context


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Ids of client text, always as ordinary text: `<|endoftext|>` typed by a client is 13 characters.

    One rule for both endpoints, so no client text can forge the special token (in chat it would end
    a turn the template did not end); a client that wants it sends token ids (completions).
    """
    return tokenizer._encode_ordinary(text)


def chat_unavailable_reason(tokenizer: Any, template: ChatTemplateName) -> str | None:
    """Why this tokenizer cannot encode `template`'s chat prompts (e.g. a character-level alphabet
    without its markup characters, or a chat template that fails to render), or None when it can."""
    sample = [Message(role=role, content="a") for role in ("system", "user", "assistant", "user")]
    try:
        if template == TOKENIZER_TEMPLATE:
            # A template without a system role still chats: only requests with a system message fail.
            encode_chat(sample[1:], template, tokenizer, encode_text=tokenizer._encode_ordinary)
        else:
            encode_text(tokenizer, render_chat(sample, template) + "".join(stop_strings(template)))
    except ValueError as e:
        return f"the {template!r} chat template cannot be encoded by this checkpoint's tokenizer ({e})"
    return None


@dataclass(frozen=True)
class RequestParser:
    """Turns request bodies into `GenerationRequest`s for one served model."""

    tokenizer: Any
    model_name: str
    n_ctx: int
    chat_template: ChatTemplateName
    limits: ServeLimits
    chat_disabled: str | None = None  # why /v1/chat/completions cannot work with this checkpoint
    chat_stop: tuple[str, ...] = ()  # what ends a chat reply (the template's markers), computed once

    def completion(self, body: Any) -> GenerationRequest:
        """Validate a /v1/completions body."""
        f = _Fields(body, _COMPLETION_FIELDS)
        self._check_model(f)
        f.unsupported("suffix", allowed=("",))
        texts, prompts = self._prompts(f)
        n = self._n(f, n_prompts=len(prompts))
        if f.integer("best_of", default=n) != n:
            raise APIError(400, "`best_of` must equal `n` (this server does not rank candidates)", param="best_of")
        echo = f.boolean("echo")
        return self._request(f, prompts, n=n, chat=False, default_max=DEFAULT_MAX_TOKENS, extra_stop=(),
                             echo=tuple(texts) if echo else None)

    def chat(self, body: Any) -> GenerationRequest:
        """Validate a /v1/chat/completions body; the conversation is rendered with the chat template."""
        f = _Fields(body, _CHAT_FIELDS)
        self._check_model(f)
        for name in ("top_logprobs", "tools"):
            f.unsupported(name, allowed=(0, []))
        f.unsupported("tool_choice", allowed=("none", "auto"))
        f.unsupported("response_format", allowed=({"type": "text"},))
        messages = self._messages(f.get("messages", list, "an array of messages", required=True))
        if self.chat_disabled:
            raise APIError(400, f"chat is not available on this server: {self.chat_disabled}; use /v1/completions",
                           code="chat_not_supported")
        try:
            ids = encode_chat(messages, self.chat_template, self.tokenizer,
                              encode_text=lambda text: encode_text(self.tokenizer, text))
        except ValueError as e:
            raise APIError(400, f"messages: {e}", param="messages") from None
        self._check_length(ids, param="messages")
        n = self._n(f, n_prompts=1)
        # The newer name wins; OpenAI deprecated max_tokens for chat.
        limit = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        return self._request(f, [ids], n=n, chat=True, default_max=DEFAULT_CHAT_MAX_TOKENS, max_tokens_param=limit,
                             extra_stop=self.chat_stop)

    # -- pieces -----------------------------------------------------------------------------------

    def _check_model(self, f: _Fields) -> None:
        name = f.get("model", str, "a string", required=True)
        if name != self.model_name:
            raise APIError(404, f"The model `{name}` does not exist; this server serves `{self.model_name}`",
                           param="model", code="model_not_found")

    def _n(self, f: _Fields, *, n_prompts: int) -> int:
        most = self.limits.max_choices // n_prompts
        return f.integer("n", default=1, lo=1, hi=most, hi_reason=f" for {n_prompts} prompt(s) "
                         f"(at most {self.limits.max_choices} choices per request)")

    def _prompts(self, f: _Fields) -> tuple[list[str], list[list[int]]]:
        """(texts, token ids) of `prompt`: a string, strings, token ids, or lists of token ids.

        A list holds one kind only: all strings, all token ids, or all non-empty lists of token ids.
        """
        what = "a string, an array of strings, an array of token ids or an array of arrays of token ids"
        prompt = f.get("prompt", (str, list), what, required=True)
        if isinstance(prompt, str) or (prompt and all(_is_token_id(t) for t in prompt)):
            prompt = [prompt]
        if not prompt:
            raise APIError(400, "`prompt` must not be an empty array", param="prompt")
        if len(prompt) > self.limits.max_choices:
            raise APIError(400, f"at most {self.limits.max_choices} prompts per request", param="prompt")
        if not (all(isinstance(p, str) for p in prompt) or all(isinstance(p, list) for p in prompt)):
            raise APIError(400, f"`prompt` must be {what}; do not mix kinds in one array", param="prompt")
        texts, prompts = [], []
        for i, p in enumerate(prompt):
            if isinstance(p, str):
                try:
                    ids = encode_text(self.tokenizer, p)
                except ValueError as e:  # e.g. a character outside a char-level alphabet
                    raise APIError(400, f"prompt: {e}", param="prompt") from None
                texts.append(p)
                # An empty prompt starts a new document, as GPT-2 was trained.
                ids = ids or [self.tokenizer.eot_id]
            else:
                if not p or not all(_is_token_id(t) for t in p):
                    raise APIError(400, f"`prompt[{i}]` must be a non-empty array of token ids", param="prompt")
                if any(not 0 <= t < self.tokenizer.vocab_size for t in p):
                    raise APIError(400, f"`prompt` holds a token id outside [0, {self.tokenizer.vocab_size})",
                                   param="prompt")
                ids = list(p)
                texts.append(self.tokenizer.decode(ids))
            self._check_length(ids, param="prompt")
            prompts.append(ids)
        return texts, prompts

    def _messages(self, raw: list[Any]) -> list[Message]:
        messages: list[Message] = []
        for i, m in enumerate(raw):
            path = f"messages[{i}]"
            fields = _Fields(m, _MESSAGE_FIELDS, path=path)
            role = fields.get("role", str, f"one of {sorted(_ROLES)}", required=True)
            if role not in _ROLES:
                raise APIError(400, f"`{path}.role` must be one of {sorted(_ROLES)}, got {role!r}",
                               param=f"{path}.role")
            content = fields.get("content", (str, list), "a string or an array of text parts", required=True)
            if isinstance(content, list):
                # The content-parts form: only text parts mean something to a text model.
                if not content:
                    raise APIError(400, f"`{path}.content` must not be an empty array", param=f"{path}.content")
                texts = []
                for j, part in enumerate(content):
                    part_fields = _Fields(part, _CONTENT_PART_FIELDS, path=f"{path}.content[{j}]")
                    if part_fields.get("type", str, "a string", required=True) != "text":
                        raise APIError(400, f"`{path}.content[{j}].type`: only text parts are supported",
                                       param=f"{path}.content[{j}].type")
                    texts.append(part_fields.get("text", str, "a string", required=True))
                content = "\n".join(texts)
            messages.append(Message(role=_ROLES[role], content=content))
        return messages

    def _check_length(self, ids: Sequence[int], *, param: str) -> None:
        if len(ids) > self.n_ctx - 1:
            raise APIError(
                400, f"This model's maximum context length is {self.n_ctx} tokens, but the {param} has "
                f"{len(ids)} tokens; at most {self.n_ctx - 1} leave room for an answer",
                param=param, code="context_length_exceeded",
            )

    def _request(self, f: _Fields, prompts: list[list[int]], *, n: int, chat: bool, default_max: int,
                 extra_stop: Sequence[str], echo: tuple[str, ...] | None = None,
                 max_tokens_param: str = "max_tokens") -> GenerationRequest:
        for name in ("presence_penalty", "frequency_penalty"):
            f.unsupported(name, allowed=(0, 0.0))
        f.unsupported("logit_bias", allowed=({},))
        f.unsupported("logprobs", allowed=(0,))
        f.get("user", str, "a string")
        max_tokens = f.integer(max_tokens_param, default=default_max, lo=1, hi=self.n_ctx,
                               hi_reason=" (the model's context length)")
        stop = f.get("stop", (str, list), "a string or an array of strings")
        stop = [stop] if isinstance(stop, str) else (stop or [])
        if len(stop) > MAX_STOP_STRINGS or not all(isinstance(s, str) and s for s in stop):
            raise APIError(400, f"`stop` must be up to {MAX_STOP_STRINGS} non-empty strings", param="stop")
        seed = f.integer("seed", lo=-(2**63), hi=2**63 - 1)
        stream = f.boolean("stream")
        options = _Fields(f.get("stream_options", dict, "an object") or {}, _STREAM_OPTION_FIELDS,
                          path="stream_options")
        include_usage = options.boolean("include_usage")
        if options.body and not stream:
            raise APIError(400, "`stream_options` is only allowed when `stream` is true", param="stream_options")
        base = dict(
            # The range and "below 1e-4 is greedy" are the same as in Python and the CLI: config's rule.
            temperature=f.checked("temperature", check_temperature, default=1.0),
            top_p=f.number("top_p", default=1.0, lo=0.0, hi=1.0, lo_open=True),
            top_k=f.integer("top_k", lo=1),
            min_p=f.number("min_p", default=0.0, lo=0.0, hi=1.0),
            # Its inverse multiplies logits, so a penalty near 0 would overflow them to inf.
            repetition_penalty=f.number("repetition_penalty", default=1.0, lo=0.01, hi=10.0),
            stop=(*stop, *extra_stop),
            seed=seed,
        )
        try:
            # The answer ends where the context does: a prompt of P tokens leaves n_ctx - P for it.
            samplings = tuple(
                SamplingConfig(max_new_tokens=min(max_tokens, self.n_ctx - len(p)), **base)
                for p in prompts
            )
        except ValueError as e:  # the checks above should catch everything; never answer 500 for it
            raise APIError(400, str(e)) from None
        return GenerationRequest(chat=chat, prompts=tuple(map(tuple, prompts)), samplings=samplings, n=n,
                                 seed=seed, stream=stream, include_usage=include_usage, echo=echo)


# =============================================================================================
# Decoding: rows join and leave one KV-cached batch between steps
# =============================================================================================


@dataclass(frozen=True)
class Event:
    """What one choice produced in one step: new text, and on its last step why it ended."""

    index: int
    text: str = ""
    finish_reason: str | None = None  # "stop" or "length"
    completion_tokens: int = 0  # tokens sampled so far (set on the last event)
    error: str | None = None  # the server failed this request
    status: int = 500  # the HTTP status of `error` (503 when the server is shutting down)
    code: str | None = None  # OpenAI's error code of `error`


# A streaming client this many events behind is not reading (its socket's send buffer is full):
# its request gets no new rows until it catches up.
MAX_BACKLOG = 256


class Job:
    """One HTTP request being served: its rows, and the asyncio queue their events land in."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.rows: list[Row] = []
        # Set from the event loop, read by the scheduler thread: plain values are enough under the GIL.
        self.released = False
        self.consumed = 0  # events the response has taken (event loop)
        self.emitted = 0  # events handed over (scheduler thread)
        self.waiting: deque[Row] = deque()  # rows not yet admitted (scheduler, under its lock)
        self.decoding = 0  # rows in the batch now (scheduler thread)
        self.seq = 0  # arrival order (scheduler)

    def emit(self, event: Event) -> None:
        """Hand an event to the request's event loop (called from the scheduler thread)."""
        self.emitted += 1
        with suppress(RuntimeError):  # the loop has closed: nobody is waiting for this request any more
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    async def next_event(self) -> Event:
        event = await self.events.get()
        self.consumed += 1
        return event

    @property
    def backlogged(self) -> bool:
        return self.emitted - self.consumed > MAX_BACKLOG


@dataclass(eq=False)
class Row:
    """One choice to generate: prompt, sampling settings and RNG, and its decode state."""

    job: Job
    index: int  # the choice's index in the response
    prompt: list[int]
    sampling: SamplingConfig
    generator: torch.Generator
    completion: Completion | None = None  # tokens sampled so far, released text, finish reason

    @property
    def tokens(self) -> list[int]:
        return self.completion.tokens if self.completion is not None else []

    @property
    def context(self) -> list[int]:
        """What a fresh prefill of this row reads: its prompt plus the tokens sampled so far (a row
        paused mid-answer resumes from here)."""
        return self.prompt + self.tokens

    def columns_needed(self, cached: int) -> int:
        """Cache columns this row may still add when `cached` of its tokens are in the cache."""
        # The last token is sampled but never fed back, so a row occupies prompt + max_new - 1 columns.
        return len(self.prompt) + self.sampling.max_new_tokens - 1 - cached


class DecodeBatch:
    """Rows decoded together with one KV cache; rows may join or leave between decode steps.

    Row r's `lens[r]` real tokens sit right-aligned in cache columns [S - lens[r], S); columns to their
    left are masked out, and positions count real tokens only, so every row computes what it would
    alone. Membership changes rebuild the cache compactly (S = the longest row).
    """

    def __init__(self, model: GPT, tokenizer: Any):
        self.model = model
        self.tokenizer = tokenizer
        self.n_ctx = model.config.n_positions
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.rows: list[Row] = []
        self.lens: list[int] = []
        self.cache: KVCache | None = None
        self.logits: Tensor | None = None  # (B, V): each row's next-token logits

    def __len__(self) -> int:
        return len(self.rows)

    def fits(self, new: Sequence[Row]) -> bool:
        """Whether `new` rows can join now with no row ever needing more than n_ctx cache columns."""
        lens = self.lens + [len(r.context) for r in new]
        need = [r.columns_needed(n) for r, n in zip(self.rows + list(new), lens, strict=True)]
        return max(lens) + max(need) <= self.n_ctx

    @torch.inference_mode()
    def add(self, rows: Sequence[Row]) -> None:
        """Prefill `rows` as one left-padded batch and merge them into the running batch.

        A row that was decoding before (paused, then dropped) is prefilled with its prompt and answer
        so far, and carries on from there."""
        ids, mask, positions = left_pad([r.context for r in rows], device=self.device)
        padded = bool((mask == 0).any())
        cache = KVCache.empty(self.model.config, batch_size=len(rows), max_len=ids.size(1), device=self.device,
                              dtype=self.dtype)
        logits = prefill(self.model, ids, cache, mask=mask if padded else None,
                         positions=positions if padded else None)
        lens = [len(r.context) for r in rows]  # before any new completion: a fresh row has no tokens yet
        for r in rows:
            if r.completion is None:
                r.completion = Completion(r.sampling, tokenizer=self.tokenizer, eot_id=self.tokenizer.eot_id)
        self._rebuild(list(range(len(self.rows))), new=(list(rows), cache, logits, lens))

    def drop(self, gone: Callable[[Row], bool]) -> list[Row]:
        """Remove the rows for which `gone(row)` is true (e.g. their client disconnected); returns them."""
        keep = [i for i, r in enumerate(self.rows) if not gone(r)]
        dropped = [r for r in self.rows if gone(r)]
        if dropped:
            self._rebuild(keep)
        return dropped

    def clear(self) -> list[Row]:
        """Drop every row (after an error); returns them."""
        rows = self.rows
        self.rows, self.lens, self.cache, self.logits = [], [], None, None
        return rows

    @torch.inference_mode()
    def step(self) -> list[tuple[Row, str, str | None]]:
        """Sample one token per row, retire finished rows, feed the rest: [(row, new text, finish)]."""
        out = [(row, *self._advance(row, token)) for row, token in zip(self.rows, self._sample(), strict=True)]
        live = [i for i, (_, _, finish) in enumerate(out) if finish is None]
        if len(live) < len(self.rows):
            self._rebuild(live)
        if self.rows:
            fed = torch.tensor([[r.tokens[-1]] for r in self.rows], device=self.device)  # (B, 1)
            positions = torch.tensor([[n] for n in self.lens], device=self.device)  # (B, 1)
            self.logits = decode_one_token(self.model, fed, self.cache, positions=positions)
            self.lens = [n + 1 for n in self.lens]
        return out

    # -- internals --------------------------------------------------------------------------------

    def _sample(self) -> list[int]:
        rows = self.rows
        return sample_rows(
            self.logits, [r.sampling for r in rows], [r.generator for r in rows],
            history=lambda i: torch.tensor(rows[i].prompt + rows[i].tokens, device=self.device),
        ).tolist()

    def _advance(self, row: Row, token: int) -> tuple[str, str | None]:
        """Record `token` for `row`: its newly safe text and finish reason (the rules of generate.Completion)."""
        assert row.completion is not None
        text = row.completion.push(token)
        return text, row.completion.finish_reason

    @torch.inference_mode()
    def _rebuild(self, keep: list[int], new: tuple[list[Row], KVCache, Tensor, list[int]] | None = None) -> None:
        """A fresh cache with the kept rows (+ new ones, with their lengths) right-aligned and dead
        columns dropped."""
        new_rows, new_cache, new_logits, new_lens = new if new is not None else ([], None, None, [])
        rows = [self.rows[i] for i in keep] + new_rows
        lens = [self.lens[i] for i in keep] + new_lens
        if not rows:
            self.clear()
            return
        sources = []  # (cache, its rows to copy, their logits)
        if keep:
            sources.append((self.cache, keep, self.logits))
        if new_cache is not None:
            sources.append((new_cache, list(range(new_cache.batch_size)), new_logits))
        S = max(lens)
        # Room for every row to finish: no row ever needs the cache to grow before the next rebuild.
        capacity = S + max(r.columns_needed(n) for r, n in zip(rows, lens, strict=True))
        L, _, nh, _, hs = sources[0][0].k.shape
        # Zeros, not empty: masked columns still enter softmax(QK^T)V as 0 x value, and 0 x NaN = NaN.
        k = torch.zeros(L, len(rows), nh, capacity, hs, device=self.device, dtype=self.dtype)  # (L, B, nh, cap, hs)
        v = torch.zeros_like(k)
        logits, first = [], 0
        for cache, index, part in sources:
            idx = torch.tensor(index, device=self.device)
            w = min(S, cache.length)  # each of these rows has its real tokens in the source's last w columns
            end = first + len(index)
            k[:, first:end, :, S - w : S] = cache.k[:, idx, :, cache.length - w : cache.length]
            v[:, first:end, :, S - w : S] = cache.v[:, idx, :, cache.length - w : cache.length]
            logits.append(part[idx])
            first = end
        if all(n == S for n in lens):
            key_valid = None  # no padding anywhere: the model takes its plain causal path
        else:
            cols = torch.arange(capacity, device=self.device)
            key_valid = cols[None, :] >= (S - torch.tensor(lens, device=self.device))[:, None]  # (B, cap)
        self.cache = KVCache(k, v, length=S, key_valid=key_valid)
        self.logits = torch.cat(logits)  # (B, V)
        self.rows, self.lens = rows, lens


# =============================================================================================
# Scheduling: one thread owns the model
# =============================================================================================


class Scheduler:
    """Owns the model on one background thread: queues rows, batches them, streams events back.

    Between decode steps it drops rows whose request went away and admits waiting rows fairly: each
    free slot goes to the request with the fewest rows decoding (the earliest on a tie), so one
    request with many choices cannot make a small one wait behind all of them; a request whose
    client is not reading its stream is paused: its rows leave the batch (keeping their answer so
    far) until it catches up. An idle server first waits `batch_window_ms` so requests arriving
    together start together.
    """

    def __init__(self, model: GPT, tokenizer: Any, *, limits: ServeLimits):
        self.batch = DecodeBatch(model, tokenizer)
        self.limits = limits
        self._waiting: list[Job] = []  # jobs with rows not yet admitted, in arrival order
        self._cond = threading.Condition()
        self._jobs = 0
        self._seq = 0
        self._closed = False
        self._drain_deadline: float | None = None  # set when shutting down: stop decoding at this time
        self._thread: threading.Thread | None = None
        self.tokens_generated = 0  # every token sampled since start

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="scratchgpt-scheduler", daemon=True)
        self._thread.start()

    def drain(self, grace_s: float) -> None:
        """Begin shutting down: refuse new requests; those in flight may finish within `grace_s`
        seconds, then each ends with an error event. Safe to call from a signal handler's thread."""
        with self._cond:
            if self._drain_deadline is None:
                self._drain_deadline = time.monotonic() + grace_s
            self._cond.notify()

    def close(self) -> None:
        """Stop the thread; requests still queued or running get an error event."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self._fail_all("the server is shutting down", status=503)

    def submit(self, job: Job) -> None:
        """Queue a job's rows, or refuse it with 503 when `max_requests` are already in flight."""
        with self._cond:
            if self._closed or self._drain_deadline is not None:
                raise APIError(503, "the server is shutting down", kind="server_error", code="server_shutting_down")
            if self._jobs >= self.limits.max_requests:
                raise APIError(503, f"the server is busy ({self._jobs} requests in flight); retry shortly",
                               kind="server_error", code="server_overloaded", headers={"Retry-After": "1"})
            self._jobs += 1
            self._seq += 1
            job.seq = self._seq
            job.waiting.extend(job.rows)
            self._waiting.append(job)
            self._cond.notify()

    def release(self, job: Job) -> None:
        """Forget `job` (answered or abandoned): its slot frees now, its rows stop at the next step."""
        with self._cond:
            if not job.released:
                job.released = True
                self._jobs -= 1

    def stats(self) -> dict[str, int]:
        with self._cond:
            return {"requests_in_flight": self._jobs, "rows_waiting": sum(len(j.waiting) for j in self._waiting),
                    "rows_decoding": len(self.batch), "tokens_generated": self.tokens_generated}

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self._waiting and not self.batch:
                    self._cond.wait(timeout=None if self._drain_deadline is None else 0.1)
                if self._closed:
                    return
                idle = not self.batch
                overdue = self._drain_deadline is not None and time.monotonic() > self._drain_deadline
            if overdue:
                self._fail_all("the server is shutting down", status=503)
                continue
            if idle and self.limits.batch_window_ms:
                time.sleep(self.limits.batch_window_ms / 1000)  # let requests that arrive together gather
            try:
                self._admit()
                for row in self.batch.drop(lambda r: r.job.released):
                    row.job.decoding -= 1
                self._pause_unread()
                if self.batch:
                    self._step()
                else:
                    with self._cond:  # only backlogged or abandoned jobs wait: do not spin
                        self._cond.wait(timeout=0.01)
            except Exception:  # a bug or out of memory: fail these requests, keep serving others
                logger.exception("decoding failed")
                for row in self._clear_batch():
                    row.job.emit(Event(row.index, error="the server failed while generating; see its log"))

    def _pause_unread(self) -> None:
        """Take the rows of requests whose client is not reading out of the batch; they wait (with
        their answer so far) until it catches up, and their slots go to others meanwhile."""
        paused = self.batch.drop(lambda r: r.job.backlogged)
        if not paused:
            return
        with self._cond:
            for row in reversed(paused):  # back at the front of their request's queue, in order
                row.job.decoding -= 1
                row.job.waiting.appendleft(row)
                if row.job not in self._waiting:
                    self._waiting.append(row.job)

    def _fail_all(self, message: str, *, status: int, code: str | None = "server_shutting_down") -> None:
        with self._cond:
            rows = [row for job in self._waiting for row in job.waiting]
            for job in self._waiting:
                job.waiting.clear()
            self._waiting.clear()
        for row in rows + self._clear_batch():
            row.job.emit(Event(row.index, error=message, status=status, code=code))

    def _clear_batch(self) -> list[Row]:
        rows = self.batch.clear()
        for row in rows:
            row.job.decoding = 0
        return rows

    def _admit(self) -> None:
        with self._cond:
            self._waiting = [j for j in self._waiting if j.waiting and not j.released]
            rows: list[Row] = []
            while len(self.batch) + len(rows) < self.limits.max_batch_size:
                ready = [j for j in self._waiting if j.waiting and not j.backlogged]
                if not ready:
                    break
                job = min(ready, key=lambda j: (j.decoding, j.seq))  # the fewest rows decoding goes first
                if not self.batch.fits([*rows, job.waiting[0]]):
                    break  # it waits until the batch has room in the context; nobody overtakes it
                rows.append(job.waiting.popleft())
                job.decoding += 1
        if rows:
            try:
                self.batch.add(rows)
            except Exception:
                logger.exception("prefill failed")
                for row in rows:
                    row.job.decoding -= 1
                    row.job.emit(Event(row.index, error="the server failed while reading the prompt; see its log"))

    def _step(self) -> None:
        produced = self.batch.step()
        with self._cond:
            self.tokens_generated += len(produced)
        for row, text, finish in produced:
            if finish:
                row.job.decoding -= 1
            if text or finish:
                row.job.emit(Event(row.index, text, finish, completion_tokens=len(row.tokens)))


def job_rows(job: Job, req: GenerationRequest, device: torch.device | str) -> list[Row]:
    """The request's choices as rows: prompt i, copy j is choice i * n + j, seeded seed + index."""
    rows = []
    for i, (prompt, sampling) in enumerate(zip(req.prompts, req.samplings, strict=True)):
        for j in range(req.n):
            index = i * req.n + j
            # Without a seed, draw one: never touch the global RNG another thread might use.
            seed = (req.seed + index) % 2**64 if req.seed is not None else secrets.randbits(63)
            rows.append(Row(job, index, list(prompt), sampling, torch.Generator(device=device).manual_seed(seed)))
    return rows


# =============================================================================================
# HTTP: responses, streaming, middleware, the app
# =============================================================================================


def _json_bytes(data: Any) -> bytes:
    """Every JSON body the server writes. ASCII-only: a lone UTF-16 surrogate from a client (legal in
    JSON text, not encodable as UTF-8) is written as the escape `\\ud800` instead of failing."""
    return json.dumps(data, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def _sse(data: Any) -> str:
    return f"data: {_json_bytes(data).decode('ascii')}\n\n"


@dataclass
class _Reply:
    """Shared fields of one response and helpers to build its choices and chunks."""

    req: GenerationRequest
    model_name: str
    id: str = field(init=False)
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.id = f"{'chatcmpl' if self.req.chat else 'cmpl'}-{uuid.uuid4().hex}"

    def head(self, chunk: bool) -> dict[str, Any]:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.req.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model_name}

    def choice(self, index: int, text: str | None, finish: str | None, *, chunk: bool) -> dict[str, Any]:
        out: dict[str, Any] = {"index": index}
        if not self.req.chat:
            out["text"] = text or ""
        elif chunk:
            out["delta"] = {"content": text} if text is not None else {}
        else:
            out["message"] = {"role": "assistant", "content": text or ""}
        out["logprobs"] = None
        out["finish_reason"] = finish
        return out

    def usage(self, completion_tokens: int) -> dict[str, int]:
        prompt_tokens = sum(len(p) for p in self.req.prompts)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    def echo(self, index: int) -> str:
        return self.req.echo[index // self.req.n] if self.req.echo else ""


async def _answer(reply: _Reply, job: Job) -> dict[str, Any]:
    """Wait for every choice and build the non-streaming response body."""
    n = reply.req.n_choices
    texts: list[list[str]] = [[reply.echo(i)] for i in range(n)]
    finish: list[str | None] = [None] * n
    tokens = [0] * n
    while any(f is None for f in finish):
        ev = await job.next_event()
        if ev.error:
            raise APIError(ev.status, ev.error, kind="server_error", code=ev.code)
        texts[ev.index].append(ev.text)
        if ev.finish_reason:
            finish[ev.index], tokens[ev.index] = ev.finish_reason, ev.completion_tokens
    choices = [reply.choice(i, "".join(texts[i]), finish[i], chunk=False) for i in range(n)]
    return {**reply.head(chunk=False), "choices": choices, "usage": reply.usage(sum(tokens))}


async def _stream(reply: _Reply, job: Job, release: Callable[[], None]) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`."""
    try:
        n = reply.req.n_choices
        for i in range(n):
            if reply.req.chat:
                first = reply.choice(i, "", None, chunk=True)
                first["delta"] = {"role": "assistant", "content": ""}
                yield _sse({**reply.head(chunk=True), "choices": [first]})
            elif reply.echo(i):
                yield _sse({**reply.head(chunk=True), "choices": [reply.choice(i, reply.echo(i), None, chunk=True)]})
        done, tokens = 0, 0
        while done < n:
            ev = await job.next_event()
            if ev.error:  # e.g. the server is shutting down: say so, then end the stream properly
                yield _sse(APIError(ev.status, ev.error, kind="server_error", code=ev.code).body())
                break
            if ev.text:
                yield _sse({**reply.head(chunk=True), "choices": [reply.choice(ev.index, ev.text, None, chunk=True)]})
            if ev.finish_reason:
                done, tokens = done + 1, tokens + ev.completion_tokens
                last = reply.choice(ev.index, None, ev.finish_reason, chunk=True)
                yield _sse({**reply.head(chunk=True), "choices": [last]})
        else:
            if reply.req.include_usage:
                yield _sse({**reply.head(chunk=True), "choices": [], "usage": reply.usage(tokens)})
        yield "data: [DONE]\n\n"
    finally:
        release()  # also when the client disconnects: Starlette cancels this generator


async def _disconnected(receive: Callable[[], Any]) -> None:
    """Return when the client hangs up (the body has already been read)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def _parse_json(raw: bytes) -> Any:
    def reject(constant: str) -> None:
        raise ValueError(f"{constant} is not valid JSON")

    try:
        return json.loads(raw, parse_constant=reject)
    except (ValueError, RecursionError) as e:  # RecursionError: absurdly deep nesting
        raise APIError(400, f"We could not parse the JSON body of your request ({e}). The body must be a "
                       "JSON object (Content-Type: application/json).") from None


# host[:port], the host a name or a bracketed IPv6 address; anything else (user info, paths) fails.
_HOST_HEADER = re.compile(r"(\[[0-9a-f:.]+\]|[a-z0-9._-]+)(?::[0-9]{1,5})?")


def _host_name(host: bytes) -> str | None:
    """The host of a Host header ("[::1]:8000" -> "[::1]"), or None when it is not host[:port]."""
    match = _HOST_HEADER.fullmatch(host.decode("latin-1").strip().lower())
    return match.group(1) if match else None


class _Guard:
    """ASGI middleware run before routing: Host check, API key, request body size, JSON content type."""

    def __init__(self, app: Any, *, api_key: str | None, max_body_bytes: int, allowed_hosts: Collection[str] | None,
                 read_timeout_s: float = 10.0):
        self.app = app
        self.api_key = api_key.encode() if api_key is not None else None
        self.max_body_bytes = max_body_bytes
        self.allowed_hosts = None if allowed_hosts is None else {h.lower() for h in allowed_hosts}
        self.read_timeout_s = read_timeout_s

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["method"] == "HEAD":
            # HEAD is GET without the body, for every GET route (the server, not the app, drops the body).
            scope = {**scope, "method": "GET"}
        headers = dict(scope["headers"])
        error = self._check_headers(scope["method"], scope["path"], headers)
        if error is not None:
            await _send_error(send, error)
            return
        # Read the whole (bounded) body here, so an oversized one is refused even without Content-Length.
        body = bytearray()
        deadline = time.monotonic() + self.read_timeout_s
        while True:
            try:
                message = await asyncio.wait_for(receive(), timeout=max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:  # a stalled body holds a connection for nothing (3.10: not the builtin)
                await _send_error(send, APIError(408, f"the request body did not arrive within "
                                                 f"{self.read_timeout_s:g} s", code="request_timeout",
                                                 headers={"Connection": "close"}))
                return
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > self.max_body_bytes:
                await _send_error(send, _too_large(self.max_body_bytes))
                return
            if not message.get("more_body"):
                break
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()  # afterwards: wait for the client to disconnect

        await self.app(scope, replay, send)

    def _check_headers(self, method: str, path: str, headers: dict[bytes, bytes]) -> APIError | None:
        # A page on another site can reach a loopback server through DNS rebinding; its Host gives it away.
        if self.allowed_hosts is not None and _host_name(headers.get(b"host", b"")) not in self.allowed_hosts:
            return APIError(400, "invalid Host header", code="invalid_host")
        if self.api_key is not None and path not in _OPEN_PATHS:
            given = headers.get(b"authorization", b"")
            scheme, _, token = given.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.api_key):
                what = "Incorrect API key provided" if given else "You didn't provide an API key"
                return APIError(401, f"{what}. Send it as the header 'Authorization: Bearer <key>'.",
                                code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_body_bytes:
            return _too_large(self.max_body_bytes)
        # Browsers send form and text bodies cross-site without asking; JSON needs a CORS preflight,
        # which this server never grants. So insisting on JSON keeps other sites' pages out.
        # A missing Content-Type counts as not JSON: that is what a cross-site "simple request" looks like.
        ctype = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        if method == "POST" and ctype != b"application/json":
            got = repr(ctype.decode("latin-1")) if ctype else "none"
            return APIError(415, f"Content-Type must be application/json, got {got}", code="unsupported_media_type")
        return None


def _too_large(limit: int) -> APIError:
    return APIError(413, f"the request body is larger than this server's limit of {limit} bytes",
                    code="request_too_large")


async def _send_error(send: Callable, error: APIError) -> None:
    payload = _json_bytes(error.body())
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in (error.headers or {}).items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


def _with_security_headers(send: Callable) -> Callable:
    """`send` that adds `_SECURITY_HEADERS` to a response's start, except those the response sets itself."""

    async def send_with_headers(message: dict) -> None:
        if message["type"] == "http.response.start":
            headers = list(message.get("headers", ()))
            present = {name.lower() for name, _ in headers}
            headers += [(name, value) for name, value in _SECURITY_HEADERS if name not in present]
            message = {**message, "headers": headers}
        await send(message)

    return send_with_headers


def create_app(
    model: GPT,
    tokenizer: Any,
    *,
    model_name: str,
    chat_template: ChatTemplateName | None = None,
    api_key: str | None = None,
    limits: ServeLimits | None = None,
    allowed_hosts: Collection[str] | None = None,
) -> "FastAPI":
    """The FastAPI app serving `model`: OpenAI-style /v1 endpoints, /health and the chat page at /.

    `chat_template` None: the tokenizer's own chat template when it has one, else Alpaca.
    `api_key` (if set) is required as a Bearer token on every endpoint except /health and the page (/ and
    its /static/ files).
    `allowed_hosts` (if set) restricts the Host header, e.g. to loopback names.
    """
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
    from starlette.background import BackgroundTask
    from starlette.exceptions import HTTPException

    chat_template = chat_template or default_chat_template(None, tokenizer)
    check_chat_template(chat_template, tokenizer)
    limits = limits or ServeLimits()
    model.eval()
    choose_decode_path(model)  # the faster CPU matrix-vector path for this machine (see model.gpt.Linear)
    device = next(model.parameters()).device
    chat_disabled = chat_unavailable_reason(tokenizer, chat_template)
    if chat_disabled:  # e.g. a character-level alphabet: say it once here, not in every request's error
        logger.warning("/v1/chat/completions is disabled: %s", chat_disabled)
    chat_stop = () if chat_disabled else stop_strings(chat_template, tokenizer=tokenizer)
    parser = RequestParser(tokenizer, model_name, model.config.n_positions, chat_template, limits,
                           chat_disabled=chat_disabled, chat_stop=chat_stop)
    scheduler = Scheduler(model, tokenizer, limits=limits)
    static = resources.files("scratchgpt.inference").joinpath("static")
    page = static.joinpath("chat.html").read_text(encoding="utf-8")
    assets = {name: static.joinpath(name).read_bytes() for name in _PAGE_ASSETS}
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        scheduler.start()
        try:
            yield
        finally:
            await asyncio.to_thread(scheduler.close)

    class SafeJSONResponse(JSONResponse):
        def render(self, content: Any) -> bytes:
            return _json_bytes(content)

    class App(FastAPI):
        async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
            # Around the whole app, Starlette's outermost error middleware included: its 500s get them too.
            await super().__call__(scope, receive, _with_security_headers(send) if scope["type"] == "http" else send)

    app = App(title="scratchgpt", lifespan=lifespan, default_response_class=SafeJSONResponse,
              docs_url=None, redoc_url=None, openapi_url=None)  # the docs pages would load a CDN
    app.state.scheduler, app.state.limits = scheduler, limits
    app.state.model_name, app.state.chat_template, app.state.chat_disabled = model_name, chat_template, chat_disabled
    app.add_middleware(_Guard, api_key=api_key, max_body_bytes=limits.max_body_bytes, allowed_hosts=allowed_hosts,
                       read_timeout_s=limits.read_timeout_s)

    def error_response(error: APIError) -> JSONResponse:
        return SafeJSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(APIError)
    async def on_api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
        return error_response(APIError(400, f"{param or 'request'}: {first.get('msg', 'invalid')}", param=param))

    @app.exception_handler(HTTPException)
    async def on_http_error(request: Request, exc: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                                       code=code, headers=exc.headers))

    @app.exception_handler(Exception)
    async def on_bug(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(APIError(500, "internal server error; see the server's log", kind="server_error"))

    def model_card() -> dict[str, Any]:
        return {"id": model_name, "object": "model", "created": started, "owned_by": "scratchgpt",
                "max_model_len": model.config.n_positions}

    @app.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page, headers={"Content-Security-Policy": PAGE_CSP})

    @app.get("/static/{name}", include_in_schema=False)
    async def page_asset(name: str) -> Response:
        if name not in assets:
            raise HTTPException(404, "Not Found")
        # no-cache: a browser checks again, so an upgraded server never runs an old script with a new page.
        return Response(assets[name], media_type=_PAGE_ASSETS[name], headers={"Cache-Control": "no-cache"})

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_name, "chat": chat_disabled is None, **scheduler.stats()}

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str) -> dict[str, Any]:
        if name != model_name:
            raise APIError(404, f"The model `{name}` does not exist", param="model", code="model_not_found")
        return model_card()

    async def generate(request: Request, parse: Callable[[Any], GenerationRequest]) -> Any:
        body = _parse_json(await request.body())
        req = await asyncio.to_thread(parse, body)  # tokenizing a long prompt should not stall the loop
        job = Job(asyncio.get_running_loop())
        job.rows = job_rows(job, req, device)
        scheduler.submit(job)
        reply = _Reply(req, model_name)

        def release() -> None:
            scheduler.release(job)

        if req.stream:
            # The generator releases the job when it ends or is cancelled by a disconnect; the
            # background task covers a client that left before the stream even started.
            return StreamingResponse(_stream(reply, job, release), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                     background=BackgroundTask(release))
        answer = asyncio.ensure_future(_answer(reply, job))
        hangup = asyncio.ensure_future(_disconnected(request.receive))
        try:
            await asyncio.wait({answer, hangup}, return_when=asyncio.FIRST_COMPLETED)
            if not answer.done():  # the client left: nobody will read an answer
                return Response(status_code=499)
            return SafeJSONResponse(answer.result())
        finally:
            answer.cancel()
            hangup.cancel()
            release()

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await generate(request, parser.completion)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await generate(request, parser.chat)

    return app


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_device(device: str) -> torch.device:
    """`device` ('auto' included) as a torch.device this machine has, or a one-line ValueError."""
    dev = resolve_device(device)  # the one rule for names, 'auto' and a missing CUDA
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device={device!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device={device!r}: MPS is not available here; use --device cpu")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device={device!r}: serving runs on cpu, cuda or mps")
    return dev


def resolve_api_key(api_key: str | None) -> str | None:
    """The key from `api_key`, else $SCRATCHGPT_API_KEY, else None (no key). An empty key is an error,
    whichever way it came: silently serving without authentication is never what that meant."""
    source = "--api-key"
    if api_key is None:
        api_key, source = os.environ.get(API_KEY_ENV), f"${API_KEY_ENV}"
    if api_key is not None and not api_key.strip():
        raise ValueError(f"{source} is empty; give a key, or unset it to serve without one (loopback only)")
    return api_key.strip() if api_key is not None else None


def bind_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port, or a one-line ValueError (port in use, unknown host, ...)."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"--port {port!r} must be an integer in [0, 65535]")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError) as e:
        raise ValueError(f"--host {host!r} is not an address of this machine ({e})") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: restart without waiting
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def _http_protocol(read_timeout_s: float) -> type:
    """uvicorn's h11 protocol plus what it lacks: a deadline for a request's head, and half-close.

    - A connection must deliver a complete request head within `read_timeout_s` of connecting or of
      starting its next request; silent or trickling sockets are closed (between requests uvicorn's
      keep-alive timeout applies).
    - A client that sends its whole request and then shuts down its sending side (`shutdown(SHUT_WR)`)
      still gets its whole answer. A shut-down side looks the same as a closed socket, so until the
      answer starts the server writes an interim `100 Continue` each second: a socket that is really
      closed answers it with a reset, and the request stops as for any disconnect. (HTTP/1.0 clients
      get no such probe; a non-streaming answer to one that really left is computed for nobody.)
    """
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        _read_timer: asyncio.TimerHandle | None = None
        _probe_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._watch_head()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._watch_head()

        def eof_received(self) -> bool | None:
            # h11 puts a client whose request was read to its end in DONE, or in MUST_CLOSE when that
            # request also ends the connection (`Connection: close`, any HTTP/1.0 request); both are owed
            # the whole answer, whatever the method and whether it streams.
            if (self.cycle is not None and not self.cycle.response_complete
                    and self.conn.their_state in (h11.DONE, h11.MUST_CLOSE)):
                self.cycle.keep_alive = False  # answer, then close
                if self.conn.their_http_version != b"1.0":  # HTTP/1.0 clients must get no 1xx (RFC 9110)
                    self._probe_timer = self.loop.call_later(1.0, self._probe)
                return True  # keep the sending side open
            # Nothing asked (an idle connection), or a request cut short (its head, or a body short of its
            # Content-Length or last chunk): returning None makes asyncio close the transport, and
            # connection_lost then marks the request disconnected, so the app's receive() gets
            # http.disconnect and the request ends unanswered, as for any other disconnect.
            return None

        def connection_lost(self, exc: Exception | None) -> None:
            for timer in (self._read_timer, self._probe_timer):
                if timer is not None:
                    timer.cancel()
            super().connection_lost(exc)

        def _awaiting_head(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def _watch_head(self) -> None:
            if not self._awaiting_head():
                if self._read_timer is not None:
                    self._read_timer.cancel()
                    self._read_timer = None
            elif self._read_timer is None:
                self._read_timer = self.loop.call_later(read_timeout_s, self._head_timed_out)

        def _head_timed_out(self) -> None:
            self._read_timer = None
            if self._awaiting_head() and not self.transport.is_closing():
                self.transport.close()

        def _probe(self) -> None:
            cycle = self.cycle
            if cycle is None or cycle.response_started or cycle.response_complete or self.transport.is_closing():
                return
            self.transport.write(self.conn.send(h11.InformationalResponse(status_code=100, headers=[],
                                                                          reason=b"Continue")))
            self._probe_timer = self.loop.call_later(1.0, self._probe)

    return Protocol


def make_server(app: "FastAPI", *, log_level: str = "info") -> Any:
    """A uvicorn.Server for `app` (from `create_app`) with its timeouts and a draining shutdown:
    on Ctrl+C or SIGTERM running requests get `shutdown_grace_s` to finish, then an error event."""
    import uvicorn

    limits: ServeLimits = app.state.limits
    scheduler: Scheduler = app.state.scheduler

    class Server(uvicorn.Server):
        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            scheduler.drain(limits.shutdown_grace_s)
            await super().shutdown(sockets)

    config = uvicorn.Config(
        app, log_level=log_level, http=_http_protocol(limits.read_timeout_s),
        timeout_keep_alive=5,
        # Longer than the drain, so every stream ends by itself with [DONE] before uvicorn would cancel it.
        timeout_graceful_shutdown=int(limits.shutdown_grace_s) + 5,
    )
    return Server(config)


def serve(
    checkpoint: str | Path,
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    api_key: str | None = None,
    model_name: str | None = None,
    chat_template: ChatTemplateName | None = None,
    device: str = "auto",
    limits: ServeLimits | None = None,
    log_level: str = "info",
    quantize: str | None = None,
    inference_dtype: str | None = None,
) -> None:
    """Load `checkpoint` and serve it with uvicorn until interrupted.

    The chat template: `chat_template`, else the checkpoint's config.json ("chat_template", written by
    fine-tuning), else the tokenizer's own (a Hugging Face folder's chat_template), else Alpaca; the API
    key from `api_key`, else $SCRATCHGPT_API_KEY, else none. Serving beyond loopback needs a key.
    Every mistake in the arguments is a one-line ValueError raised before anything is announced.
    """
    from scratchgpt.checkpoint import load_any, saved_chat_template

    api_key = resolve_api_key(api_key)
    loopback = _is_loopback(host)
    if not loopback and api_key is None:
        raise ValueError(f"--host {host} makes the server reachable from other machines: it needs an API key "
                         f"(--api-key KEY or ${API_KEY_ENV})")
    dev = check_device(device)
    sock = bind_socket(host, port)  # before loading: a port in use fails in a second, not after a load
    try:
        model, tokenizer = load_any(checkpoint, device=dev, quantize=quantize, inference_dtype=inference_dtype)
        chat_template = chat_template or saved_chat_template(checkpoint, tokenizer=tokenizer)
        name = model_name or Path(checkpoint).resolve().name or str(checkpoint)
        app = create_app(model, tokenizer, model_name=name, chat_template=chat_template, api_key=api_key,
                         limits=limits, allowed_hosts=_LOOPBACK_HOSTS if loopback else None)
        shown = f"[{host.strip('[]')}]" if ":" in host else host
        bound_port = sock.getsockname()[1]
        chat = ("chat disabled" if app.state.chat_disabled else "the model's own chat template"
                if chat_template == TOKENIZER_TEMPLATE else f"{chat_template} chat template")
        threads = f", {torch.get_num_threads()} CPU thread(s)" if dev.type == "cpu" else ""
        print(f"serving {name!r} ({chat}{threads}) on http://{shown}:{bound_port}/  (Ctrl+C to stop)", flush=True)
        make_server(app, log_level=log_level).run(sockets=[sock])
    finally:
        sock.close()
