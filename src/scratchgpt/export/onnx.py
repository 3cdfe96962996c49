"""Export a GPT to ONNX (onnxruntime and friends) with a dynamic sequence length and a KV cache.

The exported graph takes
    input_ids     (B, T)                 int64, the new tokens
    past_keys     (n_layer, B, nh, P, hs) float32, keys of the P tokens before them (P may be 0)
    past_values   (n_layer, B, nh, P, hs)
and returns
    logits        (B, T, V)
    present_keys  (n_layer, B, nh, P+T, hs)   feed these back as past_* for the next step
    present_values
B, T and P are dynamic. The wrapper runs the model's own blocks; only the cache is re-plumbed from
scratchgpt's pre-allocated `KVCache` (a Python position counter) to tensors whose length P is part
of the graph. Attention gets an explicit causal mask built from P, so no Python branch inside the
model depends on a symbolic size.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor, nn

from scratchgpt.model.gpt import GPT
from scratchgpt.model.quantize import quantized_mode

INPUT_NAMES = ["input_ids", "past_keys", "past_values"]
OUTPUT_NAMES = ["logits", "present_keys", "present_values"]


class CachedGPT(nn.Module):
    """GPT with its KV cache as explicit input and output tensors (what an exported graph needs)."""

    def __init__(self, model: GPT):
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, past_keys: Tensor, past_values: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        gpt = self.model
        B, T = input_ids.shape
        P = past_keys.size(3)
        S = P + T
        pos = torch.arange(S, device=input_ids.device)
        positions = pos[P:]  # (T,)
        allowed = (pos[None, :] <= positions[:, None])[None, None]  # (1, 1, T, S): causal over past + new
        x = gpt.transformer.wte(input_ids) + gpt.transformer.wpe(positions)  # (B, T, C)
        keys, values = [], []
        for i, block in enumerate(gpt.transformer.h):
            # Room for the new positions after the past; the attention layer writes into it at P.
            pad = past_keys.new_zeros(B, past_keys.size(2), T, past_keys.size(4))
            k_buf = torch.cat([past_keys[i], pad], dim=2)  # (B, nh, S, hs)
            v_buf = torch.cat([past_values[i], pad], dim=2)
            x = block(x, kv=(k_buf, v_buf), start=P, mask=allowed)
            keys.append(k_buf)
            values.append(v_buf)
        logits = gpt.head(x)  # (B, T, V): final norm, LM head
        return logits, torch.stack(keys), torch.stack(values)


def empty_past(model: GPT, batch_size: int = 1, *, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """past_keys/past_values holding no positions yet: (n_layer, B, nh, 0, hs)."""
    c = model.config
    shape = (c.n_layer, batch_size, c.n_head, 0, c.head_size)
    return torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)


@contextmanager
def _without_exporter_notices() -> Iterator[None]:
    """Silence the three notices torch's exporter prints about itself on every export, and nothing else
    (each is matched by its category or logger and its text)."""
    with warnings.catch_warnings():
        # torch.export copies pytree specs, and copying a LeafSpec trips torch's own deprecation of that class.
        warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                                category=FutureWarning)
        # `batch` and `past` are one Dim shared by several inputs on purpose (that is what makes them equal
        # in the graph); the exporter names each axis once and says so for every repeat.
        warnings.filterwarnings("ignore", message=r"# The axis name: \w+ will not be used, since it shares",
                                category=UserWarning)
        # Building its op registry, the exporter logs a line for each torchvision op it skips.
        registry = logging.getLogger("torch.onnx._internal.exporter._registration")

        def not_torchvision(record: logging.LogRecord) -> bool:
            return not record.getMessage().startswith("torchvision is not installed")

        registry.addFilter(not_torchvision)
        try:
            yield
        finally:
            registry.removeFilter(not_torchvision)


def export_onnx(model: GPT, path: str | Path) -> Path:
    """Write `model` as an ONNX graph (see module docstring for inputs and outputs); returns the path."""
    from scratchgpt.files import atomic_write

    if any(not p.is_floating_point() for p in model.parameters()) or quantized_mode(model):
        raise ValueError("ONNX export takes a float model; export the checkpoint without --quantize")
    if any(p.dtype != torch.float32 for p in model.parameters()):
        raise ValueError("ONNX export takes a float32 model; export the checkpoint without --dtype")
    model.eval()
    wrapper = CachedGPT(model).eval()
    c = model.config
    # Trace with B, T and P >= 2 so the exporter keeps them symbolic (0 and 1 would be specialised).
    ids = torch.zeros(2, 3, dtype=torch.long)
    past = torch.zeros(c.n_layer, 2, c.n_head, 2, c.head_size)
    batch, seq, past_len = torch.export.Dim("batch"), torch.export.Dim("seq"), torch.export.Dim("past")
    dynamic = {"input_ids": {0: batch, 1: seq}, "past_keys": {1: batch, 3: past_len},
               "past_values": {1: batch, 3: past_len}}
    path = Path(path)
    with torch.no_grad(), _without_exporter_notices():
        program = torch.onnx.export(wrapper, (ids, past, past.clone()), dynamo=True, dynamic_shapes=dynamic,
                                    input_names=INPUT_NAMES, output_names=OUTPUT_NAMES, verbose=False,
                                    external_data=False)
    atomic_write(path, lambda p: program.save(str(p)))
    return path
