"""scratchgpt.eval: perplexity, multiple choice, classifier metrics, reports, suites and the `eval` command."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from scratchgpt import GPT, GPTConfig
from scratchgpt.checkpoint import save_model
from scratchgpt.data.sources import DataError
from scratchgpt.data.tokenizers import CharTokenizer
from scratchgpt.eval.classify_eval import classification_metrics
from scratchgpt.eval.multiple_choice import (
    PRESETS,
    ChoiceFields,
    encode_pair,
    evaluate_choices,
    read_choice_items,
    score_requests,
)
from scratchgpt.eval.perplexity import evaluate_perplexity, head_scores, text_document, windows

# ---------------------------------------------------------------------------------------------
# Models: random, uniform, and small ones trained here for a few dozen steps
# ---------------------------------------------------------------------------------------------


def tiny(vocab: int, n_ctx: int = 32, seed: int = 0, n_embd: int = 32) -> GPT:
    config = GPTConfig(vocab_size=vocab, n_positions=n_ctx, n_embd=n_embd, n_layer=2, n_head=2,
                       embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)
    return GPT(config, generator=torch.Generator().manual_seed(seed)).eval()


def train_on(model: GPT, ids: list[int], *, steps: int, block: int, lr: float = 3e-3, seed: int = 0) -> GPT:
    """A plain Adam loop on random windows of `ids` (enough for memorising or learning char statistics)."""
    g = torch.Generator().manual_seed(seed)
    data = torch.tensor(ids)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(data) - block - 1, (16,), generator=g)
        x = torch.stack([data[s : s + block] for s in starts])
        y = torch.stack([data[s + 1 : s + block + 1] for s in starts])
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def shakespeare_model(tiny_shakespeare: str):
    """A char model trained to (nearly) memorise 800 characters of Tiny Shakespeare, and that text.

    Memorised text rewards context: one character rarely tells where in the passage we are, thirty do.
    """
    torch.manual_seed(0)
    text = tiny_shakespeare[:600]
    tok = CharTokenizer.train(tiny_shakespeare[:40_000])
    model = train_on(tiny(tok.vocab_size, n_ctx=32, n_embd=48), tok.encode(text), steps=150, block=32)
    return model, tok, text


# ---------------------------------------------------------------------------------------------
# Perplexity
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "context", "stride", "prefix"), [(50, 8, 8, None), (50, 8, 3, 7), (5, 8, 2, 7),
                                                                (9, 8, 1, None), (1, 4, 4, 7)])
def test_windows_score_every_token_once_with_enough_context(n, context, stride, prefix):
    tokens = np.arange(100, 100 + n)
    seq = ([prefix] if prefix is not None else []) + tokens.tolist()
    scored = []
    for x, y in windows(tokens, context=context, stride=stride, prefix=prefix):
        assert len(x) == len(y) <= context
        for j, target in enumerate(y):
            if target != -100:
                pos = seq.index(target)  # tokens are distinct
                assert x[j] == seq[pos - 1]  # predicted from the token just before it
                # Every token after the first window sees at least context - stride tokens before it.
                assert j + 1 >= min(pos, context - stride + 1)
                scored.append(target)
    assert scored == seq[1:]


def test_uniform_logits_give_exactly_ln_v(tmp_path):
    model = tiny(vocab=97)
    with torch.no_grad():
        model.config.tie_word_embeddings = False
        model.lm_head.weight = torch.nn.Parameter(torch.zeros_like(model.lm_head.weight))  # every logit 0
    ids = np.random.RandomState(0).randint(0, 97, 300)
    res = evaluate_perplexity(model, None, ids, context=32, stride=7, batch_size=3, prefix_eot=False)
    assert res.tokens == 299
    assert res.loss == pytest.approx(math.log(97), abs=1e-6)
    assert res.ppl == pytest.approx(97, rel=1e-5)


def test_stride_equal_to_context_is_the_non_overlapping_mean():
    model = tiny(vocab=50, n_ctx=16)
    ids = np.random.RandomState(1).randint(0, 50, 1 + 16 * 5)
    res = evaluate_perplexity(model, None, ids, context=16, batch_size=2, prefix_eot=False)
    seq = torch.tensor(ids)
    x = seq[:-1].view(5, 16)
    y = seq[1:].view(5, 16)
    with torch.no_grad():
        logits, _ = model(x)
    expected = F.cross_entropy(logits.flatten(0, 1), y.flatten()).item()
    assert res.tokens == 80 and res.windows == 5
    assert res.loss == pytest.approx(expected, abs=1e-6)
    # Batching changes nothing.
    assert evaluate_perplexity(model, None, ids, context=16, batch_size=5, prefix_eot=False).loss == pytest.approx(
        res.loss, abs=1e-6)


@pytest.mark.slow
def test_smaller_stride_is_never_worse_on_a_trained_model(shakespeare_model):
    model, tok, held_out = shakespeare_model
    doc = text_document(held_out, tok)
    full = evaluate_perplexity(model, tok, doc, context=32, stride=32, batch_size=16)
    assert full.loss < math.log(tok.vocab_size) - 1.0  # it did learn something
    # Overlapping windows give each scored token at least 16 (or 24) characters of history; without
    # overlap the first tokens of every window have almost none.
    for stride in (16, 8):
        assert evaluate_perplexity(model, tok, doc, context=32, stride=stride, batch_size=16).loss < full.loss
    # Bits per byte: total nats / ln 2 / bytes (this text is ASCII: one byte per char token, plus the
    # first token, predicted after the end-of-text prefix).
    assert full.bytes == len(held_out.encode()) and full.tokens == len(held_out)
    assert full.bits_per_byte == pytest.approx(full.nll_sum / math.log(2) / full.bytes)


def test_perplexity_reads_text_folders_and_prepared_token_files(tmp_path, char_data):
    from scratchgpt.data.token_files import open_dataset

    ds = open_dataset(char_data)
    tok = ds.tokenizer()
    model = tiny(tok.vocab_size, n_ctx=32)
    from_bin = evaluate_perplexity(model, tok, char_data / "val.bin", context=32, prefix_eot=False, batch_size=8)
    from_dir = evaluate_perplexity(model, tok, char_data, context=32, prefix_eot=False, batch_size=8)
    tokens = np.asarray(ds.tokens("val"), dtype=np.int64)
    from_ids = evaluate_perplexity(model, tok, tokens, context=32, prefix_eot=False, batch_size=8)
    assert from_bin.loss == from_dir.loss == pytest.approx(from_ids.loss, abs=1e-9)
    assert from_bin.tokens == len(tokens) - 1 and from_bin.bytes == len(tok.decode_bytes(tokens.tolist()))

    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("First Citizen:\nBefore we proceed")
    (tmp_path / "texts" / "b.txt").write_text("All:\nSpeak, speak.")
    res = evaluate_perplexity(model, tok, tmp_path / "texts", context=32, batch_size=8)
    assert res.documents == 2 and res.tokens == len("First Citizen:\nBefore we proceed") + len("All:\nSpeak, speak.")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="empty.txt: empty"):
        evaluate_perplexity(model, tok, tmp_path / "empty.txt")
    (tmp_path / "one.txt").write_text("A")
    with pytest.raises(DataError, match="one.txt: 1 token"):
        evaluate_perplexity(model, tok, tmp_path / "one.txt", prefix_eot=False)


# ---------------------------------------------------------------------------------------------
# Multiple choice
# ---------------------------------------------------------------------------------------------


def test_perplexity_refuses_token_files_of_another_tokenizer(tmp_path, char_data, gpt2_tokenizer, capsys):
    # Before: a GPT-2 BPE checkpoint scored the character ids of shakespeare_char/val.bin and printed a
    # meaningless loss with exit 0, though the folder's meta.json and tokenizer.json name its tokenizer.
    from scratchgpt.cli import main

    config = GPTConfig(vocab_size=gpt2_tokenizer.vocab_size, n_positions=32, n_embd=8, n_layer=1, n_head=1)
    run = save_model(GPT(config, generator=torch.Generator().manual_seed(0)), tmp_path / "bpe-run",
                     tokenizer=gpt2_tokenizer)
    argv = ["eval", "perplexity", "--checkpoint", str(run), "--out-dir", str(tmp_path / "reports"),
            "--progress", "false"]
    for data in (char_data / "val.bin", char_data):
        assert main([*argv, "--data", str(data)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1
        assert f"{char_data} was prepared with a 'char' tokenizer" in err and "'gpt2' tokenizer" in err
        assert "pass the text itself to --data" in err
    assert not (tmp_path / "reports").exists()


def reference_logprob(model: GPT, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    """lm-evaluation-harness's HF recipe: one full forward of (context + continuation)[:-1], last tokens scored."""
    n = model.config.n_positions
    whole = (ctx + cont)[-(n + 1) :]
    with torch.no_grad():
        logits, _ = model(torch.tensor(whole[:-1])[None])
    lp = F.log_softmax(logits[0, -len(cont) :].double(), dim=-1)
    target = torch.tensor(cont)
    return lp.gather(1, target[:, None]).sum().item(), bool((lp.argmax(-1) == target).all())


