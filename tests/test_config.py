"""Config validation: every field against its type, every float finite, one-line errors naming file and key."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest

from scratchgpt import config as config_module
from scratchgpt.cli import main
from scratchgpt.config import RunConfig, TrainConfig, config_from_dict

CONFIG_CLASSES = [c for c in vars(config_module).values()
                  if isinstance(c, type) and dataclasses.is_dataclass(c) and c is not RunConfig
                  and c.__module__ == config_module.__name__]


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
