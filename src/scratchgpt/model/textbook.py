"""GPT-2 as a textbook builds it, layer by layer, with converters to and from `scratchgpt.model.GPT`.

This follows the formulation of Raschka's "Build a Large Language Model (From Scratch)": a plain dict
config, separate query/key/value projections, a LayerNorm and a GELU written out by hand, and
explicit shortcut connections. It exists to teach and to cross-check: the tests convert weights both
ways and require both formulations to compute the same logits. The production path (model,
checkpoint, generation, training) never imports this module.

Shape legend: B batch, T time, C channels (emb_dim), V vocab, nh heads, hs head size (C // nh).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from scratchgpt.config import GPTConfig
from scratchgpt.model.gpt import GPT, sinusoidal_table

# The book's smallest GPT-2, plus two keys for the variants built here: fixed sinusoidal positions
# instead of a learned `pos_emb`, and attention as a list of single-head modules.
GPT_CONFIG_124M: dict[str, Any] = {
    "vocab_size": 50257,  # GPT-2's BPE vocabulary
    "context_length": 1024,  # longest input, in tokens
    "emb_dim": 768,  # C
    "n_heads": 12,  # nh
    "n_layers": 12,  # transformer blocks
    "drop_rate": 0.1,  # one dropout rate for embeddings, attention weights and shortcuts
    "qkv_bias": False,  # biases in the query/key/value projections only
    "pos_encoding": "learned",  # "learned" | "sinusoidal"
    "per_head_attention": False,  # True: MultiHeadAttentionWrapper over per-head CausalAttention
}

LAYER_NORM_EPS = 1e-5  # the textbook's LayerNorm hard-codes this; GPT-2 uses the same value


# ---------------------------------------------------------------------------------------------
# The building blocks
# ---------------------------------------------------------------------------------------------


def _causal_mask(context_length: int) -> Tensor:
    """(T, T) with ones strictly above the diagonal: the future positions a query must not see."""
    return torch.triu(torch.ones(context_length, context_length), diagonal=1)


class _MaskedAttention(nn.Module):
    """Base of the two attention modules: accepts the `mask` buffer the book's own GPTModel saves.

    The book registers its causal mask as a persistent buffer, so its state dicts carry `...att.mask`. Here the
    mask is not persistent (it follows from context_length), so without this a strict load of a state dict
    saved by the book's code would fail on keys that hold no information. The saved mask must be this one.
    """

    mask: Tensor

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        saved = state_dict.pop(prefix + "mask", None)
        if saved is not None and not torch.equal(saved.bool(), self.mask.bool()):
            raise ValueError(f"{prefix}mask of shape {tuple(saved.shape)} is not the causal mask of this model "
                             f"(context_length {self.mask.size(0)}); build GPTModel with the saved config")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class CausalAttention(_MaskedAttention):
    """One attention head: softmax(q·kᵀ/√d_out) over past positions, applied to the values."""

    def __init__(self, d_in: int, d_out: int, context_length: int, dropout: float, qkv_bias: bool = False):
        super().__init__()
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.dropout = nn.Dropout(dropout)
        # Not persistent: the mask follows from context_length, so it has no place in a state dict.
        self.register_buffer("mask", _causal_mask(context_length), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        T = x.size(1)
        queries, keys, values = self.W_query(x), self.W_key(x), self.W_value(x)  # (B, T, hs)
        scores = queries @ keys.transpose(1, 2)  # (B, T, T)
        scores = scores.masked_fill(self.mask.bool()[:T, :T], -torch.inf)
        # Dividing by √hs keeps the scores' variance near 1, so softmax does not saturate.
        weights = torch.softmax(scores / math.sqrt(keys.size(-1)), dim=-1)
        return self.dropout(weights) @ values  # (B, T, hs)


class MultiHeadAttentionWrapper(nn.Module):
    """num_heads independent `CausalAttention` heads run side by side, concatenated, then projected.

    The concatenation puts head h in channels [h·hs, (h+1)·hs), the same layout as the fused
    `MultiHeadAttention` below, so the two hold the same weights cut up differently.
    """

    def __init__(
        self, d_in: int, d_out: int, context_length: int, dropout: float, num_heads: int,
        qkv_bias: bool = False,
    ):
        super().__init__()
        if d_out % num_heads:
            raise ValueError(f"d_out={d_out} is not divisible by num_heads={num_heads}")
        head_dim = d_out // num_heads
        self.heads = nn.ModuleList(
            [CausalAttention(d_in, head_dim, context_length, dropout, qkv_bias) for _ in range(num_heads)]
        )
        self.out_proj = nn.Linear(d_out, d_out)  # mixes the heads, as GPT-2's c_proj does

    def forward(self, x: Tensor) -> Tensor:
        return self.out_proj(torch.cat([head(x) for head in self.heads], dim=-1))  # (B, T, C)


class MultiHeadAttention(_MaskedAttention):
    """All heads at once: one projection each for queries, keys and values, split into heads."""

    def __init__(
        self, d_in: int, d_out: int, context_length: int, dropout: float, num_heads: int,
        qkv_bias: bool = False,
    ):
        super().__init__()
        if d_out % num_heads:
            raise ValueError(f"d_out={d_out} is not divisible by num_heads={num_heads}")
        self.d_out = d_out
        self.num_heads = num_heads
        self.head_dim = d_out // num_heads
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("mask", _causal_mask(context_length), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        B, T, _ = x.shape
        nh, hs = self.num_heads, self.head_dim
        # (B, T, C) -> (B, nh, T, hs): each head attends independently over its own hs channels.
        queries = self.W_query(x).view(B, T, nh, hs).transpose(1, 2)
        keys = self.W_key(x).view(B, T, nh, hs).transpose(1, 2)
        values = self.W_value(x).view(B, T, nh, hs).transpose(1, 2)
        scores = queries @ keys.transpose(2, 3)  # (B, nh, T, T)
        scores = scores.masked_fill(self.mask.bool()[:T, :T], -torch.inf)
        weights = self.dropout(torch.softmax(scores / math.sqrt(hs), dim=-1))
        context = (weights @ values).transpose(1, 2).reshape(B, T, self.d_out)  # heads side by side
        return self.out_proj(context)  # (B, T, C)


class LayerNorm(nn.Module):
    """Normalise each position to mean 0 and variance 1 over its channels, then scale and shift."""

    def __init__(self, emb_dim: int):
        super().__init__()
        self.eps = LAYER_NORM_EPS
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x: Tensor) -> Tensor:
        mean = x.mean(dim=-1, keepdim=True)
        # The biased variance (divide by C, not C - 1) is what GPT-2 was trained with.
        var = x.var(dim=-1, keepdim=True, unbiased=False)
        return self.scale * (x - mean) / torch.sqrt(var + self.eps) + self.shift


class GELU(nn.Module):
    """GELU by GPT-2's tanh approximation: 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))."""

    def forward(self, x: Tensor) -> Tensor:
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


