"""The session engine: one scripted app session on one phone, from preflight to labels.

Steps (each announced with ``StepStarted``/``StepFinished``)::

    Preflight → StartCapture → PushScripts → StartTracers → RunScenario → StopTracers
    → StopCapture → PullArtifacts → Label → Export

:func:`run_session` never raises for a known failure: it returns a
:class:`SessionResult` whose outcome is ``completed``, ``failed`` or ``stopped``
(cancelled), and emits ``SessionFinished`` or ``SessionFailed``. Teardown (stop the
tracers and poller, kill stragglers on the phone, stop the capture if this session
started it, split the capture, pull whatever exists) always runs, and the run directory
keeps every artifact collected so far with a manifest that says why it failed.

The capture is one AP-side capture (:class:`TcpdumpCapture` over ap_setup's ``Capture``:
tcpdump or dumpcap, ring buffer, device filter; in the lab inside the AP namespace). A
plan starts it once for all its sessions; a lone session starts and stops it itself.
Each session's ``capture.pcap`` is the packets of the phone's addresses within the
session's time window, from every rotated file (:func:`split_pcap`). StopCapture records
the capture program's counters in ``manifest["capture"]["stats"]`` (a plan's running
tcpdump reports them on SIGUSR1) and ap_setup's QA of the session's packets and drops in
``manifest["capture"]["qa"]``; a flagged QA is a warning (``LogRecorded``).

API (what the CLI, the TUI and the demo call)::

    env = Environment(runs_root=Path("runs"), client=adb_client(5037),
                      capture=TcpdumpCapture("wlan1", Path("runs/_capture")))
    env = Environment.for_lab(Lab.load(), runs_root="runs")     # the virtual lab
    res = run_session(SessionSpec(serial, "signal", "chat"), AdbDeviceLink(client, serial),
                      env, sink, cancel)                         # -> SessionResult
    res = run_plan(load_plan("PLAN.yaml"), env, sink, cancel, resume=False)  # -> PlanResult

Tracers (``SessionSpec.tracer``): ``strace`` runs ``strace_launcher.sh`` on the phone;
``frida`` runs :class:`device_scripts.frida_loader.FridaPackageTracer` here, on the
controller, against the phone's frida device (:meth:`Environment.open_frida`: frida-server
on a phone through ``adb forward``; in the lab frida's local device narrowed to the phone's
network namespace), so its per-process logs land in ``frida/`` of the run directory and
are merged into ``frida.jsonl`` (on the phone's clock) when it stops; ``both`` gives frida
the app's main process and the launcher (role ``secondary``) the others, never one pid to
both; ``none`` leaves the netstat poller alone.

Strace binary by ABI: ``arm64-v8a``/``armeabi-v7a`` (real phones) take the static build
from :mod:`device_scripts.strace_cache`; ``x86_64`` (virtual-lab phones are namespaces of
this host, as Android emulator images report) takes the host's ``/usr/bin/strace``.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import shlex
import shutil
import struct
import subprocess
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from analysis.errors import FlowtruthError
from controller import events as ev
from controller.device import (
    FRIDA_SERVER,
    DeviceFacts,
    DeviceLink,
    FridaEndpoint,
    PreflightWarning,
    bounded,
    local_frida,
    phone_frida,
    read_apps,
    read_facts,
    read_packages,
    require_root,
    root_shell,
    sha256_file,
)
from controller.device import preflight as preflight_checks
from controller.device import probe_clock as probe_clock_
from controller.errors import CaptureError, ConfigError, ControllerError, DeviceError
from controller.scenario import (
    Scenario,
    ScenarioCancelled,
    ScenarioRunner,
    check_locale,
    check_version,
    read_locale,
    scenario_for,
)

MANIFEST_SCHEMA_VERSION = 1
STEPS = ("Preflight", "StartCapture", "PushScripts", "StartTracers", "RunScenario",
         "StopTracers", "StopCapture", "PullArtifacts", "Label", "Export")
TRACERS = ("strace", "frida", "both", "none")


# --------------------------------------------------------------------------- capture


class CapturePort(Protocol):
    """The AP-side capture a session or plan uses."""

    interface: str
    snaplen: int

    @property
    def running(self) -> bool: ...

    def start(self) -> None: ...

    def stop(self) -> dict[str, int]: ...

    def files(self) -> list[Path]: ...


class TcpdumpCapture:
    """The engine's :class:`CapturePort`: :class:`ap_setup.capture.Capture` (tcpdump or
    dumpcap on the AP interface, optionally inside a network namespace, with its ring
    buffer, device filter and snaplen from ``settings``) plus live counters that follow
    its rotated files, and its quality check (:func:`ap_setup.capture.qa_capture`)."""

    def __init__(self, interface: str, out_dir: Path, *, netns: str | None = None,
                 snaplen: int = 262144, bpf: str | None = None, settings: Any = None,
                 mtu: int = 1500, runner: Any = None) -> None:
        from ap_setup.capture import Capture
        from ap_setup.config import CaptureConfig
        from ap_setup.runner import SubprocessRunner

        if settings is None:
            from pydantic import ValidationError

            try:
                settings = CaptureConfig(snaplen=snaplen)
            except ValidationError as err:
                raise ConfigError(f"capture snaplen {snaplen}: "
                                  f"{err.errors()[0]['msg']}") from None
        self.settings = settings
        self.interface = interface
        self.out_dir = Path(out_dir)
        self.netns = netns
        self.snaplen = int(settings.snaplen or 262144)
        self.mtu = mtu
        self.capture = Capture(settings, interface, self.out_dir,
                               runner if runner is not None else SubprocessRunner(netns),
                               basename="batch", bpf=bpf)
        self.stats: dict[str, int] = {}
        self._count_lock = threading.Lock()
        self._counted: dict[Path, tuple[int, int]] = {}  # file -> (inode, bytes read)
        self._packets = 0
        self._bytes = 0

    @property
    def running(self) -> bool:
        return self.capture.running

    def argv(self) -> list[str]:
        return self.capture.argv()

    def start(self) -> None:
        if self.running:
            return
        with self._count_lock:
            self._counted.clear()
            self._packets = self._bytes = 0
        self.capture.start()

    def stop(self) -> dict[str, int]:
        """Stop (SIGINT, so the last packets are written); the capture program's counters."""
        if self.capture.record is None:
            return self.stats
        self.stats = self.capture.stop()
        self.capture.record = None
        return self.stats

    def live_stats(self) -> dict[str, int]:
        """The counters of the running capture so far (tcpdump; empty when unknown)."""
        return self.capture.live_stats()

    def files(self) -> list[Path]:
        return self.capture.files()

    def qa(self, files: Sequence[Path], stats: dict[str, int] | None = None) -> Any:
        """:func:`ap_setup.capture.qa_capture` of ``files``: frames larger than the MTU and
        drops (from ``stats``)."""
        from ap_setup.capture import qa_capture

        return qa_capture(files, self.mtu, stats)

    def counters(self) -> tuple[int, int]:
        """(packets, bytes) written so far over every file, rotated ones included; reads
        only what was added since the last call (a ring buffer's reused file starts over)."""
        with self._count_lock:
            for path in self.files():
                try:
                    st = path.stat()
                    ino, done = self._counted.get(path, (st.st_ino, 0))
                    if ino != st.st_ino or st.st_size < done:
                        done = 0  # the ring buffer wrote this name anew
                    done = self._read_records(path, st.st_size, done)
                    self._counted[path] = (st.st_ino, done)
                except OSError:
                    continue
            return self._packets, self._bytes

    def _read_records(self, path: Path, size: int, done: int) -> int:
        with open(path, "rb") as f:
            magic = f.read(4)
            if len(magic) < 4:
                return done
            endian = "<" if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1") else ">"
            at = max(done, 24)
            if done < 24 and size >= 24:
                self._bytes += 24
            f.seek(at)
            while True:
                h = f.read(16)
                if len(h) < 16:
                    break
                incl = struct.unpack(endian + "I", h[8:12])[0]
                if at + 16 + incl > size:
                    break
                f.seek(incl, 1)
                at += 16 + incl
                self._packets += 1
                self._bytes += 16 + incl
            return at if size >= 24 else done


