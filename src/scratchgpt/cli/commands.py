"""The `scratchgpt` subcommands: for each one its parser (`_add_X`) and what it runs (`_run_X`).

Every command takes `-c FILE.toml` and one flag per field of its configs, read back through one path
(`cli/flags.py`: file first, then flags, each config built and validated once). The configs of commands
that only the command line has (info, generate, chat, classify, prepare, export, merge) are declared
here; the library's own (model, training, fine-tuning, sampling, eval, serving) live in `config.py`.
The run functions import torch and the library inside, so that building the parser stays instant.
"""

from __future__ import annotations

import argparse
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from scratchgpt.cli.flags import Section, add_config_sections, read_config_sections, read_config_tables
from scratchgpt.config import (
    DEVICE_HELP,
    DRAFT_TOKENS,
    EVAL_TASKS,
    INFERENCE_DTYPE_HELP,
    PRESET_NAMES,
    QUANTIZE_HELP,
    ChatTemplateName,
    ClassifyConfig,
    Config,
    DataConfig,
    DPOConfig,
    EvalConfig,
    GPTConfig,
    InferenceDtype,
    InstructConfig,
    LoRAConfig,
    Quantize,
    SamplingConfig,
    ServeConfig,
    ServeLimits,
    TrainConfig,
    same_as,
    setting,
)

# ================================ configs of the commands only the CLI has ================================

CHECKPOINT_HELP = "scratchgpt run directory, Hugging Face folder (GPT-2, Llama, Qwen) or hub name"


@dataclass
class ModelSource(Config):
    """A model to run: a checkpoint, or a preset with fresh random weights; and the device."""

    checkpoint: str = setting("", CHECKPOINT_HELP)
    model: str | None = setting(None, "a preset (GPT-2, Llama 3.2, Qwen3) with fresh random weights (instead of "
                                      "--checkpoint)", choices=PRESET_NAMES)
    device: str = setting("auto", DEVICE_HELP)

    def __post_init__(self) -> None:
        super().__post_init__()
        if bool(self.checkpoint) == bool(self.model):
            raise ValueError(f"{type(self).__name__}: give exactly one of checkpoint (--checkpoint) and model "
                             f"(--model)")


@dataclass
class InfoConfig(ModelSource):
    """`scratchgpt info`: a model's configuration and parameter counts (counted on the meta device)."""

    untied: bool = setting(False, "also count parameters as if lm_head were a separate matrix (as untied GPT-2 "
                                  "files store it)")


@dataclass
class GenerateConfig(ModelSource):
    """`scratchgpt generate`: which model, where, what to print, how fast (how to sample is SamplingConfig)."""

    prompt: str = setting("", "text to continue (empty: start from end-of-text)")
    num_samples: int = setting(1, "independent completions to print", ge=1)
    stream: bool = setting(False, "print text as it is generated")
    cache: bool = setting(True, "KV cache (--no-cache recomputes the whole context per token)")
    prompt_lookup: int = setting(0, "greedy only: check up to K tokens copied from earlier context per pass "
                                    "(same output)", ge=0)
    gpt2_dir: str | None = setting(None, "folder with GPT-2's encoder.json + vocab.bpe (else SCRATCHGPT_GPT2_DIR)")
    quantize: Quantize | None = setting(None, QUANTIZE_HELP)
    dtype: InferenceDtype | None = setting(None, INFERENCE_DTYPE_HELP)
    # Only here: chat and serve decode several conversations in one batch, which speculation does not.
    draft: str | None = setting(None, "speculative decoding with this smaller model (same tokenizer)")
    draft_tokens: int = setting(DRAFT_TOKENS, "most tokens the draft proposes per pass (one fewer after a rejection, "
                                              "two more after a pass kept whole)", ge=1)


@dataclass
class ChatConfig(Config):
    """`scratchgpt chat`: which model, its chat template and system message (how to sample is SamplingConfig)."""

    checkpoint: str = setting("", CHECKPOINT_HELP, required=True)
    chat_template: ChatTemplateName | None = setting(
        None, "'tokenizer' is the model's own Jinja template (a Hugging Face folder's tokenizer_config.json). None: "
              "the template the run was fine-tuned with (its config.json), else the tokenizer's own if it has one, "
              "else alpaca")
    system: str | None = setting(None, "a system message that opens the conversation")
    device: str = setting("auto", DEVICE_HELP)
    quantize: Quantize | None = setting(None, QUANTIZE_HELP)
    dtype: InferenceDtype | None = setting(None, INFERENCE_DTYPE_HELP)


