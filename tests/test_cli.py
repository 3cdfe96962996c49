"""The core subcommands end to end: info and generate, and one-line errors for bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from scratchgpt import GPT, GPTConfig
from scratchgpt.checkpoint import save_model
from scratchgpt.cli import main
from scratchgpt.data.tokenizers import CharTokenizer


def _tiny_run(tmp_path):
    tok = CharTokenizer.train("hello world, the quick brown fox jumps over the lazy dog.\n")
    config = GPTConfig(vocab_size=tok.vocab_size, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    model = GPT(config, generator=torch.Generator().manual_seed(0))
    return save_model(model, tmp_path / "run", tokenizer=tok), model, tok


def test_info_on_a_preset_counts_gpt2_parameters(capsys):
    assert main(["info", "--model", "gpt2"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameters"] == 124_439_808
    assert info["config"]["n_layer"] == 12


def test_info_prints_exact_counts_of_the_family_presets(capsys):
    # The published models' totals (their config.json values; test_hf checks them against transformers).
    published = {"llama-3.2-1b": 1_235_814_400, "llama-3.2-3b": 3_212_749_824,
                 "qwen3-0.6b": 596_049_920, "qwen3-1.7b": 1_720_574_976}
    for name, count in published.items():
        assert main(["info", "--model", name]) == 0
        info = json.loads(capsys.readouterr().out)
        assert info["parameters"] == count, name
    assert info["config"]["qk_norm"] and info["config"]["n_kv_head"] == 8


def test_info_and_generate_on_a_checkpoint(tmp_path, capsys):
    run, model, tok = _tiny_run(tmp_path)
    assert main(["info", "--checkpoint", str(run)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameters"] == model.num_parameters()
    assert info["tokenizer"] == "char"

    args = ["generate", "--checkpoint", str(run), "--prompt", "the ", "--max-new-tokens", "12",
            "--temperature", "0", "--stop-at-eot", "false"]
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert plain.startswith("the ") and len(plain.rstrip("\n")) == 4 + 12
    assert main([*args, "--stream"]) == 0
    assert capsys.readouterr().out == plain
    assert main([*args, "--prompt-lookup", "4"]) == 0
    assert capsys.readouterr().out == plain


def test_generate_seeded_sampling_is_reproducible(tmp_path, capsys):
    run, _, _ = _tiny_run(tmp_path)
    args = ["generate", "--checkpoint", str(run), "--prompt", "he", "--max-new-tokens", "20",
            "--temperature", "1.0", "--top-k", "5", "--seed", "42", "--num-samples", "2"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first


def test_bad_input_gives_one_line_errors(tmp_path, capsys):
    assert main(["generate", "--checkpoint", str(tmp_path / "missing"), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing" in err

    run, _, _ = _tiny_run(tmp_path)
    (run / "model.safetensors").write_bytes(b"\x00" * 10)
    assert main(["info", "--checkpoint", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model.safetensors" in err

    run2, _, _ = _tiny_run(tmp_path / "b")
    assert main(["generate", "--checkpoint", str(run2), "--prompt", "€", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "€" in err  # the char tokenizer names the unknown character

    assert main(["generate", "--checkpoint", str(run2), "--top-p", "0"]) == 2
    assert "top_p" in capsys.readouterr().err


def _one_line(err: str) -> str:
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_info_on_an_hf_folder_needs_no_tokenizer_and_counts_untied(tmp_path, capsys, monkeypatch):
    from transformers import GPT2Config, GPT2LMHeadModel

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("SCRATCHGPT_GPT2_DIR", str(tmp_path / "nowhere"))  # no GPT-2 vocabulary anywhere
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2))
    hf.save_pretrained(tmp_path / "hf")
    assert not (tmp_path / "hf" / "vocab.json").exists()
    assert main(["info", "--checkpoint", str(tmp_path / "hf"), "--untied"]) == 0
    info = json.loads(capsys.readouterr().out)
    tied = sum(p.numel() for p in hf.parameters())  # transformers counts the tied matrix once
    assert info["kind"] == "hf" and info["tokenizer"] is None and info["parameters"] == tied
    assert info["parameters_untied"] == tied + 64 * 32
    assert main(["info", "--checkpoint", str(tmp_path / "hf")]) == 0
    assert "parameters_untied" not in json.loads(capsys.readouterr().out)


def test_generate_on_a_classifier_points_to_classify(tmp_path, capsys):
    from scratchgpt.checkpoint import load_model
    from scratchgpt.files import write_json
    from scratchgpt.tensor_files import read_json
    from scratchgpt.training.finetune import add_classification_head

    run, _, _ = _tiny_run(tmp_path)
    model, _ = load_model(run)
    add_classification_head(model, 2)
    save_model(model, run, extra={"task": "classification", "classifier": {"labels": ["ham", "spam"]}})
    assert read_json(run / "config.json")["task"] == "classification"
    for cmd in (["generate", "--checkpoint", str(run), "--prompt", "hi"], ["chat", "--checkpoint", str(run)]):
        assert main(cmd) == 2
        err = _one_line(capsys.readouterr().err)
        assert "scratchgpt classify" in err and str(run) in err
    # A step checkpoint's config lacks "task": the head's weights still give it away.
    cfg = read_json(run / "config.json")
    write_json(run / "config.json", {k: v for k, v in cfg.items() if k not in ("task", "classifier")})
    assert main(["generate", "--checkpoint", str(run), "--prompt", "hi"]) == 2
    assert "classify" in _one_line(capsys.readouterr().err)


def test_prepare_refuses_a_run_folder(tmp_path, capsys):
    run, _, _ = _tiny_run(tmp_path)
    before = (run / "tokenizer.json").read_bytes()
    (tmp_path / "t.txt").write_text("some text to prepare\n" * 50)
    argv = ["prepare", "--source", str(tmp_path / "t.txt"), "--dir", str(run), "--tokenizer", "char", "--quiet"]
    assert main(argv) == 2
    err = _one_line(capsys.readouterr().err)
    assert str(run) in err and "--overwrite" in err
    assert (run / "tokenizer.json").read_bytes() == before
    assert main([*argv, "--overwrite"]) == 0


def test_generate_with_nan_or_wrong_flags_is_one_line(tmp_path, capsys):
    run, _, _ = _tiny_run(tmp_path)
    for flag, value in (("--temperature", "nan"), ("--top-p", "inf"), ("--repetition-penalty", "nan")):
        assert main(["generate", "--checkpoint", str(run), flag, value]) == 2
        assert "finite" in _one_line(capsys.readouterr().err)


# ---------------------------------------------------------------------------------------------
# Every command's --help shows the defaults its run applies; -c FILE.toml works the same everywhere
# ---------------------------------------------------------------------------------------------

# Per command: the fewest arguments a run needs (each config is built from them exactly as a run builds it).
_MINIMAL_ARGS = {
    ("generate",): ["--model", "gpt2"],
    ("serve",): ["--checkpoint", "runs/x"],
    ("train",): [],
    ("finetune", "classify"): [],
    ("finetune", "instruct"): [],
    ("finetune", "dpo"): [],
}


def _subparser(parser, path):
    import argparse

    for name in path:
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[name]
    return parser


def _shown_default(action) -> str | None:
    """What --help prints as the flag's default: the text of its last "(default: ...)"."""
    text = action.help or ""
    return text.rsplit("(default: ", 1)[1][:-1] if "(default: " in text and text.endswith(")") else None


