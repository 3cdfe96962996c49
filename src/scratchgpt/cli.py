"""The `scratchgpt` command: one entry point, one subcommand per job.

The CLI only parses arguments and calls into the modules; flags for configuration come from the
config dataclasses (`add_dataclass_args`), so defaults live in one place. Errors a user can fix are
printed as one line on stderr with exit code 2; Ctrl-C exits 130 and SIGTERM 143, each with one line
(also during the first seconds, while torch is still being imported); nothing here holds logic the
library lacks. This module imports no torch at import time, so that `python -m scratchgpt` can be
interrupted cleanly from its first moment.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scratchgpt.config import (
    DEVICE_HELP,
    PRESET_NAMES,
    GPTConfig,
    SamplingConfig,
    add_dataclass_args,
    config_from_dict,
    overrides_from_args,
    parse_bool,
)

# Exceptions that mean "the user's input is wrong": shown as one line, never as a traceback.
# (checkpoint.CheckpointError and WriteError are ValueErrors; FileNotFoundError is an OSError.)
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError)

_REGISTER: list = []  # functions that each add one subcommand's parser, in --help order


def command(register):
    """Decorator: `register(subparsers)` adds a subcommand and sets `func` to run it."""
    _REGISTER.append(register)
    return register


# ================================ configs for every command ================================


@dataclass(frozen=True)
class Section:
    """One [table] of a command's TOML file (-c), the config class it fills, and that class's flags."""

    name: str
    cls: type
    prefix: str = ""  # flag prefix, e.g. "lora-" for --lora-rank
    skip: tuple[str, ...] = ()  # fields this command does not take


def add_config_sections(p: argparse.ArgumentParser, *sections: Section) -> None:
    """Give a command `-c FILE.toml` and one flag per field of each section's config class.

    Any command gets the same rules this way: the file's tables fill the configs, flags override the
    file field by field, and unknown tables, unknown keys or wrong types are one error naming the file.
    Read them back with `read_config_sections(args)`.
    """
    tables = ", ".join(f"[{s.name}]" for s in sections)
    p.add_argument("--config", "-c", metavar="FILE.toml", help=f"TOML file with {tables}; flags override it")
    for s in sections:
        add_dataclass_args(p, s.cls, prefix=s.prefix, skip=s.skip)
    p.set_defaults(config_sections=sections)


def read_config_sections(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(config per section, the values given per section): each config built once, file first, then flags."""
    sections: tuple[Section, ...] = args.config_sections
    source = args.config or "command line"
    tables = _toml_sections(args.config)
    unknown = sorted(set(tables) - {s.name for s in sections})
    if unknown:
        raise ValueError(f"{source}: unknown table(s) {unknown}; this command reads {[s.name for s in sections]}")
    configs: dict[str, Any] = {}
    given: dict[str, dict[str, Any]] = {}
    for s in sections:
        table = tables.get(s.name, {})
        if not isinstance(table, dict):
            raise ValueError(f"{source}: [{s.name}] must be a table of fields, got {type(table).__name__}")
        refused = sorted(set(table) & set(s.skip))
        if refused:
            raise ValueError(f"{source} [{s.name}]: {refused} cannot be set for this command")
        given[s.name] = {**table, **overrides_from_args(args, s.cls, prefix=s.prefix)}
        configs[s.name] = config_from_dict(s.cls, given[s.name], source=f"{source} [{s.name}]")
    return configs, given


# ================================ core: info, generate ================================


def _add_model_source(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="scratchgpt run directory, Hugging Face GPT-2/Llama/Qwen directory, "
                                          "or hub name")
    src.add_argument("--model", choices=PRESET_NAMES, help="a preset (GPT-2, Llama 3.2, Qwen3) with fresh random "
                                                           "weights")
    p.add_argument("--device", default="auto", help=f"{DEVICE_HELP} (default: 'auto')")


def _load_source(checkpoint: str, preset: str, device: Any, seed: int | None = None, *,
                 quantize: str | None = None, dtype: str | None = None):
    """(model, tokenizer or None) from a checkpoint, or a freshly initialised preset."""
    import torch

    from scratchgpt.checkpoint import load_any
    from scratchgpt.model.gpt import GPT

    if checkpoint:
        return load_any(checkpoint, device=device, quantize=quantize, inference_dtype=dtype)
    generator = torch.Generator().manual_seed(seed or 0)
    model = GPT(GPTConfig.from_name(preset), generator=generator).to(device).eval()
    if quantize or dtype:
        from scratchgpt.model.quantize import prepare_for_inference

        prepare_for_inference(model, quantize=quantize, dtype=dtype, device=device)
    return model, None


