"""The frida agent and its loader, attached for real to local processes that open sockets;
what the agent reports is checked against what the process itself saw (getsockname)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from analysis.traces.frida import iter_frida_events
from analysis.traces.model import ParseStats
from device_scripts import script_path
from device_scripts.frida_loader import (
    FridaPackageTracer,
    FridaTracer,
    FridaTracerError,
    TracerAssignment,
    assign_tracers,
)
from tests import frida_helpers

frida = pytest.importorskip("frida")

REPO = Path(__file__).resolve().parents[1]
# Package-like and unique to this test run, so concurrent tests never share a process name.
PKG = f"org.flowtruth.fakeapp{os.getpid()}"

# Waits for "go", does every kind of socket call the agent hooks, prints the truth it saw
# as JSON lines, then waits for "quit".
TARGET = r"""
import json, os, socket, sys, threading

def out(**kw):
    print(json.dumps(kw), flush=True)

def ep(addr):
    return {"ip": addr[0], "port": addr[1]}

print("ready", flush=True)
sys.stdin.readline()
pid = os.getpid()
main_tid = threading.get_native_id()

srv4 = socket.socket(); srv4.bind(("127.0.0.1", 0)); srv4.listen(8)
srv6 = socket.socket(socket.AF_INET6); srv6.bind(("::1", 0)); srv6.listen(8)
rcv4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); rcv4.bind(("127.0.0.1", 0))
rcv6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); rcv6.bind(("::1", 0))

c4 = socket.socket(); c4.connect(srv4.getsockname())
out(op="tcp4", fd=c4.fileno(), tid=main_tid, local=ep(c4.getsockname()), remote=ep(c4.getpeername()))
c6 = socket.socket(socket.AF_INET6); c6.connect(srv6.getsockname())
out(op="tcp6", fd=c6.fileno(), tid=main_tid, local=ep(c6.getsockname()), remote=ep(c6.getpeername()))

u4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u4.sendto(b"a", rcv4.getsockname())
out(op="udp4", fd=u4.fileno(), tid=main_tid, local=ep(u4.getsockname()), remote=ep(rcv4.getsockname()))
u6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); u6.sendto(b"b", rcv6.getsockname()[:2])
out(op="udp6", fd=u6.fileno(), tid=main_tid, local=ep(u6.getsockname()), remote=ep(rcv6.getsockname()))
um = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
um.sendto(b"c", ("::ffff:127.0.0.1", rcv4.getsockname()[1]))
out(op="mapped", fd=um.fileno(), tid=main_tid, local=ep(um.getsockname()),
    remote={"ip": "127.0.0.1", "port": rcv4.getsockname()[1]})
sm = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sm.sendmsg([b"d"], [], 0, rcv4.getsockname())
out(op="sendmsg", fd=sm.fileno(), tid=main_tid, local=ep(sm.getsockname()), remote=ep(rcv4.getsockname()))
data, src = rcv4.recvfrom(16)
out(op="recvfrom", fd=rcv4.fileno(), tid=main_tid, local=ep(rcv4.getsockname()), remote=ep(src))
for _ in range(3):  # repeats of a reported (fd, peer) add no event
    u4.sendto(b"a", rcv4.getsockname())
nbr = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); nbr.bind(("127.0.0.1", 0))
nbr.setblocking(False)
try:
    nbr.recvfrom(16)  # EAGAIN: not reported, and must not hide the next success
except BlockingIOError:
    pass
u4.sendto(b"e", nbr.getsockname())
import select; select.select([nbr], [], [], 5)
data, src = nbr.recvfrom(16)
out(op="recv_after_eagain", fd=nbr.fileno(), tid=main_tid, local=ep(nbr.getsockname()),
    remote=ep(src))

def in_thread():
    t = socket.socket(); t.connect(srv4.getsockname())
    out(op="thread", fd=t.fileno(), tid=threading.get_native_id(), local=ep(t.getsockname()),
        remote=ep(t.getpeername()))
    t.close()
th = threading.Thread(target=in_thread); th.start(); th.join()

