"""Small hostile files that used to take gigabytes: refused before reading, one line, exit 2.

Each bomb is generated here (small on disk), then the real CLI runs it in a child process
under an address-space ceiling; the child's own peak RSS (from wait4) must stay under 1 GB.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.limits import GB, one_line_error, run_limited

REPO = Path(__file__).resolve().parents[1]
MIRAGE_NAME = "1539866692_com.x_MIRAGE-2019_traffic_dataset_labeled_biflows.json"


def _mirage_record() -> tuple[str, dict]:
    obj = json.loads((REPO / "tests/golden/mirage2019.json").read_text())
    key, rec = next(iter(obj.items()))
    return key, rec


def _write_mirage(d: Path, obj: dict) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    p = d / MIRAGE_NAME
    p.write_text(json.dumps(obj))
    return p


def _assert_refused(o, max_rss: int = GB) -> None:
    assert one_line_error(o), (o.returncode, o.stderr[-2000:])
    assert o.max_rss < max_rss, f"peak RSS {o.max_rss >> 20} MB"
    assert len(o.stderr) < 2100


def test_mirage_long_key_bomb_is_refused_without_memory(tmp_path):
    """4 MB of one flow_features key used to cost 1.2 GB (copied into every column name)."""
    key, rec = _mirage_record()
    rec = dict(rec)
    inner = next(iter(rec["flow_features"].values()))
    rec["flow_features"] = {"A" * (4 << 20): inner}
    _write_mirage(tmp_path / "d", {key: rec})
    o = run_limited(["dataset", "card", str(tmp_path / "d")])
    _assert_refused(o)
    assert "longer than 128 characters" in o.stderr


def test_mirage_wide_and_deep_records_are_refused(tmp_path):
    key, rec = _mirage_record()
    wide = dict(rec)
    wide["flow_metadata"] = {**rec["flow_metadata"], **{f"k{i}": i for i in range(5000)}}
    _write_mirage(tmp_path / "wide", {key: wide})
    o = run_limited(["dataset", "card", str(tmp_path / "wide")])
    _assert_refused(o)
    assert "more than 512 fields" in o.stderr
    deep = dict(rec)
    deep["flow_features"] = {"a": {"b": {"c": {"d": {"e": 1}}}}}
    _write_mirage(tmp_path / "deep", {key: deep})
    o = run_limited(["dataset", "card", str(tmp_path / "deep")])
    _assert_refused(o)
    assert "nests deeper" in o.stderr


@pytest.mark.parametrize("text, want", [
    ("[" * 200_000 + "]" * 200_000, "nested too deeply"),
    ("{\"a\": " + "7" * 1_000_000 + "}", "bad JSON value"),
], ids=["deep", "digits"])
def test_mirage_deep_nesting_and_huge_numbers(tmp_path, text, want):
    d = tmp_path / "d"
    d.mkdir()
    (d / MIRAGE_NAME).write_text(text)
    o = run_limited(["dataset", "card", str(d)])
    _assert_refused(o)
    assert want in o.stderr


@pytest.mark.parametrize("bad, want", [
    ({"iat": {"0": 1.0}}, "packet_data_iat is not a list"),
    ({"iat": ["x", "y"]}, "not a number"),
    ({"src_port": [10 ** 30]}, "not a number"),
])
def test_mirage_series_of_the_wrong_type(tmp_path, bad, want):
    key, rec = _mirage_record()
    rec = {**rec, "packet_data": {**rec["packet_data"], **bad}}
    _write_mirage(tmp_path / "d", {key: rec})
    o = run_limited(["dataset", "card", str(tmp_path / "d")])
    _assert_refused(o)
    assert want in o.stderr


def test_mirage_port_beyond_its_type(tmp_path):
    key, rec = _mirage_record()
    parts = key.split(",")
    parts[1] = "9" * 30
    _write_mirage(tmp_path / "d", {",".join(parts): rec})
    o = run_limited(["dataset", "card", str(tmp_path / "d")])
    _assert_refused(o)
    assert "ports 0-65535" in o.stderr


def _parquet_bomb(path: Path, rows: int = 200_000_000) -> Path:
    """A flowtruth-looking Parquet file declaring ``rows`` null rows in a few hundred KB."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from analysis.parquet_io import SCHEMA_VERSION

    t = pa.table({"first_ts_ns": pa.nulls(rows)}).replace_schema_metadata(
        {"schema_version": SCHEMA_VERSION})
    pq.write_table(t, path, row_group_size=rows)
    return path


