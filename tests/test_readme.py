"""The README's shell examples, as a new user meets them in a fresh clone (issue 21).

Two tests over every ```bash block of README.md, in order:

- `test_readme_commands_use_only_what_earlier_commands_create` (fast, no model): every run folder or
  prepared-data folder an example reads was written by an earlier example (or by `scripts/demo.sh`), every
  `../shared/data/...` file exists, and no example trains or exports into a folder an earlier one filled
  without `--resume` / `--overwrite` (the CLI would refuse it).
- `test_readme_commands_run_in_order` (slow): runs them in a temporary copy of the repository beside a
  shrunken copy of the shared data. Substitutions only shrink: fewer rows of each data file, fewer training
  steps, evaluation batches and generated tokens, a smaller model (`SHRINK`). Lines that cannot run here
  are skipped for a stated reason (`skip_reason`); lines that are not `scratchgpt` or `scripts/demo.sh`
  (pip, torchrun, curl, llama.cpp, benchmarks) are left to their own tests.
"""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import DATA_DIR
from scratchgpt.config import read_toml

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
# Relative paths an example may read; anything else (hub names, `path/to/...`, a reader's own
# `hellaswag_val.jsonl`) is the reader's to supply.
LOCAL_PREFIXES = ("runs/", "data/", ".cache/", "configs/", "../shared/")
# Flags whose value a command reads / writes.
INPUT_FLAGS = {"--checkpoint", "--init", "--base", "--adapters", "--draft", "--data", "--source", "--init-from", "-c"}
OUTPUT_FLAGS = {"--out-dir", "--out"}
# Files the README tells the reader to bring (evaluation data of their own, a suite they write).
READER_FILES = {"hellaswag_val.jsonl", "spam_test.tsv", "held_out.json", "suite.toml", "web.jsonl.zst", "my_dataset"}
# Appended to a subcommand's arguments (the last flag wins): smaller runs, never different ones.
SHRINK: dict[str, list[str]] = {
    "train": ["--max-steps", "2", "--eval-steps", "1", "--batch-size", "2", "--n-layer", "1", "--n-head", "2",
              "--n-embd", "32", "--progress", "false"],
    "finetune": ["--max-steps", "2", "--eval-steps", "1", "--batch-size", "2", "--progress", "false"],
    "generate": ["--max-new-tokens", "8"],
    "chat": ["--max-new-tokens", "8"],
}
# The shared data, cut to its first lines / entries: enough for every split, batch and class.
TINY_TEXT_CHARS = 30_000
TINY_SPAM_LINES = 400
TINY_INSTRUCT_ENTRIES = 60


@dataclass
class Command:
    """One shell command of a ```bash block: its text (continuations joined), its words, its section."""

    line: str
    words: list[str]
    section: str


def readme_commands(text: str) -> list[Command]:
    """The commands of every ```bash block, in order; comments and blank lines dropped."""
    commands: list[Command] = []
    section = ""
    in_block = False
    pending = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not in_block:
            if raw.startswith("#"):
                section = raw.lstrip("#").strip()
            in_block = stripped == "```bash"
            continue
        if stripped.startswith("```"):
            in_block = False
            continue
        pending += raw.rstrip()
        if pending.endswith("\\"):  # a continuation line
            pending = pending[:-1] + " "
            continue
        words = shlex.split(pending, comments=True)
        if words:
            commands.append(Command(shlex.join(words), words, section))
        pending = ""
    return commands


def scratchgpt_args(words: list[str]) -> list[str] | None:
    """The scratchgpt arguments of a command (`scratchgpt ...`, `torchrun ... -m scratchgpt ...`), else None."""
    if words[0] == "scratchgpt":
        return words[1:]
    if "-m" in words:
        i = words.index("-m")
        if words[i + 1] == "scratchgpt":
            return words[i + 2:]
    return None


def flag_values(args: list[str], flags: set[str]) -> list[str]:
    """Values of the given flags (`--flag VALUE` or `--flag=VALUE`)."""
    values = []
    for i, word in enumerate(args):
        name, eq, value = word.partition("=")
        if name in flags:
            if eq:
                values.append(value)
            elif i + 1 < len(args):
                values.append(args[i + 1])
    return values


def demo_outputs() -> set[str]:
    """The folders `scripts/demo.sh` writes: its run folder and its prepared data."""
    script = (ROOT / "scripts" / "demo.sh").read_text()
    out = re.search(r'^out="([^"]+)"', script, re.M)
    data = re.search(r"^data=(\S+)", script, re.M)
    assert out and data, "scripts/demo.sh no longer sets out= and data= as this test reads them"
    return {out.group(1), data.group(1)}


