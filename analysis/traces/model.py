"""Records shared by the socket-event parsers, and the columnar set the correlator reads.

Every parser yields :class:`SocketObservation` records (one kind per yield, never
printing); :class:`ObservationSet` packs any number of them into numpy columns with
interned strings so a million observations cost tens of megabytes, not gigabytes.

Times: ``ts``/``end_ts`` are epoch seconds in the clock of the device that logged them
(the phone for strace, netstat and frida; whatever the CSV says for CSV labels).
"""

from __future__ import annotations

import ipaddress
import itertools
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from analysis.errors import ParseError

SOURCES: tuple[str, ...] = ("strace", "frida", "netstat", "pcapdroid", "csv")
"""Sources in order of trust: when several agree, the first one is reported."""
KINDS: tuple[str, ...] = ("connect", "send", "recv", "accept", "listen", "snapshot", "close")
SOURCE_CODE = {s: i for i, s in enumerate(SOURCES)}
KIND_CODE = {k: i for i, k in enumerate(KINDS)}

# Socket ids for parsers that have no natural one (strace and frida sockets); netstat
# uses the kernel inode. One process-wide counter keeps ids of different logs distinct.
_SOCK_IDS = itertools.count(1)


def new_sock_id() -> int:
    """A socket id no other parsed socket has (in this process)."""
    return next(_SOCK_IDS)


INODE_SOCK = 1 << 40
"""A parser that knows a socket's kernel inode (strace's ``socket:[98770]``) gives it the
socket id ``INODE_SOCK + inode``: the correlator joins such a socket with the netstat
rows of that inode (netstat's socket id is the inode itself)."""


def inode_sock_id(inode: int) -> int:
    """The socket id of a socket known by its kernel inode (see :data:`INODE_SOCK`)."""
    return INODE_SOCK + inode


@dataclass(frozen=True, slots=True)
class Syscall:
    """One system call from an strace log (an ``<unfinished ...>`` call already joined
    with its ``<... resumed>`` half, timed at its entry)."""

    ts: float  # epoch seconds (NaN when the log has no timestamps)
    pid: int  # the thread id strace printed (-1 when the log has none)
    name: str
    args: str  # argument text between the parentheses, as strace printed it
    retval: int | None  # None for "?" or a call that never returned in the log
    errno: str | None = None  # "EINPROGRESS", ...
    ret_decor: str | None = None  # -yy decoration of the returned fd: "TCP:[...]"


def _fast_init(cls: type):  # noqa: ANN202
    """A positional constructor for a frozen slotted dataclass that skips the frozen
    ``__init__``'s per-field ``object.__setattr__`` (3x faster; parsers make millions)."""
    names = cls.__slots__  # type: ignore[attr-defined]
    env = {f"s{i}": cls.__dict__[n].__set__ for i, n in enumerate(names)}
    env.update(new=object.__new__, cls=cls)
    params = ", ".join(f"a{i}" for i in range(len(names)))
    body = "; ".join(f"s{i}(o, a{i})" for i in range(len(names)))
    exec(f"def make({params}):\n    o = new(cls); {body}\n    return o", env)  # noqa: S102
    return env["make"]


make_syscall = _fast_init(Syscall)
"""``make_syscall(ts, pid, name, args, retval, errno, ret_decor)`` -> :class:`Syscall`."""


@dataclass(frozen=True, slots=True)
class SocketObservation:
    """What one source saw of one socket at one time (or over ``[ts, end_ts]``)."""

    ts: float
    source: str  # one of SOURCES
    proto: int  # 6 TCP, 17 UDP, 0 unknown (a socket opened before tracing, no -yy)
    local_ip: str | None  # None when unknown or a wildcard
    local_port: int | None  # None when unknown
    remote_ip: str | None
    remote_port: int | None
    kind: str  # one of KINDS
    pid: int | None = None
    uid: int | None = None
    process: str | None = None
    label: str | None = None  # the package
    sublabel: str | None = None  # e.g. the process "pkg:service"
    end_ts: float | None = None  # end of a lifetime or a CSV range
    sock: int | None = None  # socket identity within its source (inode for netstat)
    labeling_type: str | None = None  # only from CSV labels that carry one


make_observation = _fast_init(SocketObservation)
"""Positional constructor of :class:`SocketObservation` (all 16 fields, in order)."""


@lru_cache(maxsize=65536)
def norm_ip(text: str | None) -> str | None:
    """Canonical text of an address: IPv4-mapped IPv6 becomes IPv4, wildcards become None.

    Unparsable text is returned unchanged (stripped of brackets) so it still matches itself.
    """
    if not text:
        return None
    t = text.strip().strip("[]")
    if "%" in t:  # scope id: fe80::1%wlan0
        t = t.split("%", 1)[0]
    try:
        a = ipaddress.ip_address(t)
    except ValueError:
        return t
    if a.version == 6 and a.ipv4_mapped is not None:
        a = a.ipv4_mapped
    if a.is_unspecified:
        return None
    return str(a)


