"""strace parser: every line shape, damaged logs, and a fuzz of the line parser."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs

from analysis.errors import BadInputError, ParseError
from analysis.traces.model import ParseStats, Syscall
from analysis.traces.strace import (
    iter_socket_observations,
    iter_syscalls,
    process_from_filename,
)

DATA = Path(__file__).parent / "data" / "strace"
SIGNAL_LOG = DATA / "strace.4242.org.thoughtcrime.securesms.log"


def make_strace_log(tmp_path: Path, lines: list[str], name: str = "strace.1.app.log",
                    newline_at_end: bool = True) -> Path:
    """A log file from lines (the last one optionally cut without its newline)."""
    p = tmp_path / name
    text = "\n".join(lines) + ("\n" if newline_at_end else "")
    p.write_text(text)
    return p


def obs_tuples(obs):
    return [(o.kind, o.proto, o.local_port, o.remote_ip, o.remote_port) for o in obs]


def test_launcher_shape_with_yy_decorations() -> None:
    stats = ParseStats()
    calls = list(iter_syscalls(SIGNAL_LOG, stats=stats))
    assert stats.n_skipped == 0 and stats.other == {"signals and exits": 2}
    assert stats.lines == 28 and stats.parsed == 26
    sock = calls[0]
    assert sock == Syscall(1732800000.1, 4242, "socket",
                           "AF_INET6, SOCK_STREAM|SOCK_CLOEXEC, IPPROTO_IP", 84, None,
                           "TCPv6:[901]")
    # unfinished/resumed pairs are joined per pid and timed at their entry
    recv = next(c for c in calls if c.name == "recvfrom")
    assert recv.ts == pytest.approx(1732800000.1005) and recv.retval == 4
    assert recv.args == '93<UNIX:[902->903]>, "\\0\\0\\0\\0", 4, 0, NULL, NULL'
    udp = [c for c in calls if c.pid == 4243][0]
    assert udp.name == "socket" and udp.retval == 98 and udp.ret_decor == "UDP:[904]"
    conn = next(c for c in calls if c.name == "connect" and c.args.startswith("84"))
    assert conn.retval == -1 and conn.errno == "EINPROGRESS"


def test_launcher_shape_observations() -> None:
    obs = list(iter_socket_observations(SIGNAL_LOG))
    assert {o.label for o in obs} == {"org.thoughtcrime.securesms"}
    assert {o.process for o in obs} == {"org.thoughtcrime.securesms"}
    assert obs_tuples(obs) == [
        ("connect", 6, None, "76.223.92.165", 443),  # IPv4-mapped becomes IPv4
        ("send", 17, None, "142.250.1.1", 3478),
        ("send", 6, 40123, "76.223.92.165", 443),  # local port from the -yy decoration
        ("recv", 17, 51000, "142.250.1.1", 3478),
        ("close", 6, 40123, "76.223.92.165", 443),
        ("recv", 6, 40123, "76.223.92.165", 443),  # through the dup'ed fd
        ("send", 17, 51000, "142.250.1.2", 3478),  # sendmmsg: every destination
        ("send", 17, 51000, "2001:db8::1", 3479),
        ("listen", 6, 8080, None, None),
        ("accept", 6, 8080, "192.168.50.1", 50500),
        ("close", 6, 8080, "192.168.50.1", 50500),
        ("snapshot", 17, 51000, None, None),
        ("close", 17, 51000, None, None),  # AF_UNSPEC connect dissolved the association
    ]
    tcp = [o for o in obs if o.proto == 6 and o.remote_port == 443]
    assert len({o.sock for o in tcp}) == 1
    assert tcp[2].local_ip == "192.168.50.20"
    assert all(o.local_ip is None for o in obs if o.proto == 17)  # 0.0.0.0 is no address


def test_process_from_launcher_filename() -> None:
    assert process_from_filename("x/strace.4242.org.thoughtcrime.securesms.log") == (
        4242, "org.thoughtcrime.securesms")
    assert process_from_filename("strace.17.com.whatsapp:voip.log") == (17, "com.whatsapp:voip")
    assert process_from_filename("trace.txt") is None
    obs = list(iter_socket_observations(SIGNAL_LOG, process="org.signal:push"))
    assert {(o.label, o.sublabel) for o in obs} == {("org.signal", "org.signal:push")}


def test_pid_prefix_shape_and_attach_lines() -> None:
    stats = ParseStats()
    calls = list(iter_syscalls(DATA / "pid_prefix.log", stats=stats))
    assert [c.pid for c in calls] == [-1, 5001, 5001, 5001, -1, -1, 5002, 5001, -1]
    assert stats.n_skipped == 0 and stats.other == {"signals and exits": 1}
    obs = list(iter_socket_observations(DATA / "pid_prefix.log", process="org.telegram.messenger"))
    assert obs_tuples(obs) == [
        ("send", 17, None, "2001:4860:4860::8888", 53),
        ("snapshot", 17, 40000, None, None),
        ("connect", 6, None, "149.154.167.51", 443),
        ("snapshot", 6, 39000, "149.154.167.51", 443),
        ("send", 6, 39000, "149.154.167.51", 443),  # another thread, same fd table
        ("close", 17, 40000, None, None),
        ("close", 6, 39000, "149.154.167.51", 443),
    ]
    assert obs[2].ts == pytest.approx(1732800000.0003)  # connect timed at its entry


def test_time_of_day_needs_a_date_and_wraps_midnight() -> None:
    with pytest.raises(BadInputError) as e:
        list(iter_syscalls(DATA / "time_of_day.log"))
    assert "--date" in e.value.hint
    calls = list(iter_syscalls(DATA / "time_of_day.log", date="2024-11-28"))
    base = 1732752000.0  # 2024-11-28T00:00:00Z
    assert [c.ts for c in calls] == pytest.approx(
        [base + 86399.5, base + 86399.6, base + 86400.25, base + 86401.0])
    shifted = list(iter_syscalls(DATA / "time_of_day.log", date="2024-11-28", utc_offset=3600))
    assert shifted[0].ts == pytest.approx(base + 86399.5 - 3600)
    assert calls[1].errno == "EINPROGRESS" and calls[0].retval == 5  # -T durations dropped


def test_no_decorations_poster_excerpt() -> None:
    obs = list(iter_socket_observations(DATA / "no_decorations.log", process="org.thoughtcrime.securesms"))
    # fd 84 was opened before the excerpt and strace printed no -yy: the type is unknown
    # (0), the remote endpoint still counts; the AF_UNIX traffic gives nothing.
    assert obs_tuples(obs) == [("connect", 0, None, "76.223.92.165", 443)]
    assert math.isnan(obs[0].ts)


def test_ff_per_thread_files_merge_by_time() -> None:
    calls = list(iter_syscalls(DATA / "ff" / "trace"))
    assert [c.pid for c in calls] == [301, 301, 302, 302, 301, 302]
    obs = list(iter_socket_observations(calls, process="com.whatsapp"))
    assert obs_tuples(obs) == [
        ("connect", 6, None, "157.240.2.2", 5222),
        ("send", 6, None, "157.240.2.2", 5222),  # another thread, the same fd table
        ("recv", 6, None, "157.240.2.2", 5222),
        ("snapshot", 6, 42001, "157.240.2.2", 5222),
        ("close", 6, 42001, "157.240.2.2", 5222),
    ]
    assert len({o.sock for o in obs}) == 1


def test_damaged_log_counts_and_keeps_going() -> None:
    stats = ParseStats()
    calls = list(iter_syscalls(DATA / "damaged.log", stats=stats))
    assert stats.skipped == {
        "garbage": 3,  # prose, '@@@@', a line cut mid-write and followed by others
        "unmatched resumed": 1,
        "unfinished call never resumed": 1,  # pid 9002 started a second call first
        "truncated last line": 1,
    }
    assert stats.lines == 12
    assert [c.name for c in calls] == ["socket", "connect", "sendto", "recvfrom", "close"]
    assert "skipped" in stats.summary() and "truncated last line" in stats.summary()
    obs = list(iter_socket_observations(DATA / "damaged.log", process="x"))
    assert ("send", 17, 45000, "162.159.200.1", 123) in obs_tuples(obs)


def test_missing_log_is_a_parse_error(tmp_path: Path) -> None:
    with pytest.raises(ParseError) as e:
        list(iter_syscalls(tmp_path / "nope.log"))
    assert "nope.log" in str(e.value)


def test_unfinished_at_end_is_yielded_without_result(tmp_path: Path) -> None:
    p = make_strace_log(tmp_path, [
        '1 1.5 socket(AF_INET, SOCK_STREAM, IPPROTO_IP) = 3<TCP:[1]>',
        '1 2.5 connect(3<TCP:[1]>, {sa_family=AF_INET, sin_port=htons(80), '
        'sin_addr=inet_addr("1.2.3.4")}, 16 <unfinished ...>',
    ])
    stats = ParseStats()
    obs = list(iter_socket_observations(p, stats=stats))
    assert obs_tuples(obs) == [("connect", 6, None, "1.2.3.4", 80)]
    assert stats.other == {"unfinished at end of log": 1}


def test_failed_connects_and_failed_sends() -> None:
    lines = [
        '1 1.0 socket(AF_INET, SOCK_STREAM, IPPROTO_IP) = 3',
        '1 1.1 connect(3, {sa_family=AF_INET, sin_port=htons(80), sin_addr=inet_addr("1.2.3.4")},'
        ' 16) = -1 ENETUNREACH (Network is unreachable)',
        '1 1.2 connect(3, {sa_family=AF_INET, sin_port=htons(80), sin_addr=inet_addr("1.2.3.5")},'
        ' 16) = -1 ECONNREFUSED (Connection refused)',
        '1 1.3 sendto(3, "x", 1, 0, NULL, 0) = -1 EPIPE (Broken pipe)',
        '1 1.4 socket(AF_INET, SOCK_RAW, IPPROTO_ICMP) = 4',
        '1 1.5 sendto(4, "x", 1, 0, {sa_family=AF_INET, sin_port=htons(0), '
        'sin_addr=inet_addr("8.8.8.8")}, 16) = 1',
    ]
    stats = ParseStats()
    assert list(iter_socket_observations(lines, stats=stats))[0].label is None
    assert "no process name" in stats.warnings[0]
    obs = list(iter_socket_observations(lines, process="p"))
    # the refused connect sent a SYN; the unreachable one sent nothing; raw is not TCP/UDP
    assert obs_tuples(obs) == [("connect", 6, None, "1.2.3.5", 80)]


LINE_PARTS = hs.sampled_from([
    "123 ", "[pid 7] ", "1732800000.5 ", "12:00:01.25 ", "socket(", "connect(", "sendto(",
    "3<TCP:[1.2.3.4:5->6.7.8.9:10]>", "3<TCPv6:[[::1]:5->[::1]:6]>", ", ", "{sa_family=AF_INET, ",
    "sin_port=htons(80), sin_addr=inet_addr(\"1.2.3.4\")}", "sin6_port=htons(", "inet_pton(AF_INET6, \"",
    ") = ", "-1 ", "EINPROGRESS (x)", "<unfinished ...>", "<... connect resumed>", "?", "\"", "<", ">",
    "0x7f", " <0.001>", "--- SIG", "+++ exited", "\n", "(", ")", "=", "[", "]", "99999999999999",
])


@settings(max_examples=400, deadline=None)
@given(hs.lists(hs.one_of(hs.text(max_size=40), hs.lists(LINE_PARTS, max_size=14).map("".join)),
                max_size=12))
def test_fuzz_parser_never_raises(lines: list[str]) -> None:
    stats = ParseStats()
    for _ in iter_socket_observations(lines, process="fuzz", stats=stats, date="2024-01-01"):
        pass
    assert stats.lines == len(lines)


def test_fd_reused_without_a_seen_close_is_a_new_socket() -> None:
    lines = [
        '1 1.0 sendto(5<TCP:[10.0.0.5:40000->1.2.3.4:443]>, "x", 1, 0, NULL, 0) = 1',
        '1 2.0 connect(5<TCP:[20]>, {sa_family=AF_INET, sin_port=htons(80), '
        'sin_addr=inet_addr("5.6.7.8")}, 16) = -1 EINPROGRESS (Operation now in progress)',
        '1 2.1 close(5<TCP:[10.0.0.5:41000->5.6.7.8:80]>) = 0',
        '1 3.0 sendto(5<UDP:[10.0.0.5:41000->9.9.9.9:53]>, "x", 1, 0, NULL, 0) = 1',
    ]
    obs = list(iter_socket_observations(lines, process="p"))
    assert obs_tuples(obs) == [
        ("send", 6, 40000, "1.2.3.4", 443),
        ("connect", 6, None, "5.6.7.8", 80),
        ("close", 6, 41000, "5.6.7.8", 80),
        ("send", 17, 41000, "9.9.9.9", 53),
    ]
    assert obs[0].sock != obs[1].sock == obs[2].sock != obs[3].sock


def test_a_binary_file_is_reported_clearly(tmp_path: Path) -> None:
    p = tmp_path / "strace.9.app.log"
    p.write_bytes(bytes(range(256)) * 64 + b"\n\xd4\xc3\xb2\xa1" * 100)
    stats = ParseStats()
    assert list(iter_socket_observations(p, stats=stats)) == []
    assert stats.parsed == 0 and stats.skipped.get("garbage", 0) > 0
    with pytest.raises(ParseError) as e:
        stats.check_usable(p, "strace lines")
    assert "no strace lines" in str(e.value) and "garbage" in e.value.hint
    ok = ParseStats()
    list(iter_syscalls(SIGNAL_LOG, stats=ok))
    ok.check_usable(SIGNAL_LOG, "strace lines")  # does not raise


def _as_pid_prefixed(lines: list[str]) -> list[str]:
    """The same log as strace prints it without -o: "[pid N] ..." (the regex path)."""
    out = []
    for line in lines:
        pid, _, rest = line.partition(" ")
        out.append(f"[pid {pid}] {rest.lstrip()}")
    return out


def test_fast_path_agrees_with_the_regex_path() -> None:
    lines = SIGNAL_LOG.read_text().splitlines(True)
    fast = list(iter_syscalls(lines))
    slow = list(iter_syscalls(_as_pid_prefixed(lines)))
    assert fast == slow and len(fast) == 24
