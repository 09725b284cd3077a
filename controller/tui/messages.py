"""Messages that workers post to the app; handlers in the app own all state."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from textual.message import Message

from controller.events import Event


class EngineEvent(Message):
    """One :mod:`controller.events` event, posted from the engine's worker thread."""

    def __init__(self, event: Event) -> None:
        super().__init__()
        self.event = event


@dataclass(frozen=True)
class ApSnapshot:
    """The access point as a probe saw it."""

    up: bool
    interface: str = ""
    ssid: str = ""
    clients: int = 0
    capture_bytes: int | None = None
    detail: str = ""
    restarts: tuple[tuple[str, int], ...] = ()
    """(daemon, restarts) for each daemon the AP's supervisor restarted."""
    gave_up: tuple[str, ...] = ()
    """The supervisor's line for each daemon it stopped restarting."""
    supervisor: bool | None = None
    """The supervisor runs (False: recorded but gone; None: none, or not known)."""


class ApProbed(Message):
    """The AP probe finished (in a worker)."""

    def __init__(self, snapshot: ApSnapshot) -> None:
        super().__init__()
        self.snapshot = snapshot


class ActionFailed(Message):
    """A background action failed; ``hint`` says how to fix it."""

    def __init__(self, action: str, message: str, hint: str = "") -> None:
        super().__init__()
        self.action = action
        self.message = message
        self.hint = hint


class ActionDone(Message):
    """A background action (relabel, export, provision) finished."""

    def __init__(self, action: str, text: str, session_id: str | None = None,
                 data: Any = None) -> None:
        super().__init__()
        self.action = action
        self.text = text
        self.session_id = session_id
        self.data = data


class WorkFinished(Message):
    """The plan worker returned (after teardown, if it was stopped)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
