"""The columnar bi-flow table every part of the analysis library shares.

A :class:`FlowTable` holds F bi-flows and the P packets that make them up, as
numpy arrays (the hot path never builds per-packet Python objects). Packets are
grouped by flow: the packets of flow ``i`` are ``pkt_*[pkt_offsets[i]:pkt_offsets[i+1]]``
in capture order.

Orientation: the flow key is device first (``src`` is the phone side); packet
``dir`` is 0 upstream (src -> dst) and 1 downstream, as MIRAGE's ``packet_dir``.
"""

from __future__ import annotations

import enum
import ipaddress
import socket
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# The 17 MIRAGE statistics, in MIRAGE's key order and spelling.
STAT_NAMES: tuple[str, ...] = (
    "min", "max", "mean", "std", "var", "mad", "skew", "kurtosis",
    "10_percentile", "20_percentile", "30_percentile", "40_percentile", "50_percentile",
    "60_percentile", "70_percentile", "80_percentile", "90_percentile",
)
METRICS: tuple[str, ...] = ("packet_length", "iat")
DIRECTIONS: tuple[str, ...] = ("biflow", "upstream_flow", "downstream_flow")
# Column j of FlowTable.stats is (METRICS[j // 51], DIRECTIONS[(j // 17) % 3], STAT_NAMES[j % 17]).
N_STATS = len(METRICS) * len(DIRECTIONS) * len(STAT_NAMES)  # 102


def stat_column(metric: str, direction: str, stat: str) -> int:
    """Column index in :attr:`FlowTable.stats` of one MIRAGE statistic."""
    return (
        METRICS.index(metric) * 51 + DIRECTIONS.index(direction) * 17 + STAT_NAMES.index(stat)
    )


class EndReason(enum.IntEnum):
    """Why a bi-flow ended (nfstream's vocabulary)."""

    IDLE = 0  # no packet for idle_timeout
    ACTIVE = 1  # lasted longer than active_timeout
    FIN = 2  # FIN seen in both directions (plus grace for trailing ACKs)
    RST = 3  # TCP reset
    EOF = 4  # the capture ended while the flow was open
    NEW_SYN = 5  # a SYN after FIN/RST started a new flow on the same 5-tuple


# TCP flag bits as in the TCP header.
FIN, SYN, RST, PSH, ACK, URG, ECE, CWR = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80
_FLAG_LETTERS = ((FIN, "F"), (SYN, "S"), (RST, "R"), (PSH, "P"), (ACK, "A"), (URG, "U"),
                 (ECE, "E"), (CWR, "C"))


def tcp_flags_str(bits: int) -> str:
    """scapy-style flag letters (``"S"``, ``"SA"``, ``"PA"``, ``"FA"``), as MIRAGE writes them."""
    return "".join(letter for bit, letter in _FLAG_LETTERS if bits & bit)


_ZERO10 = bytes(10)
_ntop, _AF_INET, _AF_INET6 = socket.inet_ntop, socket.AF_INET, socket.AF_INET6


def addr_to_str(raw: np.ndarray | bytes, version: int) -> str:
    """Text form of a 16-byte address slot (IPv4 lives in the first 4 bytes).

    The same text as :mod:`ipaddress` gives, via the C ``inet_ntop`` (20x faster); the
    IPv4-mapped and -compatible IPv6 forms, which the two write differently, go through
    :mod:`ipaddress`.
    """
    b = bytes(raw)
    if version == 4:
        return _ntop(_AF_INET, b[:4])
    if b[:10] == _ZERO10:
        return str(ipaddress.IPv6Address(b))
    return _ntop(_AF_INET6, b)


@dataclass
class CaptureStats:
    """What reading one or more captures saw: counts, skips by reason, warnings."""

    packets: int = 0  # records read
    packets_in_flows: int = 0  # packets that became part of a bi-flow
    bytes: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> packets
    warnings: list[str] = field(default_factory=list)
    linktypes: dict[int, int] = field(default_factory=dict)  # linktype -> packets
    first_ts_ns: int | None = None
    last_ts_ns: int | None = None

    def skip(self, reason: str, n: int = 1) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + n

    def merge(self, other: CaptureStats) -> None:
        self.packets += other.packets
        self.packets_in_flows += other.packets_in_flows
        self.bytes += other.bytes
        for k, v in other.skipped.items():
            self.skip(k, v)
        self.warnings.extend(other.warnings)
        for lt, n in other.linktypes.items():
            self.linktypes[lt] = self.linktypes.get(lt, 0) + n
        if other.first_ts_ns is not None:
            self.first_ts_ns = (other.first_ts_ns if self.first_ts_ns is None
                                else min(self.first_ts_ns, other.first_ts_ns))
        if other.last_ts_ns is not None:
            self.last_ts_ns = (other.last_ts_ns if self.last_ts_ns is None
                               else max(self.last_ts_ns, other.last_ts_ns))


