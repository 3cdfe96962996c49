"""Configuration dataclasses: one per concern, validated when built, saved as JSON.

Each field states its default, its `--help` text and its bounds in one place (`setting(...)`), and one
validator (`validate`, run by every config's `__post_init__`) checks every field against its type hint
and those rules; the few rules that tie two fields together are short checks in the class. Every run
directory holds these as JSON so a checkpoint describes itself, and the CLI builds its flags from the
same fields (`cli/flags.py`), so each default lives in exactly one place.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar, get_args, get_origin

T = TypeVar("T")

# --- Declaring fields and checking them: one validator for every config class -----------------------------------------

# ge/gt/le/lt: bounds (a None value is not checked); choices: the allowed values beyond the type;
# required: must not be None or empty.
_RULES = frozenset({"ge", "gt", "le", "lt", "choices", "required"})


def setting(default: Any, help: str = "", **rules: Any) -> Any:
    """A config field: its default, its --help text and its rules (ge, gt, le, lt, choices, required)."""
    unknown = sorted(set(rules) - _RULES)
    if unknown:
        raise TypeError(f"unknown field rule(s) {unknown}; the rules are {sorted(_RULES)}")
    return field(default=default, metadata={"help": help, **rules})


def same_as(cls: type, name: str, default: Any = dataclasses.MISSING, *, help: str | None = None) -> Any:
    """Field `name` of config `cls` again, with its rules and another default or help text.

    How a subclass (a fine-tuning mode's TrainConfig) changes a default without restating the bounds.
    """
    f = cls.__dataclass_fields__[name]  # type: ignore[attr-defined]
    metadata = {**f.metadata, **({} if help is None else {"help": help})}
    return field(default=f.default if default is dataclasses.MISSING else default, metadata=metadata)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


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
        return isinstance(value, tuple) and (not args or all(_matches(v, args[0]) for v in value))
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, hint) if isinstance(hint, type) else True


def _check_range(where: str, value: float, *, ge: float | None = None, gt: float | None = None,
                 le: float | None = None, lt: float | None = None) -> None:
    # NaN compares False with everything, so a range test alone would let it through: refuse
    # non-finite values first (no knob of ours means anything at nan or +-inf).
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where}={value!r} must be a finite number")
    if ((ge is not None and value < ge) or (gt is not None and value <= gt)
            or (le is not None and value > le) or (lt is not None and value >= lt)):
        lo, hi = (gt if ge is None else ge), (lt if le is None else le)
        if lo is not None and hi is not None:
            need = f"lie in {'[' if ge is not None else '('}{lo}, {hi}{']' if le is not None else ')'}"
        else:
            need = "be " + (f">= {ge}" if ge is not None else f"> {gt}" if gt is not None else
                            f"<= {le}" if le is not None else f"< {lt}")
        raise ValueError(f"{where}={value!r} is out of range; it must {need}")


def _check_value(where: str, value: Any, hint: Any, rules: typing.Mapping[str, Any]) -> None:
    """One field's value against its type hint, then its rules; raises a one-line ValueError naming `where`."""
    if not _matches(value, hint):
        literals = [get_args(a) for a in (hint, *get_args(hint)) if get_origin(a) is Literal]
        if literals and isinstance(value, str):
            raise ValueError(f"{where}={value!r} is not allowed; choose one of {list(literals[0])}")
        quotes = " (write true or false without quotes)" if hint is bool and isinstance(value, str) else ""
        kind = "" if isinstance(value, tuple) else f" ({type(value).__name__})"  # a list read as a tuple: its items
        raise ValueError(f"{where}={value!r}{kind} must be {_type_name(hint)}{quotes}")
    if any(isinstance(v, float) and not math.isfinite(v) for v in (value if isinstance(value, tuple) else (value,))):
        raise ValueError(f"{where}={value!r} must be a finite number")
    if rules.get("required") and value in (None, "", ()):
        raise ValueError(f"{where} must be set ({rules['help']})")
    if value is None:
        return
    if "choices" in rules and value not in rules["choices"]:
        raise ValueError(f"{where}={value!r} is not allowed; choose one of {list(rules['choices'])}")
    _check_range(where, value, **{k: rules[k] for k in ("ge", "gt", "le", "lt") if k in rules})  # none: no-op


def validate(obj: Any) -> None:
    """Check every field of config `obj` against its type hint and its rules (`setting`); the first error.

    Run first by every config's __post_init__ (see `Config`), so that a value of the wrong type
    (`bias = "false"`, `lr = "fast"`, `device = 3`) fails here, naming the field, before any cross-field
    check could misread it. TOML, JSON and argparse have no tuples: a list (or a lone string) becomes a
    tuple where the field is one.
    """
    cls = type(obj)
    for f in fields(obj):
        hint, value = _hints(cls)[f.name], getattr(obj, f.name)
        if isinstance(value, (list, str)) and any(get_origin(h) is tuple for h in (hint, *get_args(hint))):
            value = (value,) if isinstance(value, str) else tuple(value)
            object.__setattr__(obj, f.name, value)  # frozen configs too
        _check_value(f"{cls.__name__}.{f.name}", value, hint, f.metadata)


class Config:
    """What every config dataclass shares: validated when built, and read from / written to plain dicts."""

    def __post_init__(self) -> None:
        validate(self)

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any], *, source: str = "config") -> T:
        return config_from_dict(cls, data, source=source)

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)