def test_shared_prefix_scoring_equals_one_forward_per_request():
    model = tiny(vocab=60, n_ctx=24)
    g = torch.Generator().manual_seed(3)
    requests = []
    for _ in range(9):
        ctx = torch.randint(0, 60, (int(torch.randint(1, 15, (1,), generator=g)),), generator=g).tolist()
        for _ in range(int(torch.randint(1, 5, (1,), generator=g))):
            requests.append((ctx, torch.randint(0, 60, (int(torch.randint(1, 7, (1,), generator=g)),),
                                                generator=g).tolist()))
    requests.append(([5] * 30, [1, 2, 3]))  # longer than the window: the context keeps its last tokens
    requests.append(([7], [7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7]))  # fills it
    for batch_size in (1, 4, 64):
        got = score_requests(model, requests, batch_size=batch_size)
        for req, (lp, greedy) in zip(requests, got, strict=True):
            ref_lp, ref_greedy = reference_logprob(model, list(req[0]), list(req[1]))
            assert lp == pytest.approx(ref_lp, abs=1e-4)
            assert greedy == ref_greedy


@pytest.mark.parametrize("rows", [1, 4, 64])
def test_head_scores_equal_one_log_softmax_over_all_positions(rows):
    model = tiny(vocab=60).eval()
    x = torch.randint(0, 60, (3, 11), generator=torch.Generator().manual_seed(1))
    targets = torch.randint(0, 60, (33,), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits, _ = model(x)
        hidden = model.hidden_states(x).flatten(0, 1)  # (33, C): 33 is no multiple of 4 or 64
        nll, hit = head_scores(model, hidden, targets, rows=rows, greedy=True)
    lp = F.log_softmax(logits.flatten(0, 1).double(), dim=-1)
    assert torch.allclose(nll.double(), -lp.gather(1, targets[:, None])[:, 0], atol=1e-5)
    assert torch.equal(hit, lp.argmax(-1) == targets)
    targets[0] = lp[0].argmax()  # one sure hit, so the greedy check is not vacuous
    assert head_scores(model, hidden, targets, rows=rows, greedy=True)[1][0]


def test_encode_pair_splits_like_lm_eval(gpt2_tokenizer):
    tok = gpt2_tokenizer
    ctx, cont = encode_pair(tok, "Question: capital of France?\nAnswer: ", "Paris")
    whole = tok.encode("Question: capital of France?\nAnswer: Paris")
    assert ctx + cont == whole and tok.decode(cont) == " Paris"
    ctx, cont = encode_pair(tok, "", "Hello world")
    assert ctx == [tok.eot_id] and cont == tok.encode("Hello world")


MEMO = [
    {"context": "the sky is", "choices": ["green", "blue", "loud"], "label": 1},
    {"context": "grass is", "choices": ["green", "salty", "blue"], "label": 0},
    {"context": "fire is", "choices": ["cold", "wet", "hot"], "label": 2},
    {"context": "snow is", "choices": ["white", "hot", "loud"], "label": 0},
    {"context": "the sea is", "choices": ["dry", "salty", "green"], "label": 1},
    {"context": "a drum is", "choices": ["quiet", "white", "loud"], "label": 2},
]


@pytest.fixture(scope="module")
def memorised():
    """A char model trained to memorise 'context gold' lines, and its tokenizer."""
    torch.manual_seed(0)
    lines = [f"{r['context']} {r['choices'][r['label']]}." for r in MEMO]
    tok = CharTokenizer.train("".join(lines) + "".join(c for r in MEMO for c in r["choices"]))
    ids = []
    for _ in range(40):
        for i in torch.randperm(len(lines)).tolist():
            ids += tok.encode(lines[i]) + [tok.eot_id]
    model = train_on(tiny(tok.vocab_size, n_ctx=32, n_embd=64), ids, steps=250, block=31, lr=3e-3)
    return model, tok


@pytest.mark.slow
def test_memorised_task_is_answered_right(memorised, tmp_path):
    model, tok = memorised
    path = tmp_path / "memo.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in MEMO))
    items = read_choice_items(path, PRESETS["generic"])
    res = evaluate_choices(model, tok, items, batch_size=4)
    assert res["acc"] == 1.0 and res["acc_bytes"] == 1.0 and res["items"] == len(MEMO)
    assert res["acc_stderr"] == 0.0
    # The per-item log-likelihoods are the summed log-probabilities of each choice given the context.
    first = res["per_item"][0]
    ctx, cont = encode_pair(tok, "the sky is", " blue")
    assert first["loglikelihoods"][1] == pytest.approx(reference_logprob(model, ctx, cont)[0], abs=1e-4)
    # Shuffled gold labels: accuracy drops to what the model's preference gives (never 1.0).
    wrong = [dict(r, label=(r["label"] + 1) % 3) for r in MEMO]
    path.write_text("".join(json.dumps(r) + "\n" for r in wrong))
    assert evaluate_choices(model, tok, read_choice_items(path, PRESETS["generic"]))["acc"] == 0.0


def test_presets_read_hellaswag_arc_and_piqa_layouts(tmp_path):
    rows = {
        "hellaswag": {"ctx": "A man sits down", "endings": ["and eats.", "and flies.", "x", "y"], "label": "1"},
        "arc": {"question": "What is H2O?", "choices": {"text": ["salt", "water"], "label": ["A", "B"]},
                "answerKey": "B"},
        "piqa": {"goal": "Open a jar", "sol1": "twist the lid", "sol2": "eat the lid", "label": 0},
    }
    expected = {"hellaswag": ("A man sits down", 4, 1), "arc": ("Q: What is H2O?", 2, 1), "piqa": ("Open a jar", 2, 0)}
    for name, row in rows.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text(json.dumps(row) + "\n")
        template = "Q: {context}" if name == "arc" else "{context}"
        (item,) = read_choice_items(path, PRESETS[name], template=template)
        assert (item.context, len(item.choices), item.gold) == expected[name]


@pytest.mark.parametrize(("content", "fields", "message"), [
    ('{"context": "a", "choices": ["b", "c"]}\n', ChoiceFields(), "line 1: no 'label' field"),
    ('{"context": "a", "choices": ["b", "c"], "label": 2}\n', ChoiceFields(), "gold index 2 is out of range"),
    ('{"context": "a", "choices": ["b", "c"], "label": -1}\n', ChoiceFields(), "gold index -1 is out of range"),
    ('{"context": "a", "choices": ["b"], "label": 0}\n', ChoiceFields(), "at least two strings"),
    ('{"context": "a", "choices": ["b", ""], "label": 0}\n', ChoiceFields(), "empty choice"),
    ("\n\n", ChoiceFields(), "no items"),
    ('{"question": "q", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "E"}\n', PRESETS["arc"],
     "label 'E' is not one of the choice labels"),
    ("not json\n", ChoiceFields(), "line 1: not valid JSON"),
])
def test_bad_task_files_fail_with_one_clear_line(tmp_path, content, fields, message):
    path = tmp_path / "task.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        read_choice_items(path, fields)


# ---------------------------------------------------------------------------------------------
# Classifier metrics
# ---------------------------------------------------------------------------------------------


def test_classification_metrics_by_hand():
    gold = ["ham", "ham", "ham", "spam", "spam", "ham"]
    pred = ["ham", "spam", "ham", "spam", "ham", "ham"]
    m = classification_metrics(gold, pred, ["ham", "spam"])
    assert m["confusion"] == [[3, 1], [1, 1]]
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["per_class"]["ham"] == pytest.approx({"precision": 0.75, "recall": 0.75, "f1": 0.75, "support": 4})
    assert m["per_class"]["spam"] == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2})
    assert m["macro_f1"] == pytest.approx(0.625)


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory, gpt2_tokenizer):
    from scratchgpt.training.finetune import add_classification_head

    model = tiny(gpt2_tokenizer.vocab_size, n_ctx=32)
    add_classification_head(model, 2, generator=torch.Generator().manual_seed(0))
    info = {"task": "classification", "classifier": {"labels": ["ham", "spam"], "num_classes": 2, "head": "linear",
                                                     "pooling": "last_token", "max_length": 32}}
    return save_model(model, tmp_path_factory.mktemp("clf"), tokenizer=gpt2_tokenizer, extra=info)


