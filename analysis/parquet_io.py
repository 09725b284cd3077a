"""flowtruth's own Parquet bi-flow format (schema_version "1").

One row per bi-flow. Columns, in order:

* key: ``src_ip``, ``src_port``, ``dst_ip``, ``dst_port``, ``proto``, ``ip_version``
  (the source is the device side);
* times and counters: every scalar field of ``FLOW_FIELDS`` under its own name
  (``first_ts_ns``, ``end_reason`` (see ``EndReason``), ``bf_packets`` ...
  ``df_ws``; MSS/WS NaN when absent);
* the 102 MIRAGE statistics as ``<metric>_<direction>_<stat>``, e.g.
  ``packet_length_biflow_min``, ``iat_upstream_flow_10_percentile`` (see
  :func:`stat_column_names`);
* packet series as list columns named like ``PACKET_FIELDS`` (``pkt_ts_ns``,
  ``pkt_dir``, ``pkt_ip_len`` ...), plus ``pkt_payload`` (list of binary) when the
  table kept payloads;
* labels: one string column per label of the table (``BF_label``, ``BF_labeling_type``,
  ...), null where not labelled.

Key-value metadata: ``schema_version`` (``"1"``), ``source``, ``capture_stats`` (JSON)
and any ``extra_metadata`` given by the caller.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from analysis.atomic import atomic_output
from analysis.errors import BadInputError, ParseError, SchemaError, short
from analysis.flowtable import (
    DIRECTIONS,
    FLOW_FIELDS,
    METRICS,
    PACKET_FIELDS,
    STAT_NAMES,
    FlowTable,
)

SCHEMA_VERSION = "1"
SUPPORTED_VERSIONS = ("1",)
KEY_COLUMNS = ("src_ip", "src_port", "dst_ip", "dst_port", "proto", "ip_version")
_SKIP_FLOW = {"src_addr", "dst_addr", "stats", *KEY_COLUMNS}


def stat_column_names() -> list[str]:
    """Names of the 102 statistic columns, in :attr:`FlowTable.stats` column order."""
    return [f"{m}_{d}_{s}" for m in METRICS for d in DIRECTIONS for s in STAT_NAMES]


def _np(values: np.ndarray) -> Any:
    """A zero-copy Arrow array over a numeric numpy array.

    ``pa.array`` would do, but it imports pandas (0.2 s, 50 MB) to check its argument;
    ``flowtruth flows`` never needs pandas.
    """
    import pyarrow as pa

    values = np.ascontiguousarray(values)
    return pa.Array.from_buffers(pa.from_numpy_dtype(values.dtype), len(values),
                                 [None, pa.py_buffer(values)])


def _strings(values: list[Any]) -> Any:
    """An Arrow string array (None -> null) built from buffers, without pandas."""
    import pyarrow as pa

    valid = np.array([v is not None for v in values], dtype=bool)
    data = [b"" if v is None else str(v).encode() for v in values]
    offsets = np.zeros(len(data) + 1, dtype=np.int64)
    np.cumsum([len(d) for d in data], out=offsets[1:])
    bitmap = None if valid.all() else pa.py_buffer(np.packbits(valid, bitorder="little"))
    return pa.Array.from_buffers(pa.large_string(), len(data),
                                 [bitmap, pa.py_buffer(offsets), pa.py_buffer(b"".join(data))],
                                 null_count=int((~valid).sum())).cast(pa.string())


def _list_column(values: np.ndarray, offsets: np.ndarray) -> Any:
    return _list_column_arrow(_np(values), offsets)


def _payload_column(table: FlowTable, offsets: np.ndarray) -> Any:
    import pyarrow as pa

    assert table.payload is not None and table.payload_offsets is not None
    n = len(table.payload_offsets) - 1
    binary = pa.Array.from_buffers(
        pa.large_binary(), n,
        [None, pa.py_buffer(table.payload_offsets.astype(np.int64)),
         pa.py_buffer(table.payload)])
    return _list_column_arrow(binary, offsets)


def _list_column_arrow(child: Any, offsets: np.ndarray) -> Any:
    import pyarrow as pa

    # Zero-copy: the flat packet column is the child array and the flow offsets are the
    # list offsets (64-bit ones only when a table outgrows 2**31 packets).
    if offsets[-1] < 2**31:
        return pa.ListArray.from_arrays(_np(offsets.astype(np.int32)), child)
    return pa.LargeListArray.from_arrays(_np(offsets.astype(np.int64)), child)


def to_arrow(table: FlowTable, extra_metadata: dict[str, str] | None = None) -> Any:
    """The table as a ``pyarrow.Table`` in schema_version 1 (see the module docstring).

    ``capture_stats`` is left to the writer: a chunk of a streamed capture does not know
    the totals, so a streaming writer adds them when it closes the file.
    """
    import pyarrow as pa

    src, dst = table.ip_strings()
    fl = table.flows
    cols: dict[str, Any] = {
        "src_ip": _strings(src),
        "src_port": _np(fl["src_port"]),
        "dst_ip": _strings(dst),
        "dst_port": _np(fl["dst_port"]),
        "proto": _np(fl["proto"]),
        "ip_version": _np(fl["ip_version"]),
    }
    for name in FLOW_FIELDS:
        if name not in _SKIP_FLOW:
            cols[name] = _np(fl[name])
    stats = np.asarray(fl["stats"], dtype=np.float64)
    for j, name in enumerate(stat_column_names()):
        cols[name] = _np(stats[:, j])
    offsets = np.asarray(table.pkt_offsets, dtype=np.int64)
    for name in PACKET_FIELDS:
        cols[name] = _list_column(np.ascontiguousarray(table.packets[name]), offsets)
    if table.payload is not None and table.payload_offsets is not None:
        cols["pkt_payload"] = _payload_column(table, offsets)
    for name, col in table.labels.items():
        if name in cols:
            raise SchemaError(f"label {name!r} clashes with a flow column")
        cols[name] = _strings(col.tolist())
    meta = {"schema_version": SCHEMA_VERSION, "source": table.source or ""}
    for k, v in (extra_metadata or {}).items():
        if k == "schema_version":
            raise BadInputError("extra_metadata cannot override schema_version")
        meta[str(k)] = str(v)
    return pa.Table.from_arrays(list(cols.values()), names=list(cols),
                                metadata=meta)


def write_parquet(table: FlowTable, path: str | os.PathLike[str],
                  extra_metadata: dict[str, str] | None = None) -> Path:
    """Write the table as one Parquet file (one row per bi-flow), atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    arrow = to_arrow(table, extra_metadata)
    meta = dict(arrow.schema.metadata or {})
    meta[b"capture_stats"] = json.dumps(dataclasses.asdict(table.capture)).encode()
    arrow = arrow.replace_schema_metadata(meta)
    # Dictionary-encode only the strings (IPs, labels): on numeric and list columns
    # it doubles the write time for a few per cent of size.
    # Min/max statistics of the packet lists are of no use to a reader and cost time.
    strings = [f.name for f in arrow.schema if f.type == pa.string()]
    scalars = [f.name for f in arrow.schema if not pa.types.is_list(f.type)
               and not pa.types.is_large_list(f.type)]
    with atomic_output(path) as tmp:
        pq.write_table(arrow, tmp, use_dictionary=strings, write_statistics=scalars)
    return path


