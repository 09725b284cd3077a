"""The device layer: a narrow ``DeviceLink`` port over adbutils, and what the engine asks a phone.

:class:`AdbDeviceLink` talks to one phone through the adb server (USB or TCP serials alike);
every call has a timeout and every adb or socket failure becomes a :class:`DeviceError`
naming the serial, so a phone that vanishes mid-call never hangs the engine.
:class:`RecordingDeviceLink` is the fake for unit tests: it answers from a table of
command patterns and records every call.

The functions below take any link: :func:`read_facts` (model, manufacturer, Android
version, ABI, battery, SELinux, locale, addresses, and the phone's address at the AP: the
AP's DHCP lease for its Wi-Fi MAC, else the address inside the AP's subnet, else wlan0's;
never the mobile-data address ``ip addr`` may list first), :func:`check_root` (``su -c id``, ``su 0 id``,
``magisk -v``), :func:`read_apps` (``pm list packages -U --show-versioncode`` and
``dumpsys package`` versionName), :func:`probe_clock` (bracketed ``date +%s.%N``),
:func:`push_checked` / :func:`pull_checked` (sha256 on both ends) and :func:`preflight`
(what a technician must fix before a run: mobile data, private DNS, IPv6, screen lock,
battery, airplane mode) and :func:`check_tracing` (SELinux mode, Yama ptrace_scope, whether
root's strace stays attached). Parsers read real phones' output: ``getprop`` in UTF-16 or
with CRLF and values over several lines, ``ip -o addr``, ``ip route``, toybox ``ps -A``,
``dumpsys battery``. :func:`type_text` types into the focused field: printable ASCII
with ``input text``, anything else through the ADBKeyBoard IME (``ADB_INPUT_B64``
broadcasts), restoring the phone's own keyboard afterwards.
"""

from __future__ import annotations

import base64
import hashlib
import re
import shlex
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from controller.errors import ConfigError, DeviceError, RootRequired

DEFAULT_TIMEOUT_S = 30.0


@dataclass(frozen=True, slots=True)
class ShellResult:
    """One shell command's outcome; a non-zero exit is data, the caller decides."""

    command: str
    returncode: int
    stdout: str
    stderr: str = ""

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def check(self, serial: str, what: str | None = None) -> ShellResult:
        """Raise :class:`DeviceError` unless the command succeeded."""
        if not self.ok:
            detail = (self.stderr or self.stdout).strip().splitlines()
            raise DeviceError(
                f"{serial}: {what or self.command!r} failed with exit status {self.returncode}"
                + (f": {detail[-1]}" if detail else ""))
        return self


@runtime_checkable
class DeviceLink(Protocol):
    """The narrow port to one phone."""

    serial: str

    def shell(self, command: str, timeout: float = DEFAULT_TIMEOUT_S) -> ShellResult:
        """Run a shell command line (already quoted) as the adb shell user."""
        ...

    def push(self, local: Path, remote: str, mode: int = 0o644,
             timeout: float = DEFAULT_TIMEOUT_S) -> None:
        """Copy a host file to the phone."""
        ...

    def pull(self, remote: str, local: Path, timeout: float = DEFAULT_TIMEOUT_S) -> int:
        """Copy a phone file to the host; returns its size."""
        ...


def root_shell(link: DeviceLink, command: str, timeout: float = DEFAULT_TIMEOUT_S) -> ShellResult:
    """Run a command line as root through Magisk's ``su -c``."""
    return link.shell(f"su -c {shlex.quote(command)}", timeout=timeout)


def getprop(link: DeviceLink, name: str, timeout: float = 10.0) -> str:
    """One system property (empty when unset)."""
    return link.shell(f"getprop {shlex.quote(name)}", timeout=timeout).stdout.strip()


# --------------------------------------------------------------------------- adbutils


class AdbDeviceLink:
    """:class:`DeviceLink` over adbutils (the adb server's USB or TCP device ``serial``)."""

    def __init__(self, client: Any, serial: str) -> None:
        self.client = client
        self.serial = serial
        self._device = client.device(serial)

    def _fail(self, what: str, err: BaseException) -> DeviceError:
        text = str(err).strip() or type(err).__name__
        return DeviceError(f"{self.serial}: {what}: {text}",
                           hint="is the phone still connected? (adb devices)")

    def shell(self, command: str, timeout: float = DEFAULT_TIMEOUT_S) -> ShellResult:
        try:
            r = self._device.shell2(command, timeout=timeout, v2=True)
        except Exception as err:  # adbutils.AdbError, AdbTimeout, socket errors
            raise self._fail(f"shell {command[:60]!r}", err) from None
        return ShellResult(command, int(r.returncode), r.stdout or "", r.stderr or "")

    def push(self, local: Path, remote: str, mode: int = 0o644,
             timeout: float = DEFAULT_TIMEOUT_S) -> None:
        try:
            self._device.sync.push(str(local), remote, mode=mode)
        except Exception as err:
            raise self._fail(f"push {remote}", err) from None

    def forward(self, remote_port: int) -> int:
        """``adb forward tcp:LOCAL tcp:REMOTE`` to a free local port; returns LOCAL."""
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            local = int(s.getsockname()[1])
        try:
            self._device.forward(f"tcp:{local}", f"tcp:{int(remote_port)}")
        except Exception as err:
            raise self._fail(f"forward tcp:{local} tcp:{remote_port}", err) from None
        return local

    def forward_remove(self, local_port: int) -> None:
        """Remove a forward made by :meth:`forward` (a missing one is fine)."""
        try:
            self._device.forward_remove(f"tcp:{int(local_port)}", raise_non_found=False)
        except Exception as err:
            raise self._fail(f"remove forward tcp:{local_port}", err) from None

    def pull(self, remote: str, local: Path, timeout: float = DEFAULT_TIMEOUT_S) -> int:
        try:
            st = self._device.sync.stat(remote)
            if st.mode == 0:  # adb's STAT answers zeros for a missing file
                raise DeviceError(f"{self.serial}: pull {remote}: no such file on the phone")
            return int(self._device.sync.pull(remote, str(local)))
        except DeviceError:
            raise
        except Exception as err:
            raise self._fail(f"pull {remote}", err) from None


