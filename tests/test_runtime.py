"""Process set-up: the one is_main(), device/dtype resolution, and process_group outside torchrun."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from scratchgpt.device import native_bf16
from scratchgpt.training.runtime import StopRequest, is_main, process_group, resolve_dtype, resolve_runtime


def test_is_main_follows_torchrun_rank_before_a_group_exists(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RANK", raising=False)
    assert is_main()  # alone
    monkeypatch.setenv("RANK", "1")
    assert not is_main()
    monkeypatch.setenv("RANK", "0")
    assert is_main()


def test_process_group_alone_joins_nothing_and_places_models() -> None:
    with process_group("cpu", "float32", "eager") as rt:
        assert not torch.distributed.is_initialized()
        assert (rt.device, rt.dtype, rt.attn_impl, rt.dist.world_size) == (torch.device("cpu"), torch.float32,
                                                                           "eager", 1)
        with rt.precision():  # float32: no autocast
            assert not torch.is_autocast_enabled("cpu")
    assert resolve_runtime("cpu", "auto", "auto").attn_impl == "sdpa"


def test_dtype_and_device_resolution() -> None:
    # auto: bf16 autocast on CPUs with native bf16 units, float32 elsewhere (tests/test_optim.py fakes both kinds)
    native = native_bf16("cpu")
    assert resolve_dtype("auto", torch.device("cpu")) == (torch.bfloat16 if native else torch.float32)
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            resolve_runtime("cuda")
    with pytest.raises(ValueError, match="not a device"):
        resolve_runtime("gpu7")


def test_bf16_true_places_models_in_bfloat16_under_bf16_autocast() -> None:
    from scratchgpt.config import GPTConfig
    from scratchgpt.model.gpt import GPT

    rt = resolve_runtime("cpu", "bf16-true")
    assert (rt.dtype, rt.weights_dtype) == (torch.bfloat16, torch.bfloat16)
    assert resolve_runtime("cpu", "bfloat16").weights_dtype == torch.float32  # autocast alone keeps float32 weights
    model = GPT(GPTConfig(vocab_size=10, n_positions=8, n_embd=8, n_layer=1, n_head=2))
    rt.place(model)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    x = torch.randint(10, (1, 8))
    with rt.precision():
        _, loss = model(x, x)
    assert loss.dtype == torch.float32  # autocast keeps the cross-entropy in float32


@pytest.mark.skipif(os.name != "posix", reason="needs POSIX signals")
@pytest.mark.parametrize(("first", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_stopped_run_exits_with_the_signal_that_stopped_it(first: int, code: int) -> None:
    from types import SimpleNamespace

    from scratchgpt.cli.commands import stopped_exit_code

    with StopRequest() as stop:
        os.kill(os.getpid(), first)
        os.kill(os.getpid(), signal.SIGTERM)  # a second request changes nothing
        assert stop.requested and stop.signum == first
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers back after the loop
    assert stopped_exit_code(SimpleNamespace(interrupted=True, stop_signal=stop.signum)) == code
    assert stopped_exit_code(SimpleNamespace(interrupted=True, stop_signal=None)) == 130  # another rank asked
    assert stopped_exit_code(SimpleNamespace(interrupted=False, stop_signal=None)) == 0
