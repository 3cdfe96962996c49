"""Configuration dataclasses: one per concern, validated when built, saved as JSON.

Every run directory holds these as JSON so a checkpoint describes itself. The CLI builds its flags
from the same dataclasses (`add_dataclass_args`), so each default lives in exactly one place.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar, get_args, get_origin

T = TypeVar("T")

# ---------------------------------------------------------------------------------------------
# Generic helpers shared by every config class
# ---------------------------------------------------------------------------------------------


def _check_choice(cls_name: str, name: str, value: Any, allowed: tuple[Any, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{cls_name}.{name}={value!r} is not allowed; choose one of {list(allowed)}")


def _check_range(
    cls_name: str, name: str, value: float, *, lo: float | None = None, hi: float | None = None,
    lo_open: bool = False, hi_open: bool = False,
) -> None:
    # NaN compares False with everything, so a range test alone would let it through: refuse
    # non-finite values first (no knob of ours means anything at nan or +-inf).
    if isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isfinite(value):
        raise ValueError(f"{cls_name}.{name}={value!r} must be a finite number")
    bad = (
        (lo is not None and (value <= lo if lo_open else value < lo))
        or (hi is not None and (value >= hi if hi_open else value > hi))
    )
    if bad:
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        rng = f"{left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}"
        raise ValueError(f"{cls_name}.{name}={value!r} is out of range; it must lie in {rng}")


def _type_name(hint: Any) -> str:
    origin = get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(hint))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(hint))
    if origin is tuple:
        args = get_args(hint)
        return f"a list (each item {_type_name(args[0])})" if args else "a list"
    if hint is type(None):
        return "null"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        hint, getattr(hint, "__name__", str(hint)))


def _matches(value: Any, hint: Any) -> bool:
    """Whether `value` has type `hint` (bool, int, float (ints too), str, Literal, Optional/Union, tuple)."""
    origin = get_origin(hint)
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in get_args(hint))
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in get_args(hint))
    if origin is tuple:
        args = [a for a in get_args(hint) if a is not Ellipsis]
        return isinstance(value, (tuple, list)) and (not args or all(_matches(v, args[0]) for v in value))
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def _validate_fields(obj: Any) -> None:
    """Every field against its type hint (one clear error per wrong type), Literal choices, finite floats.

    Called first by each config's __post_init__, so a value of the wrong type (`bias = "false"`,
    `lr = "fast"`, `device = 3`) fails here, before any range check could misread it.
    """
    name = type(obj).__name__
    hints = typing.get_type_hints(type(obj))
    for f in fields(obj):
        hint, value = hints.get(f.name), getattr(obj, f.name)
        if hint is None or _matches(value, hint):
            if isinstance(value, float) and not math.isfinite(value) or isinstance(value, tuple) and any(
                isinstance(v, float) and not math.isfinite(v) for v in value
            ):
                raise ValueError(f"{name}.{f.name}={value!r} must be a finite number")
            continue
        literals = [a for a in (hint, *get_args(hint)) if get_origin(a) is Literal]
        if literals and isinstance(value, str):
            _check_choice(name, f.name, value, get_args(literals[0]))
        raise ValueError(f"{name}.{f.name}={value!r} ({type(value).__name__}) must be {_type_name(hint)}")




# The older name, kept so that config classes written against it (on other branches) still validate fully.
_validate_literals = _validate_fields


def config_from_dict(cls: type[T], data: dict[str, Any], *, source: str = "config") -> T:
    """Build dataclass `cls` from a dict, rejecting unknown keys with a one-line error."""
    if not isinstance(data, dict):
        raise ValueError(f"{source}: expected a mapping for {cls.__name__}, got {type(data).__name__}")
    names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(
            f"{source}: unknown {cls.__name__} field(s) {unknown}; known fields are {sorted(names)}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for k, v in data.items():
        hint = hints.get(k)
        # JSON has no tuples: turn lists back into tuples where the field is a tuple.
        if isinstance(v, list) and any(get_origin(h) is tuple for h in (hint, *get_args(hint))):
            v = tuple(v)
        # Checked here too (not only in __post_init__), so that the message names the file and key even
        # for a value the constructor would choke on before validating.
        if hint is not None and not _matches(v, hint):
            raise ValueError(f"{source}: {k} = {v!r} ({type(v).__name__}) must be {_type_name(hint)}"
                             + (" (write true or false without quotes)" if hint is bool and isinstance(v, str)
                                else ""))
        kwargs[k] = v
    try:
        return cls(**kwargs)
    except ValueError as e:
        if str(e).startswith(f"{source}:"):
            raise
        raise ValueError(f"{source}: {e}") from None


def config_to_dict(obj: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config dataclass (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(obj)))


def _arg_type(hint: Any) -> tuple[Any, dict[str, Any]]:
    """argparse `type=` and extra kwargs for one dataclass field type."""
    origin = get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in get_args(hint) if a is not type(None)]
        if len(inner) == 1:
            return _arg_type(inner[0])
        return str, {}
    if origin is Literal:
        choices = get_args(hint)
        return type(choices[0]), {"choices": list(choices)}
    if origin is tuple:
        elem = get_args(hint)[0] if get_args(hint) else str
        return elem, {"nargs": "*"}
    if hint is bool:
        return parse_bool, {"metavar": "{true,false}"}
    if hint in (int, float, str):
        return hint, {}
    return str, {}


def parse_bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_dataclass_args(
    parser: argparse.ArgumentParser, cls: type, *, prefix: str = "", skip: tuple[str, ...] = ()
) -> None:
    """Add one `--flag` per field of dataclass `cls`; defaults stay None so the dataclass owns them."""
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(cls.__name__)
    for f in fields(cls):
        if f.name in skip or f.name.startswith("_"):
            continue
        typ, extra = _arg_type(hints[f.name])
        default = field_default(f)
        help_text = f.metadata.get("help", "")
        flag, dest = f"--{prefix}{f.name.replace('_', '-')}", f"{prefix.replace('-', '_')}{f.name}"
        if typ is parse_bool:
            # One style for every boolean: `--x` alone means true, `--x false` still works, `--no-x` is false.
            extra.update(nargs="?", const=True)
        group.add_argument(flag, dest=dest, type=typ, default=None, help=f"{help_text} (default: {default!r})".strip(),
                           **extra)
        if typ is parse_bool:
            group.add_argument(f"--{prefix}no-{f.name.replace('_', '-')}", dest=dest, action="store_const",
                               const=False, help=f"the same as {flag} false")


def field_default(f: dataclasses.Field) -> Any:
    """A dataclass field's default value (calling its default_factory), or None when it has none."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def overrides_from_args(args: argparse.Namespace, cls: type, *, prefix: str = "") -> dict[str, Any]:
    """The fields of `cls` the user actually set on the command line."""
    out = {}
    for f in fields(cls):
        value = getattr(args, f"{prefix.replace('-', '_')}{f.name}", None)
        if value is not None:
            out[f.name] = tuple(value) if isinstance(value, list) else value
    return out


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------

