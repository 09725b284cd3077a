"""Bi-flow assembly: packet batches to :class:`~analysis.flowtable.FlowTable` chunks.

nfstream's vocabulary: a direction-agnostic 5-tuple key, idle and active timeouts,
TCP termination (FIN both ways or RST, plus a short grace for trailing ACKs; a SYN
after that, or a fresh SYN on an established flow, starts a new flow on the same
5-tuple). Every flow records why it ended.

Orientation (the key's source is the phone): the endpoint inside a ``device_nets``
prefix; otherwise the SYN sender; otherwise the first sender.

The per-packet work runs in C (``_fastpath.c``) over an open-addressing hash table
and flow-state arrays that this module owns as numpy arrays. Finished flows are emitted in chunks as the capture advances, so
memory is bounded by the packets of the flows still open, not by the file.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from . import _fast
from . import pcap as P
from .flowtable import FLOW_FIELDS, CaptureStats, EndReason, FlowTable

# f_state bits
ST_FIN_A = 1  # FIN sent by endpoint A
ST_FIN_B = 2
ST_RST = 4
ST_BEYOND_SYN = 8  # something other than a pure SYN was seen


@dataclass(frozen=True)
class FlowOptions:
    """How packets are cut into bi-flows."""

    idle_timeout: float = 120.0
    active_timeout: float = 1800.0
    tcp_grace: float = 2.0  # trailing packets after FIN/RST that still belong to the flow
    device_nets: tuple[str, ...] = ()  # CIDRs or addresses of the phone side
    payload: bool = False  # keep raw L4 payload bytes (for MIRAGE's L4_raw_payload)
    flush_every: int = 4  # batches between emissions of finished flows


def parse_device_nets(nets: Iterable[str]) -> np.ndarray:
    """(K, 5) uint64 rows: version, addr hi, addr lo, mask hi, mask lo."""
    rows = []
    for text in nets:
        net = ipaddress.ip_network(text, strict=False)
        if net.version == 4:
            addr = int(net.network_address)
            mask = int(net.netmask)
            rows.append((4, 0, addr, 0, mask))
        else:
            addr = int(net.network_address)
            mask = int(net.netmask)
            rows.append((6, addr >> 64, addr & (2**64 - 1), mask >> 64, mask & (2**64 - 1)))
    return np.array(rows, dtype=np.uint64).reshape(-1, 5)


# packet-store columns kept per packet until its flow is emitted (see _fastpath.c S_*)
S_SLOT, S_TS, S_DIR, S_IPLEN, S_IPHDR, S_L4HDR, S_PAYLEN, S_FLAGS, S_WIN, S_FRAME, S_PAYOFF, \
    S_PAYCAP = range(12)
_STATE = {"f_key": (np.uint64, 5), "f_first": np.int64, "f_last": np.int64, "f_term": np.int64,
          "f_state": np.int64, "f_src_a": np.int64, "f_end": np.int64, "f_n": np.int64,
          "f_mss": (np.int64, 2), "f_ws": (np.int64, 2)}


class FlowAssembler:
    """Stateful assembler: feed packet batches, get finished flows as FlowTables."""

    def __init__(self, options: FlowOptions | None = None, source: str | None = None) -> None:
        self.opt = options or FlowOptions()
        self.source = source
        self.nets = parse_device_nets(self.opt.device_nets)
        self.idle = int(self.opt.idle_timeout * 1e9)
        self.active = int(self.opt.active_timeout * 1e9)
        self.grace = int(self.opt.tcp_grace * 1e9)
        self.n_slots = 0
        self.st: dict[str, np.ndarray] = {}
        self._alloc_slots(1024)
        self.ht = np.full(4096, -1, dtype=np.int64)
        self.store = np.zeros((1 << 16, 12), dtype=np.int64)
        self.n_store = 0
        self.now = np.iinfo(np.int64).min
        self.batches_since_flush = 0
        self.payload_file: str | None = None

    def _alloc_slots(self, cap: int) -> None:
        n = self.n_slots
        new = {}
        for k, dt in _STATE.items():
            shape = (cap, dt[1]) if isinstance(dt, tuple) else (cap,)
            arr = np.zeros(shape, dtype=dt[0] if isinstance(dt, tuple) else dt)
            if k in self.st:
                arr[:n] = self.st[k][:n]
            new[k] = arr
        self.st = new

    def _ensure(self, extra: int) -> None:
        need = self.n_slots + extra
        if need > len(self.st["f_first"]):
            self._alloc_slots(max(need, 2 * len(self.st["f_first"])))
        if 2 * need > len(self.ht):
            size = 1 << int(np.ceil(np.log2(max(4 * need, 4096))))
            self.ht = np.full(size, -1, dtype=np.int64)
            _fast.rebuild_hash(self.ht, self.st["f_key"], self.n_slots)
        if self.n_store + extra > len(self.store):
            bigger = np.zeros((max(self.n_store + extra, 2 * len(self.store)), 12), np.int64)
            bigger[:self.n_store] = self.store[:self.n_store]
            self.store = bigger

    def feed(self, batch: P.PacketBatch) -> list[FlowTable]:
        """Add one batch; returns the flows that finished (possibly none)."""
        n = len(batch)
        if n == 0:
            return []
        self._ensure(n)
        self.n_slots, self.n_store = _fast.assign(
            batch.ts_ns, batch.cols, batch.addrs, batch.frame, batch.file_off, self.nets,
            self.idle, self.active, self.grace, self.ht, self.st, self.store, self.n_slots,
            self.n_store)
        self.now = max(self.now, int(batch.ts_ns.max()))
        self.batches_since_flush += 1
        if self.batches_since_flush >= self.opt.flush_every:
            return self.flush(final=False)
        return []

    def flush(self, final: bool) -> list[FlowTable]:
        """Emit the flows that are over (all of them when ``final``)."""
        self.batches_since_flush = 0
        n = self.n_slots
        if n == 0:
            return []
        st = self.st
        end = st["f_end"][:n].copy()
        open_ = end < 0
        term = st["f_term"][:n]
        rst = (st["f_state"][:n] & ST_RST) != 0
        if final:
            end[open_ & (term < 0)] = EndReason.EOF
            end[open_ & (term >= 0) & rst] = EndReason.RST
            end[open_ & (term >= 0) & ~rst] = EndReason.FIN
        else:
            idle_over = st["f_last"][:n] < self.now - self.idle
            term_over = (term >= 0) & (term < self.now - self.grace)
            end[open_ & term_over & rst] = EndReason.RST
            end[open_ & term_over & ~rst] = EndReason.FIN
            end[open_ & ~term_over & idle_over] = EndReason.IDLE
        done = end >= 0
        if not done.any():
            return []
        remap = np.cumsum(~done) - 1
        n_em = int(st["f_n"][:n][done].sum())
        em, counts = _fast.partition(self.store, self.n_store, n, done, remap, n_em)
        done_slots = np.flatnonzero(done)
        table = self._build(done_slots, end[done_slots], counts[done_slots], em)
        live = np.flatnonzero(~done)
        for arr in st.values():
            arr[:len(live)] = arr[live]
        self.n_slots = len(live)
        self.n_store -= n_em
        _fast.rebuild_hash(self.ht, st["f_key"], self.n_slots)
        return [table] if len(table) else []

    def _build(self, slots: np.ndarray, reasons: np.ndarray, counts: np.ndarray,
               em: np.ndarray) -> FlowTable:
        F = len(slots)
        offsets = np.zeros(F + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        st = self.st
        src, dst, sport, dport, proto, ver = _fast.flow_keys(slots, st["f_key"], st["f_src_a"])
        ts, dirs, iplen, paylen = em[S_TS], em[S_DIR], em[S_IPLEN], em[S_PAYLEN]
        ci, ct = _fast.counters(offsets, dirs, ts, iplen, paylen)
        flows: dict[str, np.ndarray] = {
            "ip_version": ver.astype(np.uint8), "src_addr": src, "dst_addr": dst,
            "src_port": sport.astype(np.uint16), "dst_port": dport.astype(np.uint16),
            "proto": proto.astype(np.uint8),
            "first_ts_ns": ts[offsets[:-1]],
            "last_ts_ns": np.maximum(st["f_last"][slots], np.maximum(ct[:, 1], ct[:, 3])),
            "end_reason": reasons.astype(np.uint8),
        }
        for j, name in enumerate(("bf_packets", "uf_packets", "df_packets", "bf_ip_bytes",
                                  "uf_ip_bytes", "df_ip_bytes", "bf_payload_bytes",
                                  "uf_payload_bytes", "df_payload_bytes")):
            flows[name] = ci[:, j].copy()
        for j, name in enumerate(("uf_first_ts_ns", "uf_last_ts_ns", "df_first_ts_ns",
                                  "df_last_ts_ns")):
            flows[name] = ct[:, j].copy()
        mss = st["f_mss"][slots].astype(np.float64)
        ws = st["f_ws"][slots].astype(np.float64)
        mss[mss < 0] = np.nan
        ws[ws < 0] = np.nan
        flows["uf_mss"], flows["df_mss"] = mss[:, 0].copy(), mss[:, 1].copy()
        flows["uf_ws"], flows["df_ws"] = ws[:, 0].copy(), ws[:, 1].copy()
        flows["stats"] = _fast.features(ts, dirs, iplen, offsets)
        assert set(flows) == set(FLOW_FIELDS)
        packets = {
            "pkt_ts_ns": ts,
            "pkt_dir": dirs.astype(np.uint8),
            "pkt_ip_len": iplen.astype(np.int32),
            "pkt_ip_hdr_len": em[S_IPHDR].astype(np.int32),
            "pkt_l4_hdr_len": em[S_L4HDR].astype(np.int32),
            "pkt_payload_len": paylen.astype(np.int32),
            "pkt_tcp_flags": em[S_FLAGS].astype(np.uint8),
            "pkt_tcp_win": em[S_WIN].astype(np.int32),
            "pkt_frame": em[S_FRAME],
        }
        table = FlowTable(flows, packets, offsets, source=self.source)
        if self.opt.payload and self.payload_file:
            table.payload, table.payload_offsets = _read_payloads(
                self.payload_file, em[S_PAYOFF], em[S_PAYCAP])
        return table


def _read_payloads(path: str, offs: np.ndarray, caps: np.ndarray) -> tuple[bytes, np.ndarray]:
    """Gather captured payload bytes back from the capture file (only with --payload)."""
    out = np.zeros(len(offs) + 1, dtype=np.int64)
    np.cumsum(caps, out=out[1:])
    parts = []
    with open(path, "rb") as fh:
        for o, c in zip(offs.tolist(), caps.tolist(), strict=True):
            if c:
                fh.seek(o)
                parts.append(fh.read(c))
    return b"".join(parts), out


def iter_flow_chunks(
    paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
    options: FlowOptions | None = None,
    stats: CaptureStats | None = None,
    progress=None,
) -> Iterator[FlowTable]:
    """Finished flows of one or more captures (read in order, as one stream), in chunks.

    ``progress(bytes_done)`` is called after each batch when given.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files: list[str] = [os.fspath(p) for p in paths]
    stats = stats if stats is not None else CaptureStats()
    asm = FlowAssembler(options, source=",".join(files))
    done_bytes = 0
    for path in files:
        asm.payload_file = path
        file_stats = CaptureStats()
        for batch in P.iter_packet_batches(path, file_stats):
            yield from asm.feed(batch)
            if progress is not None:
                progress(done_bytes + _batch_end(batch))
        if len(files) > 1 and asm.opt.payload:
            # payload offsets refer to this file: emit everything before the next one
            yield from asm.flush(final=True)
        done_bytes += os.path.getsize(path)
        stats.merge(file_stats)
    yield from asm.flush(final=True)


def _batch_end(batch: P.PacketBatch) -> int:
    return int(batch.file_off[-1]) if len(batch) else 0


def read_flows(
    paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
    options: FlowOptions | None = None,
    progress=None,
) -> FlowTable:
    """All bi-flows of one or more captures as one table, ordered by first packet."""
    stats = CaptureStats()
    chunks = list(iter_flow_chunks(paths, options, stats, progress))
    table = FlowTable.concat(chunks)
    if len(table):
        first_frame = table.packets["pkt_frame"][table.pkt_offsets[:-1]]
        order = np.lexsort((first_frame, table.flows["first_ts_ns"]))
        if not np.array_equal(order, np.arange(len(table))):
            table = table.take(order)
    table.capture = stats
    table.capture.packets_in_flows = table.n_packets
    table.source = chunks[0].source if chunks else None
    return table
