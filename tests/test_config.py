"""Config validation: every field against its type, every float finite, one-line errors naming file and key."""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

import pytest

from scratchgpt import config as config_module
from scratchgpt.cli import commands, main
from scratchgpt.config import RunConfig, TrainConfig, config_from_dict

# Every config class: the library's (config.py) and those of the commands only the CLI has.
CONFIG_CLASSES = [c for module in (config_module, commands) for c in vars(module).values()
                  if isinstance(c, type) and dataclasses.is_dataclass(c) and c is not RunConfig
                  and c.__module__ == module.__name__]


def _float_fields() -> list[tuple[type, str]]:
    out = []
    for cls in CONFIG_CLASSES:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            hint = hints[f.name]
            if hint is float or (typing.get_origin(hint) is not tuple and float in typing.get_args(hint)):
                out.append((cls, f.name))
    return out


@pytest.mark.parametrize(("cls", "name"), _float_fields(), ids=lambda v: getattr(v, "__name__", v))
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_every_float_field_refuses_non_finite_values(cls: type, name: str, value: float) -> None:
    # NaN compares False with everything, so a plain range check would let it through.
    with pytest.raises(ValueError, match=rf"{name}.*finite"):
        config_from_dict(cls, {name: value}, source="x.toml")


@pytest.mark.parametrize(("cls", "name", "value", "expected"), [
    (config_module.GPTConfig, "bias", "false", "true or false"),
    (TrainConfig, "plot", "false", "true or false"),
    (TrainConfig, "resume", "no", "true or false"),
    (TrainConfig, "lr", "fast", "a number"),
    (TrainConfig, "device", 3, "a string"),
    (TrainConfig, "max_steps", 2.5, "an integer"),
    (TrainConfig, "max_steps", True, "an integer"),
    (TrainConfig, "sample_top_k", "10", "an integer or null"),
    (config_module.DataConfig, "tokenizer", "word", "one of"),
    (config_module.LoRAConfig, "targets", [1], "string"),
    (config_module.SamplingConfig, "temperature", "hot", "a number"),
])
def test_wrong_types_are_one_error_naming_file_and_key(cls: type, name: str, value, expected: str) -> None:
    with pytest.raises(ValueError, match=f"^run.toml \\[s\\]: .*{name}.*{expected}") as err:
        config_from_dict(cls, {name: value}, source="run.toml [s]")
    assert "\n" not in str(err.value)


def test_ints_are_accepted_for_floats_and_lists_for_tuples() -> None:
    cfg = config_from_dict(TrainConfig, {"lr": 1, "grad_clip": 0}, source="x")
    assert cfg.lr == 1 and cfg.grad_clip == 0
    split = config_from_dict(config_module.FinetuneConfig, {"split": [0.5, 0.25, 0.25]}, source="x").split
    assert split == (0.5, 0.25, 0.25)


@pytest.mark.parametrize("toml", ['[model]\nbias = "false"', '[train]\nplot = "false"', '[train]\nresume = "no"',
                                  '[train]\nlr = "fast"', "[train]\ndevice = 3"])
def test_train_with_a_mistyped_toml_is_one_line_naming_the_file(tmp_path: Path, capsys, toml: str) -> None:
    path = tmp_path / "run.toml"
    path.write_text(toml + "\n")
    assert main(["train", "-c", str(path), "--out-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    key = toml.split("\n")[1].split(" =")[0]
    assert err.count("\n") == 1 and str(path) in err and key in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag", ["--grad-clip", "--resid-pdrop", "--sample-temperature", "--val-fraction", "--lr",
                                  "--weight-decay", "--beta2"])
