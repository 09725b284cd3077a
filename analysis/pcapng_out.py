"""Captures written back with their labels: a labelled pcapng and a filtered pcap.

Both writers stream the original capture(s) record by record (constant memory: a few
thousand records at a time), copy every record's bytes unchanged, and write to a temp
file renamed into place, so a failed run never leaves a half-written output.

* :func:`write_labelled_pcapng`: every packet of the capture, each Enhanced Packet Block
  carrying an ``opt_comment`` that Wireshark and tshark show as ``frame.comment``, e.g.
  ``flowtruth: app=org.thoughtcrime.securesms type=exact source=strace flow=12``,
  ``flowtruth: app=unknown type=unlabelled flow=13``; packets in no flow (ARP, ICMP)
  get ``flowtruth: no flow``.
* :func:`write_filtered_pcap`: only the packets of the chosen flows, as libpcap.

Packets are tied to flows by ``pkt_frame``, the record number :mod:`analysis.pcap`
gives each usable packet record of one file; with several files (rotation) the record's
timestamp tells apart equal record numbers of different files.
:func:`iter_raw_records` numbers records exactly as :mod:`analysis.pcap` does.
"""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np

from analysis.atomic import atomic_output
from analysis.errors import ParseError
from analysis.flowtable import CaptureStats, FlowTable
from analysis.pcap import MAX_RECORD, PCAP_MAGICS, iter_record_chunks

NO_FLOW_COMMENT = "flowtruth: no flow"
CHUNK = 1 << 20  # bytes of packets per batch: bounds the writers' memory


@dataclass(slots=True)
class RawRecord:
    """One packet record of a capture, its bytes as captured."""

    frame: int  # record number as analysis.pcap counts it (per file)
    linktype: int
    ts_ns: int
    wirelen: int
    data: bytes


@dataclass(slots=True)
class RawBatch:
    """Consecutive records of one capture as columns over one byte buffer."""

    buf: np.ndarray  # uint8
    off: np.ndarray  # int64 start of each record's bytes in buf
    cap: np.ndarray  # int64 captured length
    wire: np.ndarray  # int64 original length
    ts: np.ndarray  # int64 ns since the epoch
    frame: np.ndarray  # int64 record number in its file
    linktype: np.ndarray  # int64

    def __len__(self) -> int:
        return len(self.off)

    def records(self) -> Iterator[RawRecord]:
        raw = memoryview(self.buf)  # type: ignore[arg-type]
        for o, c, w, t, f, lt in zip(self.off.tolist(), self.cap.tolist(), self.wire.tolist(),
                                     self.ts.tolist(), self.frame.tolist(),
                                     self.linktype.tolist(), strict=True):
            yield RawRecord(f, lt, t, w, bytes(raw[o:o + c]))


@dataclass
class WriteStats:
    """What a writer wrote: packets, packets per comment or kept, and why others were not."""

    packets: int = 0
    written: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    per_comment: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str, n: int = 1) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + n


# ----------------------------------------------------------------------------- reading

