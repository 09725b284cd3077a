"""Arrow tables of the campus store: finished flows (no packets) and boundary pieces.

Finished flows keep the flow key, scalar fields and MIRAGE statistics; packet series are
dropped (the store holds headers of a whole campus). Boundary pieces, the flows that may
continue in the previous or next rotated file, keep their packet series (times,
directions, lengths, flags; never payload) so that the join can recompute their
statistics exactly.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path
from typing import Any

import numpy as np

from analysis.errors import OutputError
from analysis.flowtable import FLOW_FIELDS, PACKET_FIELDS, FlowTable
from analysis.parquet_io import stat_column_names

SCALAR_FIELDS = [k for k, v in FLOW_FIELDS.items() if not isinstance(v, tuple)
                 and k not in ("ip_version", "src_port", "dst_port", "proto")]
# what joining needs of a piece's packets (statistics, counters, TCP close)
PENDING_PACKET_FIELDS = ("pkt_ts_ns", "pkt_dir", "pkt_ip_len", "pkt_payload_len", "pkt_tcp_flags")
WRITE_OPTIONS = {"compression": "lz4", "use_dictionary": ["src_ip", "dst_ip", "source_sha256"],
                 "write_statistics": ["first_ts_ns", "last_ts_ns", "flow_id"]}


def flow_ids(table: FlowTable) -> list[str]:
    """Stable 64-bit hex ids of flows: a hash of the (anonymised) key and first packet time."""
    n = len(table)
    if n == 0:
        return []
    fl = table.flows
    rec = np.zeros((n, 46), dtype=np.uint8)
    rec[:, 0] = fl["ip_version"]
    rec[:, 1:17] = fl["src_addr"]
    rec[:, 17:33] = fl["dst_addr"]
    rec[:, 33:35] = fl["src_port"].astype(">u2").view(np.uint8).reshape(n, 2)
    rec[:, 35:37] = fl["dst_port"].astype(">u2").view(np.uint8).reshape(n, 2)
    rec[:, 37] = fl["proto"]
    rec[:, 38:46] = fl["first_ts_ns"].astype(">i8").view(np.uint8).reshape(n, 8)
    blake = hashlib.blake2b
    return [blake(r, digest_size=8).hexdigest() for r in map(bytes, rec)]


def _repeated(text: str, n: int) -> Any:
    """A string column of ``n`` copies of ``text``, built from buffers (no Python list)."""
    import pyarrow as pa

    raw = text.encode()
    if n * len(raw) >= 2**31 - 1:
        return pa.array([text] * n, type=pa.string())
    offsets = np.arange(n + 1, dtype=np.int32) * len(raw)
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(raw * n))


def flows_arrow(table: FlowTable, source_sha256: str, cut_at_start: np.ndarray,
                cut_at_end: np.ndarray, pieces: np.ndarray | None = None) -> Any:
    """Store rows of a (anonymised) FlowTable."""
    import pyarrow as pa

    n = len(table)
    src, dst = table.ip_strings()
    fl = table.flows
    cols: dict[str, Any] = {
        "flow_id": pa.array(flow_ids(table), type=pa.string()),
        "src_ip": pa.array(src, type=pa.string()),
        "src_port": pa.array(fl["src_port"]),
        "dst_ip": pa.array(dst, type=pa.string()),
        "dst_port": pa.array(fl["dst_port"]),
        "proto": pa.array(fl["proto"]),
        "ip_version": pa.array(fl["ip_version"]),
    }
    for name in SCALAR_FIELDS:
        cols[name] = pa.array(fl[name])
    stats_t = np.ascontiguousarray(np.asarray(fl["stats"], dtype=np.float64).T)  # one copy
    for j, name in enumerate(stat_column_names()):
        cols[name] = pa.array(stats_t[j])
    cols["source_sha256"] = _repeated(source_sha256, n)
    cols["cut_at_start"] = pa.array(np.asarray(cut_at_start, dtype=bool))
    cols["cut_at_end"] = pa.array(np.asarray(cut_at_end, dtype=bool))
    cols["pieces"] = pa.array(np.ones(n, dtype=np.int32) if pieces is None
                              else np.asarray(pieces, dtype=np.int32))
    return pa.table(cols)


def pending_arrow(table: FlowTable, source_sha256: str, cut_at_start: np.ndarray,
                  cut_at_end: np.ndarray) -> Any:
    """Boundary pieces with raw (anonymised) addresses and packet series."""
    import pyarrow as pa

    fl = table.flows
    cols: dict[str, Any] = {}
    for name, dt in FLOW_FIELDS.items():
        if name == "stats":
            stats = np.ascontiguousarray(fl[name], dtype=np.float64)
            cols[name] = pa.FixedSizeListArray.from_arrays(pa.array(stats.ravel()),
                                                           stats.shape[1])
        elif isinstance(dt, tuple):
            cols[name] = pa.FixedSizeBinaryArray.from_buffers(
                pa.binary(16), len(table), [None, pa.py_buffer(np.ascontiguousarray(fl[name]))])
        else:
            cols[name] = pa.array(fl[name])
    offsets = pa.array(np.asarray(table.pkt_offsets, dtype=np.int64))
    for name in PENDING_PACKET_FIELDS:
        cols[name] = pa.LargeListArray.from_arrays(offsets, pa.array(table.packets[name]))
    cols["source_sha256"] = _repeated(source_sha256, len(table))
    cols["cut_at_start"] = pa.array(np.asarray(cut_at_start, dtype=bool))
    cols["cut_at_end"] = pa.array(np.asarray(cut_at_end, dtype=bool))
    return pa.table(cols)


def pending_table(arrow: Any) -> tuple[FlowTable, np.ndarray, np.ndarray]:
    """A FlowTable (packets: only what joining needs) and the cut flags from :func:`pending_arrow`."""
    arrow = arrow.combine_chunks()
    n = arrow.num_rows
    flows: dict[str, np.ndarray] = {}
    for name, dt in FLOW_FIELDS.items():
        if name == "stats":
            flows[name] = np.zeros((0, dt[1]))
            if n:
                col: Any = arrow.column(name).chunk(0)
                vals = col.values.to_numpy()[col.offset * dt[1]:(col.offset + n) * dt[1]]
                flows[name] = vals.reshape(n, dt[1]).copy()
        elif isinstance(dt, tuple):
            flows[name] = np.zeros((0, 16), dtype=np.uint8)
            if n:
                col = arrow.column(name).chunk(0)
                buf = np.frombuffer(col.buffers()[1], dtype=np.uint8)
                flows[name] = buf[col.offset * 16:(col.offset + n) * 16].reshape(n, 16).copy()
        else:
            flows[name] = arrow.column(name).to_numpy().astype(dt, copy=True)
    packets = {}
    offsets = np.zeros(n + 1, dtype=np.int64)
    for k, name in enumerate(PENDING_PACKET_FIELDS):
        col = arrow.column(name)
        arr = col.chunk(0) if col.num_chunks else None
        if arr is None or n == 0:
            packets[name] = np.zeros(0, dtype=PACKET_FIELDS[name])
            continue
        offs = arr.offsets.to_numpy().astype(np.int64)
        packets[name] = arr.values.to_numpy().astype(PACKET_FIELDS[name])[offs[0]:offs[-1]]
        if k == 0:
            offsets = offs - offs[0]
    for name, dt in PACKET_FIELDS.items():  # not needed to join: zeros
        if name not in packets:
            packets[name] = np.zeros(int(offsets[-1]), dtype=dt)
    table = FlowTable(flows, packets, offsets)
    return (table, arrow.column("cut_at_start").to_numpy(zero_copy_only=False).astype(bool),
            arrow.column("cut_at_end").to_numpy(zero_copy_only=False).astype(bool))


def write_atomic(arrow: Any, path: str | os.PathLike[str]) -> Path:
    """One Parquet file appearing by rename (temp file in the same directory)."""
    import pyarrow.parquet as pq

    path = Path(path)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(arrow, tmp, **_options(arrow))
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write {path}: {err.strerror or err}") from err
    return path


def _options(arrow: Any) -> dict[str, Any]:
    names = set(arrow.schema.names)
    return {"compression": "lz4",
            "use_dictionary": [c for c in WRITE_OPTIONS["use_dictionary"] if c in names],
            "write_statistics": [c for c in WRITE_OPTIONS["write_statistics"] if c in names]}


def flat_name(rel: str) -> str:
    """A staged file's name: its store path with ``/`` as ``~`` (one flat staging dir)."""
    return rel.replace("/", "~")


class PartWriter:
    """Streams row groups into one Parquet file per partition (rename happens at commit)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.writers: dict[str, Any] = {}
        self.rows: dict[str, int] = {}

    def write(self, rel: str, arrow: Any) -> None:
        import pyarrow.parquet as pq

        w = self.writers.get(rel)
        if w is None:
            path = self.root / flat_name(rel)
            path.parent.mkdir(parents=True, exist_ok=True)
            if rel.endswith(".arrow"):  # scratch data read back once: Arrow IPC, no encoding
                import pyarrow as pa

                w = pa.ipc.new_file(str(path), arrow.schema)
            else:
                w = pq.ParquetWriter(path, arrow.schema, **_options(arrow))
            self.writers[rel] = w
            self.rows[rel] = 0
        w.write_table(arrow)
        self.rows[rel] += arrow.num_rows

    def close(self) -> dict[str, int]:
        for w in self.writers.values():
            w.close()
        self.writers.clear()
        return dict(self.rows)

    def abort(self) -> None:
        for w in self.writers.values():
            try:
                w.close()
            except Exception:  # noqa: BLE001 - best effort on the way out
                pass
        self.writers.clear()