@dataclass
class ClassifyTextsConfig(Config):
    """`scratchgpt classify`: label texts with a `finetune classify` checkpoint."""

    checkpoint: str = setting("", "a run directory written by `scratchgpt finetune classify`", required=True)
    file: str | None = setting(None, "a file with one text per line")
    json: bool = setting(False, "print JSON lines with every label's probability")
    device: str = setting("auto", DEVICE_HELP)


@dataclass
class PrepareConfig(Config):
    """`scratchgpt prepare`'s own settings (what it tokenizes, where and how is DataConfig)."""

    gpt2_dir: str | None = same_as(GenerateConfig, "gpt2_dir")
    progress: bool = setting(True, "progress bar (--no-progress or --quiet: none)")
    overwrite: bool = setting(False, "prepare into a folder that holds prepared data, a model or a run (replacing "
                                     "their files)")


@dataclass
class ExportConfig(Config):
    """`scratchgpt export`: a checkpoint written as GGUF, ONNX or a quantized (int8, int4) run directory."""

    checkpoint: str = setting("", "scratchgpt run directory or Hugging Face GPT-2 / Llama / Qwen folder",
                              required=True)
    # The run-directory formats are the --quantize modes: int8, int4 (groups of 32), int4-g64, int4-g128.
    format: str | None = setting(None, "the format to write", required=True,
                                 choices=("gguf", "onnx", *get_args(Quantize)))
    out: str = setting("", "the file to write (model.gguf, model.onnx), or for int8/int4 a new run directory",
                       required=True)
    overwrite: bool = setting(False, "replace an existing --out file or folder")
    gguf_dtype: Literal["float32", "float16", "q8_0", "q4_0"] = setting(
        "float32", "GGUF matrix type: float32, float16, q8_0 (llama.cpp's int8, ~1/4 of float32) or q4_0 (its int4, "
                   "~1/7); llama-quantize makes Q4_K and others from the float file")


@dataclass
class MergeConfig(Config):
    """`scratchgpt finetune merge`: fold saved LoRA adapters into their base model."""

    base: str = setting("", "the model the adapters were trained on (run dir, HF dir/name)", required=True)
    adapters: str = setting("", "folder holding adapter.safetensors + adapter_config.json", required=True)
    out_dir: str = setting("", "where to write the merged model", required=True)
    overwrite: bool = setting(False, "replace a model or run already in out_dir")


# ================================ core: info, generate ================================


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="show a model's configuration and parameter counts (reads no tokenizer)")
    add_config_sections(p, Section("info", InfoConfig))
    p.set_defaults(func=_run_info)


def _run_info(args: argparse.Namespace) -> int:
    import json

    import torch

    from scratchgpt.checkpoint import describe_checkpoint
    from scratchgpt.model.gpt import GPT

    cfg: InfoConfig = read_config_sections(args)[0]["info"]
    if cfg.checkpoint:
        config, details = describe_checkpoint(cfg.checkpoint)
    else:
        config, details = GPTConfig.from_name(cfg.model), {"kind": "preset", "tokenizer": None}
    # Only counted: the meta device allocates no memory (even for gpt2-xl), and no weights or
    # tokenizer files are read, so this works offline on any folder that has its config.json.
    model = GPT(config, device="meta")
    n = model.num_parameters()
    info = {
        "source": cfg.checkpoint or f"preset {cfg.model} (random weights)",
        **details,
        "config": config.to_dict(),
        "parameters": n,
        "parameters_without_embeddings": model.num_parameters(exclude_embeddings=True),
        "fp32_megabytes": round(n * 4 / 2**20, 1),
        "torch": torch.__version__,
    }
    if cfg.untied:
        info["parameters_untied"] = n + (config.vocab_size * config.n_embd if config.tie_word_embeddings else 0)
    print(json.dumps(info, indent=2))
    return 0


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a checkpoint or a fresh preset")
    add_config_sections(p, Section("generate", GenerateConfig), Section("sampling", SamplingConfig))
    p.set_defaults(func=_run_generate)


