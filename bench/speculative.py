"""Speculative decoding on real text: a trained model, a trained 2-layer draft, greedy, same tokens.

Trains two character-level models on the demo corpus (Tiny Shakespeare by default, `--text` for
another) with `scratchgpt train` and the speedrun recipe (configs/shakespeare_char_speedrun.toml):
  - the target: --target-layers x --target-embd (8 x 384 by default, 14M parameters, 600 steps), and
  - the draft: --draft-layers x --draft-embd (2 x 128, 0.4M parameters, 1,500 steps), same tokenizer.
Both runs are kept in --out-dir and reused by the next run of this script (--retrain to start over).
Then, for --prompts held-out prompts (from the last 10% of the text, which training's val split
holds), it decodes --new-tokens greedy tokens with the target alone and with `draft=` (what
`scratchgpt generate --draft` does), and prints one JSON line: both models' bits per byte on the
held-out text (issue 8's eval), the best tok/s of each way, the speed-up (median of back-to-back
paired runs), the draft's acceptance rate and whether every prompt gave the same tokens (greedy
speculative decoding is exact by construction).

Why these sizes: on a CPU a decoding step of a small model costs mostly fixed per-layer overhead,
so a draft only pays when the target's step is much dearer than the draft's; a 2-layer 128-wide
draft costs about a sixth of an 8-layer 384-wide target per token; and a draft trained longer agrees
with the target more often (measured: 600 draft steps gave 54% acceptance and 1.26x, 1,500 gave 64%
and 1.67x).

    .venv/bin/python bench/speculative.py        # trains once (~15 min on 2 cores), then measures (~1.5 min)
    .venv/bin/python bench/speculative.py --target-steps 20 --draft-steps 20 --prompts 2   # smoke test
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from scratchgpt.config import DRAFT_TOKENS

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT.parent / "shared" / "data" / "text" / "tinyshakespeare.txt"


def train(name: str, args: argparse.Namespace, *, layers: int, embd: int, heads: int, steps: int) -> Path:
    """Train one model with the CLI (unless a finished run is already there); its run directory."""
    out = Path(args.out_dir) / name
    if (out / "model.safetensors").is_file() and not args.retrain:
        return out
    cmd = [sys.executable, "-m", "scratchgpt", "train", "-c", str(ROOT / "configs" / "shakespeare_char_speedrun.toml"),
           "--source", args.text, "--dir", args.data_dir, "--out-dir", str(out), "--overwrite",
           "--n-layer", str(layers), "--n-embd", str(embd), "--n-head", str(heads),
           "--block-size", str(args.context), "--n-positions", str(args.context),
           "--max-steps", str(steps), "--batch-size", str(args.batch_size), "--dtype", "auto",
           "--eval-interval", str(steps), "--no-progress", "--no-plot"]
    print(f"[speculative] training {name}: {layers} layers x {embd}, {steps} steps", file=sys.stderr)
    subprocess.run(cmd, check=True, stdout=sys.stderr)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text", default=str(TEXT), help="the corpus (default: Tiny Shakespeare, shared data)")
    parser.add_argument("--data-dir", default=str(ROOT / ".cache" / "data" / "shakespeare_char"))
    parser.add_argument("--out-dir", default=str(ROOT / "runs" / "bench_speculative"))
    parser.add_argument("--retrain", action="store_true", help="train both models again even if runs exist")
    parser.add_argument("--context", type=int, default=128, help="block size and n_positions of both models")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--target-layers", type=int, default=8)
    parser.add_argument("--target-embd", type=int, default=384)
    parser.add_argument("--target-heads", type=int, default=6)
    parser.add_argument("--target-steps", type=int, default=600)
    parser.add_argument("--draft-layers", type=int, default=2)
    parser.add_argument("--draft-embd", type=int, default=128)
    parser.add_argument("--draft-heads", type=int, default=4)
    parser.add_argument("--draft-steps", type=int, default=1500)
    parser.add_argument("--draft-tokens", type=int, default=DRAFT_TOKENS, help="tokens the draft proposes per round")
    parser.add_argument("--prompts", type=int, default=8, help="held-out prompts")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=5,
                        help="paired timings (plain, speculative) over all prompts; the median ratio is reported")
    args = parser.parse_args()

    from scratchgpt import SamplingConfig
    from scratchgpt.checkpoint import load_any
    from scratchgpt.device import cpu_capability
    from scratchgpt.eval.perplexity import evaluate_perplexity, text_document
    from scratchgpt.inference.generate import choose_decode_path, generate

    target_dir = train("target", args, layers=args.target_layers, embd=args.target_embd, heads=args.target_heads,
                       steps=args.target_steps)
    draft_dir = train("draft", args, layers=args.draft_layers, embd=args.draft_embd, heads=args.draft_heads,
                      steps=args.draft_steps)
    target, tok = load_any(target_dir)
    draft, _ = load_any(draft_dir)
    for m in (target, draft):
        choose_decode_path(m)  # what `scratchgpt generate` does before decoding

    text = Path(args.text).read_text(encoding="utf-8")
    tail = text[int(len(text) * 0.9) :]
    held_out = tok.encode(tail)
    quality = {}
    for name, m in (("target", target), ("draft", draft)):
        r = evaluate_perplexity(m, tok, text_document(tail, tok, name="held-out"), context=args.context,
                                prefix_eot=False)
        quality[name] = {"parameters": m.num_parameters(), "layers": m.config.n_layer, "embd": m.config.n_embd,
                         "held_out_loss": round(r.loss, 4), "bits_per_byte": round(r.bits_per_byte, 4)}

    starts = torch.linspace(0, len(held_out) - args.prompt_len - 1, args.prompts).long().tolist()
    prompts = [held_out[s : s + args.prompt_len] for s in starts]
    greedy = SamplingConfig(max_new_tokens=args.new_tokens, temperature=0.0, stop_at_eot=False)

    def decode(prompt: list[int], with_draft: bool, stats: dict[str, int]) -> list[int]:
        return generate(target, prompt, greedy, draft=draft if with_draft else None, draft_tokens=args.draft_tokens,
                        stats=stats)[0]

    stats: dict[str, int] = {}
    plain_out = [decode(p, False, {}) for p in prompts]  # also the warm-up
    spec_out = [decode(p, True, stats) for p in prompts]
    n_tokens = sum(len(o) for o in plain_out)
    # Paired timings: each prompt is decoded both ways back to back (the order alternating), so the two
    # runs of a pair are a fraction of a second apart; a repeat sums its pairs over all prompts, and the
    # speed-up is the median of the repeats' ratios, which a shared machine's slow spells distort least.
    pairs: list[dict[str, float]] = []
    for rep in range(args.repeats):
        pair = {"plain": 0.0, "speculative": 0.0}
        for i, prompt in enumerate(prompts):
            for name, flag in ((("plain", False), ("speculative", True)) if (rep + i) % 2 == 0
                               else (("speculative", True), ("plain", False))):
                t0 = time.perf_counter()
                decode(prompt, flag, {})
                pair[name] += time.perf_counter() - t0
        pairs.append(pair)
    ratios = sorted(p["plain"] / p["speculative"] for p in pairs)
    speedup = statistics.median(ratios)
    plain_tps = n_tokens / min(p["plain"] for p in pairs)
    spec_tps = n_tokens / min(p["speculative"] for p in pairs)
    print(json.dumps({
        "bench": "speculative", **cpu_capability(), "threads": torch.get_num_threads(),
        "corpus": Path(args.text).name, "models": quality, "draft_tokens": args.draft_tokens,
        "prompts": len(prompts), "prompt_tokens": args.prompt_len, "new_tokens": args.new_tokens,
        "plain_tok_s": round(plain_tps, 1), "speculative_tok_s": round(spec_tps, 1),
        "speedup": round(speedup, 3), "speedup_per_pair": [round(r, 3) for r in ratios],
        "acceptance": round(stats["accepted"] / max(stats["drafted"], 1), 3),
        "same_tokens": f"{sum(a == b for a, b in zip(plain_out, spec_out, strict=True))}/{len(prompts)}",
    }))


if __name__ == "__main__":
    main()
