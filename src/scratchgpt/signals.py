"""Importing torch's heavy modules with Ctrl-C held back (no torch here: the CLI calls this before torch exists).

Much of torch's import runs C++ that calls back into Python; a KeyboardInterrupt raised inside such a
callback cannot unwind through the C++ frames and aborts the process (SIGABRT, "terminate called after
throwing an instance of 'pybind11::error_already_set'"). Holding SIGINT and SIGTERM for the second or two
of the import, then delivering them, turns a Ctrl-C at that moment into the usual exception.

The same holds for what torch imports lazily from C++ later: the first operation on the meta device (every
checkpoint load) runs a Python kernel that imports torch._dynamo, sympy and ~800 modules (1-2 s) with C++
frames below it. So the CLI imports torch held, and code that is about to build a model on the meta device
imports torch._dynamo held first (`checkpoint.py`); training from scratch never needs torch._dynamo (its
optimizers avoid it: `training/optim.py`) and does not pay its ~1 s.
"""

from __future__ import annotations

import importlib
import signal
import sys
import threading


def import_holding_signals(*names: str) -> None:
    """Import the modules `names` (those not imported yet) with SIGINT/SIGTERM held until all are done.

    A signal that came meanwhile is then raised again, to the handlers that were in place: Python's
    KeyboardInterrupt for SIGINT, the CLI's Terminated for SIGTERM (or the default: the process ends).
    Outside the main thread (where Python runs no signal handler) the modules are simply imported.
    """
    missing = [n for n in names if n not in sys.modules]
    if not missing:
        return
    if threading.current_thread() is not threading.main_thread():
        for name in missing:
            importlib.import_module(name)
        return
    received: list[int] = []
    held = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, lambda signum, frame: received.append(signum)) for s in held}
    try:
        for name in missing:
            importlib.import_module(name)
    finally:
        for s, handler in previous.items():
            # (None: a handler installed from C, which Python cannot reinstall; the default is the closest)
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
    if received:
        signal.raise_signal(received[0])
