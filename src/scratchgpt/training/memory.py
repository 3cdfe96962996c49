"""How much memory a training run needs, estimated before its first step: the one log line that says whether
a model fits on the machine before an hour is spent finding out.

    weights      every parameter and buffer in its own dtype (an int8 base: 1 byte a weight + float32 scales),
                 split into what trains and the frozen rest
    gradients    one per trainable parameter, in its dtype (accumulation adds into the same buffers)
    optimizer    AdamW: exp_avg + exp_avg_sq per trainable parameter in its dtype; KahanAdamW (bf16-true) also
                 its compensation; Muon: one momentum buffer for each matrix it trains
    activations  what autograd keeps for the backward pass, per token (below) × the micro-batch's tokens
                 (gradient accumulation runs one micro-batch at a time, so it does not multiply this)

Activations per token, a simple count of the tensors a GPT block keeps (C width, Cq = n_head·hs query width,
Ckv = n_kv_head·hs, H the MLP's hidden width), in the activations' dtype (bf16 under autocast / bf16-true):
    the embeddings' output                                C
    each block   norm inputs and outputs 4C, rotated q/k and v (Cq + 2Ckv), attention output and the
                 output projection's input 2Cq, the MLP's hidden 2H (3H for SwiGLU: gate, up, silu(gate))
    the head     the final norm's input and output 2C, plus logits and log-probabilities (2V) in float32
With activation checkpointing a block keeps only its input (C), and the backward pass recomputes one block
at a time, so one block's full set is added back once.

Read it as a floor. Not counted: dropout masks, the framework itself (~0.3-0.5 GB of libraries), kernels'
workspaces, and the transient buffers of each op, whose pages the allocator keeps. Those matter most where
activations dominate: a 6-layer 768-wide GPT at 2,048 tokens a micro-batch measured (peak RSS growth, float32)
2.0 GB for an estimated 1.8 GB in full training, and 2.0-2.6 GB for an estimated 1.0-1.2 GB under LoRA.
At 1B parameters the weights and optimizer state, which the estimate counts exactly, dominate.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from scratchgpt.config import GPTConfig
from scratchgpt.training.optim import KahanAdamW, MuonAdamW

GB = 1e9


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

    @property
    def activations(self) -> int:
        return self.activations_per_token * self.tokens

    @property
    def total(self) -> int:
        return self.trainable + self.frozen + self.gradients + self.optimizer + self.activations

    def line(self) -> str:
        frozen = ", ".join(f"{dtype} {n / GB:.2f}" for dtype, n in self.frozen_by_dtype)
        return (f"memory estimate per process: weights {self.trainable / GB:.2f} GB trainable + "
                f"{self.frozen / GB:.2f} GB frozen{f' ({frozen})' if frozen else ''}, gradients "
                f"{self.gradients / GB:.2f} GB, optimizer state {self.optimizer / GB:.2f} GB, activations "
                f"{self.activations / GB:.2f} GB ({self.activations_per_token / 1024:.1f} KiB/token × {self.tokens} "
                f"tokens, activation checkpointing {'on' if self.checkpointing else 'off'}): "
                f"~{self.total / GB:.2f} GB in all")


def activation_bytes_per_token(config: GPTConfig, *, dtype_bytes: int, checkpointing: bool = False) -> int:
    """Bytes autograd keeps per token of a micro-batch for `config`'s GPT (the count in the module docstring)."""
    C, H = config.n_embd, config.mlp_hidden
    q, kv = config.n_head * config.head_size, config.kv_heads * config.head_size
    block = 4 * C + 3 * q + 2 * kv + (3 if config.activation == "swiglu" else 2) * H
    blocks = config.n_layer * C + block if checkpointing else config.n_layer * block
    return dtype_bytes * (C + blocks + 2 * C) + 4 * 2 * config.vocab_size


def _optimizer_bytes(optimizer: torch.optim.Optimizer) -> int:
    """The state `optimizer` will hold once it has stepped: per parameter, its slots × its bytes."""
    muon = {id(p) for g in optimizer.muon.param_groups for p in g["params"]} \
        if isinstance(optimizer, MuonAdamW) and optimizer.muon is not None else set()
    adam_slots = 3 if isinstance(optimizer, KahanAdamW) else 2
    return sum(p.numel() * p.element_size() * (1 if id(p) in muon else adam_slots)
               for g in optimizer.param_groups for p in g["params"])


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
    per_token = activation_bytes_per_token(config, dtype_bytes=dtype_bytes, checkpointing=checkpointing) \
        if isinstance(config, GPTConfig) else 0
    return MemoryEstimate(
        trainable=trainable, frozen=sum(frozen.values()), gradients=trainable, optimizer=_optimizer_bytes(optimizer),
        activations_per_token=per_token, tokens=tokens, checkpointing=checkpointing,
        frozen_by_dtype=tuple(sorted(frozen.items(), key=lambda kv: -kv[1])),
    )
