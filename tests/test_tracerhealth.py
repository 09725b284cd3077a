"""Tracer health read from real strace output (../shared/data/android_real): the Magisk 596
SELinux denial, the seccomp SIGSYS on Android 9, and strace 6's own messages."""

from __future__ import annotations

from pathlib import Path

from analysis.traces.tracerhealth import (
    count_syscall_lines,
    iter_tracer_problems,
    process_health,
    summary,
)


def test_magisk_596_is_an_selinux_denial(shared_data: Path) -> None:
    text = (shared_data / "android_real" / "strace_magisk596.txt").read_text()
    problems = list(iter_tracer_problems(text))
    assert [(p.cause, p.line_no) for p in problems] == [("selinux", 3), ("selinux", 5)]
    assert "wait4(__WALL): Permission denied" in problems[0].text
    assert "avc:  denied  { sigchld }" in problems[1].text
    # the session's view: strace's stderr for pid 2815 (lines 2-4), logcat (line 5)
    lines = text.splitlines()
    h = process_health(2815, "com.example", stderr="\n".join(lines[1:4]), trace="",
                       logcat=lines[4])
    assert (h.status, h.cause) == ("denied", "selinux")
    assert "wait4(__WALL): Permission denied" in h.reason
    assert h.to_manifest()["status"] == "denied"


def test_termux_3824_sigsys_is_seccomp(shared_data: Path) -> None:
    text = (shared_data / "android_real" / "strace_android_termux3824.txt").read_text()
    problems = list(iter_tracer_problems(text))
    assert [(p.cause, p.pid) for p in problems] == [("seccomp", 22579)]
    assert count_syscall_lines(text) == 3  # getgid, setgid, rt_sigaction
    h = process_health(22579, "com.termux", trace=text)
    assert (h.status, h.cause) == ("attached", "seccomp") and "SIGSYS" in h.reason
    only_signal = "\n".join(x for x in text.splitlines() if "--- SIGSYS" in x)
    h = process_health(22579, "com.termux", trace=only_signal)
    assert (h.status, h.cause) == ("denied", "seccomp")


def test_strace_own_messages_ptrace_refused_gone_and_no_log() -> None:
    # what strace 6 prints (src/strace.c: attach_tcb, next_event, "Can't fopen")
    refused = ("strace: Process 17195 attached\n"
               "strace: attach: ptrace(PTRACE_SEIZE, 17195): Operation not permitted\n"
               "strace: Process 17195 detached\n")
    h = process_health(17195, "org.x", stderr=refused)
    assert (h.status, h.cause) == ("denied", "ptrace")
    # the launcher's retry got through: the earlier refusal no longer decides
    later = refused.replace("strace: Process 17195 attached\n", "") + \
        "strace: Process 17195 attached\n"
    h = process_health(17195, "org.x", stderr=later)
    assert (h.status, h.lines) == ("attached", 0) and "no traced syscall" in h.reason
    assert process_health(17195, "org.x", stderr=later + refused.splitlines()[1] + "\n"
                          ).status == "denied"
    gone = "strace: attach: ptrace(PTRACE_SEIZE, 999): No such process\n"
    assert process_health(999, "org.x", stderr=gone).status == "exited"
    nolog = "/data/local/tmp/strace: Can't fopen '/d/x.log': File name too long\n"
    h = process_health(5, "org.x", stderr=nolog)
    assert (h.status, h.cause) == ("no_output", "log_file")
    launcher = ("strace_launcher: tracing 7 (org.x) with strace 8 into o/strace.7.log\n"
                "strace_launcher: strace for 7 exited 3 times while the process lives; "
                "giving up on it\n")
    assert process_health(7, "org.x", launcher_log=launcher).cause == "gave_up"
    assert process_health(9, "org.x", launcher_log=launcher).cause == ""
    traced = '1700000000.000001 connect(3<TCP:[1]>, {sa_family=AF_INET}, 16) = 0\n'
    ok = process_health(7, "org.x", trace=traced)
    assert (ok.status, ok.lines) == ("attached", 1)
    exited = process_health(11, "org.x",
                            launcher_log="strace_launcher: process 11 exited\n")
    assert exited.status == "exited"
    line = summary([ok, h])
    assert line.startswith("strace traced 1 of 2 processes") and "log_file" in line
    assert summary([ok]) == "strace traced all 1 processes"
