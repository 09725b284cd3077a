"""The virtual lab's topology: an internet, an access point and phones in network namespaces.

::

    host ── ftl<id>a<N> ═══ adb0 (10.254.X.2:5555, emulated adbd)      management, like USB
                              │
    ftl-<id>-phone<N>:  rmnet_data0 (10.200.N.6/30, mobile data: listed first, no route)
                        wlan0 (MAC 02:66:74:00:00:0N, DHCP 192.168.77.1N, SLAAC fd77:7466::/64)
                              ║ veth
    ftl-<id>-ap:        sta<N> ─ bridge wlan0 (192.168.77.1/24; ap_setup: dnsmasq DHCP/DNS,
                                  nftables NAT, tcpdump capture)   wan0 (100.64.0.2/30)
                                                                     ║ veth
    ftl-<id>-inet:      up0 (100.64.0.1/30), lo (76.223.92.165, 149.154.167.50,
                        157.240.0.53, ... 8.8.8.8): lab servers and a DNS server

The AP namespace is brought up by ``ap_setup.lifecycle.ap_up`` with ``radio: false`` and
the bridge as its interface: exactly what a real AP host runs, minus hostapd.  Phones get
their address from the AP's dnsmasq through a real DHCP client (busybox ``udhcpc``, run
once at ``lab up``: it obtains the static lease for the phone's MAC and exits, so the lease
is not renewed) and their resolver (``/etc/netns/<ns>/resolv.conf``) points at the AP.
IPv6 is routed without NAT: the AP's dnsmasq sends router advertisements for
fd77:7466::/64 (``ipv6_ra``), phones configure themselves (SLAAC), and Telegram's data
centre answers at 2001:67c:4e8:f004::a (the other services are IPv4 only).
The host's adb server reaches each phone's adbd over a separate management veth, so adb
traffic never shows in the AP capture (on a real phone it goes over USB).

API::

    lab = Lab.up(phones=2, adb_port=5037, workdir=None, state_dir=None,   # needs root
                 phone_updates={1: {"strace_fault": "selinux"}})  # PhoneConfig fields
    lab = Lab.load(state_dir=None)      # the running lab from its state file, or None
    lab.phones      # [LabPhone(name, index, serial="10.254.X.2:5555", netns, ip, mac,
                    #           mgmt_ip, host_ip, host_link, state_dir, config: PhoneConfig, ip6)]
    lab.ap          # LabAp(netns, interface="wlan0", subnet, address, uplink)
    lab.truth_path  # JSON lines of every simulated-app socket (controller.lab.truth)
    lab.start_capture(out_dir) -> ap_setup.capture.Capture   # tcpdump on the AP bridge
    lab.status() -> dict
    lab.down()      # idempotent; Lab.down_all() also removes stale labs of killed runs

The state file (``/run/flowtruth/lab.json``, or ``$XDG_RUNTIME_DIR/flowtruth`` when not
root) is written atomically before anything is created and lists namespaces, host links,
processes (pid and start time), phones and the adb port.  Every name starts with ``ftl``
and carries the lab id, so :func:`cleanup_stale` finds what a killed run left behind even
without the state file.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from controller.errors import ConfigError, LabError, RootRequired
from controller.lab.toolbox import PhoneConfig, samsung_s21, xiaomi_poco_x3_pro

REPO_ROOT = Path(__file__).resolve().parents[2]
PREFIX = "ftl"
NS_RE = re.compile(rf"^{PREFIX}-([0-9a-f]{{4}})-(inet|ap|phone\d+)$")
HOST_LINK_RE = re.compile(rf"^{PREFIX}([0-9a-f]{{4}})a\d+$")
SCHEMA_VERSION = 1
PHONE_SUBNET = ipaddress.IPv4Interface("192.168.77.1/24")
UPLINK_INET = "100.64.0.1/30"
UPLINK_AP = "100.64.0.2/30"
PHONE_SUBNET6 = "fd77:7466::1/64"
UPLINK6_INET = "fd64:7466::1/64"
UPLINK6_AP = "fd64:7466::2/64"
ADBD_PORT = 5555
PROGRAMS = ("ip", "dnsmasq", "tcpdump", "busybox", "nft", "ethtool", "unshare", "nsenter")

UDHCPC_SCRIPT = """#!/bin/sh
# busybox udhcpc event script: apply the lease to the interface, route and resolver.
case "$1" in
    bound|renew)
        ip -4 addr flush dev "$interface"
        ip addr add "$ip/${mask:-24}" dev "$interface"
        if [ -n "$router" ]; then
            set -- $router
            ip route replace default via "$1" dev "$interface"
        fi
        : > /etc/resolv.conf
        for d in $dns; do echo "nameserver $d" >> /etc/resolv.conf; done
        ;;
    deconfig)
        ip -4 addr flush dev "$interface"
        ;;
esac
exit 0
"""


Sink = Callable[[str, str], None]


def _quiet(_step: str, _detail: str) -> None:
    pass


# --------------------------------------------------------------------------- records


@dataclass
class LabPhone:
    """One virtual phone: its adb serial, namespace, address and identity."""

    name: str
    index: int
    serial: str
    netns: str
    ip: str
    mac: str
    mgmt_ip: str
    host_ip: str
    host_link: str
    state_dir: str
    config: PhoneConfig
    ip6: str = ""
    owner: str = ""  # the phone owner's display name: the other lab phones' contact name
    contacts: list[str] = field(default_factory=list)  # the names its messengers list

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["config"] = self.config.model_dump()
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LabPhone:
        return cls(**{**data, "config": PhoneConfig.model_validate(data["config"])})


@dataclass
class LabAp:
    """The AP side: where a capture of the phones' traffic runs."""

    netns: str
    interface: str
    subnet: str
    address: str
    uplink: str
    state_path: str


