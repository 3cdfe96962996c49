"""How much memory a training run needs, estimated before its first step: the one log line that says whether
a model fits on the machine before an hour is spent finding out.

    weights      every parameter and buffer in its own dtype (an int8 base: 1 byte a weight + float32 scales),
                 split into what trains and the frozen rest
    gradients    one per trainable parameter, in its dtype (accumulation adds into the same buffers)
    optimizer    AdamW: exp_avg + exp_avg_sq per trainable parameter in its dtype; KahanAdamW (bf16-true) also
                 its compensation; Muon: one momentum buffer for each matrix it trains (and a compensation for
                 bf16 ones)
    activations  what autograd keeps for the backward pass, per token (below) × the micro-batch's tokens
                 (gradient accumulation runs one micro-batch at a time, so it does not multiply this)

Activations per token, a simple count of the tensors a GPT block keeps (C width, Cq = n_head·hs query width,
Ckv = n_kv_head·hs, H the MLP's hidden width), in the activations' dtype (bf16 under autocast / bf16-true):
    the embeddings' output                                C
    each block   norm inputs and outputs 4C, rotated q/k and v (Cq + 2Ckv), attention output and the
                 output projection's input 2Cq, the MLP's hidden 2H (3H for SwiGLU: gate, up, silu(gate))
    the head     the final norm's input and output 2C, plus logits and log-probabilities (2V) in float32
With activation checkpointing a block keeps only its input (C), and the backward pass recomputes one block
at a time, so one block's full set is added back once. Where the micro-batch's float32 logits exceed
model.gpt.LOSS_CHUNK_BYTES the head and loss run a chunk of tokens at a time, so no logits are kept at all:
always with a plain linear head (fused with the loss), and under checkpointing with any head.

The peak RSS adds what the total leaves out, as measured (peak RSS, AMD EPYC Zen 3, torch 2.13):
    runtime      Python, torch and scratchgpt before any model: 224 MB
    transient    what each step makes and frees again, whose pages the allocator keeps for the next step:
                 about 6 blocks' worth of activations (one block recomputed, its gradients, the outputs its
                 matmuls and adapters make and sum), the head's working set (a chunk's logits, log-probabilities
                 and their gradient; fused with the loss, a chunk's logits, which become their own gradient,
                 and the head's weight gradient, made in the forward; or the whole logits' gradient), an int8
                 base's dequantized weight blocks (2 of at most 64 MB), and fbgemm's packed copy of int8 weights
                 where that kernel runs (2 bytes a weight)
Measured (peak RSS of the steps, kept freed memory as the training driver sets it): Llama-3.2-1B, LoRA over an
int8 base, 512 tokens, checkpointing: estimated 2,419 MiB, measured 2,604 MiB; over a float32 base 2-5% under,
Qwen3-0.6B's full float32 fine-tune 6% under (bench/scale.py, README: "Fine-tune a 1B model on a laptop"); a
4-layer, 256-wide GPT with a 65k vocabulary at 512 tokens: within 15%, full and LoRA-int8 (tests/test_memory.py;
Intel Xeon, 2026-12-07: full float32 0.4% under, LoRA-int8 4% over).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from scratchgpt.config import GPTConfig
from scratchgpt.model.fused_loss import fused_chunk_rows
from scratchgpt.model.gpt import GPT, loss_chunk_rows
from scratchgpt.model.quantize import BLOCK_BYTES, Int8Linear
from scratchgpt.training.optim import KahanAdamW, MuonAdamW

GB = 1e9
RUNTIME_BYTES = 224 << 20  # Python + torch + scratchgpt imported, no model yet (module docstring)
TRANSIENT_BLOCKS = 6  # one block's activations, in blocks' worth made and freed per step (module docstring)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a training step needs, by kind (see the module docstring); `line()` is the log line."""

    trainable: int  # the weights that train
    frozen: int  # every other parameter and buffer (a LoRA run's base)
    gradients: int
    optimizer: int
    activations_per_token: int
    tokens: int  # per micro-batch: batch_size × sequence length
    checkpointing: bool = False
    frozen_by_dtype: tuple[tuple[str, int], ...] = ()
    transient: int = 0  # made and freed within each step, kept by the allocator (module docstring)
    runtime: int = 0  # the process before any model

    @property
    def activations(self) -> int:
        return self.activations_per_token * self.tokens

    @property
    def total(self) -> int:
        """What the run's tensors hold at once: weights, gradients, optimizer state, kept activations."""
        return self.trainable + self.frozen + self.gradients + self.optimizer + self.activations

    @property
    def peak(self) -> int:
        """The process's expected peak RSS: the total, each step's transient buffers and the runtime."""
        return self.total + self.transient + self.runtime

    def line(self) -> str:
        frozen = ", ".join(f"{dtype} {n / GB:.2f}" for dtype, n in self.frozen_by_dtype)
        return (f"memory estimate per process: weights {self.trainable / GB:.2f} GB trainable + "
                f"{self.frozen / GB:.2f} GB frozen{f' ({frozen})' if frozen else ''}, gradients "
                f"{self.gradients / GB:.2f} GB, optimizer state {self.optimizer / GB:.2f} GB, activations "
                f"{self.activations / GB:.2f} GB ({self.activations_per_token / 1024:.1f} KiB/token × {self.tokens} "
                f"tokens, activation checkpointing {'on' if self.checkpointing else 'off'}): "
                f"~{self.total / GB:.2f} GB in all; peak RSS ~{self.peak / GB:.2f} GB with each step's transient "
                f"buffers ({self.transient / GB:.2f} GB) and the runtime ({self.runtime / GB:.2f} GB)")


