"""Run state: what the training loop keeps in a run directory besides the model, and the rules for that folder.

    run_dir/
      ckpt-00000500/   model.safetensors, config.json, tokenizer files   (a loadable run directory)
                       train_state.safetensors   optimizer moments, torch RNG states (per rank)
                       train_state.json          step, sampler position, python/numpy RNG, scaler, ...
      latest           "ckpt-00000500": the checkpoint to resume from (replaced atomically)
      model.safetensors, config.json, tokenizer files   the latest model (hard links into ckpt-*)
      best/            the model with the lowest validation loss so far
      log.csv, loss.png, .scratchgpt.lock

Each ckpt-* folder is written under a temporary name and renamed into place; train_state.json is its
last file, so a folder without it is never read. Nothing is pickled: RNG states are uint8 tensors
(safetensors) or lists of integers (JSON). Only training reads or writes these files; the model files
themselves (and every way to load them) are `scratchgpt.checkpoint`'s.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from scratchgpt.checkpoint import check_float_weights
from scratchgpt.files import atomic_write_text, check_overwrite, fsync_dir, recover_replaced_dir, write_json
from scratchgpt.model.gpt import GPT
from scratchgpt.tensor_files import CheckpointError, load_tensors, read_json, save_tensors
from scratchgpt.training.plots import LOG_FILE, PLOT_FILE

CKPT_PREFIX = "ckpt-"
LATEST_FILE = "latest"
BEST_DIR = "best"
TRAIN_STATE_JSON = "train_state.json"
TRAIN_STATE_TENSORS = "train_state.safetensors"
TRAIN_STATE_FORMAT = "scratchgpt-train-state"
_TRAIN_STATE_FILES = (TRAIN_STATE_JSON, TRAIN_STATE_TENSORS)


# ---------------------------------------------------------------------------------------------
# Step checkpoints and the `latest` pointer
# ---------------------------------------------------------------------------------------------


def checkpoint_name(step: int) -> str:
    """Folder name of the checkpoint after `step` optimizer steps (zero-padded, so names sort by step)."""
    return f"{CKPT_PREFIX}{step:08d}"


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
        fsync_dir(tmp)
        final = run_dir / name
        if final.exists():  # the same step saved again: move the old one aside, then swap
            old = run_dir / f".old-{name}-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_dir(run_dir)
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


def read_training_checkpoint(ckpt_dir: str | Path) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Any]]:
    """(model weights, train_state tensors, train_state.json) of a step checkpoint; one-line errors naming the file."""
    ckpt_dir = Path(ckpt_dir)
    state = read_json(ckpt_dir / TRAIN_STATE_JSON)
    if not isinstance(state, dict) or state.get("format") != TRAIN_STATE_FORMAT:
        raise CheckpointError(f"{ckpt_dir / TRAIN_STATE_JSON}: not a scratchgpt training state")
    return load_tensors(ckpt_dir / "model.safetensors"), load_tensors(ckpt_dir / TRAIN_STATE_TENSORS), state


# ---------------------------------------------------------------------------------------------
# The run directory: its lock, what killed runs left, resume or refuse, --overwrite
# ---------------------------------------------------------------------------------------------

# Temporary names training writes, and nothing else: `.tmp-ckpt-…-<pid>`,
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
_RUN_FILES = (LATEST_FILE, LOG_FILE, BEST_DIR)
_DATA_FILES = ("meta.json", "train.bin", "val.bin")
# Our training outputs, which --overwrite deletes (the model files are replaced by the new run's).
_OVERWRITE_DELETES = (LATEST_FILE, BEST_DIR, LOG_FILE, PLOT_FILE, "config.json", "model.safetensors")


def folder_contents(path: str | Path) -> list[str]:
    """What in `path` training would overwrite: model files, run files, prepared data, ckpt-* folders."""
    path = Path(path)
    if not path.is_dir():
        return []
    found = [n for n in (*_MODEL_FILES, *_RUN_FILES, *_DATA_FILES) if (path / n).exists()]
    ckpts = sorted(p.name for p in path.glob(f"{CKPT_PREFIX}*") if p.is_dir())
    return found + ([f"{ckpts[-1]} ({len(ckpts)} ckpt-* folder(s))"] if ckpts else [])


def check_prepare_dir(directory: str | Path, *, overwrite: bool = False) -> None:
    """`prepare` writes train.bin, val.bin, meta.json and tokenizer files: never over earlier data, a model or
    a run without --overwrite (other files, such as the source text, may share the folder)."""
    check_overwrite(directory, overwrite=overwrite, flag="--dir", held=folder_contents(directory))


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


# ---------------------------------------------------------------------------------------------
# Model weights, optimizer and RNG state of a checkpoint, back into a live run
# ---------------------------------------------------------------------------------------------


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


def named_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """`optimizer.state_dict()` with the parameters' names in `model` for their indices: what
    torch.distributed.checkpoint's get_optimizer_state_dict(full_state_dict=True) returns for a model that is
    not sharded (tested against it), so that both write the same checkpoints and its set_optimizer_state_dict
    reads either. Why not call it: it imports torch._dynamo on its first use (~1 s of a run, at the first
    checkpoint), to check whether the model is a compiled one; the caller passes the unwrapped model.

    The tensors are the optimizer's own (no copies): write them out before the next step. After at least one
    step (torch's version first steps an optimizer that has no state, with lr 0, to create it).
    """
    osd = optimizer.state_dict()
    order = [p for group in optimizer.param_groups for p in group["params"]]
    position = {p: i for i, p in enumerate(order)}
    names = {position[p]: name for name, p in model.named_parameters() if p in position}
    missing = [i for i in range(len(order)) if i not in names]
    if missing:
        raise ValueError(f"{len(missing)} of the optimizer's parameters are not in the model")
    osd["state"] = {names[i]: state for i, state in osd["state"].items()}
    for group in osd["param_groups"]:
        group["params"] = [names[i] for i in group["params"]]
    return osd


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
