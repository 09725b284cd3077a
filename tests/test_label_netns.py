"""End to end in network namespaces: real clients under the real strace launcher, real
tcpdump at the "AP", the netstat poller, then ``label_capture`` / ``flowtruth label``.

A "phone" namespace runs fake apps (Python processes whose argv[0] and comm are package
names, each under its own uid as Android gives them) and one app nobody traces; an "ap"
namespace runs echo servers (TCP and UDP on IPv4 and IPv6, a DNS-like responder on port
53) and tcpdump on the phone-facing veth. The apps make TCP and UDP flows from several
threads, over IPv4 and IPv6, connected and unconnected UDP, DNS-like exchanges, and a
secondary ``pkg:push`` process; one local port is used by two traced apps and then the
untraced one, seconds apart (for UDP even with the same 5-tuple). Every client writes its
own truth (5-tuple from getsockname, times); strace never decides the truth.

Required: no flow gets a wrong app, at least 99 % of the traced apps' flows get their
app, and the untraced app's flows never get a traced app's label.
"""

from __future__ import annotations

import csv
import json
import os
import random
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from device_scripts import script_path
from tests.netns import NetnsLab, netns_skip_reason

REPO = Path(__file__).resolve().parents[1]
STRACE = shutil.which("strace") or "/usr/bin/strace"
# The clients run under app uids, so their interpreter must be one any uid may run.
CLIENT_PY = next((p for p in ("/usr/bin/python3", "/usr/local/bin/python3")
                  if os.access(p, os.X_OK)), None)
SKIP = netns_skip_reason("tcpdump", "strace", "busybox", "tshark")
if SKIP is None and CLIENT_PY is None:
    SKIP = "no system-wide python3 for the app uids to run"
pytestmark = [pytest.mark.root, pytest.mark.slow,
              pytest.mark.skipif(SKIP is not None, reason=SKIP or "")]

BUSYBOX = shutil.which("busybox") or "busybox"
APPLETS = "adjtimex cat date echo grep head kill mkdir mv pidof printf rm sed sleep xargs".split()
PHONE_V4, PHONE_V6 = "10.99.0.2", "fd99::2"
AP_V4, AP_V6 = "10.99.0.1", "fd99::1"
IDLE = 1.5  # seconds: separates the same 5-tuple used by different apps 3 s apart

SERVER = r'''
import json, socket, sys, threading
cfg = json.loads(sys.argv[1])
def serve(c):
    with c:
        c.settimeout(10)
        try:
            while True:
                d = c.recv(4096)
                if not d:
                    break
                c.sendall(d)
        except OSError:
            pass
def tcp_loop(s):
    while True:
        c, _ = s.accept()
        threading.Thread(target=serve, args=(c,), daemon=True).start()
def udp_loop(s, dns):
    while True:
        d, a = s.recvfrom(2048)
        if dns and len(d) >= 12:
            d = d[:2] + b"\x81\x80" + d[4:6] + b"\x00\x01" + d[8:] + bytes.fromhex("c00c000100010000003c00040a630007")
        s.sendto(d, a)
for fam, host in ((socket.AF_INET, cfg["v4"]), (socket.AF_INET6, cfg["v6"])):
    for port in cfg["tcp"]:
        s = socket.socket(fam, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port)); s.listen(256)
        threading.Thread(target=tcp_loop, args=(s,), daemon=True).start()
    for port in cfg["udp"] + [53]:
        s = socket.socket(fam, socket.SOCK_DGRAM)
        s.bind((host, port))
        threading.Thread(target=udp_loop, args=(s, port == 53), daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
'''

