"""The analysis side against real Android output (``../shared/data/android_real/``): the
uid map from ``pm list packages -U [--show-versioncode]``, strace logs of real phones and
of strace whose socket lookup failed (``socket:[inode]``, bare fds), PCAPdroid's v1.6 and
v1.7+ CSV exports, ``/proc/net`` rows; and the labelling they feed: the same capture gets
the same labels whatever form its traces take, and a background app named by the
phone's package list gets its package."""

from __future__ import annotations

import csv
import datetime as dt
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from analysis.correlate import correlate, flowkeys_from_table
from analysis.label import label_capture
from analysis.traces.csvlabels import iter_pcapdroid_csv
from analysis.traces.model import ParseStats, SocketObservation, inode_sock_id
from analysis.traces.netstat import iter_netstat_observations, iter_socket_tables
from analysis.traces.strace import iter_socket_observations, iter_syscalls, strace_failure
from analysis.traces.uidmap import iter_package_uids, load_uid_map
from tests.conftest import DATA
from tests.pcapgen import write_pcap
from tests.test_label_cli import ALPHA, BETA, PHONE, T0, make_capture, strace_alpha, strace_beta

REAL = DATA / "android_real"
REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not REAL.is_dir(), reason=f"no shared data at {REAL}")
OTHER = "com.example.background"  # the owner of the capture's fourth flow, untraced
UIDS = {ALPHA: 10123, BETA: 10124, OTHER: 10999}


def cli(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "controller.cli", "label", *map(str, args)],
                          capture_output=True, text=True, cwd=REPO, timeout=120)


# ----------------------------------------------------------------------------- uid map

def test_pm_list_packages_U_oneplus() -> None:
    st = ParseStats()
    m = load_uid_map(REAL / "pm_list_U_oneplus.txt", st)
    assert m == {
        10570: ("io.github.jark006.freezeit",), 10189: ("com.google.android.inputmethod.latin",),
        10255: ("com.android.launcher",), 10260: ("com.android.systemui",), 1000: ("android",),
        1001: ("com.android.phone",), 10430: ("com.sohu.inputmethod.sogouoem",),
    }
    assert (st.lines, st.parsed, st.skipped) == (7, 7, {})


def test_pm_list_packages_show_versioncode_aosp_order() -> None:
    st = ParseStats()
    m = load_uid_map(REAL / "pm_list_versioncode_aosp_format.txt", st)
    assert m == {10245: ("com.whatsapp",), 10311: ("org.thoughtcrime.securesms",),
                 10289: ("org.telegram.messenger",)}
    assert (st.lines, st.parsed) == (3, 3)


def test_pm_list_other_orders_crlf_utf16_shared_and_multi_user(tmp_path: Path) -> None:
    text = ("package:com.whatsapp versionCode:252370004 uid:10245\r\n"
            "package:org.telegram.messenger uid:10289 versionCode:58603\r\n"  # other order
            "package:/data/app/~~x==/com.a-1/base.apk=com.a versionCode:3 uid:10300\r\n"
            "package:com.android.shell uid:2000 installer=null\r\n"
            "package:com.shared.one uid:10400\r\npackage:com.shared.two uid:10400\r\n"
            "package:com.work uid:10500,1010500\r\n"  # two users
            "package:no.uid.here versionCode:1\r\n"
            "Error: something\r\n")
    expect = {10245: ("com.whatsapp",), 10289: ("org.telegram.messenger",), 10300: ("com.a",),
              2000: ("com.android.shell",), 10400: ("com.shared.one", "com.shared.two"),
              10500: ("com.work",), 1010500: ("com.work",)}
    for enc in ("utf-8", "utf-16"):  # utf-16: a Windows redirect, with its BOM
        p = tmp_path / f"packages.{enc}.txt"
        p.write_bytes(text.encode(enc))
        st = ParseStats()
        assert load_uid_map(p, st) == expect
        assert st.parsed == 7 and st.skipped == {
            "package line without uid (pm list packages needs -U)": 1, "not a package line": 1}
    assert list(iter_package_uids(["package:x.y uid:5"])) == [("x.y", 5)]


# ----------------------------------------------------------------------------- strace

