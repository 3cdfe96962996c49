"""Configuration dataclasses: one per concern, validated when built, saved as JSON.

Every run directory holds these as JSON so a checkpoint describes itself. The CLI builds its flags
from the same dataclasses (`add_dataclass_args`), so each default lives in exactly one place.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
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
    bad = (
        (lo is not None and (value <= lo if lo_open else value < lo))
        or (hi is not None and (value >= hi if hi_open else value > hi))
    )
    if bad:
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        rng = f"{left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}"
        raise ValueError(f"{cls_name}.{name}={value!r} is out of range; it must lie in {rng}")


def _validate_literals(obj: Any) -> None:
    """Raise ValueError for any Literal-typed field whose value is not one of the literals."""
    hints = typing.get_type_hints(type(obj))
    for f in fields(obj):
        hint = hints.get(f.name)
        if get_origin(hint) is Literal:
            _check_choice(type(obj).__name__, f.name, getattr(obj, f.name), get_args(hint))


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
        if not _type_ok(hints.get(k, Any), v):
            raise ValueError(f"{source}: {k} = {v!r} ({type(v).__name__}) is not {_type_name(hints.get(k, Any))}")
        # JSON has no tuples: turn lists back into tuples where the field is a tuple.
        if isinstance(v, list) and get_origin(hints.get(k)) is tuple:
            v = tuple(v)
        kwargs[k] = v
    try:
        return cls(**kwargs)
    except ValueError as e:  # a value out of range or inconsistent: name where it came from
        raise ValueError(f"{source}: {e}") from None


def _type_ok(hint: Any, value: Any) -> bool:
    """Whether `value` (from TOML, JSON or a flag) fits a field annotated `hint`; a bool is never a number."""
    origin = get_origin(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(a, value) for a in get_args(hint))
    if origin is Literal:
        return value in get_args(hint)
    if origin is tuple:
        args = [a for a in get_args(hint) if a is not Ellipsis]
        return isinstance(value, (list, tuple)) and all(_type_ok(args[0] if args else Any, v) for v in value)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def _type_name(hint: Any) -> str:
    """How an error names a field's type: 'an integer', 'one of [...]', 'true or false', ..."""
    origin = get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(hint))
    if origin is Literal:
        return f"one of {list(get_args(hint))}"
    if origin is tuple:
        return "a list"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "unset"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))


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

_PRESETS: dict[str, dict[str, int]] = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),
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
    pos_encoding: Literal["learned", "sinusoidal"] = "learned"
    activation: Literal["gelu", "relu"] = "gelu"

    def __post_init__(self) -> None:
        name = type(self).__name__
        for attr in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            value = getattr(self, attr)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}.{attr}={value!r} must be a positive integer")
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"{name}.n_embd={self.n_embd} is not divisible by n_head={self.n_head}; "
                f"choose n_head among the divisors of n_embd"
            )
        for attr in ("embd_pdrop", "resid_pdrop", "attn_pdrop"):
            _check_range(name, attr, getattr(self, attr), lo=0.0, hi=1.0, hi_open=True)
        _check_range(name, "layer_norm_epsilon", self.layer_norm_epsilon, lo=0.0, lo_open=True)
        _check_range(name, "initializer_range", self.initializer_range, lo=0.0, lo_open=True)
        _validate_literals(self)
        if self.pos_encoding == "sinusoidal" and self.n_embd % 2:
            raise ValueError(f"{name}.n_embd={self.n_embd} must be even for sinusoidal positions")

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> GPTConfig:
        """A GPT-2 preset ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl") with optional overrides."""
        if name not in _PRESETS:
            raise ValueError(f"unknown GPT-2 preset {name!r}; choose one of {list(_PRESETS)}")
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


@dataclass(frozen=True)
class SamplingConfig:
    """How to pick each next token. temperature 0 means greedy."""

    max_new_tokens: int = field(default=100, metadata={"help": "tokens to generate at most"})
    temperature: float = field(default=1.0, metadata={"help": "0 = greedy; >1 flatter, <1 sharper"})
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
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 0:
            raise ValueError(f"{name}.max_new_tokens={self.max_new_tokens!r} must be an integer >= 0")
        _check_range(name, "temperature", self.temperature, lo=0.0)
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise ValueError(f"{name}.top_k={self.top_k!r} must be None or an integer >= 1")
        _check_range(name, "top_p", self.top_p, lo=0.0, hi=1.0, lo_open=True)
        _check_range(name, "min_p", self.min_p, lo=0.0, hi=1.0)
        _check_range(name, "repetition_penalty", self.repetition_penalty, lo=0.0, lo_open=True)
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"{name}.stop must hold non-empty strings, got {self.stop!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


