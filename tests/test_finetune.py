"""What every fine-tuning mode shares: splits, example batches, freezing, the start model, resume, LoRA runs."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from scratchgpt.checkpoint import load_model
from scratchgpt.cli import main
from scratchgpt.config import ClassifyConfig, DPOConfig, FinetuneConfig, GPTConfig, InstructConfig, LoRAConfig
from scratchgpt.model.gpt import GPT
from scratchgpt.tensor_files import CheckpointError
from scratchgpt.training.finetune import (
    ExampleBatches,
    load_start_model,
    resolve_train_config,
    set_dropout,
    set_trainable,
    split_indices,
    train_config,
)
from scratchgpt.training.lora import apply_lora
from scratchgpt.training.modes.classify import finetune_classify

TINY = dict(n_embd=32, n_layer=2, n_head=4, n_positions=64)


def tiny_gpt() -> GPT:
    return GPT(GPTConfig(vocab_size=40, n_positions=16, n_embd=32, n_layer=2, n_head=4),
               generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def toy_tsv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = random.Random(0)
    lines = []
    for _ in range(120):
        label = rng.choice(["pos", "neg"])
        words = ["sun", "joy", "warm"] if label == "pos" else ["rain", "sad", "cold"]
        lines.append(label + "\t" + " ".join(rng.choice(words + ["the", "a"]) for _ in range(rng.randint(2, 8))))
    path = tmp_path_factory.mktemp("toy") / "toy.tsv"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_split_indices_cover_every_entry_once():
    splits = split_indices(1494, (0.7, 0.1, 0.2), seed=123)
    assert [len(splits[k]) for k in ("train", "val", "test")] == [1045, 149, 300]
    assert sorted(sum(splits.values(), [])) == list(range(1494))
    assert split_indices(10, (0.5, 0.2, 0.3), shuffle=False)["train"] == [0, 1, 2, 3, 4]
    partial = split_indices(100, (0.5, 0.1, 0.1))  # fractions below 1 leave the rest unused
    assert [len(partial[k]) for k in ("train", "val", "test")] == [50, 10, 10]


def test_split_fractions_are_validated():
    with pytest.raises(ValueError, match="three fractions"):
        FinetuneConfig(split=(0.5, 0.5))
    with pytest.raises(ValueError, match="sum to <= 1"):
        FinetuneConfig(split=(0.8, 0.2, 0.2))


def test_example_batches_visit_every_example_once_per_epoch_and_resume_exactly():
    batches = ExampleBatches(list(range(10)), list, batch_size=4, seed=3)
    seen = [batches.next_batch() for _ in range(5)]  # 20 examples = two epochs
    flat = sum(seen, [])
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))
    state = json.loads(json.dumps(batches.state_dict()))  # JSON-able
    expected = [batches.next_batch() for _ in range(3)]
    resumed = ExampleBatches(list(range(10)), list, batch_size=4, seed=0)
    resumed.load_state_dict(state)
    assert [resumed.next_batch() for _ in range(3)] == expected
    with pytest.raises(ValueError, match="same data"):
        ExampleBatches(list(range(11)), list, batch_size=4).load_state_dict(state)


def test_example_batches_shard_the_global_batch_across_ranks():
    whole = ExampleBatches(list(range(12)), list, batch_size=4, seed=1, rank=0, world_size=1)
    ranks = [ExampleBatches(list(range(12)), list, batch_size=2, seed=1, rank=r, world_size=2) for r in (0, 1)]
    for _ in range(4):
        assert whole.next_batch() == ranks[0].next_batch() + ranks[1].next_batch()


@pytest.mark.parametrize("trainable", ["all", "last-block", "head", "lora"])
def test_set_trainable_freezes_the_rest(trainable):
    model = tiny_gpt()
    if trainable == "lora":
        apply_lora(model, LoRAConfig(rank=2))
    params = set_trainable(model, trainable)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {id(p) for p in params} == {id(p) for p in model.parameters() if p.requires_grad}
    if trainable == "all":
        assert len(names) == len(list(model.parameters()))
    elif trainable == "last-block":
        assert names and all(n.startswith(("transformer.h.1.", "transformer.ln_f.", "transformer.wte")) for n in names)
    elif trainable == "head":
        assert names == {"transformer.wte.weight"}  # the tied LM head is the embedding matrix
    else:
        assert names and all(".lora_" in n for n in names)


def test_set_dropout_reaches_modules_and_config():
    model = tiny_gpt()
    set_dropout(model, 0.0)
    assert model.config.attn_pdrop == model.config.resid_pdrop == model.config.embd_pdrop == 0.0
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    assert model.transformer.h[0].attn.attn_pdrop == 0.0


def test_epochs_set_max_steps_unless_given():
    def steps(cfg, **train):
        return resolve_train_config(cfg, train_config(cfg, train), n_train=n).max_steps

    n = 100
    assert steps(ClassifyConfig(), batch_size=8) == 63  # the mode's 5 epochs
    assert steps(ClassifyConfig(epochs=2), batch_size=8, grad_accum_steps=2) == 13
    assert steps(ClassifyConfig(), max_steps=7) == 7  # given: it wins
    n = 935
    assert steps(InstructConfig(), batch_size=8) == 234  # the mode's 2 epochs


def test_each_mode_trains_with_its_own_defaults():
    # The defaults live on the mode's config: what --help shows is what a run gets.
    classify, dpo = train_config(ClassifyConfig()), train_config(DPOConfig())
    assert (classify.lr, classify.batch_size, classify.max_steps, classify.out_dir) == (
        5e-5, 8, None, "runs/finetune-classify")
    assert (dpo.lr, dpo.weight_decay, dpo.eval_interval) == (5e-6, 0.01, 25)
    assert ClassifyConfig.default_trainable == "last-block" and InstructConfig.default_trainable == "all"
    assert train_config(InstructConfig(), {"lr": 1e-4}).lr == 1e-4
    with pytest.raises(ValueError, match="train settings.*unknown"):
        train_config(InstructConfig(), {"learning_rate": 1e-4})


def test_start_model_errors_are_one_line(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="no such checkpoint directory"):
        load_start_model(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="shape a scratch model"):
        load_start_model("gpt2", model_overrides={"n_layer": 2})


def test_classifier_is_not_a_start_model(toy_tsv: Path, tmp_path: Path):
    out = tmp_path / "cls"
    finetune_classify(ClassifyConfig(data=str(toy_tsv), tokenizer="char"),
                      train={"out_dir": str(out), "max_steps": 1, "eval_interval": 0, "progress": False,
                             "plot": False}, model=TINY, verbose=False)
    with pytest.raises(CheckpointError, match="is a classifier"):
        load_start_model(str(out))


def test_resume_continues_exactly(toy_tsv: Path, tmp_path: Path):
    """A run stopped at its step-2 checkpoint and resumed ends with the same weights as one run straight through."""
    train = {"max_steps": 4, "checkpoint_interval": 2, "keep_last": 5, "eval_interval": 2, "lr": 1e-2,
             "progress": False, "plot": False}
    cfg = ClassifyConfig(data=str(toy_tsv), tokenizer="char", trainable="all")
    _straight_and_resumed(cfg, train, tmp_path)


def _straight_and_resumed(cfg: ClassifyConfig, train: dict, tmp_path: Path, *, lora: LoRAConfig | None = None):
    """Fine-tune 4 steps straight into tmp_path/a, and again into b from a's step-2 checkpoint (a copy of a
    made to look stopped there); assert both end with identical weights; return the straight run's result."""
    straight = finetune_classify(cfg, train={**train, "out_dir": str(tmp_path / "a")}, model=TINY, lora=lora,
                                 verbose=False)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "ckpt-00000004")
    (tmp_path / "b" / "latest").write_text("ckpt-00000002\n")
    resumed = finetune_classify(cfg, train={**train, "out_dir": str(tmp_path / "b"), "resume": True}, model=TINY,
                                lora=lora, verbose=False)
    for (name, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    return straight


@pytest.mark.slow  # a whole run: CI runs it (scripts/test.sh); the default suite skips it
def test_lora_instruct_through_the_cli_then_merge(tmp_path: Path, capsys):
    entries = [{"instruction": f"Say {w}.", "input": "", "output": w} for w in ["hi", "yo", "ok", "no"] * 10]
    (tmp_path / "d.json").write_text(json.dumps(entries))
    common = ["--data", str(tmp_path / "d.json"), "--eval-interval", "0", "--progress", "false", "--plot", "false",
              "--response-tokens", "0"]
    base, out = tmp_path / "base", tmp_path / "lora"
    assert main(["finetune", "instruct", *common, "--tokenizer", "char", "--n-embd", "32", "--n-layer", "2",
                 "--n-head", "4", "--n-positions", "256", "--max-steps", "1", "--out-dir", str(base)]) == 0
    rc = main(["finetune", "instruct", *common, "--init", str(base), "--lora-rank", "4", "--lora-targets", "c_attn",
               "lm_head", "--max-steps", "4", "--lr", "1e-2", "--out-dir", str(out)])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["trainable"] == "lora" and summary["trainable_parameters"] == summary["lora_parameters"]
    assert (out / "adapter.safetensors").stat().st_size < (out / "model.safetensors").stat().st_size
    saved = json.loads((out / "config.json").read_text())
    assert saved["lora"]["merged"] is True and saved["chat_template"] == "alpaca"
    merged, _ = load_model(out)  # the LM head had its own adapter, so the merged model unties it
    assert merged.config.tie_word_embeddings is False

    # The adapters alone, applied to the base again, give the same model.
    merge = ["finetune", "merge", "--base", str(base), "--adapters", str(out), "--out-dir", str(tmp_path / "m")]
    assert main(merge) == 0
    again, _ = load_model(tmp_path / "m")
    x = torch.randint(0, merged.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    assert (again(x)[0] - merged(x)[0]).abs().max().item() <= 1e-5
    assert json.loads((tmp_path / "m" / "config.json").read_text())["chat_template"] == "alpaca"


def test_data_files_read_a_utf8_bom_and_refuse_utf16(tmp_path: Path) -> None:
    # Windows editors save JSON with a byte order mark (json.loads refused "\ufeff["), or as UTF-16.
    from scratchgpt.data.records import read_entries
    from scratchgpt.data.sources import DataError
    from scratchgpt.training.modes.classify import read_labeled_texts

    entries = [{"instruction": "Say hi", "input": "", "output": "hi"}]
    marked = tmp_path / "marked.json"
    marked.write_text(json.dumps(entries), encoding="utf-8-sig")
    assert [e["instruction"] for e in read_entries(marked, required=("instruction",), optional=())] == ["Say hi"]
    tsv = tmp_path / "marked.tsv"
    tsv.write_text("ham\thello there\nspam\twin money\n", encoding="utf-8-sig")
    assert [r.label for r in read_labeled_texts(tsv)] == ["ham", "spam"]
    wide = tmp_path / "wide.json"
    wide.write_text(json.dumps(entries), encoding="utf-16")
    with pytest.raises(DataError, match="UTF-16 .*iconv -f UTF-16 -t UTF-8"):
        read_entries(wide, required=("instruction",), optional=())


@pytest.mark.parametrize("dtype", ["float32", "bf16-true"])
def test_lora_resumes_exactly(toy_tsv: Path, tmp_path: Path, dtype: str):
    """LoRA runs resume exactly: the export at each checkpoint (merge_lora builds new layers, which draws from
    the global RNG) must not move the training RNG. With bf16-true (and activation checkpointing, which
    fine-tuning shares with the loop) the adapters train in bfloat16, the compensation buffers resume, and
    the saved files are float32 like any other run's."""
    from scratchgpt.tensor_files import load_tensors

    train = {"max_steps": 4, "checkpoint_interval": 2, "keep_last": 5, "eval_interval": 2, "lr": 1e-2,
             "dtype": dtype, "activation_checkpointing": dtype == "bf16-true", "progress": False, "plot": False}
    cfg = ClassifyConfig(data=str(toy_tsv), tokenizer="char", trainable="lora")
    straight = _straight_and_resumed(cfg, train, tmp_path)
    weights = torch.bfloat16 if dtype == "bf16-true" else torch.float32
    assert {p.dtype for p in straight.model.parameters()} == {weights}
    for file in ("model.safetensors", "adapter.safetensors"):
        assert {t.dtype for t in load_tensors(tmp_path / "a" / file).values()} == {torch.float32}, file


@pytest.mark.parametrize("base_dtype", ["int8", "bfloat16"])
def test_lora_over_a_lowered_base_resumes_exactly_and_exports_float(toy_tsv: Path, tmp_path: Path, base_dtype: str):
    """LoRA over an int8 or bf16 frozen base (--lora-base-dtype): the base stays lowered through training and
    resume, the adapters and the new head train in float32, and the export is a float32 merged classifier that
    the adapters alone re-create from the float start."""
    from scratchgpt.model.quantize import Int8Linear
    from scratchgpt.tensor_files import load_tensors
    from scratchgpt.training.modes.classify import load_classifier

    train = {"max_steps": 4, "checkpoint_interval": 2, "keep_last": 5, "eval_interval": 2, "lr": 1e-2,
             "progress": False, "plot": False}
    cfg = ClassifyConfig(data=str(toy_tsv), tokenizer="char", trainable="lora")
    straight = _straight_and_resumed(cfg, train, tmp_path, lora=LoRAConfig(base_dtype=base_dtype))
    model = straight.model
    trained = {p.dtype for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {torch.float32} and model.lm_head.weight.requires_grad  # adapters and the new head
    if base_dtype == "int8":
        assert isinstance(model.transformer.h[0].attn.c_attn.base, Int8Linear)
    else:
        assert model.transformer.h[0].ln_1.weight.dtype == torch.bfloat16
    assert {t.dtype for t in load_tensors(tmp_path / "a" / "model.safetensors").values()} == {torch.float32}
    saved = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert saved["lora"]["base_dtype"] == base_dtype
    classifier = load_classifier(tmp_path / "a")[0]
    assert {p.dtype for p in classifier.parameters()} == {torch.float32}


def test_lora_base_dtype_and_train_dtype_must_agree():
    from scratchgpt.training.finetune import check_base_dtype

    assert check_base_dtype(LoRAConfig(base_dtype="bfloat16"), train_config(ClassifyConfig())).dtype == "bfloat16"
    assert check_base_dtype(LoRAConfig(base_dtype="int8"), train_config(ClassifyConfig())).dtype == "auto"
    with pytest.raises(ValueError, match="computes in bfloat16, not dtype='float32'"):
        check_base_dtype(LoRAConfig(base_dtype="bfloat16"), train_config(ClassifyConfig(), {"dtype": "float32"}))
    with pytest.raises(ValueError, match="dtype='bf16-true' would cast them"):
        check_base_dtype(LoRAConfig(base_dtype="int8"), train_config(ClassifyConfig(), {"dtype": "bf16-true"}))