nb = socket.socket(); nb.setblocking(False)
nb.connect_ex(srv4.getsockname())
out(op="nonblocking", fd=nb.fileno(), tid=main_tid, local=ep(nb.getsockname()), remote=ep(srv4.getsockname()))
socket.getaddrinfo("localhost", 443, socket.AF_INET, socket.SOCK_STREAM)
out(op="getaddrinfo", fd=-1, tid=main_tid, local=None, remote={"ip": "127.0.0.1", "port": 443})
closed_fd = c4.fileno(); c4.close()
out(op="close", fd=closed_fd, tid=main_tid, local=None, remote=ep(srv4.getsockname()))
out(op="done", pid=pid)
sys.stdin.readline()
"""


def start_target(tmp: Path, argv0: str | None = None) -> subprocess.Popen[str]:
    script = tmp / "target.py"
    script.write_text(TARGET)
    argv = [argv0 or sys.executable, str(script)]
    p = subprocess.Popen(
        argv,
        executable=sys.executable,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert p.stdout is not None
    assert p.stdout.readline().strip() == "ready"
    return p


def stop_target(p: subprocess.Popen[str]) -> None:
    if p.poll() is None:
        p.kill()
    p.wait(timeout=5)


@pytest.fixture(scope="module", autouse=True)
def no_frida_leftovers() -> Iterator[None]:
    """frida 17 starts a helper daemon (idund, from a /tmp/frida-* copy) and unpacks its
    agent to /tmp; it keeps both for later attaches. End the helpers this test run started,
    by pid, and remove what they unpacked (:mod:`tests.frida_helpers`)."""
    dirs0 = frida_helpers.frida_dirs()
    yield
    frida_helpers.cleanup(dirs0)


@pytest.fixture(scope="module")
def can_attach(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Skips the module's attach tests, with the reason, if frida cannot attach here."""
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        session = frida.get_local_device().attach(sleeper.pid)
        session.detach()
    except frida.PermissionDeniedError as e:
        pytest.skip(f"frida may not attach to local processes here: {e}")
    except (frida.NotSupportedError, frida.TransportError) as e:
        pytest.skip(f"frida cannot instrument local processes here: {e}")
    finally:
        sleeper.kill()
        sleeper.wait()


