"""What the TUI knows about the rig, folded from engine events; no Textual here.

:meth:`RigState.apply` takes one :mod:`controller.events` event and says which parts
of the screen changed, so the app's handler refreshes only those widgets. Keeping the
fold pure makes it testable without a terminal.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from controller import events as ev
from controller.tui.engine import BatteryRead, PlanOutline

# Parts of the screen an event can change.
DEVICES, QUEUE, SESSION, RESULTS, LOG, AP, PLAN = (
    "devices", "queue", "session", "results", "log", "ap", "plan")


@dataclass
class DeviceRow:
    serial: str
    model: str = "?"
    manufacturer: str = ""
    android: str = "?"
    abi: str = "?"
    rooted: bool | None = None
    battery: int | None = None
    tracer: str = "idle"
    """What the tracer column shows: idle, starting, the running tracers, stopping, ..."""
    tracing: dict[str, tuple[int, ...]] = field(default_factory=dict)
    """The tracers the running session reported (strace, frida) and their pids."""
    clock_offset: float | None = None
    clock_uncertainty: float | None = None
    connected: bool = True
    warnings: list[str] = field(default_factory=list)


@dataclass
class SessionRow:
    session_id: str
    serial: str
    package: str
    scenario: str = ""
    duration_s: float | None = None
    status: str = "queued"  # queued | running | ok | failed | cancelled | skipped
    step: str = ""
    scenario_step: str = ""
    scenario_index: int = 0
    scenario_total: int = 0
    started_at: float | None = None
    finished_at: float | None = None
    packets: int = 0
    bytes: int = 0
    drops: int = 0
    syscalls: int = 0
    """Traced lines over every tracer of the session (strace lines plus frida events)."""
    traced: dict[str, int] = field(default_factory=dict)
    flows: int = 0
    labelled: int = 0
    ambiguous: int = 0
    unlabelled: int = 0
    run_dir: str = ""
    artifacts: dict[str, int] = field(default_factory=dict)
    error: str = ""
    hint: str = ""
    rate: deque[float] = field(default_factory=lambda: deque(maxlen=60))
    last_sample: tuple[float, int] | None = None
    by_app: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def progress(self) -> float:
        """0..1: scenario steps begun, 1 once the session ended well."""
        if self.status == "ok":
            return 1.0
        if not self.scenario_total:
            return 0.0
        return max(0.0, (self.scenario_index - 1) / self.scenario_total)

    @property
    def labelled_share(self) -> float | None:
        return self.labelled / self.flows if self.flows else None

    @property
    def packet_rate(self) -> float:
        return self.rate[-1] if self.rate else 0.0


@dataclass
class ApRow:
    """The access point as the dashboard shows it (probe plus capture events)."""

    up: bool | None = None  # None: not probed yet
    interface: str = ""
    ssid: str = ""
    clients: int = 0
    capture_bytes: int | None = None
    detail: str = ""
    restarts: tuple[tuple[str, int], ...] = ()
    """Daemons the AP's supervisor restarted, with how often."""
    gave_up: tuple[str, ...] = ()
    """The supervisor's line for each daemon it stopped restarting."""
    supervisor: bool | None = None
    """The supervisor runs (False: it is recorded but gone; None: none, or unknown)."""


TRACER_ORDER = ("strace", "frida")
TRACER_STEPS = {"StartTracer": "starting", "StartTracers": "starting",
                "StopTracer": "stopping", "StopTracers": "stopping"}


def tracer_label(tracing: dict[str, tuple[int, ...]]) -> str:
    """The tracer column: one tracer with its first pid (``strace 4242+`` when it traces
    more), several joined (``strace+frida 3 pids``: with ``tracer: both`` each reports
    its own processes)."""
    if not tracing:
        return "tracing"
    names = sorted(tracing, key=lambda n: (TRACER_ORDER.index(n) if n in TRACER_ORDER
                                           else len(TRACER_ORDER), n))
    if len(names) == 1:
        pids = tracing[names[0]]
        pid = f" {pids[0]}" if pids else ""
        return f"{names[0]}{pid}{'+' if len(pids) > 1 else ''}"
    n = len({p for pids in tracing.values() for p in pids})
    return "+".join(names) + (f" {n} pid{'s' if n != 1 else ''}" if n else "")


