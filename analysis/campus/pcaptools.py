"""Small classic-pcap utilities: rotate a capture into pieces, cut records to a snap length.

They stand in for a capture's own rotation (``tcpdump -G``/``-C``) and header-only
snap length when building test and benchmark inputs from existing captures. Classic
pcap only (any byte order and time precision); records are copied, never decoded.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from pathlib import Path

from analysis.errors import ParseError

_MAGICS = {b"\xd4\xc3\xb2\xa1": "<", b"\x4d\x3c\xb2\xa1": "<",
           b"\xa1\xb2\xc3\xd4": ">", b"\xa1\xb2\x3c\x4d": ">"}


def iter_records(path: str | os.PathLike[str]) -> Iterator[tuple[bytes, bytes, bytes]]:
    """(file header, record header, record data) of each record of a classic pcap."""
    with open(path, "rb") as fh:
        head = fh.read(24)
        endian = _MAGICS.get(head[:4])
        if endian is None or len(head) < 24:
            raise ParseError(path, 0, "not a classic pcap file")
        rec = struct.Struct(endian + "IIII")
        while True:
            rh = fh.read(16)
            if len(rh) < 16:
                return
            _s, _f, caplen, _w = rec.unpack(rh)
            data = fh.read(caplen)
            if len(data) < caplen:
                return
            yield head, rh, data


def truncate_pcap(src: str | os.PathLike[str], dst: str | os.PathLike[str], snaplen: int) -> int:
    """Copy ``src`` keeping at most ``snaplen`` bytes of each record; returns the records."""
    n = 0
    with open(dst, "wb") as out:
        endian = "<"
        for head, rh, data in iter_records(src):
            if n == 0:
                endian = _MAGICS[head[:4]]
                h = bytearray(head)
                h[16:20] = struct.pack(endian + "I", snaplen)
                out.write(h)
            s, f, caplen, wire = struct.unpack(endian + "IIII", rh)
            keep = min(caplen, snaplen)
            out.write(struct.pack(endian + "IIII", s, f, keep, wire))
            out.write(data[:keep])
            n += 1
    return n


def split_pcap(src: str | os.PathLike[str], out_dir: str | os.PathLike[str], pieces: int,
               basename: str = "rot", snaplen: int | None = None) -> list[Path]:
    """Rotate ``src`` into ``pieces`` files of about equal record counts (optionally truncated)."""
    total = sum(1 for _ in iter_records(src))
    per = max(1, -(-total // pieces))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    out = None
    endian = "<"
    for i, (head, rh, data) in enumerate(iter_records(src)):
        if i % per == 0:
            if out is not None:
                out.close()
            p = out_dir / f"{basename}.pcap{len(paths)}"
            paths.append(p)
            out = open(p, "wb")
            endian = _MAGICS[head[:4]]
            h = bytearray(head)
            if snaplen is not None:
                h[16:20] = struct.pack(endian + "I", snaplen)
            out.write(h)
        assert out is not None
        if snaplen is not None and len(data) > snaplen:
            s, f, _c, wire = struct.unpack(endian + "IIII", rh)
            rh = struct.pack(endian + "IIII", s, f, snaplen, wire)
            data = data[:snaplen]
        out.write(rh)
        out.write(data)
    if out is not None:
        out.close()
    return paths
