"""LoRA: low-rank adapters applied to an existing model, merged back, saved and loaded on their own.

`apply_lora(model, config)` swaps each targeted `nn.Linear` for a `LoRALinear` that keeps the base
`weight` and `bias` under their old names and adds `lora_A` (r, in) and `lora_B` (out, r):

    y = x Wᵀ + b + dropout(x) Aᵀ Bᵀ · alpha / r

B starts at zero, so the adapted model computes exactly what the base did until training moves it.
Everything but the adapters is frozen. `merge_lora` folds B·A into W and returns plain `nn.Linear`
layers, so a merged model has the base's state-dict names again (and exports to Hugging Face).
`save_adapters` writes only what trained (adapter.safetensors + adapter_config.json): a few MB
instead of the whole model. `load_adapters` puts them back onto a base model.

The frozen base may be held in fewer bytes (`LoRAConfig.base_dtype`, QLoRA's idea with this project's own
int8): "int8" quantizes every Linear and embedding table (model/quantize.py: int8 weights, one float32
scale per output row, its fast kernel; the gradient reaches the input through the dequantized weight made
per backward call), "bfloat16" casts the frozen weights to bf16. The adapters stay float32 either way
and run in the activations' dtype. A 1B model's frozen weights: 4.9 GB float32, 2.5 GB bf16, 1.2 GB int8.
Merging over such a base gives a float32 model: dequantized (or cast), then W + B·A.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scratchgpt.checkpoint import float32_weights, unwrap
from scratchgpt.config import LoRAConfig, config_from_dict, config_to_dict
from scratchgpt.files import write_json
from scratchgpt.model.gpt import GPT
from scratchgpt.model.quantize import Int8Embedding, Int8Linear, dequantize_model, quantize_model
from scratchgpt.tensor_files import CheckpointError, load_tensors, read_json, save_tensors

ADAPTER_FILE = "adapter.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_FORMAT = "scratchgpt-lora"
ADAPTER_FORMAT_VERSION = 1
# Fields that may differ between the base a set of adapters was trained on and the one it is loaded
# onto: they change training behaviour, not the shape or meaning of any weight.
_SHAPE_FREE_FIELDS = ("embd_pdrop", "resid_pdrop", "attn_pdrop", "initializer_range")


class LoRALinear(nn.Module):
    """A frozen Linear layer (float, or int8 with scales) plus a trainable low-rank update B·A · alpha / rank."""

    def __init__(self, base: nn.Linear | Int8Linear, config: LoRAConfig, *, generator: torch.Generator | None = None):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.config = config
        self.scaling = config.scaling
        self.base: Int8Linear | None = None
        if isinstance(base, Int8Linear):
            # Kept whole, so it runs its own kernel: state names `<layer>.base.weight` (int8), `.base.weight_scale`.
            self.base = base
        else:
            # The very same Parameter objects move over: state-dict names stay `<layer>.weight/.bias`, and
            # a weight tied to another module (GPT-2's lm_head and wte) stays tied.
            self.weight = base.weight
            self.bias = base.bias
        # float32 adapters over a bf16 or int8 base: their small updates would vanish in bf16's 8-bit mantissa.
        frozen = base.weight.dtype if base.weight.is_floating_point() else torch.float32
        kw = dict(device=base.weight.device, dtype=torch.promote_types(frozen, torch.float32))
        self.lora_A = nn.Parameter(torch.empty(config.rank, self.in_features, **kw))
        # Zero B: the update B·A starts at zero, so the adapted model starts equal to the base.
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, config.rank, **kw))
        # A gets nn.Linear's own init (Kaiming-uniform, a=√5), as in the LoRA paper's code.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5), generator=generator)
        self.lora_dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, in): 2-D, for addmm below
        y = self.base(x) if self.base is not None else F.linear(x, self.weight, self.bias)  # (N, out)
        a, b = self.lora_A, self.lora_B
        if a.dtype != x.dtype:  # float32 adapters on bf16 activations: cast the (r, in) and (out, r) matrices
            a, b = a.to(x.dtype), b.to(x.dtype)
        # x Aᵀ first: (N, r) is far smaller than forming the (out, in) product B·A every step. The scaling goes
        # on it too, not on an out-wide tensor, and B's product is added into y by addmm rather than made as a
        # (N, out) tensor of its own: its backward then forms B's gradient as (hᵀ g)ᵀ, r rows by out, instead
        # of gᵀh. On Llama-3.2-1B's 16,384-wide gate/up layer (float32, 512 tokens) that made the adapter's
        # forward 5x and its B gradient 3.7x faster.
        h = F.linear(self.lora_dropout(x), a) * self.scaling  # (N, r)
        h, bt = h.to(y.dtype), b.t().to(y.dtype)  # (autocast may give y another dtype than x's)
        # In place, except where y came out of a custom autograd Function (an int8 base), which may not be
        # changed in place: nothing keeps y for the backward, and each (N, out) temporary counts at 1B sizes.
        y = torch.addmm(y, h, bt) if self.base is not None else y.addmm_(h, bt)
        return y.view(*shape[:-1], y.size(-1))

    def base_weight(self) -> Tensor:
        """The frozen weight (out, in) the update is added to: dequantized (float32) over an int8 base."""
        return self.base.dequantized() if self.base is not None else self.weight

    def base_bias(self) -> Tensor | None:
        return self.base.bias if self.base is not None else self.bias

    def delta_weight(self) -> Tensor:
        """The update this adapter adds to the weight: B·A · alpha / rank, shape (out, in)."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    def extra_repr(self) -> str:
        c = self.config
        return f"in={self.in_features}, out={self.out_features}, rank={c.rank}, alpha={c.alpha}, dropout={c.dropout}"


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def apply_lora(
    model: nn.Module, config: LoRAConfig, *, generator: torch.Generator | None = None, keep: Collection[str] = (),
) -> list[str]:
    """Lower the frozen base to `config.base_dtype`, wrap every targeted Linear of `model` in a LoRALinear and
    freeze all else; returns the wrapped names. `keep`: modules left float32 because they train too (a new head)."""
    model = unwrap(model)
    if lora_layers(model):
        raise ValueError("this model already has LoRA adapters; merge_lora() them first or load it fresh")
    linear_names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear | Int8Linear)]
    wrapped: list[str] = []
    for target in config.targets:
        hits = [n for n in linear_names if _matches(n, target)]
        if not hits:
            # Block layers are listed by their in-block name ("attn.c_attn"), the rest in full.
            names = sorted({n.split(".", 3)[-1] if n.startswith("transformer.h.") else n for n in linear_names})
            raise ValueError(f"LoRA target {target!r} matches no Linear layer of this model; choose among {names}")
        wrapped += [n for n in hits if n not in wrapped]
    lower_base(model, config.base_dtype, keep=keep)  # the layers keep their names (int8: new modules)
    modules = dict(model.named_modules())
    for name in wrapped:
        _set_submodule(model, name, LoRALinear(modules[name], config, generator=generator))
    for pname, p in model.named_parameters():
        p.requires_grad_(".lora_" in f".{pname}")
    return wrapped


