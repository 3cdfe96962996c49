"""Checkpoints: scratchgpt run directories, and Hugging Face folders in and out (name map: scratchgpt.hf).

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
import re
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
from scratchgpt.files import (  # noqa: F401 (API)
    WriteError,
    atomic_write,
    atomic_write_text,
    check_overwrite,
    file_mode,
    write_json,
)
from scratchgpt.hf import config_from_hf, config_to_hf, hf_to_scratchgpt, scratchgpt_to_hf  # noqa: F401 (API)
from scratchgpt.model.gpt import GPT, register_pretrained_loader

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
    """Weights of the unwrapped model to save, with a tied lm_head stored once (as transformer.wte.weight);
    bfloat16 weights as float32 (see `float32_weights`)."""
    model = unwrap(model)
    state = model.state_dict()
    if isinstance(model, GPT) and model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return float32_weights(state)


def float32_weights(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """`state` with its bfloat16 tensors (a bf16-true run's weights) as float32 CPU tensors, the rest as is.

    Why float32 on disk: every saved model then has the one format that every loader and export reads,
    the dtype to run in stays a choice made when loading (a CPU without native bf16 would crawl on bf16
    weights), and the cast is exact, so a resumed bf16-true run casts back to the very same weights.
    Cast on the CPU: a float32 copy of all weights at once may not fit beside the model on a GPU.
    """
    return {k: v.detach().cpu().float() if v.dtype == torch.bfloat16 else v for k, v in state.items()}


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
    if prepare is None and cfg.get("task") == "classification":
        raise CheckpointError(
            f"{run_dir}: a classifier (from `scratchgpt finetune classify`): it predicts labels, not text; use "
            f"`scratchgpt classify --checkpoint {run_dir} TEXT...` (or load it with load_classifier)"
        )
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
    if not missing and unexpected == ["lm_head.bias"]:
        raise CheckpointError(f"{source}: holds a classification head (lm_head.bias), not a language model head; "
                              f"use `scratchgpt classify` for a classifier")
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
    check_float_weights(state, source=source)
    model.load_state_dict(state, strict=False, assign=True)
    if model.config.tie_word_embeddings:
        model.lm_head.weight = model.transformer.wte.weight
    # Non-persistent buffers (causal mask, sinusoidal table) were created on the meta device.
    model.reset_buffers(device=state[next(iter(state))].device if state else "cpu")


# ---------------------------------------------------------------------------------------------
# Hugging Face folders (GPT-2, Llama, Qwen2, Qwen3) in and out; the name map is scratchgpt.hf
# ---------------------------------------------------------------------------------------------

SAFETENSORS_INDEX = "model.safetensors.index.json"


def _read_hf_weights(directory: Path) -> dict[str, Tensor]:
    single = directory / "model.safetensors"
    index = directory / SAFETENSORS_INDEX
    if single.is_file():
        return load_tensors(single)
    if index.is_file():
        try:
            weight_map = read_json(index)["weight_map"]
        except (KeyError, TypeError):
            raise CheckpointError(f"{index}: no \"weight_map\"; re-save the model or restore the index") from None
        state: dict[str, Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            shard_path = directory / shard
            if not shard_path.is_file():
                raise CheckpointError(f"{index} names shard {shard!r}, which is missing from {directory}")
            state.update(load_tensors(shard_path))
        missing = sorted(set(weight_map) - set(state))
        if missing:
            raise CheckpointError(f"{index}: {missing[:3]} are listed but absent from their shards")
        return state
    pt = directory / "pytorch_model.bin"
    if pt.is_file():
        try:
            # weights_only=True: a .bin is a pickle, and we never unpickle arbitrary objects.
            return torch.load(pt, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file for the user
            raise CheckpointError(f"{pt}: cannot be read as plain weights ({str(e).splitlines()[0]})") from None
    raise CheckpointError(f"{directory}: no model.safetensors, {SAFETENSORS_INDEX} or pytorch_model.bin found")


def _resolve_hf(name_or_dir: str | Path) -> Path:
    """A local directory, or a hub name downloaded (and cached) with huggingface_hub."""
    path = Path(name_or_dir)
    if path.is_dir():
        return path
    name = str(name_or_dir)
    # A path, not a hub name: say it is missing rather than fail a download nobody asked for.
    if path.exists() or name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1 or (
        "/" in name and path.parent.is_dir()
    ):
        raise CheckpointError(f"{name}: no such checkpoint directory")
    if name not in HF_MODEL_NAMES and "/" not in name:
        raise CheckpointError(f"{name}: no such directory, and not a known hub name {list(HF_MODEL_NAMES)}")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(f"{name}: downloading needs huggingface_hub: pip install 'scratchgpt[hub]'") from None
    try:
        return Path(snapshot_download(
            repo_id=name if "/" in name else f"openai-community/{name}",
            allow_patterns=["config.json", "model.safetensors", "model-*.safetensors", SAFETENSORS_INDEX,
                            "vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json"],
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
    """A GPT from a Hugging Face GPT-2 / Llama / Qwen2 / Qwen3 directory or hub name, in eval mode."""
    directory = _resolve_hf(name_or_dir)
    hf_cfg = read_json(directory / "config.json")
    try:
        config = config_from_hf(hf_cfg, source=str(directory / "config.json"))
    except ValueError as e:  # the message names config.json and the field
        raise CheckpointError(str(e)) from None
    if config_overrides:
        config = GPTConfig.from_dict({**config.to_dict(), **config_overrides})
    model = GPT(config, device="meta")
    weights = _read_hf_weights(directory)
    try:
        state = hf_to_scratchgpt(weights)
    except ValueError as e:
        raise CheckpointError(f"{directory}: {e}") from None
    _load_state_strict(model, state, source=directory)
    return model.to(device=device, dtype=dtype).eval()


# GPT.from_pretrained (nanoGPT's spelling of load_hf) cannot import this module (the model stage imports
# nothing above config); importing scratchgpt.checkpoint, or `scratchgpt.GPT`, hands it the loader.
register_pretrained_loader(load_hf)


def save_hf(
    model: nn.Module, directory: str | Path, *, tokenizer: Any = None, max_shard_bytes: int | None = None,
) -> Path:
    """Write `model` as a Hugging Face folder that transformers' `AutoModelForCausalLM` loads.

    The family (GPT-2, Llama, Qwen2, Qwen3) follows from the config (`hf_model_type`). With
    `max_shard_bytes`, weights go into model-0000k-of-0000n.safetensors shards plus an index file.
    """
    inner = unwrap(model)
    if not isinstance(inner, GPT):
        raise TypeError(f"save_hf expects a GPT, got {type(inner).__name__}")
    hf_config = config_to_hf(inner.config)
    state = scratchgpt_to_hf(model_state(inner), inner.config)
    if inner.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # transformers re-ties it from the embedding
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shards = _shard(state, max_shard_bytes)
    if len(shards) == 1:
        save_tensors(state, directory / "model.safetensors", metadata={"format": "pt"})
    else:
        weight_map = {}
        for k, shard in enumerate(shards, start=1):
            name = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
            save_tensors(shard, directory / name, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(t.numel() * t.element_size() for t in state.values())
        write_json(directory / SAFETENSORS_INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
    write_json(directory / "config.json", hf_config)
    if tokenizer is not None and hasattr(tokenizer, "save_hf"):
        tokenizer.save_hf(directory)
    return directory


def _shard(state: dict[str, Tensor], max_bytes: int | None) -> list[dict[str, Tensor]]:
    """Split `state` (in order) into groups of at most `max_bytes` (a bigger tensor gets its own)."""
    if max_bytes is None:
        return [state]
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += n
    return shards


def load_hf_tokenizer(directory: str | Path) -> Any:
    """The tokenizer of an HF folder: tokenizer.json via `tokenizers`, else GPT-2's BPE files, else
    GPT-2's tokenizer from the usual places (the folder of a GPT-2 model without tokenizer files)."""
    from scratchgpt.data.tokenizers import HFTokenizer, gpt2_tokenizer

    d = Path(directory)
    if (d / "tokenizer.json").is_file():
        return HFTokenizer.from_dir(d)
    has_files = (d / "vocab.json").is_file() or (d / "encoder.json").is_file()
    return gpt2_tokenizer(d if has_files else None)


# ---------------------------------------------------------------------------------------------
# One entry point for "give me a model from this path or name"
# ---------------------------------------------------------------------------------------------


def saved_chat_template(path: str | Path, *, tokenizer: Any = None, default: str = "alpaca") -> str:
    """The chat template for a checkpoint: the one a scratchgpt run was instruction-tuned with, else
    "tokenizer" when `tokenizer` (the loaded one) has its own chat template, else `default`."""
    from scratchgpt.data.chat import default_chat_template

    saved = read_run_config(path).get("chat_template") if checkpoint_kind(path) == FORMAT else None
    return default_chat_template(saved, tokenizer) if saved or tokenizer is not None else default


def checkpoint_kind(path: str | Path) -> str:
    """'scratchgpt' for a run directory, 'hf' for a Hugging Face directory or hub name."""
    cfg_path = Path(path) / "config.json"
    if cfg_path.is_file():
        cfg = read_json(cfg_path)
        if isinstance(cfg, dict) and cfg.get("format") == FORMAT:
            return FORMAT
        if isinstance(cfg, dict) and cfg.get("model_type") in ("gpt2", "llama", "qwen2", "qwen3"):
            return "hf"
        raise CheckpointError(f"{cfg_path}: neither a scratchgpt checkpoint nor a Hugging Face GPT-2, Llama, "
                              f"Qwen2 or Qwen3 config")
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
    from scratchgpt.data.tokenizers import load_tokenizer

    if checkpoint_kind(path_or_name) == FORMAT:
        model, _ = load_model(path_or_name, device=device, dtype=dtype)
        tokenizer = load_tokenizer(path_or_name)
    else:
        model = load_hf(path_or_name, device=device, dtype=dtype)
        tokenizer = load_hf_tokenizer(_resolve_hf(path_or_name))
    if tokenizer is not None and tokenizer.vocab_size > model.config.vocab_size:
        # Every id past the embedding would fail deep inside it (or, on a GPU, as a device-side assert).
        raise CheckpointError(f"{path_or_name}: its tokenizer has {tokenizer.vocab_size:,} tokens but the model "
                              f"only {model.config.vocab_size:,} embedding rows (vocab_size); they do not belong "
                              f"together: restore the checkpoint's own tokenizer files")
    if quantize or inference_dtype:
        from scratchgpt.model.quantize import prepare_for_inference

        prepare_for_inference(model, quantize=quantize, dtype=inference_dtype, device=device)
    return model, tokenizer


def describe_checkpoint(path_or_name: str | Path) -> tuple[GPTConfig, dict[str, Any]]:
    """(GPTConfig, {"kind", "tokenizer", "task"}) of a checkpoint, from its config files alone.

    Reads no weights and loads no tokenizer (so it works offline on a Hugging Face folder without
    vocabulary files); the tokenizer is named from tokenizer.json, or "gpt2" when GPT-2 files are there.
    """
    kind = checkpoint_kind(path_or_name)
    if kind == FORMAT:
        directory = Path(path_or_name)
        cfg = read_run_config(directory)
        try:
            config = GPTConfig.from_dict(cfg["model"], source=str(directory / "config.json"))
        except (TypeError, ValueError, KeyError) as e:
            raise CheckpointError(f"{directory / 'config.json'}: invalid model config: {e}") from None
        _check_header(directory / "model.safetensors")
        tok = directory / "tokenizer.json"
        tok_meta = read_json(tok) if tok.is_file() else None
        details = {"kind": kind, "tokenizer": tok_meta.get("type") if isinstance(tok_meta, dict) else None}
        if cfg.get("task"):
            details["task"] = cfg["task"]
        return config, details
    directory = _resolve_hf(path_or_name)
    config = config_from_hf(read_json(directory / "config.json"), source=str(directory / "config.json"))
    if (directory / "model.safetensors").is_file():
        _check_header(directory / "model.safetensors")
    if (directory / "tokenizer.json").is_file():
        tokenizer = "hf"  # the model's own tokenizer.json (Llama, Qwen, ...)
    elif (directory / "vocab.json").is_file() or (directory / "encoder.json").is_file():
        tokenizer = "gpt2"
    else:
        tokenizer = None
    return config, {"kind": kind, "tokenizer": tokenizer}


def _check_header(path: Path) -> None:
    """Read a safetensors file's header only (no tensor data): a missing or corrupted file is a CheckpointError."""
    from safetensors import safe_open

    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path}: truncated or corrupted safetensors file ({msg})") from None


