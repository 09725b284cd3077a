"""Start, watch, restart and stop the AP daemons (hostapd, dnsmasq, tcpdump).

Daemons run in the foreground of their own session with output in a log file, so
they outlive ``flowtruth ap up`` and are found again by pid plus start time.

A :class:`Supervisor` notices that hostapd or dnsmasq exited, logs why (exit status and
the tail of its log), restarts it after a growing back-off and gives up after too many
restarts in a window; every restart is recorded in the state file. It runs as a thread
(``Supervisor(...).start()``, e.g. in the session engine), in the foreground
(``flowtruth ap up --foreground``) or as a detached process of its own
(:func:`start_supervisor_process`, what ``flowtruth ap up`` leaves running). It takes the
state file's lock around each restart and ends as soon as ``ap down`` has marked the AP
as stopping, so it never resurrects what a teardown stops.

    sup = Supervisor(cfg.state_path, policy=cfg.supervision, sink=print).start()
    ...
    ap_down(cfg.state_path)   # stops the supervisor first
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from ap_setup.config import SupervisionConfig
from ap_setup.runner import Process, Runner, SubprocessRunner
from ap_setup.state import (
    ApState,
    DaemonHealth,
    LaunchRecord,
    ProcessRecord,
    RestartRecord,
    SupervisorRecord,
    state_lock,
)
from controller.errors import ApError

SUPERVISED = ("hostapd", "dnsmasq")
"""The daemons a supervisor restarts (a capture is not restarted: it would overwrite files)."""
HISTORY = 20

# Children started by this Python process, reaped on stop so no zombies remain.
_CHILDREN: dict[int, Process] = {}


def proc_starttime(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (start time in clock ticks), None if gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def is_alive(rec: ProcessRecord) -> bool:
    """True while the recorded process runs (a recycled pid does not count)."""
    child = _CHILDREN.get(rec.pid)
    if child is not None and child.poll() is not None:
        return False
    return pid_alive(rec.pid, rec.starttime)


def start_daemon(
    runner: Runner,
    name: str,
    argv: Sequence[str],
    log: Path,
    *,
    settle: float = 0.5,
) -> ProcessRecord:
    """Spawn ``argv`` with output in ``log``; fail with the log tail if it dies at once."""
    proc = runner.spawn(argv, log=log)
    _CHILDREN[proc.pid] = proc
    rec = ProcessRecord(
        name=name, pid=proc.pid, starttime=proc_starttime(proc.pid), argv=list(argv), log=str(log)
    )
    deadline = time.monotonic() + settle
    while time.monotonic() < deadline:
        code = proc.poll()
        if code is not None:
            _CHILDREN.pop(proc.pid, None)
            raise ApError(
                f"{name} exited with status {code} right after start: {log_tail(log)}",
                hint=f"full log: {log}",
            )
        time.sleep(0.05)
    return rec


def stop_daemon(rec: ProcessRecord, sig: int = signal.SIGTERM, timeout: float = 5.0) -> bool:
    """Signal the process and wait for it to end (SIGKILL after ``timeout``); True if it ran."""
    if not is_alive(rec):
        _reap(rec.pid)
        return False
    try:
        os.kill(rec.pid, sig)
    except ProcessLookupError:
        _reap(rec.pid)
        return False
    if not _wait_gone(rec, timeout):
        try:
            os.kill(rec.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        _wait_gone(rec, 2.0)
    _reap(rec.pid)
    return True


def proc_cmdline(pid: int) -> list[str] | None:
    """The command line of process ``pid`` (None when it is gone or unreadable)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return raw.decode(errors="surrogateescape").split("\0")[:-1] if raw else []


def runs_argv(cmdline: Sequence[str] | None, argv: Sequence[str]) -> bool:
    """True when ``cmdline`` is ``argv``, or ``ip netns exec NS argv`` before its exec."""
    if not cmdline or not argv:
        return False
    argv = list(argv)
    cmd = list(cmdline)
    if cmd == argv:
        return True
    return len(cmd) == len(argv) + 4 and cmd[:3] == ["ip", "netns", "exec"] and cmd[4:] == argv


