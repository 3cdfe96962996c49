"""Instruction evaluation with a judge: generate answers, have another model score each 0-100.

The judge is any OpenAI-compatible chat endpoint (Ollama, llama.cpp's server, vLLM, `scratchgpt
serve`): one POST {base_url}/chat/completions per answer, temperature 0, with JUDGE_PROMPT as the
user message. The first integer in [0, 100] in the reply is the score; a reply without one is counted
as unparsable, never fatal. Transport failures (connection refused, timeouts, 429/5xx) are retried
with backoff; an endpoint that stays down or answers something that is not a chat completion is a
JudgeError (one line, non-zero exit).
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from typing import Any

JUDGE_PROMPT = (
    "Given the input `{prompt}` and correct output `{output}`, score the model response `{response}` "
    "on a scale from 0 to 100, where 100 is the best score. Respond with the integer number only."
)

_INT = re.compile(r"(?<![\d.])(\d{1,3})(?!\d|\.\d)")


class JudgeError(ValueError):
    """The judge endpoint is unreachable or does not speak the OpenAI chat-completions protocol."""


def parse_score(reply: str) -> int | None:
    """The first integer in [0, 100] in the judge's reply, or None."""
    for m in _INT.finditer(reply or ""):
        value = int(m.group(1))
        if value <= 100:
            return value
    return None


def judge_prompt(entry: dict[str, Any], response: str) -> str:
    """The judge's user message for one answer (the instruction and its input form the prompt)."""
    prompt = entry["instruction"] + (f"\n\n{entry['input']}" if entry.get("input") else "")
    return JUDGE_PROMPT.format(prompt=prompt, output=entry.get("output", ""), response=response)


class JudgeClient:
    """A minimal OpenAI chat-completions client with retries (httpx)."""

    def __init__(self, base_url: str, *, model: str, api_key: str | None = None, timeout: float = 60.0,
                 retries: int = 3, backoff: float = 0.5, max_tokens: int = 16) -> None:
        import httpx

        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.retries, self.backoff, self.max_tokens = model, retries, backoff, max_tokens
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(timeout=timeout, headers=headers)

    def close(self) -> None:
        self._client.close()

    def complete(self, content: str) -> str:
        """The judge's reply text to one user message."""
        import httpx

        body = {"model": self.model, "messages": [{"role": "user", "content": content}], "temperature": 0.0,
                "max_tokens": self.max_tokens}
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                r = self._client.post(self.url, json=body)
            except httpx.HTTPError as e:
                last = f"{type(e).__name__}: {e}"
                continue
            if r.status_code == 429 or r.status_code >= 500:
                last = f"HTTP {r.status_code}"
                continue
            if r.status_code in (400, 413):
                # This one request was refused (e.g. longer than the judge's context): its answer goes
                # unscored and is counted; the other answers can still be judged.
                return ""
            if r.status_code != 200:
                raise JudgeError(f"judge endpoint {self.url} answered HTTP {r.status_code}: {r.text[:200]!r}")
            try:
                return str(r.json()["choices"][0]["message"]["content"] or "")
            except (ValueError, KeyError, IndexError, TypeError):
                raise JudgeError(f"judge endpoint {self.url} did not return an OpenAI chat completion "
                                 f"(got {r.text[:120]!r}); is it an OpenAI-compatible /v1 base URL?") from None
        raise JudgeError(f"judge endpoint {self.url} failed after {self.retries + 1} tries ({last}); "
                         f"start the judge server or pass the right --judge-url")


def judge_answers(answers: Sequence[dict[str, Any]], client: JudgeClient, *, progress: bool = False) -> dict[str, Any]:
    """Score each answer (dict with instruction, input, output, model_response); mean, histogram, scored rows."""
    from tqdm.auto import tqdm

    rows = []
    for a in tqdm(answers, desc="judging", disable=not progress, leave=False):
        reply = client.complete(judge_prompt(a, a["model_response"]))
        rows.append({**a, "judge_reply": reply, "score": parse_score(reply)})
    scores = [r["score"] for r in rows if r["score"] is not None]
    bins = [0] * 10  # 0-9, 10-19, ..., 90-100
    for s in scores:
        bins[min(s // 10, 9)] += 1
    mean = sum(scores) / len(scores) if scores else None
    return {"answers": len(rows), "scored": len(scores), "unparsable": len(rows) - len(scores),
            "mean_score": mean, "rows": rows,
            "histogram": {f"{10 * i}-{10 * i + 9 if i < 9 else 100}": n for i, n in enumerate(bins)}}


def evaluate_instructions(
    model: Any, tokenizer: Any, entries: Sequence[dict[str, Any]], client: JudgeClient, *, template: str,
    max_new_tokens: int = 256, batch_size: int = 8, progress: bool = False,
) -> dict[str, Any]:
    """Greedy answers to `entries` (instruct's own generate_responses), then the judge's scores."""
    from scratchgpt.training.modes.instruct import generate_responses

    t0 = time.perf_counter()
    answers = generate_responses(model, tokenizer, entries, template=template, max_new_tokens=max_new_tokens,
                                 batch_size=batch_size)
    gen_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = judge_answers(answers, client, progress=progress)
    out.update(generate_seconds=gen_seconds, judge_seconds=time.perf_counter() - t0)
    return out