# Per-flow array fields (name -> dtype); 2-D ones are noted.
FLOW_FIELDS: dict[str, Any] = {
    "ip_version": np.uint8,
    "src_addr": (np.uint8, 16),  # (F, 16); IPv4 in the first 4 bytes
    "dst_addr": (np.uint8, 16),
    "src_port": np.uint16,
    "dst_port": np.uint16,
    "proto": np.uint8,  # 6 TCP, 17 UDP
    "first_ts_ns": np.int64,
    "last_ts_ns": np.int64,
    "end_reason": np.uint8,  # EndReason
    "bf_packets": np.int64, "uf_packets": np.int64, "df_packets": np.int64,
    "bf_ip_bytes": np.int64, "uf_ip_bytes": np.int64, "df_ip_bytes": np.int64,
    "bf_payload_bytes": np.int64, "uf_payload_bytes": np.int64, "df_payload_bytes": np.int64,
    "uf_first_ts_ns": np.int64, "uf_last_ts_ns": np.int64,  # -1 when no packet that way
    "df_first_ts_ns": np.int64, "df_last_ts_ns": np.int64,
    "uf_mss": np.float64, "df_mss": np.float64,  # NaN when absent (UDP, no SYN seen)
    "uf_ws": np.float64, "df_ws": np.float64,
    "stats": (np.float64, N_STATS),  # (F, 102) MIRAGE flow_features, see stat_column()
}

# Per-packet array fields, grouped by flow in capture order.
PACKET_FIELDS: dict[str, Any] = {
    "pkt_ts_ns": np.int64,  # capture time, ns since the epoch
    "pkt_dir": np.uint8,  # 0 upstream, 1 downstream
    "pkt_ip_len": np.int32,  # IP total length (L3 bytes incl. headers)
    "pkt_ip_hdr_len": np.int32,
    "pkt_l4_hdr_len": np.int32,  # 8 for UDP
    "pkt_payload_len": np.int32,  # L4 payload bytes
    "pkt_tcp_flags": np.uint8,
    "pkt_tcp_win": np.int32,  # raw 16-bit window; 0 for UDP
    "pkt_frame": np.int64,  # 0-based record number in the capture it came from
}