def adb_client(port: int = 5037, host: str = "127.0.0.1", socket_timeout: float = 20.0,
               start_server: bool = False) -> Any:
    """An adbutils client of the adb server at ``host:port`` (every socket call times out).

    A server that does not answer is started (``adb -P PORT start-server``) only with
    ``start_server``; otherwise :class:`DeviceError` says so. (Left to itself, adbutils
    would start one on the default port, whatever port was asked for.)
    """
    import socket
    import subprocess

    import adbutils

    def reachable() -> bool:
        with socket.socket() as s:
            s.settimeout(3)
            return s.connect_ex((host, port)) == 0

    if not reachable():
        if start_server and host in ("127.0.0.1", "localhost"):
            try:
                subprocess.run(["adb", "-P", str(port), "start-server"], capture_output=True,
                               timeout=30, stdin=subprocess.DEVNULL)
            except (OSError, subprocess.TimeoutExpired) as err:
                raise DeviceError(f"cannot start the adb server on port {port}: {err}",
                                  hint="apt-get install adb") from None
        if not reachable():
            raise DeviceError(f"no adb server answers at {host}:{port}",
                              hint=f"start it: adb -P {port} start-server")
    return adbutils.AdbClient(host=host, port=port, socket_timeout=socket_timeout)


def list_serials(client: Any) -> list[tuple[str, str]]:
    """``(serial, state)`` of every device the adb server knows (USB and TCP)."""
    try:
        return [(d.serial, d.state) for d in client.list()]
    except Exception as err:
        raise DeviceError(f"cannot list devices from the adb server: {err}",
                          hint="is the adb server running? (adb start-server)") from None


def connect(client: Any, address: str) -> str:
    """``adb connect HOST:PORT`` (a TCP phone); returns its serial."""
    try:
        out = str(client.connect(address, timeout=10))
    except Exception as err:
        raise DeviceError(f"{address}: adb connect failed: {err}") from None
    if "connected" not in out:
        raise DeviceError(f"{address}: adb connect failed: {out.strip()}")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if (address, "device") in list_serials(client):
            return address
        time.sleep(0.1)
    raise DeviceError(f"{address}: connected but never became ready", hint="adb devices")


# --------------------------------------------------------------------------- fake


@dataclass
class RecordingDeviceLink:
    """A fake :class:`DeviceLink`: answers from ``responses`` (regex -> result) and records calls.

    A response is a :class:`ShellResult`, a string (stdout, exit 0), or a callable taking
    the command line. Unmatched commands exit 0 with empty output. ``files`` is the
    phone's file system for push/pull; ``vanish_after`` makes the phone disappear (every
    call raises :class:`DeviceError`) after that many calls.
    """

    serial: str = "FAKE0001"
    responses: list[tuple[str, Any]] = field(default_factory=list)
    files: dict[str, bytes] = field(default_factory=dict)
    calls: list[tuple[str, str]] = field(default_factory=list)
    vanish_after: int | None = None

    def _tick(self, kind: str, what: str) -> None:
        self.calls.append((kind, what))
        if self.vanish_after is not None and len(self.calls) > self.vanish_after:
            raise DeviceError(f"{self.serial}: device '{self.serial}' not found")

    def on(self, pattern: str, response: Any) -> RecordingDeviceLink:
        """Answer commands matching ``pattern`` (first match wins, newest rule first)."""
        self.responses.insert(0, (pattern, response))
        return self

    @property
    def commands(self) -> list[str]:
        return [w for k, w in self.calls if k == "shell"]

    def shell(self, command: str, timeout: float = DEFAULT_TIMEOUT_S) -> ShellResult:
        self._tick("shell", command)
        sep = f"; echo {MARK}; "
        if sep in command:  # shell_many: answer each part as if run alone
            outs = []
            for part in command.split(sep):
                inner = part.strip().removeprefix("{ ").removesuffix("; } 2>/dev/null")
                outs.append(self._answer(inner).stdout.rstrip("\n"))
            return ShellResult(command, 0, "".join(o + "\n" + MARK + "\n" for o in outs[:-1])
                               + outs[-1] + "\n")
        return self._answer(command)

    def _answer(self, command: str) -> ShellResult:
        for pattern, resp in self.responses:
            if re.search(pattern, command):
                if callable(resp):
                    resp = resp(command)
                if isinstance(resp, ShellResult):
                    return ShellResult(command, resp.returncode, resp.stdout, resp.stderr)
                return ShellResult(command, 0, str(resp))
        if command.startswith("sha256sum "):
            paths = shlex.split(command)[1:]
            out = "".join(f"{hashlib.sha256(self.files[p]).hexdigest()}  {p}\n"
                          for p in paths if p in self.files)
            missing = [p for p in paths if p not in self.files]
            err = "".join(f"sha256sum: {p}: No such file or directory\n" for p in missing)
            return ShellResult(command, 1 if missing else 0, out, err)
        return ShellResult(command, 0, "")

    def forward(self, remote_port: int) -> int:
        self._tick("forward", f"tcp:{remote_port}")
        return 40000 + int(remote_port) % 1000

    def forward_remove(self, local_port: int) -> None:
        self._tick("forward_remove", f"tcp:{local_port}")

    def push(self, local: Path, remote: str, mode: int = 0o644,
             timeout: float = DEFAULT_TIMEOUT_S) -> None:
        self._tick("push", remote)
        self.files[remote] = Path(local).read_bytes()

    def pull(self, remote: str, local: Path, timeout: float = DEFAULT_TIMEOUT_S) -> int:
        self._tick("pull", remote)
        if remote not in self.files:
            raise DeviceError(f"{self.serial}: pull {remote}: No such file or directory")
        Path(local).write_bytes(self.files[remote])
        return len(self.files[remote])


# --------------------------------------------------------------------------- facts


MOBILE_IFACES = ("rmnet", "ccmni", "seth_", "v4-rmnet", "clat", "dummy", "tun", "p2p",
                 "ap0", "swlan", "adb0")
"""Interface prefixes that never carry the phone's address at the AP (mobile data, CLAT,
VPN, hotspot, the virtual lab's adb management link)."""


@dataclass(frozen=True, slots=True)
class DeviceFacts:
    """What the engine records about a phone."""

    serial: str
    model: str
    manufacturer: str
    android: str
    sdk: str
    abi: str
    selinux: str
    battery_level: int | None
    addresses: tuple[str, ...] = ()
    mac: str | None = None
    ap_ip: str | None = None
    """The phone's IPv4 address at the AP (see :func:`choose_ap_address`)."""
    ip_source: str = ""
    """How ``ap_ip`` was found: ``dhcp-lease``, ``ap-subnet``, ``wifi-interface``, ``first``."""
    locale: str = ""
    wifi_interface: str = "wlan0"

    @property
    def ip(self) -> str | None:
        """The phone's side of a flow at the AP: its address on the AP's subnet (never
        the mobile-data address that ``ip addr`` may list first)."""
        return self.ap_ip or next((a for a in self.addresses if ":" not in a), None)

    def to_manifest(self) -> dict[str, Any]:
        return {"serial": self.serial, "model": self.model, "manufacturer": self.manufacturer,
                "android": self.android, "sdk": self.sdk, "abi": self.abi,
                "selinux": self.selinux, "battery_level": self.battery_level,
                "ip": self.ip, "ip_source": self.ip_source, "addresses": list(self.addresses),
                "mac": self.mac, "locale": self.locale}