def config_from_dict(cls: type[T], data: dict[str, Any], *, source: str = "config") -> T:
    """Build config `cls` from a dict (a TOML table, a JSON object); every error is one line naming `source`."""
    if not isinstance(data, dict):
        raise ValueError(f"{source}: expected a table of {cls.__name__} fields, got {type(data).__name__}")
    names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{source}: unknown {cls.__name__} field(s) {unknown}; known fields are {sorted(names)}")
    try:
        return cls(**data)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None


def config_to_dict(obj: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config dataclass (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(obj)))


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


# --- The model --------------------------------------------------------------------------------------------------------

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
PRESET_NAMES: tuple[str, ...] = tuple(_PRESETS)

_DROPOUT = dict(ge=0.0, lt=1.0)


@dataclass
class GPTConfig(Config):
    """GPT-2 hyper-parameters, under GPT-2's own field names (so HF config.json maps 1:1)."""

    vocab_size: int = setting(50257, "tokens in the vocabulary", ge=1)
    n_positions: int = setting(1024, "context length in tokens", ge=1)
    n_embd: int = setting(768, "embedding width C", ge=1)
    n_layer: int = setting(12, "transformer blocks", ge=1)
    n_head: int = setting(12, "attention heads (must divide n_embd)", ge=1)
    embd_pdrop: float = setting(0.1, "dropout after the embeddings", **_DROPOUT)
    resid_pdrop: float = setting(0.1, "dropout on each residual branch", **_DROPOUT)
    attn_pdrop: float = setting(0.1, "dropout on attention weights", **_DROPOUT)
    layer_norm_epsilon: float = setting(1e-5, "epsilon added to the variance in every norm", gt=0.0)
    initializer_range: float = setting(0.02, "std of the normal initialisation of the weights", gt=0.0)
    bias: bool = setting(True, "biases in Linear layers and LayerNorms")
    tie_word_embeddings: bool = setting(True, "share wte with lm_head")
    pos_encoding: Literal["learned", "sinusoidal", "rope"] = setting(
        "learned", "learned table (GPT-2), fixed sin/cos, or rotary (Llama, Qwen)")
    activation: Literal["gelu", "gelu_exact", "relu", "relu2", "swiglu"] = setting(
        "gelu", "MLP non-linearity: gelu (GPT-2's tanh approximation), gelu_exact (erf, nanoGPT's nn.GELU), relu, "
                "relu2 (relu²), swiglu (Llama, Qwen)")
    # -- the Llama / Qwen family (defaults keep GPT-2; see the README's family table) --------------
    norm: Literal["layernorm", "rmsnorm"] = setting(
        "layernorm", "layernorm (GPT-2) or rmsnorm (Llama, Qwen); eps = layer_norm_epsilon")
    n_inner: int | None = setting(None, "MLP hidden size (default: 4 * n_embd)", ge=1)
    n_kv_head: int | None = setting(None, "key/value heads for grouped-query attention (default: n_head)", ge=1)
    head_dim: int | None = setting(None, "width of one head (default: n_embd // n_head)", ge=1)
    qkv_bias: bool | None = setting(None, "biases on the q/k/v projection (default: follow bias; Qwen2: true)")
    qk_norm: bool = setting(False, "RMSNorm each query and key head before RoPE (Qwen3)")
    rope_theta: float = setting(10000.0, "RoPE base: larger = slower-turning angles", gt=0.0)
    rope_scaling_factor: float | None = setting(
        None, "Llama 3 RoPE frequency scaling factor (default: no scaling)", gt=0.0)
    rope_low_freq_factor: float = setting(1.0, "Llama 3 RoPE scaling: low_freq_factor", gt=0.0)
    rope_high_freq_factor: float = setting(4.0, "Llama 3 RoPE scaling: high_freq_factor", gt=0.0)
    rope_original_n_positions: int = setting(8192, "Llama 3 RoPE scaling: original_max_position_embeddings", ge=1)
    logit_softcap: float | None = setting(None, "cap logits to ±c via c·tanh(x/c)", gt=0.0)
    zero_init: bool = setting(False, "start attn.c_proj, mlp.c_proj and an untied lm_head at zero")

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        if self.head_dim is None and self.n_embd % self.n_head != 0:
            raise ValueError(f"{name}.n_embd={self.n_embd} is not divisible by n_head={self.n_head}; "
                             f"choose n_head among the divisors of n_embd")
        if self.pos_encoding == "sinusoidal" and self.n_embd % 2:
            raise ValueError(f"{name}.n_embd={self.n_embd} must be even for sinusoidal positions")
        if self.n_head % self.kv_heads:
            raise ValueError(f"{name}.n_kv_head={self.n_kv_head} does not divide n_head={self.n_head}; each key/value "
                             f"head serves a whole group of query heads, so choose a divisor of n_head")
        if self.pos_encoding == "rope" and self.head_size % 2:
            raise ValueError(f"{name}: RoPE rotates channel pairs, so the head size ({self.head_size}) must be even")
        if self.rope_scaling_factor is not None and self.rope_high_freq_factor <= self.rope_low_freq_factor:
            raise ValueError(f"{name}.rope_high_freq_factor={self.rope_high_freq_factor} must exceed "
                             f"rope_low_freq_factor={self.rope_low_freq_factor}")

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


