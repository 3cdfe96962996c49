"""The one driver: every kind of run (pretraining and each fine-tuning mode) starts and stops here.

A mode builds a `Job` (model, batches, loss, evaluations, ...) for the process it runs in; `drive`
joins the torchrun process group, builds the job, runs its `before` hook (with the model placed on
the run's device), hands it to the one loop (`train.train`), runs its `after` hook, and leaves the
group again. The TrainConfig is `drive`'s argument alone, and `drive` resolves where the run executes
(the `Runtime`: device, dtype, attention path) once: the job and the loop get that one answer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from scratchgpt.config import TrainConfig
from scratchgpt.device import keep_freed_memory
from scratchgpt.training.runtime import Runtime, process_group
from scratchgpt.training.train import (
    BatchSource,
    EvalFn,
    ExportFn,
    LogFn,
    LossFn,
    SampleFn,
    TrainResult,
    lm_loss,
    train,
)


@dataclass
class Job:
    """What a mode hands the loop: see `train.train` for each field's contract.

    `before(runtime)` runs before the first step with the model on its device (the DPO reference, the
    starting metrics); `after(result, runtime)` runs after the last one, still inside the process group
    (final evaluations on every rank); its return value comes back from `drive`.
    """

    model: nn.Module
    batches: BatchSource
    loss_fn: LossFn = lm_loss
    params: Iterable[nn.Parameter] | None = None
    evals: Mapping[str, EvalFn] = field(default_factory=dict)
    sample_fn: SampleFn | None = None
    tokenizer: Any = None
    run_config: dict[str, Any] | None = None
    export_fn: ExportFn | None = None
    before: Callable[[Runtime], None] | None = None
    after: Callable[[TrainResult, Runtime], Any] | None = None


def drive(config: TrainConfig, build: Callable[[Runtime], Job], *, log: LogFn | None = None) -> tuple[TrainResult, Any]:
    """Run the job `build(runtime)` makes on the device, dtype and processes `config` names: (result, after's value)."""
    with process_group(config.device, config.dtype, config.attn_impl) as runtime:
        job = build(runtime)
        # Once the model is loaded (a load would keep its freed temporaries too): every step reuses the last one's
        # freed memory instead of page-faulting it in again (device.keep_freed_memory).
        runtime = dataclasses.replace(runtime, malloc_kept=runtime.device.type == "cpu" and keep_freed_memory())
        if job.before is not None:
            runtime.place(job.model)
            job.before(runtime)
        result = train(job.model, job.batches, config=config, runtime=runtime, loss_fn=job.loss_fn,
                       params=job.params, evals=job.evals, sample_fn=job.sample_fn, tokenizer=job.tokenizer,
                       run_config=job.run_config, export_fn=job.export_fn, log=log)
        extra = job.after(result, runtime) if job.after is not None else None
    return result, extra