_ETH_V4, _ETH_V6 = 0x0800, 0x86DD


def _ip_addrs(linktype: int, frame: bytes) -> tuple[bytes, bytes] | None:
    if linktype == 1:  # Ethernet (with VLAN tags)
        off, et = 12, None
        while off + 2 <= len(frame):
            et = int.from_bytes(frame[off:off + 2], "big")
            if et in (0x8100, 0x88A8):
                off += 4
                continue
            off += 2
            break
    elif linktype == 113:  # Linux cooked v1
        off, et = 16, int.from_bytes(frame[14:16], "big")
    elif linktype == 276:  # Linux cooked v2
        off, et = 20, int.from_bytes(frame[0:2], "big")
    elif linktype in (101, 12, 14):  # raw IP
        off, et = 0, (_ETH_V6 if frame[:1] and frame[0] >> 4 == 6 else _ETH_V4)
    else:
        return None
    ip = frame[off:]
    if et == _ETH_V4 and len(ip) >= 20:
        return ip[12:16], ip[16:20]
    if et == _ETH_V6 and len(ip) >= 40:
        return ip[8:24], ip[24:40]
    return None


def split_pcap(sources: Sequence[Path], out: Path, addresses: Sequence[str],
               start: float, end: float) -> int:
    """Write the packets to or from ``addresses`` with ``start <= ts <= end`` as one pcap;
    returns how many. Reads classic pcap (what tcpdump writes); a truncated last record of
    a file still being written is left out."""
    import ipaddress

    want = {ipaddress.ip_address(a).packed for a in addresses}
    n = 0
    tmp = out.with_name(out.name + ".part")
    header_written = False
    with open(tmp, "wb") as w:
        for src in sources:
            with open(src, "rb") as f:
                gh = f.read(24)
                if len(gh) < 24:
                    continue
                magic = gh[:4]
                if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1"):
                    endian = "<"
                elif magic in (b"\xa1\xb2\xc3\xd4", b"\xa1\xb2\x3c\x4d"):
                    endian = ">"
                else:
                    raise CaptureError(f"{src}: not a classic pcap file")
                nano = magic in (b"\x4d\x3c\xb2\xa1", b"\xa1\xb2\x3c\x4d")
                linktype = struct.unpack(endian + "I", gh[20:24])[0] & 0x0FFFFFFF
                if not header_written:
                    w.write(gh)
                    header_written = True
                rec = struct.Struct(endian + "IIII")
                while True:
                    h = f.read(16)
                    if len(h) < 16:
                        break
                    sec, frac, incl, _orig = rec.unpack(h)
                    data = f.read(incl)
                    if len(data) < incl:
                        break
                    ts = sec + frac / (1e9 if nano else 1e6)
                    if ts < start or ts > end:
                        continue
                    ips = _ip_addrs(linktype, data)
                    if ips is None or (ips[0] not in want and ips[1] not in want):
                        continue
                    w.write(h)
                    w.write(data)
                    n += 1
        if not header_written:  # an empty but valid pcap
            w.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 262144, 1))
    os.replace(tmp, out)
    return n


# --------------------------------------------------------------------------- spec, env


@dataclass(frozen=True)
class SessionSpec:
    """One session: which phone, app, activity, repetition, and how to trace it."""

    serial: str
    app: str
    """App name (signal, telegram, whatsapp) or package."""
    activity: str
    repetition: int = 1
    params: dict[str, str] = field(default_factory=dict)
    tracer: str = "strace"
    netstat: bool = True
    seed: int = 0
    wait_scale: float = 1.0
    device_name: str | None = None
    """A short name for run directories (default: the serial, sanitised)."""
    ip: str | None = None
    """The phone's address at the AP (default: read from the phone)."""
    scenario: Scenario | None = None
    scenario_dir: Path | None = None

    @property
    def session_id(self) -> str:
        """The id events carry (same as :attr:`key`; unique within a plan)."""
        return self.key

    @property
    def package(self) -> str:
        from controller.scenario import APPS

        return APPS.get(self.app, self.app)

    @property
    def key(self) -> str:
        """``<device>_<package-or-app>_<activity>_r<N>``: names the run dir (without its stamp)."""
        dev = re.sub(r"[^A-Za-z0-9.-]+", "-", self.device_name or self.serial).strip("-")
        return f"{dev}_{self.app}_{self.activity}_r{self.repetition}"