CLIENT = r'''
import ctypes, json, os, random, select, socket, sys, threading, time
name, cfg = sys.argv[1], json.loads(sys.argv[2])
# As Android's zygote does: argv[0] is the package (set by exec), comm its last 15 chars.
ctypes.CDLL(None).prctl(15, name[-15:].encode(), 0, 0, 0)
if cfg["traced"]:
    # The launcher attaches to running processes: start once strace holds this one.
    end = time.time() + 20
    while True:
        with open("/proc/self/status") as f:
            tracer = [l for l in f if l.startswith("TracerPid:")][0].split()[1]
        if tracer != "0":
            break
        if time.time() > end:
            sys.exit(name + ": never traced")
        time.sleep(0.02)
    time.sleep(0.2)
V4, V6 = cfg["v4"], cfg["v6"]
truth, lock = [], threading.Lock()

def note(proto, local, rip, rport, t0):
    with lock:
        truth.append({"proto": proto, "lip": local[0], "lport": local[1], "rip": rip,
                      "rport": rport, "t0": t0, "t1": time.time()})

def fam(host):
    return socket.AF_INET6 if ":" in host else socket.AF_INET

def recv_n(s, n):
    got = 0
    while got < n:
        d = s.recv(n - got)
        if not d:
            raise OSError("closed")
        got += len(d)

def tcp(host, port, n=2, bind_port=None):
    s = socket.socket(fam(host), socket.SOCK_STREAM)
    if bind_port:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("", bind_port))
    t0 = time.time()
    s.setblocking(False)
    try:
        s.connect((host, port))
    except BlockingIOError:
        pass  # EINPROGRESS, as Android apps connect
    select.select([], [s], [], 5)
    assert s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
    s.setblocking(True)
    s.settimeout(5)
    local = s.getsockname()
    for i in range(n):
        s.sendall(b"t" * (50 + i)); recv_n(s, 50 + i)
    s.close()
    note(6, local, host, port, t0)

def udp_connected(host, port, n=2, bind_port=None):
    s = socket.socket(fam(host), socket.SOCK_DGRAM); s.settimeout(5)
    if bind_port:
        s.bind(("", bind_port))
    t0 = time.time()
    s.connect((host, port))
    local = s.getsockname()
    for i in range(n):
        s.send(b"u" * (20 + i)); s.recv(100)
    s.close()
    note(17, local, host, port, t0)

def udp_unconnected(host, ports, bind_port=None):
    s = socket.socket(fam(host), socket.SOCK_DGRAM); s.settimeout(5)
    if bind_port:
        s.bind(("", bind_port))
    t0 = time.time()
    local = None
    for p in ports:
        s.sendto(b"ping", (host, p)); s.recvfrom(100)
        local = local or s.getsockname()
    s.close()
    for p in ports:
        note(17, local, host, p, t0)

def dns(host):
    s = socket.socket(fam(host), socket.SOCK_DGRAM); s.settimeout(5)
    q = random.randbytes(2) + bytes.fromhex("01000001000000000000") + b"\x04chat\x06signal\x03org\x00\x00\x01\x00\x01"
    t0 = time.time()
    s.sendto(q, (host, 53))
    local = s.getsockname()
    s.recvfrom(512)
    s.close()
    note(17, local, host, 53, t0)

def until(t):
    time.sleep(max(0.0, t - time.time()))

P = cfg["ports"]
L = cfg["loops"]
def alpha(k):
    for _ in range(L):
        tcp(V4, P["t0"]); tcp(V6, P["t0"]); udp_connected(V4, P["u0"])
        udp_unconnected(V6, [P["u0"], P["u1"]]); dns(V4)

def beta(k):
    for _ in range(L):
        tcp(V6, P["t1"]); udp_connected(V6, P["u1"]); dns(V6); tcp(V4, P["t1"], n=15)

def push(k):
    for _ in range(L):
        tcp(V4, P["t0"]); tcp(V6, P["t1"]); udp_unconnected(V4, [P["u0"], P["u1"]])

def gamma(k):
    for _ in range(L):
        tcp(V4, P["t0"]); dns(V4); udp_connected(V6, P["u0"])

def delta(k):
    for _ in range(L):
        tcp(V4, P["t0"]); tcp(V4, P["t0"]); udp_connected(V4, P["u0"]); dns(V4); tcp(V6, P["t1"])

work = {"alpha": alpha, "beta": beta, "push": push, "gamma": gamma, "delta": delta}[cfg["role"]]
threads = [threading.Thread(target=work, args=(k,)) for k in range(cfg["threads"])]
for t in threads: t.start()
for t in threads: t.join()
# One local port, reused by two traced apps and then the untraced one, seconds apart,
# from a start time the test sends once every app has done the work above.
print("phase1", flush=True)
R = {**cfg["reuse"], "at": float(sys.stdin.readline())}
if cfg["role"] == "alpha":
    until(R["at"]); tcp(V4, P["t0"], bind_port=R["tcp"]); udp_connected(V4, P["u0"], bind_port=R["udp"])
elif cfg["role"] == "gamma":
    until(R["at"] + 3); tcp(V4, P["t1"], bind_port=R["tcp"]); udp_connected(V4, P["u0"], bind_port=R["udp"])
    # A traced socket opened half a second after the untraced app's flow on its port.
    # Unconnected UDP: its close() names no remote end.
    until(R["at"] + 6.5); tcp(V4, P["t1"], bind_port=R["tcp2"]); udp_unconnected(V4, [P["u1"]], bind_port=R["udp2"])
elif cfg["role"] == "delta":
    until(R["at"] + 6); tcp(V4, P["t2"], bind_port=R["tcp"]); udp_connected(V4, P["u0"], bind_port=R["udp"])
    tcp(V4, P["t0"], bind_port=R["tcp2"]); udp_connected(V4, P["u0"], bind_port=R["udp2"])
print(json.dumps(truth), flush=True)
'''


