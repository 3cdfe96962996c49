"""Instruction fine-tuning: entries, prompt masking, padding, training, test responses, chat."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import pytest
import torch

from scratchgpt.checkpoint import load_any
from scratchgpt.cli import main
from scratchgpt.config import GPTConfig, InstructConfig, SamplingConfig
from scratchgpt.data.chat import encode_conversation, instruction_messages, render_chat, render_prompt
from scratchgpt.data.records import read_entries
from scratchgpt.data.sources import DataError
from scratchgpt.data.tokenizers import CharTokenizer, HFTokenizer
from scratchgpt.inference.chat_session import ChatSession
from scratchgpt.model.gpt import GPT
from scratchgpt.tensor_files import CheckpointError
from scratchgpt.training.finetune import load_start_model, split_indices
from scratchgpt.training.modes.instruct import (
    InstructExample,
    collate_instruct,
    encode_instructions,
    finetune_instruct,
    fit_length,
)
from scratchgpt.training.train import lm_loss

TINY = dict(n_embd=32, n_layer=2, n_head=4, n_positions=256)
FAST = dict(max_steps=30, lr=3e-3, batch_size=8, eval_interval=10, progress=False, plot=False, device="cpu")


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """60 tiny instructions (copy or upper-case a word), as JSON."""
    rng = random.Random(0)
    words = ["apple", "river", "stone", "cloud", "green", "light", "music", "table", "paper", "smile"]
    entries = []
    for _ in range(60):
        w = rng.choice(words)
        if rng.random() < 0.5:
            entries.append({"instruction": "Repeat the word.", "input": w, "output": w})
        else:
            entries.append({"instruction": f"Shout {w}.", "input": "", "output": w.upper() + "!"})
    path = tmp_path_factory.mktemp("instruct") / "toy.json"
    path.write_text(json.dumps(entries))
    return path


def test_real_instruction_data_splits_935_110_55(data_dir: Path):
    entries = read_entries(data_dir / "instruct" / "instruction-data.json", required=("instruction", "output"))
    assert len(entries) == 1100 and sum(not e["input"] for e in entries) == 775
    sizes = {k: len(v) for k, v in split_indices(1100, (0.85, 0.10, 0.05)).items()}
    assert sizes == {"train": 935, "val": 110, "test": 55}


@pytest.mark.parametrize(
    "content, message",
    [
        ('[{"instruction": "a", "output": "b"}, {"instruction": "c"}]', r"bad\.json: entry 1: no 'output'"),
        ('[{"output": "b"}]', r"bad\.json: entry 0: no 'instruction'"),
        ('[{"instruction": "a", "output": 3}]', r"entry 0: 'output' must be a string"),
        ('{"instruction": "a"}', r"expected a JSON list"),
        ("[]", r"bad\.json: no entries"),
    ],
)
def test_bad_entries_name_the_file_and_entry(tmp_path: Path, content, message):
    (tmp_path / "bad.json").write_text(content)
    with pytest.raises(DataError, match=message):
        read_entries(tmp_path / "bad.json", required=("instruction", "output"))


def test_jsonl_entries_name_the_line(tmp_path: Path):
    (tmp_path / "bad.jsonl").write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": "c"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl: line 3: no 'output'"):
        read_entries(tmp_path / "bad.jsonl", required=("instruction", "output"))


def test_collate_pads_with_eot_and_masks_prompt_and_padding():
    eot = 99
    a = InstructExample(ids=[1, 2, 3, 10, 11, eot], prompt_len=3, entry=0)
    b = InstructExample(ids=[4, 5, 12, eot], prompt_len=2, entry=1)
    x, y = collate_instruct([a, b], pad_id=eot)
    assert x.tolist() == [[1, 2, 3, 10, 11], [4, 5, 12, eot, eot]]
    # Targets: prompt tokens masked, the response and its end-of-text kept, padding masked.
    assert y.tolist() == [[-100, -100, 10, 11, eot], [-100, 12, eot, -100, -100]]
    _, y_all = collate_instruct([a, b], pad_id=eot, mask_prompt=False)
    assert y_all.tolist() == [[2, 3, 10, 11, eot], [5, 12, eot, -100, -100]]


def test_masked_prompt_targets_do_not_change_the_loss():
    """Changing a label at a masked (prompt) position leaves the loss unchanged; unmasked, it changes it."""
    model = GPT(GPTConfig(vocab_size=50, n_positions=16, n_embd=32, n_layer=2, n_head=4),
                generator=torch.Generator().manual_seed(0)).eval()
    example = InstructExample(ids=[5, 6, 7, 8, 20, 21, 49], prompt_len=4, entry=0)
    other = InstructExample(ids=[5, 6, 30, 8, 20, 21, 49], prompt_len=4, entry=0)  # prompt token 2 differs
    for mask_prompt, same in ((True, True), (False, False)):
        x, y = collate_instruct([example], pad_id=49, mask_prompt=mask_prompt)
        _, y_other = collate_instruct([other], pad_id=49, mask_prompt=mask_prompt)
        assert (y != y_other).any() != mask_prompt  # the label differs only where it is not masked
        loss, loss_other = lm_loss(model, (x, y)), lm_loss(model, (x, y_other))  # same inputs, other labels
        assert torch.equal(loss, loss_other) == same


def test_fit_length_truncates_drops_or_rejects():
    ids = list(range(10))
    assert fit_length(ids, 3, max_length=9, too_long="error", where="e") == ids  # 9 inputs + 1 target
    assert fit_length(ids, 3, max_length=5, too_long="truncate", where="e") == ids[:6]
    assert fit_length(ids, 3, max_length=5, too_long="drop", where="e") is None
    assert fit_length(ids, 7, max_length=5, too_long="truncate", where="e") is None  # nothing left to learn
    with pytest.raises(DataError, match=r"file: entry 4: 9 tokens, longer than max_length 5"):
        fit_length(ids, 3, max_length=5, too_long="error", where="file: entry 4")


def test_encoding_follows_the_template_and_ends_with_eot():
    tok = CharTokenizer.train(render_prompt("chatml", "Hi", "") + render_prompt("alpaca", "Hi", "x") + "Hello<>|_")
    entries = [{"instruction": "Hi", "input": "", "output": "Hello", "where": "f: entry 0", "index": 7}]
    (ex,) = encode_instructions(entries, tok, template="chatml", vocab_size=tok.vocab_size, max_length=200)
    assert tok.decode(ex.ids[: ex.prompt_len]) == render_prompt("chatml", "Hi", "")
    assert tok.decode(ex.ids[ex.prompt_len : -1]) == "Hello<|im_end|>" and ex.ids[-1] == tok.eot_id
    assert ex.entry == 7


@pytest.mark.slow  # a whole run: CI runs it (scripts/test.sh); the default suite skips it
def test_finetune_val_loss_falls_and_writes_responses(toy_data: Path, tmp_path: Path):
    out = tmp_path / "sft"
    result = finetune_instruct(InstructConfig(data=str(toy_data), tokenizer="char", response_tokens=8),
                               train={**FAST, "out_dir": str(out)}, model=TINY, verbose=False)
    m = result.metrics
    assert m["val"]["loss"] < m["start"]["val"]["loss"] - 0.5
    saved = json.loads((out / "config.json").read_text())
    assert saved["chat_template"] == "alpaca" and saved["task"] == "instruct"
    responses = json.loads((out / "test_responses.json").read_text())
    assert len(responses) == 3  # 5% of 60
    assert set(responses[0]) == {"instruction", "input", "output", "model_response"}
    model, tok = load_any(out)  # a plain GPT run directory
    assert tok.name == "char" and model.config.n_positions == 256


def test_tokenizer_mismatch_with_the_checkpoint_is_an_error(toy_data: Path, tmp_path: Path, capsys):
    out = tmp_path / "sft"
    finetune_instruct(InstructConfig(data=str(toy_data), tokenizer="char", response_tokens=0),
                      train={**FAST, "out_dir": str(out), "max_steps": 1, "eval_interval": 0}, model=TINY,
                      verbose=False)
    with pytest.raises(CheckpointError, match=r"trained with a 'char' tokenizer, not 'gpt2'"):
        load_start_model(str(out), tokenizer="gpt2")
    (tmp_path / "new.json").write_text('[{"instruction": "Hi", "output": "ok"}, {"instruction": "Zap", "output": "q"}]')
    rc = main(["finetune", "instruct", "--data", str(tmp_path / "new.json"), "--init", str(out),
               "--out-dir", str(tmp_path / "again")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "new.json: entry 1: character 'Z'" in err


def test_chat_session_keeps_history_and_trims_it(toy_data: Path):
    tok = CharTokenizer.train(render_prompt("alpaca", "x", "y") + "abcdefghijklmnopqrstuvwxyz ")
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, n_positions=256, n_embd=16, n_layer=1, n_head=2),
                generator=torch.Generator().manual_seed(0)).eval()
    chat = ChatSession(model, tok, template="alpaca", sampling=SamplingConfig(max_new_tokens=5, temperature=0.0))
    first = "".join(chat.reply("hello there"))
    assert len(chat.messages) == 2 and chat.messages[1] == {"role": "assistant", "content": first.strip()}
    for _ in range(3):
        "".join(chat.reply("a" * 40))
    # The history was cut from the oldest exchange so the last prompt left room for the answer.
    assert chat.messages[0]["content"] != "hello there"
    assert len(tok.encode(render_chat(chat.messages[:-1], "alpaca"))) <= 256 - 5
    assert chat.messages[-2]["content"] == "a" * 40
    chat.reset()
    assert chat.messages == []


def test_cli_chat_reads_piped_stdin(toy_data: Path, tmp_path: Path, monkeypatch, capsys):
    out = tmp_path / "sft"
    finetune_instruct(InstructConfig(data=str(toy_data), tokenizer="char", template="chatml", response_tokens=0),
                      train={**FAST, "out_dir": str(out), "max_steps": 2, "eval_interval": 0}, model=TINY,
                      verbose=False)
    capsys.readouterr()
    monkeypatch.setattr("sys.stdin", io.StringIO("Shout apple.\n/reset\n\nRepeat the word.\n/quit\nnever read\n"))
    assert main(["chat", "--checkpoint", str(out), "--temperature", "0", "--max-new-tokens", "4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and lines[1] == "(conversation cleared)"


# ---------------------------------------------------------------------------------------------
# The model's own chat template ("tokenizer"): a Hugging Face folder built at test time
# ---------------------------------------------------------------------------------------------

# The folders of test_chat_session: one token per printable ASCII byte ('\n' is 0, chr(c) is c - 31),
# then the specials; CHATML's are <|endoftext|> 96, <|im_start|> 97, <|im_end|> 98.
NL, IM_START, IM_END = 0, 97, 98
# Assistant turns open with "<|im_start|>bot", but the generation prompt says "assistant": no split.
MISMATCHED = ("{% for m in messages %}<|im_start|>{{ 'bot' if m['role'] == 'assistant' else m['role'] }}\n"
              "{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
              "{% endif %}")


def _chars(text: str) -> list[int]:
    return [NL if c == "\n" else ord(c) - 31 for c in text]


@pytest.fixture(scope="module")
def chat_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from test_chat_session import CHATML, make_folder

    return make_folder(tmp_path_factory.mktemp("hf-chatml"), CHATML)


# Llama 3's specials: <|begin_of_text|> 96, <|end_of_text|> 97, <|start_header_id|> 98, <|end_header_id|> 99,
# <|eot_id|> 100. Each kind: (prompt ids, response ids) of instruction "Say hi.", input "x", output "hi".
# The input follows the instruction after a blank line, in the one user turn (as chatml puts it); the
# response is the rest of the whole rendering: the answer and the end-of-turn marker.
EXPECTED_IDS = {
    "chatml": ([IM_START, *_chars("user\nSay hi.\n\nx"), IM_END, NL, IM_START, *_chars("assistant\n")],
               [*_chars("hi"), IM_END, NL]),
    "llama3": ([96, 98, *_chars("user"), 99, *_chars("\n\nSay hi.\n\nx"), 100, 98, *_chars("assistant"), 99,
                *_chars("\n\n")], [*_chars("hi"), 100]),
}


@pytest.mark.parametrize("kind", ["chatml", "llama3"])
def test_tokenizer_template_example_ids_and_label_mask(kind: str, chat_folder: Path, tmp_path: Path):
    from test_chat_session import LLAMA3, write_tokenizer

    if kind == "llama3":
        write_tokenizer(tmp_path, LLAMA3)
    tok = load_any(chat_folder)[1] if kind == "chatml" else HFTokenizer.from_dir(tmp_path)
    entries = [{"instruction": "Say hi.", "input": "x", "output": "hi", "where": "f: entry 0", "index": 0}]
    (ex,) = encode_instructions(entries, tok, template="tokenizer", vocab_size=128, max_length=100)
    prompt, response = EXPECTED_IDS[kind]
    assert ex.ids == prompt + response and ex.prompt_len == len(prompt)
    assert _chars("hi") == [73, 74]
    # The prompt is exactly what chat sends for the same question.
    assert ex.ids[: ex.prompt_len] == tok.encode_chat(instruction_messages("Say hi.", "x"))
    x, y = collate_instruct([ex], pad_id=tok.eot_id)
    assert x[0].tolist() == ex.ids[:-1]
    assert y[0].tolist() == [-100] * (len(prompt) - 1) + response  # only the response, <|im_end|> included


def test_tokenizer_template_without_an_end_of_turn_token_gets_end_of_text(tmp_path: Path):
    from test_chat_session import CHATML, write_tokenizer

    write_tokenizer(tmp_path, CHATML, chat_template="{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n"
                                                    "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    tok = HFTokenizer.from_dir(tmp_path)
    ids, learnt = encode_conversation([{"role": "user", "content": "a"}, {"role": "assistant", "content": "hi"}],
                                      "tokenizer", tok)
    prompt, response = ids[: learnt.index(True)], ids[learnt.index(True):]
    assert prompt == _chars("user: a\nassistant: ") and all(learnt[len(prompt):])
    assert response == [*_chars("hi\n"), tok.eot_id] and tok.eot_id == 96


def test_tokenizer_template_refuses_a_mismatch_and_forged_turns(chat_folder: Path, toy_data: Path, tmp_path: Path,
                                                                capsys):
    from test_chat_session import CHATML, make_folder

    tok = load_any(chat_folder)[1]
    bad = {"instruction": "a", "output": "b <|im_start|>user", "where": "d.json: entry 3"}
    with pytest.raises(DataError, match=r"d\.json: entry 3 \('output'\): messages\[1\].*<\|im_start\|>"):
        encode_instructions([bad], tok, template="tokenizer", vocab_size=128, max_length=100)
    folder = make_folder(tmp_path / "mismatch", CHATML, chat_template=MISMATCHED)
    rc = main(["finetune", "instruct", "--data", str(toy_data), "--init", str(folder), "--template", "tokenizer",
               "--out-dir", str(tmp_path / "never")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert "toy.json: entry" in err and "mismatch/tokenizer_config.json" in err and "does not start with" in err
    assert not (tmp_path / "never" / "model.safetensors").exists()
    # A model without a chat template cannot use "tokenizer": one line too.
    rc = main(["finetune", "instruct", "--data", str(toy_data), "--template", "tokenizer", "--tokenizer", "char",
               "--n-embd", "16", "--n-layer", "1", "--n-head", "2", "--out-dir", str(tmp_path / "never2")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "has none" in err, err


def test_finetune_in_the_tokenizer_template_learns_and_chat_follows(chat_folder: Path, toy_data: Path,
                                                                   tmp_path: Path, monkeypatch, capsys):
    from scratchgpt.checkpoint import saved_chat_template

    out = tmp_path / "sft"
    # "auto" on a folder with a chat template is "tokenizer".
    result = finetune_instruct(InstructConfig(data=str(toy_data), init=str(chat_folder), response_tokens=0),
                               train={**FAST, "out_dir": str(out)}, verbose=False)
    m = result.metrics
    assert m["val"]["loss"] < m["start"]["val"]["loss"] - 0.5
    saved = json.loads((out / "config.json").read_text())
    assert saved["chat_template"] == "tokenizer" and saved["task"] == "instruct"
    assert "chat_template" in json.loads((out / "tokenizer_config.json").read_text())  # the run keeps the template
    model, tok = load_any(out)
    assert saved_chat_template(out, tokenizer=tok) == "tokenizer"  # what chat and serve pick with no flag
    entry = {"instruction": "Shout apple.", "input": "", "output": "APPLE!"}
    (ex,) = encode_instructions([entry], result.tokenizer, template="tokenizer", vocab_size=128, max_length=100)
    session = ChatSession(model, tok, template=saved_chat_template(out, tokenizer=tok),
                          sampling=SamplingConfig(max_new_tokens=4, temperature=0.0))
    session.messages.append({"role": "user", "content": "Shout apple."})
    assert session.prompt_ids() == ex.ids[: ex.prompt_len]
    monkeypatch.setattr("sys.stdin", io.StringIO("Shout apple.\n/quit\n"))
    assert main(["chat", "--checkpoint", str(out), "--temperature", "0", "--max-new-tokens", "8"]) == 0
    assert "<|im_end|>" not in capsys.readouterr().out  # the end-of-turn token ends the reply unseen
