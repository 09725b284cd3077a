"""The supervisor on plain processes: restart with back-off, give-up, teardown wins.

No root or namespaces needed: the "daemons" are ``sleep`` and ``sh`` started through the
real :class:`SubprocessRunner`. The same supervisor against a real dnsmasq in network
namespaces is in ``test_ap_netns.py``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ap_setup.config import SupervisionConfig
from ap_setup.runner import SubprocessRunner
from ap_setup.state import ApState, state_lock
from ap_setup.supervise import (
    DaemonExited,
    DaemonGaveUp,
    DaemonRestarted,
    DaemonRestartFailed,
    Supervisor,
    SupervisorEvent,
    SupervisorStopped,
    is_alive,
    pid_alive,
    start_daemon,
    start_supervisor_process,
    stop_daemon,
    stop_supervisor,
    supervisor_alive,
)
from controller.errors import ApError

FAST = SupervisionConfig(
    check_interval=0.05, backoff_initial=0.05, backoff_max=0.2, max_restarts=3,
    restart_window=60, settle=0.2,
)  # fmt: skip


def wait_for(cond: Callable[[], object], timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def make_state(tmp: Path, argv: list[str] | None = None) -> Path:
    """An AP state file that is up, with one 'dnsmasq' (really ``sleep``) running."""
    path = tmp / "state" / "ap-test0.state.json"
    work = tmp / "work"
    rec = start_daemon(SubprocessRunner(), "dnsmasq", ["sleep", "60"], work / "dnsmasq.out",
                       settle=0.05)  # fmt: skip
    if argv is not None:
        rec.argv = argv
    ApState(interface="test0", work_dir=str(work), status="up",
            processes={"dnsmasq": rec}).save(path)  # fmt: skip
    return path


@pytest.fixture
def state_path(tmp_path: Path) -> Iterator[Path]:
    path = make_state(tmp_path)
    yield path
    state = ApState.load(path)
    if state is not None:
        for rec in state.processes.values():
            stop_daemon(rec, timeout=1)


def kill(path: Path, name: str = "dnsmasq") -> int:
    pid = ApState.load(path).processes[name].pid
    os.kill(pid, signal.SIGKILL)
    return pid


def test_a_killed_daemon_is_restarted_and_the_restart_recorded(state_path: Path) -> None:
    events: list[SupervisorEvent] = []
    sup = Supervisor(state_path, policy=FAST, sink=events.append).start()
    try:
        assert supervisor_alive(ApState.load(state_path).supervisor)
        old = kill(state_path)
        # the event follows the state file's update
        wait_for(lambda: any(isinstance(e, DaemonRestarted) for e in events), what="restart")
        state = ApState.load(state_path)
        assert is_alive(state.processes["dnsmasq"]) and state.processes["dnsmasq"].pid != old
        assert state.health["dnsmasq"].restarts == 1
        entry = state.health["dnsmasq"].history[0]
        assert entry.old_pid == old and entry.new_pid == state.processes["dnsmasq"].pid
        assert entry.reason.startswith("killed by SIGKILL")
        assert [type(e) for e in events] == [DaemonExited, DaemonRestarted]
        log = Path(state.work_dir) / "supervisor.log"
        assert f"dnsmasq (pid {old}) killed by SIGKILL" in log.read_text()
    finally:
        sup.stop()
    assert isinstance(events[-1], SupervisorStopped)
    # Stopped while the AP stays up: the record is cleared, so status shows no supervisor.
    assert ApState.load(state_path).supervisor is None


def test_a_daemon_that_keeps_dying_is_given_up_with_one_line(tmp_path: Path) -> None:
    # Restarts run a command that fails at once, as dnsmasq does with a broken config.
    path = make_state(tmp_path, ["sh", "-c", "echo 'bad option at line 3' >&2; exit 1"])
    events: list[SupervisorEvent] = []
    sup = Supervisor(path, policy=FAST, sink=events.append)
    kill(path)
    started = time.monotonic()
    reason = sup.run()  # returns: its only daemon was given up
    assert time.monotonic() - started < 5
    assert reason == "gave up on dnsmasq"
    kinds = [type(e) for e in events]
    assert kinds.count(DaemonRestartFailed) == 3 and kinds[-2:] == [DaemonGaveUp, SupervisorStopped]
    (line,) = sup.gave_up
    assert "\n" not in line
    assert line.startswith("dnsmasq keeps exiting: gave up after 3 restart(s) within 60 s")
    assert "bad option at line 3" in line and line.count("dnsmasq.out") == 1
    state = ApState.load(path)
    assert state.health["dnsmasq"].gave_up == line
    # The record stays, so status shows a supervisor that ended rather than none at all.
    assert state.supervisor is not None and not supervisor_alive(state.supervisor)
    assert state.health["dnsmasq"].restarts == 3
    assert [h.new_pid for h in state.health["dnsmasq"].history] == [None, None, None]


def test_backoff_grows_between_attempts(tmp_path: Path) -> None:
    path = make_state(tmp_path, ["sh", "-c", "exit 1"])
    policy = FAST.model_copy(update={"backoff_initial": 0.1, "backoff_max": 0.4,
                                     "max_restarts": 4, "settle": 0.0})  # fmt: skip
    times: list[float] = []
    sup = Supervisor(path, policy=policy,
                     sink=lambda e: times.append(time.monotonic())
                     if isinstance(e, DaemonExited | DaemonRestartFailed) else None)  # fmt: skip
    kill(path)
    sup.run()
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    # 0.1, 0.2, 0.4, 0.4 (capped), each plus at most a check interval and the start
    assert len(gaps) == 4
    for gap, want in zip(gaps, [0.1, 0.2, 0.4, 0.4], strict=True):
        assert want - 0.02 <= gap < want + 1.0, gaps


def test_no_restart_once_the_ap_is_stopping(state_path: Path) -> None:
    """ap_down marks the AP stopping under the lock: a supervisor never restarts after that."""
    sup = Supervisor(state_path, policy=FAST.model_copy(update={"backoff_initial": 0.0}))
    sup.start()
    with state_lock(state_path):  # the supervisor's restart waits for this lock
        old = kill(state_path)
        wait_for(lambda: "killed by SIGKILL" in Path(sup.record.log).read_text(), what="notice")
        state = ApState.load(state_path)
        state.status = "stopping"
        state.save(state_path)
    wait_for(lambda: not sup.running, what="supervisor to end")
    assert sup.ended == "the AP is being taken down"
    assert ApState.load(state_path).processes["dnsmasq"].pid == old
    assert "dnsmasq" not in ApState.load(state_path).health


def test_a_second_supervisor_is_refused(state_path: Path) -> None:
    sup = Supervisor(state_path, policy=FAST).start()
    try:
        with pytest.raises(ApError, match="already has a supervisor"):
            Supervisor(state_path, policy=FAST).start()
    finally:
        sup.stop()
    with pytest.raises(ApError, match="does not exist"):
        Supervisor(state_path.with_name("missing.json")).run()


def test_supervisor_process_outlives_its_starter_and_is_stopped(state_path: Path) -> None:
    rec = start_supervisor_process(state_path, FAST)
    assert rec.kind == "process" and pid_alive(rec.pid, rec.starttime)
    old = kill(state_path)
    wait_for(lambda: ApState.load(state_path).processes["dnsmasq"].pid != old, what="restart")
    assert ApState.load(state_path).health["dnsmasq"].restarts == 1
    with state_lock(state_path):
        state = ApState.load(state_path)
        state.status = "stopping"
        state.save(state_path)
    assert stop_supervisor(state_path, state.supervisor) == "stopped"
    assert not pid_alive(rec.pid, rec.starttime)
    log = Path(state.work_dir) / "supervisor.log"
    assert "restarted as pid" in log.read_text()


def test_module_entry_rejects_a_bad_policy(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "ap_setup.supervise", str(tmp_path / "x.json"),
                          "--policy", '{"max_restarts": -1}'], capture_output=True, text=True,
                         timeout=30, cwd=Path(__file__).resolve().parents[1])  # fmt: skip
    assert res.returncode == 2 and res.stderr.startswith("supervisor: bad --policy")
    res = subprocess.run([sys.executable, "-m", "ap_setup.supervise", str(tmp_path / "x.json")],
                         capture_output=True, text=True, timeout=30,
                         cwd=Path(__file__).resolve().parents[1])  # fmt: skip
    assert res.returncode == 1 and "no AP to supervise" in res.stderr
    assert "Traceback" not in res.stderr
