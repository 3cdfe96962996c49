"""The GPT model as pure `torch.nn` modules: no I/O, no optimizer, no downloads.

Read top to bottom, as nanoGPT's model.py: norms, the MLP, position encodings, attention, the block, the
KV cache and the GPT. Shape legend used in comments: B batch, T time (query positions), S key positions
(cache + new), C channels (n_embd), V vocab, nh heads, nkv key/value heads, hs head size (C // nh unless
head_dim), H the MLP's hidden width.

By default this is GPT-2 exactly. `GPTConfig` options swap single parts for the ones the Llama and
Qwen families use (README: the family table): `RMSNorm` for `LayerNorm`, `RotaryEmbedding` for the
learned position table, `SwiGLU` / `ReLUSquared` for GELU, fewer key/value heads than query heads
(grouped-query attention), per-head QK-norm, logit soft-capping, zero-initialised output projections.

Parameter names follow Hugging Face's `GPT2LMHeadModel` (`transformer.h.0.attn.c_attn.weight`, ...),
so importing GPT-2 weights is an identity map plus four transposes (HF stores Conv1D weights as
(in, out); `nn.Linear` stores (out, in)). The other families keep these names too: their separate
q/k/v (and gate/up) projections are stacked into the fused `c_attn` (and `c_fc`) by `scratchgpt.hf`.
The projections are `fast_linear.Linear`: `nn.Linear` with an optional faster CPU path for decoding.

Reading alongside "Build a Large Language Model (From Scratch)": the book's classes, written the book's
way, are in `scratchgpt.model.textbook` (with weight converters both ways; tests require both to compute
the same logits), and its helper functions under the book's names (`generate_text_simple`, `generate`,
`create_dataloader_v1`, `calc_loss_loader`, `load_weights_into_gpt`, ...) in `scratchgpt.book`. Its names
map to ours as follows:

    the book                                 here
    GPT_CONFIG_124M (a dict)                 GPTConfig: emb_dim -> n_embd, context_length -> n_positions,
                                             n_heads -> n_head, n_layers -> n_layer, drop_rate -> embd_pdrop,
                                             attn_pdrop and resid_pdrop, qkv_bias -> attn_bias (c_attn's bias)
    GPTModel                                 GPT
      tok_emb, pos_emb, drop_emb               transformer.wte, transformer.wpe, transformer.drop
      trf_blocks                               transformer.h
      final_norm, out_head                     transformer.ln_f, lm_head
    TransformerBlock                         Block
      att, ff, norm1, norm2                    attn, mlp, ln_1, ln_2
      drop_shortcut                            attn.resid_dropout, mlp.dropout (inside each sub-layer)
    MultiHeadAttention                       CausalSelfAttention
      W_query, W_key, W_value                  c_attn: one fused Linear, output rows [q; k; v]
      out_proj                                 c_proj
      mask (a buffer)                          causal_mask(), or is_causal in scaled_dot_product_attention
      num_heads, head_dim                      n_head, head_size
    MultiHeadAttentionWrapper of             CausalSelfAttention (all heads in one matrix product)
      CausalAttention (one module per head)
    FeedForward                              MLP
      layers[0], GELU, layers[2]               c_fc, act, c_proj
    LayerNorm (scale, shift)                 LayerNorm (weight, bias)
    GELU                                     GELU
    generate_text_simple                     inference.generate.generate with SamplingConfig(temperature=0)
    generate (temperature, top_k)            inference.generate.generate with SamplingConfig(temperature, top_k)

The book's `generate` draws with `torch.multinomial`; ours samples from the same distribution with a faster
sampler (`inference.sampling`), so one seed gives other text. `scratchgpt.book.generate` draws as the book.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from scratchgpt.config import GPTConfig
from scratchgpt.model.fast_linear import Linear
from scratchgpt.model.fused_loss import linear_cross_entropy
from scratchgpt.model.fused_ops import relu_squared, rms_norm

AttnImpl = Literal["sdpa", "eager"]
Rope = tuple[Tensor, Tensor]  # RoPE's (cos, sin) for the positions at hand (see RotaryEmbedding)
# In a training forward, float32 logits of more than this many bytes per micro-batch are computed and scored
# a chunk of tokens at a time, and never kept whole (`loss_chunk_rows`): at Llama-3.2-1B's 128,256-token
# vocabulary one 512-token sequence's logits are 263 MB, and the plain loss keeps three such tensors alive
# in its backward.
LOSS_CHUNK_BYTES = 64 << 20


def loss_chunk_rows(vocab_size: int, tokens: int) -> int | None:
    """Tokens per chunk of the loss for a micro-batch of `tokens` tokens: those whose float32 logits fill
    LOSS_CHUNK_BYTES, or None when the whole micro-batch's logits fit in that (then no chunking)."""
    rows = max(1, LOSS_CHUNK_BYTES // (4 * vocab_size))
    return rows if tokens > rows else None


# ---------------------------------------------------------------------------------------------
# Normalisation
# ---------------------------------------------------------------------------------------------


class LayerNorm(nn.Module):
    """Normalise each position over its channels, then scale and shift (bias optional)."""

    def __init__(self, n_embd: int, *, eps: float = 1e-5, bias: bool = True, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(n_embd, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(n_embd, device=device, dtype=dtype)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


class RMSNorm(nn.Module):
    """Scale each position by 1/RMS of its channels, then by a learned gain: (..., C) -> (..., C).

    Why: LayerNorm without the mean subtraction and bias; as good in practice and cheaper (Llama, Qwen).
    Computed in float32 whatever the input dtype, as the reference implementations do.
    """

    def __init__(self, dim: int, *, eps: float = 1e-6, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == self.weight.dtype == torch.float32:
            if x.device.type == "cpu" and not torch.compiler.is_compiling():
                # torch's fused forward and a short written-out backward (model/fused_ops.py): on the CPU
                # F.rms_norm is a chain of small ops, forward and back. (torch.compile fuses those ops itself,
                # and torch.export / ONNX export trace the plain ones.)
                return rms_norm(x, self.weight, self.eps)
            # The same numbers in one call (decoding calls this ~4 times per layer per token).
            return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)
        return F.rms_norm(x.float(), (x.size(-1),), eps=self.eps).to(x.dtype) * self.weight


def make_norm(config: GPTConfig, dim: int, *, device=None, dtype=None) -> nn.Module:
    """The configured normalisation over `dim` channels: GPT-2's LayerNorm or Llama's RMSNorm."""
    if config.norm == "rmsnorm":
        return RMSNorm(dim, eps=config.layer_norm_epsilon, device=device, dtype=dtype)
    return LayerNorm(dim, eps=config.layer_norm_epsilon, bias=config.bias, device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# The MLP (the book's FeedForward) and its non-linearities
# ---------------------------------------------------------------------------------------------


class GELU(nn.Module):
    """GPT-2's GELU: the tanh approximation 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))."""

    def forward(self, x: Tensor) -> Tensor:
        # F.gelu's tanh mode computes exactly the formula above in one fused kernel.
        return F.gelu(x, approximate="tanh")


class ReLUSquared(nn.Module):
    """relu(x)²: (..., H) -> (..., H). Why: sparse like ReLU but smooth at 0; trains faster in small
    models (Primer; the nanoGPT speedruns and nanochat use it)."""

    def forward(self, x: Tensor) -> Tensor:
        if torch.compiler.is_compiling():  # (compiled or exported: the plain ops, which the compiler fuses)
            return F.relu(x).square()
        return relu_squared(x)  # F.relu(x).square(), with a two-pass backward (model/fused_ops.py)


class SwiGLU(nn.Module):
    """Gated linear unit with a SiLU gate: (..., 2H) -> (..., H), silu(gate) · up.

    Why: the gate lets each hidden unit scale its own signal by the input; better loss per
    parameter than GELU (Shazeer 2020), so Llama and Qwen use it. The MLP's c_fc produces the gate
    (first half of its outputs) and the "up" value (second half) in one matrix product.
    """

    def forward(self, x: Tensor) -> Tensor:
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up


def make_activation(name: str) -> nn.Module:
    """The MLP's non-linearity by config name. `gelu_exact` is x·Φ(x) with the erf (nanoGPT's nn.GELU): it
    differs from GPT-2's tanh form by < 1e-3 and its CPU kernels ran ~1.7x faster (forward + backward)."""
    return {"gelu": GELU, "gelu_exact": nn.GELU, "relu": nn.ReLU, "relu2": ReLUSquared, "swiglu": SwiGLU}[name]()


class MLP(nn.Module):
    """Position-wise feed-forward network: expand to H (4·C by default), non-linearity, project back.

    With SwiGLU, c_fc produces 2·H values (gate and up) and the activation halves them back to H.
    """

    def __init__(self, config: GPTConfig, *, device=None, dtype=None):
        super().__init__()
        kw = dict(bias=config.bias, device=device, dtype=dtype)
        hidden = config.mlp_hidden
        self.c_fc = Linear(config.n_embd, (2 if config.activation == "swiglu" else 1) * hidden, **kw)
        self.act = make_activation(config.activation)
        self.c_proj = Linear(hidden, config.n_embd, **kw)
        self.dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, x: Tensor) -> Tensor:
        h = self.act(self.c_fc(x))  # (B, T, H): c_fc widens (to 2·H for SwiGLU, whose gate halves it back)
        y = self.c_proj(h)  # (B, T, C)
        return self.dropout(y) if self.training else y


# ---------------------------------------------------------------------------------------------
# Position encodings: a fixed sinusoidal table (added to the embeddings) or RoPE (applied in attention)
# ---------------------------------------------------------------------------------------------


class SinusoidalPositions(nn.Module):
    """Fixed sin/cos position table (no parameters): even channels sin, odd channels cos."""

    def __init__(self, n_positions: int, n_embd: int, *, device=None, dtype=None):
        super().__init__()
        self.register_buffer(
            "table", sinusoidal_table(n_positions, n_embd, device=device, dtype=dtype), persistent=False
        )

    def forward(self, position_ids: Tensor) -> Tensor:
        return self.table[position_ids]  # (T, C), or (B, T, C) for per-row positions


def sinusoidal_table(n_positions: int, n_embd: int, *, device=None, dtype=None) -> Tensor:
    """(n_positions, n_embd) table: PE[p, 2i] = sin(p / 10000^(2i/C)), PE[p, 2i+1] = cos(same)."""
    pos = torch.arange(n_positions, dtype=torch.float64, device=device)[:, None]
    inv_freq = torch.exp(
        torch.arange(0, n_embd, 2, dtype=torch.float64, device=device) * (-math.log(10000.0) / n_embd)
    )
    table = torch.zeros(n_positions, n_embd, dtype=torch.float64, device=device)
    table[:, 0::2] = torch.sin(pos * inv_freq)
    table[:, 1::2] = torch.cos(pos * inv_freq)
    return table.to(dtype or torch.get_default_dtype())


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoPE): position ids (T,) or (B, T) -> (cos, sin), each (B|1, 1, T, hs).

    Why: rotating each query/key channel pair by an angle proportional to the position makes the
    score q·k depend only on the distance between the two tokens, with no parameters and no table
    bounded by a trained length. Channels are paired as (i, i + hs/2) ("rotate half"), as in the
    Llama and Qwen checkpoints. With `rope_scaling_factor`, low frequencies are slowed by the
    Llama 3 rule so a model trained at `rope_original_n_positions` reads longer contexts.
    """

    def __init__(self, config: GPTConfig, *, device=None):
        super().__init__()
        self.config = config
        self.register_buffer("inv_freq", rope_inv_freq(config, device=device), persistent=False)

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001, ANN202 (nn.Module's signature)
        # `model.to(bfloat16)` / `.half()` cast every floating buffer; the frequencies stay float32 (see
        # forward), recomputed exactly on their new device. Once here rather than in every forward: a bf16
        # model's decoding recomputed them each token (~30 µs hot, more after the weights swept the caches).
        super()._apply(fn, recurse)
        if self.inv_freq.dtype != torch.float32:
            self.inv_freq = rope_inv_freq(self.config, device=self.inv_freq.device)
        return self

    def forward(self, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        """(cos, signed sin), each (B|1, 1, T, hs): the sin's first half is negated (see apply_rotary)."""
        # float32 angles whatever the model dtype: bf16 cannot resolve position 1000 vs 1001 (`_apply`
        # keeps the buffer float32 through dtype casts; one assigned by hand in another dtype is recomputed).
        inv_freq = self.inv_freq
        if inv_freq.dtype != torch.float32:
            inv_freq = rope_inv_freq(self.config, device=position_ids.device)
        angles = position_ids.float()[..., None] * inv_freq  # (B|1, T, hs/2)
        cos, sin = angles.cos(), angles.sin()
        # The same angle for both channels of a pair; the sign is computed once here rather than
        # per layer in apply_rotary.
        cos, sin = torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1)  # (B|1, T, hs)
        if cos.dim() == 3:
            cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, hs): broadcast over heads
        return cos, sin