def test_strace_singbox_fwmarkd_sendmsg_and_socket_families() -> None:
    st = ParseStats()
    calls = list(iter_syscalls(REAL / "strace_android_singbox3999.txt", stats=st))
    assert (st.lines, st.parsed, st.skipped) == (14, 14, {})
    socks = [(c.args.split(",")[0], c.args.split(", ")[1], c.retval) for c in calls
             if c.name == "socket"]
    assert socks == [("AF_INET", "SOCK_STREAM", 3), ("AF_INET6", "SOCK_STREAM", 3),
                     ("AF_INET6", "SOCK_DGRAM", 13), ("AF_UNIX", "SOCK_STREAM|SOCK_CLOEXEC", 14)]
    assert {c.pid for c in calls} == {-1}  # no -f: no pid on the lines
    conn = next(c for c in calls if c.name == "connect")
    assert conn.args.startswith('14, {sa_family=AF_UNIX, sun_path="/dev/socket/fwmarkd"}')
    send = next(c for c in calls if c.name == "sendmsg")
    # bionic hands the app's socket (fd 13) to netd's fwmarkd before connecting it.
    assert send.args.startswith("14, {msg_name=NULL")
    assert "cmsg_type=SCM_RIGHTS, cmsg_data=[13]" in send.args
    assert (send.retval, send.errno) == (52, None)
    gp = next(c for c in calls if c.name == "getpeername")
    assert (gp.retval, gp.errno) == (-1, "ENOTCONN")
    # The fwmarkd socket is AF_UNIX and the inet ones never connect: nothing to label.
    obs = list(iter_socket_observations(REAL / "strace_android_singbox3999.txt", process="p"))
    assert obs == []


def test_strace_termux_pid_prefix_and_seccomp_sigsys() -> None:
    st = ParseStats()
    calls = list(iter_syscalls(REAL / "strace_android_termux3824.txt", stats=st))
    assert [(c.pid, c.name, c.retval) for c in calls] == [
        (22579, "getgid", 10313), (22579, "setgid", 10313), (22579, "rt_sigaction", 0)]
    assert st.other == {"signals and exits": 1, "seccomp SIGSYS": 1}
    assert st.skipped == {}


def test_strace_magisk596_selinux_denial_is_named() -> None:
    st = ParseStats()
    assert list(iter_syscalls(REAL / "strace_magisk596.txt", stats=st)) == []
    assert st.other == {"strace messages": 3, "SELinux denials": 1}
    assert st.skipped == {"garbage": 1}  # the shell prompt line
    assert any("Magisk issue 596" in w and "wait4(__WALL): Permission denied" in w
               for w in st.warnings), st.warnings
    text = (REAL / "strace_magisk596.txt").read_text()
    assert "Magisk issue 596" in strace_failure(text)
    assert "{ sigchld }" in strace_failure(text.splitlines()[-1])
    assert "ptrace attach refused" in strace_failure(
        "strace: attach: ptrace(PTRACE_SEIZE, 4242): Operation not permitted")
    assert strace_failure("strace: Process 1 attached") is None