# --- Sampling ---------------------------------------------------------------------------------------------------------

# Temperature has one rule for every way in (Python, the CLI, HTTP, training samples, the book's generate):
# these bounds, checked by every temperature field and by `check_temperature`, read as greedy by `is_greedy`.
# OpenAI's range: above 2 every model's text is noise, and HTTP clients expect 2 to be the limit.
MAX_TEMPERATURE = 2.0
_TEMPERATURE = dict(ge=0.0, le=MAX_TEMPERATURE)
# Below 1e-4 two logits 0.01 apart already differ e^100-fold in probability, and tiny values overflow
# logits / T to inf: such a temperature is greedy in all but name, so it decodes greedily, exactly.
GREEDY_BELOW = 1e-4


def check_temperature(cls_name: str, name: str, value: float) -> None:
    """Raise ValueError (naming `cls_name.name`) unless `value` is a finite temperature in [0, MAX_TEMPERATURE]."""
    _check_range(f"{cls_name}.{name}", value, **_TEMPERATURE)


def is_greedy(temperature: float) -> bool:
    """Whether `temperature` means greedy decoding (argmax): 0, or anything below GREEDY_BELOW."""
    return temperature < GREEDY_BELOW


# Most tokens a draft proposes per pass by default: with the token before them, a check of 4 new tokens, which
# scratchgpt's CPU kernels run reading each weight once (native.MAX_ROWS rows: model/fused_decode.py); a 5th
# costs a second read of every weight, or the modules. Measured (Intel Xeon AMX, bench/speculative.py, 8 x 384
# target, 2 x 128 draft): 3 -> 1.68x plain decoding, 4 -> 0.94x.
DRAFT_TOKENS = 3


@dataclass(frozen=True)
class SamplingConfig(Config):
    """How to pick each next token. temperature 0 (or below 1e-4) means greedy."""

    max_new_tokens: int = setting(100, "tokens to generate at most", ge=0)
    temperature: float = setting(1.0, "0 to 2; 0 (or below 1e-4) = greedy; >1 flatter, <1 sharper", **_TEMPERATURE)
    top_k: int | None = setting(None, "keep only the k most likely tokens", ge=1)
    top_p: float = setting(1.0, "nucleus: smallest set with mass >= top_p", gt=0.0, le=1.0)
    min_p: float = setting(0.0, "drop tokens below min_p * max probability", ge=0.0, le=1.0)
    repetition_penalty: float = setting(1.0, ">1 discourages tokens already in the prompt or output", gt=0.0)
    stop: tuple[str, ...] = setting((), "stop strings (not included in output)")
    stop_at_eot: bool = setting(True, "stop at the end-of-text token")
    seed: int | None = setting(None, "seed for reproducible sampling")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not all(self.stop):
            raise ValueError(f"{type(self).__name__}.stop must hold non-empty strings, got {self.stop!r}")

    @property
    def greedy(self) -> bool:
        return is_greedy(self.temperature)


# --- Data, training and the run that bundles them (one TOML file: [model], [data], [train]) ---------------------------