@dataclass
class App:
    name: str  # package, or "pkg:service"
    role: str
    uid: int
    traced: bool
    threads: int
    loops: int

    @property
    def package(self) -> str:
        return self.name.split(":", 1)[0]


@dataclass
class LabRun:
    tmp: Path
    pcap: Path
    strace_dirs: dict[str, Path]
    netstat: Path
    packages: Path
    apps: list[App]
    truth: list[dict[str, Any]] = field(default_factory=list)  # + "app", "name"
    tcpdump_captured: int = 0
    reuse: dict[str, Any] = field(default_factory=dict)

    @property
    def traced(self) -> list[str]:
        return sorted({a.package for a in self.apps if a.traced})

    @property
    def untraced(self) -> list[str]:
        return sorted({a.package for a in self.apps if not a.traced})


def _applets(tmp: Path) -> Path:
    d = tmp / "bin"
    d.mkdir(exist_ok=True)
    busybox = shutil.which("busybox")
    assert busybox
    have = subprocess.run([busybox, "--list"], capture_output=True, text=True).stdout.split()
    for a in APPLETS:
        if a in have:
            (d / a).symlink_to(busybox)
    return d


def _wait_file(path: Path, cond, timeout: float = 10) -> None:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.exists() and cond(path.read_text()):
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {path}")


