"""The phone-side shell scripts, run for real under busybox sh, dash and mksh (Android's
shell) with only busybox or toybox applets on PATH, against this machine's /proc and the
real strace."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from analysis.traces.model import ParseStats
from analysis.traces.netstat import iter_socket_tables
from analysis.traces.strace import iter_socket_observations, process_from_filename
from analysis.traces.tracerhealth import process_health
from device_scripts import script_path
from device_scripts.strace_cache import ABIS, cached_strace, normalize_abi, strace_cache_dir

POLLER = script_path("netstat_poller.sh")
LAUNCHER = script_path("strace_launcher.sh")
BUILD = script_path("build_strace.sh")
STRACE = shutil.which("strace") or "/usr/bin/strace"

# Every applet the scripts may call; PATH holds nothing else, so a GNU-only tool or flag
# fails the test.
APPLETS = ("adjtimex cat date echo grep head kill mkdir mv pidof printf readlink rm sed sleep "
           "xargs").split()
# The socket owner's uid: an Android-style app uid when we may switch to one.
APP_UID = 10123 if os.getuid() == 0 else os.getuid()


@dataclass(frozen=True)
class Shell:
    """A shell and the applet set it runs with."""

    name: str
    argv: tuple[str, ...]
    applets: str  # "busybox" or "toybox"


SHELLS = {
    "busybox": Shell("busybox", ("busybox", "sh"), "busybox"),
    "dash": Shell("dash", ("dash",), "busybox"),
    "mksh-toybox": Shell("mksh-toybox", ("mksh",), "toybox"),
}


def make_applet_dir(tmp: Path, impl: str, *, without: tuple[str, ...] = ()) -> Path:
    """A directory of applet links to busybox or toybox, for use as the only PATH entry."""
    binary = shutil.which(impl)
    if binary is None:
        pytest.skip(f"{impl} is not installed (apt-get install {impl})")
    d = tmp / f"bin-{impl}"
    d.mkdir(exist_ok=True)
    supported = subprocess.run(
        [binary, "--list"] if impl == "busybox" else [binary],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.split()
    for a in APPLETS:
        if a in supported and a not in without and not (d / a).exists():
            (d / a).symlink_to(binary)
    return d


def shell_cmd(shell: Shell) -> list[str]:
    """The shell's argv with an absolute interpreter path, or a skip if it is missing."""
    exe = shutil.which(shell.argv[0])
    if exe is None:
        pytest.skip(f"{shell.argv[0]} is not installed (apt-get install {shell.argv[0]})")
    return [exe, *shell.argv[1:]]


def kill_and_reap(p: subprocess.Popen[bytes] | subprocess.Popen[str] | None) -> None:
    if p is not None and p.poll() is None:
        p.kill()
        p.wait(timeout=5)


# --- netstat poller --------------------------------------------------------------------

ROW = re.compile(
    r"^\s*\d+: [0-9A-F]+:[0-9A-F]{4} [0-9A-F]+:[0-9A-F]{4} [0-9A-F]{2} "
    r"[0-9A-F]{8}:[0-9A-F]{8} [0-9A-F]{2}:[0-9A-F]{8} [0-9A-F]{8}\s+\d+\s+\d+ \d+"
)


@dataclass
class Block:
    ts: float
    table: str
    lines: list[str]


def parse_blocks(text: str) -> list[Block]:
    """Splits a poller log into blocks and checks each is complete and well formed."""
    assert text.endswith("\n"), "log ends in the middle of a line"
    blocks: list[Block] = []
    for line in text.splitlines():
        if line.startswith("=== "):
            _, ts, table = line.split(" ")
            assert table in ("tcp", "tcp6", "udp", "udp6")
            blocks.append(Block(float(ts), table, []))
        else:
            assert blocks, f"content before the first header: {line!r}"
            blocks[-1].lines.append(line)
    for b in blocks:
        assert b.lines and b.lines[0].lstrip().startswith("sl"), f"no table header in {b}"
        for row in b.lines[1:]:
            assert ROW.match(row), f"damaged row in {b.table} block: {row!r}"
            # tcp rows carry 12 fields (TIME_WAIT) or 17, udp rows 13: a cut row has fewer.
            assert len(row.split()) >= (12 if b.table.startswith("tcp") else 13), row
    return blocks