def check_prepare_dir(directory: str | Path, *, overwrite: bool = False) -> None:
    """`prepare` writes train.bin, val.bin, meta.json and tokenizer files: never over earlier data, a model or
    a run without --overwrite (other files, such as the source text, may share the folder)."""
    check_overwrite(directory, overwrite=overwrite, flag="--dir", held=folder_contents(directory))



# ---------------------------------------------------------------------------------------------
# Saving and loading quantized run directories
# ---------------------------------------------------------------------------------------------


def save_quantized(model: nn.Module, run_dir: str | Path, *, tokenizer: Any = None,
                   extra: dict[str, Any] | None = None) -> Path:
    """Write a quantized GPT as a run directory (int8 weights + float32 scales in safetensors + JSON)."""
    from scratchgpt.model.quantize import Int8Embedding, Int8Linear, quantized_mode

    model = unwrap(model)
    mode = quantized_mode(model)
    if mode is None:
        raise ValueError("save_quantized expects a quantized model; call quantize_model() first")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v for k, v in model.state_dict().items()}
    if model.lm_head.weight is model.transformer.wte.weight:  # tied (float or int8): stored once, as wte
        state.pop("lm_head.weight", None)
        state.pop("lm_head.weight_scale", None)
    layers = sorted(name for name, m in model.named_modules() if isinstance(m, Int8Linear))
    embeddings = sorted(name for name, m in model.named_modules() if isinstance(m, Int8Embedding))
    save_tensors(state, run_dir / "model.safetensors", metadata={"format": "pt", "quantization": mode})
    if tokenizer is not None:
        tokenizer.save(run_dir)
    quant = {"mode": mode, "scheme": "per-output-channel symmetric int8 weights, float32 scales", "layers": layers,
             "embeddings": embeddings}
    cfg = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": model.config.to_dict(),
           "quantization": quant, **(extra or {})}
    write_json(run_dir / "config.json", cfg)  # last: its presence marks a complete checkpoint
    return run_dir