class FeedForward(nn.Module):
    """Widen each position to 4·C channels, apply GELU, and project back to C."""

    def __init__(self, cfg: dict[str, Any]):
        super().__init__()
        C = cfg["emb_dim"]
        self.layers = nn.Sequential(nn.Linear(C, 4 * C), GELU(), nn.Linear(4 * C, C))

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class TransformerBlock(nn.Module):
    """Attention then feed-forward, each after a LayerNorm and inside a shortcut connection."""

    def __init__(self, cfg: dict[str, Any]):
        super().__init__()
        attention = MultiHeadAttentionWrapper if cfg.get("per_head_attention", False) else MultiHeadAttention
        self.att = attention(
            d_in=cfg["emb_dim"], d_out=cfg["emb_dim"], context_length=cfg["context_length"],
            dropout=cfg["drop_rate"], num_heads=cfg["n_heads"], qkv_bias=cfg["qkv_bias"],
        )
        self.ff = FeedForward(cfg)
        self.norm1 = LayerNorm(cfg["emb_dim"])
        self.norm2 = LayerNorm(cfg["emb_dim"])
        self.drop_shortcut = nn.Dropout(cfg["drop_rate"])

    def forward(self, x: Tensor) -> Tensor:
        # The shortcuts give gradients a direct path through the stack of blocks.
        shortcut = x
        x = self.drop_shortcut(self.att(self.norm1(x)))
        x = x + shortcut
        shortcut = x
        x = self.drop_shortcut(self.ff(self.norm2(x)))
        return x + shortcut  # (B, T, C)


