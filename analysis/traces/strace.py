"""strace logs to :class:`Syscall` and :class:`SocketObservation` records.

Understood shapes (any mix of them in one file):

* our launcher's ``strace -f -ttt -yy -e trace=%network,close -o FILE``: lines start
  with the thread id, then epoch seconds;
* ``[pid N]`` prefixes (``-f`` without ``-o``; the first thread has no prefix);
* ``-ff`` per-thread files ``PREFIX.<pid>`` (no pid on the line; the file suffix is it);
* ``-tt``/``-t`` time of day (needs the day: ``date=``, from the run manifest or
  ``--date``; midnight wrap is followed), ``-ttt`` epoch seconds, no time at all;
* ``-T`` durations, ``-y``/``-yy`` fd decorations (``3<TCP:[a:p->b:q]>``, ``UDPv6:[...]``,
  ``TCP:[inode]``), ``46<socket:[98770]>`` (strace's own socket lookup failed: no
  protocol, no addresses; strace ``src/socketutils.c``) or none (a bare ``46``);
* ``<unfinished ...>`` joined with ``<... name resumed>`` per pid, timed at the entry.

Socket identity comes from the strongest evidence on the line: the ``-yy`` decoration's
addresses, else the syscall's own sockaddr (``connect``/``sendto``/``sendmsg``/``bind``;
a socket of unknown type stands for TCP and UDP), else the kernel inode of a
``socket:[inode]``/``TCP:[inode]`` decoration, which the observation keeps as its socket
id (:func:`analysis.traces.model.inode_sock_id`) so the correlator takes the ports from
the netstat poller's row of that inode.

Damaged lines never stop a parse: :class:`ParseStats` counts them by reason
(``garbage``, ``truncated last line``, ``unmatched resumed``, ...).

The launcher writes one log per traced process, named ``strace.<pid>.<procname>.log``;
:func:`process_from_filename` reads that name. File descriptors are tracked per log
(threads share their process's fd table), unfinished calls per thread.
"""

from __future__ import annotations

import datetime as _dt
import heapq
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from analysis.errors import BadInputError, ParseError
from analysis.traces.model import (
    ParseStats,
    SocketObservation,
    Syscall,
    inode_sock_id,
    make_observation,
    make_syscall,
    new_sock_id,
    norm_ip,
    split_process,
)

# Prefix: optional pid ("123 " or "[pid 123] "), optional time ("1.5 " / "12:00:01.5 ").
_PREFIX = r"(?:(\d+) +|\[pid +(\d+)\] +)?(?:(\d+\.\d+|\d\d?:\d\d:\d\d(?:\.\d+)?) +)?"
# A complete call: the greedy args stop at the last ") = " of the line.
_RE_FULL = re.compile(
    _PREFIX + r"([a-z_][a-z0-9_]*)\((.*)\) += (-?\d+|\?|0x[0-9a-fA-F]+)(?:<(\S*)>)?"
    r"(?: (E[A-Z0-9_]+)(?: \([^)]*\))?)?(?: \(.*?\))?(?: <\d+\.\d+>)?\s*$"
)
_RE_UNFINISHED = re.compile(_PREFIX + r"([a-z_][a-z0-9_]*)\((.*?)<unfinished \.\.\.>\s*$")
_RE_RESUMED = re.compile(
    _PREFIX + r"<\.\.\. ([a-z_][a-z0-9_]*) resumed> ?(.*) += (-?\d+|\?|0x[0-9a-fA-F]+)"
    r"(?:<(\S*)>)?(?: (E[A-Z0-9_]+)(?: \([^)]*\))?)?(?: \(.*?\))?(?: <\d+\.\d+>)?\s*$"
)
_RE_OTHER = re.compile(_PREFIX + r"(?:---|\+\+\+|strace: )")
# strace's own messages as a shell shows them ("/data/local/strace: Process 2815 attached").
_RE_STRACE_MSG = re.compile(r"^\S*strace: ")
_RE_AVC = re.compile(r"avc: +denied +\{ *([a-z_ ]+?) *\}.*?comm=\"?strace")

