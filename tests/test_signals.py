"""signals.py: a signal that lands during a held import is delivered after it, to the handlers in place."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest

from scratchgpt.signals import import_holding_signals

pytestmark = pytest.mark.skipif(os.name != "posix", reason="needs POSIX signals")


@pytest.fixture
def module_that_signals(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A module that sends this process a signal half-way through its own import."""

    def make(name: str, sig: int) -> str:
        (tmp_path / f"{name}.py").write_text(
            f"import os, signal\nos.kill(os.getpid(), {int(sig)})\nDONE = True\n")
        monkeypatch.syspath_prepend(str(tmp_path))
        monkeypatch.delitem(sys.modules, name, raising=False)
        return name

    return make


def test_ctrl_c_during_the_import_is_raised_after_it(module_that_signals) -> None:
    name = module_that_signals("held_sigint", signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        import_holding_signals(name)
    assert sys.modules[name].DONE  # the import ran to its end before the interrupt
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is back


def test_sigterm_reaches_the_handler_that_was_in_place(module_that_signals) -> None:
    class Terminated(BaseException):
        pass

    def on_term(signum, frame):
        raise Terminated

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        name = module_that_signals("held_sigterm", signal.SIGTERM)
        with pytest.raises(Terminated):
            import_holding_signals(name)
        assert sys.modules[name].DONE and signal.getsignal(signal.SIGTERM) is on_term
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_without_a_signal_the_modules_are_imported_and_nothing_is_raised(module_that_signals, tmp_path) -> None:
    (tmp_path / "quiet_module.py").write_text("VALUE = 3\n")
    module_that_signals("unused", signal.SIGINT)  # (puts tmp_path on sys.path)
    sys.modules.pop("quiet_module", None)
    import_holding_signals("quiet_module", "os")  # an imported one is skipped
    assert sys.modules["quiet_module"].VALUE == 3