@dataclass
class ObservationSet:
    """Many :class:`SocketObservation` as numpy columns; strings are codes into ``strings``.

    Code -1 means None in every int column (ports, pid, uid and string codes); ``end_ts``
    is NaN when the observation is a single instant.
    """

    ts: np.ndarray  # float64
    end_ts: np.ndarray  # float64
    proto: np.ndarray  # uint8
    local_ip: np.ndarray  # int32 string code
    local_port: np.ndarray  # int32
    remote_ip: np.ndarray  # int32 string code
    remote_port: np.ndarray  # int32
    kind: np.ndarray  # uint8 KIND_CODE
    source: np.ndarray  # uint8 SOURCE_CODE
    pid: np.ndarray  # int32
    uid: np.ndarray  # int32
    process: np.ndarray  # int32 string code
    label: np.ndarray  # int32 string code
    sublabel: np.ndarray  # int32 string code
    labeling_type: np.ndarray  # int32 string code
    sock: np.ndarray  # int64 (-1: none)
    strings: list[str] = field(default_factory=list)

    _COLS = ("ts", "end_ts", "proto", "local_ip", "local_port", "remote_ip", "remote_port",
             "kind", "source", "pid", "uid", "process", "label", "sublabel",
             "labeling_type", "sock")
    _DTYPES = (np.float64, np.float64, np.uint8, np.int32, np.int32, np.int32, np.int32,
               np.uint8, np.uint8, np.int32, np.int32, np.int32, np.int32, np.int32,
               np.int32, np.int64)

    def __len__(self) -> int:
        return int(len(self.ts))

    @classmethod
    def empty(cls) -> ObservationSet:
        cols = {n: np.zeros(0, dtype=d) for n, d in zip(cls._COLS, cls._DTYPES, strict=True)}
        return cls(**cols, strings=[])

    @classmethod
    def from_observations(cls, observations: Iterable[SocketObservation]) -> ObservationSet:
        """Pack observations (any iterable, consumed once) into columns."""
        strings: list[str] = []
        index: dict[str, int] = {}

        def code(s: str | None) -> int:
            if s is None:
                return -1
            c = index.get(s)
            if c is None:
                c = index[s] = len(strings)
                strings.append(s)
            return c

        nan = float("nan")
        # Packed in chunks so a million observations never exist as Python tuples at once.
        parts: list[dict[str, np.ndarray]] = []
        it = iter(observations)
        while True:
            rows = [(
                o.ts, nan if o.end_ts is None else o.end_ts, o.proto, code(o.local_ip),
                -1 if o.local_port is None else o.local_port, code(o.remote_ip),
                -1 if o.remote_port is None else o.remote_port, KIND_CODE[o.kind],
                SOURCE_CODE[o.source], -1 if o.pid is None else o.pid,
                -1 if o.uid is None else o.uid, code(o.process), code(o.label),
                code(o.sublabel), code(o.labeling_type), -1 if o.sock is None else o.sock,
            ) for o in itertools.islice(it, 1 << 16)]
            if not rows:
                break
            cols = list(zip(*rows, strict=True))
            parts.append({n: np.asarray(c, dtype=d)
                          for n, c, d in zip(cls._COLS, cols, cls._DTYPES, strict=True)})
        if not parts:
            return cls.empty()
        arrays = {n: np.concatenate([p[n] for p in parts]) for n in cls._COLS}
        return cls(**arrays, strings=strings)

    @classmethod
    def from_source(cls, path: str | os.PathLike[str], observations: Iterable[SocketObservation],
                    stats: ParseStats | None = None) -> ObservationSet:
        """:meth:`from_observations` of one file's parser, where a value no parser expected
        (a 5,000-digit pid, a port beyond its column's type, a CSV field over the csv
        module's 128 KB limit, JSON nested past the recursion limit) becomes one
        :class:`ParseError` naming the file and line instead of a traceback."""
        import csv

        try:
            return cls.from_observations(observations)
        except (ValueError, OverflowError, RecursionError, csv.Error) as err:
            where = f"line {stats.lines}" if stats is not None and stats.lines else None
            why = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise ParseError(path, where, f"value out of range or too large ({why[:160]})"
                             ) from None

    @classmethod
    def concat(cls, sets: Iterable[ObservationSet]) -> ObservationSet:
        """One set holding the rows of several (string codes re-mapped)."""
        sets = [s for s in sets if len(s)]
        if not sets:
            return cls.empty()
        strings: list[str] = []
        index: dict[str, int] = {}
        remaps = []
        for s in sets:
            m = np.empty(len(s.strings) + 1, dtype=np.int32)
            m[-1] = -1  # code -1 indexes the last slot and stays -1
            for i, t in enumerate(s.strings):
                c = index.get(t)
                if c is None:
                    c = index[t] = len(strings)
                    strings.append(t)
                m[i] = c
            remaps.append(m)
        out = {}
        for name in cls._COLS:
            parts = []
            for s, m in zip(sets, remaps, strict=True):
                col = getattr(s, name)
                if name in ("local_ip", "remote_ip", "process", "label", "sublabel",
                            "labeling_type"):
                    col = m[col]
                parts.append(col)
            out[name] = np.concatenate(parts)
        return cls(**out, strings=strings)

    def code_of(self, s: str) -> int:
        """The code of a string, adding it to the table when new."""
        try:
            return self.strings.index(s)
        except ValueError:
            self.strings.append(s)
            return len(self.strings) - 1

    def string(self, code: int) -> str | None:
        return None if code < 0 else self.strings[code]

    def with_uid_map(self, uid_map: dict[int, tuple[str, ...]] | dict[int, str]) -> ObservationSet:
        """Fill the label of rows that only know a uid, from a uid -> package(s) map.

        A uid shared by several packages gets the packages joined by ``|``, which the
        correlator treats as ambiguous, never as one of them.
        """
        if not len(self) or not uid_map:
            return self
        label = self.label.copy()
        strings = list(self.strings)
        index = {s: i for i, s in enumerate(strings)}
        need = (label < 0) & (self.uid >= 0)
        for uid in np.unique(self.uid[need]):
            pk = uid_map.get(int(uid))
            if not pk:
                continue
            text = pk if isinstance(pk, str) else "|".join(sorted(pk))
            c = index.get(text)
            if c is None:
                c = index[text] = len(strings)
                strings.append(text)
            label[need & (self.uid == uid)] = c
        out = {name: getattr(self, name) for name in self._COLS}
        out["label"] = label
        return ObservationSet(**out, strings=strings)

    def to_observations(self) -> list[SocketObservation]:
        """Rows back as records (for tests and small sets)."""
        s = self.string
        out = []
        for i in range(len(self)):
            lp, rp = int(self.local_port[i]), int(self.remote_port[i])
            et = float(self.end_ts[i])
            out.append(SocketObservation(
                ts=float(self.ts[i]), source=SOURCES[self.source[i]], proto=int(self.proto[i]),
                local_ip=s(int(self.local_ip[i])), local_port=None if lp < 0 else lp,
                remote_ip=s(int(self.remote_ip[i])), remote_port=None if rp < 0 else rp,
                kind=KINDS[self.kind[i]], pid=None if self.pid[i] < 0 else int(self.pid[i]),
                uid=None if self.uid[i] < 0 else int(self.uid[i]),
                process=s(int(self.process[i])), label=s(int(self.label[i])),
                sublabel=s(int(self.sublabel[i])), end_ts=None if et != et else et,
                sock=None if self.sock[i] < 0 else int(self.sock[i]),
                labeling_type=s(int(self.labeling_type[i])),
            ))
        return out