def rope_inv_freq(config: GPTConfig, *, device=None) -> Tensor:
    """(hs/2,) float32 rotation speeds theta^(-2i/hs), with the Llama 3 frequency scaling if configured."""
    hs = config.head_size
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, hs, 2, device=device).float() / hs))
    factor = config.rope_scaling_factor
    if factor is None:
        return inv_freq
    # Llama 3: wavelengths longer than original/low_freq_factor are slowed by `factor`, shorter ones
    # than original/high_freq_factor are kept, and the band between blends the two smoothly.
    old_len = config.rope_original_n_positions
    low, high = config.rope_low_freq_factor, config.rope_high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, blended, scaled)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate channel pairs (i, i + hs/2) of x (B, nh, T, hs) by the angles of `RotaryEmbedding`.

    The pair (a, b) becomes (a·cos − b·sin, b·cos + a·sin). Rolling the channels by hs/2 puts each
    channel's partner in its place ((a, b) -> (b, a)), and `sin` arrives with its first half negated,
    so the quarter turn (a, b) -> (−b, a) is one roll (one op where chunk, negate and cat were three;
    decoding pays this twice per layer per token).
    """
    return (x * cos + x.roll(x.size(-1) // 2, dims=-1) * sin).to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------


def repeat_kv(x: Tensor, n_rep: int) -> Tensor:
    """(B, nkv, S, hs) -> (B, nkv·n_rep, S, hs): each key/value head serves n_rep consecutive query heads."""
    if n_rep == 1:
        return x
    B, nkv, S, hs = x.shape
    return x[:, :, None].expand(B, nkv, n_rep, S, hs).reshape(B, nkv * n_rep, S, hs)


def causal_mask(T: int, S: int, start: int, *, device=None) -> Tensor:
    """Bool (T, S), True where query start+i may look at key j (j <= start+i): the shifted lower triangle."""
    return torch.ones(T, S, dtype=torch.bool, device=device).tril(diagonal=start)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with one fused q/k/v projection.

    With n_kv_head < n_head (grouped-query attention) fewer key/value heads are projected and
    cached, each shared by a group of query heads: the cache shrinks by n_head / n_kv_head.
    Two implementations compute the same thing: `sdpa` (PyTorch's fused kernel, flash attention on
    CUDA) and `eager` (masked softmax(QKᵀ/√hs) written out, which can also return the weights).
    """

    def __init__(self, config: GPTConfig, *, attn_impl: AttnImpl = "sdpa", device=None, dtype=None):
        super().__init__()
        self.n_head = config.n_head
        self.n_kv_head = config.kv_heads
        self.head_size = config.head_size
        self.attn_impl: AttnImpl = attn_impl
        q_dim, kv_dim = self.n_head * self.head_size, self.n_kv_head * self.head_size
        self.c_attn = Linear(config.n_embd, q_dim + 2 * kv_dim, bias=config.attn_bias, device=device, dtype=dtype)
        self.c_proj = Linear(q_dim, config.n_embd, bias=config.bias, device=device, dtype=dtype)
        if config.qk_norm:
            # Why: normalising each head's queries and keys bounds the attention logits, which keeps
            # training stable at high learning rates (Qwen3, nanochat).
            self.q_norm = RMSNorm(self.head_size, eps=config.layer_norm_epsilon, device=device, dtype=dtype)
            self.k_norm = RMSNorm(self.head_size, eps=config.layer_norm_epsilon, device=device, dtype=dtype)
        else:
            self.q_norm = self.k_norm = None
        self.attn_pdrop = config.attn_pdrop
        self.attn_dropout = nn.Dropout(config.attn_pdrop)
        self.resid_dropout = nn.Dropout(config.resid_pdrop)

    def forward(
        self,
        x: Tensor,
        *,
        kv: tuple[Tensor, Tensor] | None = None,
        start: int = 0,
        mask: Tensor | None = None,
        rope: tuple[Tensor, Tensor] | None = None,
        return_weights: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Attend over the keys so far; `kv` are (B, nkv, T_max, hs) cache buffers filled from `start`.

        `mask` is None for plain causal attention, else a bool (B|1, 1, T, S) tensor, True = attend.
        `rope` is the (cos, sin) pair of `RotaryEmbedding` for these positions when RoPE is on.
        Without the options (no cache, no RoPE, no QK-norm) this is GPT-2's attention: project, attend, project.
        """
        B, T, _ = x.shape
        q, k, v = self._project_qkv(x)  # (B, nh, T, hs), (B, nkv, T, hs), (B, nkv, T, hs); QK-normed if on
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if kv is not None:
            k, v = self._append_to_cache(kv, k, v, start=start)  # (B, nkv, S, hs): cached keys, then these
        if self.attn_impl == "eager" or return_weights:
            y, weights = self._attend_eager(q, k, v, mask=mask, start=start)
        else:
            y, weights = self._attend_sdpa(q, k, v, mask=mask, start=start), None
        y = y.transpose(1, 2).contiguous().view(B, T, self.n_head * self.head_size)  # re-assemble heads
        y = self.c_proj(y)  # (B, T, C)
        if self.training:  # (dropout is the identity in eval; skipping the call matters when decoding)
            y = self.resid_dropout(y)
        return (y, weights) if return_weights else y

    def _project_qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One matrix product for queries, keys and values, split into heads: (B, T, C) -> (B, heads, T, hs),
        queries and keys normalised per head when QK-norm is on."""
        B, T, _ = x.shape
        nh, nkv, hs = self.n_head, self.n_kv_head, self.head_size
        q, k, v = self.c_attn(x).split([nh * hs, nkv * hs, nkv * hs], dim=2)
        q, k = q.view(B, T, nh, hs), k.view(B, T, nkv, hs)  # (B, T, heads, hs)
        if self.q_norm is not None:
            # Per head over hs: the same numbers in either layout, but here each head's channels are
            # contiguous, so the norm's passes (forward and back) read memory in order (~20% faster measured).
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.transpose(1, 2)  # (B, nh, T, hs)
        k = k.transpose(1, 2)  # (B, nkv, T, hs)
        v = v.view(B, T, nkv, hs).transpose(1, 2)
        return q, k, v

    @staticmethod
    def _append_to_cache(kv: tuple[Tensor, Tensor], k: Tensor, v: Tensor, *, start: int) -> tuple[Tensor, Tensor]:
        """Write this step's keys/values (B, nkv, T, hs) into the cache at `start`; all keys so far (B, nkv, S, hs)."""
        # (narrow, not k_buf[:, :, a:b]: the same views without Python's indexing machinery, which
        # costs more than the copy itself when decoding one token.)
        k_buf, v_buf = kv
        T = k.size(2)
        k_buf.narrow(2, start, T).copy_(k)
        v_buf.narrow(2, start, T).copy_(v)
        return k_buf.narrow(2, 0, start + T), v_buf.narrow(2, 0, start + T)

    def _attend_sdpa(self, q: Tensor, k: Tensor, v: Tensor, *, mask: Tensor | None, start: int) -> Tensor:
        """PyTorch's fused kernel (flash attention on CUDA): q (B, nh, T, hs), k/v (B, nkv, S, hs) -> (B, nh, T, hs)."""
        T, S = q.size(2), k.size(2)
        dropout_p = self.attn_pdrop if self.training else 0.0
        # enable_gqa lets the kernel read each key/value head for its whole group of query heads
        # instead of copying them n_head/n_kv_head times (measured ~20x faster decoding on CPU).
        gqa = dict(enable_gqa=True) if self.n_kv_head != self.n_head else {}
        if mask is None and 1 < T < S:
            # Several new queries after a cached prefix: is_causal would align the triangle
            # top-left, so pass the causal mask's rows for these positions instead.
            mask = causal_mask(T, S, start, device=q.device)
        if mask is not None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, **gqa)
        # Here either nothing is cached (start == 0, so T == S and is_causal's top-left
        # triangle is right) or one new query follows the cache (it may see every key: no
        # mask). Deciding from the cache position, a Python int, rather than comparing T
        # with S keeps this a plain bool when T is a symbolic size (torch.onnx.export).
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=start == 0, **gqa)

    def _attend_eager(
        self, q: Tensor, k: Tensor, v: Tensor, *, mask: Tensor | None, start: int
    ) -> tuple[Tensor, Tensor]:
        """softmax(QKᵀ/√hs) written out: outputs (B, nh, T, hs) and the attention weights (B, nh, T, S)."""
        n_rep = self.n_head // self.n_kv_head
        k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)  # (B, nh, S, hs): each key/value head serves its group
        T, S = q.size(2), k.size(2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.size(-1)))  # (B, nh, T, S)
        allowed = causal_mask(T, S, start, device=q.device) if mask is None else mask
        att = att.masked_fill(~allowed, float("-inf"))
        att = F.softmax(att, dim=-1)
        att = self.attn_dropout(att)
        return att @ v, att  # (B, nh, T, hs), (B, nh, T, S)


