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
import tempfile
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from scratchgpt.config import GPTConfig
from scratchgpt.model import GPT

FORMAT = "scratchgpt"
FORMAT_VERSION = 1
HF_MODEL_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated, corrupted or of an unknown kind (one-line message)."""


# ---------------------------------------------------------------------------------------------
# Small I/O helpers
# ---------------------------------------------------------------------------------------------


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp_path)` then rename tmp over `path`: readers see the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text))


def write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


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
    run_dir: str | Path, *, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> tuple[GPT, dict[str, Any]]:
    """Load a scratchgpt run directory: (model in eval mode, its config.json as a dict)."""
    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    try:
        config = GPTConfig.from_dict(cfg["model"], source=str(run_dir / "config.json"))
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{run_dir / 'config.json'}: invalid model config: {e}") from None
    model = GPT(config, device="meta")
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
            raise CheckpointError(f"{source}: {k} has shape {tuple(v.shape)}, the config needs {tuple(expected[k].shape)}")
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
        raise CheckpointError(f"{source}: activation_function {act!r} is not supported; use one of {list(_HF_ACTIVATIONS)}")
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
    path_or_name: str | Path, *, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> tuple[GPT, Any]:
    """(model, tokenizer) from a scratchgpt run directory, a Hugging Face directory, or a hub name."""
    from scratchgpt.tokenizer import gpt2_tokenizer, load_tokenizer

    if checkpoint_kind(path_or_name) == FORMAT:
        model, _ = load_model(path_or_name, device=device, dtype=dtype)
        return model, load_tokenizer(path_or_name)
    model = load_hf(path_or_name, device=device, dtype=dtype)
    directory = _resolve_hf(path_or_name)
    has_files = (directory / "vocab.json").is_file() or (directory / "encoder.json").is_file()
    return model, gpt2_tokenizer(directory if has_files else None)