def base_load_dtype(config: LoRAConfig | None) -> torch.dtype | None:
    """The dtype to load a start model in for LoRA over `config`'s base: bfloat16 for a bf16 or int8 base
    (never a float32 copy of the whole model in memory), else None (as saved)."""
    return torch.bfloat16 if config is not None and config.base_dtype in ("bfloat16", "int8") else None


def lower_base(model: nn.Module, dtype: str, *, keep: Collection[str] = ()) -> None:
    """Hold the frozen weights of `model` in `dtype` ('float32': as they are, 'bfloat16', 'int8'), in place;
    the modules named in `keep` (and all under them) stay as they are."""
    if dtype == "float32":
        return
    if dtype == "int8":
        # The matrices are rounded to bfloat16 before quantizing, so that a base loaded straight into
        # bfloat16 (base_load_dtype: no float32 copy of a 1B model in memory) and a float32 base (finetune
        # merge loads one) give the same int8 values; the rest (norms, biases) computes in float32.
        _cast_frozen(model, keep=keep, matrices=torch.bfloat16, rest=torch.float32)
        training = model.training
        # Every Linear and embedding table but the kept ones, on the reference kernel (dequantize a block of
        # rows, then F.linear). fbgemm's pack, built on first use, holds the weights twice more (its own int8
        # copy and the packed layout: measured +0.8 GB for 0.5B int8 weights, so ~2.5 GB at Llama-3.2-1B beside
        # the 1.2 GB base) for a forward ~2.4x as fast (512 x 2048 -> 8192, AMD EPYC Zen 3, busy); the backward
        # is float either way. Memory is what an int8 base is for.
        quantize_model(model, "int8", kernel="reference", skip=keep)
        for module in model.modules():
            if isinstance(module, Int8Embedding):
                module.out_dtype = torch.float32  # lookups feed float32 blocks
        model.train(training)
        return
    if dtype != "bfloat16":
        raise ValueError(f"unknown LoRA base_dtype {dtype!r}; choose float32, bfloat16 or int8")
    # As model.to(bfloat16) would, buffers too (RoPE allows for it).
    _cast_frozen(model, keep=keep, matrices=torch.bfloat16, rest=torch.bfloat16)


