"""OpenAI's HTTP protocol for /v1/completions and /v1/chat/completions: shapes, errors, streaming.

    requests   `CompletionRequest`, `ChatCompletionRequest`: pydantic models in strict mode (exact JSON
               types, unknown keys refused); every documented OpenAI field is accepted, used where it
               means something here, ignored where it cannot change the text, refused (400) at a
               value this server cannot honour (docs/serving.md lists which is which)
    errors     `APIError` (status + OpenAI's error object) and `api_error`, the one mapping from
               pydantic's validation errors to it
    parsing    `RequestParser`: a validated request against the served model (its name, context,
               vocabulary, chat template) -> `GenerationRequest`: token prompts and how to sample each
    replies    response and chunk models, the non-streaming answer and the server-sent events

Nothing here knows FastAPI; `serve` routes requests through these.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Literal

from annotated_types import MaxLen, MinLen
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_serializer,
)
from pydantic_core import PydanticCustomError

from scratchgpt.config import ChatTemplateName, SamplingConfig, ServeLimits
from scratchgpt.data.chat import (
    TOKENIZER_TEMPLATE,
    Message,
    encode_chat,
    render_chat,
    stop_strings,
)
from scratchgpt.inference.batching import Job

MAX_STOP_STRINGS = 4  # OpenAI's limit
DEFAULT_MAX_TOKENS = 16  # completions, as OpenAI's
DEFAULT_CHAT_MAX_TOKENS = 256  # chat: an answer, not the rest of the context
# developer is OpenAI's newer name for system.
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


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


def json_bytes(data: Any) -> bytes:
    """Every JSON body the server writes. ASCII-only: a lone UTF-16 surrogate from a client (legal in
    JSON text, not encodable as UTF-8) is written as the escape `\\ud800` instead of failing."""
    return json.dumps(data, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def sse(data: Any) -> str:
    """One server-sent event carrying `data` as JSON."""
    return f"data: {json_bytes(data).decode('ascii')}\n\n"


SSE_DONE = "data: [DONE]\n\n"  # OpenAI's end of a stream


# =============================================================================================
# Requests
# =============================================================================================


def json_type(value: Any) -> str:
    """What `value` is, in JSON's words: "a string", "a number", "null" ..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return {str: "a string", list: "an array", dict: "an object"}.get(type(value), type(value).__name__)


def _is_token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _honoured(*values: Any, why: str = "") -> AfterValidator:
    """A documented OpenAI field this server takes only at a value it can honour: null or one of `values`."""

    def check(value: Any) -> Any:
        if value is not None and value not in values:
            raise PydanticCustomError("unsupported_parameter", "this server cannot honour it{why}", {"why": why})
        return value

    return AfterValidator(check)


def _sampling_rule(value: float, info: ValidationInfo) -> float:
    """A sampling parameter's one rule, the one Python and the CLI apply: SamplingConfig's own check
    (for temperature: config.check_temperature's range; below 1e-4 is greedy, config.is_greedy)."""
    try:
        SamplingConfig(**{info.field_name: value})
    except ValueError as e:
        raise PydanticCustomError("out_of_range", "{reason}", {"reason": str(e)}) from None
    return value


_SAMPLING = AfterValidator(_sampling_rule)


def _one_or_many(what: str, one: Callable[[str], Any] = lambda text: text) -> BeforeValidator:
    """A field OpenAI lets be one string or an array: the string becomes an array of one, `[one(text)]`."""

    def shape(value: Any) -> Any:
        if isinstance(value, str):
            return [one(value)]
        if value is not None and not isinstance(value, list):
            raise PydanticCustomError("invalid_type", "must be {what}, got {got}",
                                      {"what": what, "got": json_type(value)})
        return value

    return BeforeValidator(shape)


_PROMPT_KINDS = "a string, an array of strings, an array of token ids or an array of arrays of token ids"