def _load(cfg: GenerateConfig, device: Any, seed: int | None):
    """(model, tokenizer or None) from cfg's checkpoint, or its preset freshly initialised from `seed`."""
    import torch

    from scratchgpt.checkpoint import load_any
    from scratchgpt.model.gpt import GPT

    if cfg.checkpoint:
        return load_any(cfg.checkpoint, device=device, quantize=cfg.quantize, inference_dtype=cfg.dtype,
                        for_inference=True)
    model = GPT(GPTConfig.from_name(cfg.model), generator=torch.Generator().manual_seed(seed or 0)).to(device).eval()
    model.requires_grad_(False)
    if cfg.quantize or cfg.dtype:
        from scratchgpt.model.quantize import prepare_for_inference

        prepare_for_inference(model, quantize=cfg.quantize, dtype=cfg.dtype, device=device)
    return model, None


def _run_generate(args: argparse.Namespace) -> int:
    from scratchgpt.data.tokenizers import gpt2_tokenizer
    from scratchgpt.device import resolve_device
    from scratchgpt.inference.generate import make_generator, stream_text

    configs, _ = read_config_sections(args)
    cfg, sampling = configs["generate"], configs["sampling"]
    device = resolve_device(cfg.device)
    model, tokenizer = _load(cfg, device, sampling.seed)
    if tokenizer is None:
        tokenizer = gpt2_tokenizer(cfg.gpt2_dir)
    draft, stats = None, {}
    if cfg.draft:
        from scratchgpt.checkpoint import load_any
        from scratchgpt.inference.speculative import check_draft

        draft, draft_tokenizer = load_any(cfg.draft, device=device, quantize=cfg.quantize, inference_dtype=cfg.dtype,
                                          for_inference=True)
        try:
            check_draft(model, draft, model_tokenizer=tokenizer, draft_tokenizer=draft_tokenizer or tokenizer)
        except ValueError as e:
            raise ValueError(f"--draft {cfg.draft}: {e}") from None
    generator = make_generator(sampling.seed, device)
    for i in range(cfg.num_samples):
        if cfg.num_samples > 1:
            print(f"--- sample {i + 1} ---")
        pieces = stream_text(model, tokenizer, cfg.prompt, sampling, generator=generator,
                             use_cache=cfg.cache, prompt_lookup=cfg.prompt_lookup, draft=draft,
                             draft_tokens=cfg.draft_tokens, stats=stats)
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


def _add_prepare(sub) -> None:
    p = sub.add_parser(
        "prepare", help="tokenize text, JSONL, Parquet or Arrow files into train.bin / val.bin / meta.json",
        description="Tokenize a file, a folder or a glob of text, JSONL, Parquet or Arrow files (text and JSONL "
                    "also .gz/.zst/.xz; a datasets save_to_disk folder) into DIR/train.bin, DIR/val.bin and "
                    "DIR/meta.json, with the tokenizer saved beside them; documents (files, records) are separated "
                    "by end-of-text. Example: scratchgpt prepare --source input.txt --dir data/mytext "
                    "--tokenizer char; scratchgpt prepare --source web.jsonl.zst --text-field content --dir data/web. "
                    "-c takes a run file too: its [data] table is read, its [model] and [train] are train's.",
    )
    # A run file's [data] may hold how training draws windows: read, but no flags for them here.
    add_config_sections(p, Section("prepare", PrepareConfig),
                        Section("data", DataConfig, file_only=("block_size", "sampler", "stride", "shuffle")),
                        read_past=("model", "train"))
    p.add_argument("--quiet", dest="progress", action="store_const", const=False, help=argparse.SUPPRESS)
    p.set_defaults(func=_run_prepare)