def quantize_checkpoint(src: str | Path, out: str | Path, mode: str = "int8", *, overwrite: bool = False) -> Path:
    """Quantize checkpoint `src` once and save it as the new run directory `out` (`export --format int8`).

    The tokenizer and what chat and serve read from a run (its chat template, its task) travel with it.
    `out` is written aside, then renamed into place; an existing non-empty `out` is refused unless
    `overwrite`, as are classifiers, already-quantized models and unmerged LoRA adapters.
    """
    from scratchgpt.model.quantize import quantize_model

    src, out = Path(src), Path(out)
    check_overwrite(out, overwrite=overwrite, flag="--out")
    run_cfg = read_run_config(src) if checkpoint_kind(src) == FORMAT else {}
    if run_cfg.get("task") == "classify":
        raise ValueError(f"{src} is a classifier (finetune classify); {mode} export is for language models")
    model, tokenizer = load_any(src)
    quantize_model(model, mode)  # refuses an already-quantized model and unmerged LoRA adapters
    extra = {k: run_cfg[k] for k in ("task", "chat_template") if k in run_cfg}
    return replace_dir(out, lambda tmp: save_quantized(model, tmp, tokenizer=tokenizer,
                                                       extra={**extra, "quantized_from": str(src)}))


def load_quantized(run_dir: str | Path, cfg: dict[str, Any], *, device: torch.device | str = "cpu",
                   kernel: str | None = None) -> nn.Module:
    """Rebuild a model saved by `save_quantized` (config.json already read into `cfg`)."""
    from scratchgpt.model.quantize import QUANT_MODES, Int8Embedding, Int8Linear, default_kernel

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
    # Files written before embeddings were quantized have no "embeddings": their tables load as float.
    embeddings = set(quant.get("embeddings") or [])
    for parent_name, parent in list(model.named_modules()):
        for attr, child in list(parent.named_children()):
            name = f"{parent_name}.{attr}" if parent_name else attr
            if isinstance(child, nn.Linear) and name in layers:
                bias = f"{name}.bias" in state
                setattr(parent, attr, Int8Linear(child.in_features, child.out_features, bias=bias,
                                                 kernel=kernel or default_kernel(device), device="meta"))
            elif isinstance(child, nn.Embedding) and name in embeddings:
                setattr(parent, attr, Int8Embedding(child.num_embeddings, child.embedding_dim, device="meta"))
    # A tied head is stored once, as wte: float wte + float head, or int8 wte + int8 head (shared).
    tied = config.tie_word_embeddings and ("lm_head" in layers) == ("transformer.wte" in embeddings)
    expected = set(model.state_dict())
    if tied:
        expected -= {"lm_head.weight", "lm_head.weight_scale"}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise CheckpointError(f"{run_dir / 'model.safetensors'}: weights do not match the quantized config "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    for name, m in model.named_modules():
        stored = state.get(f"{name}.weight")  # None: a tied head, checked as wte
        if isinstance(m, Int8Linear | Int8Embedding) and stored is not None and stored.dtype != torch.int8:
            raise CheckpointError(f"{run_dir / 'model.safetensors'}: {name}.weight is {stored.dtype}, expected int8")
    model.load_state_dict(state, strict=False, assign=True)
    if tied:
        model.lm_head.weight = model.transformer.wte.weight
        if isinstance(model.lm_head, Int8Linear):
            model.lm_head.weight_scale = model.transformer.wte.weight_scale
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
    """Replace folder `path` with one that `write(tmp)` fills: built aside, then swapped in by rename.

    Between the two renames `path` is briefly absent; a process killed right there leaves
    `.old-<name>-<pid>` and the complete `.tmp-<name>-<pid>`, from which `recover_replaced_dir` (run
    at the next start of training in that folder) puts `path` back.
    """
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
    if old.is_dir():
        shutil.rmtree(old, ignore_errors=True)
    else:  # a file the folder replaces (--overwrite)
        old.unlink(missing_ok=True)
    return path


def recover_replaced_dir(path: str | Path) -> Path | None:
    """Undo a `replace_dir` that was killed between its two renames: the new folder if complete, else the old."""
    path = Path(path)
    if path.exists():
        return None
    for kind in ("tmp", "old"):  # the new copy first: it is what the interrupted swap was installing
        found = sorted(path.parent.glob(f".{kind}-{path.name}-*"), key=lambda p: p.stat().st_mtime, reverse=True)
        for candidate in found:
            if candidate.is_dir() and (candidate / "config.json").is_file():
                os.replace(candidate, path)
                _fsync_dir(path.parent)
                return path
    return None


# Temporary names this module (and training) writes, and nothing else: `.tmp-ckpt-…-<pid>`,
# `.old-best-<pid>`, `.<file>.<random or pid>.tmp` (atomic_write, export_model_files, log.csv).
_LEFTOVER_DIR = re.compile(rf"^\.(tmp|old)-({CKPT_PREFIX}\d+|{BEST_DIR})-\d+$")
_LEFTOVER_FILE = re.compile(r"^\..+\.tmp$")
LOCK_FILE = ".scratchgpt.lock"


def clean_leftovers(run_dir: str | Path) -> list[Path]:
    """Restore an interrupted best/ swap, then delete what killed writers left in `run_dir` (and best/).

    Only call it while holding the run's lock (`RunLock`): the temporary names belong to whichever
    process is writing, and only the lock tells that no other one is.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    recover_replaced_dir(run_dir / BEST_DIR)
    removed = []
    for folder in (run_dir, run_dir / BEST_DIR):
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            if p.is_dir() and not p.is_symlink() and folder == run_dir and _LEFTOVER_DIR.match(p.name):
                shutil.rmtree(p, ignore_errors=True)
            elif p.is_file() and _LEFTOVER_FILE.match(p.name):
                p.unlink(missing_ok=True)
            else:
                continue
            removed.append(p)
    return removed


class RunLock:
    """An exclusive advisory lock on `run_dir/.scratchgpt.lock`, held while one process trains there."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        try:
            import fcntl
        except ImportError:  # not POSIX: no advisory locks; run without one
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ValueError(
                f"{self.path.parent}: another scratchgpt process is training into this folder (it holds "
                f"{self.path}); wait for it to finish, or choose another --out-dir"
            ) from None
        except OSError:  # a file system without locks (some network mounts): run without one
            os.close(fd)
            return self
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


# What marks a folder as holding a model, a run or prepared data (all of which training would overwrite).
_MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json")
_RUN_FILES = (LATEST_FILE, "log.csv", BEST_DIR)
_DATA_FILES = ("meta.json", "train.bin", "val.bin")
# Our training outputs, which --overwrite deletes (the model files are replaced by the new run's).
_OVERWRITE_DELETES = (LATEST_FILE, BEST_DIR, "log.csv", "loss.png", "config.json", "model.safetensors")


def folder_contents(path: str | Path) -> list[str]:
    """What in `path` training would overwrite: model files, run files, prepared data, ckpt-* folders."""
    path = Path(path)
    if not path.is_dir():
        return []
    found = [n for n in (*_MODEL_FILES, *_RUN_FILES, *_DATA_FILES) if (path / n).exists()]
    ckpts = sorted(p.name for p in path.glob(f"{CKPT_PREFIX}*") if p.is_dir())
    return found + ([f"{ckpts[-1]} ({len(ckpts)} ckpt-* folder(s))"] if ckpts else [])


def check_run_dir(run_dir: str | Path, *, resume: bool, overwrite: bool) -> Path | None:
    """The checkpoint to resume from, or None to start at step 0; refuses to train over another run.

    - --resume with a checkpoint: continue it.
    - --resume without one: start at step 0 only if the folder holds nothing from an earlier run
      (a deleted ckpt-* would otherwise mean retraining over model.safetensors, best/ and log.csv).
    - no --resume: the folder must not hold a model, a run or prepared data (`run/best` included).
    --overwrite allows the last two: the old run's outputs are deleted (see `clear_run_dir`).
    Read-only, so every rank of a job can call it and reach the same verdict.
    """
    run_dir = Path(run_dir)
    try:
        existing = latest_checkpoint(run_dir)
    except CheckpointError as e:  # `latest` names a checkpoint that is gone or incomplete
        if overwrite and not resume:
            existing = None
        elif overwrite:
            return None
        else:
            raise CheckpointError(f"{e}; restore it, or pass --overwrite to start afresh in {run_dir}") from None
    if resume and existing is not None:
        return existing
    held = folder_contents(run_dir)
    if not held or overwrite:
        return None
    if resume:
        raise ValueError(
            f"{run_dir}: --resume found no complete checkpoint (ckpt-*/ with train_state.json), but the folder "
            f"holds {', '.join(held)} from an earlier run; refusing to retrain from step 0 over them. Restore "
            f"the ckpt-* folders, choose another --out-dir, or pass --overwrite to start afresh there"
        )
    if existing is not None:
        raise ValueError(
            f"{run_dir} already holds checkpoints (latest {existing.name}); pass --resume to continue that run, "
            f"--overwrite to start afresh there (deleting it), or choose another --out-dir"
        )
    check_overwrite(run_dir, overwrite=False, flag="--out-dir", held=held)  # held is not empty: it refuses
    return None


def clear_run_dir(run_dir: str | Path) -> None:
    """--overwrite: delete a previous run's checkpoints, latest, best/, log.csv, loss.png and model files."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return
    for ckpt in run_dir.glob(f"{CKPT_PREFIX}*"):
        if ckpt.is_dir():
            shutil.rmtree(ckpt)
    for name in _OVERWRITE_DELETES:
        p = run_dir / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()


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


def check_float_weights(state: dict[str, Tensor], *, source: str | Path) -> None:
    """CheckpointError unless every tensor is floating point: assigned, an integer tensor of the right shape
    would become an integer weight (failing in the first matmul); copied, it would be cast without a word."""
    bad = next((k for k, v in state.items() if not v.is_floating_point()), None)
    if bad is not None:
        raise CheckpointError(f"{source}: {bad} is {str(state[bad].dtype).removeprefix('torch.')}, but weights are "
                              f"floating point; the file is damaged or not this model's: restore it")


def load_module_state(model: nn.Module, state: dict[str, Tensor], *, source: str | Path) -> None:
    """Copy `state` into `model` in place (a tied lm_head may be absent); any other mismatch is a CheckpointError."""
    own = model.state_dict()
    check_float_weights({k: v for k, v in state.items() if k in own and own[k].is_floating_point()}, source=source)
    for k, v in state.items():
        if k in own and tuple(v.shape) != tuple(own[k].shape):
            raise CheckpointError(
                f"{source}: {k} has shape {tuple(v.shape)} but the model being trained needs {tuple(own[k].shape)}; "
                f"the checkpoint was saved with other model settings (n_embd, n_head, vocab_size, ...): drop the "
                f"changed flags to continue it, or start a new run in another --out-dir"
            )
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
