"""Run one eval task (or a TOML suite of them) for one model and write its reports.

A suite file names the model once and lists tasks as TOML array tables:

    [eval]
    checkpoint = "runs/shakespeare"
    out_dir = "eval-reports/shakespeare"

    [[perplexity]]
    data = ["data/shakespeare_char/val.bin"]

    [[choice]]
    data = "hellaswag_val.jsonl"
    preset = "hellaswag"
    name = "hellaswag"          # optional: the report's file name

Each table takes the fields of its task's config (PerplexityEvalConfig, ChoiceEvalConfig, ...) plus
optional `name`; the model is loaded once for all of them.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from scratchgpt.config import (
    EVAL_TASKS,
    ChoiceEvalConfig,
    ClassifierEvalConfig,
    EvalConfig,
    JudgeEvalConfig,
    PerplexityEvalConfig,
    config_from_dict,
    config_to_dict,
    read_toml,
)
from scratchgpt.eval.report import build_report, model_info, report_stem, write_report
from scratchgpt.files import check_overwrite


class _Models:
    """Loads the evaluated model once, on first use, for every task of a run."""

    def __init__(self, common: EvalConfig) -> None:
        from scratchgpt.device import resolve_device

        self.common = common
        self.device = str(resolve_device(common.device))
        self._lm: tuple[Any, Any] | None = None

    def lm(self) -> tuple[Any, Any]:
        if self._lm is None:
            from scratchgpt.checkpoint import load_any

            if not self.common.checkpoint:
                raise ValueError("no model to evaluate: pass --checkpoint (or set checkpoint in [eval])")
            self._lm = load_any(self.common.checkpoint, device=self.device, quantize=self.common.quantize)
        return self._lm


def report_paths(task: str, cfg: Any, common: EvalConfig) -> tuple[Path, Path]:
    """The JSON and markdown files a task's report goes to (known before it runs)."""
    data = list(cfg.data) if task == "perplexity" else cfg.data
    stem = report_stem(task, data, common.name)
    return Path(common.out_dir) / f"{stem}.json", Path(common.out_dir) / f"{stem}.md"


def check_reports(tasks: list[tuple[str, Any, EvalConfig]]) -> None:
    """Before anything is evaluated: no report would replace an existing one (without --overwrite), nor
    another task's of the same run."""
    seen: set[Path] = set()
    for task, cfg, common in tasks:
        for path in report_paths(task, cfg, common):
            if path in seen:
                raise ValueError(f"two tasks would write {path}; give each table its own `name`")
            seen.add(path)
            check_overwrite(path, overwrite=common.overwrite, flag="--out-dir or --name")


def run_task(task: str, cfg: Any, common: EvalConfig, *, models: _Models | None = None,
             checked: bool = False) -> dict[str, Any]:
    """Run one task; write its JSON + markdown report; return the report (with "paths")."""
    if not checked:
        check_reports([(task, cfg, common)])
    models = models or _Models(common)
    settings = {**config_to_dict(common), **config_to_dict(cfg)}
    if task == "perplexity":
        report = _perplexity(cfg, common, models)
    elif task == "choice":
        report = _choice(cfg, common, models)
    elif task == "classify":
        report = _classify(cfg, common, models)
    elif task == "judge":
        report = _judge(cfg, common, models)
    else:
        raise ValueError(f"unknown eval task {task!r}; choose one of {list(EVAL_TASKS)}")
    report = build_report(task, settings=settings, **report)
    json_path, md_path = write_report(report, common.out_dir, report_paths(task, cfg, common)[0].stem)
    report["paths"] = {"json": str(json_path), "markdown": str(md_path)}
    return report


def _perplexity(cfg: PerplexityEvalConfig, common: EvalConfig, models: _Models) -> dict[str, Any]:
    from scratchgpt.eval.perplexity import evaluate_perplexity

    if not cfg.data:
        raise ValueError("nothing to score: pass --data FILE|FOLDER|GLOB|prepared-folder")
    model, tokenizer = models.lm()
    res = evaluate_perplexity(model, tokenizer, list(cfg.data), context=cfg.context, stride=cfg.stride,
                              batch_size=common.batch_size, device=models.device, prefix_eot=cfg.prefix_eot,
                              progress=common.progress)
    return {"model": model_info(model, common.checkpoint), "data": list(cfg.data), "results": res.to_dict()}