@dataclass
class DataConfig(Config):
    """Where the token files come from (`prepare`) and how training windows are drawn from them."""

    dir: str = setting("", "prepared folder: train.bin, val.bin, meta.json, tokenizer")
    source: str = setting("", "what `prepare` reads: a text, JSONL, Parquet or Arrow file (text and JSONL also "
                              ".gz/.zst/.xz), a folder of them, a datasets save_to_disk folder, or a glob")
    text_field: str = setting("text", "prepare: the field (JSONL) or column (Parquet, Arrow) holding each record's "
                                      "text; a dotted path reaches into nested objects", required=True)
    tokenizer: Literal["gpt2", "bpe", "char"] = setting(
        "gpt2", "gpt2 BPE, a byte-level BPE trained on the corpus, or characters")
    bpe_vocab_size: int = setting(4096, "vocabulary of a trained 'bpe' tokenizer (256 bytes + end-of-text at least)",
                                  ge=257)
    val_fraction: float = setting(0.1, "share of the corpus held out for validation", ge=0.0, lt=1.0)
    split_by: Literal["chars", "documents"] = setting(
        "chars", "chars: each document's last val_fraction goes to val (nanoGPT's split); documents: whole files, "
                 "spread evenly (many-file corpora)")
    errors: Literal["strict", "replace"] = setting(
        "strict", "non-UTF-8 bytes: fail naming the offset, or replace with U+FFFD")
    workers: int = setting(0, "processes for tokenizing (0 = one per core)", ge=0)
    shard_tokens: int = setting(0, "prepare: write each split as shards of this many tokens, train-00000.bin, ... "
                                   "(0 = one file)", ge=0)
    block_size: int | None = setting(None, "tokens per window (default: n_positions)", ge=1)
    sampler: Literal["random", "sequential"] = setting(
        "random", "random windows, or every window once per epoch (sliding, strided)")
    stride: int | None = setting(None, "sequential sampler step (default: block_size)", ge=1)
    shuffle: bool = setting(True, "sequential sampler: shuffle window order per epoch")