def parse_battery(text: str) -> dict[str, str]:
    """``dumpsys battery`` as ``{key: value}`` (indented ``key: value`` lines; Samsung's
    extra keys and unindented trailer lines included)."""
    out: dict[str, str] = {}
    for line in text.replace("\r", "").splitlines():
        key, sep, value = line.strip().partition(": ")
        if not sep:
            key, sep, value = line.strip().partition(":")
        if sep and key and not key.endswith("state"):
            out.setdefault(key, value.strip())
    return out


def parse_battery_level(text: str) -> int | None:
    """``level: N`` from ``dumpsys battery``."""
    m = re.search(r"^\s*level:\s*(\d+)", text, re.M)
    return int(m.group(1)) if m else None


def parse_addresses(text: str) -> list[str]:
    """Global addresses from ``ip -o addr`` (no loopback, no link-local)."""
    out = []
    for m in re.finditer(r"\binet6?\s+([0-9a-fA-F.:]+)/\d+", text):
        a = m.group(1)
        if a.startswith("127.") or a == "::1" or a.lower().startswith("fe80"):
            continue
        out.append(a)
    return out


@dataclass(frozen=True, slots=True)
class InterfaceAddress:
    """One address line of ``ip -o addr`` (or a ``src`` of ``ip route``)."""

    interface: str
    address: str
    prefix: int

    @property
    def network(self) -> Any:
        import ipaddress

        return ipaddress.ip_interface(f"{self.address}/{self.prefix}").network


_IP_O_ADDR = re.compile(r"^\s*\d+:\s+(\S+?)(?:@\S+)?\s+inet6?\s+([0-9a-fA-F.:]+)/(\d+)")


def parse_ip_addr(text: str) -> list[InterfaceAddress]:
    """``ip -o addr`` / ``ip -o -4 addr`` lines as (interface, address, prefix), in the
    order printed (loopback and link-local left out)."""
    out = []
    for line in text.replace("\r", "").splitlines():
        m = _IP_O_ADDR.match(line)
        if not m:
            continue
        a = m.group(2)
        if a.startswith("127.") or a == "::1" or a.lower().startswith("fe80"):
            continue
        out.append(InterfaceAddress(m.group(1), a, int(m.group(3))))
    return out


_IP_ROUTE = re.compile(r"^(\d+\.\d+\.\d+\.\d+)/(\d+)\s.*?\bdev\s+(\S+).*?\bsrc\s+(\d+\.\d+\.\d+\.\d+)")


def parse_ip_route(text: str) -> list[InterfaceAddress]:
    """The link routes of ``ip route`` (``NET/P dev IFACE ... src ADDR``) as the
    interface's own address with the route's prefix, in the order printed."""
    out = []
    for line in text.replace("\r", "").splitlines():
        m = _IP_ROUTE.match(line.strip())
        if m:
            out.append(InterfaceAddress(m.group(3), m.group(4), int(m.group(2))))
    return out


def parse_dnsmasq_leases(text: str) -> dict[str, str]:
    """A dnsmasq lease file (``expiry mac ip name client-id``) as {mac: ip}."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        f = line.split()
        if len(f) >= 3 and f[0].isdigit() and re.fullmatch(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}",
                                                              f[1]):
            out[f[1].lower()] = f[2]
    return out


def choose_ap_address(ifaddrs: Sequence[InterfaceAddress], *, mac: str | None = None,
                      leases: dict[str, str] | None = None, subnet: str | None = None,
                      wifi_interface: str = "wlan0") -> tuple[str | None, str]:
    """The phone's IPv4 address at the AP and how it was found: the AP's DHCP lease for
    the phone's Wi-Fi MAC (the authority), else the address inside the AP's subnet, else
    the Wi-Fi interface's, else the first IPv4 address not on a mobile-data interface."""
    import ipaddress

    v4 = [a for a in ifaddrs if ":" not in a.address]
    if mac and leases and mac.lower() in leases:
        return leases[mac.lower()], "dhcp-lease"
    if subnet:
        try:
            net = ipaddress.ip_network(subnet, strict=False)
        except ValueError:
            net = None
        if net is not None:
            for a in v4:
                if ipaddress.ip_address(a.address) in net:
                    return a.address, "ap-subnet"
    for a in v4:
        if a.interface == wifi_interface:
            return a.address, "wifi-interface"
    for a in v4:
        if not a.interface.startswith(MOBILE_IFACES):
            return a.address, "first"
    return None, ""


@dataclass(frozen=True, slots=True)
class PsEntry:
    """One row of toybox ``ps -A``."""

    user: str
    pid: int
    ppid: int
    vsz: int
    rss: int
    wchan: str
    addr: str
    state: str
    name: str


_PS_ROW = re.compile(r"^(\S+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\S+)\s+(\S+)\s+([A-Za-z])\s(.*)$")


def parse_ps(text: str) -> list[PsEntry]:
    """toybox ``ps -A`` (``USER PID PPID VSZ RSS WCHAN ADDR S NAME``; the header line and
    damaged rows are skipped; NAME may hold blanks)."""
    out = []
    for line in text.replace("\r", "").splitlines():
        m = _PS_ROW.match(line)
        if m:
            out.append(PsEntry(m.group(1), int(m.group(2)), int(m.group(3)), int(m.group(4)),
                               int(m.group(5)), m.group(6), m.group(7), m.group(8), m.group(9)))
    return out


MARK = "----flowtruth----"


def shell_many(link: DeviceLink, commands: Sequence[str], timeout: float = 30.0) -> list[str]:
    """Run several commands in one shell round trip; the stdout of each (round trips over
    adb cost tens of milliseconds each)."""
    line = f"; echo {MARK}; ".join(f"{{ {c}; }} 2>/dev/null" for c in commands)
    # CRLF: an old phone without adb's shell protocol v2 (or a pty) ends lines with \r\n
    out = link.shell(line, timeout=timeout).stdout.replace("\r\n", "\n")
    parts = out.split(MARK + "\n")
    parts = [p.rstrip("\n") for p in parts] + [""] * len(commands)
    return parts[:len(commands)]


