"""OpenAI's protocol without a server: the strict request models, the one error mapping, the parser.

The refusals are the HTTP tests' own table (tests/test_serve.py's BAD_REQUESTS): every case with a JSON
body is refused here, by the models or by the parser, with the status and parameter the server answers.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("pydantic")

from pydantic import ValidationError  # noqa: E402

from scratchgpt.config import ServeLimits  # noqa: E402
from scratchgpt.inference.openai_api import (  # noqa: E402
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    RequestParser,
    api_error,
    param_name,
)
from test_serve import BAD_REQUESTS, MODEL  # noqa: E402

N_CTX = 64  # the served test model's context


@pytest.fixture(scope="module")
def parser(gpt2_tokenizer):
    return RequestParser(gpt2_tokenizer, MODEL, N_CTX, "alpaca", ServeLimits())


def _refusal(parser: RequestParser, path: str, body: object) -> APIError:
    """The APIError the server answers `body` on `path` with: from the model's validation, else the parser's."""
    model, resolve = ((ChatCompletionRequest, parser.chat) if path.endswith("/chat/completions")
                      else (CompletionRequest, parser.completion))
    try:
        request = model.model_validate(body)
    except ValidationError as e:
        return api_error(e.errors())
    with pytest.raises(APIError) as refused:
        resolve(request)
    return refused.value


# A JSON body, and not one refused for its size alone (before anything parses it).
JSON_CASES = {name: case for name, case in BAD_REQUESTS.items() if "json" in case[1] and case[2] != 413}


@pytest.mark.parametrize("name", list(JSON_CASES))
def test_every_refusal_of_the_http_tests_is_made_by_the_models_or_the_parser(parser, name):
    path, kwargs, status, param = JSON_CASES[name]
    error = _refusal(parser, path, kwargs["json"])
    assert (error.status, error.param) == (status, param), error.message
    assert error.message and "\n" not in error.message


def test_the_cases_cover_what_the_hardening_refused():
    kinds = " ".join(JSON_CASES)
    for kind in ("unknown", "as text", "empty list", "mixes", "stream_options", "not an object"):
        assert kind in kinds, kind
    assert len(JSON_CASES) >= 45


@pytest.mark.parametrize("body,param,fragment", [
    ({"model": MODEL, "prompt": "a", "max_token": 3}, "max_token", "Unrecognized request argument supplied: max_token"),
    ({"model": MODEL, "prompt": "a", "max_tokens": "10"}, "max_tokens", "must be an integer, got a string"),
    ({"model": MODEL, "prompt": "a", "max_tokens": True}, "max_tokens", "must be an integer, got a boolean"),
    ({"prompt": "a"}, "model", "you must provide the `model` parameter"),
    ({"model": None, "prompt": "a"}, "model", "you must provide the `model` parameter"),  # null is the default
    ({"model": MODEL, "prompt": 5}, "prompt", "must be a string, an array of strings, an array of token ids"),
    ({"model": MODEL, "prompt": ["a", [1]]}, "prompt", "one kind per array"),
    ({"model": MODEL, "prompt": "a", "temperature": 5}, "temperature", "it must lie in [0.0, 2.0]"),
    ({"model": MODEL, "prompt": "a", "logprobs": 2}, "logprobs", "this server cannot honour it"),
    ({"model": MODEL, "prompt": "a", "stream_options": {"include_usage": True}}, "stream_options",
     "only allowed when `stream` is true"),
    ({"model": MODEL, "prompt": "a", "stream": True, "stream_options": {"extra": 1}}, "stream_options.extra",
     "Unrecognized request argument supplied in `stream_options`: extra"),
    ({"model": MODEL, "prompt": "a", "stop": ""}, "stop", "non-empty strings"),
])
def test_errors_name_the_parameter_and_say_what_was_wrong(body, param, fragment):
    with pytest.raises(ValidationError) as refused:
        CompletionRequest.model_validate(body)
    error = api_error(refused.value.errors())
    assert error.status == 400 and error.param == param
    assert fragment in error.message, error.message


def test_nested_errors_name_the_full_path():
    body = {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "text", "text": "hi", "cache": 1}]}]}
    with pytest.raises(ValidationError) as refused:
        ChatCompletionRequest.model_validate(body)
    assert api_error(refused.value.errors()).param == "messages[0].content[0].cache"
    assert param_name(["messages", 0, "content", 1, "text"]) == "messages[0].content[1].text"
    # FastAPI puts "body" first; the mapping drops it.
    assert api_error([{"type": "missing", "loc": ("body", "model"), "msg": "Field required"}]).param == "model"
    body_error = api_error([{"type": "model_type", "loc": ("body",), "msg": "x", "input": [1, 2]}])
    assert body_error.param is None and body_error.message == "the request body must be an object, got an array"


def test_unsupported_values_are_400s_with_openais_code():
    for field, value in [("tools", [{"type": "function"}]), ("response_format", {"type": "json_object"}),
                         ("presence_penalty", 0.5), ("logit_bias", {"50256": -100}), ("modalities", ["audio"]),
                         ("tool_choice", "required"), ("moderation", {"model": "omni-moderation-latest"})]:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], field: value}
        with pytest.raises(ValidationError) as refused:
            ChatCompletionRequest.model_validate(body)
        error = api_error(refused.value.errors())
        assert (error.param, error.code) == (field, "unsupported_parameter"), field


def test_a_message_name_and_every_default_openai_sends_are_accepted(parser):
    messages = [{"role": "developer", "content": "Be brief.", "name": "rules"},
                {"role": "user", "content": [{"type": "text", "text": "hi", "prompt_cache_breakpoint": {}}],
                 "name": "alice"}]
    body = {
        "model": MODEL, "messages": messages, "max_completion_tokens": 3, "n": 2, "seed": 1, "user": "u",
        "logprobs": False, "top_logprobs": 0, "logit_bias": {}, "presence_penalty": 0, "frequency_penalty": 0.0,
        "response_format": {"type": "text"}, "tools": [], "tool_choice": "none", "parallel_tool_calls": False,
        "modalities": ["text"], "metadata": {"k": "v"}, "store": False, "service_tier": "auto",
        "reasoning_effort": "low", "verbosity": "low", "safety_identifier": "s", "prompt_cache_key": "k",
        "prediction": {"type": "content", "content": "x"}, "stream": True,
        "stream_options": {"include_usage": True, "include_obfuscation": False},
    }
    request = parser.chat(ChatCompletionRequest.model_validate(body))
    assert (request.n, request.seed, request.include_usage) == (2, 1, True)
    assert request.samplings[0].max_new_tokens == 3
    # The name is not rendered: the same prompt as without it.
    plain = [{k: v for k, v in m.items() if k != "name"} for m in messages]
    plain[1]["content"] = "hi"
    assert request.prompts == parser.chat(ChatCompletionRequest.model_validate(
        {"model": MODEL, "messages": plain})).prompts


def test_every_field_of_the_official_clients_requests_is_known():
    """The installed `openai` package's request types list OpenAI's documented fields: all are accepted."""
    openai = pytest.importorskip("openai")
    from openai.types import completion_create_params
    from openai.types.chat import completion_create_params as chat_params

    for ours, theirs in ((CompletionRequest, completion_create_params.CompletionCreateParamsBase),
                         (ChatCompletionRequest, chat_params.CompletionCreateParamsBase)):
        missing = set(theirs.__annotations__) - set(ours.model_fields)
        assert not missing, (openai.__version__, ours.__name__, missing)


def test_temperature_below_1e_4_is_greedy_over_http_as_everywhere(parser):
    for value, greedy in ((0, True), (5e-5, True), (1e-4, False), (2, False)):
        request = parser.completion(CompletionRequest.model_validate({"model": MODEL, "prompt": "a",
                                                                      "temperature": value}))
        assert request.samplings[0].greedy is greedy, value


def test_lone_surrogates_are_strings_like_any_other(parser):
    body = json.loads('{"model": "tiny", "prompt": "a\\ud800", "echo": true}')
    request = parser.completion(CompletionRequest.model_validate(body))
    assert request.echo == ("a\ud800",)
    # As a key it cannot even be named (pydantic refuses the key itself): still a 400, never a 500.
    with pytest.raises(ValidationError) as refused:
        CompletionRequest.model_validate({"model": MODEL, "prompt": "a", "x\ud800": 1})
    assert api_error(refused.value.errors()).status == 400