@pytest.mark.parametrize("value", ["nan", "inf"])
def test_train_flags_refuse_non_finite_values(tmp_path: Path, capsys, flag: str, value: str) -> None:
    assert main(["train", flag, value, "--out-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and flag.lstrip("-").replace("-", "_") in err and "finite" in err, err


def test_every_temperature_follows_the_one_rule() -> None:
    # Sampling, training samples and the rule itself agree at the edges: [0, 2], below 1e-4 greedy.
    for value in (0.0, 5e-5, 1e-4, 2.0):
        assert config_module.SamplingConfig(temperature=value).greedy is config_module.is_greedy(value)
        assert TrainConfig(sample_temperature=value).sample_temperature == value
    assert [config_module.is_greedy(v) for v in (0.0, 5e-5, 9.99e-5, 1e-4, 1.0)] == [True, True, True, False, False]
    for value in (-1e-9, 2.0001):
        with pytest.raises(ValueError, match=r"SamplingConfig.temperature=.* must lie in \[0.0, 2.0\]"):
            config_module.SamplingConfig(temperature=value)
        with pytest.raises(ValueError, match=r"TrainConfig.sample_temperature=.* must lie in \[0.0, 2.0\]"):
            TrainConfig(sample_temperature=value)


def _valid_kwargs(cls: type) -> dict:
    """The fewest fields that make `cls` valid: its required ones, and a checkpoint for a model source."""
    needed = {"checkpoint": "x", "base": "b", "adapters": "a", "out_dir": "o", "out": "o", "format": "gguf"}
    kwargs = {f.name: needed[f.name] for f in dataclasses.fields(cls)
              if f.metadata.get("required") and f.default in ("", None)}
    return {"checkpoint": "x", **kwargs} if issubclass(cls, commands.ModelSource) else kwargs


def _bounded_fields() -> list[tuple[type, str, str, float]]:
    """(class, field, rule, bound) for every bound a field declares in its metadata."""
    return [(cls, f.name, rule, f.metadata[rule]) for cls in CONFIG_CLASSES for f in dataclasses.fields(cls)
            for rule in ("ge", "gt", "le", "lt") if rule in f.metadata]


@pytest.mark.parametrize(("cls", "name", "rule", "bound"), _bounded_fields(),
                         ids=lambda v: getattr(v, "__name__", str(v)))
def test_every_declared_bound_is_checked(cls: type, name: str, rule: str, bound: float) -> None:
    # The value just outside the bound is refused with the field's name. One validator reads these from
    # the metadata for every class.
    outside = {"ge": bound - 1, "gt": bound, "le": bound + 1, "lt": bound}[rule]
    with pytest.raises(ValueError, match=rf"^{cls.__name__}\.{name}={outside!r} is out of range; it must "):
        cls(**_valid_kwargs(cls), **{name: outside})
    if rule in ("ge", "le"):  # an inclusive bound passes the validator (a cross-field rule may still refuse it)
        try:
            assert getattr(cls(**_valid_kwargs(cls), **{name: bound}), name) == bound
        except ValueError as e:
            assert "out of range" not in str(e), e


def test_the_bounds_and_their_messages() -> None:
    assert len(_bounded_fields()) > 60
    with pytest.raises(ValueError, match=r"^TrainConfig.beta1=1.0 is out of range; it must lie in \[0.0, 1.0\)$"):
        TrainConfig(beta1=1.0)
    with pytest.raises(ValueError, match=r"^TrainConfig.lr=0 is out of range; it must be > 0.0$"):
        TrainConfig(lr=0)
    with pytest.raises(ValueError, match=r"^TrainConfig.min_lr=0.01 is above lr=0.001; the floor must be <= lr$"):
        TrainConfig(lr=1e-3, min_lr=1e-2)
    # A subclass that changes a default keeps the field's bound and help.
    with pytest.raises(ValueError, match=r"ClassifyTrainConfig.lr=0.0 is out of range"):
        config_module.ClassifyTrainConfig(lr=0.0)
    lr = {f.name: f for f in dataclasses.fields(config_module.DPOTrainConfig)}["lr"]
    assert (lr.default, lr.metadata["gt"], lr.metadata["help"]) == (5e-6, 0.0, "peak learning rate")
    with pytest.raises(TypeError, match="unknown field rule"):
        config_module.setting(1, "x", minimum=0)


@pytest.mark.parametrize(("cls", "kwargs", "words"), [
    # These two ran no type check before: a string where a number belongs was let through.
    (config_module.EvalConfig, {"batch_size": "4"}, "EvalConfig.batch_size='4' (str) must be an integer"),
    (config_module.EvalConfig, {"quantize": "int2"}, "EvalConfig.quantize='int2' is not allowed"),
    (config_module.PerplexityEvalConfig, {"context": "8"}, "PerplexityEvalConfig.context='8' (str) must be an integer"),
    (config_module.PerplexityEvalConfig, {"prefix_eot": "no"}, "(write true or false without quotes)"),
    (config_module.ServeConfig, {}, "ServeConfig.checkpoint must be set"),
    (config_module.DataConfig, {"text_field": ""}, "DataConfig.text_field must be set"),
    (commands.ExportConfig, {"checkpoint": "c", "out": "o"}, "ExportConfig.format must be set"),
    (commands.GenerateConfig, {"model": "gpt3"}, "GenerateConfig.model='gpt3' is not allowed; choose one of"),
    (commands.GenerateConfig, {"checkpoint": "c", "model": "gpt2"}, "give exactly one of checkpoint"),
])
def test_every_config_checks_types_and_rules(cls: type, kwargs: dict, words: str) -> None:
    with pytest.raises(ValueError, match=re.escape(words)):
        cls(**kwargs)


def test_lists_and_lone_strings_become_tuples_where_the_field_is_one() -> None:
    assert config_module.PerplexityEvalConfig(data="a.txt").data == ("a.txt",)
    assert config_module.SamplingConfig(stop=["###", "\n\n"]).stop == ("###", "\n\n")  # frozen too
    assert config_module.LoRAConfig(targets="lm_head").targets == ("lm_head",)
    with pytest.raises(ValueError, match=r"LoRAConfig.targets=\(1,\) must be a list \(each item a string\)"):
        config_module.LoRAConfig(targets=[1])
