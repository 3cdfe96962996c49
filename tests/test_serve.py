"""The HTTP server: a real uvicorn server on loopback, driven by the official `openai` client and httpx.

The served model is tiny (2 layers, 32 wide, 64-token context, GPT-2 tokenizer, random weights), so
its text is gibberish, but every text is checked against `generate` run directly on the same weights.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from scratchgpt import SamplingConfig
from scratchgpt.checkpoint import load_any
from scratchgpt.config import ServeLimits
from scratchgpt.data.chat import render_chat, stop_strings
from scratchgpt.inference.generate import generate, generate_text

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from scratchgpt.inference.openai_api import ChatCompletionRequest, CompletionRequest  # noqa: E402
from scratchgpt.inference.serve import create_app  # noqa: E402

MODEL = "tiny"
KEY = "test-key"
PROMPT = "The meaning of life is"


@pytest.fixture(scope="module")
def loaded(tiny_chat_checkpoint):
    return load_any(tiny_chat_checkpoint)


@pytest.fixture(scope="module")
def model(loaded):
    return loaded[0]


@pytest.fixture(scope="module")
def tok(loaded):
    return loaded[1]


@pytest.fixture(scope="module")
def server(loaded, start_server) -> str:
    model, tok = loaded
    # A window wide enough that requests fired together in a test share one batch.
    limits = ServeLimits(batch_window_ms=20)
    return start_server(create_app(model, tok, model_name=MODEL, chat_template="alpaca", api_key=KEY, limits=limits))


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=30)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server, headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as c:
        yield c


def greedy_ids(model, tok, prompt_ids, max_new):
    return generate(model, prompt_ids, SamplingConfig(max_new_tokens=max_new, temperature=0.0), eot_id=tok.eot_id)[0]


def assert_openai_error(response, status, *, param=None, code=None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str)
    if param is not None:
        assert error["param"] == param
    if code is not None:
        assert error["code"] == code


# ---------------------------------------------------------------------------------------------
# The happy paths, through the official client
# ---------------------------------------------------------------------------------------------


def test_models_and_health(client, http):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    health = http.get("/health").json()
    assert health["status"] == "ok" and health["model"] == MODEL


def test_greedy_completion_equals_generate(client, model, tok):
    ids = tok.encode(PROMPT)
    expected = greedy_ids(model, tok, ids, 10)
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0)
    assert r.object == "text_completion" and r.id.startswith("cmpl-") and r.model == MODEL
    assert isinstance(r.created, int)
    (choice,) = r.choices
    assert choice.index == 0 and choice.logprobs is None
    assert choice.text == tok.decode(expected)
    assert choice.finish_reason == "length"
    # Usage is exact: the prompt as the tokenizer encodes it, and every token sampled.
    assert r.usage.prompt_tokens == len(ids)
    assert r.usage.completion_tokens == 10
    assert r.usage.total_tokens == len(ids) + 10


def test_token_id_prompts_and_echo(client, model, tok):
    ids = tok.encode(PROMPT)
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=5, temperature=0, echo=True)
    assert r.choices[0].text == PROMPT + tok.decode(greedy_ids(model, tok, ids, 5))
    assert r.usage.prompt_tokens == len(ids)


def test_chat_uses_the_checkpoints_alpaca_template(client, model, tok):
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Name a colour."}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
    prompt = render_chat(messages, "alpaca")
    sampling = SamplingConfig(max_new_tokens=8, temperature=0.0, stop=stop_strings("alpaca"))
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    (choice,) = r.choices
    assert choice.message.role == "assistant"
    assert choice.message.content == generate_text(model, tok, prompt, sampling)
    assert r.usage.prompt_tokens == len(tok.encode(prompt))
    assert r.usage.completion_tokens == 8 or choice.finish_reason == "stop"


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_stream_concatenates_to_the_non_stream_text(client, temperature):
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=temperature, seed=7)
    whole = client.completions.create(**kw)
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    pieces = [c.choices[0].text for c in chunks if c.choices]
    assert len([p for p in pieces if p]) > 1  # it really arrived piece by piece
    assert "".join(pieces) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        whole.choices[0].finish_reason
    ]
    assert chunks[-1].usage.model_dump() == whole.usage.model_dump()
    assert {c.id for c in chunks} == {chunks[0].id}


def test_chat_stream_concatenates_to_the_non_stream_text(client):
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "Hi!"}], max_tokens=10, temperature=0.9, seed=3)
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True))
    assert chunks[0].object == "chat.completion.chunk"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_raw_stream_is_server_sent_events_ending_in_done(http):
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 3, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    assert all(e.startswith("data: ") for e in events[:-1])


def test_stop_strings(client):
    base = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=20, temperature=0).choices[0].text
    assert len(base) >= 10
    stop = base[6:9]
    expected = base[: base.index(stop)]
    for stop_arg in (stop, [stop, "never-appears"]):
        r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=20, temperature=0, stop=stop_arg)
        assert r.choices[0].text == expected
        assert r.choices[0].finish_reason == "stop"
        assert r.usage.completion_tokens < 20
    chunks = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=20, temperature=0, stop=stop,
                                       stream=True)
    assert "".join(c.choices[0].text for c in chunks) == expected


def test_seed_reproduces_alone_and_among_concurrent_requests(client):
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=1.0, seed=1234)
    alone = client.completions.create(**kw).choices[0].text
    assert client.completions.create(**kw).choices[0].text == alone
    assert client.completions.create(**{**kw, "seed": 99}).choices[0].text != alone

    # Six requests fired together share batches: prompts of other lengths, other settings, other
    # lengths of answer. The seeded ones must still say exactly what they said alone.
    others = [
        dict(kw, prompt="Hi", max_tokens=5, seed=1),
        dict(kw, prompt="A much longer prompt, which pads the short ones to the left " * 2, max_tokens=9),
        dict(kw, temperature=0.0, seed=None, max_tokens=30),
    ]
    requests = [kw, others[0], kw, others[1], kw, others[2]]
    barrier = threading.Barrier(len(requests))

    def call(request):
        barrier.wait()
        return client.completions.create(**request).choices[0].text

    with ThreadPoolExecutor(len(requests)) as pool:
        texts = list(pool.map(call, requests))
    assert texts[0] == texts[2] == texts[4] == alone


def test_n_choices_are_seed_plus_index(client, tok):
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=1.0, seed=50, n=3)
    assert [c.index for c in r.choices] == [0, 1, 2]
    singles = [client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=1.0, seed=50 + i)
               for i in range(3)]
    assert [c.text for c in r.choices] == [s.choices[0].text for s in singles]
    assert len({c.text for c in r.choices}) > 1
    assert r.usage.prompt_tokens == len(tok.encode(PROMPT))  # the prompt counts once, not n times
    assert r.usage.completion_tokens == sum(s.usage.completion_tokens for s in singles)


def test_several_prompts_times_n(client, tok):
    prompts = ["One", "Two three"]
    r = client.completions.create(model=MODEL, prompt=prompts, max_tokens=4, temperature=0, n=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text == r.choices[1].text != r.choices[2].text == r.choices[3].text
    assert r.usage.prompt_tokens == sum(len(tok.encode(p)) for p in prompts)
    streamed = list(client.completions.create(model=MODEL, prompt=prompts, max_tokens=4, temperature=0, n=2,
                                              stream=True))
    for i, choice in enumerate(r.choices):
        assert "".join(c.choices[0].text for c in streamed if c.choices[0].index == i) == choice.text


def test_long_prompt_answer_is_cut_at_the_context(client, tok):
    ids = tok.encode("word " * 60)[:60]  # 60 of the 64 positions
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=50, temperature=0)
    assert r.usage.completion_tokens <= 4
    assert r.choices[0].finish_reason in ("length", "stop")


# ---------------------------------------------------------------------------------------------
# API key, bad requests, limits
# ---------------------------------------------------------------------------------------------


def test_api_key_is_required(server):
    wrong = openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2)
    for path in ("/v1/models", "/v1/completions", "/v1/chat/completions"):
        method = "GET" if path == "/v1/models" else "POST"
        r = httpx.request(method, server + path, json={"model": MODEL, "prompt": "x"})
        assert_openai_error(r, 401, code="invalid_api_key")
        assert r.headers["www-authenticate"] == "Bearer"
    # The page and the health check carry no data and stay open.
    assert httpx.get(server + "/health").status_code == 200
    assert httpx.get(server + "/").status_code == 200


def _completion(**fields):
    return {"model": MODEL, "prompt": PROMPT, "max_tokens": 2, **fields}


def _chat(**fields):
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **fields}


JSON = {"headers": {"Content-Type": "application/json"}}

BAD_REQUESTS = {
    # name: (path, request kwargs for httpx, status, param)
    "malformed JSON": ("/v1/completions", dict(content=b'{"model": "tiny", "prompt": ', **JSON), 400, None),
    "body is an array": ("/v1/completions", dict(json=[1, 2]), 400, None),
    "absurdly nested JSON": ("/v1/completions", dict(content=b"[" * 100_000, **JSON), 400, None),
    "NaN is not JSON": ("/v1/completions", dict(content=b'{"model":"tiny","prompt":"a","temperature":NaN}', **JSON),
                        400, None),
    "missing prompt": ("/v1/completions", dict(json={"model": MODEL}), 400, "prompt"),
    "missing model": ("/v1/completions", dict(json={"prompt": "a"}), 400, "model"),
    "missing messages": ("/v1/chat/completions", dict(json={"model": MODEL}), 400, "messages"),
    "prompt is a number": ("/v1/completions", dict(json=_completion(prompt=5)), 400, "prompt"),
    "prompt mixes types": ("/v1/completions", dict(json=_completion(prompt=["a", 1])), 400, "prompt"),
    "empty prompt list": ("/v1/completions", dict(json=_completion(prompt=[])), 400, "prompt"),
    "token id out of range": ("/v1/completions", dict(json=_completion(prompt=[10**6])), 400, "prompt"),
    "negative max_tokens": ("/v1/completions", dict(json=_completion(max_tokens=-1)), 400, "max_tokens"),
    "zero max_tokens": ("/v1/completions", dict(json=_completion(max_tokens=0)), 400, "max_tokens"),
    "huge max_tokens": ("/v1/completions", dict(json=_completion(max_tokens=10**9)), 400, "max_tokens"),
    "max_tokens as text": ("/v1/completions", dict(json=_completion(max_tokens="10")), 400, "max_tokens"),
    "max_tokens as bool": ("/v1/completions", dict(json=_completion(max_tokens=True)), 400, "max_tokens"),
    "max_tokens fraction": ("/v1/completions", dict(json=_completion(max_tokens=2.5)), 400, "max_tokens"),
    "huge chat max_completion_tokens": ("/v1/chat/completions", dict(json=_chat(max_completion_tokens=10**6)),
                                        400, "max_completion_tokens"),
    "temperature as text": ("/v1/completions", dict(json=_completion(temperature="hot")), 400, "temperature"),
    "temperature too high": ("/v1/completions", dict(json=_completion(temperature=5)), 400, "temperature"),
    "top_p zero": ("/v1/completions", dict(json=_completion(top_p=0)), 400, "top_p"),
    "repetition_penalty near zero": ("/v1/completions", dict(json=_completion(repetition_penalty=1e-300)), 400,
                                     "repetition_penalty"),
    "top_k zero": ("/v1/completions", dict(json=_completion(top_k=0)), 400, "top_k"),
    "n zero": ("/v1/completions", dict(json=_completion(n=0)), 400, "n"),
    "n huge": ("/v1/completions", dict(json=_completion(n=1000)), 400, "n"),
    "five stop strings": ("/v1/completions", dict(json=_completion(stop=list("abcde"))), 400, "stop"),
    "empty stop string": ("/v1/completions", dict(json=_completion(stop=[""])), 400, "stop"),
    "stop is a number": ("/v1/completions", dict(json=_completion(stop=3)), 400, "stop"),
    "seed as text": ("/v1/completions", dict(json=_completion(seed="x")), 400, "seed"),
    "stream as text": ("/v1/completions", dict(json=_completion(stream="yes")), 400, "stream"),
    "unknown field": ("/v1/completions", dict(json=_completion(max_token=3)), 400, "max_token"),
    "logprobs": ("/v1/completions", dict(json=_completion(logprobs=2)), 400, "logprobs"),
    "presence_penalty": ("/v1/chat/completions", dict(json=_chat(presence_penalty=0.5)), 400, "presence_penalty"),
    "best_of": ("/v1/completions", dict(json=_completion(best_of=3)), 400, "best_of"),
    "unknown model": ("/v1/completions", dict(json=_completion(model="gpt-5")), 404, "model"),
    "prompt longer than the context": ("/v1/completions", dict(json=_completion(prompt="word " * 100)), 400,
                                       "prompt"),
    "chat longer than the context": ("/v1/chat/completions",
                                     dict(json=_chat(messages=[{"role": "user", "content": "word " * 100}])),
                                     400, "messages"),
    "messages empty": ("/v1/chat/completions", dict(json=_chat(messages=[])), 400, "messages"),
    "messages is text": ("/v1/chat/completions", dict(json=_chat(messages="hi")), 400, "messages"),
    "last message not the user's": ("/v1/chat/completions",
                                     dict(json=_chat(messages=[{"role": "assistant", "content": "hi"}])),
                                     400, "messages"),
    "unknown role": ("/v1/chat/completions", dict(json=_chat(messages=[{"role": "wizard", "content": "hi"}])),
                     400, "messages[0].role"),
    "content missing": ("/v1/chat/completions", dict(json=_chat(messages=[{"role": "user"}])), 400,
                        "messages[0].content"),
    "image content": ("/v1/chat/completions",
                      dict(json=_chat(messages=[{"role": "user", "content": [{"type": "image_url"}]}])),
                      400, "messages[0].content[0].type"),
    "no Content-Type": ("/v1/completions", dict(content=b'{"model": "tiny", "prompt": "a"}'), 415, None),
    "empty Content-Type": ("/v1/completions", dict(content=b'{"model": "tiny", "prompt": "a"}',
                                                   headers={"Content-Type": ""}), 415, None),
    "content is an empty list": ("/v1/chat/completions", dict(json=_chat(messages=[{"role": "user", "content": []}])),
                                 400, "messages[0].content"),
    "unknown key in a message": ("/v1/chat/completions",
                                 dict(json=_chat(messages=[{"role": "user", "content": "hi", "nickname": "x"}])),
                                 400, "messages[0].nickname"),
    "unknown key in a content part": ("/v1/chat/completions", dict(json=_chat(messages=[
        {"role": "user", "content": [{"type": "text", "text": "hi", "cache": 1}]}])), 400,
        "messages[0].content[0].cache"),
    "message is not an object": ("/v1/chat/completions", dict(json=_chat(messages=["hi"])), 400, "messages[0]"),
    "role is a number": ("/v1/chat/completions", dict(json=_chat(messages=[{"role": 1, "content": "hi"}])), 400,
                         "messages[0].role"),
    "prompt is a list of an empty list": ("/v1/completions", dict(json=_completion(prompt=[[]])), 400, "prompt"),
    "prompt mixes token lists and strings": ("/v1/completions", dict(json=_completion(prompt=[[1], "a"])), 400,
                                             "prompt"),
    "prompt mixes strings and token lists": ("/v1/completions", dict(json=_completion(prompt=["a", [1]])), 400,
                                             "prompt"),
    "stream_options is text": ("/v1/completions", dict(json=_completion(stream=True, stream_options="yes")), 400,
                               "stream_options"),
    "stream_options.include_usage is text": ("/v1/completions", dict(json=_completion(
        stream=True, stream_options={"include_usage": "yes"})), 400, "stream_options.include_usage"),
    "stream_options has an unknown key": ("/v1/chat/completions", dict(json=_chat(
        stream=True, stream_options={"include_usage": True, "extra": 1})), 400, "stream_options.extra"),
    "stream_options without stream": ("/v1/completions", dict(json=_completion(stream_options={"include_usage": True})),
                                      400, "stream_options"),
    "form body": ("/v1/completions", dict(content=b"model=tiny", headers={"Content-Type": "text/plain"}), 415,
                  None),
    "body over 1 MB": ("/v1/completions", dict(json=_completion(prompt="a" * 1_100_000)), 413, None),
    "body over 1 MB, chunked": ("/v1/completions", dict(content=iter([b"{" + b" " * 600_000] * 2), **JSON), 413, None),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_request_gets_an_openai_style_4xx(http, name):
    path, kwargs, status, param = BAD_REQUESTS[name]
    assert_openai_error(http.post(path, **kwargs), status, param=param)


def test_unknown_routes_and_methods_get_openai_style_errors(http):
    assert_openai_error(http.get("/v1/nothing"), 404)
    assert_openai_error(http.get("/v1/completions"), 405)
    assert_openai_error(http.get("/v1/models/gpt-5"), 404, code="model_not_found")


def test_the_server_still_answers_after_the_bad_requests(client, http):
    assert http.get("/health").json()["status"] == "ok"
    assert client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3).usage.completion_tokens == 3


def test_chat_page_is_self_contained(server):
    import re

    r = httpx.get(server + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    page = r.text
    # No inline code (its CSP forbids it): the style and script come from the server itself, without a key.
    assert "<style" not in page and "<script>" not in page and not re.search(r"\s(style|on\w+)=", page)
    files = {}
    for path, media in (("/static/chat.css", "text/css"), ("/static/chat.js", "text/javascript")):
        assert f'"{path}"' in page
        asset = httpx.get(server + path)
        assert asset.status_code == 200 and asset.headers["content-type"] == f"{media}; charset=utf-8"
        files[path] = asset.text
    assert httpx.get(server + "/static/chat.html").status_code == 401  # only the page's own files are open
    for text in (page, *files.values()):
        assert "http://" not in text and "https://" not in text  # no CDN, fonts or other outside resources
    assert "/v1/chat/completions" in files["/static/chat.js"] and "AbortController" in files["/static/chat.js"]


SECURITY_HEADERS = {"x-frame-options": "DENY", "x-content-type-options": "nosniff", "referrer-policy": "no-referrer"}


def assert_security_headers(response, csp="default-src 'none'; frame-ancestors 'none'"):
    for name, value in {**SECURITY_HEADERS, "content-security-policy": csp}.items():
        assert response.headers.get_list(name) == [value], (response.request.url, name, response.headers)


def test_every_response_forbids_framing_and_sniffing(server, http):
    from scratchgpt.inference.serve import PAGE_CSP

    for page in (httpx.get(server + "/"), httpx.head(server + "/")):
        assert_security_headers(page, csp=PAGE_CSP)
    assert "frame-ancestors 'none'" in PAGE_CSP and "unsafe-inline" not in PAGE_CSP
    for response in (
        httpx.get(server + "/static/chat.js"), http.get("/health"), http.get("/v1/models"),
        http.post("/v1/completions", json=_completion()),
        http.post("/v1/completions", json=_completion(stream=True)),
        httpx.get(server + "/v1/models"),  # 401
        http.post("/v1/completions", content=b"{}"),  # 415
        http.post("/v1/completions", json={"model": MODEL}),  # 400
        http.get("/nope"), http.delete("/v1/models"),  # 404, 405
    ):
        assert_security_headers(response)


def test_even_a_bugs_500_carries_the_security_headers(loaded):
    from fastapi.testclient import TestClient

    model, tok = loaded
    app = create_app(model, tok, model_name=MODEL)

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("a bug")

    r = TestClient(app, raise_server_exceptions=False).get("/boom")
    assert_openai_error(r, 500)
    assert_security_headers(r)


class _Slow:
    """Forward pre-hook that makes every model call take `seconds`, so requests stay in flight."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def __call__(self, module, args, kwargs):
        time.sleep(self.seconds)


