"""Checkpoints: scratchgpt run directories and Hugging Face GPT-2 import/export.

A run directory is self-describing and pickle-free:
    config.json          {"format": "scratchgpt", "format_version": 1, "model": {...}, ...}
    model.safetensors    the unwrapped module's weights (a tied lm_head is stored once, as wte)
    tokenizer.json (+ files the tokenizer needs)
Training adds its own state beside these (see train.py). Every file is written under a temporary
name and renamed into place, so a crash mid-save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from scratchgpt.config import GPTConfig
from scratchgpt.files import atomic_write, atomic_write_text, write_json  # noqa: F401 (part of this API)
from scratchgpt.model.gpt import GPT

FORMAT = "scratchgpt"
FORMAT_VERSION = 1
HF_MODEL_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated, corrupted or of an unknown kind (one-line message)."""


# ---------------------------------------------------------------------------------------------
# Small I/O helpers
# ---------------------------------------------------------------------------------------------


def read_json(path: str | Path) -> Any:
    """Parse a JSON file, turning every failure into a one-line CheckpointError naming the file."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}); the file is corrupted, restore or re-create it") from None


def save_tensors(tensors: dict[str, Tensor], path: str | Path, *, metadata: dict[str, str] | None = None) -> None:
    """Atomically save a flat dict of tensors as safetensors."""
    flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda p: save_file(flat, str(p), metadata=metadata))


def load_tensors(path: str | Path, *, device: torch.device | str = "cpu") -> dict[str, Tensor]:
    """Load a safetensors file; a missing, truncated or corrupted file gives a one-line CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(
            f"{path}: truncated or corrupted safetensors file ({msg}); restore it or use another checkpoint"
        ) from None


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


# ---------------------------------------------------------------------------------------------
# scratchgpt run directories
# ---------------------------------------------------------------------------------------------


def model_state(model: nn.Module) -> dict[str, Tensor]:
    """Weights of the unwrapped model, with a tied lm_head stored once (as transformer.wte.weight)."""
    model = unwrap(model)
    state = model.state_dict()
    if isinstance(model, GPT) and model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state