@dataclass
class LabProcess:
    """A daemon the lab started: found again by pid plus kernel start time."""

    name: str
    netns: str
    pid: int
    starttime: int | None
    argv: list[str]
    log: str


@dataclass
class LabState:
    """The state file's content."""

    lab_id: str
    workdir: str
    own_workdir: bool
    adb_port: int | None
    status: str = "starting"
    created_at: float = field(default_factory=time.time)
    namespaces: list[str] = field(default_factory=list)
    host_links: list[str] = field(default_factory=list)
    processes: list[LabProcess] = field(default_factory=list)
    phones: list[LabPhone] = field(default_factory=list)
    ap: LabAp | None = None
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["phones"] = [p.to_json() for p in self.phones]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LabState:
        data = dict(data)
        data["processes"] = [LabProcess(**p) for p in data.get("processes", [])]
        data["phones"] = [LabPhone.from_json(p) for p in data.get("phones", [])]
        data["ap"] = LabAp(**data["ap"]) if data.get("ap") else None
        return cls(**data)


def default_state_dir() -> Path:
    """``/run/flowtruth`` as root, else ``$XDG_RUNTIME_DIR/flowtruth`` (or a temp dir)."""
    if os.geteuid() == 0:
        return Path("/run/flowtruth")
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    return Path(base) / "flowtruth"


REGISTRY = Path("/run/flowtruth/labs")
"""One file per lab id naming its state file, so ``lab down`` tells live labs from stale ones."""


def _register(lab_id: str, state_path: Path) -> None:
    with contextlib.suppress(OSError):
        REGISTRY.mkdir(parents=True, exist_ok=True)
        (REGISTRY / lab_id).write_text(str(state_path.resolve()))


def _unregister(lab_id: str) -> None:
    with contextlib.suppress(OSError):
        (REGISTRY / lab_id).unlink()


def registered_state(lab_id: str) -> Path | None:
    """The state file a lab id was registered with, if that file still exists."""
    try:
        path = Path((REGISTRY / lab_id).read_text().strip())
    except OSError:
        return None
    return path if path.exists() else None


