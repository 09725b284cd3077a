"""Batch runs: a plan file (devices × apps × activities × repetitions) and :func:`run_plan`.

``PLAN.yaml``::

    name: lab-smoke
    devices: ["R5CR10ABCDE", "127.0.0.1:5555", {serial: "lab:phone1", ip: 10.0.0.11}]
    apps: [signal, telegram, whatsapp]
    activities: [chat, idle]
    repetitions: 2
    parallelism: 2              # phones at once (sessions on one phone run in order;
                                # a pair's two phones take one slot)
    output: runs                # relative to the plan file
    tracer: strace              # strace | frida | both | none
    params: {contact: Alice}
    scenario_overrides: {signal: {contact: Bob}}
    frida_server: /data/local/tmp/frida-server   # tracer frida|both: where it is on the phones
    capture:
      interface: wlan1          # the AP's phone-facing interface (--lab: the lab's)
      netns: null
      tool: tcpdump             # tcpdump | dumpcap
      snaplen: 0                # bytes kept per packet; 0 keeps whole packets
      ring_file_mb: 100         # a new file every 100 MB ...
      ring_files: null          # ... keeping only the newest N files (null: keep all)
      rotate_seconds: null      # and/or a new file every N seconds
      mtu: 1500                 # the AP link's MTU: the capture QA flags larger frames
      bpf: null                 # a further BPF filter, e.g. "not port 22"
    adb: {host: 127.0.0.1, port: 5037}

Two phones can be paired: their sessions run in lockstep (the same app and activity at
the same time, meeting before each session, its scenario and the scenario's first action;
a side whose peer fails or does not come within ``pair_timeout`` seconds fails naming the
peer; see :mod:`controller.pairing`). The first
of a pair is the ``caller`` (places calls, starts chats), the other the ``callee``
(answers, replies); each side's ``{contact}`` is its peer's ``contact_name`` (a lab
phone's default: its owner's name)::

    devices:
      - {serial: R5CR10ABCDE, name: alice, contact_name: "Alice Rossi"}
      - {serial: "192.168.77.12:5555", name: bob, contact_name: "Bob"}
    pairs: [[alice, bob]]       # or `peer: bob` on alice's entry
    pair_timeout: 300

``capture`` takes every setting of ap_setup's :class:`~ap_setup.config.CaptureConfig`
(also ``buffer_mb``, ``immediate``, ``nano`` and the device filter ``macs``/``ips``) plus
where to capture. ``--interface``, ``--netns`` and ``--frida-server`` of ``flowtruth run``
override the plan.

Sessions on different phones run in parallel over one AP capture (each run dir gets its
phone's split, cut from every file the ring buffer wrote); a failed session does not stop
the others; ``resume`` skips sessions whose run directory already has a manifest with
outcome ``completed``. When the batch ends its capture is checked as a whole
(:func:`ap_setup.capture.qa_capture`: frames over the MTU, drops, a ring buffer that
wrapped) and recorded next to its files in ``<output>/_capture_<stamp>/capture.json``; a
flagged check is a warning.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from analysis.atomic import atomic_write
from analysis.errors import FlowtruthError
from ap_setup.config import CaptureConfig
from controller import events as ev
from controller.device import FRIDA_SERVER, DeviceLink, sha256_file
from controller.errors import ConfigError, ControllerError
from controller.pairing import PairLink, PairSync
from controller.scenario import APPS, read_yaml
from controller.session import (
    Environment,
    SessionResult,
    SessionSpec,
    TcpdumpCapture,
    _utc,
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
    peer: str | None = None
    """The device of this plan this phone is paired with (as in ``pairs``; naming it on
    one of the two entries is enough). The one listed first under ``devices`` calls."""
    contact_name: str | None = Field(default=None, min_length=1)
    """How this phone appears in its peer's contacts: the peer's ``{contact}``. Lab
    phones default to their owner's name; a paired real phone needs it."""

    @property
    def label(self) -> str:
        """The device's short name (run directories, ``peer`` in manifests)."""
        return self.name or self.serial.replace("lab:", "")

    def names(self) -> set[str]:
        """The names ``pairs``/``peer`` may use for this device."""
        return {n for n in (self.name, self.serial, self.serial.removeprefix("lab:")) if n}


