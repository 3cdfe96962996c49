"""`Linear`: `nn.Linear` plus faster CPU paths for the one or few rows of a decode step.

Speed tricks for inference, kept out of `model/gpt.py` so the model reads as plain PyTorch: the GPT builds
its projections from this class, which is `nn.Linear` exactly (same parameters, same state-dict names, same
`F.linear` call) until `scratchgpt.inference.generate.choose_decode_path` times decode steps on this machine
and switches the paths below on where they are faster. Training and batched inference never take the first
or the third (they apply to a few rows only); the second changes only where the weights' bytes lie, so any
forward runs on it.

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
3. Split-K products (`Linear.split_k`, on input-major weights): the reduction over the input splits into
   `split_k` slices, one `torch.bmm` multiplies each slice of x by its slab of Wᵀ on its own thread, and the
   partial outputs are summed. PyTorch's matrix-vector product (MKL) runs on one core however many threads
   are set, and one core cannot pull the weights from DRAM as fast as two: on the 2-core AMD EPYC (Zen 3)
   here a 2048 x 8192 weight streamed from DRAM at 16 GB/s either way round and at 24-28 GB/s split in two
   (the 2048 x 128,256 head: 19-23 against 32-42), and GPT-2 124M decoded at 46-48 tok/s against 24-28
   (Llama-3.2-1B shape: 6.2 against 3.5). The slabs are views of the stored Wᵀ (no copy); results equal
   F.linear up to float rounding (the sum's order differs).
4. scratchgpt's own kernel (`Linear.native`, model/csrc/float_linear.cpp): float32 or bfloat16
   weights in nn.Linear's layout, streamed by a hand-written loop: one band of rows per thread, read as
   four sequential streams. On the Intel Xeon (AMX) here GPT-2 124M's 49 products of one decode step
   streamed at 26-27 GB/s that way against 22 GB/s with the best of the paths above (a plain read of 1 GB
   on two threads: 30-32 GB/s as four streams a thread, 24 as one). bfloat16 weights are widened in
   registers: half the bytes, a float32 product.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scratchgpt.model.native import MAX_ROWS, native_kernels


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
    split_k: int = 0  # > 1: up to SPLIT_ROWS rows on an input-major weight run as that many partial products
    native: bool = False  # up to native.MAX_ROWS rows run on scratchgpt's kernel (float32/bf16, (out, in) layout)

    def forward(self, x: Tensor) -> Tensor:
        if not (self.native or self.split_k or self.few_rows):  # no decode path set (training): nn.Linear's call
            return F.linear(x, self.weight, self.bias)
        rows = x.numel() // x.size(-1)
        if rows == 0 or x.device.type != "cpu":
            return F.linear(x, self.weight, self.bias)
        if self.native and rows <= MAX_ROWS and self.weight.is_contiguous() and self.weight.dtype in _NATIVE_DTYPES \
                and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)):
            kernels = native_kernels()  # (no backward in the kernel: anything that needs gradients takes F.linear)
            if kernels is not None:
                return kernels.float_linear(x, self.weight, self.bias)
        if self.split_k > 1 and rows <= SPLIT_ROWS and is_input_major(self):
            return self._split_k_product(x, rows)
        if rows > self.few_rows:
            return F.linear(x, self.weight, self.bias)
        flat = x.reshape(rows, x.size(-1))
        if rows == 1:
            flat = torch.cat([flat, flat])  # two real rows: BLAS takes its matrix-matrix path
        y = (self.weight @ flat.t()).t()[:rows]  # (rows, out)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], y.size(-1))

    def _split_k_product(self, x: Tensor, rows: int) -> Tensor:
        """x @ Wᵀ as `split_k` partial products over slices of the input dimension, one per thread."""
        s, k = self.split_k, self.in_features
        slices = x.reshape(rows, s, k // s).transpose(0, 1)  # (s, rows, k/s)
        slabs = self.weight.t().view(s, k // s, self.out_features)  # (s, k/s, out): views of the stored Wᵀ
        y = torch.bmm(slices, slabs).sum(0)  # (s, rows, out) -> (rows, out); bmm runs the s products in parallel
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


_NATIVE_DTYPES = (torch.float32, torch.bfloat16)  # the weights model/csrc/float_linear.cpp reads

# Split-K pays for up to this many rows (a decode step, a server batch, a short prompt's prefill): on a
# 2048 x 8192 input-major weight, 2 threads, AMD EPYC (Zen 3), MKL's own product took 1.24x the split one's
# time at 1 row, 1.1-1.5x at 4-16 rows, 1.14x at 32 and 1.06x at 64 (compute-bound there either way).
SPLIT_ROWS = 32


def split_parts(in_features: int, threads: int) -> int:
    """How many slices `Linear.split_k` cuts an input of `in_features` into on `threads` threads: the most,
    up to one per thread, that divide it evenly and leave slices of at least 16 values; 0 (no split) when
    there is one thread or no such count."""
    for s in range(min(threads, in_features // 16), 1, -1):
        if in_features % s == 0:
            return s
    return 0


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