def capture_kind(path: str | os.PathLike[str]) -> tuple[str, int]:
    """(``"pcap"`` or ``"pcapng"``, nanoseconds per timestamp tick: 1 or 1000 for pcap)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError as err:
        raise ParseError(path, None, f"cannot read: {err.strerror or err}") from None
    if head in PCAP_MAGICS:
        return "pcap", 1 if head in (b"\x4d\x3c\xb2\xa1", b"\xa1\xb2\x3c\x4d") else 1000
    if head == b"\x0a\x0d\x0d\x0a":
        return "pcapng", 1
    raise ParseError(path, 0, f"not a pcap or pcapng file (magic {head.hex()})")


def iter_raw_records(path: str | os.PathLike[str]) -> Iterator[RawRecord]:
    """Every usable packet record of one capture, in file order, numbered as
    :mod:`analysis.pcap` numbers them (damage ends the iteration where the reader stops)."""
    for _k, batch in _batches([path]):
        yield from batch.records()


def _batches(paths: Sequence[str | os.PathLike[str]]) -> Iterator[tuple[int, RawBatch]]:
    """(file number, batch) of every input in order, a bounded chunk at a time.

    The records are the reader's own walk (:func:`analysis.pcap.iter_record_chunks`), so
    they are numbered as the flow table numbers them; where the reader would refuse a
    damaged file, the batches end.
    """
    for k, p in enumerate(paths):
        capture_kind(p)  # not a capture at all: an error, not an empty input
        frame = 0
        try:
            for c in iter_record_chunks(p, CaptureStats(), max(64, CHUNK), 16384):
                n = len(c)
                yield k, RawBatch(c.buf.copy(), c.off, c.cap, c.wire, c.ts_ns,
                                  np.arange(frame, frame + n, dtype=np.int64), c.linktype)
                frame += n
        except ParseError:
            continue


# ----------------------------------------------------------------------------- packet -> flow

class FrameIndex:
    """Which flow each capture record belongs to (-1: none), from a table's ``pkt_frame``."""

    _KEY = np.dtype([("f", "<i8"), ("t", "<i8")])

    def __init__(self, table: FlowTable, n_files: int) -> None:
        frames = table.packets["pkt_frame"].astype(np.int64)
        flow = np.repeat(np.arange(len(table), dtype=np.int64), np.diff(table.pkt_offsets))
        self.by_ts = n_files > 1
        if not self.by_ts:
            size = int(frames.max()) + 1 if len(frames) else 0
            self.dense = np.full(size, -1, dtype=np.int64)
            self.dense[frames] = flow
        else:
            keys = np.empty(len(frames), dtype=self._KEY)
            keys["f"] = frames
            keys["t"] = table.packets["pkt_ts_ns"]
            order = np.argsort(keys, kind="stable")
            self.keys = keys[order]
            self.flow = flow[order]

    def flows_of(self, batch: RawBatch) -> np.ndarray:
        """The flow of each record of a batch (-1 for none)."""
        frames = batch.frame
        if not self.by_ts:
            out = np.full(len(frames), -1, dtype=np.int64)
            ok = frames < len(self.dense)
            out[ok] = self.dense[frames[ok]]
            return out
        q = np.empty(len(frames), dtype=self._KEY)
        q["f"] = frames
        q["t"] = batch.ts
        pos = np.searchsorted(self.keys, q)
        inb = pos < len(self.keys)
        hit = np.zeros(len(q), dtype=bool)
        hit[inb] = self.keys[pos[inb]] == q[inb]
        out = np.full(len(q), -1, dtype=np.int64)
        out[hit] = self.flow[pos[hit]]
        return out


def flow_comments(table: FlowTable) -> list[str]:
    """The packet comment of each flow: ``flowtruth: app=... type=... [source=...] flow=N``."""
    lab = table.label_column("BF_label", "unknown")
    typ = table.label_column("BF_labeling_type", "unlabelled")
    src = table.label_column("BF_label_source")
    cand = table.label_column("BF_candidates")
    out = []
    for i, (a, t, s, c) in enumerate(zip(lab.tolist(), typ.tolist(), src.tolist(),
                                         cand.tolist(), strict=True)):
        text = f"flowtruth: app={a or 'unknown'} type={t or 'unlabelled'}"
        if c:
            text += f" candidates={c}"
        if s:
            text += f" source={s}"
        out.append(f"{text} flow={i}")
    return out


# ----------------------------------------------------------------------------- writing