def reads_and_writes(args: list[str]) -> tuple[list[str], list[str], list[str]]:
    """(paths read, paths written, data folders prepared if missing) by one scratchgpt command, a config
    file's [data] / [train] included. Only the written ones are refused when they already hold something."""
    reads = flag_values(args, INPUT_FLAGS)
    writes = flag_values(args, OUTPUT_FLAGS)
    prepared: list[str] = []
    sub = args[0] if args else ""
    if sub == "prepare":
        writes += flag_values(args, {"--dir"})
    elif sub in ("train", "eval"):
        reads += flag_values(args, {"--dir"})
    reads += [m for a in args for m in re.findall(r"checkpoint=([^,\s]+)", a)]  # lm-eval's --model_args
    for config in flag_values(args, {"-c"}):
        if sub != "train" or not (ROOT / config).is_file():
            continue
        table = read_toml(ROOT / config)
        data, train = table.get("data", {}), table.get("train", {})
        if train.get("init_from"):
            reads.append(train["init_from"])
        if not flag_values(args, {"--out-dir"}) and train.get("out_dir"):
            writes.append(train["out_dir"])
        if data.get("dir") and not flag_values(args, {"--dir"}):
            # `train` prepares [data] source into dir itself; without a source the folder must exist.
            (prepared if data.get("source") else reads).append(data["dir"])
    return reads, writes, prepared


def is_local(path: str) -> bool:
    return path.startswith(LOCAL_PREFIXES)


def made_by(path: str, created: set[str]) -> bool:
    """Whether `path` is a folder in `created` or lies inside one."""
    parts = Path(path).parts
    return any(Path(*parts[:n]).as_posix() in created for n in range(1, len(parts) + 1))


def test_readme_commands_use_only_what_earlier_commands_create() -> None:
    commands = readme_commands(README.read_text(encoding="utf-8"))
    assert any(c.words[:2] == ["bash", "scripts/demo.sh"] for c in commands)
    created: set[str] = set()
    problems = []
    for c in commands:
        if c.words[:2] == ["bash", "scripts/demo.sh"]:
            created |= demo_outputs()
            continue
        args = scratchgpt_args(c.words)
        if args is None:
            args = [w for w in c.words if "checkpoint=" in w]  # e.g. the lm-eval adapter's --model_args
        if "..." in args:  # an abbreviated example (`finetune instruct ... --lora-rank 8`)
            continue
        reads, writes, prepared = reads_and_writes(args)
        created.update(prepared)
        for path in reads:
            if path.startswith("../shared/data/"):
                if DATA_DIR.is_dir() and not (DATA_DIR / path.removeprefix("../shared/data/")).exists():
                    problems.append(f"[{c.section}] {c.line}: {path} is not in the shared data")
            elif path.startswith("configs/"):
                if not (ROOT / path).is_file():
                    problems.append(f"[{c.section}] {c.line}: {path} does not exist")
            elif is_local(path) and not made_by(path, created):
                problems.append(f"[{c.section}] {c.line}: reads {path}, which no earlier command creates")
        refreshing = {"--resume", "--overwrite"} & set(args)
        for path in writes:
            if path in created and not refreshing and args[0] in ("train", "finetune", "export"):
                problems.append(f"[{c.section}] {c.line}: writes into {path}, which an earlier command filled "
                                "(refused without --resume or --overwrite)")
            created.add(path)
    assert not problems, "\n".join(problems)


def test_the_static_check_catches_a_missing_folder() -> None:
    """The check above fails on the old README's kind of mistake: reading runs/shakespeare before anything
    creates it, and training twice into one folder."""
    text = ("```bash\nbash scripts/demo.sh\nscratchgpt generate --checkpoint runs/demo\n"
            "scratchgpt finetune classify --data x.tsv --init runs/shakespeare --out-dir runs/spam\n```\n")
    commands = readme_commands(text)
    created = demo_outputs()
    reads, writes, _ = reads_and_writes(scratchgpt_args(commands[2].words) or [])
    assert made_by("runs/demo", created) and not made_by("runs/shakespeare", created)
    assert reads == ["x.tsv", "runs/shakespeare"] and writes == ["runs/spam"]
    assert reads_and_writes(["train", "-c", "configs/shakespeare_char.toml"]) == (
        ["configs/shakespeare_char.toml"], ["runs/shakespeare_char"], [".cache/data/shakespeare_char"])
    assert [c.words[0] for c in readme_commands("```bash\nscratchgpt a \\\n  --b c   # note\n```")] == ["scratchgpt"]


# ---------------------------------------------------------------------------------------------
# Running them
# ---------------------------------------------------------------------------------------------


