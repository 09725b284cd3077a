"""Socket tables polled on the phone: our poller's log and plain ``netstat -tunape`` output.

**The poller log** (``device_scripts/netstat_poller.sh`` writes it) is a sequence of
blocks. Each block starts with a header line::

    === <epoch seconds with fraction> <tcp|tcp6|udp|udp6>

(one space between fields; the time is the phone's clock when the table was read, e.g.
``=== 1732800000.123456 tcp6``), followed by the raw content of ``/proc/net/<table>``
exactly as the kernel prints it: its column-header line (``sl local_address rem_address
st ...``) and one row per socket::

    0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000  10123  0 45678 ...

Row fields by whitespace: ``sl``, ``local_address``, ``rem_address`` (``HEXADDR:HEXPORT``;
IPv4 is one little-endian 32-bit word, IPv6 four of them; IPv4-mapped IPv6 becomes IPv4),
``st`` (hex state; 0A is TCP LISTEN, 06 TIME_WAIT), ``tx_queue:rx_queue``, ``tr:tm->when``,
``retrnsmt``, ``uid``, ``timeout``, ``inode``, then anything. A block ends at the next
``===`` line or the end of the file; blank lines are ignored. Rows with inode 0
(TIME_WAIT and orphaned sockets) carry no owner and are skipped.

A socket (one inode and one local/remote pair in one table) seen in consecutive
snapshots of its table becomes one observation whose ``ts``/``end_ts`` are the first
and last snapshot it appeared in.

**Plain netstat** (toybox on Android, busybox, net-tools), e.g. ``netstat -tunape``::

    Proto Recv-Q Send-Q Local Address    Foreign Address   State       User     Inode  PID/Program name
    tcp        0      0 10.0.0.5:43210   1.2.3.4:443       ESTABLISHED u0_a123  45678  5678/com.whatsapp
    udp        0      0 0.0.0.0:5353     0.0.0.0:*                     1000     910    910/mdnsd

``User`` and ``Inode`` exist only with ``-e``; ``PID/Program name`` only with ``-p``.
Users are numeric uids or Android names (``root``, ``system``, ``u0_a123`` = 10123).
The output has no time: pass ``ts=``, or put ``=== <epoch> netstat`` lines before each
dump. The program name is the kernel's (possibly truncated) command name, so it is kept
as ``process`` and never used as the package.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from analysis.errors import ParseError
from analysis.traces.model import ParseStats, SocketObservation, norm_ip

TABLES = {"tcp": 6, "tcp6": 6, "udp": 17, "udp6": 17, "udplite": 17, "udplite6": 17}
TCP_LISTEN = 0x0A
TCP_TIME_WAIT = 0x06
_RE_HEADER = re.compile(r"^=== +(\d+(?:\.\d*)?) +([A-Za-z0-9]+)\s*$")
_ANDROID_USERS = {"root": 0, "system": 1000, "radio": 1001, "bluetooth": 1002, "wifi": 1010,
                  "dhcp": 1014, "media": 1013, "shell": 2000, "nobody": 9999,
                  "dns_tether": 1052, "network_stack": 1073, "gps": 1021, "clat": 1029}
_RE_APP_USER = re.compile(r"^u(\d+)_([ai])(\d+)$")


@dataclass(frozen=True, slots=True)
class SocketTableRow:
    """One socket in one snapshot of a kernel socket table."""

    ts: float
    table: str  # tcp, tcp6, udp, udp6
    local_ip: str | None
    local_port: int
    remote_ip: str | None
    remote_port: int | None
    state: int
    uid: int | None
    inode: int | None
    pid: int | None = None
    process: str | None = None


def hex_addr(text: str) -> str | None:
    """A /proc/net address (``0100007F`` or 32 hex digits) as text; IPv4-mapped -> IPv4."""
    raw = bytes.fromhex(text)
    if len(raw) == 4:
        return norm_ip(".".join(str(b) for b in raw[::-1]))
    if len(raw) == 16:
        b = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
        import ipaddress

        return norm_ip(str(ipaddress.IPv6Address(b)))
    raise ValueError(f"address of {len(raw)} bytes")


def _hex_endpoint(text: str) -> tuple[str | None, int]:
    addr, _, port = text.partition(":")
    return hex_addr(addr), int(port, 16)


def android_uid(user: str) -> int | None:
    """A uid from netstat's User column: a number, ``u0_a123`` (10123) or a known name."""
    if user.isdigit():
        return int(user)
    m = _RE_APP_USER.match(user)
    if m:
        base = 10000 if m.group(2) == "a" else 90000
        return int(m.group(1)) * 100000 + base + int(m.group(3))
    return _ANDROID_USERS.get(user)