def decode_text(data: bytes | str) -> str:
    """Device output as text: UTF-16LE/BE (with or without a BOM, as a Windows redirect of
    ``adb shell`` writes it), UTF-8 with or without a BOM; CRLF and CR become LF."""
    if isinstance(data, str):
        text = data
        if "\x00" in text[:200]:  # UTF-16 read as a one-byte encoding
            raw = text.encode("latin-1", errors="replace")
            return decode_text(raw)
    else:
        if data.startswith(b"\xff\xfe") or data.startswith(b"\xfe\xff"):
            text = data.decode("utf-16", errors="replace")
        elif len(data) >= 4 and data[1:4:2] == b"\x00\x00" and data[0] != 0:
            text = data.decode("utf-16-le", errors="replace")
        elif len(data) >= 4 and data[0:4:2] == b"\x00\x00" and data[1] != 0:
            text = data.decode("utf-16-be", errors="replace")
        else:
            text = data.decode("utf-8", errors="replace")
    return text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")


_PROP_START = re.compile(r"^\[([^\]\n]+)\]: \[(.*)$")


def parse_getprop(text: str | bytes) -> dict[str, str]:
    """``getprop`` (all properties) as a dict: UTF-16 or CRLF output too, and values that
    span lines (a value runs until the line that closes its ``]``)."""
    out: dict[str, str] = {}
    key: str | None = None
    buf: list[str] = []
    for line in decode_text(text).split("\n"):
        m = _PROP_START.match(line)
        if key is not None and m is None:
            buf.append(line)
            if line.endswith("]"):
                out[key] = "\n".join(buf)[:-1]
                key = None
            continue
        if m is None:
            continue
        # a new property; one still open before it lost its closing bracket: keep it as read
        if key is not None:
            out[key] = "\n".join(buf)
        key, buf = m.group(1), [m.group(2)]
        if m.group(2).endswith("]"):
            out[key] = m.group(2)[:-1]
            key = None
    if key is not None:
        out[key] = "\n".join(buf)
    return out


def props_locale(props: dict[str, str]) -> str:
    """The phone's locale: ``persist.sys.locale``, else ``ro.product.locale``."""
    return props.get("persist.sys.locale") or props.get("ro.product.locale") or ""


def parse_macs(text: str) -> dict[str, str]:
    """``IFACE MAC`` lines -> {iface: mac}."""
    out = {}
    for line in text.splitlines():
        f = line.split()
        if len(f) == 2 and re.fullmatch(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}", f[1].lower()):
            out[f[0]] = f[1].lower()
    return out


def read_wifi_mac(link: DeviceLink, interface: str = "wlan0") -> str | None:
    """The Wi-Fi MAC, read as root (Android 10+ denies ``/sys/class/net/*/address`` to the
    shell user)."""
    path = f"/sys/class/net/{interface}/address"
    try:
        r = root_shell(link, f"cat {shlex.quote(path)}", timeout=10)
    except DeviceError:
        raise
    m = re.search(r"\b[0-9a-fA-F]{2}(?::[0-9a-fA-F]{2}){5}\b", r.stdout)
    return m.group(0).lower() if r.ok and m else None


def read_facts(link: DeviceLink, *, subnet: str | None = None,
               leases: dict[str, str] | None = None) -> DeviceFacts:
    """Model, manufacturer, Android version, ABI, SELinux mode, battery, addresses, MAC and
    the phone's address at the AP (``subnet``: the AP's network; ``leases``: the AP's
    DHCP leases {mac: ip}, the authority for that address)."""
    props_t, selinux, battery, addr_t, route_t, mac_t = shell_many(link, [
        "getprop", "getenforce", "dumpsys battery", "ip -o addr", "ip route",
        'for i in /sys/class/net/*; do echo "${i##*/} $(cat "$i/address")"; done'])
    props = parse_getprop(props_t)
    if not props.get("ro.product.model") and not props.get("ro.product.cpu.abi"):
        raise DeviceError(f"{link.serial}: getprop answered nothing; is this an Android device?")
    addr_t, route_t, mac_t = (decode_text(x) for x in (addr_t, route_t, mac_t))
    addrs = parse_addresses(addr_t)
    ifaddrs = parse_ip_addr(addr_t)
    known = {a.address for a in ifaddrs}
    ifaddrs += [a for a in parse_ip_route(route_t) if a.address not in known]
    wifi = props.get("wifi.interface") or "wlan0"
    macs = parse_macs(mac_t)
    mac = macs.get(wifi)
    if mac is None and wifi in {a.interface for a in ifaddrs}:
        mac = read_wifi_mac(link, wifi)  # the shell user may not read it; root can
    ip, source = choose_ap_address(ifaddrs, mac=mac, leases=leases, subnet=subnet,
                                   wifi_interface=wifi)
    if ip is not None and mac is None:
        on = next((a.interface for a in ifaddrs if a.address == ip), None)
        if on is not None:
            mac = macs.get(on)
    from controller.safety import plain

    def prop(name: str) -> str:  # the phone's say: no control characters, bounded
        return plain(props.get(name, ""))[:200]

    return DeviceFacts(link.serial, prop("ro.product.model"), prop("ro.product.manufacturer"),
                       prop("ro.build.version.release"), prop("ro.build.version.sdk"),
                       prop("ro.product.cpu.abi"),
                       plain(decode_text(selinux).strip())[:40] or "unknown",
                       parse_battery_level(battery),
                       tuple(addrs), mac, ip, source, props_locale(props), wifi)


@dataclass(frozen=True, slots=True)
class RootInfo:
    rooted: bool
    method: str | None  # "su -c" | "su 0"
    magisk: str | None


def check_root(link: DeviceLink) -> RootInfo:
    """Whether ``su`` gives uid 0 (``su -c id``, then ``su 0 id``) and Magisk's version."""
    by_c, by_0, mg = shell_many(link, ["su -c id", "su 0 id", "magisk -v || su -v"], timeout=20)
    method = "su -c" if "uid=0" in by_c else "su 0" if "uid=0" in by_0 else None
    magisk = mg.strip().splitlines()[0] if mg.strip() else None
    return RootInfo(method is not None, method, magisk)


def require_root(link: DeviceLink) -> RootInfo:
    info = check_root(link)
    if not info.rooted:
        raise RootRequired(f"{link.serial}: su does not give root (su -c id, su 0 id)",
                           hint="root the phone with Magisk and allow the shell in its su list")
    return info


@dataclass(frozen=True, slots=True)
class AppFacts:
    package: str
    uid: int | None
    version_code: str | None
    version: str | None

    def to_manifest(self) -> dict[str, Any]:
        return {"package": self.package, "uid": self.uid, "version": self.version,
                "version_code": self.version_code}


_PM_LINE = re.compile(r"^package:(\S+?)(?:\s+versionCode:(\d+))?(?:\s+uid:(\d+))?\s*$")


def parse_pm_list(text: str) -> dict[str, tuple[int | None, str | None]]:
    """``pm list packages -U --show-versioncode`` -> package -> (uid, versionCode)."""
    out: dict[str, tuple[int | None, str | None]] = {}
    for line in text.splitlines():
        line = line.strip()
        m = re.match(r"^package:(\S+)", line)
        if not m:
            continue
        uid = re.search(r"\buid:(\d+)", line)
        vc = re.search(r"\bversionCode:(\d+)", line)
        out[m.group(1)] = (int(uid.group(1)) if uid else None, vc.group(1) if vc else None)
    return out


