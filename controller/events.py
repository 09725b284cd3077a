"""Typed events the session engine emits; front ends (CLI, TUI) only listen.

Small frozen dataclasses, past tense for facts. The engine calls ``sink(event)`` for
each; a CLI sink prints with rich, the TUI's posts a Textual message. Every event
carries the wall-clock time it happened (``at``, epoch seconds, host clock).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field


def _now() -> float:
    return time.time()


@dataclass(frozen=True, slots=True)
class Event:
    at: float = field(default_factory=_now, kw_only=True)


# --- plan / batch ---------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class PlanStarted(Event):
    plan: str
    sessions: int


@dataclass(frozen=True, slots=True)
class PlanProgressed(Event):
    done: int
    failed: int
    skipped: int
    total: int


@dataclass(frozen=True, slots=True)
class PlanFinished(Event):
    done: int
    failed: int
    skipped: int
    total: int
    cancelled: bool = False


# --- devices --------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class DeviceConnected(Event):
    serial: str
    model: str
    manufacturer: str
    android: str
    abi: str
    rooted: bool


@dataclass(frozen=True, slots=True)
class DeviceLost(Event):
    serial: str
    reason: str


@dataclass(frozen=True, slots=True)
class ClockMeasured(Event):
    serial: str
    offset_s: float  # phone clock minus host clock
    uncertainty_s: float


@dataclass(frozen=True, slots=True)
class PreflightWarned(Event):
    serial: str
    check: str
    message: str
    fix: str


# --- sessions -------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class SessionStarted(Event):
    session_id: str
    serial: str
    package: str
    activity: str
    run_dir: str


@dataclass(frozen=True, slots=True)
class StepStarted(Event):
    session_id: str
    step: str  # imperative name: "StartCapture", "PushScripts", ...


@dataclass(frozen=True, slots=True)
class StepFinished(Event):
    session_id: str
    step: str
    ok: bool
    detail: str = ""


@dataclass(frozen=True, slots=True)
class ScenarioStepStarted(Event):
    session_id: str
    index: int
    total: int
    description: str


@dataclass(frozen=True, slots=True)
class CaptureProgressed(Event):
    session_id: str
    packets: int
    bytes: int
    drops: int


@dataclass(frozen=True, slots=True)
class TracerProgressed(Event):
    session_id: str
    tracer: str  # strace | frida | netstat
    pids: tuple[int, ...]
    lines: int


@dataclass(frozen=True, slots=True)
class ArtifactPulled(Event):
    session_id: str
    name: str
    path: str
    size: int
    sha256: str


@dataclass(frozen=True, slots=True)
class FlowsLabelled(Event):
    session_id: str
    flows: int
    labelled: int
    ambiguous: int
    unlabelled: int


@dataclass(frozen=True, slots=True)
class SessionFinished(Event):
    session_id: str
    run_dir: str
    outcome: str  # "ok"


@dataclass(frozen=True, slots=True)
class SessionFailed(Event):
    session_id: str
    run_dir: str
    error: str
    hint: str = ""


@dataclass(frozen=True, slots=True)
class LogRecorded(Event):
    level: str  # "info" | "warning" | "error"
    text: str


Sink = Callable[[Event], None]


def null_sink(event: Event) -> None:
    """A sink that drops everything."""


class RecordingSink:
    """Keeps every event, for tests and for replaying into a late front end."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def __call__(self, event: Event) -> None:
        self.events.append(event)

    def of(self, kind: type[Event]) -> list[Event]:
        return [e for e in self.events if isinstance(e, kind)]
