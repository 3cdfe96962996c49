"""Real model sizes on one machine: LoRA over float32 / bf16 / int8 bases, full fine-tuning, loading, decoding.

One JSON line per row; every row runs in a process of its own (peak RSS belongs to a process:
resource.getrusage's ru_maxrss; this driver never imports torch, so a child starts from a small footprint).
Weights are random, in the preset's shapes; batch 1, AdamW, --seq tokens (512). Rows:

  lora-{float32,bf16,int8}[+ckpt]   scratchgpt LoRA, rank 8 on attention + MLP projections (llama-3.2-1b);
                                    bf16: a bfloat16 base under bf16 autocast, as `finetune --lora-base-dtype
                                    bfloat16` runs it; +ckpt: activation checkpointing
  peft-{float32,bf16}               transformers + peft, the same LoRA (q/k/v/o/gate/up/down, rank 8); bf16:
                                    float32 weights under bf16 autocast
  full-{float32,bf16-true}[+ckpt]   scratchgpt full fine-tune (qwen3-0.6b)
  hf-full-{float32,bf16}            transformers, the same full fine-tune (bf16: under bf16 autocast)
  load-{float32,bfloat16}           load_hf of a saved llama-3.2-1b folder (written once into --work)
  decode-{float32,bfloat16,int8}    greedy decode tok/s at llama-3.2-1b; hf-decode-float32: transformers

Training rows report the peak RSS of building the model and, separately, of the steps (the high-water
mark is reset after building through /proc/self/clear_refs, which getrusage then reports), s/step (the
median of the steps after the first), and the start-of-run memory estimate's peak (training/memory.py) with
its parts. The model is built as a run loads one (meta device, then initialised in place), and the steps
run with freed memory kept for reuse, as the training driver sets it once the model is loaded.

peft is a bench-only dependency: `pip install 'scratchgpt[bench]'` (transformers + peft; with `-c
constraints.txt`, so torch stays the one installed); without it the peft rows print {"skipped": ...}.
The 1B rows need ~10 GB of memory and minutes each (the bf16 ones about an hour a step where bf16 is
emulated): on a shared machine check the script first with --smoke (tiny models, seconds per row).

Real run:    python bench/scale.py --rows lora-float32 lora-int8 peft-float32 --steps 3
Smoke test:  python bench/scale.py --smoke
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

LORA_ROWS = tuple(f"lora-{b}{c}" for b in ("float32", "bf16", "int8") for c in ("", "+ckpt"))
ROWS = (*LORA_ROWS, "peft-float32", "peft-bf16", "full-float32", "full-bf16-true", "full-bf16-true+ckpt",
        "hf-full-float32", "hf-full-bf16",
        "load-float32", "load-bfloat16", "decode-float32", "decode-bfloat16", "decode-int8", "hf-decode-float32")
LORA_PRESET, FULL_PRESET = "llama-3.2-1b", "qwen3-0.6b"
# --smoke: the presets' families at toy sizes (every code path, seconds per row).
SMOKE = dict(n_layer=2, n_embd=64, n_head=4, n_kv_head=2, n_inner=128, vocab_size=512, head_dim=16)
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def reset_peak() -> None:
    """Make the peak RSS start again from the current RSS (Linux: VmHWM, which getrusage reports)."""
    Path("/proc/self/clear_refs").write_text("5")


def model_config(preset: str, smoke: bool):
    from scratchgpt.config import GPTConfig

    return GPTConfig.from_name(preset, **(SMOKE if smoke else {}))


def build(cfg, *, dtype):
    """A GPT of `cfg` with random weights (seed 0), as a run loads one: on the meta device, then given memory
    and initialised in place. GPT's own constructor would first make and initialise a head of its own, then
    drop it for the tied embedding: at llama-3.2-1b a 0.5 GB (bf16) transient no loaded model has."""
    import torch

    from scratchgpt.model.gpt import GPT

    model = GPT(cfg, device="meta", dtype=dtype)
    model.to_empty(device="cpu")  # untouched pages: no RSS until written
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.transformer.wte.weight  # to_empty made two tensors of the tied one
    model.reset_buffers(device="cpu")
    model.init_weights(generator=torch.Generator().manual_seed(0))
    return model


def _steps(step, n: int) -> list[float]:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return times


def _timing(times: list[float]) -> dict:
    steady = times[1:] or times
    return {"s_per_step": round(statistics.median(steady), 3), "step_times": [round(t, 3) for t in times]}


def scratchgpt_train(row: str, args: argparse.Namespace) -> dict:
    import torch

    from scratchgpt.config import LoRAConfig, TrainConfig
    from scratchgpt.device import keep_freed_memory
    from scratchgpt.training.lora import apply_lora, lora_parameters
    from scratchgpt.training.memory import estimate_memory
    from scratchgpt.training.optim import make_optimizer
    from scratchgpt.training.runtime import autocast
    from scratchgpt.training.train import train_step

    kind, setting = row.split("-", 1)
    base, ckpt = setting.removesuffix("+ckpt"), setting.endswith("+ckpt")
    cfg = model_config(LORA_PRESET if kind == "lora" else FULL_PRESET, args.smoke)
    # Built as the run holds it: a bf16 or int8 base (or bf16-true model) directly in bfloat16, as `finetune`
    # loads its start model for them (lora.base_load_dtype); the int8 base is quantized from that.
    weights = torch.bfloat16 if base in ("bf16", "bf16-true", "int8") else torch.float32
    model = build(cfg, dtype=weights).train()
    if kind == "lora":
        targets = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
        base_dtype = {"float32": "float32", "bf16": "bfloat16", "int8": "int8"}[base]
        apply_lora(model, LoRAConfig(rank=8, alpha=16, targets=targets, base_dtype=base_dtype))
        params = lora_parameters(model)
    else:
        params = list(model.parameters())
    model.activation_checkpointing = ckpt
    amp = torch.bfloat16 if base in ("bf16", "bf16-true") else torch.float32
    opt = make_optimizer(params, TrainConfig(dtype="bf16-true" if base == "bf16-true" else "float32"),
                         device_type="cpu")
    built = peak_rss_mb()
    keep_freed_memory()  # as the training driver does once the model is loaded (training/driver.py)
    reset_peak()
    gen = torch.Generator().manual_seed(1)
    device = torch.device("cpu")

    def step() -> None:
        x = torch.randint(cfg.vocab_size, (1, args.seq), generator=gen)
        train_step(model, opt, [(x, torch.roll(x, -1, dims=1))], params=params, grad_accum_steps=1,
                   amp=lambda: autocast(device, amp))

    times = _steps(step, args.steps)
    est = estimate_memory(model, opt, tokens=args.seq, dtype_bytes=amp.itemsize, checkpointing=ckpt)
    return {"peak_rss_build_mb": round(built), "peak_rss_steps_mb": round(peak_rss_mb()),
            "estimate_mb": round(est.peak / 2**20), "estimate_parts_mb": {k: round(v / 2**20) for k, v in (
                ("weights", est.trainable + est.frozen), ("gradients", est.gradients), ("optimizer", est.optimizer),
                ("activations", est.activations), ("transient", est.transient), ("runtime", est.runtime))},
            **_timing(times)}


def _hf_model(preset: str, args: argparse.Namespace):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from scratchgpt.hf import config_to_hf

    hf = config_to_hf(model_config(preset, args.smoke))
    config = AutoConfig.for_model(**hf)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)


def hf_train(row: str, args: argparse.Namespace) -> dict:
    """transformers (+ peft for the LoRA rows): the same steps as scratchgpt's rows, fused AdamW."""
    import torch

    if row.startswith("peft-"):
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            return {"skipped": "peft is not installed (bench-only dependency: pip install 'scratchgpt[bench]')"}
        model = get_peft_model(_hf_model(LORA_PRESET, args), LoraConfig(r=8, lora_alpha=16,
                                                                        target_modules=HF_TARGETS))
    else:
        model = _hf_model(FULL_PRESET, args)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    amp = row.endswith("bf16")
    built = peak_rss_mb()
    reset_peak()
    gen = torch.Generator().manual_seed(1)

    def step() -> None:
        x = torch.randint(model.config.vocab_size, (1, args.seq), generator=gen)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    times = _steps(step, args.steps)
    return {"peak_rss_build_mb": round(built), "peak_rss_steps_mb": round(peak_rss_mb()), **_timing(times)}


