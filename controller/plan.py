"""Batch runs: a plan file (devices × apps × activities × repetitions) and :func:`run_plan`.

``PLAN.yaml``::

    name: lab-smoke
    devices: ["R5CR10ABCDE", "127.0.0.1:5555", {serial: "lab:phone1", ip: 10.0.0.11}]
    apps: [signal, telegram, whatsapp]
    activities: [chat, idle]
    repetitions: 2
    parallelism: 2              # phones at once (sessions on one phone run in order)
    output: runs                # relative to the plan file
    tracer: strace              # strace | frida | both | none
    params: {contact: Alice}
    scenario_overrides: {signal: {contact: Bob}}
    capture: {interface: wlan1, netns: null, snaplen: 262144}
    adb: {host: 127.0.0.1, port: 5037}

Sessions on different phones run in parallel over one AP capture (each run dir gets its
phone's split); a failed session does not stop the others; ``resume`` skips sessions
whose run directory already has a manifest with outcome ``completed``.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator

from analysis.errors import FlowtruthError
from controller import events as ev
from controller.device import DeviceLink
from controller.errors import ConfigError, ControllerError
from controller.scenario import APPS
from controller.session import (
    Environment,
    SessionResult,
    SessionSpec,
    TcpdumpCapture,
    run_session,
)


def _app_name(a: str) -> str:
    if a not in APPS and a not in APPS.values():
        raise ValueError(f"unknown app {a!r} (known: {', '.join(APPS)})")
    return next((k for k, p in APPS.items() if p == a), a)


AppName = Annotated[str, AfterValidator(_app_name)]


class _M(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DeviceEntry(_M):
    serial: str = Field(min_length=1)
    """adb serial (USB), ``HOST:PORT`` (TCP), or ``lab:NAME`` (a virtual-lab phone)."""
    name: str | None = None
    """Short name for run directories."""
    ip: str | None = None
    """The phone's address at the AP (default: read from the phone)."""


class CaptureOptions(_M):
    enabled: bool = True
    interface: str | None = None
    """The AP's phone-facing interface (with ``--lab``: the lab's)."""
    netns: str | None = None
    """Network namespace the interface lives in (the lab's AP namespace)."""
    snaplen: int = Field(default=262144, gt=0)
    bpf: str | None = None


class LabelOptions(_M):
    enabled: bool = True
    format: Literal["mirage2019", "mirage2022"] = "mirage2019"
    export: str | None = None
    """Also copy every MIRAGE JSON into this directory."""


class AdbOptions(_M):
    host: str = "127.0.0.1"
    port: int = Field(default=5037, gt=0, lt=65536)


