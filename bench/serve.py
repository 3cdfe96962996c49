"""Serving throughput: concurrent clients against `scratchgpt serve`, batched vs one request at a time.

Saves a small random model (default 6 layers x 384 wide, 256-token context, GPT-2 tokenizer), then
starts the real server as a subprocess on loopback twice: with `--max-batch-size` = the number of
clients, and with `--max-batch-size 1`. In each mode, `--clients` asyncio clients send completions
(`--max-tokens` tokens, temperature 1, seeded) back to back for `--seconds`. Prints one JSON line:
requests/s, tokens/s and p50/p99 latency per mode, and the batched/one-at-a-time gain.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

PROMPTS = [
    "The history of the city begins",
    "In a small village by the sea, there lived an old fisherman who",
    "Scientists announced today that",
    "Once upon a time",
    "The recipe calls for two cups of flour, a pinch of salt and",
    "Dear diary,",
]
MODEL_NAME = "bench"


def save_random_model(directory: Path, *, layers: int, width: int, heads: int, context: int, gpt2_dir: str | None):
    from scratchgpt import GPT, GPTConfig
    from scratchgpt.checkpoint import save_model
    from scratchgpt.data.tokenizers import gpt2_tokenizer

    tokenizer = gpt2_tokenizer(gpt2_dir)
    config = GPTConfig(vocab_size=tokenizer.vocab_size, n_positions=context, n_embd=width, n_layer=layers,
                       n_head=heads)
    model = GPT(config, generator=torch.Generator().manual_seed(0))
    save_model(model, directory, tokenizer=tokenizer, extra={"chat_template": "alpaca"})
    return model.num_parameters()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(checkpoint: Path, *, max_batch_size: int, threads: int | None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, "-m", "scratchgpt", "serve", "--checkpoint", str(checkpoint), "--port", str(port),
           "--model-name", MODEL_NAME, "--max-batch-size", str(max_batch_size), "--log-level", "warning"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.terminate()
    raise RuntimeError("the server did not come up within 120 s")


async def run_clients(url: str, *, clients: int, seconds: float, max_tokens: int) -> dict[str, float]:
    """`clients` loops sending completions back to back until `seconds` have passed."""
    latencies: list[float] = []
    tokens = 0

    async def client(i: int, http: httpx.AsyncClient, deadline: float) -> None:
        nonlocal tokens
        k = 0
        while time.perf_counter() < deadline:
            body = {"model": MODEL_NAME, "prompt": PROMPTS[(i + k) % len(PROMPTS)], "max_tokens": max_tokens,
                    "temperature": 1.0, "seed": 1000 * i + k}
            t0 = time.perf_counter()
            r = await http.post("/v1/completions", json=body)
            r.raise_for_status()
            latencies.append(time.perf_counter() - t0)
            tokens += r.json()["usage"]["completion_tokens"]
            k += 1

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as http:
        # Warm-up, not timed: one short request per client.
        await asyncio.gather(*(http.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "Hi",
                                                                    "max_tokens": 4}) for _ in range(clients)))
        latencies.clear()
        tokens = 0
        start = time.perf_counter()
        await asyncio.gather(*(client(i, http, start + seconds) for i in range(clients)))
        elapsed = time.perf_counter() - start  # includes the requests still running at the deadline
    ordered = sorted(latencies)
    return {
        "requests": len(ordered),
        "seconds": round(elapsed, 2),
        "requests_per_s": round(len(ordered) / elapsed, 2),
        "tokens_per_s": round(tokens / elapsed, 1),
        "p50_latency_s": round(statistics.median(ordered), 3),
        "p99_latency_s": round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 3),
    }


def main() -> None:
    from scratchgpt.device import cpu_capability

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients")
    parser.add_argument("--seconds", type=float, default=20.0, help="measured time per mode")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens per completion")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--width", type=int, default=384)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for the server")
    parser.add_argument("--gpt2-dir", help="GPT-2 tokenizer files (default: $SCRATCHGPT_GPT2_DIR or the cache)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="scratchgpt-bench-serve-") as tmp:
        checkpoint = Path(tmp) / MODEL_NAME
        n_params = save_random_model(checkpoint, layers=args.layers, width=args.width, heads=args.heads,
                                     context=args.context, gpt2_dir=args.gpt2_dir)
        results = {}
        for mode, batch_size in (("batched", args.clients), ("one_at_a_time", 1)):
            proc, url = start_server(checkpoint, max_batch_size=batch_size, threads=args.threads)
            try:
                results[mode] = {"max_batch_size": batch_size, **asyncio.run(
                    run_clients(url, clients=args.clients, seconds=args.seconds, max_tokens=args.max_tokens))}
            finally:
                proc.terminate()
                proc.wait(timeout=30)

    batched, single = results["batched"], results["one_at_a_time"]
    print(json.dumps({
        "bench": "serve",
        "model": {"layers": args.layers, "width": args.width, "heads": args.heads, "context": args.context,
                  "parameters": n_params, "tokenizer": "gpt2", "weights": "random"},
        "clients": args.clients,
        "max_tokens": args.max_tokens,
        "seconds_per_mode": args.seconds,
        "cpu_threads": args.threads or torch.get_num_threads(),
        **cpu_capability(),  # which CPU these figures come from
        **results,
        "gain": {
            "requests_per_s": round(batched["requests_per_s"] / single["requests_per_s"], 2),
            "tokens_per_s": round(batched["tokens_per_s"] / single["tokens_per_s"], 2),
            "p50_latency": round(single["p50_latency_s"] / batched["p50_latency_s"], 2),
        },
    }))


if __name__ == "__main__":
    main()