def _run_prepare(args: argparse.Namespace) -> int:
    import json

    from scratchgpt.data.dataset import prepare
    from scratchgpt.training.run_state import check_prepare_dir

    configs, _ = read_config_sections(args)
    cfg, data = configs["prepare"], configs["data"]
    if not data.source:
        raise ValueError("nothing to prepare: pass --source FILE|FOLDER|GLOB (or set source in [data])")
    if not data.dir:
        raise ValueError("no output folder: pass --dir FOLDER (or set dir in [data])")
    check_prepare_dir(data.dir, overwrite=cfg.overwrite)
    meta = prepare(data.source, data.dir, tokenizer=data.tokenizer, bpe_vocab_size=data.bpe_vocab_size,
                   val_fraction=data.val_fraction, split_by=data.split_by, errors=data.errors, workers=data.workers,
                   shard_tokens=data.shard_tokens, text_field=data.text_field, gpt2_dir=cfg.gpt2_dir,
                   progress=cfg.progress)
    summary = {k: meta[k] for k in ("tokenizer", "vocab_size", "dtype", "train_tokens", "val_tokens")}
    print(json.dumps({"dir": data.dir, "files": len(meta["files"]), **summary}))
    return 0


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train", help="pretrain a GPT on prepared token files (torchrun: DDP, or FSDP with --fsdp)",
        description="Train a GPT as a TOML run file describes ([model], [data], [train]); every field can be "
                    "overridden by its flag. Several processes: torchrun --nproc_per_node=N -m scratchgpt train ...",
    )
    add_config_sections(p, Section("model", GPTConfig), Section("data", DataConfig), Section("train", TrainConfig))
    p.set_defaults(func=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    import json

    from scratchgpt.training.modes.pretrain import pretrain, resolve_run_config
    from scratchgpt.training.runtime import is_main

    # The given values, not built configs: fields left unset come from the run being resumed and from the
    # prepared data (vocab_size), which resolve_run_config reads before building the run's configs once.
    given = read_config_tables(args)
    run = resolve_run_config([given], source=args.config or "command line",
                             progress=given["train"].get("progress", True))
    result = pretrain(run)
    if is_main():  # under torchrun, rank 0 speaks for the job
        summary = {"run_dir": str(result.run_dir), "step": result.step, "tokens": result.tokens,
                   "elapsed_s": round(result.elapsed_s, 1), "tokens_per_s": round(result.tokens_per_s, 1),
                   "mfu": None if result.mfu is None else round(result.mfu, 4),
                   "running_train_loss": None if result.train_loss is None else round(result.train_loss, 4),
                   "eval_step": result.metrics_step, **{k: round(v, 4) for k, v in result.metrics.items()},
                   "best_val_loss": result.best_val_loss, "interrupted": result.interrupted}
        print(json.dumps(summary))
    return stopped_exit_code(result)


def stopped_exit_code(result: Any) -> int:
    """A training command's exit code: 0, or 128 + the signal that stopped the run and saved its checkpoint
    (130 for Ctrl-C, 143 for SIGTERM, as for a command stopped outside the loop; 130 on a rank that stopped
    because another one was asked to)."""
    if not result.interrupted:
        return 0
    return 128 + int(result.stop_signal or signal.SIGINT)


# ================================ fine-tuning: finetune, classify, chat ================================

# TrainConfig fields a fine-tune does not take: the start is --init, samples are the mode's, and a custom
# export (merged LoRA, classifier head) needs the whole model on one rank.
_FINETUNE_TRAIN_SKIP = ("init_from", "fsdp", "sample_prompt", "sample_tokens", "sample_temperature", "sample_top_k")
_FINETUNE_MODES = {
    "classify": (ClassifyConfig, "classification: replace the LM head by a Linear(C, classes) head",
                 "Fine-tune a classifier on (text, label) rows of a TSV (headerless = label<TAB>text), CSV, "
                 "JSONL or JSON file. Example: scratchgpt finetune classify --data SMSSpamCollection --balance "
                 "--init runs/shakespeare --out-dir runs/spam"),
    "instruct": (InstructConfig, "instruction tuning on Alpaca-style JSON (instruction, input, output)",
                 "Instruction-tune on a JSON list or JSONL of {instruction, input, output}, rendered with the "
                 "alpaca, chatml or the model's own (tokenizer) template; the loss covers the response (and its "
                 "end-of-turn marker) only unless --no-mask-prompt. "
                 "Example: scratchgpt finetune instruct --data instruction-data.json --init gpt2 --out-dir runs/sft"),
    "dpo": (DPOConfig, "preference tuning (DPO) on (instruction, input, chosen, rejected)",
            "Direct preference optimisation against a frozen copy of the starting model. Example: scratchgpt "
            "finetune dpo --data instruction-data-with-preference.json --init runs/sft --out-dir runs/dpo"),
}


def _add_finetune(sub) -> None:
    p = sub.add_parser(
        "finetune", help="fine-tune a model: classify, instruct, dpo (full, partial or LoRA); merge LoRA adapters",
        description="Fine-tune through the same training loop as pretraining: a mode changes only the data, the "
                    "head, the loss and which weights train (--trainable, or --lora-rank N for LoRA adapters).",
    )
    modes = p.add_subparsers(dest="mode", required=True, metavar="MODE")
    for name, (cls, help_text, description) in _FINETUNE_MODES.items():
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
    add_config_sections(merge, Section("merge", MergeConfig))
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
    return stopped_exit_code(result)


def _run_finetune_merge(args: argparse.Namespace) -> int:
    import json

    from scratchgpt.training.finetune import merge_adapters

    cfg: MergeConfig = read_config_sections(args)[0]["merge"]
    out = merge_adapters(cfg.base, cfg.adapters, cfg.out_dir, overwrite=cfg.overwrite)
    print(json.dumps({"out_dir": str(out)}))
    return 0


def _add_classify(sub) -> None:
    p = sub.add_parser(
        "classify", help="label texts with a classifier from `finetune classify`",
        description="Print one line per text: the label, its probability and the text (or JSON lines with --json). "
                    "Texts come from the arguments, from --file (one per line), or from stdin.",
    )
    p.add_argument("texts", nargs="*", help="texts to label")
    add_config_sections(p, Section("classify", ClassifyTextsConfig))
    p.set_defaults(func=_run_classify)


def _run_classify(args: argparse.Namespace) -> int:
    import json

    from scratchgpt.data.dataset import read_text
    from scratchgpt.device import resolve_device
    from scratchgpt.training.modes.classify import classify_texts, load_classifier

    cfg: ClassifyTextsConfig = read_config_sections(args)[0]["classify"]
    texts = list(args.texts)
    if cfg.file:
        texts += [line for line in read_text(cfg.file).splitlines() if line.strip()]
    if not texts:
        texts = [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not texts:
        raise ValueError("no texts to label: pass them as arguments, with --file, or on stdin")
    model, tokenizer, labels = load_classifier(cfg.checkpoint, device=resolve_device(cfg.device))
    for row in classify_texts(model, tokenizer, texts, labels):
        if cfg.json:
            print(json.dumps(row, ensure_ascii=False))
        else:
            print(f"{row['label']}\t{row['probs'][row['label']]:.4f}\t{row['text']}")
    return 0


def _add_chat(sub) -> None:
    p = sub.add_parser(
        "chat", help="talk to an instruction-tuned checkpoint (reads stdin lines; /reset, /quit)",
        description="An interactive prompt loop: each line you type is a user turn, the answer streams back, and "
                    "the conversation is kept (oldest turns dropped when the context fills). /reset forgets it, "
                    "/quit (or end of input) exits. Works with piped stdin too.",
    )
    add_config_sections(p, Section("chat", ChatConfig), Section("sampling", SamplingConfig))
    p.set_defaults(func=_run_chat)


def _run_chat(args: argparse.Namespace) -> int:
    from scratchgpt.checkpoint import load_any, saved_chat_template
    from scratchgpt.device import resolve_device
    from scratchgpt.inference.chat_session import ChatSession

    configs, _ = read_config_sections(args)
    cfg: ChatConfig = configs["chat"]
    model, tokenizer = load_any(cfg.checkpoint, device=resolve_device(cfg.device), quantize=cfg.quantize,
                                inference_dtype=cfg.dtype, for_inference=True)
    template = cfg.chat_template or saved_chat_template(cfg.checkpoint, tokenizer=tokenizer)
    session = ChatSession(model, tokenizer, template=template, system=cfg.system, sampling=configs["sampling"])
    interactive = sys.stdin.isatty()
    if interactive:
        shown = "the model's own chat template" if template == "tokenizer" else f"{template} template"
        print(f"chatting with {cfg.checkpoint} ({shown}); /reset forgets the conversation, /quit exits")
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


def _add_serve(sub) -> None:
    p = sub.add_parser(
        "serve", help="serve a checkpoint over an OpenAI-compatible HTTP API, with a chat page at /",
        description="Serve a checkpoint: POST /v1/completions and /v1/chat/completions (OpenAI's format, "
        "streaming included), GET /v1/models, GET /health, and a chat page at GET /. Needs the `serve` extra.",
    )
    add_config_sections(p, Section("serve", ServeConfig), Section("limits", ServeLimits))
    p.set_defaults(func=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401  (checked here so a missing extra is a one-line error)
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise ValueError(f"serving needs the `serve` extra ({e}); pip install 'scratchgpt[serve]'") from None
    from scratchgpt.inference.serve import serve

    configs, _ = read_config_sections(args)
    cfg: ServeConfig = configs["serve"]
    serve(cfg.checkpoint, host=cfg.host, port=cfg.port, api_key=cfg.api_key, model_name=cfg.model_name,
          chat_template=cfg.chat_template, device=cfg.device, limits=configs["limits"], log_level=cfg.log_level,
          quantize=cfg.quantize, inference_dtype=cfg.dtype)
    return 0


# ================================ export: gguf, onnx, int8, int4 ================================


def _add_export(sub) -> None:
    p = sub.add_parser(
        "export", help="write a model as GGUF (llama.cpp, Ollama), ONNX (onnxruntime) or an int8/int4 run directory",
        description="Export a checkpoint for other runtimes. GGUF: llama.cpp's gpt2, llama, qwen2 or qwen3 "
                    "architecture (GPT-2, Llama 3, Qwen2, Qwen3 models) with the byte-level BPE tokenizer embedded "
                    "(run it with: llama-cli -m model.gguf -p 'Hello'). ONNX: input_ids plus "
                    "past_keys/past_values in, logits plus present_keys/present_values out, dynamic lengths "
                    "(both need the `export` extra). int8: a scratchgpt run directory with int8 weights and float32 "
                    "scales (safetensors), a quarter of float32's bytes; int4 (groups of 32; int4-g64, int4-g128): "
                    "packed 4-bit weights and float16 group scales, about an eighth; every command loads them as "
                    "they are.",
    )
    add_config_sections(p, Section("export", ExportConfig))
    p.set_defaults(func=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    import json

    from scratchgpt.checkpoint import load_any
    from scratchgpt.files import check_overwrite

    cfg: ExportConfig = read_config_sections(args)[0]["export"]
    src = Path(cfg.checkpoint)
    check_overwrite(cfg.out, overwrite=cfg.overwrite, flag="--out")  # before any work
    if (src / "adapter_config.json").is_file() and not (src / "config.json").is_file():
        raise ValueError(f"{src} holds LoRA adapters only; merge them into their base first: scratchgpt finetune "
                         f"merge --base BASE --adapters {src} --out-dir MERGED, then export MERGED")
    if cfg.format in get_args(Quantize):
        return _export_quantized(src, Path(cfg.out), cfg.format, overwrite=cfg.overwrite)
    needs = ["gguf"] if cfg.format == "gguf" else ["onnx", "onnxscript"]
    for module in needs:
        try:
            __import__(module)
        except ImportError:
            raise ValueError(f"--format {cfg.format} needs the `export` extra (no module {module!r}); "
                             f"pip install 'scratchgpt[export]'") from None
    model, tokenizer = load_any(cfg.checkpoint)
    if cfg.format == "gguf":
        from scratchgpt.export.gguf import export_gguf

        out = export_gguf(model, tokenizer, cfg.out, dtype=cfg.gguf_dtype, name=src.name or "scratchgpt")
    else:
        from scratchgpt.export.onnx import export_onnx

        out = export_onnx(model, cfg.out)
    print(json.dumps({"format": cfg.format, "out": str(out), "bytes": Path(out).stat().st_size}))
    return 0


def _export_quantized(src: Path, out: Path, mode: str, *, overwrite: bool) -> int:
    import json

    from scratchgpt.checkpoint import quantize_checkpoint

    out = quantize_checkpoint(src, out, mode, overwrite=overwrite)
    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    print(json.dumps({"format": mode, "out": str(out), "bytes": size}))
    return 0


# ================================ evaluation: eval ================================

_EVAL_HELP = {
    "perplexity": "loss, perplexity and bits per byte on text or prepared token files (strided windows)",
    "choice": "multiple-choice accuracy from a JSONL task file (HellaSwag, ARC, PIQA layouts)",
    "classify": "accuracy, per-class P/R/F1 and confusion matrix of a `finetune classify` checkpoint",
    "judge": "answer held-out instructions, score each 0-100 with a judge behind an OpenAI-compatible URL",
}


def _add_eval(sub) -> None:
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


# Each adds one subcommand's parser, in --help order.
COMMANDS = (_add_info, _add_generate, _add_prepare, _add_train, _add_finetune, _add_classify, _add_chat, _add_serve,
            _add_export, _add_eval)