class Plan(_M):
    """A batch of sessions; every field has a docstring and errors name the file and field."""

    name: str = "plan"
    devices: list[DeviceEntry | str] = Field(min_length=1)
    apps: list[AppName] = Field(min_length=1)
    """App names (signal, telegram, whatsapp) or their packages."""
    activities: list[str] = Field(min_length=1)
    repetitions: int = Field(default=1, ge=1)
    parallelism: int = Field(default=4, ge=1)
    output: str = "runs"
    tracer: Literal["strace", "frida", "both", "none"] = "strace"
    netstat: bool = True
    params: dict[str, str] = Field(default_factory=dict)
    scenario_overrides: dict[str, dict[str, str]] = Field(default_factory=dict)
    """Per-app parameters (contacts, messages) over ``params``."""
    scenario_dir: str | None = None
    wait_scale: float = Field(default=1.0, gt=0)
    """Multiplies every scenario wait (0.1 for quick lab runs)."""
    seed: int = 0
    capture: CaptureOptions = Field(default_factory=CaptureOptions)
    label: LabelOptions = Field(default_factory=LabelOptions)
    adb: AdbOptions = Field(default_factory=AdbOptions)

    only_keys: list[str] | None = None
    """Run only the sessions with these keys (``<device>_<app>_<activity>_r<N>``)."""

    path: Path | None = Field(default=None, exclude=True)

    @field_validator("devices")
    @classmethod
    def _entries(cls, v: list[DeviceEntry | str]) -> list[DeviceEntry | str]:
        return [DeviceEntry(serial=d) if isinstance(d, str) else d for d in v]


    @property
    def device_entries(self) -> list[DeviceEntry]:
        return [d if isinstance(d, DeviceEntry) else DeviceEntry(serial=d) for d in self.devices]

    def base_dir(self) -> Path:
        return self.path.parent if self.path else Path.cwd()

    def output_dir(self) -> Path:
        p = Path(self.output)
        return p if p.is_absolute() else self.base_dir() / p

    @property
    def source(self) -> str | None:
        """The plan file it was read from."""
        return str(self.path) if self.path else None

    @property
    def sessions(self) -> list[SessionSpec]:
        """Every session (serials as the plan names them)."""
        return self.session_specs()

    def only(self, keys: list[str]) -> Plan:
        """The same plan restricted to the sessions with these keys."""
        return self.model_copy(update={"only_keys": list(keys)})

    def session_specs(self, serials: dict[str, str] | None = None) -> list[SessionSpec]:
        """Every session, grouped by device in plan order."""
        sdir = None
        if self.scenario_dir:
            sdir = Path(self.scenario_dir)
            sdir = sdir if sdir.is_absolute() else self.base_dir() / sdir
        out = []
        for di, d in enumerate(self.device_entries):
            serial = (serials or {}).get(d.serial, d.serial)
            n = 0
            for rep in range(1, self.repetitions + 1):
                for app in self.apps:
                    for act in self.activities:
                        n += 1
                        out.append(SessionSpec(
                            serial=serial, app=app, activity=act, repetition=rep,
                            params={**self.params, **self.scenario_overrides.get(app, {})},
                            tracer=self.tracer, netstat=self.netstat,
                            seed=self.seed * 1000003 + di * 10007 + n, wait_scale=self.wait_scale,
                            device_name=d.name or d.serial.replace("lab:", ""), ip=d.ip,
                            scenario_dir=sdir))
        if self.only_keys is not None:
            out = [s for s in out if s.key in set(self.only_keys)]
        return out


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for p in loc:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(top level)"


def load_plan(path: str | Path) -> Plan:
    """Read and check a plan; :class:`ConfigError` (exit 2) names the file and field."""
    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except OSError as err:
        raise ConfigError(f"{p}: cannot read: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{p}: not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: a plan must be a mapping (devices, apps, activities, ...)")
    try:
        plan = Plan.model_validate(raw)
    except ValidationError as err:
        e = err.errors()[0]
        more = f" (and {len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
        msg = str(e["msg"]).removeprefix("Value error, ")
        raise ConfigError(f"{p}: field {_loc(e['loc'])}: {msg}{more}") from None
    plan.path = p.resolve()
    from controller.scenario import scenario_for

    sdir = None
    if plan.scenario_dir:
        sdir = Path(plan.scenario_dir)
        sdir = sdir if sdir.is_absolute() else plan.base_dir() / sdir
    for app in plan.apps:  # activities must exist and parameters be given, before any run
        sc = scenario_for(app, sdir)
        for act in plan.activities:
            if act not in sc.activities:
                raise ConfigError(f"{p}: field activities: {sc.app} has no activity {act!r}",
                                  hint="has: " + ", ".join(sc.activities))
            sc.steps(act, {**plan.params, **plan.scenario_overrides.get(app, {})})
    return plan


@dataclass
class PlanResult:
    results: list[SessionResult] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    cancelled: bool = False

    @property
    def failed(self) -> list[SessionResult]:
        return [r for r in self.results if not r.ok]

    @property
    def ok(self) -> bool:
        return not self.failed and not self.cancelled


