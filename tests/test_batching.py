"""Batched decoding without HTTP: rows joining and leaving a running batch, the scheduler's fairness and
refusals. Nothing here needs FastAPI, pydantic or uvicorn.

The model is the server tests' tiny one (2 layers, 32 wide, 64-token context, GPT-2 tokenizer, random
weights); every text is checked against `generate` run directly on the same weights.
"""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys

import pytest
import torch

from scratchgpt import SamplingConfig
from scratchgpt.checkpoint import load_any
from scratchgpt.config import ServeLimits
from scratchgpt.inference.batching import (
    MAX_BACKLOG,
    DecodeBatch,
    Event,
    Job,
    Refused,
    Row,
    Scheduler,
    job_rows,
)
from scratchgpt.inference.generate import generate


@pytest.fixture(scope="module")
def loaded(tiny_chat_checkpoint):
    return load_any(tiny_chat_checkpoint)


@pytest.fixture(scope="module")
def model(loaded):
    return loaded[0]


@pytest.fixture(scope="module")
def tok(loaded):
    return loaded[1]


def greedy_ids(model, tok, prompt_ids, max_new):
    return generate(model, prompt_ids, SamplingConfig(max_new_tokens=max_new, temperature=0.0), eot_id=tok.eot_id)[0]


def test_batching_imports_without_the_serve_extra():
    # Blocking the modules makes any import of them fail, as on an install without `scratchgpt[serve]`.
    code = ("import sys\nfor name in ('fastapi', 'starlette', 'uvicorn', 'pydantic', 'h11'): sys.modules[name] = None\n"
            "import scratchgpt.inference.batching\nprint('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


# ---------------------------------------------------------------------------------------------
# The decoder on its own: rows joining and leaving a running batch
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampling", [
    dict(temperature=0.0),
    dict(temperature=0.9, top_k=40),
    dict(temperature=1.0, top_p=0.9, repetition_penalty=1.3),
])
def test_rows_joining_a_running_batch_decode_as_if_alone(model, tok, sampling):



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

# ---------------------------------------------------------------------------------------------
# Fairness: a small request is not queued behind every row of big ones
# ---------------------------------------------------------------------------------------------


def _job(model, tok, loop, n, max_tokens, seed=0):

    job = Job(loop)
    sampling = SamplingConfig(max_new_tokens=max_tokens, temperature=0.0)
    job.rows = job_rows(job, [(1, 2, 3)], [sampling], n=n, seed=seed, device="cpu")
    return job


def test_a_small_request_is_not_queued_behind_big_ones(model, tok):



    loop = asyncio.new_event_loop()
    scheduler = Scheduler(model, tok, limits=ServeLimits(max_batch_size=8, batch_window_ms=0))
    big = [_job(model, tok, loop, n=16, max_tokens=20, seed=i) for i in range(4)]  # 64 rows, 8 waves by row
    for job in big:
        scheduler.submit(job)
    scheduler._admit()
    scheduler._step()
    small = _job(model, tok, loop, n=1, max_tokens=4)
    scheduler.submit(small)
    steps = 0
    while small.decoding or small.waiting:
        scheduler._admit()
        scheduler._step()
        steps += 1
        assert steps < 200
    # First come, first served by row it would wait for 8 waves of 20 steps; fairly, for one row to end.
    assert steps <= 20 + 4
    # Rows are shared out by request: 8 slots over 4 big requests is 2 each (one just freed by the small one).
    scheduler._admit()
    assert [j.decoding for j in big] == [2, 2, 2, 2]
    loop.close()


def test_a_request_whose_client_is_not_reading_gets_no_new_rows(model, tok):



    loop = asyncio.new_event_loop()
    scheduler = Scheduler(model, tok, limits=ServeLimits(max_batch_size=8, batch_window_ms=0))
    stalled, other = _job(model, tok, loop, n=4, max_tokens=5), _job(model, tok, loop, n=4, max_tokens=5, seed=9)
    stalled.emitted = MAX_BACKLOG + 1  # as if that many events were waiting for a client that does not read
    scheduler.submit(stalled)
    scheduler.submit(other)
    scheduler._admit()
    assert (stalled.decoding, other.decoding) == (0, 4)
    stalled.consumed = stalled.emitted  # it caught up
    scheduler._admit()
    assert stalled.decoding == 4
    loop.close()