# What strace's own messages say when tracing failed, in the words a user can act on.
_FAILURES = (
    (re.compile(r"wait4\(__WALL\): Permission denied"),
     "SELinux denied strace the traced process's signals (wait4(__WALL): Permission denied; "
     "Magisk issue 596): the process ran untraced"),
    (re.compile(r"attach: ptrace\(PTRACE_(?:SEIZE|ATTACH)[^)]*\): Operation not permitted"),
     "ptrace attach refused (Operation not permitted): a vendor ptrace block, an app that "
     "traces itself, or yama ptrace_scope"),
    (re.compile(r"attach: ptrace\(PTRACE_(?:SEIZE|ATTACH)[^)]*\): Permission denied"),
     "ptrace attach denied (Permission denied): SELinux policy forbids strace"),
    (re.compile(r"Can't open .*: (?:File name too long|No such file or directory)"),
     "strace could not open its log file (a hostile process name?)"),
)


def strace_failure(text: str) -> str | None:
    """Why tracing failed, read from strace's (or its launcher's) own output; None when
    nothing there says so. Recognises SELinux's ``avc: denied { sigchld }`` followed by
    ``wait4(__WALL): Permission denied`` (Magisk issue 596) and refused ptrace attaches."""
    for rx, why in _FAILURES:
        if rx.search(text):
            return why
    m = _RE_AVC.search(text)
    if m is not None:
        return f"SELinux denied strace {{ {m.group(1)} }} (avc: denied)"
    return None
_RE_LAUNCHER_NAME = re.compile(r"^strace\.(\d+)\.(.+)\.log$")

NAN = float("nan")


_RE_PID_ONLY_NAME = re.compile(r"strace\.(\d{1,10})\.log\Z")
_RE_PROCS_LINE = re.compile(r"(\d{1,10}) ([A-Za-z0-9_:-][A-Za-z0-9._:-]{0,99})\Z")


def launcher_procs(directory: str | os.PathLike[str]) -> dict[int, str]:
    """pid -> process name from the launcher's ``strace_launcher.procs`` ("<pid> <name>"
    lines) in ``directory``; lines that are not one safe name are left out."""
    out: dict[int, str] = {}
    try:
        with open(Path(directory) / "strace_launcher.procs", encoding="utf-8",
                  errors="replace") as f:
            for n, line in enumerate(f):
                if n >= 100_000:
                    break
                m = _RE_PROCS_LINE.match(line.rstrip("\r\n"))
                if m:
                    out.setdefault(int(m.group(1)), m.group(2))
    except OSError:
        pass
    return out


def process_from_filename(path: str | os.PathLike[str]) -> tuple[int, str] | None:
    """(pid, process name) from our launcher's log names: ``strace.<pid>.<procname>.log``,
    or ``strace.<pid>.log`` (what the launcher writes on the phone) with the name from the
    ``strace_launcher.procs`` file beside it; else None."""
    p = Path(path)
    m = _RE_LAUNCHER_NAME.match(p.name)
    if m:
        return int(m.group(1)), m.group(2)
    m = _RE_PID_ONLY_NAME.match(p.name)
    if m:
        name = launcher_procs(p.parent).get(int(m.group(1)))
        if name is not None:
            return int(m.group(1)), name
    return None


class _Clock:
    """Turns strace's time text into epoch seconds (time-of-day needs a date)."""

    __slots__ = ("day0", "tz", "last_sod", "day_shift", "path")

    def __init__(self, date: str | _dt.date | None, utc_offset: float, path: str | None):
        self.path = path
        self.day0: float | None = None
        if date is not None:
            d = _dt.date.fromisoformat(date) if isinstance(date, str) else date
            midnight = _dt.datetime(d.year, d.month, d.day, tzinfo=_dt.UTC)
            self.day0 = midnight.timestamp() - utc_offset
        self.last_sod = -1.0
        self.day_shift = 0.0

    def tod(self, text: str) -> float:
        if self.day0 is None:
            raise BadInputError(
                f"{self.path or '<input>'}: strace log has time of day (-tt) but no date",
                "give the run's date (--date YYYY-MM-DD, or a run manifest)",
            )
        h, m, s = text.split(":")
        sod = int(h) * 3600 + int(m) * 60 + float(s)
        if sod < self.last_sod - 43200:  # the log crossed midnight
            self.day_shift += 86400.0
        self.last_sod = sod
        return self.day0 + self.day_shift + sod