def saved_folder(args: argparse.Namespace, env: dict[str, str]) -> Path:
    folder = Path(args.work) / ("smoke-hf" if args.smoke else "llama-3.2-1b-hf")
    if not (folder / "config.json").is_file():  # written once, by a child of its own
        subprocess.run([sys.executable, __file__, *_shared_flags(args), "--one", "save"], check=True, env=env,
                       stdout=subprocess.DEVNULL)
    return folder


def save(args: argparse.Namespace) -> dict:
    import torch

    from scratchgpt.checkpoint import save_hf
    from scratchgpt.model.gpt import GPT

    folder = Path(args.work) / ("smoke-hf" if args.smoke else "llama-3.2-1b-hf")
    model = GPT(model_config(LORA_PRESET, args.smoke), generator=torch.Generator().manual_seed(0),
                dtype=torch.bfloat16)
    save_hf(model, folder)
    return {"saved": str(folder)}


def load(row: str, args: argparse.Namespace) -> dict:
    import torch

    from scratchgpt.checkpoint import load_hf

    folder = Path(args.work) / ("smoke-hf" if args.smoke else "llama-3.2-1b-hf")
    dtype = getattr(torch, row.removeprefix("load-"))
    reset_peak()
    before = peak_rss_mb()  # the process (Python, torch) before the weights: the growth is the load's
    t0 = time.perf_counter()
    model = load_hf(folder, dtype=dtype)
    seconds = time.perf_counter() - t0
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    return {"load_s": round(seconds, 2), "peak_rss_mb": round(peak_rss_mb()), "weights_mb": round(weights),
            "growth_over_weights": round((peak_rss_mb() - before) / weights, 2)}