def _add_inference_flags(p: argparse.ArgumentParser, *, draft: bool) -> None:
    """--quantize / --dtype (faster CPU inference) and --draft (speculative decoding; generate only)."""
    p.add_argument("--quantize", choices=["int8"],
                   help="int8 weights (per output channel): ~2x faster CPU decoding, ~1/4 of the memory")
    p.add_argument("--dtype", choices=["float32", "bfloat16"],
                   help="weight dtype for inference; bfloat16 needs a CPU with native bf16 (avx512_bf16/AMX)")
    p.add_argument("--draft", metavar="CHECKPOINT",
                   help="speculative decoding with this smaller model (same tokenizer)" if draft
                   else "not supported here (speculative decoding runs in `scratchgpt generate`)")
    if draft:
        p.add_argument("--draft-tokens", type=int, default=4, metavar="K",
                       help="most tokens the draft proposes per pass (one fewer after a rejection, two more after "
                            "a pass kept whole)")


def _refuse_draft(args: argparse.Namespace, where: str) -> None:
    if getattr(args, "draft", None):
        raise ValueError(f"--draft is not supported by `scratchgpt {where}` (its decoding runs several "
                         f"conversations in one batch); use `scratchgpt generate --draft`")


@command
def _add_info(sub) -> None:
    p = sub.add_parser("info", help="show a model's configuration and parameter counts (reads no tokenizer)")
    _add_model_source(p)
    p.add_argument("--untied", action="store_true",
                   help="also count parameters as if lm_head were a separate matrix (as untied GPT-2 files store it)")
    p.set_defaults(func=_run_info)


def _run_info(args: argparse.Namespace) -> int:
    import json

    import torch

    from scratchgpt.checkpoint import describe_checkpoint
    from scratchgpt.model.gpt import GPT

    if args.checkpoint:
        config, details = describe_checkpoint(args.checkpoint)
    else:
        config, details = GPTConfig.from_name(args.model), {"kind": "preset", "tokenizer": None}
    # Only counted: the meta device allocates no memory (even for gpt2-xl), and no weights or
    # tokenizer files are read, so this works offline on any folder that has its config.json.
    model = GPT(config, device="meta")
    n = model.num_parameters()
    info = {
        "source": args.checkpoint or f"preset {args.model} (random weights)",
        **details,
        "config": config.to_dict(),
        "parameters": n,
        "parameters_without_embeddings": model.num_parameters(exclude_embeddings=True),
        "fp32_megabytes": round(n * 4 / 2**20, 1),
        "torch": torch.__version__,
    }
    if args.untied:
        info["parameters_untied"] = n + (config.vocab_size * config.n_embd if config.tie_word_embeddings else 0)
    print(json.dumps(info, indent=2))
    return 0


@command
def _add_generate(sub) -> None:
    from scratchgpt.config import GenerateConfig

    p = sub.add_parser("generate", help="generate text from a checkpoint or a fresh preset")
    add_config_sections(p, Section("generate", GenerateConfig), Section("sampling", SamplingConfig))
    _add_inference_flags(p, draft=True)
    p.set_defaults(func=_run_generate)


def _run_generate(args: argparse.Namespace) -> int:
    from scratchgpt.data.tokenizer import gpt2_tokenizer
    from scratchgpt.device import resolve_device
    from scratchgpt.inference.generate import make_generator, stream_text

    configs, _ = read_config_sections(args)
    cfg, sampling = configs["generate"], configs["sampling"]
    device = resolve_device(cfg.device)
    model, tokenizer = _load_source(cfg.checkpoint, cfg.model, device, sampling.seed, quantize=args.quantize,
                                    dtype=args.dtype)
    if tokenizer is None:
        tokenizer = gpt2_tokenizer(cfg.gpt2_dir or None)
    draft, stats = None, {}
    if args.draft:
        from scratchgpt.checkpoint import load_any
        from scratchgpt.inference.speculative import check_draft

        draft, draft_tokenizer = load_any(args.draft, device=device, quantize=args.quantize,
                                          inference_dtype=args.dtype)
        try:
            check_draft(model, draft, model_tokenizer=tokenizer, draft_tokenizer=draft_tokenizer or tokenizer)
        except ValueError as e:
            raise ValueError(f"--draft {args.draft}: {e}") from None
    generator = make_generator(sampling.seed, device)
    for i in range(cfg.num_samples):
        if cfg.num_samples > 1:
            print(f"--- sample {i + 1} ---")
        pieces = stream_text(model, tokenizer, cfg.prompt, sampling, generator=generator,
                             use_cache=cfg.cache, prompt_lookup=cfg.prompt_lookup, draft=draft,
                             draft_tokens=args.draft_tokens, stats=stats)
        if cfg.stream:
            print(cfg.prompt, end="", flush=True)
            for piece in pieces:
                print(piece, end="", flush=True)
            print()
        else:
            print(cfg.prompt + "".join(pieces))
    if draft is not None and stats.get("drafted"):
        print(f"draft acceptance: {stats['accepted']}/{stats['drafted']} = "
              f"{stats['accepted'] / stats['drafted']:.1%}", file=sys.stderr)
    return 0