def read_packages(link: DeviceLink) -> tuple[str, dict[str, tuple[int | None, str | None]]]:
    """The raw ``pm list packages -U --show-versioncode`` text and its parse."""
    r = link.shell("pm list packages -U --show-versioncode", timeout=30)
    r.check(link.serial, "pm list packages")
    return r.stdout, parse_pm_list(r.stdout)


def read_apps(link: DeviceLink, packages: Iterable[str],
              listing: dict[str, tuple[int | None, str | None]] | None = None) -> dict[str, AppFacts]:
    """uid, versionCode and versionName of each installed target (missing ones left out)."""
    if listing is None:
        listing = read_packages(link)[1]
    out = {}
    for pkg in packages:
        if pkg not in listing:
            continue
        uid, vc = listing[pkg]
        r = link.shell(f"dumpsys package {shlex.quote(pkg)} | grep versionName", timeout=20)
        m = re.search(r"versionName=(\S+)", r.stdout)
        out[pkg] = AppFacts(pkg, uid, vc, m.group(1) if m else None)
    return out


# --------------------------------------------------------------------------- text input

ADB_KEYBOARD_PACKAGE = "com.android.adbkeyboard"
ADB_KEYBOARD_IME = "com.android.adbkeyboard/.AdbIME"
ADB_KEYBOARD_APK = "https://github.com/senzhk/ADBKeyBoard"
INPUT_TEXT_CHUNK = 200
"""Characters per ``input text`` command (each one is injected as key events, synchronously)."""
IME_CHUNK_BYTES = 1500
"""UTF-8 bytes per ADBKeyBoard broadcast (2 KB of base64: far below any adb command limit)."""


def typeable_by_input_text(text: str) -> bool:
    """Whether ``input text`` can type ``text``: printable ASCII only.

    ``input text`` turns characters into key events of the virtual keyboard's key map,
    which has no key for anything else (non-ASCII makes it throw); control characters
    would press ENTER or TAB, which in a chat app sends or moves the focus.
    """
    return all(" " <= c <= "~" for c in text)


def input_text_args(text: str, limit: int = INPUT_TEXT_CHUNK) -> list[str]:
    """The arguments of the ``input text`` commands that type ``text`` (printable ASCII).

    Android's ``input text`` types ``%s`` as a space, so spaces are sent as ``%s``; it has
    no escape for a literal ``%s``, so the text is split between that ``%`` and ``s`` (a
    ``%`` that ends an argument is typed as is). Arguments hold at most ``limit``
    characters of the text.
    """
    if not typeable_by_input_text(text):
        raise ValueError("input text types printable ASCII only")
    args: list[str] = []
    cur: list[str] = []
    count = 0
    for i, c in enumerate(text):
        if cur and (count >= limit or (c == "s" and text[i - 1] == "%")):
            args.append("".join(cur))
            cur, count = [], 0
        cur.append("%s" if c == " " else c)
        count += 1
    if cur:
        args.append("".join(cur))
    return args


def input_text_commands(text: str) -> list[str]:
    """Shell command lines (``input text ARG``, ARG shell-quoted) that type ``text``."""
    return [f"input text {shlex.quote(arg)}" for arg in input_text_args(text)]


def ime_text_commands(text: str, limit: int = IME_CHUNK_BYTES) -> list[str]:
    """ADBKeyBoard broadcasts (``ADB_INPUT_B64``, base64 of UTF-8) that type ``text``.

    The text is cut between code points into pieces of at most ``limit`` UTF-8 bytes;
    ``-p`` delivers it to ADBKeyBoard alone.
    """
    pieces: list[bytes] = []
    cur = b""
    for c in text:
        b = c.encode("utf-8")  # a lone surrogate raises UnicodeEncodeError (a ValueError)
        if cur and len(cur) + len(b) > limit:
            pieces.append(cur)
            cur = b""
        cur += b
    if cur:
        pieces.append(cur)
    return [f"am broadcast -a ADB_INPUT_B64 -p {ADB_KEYBOARD_PACKAGE} --es msg "
            + shlex.quote(base64.b64encode(p).decode("ascii")) for p in pieces]


@dataclass(frozen=True, slots=True)
class ImeState:
    """The phone's keyboards: whether ADBKeyBoard is there, which IMEs are on, which is in use."""

    adb_keyboard_package: bool
    installed: tuple[str, ...]
    enabled: tuple[str, ...]
    current: str | None

    @property
    def adb_keyboard(self) -> bool:
        return self.adb_keyboard_package and ADB_KEYBOARD_IME in self.installed


def read_ime_state(link: DeviceLink) -> ImeState:
    """``pm list packages``, ``ime list -a -s``, ``ime list -s`` and the selected IME, at once."""
    pm, all_, enabled, current = shell_many(link, [
        f"pm list packages {ADB_KEYBOARD_PACKAGE}", "ime list -a -s", "ime list -s",
        "settings get secure default_input_method"])
    cur = current.strip()
    return ImeState(f"package:{ADB_KEYBOARD_PACKAGE}" in pm.split(),
                    tuple(all_.split()), tuple(enabled.split()),
                    None if cur in ("", "null") else cur)


def require_adb_keyboard(link: DeviceLink, state: ImeState | None = None) -> ImeState:
    """The IME state, or :class:`DeviceError` saying how to install ADBKeyBoard."""
    state = state or read_ime_state(link)
    if not state.adb_keyboard_package:
        raise DeviceError(
            f"{link.serial}: cannot type non-ASCII or control characters: the ADBKeyBoard keyboard "
            f"({ADB_KEYBOARD_PACKAGE}) is not installed",
            hint=f"install ADBKeyboard.apk ({ADB_KEYBOARD_APK}, also on F-Droid): "
                 f"adb -s {link.serial} install ADBKeyboard.apk; or type printable ASCII only")
    if not state.adb_keyboard:
        raise DeviceError(
            f"{link.serial}: cannot type non-ASCII or control characters: "
            f"{ADB_KEYBOARD_PACKAGE} is installed but its input method {ADB_KEYBOARD_IME} "
            "is not available (ime list -a)",
            hint=f"enable the package (adb -s {link.serial} shell pm enable "
                 f"{ADB_KEYBOARD_PACKAGE}) or reinstall ADBKeyboard.apk")
    return state


