"""Every CUDA path of scratchgpt on a real GPU: parity with the CPU, bf16 autocast and flash attention,
the KV cache, training with compile + fused AdamW and its exact resume, fine-tuning, int8 and bf16
inference, the server, torchrun. All marked `gpu`: without CUDA they skip (tests/conftest.py), so CI
never needs a GPU; scripts/gpu_check.sh runs them where there is one.

Why one file instead of gpu tests in each tests/test_<module>.py: the GPU machines this runs on hold
another set of packages (no hypothesis, fastapi or uvicorn guaranteed, an older CUDA torch), and
several test files import such packages at the top, so a run there could not even collect them. This
file imports only torch and scratchgpt's core, needs no data folder (it writes its own tiny corpus),
and imports anything optional with pytest.importorskip inside the one test that needs it.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import os
import random
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from scratchgpt.checkpoint import load_any, save_model, save_quantized
from scratchgpt.cli import main
from scratchgpt.config import GPTConfig, InstructConfig, LoRAConfig, SamplingConfig, TrainConfig
from scratchgpt.data.dataset import prepare
from scratchgpt.data.tokenizers import CharTokenizer
from scratchgpt.inference.generate import decode_one_token, generate, prefill
from scratchgpt.model.gpt import GPT, KVCache
from scratchgpt.model.quantize import Int8Linear, cast_weights, quantize_model, set_kernel
from scratchgpt.training.modes.instruct import finetune_instruct
from scratchgpt.training.optim import make_optimizer
from scratchgpt.training.runtime import autocast, resolve_runtime, to_device
from scratchgpt.training.train import train_step

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda", 0)
VOCAB = 97


def tiny_gpt(seed: int = 0, **overrides) -> GPT:
    """2 layers, 64 wide, head size 16 (flash attention needs a multiple of 8), no dropout, eval mode."""
    base = dict(vocab_size=VOCAB, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                embd_pdrop=0.0, resid_pdrop=0.0, attn_pdrop=0.0)
    return GPT(GPTConfig(**{**base, **overrides}), generator=torch.Generator().manual_seed(seed)).eval()


def ids(batch: int, length: int, *, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def full_fp32():
    """float32 matmuls in full float32 (no TF32) for the length of a test: parity with the CPU is only
    meaningful then (TF32 keeps 10 mantissa bits, ~1e-3 relative)."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(before)


@pytest.fixture
def deterministic(monkeypatch: pytest.MonkeyPatch):
    """Deterministic CUDA kernels (flash attention's backward, index_put under compile) for one test."""
    # cuBLAS needs a fixed workspace for reproducible results; PyTorch refuses deterministic mode without it.
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", os.environ.get("CUBLAS_WORKSPACE_CONFIG", ":4096:8"))
    before = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before, warn_only=warn_only)


# ---------------------------------------------------------------------------------------------
# Corpus and data written here (no data folder on GPU machines)
# ---------------------------------------------------------------------------------------------

WORDS = ["the", "a", "river", "stone", "cloud", "light", "music", "table", "paper", "green", "smile", "runs",
         "falls", "sings", "over", "under", "near", "slowly", "quietly", "bright", "old", "new"]


def corpus(n_sentences: int = 3000, *, seed: int = 0) -> str:
    """Seeded sentences of 4-9 words: a char-level model learns their spelling within a few steps."""
    rng = random.Random(seed)
    return "\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 9))) + "." for _ in range(n_sentences))


@pytest.fixture(scope="module")
def char_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prepared char-level folder (train.bin, val.bin, meta.json, tokenizer) of `corpus()`."""
    root = tmp_path_factory.mktemp("gpu_char")
    (root / "input.txt").write_text(corpus(), encoding="utf-8")
    prepare(root / "input.txt", root / "data", tokenizer="char", progress=False)
    return root / "data"


@pytest.fixture(scope="module")
def char_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random GPT with a char tokenizer over `corpus()`, saved as an Alpaca-tuned run directory."""
    tokenizer = CharTokenizer.train(corpus(200))
    model = tiny_gpt(vocab_size=tokenizer.vocab_size)
    return save_model(model, tmp_path_factory.mktemp("gpu_serve") / "tiny", tokenizer=tokenizer,
                      extra={"chat_template": "alpaca"})