def _run_lab(tmp: Path) -> LabRun:
    tag = f"{random.randrange(16**6):06x}"
    base = f"org.ftlabel{tag}"
    apps = [
        App(f"{base}.alpha", "alpha", 10101, True, 3, 5),
        App(f"{base}.beta", "beta", 10102, True, 2, 4),
        App(f"{base}.beta:push", "push", 10102, True, 2, 2),
        App(f"{base}.gamma", "gamma", 10103, True, 1, 3),
        App(f"{base}.delta", "delta", 10104, False, 3, 3),
    ]
    ports = {"t0": 7000, "t1": 7001, "t2": 7002, "u0": 9000, "u1": 9001}
    # Outside the ephemeral range, so no kernel-chosen port collides with it.
    reuse = {"tcp": random.randrange(61000, 62000), "udp": random.randrange(62000, 63000),
             "tcp2": random.randrange(63000, 64000), "udp2": random.randrange(64000, 65000)}
    bindir = _applets(tmp)
    env = {"PATH": str(bindir)}
    with NetnsLab("ftl") as lab:
        phone, ap = lab.add("ph"), lab.add("ap")
        lab.veth(phone, "p0", ap, "a0", [f"{PHONE_V4}/24", f"{PHONE_V6}/64"],
                 [f"{AP_V4}/24", f"{AP_V6}/64"])
        # Resolve the neighbours first: a SYN queued behind a lost first ARP request
        # leaves a second later, which would blur the clock residual this test checks.
        for addr in (AP_V4, AP_V6):
            phone.run([BUSYBOX, "ping", "-c", "1", "-W", "3", addr], timeout=10)
        pcap = tmp / "capture.pcap"
        dump = lab.tcpdump(ap, "a0", pcap)
        phone.run([BUSYBOX, "ping", "-c", "1", "-W", "3", AP_V4], timeout=10)  # in no flow
        srv = ap.popen([sys.executable, "-c", SERVER, json.dumps(
            {"v4": AP_V4, "v6": AP_V6, "tcp": [ports["t0"], ports["t1"], ports["t2"]],
             "udp": [ports["u0"], ports["u1"]]})], stdout=subprocess.PIPE, text=True)
        assert srv.stdout is not None and srv.stdout.readline().strip() == "ready"
        netstat = tmp / "netstat.log"
        poller = phone.popen([BUSYBOX, "sh", str(script_path("netstat_poller.sh")),
                              str(netstat), "0.05"], env=env, stderr=subprocess.DEVNULL)
        launchers = {}
        strace_dirs = {}
        for pkg in sorted({a.package for a in apps if a.traced}):
            d = tmp / "strace" / pkg
            strace_dirs[pkg] = d
            launchers[pkg] = phone.popen(
                [BUSYBOX, "sh", str(script_path("strace_launcher.sh")), pkg, str(d), STRACE,
                 "0.1"], env=env, stderr=subprocess.DEVNULL)
        _wait_file(netstat, lambda t: "=== " in t)
        procs = []
        for a in apps:
            cfg = {"traced": a.traced, "v4": AP_V4, "v6": AP_V6, "ports": ports,
                   "role": a.role, "threads": a.threads, "loops": a.loops, "reuse": reuse}
            assert CLIENT_PY is not None
            p = phone.popen([a.name, "-I", "-S", "-c", CLIENT, a.name, json.dumps(cfg)],
                            executable=CLIENT_PY, uid=a.uid, gid=a.uid, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            procs.append((a, p))
        for a, p in procs:
            assert p.stdout is not None
            line = p.stdout.readline().strip()
            if line != "phase1":
                _, err = p.communicate(timeout=10)
                raise AssertionError(f"{a.name}: {line!r} {err}")
        at = time.time() + 0.5
        for _a, p in procs:
            assert p.stdin is not None
            p.stdin.write(f"{at}\n")
            p.stdin.flush()
        truth = []
        for a, p in procs:
            out, err = p.communicate(timeout=40)
            assert p.returncode == 0, f"{a.name}: {err}"
            for t in json.loads(out):
                truth.append({**t, "app": a.package, "name": a.name})
        time.sleep(0.3)  # trailing FIN/ACKs reach the capture
        for d in strace_dirs.values():
            (d / "strace_launcher.stop").touch()
        (netstat.parent / (netstat.name + ".stop")).touch()
        for p in [*launchers.values(), poller]:
            p.wait(timeout=15)
        captured = dump.stop()
    packages = tmp / "packages.txt"
    packages.write_text("".join(f"package:{p} uid:{u}\n" for p, u in sorted(
        {(a.package, a.uid) for a in apps})) + "package:android uid:1000\n")
    return LabRun(tmp, pcap, strace_dirs, netstat, packages, apps, truth, captured,
                  {**reuse, "at": at})


@pytest.fixture(scope="module")
def lab_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabRun]:
    tmp = tmp_path_factory.mktemp("labelnetns")
    run = _run_lab(tmp)
    yield run
    shutil.rmtree(tmp, ignore_errors=True)


def _key(proto: int, lip: str, lport: int, rip: str, rport: int) -> tuple:
    from analysis.traces.model import norm_ip

    return (int(proto), norm_ip(lip), int(lport), norm_ip(rip), int(rport))


@dataclass
class Score:
    flows: int = 0
    traced_flows: int = 0
    traced_right: int = 0
    wrong: list[str] = field(default_factory=list)
    untraced_flows: int = 0
    untraced_with_traced_label: list[str] = field(default_factory=list)
    unexplained: list[str] = field(default_factory=list)
    missed: list[str] = field(default_factory=list)
    owner: list[str | None] = field(default_factory=list)

    @property
    def recall(self) -> float:
        return self.traced_right / self.traced_flows if self.traced_flows else 0.0