# ---------------------------------------------------------------------------------------------
# The transformer block, the KV cache and the GPT
# ---------------------------------------------------------------------------------------------


class Block(nn.Module):
    """Pre-norm transformer block: two sub-layers, each wrapped in a shortcut connection."""

    def __init__(self, config: GPTConfig, *, attn_impl: AttnImpl = "sdpa", device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.ln_1 = make_norm(config, config.n_embd, **kw)
        self.attn = CausalSelfAttention(config, attn_impl=attn_impl, **kw)
        self.ln_2 = make_norm(config, config.n_embd, **kw)
        self.mlp = MLP(config, **kw)

    def forward(
        self, x: Tensor, *, kv: tuple[Tensor, Tensor] | None = None, start: int = 0, mask: Tensor | None = None,
        rope: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        # The shortcuts let gradients flow straight through deep stacks.
        x = x + self.attn(self.ln_1(x), kv=kv, start=start, mask=mask, rope=rope)
        x = x + self.mlp(self.ln_2(x))
        return x  # (B, T, C)


@dataclass
class KVCache:
    """Pre-allocated keys and values for all layers, filled left to right.

    k, v: (n_layer, B, nkv, T_max, hs): only the key/value heads are stored (grouped-query attention).
    `length` is how many positions are filled. `key_valid` (B, T_max) marks real (non-padding)
    positions when a batch of prompts was left-padded; None means all real.
    """

    k: Tensor
    v: Tensor
    length: int = 0
    key_valid: Tensor | None = None
    # Scratch space for the decode steps over this cache's life (model/fused_decode.py keeps the blocks' kernel
    # arguments here, gathered at the first step; `GPT._rope_rows` a table of RoPE's angles): only for a cache
    # that one generation owns, during which the model does not change. None (the default): nothing is kept,
    # every step looks at the model anew.
    step_memo: dict[str, Any] | None = None

    @classmethod
    def empty(
        cls, config: GPTConfig, *, batch_size: int, max_len: int | None = None,
        device: torch.device | str | None = None, dtype: torch.dtype = torch.float32, step_memo: bool = False,
    ) -> KVCache:
        """An empty cache; `step_memo`: the caller's generation owns it (see the field)."""
        max_len = min(max_len or config.n_positions, config.n_positions)
        shape = (config.n_layer, batch_size, config.kv_heads, max_len, config.head_size)
        return cls(torch.empty(shape, device=device, dtype=dtype), torch.empty(shape, device=device, dtype=dtype),
                   step_memo={} if step_memo else None)

    @property
    def max_len(self) -> int:
        return self.k.size(3)

    @property
    def batch_size(self) -> int:
        return self.k.size(1)


def softcap(logits: Tensor, cap: float) -> Tensor:
    """cap·tanh(logits / cap): (..., V) squashed smoothly into (-cap, cap).

    Why: bounded logits keep a confident model's loss from spiking and its logits from growing
    without limit (Gemma 2, modded-nanoGPT); near zero it is almost the identity.
    """
    return cap * torch.tanh(logits / cap)


class GPT(nn.Module):
    """GPT: token (+ position) embeddings, a stack of blocks, final norm, LM head (GPT-2 by default)."""

    # A faster path through all blocks for new tokens of one sequence after a KV cache, or None: (x (1, T, C),
    # cache, start, rope) -> the residual stream after the last block, its caches written; None where it cannot
    # run, and the blocks compute the same thing (model/fused_decode.py sets it).
    decode_step: Callable[[Tensor, KVCache, int, Rope | None], Tensor | None] | None = None

    def __init__(
        self,
        config: GPTConfig,
        *,
        attn_impl: AttnImpl = "sdpa",
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.config = config
        kw = dict(device=device, dtype=dtype)
        # wpe is whichever position encoding is configured; RoPE's has no parameters and acts inside
        # attention rather than being added to the embeddings.
        if config.pos_encoding == "learned":
            wpe: nn.Module = nn.Embedding(config.n_positions, config.n_embd, **kw)
        elif config.pos_encoding == "sinusoidal":
            wpe = SinusoidalPositions(config.n_positions, config.n_embd, **kw)
        else:
            wpe = RotaryEmbedding(config, device=device)
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd, **kw),
                wpe=wpe,
                drop=nn.Dropout(config.embd_pdrop),
                h=nn.ModuleList([Block(config, attn_impl=attn_impl, **kw) for _ in range(config.n_layer)]),
                ln_f=make_norm(config, config.n_embd, **kw),
            )
        )
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False, **kw)
        if config.tie_word_embeddings:
            # One matrix both embeds tokens and scores them: saves V·C parameters (38.6M for GPT-2).
            self.lm_head.weight = self.transformer.wte.weight
        # Set by the trainer (TrainConfig.activation_checkpointing); see `hidden_states`.
        self.activation_checkpointing = False
        if torch.device(device or "cpu").type != "meta":
            self.init_weights(generator=generator)

    @classmethod
    def from_pretrained(
        cls, name_or_dir: str | os.PathLike[str], *, device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None, **config_overrides: Any,
    ) -> GPT:
        """nanoGPT's entry point: a GPT in eval mode from a Hugging Face name or folder.

        Names: gpt2, gpt2-medium, gpt2-large, gpt2-xl (or any `owner/repo` of a supported family), downloaded
        once into the Hugging Face cache. Folders: a saved GPT-2, Llama, Qwen2 or Qwen3 causal LM. Overrides
        replace config fields (e.g. `resid_pdrop=0.0`). The work is `scratchgpt.checkpoint.load_hf`'s.
        """
        if _pretrained_loader is None:  # only when GPT came from scratchgpt.model.gpt and nothing loaded checkpoint
            raise RuntimeError("GPT.from_pretrained loads through scratchgpt.checkpoint: import GPT as "
                               "`from scratchgpt import GPT` (or import scratchgpt.checkpoint once)")
        return _pretrained_loader(name_or_dir, device=device, dtype=dtype, **config_overrides)

    # -- initialisation ---------------------------------------------------------------------------

    @torch.no_grad()
    def init_weights(self, *, generator: torch.Generator | None = None) -> None:
        """GPT-2 init: N(0, 0.02) weights, zero biases, residual projections scaled by 1/√(2·n_layer).

        With `zero_init`, the residual projections and an untied LM head start at exactly zero, so
        every block starts as the identity and the first logits are uniform (modded-nanoGPT, nanochat).
        """
        std = self.config.initializer_range
        # Each block adds two residual branches; scaling their output projections keeps the
        # residual stream's variance from growing with depth.
        proj_std = std / math.sqrt(2 * self.config.n_layer)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                is_proj = name.endswith("c_proj")
                nn.init.normal_(module.weight, mean=0.0, std=proj_std if is_proj else std, generator=generator)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std, generator=generator)
            elif isinstance(module, (LayerNorm, RMSNorm)):
                nn.init.ones_(module.weight)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        if self.config.zero_init:
            for name, module in self.named_modules():
                if isinstance(module, nn.Linear) and name.endswith("c_proj"):
                    nn.init.zeros_(module.weight)
            if not self.config.tie_word_embeddings:
                nn.init.zeros_(self.lm_head.weight)

    def reset_buffers(self, *, device: torch.device | str | None = None) -> None:
        """Recompute the derived, non-persistent buffers (sinusoidal table, RoPE frequencies) on `device`.

        Needed after building on the meta device and assigning weights: buffers are not in checkpoints.
        """
        n = self.config.n_positions
        for module in self.modules():
            if isinstance(module, RotaryEmbedding):
                module.inv_freq = rope_inv_freq(self.config, device=device)
            elif isinstance(module, SinusoidalPositions):
                module.table = sinusoidal_table(n, self.config.n_embd, device=device, dtype=module.table.dtype)

    def set_attn_impl(self, attn_impl: AttnImpl) -> None:
        """Switch every attention layer between the fused (`sdpa`) and written-out (`eager`) path."""
        if attn_impl not in ("sdpa", "eager"):
            raise ValueError(f"attn_impl={attn_impl!r}; choose 'sdpa' or 'eager'")
        for block in self.transformer.h:
            block.attn.attn_impl = attn_impl

    def num_parameters(self, *, exclude_embeddings: bool = False) -> int:
        """Count unique parameters (a tied matrix counts once)."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.transformer.wte.weight.numel()
            if isinstance(self.transformer.wpe, nn.Embedding):
                n -= self.transformer.wpe.weight.numel()
        return n

    # -- forward ----------------------------------------------------------------------------------

    def forward(
        self,
        idx: Tensor,
        targets: Tensor | None = None,
        *,
        kv_cache: KVCache | None = None,
        position_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        last_token_only: bool = False,
    ) -> tuple[Tensor | None, Tensor | None]:
        """Logits (B, T, V) for token ids `idx` (B, T); mean cross-entropy if `targets` (-100 = ignore).

        With `kv_cache`, `idx` continues the cached sequence (which is advanced by T). `attention_mask`
        (B, T) marks real tokens (1) versus left padding (0). `last_token_only` computes logits for the
        final position alone, which is all that sampling needs. In a training forward (grad on) with
        `targets` and float32 logits over LOSS_CHUNK_BYTES, the loss is computed a chunk of tokens at a time
        and the logits returned are None: they never exist whole. A plain linear head runs fused with the
        loss (`model.fused_loss`); any other (LoRA, int8) runs under checkpoint, with activation
        checkpointing on (`_chunked_loss`).
        """
        rows = loss_chunk_rows(self.config.vocab_size, idx.numel())
        chunked = targets is not None and rows is not None and not last_token_only and kv_cache is None \
            and self.training and torch.is_grad_enabled()
        # Not while torch.compile traces: the fused step's gradients and chunk loop are for eager mode.
        fused = chunked and self.head_fuses_with_loss() and not torch.compiler.is_compiling()
        head = self.lm_head
        # A head tied to the token embedding and fused with the loss puts the shared weight's dense (V, C)
        # gradient into .grad itself; the lookup's own can then be sparse (its rows only) and is added to it in
        # place, instead of as a second dense (V, C) tensor (311 MB at Qwen3-0.6B in bf16).
        sparse = fused and head.weight.requires_grad and isinstance(self.transformer.wte, nn.Embedding) \
            and self.transformer.wte.weight is head.weight
        x = self.hidden_states(idx, kv_cache=kv_cache, position_ids=position_ids, attention_mask=attention_mask,
                               sparse_embedding_grad=sparse)
        if fused:
            h = self.transformer.ln_f(x).flatten(0, 1)  # (N, C)
            return None, linear_cross_entropy(h, head.weight, head.bias, targets.flatten(),
                                              softcap=self.config.logit_softcap, rows=rows, grad_into_param=sparse)
        if chunked and self._recomputes(kv_cache):
            return None, self._chunked_loss(x.flatten(0, 1), targets.flatten(), rows=rows)
        if last_token_only:
            x = x[:, -1:, :]  # (B, 1, C): skip the V-wide head for positions nobody samples from
        logits = self.head(x)  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        return logits, loss

    def hidden_states(
        self,
        idx: Tensor,
        *,
        kv_cache: KVCache | None = None,
        position_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        sparse_embedding_grad: bool = False,
    ) -> Tensor:
        """The residual stream after the last block, (B, T, C): `forward` without the final norm and head.

        Why separate: scoring (eval) needs the V-wide head only at some positions, and for many
        positions it is cheaper to run the head a few rows at a time than to hold (B, T, V) logits.
        `sparse_embedding_grad` makes the token embedding's gradient sparse: only where a dense gradient of
        the same weight is sure to join it (a tied head fused with the loss), or an optimizer would get it.
        """
        B, T = idx.shape
        start = kv_cache.length if kv_cache is not None else 0
        if start + T > self.config.n_positions:
            raise ValueError(
                f"sequence of {start + T} tokens exceeds the model's context of n_positions="
                f"{self.config.n_positions}; crop the input to its last {self.config.n_positions} tokens"
            )
        if kv_cache is not None and start + T > kv_cache.max_len:
            raise ValueError(f"KV cache holds {kv_cache.max_len} positions; {start + T} are needed")

        mask = self._attention_mask(B, T, start, kv_cache, attention_mask, idx.device)
        # New tokens of one unpadded sequence after a cache may take the decode step (it is causal by itself).
        fast = self.decode_step is not None and kv_cache is not None and mask is None and B == 1
        if mask is None and T > 1 and start > 0:
            # Several new tokens after a cached prefix (speculative verification, chunked prefill): one
            # causal mask for all layers rather than one per layer.
            mask = causal_mask(T, start + T, start, device=idx.device)[None, None]  # (1, 1, T, S)
        memo = kv_cache.step_memo if fast and position_ids is None and self.config.pos_encoding == "rope" else None
        if position_ids is None and memo is None:
            position_ids = torch.arange(start, start + T, device=idx.device)  # (T,)

        wte = self.transformer.wte
        x = F.embedding(idx, wte.weight, sparse=True) if sparse_embedding_grad else wte(idx)  # (B, T, C)
        rope = None
        if self.config.pos_encoding == "rope":
            # (cos, sin), applied to q and k in every layer; a generation's decode steps slice them from a table
            rope = self.transformer.wpe(position_ids) if memo is None else self._rope_rows(memo, start, T)
        else:
            x = x + self.transformer.wpe(position_ids)
        if self.training:
            x = self.transformer.drop(x)
        # Activation checkpointing keeps only each block's input and recomputes the rest in the backward
        # pass: one more forward per block, for activation memory of one block instead of all of them.
        # Only when a backward will follow (training mode, grad on, no KV cache). The recomputation replays
        # the RNG state (preserve_rng_state), so its dropout masks, loss and gradients are those without it.
        recompute = self._recomputes(kv_cache)
        if fast:
            y = self.decode_step(x, kv_cache, start, rope)
            if y is not None:
                kv_cache.length = start + T
                return y  # (1, T, C)
        for i, block in enumerate(self.transformer.h):
            if recompute:
                x = checkpoint(block, x, use_reentrant=False, start=start, mask=mask, rope=rope)
                continue
            kv = (kv_cache.k[i], kv_cache.v[i]) if kv_cache is not None else None
            x = block(x, kv=kv, start=start, mask=mask, rope=rope)
        if kv_cache is not None:
            kv_cache.length = start + T
        return x  # (B, T, C)

    def _rope_rows(self, memo: dict[str, Any], start: int, T: int) -> Rope:
        """RoPE's (cos, sin), each (T, hs), for positions start .. start + T - 1, sliced from a table that a
        generation's cache memo keeps (see KVCache.step_memo) and extends by doubling. The rows are
        `wpe(arange(start, start + T))`'s values (the same element-wise ops on the same angles: bit for bit on
        the Intel Xeon here, tested to float rounding), but a decode step then costs two slices instead of ~8
        small operations (~0.2 ms a token at Llama 124M in bf16 there, once the token's weights have swept the
        caches)."""
        table = memo.get("rope")
        if table is None or table[0] is not self or table[1].size(0) < start + T:
            n = max(start + T, 256, 2 * table[1].size(0) if table is not None and table[0] is self else 0)
            n = min(n, self.config.n_positions)
            cos, sin = self.transformer.wpe(torch.arange(n, device=self.transformer.wpe.inv_freq.device))
            table = memo["rope"] = (self, cos, sin)
        return table[1][start:start + T], table[2][start:start + T]

    def _recomputes(self, kv_cache: KVCache | None) -> bool:
        """Whether this call checkpoints: only when a backward will follow (training mode, grad on, no KV cache)."""
        return self.activation_checkpointing and self.training and kv_cache is None and torch.is_grad_enabled()

    def head_fuses_with_loss(self) -> bool:
        """Whether a chunked loss runs fused with the head (`model.fused_loss`): a plain linear head only (the
        fused step uses its weight and bias directly; a LoRA or int8 head has more to it)."""
        return type(self.lm_head) in (Linear, nn.Linear)

    def _chunked_loss(self, x: Tensor, targets: Tensor, *, rows: int) -> Tensor:
        """Mean cross-entropy of hidden states x (N, C) against targets (N,), `rows` tokens at a time.

        Each chunk's head and loss run under checkpoint: the forward keeps only the chunk's hidden states and
        the backward recomputes its logits, so one chunk's (rows, V) logits, log-probabilities and gradients
        exist at a time instead of the whole micro-batch's. The sum over chunks divided by the scored tokens
        is F.cross_entropy's mean (-100 ignored) up to float rounding.
        """
        total = x.new_zeros((), dtype=torch.float32)
        for start in range(0, x.shape[0], rows):
            total = total + checkpoint(self._loss_sum, x[start:start + rows], targets[start:start + rows],
                                       use_reentrant=False)
        return total / (targets != -100).sum()

    def _loss_sum(self, x: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(self.head(x), targets, ignore_index=-100, reduction="sum")  # (rows, V) -> ()

    def head(self, x: Tensor) -> Tensor:
        """Final norm, LM head and (if configured) soft-cap: hidden states (..., C) -> logits (..., V)."""
        logits = self.lm_head(self.transformer.ln_f(x))
        if self.config.logit_softcap is not None:
            logits = softcap(logits, self.config.logit_softcap)
        return logits

    @staticmethod
    def _attention_mask(
        B: int, T: int, start: int, kv_cache: KVCache | None, attention_mask: Tensor | None, device: torch.device
    ) -> Tensor | None:
        """None for plain causal attention, else bool (B, 1, T, S) with True where a query may look."""
        key_valid = None
        if attention_mask is not None:
            new_valid = attention_mask.to(device=device, dtype=torch.bool)  # (B, T)
            if kv_cache is not None:
                if kv_cache.key_valid is None:
                    kv_cache.key_valid = torch.ones(B, kv_cache.max_len, dtype=torch.bool, device=device)
                kv_cache.key_valid[:, start : start + T] = new_valid
                key_valid = kv_cache.key_valid[:, : start + T]
            else:
                key_valid = new_valid
        elif kv_cache is not None and kv_cache.key_valid is not None:
            kv_cache.key_valid[:, start : start + T] = True
            key_valid = kv_cache.key_valid[:, : start + T]
        if key_valid is None:
            return None
        S = start + T
        q_pos = torch.arange(start, S, device=device)[:, None]  # (T, 1)
        k_pos = torch.arange(S, device=device)[None, :]  # (1, S)
        allowed = (k_pos <= q_pos)[None] & key_valid[:, None, :]  # (B, T, S)
        # A padding query would otherwise see no key at all, and softmax over nothing is NaN; let it
        # see itself. Its output is never used.
        allowed = allowed | (k_pos == q_pos)[None]
        return allowed[:, None]  # (B, 1, T, S)


# ---------------------------------------------------------------------------------------------
# GPT.from_pretrained's loader
# ---------------------------------------------------------------------------------------------


# What `GPT.from_pretrained` calls: `scratchgpt.checkpoint.load_hf`, handed down by that module when it is
# imported. The model stage holds no I/O and imports nothing above config and device (tests/test_layering.py),
# so the loader comes down to it instead of the model reaching up for it.
_pretrained_loader: Callable[..., GPT] | None = None


def register_pretrained_loader(loader: Callable[..., GPT]) -> None:
    """Make `loader(name_or_dir, *, device, dtype, **config_overrides) -> GPT` the one `GPT.from_pretrained` uses."""
    global _pretrained_loader
    _pretrained_loader = loader