MAX_COLUMNS = 1024
"""Most columns a Parquet input may declare (a flowtruth file has about 150)."""
MAX_COLUMN_NAME = 128
"""Longest column name a Parquet input may declare."""
MAX_METADATA_BYTES = 16 << 20
"""Largest key-value metadata (all keys and values together) of a Parquet input."""
MIN_BYTES_PER_ROW = 1
"""A Parquet input declaring more rows than it has bytes is refused before it is read:
a real flow row (distinct times, ports and counters) never compresses below a byte."""


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return short(text[0] if text else type(err).__name__, 300)


def check_parquet(path: str | os.PathLike[str]) -> Any:
    """The footer (``pyarrow.parquet.FileMetaData``) of a Parquet input, checked for
    plausibility before any data is read: column count and names, declared rows against
    the file size, metadata size. Raises :class:`ParseError` or :class:`SchemaError`."""
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"no such file: {short(path)}")
    try:
        size = path.stat().st_size
        md = pq.read_metadata(path)
    except Exception as err:  # pyarrow raises ArrowInvalid, OSError, ... on damaged footers
        raise ParseError(path, None, f"not a Parquet file ({_first_line(err)})") from None
    if md.num_columns > MAX_COLUMNS:
        raise SchemaError(f"{short(path)}: {md.num_columns} columns, more than {MAX_COLUMNS} "
                          "(not a flowtruth Parquet file)")
    for i in range(md.num_columns):
        name = md.schema.column(i).path
        if len(name) > MAX_COLUMN_NAME:
            raise SchemaError(f"{short(path)}: column name {short(name, 80)} is longer than "
                              f"{MAX_COLUMN_NAME} characters (not a flowtruth Parquet file)")
    if md.num_rows < 0 or md.num_rows * MIN_BYTES_PER_ROW > size:
        raise ParseError(path, None, f"declares {md.num_rows:,} rows in {size:,} bytes "
                         "(damaged or hostile; refused before reading)")
    raw = md.metadata or {}
    if sum(len(k) + len(v) for k, v in raw.items()) > MAX_METADATA_BYTES:
        raise SchemaError(f"{short(path)}: key-value metadata larger than "
                          f"{MAX_METADATA_BYTES >> 20} MB")
    return md