def score(table, run: LabRun) -> Score:  # type: ignore[no-untyped-def]
    """Each flow's owner from the clients' truth, compared with its label."""
    # Keyed without the local address: an unconnected UDP socket's getsockname gives
    # the wildcard, which then matches any local address.
    truth: dict[tuple, list[dict[str, Any]]] = {}
    for t in run.truth:
        k = _key(t["proto"], t["lip"], t["lport"], t["rip"], t["rport"])
        truth.setdefault((k[0], *k[2:]), []).append({**t, "lip": k[1]})
    src, dst = table.ip_strings()
    fl = table.flows
    labels = table.label_column("BF_label", "unknown").tolist()
    types = table.label_column("BF_labeling_type", "unlabelled").tolist()
    traced = set(run.traced)
    sc = Score(flows=len(table))
    for i in range(len(table)):
        k = _key(fl["proto"][i], src[i], fl["src_port"][i], dst[i], fl["dst_port"][i])
        first, last = fl["first_ts_ns"][i] / 1e9, fl["last_ts_ns"][i] / 1e9
        owners = {t["app"] for t in truth.get((k[0], *k[2:]), ())
                  if t["t0"] - 0.5 <= last and t["t1"] + 0.5 >= first
                  and t["lip"] in (None, k[1])}
        desc = f"{k} {labels[i]} ({types[i]})"
        assert len(owners) <= 1, f"test design: flow {desc} has owners {owners}"
        owner = next(iter(owners), None)
        sc.owner.append(owner)
        if owner is None:
            sc.unexplained.append(desc)
            continue
        if owner in traced:
            sc.traced_flows += 1
            if labels[i] == owner:
                sc.traced_right += 1
            else:
                sc.missed.append(f"{desc}, owner {owner}")
            if labels[i] in traced and labels[i] != owner:
                sc.wrong.append(f"{desc}, owner {owner}")
        else:
            sc.untraced_flows += 1
            if labels[i] in traced:
                sc.untraced_with_traced_label.append(f"{desc}, owner {owner}")
    return sc


@pytest.fixture(scope="module")
def labelled(lab_run: LabRun):  # type: ignore[no-untyped-def]
    from analysis.assemble import FlowOptions
    from analysis.label import label_capture

    out = lab_run.tmp / "out"
    t0 = time.perf_counter()
    res = label_capture(
        [lab_run.pcap], strace={p: [d] for p, d in lab_run.strace_dirs.items()},
        netstat=lab_run.netstat, uid_map=lab_run.packages,
        device_ips=[PHONE_V4, PHONE_V6], out_dir=out, fmt="mirage2022",
        device_model="FTLab", device_mac="02:00:5e:10:00:01",
        flow_options=FlowOptions(idle_timeout=IDLE))
    res.quality["_seconds"] = time.perf_counter() - t0
    return res, out


def test_netns_every_traced_flow_gets_its_app_and_no_flow_a_wrong_one(lab_run, labelled) -> None:  # type: ignore[no-untyped-def]
    res, _ = labelled
    sc = score(res.table, lab_run)
    print(f"\nflows {sc.flows}, traced {sc.traced_flows} (right {sc.traced_right}, recall "
          f"{sc.recall:.4f}), untraced {sc.untraced_flows}, unexplained {len(sc.unexplained)}; "
          f"tcpdump captured {lab_run.tcpdump_captured}; labelling took "
          f"{res.quality['_seconds']:.2f} s; by type {res.quality['by_type']}")
    assert sc.traced_flows >= 140 and sc.untraced_flows >= 40
    assert sc.wrong == []  # precision 100 %
    assert sc.untraced_with_traced_label == []
    assert sc.recall >= 0.99, sc.missed
    assert sc.unexplained == []  # every flow in the capture is a client's
    # The secondary process keeps its name in the sublabel.
    sub = res.table.label_column("BF_sublabel").tolist()
    push = next(a.name for a in lab_run.apps if a.role == "push")
    assert sub.count(push) >= 2 * 4