def completed_keys(runs_root: Path) -> set[str]:
    """Session keys whose run directory holds a manifest with outcome ``completed``."""
    done: set[str] = set()
    if not runs_root.is_dir():
        return done
    for m in runs_root.glob("*/manifest.json"):
        try:
            data = json.loads(m.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("outcome") == "completed":
            name = m.parent.name
            done.add(str(data.get("session_id") or name.split("_", 1)[-1]))
    return done


LinkFactory = Callable[[str], DeviceLink]


def run_plan(plan: Plan, env: Environment, sink: ev.Sink, cancel: threading.Event | None = None,
             resume: bool = False, links: LinkFactory | None = None,
             serials: dict[str, str] | None = None) -> PlanResult:
    """Run every session of a plan (phones in parallel, each phone's sessions in order).

    ``links`` opens a :class:`DeviceLink` for a serial (default: adbutils over
    ``env.client``); ``serials`` maps plan device names (``lab:NAME``) to adb serials.
    One AP capture (``env.capture``) is started for the batch and stopped at the end.
    """
    cancel = cancel or threading.Event()
    specs = plan.session_specs(serials if serials is not None else env.serials)
    result = PlanResult()
    for s in specs:
        if s.serial.startswith("lab:"):
            raise ConfigError(f"{plan.path or 'plan'}: field devices: {s.serial} is a virtual-lab "
                              "phone, but no lab is in use", hint="run with --lab")
    if resume:
        done = completed_keys(Path(env.runs_root))
        todo = []
        for s in specs:
            if s.key in done:
                result.skipped.append(s.key)
            else:
                todo.append(s)
        specs = todo
    total = len(specs) + len(result.skipped)
    sink(ev.PlanStarted(plan.name, total))
    if links is None:
        from controller.device import AdbDeviceLink

        if env.client is None:
            raise ControllerError("run_plan needs env.client (an adbutils client) or links=")
        client = env.client

        def links(serial: str) -> DeviceLink:
            return AdbDeviceLink(client, serial)

    lock = threading.Lock()
    counts = {"done": 0, "failed": 0}

    def progressed() -> None:
        sink(ev.PlanProgressed(counts["done"], counts["failed"], len(result.skipped), total))

    progressed()
    owns_capture = False
    if specs and env.capture is not None and not env.capture.running:
        env.capture.start()
        owns_capture = True
    by_device: dict[str, list[SessionSpec]] = {}
    for s in specs:
        by_device.setdefault(s.serial, []).append(s)

    def worker(serial: str, queue: list[SessionSpec]) -> None:
        try:
            link = links(serial)
        except Exception as err:  # the phone cannot even be opened: each session fails
            msg = err.one_line() if isinstance(err, FlowtruthError) else str(err)
            for spec in queue:
                sink(ev.SessionFailed(spec.key, "", f"{serial}: {msg}"))
                with lock:
                    result.results.append(SessionResult(spec.key, Path(env.runs_root),
                                                        "failed", f"{serial}: {msg}"))
                    counts["failed"] += 1
                    progressed()
            return
        for spec in queue:
            if cancel.is_set():
                return
            try:
                r = run_session(spec, link, env, sink, cancel)
            except Exception as err:  # never lose the other phones to one bug
                sink(ev.LogRecorded("error", f"{serial}: {type(err).__name__}: {err}"))
                continue
            with lock:
                result.results.append(r)
                counts["done" if r.ok else "failed"] += 1
                progressed()

    try:
        with ThreadPoolExecutor(max_workers=plan.parallelism,
                                thread_name_prefix="session") as pool:
            futs = [pool.submit(worker, s, q) for s, q in by_device.items()]
            for f in futs:
                while not f.done():
                    time.sleep(0.1)
                f.result()
    finally:
        if owns_capture and env.capture is not None:
            stats = env.capture.stop()
            sink(ev.LogRecorded("info", f"batch capture stopped: {stats}"))
    result.cancelled = cancel.is_set()
    sink(ev.PlanFinished(counts["done"], counts["failed"], len(result.skipped), total,
                         result.cancelled))
    return result


def environment_for(plan: Plan, *, client: Any = None, capture_dir: Path | None = None,
                    interface: str | None = None, netns: str | None = None) -> Environment:
    """The Environment a plan describes (capture on the AP interface, runs under output)."""
    runs = plan.output_dir()
    cap = None
    iface = interface or plan.capture.interface
    if plan.capture.enabled:
        if not iface:
            raise ConfigError(f"{plan.path}: field capture.interface: the AP interface is not set",
                              hint="set capture.interface, or run with --lab")
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        cap = TcpdumpCapture(iface, capture_dir or runs / f"_capture_{stamp}",
                             netns=netns or plan.capture.netns, snaplen=plan.capture.snaplen,
                             bpf=plan.capture.bpf)
    export = None
    if plan.label.export:
        export = Path(plan.label.export)
        export = export if export.is_absolute() else plan.base_dir() / export
    return Environment(runs_root=runs, client=client, capture=cap, label=plan.label.enabled,
                       label_format=plan.label.format, export_dir=export)