def _open(source: str | os.PathLike[str] | Iterable[str]) -> Iterable[str]:
    if isinstance(source, (str, os.PathLike)):
        try:
            fh = open(Path(source), encoding="utf-8", errors="replace")  # noqa: SIM115
        except OSError as e:
            raise ParseError(source, None, f"cannot read socket table log: {e.strerror or e}") from None

        def lines() -> Iterator[str]:
            with fh:
                yield from fh

        return lines()
    return source


def iter_socket_tables(
    source: str | os.PathLike[str] | Iterable[str],
    stats: ParseStats | None = None,
    *,
    ts: float | None = None,
) -> Iterator[SocketTableRow]:
    """Rows of a poller log or of plain netstat output (both may be mixed), lazily."""
    st = stats if stats is not None else ParseStats()
    now = float("nan") if ts is None else float(ts)
    table: str | None = None  # /proc table of the current poller block
    plain_cols: list[str] | None = None  # plain netstat header, when one was seen
    warned_time = False
    n = parsed = 0
    for line in _open(source):
        n += 1
        s = line.strip()
        if not s:
            continue
        if s.startswith("==="):
            m = _RE_HEADER.match(s)
            if m is None:
                st.skip("bad block header")
                table = None
                continue
            now = float(m.group(1))
            t = m.group(2).lower()
            table = t if t in TABLES else None
            if table is None and t != "netstat":
                st.skip("unknown table")
            continue
        first = s.split(None, 1)[0]
        if first == "sl":  # /proc header line
            continue
        if first in ("Proto", "Active"):
            if first == "Proto":
                plain_cols = s.split()
            continue
        try:
            if first.endswith(":") and first[:-1].isdigit():
                if table is None:
                    st.skip("table row outside a block")
                    continue
                row = _proc_row(s, now, table)
            elif first in TABLES:
                row = _plain_row(s, now, first, plain_cols)
            else:
                st.skip("garbage")
                continue
        except (ValueError, IndexError):
            st.skip("bad row")
            continue
        if row is None:
            st.note("rows without an owner (inode 0)")
            continue
        if row.ts != row.ts and not warned_time:
            st.warnings.append("netstat output without a time: pass ts= or === lines")
            warned_time = True
        parsed += 1
        yield row
    st.lines += n
    st.parsed += parsed


def _proc_row(s: str, ts: float, table: str) -> SocketTableRow | None:
    f = s.split()
    lip, lport = _hex_endpoint(f[1])
    rip, rport = _hex_endpoint(f[2])
    state = int(f[3], 16)
    uid = int(f[7])
    inode = int(f[9])
    if inode == 0:
        return None
    return SocketTableRow(ts, table, lip, lport, rip, rport or None, state, uid, inode)


_PLAIN_STATES = {"ESTABLISHED": 1, "SYN_SENT": 2, "SYN_RECV": 3, "FIN_WAIT1": 4,
                 "FIN_WAIT2": 5, "TIME_WAIT": 6, "CLOSE": 7, "CLOSE_WAIT": 8, "LAST_ACK": 9,
                 "LISTEN": 10, "CLOSING": 11}


def _endpoint(text: str) -> tuple[str | None, int | None]:
    ip, _, port = text.rpartition(":")
    return norm_ip(ip), (int(port) if port.isdigit() and port != "0" else None)


