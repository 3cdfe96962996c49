"""`Linear`: `nn.Linear` plus faster CPU paths for the one or few rows of a decode step.

Speed tricks for inference, kept out of `model/gpt.py` so the model reads as plain PyTorch: the GPT builds
its projections from this class, which is `nn.Linear` exactly (same parameters, same state-dict names, same
`F.linear` call) until `scratchgpt.inference.generate.choose_decode_path` times decode steps on this machine
and switches one of two paths on where it is faster. Training and batched inference never take the first;
the second changes only where the weights' bytes lie, so any forward runs on it.

1. The few-row path (`Linear.few_rows`): (W @ xᵀ)ᵀ instead of x @ Wᵀ, see the class.
2. Input-major storage (`store_input_major`): the weight's memory holds Wᵀ, (in, out), and the parameter
   is its transposed view, so `F.linear(x, W)` runs x @ Wᵀ on a contiguous Wᵀ. BLAS then streams the
   weight row by row, accumulating into the small output: on the 2-core AMD EPYC (Zen 3) machines here
   one core read a 3072 x 768 matrix from DRAM at 16-22 GB/s that way against 12-16 GB/s for the (out, in)
   layout; a whole GPT-2 124M decode step on one thread was 10% faster (31.8 vs 28.8 tok/s). With two
   threads on a quiet machine every path came out within noise (25-31 tok/s); on a busy one input-major
   was the fastest (its product uses one core, so a stalled second core cannot hold it up). Hence the
   measurement per machine rather than a default. The same values and parameter objects
   (a tied embedding shares the layout, and its lookups read strided rows), no extra memory; a
   checkpoint saved afterwards is byte-identical (the writers make tensors contiguous). Only frozen
   models switch (no parameter requires a gradient): an optimizer's moment buffers keep the old layout.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Linear(nn.Linear):
    """`nn.Linear` (same parameters and names) with an optional path for a few rows on the CPU.

    Decoding feeds one token at a time, so every layer multiplies a big weight by a single row and
    speed is set by how fast the weights stream from memory. Which BLAS call streams faster depends on
    the CPU: on the 2-core AMD EPYC machines here PyTorch's matrix-vector path (x @ Wᵀ) streamed weights
    at ~16 GB/s while W @ xᵀ with two columns streamed at ~32 GB/s (decode 1.8× faster); on an Intel
    Xeon with AMX the matrix-vector path was the fast one and W @ xᵀ halved decode speed (17 vs 35 tok/s
    for GPT-2 124M). So the path is per layer: up to `few_rows` rows (0, the default, means never) the
    layer computes (W @ xᵀ)ᵀ, padding a single row to two. `inference.generate.choose_decode_path`
    times whole decode steps both ways (weights streaming from DRAM, as in real decoding) and sets it
    for the block layers and the LM head separately. Results equal F.linear up to float rounding.
    """

    few_rows: int = 0

    def forward(self, x: Tensor) -> Tensor:
        rows = x.numel() // x.size(-1)
        if rows > self.few_rows or rows == 0 or x.device.type != "cpu":
            return F.linear(x, self.weight, self.bias)
        flat = x.reshape(rows, x.size(-1))
        if rows == 1:
            flat = torch.cat([flat, flat])  # two real rows: BLAS takes its matrix-matrix path
        y = (self.weight @ flat.t()).t()[:rows]  # (rows, out)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], y.size(-1))


@torch.no_grad()
def store_input_major(layers: Iterable[nn.Linear], on: bool = True) -> None:
    """Store each layer's weight input-major (memory holds Wᵀ, `weight` is its transposed view) or, with
    `on` False, back in nn.Linear's (out, in) order. Values never change; one matrix is copied at a time.
    A weight shared by two layers (a tied head) is switched once."""
    seen: set[int] = set()
    for layer in layers:
        w = layer.weight
        if id(w) in seen:
            continue
        seen.add(id(w))
        if on and w.is_contiguous():
            w.data = w.data.t().contiguous().t()
        elif not on and not w.is_contiguous():
            w.data = w.data.contiguous()


def is_input_major(layer: nn.Linear) -> bool:
    """Whether the layer's weight is stored input-major (see `store_input_major`)."""
    w = layer.weight
    return w.dim() == 2 and w.size(0) > 1 and w.size(1) > 1 and w.stride() == (1, w.size(0))
