"""Greedy decode speed: GPT-2 124M (random weights), batch 1, 16-token prompt, 128 new tokens, fp32, CPU.

Prints one JSON line with tokens/s for scratchgpt and for transformers' `generate` in the same run,
and their ratio, twice: plain greedy decoding (one forward pass per token), and prompt-lookup decoding
in both libraries (`prompt_lookup=` / `prompt_lookup_num_tokens=`). Weights are identical (scratchgpt
loads the transformers model's state dict), and all runs must produce the same tokens (checked).

Caveat for reading the lookup numbers: a randomly initialised GPT-2 decoded greedily falls into long
runs of one token, which prompt lookup predicts perfectly; on real text its gain is much smaller.

A second line does the same for a Llama-shaped model (rotary positions, RMSNorm, SwiGLU, grouped-query
attention, untied head) against transformers' `LlamaForCausalLM` with the same random weights:
`--llama-model llama-124m` (GPT-2 124M's width and depth as a Llama block; the default) or a preset
such as `llama-3.2-1b`. `--tiny` shrinks both models to 2 layers x 64 channels, to check the script.

Also in the same run, for each row: int8 weights (`--quantize int8`, the default fast kernel for this
CPU) and bfloat16 weights (only on CPUs with native bf16), as tok/s and ratios to our float32 and to
transformers. Their tokens can differ from float32's (different rounding); the row reports how many
leading tokens agree. `int8_matmuls_only_*` times the int8 model's matrix products alone, back to
back: the ceiling of int8 decoding with this kernel, and the share of a real step they take.

The limit comes first: each line also carries this machine's DRAM read bandwidth (`dram_read_gb_s`,
the best of several reads of a buffer of 4x the last-level cache by a `sum` and by a matrix-vector
product split over the threads (both also reported), capped at 2 GB: `stream_capped`
says when the cap was hit, i.e. the buffer may be partly cache-resident and the figure too high),
the bytes a decode step streams (`weight_mb_per_token`: every weight once; of an embedding table
only one row, unless it is also the LM head) and, per row, `*_of_bound`: tokens/s as a fraction of
bandwidth / bytes per token. A fraction above 1 means the weights did not all come from DRAM (a model
smaller than the last-level cache, e.g. 124M in int8 on a 260 MB L3).

`--checkpoint RUN --text FILE` instead measures a trained model: int8 vs float32 mean NLL (and
perplexity) over held-out windows of FILE, and greedy agreement of the first 32 tokens over prompts
from FILE. Speculative decoding with a trained draft model is bench/speculative.py.
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


_STREAM_CAP = 2 << 30  # bytes: 4x a server's LLC can be several GB; 2 GB keeps the bench light


def dram_read_bandwidth(*, repeats: int = 5) -> dict[str, object]:
    """Measured DRAM read bandwidth over a buffer ≥ 4x the last-level cache: the best of `repeats` reads by
    each of two kernels, a `sum` and a matrix-vector product split over the threads (one `bmm` slab per
    thread, the way `Linear.split_k` decodes).

    Why 4x: a buffer that fits in the LLC (260 MB on some Xeons) measures the cache, not DRAM. Why two
    kernels: neither alone reaches what the memory delivers on every CPU. On the 2-core AMD EPYC (Zen 3)
    here the `sum` read 25-27 GB/s while llama.cpp's F32 decode streamed its weights at 37 GB/s, which made
    "the bound" a floor that both sides beat; the split product read the same buffer faster there.
    """
    from scratchgpt.device import last_level_cache_bytes

    llc = last_level_cache_bytes()
    wanted = 4 * llc if llc else _STREAM_CAP
    size = min(wanted, _STREAM_CAP)
    buf = torch.ones(size // 4)  # float32; written once, so every page is mapped before timing
    parts = max(1, torch.get_num_threads())
    cols = 4096
    rows = buf.numel() // (parts * cols)
    slabs = buf[: parts * rows * cols].view(parts, cols, rows)  # (parts, cols, rows): the stored Wᵀ of a product
    x = torch.ones(parts, 1, cols)

    def read_time(read) -> float:
        read()
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            read()  # one read of every byte; the arithmetic is far cheaper than the stream
            best = min(best, time.perf_counter() - t0)
        return best

    with torch.inference_mode():
        by_sum = buf.nbytes / read_time(buf.sum) / 1e9
        by_product = slabs.nbytes / read_time(lambda: torch.bmm(x, slabs).sum(0)) / 1e9
    return {"dram_read_gb_s": round(max(by_sum, by_product), 2), "dram_read_sum_gb_s": round(by_sum, 2),
            "dram_read_split_product_gb_s": round(by_product, 2),
            "llc_mb": round(llc / 2**20, 1) if llc else None,
            "stream_mb": round(buf.nbytes / 2**20), "stream_capped": size < wanted}


def bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes a batch-1 decode step reads: every parameter and buffer once, except embedding tables
    (one row each, negligible) that are not also a matrix the LM head multiplies by."""
    from scratchgpt.model.quantize import Int8Embedding, Int8Linear

    def own(m: torch.nn.Module) -> set[int]:
        return {id(t) for t in (*m.parameters(recurse=False), *m.buffers(recurse=False))}

    tables = set().union(*(own(m) for m in model.modules() if isinstance(m, torch.nn.Embedding | Int8Embedding)))
    multiplied = set().union(*(own(m) for m in model.modules() if isinstance(m, torch.nn.Linear | Int8Linear)))
    # parameters() and buffers() list a tensor shared by two modules (a tied head) once.
    return sum(t.nbytes for t in (*model.parameters(), *model.buffers())
               if id(t) not in tables or id(t) in multiplied)


