"""Ctrl-C that is never lost: the CLIs install `install()`; a SIGINT both raises KeyboardInterrupt
(Python's default) and is remembered, and `check()` at every phase start and every progress step
raises it again. So an interrupt that a library swallowed on its way up (seen once in the suite: a
pilot ran to the end, exit 0, after its SIGINT) still stops the run at the next batch, with exit 130
and no half-written file (the writes are atomic)."""

from __future__ import annotations

import signal
import threading
from typing import Any

_requested = threading.Event()


def _on_sigint(signum: int, frame: Any) -> None:
    _requested.set()
    raise KeyboardInterrupt


def install() -> None:
    """Handle SIGINT as above (from the main thread only; elsewhere a no-op); clears an old request."""
    _requested.clear()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _on_sigint)


def request() -> None:
    """Mark an interrupt as requested (what the handler does; tests use it)."""
    _requested.set()


def clear() -> None:
    _requested.clear()


def forget_caught() -> None:
    """Keep a caught Ctrl-C from turning the exit code into a signal death. Under `python -m`,
    CPython (3.11, 3.12) kills itself with SIGINT after finalizing (return code -2, not the 130 we
    return) when a KeyboardInterrupt ever ended code run by `exec` of a string, even if the caller
    caught it: `run_eval_code_obj` sets `_PyRuntime.signals.unhandled_keyboard_interrupt`, and only
    the next such run clears it. A SIGINT that lands while a library runs generated code (dataclass,
    namedtuple and the like are built that way) does exactly that; seen once in CI, as a pilot that
    printed its interrupted text and then died of SIGINT. An empty `exec` is the run that clears it."""
    exec("")  # noqa: S102 - the empty string is the point


def check() -> None:
    """Raise KeyboardInterrupt if an interrupt was requested since `install`."""
    if _requested.is_set():
        raise KeyboardInterrupt