def test_rows_of_a_client_that_stops_reading_pause_and_resume_where_they_were(model, tok):



    loop = asyncio.new_event_loop()
    scheduler = Scheduler(model, tok, limits=ServeLimits(max_batch_size=8, batch_window_ms=0))
    job = _job(model, tok, loop, n=2, max_tokens=12)
    scheduler.submit(job)
    scheduler._admit()
    for _ in range(5):
        scheduler._step()
    assert job.decoding == 2 and all(len(r.tokens) == 5 for r in job.rows)
    job.emitted += MAX_BACKLOG + 1  # its client stopped reading
    scheduler._pause_unread()
    assert (job.decoding, len(job.waiting), len(scheduler.batch)) == (0, 2, 0)
    scheduler._admit()
    assert job.decoding == 0  # still not reading: it stays paused
    job.consumed = job.emitted
    while job.waiting or job.decoding:
        scheduler._admit()
        scheduler._step()
    # Resumed from prompt + its first 5 tokens, it ends as an uninterrupted greedy run does.
    expected = greedy_ids(model, tok, [1, 2, 3], 12)
    for row in job.rows:
        assert row.tokens[: len(expected)] == expected and row.completion.finish_reason is not None
    loop.close()

# ---------------------------------------------------------------------------------------------
# Rows and refusals
# ---------------------------------------------------------------------------------------------


def test_job_rows_are_prompt_major_and_seeded_seed_plus_index():
    job = Job(asyncio.new_event_loop())
    samplings = [SamplingConfig(max_new_tokens=3), SamplingConfig(max_new_tokens=5)]
    rows = job_rows(job, [(1, 2), (3,)], samplings, n=2, seed=10, device="cpu")
    assert [(r.index, r.prompt, r.sampling.max_new_tokens) for r in rows] == [
        (0, [1, 2], 3), (1, [1, 2], 3), (2, [3], 5), (3, [3], 5)]
    for row in rows:
        expected = torch.Generator().manual_seed(10 + row.index)
        assert torch.equal(torch.rand(4, generator=row.generator), torch.rand(4, generator=expected))
    # A negative seed wraps into the generator's range instead of failing.
    (row,) = job_rows(job, [(1,)], samplings[:1], n=1, seed=-1, device="cpu")
    assert row.generator.initial_seed() == 2**64 - 1
    job.loop.close()


def test_the_scheduler_refuses_past_max_requests_and_when_draining(model, tok):
    loop = asyncio.new_event_loop()
    scheduler = Scheduler(model, tok, limits=ServeLimits(max_requests=1, batch_window_ms=0))
    first, second = (_job(model, tok, loop, n=1, max_tokens=2) for _ in range(2))
    scheduler.submit(first)
    with pytest.raises(Refused, match="busy") as busy:
        scheduler.submit(second)
    assert busy.value.code == "server_overloaded"
    scheduler.release(first)
    scheduler.submit(second)  # the slot is free again
    scheduler.drain(10.0)
    with pytest.raises(Refused, match="shutting down") as closing:
        scheduler.submit(first)
    assert closing.value.code == "server_shutting_down"
    loop.close()


def test_a_job_hears_its_events_on_its_own_event_loop(model, tok):
    async def run() -> list[Event]:
        scheduler = Scheduler(model, tok, limits=ServeLimits(batch_window_ms=0))
        scheduler.start()
        try:
            job = _job(model, tok, asyncio.get_running_loop(), n=1, max_tokens=4)
            scheduler.submit(job)
            events = [await asyncio.wait_for(job.next_event(), 30)]
            while not events[-1].finish_reason:
                events.append(await asyncio.wait_for(job.next_event(), 30))
            scheduler.release(job)
            return events
        finally:
            await asyncio.to_thread(scheduler.close)

    events = asyncio.run(run())
    assert events[-1].finish_reason == "length" and events[-1].completion_tokens == 4
    assert "".join(e.text for e in events) == tok.decode(greedy_ids(model, tok, [1, 2, 3], 4))
