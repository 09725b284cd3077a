"""Real strace on real clients talking to real loopback servers, then the correlator.

Two client processes ("apps") run at the same time under ``strace -f -ttt -yy`` (our
launcher's options), each with several threads making TCP and UDP flows over IPv4, IPv6
and IPv4-mapped IPv6, connected and unconnected UDP. The truth of every flow (5-tuple
from the client's own getsockname, start and end times) is written by the client; the
labels must match it for every flow.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from analysis.correlate import FlowKeys, correlate
from analysis.traces.model import ObservationSet, ParseStats
from analysis.traces.strace import iter_socket_observations, iter_syscalls

pytestmark = pytest.mark.skipif(shutil.which("strace") is None, reason="strace not installed")

CLIENT = r'''
import json, socket, sys, threading, time
ports = json.loads(sys.argv[1]); out = sys.argv[2]; use_getsockname = sys.argv[3] == "1"
truth = []; lock = threading.Lock()

def note(proto, s, rip, rport, t0, local=None):
    if local is None:
        local = s.getsockname()
    with lock:
        truth.append({"proto": proto, "lip": local[0], "lport": local[1], "rip": rip,
                      "rport": rport, "t0": t0, "t1": time.time()})

def tcp(fam, host, port, mapped=False):
    s = socket.socket(fam, socket.SOCK_STREAM)
    t0 = time.time()
    s.setblocking(False)
    try:
        s.connect((host, port))
    except BlockingIOError:
        pass  # EINPROGRESS, as Android apps do it
    s.setblocking(True)
    s.settimeout(5)
    s.sendall(b"hello"); s.recv(100)
    local = s.getsockname()
    s.close()
    note(6, s, host, port, t0, local)

def udp_connected(fam, host, port):
    s = socket.socket(fam, socket.SOCK_DGRAM); s.settimeout(5)
    t0 = time.time()
    s.connect((host, port)); s.send(b"ping"); s.recv(100)
    local = s.getsockname()
    s.close()
    note(17, s, host, port, t0, local)

def udp_unconnected(fam, host, port, port2):
    s = socket.socket(fam, socket.SOCK_DGRAM); s.settimeout(5)
    t0 = time.time()
    s.sendto(b"ping", (host, port)); s.recvfrom(100)
    s.sendto(b"ping", (host, port2)); s.recvfrom(100)
    local = s.getsockname()
    s.close()
    note(17, s, host, port, t0, local)
    note(17, s, host, port2, t0, local)

def worker(k):
    for i in range(3):
        tcp(socket.AF_INET, "127.0.0.1", ports["tcp4"])
        tcp(socket.AF_INET6, "::1", ports["tcp6"])
        tcp(socket.AF_INET6, "::ffff:127.0.0.1", ports["tcp6"])
        udp_connected(socket.AF_INET, "127.0.0.1", ports["udp4"])
        udp_connected(socket.AF_INET6, "::1", ports["udp6"])
        udp_unconnected(socket.AF_INET, "127.0.0.1", ports["udp4"], ports["udp4b"])
        time.sleep(0.01)

threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
for t in threads: t.start()
for t in threads: t.join()
with open(out, "w") as fh: json.dump(truth, fh)
'''


class Servers:
    """Echo servers on loopback (TCP and UDP, IPv4 and IPv6) in threads of the test."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.socks: list[socket.socket] = []
        self.threads: list[threading.Thread] = []
        self.ports: dict[str, int] = {}
        t4 = self._sock(socket.AF_INET, socket.SOCK_STREAM, "127.0.0.1", "tcp4")
        t6 = self._sock(socket.AF_INET6, socket.SOCK_STREAM, "::", "tcp6", dual=True)
        for s in (t4, t6):
            s.listen(64)
            self._run(self._accept_loop, s)
        for fam, host, name in ((socket.AF_INET, "127.0.0.1", "udp4"),
                                (socket.AF_INET, "127.0.0.1", "udp4b"),
                                (socket.AF_INET6, "::1", "udp6")):
            self._run(self._udp_loop, self._sock(fam, socket.SOCK_DGRAM, host, name))

    def _sock(self, fam: int, typ: int, host: str, name: str, dual: bool = False) -> socket.socket:
        s = socket.socket(fam, typ)
        if dual:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        s.bind((host, 0))
        s.settimeout(0.2)
        self.socks.append(s)
        self.ports[name] = s.getsockname()[1]
        return s

    def _run(self, fn, s) -> None:
        t = threading.Thread(target=fn, args=(s,), daemon=True)
        t.start()
        self.threads.append(t)

    def _accept_loop(self, s: socket.socket) -> None:
        while not self.stop.is_set():
            try:
                c, _ = s.accept()
            except (TimeoutError, OSError):
                continue
            with c:
                c.settimeout(5)
                try:
                    c.sendall(c.recv(100))
                except OSError:
                    pass

    def _udp_loop(self, s: socket.socket) -> None:
        while not self.stop.is_set():
            try:
                data, addr = s.recvfrom(100)
                s.sendto(data, addr)
            except (TimeoutError, OSError):
                continue

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(2)
        for s in self.socks:
            s.close()