def save_model(
    model: nn.Module, run_dir: str | Path, *, tokenizer: Any = None, extra: dict[str, Any] | None = None
) -> Path:
    """Write model.safetensors + config.json (+ tokenizer) into `run_dir`; returns the directory."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    inner = unwrap(model)
    if not isinstance(inner, GPT):
        raise TypeError(f"save_model expects a GPT, got {type(inner).__name__}")
    save_tensors(model_state(inner), run_dir / "model.safetensors", metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save(run_dir)
    cfg = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": inner.config.to_dict(), **(extra or {})}
    write_json(run_dir / "config.json", cfg)  # written last: its presence marks a complete checkpoint
    return run_dir


def read_run_config(run_dir: str | Path) -> dict[str, Any]:
    """config.json of a scratchgpt run directory, upgraded to the current format version."""
    path = Path(run_dir) / "config.json"
    cfg = read_json(path)
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a scratchgpt checkpoint (no \"format\": \"{FORMAT}\")")
    version = cfg.get("format_version", 0)
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format_version {version} is newer than this scratchgpt understands ({FORMAT_VERSION}); "
            f"upgrade scratchgpt"
        )
    # Version 0 had no version field and no separate model section; upgrade in memory.
    if version == 0 and "model" not in cfg:
        cfg = {"format": FORMAT, "format_version": FORMAT_VERSION,
               "model": {k: v for k, v in cfg.items() if k != "format"}}
    return cfg


def load_model(
    run_dir: str | Path, *, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
    prepare: Callable[[GPT, dict[str, Any]], None] | None = None,
) -> tuple[GPT, dict[str, Any]]:
    """Load a scratchgpt run directory: (model in eval mode, its config.json as a dict).

    `prepare(model, config_json)` runs on the empty (meta) model before the weights are assigned, for
    checkpoints whose model carries more than a plain GPT (e.g. a classification head).
    """
    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    if cfg.get("quantization"):  # int8 weights + scales: rebuilt by the quantize module
        if prepare is not None or dtype is not None:
            raise CheckpointError(f"{run_dir}: an int8-quantized model loads for inference only (no dtype "
                                  f"change, no task head); use its float checkpoint")
        return load_quantized(run_dir, cfg, device=device), cfg
    try:
        config = GPTConfig.from_dict(cfg["model"], source=str(run_dir / "config.json"))
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{run_dir / 'config.json'}: invalid model config: {e}") from None
    model = GPT(config, device="meta")
    if prepare is not None:
        prepare(model, cfg)
    state = load_tensors(run_dir / "model.safetensors")
    _load_state_strict(model, state, source=run_dir / "model.safetensors")
    model = model.to(device=device, dtype=dtype)
    return model.eval(), cfg


def _load_state_strict(model: GPT, state: dict[str, Tensor], *, source: str | Path) -> None:
    """Assign weights into a (meta) model; any missing, unexpected or mis-shaped key is an error."""
    if model.config.tie_word_embeddings:
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    expected = {k: p for k, p in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: weights do not match the config (missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''})"
        )
    for k, v in state.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise CheckpointError(
                f"{source}: {k} has shape {tuple(v.shape)}, the config needs {tuple(expected[k].shape)}"
            )
    model.load_state_dict(state, strict=False, assign=True)
    if model.config.tie_word_embeddings:
        model.lm_head.weight = model.transformer.wte.weight
    # Non-persistent buffers (causal mask, sinusoidal table) were created on the meta device.
    model.reset_buffers(device=state[next(iter(state))].device if state else "cpu")


# ---------------------------------------------------------------------------------------------
# Hugging Face GPT-2 interop: the one name map
# ---------------------------------------------------------------------------------------------

# HF's GPT-2 uses Conv1D, which stores weights as (in, out); nn.Linear stores (out, in). These four
# are the only weights that differ; every other name and tensor maps unchanged.
_TRANSPOSED_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def _is_transposed(name: str) -> bool:
    return name.endswith(_TRANSPOSED_SUFFIXES)


def hf_to_scratchgpt(hf_state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Map a `GPT2LMHeadModel` (or `GPT2Model`) state dict to scratchgpt names and layouts."""
    out = {}
    for name, tensor in hf_state.items():
        if name.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # old transformers saved its causal-mask buffers; we derive ours
        if not name.startswith(("transformer.", "lm_head.")):
            name = "transformer." + name  # saved from GPT2Model (e.g. OpenAI's own hub files)
        out[name] = tensor.t().contiguous() if _is_transposed(name) else tensor
    return out