def choice_fields(cfg: ChoiceEvalConfig):
    """The preset's field names with any explicitly given field overriding it."""
    from scratchgpt.eval.multiple_choice import PRESETS

    base = PRESETS[cfg.preset]
    return dataclasses.replace(
        base, context=cfg.context_field or base.context, choices=tuple(cfg.choices_field) or base.choices,
        label=cfg.label_field or base.label, choice_labels=cfg.choice_labels_field or base.choice_labels)


def _choice(cfg: ChoiceEvalConfig, common: EvalConfig, models: _Models) -> dict[str, Any]:
    from scratchgpt.eval.multiple_choice import evaluate_choices, read_choice_items

    if not cfg.data:
        raise ValueError("no task file: pass --data TASK.jsonl")
    items = read_choice_items(cfg.data, choice_fields(cfg), template=cfg.template, limit=common.limit)
    model, tokenizer = models.lm()
    res = evaluate_choices(model, tokenizer, items, delimiter=cfg.delimiter, batch_size=common.batch_size,
                           progress=common.progress)
    return {"model": model_info(model, common.checkpoint), "data": cfg.data, "results": res}


def _classify(cfg: ClassifierEvalConfig, common: EvalConfig, models: _Models) -> dict[str, Any]:
    from scratchgpt.eval.classify_eval import evaluate_classifier_file

    if not cfg.data:
        raise ValueError("no labelled file: pass --data FILE")
    if not common.checkpoint:
        raise ValueError("no classifier to evaluate: pass --checkpoint RUN_DIR")
    res = evaluate_classifier_file(common.checkpoint, cfg.data, format=cfg.format, text_field=cfg.text_field,
                                   label_field=cfg.label_field, batch_size=common.batch_size, device=models.device,
                                   limit=common.limit)
    return {"model": {"checkpoint": common.checkpoint}, "data": cfg.data, "results": res}


def _judge(cfg: JudgeEvalConfig, common: EvalConfig, models: _Models) -> dict[str, Any]:
    from scratchgpt.checkpoint import saved_chat_template
    from scratchgpt.data.records import read_entries
    from scratchgpt.eval.judge import JudgeClient, evaluate_instructions

    if not cfg.data:
        raise ValueError("no instruction file: pass --data FILE.json")
    entries = read_entries(cfg.data, required=("instruction",), optional=("input", "output"))
    entries = entries[: common.limit] if common.limit else entries
    model, tokenizer = models.lm()
    template = (saved_chat_template(common.checkpoint, tokenizer=tokenizer) if cfg.chat_template == "auto"
                else cfg.chat_template)
    client = JudgeClient(cfg.judge_url, model=cfg.judge_model, api_key=cfg.judge_api_key, timeout=cfg.timeout,
                         retries=cfg.retries)
    try:
        res = evaluate_instructions(model, tokenizer, entries, client, template=template,
                                    max_new_tokens=cfg.max_new_tokens, batch_size=common.batch_size,
                                    progress=common.progress)
    finally:
        client.close()
    for row in res["rows"]:
        row.pop("where", None)
    return {"model": model_info(model, common.checkpoint), "data": cfg.data,
            "results": {**res, "judge": {"url": cfg.judge_url, "model": cfg.judge_model}}}


def run_suite(path: str | Path, *, overrides: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Run every task a suite TOML lists, for its one model; the reports, grouped by task."""
    raw = read_toml(path)
    unknown = sorted(set(raw) - {"eval", *EVAL_TASKS})
    if unknown:
        raise ValueError(f"{path}: unknown section(s) {unknown}; a suite has [eval] and "
                         f"[[{']], [['.join(EVAL_TASKS)}]] tables")
    common = config_from_dict(EvalConfig, {**raw.get("eval", {}), **(overrides or {})}, source=f"{path} [eval]")
    tasks = []
    for task, cls in EVAL_TASKS.items():
        tables = raw.get(task, [])
        if isinstance(tables, dict):
            tables = [tables]
        for i, table in enumerate(tables):
            table = dict(table)
            name = table.pop("name", None)
            tasks.append((task, config_from_dict(cls, table, source=f"{path} [[{task}]] #{i + 1}"), name))
    if not tasks:
        raise ValueError(f"{path}: no tasks; add [[perplexity]], [[choice]], [[classify]] or [[judge]] tables")
    runs = [(task, cfg, dataclasses.replace(common, name=name)) for task, cfg, name in tasks]
    check_reports(runs)  # a refusal costs nothing: no model loaded, no task run
    models = _Models(common)
    return [run_task(task, cfg, each, models=models, checked=True) for task, cfg, each in runs]