def _ime(link: DeviceLink, verb: str, ime: str) -> None:
    r = link.shell(f"ime {verb} {shlex.quote(ime)}", timeout=20)
    if not r.ok or "Unknown input method" in r.stdout + r.stderr:
        detail = (r.stderr or r.stdout).strip().splitlines()
        raise DeviceError(f"{link.serial}: ime {verb} {ime} failed"
                          + (f": {detail[-1]}" if detail else f" (exit {r.returncode})"))


def _wait_bound(link: DeviceLink, timeout: float, poll: float) -> None:
    """Wait until ADBKeyBoard is bound to the focused field (its receiver exists only then).

    ``dumpsys input_method`` shows ``mCurId=ID ... mBoundToMethod=true`` once the IME
    serves a text field; a phone whose dump lacks those lines is not waited for.
    """
    deadline = time.monotonic() + timeout
    while True:
        out = link.shell("dumpsys input_method", timeout=20).stdout
        line = next((x for x in out.splitlines() if x.strip().startswith("mCurId=")), None)
        if line is None or "mBoundToMethod=" not in line:
            return  # an unknown dump: nothing to wait for
        if line.split()[0] == f"mCurId={ADB_KEYBOARD_IME}" and "mBoundToMethod=true" in line:
            return
        if time.monotonic() >= deadline:
            raise DeviceError(
                f"{link.serial}: ADBKeyBoard did not take the text field within {timeout:g} s",
                hint="tap the text field first (a field must have the focus)")
        time.sleep(poll)


def type_with_adb_keyboard(link: DeviceLink, text: str, bind_timeout: float = 3.0,
                           poll: float = 0.1) -> int:
    """Type any Unicode ``text`` through ADBKeyBoard; returns the broadcasts sent.

    Enables ADBKeyBoard and selects it if needed, waits until it serves the focused
    field, sends ``ADB_INPUT_B64`` broadcasts, then selects the previous keyboard again
    (and disables ADBKeyBoard if it was disabled). A phone without ADBKeyBoard is a
    :class:`DeviceError` that says how to install it.
    """
    commands = ime_text_commands(text)
    state = require_adb_keyboard(link)
    was_enabled = ADB_KEYBOARD_IME in state.enabled
    switched = state.current != ADB_KEYBOARD_IME
    try:
        if not was_enabled:
            _ime(link, "enable", ADB_KEYBOARD_IME)
        if switched:
            _ime(link, "set", ADB_KEYBOARD_IME)
            now = link.shell("settings get secure default_input_method", timeout=20).stdout.strip()
            if now != ADB_KEYBOARD_IME:
                raise DeviceError(
                    f"{link.serial}: the phone kept the keyboard {now} after "
                    f"ime set {ADB_KEYBOARD_IME}",
                    hint="allow input from adb (Xiaomi: 'USB debugging (Security settings)') "
                         "or choose ADBKeyBoard in Settings > Keyboard")
        _wait_bound(link, bind_timeout, poll)
        for cmd in commands:
            r = link.shell(cmd, timeout=30)
            if not r.ok or "Broadcast completed" not in r.stdout:
                detail = (r.stderr or r.stdout).strip().splitlines()
                raise DeviceError(f"{link.serial}: am broadcast ADB_INPUT_B64 failed"
                                  + (f": {detail[-1]}" if detail else f" (exit {r.returncode})"))
    except BaseException:
        _restore_ime(link, state, was_enabled, switched, strict=False)
        raise
    _restore_ime(link, state, was_enabled, switched, strict=True)
    return len(commands)


def _restore_ime(link: DeviceLink, state: ImeState, was_enabled: bool, switched: bool,
                 strict: bool) -> None:
    try:
        if switched and state.current:
            _ime(link, "set", state.current)
        if not was_enabled:
            _ime(link, "disable", ADB_KEYBOARD_IME)
    except DeviceError as err:
        if strict:  # after a failure the first error is the one to report
            fix = (f"select it again: adb -s {link.serial} shell ime set {state.current}"
                   if state.current else "check the keyboard in Settings > Keyboard")
            raise DeviceError(f"{err.message} (restoring the keyboard after typing)",
                              hint=fix) from None


def type_text(link: DeviceLink, text: str) -> str:
    """Type ``text`` into the focused field; returns how ("input text" or "ADBKeyBoard").

    Printable ASCII goes through ``input text`` (quoted, spaces as ``%s``, in chunks);
    anything else through the ADBKeyBoard IME (:func:`type_with_adb_keyboard`).
    """
    if not text:
        return "nothing to type"
    if typeable_by_input_text(text):
        for cmd in input_text_commands(text):
            link.shell(cmd, timeout=30).check(link.serial, "input text")
        return "input text"
    type_with_adb_keyboard(link, text)
    return "ADBKeyBoard"


# --------------------------------------------------------------------------- clock


@dataclass(frozen=True, slots=True)
class ClockProbe:
    """Phone clock minus host clock from ``samples`` bracketed probes."""

    offset_s: float
    uncertainty_s: float
    samples: tuple[tuple[float, float, float], ...]  # (host t0, phone time, host t1)

    def to_manifest(self) -> dict[str, Any]:
        return {"offset_s": self.offset_s, "uncertainty_s": self.uncertainty_s,
                "method": "adb shell date +%s.%N bracketed by host time",
                "samples": [list(s) for s in self.samples]}


def estimate_offset(samples: Sequence[tuple[float, float, float]]) -> tuple[float, float]:
    """Median of ``phone - (t0+t1)/2`` and its uncertainty: the larger of half the
    shortest round trip and the offsets' median absolute deviation."""
    offsets = [p - (t0 + t1) / 2 for t0, p, t1 in samples]
    med = statistics.median(offsets)
    half_rtt = min((t1 - t0) / 2 for t0, _, t1 in samples)
    mad = statistics.median(abs(o - med) for o in offsets)
    return med, max(half_rtt, mad)


def probe_clock(link: DeviceLink, probes: int = 5,
                clock: Callable[[], float] = time.time) -> ClockProbe:
    """Measure the phone's clock offset with ``probes`` (>= 5) bracketed ``date +%s.%N``."""
    probes = max(5, probes)
    samples = []
    for _ in range(probes):
        t0 = clock()
        r = link.shell("date +%s.%N", timeout=10)
        t1 = clock()
        try:
            phone = float(r.stdout.strip())
        except ValueError:
            raise DeviceError(f"{link.serial}: date +%s.%N printed {r.stdout.strip()!r}",
                              hint="the phone's date lacks %N (toybox date has it)") from None
        samples.append((t0, phone, t1))
    off, unc = estimate_offset(samples)
    return ClockProbe(off, unc, tuple(samples))