def scratchgpt_to_hf(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Map scratchgpt weights to `GPT2LMHeadModel` names and Conv1D layouts (inverse of the above)."""
    return {name: (t.t().contiguous() if _is_transposed(name) else t) for name, t in state.items()}


_HF_ACTIVATIONS = {"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "relu": "relu"}


def config_from_hf(hf: dict[str, Any], *, source: str = "config.json") -> GPTConfig:
    """GPTConfig from a Hugging Face GPT-2 config.json dict; unsupported variants are refused."""
    if hf.get("model_type") != "gpt2":
        raise CheckpointError(f"{source}: model_type {hf.get('model_type')!r} is not 'gpt2'")
    act = hf.get("activation_function", "gelu_new")
    if act not in _HF_ACTIVATIONS:
        raise CheckpointError(
            f"{source}: activation_function {act!r} is not supported; use one of {list(_HF_ACTIVATIONS)}"
        )
    n_inner = hf.get("n_inner")
    if n_inner not in (None, 4 * hf["n_embd"]):
        raise CheckpointError(f"{source}: n_inner={n_inner} is not supported (scratchgpt uses 4 * n_embd)")
    for flag, ok in (("scale_attn_by_inverse_layer_idx", False), ("reorder_and_upcast_attn", False),
                     ("scale_attn_weights", True)):
        if hf.get(flag, ok) != ok:
            raise CheckpointError(f"{source}: {flag}={hf[flag]} is not supported")
    return GPTConfig(
        vocab_size=hf["vocab_size"], n_positions=hf["n_positions"], n_embd=hf["n_embd"],
        n_layer=hf["n_layer"], n_head=hf["n_head"],
        embd_pdrop=hf.get("embd_pdrop", 0.1), resid_pdrop=hf.get("resid_pdrop", 0.1),
        attn_pdrop=hf.get("attn_pdrop", 0.1), layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
        initializer_range=hf.get("initializer_range", 0.02),
        tie_word_embeddings=hf.get("tie_word_embeddings", True), activation=_HF_ACTIVATIONS[act],
    )


def config_to_hf(config: GPTConfig) -> dict[str, Any]:
    """A Hugging Face GPT-2 config.json dict for `config`; refuses what GPT2LMHeadModel cannot express."""
    if config.pos_encoding != "learned":
        raise ValueError("cannot export to Hugging Face GPT-2: it has learned positions only "
                         f"(this model uses pos_encoding={config.pos_encoding!r})")
    if not config.bias:
        raise ValueError("cannot export to Hugging Face GPT-2: its Linear layers and LayerNorms always have "
                         "biases (this model has bias=False)")
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": config.vocab_size, "n_positions": config.n_positions, "n_ctx": config.n_positions,
        "n_embd": config.n_embd, "n_layer": config.n_layer, "n_head": config.n_head, "n_inner": None,
        "activation_function": "gelu_new" if config.activation == "gelu" else "relu",
        "embd_pdrop": config.embd_pdrop, "resid_pdrop": config.resid_pdrop, "attn_pdrop": config.attn_pdrop,
        "layer_norm_epsilon": config.layer_norm_epsilon, "initializer_range": config.initializer_range,
        "tie_word_embeddings": config.tie_word_embeddings,
        # GPT-2's <|endoftext|> is 50256; a smaller (custom) vocabulary has no such id.
        "bos_token_id": 50256 if config.vocab_size > 50256 else None,
        "eos_token_id": 50256 if config.vocab_size > 50256 else None,
    }


def _read_hf_weights(directory: Path) -> dict[str, Tensor]:
    single = directory / "model.safetensors"
    index = directory / "model.safetensors.index.json"
    if single.is_file():
        return load_tensors(single)
    if index.is_file():
        shards = sorted(set(read_json(index)["weight_map"].values()))
        state: dict[str, Tensor] = {}
        for shard in shards:
            state.update(load_tensors(directory / shard))
        return state
    pt = directory / "pytorch_model.bin"
    if pt.is_file():
        try:
            # weights_only=True: a .bin is a pickle, and we never unpickle arbitrary objects.
            return torch.load(pt, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file for the user
            raise CheckpointError(f"{pt}: cannot be read as plain weights ({str(e).splitlines()[0]})") from None
    raise CheckpointError(f"{directory}: no model.safetensors or pytorch_model.bin found")


def _resolve_hf(name_or_dir: str | Path) -> Path:
    """A local directory, or a hub name downloaded (and cached) with huggingface_hub."""
    path = Path(name_or_dir)
    if path.is_dir():
        return path
    name = str(name_or_dir)
    if name not in HF_MODEL_NAMES and "/" not in name:
        raise CheckpointError(f"{name}: no such directory, and not a known hub name {list(HF_MODEL_NAMES)}")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(f"{name}: downloading needs huggingface_hub: pip install 'scratchgpt[hub]'") from None
    try:
        return Path(snapshot_download(
            repo_id=name if "/" in name else f"openai-community/{name}",
            allow_patterns=["config.json", "model.safetensors", "vocab.json", "merges.txt"],
        ))
    except Exception as e:  # noqa: BLE001 - network/hub errors come in many types
        raise CheckpointError(
            f"{name}: could not download from the Hugging Face hub ({type(e).__name__}); when offline, "
            f"pass a local directory holding config.json and model.safetensors"
        ) from None


def load_hf(
    name_or_dir: str | Path, *, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
    **config_overrides: Any,
) -> GPT:
    """A GPT from a Hugging Face GPT-2 directory or hub name (`gpt2` ... `gpt2-xl`), in eval mode."""
    directory = _resolve_hf(name_or_dir)
    hf_cfg = read_json(directory / "config.json")
    config = config_from_hf(hf_cfg, source=str(directory / "config.json"))
    if config_overrides:
        config = GPTConfig.from_dict({**config.to_dict(), **config_overrides})
    model = GPT(config, device="meta")
    _load_state_strict(model, hf_to_scratchgpt(_read_hf_weights(directory)), source=directory)
    return model.to(device=device, dtype=dtype).eval()


def save_hf(model: nn.Module, directory: str | Path, *, tokenizer: Any = None) -> Path:
    """Write `model` as a Hugging Face GPT-2 directory that `GPT2LMHeadModel.from_pretrained` loads."""
    inner = unwrap(model)
    if not isinstance(inner, GPT):
        raise TypeError(f"save_hf expects a GPT, got {type(inner).__name__}")
    hf_config = config_to_hf(inner.config)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_tensors(scratchgpt_to_hf(model_state(inner)), directory / "model.safetensors", metadata={"format": "pt"})
    write_json(directory / "config.json", hf_config)
    if tokenizer is not None and hasattr(tokenizer, "save_hf"):
        tokenizer.save_hf(directory)
    return directory


# ---------------------------------------------------------------------------------------------
# One entry point for "give me a model from this path or name"
# ---------------------------------------------------------------------------------------------


def saved_chat_template(path: str | Path, *, default: str = "alpaca") -> str:
    """The chat template a scratchgpt checkpoint was instruction-tuned with, else `default`."""
    if checkpoint_kind(path) != FORMAT:
        return default
    return read_run_config(path).get("chat_template") or default


def checkpoint_kind(path: str | Path) -> str:
    """'scratchgpt' for a run directory, 'hf' for a Hugging Face directory or hub name."""
    cfg_path = Path(path) / "config.json"
    if cfg_path.is_file():
        cfg = read_json(cfg_path)
        if isinstance(cfg, dict) and cfg.get("format") == FORMAT:
            return FORMAT
        if isinstance(cfg, dict) and cfg.get("model_type") == "gpt2":
            return "hf"
        raise CheckpointError(f"{cfg_path}: neither a scratchgpt checkpoint nor a Hugging Face GPT-2 config")
    if Path(path).exists():
        raise CheckpointError(f"{path}: no config.json; not a checkpoint directory")
    return "hf"  # a hub name; _resolve_hf checks it


def load_any(
    path_or_name: str | Path, *, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
    quantize: str | None = None, inference_dtype: str | None = None,
) -> tuple[GPT, Any]:
    """(model, tokenizer) from a scratchgpt run directory, a Hugging Face directory, or a hub name.

    `quantize` ("int8") and `inference_dtype` ("bfloat16") prepare the model for fast inference
    (see model/quantize.py); an already-quantized run directory loads as it is.
    """
    from scratchgpt.data.tokenizer import gpt2_tokenizer, load_tokenizer

    if checkpoint_kind(path_or_name) == FORMAT:
        model, _ = load_model(path_or_name, device=device, dtype=dtype)
        tokenizer = load_tokenizer(path_or_name)
    else:
        model = load_hf(path_or_name, device=device, dtype=dtype)
        directory = _resolve_hf(path_or_name)
        has_files = (directory / "vocab.json").is_file() or (directory / "encoder.json").is_file()
        tokenizer = gpt2_tokenizer(directory if has_files else None)
    if quantize or inference_dtype:
        from scratchgpt.model.quantize import prepare_for_inference

        prepare_for_inference(model, quantize=quantize, dtype=inference_dtype, device=device)
    return model, tokenizer


# ---------------------------------------------------------------------------------------------
# Saving and loading quantized run directories
# ---------------------------------------------------------------------------------------------


def save_quantized(model: nn.Module, run_dir: str | Path, *, tokenizer: Any = None,
                   extra: dict[str, Any] | None = None) -> Path:
    """Write a quantized GPT as a run directory (int8 weights + float32 scales in safetensors + JSON)."""
    from scratchgpt.model.quantize import Int8Linear, quantized_mode

    model = unwrap(model)
    mode = quantized_mode(model)
    if mode is None:
        raise ValueError("save_quantized expects a quantized model; call quantize_model() first")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings and not isinstance(model.lm_head, Int8Linear):
        state.pop("lm_head.weight", None)
    layers = sorted(name for name, m in model.named_modules() if isinstance(m, Int8Linear))
    save_tensors(state, run_dir / "model.safetensors", metadata={"format": "pt", "quantization": mode})
    if tokenizer is not None:
        tokenizer.save(run_dir)
    quant = {"mode": mode, "scheme": "per-output-channel symmetric int8 weights, float32 scales", "layers": layers}
    cfg = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": model.config.to_dict(),
           "quantization": quant, **(extra or {})}
    write_json(run_dir / "config.json", cfg)  # last: its presence marks a complete checkpoint
    return run_dir


def load_quantized(run_dir: str | Path, cfg: dict[str, Any], *, device: torch.device | str = "cpu",
                   kernel: str | None = None) -> nn.Module:
    """Rebuild a model saved by `save_quantized` (config.json already read into `cfg`)."""
    from scratchgpt.model.quantize import QUANT_MODES, Int8Linear, default_kernel

    run_dir = Path(run_dir)
    source = run_dir / "config.json"
    quant = cfg.get("quantization") or {}
    if quant.get("mode") not in QUANT_MODES:
        raise CheckpointError(f"{source}: unknown quantization {quant.get('mode')!r}; this scratchgpt reads "
                              f"{', '.join(QUANT_MODES)}")
    try:
        config = GPTConfig.from_dict(cfg["model"], source=str(source))
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{source}: invalid model config: {e}") from None
    state = load_tensors(run_dir / "model.safetensors")
    model = GPT(config, device="meta")
    layers = set(quant.get("layers") or [])
    for parent_name, parent in list(model.named_modules()):
        for attr, child in list(parent.named_children()):
            name = f"{parent_name}.{attr}" if parent_name else attr
            if isinstance(child, nn.Linear) and name in layers:
                bias = f"{name}.bias" in state
                setattr(parent, attr, Int8Linear(child.in_features, child.out_features, bias=bias,
                                                 kernel=kernel or default_kernel(), device="meta"))
    expected = set(model.state_dict())
    if config.tie_word_embeddings and "lm_head" not in layers:
        expected.discard("lm_head.weight")
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise CheckpointError(f"{run_dir / 'model.safetensors'}: weights do not match the quantized config "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    for name, m in model.named_modules():
        if isinstance(m, Int8Linear) and state[f"{name}.weight"].dtype != torch.int8:
            raise CheckpointError(f"{run_dir / 'model.safetensors'}: {name}.weight is "
                                  f"{state[f'{name}.weight'].dtype}, expected int8")
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings and "lm_head" not in layers:
        model.lm_head.weight = model.transformer.wte.weight
    model.reset_buffers(device=device)
    return model.to(device).eval()


# ---------------------------------------------------------------------------------------------
# Training state: step checkpoints, the `latest` pointer, the exported best/final model
# ---------------------------------------------------------------------------------------------
#
#   run_dir/
#     ckpt-00000500/   model.safetensors, config.json, tokenizer files   (a loadable run directory)
#                      train_state.safetensors   optimizer moments, torch RNG states (per rank)
#                      train_state.json          step, sampler position, python/numpy RNG, scaler, ...
#     latest           "ckpt-00000500": the checkpoint to resume from (replaced atomically)
#     model.safetensors, config.json, tokenizer files   the latest model (hard links into ckpt-*)
#     best/            the model with the lowest validation loss so far
#
# Each ckpt-* folder is written under a temporary name and renamed into place; train_state.json is
# its last file, so a folder without it is never read. Nothing is pickled: RNG states are uint8 tensors
# (safetensors) or lists of integers (JSON).

CKPT_PREFIX = "ckpt-"
LATEST_FILE = "latest"
BEST_DIR = "best"
TRAIN_STATE_JSON = "train_state.json"
TRAIN_STATE_TENSORS = "train_state.safetensors"
TRAIN_STATE_FORMAT = "scratchgpt-train-state"
_TRAIN_STATE_FILES = (TRAIN_STATE_JSON, TRAIN_STATE_TENSORS)


def checkpoint_name(step: int) -> str:
    """Folder name of the checkpoint after `step` optimizer steps (zero-padded, so names sort by step)."""
    return f"{CKPT_PREFIX}{step:08d}"


def _fsync_dir(path: Path) -> None:
    # Make the renames inside `path` durable; not every platform can open a directory.
    with suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete step checkpoints in `run_dir` (those with train_state.json), oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [p for p in run_dir.glob(f"{CKPT_PREFIX}*") if p.is_dir() and (p / TRAIN_STATE_JSON).is_file()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint `run_dir/latest` points at; the newest complete one if the pointer is missing; else None."""
    run_dir = Path(run_dir)
    pointer = run_dir / LATEST_FILE
    if pointer.is_file():
        name = pointer.read_text().strip()
        ckpt = run_dir / name
        if not name.startswith(CKPT_PREFIX) or not (ckpt / TRAIN_STATE_JSON).is_file():
            raise CheckpointError(f"{pointer}: points at {name!r}, which is not a complete checkpoint in {run_dir}")
        return ckpt
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def write_training_checkpoint(
    run_dir: str | Path,
    step: int,
    *,
    write_model: Callable[[Path], None],
    tensors: dict[str, Tensor],
    state: dict[str, Any],
    keep_last: int,
) -> Path:
    """Write `run_dir/ckpt-<step>/` atomically, point `latest` at it and prune to the last `keep_last`.

    `write_model(folder)` writes the model files (model.safetensors, config.json, tokenizer); `tensors`
    and `state` become train_state.safetensors and train_state.json.
    """
    run_dir = Path(run_dir)
    name = checkpoint_name(step)
    tmp = run_dir / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write_model(tmp)
        save_tensors(tensors, tmp / TRAIN_STATE_TENSORS, metadata={"format": TRAIN_STATE_FORMAT})
        write_json(tmp / TRAIN_STATE_JSON, {"format": TRAIN_STATE_FORMAT, "format_version": 1, **state})
        _fsync_dir(tmp)
        final = run_dir / name
        if final.exists():  # the same step saved again: move the old one aside, then swap
            old = run_dir / f".old-{name}-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(run_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_text(run_dir / LATEST_FILE, name + "\n")
    prune_checkpoints(run_dir, keep_last=keep_last)
    return final


def prune_checkpoints(run_dir: str | Path, *, keep_last: int) -> None:
    """Delete all but the newest `keep_last` step checkpoints (never the one `latest` names) and temp folders."""
    run_dir = Path(run_dir)
    pointer = run_dir / LATEST_FILE
    keep = {pointer.read_text().strip()} if pointer.is_file() else set()
    ckpts = list_checkpoints(run_dir)
    for ckpt in ckpts[: max(len(ckpts) - keep_last, 0)]:
        if ckpt.name not in keep:
            shutil.rmtree(ckpt, ignore_errors=True)
    for stale in run_dir.glob(f".tmp-{CKPT_PREFIX}*"):
        # A folder from a process that died mid-save; ours is already renamed by now.
        shutil.rmtree(stale, ignore_errors=True)


def export_model_files(src: str | Path, dst: str | Path) -> Path:
    """Make `dst` a loadable run directory with the model files of checkpoint `src` (hard links where possible).

    Only the files are replaced (each atomically, config.json last), so `dst` may be the run directory
    itself, next to log.csv and the checkpoints.
    """
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    names = sorted(p.name for p in src.iterdir() if p.is_file() and p.name not in _TRAIN_STATE_FILES)
    for name in sorted(names, key=lambda n: n == "config.json"):  # config.json last: it marks completeness
        tmp = dst / f".{name}.{os.getpid()}.tmp"
        tmp.unlink(missing_ok=True)
        try:
            os.link(src / name, tmp)  # checkpoints are never modified in place, so sharing bytes is safe
        except OSError:
            shutil.copyfile(src / name, tmp)
        os.replace(tmp, dst / name)
    return dst


def replace_dir(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Replace folder `path` with one that `write(tmp)` fills: built aside, then swapped in by rename."""
    path = Path(path)
    tmp = path.parent / f".tmp-{path.name}-{os.getpid()}"
    old = path.parent / f".old-{path.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
    return path


def save_model_files(
    state: dict[str, Tensor], folder: str | Path, *, model_config: dict[str, Any] | None, tokenizer: Any = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """`save_model` for weights already gathered into `state` (e.g. from FSDP shards); config.json last."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_tensors(state, folder / "model.safetensors", metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save(folder)
    cfg: dict[str, Any] = {"format": FORMAT, "format_version": FORMAT_VERSION, **(extra or {})}
    if model_config is not None:
        cfg["model"] = model_config
    write_json(folder / "config.json", cfg)
    return folder


def read_training_checkpoint(ckpt_dir: str | Path) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Any]]:
    """(model weights, train_state tensors, train_state.json) of a step checkpoint; one-line errors naming the file."""
    ckpt_dir = Path(ckpt_dir)
    state = read_json(ckpt_dir / TRAIN_STATE_JSON)
    if not isinstance(state, dict) or state.get("format") != TRAIN_STATE_FORMAT:
        raise CheckpointError(f"{ckpt_dir / TRAIN_STATE_JSON}: not a scratchgpt training state")
    return load_tensors(ckpt_dir / "model.safetensors"), load_tensors(ckpt_dir / TRAIN_STATE_TENSORS), state