def test_netns_one_port_three_apps_seconds_apart(lab_run, labelled) -> None:  # type: ignore[no-untyped-def]
    """The same local port (TCP, and UDP even with the same 5-tuple) used by alpha, then
    gamma, then the untraced delta: each flow gets its own owner or no traced label; and
    a port the untraced app used half a second before a traced socket took it."""
    res, _ = labelled
    sc = score(res.table, lab_run)
    fl = res.table.flows
    labels = res.table.label_column("BF_label", "unknown").tolist()
    got: dict[str, list[tuple[str | None, str]]] = {"tcp": [], "udp": [], "tcp2": [], "udp2": []}
    for i in range(len(res.table)):
        for kind, proto in (("tcp", 6), ("udp", 17), ("tcp2", 6), ("udp2", 17)):
            if fl["proto"][i] == proto and fl["src_port"][i] == lab_run.reuse[kind]:
                got[kind].append((sc.owner[i], labels[i]))
    base = lab_run.traced[0].rsplit(".", 1)[0]
    for kind in ("tcp", "udp"):
        owners = [o for o, _ in got[kind]]
        assert owners == [f"{base}.alpha", f"{base}.gamma", f"{base}.delta"], got[kind]
        assert [lab for _, lab in got[kind][:2]] == owners[:2]
        assert got[kind][2][1] not in lab_run.traced
    # The untraced app's flow just before a traced socket took its port stays unlabelled.
    for kind in ("tcp2", "udp2"):
        assert [o for o, _ in got[kind]] == [f"{base}.delta", f"{base}.gamma"], got[kind]
        assert got[kind][0][1] not in lab_run.traced and got[kind][1][1] == f"{base}.gamma"


def test_netns_quality_report_strace_netstat_agree_and_clock(lab_run, labelled) -> None:  # type: ignore[no-untyped-def]
    res, out = labelled
    q = json.loads((out / "quality.json").read_text())
    assert q["schema_version"] == 1
    sn = q["strace_netstat"]
    assert sn["both"] >= 10 and sn["disagree"] == 0, sn
    assert q["clock"]["refined"] and q["clock"]["residual_median"] < 0.01
    assert q["clock"]["residual_p95"] < 0.25 and q["clock"]["second_pass"]
    assert q["inputs"]["strace"]["parsed"] > 0
    assert q["inputs"]["netstat"]["parsed"] > 0
    assert q["totals"]["flows"] == len(res.table)
    assert q["targets"]["packages"] == lab_run.traced
    # by_type adds up to the totals.
    for k in ("flows", "packets", "bytes"):
        assert sum(v[k] for v in q["by_type"].values()) == q["totals"][k]
    mirage = q["outputs"]["mirage"]
    assert mirage and all(Path(p).exists() for p in mirage)
    assert Path(mirage[0]).parent.name == "FTLab_02_00_5e_10_00_01"
    assert Path(mirage[0]).name.split("_")[1] == lab_run.traced[0]


def _tshark(*args: str) -> str:
    return subprocess.run(["tshark", "-n", *args], capture_output=True, text=True,
                          check=True, timeout=60).stdout


def test_netns_labelled_pcapng_every_packet_carries_its_comment(lab_run, labelled) -> None:  # type: ignore[no-untyped-def]
    res, out = labelled
    comments = _tshark("-r", str(out / "labelled.pcapng"), "-T", "fields",
                       "-e", "frame.comment").splitlines()
    n_orig = len(_tshark("-r", str(lab_run.pcap), "-T", "fields", "-e",
                         "frame.number").splitlines())
    assert len(comments) == n_orig == res.table.capture.packets == lab_run.tcpdump_captured
    assert all(c.startswith("flowtruth: ") for c in comments)
    per_app = Counter(c.split("app=", 1)[1].split(" ", 1)[0] for c in comments if "app=" in c)
    want = {app: s["packets"] for app, s in res.quality["by_app"].items()}
    assert dict(per_app) == want
    no_flow = sum(1 for c in comments if c == "flowtruth: no flow")
    assert no_flow == res.table.capture.packets - res.table.n_packets
    assert no_flow > 0  # ARP and neighbour discovery
    # The packet bytes are unchanged.
    a = _tshark("-r", str(lab_run.pcap), "-T", "fields", "-e", "frame.len", "-e", "frame.time_epoch")
    b = _tshark("-r", str(out / "labelled.pcapng"), "-T", "fields", "-e", "frame.len", "-e",
                "frame.time_epoch")
    assert a == b


