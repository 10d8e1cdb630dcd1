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


def check() -> None:
    """Raise KeyboardInterrupt if an interrupt was requested since `install`."""
    if _requested.is_set():
        raise KeyboardInterrupt
