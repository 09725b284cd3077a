"""Cleaning up after frida in tests, without touching another test run's frida.

frida 17 starts a helper daemon (``idund``, run from a ``/tmp/frida-*`` copy) that
outlives the process that used frida, and unpacks its agent under ``/tmp``. Importing this
module marks the test process's environment with a token; helpers inherit it (so do CLI
subprocesses the tests start), and :func:`cleanup` ends only the helpers carrying this
run's token, by pid, and removes only the directories no remaining helper runs from.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
import uuid
from pathlib import Path

TOKEN_VAR = "FLOWTRUTH_TEST_FRIDA_OWNER"
TOKEN = os.environ.setdefault(TOKEN_VAR, f"{os.getpid()}-{uuid.uuid4().hex[:8]}")


def frida_dirs() -> set[Path]:
    """frida's unpacked directories under /tmp."""
    tmp = Path("/tmp")
    return set(tmp.glob("frida-*")) | set(tmp.glob("idun-*"))


def helpers() -> dict[int, tuple[Path, bool]]:
    """Running frida helpers: pid -> (the directory it runs from, started by this run?)."""
    mark = f"{TOKEN_VAR}={TOKEN}".encode()
    out: dict[int, tuple[Path, bool]] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            exe = os.readlink(proc / "exe")
            if not exe.startswith("/tmp/frida-"):
                continue
            mine = mark in (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        out[int(proc.name)] = (Path(exe).parent, mine)
    return out


def cleanup(dirs_before: set[Path]) -> None:
    """End this run's helpers and remove the frida directories that appeared since
    ``dirs_before`` and that no other helper runs from."""
    mine = [pid for pid, (_d, own) in helpers().items() if own]
    for pid in mine:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in mine):
        time.sleep(0.05)
    in_use = {d for d, _own in helpers().values()}
    for d in frida_dirs() - dirs_before - in_use:
        shutil.rmtree(d, ignore_errors=True)