# ================================ data + training: prepare, train ================================


def _toml_sections(path: str | None) -> dict:
    from scratchgpt.config import read_toml

    return read_toml(path) if path else {}


_PREPARE_ONLY_SKIP = ("block_size", "sampler", "stride", "shuffle")


@command
def _add_prepare(sub) -> None:
    from scratchgpt.config import DataConfig

    p = sub.add_parser(
        "prepare", help="tokenize text, JSONL, Parquet or Arrow files into train.bin / val.bin / meta.json",
        description="Tokenize a file, a folder or a glob of text, JSONL, Parquet or Arrow files (text and JSONL "
                    "also .gz/.zst/.xz; a datasets save_to_disk folder) into DIR/train.bin, DIR/val.bin and "
                    "DIR/meta.json, with the tokenizer saved beside them; documents (files, records) are separated "
                    "by end-of-text. Example: scratchgpt prepare --source input.txt --dir data/mytext "
                    "--tokenizer char; scratchgpt prepare --source web.jsonl.zst --text-field content --dir data/web",
    )
    p.add_argument("--config", "-c", help="a run TOML file; its [data] section supplies the defaults")
    p.add_argument("--gpt2-dir", help="folder with GPT-2's encoder.json + vocab.bpe (else SCRATCHGPT_GPT2_DIR)")
    p.add_argument("--progress", type=parse_bool, nargs="?", const=True, default=True, metavar="{true,false}",
                   help="progress bar (default: True; --no-progress or --quiet: none)")
    p.add_argument("--no-progress", "--quiet", dest="progress", action="store_const", const=False,
                   help=argparse.SUPPRESS)
    p.add_argument("--overwrite", action="store_true",
                   help="prepare into a folder that holds prepared data, a model or a run (replacing their files)")
    add_dataclass_args(p, DataConfig, skip=_PREPARE_ONLY_SKIP)
    p.set_defaults(func=_run_prepare)