@dataclass
class Environment:
    """Everything a session needs besides its phone: adb, the capture, where runs go."""

    runs_root: Path
    client: Any = None
    """adbutils client (plans open links through it)."""
    capture: CapturePort | None = None
    label: bool = True
    label_format: str = "mirage2019"
    export_dir: Path | None = None
    """When set, MIRAGE JSON files are also copied here (one tree for the whole dataset)."""
    device_dir: str = "/data/local/tmp/flowtruth"
    strace_binary: Path | None = None
    """Override the strace pushed to the phone."""
    launcher_interval: float = 0.5
    netstat_interval: float = 0.2
    capture_margin_s: float = 1.0
    """Seconds kept before and after the session's window in its capture split."""
    capture_flush_s: float = 0.3
    require_root: bool = True
    serials: dict[str, str] = field(default_factory=dict)
    """Plan device names (``lab:phone1``) to adb serials."""
    ips: dict[str, str] = field(default_factory=dict)
    """adb serial to the phone's address at the AP, when known beforehand (the lab)."""
    frida_device: Callable[[DeviceLink], FridaEndpoint] | None = None
    """Opens the frida device of a phone (``tracer: frida|both``); default
    :func:`controller.device.phone_frida`: frida-server on the phone via adb forward."""
    frida_server: str = FRIDA_SERVER
    """Where frida-server lives on the phones (the default ``frida_device`` starts it)."""
    frida_stop_timeout_s: float = 20.0
    """How long StopTracers waits for frida to detach before it gives up on it."""
    ap_state: Path | None = None
    """The AP's state file (``flowtruth ap up``, the lab's AP): the supervisor's restarts of
    hostapd/dnsmasq during a session go into its manifest (``ap.restarts``)."""

    def open_frida(self, link: DeviceLink) -> FridaEndpoint:
        """The frida endpoint of this phone (see :attr:`frida_device`)."""
        if self.frida_device is not None:
            return self.frida_device(link)
        return phone_frida(link, self.frida_server)

    @classmethod
    def for_lab(cls, lab: Any, runs_root: Path | str = "runs", *, capture_settings: Any = None,
                capture_mtu: int = 1500, capture_bpf: str | None = None,
                **kw: Any) -> Environment:
        """The environment of a running virtual lab (``controller.lab.topology.Lab``): its
        adb server, ap_setup's capture on its AP bridge inside the AP namespace (with
        ``capture_settings``, an :class:`ap_setup.config.CaptureConfig`: ring buffer, tool,
        snaplen; the QA checks frames against ``capture_mtu``), its phones by name, and
        frida's local device per phone (:func:`lab_frida`)."""
        from controller.device import adb_client

        if lab.adb_port is None:
            raise ControllerError("the virtual lab has no adb server port",
                                  hint="flowtruth lab up")
        runs = Path(runs_root)
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        cap = TcpdumpCapture(lab.ap.interface, runs / f"_capture_{stamp}", netns=lab.ap.netns,
                             settings=capture_settings, mtu=capture_mtu, bpf=capture_bpf)
        serials: dict[str, str] = {}
        for p in lab.phones:
            for name in (p.name, f"lab:{p.name}", p.config.serial, f"lab:{p.config.serial}"):
                serials[name] = p.serial
        kw.setdefault("frida_device", lab_frida(
            {p.serial: p.netns for p in lab.phones},
            {p.serial: float(p.config.clock_offset_s) for p in lab.phones}))
        kw.setdefault("ap_state", Path(lab.ap.state_path))
        return cls(runs_root=runs, client=adb_client(int(lab.adb_port)), capture=cap,
                   serials=serials, ips={p.serial: p.ip for p in lab.phones}, **kw)


def lab_frida(netns: dict[str, str], clock_offsets: dict[str, float]
              ) -> Callable[[DeviceLink], FridaEndpoint]:
    """The virtual lab's frida: a phone's processes are local processes in its network
    namespace (one PID namespace for all), so frida's local device narrowed to that
    namespace; the agent's host-clock timestamps get the phone's clock offset."""

    def open_(link: DeviceLink) -> FridaEndpoint:
        if link.serial not in netns:
            raise ConfigError(f"{link.serial}: not a phone of the virtual lab")
        return local_frida(clock_offsets.get(link.serial, 0.0), netns[link.serial])

    return open_


@dataclass
class SessionResult:
    session_id: str
    run_dir: Path
    outcome: str  # completed | failed | stopped
    error: str | None = None
    hint: str | None = None
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.outcome == "completed"


def strace_for_abi(abi: str) -> Path:
    """The strace binary to push to a phone of this ABI (see the module docstring)."""
    if abi in ("x86_64", "x86"):
        host = shutil.which("strace") or "/usr/bin/strace"
        if not Path(host).exists():
            raise ControllerError("strace is not installed on this host",
                                  hint="apt-get install strace")
        return Path(host)
    from device_scripts.strace_cache import cached_strace

    p = cached_strace(abi)
    if p is None:
        raise ControllerError(f"no static strace for ABI {abi!r} in the cache",
                              hint="build it with device_scripts/build_strace.sh")
    return p