@pytest.fixture(scope="module")
def slow_app(tiny_chat_checkpoint):
    model, tok = load_any(tiny_chat_checkpoint)  # its own copy: the hook must not slow the other server
    model.register_forward_pre_hook(_Slow(0.02), with_kwargs=True)
    return create_app(model, tok, model_name=MODEL, limits=ServeLimits(max_requests=1))


@pytest.fixture(scope="module")
def slow_server(slow_app, start_server) -> str:
    return start_server(slow_app)


def _wait_idle(scheduler, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = scheduler.stats()
        if stats["requests_in_flight"] == 0 and stats["rows_decoding"] == 0 and stats["rows_waiting"] == 0:
            return
        time.sleep(0.01)
    raise AssertionError(f"the server did not go idle: {scheduler.stats()}")


def test_too_many_requests_get_503(slow_server):
    body = _completion(max_tokens=30, stream=True)
    with httpx.stream("POST", slow_server + "/v1/completions", json=body, timeout=30) as first:
        assert first.status_code == 200
        second = httpx.post(slow_server + "/v1/completions", json=_completion(), timeout=30)
        assert_openai_error(second, 503, code="server_overloaded")
        first.read()
    assert httpx.post(slow_server + "/v1/completions", json=_completion(), timeout=30).status_code == 200


def test_a_disconnected_stream_stops_decoding(slow_server, slow_app):
    scheduler = slow_app.state.scheduler
    _wait_idle(scheduler)
    before = scheduler.tokens_generated
    body = _completion(max_tokens=60, stream=True)
    with httpx.stream("POST", slow_server + "/v1/completions", json=body, timeout=30) as r:
        for line in r.iter_lines():
            if '"text":"' in line and '"text":""' not in line:
                break  # the first piece of text: now hang up
    _wait_idle(scheduler)  # the slot is free again and no row is decoding
    assert scheduler.tokens_generated - before < 30  # 60 tokens would take 1.2 s; it stopped long before


def test_a_disconnected_request_stops_decoding(slow_server, slow_app):
    scheduler = slow_app.state.scheduler
    _wait_idle(scheduler)
    before = scheduler.tokens_generated
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(slow_server + "/v1/completions", json=_completion(max_tokens=60), timeout=0.3)
    _wait_idle(scheduler)
    assert scheduler.tokens_generated - before < 40


def test_serve_reads_the_chat_template_and_binds_loopback(tiny_chat_checkpoint, monkeypatch):
    from types import SimpleNamespace

    from scratchgpt.inference import serve as serve_module

    calls = {}

    def fake_server(app, **kw):
        calls.update(app=app)
        return SimpleNamespace(run=lambda sockets: calls.update(address=sockets[0].getsockname()))

    monkeypatch.setattr(serve_module, "make_server", fake_server)
    monkeypatch.setenv("SCRATCHGPT_API_KEY", "from-env")
    serve_module.serve(tiny_chat_checkpoint, port=0)
    app = calls["app"]
    assert calls["address"][0] == "127.0.0.1"
    assert app.state.chat_template == "alpaca"
    assert app.state.model_name == tiny_chat_checkpoint.name
    from fastapi.testclient import TestClient

    local = TestClient(app, base_url="http://127.0.0.1:8000")
    assert local.get("/v1/models").status_code == 401  # the key came from $SCRATCHGPT_API_KEY
    assert local.get("/v1/models", headers={"Authorization": "Bearer from-env"}).status_code == 200
    # Bound to loopback, it refuses other Host names (a DNS-rebinding page would send its own).
    rebound = TestClient(app, base_url="http://attacker.example:8123")
    assert_openai_error(rebound.get("/health"), 400, code="invalid_host")


def test_cli_serve_flags():
    from scratchgpt.cli import build_parser
    from scratchgpt.cli.flags import read_config_sections

    args = build_parser().parse_args(["serve", "--checkpoint", "runs/x", "--max-batch-size", "4", "--port", "9000"])
    assert args.func.__name__ == "_run_serve"
    configs, _ = read_config_sections(args)
    assert (configs["serve"].port, configs["limits"].max_batch_size, configs["serve"].host) == (9000, 4, "127.0.0.1")


# ---------------------------------------------------------------------------------------------
# Hardening: no 5xx from any string, one rule for special-token text, HEAD, Host, defaults
# ---------------------------------------------------------------------------------------------

SURROGATE = "\ud800"


def _string_variants(value, path=()):
    """Every way to put a lone surrogate into `value`: into each string, and as each object's extra key."""
    if isinstance(value, str):
        yield path, value + SURROGATE
    elif isinstance(value, list):
        for i, item in enumerate(value):
            for sub_path, new in _string_variants(item, (*path, i)):
                yield sub_path, value[:i] + [new] + value[i + 1:]
    elif isinstance(value, dict):
        yield (*path, "<key>"), {**value, "x" + SURROGATE: 1}
        for key, item in value.items():
            for sub_path, new in _string_variants(item, (*path, key)):
                yield sub_path, {**value, key: new}


SURROGATE_BODIES = [
    ("/v1/completions", _completion(stop=["zz"], user="u", suffix="", echo=True)),
    ("/v1/completions", _completion(prompt=["one", "two"], stream=True, stream_options={"include_usage": True})),
    ("/v1/chat/completions", _chat(messages=[
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        stop="zz", user="u", tool_choice="none", response_format={"type": "text"})),
    ("/v1/chat/completions", _chat(stream=True, stream_options={"include_usage": True})),
]


@pytest.mark.parametrize("path,body", SURROGATE_BODIES)
def test_lone_surrogates_in_any_string_never_give_a_5xx(http, path, body):
    import json

    sent = 0
    for where, variant in _string_variants(body):
        raw = json.dumps(variant)  # ASCII: the surrogate travels as the JSON escape \ud800
        r = http.post(path, content=raw.encode(), headers={"Content-Type": "application/json"})
        assert r.status_code < 500, (where, r.text)
        if r.headers["content-type"].startswith("application/json"):
            r.json()
        else:
            assert r.text.rstrip().endswith("data: [DONE]"), (where, r.text)
        sent += 1
    assert sent >= 5
    # Echoed back as text, the surrogate comes back escaped (valid JSON), not as a 500.
    r = http.post("/v1/completions", content=json.dumps(_completion(prompt="a" + SURROGATE, echo=True)).encode(),
                  headers={"Content-Type": "application/json"})
    assert r.status_code == 200 and r.json()["choices"][0]["text"].startswith("a" + SURROGATE)
    assert_openai_error(http.get("/v1/models/%ED%A0%80"), 404, code="model_not_found")


def test_endoftext_text_is_ordinary_text_in_both_endpoints(client, http, tok):
    text = "Hello <|endoftext|> world"
    ordinary = tok.encode_ordinary(text)
    assert tok.eot_id not in ordinary
    r = client.completions.create(model=MODEL, prompt=text, max_tokens=1)
    assert r.usage.prompt_tokens == len(ordinary)
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": text}], max_tokens=1)
    assert r.usage.prompt_tokens == len(tok.encode_ordinary(render_chat([{"role": "user", "content": text}],
                                                                        "alpaca")))
    # Token ids still carry the special token.
    r = client.completions.create(model=MODEL, prompt=[tok.eot_id, 1], max_tokens=1)
    assert r.usage.prompt_tokens == 2


@pytest.mark.parametrize("extra", [dict(temperature=1e-300), dict(temperature=5e-5, top_k=10**30),
                                   dict(top_p=1e-300), dict(min_p=1.0), dict(top_k=10**6, repetition_penalty=0.01),
                                   dict(temperature=2, top_k=1, min_p=0.99, repetition_penalty=10)])
def test_extreme_sampling_values_are_served_not_500(client, http, extra):
    r = http.post("/v1/completions", json=_completion(max_tokens=3, **extra))
    assert r.status_code == 200, r.text
    if extra.get("temperature", 1) < 1e-4:  # greedy in all but name
        assert r.json()["choices"][0]["text"] == client.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0).choices[0].text


def test_chat_without_max_tokens_uses_the_documented_default(model, tok):
    from scratchgpt.inference.openai_api import DEFAULT_CHAT_MAX_TOKENS, DEFAULT_MAX_TOKENS, RequestParser

    parser = RequestParser(tok, MODEL, 4096, "alpaca", ServeLimits())  # a context wider than the default
    hi = ChatCompletionRequest.model_validate({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    chat = parser.chat(hi)
    assert chat.samplings[0].max_new_tokens == DEFAULT_CHAT_MAX_TOKENS == 256
    completion = parser.completion(CompletionRequest.model_validate({"model": MODEL, "prompt": "hi"}))
    assert completion.samplings[0].max_new_tokens == DEFAULT_MAX_TOKENS == 16
    # Near the context's end, the answer stops there.
    small = RequestParser(tok, MODEL, 64, "alpaca", ServeLimits())
    chat = small.chat(hi)
    assert chat.samplings[0].max_new_tokens == 64 - len(chat.prompts[0])


def test_head_is_get_without_a_body(server):
    for path in ("/health", "/", "/v1/models"):
        head = httpx.head(server + path, headers={"Authorization": f"Bearer {KEY}"})
        assert head.status_code == 200 and head.content == b"", path
        assert int(head.headers["content-length"]) > 0


@pytest.mark.parametrize("host,ok", [
    ("127.0.0.1", True), ("localhost:8000", True), ("[::1]:8000", True), ("LOCALHOST", True),
    ("localhost:8000@evil.example", False), ("evil.example", False), ("localhost.evil.example", False),
    ("127.0.0.1:80/x", False), ("[::1]evil", False), ("", False), ("localhost:", False),
])
def test_host_header_is_parsed_as_host_and_port(tiny_chat_checkpoint, loaded, host, ok):
    from fastapi.testclient import TestClient

    from scratchgpt.inference.serve import _LOOPBACK_HOSTS

    model, tok = loaded
    app = create_app(model, tok, model_name=MODEL, allowed_hosts=_LOOPBACK_HOSTS)
    r = TestClient(app).get("/health", headers={"Host": host})
    if ok:
        assert r.status_code == 200, r.text
    else:
        assert_openai_error(r, 400, code="invalid_host")


def test_a_char_level_checkpoint_disables_chat_once_and_clearly(tmp_path, caplog):
    from fastapi.testclient import TestClient

    from scratchgpt import GPT, GPTConfig
    from scratchgpt.data.tokenizers import CharTokenizer

    tok = CharTokenizer("abcdefgh ")
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, n_positions=32, n_embd=16, n_layer=1, n_head=2),
                generator=torch.Generator().manual_seed(0))
    with caplog.at_level("WARNING"):
        app = create_app(model, tok, model_name="char")
    assert "chat/completions is disabled" in caplog.text and "alphabet" in caplog.text
    with TestClient(app) as c:
        r = c.post("/v1/chat/completions", json={"model": "char", "messages": [{"role": "user", "content": "abc"}]})
        assert_openai_error(r, 400, code="chat_not_supported")
        assert "alpaca" in r.json()["error"]["message"]
        assert c.get("/health").json()["chat"] is False
        ok = c.post("/v1/completions", json={"model": "char", "prompt": "abc", "max_tokens": 2})
        assert ok.status_code == 200
        bad = c.post("/v1/completions", json={"model": "char", "prompt": "xyz"})
        assert_openai_error(bad, 400, param="prompt")


# ---------------------------------------------------------------------------------------------
# Start-up: every bad argument is one line and a non-zero exit, before anything is announced
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def busy_port():
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    yield sock.getsockname()[1]
    sock.close()


@pytest.mark.parametrize("extra,env,expected", [
    (["--port", "-1"], {}, "port=-1 is out of range; it must lie in [0, 65535]"),
    (["--port", "70000"], {}, "port=70000 is out of range; it must lie in [0, 65535]"),
    (["--device", "tpu9"], {}, "device='tpu9' is not a device"),
    (["--device", "cuda"], {}, "no CUDA device"),
    (["--host", "0.0.0.0"], {}, "needs an API key"),
    (["--host", "::"], {}, "needs an API key"),
    (["--api-key", ""], {}, "--api-key is empty"),
    ([], {"SCRATCHGPT_API_KEY": ""}, "$SCRATCHGPT_API_KEY is empty"),
    (["--host", "no-such-host.invalid", "--api-key", "k"], {}, "is not an address of this machine"),
    (["--port", "BUSY"], {}, "cannot listen on 127.0.0.1:"),
    (["--max-batch-size", "0"], {}, "max_batch_size=0"),
])
def test_serve_start_up_errors_are_one_line(tiny_chat_checkpoint, busy_port, monkeypatch, capsys, extra, env,
                                            expected):
    from scratchgpt.cli import main

    if "cuda" in extra and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    extra = [str(busy_port) if a == "BUSY" else a for a in extra]
    assert main(["serve", "--checkpoint", str(tiny_chat_checkpoint), *extra]) == 2
    out, err = capsys.readouterr()
    assert "serving" not in out
    assert err.count("\n") == 1 and err.startswith("scratchgpt serve: error: "), err
    assert expected in err


@pytest.mark.parametrize("path", ["runs/no-such-run", "./nope", "/no/such/dir", "nope/"])
def test_serve_a_missing_local_checkpoint_says_not_found(tmp_path, monkeypatch, capsys, path):
    from scratchgpt.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    assert main(["serve", "--checkpoint", path]) == 2
    err = capsys.readouterr().err
    assert "no such checkpoint directory" in err and "hub" not in err and err.count("\n") == 1


# ---------------------------------------------------------------------------------------------
# Connections: silent sockets are closed, half-closed clients are answered (raw sockets)
# ---------------------------------------------------------------------------------------------


def _hardened_server(app):
    """Runs `app` as `serve` runs it (make_server: its protocol, timeouts and shutdown); yields its address."""
    import socket

    from scratchgpt.inference.serve import make_server

    server = make_server(app, log_level="warning")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline
        time.sleep(0.01)
    yield sock.getsockname()
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()


@pytest.fixture(scope="module")
def hardened(loaded):
    """A server as `serve` runs it, read timeout 0.5 s."""
    model, tok = loaded
    yield from _hardened_server(create_app(model, tok, model_name=MODEL,
                                           limits=ServeLimits(read_timeout_s=0.5, shutdown_grace_s=1)))


@pytest.fixture(scope="module")
def hardened_slow(tiny_chat_checkpoint):
    """The same with a model that takes 30 ms a token, so a 50-token answer takes over a second."""
    model, tok = load_any(tiny_chat_checkpoint)  # its own copy: the hook must not slow the other servers
    model.register_forward_pre_hook(_Slow(0.03), with_kwargs=True)
    yield from _hardened_server(create_app(model, tok, model_name=MODEL, limits=ServeLimits(shutdown_grace_s=1)))


def _read_all(sock, timeout=10.0) -> tuple[bytes, float]:
    """Everything until the server closes, and how long that took."""
    sock.settimeout(timeout)
    start, data = time.monotonic(), b""
    while chunk := sock.recv(65536):
        data += chunk
    return data, time.monotonic() - start


@pytest.mark.parametrize("sent", [b"", b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n"])
def test_silent_and_trickling_connections_are_closed(hardened, sent):
    import socket

    with socket.create_connection(hardened, timeout=10) as s:
        s.sendall(sent)
        data, took = _read_all(s)
    assert data == b"" and took < 5


def test_a_stalled_body_gets_408(hardened):
    import socket

    head = (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n{\"model\"")
    with socket.create_connection(hardened, timeout=10) as s:
        s.sendall(head)
        data, took = _read_all(s)
    assert data.startswith(b"HTTP/1.1 408") and b"request_timeout" in data and took < 5


def _raw_request(method: str, path: str, *, version: str, connection: str | None, body: bytes = b"") -> bytes:
    """An HTTP request as bytes, exactly as given (a body always goes with Content-Length)."""
    head = [f"{method} {path} HTTP/{version}", "Host: 127.0.0.1"]
    if connection is not None:
        head.append(f"Connection: {connection}")
    if method == "POST":
        head += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def _whole_response(data: bytes, method: str) -> tuple[int, bytes]:
    """The status and body of the one final response in `data` (interim 1xx skipped), read by h11 as a
    client would; raises unless that response is complete (its whole Content-Length or last chunk)."""
    import h11

    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method=method, target="/", headers=[("Host", "x"), ("Content-Length", "0")]))
    client.send(h11.EndOfMessage())
    client.receive_data(data)
    client.receive_data(b"")  # the server closed the connection after `data`
    status, body = 0, b""
    while not isinstance(event := client.next_event(), h11.EndOfMessage):
        if isinstance(event, h11.Response):
            status = event.status_code
        elif isinstance(event, h11.Data):
            body += event.data
    return status, body


@pytest.mark.parametrize("version", ["1.0", "1.1"])
@pytest.mark.parametrize("connection", [None, "close", "keep-alive"])
@pytest.mark.parametrize("what", ["GET", "POST", "POST stream", "POST slow"])
def test_a_half_closed_client_gets_the_whole_answer_to_every_request_it_sent_whole(request, what, connection,
                                                                                   version):
    import json
    import socket

    method, slow = what.split()[0], what == "POST slow"
    max_tokens = 50 if slow else 3
    body = json.dumps(_completion(max_tokens=max_tokens, stream=what == "POST stream",
                                  temperature=0.0)).encode()
    raw = _raw_request(method, "/health" if method == "GET" else "/v1/completions", version=version,
                       connection=connection, body=body if method == "POST" else b"")
    with socket.create_connection(request.getfixturevalue("hardened_slow" if slow else "hardened"), timeout=10) as s:
        s.sendall(raw)
        s.shutdown(socket.SHUT_WR)
        data, _ = _read_all(s)
    assert data, "no answer at all"
    if slow:  # over a second: HTTP/1.1 clients got a 100 Continue each second, HTTP/1.0 ones none
        assert (b"HTTP/1.1 100 Continue" in data) == (version == "1.1"), data
    status, answer = _whole_response(data, method)
    assert status == 200, data
    if what == "GET":
        assert json.loads(answer)["status"] == "ok"
    elif what == "POST stream":
        assert answer.endswith(b"data: [DONE]\n\n"), answer
    else:
        assert json.loads(answer)["usage"]["completion_tokens"] == max_tokens


def test_a_half_closed_client_gets_every_pipelined_answer_whatever_its_forwarded_for(hardened):
    import socket

    # Two requests in one go, one claiming another address: the connection guard still finds them
    # (uvicorn must not swap the client's address for the header's), answers both, then closes.
    one = _raw_request("GET", "/health", version="1.1", connection=None)
    two = one.replace(b"\r\n\r\n", b"\r\nX-Forwarded-For: 10.1.2.3\r\n\r\n")
    with socket.create_connection(hardened, timeout=10) as s:
        s.sendall(one + two)
        s.shutdown(socket.SHUT_WR)
        data, took = _read_all(s)
    assert data.count(b"HTTP/1.1 200 OK") == 2 and took < 4, data  # not held open until the 5 s keep-alive
    assert b"100 Continue" not in data and data.endswith(b"}"), data


@pytest.mark.parametrize("connection", [None, "close"])
@pytest.mark.parametrize("sent", ["head", "body", "chunked body"])
def test_a_half_close_in_the_middle_of_a_request_closes_the_connection(hardened, sent, connection):
    import socket

    full = _raw_request("POST", "/v1/completions", version="1.1", connection=connection,
                        body=json.dumps(_completion(max_tokens=3)).encode())
    if sent == "head":
        request = full[:full.index(b"\r\n\r\n")]
    elif sent == "body":
        request = full[:-5]
    else:
        head, _, body = full.partition(b"\r\n\r\n")
        head = head.replace(b"Content-Length: %d" % len(body), b"Transfer-Encoding: chunked")
        request = head + b"\r\n\r\n" + b"%x\r\n%s\r\n" % (len(body), body)  # no last chunk
    with socket.create_connection(hardened, timeout=10) as s:
        s.sendall(request)
        s.shutdown(socket.SHUT_WR)
        data, took = _read_all(s)
    # Closed at once, without an answer (a request that stalled instead would get a 408 after 0.5 s).
    assert data == b"" and took < 5


def test_keep_alive_connections_are_closed_after_their_timeout(hardened):
    import socket

    with socket.create_connection(hardened, timeout=10) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        data, took = _read_all(s, timeout=15)
    assert data.startswith(b"HTTP/1.1 200") and took < 10  # uvicorn's keep-alive timeout: 5 s


# ---------------------------------------------------------------------------------------------
# Shutdown: Ctrl+C with streams running, in a real server process
# ---------------------------------------------------------------------------------------------

_SERVER_SCRIPT = """
import sys, time
from scratchgpt.checkpoint import load_any
from scratchgpt.config import ServeLimits
from scratchgpt.inference.serve import bind_socket, create_app, make_server
model, tok = load_any(sys.argv[1])
model.register_forward_pre_hook(lambda m, a, k: time.sleep(0.05), with_kwargs=True)
app = create_app(model, tok, model_name="tiny", limits=ServeLimits(shutdown_grace_s=1.0))
sock = bind_socket("127.0.0.1", 0)
print(sock.getsockname()[1], flush=True)
try:
    make_server(app, log_level="info").run(sockets=[sock])
except KeyboardInterrupt:  # uvicorn re-raises the Ctrl+C it handled; the CLI turns it into exit code 130
    print("interrupted", file=sys.stderr)
"""


def test_ctrl_c_ends_every_stream_with_done_and_no_traceback(tiny_chat_checkpoint):
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", _SERVER_SCRIPT, str(tiny_chat_checkpoint)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline())
        url = f"http://127.0.0.1:{port}/v1/completions"
        deadline = time.monotonic() + 30
        while True:  # the port is bound before the model loads, but listens only once uvicorn runs
            try:
                if httpx.get(url.replace("/v1/completions", "/health")).status_code == 200:
                    break
            except httpx.ConnectError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.1)

        started = threading.Semaphore(0)

        def stream(max_tokens):
            body = _completion(max_tokens=max_tokens, stream=True, prompt="a")
            lines = []
            with httpx.stream("POST", url, json=body, timeout=30) as r:
                for line in r.iter_lines():
                    if line and not lines:
                        started.release()  # this stream is running
                    lines += [line] if line else []
            return lines

        with ThreadPoolExecutor(6) as pool:
            # 4 x 50 tokens at 0.05 s a step outlast the 1 s grace; 2 x 3 tokens finish within it.
            futures = [pool.submit(stream, 50) for _ in range(4)] + [pool.submit(stream, 3) for _ in range(2)]
            for _ in futures:
                assert started.acquire(timeout=30)
            proc.send_signal(signal.SIGINT)
            results = [f.result(timeout=30) for f in futures]
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    for lines in results:
        assert lines[-1] == "data: [DONE]", lines[-3:]
    assert all(any('"finish_reason":"length"' in line for line in lines) for lines in results[4:])
    assert all(any("shutting down" in line for line in lines) for lines in results[:4])
    assert "Traceback" not in err and "CancelledError" not in err, err


# ---------------------------------------------------------------------------------------------
# A Hugging Face folder's own chat template ("tokenizer"), e.g. an Instruct model's
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def instruct_app(tmp_path_factory):
    """A ChatML-like folder whose model answers 'hi' and then <|im_end|> (see tests/test_chat_session.py)."""
    pytest.importorskip("tokenizers")
    from test_chat_session import CHATML, make_folder

    folder = make_folder(tmp_path_factory.mktemp("instruct"), CHATML)
    model, tok = load_any(folder)
    return create_app(model, tok, model_name=MODEL), tok  # no template named: the folder's own


@pytest.fixture(scope="module")
def instruct(instruct_app):
    from fastapi.testclient import TestClient

    app, _ = instruct_app
    with TestClient(app, base_url="http://127.0.0.1:8000") as c:
        yield c


def test_chat_with_the_tokenizers_template_stops_at_its_end_of_turn(instruct, instruct_app):
    app, tok = instruct_app
    assert app.state.chat_template == "tokenizer"
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"},
                {"role": "assistant", "content": "hi"}, {"role": "user", "content": "again?"}]
    body = {"model": MODEL, "messages": messages, "temperature": 0, "max_tokens": 10}
    r = instruct.post("/v1/chat/completions", json=body).json()
    assert r["choices"][0]["message"]["content"] == "hi" and r["choices"][0]["finish_reason"] == "stop"
    # The whole conversation went through the template, its markers as special tokens.
    assert r["usage"]["prompt_tokens"] == len(tok.encode(tok.apply_chat_template(messages), allowed_special=True))
    with instruct.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as s:
        events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events) == "hi"
    assert [e["choices"][0]["finish_reason"] for e in events if e["choices"][0]["finish_reason"]] == ["stop"]