def test_netns_filtered_pcap_holds_exactly_the_target_flows(lab_run, labelled) -> None:  # type: ignore[no-untyped-def]
    from analysis.assemble import FlowOptions, read_flows
    from analysis.label import target_mask

    res, out = labelled
    keep = target_mask(res.table, res.targets)
    filt = read_flows([out / "filtered.pcap"], FlowOptions(idle_timeout=IDLE,
                                                           device_nets=(PHONE_V4, PHONE_V6)))
    assert filt.capture.packets == int(res.table.flows["bf_packets"][keep].sum())
    assert len(filt) == int(keep.sum())
    assert filt.capture.linktypes == {1: filt.capture.packets}
    sc_owner = score(filt, lab_run).owner
    assert set(sc_owner) <= set(lab_run.traced)


def test_netns_cli_and_run_dir_and_labels_csv_give_the_same_labels(lab_run, labelled) -> None:  # type: ignore[no-untyped-def]
    from analysis.assemble import FlowOptions
    from analysis.label import label_capture, label_run

    res, out = labelled
    want = list(res.table.label_column("BF_label", "unknown"))
    # The CLI, offline form.
    cli_out = lab_run.tmp / "cli"
    argv = [str(REPO / ".venv" / "bin" / "flowtruth"), "label", "--pcap", str(lab_run.pcap)]
    for pkg, d in lab_run.strace_dirs.items():
        argv += ["--strace", f"{pkg}={d}"]
    argv += ["--netstat", str(lab_run.netstat), "--uid-map", str(lab_run.packages),
             "--device-ip", PHONE_V4, "--device-ip", PHONE_V6, "--idle-timeout", str(IDLE),
             "--format", "mirage2019", "--out", str(cli_out)]
    exe = argv[0] if os.access(argv[0], os.X_OK) else None
    if exe is None:
        argv = [sys.executable, "-m", "controller.cli", *argv[1:]]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=REPO)
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr
    assert "bi-flows" in p.stdout and "strace and netstat" in p.stdout
    q = json.loads((cli_out / "quality.json").read_text())
    assert q["by_type"] == res.quality["by_type"]
    assert q["by_app"] == res.quality["by_app"]
    # A run directory whose manifest names the same files.
    run = lab_run.tmp / "run"
    run.mkdir(exist_ok=True)
    logs = sorted(str(p) for d in lab_run.strace_dirs.values() for p in d.glob("strace.*.log"))
    (run / "manifest.json").write_text(json.dumps({
        "schema_version": 1,
        "device": {"serial": "lab", "model": "FTLab", "manufacturer": "flowtruth",
                   "mac": "02:00:5e:10:00:01", "ip": PHONE_V4},
        "apps": [{"package": p, "uid": next(a.uid for a in lab_run.apps if a.package == p),
                  "version": "1"} for p in lab_run.traced],
        "activity": "lab", "clock": {"offset_s": 0.0, "uncertainty_s": 0.001},
        "capture": {"files": [str(lab_run.pcap)], "interface": "a0", "snaplen": 262144},
        "traces": {"strace": logs, "netstat": str(lab_run.netstat), "frida": None,
                   "packages": str(lab_run.packages)},
        "started_at": "2026-11-28T22:00:00Z", "outcome": "completed",
        "tools": {"strace": "6.1"},  # extra keys are ignored
    }))
    rr = label_run(run, device_ips=[PHONE_V4, PHONE_V6],
                   flow_options=FlowOptions(idle_timeout=IDLE))
    assert list(rr.table.label_column("BF_label", "unknown")) == want
    assert (run / "labels" / "labelled.pcapng").exists()
    # labels.csv applied alone gives every labelled flow its label back.
    again = label_capture([lab_run.pcap], labels_csv=out / "labels.csv",
                          device_ips=[PHONE_V4, PHONE_V6], targets=lab_run.traced,
                          flow_options=FlowOptions(idle_timeout=IDLE))
    got = list(again.table.label_column("BF_label", "unknown"))
    with open(out / "labels.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    labelled_flows = [i for i, t in enumerate(res.table.label_column("BF_labeling_type"))
                      if t not in ("ambiguous", "unlabelled")]
    assert len(rows) == len(labelled_flows)
    assert [got[i] for i in labelled_flows] == [want[i] for i in labelled_flows]
    assert np.all(again.table.label_column("BF_label_source")[labelled_flows] == "csv")


