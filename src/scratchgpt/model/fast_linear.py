"""`Linear`: `nn.Linear` plus a faster CPU path for the one or few rows of a decode step.

A speed trick for inference, kept out of `model/gpt.py` so the model reads as plain PyTorch: the GPT builds
its projections from this class, which is `nn.Linear` exactly (same parameters, same state-dict names, same
`F.linear` call) until `scratchgpt.inference.generate.choose_decode_path` times decode steps on this machine
and switches the few-row path on where it is faster. Training and batched inference never take it.
"""

from __future__ import annotations

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
