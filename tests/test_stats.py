"""MIRAGE statistics: the numba kernels against scipy/numpy and the real MIRAGE sample."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from analysis.flowtable import DIRECTIONS, METRICS, STAT_NAMES, FlowTable, stat_column
from analysis.stats import flow_feature_matrix, mirage_stats, mirage_stats_into
from tests.factories import make_flowtable, reference_stats

scipy_stats = pytest.importorskip("scipy.stats", reason="scipy (dev dependency) not installed")

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
MIRAGE_SAMPLE = sorted((DATA / "mirage2019").glob("*.json"))
EXACT = [0, 1, 5] + list(range(8, 17))  # min, max, mad, percentiles: no rounding at all


def scipy_reference(x: np.ndarray) -> np.ndarray:
    """The 17 statistics with numpy/scipy, MIRAGE's fall-backs applied (spec §2.3)."""
    if len(x) == 0:
        return np.full(17, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        sk = float(scipy_stats.skew(x, bias=False))
        ku = float(scipy_stats.kurtosis(x, fisher=True, bias=False))
    # Recent scipy gives NaN for zero variance; MIRAGE (scipy < 1.9) wrote 0 and -3.
    sk = 0.0 if math.isnan(sk) else sk
    ku = -3.0 if math.isnan(ku) else ku
    return np.array([x.min(), x.max(), x.mean(), x.std(), x.var(),
                     float(scipy_stats.median_abs_deviation(x, scale=1.0)), sk, ku,
                     *np.percentile(x, [10, 20, 30, 40, 50, 60, 70, 80, 90])])


def assert_stats_match(got: np.ndarray, want: np.ndarray) -> None:
    np.testing.assert_array_equal(got[EXACT], want[EXACT])
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12, equal_nan=True)


packet_lengths = st.lists(st.integers(20, 65535).map(float), max_size=80)
# Gaps are 0 or at least a nanosecond (capture stamps are ns); tinier ones only underflow.
gaps = st.lists(st.one_of(st.just(0.0), st.floats(1e-9, 120.0)), max_size=80)


@settings(max_examples=300, deadline=None)
@given(packet_lengths)
def test_stats_match_scipy_on_packet_lengths(values: list[float]) -> None:
    x = np.array(values, dtype=np.float64)
    assert_stats_match(mirage_stats(x), scipy_reference(x))


@settings(max_examples=300, deadline=None)
@given(gaps)
def test_stats_match_scipy_on_gaps(values: list[float]) -> None:
    x = np.array(values, dtype=np.float64)
    if len(x) > 1:
        # Skew and kurtosis of near-constant data are dominated by rounding in any
        # implementation; compare them only where the variance is meaningful.
        m2 = float(np.var(x))
        assume(m2 == 0.0 or m2 > 1e-6 * float(np.mean(x)) ** 2)
    assert_stats_match(mirage_stats(x), scipy_reference(x))


@settings(max_examples=200, deadline=None)
@given(gaps)
def test_factory_reference_matches_scipy(values: list[float]) -> None:
    x = np.array(values, dtype=np.float64)
    if len(x) > 1:
        m2 = float(np.var(x))
        assume(m2 == 0.0 or m2 > 1e-6 * float(np.mean(x)) ** 2)
    np.testing.assert_allclose(reference_stats(x), scipy_reference(x), rtol=1e-9, atol=1e-12,
                               equal_nan=True)


def test_small_and_degenerate_samples() -> None:
    assert np.isnan(mirage_stats(np.array([]))).all()
    one = mirage_stats(np.array([52.0]))
    assert one.tolist() == [52.0, 52.0, 52.0, 0.0, 0.0, 0.0, 0.0, -3.0] + [52.0] * 9
    two = mirage_stats(np.array([40.0, 60.0]))
    assert two[6] == 0.0 and two[7] == -2.0  # n <= 3: uncorrected excess kurtosis
    assert two[8] == 42.0 and two[16] == 58.0
    const = mirage_stats(np.full(7, 1500.0))
    assert const[6] == 0.0 and const[7] == -3.0 and const[3] == 0.0
    three = np.array([1.0, 2.0, 10.0])
    got = mirage_stats(three)
    m = three - three.mean()
    assert got[7] == pytest.approx(np.mean(m**4) / np.mean(m**2) ** 2 - 3.0)
    assert got[6] == pytest.approx(scipy_stats.skew(three, bias=False))


