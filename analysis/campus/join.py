"""Joining flows cut by file rotation (see :mod:`analysis.campus.ingest`).

For each rotation sequence the pending pieces of all its files are folded in time
order: a piece that may continue an earlier flow is joined to the open flow of the
previous file with the same 5-tuple (either orientation) when the gap is at most
``idle_timeout``. Joined flows get their counters and MIRAGE statistics recomputed
from the pieces' packets, so they equal what one uninterrupted capture would give.
The result replaces the sequence's ``bnd-<seq>.parquet`` files in each partition
(atomic renames; a flow's partition is the hour of its first packet, which joining
never changes). Refolding from the pieces makes the step idempotent and lets files
arrive in any order.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np

from analysis import _fast
from analysis.flowtable import FIN, FLOW_FIELDS, PACKET_FIELDS, RST, EndReason, FlowTable

from .parquet_out import flows_arrow, pending_table
from .store import FileRecord, Store, partition_dir

HOUR_NS = 3_600_000_000_000


def sequence_id(sequence: str) -> str:
    return hashlib.sha256(sequence.encode()).hexdigest()[:16]


def _load(store: Store, rec: FileRecord):
    import pyarrow.parquet as pq

    if not rec.pending:
        return None
    return pending_table(pq.read_table(store.root / rec.pending))


def _ukey(fl: dict[str, np.ndarray], i: int) -> tuple[tuple, tuple, tuple]:
    a = (fl["src_addr"][i].tobytes(), int(fl["src_port"][i]))
    b = (fl["dst_addr"][i].tobytes(), int(fl["dst_port"][i]))
    return (int(fl["ip_version"][i]), int(fl["proto"][i]), min(a, b), max(a, b)), a, b


def fold_sequence(records: list[FileRecord], tables: list, idle_ns: int):
    """Chains of (table index, flow index, flipped) and their cut flags, in time order.

    An open flow is carried forward while no file start lies more than ``idle_ns`` after
    its last packet, so a flow silent during a whole (short) file is still joined.
    """
    chains: list[dict] = []
    carry: dict[tuple, dict] = {}
    prev: FileRecord | None = None
    for k, (rec, loaded) in enumerate(zip(records, tables)):
        adjacent_prev = (prev is not None and prev.last_ts_ns is not None
                         and rec.first_ts_ns is not None
                         and rec.first_ts_ns - prev.last_ts_ns <= idle_ns)
        if rec.first_ts_ns is not None:
            for key in [key for key, c in carry.items() if rec.first_ts_ns - c["last"] > idle_ns]:
                over = carry.pop(key)  # idle for longer than the timeout: the flow is over
                over["cut_end"] = False
                over["idle"] = True
        if loaded is not None:
            table, cut_s, cut_e = loaded
            fl = table.flows
            for i in np.argsort(fl["first_ts_ns"], kind="stable").tolist():
                key, a, _b = _ukey(fl, i)
                chain = None
                if cut_s[i]:
                    cand = carry.get(key)
                    if cand is not None and int(fl["first_ts_ns"][i]) - cand["last"] <= idle_ns:
                        chain = carry.pop(key)
                if chain is None:
                    over = carry.pop(key, None)
                    if over is not None:  # a new flow on the 5-tuple: the open one is over
                        over["cut_end"] = False
                        over["idle"] = True
                    chain = {"pieces": [], "src": a, "last": 0,
                             "cut_start": bool(cut_s[i]) and not adjacent_prev}
                    chains.append(chain)
                chain["pieces"].append((k, i, a != chain["src"]))
                chain["last"] = max(chain["last"], int(fl["last_ts_ns"][i]))
                chain["cut_end"] = False
                if cut_e[i]:
                    old = carry.pop(key, None)
                    if old is not None and old is not chain:
                        old["cut_end"] = False
                    carry[key] = chain
        prev = rec
    for chain in carry.values():
        chain["cut_end"] = True  # the next file has not been ingested (yet)
    return chains


def build_table(chains: list[dict], tables: list) -> tuple[FlowTable, np.ndarray, np.ndarray,
                                                            np.ndarray]:
    """One FlowTable of the joined chains, counters and statistics recomputed."""
    F = len(chains)
    flows: dict[str, np.ndarray] = {}
    for name, dt in FLOW_FIELDS.items():
        shape = (F, dt[1]) if isinstance(dt, tuple) else (F,)
        flows[name] = np.zeros(shape, dtype=dt[0] if isinstance(dt, tuple) else dt)
    pk_parts: dict[str, list[np.ndarray]] = {name: [] for name in PACKET_FIELDS}
    offsets = np.zeros(F + 1, dtype=np.int64)
    total = 0
    for f, chain in enumerate(chains):
        k0, i0, _ = chain["pieces"][0]
        first = tables[k0][0]
        for name in ("ip_version", "src_addr", "dst_addr", "src_port", "dst_port", "proto",
                     "first_ts_ns"):
            flows[name][f] = first.flows[name][i0]
        mss = [np.nan, np.nan]
        ws = [np.nan, np.nan]
        for k, i, flip in chain["pieces"]:
            t = tables[k][0]
            sl = t.packet_slice(i)
            for name in PACKET_FIELDS:
                v = t.packets[name][sl]
                if name == "pkt_dir" and flip:
                    v = (1 - v).astype(v.dtype)
                pk_parts[name].append(v)
            total += sl.stop - sl.start
            for d, col in ((0, "uf"), (1, "df")):
                dd = 1 - d if flip else d
                m, w = t.flows[f"{col}_mss"][i], t.flows[f"{col}_ws"][i]
                if np.isnan(mss[dd]) and not np.isnan(m):
                    mss[dd] = m
                if np.isnan(ws[dd]) and not np.isnan(w):
                    ws[dd] = w
            flows["end_reason"][f] = t.flows["end_reason"][i]
        if chain.get("idle"):
            flows["end_reason"][f] = EndReason.IDLE
        flows["uf_mss"][f], flows["df_mss"][f] = mss
        flows["uf_ws"][f], flows["df_ws"][f] = ws
        offsets[f + 1] = total
    packets = {name: (np.concatenate(parts) if parts else np.zeros(0, PACKET_FIELDS[name]))
               .astype(PACKET_FIELDS[name]) for name, parts in pk_parts.items()}
    i64 = np.int64
    ts = packets["pkt_ts_ns"].astype(i64)
    dirs = packets["pkt_dir"].astype(i64)
    iplen = packets["pkt_ip_len"].astype(i64)
    paylen = packets["pkt_payload_len"].astype(i64)
    if F:
        ci, ct = _fast.counters(offsets, dirs, ts, iplen, paylen)
        for j, name in enumerate(("bf_packets", "uf_packets", "df_packets", "bf_ip_bytes",
                                  "uf_ip_bytes", "df_ip_bytes", "bf_payload_bytes",
                                  "uf_payload_bytes", "df_payload_bytes")):
            flows[name] = ci[:, j].copy()
        for j, name in enumerate(("uf_first_ts_ns", "uf_last_ts_ns", "df_first_ts_ns",
                                  "df_last_ts_ns")):
            flows[name] = ct[:, j].copy()
        flows["last_ts_ns"] = np.maximum(ct[:, 1], ct[:, 3])
        flows["stats"] = _fast.features(ts, dirs, iplen, offsets)
    _tcp_end_reasons(flows, packets, offsets, [len(c["pieces"]) for c in chains])
    table = FlowTable(flows, packets, offsets)
    cut_s = np.array([c["cut_start"] for c in chains], dtype=bool)
    cut_e = np.array([c["cut_end"] for c in chains], dtype=bool)
    pieces = np.array([len(c["pieces"]) for c in chains], dtype=np.int32)
    return table, cut_s, cut_e, pieces


def _tcp_end_reasons(flows: dict[str, np.ndarray], packets: dict[str, np.ndarray],
                     offsets: np.ndarray, n_pieces: list[int]) -> None:
    """A joined TCP flow open at its last piece's end but closed by FIN both ways or RST
    across its pieces ended that way (each piece alone saw only part of the close)."""
    flags = packets["pkt_tcp_flags"]
    dirs = packets["pkt_dir"]
    for f, n in enumerate(n_pieces):
        if n < 2 or flows["proto"][f] != 6 or flows["end_reason"][f] != EndReason.EOF:
            continue
        fl = flags[offsets[f]:offsets[f + 1]]
        dr = dirs[offsets[f]:offsets[f + 1]]
        if (fl & RST).any():
            flows["end_reason"][f] = EndReason.RST
        elif ((fl & FIN) != 0)[dr == 0].any() and ((fl & FIN) != 0)[dr == 1].any():
            flows["end_reason"][f] = EndReason.FIN


def join_sequences(store: Store, sequences: Iterable[str], idle_timeout: float
                   ) -> tuple[int, int, list[str]]:
    """Refold the boundary pieces of the given sequences: (pieces, flows, files written)."""
    idle_ns = int(idle_timeout * 1e9)
    records = store.records()
    n_pieces = n_flows = 0
    written: list[str] = []
    for seq in sorted(set(sequences)):
        recs = sorted((r for r in records if r.sequence == seq),
                      key=lambda r: (r.first_ts_ns is None, r.first_ts_ns or 0, r.path))
        tables = [_load(store, r) for r in recs]
        chains = fold_sequence(recs, tables, idle_ns)
        n_pieces += sum(len(c["pieces"]) for c in chains)
        sid = sequence_id(seq)
        files = {}
        if chains:
            table, cut_s, cut_e, pieces = build_table(chains, tables)
            # a chain keeps the checksum of the file holding its first piece
            sha = [recs[c["pieces"][0][0]].sha256 for c in chains]
            arrow = flows_arrow(table, "", cut_s, cut_e, pieces)
            import pyarrow as pa

            arrow = arrow.set_column(arrow.schema.get_field_index("source_sha256"),
                                     "source_sha256", pa.array(sha, type=pa.string()))
            hours = table.flows["first_ts_ns"] // HOUR_NS
            for h in np.unique(hours).tolist():
                files[f"{partition_dir(h)}/bnd-{sid}.parquet"] = arrow.filter(hours == h)
            n_flows += len(table)
        store.replace_files(files, f"date=*/hour=*/bnd-{sid}.parquet")
        written.extend(files)
    return n_pieces, n_flows, written
