"""flowtruth's Parquet bi-flow format: round trip, schema version, zero-copy, failures."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from analysis.errors import BadInputError, OutputError, ParseError, SchemaError
from analysis.flowtable import (
    DIRECTIONS,
    FLOW_FIELDS,
    METRICS,
    PACKET_FIELDS,
    STAT_NAMES,
    SYN,
    FlowTable,
    stat_column,
)
from analysis.parquet_io import (
    SCHEMA_VERSION,
    read_metadata,
    read_parquet,
    stat_column_names,
    to_arrow,
    write_parquet,
)
from tests.factories import make_flowtable


def table_with_payloads() -> FlowTable:
    return make_flowtable([
        {"packets": [{"ts": 0.0, "flags": SYN}, {"ts": 0.02, "dir": 1, "flags": SYN | 0x10},
                     {"ts": 0.03, "payload": b"\x16\x03\x01hello"}],
         "labels": {"BF_label": "org.thoughtcrime.securesms", "BF_labeling_type": "exact"},
         "mss": (1460.0, 1400.0)},
        {"proto": 17, "dst_port": 443, "src_ip": "fd00::5", "dst_ip": "2001:db8::1",
         "packets": [{"ts": 0.0, "payload": b"\x00" * 30}, {"ts": 0.5, "dir": 1, "payload": b""}]},
        {"packets": [{"ts": 0.0}], "labels": {"BF_activity": "chat"}},
    ])


def test_round_trip_keeps_every_value(tmp_path: Path) -> None:
    table = table_with_payloads()
    path = write_parquet(table, tmp_path / "flows.parquet", extra_metadata={"run": "r1"})
    df = read_parquet(path)
    assert len(df) == 3
    assert df["src_ip"].tolist() == ["192.168.20.105", "fd00::5", "192.168.20.105"]
    assert df["dst_ip"].tolist() == ["203.0.113.7", "2001:db8::1", "203.0.113.7"]
    assert df["src_port"].tolist() == [40000, 40001, 40002]
    assert df["proto"].tolist() == [6, 17, 6] and df["ip_version"].tolist() == [4, 6, 4]
    for name, dt in FLOW_FIELDS.items():
        if name in ("src_addr", "dst_addr", "stats") or name in ("src_port", "dst_port",
                                                                  "proto", "ip_version"):
            continue
        np.testing.assert_array_equal(df[name].to_numpy(), table.flows[name], err_msg=name)
        assert df[name].dtype == np.dtype(dt), name
    assert math.isnan(df["df_mss"][1]) and df["uf_mss"][0] == 1460.0
    for m in METRICS:
        for d in DIRECTIONS:
            for s in STAT_NAMES:
                np.testing.assert_array_equal(df[f"{m}_{d}_{s}"].to_numpy(),
                                              table.flows["stats"][:, stat_column(m, d, s)])
    for name, dt in PACKET_FIELDS.items():
        for i in range(len(table)):
            got = df[name][i]
            want = table.packets[name][table.packet_slice(i)]
            np.testing.assert_array_equal(got, want)
            assert got.dtype == np.dtype(dt)
    assert df["pkt_payload"][0].tolist() == [b"", b"", b"\x16\x03\x01hello"]
    assert df["pkt_payload"][1].tolist() == [b"\x00" * 30, b""]
    # Unlabelled is missing (None or NaN, as the pandas version maps arrow nulls).
    assert df["BF_label"][0] == "org.thoughtcrime.securesms"
    assert df["BF_label"].isna().tolist() == [False, True, True]
    assert df["BF_activity"].isna().tolist() == [True, True, False]
    meta = read_metadata(path)
    assert meta["schema_version"] == SCHEMA_VERSION == "1"
    assert meta["run"] == "r1" and meta["source"] == "factory"
    assert json.loads(meta["capture_stats"])["packets"] == 6


def test_stat_columns_are_named_and_ordered_like_the_matrix() -> None:
    names = stat_column_names()
    assert len(names) == 102
    assert names[0] == "packet_length_biflow_min"
    assert names[stat_column("iat", "upstream_flow", "10_percentile")] == (
        "iat_upstream_flow_10_percentile")
    assert names[-1] == "iat_downstream_flow_90_percentile"


def test_packet_lists_share_the_table_memory() -> None:
    table = make_flowtable([{"packets": [{}] * 5}, {"packets": [{}] * 3}])
    arrow = to_arrow(table)
    col = arrow.column("pkt_ip_len").chunk(0)
    assert isinstance(col, pa.ListArray)
    assert col.offsets.to_pylist() == [0, 5, 8]
    values = col.values.buffers()[1]
    assert values.address == table.packets["pkt_ip_len"].ctypes.data  # zero-copy
    assert arrow.column("pkt_ts_ns").type == pa.list_(pa.int64())


def test_empty_table(tmp_path: Path) -> None:
    path = write_parquet(FlowTable.empty(), tmp_path / "empty.parquet")
    df = read_parquet(path)
    assert len(df) == 0 and "packet_length_biflow_min" in df.columns


def test_directory_of_files_is_concatenated(tmp_path: Path) -> None:
    write_parquet(make_flowtable([{"packets": [{}]}]), tmp_path / "a.parquet")
    write_parquet(make_flowtable([{"packets": [{}, {}]}] * 2), tmp_path / "b.parquet")
    df = read_parquet(tmp_path)
    assert df["bf_packets"].tolist() == [1, 2, 2]


def test_unknown_or_missing_schema_version(tmp_path: Path) -> None:
    arrow = to_arrow(make_flowtable([{"packets": [{}]}]))
    future = tmp_path / "future.parquet"
    pq.write_table(arrow.replace_schema_metadata({"schema_version": "99"}), future)
    with pytest.raises(SchemaError, match="unknown schema_version '99'"):
        read_parquet(future)
    foreign = tmp_path / "foreign.parquet"
    pq.write_table(pa.table({"x": [1, 2]}), foreign)
    with pytest.raises(SchemaError, match="no schema_version"):
        read_parquet(foreign)
    with pytest.raises(BadInputError):
        write_parquet(make_flowtable([{}]), tmp_path / "x.parquet",
                      extra_metadata={"schema_version": "2"})


def test_damaged_and_missing_files(tmp_path: Path) -> None:
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(ParseError, match="junk.parquet"):
        read_parquet(junk)
    with pytest.raises(BadInputError):
        read_parquet(tmp_path / "missing.parquet")
    empty = tmp_path / "none"
    empty.mkdir()
    with pytest.raises(BadInputError, match="no .parquet"):
        read_parquet(empty)


def test_write_failure_is_output_error_and_atomic(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="file/sub/flows.parquet"):
        write_parquet(make_flowtable([{}]), blocker / "sub" / "flows.parquet")
    # Overwriting keeps the old file until the new one is complete.
    target = tmp_path / "flows.parquet"
    write_parquet(make_flowtable([{}]), target)
    write_parquet(make_flowtable([{}, {}]), target)
    assert len(read_parquet(target)) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "flows.parquet"]
    assert target.stat().st_mode & 0o044 == 0o044 & ~_umask()  # readable like open() makes it


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_chunks_stream_into_one_file(tmp_path: Path) -> None:
    # How the pipeline writes a long capture: one row group per chunk, totals at the end.
    a = make_flowtable([{"packets": [{}], "labels": {"BF_label": "com.whatsapp"}}])
    b = make_flowtable([{"packets": [{}, {}], "labels": {"BF_label": None}}])
    path = tmp_path / "stream.parquet"
    first = to_arrow(a)
    second = to_arrow(b)
    assert second.schema.equals(first.schema, check_metadata=False)
    with pq.ParquetWriter(path, first.schema) as writer:
        writer.write_table(first)
        writer.write_table(second)
        writer.add_key_value_metadata({"capture_stats": json.dumps({"packets": 3})})
    df = read_parquet(path)
    assert df["bf_packets"].tolist() == [1, 2]
    assert json.loads(read_metadata(path)["capture_stats"]) == {"packets": 3}
    assert "ARROW:schema" not in read_metadata(path)


def test_real_capture_round_trip(tmp_path: Path) -> None:
    pcap = Path(__file__).resolve().parents[2] / "shared" / "data" / "ndpi_pcaps" / "signal.pcap"
    if not pcap.is_file():
        pytest.skip(f"{pcap} not present")
    try:
        from analysis.assemble import FlowOptions, read_flows
    except Exception as err:  # the pcap reader is another part of the project
        pytest.skip(f"pcap reader not available: {err}")
    table = read_flows(pcap, FlowOptions(payload=True))
    df = read_parquet(write_parquet(table, tmp_path / "signal.parquet"))
    assert len(df) == len(table) > 0
    assert int(df["pkt_ip_len"].map(len).sum()) == table.n_packets
    np.testing.assert_array_equal(np.concatenate(df["pkt_ts_ns"].tolist()),
                                  table.packets["pkt_ts_ns"])
    np.testing.assert_array_equal(df[stat_column_names()].to_numpy(), table.flows["stats"])
    assert b"".join(b"".join(p) for p in df["pkt_payload"]) == table.payload
    src, dst = table.ip_strings()
    assert df["src_ip"].tolist() == src and df["dst_ip"].tolist() == dst
    assert json.loads(read_metadata(tmp_path / "signal.parquet")["capture_stats"])["packets"] > 0