def read_events(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def run_scenario(p: subprocess.Popen[str]) -> list[dict[str, Any]]:
    """Sends "go", collects the target's truth lines up to "done"."""
    assert p.stdin is not None and p.stdout is not None
    p.stdin.write("go\n")
    p.stdin.flush()
    truth: list[dict[str, Any]] = []
    while True:
        line = p.stdout.readline()
        assert line, "target exited early"
        rec = json.loads(line)
        if rec["op"] == "done":
            return truth
        truth.append(rec)


def one(events: list[dict[str, Any]], **match: Any) -> dict[str, Any]:
    found = [e for e in events if all(e.get(k) == v for k, v in match.items())]
    assert len(found) == 1, f"{len(found)} events match {match}: {found}"
    return found[0]


KEYS = {
    "ts",
    "event",
    "pid",
    "tid",
    "fd",
    "proto",
    "family",
    "local",
    "remote",
    "host",
    "ret",
    "process",
}


def test_agent_reports_every_socket_as_the_process_saw_it(can_attach: None, tmp_path: Path) -> None:
    p = start_target(tmp_path, argv0=PKG)
    out = tmp_path / "frida.jsonl"
    tracer = FridaTracer(out, pid=p.pid)
    try:
        t0 = time.time()
        tracer.start()
        assert set(tracer.info["hooks"]) >= {
            "connect",
            "sendto",
            "sendmsg",
            "recvfrom",
            "close",
            "getaddrinfo",
        }
        truth = {t["op"]: t for t in run_scenario(p)}
        tracer.stop()
        t1 = time.time()
    finally:
        tracer.stop()
        stop_target(p)
    assert tracer.errors == []
    events = read_events(out)
    assert events and tracer.events_written == len(events)
    for e in events:
        assert set(e) == KEYS | ({"errno"} if e["ret"] == -1 else set()), e
        assert e["pid"] == p.pid and e["process"] == PKG
        assert t0 - 1 <= e["ts"] <= t1 + 1
    stamps = [e["ts"] for e in events]
    assert stamps == sorted(stamps)

    def check(op: str, event: str, proto: str, family: int, **extra: Any) -> dict[str, Any]:
        t = truth[op]
        # fds are reused after close, so the local address is part of the identity.
        e = one(events, event=event, fd=t["fd"], remote=t["remote"], local=t["local"], **extra)
        assert e["tid"] == t["tid"], (op, e)
        assert e["proto"] == proto and e["family"] == family, (op, e)
        assert e["host"] is None
        return e

    assert check("tcp4", "connect", "tcp", 4)["ret"] == 0
    assert check("tcp6", "connect", "tcp", 6)["remote"]["ip"] == "::1"
    assert check("udp4", "sendto", "udp", 4)["ret"] == 1
    check("udp6", "sendto", "udp", 6)
    mapped = check("mapped", "sendto", "udp", 4)  # IPv4-mapped shown as IPv4
    assert mapped["remote"]["ip"] == "127.0.0.1" and mapped["local"]["ip"] == "::"
    check("sendmsg", "sendmsg", "udp", 4)
    assert check("recvfrom", "recvfrom", "udp", 4)["ret"] == 1
    assert check("recv_after_eagain", "recvfrom", "udp", 4)["ret"] == 1
    assert not [e for e in events if e["ret"] < 0 and e["event"] != "connect"]
    thread = check("thread", "connect", "tcp", 4)
    assert thread["tid"] != truth["tcp4"]["tid"]
    nb = check("nonblocking", "connect", "tcp", 4)
    assert (nb["ret"], nb.get("errno")) in ((0, None), (-1, "EINPROGRESS"))
    close = one(events, event="close", fd=truth["close"]["fd"], local=truth["tcp4"]["local"])
    assert close["remote"] == truth["close"]["remote"] and close["ret"] == 0
    gai = one(events, event="getaddrinfo", host="localhost")
    assert gai["remote"] == {"ip": "127.0.0.1", "port": 443}
    assert gai["fd"] == -1 and gai["local"] is None and gai["proto"] == "tcp"
    # Only Internet sockets: nothing from the unix/netlink sockets Python may open.
    assert all(e["family"] in (4, 6) for e in events)

    # The analysis parser takes every line: one lookup noted, the rest observations.
    stats = ParseStats()
    obs = list(iter_frida_events(out, stats))
    assert stats.n_skipped == 0, stats.skipped
    assert stats.other.get("name lookups") == 1
    assert {o.process for o in obs} == {PKG}
    t = truth["tcp6"]
    assert any(
        o.kind == "connect" and o.local_port == t["local"]["port"] and o.remote_ip == "::1"
        for o in obs
    )


def test_loader_cli_spawns_and_sees_the_first_connect(can_attach: None, tmp_path: Path) -> None:
    script = tmp_path / "early.py"
    script.write_text(
        "import socket\n"
        "s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen(1)\n"
        "c = socket.create_connection(s.getsockname())\n"
        "print(c.getsockname()[1], s.getsockname()[1], flush=True)\n"
    )
    out = tmp_path / "spawn.jsonl"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "device_scripts.frida_loader",
            "--out",
            str(out),
            "--spawn",
            sys.executable,
            str(script),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    local_port, server_port = map(int, r.stdout.split())
    ev = one(read_events(out), event="connect", remote={"ip": "127.0.0.1", "port": server_port})
    assert ev["local"] == {"ip": "127.0.0.1", "port": local_port}
    assert "process detached" in r.stderr


def test_loader_cli_attaches_by_pid_and_detaches_on_sigterm(
    can_attach: None, tmp_path: Path
) -> None:
    p = start_target(tmp_path)
    out = tmp_path / "pid.jsonl"
    loader = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "device_scripts.frida_loader",
            "--pid",
            str(p.pid),
            "--out",
            str(out),
        ],
        cwd=REPO,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert loader.stderr is not None
        import select

        ready, _, _ = select.select([loader.stderr], [], [], 60)
        assert ready, "the loader did not attach within 60 s"
        assert "tracing pid" in loader.stderr.readline()
        truth = run_scenario(p)
        time.sleep(0.3)  # one flush period
        loader.send_signal(signal.SIGTERM)
        _, rest = loader.communicate(timeout=40)
        assert loader.returncode == 0, rest
        assert "events written" in rest
        # Detached: the process runs on, untraced and without the agent's threads.
        assert p.poll() is None
        status = Path(f"/proc/{p.pid}/status").read_text()
        assert "TracerPid:\t0" in status
        assert agent_threads(p.pid) == set()
    finally:
        if loader.poll() is None:
            loader.kill()
            loader.wait()
        stop_target(p)
    events = read_events(out)
    tcp4 = next(t for t in truth if t["op"] == "tcp4")
    one(events, event="connect", fd=tcp4["fd"], local=tcp4["local"])


