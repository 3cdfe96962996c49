"""Benchmark: GPT-2 BPE encode throughput and BPE training time, scratchgpt vs Hugging Face `tokenizers`.

Prints one JSON line. Encoding: the whole of Tiny Shakespeare as one string, and as a batch of its
speeches, best of --repeats runs (the pure-Python BPE is timed cold, right after loading, and warm,
with its chunk cache filled). Ratios above 1 mean scratchgpt is faster.
Training: --merges merges on Tiny Shakespeare, once each.

    .venv/bin/python bench/tokenizer.py [--data-dir ../shared/data] [--merges 2000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import pre_tokenizers, trainers

from scratchgpt.data.tokenizers import EOT_TEXT, ByteBPETokenizer, GPT2Tokenizer
from scratchgpt.device import cpu_capability

REPO_ROOT = Path(__file__).resolve().parents[1]


def best_seconds(fn: Callable[[], Any], repeats: int) -> float:
    """The fastest of `repeats` timed calls of `fn`."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """(fn(), seconds it took)."""
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def bench_encode(gpt2_dir: Path, text: str, repeats: int) -> dict[str, Any]:
    mb = len(text.encode("utf-8")) / 1e6
    ours = GPT2Tokenizer.from_dir(gpt2_dir)
    reference = ours.encode(text)
    tiktoken_s = best_seconds(lambda: ours.encode(text), repeats)

    python_bpe = ByteBPETokenizer.from_gpt2_files(gpt2_dir / "encoder.json", gpt2_dir / "vocab.bpe")
    python_ids, cold_s = timed(lambda: python_bpe.encode(text))
    warm_s = best_seconds(lambda: python_bpe.encode(text), repeats)

    # The two GPT-2 files are exactly `tokenizers`' vocab.json / merges.txt under other names.
    hf = tokenizers.ByteLevelBPETokenizer(str(gpt2_dir / "encoder.json"), str(gpt2_dir / "vocab.bpe"))
    hf_ids = hf.encode(text).ids
    hf_s = best_seconds(lambda: hf.encode(text), repeats)

    # One giant string is not `tokenizers`' fast path: also time both Rust encoders on a batch of
    # speeches (blank-line separated), where each parallelises over the batch.
    speeches = [s + "\n\n" for s in text.split("\n\n")]
    tiktoken_batch_s = best_seconds(lambda: ours.encode_batch(speeches), repeats)
    hf_batch_s = best_seconds(lambda: hf.encode_batch(speeches), repeats)
    return {
        "corpus_mb": round(mb, 3),
        "tokens": len(reference),
        "ids_match_tiktoken": {"python_bpe": python_ids == reference, "hf_tokenizers": hf_ids == reference},
        "mb_per_s": {
            "scratchgpt_tiktoken": round(mb / tiktoken_s, 2),
            "scratchgpt_python_bpe_cold": round(mb / cold_s, 2),
            "scratchgpt_python_bpe_warm": round(mb / warm_s, 2),
            "hf_tokenizers": round(mb / hf_s, 2),
            "scratchgpt_tiktoken_batch": round(mb / tiktoken_batch_s, 2),
            "hf_tokenizers_batch": round(mb / hf_batch_s, 2),
        },
        "ratio_vs_hf": {
            "scratchgpt_tiktoken": round(hf_s / tiktoken_s, 2),
            "scratchgpt_python_bpe_cold": round(hf_s / cold_s, 2),
            "scratchgpt_tiktoken_batch": round(hf_batch_s / tiktoken_batch_s, 2),
            "scratchgpt_python_bpe_cold_vs_hf_batch": round(hf_batch_s / cold_s, 2),
        },
    }


def bench_train(text: str, n_merges: int) -> dict[str, Any]:
    vocab_size = 256 + n_merges + 1  # bytes + merges + <|endoftext|>
    ours, ours_s = timed(lambda: ByteBPETokenizer.train(text, vocab_size))

    hf = tokenizers.Tokenizer(tokenizers.models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    _, hf_s = timed(lambda: hf.train_from_iterator([text], trainer))
    return {
        "merges": {"scratchgpt": len(ours.merges), "hf_tokenizers": hf.get_vocab_size() - 257},
        "seconds": {"scratchgpt": round(ours_s, 3), "hf_tokenizers": round(hf_s, 3)},
        "ratio_hf_over_ours": round(hf_s / ours_s, 2),
        # Same corpus, same merge budget: the token counts show both learned comparable merges.
        "corpus_tokens": {"scratchgpt": len(ours.encode(text)), "hf_tokenizers": len(hf.encode(text).ids)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=REPO_ROOT.parent / "shared" / "data",
                        help="folder holding gpt2/ and text/tinyshakespeare.txt")
    parser.add_argument("--merges", type=int, default=2000, help="merges to learn in the training benchmark")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per encoder (best is kept)")
    args = parser.parse_args()

    text = (args.data_dir / "text" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    result = {
        "benchmark": "tokenizer",
        "corpus": "tinyshakespeare",
        "encode": bench_encode(args.data_dir / "gpt2", text, args.repeats),
        "train": bench_train(text, args.merges),
        "env": {"python": platform.python_version(), "tokenizers": tokenizers.__version__,
                "cpu_count": os.cpu_count(), **cpu_capability()},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
