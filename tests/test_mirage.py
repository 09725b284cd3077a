"""MIRAGE JSON export and import: structure, serialisation, duplicates, round trips,
golden files and tcbench's real loader."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from analysis.errors import AnalysisError, BadInputError, OutputError, ParseError, SchemaError
from analysis.flowtable import ACK, FIN, PSH, STAT_NAMES, SYN
from analysis.mirage import (
    FLOW_METADATA_2019,
    FLOW_METADATA_2022,
    PACKET_DATA_2019,
    PACKET_DATA_2022,
    dataframe_to_mirage,
    device_folder,
    mirage_file_name,
    read_mirage,
    to_mirage,
    to_mirage_parts,
    write_mirage,
    write_mirage_dir,
)
from tests.factories import make_flowtable

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
MIRAGE_SAMPLE = sorted((DATA / "mirage2019").glob("*.json"))
GOLDEN = Path(__file__).resolve().parent / "golden"
needs_sample = pytest.mark.skipif(not MIRAGE_SAMPLE, reason="no MIRAGE sample in shared/data")
KEY_RE = re.compile(r"^\d+\.\d+\.\d+\.\d+,\d+,[^,]+,\d+,(6|17)$")

TELEGRAM = "org.telegram.messenger"


def handshake_flow(n_data: int = 4, label: str | None = TELEGRAM, **extra: Any) -> dict:
    pkts = [{"ts": 0.0, "flags": SYN, "win": 65535, "l4_hdr_len": 40},
            {"ts": 0.05, "dir": 1, "flags": SYN | ACK, "win": 65160, "l4_hdr_len": 40},
            {"ts": 0.051, "flags": ACK, "win": 502}]
    for i in range(n_data):
        pkts.append({"ts": 0.06 + 0.01 * i, "dir": i % 2, "flags": PSH | ACK, "win": 502,
                     "payload": bytes([0x16, 0x03, 0x01]) + b"x" * (10 + i)})
    pkts.append({"ts": 0.2 + 0.01 * n_data, "flags": FIN | ACK, "win": 502})
    flow: dict[str, Any] = {"packets": pkts, "mss": (1460.0, 1400.0), "ws": (7.0, 9.0)}
    if label:
        flow["labels"] = {"BF_label": label, "BF_labeling_type": "exact",
                          "BF_label_source": "strace"}
    flow.update(extra)
    return flow


def sample_table():
    return make_flowtable([
        handshake_flow(),
        handshake_flow(40, src_port=40001, dst_ip="149.154.167.51"),  # longer than 32 packets
        {"proto": 17, "dst_port": 53, "dst_ip": "192.168.20.1", "src_port": 53001,
         "packets": [{"ts": 0.0, "payload_len": 30}, {"ts": 0.004, "dir": 1, "payload_len": 90}]},
        {"src_port": 40002, "packets": [{"ts": 0.0, "flags": SYN}, {"ts": 1.0, "flags": SYN}]},
    ])


def _flat_keys(rec: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in rec.items():
        name = f"{prefix}_{k}" if prefix else k
        out.extend(_flat_keys(v, name) if isinstance(v, dict) else [name])
    return out


def nan_equal(a: Any, b: Any) -> bool:
    """Deep equality where NaN equals NaN and 0 (int) differs from 0.0 (float)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(nan_equal(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(nan_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    return a == b


# ---------------------------------------------------------------------------- structure


def test_2019_record_structure_and_orders() -> None:
    obj = to_mirage(sample_table())
    assert len(obj) == 4
    for key, rec in obj.items():
        assert KEY_RE.match(key), key
        assert list(rec) == ["packet_data", "flow_features", "flow_metadata"]
        assert tuple(rec["packet_data"]) == PACKET_DATA_2019
        assert tuple(rec["flow_metadata"]) == FLOW_METADATA_2019
        assert list(rec["flow_features"]) == ["packet_length", "iat"]
        for metric in rec["flow_features"].values():
            assert list(metric) == ["biflow", "upstream_flow", "downstream_flow"]
            for stats in metric.values():
                assert tuple(stats) == STAT_NAMES
                assert all(type(v) is float for v in stats.values())
        pd_ = rec["packet_data"]
        n = len(pd_["packet_dir"])
        assert all(len(v) == n for v in pd_.values())
        assert n == min(32, rec["flow_metadata"]["BF_num_packets"])
        assert pd_["iat"][0] == 0 and type(pd_["iat"][0]) is int
        assert all(type(v) is float for v in pd_["iat"][1:])
        key_sport = int(key.split(",")[1])
        for d, sp in zip(pd_["packet_dir"], pd_["src_port"], strict=True):
            assert (d == 0) == (sp == key_sport)
        meta = rec["flow_metadata"]
        assert meta["UF_num_packets"] + meta["DF_num_packets"] == meta["BF_num_packets"]


@needs_sample
def test_2019_flattened_keys_equal_the_real_sample() -> None:
    real = json.loads(MIRAGE_SAMPLE[0].read_text())
    real_keys = _flat_keys(next(iter(real.values())))
    assert len(real_keys) == 123
    for rec in to_mirage(sample_table()).values():
        assert _flat_keys(rec) == real_keys


def test_2022_record_structure() -> None:
    obj = to_mirage(sample_table(), layout="mirage2022", activity="chat")
    for rec in obj.values():
        assert tuple(rec["packet_data"]) == PACKET_DATA_2022
        assert tuple(rec["flow_metadata"]) == FLOW_METADATA_2022
        n = rec["flow_metadata"]["BF_num_packets"]
        assert all(len(v) == n for v in rec["packet_data"].values())  # whole flow
        assert rec["flow_metadata"]["BF_activity"] == "chat"
        assert rec["flow_metadata"]["BF_label_version_code"] is None
    tcp = obj["192.168.20.105,40000,203.0.113.7,443,6"]
    assert tcp["packet_data"]["TCP_flags"][:4] == ["S", "SA", "A", "PA"]
    assert tcp["packet_data"]["TCP_flags"][-1] == "FA"
    assert tcp["packet_data"]["L4_header_bytes"][:3] == [40, 40, 20]
    assert tcp["packet_data"]["timestamp"][0] == 1_700_000_000.0
    assert tcp["flow_metadata"]["BF_sublabel"] == TELEGRAM
    assert tcp["flow_metadata"]["BF_label_source"] == "strace"
    assert (tcp["flow_metadata"]["UF_MSS"], tcp["flow_metadata"]["DF_WS"]) == (1460.0, 9.0)
    udp = obj["192.168.20.105,53001,192.168.20.1,53,17"]
    assert udp["packet_data"]["TCP_flags"] == ["", ""]
    assert udp["packet_data"]["IP_packet_bytes"] == [58, 118]
    assert math.isnan(udp["flow_metadata"]["UF_MSS"])


def test_stats_cover_the_whole_flow_even_when_series_are_cut() -> None:
    table = sample_table()
    rec = to_mirage(table)["192.168.20.105,40001,149.154.167.51,443,6"]
    meta = rec["flow_metadata"]
    assert meta["BF_num_packets"] == 44 and len(rec["packet_data"]["iat"]) == 32
    for d, p in (("biflow", "BF"), ("upstream_flow", "UF"), ("downstream_flow", "DF")):
        mean = rec["flow_features"]["packet_length"][d]["mean"]
        assert mean * meta[f"{p}_num_packets"] == pytest.approx(meta[f"{p}_IP_packet_bytes"])
    assert meta["BF_duration"] == pytest.approx(0.6)
    # Untruncated flows: the iat series adds up to the flow's duration.
    short = to_mirage(table)["192.168.20.105,40000,203.0.113.7,443,6"]
    assert sum(short["packet_data"]["iat"]) == pytest.approx(short["flow_metadata"]["BF_duration"])


def test_one_way_flow_gets_int_zero_duration_and_nan_stats() -> None:
    rec = to_mirage(sample_table())["192.168.20.105,40002,203.0.113.7,443,6"]
    meta = rec["flow_metadata"]
    assert meta["DF_duration"] == 0 and type(meta["DF_duration"]) is int
    assert meta["UF_duration"] == 1.0 and type(meta["UF_duration"]) is float
    assert all(math.isnan(v) for v in rec["flow_features"]["packet_length"]["downstream_flow"].values())
    assert rec["flow_features"]["iat"]["upstream_flow"]["mean"] == 1.0


def test_unlabelled_flows() -> None:
    obj = to_mirage(sample_table(), layout="mirage2022")
    udp = obj["192.168.20.105,53001,192.168.20.1,53,17"]["flow_metadata"]
    assert udp["BF_label"] == "unknown" and udp["BF_sublabel"] == "unknown"
    assert udp["BF_labeling_type"] is None and udp["BF_label_source"] is None
    assert udp["BF_activity"] == "Unknown" and udp["BF_device"] is None


def test_raw_payload_only_on_request() -> None:
    table = sample_table()
    key = "192.168.20.105,40000,203.0.113.7,443,6"
    without = to_mirage(table)[key]["packet_data"]
    assert without["L4_raw_payload"] == [[]] * len(without["iat"])
    with_ = to_mirage(table, payload=True)[key]["packet_data"]
    for raw, n in zip(with_["L4_raw_payload"], with_["L4_payload_bytes"], strict=True):
        assert len(raw) == n
        assert all(type(b) is int and 0 <= b <= 255 for b in raw)
    assert with_["L4_raw_payload"][3][:3] == [0x16, 0x03, 0x01]


def test_serialisation_is_python_json_defaults(tmp_path: Path) -> None:
    obj = to_mirage(sample_table())
    path = write_mirage(obj, tmp_path / "x.json")
    raw = path.read_bytes()
    assert raw == json.dumps(obj).encode()
    assert b"\n" not in raw and not raw.endswith(b"\n")
    assert b"NaN" in raw and b", " in raw and b": " in raw
    assert nan_equal(json.loads(raw), obj)
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]  # no temp file left
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # like open(), not mkstemp's 0600


# ---------------------------------------------------------------------------- files


def test_file_and_folder_names() -> None:
    assert device_folder("Mi5", "38:a4:ed:18:cc:bf") == "Mi5_38_a4_ed_18_cc_bf"
    assert device_folder("Pixel 7", "AA-BB-CC-DD-EE-FF") == "Pixel7_aa_bb_cc_dd_ee_ff"
    assert (mirage_file_name(1543251985, "com.waze")
            == "1543251985_com.waze_MIRAGE-2019_traffic_dataset_labeled_biflows.json")
    assert mirage_file_name(1619019338, "com.microsoft.teams", "mirage2022") == (
        "1619019338_com.microsoft.teams_mirage2020dataset_labeled_biflows_all_packets_"
        "encryption_metadata.json")
    with pytest.raises(BadInputError):
        mirage_file_name(1, "com.bad_name")  # loaders take the 2nd "_" token as the package
    with pytest.raises(BadInputError):
        device_folder("Mi5", "not-a-mac")
    with pytest.raises(BadInputError):
        device_folder("???", "38:a4:ed:18:cc:bf")
    with pytest.raises(BadInputError):
        to_mirage(sample_table(), layout="mirage2030")


def test_duplicate_five_tuples_go_to_numbered_siblings(tmp_path: Path) -> None:
    # Port reuse: the same 5-tuple twice (and a third time) in one capture.
    table = make_flowtable([
        handshake_flow(2, src_port=41000),
        handshake_flow(3, src_port=41000, start=1_700_000_100),
        handshake_flow(1, src_port=41001),
        handshake_flow(5, src_port=41000, start=1_700_000_200),
    ])
    with pytest.raises(AnalysisError, match="5-tuple"):
        to_mirage(table)
    parts = to_mirage_parts(table)
    assert [len(p) for p in parts] == [2, 1, 1]
    key = "192.168.20.105,41000,203.0.113.7,443,6"
    assert [p[key]["flow_metadata"]["BF_num_packets"] for p in parts] == [6, 7, 9]
    paths = write_mirage_dir(table, tmp_path, TELEGRAM, "Pixel7", "aa:bb:cc:dd:ee:ff",
                             1_700_000_000)
    stem = f"1700000000_{TELEGRAM}_MIRAGE-2019_traffic_dataset_labeled_biflows"
    assert [p.name for p in paths] == [f"{stem}.json", f"{stem}_dup1.json", f"{stem}_dup2.json"]
    assert {p.parent.name for p in paths} == {"Pixel7_aa_bb_cc_dd_ee_ff"}
    p22 = write_mirage_dir(table, tmp_path / "22", TELEGRAM, "Pixel7", "AA-BB-CC-DD-EE-FF",
                           1_700_000_000, layout="mirage2022")
    assert {r["flow_metadata"]["BF_device"] for r in json.loads(p22[0].read_text()).values()} \
        == {"aa:bb:cc:dd:ee:ff"}
    df = read_mirage(tmp_path / "Pixel7_aa_bb_cc_dd_ee_ff")
    assert len(df) == 4
    assert set(df["session"]) == {stem} and set(df["app"]) == {TELEGRAM}
    assert sorted(df["flow_metadata_BF_num_packets"]) == [3 + 1 + 1, 6, 7, 9]


def test_write_failure_is_output_error_naming_the_path(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="file/sub/x.json"):
        write_mirage({}, blocker / "sub" / "x.json")


@pytest.fixture
def tiny_fs(tmp_path: Path):
    """A real 64 KiB tmpfs, to see a real ENOSPC (needs root and mount)."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
                       capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_disk_full_is_output_error_and_leaves_no_temp_file(tiny_fs: Path) -> None:
    table = make_flowtable([handshake_flow(40)] * 1)
    obj = to_mirage(table, payload=True, layout="mirage2022")
    big = {f"10.0.0.{i},1,10.0.0.2,2,6": next(iter(obj.values())) for i in range(40)}
    with pytest.raises(OutputError, match=str(tiny_fs)):
        write_mirage(big, tiny_fs / "x.json")
    assert list(tiny_fs.iterdir()) == []


# ---------------------------------------------------------------------------- reading


@needs_sample
def test_real_sample_round_trips_byte_for_byte() -> None:
    path = MIRAGE_SAMPLE[0]
    df = read_mirage(path)
    assert len(df) == 5
    assert df["app"].iloc[0] == "com.iconology.comics"
    assert df["session"].iloc[0] == path.stem and df["device"].iloc[0] == "mirage2019"
    assert df["flow_features_packet_length_biflow_min"].dtype == np.float64
    assert df["src_port"].dtype == np.int64 and df["src_ip"].iloc[0] == "192.168.20.105"
    assert isinstance(df["packet_data_iat"].iloc[0], list)
    obj = dataframe_to_mirage(df)
    assert nan_equal(obj, json.loads(path.read_text()))
    assert json.dumps(obj).encode() == path.read_bytes()


@pytest.mark.parametrize("layout", ["mirage2019", "mirage2022"])
def test_our_files_round_trip(tmp_path: Path, layout: str) -> None:
    table = sample_table()
    obj = to_mirage(table, layout=layout, payload=True, activity="chat")
    path = write_mirage(obj, tmp_path / "Pixel7_aa_bb_cc_dd_ee_ff" /
                        mirage_file_name(1_700_000_000, TELEGRAM, layout))
    df = read_mirage(path)
    assert df["device"].iloc[0] == "Pixel7_aa_bb_cc_dd_ee_ff" and df["app"].iloc[0] == TELEGRAM
    back = dataframe_to_mirage(df)
    assert nan_equal(back, obj)
    assert json.dumps(back).encode() == path.read_bytes()


def test_mixed_layouts_mark_absent_fields(tmp_path: Path) -> None:
    import pandas as pd

    table = make_flowtable([handshake_flow()])
    a = write_mirage(to_mirage(table), tmp_path / "d" / mirage_file_name(1, TELEGRAM))
    write_mirage(to_mirage(table, layout="mirage2022"),
                 tmp_path / "d" / mirage_file_name(2, TELEGRAM, "mirage2022"))
    df = read_mirage(tmp_path)
    assert len(df) == 2
    row = df[df["file"] == str(a)]
    assert row["flow_metadata_BF_activity"].iloc[0] is pd.NA
    assert nan_equal(dataframe_to_mirage(row), to_mirage(table))


def test_malformed_json_is_parse_error_with_position(tmp_path: Path) -> None:
    bad = tmp_path / "1_com.x_MIRAGE-2019_traffic_dataset_labeled_biflows.json"
    bad.write_text('{"1.2.3.4,1,5.6.7.8,2,6": {"packet_data": [1, 2,,]}}')
    with pytest.raises(ParseError) as err:
        read_mirage(bad)
    assert err.value.path == str(bad) and err.value.where == "line 1 column 49"
    assert str(bad) in str(err.value)


def test_bad_shapes_are_reported(tmp_path: Path) -> None:
    f = tmp_path / "a.json"
    f.write_text("[1, 2]")
    with pytest.raises(SchemaError, match="not a MIRAGE file"):
        read_mirage(f)
    f.write_text('{"1.2.3.4,1,5.6.7.8,2": {}}')
    with pytest.raises(ParseError, match="flow key"):
        read_mirage(f)
    f.write_text('{"1.2.3.4,1,5.6.7.8,2,6": {"packet_data": {}}}')
    with pytest.raises(SchemaError, match="flow_metadata"):
        read_mirage(f)
    f.write_bytes(b'{"\xff": 1}')
    with pytest.raises(ParseError, match="UTF-8"):
        read_mirage(f)
    with pytest.raises(BadInputError):
        read_mirage(tmp_path / "missing.json")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BadInputError, match="no MIRAGE"):
        read_mirage(empty)


# ---------------------------------------------------------------------------- golden


def golden_table():
    return make_flowtable([
        handshake_flow(3),
        {"proto": 17, "dst_port": 53, "dst_ip": "192.168.20.1", "src_port": 53001,
         "labels": {"BF_label": "com.android.dnsresolver", "BF_labeling_type": "most-common"},
         "packets": [{"ts": 0.0, "payload": b"\x12\x34\x01\x00"},
                     {"ts": 0.0041, "dir": 1, "payload": b"\x12\x34\x81\x80\x00"}]},
        {"src_ip": "fd00::5", "dst_ip": "2001:db8::1", "src_port": 40100,
         "packets": [{"ts": 0.0, "flags": SYN}]},
    ])


@pytest.mark.parametrize("layout", ["mirage2019", "mirage2022"])
def test_golden_files(layout: str, tmp_path: Path) -> None:
    golden = GOLDEN / f"{layout}.json"
    path = write_mirage(to_mirage(golden_table(), layout=layout, payload=True, activity="chat",
                                  device="aa:bb:cc:dd:ee:ff"), tmp_path / golden.name)
    if os.environ.get("FLOWTRUTH_REGEN_GOLDEN"):
        golden.parent.mkdir(exist_ok=True)
        shutil.copyfile(path, golden)
    assert path.read_bytes() == golden.read_bytes(), (
        f"MIRAGE output changed; if deliberate, regenerate {golden} with "
        "FLOWTRUTH_REGEN_GOLDEN=1")


# ---------------------------------------------------------------------------- tcbench


def _tcbench(module: str):
    try:
        return __import__(f"tcbench.libtcdatasets.{module}", fromlist=["main"])
    except Exception as err:  # not installed, or a dependency of it missing
        pytest.skip(f"tcbench cannot be imported ({err}); pip install --no-deps tcbench==0.0.22")


def _run_quietly(fn, *args, **kwargs):
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args, **kwargs)


def tcbench_fixture_table(package: str):
    flows = [handshake_flow(12, label=package, src_port=42000 + i) for i in range(3)]
    flows.append(handshake_flow(2, label="com.google.android.gms", src_port=42100))
    flows.append(handshake_flow(2, label=None, src_port=42101))
    return make_flowtable(flows)


@needs_sample
def test_tcbench_mirage19_loader_reads_our_files(tmp_path: Path) -> None:
    m19 = _tcbench("mirage19_json_to_parquet")
    # The real sample, as tcbench expects it, for the reference column set.
    ref_root = tmp_path / "ref"
    ref_dir = ref_root / "MIRAGE-2019_traffic_dataset_downloadable" / "Mi5_38_a4_ed_18_cc_bf"
    ref_dir.mkdir(parents=True)
    (ref_dir / MIRAGE_SAMPLE[0].name).symlink_to(MIRAGE_SAMPLE[0])
    ref = _run_quietly(m19.main, str(ref_root), workers=1)
    assert ref.shape == (5, 135)

    root = tmp_path / "ours"
    base = root / "MIRAGE-2019_traffic_dataset_downloadable"
    write_mirage_dir(tcbench_fixture_table(TELEGRAM), base, TELEGRAM, "Pixel7",
                     "aa:bb:cc:dd:ee:ff", 1_700_000_000, payload=True)
    write_mirage_dir(tcbench_fixture_table("com.whatsapp"), base, "com.whatsapp", "Pixel7",
                     "aa:bb:cc:dd:ee:ff", 1_700_000_900)
    df = _run_quietly(m19.main, str(root), workers=1)
    assert df.shape == (10, 135)
    assert list(df.columns) == list(ref.columns)
    assert set(df["device_name"]) == {"Pixel7_aa_bb_cc_dd_ee_ff"}
    for _, row in df.iterrows():
        label = row["flow_metadata_bf_label"]
        want = row["android_name"] if label == row["android_name"] else "background"
        assert row["app"] == want
        assert int(row["src_port"]) >= 42000 and row["proto"] == "6"
    counts = df["app"].value_counts().to_dict()
    assert counts == {TELEGRAM: 3, "com.whatsapp": 3, "background": 4}
    assert (df[df["app"] == TELEGRAM]["packets"] == 16).all()
    tg = df[df["android_name"] == TELEGRAM]
    assert any(tg["packet_data_l4_raw_payload"].map(lambda p: len(p[3]) > 0))


def test_tcbench_mirage22_loader_reads_our_files(tmp_path: Path) -> None:
    m22 = _tcbench("mirage22_json_to_parquet")
    root = tmp_path / "in"
    base = root / "MIRAGE-COVID-CCMA-2022" / "Raw_JSON"
    table = tcbench_fixture_table(TELEGRAM)
    parts = to_mirage_parts(table, layout="mirage2022", activity="chat", device="aa:bb:cc:dd:ee:ff")
    write_mirage(parts[0], base / "Telegram" / mirage_file_name(1_700_000_000, TELEGRAM,
                                                                  "mirage2022"))
    out = tmp_path / "out"
    args = argparse.Namespace(input_folder=root, output_folder=out, num_workers=1)
    _run_quietly(m22.main, args)
    import pandas as pd

    df = pd.read_parquet(out / "mirage22.parquet")
    assert len(df) == 5
    assert df["app"].value_counts().to_dict() == {TELEGRAM: 3, "background": 2}
    assert set(df["flow_metadata_bf_activity"]) == {"chat"}
    assert set(df["flow_metadata_bf_device"]) == {"aa:bb:cc:dd:ee:ff"}


def test_tcbench_filter_and_splits_accept_our_flows(tmp_path: Path) -> None:
    m19 = _tcbench("mirage19_json_to_parquet")
    splits = _tcbench("mirage19_generate_splits")
    base = tmp_path / "MIRAGE-2019_traffic_dataset_downloadable"
    for j, package in enumerate((TELEGRAM, "com.whatsapp")):
        # tcbench keeps classes with > 100 flows of > 10 payload packets in the window.
        flows = [handshake_flow(12, label=package, src_port=20000 + i) for i in range(101)]
        flows.append(handshake_flow(12, label=None, src_port=30000))
        write_mirage_dir(make_flowtable(flows), base, package, "Pixel7", "aa:bb:cc:dd:ee:ff",
                         1_700_000_000 + 600 * j, payload=True)
    df = _run_quietly(m19.main, str(tmp_path), workers=1)
    assert len(df) == 204
    kept = splits.filter_dataset(df)
    assert len(kept) == 202 and set(kept["app"]) == {TELEGRAM, "com.whatsapp"}
    assert (kept["packets"] == 12).all()
    assert kept["timetofirst"].map(lambda t: bool(np.all(np.diff(t) > 0))).all()
    folds = splits.generate_global_splits(kept)
    assert len(folds) == 5
    assert all(len(t) == 21 for t in folds["test_indexes"])


# ------------------------------------------------------------- real captures, end to end

REAL_PCAPS = [DATA / "ndpi_pcaps" / n for n in ("signal.pcap", "telegram.pcap", "whatsapp.pcap")]


def _read_real(path: Path, payload: bool = False):
    if not path.is_file():
        pytest.skip(f"{path} not present")
    try:
        from analysis.assemble import FlowOptions, read_flows
    except Exception as err:  # the pcap reader is another part of the project
        pytest.skip(f"pcap reader not available: {err}")
    return read_flows(path, FlowOptions(payload=payload))


@pytest.mark.parametrize("pcap", REAL_PCAPS, ids=lambda p: p.name)
def test_real_capture_2022_export_is_self_consistent(pcap: Path, tmp_path: Path) -> None:
    from analysis.stats import mirage_stats

    table = _read_real(pcap, payload=True)
    assert len(table) > 0
    for part in to_mirage_parts(table, layout="mirage2022", payload=True):
        for key, rec in part.items():
            assert KEY_RE.match(key) or ":" in key, key
            pd_, meta = rec["packet_data"], rec["flow_metadata"]
            ip_len = np.array(pd_["IP_packet_bytes"], dtype=np.float64)
            dirs = np.array(pd_["packet_dir"])
            ts = np.array(pd_["timestamp"])
            assert len(ip_len) == meta["BF_num_packets"]
            assert ip_len.sum() == meta["BF_IP_packet_bytes"]
            assert sum(pd_["L4_payload_bytes"]) == meta["BF_L4_payload_bytes"]
            assert sum(pd_["iat"]) == pytest.approx(meta["BF_duration"], abs=1e-6)
            for raw, n in zip(pd_["L4_raw_payload"], pd_["L4_payload_bytes"], strict=True):
                assert len(raw) <= n  # capture snap length may cut payloads
            # Every statistic, recomputed from the file's own whole-flow series.
            up_t, down_t = ts[dirs == 0], ts[dirs == 1]
            gaps = {"upstream_flow": np.diff(up_t), "downstream_flow": np.diff(down_t)}
            gaps["biflow"] = np.concatenate([gaps["upstream_flow"], gaps["downstream_flow"]])
            lens = {"biflow": ip_len, "upstream_flow": ip_len[dirs == 0],
                    "downstream_flow": ip_len[dirs == 1]}
            for d in ("biflow", "upstream_flow", "downstream_flow"):
                want = [rec["flow_features"]["packet_length"][d][s] for s in STAT_NAMES]
                np.testing.assert_allclose(mirage_stats(lens[d]), want, rtol=1e-9,
                                           equal_nan=True)
                want = [rec["flow_features"]["iat"][d][s] for s in STAT_NAMES]
                got = mirage_stats(gaps[d])
                # Float epoch timestamps carry ~2e-7 s of rounding per packet.
                np.testing.assert_allclose(got[:6], want[:6], rtol=1e-3, atol=1e-6,
                                           equal_nan=True)


@pytest.mark.parametrize("pcap", REAL_PCAPS, ids=lambda p: p.name)
def test_real_capture_round_trips_and_tcbench_reads_it(pcap: Path, tmp_path: Path) -> None:
    table = _read_real(pcap)
    package = {"signal.pcap": "org.thoughtcrime.securesms", "telegram.pcap": TELEGRAM,
               "whatsapp.pcap": "com.whatsapp"}[pcap.name]
    labels = np.empty(len(table), dtype=object)
    labels[::2] = package  # half the flows labelled, the others stay unknown
    table.labels["BF_label"] = labels
    base = tmp_path / "MIRAGE-2019_traffic_dataset_downloadable"
    paths = write_mirage_dir(table, base, package, "Pixel7", "aa:bb:cc:dd:ee:ff", 1_569_051_245)
    for p in paths:
        assert json.dumps(dataframe_to_mirage(read_mirage(p))).encode() == p.read_bytes()
    m19 = _tcbench("mirage19_json_to_parquet")
    df = _run_quietly(m19.main, str(tmp_path), workers=1)
    assert df.shape == (len(table), 135)
    assert (df["app"] == package).sum() == (labels == package).sum()


@st.composite
def random_flows(draw: st.DrawFn) -> list[dict]:
    out = []
    for i in range(draw(st.integers(1, 5))):
        proto = draw(st.sampled_from([6, 17]))
        pkts = []
        t = 0.0
        for _ in range(draw(st.integers(1, 40))):
            t += draw(st.sampled_from([0.0, 1e-6, 0.003, 0.25, 2.0]))
            pkts.append({"ts": t, "dir": draw(st.integers(0, 1)),
                         "payload": bytes(draw(st.integers(0, 3))) * draw(st.integers(0, 4)),
                         "flags": draw(st.sampled_from([SYN, SYN | ACK, ACK, PSH | ACK, FIN]))})
        labels = draw(st.sampled_from([{}, {"BF_label": TELEGRAM, "BF_labeling_type": "exact"}]))
        out.append({"proto": proto, "src_port": 30000 + i, "packets": pkts, "labels": labels})
    return out


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(random_flows(), st.sampled_from(["mirage2019", "mirage2022"]), st.booleans())
def test_random_tables_round_trip_through_files(tmp_path: Path, spec: list[dict], layout: str,
                                                payload: bool) -> None:
    table = make_flowtable(spec)
    obj = to_mirage(table, layout=layout, payload=payload)
    path = write_mirage(obj, tmp_path / "Dev_00_00_00_00_00_01" /
                        mirage_file_name(1_700_000_000, TELEGRAM, layout))
    back = dataframe_to_mirage(read_mirage(path))
    assert nan_equal(back, obj)
    assert json.dumps(back).encode() == path.read_bytes()
