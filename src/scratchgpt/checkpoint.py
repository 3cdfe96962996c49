"""Checkpoints: scratchgpt run directories, and Hugging Face folders in and out (name map: scratchgpt.hf).

A run directory is self-describing and pickle-free:
    config.json          {"format": "scratchgpt", "format_version": 1, "model": {...}, ...}
    model.safetensors    the unwrapped module's weights (a tied lm_head is stored once, as wte)
    tokenizer.json (+ files the tokenizer needs)
Training adds its own state beside these (see training/run_state.py). Every file is written under a
temporary name and renamed into place, so a crash mid-save leaves the previous checkpoint intact.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from scratchgpt.config import GPTConfig
from scratchgpt.files import atomic_write, check_overwrite, replace_dir, write_json
from scratchgpt.hf import config_from_hf, config_to_hf, hf_to_scratchgpt, scratchgpt_to_hf
from scratchgpt.model.gpt import GPT, register_pretrained_loader
from scratchgpt.signals import import_holding_signals
from scratchgpt.tensor_files import (
    CheckpointError,
    check_header,
    load_tensors,
    nbytes,
    read_json,
    save_tensors,
    write_safetensors,
)

FORMAT = "scratchgpt"
FORMAT_VERSION = 1
HF_MODEL_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")


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
    inner = unwrap(model)
    if not isinstance(inner, GPT):
        raise TypeError(f"save_model expects a GPT, got {type(inner).__name__}")
    return save_model_files(model_state(inner), run_dir, model_config=inner.config.to_dict(), tokenizer=tokenizer,
                            extra=extra)


def save_model_files(
    state: dict[str, Tensor], folder: str | Path, *, model_config: dict[str, Any] | None, tokenizer: Any = None,
    extra: dict[str, Any] | None = None, metadata: dict[str, str] | None = None,
) -> Path:
    """`save_model` for weights already gathered into `state` (e.g. from FSDP shards); config.json last, as its
    presence marks a complete checkpoint."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_tensors(state, folder / "model.safetensors", metadata={"format": "pt", **(metadata or {})})
    if tokenizer is not None:
        tokenizer.save(folder)
    cfg: dict[str, Any] = {"format": FORMAT, "format_version": FORMAT_VERSION, **(extra or {})}
    if model_config is not None:
        cfg["model"] = model_config
    write_json(folder / "config.json", cfg)
    return folder



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
    if cfg.get("quantization"):  # int8 or int4 weights + scales: rebuilt by the quantize module
        if prepare is not None or dtype is not None:
            raise CheckpointError(f"{run_dir}: a quantized model loads for inference only (no dtype "
                                  f"change, no task head); use its float checkpoint")
        return load_quantized(run_dir, cfg, device=device), cfg
    try:
        config = GPTConfig.from_dict(cfg["model"], source=str(run_dir / "config.json"))
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{run_dir / 'config.json'}: invalid model config: {e}") from None
    model = _meta_gpt(config)
    if prepare is not None:
        prepare(model, cfg)
    # Read straight into `dtype` and assigned, not copied: the weights are never held twice.
    _load_state_strict(model, load_tensors(run_dir / "model.safetensors", dtype=dtype),
                       source=run_dir / "model.safetensors")
    model = model.to(device=device, dtype=dtype)  # buffers; the weights are already in `dtype`
    return model.eval(), cfg


def _meta_gpt(config: GPTConfig) -> GPT:
    """A GPT without storage (weights come from a file next). The meta device's first use imports torch._dynamo
    from C++ (see signals.py): imported here first, with Ctrl-C held."""
    import_holding_signals("torch._dynamo")
    return GPT(config, device="meta")


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


def check_float_weights(state: dict[str, Tensor], *, source: str | Path) -> None:
    """CheckpointError unless every tensor is floating point: assigned, an integer tensor of the right shape
    would become an integer weight (failing in the first matmul); copied, it would be cast without a word."""
    bad = next((k for k, v in state.items() if not v.is_floating_point()), None)
    if bad is not None:
        raise CheckpointError(f"{source}: {bad} is {str(state[bad].dtype).removeprefix('torch.')}, but weights are "
                              f"floating point; the file is damaged or not this model's: restore it")



