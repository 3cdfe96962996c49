"""The `scratchgpt` command: one entry point, one subcommand per job (`cli/commands.py`).

The CLI only parses arguments and calls into the modules; every command's settings come from config
dataclasses through one path (`cli/flags.py`: `-c FILE.toml`, then flags), so defaults live in one place.
Errors a user can fix are printed as one line on stderr with exit code 2; Ctrl-C exits 130 and SIGTERM
143, each with one line (also during the first seconds, while torch is still being imported); nothing
here holds logic the library lacks. This package imports no torch at import time, so that
`python -m scratchgpt` can be interrupted cleanly from its first moment.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Sequence

from scratchgpt.cli.commands import COMMANDS
from scratchgpt.signals import import_holding_signals

# Exceptions that mean "the user's input is wrong": shown as one line, never as a traceback.
# (tensor_files.CheckpointError and WriteError are ValueErrors; FileNotFoundError is an OSError.)
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError)


def package_version() -> str:
    """The installed distribution's version (what pip reports); from a source tree that is not
    installed, the version the package itself declares (pyproject.toml reads the same one)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("scratchgpt")
    except PackageNotFoundError:
        import scratchgpt

        return scratchgpt.__version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scratchgpt",
        description="Train, fine-tune, run and serve GPT-2-class language models.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_command in COMMANDS:
        add_command(sub)
    return parser


class Terminated(BaseException):
    """SIGTERM outside the training loop (which turns it into a stop-and-save request)."""


def _on_sigterm(signum: int, frame) -> None:
    raise Terminated


# Commands that decode or evaluate: their torch thread count is fitted to the machine at start (training
# picks and logs its own, and keeps it across a resume).
_INFERENCE_COMMANDS = frozenset({"generate", "chat", "serve", "eval", "classify"})
# Commands that start without torch._dynamo (see main()).
_NO_DYNAMO_COMMANDS = frozenset({"train", "prepare"})


# OpenMP spin counts (libgomp's GOMP_SPINCOUNT) for an idle machine: a waiting thread spins this many rounds
# (~tens of microseconds), then sleeps. Measured on a 2-core Xeon, demo model, 30 steps: as fast as libgomp's
# default (300,000) alone (4.1 vs 4.4 s), but 14 s instead of 17-60 s beside two busy processes.
_QUIET_SPINCOUNT = "30000"


def _set_openmp_waiting() -> None:
    """How OpenMP's idle threads wait, chosen from the machine's load before torch loads (libgomp reads it then).

    Why: after every parallel operator PyTorch's threads meet at a barrier, and libgomp spins there for
    ~300,000 rounds by default. When the cores are oversubscribed, the spinner burns the time slice that the
    thread it waits for needs: the demo's training ran > 11x slower beside busy processes. So: on a busy
    machine threads sleep at once (OMP_WAIT_POLICY=PASSIVE, ~20% slower alone but no collapse); on a quiet
    one they spin briefly, then sleep. Neither changes any result. A policy the user set wins; nothing
    changes when torch is already loaded (`main()` called in-process). bench/busy.py measures this.
    """
    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ or "torch" in sys.modules:
        return
    from scratchgpt.device import other_runnable_threads

    os.environ.update(openmp_waiting(other_runnable_threads()))


def openmp_waiting(others: int | None) -> dict[str, str]:
    """The OpenMP waiting setting for a machine where `others` threads of other processes are running (None:
    unknown): sleep at once on a busy machine, spin briefly on a quiet one (see _set_openmp_waiting)."""
    return {"OMP_WAIT_POLICY": "PASSIVE"} if others else {"GOMP_SPINCOUNT": _QUIET_SPINCOUNT}


def _fit_threads() -> None:
    """One torch thread per usable core, fewer on a heavily loaded machine (see device.choose_threads)."""
    from scratchgpt.device import choose_threads, set_threads

    set_threads(choose_threads())


def main(argv: Sequence[str] | None = None) -> int:
    command_name = "scratchgpt"
    previous = None
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        command_name = f"scratchgpt {args.command}"
        _set_openmp_waiting()
        # torch, with Ctrl-C held (signals.py); torch._dynamo too (held), which the meta device imports on first
        # use under C++ frames, except where it may never be needed (~1 s): pretraining (a checkpoint it loads
        # imports it held, checkpoint.py) and data preparation (no model).
        import_holding_signals("torch", *(() if args.command in _NO_DYNAMO_COMMANDS else ("torch._dynamo",)))
        if args.command in _INFERENCE_COMMANDS:
            _fit_threads()
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"{command_name}: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print(f"{command_name}: terminated (SIGTERM)", file=sys.stderr)
        return 143
    except USER_ERRORS as e:
        print(f"{command_name}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        # torchrun's elastic agent turns SIGINT/SIGTERM into SignalException (no torch import needed to test).
        if type(e).__name__ == "SignalException":
            sig = getattr(e, "sigval", signal.SIGTERM)
            print(f"{command_name}: stopped by {signal.Signals(sig).name}", file=sys.stderr)
            return 128 + int(sig)
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def run() -> None:
    """The console script and `python -m scratchgpt`: `main()`, then a quick exit with its code.

    Why: once torch is loaded (and torch._dynamo, which torch's optimizers import on first use), the
    interpreter's teardown frees its ~3,000 modules one by one: 0.6-0.7 s after the work is done, on every
    command (measured on a 2-core Xeon: 0.02 s with this exit). What a normal exit does that matters still
    happens, in its order: thread pools are told to stop and non-daemon threads joined, atexit handlers run
    (temporary folders, multiprocessing, logging), stdout and stderr are flushed; then `os._exit` skips the
    teardown. Every file
    the package writes is closed by then (written through `with` blocks). Exits by exception (argparse's
    usage errors, an unexpected traceback) take the normal way out.
    """
    import atexit
    import contextlib

    code = main()
    # Python's own exit does these two first (Py_FinalizeEx): threading's exit hooks (which tell thread
    # pools to stop), then joining every non-daemon thread; then the atexit handlers.
    threading._shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        # (a reader that went away, as in `scratchgpt ... | head`, or a closed stream: nothing left to flush to)
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)