def load_module_state(model: nn.Module, state: dict[str, Tensor], *, source: str | Path) -> None:
    """Copy `state` into `model` in place (a tied lm_head may be absent); any other mismatch is a CheckpointError."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if isinstance(model, GPT) and model.config.tie_word_embeddings else set()
    missing = sorted(set(missing) - tied)
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: weights do not match the model (missing {missing[:3]}, unexpected {sorted(unexpected)[:3]})"
        )


# -- optimizer and RNG state as flat tensors + JSON ------------------------------------------------


def optimizer_state_to_flat(osd: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Split an optimizer state dict keyed by parameter name into safetensors tensors and a JSON part."""
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pname, pstate in osd["state"].items():
        for key, value in pstate.items():
            if isinstance(value, Tensor):
                tensors[f"optimizer/{pname}/{key}"] = value
            else:
                scalars.setdefault(str(pname), {})[key] = value
    return tensors, {"param_groups": osd["param_groups"], "scalars": scalars}


def optimizer_state_from_flat(tensors: dict[str, Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """Inverse of `optimizer_state_to_flat`."""
    state: dict[str, dict[str, Any]] = {k: dict(v) for k, v in meta.get("scalars", {}).items()}
    for key, value in tensors.items():
        if key.startswith("optimizer/"):
            _, pname, field_name = key.split("/", 2)
            state.setdefault(pname, {})[field_name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def capture_rng_state() -> tuple[dict[str, Any], dict[str, Tensor]]:
    """This process's python, numpy and torch (CPU, CUDA) RNG states: a JSON part and uint8 tensors."""
    import random

    import numpy as np

    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    json_part = {"python": [version, list(internal), gauss],
                 "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]}
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["torch_cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return json_part, tensors


def restore_rng_state(json_part: dict[str, Any], tensors: dict[str, Tensor]) -> None:
    """Inverse of `capture_rng_state`."""
    import random

    import numpy as np

    version, internal, gauss = json_part["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = json_part["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch_cpu"])
    if "torch_cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(tensors["torch_cuda"]))