def _utc(t: float) -> str:
    return _dt.datetime.fromtimestamp(t, _dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _tool_versions() -> dict[str, str]:
    out: dict[str, str] = {}
    try:
        from importlib.metadata import version

        for pkg in ("flowtruth", "adbutils", "frida"):
            try:
                out[pkg] = version(pkg)
            except Exception:
                pass
    except ImportError:
        pass
    for prog, args in (("tcpdump", ["--version"]), ("strace", ["-V"]), ("adb", ["version"])):
        if shutil.which(prog):
            try:
                r = subprocess.run([prog, *args], capture_output=True, text=True, timeout=5)
                first = (r.stdout or r.stderr).strip().splitlines()
                out[prog] = first[0] if first else ""
            except (OSError, subprocess.TimeoutExpired):
                pass
    return out


_VERSIONS: dict[str, str] = {}
_VERSIONS_LOCK = threading.Lock()


def tool_versions() -> dict[str, str]:
    with _VERSIONS_LOCK:
        if not _VERSIONS:
            _VERSIONS.update(_tool_versions())
        return dict(_VERSIONS)


class _Step(Exception):
    pass


class Session:
    """The state of one running session (the engine's internals; use :func:`run_session`)."""

    def __init__(self, spec: SessionSpec, link: DeviceLink, env: Environment, sink: ev.Sink,
                 cancel: threading.Event) -> None:
        self.spec, self.link, self.env, self.sink, self.cancel = spec, link, env, sink, cancel
        self.t_start = time.time()
        stamp = _dt.datetime.fromtimestamp(self.t_start, _dt.UTC).strftime("%Y%m%dT%H%M%SZ")
        self.session_id = spec.key
        self.run_dir = Path(env.runs_root) / f"{stamp}_{spec.key}"
        self.dev_dir = f"{env.device_dir}/{self.run_dir.name}"
        self.facts: DeviceFacts | None = None
        self.owns_capture = False
        self.tracer_pids: dict[str, int] = {}
        self.frida_ep: FridaEndpoint | None = None
        self.frida_tracer: Any = None
        self.window_end: float | None = None
        self.m: dict[str, Any] = {
            "schema_version": MANIFEST_SCHEMA_VERSION,
            "session_id": self.session_id,
            "device": {"serial": link.serial},
            "apps": [],
            "activity": spec.activity,
            "repetition": spec.repetition,
            "clock": {"offset_s": 0.0, "uncertainty_s": None},
            "capture": {"files": [], "interface": None, "snaplen": None},
            "traces": {"strace": [], "netstat": None, "frida": None, "packages": None},
            "started_at": _utc(self.t_start),
            "finished_at": None,
            "outcome": "running",
            "error": None,
            "errors": [],
            "steps": [],
            "artifacts": {},
            "scenario": {},
            "params": dict(spec.params),
            "tracer": spec.tracer,
            "tool_versions": {},
            "preflight": [],
            "root": None,
        }

    # -- helpers -----------------------------------------------------------------------
    def emit(self, e: ev.Event) -> None:
        try:
            self.sink(e)
        except Exception:  # a front end's bug never kills a session
            pass

    def write_manifest(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.run_dir / "manifest.json.part"
        tmp.write_text(json.dumps(self.m, indent=2, sort_keys=False) + "\n", encoding="utf-8")
        os.replace(tmp, self.run_dir / "manifest.json")

    def step(self, name: str, fn: Callable[[], str | None], *, teardown: bool = False) -> bool:
        if not teardown and self.cancel.is_set():
            raise ScenarioCancelled("cancelled")
        self.emit(ev.StepStarted(self.session_id, name))
        t0 = time.time()
        rec: dict[str, Any] = {"step": name, "started_at": _utc(t0)}
        try:
            detail = fn() or ""
        except BaseException as err:
            msg = err.one_line() if isinstance(err, FlowtruthError) else f"{type(err).__name__}: {err}"
            rec.update(ok=False, took_s=round(time.time() - t0, 3), error=msg)
            self.m["steps"].append(rec)
            self.emit(ev.StepFinished(self.session_id, name, False, msg))
            if teardown:
                self.m["errors"].append({"step": name, "error": msg})
                if isinstance(err, DeviceError):
                    self._lost(err)
                self.write_manifest()
                if not isinstance(err, Exception):
                    raise
                return False
            self.write_manifest()
            raise
        rec.update(ok=True, took_s=round(time.time() - t0, 3), detail=detail)
        self.m["steps"].append(rec)
        self.emit(ev.StepFinished(self.session_id, name, True, detail))
        self.write_manifest()
        return True

    def _lost(self, err: DeviceError) -> None:
        if not getattr(self, "_lost_sent", False):
            self._lost_sent = True
            self.emit(ev.DeviceLost(self.link.serial, err.message))

    # -- steps ---------------------------------------------------------------------------
    def preflight(self) -> str:
        spec, link = self.spec, self.link
        sc = spec.scenario or scenario_for(spec.app, spec.scenario_dir)
        self.scenario = sc
        if spec.activity not in sc.activities:
            raise ConfigError(f"{sc.path}: no activity {spec.activity!r}",
                              hint="has: " + ", ".join(sc.activities))
        self.steps_ = sc.steps(spec.activity, spec.params, role=getattr(spec, "role", "solo"))
        if spec.tracer not in TRACERS:
            raise ConfigError(f"tracer must be one of {', '.join(TRACERS)}, not {spec.tracer!r}")
        self.m["scenario"] = {"file": str(sc.path), "app": sc.app, "package": sc.package,
                              "steps": [s.describe() for s in self.steps_]}
        facts = read_facts(link)
        self.facts = facts
        dev = facts.to_manifest()
        if spec.ip or self.env.ips.get(link.serial):
            dev["ip"] = spec.ip or self.env.ips[link.serial]
        self.m["device"] = dev
        rooted = False
        if self.env.require_root:
            root = require_root(link)
            rooted = True
            self.m["root"] = {"method": root.method, "magisk": root.magisk}
        # after the root check, so front ends show what was verified
        self.emit(ev.DeviceConnected(link.serial, facts.model, facts.manufacturer, facts.android,
                                     facts.abi, rooted))
        raw, listing = read_packages(link)
        (self.run_dir / "packages.txt").write_text(raw, encoding="utf-8")
        self.m["traces"]["packages"] = "packages.txt"
        apps = read_apps(link, [sc.package], listing)
        if sc.package not in apps:
            raise ControllerError(f"{link.serial}: {sc.package} is not installed",
                                  hint=f"install {sc.app} on the phone")
        self.m["apps"] = [apps[sc.package].to_manifest()]
        self.locale = read_locale(link)  # the scenario's texts are in the phone's language
        bad = check_locale(self.locale, sc.app)
        if bad:
            raise ConfigError(f"{link.serial}: {bad}")
        self.app_version = apps[sc.package].version
        clock = probe_clock_(link)
        self.m["clock"] = clock.to_manifest()
        self.emit(ev.ClockMeasured(link.serial, clock.offset_s, clock.uncertainty_s))
        warns = preflight_checks(link, facts)
        vw = check_version(self.app_version, sc.app)
        if vw:
            warns.append(PreflightWarning("app_version", vw,
                                          f"flowtruth scenario probe {link.serial} --app {sc.app}"))
        for w in warns:
            self.emit(ev.PreflightWarned(link.serial, w.check, w.message, w.fix))
        self.m["preflight"] = [{"check": w.check, "message": w.message, "fix": w.fix}
                               for w in warns]
        self.m["tool_versions"] = tool_versions()
        addrs = self._addresses()
        if not addrs:
            raise ControllerError(f"{link.serial}: the phone has no address on the AP's network",
                                  hint="is it connected to the AP's Wi-Fi?")
        frida = ""
        if spec.tracer in ("frida", "both"):  # a missing frida-server fails before the capture
            self.frida_ep = self.env.open_frida(link)
            self.m["frida"] = self.frida_ep.to_manifest()
            frida = f"; frida: {self.frida_ep.where}"
        return (f"{facts.manufacturer} {facts.model}, Android {facts.android}, {facts.abi}; "
                f"{sc.package} uid {apps[sc.package].uid}; clock {clock.offset_s:+.3f}s "
                f"±{clock.uncertainty_s:.3f}; {len(warns)} warnings{frida}")

    def _addresses(self) -> list[str]:
        ip = self.spec.ip or self.env.ips.get(self.link.serial)
        found = list(self.facts.addresses) if self.facts else []
        if ip:
            # the phone's IPv4 on the AP's network, plus its global IPv6 addresses: apps
            # reach their servers over IPv6 too, and those flows belong in the split
            return [ip, *(a for a in found if ":" in a)]
        return found

    def start_capture(self) -> str:
        cap = self.env.capture
        if cap is None:
            return "no AP capture configured"
        if not cap.running:
            cap.start()
            self.owns_capture = True
        else:  # a plan's capture: its counters now, so this session's drops are known
            live = getattr(cap, "live_stats", None)
            self.m["capture"]["stats_at_start"] = live() if live is not None else {}
        self.m["capture"].update(interface=cap.interface, snaplen=cap.snaplen)
        return f"{'started' if self.owns_capture else 'sharing'} capture on {cap.interface}"

    def push_scripts(self) -> str:
        from device_scripts import script_path

        link, d, q = self.link, self.dev_dir, shlex.quote
        bin_dir = f"{self.env.device_dir}/bin"
        files: dict[str, tuple[Path, str]] = {
            name: (script_path(name), f"{d}/{name}")
            for name in ("strace_launcher.sh", "netstat_poller.sh")}
        if self.spec.tracer in ("strace", "both"):
            assert self.facts is not None
            binary = self.env.strace_binary or strace_for_abi(self.facts.abi)
            files["strace"] = (binary, f"{bin_dir}/strace")
            self.strace_remote = f"{bin_dir}/strace"
        want = {name: sha256_file(local) for name, (local, _r) in files.items()}
        # one round trip: make the directories and checksum what is already there (the
        # strace binary stays on the phone across sessions)
        # tracers of an earlier session whose phone vanished are still running: stop them
        stale = (f"for o in {q(self.env.device_dir)}/*/; do [ \"$o\" = {q(d + '/')} ] || "
                 f'touch "$o/strace/strace_launcher.stop" "$o/netstat.stop" 2>/dev/null; '
                 "done; ")
        r = root_shell(link, stale + f"mkdir -p {q(d)}/strace {q(bin_dir)} && chmod 777 "
                             f"{q(self.env.device_dir)} {q(d)} {q(bin_dir)} && "
                             + (f"sha256sum {q(files['strace'][1])} 2>/dev/null; "
                                if "strace" in files else "")  # no operand: it reads stdin
                             + "true", timeout=20)
        r.check(link.serial, "mkdir on the phone")
        have = {}
        for line in r.stdout.splitlines():
            f = line.split()
            if len(f) == 2:
                have[f[1]] = f[0]
        pushed = []
        for name, (local, remote) in files.items():
            if have.get(remote) != want[name]:
                link.push(local, remote, mode=0o755)
                pushed.append(name)
        r = link.shell("sha256sum " + " ".join(q(remote) for _l, remote in files.values()),
                       timeout=30)
        got = {}
        for line in r.stdout.splitlines():
            f = line.split()
            if len(f) == 2:
                got[f[1]] = f[0]
        for name, (_local, remote) in files.items():
            if got.get(remote) != want[name]:
                raise DeviceError(f"{link.serial}: {remote}: checksum after push is "
                                  f"{got.get(remote)}, expected {want[name]}",
                                  hint="storage full or a flaky cable?")
        self.m["pushed"] = want
        return f"{len(pushed)} of {len(files)} files pushed to {d} (checksums verified)"

    def _start_detached(self, argv: list[str], log: str) -> int:
        cmd = (f"cd {shlex.quote(self.dev_dir)} && setsid "
               + " ".join(shlex.quote(a) for a in argv)
               + f" </dev/null >{shlex.quote(log)} 2>&1 & echo $!")
        r = root_shell(self.link, cmd, timeout=20).check(self.link.serial, f"start {argv[1]}")
        pid = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
        if not pid.isdigit():
            raise DeviceError(f"{self.link.serial}: starting {argv[1]} printed {r.stdout!r}")
        return int(pid)

    def start_tracers(self) -> str:
        d, sc = self.dev_dir, self.scenario
        tracer = self.spec.tracer
        jobs: list[tuple[str, list[str], str]] = []
        if tracer in ("strace", "both"):
            # under "both" the launcher skips the main process, which frida traces
            jobs.append(("strace", ["sh", f"{d}/strace_launcher.sh", sc.package, f"{d}/strace",
                                    self.strace_remote, f"{self.env.launcher_interval:g}",
                                    "secondary" if tracer == "both" else "all"],
                         f"{d}/strace_launcher.err"))
        if self.spec.netstat:
            jobs.append(("netstat", ["sh", f"{d}/netstat_poller.sh", f"{d}/netstat.log",
                                     f"{self.env.netstat_interval:g}", "67108864",
                                     f"{d}/netstat.stop"], f"{d}/netstat_poller.err"))
        started = self._start_phone_tracers(jobs) if jobs else []
        if tracer in ("frida", "both"):
            started.append(self._start_frida())
        return ", ".join(started) or "no tracers"

    def _start_frida(self) -> str:
        from device_scripts.frida_loader import FridaPackageTracer

        ep = self.frida_ep
        assert ep is not None, "Preflight opens the frida endpoint"
        role = "main" if self.spec.tracer == "both" else "all"
        pt = FridaPackageTracer(self.scenario.package, self.run_dir / "frida", role=role,
                                device=ep.device, interval=self.env.launcher_interval,
                                accept=ep.accept)
        # StopTracers stops it even when the first scan fails
        self.frida_tracer = pt
        bounded(pt.start, 60.0, f"{self.link.serial}: frida's first scan")
        self.m["frida"]["role"] = role
        pids = ", ".join(map(str, sorted(pt.tracers))) or "none yet"
        return f"frida ({role} processes; pids {pids})"

    def _start_phone_tracers(self, jobs: list[tuple[str, list[str], str]]) -> list[str]:
        # detached (setsid, no terminal), so they outlive this adb shell; one round trip
        cmd = f"cd {shlex.quote(self.dev_dir)} && " + " ".join(
            "setsid " + " ".join(shlex.quote(a) for a in argv)
            + f" </dev/null >{shlex.quote(log)} 2>&1 & echo $!;" for _n, argv, log in jobs)
        r = root_shell(self.link, cmd, timeout=20).check(self.link.serial, "start the tracers")
        pids = [x for x in r.stdout.split() if x.isdigit()]
        if len(pids) != len(jobs):
            raise DeviceError(f"{self.link.serial}: starting the tracers printed {r.stdout!r}")
        for (name, _a, _l), pid in zip(jobs, pids, strict=True):
            self.tracer_pids[name] = int(pid)
        self.m["tracer_pids"] = dict(self.tracer_pids)
        return [f"{n} (pid {p})" for n, p in self.tracer_pids.items()]

    def run_scenario(self) -> str:
        last = [0.0]

        def on_step(i: int, n: int, text: str) -> None:
            self.emit(ev.ScenarioStepStarted(self.session_id, i, n, text))
            self._progress_capture()
            if time.monotonic() - last[0] > 5:  # a round trip: not on every step
                last[0] = time.monotonic()
                self._progress_tracers()

        runner = ScenarioRunner(self.link, self.scenario, seed=self.spec.seed,
                                cancel=self.cancel, wait_scale=self.spec.wait_scale,
                                on_step=on_step, role=getattr(self.spec, "role", "solo"),
                                peer=getattr(self.spec, "peer", None),
                                locale=getattr(self, "locale", None), run_dir=self.run_dir,
                                app_version=getattr(self, "app_version", None))
        self.scenario_runner = runner
        done = threading.Event()

        def tick() -> None:  # live capture counters also during long waits (calls)
            while not done.wait(1.0):
                self._progress_capture()

        ticker = threading.Thread(target=tick, name=f"progress-{self.session_id}", daemon=True)
        ticker.start()
        try:
            runner.run(self.steps_)
        finally:
            done.set()
            ticker.join()
            self.m["scenario"]["log"] = runner.log
            self.m["scenario"].update(runner.report())
        self._progress_tracers()
        return f"{len(self.steps_)} steps"

    def _progress_capture(self) -> None:
        counters = getattr(self.env.capture, "counters", None)
        if counters is None:
            return
        packets, size = counters()
        self.emit(ev.CaptureProgressed(self.session_id, packets, size, 0))

    def _progress_tracers(self) -> None:
        pt = self.frida_tracer
        if pt is not None:
            self.emit(ev.TracerProgressed(self.session_id, "frida", tuple(sorted(pt.tracers)),
                                          pt.events_written))
        if "strace" not in self.tracer_pids:
            return
        try:
            d = f"{shlex.quote(self.dev_dir)}/strace"
            # one round trip: the traced pids, then how many syscall lines they logged
            r = root_shell(self.link, f"cat {d}/strace_launcher.pids 2>/dev/null; echo ---; "
                           f"cat {d}/strace.*.log 2>/dev/null | wc -l", timeout=10)
        except DeviceError:
            raise
        head, _, tail = r.stdout.partition("---")
        pids = tuple(int(line.split()[0]) for line in head.splitlines()
                     if line.split() and line.split()[0].isdigit())
        lines = int(tail.split()[0]) if tail.split() and tail.split()[0].isdigit() else 0
        self.emit(ev.TracerProgressed(self.session_id, "strace", pids, lines))

    def stop_tracers(self) -> str:
        pt = self.frida_tracer
        if pt is None:
            return self._stop_phone_tracers()
        # frida detaches (host side) while the phone's tracers stop
        done = threading.Event()

        def stop_frida() -> None:
            try:
                pt.stop()
            finally:
                done.set()

        threading.Thread(target=stop_frida, name=f"frida-stop-{self.session_id}",
                         daemon=True).start()
        phone_err: Exception | None = None
        phone = ""
        try:
            phone = self._stop_phone_tracers()
        except Exception as err:  # raised below, once frida's log is safe
            phone_err = err
        hung = not done.wait(self.env.frida_stop_timeout_s)
        self.frida_tracer = None
        frida = self._collect_frida(pt)
        if hung:
            msg = (f"frida did not detach within {self.env.frida_stop_timeout_s:g} s "
                   f"({frida})")
            self.m["frida"]["stop_error"] = msg
            if phone_err is None:
                raise DeviceError(f"{self.link.serial}: {msg}")
        if phone_err is not None:
            raise phone_err
        return f"{phone}; {frida}"

    def _collect_frida(self, pt: Any) -> str:
        """Merge frida's per-process files into ``frida.jsonl`` (on the phone's clock) and
        record them (also what a frida that would not detach wrote so far)."""
        from device_scripts.frida_loader import merge_event_files

        ep = self.frida_ep
        shift = ep.clock_shift_s if ep is not None else 0.0
        files = sorted((self.run_dir / "frida").glob("frida.*.jsonl"),
                       key=lambda f: (f.stat().st_mtime_ns, f.name))
        for f in files:
            self._artifact(f"frida/{f.name}", f)
        info = self.m.setdefault("frida", {})
        errors = list(pt.errors)
        info.update(processes=[f.name for f in files], events=pt.events_written,
                    errors=errors[:50] + ([f"... {len(errors) - 50} more"] if len(errors) > 50
                                          else []))
        n = 0
        if files:
            out = self.run_dir / "frida.jsonl"
            n = merge_event_files(files, out, shift)
            self._artifact("frida.jsonl", out)
            self.m["traces"]["frida"] = "frida.jsonl"
        else:
            self.emit(ev.LogRecorded("warning", f"{self.session_id}: frida attached to no "
                                     f"process of {self.scenario.package}"))
        return f"frida: {n} events from {len(files)} processes"

    def _stop_phone_tracers(self) -> str:
        if not self.tracer_pids:
            return "nothing to stop"
        link, d, q = self.link, self.dev_dir, shlex.quote
        pids = " ".join(str(p) for p in self.tracer_pids.values())
        # stop files, then wait on the phone (one round trip) up to ~8 s for both to exit
        r = root_shell(link, f"touch {q(d)}/strace/strace_launcher.stop {q(d)}/netstat.stop; "
                             f"i=0; while [ $i -lt 80 ]; do alive=; for p in {pids}; do "
                             f'kill -0 $p 2>/dev/null && alive="$alive $p"; done; '
                             f'[ -z "$alive" ] && break; sleep 0.1; i=$((i+1)); done; '
                             f"echo alive:$alive", timeout=30)
        alive = r.stdout.strip().rpartition("alive:")[2].strip()
        killed = ""
        if alive:  # stragglers: TERM the launcher (it stops its stracers), then KILL
            root_shell(link, f"kill -TERM {alive} 2>/dev/null; sleep 3; "
                             f"kill -KILL {alive} 2>/dev/null; "
                             f"for p in $(cut -d' ' -f2 {q(d)}/strace/strace_launcher.pids "
                             f"2>/dev/null); do kill -KILL $p 2>/dev/null; done; true",
                       timeout=20)
            killed = f"; killed stragglers {alive}"
        self.tracer_pids.clear()
        return "stopped" + killed

    def stop_capture(self) -> str:
        cap = self.env.capture
        self.window_end = time.time()
        if cap is None:
            return "no capture"
        time.sleep(self.env.capture_flush_s)
        final = self.owns_capture
        if self.owns_capture:
            stats = cap.stop()
            self.owns_capture = False
        else:
            live = getattr(cap, "live_stats", None)
            stats = live() if live is not None else {}
        self.m["capture"]["stats"] = stats
        addrs = self._addresses()
        files = cap.files()
        if not files:
            raise CaptureError("the AP capture wrote no file")
        if not addrs:
            raise CaptureError("the phone's address is unknown: cannot split the capture")
        out = self.run_dir / "capture.pcap"
        margin = self.env.capture_margin_s
        n = split_pcap(files, out, addrs, self.t_start - margin, self.window_end + margin)
        self.m["capture"].update(files=["capture.pcap"], source=[str(f) for f in files],
                                 filter={"addresses": addrs, "start": self.t_start - margin,
                                         "end": self.window_end + margin},
                                 packets=n)
        self._artifact("capture.pcap", out)
        drops = self._capture_qa(cap, out, stats, final)
        self.emit(ev.CaptureProgressed(self.session_id, n, out.stat().st_size, drops))
        return f"{n} packets of {', '.join(addrs)}" + (f"; {drops} dropped" if drops else "")

    def _capture_qa(self, cap: Any, split: Path, stats: dict[str, int], final: bool) -> int:
        """Check the session's packets (frames over the MTU) and the capture's drops
        (within the session's window when a plan shares the capture); a warning when
        something is flagged. Returns the drops."""
        if not final:  # a running capture: only the drops since the session started count
            before = self.m["capture"].get("stats_at_start") or {}
            stats = {k: max(0, v - before.get(k, 0)) for k, v in stats.items()
                     if k.startswith("packets_dropped") and k in before}
        qa_fn = getattr(cap, "qa", None)
        if qa_fn is None:
            return sum(v for k, v in stats.items() if k.startswith("packets_dropped"))
        qa = qa_fn([split], stats)
        self.m["capture"]["qa"] = {**qa.to_manifest(), "mtu": getattr(cap, "mtu", None),
                                   "drops_known": any(k.startswith("packets_dropped")
                                                      for k in stats),
                                   "scope": "the session's packets; drops of its window"}
        if not qa.ok:
            self.emit(ev.LogRecorded("warning", f"{self.session_id}: capture QA: "
                                     + "; ".join(qa.problems)))
        return int(qa.drops)

    def _artifact(self, name: str, path: Path, sha: str | None = None) -> None:
        sha = sha or sha256_file(path)
        size = path.stat().st_size
        self.m["artifacts"][name] = {"size": size, "sha256": sha}
        self.emit(ev.ArtifactPulled(self.session_id, name, str(path), size, sha))

    def pull_artifacts(self) -> str:
        link, d, q = self.link, self.dev_dir, shlex.quote
        # one round trip lists and checksums everything, then each file is pulled and checked
        r = root_shell(link, f"cd {q(d)} && chmod -R a+rX . && for f in strace/* *; do "
                             f'[ -f "$f" ] && sha256sum "$f"; done; true', timeout=60)
        sums = {}
        for line in r.stdout.splitlines():
            f = line.split(None, 1)
            if len(f) == 2 and re.fullmatch(r"[0-9a-f]{64}", f[0]):
                sums[f[1].strip().lstrip("*")] = f[0]
        wanted = [n for n in sums if re.fullmatch(r"strace/strace\.\d+\..+\.log", n)
                  or n in ("strace/strace_launcher.pids", "strace_launcher.err",
                           "netstat_poller.err", "netstat.log")]
        strace_files = []
        for rel in sorted(wanted):
            local = self.run_dir / rel
            local.parent.mkdir(parents=True, exist_ok=True)
            link.pull(f"{d}/{rel}", local)
            got = sha256_file(local)
            if got != sums[rel]:
                raise DeviceError(f"{link.serial}: {rel}: checksum after pull is {got}, "
                                  f"the phone says {sums[rel]}")
            self._artifact(rel, local, got)
            if rel.endswith(".log") and rel.startswith("strace/"):
                strace_files.append(rel)
            if rel == "netstat.log" and local.stat().st_size > 0:
                self.m["traces"]["netstat"] = "netstat.log"
        self.m["traces"]["strace"] = strace_files
        if (self.run_dir / "packages.txt").exists():
            self._artifact("packages.txt", self.run_dir / "packages.txt")
        return f"{len(wanted)} files"

    def cleanup_phone(self) -> str:
        root_shell(self.link, f"rm -rf {shlex.quote(self.dev_dir)}", timeout=20)
        return "removed " + self.dev_dir

    def label(self) -> str:
        if not self.env.label:
            return "labelling off"
        from analysis.label import label_run

        if not self.m["capture"]["files"]:
            raise ControllerError("nothing to label: the session has no capture",
                                  hint="configure the AP capture (capture.interface)")
        self.m["outcome"] = "completed"  # what a later `flowtruth label` sees
        self.write_manifest()
        res = label_run(self.run_dir, fmt=self.env.label_format)
        q = res.quality
        by = q.get("by_type", {})
        flows = int(q["totals"]["flows"])
        amb = int(by.get("ambiguous", {}).get("flows", 0))
        unl = int(by.get("unlabelled", {}).get("flows", 0))
        self.emit(ev.FlowsLabelled(self.session_id, flows, flows - amb - unl, amb, unl))
        outs: dict[str, Any] = {}
        for kind, v in res.outputs.items():
            vs = v if isinstance(v, list) else [v]
            outs[kind] = [os.path.relpath(p, self.run_dir) for p in vs]
        self.m["labels"] = {"outputs": outs, "flows": flows, "ambiguous": amb, "unlabelled": unl,
                            "targets": q.get("targets", {}), "warnings": res.warnings}
        self.label_result = res
        return res.line()

    def export(self) -> str:
        n = 0
        if self.env.export_dir is not None and self.m.get("labels"):
            for kind, rels in self.m["labels"]["outputs"].items():
                if "mirage" not in kind and not any(r.endswith(".json") and "quality" not in r
                                                    for r in rels):
                    continue
                for rel in rels:
                    src = self.run_dir / rel
                    if src.suffix != ".json" or src.name == "quality.json":
                        continue
                    dst = Path(self.env.export_dir) / os.path.relpath(src, self.run_dir / "labels")
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(src, dst)
                    n += 1
        return f"manifest written{f'; {n} MIRAGE files exported' if n else ''}"

    # -- the whole session ----------------------------------------------------------------
    def run(self) -> SessionResult:
        spec = self.spec
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.write_manifest()
        self.emit(ev.SessionStarted(self.session_id, self.link.serial, spec.app, spec.activity,
                                    str(self.run_dir)))
        failure: BaseException | None = None
        started_tracers = pushed = False
        try:
            self.step("Preflight", self.preflight)
            self.step("StartCapture", self.start_capture)
            pushed = True
            self.step("PushScripts", self.push_scripts)
            started_tracers = True
            self.step("StartTracers", self.start_tracers)
            self.step("RunScenario", self.run_scenario)
        except BaseException as err:  # noqa: BLE001 - recorded, then teardown
            failure = err
            if isinstance(err, DeviceError):
                self._lost(err)
        # teardown always runs; each part on its own
        if started_tracers:
            self.step("StopTracers", self.stop_tracers, teardown=True)
        self.step("StopCapture", self.stop_capture, teardown=True)
        if pushed:
            if self.step("PullArtifacts", self.pull_artifacts, teardown=True):
                self.step("CleanupPhone", self.cleanup_phone, teardown=True)
        if self.owns_capture and self.env.capture is not None:
            try:
                self.env.capture.stop()
            except Exception:
                pass
        self._close_frida()
        if failure is None and not self.m["errors"]:
            try:
                self.step("Label", self.label)
                self.step("Export", self.export)
            except BaseException as err:  # noqa: BLE001
                failure = err
        return self._finish(failure)

    def _close_frida(self) -> None:
        ep, self.frida_ep = self.frida_ep, None
        if self.frida_tracer is not None:  # StopTracers did not run (failed before it)
            pt, self.frida_tracer = self.frida_tracer, None
            try:
                bounded(pt.stop, self.env.frida_stop_timeout_s, "frida detach")
            except Exception:
                pass
        if ep is not None:
            try:
                ep.close()
            except Exception as err:  # best effort; the session's data is already safe
                self.m.setdefault("frida", {})["close_error"] = str(err)

    def _record_ap_health(self) -> None:
        """The AP daemons' restarts (and give-ups) during this session, into the manifest:
        packets lost while dnsmasq or hostapd was down matter when judging the labels."""
        path = self.env.ap_state
        if path is None:
            return
        try:
            from ap_setup.state import ApState

            state = ApState.load(Path(path))
        except Exception as err:  # the AP's record is advisory: never fail a session on it
            self.m["ap"] = {"state": str(path), "error": f"{type(err).__name__}: {err}"}
            return
        if state is None:
            return
        start = int(self.t_start)  # the supervisor stamps whole seconds

        def during(at: str) -> bool:
            try:
                return _dt.datetime.fromisoformat(at).timestamp() >= start
            except ValueError:
                return False

        restarts = [{"daemon": name, **r.model_dump()}
                    for name, h in state.health.items() for r in h.history if during(r.at)]
        gave_up = {name: h.gave_up for name, h in state.health.items() if h.gave_up}
        self.m["ap"] = {"state": str(path), "restarts": restarts, "gave_up": gave_up}
        for r in restarts:
            self.emit(ev.LogRecorded("warning", f"{self.session_id}: AP {r['daemon']} was "
                                                f"restarted during the session ({r['at']})"))

    def _finish(self, failure: BaseException | None) -> SessionResult:
        self._record_ap_health()
        self.m["finished_at"] = _utc(time.time())
        self.m["timings"] = {"duration_s": round(time.time() - self.t_start, 3)}
        if failure is None and self.m["errors"]:
            first = self.m["errors"][0]
            failure = ControllerError(f"{first['step']}: {first['error']}")
        if failure is None:
            self.m["outcome"] = "completed"
            self.write_manifest()
            self.emit(ev.SessionFinished(self.session_id, str(self.run_dir), "ok"))
            return SessionResult(self.session_id, self.run_dir, "completed", manifest=self.m)
        stopped = isinstance(failure, ScenarioCancelled) or isinstance(failure, KeyboardInterrupt)
        if isinstance(failure, FlowtruthError):
            msg, hint = failure.message, failure.hint
        else:
            msg, hint = f"internal error: {type(failure).__name__}: {failure}", None
            self.m["traceback"] = "".join(traceback.format_exception(failure))
        self.m["outcome"] = "stopped" if stopped else "failed"
        self.m["error"] = {"message": msg, "hint": hint, "type": type(failure).__name__}
        self.write_manifest()
        self.emit(ev.SessionFailed(self.session_id, str(self.run_dir), msg, hint or ""))
        if isinstance(failure, (KeyboardInterrupt, SystemExit)):
            raise failure
        return SessionResult(self.session_id, self.run_dir, self.m["outcome"], msg, hint, self.m)


def run_session(spec: SessionSpec, link: DeviceLink, env: Environment, sink: ev.Sink,
                cancel: threading.Event | None = None) -> SessionResult:
    """Run one session; never raises for a known failure (see the module docstring)."""
    return Session(spec, link, env, sink, cancel or threading.Event()).run()


def run_plan(plan: Any, env: Environment, sink: ev.Sink, cancel: threading.Event | None = None,
             resume: bool = False, **kw: Any) -> Any:
    """:func:`controller.plan.run_plan` (here too, for front ends that import the engine)."""
    from controller.plan import run_plan as _run_plan

    return _run_plan(plan, env, sink, cancel, resume=resume, **kw)