def test_loader_errors_are_one_line_not_tracebacks(tmp_path: Path) -> None:
    with pytest.raises(FridaTracerError):
        FridaTracer(tmp_path / "x.jsonl")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with pytest.raises(FridaTracerError, match="no process"):
        FridaTracer(tmp_path / "x.jsonl", pid=dead.pid).start()
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "device_scripts.frida_loader",
            "--pid",
            str(dead.pid),
            "--out",
            str(tmp_path / "x.jsonl"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 1
    assert r.stderr.startswith("frida_loader: ") and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "device_scripts.frida_loader",
            "--pid",
            "1",
            "--out",
            str(tmp_path / "no" / "dir" / "x.jsonl"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 1 and "cannot write" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "device_scripts.frida_loader",
            "--out",
            str(tmp_path / "x.jsonl"),
            "--spawn",
            str(tmp_path / "no-such-program"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_assign_tracers_never_gives_a_pid_to_both() -> None:
    procs = {100: PKG, 101: f"{PKG}:remote", 102: f"{PKG}:push"}
    assert assign_tracers(procs, PKG, "strace") == TracerAssignment((100, 101, 102), ())
    assert assign_tracers(procs, PKG, "frida") == TracerAssignment((), (100, 101, 102))
    both = assign_tracers(procs, PKG, "both")
    assert both == TracerAssignment(strace=(101, 102), frida=(100,))
    assert not set(both.strace) & set(both.frida)
    assert set(both.strace) | set(both.frida) == set(procs)
    with pytest.raises(FridaTracerError, match="unknown tracer"):
        assign_tracers(procs, PKG, "ltrace")


def test_tracer_both_runs_frida_on_main_and_strace_on_the_rest(
    can_attach: None, tmp_path: Path
) -> None:
    """--tracer both on one package: the launcher in its secondary role and frida on the
    main process, at the same time, each tracing only its own pids."""
    strace = shutil.which("strace")
    if strace is None or os.getuid() != 0:
        pytest.skip("needs root and strace")
    main = start_target(tmp_path, argv0=PKG)
    remote = start_target(tmp_path, argv0=f"{PKG}:remote")
    outdir = tmp_path / "out"
    launcher = subprocess.Popen(
        [
            "busybox",
            "sh",
            str(script_path("strace_launcher.sh")),
            PKG,
            str(outdir),
            strace,
            "0.1",
            "secondary",
        ],
        stderr=subprocess.DEVNULL,
    )
    tracer = FridaTracer(tmp_path / "main.jsonl", pid=main.pid)
    spid = None
    try:
        pids_file = outdir / "strace_launcher.pids"
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            if pids_file.exists() and pids_file.read_text().startswith(f"{remote.pid} "):
                break
            time.sleep(0.05)
        spid = int(pids_file.read_text().split()[1])
        assignment = assign_tracers({main.pid: PKG, remote.pid: f"{PKG}:remote"}, PKG, "both")
        assert assignment.frida == (main.pid,) and assignment.strace == (remote.pid,)
        tracer.start()
        main_truth = run_scenario(main)
        remote_truth = run_scenario(remote)
        tracer.stop()
        (outdir / "strace_launcher.stop").touch()
        assert launcher.wait(timeout=10) == 0
    finally:
        tracer.stop()
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
        if spid is not None and Path(f"/proc/{spid}").exists():
            os.kill(spid, signal.SIGKILL)
        stop_target(main)
        stop_target(remote)
    frida_pids = {e["pid"] for e in read_events(tmp_path / "main.jsonl")}
    assert frida_pids == {main.pid}
    logs = sorted(x.name for x in outdir.glob("strace.*.log"))
    assert logs == [f"strace.{remote.pid}.log"]
    text = (outdir / logs[0]).read_text()
    port = next(t for t in remote_truth if t["op"] == "tcp4")["remote"]["port"]
    assert f"sin_port=htons({port})" in text
    assert next(t for t in main_truth if t["op"] == "tcp4")


def agent_threads(pid: int, settle: float = 3.0) -> set[str]:
    """Names of frida's threads left in a process, after giving them ``settle`` s to end."""
    deadline = time.monotonic() + settle
    while True:
        names = set()
        for t in Path(f"/proc/{pid}/task").iterdir():
            try:
                names.add(Path(t, "comm").read_text().strip())
            except OSError:  # the thread just ended
                continue
        left = {n for n in names if n.startswith(("gum-js", "gmain", "gdbus", "frida", "pool-"))}
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


def test_package_tracer_follows_the_main_process_across_a_restart(
    can_attach: None, tmp_path: Path
) -> None:
    main = start_target(tmp_path, argv0=PKG)
    remote = start_target(tmp_path, argv0=f"{PKG}:remote")
    other = start_target(tmp_path, argv0="org.telegram.messenger")
    outdir = tmp_path / "frida"
    pt = FridaPackageTracer(PKG, outdir, role="main", interval=0.1)
    old = main.pid
    try:
        pt.start()
        assert set(pt.tracers) == {main.pid}  # the first scan runs in start()
        first = run_scenario(main)
        time.sleep(0.2)  # one flush period: SIGKILL gives the agent no chance to flush
        stop_target(main)  # the app dies and is started again with a new pid
        main = start_target(tmp_path, argv0=PKG)
        deadline = time.monotonic() + 10
        while main.pid not in pt.tracers and time.monotonic() < deadline:
            time.sleep(0.05)
        assert set(pt.tracers) == {main.pid}
        second = run_scenario(main)
        pt.stop()
        assert pt.errors == []
        assert agent_threads(main.pid) == set() and agent_threads(remote.pid) == set()
    finally:
        pt.stop()
        for p in (main, remote, other):
            stop_target(p)
    files = sorted(f.name for f in outdir.iterdir())
    assert files == sorted([f"frida.{old}.{PKG}.jsonl", f"frida.{main.pid}.{PKG}.jsonl"])
    for pid, truth in ((old, first), (main.pid, second)):
        events = read_events(outdir / f"frida.{pid}.{PKG}.jsonl")
        tcp4 = next(t for t in truth if t["op"] == "tcp4")
        ev = one(events, event="connect", fd=tcp4["fd"], local=tcp4["local"])
        assert ev["pid"] == pid


def test_loader_cli_follows_a_package_for_a_duration(can_attach: None, tmp_path: Path) -> None:
    main = start_target(tmp_path, argv0=PKG)
    outdir = tmp_path / "cli"
    try:
        loader = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "device_scripts.frida_loader",
                "--package",
                PKG,
                "--out",
                str(outdir),
                "--duration",
                "3",
            ],
            cwd=REPO,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert loader.stderr is not None
        first = loader.stderr.readline()
        assert "following" in first, first + loader.stderr.read()
        deadline = time.monotonic() + 10
        while not list(outdir.glob("frida.*.jsonl")) and time.monotonic() < deadline:
            time.sleep(0.05)
        run_scenario(main)
        _, rest = loader.communicate(timeout=60)  # --duration 3 ends it; never wait forever
        assert loader.returncode == 0, rest
        assert "from 1 processes" in rest
    finally:
        stop_target(main)
    events = read_events(outdir / f"frida.{main.pid}.{PKG}.jsonl")
    assert any(e["event"] == "connect" for e in events)


def test_package_processes_as_frida_server_on_android_names_them() -> None:
    """frida-server on Android names an app's main process after its label and lists the
    package among its applications; the tracer still finds it as the main process."""
    from types import SimpleNamespace

    class AndroidDevice:
        def enumerate_processes(self, scope: str | None = None) -> list[Any]:
            assert scope == "metadata"
            return [
                SimpleNamespace(pid=10, name="Signal", parameters={"applications": [PKG]}),
                SimpleNamespace(pid=11, name=f"{PKG}:remote", parameters={"applications": [PKG]}),
                SimpleNamespace(pid=12, name="Telegram",
                                parameters={"applications": ["org.telegram.messenger"]}),
                SimpleNamespace(pid=13, name=PKG, parameters={}),
                SimpleNamespace(pid=14, name="logcat", parameters={}),
            ]

    pt = FridaPackageTracer(PKG, "/nonexistent", device=AndroidDevice(), accept=lambda p: p != 13)
    procs = pt.processes()
    assert procs == {10: PKG, 11: f"{PKG}:remote"}
    assert assign_tracers(procs, PKG, "both") == TracerAssignment(strace=(11,), frida=(10,))