def _one_kind_of_prompt(value: Any) -> Any:
    """`prompt` as an array of one kind: all strings, or all non-empty arrays of token ids.

    A string or an array of token ids alone is one prompt. Pydantic's union errors would name every
    branch it tried, so the shape is decided here, with one error for any other."""
    if value is None:
        return value  # -> "you must provide the `prompt` parameter"
    if isinstance(value, str) or (isinstance(value, list) and value and all(map(_is_token_id, value))):
        return [value]
    if not isinstance(value, list):
        raise PydanticCustomError("invalid_type", "must be {what}, got {got}",
                                  {"what": _PROMPT_KINDS, "got": json_type(value)})
    if not value:
        raise PydanticCustomError("invalid_value", "must not be an empty array")
    if all(isinstance(p, str) for p in value) or all(
            isinstance(p, list) and p and all(map(_is_token_id, p)) for p in value):
        return value
    raise PydanticCustomError("invalid_type", "must be {what}; one kind per array, and no empty array of token ids",
                              {"what": _PROMPT_KINDS})


def _non_empty_strings(stop: list[str]) -> list[str]:
    if not all(stop):
        raise PydanticCustomError("invalid_value", "must be up to {most} non-empty strings", {"most": MAX_STOP_STRINGS})
    return stop


def _text_parts_only(kind: str) -> str:
    if kind != "text":
        raise PydanticCustomError("unsupported_parameter", "only text parts are supported by this text model")
    return kind


class _Request(BaseModel):
    """A request object as OpenAI's API defines it: exact JSON types, no unknown keys; null is the default."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, allow_inf_nan=False)


class ContentPart(_Request):
    """One part of a message's content; a text model reads text parts only."""

    type: Annotated[str, AfterValidator(_text_parts_only)]
    text: str
    prompt_cache_breakpoint: dict[str, Any] | None = None  # ignored: a hint for OpenAI's prompt cache


class ChatMessage(_Request):
    """One message of a conversation: system / developer, user or assistant (no tool messages: no tools)."""

    role: Literal["system", "developer", "user", "assistant"]
    # Required for every role: an assistant message may leave it out only beside tool calls, refused here.
    content: Annotated[list[ContentPart], MinLen(1),
                       _one_or_many("a string or an array of text parts", lambda text: {"type": "text", "text": text})]
    name: str | None = None  # ignored: the chat templates have no speaker names
    refusal: Annotated[str | None, _honoured(why=" (send the assistant's text as content)")] = None
    audio: Annotated[dict[str, Any] | None, _honoured(why=" (text only)")] = None
    tool_calls: Annotated[list[dict[str, Any]] | None, _honoured([], why=" (no tools)")] = None
    function_call: Annotated[dict[str, Any] | None, _honoured(why=" (no tools)")] = None

    @property
    def text(self) -> str:
        return "\n".join(part.text for part in self.content)


class StreamOptions(_Request):
    include_usage: bool | None = None
    include_obfuscation: bool | None = None  # ignored: no padding is added to stream events


