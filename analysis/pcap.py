"""Reading pcap and pcapng captures into packet columns, fast and streaming.

The file is read in fixed-size chunks; C kernels (``_fastpath.c``) walk the records of a chunk
and decode link, network and transport headers straight into numpy columns
(:class:`PacketBatch`), so no per-packet Python object is ever built and memory
stays bounded by the chunk size, not the file size. :func:`iter_record_chunks` is the same
walk without the decoding, for readers of the records' bytes (the labelled-pcap writers).

Supported: pcap (µs and ns, both byte orders) and pcapng (sections of either byte
order, several interfaces, ``if_tsresol``/``if_tsoffset``, enhanced, simple and
obsolete packet blocks; unknown blocks skipped). Link types: Ethernet (802.1Q,
QinQ), Linux SLL and SLL2, raw IP (101, 12, 14, 228, 229), BSD null/loopback (0,
108). Everything else is counted as skipped with its reason.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from . import _fast
from .errors import ParseError
from .flowtable import CaptureStats

CHUNK_BYTES = 4 << 20  # smaller chunks cut peak RSS by ~35 MB at ~5 % of speed
MAX_RECORD = 262144  # libpcap's MAXIMUM_SNAPLEN; larger records mean a corrupt length field

# Skip reasons (status column); 0 means the packet is TCP or UDP over IP and usable.
OK = 0
SKIP_REASONS = {
    1: "unsupported link type",
    2: "not IP (ARP, LLDP, ...)",
    3: "truncated link header",
    4: "truncated or invalid IP header",
    5: "not TCP or UDP",
    6: "IP fragment after the first",
    7: "truncated TCP/UDP header",
    8: "invalid TCP header",
}

# Columns of the int64 matrix a decode fills (one row per packet).
C_STATUS, C_VER, C_PROTO, C_SPORT, C_DPORT, C_IPLEN, C_IPHDR, C_L4HDR, C_PAYLEN, \
    C_FLAGS, C_WIN, C_MSS, C_WS, C_PAYOFF, C_PAYCAP = range(15)
N_COLS = 15

LINKTYPE_NAMES = {0: "null", 1: "ethernet", 12: "raw", 14: "raw", 101: "raw", 108: "loop",
                  113: "linux-sll", 228: "ipv4", 229: "ipv6", 276: "linux-sll2"}


@dataclass
class PacketBatch:
    """Decoded packets of one chunk: numpy columns, one row per record."""

    ts_ns: np.ndarray  # int64
    frame: np.ndarray  # int64 record number in the file
    wirelen: np.ndarray  # int64
    cols: np.ndarray  # (n, N_COLS) int64, see C_*
    addrs: np.ndarray  # (n, 4) uint64: src hi, src lo, dst hi, dst lo
    file_off: np.ndarray  # int64 absolute file offset of each record's data

    def __len__(self) -> int:
        return len(self.ts_ns)


@dataclass(slots=True)
class RecordChunk:
    """Consecutive packet records of one capture as columns over one byte buffer.

    ``buf`` may be a view of a buffer the walk reuses: it is valid until the next chunk.
    """

    buf: np.ndarray  # uint8
    base: int  # file offset of buf[0]
    off: np.ndarray  # int64 start of each record's bytes in buf
    cap: np.ndarray  # int64 captured length
    wire: np.ndarray  # int64 original length
    ts_ns: np.ndarray  # int64 ns since the epoch
    linktype: np.ndarray  # int64

    def __len__(self) -> int:
        return len(self.off)


def _read_into(fh, buf: bytearray, keep: int) -> int:
    """Fill ``buf`` after its first ``keep`` bytes; returns the number of valid bytes."""
    view = memoryview(buf)
    got = keep
    while got < len(buf):
        n = fh.readinto(view[got:])
        if not n:
            break
        got += n
    return got


def _pcap_chunks(path: str, fh, header: bytes, stats: CaptureStats,
                 chunk_bytes: int) -> Iterator[RecordChunk]:
    """The records of a classic libpcap file (``fh`` just past its 24-byte ``header``)."""
    magic = header[:4]
    swapped = magic not in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1")
    frac_ns = 1 if magic in (b"\x4d\x3c\xb2\xa1", b"\xa1\xb2\x3c\x4d") else 1000
    major, minor, _zone, _sig, snaplen, network = struct.unpack(
        (">" if swapped else "<") + "HHiIII", header[4:24])
    if major != 2:
        raise ParseError(path, 4, f"unsupported pcap version {major}.{minor} (only 2.x exists)",
                         "the file header is corrupt or this is not a libpcap file")
    linktype = network & 0x0FFFFFFF
    limit = max(snaplen, MAX_RECORD)
    buf = bytearray(chunk_bytes)
    keep = 0
    file_pos = 24  # absolute offset of buf[0]
    found = 0
    rec_off = caplen = wirelen = ts_ns = np.empty(0, dtype=np.int64)
    while True:
        valid = _read_into(fh, buf, keep)
        eof = valid < len(buf)
        arr = np.frombuffer(buf, dtype=np.uint8)
        if len(rec_off) < len(buf) // 16 + 1:
            rec_off, caplen, wirelen, ts_ns = (np.empty(len(buf) // 16 + 1, dtype=np.int64)
                                               for _ in range(4))
        n, pos, bad = _fast.walk_pcap(arr, 0, valid, swapped, frac_ns, limit,
                                      rec_off, caplen, wirelen, ts_ns)
        if n:
            yield RecordChunk(arr[:pos], file_pos, rec_off[:n].copy(), caplen[:n].copy(),
                              wirelen[:n].copy(), ts_ns[:n].copy(),
                              np.full(n, linktype, dtype=np.int64))
            found += n
        if bad >= 0:
            if found == 0:
                raise ParseError(path, file_pos + pos, f"record length {bad} exceeds {limit}",
                                 "the file is corrupt; no packet could be read")
            stats.warnings.append(
                f"{path}: byte offset {file_pos + pos}: record length {bad} exceeds "
                f"{limit}; the file is corrupt from here on, stopped reading")
            stats.skip("corrupt record header", 1)
            return
        rest = valid - pos
        if eof:
            if rest > 0 and found == 0:
                raise ParseError(path, file_pos + pos,
                                 f"the first record is truncated ({rest} bytes present)",
                                 "the capture was cut short; no packet could be read")
            if rest > 0:
                stats.warnings.append(
                    f"{path}: byte offset {file_pos + pos}: last record truncated "
                    f"({rest} bytes of a partial record ignored)")
                stats.skip("truncated last record", 1)
            return
        tail = buf[pos:valid]
        if n == 0 and pos == 0:
            # A record bigger than the buffer: take a larger one (not resized in place, as
            # the chunk given out may still be viewing it).
            buf = bytearray(2 * len(buf))
        buf[:rest] = tail
        keep = rest
        file_pos += pos


class _Decoder:
    """Decodes record chunks into packet batches, numbering records and counting stats."""

    def __init__(self, stats: CaptureStats) -> None:
        self.stats = stats
        self.frame = 0

    def decode(self, chunk: RecordChunk) -> PacketBatch:
        n = len(chunk)
        linktype = chunk.linktype
        cols = np.empty((n, N_COLS), dtype=np.int64)
        addrs = np.empty((n, 4), dtype=np.uint64)
        _fast.decode(chunk.buf, chunk.off, chunk.cap, linktype, cols, addrs)
        frame = np.arange(self.frame, self.frame + n, dtype=np.int64)
        self.frame += n
        st = self.stats
        st.packets += n
        st.bytes += int(chunk.wire.sum())
        if n:
            lo, hi = int(chunk.ts_ns.min()), int(chunk.ts_ns.max())
            st.first_ts_ns = lo if st.first_ts_ns is None else min(st.first_ts_ns, lo)
            st.last_ts_ns = hi if st.last_ts_ns is None else max(st.last_ts_ns, hi)
            lts, counts = np.unique(linktype, return_counts=True)
            for lt, c in zip(lts.tolist(), counts.tolist(), strict=True):
                st.linktypes[lt] = st.linktypes.get(lt, 0) + c
            status = cols[:, C_STATUS]
            if status.any():
                codes, counts = np.unique(status[status != 0], return_counts=True)
                for code, c in zip(codes.tolist(), counts.tolist(), strict=True):
                    reason = SKIP_REASONS[code]
                    if code == 1:
                        lt_bad = np.unique(linktype[status == 1])
                        reason = "unsupported link type " + ",".join(str(x) for x in lt_bad)
                    st.skip(reason, c)
        return PacketBatch(chunk.ts_ns, frame, chunk.wire, cols, addrs, chunk.off + chunk.base)


def _pcapng_chunks(path: str, fh, stats: CaptureStats, chunk_bytes: int,
                   max_records: int) -> Iterator[RecordChunk]:
    """The packet records of a pcapng file: sections, interfaces and packet blocks, walked
    block by block, given out at about ``chunk_bytes`` of packets or ``max_records``."""
    size = os.fstat(fh.fileno()).st_size
    data = _FileWindow(fh, size)
    pos = 0
    endian = "<"
    ifaces: list[tuple[int, int, int, int]] = []  # linktype, ts_num, ts_den, offset_s
    rec_off: list[int] = []
    caplens: list[int] = []
    wirelens: list[int] = []
    tss: list[int] = []
    lts: list[int] = []
    pending = 0
    found = 0
    while pos < size:
        if size - pos < 12:
            stats.warnings.append(
                f"{path}: byte offset {pos}: truncated block ({size - pos} bytes) at the end")
            stats.skip("truncated last record", 1)
            break
        head = data.get(pos, 12)
        btype = struct.unpack(endian + "I", head[:4])[0]
        if btype == 0x0A0D0D0A:
            bom = head[8:12]
            if bom == b"\x4d\x3c\x2b\x1a":
                endian = "<"
            elif bom == b"\x1a\x2b\x3c\x4d":
                endian = ">"
            else:
                raise ParseError(path, pos + 8, "bad pcapng byte-order magic",
                                 "the file is corrupt")
            blen = struct.unpack(endian + "I", head[4:8])[0]
            body = data.get(pos, min(blen, 28)) if blen >= 16 else b""
            if len(body) >= 16:
                major, minor = struct.unpack(endian + "HH", body[12:16])
                if major != 1 or minor not in (0, 2):
                    raise ParseError(path, pos + 12,
                                     f"unsupported pcapng version {major}.{minor}",
                                     "only pcapng 1.0 (and 1.2, read as 1.0) exist; "
                                     "the file is corrupt")
            ifaces = []
        else:
            blen = struct.unpack(endian + "I", head[4:8])[0]
        if blen < 12 or blen % 4 != 0:
            msg = f"invalid block length {blen}"
            if found == 0:
                raise ParseError(path, pos + 4, msg, "the file is corrupt")
            stats.warnings.append(f"{path}: byte offset {pos + 4}: {msg}; stopped reading")
            stats.skip("corrupt record header", 1)
            break
        if pos + blen > size:
            if found == 0 and btype in (2, 3, 6):
                raise ParseError(path, pos, f"the first packet block is truncated "
                                 f"({size - pos} of {blen} bytes present)",
                                 "the capture was cut short; no packet could be read")
            stats.warnings.append(
                f"{path}: byte offset {pos}: last block truncated "
                f"({size - pos} of {blen} bytes present)")
            stats.skip("truncated last record", 1)
            break
        if blen > 64 << 20:
            stats.warnings.append(f"{path}: byte offset {pos}: block of {blen} bytes "
                                  "skipped (too large to be a packet)")
            pos += blen
            continue
        if btype == 1:  # interface description
            body = data.get(pos + 8, blen - 12)
            if len(body) < 8:
                raise ParseError(path, pos, "interface description block too short")
            lt = struct.unpack(endian + "H", body[:2])[0]
            num, den, toff = 1, 1_000_000, 0
            opts = _iter_options(body[8:], endian)
            for code, val in opts:
                if code == 9 and len(val) >= 1:
                    r = val[0]
                    if r & 0x80:
                        den = 1 << (r & 0x7F)
                    else:
                        den = 10 ** r
                elif code == 14 and len(val) >= 8:
                    toff = struct.unpack(endian + "q", val[:8])[0]
            ifaces.append((lt, num, den, toff))
        elif btype in (6, 3, 2):
            if btype == 6 or btype == 2:
                if blen < 32:
                    stats.skip("corrupt record header", 1)
                    stats.packets += 1
                    pos += blen
                    continue
                hdr = data.get(pos + 8, 20)
                if btype == 6:
                    ifid, tsh, tsl, cap, orig = struct.unpack(endian + "IIIII", hdr)
                else:
                    ifid, _drops, tsh, tsl, cap, orig = struct.unpack(endian + "HHIIII", hdr)
                doff = pos + 28
            else:  # simple packet block: interface 0, no timestamp
                ifid = 0
                orig = struct.unpack(endian + "I", data.get(pos + 8, 4))[0]
                cap = min(orig, blen - 16)
                tsh = tsl = 0
                doff = pos + 12
            if ifid >= len(ifaces):
                stats.skip("packet for an undeclared interface", 1)
                stats.packets += 1
                pos += blen
                continue
            if doff + cap > pos + blen - 4:
                stats.skip("corrupt record header", 1)
                stats.packets += 1
                pos += blen
                continue
            lt, num, den, toff = ifaces[ifid]
            ts = pcapng_ts_ns(tsh, tsl, den, toff)
            if ts is None:
                stats.skip("timestamp out of range", 1)
                stats.packets += 1
                pos += blen
                continue
            rec_off.append(doff)
            caplens.append(cap)
            wirelens.append(orig)
            tss.append(ts)
            lts.append(lt)
            found += 1
            pending += cap
            if pending >= chunk_bytes or len(rec_off) >= max_records:
                yield _span(data, rec_off, caplens, wirelens, tss, lts)
                rec_off, caplens, wirelens, tss, lts = [], [], [], [], []
                pending = 0
        pos += blen
    if rec_off:
        yield _span(data, rec_off, caplens, wirelens, tss, lts)


def _span(data: _FileWindow, rec_off, caplens, wirelens, tss, lts) -> RecordChunk:
    """Records found by the pcapng walk, over one read of the bytes they span."""
    offs = np.asarray(rec_off, dtype=np.int64)
    caps = np.asarray(caplens, dtype=np.int64)
    lo = int(offs.min())
    hi = int((offs + caps).max())
    arr = np.frombuffer(data.get(lo, hi - lo), dtype=np.uint8)
    return RecordChunk(arr, lo, offs - lo, caps, np.asarray(wirelens, dtype=np.int64),
                       np.asarray(tss, dtype=np.int64), np.asarray(lts, dtype=np.int64))


class _FileWindow:
    """Random access to a file through a sliding in-memory window (no mmap: RSS stays small)."""

    def __init__(self, fh, size: int, window: int = CHUNK_BYTES * 2) -> None:
        self.fh = fh
        self.size = size
        self.window = window
        self.start = 0
        self.buf = b""

    def get(self, off: int, n: int) -> bytes:
        if off < self.start or off + n > self.start + len(self.buf):
            self.fh.seek(off)
            self.buf = self.fh.read(max(n, self.window))
            self.start = off
        s = off - self.start
        return self.buf[s:s + n]


def pcapng_ts_ns(ts_high: int, ts_low: int, units_per_s: int, offset_s: int) -> int | None:
    """An enhanced packet block's timestamp in ns since the epoch (None when out of range)."""
    raw = (ts_high << 32) | ts_low
    if units_per_s == 1_000_000_000:
        ts = raw
    elif units_per_s == 1_000_000:
        ts = raw * 1000
    else:
        ts = raw * 1_000_000_000 // units_per_s
    ts += offset_s * 1_000_000_000
    return ts if 0 <= ts < 1 << 63 else None