def _lines_of(source: str | os.PathLike[str] | Iterable[str]) -> tuple[Iterable[str], str | None]:
    if isinstance(source, (str, os.PathLike)):
        p = Path(source)
        try:
            fh = open(p, encoding="utf-8", errors="replace")  # noqa: SIM115 - closed by the generator
        except OSError as e:
            raise ParseError(p, None, f"cannot read strace log: {e.strerror or e}") from None
        return _closing_lines(fh), str(p)
    return source, None


def _closing_lines(fh) -> Iterator[str]:
    with fh:
        yield from fh


def ff_files(prefix: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """The ``-ff`` per-thread files ``PREFIX.<pid>`` (sorted by pid)."""
    p = Path(prefix)
    out = []
    if p.parent.is_dir():
        for q in p.parent.iterdir():
            if q.name.startswith(p.name + "."):
                tail = q.name[len(p.name) + 1:]
                if tail.isdigit():
                    out.append((int(tail), q))
    return sorted(out)


def iter_syscalls(
    source: str | os.PathLike[str] | Iterable[str],
    date: str | _dt.date | None = None,
    stats: ParseStats | None = None,
    *,
    utc_offset: float = 0.0,
    pid: int | None = None,
) -> Iterator[Syscall]:
    """Syscalls of one strace log (a path, or lines), lazily; damaged lines are counted.

    A path that does not exist but has ``-ff`` siblings ``PATH.<pid>`` reads those,
    merged by time. ``pid`` is the thread id for lines that carry none (``-ff``); the
    time-of-day shapes need ``date`` (and ``utc_offset``, seconds east of UTC).
    """
    st = stats if stats is not None else ParseStats()
    if isinstance(source, (str, os.PathLike)) and not Path(source).exists():
        parts = ff_files(source)
        if not parts:
            raise ParseError(source, None, "no such strace log (nor -ff files PATH.<pid>)")
        iters = [iter_syscalls(q, date, st, utc_offset=utc_offset, pid=p) for p, q in parts]
        yield from heapq.merge(*iters, key=lambda c: c.ts)
        return
    lines, path = _lines_of(source)
    yield from _parse(lines, path, date, utc_offset, -1 if pid is None else pid, st)


_UNFINISHED = "<unfinished ...>"
_UNFINISHED_NL = _UNFINISHED + "\n"


def _fast_ret(rest: str) -> tuple[int, str | None, str | None] | None:
    """(retval, errno, fd decoration) of the text after ``) = ``; None when unusual."""
    tok, _, more = rest.rstrip().partition(" ")
    decor = None
    if "<" in tok:
        tok, _, decor = tok.partition("<")
        decor = decor[:-1]
        if "<" in more and not more.startswith("<"):
            return None  # a decoration with a space: let the regex decide
    try:
        ret = int(tok)
    except ValueError:
        return None
    err = None
    if ret < 0 and more[:1] == "E":
        err = more.split(" ", 1)[0]
    return ret, err, decor


def _ret(text: str) -> int | None:
    if text == "?":
        return None
    return int(text, 16) if text.startswith("0x") else int(text)


def _parse(lines: Iterable[str], path: str | None, date, utc_offset: float, default_pid: int,
           st: ParseStats) -> Iterator[Syscall]:
    clock = _Clock(date, utc_offset, path)
    pending: dict[int, tuple[float, str, str]] = {}  # pid -> (ts, name, args) of an unfinished call
    full = _RE_FULL.match
    unfinished = _RE_UNFINISHED.match
    resumed = _RE_RESUMED.match
    other = _RE_OTHER.match
    n = 0
    parsed = 0
    last_ok = True
    last_line = ""
    mk = make_syscall
    for line in lines:
        n += 1
        # Fast paths for the launcher's "PID TS ..." lines (complete, unfinished and
        # resumed calls) with plain string methods; anything unusual falls through to
        # the regexes below.
        head, sep, tail = line.partition("(")
        if sep:
            args, sep, rest = tail.rpartition(") = ")
            if sep:
                hp = head.split()
                if len(hp) == 3 and hp[0].isdigit() and hp[2].isidentifier() \
                        and ":" not in hp[1]:
                    r = _fast_ret(rest)
                    if r is not None:
                        try:
                            ts = float(hp[1])
                        except ValueError:
                            pass
                        else:
                            parsed += 1
                            yield mk(ts, int(hp[0]), hp[2], args, r[0], r[1], r[2])
                            last_ok = True
                            continue
            elif tail.endswith(_UNFINISHED_NL) or tail.endswith(_UNFINISHED):
                hp = head.split()
                if len(hp) == 3 and hp[0].isdigit() and hp[2].isidentifier() \
                        and ":" not in hp[1]:
                    try:
                        ts = float(hp[1])
                    except ValueError:
                        pass
                    else:
                        p = int(hp[0])
                        if p in pending:
                            st.skip("unfinished call never resumed")
                        pending[p] = (ts, hp[2], tail[:tail.rindex(_UNFINISHED)])
                        parsed += 1
                        last_ok = True
                        continue
        if "resumed>" in line:
            sp = line.split(None, 4)
            if len(sp) == 5 and sp[2] == "<..." and sp[4].startswith("resumed>") \
                    and sp[0].isdigit() and ":" not in sp[1]:
                body, sep, rest = sp[4][8:].rpartition(" = ")
                r = _fast_ret(rest) if sep else None
                p = int(sp[0])
                entry = pending.get(p)
                if r is not None and entry is not None and entry[1] == sp[3]:
                    del pending[p]
                    if body.endswith(")"):  # old strace prints "<... x resumed> = 3"
                        body = body[:-1]
                    h, b = entry[2].rstrip(), body.lstrip()
                    parsed += 1
                    yield mk(entry[0], p, sp[3], h + (" " if b and h.endswith(",") else "") + b,
                             r[0], r[1], r[2])
                    last_ok = True
                    continue
        m = full(line)
        if m is not None:
            pa, pb, t, name, args, rtext, decor, err = m.groups()
            if t is None:
                ts = NAN
            elif ":" in t:
                ts = clock.tod(t)
            else:
                ts = float(t)
            parsed += 1
            yield mk(ts, int(pa or pb) if (pa or pb) else default_pid, name, args,
                     _ret(rtext), err, decor)
            last_ok = True
            continue
        last_line = line
        if "<unfinished" in line:
            m = unfinished(line)
            if m is not None:
                pa, pb, t, name, args = m.groups()
                p = int(pa or pb) if (pa or pb) else default_pid
                ts = NAN if t is None else (clock.tod(t) if ":" in t else float(t))
                if p in pending:
                    st.skip("unfinished call never resumed")
                pending[p] = (ts, name, args)
                parsed += 1
                last_ok = True
                continue
        elif "resumed>" in line:
            m = resumed(line)
            if m is not None:
                pa, pb, t, name, rest, rtext, decor, err = m.groups()
                p = int(pa or pb) if (pa or pb) else default_pid
                entry = pending.pop(p, None)
                if entry is None or entry[1] != name:
                    if entry is not None:
                        pending[p] = entry
                    st.skip("unmatched resumed")
                    last_ok = True
                    continue
                # Old strace prints "<... socket resumed> = 3" without the ")".
                if rest.endswith(")"):
                    rest = rest[:-1]
                h, tl = entry[2].rstrip(), rest.lstrip()
                args = h + (" " if tl and h.endswith(",") else "") + tl
                parsed += 1
                yield mk(entry[0], p, name, args, _ret(rtext), err, decor)
                last_ok = True
                continue
        if other(line) is not None and ("---" in line or "+++" in line or "strace: " in line):
            st.note("signals and exits")
            if "SIGSYS" in line and "SYS_SECCOMP" in line:
                st.note("seccomp SIGSYS")
            last_ok = True
            continue
        if _RE_STRACE_MSG.match(line) is not None or " avc: " in line:
            st.note("strace messages" if " avc: " not in line else "SELinux denials")
            why = strace_failure(line)
            if why is not None and why not in st.warnings:
                st.warnings.append(f"{path or 'strace log'}: {why}")
            last_ok = True
            continue
        if not line.strip():
            st.note("blank lines")
            last_ok = True
            continue
        st.skip("garbage")
        last_ok = False
    # A log cut mid-write leaves a last line without its newline that does not parse.
    if not last_ok and last_line and not last_line.endswith("\n"):
        st.skipped["garbage"] -= 1
        if not st.skipped["garbage"]:
            del st.skipped["garbage"]
        st.skip("truncated last line")
    for p, (ts, name, args) in pending.items():
        st.note("unfinished at end of log")
        yield Syscall(ts, p, name, args, None, None, None)
    st.lines += n
    st.parsed += parsed


# --------------------------------------------------------------------------- sockets

_RE_DECOR = re.compile(r"^\s*(-?\d+)(?:<([A-Za-z0-9]+):\[(.*)\]>|<[^>]*>)?")
_RE_SA_INET = re.compile(
    r"sa_family=AF_INET, sin_port=htons\((\d+)\), sin_addr=inet_addr\(\"([^\"]*)\"\)"
)
_RE_SA_INET6 = re.compile(
    r"sa_family=AF_INET6, sin6_port=htons\((\d+)\)[^}]*?inet_pton\(AF_INET6, \"([^\"]*)\""
)
_RE_SA_ANY = re.compile(r"sa_family=(AF_[A-Z0-9]+)")

_INET_CALLS = frozenset((
    "socket", "connect", "bind", "listen", "sendto", "sendmsg", "sendmmsg", "recvfrom",
    "recvmsg", "recvmmsg", "getsockname", "getpeername", "accept", "accept4", "close",
    "dup", "dup2", "dup3", "fcntl", "fcntl64", "write", "read", "writev", "readv",
))
# connect() results after which no packet can have left.
_CONNECT_NO_EFFECT = frozenset(("EBADF", "ENOTSOCK", "EINVAL", "EAFNOSUPPORT", "EFAULT",
                                "EACCES", "EPERM", "EADDRNOTAVAIL", "ENETUNREACH", "EISCONN"))
_DECOR_PROTO = {"TCP": 6, "TCPv6": 6, "UDP": 17, "UDPv6": 17, "UDPLITE": 17, "UDPLITEv6": 17}


@dataclass(slots=True)
class _Sock:
    sock: int
    proto: int | None  # 6/17; None when the fd is a socket of unknown type
    local_ip: str | None = None
    local_port: int | None = None
    remote_ip: str | None = None
    remote_port: int | None = None
    inet: bool = True  # False for AF_UNIX, netlink, ...
    inode: int | None = None  # kernel inode, from a socket:[N] / TCP:[N] decoration
    created: float = NAN  # when socket()/accept() was entered (NaN: unknown)
    family: int = 0  # 4 or 6 (AF_INET/AF_INET6), 0 when unknown

    def set_inode(self, inode: int) -> None:
        if self.inode is None:
            self.inode = inode
            self.sock = inode_sock_id(inode)


def _endpoint(text: str) -> tuple[str | None, int | None]:
    """``1.2.3.4:80`` / ``[::1]:80`` -> (ip, port)."""
    if text.startswith("["):
        ip, _, port = text[1:].rpartition("]:")
    else:
        ip, _, port = text.rpartition(":")
    if not port.isdigit():
        return None, None
    return norm_ip(ip), int(port)


def _sockaddr(args: str) -> tuple[str | None, int | None] | None:
    """The first inet sockaddr in an argument text: (ip, port); None when there is none."""
    if "sa_family=AF_INET" not in args:
        return None
    m = _RE_SA_INET.search(args)
    m6 = _RE_SA_INET6.search(args)
    if m is None and m6 is None:
        return None
    if m is None or (m6 is not None and m6.start() < m.start()):
        m = m6
    assert m is not None
    return norm_ip(m.group(2)), int(m.group(1))


def _all_sockaddrs(args: str) -> list[tuple[str | None, int]]:
    out = [(norm_ip(m.group(2)), int(m.group(1)), m.start()) for m in _RE_SA_INET.finditer(args)]
    out += [(norm_ip(m.group(2)), int(m.group(1)), m.start()) for m in _RE_SA_INET6.finditer(args)]
    out.sort(key=lambda x: x[2])
    return [(ip, port) for ip, port, _ in out]


def _parse_first_arg(first: str) -> tuple:
    """``84<TCPv6:[[::1]:5->[::1]:6]>`` -> (fd, proto, inet, (lip, lport)|None,
    (rip, rport)|None, inode|None).

    ``inet`` is None without a decoration or with strace's ``socket:[inode]`` (a socket
    of unknown family, the inode known), False for non-inet sockets, else the address
    family of the decoration (4 for ``TCP``/``UDP``, 6 for ``TCPv6``/``UDPv6``).
    """
    m = _RE_DECOR.match(first)
    if m is None:
        return None, None, None, None, None, None
    fd = int(m.group(1))
    kind = m.group(2)
    if kind is None:
        return fd, None, None, None, None, None
    inner = m.group(3)
    if kind == "socket":
        return fd, None, None, None, None, int(inner) if inner.isdigit() else None
    proto = _DECOR_PROTO.get(kind)
    if proto is None:
        return fd, None, False, None, None, None
    if inner.isdigit():
        return fd, proto, 6 if kind.endswith("v6") else 4, None, None, int(inner)
    local = remote = None
    if inner:
        lt, sep, rt = inner.partition("->")
        ip, port = _endpoint(lt)
        if port:
            local = (ip, port)
        if sep:
            ip, port = _endpoint(rt)
            if port:
                remote = (ip, port)
    return fd, proto, 6 if kind.endswith("v6") else 4, local, remote, None


def _other_socket(s: _Sock, proto: int | None, local: tuple | None, inode: int | None,
                  family: int) -> bool:
    """Whether a -yy decoration shows a different socket than the one tracked on its fd:
    another inode, address family or protocol, another local port, or no address where
    one was bound."""
    if inode is not None and s.inode is not None:
        return s.inode != inode
    if s.family and family and s.family != family:
        return True
    if s.proto is not None and proto is not None and s.proto != proto:
        return True
    if local is None:
        return s.local_port is not None
    return s.local_port is not None and local[1] != s.local_port


class _Tracker:
    """fd -> socket state of one process, turning syscalls into observations."""

    def __init__(self, process: str | None, label: str | None, sublabel: str | None,
                 uid: int | None, st: ParseStats) -> None:
        self.fds: dict[int, _Sock] = {}
        self.decor_cache: dict[str, tuple] = {}
        self.by_inode: dict[int, _Sock] = {}  # kernel inode -> its socket
        self.process = process
        self.label = label
        self.sublabel = sublabel
        self.uid = uid
        self.st = st

    def _obs(self, c: Syscall, s: _Sock, kind: str, remote: tuple[str | None, int | None] | None = None
             ) -> SocketObservation | None:
        rip, rport = remote if remote is not None else (s.remote_ip, s.remote_port)
        if s.local_port is None and rport is None and s.inode is None:
            return None
        return make_observation(
            c.ts, "strace", s.proto or 0, s.local_ip, s.local_port, rip, rport, kind, c.pid,
            self.uid, self.process, self.label, self.sublabel, None, s.sock, None,
        )

    def _fd(self, c: Syscall) -> tuple[int, _Sock | None]:
        """The first argument's fd and its state, updated from a -yy decoration."""
        first = c.args.split(",", 1)[0]
        d = self.decor_cache.get(first)
        if d is None:
            d = self.decor_cache[first] = _parse_first_arg(first)
            if len(self.decor_cache) > 100_000:
                self.decor_cache.clear()
        fd, proto, inet, local, remote, inode = d
        if fd is None:
            return -1, None
        s = self.fds.get(fd)
        if s is not None and c.ts < s.created:
            # Entered before the socket now on this fd existed (a close or send of the
            # fd's previous socket that another thread's socket() overtook while it was
            # <unfinished ...>): it belongs to that older socket, not this one.
            s = _Sock(new_sock_id(), proto, inet=inet is not False, family=inet or 0)
            if local is not None:
                s.local_ip, s.local_port = local
            if remote is not None:
                s.remote_ip, s.remote_port = remote
            return fd, s
        if inode is not None and (s is None or s.inode != inode):
            old = self.by_inode.get(inode)
            if old is not None:
                if s is None:
                    self.fds[fd] = old
                # else: a call of the fd's previous socket that another thread's
                # socket() overtook while it was <unfinished ...>: not the current one.
                return fd, old
        if inet is None:  # no decoration, or socket:[inode] (family unknown)
            if inode is not None:
                if s is None or (s.inode is not None and s.inode != inode):
                    # Maybe inet: the sockaddrs of its calls and the netstat row of its
                    # inode tell; without either it yields nothing usable.
                    s = self.fds[fd] = _Sock(new_sock_id(), None)
                self._set_inode(s, inode)
            return fd, s
        if not inet:  # UNIX, NETLINK, ...
            if s is None or s.inet:
                s = self.fds[fd] = _Sock(new_sock_id(), None, inet=False)
            return fd, s
        if s is None or not s.inet or _other_socket(s, proto, local, inode, inet):
            # (A close strace did not show, e.g. before it attached, reused the fd; or a
            # call of the fd's previous socket that another thread's socket() overtook.)
            s = self.fds[fd] = _Sock(new_sock_id(), proto, family=inet)
        elif s.proto is None:
            s.proto = proto
        if not s.family:
            s.family = inet
        if inode is not None:
            self._set_inode(s, inode)
        if local is not None:
            s.local_port = local[1]
            if local[0] is not None:  # a wildcard never hides the address getsockname gave
                s.local_ip = local[0]
        if remote is not None:
            s.remote_ip, s.remote_port = remote
        return fd, s

    def _set_inode(self, s: _Sock, inode: int) -> None:
        if s.inode is None:
            s.set_inode(inode)
            self.by_inode[inode] = s
            if len(self.by_inode) > 200_000:
                self.by_inode.clear()

    @staticmethod
    def _apply_decor(s: _Sock, inner: str) -> None:
        if not inner or inner.isdigit():  # only the inode: not bound or connected yet
            return
        local, sep, remote = inner.partition("->")
        ip, port = _endpoint(local)
        if port:
            s.local_port = port
            if ip is not None:
                s.local_ip = ip
        if sep:
            ip, port = _endpoint(remote)
            if port:
                s.remote_ip, s.remote_port = ip, port

    def _new(self, fd: int, decor: str | None, proto: int | None, inet: bool) -> _Sock:
        s = _Sock(new_sock_id(), proto, inet=inet)
        if decor:
            kind, _, inner = decor.partition(":")
            p = _DECOR_PROTO.get(kind)
            body = inner[1:-1] if inner.startswith("[") and inner.endswith("]") else inner
            if p is not None:
                s.proto, s.inet = p, True
                s.family = 6 if kind.endswith("v6") else 4
                self._apply_decor(s, body)
            if (p is not None or kind == "socket") and body.isdigit():
                self._set_inode(s, int(body))
        self.fds[fd] = s
        return s

    def feed(self, c: Syscall) -> Iterator[SocketObservation]:
        s: _Sock | None
        name = c.name
        if name == "socket":
            if c.retval is None or c.retval < 0:
                return
            a = c.args
            inet = a.startswith(("AF_INET", "PF_INET"))
            proto = 6 if "SOCK_STREAM" in a else 17 if "SOCK_DGRAM" in a else None
            if inet and proto is None:
                inet = False  # raw sockets and friends
            ns = self._new(c.retval, c.ret_decor, proto, inet)
            ns.created = c.ts
            if not ns.family and inet:
                ns.family = 6 if a.startswith(("AF_INET6", "PF_INET6")) else 4
            return
        if name in ("accept", "accept4"):
            if c.retval is None or c.retval < 0:
                return
            _, ls = self._fd(c)
            if ls is not None and not ls.inet:
                return
            s = self._new(c.retval, c.ret_decor, ls.proto if ls else 6, True)
            s.created = c.ts
            if s.local_port is None and ls is not None:
                s.local_ip, s.local_port = ls.local_ip, ls.local_port
            sa = _sockaddr(c.args)
            if sa is not None:
                s.remote_ip, s.remote_port = sa
            o = self._obs(c, s, "accept")
            if o is not None:
                yield o
            return
        if name in ("dup", "dup2", "dup3", "fcntl", "fcntl64"):
            if c.retval is None or c.retval < 0:
                return
            if name.startswith("fcntl") and "F_DUPFD" not in c.args:
                return
            fd, s = self._fd(c)
            if s is not None and c.retval != fd:
                self.fds[c.retval] = s
            return
        fd, s = self._fd(c)
        if name == "close":
            if s is not None:
                if self.fds.get(fd) is s:
                    del self.fds[fd]
                if s.inet:
                    o = self._obs(c, s, "close")
                    if o is not None:
                        yield o
            return
        if s is None:
            if fd < 0:
                return
            sa = _sockaddr(c.args)
            if sa is None:
                return
            # A socket opened before tracing began, without -yy: its type is unknown.
            s = self.fds[fd] = _Sock(new_sock_id(), None)
        if not s.inet:
            return
        ok = c.retval is not None and c.retval >= 0
        if name == "connect":
            if c.errno in _CONNECT_NO_EFFECT:
                return
            if "sa_family=AF_UNSPEC" in c.args:  # UDP disconnect
                s.remote_ip = s.remote_port = None
                return
            sa = _sockaddr(c.args)
            if sa is None:
                return
            s.remote_ip, s.remote_port = sa
            o = self._obs(c, s, "connect")
            if o is not None:
                yield o
        elif name in ("sendto", "sendmsg", "sendmmsg", "write", "writev"):
            if not ok and c.retval is not None:
                return
            yield from self._traffic(c, s, "send", name == "sendmmsg")
        elif name in ("recvfrom", "recvmsg", "recvmmsg", "read", "readv"):
            if not ok:
                return
            yield from self._traffic(c, s, "recv", name == "recvmmsg")
        elif name == "bind":
            if ok:
                sa = _sockaddr(c.args)
                if sa is not None and sa[1]:
                    s.local_port = sa[1]
                    if sa[0] is not None:
                        s.local_ip = sa[0]
        elif name == "listen":
            if ok:
                o = self._obs(c, s, "listen")
                if o is not None:
                    yield o
        elif name in ("getsockname", "getpeername"):
            if not ok:
                return
            sa = _sockaddr(c.args)
            if sa is None:
                return
            if name == "getsockname":
                if sa[1]:
                    s.local_port = sa[1]
                if sa[0] is not None:
                    s.local_ip = sa[0]
            else:
                s.remote_ip, s.remote_port = sa
            o = self._obs(c, s, "snapshot")
            if o is not None:
                yield o

    def _traffic(self, c: Syscall, s: _Sock, kind: str, many: bool) -> Iterator[SocketObservation]:
        if many:
            addrs = _all_sockaddrs(c.args)
            for a in dict.fromkeys(addrs):
                o = self._obs(c, s, kind, a)
                if o is not None:
                    yield o
            if addrs:
                return
        else:
            sa = _sockaddr(c.args)
            if sa is not None:
                o = self._obs(c, s, kind, sa)
                if o is not None:
                    yield o
                return
        o = self._obs(c, s, kind)
        if o is not None:
            yield o


def iter_socket_observations(
    source: str | os.PathLike[str] | Iterable[str] | Iterable[Syscall],
    *,
    process: str | None = None,
    uid: int | None = None,
    date: str | _dt.date | None = None,
    utc_offset: float = 0.0,
    stats: ParseStats | None = None,
) -> Iterator[SocketObservation]:
    """Socket observations of one process's strace log (path, lines, or syscalls).

    ``process`` names the traced process (``pkg`` or ``pkg:service``) and gives the
    label; by default it comes from the launcher's file name ``strace.<pid>.<procname>.log``.
    """
    if process is None and isinstance(source, (str, os.PathLike)):
        got = process_from_filename(source)
        if got is not None:
            process = got[1]
    label, sublabel = split_process(process)
    tracker = _Tracker(process, label, sublabel, uid, stats if stats is not None else ParseStats())
    if process is None and uid is None:
        tracker.st.warnings.append(
            f"{source if isinstance(source, (str, os.PathLike)) else 'strace log'}: no process "
            "name (pass process=, or name the log strace.<pid>.<procname>.log); its sockets "
            "cannot label flows")
    if isinstance(source, (str, os.PathLike)):
        calls: Iterable[Syscall] = iter_syscalls(source, date, tracker.st, utc_offset=utc_offset)
    else:
        it = iter(source)
        first = next(it, None)
        if first is None:
            return
        chained = _chain(first, it)
        calls = chained if isinstance(first, Syscall) else iter_syscalls(
            chained, date, tracker.st, utc_offset=utc_offset)  # type: ignore[arg-type]
    feed = tracker.feed
    wanted = _INET_CALLS
    for c in calls:
        if c.name in wanted:
            yield from feed(c)


def _chain(first, rest):
    yield first
    yield from rest


def iter_run_strace_logs(
    paths: Iterable[str | os.PathLike[str]],
    *,
    date: str | _dt.date | None = None,
    utc_offset: float = 0.0,
    stats: ParseStats | None = None,
) -> Iterator[SocketObservation]:
    """Observations of several launcher logs (each names its process), one after another."""
    for p in paths:
        yield from iter_socket_observations(p, date=date, utc_offset=utc_offset, stats=stats)