def activation_bytes_per_token(config: GPTConfig, *, dtype_bytes: int, checkpointing: bool = False,
                               logits: bool = True) -> int:
    """Bytes autograd keeps per token of a micro-batch for `config`'s GPT (the count in the module docstring);
    `logits` False: the head's loss runs in chunks (none kept)."""
    block = _block_values_per_token(config)
    blocks = config.n_layer * config.n_embd + block if checkpointing else config.n_layer * block
    return dtype_bytes * (3 * config.n_embd + blocks) + (4 * 2 * config.vocab_size if logits else 0)


def _block_values_per_token(config: GPTConfig) -> int:
    """The values one block keeps per token for its backward pass (the count in the module docstring)."""
    C, H = config.n_embd, config.mlp_hidden
    q, kv = config.n_head * config.head_size, config.kv_heads * config.head_size
    return 4 * C + 3 * q + 2 * kv + (3 if config.activation == "swiglu" else 2) * H


def _transient_bytes(model: nn.Module, config: GPTConfig | None, *, tokens: int, dtype_bytes: int,
                     chunk_tokens: int | None, fused_head_grad: int | None) -> int:
    """Each step's transient buffers (module docstring). `fused_head_grad`: with the head fused with the loss,
    the bytes of the head's weight gradient it makes in the forward (0 for a frozen head); None otherwise."""
    int8 = [m for m in model.modules() if isinstance(m, Int8Linear)]
    # A dequantized block of rows (at most BLOCK_BYTES of float32), and the next one being made.
    out = 2 * min(BLOCK_BYTES, max(4 * m.weight.numel() for m in int8)) if int8 else 0
    out += 2 * sum(m.weight.numel() for m in int8 if m.kernel == "fbgemm")  # the pack: int8 copy + packed layout
    if config is not None:
        out += TRANSIENT_BLOCKS * dtype_bytes * _block_values_per_token(config) * tokens
        logits = 4 * config.vocab_size
        if chunk_tokens is None:
            out += logits * tokens
        elif fused_head_grad is not None:
            # model.fused_loss: one chunk's float32 logits (and their copy in a lower matmul dtype), which become
            # their own gradient in place, and the head's weight gradient, made whole in the forward.
            low = config.vocab_size * dtype_bytes if dtype_bytes != 4 else 0
            out += (logits + low) * chunk_tokens + fused_head_grad
        else:  # chunks under checkpoint: a chunk's logits, log-probabilities and their gradient
            out += 3 * logits * chunk_tokens
    return out


def _optimizer_bytes(optimizer: torch.optim.Optimizer) -> int:
    """The state `optimizer` will hold once it has stepped: per parameter, its slots × its bytes."""
    muon = {id(p) for g in optimizer.muon.param_groups for p in g["params"]} \
        if isinstance(optimizer, MuonAdamW) and optimizer.muon is not None else set()
    adamw = optimizer.adamw if isinstance(optimizer, MuonAdamW) else optimizer
    adam_slots = 3 if isinstance(adamw, KahanAdamW) else 2

    def slots(p: torch.Tensor) -> int:  # Muon: momentum, and a compensation for bf16 weights (bf16-true)
        return (1 + (p.dtype == torch.bfloat16)) if id(p) in muon else adam_slots

    return sum(p.numel() * p.element_size() * slots(p) for g in optimizer.param_groups for p in g["params"])


def estimate_memory(
    model: nn.Module, optimizer: torch.optim.Optimizer, *, tokens: int, dtype_bytes: int, checkpointing: bool = False,
) -> MemoryEstimate:
    """The memory a training step of `model` needs (its parameters that `optimizer` trains, the rest frozen) on
    micro-batches of `tokens` tokens (batch_size × sequence length), with activations of `dtype_bytes` each."""
    trained = {id(p) for g in optimizer.param_groups for p in g["params"]}
    seen: set[int] = set()
    trainable = 0
    frozen: dict[str, int] = {}
    for t in (*model.parameters(), *model.buffers()):  # tied / shared tensors once
        if id(t) in seen:
            continue
        seen.add(id(t))
        n = t.numel() * t.element_size()
        if id(t) in trained:
            trainable += n
        else:
            name = str(t.dtype).removeprefix("torch.")
            frozen[name] = frozen.get(name, 0) + n
    config = getattr(model, "config", None)
    config = config if isinstance(config, GPTConfig) else None
    # GPT.forward's rule: logits over LOSS_CHUNK_BYTES are chunked with a plain head (fused with the loss) or
    # under checkpointing (any head).
    chunk_tokens = loss_chunk_rows(config.vocab_size, tokens) if config is not None else None
    fused = isinstance(model, GPT) and model.head_fuses_with_loss()
    if chunk_tokens is not None and not (checkpointing or fused):
        chunk_tokens = None
    if chunk_tokens is not None and fused:
        chunk_tokens = min(tokens, fused_chunk_rows(chunk_tokens, dtype_bytes))
    per_token = activation_bytes_per_token(config, dtype_bytes=dtype_bytes, checkpointing=checkpointing,
                                           logits=chunk_tokens is None) if config is not None else 0
    head = getattr(model, "lm_head", None) if fused else None
    head_grad = None if head is None else (head.weight.numel() * head.weight.element_size()
                                           if id(head.weight) in trained else 0)
    transient = _transient_bytes(model, config, tokens=tokens, dtype_bytes=dtype_bytes, chunk_tokens=chunk_tokens,
                                 fused_head_grad=head_grad)
    return MemoryEstimate(
        trainable=trainable, frozen=sum(frozen.values()), gradients=trainable, optimizer=_optimizer_bytes(optimizer),
        activations_per_token=per_token, tokens=tokens, checkpointing=checkpointing,
        frozen_by_dtype=tuple(sorted(frozen.items(), key=lambda kv: -kv[1])),
        transient=transient, runtime=RUNTIME_BYTES,
    )
