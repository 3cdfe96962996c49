"""The start-of-run memory estimate: its arithmetic, by hand, for every kind of run it describes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from scratchgpt.config import GPTConfig, LoRAConfig, TrainConfig
from scratchgpt.model.gpt import GPT
from scratchgpt.training.lora import apply_lora, lora_parameters
from scratchgpt.training.memory import MemoryEstimate, activation_bytes_per_token, estimate_memory
from scratchgpt.training.optim import make_optimizer

# C=16, 2 heads of 8, H=64, V=100, 2 layers, learned positions (a 100 x 16 table... and 8 x 16 positions).
CONFIG = GPTConfig(vocab_size=100, n_positions=8, n_embd=16, n_layer=2, n_head=2, n_inner=64)


def test_activations_per_token_count_each_kept_tensor():
    # A block: norms 4C = 64, q/k/v 3·16 = 48, attention output + projection input 2·16 = 32, MLP 2H = 128.
    block = 64 + 48 + 32 + 128
    # Embedding output C + 2 blocks + final norm 2C, in 4-byte floats; logits and log-probs 2V in float32.
    assert activation_bytes_per_token(CONFIG, dtype_bytes=4) == 4 * (16 + 2 * block + 32) + 8 * 100 == 3168
    # bf16 activations halve all but the float32 loss; checkpointing keeps each block's input (C) plus one block.
    assert activation_bytes_per_token(CONFIG, dtype_bytes=2) == 2 * (16 + 2 * block + 32) + 800
    assert activation_bytes_per_token(CONFIG, dtype_bytes=4, checkpointing=True) == 4 * (16 + 2 * 16 + block + 32) + 800
    # Grouped-query SwiGLU (Llama): 4 query heads of 4, 1 kv head: q 16, k/v 4 each; MLP 3H.
    llama = GPTConfig(vocab_size=100, n_positions=8, n_embd=16, n_layer=1, n_head=4, n_kv_head=1, n_inner=64,
                      activation="swiglu", norm="rmsnorm", pos_encoding="rope", bias=False)
    assert activation_bytes_per_token(llama, dtype_bytes=4) == 4 * (16 + (64 + 16 + 8 + 32 + 192) + 32) + 800


def test_full_training_counts_weights_gradients_and_two_adamw_states():
    model = GPT(CONFIG)
    n = sum(p.numel() for p in model.parameters())  # the tied head counted once
    opt = make_optimizer(model.parameters(), TrainConfig(), device_type="cpu")
    est = estimate_memory(model, opt, tokens=4 * 8, dtype_bytes=4)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    assert (est.trainable, est.gradients, est.optimizer) == (4 * n, 4 * n, 8 * n)
    assert est.frozen == buffers  # nothing but the model's buffers is frozen
    assert est.activations == 32 * 3168
    assert est.total == 16 * n + buffers + 32 * 3168
    # Gradient accumulation runs one micro-batch at a time: the estimate depends on its tokens only.
    assert "activations 0.00 GB (3.1 KiB/token × 32 tokens, activation checkpointing off)" in est.line()


def test_bf16_true_counts_two_bytes_and_kahan_compensation():
    model = GPT(CONFIG).bfloat16()
    n = sum(p.numel() for p in model.parameters())
    opt = make_optimizer(model.parameters(), TrainConfig(dtype="bf16-true"), device_type="cpu")
    est = estimate_memory(model, opt, tokens=8, dtype_bytes=2)
    assert (est.trainable, est.gradients, est.optimizer) == (2 * n, 2 * n, 3 * 2 * n)


def test_lora_over_an_int8_base_counts_the_frozen_base_in_its_own_bytes():
    model = GPT(CONFIG)
    apply_lora(model, LoRAConfig(rank=2, targets=("c_attn",), base_dtype="int8"))
    adapters = sum(p.numel() for p in lora_parameters(model))
    assert adapters == 2 * (2 * 16 + 48 * 2)
    opt = make_optimizer(lora_parameters(model), TrainConfig(), device_type="cpu")
    est = estimate_memory(model, opt, tokens=8, dtype_bytes=4, checkpointing=True)
    assert (est.trainable, est.gradients, est.optimizer) == (4 * adapters, 4 * adapters, 8 * adapters)
    # int8: one byte per matrix entry (the tied head shares the embedding's), float32 scales and norms/biases.
    matrices = 100 * 16 + 8 * 16 + 2 * (16 * 48 + 16 * 16 + 16 * 64 + 64 * 16)
    assert dict(est.frozen_by_dtype)["int8"] == matrices
    assert est.frozen == sum(n for _, n in est.frozen_by_dtype)
    assert "activation checkpointing on" in est.line() and "int8 0.00" in est.line()


def test_line_adds_up_in_gigabytes():
    est = MemoryEstimate(trainable=2 * 10**9, frozen=10**9, gradients=2 * 10**9, optimizer=4 * 10**9,
                         activations_per_token=1024, tokens=500_000, frozen_by_dtype=(("int8", 10**9),),
                         transient=10**9, runtime=250_000_000)
    assert est.total == 9 * 10**9 + 512_000_000
    assert est.peak == est.total + 10**9 + 250_000_000
    assert est.line() == ("memory estimate per process: weights 2.00 GB trainable + 1.00 GB frozen (int8 1.00), "
                          "gradients 2.00 GB, optimizer state 4.00 GB, activations 0.51 GB (1.0 KiB/token × 500000 "
                          "tokens, activation checkpointing off): ~9.51 GB in all; peak RSS ~10.76 GB with each "
                          "step's transient buffers (1.00 GB) and the runtime (0.25 GB)")


_PEAK_RUN = """
import sys, torch
from scratchgpt.config import GPTConfig, LoRAConfig, TrainConfig
from scratchgpt.device import keep_freed_memory
from scratchgpt.model.gpt import GPT
from scratchgpt.training.lora import apply_lora, lora_parameters
from scratchgpt.training.memory import estimate_memory
from scratchgpt.training.optim import make_optimizer
from scratchgpt.training.train import train_step

