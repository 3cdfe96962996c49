"""Batched decoding for the server: rows join and leave one KV-cached batch, one thread owns the model.

    DecodeBatch   rows decoded together with one KV cache; rows join and leave between decode steps
    Scheduler     one thread: gathers queued rows fairly, steps the batch, hands events to each request
    Job, Row      one request being served, and one choice of it to generate
    job_rows      a request's prompts x n choices as rows, each with its own seeded generator

Nothing here speaks HTTP or OpenAI's protocol (that is `openai_api` and `serve`), so it imports and
tests without FastAPI. Each row samples with its own `torch.Generator` and sits right-aligned in the
shared cache with the columns to its left masked out, so its text does not depend on what else is
being decoded.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from scratchgpt.config import SamplingConfig, ServeLimits
from scratchgpt.inference.generate import Completion, decode_one_token, left_pad, prefill, sample_rows
from scratchgpt.model.gpt import GPT, KVCache

logger = logging.getLogger(__name__)


class Refused(Exception):
    """The scheduler takes no new job now; `code` says why: "server_overloaded" or "server_shutting_down"."""

    def __init__(self, message: str, *, code: str):
        super().__init__(message)
        self.code = code


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
        """Queue a job's rows; `Refused` when shutting down or `max_requests` are already in flight."""
        with self._cond:
            if self._closed or self._drain_deadline is not None:
                raise Refused("the server is shutting down", code="server_shutting_down")
            if self._jobs >= self.limits.max_requests:
                raise Refused(f"the server is busy ({self._jobs} requests in flight); retry shortly",
                              code="server_overloaded")
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


def job_rows(
    job: Job, prompts: Sequence[Sequence[int]], samplings: Sequence[SamplingConfig], *, n: int, seed: int | None,
    device: torch.device | str,
) -> list[Row]:
    """Prompt i's n choices as rows: copy j is choice i * n + j, seeded `seed + index` (drawn when None)."""
    rows = []
    for i, (prompt, sampling) in enumerate(zip(prompts, samplings, strict=True)):
        for j in range(n):
            index = i * n + j
            # Without a seed, draw one: never touch the global RNG another thread might use.
            row_seed = (seed + index) % 2**64 if seed is not None else secrets.randbits(63)
            rows.append(Row(job, index, list(prompt), sampling, torch.Generator(device=device).manual_seed(row_seed)))
    return rows