def decode(row: str, args: argparse.Namespace) -> dict:
    import torch

    from scratchgpt.config import SamplingConfig
    from scratchgpt.inference.generate import generate
    from scratchgpt.model.gpt import GPT
    from scratchgpt.model.quantize import prepare_for_inference

    cfg = model_config(LORA_PRESET, args.smoke)
    prompt = torch.randint(cfg.vocab_size, (1, 16), generator=torch.Generator().manual_seed(1))
    if row.startswith("hf-"):
        model = _hf_model(LORA_PRESET, args).eval()
        run = lambda: model.generate(prompt, max_new_tokens=args.tokens, min_new_tokens=args.tokens,  # noqa: E731
                                     do_sample=False)
    else:
        kind = row.removeprefix("decode-")
        model = GPT(cfg, generator=torch.Generator().manual_seed(0)).eval()
        # As `generate --quantize int8` / `--dtype bfloat16` prepare it (bfloat16 is refused where it is emulated).
        prepare_for_inference(model, quantize="int8" if kind == "int8" else None,
                              dtype=None if kind == "int8" else kind)
        sampling = SamplingConfig(max_new_tokens=args.tokens, temperature=0.0, stop_at_eot=False)
        run = lambda: generate(model, prompt, sampling)  # noqa: E731
    with torch.no_grad():
        run()  # warm-up: kernels, caches
        t0 = time.perf_counter()
        run()
        seconds = time.perf_counter() - t0
    return {"tok_per_s": round(args.tokens / seconds, 2), "peak_rss_mb": round(peak_rss_mb())}


def one(row: str, args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    if row == "save":
        return save(args)
    if row.startswith(("lora-", "full-")):
        out = scratchgpt_train(row, args)
    elif row.startswith(("peft-", "hf-full-")):
        out = hf_train(row, args)
    elif row.startswith("load-"):
        out = load(row, args)
    else:
        out = decode(row, args)
    cpu = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
    from scratchgpt.device import cpu_capability

    return {"row": row, "seq": args.seq, "smoke": args.smoke, "threads": torch.get_num_threads(),
            "cpu": cpu.group(1) if cpu else None, **cpu_capability(), **out}


def _shared_flags(args: argparse.Namespace) -> list[str]:
    return [f"--seq={args.seq}", f"--steps={args.steps}", f"--tokens={args.tokens}", f"--threads={args.threads}",
            f"--work={args.work}", *(["--smoke"] if args.smoke else [])]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS), help="rows to run (default: all)")
    p.add_argument("--seq", type=int, default=512, help="tokens per training sequence")
    p.add_argument("--steps", type=int, default=3, help="training steps per row (the first is warm-up)")
    p.add_argument("--tokens", type=int, default=32, help="tokens per decode")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: one per core)")
    p.add_argument("--work", default="/tmp/scratchgpt-scale", help="folder for the saved model the load rows read")
    p.add_argument("--smoke", action="store_true", help="tiny models of the same families: check the script works")
    p.add_argument("--one", help=argparse.SUPPRESS)  # the child process of one row
    args = p.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args)), flush=True)
        return
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    for row in args.rows:
        if row.startswith("load-"):
            saved_folder(args, env)
        done = subprocess.run([sys.executable, __file__, *_shared_flags(args), "--one", row], capture_output=True,
                              text=True, env=env)
        if done.returncode != 0:
            err = done.stderr.strip().splitlines()
            print(json.dumps({"row": row, "error": err[-1] if err else f"exit {done.returncode}"}), flush=True)
        else:
            print(done.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