# ---------------------------------------------------------------------------------------------
# Data, training and the run that bundles them (one TOML file: [model], [data], [train])
# ---------------------------------------------------------------------------------------------


@dataclass
class DataConfig:
    """Where the token files come from (`prepare`) and how training windows are drawn from them."""

    dir: str = field(default="", metadata={"help": "prepared folder: train.bin, val.bin, meta.json, tokenizer"})
    source: str = field(default="", metadata={"help": "text for `prepare`: a file, a folder (*.txt) or a glob"})
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
    block_size: int | None = field(default=None, metadata={"help": "tokens per window (default: n_positions)"})
    sampler: Literal["random", "sequential"] = field(
        default="random", metadata={"help": "random windows, or every window once per epoch (sliding, strided)"}
    )
    stride: int | None = field(default=None, metadata={"help": "sequential sampler step (default: block_size)"})
    shuffle: bool = field(default=True, metadata={"help": "sequential sampler: shuffle window order per epoch"})

    def __post_init__(self) -> None:
        name = type(self).__name__
        _validate_literals(self)
        _check_range(name, "val_fraction", self.val_fraction, lo=0.0, hi=1.0, hi_open=True)
        for attr in ("bpe_vocab_size", "workers", "block_size", "stride"):
            value = getattr(self, attr)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise ValueError(f"{name}.{attr}={value!r} must be a non-negative integer")
        for attr in ("block_size", "stride"):
            if getattr(self, attr) == 0:
                raise ValueError(f"{name}.{attr}=0 must be at least 1 (or unset for the default)")
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
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        default="auto", metadata={"help": "autocast dtype; auto = bfloat16 on CUDA, float32 on CPU"}
    )
    attn_impl: Literal["auto", "eager", "sdpa"] = field(
        default="auto", metadata={"help": "attention path; auto = sdpa (measured faster for training on CPU and GPU)"}
    )
    compile: bool = field(default=False, metadata={"help": "torch.compile the model"})
    fused_adamw: bool = field(default=True, metadata={"help": "fused AdamW kernel where PyTorch has one"})
    num_threads: int = field(default=0, metadata={"help": "torch CPU threads (0 = PyTorch's default)"})
    fsdp: bool = field(default=False, metadata={"help": "shard with FSDP instead of DDP under torchrun"})
    progress: bool = field(default=True, metadata={"help": "tqdm progress bar"})
    plot: bool = field(default=True, metadata={"help": "write loss.png (needs matplotlib)"})

    def __post_init__(self) -> None:
        name = type(self).__name__
        _validate_literals(self)
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
        _check_range(name, "sample_temperature", self.sample_temperature, lo=0.0)
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
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise ValueError(f"{name}.rank={self.rank!r} must be a positive integer")
        _check_range(name, "alpha", self.alpha, lo=0.0, lo_open=True)
        _check_range(name, "dropout", self.dropout, lo=0.0, hi=1.0, hi_open=True)
        self.targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
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
        _validate_literals(self)
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

    template: Literal["alpaca", "chatml"] = field(default="alpaca", metadata={"help": "prompt template"})
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

    template: Literal["auto", "alpaca", "chatml"] = field(
        default="auto", metadata={"help": "prompt template (auto: the checkpoint's chat_template, else alpaca)"}
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
        _validate_literals(self)
        if self.model and self.model not in _PRESETS:
            raise ValueError(f"{name}.model={self.model!r} is not a preset; choose one of {list(_PRESETS)}")
        if bool(self.checkpoint) == bool(self.model):
            raise ValueError(f"{name}: give exactly one of checkpoint (--checkpoint) and model (--model)")
        if self.num_samples < 1:
            raise ValueError(f"{name}.num_samples={self.num_samples} must be >= 1")
        if self.prompt_lookup < 0:
            raise ValueError(f"{name}.prompt_lookup={self.prompt_lookup} must be >= 0")