def test_socket_inode_decoration_keeps_connect_and_sends() -> None:
    lines = [
        "100 1.0 socket(AF_INET, SOCK_STREAM, IPPROTO_TCP) = 46<socket:[98770]>",
        '100 1.1 connect(46<socket:[98770]>, {sa_family=AF_INET, sin_port=htons(443), '
        'sin_addr=inet_addr("1.2.3.4")}, 16) = -1 EINPROGRESS (Operation now in progress)',
        '100 1.2 sendto(46<socket:[98770]>, "x", 1, MSG_NOSIGNAL, NULL, 0) = 1',
        '100 1.3 recvfrom(46<socket:[98770]>, "y", 10, 0, NULL, NULL) = 1',
        # opened before strace attached, family unknown: the inode alone, then a sockaddr
        '100 1.4 sendmsg(47<socket:[98771]>, {msg_name={sa_family=AF_INET6, '
        'sin6_port=htons(3478), sin6_flowinfo=htonl(0), inet_pton(AF_INET6, '
        '"2001:db8::1", &sin6_addr), sin6_scope_id=0}, msg_namelen=28}, 0) = 20',
        '100 1.5 write(48<socket:[98772]>, "z", 1) = 1',
        "100 1.6 close(46<socket:[98770]>) = 0",
        # fd 46 again, another inode: another socket
        '100 1.7 sendto(46<socket:[98775]>, "x", 1, 0, {sa_family=AF_INET, '
        'sin_port=htons(53), sin_addr=inet_addr("9.9.9.9")}, 16) = 1',
    ]
    obs = list(iter_socket_observations(lines, process="app.a"))
    got = [(o.kind, o.proto, o.local_port, o.remote_ip, o.remote_port, o.sock) for o in obs]
    assert got == [
        ("connect", 6, None, "1.2.3.4", 443, inode_sock_id(98770)),
        ("send", 6, None, "1.2.3.4", 443, inode_sock_id(98770)),
        ("recv", 6, None, "1.2.3.4", 443, inode_sock_id(98770)),
        ("send", 0, None, "2001:db8::1", 3478, inode_sock_id(98771)),
        ("send", 0, None, None, None, inode_sock_id(98772)),
        ("close", 6, None, "1.2.3.4", 443, inode_sock_id(98770)),
        ("send", 0, None, "9.9.9.9", 53, inode_sock_id(98775)),
    ]
    assert {o.label for o in obs} == {"app.a"}
    # The same calls with bare fds keep the sockaddr-bearing calls.
    bare = [re.sub(r"<socket:\[\d+\]>", "", ln) for ln in lines]
    kinds = [(o.kind, o.remote_ip, o.remote_port) for o in iter_socket_observations(bare, process="a")]
    assert kinds == [("connect", "1.2.3.4", 443), ("send", "1.2.3.4", 443),
                     ("recv", "1.2.3.4", 443), ("send", "2001:db8::1", 3478),
                     ("close", "1.2.3.4", 443), ("send", "9.9.9.9", 53)]


@pytest.mark.parametrize("form", ["yy", "inode"])
def test_a_close_overtaken_by_another_threads_socket_stays_with_the_old_socket(form: str) -> None:
    """Seen in a real -yy log: thread 8132's close(3) is <unfinished ...> while thread
    8133's socket() gets fd 3; the close resumes after it. The close names the old socket
    (another family, or another inode): the new socket keeps its own identity."""
    old = "UDP:[10.99.0.2:35774->10.99.0.1:9000]" if form == "yy" else "socket:[420900]"
    new_ret = "UDPv6:[420965]" if form == "yy" else "socket:[420965]"
    new = "UDPv6:[[::]:42276]" if form == "yy" else "socket:[420965]"
    lines = [
        "8132  1.000100 socket(AF_INET, SOCK_DGRAM|SOCK_CLOEXEC, IPPROTO_IP) = 3"
        + ("<UDP:[420900]>" if form == "yy" else "<socket:[420900]>"),
        f'8132  1.000200 sendto(3<{old}>, "u", 1, 0, NULL, 0) = 1' if form == "yy" else
        '8132  1.000200 sendto(3<socket:[420900]>, "u", 1, 0, {sa_family=AF_INET, '
        'sin_port=htons(9000), sin_addr=inet_addr("10.99.0.1")}, 16) = 1',
        "8133  1.001346 socket(AF_INET6, SOCK_DGRAM|SOCK_CLOEXEC, IPPROTO_IP <unfinished ...>",
        f"8132  1.001352 close(3<{old}> <unfinished ...>",
        f"8133  1.001382 <... socket resumed>) = 3<{new_ret}>",
        "8132  1.001439 <... close resumed>) = 0",
        f'8133  1.001615 sendto(3<{new_ret}>, "ping", 4, 0, {{sa_family=AF_INET6, '
        'sin6_port=htons(9000), sin6_flowinfo=htonl(0), inet_pton(AF_INET6, "fd99::1", '
        "&sin6_addr), sin6_scope_id=0}, 28) = 4",
        f'8133  1.001826 recvfrom(3<{new}>, "ping", 100, 0, NULL, NULL) = 4',
        f"8133  1.002427 close(3<{new}>) = 0",
    ]
    obs = list(iter_socket_observations(lines, process="app.a"))
    (send,) = [o for o in obs if o.remote_ip == "fd99::1"]
    v6 = [o for o in obs if o.sock == send.sock]
    assert [o.kind for o in v6] == ["send", "recv", "close"]
    assert all(o.local_ip is None and o.local_port in (None, 42276) for o in v6)
    v4 = [o for o in obs if o.sock != send.sock]
    assert "10.99.0.1" in {o.remote_ip for o in v4} and "close" in {o.kind for o in v4}


