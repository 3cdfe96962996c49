"""Pretraining as a mode: prepared token files -> a GPT, next-token loss, LM evaluation, periodic samples.

`resolve_run_config` turns the layered TOML/flags into one RunConfig (preparing the data if its
folder is not there yet), `pretrain_job` is the mode (data + model + loss + evaluator), and
`pretrain` hands it to the one driver.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from scratchgpt.checkpoint import unwrap
from scratchgpt.config import DataConfig, RunConfig, SamplingConfig, TrainConfig, config_from_dict, merge_run_dicts
from scratchgpt.data.dataset import prepare
from scratchgpt.data.samplers import RandomWindows, make_sampler
from scratchgpt.data.token_files import TokenDataset, check_token_files, open_dataset
from scratchgpt.data.tokenizers import TOKENIZER_FILE, Tokenizer, load_tokenizer
from scratchgpt.model.gpt import GPT
from scratchgpt.tensor_files import CheckpointError, read_json
from scratchgpt.training.driver import Job, drive
from scratchgpt.training.run_state import check_prepare_dir, check_run_dir, latest_checkpoint
from scratchgpt.training.runtime import Runtime, all_reduce_mean, distributed_info, is_main, model_device, to_device
from scratchgpt.training.train import EvalFn, LogFn, LossFn, SampleFn, TrainResult, lm_loss


def lm_evaluator(
    tokens: np.ndarray, *, block_size: int, batch_size: int, steps: int, seed: int, loss_fn: LossFn = lm_loss
) -> EvalFn:
    """An eval that averages `loss_fn` over `steps` random windows: the same windows at every evaluation.

    Rank-aware like the samplers: each rank scores its share of every batch, and the mean is all-reduced.
    """

    def evaluate(model: nn.Module) -> dict[str, float]:
        info = distributed_info()
        windows = RandomWindows(tokens, block_size=block_size, batch_size=batch_size, seed=seed,
                                rank=info.rank, world_size=info.world_size)
        device = model_device(model)
        # The next-token loss is a mean over equally many tokens per batch, so `group` batches can be scored
        # as one larger forward with the same result: fewer, larger matrix products. The group is bounded
        # by its logits, (group·batch_size, block_size, V) floats, to 64 MB, and by its widest activation
        # (the MLP's hidden layer) to 8 MB, so that each op's output is still in the cache when the next
        # reads it: nanoGPT's Tiny Shakespeare eval (20 x 768 tokens) took 151 ms as one forward, 126-134
        # as groups of 4-5, 164 batch by batch (Intel Xeon, 2 cores). Other losses go batch by batch.
        group = 1
        config = getattr(unwrap(model), "config", None)
        vocab = getattr(config, "vocab_size", None)
        if loss_fn is lm_loss and vocab:
            tokens_per_batch = batch_size * block_size
            hidden = getattr(config, "mlp_hidden", 1)
            group = max(1, min(steps, (64 << 20) // (tokens_per_batch * vocab * 4),
                               (8 << 20) // (tokens_per_batch * hidden * 4)))
        total = torch.zeros((), device=device)
        done = 0
        while done < steps:
            n = min(group, steps - done)
            parts = [windows.next_batch() for _ in range(n)]
            batch = parts[0] if n == 1 else tuple(torch.cat(xs) for xs in zip(*parts, strict=True))
            total += loss_fn(model, to_device(batch, device)).float() * n
            done += n
        loss = all_reduce_mean(total / steps, info).item()
        return {"loss": loss, "ppl": math.exp(min(loss, 50.0))}

    return evaluate


def make_sample_fn(tokenizer: Any, config: TrainConfig) -> SampleFn:
    """A sample callback: `config.sample_tokens` tokens after `config.sample_prompt`, seeded, prompt included."""
    sampling = SamplingConfig(max_new_tokens=config.sample_tokens, temperature=config.sample_temperature,
                              top_k=config.sample_top_k, stop_at_eot=False)

    def sample(model: nn.Module) -> str:
        try:
            from scratchgpt.inference.generate import generate_text, keep_decode_path
        except ImportError:  # generation lives in its own module; training works without it
            return "(no sample: scratchgpt.inference.generate is not available)"
        # A few hundred tokens: not worth choose_decode_path's timed steps, nor (on a machine where they were
        # never built) the ~20 s build of scratchgpt's C++ kernels it would start.
        keep_decode_path(model)
        gen = torch.Generator(device=model_device(model)).manual_seed(config.seed)
        return config.sample_prompt + generate_text(model, tokenizer, config.sample_prompt, sampling, generator=gen)

    return sample


def resolve_run_config(
    layers: list[dict[str, dict[str, Any]]], *, source: str = "config", progress: bool = True
) -> RunConfig:
    """One RunConfig from layered dicts (TOML file, then command line), resuming from the saved run if asked.

    Fields the layers leave unset are filled in from elsewhere: with `resume`, the run directory's
    saved config comes first; model.vocab_size comes from the prepared data's meta.json, and
    model.n_positions from data.block_size. So that the vocabulary is known, a [data] source whose
    folder is not prepared yet is tokenized here (by rank 0 alone under torchrun).
    """
    raw = merge_run_dicts(*layers)
    train_raw = raw.get("train", {})
    out_dir = Path(train_raw.get("out_dir", RunConfig().train.out_dir))
    if train_raw.get("resume") is True:
        # The same verdict the loop reaches (resume, fresh start or refusal), before anything is prepared.
        ckpt = check_run_dir(out_dir, resume=True, overwrite=train_raw.get("overwrite") is True)
        if ckpt is not None:
            saved = read_json(ckpt / "config.json").get("run")
            if isinstance(saved, dict):
                raw = merge_run_dicts(saved, raw)
                source = f"{ckpt / 'config.json'} + {source}"
    model_raw = raw.setdefault("model", {})
    data_raw = raw.get("data", {})
    if data_raw.get("source") and data_raw.get("dir"):
        _prepare_once(config_from_dict(DataConfig, data_raw, source=f"{source} [data]"), progress=progress)
    if "n_positions" not in model_raw and data_raw.get("block_size"):
        model_raw["n_positions"] = data_raw["block_size"]
    if "vocab_size" not in model_raw and data_raw.get("dir"):
        meta_path = Path(data_raw["dir"]) / "meta.json"
        if meta_path.is_file():
            model_raw["vocab_size"] = int(read_json(meta_path)["vocab_size"])
    return RunConfig.from_dict(raw, source=source)


def _prepare_once(data: DataConfig, *, progress: bool) -> None:
    """`prepare` data.source into data.dir unless meta.json is there; other torchrun ranks wait for it."""
    meta = Path(data.dir) / "meta.json"
    if meta.is_file():
        return
    check_prepare_dir(data.dir)  # never tokenize into a model or run folder (its tokenizer would be replaced)
    if is_main():
        prepare(data.source, data.dir, tokenizer=data.tokenizer, bpe_vocab_size=data.bpe_vocab_size,
                val_fraction=data.val_fraction, split_by=data.split_by, errors=data.errors, workers=data.workers,
                shard_tokens=data.shard_tokens, progress=progress)
        return
    # No process group exists yet, and none is needed: meta.json is written last, atomically. If rank 0
    # fails, torchrun stops this process too.
    while not meta.is_file():
        time.sleep(0.5)


def start_model(run: RunConfig) -> tuple[GPT, Tokenizer | None]:
    """(the GPT to train, the tokenizer its weights know): initialised from the seed (no tokenizer yet), or
    loaded from `train.init_from` (a run directory or Hugging Face folder) with its tokenizer."""
    if run.train.init_from == "scratch":
        return GPT(run.model, generator=torch.Generator().manual_seed(run.train.seed)), None
    from scratchgpt.checkpoint import load_any

    model, tokenizer = load_any(run.train.init_from)
    return model.train(), tokenizer


def build_model(run: RunConfig) -> GPT:
    """The GPT to train (see `start_model`)."""
    return start_model(run)[0]


def trained_tokenizer(run: RunConfig, start: Tokenizer | None) -> tuple[Tokenizer | None, str]:
    """(the tokenizer of the weights training continues, where they come from): the checkpoint's when
    --resume finds one, else --init's (`start`)."""
    if run.train.resume:
        try:
            ckpt = latest_checkpoint(run.train.out_dir)
        except CheckpointError:
            ckpt = None  # the trainer refuses a broken `latest` with its own message
        if ckpt is not None and (ckpt / TOKENIZER_FILE).is_file():
            return load_tokenizer(ckpt), f"the checkpoint {ckpt}"
    return start, f"--init {run.train.init_from}"