def test_stats_into_writes_in_place_and_leaves_input_alone() -> None:
    x = np.array([5.0, 1.0, 3.0])
    out = np.zeros(17)
    mirage_stats_into(x, out)
    assert x.tolist() == [5.0, 1.0, 3.0]
    assert out[0] == 1.0 and out[1] == 5.0 and out[12] == 3.0


@st.composite
def flows(draw: st.DrawFn) -> list[dict]:
    out = []
    for _ in range(draw(st.integers(1, 6))):
        n = draw(st.integers(1, 40))
        t = 0.0
        pkts = []
        for _ in range(n):
            t += draw(st.sampled_from([0.0, 1e-6, 0.001, 0.02, 0.5, 3.0]))
            pkts.append({"ts": t, "dir": draw(st.integers(0, 1)),
                         "ip_len": draw(st.integers(40, 1500))})
        out.append({"packets": pkts})
    return out


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(flows())
def test_feature_matrix_matches_reference(spec: list[dict]) -> None:
    table = make_flowtable(spec)
    got = flow_feature_matrix(table.packets["pkt_ts_ns"], table.packets["pkt_dir"],
                              table.packets["pkt_ip_len"], table.pkt_offsets)
    assert got.shape == (len(spec), 102)
    want = table.flows["stats"]
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12, equal_nan=True)
    # The order-only statistics carry no rounding at all.
    for m in METRICS:
        for d in DIRECTIONS:
            cols = [stat_column(m, d, s) for s in ("min", "max", "mad", "10_percentile",
                                                    "50_percentile", "90_percentile")]
            np.testing.assert_array_equal(got[:, cols], want[:, cols])


def test_iat_biflow_is_union_of_same_direction_gaps() -> None:
    # up at 0, 1, 3 s; down at 0.5, 0.75 s: same-direction gaps are up {1, 2}, down {0.25}.
    table = make_flowtable([{"packets": [
        {"ts": 0.0}, {"ts": 0.5, "dir": 1}, {"ts": 0.75, "dir": 1}, {"ts": 1.0}, {"ts": 3.0}]}])
    got = flow_feature_matrix(table.packets["pkt_ts_ns"], table.packets["pkt_dir"],
                              table.packets["pkt_ip_len"], table.pkt_offsets)[0]
    assert got[stat_column("iat", "biflow", "min")] == 0.25
    assert got[stat_column("iat", "biflow", "max")] == 2.0
    assert got[stat_column("iat", "biflow", "mean")] == pytest.approx(3.25 / 3)
    assert got[stat_column("iat", "upstream_flow", "mean")] == 1.5
    assert got[stat_column("iat", "downstream_flow", "max")] == 0.25
    # The packet_data iat series (0.5, 0.25, 0.25, 2.0) would give a different mean.
    assert got[stat_column("iat", "biflow", "mean")] != pytest.approx(3.0 / 4)


def test_one_way_flow_has_nan_blocks() -> None:
    table = make_flowtable([{"packets": [{"ts": 0.0}, {"ts": 0.1}]},
                            {"packets": [{"ts": 0.0, "dir": 1}]}])
    got = flow_feature_matrix(table.packets["pkt_ts_ns"], table.packets["pkt_dir"],
                              table.packets["pkt_ip_len"], table.pkt_offsets)
    down = slice(stat_column("packet_length", "downstream_flow", "min"),
                 stat_column("packet_length", "downstream_flow", "90_percentile") + 1)
    assert np.isnan(got[0, down]).all()
    iat = slice(stat_column("iat", "biflow", "min"), 102)
    assert np.isnan(got[1, iat]).all()  # a single packet has no gap at all
    assert got[1, stat_column("packet_length", "biflow", "mean")] == 40.0