# ----------------------------------------------------------------------------- netstat

def test_proc_net_xcrash65_rows() -> None:
    st = ParseStats()
    rows = list(iter_socket_tables(REAL / "proc_net_xcrash65.log", st))
    got = [(r.table, r.local_ip, r.local_port, r.remote_ip, r.remote_port, r.uid, r.inode)
           for r in rows]
    assert got == [
        ("tcp", None, 2017, None, None, 1000, 22868379),
        ("tcp", None, 2018, None, None, 10023, 24657841),
        ("tcp", "127.0.0.1", 2026, None, None, 1000, 22509637),
        ("tcp", "127.0.0.1", 50001, None, None, 10019, 23317874),
        ("tcp", "127.0.0.1", 45568, "127.0.0.1", 50001, 10019, 23315778),
        ("tcp", "127.0.0.1", 50001, "127.0.0.1", 45562, 10019, 23317923),
        ("udp", None, 47158, None, None, 10059, 24542032),
        ("udp", "127.0.0.1", 38973, "127.0.0.1", 38389, 10019, 23317938),
        ("udp", "192.168.0.100", 68, "192.168.0.1", 67, 1000, 24176532),
        ("udp", None, 53332, None, None, 10082, 24661154),
    ]
    assert {r.ts for r in rows} == {1560000000.0}
    assert st.parsed == 10 and st.other.get("rows without an owner (inode 0)") == 1
    obs = list(iter_netstat_observations(REAL / "proc_net_xcrash65.log"))
    assert [o.kind for o in obs[:2]] == ["listen", "listen"]
    assert {o.sock for o in obs} == {r.inode for r in rows}


# ----------------------------------------------------------------------------- PCAPdroid