@dataclass
class TrainConfig(Config):
    """The training loop's knobs: optimisation, schedule, evaluation, logging, checkpoints, hardware."""

    out_dir: str = setting("runs/default", "run directory: checkpoints, log.csv, plot", required=True)
    init_from: str = setting("scratch", "'scratch', a run directory, or a Hugging Face GPT-2 dir/name")
    resume: bool = setting(False, "continue the run in out_dir from its latest checkpoint")
    overwrite: bool = setting(False, "start afresh in an out_dir that already holds a model or run: its "
                                     "checkpoints, best/ and log.csv are deleted first")
    max_steps: int = setting(5000, "optimizer steps to train for", ge=1)
    batch_size: int = setting(12, "sequences per micro-batch, per process", ge=1)
    grad_accum_steps: int = setting(1, "micro-batches per optimizer step", ge=1)
    lr: float = setting(6e-4, "peak learning rate", gt=0.0)
    min_lr: float | None = setting(None, "cosine floor (default: lr / 10; at most lr)", ge=0.0)
    warmup_steps: int = setting(100, "linear warmup steps", ge=0)
    lr_decay_steps: int | None = setting(None, "step at which the cosine reaches min_lr (default: max_steps)", ge=1)
    weight_decay: float = setting(0.1, "AdamW decay, applied to >=2-D tensors only", ge=0.0)
    beta1: float = setting(0.9, "AdamW beta1: momentum of the gradient average", ge=0.0, lt=1.0)
    beta2: float = setting(0.95, "AdamW beta2: momentum of the squared-gradient average", ge=0.0, lt=1.0)
    grad_clip: float = setting(1.0, "max global grad norm (0 = off)", ge=0.0)
    # Optimizer and schedule choices (training/optim.py): Muon for hidden matrices + AdamW for the rest.
    optimizer: Literal["adamw", "muon"] = setting(
        "adamw", "adamw for everything, or muon for hidden 2-D matrices + AdamW for embeddings, head and 1-D "
                 "tensors (lr)")
    muon_lr: float = setting(0.02, "Muon's peak learning rate (optimizer=muon)", gt=0.0)
    muon_momentum: float = setting(0.95, "Muon's (Nesterov) momentum", ge=0.0, lt=1.0)
    muon_weight_decay: float = setting(0.0, "Muon's decoupled weight decay", ge=0.0)
    muon_ns_steps: int = setting(5, "Newton-Schulz iterations per Muon update", ge=1, le=99)
    ns_dtype: Literal["auto", "float32", "bfloat16"] = setting(
        "auto", "Newton-Schulz dtype; auto = bfloat16 where the device has native bf16, float32 elsewhere")
    embed_lr: float | None = setting(None, "AdamW lr of embeddings under muon (default: lr)", gt=0.0)
    head_lr: float | None = setting(None, "AdamW lr of the output head under muon (default: lr)", gt=0.0)
    adam_eps: float = setting(1e-8, "AdamW epsilon", gt=0.0)
    schedule: Literal["cosine", "warmdown"] = setting(
        "cosine", "cosine: warmup then cosine to min_lr; warmdown: warmup, constant, then linear to min_lr over "
                  "the last warmdown_fraction of the steps")
    warmdown_fraction: float = setting(0.5, "share of the steps the warmdown takes", gt=0.0, le=1.0)
    eval_interval: int = setting(250, "evaluate every N steps (0 = only at the end)", ge=0)
    eval_steps: int = setting(20, "batches per split in each evaluation", ge=1)
    eval_train: bool = setting(True, "evaluate the train split too (val always): off halves each evaluation")
    log_interval: int = setting(10, "write a log.csv row every N steps", ge=1)
    checkpoint_interval: int = setting(500, "checkpoint every N steps (0 = only at the end)", ge=0)
    keep_last: int = setting(2, "step checkpoints kept (the best by val loss is kept too)", ge=1)
    sample_interval: int = setting(0, "print a sample every N steps (0 = never)", ge=0)
    sample_prompt: str = setting("\n", "prompt for the periodic samples")
    sample_tokens: int = setting(200, "tokens per periodic sample", ge=0)
    sample_temperature: float = setting(0.8, "temperature of the periodic samples", **_TEMPERATURE)
    sample_top_k: int | None = setting(200, "top-k of the periodic samples", ge=1)
    seed: int = setting(1337, "seeds init, data order, dropout and samples")
    device: str = setting("auto", "'auto' (cuda if present), 'cpu', 'cuda', 'cuda:1', 'mps'")
    dtype: Literal["auto", "float32", "bfloat16", "float16", "bf16-true"] = setting(
        "auto", "autocast dtype; auto = bfloat16 on CUDA and on CPUs with native bf16 (AVX512_BF16/AMX), float32 "
                "elsewhere; bf16-true = weights, gradients and optimizer state in bfloat16 (Kahan-compensated updates)")
    attn_impl: Literal["auto", "eager", "sdpa"] = setting(
        "auto", "attention path; auto = sdpa (measured faster for training on CPU and GPU)")
    compile: bool = setting(False, "torch.compile the model")
    activation_checkpointing: bool = setting(
        False, "recompute each block's activations in the backward pass instead of keeping them: less memory, one "
               "more forward; same loss and gradients")
    fused_adamw: bool = setting(True, "fused AdamW kernel where PyTorch has one")
    num_threads: int = setting(0, "torch CPU threads (0 = PyTorch's default)", ge=0)
    fsdp: bool = setting(False, "shard with FSDP instead of DDP under torchrun")
    progress: bool = setting(True, "tqdm progress bar")
    plot: bool = setting(True, "write loss.png (needs matplotlib)")

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        if self.min_lr is not None and self.min_lr > self.lr:
            raise ValueError(f"{name}.min_lr={self.min_lr!r} is above lr={self.lr!r}; the floor must be <= lr")
        if self.optimizer == "muon" and self.fsdp:
            raise ValueError(f"{name}: optimizer='muon' does not work with fsdp=true (Newton-Schulz needs whole "
                             f"matrices, FSDP shards them); use DDP (fsdp=false) or optimizer='adamw'")

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
class RunConfig(Config):
    """A whole run: the model, its data and its training, as one TOML file has them."""

    model: GPTConfig = field(default_factory=GPTConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> RunConfig:  # type: ignore[override]
        """Build from {"model": {...}, "data": {...}, "train": {...}}; unknown sections or keys are errors."""
        if not isinstance(data, dict):
            raise ValueError(f"{source}: expected a table with [model], [data], [train] sections")
        unknown = sorted(set(data) - set(RUN_SECTIONS))
        if unknown:
            raise ValueError(f"{source}: unknown section(s) {unknown}; a run has {list(RUN_SECTIONS)}")
        return cls(**{k: config_from_dict(c, data.get(k, {}), source=f"{source} [{k}]")
                      for k, c in RUN_SECTIONS.items()})


def merge_run_dicts(*layers: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Later layers override earlier ones, field by field within each section."""
    out: dict[str, dict[str, Any]] = {}
    for layer in layers:
        for section, values in layer.items():
            if not isinstance(values, dict):
                raise ValueError(f"[{section}] must be a table of fields, got {type(values).__name__}")
            out.setdefault(section, {}).update(values)
    return out


# --- Fine-tuning: LoRA adapters and the three modes (classify, instruct, dpo) -----------------------------------------

# Linear layers LoRA can adapt, as module-name suffixes ("c_proj" alone matches both c_proj layers).
LORA_TARGETS: tuple[str, ...] = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj", "lm_head")
Trainable = Literal["all", "last-block", "head", "lora"]
# A chat template by name; "auto" (fine-tuning, eval) picks the checkpoint's, else its tokenizer's, else alpaca.
ChatTemplateName = Literal["alpaca", "chatml", "tokenizer"]
PromptTemplate = Literal["auto", "alpaca", "chatml", "tokenizer"]
# Weights of an inference command (model/quantize.py), also `export --format`'s run directories; then a dtype.
Quantize = Literal["int8", "int4", "int4-g64", "int4-g128"]
InferenceDtype = Literal["float32", "bfloat16"]


@dataclass
class LoRAConfig(Config):
    """Low-rank adapters: which Linear layers get them, their rank, scaling (alpha / rank) and dropout."""

    rank: int = setting(8, "rank r of each update B·A", ge=1)
    alpha: float = setting(16.0, "the update is scaled by alpha / rank", gt=0.0)
    dropout: float = setting(0.0, "dropout on the adapter's input", **_DROPOUT)
    targets: tuple[str, ...] = setting(("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"),
                                       f"Linear layers to adapt, by name suffix: {', '.join(LORA_TARGETS)}")
    base_dtype: Literal["float32", "bfloat16", "int8"] = setting(
        "float32", "the frozen base's weights: bfloat16 (half the bytes; bf16 autocast) or int8 (a quarter; QLoRA)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.targets or not all(self.targets):
            raise ValueError(f"{type(self).__name__}.targets={self.targets!r} must name at least one layer, "
                             f"e.g. {LORA_TARGETS}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


@dataclass
class FinetuneTrainConfig(TrainConfig):
    """TrainConfig with fine-tuning's defaults: it starts from trained weights, so a small learning rate,
    no warmup, a few epochs (max_steps follows from the mode's `epochs` unless set), frequent evaluation and
    one final checkpoint. The values follow the textbook's chapters 6 and 7 and its DPO notebook."""

    out_dir: str = same_as(TrainConfig, "out_dir", "runs/finetune", help="run directory: model, log.csv, metrics")
    max_steps: int | None = same_as(TrainConfig, "max_steps", None,
                                    help="optimizer steps (default: epochs over the training split)")
    batch_size: int = same_as(TrainConfig, "batch_size", 8, help="examples per micro-batch, per process")
    lr: float = same_as(TrainConfig, "lr", 5e-5)
    warmup_steps: int = same_as(TrainConfig, "warmup_steps", 0)
    eval_interval: int = same_as(TrainConfig, "eval_interval", 50)
    eval_steps: int = same_as(TrainConfig, "eval_steps", 5)
    log_interval: int = same_as(TrainConfig, "log_interval", 5)
    checkpoint_interval: int = same_as(TrainConfig, "checkpoint_interval", 0)


@dataclass
class ClassifyTrainConfig(FinetuneTrainConfig):
    """Classification fine-tuning's training defaults."""

    out_dir: str = same_as(FinetuneTrainConfig, "out_dir", "runs/finetune-classify")


@dataclass
class InstructTrainConfig(FinetuneTrainConfig):
    """Instruction tuning's training defaults."""

    out_dir: str = same_as(FinetuneTrainConfig, "out_dir", "runs/finetune-instruct")


@dataclass
class DPOTrainConfig(FinetuneTrainConfig):
    """DPO's training defaults: a tenth of SFT's learning rate, light decay, evaluation twice as often."""

    out_dir: str = same_as(FinetuneTrainConfig, "out_dir", "runs/finetune-dpo")
    lr: float = same_as(FinetuneTrainConfig, "lr", 5e-6)
    weight_decay: float = same_as(FinetuneTrainConfig, "weight_decay", 0.01)
    eval_interval: int = same_as(FinetuneTrainConfig, "eval_interval", 25)


@dataclass
class FinetuneConfig(Config):
    """What every fine-tuning mode shares: the data, its split, sequence limits and what trains.

    Each mode's subclass carries its own defaults: `train_config` (its TrainConfig class, whose field
    defaults are the mode's), `default_trainable` and the `epochs` default.
    """

    train_config: ClassVar[type[FinetuneTrainConfig]] = FinetuneTrainConfig
    default_trainable: ClassVar[Trainable] = "all"

    data: str = setting("", "the data file (JSON list, JSONL or Parquet; classify: also TSV, CSV)")
    init: str = setting("scratch", "starting model: a run directory, a Hugging Face GPT-2 directory or hub name "
                                   "(gpt2), or 'scratch' (random weights shaped by the model flags)")
    tokenizer: Literal["auto", "gpt2", "char"] = setting(
        "auto", "auto = the checkpoint's (GPT-2 for scratch); a different kind than the checkpoint's is an error")
    split: tuple[float, ...] = setting((0.85, 0.10, 0.05), "train, val and test fractions (0 = no such split)")
    split_shuffle: bool = setting(True, "shuffle the entries before splitting")
    split_seed: int = setting(123, "seed of the split (and of balancing)")
    max_length: int | None = setting(None, "tokens per training sequence (default: the model's context)", ge=2)
    too_long: Literal["truncate", "drop", "error"] = setting(
        "truncate", "an entry longer than max_length: cut its end, skip it, or fail")
    trainable: Trainable | None = setting(
        None, "weights that train: all, last-block (+ final norm + head), head, or lora (None: lora when a --lora-* "
              "flag is given, else the mode's: last-block for classify, all for instruct and dpo)")
    dropout: float | None = setting(None, "set every dropout rate (None: the model's)", **_DROPOUT)
    epochs: float = setting(1.0, "passes over the training split (unless max_steps is set)", gt=0.0)

    def __post_init__(self) -> None:
        super().__post_init__()
        name, split = type(self).__name__, self.split
        if len(split) != 3 or min(split) < 0:
            raise ValueError(f"{name}.split={split!r} must be three fractions >= 0: train, val, test")
        if split[0] <= 0 or sum(split) > 1 + 1e-9:
            raise ValueError(f"{name}.split={split!r}: the train fraction must be > 0 and the three must sum to <= 1")


@dataclass
class ClassifyConfig(FinetuneConfig):
    """Text classification: (text, label) rows, a Linear(C, classes) head on the last real token."""

    train_config: ClassVar[type[FinetuneTrainConfig]] = ClassifyTrainConfig
    default_trainable: ClassVar[Trainable] = "last-block"

    epochs: float = same_as(FinetuneConfig, "epochs", 5.0)
    split: tuple[float, ...] = same_as(FinetuneConfig, "split", (0.7, 0.1, 0.2))
    format: Literal["auto", "tsv", "csv", "jsonl", "json", "parquet", "arrow"] = setting(
        "auto", "auto: by extension (.csv, .jsonl, .json, .parquet, .arrow; anything else is TSV). Headerless TSV is "
                "label<TAB>text, split on the first tab")
    text_field: str = setting("text", "column / key holding the text")
    label_field: str = setting("label", "column / key holding the label")
    labels: tuple[str, ...] = setting((), "label names in class-id order (default: sorted)")
    balance: bool = setting(False, "undersample every class to the rarest one's count")


@dataclass
class InstructConfig(FinetuneConfig):
    """Instruction tuning: Alpaca entries or conversations rendered with a chat template, loss on the answers."""

    train_config: ClassVar[type[FinetuneTrainConfig]] = InstructTrainConfig

    epochs: float = same_as(FinetuneConfig, "epochs", 2.0)
    template: PromptTemplate = setting(
        "auto", "prompt template; tokenizer: the model's own Jinja chat template (auto: the checkpoint's "
                "chat_template, else its tokenizer's, else alpaca)")
    mask_prompt: bool = setting(True, "learn only the assistant's turns: leave prompts and user turns out of the loss")
    response_tokens: int = setting(256, "max new tokens per test response (0 = skip test_responses.json)", ge=0)


@dataclass
class DPOConfig(FinetuneConfig):
    """Direct preference optimisation on (prompt, chosen, rejected) against a frozen reference."""

    train_config: ClassVar[type[FinetuneTrainConfig]] = DPOTrainConfig

    template: PromptTemplate = same_as(InstructConfig, "template")
    beta: float = setting(0.1, "strength of the pull away from the reference", gt=0.0)
    # Dropout would make the policy's log-ratios against the (dropout-free) reference noisy from step 0.
    dropout: float | None = same_as(FinetuneConfig, "dropout", 0.0)
    logp: Literal["sum", "mean"] = setting("sum", "a response's log-probability: sum over its tokens, or their mean")


# --- Evaluation (`scratchgpt eval`): settings every eval shares, then one config per task -----------------------------

# The help of settings every command that runs a model has (eval, serve here; generate, chat in cli/commands.py).
DEVICE_HELP = "'auto' (cuda if present, else cpu), 'cpu', 'cuda', 'cuda:1', 'mps'"
QUANTIZE_HELP = ("int8 weights (per output channel): ~2x faster CPU decoding, ~1/4 of the memory; int4 (groups of "
                 "32, or int4-g64/-g128): ~1/8 of the bytes, fast where the CPU's int4 kernel is (else float32 speed)")
INFERENCE_DTYPE_HELP = "weight dtype for inference; bfloat16 needs a CPU with native bf16 (avx512_bf16/AMX)"


@dataclass
class EvalConfig(Config):
    """Which model is evaluated, on what device, and where the reports go."""

    checkpoint: str = setting("", "scratchgpt run directory, Hugging Face GPT-2 directory, or hub name")
    device: str = setting("auto", DEVICE_HELP)
    quantize: Quantize | None = setting(None, "evaluate with int8 or int4 weights (see `generate --quantize`): "
                                              "measures their quality")
    batch_size: int = setting(16, "windows / items scored per forward pass", ge=1)
    limit: int | None = setting(None, "score only the first N items of a task file", ge=1)
    out_dir: str = setting("eval-reports", "folder for the JSON and markdown reports")
    name: str | None = setting(None, "report file name (default: task and data file)")
    overwrite: bool = setting(False, "replace reports of the same name in out_dir")
    progress: bool = setting(True, "show progress bars")


@dataclass
class PerplexityEvalConfig(Config):
    """Perplexity and bits per byte with a strided sliding window."""

    data: tuple[str, ...] = setting((), "text files, folders of .txt, globs, or prepared folders / .bin token files")
    context: int | None = setting(None, "tokens per window (default: the model's context)", ge=1)
    stride: int | None = setting(None, "new tokens scored per window (default: context = non-overlapping)", ge=1)
    prefix_eot: bool = setting(True, "start each text after <|endoftext|> so its first token is scored too")


@dataclass
class ChoiceEvalConfig(Config):
    """A multiple-choice log-likelihood task from a JSONL file; field names come from the preset or flags."""

    data: str = setting("", "JSONL (or JSON list) task file")
    preset: Literal["generic", "hellaswag", "arc", "piqa"] = setting(
        "generic", "field layout: generic = context, choices, label")
    context_field: str | None = setting(None, "field holding the context")
    choices_field: tuple[str, ...] = setting(
        (), "field holding the list of choices, or several fields of one choice each")
    label_field: str | None = setting(None, "field holding the gold index or label")
    choice_labels_field: str | None = setting(
        None, "list of choice names the label is looked up in (ARC: choices.label)")
    template: str = setting("{context}", "context text, e.g. 'Question: {context}\\nAnswer:'")
    delimiter: str = setting(" ", "text between the context and each choice")


@dataclass
class ClassifierEvalConfig(Config):
    """A `finetune classify` checkpoint on a labelled file."""

    data: str = setting("", "labelled TSV (label<TAB>text), CSV, JSONL, JSON, Parquet or Arrow file")
    format: Literal["auto", "tsv", "csv", "jsonl", "json", "parquet", "arrow"] = setting("auto", "auto: by extension")
    text_field: str = setting("text", "column / key holding the text")
    label_field: str = setting("label", "column / key holding the label")


@dataclass
class JudgeEvalConfig(Config):
    """Answers to held-out instructions, scored 0-100 by a judge behind an OpenAI-compatible endpoint."""

    data: str = setting("", "JSON list / JSONL of {instruction, input, output}")
    judge_url: str = setting("http://127.0.0.1:11434/v1", "the judge's OpenAI base URL (default: Ollama's)")
    judge_model: str = setting("llama3", "model name sent to the judge")
    judge_api_key: str | None = setting(None, "Bearer key for the judge, if it needs one")
    chat_template: PromptTemplate = setting(
        "auto", "prompt template of the evaluated model (auto: the one it was tuned with, else its tokenizer's own "
                "chat template, else alpaca)")
    max_new_tokens: int = setting(256, "longest answer generated", ge=1)
    retries: int = setting(3, "retries per judge request on connection errors / 5xx", ge=0)
    timeout: float = setting(60.0, "seconds per judge request", gt=0.0)


# Task name (the `scratchgpt eval TASK` subcommand and the suite TOML's table name) -> its config.
EVAL_TASKS: dict[str, type] = {"perplexity": PerplexityEvalConfig, "choice": ChoiceEvalConfig,
                               "classify": ClassifierEvalConfig, "judge": JudgeEvalConfig}


# --- Serving (`scratchgpt serve`) -------------------------------------------------------------------------------------
# Here, not in inference/serve.py, so that building the CLI's parser imports neither torch nor FastAPI.

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
API_KEY_ENV = "SCRATCHGPT_API_KEY"


@dataclass(frozen=True)
class ServeLimits(Config):
    """What one server accepts: batch size, queue bound, request size. Validated when built."""

    max_batch_size: int = setting(16, "rows (choices) decoded together at most", ge=1)
    batch_window_ms: float = setting(5.0, "how long an idle server waits for requests arriving together", ge=0,
                                     le=1000)
    max_requests: int = setting(64, "requests queued or running at once; more are refused with 503", ge=1)
    max_choices: int = setting(16, "choices per request (n x prompts) at most", ge=1)
    max_body_bytes: int = setting(1_000_000, "largest request body accepted", ge=1)
    read_timeout_s: float = setting(10.0, "seconds a client may take to send a request; slower or silent "
                                          "connections are closed (request body: 408)", ge=0.01, le=3600)
    shutdown_grace_s: float = setting(10.0, "on Ctrl+C, seconds running requests may take to finish before each "
                                            "ends with an error", ge=0, le=3600)


@dataclass
class ServeConfig(Config):
    """`scratchgpt serve`: what to serve, where, and to whom (what one server accepts is ServeLimits)."""

    checkpoint: str = setting("", "scratchgpt run directory or Hugging Face GPT-2 directory", required=True)
    host: str = setting(DEFAULT_HOST, "address to bind (127.0.0.1: this machine only; any non-loopback address "
                                      "needs an API key)")
    port: int = setting(DEFAULT_PORT, "port to bind (0: any free one)", ge=0, le=65535)
    api_key: str | None = setting(None, f"require 'Authorization: Bearer KEY' (None: ${API_KEY_ENV}, else no key; "
                                        f"an empty key is an error)")
    model_name: str | None = setting(None, "the model id clients send (None: the checkpoint folder's name)")
    chat_template: ChatTemplateName | None = setting(
        None, "alpaca, chatml, or tokenizer (the model's own Jinja template). None: the template the run was "
              "fine-tuned with (its config.json), else the tokenizer's own if it has one, else alpaca")
    device: str = setting("auto", DEVICE_HELP)
    log_level: Literal["critical", "error", "warning", "info", "debug"] = setting("info", "uvicorn's log level")
    quantize: Quantize | None = setting(None, QUANTIZE_HELP)
    dtype: InferenceDtype | None = setting(None, INFERENCE_DTYPE_HELP)