def test_parquet_row_bomb_is_refused_before_reading(tmp_path):
    """Declared rows against the file size, checked on the footer: no data is read."""
    bomb = _parquet_bomb(tmp_path / "bomb.parquet")
    assert bomb.stat().st_size < 2 << 20
    o = run_limited(["dataset", "card", str(bomb)])
    _assert_refused(o)
    assert "declares 200,000,000 rows" in o.stderr
    import numpy as np

    from analysis.ml.features import FeatureSpec
    from analysis.ml.models import fit_model, save_model

    model = fit_model(np.ones((4, 9)), np.array(["a", "b", "a", "b"]), kind="majority",
                      features=FeatureSpec(("counters",)))
    save_model(model, tmp_path / "model")
    o = run_limited(["predict", str(tmp_path / "model"), str(bomb), "-o",
                     str(tmp_path / "p.csv")])
    _assert_refused(o)
    assert "declares 200,000,000 rows" in o.stderr


def test_parquet_with_wrong_schema_or_damage_is_one_line(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from analysis.parquet_io import SCHEMA_VERSION

    meta = {"schema_version": SCHEMA_VERSION}
    small = tmp_path / "small.parquet"
    pq.write_table(pa.table({"x": [1, 2, 3]}).replace_schema_metadata(meta), small)
    o = run_limited(["dataset", "card", str(small)])
    _assert_refused(o)
    assert "no column" in o.stderr
    wide = tmp_path / "wide.parquet"
    pq.write_table(pa.table({f"c{i}": [1] for i in range(1500)}).replace_schema_metadata(meta),
                   wide)
    o = run_limited(["dataset", "card", str(wide)])
    _assert_refused(o)
    assert "1500 columns" in o.stderr
    longname = tmp_path / "longname.parquet"
    pq.write_table(pa.table({"n" * 100_000: [1]}).replace_schema_metadata(meta), longname)
    o = run_limited(["dataset", "card", str(longname)])
    _assert_refused(o)
    damaged = tmp_path / "damaged.parquet"
    data = bytearray(small.read_bytes())
    data[len(data) // 2: len(data) // 2 + 8] = b"\xff" * 8
    damaged.write_bytes(bytes(data))
    truncated = tmp_path / "truncated.parquet"
    truncated.write_bytes(small.read_bytes()[:-20] + b"PAR1")
    for f in (damaged, truncated):
        o = run_limited(["dataset", "card", str(f)])
        _assert_refused(o)


def test_long_names_are_cut_in_error_lines(tmp_path):
    """A hostile name inside a file is echoed cut (two ends and an ellipsis), never whole."""
    key, rec = _mirage_record()
    parts = key.split(",")
    parts[0] = "\x1b[2J" + "x" * (1 << 20)
    _write_mirage(tmp_path / "d", {",".join(parts): rec})
    o = run_limited(["dataset", "card", str(tmp_path / "d")])
    _assert_refused(o)
    assert "\x1b" not in o.stderr and "\u2026" in o.stderr


def test_model_json_cannot_point_outside_or_lack_fields(tmp_path):
    """model.json naming /etc/shadow is refused before the file is opened; a missing key is
    one line, not a KeyError."""
    import numpy as np

    from analysis.ml.features import FeatureSpec
    from analysis.ml.models import fit_model, save_model

    d = save_model(fit_model(np.ones((4, 9)), np.array(["a", "b", "a", "b"]), kind="majority",
                             features=FeatureSpec(("counters",))), tmp_path / "model")
    meta = json.loads((d / "model.json").read_text())
    data = REPO / "tests/golden/mirage2019.json"
    (d / "model.json").write_text(json.dumps({**meta, "file": "/etc/shadow"}))
    o = run_limited(["predict", str(d), str(data), "-o", str(tmp_path / "p.csv")])
    _assert_refused(o)
    assert "inside the model directory" in o.stderr
    (d / "model.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "labels"}))
    o = run_limited(["predict", str(d), str(data), "-o", str(tmp_path / "p.csv")])
    _assert_refused(o)
    assert "no 'labels' field" in o.stderr