# ---------------------------------------------------------------------------------------------
# Device, dtype and attention choice; the model's forward pass
# ---------------------------------------------------------------------------------------------


def test_auto_runtime_is_cuda_bf16_sdpa():
    runtime = resolve_runtime("auto")
    assert runtime.device == CUDA and runtime.attn_impl == "sdpa"
    assert runtime.dtype == (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)


@pytest.mark.parametrize("attn_impl", ["sdpa", "eager"])
def test_float32_forward_matches_the_cpu(full_fp32, attn_impl):
    model = tiny_gpt()
    model.set_attn_impl(attn_impl)
    x, y = ids(4, 48), ids(4, 48, seed=1)
    with torch.no_grad():
        cpu_logits, cpu_loss = model(x, y)
        gpu_logits, gpu_loss = copy.deepcopy(model).to(CUDA)(x.to(CUDA), y.to(CUDA))
    assert gpu_logits.device == CUDA
    # Different kernels sum in different orders: float32 rounding, ~1e-6 here; the bound is 1e-4.
    assert (gpu_logits.cpu() - cpu_logits).abs().max().item() <= 1e-4
    assert abs(gpu_loss.item() - cpu_loss.item()) <= 1e-5


def test_bf16_autocast_runs_flash_attention_and_keeps_the_loss():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = tiny_gpt()
    x, y = ids(4, 48), ids(4, 48, seed=1)
    with torch.no_grad():
        _, cpu_loss = model(x, y)  # float32 on the CPU: the reference
        gpu = copy.deepcopy(model).to(CUDA)
        # Restricting SDPA to the flash kernel makes the forward fail unless the fused path really runs.
        with autocast(CUDA, torch.bfloat16), sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            logits, loss = gpu(x.to(CUDA), y.to(CUDA))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(loss)
    # bf16 keeps 8 mantissa bits (~0.4% per product); the loss (~ln 97 = 4.6, its log-sum-exp in float32
    # under autocast) moved by ~1e-3 in trials of this size. 2e-2 leaves room without hiding a wrong kernel.
    assert abs(loss.item() - cpu_loss.item()) < 2e-2


def test_kv_cache_decoding_equals_recomputing_on_cuda(full_fp32):
    cpu_model = tiny_gpt(seed=3)
    model = copy.deepcopy(cpu_model).to(CUDA)
    # Teacher-forced: each cached step's logits against a full forward over the same tokens.
    seq = ids(1, 40, seed=2).to(CUDA)
    with torch.inference_mode():
        cache = KVCache.empty(model.config, batch_size=1, max_len=40, device=CUDA, dtype=torch.float32)
        step_logits = [prefill(model, seq[:, :8], cache, mask=None, positions=None)]
        step_logits += [decode_one_token(model, seq[:, t : t + 1], cache, positions=None) for t in range(8, 39)]
        for t, got in enumerate(step_logits, start=8):
            want = model(seq[:, :t])[0][:, -1]
            assert (got - want).abs().max().item() <= 1e-4, f"position {t}"
    # Greedy, a batch of prompts of different lengths (left padding + mask): cached, recomputed, and
    # the CPU all agree. (This seed's smallest top-1/top-2 logit gap is far above float32 noise.)
    prompts = [ids(1, n, seed=10 + n)[0].tolist() for n in (5, 11, 3)]
    sampling = SamplingConfig(max_new_tokens=16, temperature=0.0)
    cached = generate(model, prompts, sampling)
    assert cached == generate(model, prompts, sampling, use_cache=False)
    assert cached == generate(cpu_model, prompts, sampling)


# ---------------------------------------------------------------------------------------------
# Training: fused AdamW, Muon, pinned batches, compile + bf16 + exact resume, torchrun
# ---------------------------------------------------------------------------------------------