def test_classifier_eval_matches_scratchgpt_classify(classifier_dir, tmp_path):
    from scratchgpt.eval.classify_eval import evaluate_classifier_file
    from scratchgpt.training.modes.classify import classify_texts, load_classifier

    rows = [("ham", "see you at lunch"), ("spam", "WIN a FREE prize now"), ("ham", "ok thanks"),
            ("spam", "claim your reward, text 8080"), ("ham", "running late, sorry")]
    path = tmp_path / "sms.tsv"
    path.write_text("".join(f"{label}\t{text}\n" for label, text in rows))
    res = evaluate_classifier_file(classifier_dir, path)
    model, tok, labels = load_classifier(classifier_dir)
    pred = [r["label"] for r in classify_texts(model, tok, [t for _, t in rows], labels)]
    timing = {k: res.pop(k) for k in ("seconds", "texts_per_s")}
    assert timing["seconds"] > 0
    assert res == classification_metrics([g for g, _ in rows], pred, labels)
    path.write_text("ham\tfine\nmaybe\tunknown label\n")
    with pytest.raises(DataError, match=r"label\(s\) \['maybe'\] are not among"):
        evaluate_classifier_file(classifier_dir, path)


# ---------------------------------------------------------------------------------------------
# The command: one task, a suite, bad input
# ---------------------------------------------------------------------------------------------