# The Llama / Qwen blocks: pre-RMSNorm, rotary positions, SwiGLU MLP, grouped-query attention, no dropout.
_LLAMA_BLOCK: dict[str, Any] = dict(
    pos_encoding="rope", norm="rmsnorm", activation="swiglu", bias=False,
    embd_pdrop=0.0, resid_pdrop=0.0, attn_pdrop=0.0,
)
# Llama 3.2's config.json: rope_theta 500000 with "llama3" frequency scaling, rms_norm_eps 1e-5.
_LLAMA_32: dict[str, Any] = dict(
    _LLAMA_BLOCK, vocab_size=128256, n_positions=131072, rope_theta=500000.0, rope_scaling_factor=32.0,
    rope_low_freq_factor=1.0, rope_high_freq_factor=4.0, rope_original_n_positions=8192,
    layer_norm_epsilon=1e-5, tie_word_embeddings=True,
)
# Qwen3's config.json: head_dim 128 whatever the width, QK-norm, rope_theta 1e6, rms_norm_eps 1e-6.
_QWEN3: dict[str, Any] = dict(
    _LLAMA_BLOCK, vocab_size=151936, n_positions=40960, head_dim=128, qk_norm=True, rope_theta=1000000.0,
    layer_norm_epsilon=1e-6, tie_word_embeddings=True,
)

_PRESETS: dict[str, dict[str, Any]] = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),
    "llama-3.2-1b": dict(_LLAMA_32, n_layer=16, n_head=32, n_kv_head=8, n_embd=2048, n_inner=8192),
    "llama-3.2-3b": dict(_LLAMA_32, n_layer=28, n_head=24, n_kv_head=8, n_embd=3072, n_inner=8192),
    "qwen3-0.6b": dict(_QWEN3, n_layer=28, n_head=16, n_kv_head=8, n_embd=1024, n_inner=3072),
    "qwen3-1.7b": dict(_QWEN3, n_layer=28, n_head=16, n_kv_head=8, n_embd=2048, n_inner=6144),
}