def _llama_config(name: str, *, tiny: bool):
    """GPTConfig of the Llama row: a preset, or `llama-124m` (GPT-2 124M's size as a Llama block)."""
    from scratchgpt import GPTConfig

    if name == "llama-124m":
        config = GPTConfig(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12, n_kv_head=4,
                           n_inner=2048, pos_encoding="rope", norm="rmsnorm", activation="swiglu", bias=False,
                           tie_word_embeddings=False, rope_theta=500000.0, embd_pdrop=0.0, resid_pdrop=0.0,
                           attn_pdrop=0.0)
    else:
        config = GPTConfig.from_name(name)
    if tiny:
        config = GPTConfig.from_dict({**config.to_dict(), "n_layer": 2, "n_embd": 64, "n_head": 4,
                                      "n_kv_head": 1, "head_dim": None, "n_inner": 96, "vocab_size": 512})
    return config


def _bench_pair(ours, hf, *, label: str, vocab: int, args, stream: dict[str, object]) -> dict[str, object]:
    """Time greedy decoding (plain and prompt lookup) for two models holding the same weights."""
    from scratchgpt import SamplingConfig
    from scratchgpt.inference.generate import generate

    prompt = torch.randint(0, vocab, (1, args.prompt_len), generator=torch.Generator().manual_seed(1))
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

    import copy

    from scratchgpt.device import cpu_capability
    from scratchgpt.model.quantize import cast_weights, kernels_in_use, quantize_model

    def agree(a: list[int], b: list[int]) -> int:
        return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))

    def of_bound(tok_s: float, model) -> float:
        """tok/s as a fraction of the DRAM bound: bandwidth / bytes streamed per token."""
        return round(tok_s * bytes_per_token(model) / (stream["dram_read_gb_s"] * 1e9), 3)

    int8 = quantize_model(copy.deepcopy(ours), "int8")
    from scratchgpt.model.native import code_paths

    fast: dict[str, object] = {**cpu_capability(), "int8_kernel": kernels_in_use(int8),
                               "native_code_paths": code_paths()}
    bf16 = cast_weights(copy.deepcopy(ours), "bfloat16") if cpu_capability()["native_bf16"] else None
    for name, m in (("int8", int8), ("bf16", bf16)):
        if m is None:
            fast[f"{name}_tok_s"] = None  # emulated bf16: refused (see model/quantize.py)
            continue
        agreed = agree(generate(m, prompt, sampling)[0], reference)
        tps = rate(lambda m=m: generate(m, prompt, sampling)[0])
        fast.update({f"{name}_tok_s": round(tps, 2), f"{name}_vs_fp32": round(tps / ours_tps, 3),
                     f"{name}_vs_transformers": round(tps / hf_tps, 3), f"{name}_tokens_agree_with_fp32": agreed,
                     f"{name}_weight_mb_per_token": round(bytes_per_token(m) / 1e6, 1),
                     f"{name}_of_bound": of_bound(tps, m)})
    # The ceiling for int8 with this kernel: only its matrix products, back to back (every Int8Linear
    # in forward order, one row each, no attention, norms or Python in between). How far the real
    # decode is from it is the share of a step that is not streaming weights.
    from scratchgpt.model.quantize import Int8Linear

    layers = [m for m in int8.modules() if isinstance(m, Int8Linear)]
    rows = {n: torch.randn(1, 1, n) for n in {m.in_features for m in layers}}

    def matmuls_only() -> None:
        with torch.inference_mode():
            for _ in range(args.new_tokens):
                for m in layers:
                    m(rows[m.in_features])

    matmuls_only()
    bound = rate(matmuls_only)
    fast.update({"int8_matmuls_only_tok_s": round(bound, 2),
                 "int8_matmuls_only_vs_transformers": round(bound / hf_tps, 3),
                 "int8_share_of_step_in_matmuls": round(fast["int8_tok_s"] / bound, 3)})
    return {
        "bench": "generate", "model": label, "reference": type(hf).__name__, "batch": 1,
        "prompt_tokens": args.prompt_len, "new_tokens": args.new_tokens, "dtype": "float32",
        "threads": torch.get_num_threads(),
        "scratchgpt_tok_s": round(ours_tps, 2), "transformers_tok_s": round(hf_tps, 2),
        "ratio": round(ours_tps / hf_tps, 3), **stream,
        "weight_mb_per_token": round(bytes_per_token(ours) / 1e6, 1),
        "bound_tok_s": round(stream["dram_read_gb_s"] * 1e9 / bytes_per_token(ours), 2),
        "scratchgpt_of_bound": of_bound(ours_tps, ours), "transformers_of_bound": of_bound(hf_tps, ours),
        "prompt_lookup": args.lookup,
        "scratchgpt_lookup_tok_s": round(ours_lk, 2), "transformers_lookup_tok_s": round(hf_lk, 2),
        "lookup_ratio": round(ours_lk / hf_lk, 3), "lookup_vs_transformers_plain": round(ours_lk / hf_tps, 3),
        "same_tokens": same, **fast,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt2", help="GPT-2 preset to build with random weights")
    parser.add_argument("--llama-model", default="llama-124m",
                        help="Llama row: llama-124m (GPT-2 124M's size as a Llama block) or a preset (llama-3.2-1b)")
    parser.add_argument("--rows", default="gpt2,llama", help="which rows to run: gpt2, llama or both")
    parser.add_argument("--tiny", action="store_true", help="2 layers x 64 channels: only checks the script works")
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per implementation (best is kept)")
    parser.add_argument("--lookup", type=int, default=10, help="draft tokens for prompt-lookup decoding")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--checkpoint", help="a trained run: measure int8 quality on --text")
    parser.add_argument("--text", help="held-out text for --checkpoint (its last 10%% is used)")
    parser.add_argument("--prompts", type=int, default=20, help="prompts for the greedy comparison")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.checkpoint:
        trained(args)
        return
    rows = set(args.rows.split(","))
    stream = dram_read_bandwidth()  # first, and alone: nothing else holds memory bandwidth or the cache yet

    import transformers

    from scratchgpt import GPT, GPTConfig
    from scratchgpt.hf import config_to_hf, hf_to_scratchgpt

    def ours_from(hf_model, config: GPTConfig) -> GPT:
        model = GPT(config, device="meta")
        model.load_state_dict(hf_to_scratchgpt(hf_model.state_dict()), strict=False, assign=True)
        if config.tie_word_embeddings:
            model.lm_head.weight = model.transformer.wte.weight
        model.reset_buffers(device="cpu")
        return model.eval().requires_grad_(False)  # frozen, as the CLI loads it (see choose_decode_path)

    if "gpt2" in rows:
        torch.manual_seed(0)
        config = GPTConfig.from_name(args.model)
        if args.tiny:
            config = GPTConfig.from_dict({**config.to_dict(), "n_layer": 2, "n_embd": 64, "n_head": 4})
        hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            n_layer=config.n_layer, n_head=config.n_head, n_embd=config.n_embd)).eval()
        label = args.model + ("-tiny" if args.tiny else "")
        print(json.dumps(_bench_pair(ours_from(hf, config), hf, label=label, vocab=config.vocab_size, args=args,
                                    stream=stream)))
    if "llama" in rows:
        torch.manual_seed(0)
        config = _llama_config(args.llama_model, tiny=args.tiny)
        hf_dict = config_to_hf(config)
        hf_dict.pop("architectures"), hf_dict.pop("model_type")
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_dict)).eval()
        label = args.llama_model + ("-tiny" if args.tiny else "")
        print(json.dumps(_bench_pair(ours_from(hf, config), hf, label=label, vocab=config.vocab_size, args=args,
                                    stream=stream)))