# --------------------------------------------------------------------------- files


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def remote_sha256(link: DeviceLink, remote: str, root: bool = False) -> str | None:
    """sha256 of a phone file (toybox ``sha256sum``), None when it does not exist."""
    cmd = f"sha256sum {shlex.quote(remote)}"
    r = root_shell(link, cmd) if root else link.shell(cmd)
    if not r.ok:
        return None
    first = r.stdout.strip().split()
    return first[0] if first and re.fullmatch(r"[0-9a-f]{64}", first[0]) else None


def push_checked(link: DeviceLink, local: Path, remote: str, mode: int = 0o755) -> str:
    """Push and compare checksums; returns the sha256."""
    want = sha256_file(local)
    link.push(local, remote, mode=mode)
    got = remote_sha256(link, remote)
    if got != want:
        raise DeviceError(f"{link.serial}: {remote}: checksum after push is {got}, "
                          f"expected {want}", hint="storage full or a flaky cable?")
    return want


def pull_checked(link: DeviceLink, remote: str, local: Path) -> tuple[int, str]:
    """Pull and compare checksums; returns (size, sha256)."""
    want = remote_sha256(link, remote)
    local.parent.mkdir(parents=True, exist_ok=True)
    size = link.pull(remote, local)
    got = sha256_file(local)
    if want is not None and got != want:
        raise DeviceError(f"{link.serial}: {remote}: checksum after pull is {got}, "
                          f"the phone says {want}")
    return size, got


# --------------------------------------------------------------------------- preflight


@dataclass(frozen=True, slots=True)
class PreflightWarning:
    check: str
    message: str
    fix: str


def preflight(link: DeviceLink, facts: DeviceFacts | None = None,
              battery_min: int = 20) -> list[PreflightWarning]:
    """What would spoil a capture: traffic off the AP, encrypted DNS, a locked screen, a flat battery."""
    out: list[PreflightWarning] = []
    mobile, airplane, dns, lock, lock2 = (x.strip() for x in shell_many(link, [
        "settings get global mobile_data", "settings get global airplane_mode_on",
        "settings get global private_dns_mode", "locksettings get-disabled",
        "settings get secure lockscreen.disabled"]))
    if mobile == "1":
        out.append(PreflightWarning("mobile_data", "mobile data is on: traffic may bypass the AP",
                            "turn mobile data off (settings put global mobile_data 0)"))
    if airplane == "1":
        out.append(PreflightWarning("airplane_mode", "airplane mode is on",
                            "turn airplane mode off and Wi-Fi on"))
    if dns in ("hostname", "opportunistic"):
        out.append(PreflightWarning("private_dns", f"private DNS is {dns}: DNS goes over TLS",
                            "settings put global private_dns_mode off"))
    if lock == "false" or (lock not in ("true", "false") and lock2 == "0"):
        out.append(PreflightWarning("screen_lock", "a screen lock is set: scripted taps may hit it",
                            "remove the lock or keep the screen on while plugged in"))
    if facts is None:
        facts = read_facts(link)
    if any(":" in a for a in facts.addresses):
        out.append(PreflightWarning("ipv6", "IPv6 is on: the phone has a global IPv6 address",
                            "fine if the AP captures IPv6 too; otherwise disable it"))
    if facts.battery_level is not None and facts.battery_level < battery_min:
        out.append(PreflightWarning("battery", f"battery at {facts.battery_level} %", "charge the phone"))
    return out


PHONE_STRACE = "/data/local/tmp/flowtruth/bin/strace"
"""Where the engine keeps its strace on the phone (across sessions)."""


@dataclass(frozen=True, slots=True)
class TracingFacts:
    """Whether root can trace apps on this phone."""

    selinux: str
    ptrace_scope: int | None
    root_ptrace: str  # "ok" | "failed" | "unchecked" (no strace on the phone yet, or no root)
    detail: str = ""
    cause: str = ""

    def to_manifest(self) -> dict[str, Any]:
        return {"selinux": self.selinux, "ptrace_scope": self.ptrace_scope,
                "root_ptrace": self.root_ptrace, "detail": self.detail, "cause": self.cause}


_PTRACE_SCOPE_FIX = ("reboot the phone (Yama's 3 holds until then), then keep "
                     "/proc/sys/kernel/yama/ptrace_scope at 2 or less")


def check_tracing(link: DeviceLink, strace: str | None = PHONE_STRACE,
                  ) -> tuple[TracingFacts, list[PreflightWarning]]:
    """SELinux mode, Yama's ``ptrace_scope`` and whether root's strace stays attached to a
    sleeping process for half a second (one root round trip; skipped when ``strace`` is
    not on the phone). Each problem comes with its one-line fix."""
    from analysis.traces.tracerhealth import FIXES, iter_tracer_problems

    q = shlex.quote
    tmp = "/data/local/tmp/.flowtruth-ptrace-check"
    probe = (f"S={q(strace)}; if [ -x \"$S\" ]; then sleep 5 & p=$!; "
             f"\"$S\" -e trace=none -o /dev/null -p $p 2>{tmp} & s=$!; sleep 0.5; "
             "if kill -0 $s 2>/dev/null; then echo ptrace:ok; else echo ptrace:failed; fi; "
             f"kill $s $p 2>/dev/null; wait $s $p 2>/dev/null; cat {tmp}; rm -f {tmp}; "
             "else echo ptrace:unchecked; fi") if strace else "echo ptrace:unchecked"
    r = root_shell(link, "echo selinux:$(getenforce 2>/dev/null); "
                         "echo yama:$(cat /proc/sys/kernel/yama/ptrace_scope 2>/dev/null); "
                         + probe, timeout=20)
    out = decode_text(r.stdout) if r.ok else ""
    sel = re.search(r"^selinux:(\S*)", out, re.M)
    yama = re.search(r"^yama:(\d+)", out, re.M)
    pt = re.search(r"^ptrace:(\w+)", out, re.M)
    selinux = sel.group(1) if sel and sel.group(1) else "unknown"
    scope = int(yama.group(1)) if yama else None
    root_ptrace = pt.group(1) if pt else "unchecked"
    problems = list(iter_tracer_problems(out))
    cause = problems[0].cause if problems else ""
    detail = problems[0].text if problems else ""
    if root_ptrace == "failed" and not cause:
        cause, detail = "ptrace", next((x for x in out.splitlines() if "strace" in x), "")
    facts = TracingFacts(selinux, scope, root_ptrace, detail, cause if root_ptrace == "failed"
                         else "")
    warns: list[PreflightWarning] = []
    if scope is not None and scope >= 3:
        warns.append(PreflightWarning("ptrace_scope", "Yama ptrace_scope is 3: no process may "
                                      "be traced, not even by root", _PTRACE_SCOPE_FIX))
    if root_ptrace == "failed":
        fix = FIXES.get(cause, FIXES["ptrace"])
        if cause == "selinux" and selinux.lower() == "enforcing":
            fix = ("su -c setenforce 0 (permissive until reboot) for the session; or trace with "
                   "--tracer frida, or label from netstat alone")
        warns.append(PreflightWarning("root_ptrace", f"root cannot trace apps (SELinux "
                                      f"{selinux}): {detail or 'strace detached at once'}", fix))
    return facts, warns