def _netns_id(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def netns_id(netns: str | None) -> tuple[int, int] | None:
    """Identity of a named network namespace (None: ours); None when it cannot be found."""
    return _netns_id(f"/run/netns/{netns}" if netns else "/proc/self/ns/net")


def find_processes(
    argv: Sequence[str], pid_file: str | Path | None = None, netns: str | None = None
) -> list[int]:
    """Pids of the processes running exactly ``argv`` (checked in ``/proc/PID/cmdline``)
    in namespace ``netns`` (when that namespace can still be found by its name).

    ``pid_file`` (a daemon's own pid file) is looked at first; every candidate, also one
    from the pid file, must run ``argv``, so a stale file whose pid now belongs to another
    program never matches. Our argv lists name files in the AP's own directories, so a
    match is the AP's daemon and nobody else's.
    """
    want_ns = netns_id(netns)
    found: list[int] = []
    candidates: list[int] = []
    if pid_file is not None:
        try:
            text = Path(pid_file).read_text().strip()
        except OSError:
            text = ""
        if text.isdigit() and len(text) < 12:
            candidates.append(int(text))
    try:
        candidates += sorted(int(d) for d in os.listdir("/proc") if d.isdigit())
    except OSError:
        pass
    me = os.getpid()
    for pid in candidates:
        if pid == me or pid in found:
            continue
        if not runs_argv(proc_cmdline(pid), argv) or proc_starttime(pid) is None:
            continue
        if want_ns is not None and _netns_id(f"/proc/{pid}/ns/net") != want_ns:
            continue  # the same command line in another namespace is not ours
        found.append(pid)
    return found


def stop_orphans(
    launch: LaunchRecord,
    keep: Sequence[int] = (),
    sig: int = signal.SIGTERM,
    netns: str | None = None,
) -> list[int]:
    """Stop every process running ``launch.argv`` except the pids in ``keep``; their pids.

    A process is signalled only while its pid still has the start time it had when it was
    found running the argv, so a pid reused in between is left alone.
    """
    stopped = []
    for pid in find_processes(launch.argv, launch.pid_file, netns):
        if pid in keep:
            continue
        rec = ProcessRecord(name=launch.name, pid=pid, starttime=proc_starttime(pid),
                            argv=list(launch.argv), log="")  # fmt: skip
        if rec.starttime is not None and runs_argv(proc_cmdline(pid), launch.argv):
            stop_daemon(rec, sig=sig)
            stopped.append(pid)
    return stopped


def _wait_gone(rec: ProcessRecord, timeout: float) -> bool:
    child = _CHILDREN.get(rec.pid)
    if child is not None:
        try:
            child.wait(timeout=timeout)
            return True
        except Exception:  # subprocess.TimeoutExpired
            return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not is_alive(rec):
            return True
        time.sleep(0.05)
    return not is_alive(rec)


def _reap(pid: int) -> None:
    child = _CHILDREN.pop(pid, None)
    if child is not None:
        try:
            child.wait(timeout=2)
        except Exception:
            pass


def log_tail(path: Path, lines: int = 3) -> str:
    """The last non-empty lines of a log, joined with ' | '."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return "(no log)"
    tail = [ln.strip() for ln in text.splitlines() if ln.strip()][-lines:]
    return " | ".join(tail) or "(empty log)"


def pid_alive(pid: int, starttime: int | None) -> bool:
    """True while process ``pid`` runs and is the one that had ``starttime``."""
    start = proc_starttime(pid)
    return start is not None and (starttime is None or start == starttime)


def exit_reason(rec: ProcessRecord) -> str:
    """How a daemon that is no longer running ended, with the last lines of its log."""
    child = _CHILDREN.pop(rec.pid, None)
    code = child.poll() if child is not None else None
    if code is None:  # not our child: only its parent learns the status
        how = "is no longer running (exit status unknown)"
    elif code < 0:
        try:
            how = f"killed by {signal.Signals(-code).name}"
        except ValueError:
            how = f"killed by signal {-code}"
    else:
        how = f"exited with status {code}"
    return f"{how}; last log lines: {log_tail(Path(rec.log))}"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# ---- events


@dataclass(frozen=True)
class DaemonExited:
    """A supervised daemon was found not running."""

    name: str
    pid: int
    reason: str


@dataclass(frozen=True)
class DaemonRestarted:
    """A daemon was started again in place of one that had exited."""

    name: str
    pid: int
    restarts: int


@dataclass(frozen=True)
class DaemonRestartFailed:
    """A restart attempt failed (the daemon exited again at once)."""

    name: str
    reason: str


@dataclass(frozen=True)
class DaemonGaveUp:
    """Too many restarts in the window: the supervisor leaves this daemon alone."""

    name: str
    message: str


@dataclass(frozen=True)
class SupervisorStopped:
    """The supervisor ended."""

    reason: str


SupervisorEvent = (
    DaemonExited | DaemonRestarted | DaemonRestartFailed | DaemonGaveUp | SupervisorStopped
)
SupervisorSink = Callable[[SupervisorEvent], None]


def describe(event: SupervisorEvent) -> str:
    """One line for a log or a terminal."""
    if isinstance(event, DaemonExited):
        return f"{event.name} (pid {event.pid}) {event.reason}"
    if isinstance(event, DaemonRestarted):
        return f"{event.name} restarted as pid {event.pid} (restart {event.restarts})"
    if isinstance(event, DaemonRestartFailed):
        return f"{event.name} restart failed: {event.reason}"
    if isinstance(event, DaemonGaveUp):
        return event.message
    return f"supervisor stopped: {event.reason}"


def _quiet_events(_event: SupervisorEvent) -> None:
    pass


# Supervisor threads of this process, by state file, so ap_down can stop them.
_RUNNING: dict[str, Supervisor] = {}


def _key(state_path: Path) -> str:
    return str(Path(state_path).absolute())


class Supervisor:
    """Restarts hostapd and dnsmasq of one AP (found through its state file) when they exit."""

    def __init__(
        self,
        state_path: Path,
        runner: Runner | None = None,
        *,
        policy: SupervisionConfig | None = None,
        sink: SupervisorSink = _quiet_events,
        kind: Literal["thread", "foreground", "process"] = "thread",
    ) -> None:
        self.state_path = Path(state_path)
        self.policy = policy or SupervisionConfig()
        self.kind = kind
        self.record: SupervisorRecord | None = None
        self.ended: str | None = None
        """Why :meth:`run` returned (None while running)."""
        self.gave_up: list[str] = []
        """The one-line reason for each daemon given up."""
        self._runner = runner
        self._sink = sink
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._attempts: dict[str, list[float]] = {}
        self._due: dict[str, tuple[float, str]] = {}
        self._given_up: set[str] = set()
        self._log: Path | None = None

    # -- running

    def start(self) -> Supervisor:
        """Register in the state file, then supervise in a daemon thread until stopped."""
        self._register()
        self._thread = threading.Thread(target=self._loop, name="ap-supervisor", daemon=True)
        self._thread.start()
        return self

    def run(self) -> str:
        """Supervise in the calling thread until stopped, the AP goes down or every daemon
        was given up; returns why."""
        self._register()
        return self._loop()

    def request_stop(self) -> None:
        """Ask the loop to end (safe from a signal handler)."""
        self._stop.set()

    def stop(self, timeout: float = 10.0) -> None:
        """End the loop and wait for the thread."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    @property
    def running(self) -> bool:
        """True while the supervision loop runs."""
        return self.record is not None and self.ended is None

    def _register(self) -> None:
        key = _key(self.state_path)
        with state_lock(self.state_path):
            state = ApState.load(self.state_path)
            if state is None:
                raise ApError(
                    f"no AP to supervise: {self.state_path} does not exist",
                    hint="run `flowtruth ap up` first",
                )
            if state.status != "up":
                raise ApError(f"the AP on {state.interface} is {state.status}, not up")
            other = state.supervisor
            if (
                other is not None
                and pid_alive(other.pid, other.starttime)
                and (other.pid != os.getpid() or key in _RUNNING)
            ):
                raise ApError(
                    f"the AP on {state.interface} already has a supervisor "
                    f"({other.kind}, pid {other.pid})",
                    hint="`flowtruth ap status` shows it; `flowtruth ap down` stops it",
                )
            self._log = Path(state.work_dir) / "supervisor.log"
            self.record = SupervisorRecord(
                kind=self.kind,
                pid=os.getpid(),
                starttime=proc_starttime(os.getpid()),
                log=str(self._log),
                started_at=_now(),
            )
            state.supervisor = self.record
            state.save(self.state_path)
            if self._runner is None:
                self._runner = SubprocessRunner(state.netns)
            watched = [n for n in SUPERVISED if n in state.processes]
        _RUNNING[key] = self
        p = self.policy
        self._note(
            f"supervising {', '.join(watched) or 'nothing'} ({self.kind}, pid {os.getpid()}): "
            f"every {p.check_interval:g} s, at most {p.max_restarts} restarts "
            f"in {p.restart_window:g} s"
        )

    def _loop(self) -> str:
        reason = "stopped"
        try:
            while not self._stop.is_set():
                try:
                    ended = self.check()
                except ApError as err:  # e.g. the lock held too long: try again next time
                    self._note(f"error: {err.one_line()}")
                    ended = None
                if ended:
                    reason = ended
                    break
                self._stop.wait(self._wait_time())
        except Exception as err:  # never end silently
            reason = f"supervisor failed: {type(err).__name__}: {err}"
        finally:
            self.ended = reason
            if _RUNNING.get(_key(self.state_path)) is self:
                del _RUNNING[_key(self.state_path)]
            if not reason.startswith("gave up"):  # after a give-up, status shows it ended
                self._unregister()
            self._emit(SupervisorStopped(reason))
        return reason

    def _unregister(self) -> None:
        """Clear our record when the AP stays up without us (never during a teardown)."""
        try:
            with state_lock(self.state_path, timeout=2.0):
                state = ApState.load(self.state_path)
                rec = state.supervisor if state is not None else None
                if (
                    state is not None
                    and state.status == "up"
                    and rec is not None
                    and self.record is not None
                    and (rec.pid, rec.kind) == (self.record.pid, self.record.kind)
                ):
                    state.supervisor = None
                    state.save(self.state_path)
        except (ApError, OSError):
            pass

    def _wait_time(self) -> float:
        wait = self.policy.check_interval
        if self._due:
            wait = min(wait, min(t for t, _ in self._due.values()) - time.monotonic())
        return max(wait, 0.01)

    # -- one look

    def check(self) -> str | None:
        """Notice exited daemons and restart those that are due; the reason to end, or None."""
        state = ApState.load(self.state_path)
        if state is None:
            return "the AP is down (state file removed)"
        if state.status == "stopping":
            return "the AP is being taken down"
        if state.status != "up":
            return None
        watched = [n for n in SUPERVISED if n in state.processes]
        for name in watched:
            if name in self._given_up:
                continue
            rec = state.processes[name]
            if is_alive(rec):
                self._due.pop(name, None)
                continue
            if name not in self._due:
                reason = exit_reason(rec)
                self._emit(DaemonExited(name, rec.pid, reason))
                self._schedule(name, reason, rec)
            elif time.monotonic() >= self._due[name][0]:
                if not self._restart(name, self._due.pop(name)[1]):
                    return "the AP is being taken down"
        if watched and all(n in self._given_up for n in watched):
            return "gave up on " + ", ".join(watched)
        return None

    def _schedule(self, name: str, reason: str, rec: ProcessRecord) -> None:
        now = time.monotonic()
        p = self.policy
        recent = [t for t in self._attempts.get(name, []) if now - t < p.restart_window]
        self._attempts[name] = recent
        if len(recent) >= p.max_restarts:
            self._give_up(name, reason, rec, len(recent))
            return
        delay = min(p.backoff_initial * 2 ** len(recent), p.backoff_max)
        self._due[name] = (now + delay, reason)

    def _restart(self, name: str, reason: str) -> bool:
        """Start ``name`` again under the state lock; False when the AP is going down."""
        assert self._runner is not None
        failure = ""
        new: ProcessRecord | None = None
        with state_lock(self.state_path):
            state = ApState.load(self.state_path)
            if state is None or state.status != "up":
                return False
            rec = state.processes.get(name)
            if rec is None or is_alive(rec):
                return True
            self._attempts.setdefault(name, []).append(time.monotonic())
            health = state.health.setdefault(name, DaemonHealth())
            health.restarts += 1
            entry = RestartRecord(at=_now(), reason=reason, old_pid=rec.pid)
            try:
                new = start_daemon(
                    self._runner, name, rec.argv, Path(rec.log), settle=self.policy.settle
                )
            except ApError as err:
                failure = err.message  # the give-up line names the log once
            except OSError as err:  # e.g. the run directory was removed
                failure = f"cannot start {name}: {err}"
            else:
                entry.new_pid = new.pid
                state.processes[name] = new
            health.history = [*health.history, entry][-HISTORY:]
            state.save(self.state_path)
            restarts = health.restarts
        if new is not None:
            self._emit(DaemonRestarted(name, new.pid, restarts))
        else:
            self._emit(DaemonRestartFailed(name, failure))
            self._schedule(name, failure, rec)
        return True

    def _give_up(self, name: str, reason: str, rec: ProcessRecord, restarts: int) -> None:
        p = self.policy
        message = (
            f"{name} keeps exiting: gave up after {restarts} restart(s) within "
            f"{p.restart_window:g} s (supervision.max_restarts {p.max_restarts}); "
            f"last: {reason} (full log: {rec.log})"
        )
        self._given_up.add(name)
        self._due.pop(name, None)
        self.gave_up.append(message)
        with state_lock(self.state_path):
            state = ApState.load(self.state_path)
            if state is not None and state.status == "up":
                state.health.setdefault(name, DaemonHealth()).gave_up = message
                state.save(self.state_path)
        self._emit(DaemonGaveUp(name, message))

    # -- reporting

    def _note(self, text: str) -> None:
        if self._log is None:
            return
        try:
            with open(self._log, "a", encoding="utf-8") as fh:
                fh.write(f"{_now()} {text}\n")
        except OSError:
            pass

    def _emit(self, event: SupervisorEvent) -> None:
        self._note(describe(event))
        try:
            self._sink(event)
        except (Exception, SystemExit):  # a broken front end must not stop the supervision
            pass


def running_supervisor(state_path: Path) -> Supervisor | None:
    """The supervisor thread of this process for the AP of ``state_path``, if any."""
    return _RUNNING.get(_key(state_path))


def supervisor_alive(rec: SupervisorRecord | None) -> bool:
    """True while the recorded supervisor runs (for a thread: while its program runs)."""
    if rec is None:
        return False
    if rec.pid == os.getpid() and rec.kind != "process":
        return any(
            sup.running and sup.record is not None and sup.record.kind == rec.kind
            for sup in list(_RUNNING.values())
        )
    return pid_alive(rec.pid, rec.starttime)


def stop_supervisor(state_path: Path, rec: SupervisorRecord | None, timeout: float = 10.0) -> str:
    """End the AP's supervisor (after ``ap down`` marked the AP stopping); what happened."""
    sup = _RUNNING.get(_key(state_path))
    if sup is not None:
        sup.stop(timeout)
        return "stopped"
    if rec is None:
        return ""
    if not supervisor_alive(rec):
        return "was not running"
    if rec.kind == "process":
        proc = ProcessRecord(
            name="supervisor", pid=rec.pid, starttime=rec.starttime, argv=[], log=rec.log
        )
        stop_daemon(proc, timeout=timeout)
        return "stopped"
    # A thread or foreground loop in another program ends at its next look, and under the
    # state lock it never restarts anything once the AP is stopping.
    return f"ends by itself ({rec.kind} in pid {rec.pid})"


def start_supervisor_process(
    state_path: Path, policy: SupervisionConfig | None = None, timeout: float = 10.0
) -> SupervisorRecord:
    """Start a detached supervisor (``python -m ap_setup.supervise``) that outlives us."""
    policy = policy or SupervisionConfig()
    state = ApState.load(state_path)
    if state is None:
        raise ApError(f"no AP to supervise: {state_path} does not exist")
    log = Path(state.work_dir) / "supervisor.log"
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH")) if p)
    argv = [sys.executable, "-m", "ap_setup.supervise", str(Path(state_path).absolute()),
            "--policy", policy.model_dump_json()]  # fmt: skip
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as fh:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
            env=env,
            cwd="/",
        )
    _CHILDREN[proc.pid] = proc
    deadline = time.monotonic() + timeout
    while True:
        current = ApState.load(state_path)
        if current is not None and current.supervisor and current.supervisor.pid == proc.pid:
            return current.supervisor
        code = proc.poll()
        if code is not None:
            _CHILDREN.pop(proc.pid, None)
            raise ApError(
                f"the supervisor exited with status {code} at start: {log_tail(log)}",
                hint=f"full log: {log}",
            )
        if time.monotonic() > deadline:
            proc.kill()
            _reap(proc.pid)
            raise ApError(f"the supervisor did not start within {timeout:g} s", hint=f"see {log}")
        time.sleep(0.05)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ap_setup.supervise STATE_FILE``: supervise until ``ap down`` or a signal."""
    parser = argparse.ArgumentParser(
        prog="python -m ap_setup.supervise",
        description="Restart the AP's hostapd and dnsmasq when they exit.",
    )
    parser.add_argument("state_path", type=Path, help="the AP's state file")
    parser.add_argument("--policy", default="{}", help="supervision settings as JSON")
    args = parser.parse_args(argv)
    try:
        policy = SupervisionConfig.model_validate(json.loads(args.policy))
    except ValueError as err:
        print(f"supervisor: bad --policy: {str(err).splitlines()[0]}", file=sys.stderr)
        return 2
    sup = Supervisor(args.state_path, policy=policy, kind="process")
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: sup.request_stop())
    try:
        sup.run()
    except ApError as err:
        print(f"supervisor: {err.one_line()}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
