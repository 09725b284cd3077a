"""Whether strace really traced each process: its own stderr, the launcher's log and the
trace itself, read for the ways strace fails on real phones.

strace's messages (strace ``src/strace.c``): ``Process N attached``, ``Process N detached``,
``attach: ptrace(PTRACE_SEIZE, N): <strerror>`` (``PTRACE_ATTACH`` on old builds),
``wait4(__WALL): <strerror>`` (``perror_msg_and_die`` in ``next_event``), ``Can't fopen
'<path>': <strerror>``; Ubuntu-style builds add ``Could not attach to process ... yama/
ptrace_scope``. Android adds an SELinux audit line in logcat (``avc: denied { sigchld }``
for ``comm="strace"``, Magisk issue 596) and zygote's seccomp filter shows in the trace
as ``--- SIGSYS {... si_code=SYS_SECCOMP ...}``.

:func:`iter_tracer_problems` yields each recognised line; :func:`process_health` turns
one process's evidence into a :class:`TracerHealth`: ``attached`` (its trace has syscalls,
or strace said it attached and nothing went wrong after), ``denied`` (cause ``selinux``,
``ptrace`` or ``seccomp``), ``exited`` (gone before strace attached) or ``no_output``
(nothing says strace ever attached, and it logged nothing).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

STATUSES = ("attached", "denied", "exited", "no_output")
CAUSES = ("selinux", "ptrace", "seccomp", "log_file", "exited", "gave_up")

FIXES = {
    "selinux": "SELinux blocks strace: run `su -c setenforce 0` for the session (or a Magisk "
               "sepolicy rule allowing sigchld from the app domain to su's), then trace again",
    "ptrace": "ptrace is refused: check /proc/sys/kernel/yama/ptrace_scope (0 or 1 for root), "
              "the vendor's ptrace block, or an app that traces itself",
    "seccomp": "the app's seccomp filter (zygote's) killed or blocked a syscall under strace: "
               "use a strace built for this Android (static, seccomp-aware) or frida",
    "log_file": "strace could not write its log on the phone: free space or permissions in "
                "/data/local/tmp/flowtruth",
}


@dataclass(frozen=True, slots=True)
class TracerProblem:
    """One recognised line of tracer output."""

    cause: str
    line_no: int
    text: str
    pid: int | None = None


@dataclass(frozen=True, slots=True)
class TracerHealth:
    """Whether one process was traced, and if not, why."""

    pid: int
    name: str
    status: str
    reason: str = ""
    cause: str = ""
    lines: int = 0

    def to_manifest(self) -> dict[str, object]:
        return {"pid": self.pid, "name": self.name, "status": self.status,
                "reason": self.reason, "cause": self.cause, "syscall_lines": self.lines}


_STRACE = r"(?:^|\s)(?:\S*/)?strace(?:\[\d+\])?: "
_RULES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("selinux", re.compile(_STRACE + r"wait4\(__WALL\): Permission denied")),
    ("selinux", re.compile(r"avc:\s+denied\s+\{[^}]*\}.*comm=\"strace\"")),
    ("ptrace", re.compile(_STRACE + r"attach: ptrace\(PTRACE_(?:SEIZE|ATTACH), (\d+)\): "
                          r"(?:Operation not permitted|Permission denied)")),
    ("ptrace", re.compile(_STRACE + r"Could not attach to process")),
    ("ptrace", re.compile(_STRACE + r"wait4\(__WALL\): (?!No child processes)")),
    ("exited", re.compile(_STRACE + r"attach: ptrace\(PTRACE_(?:SEIZE|ATTACH), (\d+)\): "
                          r"No such process")),
    ("log_file", re.compile(_STRACE + r"Can't fopen '")),
    ("seccomp", re.compile(r"^(?:\[pid\s+)?(\d+)?\]?\s*(?:\d[\d:.]*\s+)?--- SIGSYS \{.*SYS_SECCOMP")),
    ("gave_up", re.compile(r"strace_launcher: strace for (\d+) exited \d+ times .*giving up")),
)


def iter_tracer_problems(text: str) -> Iterator[TracerProblem]:
    """Every line of strace's stderr, the launcher's log, logcat or a trace that shows a
    tracing failure (SELinux, ptrace refused, seccomp, no log file, the process gone)."""
    for i, line in enumerate(text.replace("\r\n", "\n").split("\n"), start=1):
        if "strace" not in line and "SIGSYS" not in line:
            continue
        for cause, rx in _RULES:
            m = rx.search(line)
            if m:
                pid = next((int(g) for g in m.groups() if g and g.isdigit()), None)
                yield TracerProblem(cause, i, line.strip()[:300], pid)
                break


_SYSCALL = re.compile(r"^(?:\[pid\s+\d+\]\s+|\d+\s+)?(?:\d[\d:.]*\s+)?[a-z_][a-z0-9_]*\(")


def count_syscall_lines(trace: str) -> int:
    """Lines of a trace that record a syscall (not signals, exits or strace's notes)."""
    return sum(1 for line in trace.splitlines() if _SYSCALL.match(line))


def _reason(cause: str, lines: Iterable[TracerProblem]) -> str:
    first = next(iter(lines), None)
    what = {"selinux": "SELinux denied strace", "ptrace": "ptrace refused",
            "seccomp": "seccomp sent SIGSYS", "log_file": "strace could not open its log",
            "exited": "the process exited before strace attached",
            "gave_up": "strace kept exiting; the launcher gave up"}[cause]
    return f"{what}: {first.text}" if first is not None else what


def process_health(pid: int, name: str, *, stderr: str = "", trace: str = "",
                   launcher_log: str = "", logcat: str = "") -> TracerHealth:
    """One traced process's health from strace's own stderr for it, its trace, the
    launcher's log and (optionally) logcat. A denial wins over everything; a trace with
    syscalls means attached; then seccomp, the process's exit, and finally no output."""
    from_stderr = list(iter_tracer_problems(stderr))
    # a refused attach that a later attempt overcame (the launcher retries) is history
    attached_at = [i for i, line in enumerate(stderr.replace("\r\n", "\n").split("\n"), 1)
                   if re.search(_STRACE + r"Process \d+ attached", line)]
    if attached_at:
        from_stderr = [p for p in from_stderr
                       if p.cause not in ("ptrace", "exited") or p.line_no > attached_at[-1]]
    own = from_stderr + list(iter_tracer_problems(trace))
    launcher = [p for p in iter_tracer_problems(launcher_log)
                if p.pid == pid and p.cause in ("gave_up", "ptrace", "exited")]
    # logcat's avc lines name strace's pid, not the tracee's: they back a wait4 denial
    avc = [p for p in iter_tracer_problems(logcat) if p.cause == "selinux"]
    lines = count_syscall_lines(trace)
    by: dict[str, list[TracerProblem]] = {}
    for p in own + launcher:
        by.setdefault(p.cause, []).append(p)
    if "selinux" in by:
        ev = by["selinux"] + avc[:1]
        return TracerHealth(pid, name, "denied", _reason("selinux", ev), "selinux", lines)
    if "ptrace" in by and not lines:
        return TracerHealth(pid, name, "denied", _reason("ptrace", by["ptrace"]), "ptrace", lines)
    if lines:
        note = _reason("seccomp", by["seccomp"]) if "seccomp" in by else ""
        return TracerHealth(pid, name, "attached", note, "seccomp" if note else "", lines)
    if "seccomp" in by:
        return TracerHealth(pid, name, "denied", _reason("seccomp", by["seccomp"]), "seccomp")
    if attached_at and "log_file" not in by:
        return TracerHealth(pid, name, "attached", "strace attached; the process made no traced "
                            "syscall while it was traced")
    if "log_file" in by:
        return TracerHealth(pid, name, "no_output", _reason("log_file", by["log_file"]),
                            "log_file")
    exited = "exited" in by or re.search(rf"strace_launcher: process {pid} exited\b",
                                         launcher_log) is not None \
        or re.search(r"^\S*\s*\+\+\+ (?:exited|killed)", trace, re.M) is not None
    if exited:
        return TracerHealth(pid, name, "exited", _reason("exited", by.get("exited", [])),
                            "exited")
    if "gave_up" in by:
        return TracerHealth(pid, name, "no_output", _reason("gave_up", by["gave_up"]), "gave_up")
    return TracerHealth(pid, name, "no_output", "strace logged no syscall of this process", "")


def summary(health: Iterable[TracerHealth]) -> str:
    """One line: how many processes were traced, and why the others were not."""
    hs = list(health)
    bad = [h for h in hs if h.status != "attached"]
    if not bad:
        return f"strace traced all {len(hs)} processes"
    parts = [f"{h.pid} ({h.name[:60]}): {h.status}"
             + (f", {h.cause}" if h.cause else "") for h in bad[:5]]
    more = f"; {len(bad) - 5} more" if len(bad) > 5 else ""
    return f"strace traced {len(hs) - len(bad)} of {len(hs)} processes; " + "; ".join(parts) + more