# --------------------------------------------------------------------------- frida

FRIDA_SERVER = "/data/local/tmp/frida-server"
FRIDA_PORT = 27042


@dataclass
class FridaEndpoint:
    """The frida device a session's tracer attaches through, and how to let it go.

    ``accept`` narrows the device's processes to the phone's (the lab's phones share one
    host); ``clock_shift_s`` is added to the agent's timestamps so they read the phone's
    clock: 0 on a phone, whose apps read its clock; the phone's offset in the virtual lab,
    whose apps run on the host's clock while commands run through adb get the offset from
    libfaketime.
    """

    device: Any
    where: str
    clock_shift_s: float = 0.0
    accept: Callable[[int], bool] | None = None
    server_pid: int | None = None
    closer: Callable[[], None] | None = field(default=None, repr=False)

    def close(self) -> None:
        """Let the device go (idempotent): forwards, remote device, a server we started."""
        fn, self.closer = self.closer, None
        if fn is not None:
            fn()

    def to_manifest(self) -> dict[str, Any]:
        return {"device": self.where, "clock_shift_s": self.clock_shift_s,
                "server_pid": self.server_pid}


def bounded(fn: Callable[[], Any], timeout: float, what: str) -> Any:
    """Run ``fn`` in a daemon thread; :class:`DeviceError` if it takes over ``timeout`` s
    (frida's calls have no timeouts of their own, and a lost device must not hang us)."""
    import threading

    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as err:  # re-raised in the caller
            box["error"] = err

    t = threading.Thread(target=run, name=f"bounded-{what[:20]}", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise DeviceError(f"{what} did not finish within {timeout:g} s")
    if "error" in box:
        raise box["error"]
    return box.get("value")


def in_netns(name: str) -> Callable[[int], bool]:
    """A process filter: pids living in the named network namespace (``ip netns``)."""
    import os

    st = os.stat(f"/run/netns/{name}")
    want = (st.st_dev, st.st_ino)

    def accept(pid: int) -> bool:
        try:
            s = os.stat(f"/proc/{pid}/ns/net")
        except OSError:
            return False
        return (s.st_dev, s.st_ino) == want

    return accept


def local_frida(clock_shift_s: float = 0.0, netns: str | None = None) -> FridaEndpoint:
    """frida's local device (the virtual lab: its phones' processes are this host's),
    narrowed to one phone's network namespace when given."""
    from device_scripts.frida_loader import FridaTracerError, get_device

    try:
        dev = get_device("local")
    except FridaTracerError as err:
        raise ConfigError(err.message, hint=err.hint or "pip install frida") from None
    try:
        accept = in_netns(netns) if netns else None
    except OSError as err:
        raise DeviceError(f"network namespace {netns}: {err.strerror}",
                          hint="is the virtual lab still up?") from None
    return FridaEndpoint(dev, f"local (netns {netns})" if netns else "local", clock_shift_s,
                         accept)


def phone_frida(link: DeviceLink, server: str = FRIDA_SERVER, port: int = FRIDA_PORT,
                timeout: float = 15.0) -> FridaEndpoint:
    """frida-server on a rooted phone, reached through ``adb forward``.

    Starts ``server`` as root (detached) unless a process of that name runs already; a
    missing server is a :class:`ConfigError` with the fix. The endpoint's ``close`` removes
    the forward and stops the server if this call started it.
    """
    from device_scripts.frida_loader import FridaTracerError, _frida, _frida_errors

    q = shlex.quote
    try:
        frida = _frida()
    except FridaTracerError as err:
        raise ConfigError(err.message, hint=err.hint) from None
    version = getattr(frida, "__version__", "?")
    name = server.rstrip("/").rsplit("/", 1)[-1] or "frida-server"
    r = root_shell(link, f"if [ -x {q(server)} ]; then echo present; fi; pidof {q(name)}; true",
                   timeout=20)
    words = r.stdout.split()
    if "present" not in words:
        raise ConfigError(
            f"{link.serial}: no executable frida-server at {server}",
            hint=f"download frida-server {version} for the phone's ABI from frida's GitHub "
                 f"releases, adb push it to {server} and chmod 755 it (or set frida_server)")
    running = [int(w) for w in words if w.isdigit()]
    started: int | None = None
    if not running:
        r = root_shell(link, f"setsid {q(server)} -l 127.0.0.1:{int(port)} </dev/null "
                             f">/dev/null 2>&1 & echo $!", timeout=20)
        r.check(link.serial, f"start {server}")
        pid = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
        if not pid.isdigit():
            raise DeviceError(f"{link.serial}: starting {server} printed {r.stdout!r}")
        started = int(pid)
    def stop_server() -> None:
        if started is not None:
            root_shell(link, f"kill {started} 2>/dev/null; true", timeout=10)

    forward = getattr(link, "forward", None)
    try:
        if forward is None:
            raise DeviceError(f"{link.serial}: this device link cannot forward ports "
                              "(adb forward)")
        local = int(forward(port))
    except DeviceError:
        try:
            stop_server()
        except DeviceError:
            pass
        raise
    addr = f"127.0.0.1:{local}"
    mgr = frida.get_device_manager()
    errors: tuple[type[BaseException], ...] = (DeviceError, *_frida_errors())

    def close() -> None:
        for fn in (lambda: mgr.remove_remote_device(addr),
                   lambda: link.forward_remove(local),  # type: ignore[attr-defined]
                   stop_server):
            try:
                bounded(fn, 10.0, "letting frida go")
            except Exception:  # best effort: the phone may be gone
                pass

    try:
        dev = bounded(lambda: mgr.add_remote_device(addr), 10.0, "frida add_remote_device")
    except errors as err:
        close()
        raise DeviceError(f"{link.serial}: frida cannot use {addr}: {err}") from None
    deadline = time.monotonic() + timeout
    while True:  # a server just started needs a moment before it answers
        try:
            bounded(dev.query_system_parameters, 10.0, "frida-server's answer")
            break
        except errors as err:
            if time.monotonic() > deadline:
                close()
                raise DeviceError(
                    f"{link.serial}: frida-server ({server}) does not answer through "
                    f"adb forward tcp:{local} tcp:{port}: {err}",
                    hint=f"its version must match the frida Python package ({version}); "
                         f"try it by hand: adb shell su -c {server}") from None
            time.sleep(0.3)
    return FridaEndpoint(dev, f"frida-server {server} via adb forward tcp:{local} tcp:{port}",
                         0.0, None, started, close)