def test_pcapdroid_v16_header_and_current_layout(tmp_path: Path) -> None:
    # v1.6: the real header, a row in that layout (epoch milliseconds).
    header = (REAL / "pcapdroid_csv_header_issue352.txt").read_text().strip()
    assert len(header.split(",")) == 16
    old = tmp_path / "v16.csv"
    old.write_text(header + "\n6,10.0.0.5,43210,157.240.20.52,443,10245,WhatsApp,TLS,Closed,"
                   "g.whatsapp.net,5321,8123,21,19,1777888801123,1777888831456\n")
    st = ParseStats()
    (o,) = list(iter_pcapdroid_csv(old, st))
    assert (o.proto, o.local_ip, o.local_port, o.remote_ip, o.remote_port, o.uid, o.process,
            o.label) == (6, "10.0.0.5", 43210, "157.240.20.52", 443, 10245, "WhatsApp", None)
    assert (o.ts, o.end_ts) == (1777888801.123, 1777888831.456)
    # v1.7.4+: 17 columns with PackageName, ISO 8601 times with the phone's offset.
    st = ParseStats()
    (n,) = list(iter_pcapdroid_csv(REAL / "pcapdroid_csv_current_format.csv", st))
    assert st.skipped == {} and st.parsed == 1
    want = dt.datetime(2026, 5, 4, 10, 0, 1, 123000, tzinfo=dt.UTC).timestamp()
    assert n.ts == pytest.approx(want) and n.ts == pytest.approx(1777888801.123)
    assert n.end_ts == pytest.approx(1777888831.456)
    assert (n.proto, n.local_ip, n.local_port, n.remote_ip, n.remote_port, n.uid, n.process,
            n.label) == (6, "10.0.0.5", 43210, "157.240.20.52", 443, 10245, "WhatsApp",
                         "com.whatsapp")
    # Columns found by name: a reordered export reads the same.
    with open(REAL / "pcapdroid_csv_current_format.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    order = list(reversed(range(len(rows[0]))))
    moved = tmp_path / "moved.csv"
    with open(moved, "w", newline="") as fh:
        csv.writer(fh).writerows([[r[i] for i in order] for r in rows])
    (m,) = list(iter_pcapdroid_csv(moved))
    assert m == n


# ----------------------------------------------------------------------------- labelling

def _hex4(ip: str, port: int) -> str:
    a = bytes(int(x) for x in ip.split("."))[::-1].hex().upper()
    return f"{a}:{port:04X}"


def netstat_log(rows: list[tuple[str, int, str, int, int, int]], times: list[float]) -> str:
    """A poller log: (table, lport, rip, rport, uid, inode) rows in every snapshot."""
    out = []
    for t in times:
        for table in ("tcp", "udp"):
            out.append(f"=== {t:.6f} {table}\n  sl  local_address rem_address   st tx_queue "
                       "rx_queue tr tm->when retrnsmt   uid  timeout inode\n")
            for i, (tb, lport, rip, rport, uid, inode) in enumerate(rows):
                if tb == table:
                    out.append(f"  {i}: {_hex4(PHONE, lport)} {_hex4(rip, rport)} 01 "
                               f"00000000:00000000 00:00000000 00000000 {uid:5d}        0 "
                               f"{inode} 1 0000000000000000 20 4 30 10 -1\n")
    return "".join(out)


# The case of tests/test_label_cli.py: alpha (TCP 40001, UDP 40002), beta (TCP 40003)
# traced, and a fourth flow (TCP 40004) of an app nobody traced.
SOCKETS = [("tcp", 40001, "203.0.113.5", 443, UIDS[ALPHA], 1001),
           ("udp", 40002, "203.0.113.6", 3478, UIDS[ALPHA], 1002),
           ("tcp", 40003, "198.51.100.7", 443, UIDS[BETA], 2001),
           ("tcp", 40004, "198.51.100.8", 80, UIDS[OTHER], 3001)]


def packages_txt(names: dict[str, int]) -> str:
    """``pm list packages -U --show-versioncode`` as the session engine stores it."""
    return "".join(f"package:{p} versionCode:{i + 1} uid:{u}\n"
                   for i, (p, u) in enumerate(sorted(names.items())))


_DECOR = re.compile(r"(\d+)<([A-Za-z0-9]+):\[(.*?)\]>")


def undecorate(text: str, form: str, inodes: dict[tuple[int, int], int]) -> str:
    """An ``-yy`` strace log as strace prints it when its socket lookup fails
    (``form="inode"``: ``46<socket:[98770]>``) or without ``-yy`` (``form="bare"``: ``46``).

    A decoration's inode is the one strace printed for that fd (``TCP:[1001]``), else the
    netstat row's of its (protocol, local port), else a made-up one.
    """
    by_fd: dict[int, int] = {}  # per log: the threads of one process share their fds
    made = iter(range(900_000_000, 1_000_000_000))
    out = []
    for line in text.splitlines(keepends=True):

        def sub(m: re.Match[str]) -> str:
            fd, kind, inner = int(m.group(1)), m.group(2), m.group(3)
            if kind in ("pipe", "anon_inode"):
                return m.group(0)
            if form == "bare":
                return str(fd)
            key = fd
            if inner.isdigit():
                by_fd[key] = int(inner)
            elif key not in by_fd:
                lport = int(inner.split("->")[0].rsplit(":", 1)[1])
                proto = 6 if kind.startswith("TCP") else 17
                by_fd[key] = inodes.get((proto, lport)) or next(made)
            return f"{fd}<socket:[{by_fd[key]}]>"

        new = _DECOR.sub(sub, line)
        out.append(new)
        if " close(" in line:
            fd = re.search(r" close\((\d+)", line)
            if fd:
                by_fd.pop(int(fd.group(1)), None)
    return "".join(out)


@pytest.fixture
def case(tmp_path: Path) -> dict[str, Path]:
    pkts, _ = make_capture(tmp_path)
    pcap = write_pcap(tmp_path / "cap.pcap", pkts)
    yy = tmp_path / "yy"
    yy.mkdir()
    (yy / f"strace.4242.{ALPHA}.log").write_text(strace_alpha())
    (yy / f"strace.5151.{BETA}:push.log").write_text(strace_beta())
    ns = tmp_path / "netstat.log"
    # Polled every 50 ms while the flows ran.
    ns.write_text(netstat_log(SOCKETS, [T0 + 0.02 + 0.05 * k for k in range(14)]))
    pk = tmp_path / "packages.txt"
    pk.write_text(packages_txt(UIDS))
    return {"tmp": tmp_path, "pcap": pcap, "yy": yy, "netstat": ns, "packages": pk}


def _labels(res) -> list[tuple[str, str]]:  # type: ignore[no-untyped-def]
    t = res.table
    return list(zip(t.label_column("BF_label", "unknown").tolist(),
                    t.label_column("BF_labeling_type", "unlabelled").tolist(), strict=True))


@pytest.mark.parametrize("with_netstat", [False, True])
def test_undecorated_strace_gives_the_same_labels_as_yy(case: dict[str, Path],
                                                        with_netstat: bool) -> None:
    inodes = {(6 if tb == "tcp" else 17, lp): ino for tb, lp, _, _, _, ino in SOCKETS}
    kw = dict(netstat=case["netstat"], uid_map=case["packages"]) if with_netstat else {}
    want = label_capture([case["pcap"]], strace={"": [case["yy"]]}, device_ips=[PHONE],
                         targets=[ALPHA, BETA], **kw)
    expect = {ALPHA: 2, BETA: 1}
    got = [lab for lab, typ in _labels(want) if typ == "exact"]
    assert {k: got.count(k) for k in expect} == expect
    for form in ("inode", "bare"):
        d = case["tmp"] / form
        d.mkdir()
        for f in case["yy"].iterdir():
            text = undecorate(f.read_text(), form, inodes)
            assert ("<TCP" in text, "socket:[" in text) == (False, form == "inode")
            (d / f.name).write_text(text)
        res = label_capture([case["pcap"]], strace={"": [d]}, device_ips=[PHONE],
                            targets=[ALPHA, BETA], **kw)
        assert _labels(res) == _labels(want), form
        assert res.quality["inputs"]["strace"]["parsed"] == want.quality["inputs"]["strace"]["parsed"]


def test_socket_inode_joins_the_netstat_row_of_its_inode(case: dict[str, Path]) -> None:
    """A socket strace knows only as ``socket:[inode]`` (opened before tracing, no
    sockaddr in its calls) takes its ports from netstat's row of that inode: the flow is
    labelled by strace, although the package list lacks the uid netstat gives."""
    log = case["tmp"] / f"strace.4242.{ALPHA}.log"
    log.write_text(f'4242  {T0 + 0.05:.6f} sendto(5<socket:[1001]>, "hello", 5, MSG_NOSIGNAL, '
                   f"NULL, 0) = 5\n"
                   f"4242  {T0 + 0.1:.6f} close(5<socket:[1001]>) = 0\n")
    ns = case["tmp"] / "ns_one.log"
    ns.write_text(netstat_log([("tcp", 40001, "203.0.113.5", 443, 10777, 1001)],
                              [T0 + 0.02 + 0.05 * k for k in range(3)]))
    res = label_capture([case["pcap"]], strace={ALPHA: [log]}, netstat=ns, device_ips=[PHONE])
    t = res.table
    i = int(next(k for k in range(len(t)) if t.flows["src_port"][k] == 40001))
    assert t.label_column("BF_label")[i] == ALPHA
    assert t.label_column("BF_labeling_type")[i] == "exact"
    assert t.label_column("BF_label_source")[i] == "strace"
    # Without the inode (bare fd) only netstat's uid is left: uid:N, as the map lacks it.
    log.write_text(re.sub(r"<socket:\[\d+\]>", "", log.read_text()))
    res = label_capture([case["pcap"]], strace={ALPHA: [log]}, netstat=ns, device_ips=[PHONE])
    assert res.table.label_column("BF_label")[i] == "uid:10777"


def _by_port(res) -> dict[int, tuple[str, str, str]]:  # type: ignore[no-untyped-def]
    t = res.table
    return {int(t.flows["src_port"][i]): (t.label_column("BF_label")[i],
                                          t.label_column("BF_labeling_type")[i],
                                          t.label_column("BF_label_source")[i])
            for i in range(len(t))}


def test_background_app_named_by_the_package_list_offline_cli(case: dict[str, Path]) -> None:
    """The README recipe: ``flowtruth label --uid-map packages.txt`` (the engine's own
    ``pm list packages -U --show-versioncode`` output) names the untraced app."""
    out = case["tmp"] / "out"
    p = cli("--pcap", case["pcap"], "--strace", case["yy"], "--netstat", case["netstat"],
            "--uid-map", case["packages"], "--device-ip", PHONE, "--out", out, "-q")
    assert p.returncode == 0, p.stderr
    assert "1 background" in p.stdout
    rows = {int(r["local_port"]): r for r in csv.DictReader(open(out / "labels.csv"))}
    assert (rows[40004]["label"], rows[40004]["labeling_type"], rows[40004]["source"]) == (
        OTHER, "background", "uid-map+netstat")
    assert {rows[k]["label"] for k in (40001, 40002)} == {ALPHA}
    assert rows[40003]["label"] == BETA and rows[40003]["labeling_type"] == "exact"
    q = json.loads((out / "quality.json").read_text())
    assert q["by_type"]["background"]["flows"] == 1
    assert not any(r["label"].startswith("uid:") for r in rows.values())
    # uid:N only when the package list really lacks the uid.
    lacking = case["tmp"] / "lacking.txt"
    lacking.write_text(packages_txt({ALPHA: UIDS[ALPHA], BETA: UIDS[BETA]}))
    res = label_capture([case["pcap"]], strace={"": [case["yy"]]}, netstat=case["netstat"],
                        uid_map=lacking, device_ips=[PHONE])
    assert _by_port(res)[40004] == ("uid:10999", "unlabelled", "netstat")


def _run_dir(case: dict[str, Path], packages_field: str | None) -> Path:
    run = case["tmp"] / f"run_{packages_field}"
    (run / "strace").mkdir(parents=True)
    shutil.copy(case["pcap"], run / "capture.pcap")
    shutil.copy(case["netstat"], run / "netstat.log")
    for f in case["yy"].iterdir():
        shutil.copy(f, run / "strace" / f.name)
    shutil.copy(case["packages"], run / "packages.txt")
    (run / "manifest.json").write_text(json.dumps({
        "schema_version": 1,
        "device": {"serial": "X1", "model": "Pixel 7", "manufacturer": "Google",
                   "mac": "38:a4:ed:18:cc:bf", "ip": PHONE},
        "apps": [{"package": ALPHA, "uid": UIDS[ALPHA], "version": "1.0"}],
        "activity": "chat", "clock": {"offset_s": 0.0, "uncertainty_s": 0.002},
        "capture": {"files": ["capture.pcap"], "interface": "wlan1", "snaplen": 262144},
        "traces": {"strace": ["strace"], "netstat": "netstat.log", "frida": None,
                   "packages": packages_field},
        "started_at": "2023-11-14T22:13:20Z", "outcome": "completed",
    }))
    return run


@pytest.mark.parametrize("field", ["packages.txt", None])
def test_run_dir_labels_background_apps_from_its_packages_txt(case: dict[str, Path],
                                                             field: str | None) -> None:
    run = _run_dir(case, field)
    p = cli(run, "-q")
    assert p.returncode == 0, p.stderr
    rows = {int(r["local_port"]): r for r in csv.DictReader(open(run / "labels" / "labels.csv"))}
    # The session's app is alpha: beta, traced or not, is a background app here.
    assert rows[40001]["label"] == ALPHA and rows[40001]["labeling_type"] == "exact"
    assert rows[40004]["label"] == OTHER and rows[40004]["labeling_type"] == "background"
    assert rows[40004]["source"] == "uid-map+netstat"
    assert rows[40003]["label"] == BETA
    assert not any(r["label"].startswith("uid:") for r in rows.values())


def test_pcapdroid_export_of_the_same_sockets_labels_them(case: dict[str, Path]) -> None:
    """Offline: a PCAPdroid v1.7+ export (PackageName, ISO-8601 times at +02:00) of the
    capture's sockets labels them as strace does; a v1.6 export with a uid map too."""
    header = ("IPProto,SrcIP,SrcPort,DstIp,DstPort,UID,App,PackageName,Proto,Status,Info,"
              "BytesSent,BytesRcvd,PktsSent,PktsRcvd,FirstSeen,LastSeen")
    tz = dt.timezone(dt.timedelta(hours=2))

    def iso(t: float) -> str:
        return dt.datetime.fromtimestamp(t, tz).isoformat(timespec="milliseconds")

    owner = {v: k for k, v in UIDS.items()}
    new, old = [header], [header.replace("PackageName,", "")]
    for k, (tb, lport, rip, rport, uid, _) in enumerate(SOCKETS):
        proto = 6 if tb == "tcp" else 17
        t0, t1 = T0 - 0.01 + 0.5 * k, T0 + 0.15 + 0.5 * k
        pkg = owner[uid]
        new.append(f"{proto},{PHONE},{lport},{rip},{rport},{uid},{pkg.split('.')[-1]},{pkg},"
                   f"TLS,Closed,,10,20,1,2,{iso(t0)},{iso(t1)}")
        old.append(f"{proto},{PHONE},{lport},{rip},{rport},{uid},{pkg.split('.')[-1]},"
                   f"TLS,Closed,,10,20,1,2,{int(t0 * 1000)},{int(t1 * 1000)}")
    assert "+02:00" in new[1]
    (case["tmp"] / "new.csv").write_text("\n".join(new) + "\n")
    (case["tmp"] / "old.csv").write_text("\n".join(old) + "\n")
    want = {40001: ALPHA, 40002: ALPHA, 40003: BETA, 40004: OTHER}
    for name, extra in (("new.csv", []), ("old.csv", ["--uid-map", case["packages"]])):
        out = case["tmp"] / f"out_{name}"
        p = cli("--pcap", case["pcap"], "--pcapdroid", case["tmp"] / name, *extra,
                "--target", ALPHA, "--target", BETA, "--device-ip", PHONE, "--out", out, "-q")
        assert p.returncode == 0, p.stderr
        rows = {int(r["local_port"]): r for r in csv.DictReader(open(out / "labels.csv"))}
        assert {k: r["label"] for k, r in rows.items()} == want, name
        assert {rows[k]["source"] for k in (40001, 40002, 40003)} == {"pcapdroid"}
        assert rows[40004]["labeling_type"] == ("exact" if name == "new.csv" else "background")


def test_correlator_background_type_needs_targets_and_yields_to_strace() -> None:
    from analysis.correlate import FlowKeys

    fk = FlowKeys(proto=[6], src_ip=[PHONE], src_port=[40000], dst_ip=["1.2.3.4"],
                  dst_port=[443], first_ts=[T0], last_ts=[T0 + 1])
    ns = SocketObservation(T0, "netstat", 6, PHONE, 40000, "1.2.3.4", 443, "snapshot",
                           uid=10999, end_ts=T0 + 1, sock=7)
    st = SocketObservation(T0, "strace", 6, PHONE, 40000, "1.2.3.4", 443, "connect",
                           label=OTHER, sublabel=OTHER, sock=8)
    umap = {10999: (OTHER,)}

    def one(obs, targets):  # type: ignore[no-untyped-def]
        r = correlate(fk, obs, uid_map=umap, target_packages=targets).labels
        return r["BF_label"][0], r["BF_labeling_type"][0], r["BF_label_source"][0]

    assert one([ns], [ALPHA]) == (OTHER, "background", "uid-map+netstat")
    assert one([ns], [OTHER]) == (OTHER, "exact", "netstat")
    assert one([ns], []) == (OTHER, "exact", "netstat")
    assert one([ns, st], [ALPHA]) == (OTHER, "exact", "strace")
    r = correlate(fk, [ns], target_packages=[ALPHA], uid_map={1: ("x",)})
    assert r.labels["BF_label"][0] == "uid:10999"
    assert r.report["background"] == 0
    assert flowkeys_from_table  # the table path is covered by the CLI tests above