class GPTModel(nn.Module):
    """Token + position embeddings, `n_layers` transformer blocks, a final LayerNorm, an output head."""

    def __init__(self, cfg: dict[str, Any]):
        super().__init__()
        self.tok_emb = nn.Embedding(cfg["vocab_size"], cfg["emb_dim"])
        pos_encoding = cfg.get("pos_encoding", "learned")
        if pos_encoding == "learned":
            self.pos_emb: nn.Embedding | None = nn.Embedding(cfg["context_length"], cfg["emb_dim"])
        elif pos_encoding == "sinusoidal":
            self.pos_emb = None
            # A fixed table, not a parameter: nothing about the positions is learned.
            table = sinusoidal_table(cfg["context_length"], cfg["emb_dim"])
            self.register_buffer("pos_table", table, persistent=False)
        else:
            raise ValueError(f"pos_encoding={pos_encoding!r}; choose 'learned' or 'sinusoidal'")
        self.drop_emb = nn.Dropout(cfg["drop_rate"])
        self.cfg = dict(cfg)  # kept for the book's helpers (load_weights_into_gpt); not in the state dict
        self.trf_blocks = nn.Sequential(*[TransformerBlock(cfg) for _ in range(cfg["n_layers"])])
        self.final_norm = LayerNorm(cfg["emb_dim"])
        self.out_head = nn.Linear(cfg["emb_dim"], cfg["vocab_size"], bias=False)

    def forward(self, in_idx: Tensor) -> Tensor:
        """Logits (B, T, V) for token ids (B, T)."""
        positions = torch.arange(in_idx.size(1), device=in_idx.device)  # (T,)
        pos_embeds = self.pos_emb(positions) if self.pos_emb is not None else self.pos_table[positions]
        x = self.drop_emb(self.tok_emb(in_idx) + pos_embeds)  # (B, T, C)
        x = self.trf_blocks(x)
        return self.out_head(self.final_norm(x))  # (B, T, V)


# ---------------------------------------------------------------------------------------------
# Converting between this formulation and scratchgpt.model.GPT
# ---------------------------------------------------------------------------------------------


def config_to_gptconfig(cfg: dict[str, Any], *, tie_word_embeddings: bool = False) -> GPTConfig:
    """The GPTConfig that computes what GPTModel(cfg) computes (GELU, biases on, one dropout rate)."""
    drop = cfg["drop_rate"]
    return GPTConfig(
        vocab_size=cfg["vocab_size"], n_positions=cfg["context_length"], n_embd=cfg["emb_dim"],
        n_layer=cfg["n_layers"], n_head=cfg["n_heads"],
        embd_pdrop=drop, resid_pdrop=drop, attn_pdrop=drop, layer_norm_epsilon=LAYER_NORM_EPS,
        # out_proj, FeedForward and LayerNorm always carry biases in the textbook, so the GPT needs
        # bias=True. With qkv_bias=False we still convert: a q/k/v bias of zero computes exactly what no
        # bias computes, and refusing would leave the book's own default config (qkv_bias=False)
        # unconvertible. gpt_from_textbook fills those biases with zeros.
        bias=True,
        tie_word_embeddings=tie_word_embeddings,
        pos_encoding=cfg.get("pos_encoding", "learned"),
        activation="gelu",
    )