def _run_prepare(args: argparse.Namespace) -> int:
    import json

    from scratchgpt.checkpoint import check_prepare_dir
    from scratchgpt.config import DataConfig, config_from_dict
    from scratchgpt.data.dataset import prepare

    raw = {**_toml_sections(args.config).get("data", {}), **overrides_from_args(args, DataConfig)}
    data = config_from_dict(DataConfig, raw, source=f"{args.config or 'command line'} [data]")
    if not data.source:
        raise ValueError("nothing to prepare: pass --source FILE|FOLDER|GLOB (or set source in [data])")
    if not data.dir:
        raise ValueError("no output folder: pass --dir FOLDER (or set dir in [data])")
    check_prepare_dir(data.dir, overwrite=args.overwrite)
    meta = prepare(data.source, data.dir, tokenizer=data.tokenizer, bpe_vocab_size=data.bpe_vocab_size,
                   val_fraction=data.val_fraction, split_by=data.split_by, errors=data.errors, workers=data.workers,
                   shard_tokens=data.shard_tokens, text_field=data.text_field, gpt2_dir=args.gpt2_dir,
                   progress=args.progress)
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
    add_config_sections(p, Section("model", GPTConfig), Section("data", DataConfig), Section("train", TrainConfig))
    p.set_defaults(func=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    import json

    from scratchgpt.config import DataConfig, TrainConfig
    from scratchgpt.training.modes.pretrain import pretrain, resolve_run_config
    from scratchgpt.training.runtime import is_main

    flags = {"model": overrides_from_args(args, GPTConfig), "data": overrides_from_args(args, DataConfig),
             "train": overrides_from_args(args, TrainConfig)}
    layers = [_toml_sections(args.config), flags]
    progress = layers[1]["train"].get("progress", layers[0].get("train", {}).get("progress", True))
    run = resolve_run_config(layers, source=args.config or "command line", progress=progress)
    result = pretrain(run)
    if is_main():  # under torchrun, rank 0 speaks for the job
        summary = {"run_dir": str(result.run_dir), "step": result.step, "tokens": result.tokens,
                   "elapsed_s": round(result.elapsed_s, 1), "tokens_per_s": round(result.tokens_per_s, 1),
                   "mfu": None if result.mfu is None else round(result.mfu, 4),
                   "running_train_loss": None if result.train_loss is None else round(result.train_loss, 4),
                   "eval_step": result.metrics_step, **{k: round(v, 4) for k, v in result.metrics.items()},
                   "best_val_loss": result.best_val_loss, "interrupted": result.interrupted}
        print(json.dumps(summary))
    return 130 if result.interrupted else 0




# ================================ fine-tuning: finetune, classify, chat ================================

# TrainConfig fields a fine-tune does not take from flags: the start is --init, samples are the mode's,
# and a custom export (merged LoRA, classifier head) needs the whole model on one rank.
_FINETUNE_TRAIN_SKIP = ("init_from", "fsdp", "sample_prompt", "sample_tokens", "sample_temperature", "sample_top_k")
_FINETUNE_MODES = {
    "classify": ("ClassifyConfig", "classification: replace the LM head by a Linear(C, classes) head",
                 "Fine-tune a classifier on (text, label) rows of a TSV (headerless = label<TAB>text), CSV, "
                 "JSONL or JSON file. Example: scratchgpt finetune classify --data SMSSpamCollection --balance "
                 "--init runs/shakespeare --out-dir runs/spam"),
    "instruct": ("InstructConfig", "instruction tuning on Alpaca-style JSON (instruction, input, output)",
                 "Instruction-tune on a JSON list or JSONL of {instruction, input, output}, rendered with the "
                 "alpaca, chatml or the model's own (tokenizer) template; the loss covers the response (and its "
                 "end-of-turn marker) only unless --no-mask-prompt. "
                 "Example: scratchgpt finetune instruct --data instruction-data.json --init gpt2 --out-dir runs/sft"),
    "dpo": ("DPOConfig", "preference tuning (DPO) on (instruction, input, chosen, rejected)",
            "Direct preference optimisation against a frozen copy of the starting model. Example: scratchgpt "
            "finetune dpo --data instruction-data-with-preference.json --init runs/sft --out-dir runs/dpo"),
}


@command
def _add_finetune(sub) -> None:
    from scratchgpt import config as config_module
    from scratchgpt.config import LoRAConfig

    p = sub.add_parser(
        "finetune", help="fine-tune a model: classify, instruct, dpo (full, partial or LoRA); merge LoRA adapters",
        description="Fine-tune through the same training loop as pretraining: a mode changes only the data, the "
                    "head, the loss and which weights train (--trainable, or --lora-rank N for LoRA adapters).",
    )
    modes = p.add_subparsers(dest="mode", required=True, metavar="MODE")
    for name, (cls_name, help_text, description) in _FINETUNE_MODES.items():
        cls = getattr(config_module, cls_name)
        m = modes.add_parser(name, help=help_text, description=description)
        # The [train] flags are the mode's own TrainConfig class: --help shows the defaults a run uses.
        add_config_sections(m, Section("finetune", cls), Section("train", cls.train_config, skip=_FINETUNE_TRAIN_SKIP),
                            Section("lora", LoRAConfig, prefix="lora-"), Section("model", GPTConfig))
        m.set_defaults(func=_run_finetune)

    merge = modes.add_parser(
        "merge", help="fold saved LoRA adapters into their base: a plain model again",
        description="Apply the adapters of a LoRA run (adapter.safetensors + adapter_config.json) to BASE, merge "
                    "them into its weights and save a run directory every command loads.",
    )
    merge.add_argument("--base", required=True, help="the model the adapters were trained on (run dir, HF dir/name)")
    merge.add_argument("--adapters", required=True, help="folder holding adapter.safetensors + adapter_config.json")
    merge.add_argument("--out-dir", required=True, help="where to write the merged model")
    merge.add_argument("--overwrite", action="store_true", help="replace a model or run already in --out-dir")
    merge.set_defaults(func=_run_finetune_merge)


def _run_finetune(args: argparse.Namespace) -> int:
    import json

    from scratchgpt.training.runtime import is_main

    configs, given = read_config_sections(args)
    cfg = configs["finetune"]
    lora = configs["lora"] if given["lora"] or cfg.trainable == "lora" else None
    train = configs["train"]
    model = given["model"] or None  # fields of a scratch model; a checkpoint brings its own shape
    if args.mode == "classify":
        from scratchgpt.training.modes.classify import finetune_classify as run
    elif args.mode == "instruct":
        from scratchgpt.training.modes.instruct import finetune_instruct as run
    else:
        from scratchgpt.training.modes.dpo import finetune_dpo as run
    result = run(cfg, train=train, lora=lora, model=model)

    def scalars(metrics: dict) -> dict:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items() if not isinstance(v, list)}

    splits = {k: scalars(v) for k, v in result.metrics.items() if k in ("train", "val", "test")}
    start = {k: scalars(v) for k, v in result.metrics["start"].items()}
    rest = {k: v for k, v in result.metrics.items() if not isinstance(v, dict)}
    if is_main():  # under torchrun, rank 0 speaks for the job
        print(json.dumps({"out_dir": str(result.out_dir), **splits, "start": start, **rest}))
    return 130 if result.interrupted else 0