def trained(args: argparse.Namespace) -> None:
    """int8 quality on a trained run: held-out NLL against float32, greedy agreement."""
    import copy
    import math
    from pathlib import Path

    from scratchgpt import SamplingConfig
    from scratchgpt.checkpoint import load_any
    from scratchgpt.device import cpu_capability
    from scratchgpt.eval.perplexity import evaluate_perplexity, text_document
    from scratchgpt.inference.generate import generate
    from scratchgpt.model.quantize import kernels_in_use, quantize_model

    if not args.text:
        raise SystemExit("--checkpoint needs --text FILE (held-out text)")
    model, tok = load_any(args.checkpoint)
    int8 = quantize_model(copy.deepcopy(model), "int8")
    text = Path(args.text).read_text(encoding="utf-8")
    tail = text[int(len(text) * 0.9) :]  # the held-out tail (training's val split)
    ids = torch.tensor(tok.encode(tail), dtype=torch.long)
    T = model.config.n_positions
    # Quality through issue 8's eval: the same strided perplexity `scratchgpt eval perplexity` reports.
    doc = text_document(tail, tok, name=Path(args.text).name)
    r32, r8 = (evaluate_perplexity(m, tok, doc, context=T, prefix_eot=False) for m in (model, int8))
    nll32, nll8 = r32.loss, r8.loss
    greedy = SamplingConfig(max_new_tokens=32, temperature=0.0, stop_at_eot=False)
    p_starts = torch.linspace(0, len(ids) - 33, args.prompts).long().tolist()
    prompts = [ids[s : s + 32].tolist() for s in p_starts]
    same32 = sum(generate(model, p, greedy)[0] == generate(int8, p, greedy)[0] for p in prompts)
    row = {"bench": "generate-trained", "checkpoint": args.checkpoint, **cpu_capability(),
           "int8_kernel": kernels_in_use(int8), "held_out_tokens": r32.tokens, "context": T,
           "fp32_nll": round(nll32, 4), "int8_nll": round(nll8, 4),
           "fp32_bits_per_byte": round(r32.bits_per_byte, 4), "int8_bits_per_byte": round(r8.bits_per_byte, 4),
           "ppl_change_pct": round((math.exp(nll8 - nll32) - 1) * 100, 3),
           "greedy32_identical": f"{same32}/{len(prompts)}"}
    print(json.dumps(row))


if __name__ == "__main__":
    main()