def gptconfig_to_config(config: GPTConfig, *, per_head_attention: bool = False) -> dict[str, Any]:
    """The textbook config for `config`; raises ValueError for what the textbook cannot express."""
    if not config.bias:
        # Zero-filled stand-ins would compute the same, but converting back would then give a
        # different architecture (bias=True); refusing keeps every conversion invertible.
        raise ValueError(
            "GPTConfig.bias=False: the textbook's out_proj, FeedForward and LayerNorm always have biases"
        )
    if config.activation != "gelu":
        raise ValueError(
            f"GPTConfig.activation={config.activation!r}: the textbook's FeedForward uses GELU only"
        )
    # The Llama / Qwen options have no counterpart in the book's GPTModel (GPT-2 options only).
    family = {"pos_encoding": (config.pos_encoding, ("learned", "sinusoidal")), "norm": (config.norm, ("layernorm",)),
              "n_kv_head": (config.kv_heads, (config.n_head,)),
              "head_dim": (config.head_size, (config.n_embd // config.n_head,)),
              "n_inner": (config.mlp_hidden, (4 * config.n_embd,)), "qk_norm": (config.qk_norm, (False,)),
              "qkv_bias": (config.attn_bias, (config.bias,)), "logit_softcap": (config.logit_softcap, (None,))}
    for name, (value, allowed) in family.items():
        if value not in allowed:
            raise ValueError(f"GPTConfig.{name}={value!r}: the textbook's GPTModel has GPT-2's architecture only")
    if config.layer_norm_epsilon != LAYER_NORM_EPS:
        raise ValueError(
            f"GPTConfig.layer_norm_epsilon={config.layer_norm_epsilon}: "
            f"the textbook's LayerNorm uses {LAYER_NORM_EPS}"
        )
    if not config.embd_pdrop == config.resid_pdrop == config.attn_pdrop:
        raise ValueError(
            "GPTConfig.embd_pdrop, resid_pdrop and attn_pdrop differ "
            f"({config.embd_pdrop}, {config.resid_pdrop}, {config.attn_pdrop}); "
            "the textbook has one drop_rate"
        )
    return {
        "vocab_size": config.vocab_size,
        "context_length": config.n_positions,
        "emb_dim": config.n_embd,
        "n_heads": config.n_head,
        "n_layers": config.n_layer,
        "drop_rate": config.embd_pdrop,
        "qkv_bias": True,  # GPT-2 (bias=True) has q/k/v biases
        "pos_encoding": config.pos_encoding,
        "per_head_attention": per_head_attention,
    }


def _name_pairs(cfg: dict[str, Any]) -> list[tuple[str, str]]:
    """(GPT name, textbook name) for every tensor the two formulations share unchanged.

    The fused c_attn is the one exception: it is split apart by `_qkv_to_textbook`.
    """
    pairs = [
        ("transformer.wte.weight", "tok_emb.weight"),
        ("transformer.ln_f.weight", "final_norm.scale"),
        ("transformer.ln_f.bias", "final_norm.shift"),
        ("lm_head.weight", "out_head.weight"),
    ]
    if cfg.get("pos_encoding", "learned") == "learned":
        pairs.append(("transformer.wpe.weight", "pos_emb.weight"))
    for i in range(cfg["n_layers"]):
        g, t = f"transformer.h.{i}.", f"trf_blocks.{i}."
        pairs += [
            (g + "ln_1.weight", t + "norm1.scale"),
            (g + "ln_1.bias", t + "norm1.shift"),
            (g + "attn.c_proj.weight", t + "att.out_proj.weight"),
            (g + "attn.c_proj.bias", t + "att.out_proj.bias"),
            (g + "ln_2.weight", t + "norm2.scale"),
            (g + "ln_2.bias", t + "norm2.shift"),
            (g + "mlp.c_fc.weight", t + "ff.layers.0.weight"),
            (g + "mlp.c_fc.bias", t + "ff.layers.0.bias"),
            (g + "mlp.c_proj.weight", t + "ff.layers.2.weight"),
            (g + "mlp.c_proj.bias", t + "ff.layers.2.bias"),
        ]
    return pairs


# c_attn's output rows are the queries, then the keys, then the values: (3C, C) = [q; k; v].
_QKV = ("W_query", "W_key", "W_value")


def _qkv_to_textbook(c_attn: dict[str, Tensor], cfg: dict[str, Any], prefix: str) -> dict[str, Tensor]:
    """Split c_attn's {"weight": (3C, C), "bias": (3C,)} into the textbook's q/k/v Linears."""
    C, hs = cfg["emb_dim"], cfg["emb_dim"] // cfg["n_heads"]
    out = {}
    for param, fused in c_attn.items():
        for name, block in zip(_QKV, fused.split(C, dim=0), strict=True):
            if param == "bias" and not cfg["qkv_bias"]:
                if name == _QKV[0] and bool(fused.any()):
                    raise ValueError("these q/k/v biases are not zero, but the config has qkv_bias=False; "
                                     "build GPTModel with qkv_bias=True")
                continue  # all zero: a model without q/k/v biases computes the same
            if cfg.get("per_head_attention", False):
                # Head h owns rows [h·hs, (h+1)·hs) of each projection.
                for h, rows in enumerate(block.split(hs, dim=0)):
                    out[f"{prefix}heads.{h}.{name}.{param}"] = rows
            else:
                out[f"{prefix}{name}.{param}"] = block
    return out


def _qkv_from_textbook(state: dict[str, Tensor], cfg: dict[str, Any], prefix: str) -> dict[str, Tensor]:
    """Fuse the textbook's q/k/v Linears back into c_attn's (3C, C) weight and (3C,) bias."""

    def projection(name: str, param: str) -> Tensor:
        if cfg.get("per_head_attention", False):
            return torch.cat([state[f"{prefix}heads.{h}.{name}.{param}"] for h in range(cfg["n_heads"])])
        return state[f"{prefix}{name}.{param}"]

    weight = torch.cat([projection(name, "weight") for name in _QKV])
    if cfg["qkv_bias"]:
        bias = torch.cat([projection(name, "bias") for name in _QKV])
    else:
        bias = weight.new_zeros(weight.size(0))  # see config_to_gptconfig: zero bias == no bias
    return {"weight": weight, "bias": bias}


def textbook_state_from_gpt_state(src: dict[str, Tensor], cfg: dict[str, Any]) -> dict[str, Tensor]:
    """The GPTModel(cfg) state dict holding a GPT state dict's tensors (c_attn split into q, k, v)."""
    dst = {t: src[g] for g, t in _name_pairs(cfg)}
    for i in range(cfg["n_layers"]):
        c_attn = {p: src[f"transformer.h.{i}.attn.c_attn.{p}"] for p in ("weight", "bias")}
        dst.update(_qkv_to_textbook(c_attn, cfg, prefix=f"trf_blocks.{i}.att."))
    return dst


def textbook_from_gpt(gpt: GPT, *, per_head_attention: bool = False) -> GPTModel:
    """A GPTModel holding copies of `gpt`'s weights (a tied lm_head becomes its own out_head)."""
    cfg = gptconfig_to_config(gpt.config, per_head_attention=per_head_attention)
    dst = textbook_state_from_gpt_state(gpt.state_dict(), cfg)
    wte = gpt.transformer.wte.weight
    model = GPTModel(cfg).to(device=wte.device, dtype=wte.dtype)
    model.load_state_dict(dst)  # copies: the two models share no storage
    return model.train(gpt.training)


def gpt_from_textbook(model: GPTModel, cfg: dict[str, Any]) -> GPT:
    """A GPT holding copies of `model`'s weights; tied only if out_head equals tok_emb exactly."""
    src = model.state_dict()
    tied = torch.equal(src["out_head.weight"], src["tok_emb.weight"])
    config = config_to_gptconfig(cfg, tie_word_embeddings=tied)
    dst = {g: src[t] for g, t in _name_pairs(cfg)}
    for i in range(cfg["n_layers"]):
        c_attn = _qkv_from_textbook(src, cfg, prefix=f"trf_blocks.{i}.att.")
        dst[f"transformer.h.{i}.attn.c_attn.weight"] = c_attn["weight"]
        dst[f"transformer.h.{i}.attn.c_attn.bias"] = c_attn["bias"]
    tok = model.tok_emb.weight
    gpt = GPT(config, device=tok.device, dtype=tok.dtype)
    gpt.load_state_dict(dst)  # a tied matrix is written twice, with equal values
    return gpt.train(model.training)
