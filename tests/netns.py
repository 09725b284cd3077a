"""Network-namespace plumbing for tests: namespaces, veth pairs, processes inside, tcpdump.

Everything a :class:`NetnsLab` creates carries a random suffix and is removed by
:meth:`NetnsLab.close` (also after a failure): processes it started, then anything
else still running in its namespaces, then the namespaces (which takes their veths).
The host's own interfaces are never touched: veth pairs are created inside the
namespaces. Needs root; :func:`netns_skip_reason` says why a test must skip.

    with NetnsLab("ftl") as lab:
        phone, ap = lab.add("phone"), lab.add("ap")
        lab.veth(phone, "p0", ap, "a0", ["10.9.0.2/24", "fd09::2/64"], ["10.9.0.1/24", "fd09::1/64"])
        dump = lab.tcpdump(ap, "a0", tmp / "cap.pcap")
        phone.run(["ping", "-c1", "10.9.0.1"])
        dump.stop()
"""

from __future__ import annotations

import ctypes
import os
import re
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _sh(argv: Sequence[str], check: bool = True, timeout: float = 20,
        **kw: Any) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, **kw)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} -> {res.returncode}: {res.stderr or res.stdout}")
    return res


_REASON: list[str | None] = []


def netns_skip_reason(*programs: str) -> str | None:
    """Why namespace tests cannot run here (None when they can); ``programs`` must exist."""
    missing = [p for p in ("ip", *programs) if shutil.which(p) is None]
    if missing:
        return f"missing programs: {', '.join(missing)}"
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    if not _REASON:
        probe = f"ftprobe-{secrets.token_hex(3)}"
        if subprocess.run(["ip", "netns", "add", probe], capture_output=True).returncode != 0:
            _REASON.append("cannot create network namespaces here")
        else:
            subprocess.run(["ip", "netns", "del", probe], capture_output=True)
            _REASON.append(None)
    return _REASON[0]


class Netns:
    """One named network namespace (``/run/netns/<name>``)."""

    def __init__(self, lab: NetnsLab, name: str) -> None:
        self.lab = lab
        self.name = name

    def __repr__(self) -> str:
        return f"Netns({self.name})"

    def run(self, argv: Sequence[str], check: bool = True, timeout: float = 20,
            **kw: Any) -> subprocess.CompletedProcess[str]:
        """Run a command inside (``ip netns exec``) and wait for it."""
        return _sh(["ip", "netns", "exec", self.name, *argv], check=check, timeout=timeout, **kw)

    def popen(self, argv: Sequence[str], *, uid: int | None = None, gid: int | None = None,
              executable: str | None = None, **kw: Any) -> subprocess.Popen[Any]:
        """Start a process inside, optionally as another uid/gid; ``argv[0]`` may differ
        from ``executable`` (as ``exec -a``). The lab kills it at close."""
        fd = os.open(f"/run/netns/{self.name}", os.O_RDONLY | os.O_CLOEXEC)

        def enter() -> None:
            if _libc.setns(fd, CLONE_NEWNET) != 0:
                os._exit(126)
            if gid is not None or uid is not None:
                os.setgroups([])
            if gid is not None:
                os.setgid(gid)
            if uid is not None:
                os.setuid(uid)

        try:
            p = subprocess.Popen(list(argv), executable=executable, preexec_fn=enter, **kw)
        finally:
            os.close(fd)
        self.lab.procs.append(p)
        return p

    def pids(self) -> list[int]:
        res = subprocess.run(["ip", "netns", "pids", self.name], capture_output=True, text=True)
        return [int(p) for p in res.stdout.split() if p.isdigit()]


class Tcpdump:
    """tcpdump writing a pcap inside a namespace; :meth:`stop` flushes and ends it."""

    def __init__(self, ns: Netns, iface: str, out: Path, bpf: Sequence[str] = (),
                 snaplen: int = 0, timeout: float = 10) -> None:
        self.out = Path(out)
        self.proc = ns.popen(["tcpdump", "-i", iface, "-n", "-U", "--immediate-mode", "-s", str(snaplen),
                              "-w", str(self.out), *bpf],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        assert self.proc.stderr is not None
        end = time.monotonic() + timeout
        line = ""
        while time.monotonic() < end:
            line = self.proc.stderr.readline()
            if "listening on" in line or not line:
                break
        if "listening on" not in line:
            self.proc.kill()
            raise AssertionError(f"tcpdump did not start on {iface} in {ns}: {line!r}")
        self.captured: int | None = None
        self.dropped: int | None = None

    def stop(self, timeout: float = 10) -> int:
        """SIGINT, wait, and return the number of packets tcpdump says it captured."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        _, err = self.proc.communicate(timeout=timeout)
        m = re.search(r"(\d+) packets? captured", err or "")
        d = re.search(r"(\d+) packets? dropped by kernel", err or "")
        self.captured = int(m.group(1)) if m else None
        self.dropped = int(d.group(1)) if d else None
        return self.captured or 0


class NetnsLab:
    """Namespaces and veth pairs made for one test, all removed by :meth:`close`."""

    def __init__(self, prefix: str = "ft") -> None:
        self.prefix = prefix
        self.tag = secrets.token_hex(3)
        self.namespaces: list[Netns] = []
        self.procs: list[subprocess.Popen[Any]] = []

    def __enter__(self) -> NetnsLab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add(self, role: str) -> Netns:
        """A new namespace ``<prefix><role>-<tag>`` with loopback up."""
        ns = Netns(self, f"{self.prefix}{role}-{self.tag}")
        _sh(["ip", "netns", "add", ns.name])
        self.namespaces.append(ns)
        _sh(["ip", "-n", ns.name, "link", "set", "lo", "up"])
        return ns

    def veth(self, a: Netns, a_if: str, b: Netns, b_if: str, a_addrs: Sequence[str] = (),
             b_addrs: Sequence[str] = (), offload: bool = False) -> None:
        """A veth pair between two namespaces, addressed (IPv6 without DAD) and up.

        Without ``offload`` the pair never hands over super-frames (no TSO/GSO/GRO), as a
        phone's Wi-Fi link does not, so captures hold wire-sized packets."""
        _sh(["ip", "-n", a.name, "link", "add", a_if, "type", "veth", "peer", "name", b_if,
             "netns", b.name])
        for ns, ifn, addrs in ((a, a_if, a_addrs), (b, b_if, b_addrs)):
            for addr in addrs:
                extra = ["nodad"] if ":" in addr else []
                _sh(["ip", "-n", ns.name, "addr", "add", addr, "dev", ifn, *extra])
            if not offload and shutil.which("ethtool"):
                ns.run(["ethtool", "-K", ifn, "tso", "off", "gso", "off", "gro", "off"],
                       check=False)
            _sh(["ip", "-n", ns.name, "link", "set", ifn, "up"])

    def tcpdump(self, ns: Netns, iface: str, out: Path, bpf: Sequence[str] = (),
                snaplen: int = 0) -> Tcpdump:
        return Tcpdump(ns, iface, out, bpf, snaplen)

    def close(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                try:
                    p.kill()
                except ProcessLookupError:
                    pass
            try:
                p.communicate(timeout=5)
            except (subprocess.TimeoutExpired, ValueError, OSError):
                pass
        self.procs.clear()
        for ns in self.namespaces:
            for pid in ns.pids():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 5
        for ns in self.namespaces:
            while ns.pids() and time.monotonic() < deadline:
                time.sleep(0.05)
            subprocess.run(["ip", "netns", "del", ns.name], capture_output=True)
        self.namespaces.clear()
