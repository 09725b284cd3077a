"""The narrow port between the TUI and the session engine, and a rehearsal engine.

The TUI never drives phones itself: it calls an :class:`EngineProtocol` from a worker
thread, passing a sink (which posts Textual messages) and two :class:`threading.Event`
objects. ``cancel`` stops cooperatively (the engine tears down and returns);
``pause`` lets the running session finish and starts no further one.

:class:`DemoEngine` is a rehearsal engine: it emits the event sequence of a real plan
(devices, clocks, steps, capture counters, artifacts, labels) with delays, touching no
phone. ``flowtruth tui --demo`` uses it, and so do the fast Pilot tests.
:class:`SessionEngine` adapts the real engine (``controller.plan.run_plan``).
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from controller import events as ev
from controller.events import Sink


@dataclass(frozen=True)
class QueuedSession:
    """One session of a plan as the queue shows it before it runs."""

    session_id: str
    serial: str
    package: str
    scenario: str = ""
    duration_s: float | None = None


@dataclass(frozen=True)
class PlanOutline:
    """What the TUI needs to know about a plan before running it."""

    name: str
    sessions: tuple[QueuedSession, ...] = ()
    source: str | None = None  # the PLAN.yaml it came from


def outline_of(plan: Any) -> PlanOutline:
    """A :class:`PlanOutline` of a plan object (an outline, or the engine's pydantic Plan)."""
    if plan is None:
        return PlanOutline(name="no plan")
    if isinstance(plan, PlanOutline):
        return plan
    sessions = []
    for i, s in enumerate(getattr(plan, "sessions", []) or []):
        sid = str(getattr(s, "session_id", None) or getattr(s, "id", None) or f"s{i + 1}")
        activity = getattr(s, "activity", "") or ""
        device = getattr(s, "serial", None) or getattr(s, "device", None) or "?"
        package = getattr(s, "package", None) or getattr(s, "app", None) or "?"
        scenario = getattr(s, "scenario", None) or activity
        duration = getattr(s, "duration_s", None) or getattr(scenario, "duration_s", None)
        sessions.append(
            QueuedSession(sid, str(device), str(package), str(getattr(scenario, "name", scenario)),
                          float(duration) if duration else None)
        )
    name = str(getattr(plan, "name", None) or "plan")
    source = getattr(plan, "source", None)
    return PlanOutline(name=name, sessions=tuple(sessions), source=str(source) if source else None)


class EngineProtocol(Protocol):
    """What the TUI calls; every method blocks and runs in a worker thread."""

    name: str

    def run_plan(self, plan: Any, sink: Sink, cancel: threading.Event, pause: threading.Event,
                 only: Sequence[str] | None = None) -> None:
        """Run the plan's sessions (or ``only`` those ids), emitting events to ``sink``."""

    def provision(self, sink: Sink, cancel: threading.Event) -> None:
        """Find the phones, check root, push the device scripts, measure clocks."""


# ----------------------------------------------------------------------------- demo

DEMO_PHONES = (
    ev.DeviceConnected(serial="R5CR10ABCDE", model="SM-G991B", manufacturer="samsung",
                       android="14", abi="arm64-v8a", rooted=True, at=0.0),
    ev.DeviceConnected(serial="7c8a9b1d", model="M2102J20SG", manufacturer="Xiaomi",
                       android="13", abi="arm64-v8a", rooted=True, at=0.0),
)
DEMO_OFFSETS = {"R5CR10ABCDE": 2.375, "7c8a9b1d": -1.625}

DEMO_PLAN = PlanOutline(
    name="demo-messengers",
    sessions=(
        QueuedSession("s1-signal", "R5CR10ABCDE", "org.thoughtcrime.securesms", "chat", 12.0),
        QueuedSession("s2-telegram", "7c8a9b1d", "org.telegram.messenger", "chat", 12.0),
        QueuedSession("s3-whatsapp", "R5CR10ABCDE", "com.whatsapp", "voice-call", 12.0),
    ),
    source="(built-in rehearsal plan)",
)

SCENARIO = ("open the app", "open a chat", "send 5 text messages", "send a photo",
            "receive replies", "close the app")
STEPS_BEFORE = ("CheckDevice", "PushScripts", "StartCapture", "StartTracer", "LaunchApp")
STEPS_AFTER = ("StopTracer", "StopCapture", "PullArtifacts", "LabelFlows")


@dataclass
class DemoEngine:
    """A rehearsal engine: realistic events with delays of ``tick`` seconds, no phones.

    ``fail`` names sessions that fail at StartTracer (as a phone that lost root would);
    ``ticks_per_step`` sets how many capture updates each scenario step produces.
    """

    tick: float = 0.25
    ticks_per_step: int = 4
    fail: frozenset[str] = frozenset()
    name: str = "demo"
    runs: list[list[str]] = field(default_factory=list)  # session ids of each run_plan call
    _fails_left: set[str] = field(default_factory=set, init=False)

    def __post_init__(self) -> None:
        self._fails_left = set(self.fail)

    def provision(self, sink: Sink, cancel: threading.Event) -> None:
        sink(ev.LogRecorded("info", "looking for phones on adb"))
        for phone in DEMO_PHONES:
            if cancel.wait(self.tick):
                return
            sink(ev.DeviceConnected(phone.serial, phone.model, phone.manufacturer,
                                    phone.android, phone.abi, phone.rooted))
            sink(ev.ClockMeasured(phone.serial, DEMO_OFFSETS[phone.serial], 0.004))
        sink(ev.PreflightWarned("7c8a9b1d", "battery-saver", "battery saver is on",
                                "turn it off: adb shell settings put global low_power 0"))

    def run_plan(self, plan: Any, sink: Sink, cancel: threading.Event, pause: threading.Event,
                 only: Sequence[str] | None = None) -> None:
        outline = outline_of(plan) if plan is not None else DEMO_PLAN
        todo = [s for s in outline.sessions if only is None or s.session_id in only]
        self.runs.append([s.session_id for s in todo])
        sink(ev.PlanStarted(outline.name, len(todo)))
        self.provision(sink, cancel)
        done = failed = 0
        cancelled = False
        for spec in todo:
            if cancel.is_set():
                cancelled = True
                break
            if pause.is_set():
                sink(ev.LogRecorded("info", f"paused before {spec.session_id}"))
                break
            ok = self._session(spec, sink, cancel)
            done += ok
            failed += not ok
            sink(ev.PlanProgressed(done, failed, 0, len(todo)))
            if cancel.is_set():
                cancelled = True
                break
        skipped = len(todo) - done - failed
        sink(ev.PlanFinished(done, failed, skipped, len(todo), cancelled=cancelled))

    # One session: steps, a scenario with capture/tracer counters, artifacts, labels.
    def _session(self, spec: QueuedSession, sink: Sink, cancel: threading.Event) -> bool:
        sid = spec.session_id
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        run_dir = f"runs/{stamp}_{spec.serial}_{spec.package}"
        sink(ev.SessionStarted(sid, spec.serial, spec.package, spec.scenario, run_dir))
        started: list[str] = []
        for step in STEPS_BEFORE:
            sink(ev.StepStarted(sid, step))
            started.append(step)
            if cancel.wait(self.tick):
                return self._teardown(spec, run_dir, started, sink)
            if step == "StartTracer" and sid in self._fails_left:
                self._fails_left.discard(sid)
                sink(ev.StepFinished(sid, step, False, "attach failed: Operation not permitted"))
                self._teardown(spec, run_dir, started, sink, quiet=True)
                sink(ev.SessionFailed(
                    sid, run_dir, f"{spec.serial}: strace could not attach to {spec.package}",
                    "the phone lost root: open Magisk, grant shell root, then re-run (R)"))
                return False
            sink(ev.StepFinished(sid, step, True))
        sink(ev.StepStarted(sid, "RunScenario"))
        packets = nbytes = lines = 0
        for k, what in enumerate(SCENARIO, 1):
            sink(ev.ScenarioStepStarted(sid, k, len(SCENARIO), what))
            for t in range(self.ticks_per_step):
                if cancel.wait(self.tick):
                    return self._teardown(spec, run_dir, started, sink)
                burst = 40 + 37 * ((k * 7 + t * 3) % 9)
                packets += burst
                nbytes += burst * 610
                lines += burst // 3 + 5
                sink(ev.CaptureProgressed(sid, packets, nbytes, 0))
                sink(ev.TracerProgressed(sid, "strace", (4242, 4250), lines))
        sink(ev.StepFinished(sid, "RunScenario", True))
        for step in STEPS_AFTER:
            sink(ev.StepStarted(sid, step))
            if cancel.wait(self.tick / 2):
                return self._teardown(spec, run_dir, started, sink)
            if step == "PullArtifacts":
                for name, size in (("capture.pcap", nbytes + 24), ("strace.log", lines * 96),
                                   ("netstat.log", 48_000), ("manifest.json", 2_400)):
                    digest = hashlib.sha256(f"{sid}/{name}".encode()).hexdigest()
                    sink(ev.ArtifactPulled(sid, name, f"{run_dir}/{name}", size, digest))
            if step == "LabelFlows":
                flows = packets // 40
                amb, unl = flows // 25, flows // 12
                sink(ev.FlowsLabelled(sid, flows, flows - amb - unl, amb, unl))
            sink(ev.StepFinished(sid, step, True))
            if step in ("StopTracer", "StopCapture"):
                started.remove(step.replace("Stop", "Start"))
        sink(ev.SessionFinished(sid, run_dir, "ok"))
        return True

    def _teardown(self, spec: QueuedSession, run_dir: str, started: list[str], sink: Sink,
                  quiet: bool = False) -> bool:
        sid = spec.session_id
        if not quiet:
            sink(ev.LogRecorded("warning", f"{sid}: stop requested, tearing down"))
        for step in ("StartTracer", "StartCapture"):
            if step in started:
                stop = step.replace("Start", "Stop")
                sink(ev.StepStarted(sid, stop))
                sink(ev.StepFinished(sid, stop, True, "teardown"))
        if not quiet:
            sink(ev.SessionFailed(sid, run_dir, "cancelled by the technician",
                                  "re-run it with R when ready"))
        return False


def rehearsal_events(fail: frozenset[str] = frozenset(), start: float = 1_764_367_200.0,
                     step: float = 0.25, only: Sequence[str] | None = None) -> list[ev.Event]:
    """The events of a rehearsal run with fixed times and run directories, for replaying
    into a front end (tests, snapshots)."""
    import dataclasses

    sink = ev.RecordingSink()
    engine = DemoEngine(tick=0.0, ticks_per_step=2, fail=fail)
    engine.run_plan(DEMO_PLAN, sink, threading.Event(), threading.Event(), only=only)
    out: list[ev.Event] = []
    for i, e in enumerate(sink.events):
        changes: dict[str, Any] = {"at": start + i * step}
        if hasattr(e, "run_dir"):
            changes["run_dir"] = e.run_dir.replace(e.run_dir.split("/")[1].split("_")[0],
                                                   "20261128T220000Z")
        if isinstance(e, ev.ArtifactPulled):
            changes["path"] = e.path.replace(e.path.split("/")[1].split("_")[0],
                                             "20261128T220000Z")
        out.append(dataclasses.replace(e, **changes))
    return out


# ----------------------------------------------------------------------------- real engine


@dataclass(frozen=True, slots=True)
class BatteryRead(ev.Event):
    """The TUI adapter's own note of a phone's battery level (the engine's events lack it)."""

    serial: str
    level: int


@dataclass
class SessionEngine:
    """The real session engine (``controller.plan.run_plan``) behind the TUI's port.

    The engine knows only ``cancel``, shared by every phone of a batch. So that pause can
    let running sessions finish, the plan runs in rounds of at most one session per phone
    (``plan.only(keys)``), phones in parallel within a round; pause stops between rounds,
    stop cancels the running round (the engine tears down). One AP capture spans all
    rounds. The environment is built on first use, in the worker (``env_factory``), so
    bringing a lab up never blocks the screen.
    """

    env: Any = None
    env_factory: Callable[[Sink], Any] | None = None
    name: str = "rig"

    def environment(self, sink: Sink) -> Any:
        if self.env is None:
            if self.env_factory is None:
                from controller.errors import ControllerError

                raise ControllerError("no environment for the session engine")
            self.env = self.env_factory(sink)
        return self.env

    def run_plan(self, plan: Any, sink: Sink, cancel: threading.Event, pause: threading.Event,
                 only: Sequence[str] | None = None) -> None:
        from controller import session

        env = self.environment(sink)
        specs = plan.session_specs(env.serials)
        by_phone: dict[str, list[str]] = {}
        for s in specs:
            if only is None or s.key in only:
                by_phone.setdefault(s.serial, []).append(s.key)
        total = sum(len(v) for v in by_phone.values())
        rounds = [[q[i] for q in by_phone.values() if i < len(q)]
                  for i in range(max((len(q) for q in by_phone.values()), default=0))]
        sink(ev.PlanStarted(plan.name, total))
        counts = {"done": 0, "failed": 0}
        lock = threading.Lock()

        def relay(e: ev.Event) -> None:
            if isinstance(e, (ev.PlanStarted, ev.PlanProgressed, ev.PlanFinished)):
                return  # one plan for the front end, not one per round
            if isinstance(e, (ev.SessionFinished, ev.SessionFailed)):
                with lock:
                    counts["done" if isinstance(e, ev.SessionFinished) else "failed"] += 1
            sink(e)

        capture: Any = getattr(env, "capture", None)
        owns = capture is not None and total > 0 and not capture.running
        started = time.time()
        results: list[Any] = []
        if owns:
            capture.start()
        try:
            for keys in rounds:
                if cancel.is_set():
                    break
                if pause.is_set():
                    sink(ev.LogRecorded("info", f"paused before {', '.join(keys)}"))
                    break
                res = session.run_plan(plan.only(keys), env, relay, cancel)
                results.extend(getattr(res, "results", None) or [])
                sink(ev.PlanProgressed(counts["done"], counts["failed"], 0, total))
        finally:
            if owns:
                from controller.plan import PlanResult, record_batch_capture

                stats = capture.stop()
                sink(ev.LogRecorded("info", f"AP capture stopped: {stats}"))
                # the capture spans every round: check and record it once, as run_plan does
                record_batch_capture(plan, capture, stats,
                                     PlanResult(results=results, cancelled=cancel.is_set()),
                                     sink, started, Path(env.runs_root))
        skipped = total - counts["done"] - counts["failed"]
        sink(ev.PlanFinished(counts["done"], counts["failed"], skipped, total,
                             cancelled=cancel.is_set()))

    def provision(self, sink: Sink, cancel: threading.Event) -> None:
        """Each phone the adb server sees: facts, root, clock offset, preflight warnings."""
        from controller.device import (
            AdbDeviceLink,
            check_root,
            check_tracing,
            list_serials,
            preflight,
            probe_clock,
            read_facts,
        )
        from controller.errors import DeviceError

        env = self.environment(sink)
        serials = sorted(set(env.serials.values())) or [s for s, _ in list_serials(env.client)]
        if not serials:
            raise DeviceError("no phone is attached to adb",
                              "plug the phones in and accept the USB debugging prompt")
        for serial in serials:
            if cancel.is_set():
                return
            link = AdbDeviceLink(env.client, serial)
            facts = read_facts(link)
            root = check_root(link)
            sink(ev.DeviceConnected(serial, facts.model, facts.manufacturer, facts.android,
                                    facts.abi, root.rooted))
            if facts.battery_level is not None:
                sink(BatteryRead(serial, facts.battery_level))
            clock = probe_clock(link)
            sink(ev.ClockMeasured(serial, clock.offset_s, clock.uncertainty_s))
            warns = preflight(link, facts)
            if root.rooted:  # SELinux, Yama, and whether root's strace stays attached
                warns += check_tracing(link)[1]
            for w in warns:
                sink(ev.PreflightWarned(serial, w.check, w.message, w.fix))