def frida_server_path(value: str) -> str:
    """Check a frida-server path on the phones (absolute, a file name at the end)."""
    if (not value.startswith("/") or value.endswith("/")
            or any(c.isspace() or not c.isprintable() for c in value)):
        raise ValueError(f"{value!r} is not an absolute path of a file on the phones "
                         f"(e.g. {FRIDA_SERVER})")
    return value


class CaptureOptions(CaptureConfig):
    """The batch's AP capture: where it runs, plus ap_setup's capture settings (tool,
    snaplen, ring buffer by size and/or time, kernel buffer, device filter)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=True)

    enabled: bool = True
    """Capture at the AP (sessions need it for their capture.pcap and labels)."""
    interface: str | None = None
    """The AP's phone-facing interface (with ``--lab``: the lab's)."""
    netns: str | None = None
    """Network namespace the interface lives in (the lab's AP namespace)."""
    bpf: str | None = None
    """A further BPF expression the captured packets must match (e.g. ``not port 22``)."""
    mtu: int = Field(default=1500, ge=576, le=9000)
    """MTU of the AP link; the capture QA flags frames larger than this (offload leakage)."""

    @field_validator("ring_files")
    @classmethod
    def _ring_needs_size(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v is not None and info.data.get("ring_file_mb") is None:
            raise ValueError("ring_files needs ring_file_mb: the ring buffer keeps the newest "
                             "N files of that size (set ring_file_mb, or drop ring_files)")
        return v

    def settings(self) -> CaptureConfig:
        """The ap_setup capture settings (without where to capture)."""
        return CaptureConfig(**{k: getattr(self, k) for k in CaptureConfig.model_fields})


class LabelOptions(_M):
    enabled: bool = True
    format: Literal["mirage2019", "mirage2022"] = "mirage2019"
    export: str | None = None
    """Also copy every MIRAGE JSON into this directory."""


class AdbOptions(_M):
    host: str = "127.0.0.1"
    port: int = Field(default=5037, gt=0, lt=65536)


MAX_SESSIONS = 100_000
"""Most sessions one plan may expand to (a plan is expanded in memory before it runs)."""


class Plan(_M):
    """A batch of sessions; every field has a docstring and errors name the file and field."""

    name: str = "plan"
    devices: list[DeviceEntry | str] = Field(min_length=1)
    apps: list[AppName] = Field(min_length=1)
    """App names (signal, telegram, whatsapp) or their packages."""
    activities: list[str] = Field(min_length=1)
    repetitions: int = Field(default=1, ge=1, le=10_000)
    parallelism: int = Field(default=4, ge=1)
    output: str = "runs"
    tracer: Literal["strace", "frida", "both", "none"] = "strace"
    frida_server: Annotated[str, AfterValidator(frida_server_path)] = FRIDA_SERVER
    """Where frida-server lives on the phones (``tracer: frida|both`` start it from there);
    ``--frida-server`` overrides it."""
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

    pairs: list[list[str]] = Field(default_factory=list)
    """Paired phones ``[[caller, callee], ...]`` by device name (``name``, serial, or a
    lab phone's name): their sessions run in lockstep (same app and activity at the same
    time); the first of a pair places calls and starts chats, the other answers and
    replies. ``peer:`` on a device entry says the same."""
    pair_timeout: float = Field(default=300.0, gt=0)
    """Seconds a paired session waits for its peer at a barrier (before the session, the
    scenario and its first action) before it fails, naming the peer."""

    only_keys: list[str] | None = None
    """Run only the sessions with these keys (``<device>_<app>_<activity>_r<N>``)."""

    path: Path | None = Field(default=None, exclude=True)

    @field_validator("devices")
    @classmethod
    def _entries(cls, v: list[DeviceEntry | str]) -> list[DeviceEntry | str]:
        return [DeviceEntry(serial=d) if isinstance(d, str) else d for d in v]

    @field_validator("pairs")
    @classmethod
    def _two(cls, v: list[list[str]]) -> list[list[str]]:
        for k, p in enumerate(v):
            if len(p) != 2:
                raise ValueError(f"pairs[{k}] names {len(p)} device(s); a pair is two: "
                                 "[caller, callee]")
        return v

    @model_validator(mode="after")
    def _pairing(self) -> Plan:
        self.pair_roles()  # every pairing error, with its one-line message
        return self

    def pair_roles(self) -> dict[int, tuple[int, str]]:
        """Device index -> (its peer's index, ``caller`` | ``callee``) of paired devices.
        Errors (ValueError) start with ``field <where>:``."""
        devs = self.device_entries
        pairs: list[tuple[int, int, str]] = []  # (caller, callee, where it was said)
        for k, (a, b) in enumerate(self.pairs):
            where = f"pairs[{k}]"
            ia = _device_index(devs, a, where)
            ib = _device_index(devs, b, where)
            if ia == ib:
                raise ValueError(f"field {where}: [{a}, {b}] pairs {devs[ia].label} with itself")
            pairs.append((ia, ib, where))
        for i, d in enumerate(devs):
            if d.peer is None:
                continue
            where = f"devices[{i}].peer"
            j = _device_index(devs, d.peer, where)
            if i == j:
                raise ValueError(f"field {where}: {d.label}'s peer is {d.label} itself")
            if any({x, y} == {i, j} for x, y, _w in pairs):
                continue  # the same pair said twice
            pairs.append((min(i, j), max(i, j), where))  # symmetric: the first listed calls
        roles: dict[int, tuple[int, str]] = {}
        said: dict[int, str] = {}
        for caller, callee, where in pairs:
            for x in (caller, callee):
                if x in roles:
                    raise ValueError(f"field {where}: {devs[x].label} is in two pairs "
                                     f"({said[x]} and {where}); a phone has one peer")
                said[x] = where
            roles[caller] = (callee, "caller")
            roles[callee] = (caller, "callee")
        for i, (j, _role) in sorted(roles.items()):
            d = devs[j]
            if d.contact_name is None and not d.serial.startswith("lab:"):
                raise ValueError(f"field devices[{j}].contact_name: {d.label} is paired with "
                                 f"{devs[i].label} but has no contact_name: set how {d.label} "
                                 f"appears in {devs[i].label}'s contacts")
        return roles

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

    def session_specs(self, serials: dict[str, str] | None = None,
                      contact_names: dict[str, str] | None = None) -> list[SessionSpec]:
        """Every session, grouped by device in plan order. ``contact_names`` maps a
        device's serial (as the plan or adb names it) to how it appears in its peer's
        contacts when its entry has no ``contact_name`` (the lab phones' owners)."""
        sdir = None
        if self.scenario_dir:
            sdir = Path(self.scenario_dir)
            sdir = sdir if sdir.is_absolute() else self.base_dir() / sdir
        devs = self.device_entries
        roles = self.pair_roles()
        tokens: dict[tuple[Any, ...], str] = {}  # one per pair and session: both sides' messages
        out = []
        for di, d in enumerate(devs):
            serial = (serials or {}).get(d.serial, d.serial)
            role, peer, contact = "solo", None, None
            if di in roles:
                pi, role = roles[di]
                peer = devs[pi]
                # (a lab phone's owner comes with the lab: without it, params' contact)
                contact = peer.contact_name or _contact_of(peer, serials, contact_names)
            n = 0
            for rep in range(1, self.repetitions + 1):
                for app in self.apps:
                    for act in self.activities:
                        n += 1
                        params = {**self.params, **self.scenario_overrides.get(app, {})}
                        if contact is not None:
                            params["contact"] = contact
                        if peer is not None and not params.get("token"):
                            # the messages one side sends are the ones the other awaits
                            params["token"] = tokens.setdefault(
                                (min(di, pi), app, act, rep), secrets.token_hex(3))
                        out.append(SessionSpec(
                            serial=serial, app=app, activity=act, repetition=rep,
                            params=params,
                            tracer=self.tracer, netstat=self.netstat,
                            seed=self.seed * 1000003 + di * 10007 + n, wait_scale=self.wait_scale,
                            device_name=d.label, ip=d.ip,
                            scenario_dir=sdir, role=role,
                            peer=peer.label if peer is not None else None))
        if self.only_keys is not None:
            keys = set(self.only_keys)
            # a paired session runs only with its peer's: keep both when either is asked for
            keys |= {s.peer_key for s in out if s.key in keys and s.peer_key}
            out = [s for s in out if s.key in keys]
        return out


def _contact_of(d: DeviceEntry, serials: dict[str, str] | None,
                contact_names: dict[str, str] | None) -> str | None:
    names = contact_names or {}
    for k in (d.serial, (serials or {}).get(d.serial), d.serial.removeprefix("lab:")):
        if k and k in names:
            return names[k]
    return None


def _device_index(devs: list[DeviceEntry], name: str, where: str) -> int:
    for i, d in enumerate(devs):
        if name in d.names():
            return i
    raise ValueError(f"field {where}: {name!r} is not a device of the plan (devices: "
                     f"{', '.join(d.label for d in devs)})")


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for p in loc:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(top level)"


def load_plan(path: str | Path) -> Plan:
    """Read and check a plan; :class:`ConfigError` (exit 2) names the file and field."""
    p = Path(path)
    raw = read_yaml(p)
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: a plan must be a mapping (devices, apps, activities, ...)")
    try:
        plan = Plan.model_validate(raw)
    except ValidationError as err:
        e = err.errors()[0]
        more = f" (and {len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
        msg = str(e["msg"]).removeprefix("Value error, ")
        if not e["loc"] and msg.startswith("field "):  # the plan's checks name their field
            raise ConfigError(f"{p}: {msg}{more}") from None
        raise ConfigError(f"{p}: field {_loc(e['loc'])}: {msg}{more}") from None
    total = len(plan.devices) * len(plan.apps) * len(plan.activities) * plan.repetitions
    if total > MAX_SESSIONS:
        raise ConfigError(f"{p}: {total:,} sessions (devices x apps x activities x "
                          f"repetitions), more than {MAX_SESSIONS:,}", hint="split the plan")
    plan.path = p.resolve()
    from controller.scenario import scenario_for

    sdir = None
    if plan.scenario_dir:
        sdir = Path(plan.scenario_dir)
        sdir = sdir if sdir.is_absolute() else plan.base_dir() / sdir
    roles = plan.pair_roles()
    used = {r for _i, r in roles.values()}
    if len(roles) < len(plan.device_entries):
        used.add("solo")
    for app in plan.apps:  # activities must exist and parameters be given, before any run
        sc = scenario_for(app, sdir)
        for act in plan.activities:
            if act not in sc.activities:
                raise ConfigError(f"{p}: field activities: {sc.app} has no activity {act!r}",
                                  hint="has: " + ", ".join(sc.activities))
            for role in sorted(used):  # the steps of each role the plan's phones play
                sc.steps(act, {**plan.params, **plan.scenario_overrides.get(app, {})},
                         role=role)
    return plan


@dataclass
class PlanResult:
    results: list[SessionResult] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    cancelled: bool = False
    capture_record: Path | None = None
    """The batch capture's ``capture.json`` (None: the plan started no capture)."""
    interrupted: str | None = None
    """Why the user stopped the batch (Ctrl-C, SIGTERM), when they did."""

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
    specs = plan.session_specs(serials if serials is not None else env.serials,
                               env.contact_names)
    result = PlanResult()
    for s in specs:
        if s.serial.startswith("lab:"):
            raise ConfigError(f"{plan.path or 'plan'}: field devices: {s.serial} is a virtual-lab "
                              "phone, but no lab is in use", hint="run with --lab")
    if resume:
        done = completed_keys(Path(env.runs_root))
        todo = []
        for s in specs:  # a pair's sessions run again together unless both completed
            if s.key in done and (s.peer_key is None or s.peer_key in done):
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
    started = time.time()
    owns_capture = False
    if specs and env.capture is not None and not env.capture.running:
        env.capture.start()
        owns_capture = True
    by_device: dict[str, list[SessionSpec]] = {}
    for s in specs:
        by_device.setdefault(s.serial, []).append(s)

    # a pair's two phones run as one unit (one slot of ``parallelism``), in lockstep
    syncs: dict[str, tuple[PairSync, str]] = {}  # serial -> (its pair, its side)
    units: list[list[str]] = []
    for serial, queue in by_device.items():
        peer = queue[0].peer
        if peer is None:
            units.append([serial])
            continue
        if serial in syncs:
            continue
        other = next((x for x, q in by_device.items() if q[0].device_name == peer), None)
        if other is None:  # the peer has no session left to run (resume/only)
            units.append([serial])
            continue
        me = queue[0].device_name or serial
        sync = PairSync((me, peer), timeout=plan.pair_timeout)
        syncs[serial], syncs[other] = (sync, me), (sync, peer)
        units.append([serial, other])

    def pair_link(serial: str, spec: SessionSpec) -> PairLink | None:
        if serial not in syncs:
            return None
        sync, side = syncs[serial]
        return sync.link(side, spec.pair_key)

    def worker(serial: str, queue: list[SessionSpec]) -> None:
        try:
            link = links(serial)
        except Exception as err:  # the phone cannot even be opened: each session fails
            msg = err.one_line() if isinstance(err, FlowtruthError) else str(err)
            for spec in queue:
                pl = pair_link(serial, spec)
                if pl is not None:  # its peer stops waiting for it
                    pl.leave(f"failed ({serial}: {msg})")
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
            pl = pair_link(serial, spec)
            try:
                r = run_session(spec, link, env, sink, cancel, pair=pl)
            except Exception as err:  # never lose the other phones to one bug
                sink(ev.LogRecorded("error", f"{serial}: {type(err).__name__}: {err}"))
                if pl is not None and not pl.left:
                    pl.leave(f"failed (internal error: {type(err).__name__})")
                continue
            with lock:
                result.results.append(r)
                counts["done" if r.ok else "failed"] += 1
                progressed()

    def run_unit(serials_: list[str]) -> None:
        if len(serials_) == 1:
            worker(serials_[0], by_device[serials_[0]])
            return
        other = threading.Thread(target=worker, args=(serials_[1], by_device[serials_[1]]),
                                 name=f"session-{serials_[1]}", daemon=True)
        other.start()
        try:
            worker(serials_[0], by_device[serials_[0]])
        finally:
            other.join()

    try:
        with ThreadPoolExecutor(max_workers=plan.parallelism,
                                thread_name_prefix="session") as pool:
            futs = [pool.submit(run_unit, u) for u in units]
            for f in futs:
                while not f.done():
                    time.sleep(0.1)
                f.result()
    finally:
        from controller.interrupt import reason_of

        result.interrupted = reason_of(cancel)
        if owns_capture and env.capture is not None:
            stats = env.capture.stop()
            sink(ev.LogRecorded("info", f"batch capture stopped: {stats}"))
            result.cancelled = cancel.is_set()
            result.capture_record = record_batch_capture(plan, env.capture, stats, result,
                                                         sink, started, Path(env.runs_root))
    result.cancelled = cancel.is_set()
    sink(ev.PlanFinished(counts["done"], counts["failed"], len(result.skipped), total,
                         result.cancelled))
    return result


CAPTURE_RECORD_SCHEMA_VERSION = 1


def record_batch_capture(plan: Plan, cap: Any, stats: dict[str, int], result: PlanResult,
                         sink: ev.Sink, started: float, runs_root: Path | None = None
                         ) -> Path | None:
    """Check a plan's whole capture (:func:`ap_setup.capture.qa_capture` over every file:
    frames over the MTU, drops) and whether its ring buffer overwrote packets, and record
    it with the counters and the files' checksums in ``capture.json`` next to the files
    (written atomically). A flagged check is a warning event. Never raises: the sessions
    have run and their run directories are complete; a failure here is an error event.
    A capture that does not say where it writes is recorded under ``runs_root``."""
    out_dir = getattr(cap, "out_dir", None)
    if out_dir is None:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(started))
        out_dir = Path(runs_root or plan.output_dir()) / f"_capture_{stamp}"
    path = Path(out_dir) / "capture.json"
    try:
        files = list(cap.files())
        size = sum(f.stat().st_size for f in files)
        sink(ev.LogRecorded("info", f"checking the batch capture: {len(files)} file(s), "
                                    f"{size / 1e6:.1f} MB in {path.parent}"))
        qa_fn = getattr(cap, "qa", None)
        qa = qa_fn(files, stats) if qa_fn is not None else None
        record: dict[str, Any] = qa.to_manifest() if qa is not None else {
            "files": len(files), "problems": []}
        problems: list[str] = list(record["problems"])
        written = stats.get("packets_captured")
        on_disk = record.get("packets")
        overwritten = (written - on_disk if written is not None and on_disk is not None
                       and written > on_disk else 0)
        if overwritten:
            problems.append(
                f"the capture wrote {written} packets but its {len(files)} files hold "
                f"{on_disk}: the ring buffer overwrote the oldest {overwritten} (sessions "
                "split before that kept theirs; raise capture.ring_files or leave it unset)")
        record.update(problems=problems, overwritten=overwritten,
                      mtu=getattr(cap, "mtu", None),
                      drops_known=any(k.startswith("packets_dropped") for k in stats),
                      scope="every file of the batch capture; drops of the whole batch")
        settings = getattr(cap, "settings", None)
        doc = {
            "schema_version": CAPTURE_RECORD_SCHEMA_VERSION,
            "plan": getattr(plan, "name", None),
            "plan_file": getattr(plan, "source", None),
            "started_at": _utc(started),
            "stopped_at": _utc(time.time()),
            "interface": getattr(cap, "interface", None),
            "netns": getattr(cap, "netns", None),
            "argv": cap.argv() if callable(getattr(cap, "argv", None)) else None,
            "settings": settings.model_dump(mode="json") if settings is not None else None,
            "stats": dict(stats),
            "qa": record,
            "files": [{"name": f.name, "size": f.stat().st_size, "sha256": sha256_file(f)}
                      for f in files],
            "sessions": [{"session_id": r.session_id, "outcome": r.outcome,
                          "run_dir": str(r.run_dir)} for r in result.results],
            "skipped": list(result.skipped),
            "cancelled": result.cancelled,
            "interrupted": result.interrupted,
        }
        atomic_write(path, (json.dumps(doc, indent=2) + "\n").encode())
    except Exception as err:  # the batch has run: report, never lose the results to this
        msg = err.one_line() if isinstance(err, FlowtruthError) else f"{type(err).__name__}: {err}"
        sink(ev.LogRecorded("error", f"batch capture check/record in {path.parent} failed: {msg}"))
        return None
    if problems:
        sink(ev.LogRecorded("warning", "batch capture QA: " + "; ".join(problems)
                            + f" (recorded in {path})"))
    else:
        sink(ev.LogRecorded("info", f"batch capture QA ok: {len(files)} file(s), "
                                    f"{record.get('packets', '?')} packets; recorded in {path}"))
    return path


def environment_for(plan: Plan, *, client: Any = None, capture_dir: Path | None = None,
                    interface: str | None = None, netns: str | None = None) -> Environment:
    """The Environment a plan describes: its capture (ap_setup's, with the plan's settings)
    on the AP interface, runs under ``output``, labels, and where frida-server is."""
    runs = plan.output_dir()
    cap = None
    iface = interface or plan.capture.interface
    if plan.capture.enabled:
        if not iface:
            raise ConfigError(f"{plan.path}: field capture.interface: the AP interface is not set",
                              hint="set capture.interface, or run with --lab")
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        cap = TcpdumpCapture(iface, capture_dir or runs / f"_capture_{stamp}",
                             netns=netns or plan.capture.netns,
                             settings=plan.capture.settings(), mtu=plan.capture.mtu,
                             bpf=plan.capture.bpf)
    export = None
    if plan.label.export:
        export = Path(plan.label.export)
        export = export if export.is_absolute() else plan.base_dir() / export
    ap_state = None
    if iface:  # the state file `flowtruth ap up` keeps for this interface (default state dir)
        from ap_setup.config import ApConfig

        try:
            ap_state = ApConfig(interface=iface, netns=netns or plan.capture.netns).state_path
        except ValueError:
            ap_state = None
    return Environment(runs_root=runs, client=client, capture=cap, label=plan.label.enabled,
                       label_format=plan.label.format, export_dir=export,
                       frida_server=plan.frida_server, ap_state=ap_state)


def lab_environment_for(plan: Plan, lab: Any) -> Environment:
    """The Environment of a plan run in a running virtual lab
    (``controller.lab.topology.Lab``): the lab's adb server, phones and AP interface, with
    the plan's capture settings, runs, labels and frida_server."""
    base = environment_for(plan.model_copy(update={"capture": plan.capture.model_copy(
        update={"enabled": False})}))
    return Environment.for_lab(lab, runs_root=base.runs_root, label=base.label,
                               label_format=base.label_format, export_dir=base.export_dir,
                               frida_server=plan.frida_server,
                               capture_settings=plan.capture.settings(),
                               capture_mtu=plan.capture.mtu, capture_bpf=plan.capture.bpf)
