"""Classification fine-tuning: reading labelled data, the last-real-token head, training, loading, errors."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from scratchgpt.cli import main
from scratchgpt.config import ClassifyConfig, GPTConfig, LoRAConfig
from scratchgpt.data.sources import DataError
from scratchgpt.model.gpt import GPT
from scratchgpt.training.finetune import add_classification_head, split_indices
from scratchgpt.training.modes.classify import (
    ClassExample,
    balance_classes,
    classify_texts,
    collate_classification,
    finetune_classify,
    label_names,
    load_classifier,
    pooled_logits,
    read_labeled_texts,
)

TINY = dict(n_embd=32, n_layer=2, n_head=4, n_positions=64)
FAST = dict(max_steps=40, lr=3e-3, batch_size=16, eval_interval=20, progress=False, plot=False, device="cpu")


@pytest.fixture(scope="module")
def sms(data_dir: Path) -> Path:
    return data_dir / "spam" / "SMSSpamCollection"


@pytest.fixture(scope="module")
def sms_subset(sms: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """100 spam + 100 ham rows of the real collection, as headerless TSV."""
    lines = [line for line in sms.read_text(encoding="utf-8").split("\n") if line.strip()]
    rows = [x for x in lines if x.startswith("spam\t")][:100] + [x for x in lines if x.startswith("ham\t")][:100]
    path = tmp_path_factory.mktemp("sms") / "sms200.tsv"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


# -- reading data -----------------------------------------------------------------------------------


def test_sms_collection_reads_all_rows_split_on_the_first_tab(sms: Path):
    rows = read_labeled_texts(sms)
    assert len(rows) == 5574  # csv's default quoting would merge lines and give 5,572
    assert Counter(r.label for r in rows) == {"ham": 4827, "spam": 747}
    assert label_names(rows) == ["ham", "spam"]


def test_balanced_sms_split_70_10_20(sms: Path):
    rows = balance_classes(read_labeled_texts(sms), seed=123)
    assert Counter(r.label for r in rows) == {"ham": 747, "spam": 747}
    sizes = {k: len(v) for k, v in split_indices(len(rows), (0.7, 0.1, 0.2), seed=123).items()}
    assert sizes == {"train": 1045, "val": 149, "test": 300}


def test_formats_with_headers(tmp_path: Path):
    (tmp_path / "a.csv").write_text('text,label\n"hello, world",pos\n"a ""quoted"" one",neg\n')
    (tmp_path / "a.jsonl").write_text('{"text": "hi", "label": 1}\n\n{"text": "yo", "label": 0}\n')
    (tmp_path / "a.tsv").write_text("id\tlabel\ttext\n1\tpos\thello\n2\tneg\tbye\n")
    assert [(r.text, r.label) for r in read_labeled_texts(tmp_path / "a.csv")] == [
        ("hello, world", "pos"), ('a "quoted" one', "neg")]
    assert [(r.text, r.label) for r in read_labeled_texts(tmp_path / "a.jsonl")] == [("hi", "1"), ("yo", "0")]
    assert [(r.text, r.label) for r in read_labeled_texts(tmp_path / "a.tsv")] == [("hello", "pos"), ("bye", "neg")]


@pytest.mark.parametrize(
    "name, content, kwargs, message",
    [
        ("a.csv", "text,category\nhi,pos\n", {}, r"a\.csv: line 1: no 'label' column in the header.*--label-field"),
        ("a.tsv", "text\tkind\nhi\tpos\n", {}, r"a\.tsv: line 1: no 'label' column"),
        ("a.tsv", "ham\thello\nno tab here\n", {}, r"a\.tsv: line 2: no tab between label and text"),
        ("a.jsonl", '{"text": "a", "label": "x"}\n{"text": "b"}\n', {}, r"a\.jsonl: line 2: no 'label' field"),
        ("a.json", '[{"text": "a", "label": "x"}, {"label": "y"}]', {}, r"a\.json: entry 1: no 'text' field"),
        ("a.tsv", "ham\thello\n\tworld\n", {}, r"a\.tsv: line 2: empty label"),
    ],
)
def test_bad_rows_name_the_file_and_line(tmp_path: Path, name, content, kwargs, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=message):
        read_labeled_texts(tmp_path / name, **kwargs)


def test_given_labels_fix_the_order_and_reject_others(tmp_path: Path):
    (tmp_path / "a.tsv").write_text("spam\tx\nham\ty\nmaybe\tz\n")
    rows = read_labeled_texts(tmp_path / "a.tsv")
    with pytest.raises(DataError, match=r"line 3: label 'maybe' is not one of --labels"):
        label_names(rows, ["spam", "ham"])
    assert label_names(rows[:2], ["spam", "ham"]) == ["spam", "ham"]


# -- the head ----------------------------------------------------------------------------------------


def test_pooled_logits_read_the_last_real_token_whatever_the_padding():
    config = GPTConfig(vocab_size=50, n_positions=16, n_embd=32, n_layer=2, n_head=4,
                       embd_pdrop=0.0, resid_pdrop=0.0, attn_pdrop=0.0)
    model = add_classification_head(GPT(config, generator=torch.Generator().manual_seed(0)), 3).eval()
    assert model.lm_head.weight.shape == (3, 32) and model.lm_head.bias is not None
    assert model.config.tie_word_embeddings is False
    rows = [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10]]
    batch = collate_classification([ClassExample(r, 0, i) for i, r in enumerate(rows)], pad_id=49)
    assert batch["x"].shape == (3, 5) and batch["lengths"].tolist() == [5, 2, 3]
    padded = pooled_logits(model, batch["x"], batch["lengths"])  # (B, K)
    for i, r in enumerate(rows):
        alone = model(torch.tensor([r]))[0][0, -1]  # (K,)
        torch.testing.assert_close(padded[i], alone)


# -- end to end --------------------------------------------------------------------------------------


@pytest.mark.slow  # a whole run: CI runs it (scripts/test.sh); the default suite skips it
def test_finetune_on_sms_subset_beats_chance_and_reloads(sms_subset: Path, tmp_path: Path):
    out = tmp_path / "run"
    result = finetune_classify(
        ClassifyConfig(data=str(sms_subset), tokenizer="char", trainable="all", max_length=64, dropout=0.0),
        train={**FAST, "out_dir": str(out), "seed": 1}, model=TINY, verbose=False,
    )
    m = result.metrics
    assert m["test"]["accuracy"] >= 0.7  # chance is 0.5 on this balanced subset
    assert sum(map(sum, m["test"]["confusion"])) == m["test"]["examples"] == 40
    assert {"train", "val", "test", "start", "train_seconds"} <= set(m)
    saved = json.loads((out / "config.json").read_text())
    assert saved["task"] == "classification" and saved["classifier"]["labels"] == ["ham", "spam"]
    splits = json.loads((out / "splits.json").read_text())
    assert [len(splits[k]) for k in ("train", "val", "test")] == [140, 20, 40]
    assert (out / "metrics.json").is_file() and (out / "log.csv").is_file()

    model, tokenizer, labels = load_classifier(out)
    texts = ["WINNER!! You have won a 1000 cash prize! Call 09061701461 now", "Ok, see you at home later"]
    rows = classify_texts(model, tokenizer, texts, labels)
    assert [set(r["probs"]) for r in rows] == [{"ham", "spam"}] * 2
    assert all(abs(sum(r["probs"].values()) - 1) < 1e-4 for r in rows)
    x = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(model(x)[0], result.model.eval()(x)[0])


@pytest.mark.parametrize("trainable, expect", [("head", "head"), ("last-block", "last-block"), ("lora", "lora")])
def test_trainable_choices_train_only_those_weights(sms_subset: Path, tmp_path: Path, trainable, expect):
    lora = LoRAConfig(rank=2) if trainable == "lora" else None
    result = finetune_classify(
        ClassifyConfig(data=str(sms_subset), tokenizer="char", trainable=trainable, max_length=32),
        train={**FAST, "out_dir": str(tmp_path / "run"), "max_steps": 2, "eval_interval": 0}, lora=lora,
        model=TINY, verbose=False,
    )
    m = result.metrics
    assert m["trainable"] == expect
    head = 32 * 2 + 2
    if trainable == "head":
        assert m["trainable_parameters"] == head
    elif trainable == "last-block":
        block = sum(p.numel() for p in result.model.transformer.h[-1].parameters())
        assert m["trainable_parameters"] == head + block + 2 * 32
    else:
        assert m["trainable_parameters"] == head + m["lora_parameters"]
        assert (tmp_path / "run" / "adapter.safetensors").is_file()
        # The run directory's model is the merged classifier, loadable like any other.
        load_classifier(tmp_path / "run")


def test_cli_classify_end_to_end(sms_subset: Path, tmp_path: Path, capsys):
    out = tmp_path / "cli"
    rc = main(["finetune", "classify", "--data", str(sms_subset), "--tokenizer", "char", "--max-length", "32",
               "--n-embd", "32", "--n-layer", "1", "--n-head", "2", "--n-positions", "32", "--max-steps", "3",
               "--eval-interval", "0", "--progress", "false", "--plot", "false", "--out-dir", str(out)])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["out_dir"] == str(out) and "accuracy" in summary["test"]
    assert main(["classify", "--checkpoint", str(out), "Free entry! Text WIN now", "see you"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and all(line.split("\t")[0] in ("ham", "spam") for line in lines)


def test_cli_bad_input_is_one_line_and_exit_code_2(tmp_path: Path, capsys):
    (tmp_path / "bad.csv").write_text("text,kind\nhello,a\n")
    assert main(["finetune", "classify", "--data", str(tmp_path / "bad.csv"), "--out-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bad.csv: line 1: no 'label' column" in err
    assert main(["classify", "--checkpoint", str(tmp_path), "hi"]) == 2
    assert "config.json" in capsys.readouterr().err


def test_char_model_and_text_outside_its_alphabet_says_what_to_start_from(tmp_path: Path, capsys):
    """Issue 21: fine-tuning the demo's char model on text with other characters names a model that works."""
    from scratchgpt.checkpoint import save_model
    from scratchgpt.data.tokenizers import CharTokenizer

    tok = CharTokenizer(" abcdefghijklmnopqrstuvwxyz")
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, n_positions=16, n_embd=16, n_layer=1, n_head=2))
    save_model(model, tmp_path / "char", tokenizer=tok)
    (tmp_path / "d.tsv").write_text("ham\tsee you\nspam\twin 2 prizes\nham\tok\nspam\tfree\n")
    rc = main(["finetune", "classify", "--data", str(tmp_path / "d.tsv"), "--init", str(tmp_path / "char"),
               "--split", "0.5", "0.25", "0.25", "--out-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert "character '2' (U+0032)" in err and "configs/shakespeare_gpt2bpe_small.toml" in err


def test_empty_split_is_an_error(tmp_path: Path):
    (tmp_path / "few.tsv").write_text("a\tone\nb\ttwo\na\tthree\n")
    with pytest.raises(DataError, match=r"few\.tsv: the val split is empty"):
        finetune_classify(ClassifyConfig(data=str(tmp_path / "few.tsv"), tokenizer="char"),
                          train={"out_dir": str(tmp_path / "r")}, model=TINY, verbose=False)


def test_eval_train_false_scores_only_val_in_fine_tuning(sms_subset: Path, tmp_path: Path):
    """`eval_train = false` holds for every mode: the fine-tuning loop evaluates val alone."""
    out = tmp_path / "run"
    finetune_classify(
        ClassifyConfig(data=str(sms_subset), tokenizer="char", trainable="all", max_length=64, dropout=0.0),
        train={**FAST, "max_steps": 4, "eval_interval": 2, "eval_steps": 1, "out_dir": str(out), "eval_train": False},
        model=TINY, verbose=False,
    )
    rows = list(csv.DictReader((out / "log.csv").open()))
    assert [r["step"] for r in rows if r.get("val_loss")] == ["0", "2", "4"]
    assert not any(v for r in rows for k, v in r.items() if k.startswith("eval_train_"))
