"""The GPT-2 model as pure `torch.nn` modules: no I/O, no optimizer, no downloads.

Shape legend used in comments: B batch, T time (query positions), S key positions (cache + new),
C channels (n_embd), V vocab, nh heads, hs head size (C // nh).

Parameter names follow Hugging Face's `GPT2LMHeadModel` (`transformer.h.0.attn.c_attn.weight`, ...),
so importing GPT-2 weights is an identity map plus four transposes (HF stores Conv1D weights as
(in, out); `nn.Linear` stores (out, in)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scratchgpt.config import GPTConfig

AttnImpl = Literal["sdpa", "eager"]


# Up to this many rows, a CPU linear layer is computed as W @ xᵀ (see `Linear`).
_FEW_ROWS = 16


class Linear(nn.Linear):
    """`nn.Linear` (same parameters and names) with a faster path for a few rows on the CPU.

    Decoding feeds one token at a time, so every layer multiplies a big weight by a single row and
    speed is set by how fast the weights stream from memory. On the CPU, PyTorch's path for that
    (x @ Wᵀ, a matrix-vector product) streamed weights at ~16 GB/s on our 2-core machines, while the
    BLAS product W @ xᵀ with at least two columns streams at ~32 GB/s. So for few rows we compute
    (W @ xᵀ)ᵀ, padding a single row to two. Results equal F.linear up to float rounding.
    """

    def forward(self, x: Tensor) -> Tensor:
        rows = x.numel() // x.size(-1)
        if x.device.type != "cpu" or rows > _FEW_ROWS or rows == 0:
            return F.linear(x, self.weight, self.bias)
        flat = x.reshape(rows, x.size(-1))
        if rows == 1:
            flat = torch.cat([flat, flat])  # two real rows: BLAS takes its fast matrix-matrix path
        y = (self.weight @ flat.t()).t()[:rows]  # (rows, out)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], y.size(-1))


class LayerNorm(nn.Module):
    """Normalise each position over its channels, then scale and shift (bias optional)."""

    def __init__(self, n_embd: int, *, eps: float = 1e-5, bias: bool = True, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(n_embd, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(n_embd, device=device, dtype=dtype)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


class GELU(nn.Module):
    """GPT-2's GELU: the tanh approximation 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))."""

    def forward(self, x: Tensor) -> Tensor:
        # F.gelu's tanh mode computes exactly the formula above in one fused kernel.
        return F.gelu(x, approximate="tanh")