def _iter_options(blob: bytes, endian: str) -> list[tuple[int, bytes]]:
    out = []
    p = 0
    while p + 4 <= len(blob):
        code, ln = struct.unpack(endian + "HH", blob[p:p + 4])
        if code == 0:
            break
        val = blob[p + 4:p + 4 + ln]
        if len(val) < ln:
            break
        out.append((code, val))
        p += 4 + ((ln + 3) & ~3)
    return out


PCAP_MAGICS = (b"\xd4\xc3\xb2\xa1", b"\xa1\xb2\xc3\xd4", b"\x4d\x3c\xb2\xa1", b"\xa1\xb2\x3c\x4d")


def iter_packet_batches(
    path: str | os.PathLike[str],
    stats: CaptureStats | None = None,
    chunk_bytes: int = CHUNK_BYTES,
) -> Iterator[PacketBatch]:
    """Decoded packet batches of one capture; ``stats`` collects counts and warnings.

    Raises :class:`ParseError` (naming the file and byte offset) when the file is
    not a capture at all or its header is corrupt. Damage later in the file stops
    reading with a warning in ``stats.warnings``; what was read stays usable.
    """
    stats = stats if stats is not None else CaptureStats()
    decoder = _Decoder(stats)
    for chunk in iter_record_chunks(path, stats, max(chunk_bytes, 1 << 16)):
        yield decoder.decode(chunk)


