"""Fine-tuning data in the formats people keep it in: messages, ShareGPT and Alpaca records as JSON, JSONL or
Parquet; DPO prompt/chosen/rejected with messages; classification from CSV, JSONL and Parquet. Exact
masks (only the assistant turns are learnt), equivalences between formats, one-line errors, a tiny run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scratchgpt.cli import main
from scratchgpt.config import InstructConfig
from scratchgpt.data.chat import encode_conversation, instruction_messages, render_chat
from scratchgpt.data.records import read_instructions, read_objects, read_preferences
from scratchgpt.data.sources import DataError
from scratchgpt.data.tokenizers import CharTokenizer
from scratchgpt.training.modes.classify import read_labeled_texts
from scratchgpt.training.modes.dpo import collate_preferences, encode_preferences
from scratchgpt.training.modes.instruct import collate_instruct, encode_instructions, finetune_instruct

TINY = dict(n_embd=32, n_layer=2, n_head=4, n_positions=256)
CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Yo"}, {"role": "user", "content": "Bye"},
                {"role": "assistant", "content": "Ok"}]
SHAREGPT = [{"from": {"system": "system", "user": "human", "assistant": "gpt"}[m["role"]], "value": m["content"]}
            for m in CONVERSATION]
# What each text template learns of CONVERSATION (True) and what it does not (False), end-of-text aside.
SEGMENTS = {
    "chatml": [("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
                False), ("Yo<|im_end|>", True), ("\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n", False),
               ("Ok<|im_end|>", True)],
    "alpaca": [("Be brief.\n\n### Instruction:\nHi\n\n### Response:\n", False), ("Yo", True),
               ("\n\n### Instruction:\nBye\n\n### Response:\n", False), ("Ok", True)],
}
ALPHABET = CharTokenizer.train("".join(t for segs in SEGMENTS.values() for t, _ in segs) + "abcdefghijklmnopqrstuvwxyz"
                               "ABCDEFGHIJKLMNOPQRSTUVWXYZ.,!? #:<>|_\n")


def _write(path: Path, records: list[dict]) -> Path:
    """`records` as the file its suffix names: .json (a list), .jsonl or .parquet."""
    if path.suffix == ".parquet":
        pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
        pq.write_table(pa.Table.from_pylist(records), path, row_group_size=2)
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        path.write_text(json.dumps(records))
    return path


def _learnt_text(tok, ids: list[int], learnt: list[bool]) -> str:
    return tok.decode([i for i, keep in zip(ids, learnt, strict=True) if keep])


# ---------------------------------------------------------------------------------------------
# Masks: exactly the assistant turns
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("template", ["chatml", "alpaca"])
def test_messages_learn_exactly_the_assistant_turns_char(template: str):
    tok = ALPHABET
    ids, learnt = encode_conversation(CONVERSATION, template, tok)
    expected_ids = [i for text, _ in SEGMENTS[template] for i in tok.encode(text)] + [tok.eot_id]
    expected_learnt = [flag for text, flag in SEGMENTS[template] for _ in text] + [True]  # one char, one id
    assert ids == expected_ids and learnt == expected_learnt
    # The collated targets: every answer with its end-of-turn marker, then end-of-text; nothing else.
    (ex,) = encode_instructions([{"messages": CONVERSATION[:-1], "output": "Ok", "where": "f: line 1", "index": 0}],
                                tok, template=template, vocab_size=tok.vocab_size, max_length=500)
    assert ex.ids == ids and ex.learnt == learnt and ex.prompt_len == len(SEGMENTS[template][0][0])
    _, y = collate_instruct([ex], pad_id=tok.eot_id)
    targets = [t for t in y[0].tolist() if t != -100]
    marker = "<|im_end|>" if template == "chatml" else ""
    assert tok.decode(targets[:-1]) == f"Yo{marker}Ok{marker}" and targets[-1] == tok.eot_id
    # Up to the last answer, the rendering is the history the chat command sends for that answer.
    assert render_chat(CONVERSATION[:4], template) == "".join(t for t, _ in SEGMENTS[template][:3])


def test_messages_mask_with_gpt2_bpe(gpt2_tokenizer):
    ids, learnt = encode_conversation(CONVERSATION, "chatml", gpt2_tokenizer)
    assert _learnt_text(gpt2_tokenizer, ids, learnt) == "Yo<|im_end|>Ok<|im_end|><|endoftext|>"
    # Each segment is tokenized apart: the ids are those of the four pieces, then end-of-text.
    pieces = [gpt2_tokenizer.encode(text) for text, _ in SEGMENTS["chatml"]]
    assert ids == [i for p in pieces for i in p] + [gpt2_tokenizer.eot_id]
    assert learnt == [flag for (_, flag), p in zip(SEGMENTS["chatml"], pieces, strict=True) for _ in p] + [True]


# The test HF folders (test_chat_session): one token per printable ASCII byte ('\n' is 0, chr(c) is c - 31),
# then the specials: <|endoftext|> 96, <|im_start|> 97, <|im_end|> 98.
NL, EOT, IM_START, IM_END = 0, 96, 97, 98


def _chars(text: str) -> list[int]:
    return [NL if c == "\n" else ord(c) - 31 for c in text]


@pytest.fixture(scope="module")
def chatml_tokenizer(tmp_path_factory: pytest.TempPathFactory):
    from scratchgpt.data.tokenizers import HFTokenizer
    from test_chat_session import CHATML, write_tokenizer

    folder = tmp_path_factory.mktemp("chatml-tok")
    write_tokenizer(folder, CHATML)
    return HFTokenizer.from_dir(folder)


def test_messages_mask_under_the_models_own_template(chatml_tokenizer):
    ids, learnt = encode_conversation(CONVERSATION, "tokenizer", chatml_tokenizer)
    turn = lambda role, text: [IM_START, *_chars(f"{role}\n{text}"), IM_END, NL]  # noqa: E731
    prompt1 = [*turn("system", "Be brief."), *turn("user", "Hi"), IM_START, *_chars("assistant\n")]
    answer1 = [*_chars("Yo"), IM_END, NL]  # the template writes "\n" after <|im_end|>: learnt with it
    prompt2 = [*turn("user", "Bye"), IM_START, *_chars("assistant\n")]
    answer2 = [*_chars("Ok"), IM_END, NL]  # ends in <|im_end|>, a stop token: no end-of-text appended
    assert ids == prompt1 + answer1 + prompt2 + answer2
    assert learnt == [False] * len(prompt1) + [True] * len(answer1) + [False] * len(prompt2) + [True] * len(answer2)
    # The first prompt is exactly what chat sends for the same question.
    assert ids[: len(prompt1)] == chatml_tokenizer.encode_chat(CONVERSATION[:2])


def test_a_template_that_rewrites_earlier_turns_has_no_split(tmp_path: Path):
    from scratchgpt.data.tokenizers import HFTokenizer
    from test_chat_session import CHATML, write_tokenizer

    # Like templates that drop earlier answers' reasoning: an earlier assistant turn renders shorter.
    write_tokenizer(tmp_path, CHATML, chat_template=(
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' and not loop.last %}"
        "...{% else %}{{ m['content'] }}{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"))
    tok = HFTokenizer.from_dir(tmp_path)
    assert len(encode_conversation(CONVERSATION[:3], "tokenizer", tok)[0]) > 0  # one answer: fine
    with pytest.raises(ValueError, match="up to answer 4 does not start with its rendering of the turns before it"):
        encode_conversation(CONVERSATION, "tokenizer", tok)


@pytest.mark.parametrize("template", ["chatml", "alpaca"])
def test_an_alpaca_entry_is_the_one_turn_conversation(template: str):
    """Single-turn Alpaca entries (no input) encode exactly as the same question in messages form."""
    tok = ALPHABET
    alpaca = {"instruction": "Say hi.", "input": "", "output": "hi", "where": "a", "index": 0}
    chat = {"messages": instruction_messages("Say hi."), "output": "hi", "where": "b", "index": 0}
    (a,), (b,) = (encode_instructions([e], tok, template=template, vocab_size=tok.vocab_size, max_length=200)
                  for e in (alpaca, chat))
    assert (a.ids, a.learnt, a.prompt_len) == (b.ids, b.learnt, b.prompt_len)


# ---------------------------------------------------------------------------------------------
# Files: ShareGPT = messages; JSON = JSONL = Parquet
# ---------------------------------------------------------------------------------------------


def _plain(entries: list[dict]) -> list[dict]:
    return [{k: v for k, v in e.items() if k != "where"} for e in entries]


def test_sharegpt_is_the_equivalent_messages_file(tmp_path: Path, chatml_tokenizer):
    other = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Red."}]
    messages = _write(tmp_path / "m.jsonl", [{"messages": CONVERSATION}, {"messages": other, "id": 7}])
    sharegpt = _write(tmp_path / "s.jsonl", [{"conversations": SHAREGPT},
                                             {"conversations": [{"from": "human", "value": "Name a colour."},
                                                                {"from": "gpt", "value": "Red."}]}])
    a, b = read_instructions(messages), read_instructions(sharegpt)
    assert _plain(a) == _plain(b)
    assert a[0] == {"index": 0, "where": f"{messages}: line 1", "messages": CONVERSATION[:-1], "output": "Ok"}
    for tok, template in ((ALPHABET, "chatml"), (ALPHABET, "alpaca"), (chatml_tokenizer, "tokenizer")):
        ea, eb = (encode_instructions(e, tok, template=template, vocab_size=128, max_length=200) for e in (a, b))
        assert [(x.ids, x.learnt) for x in ea] == [(x.ids, x.learnt) for x in eb]


@pytest.mark.parametrize("records", [
    [{"messages": CONVERSATION}, {"messages": CONVERSATION[1:3]}],
    [{"conversations": SHAREGPT}],
    [{"instruction": "Say hi.", "input": "x", "output": "hi"}, {"instruction": "Go", "output": "went"}],
])
def test_json_jsonl_and_parquet_give_the_same_entries(tmp_path: Path, records: list[dict]):
    files = [_write(tmp_path / f"d.{suffix}", records) for suffix in ("json", "jsonl", "parquet")]
    entries = [read_instructions(f) for f in files]
    assert _plain(entries[0]) == _plain(entries[1]) == _plain(entries[2])
    assert [e["where"] for e in entries[2]] == [f"{files[2]}: row {i} (from 0)" for i in range(len(records))]
    examples = [encode_instructions(e, ALPHABET, template="chatml", vocab_size=ALPHABET.vocab_size, max_length=500)
                for e in entries]
    assert [(x.ids, x.learnt) for x in examples[0]] == [(x.ids, x.learnt) for x in examples[2]]


def test_compressed_jsonl_reads_like_plain(tmp_path: Path):
    import gzip

    plain = _write(tmp_path / "d.jsonl", [{"messages": CONVERSATION}])
    (tmp_path / "d.jsonl.gz").write_bytes(gzip.compress(plain.read_bytes()))
    assert _plain(read_instructions(tmp_path / "d.jsonl.gz")) == _plain(read_instructions(plain))


# ---------------------------------------------------------------------------------------------
# Bad input: one line naming the file, the record and the field
# ---------------------------------------------------------------------------------------------

BAD_INSTRUCTIONS = [
    ([{"messages": "hello"}], r"line 1: 'messages' must be a non-empty list of \{'role', 'content'\} objects, got a "
                              r"string"),
    ([{"messages": []}], r"line 1: 'messages' must be a non-empty list .* got an empty list"),
    ([{"messages": [{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}]}],
     r"line 1: messages\[1\]\.role is 'tool'; it must be one of 'system', 'user', 'assistant'"),
    ([{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": None}]}],
     r"line 1: messages\[1\]\.content is null, not a string"),
    ([{"messages": [{"role": "user"}, {"role": "assistant", "content": "b"}]}],
     r"line 1: messages\[0\]\.content is missing, not a string"),
    ([{"messages": [{"role": "user", "content": "a"}]}],
     r"line 1: messages\[0\] is a user turn; a conversation must end with an assistant turn"),
    ([{"messages": [{"role": "assistant", "content": "a"}]}], r"line 1: 'messages' starts with an assistant turn"),
    ([{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                    {"role": "assistant", "content": "c"}]}],
     r"line 1: messages\[1\] is an assistant turn; the last assistant turn must answer a user turn"),
    ([{"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "s"},
                    {"role": "assistant", "content": "b"}]}], r"line 1: messages\[1\] is a system message after"),
    ([{"messages": CONVERSATION}, {"conversations": SHAREGPT}],
     r"line 2: no 'messages' \(it has \['conversations'\]\); the file's first record holds 'messages'"),
    ([{"conversations": [{"from": "bot", "value": "a"}]}],
     r"line 1: conversations\[0\]\.from is 'bot'; it must be one of 'system', 'human', 'user', 'gpt', 'assistant'"),
    ([{"conversations": [{"from": "human", "value": 3}]}], r"line 1: conversations\[0\]\.value is a number"),
    ([{"prompt": "a", "completion": "b"}], r"line 1: no 'instruction' \(nor 'messages' or 'conversations'; it has "
                                           r"\['completion', 'prompt'\]\)"),
    ([{"instruction": "a", "output": 3}], r"line 1: 'output' must be a string, got int"),
    ([], r"d\.jsonl: no entries"),
]


@pytest.mark.parametrize(("records", "message"), BAD_INSTRUCTIONS)
def test_bad_instruction_records_are_one_line_errors(tmp_path: Path, records: list, message: str):
    path = _write(tmp_path / "d.jsonl", records)
    with pytest.raises(DataError, match=message) as info:
        read_instructions(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_bad_records_in_parquet_and_bad_lines_name_the_row(tmp_path: Path):
    path = _write(tmp_path / "d.parquet", [{"messages": CONVERSATION[1:3]}, {"messages": None}])
    with pytest.raises(DataError, match=r"d\.parquet: row 1 \(from 0\): 'messages' must be a non-empty list .* got "
                                        r"null"):
        read_instructions(path)
    (tmp_path / "l.jsonl").write_text('{"messages": []}\n["not", "an", "object"]\n')
    with pytest.raises(DataError, match=r"l\.jsonl: line 2: an array, not a JSON object"):
        list(read_objects(tmp_path / "l.jsonl"))


def test_cli_bad_messages_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    path = _write(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}, {"messages": [{"role": "user", "content": 1}]}])
    rc = main(["finetune", "instruct", "--data", str(path), "--tokenizer", "char", "--out-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert f"{path}: line 2: messages[0].content is a number, not a string" in err


# ---------------------------------------------------------------------------------------------
# DPO: prompt / chosen / rejected, strings or messages
# ---------------------------------------------------------------------------------------------


def _pairs(path: Path, tok, template: str) -> list[tuple[list[int], list[int], int]]:
    pairs = encode_preferences(read_preferences(path), tok, template=template, vocab_size=128, max_length=500)
    return [(p.chosen, p.rejected, p.prompt_len) for p in pairs]


@pytest.mark.parametrize("template", ["chatml", "alpaca", "tokenizer"])
def test_preference_shapes_give_the_same_pairs(tmp_path: Path, template: str, chatml_tokenizer):
    tok = chatml_tokenizer if template == "tokenizer" else ALPHABET
    user = {"role": "user", "content": "Name a word."}
    answer = lambda text: {"role": "assistant", "content": text}  # noqa: E731
    shapes = {
        "alpaca": {"instruction": "Name a word.", "chosen": "Sure, apple.", "rejected": "No."},
        "strings": {"prompt": "Name a word.", "chosen": "Sure, apple.", "rejected": "No."},
        "messages": {"prompt": [user], "chosen": [answer("Sure, apple.")], "rejected": [answer("No.")]},
        "message": {"prompt": [user], "chosen": answer("Sure, apple."), "rejected": answer("No.")},
        # UltraFeedback: a string prompt and whole conversations; or the conversations alone.
        "ultrafeedback": {"prompt": "Name a word.", "chosen": [user, answer("Sure, apple.")],
                          "rejected": [user, answer("No.")]},
        "conversations": {"chosen": [user, answer("Sure, apple.")], "rejected": [user, answer("No.")]},
    }
    got = {name: _pairs(_write(tmp_path / f"{name}.jsonl", [record]), tok, template)
           for name, record in shapes.items()}
    assert all(pairs == got["alpaca"] for pairs in got.values()), got
    (chosen, rejected, prompt_len), = got["strings"]
    assert chosen[:prompt_len] == rejected[:prompt_len]
    if template == "tokenizer":
        assert chosen[:prompt_len] == tok.encode_chat([user])  # what chat sends
        assert chosen[prompt_len:] == [*_chars("Sure, apple."), IM_END, NL]
    else:
        assert tok.decode(chosen[prompt_len:-1]) == "Sure, apple." + ("<|im_end|>" if template == "chatml" else "")


def test_a_conversation_prompt_scores_only_the_final_answer(tmp_path: Path):
    record = {"prompt": CONVERSATION[:4], "chosen": "Ok", "rejected": "Nope"}
    (pair,) = encode_preferences(read_preferences(_write(tmp_path / "p.json", [record])), ALPHABET,
                                 template="chatml", vocab_size=ALPHABET.vocab_size, max_length=500)
    # The earlier answer "Yo" is part of the prompt: DPO compares the final answers alone.
    assert pair.prompt_len == sum(len(t) for t, _ in SEGMENTS["chatml"][:3])
    y = collate_preferences([pair], pad_id=ALPHABET.eot_id)["y"]
    learnt = [ALPHABET.decode([t for t in row if t not in (-100, ALPHABET.eot_id)]) for row in y.tolist()]
    assert learnt == ["Ok<|im_end|>", "Nope<|im_end|>"]


@pytest.mark.parametrize(("record", "message"), [
    ({"prompt": "a", "chosen": "b"}, r"line 1: no 'rejected'"),
    ({"prompt": 5, "chosen": "b", "rejected": "c"}, r"line 1: 'prompt' must be a non-empty list .* got a number"),
    ({"prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "chosen": "c",
      "rejected": "d"}, r"line 1: prompt\[1\] is an assistant turn; a prompt must end with a user turn"),
    ({"prompt": "a", "chosen": None, "rejected": "d"}, r"line 1: 'chosen' must be a string, an assistant message or "
                                                       r"a messages list, got null"),
    ({"prompt": "a", "chosen": [{"role": "user", "content": "b"}], "rejected": "d"},
     r"line 1: chosen\[0\] is a user turn; 'chosen' must end with the assistant's answer"),
    ({"prompt": "a", "chosen": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "b"}],
      "rejected": "d"}, r"line 1: the turns before 'chosen''s answer are not the prompt"),
    ({"chosen": "b", "rejected": "c"}, r"line 1: no 'prompt' \(it has \['chosen', 'rejected'\]\), and 'chosen' and "
                                       r"'rejected' are not two conversations"),
])
def test_bad_preference_records_are_one_line_errors(tmp_path: Path, record: dict, message: str):
    with pytest.raises(DataError, match=message):
        read_preferences(_write(tmp_path / "p.jsonl", [record]))


# ---------------------------------------------------------------------------------------------
# Classification: CSV = JSONL = Parquet
# ---------------------------------------------------------------------------------------------


def test_classification_reads_csv_jsonl_and_parquet_alike(tmp_path: Path):
    rows = [{"review": "great, loved it", "stars": 5}, {"review": "meh", "stars": 2}, {"review": "bad", "stars": 1}]
    (tmp_path / "r.csv").write_text("review,stars\n" + "".join(f'"{r["review"]}",{r["stars"]}\n' for r in rows))
    files = [tmp_path / "r.csv", _write(tmp_path / "r.jsonl", rows), _write(tmp_path / "r.parquet", rows)]
    read = [[(r.text, r.label, r.entry) for r in read_labeled_texts(f, text_field="review", label_field="stars")]
            for f in files]
    assert read[0] == read[1] == read[2] == [("great, loved it", "5", 0), ("meh", "2", 1), ("bad", "1", 2)]
    _write(tmp_path / "bad.parquet", [{"text": "a", "label": "x"}, {"text": None, "label": "y"}])
    with pytest.raises(DataError, match=r"bad\.parquet: row 1 \(from 0\): 'text' is null, not a string"):
        read_labeled_texts(tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=r"r\.parquet: row 0 \(from 0\): no 'label' field .*; pass --label-field"):
        read_labeled_texts(tmp_path / "r.parquet", text_field="review")


def test_cli_classify_on_parquet(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    rows = [{"text": t, "label": "pos" if i % 2 else "neg"} for i, t in enumerate(["good fun", "bad day"] * 10)]
    path = _write(tmp_path / "c.parquet", rows)
    rc = main(["finetune", "classify", "--data", str(path), "--tokenizer", "char", "--n-embd", "16", "--n-layer", "1",
               "--n-head", "2", "--max-steps", "2", "--out-dir", str(tmp_path / "o"), "--no-progress", "--no-plot"])
    assert rc == 0, capsys.readouterr().err
    splits = json.loads((tmp_path / "o" / "splits.json").read_text())
    assert splits["format"] == "parquet" and splits["labels"] == ["neg", "pos"]


# ---------------------------------------------------------------------------------------------
# A tiny end-to-end run on a messages JSONL
# ---------------------------------------------------------------------------------------------


def test_finetune_instruct_on_messages_jsonl_learns(tmp_path: Path):
    words = ["apple", "river", "stone", "cloud", "green", "light", "music", "table"]
    records = [{"messages": [{"role": "system", "content": "Echo."}, {"role": "user", "content": w},
                             {"role": "assistant", "content": w.upper()}, {"role": "user", "content": "again"},
                             {"role": "assistant", "content": w}]} for w in words * 5]
    path = _write(tmp_path / "chat.jsonl", records)
    out = tmp_path / "sft"
    result = finetune_instruct(
        InstructConfig(data=str(path), tokenizer="char", template="chatml", response_tokens=6, split=(0.8, 0.1, 0.1)),
        train=dict(max_steps=25, lr=3e-3, batch_size=8, eval_interval=0, progress=False, plot=False, device="cpu",
                   out_dir=str(out)), model=TINY, verbose=False)
    m = result.metrics
    assert m["val"]["loss"] < m["start"]["val"]["loss"] - 0.5
    responses = json.loads((out / "test_responses.json").read_text())
    assert len(responses) == 4 and set(responses[0]) == {"messages", "output", "model_response"}
    assert responses[0]["messages"][-1] == {"role": "user", "content": "again"}
    assert json.loads((out / "config.json").read_text())["chat_template"] == "chatml"