def test_fused_adamw_on_cuda_steps_like_the_foreach_kernel():
    x, y = ids(4, 32).to(CUDA), ids(4, 32, seed=1).to(CUDA)
    models, losses = [tiny_gpt().train().to(CUDA) for _ in range(2)], []
    for model, fused in zip(models, (True, False), strict=True):
        params = list(model.parameters())
        opt = make_optimizer(params, TrainConfig(fused_adamw=fused, lr=1e-3), device_type="cuda")
        assert bool(opt.defaults["fused"]) is fused
        for _ in range(3):
            loss, _ = train_step(model, opt, [(x, y)], params=params, grad_accum_steps=1, grad_clip=1.0,
                                 amp=lambda: autocast(CUDA, torch.bfloat16))
        losses.append(loss.item())
    # Same arithmetic in a different kernel; bf16 autocast rounds the same inputs the same way, and
    # three AdamW steps of lr 1e-3 move weights by ~3e-3, where float32 reordering shows as ~1e-7.
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert losses[0] == pytest.approx(losses[1], abs=1e-4)


def test_muon_trains_on_cuda():
    model = tiny_gpt().train().to(CUDA)
    params = list(model.parameters())
    opt = make_optimizer(params, TrainConfig(optimizer="muon"), device_type="cuda", model=model)
    x = ids(8, 32).to(CUDA)
    y = torch.roll(x, -1, dims=1)
    losses = [train_step(model, opt, [(x, y)], params=params, grad_accum_steps=1, grad_clip=1.0,
                         amp=lambda: autocast(CUDA, torch.bfloat16))[0].item() for _ in range(8)]
    assert all(map(math.isfinite, losses))
    assert losses[-1] < losses[0] - 0.5  # one fixed batch: memorised quickly (4.6 -> ~2 in trials)


def test_batches_reach_the_gpu_through_pinned_memory_intact():
    x, y = ids(4, 16), ids(4, 16, seed=1)
    original = (x.clone(), y.clone())
    moved = to_device({"pair": (x, y), "n": 3}, CUDA)
    # The copy is asynchronous from a pinned staging copy: changing the source right away must not leak.
    x.zero_()
    y.zero_()
    torch.cuda.synchronize()
    assert moved["n"] == 3 and moved["pair"][0].device == CUDA
    assert torch.equal(moved["pair"][0].cpu(), original[0]) and torch.equal(moved["pair"][1].cpu(), original[1])


TRAIN = ["--n-layer", "2", "--n-head", "2", "--n-embd", "64", "--block-size", "64", "--batch-size", "8",
         "--eval-steps", "2", "--log-interval", "4", "--progress", "false", "--plot", "false",
         "--warmup-steps", "2", "--lr", "3e-3", "--lr-decay-steps", "12", "--seed", "5",
         "--eval-interval", "6", "--checkpoint-interval", "6", "--device", "cuda"]


def _train(char_dir: Path, out: Path, *extra: str) -> int:
    return main(["train", "--dir", str(char_dir), "--out-dir", str(out), *TRAIN, *extra])


def test_compiled_bf16_training_learns_and_resumes_byte_identically(char_dir, tmp_path, deterministic):
    fast = ["--dtype", "bfloat16", "--compile", "true", "--fused-adamw", "true", "--attn-impl", "sdpa"]
    assert _train(char_dir, tmp_path / "straight", *fast, "--max-steps", "12") == 0
    assert _train(char_dir, tmp_path / "parts", *fast, "--max-steps", "6") == 0
    assert _train(char_dir, tmp_path / "parts", *fast, "--max-steps", "12", "--resume") == 0
    straight = (tmp_path / "straight" / "model.safetensors").read_bytes()
    assert (tmp_path / "parts" / "model.safetensors").read_bytes() == straight
    vals = {int(r["step"]): float(r["val_loss"]) for r in csv.DictReader((tmp_path / "straight" / "log.csv").open())
            if r["val_loss"]}
    assert sorted(vals) == [0, 6, 12]
    assert vals[12] < vals[0] - 0.5  # from ~ln(26) = 3.3 towards the corpus's letter statistics
    model, _ = load_any(tmp_path / "parts")  # saved from the unwrapped module: no _orig_mod. prefixes
    assert isinstance(model, GPT)


