"""The port through which the AP code runs programs: argv lists only, never a shell.

:class:`SubprocessRunner` runs real commands, optionally inside a network namespace
(``ip netns exec NS``); :class:`RecordingRunner` is a fake for unit tests of one layer.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol


@dataclass(frozen=True, slots=True)
class ShellResult:
    """The outcome of one command; a non-zero exit is data, the caller decides."""

    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        """True when the command exited 0."""
        return self.returncode == 0

    def describe(self) -> str:
        """One line naming the command, its status and the first line of stderr."""
        err = (self.stderr or self.stdout).strip().splitlines()
        tail = f": {err[0]}" if err else ""
        return f"`{' '.join(self.argv)}` exited {self.returncode}{tail}"


class Process(Protocol):
    """The part of :class:`subprocess.Popen` the supervisor uses."""

    pid: int

    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int: ...


class Runner(Protocol):
    """Runs argv lists, inside ``netns`` when set."""

    netns: str | None

    def run(
        self, argv: Sequence[str], *, input: str | None = None, timeout: float = 30
    ) -> ShellResult: ...

    def spawn(self, argv: Sequence[str], *, log: Path) -> Process: ...

    def which(self, name: str) -> str | None: ...


def netns_argv(netns: str | None, argv: Sequence[str]) -> list[str]:
    """``argv`` prefixed with ``ip netns exec NS`` when a namespace is given."""
    return ["ip", "netns", "exec", netns, *argv] if netns else list(argv)


class SubprocessRunner:
    """Real commands via :mod:`subprocess`."""

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns

    def run(
        self, argv: Sequence[str], *, input: str | None = None, timeout: float = 30
    ) -> ShellResult:
        """Run to completion; a missing program is returncode 127, a timeout 124."""
        full = netns_argv(self.netns, argv)
        try:
            proc = subprocess.run(
                full,
                input=input,
                capture_output=True,
                text=True,
                timeout=timeout,
                stdin=None if input is not None else subprocess.DEVNULL,
            )
        except FileNotFoundError:
            return ShellResult(tuple(argv), 127, "", f"{full[0]}: command not found")
        except subprocess.TimeoutExpired:
            return ShellResult(tuple(argv), 124, "", f"timed out after {timeout:g} s")
        return ShellResult(tuple(argv), proc.returncode, proc.stdout, proc.stderr)

    def spawn(self, argv: Sequence[str], *, log: Path) -> Process:
        """Start a long-running program in its own session, stdout and stderr into ``log``."""
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as fh:
            return subprocess.Popen(
                netns_argv(self.netns, argv),
                stdin=subprocess.DEVNULL,
                stdout=fh,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
            )

    def which(self, name: str) -> str | None:
        """Path of a program on the host's PATH (namespaces share the file system)."""
        return shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")


@dataclass
class FakeProcess:
    """A process that never ran (its pid is above any kernel pid_max)."""

    pid: int
    returncode: int | None = None

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        self.returncode = 0 if self.returncode is None else self.returncode
        return self.returncode


@dataclass
class RecordingRunner:
    """A fake runner: records every argv and answers from ``responses``.

    ``responses`` maps an argv prefix (tuple) to a :class:`ShellResult` or a callable
    returning one; the longest matching prefix wins, anything else succeeds silently.
    """

    netns: str | None = None
    responses: dict[tuple[str, ...], ShellResult | Callable[[tuple[str, ...]], ShellResult]] = (
        field(default_factory=dict)
    )
    missing: set[str] = field(default_factory=set)
    calls: list[tuple[str, ...]] = field(default_factory=list)
    inputs: list[str | None] = field(default_factory=list)
    spawned: list[tuple[str, ...]] = field(default_factory=list)
    spawn_logs: dict[str, str] = field(default_factory=dict)

    def run(
        self, argv: Sequence[str], *, input: str | None = None, timeout: float = 30
    ) -> ShellResult:
        key = tuple(argv)
        self.calls.append(key)
        self.inputs.append(input)
        best: tuple[str, ...] | None = None
        for prefix in self.responses:
            if key[: len(prefix)] == prefix and (best is None or len(prefix) > len(best)):
                best = prefix
        if best is None:
            return ShellResult(key, 0, "", "")
        answer = self.responses[best]
        res = answer(key) if callable(answer) else answer
        return ShellResult(key, res.returncode, res.stdout, res.stderr)

    def spawn(self, argv: Sequence[str], *, log: Path) -> Process:
        self.spawned.append(tuple(argv))
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(self.spawn_logs.get(argv[0], ""))
        return FakeProcess(pid=5_000_000 + len(self.spawned))

    def which(self, name: str) -> str | None:
        return None if name in self.missing else f"/usr/sbin/{name}"