class RigState:
    """Devices, plan queue, the current session, the AP and the log, folded from events."""

    def __init__(self, outline: PlanOutline | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.devices: dict[str, DeviceRow] = {}
        self.sessions: dict[str, SessionRow] = {}
        self.ap = ApRow()
        self.current: str | None = None
        self.plan_name = ""
        self.plan_source: str | None = None
        self.plan_state = "idle"  # idle | running | pausing | stopping | paused | stopped | finished
        self.plan_counts = (0, 0, 0, 0)  # done, failed, skipped, total
        self.log: list[tuple[float, str, str]] = []
        if outline is not None:
            self.load_outline(outline)

    def load_outline(self, outline: PlanOutline) -> None:
        self.plan_name = outline.name
        self.plan_source = outline.source
        for s in outline.sessions:
            self.sessions.setdefault(
                s.session_id,
                SessionRow(s.session_id, s.serial, s.package, s.scenario, s.duration_s))

    @property
    def running(self) -> bool:
        return self.plan_state in ("running", "pausing", "stopping")

    @property
    def session(self) -> SessionRow | None:
        """The running session, else the last one that ran."""
        return self.sessions.get(self.current) if self.current else None

    def failed_sessions(self) -> list[SessionRow]:
        return [s for s in self.sessions.values() if s.status in ("failed", "cancelled")]

    def _log(self, at: float, level: str, text: str) -> None:
        self.log.append((at, level, text))

    def _row(self, sid: str) -> SessionRow:
        row = self.sessions.get(sid)
        if row is None:
            row = self.sessions[sid] = SessionRow(sid, "?", "?")
        return row

    def apply(self, e: ev.Event) -> set[str]:
        """Fold one event in; return the parts of the screen that changed."""
        match e:
            case ev.PlanStarted():
                self.plan_name = e.plan or self.plan_name
                self.plan_state = "running"
                self.plan_counts = (0, 0, 0, e.sessions)
                self._log(e.at, "info", f"plan {e.plan}: {e.sessions} session(s)")
                return {PLAN, LOG}
            case ev.PlanProgressed():
                self.plan_counts = (e.done, e.failed, e.skipped, e.total)
                return {PLAN}
            case ev.PlanFinished():
                self.plan_counts = (e.done, e.failed, e.skipped, e.total)
                if e.cancelled:
                    self.plan_state = "stopped"
                elif self.plan_state == "pausing" and e.done + e.failed < e.total:
                    self.plan_state = "paused"
                else:
                    self.plan_state = "finished"
                for row in self.sessions.values():
                    if row.status == "running":
                        row.status = "cancelled" if e.cancelled else "failed"
                how = "stopped, teardown complete" if e.cancelled else self.plan_state
                self._log(e.at, "warning" if e.failed or e.cancelled else "info",
                          f"plan {how}: {e.done} ok, {e.failed} failed, {e.skipped} not run")
                return {PLAN, QUEUE, SESSION, LOG, RESULTS}
            case ev.DeviceConnected():
                dev = self.devices.get(e.serial) or DeviceRow(e.serial)
                dev.model, dev.manufacturer, dev.android = e.model, e.manufacturer, e.android
                dev.abi, dev.rooted, dev.connected = e.abi, e.rooted, True
                self.devices[e.serial] = dev
                self._log(e.at, "info", f"{e.serial}: {e.manufacturer} {e.model}, Android "
                                        f"{e.android}, {'rooted' if e.rooted else 'NOT rooted'}")
                return {DEVICES, LOG}
            case ev.DeviceLost():
                dev = self.devices.setdefault(e.serial, DeviceRow(e.serial))
                dev.connected = False
                dev.tracer = "-"
                dev.tracing.clear()
                self._log(e.at, "error", f"{e.serial}: lost ({e.reason})")
                return {DEVICES, LOG}
            case ev.ClockMeasured():
                dev = self.devices.setdefault(e.serial, DeviceRow(e.serial))
                dev.clock_offset, dev.clock_uncertainty = e.offset_s, e.uncertainty_s
                return {DEVICES}
            case ev.PreflightWarned():
                dev = self.devices.setdefault(e.serial, DeviceRow(e.serial))
                dev.warnings.append(e.check)
                self._log(e.at, "warning", f"{e.serial}: {e.message} (fix: {e.fix})")
                return {DEVICES, LOG}
            case ev.SessionStarted():
                row = self._row(e.session_id)
                row.serial, row.package, row.run_dir = e.serial, e.package, e.run_dir
                row.scenario = row.scenario or e.activity
                row.status, row.started_at, row.finished_at = "running", e.at, None
                row.step = row.scenario_step = row.error = row.hint = ""
                row.scenario_index = row.scenario_total = 0
                row.packets = row.bytes = row.drops = row.syscalls = 0
                row.traced.clear()
                row.flows = row.labelled = row.ambiguous = row.unlabelled = 0
                row.rate.clear()
                row.last_sample = None
                self.current = e.session_id
                if e.serial in self.devices:
                    self.devices[e.serial].tracing.clear()
                self._log(e.at, "info", f"{e.session_id}: {e.package} on {e.serial}")
                return {QUEUE, SESSION, LOG}
            case ev.StepStarted():
                row = self._row(e.session_id)
                row.step = e.step
                changed = {QUEUE, SESSION}
                # the engine's steps are StartTracers/StopTracers, the rehearsal's singular
                if e.step in TRACER_STEPS and row.serial in self.devices:
                    dev = self.devices[row.serial]
                    dev.tracer = TRACER_STEPS[e.step]
                    if e.step.startswith("Start"):
                        dev.tracing.clear()
                    changed.add(DEVICES)
                return changed
            case ev.StepFinished():
                row = self._row(e.session_id)
                changed = {SESSION}
                if e.step in TRACER_STEPS and row.serial in self.devices:
                    dev = self.devices[row.serial]
                    if not e.ok:
                        dev.tracer = "failed"
                    elif e.step.startswith("Start"):
                        dev.tracer = tracer_label(dev.tracing)
                    else:
                        dev.tracer = "idle"
                        dev.tracing.clear()
                    changed.add(DEVICES)
                if not e.ok:
                    self._log(e.at, "error", f"{e.session_id}: {e.step} failed: {e.detail}")
                    changed.add(LOG)
                return changed
            case ev.ScenarioStepStarted():
                row = self._row(e.session_id)
                row.scenario_index, row.scenario_total = e.index, e.total
                row.scenario_step = e.description
                return {QUEUE, SESSION}
            case ev.CaptureProgressed():
                row = self._row(e.session_id)
                if row.last_sample is not None and e.at > row.last_sample[0]:
                    dt = e.at - row.last_sample[0]
                    row.rate.append(max(0.0, (e.packets - row.last_sample[1]) / dt))
                row.last_sample = (e.at, e.packets)
                row.packets, row.bytes, row.drops = e.packets, e.bytes, e.drops
                return {SESSION, AP}
            case ev.TracerProgressed():
                row = self._row(e.session_id)
                row.traced[e.tracer] = e.lines
                row.syscalls = sum(row.traced.values())
                if row.serial in self.devices:
                    dev = self.devices[row.serial]
                    dev.tracing[e.tracer] = tuple(e.pids)
                    dev.tracer = tracer_label(dev.tracing)
                    return {SESSION, DEVICES}
                return {SESSION}
            case ev.ArtifactPulled():
                row = self._row(e.session_id)
                row.artifacts[e.name] = e.size
                return {SESSION}
            case ev.FlowsLabelled():
                row = self._row(e.session_id)
                row.flows, row.labelled = e.flows, e.labelled
                row.ambiguous, row.unlabelled = e.ambiguous, e.unlabelled
                return {SESSION, RESULTS}
            case ev.SessionFinished():
                row = self._row(e.session_id)
                row.status, row.finished_at, row.run_dir = "ok", e.at, e.run_dir or row.run_dir
                row.step = "done"
                self._log(e.at, "info", f"{e.session_id}: finished ({e.outcome})")
                return {QUEUE, SESSION, RESULTS, LOG}
            case ev.SessionFailed():
                row = self._row(e.session_id)
                cancelled = "cancel" in e.error
                row.status = "cancelled" if cancelled else "failed"
                row.finished_at, row.error, row.hint = e.at, e.error, e.hint
                row.run_dir = e.run_dir or row.run_dir
                fix = f" (fix: {e.hint})" if e.hint else ""
                self._log(e.at, "warning" if cancelled else "error",
                          f"{e.session_id}: {e.error}{fix}")
                return {QUEUE, SESSION, RESULTS, LOG}
            case BatteryRead():  # the TUI adapter's own event
                self.devices.setdefault(e.serial, DeviceRow(e.serial)).battery = e.level
                return {DEVICES}
            case ev.LogRecorded():
                self._log(e.at, e.level, e.text)
                return {LOG}
        return set()

    def elapsed(self, row: SessionRow) -> float:
        if row.started_at is None:
            return 0.0
        end = row.finished_at if row.finished_at is not None else self.clock()
        return max(0.0, end - row.started_at)

    def remaining(self, row: SessionRow) -> float | None:
        """Seconds left: the plan's duration if known, else from scenario progress."""
        if row.status != "running":
            return 0.0 if row.status == "ok" else None
        elapsed = self.elapsed(row)
        if row.duration_s:
            return max(0.0, row.duration_s - elapsed)
        p = row.progress
        return elapsed / p - elapsed if p > 0 else None