@dataclass
class FlowTable:
    """F bi-flows and their packets as numpy columns (see module docstring)."""

    flows: dict[str, np.ndarray]  # FLOW_FIELDS
    packets: dict[str, np.ndarray]  # PACKET_FIELDS
    pkt_offsets: np.ndarray  # (F+1,) int64
    # Optional raw L4 payloads (only with --payload): concatenated bytes, and per-packet
    # offsets into it (P+1,), in the same packet order.
    payload: bytes | None = None
    payload_offsets: np.ndarray | None = None
    # Labels, filled by the correlator: object arrays of length F (None = not labelled).
    labels: dict[str, np.ndarray] = field(default_factory=dict)
    capture: CaptureStats = field(default_factory=CaptureStats)
    source: str | None = None  # the capture path(s) this came from

    def __len__(self) -> int:
        return int(len(self.pkt_offsets) - 1)

    @property
    def n_packets(self) -> int:
        return int(self.pkt_offsets[-1]) if len(self.pkt_offsets) else 0

    def src_ip(self, i: int) -> str:
        return addr_to_str(self.flows["src_addr"][i], int(self.flows["ip_version"][i]))

    def dst_ip(self, i: int) -> str:
        return addr_to_str(self.flows["dst_addr"][i], int(self.flows["ip_version"][i]))

    def ip_strings(self) -> tuple[list[str], list[str]]:
        """Text addresses of every flow's src and dst (each distinct address formatted once)."""
        n = len(self)
        if n == 0:
            return [], []
        ver = self.flows["ip_version"].astype(np.uint8).reshape(n, 1)
        both = np.concatenate([np.hstack([ver, self.flows["src_addr"]]),
                               np.hstack([ver, self.flows["dst_addr"]])])
        keys = np.ascontiguousarray(both).view(np.dtype((np.void, 17))).ravel()
        uniq, inverse = np.unique(keys, return_inverse=True)
        text = [addr_to_str(b[1:], b[0]) for b in map(bytes, uniq)]
        names = np.array(text, dtype=object)[inverse.ravel()]
        return names[:n].tolist(), names[n:].tolist()

    def packet_slice(self, i: int) -> slice:
        return slice(int(self.pkt_offsets[i]), int(self.pkt_offsets[i + 1]))

    def payload_of(self, pkt: int) -> bytes:
        """Raw L4 payload of packet number ``pkt`` (b"" when payloads were not kept)."""
        if self.payload is None or self.payload_offsets is None:
            return b""
        return self.payload[int(self.payload_offsets[pkt]):int(self.payload_offsets[pkt + 1])]

    def label_column(self, name: str, default: Any = None) -> np.ndarray:
        """A label column (``BF_label``, ``BF_labeling_type``, ...), default-filled."""
        col = self.labels.get(name)
        if col is None:
            col = np.full(len(self), default, dtype=object)
        return col

    @staticmethod
    def empty() -> FlowTable:
        flows: dict[str, np.ndarray] = {}
        for name, dt in FLOW_FIELDS.items():
            if isinstance(dt, tuple):
                flows[name] = np.zeros((0, dt[1]), dtype=dt[0])
            else:
                flows[name] = np.zeros(0, dtype=dt)
        packets = {name: np.zeros(0, dtype=dt) for name, dt in PACKET_FIELDS.items()}
        return FlowTable(flows, packets, np.zeros(1, dtype=np.int64))

    @staticmethod
    def concat(tables: list[FlowTable]) -> FlowTable:
        """One table holding the flows of several (packet offsets rebased)."""
        tables = [t for t in tables if len(t)] or [FlowTable.empty()]
        flows = {k: np.concatenate([t.flows[k] for t in tables]) for k in FLOW_FIELDS}
        packets = {k: np.concatenate([t.packets[k] for t in tables]) for k in PACKET_FIELDS}
        offs = [np.zeros(1, dtype=np.int64)]
        base = 0
        for t in tables:
            offs.append(t.pkt_offsets[1:] + base)
            base += t.n_packets
        payload = None
        payload_offsets = None
        if all(t.payload is not None for t in tables):
            payload = b"".join(t.payload or b"" for t in tables)
            poffs = [np.zeros(1, dtype=np.int64)]
            pbase = 0
            for t in tables:
                assert t.payload_offsets is not None
                poffs.append(t.payload_offsets[1:] + pbase)
                pbase += len(t.payload or b"")
            payload_offsets = np.concatenate(poffs)
        labels: dict[str, np.ndarray] = {}
        names = set().union(*(t.labels.keys() for t in tables))
        for name in names:
            labels[name] = np.concatenate([t.label_column(name) for t in tables])
        cap = CaptureStats()
        for t in tables:
            cap.merge(t.capture)
        return FlowTable(flows, packets, np.concatenate(offs), payload, payload_offsets,
                         labels, cap)

    def take(self, idx: np.ndarray) -> FlowTable:
        """A new table with only the flows ``idx`` (in that order)."""
        idx = np.asarray(idx, dtype=np.int64)
        flows = {k: v[idx] for k, v in self.flows.items()}
        starts = self.pkt_offsets[idx]
        lens = self.pkt_offsets[idx + 1] - starts
        offs = np.zeros(len(idx) + 1, dtype=np.int64)
        np.cumsum(lens, out=offs[1:])
        pidx = (np.repeat(starts - offs[:-1], lens) + np.arange(offs[-1], dtype=np.int64)
                if len(idx) else np.zeros(0, dtype=np.int64))
        packets = {k: v[pidx] for k, v in self.packets.items()}
        payload = payload_offsets = None
        if self.payload is not None and self.payload_offsets is not None:
            parts = [self.payload_of(int(p)) for p in pidx]
            payload = b"".join(parts)
            payload_offsets = np.zeros(len(pidx) + 1, dtype=np.int64)
            np.cumsum([len(p) for p in parts], out=payload_offsets[1:])
        labels = {k: v[idx] for k, v in self.labels.items()}
        return FlowTable(flows, packets, offs, payload, payload_offsets, labels,
                         self.capture, self.source)