def _save(path: Path, state: LabState) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".lab.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(state.to_json(), f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _load(path: Path) -> LabState | None:
    try:
        return LabState.from_json(json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise LabError(
            f"{path}: unreadable lab state file: {exc}",
            hint="`flowtruth lab down` still cleans up by name; then delete the file",
        ) from None


# --------------------------------------------------------------------------- system helpers


def _run(argv: list[str], netns: str | None = None, check: bool = True, timeout: float = 20,
         input: str | None = None) -> subprocess.CompletedProcess[str]:  # fmt: skip
    full = ["ip", "netns", "exec", netns, *argv] if netns else argv
    try:
        res = subprocess.run(
            full, capture_output=True, text=True, timeout=timeout, input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
        )  # fmt: skip
    except FileNotFoundError:
        raise LabError(f"{full[0]} is not installed", hint=f"apt-get install {full[0]}") from None
    except subprocess.TimeoutExpired:
        raise LabError(f"{' '.join(full)} did not finish within {timeout:g} s") from None
    if check and res.returncode != 0:
        where = f" (in {netns})" if netns else ""
        raise LabError(f"{' '.join(argv)}{where} failed: {(res.stderr or res.stdout).strip()}")
    return res


def _proc_starttime(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def _alive(proc: LabProcess) -> bool:
    start = _proc_starttime(proc.pid)
    return start is not None and (proc.starttime is None or start == proc.starttime)


def _stop(proc: LabProcess, timeout: float = 5.0) -> None:
    if not _alive(proc):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _alive(proc):
        with contextlib.suppress(ChildProcessError):
            os.waitpid(proc.pid, os.WNOHANG)
        time.sleep(0.02)
    if _alive(proc):
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(proc.pid, 0)


def list_namespaces() -> list[str]:
    """Names in ``ip netns list``."""
    res = _run(["ip", "netns", "list"], check=False)
    return [line.split()[0] for line in res.stdout.splitlines() if line.strip()]


def _namespace_pids(netns: str) -> list[int]:
    res = _run(["ip", "netns", "pids", netns], check=False)
    return [int(p) for p in res.stdout.split() if p.isdigit()]


def _host_links() -> list[str]:
    res = _run(["ip", "-o", "link", "show"], check=False)
    out = []
    for line in res.stdout.splitlines():
        parts = line.split(":", 2)
        if len(parts) >= 2:
            out.append(parts[1].strip().split("@")[0])
    return out


def _slaac_address(netns: str, timeout: float = 6.0) -> str:
    """The global IPv6 address the phone built from the AP's router advertisement ('' if none)."""
    deadline = time.monotonic() + timeout
    while True:
        out = _run(["ip", "-6", "-o", "addr", "show", "dev", "wlan0", "scope", "global"],
                   netns=netns, check=False).stdout  # fmt: skip
        m = re.search(r"inet6 ([0-9a-f:]+)/64", out)
        if m and "tentative" not in out:
            return m.group(1)
        if time.monotonic() > deadline:
            return ""
        time.sleep(0.1)


@contextlib.contextmanager
def _allocation_lock() -> Iterator[None]:
    import fcntl

    REGISTRY.mkdir(parents=True, exist_ok=True)
    with open(REGISTRY / ".lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _free_mgmt_subnet(after: int) -> int:
    """The first X > ``after`` whose 10.254.X.0/30 no host interface uses."""
    used = _run(["ip", "-4", "-o", "addr", "show"], check=False).stdout
    taken = {int(m) for m in re.findall(r"inet 10\.254\.(\d+)\.", used)}
    for x in range(after + 1, 255):
        if x not in taken:
            return x
    raise LabError("no free management subnet in 10.254.0.0/16", hint="`flowtruth lab down`")


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.3)
        return s.connect_ex(("127.0.0.1", port)) == 0


def adb_run(port: int, *args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    """Run the adb client against the server on ``port``."""
    adb = shutil.which("adb")
    if adb is None:
        raise LabError("adb is not installed", hint="apt-get install adb")
    try:
        return subprocess.run(
            [adb, "-P", str(port), *args], capture_output=True, text=True, timeout=timeout,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        raise LabError(f"adb {' '.join(args)} did not answer within {timeout:g} s") from None


def skip_reason() -> str | None:
    """Why the lab cannot run here (None when it can): root, programs, namespaces."""
    if sys.platform != "linux":
        return "the virtual lab needs Linux network namespaces"
    if os.geteuid() != 0:
        return "the virtual lab needs root (network namespaces)"
    missing = [p for p in PROGRAMS if shutil.which(p) is None]
    if missing:
        return f"missing programs: {', '.join(missing)}"
    probe = f"{PREFIX}probe-{secrets.token_hex(3)}"
    res = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if res.returncode != 0:
        return f"cannot create network namespaces here: {res.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


LAB_APP_VERSIONS = {
    "org.thoughtcrime.securesms": (1413, "7.8.1"),
    "org.telegram.messenger": (61201, "12.0.1"),
    "com.whatsapp": (260270001, "2.26.2.70"),
}
OWNERS = ("Bob", "Carol", "Dave", "Erin", "Frank", "Grace", "Heidi", "Ivan", "Judy")
# In every phone's contacts but not a lab phone (her phone never answers): the scenarios'
# default contact, so a solo session reaches a conversation on every lab phone.
OUTSIDE_CONTACT = "Alice"


def phone_owner(index: int) -> str:
    """Phone N's owner: Bob, Carol, ... (what the other phones' messengers call it)."""
    return OWNERS[(index - 1) % len(OWNERS)]


def phone_contacts(index: int, phones: int) -> list[str]:
    """Phone N's contacts: the other lab phones' owners, then someone outside the lab."""
    return [phone_owner(i) for i in range(1, phones + 1) if i != index] + [OUTSIDE_CONTACT]


def lab_phone_config(index: int, updates: dict[str, Any] | None = None) -> PhoneConfig:
    """Phone N's identity: the Samsung and Xiaomi presets, reporting x86_64 (host binaries);
    ``updates`` sets more PhoneConfig fields (e.g. a failure mode: ``strace_fault``)."""
    base = samsung_s21() if index % 2 == 1 else xiaomi_poco_x3_pro()
    # the real dumps' phones speak Spanish and Indian English; lab phones speak the language
    # every scenario's table has, unless ``updates`` (``--locale``) say otherwise
    base = base.model_copy(update={"locale": "en-US"})
    if updates:
        from pydantic import ValidationError

        unknown = sorted(set(updates) - set(PhoneConfig.model_fields))
        if unknown:
            raise ConfigError(f"phone{index}: no phone setting {unknown[0]!r}",
                           hint="e.g. strace_fault, crlf_output, hostile_process")
        try:
            base = PhoneConfig.model_validate({**base.model_dump(), **updates})
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(x) for x in first["loc"])
            raise ConfigError(f"phone{index}: {where}: {first['msg']}") from None
    serial = base.serial if index <= 2 else f"{base.serial[:-2]}{index:02d}"
    abi = {
        "ro.product.cpu.abilist": "x86_64,arm64-v8a",
        "ro.product.cpu.abilist64": "x86_64,arm64-v8a",
        "ro.kernel.qemu": "0",
        "ro.flowtruth.lab": "1",
        "ro.flowtruth.lab.owner": phone_owner(index),
    }
    # the simulated messengers imitate these versions' screens (controller.lab.app_ui)
    packages = dict(base.packages)
    for name, (code, version) in LAB_APP_VERSIONS.items():
        if name in packages:
            packages[name] = packages[name].model_copy(
                update={"version_code": code, "version_name": version}
            )
    return base.model_copy(
        update={"abi": "x86_64", "serial": serial, "extra_props": {**base.extra_props, **abi},
                "packages": packages}
    )  # fmt: skip


# --------------------------------------------------------------------------- the lab


class Lab:
    """A running virtual lab (see the module docstring for the API)."""

    def __init__(self, state: LabState, state_path: Path) -> None:
        self.state = state
        self.state_path = state_path
        self.phone_updates: dict[int, dict[str, Any]] = {}
        """PhoneConfig fields per phone index for ``up`` (failure modes)."""
        self._ring_timeout_s = 45.0

    # ---- views

    @property
    def lab_id(self) -> str:
        return self.state.lab_id

    @property
    def workdir(self) -> Path:
        return Path(self.state.workdir)

    @property
    def phones(self) -> list[LabPhone]:
        return self.state.phones

    @property
    def ap(self) -> LabAp:
        assert self.state.ap is not None
        return self.state.ap

    @property
    def truth_path(self) -> Path:
        return self.workdir / "truth.jsonl"

    @property
    def ca_path(self) -> Path:
        return self.workdir / "tls" / "ca.pem"

    @property
    def adb_port(self) -> int | None:
        return self.state.adb_port

    def ns(self, role: str) -> str:
        return f"{PREFIX}-{self.lab_id}-{role}"

    def _save(self) -> None:
        _save(self.state_path, self.state)

    # ---- bring-up

    @classmethod
    def up(
        cls,
        phones: int = 2,
        adb_port: int | None = 5037,
        workdir: str | os.PathLike[str] | None = None,
        state_dir: str | os.PathLike[str] | None = None,
        mgmt_base: int | None = None,
        capture_dir: str | os.PathLike[str] | None = None,
        sink: Sink = _quiet,
        phone_updates: dict[int, dict[str, Any]] | None = None,
        phone_options: dict[int, dict[str, Any]] | None = None,
        ring_timeout_s: float = 45.0,
    ) -> Lab:
        """Create namespaces, servers, AP and phones; attach the phones to the adb server.

        ``adb_port=None`` leaves adb alone.  Phone N's management subnet is the first free
        10.254.X.0/30 on the host (X > ``mgmt_base`` when given), so labs can coexist.  On failure everything made
        so far is removed and :class:`LabError` is raised.

        ``phone_options`` changes phone N's :class:`PhoneConfig` fields (``{2: {"locale":
        "de-DE", "interruption_rate": 0}}``); ``ring_timeout_s`` is how long an unanswered
        call rings before the caller's app gives up.
        """
        if sys.platform != "linux":
            raise LabError("the virtual lab needs Linux network namespaces")
        if os.geteuid() != 0:
            raise RootRequired(
                "the virtual lab needs root (network namespaces, veths, nftables)",
                hint="run it as root, e.g. `sudo flowtruth lab up`",
            )
        if not 1 <= phones <= 9:
            raise LabError(f"--phones must be 1 to 9, not {phones}")
        if mgmt_base is not None and not 0 <= mgmt_base <= 240:
            raise LabError("mgmt_base must be 0 to 240")
        merged: dict[int, dict[str, Any]] = {}
        for extra in (phone_options or {}, phone_updates or {}):
            for k, v in extra.items():
                merged.setdefault(int(k), {}).update(v)
        phone_updates = merged
        for index, updates in (phone_updates or {}).items():  # bad settings fail before anything
            if not 1 <= index <= phones:
                raise ConfigError(f"phone{index}: the lab has phones 1 to {phones}")
            lab_phone_config(index, updates)
        missing = [p for p in PROGRAMS if shutil.which(p) is None]
        if adb_port is not None and shutil.which("adb") is None:
            missing.append("adb")
        if missing:
            raise LabError(
                f"the virtual lab needs: {', '.join(missing)}",
                hint="apt-get install iproute2 dnsmasq tcpdump busybox nftables ethtool adb",
            )
        sdir = Path(state_dir) if state_dir is not None else default_state_dir()
        path = sdir / "lab.json"
        old = _load(path)
        if old is not None:
            if any(ns in list_namespaces() for ns in old.namespaces):
                raise LabError(
                    f"a lab ({old.lab_id}) is already up (state file {path})",
                    hint="`flowtruth lab down` first",
                )
            Lab(old, path).down()
        lab_id = secrets.token_hex(2)
        own = workdir is None
        wd = Path(workdir) if workdir is not None else sdir / f"lab-{lab_id}"
        wd.mkdir(parents=True, exist_ok=True)
        state = LabState(lab_id=lab_id, workdir=str(wd.resolve()), own_workdir=own,
                         adb_port=adb_port)  # fmt: skip
        lab = cls(state, path)
        lab.phone_updates = dict(phone_updates or {})
        lab._ring_timeout_s = float(ring_timeout_s)
        lab._save()
        _register(lab_id, path)
        try:
            lab._bring_up(phones, mgmt_base, capture_dir, sink)
        except BaseException as exc:
            sink("failed", f"{exc}; cleaning up")
            try:
                lab.down()
            except Exception as undo:  # report both
                raise LabError(f"{exc}; cleanup also failed: {undo}") from None
            if isinstance(exc, LabError | RootRequired | KeyboardInterrupt):
                raise
            raise LabError(f"lab up failed: {exc}") from exc
        lab.state.status = "up"
        lab._save()
        return lab

    def _add_ns(self, role: str) -> str:
        name = self.ns(role)
        self.state.namespaces.append(name)
        self._save()
        res = _run(["ip", "netns", "add", name], check=False)
        if res.returncode != 0:
            raise LabError(
                f"cannot create network namespace {name}: {res.stderr.strip()}",
                hint="the lab needs root and a kernel with network namespaces",
            )
        _run(["ip", "link", "set", "lo", "up"], netns=name)
        return name

    def _spawn(self, name: str, netns: str, argv: list[str], ready: str | None = None,
               timeout: float = 15.0) -> LabProcess:  # fmt: skip
        log = self.workdir / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPO_ROOT) + (
            os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""
        )
        with open(log, "ab") as fh:
            popen = subprocess.Popen(
                ["ip", "netns", "exec", netns, *argv], stdin=subprocess.DEVNULL, stdout=fh,
                stderr=subprocess.STDOUT, start_new_session=True, close_fds=True, env=env,
                cwd="/",
            )  # fmt: skip
        proc = LabProcess(name, netns, popen.pid, _proc_starttime(popen.pid), argv, str(log))
        self.state.processes.append(proc)
        self._save()
        deadline = time.monotonic() + timeout
        while True:
            code = popen.poll()
            text = log.read_text(errors="replace") if ready is not None else ""
            if code is not None:
                tail = " | ".join(text.strip().splitlines()[-3:]) if text else ""
                raise LabError(f"{name} exited with status {code} at start: {tail}",
                                hint=f"full log: {log}")  # fmt: skip
            if ready is None or ready in text:
                return proc
            if time.monotonic() > deadline:
                raise LabError(f"{name} did not start within {timeout:g} s", hint=f"see {log}")
            time.sleep(0.03)

    def _bring_up(self, phones: int, mgmt_base: int | None, capture_dir: Any, sink: Sink) -> None:
        from ap_setup.config import ApConfig, CaptureConfig, StaticLease
        from ap_setup.lifecycle import ap_up
        from controller.lab import servers

        wd = self.workdir
        inet, ap = self._add_ns("inet"), self._add_ns("ap")
        phone_ns = [self._add_ns(f"phone{i}") for i in range(1, phones + 1)]
        sink("namespaces", ", ".join([inet, ap, *phone_ns]))
        # mobile data, as on a real phone with it on: rmnet_data0 (a link to the operator,
        # here the internet namespace, with no route through it) comes before wlan0 in
        # `ip addr` and `ip route`; the phone's address at the AP is still wlan0's
        for i, pns in enumerate(phone_ns, start=1):
            _run(["ip", "-n", pns, "link", "add", "rmnet_data0", "type", "veth", "peer", "name",
                  f"mob{i}", "netns", inet])  # fmt: skip
            _run(["ip", "-n", pns, "addr", "add", f"10.200.{i}.6/30", "dev", "rmnet_data0"])
            _run(["sysctl", "-q", "-w", "net.ipv6.conf.rmnet_data0.disable_ipv6=1"], netns=pns,
                 check=False)  # fmt: skip
            _run(["ip", "-n", inet, "link", "set", f"mob{i}", "up"])
            _run(["ip", "-n", pns, "link", "set", "rmnet_data0", "up"])

        # internet <-> AP uplink, server addresses
        _run(["ip", "-n", ap, "link", "add", "wan0", "type", "veth", "peer", "name", "up0",
              "netns", inet])  # fmt: skip
        _run(["ip", "-n", inet, "addr", "add", UPLINK_INET, "dev", "up0"])
        _run(["ip", "-n", inet, "link", "set", "up0", "up"])
        for addr in servers.server_addresses():  # on lo: containers often lack dummy links
            _run(["ip", "-n", inet, "addr", "add", f"{addr}/32", "dev", "lo"])
        _run(["ip", "-n", ap, "addr", "add", UPLINK_AP, "dev", "wan0"])
        _run(["ip", "-n", ap, "link", "set", "wan0", "up"])
        _run(["ip", "-n", ap, "route", "add", "default", "via", UPLINK_INET.split("/")[0]])
        # IPv6 is routed, not NATed (as on real networks): a ULA prefix for the phones
        _run(["ip", "-n", inet, "addr", "add", UPLINK6_INET, "dev", "up0", "nodad"])
        for addr in servers.server_addresses_v6():
            _run(["ip", "-n", inet, "addr", "add", f"{addr}/128", "dev", "lo"])
        _run(["ip", "-n", ap, "addr", "add", UPLINK6_AP, "dev", "wan0", "nodad"])
        _run(["ip", "-n", inet, "-6", "route", "add", str(ipaddress.ip_interface(PHONE_SUBNET6)
              .network), "via", UPLINK6_AP.split("/")[0]])  # fmt: skip
        _run(["ip", "-n", ap, "-6", "route", "add", "default", "via", UPLINK6_INET.split("/")[0]])
        _run(["sysctl", "-q", "-w", "net.ipv6.conf.all.forwarding=1"], netns=ap)
        # the AP's phone-facing interface: a bridge of one veth per phone
        _run(["ip", "-n", ap, "link", "add", "wlan0", "type", "bridge", "stp_state", "0",
              "forward_delay", "0"])  # fmt: skip
        leases = []
        for i, pns in enumerate(phone_ns, start=1):
            mac = f"02:66:74:00:00:{i:02x}"
            ip = str(PHONE_SUBNET.network.network_address + 10 + i)
            _run(["ip", "-n", ap, "link", "add", f"sta{i}", "type", "veth", "peer", "name",
                  "wlan0", "netns", pns])  # fmt: skip
            _run(["ip", "-n", pns, "link", "set", "wlan0", "address", mac])
            _run(["ip", "-n", ap, "link", "set", f"sta{i}", "master", "wlan0"])
            _run(["ip", "-n", ap, "link", "set", f"sta{i}", "up"])
            for ns, dev in ((ap, f"sta{i}"), (pns, "wlan0")):
                _run(["ethtool", "-K", dev, "tso", "off", "gso", "off", "gro", "off"], netns=ns,
                     check=False)  # fmt: skip
            # no duplicate address detection: the link-local address and the router
            # solicitation go out at once when the phone's Wi-Fi comes up after the AP
            for setting in ("accept_dad=0", "router_solicitation_delay=0"):
                _run(["sysctl", "-q", "-w", f"net.ipv6.conf.wlan0.{setting}"], netns=pns)
            leases.append(StaticLease(mac=mac, ip=ipaddress.IPv4Address(ip), name=f"phone{i}"))
        # an IPv6 address added to a link that is down is lost when it comes up
        _run(["ip", "-n", ap, "link", "set", "wlan0", "up"])
        _run(["ip", "-n", ap, "addr", "add", PHONE_SUBNET6, "dev", "wlan0", "nodad"])
        sink("links", f"uplink, bridge wlan0 with {phones} phone(s)")

        # TLS material, the internet's DNS and servers
        ca, cert, key = servers.make_certificates(wd / "tls")
        dns_conf = wd / "inet-dnsmasq.conf"
        dns_conf.write_text(
            "\n".join(
                ["no-resolv", "no-hosts", "bind-interfaces", f"listen-address={servers.DNS_SERVER}",
                 "except-interface=lo", "log-queries", f"log-facility={wd / 'logs' / 'inet-dns.log'}",
                 "pid-file=", *servers.dnsmasq_lines()]
            ) + "\n"
        )  # fmt: skip
        (wd / "logs").mkdir(exist_ok=True)
        self._spawn("inet-dns", inet, ["dnsmasq", "--keep-in-foreground",
                                       f"--conf-file={dns_conf}"])  # fmt: skip
        self._spawn("servers", inet, [sys.executable, "-m", "controller.lab.servers",
                                      "--cert", str(cert), "--key", str(key)], ready="serving")  # fmt: skip
        sink("internet", f"servers and DNS at {servers.DNS_SERVER}")

        # the access point: ap_setup with radio off
        ap_dir = wd / "ap"
        cfg = ApConfig(
            interface="wlan0", uplink="wan0", netns=ap, radio=False, address=PHONE_SUBNET,
            static_leases=leases, upstream_dns=[ipaddress.IPv4Address(servers.DNS_SERVER)],
            state_dir=ap_dir, run_dir=ap_dir, lease_time="12h", ipv6_ra=True,
            capture=CaptureConfig(tool="tcpdump"),
        )  # fmt: skip
        self.state.ap = LabAp(netns=ap, interface="wlan0", subnet=str(PHONE_SUBNET.network),
                              address=str(PHONE_SUBNET.ip), uplink="wan0",
                              state_path=str(cfg.state_path))  # fmt: skip
        self._save()
        ap_up(cfg, capture_dir=Path(capture_dir) if capture_dir else None,
              sink=lambda e: sink(f"ap {e.step}", e.detail))  # fmt: skip

        # phones: DHCP, resolver, management link, adbd, simulated apps
        script = wd / "udhcpc.script"
        script.write_text(UDHCPC_SCRIPT)
        script.chmod(0o755)
        for pns in phone_ns:  # the phones join the Wi-Fi together (solicitations answered once)
            _run(["ip", "-n", pns, "link", "set", "wlan0", "up"])
        self.truth_path.touch()
        os.chmod(self.truth_path, 0o644)
        for i, pns in enumerate(phone_ns, start=1):
            lease = leases[i - 1]
            etc = Path("/etc/netns") / pns
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "resolv.conf").write_text("")
            res = _run(["busybox", "udhcpc", "-i", "wlan0", "-n", "-q", "-f", "-t", "6", "-T", "1",
                        "-s", str(script), "-x", f"hostname:phone{i}"], netns=pns, check=False,
                       timeout=30)  # fmt: skip
            got = _run(["ip", "-4", "-o", "addr", "show", "dev", "wlan0"], netns=pns).stdout
            if str(lease.ip) not in got:
                raise LabError(f"phone{i} got no DHCP lease from the AP: "
                               f"{(res.stderr or res.stdout).strip()[-300:]}")  # fmt: skip
            host_link = f"{PREFIX}{self.lab_id}a{i}"
            self.state.host_links.append(host_link)
            self._save()
            _run(["ip", "link", "add", host_link, "type", "veth", "peer", "name", "adb0",
                  "netns", pns])  # fmt: skip
            with _allocation_lock():
                n = _free_mgmt_subnet(mgmt_base or 0)
                host_ip, mgmt_ip = f"10.254.{n}.1", f"10.254.{n}.2"
                _run(["ip", "addr", "add", f"{host_ip}/30", "dev", host_link])
            _run(["ip", "link", "set", host_link, "up"])
            _run(["ip", "-n", pns, "addr", "add", f"{mgmt_ip}/30", "dev", "adb0"])
            _run(["ip", "-n", pns, "link", "set", "adb0", "up"])
            config = lab_phone_config(i, self.phone_updates.get(i))
            pdir = wd / "phones" / f"phone{i}"
            pdir.mkdir(parents=True, exist_ok=True)
            cfg_path = wd / "phones" / f"phone{i}.json"
            cfg_path.write_text(json.dumps(config.model_dump(), indent=1))
            phone = LabPhone(name=f"phone{i}", index=i, serial=f"{mgmt_ip}:{ADBD_PORT}",
                             netns=pns, ip=str(lease.ip), mac=lease.mac, mgmt_ip=mgmt_ip,
                             host_ip=host_ip, host_link=host_link, state_dir=str(pdir),
                             config=config, owner=phone_owner(i),
                             contacts=phone_contacts(i, phones))  # fmt: skip
            self.state.phones.append(phone)
            self._save()
            self._spawn(f"adbd-phone{i}", pns, [sys.executable, "-m", "controller.lab.adbd",
                        "--config", str(cfg_path), "--host", mgmt_ip, "--port", str(ADBD_PORT),
                        "--state-dir", str(pdir)], ready="listening on")  # fmt: skip
            self._spawn(f"apps-phone{i}", pns, [sys.executable, "-m", "controller.lab.apps",
                        "manager", "--state-dir", str(pdir), "--truth", str(self.truth_path),
                        "--ca", str(ca), "--owner", phone.owner,
                        *[a for c in phone.contacts for a in ("--contact", c)],
                        "--relay", str(wd / "relay"), "--interruptions",
                        str(config.interruption_rate), "--ring-timeout",
                        str(self._ring_timeout_s)],
                        ready="managing")  # fmt: skip
            sink(f"phone{i}", f"{config.model} at {lease.ip}, adb {phone.serial}")

        for phone in self.phones:  # router advertisements: all phones at once
            phone.ip6 = _slaac_address(phone.netns)
            sink(f"{phone.name} IPv6", phone.ip6 or "none (no router advertisement)")
        self._save()

        if self.state.adb_port is not None:
            self.connect_adb()

    def connect_adb(self) -> None:
        """``adb connect`` every phone (starting the adb server on the lab's port if needed)."""
        port = self.state.adb_port
        if port is None:
            return
        for phone in self.phones:
            for _attempt in range(3):
                out = adb_run(port, "connect", phone.serial)
                text = (out.stdout + out.stderr).strip()
                if "connected to" in text:
                    break
                time.sleep(0.3)
            else:
                raise LabError(f"adb connect {phone.serial} failed: {text}")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            states = self.adb_states()
            if all(states.get(p.serial) == "device" for p in self.phones):
                return
            time.sleep(0.1)
        raise LabError(f"phones did not come online in adb: {self.adb_states()}")

    def adb_states(self) -> dict[str, str]:
        """``adb devices`` as serial -> state ({} when no server listens on the lab's port)."""
        port = self.state.adb_port
        if port is None or not _port_open(port):
            return {}
        out = adb_run(port, "devices").stdout
        states = {}
        for line in out.splitlines()[1:]:
            parts = line.split()
            if len(parts) >= 2:
                states[parts[0]] = parts[1]
        return states

    # ---- use

    @classmethod
    def load(cls, state_dir: str | os.PathLike[str] | None = None) -> Lab | None:
        """The lab recorded in the state file (running or half-dead), None without one."""
        sdir = Path(state_dir) if state_dir is not None else default_state_dir()
        path = sdir / "lab.json"
        state = _load(path)
        return None if state is None else cls(state, path)

    def phone(self, name_or_serial: str) -> LabPhone:
        """A phone by name (``phone1``), adb serial or ro.serialno."""
        for p in self.phones:
            if name_or_serial in (p.name, p.serial, p.config.serial):
                return p
        raise LabError(f"no lab phone {name_or_serial!r}",
                       hint="known: " + ", ".join(p.name for p in self.phones))  # fmt: skip

    def start_capture(self, out_dir: str | os.PathLike[str], basename: str = "capture") -> Any:
        """Start tcpdump on the AP's phone-facing bridge (ap_setup's ``Capture``); returns it."""
        from ap_setup.capture import Capture
        from ap_setup.config import CaptureConfig
        from ap_setup.runner import SubprocessRunner

        cap = Capture(CaptureConfig(tool="tcpdump"), self.ap.interface, Path(out_dir),
                      SubprocessRunner(self.ap.netns), basename=basename)  # fmt: skip
        cap.start()
        return cap

    def status(self) -> dict[str, Any]:
        """Namespaces, processes, phones (adb state, running apps) and the AP capture."""
        from controller.lab import toolbox_runtime as rt

        present = set(list_namespaces())
        adb = self.adb_states()
        phones = []
        for p in self.phones:
            try:
                st = rt.read_state(p.state_dir)
                running = {k: v.get("pid") for k, v in st.get("running", {}).items()}
                fg = (st.get("foreground") or {}).get("package")
            except (OSError, ValueError):
                running, fg = {}, None
            phones.append({"name": p.name, "serial": p.serial, "model": p.config.model,
                           "ip": p.ip, "netns": p.netns, "adb": adb.get(p.serial, "offline"),
                           "running": running, "foreground": fg, "owner": p.owner,
                           "contacts": p.contacts, "locale": p.config.locale})  # fmt: skip
        capture = None
        if self.state.ap is not None:
            from ap_setup.lifecycle import ap_status  # noqa: F401  (status from the state file)
            from ap_setup.state import ApState

            aps = ApState.load(Path(self.ap.state_path))
            if aps is not None and "capture" in aps.processes:
                capture = {"dir": aps.capture_dir,
                           "running": _alive(LabProcess("capture", self.ap.netns,
                                             aps.processes["capture"].pid,
                                             aps.processes["capture"].starttime, [], ""))}  # fmt: skip
        return {
            "lab_id": self.lab_id,
            "status": self.state.status,
            "workdir": str(self.workdir),
            "adb_port": self.state.adb_port,
            "namespaces": {ns: ns in present for ns in self.state.namespaces},
            "processes": {p.name: _alive(p) for p in self.state.processes},
            "phones": phones,
            "ap": asdict(self.state.ap) if self.state.ap else None,
            "capture": capture,
            "truth": str(self.truth_path),
        }

    # ---- teardown

    def down(self, keep_workdir: bool = False, sink: Sink = _quiet) -> None:
        """Remove everything this lab made; idempotent, and works on a half-dead lab."""
        state = self.state
        state.status = "stopping"
        with contextlib.suppress(OSError):
            self._save()
        port = state.adb_port
        if port is not None and _port_open(port) and shutil.which("adb"):
            for phone in state.phones:
                with contextlib.suppress(LabError):
                    adb_run(port, "disconnect", phone.serial, timeout=5)
        order = {"apps": 0, "adbd": 1, "servers": 2, "inet-dns": 3}
        for proc in sorted(state.processes, key=lambda p: order.get(p.name.split("-")[0], 9)):
            _stop(proc)
        if state.ap is not None and Path(state.ap.state_path).exists():
            from ap_setup.lifecycle import ap_down
            from ap_setup.runner import SubprocessRunner

            try:
                if state.ap.netns in list_namespaces():
                    ap_down(Path(state.ap.state_path), SubprocessRunner(state.ap.netns))
            except Exception as exc:  # the namespace goes anyway; report and carry on
                sink("ap", f"ap down: {exc}")
            with contextlib.suppress(OSError):
                Path(state.ap.state_path).unlink()
        sink("processes", "stopped")
        _remove_lab_objects(state.lab_id, state.namespaces, state.host_links)
        sink("namespaces", "removed")
        with contextlib.suppress(FileNotFoundError):
            self.state_path.unlink()
        _unregister(state.lab_id)
        if state.own_workdir and not keep_workdir:
            shutil.rmtree(state.workdir, ignore_errors=True)

    @classmethod
    def down_all(cls, state_dir: str | os.PathLike[str] | None = None,
                 sink: Sink = _quiet) -> list[str]:  # fmt: skip
        """Take down the recorded lab and every stale ``ftl-*`` lab; the lab ids removed.

        A lab whose state file (in another state directory) still exists is live and left
        alone; a lab without one (a killed run that lost it, or never wrote it) is stale.
        """
        done = []
        lab = cls.load(state_dir)
        if lab is not None:
            lab.down(sink=sink)
            done.append(lab.lab_id)
        for lab_id in stale_lab_ids():
            other = registered_state(lab_id)
            if other is not None:
                stale_lab = Lab.load(other.parent)
                if stale_lab is not None and stale_lab.lab_id == lab_id:
                    sink("skipped", f"lab {lab_id} is recorded in {other}; "
                         f"`flowtruth lab down --state-dir {other.parent}` removes it")  # fmt: skip
                    continue
            cleanup_stale(lab_id)
            _unregister(lab_id)
            sink("stale", f"removed the leftovers of lab {lab_id}")
            done.append(lab_id)
        return done


def _kill_namespace_processes(netns: str) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = [p for p in _namespace_pids(netns) if p != os.getpid()]
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + (2.0 if sig == signal.SIGTERM else 1.0)
        while time.monotonic() < deadline and _namespace_pids(netns):
            for pid in pids:
                with contextlib.suppress(ChildProcessError, OSError):
                    os.waitpid(pid, os.WNOHANG)
            time.sleep(0.05)


def _remove_lab_objects(lab_id: str, namespaces: list[str], host_links: list[str]) -> None:
    present = set(list_namespaces())
    names = set(namespaces) | {n for n in present if (m := NS_RE.match(n)) and m.group(1) == lab_id}
    # phones first, so nothing keeps talking to the AP while it goes
    for ns in sorted(names, key=lambda n: (not n.split("-")[-1].startswith("phone"), n)):
        if ns in present:
            _kill_namespace_processes(ns)
    for ns in sorted(names):
        if ns in present:
            _run(["ip", "netns", "del", ns], check=False)
        shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)
    links = set(host_links) | {
        link for link in _host_links() if (m := HOST_LINK_RE.match(link)) and m.group(1) == lab_id
    }
    for link in links:
        _run(["ip", "link", "del", link], check=False)


def stale_lab_ids() -> list[str]:
    """Lab ids with ``ftl-<id>-*`` namespaces, ``ftl<id>a<N>`` links or /etc/netns dirs."""
    ids = {m.group(1) for n in list_namespaces() if (m := NS_RE.match(n))}
    ids |= {m.group(1) for link in _host_links() if (m := HOST_LINK_RE.match(link))}
    etc = Path("/etc/netns")
    if etc.is_dir():
        ids |= {m.group(1) for d in etc.iterdir() if (m := NS_RE.match(d.name))}
    return sorted(ids)


def cleanup_stale(lab_id: str | None = None) -> list[str]:
    """Remove what labs left behind (all of them, or one lab id); the ids cleaned."""
    ids = [lab_id] if lab_id else stale_lab_ids()
    for i in ids:
        _remove_lab_objects(i, [], [])
    return ids
