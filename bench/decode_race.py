"""Decoding race against llama.cpp on the same weights: float32 / int8 / int4 vs F32 / Q8_0 / Q4_0.

For each model (GPT-2 124M, and a Llama-3.2-1B-shaped model), random weights (seeded), batch 1, the same
16 prompt token ids, 128 greedy tokens, 2 threads on both sides:
  - scratchgpt: `generate` on the float32 model, on `quantize_model(..., "int8")` and on
    `quantize_model(..., "int4")` (which on CPUs where torch's int4 kernel loses to float32 falls back to
    float32 weights, and says so: the row then measures that fallback);
  - llama.cpp: GGUF files written by scratchgpt's own `export_gguf` (float32, q8_0, q4_0; gguf-py's
    bit-exact port of ggml's quantizers) and decoded by llama-cpp-python in a child process (its own
    virtual environment, outside the repo: `bash bench/build_llama_cpp.sh` builds it with native CPU flags,
    ~10 CPU-minutes once).
Rounds are interleaved (ours, theirs, ours, theirs, ...) and the best of N kept. For each pair: tok/s, the
ratio (ours / llama.cpp), each side's fraction of the memory-bandwidth bound (measured DRAM read bandwidth
÷ bytes streamed per token: ours from the model's tensors, llama.cpp's from the GGUF file's tensor bytes)
and greedy agreement (the number of leading tokens that are the same; on random weights the top two logits
can be within float rounding of each other, so a late split is a near-tie, not a bug: the first diverging
position's logit margin is reported).

The GPT-2 GGUF carries the GPT-2 BPE vocabulary (../shared/data, or --gpt2-dir). For the Llama shape a
byte-level BPE `tokenizer.json` is trained with the `tokenizers` package on Tiny Shakespeare and padded with
reserved special tokens to the model's 128,256 ids, so the file has a vocabulary of the model's size.

    bash bench/build_llama_cpp.sh                                   # once
    flock /tmp/scratchgpt-bench.lock .venv/bin/python bench/decode_race.py           # both models
    .venv/bin/python bench/decode_race.py --models gpt2 --tiny --rounds 1            # checks the script

Prints one JSON line per model. Needs ~3x the float32 model's bytes of free memory per format at a time
(ours, the GGUF written, llama.cpp's mapping of it); files go to --work (a temporary folder by default).
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
DEFAULT_VENV = Path.home() / ".cache" / "scratchgpt-bench" / "llama-cpp-0.3.36"
FORMATS = {"float32": "float32", "int8": "q8_0", "int4": "q4_0"}  # ours -> the GGUF dtype it races

# The llama.cpp side: a worker in llama-cpp-python's environment, one JSON command per line on stdin,
# one JSON answer per line on stdout (so its rounds interleave with ours).
_WORKER = r"""
import json, sys, time
import llama_cpp
import llama_cpp.llama_cpp as api
defaults = api.llama_model_default_params
llm = None
for line in sys.stdin:
    cmd = json.loads(line)
    if cmd["op"] == "load":
        llm = None
        if not cmd["extra_buffers"]:  # no repacked weights (AMX, CPU_REPACK): llama.cpp's plain kernels
            def no_extra(defaults=defaults):
                params = defaults()
                params.use_extra_bufts = False
                return params
            api.llama_model_default_params = no_extra
        llm = llama_cpp.Llama(model_path=cmd["path"], n_ctx=cmd["n_ctx"], n_batch=64, n_threads=cmd["threads"],
                              n_threads_batch=cmd["threads"], verbose=False)
        api.llama_model_default_params = defaults
        out = {"ok": True, "version": llama_cpp.__version__}
    elif cmd["op"] == "run":
        llm.reset()  # no prefix reuse: the prompt is evaluated every time, as ours is
        toks = []
        t0 = time.perf_counter()
        for tok in llm.generate(cmd["prompt"], temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
            toks.append(int(tok))
            if len(toks) == cmd["n"]:
                break
        out = {"seconds": time.perf_counter() - t0, "tokens": toks}
    else:
        break
    print(json.dumps(out), flush=True)
"""


class WorkerDied(RuntimeError):
    """The llama.cpp process ended while answering; `signal` is True when a signal killed it (a crash inside
    llama.cpp: see `race`)."""

    def __init__(self, message: str, *, signal: bool) -> None:
        super().__init__(message)
        self.signal = signal


class LlamaCpp:
    """llama-cpp-python in a child process of its own environment."""

    def __init__(self, venv: Path) -> None:
        self.python = venv / "bin" / "python"
        if not self.python.is_file():
            raise SystemExit(f"bench/decode_race.py: no llama-cpp-python environment at {venv}; build it with "
                             f"`bash bench/build_llama_cpp.sh` (or pass --llama-cpp-venv)")
        flags = venv / "build-flags.txt"
        self.build_flags = flags.read_text().strip() if flags.is_file() else "not recorded"
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen([str(self.python), "-c", _WORKER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)

    def ask(self, **cmd: object) -> dict:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.write(json.dumps(cmd) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except BrokenPipeError:
            line = ""
        if not line:
            code = self.proc.wait()
            raise WorkerDied(f"the llama.cpp worker died on {cmd['op']} (exit {code})", signal=code < 0)
        return json.loads(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


def _bench_generate():
    """bench/generate.py as a module: its bandwidth measurement and bytes-per-token count."""
    spec = importlib.util.spec_from_file_location("bench_generate", Path(__file__).with_name("generate.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def llama_tokenizer(vocab_size: int, folder: Path):
    """A byte-level BPE tokenizer.json of exactly `vocab_size` ids: merges trained on Tiny Shakespeare,
    the rest reserved special tokens (as Llama 3 reserves 256)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from scratchgpt.data.tokenizers import load_tokenizer

    text = SHARED / "text" / "tinyshakespeare.txt"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 1, special_tokens=["<|end_of_text|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train([str(text)], trainer)
    tok.add_special_tokens([f"<|reserved_special_token_{i}|>" for i in range(vocab_size - tok.get_vocab_size())])
    assert tok.get_vocab_size() == vocab_size, tok.get_vocab_size()
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|end_of_text|>"}))
    return load_tokenizer(folder)


def build(name: str, *, tiny: bool, gpt2_dir: Path | None, work: Path):
    """(random-weight float32 model, its tokenizer) for a row."""
    from scratchgpt import GPT, GPTConfig
    from scratchgpt.data.tokenizers import gpt2_tokenizer

    torch.manual_seed(0)
    if name == "gpt2":
        config = GPTConfig.from_name("gpt2")
        tok = gpt2_tokenizer(gpt2_dir or SHARED / "gpt2")
    else:
        config = GPTConfig.from_name(name)
        tok = None
    if tiny:
        config = GPTConfig.from_dict({**config.to_dict(), "n_layer": 2, "n_embd": 64, "n_head": 4,
                                      "n_kv_head": min(config.kv_heads, 4), "head_dim": None,
                                      "n_inner": 128 if config.n_inner else None})
    if tok is None:
        tok = llama_tokenizer(config.vocab_size, work / f"{name}-tokenizer")
    model = GPT(config).eval().requires_grad_(False)  # frozen, as the CLI loads it (see choose_decode_path)
    return model, tok


def race(name: str, args: argparse.Namespace, llama: LlamaCpp, stream: dict, bench_gen) -> dict:
    from scratchgpt import SamplingConfig
    from scratchgpt.export.gguf import export_gguf
    from scratchgpt.inference.generate import generate
    from scratchgpt.model.quantize import kernels_in_use, quantize_model

    work = Path(args.work)
    base, tok = build(name, tiny=args.tiny, gpt2_dir=args.gpt2_dir, work=work)
    V = base.config.vocab_size
    prompt = torch.randint(0, min(V, 50000), (args.prompt_len,), generator=torch.Generator().manual_seed(1)).tolist()
    sampling = SamplingConfig(max_new_tokens=args.new_tokens, temperature=0.0, stop_at_eot=False)
    bw = stream["dram_read_gb_s"] * 1e9
    row: dict[str, object] = {"bench": "decode_race", "model": name + ("-tiny" if args.tiny else ""),
                              "params_m": round(sum(p.numel() for p in base.parameters()) / 1e6, 1),
                              "threads": args.threads, "prompt_tokens": args.prompt_len,
                              "new_tokens": args.new_tokens, "rounds": args.rounds, **stream,
                              "llama_cpp_build": llama.build_flags}
    reference: list[int] | None = None
    for ours_fmt, gguf_dtype in FORMATS.items():
        if ours_fmt not in args.formats:
            continue
        path = work / f"{name}-{gguf_dtype}.gguf"
        t0 = time.perf_counter()
        export_gguf(base, tok, path, dtype=gguf_dtype)
        row[f"{gguf_dtype}_export_s"] = round(time.perf_counter() - t0, 1)
        row[f"{gguf_dtype}_file_mb"] = round(path.stat().st_size / 1e6, 1)
        ours = base if ours_fmt == "float32" else quantize_model(copy.deepcopy(base), ours_fmt)
        ours_toks = generate(ours, prompt, sampling)[0]  # warm-up of both sides
        try:
            row["llama_cpp_version"], theirs_toks = _load_and_run(llama, path, prompt, args, extra_buffers=True)
        except WorkerDied as e:
            # ggml's AMX buffer has crashed (segmentation fault) on some AMX machines (llama.cpp#20824):
            # the row then races llama.cpp without repacked weights, and says so. Any other end is an error.
            if not e.signal:
                raise SystemExit(f"bench/decode_race.py: {e}") from None
            llama.start()
            row["llama_cpp_version"], theirs_toks = _load_and_run(llama, path, prompt, args, extra_buffers=False)
            row[f"llama_cpp_{gguf_dtype}_extra_buffers"] = f"off: {e} with them"
        best_ours = best_theirs = float("inf")
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            generate(ours, prompt, sampling)
            best_ours = min(best_ours, time.perf_counter() - t0)
            best_theirs = min(best_theirs, llama.ask(op="run", prompt=prompt, n=args.new_tokens)["seconds"])
        ours_tps, theirs_tps = args.new_tokens / best_ours, args.new_tokens / best_theirs
        if ours_fmt == "float32":
            reference = ours_toks
        row.update({
            f"{ours_fmt}_tok_s": round(ours_tps, 2), f"llama_cpp_{gguf_dtype}_tok_s": round(theirs_tps, 2),
            f"{ours_fmt}_vs_llama_cpp": round(ours_tps / theirs_tps, 3),
            f"{ours_fmt}_mb_per_token": round(bench_gen.bytes_per_token(ours) / 1e6, 1),
            f"{ours_fmt}_of_bound": round(ours_tps * bench_gen.bytes_per_token(ours) / bw, 3),
            f"llama_cpp_{gguf_dtype}_of_bound": round(theirs_tps * _gguf_tensor_bytes(path) / bw, 3),
            f"{ours_fmt}_tokens_agree_with_llama_cpp": _agree(ours_toks, theirs_toks),
        })
        if ours_fmt == "float32":
            row["float32_first_split_margin"] = _split_margin(base, prompt, ours_toks, theirs_toks)
            row["float32_decode_path"] = _decode_path(base)
        elif reference is not None:
            row[f"{ours_fmt}_tokens_agree_with_float32"] = _agree(ours_toks, reference)
        if ours_fmt in ("int8", "int4"):
            row[f"{ours_fmt}_kernel"] = kernels_in_use(ours)
        del ours
        gc.collect()
        if not args.keep:
            path.unlink()
    return row


def _load_and_run(llama: LlamaCpp, path: Path, prompt: list[int], args: argparse.Namespace, *,
                  extra_buffers: bool) -> tuple[str, list[int]]:
    """Load a GGUF file into the llama.cpp worker and decode once (the warm-up): (its version, the tokens)."""
    loaded = llama.ask(op="load", path=str(path), n_ctx=args.prompt_len + args.new_tokens + 8,
                       threads=args.threads, extra_buffers=extra_buffers)
    return loaded["version"], llama.ask(op="run", prompt=prompt, n=args.new_tokens)["tokens"]


def _decode_path(model) -> str:
    """The `Linear` path `choose_decode_path` measured and set for this model (see model/fast_linear.py)."""
    path = getattr(model, "_decode_path", None)
    if path is None:
        return "not chosen"
    if path.input_major:
        return "input-major, split-K" if path.split else "input-major"
    if path.native:
        return "scratchgpt's kernel"
    return "+".join(g for g, on in (("W@xT blocks", path.blocks), ("W@xT head", path.head)) if on) or "plain"


def _agree(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def _split_margin(model, prompt: list[int], ours: list[int], theirs: list[int]) -> float | None:
    """Our logit gap between the two tokens chosen where the sides first differ (None if they never do)."""
    i = _agree(ours, theirs)
    if i >= min(len(ours), len(theirs)):
        return None
    with torch.no_grad():
        logits = model(torch.tensor([prompt + ours[:i]]))[0][0, -1]
    return round(float(logits[ours[i]] - logits[theirs[i]]), 6)


def _gguf_tensor_bytes(path: Path) -> int:
    """Bytes of a GGUF file's tensors a decode step reads (all of them, less the position table's rows)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    return sum(int(t.n_bytes) for t in reader.tensors if t.name != "position_embd.weight")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["gpt2", "llama-3.2-1b"])
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    parser.add_argument("--llama-cpp-venv", type=Path, default=Path(os.environ.get("LLAMA_CPP_VENV", DEFAULT_VENV)))
    parser.add_argument("--gpt2-dir", type=Path, default=None, help="encoder.json + vocab.bpe (default ../shared)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per side (best kept), interleaved")
    parser.add_argument("--tiny", action="store_true", help="2 layers x 64 channels: only checks the script")
    parser.add_argument("--work", default=None, help="folder for the GGUF files (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the GGUF files in --work")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bench_gen = _bench_generate()
    from scratchgpt.device import cpu_capability

    stream = bench_gen.dram_read_bandwidth()  # first: nothing else holds the memory bus yet
    from scratchgpt.model.native import code_paths

    stream = {**cpu_capability(), "native_code_paths": code_paths(), **stream}
    llama = LlamaCpp(args.llama_cpp_venv)
    try:
        with tempfile.TemporaryDirectory(prefix="decode_race-") as tmp:
            args.work = args.work or tmp
            Path(args.work).mkdir(parents=True, exist_ok=True)
            for name in args.models:
                print(json.dumps(race(name, args, llama, stream, bench_gen)), flush=True)
    except WorkerDied as e:  # past a row's first decode: nothing left to retry
        raise SystemExit(f"bench/decode_race.py: {e}") from None
    finally:
        llama.close()


if __name__ == "__main__":
    sys.exit(main())