def test_every_command_help_shows_the_defaults_its_run_applies():
    from dataclasses import fields

    from scratchgpt.cli import build_parser
    from scratchgpt.cli.flags import read_config_sections

    parser = build_parser()
    for path, minimal in _MINIMAL_ARGS.items():
        sub = _subparser(parser, path)
        configs, _ = read_config_sections(parser.parse_args([*path, *minimal]))
        by_dest: dict = {}
        for a in sub._actions:  # the first flag per field (not its --no-x twin)
            by_dest.setdefault(a.dest, a)
        checked = 0
        for section in sub.get_default("config_sections"):
            for f in fields(section.cls):
                if f.name in section.skip:
                    continue
                action = by_dest[f"{section.prefix.replace('-', '_')}{f.name}"]
                applied = getattr(configs[section.name], f.name)
                if [*path, *minimal].count(action.option_strings[0]):
                    continue  # set by the minimal arguments, not a default
                assert _shown_default(action) == repr(applied), (path, f.name)
                checked += 1
        assert checked > 10, path


def test_finetune_help_shows_the_modes_learning_rate(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    for mode, lr in (("classify", "5e-05"), ("instruct", "5e-05"), ("dpo", "5e-06")):
        with pytest.raises(SystemExit):
            main(["finetune", mode, "--help"])
        out = capsys.readouterr().out
        assert f"peak learning rate (default: {lr})" in out, mode
        assert "(default: 'runs/default')" not in out and "(default: 5000)" not in out


def test_device_defaults_to_auto_in_every_command():
    import argparse

    from scratchgpt.cli import build_parser

    parser = build_parser()
    paths = [("info",), ("generate",), ("classify",), ("chat",), ("serve",), ("train",), ("finetune", "classify"),
             ("finetune", "instruct"), ("finetune", "dpo")]
    for path in paths:
        sub = _subparser(parser, path)
        action = next(a for a in sub._actions if a.dest == "device")
        assert action.default == "auto" or _shown_default(action) == "'auto'", path
    assert isinstance(parser, argparse.ArgumentParser)


def test_config_files_for_generate_serve_and_finetune(tmp_path, capsys):
    from scratchgpt.cli import build_parser
    from scratchgpt.cli.flags import read_config_sections

    run, _, _ = _tiny_run(tmp_path)
    toml = tmp_path / "gen.toml"
    toml.write_text(f'[generate]\ncheckpoint = "{run}"\nprompt = "hello"\ndevice = "cpu"\n'
                    f'[sampling]\nmax_new_tokens = 3\ntemperature = 0\n')
    assert main(["generate", "-c", str(toml), "--max-new-tokens", "5"]) == 0
    greedy_5 = capsys.readouterr().out
    assert main(["generate", "--checkpoint", str(run), "--prompt", "hello", "--temperature", "0",
                 "--max-new-tokens", "5", "--device", "cpu"]) == 0
    assert capsys.readouterr().out == greedy_5  # the flag overrode the file's 3

    parser = build_parser()
    serve_toml = tmp_path / "serve.toml"
    serve_toml.write_text('[serve]\ncheckpoint = "runs/x"\nport = 9001\n[limits]\nmax_batch_size = 4\n')
    configs, _ = read_config_sections(parser.parse_args(["serve", "-c", str(serve_toml), "--port", "9002"]))
    assert (configs["serve"].port, configs["serve"].host, configs["limits"].max_batch_size) == (9002, "127.0.0.1", 4)

    ft = tmp_path / "ft.toml"
    ft.write_text('[finetune]\nepochs = 3\nbalance = true\n[train]\nlr = 1e-4\n[lora]\nrank = 4\n')
    configs, given = read_config_sections(parser.parse_args(["finetune", "classify", "-c", str(ft), "--lr", "2e-4"]))
    assert (configs["finetune"].epochs, configs["finetune"].balance, configs["train"].lr) == (3, True, 2e-4)
    assert configs["train"].batch_size == 8 and given["lora"] == {"rank": 4}

    # Unknown keys, unknown tables and wrong types: one line naming the file and the key, exit 2.
    for text, words in (('[generate]\nchekpoint = "x"\n', ["chekpoint", "unknown"]),
                        ('[sampling]\nmax_new_tokens = "5"\n[generate]\nmodel = "gpt2"\n', ["max_new_tokens",
                                                                                             "integer"]),
                        ('[genrate]\nmodel = "gpt2"\n', ["genrate", "unknown table"])):
        toml.write_text(text)
        assert main(["generate", "-c", str(toml)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(toml) in err and all(w in err for w in words), err
    ft.write_text('[train]\nprogress = "false"\n')
    assert main(["finetune", "instruct", "-c", str(ft)]) == 2
    err = capsys.readouterr().err
    assert str(ft) in err and "progress" in err and "true or false" in err


def test_boolean_flags_share_one_style(tmp_path):
    from scratchgpt.cli import build_parser
    from scratchgpt.cli.flags import read_config_sections

    parser = build_parser()
    assert parser.parse_args(["prepare", "--quiet"]).progress is False  # the old spelling still works
    assert parser.parse_args(["prepare", "--no-progress"]).progress is False
    # Unset flags stay None: the config's default applies.
    assert read_config_sections(parser.parse_args(["prepare"]))[0]["prepare"].progress is True
    assert parser.parse_args(["train", "--no-progress"]).progress is False
    assert parser.parse_args(["train", "--progress", "false"]).progress is False
    assert parser.parse_args(["train", "--resume"]).resume is True
    assert parser.parse_args(["finetune", "instruct", "--no-mask-prompt"]).mask_prompt is False
    assert parser.parse_args(["generate", "--model", "gpt2", "--no-cache"]).cache is False


def test_version_prints_the_installed_version_and_exits_0(capsys, monkeypatch):
    import importlib.metadata

    import scratchgpt

    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out == f"scratchgpt {importlib.metadata.version('scratchgpt')}\n"

    # From a source tree that is not installed: the package's own version.
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out == f"scratchgpt {scratchgpt.__version__}\n"


# Every command that writes a file or folder, with what it writes: (argv after the setup, the output path).
_WRITERS = ["prepare", "train", "finetune classify", "finetune merge", "export gguf", "export onnx", "export int8",
            "eval perplexity"]


def _writer(name: str, tmp_path, gpt2_tokenizer):
    """(argv, output path) of `name`, with its inputs made in tmp_path and its output already there."""
    from scratchgpt.data.dataset import prepare

    text = tmp_path / "t.txt"
    text.write_text("to be or not to be, that is the question\n" * 40)
    config = GPTConfig(vocab_size=gpt2_tokenizer.vocab_size, n_positions=16, n_embd=8, n_layer=1, n_head=1)
    run = save_model(GPT(config, generator=torch.Generator().manual_seed(0)), tmp_path / "run",
                     tokenizer=gpt2_tokenizer)
    if name == "prepare":
        out = tmp_path / "data"
        (tmp_path / "earlier.txt").write_text("an earlier text, prepared before\n" * 40)
        prepare(tmp_path / "earlier.txt", out, tokenizer="char", progress=False)  # an earlier prepare's folder
        return ["prepare", "--source", str(text), "--dir", str(out), "--tokenizer", "char", "--quiet"], out
    if name == "train":
        prepare(text, tmp_path / "data", tokenizer="char", progress=False)
        out = tmp_path / "run"
        return ["train", "--dir", str(tmp_path / "data"), "--out-dir", str(out), "--n-layer", "1", "--n-head", "1",
                "--n-embd", "8", "--block-size", "8", "--max-steps", "1", "--progress", "false"], out
    if name == "finetune classify":
        (tmp_path / "sms.tsv").write_text("ham\thello there\nspam\twin money now\n" * 8)
        return ["finetune", "classify", "--data", str(tmp_path / "sms.tsv"), "--init", str(run), "--out-dir",
                str(run), "--epochs", "1", "--progress", "false"], run
    if name == "finetune merge":
        return ["finetune", "merge", "--base", str(run), "--adapters", str(tmp_path / "adapters"), "--out-dir",
                str(run)], run
    fmt = name.split()[-1]
    if name.startswith("export"):
        out = tmp_path / ("int8-run" if fmt == "int8" else f"model.{fmt}")
        if fmt == "int8":
            save_model(GPT(config), out)
        else:
            out.write_bytes(b"an earlier export")
        return ["export", "--checkpoint", str(run), "--format", fmt, "--out", str(out)], out
    out = tmp_path / "reports" / "perplexity-t.json"
    out.parent.mkdir()
    out.write_text("{}")
    return ["eval", "perplexity", "--checkpoint", str(run), "--data", str(text), "--out-dir", str(out.parent),
            "--progress", "false"], out


def _contents(path) -> dict:
    paths = sorted(path.rglob("*")) if path.is_dir() else [path]
    return {str(p): p.read_bytes() for p in paths if p.is_file()}


@pytest.mark.parametrize("name", _WRITERS)
def test_every_writer_refuses_to_replace_without_overwrite(name: str, tmp_path, gpt2_tokenizer, capsys):
    # Before: `export --format gguf --out existing.gguf` replaced the file with exit 0 and no notice.
    argv, out = _writer(name, tmp_path, gpt2_tokenizer)
    before = _contents(out)
    assert main(argv) == 2
    err = _one_line(capsys.readouterr().err)
    assert str(out) in err and "pass --overwrite to replace it" in err
    assert _contents(out) == before


@pytest.mark.parametrize("name", ["prepare", "export gguf", "export int8", "eval perplexity"])
def test_overwrite_lets_a_writer_replace(name: str, tmp_path, gpt2_tokenizer, capsys):
    argv, out = _writer(name, tmp_path, gpt2_tokenizer)
    before = _contents(out)
    assert main([*argv, "--overwrite"]) == 0
    assert _contents(out) != before


# Per command: a -c file, a flag that overrides one of its values, and (section, field, value) the configs then
# hold, from the file first and with the flag then. Every leaf command must have a row (see the test below).
_TOML_THEN_FLAG = {
    ("info",): ('[info]\nmodel = "gpt2"\nuntied = true\n', ["--model", "gpt2-medium"],
                [("info", "untied", True)], ("info", "model", "gpt2", "gpt2-medium")),
    ("generate",): ('[generate]\nmodel = "gpt2"\nquantize = "int8"\ndtype = "bfloat16"\ndraft = "runs/d"\n'
                    '[sampling]\ntop_k = 5\n', ["--draft", "runs/e"],
                    [("generate", "quantize", "int8"), ("generate", "dtype", "bfloat16"), ("sampling", "top_k", 5)],
                    ("generate", "draft", "runs/d", "runs/e")),
    # prepare reads a run file: its [data] (window fields too, which have no prepare flag) and its own [prepare].
    ("prepare",): ('[model]\nn_layer = 2\n[data]\nsource = "a.txt"\ndir = "d"\ntokenizer = "bpe"\nblock_size = 64\n'
                   '[train]\nmax_steps = 3\n[prepare]\nprogress = false\n', ["--tokenizer", "char"],
                   [("data", "block_size", 64), ("prepare", "progress", False)], ("data", "tokenizer", "bpe", "char")),
    ("train",): ('[model]\nn_layer = 2\n[data]\nsampler = "sequential"\n[train]\nmax_steps = 7\n', ["--max-steps", "9"],
                 [("model", "n_layer", 2), ("data", "sampler", "sequential")], ("train", "max_steps", 7, 9)),
    ("finetune", "classify"): ('[finetune]\nbalance = true\n[train]\nlr = 1e-4\n', ["--lr", "2e-4"],
                               [("finetune", "balance", True)], ("train", "lr", 1e-4, 2e-4)),
    ("finetune", "instruct"): ('[finetune]\ntemplate = "chatml"\n[train]\nbatch_size = 4\n', ["--batch-size", "2"],
                               [("finetune", "template", "chatml")], ("train", "batch_size", 4, 2)),
    ("finetune", "dpo"): ('[finetune]\nbeta = 0.5\n[lora]\nrank = 2\n[model]\nn_layer = 1\n', ["--lora-rank", "4"],
                          [("finetune", "beta", 0.5), ("model", "n_layer", 1)], ("lora", "rank", 2, 4)),
    ("finetune", "merge"): ('[merge]\nbase = "b"\nadapters = "a"\nout_dir = "o"\n', ["--out-dir", "p"],
                            [("merge", "adapters", "a")], ("merge", "out_dir", "o", "p")),
    ("classify",): ('[classify]\ncheckpoint = "c"\njson = true\n', ["--no-json"],
                    [("classify", "checkpoint", "c")], ("classify", "json", True, False)),
    ("chat",): ('[chat]\ncheckpoint = "c"\nsystem = "Be brief."\nquantize = "int8"\n[sampling]\ntemperature = 0\n',
                ["--system", "Be kind."], [("chat", "quantize", "int8"), ("sampling", "temperature", 0)],
                ("chat", "system", "Be brief.", "Be kind.")),
    ("serve",): ('[serve]\ncheckpoint = "c"\nport = 9001\ndtype = "bfloat16"\n[limits]\nmax_batch_size = 4\n',
                 ["--port", "9002"], [("serve", "dtype", "bfloat16"), ("limits", "max_batch_size", 4)],
                 ("serve", "port", 9001, 9002)),
    ("export",): ('[export]\ncheckpoint = "c"\nformat = "gguf"\nout = "m.gguf"\ngguf_dtype = "q8_0"\n',
                  ["--format", "onnx"], [("export", "gguf_dtype", "q8_0")], ("export", "format", "gguf", "onnx")),
    ("eval", "perplexity"): ('[eval]\ncheckpoint = "c"\nquantize = "int8"\n'
                             '[perplexity]\ndata = ["a.txt"]\nstride = 8\n',
                             ["--stride", "16"], [("eval", "quantize", "int8"), ("perplexity", "data", ("a.txt",))],
                             ("perplexity", "stride", 8, 16)),
    ("eval", "choice"): ('[eval]\nbatch_size = 4\n[choice]\npreset = "arc"\n', ["--preset", "piqa"],
                         [("eval", "batch_size", 4)], ("choice", "preset", "arc", "piqa")),
    ("eval", "classify"): ('[classify]\nformat = "tsv"\n', ["--format", "csv"], [],
                           ("classify", "format", "tsv", "csv")),
    ("eval", "judge"): ('[judge]\ntimeout = 5.0\nretries = 1\n', ["--timeout", "7"], [("judge", "retries", 1)],
                        ("judge", "timeout", 5.0, 7.0)),
}


def _leaf_commands(parser, path=()) -> list[tuple[str, ...]]:
    import argparse

    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        return [path]
    return [leaf for name, sub in subs[0].choices.items() for leaf in _leaf_commands(sub, (*path, name))]


def test_every_command_takes_a_config_file():
    from scratchgpt.cli import build_parser

    parser = build_parser()
    leaves = _leaf_commands(parser)
    assert len(leaves) == 16 and set(leaves) == set(_TOML_THEN_FLAG)
    for path in leaves:
        assert "-c" in _subparser(parser, path)._option_string_actions, path


@pytest.mark.parametrize("path", list(_TOML_THEN_FLAG), ids=" ".join)
def test_a_config_file_value_is_honoured_and_a_flag_overrides_it(path, tmp_path):
    from scratchgpt.cli import build_parser
    from scratchgpt.cli.flags import read_config_sections

    text, flag, also, (section, name, in_file, from_flag) = _TOML_THEN_FLAG[path]
    toml = tmp_path / "c.toml"
    toml.write_text(text)
    parser = build_parser()
    for argv, expected in (([*path, "-c", str(toml)], in_file), ([*path, "-c", str(toml), *flag], from_flag)):
        configs, _ = read_config_sections(parser.parse_args(argv))
        assert getattr(configs[section], name) == expected, argv
        for s, field_name, value in also:  # the file's other values stand beside the flag
            assert getattr(configs[s], field_name) == value, (argv, field_name)


def test_info_reads_its_config_file(tmp_path, capsys):
    toml = tmp_path / "info.toml"
    toml.write_text('[info]\nmodel = "gpt2"\nuntied = true\n')
    assert main(["info", "-c", str(toml)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameters"] == 124_439_808 and info["parameters_untied"] == 124_439_808 + 50257 * 768
    assert main(["info", "-c", str(toml), "--model", "gpt2-medium", "--no-untied"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["config"]["n_layer"] == 24 and "parameters_untied" not in info


def test_chat_reads_its_config_file_and_flags_override_it(tiny_chat_checkpoint, tmp_path, monkeypatch, capsys):
    # `chat -c` was refused before ("unrecognized arguments"), although the README said every command takes it.
    import io

    def chat(*argv: str) -> str:
        monkeypatch.setattr("sys.stdin", io.StringIO("Name a color.\n/quit\n"))
        assert main(["chat", *argv]) == 0
        return capsys.readouterr().out

    toml = tmp_path / "chat.toml"
    toml.write_text(f'[chat]\ncheckpoint = "{tiny_chat_checkpoint}"\nsystem = "Be brief."\ndevice = "cpu"\n'
                    f'[sampling]\ntemperature = 0\nmax_new_tokens = 3\nstop_at_eot = false\n')
    flags = ["--checkpoint", str(tiny_chat_checkpoint), "--system", "Be brief.", "--temperature", "0",
             "--stop-at-eot", "false"]
    three, five = chat(*flags, "--max-new-tokens", "3"), chat(*flags, "--max-new-tokens", "5")
    assert three != five
    assert chat("-c", str(toml)) == three
    assert chat("-c", str(toml), "--max-new-tokens", "5") == five
    toml.write_text('[chat]\ncheckpoint = "x"\ndraft = "y"\n')  # speculative decoding is generate's alone
    assert main(["chat", "-c", str(toml)]) == 2
    err = _one_line(capsys.readouterr().err)
    assert str(toml) in err and "draft" in err and "unknown" in err


def test_prepare_reads_a_run_file_and_flags_override_it(tmp_path, capsys):
    (tmp_path / "t.txt").write_text("abcdefgh" * 100)
    toml = tmp_path / "run.toml"
    toml.write_text(f'[model]\nn_layer = 2\n[data]\nsource = "{tmp_path / "t.txt"}"\ndir = "{tmp_path / "d"}"\n'
                    f'tokenizer = "bpe"\nval_fraction = 0.25\nblock_size = 16\n[train]\nmax_steps = 3\n'
                    f'[prepare]\nprogress = false\n')
    assert main(["prepare", "-c", str(toml), "--tokenizer", "char"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["tokenizer"], out["vocab_size"], out["train_tokens"], out["val_tokens"]) == ("char", 9, 600, 200)


def test_the_console_entry_exits_with_mains_code_after_threads_atexit_and_buffered_output() -> None:
    """`run()` (the console script, `python -m scratchgpt`) skips the interpreter's teardown with os._exit:
    what a normal exit does first must still happen (non-daemon threads joined, atexit handlers, stdout flushed)."""
    code = (
        "import atexit, sys, threading, time, scratchgpt.cli as cli\n"
        "def fake_main():\n"
        "    atexit.register(lambda: print('atexit ran'))\n"
        "    threading.Thread(target=lambda: (time.sleep(0.3), print('thread done'))).start()\n"
        "    import concurrent.futures\n"
        "    cli.pool = concurrent.futures.ThreadPoolExecutor(1)  # kept, never shut down: the exit must not hang\n"
        "    cli.pool.submit(time.sleep, 0.1)\n"
        "    sys.stdout.write('buffered, no newline')\n"
        "    return 3\n"
        "cli.main = fake_main\n"
        "cli.run()\n"
        "print('not reached')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == "buffered, no newlinethread done\natexit ran\n", proc.stdout