def skip_reason(c: Command, args: list[str]) -> str | None:
    """Why a README command cannot run in this test (None: it runs)."""
    from scratchgpt.device import native_bf16

    if "..." in args:
        return "an abbreviated example"
    if any(w == "gpt2" or w.startswith("path/to/") for w in flag_values(args, {"--checkpoint", "--init"})):
        return "needs a download or a model folder of the reader's own"
    if READER_FILES & {Path(w).name for w in args}:
        return "reads a file of the reader's own"
    if args[:1] == ["serve"]:
        return "a server that runs until stopped (tests/test_serve.py)"
    if args[:2] == ["eval", "judge"]:
        return "needs a judge endpoint"
    if "bfloat16" in args and not native_bf16("cpu"):
        return "bfloat16 is refused on CPUs without native bf16 (as the README says)"
    return None


def tiny_shared_data(shared: Path) -> None:
    """`shared/data` as the README names it, each file cut to its first lines or entries."""
    (shared / "text").mkdir(parents=True)
    (shared / "spam").mkdir()
    (shared / "instruct").mkdir()
    (shared / "gpt2").symlink_to(DATA_DIR / "gpt2")
    text = (DATA_DIR / "text" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    (shared / "text" / "tinyshakespeare.txt").write_text(text[:TINY_TEXT_CHARS], encoding="utf-8")
    spam = (DATA_DIR / "spam" / "SMSSpamCollection").read_text(encoding="utf-8").splitlines(keepends=True)
    (shared / "spam" / "SMSSpamCollection").write_text("".join(spam[:TINY_SPAM_LINES]), encoding="utf-8")
    for name in ("instruction-data.json", "instruction-data-with-preference.json"):
        entries = json.loads((DATA_DIR / "instruct" / name).read_text(encoding="utf-8"))
        (shared / "instruct" / name).write_text(json.dumps(entries[:TINY_INSTRUCT_ENTRIES]), encoding="utf-8")


def fresh_clone(repo: Path) -> dict[str, str]:
    """What a clone holds that the README's commands use, with `.venv` standing for this interpreter
    (so `scripts/setup.sh` finds it set up and installs nothing); the environment to run scripts in."""
    repo.mkdir()
    for name in ("configs", "scripts"):
        shutil.copytree(ROOT / name, repo / name)
    for name in ("pyproject.toml", "constraints.txt"):
        shutil.copy(ROOT / name, repo / name)
    bin_dir = repo / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    python = bin_dir / "python"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    stamp = subprocess.run("cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1", shell=True,
                           cwd=repo, capture_output=True, text=True, check=True).stdout
    (repo / ".venv" / ".scratchgpt-setup").write_text(stamp)
    src = str(ROOT / "src")
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")])),
            "OMP_NUM_THREADS": "1"}


@pytest.mark.slow  # a whole tour: the demo, pretraining, every fine-tuning mode, exports (~2 min)
def test_readme_commands_run_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    import torch

    from scratchgpt.cli import main

    if not DATA_DIR.is_dir():
        pytest.skip(f"real data not found at {DATA_DIR}")
    tiny_shared_data(tmp_path / "shared" / "data")
    repo = tmp_path / "scratchgpt"
    env = fresh_clone(repo)
    monkeypatch.chdir(repo)
    threads = torch.get_num_threads()  # the CLI fits torch's threads to the machine; give them back after
    ran, skipped = [], []
    try:
        for c in readme_commands(README.read_text(encoding="utf-8")):
            if c.words[:2] == ["bash", "scripts/demo.sh"]:
                # The demo on the shrunken text (its own corpus is a download), 2 steps.
                done = subprocess.run([*c.words, "--text", "../shared/data/text/tinyshakespeare.txt", "--steps", "2"],
                                      cwd=repo, env=env, capture_output=True, text=True, timeout=300)
                assert done.returncode == 0, f"{c.line}:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
                assert "configs/shakespeare_gpt2bpe_small.toml" in done.stdout  # its pointer to the next step
                ran.append(c.line)
                continue
            if c.words[0] != "scratchgpt":
                continue
            args = c.words[1:]
            reason = skip_reason(c, args)
            if reason:
                skipped.append(f"{c.line}: {reason}")
                continue
            monkeypatch.setattr(sys, "stdin", io.StringIO("Name a color.\n"))  # for `chat`
            try:
                rc = main(args + SHRINK.get(args[0] if args else "", []))
            except SystemExit as e:  # --help / --version exit through argparse
                rc = e.code or 0
            out, err = capsys.readouterr()
            assert rc == 0, f"[{c.section}] {c.line}\nexit {rc}: {err[-2000:]}"
            ran.append(c.line)
    finally:
        torch.set_num_threads(threads)
    with capsys.disabled():
        print(f"\nREADME: ran {len(ran)} commands; skipped {len(skipped)}:\n  " + "\n  ".join(skipped))
    # What the README promises the tour leaves behind.
    for folder in ("runs/demo", "runs/shakespeare", "runs/spam", "runs/instruct", "runs/dpo", "runs/demo-2layer"):
        assert (repo / folder / "model.safetensors").is_file(), folder
    assert (repo / "model.gguf").is_file() and (repo / "model.onnx").is_file()