def _run_finetune_merge(args: argparse.Namespace) -> int:
    import json

    from scratchgpt.training.finetune import merge_adapters

    out = merge_adapters(args.base, args.adapters, args.out_dir, overwrite=args.overwrite)
    print(json.dumps({"out_dir": str(out)}))
    return 0


@command
def _add_classify(sub) -> None:
    p = sub.add_parser(
        "classify", help="label texts with a classifier from `finetune classify`",
        description="Print one line per text: the label, its probability and the text (or JSON lines with --json). "
                    "Texts come from the arguments, from --file (one per line), or from stdin.",
    )
    p.add_argument("--checkpoint", required=True, help="a run directory written by `scratchgpt finetune classify`")
    p.add_argument("texts", nargs="*", help="texts to label")
    p.add_argument("--file", help="a file with one text per line")
    p.add_argument("--json", action="store_true", help="print JSON lines with every label's probability")
    p.add_argument("--device", default="auto", help=f"{DEVICE_HELP} (default: 'auto')")
    p.set_defaults(func=_run_classify)


def _run_classify(args: argparse.Namespace) -> int:
    import json

    from scratchgpt.data.dataset import read_text
    from scratchgpt.training.modes.classify import classify_texts, load_classifier

    texts = list(args.texts)
    if args.file:
        texts += [line for line in read_text(args.file).splitlines() if line.strip()]
    if not texts:
        texts = [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not texts:
        raise ValueError("no texts to label: pass them as arguments, with --file, or on stdin")
    from scratchgpt.device import resolve_device

    model, tokenizer, labels = load_classifier(args.checkpoint, device=resolve_device(args.device))
    for row in classify_texts(model, tokenizer, texts, labels):
        if args.json:
            print(json.dumps(row, ensure_ascii=False))
        else:
            print(f"{row['label']}\t{row['probs'][row['label']]:.4f}\t{row['text']}")
    return 0


@command
def _add_chat(sub) -> None:
    from scratchgpt.data.chat import CHAT_TEMPLATES

    p = sub.add_parser(
        "chat", help="talk to an instruction-tuned checkpoint (reads stdin lines; /reset, /quit)",
        description="An interactive prompt loop: each line you type is a user turn, the answer streams back, and "
                    "the conversation is kept (oldest turns dropped when the context fills). /reset forgets it, "
                    "/quit (or end of input) exits. Works with piped stdin too.",
    )
    p.add_argument("--checkpoint", required=True,
                   help="scratchgpt run directory, Hugging Face folder (GPT-2, Llama, Qwen) or hub name")
    p.add_argument("--chat-template", choices=CHAT_TEMPLATES,
                   help="'tokenizer' is the model's own Jinja template (a Hugging Face folder's "
                        "tokenizer_config.json). Default: the template the run was fine-tuned with (its config.json), "
                        "else the tokenizer's own if it has one, else alpaca")
    p.add_argument("--system", help="a system message that opens the conversation")
    p.add_argument("--device", default="auto", help=f"{DEVICE_HELP} (default: 'auto')")
    _add_inference_flags(p, draft=False)
    add_dataclass_args(p, SamplingConfig)
    p.set_defaults(func=_run_chat)


def _run_chat(args: argparse.Namespace) -> int:
    from scratchgpt.checkpoint import load_any, saved_chat_template
    from scratchgpt.device import resolve_device
    from scratchgpt.inference.chat_session import ChatSession

    _refuse_draft(args, "chat")
    model, tokenizer = load_any(args.checkpoint, device=resolve_device(args.device), quantize=args.quantize,
                                inference_dtype=args.dtype)
    template = args.chat_template or saved_chat_template(args.checkpoint, tokenizer=tokenizer)
    session = ChatSession(model, tokenizer, template=template, system=args.system,
                          sampling=SamplingConfig(**overrides_from_args(args, SamplingConfig)))
    interactive = sys.stdin.isatty()
    if interactive:
        shown = "the model's own chat template" if template == "tokenizer" else f"{template} template"
        print(f"chatting with {args.checkpoint} ({shown}); /reset forgets the conversation, /quit exits")
    while True:
        try:
            line = input("> ") if interactive else sys.stdin.readline()
        except EOFError:
            break
        if not interactive and not line:
            break  # end of piped input
        text = line.strip()
        if not text:
            continue
        if text == "/quit":
            break
        if text == "/reset":
            session.reset()
            print("(conversation cleared)", flush=True)
            continue
        try:
            for piece in session.reply(text):
                print(piece, end="", flush=True)
        except ValueError as e:  # one bad line (e.g. a special token) should not end the conversation
            print(f"error: {e}", file=sys.stderr, flush=True)
            continue
        print(flush=True)
    return 0


# ================================ serving: serve ================================


@command
def _add_serve(sub) -> None:
    from scratchgpt.config import ServeConfig, ServeLimits

    p = sub.add_parser(
        "serve", help="serve a checkpoint over an OpenAI-compatible HTTP API, with a chat page at /",
        description="Serve a checkpoint: POST /v1/completions and /v1/chat/completions (OpenAI's format, "
        "streaming included), GET /v1/models, GET /health, and a chat page at GET /. Needs the `serve` extra.",
    )
    add_config_sections(p, Section("serve", ServeConfig), Section("limits", ServeLimits))
    _add_inference_flags(p, draft=False)
    p.set_defaults(func=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401  (checked here so a missing extra is a one-line error)
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise ValueError(f"serving needs the `serve` extra ({e}); pip install 'scratchgpt[serve]'") from None
    from scratchgpt.inference.serve import serve

    _refuse_draft(args, "serve")
    configs, _ = read_config_sections(args)
    cfg = configs["serve"]
    fast = {k: v for k, v in (("quantize", args.quantize), ("inference_dtype", args.dtype)) if v}
    serve(cfg.checkpoint, host=cfg.host, port=cfg.port, api_key=cfg.api_key, model_name=cfg.model_name,
          chat_template=cfg.chat_template, device=cfg.device, limits=configs["limits"], log_level=cfg.log_level,
          **fast)
    return 0


# ================================ export: gguf, onnx ================================


@command
def _add_export(sub) -> None:
    p = sub.add_parser(
        "export", help="write a model as GGUF (llama.cpp, Ollama), ONNX (onnxruntime) or an int8 run directory",
        description="Export a checkpoint for other runtimes. GGUF: llama.cpp's gpt2, llama, qwen2 or qwen3 "
                    "architecture (GPT-2, Llama 3, Qwen2, Qwen3 models) with the byte-level BPE tokenizer embedded "
                    "(run it with: llama-cli -m model.gguf -p 'Hello'). ONNX: input_ids plus "
                    "past_keys/past_values in, logits plus present_keys/present_values out, dynamic lengths "
                    "(both need the `export` extra). int8: a scratchgpt run directory with int8 weights and float32 "
                    "scales (safetensors), a quarter of float32's bytes; every command loads it as it is.",
    )
    p.add_argument("--checkpoint", required=True,
                   help="scratchgpt run directory or Hugging Face GPT-2 / Llama / Qwen folder")
    p.add_argument("--format", required=True, choices=["gguf", "onnx", "int8"], help="the format to write")
    p.add_argument("--out", required=True,
                   help="the file to write (model.gguf, model.onnx), or for int8 a new run directory")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file or folder")
    p.add_argument("--gguf-dtype", default="float32", choices=["float32", "float16", "q8_0"],
                   help="GGUF matrix type: float32 (default), float16, or q8_0 (llama.cpp's int8, ~1/4 of "
                        "float32; llama-quantize makes Q4_K and others from the float file)")
    p.set_defaults(func=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from scratchgpt.checkpoint import check_overwrite, load_any

    src = Path(args.checkpoint)
    check_overwrite(args.out, overwrite=args.overwrite, flag="--out")  # before any work
    if (src / "adapter_config.json").is_file() and not (src / "config.json").is_file():
        raise ValueError(f"{src} holds LoRA adapters only; merge them into their base first: scratchgpt finetune "
                         f"merge --base BASE --adapters {src} --out-dir MERGED, then export MERGED")
    if args.format == "int8":
        return _export_int8(src, Path(args.out), overwrite=args.overwrite)
    needs = ["gguf"] if args.format == "gguf" else ["onnx", "onnxscript"]
    for module in needs:
        try:
            __import__(module)
        except ImportError:
            raise ValueError(f"--format {args.format} needs the `export` extra (no module {module!r}); "
                             f"pip install 'scratchgpt[export]'") from None
    model, tokenizer = load_any(args.checkpoint)
    if args.format == "gguf":
        from scratchgpt.export.gguf import export_gguf

        out = export_gguf(model, tokenizer, args.out, dtype=args.gguf_dtype, name=src.name or "scratchgpt")
    else:
        from scratchgpt.export.onnx import export_onnx

        out = export_onnx(model, args.out)
    print(json.dumps({"format": args.format, "out": str(out), "bytes": Path(out).stat().st_size}))
    return 0


def _export_int8(src: Path, out: Path, *, overwrite: bool) -> int:
    import json

    from scratchgpt.checkpoint import quantize_checkpoint

    out = quantize_checkpoint(src, out, "int8", overwrite=overwrite)
    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    print(json.dumps({"format": "int8", "out": str(out), "bytes": size}))
    return 0


# ================================ evaluation: eval ================================

_EVAL_HELP = {
    "perplexity": "loss, perplexity and bits per byte on text or prepared token files (strided windows)",
    "choice": "multiple-choice accuracy from a JSONL task file (HellaSwag, ARC, PIQA layouts)",
    "classify": "accuracy, per-class P/R/F1 and confusion matrix of a `finetune classify` checkpoint",
    "judge": "answer held-out instructions, score each 0-100 with a judge behind an OpenAI-compatible URL",
}


@command
def _add_eval(sub) -> None:
    from scratchgpt.config import EVAL_TASKS, EvalConfig

    p = sub.add_parser(
        "eval", help="evaluate a model: perplexity, multiple choice, classifier, judged answers; TOML suites",
        description="Score a model and write a JSON report plus a markdown table (printed too). One task: "
                    "scratchgpt eval perplexity --checkpoint runs/x --data val.txt. A suite of tasks for one model: "
                    "scratchgpt eval -c suite.toml. lm-evaluation-harness: python -m scratchgpt.eval.lm_eval_adapter "
                    "--model scratchgpt --model_args checkpoint=runs/x --tasks ...",
    )
    p.add_argument("--config", "-c", dest="suite", metavar="SUITE.toml",
                   help="a suite: [eval] (model, device, out_dir) and [[TASK]] tables, one report per table")
    tasks = p.add_subparsers(dest="task", metavar="TASK")
    for name, cls in EVAL_TASKS.items():
        t = tasks.add_parser(name, help=_EVAL_HELP[name],
                             description=f"{_EVAL_HELP[name]}. -c FILE.toml may hold [eval] and [{name}] tables.")
        add_config_sections(t, Section("eval", EvalConfig), Section(name, cls))
    p.set_defaults(func=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    import json

    from scratchgpt.eval.report import markdown_table
    from scratchgpt.eval.suite import run_suite, run_task

    if args.suite:
        if args.task:
            raise ValueError("pass either a suite (scratchgpt eval -c suite.toml) or one TASK with its flags, not both")
        reports = run_suite(args.suite)
    elif args.task:
        configs, _ = read_config_sections(args)
        reports = [run_task(args.task, configs[args.task], configs["eval"])]
    else:
        raise ValueError("nothing to evaluate: name a TASK (perplexity, choice, classify, judge) or pass -c suite.toml")
    print(markdown_table(reports))
    print(json.dumps({"reports": [r["paths"]["json"] for r in reports]}))
    return 0


# ================================ entry point ================================

def package_version() -> str:
    """The installed distribution's version (what pip reports); from a source tree that is not
    installed, the version the package itself declares (pyproject.toml reads the same one)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("scratchgpt")
    except PackageNotFoundError:
        import scratchgpt

        return scratchgpt.__version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scratchgpt",
        description="Train, fine-tune, run and serve GPT-2-class language models.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in _REGISTER:
        register(sub)
    return parser


class Terminated(BaseException):
    """SIGTERM outside the training loop (which turns it into a stop-and-save request)."""


def _on_sigterm(signum: int, frame) -> None:
    raise Terminated


# Commands that decode or evaluate: their torch thread count is fitted to the machine at start (training
# picks and logs its own, and keeps it across a resume).
_INFERENCE_COMMANDS = frozenset({"generate", "chat", "serve", "eval", "classify"})


# OpenMP spin counts (libgomp's GOMP_SPINCOUNT) for an idle machine: a waiting thread spins this many rounds
# (~tens of microseconds), then sleeps. Measured on a 2-core Xeon, demo model, 30 steps: as fast as libgomp's
# default (300,000) alone (4.1 vs 4.4 s), but 14 s instead of 17-60 s beside two busy processes.
_QUIET_SPINCOUNT = "30000"


def _set_openmp_waiting() -> None:
    """How OpenMP's idle threads wait, chosen from the machine's load before torch loads (libgomp reads it then).

    Why: after every parallel operator PyTorch's threads meet at a barrier, and libgomp spins there for
    ~300,000 rounds by default. When the cores are oversubscribed, the spinner burns the time slice that the
    thread it waits for needs: the demo's training ran > 11x slower beside busy processes. So: on a busy
    machine threads sleep at once (OMP_WAIT_POLICY=PASSIVE, ~20% slower alone but no collapse); on a quiet
    one they spin briefly, then sleep. Neither changes any result. A policy the user set wins; nothing
    changes when torch is already loaded (`main()` called in-process). bench/busy.py measures this.
    """
    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ or "torch" in sys.modules:
        return
    from scratchgpt.device import other_runnable_threads

    os.environ.update(openmp_waiting(other_runnable_threads()))


def openmp_waiting(others: int | None) -> dict[str, str]:
    """The OpenMP waiting setting for a machine where `others` threads of other processes are running (None:
    unknown): sleep at once on a busy machine, spin briefly on a quiet one (see _set_openmp_waiting)."""
    return {"OMP_WAIT_POLICY": "PASSIVE"} if others else {"GOMP_SPINCOUNT": _QUIET_SPINCOUNT}


def _fit_threads() -> None:
    """One torch thread per usable core, fewer on a heavily loaded machine (see device.choose_threads)."""
    from scratchgpt.device import choose_threads, set_threads

    set_threads(choose_threads())


def _import_torch_holding_signals() -> None:
    """Import torch with SIGINT/SIGTERM held back until the import is done, then act on them.

    Much of torch's import runs C++ that calls back into Python; a KeyboardInterrupt raised inside such a
    callback cannot unwind through the C++ frames and aborts the process (SIGABRT, "terminate called after
    throwing an instance of 'pybind11::error_already_set'"). Holding the signal for the second or two of
    the import turns a Ctrl-C at that moment into the usual one-line "interrupted" and exit code 130.

    The same holds for what torch imports lazily from C++ later: the first operation on the meta
    device (every checkpoint load, `info`) runs a Python kernel that imports torch._dynamo, sympy and
    ~800 modules (1-2 s) with C++ frames below it. Importing torch._dynamo here, held, moves that
    window inside this one; afterwards loading a model imports nothing more.
    """
    if "torch" in sys.modules or threading.current_thread() is not threading.main_thread():
        return
    received: list[int] = []
    held = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, lambda signum, frame: received.append(signum)) for s in held}
    try:
        import torch  # noqa: F401
        import torch._dynamo  # noqa: F401
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if received:
        if received[0] == signal.SIGINT:
            raise KeyboardInterrupt
        raise Terminated


def main(argv: Sequence[str] | None = None) -> int:
    command_name = "scratchgpt"
    previous = None
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        command_name = f"scratchgpt {args.command}"
        _set_openmp_waiting()
        _import_torch_holding_signals()
        if args.command in _INFERENCE_COMMANDS:
            _fit_threads()
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"{command_name}: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print(f"{command_name}: terminated (SIGTERM)", file=sys.stderr)
        return 143
    except USER_ERRORS as e:
        print(f"{command_name}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        # torchrun's elastic agent turns SIGINT/SIGTERM into SignalException (no torch import needed to test).
        if type(e).__name__ == "SignalException":
            sig = getattr(e, "sigval", signal.SIGTERM)
            print(f"{command_name}: stopped by {signal.Signals(sig).name}", file=sys.stderr)
            return 128 + int(sig)
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