def _cast_frozen(model: nn.Module, *, keep: Collection[str], matrices: torch.dtype, rest: torch.dtype) -> None:
    """Cast the float weights of every Linear and Embedding to `matrices`, every other float parameter and
    buffer to `rest`, in place, except in the modules named in `keep`. The same Parameter objects stay (a tied
    matrix stays tied), and nothing here outlives the call (a 1B base is quantized right after)."""
    kept = {id(m) for name in keep for m in model.get_submodule(name).modules()}
    for module in model.modules():
        if id(module) in kept:
            continue
        matrix = module.weight if isinstance(module, nn.Linear | nn.Embedding) else None
        for p in module.parameters(recurse=False):
            if p.is_floating_point():
                p.data = p.data.to(matrices if p is matrix else rest)
        for name, b in list(module.named_buffers(recurse=False)):
            if b is not None and b.is_floating_point():
                setattr(module, name, b.to(rest))


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """The model's LoRALinear layers by module name (empty when it has none)."""
    return {n: m for n, m in unwrap(model).named_modules() if isinstance(m, LoRALinear)}


def lora_config(model: nn.Module) -> LoRAConfig | None:
    """The LoRAConfig the model's adapters were built with, or None without adapters."""
    layers = lora_layers(model)
    return next(iter(layers.values())).config if layers else None


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapter matrices (every lora_A and lora_B) of `model`."""
    return [p for n, p in unwrap(model).named_parameters() if ".lora_" in f".{n}"]


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weight (W + B·A·alpha/r) in place: plain nn.Linear layers again. Over an int8
    or bfloat16 base (LoRAConfig.base_dtype) the whole model becomes float32: dequantized, then merged."""
    model = unwrap(model)
    config = lora_config(model)
    for name, layer in lora_layers(model).items():
        frozen = layer.base_weight()
        # float32 adapters over a bf16 base merge into float32: in bf16 most of a small update would round away.
        dtype = torch.promote_types(frozen.dtype, layer.lora_A.dtype)
        bias = layer.base_bias()
        # skip_init: a new layer would draw its init from the global RNG, moving a run being checkpointed.
        merged = nn.utils.skip_init(nn.Linear, layer.in_features, layer.out_features, bias=bias is not None,
                                    device=frozen.device, dtype=dtype)
        merged.weight = nn.Parameter((frozen.float() + layer.delta_weight()).to(dtype),
                                     requires_grad=layer.base is None and frozen.requires_grad)
        if bias is not None:
            merged.bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias, requires_grad=False)
        if isinstance(model, GPT) and name == "lm_head" and model.config.tie_word_embeddings:
            # The update belongs to the head alone; folding it into a shared matrix would change the
            # token embeddings too, so the merged model stores its head separately.
            model.config = dataclasses.replace(model.config, tie_word_embeddings=False)
        _set_submodule(model, name, merged)
    if config is not None and config.base_dtype == "int8":
        dequantize_model(model)
    elif config is not None and config.base_dtype == "bfloat16":
        model.float()
    return model


# ---------------------------------------------------------------------------------------------
# Saving and loading adapters on their own
# ---------------------------------------------------------------------------------------------


def adapter_state(model: nn.Module) -> dict[str, Tensor]:
    """What a set of adapters consists of: every lora_A/lora_B plus any other parameter that trains."""
    model = unwrap(model)
    # requires_grad marks what fine-tuning changed: the adapters, and e.g. a new classification head.
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad or ".lora_" in f".{n}"}


