"""Start, watch and stop the AP daemons (hostapd, dnsmasq, tcpdump).

Daemons run in the foreground of their own session with output in a log file, so
they outlive ``flowtruth ap up`` and are found again by pid plus start time.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Sequence
from pathlib import Path

from ap_setup.runner import Process, Runner
from ap_setup.state import ProcessRecord
from controller.errors import ApError

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
    start = proc_starttime(rec.pid)
    if start is None:
        return False
    return rec.starttime is None or start == rec.starttime


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