# ---------------------------------------------------------------------------------------------
# Hugging Face folders (GPT-2, Llama, Qwen2, Qwen3) in and out; the name map is scratchgpt.hf
# ---------------------------------------------------------------------------------------------

SAFETENSORS_INDEX = "model.safetensors.index.json"


def _read_hf_weights(directory: Path, *, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """The weights of an HF folder (floating ones as `dtype` when given), from one file, shards or a .bin."""
    single = directory / "model.safetensors"
    index = directory / SAFETENSORS_INDEX
    if single.is_file():
        return load_tensors(single, dtype=dtype, mmap=False)  # renamed, transposed, stacked: copied anyway
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
            state.update(load_tensors(shard_path, dtype=dtype, mmap=False))
        missing = sorted(set(weight_map) - set(state))
        if missing:
            raise CheckpointError(f"{index}: {missing[:3]} are listed but absent from their shards")
        return state
    pt = directory / "pytorch_model.bin"
    if pt.is_file():
        try:
            # weights_only=True: a .bin is a pickle, and we never unpickle arbitrary objects.
            state = torch.load(pt, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file for the user
            raise CheckpointError(f"{pt}: cannot be read as plain weights ({str(e).splitlines()[0]})") from None
        if dtype is not None:  # one tensor at a time, so that each old copy is freed as its new one is made
            for k, v in state.items():
                if v.is_floating_point():
                    state[k] = v.to(dtype)
        return state
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
    model = _meta_gpt(config)
    weights = _read_hf_weights(directory, dtype=dtype)
    try:
        # consume: each HF tensor is dropped once renamed, transposed or stacked, so none is held twice.
        state = hf_to_scratchgpt(weights, consume=True)
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
    Written one weight at a time (converted: cast to float32, transposed or split; written; freed), so saving
    needs the model plus its largest converted weight, not a converted copy of the whole model.
    """
    inner = unwrap(model)
    if not isinstance(inner, GPT):
        raise TypeError(f"save_hf expects a GPT, got {type(inner).__name__}")
    hf_config = config_to_hf(inner.config)
    state = inner.state_dict()  # references: nothing is copied yet
    if inner.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # transformers re-ties it from the embedding

    def convert(name: str, tensor: Tensor) -> dict[str, Tensor]:  # one of our weights -> its HF tensor(s)
        return scratchgpt_to_hf(float32_weights({name: tensor}), inner.config)

    # Every HF tensor's name, dtype and shape, from the same conversion run on meta tensors (no data; bfloat16
    # given as the float32 that float32_weights makes of it, which a meta tensor cannot be copied into).
    layout = {name: convert(name, torch.empty(t.shape, device="meta", dtype=torch.float32 if t.dtype == torch.bfloat16
                                              else t.dtype)) for name, t in state.items()}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shards = _shard(layout, max_shard_bytes)
    files = ["model.safetensors"] if len(shards) == 1 else \
        [f"model-{k:05d}-of-{len(shards):05d}.safetensors" for k in range(1, len(shards) + 1)]
    for file, names in zip(files, shards, strict=True):
        specs = {hf: t for name in names for hf, t in layout[name].items()}
        parts = (part for name in names for part in convert(name, state[name]).items())
        atomic_write(directory / file, lambda p, specs=specs, parts=parts: write_safetensors(p, specs, parts))
    if len(shards) > 1:
        weight_map = {hf: file for file, names in zip(files, shards, strict=True)
                      for name in names for hf in layout[name]}
        total = sum(nbytes(t) for parts in layout.values() for t in parts.values())
        write_json(directory / SAFETENSORS_INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
    write_json(directory / "config.json", hf_config)
    if tokenizer is not None and hasattr(tokenizer, "save_hf"):
        tokenizer.save_hf(directory)
    return directory


def _shard(layout: dict[str, dict[str, Tensor]], max_bytes: int | None) -> list[list[str]]:
    """Group our weights (in order, each with all its HF parts) into shards of at most `max_bytes` of HF tensors
    (a bigger weight gets its own)."""
    if max_bytes is None:
        return [list(layout)]
    shards: list[list[str]] = [[]]
    size = 0
    for name, parts in layout.items():
        n = sum(nbytes(t) for t in parts.values())
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
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
    quantize: str | None = None, inference_dtype: str | None = None, for_inference: bool = False,
) -> tuple[GPT, Any]:
    """(model, tokenizer) from a scratchgpt run directory, a Hugging Face directory, or a hub name.

    `quantize` ("int8", "int4", ...) and `inference_dtype` ("bfloat16") prepare the model for fast inference
    (see model/quantize.py); an already-quantized run directory loads as it is. `for_inference`: the model
    is frozen (no parameter requires a gradient) and in eval mode, which lets decoding lay its weights out
    for speed (inference.generate.choose_decode_path).
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
    if for_inference:
        model.requires_grad_(False).eval()
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
        check_header(directory / "model.safetensors")
        tok = directory / "tokenizer.json"
        tok_meta = read_json(tok) if tok.is_file() else None
        details = {"kind": kind, "tokenizer": tok_meta.get("type") if isinstance(tok_meta, dict) else None}
        if cfg.get("task"):
            details["task"] = cfg["task"]
        return config, details
    directory = _resolve_hf(path_or_name)
    config = config_from_hf(read_json(directory / "config.json"), source=str(directory / "config.json"))
    if (directory / "model.safetensors").is_file():
        check_header(directory / "model.safetensors")
    if (directory / "tokenizer.json").is_file():
        tokenizer = "hf"  # the model's own tokenizer.json (Llama, Qwen, ...)
    elif (directory / "vocab.json").is_file() or (directory / "encoder.json").is_file():
        tokenizer = "gpt2"
    else:
        tokenizer = None
    return config, {"kind": kind, "tokenizer": tokenizer}


# ---------------------------------------------------------------------------------------------
# Saving and loading quantized run directories
# ---------------------------------------------------------------------------------------------


def save_quantized(model: nn.Module, run_dir: str | Path, *, tokenizer: Any = None,
                   extra: dict[str, Any] | None = None) -> Path:
    """Write a quantized GPT as a run directory (int8 or packed int4 weights + their scales in safetensors + JSON)."""
    from scratchgpt.model.quantize import QUANTIZED_EMBEDDINGS, QUANTIZED_LINEARS, quantization_of

    model = unwrap(model)
    quantization = quantization_of(model)
    if quantization is None:
        raise ValueError("save_quantized expects a quantized model; call quantize_model() first")
    state = {k: v for k, v in model.state_dict().items()}
    if model.lm_head.weight is model.transformer.wte.weight:  # tied (float or quantized): stored once, as wte
        state.pop("lm_head.weight", None)
        state.pop("lm_head.weight_scale", None)
    layers = sorted(name for name, m in model.named_modules() if isinstance(m, QUANTIZED_LINEARS))
    embeddings = sorted(name for name, m in model.named_modules() if isinstance(m, QUANTIZED_EMBEDDINGS))
    scheme = ("per-output-channel symmetric int8 weights, float32 scales" if quantization["mode"] == "int8" else
              f"group-wise symmetric int4 weights (groups of {quantization['group_size']} along each row, two "
              f"per uint8: q + 8, even column in the low nibble), float16 scales")
    quant = {**quantization, "scheme": scheme, "layers": layers, "embeddings": embeddings}
    return save_model_files(state, run_dir, model_config=model.config.to_dict(), tokenizer=tokenizer,
                            extra={"quantization": quant, **(extra or {})},
                            metadata={"quantization": str(quantization["mode"])})


def quantize_checkpoint(src: str | Path, out: str | Path, mode: str = "int8", *, overwrite: bool = False) -> Path:
    """Quantize checkpoint `src` once and save it as the new run directory `out` (`export --format int8|int4`).

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
    # Refuses an already-quantized model and unmerged LoRA adapters. Only saved: no kernel to choose.
    quantize_model(model, mode, kernel="reference")
    extra = {k: run_cfg[k] for k in ("task", "chat_template") if k in run_cfg}
    return replace_dir(out, lambda tmp: save_quantized(model, tmp, tokenizer=tokenizer,
                                                       extra={**extra, "quantized_from": str(src)}))


def load_quantized(run_dir: str | Path, cfg: dict[str, Any], *, device: torch.device | str = "cpu",
                   kernel: str | None = None) -> nn.Module:
    """Rebuild a model saved by `save_quantized` (config.json already read into `cfg`); `kernel` None:
    the default for `device` (model/quantize.py's use_default_kernel)."""
    from scratchgpt.model.int4 import INT4_GROUP_SIZES, Int4Embedding, Int4Linear
    from scratchgpt.model.quantize import (
        QUANTIZED_EMBEDDINGS,
        QUANTIZED_LINEARS,
        Int8Embedding,
        Int8Linear,
        set_kernel,
        use_default_kernel,
    )

    run_dir = Path(run_dir)
    source, weights = run_dir / "config.json", run_dir / "model.safetensors"
    quant = cfg.get("quantization") or {}
    mode, group = quant.get("mode"), quant.get("group_size")
    if mode not in ("int8", "int4"):
        raise CheckpointError(f"{source}: unknown quantization {mode!r}; this scratchgpt reads int8 and int4")
    if mode == "int4" and group not in INT4_GROUP_SIZES:
        raise CheckpointError(f"{source}: int4 group_size {group!r} is not one of {list(INT4_GROUP_SIZES)}")
    try:
        config = GPTConfig.from_dict(cfg["model"], source=str(source))
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{source}: invalid model config: {e}") from None
    state = load_tensors(weights)
    model = _meta_gpt(config)
    layers = set(quant.get("layers") or [])
    # Files written before embeddings were quantized have no "embeddings": their tables load as float.
    embeddings = set(quant.get("embeddings") or [])
    for parent_name, parent in list(model.named_modules()):
        for attr, child in list(parent.named_children()):
            name = f"{parent_name}.{attr}" if parent_name else attr
            if isinstance(child, nn.Linear) and name in layers:
                shape = (child.in_features, child.out_features)
                bias = f"{name}.bias" in state
                setattr(parent, attr, Int8Linear(*shape, bias=bias, device="meta") if mode == "int8" else
                        Int4Linear(*shape, bias=bias, group_size=group, device="meta"))
            elif isinstance(child, nn.Embedding) and name in embeddings:
                shape = (child.num_embeddings, child.embedding_dim)
                setattr(parent, attr, Int8Embedding(*shape, device="meta") if mode == "int8" else
                        Int4Embedding(*shape, group_size=group, device="meta"))
    # A tied head is stored once, as wte: float wte + float head, or quantized wte + quantized head (shared).
    tied = config.tie_word_embeddings and ("lm_head" in layers) == ("transformer.wte" in embeddings)
    expected = model.state_dict()
    if tied:
        expected = {k: v for k, v in expected.items() if k not in ("lm_head.weight", "lm_head.weight_scale")}
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{weights}: weights do not match the quantized config "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    for key, want in expected.items():
        if state[key].shape != want.shape:
            raise CheckpointError(f"{weights}: {key} has shape {list(state[key].shape)}, the config needs "
                                  f"{list(want.shape)}")
    stored_as = torch.int8 if mode == "int8" else torch.uint8  # int4: two values per byte
    for name, m in model.named_modules():
        stored = state.get(f"{name}.weight")  # None: a tied head, checked as wte
        if isinstance(m, QUANTIZED_LINEARS + QUANTIZED_EMBEDDINGS) and stored is not None and stored.dtype != stored_as:
            raise CheckpointError(f"{weights}: {name}.weight is {stored.dtype}, expected {stored_as} for {mode}")
    model.load_state_dict(state, strict=False, assign=True)
    if tied:
        model.lm_head.weight = model.transformer.wte.weight
        if isinstance(model.lm_head, QUANTIZED_LINEARS):
            model.lm_head.weight_scale = model.transformer.wte.weight_scale
    model.reset_buffers(device=device)
    model = model.to(device).eval()
    if kernel is None:
        use_default_kernel(model)
    else:
        set_kernel(model, kernel)
    return model