def check_data(ds: TokenDataset, run: RunConfig, *, tokenizer: Tokenizer | None = None,
               model: str = "the model") -> int:
    """Validate the prepared data against the run (and the weights' `tokenizer`, named `model` in messages)
    before anything trains; returns the block size."""
    block = run.data.block_size or run.model.n_positions
    if block > run.model.n_positions:
        raise ValueError(f"data.block_size={block} exceeds the model's context n_positions={run.model.n_positions}")
    check_token_files(ds, tokenizer=tokenizer, vocab_size=run.model.vocab_size, model=model)
    if run.model.vocab_size > ds.vocab_size + 128 and is_main():
        print(f"note: model.vocab_size {run.model.vocab_size} is far above the tokenizer's {ds.vocab_size}; the "
              f"extra output rows only cost time (leave vocab_size unset to take the tokenizer's)", file=sys.stderr)
    ds.check_window("train", block)
    if int(ds.meta["val_tokens"]):
        ds.check_window("val", block)
    return block


def pretrain_job(run: RunConfig, runtime: Runtime) -> Job:
    """Pretraining as a mode: prepared token files, the GPT of `run`, LM loss, LM evaluation of both splits."""
    if not run.data.dir:
        raise ValueError("no data: set [data] dir (a folder from `scratchgpt prepare`) in the config or --dir")
    ds = open_dataset(run.data.dir)
    model, start = start_model(run)
    run = dataclasses.replace(run, model=model.config)  # init_from decides the shape; record it
    known, source = trained_tokenizer(run, start)
    block = check_data(ds, run, tokenizer=known, model=source)
    tokenizer = ds.tokenizer()
    cfg, info = run.train, runtime.dist
    batches = make_sampler(ds.tokens("train"), kind=run.data.sampler, block_size=block,
                           batch_size=cfg.batch_size, seed=cfg.seed, stride=run.data.stride,
                           shuffle=run.data.shuffle, rank=info.rank, world_size=info.world_size)
    evals: dict[str, EvalFn] = {}
    for split in ("train", "val") if cfg.eval_train else ("val",):
        if int(ds.meta[f"{split}_tokens"]) > block:
            evals[split] = lm_evaluator(ds.tokens(split), block_size=block, batch_size=cfg.batch_size,
                                        steps=cfg.eval_steps, seed=cfg.seed + (1 if split == "val" else 2))
    sample_fn = make_sample_fn(tokenizer, cfg) if cfg.sample_interval > 0 else None
    return Job(model, batches, loss_fn=lm_loss, evals=evals, sample_fn=sample_fn, tokenizer=tokenizer,
               run_config=run.to_dict())


def pretrain(run: RunConfig, *, log: LogFn | None = None) -> TrainResult:
    """Pretrain a GPT as `run` describes: build, train, checkpoint (the data prepared by `resolve_run_config`)."""
    result, _ = drive(run.train, lambda runtime: pretrain_job(run, runtime), log=log)
    return result