@pytest.fixture
def servers():
    srv = Servers()
    yield srv
    srv.close()


def _run_clients(tmp_path: Path, servers: Servers, names: list[str], strace_opts: list[str]
                 ) -> list[tuple[str, Path, list[dict]]]:
    script = tmp_path / "client.py"
    script.write_text(CLIENT)
    procs = []
    for name in names:
        truth = tmp_path / f"truth.{name}.json"
        p = subprocess.Popen(
            ["strace", *strace_opts, "-o", str(tmp_path / f"raw.{name}"), sys.executable,
             str(script), json.dumps(servers.ports), str(truth), "1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        procs.append((name, p, truth))
    out = []
    for name, p, truth in procs:
        _, err = p.communicate(timeout=60)
        assert p.returncode == 0, err.decode()
        raw = tmp_path / f"raw.{name}"
        # Name the log as the launcher does: strace.<pid>.<procname>.log
        final = tmp_path / f"strace.{p.pid}.{name}.log"
        if raw.exists():  # -ff leaves raw.<name>.<pid> files instead
            raw.rename(final)
        out.append((name, final, json.loads(truth.read_text())))
    return out


def _flowkeys(truths: list[tuple[str, list[dict]]], shift: float = 0.0
              ) -> tuple[FlowKeys, list[str]]:
    rows, labels = [], []
    for name, truth in truths:
        for t in truth:
            rows.append(t)
            labels.append(name)
    return FlowKeys(
        proto=[r["proto"] for r in rows], src_ip=[r["lip"] for r in rows],
        src_port=[r["lport"] for r in rows], dst_ip=[r["rip"] for r in rows],
        dst_port=[r["rport"] for r in rows],
        first_ts=[r["t0"] - shift for r in rows], last_ts=[r["t1"] - shift for r in rows],
        has_syn=[r["proto"] == 6 for r in rows], syn_ts=[r["t0"] - shift for r in rows],
    ), labels


def test_live_strace_two_apps_every_flow_right(tmp_path: Path, servers: Servers) -> None:
    names = ["com.example.alpha", "com.example.beta:push"]
    runs = _run_clients(tmp_path, servers, names,
                        ["-f", "-ttt", "-yy", "-e", "trace=%network,close"])
    stats = ParseStats()
    sets = []
    for _name, log, _ in runs:
        sets.append(ObservationSet.from_observations(iter_socket_observations(log, stats=stats)))
    obs = ObservationSet.concat(sets)
    assert stats.n_skipped == 0, stats.skipped
    # The string fast path and the regexes read real output the same way.
    from tests.test_traces_strace import _as_pid_prefixed

    real = runs[0][1].read_text().splitlines(True)
    assert list(iter_syscalls(real)) == list(iter_syscalls(_as_pid_prefixed(real)))
    # The AP clock runs 2.5 s behind the phone; the session measured 2.2 s.
    fk, truth_labels = _flowkeys([(n, t) for n, _, t in runs], shift=2.5)
    assert len(fk) == 2 * 4 * 3 * 7
    res = correlate(fk, obs, clock_offset=2.2)
    got = res.labels["BF_label"]
    want = np.array([n.split(":")[0] for n in truth_labels], dtype=object)
    assert list(got) == list(want)
    assert set(res.labels["BF_labeling_type"]) == {"exact"}
    assert set(res.labels["BF_label_source"]) == {"strace"}
    assert list(res.labels["BF_sublabel"]) == truth_labels
    clock = res.report["clock"]
    assert clock["refined"] and abs(clock["offset"] - 2.5) < 0.05
    assert res.report["ambiguous"] == 0 and res.report["unlabelled"] == 0


def test_live_strace_without_yy_ff_files(tmp_path: Path, servers: Servers) -> None:
    """-ff per-thread files, -tt time of day, no fd decorations: still every flow right."""
    import datetime as dt

    runs = _run_clients(tmp_path, servers, ["com.example.gamma"],
                        ["-ff", "-tt", "-T", "-e", "trace=%network,close"])
    # -ff wrote raw.<name>.<pid> files; the rename above found none, so read the prefix.
    name = "com.example.gamma"
    prefix = tmp_path / f"raw.{name}"
    parts = sorted(tmp_path.glob(f"raw.{name}.*"))
    assert len(parts) >= 5  # main thread + 4 workers
    today = dt.datetime.now().astimezone()
    stats = ParseStats()
    calls = list(iter_syscalls(prefix, date=today.date(),
                               utc_offset=today.utcoffset().total_seconds(), stats=stats))
    assert stats.n_skipped == 0
    assert calls == sorted(calls, key=lambda c: c.ts)
    assert {c.pid for c in calls} == {int(p.name.rsplit(".", 1)[1]) for p in parts}
    obs = ObservationSet.from_observations(iter_socket_observations(
        calls, process=name))
    fk, labels = _flowkeys([(name, runs[0][2])])
    res = correlate(fk, obs)
    assert list(res.labels["BF_label"]) == labels
    assert set(res.labels["BF_labeling_type"]) == {"exact"}
    # Without getsockname nor -yy the device-side port is never seen: flows are matched
    # by remote endpoint and time, and one app makes them all, so all are still exact.
    blind = [c for c in calls if c.name != "getsockname"]
    obs = ObservationSet.from_observations(iter_socket_observations(blind, process=name))
    res = correlate(fk, obs)
    assert list(res.labels["BF_label"]) == labels
    assert res.report["stages"]["remote_exact"] > 0


@pytest.mark.skipif(shutil.which("tcpdump") is None, reason="tcpdump not installed")
def test_live_capture_flowtable_end_to_end(tmp_path: Path, servers: Servers) -> None:
    """tcpdump on loopback while a traced client runs: the real FlowTable's flows get
    the client's label, every one whose 5-tuple the client reported."""
    import os
    import signal
    import time

    from analysis.assemble import read_flows
    from analysis.correlate import flowkeys_from_table

    pcap = tmp_path / "capture.pcap"
    ports = sorted(set(servers.ports.values()))
    bpf = " or ".join(f"port {p}" for p in ports)
    # -Z root: tcpdump would otherwise write as user tcpdump, which cannot enter tmp_path.
    dump = subprocess.Popen(["tcpdump", "-i", "lo", "--immediate-mode", "-U", "-n", "-Z", "root", "-w", str(pcap), bpf],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 10
        line = b""
        while time.time() < deadline and b"listening" not in line:
            line = dump.stderr.readline()
        if b"listening" not in line:
            pytest.skip("tcpdump cannot capture on lo here")
        runs = _run_clients(tmp_path, servers, ["com.example.delta"],
                            ["-f", "-ttt", "-yy", "-e", "trace=%network,close"])
        time.sleep(0.3)
    finally:
        os.kill(dump.pid, signal.SIGTERM)
        dump.wait(timeout=10)
        dump.stderr.close()
    _, log, truth = runs[0]
    table = read_flows(pcap)
    fk = flowkeys_from_table(table)
    res = correlate(fk, iter_socket_observations(log))
    want = {(t["proto"], t["lport"], t["rport"]) for t in truth}
    got = {}
    for i in range(len(fk)):
        key = (int(fk.proto[i]), int(fk.src_port[i]), int(fk.dst_port[i]))
        if key in want:
            got[key] = (res.labels["BF_label"][i], res.labels["BF_labeling_type"][i])
    assert set(got) == want  # every reported flow was captured and oriented client first
    assert set(got.values()) == {("com.example.delta", "exact")}
    assert fk.has_syn[fk.proto == 6].all()
    assert res.report["clock"]["refined"] and abs(res.report["clock"]["offset"]) < 0.05
