"""Greedy decode speed: GPT-2 124M (random weights), batch 1, 16-token prompt, 128 new tokens, fp32, CPU.

Prints one JSON line with tokens/s for scratchgpt and for transformers' `generate` in the same run,
and their ratio. Weights are identical (scratchgpt loads the transformers model's state dict), and
the two must produce the same tokens, which the benchmark checks.
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
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import GPT2Config, GPT2LMHeadModel

    from scratchgpt import GPT, GPTConfig, SamplingConfig
    from scratchgpt.checkpoint import hf_to_scratchgpt
    from scratchgpt.generate import generate

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

    def run_hf() -> list[int]:
        with torch.inference_mode():
            out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=args.new_tokens,
                              min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
        return out[0, args.prompt_len :].tolist()

    same = run_ours() == run_hf()  # also the warm-up of both
    ours_tps = _best_rate(run_ours, repeats=args.repeats, n_tokens=args.new_tokens)
    hf_tps = _best_rate(run_hf, repeats=args.repeats, n_tokens=args.new_tokens)
    print(json.dumps({
        "bench": "generate", "model": args.model, "batch": 1, "prompt_tokens": args.prompt_len,
        "new_tokens": args.new_tokens, "dtype": "float32", "threads": torch.get_num_threads(),
        "scratchgpt_tok_s": round(ours_tps, 2), "transformers_tok_s": round(hf_tps, 2),
        "ratio": round(ours_tps / hf_tps, 3), "same_tokens": same,
    }))


if __name__ == "__main__":
    main()
