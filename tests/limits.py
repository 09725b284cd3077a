"""Run the CLI in a child process under a memory ceiling and report its peak RSS."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GB = 1 << 30


@dataclass
class Outcome:
    returncode: int
    stdout: str
    stderr: str
    max_rss: int  # bytes, the child's own peak
    seconds: float


def run_limited(args: list[str], cwd: Path | None = None, address_space: int = 3 * GB,
                timeout: float = 120) -> Outcome:
    """``python -m controller.cli *args`` with RLIMIT_AS at ``address_space`` (a safety net
    for the machine; the assertion is on the measured peak RSS, from wait4)."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    t0 = time.monotonic()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen([sys.executable, "-m", "controller.cli", *args],
                                cwd=cwd or REPO, env=env, stdout=out, stderr=err,
                                stdin=subprocess.DEVNULL, preexec_fn=limit)
        while True:  # wait4 gives this child's own peak RSS
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() - t0 > timeout:
                proc.kill()
                os.wait4(proc.pid, 0)
                proc.returncode = -9
                raise AssertionError(f"flowtruth {' '.join(args)[:200]} hung for {timeout} s")
            time.sleep(0.02)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return Outcome(proc.returncode, out.read().decode("utf-8", "replace"),
                       err.read().decode("utf-8", "replace"), usage.ru_maxrss * 1024,
                       time.monotonic() - t0)


def one_line_error(o: Outcome) -> bool:
    """Exit 2 with exactly one stderr line and no traceback."""
    return (o.returncode == 2 and o.stderr.count("\n") == 1 and o.stderr.endswith("\n")
            and "Traceback" not in o.stderr and o.stderr.startswith("flowtruth: error: "))