@dataclass
class GPTConfig:
    """GPT-2 hyper-parameters, under GPT-2's own field names (so HF config.json maps 1:1)."""

    vocab_size: int = field(default=50257, metadata={"help": "tokens in the vocabulary"})
    n_positions: int = field(default=1024, metadata={"help": "context length in tokens"})
    n_embd: int = field(default=768, metadata={"help": "embedding width C"})
    n_layer: int = field(default=12, metadata={"help": "transformer blocks"})
    n_head: int = field(default=12, metadata={"help": "attention heads (must divide n_embd)"})
    embd_pdrop: float = field(default=0.1, metadata={"help": "dropout after the embeddings"})
    resid_pdrop: float = field(default=0.1, metadata={"help": "dropout on each residual branch"})
    attn_pdrop: float = field(default=0.1, metadata={"help": "dropout on attention weights"})
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    bias: bool = field(default=True, metadata={"help": "biases in Linear layers and LayerNorms"})
    tie_word_embeddings: bool = field(default=True, metadata={"help": "share wte with lm_head"})
    pos_encoding: Literal["learned", "sinusoidal", "rope"] = field(
        default="learned", metadata={"help": "learned table (GPT-2), fixed sin/cos, or rotary (Llama, Qwen)"}
    )
    activation: Literal["gelu", "gelu_exact", "relu", "relu2", "swiglu"] = field(
        default="gelu", metadata={"help": "MLP non-linearity: gelu (GPT-2's tanh approximation), gelu_exact (erf, "
                                          "nanoGPT's nn.GELU), relu, relu2 (relu²), swiglu (Llama, Qwen)"}
    )
    # -- the Llama / Qwen family (defaults keep GPT-2; see the README's family table) --------------
    norm: Literal["layernorm", "rmsnorm"] = field(
        default="layernorm", metadata={"help": "layernorm (GPT-2) or rmsnorm (Llama, Qwen); eps = layer_norm_epsilon"}
    )
    n_inner: int | None = field(default=None, metadata={"help": "MLP hidden size (default: 4 * n_embd)"})
    n_kv_head: int | None = field(
        default=None, metadata={"help": "key/value heads for grouped-query attention (default: n_head)"}
    )
    head_dim: int | None = field(default=None, metadata={"help": "width of one head (default: n_embd // n_head)"})
    qkv_bias: bool | None = field(
        default=None, metadata={"help": "biases on the q/k/v projection (default: follow bias; Qwen2: true)"}
    )
    qk_norm: bool = field(default=False, metadata={"help": "RMSNorm each query and key head before RoPE (Qwen3)"})
    rope_theta: float = field(default=10000.0, metadata={"help": "RoPE base: larger = slower-turning angles"})
    rope_scaling_factor: float | None = field(
        default=None, metadata={"help": "Llama 3 RoPE frequency scaling factor (default: no scaling)"}
    )
    rope_low_freq_factor: float = field(default=1.0, metadata={"help": "Llama 3 RoPE scaling: low_freq_factor"})
    rope_high_freq_factor: float = field(default=4.0, metadata={"help": "Llama 3 RoPE scaling: high_freq_factor"})
    rope_original_n_positions: int = field(
        default=8192, metadata={"help": "Llama 3 RoPE scaling: original_max_position_embeddings"}
    )
    logit_softcap: float | None = field(default=None, metadata={"help": "cap logits to ±c via c·tanh(x/c)"})
    zero_init: bool = field(
        default=False, metadata={"help": "start attn.c_proj, mlp.c_proj and an untied lm_head at zero"}
    )

    def __post_init__(self) -> None:
        name = type(self).__name__
        _validate_fields(self)
        for attr in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            value = getattr(self, attr)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}.{attr}={value!r} must be a positive integer")
        if self.head_dim is None and self.n_embd % self.n_head != 0:
            raise ValueError(
                f"{name}.n_embd={self.n_embd} is not divisible by n_head={self.n_head}; "
                f"choose n_head among the divisors of n_embd"
            )
        for attr in ("embd_pdrop", "resid_pdrop", "attn_pdrop"):
            _check_range(name, attr, getattr(self, attr), lo=0.0, hi=1.0, hi_open=True)
        _check_range(name, "layer_norm_epsilon", self.layer_norm_epsilon, lo=0.0, lo_open=True)
        _check_range(name, "initializer_range", self.initializer_range, lo=0.0, lo_open=True)
        if self.pos_encoding == "sinusoidal" and self.n_embd % 2:
            raise ValueError(f"{name}.n_embd={self.n_embd} must be even for sinusoidal positions")
        for attr in ("n_inner", "n_kv_head", "head_dim", "rope_original_n_positions"):
            value = getattr(self, attr)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name}.{attr}={value!r} must be a positive integer (or unset for the default)")
        if self.n_head % self.kv_heads:
            raise ValueError(
                f"{name}.n_kv_head={self.n_kv_head} does not divide n_head={self.n_head}; each key/value head "
                f"serves a whole group of query heads, so choose a divisor of n_head"
            )
        if self.pos_encoding == "rope" and self.head_size % 2:
            raise ValueError(f"{name}: RoPE rotates channel pairs, so the head size ({self.head_size}) must be even")
        _check_range(name, "rope_theta", self.rope_theta, lo=0.0, lo_open=True)
        if self.rope_scaling_factor is not None:
            _check_range(name, "rope_scaling_factor", self.rope_scaling_factor, lo=0.0, lo_open=True)
            _check_range(name, "rope_low_freq_factor", self.rope_low_freq_factor, lo=0.0, lo_open=True)
            if self.rope_high_freq_factor <= self.rope_low_freq_factor:
                raise ValueError(f"{name}.rope_high_freq_factor={self.rope_high_freq_factor} must exceed "
                                 f"rope_low_freq_factor={self.rope_low_freq_factor}")
        if self.logit_softcap is not None:
            _check_range(name, "logit_softcap", self.logit_softcap, lo=0.0, lo_open=True)

    @property
    def head_size(self) -> int:
        return self.head_dim if self.head_dim is not None else self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        """Key/value heads: n_kv_head, or n_head when unset (plain multi-head attention)."""
        return self.n_kv_head if self.n_kv_head is not None else self.n_head

    @property
    def mlp_hidden(self) -> int:
        """The MLP's hidden width: n_inner, or 4 * n_embd when unset."""
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    @property
    def attn_bias(self) -> bool:
        """Whether the fused q/k/v projection has biases: qkv_bias, or `bias` when unset."""
        return self.bias if self.qkv_bias is None else self.qkv_bias

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> GPTConfig:
        """A preset (GPT-2 sizes, llama-3.2-1b/3b, qwen3-0.6b/1.7b) with optional overrides."""
        if name not in _PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of {list(_PRESETS)}")
        return cls(**{**_PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> GPTConfig:
        return config_from_dict(cls, data, source=source)

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)


PRESET_NAMES: tuple[str, ...] = tuple(_PRESETS)


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------

# Temperature has one rule for every way in (Python, the CLI, HTTP, training samples, the book's generate):
# checked by `check_temperature`, read as greedy by `is_greedy`, nowhere else.
# OpenAI's range: above 2 every model's text is noise, and HTTP clients expect 2 to be the limit.
MAX_TEMPERATURE = 2.0
# Below 1e-4 two logits 0.01 apart already differ e^100-fold in probability, and tiny values overflow
# logits / T to inf: such a temperature is greedy in all but name, so it decodes greedily, exactly.
GREEDY_BELOW = 1e-4


def check_temperature(cls_name: str, name: str, value: float) -> None:
    """Raise ValueError (naming `cls_name.name`) unless `value` is a finite temperature in [0, MAX_TEMPERATURE]."""
    _check_range(cls_name, name, value, lo=0.0, hi=MAX_TEMPERATURE)


def is_greedy(temperature: float) -> bool:
    """Whether `temperature` means greedy decoding (argmax): 0, or anything below GREEDY_BELOW."""
    return temperature < GREEDY_BELOW


@dataclass(frozen=True)
class SamplingConfig:
    """How to pick each next token. temperature 0 (or below 1e-4) means greedy."""

    max_new_tokens: int = field(default=100, metadata={"help": "tokens to generate at most"})
    temperature: float = field(
        default=1.0, metadata={"help": "0 to 2; 0 (or below 1e-4) = greedy; >1 flatter, <1 sharper"}
    )
    top_k: int | None = field(default=None, metadata={"help": "keep only the k most likely tokens"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus: smallest set with mass >= top_p"})
    min_p: float = field(default=0.0, metadata={"help": "drop tokens below min_p * max probability"})
    repetition_penalty: float = field(
        default=1.0, metadata={"help": ">1 discourages tokens already in the prompt or output"}
    )
    stop: tuple[str, ...] = field(default=(), metadata={"help": "stop strings (not included in output)"})
    stop_at_eot: bool = field(default=True, metadata={"help": "stop at the end-of-text token"})
    seed: int | None = field(default=None, metadata={"help": "seed for reproducible sampling"})

    def __post_init__(self) -> None:
        name = type(self).__name__
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif isinstance(self.stop, (list, tuple)):
            object.__setattr__(self, "stop", tuple(self.stop))
        _validate_fields(self)
        if self.max_new_tokens < 0:
            raise ValueError(f"{name}.max_new_tokens={self.max_new_tokens!r} must be an integer >= 0")
        check_temperature(name, "temperature", self.temperature)
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"{name}.top_k={self.top_k!r} must be None or an integer >= 1")
        _check_range(name, "top_p", self.top_p, lo=0.0, hi=1.0, lo_open=True)
        _check_range(name, "min_p", self.min_p, lo=0.0, hi=1.0)
        _check_range(name, "repetition_penalty", self.repetition_penalty, lo=0.0, lo_open=True)
        if any(not s for s in self.stop):
            raise ValueError(f"{name}.stop must hold non-empty strings, got {self.stop!r}")

    @property
    def greedy(self) -> bool:
        return is_greedy(self.temperature)


# ---------------------------------------------------------------------------------------------
# Data, training and the run that bundles them (one TOML file: [model], [data], [train])
# ---------------------------------------------------------------------------------------------


@dataclass
class DataConfig:
    """Where the token files come from (`prepare`) and how training windows are drawn from them."""

    dir: str = field(default="", metadata={"help": "prepared folder: train.bin, val.bin, meta.json, tokenizer"})
    source: str = field(default="", metadata={"help": "what `prepare` reads: a text, JSONL, Parquet or Arrow file "
                                                      "(text and JSONL also .gz/.zst/.xz), a folder of them, a "
                                                      "datasets save_to_disk folder, or a glob"})
    text_field: str = field(default="text", metadata={"help": "prepare: the field (JSONL) or column (Parquet, Arrow) "
                                                              "holding each record's text; a dotted path reaches "
                                                              "into nested objects"})
    tokenizer: Literal["gpt2", "bpe", "char"] = field(
        default="gpt2", metadata={"help": "gpt2 BPE, a byte-level BPE trained on the corpus, or characters"}
    )
    bpe_vocab_size: int = field(default=4096, metadata={"help": "vocabulary of a trained 'bpe' tokenizer"})
    val_fraction: float = field(default=0.1, metadata={"help": "share of the corpus held out for validation"})
    split_by: Literal["chars", "documents"] = field(
        default="chars", metadata={"help": "chars: each document's last val_fraction goes to val (nanoGPT's "
                                           "split); documents: whole files, spread evenly (many-file corpora)"}
    )
    errors: Literal["strict", "replace"] = field(
        default="strict", metadata={"help": "non-UTF-8 bytes: fail naming the offset, or replace with U+FFFD"}
    )
    workers: int = field(default=0, metadata={"help": "processes for tokenizing (0 = one per core)"})
    shard_tokens: int = field(default=0, metadata={"help": "prepare: write each split as shards of this many "
                                                           "tokens, train-00000.bin, ... (0 = one file)"})
    block_size: int | None = field(default=None, metadata={"help": "tokens per window (default: n_positions)"})
    sampler: Literal["random", "sequential"] = field(
        default="random", metadata={"help": "random windows, or every window once per epoch (sliding, strided)"}
    )
    stride: int | None = field(default=None, metadata={"help": "sequential sampler step (default: block_size)"})
    shuffle: bool = field(default=True, metadata={"help": "sequential sampler: shuffle window order per epoch"})

    def __post_init__(self) -> None:
        name = type(self).__name__
        _validate_fields(self)
        _check_range(name, "val_fraction", self.val_fraction, lo=0.0, hi=1.0, hi_open=True)
        for attr in ("bpe_vocab_size", "workers", "shard_tokens", "block_size", "stride"):
            value = getattr(self, attr)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise ValueError(f"{name}.{attr}={value!r} must be a non-negative integer")
        for attr in ("block_size", "stride"):
            if getattr(self, attr) == 0:
                raise ValueError(f"{name}.{attr}=0 must be at least 1 (or unset for the default)")
        if not self.text_field:
            raise ValueError(f"{name}.text_field must name a field, e.g. 'text'")
        if self.bpe_vocab_size < 257:
            raise ValueError(f"{name}.bpe_vocab_size={self.bpe_vocab_size} must be >= 257 (256 bytes + end-of-text)")


@dataclass
class TrainConfig:
    """The training loop's knobs: optimisation, schedule, evaluation, logging, checkpoints, hardware."""

    # Fine-tuning's train configs leave max_steps unset until the data's size is known (see FinetuneTrainConfig).
    steps_from_epochs: ClassVar[bool] = False

    out_dir: str = field(default="runs/default", metadata={"help": "run directory: checkpoints, log.csv, plot"})
    init_from: str = field(
        default="scratch", metadata={"help": "'scratch', a run directory, or a Hugging Face GPT-2 dir/name"}
    )
    resume: bool = field(default=False, metadata={"help": "continue the run in out_dir from its latest checkpoint"})
    overwrite: bool = field(
        default=False, metadata={"help": "start afresh in an out_dir that already holds a model or run: its "
                                         "checkpoints, best/ and log.csv are deleted first"}
    )
    max_steps: int = field(default=5000, metadata={"help": "optimizer steps to train for"})
    batch_size: int = field(default=12, metadata={"help": "sequences per micro-batch, per process"})
    grad_accum_steps: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    lr: float = field(default=6e-4, metadata={"help": "peak learning rate"})
    min_lr: float | None = field(default=None, metadata={"help": "cosine floor (default: lr / 10)"})
    warmup_steps: int = field(default=100, metadata={"help": "linear warmup steps"})
    lr_decay_steps: int | None = field(
        default=None, metadata={"help": "step at which the cosine reaches min_lr (default: max_steps)"}
    )
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW decay, applied to >=2-D tensors only"})
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = field(default=1.0, metadata={"help": "max global grad norm (0 = off)"})
    # Optimizer and schedule choices (training/optim.py): Muon for hidden matrices + AdamW for the rest.
    optimizer: Literal["adamw", "muon"] = field(
        default="adamw", metadata={"help": "adamw for everything, or muon for hidden 2-D matrices + AdamW for "
                                           "embeddings, head and 1-D tensors (lr)"}
    )
    muon_lr: float = field(default=0.02, metadata={"help": "Muon's peak learning rate (optimizer=muon)"})
    muon_momentum: float = field(default=0.95, metadata={"help": "Muon's (Nesterov) momentum"})
    muon_weight_decay: float = field(default=0.0, metadata={"help": "Muon's decoupled weight decay"})
    muon_ns_steps: int = field(default=5, metadata={"help": "Newton-Schulz iterations per Muon update"})
    ns_dtype: Literal["auto", "float32", "bfloat16"] = field(
        default="auto", metadata={"help": "Newton-Schulz dtype; auto = bfloat16 where the device has native "
                                          "bf16, float32 elsewhere"}
    )
    embed_lr: float | None = field(default=None, metadata={"help": "AdamW lr of embeddings under muon (default: lr)"})
    head_lr: float | None = field(default=None, metadata={"help": "AdamW lr of the output head under muon "
                                                                  "(default: lr)"})
    adam_eps: float = field(default=1e-8, metadata={"help": "AdamW epsilon"})
    schedule: Literal["cosine", "warmdown"] = field(
        default="cosine", metadata={"help": "cosine: warmup then cosine to min_lr; warmdown: warmup, constant, "
                                            "then linear to min_lr over the last warmdown_fraction of the steps"}
    )
    warmdown_fraction: float = field(default=0.5, metadata={"help": "share of the steps the warmdown takes"})
    eval_interval: int = field(default=250, metadata={"help": "evaluate every N steps (0 = only at the end)"})
    eval_steps: int = field(default=20, metadata={"help": "batches per split in each evaluation"})
    log_interval: int = field(default=10, metadata={"help": "write a log.csv row every N steps"})
    checkpoint_interval: int = field(default=500, metadata={"help": "checkpoint every N steps (0 = only at the end)"})
    keep_last: int = field(default=2, metadata={"help": "step checkpoints kept (the best by val loss is kept too)"})
    sample_interval: int = field(default=0, metadata={"help": "print a sample every N steps (0 = never)"})
    sample_prompt: str = field(default="\n", metadata={"help": "prompt for the periodic samples"})
    sample_tokens: int = field(default=200, metadata={"help": "tokens per periodic sample"})
    sample_temperature: float = 0.8
    sample_top_k: int | None = 200
    seed: int = field(default=1337, metadata={"help": "seeds init, data order, dropout and samples"})
    device: str = field(default="auto", metadata={"help": "'auto' (cuda if present), 'cpu', 'cuda', 'cuda:1', 'mps'"})
    dtype: Literal["auto", "float32", "bfloat16", "float16", "bf16-true"] = field(
        default="auto", metadata={"help": "autocast dtype; auto = bfloat16 on CUDA and on CPUs with native bf16 "
                                          "(AVX512_BF16/AMX), float32 elsewhere; bf16-true = weights, gradients "
                                          "and AdamW state in bfloat16 too (Kahan-compensated updates)"}
    )
    attn_impl: Literal["auto", "eager", "sdpa"] = field(
        default="auto", metadata={"help": "attention path; auto = sdpa (measured faster for training on CPU and GPU)"}
    )
    compile: bool = field(default=False, metadata={"help": "torch.compile the model"})
    activation_checkpointing: bool = field(
        default=False, metadata={"help": "recompute each block's activations in the backward pass instead of "
                                         "keeping them: less memory, one more forward; same loss and gradients"}
    )
    fused_adamw: bool = field(default=True, metadata={"help": "fused AdamW kernel where PyTorch has one"})
    num_threads: int = field(default=0, metadata={"help": "torch CPU threads (0 = PyTorch's default)"})
    fsdp: bool = field(default=False, metadata={"help": "shard with FSDP instead of DDP under torchrun"})
    progress: bool = field(default=True, metadata={"help": "tqdm progress bar"})
    plot: bool = field(default=True, metadata={"help": "write loss.png (needs matplotlib)"})

    def __post_init__(self) -> None:
        name = type(self).__name__
        _validate_fields(self)
        for attr in ("max_steps", "batch_size", "grad_accum_steps", "eval_steps", "log_interval", "keep_last"):
            value = getattr(self, attr)
            if attr == "max_steps" and value is None and self.steps_from_epochs:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}.{attr}={value!r} must be a positive integer")
        for attr in ("warmup_steps", "eval_interval", "checkpoint_interval", "sample_interval", "sample_tokens",
                     "num_threads"):
            value = getattr(self, attr)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name}.{attr}={value!r} must be a non-negative integer")
        if self.lr_decay_steps is not None and self.lr_decay_steps < 1:
            raise ValueError(f"{name}.lr_decay_steps={self.lr_decay_steps!r} must be >= 1 (or unset)")
        _check_range(name, "lr", self.lr, lo=0.0, lo_open=True)
        if self.min_lr is not None:
            _check_range(name, "min_lr", self.min_lr, lo=0.0, hi=self.lr)
        _check_range(name, "weight_decay", self.weight_decay, lo=0.0)
        _check_range(name, "beta1", self.beta1, lo=0.0, hi=1.0, hi_open=True)
        _check_range(name, "beta2", self.beta2, lo=0.0, hi=1.0, hi_open=True)
        _check_range(name, "grad_clip", self.grad_clip, lo=0.0)
        for attr in ("muon_lr", "adam_eps", "embed_lr", "head_lr"):
            if getattr(self, attr) is not None:
                _check_range(name, attr, getattr(self, attr), lo=0.0, lo_open=True)
        _check_range(name, "muon_momentum", self.muon_momentum, lo=0.0, hi=1.0, hi_open=True)
        _check_range(name, "muon_weight_decay", self.muon_weight_decay, lo=0.0)
        if not isinstance(self.muon_ns_steps, int) or isinstance(self.muon_ns_steps, bool) or \
                not 1 <= self.muon_ns_steps < 100:
            raise ValueError(f"{name}.muon_ns_steps={self.muon_ns_steps!r} must be an integer in [1, 99]")
        _check_range(name, "warmdown_fraction", self.warmdown_fraction, lo=0.0, hi=1.0, lo_open=True)
        if self.optimizer == "muon" and self.dtype == "bf16-true":
            raise ValueError(f"{name}: dtype='bf16-true' trains with AdamW only (its updates are compensated for "
                             f"bf16 rounding; Muon's are not); use optimizer='adamw' or another dtype")
        if self.optimizer == "muon" and self.fsdp:
            raise ValueError(f"{name}: optimizer='muon' does not work with fsdp=true (Newton-Schulz needs whole "
                             f"matrices, FSDP shards them); use DDP (fsdp=false) or optimizer='adamw'")
        check_temperature(name, "sample_temperature", self.sample_temperature)
        if not self.out_dir:
            raise ValueError(f"{name}.out_dir must name a directory")

    @property
    def floor_lr(self) -> float:
        """The cosine schedule's floor: min_lr, or lr / 10 when unset."""
        return self.lr / 10 if self.min_lr is None else self.min_lr

    @property
    def decay_steps(self) -> int:
        """The step at which the cosine reaches its floor."""
        if self.max_steps is None:
            raise ValueError("max_steps is unset: resolve it from the epochs first")
        return self.max_steps if self.lr_decay_steps is None else self.lr_decay_steps