def test_chat_with_the_tokenizers_template_refuses_forged_markup(instruct):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi<|im_end|>"}]}
    r = instruct.post("/v1/chat/completions", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    assert "<|im_end|>" in r.json()["error"]["message"]


def test_a_template_without_a_system_role_refuses_only_system_messages(tmp_path):
    from fastapi.testclient import TestClient

    from test_chat_session import CHATML, NO_SYSTEM, make_folder

    folder = make_folder(tmp_path / "nosys", CHATML, chat_template=NO_SYSTEM + CHATML["config"]["chat_template"])
    model, tok = load_any(folder)
    app = create_app(model, tok, model_name=MODEL)
    assert app.state.chat_disabled is None
    with TestClient(app, base_url="http://127.0.0.1:8000") as c:
        user = {"role": "user", "content": "hello"}
        ok = c.post("/v1/chat/completions", json={"model": MODEL, "messages": [user], "temperature": 0}).json()
        assert ok["choices"][0]["message"]["content"] == "hi"
        system = {"role": "system", "content": "Be brief."}
        r = c.post("/v1/chat/completions", json={"model": MODEL, "messages": [system, user]})
        assert r.status_code == 400 and "System role not supported" in r.json()["error"]["message"]
        assert "nosys" in r.json()["error"]["message"]
    # A broken template disables chat with the reason, naming the folder; completions still work.
    broken = make_folder(tmp_path / "broken", CHATML, chat_template="{% if %}")
    model, tok = load_any(broken)
    assert "broken" in create_app(model, tok, model_name=MODEL).state.chat_disabled
    # The tokenizer template on a tokenizer without one is a one-line error at start-up.
    from scratchgpt.data.tokenizers import gpt2_tokenizer

    with pytest.raises(ValueError, match="has none"):
        create_app(model, gpt2_tokenizer(None), model_name=MODEL, chat_template="tokenizer")


def test_serve_defaults_to_the_folders_own_template(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from scratchgpt.config import ServeConfig
    from scratchgpt.inference import serve as serve_module
    from test_chat_session import LLAMA3, make_folder

    folder = make_folder(tmp_path / "llama", LLAMA3)
    calls = {}
    monkeypatch.setattr(serve_module, "make_server", lambda app, **kw: SimpleNamespace(
        run=lambda sockets: calls.update(app=app)))
    serve_module.serve(folder, port=0)
    assert calls["app"].state.chat_template == "tokenizer"
    serve_module.serve(folder, port=0, chat_template="chatml")  # an explicit choice wins
    assert calls["app"].state.chat_template == "chatml"
    assert ServeConfig(checkpoint=str(folder), chat_template="tokenizer").chat_template == "tokenizer"


# Temperature's one rule (config.check_temperature / is_greedy): [0, 2], and below 1e-4 is greedy.
_VALID_TEMPERATURES = {0: True, 5e-5: True, 9.99e-5: True, 1e-4: False, 0.8: False, 2: False}  # value -> greedy
_INVALID_TEMPERATURES = (-1e-9, 2.0001, 7)


def test_temperature_has_one_rule_in_python_cli_and_http(model, tok, http, tiny_chat_checkpoint, monkeypatch,
                                                         capsys):
    import scratchgpt.inference.generate as generate_module
    from scratchgpt.cli import main
    from scratchgpt.inference.openai_api import RequestParser

    parser = RequestParser(tok, MODEL, 64, "alpaca", ServeLimits())
    seen: list[SamplingConfig] = []  # what `scratchgpt generate` samples with
    real_stream_text = generate_module.stream_text
    monkeypatch.setattr(generate_module, "stream_text",
                        lambda *a, **kw: (seen.append(a[3]), real_stream_text(*a, **kw))[1])
    prompt = tok.encode(PROMPT)
    greedy_text = generate(model, [prompt], SamplingConfig(max_new_tokens=4, temperature=0, stop_at_eot=False))
    cli = ["generate", "--checkpoint", str(tiny_chat_checkpoint), "--prompt", PROMPT, "--max-new-tokens", "4",
           "--seed", "1"]

    for value, greedy in _VALID_TEMPERATURES.items():
        python = SamplingConfig(max_new_tokens=4, temperature=value, stop_at_eot=False, seed=1)
        assert python.greedy is greedy, value
        if greedy:  # greedy exactly: the T=0 tokens, whatever the seed
            assert generate(model, [prompt], python) == greedy_text
        assert main([*cli, f"--temperature={value!r}"]) == 0
        assert seen.pop().greedy is greedy, value
        request = CompletionRequest.model_validate({"model": MODEL, "prompt": PROMPT, "temperature": value})
        assert parser.completion(request).samplings[0].greedy is greedy, value
        assert http.post("/v1/completions", json=_completion(max_tokens=1, temperature=value)).status_code == 200
    capsys.readouterr()

    for value in _INVALID_TEMPERATURES:
        with pytest.raises(ValueError, match=r"temperature=.* must lie in \[0.0, 2.0\]"):
            SamplingConfig(temperature=value)
        assert main([*cli, f"--temperature={value!r}"]) == 2
        err = capsys.readouterr().err
        assert "temperature" in err and "[0.0, 2.0]" in err and err.count("\n") == 1, err
        assert_openai_error(http.post("/v1/completions", json=_completion(temperature=value)), 400,
                            param="temperature")
    assert seen == []  # no invalid value reached generation
