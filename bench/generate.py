"""Greedy decode speed: GPT-2 124M (random weights), batch 1, 16-token prompt, 128 new tokens, fp32, CPU.

Prints one JSON line with tokens/s for scratchgpt and for transformers' `generate` in the same run,
and their ratio, twice: plain greedy decoding (one forward pass per token), and prompt-lookup decoding
in both libraries (`prompt_lookup=` / `prompt_lookup_num_tokens=`). Weights are identical (scratchgpt
loads the transformers model's state dict), and all runs must produce the same tokens (checked).

Caveat for reading the lookup numbers: a randomly initialised GPT-2 decoded greedily falls into long
runs of one token, which prompt lookup predicts perfectly; on real text its gain is much smaller.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def _best_rate(fn, *, repeats: int, n_tokens: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return n_tokens / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt2", help="GPT-2 preset to build with random weights")
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per implementation (best is kept)")
    parser.add_argument("--lookup", type=int, default=10, help="draft tokens for prompt-lookup decoding")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import GPT2Config, GPT2LMHeadModel

    from scratchgpt import GPT, GPTConfig, SamplingConfig
    from scratchgpt.checkpoint import hf_to_scratchgpt
    from scratchgpt.inference.generate import generate

    torch.manual_seed(0)
    config = GPTConfig.from_name(args.model)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=config.n_layer, n_head=config.n_head, n_embd=config.n_embd)).eval()
    ours = GPT(config, device="meta")
    ours.load_state_dict(hf_to_scratchgpt(hf.state_dict()), strict=False, assign=True)
    ours.lm_head.weight = ours.transformer.wte.weight
    ours.reset_buffers(device="cpu")
    ours.eval()

    prompt = torch.randint(0, config.vocab_size, (1, args.prompt_len), generator=torch.Generator().manual_seed(1))
    sampling = SamplingConfig(max_new_tokens=args.new_tokens, temperature=0.0)

    def run_ours() -> list[int]:
        return generate(ours, prompt, sampling)[0]

    def run_ours_lookup() -> list[int]:
        return generate(ours, prompt, sampling, prompt_lookup=args.lookup)[0]

    def run_hf(**extra) -> list[int]:
        with torch.inference_mode():
            out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=args.new_tokens,
                              min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0, **extra)
        return out[0, args.prompt_len :].tolist()

    def run_hf_lookup() -> list[int]:
        return run_hf(prompt_lookup_num_tokens=args.lookup)

    # The first calls are also the warm-up; all four must agree on the greedy tokens.
    reference = run_hf()
    same = run_ours() == reference and run_ours_lookup() == reference and run_hf_lookup() == reference
    rate = lambda fn: _best_rate(fn, repeats=args.repeats, n_tokens=args.new_tokens)  # noqa: E731
    ours_tps, hf_tps = rate(run_ours), rate(run_hf)
    ours_lk, hf_lk = rate(run_ours_lookup), rate(run_hf_lookup)
    print(json.dumps({
        "bench": "generate", "model": args.model, "batch": 1, "prompt_tokens": args.prompt_len,
        "new_tokens": args.new_tokens, "dtype": "float32", "threads": torch.get_num_threads(),
        "scratchgpt_tok_s": round(ours_tps, 2), "transformers_tok_s": round(hf_tps, 2),
        "ratio": round(ours_tps / hf_tps, 3),
        "prompt_lookup": args.lookup,
        "scratchgpt_lookup_tok_s": round(ours_lk, 2), "transformers_lookup_tok_s": round(hf_lk, 2),
        "lookup_ratio": round(ours_lk / hf_lk, 3), "lookup_vs_transformers_plain": round(ours_lk / hf_tps, 3),
        "same_tokens": same,
    }))


if __name__ == "__main__":
    main()