class _GenerationRequest(_Request):
    """The fields both endpoints share, with the sampling extensions `top_k`, `min_p`, `repetition_penalty`."""

    model: str
    max_tokens: Annotated[int, Field(ge=1)] | None = None  # at most the context: checked by RequestParser
    temperature: Annotated[float, _SAMPLING] | None = None
    top_p: Annotated[float, _SAMPLING] | None = None
    top_k: Annotated[int, _SAMPLING] | None = None
    min_p: Annotated[float, _SAMPLING] | None = None
    # A server bound inside SamplingConfig's (0, inf): its inverse multiplies logits, so a penalty near
    # 0 would overflow them to inf.
    repetition_penalty: Annotated[float, Field(ge=0.01, le=10.0), _SAMPLING] | None = None
    stop: Annotated[
        list[str], _one_or_many(f"a string or an array of up to {MAX_STOP_STRINGS} strings"),
        MaxLen(MAX_STOP_STRINGS), AfterValidator(_non_empty_strings),
    ] | None = None
    seed: Annotated[int, Field(ge=-(2**63), le=2**63 - 1)] | None = None
    n: Annotated[int, Field(ge=1)] | None = None  # at most max_choices: checked by RequestParser
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    presence_penalty: Annotated[float | None, _honoured(0)] = None
    frequency_penalty: Annotated[float | None, _honoured(0)] = None
    logit_bias: Annotated[dict[str, int] | None, _honoured({})] = None
    user: str | None = None  # ignored: an end-user id for OpenAI's abuse monitoring

    @field_validator("stream_options")
    @classmethod
    def _stream_options_need_stream(cls, options: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        # `stream` is declared first, so it is in info.data unless it was itself wrong (an error already).
        if options is not None and "stream" in info.data and info.data["stream"] is not True:
            raise PydanticCustomError("invalid_value", "is only allowed when `stream` is true")
        return options


class CompletionRequest(_GenerationRequest):
    """A /v1/completions body."""

    prompt: Annotated[list[str] | list[list[int]], BeforeValidator(_one_kind_of_prompt)]
    echo: bool | None = None
    best_of: Annotated[int, Field(ge=1)] | None = None  # must equal n: checked by RequestParser
    suffix: Annotated[str | None, _honoured("")] = None
    logprobs: Annotated[int | None, _honoured(0)] = None


class ChatCompletionRequest(_GenerationRequest):
    """A /v1/chat/completions body."""

    messages: Annotated[list[ChatMessage], MinLen(1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None  # OpenAI's newer max_tokens; it wins
    logprobs: Annotated[bool | None, _honoured(False)] = None
    top_logprobs: Annotated[int | None, _honoured(0)] = None
    response_format: Annotated[dict[str, Any] | None, _honoured({"type": "text"}, why=" (text only)")] = None
    tools: Annotated[list[dict[str, Any]] | None, _honoured([], why=" (no tools)")] = None
    tool_choice: Annotated[Any, _honoured("none", "auto", why=" (no tools)")] = None
    functions: Annotated[list[dict[str, Any]] | None, _honoured([], why=" (no tools)")] = None
    function_call: Annotated[Any, _honoured("none", "auto", why=" (no tools)")] = None
    audio: Annotated[dict[str, Any] | None, _honoured(why=" (text only)")] = None
    modalities: Annotated[list[str] | None, _honoured(["text"], why=" (text only)")] = None
    moderation: Annotated[dict[str, Any] | None, _honoured(why=" (no moderation model)")] = None
    web_search_options: Annotated[dict[str, Any] | None, _honoured(why=" (no web search)")] = None
    # Accepted and ignored: they cannot change the text this model writes.
    parallel_tool_calls: bool | None = None
    prediction: dict[str, Any] | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_options: dict[str, Any] | None = None
    prompt_cache_retention: str | None = None


# pydantic's names for "wrong JSON type", in the words of the error message
_TYPE_NAMES = {
    "int_type": "an integer", "int_from_float": "an integer", "float_type": "a number", "string_type": "a string",
    "bool_type": "a boolean", "list_type": "an array", "dict_type": "an object", "model_type": "an object",
    "model_attributes_type": "an object", "finite_number": "a finite number",
}


def param_name(loc: Sequence[str | int]) -> str:
    """A validation error's location as OpenAI names parameters: `messages[0].content[1].text`."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def api_error(errors: Sequence[Mapping[str, Any]]) -> APIError:
    """pydantic's validation errors (the first one) as OpenAI's 400 naming the parameter (the one mapping)."""
    error = errors[0] if errors else {"type": "value_error", "loc": (), "msg": "invalid request"}
    kind, got, loc = error["type"], error.get("input"), list(error.get("loc", ()))
    if loc[:1] == ["body"]:  # FastAPI's prefix for the request body
        loc = loc[1:]
    if kind == "json_invalid":
        reason = (error.get("ctx") or {}).get("error", "invalid JSON")
        return APIError(400, f"We could not parse the JSON body of your request ({reason}). The body must be a "
                        "JSON object (Content-Type: application/json).")
    param = param_name(loc) or None
    what = f"`{param}`" if param else "the request body"
    if kind == "extra_forbidden":
        where = f" in `{param_name(loc[:-1])}`" if len(loc) > 1 else ""
        return APIError(400, f"Unrecognized request argument supplied{where}: {loc[-1]}", param=param)
    if kind == "missing" or (got is None and kind in _TYPE_NAMES):  # JSON null is "the default": none here
        return APIError(400, f"you must provide {'the ' + what + ' parameter' if param else 'a JSON object'}",
                        param=param, code="missing_required_parameter")
    if kind in _TYPE_NAMES:
        return APIError(400, f"{what} must be {_TYPE_NAMES[kind]}, got {json_type(got)}", param=param)
    shown = f"={got!r}" if isinstance(got, (int, float, str)) and len(repr(got)) <= 40 else ""
    code = "unsupported_parameter" if kind == "unsupported_parameter" else None
    return APIError(400, f"{what}{shown}: {error['msg']}", param=param, code=code)


# =============================================================================================
# Parsing: a validated request against the served model
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


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Ids of client text, always as ordinary text: `<|endoftext|>` typed by a client is 13 characters.

    One rule for both endpoints, so no client text can forge the special token (in chat it would end
    a turn the template did not end); a client that wants it sends token ids (completions).
    """
    return tokenizer.encode_ordinary(text)


def chat_unavailable_reason(tokenizer: Any, template: ChatTemplateName) -> str | None:
    """Why this tokenizer cannot encode `template`'s chat prompts (e.g. a character-level alphabet
    without its markup characters, or a chat template that fails to render), or None when it can."""
    sample = [Message(role=role, content="a") for role in ("system", "user", "assistant", "user")]
    try:
        if template == TOKENIZER_TEMPLATE:
            # A template without a system role still chats: only requests with a system message fail.
            encode_chat(sample[1:], template, tokenizer, encode_text=tokenizer.encode_ordinary)
        else:
            encode_text(tokenizer, render_chat(sample, template) + "".join(stop_strings(template)))
    except ValueError as e:
        return f"the {template!r} chat template cannot be encoded by this checkpoint's tokenizer ({e})"
    return None


@dataclass(frozen=True)
class RequestParser:
    """Turns validated requests into `GenerationRequest`s for one served model: what the schema cannot
    know (the model's name, context length, vocabulary and chat template, the server's limits)."""

    tokenizer: Any
    model_name: str
    n_ctx: int
    chat_template: ChatTemplateName
    limits: ServeLimits
    chat_disabled: str | None = None  # why /v1/chat/completions cannot work with this checkpoint
    chat_stop: tuple[str, ...] = ()  # what ends a chat reply (the template's markers), computed once

    def completion(self, request: CompletionRequest) -> GenerationRequest:
        """A /v1/completions request, tokenized and checked against the model."""
        self._check_model(request.model)
        texts, prompts = self._prompts(request.prompt)
        n = self._n(request.n, n_prompts=len(prompts))
        if request.best_of is not None and request.best_of != n:
            raise APIError(400, "`best_of` must equal `n` (this server does not rank candidates)", param="best_of")
        return self._request(request, prompts, n=n, chat=False, max_tokens=request.max_tokens,
                             max_tokens_param="max_tokens", default_max=DEFAULT_MAX_TOKENS, extra_stop=(),
                             echo=tuple(texts) if request.echo else None)

    def chat(self, request: ChatCompletionRequest) -> GenerationRequest:
        """A /v1/chat/completions request: the conversation rendered with the chat template and tokenized."""
        self._check_model(request.model)
        if self.chat_disabled:
            raise APIError(400, f"chat is not available on this server: {self.chat_disabled}; use /v1/completions",
                           code="chat_not_supported")
        messages = [Message(role=_ROLES[m.role], content=m.text) for m in request.messages]
        try:
            ids = encode_chat(messages, self.chat_template, self.tokenizer,
                              encode_text=lambda text: encode_text(self.tokenizer, text))
        except ValueError as e:
            raise APIError(400, f"messages: {e}", param="messages") from None
        self._check_length(ids, param="messages")
        n = self._n(request.n, n_prompts=1)
        # The newer name wins; OpenAI deprecated max_tokens for chat.
        newer = request.max_completion_tokens is not None
        return self._request(request, [ids], n=n, chat=True,
                             max_tokens=request.max_completion_tokens if newer else request.max_tokens,
                             max_tokens_param="max_completion_tokens" if newer else "max_tokens",
                             default_max=DEFAULT_CHAT_MAX_TOKENS, extra_stop=self.chat_stop)

    # -- pieces -----------------------------------------------------------------------------------

    def _check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(404, f"The model `{name}` does not exist; this server serves `{self.model_name}`",
                           param="model", code="model_not_found")

    def _n(self, n: int | None, *, n_prompts: int) -> int:
        most = self.limits.max_choices // n_prompts
        if n is not None and n > most:
            raise APIError(400, f"`n`={n} is too large; the maximum is {most} for {n_prompts} prompt(s) (at most "
                           f"{self.limits.max_choices} choices per request)", param="n")
        return 1 if n is None else n

    def _prompts(self, prompt: list[str] | list[list[int]]) -> tuple[list[str], list[list[int]]]:
        """(texts, token ids) of each prompt (the schema made `prompt` an array of one kind)."""
        if len(prompt) > self.limits.max_choices:
            raise APIError(400, f"at most {self.limits.max_choices} prompts per request", param="prompt")
        texts, prompts = [], []
        for p in prompt:
            if isinstance(p, str):
                try:
                    ids = encode_text(self.tokenizer, p)
                except ValueError as e:  # e.g. a character outside a char-level alphabet
                    raise APIError(400, f"prompt: {e}", param="prompt") from None
                texts.append(p)
                # An empty prompt starts a new document, as GPT-2 was trained.
                ids = ids or [self.tokenizer.eot_id]
            else:
                if any(not 0 <= t < self.tokenizer.vocab_size for t in p):
                    raise APIError(400, f"`prompt` holds a token id outside [0, {self.tokenizer.vocab_size})",
                                   param="prompt")
                ids = list(p)
                texts.append(self.tokenizer.decode(ids))
            self._check_length(ids, param="prompt")
            prompts.append(ids)
        return texts, prompts

    def _check_length(self, ids: Sequence[int], *, param: str) -> None:
        if len(ids) > self.n_ctx - 1:
            raise APIError(
                400, f"This model's maximum context length is {self.n_ctx} tokens, but the {param} has "
                f"{len(ids)} tokens; at most {self.n_ctx - 1} leave room for an answer",
                param=param, code="context_length_exceeded",
            )

    def _request(self, request: _GenerationRequest, prompts: list[list[int]], *, n: int, chat: bool,
                 max_tokens: int | None, max_tokens_param: str, default_max: int, extra_stop: Sequence[str],
                 echo: tuple[str, ...] | None = None) -> GenerationRequest:
        if max_tokens is not None and max_tokens > self.n_ctx:
            raise APIError(400, f"`{max_tokens_param}`={max_tokens} is too large; the maximum is {self.n_ctx} (the "
                           "model's context length)", param=max_tokens_param)
        # The schema checked every value with SamplingConfig's rules; None keeps SamplingConfig's default.
        chosen = {name: value for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
                  if (value := getattr(request, name)) is not None}
        # The answer ends where the context does: a prompt of P tokens leaves n_ctx - P for it.
        samplings = tuple(
            SamplingConfig(max_new_tokens=min(max_tokens or default_max, self.n_ctx - len(p)),
                           stop=(*(request.stop or ()), *extra_stop), seed=request.seed, **chosen)
            for p in prompts
        )
        options = request.stream_options
        return GenerationRequest(chat=chat, prompts=tuple(map(tuple, prompts)), samplings=samplings, n=n,
                                 seed=request.seed, stream=bool(request.stream),
                                 include_usage=bool(options and options.include_usage), echo=echo)


# =============================================================================================
# Replies: the response body, or its chunks as server-sent events
# =============================================================================================

FinishReason = Literal["stop", "length"]


class _Reply(BaseModel):
    """What the server writes; fields named in `omit_if_none` are left out rather than written as null."""

    omit_if_none: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _omit_nulls(self, handler: Callable[[Any], dict[str, Any]]) -> dict[str, Any]:
        data = handler(self)
        for name in self.omit_if_none:
            if data.get(name) is None:
                data.pop(name, None)
        return data


class Usage(_Reply):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(_Reply):
    index: int
    text: str
    logprobs: None = None
    finish_reason: FinishReason | None = None


class AssistantMessage(_Reply):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(_Reply):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: FinishReason | None = None


class ChatDelta(_Reply):
    """A streamed piece of the assistant's message: the role first, then content; {} in the last chunk."""

    omit_if_none = ("role", "content")
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(_Reply):
    index: int
    delta: ChatDelta
    logprobs: None = None
    finish_reason: FinishReason | None = None


class _Response(_Reply):
    """The fields of every answer and chunk, in OpenAI's order; each kind narrows `object` and `choices`."""

    omit_if_none = ("usage",)  # a stream's chunks carry no usage, except the last one when asked for
    id: str
    object: str
    created: int
    model: str
    choices: list[Any]
    usage: Usage | None = None


class CompletionResponse(_Response):
    """A /v1/completions answer, and (with one choice and no usage) each streamed chunk of it."""

    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]


class ChatCompletionResponse(_Response):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]


class ChatCompletionChunk(_Response):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]


