"""Ctrl-C and SIGTERM for long runs (``flowtruth run``, ``demo``, ``tui``).

The first Ctrl-C (SIGINT) or SIGTERM stops the plan cleanly: the :class:`Cancel` event
the engine already watches is set with a reason, the running steps end, every session
tears down (tracers and capture stopped, artifacts pulled) and its manifest says
``interrupted``; the batch capture is stopped and recorded. A second one sets
:attr:`Cancel.hard`: teardown skips its waits (the grace period of the phone's tracers,
the capture's flush) but still stops what was started and records it. The command then
exits 130 (SIGINT) or 143 (SIGTERM) with one line (:class:`Interrupted`).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from controller.errors import ControllerError

SIGNAL_NAMES: dict[int, str] = {int(signal.SIGINT): "Ctrl-C", int(signal.SIGTERM): "SIGTERM"}


class Cancel(threading.Event):
    """A cancel event that knows why it was set: by the user (a signal) or by the code
    (``set()``). ``hard`` is set by a second interrupt: skip the waiting."""

    def __init__(self) -> None:
        super().__init__()
        self.reason: str | None = None
        self.signum: int | None = None
        self.hard = threading.Event()

    def interrupt(self, signum: int) -> int:
        """Record a signal; returns how many interrupts so far (1: stop, 2: hurry)."""
        if self.signum is None:
            self.signum = signum
            self.reason = f"interrupted by the user ({SIGNAL_NAMES.get(signum, signum)})"
            self.set()
            return 1
        self.hard.set()
        return 2

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signum or signal.SIGINT)


def reason_of(cancel: Any) -> str | None:
    """Why ``cancel`` was set by the user (None: not interrupted, or a plain Event)."""
    return getattr(cancel, "reason", None) if cancel is not None and cancel.is_set() else None


def hurry(cancel: Any) -> bool:
    """Whether teardown should skip its waits (a second interrupt)."""
    hard = getattr(cancel, "hard", None)
    return bool(hard is not None and hard.is_set())


class Interrupted(ControllerError):
    """The run was interrupted by the user; exit 130 (Ctrl-C) or 143 (SIGTERM)."""

    def __init__(self, message: str, hint: str | None = None, exit_code: int = 130) -> None:
        super().__init__(message, hint=hint)
        self.exit_code = exit_code


@contextmanager
def interrupts(cancel: Cancel, on_signal: Callable[[int, int], None] | None = None
               ) -> Iterator[Cancel]:
    """While inside, SIGINT and SIGTERM go to ``cancel.interrupt`` instead of raising
    (only in the main thread; elsewhere nothing changes). ``on_signal(signum, count)`` is
    called from the handler (keep it short: set a flag, no printing)."""
    if threading.current_thread() is not threading.main_thread():
        yield cancel
        return

    def handler(signum: int, _frame: Any) -> None:
        n = cancel.interrupt(signum)
        if on_signal is not None:
            on_signal(signum, n)

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield cancel
    finally:
        for s, h in old.items():
            signal.signal(s, h)
