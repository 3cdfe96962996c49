"""GPU benchmark: GPT-2 124M training steps and greedy decoding, scratchgpt against transformers, one CUDA GPU.

Training: one step = forward + backward + grad clip (1.0) + fused AdamW through `train.train_step`, under
bf16 autocast, torch.compile'd, B x T tokens per step (default 16 x 1024, which fills an 80 GB GPU's
compute), for scratchgpt's GPT (SDPA restricted to the flash kernel, so a fallback cannot hide) and
for transformers' GPT2LMHeadModel (SDPA attention, compiled too) with the same config, batch, loss and
optimizer. tokens/s over the timed steps after the warm-up steps (which compile); MFU = training
FLOPs per token (`runlog.flops_per_token`: 6N + 12·L·C·T) x tokens/s / the GPU's dense bf16 peak
(`runlog.gpu_peak_flops`, e.g. 989 TFLOP/s for an H100 SXM).

Decoding: greedy, 16-token prompts, 128 new tokens, bf16 weights, batch 1 and batch 32, scratchgpt's
`generate` (KV cache) against transformers' `generate`, the same random weights; best of --repeats.
Leading tokens that agree are reported (bf16 rounding differs between the two implementations).

Context: nanoGPT's README (Dec 2022) reports torch.compile taking its 124M iteration from ~250 ms to
135 ms on A100 (bench.py: batch 12 x 1024 tokens), i.e. ~91k tokens/s on one A100 40 GB.

    .venv/bin/python bench/gpu.py [--batch-size 16] [--seq-len 1024] [--steps 10] [--tiny --device cpu]

Prints one JSON line. `--tiny` (2 layers x 64, short sequences) only checks that the script runs.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scratchgpt import GPT, GPTConfig, SamplingConfig
from scratchgpt.config import TrainConfig
from scratchgpt.hf import hf_to_scratchgpt
from scratchgpt.inference.generate import generate
from scratchgpt.training.optim import make_optimizer
from scratchgpt.training.runlog import flops_per_token, gpu_peak_flops
from scratchgpt.training.runtime import autocast
from scratchgpt.training.train import lm_loss, train_step

OPTIM = TrainConfig(lr=6e-4, weight_decay=0.1, beta1=0.9, beta2=0.95, grad_clip=1.0, fused_adamw=True)
NANOGPT = {"source": "nanoGPT README, efficiency notes (Dec 2022)", "gpu": "A100 40GB", "batch": "12 x 1024",
           "ms_per_iter_compiled": 135, "tokens_per_s": round(12 * 1024 / 0.135)}


def hf_gpt2(config: GPTConfig) -> nn.Module:
    """transformers' GPT2LMHeadModel with `config`'s sizes and dropout, SDPA attention."""
    from transformers import GPT2Config, GPT2LMHeadModel

    hf_cfg = GPT2Config(vocab_size=config.vocab_size, n_positions=config.n_positions, n_embd=config.n_embd,
                        n_layer=config.n_layer, n_head=config.n_head, resid_pdrop=config.resid_pdrop,
                        embd_pdrop=config.embd_pdrop, attn_pdrop=config.attn_pdrop, bos_token_id=None,
                        eos_token_id=None)
    model = GPT2LMHeadModel(hf_cfg)
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("sdpa")
    else:  # older transformers read the config field at call time
        model.config._attn_implementation = "sdpa"
    return model


def hf_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    """scratchgpt's loss for a transformers model: mean cross-entropy of logits (B, T, V) against y (B, T)."""
    x, y = batch
    return F.cross_entropy(model(input_ids=x).logits.flatten(0, 1), y.flatten())