@contextlib.contextmanager
def _atomic_file(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """A buffered file beside ``path``, renamed over it on success, removed on failure."""
    with atomic_output(path) as tmp, open(tmp, "wb", buffering=1 << 20) as fh:
        yield fh


def _opt(code: int, value: bytes) -> bytes:
    return struct.pack("<HH", code, len(value)) + value + b"\0" * (-len(value) % 4)


def _block(btype: int, body: bytes) -> bytes:
    n = 12 + len(body)
    return struct.pack("<II", btype, n) + body + struct.pack("<I", n)


def _shb() -> bytes:
    body = struct.pack("<IHHq", 0x1A2B3C4D, 1, 0, -1) + _opt(4, b"flowtruth") + _opt(0, b"")
    return _block(0x0A0D0D0A, body)


def _idb(linktype: int, name: str) -> bytes:
    opts = _opt(2, name.encode("utf-8", "replace")[:256]) + _opt(9, b"\x09") + _opt(0, b"")
    return _block(1, struct.pack("<HHI", linktype, 0, MAX_RECORD) + opts)


def write_labelled_pcapng(paths: Sequence[str | os.PathLike[str]], table: FlowTable,
                          out: str | os.PathLike[str],
                          comments: Sequence[str] | None = None) -> WriteStats:
    """Every packet of ``paths`` into one pcapng at ``out``, each with its flow's comment
    (``comments[i]`` for flow i; default :func:`flow_comments`), nanosecond timestamps."""
    comments = list(flow_comments(table) if comments is None else comments)
    # Each flow's options (comment, end of options) encoded once; the last is "no flow".
    opts = [_opt(1, c.encode("utf-8", "replace")) + _opt(0, b"") for c in comments]
    opts.append(_opt(1, NO_FLOW_COMMENT.encode()) + _opt(0, b""))
    opt_len = np.array([len(o) for o in opts], dtype=np.int64)
    padopts = [[b"\0" * k + o for k in range(4)] for o in opts]  # data padding, then options
    index = FrameIndex(table, len(paths))
    st = WriteStats()
    counts = np.zeros(len(opts), dtype=np.int64)
    with _atomic_file(out) as fh:
        fh.write(_shb())
        ifaces: dict[tuple[int, int], int] = {}  # (file, linktype) -> interface id
        for k, b in _batches(paths):
            flows = index.flows_of(b)
            np.add.at(counts, flows, 1)  # -1 counts in the last slot: no flow
            ifid = np.empty(len(b), dtype=np.int64)
            for lt in np.unique(b.linktype).tolist():
                if (k, lt) not in ifaces:
                    ifaces[(k, lt)] = len(ifaces)
                    fh.write(_idb(lt, Path(os.fspath(paths[k])).name))
                ifid[b.linktype == lt] = ifaces[(k, lt)]
            pad = -b.cap % 4
            n = 28 + b.cap + pad + opt_len[flows] + 4
            hdr = np.empty((len(b), 7), dtype="<u4")
            for j, col in enumerate((6, n, ifid, (b.ts >> 32) & 0xFFFFFFFF, b.ts & 0xFFFFFFFF,
                                     b.cap, b.wire)):
                hdr[:, j] = col
            hb = hdr.tobytes()
            tb = n.astype("<u4").tobytes()
            mv = memoryview(b.buf)  # type: ignore[arg-type]
            parts: list[bytes | memoryview] = []
            for i, (o, c, f, pd) in enumerate(zip(b.off.tolist(), b.cap.tolist(),
                                                  flows.tolist(), pad.tolist(), strict=True)):
                parts += (hb[28 * i:28 * i + 28], mv[o:o + c], padopts[f][pd],
                          tb[4 * i:4 * i + 4])
            fh.write(b"".join(parts))
            st.packets += len(b)
            st.written += len(b)
    st.per_comment = {NO_FLOW_COMMENT: int(counts[-1])} if counts[-1] else {}
    for i in np.nonzero(counts[:-1])[0].tolist():
        st.per_comment[comments[i]] = int(counts[i])
    return st


def write_filtered_pcap(paths: Sequence[str | os.PathLike[str]], table: FlowTable,
                        keep: np.ndarray, out: str | os.PathLike[str]) -> WriteStats:
    """The packets of the flows where ``keep`` is true, as one libpcap file at ``out``.

    Record bytes are copied unchanged; the output keeps microsecond stamps when every
    input is a microsecond pcap and is a nanosecond pcap otherwise. Its link type is
    the first kept packet's; kept packets of another link type are counted as skipped.
    """
    keep = np.asarray(keep, dtype=bool)
    kinds = [capture_kind(p) for p in paths]
    micro = all(k == ("pcap", 1000) for k in kinds)
    magic = 0xA1B2C3D4 if micro else 0xA1B23C4D
    index = FrameIndex(table, len(paths))
    st = WriteStats()
    linktype: int | None = None
    first_seen: int | None = None
    with _atomic_file(out) as fh:
        for _k, b in _batches(paths):
            if first_seen is None and len(b):
                first_seen = int(b.linktype[0])
            st.packets += len(b)
            flows = index.flows_of(b)
            sel = flows >= 0
            sel[sel] = keep[flows[sel]]
            idx = np.nonzero(sel)[0]
            if not len(idx):
                continue
            if linktype is None:
                linktype = int(b.linktype[idx[0]])
                fh.write(struct.pack("<IHHiIII", magic, 2, 4, 0, 0, MAX_RECORD, linktype))
            other = b.linktype[idx] != linktype
            if other.any():
                for lt, c in zip(*np.unique(b.linktype[idx][other], return_counts=True),
                                 strict=True):
                    st.skip(f"link type {lt} differs from the output's {linktype}", int(c))
                idx = idx[~other]
            cap = b.cap[idx]
            ts = b.ts[idx]
            hdr = np.empty((len(idx), 4), dtype="<u4")
            hdr[:, 0] = ts // 1_000_000_000
            hdr[:, 1] = (ts % 1_000_000_000) // (1000 if micro else 1)
            hdr[:, 2] = cap
            hdr[:, 3] = b.wire[idx]
            hb = hdr.tobytes()
            mv = memoryview(b.buf)  # type: ignore[arg-type]
            parts: list[bytes | memoryview] = []
            for i, (o, c) in enumerate(zip(b.off[idx].tolist(), cap.tolist(), strict=True)):
                parts += (hb[16 * i:16 * i + 16], mv[o:o + c])
            fh.write(b"".join(parts))
            st.written += len(idx)
        if linktype is None:  # nothing kept: still a valid, empty capture
            fh.write(struct.pack("<IHHiIII", magic, 2, 4, 0, 0, MAX_RECORD,
                                 1 if first_seen is None else first_seen))
    return st