@dataclass
class ParseStats:
    """What a parser read: lines, records made, lines skipped by reason, other notes."""

    lines: int = 0
    parsed: int = 0  # lines that gave a record (syscall, table row, event)
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> lines
    other: dict[str, int] = field(default_factory=dict)  # harmless non-records (signals, exits)
    warnings: list[str] = field(default_factory=list)

    def skip(self, reason: str, n: int = 1) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + n

    def note(self, what: str, n: int = 1) -> None:
        self.other[what] = self.other.get(what, 0) + n

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    def merge(self, other: ParseStats) -> None:
        self.lines += other.lines
        self.parsed += other.parsed
        for k, v in other.skipped.items():
            self.skip(k, v)
        for k, v in other.other.items():
            self.note(k, v)
        self.warnings.extend(other.warnings)

    def check_usable(self, path: str | os.PathLike[str] | None, what: str) -> None:
        """Raise a :class:`ParseError` when lines were read but none gave a record (the
        wrong file, or a binary one); the message says what was skipped."""
        if self.lines and not self.parsed:
            raise ParseError(path, None, f"no {what} in {self.lines} lines",
                             hint=self.summary())

    def summary(self) -> str:
        """One line for a user: what was read and what was skipped, by reason."""
        msg = f"{self.lines} lines read, {self.parsed} parsed"
        if self.skipped:
            parts = ", ".join(f"{v} {k}" for k, v in sorted(self.skipped.items()))
            msg += f", {self.n_skipped} skipped ({parts})"
        return msg


def split_process(name: str | None) -> tuple[str | None, str | None]:
    """``"pkg:service"`` -> (``"pkg"``, ``"pkg:service"``); ``"pkg"`` -> (``"pkg"``, ``"pkg"``)."""
    if not name:
        return None, None
    name = name.strip()
    return name.split(":", 1)[0], name
