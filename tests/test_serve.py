"""The HTTP server: a real uvicorn server on loopback, driven by the official `openai` client and httpx.

The served model is tiny (2 layers, 32 wide, 64-token context, GPT-2 tokenizer, random weights), so
its text is gibberish, but every text is checked against `generate` run directly on the same weights.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from scratchgpt import SamplingConfig
from scratchgpt.checkpoint import load_any
from scratchgpt.data.chat import render_chat, stop_strings
from scratchgpt.inference.generate import generate, generate_text
from scratchgpt.inference.serve import DecodeBatch, Job, Row, ServeLimits, create_app

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

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


BAD_REQUESTS = {
    # name: (path, request kwargs for httpx, status, param)
    "malformed JSON": ("/v1/completions", dict(content=b'{"model": "tiny", "prompt": '), 400, None),
    "body is an array": ("/v1/completions", dict(json=[1, 2]), 400, None),
    "absurdly nested JSON": ("/v1/completions", dict(content=b"[" * 100_000), 400, None),
    "NaN is not JSON": ("/v1/completions", dict(content=b'{"model":"tiny","prompt":"a","temperature":NaN}'),
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
                      400, "messages[0].content"),
    "special token in chat": ("/v1/chat/completions",
                              dict(json=_chat(messages=[{"role": "user", "content": "<|endoftext|>"}])),
                              400, "messages"),
    "form body": ("/v1/completions", dict(content=b"model=tiny", headers={"Content-Type": "text/plain"}), 415,
                  None),
    "body over 1 MB": ("/v1/completions", dict(json=_completion(prompt="a" * 1_100_000)), 413, None),
    "body over 1 MB, chunked": ("/v1/completions", dict(content=iter([b"{" + b" " * 600_000] * 2)), 413, None),
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
    r = httpx.get(server + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    page = r.text
    assert "<script>" in page and "<style>" in page
    assert "http://" not in page and "https://" not in page  # no CDN, fonts or other outside resources
    assert "/v1/chat/completions" in page and "AbortController" in page


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


# ---------------------------------------------------------------------------------------------
# The decoder on its own: rows joining and leaving a running batch
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampling", [
    dict(temperature=0.0),
    dict(temperature=0.9, top_k=40),
    dict(temperature=1.0, top_p=0.9, repetition_penalty=1.3),
])
def test_rows_joining_a_running_batch_decode_as_if_alone(model, tok, sampling):
    import asyncio
    import random

    rng = random.Random(0)
    job = Job(asyncio.new_event_loop())
    prompts = [tok.encode(t) for t in ["Hello there, how are", "Once", "The quick brown fox jumps over the lazy", "A"]]
    rows = []
    for i in range(10):
        prompt = prompts[i % len(prompts)]
        config = SamplingConfig(max_new_tokens=rng.randint(1, 40), **sampling)
        rows.append(Row(job, i, prompt, config, torch.Generator().manual_seed(100 + i)))

    batch, waiting, tokens = DecodeBatch(model, tok), list(rows), {}
    joined_late = 0
    while waiting or len(batch):
        joining = []
        while waiting and len(joining) < rng.randint(0, 2) and batch.fits([*joining, waiting[0]]):
            joining.append(waiting.pop(0))
        if joining:
            joined_late += bool(len(batch))
            batch.add(joining)
        if len(batch):
            for row, _, finish in batch.step():
                if finish:
                    tokens[row.index] = row.tokens
    assert joined_late > 0
    for row in rows:
        alone = generate(model, row.prompt, row.sampling, eot_id=tok.eot_id,
                         generator=torch.Generator().manual_seed(100 + row.index))[0]
        got = tokens[row.index]
        assert got[: len(alone)] == alone and len(got) - len(alone) in (0, 1)  # + the end-of-text token


def test_a_row_waits_when_the_batch_has_no_room_in_the_context(model, tok):
    import asyncio

    job = Job(asyncio.new_event_loop())
    gen = torch.Generator()
    long_answer = Row(job, 0, [1] * 10, SamplingConfig(max_new_tokens=50, temperature=0.0), gen)
    long_prompt = Row(job, 1, [2] * 60, SamplingConfig(max_new_tokens=4, temperature=0.0), gen)
    batch = DecodeBatch(model, tok)
    assert batch.fits([long_answer]) and batch.fits([long_prompt])
    batch.add([long_answer])
    for _ in range(5):
        batch.step()
    # 60 prompt columns + 45 more answer tokens for row 0 would need 105 > 64 cache columns.
    assert not batch.fits([long_prompt])


def test_serve_reads_the_chat_template_and_binds_loopback(tiny_chat_checkpoint, monkeypatch):
    import uvicorn

    from scratchgpt.inference import serve as serve_module

    calls = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.update(app=app, **kw))
    monkeypatch.setenv("SCRATCHGPT_API_KEY", "from-env")
    serve_module.serve(tiny_chat_checkpoint, port=8123)
    app = calls["app"]
    assert (calls["host"], calls["port"]) == ("127.0.0.1", 8123)
    assert app.state.chat_template == "alpaca"
    assert app.state.model_name == tiny_chat_checkpoint.name
    from fastapi.testclient import TestClient

    local = TestClient(app, base_url="http://127.0.0.1:8123")
    assert local.get("/v1/models").status_code == 401  # the key came from $SCRATCHGPT_API_KEY
    assert local.get("/v1/models", headers={"Authorization": "Bearer from-env"}).status_code == 200
    # Bound to loopback, it refuses other Host names (a DNS-rebinding page would send its own).
    rebound = TestClient(app, base_url="http://attacker.example:8123")
    assert_openai_error(rebound.get("/health"), 400, code="invalid_host")


def test_cli_serve_flags():
    from scratchgpt.cli import build_parser, read_config_sections

    args = build_parser().parse_args(["serve", "--checkpoint", "runs/x", "--max-batch-size", "4", "--port", "9000"])
    assert args.func.__name__ == "_run_serve"
    configs, _ = read_config_sections(args)
    assert (configs["serve"].port, configs["limits"].max_batch_size, configs["serve"].host) == (9000, 4, "127.0.0.1")