def read_table(path: str | os.PathLike[str], columns: list[str] | None = None) -> Any:
    """A checked Parquet input read into a pyarrow Table; any failure is one ParseError."""
    import pyarrow.parquet as pq

    check_parquet(path)
    try:
        return pq.read_table(path, columns=columns)
    except MemoryError:
        raise ParseError(path, None, "too large to read into memory") from None
    except Exception as err:  # damaged pages: ArrowInvalid, OSError, ArrowNotImplementedError
        raise ParseError(path, None, f"cannot read Parquet data ({_first_line(err)})") from None


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The key-value metadata of a flowtruth Parquet file, schema version checked (and
    the footer checked by :func:`check_parquet`)."""
    path = Path(path)
    # The file's key-value metadata, not the embedded Arrow schema's: streaming
    # writers add entries (capture_stats) only when they close the file.
    raw = check_parquet(path).metadata or {}
    meta = {k.decode("utf-8", "replace"): v.decode("utf-8", "replace") for k, v in raw.items()
            if k != b"ARROW:schema"}
    version = meta.get("schema_version")
    if version is None:
        raise SchemaError(f"{short(path)}: not a flowtruth Parquet file (no schema_version)")
    if version not in SUPPORTED_VERSIONS:
        raise SchemaError(f"{short(path)}: unknown schema_version {short(repr(version), 40)}",
                          hint=f"this flowtruth reads {', '.join(SUPPORTED_VERSIONS)}")
    return meta


def read_parquet(path: str | os.PathLike[str]) -> Any:
    """Read a flowtruth Parquet file (or a directory of them) into a pandas DataFrame.

    The schema version of every file is checked first; list columns hold numpy arrays.
    """
    import pandas as pd

    p = Path(path)
    files = sorted(p.glob("*.parquet")) if p.is_dir() else [p]
    if not files:
        raise BadInputError(f"no .parquet files in {p}")
    frames = []
    for f in files:
        read_metadata(f)
        tbl = read_table(f)
        try:
            frames.append(tbl.to_pandas())
        except Exception as err:  # an Arrow type pandas cannot hold
            raise ParseError(f, None, f"cannot convert Parquet data ({_first_line(err)})") from None
    return frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True)