def run_cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scratchgpt", "eval", *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


@pytest.fixture(scope="module")
def memorised_dir(memorised, tmp_path_factory):
    model, tok = memorised
    return save_model(model, tmp_path_factory.mktemp("memo"), tokenizer=tok)


@pytest.mark.slow
def test_cli_suite_writes_reports_and_prints_the_table(memorised, memorised_dir, tmp_path):
    model, tok = memorised
    task = tmp_path / "memo.jsonl"
    task.write_text("".join(json.dumps({"q": r["context"], "opts": r["choices"], "gold": r["label"]}) + "\n"
                            for r in MEMO))
    text = tmp_path / "held.txt"
    text.write_text("the sky is blue. fire is hot.")
    suite = tmp_path / "suite.toml"
    suite.write_text(f"""
[eval]
checkpoint = "{memorised_dir}"
out_dir = "{tmp_path / 'reports'}"
batch_size = 2
progress = false

[[perplexity]]
data = ["{text}"]
stride = 8

[[choice]]
data = "{task}"
context_field = "q"
choices_field = ["opts"]
label_field = "gold"
name = "memo-task"
""")
    proc = run_cli("-c", str(suite))
    assert proc.returncode == 0, proc.stderr
    assert "| choice | memo.jsonl | acc | 1.0000 |" in proc.stdout
    choice = json.loads((tmp_path / "reports" / "memo-task.json").read_text())
    ppl = json.loads((tmp_path / "reports" / "perplexity-held.json").read_text())
    assert choice["results"]["acc"] == 1.0 and choice["settings"]["label_field"] == "gold"
    assert choice["versions"]["torch"] == torch.__version__ and choice["model"]["parameters"] == model.num_parameters()
    direct = evaluate_perplexity(model, tok, [text], context=32, stride=8)
    assert ppl["results"]["loss"] == pytest.approx(direct.loss, abs=1e-9)
    assert ppl["results"]["bits_per_byte"] == pytest.approx(direct.bits_per_byte, abs=1e-9)
    assert (tmp_path / "reports" / "memo-task.md").read_text().count("| choice |") == 5


