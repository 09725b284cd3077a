"""Joining flows cut by file rotation (see :mod:`analysis.campus.ingest`).

For each rotation sequence the pending pieces of all its files are folded in time
order: a piece that may continue an earlier flow is joined to the open flow of the
previous file with the same 5-tuple (either orientation) when the gap is at most
``idle_timeout``. Joined flows get their counters and MIRAGE statistics recomputed
from the pieces' packets, so they equal what one uninterrupted capture would give.
Pieces are kept in 8 buckets by a hash of their 5-tuple, so the buckets are folded
independently, in parallel workers. A bucket's result replaces that bucket's
``bnd-<seq>-bNN.parquet`` files in each partition (atomic renames; a flow's partition
is the hour of its first packet, which joining never changes; a flow lives in one
bucket only, so no flow is ever shown twice). Refolding from the pieces makes the step
idempotent and lets files arrive in any order.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from analysis import _fast
from analysis.flowtable import FIN, FLOW_FIELDS, PACKET_FIELDS, RST, EndReason, FlowTable

from .parquet_out import flat_name, flows_arrow, pending_table, write_atomic
from .store import STAGING, FileRecord, Store, partition_dir

HOUR_NS = 3_600_000_000_000
N_BUCKETS = 8


def sequence_id(sequence: str) -> str:
    return hashlib.sha256(sequence.encode()).hexdigest()[:16]


def _load(store: Store, rec: FileRecord, bucket: int):
    import pyarrow as pa

    if not rec.pending:
        return None
    path = store.root / rec.pending / f"b{bucket:02d}.arrow"
    if not path.is_file():
        return None
    with pa.memory_map(str(path)) as src:
        return pending_table(pa.ipc.open_file(src).read_all())


def _ukeys(fl: dict[str, np.ndarray]) -> tuple[list[bytes], list[bytes]]:
    """Direction-agnostic 5-tuple keys and the source endpoint of each piece, as bytes."""
    n = len(fl["proto"])
    a = np.zeros((n, 18), dtype=np.uint8)
    b = np.zeros((n, 18), dtype=np.uint8)
    a[:, :16], b[:, :16] = fl["src_addr"], fl["dst_addr"]
    a[:, 16:] = fl["src_port"].astype(">u2").view(np.uint8).reshape(n, 2)
    b[:, 16:] = fl["dst_port"].astype(">u2").view(np.uint8).reshape(n, 2)
    av, bv = a.view("S18").ravel(), b.view("S18").ravel()
    swap = av > bv
    key = np.zeros((n, 38), dtype=np.uint8)
    key[:, 0], key[:, 1] = fl["ip_version"], fl["proto"]
    key[:, 2:20] = np.where(swap[:, None], b, a)
    key[:, 20:38] = np.where(swap[:, None], a, b)
    return [bytes(k) for k in key], [bytes(x) for x in a]


def fold_sequence(records: list[FileRecord], tables: list, idle_ns: int):
    """Chains of (table index, flow index, flipped) and their cut flags, in time order.

    An open flow is carried forward while no file start lies more than ``idle_ns`` after
    its last packet, so a flow silent during a whole (short) file is still joined.
    """
    chains: list[dict] = []
    carry: dict[tuple, dict] = {}
    prev: FileRecord | None = None
    for k, (rec, loaded) in enumerate(zip(records, tables, strict=True)):
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
            keys, srcs = _ukeys(fl)
            first_ts = fl["first_ts_ns"].tolist()
            last_ts = fl["last_ts_ns"].tolist()
            cut_s, cut_e = cut_s.tolist(), cut_e.tolist()
            for i in np.argsort(fl["first_ts_ns"], kind="stable").tolist():
                key, a = keys[i], srcs[i]
                chain = None
                if cut_s[i]:
                    cand = carry.get(key)
                    if cand is not None and first_ts[i] - cand["last"] <= idle_ns:
                        chain = carry.pop(key)
                if chain is None:
                    ended = carry.pop(key) if key in carry else None
                    if ended is not None:  # a new flow on the 5-tuple: the open one is over
                        ended["cut_end"] = False
                        ended["idle"] = True
                    chain = {"pieces": [], "src": a, "last": 0,
                             "cut_start": cut_s[i] and not adjacent_prev}
                    chains.append(chain)
                chain["pieces"].append((k, i, a != chain["src"]))
                chain["last"] = max(chain["last"], last_ts[i])
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
    """One FlowTable of the joined chains, counters and statistics recomputed (vectorised)."""
    F = len(chains)
    present = [t[0] if t is not None else FlowTable.empty() for t in tables]
    base = np.zeros(len(present) + 1, dtype=np.int64)
    np.cumsum([len(t) for t in present], out=base[1:])
    allp = FlowTable.concat(present) if F else FlowTable.empty()
    n_pieces = np.fromiter((len(c["pieces"]) for c in chains), dtype=np.int64, count=F)
    flat = [p for c in chains for p in c["pieces"]]
    g = np.fromiter((base[k] + i for k, i, _ in flat), dtype=np.int64, count=len(flat))
    flip = np.fromiter((f for _, _, f in flat), dtype=bool, count=len(flat))
    pieces = allp.take(g)  # pieces in chain order, packets grouped by piece
    plen = np.diff(pieces.pkt_offsets)
    cstart = np.zeros(F, dtype=np.int64)  # index of each chain's first piece
    if F:
        np.cumsum(n_pieces[:-1], out=cstart[1:])
    clast = cstart + n_pieces - 1
    offsets = pieces.pkt_offsets[np.append(cstart, len(flat))].astype(np.int64)
    packets = dict(pieces.packets)
    pflip = np.repeat(flip, plen)
    packets["pkt_dir"] = np.where(pflip, 1 - packets["pkt_dir"], packets["pkt_dir"]).astype(
        PACKET_FIELDS["pkt_dir"])
    pf = pieces.flows
    flows: dict[str, np.ndarray] = {}
    for name, dt in FLOW_FIELDS.items():
        shape = (F, dt[1]) if isinstance(dt, tuple) else (F,)
        flows[name] = np.zeros(shape, dtype=dt[0] if isinstance(dt, tuple) else dt)
    for name in ("ip_version", "src_addr", "dst_addr", "src_port", "dst_port", "proto",
                 "first_ts_ns"):
        flows[name] = pf[name][cstart]
    flows["end_reason"] = pf["end_reason"][clast].copy()
    idle = np.fromiter((bool(c.get("idle")) for c in chains), dtype=bool, count=F)
    flows["end_reason"][idle] = EndReason.IDLE
    big = np.iinfo(np.int64).max
    pos = np.arange(len(flat), dtype=np.int64)
    for col in ("mss", "ws"):
        up = np.where(flip, pf[f"df_{col}"], pf[f"uf_{col}"])
        down = np.where(flip, pf[f"uf_{col}"], pf[f"df_{col}"])
        for name, v in ((f"uf_{col}", up), (f"df_{col}", down)):
            first = np.minimum.reduceat(np.where(np.isnan(v), big, pos), cstart) if F else pos
            flows[name] = np.where(first < big, v[np.minimum(first, max(len(v) - 1, 0))], np.nan)
    # one-piece chains keep what their worker computed; joined ones are recomputed
    kept = ("bf_packets", "uf_packets", "df_packets", "bf_ip_bytes", "uf_ip_bytes",
            "df_ip_bytes", "bf_payload_bytes", "uf_payload_bytes", "df_payload_bytes",
            "uf_first_ts_ns", "uf_last_ts_ns", "df_first_ts_ns", "df_last_ts_ns", "last_ts_ns",
            "stats")
    for name in kept:
        flows[name] = pf[name][cstart].copy()
    multi = np.flatnonzero(n_pieces > 1)
    if len(multi):
        starts = offsets[multi]
        lens = offsets[multi + 1] - starts
        sub = np.zeros(len(multi) + 1, dtype=np.int64)
        np.cumsum(lens, out=sub[1:])
        idx = np.repeat(starts - sub[:-1], lens) + np.arange(sub[-1], dtype=np.int64)
        i64 = np.int64
        ts = packets["pkt_ts_ns"][idx].astype(i64)
        dirs = packets["pkt_dir"][idx].astype(i64)
        iplen = packets["pkt_ip_len"][idx].astype(i64)
        paylen = packets["pkt_payload_len"][idx].astype(i64)
        ci, ct = _fast.counters(sub, dirs, ts, iplen, paylen)
        for j, name in enumerate(kept[:9]):
            flows[name][multi] = ci[:, j]
        for j, name in enumerate(kept[9:13]):
            flows[name][multi] = ct[:, j]
        flows["last_ts_ns"][multi] = np.maximum(ct[:, 1], ct[:, 3])
        flows["stats"][multi] = _fast.features(ts, dirs, iplen, sub)
        _tcp_end_reasons(flows, multi, packets["pkt_tcp_flags"][idx], dirs, sub)
    table = FlowTable(flows, packets, offsets)
    cut_s = np.fromiter((c["cut_start"] for c in chains), dtype=bool, count=F)
    cut_e = np.fromiter((c["cut_end"] for c in chains), dtype=bool, count=F)
    return table, cut_s, cut_e, n_pieces.astype(np.int32)


def _tcp_end_reasons(flows: dict[str, np.ndarray], multi: np.ndarray, flags: np.ndarray,
                     dirs: np.ndarray, offsets: np.ndarray) -> None:
    """A joined TCP flow open at its last piece's end but closed by FIN both ways or RST
    across its pieces ended that way (each piece alone saw only part of the close)."""
    starts = offsets[:-1]
    rst = np.add.reduceat((flags & RST) != 0, starts) > 0
    fin = (flags & FIN) != 0
    fin_up = np.add.reduceat(fin & (dirs == 0), starts) > 0
    fin_down = np.add.reduceat(fin & (dirs == 1), starts) > 0
    reason = flows["end_reason"][multi]
    open_ = (flows["proto"][multi] == 6) & (reason == EndReason.EOF)
    reason[open_ & rst] = EndReason.RST
    reason[open_ & ~rst & fin_up & fin_down] = EndReason.FIN
    flows["end_reason"][multi] = reason


def bucket_of(fl: dict[str, np.ndarray]) -> np.ndarray:
    """Join bucket (0..N_BUCKETS-1) of each piece: a hash of its direction-agnostic 5-tuple.

    Pieces of one flow always share a bucket, so buckets are joined independently (in
    parallel) and each bucket's output file replaces only its own earlier version.
    """
    n = len(fl["proto"])
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    keys, _ = _ukeys(fl)
    arr = np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(n, 38).astype(np.uint64)
    weights = (np.arange(1, 39, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15))
    h = (arr * weights).sum(axis=1, dtype=np.uint64)
    h ^= h >> np.uint64(29)
    return (h % np.uint64(N_BUCKETS)).astype(np.int64)


@dataclass(frozen=True)
class JoinTask:
    """One bucket of one rotation sequence (picklable, runs in a worker)."""

    store: str
    sequence: str
    records: tuple[FileRecord, ...]  # the sequence's files in time order
    bucket: int
    idle_ns: int


@dataclass
class JoinResult:
    task: JoinTask
    staged: str | None
    files: tuple[str, ...]  # relative paths of the bucket's new files
    pieces: int
    flows: int


def join_bucket(task: JoinTask) -> JoinResult:
    """Fold one bucket's pieces and stage its ``bnd-<seq>-bNN.parquet`` files."""
    import secrets

    store = Store(task.store, worker=True)
    recs = list(task.records)
    tables = [_load(store, r, task.bucket) for r in recs]
    chains = fold_sequence(recs, tables, task.idle_ns)
    if not chains:
        return JoinResult(task, None, (), 0, 0)
    sid = sequence_id(task.sequence)
    table, cut_s, cut_e, pieces = build_table(chains, tables)
    import pyarrow as pa

    # a chain keeps the checksum of the file holding its first piece
    sha = [recs[c["pieces"][0][0]].sha256 for c in chains]
    arrow = flows_arrow(table, "", cut_s, cut_e, pieces)
    arrow = arrow.set_column(arrow.schema.get_field_index("source_sha256"), "source_sha256",
                             pa.array(sha, type=pa.string()))
    staged = store.root / STAGING / f"join-{sid}-b{task.bucket:02d}-{secrets.token_hex(4)}"
    hours = table.flows["first_ts_ns"] // HOUR_NS
    files = []
    for h in np.unique(hours).tolist():
        rel = f"{partition_dir(h)}/{bnd_name(sid, task.bucket)}"
        write_atomic(arrow.filter(hours == h), staged / flat_name(rel))
        files.append(rel)
    return JoinResult(task, str(staged), tuple(files), int(pieces.sum()), len(table))