@dataclass
class Reply:
    """One response being written: its id and time, and its body or chunks."""

    req: GenerationRequest
    model_name: str
    id: str = field(init=False)
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.id = f"{'chatcmpl' if self.req.chat else 'cmpl'}-{uuid.uuid4().hex}"

    def usage(self, completion_tokens: int) -> Usage:
        prompt_tokens = sum(len(p) for p in self.req.prompts)  # once per prompt, whatever n
        return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                     total_tokens=prompt_tokens + completion_tokens)

    def echo(self, index: int) -> str:
        return self.req.echo[index // self.req.n] if self.req.echo else ""

    def body(self, texts: Sequence[str], finish: Sequence[FinishReason], completion_tokens: int) -> dict[str, Any]:
        """The non-streaming response: every choice's whole text."""
        head = dict(id=self.id, created=self.created, model=self.model_name, usage=self.usage(completion_tokens))
        if self.req.chat:
            choices = [ChatChoice(index=i, message=AssistantMessage(content=t), finish_reason=f)
                       for i, (t, f) in enumerate(zip(texts, finish, strict=True))]
            return ChatCompletionResponse(**head, choices=choices).model_dump()
        return CompletionResponse(**head, choices=[CompletionChoice(index=i, text=t, finish_reason=f) for i, (t, f)
                                                   in enumerate(zip(texts, finish, strict=True))]).model_dump()

    def chunk(self, index: int, text: str | None, finish: FinishReason | None = None, *, first: bool = False) -> str:
        """One streamed event for choice `index`: new text, or (text None) its finish reason."""
        head = dict(id=self.id, created=self.created, model=self.model_name)
        if self.req.chat:
            delta = ChatDelta(role="assistant", content="") if first else ChatDelta(content=text)
            choice = ChatChunkChoice(index=index, delta=delta, finish_reason=finish)
            return sse(ChatCompletionChunk(**head, choices=[choice]).model_dump())
        choice = CompletionChoice(index=index, text=text or "", finish_reason=finish)
        return sse(CompletionResponse(**head, choices=[choice]).model_dump())

    def usage_chunk(self, completion_tokens: int) -> str:
        """The last event of a stream asked for usage (`stream_options.include_usage`): no choices."""
        chunk = ChatCompletionChunk if self.req.chat else CompletionResponse
        return sse(chunk(id=self.id, created=self.created, model=self.model_name, choices=[],
                         usage=self.usage(completion_tokens)).model_dump())


async def answer(reply: Reply, job: Job) -> dict[str, Any]:
    """Wait for every choice and build the non-streaming response body."""
    n = reply.req.n_choices
    texts: list[list[str]] = [[reply.echo(i)] for i in range(n)]
    finish: list[Any] = [None] * n
    tokens = [0] * n
    while any(f is None for f in finish):
        ev = await job.next_event()
        if ev.error:
            raise APIError(ev.status, ev.error, kind="server_error", code=ev.code)
        texts[ev.index].append(ev.text)
        if ev.finish_reason:
            finish[ev.index], tokens[ev.index] = ev.finish_reason, ev.completion_tokens
    return reply.body(["".join(t) for t in texts], finish, sum(tokens))


async def stream(reply: Reply, job: Job, release: Callable[[], None]) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`; `release()` at the end."""
    try:
        n = reply.req.n_choices
        for i in range(n):
            if reply.req.chat:
                yield reply.chunk(i, "", first=True)
            elif reply.echo(i):
                yield reply.chunk(i, reply.echo(i))
        done, tokens = 0, 0
        while done < n:
            ev = await job.next_event()
            if ev.error:  # e.g. the server is shutting down: say so, then end the stream properly
                yield sse(APIError(ev.status, ev.error, kind="server_error", code=ev.code).body())
                break
            if ev.text:
                yield reply.chunk(ev.index, ev.text)
            if ev.finish_reason:
                done, tokens = done + 1, tokens + ev.completion_tokens
                yield reply.chunk(ev.index, None, ev.finish_reason)
        else:
            if reply.req.include_usage:
                yield reply.usage_chunk(tokens)
        yield SSE_DONE
    finally:
        release()  # also when the client disconnects: Starlette cancels this generator
