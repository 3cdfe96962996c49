"""DPO: the loss against hand-computed values, sequence log-probabilities, collation, a tiny run."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

from scratchgpt.checkpoint import load_any, saved_chat_template
from scratchgpt.config import DPOConfig
from scratchgpt.data.sources import DataError
from scratchgpt.training.modes.dpo import (
    PreferencePair,
    collate_preferences,
    dpo_loss,
    encode_preferences,
    finetune_dpo,
    sequence_logprobs,
)

TINY = dict(n_embd=32, n_layer=2, n_head=4, n_positions=256)


def test_dpo_loss_matches_hand_computed_values():
    # Pair 1: β=0.1, policy (c, r) = (-1, -2), reference (-1.5, -1.5): β·((−1+1.5) − (−2+1.5)) = 0.1.
    # Pair 2: policy (-3, -1), reference (-2, -2): 0.1·((−3+2) − (−1+2)) = −0.2.
    pc, pr = torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -1.0])
    rc, rr = torch.tensor([-1.5, -2.0]), torch.tensor([-1.5, -2.0])
    loss, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta=0.1)
    expected = (math.log1p(math.exp(-0.1)) + math.log1p(math.exp(0.2))) / 2  # -log σ(z) = log(1 + e^-z)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert loss.item() == pytest.approx((0.6443967 + 0.7981389) / 2, abs=1e-6)
    assert chosen.tolist() == pytest.approx([0.05, -0.1]) and rejected.tolist() == pytest.approx([-0.05, 0.1])
    # Equal policy and reference: margin 0, loss log 2.
    assert dpo_loss(pc, pr, pc, pr, beta=0.5)[0].item() == pytest.approx(math.log(2))


def test_sequence_logprobs_sum_and_mean_over_answer_tokens():
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]]]))  # (1, 3, V=3)
    targets = torch.tensor([[-100, 1, 2]])  # the first position is prompt: not counted
    total = sequence_logprobs(logits, targets)
    assert total.item() == pytest.approx(math.log(0.8) + math.log(0.6), abs=1e-6)
    assert sequence_logprobs(logits, targets, reduction="mean").item() == pytest.approx(total.item() / 2, abs=1e-6)
    with pytest.raises(ValueError, match="reduction"):
        sequence_logprobs(logits, targets, reduction="max")


def test_collate_puts_chosen_first_and_masks_prompt_and_padding():
    pair = PreferencePair(chosen=[1, 2, 3, 9], rejected=[1, 2, 4, 5, 9], prompt_len=2, entry=0,
                          ref_chosen=-1.0, ref_rejected=-2.0)
    batch = collate_preferences([pair], pad_id=9)
    assert batch["x"].tolist() == [[1, 2, 3, 9], [1, 2, 4, 5]]
    assert batch["y"].tolist() == [[-100, 3, 9, -100], [-100, 4, 5, 9]]
    assert batch["ref"].tolist() == [-1.0, -2.0]


@pytest.fixture(scope="module")
def toy_preferences(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """80 prompts whose chosen answer is polite and rejected one rude."""
    rng = random.Random(0)
    words = ["apple", "river", "stone", "cloud", "green", "light", "music", "table"]
    entries = [{"instruction": f"Name a word like {w}.", "input": "", "output": w,
                "chosen": f"Sure, {w}.", "rejected": f"No. {w}, ugh."} for w in (rng.choice(words) for _ in range(80))]
    path = tmp_path_factory.mktemp("dpo") / "prefs.json"
    path.write_text(json.dumps(entries))
    return path


@pytest.mark.slow  # a whole run: CI runs it (scripts/test.sh); the default suite skips it
@pytest.mark.parametrize(("logp", "dtype"), [("sum", "auto"), ("mean", "auto"), ("sum", "bf16-true")])
def test_tiny_dpo_run_raises_val_preference_accuracy(toy_preferences: Path, tmp_path: Path, logp, dtype):
    result = finetune_dpo(
        DPOConfig(data=str(toy_preferences), tokenizer="char", logp=logp, beta=0.5, split=(0.7, 0.3, 0.0)),
        train=dict(out_dir=str(tmp_path / "dpo"), max_steps=15, lr=3e-3, batch_size=8, eval_interval=0,
                   progress=False, plot=False, dtype=dtype), model=TINY, verbose=False,
    )
    start, end = result.metrics["start"]["val"], result.metrics["val"]
    # Before any update the policy is the reference: every margin is exactly 0 (with bf16-true too: the
    # reference is computed on the model as the loop trains it, bf16 weights included).
    assert start["margin"] == 0.0 and start["accuracy"] == 0.0 and start["loss"] == pytest.approx(math.log(2))
    assert end["accuracy"] > start["accuracy"] and end["margin"] > 0 and end["loss"] < start["loss"]
    saved = json.loads((tmp_path / "dpo" / "config.json").read_text())
    assert saved["task"] == "dpo" and saved["dpo"] == {"beta": 0.5, "logp": logp}


def test_missing_rejected_is_an_error_naming_the_entry(tmp_path: Path):
    (tmp_path / "p.json").write_text('[{"instruction": "a", "chosen": "b", "rejected": "c"}, '
                                     '{"instruction": "a", "chosen": "b"}]')
    with pytest.raises(DataError, match=r"p\.json: entry 1: no 'rejected'"):
        finetune_dpo(DPOConfig(data=str(tmp_path / "p.json"), tokenizer="char"), model=TINY, verbose=False)


# The model's own chat template ("tokenizer"), on a Hugging Face folder built at test time.


@pytest.fixture(scope="module")
def chat_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from test_chat_session import CHATML, make_folder

    return make_folder(tmp_path_factory.mktemp("hf-chatml"), CHATML)


def test_tokenizer_template_pairs_share_the_prompt_and_differ_after_it(chat_folder: Path):
    tok = load_any(chat_folder)[1]
    entry = {"instruction": "Name a word.", "input": "", "chosen": "Sure, apple.", "rejected": "No.",
             "where": "p.json: entry 0", "index": 0}
    (pair,) = encode_preferences([entry], tok, template="tokenizer", vocab_size=128, max_length=100)
    im_end, nl = tok.encode("<|im_end|>", allowed_special=True)[0], tok.encode("\n")[0]
    prompt = tok.encode_chat([{"role": "user", "content": "Name a word."}])  # what chat sends
    assert pair.chosen[: pair.prompt_len] == pair.rejected[: pair.prompt_len] == prompt
    assert pair.chosen[pair.prompt_len :] == [*tok.encode("Sure, apple."), im_end, nl]
    assert pair.rejected[pair.prompt_len :] == [*tok.encode("No."), im_end, nl]
    y = collate_preferences([pair], pad_id=tok.eot_id)["y"]
    # Only the answers count, each with its end-of-turn marker.
    assert [[t for t in row if t != -100] for row in y.tolist()] == [pair.chosen[pair.prompt_len :],
                                                                     pair.rejected[pair.prompt_len :]]


def test_dpo_in_the_tokenizer_template_learns_and_records_it(chat_folder: Path, toy_preferences: Path,
                                                            tmp_path: Path):
    result = finetune_dpo(  # "auto" on a folder with a chat template is "tokenizer"
        DPOConfig(data=str(toy_preferences), init=str(chat_folder), beta=0.5, split=(0.7, 0.3, 0.0)),
        train=dict(out_dir=str(tmp_path / "dpo"), max_steps=10, lr=3e-3, batch_size=8, eval_interval=0,
                   progress=False, plot=False), verbose=False,
    )
    start, end = result.metrics["start"]["val"], result.metrics["val"]
    assert start["loss"] == pytest.approx(math.log(2)) and end["loss"] < start["loss"] and end["margin"] > 0
    saved = json.loads((tmp_path / "dpo" / "config.json").read_text())
    assert saved["task"] == "dpo" and saved["chat_template"] == "tokenizer"
    assert saved_chat_template(tmp_path / "dpo", tokenizer=load_any(tmp_path / "dpo")[1]) == "tokenizer"


def test_tokenizer_template_without_one_is_a_one_line_error(toy_preferences: Path):
    with pytest.raises(ValueError, match=r"^scratch: the 'tokenizer' chat template needs .*choose alpaca or chatml$"):
        finetune_dpo(DPOConfig(data=str(toy_preferences), tokenizer="char", template="tokenizer"), model=TINY,
                     verbose=False)