def _plain_row(s: str, ts: float, proto: str, cols: list[str] | None) -> SocketTableRow | None:
    f = s.split()
    lip, lport = _endpoint(f[3])
    rip, rport = _endpoint(f[4])
    if lport is None:
        raise ValueError("no local port")
    rest = f[5:]
    state = 7
    if rest and rest[0] in _PLAIN_STATES:
        state = _PLAIN_STATES[rest.pop(0)]
    elif rest and rest[0].isupper() and rest[0].isalpha() and "/" not in rest[0]:
        rest.pop(0)  # a state this parser does not name
    extended = cols is not None and "User" in cols
    uid = inode = pid = None
    process = None
    if extended or (len(rest) >= 3 and rest[1].isdigit()):
        if len(rest) >= 2:
            uid = android_uid(rest[0])
            inode = int(rest[1]) if rest[1].isdigit() else None
            rest = rest[2:]
    if rest and "/" in rest[0]:
        p, _, name = " ".join(rest).partition("/")
        pid = int(p) if p.isdigit() else None
        process = name.strip() or None
    if proto.startswith("tcp") and state == TCP_TIME_WAIT:
        return None
    if inode == 0:
        return None
    table = proto if proto in TABLES else proto.rstrip("6")
    return SocketTableRow(ts, table, lip, lport, rip, rport, state, uid, inode, pid, process)


def iter_netstat_observations(
    source: str | os.PathLike[str] | Iterable[str] | Iterable[SocketTableRow],
    stats: ParseStats | None = None,
    *,
    ts: float | None = None,
) -> Iterator[SocketObservation]:
    """One observation per socket lifetime: its first and last consecutive snapshot.

    A lifetime ends when a later snapshot of its table no longer shows the socket; it is
    yielded then (so memory holds only open sockets), the rest at the end of the input.
    Rows without a time (plain netstat without ``ts=``) are point observations at NaN
    and so never match a flow; they still count.
    """
    rows: Iterable[SocketTableRow]
    if isinstance(source, (str, os.PathLike)):
        rows = iter_socket_tables(source, stats, ts=ts)
    else:
        it = iter(source)
        first = next(it, None)
        if first is None:
            return
        if isinstance(first, SocketTableRow):
            rows = _prepend(first, it)
        else:
            rows = iter_socket_tables(_prepend(first, it), stats, ts=ts)
    # table -> {socket key -> [first ts, last ts, row, last snapshot seen]}
    by_table: dict[str, dict[tuple, list]] = {}
    snap: dict[str, float] = {}  # table -> time of its current snapshot
    for r in rows:
        prev = snap.get(r.table)
        open_ = by_table.setdefault(r.table, {})
        if prev is not None and r.ts != prev and r.ts == r.ts:
            # A new snapshot of this table began: sockets absent from the previous end.
            yield from _close_absent(open_, prev)
        snap[r.table] = r.ts
        key = (r.inode, r.local_ip, r.local_port, r.remote_ip, r.remote_port)
        cur = open_.get(key)
        if cur is None:
            open_[key] = [r.ts, r.ts, r, r.ts]
        else:
            cur[1] = r.ts
            cur[3] = r.ts
            if r.uid is not None and cur[2].uid is None:
                cur[2] = r
    for open_ in by_table.values():
        for first_ts, last_ts, r, _ in open_.values():
            yield _obs(r, first_ts, last_ts)


def _prepend(first, rest) -> Iterator:
    yield first
    yield from rest


def _close_absent(open_: dict[tuple, list], prev: float) -> Iterator[SocketObservation]:
    gone = [k for k, v in open_.items() if v[3] != prev]
    for k in gone:
        first_ts, last_ts, r, _ = open_.pop(k)
        yield _obs(r, first_ts, last_ts)


def _obs(r: SocketTableRow, first: float, last: float) -> SocketObservation:
    kind = "listen" if (TABLES[r.table] == 6 and r.state == TCP_LISTEN) else "snapshot"
    return SocketObservation(
        first, "netstat", TABLES[r.table], r.local_ip, r.local_port, r.remote_ip, r.remote_port,
        kind, r.pid, r.uid, r.process, None, None, last if last != first else None, r.inode,
    )
