"""The lm-evaluation-harness model: offline local tasks give the same numbers as `scratchgpt eval`."""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("lm_eval")

CHOICE_ROWS = [
    {"context": "The cat sat on the", "choices": ["mat.", "moon quickly.", "xylophone"], "label": 0},
    {"context": "Water is", "choices": ["wet.", "dry."], "label": 1},
    {"context": "Question: what is 2 + 2?\nAnswer:", "choices": ["4", "five", "22"], "label": 0},
    {"context": "She opened the door and", "choices": ["walked in.", "it rained fish.", "sang."], "label": 2},
    {"context": "", "choices": ["Hello there.", "Goodbye."], "label": 0},
]


@pytest.mark.slow
def test_harness_numbers_equal_scratchgpt_eval(tmp_path, tiny_chat_checkpoint, data_dir, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    import lm_eval
    from lm_eval.tasks import TaskManager

    from scratchgpt.checkpoint import load_any
    from scratchgpt.eval.lm_eval_adapter import register
    from scratchgpt.eval.multiple_choice import PRESETS, evaluate_choices, read_choice_items
    from scratchgpt.eval.perplexity import evaluate_perplexity, text_document

    verdict = (data_dir / "text" / "the-verdict.txt").read_text(encoding="utf-8")
    texts = [verdict[:500], verdict[500:1700], "Short one."]
    (tmp_path / "choice.jsonl").write_text("".join(json.dumps(r) + "\n" for r in CHOICE_ROWS))
    (tmp_path / "ppl.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    (tmp_path / "sg_choice.yaml").write_text(f"""task: sg_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {tmp_path / 'choice.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
  - metric: acc_norm
  - metric: acc_bytes
""")
    (tmp_path / "sg_ppl.yaml").write_text(f"""task: sg_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {tmp_path / 'ppl.jsonl'}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
""")
    (tmp_path / "sg_gen.yaml").write_text(f"""task: sg_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {tmp_path / 'choice.jsonl'}
test_split: test
output_type: generate_until
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{choices[0]}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 5
  do_sample: false
metric_list:
  - metric: exact_match
""")
    register()
    out = lm_eval.simple_evaluate(
        model="scratchgpt", model_args=f"checkpoint={tiny_chat_checkpoint},batch_size=3",
        tasks=["sg_choice", "sg_ppl", "sg_gen"], task_manager=TaskManager(include_path=str(tmp_path)),
        log_samples=True)
    harness = out["results"]

    model, tok = load_any(tiny_chat_checkpoint)
    items = read_choice_items(tmp_path / "choice.jsonl", PRESETS["generic"])
    ours = evaluate_choices(model, tok, items, batch_size=2)
    for metric in ("acc", "acc_norm", "acc_bytes"):
        assert harness["sg_choice"][f"{metric},none"] == ours[metric]
    # Per item, the harness's log-likelihoods are ours.
    for sample in out["samples"]["sg_choice"]:
        lls = [r[0] for r in sample["filtered_resps"]]
        assert lls == pytest.approx(ours["per_item"][sample["doc_id"]]["loglikelihoods"], abs=1e-4)

    # Rolling log-likelihood = the perplexity function with stride = context and an end-of-text prefix.
    ppl = evaluate_perplexity(model, tok, [text_document(t, tok) for t in texts], batch_size=2)
    assert harness["sg_ppl"]["byte_perplexity,none"] == pytest.approx(ppl.byte_perplexity, rel=1e-5)
    assert harness["sg_ppl"]["word_perplexity,none"] == pytest.approx(ppl.word_perplexity, rel=1e-5)
    assert harness["sg_ppl"]["bits_per_byte,none"] == pytest.approx(ppl.bits_per_byte, rel=1e-5)
    assert math.isfinite(ppl.bits_per_byte)

    # generate_until: greedy, stopped at the newline, at most 5 tokens.
    from scratchgpt.config import SamplingConfig
    from scratchgpt.inference.generate import generate_text

    gens = {s["doc_id"]: s["resps"][0][0] for s in out["samples"]["sg_gen"]}
    for i, row in enumerate(CHOICE_ROWS[:4]):
        expected = generate_text(model, tok, row["context"], SamplingConfig(max_new_tokens=5, temperature=0.0,
                                                                            stop=("\n",)))
        assert gens[i] == expected
