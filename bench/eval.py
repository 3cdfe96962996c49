"""Evaluation speed: multiple choice against lm-evaluation-harness's HF backend; perplexity against a plain forward.

One run, one JSON line:
- the same multiple-choice task (ITEMS items of Tiny Shakespeare: a context of a few lines, the true
  next line among CHOICES lines, written by this bench) and the same random-weight model, scored by
  `scratchgpt eval`'s scorer (one pass per shared context, choices from an expanded KV cache) and by
  lm-eval's `--model hf` on the model saved as a Hugging Face folder (checkpoint.save_hf). Accuracy must
  be identical; the ratio is lm-eval's loglikelihood time / ours (target >= 2).
- perplexity tokens/s (stride = context) against a plain batched forward pass over the same windows
  (target >= 0.9).

Small run to check it works:  python bench/eval.py --layers 2 --embd 64 --heads 2 --ctx 128 --items 40
Real run (GPT-2 124M shape):  python bench/eval.py
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import torch


def write_task(text: str, path: Path, *, items: int, choices: int, seed: int) -> None:
    lines = [ln for ln in text.splitlines() if len(ln.strip()) > 12]
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(items):
            i = rng.randrange(3, len(lines) - 1)
            context = " ".join(lines[i - rng.randint(1, 3) : i])
            options = [lines[i]] + rng.sample(lines, choices - 1)
            order = list(range(choices))
            rng.shuffle(order)
            f.write(json.dumps({"context": context, "choices": [options[k] for k in order],
                                "label": order.index(0)}) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--embd", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--ctx", type=int, default=1024, help="the model's context (n_positions)")
    parser.add_argument("--items", type=int, default=1000, help="multiple-choice items (the issue asks >= 1,000)")
    parser.add_argument("--choices", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16, help="batch size for both implementations")
    parser.add_argument("--ppl-tokens", type=int, default=16_384,
                        help="Tiny Shakespeare tokens for perplexity (16 windows of 1,024: ~40 s a pass at 124M)")
    parser.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("--repeats", type=int, default=2, help="perplexity timings (best kept)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from scratchgpt import GPT, GPTConfig
    from scratchgpt.checkpoint import load_any, save_hf
    from scratchgpt.data.tokenizers import GPT2Tokenizer
    from scratchgpt.device import cpu_capability
    from scratchgpt.eval.multiple_choice import PRESETS, evaluate_choices, read_choice_items
    from scratchgpt.eval.perplexity import evaluate_perplexity

    data = Path(args.data_dir)
    tok = GPT2Tokenizer.from_dir(data / "gpt2")
    text = (data / "text" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    config = GPTConfig(vocab_size=tok.vocab_size, n_positions=args.ctx, n_embd=args.embd, n_layer=args.layers,
                       n_head=args.heads)
    work = Path(tempfile.mkdtemp(prefix="bench-eval-"))
    save_hf(GPT(config, generator=torch.Generator().manual_seed(0)), work / "hf", tokenizer=tok)
    model, tok = load_any(work / "hf")  # both sides read the very same folder
    task = work / "task.jsonl"
    write_task(text, task, items=args.items, choices=args.choices, seed=0)
    (work / "bench_choice.yaml").write_text(
        f"task: bench_choice\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {task}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{context}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: label\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n")

    # -- multiple choice: ours ------------------------------------------------------------------
    items = read_choice_items(task, PRESETS["generic"])
    t0 = time.perf_counter()
    ours = evaluate_choices(model, tok, items, batch_size=args.batch_size)
    ours_s = time.perf_counter() - t0

    # -- multiple choice: lm-eval's HF backend (its loglikelihood call timed alone) --------------
    hf = HFLM(pretrained=str(work / "hf"), device="cpu", batch_size=args.batch_size, dtype="float32")
    timed = {"s": 0.0}
    inner = hf.loglikelihood

    def loglikelihood(requests, *a, **kw):
        t = time.perf_counter()
        out = inner(requests, *a, **kw)
        timed["s"] += time.perf_counter() - t
        return out

    hf.loglikelihood = loglikelihood
    res = lm_eval.simple_evaluate(model=hf, tasks=["bench_choice"], task_manager=TaskManager(include_path=str(work)))
    theirs = res["results"]["bench_choice"]

    # -- perplexity against a plain batched forward -----------------------------------------------
    ids = tok.encode(text)[: args.ppl_tokens + 1]
    n_win = (len(ids) - 1) // args.ctx
    ids = ids[: n_win * args.ctx + 1]
    x = torch.tensor(ids[:-1]).view(n_win, args.ctx)

    def plain_forward() -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            for i in range(0, n_win, args.batch_size):
                model(x[i : i + args.batch_size])
        return n_win * args.ctx / (time.perf_counter() - t0)

    # Alternate the two and keep each one's best: a shared machine's noise hits both alike.
    ppl_tps, plain_tps = 0.0, 0.0
    for _ in range(args.repeats):
        ppl = evaluate_perplexity(model, tok, ids, context=args.ctx, batch_size=args.batch_size, prefix_eot=False)
        ppl_tps, plain_tps = max(ppl_tps, ppl.tokens_per_s), max(plain_tps, plain_forward())

    print(json.dumps({
        "bench": "eval", **cpu_capability(),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "lm_eval": lm_eval.__version__,
        "model": {"n_layer": args.layers, "n_embd": args.embd, "n_head": args.heads, "n_ctx": args.ctx,
                  "parameters": model.num_parameters()},
        "choice": {"items": len(items), "choices": args.choices, "batch_size": args.batch_size,
                   "acc_scratchgpt": ours["acc"], "acc_lm_eval_hf": theirs["acc,none"],
                   "acc_norm_scratchgpt": ours["acc_norm"], "acc_norm_lm_eval_hf": theirs["acc_norm,none"],
                   "identical": ours["acc"] == theirs["acc,none"] and ours["acc_norm"] == theirs["acc_norm,none"],
                   "scratchgpt_s": round(ours_s, 3), "lm_eval_hf_loglikelihood_s": round(timed["s"], 3),
                   "speedup": round(timed["s"] / ours_s, 2)},
        "perplexity": {"tokens": ppl.tokens, "context": args.ctx, "loss": round(ppl.loss, 4),
                       "tokens_per_s": round(ppl_tps, 1), "plain_forward_tokens_per_s": round(plain_tps, 1),
                       "ratio": round(ppl_tps / plain_tps, 3)},
    }))


if __name__ == "__main__":
    main()