lora = sys.argv[1] == "lora"
torch.set_num_threads(1)
cfg = GPTConfig(vocab_size=65536, n_positions=512, n_embd=256, n_layer=4, n_head=4, n_kv_head=2, n_inner=1024,
                activation="swiglu", norm="rmsnorm", pos_encoding="rope", bias=False)
model = GPT(cfg, generator=torch.Generator().manual_seed(0)).train()
params = list(model.parameters())
if lora:
    apply_lora(model, LoRAConfig(rank=8, base_dtype="int8", targets=("c_attn", "attn.c_proj", "c_fc", "mlp.c_proj")))
    params = lora_parameters(model)
model.activation_checkpointing = lora
opt = make_optimizer(params, TrainConfig(), device_type="cpu")
keep_freed_memory()  # as the training driver
x = torch.randint(cfg.vocab_size, (1, 512), generator=torch.Generator().manual_seed(1))
for _ in range(3):
    train_step(model, opt, [(x, torch.roll(x, -1, dims=1))], params=params, grad_accum_steps=1)
est = estimate_memory(model, opt, tokens=512, dtype_bytes=4, checkpointing=lora)
# VmHWM, not getrusage's ru_maxrss: a child started by fork + exec reports at least the parent's RSS at the fork
# there (the kernel keeps the old address space's high-water mark), i.e. the test runner's, not this run's.
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(est.peak, int(hwm.split()[1]) * 1024)
"""


@pytest.mark.slow  # two processes of their own, ~30-60 s each on two busy cores
@pytest.mark.parametrize("run", ["full", "lora"])
def test_peak_estimate_is_within_15_percent_of_a_small_runs_peak_rss(run):
    """A process of its own trains a small Llama-shaped GPT (65k vocabulary, 512 tokens) three steps: full float32
    training, or LoRA over an int8 base with checkpointing (chunked loss); the estimate's peak RSS meets it."""
    src = Path(__file__).resolve().parents[1] / "src"
    out = subprocess.run([sys.executable, "-c", _PEAK_RUN, run], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(src)}).stdout
    estimated, measured = map(int, out.split())
    assert abs(estimated - measured) / measured < 0.15, (estimated, measured)
