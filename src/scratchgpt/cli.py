"""The `scratchgpt` command: one entry point, one subcommand per job.

The CLI only parses arguments and calls into the modules; flags for configuration come from the
config dataclasses (`add_dataclass_args`), so defaults live in one place. Errors a user can fix are
printed as one line on stderr with exit code 2; nothing here holds logic the library lacks.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from scratchgpt.checkpoint import CheckpointError
from scratchgpt.config import PRESET_NAMES, GPTConfig, SamplingConfig, add_dataclass_args, overrides_from_args

# Exceptions that mean "the user's input is wrong": shown as one line, never as a traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, CheckpointError, OSError)

_REGISTER: list = []  # functions that each add one subcommand's parser, in --help order


def command(register):
    """Decorator: `register(subparsers)` adds a subcommand and sets `func` to run it."""
    _REGISTER.append(register)
    return register


# ================================ core: info, generate ================================


def _add_model_source(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="scratchgpt run directory, Hugging Face GPT-2 directory, or hub name")
    src.add_argument("--model", choices=PRESET_NAMES, help="a GPT-2 preset with fresh random weights")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default: cpu)")


def _load_source(args: argparse.Namespace):
    """(model, tokenizer or None) from --checkpoint, or a freshly initialised --model preset."""
    import torch

    from scratchgpt.checkpoint import load_any
    from scratchgpt.model import GPT

    if args.checkpoint:
        return load_any(args.checkpoint, device=args.device)
    generator = torch.Generator().manual_seed(getattr(args, "seed", None) or 0)
    return GPT(GPTConfig.from_name(args.model), generator=generator).to(args.device).eval(), None


@command
def _add_info(sub) -> None:
    p = sub.add_parser("info", help="show a model's configuration and parameter counts")
    _add_model_source(p)
    p.set_defaults(func=_run_info)


def _run_info(args: argparse.Namespace) -> int:
    import json

    import torch

    from scratchgpt.checkpoint import checkpoint_kind, load_any
    from scratchgpt.model import GPT

    if args.checkpoint:
        model, tokenizer = load_any(args.checkpoint, device=args.device)
    else:
        # Presets are only counted: the meta device allocates no memory, even for gpt2-xl.
        model, tokenizer = GPT(GPTConfig.from_name(args.model), device="meta"), None
    config = model.config
    info = {
        "source": args.checkpoint or f"preset {args.model} (random weights)",
        "kind": checkpoint_kind(args.checkpoint) if args.checkpoint else "preset",
        "config": config.to_dict(),
        "parameters": model.num_parameters(),
        "parameters_without_embeddings": model.num_parameters(exclude_embeddings=True),
        "fp32_megabytes": round(model.num_parameters() * 4 / 2**20, 1),
        "tokenizer": getattr(tokenizer, "name", None),
        "torch": torch.__version__,
    }
    print(json.dumps(info, indent=2))
    return 0


@command
def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a checkpoint or a fresh preset")
    _add_model_source(p)
    p.add_argument("--prompt", default="", help="text to continue (empty: start from end-of-text)")
    p.add_argument("--num-samples", type=int, default=1, help="independent completions to print")
    p.add_argument("--stream", action="store_true", help="print text as it is generated")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole context every token")
    p.add_argument("--prompt-lookup", type=int, default=0, metavar="K",
                   help="greedy only: check up to K tokens copied from earlier context per pass (same output)")
    p.add_argument("--gpt2-dir", help="encoder.json + vocab.bpe for --model presets (else SCRATCHGPT_GPT2_DIR)")
    add_dataclass_args(p, SamplingConfig)
    p.set_defaults(func=_run_generate)


def _run_generate(args: argparse.Namespace) -> int:
    from scratchgpt.generate import make_generator, stream_text
    from scratchgpt.tokenizer import gpt2_tokenizer

    sampling = SamplingConfig(**overrides_from_args(args, SamplingConfig))
    model, tokenizer = _load_source(args)
    if tokenizer is None:
        tokenizer = gpt2_tokenizer(args.gpt2_dir)
    generator = make_generator(sampling.seed, args.device)
    for i in range(args.num_samples):
        if args.num_samples > 1:
            print(f"--- sample {i + 1} ---")
        pieces = stream_text(model, tokenizer, args.prompt, sampling, generator=generator,
                             use_cache=not args.no_cache, prompt_lookup=args.prompt_lookup)
        if args.stream:
            print(args.prompt, end="", flush=True)
            for piece in pieces:
                print(piece, end="", flush=True)
            print()
        else:
            print(args.prompt + "".join(pieces))
    return 0


# ================================ data + training: prepare, train ================================


def _bool_flags_optional(p: argparse.ArgumentParser) -> None:
    """Let boolean flags stand alone: `--resume` means `--resume true` (an explicit value still works)."""
    for action in p._actions:
        if action.metavar == "{true,false}" and action.nargs is None:
            action.nargs, action.const = "?", True


def _toml_sections(path: str | None) -> dict:
    from scratchgpt.config import read_toml

    return read_toml(path) if path else {}


_PREPARE_ONLY_SKIP = ("block_size", "sampler", "stride", "shuffle")


@command
def _add_prepare(sub) -> None:
    from scratchgpt.config import DataConfig

    p = sub.add_parser(
        "prepare", help="tokenize text files into train.bin / val.bin / meta.json",
        description="Tokenize a file, a folder of .txt files or a glob into DIR/train.bin, DIR/val.bin and "
                    "DIR/meta.json, with the tokenizer saved beside them. Example: scratchgpt prepare "
                    "--source input.txt --dir data/mytext --tokenizer char",
    )
    p.add_argument("--config", "-c", help="a run TOML file; its [data] section supplies the defaults")
    p.add_argument("--gpt2-dir", help="folder with GPT-2's encoder.json + vocab.bpe (else SCRATCHGPT_GPT2_DIR)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_dataclass_args(p, DataConfig, skip=_PREPARE_ONLY_SKIP)
    p.set_defaults(func=_run_prepare)


def _run_prepare(args: argparse.Namespace) -> int:
    import json

    from scratchgpt.config import DataConfig, config_from_dict
    from scratchgpt.data import prepare

    raw = {**_toml_sections(args.config).get("data", {}), **overrides_from_args(args, DataConfig)}
    data = config_from_dict(DataConfig, raw, source=f"{args.config or 'command line'} [data]")
    if not data.source:
        raise ValueError("nothing to prepare: pass --source FILE|FOLDER|GLOB (or set source in [data])")
    if not data.dir:
        raise ValueError("no output folder: pass --dir FOLDER (or set dir in [data])")
    meta = prepare(data.source, data.dir, tokenizer=data.tokenizer, bpe_vocab_size=data.bpe_vocab_size,
                   val_fraction=data.val_fraction, errors=data.errors, workers=data.workers,
                   gpt2_dir=args.gpt2_dir, progress=not args.quiet)
    summary = {k: meta[k] for k in ("tokenizer", "vocab_size", "dtype", "train_tokens", "val_tokens")}
    print(json.dumps({"dir": data.dir, "files": len(meta["files"]), **summary}))
    return 0


@command
def _add_train(sub) -> None:
    from scratchgpt.config import DataConfig, TrainConfig

    p = sub.add_parser(
        "train", help="pretrain a GPT on prepared token files (torchrun: DDP, or FSDP with --fsdp)",
        description="Train a GPT as a TOML run file describes ([model], [data], [train]); every field can be "
                    "overridden by its flag. Several processes: torchrun --nproc_per_node=N -m scratchgpt train ...",
    )
    p.add_argument("--config", "-c", help="run TOML file with [model], [data] and [train] sections")
    add_dataclass_args(p, GPTConfig)
    add_dataclass_args(p, DataConfig)
    add_dataclass_args(p, TrainConfig)
    _bool_flags_optional(p)
    p.set_defaults(func=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    import json
    import os

    from scratchgpt.config import DataConfig, TrainConfig
    from scratchgpt.train import pretrain, resolve_run_config

    flags = {"model": overrides_from_args(args, GPTConfig), "data": overrides_from_args(args, DataConfig),
             "train": overrides_from_args(args, TrainConfig)}
    run = resolve_run_config([_toml_sections(args.config), flags], source=args.config or "command line")
    result = pretrain(run)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks for the job
        summary = {"run_dir": str(result.run_dir), "step": result.step, "tokens": result.tokens,
                   "elapsed_s": round(result.elapsed_s, 1), "tokens_per_s": round(result.tokens_per_s, 1),
                   "mfu": None if result.mfu is None else round(result.mfu, 4),
                   **{k: round(v, 4) for k, v in result.metrics.items()},
                   "best_val_loss": result.best_val_loss, "interrupted": result.interrupted}
        print(json.dumps(summary))
    return 130 if result.interrupted else 0




# ================================ fine-tuning: finetune, classify, chat ================================


# ================================ serving: serve ================================


# ================================ entry point ================================

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scratchgpt",
        description="Train, fine-tune, run and serve GPT-2-class language models.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in _REGISTER:
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as e:
        print(f"scratchgpt {args.command}: error: {e}", file=sys.stderr)
        return 2