def save_adapters(
    model: nn.Module, directory: str | Path, *, base: str | None = None, extra: dict[str, Any] | None = None
) -> Path:
    """Write adapter.safetensors + adapter_config.json (LoRA config, base model config) into `directory`."""
    config = lora_config(model)
    if config is None:
        raise ValueError("the model has no LoRA adapters to save; apply_lora() first")
    inner = unwrap(model)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = float32_weights(adapter_state(inner))  # float32 on disk, as models are
    save_tensors(state, directory / ADAPTER_FILE, metadata={"format": "pt"})
    meta = {
        "format": ADAPTER_FORMAT, "format_version": ADAPTER_FORMAT_VERSION,
        "lora": config_to_dict(config),
        "layers": sorted(lora_layers(inner)),
        "other_tensors": sorted(n for n in state if ".lora_" not in f".{n}"),
        "base": {"source": base, "model": inner.config.to_dict() if isinstance(inner, GPT) else None},
        "parameters": sum(t.numel() for t in state.values()),
        **(extra or {}),
    }
    write_json(directory / ADAPTER_CONFIG_FILE, meta)
    return directory


def read_adapter_config(directory: str | Path) -> dict[str, Any]:
    """adapter_config.json of an adapter directory, checked for format and version."""
    path = Path(directory) / ADAPTER_CONFIG_FILE
    meta = read_json(path)
    if not isinstance(meta, dict) or meta.get("format") != ADAPTER_FORMAT:
        raise CheckpointError(f"{path}: not a scratchgpt LoRA adapter config (no \"format\": \"{ADAPTER_FORMAT}\")")
    if meta.get("format_version", 0) > ADAPTER_FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {meta['format_version']} is newer than this scratchgpt reads")
    return meta


def load_adapters(model: nn.Module, directory: str | Path, *, generator: torch.Generator | None = None) -> nn.Module:
    """Apply the adapters saved in `directory` to `model` (a compatible base) and load their weights."""
    directory = Path(directory)
    meta = read_adapter_config(directory)
    source = directory / ADAPTER_CONFIG_FILE
    inner = unwrap(model)
    base_model = (meta.get("base") or {}).get("model")
    if isinstance(inner, GPT) and base_model:
        ours = {k: v for k, v in inner.config.to_dict().items() if k not in _SHAPE_FREE_FIELDS}
        theirs = {k: v for k, v in base_model.items() if k not in _SHAPE_FREE_FIELDS}
        diff = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
        if diff:
            raise CheckpointError(
                f"{source}: these adapters were trained on a different base model "
                f"({', '.join(f'{k}={theirs.get(k)!r} vs {ours.get(k)!r}' for k in diff[:3])})"
            )
    try:
        config = config_from_dict(LoRAConfig, meta["lora"], source=str(source))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: invalid LoRA config: {e}") from None
    # What trained besides the adapters (a classification head) stays float, as it did in training.
    keep = sorted({n.rpartition(".")[0] for n in meta.get("other_tensors", [])} - {""})
    apply_lora(inner, config, generator=generator, keep=keep)
    state = load_tensors(directory / ADAPTER_FILE, device=next(inner.parameters()).device)
    params = dict(inner.named_parameters())
    missing = sorted(n for n in params if ".lora_" in f".{n}" and n not in state)
    unexpected = sorted(n for n in state if n not in params)
    if missing or unexpected:
        raise CheckpointError(
            f"{directory / ADAPTER_FILE}: adapters do not fit this model "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    with torch.no_grad():
        for name, tensor in state.items():
            if tuple(tensor.shape) != tuple(params[name].shape):
                raise CheckpointError(
                    f"{directory / ADAPTER_FILE}: {name} has shape {tuple(tensor.shape)}, "
                    f"the model needs {tuple(params[name].shape)}"
                )
            params[name].copy_(tensor)
    return model


def count_parameters(model: nn.Module) -> dict[str, int]:
    """{"trainable": ..., "total": ...} parameters of `model` (a tied matrix counts once; int8 weights count)."""
    model = unwrap(model)
    params = list(model.parameters())
    int8 = {id(m.weight): m.weight.numel() for m in model.modules() if isinstance(m, Int8Linear | Int8Embedding)}
    return {"trainable": sum(p.numel() for p in params if p.requires_grad),
            "total": sum(p.numel() for p in params) + sum(int8.values())}