def test_netns_lab_removes_everything_even_after_a_failure() -> None:
    """The helper's cleanup: namespaces (with their veths) and every process inside go,
    also when the test body raises."""
    with pytest.raises(RuntimeError, match="boom"), NetnsLab("ftx") as lab:
        a, b = lab.add("a"), lab.add("b")
        lab.veth(a, "x0", b, "y0", ["10.98.0.1/30"], ["10.98.0.2/30"])
        sleeper = a.popen(["sleep", "60"])
        stray = subprocess.Popen(["ip", "netns", "exec", b.name, "sleep", "60"])
        time.sleep(0.2)
        assert a.pids() == [sleeper.pid]
        names = [a.name, b.name]
        raise RuntimeError("boom")
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(n in listed for n in names)
    assert sleeper.poll() is not None
    assert stray.wait(timeout=5) is not None


def test_netns_undecorated_strace_gives_the_same_labels_as_yy(lab_run, labelled) -> None:  # type: ignore[no-untyped-def]
    """The real launcher's ``-yy`` logs rewritten as strace prints them when its socket
    lookup fails (``46<socket:[98770]>``, the inode it printed) and without ``-yy`` (bare
    fds): the capture gets the same labels, from the calls' sockaddrs (and getsockname)
    and the netstat poller's rows of each inode.

    With getsockname() hidden too, a socket shorter-lived than the poll interval has no
    known local port; its flow is matched by remote endpoint and connect time, which
    concurrent connections to one endpoint make ambiguous: never a wrong label."""
    from analysis.assemble import FlowOptions
    from analysis.label import label_capture
    from analysis.traces.netstat import iter_socket_tables
    from tests.test_android_real_analysis import undecorate

    res, _ = labelled
    want = list(zip(res.table.label_column("BF_label", "unknown").tolist(),
                    res.table.label_column("BF_labeling_type", "unlabelled").tolist(),
                    strict=True))
    inodes = {(6 if r.table.startswith("tcp") else 17, r.local_port): r.inode
              for r in iter_socket_tables(lab_run.netstat) if r.inode}
    for form, hide_port in (("inode", False), ("bare", False), ("inode", True),
                            ("bare", True)):
        dirs = {}
        for pkg, d in lab_run.strace_dirs.items():
            nd = lab_run.tmp / f"strace_{form}_{hide_port}" / pkg
            nd.mkdir(parents=True, exist_ok=True)
            for f in d.glob("strace.*.log"):
                text = undecorate(f.read_text(), form, inodes)
                assert "<TCP" not in text and "<UDP" not in text
                if hide_port:  # as an app that never calls getsockname()
                    text = "".join(ln for ln in text.splitlines(keepends=True)
                                   if "getsockname" not in ln)
                (nd / f.name).write_text(text)
            procs = d / "strace_launcher.procs"  # names the launcher's pid-only logs
            if procs.exists():
                (nd / procs.name).write_bytes(procs.read_bytes())
            dirs[pkg] = nd
        got = label_capture(
            [lab_run.pcap], strace={p: [d] for p, d in dirs.items()},
            netstat=lab_run.netstat, uid_map=lab_run.packages,
            device_ips=[PHONE_V4, PHONE_V6], flow_options=FlowOptions(idle_timeout=IDLE))
        labels = list(zip(got.table.label_column("BF_label", "unknown").tolist(),
                          got.table.label_column("BF_labeling_type", "unlabelled").tolist(),
                          strict=True))
        diff = [(i, a, b) for i, (a, b) in enumerate(zip(want, labels, strict=True)) if a != b]
        sc = score(got.table, lab_run)
        print(f"\n{form} (getsockname hidden: {hide_port}): {len(diff)} of {len(want)} "
              f"flows differ, recall {sc.recall:.3f}")
        assert sc.wrong == [] and sc.untraced_with_traced_label == [], form
        if not hide_port:
            assert diff == [], f"{form}: {len(diff)} flows differ, e.g. {diff[:5]}"
            assert sc.recall >= 0.99, form
        else:  # flows lose their label (ambiguous), never get a wrong one; how many keep
            # theirs depends on which sockets outlive a netstat poll (0.22-0.82 seen), so
            # the claim is only "some, and none wrong" (wrong == [] is asserted above)
            assert sc.traced_right > 0, form