HOLDER = r"""
import os, socket, sys, time
if os.getuid() != int(sys.argv[1]):
    os.setgid(int(sys.argv[1])); os.setuid(int(sys.argv[1]))
srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(4)
cli = socket.socket(); cli.connect(srv.getsockname())
acc, _ = srv.accept()
u6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); u6.bind(("::1", 0))
for s in (srv, cli, u6):
    print(s.getsockname()[1], os.fstat(s.fileno()).st_ino, flush=True)
sys.stdin.read()
"""


@pytest.fixture
def socket_holder() -> Iterator[dict[str, tuple[int, int]]]:
    """A process of uid APP_UID holding a listening, a connected TCP and a UDP6 socket:
    name -> (port, inode)."""
    p = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(APP_UID)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert p.stdout is not None
        rows = [p.stdout.readline().split() for _ in range(3)]
        yield {
            n: (int(r[0]), int(r[1]))
            for n, r in zip(("listen", "client", "udp6"), rows, strict=True)
        }
    finally:
        kill_and_reap(p)


def run_poller(
    shell: Shell, tmp: Path, *args: str, without: tuple[str, ...] = ()
) -> tuple[subprocess.Popen[str], Path]:
    out = tmp / "netstat.log"
    env = {"PATH": str(make_applet_dir(tmp, shell.applets, without=without))}
    p = subprocess.Popen(
        [*shell_cmd(shell), str(POLLER), str(out), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    return p, out


def find_row(blocks: list[Block], table: str, port: int, inode: int) -> list[str] | None:
    for b in blocks:
        if b.table != table:
            continue
        for row in b.lines[1:]:
            f = row.split()
            if f[1].endswith(f":{port:04X}") and f[9] == str(inode):
                return f
    return None


def poll_for(shell: Shell, tmp: Path, seconds: float, interval: str) -> tuple[int, str, Path]:
    """Runs the poller for ``seconds``, then stops it with the stop file: (exit status,
    stderr, log)."""
    p, out = run_poller(shell, tmp, interval)
    try:
        time.sleep(seconds)
        (tmp / "netstat.log.stop").touch()
        _, err = p.communicate(timeout=5)
    finally:
        kill_and_reap(p)
    return p.returncode, err, out


@pytest.mark.parametrize("shell", list(SHELLS.values()), ids=list(SHELLS))
def test_poller_logs_complete_blocks_with_the_socket_rows(
    shell: Shell, tmp_path: Path, socket_holder: dict[str, tuple[int, int]]
) -> None:
    status, err, out = poll_for(shell, tmp_path, 1.0, "0.1")
    assert status == 0, err
    blocks = parse_blocks(out.read_text())
    assert len(blocks) >= 8, f"only {len(blocks)} blocks in 1 s at 0.1 s"
    stamps = [b.ts for b in blocks]
    assert stamps == sorted(stamps), "timestamps go backwards"
    assert abs(stamps[-1] - time.time()) < 5
    rounds = [b.ts for b in blocks if b.table == "tcp"]
    assert all(b > a for a, b in zip(rounds, rounds[1:], strict=False)), "rounds share a timestamp"
    for name, table, state in (
        ("listen", "tcp", "0A"),
        ("client", "tcp", "01"),
        ("udp6", "udp6", "07"),
    ):
        port, inode = socket_holder[name]
        row = find_row(blocks, table, port, inode)
        assert row is not None, (
            f"{name} socket (port {port}, inode {inode}) not in any {table} block"
        )
        assert row[3] == state
        assert row[7] == str(APP_UID), f"uid column of {name}: {row[7]}"

    # The analysis parser reads the same log without skipping a line.
    stats = ParseStats()
    rows = list(iter_socket_tables(out, stats))
    assert stats.n_skipped == 0, stats.skipped
    port, inode = socket_holder["client"]
    mine = [r for r in rows if r.inode == inode]
    assert mine and {(r.table, r.local_port, r.uid) for r in mine} == {("tcp", port, APP_UID)}


# One exec argument may be at most MAX_ARG_STRLEN (32 pages) long.
EXEC_ARG_MAX = 32 * 4096


@pytest.mark.parametrize("shell", list(SHELLS.values()), ids=list(SHELLS))
def test_poller_writes_a_table_larger_than_one_exec_argument(shell: Shell, tmp_path: Path) -> None:
    """A busy machine's tcp table (here: listening sockets of this process) passes
    MAX_ARG_STRLEN; its blocks are written all the same (the shell's own print/printf,
    not an exec'd printf, which fails with E2BIG and loses the block)."""
    socks: list[socket.socket] = []

    def table_size() -> int:
        with open("/proc/net/tcp") as f:
            return len(f.read())

    try:
        # Other sockets come and go: add rows (~150 bytes each) until a margin is reached.
        while table_size() < EXEC_ARG_MAX + 64 * 1024 and len(socks) < 5000:
            for _ in range(100):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", 0))
                s.listen(1)
        assert table_size() > EXEC_ARG_MAX, "could not make the tcp table large enough"
        status, err, out = poll_for(shell, tmp_path, 0.5, "0.05")
        assert status == 0, err
        blocks = parse_blocks(out.read_text())
        tcp = [b for b in blocks if b.table == "tcp"]
        assert tcp and len(tcp) == len([b for b in blocks if b.table == "udp"]), err
        port = socks[-1].getsockname()[1]
        inode = os.fstat(socks[-1].fileno()).st_ino
        assert find_row(tcp, "tcp", port, inode) is not None
    finally:
        for s in socks:
            s.close()


@pytest.mark.parametrize("shell", list(SHELLS.values()), ids=list(SHELLS))
def test_poller_stops_when_a_block_cannot_be_written(shell: Shell, tmp_path: Path) -> None:
    """A failed write (here: ENOSPC from /dev/full) ends the poller with exit 2."""
    env = {"PATH": str(make_applet_dir(tmp_path, shell.applets))}
    r = subprocess.run(
        [*shell_cmd(shell), str(POLLER), "/dev/full", "0.05", "1000000", str(tmp_path / "stop")],
        env=env,
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert r.returncode == 2, r.stderr
    assert "writing a tcp block to /dev/full failed" in r.stderr


def test_poller_on_a_lab_phone_stamps_the_phone_clock(tmp_path: Path) -> None:
    """Through a lab phone's shell (dash, the toolbox's date, libfaketime when installed)
    every block carries the phone's clock: the host's plus the phone's offset."""
    from controller.lab.toolbox import Toolbox, samsung_s21

    offset = 2.375
    tb = Toolbox(samsung_s21(clock_offset_s=offset), tmp_path / "phone", use_mount_namespace=False)
    tb.prepare()
    out, stop = tmp_path / "netstat.log", tmp_path / "stop"
    command = f"sh {POLLER} {out} 0.05 67108864 {stop}"
    start = time.time()
    p = subprocess.Popen(
        tb.argv(command),
        env=tb.environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(1.0)
        stop.touch()
        _, err = p.communicate(timeout=10)
    finally:
        kill_and_reap(p)
    end = time.time()
    assert p.returncode == 0, err
    assert "clock: date +%s.%N" in err
    blocks = parse_blocks(out.read_text())
    assert blocks, err
    for b in blocks:  # taken while the poller ran, on a clock `offset` ahead of the host's
        assert start - 0.5 < b.ts - offset < end + 0.5, (b.ts - start, offset)


def test_poller_under_busybox_without_nanoseconds_uses_adjtimex_then_seconds(
    tmp_path: Path,
) -> None:
    dash = SHELLS["dash"]  # dash has no EPOCHREALTIME; busybox date has no %N
    if (
        "%N"
        not in subprocess.run(
            ["busybox", "date", "+%N"], capture_output=True, text=True, check=False
        ).stdout
    ):
        pytest.skip("this busybox date supports %N: the fallback is not reachable")
    for without, clock, decimals in (((), "adjtimex", 6), (("adjtimex",), "whole seconds", 1)):
        work = tmp_path / clock.replace(" ", "_")
        work.mkdir()
        p, out = run_poller(dash, work, "0.1", without=without)
        try:
            time.sleep(0.5)
            p.send_signal(signal.SIGTERM)
            _, err = p.communicate(timeout=5)
        finally:
            kill_and_reap(p)
        assert p.returncode == 0, err
        assert clock in err
        blocks = parse_blocks(out.read_text())
        assert blocks
        for b in blocks:
            text = repr(b.ts)
            assert abs(b.ts - time.time()) < 5, text
        header = out.read_text().splitlines()[0]
        assert re.fullmatch(rf"=== \d+\.\d{{{decimals}}} tcp", header), header


@pytest.mark.parametrize("how", ["sigterm", "sigint"])
def test_poller_stops_on_signal_after_a_complete_block(how: str, tmp_path: Path) -> None:
    p, out = run_poller(SHELLS["busybox"], tmp_path, "0.05")
    try:
        time.sleep(0.6)
        p.send_signal(signal.SIGTERM if how == "sigterm" else signal.SIGINT)
        _, err = p.communicate(timeout=5)
    finally:
        kill_and_reap(p)
    assert p.returncode == 0, err
    assert "stopped after" in err
    assert parse_blocks(out.read_text())


def test_poller_size_bound_holds_and_never_cuts_a_block(tmp_path: Path) -> None:
    probe, probe_out = run_poller(SHELLS["dash"], tmp_path, "0.05")
    time.sleep(0.3)
    probe.send_signal(signal.SIGTERM)
    probe.communicate(timeout=5)
    one_round = len(probe_out.read_text()) // max(1, len(parse_blocks(probe_out.read_text())) // 4)
    limit = int(one_round * 2.5)  # two rounds and a half: the third round cannot fit
    p, out = run_poller(SHELLS["dash"], tmp_path, "0.05", str(limit))
    try:
        _, err = p.communicate(timeout=10)
    finally:
        kill_and_reap(p)
    assert p.returncode == 3, err
    assert "size limit" in err
    size = out.stat().st_size
    assert 0 < size <= limit
    blocks = parse_blocks(out.read_text())
    assert len(blocks) >= 4, "stopped before one round although one round fits"
    # It stopped because the next block did not fit, not earlier: the room left is less
    # than a block (tables change size a little between rounds, hence the margin).
    largest = max(len(b.ts.__repr__()) + 12 + sum(len(x) + 1 for x in b.lines) for b in blocks)
    assert limit - size < 2 * largest


def test_poller_rejects_bad_arguments(tmp_path: Path) -> None:
    sh = shell_cmd(SHELLS["busybox"])
    for args in ([], [str(tmp_path / "x"), "fast"], [str(tmp_path / "x"), "0.1", "-5"]):
        r = subprocess.run([*sh, str(POLLER), *args], capture_output=True, text=True, timeout=10)
        assert r.returncode == 2, (args, r.stderr)
        assert r.stderr.strip() and "Traceback" not in r.stderr
    r = subprocess.run(
        [*sh, str(POLLER), str(tmp_path / "no" / "such" / "dir" / "log")],
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert r.returncode == 2 and "cannot write" in r.stderr


# --- strace launcher ---------------------------------------------------------------------

# Package-like (dots, longer than the 15-character comm) and unique to this test run, so
# that neither these tests nor concurrent ones trace each other's fake apps.
PKG = f"org.flowtruth.fakeapp{os.getpid()}"

APP = r"""
import ctypes, os, socket, sys, time
# Android's zygote: argv[0] is the process name (set by exec here), comm its last 15 chars.
ctypes.CDLL(None).prctl(15, sys.argv[1][-15:].encode(), 0, 0, 0)
port = int(sys.argv[2])
while True:
    try:
        s = socket.create_connection(("127.0.0.1", port)); s.sendall(b"x"); s.close()
    except OSError:
        pass
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.sendto(b"y", ("127.0.0.1", port)); u.close()
    time.sleep(0.1)
"""


class LocalServer:
    """A loopback TCP server that accepts and drops connections, in a thread."""

    def __init__(self) -> None:
        import threading

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                c, _ = self.sock.accept()
                c.close()
            except OSError:
                continue

    def close(self) -> None:
        self._stop.set()
        self._t.join(timeout=2)
        self.sock.close()


@pytest.fixture
def server() -> Iterator[LocalServer]:
    s = LocalServer()
    yield s
    s.close()


def start_app(tmp: Path, name: str, port: int) -> subprocess.Popen[bytes]:
    """Runs the fake app with argv[0] = name (what `exec -a name python3 app.py` does)."""
    script = tmp / "app.py"
    script.write_text(APP)
    return subprocess.Popen(
        [name, str(script), name, str(port)], executable=sys.executable, stdin=subprocess.DEVNULL
    )


def traced_pids(outdir: Path) -> dict[int, int]:
    f = outdir / "strace_launcher.pids"
    if not f.exists():
        return {}
    out = {}
    for line in f.read_text().splitlines():
        pid, spid, _name = line.split(" ", 2)
        out[int(pid)] = int(spid)
    return out


def wait_for(cond, timeout: float = 8.0, what: str = "condition") -> None:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def tracer_pid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("TracerPid:"):
            return int(line.split()[1])
    return 0


def log_of(outdir: Path, pid: int) -> Path:
    logs = list(outdir.glob(f"strace.{pid}.log"))
    assert len(logs) == 1, logs
    return logs[0]


def procs_of(outdir: Path) -> dict[int, str]:
    """strace_launcher.procs: every process the launcher tried, with its safe name."""
    f = outdir / "strace_launcher.procs"
    out = {}
    for line in (f.read_text().splitlines() if f.exists() else []):
        pid, name = line.split(" ", 1)
        out[int(pid)] = name
    return out


def has_connect(outdir: Path, pid: int, port: int) -> bool:
    logs = list(outdir.glob(f"strace.{pid}.log"))
    return bool(logs) and f"sin_port=htons({port})" in logs[0].read_text()


def require_ptrace() -> None:
    if os.getuid() != 0:
        pytest.skip("strace -p needs root (or ptrace rights) here")
    if not os.access(STRACE, os.X_OK):
        pytest.skip("strace is not installed (apt-get install strace)")


def start_launcher(shell: Shell, tmp: Path, outdir: Path, *extra: str) -> subprocess.Popen[str]:
    env = {"PATH": str(make_applet_dir(tmp, shell.applets))}
    return subprocess.Popen(
        [*shell_cmd(shell), str(LAUNCHER), PKG, str(outdir), STRACE, "0.2", *extra],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.parametrize(
    ("shell", "stop"),
    [
        (SHELLS["busybox"], "stopfile"),
        (SHELLS["mksh-toybox"], "sigterm"),
        (SHELLS["dash"], "sigint"),
    ],
    ids=["busybox-stopfile", "mksh-toybox-sigterm", "dash-sigint"],
)
def test_launcher_traces_every_process_and_follows_an_app_restart(
    shell: Shell, stop: str, tmp_path: Path, server: LocalServer
) -> None:
    require_ptrace()
    outdir = tmp_path / "out"
    main = start_app(tmp_path, PKG, server.port)
    remote = start_app(tmp_path, f"{PKG}:remote", server.port)
    other = start_app(tmp_path, "org.telegram.messenger", server.port)  # not ours
    launcher: subprocess.Popen[str] | None = None
    spids: set[int] = set()
    try:
        launcher = start_launcher(shell, tmp_path, outdir)
        wait_for(lambda: {main.pid, remote.pid} <= set(traced_pids(outdir)), what="both traced")
        spids |= set(traced_pids(outdir).values())
        wait_for(lambda: has_connect(outdir, main.pid, server.port), what="main's connect")
        wait_for(lambda: has_connect(outdir, remote.pid, server.port), what="remote's connect")
        assert other.pid not in traced_pids(outdir)
        assert tracer_pid(main.pid) in spids

        # App restart: the old process dies, a new one with a new pid takes its place.
        old = main.pid
        kill_and_reap(main)
        main = start_app(tmp_path, PKG, server.port)
        wait_for(lambda: main.pid in traced_pids(outdir), what="restarted app traced")
        wait_for(lambda: old not in traced_pids(outdir), what="dead pid forgotten")
        spids |= set(traced_pids(outdir).values())
        wait_for(lambda: has_connect(outdir, main.pid, server.port), what="new pid's connect")

        if stop == "stopfile":
            (outdir / "strace_launcher.stop").touch()
        else:
            launcher.send_signal(signal.SIGTERM if stop == "sigterm" else signal.SIGINT)
        _, err = launcher.communicate(timeout=10)
        assert launcher.returncode == 0, err
        assert "stopped" in err
    finally:
        kill_and_reap(launcher)
        for sp in spids:  # never leave a stracer behind, even when an assertion failed
            try:
                os.kill(sp, signal.SIGKILL)
            except ProcessLookupError:
                pass
        live = {p.pid for p in (main, remote) if p.poll() is None}
        tracers = {p: tracer_pid(p) for p in live}
        for p in (main, remote, other):
            kill_and_reap(p)

    # Every stracer exited and detached: the apps ran on untraced.
    assert tracers == {p: 0 for p in live}
    for sp in spids:
        assert not Path(f"/proc/{sp}").exists(), f"strace {sp} still running"
    assert traced_pids(outdir) == {}

    # One log per process, named after its pid (never its name; strace's own stderr
    # beside it), with -yy decorations and -ttt stamps; the names are in the procs file.
    names = sorted(p.name for p in outdir.glob("strace.*.log"))
    assert len(names) == 3, names
    assert f"strace.{old}.log" in names and f"strace.{remote.pid}.log" in names
    assert procs_of(outdir) == {old: PKG, remote.pid: f"{PKG}:remote", main.pid: PKG}
    assert (outdir / f"strace.{old}.err").exists()
    text = log_of(outdir, main.pid).read_text()
    connect = re.compile(
        rf"^{main.pid}\s+\d{{10}}\.\d{{6}} connect\((\d+)<TCP:\[\d+\]>, "
        rf"\{{sa_family=AF_INET, sin_port=htons\({server.port}\), "
        r'sin_addr=inet_addr\("127\.0\.0\.1"\)\}, 16\) = 0$',
        re.M,
    )
    assert connect.search(text), text[:2000]
    assert re.search(rf"<TCP:\[127\.0\.0\.1:\d+->127\.0\.0\.1:{server.port}\]>", text), (
        "no -yy socket decoration with both addresses"
    )
    assert re.search(r"close\(\d+<UDP:\[", text), "no close of a UDP socket"
    assert "read(" not in text and "mmap(" not in text, "syscall filter not applied"

    # The analysis parser reads the logs: names give pid and process, connects their ports.
    log = log_of(outdir, remote.pid)
    named = log.with_name(f"strace.{remote.pid}.{procs_of(outdir)[remote.pid]}.log")
    log.rename(named)  # what the controller does with the pulled log
    log = named
    assert process_from_filename(log) == (remote.pid, f"{PKG}:remote")
    stats = ParseStats()
    obs = list(iter_socket_observations(log, stats=stats))
    assert any(o.kind == "connect" and o.remote_port == server.port for o in obs)
    # A call under way when strace detached ends the log as "... <detached ...>"; the
    # parser may count that one line as damaged. Nothing else may be.
    detached = sum(1 for x in log.read_text().splitlines() if x.endswith("<detached ...>"))
    assert stats.n_skipped <= detached, (stats.skipped, log.read_text().splitlines()[-4:])


def test_launcher_secondary_role_and_exclude_file_leave_pids_untraced(
    tmp_path: Path, server: LocalServer
) -> None:
    require_ptrace()
    outdir = tmp_path / "out"
    outdir.mkdir()
    main = start_app(tmp_path, PKG, server.port)
    remote = start_app(tmp_path, f"{PKG}:remote", server.port)
    push = start_app(tmp_path, f"{PKG}:push", server.port)
    (outdir / "strace.exclude").write_text(f"{push.pid}\n")
    launcher = None
    try:
        launcher = start_launcher(SHELLS["busybox"], tmp_path, outdir, "secondary")
        wait_for(lambda: remote.pid in traced_pids(outdir), what="secondary traced")
        time.sleep(0.6)  # a few more scans
        traced = traced_pids(outdir)
        assert set(traced) == {remote.pid}
        assert tracer_pid(main.pid) == 0 and tracer_pid(push.pid) == 0
        launcher.send_signal(signal.SIGINT)
        _, err = launcher.communicate(timeout=10)
        assert launcher.returncode == 0, err
        assert tracer_pid(remote.pid) == 0
    finally:
        kill_and_reap(launcher)
        for sp in traced_pids(outdir).values():
            try:
                os.kill(sp, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for p in (main, remote, push):
            kill_and_reap(p)


def test_launcher_rejects_bad_arguments(tmp_path: Path) -> None:
    sh = shell_cmd(SHELLS["busybox"])
    cases = [
        [],
        [PKG, str(tmp_path)],
        ["org.x; rm -rf /", str(tmp_path), STRACE],
        [PKG, str(tmp_path), str(tmp_path / "no-strace")],
        [PKG, str(tmp_path), STRACE, "often"],
        [PKG, str(tmp_path), STRACE, "0.5", "everything"],
    ]
    for args in cases:
        r = subprocess.run([*sh, str(LAUNCHER), *args], capture_output=True, text=True, timeout=10)
        assert r.returncode == 2, (args, r.stderr)
        assert r.stderr.strip() and "Traceback" not in r.stderr


# --- static strace -------------------------------------------------------------------------


def qemu_for(abi: str) -> str | None:
    q = "qemu-aarch64" if abi == "arm64-v8a" else "qemu-arm"
    return shutil.which(q) or shutil.which(f"{q}-static")


def test_build_script_parses_and_cached_binaries_run_under_qemu() -> None:
    for sh in ("sh", "dash", "busybox"):
        exe = shutil.which(sh)
        if exe is None:
            continue
        argv = [exe, "sh", "-n", str(BUILD)] if sh == "busybox" else [exe, "-n", str(BUILD)]
        r = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        assert r.returncode == 0, (sh, r.stderr)
    r = subprocess.run(["sh", str(BUILD), "mips"], capture_output=True, text=True, timeout=10)
    assert r.returncode == 2 and "unknown ABI" in r.stderr
    assert normalize_abi("aarch64") == "arm64-v8a" and normalize_abi("armhf") == "armeabi-v7a"
    assert normalize_abi("x86_64") is None
    ran = 0
    for abi in ABIS:
        binary = cached_strace(abi)
        qemu = qemu_for(abi)
        if binary is None or qemu is None:
            continue
        r = subprocess.run([qemu, str(binary), "-V"], capture_output=True, text=True, timeout=30)
        assert r.returncode == 0 and "strace -- version" in r.stdout, r.stdout + r.stderr
        ran += 1
    if not ran:
        pytest.skip(
            f"no cached static strace in {strace_cache_dir()} (or no qemu-user): "
            "run device_scripts/build_strace.sh"
        )


def has_interpreter(elf: bytes) -> bool:
    """Whether an ELF file has a PT_INTERP program header (is dynamically linked)."""
    import struct

    is64 = elf[4] == 2
    if is64:
        (phoff,) = struct.unpack_from("<Q", elf, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    else:
        (phoff,) = struct.unpack_from("<I", elf, 0x1C)
        phentsize, phnum = struct.unpack_from("<HH", elf, 0x2A)
    return any(struct.unpack_from("<I", elf, phoff + i * phentsize)[0] == 3 for i in range(phnum))


def test_has_interpreter_tells_static_from_dynamic() -> None:
    assert has_interpreter(Path(sys.executable).resolve().read_bytes())
    for abi in ABIS:
        binary = cached_strace(abi)
        if binary is not None:
            assert not has_interpreter(binary.read_bytes())


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.skipif(
    os.environ.get("FLOWTRUTH_BUILD_STRACE") != "1",
    reason="cross-builds strace for several minutes; set FLOWTRUTH_BUILD_STRACE=1",
)
def test_build_strace_produces_verified_static_binaries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole recipe from Debian's source package, into a fresh cache (about 5 min)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    r = subprocess.run(["sh", str(BUILD)], capture_output=True, text=True, timeout=3500, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "m32 mpers" in r.stderr  # the aarch64 build says whether it has the decoder
    paths = [Path(line) for line in r.stdout.splitlines()]
    assert [p.parent.name for p in paths] == list(ABIS)
    for p, abi in zip(paths, ABIS, strict=True):
        digest = (p.parent / "strace.sha256").read_text().split()[0]
        assert digest == hashlib.sha256(p.read_bytes()).hexdigest()
        assert cached_strace(abi) == p
        qemu = qemu_for(abi)
        assert qemu is not None
        v = subprocess.run([qemu, str(p), "-V"], capture_output=True, text=True, timeout=30)
        assert "strace -- version 6.1" in v.stdout
        elf = p.read_bytes()[:20]
        assert elf[:4] == b"\x7fELF"
        assert elf[4] == (2 if abi == "arm64-v8a" else 1)  # 64- or 32-bit
    # Static: no program interpreter, so it runs on Android's bionic-only userland.
    for p in paths:
        assert not has_interpreter(p.read_bytes()), p
    # The build directory (a temporary one) is gone.
    assert not list(tmp_path.glob("flowtruth-strace.*"))


def test_launcher_gives_up_on_a_process_it_cannot_attach_to(
    tmp_path: Path, server: LocalServer
) -> None:
    """A process already under ptrace (here another strace) cannot be attached: the
    launcher retries three times, says so once, and goes on without it."""
    require_ptrace()
    outdir = tmp_path / "out"
    app = start_app(tmp_path, PKG, server.port)
    holder = subprocess.Popen(
        [STRACE, "-qq", "-e", "trace=none", "-p", str(app.pid)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    launcher = None
    try:
        wait_for(lambda: tracer_pid(app.pid) == holder.pid, what="first strace attached")
        launcher = start_launcher(SHELLS["busybox"], tmp_path, outdir)
        time.sleep(2.0)  # ten scans at 0.2 s
        assert traced_pids(outdir) == {}
        (outdir / "strace_launcher.stop").touch()
        _, err = launcher.communicate(timeout=10)
        assert launcher.returncode == 0, err
        assert err.count("giving up") == 1, err
        assert err.count(f"tracing {app.pid} ") == 3, err
        # strace's own words for each attempt, read back as a refused ptrace
        own = (outdir / f"strace.{app.pid}.err").read_text()
        assert own.count(f"attach: ptrace(PTRACE_SEIZE, {app.pid}): Operation not permitted") == 3
        h = process_health(app.pid, PKG, stderr=own, launcher_log=err,
                           trace=log_of(outdir, app.pid).read_text())
        assert (h.status, h.cause) == ("denied", "ptrace"), h
    finally:
        kill_and_reap(launcher)
        holder.terminate()
        holder.wait(timeout=5)
        kill_and_reap(app)


@pytest.mark.parametrize("shell", list(SHELLS.values()), ids=list(SHELLS))
def test_launcher_traces_processes_with_hostile_names(
    shell: Shell, tmp_path: Path, server: LocalServer
) -> None:
    """A 300-character process name (longer than a file name may be) and one holding a
    newline are traced like any other: logs are named by pid, names are made safe."""
    require_ptrace()
    outdir = tmp_path / "out"
    long_name = f"{PKG}:" + "x" * 300
    nl_name = f"{PKG}:evil\nname $(touch {tmp_path}/pwned)"
    apps = [start_app(tmp_path, long_name, server.port), start_app(tmp_path, nl_name, server.port)]
    launcher = None
    spids: set[int] = set()
    try:
        launcher = start_launcher(shell, tmp_path, outdir)
        for a in apps:
            wait_for(lambda a=a: has_connect(outdir, a.pid, server.port), what=f"{a.pid} traced")
        spids |= set(traced_pids(outdir).values())
        (outdir / "strace_launcher.stop").touch()
        _, err = launcher.communicate(timeout=10)
        assert launcher.returncode == 0, err
    finally:
        kill_and_reap(launcher)
        for sp in spids:
            try:
                os.kill(sp, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for a in apps:
            kill_and_reap(a)
    procs = procs_of(outdir)
    assert procs[apps[0].pid] == f"{PKG}:" + "x" * (100 - len(PKG) - 1)
    assert procs[apps[1].pid] == f"{PKG}:evil_name"  # argv[0] up to its first blank
    assert "giving up" not in err and not (tmp_path / "pwned").exists()
    assert sorted(p.name for p in outdir.glob("strace.*.log")) == sorted(
        f"strace.{a.pid}.log" for a in apps)
    for a in apps:
        assert process_health(a.pid, procs[a.pid], trace=log_of(outdir, a.pid).read_text(),
                              stderr=(outdir / f"strace.{a.pid}.err").read_text()
                              ).status == "attached"


def test_launcher_leaves_processes_of_another_network_namespace_alone(
    tmp_path: Path, server: LocalServer
) -> None:
    """Where phones are network namespaces of one host (the virtual lab), a launcher on one
    phone must not trace the same package running on another (a phone has one namespace)."""
    require_ptrace()
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("unshare is not installed")
    outdir = tmp_path / "out"
    app = start_app(tmp_path, f"{PKG}:remote", server.port)
    env = {"PATH": str(make_applet_dir(tmp_path, "busybox"))}
    launcher = subprocess.Popen(
        [unshare, "-n", *shell_cmd(SHELLS["busybox"]), str(LAUNCHER), PKG, str(outdir), STRACE,
         "0.2"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.5)  # several scans
        (outdir / "strace_launcher.stop").touch()
        _, err = launcher.communicate(timeout=10)
        assert launcher.returncode == 0, err
        assert "tracing" not in err and tracer_pid(app.pid) == 0
        assert procs_of(outdir) == {}
    finally:
        kill_and_reap(launcher)
        kill_and_reap(app)
