"""Datasets and features on real data: nDPI captures labelled from flow_labels.csv, the
real MIRAGE-2019 file, our MIRAGE and Parquet exports loading to the same table."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from analysis.errors import BadInputError, ParseError, SchemaError

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
PCAPS = DATA / "ndpi_pcaps"
MIRAGE19 = DATA / "mirage2019"
pytestmark = pytest.mark.skipif(
    not (PCAPS / "flow_labels.csv").exists(), reason="shared data not found"
)


@pytest.fixture(scope="module")
def ndpi_dirs(tmp_path_factory) -> dict[str, Path]:
    from analysis.ml.ndpi import build_ndpi_dataset

    base = tmp_path_factory.mktemp("ndpi")
    out = {}
    for fmt in ("mirage2022", "parquet"):
        s = build_ndpi_dataset(PCAPS, base / fmt, fmt)
        assert s.captures == 38 and s.flows == 876
        out[fmt] = base / fmt
    return out


def _verdicts() -> dict[tuple, set[str]]:
    from analysis.traces.model import norm_ip

    v: dict[tuple, set[str]] = {}
    with open(PCAPS / "flow_labels.csv", newline="") as fh:
        for r in csv.DictReader(fh):
            if r["l4"] not in ("TCP", "UDP"):
                continue
            p = 6 if r["l4"] == "TCP" else 17
            a = (norm_ip(r["src_ip"]), int(r["src_port"]))
            b = (norm_ip(r["dst_ip"]), int(r["dst_port"]))
            for key in ((r["pcap"], p, *a, *b), (r["pcap"], p, *b, *a)):
                v.setdefault(key, set()).add(r["app_family"])
    return v


def test_ndpi_flows_carry_ndpis_verdict_for_their_5_tuple(ndpi_dirs) -> None:
    from analysis.ml.datasets import DatasetFilter, load_dataset
    from analysis.ml.ndpi import session_token
    from analysis.traces.model import norm_ip

    ds = load_dataset([ndpi_dirs["parquet"]], DatasetFilter(drop_background=False, drop_dns=False))
    df = ds.frame
    assert len(df) == 876
    by_token = {
        session_token(r["pcap"]): r["pcap"]
        for r in csv.DictReader(open(PCAPS / "flow_labels.csv", newline=""))
    }
    verdict = _verdicts()
    checked = 0
    for row in df.itertuples():
        key = (
            by_token[row.session],
            row.proto,
            norm_ip(row.src_ip),
            row.src_port,
            norm_ip(row.dst_ip),
            row.dst_port,
        )
        want = verdict.get(key)
        if want and len(want) == 1:
            assert row.app == next(iter(want))
            assert row.labeling_type == "ndpi" and row.label_source == "csv"
            checked += 1
    assert checked == 875
    assert df["app"].isin(["Signal", "Telegram", "WhatsApp", "other"]).sum() == 875
    card = ds.card()
    assert card["per_app"]["WhatsApp"] == 132 and card["per_app"]["Signal"] == 11
    assert card["sessions"] == 38


def test_mirage_and_parquet_exports_load_to_the_same_table(ndpi_dirs) -> None:
    from analysis.ml.datasets import COUNTER_COLUMNS, STAT_COLUMNS, load_dataset

    a = load_dataset([ndpi_dirs["mirage2022"]]).frame
    b = load_dataset([ndpi_dirs["parquet"]]).frame
    assert len(a) == len(b) == 766  # DNS (109) and the one unlabelled flow dropped
    a["token"] = a["session"].str.split("/").str[1].str.split("_").str[1]
    b["token"] = b["session"]
    key = ["token", "src_ip", "src_port", "dst_ip", "dst_port", "proto", "BF_duration"]
    a = a.sort_values(key).reset_index(drop=True)
    b = b.sort_values(key).reset_index(drop=True)
    for c in ("src_ip", "src_port", "dst_port", "app", "labeling_type", "has_handshake"):
        assert a[c].tolist() == b[c].tolist(), c
    np.testing.assert_allclose(
        a[list(STAT_COLUMNS)].to_numpy(),
        b[list(STAT_COLUMNS)].to_numpy(),
        rtol=1e-9,
        equal_nan=True,
    )
    np.testing.assert_allclose(
        a[list(COUNTER_COLUMNS)].to_numpy(), b[list(COUNTER_COLUMNS)].to_numpy(), rtol=1e-6
    )
    for c in ("pkt_payload", "pkt_dir", "pkt_iat"):
        for x, y in zip(a[c], b[c], strict=True):
            np.testing.assert_allclose(x, y, atol=1e-6)
    # MIRAGE: session is the file stem; device the <Model>_<mac> folder
    assert a["session"].str.contains("_mirage2020dataset_").all()
    assert a["device"].str.startswith("nDPI_").all()


def test_real_mirage2019_file_loads_into_the_same_table() -> None:
    from analysis.ml.datasets import META_COLUMNS, STAT_COLUMNS, load_dataset

    path = next(MIRAGE19.glob("*.json"))
    ds = load_dataset([path])
    df = ds.frame
    raw = json.loads(path.read_text())
    assert len(df) == len(raw) == 5
    assert set(META_COLUMNS) <= set(df.columns)
    assert (df["app"] == "com.iconology.comics").all()
    assert (df["target_app"] == "com.iconology.comics").all()
    assert (df["device"] == "mirage2019").all() and (df["labeling_type"] == "exact").all()
    for row in df.itertuples():
        rec = raw[f"{row.src_ip},{row.src_port},{row.dst_ip},{row.dst_port},{row.proto}"]
        md = rec["flow_metadata"]
        assert row.BF_num_packets == md["BF_num_packets"]
        assert row.UF_L4_payload_bytes == md["UF_L4_payload_bytes"]
        assert len(row.pkt_payload) == min(32, md["BF_num_packets"])
        assert row.pkt_payload.tolist() == rec["packet_data"]["L4_payload_bytes"][:32]
        assert (
            row.packet_length_upstream_flow_mean
            == rec["flow_features"]["packet_length"]["upstream_flow"]["mean"]
        )
    assert df[list(STAT_COLUMNS)].notna().any(axis=1).all()
    # MIRAGE-2019 has no TCP flags: the handshake test falls back to payload-less packets
    assert df["has_handshake"].all()


def test_capture_frame_matches_the_mirage_export_of_it(tmp_path) -> None:
    from analysis.ml.datasets import DatasetFilter, capture_frame, load_dataset
    from analysis.pipeline import export_flows

    cap = PCAPS / "signal.pcap"
    export_flows([cap], tmp_path / "sig.json", "mirage2019")
    m = load_dataset(
        [tmp_path / "sig.json"], DatasetFilter(drop_background=False, drop_dns=False)
    ).frame
    c = capture_frame(cap)
    assert len(c) == len(m) == 18
    m = m.sort_values(["src_port", "dst_port"]).reset_index(drop=True)
    c = c.sort_values(["src_port", "dst_port"]).reset_index(drop=True)
    for x, y in zip(m["pkt_iat"], c["pkt_iat"], strict=True):
        np.testing.assert_allclose(x, y, atol=1e-9)
    assert m["has_handshake"].tolist() != [] and c["has_handshake"].dtype == bool
    assert (c["session"] == "signal").all()


def test_filters_drop_what_they_say(ndpi_dirs) -> None:
    from analysis.ml.datasets import DatasetFilter, is_background, load_dataset

    every = load_dataset(
        [ndpi_dirs["parquet"]], DatasetFilter(drop_background=False, drop_dns=False)
    )
    df = every.frame
    dns = ((df["src_port"] == 53) | (df["dst_port"] == 53)).sum()
    assert dns == 109
    assert is_background(df).sum() == 1  # the flow nDPI did not list
    d = load_dataset([ndpi_dirs["parquet"]], DatasetFilter(min_packets=10))
    assert (d.frame["BF_num_packets"] >= 10).all() and d.dropped["min_packets"] > 0
    hs = load_dataset([ndpi_dirs["parquet"]], DatasetFilter(require_handshake=True))
    tcp = hs.frame[hs.frame["proto"] == 6]
    assert len(tcp) and hs.dropped["no_handshake"] > 0
    # tcbench's rule: flows not of the session's own app are background; the session
    # token of telegram.pcap is "telegram", never a family label
    tb = load_dataset(
        [ndpi_dirs["parquet"]],
        DatasetFilter(background_is_other_apps=True),
    )
    assert len(tb) == 0
    only = load_dataset([ndpi_dirs["parquet"]], DatasetFilter(labeling_types=("exact",)))
    assert len(only) == 0 and only.dropped["labeling_type"] == 875


def test_card_is_printed_and_saved_and_fingerprint_tracks_labels(ndpi_dirs, tmp_path) -> None:
    from analysis.ml.datasets import card_text, fingerprint, load_dataset, write_card

    ds = load_dataset([ndpi_dirs["mirage2022"], MIRAGE19])
    card = ds.card()
    assert sum(card["per_app"].values()) == card["flows"] == len(ds)
    assert card["per_device"]["mirage2019"] == 5
    assert card["dropped"] == {"background": 1, "dns": 109}
    text = card_text(card)
    assert "WhatsApp 130" in text and "com.iconology.comics 5" in text
    path = write_card(card, tmp_path / "card")
    assert json.loads(path.read_text())["flows"] == card["flows"]
    assert (tmp_path / "card" / "dataset_card.txt").read_text().startswith(f"{len(ds):,} flows")
    f1 = fingerprint(ds.frame)
    changed = ds.frame.copy()
    changed.loc[0, "app"] = "something else"
    assert fingerprint(ds.frame) == f1 != fingerprint(changed)


def test_bad_inputs_are_known_errors(tmp_path) -> None:
    from analysis.ml.datasets import load_dataset

    with pytest.raises(BadInputError, match="no such file"):
        load_dataset([tmp_path / "nope.json"])
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(BadInputError, match="not a MIRAGE"):
        load_dataset([tmp_path / "x.txt"])
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(SchemaError):
        load_dataset([tmp_path / "bad.json"])
    (tmp_path / "broken.json").write_text('{"a": ')
    with pytest.raises(ParseError):
        load_dataset([tmp_path / "broken.json"])
    with pytest.raises(BadInputError, match="no labels"):
        load_dataset([PCAPS / "signal.pcap"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadInputError, match="no MIRAGE"):
        load_dataset([tmp_path / "empty"])
    (tmp_path / "f.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(BadInputError):
        load_dataset([tmp_path / "f.parquet"])


def test_feature_sets_shapes_names_and_groups(ndpi_dirs) -> None:
    from analysis.ml.datasets import load_dataset
    from analysis.ml.features import MISSING, FeatureSpec, build_features, feature_infos, parse_sets

    df = load_dataset([ndpi_dirs["parquet"]]).frame
    spec = FeatureSpec(("stats", "series", "counters"), series_packets=8)
    X = build_features(df, spec)
    infos = feature_infos(spec)
    assert X.shape == (len(df), len(infos)) == (len(df), 102 + 8 * 5 + 13)
    assert X.dtype == np.float32 and np.isfinite(X).all()
    names = [f.name for f in infos]
    assert not any("port" in n or "ip" in n.split("_") for n in names)
    j = names.index("pkt0_up_payload")
    first_dir = np.array([s[0] if len(s) else -1 for s in df["pkt_dir"]])
    first_pay = np.array([s[0] if len(s) else -1 for s in df["pkt_payload"]])
    np.testing.assert_array_equal(X[:, j], np.where(first_dir == 0, first_pay, 0))
    short = np.array([len(s) < 8 for s in df["pkt_dir"]])
    assert short.any() and (X[short, names.index("pkt7_dir")] == MISSING).all()
    dirs = {f.direction for f in infos}
    fams = {f.family for f in infos}
    assert dirs == {"upstream", "downstream", "biflow"}
    assert {"packet_length", "iat", "payload_series", "counters"} <= fams
    up = [f.name for f in infos if f.direction == "upstream" and f.family == "packet_length"]
    assert len(up) == 17 and all("_upstream_flow_" in n for n in up)
    with_ep = build_features(df, FeatureSpec(("stats",), with_endpoints=True))
    assert with_ep.shape[1] == 102 + 5
    assert feature_infos(FeatureSpec(("stats",), with_endpoints=True))[-1].family == "endpoints"
    assert parse_sets("stats, series") == ("stats", "series")
    assert parse_sets("all") == ("stats", "series", "counters")
    with pytest.raises(BadInputError, match="sni"):
        parse_sets("stats,sni")


def test_original_2022_and_2024_layouts_take_device_and_app_from_the_right_place(tmp_path):
    """MIRAGE-2022 folders are app folders (device from BF_device); 2024 file names carry the
    MAC before the package; BF_sublabel ``pkg:process`` gives the package."""
    from analysis.ml.datasets import DatasetFilter, load_dataset
    from analysis.pipeline import export_flows

    src = tmp_path / "x.json"
    export_flows(
        [PCAPS / "signal.pcap"],
        src,
        "mirage2022",
        label="org.thoughtcrime.securesms",
        device_mac="aa:bb:cc:dd:ee:ff",
        activity="chat",
    )
    obj = json.loads(src.read_text())
    for rec in obj.values():
        rec["flow_metadata"]["BF_sublabel"] = "org.thoughtcrime.securesms:remote"
    suffix = "mirage2020dataset_labeled_biflows_all_packets_encryption_metadata.json"
    f22 = tmp_path / "Raw_JSON" / "Signal" / f"1619019338_org.thoughtcrime.securesms_{suffix}"
    f24 = (
        tmp_path
        / "AppAct"
        / "Signal"
        / f"1670836390_aa:bb:cc:dd:ee:ff_org.thoughtcrime.securesms_{suffix}"
    )
    for f in (f22, f24):
        f.parent.mkdir(parents=True)
        f.write_text(json.dumps(obj))
    flt = DatasetFilter(drop_dns=False)
    for f in (f22, f24):
        df = load_dataset([f], flt).frame
        assert len(df) == 18
        assert (df["device"] == "aa:bb:cc:dd:ee:ff").all()
        assert (df["app"] == "org.thoughtcrime.securesms").all()
        assert (df["target_app"] == "org.thoughtcrime.securesms").all()
        assert (df["activity"] == "chat").all()


def test_a_run_directory_loads_its_flows_not_its_manifest_or_capture(tmp_path):
    """Run directories hold manifest.json, quality.json and capture.pcap beside the MIRAGE
    files: a folder scan takes the MIRAGE-named JSON; a folder of captures only, the captures."""
    import shutil

    from analysis.assemble import read_flows
    from analysis.mirage import write_mirage_dir
    from analysis.ml.datasets import DatasetFilter, expand_inputs, load_dataset
    from analysis.pipeline import label_all

    run = tmp_path / "20261128T224913Z_phone0_signal_chat_r1"
    (run / "labels").mkdir(parents=True)
    shutil.copy(PCAPS / "signal.pcap", run / "capture.pcap")
    (run / "manifest.json").write_text('{"outcome": "completed"}')
    (run / "labels" / "quality.json").write_text('{"exact": 1}')
    table = read_flows(PCAPS / "signal.pcap")
    label_all(table, "org.thoughtcrime.securesms")
    write_mirage_dir(
        table,
        run / "labels",
        "org.thoughtcrime.securesms",
        "SM-G991B",
        "36:c8:80:39:6c:c8",
        1795906162,
    )
    kinds = expand_inputs([tmp_path])
    assert [k for k, _ in kinds] == ["mirage"]
    df = load_dataset([tmp_path], DatasetFilter(drop_dns=False)).frame
    assert len(df) == 18 and (df["device"] == "SM-G991B_36_c8_80_39_6c_c8").all()
    assert df["session"].iloc[0].startswith("SM-G991B_36_c8_80_39_6c_c8/1795906162_")
    only_caps = tmp_path / "caps"
    only_caps.mkdir()
    shutil.copy(PCAPS / "signal.pcap", only_caps / "a.pcap")
    assert [k for k, _ in expand_inputs([only_caps])] == ["capture"]