RUN_SECTIONS: dict[str, type] = {"model": GPTConfig, "data": DataConfig, "train": TrainConfig}


@dataclass
class RunConfig:
    """A whole run: the model, its data and its training, as one TOML file has them."""

    model: GPTConfig = field(default_factory=GPTConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> RunConfig:
        """Build from {"model": {...}, "data": {...}, "train": {...}}; unknown sections or keys are errors."""
        if not isinstance(data, dict):
            raise ValueError(f"{source}: expected a table with [model], [data], [train] sections")
        unknown = sorted(set(data) - set(RUN_SECTIONS))
        if unknown:
            raise ValueError(f"{source}: unknown section(s) {unknown}; a run has {list(RUN_SECTIONS)}")
        parts = {
            k: config_from_dict(cls_, data.get(k, {}), source=f"{source} [{k}]") for k, cls_ in RUN_SECTIONS.items()
        }
        return cls(**parts)

    def to_dict(self) -> dict[str, Any]:
        return {k: config_to_dict(getattr(self, k)) for k in RUN_SECTIONS}


def read_toml(path: str | Path) -> dict[str, Any]:
    """Parse a TOML file (tomllib; tomli on Python 3.10 when installed) with one-line errors."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ImportError:
            raise ValueError(f"{path}: reading TOML on Python 3.10 needs `pip install tomli`") from None
    path = Path(path)
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: config file not found") from None
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: invalid TOML ({e})") from None


def merge_run_dicts(*layers: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Later layers override earlier ones, field by field within each section."""
    out: dict[str, dict[str, Any]] = {}
    for layer in layers:
        for section, values in layer.items():
            if not isinstance(values, dict):
                raise ValueError(f"[{section}] must be a table of fields, got {type(values).__name__}")
            out.setdefault(section, {}).update(values)
    return out


# ---------------------------------------------------------------------------------------------
# Fine-tuning: LoRA adapters and the three modes (classify, instruct, dpo)
# ---------------------------------------------------------------------------------------------

# Linear layers LoRA can adapt, as module-name suffixes ("c_proj" alone matches both c_proj layers).
LORA_TARGETS: tuple[str, ...] = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj", "lm_head")
Trainable = Literal["all", "last-block", "head", "lora"]


@dataclass
class LoRAConfig:
    """Low-rank adapters: which Linear layers get them, their rank, scaling (alpha / rank) and dropout."""

    rank: int = field(default=8, metadata={"help": "rank r of each update B·A"})
    alpha: float = field(default=16.0, metadata={"help": "the update is scaled by alpha / rank"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the adapter's input"})
    targets: tuple[str, ...] = field(
        default=("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"),
        metadata={"help": f"Linear layers to adapt, by name suffix: {', '.join(LORA_TARGETS)}"},
    )

    def __post_init__(self) -> None:
        name = type(self).__name__
        if isinstance(self.targets, (str, list)):
            self.targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        _validate_fields(self)
        if self.rank < 1:
            raise ValueError(f"{name}.rank={self.rank!r} must be a positive integer")
        _check_range(name, "alpha", self.alpha, lo=0.0, lo_open=True)
        _check_range(name, "dropout", self.dropout, lo=0.0, hi=1.0, hi_open=True)
        if not self.targets or any(not isinstance(t, str) or not t for t in self.targets):
            raise ValueError(f"{name}.targets={self.targets!r} must name at least one layer, e.g. {LORA_TARGETS}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


def _check_split(name: str, split: tuple[float, ...]) -> None:
    if len(split) != 3 or any(not isinstance(f, (int, float)) or f < 0 for f in split):
        raise ValueError(f"{name}.split={split!r} must be three fractions >= 0: train, val, test")
    if split[0] <= 0 or sum(split) > 1 + 1e-9:
        raise ValueError(f"{name}.split={split!r}: the train fraction must be > 0 and the three must sum to <= 1")


@dataclass
class FinetuneTrainConfig(TrainConfig):
    """TrainConfig with fine-tuning's defaults: it starts from trained weights, so a small learning rate,
    no warmup, a few epochs (max_steps follows from the mode's `epochs` unless set), frequent evaluation and
    one final checkpoint. The values follow the textbook's chapters 6 and 7 and its DPO notebook."""

    steps_from_epochs: ClassVar[bool] = True

    out_dir: str = field(default="runs/finetune", metadata={"help": "run directory: model, log.csv, metrics"})
    max_steps: int | None = field(
        default=None, metadata={"help": "optimizer steps (default: epochs over the training split)"}
    )
    batch_size: int = field(default=8, metadata={"help": "examples per micro-batch, per process"})
    lr: float = field(default=5e-5, metadata={"help": "peak learning rate"})
    warmup_steps: int = field(default=0, metadata={"help": "linear warmup steps"})
    eval_interval: int = field(default=50, metadata={"help": "evaluate every N steps (0 = only at the end)"})
    eval_steps: int = field(default=5, metadata={"help": "batches per split in each evaluation"})
    log_interval: int = field(default=5, metadata={"help": "write a log.csv row every N steps"})
    checkpoint_interval: int = field(default=0, metadata={"help": "checkpoint every N steps (0 = only at the end)"})


@dataclass
class ClassifyTrainConfig(FinetuneTrainConfig):
    """Classification fine-tuning's training defaults."""

    out_dir: str = field(default="runs/finetune-classify", metadata={"help": "run directory: model, log.csv, metrics"})


@dataclass
class InstructTrainConfig(FinetuneTrainConfig):
    """Instruction tuning's training defaults."""

    out_dir: str = field(default="runs/finetune-instruct", metadata={"help": "run directory: model, log.csv, metrics"})


@dataclass
class DPOTrainConfig(FinetuneTrainConfig):
    """DPO's training defaults: a tenth of SFT's learning rate, light decay, evaluation twice as often."""

    out_dir: str = field(default="runs/finetune-dpo", metadata={"help": "run directory: model, log.csv, metrics"})
    lr: float = field(default=5e-6, metadata={"help": "peak learning rate"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW decay, applied to >=2-D tensors only"})
    eval_interval: int = field(default=25, metadata={"help": "evaluate every N steps (0 = only at the end)"})


@dataclass
class FinetuneConfig:
    """What every fine-tuning mode shares: the data, its split, sequence limits and what trains.

    Each mode's subclass carries its own defaults: `train_config` (its TrainConfig class, whose field
    defaults are the mode's), `default_trainable` and the `epochs` default.
    """

    train_config: ClassVar[type[FinetuneTrainConfig]] = FinetuneTrainConfig
    default_trainable: ClassVar[Trainable] = "all"

    data: str = field(default="", metadata={"help": "the data file"})
    init: str = field(
        default="scratch",
        metadata={"help": "starting model: a run directory, a Hugging Face GPT-2 directory or hub name "
                          "(gpt2), or 'scratch' (random weights shaped by the model flags)"},
    )
    tokenizer: Literal["auto", "gpt2", "char"] = field(
        default="auto",
        metadata={"help": "auto = the checkpoint's (GPT-2 for scratch); a different kind than the checkpoint's "
                          "is an error"},
    )
    split: tuple[float, ...] = field(
        default=(0.85, 0.10, 0.05), metadata={"help": "train, val and test fractions (0 = no such split)"}
    )
    split_shuffle: bool = field(default=True, metadata={"help": "shuffle the entries before splitting"})
    split_seed: int = field(default=123, metadata={"help": "seed of the split (and of balancing)"})
    max_length: int | None = field(
        default=None, metadata={"help": "tokens per training sequence (default: the model's context)"}
    )
    too_long: Literal["truncate", "drop", "error"] = field(
        default="truncate", metadata={"help": "an entry longer than max_length: cut its end, skip it, or fail"}
    )
    trainable: Trainable | None = field(
        default=None,
        metadata={"help": "weights that train: all, last-block (+ final norm + head), head, or lora "
                          "(None: lora when a --lora-* flag is given, else the mode's: last-block for classify, "
                          "all for instruct and dpo)"},
    )
    dropout: float | None = field(default=None, metadata={"help": "set every dropout rate (default: the model's)"})
    epochs: float = field(default=1.0, metadata={"help": "passes over the training split (unless max_steps is set)"})

    def __post_init__(self) -> None:
        name = type(self).__name__
        _validate_fields(self)
        self.split = tuple(self.split)
        _check_split(name, self.split)
        if self.trainable is not None:
            _check_choice(name, "trainable", self.trainable, get_args(Trainable))
        if self.max_length is not None and (not isinstance(self.max_length, int) or self.max_length < 2):
            raise ValueError(f"{name}.max_length={self.max_length!r} must be an integer >= 2 (or unset)")
        if self.dropout is not None:
            _check_range(name, "dropout", self.dropout, lo=0.0, hi=1.0, hi_open=True)
        _check_range(name, "epochs", self.epochs, lo=0.0, lo_open=True)


@dataclass
class ClassifyConfig(FinetuneConfig):
    """Text classification: (text, label) rows, a Linear(C, classes) head on the last real token."""

    train_config: ClassVar[type[FinetuneTrainConfig]] = ClassifyTrainConfig
    default_trainable: ClassVar[Trainable] = "last-block"

    epochs: float = field(default=5.0, metadata={"help": "passes over the training split (unless max_steps is set)"})

    split: tuple[float, ...] = field(
        default=(0.7, 0.1, 0.2), metadata={"help": "train, val and test fractions (0 = no such split)"}
    )
    format: Literal["auto", "tsv", "csv", "jsonl", "json"] = field(
        default="auto",
        metadata={"help": "auto: by extension (.csv, .jsonl, .json; anything else is TSV). Headerless TSV "
                          "is label<TAB>text, split on the first tab"},
    )
    text_field: str = field(default="text", metadata={"help": "column / key holding the text"})
    label_field: str = field(default="label", metadata={"help": "column / key holding the label"})
    labels: tuple[str, ...] = field(default=(), metadata={"help": "label names in class-id order (default: sorted)"})
    balance: bool = field(default=False, metadata={"help": "undersample every class to the rarest one's count"})


@dataclass
class InstructConfig(FinetuneConfig):
    """Instruction tuning: Alpaca-style entries rendered with a chat template, loss on the response."""

    train_config: ClassVar[type[FinetuneTrainConfig]] = InstructTrainConfig

    epochs: float = field(default=2.0, metadata={"help": "passes over the training split (unless max_steps is set)"})

    template: Literal["auto", "alpaca", "chatml", "tokenizer"] = field(
        default="auto", metadata={"help": "prompt template; tokenizer: the model's own Jinja chat template (auto: "
                                          "the checkpoint's chat_template, else its tokenizer's, else alpaca)"}
    )
    mask_prompt: bool = field(default=True, metadata={"help": "leave the prompt's tokens out of the loss"})
    response_tokens: int = field(
        default=256, metadata={"help": "max new tokens per test response (0 = skip test_responses.json)"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.response_tokens, int) or self.response_tokens < 0:
            raise ValueError(f"InstructConfig.response_tokens={self.response_tokens!r} must be an integer >= 0")


@dataclass
class DPOConfig(FinetuneConfig):
    """Direct preference optimisation on (prompt, chosen, rejected) against a frozen reference."""

    train_config: ClassVar[type[FinetuneTrainConfig]] = DPOTrainConfig

    template: Literal["auto", "alpaca", "chatml", "tokenizer"] = field(
        default="auto", metadata={"help": "prompt template; tokenizer: the model's own Jinja chat template (auto: "
                                          "the checkpoint's chat_template, else its tokenizer's, else alpaca)"}
    )
    beta: float = field(default=0.1, metadata={"help": "strength of the pull away from the reference"})
    # Dropout would make the policy's log-ratios against the (dropout-free) reference noisy from step 0.
    dropout: float | None = field(default=0.0, metadata={"help": "set every dropout rate (None: the model's)"})
    logp: Literal["sum", "mean"] = field(
        default="sum", metadata={"help": "a response's log-probability: sum over its tokens, or their mean"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_range("DPOConfig", "beta", self.beta, lo=0.0, lo_open=True)


# ---------------------------------------------------------------------------------------------
# Commands that run a model: generate
# ---------------------------------------------------------------------------------------------

DEVICE_HELP = "'auto' (cuda if present, else cpu), 'cpu', 'cuda', 'cuda:1', 'mps'"


@dataclass
class GenerateConfig:
    """`scratchgpt generate`: which model, where, and what to print (how to sample is SamplingConfig)."""

    checkpoint: str = field(default="", metadata={"help": "scratchgpt run directory, Hugging Face GPT-2 directory, "
                                                          "or hub name"})
    model: str = field(
        default="", metadata={"help": f"a GPT-2 preset with fresh random weights (instead of --checkpoint): "
                                      f"{', '.join(_PRESETS)}"}
    )
    device: str = field(default="auto", metadata={"help": DEVICE_HELP})
    prompt: str = field(default="", metadata={"help": "text to continue (empty: start from end-of-text)"})
    num_samples: int = field(default=1, metadata={"help": "independent completions to print"})
    stream: bool = field(default=False, metadata={"help": "print text as it is generated"})
    cache: bool = field(default=True, metadata={"help": "KV cache (--no-cache recomputes the whole context per token)"})
    prompt_lookup: int = field(
        default=0, metadata={"help": "greedy only: check up to K tokens copied from earlier context per pass "
                                     "(same output)"}
    )
    gpt2_dir: str = field(default="", metadata={"help": "encoder.json + vocab.bpe for --model presets "
                                                        "(else SCRATCHGPT_GPT2_DIR)"})

    def __post_init__(self) -> None:
        name = type(self).__name__
        _validate_fields(self)
        if self.model and self.model not in _PRESETS:
            raise ValueError(f"{name}.model={self.model!r} is not a preset; choose one of {list(_PRESETS)}")
        if bool(self.checkpoint) == bool(self.model):
            raise ValueError(f"{name}: give exactly one of checkpoint (--checkpoint) and model (--model)")
        if self.num_samples < 1:
            raise ValueError(f"{name}.num_samples={self.num_samples} must be >= 1")
        if self.prompt_lookup < 0:
            raise ValueError(f"{name}.prompt_lookup={self.prompt_lookup} must be >= 0")


# ---------------------------------------------------------------------------------------------
# Evaluation (`scratchgpt eval`): settings every eval shares, then one config per task
# ---------------------------------------------------------------------------------------------


@dataclass
class EvalConfig:
    """Which model is evaluated, on what device, and where the reports go."""

    checkpoint: str = field(
        default="", metadata={"help": "scratchgpt run directory, Hugging Face GPT-2 directory, or hub name"})
    device: str = field(default="auto", metadata={"help": DEVICE_HELP})
    quantize: Literal["int8"] | None = field(
        default=None, metadata={"help": "evaluate with int8 weights (see `generate --quantize`): measures its quality"})
    batch_size: int = field(default=16, metadata={"help": "windows / items scored per forward pass"})
    limit: int | None = field(default=None, metadata={"help": "score only the first N items of a task file"})
    out_dir: str = field(default="eval-reports", metadata={"help": "folder for the JSON and markdown reports"})
    name: str | None = field(default=None, metadata={"help": "report file name (default: task and data file)"})
    overwrite: bool = field(default=False, metadata={"help": "replace reports of the same name in out_dir"})
    progress: bool = field(default=True, metadata={"help": "show progress bars"})

    def __post_init__(self) -> None:
        _check_range("EvalConfig", "batch_size", self.batch_size, lo=1)
        if self.limit is not None:
            _check_range("EvalConfig", "limit", self.limit, lo=1)


@dataclass
class PerplexityEvalConfig:
    """Perplexity and bits per byte with a strided sliding window."""

    data: tuple[str, ...] = field(
        default=(), metadata={"help": "text files, folders of .txt, globs, or prepared folders / .bin token files"})
    context: int | None = field(default=None, metadata={"help": "tokens per window (default: the model's context)"})
    stride: int | None = field(
        default=None, metadata={"help": "new tokens scored per window (default: context = non-overlapping)"})
    prefix_eot: bool = field(
        default=True, metadata={"help": "start each text after <|endoftext|> so its first token is scored too"})

    def __post_init__(self) -> None:
        self.data = (self.data,) if isinstance(self.data, str) else tuple(self.data)
        for name in ("context", "stride"):
            if getattr(self, name) is not None:
                _check_range("PerplexityEvalConfig", name, getattr(self, name), lo=1)


@dataclass
class ChoiceEvalConfig:
    """A multiple-choice log-likelihood task from a JSONL file; field names come from the preset or flags."""

    data: str = field(default="", metadata={"help": "JSONL (or JSON list) task file"})
    preset: Literal["generic", "hellaswag", "arc", "piqa"] = field(
        default="generic", metadata={"help": "field layout: generic = context, choices, label"})
    context_field: str | None = field(default=None, metadata={"help": "field holding the context"})
    choices_field: tuple[str, ...] = field(
        default=(), metadata={"help": "field holding the list of choices, or several fields of one choice each"})
    label_field: str | None = field(default=None, metadata={"help": "field holding the gold index or label"})
    choice_labels_field: str | None = field(
        default=None, metadata={"help": "list of choice names the label is looked up in (ARC: choices.label)"})
    template: str = field(default="{context}", metadata={"help": "context text, e.g. 'Question: {context}\\nAnswer:'"})
    delimiter: str = field(default=" ", metadata={"help": "text between the context and each choice"})

    def __post_init__(self) -> None:
        _validate_literals(self)
        self.choices_field = (self.choices_field,) if isinstance(self.choices_field, str) else tuple(
            self.choices_field)


@dataclass
class ClassifierEvalConfig:
    """A `finetune classify` checkpoint on a labelled file."""

    data: str = field(default="", metadata={"help": "labelled TSV (label<TAB>text), CSV, JSONL or JSON file"})
    format: Literal["auto", "tsv", "csv", "jsonl", "json"] = field(
        default="auto", metadata={"help": "auto: by extension"})
    text_field: str = field(default="text", metadata={"help": "column / key holding the text"})
    label_field: str = field(default="label", metadata={"help": "column / key holding the label"})

    def __post_init__(self) -> None:
        _validate_literals(self)


@dataclass
class JudgeEvalConfig:
    """Answers to held-out instructions, scored 0-100 by a judge behind an OpenAI-compatible endpoint."""

    data: str = field(default="", metadata={"help": "JSON list / JSONL of {instruction, input, output}"})
    judge_url: str = field(
        default="http://127.0.0.1:11434/v1", metadata={"help": "the judge's OpenAI base URL (default: Ollama's)"})
    judge_model: str = field(default="llama3", metadata={"help": "model name sent to the judge"})
    judge_api_key: str | None = field(default=None, metadata={"help": "Bearer key for the judge, if it needs one"})
    chat_template: Literal["auto", "alpaca", "chatml", "tokenizer"] = field(
        default="auto", metadata={"help": "prompt template of the evaluated model (auto: the one it was tuned with, "
                                          "else its tokenizer's own chat template, else alpaca)"})
    max_new_tokens: int = field(default=256, metadata={"help": "longest answer generated"})
    retries: int = field(default=3, metadata={"help": "retries per judge request on connection errors / 5xx"})
    timeout: float = field(default=60.0, metadata={"help": "seconds per judge request"})

    def __post_init__(self) -> None:
        _validate_literals(self)
        _check_range("JudgeEvalConfig", "max_new_tokens", self.max_new_tokens, lo=1)
        _check_range("JudgeEvalConfig", "retries", self.retries, lo=0)
        _check_range("JudgeEvalConfig", "timeout", self.timeout, lo=0.0, lo_open=True)


# Task name (the `scratchgpt eval TASK` subcommand and the suite TOML's table name) -> its config.
EVAL_TASKS: dict[str, type] = {"perplexity": PerplexityEvalConfig, "choice": ChoiceEvalConfig,
                               "classify": ClassifierEvalConfig, "judge": JudgeEvalConfig}


# ---------------------------------------------------------------------------------------------
# Serving (`scratchgpt serve`): here, not in inference/serve.py, so that building the CLI's parser
# imports neither torch nor FastAPI.
# ---------------------------------------------------------------------------------------------

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
API_KEY_ENV = "SCRATCHGPT_API_KEY"


@dataclass(frozen=True)
class ServeLimits:
    """What one server accepts: batch size, queue bound, request size. Validated when built."""

    max_batch_size: int = field(default=16, metadata={"help": "rows (choices) decoded together at most"})
    batch_window_ms: float = field(
        default=5.0, metadata={"help": "how long an idle server waits for requests arriving together"}
    )
    max_requests: int = field(
        default=64, metadata={"help": "requests queued or running at once; more are refused with 503"}
    )
    max_choices: int = field(default=16, metadata={"help": "choices per request (n x prompts) at most"})
    max_body_bytes: int = field(default=1_000_000, metadata={"help": "largest request body accepted"})
    read_timeout_s: float = field(
        default=10.0, metadata={"help": "seconds a client may take to send a request; slower or silent "
                                "connections are closed (request body: 408)"}
    )
    shutdown_grace_s: float = field(
        default=10.0, metadata={"help": "on Ctrl+C, seconds running requests may take to finish before each "
                                "ends with an error"}
    )

    def __post_init__(self) -> None:
        _validate_fields(self)
        for name in ("max_batch_size", "max_requests", "max_choices", "max_body_bytes"):
            _check_range("ServeLimits", name, getattr(self, name), lo=1)
        for name, lo, hi in (("batch_window_ms", 0, 1000), ("read_timeout_s", 0.01, 3600),
                             ("shutdown_grace_s", 0, 3600)):
            _check_range("ServeLimits", name, getattr(self, name), lo=lo, hi=hi)


@dataclass
class ServeConfig:
    """`scratchgpt serve`: what to serve, where, and to whom (what one server accepts is ServeLimits)."""

    checkpoint: str = field(default="", metadata={"help": "scratchgpt run directory or Hugging Face GPT-2 directory"})
    host: str = field(default=DEFAULT_HOST, metadata={
        "help": "address to bind (127.0.0.1: this machine only; any non-loopback address needs an API key)"})
    port: int = field(default=DEFAULT_PORT, metadata={"help": "port to bind (0: any free one)"})
    api_key: str | None = field(default=None, metadata={
        "help": f"require 'Authorization: Bearer KEY' (None: ${API_KEY_ENV}, else no key; an empty key is an error)"})
    model_name: str | None = field(
        default=None, metadata={"help": "the model id clients send (None: the checkpoint folder's name)"}
    )
    chat_template: Literal["alpaca", "chatml", "tokenizer"] | None = field(
        default=None, metadata={"help": "alpaca, chatml, or tokenizer (the model's own Jinja template). None: the "
                                "template the run was fine-tuned with (its config.json), else the tokenizer's own "
                                "if it has one, else alpaca"}
    )
    device: str = field(default="auto", metadata={"help": "'auto' (cuda if present, else cpu), 'cpu', 'cuda:1'"})
    log_level: Literal["critical", "error", "warning", "info", "debug"] = field(
        default="info", metadata={"help": "uvicorn's log level"}
    )

    def __post_init__(self) -> None:
        if not self.checkpoint:
            raise ValueError("ServeConfig: no checkpoint to serve; pass --checkpoint DIR (or set it in [serve])")
        _validate_fields(self)
        _check_range("ServeConfig", "port", self.port, lo=0, hi=65535)
