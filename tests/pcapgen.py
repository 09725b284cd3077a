"""Test builders for captures: packets as bytes, written as pcap or pcapng files.

``make_tcp``/``make_udp`` build IPv4/IPv6 packets with real headers (checksums left
zero: nothing here verifies them); ``write_pcap`` and ``write_pcapng`` write them with
any timestamp precision, byte order and link type.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10


def _ip_bytes(addr: str) -> tuple[int, bytes]:
    a = ipaddress.ip_address(addr)
    return a.version, a.packed


def make_ip(src: str, dst: str, proto: int, l4: bytes, *, ipv4_options: bytes = b"",
            frag_offset: int = 0, more_fragments: bool = False, ttl: int = 64,
            ipv6_ext: Sequence[tuple[int, bytes]] = (), total_length: int | None = None) -> bytes:
    """An IPv4 or IPv6 packet around ``l4`` (IPv6 extension headers as (type, body))."""
    ver, s = _ip_bytes(src)
    _, d = _ip_bytes(dst)
    if ver == 4:
        opts = ipv4_options + b"\x00" * (-len(ipv4_options) % 4)
        ihl = 5 + len(opts) // 4
        tot = total_length if total_length is not None else ihl * 4 + len(l4)
        flags_frag = (0x2000 if more_fragments else 0) | (frag_offset // 8)
        hdr = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, tot, 0x1234, flags_frag, ttl, proto,
                          0, s, d)
        return hdr + opts + l4
    chain = b""
    nh_first = proto
    if ipv6_ext:
        nh_first = ipv6_ext[0][0]
        for k, (typ, body) in enumerate(ipv6_ext):
            nxt = ipv6_ext[k + 1][0] if k + 1 < len(ipv6_ext) else proto
            if typ == 44:
                chain += struct.pack("!BBHI", nxt, 0, body and int.from_bytes(body[:2], "big")
                                     or 0, 0x1234)
            else:
                raw = bytes([nxt, 0]) + body
                raw += b"\x00" * (-len(raw) % 8)
                raw = bytes([nxt, len(raw) // 8 - 1]) + raw[2:]
                chain += raw
    plen = len(chain) + len(l4)
    hdr = struct.pack("!IHBB16s16s", 0x60000000, plen, nh_first, ttl, s, d)
    return hdr + chain + l4


def make_tcp(src: str, dst: str, sport: int, dport: int, flags: int = ACK, payload: bytes = b"",
             *, win: int = 65535, mss: int | None = None, ws: int | None = None, **ip) -> bytes:
    opts = b""
    if mss is not None:
        opts += struct.pack("!BBH", 2, 4, mss)
    if ws is not None:
        opts += struct.pack("!BBB", 3, 3, ws) + b"\x01"
    opts += b"\x01" * (-len(opts) % 4)
    doff = 5 + len(opts) // 4
    tcp = struct.pack("!HHIIBBHHH", sport, dport, 1, 0, doff << 4, flags, win, 0, 0) + opts
    return make_ip(src, dst, 6, tcp + payload, **ip)


def make_udp(src: str, dst: str, sport: int, dport: int, payload: bytes = b"", **ip) -> bytes:
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0)
    return make_ip(src, dst, 17, udp + payload, **ip)


def ether(ip: bytes, *, vlans: Sequence[int] = (), ethertype: int | None = None,
          qinq: bool = False) -> bytes:
    et = ethertype if ethertype is not None else (0x0800 if ip[0] >> 4 == 4 else 0x86DD)
    hdr = b"\x02\x00\x00\x00\x00\x01" + b"\x02\x00\x00\x00\x00\x02"
    tags = b""
    for k, vid in enumerate(vlans):
        tpid = 0x88A8 if (qinq and k == 0) else 0x8100
        tags += struct.pack("!HH", tpid, vid)
    return hdr + tags + struct.pack("!H", et) + ip


def sll(ip: bytes) -> bytes:
    proto = 0x0800 if ip[0] >> 4 == 4 else 0x86DD
    return struct.pack("!HHH8sH", 0, 1, 6, b"\x02\x00\x00\x00\x00\x01\x00\x00", proto) + ip


def sll2(ip: bytes) -> bytes:
    proto = 0x0800 if ip[0] >> 4 == 4 else 0x86DD
    return struct.pack("!HHIHBB8s", proto, 0, 2, 1, 0, 6, b"\x02\x00\x00\x00\x00\x01\x00\x00") + ip


def null_loop(ip: bytes, network_order: bool = False) -> bytes:
    af = 2 if ip[0] >> 4 == 4 else 30
    return struct.pack("!I" if network_order else "<I", af) + ip


@dataclass
class Pkt:
    """One record: time in seconds (float or (sec, frac) exact) and the frame bytes."""

    ts: float | tuple[int, int]
    data: bytes
    iface: int = 0
    orig_len: int | None = None


def write_pcap(path: Path, pkts: Sequence[Pkt], *, linktype: int = 1, nano: bool = False,
               big_endian: bool = False, snaplen: int = 262144, truncate_last: int = 0) -> Path:
    e = ">" if big_endian else "<"
    magic = 0xA1B23C4D if nano else 0xA1B2C3D4
    out = bytearray(struct.pack(e + "IHHiIII", magic, 2, 4, 0, 0, snaplen, linktype))
    scale = 1_000_000_000 if nano else 1_000_000
    for p in pkts:
        if isinstance(p.ts, tuple):
            sec, frac = p.ts
        else:
            sec = int(p.ts)
            frac = int(round((p.ts - sec) * scale))
        orig = p.orig_len if p.orig_len is not None else len(p.data)
        out += struct.pack(e + "IIII", sec, frac, len(p.data), orig) + p.data
    if truncate_last:
        del out[-truncate_last:]
    path.write_bytes(bytes(out))
    return path


@dataclass
class Iface:
    linktype: int = 1
    tsresol: int | None = None  # pcapng if_tsresol byte; None = default µs
    tsoffset: int = 0


def _block(e: str, btype: int, body: bytes) -> bytes:
    body += b"\x00" * (-len(body) % 4)
    n = 12 + len(body)
    return struct.pack(e + "II", btype, n) + body + struct.pack(e + "I", n)


def _opt(e: str, code: int, val: bytes) -> bytes:
    return struct.pack(e + "HH", code, len(val)) + val + b"\x00" * (-len(val) % 4)


def write_pcapng(path: Path, pkts: Sequence[Pkt], ifaces: Sequence[Iface] = (Iface(),), *,
                 big_endian: bool = False, extra_blocks: Sequence[tuple[int, bytes]] = (),
                 simple: bool = False) -> Path:
    e = ">" if big_endian else "<"
    out = bytearray(_block(e, 0x0A0D0D0A, struct.pack(e + "IHHq", 0x1A2B3C4D, 1, 0, -1)))
    for typ, body in extra_blocks:
        out += _block(e, typ, body)
    for itf in ifaces:
        opts = b""
        if itf.tsresol is not None:
            opts += _opt(e, 9, bytes([itf.tsresol]))
        if itf.tsoffset:
            opts += _opt(e, 14, struct.pack(e + "q", itf.tsoffset))
        if opts:
            opts += struct.pack(e + "HH", 0, 0)
        out += _block(e, 1, struct.pack(e + "HHI", itf.linktype, 0, 262144) + opts)
    for p in pkts:
        itf = ifaces[p.iface]
        if itf.tsresol is None:
            den = 1_000_000
        elif itf.tsresol & 0x80:
            den = 1 << (itf.tsresol & 0x7F)
        else:
            den = 10 ** itf.tsresol
        if isinstance(p.ts, tuple):
            raw = p.ts[0] * den + p.ts[1]
        else:
            raw = int(round((p.ts - itf.tsoffset) * den))
        orig = p.orig_len if p.orig_len is not None else len(p.data)
        if simple:
            out += _block(e, 3, struct.pack(e + "I", orig) + p.data)
        else:
            out += _block(e, 6, struct.pack(e + "IIIII", p.iface, raw >> 32, raw & 0xFFFFFFFF,
                                            len(p.data), orig) + p.data)
    path.write_bytes(bytes(out))
    return path


@dataclass
class Conv:
    """A scripted TCP/UDP conversation for flow tests: yields Pkt records."""

    client: str = "192.168.1.10"
    server: str = "203.0.113.5"
    cport: int = 40000
    sport: int = 443
    t0: float = 1_700_000_000.0
    pkts: list[Pkt] = field(default_factory=list)

    def tcp(self, dt: float, up: bool, flags: int, payload: bytes = b"", **kw) -> Conv:
        t = self.t0 + dt
        if up:
            ip = make_tcp(self.client, self.server, self.cport, self.sport, flags, payload, **kw)
        else:
            ip = make_tcp(self.server, self.client, self.sport, self.cport, flags, payload, **kw)
        self.pkts.append(Pkt(t, ether(ip)))
        return self

    def udp(self, dt: float, up: bool, payload: bytes = b"x") -> Conv:
        t = self.t0 + dt
        if up:
            ip = make_udp(self.client, self.server, self.cport, self.sport, payload)
        else:
            ip = make_udp(self.server, self.client, self.sport, self.cport, payload)
        self.pkts.append(Pkt(t, ether(ip)))
        return self

    def handshake(self, dt: float = 0.0) -> Conv:
        return (self.tcp(dt, True, SYN, mss=1460, ws=7)
                .tcp(dt + 0.01, False, SYN | ACK, mss=1400, ws=8)
                .tcp(dt + 0.02, True, ACK))
