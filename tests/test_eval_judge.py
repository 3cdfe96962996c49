"""scratchgpt.eval.judge: score parsing, retries, and the judge protocol end to end on loopback servers.

(No `from __future__ import annotations`: FastAPI reads the fake endpoint's `Request` annotation at runtime.)
"""


import json
import socket

import pytest

from scratchgpt.eval.judge import JudgeClient, JudgeError, judge_answers, judge_prompt, parse_score

ANSWERS = [
    {"instruction": "Name the capital of France.", "input": "", "output": "Paris", "model_response": "Paris"},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5", "model_response": "6"},
    {"instruction": "Say hi.", "input": "", "output": "Hi", "model_response": "Hello"},
]


def test_parse_score():
    assert parse_score("85") == 85
    assert parse_score("Score: 100.") == 100
    assert parse_score("I'd give it 7/10... no, 70") == 7
    assert parse_score("The score is 250, I mean 40") == 40  # out of range numbers are skipped
    assert parse_score("3.5") is None and parse_score("") is None and parse_score("great answer") is None


def test_judge_prompt_holds_instruction_input_reference_and_answer():
    text = judge_prompt(ANSWERS[1], "6")
    assert "`Add the numbers.\n\n2 and 3`" in text and "`5`" in text and "`6`" in text and "0 to 100" in text


def fake_judge_app(replies: list, *, fail_first: int = 0):
    """A FastAPI app answering /v1/chat/completions with `replies` in turn (failing the first calls with 503)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse

    app = FastAPI()
    state = {"calls": 0, "bodies": []}
    app.state.judge = state

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        state["calls"] += 1
        state["bodies"].append(await request.json())
        if state["calls"] <= fail_first:
            return JSONResponse({"error": "busy"}, status_code=503)
        reply = replies[(state["calls"] - fail_first - 1) % len(replies)]
        if reply is None:
            return PlainTextResponse("<html>not an API</html>")
        if isinstance(reply, int):
            return JSONResponse({"error": {"message": "refused"}}, status_code=reply)
        return {"choices": [{"index": 0, "message": {"role": "assistant", "content": reply}}]}

    return app


def test_scores_parsed_from_a_fake_openai_endpoint_with_retries(start_server):
    app = fake_judge_app(["90", "Score: 15", "no idea"], fail_first=2)
    url = start_server(app) + "/v1"
    client = JudgeClient(url, model="judge", retries=3, backoff=0.01)
    res = judge_answers(ANSWERS, client)
    client.close()
    assert [r["score"] for r in res["rows"]] == [90, 15, None]
    assert res["scored"] == 2 and res["unparsable"] == 1 and res["mean_score"] == pytest.approx(52.5)
    assert res["histogram"]["90-100"] == 1 and res["histogram"]["10-19"] == 1
    state = app.state.judge
    assert state["calls"] == 5  # two 503s retried, then one call per answer
    assert state["bodies"][-1]["model"] == "judge" and state["bodies"][-1]["temperature"] == 0.0
    assert state["bodies"][-1]["messages"][0]["content"] == judge_prompt(ANSWERS[2], "Hello")


def test_a_refused_request_is_counted_and_a_wrong_url_is_an_error(start_server):
    url = start_server(fake_judge_app(["50", 400, "80"])) + "/v1"
    res = judge_answers(ANSWERS, JudgeClient(url, model="j", backoff=0.01))
    assert [r["score"] for r in res["rows"]] == [50, None, 80] and res["unparsable"] == 1
    with pytest.raises(JudgeError, match="answered HTTP 404"):
        JudgeClient(url.replace("/v1", "/nope"), model="j", backoff=0.01).complete("hi")


def test_garbage_or_down_endpoints_are_one_line_errors(start_server):
    url = start_server(fake_judge_app([None])) + "/v1"
    with pytest.raises(JudgeError, match="did not return an OpenAI chat completion"):
        JudgeClient(url, model="j", backoff=0.01).complete("hi")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(JudgeError, match=r"failed after 2 tries \(ConnectError"):
        JudgeClient(f"http://127.0.0.1:{port}/v1", model="j", retries=1, backoff=0.01).complete("hi")


def test_judge_end_to_end_against_scratchgpt_serve(start_server, tiny_chat_checkpoint, tmp_path):
    """The whole path: `scratchgpt eval judge` answers with one tiny model and is judged by another behind
    `scratchgpt serve`'s API. A random judge replies garbage: counted unparsable, nothing crashes."""
    import subprocess
    import sys

    import torch

    from scratchgpt import GPT, GPTConfig
    from scratchgpt.checkpoint import load_any
    from scratchgpt.inference.serve import create_app

    _, tok = load_any(tiny_chat_checkpoint)
    # The judge needs room for the judge prompt: a tiny random model with a 256-token context.
    judge = GPT(GPTConfig(vocab_size=tok.vocab_size, n_positions=256, n_embd=32, n_layer=1, n_head=2),
                generator=torch.Generator().manual_seed(1)).eval()
    url = start_server(create_app(judge, tok, model_name="judge", chat_template="alpaca")) + "/v1"
    data = tmp_path / "held_out.json"
    data.write_text(json.dumps([{k: a[k] for k in ("instruction", "input", "output")} for a in ANSWERS]))
    proc = subprocess.run(
        [sys.executable, "-m", "scratchgpt", "eval", "judge", "--checkpoint", str(tiny_chat_checkpoint),
         "--data", str(data), "--judge-url", url, "--judge-model", "judge", "--max-new-tokens", "8",
         "--out-dir", str(tmp_path / "r"), "--progress", "false"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "r" / "judge-held_out.json").read_text())
    res = report["results"]
    assert res["answers"] == 3 and res["scored"] + res["unparsable"] == 3
    for row in res["rows"]:
        assert row["score"] == parse_score(row["judge_reply"])
        assert set(row) >= {"instruction", "input", "output", "model_response", "judge_reply", "score"}
    assert "| judge | held_out.json | unparsable |" in proc.stdout

    # The same command against a port nobody listens on: one line, exit 2.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run(
        [sys.executable, "-m", "scratchgpt", "eval", "judge", "--checkpoint", str(tiny_chat_checkpoint),
         "--data", str(data), "--judge-url", f"http://127.0.0.1:{port}/v1", "--retries", "0",
         "--max-new-tokens", "2", "--out-dir", str(tmp_path / "r2"), "--progress", "false"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "judge endpoint" in proc.stderr