def bnd_name(sid: str, bucket: int) -> str:
    return f"bnd-{sid}-b{bucket:02d}.parquet"


def join_tasks(store: Store, sequences: Iterable[str], idle_timeout: float) -> list[JoinTask]:
    """Every (sequence, bucket) task of a join pass."""
    idle_ns = int(idle_timeout * 1e9)
    records = store.records()
    out: list[JoinTask] = []
    for seq in sorted(set(sequences)):
        recs = tuple(sorted((r for r in records if r.sequence == seq),
                            key=lambda r: (r.first_ts_ns is None, r.first_ts_ns or 0, r.path)))
        out.extend(JoinTask(str(store.root), seq, recs, b, idle_ns) for b in range(N_BUCKETS))
    return out


def commit_join(store: Store, res: JoinResult) -> list[str]:
    """Rename a bucket's staged files into place and drop its stale ones."""
    import shutil

    sid = sequence_id(res.task.sequence)
    name = bnd_name(sid, res.task.bucket)
    keep = set(res.files)
    for rel in res.files:
        dest = store.root / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(Path(res.staged) / flat_name(rel), dest)  # type: ignore[arg-type]
    for old in store.root.glob(f"date=*/hour=*/{name}"):
        if str(old.relative_to(store.root)) not in keep:
            old.unlink(missing_ok=True)
    if res.staged:
        shutil.rmtree(res.staged, ignore_errors=True)
    return list(res.files)


def _pending_bytes(store: Store, task: JoinTask) -> int:
    """Bytes of a join task's pending piece files (its expected work)."""
    total = 0
    for rec in task.records:
        if rec.pending:
            try:
                total += (store.root / rec.pending / f"b{task.bucket:02d}.arrow").stat().st_size
            except OSError:
                pass
    return total


def join_sequences(store: Store, sequences: Iterable[str], idle_timeout: float,
                   run: Callable[[Callable, list], Iterable] | None = None
                   ) -> tuple[int, int, list[str]]:
    """Refold the boundary pieces of the given sequences: (pieces, flows, files written).

    ``run(fn, tasks)`` yields ``fn(task)`` for each task, in any order (worker processes,
    a Dask cluster); by default the buckets are joined here, one after the other.
    """
    tasks = join_tasks(store, sequences, idle_timeout)
    tasks.sort(key=lambda t: -_pending_bytes(store, t))  # largest first: workers end together
    results = run(join_bucket, tasks) if run is not None else map(join_bucket, tasks)
    n_pieces = n_flows = 0
    written: list[str] = []
    for res in results:
        written.extend(commit_join(store, res))
        n_pieces += res.pieces
        n_flows += res.flows
    return n_pieces, n_flows, written