def iter_record_chunks(
    path: str | os.PathLike[str],
    stats: CaptureStats,
    chunk_bytes: int = CHUNK_BYTES,
    max_records: int = 65536,
) -> Iterator[RecordChunk]:
    """The usable packet records of one capture, undecoded, about ``chunk_bytes`` of
    packets at a time: the walk :func:`iter_packet_batches` decodes, for readers that
    need the records' bytes as captured. Errors as :func:`iter_packet_batches`."""
    path = os.fspath(path)
    try:
        fh = open(path, "rb")
    except FileNotFoundError:
        raise ParseError(path, None, "no such file") from None
    except IsADirectoryError:
        raise ParseError(path, None, "is a directory, not a capture file") from None
    except PermissionError:
        raise ParseError(path, None, "permission denied") from None
    with fh:
        head = fh.read(24)
        if len(head) < 4:
            raise ParseError(path, 0, f"file too short to be a capture ({len(head)} bytes)")
        if head[:4] in PCAP_MAGICS:
            if len(head) < 24:
                raise ParseError(path, 0, f"truncated pcap file header ({len(head)} of 24 bytes)")
            yield from _pcap_chunks(path, fh, head, stats, chunk_bytes)
        elif head[:4] == b"\x0a\x0d\x0d\x0a":
            fh.seek(0)
            yield from _pcapng_chunks(path, fh, stats, chunk_bytes, max_records)
        else:
            raise ParseError(path, 0, f"not a pcap or pcapng file (magic {head[:4].hex()})",
                             "give a capture written by tcpdump, dumpcap or Wireshark")