@pytest.fixture(scope="module")
def random_dir(tmp_path_factory):
    tok = CharTokenizer("abcdefghijklmnopqrstuvwxyz .,")
    return save_model(tiny(tok.vocab_size), tmp_path_factory.mktemp("random"), tokenizer=tok)


def test_cli_task_config_file_and_flags(random_dir, tmp_path):
    """`scratchgpt eval TASK -c FILE.toml`: [eval] and [TASK] tables fill the configs, flags override them."""
    text = tmp_path / "t.txt"
    text.write_text("abc def. ghi, jkl mno pqr stu vwx yz abc def ghi")
    cfg = tmp_path / "ppl.toml"
    cfg.write_text(f'[eval]\ncheckpoint = "{random_dir}"\ndevice = "cpu"\nout_dir = "{tmp_path / "r"}"\n'
                   f'[perplexity]\ndata = ["{text}"]\ncontext = 16\nstride = 4\n')
    proc = run_cli("perplexity", "-c", str(cfg), "--stride", "8", "--progress", "false")
    assert proc.returncode == 0, proc.stderr
    rep = json.loads((tmp_path / "r" / "perplexity-t.json").read_text())
    assert rep["settings"]["context"] == 16 and rep["settings"]["stride"] == 8 and rep["results"]["stride"] == 8
    assert rep["results"]["tokens"] == len(text.read_text())
    cfg.write_text('[eval]\ncheckpoint = "x"\n[choice]\ndata = "y"\n')
    proc = run_cli("perplexity", "-c", str(cfg))
    assert proc.returncode == 2 and "unknown table(s) ['choice']" in proc.stderr