class MLP(nn.Module):
    """Position-wise feed-forward network: expand 4×, non-linearity, project back."""

    def __init__(self, config: GPTConfig, *, device=None, dtype=None):
        super().__init__()
        kw = dict(bias=config.bias, device=device, dtype=dtype)
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd, **kw)
        self.act = GELU() if config.activation == "gelu" else nn.ReLU()
        self.c_proj = Linear(4 * config.n_embd, config.n_embd, **kw)
        self.dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))  # (B, T, C)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with one fused q/k/v projection.

    Two implementations compute the same thing: `sdpa` (PyTorch's fused kernel, flash attention on
    CUDA) and `eager` (masked softmax(QKᵀ/√hs) written out, which can also return the weights).
    """

    def __init__(self, config: GPTConfig, *, attn_impl: AttnImpl = "sdpa", device=None, dtype=None):
        super().__init__()
        kw = dict(bias=config.bias, device=device, dtype=dtype)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.attn_impl: AttnImpl = attn_impl
        self.c_attn = Linear(config.n_embd, 3 * config.n_embd, **kw)
        self.c_proj = Linear(config.n_embd, config.n_embd, **kw)
        self.attn_pdrop = config.attn_pdrop
        self.attn_dropout = nn.Dropout(config.attn_pdrop)
        self.resid_dropout = nn.Dropout(config.resid_pdrop)
        # True where a query may look at a key: the lower triangle. Not persistent: it is derived
        # from n_positions, so it stays out of checkpoints and the HF name map.
        mask = torch.ones(config.n_positions, config.n_positions, dtype=torch.bool, device=device)
        self.register_buffer("causal_mask", torch.tril(mask), persistent=False)

    def forward(
        self,
        x: Tensor,
        *,
        kv: tuple[Tensor, Tensor] | None = None,
        start: int = 0,
        mask: Tensor | None = None,
        return_weights: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Attend over the keys so far; `kv` are (B, nh, T_max, hs) cache buffers filled from `start`.

        `mask` is None for plain causal attention, else a bool (B|1, 1, T, S) tensor, True = attend.
        """
        B, T, C = x.shape
        nh, hs = self.n_head, C // self.n_head
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 × (B, T, C)
        q = q.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, nh, hs).transpose(1, 2)
        v = v.view(B, T, nh, hs).transpose(1, 2)
        if kv is not None:
            # Write this step's keys/values into the pre-allocated cache, then attend over all of it.
            k_buf, v_buf = kv
            k_buf[:, :, start : start + T] = k
            v_buf[:, :, start : start + T] = v
            k, v = k_buf[:, :, : start + T], v_buf[:, :, : start + T]  # (B, nh, S, hs)
        S = k.size(2)

        if self.attn_impl == "eager" or return_weights:
            y, weights = self._eager(q, k, v, mask, start)
        else:
            weights = None
            dropout_p = self.attn_pdrop if self.training else 0.0
            if mask is None and 1 < T < S:
                # Several new queries after a cached prefix: is_causal would align the triangle
                # top-left, so pass the causal mask's rows for these positions instead.
                mask = self.causal_mask[start : start + T, :S]
            if mask is not None:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
            else:
                # Here either nothing is cached (start == 0, so T == S and is_causal's top-left
                # triangle is right) or one new query follows the cache (it may see every key: no
                # mask). Deciding from the cache position, a Python int, rather than comparing T
                # with S keeps this a plain bool when T is a symbolic size (torch.onnx.export).
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=start == 0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble heads: (B, T, C)
        y = self.resid_dropout(self.c_proj(y))
        return (y, weights) if return_weights else y

    def _eager(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, start: int) -> tuple[Tensor, Tensor]:
        T, S = q.size(2), k.size(2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.size(-1)))  # (B, nh, T, S)
        allowed = self.causal_mask[start : start + T, :S] if mask is None else mask
        att = att.masked_fill(~allowed, float("-inf"))
        att = F.softmax(att, dim=-1)
        att = self.attn_dropout(att)
        return att @ v, att  # (B, nh, T, hs), (B, nh, T, S)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: two sub-layers, each wrapped in a shortcut connection."""

    def __init__(self, config: GPTConfig, *, attn_impl: AttnImpl = "sdpa", device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        ln = dict(eps=config.layer_norm_epsilon, bias=config.bias, **kw)
        self.ln_1 = LayerNorm(config.n_embd, **ln)
        self.attn = CausalSelfAttention(config, attn_impl=attn_impl, **kw)
        self.ln_2 = LayerNorm(config.n_embd, **ln)
        self.mlp = MLP(config, **kw)

    def forward(
        self, x: Tensor, *, kv: tuple[Tensor, Tensor] | None = None, start: int = 0, mask: Tensor | None = None
    ) -> Tensor:
        # The shortcuts let gradients flow straight through deep stacks.
        x = x + self.attn(self.ln_1(x), kv=kv, start=start, mask=mask)
        x = x + self.mlp(self.ln_2(x))
        return x  # (B, T, C)


class SinusoidalPositions(nn.Module):
    """Fixed sin/cos position table (no parameters): even channels sin, odd channels cos."""

    def __init__(self, n_positions: int, n_embd: int, *, device=None, dtype=None):
        super().__init__()
        self.register_buffer(
            "table", sinusoidal_table(n_positions, n_embd, device=device, dtype=dtype), persistent=False
        )

    def forward(self, position_ids: Tensor) -> Tensor:
        return self.table[position_ids]


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


@dataclass
class KVCache:
    """Pre-allocated keys and values for all layers, filled left to right.

    k, v: (n_layer, B, nh, T_max, hs). `length` is how many positions are filled. `key_valid` (B, T_max)
    marks real (non-padding) positions when a batch of prompts was left-padded; None means all real.
    """

    k: Tensor
    v: Tensor
    length: int = 0
    key_valid: Tensor | None = None

    @classmethod
    def empty(
        cls, config: GPTConfig, *, batch_size: int, max_len: int | None = None,
        device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
    ) -> KVCache:
        max_len = min(max_len or config.n_positions, config.n_positions)
        shape = (config.n_layer, batch_size, config.n_head, max_len, config.head_size)
        return cls(torch.empty(shape, device=device, dtype=dtype), torch.empty(shape, device=device, dtype=dtype))

    @property
    def max_len(self) -> int:
        return self.k.size(3)

    @property
    def batch_size(self) -> int:
        return self.k.size(1)


class GPT(nn.Module):
    """GPT-2: token + position embeddings, a stack of blocks, final LayerNorm, LM head."""

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
        if config.pos_encoding == "learned":
            wpe: nn.Module = nn.Embedding(config.n_positions, config.n_embd, **kw)
        else:
            wpe = SinusoidalPositions(config.n_positions, config.n_embd, **kw)
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd, **kw),
                wpe=wpe,
                drop=nn.Dropout(config.embd_pdrop),
                h=nn.ModuleList([Block(config, attn_impl=attn_impl, **kw) for _ in range(config.n_layer)]),
                ln_f=LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias, **kw),
            )
        )
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False, **kw)
        if config.tie_word_embeddings:
            # One matrix both embeds tokens and scores them: saves V·C parameters (38.6M for GPT-2).
            self.lm_head.weight = self.transformer.wte.weight
        if torch.device(device or "cpu").type != "meta":
            self.init_weights(generator=generator)

    # -- initialisation ---------------------------------------------------------------------------

    @torch.no_grad()
    def init_weights(self, *, generator: torch.Generator | None = None) -> None:
        """GPT-2 init: N(0, 0.02) weights, zero biases, residual projections scaled by 1/√(2·n_layer)."""
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
            elif isinstance(module, LayerNorm):
                nn.init.ones_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def reset_buffers(self, *, device: torch.device | str | None = None) -> None:
        """Recompute the derived, non-persistent buffers (causal masks, sinusoidal table) on `device`.

        Needed after building on the meta device and assigning weights: buffers are not in checkpoints.
        """
        n = self.config.n_positions
        for module in self.modules():
            if isinstance(module, CausalSelfAttention):
                module.causal_mask = torch.tril(torch.ones(n, n, dtype=torch.bool, device=device))
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
    ) -> tuple[Tensor, Tensor | None]:
        """Logits (B, T, V) for token ids `idx` (B, T); mean cross-entropy if `targets` (-100 = ignore).

        With `kv_cache`, `idx` continues the cached sequence (which is advanced by T). `attention_mask`
        (B, T) marks real tokens (1) versus left padding (0). `last_token_only` computes logits for the
        final position alone, which is all that sampling needs.
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
        if position_ids is None:
            position_ids = torch.arange(start, start + T, device=idx.device)  # (T,)

        x = self.transformer.wte(idx) + self.transformer.wpe(position_ids)  # (B, T, C)
        x = self.transformer.drop(x)
        for i, block in enumerate(self.transformer.h):
            kv = (kv_cache.k[i], kv_cache.v[i]) if kv_cache is not None else None
            x = block(x, kv=kv, start=start, mask=mask)
        if kv_cache is not None:
            kv_cache.length = start + T

        if last_token_only:
            x = x[:, -1:, :]  # (B, 1, C): skip the V-wide head for positions nobody samples from
        logits = self.lm_head(self.transformer.ln_f(x))  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        return logits, loss

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