def ours_from_hf(hf: nn.Module, config: GPTConfig, device: torch.device) -> GPT:
    """A scratchgpt GPT holding exactly the transformers model's weights."""
    model = GPT(config, device="meta")
    model.load_state_dict(hf_to_scratchgpt(hf.state_dict()), strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.transformer.wte.weight
    model.reset_buffers(device=device)
    return model.to(device).eval()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def training_rate(model: nn.Module, loss_fn: Callable, batch: tuple[Tensor, Tensor], *, steps: int, warmup: int,
                  compile: bool, kernel: Callable[[], AbstractContextManager] = nullcontext) -> dict[str, float]:
    """tokens/s of `steps` training steps on one fixed batch, after `warmup` steps (which compile)."""
    device = batch[0].device
    params = list(model.parameters())
    opt = make_optimizer(params, OPTIM, device_type=device.type)
    run = torch.compile(model) if compile else model
    amp = lambda: autocast(device, torch.bfloat16)  # noqa: E731 - a fresh context per step

    def step() -> Tensor:
        with kernel():
            return train_step(run, opt, [batch], loss_fn=loss_fn, params=params, grad_accum_steps=1,
                              grad_clip=OPTIM.grad_clip, amp=amp)[0]

    t0 = time.perf_counter()
    for _ in range(warmup):
        first = step().item()
    _sync(device)
    warm_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    _sync(device)
    seconds = time.perf_counter() - t0
    return {"tok_s": steps * batch[0].numel() / seconds, "ms_per_step": 1000 * seconds / steps,
            "warmup_s": round(warm_s, 1), "loss_first": round(first, 4), "loss_last": round(loss.item(), 4)}


def decode_rate(fn: Callable[[], list[list[int]]], *, n_tokens: int, repeats: int, device: torch.device
                ) -> tuple[float, list[list[int]]]:
    """(best new tokens/s over `repeats` runs after one warm-up, the tokens of the warm-up)."""
    tokens = fn()
    best = 0.0
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = max(best, n_tokens / (time.perf_counter() - t0))
    return best, tokens


def agree(a: list[int], b: list[int]) -> int:
    """How many leading tokens two sequences share."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per model")
    parser.add_argument("--warmup", type=int, default=3, help="untimed training steps first (they compile)")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="timed decoding runs (best is kept)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--tiny", action="store_true", help="2 layers x 64 channels: only checks the script works")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench/gpu.py: no CUDA device here (use --tiny --device cpu to check the script)")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    config = GPTConfig.from_name("gpt2", embd_pdrop=0.0, resid_pdrop=0.0, attn_pdrop=0.0)
    if args.tiny:
        config = GPTConfig.from_dict({**config.to_dict(), "n_layer": 2, "n_embd": 64, "n_head": 4})
    B, T = args.batch_size, args.seq_len
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, config.vocab_size, (B, T), generator=gen).to(device)
    batch = (x, torch.roll(x, -1, dims=1))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = gpu_peak_flops(name, torch.bfloat16) if device.type == "cuda" else None
    out: dict[str, object] = {"bench": "gpu", "device": name, "torch": torch.__version__, "batch": B, "seq_len": T,
                              "compile": args.compile, "dtype": "bfloat16 autocast", "peak_bf16_tflops":
                              peak and peak / 1e12, "nanogpt_reference": NANOGPT}

    # -- training ---------------------------------------------------------------------------------
    torch.manual_seed(0)
    ours = GPT(config).to(device).train()
    fpt = flops_per_token(ours, T)
    # Restricted to flash: if the fused kernel could not run, this fails instead of falling back.
    flash = (lambda: sdpa_kernel(SDPBackend.FLASH_ATTENTION)) if device.type == "cuda" else nullcontext
    train = {"scratchgpt": training_rate(ours, lm_loss, batch, steps=args.steps, warmup=args.warmup,
                                         compile=args.compile, kernel=flash)}
    del ours
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    torch.manual_seed(0)
    hf = hf_gpt2(config).to(device).train()
    train["transformers"] = training_rate(hf, hf_loss, batch, steps=args.steps, warmup=args.warmup,
                                          compile=args.compile)
    for row in train.values():
        row["mfu"] = round(fpt * row["tok_s"] / peak, 4) if peak else None
        row["tok_s"] = round(row["tok_s"])
        row["ms_per_step"] = round(row["ms_per_step"], 2)
    out["train"] = {**train, "ratio": round(train["scratchgpt"]["tok_s"] / train["transformers"]["tok_s"], 3),
                    "flops_per_token": fpt}
    if device.type == "cuda":
        out["train"]["max_memory_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 1)

    # -- greedy decoding, bf16 weights --------------------------------------------------------------
    hf = hf.eval()
    ours = ours_from_hf(hf, config, device).to(torch.bfloat16)
    hf = hf.to(torch.bfloat16)
    sampling = SamplingConfig(max_new_tokens=args.new_tokens, temperature=0.0)
    decode: dict[str, object] = {"prompt_tokens": args.prompt_len, "new_tokens": args.new_tokens,
                                 "weights": "bfloat16"}
    for b in (1, 32):
        prompts = torch.randint(0, config.vocab_size, (b, args.prompt_len), generator=gen).to(device)

        def run_ours(prompts: Tensor = prompts) -> list[list[int]]:
            return generate(ours, prompts, sampling)

        def run_hf(prompts: Tensor = prompts) -> list[list[int]]:
            with torch.inference_mode():
                o = hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=args.new_tokens,
                                min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
            return o[:, args.prompt_len:].tolist()

        n = b * args.new_tokens
        ours_tps, ours_tok = decode_rate(run_ours, n_tokens=n, repeats=args.repeats, device=device)
        hf_tps, hf_tok = decode_rate(run_hf, n_tokens=n, repeats=args.repeats, device=device)
        decode[f"batch_{b}"] = {"scratchgpt_tok_s": round(ours_tps, 1), "transformers_tok_s": round(hf_tps, 1),
                                "ratio": round(ours_tps / hf_tps, 3),
                                "tokens_agree": round(sum(agree(a, c) for a, c in zip(ours_tok, hf_tok, strict=True))
                                                      / n, 3)}
    out["decode"] = decode
    print(json.dumps(out))


if __name__ == "__main__":
    main()