def test_cli_bad_input_is_one_line_and_exit_2(random_dir, tmp_path):
    memorised_dir = random_dir
    task = tmp_path / "bad.jsonl"
    task.write_text('{"context": "a", "choices": ["b", "c"], "label": 7}\n')
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    cases = [
        (["choice", "--checkpoint", str(memorised_dir), "--data", str(task)], "gold index 7 is out of range"),
        (["perplexity", "--checkpoint", str(memorised_dir), "--data", str(empty)], "empty (0 tokens)"),
        (["perplexity", "--checkpoint", str(memorised_dir), "--data", str(tmp_path / "missing.txt")], "missing.txt"),
        ([], "nothing to evaluate"),
    ]
    for args, message in cases:
        proc = run_cli(*args, "--out-dir", str(tmp_path / "r")) if args else run_cli()
        assert proc.returncode == 2, (args, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0] and lines[0].startswith("scratchgpt eval: error:"), lines


def test_cli_perplexity_with_int8_weights_stays_close_to_float32(random_dir, tmp_path):
    """`scratchgpt eval perplexity --quantize int8`: issue 11's quality check runs through this eval."""
    text = tmp_path / "t.txt"
    text.write_text("abc def. ghi, jkl mno pqr stu vwx yz abc def ghi " * 4)
    losses = {}
    for quant in (None, "int8"):
        out = tmp_path / f"r-{quant}"
        extra = ["--quantize", quant] if quant else []
        proc = run_cli("perplexity", "--checkpoint", str(random_dir), "--data", str(text), "--device", "cpu",
                       "--out-dir", str(out), "--progress", "false", *extra)
        assert proc.returncode == 0, proc.stderr
        rep = json.loads((out / "perplexity-t.json").read_text())
        assert rep["settings"]["quantize"] == quant
        losses[quant] = rep["results"]["loss"]
    assert losses["int8"] != losses[None]  # the int8 path really ran
    assert abs(losses["int8"] - losses[None]) / losses[None] < 0.01
