"""Socket events from our frida agent: JSON lines, one event per line.

Schema (the agent in ``device_scripts`` writes it; one JSON object per line, UTF-8)::

    {"ts": 1732800000.123456,        # epoch seconds (float), the phone's clock
     "event": "connect",             # connect | sendto | sendmsg | send | recvfrom | recv
                                     #   | getaddrinfo | close
     "pid": 12345, "tid": 12350,     # process and thread ids
     "fd": 84,                       # the socket's file descriptor (-1/absent for getaddrinfo)
     "proto": "tcp",                 # tcp | udp
     "family": 6,                    # 4 | 6
     "local": {"ip": "10.0.0.5", "port": 43210},     # null / port 0 when not yet bound
     "remote": {"ip": "1.2.3.4", "port": 443},       # null when unknown (connected send)
     "host": "chat.signal.org",      # name resolved, for getaddrinfo; else null
     "ret": 0,                       # the call's return value (-1 on error)
     "errno": "EINPROGRESS",         # optional, with ret -1
     "process": "org.thoughtcrime.securesms"}        # optional: "pkg" or "pkg:service"

IPv4-mapped IPv6 addresses become IPv4. ``connect`` with ``ret`` -1 counts unless
``errno`` says nothing was sent (a non-blocking connect gives EINPROGRESS). ``getaddrinfo``
events carry no socket and are skipped (counted as ``name lookups``). ``send`` and
``recv`` (on a connected socket, so ``remote`` is null) count as sends and receives like
``sendto`` and ``recvfrom``. A socket is ``(pid, fd)`` from its first event to its
``close``; its local port, once known, is remembered for its later events, and a pid's
``process``, once given, for its later events. Damaged lines are counted, never fatal.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from analysis.errors import ParseError
from analysis.traces.model import ParseStats, SocketObservation, new_sock_id, norm_ip, split_process

_KIND = {"connect": "connect", "sendto": "send", "sendmsg": "send", "send": "send",
         "write": "send", "recvfrom": "recv", "recvmsg": "recv", "recv": "recv",
         "read": "recv", "close": "close", "accept": "accept", "bind": "snapshot",
         "getsockname": "snapshot"}
_PROTO: dict[str | int, int] = {"tcp": 6, "udp": 17, 6: 6, 17: 17}
_NO_EFFECT = {"EBADF", "ENOTSOCK", "EINVAL", "EAFNOSUPPORT", "EFAULT", "EACCES", "EPERM",
              "ENETUNREACH", "EADDRNOTAVAIL", "EISCONN"}


def _lines(source: str | os.PathLike[str] | Iterable[str]) -> Iterable[str]:
    if isinstance(source, (str, os.PathLike)):
        try:
            fh = open(Path(source), encoding="utf-8", errors="replace")  # noqa: SIM115
        except OSError as e:
            raise ParseError(source, None, f"cannot read frida events: {e.strerror or e}") from None

        def gen() -> Iterator[str]:
            with fh:
                yield from fh

        return gen()
    return source


def _endpoint(d: object) -> tuple[str | None, int | None]:
    if not isinstance(d, dict):
        return None, None
    ip = d.get("ip")
    port = d.get("port")
    ip = norm_ip(ip) if isinstance(ip, str) else None
    port = port if isinstance(port, int) and 0 < port < 65536 else None
    return ip, port


def iter_frida_events(
    source: str | os.PathLike[str] | Iterable[str],
    stats: ParseStats | None = None,
    *,
    process: str | None = None,
) -> Iterator[SocketObservation]:
    """Socket observations from the agent's JSON lines (``process`` if events lack one)."""
    st = stats if stats is not None else ParseStats()
    procs: dict[int | None, str] = {}  # pid -> the process name its events gave
    socks: dict[tuple[int, int], list] = {}  # (pid, fd) -> [sock id, local ip, local port]
    n = parsed = 0
    for line in _lines(source):
        n += 1
        s = line.strip()
        if not s:
            continue
        try:
            e = json.loads(s)
        except (ValueError, RecursionError):  # RecursionError: nested past the limit
            st.skip("not JSON")
            continue
        if not isinstance(e, dict):
            st.skip("not a JSON object")
            continue
        ev = e.get("event")
        if ev == "getaddrinfo":
            st.note("name lookups")
            continue
        kind = _KIND.get(ev) if isinstance(ev, str) else None
        ts = e.get("ts")
        p_raw = e.get("proto")
        proto = _PROTO.get(p_raw) if isinstance(p_raw, (str, int)) else None
        if kind is None:
            st.skip("unknown event")
            continue
        if not isinstance(ts, (int, float)) or ts != ts or proto is None:
            st.skip("missing ts or proto")
            continue
        pid = e.get("pid") if isinstance(e.get("pid"), int) else None
        if (pid is not None and not 0 <= pid < 1 << 31) or not -1e12 < ts < 1e12:
            st.skip("pid or ts out of range")  # int32 pid column; a huge int ts
            continue
        fd = e.get("fd") if isinstance(e.get("fd"), int) else None
        errno = e.get("errno")
        ret = e.get("ret")
        if kind == "connect" and isinstance(ret, int) and ret < 0 \
                and isinstance(errno, str) and errno in _NO_EFFECT:
            st.note("failed connects")
            continue
        if kind in ("send", "recv") and isinstance(ret, int) and ret < 0:
            st.note("failed transfers")
            continue
        lip, lport = _endpoint(e.get("local"))
        rip, rport = _endpoint(e.get("remote"))
        key = (pid if pid is not None else -1, fd if fd is not None else -1)
        state = socks.get(key) if fd is not None else None
        if state is None or (kind == "connect" and state[3]):
            state = [new_sock_id(), None, None, False]
            if fd is not None:
                socks[key] = state
        if lport is not None:
            state[1], state[2] = lip, lport
        else:
            lip, lport = state[1], state[2]
        if kind == "connect":
            state[3] = True
        if kind == "close":
            socks.pop(key, None)
        if lport is None and rport is None:
            st.note("events without an address")
            continue
        proc = e.get("process")
        if isinstance(proc, str) and proc:
            procs[pid] = proc
        else:
            proc = procs.get(pid, process)
        label, sublabel = split_process(proc)
        parsed += 1
        yield SocketObservation(float(ts), "frida", proto, lip, lport, rip, rport, kind, pid,
                                None, proc, label, sublabel, None, state[0])
    st.lines += n
    st.parsed += parsed