def test_torchrun_one_process_trains_on_its_gpu(char_dir, tmp_path):
    # One process joins no process group (nothing to synchronise): this checks the documented launch and
    # that the process takes the GPU of its LOCAL_RANK. NCCL itself needs two GPUs: the test below.
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
            "-m", "scratchgpt", "train", "--dir", str(char_dir), "--out-dir", str(tmp_path / "one"), *TRAIN,
            "--max-steps", "4"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "on cuda:0" in proc.stdout + proc.stderr
    summaries = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(summaries) == 1 and summaries[0]["step"] == 4


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_torchrun_two_gpus_on_nccl_match_one_process(char_dir, tmp_path, mode):
    if torch.cuda.device_count() < 2:
        pytest.skip("NCCL runs one rank per GPU: this needs two GPUs")
    exact = ["--dtype", "float32", "--max-steps", "8", "--eval-interval", "4"]
    assert _train(char_dir, tmp_path / "one", *exact) == 0
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "-m", "scratchgpt", "train", "--dir", str(char_dir), "--out-dir", str(tmp_path / "two"), *TRAIN,
            *exact, "--batch-size", "4", *(["--fsdp"] if mode == "fsdp" else [])]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from safetensors.torch import load_file

    one, two = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert one.keys() == two.keys()
    for name in one:
        # Two half-batches all-reduced vs one batch: float32 sums in another order (TF32 is off by default).
        torch.testing.assert_close(one[name], two[name], atol=2e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# Fine-tuning: instruct, full and LoRA
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def toy_instructions(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """60 tiny instructions (copy or upper-case a word), as JSON (as tests/test_instruct.py's)."""
    rng = random.Random(0)
    entries = []
    for _ in range(60):
        w = rng.choice(WORDS[2:12])
        if rng.random() < 0.5:
            entries.append({"instruction": "Repeat the word.", "input": w, "output": w})
        else:
            entries.append({"instruction": f"Shout {w}.", "input": "", "output": w.upper() + "!"})
    path = tmp_path_factory.mktemp("gpu_instruct") / "toy.json"
    path.write_text(json.dumps(entries))
    return path


@pytest.mark.parametrize("lora", [None, LoRAConfig(rank=8, alpha=16)], ids=["full", "lora"])
def test_instruct_finetuning_on_cuda_lowers_the_val_loss(toy_instructions, tmp_path, lora):
    train = dict(max_steps=30, lr=3e-3 if lora is None else 1e-2, batch_size=8, eval_interval=10, progress=False,
                 plot=False, device="cuda", dtype="bfloat16", out_dir=str(tmp_path / "sft"))
    result = finetune_instruct(InstructConfig(data=str(toy_instructions), tokenizer="char", response_tokens=8),
                               train=train, model=dict(n_embd=64, n_layer=2, n_head=4, n_positions=256),
                               lora=lora, verbose=False)
    m = result.metrics
    assert next(result.model.parameters()).device == CUDA
    # Margins from CPU float32 runs of the same settings (full: 4.0 -> ~2.3; LoRA on a random base: less).
    assert m["val"]["loss"] < m["start"]["val"]["loss"] - (0.5 if lora is None else 0.2)
    assert len(json.loads((tmp_path / "sft" / "test_responses.json").read_text())) == 3  # decoded on the GPU
    model, _ = load_any(tmp_path / "sft", device=CUDA)  # a plain GPT (LoRA merged on export)
    assert isinstance(model, GPT) and not any("lora" in n for n, _ in model.named_parameters())


# ---------------------------------------------------------------------------------------------
# Inference: int8 and bf16 weights, the server
# ---------------------------------------------------------------------------------------------


def test_int8_on_cuda_runs_the_reference_kernel_like_the_cpu(full_fp32, tmp_path):
    base = tiny_gpt(seed=4)
    on_cpu = quantize_model(copy.deepcopy(base), kernel="reference")
    on_gpu = quantize_model(copy.deepcopy(base).to(CUDA))
    assert {m.kernel for m in on_gpu.modules() if isinstance(m, Int8Linear)} == {"reference"}
    x = ids(2, 24)
    with torch.no_grad():
        want, got = on_cpu(x)[0], on_gpu(x.to(CUDA))[0]
        assert (got.cpu() - want).abs().max().item() <= 1e-4  # the same int8 weights; float32 rounding only
        # Quantized on the CPU for its fast kernel, then moved: the GPU runs the reference, identically.
        # (Named, not default_kernel(): that probes the CPU with an API older CUDA torches may lack.)
        fast = "fbgemm" if "fbgemm" in torch.backends.quantized.supported_engines else "int8pack"
        moved = quantize_model(copy.deepcopy(base), kernel=fast).to(CUDA)
        assert torch.equal(moved(x.to(CUDA))[0], got)
    with pytest.raises(ValueError, match="runs on the CPU only"):
        set_kernel(on_gpu, "fbgemm")
    sampling = SamplingConfig(max_new_tokens=12, temperature=0.0)
    prompt = ids(1, 6, seed=5)[0].tolist()
    assert generate(on_gpu, prompt, sampling) == generate(on_cpu, prompt, sampling)
    # A saved int8 run directory loads onto the GPU as it is.
    save_quantized(on_cpu, tmp_path / "q", tokenizer=CharTokenizer.train(corpus(50)))
    loaded, _ = load_any(tmp_path / "q", device=CUDA)
    assert {b.device for b in loaded.buffers()} == {CUDA}
    with torch.no_grad():
        assert torch.equal(loaded(x.to(CUDA))[0], got)


def test_bf16_weights_generate_on_cuda():
    base = tiny_gpt(seed=6)
    model = cast_weights(copy.deepcopy(base).to(CUDA), "bfloat16", device=CUDA)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    x = ids(2, 24)
    with torch.no_grad():
        diff = (model(x.to(CUDA))[0].float().cpu() - base(x)[0]).abs().max().item()
    assert diff < 0.05  # bf16 weights: ~3 significant digits on logits of magnitude ~1
    out = generate(model, ids(1, 5)[0].tolist(), SamplingConfig(max_new_tokens=8, temperature=0.0))
    assert len(out[0]) == 8


def test_server_answers_a_request_on_device_cuda(char_checkpoint):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    argv = [sys.executable, "-m", "scratchgpt", "serve", "--checkpoint", str(char_checkpoint), "--device", "cuda",
            "--port", "0", "--log-level", "warning"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        for line in proc.stdout:  # the "serving ... on http://127.0.0.1:PORT/" line comes once the model is loaded
            lines.append(line)
            if line.startswith("serving"):
                break
        found = re.search(r"http://127\.0\.0\.1:(\d+)/", "".join(lines))
        assert found, "".join(lines)[-3000:]
        base = f"http://127.0.0.1:{found[1]}"
        deadline = time.monotonic() + 60
        while True:  # the line is printed just before uvicorn starts listening on the bound socket
            try:
                urllib.request.urlopen(base + "/health", timeout=5).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        body = {"model": char_checkpoint.name, "prompt": "the river", "max_tokens": 8, "temperature": 0}
        request = urllib.request.Request(base + "/v1/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.loads(response.read())
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    model, tokenizer = load_any(char_checkpoint, device=CUDA)
    want = generate(model, tokenizer.encode("the river"), SamplingConfig(max_new_tokens=8, temperature=0.0),
                    eot_id=tokenizer.eot_id)[0]
    assert answer["choices"][0]["text"] == tokenizer.decode(want)
    assert answer["usage"]["completion_tokens"] == len(want)

