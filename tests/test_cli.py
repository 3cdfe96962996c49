"""The core subcommands end to end: info and generate, and one-line errors for bad input."""

from __future__ import annotations

import json

import torch

from scratchgpt import GPT, GPTConfig
from scratchgpt.checkpoint import save_model
from scratchgpt.cli import main
from scratchgpt.data.tokenizer import CharTokenizer


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