def test_empty_table_gives_empty_matrix() -> None:
    t = FlowTable.empty()
    got = flow_feature_matrix(t.packets["pkt_ts_ns"], t.packets["pkt_dir"],
                              t.packets["pkt_ip_len"], t.pkt_offsets)
    assert got.shape == (0, 102)


# ------------------------------------------------------------------ the real MIRAGE sample

needs_sample = pytest.mark.skipif(not MIRAGE_SAMPLE, reason="no MIRAGE sample in shared/data")


def _sample_flows() -> list[tuple[str, dict]]:
    return [(k, v) for f in MIRAGE_SAMPLE for k, v in json.loads(f.read_text()).items()]


@needs_sample
def test_sample_packet_length_mean_times_count_is_ip_bytes() -> None:
    for _key, rec in _sample_flows():
        meta = rec["flow_metadata"]
        pl = rec["flow_features"]["packet_length"]
        for d, p in zip(DIRECTIONS, ("BF", "UF", "DF"), strict=True):
            n = meta[f"{p}_num_packets"]
            if n == 0:
                assert math.isnan(pl[d]["mean"])
            else:
                assert pl[d]["mean"] * n == pytest.approx(meta[f"{p}_IP_packet_bytes"],
                                                         rel=1e-9)


@needs_sample
def test_sample_iat_stats_recomputed_from_stored_series() -> None:
    checked = 0
    for _key, rec in _sample_flows():
        meta = rec["flow_metadata"]
        if meta["BF_num_packets"] > 32:
            continue  # the stored series is truncated; the stats cover the whole flow
        pd_ = rec["packet_data"]
        t = np.cumsum(np.array(pd_["iat"], dtype=np.float64))
        dirs = np.array(pd_["packet_dir"])
        up = np.diff(t[dirs == 0])
        down = np.diff(t[dirs == 1])
        for d, vals in (("biflow", np.concatenate([up, down])), ("upstream_flow", up),
                        ("downstream_flow", down)):
            want = [rec["flow_features"]["iat"][d][s] for s in STAT_NAMES]
            got = mirage_stats(vals)
            # MIRAGE's times are float epoch seconds: ~1e-7 s of rounding in every gap.
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, equal_nan=True)
            checked += 1
    assert checked > 0


@needs_sample
def test_sample_packet_length_stats_from_series_when_untruncated() -> None:
    # MIRAGE-2019 has no IP length series, but for flows whose packets are all stored,
    # the payload sizes bound the IP lengths: min/max differ by the header sizes only.
    for _key, rec in _sample_flows():
        meta = rec["flow_metadata"]
        if meta["BF_num_packets"] > 32:
            continue
        pl = rec["flow_features"]["packet_length"]["biflow"]
        payload = np.array(rec["packet_data"]["L4_payload_bytes"], dtype=np.float64)
        headers = meta["BF_IP_packet_bytes"] - meta["BF_L4_payload_bytes"]
        assert headers / meta["BF_num_packets"] >= 28  # at least IPv4 + UDP
        assert pl["max"] >= payload.max() + 28


def _c_fast_path():  # the lead's compiled kernel, when it is built
    try:
        from analysis import _fast
    except Exception as err:  # AnalysisError when not built, OSError on a bad .so
        pytest.skip(f"C fast path not available: {err}")
    return _fast


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(flows())
def test_c_fast_path_agrees_with_numba_kernel(spec: list[dict]) -> None:
    fast = _c_fast_path()
    table = make_flowtable(spec)
    args = (table.packets["pkt_ts_ns"], table.packets["pkt_dir"], table.packets["pkt_ip_len"],
            table.pkt_offsets)
    np.testing.assert_allclose(fast.features(*args), flow_feature_matrix(*args), rtol=1e-9,
                               atol=1e-12, equal_nan=True)


@settings(max_examples=200, deadline=None)
@given(packet_lengths)
def test_c_fast_path_stats_agree(values: list[float]) -> None:
    fast = _c_fast_path()
    x = np.array(values, dtype=np.float64)
    np.testing.assert_allclose(fast.stats(x), mirage_stats(x), rtol=1e-9, atol=1e-12,
                               equal_nan=True)
