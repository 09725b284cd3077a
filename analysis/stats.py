"""MIRAGE's 17 per-flow statistics, as numba kernels.

The estimators follow ``shared/spec/mirage-format.md`` §2.3: population variance,
unscaled median absolute deviation, bias-corrected skew and excess kurtosis with
SciPy's fall-backs for small or constant samples (zero variance gives skew 0.0 and
kurtosis -3.0, as SciPy < 1.9 did), and numpy's linear-interpolation percentiles.
Empty input gives 17 NaNs.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from analysis.flowtable import N_STATS, STAT_NAMES

N_STAT = len(STAT_NAMES)  # 17
_PERCENTILES = np.array([10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0])
# numpy's machine epsilon test for "zero variance" (scipy.stats.skew / kurtosis).
_EPS = float(np.finfo(np.float64).eps)


@njit(cache=True, inline="always")
def _lerp(a: float, b: float, t: float) -> float:
    # numpy.percentile's _lerp: the form chosen by t keeps results monotone and bit-equal.
    d = b - a
    if t >= 0.5:
        return b - d * (1.0 - t)
    return a + d * t


@njit(cache=True)
def _median_sorted(x: np.ndarray, n: int) -> float:
    # numpy.median: the middle element, or the mean of the two middle ones.
    h = n // 2
    if n % 2 == 1:
        return x[h]
    return (x[h - 1] + x[h]) / 2.0


@njit(cache=True)
def _stats_sorted(x: np.ndarray, n: int, dev: np.ndarray, out: np.ndarray, o: int) -> None:
    """Write the 17 statistics of the sorted ``x[:n]`` into ``out[o:o+17]``.

    ``dev`` is scratch space of at least n elements (for the absolute deviations).
    """
    if n == 0:
        for k in range(17):
            out[o + k] = np.nan
        return
    total = 0.0
    for i in range(n):
        total += x[i]
    mean = total / n
    m2 = 0.0
    m3 = 0.0
    m4 = 0.0
    for i in range(n):
        d = x[i] - mean
        d2 = d * d
        m2 += d2
        m3 += d2 * d
        m4 += d2 * d2
    m2 /= n
    m3 /= n
    m4 /= n

    out[o + 0] = x[0]
    out[o + 1] = x[n - 1]
    out[o + 2] = mean
    out[o + 3] = np.sqrt(m2)
    out[o + 4] = m2

    # MAD: the deviations from the median, merged from both sides of the sorted array
    # (left side grows outwards, right side too), so no second sort is needed.
    med = _median_sorted(x, n)
    hi = 0
    while hi < n and x[hi] < med:
        hi += 1
    lo = hi - 1
    k = 0
    while lo >= 0 or hi < n:
        if hi >= n or (lo >= 0 and med - x[lo] <= x[hi] - med):
            dev[k] = med - x[lo]
            lo -= 1
        else:
            dev[k] = x[hi] - med
            hi += 1
        k += 1
    out[o + 5] = _median_sorted(dev, n)

    zero = m2 <= (_EPS * mean) ** 2
    if zero:
        out[o + 6] = 0.0
        out[o + 7] = -3.0
    else:
        g1 = m3 / m2**1.5
        if n > 2:
            g1 = np.sqrt((n - 1.0) * n) / (n - 2.0) * g1
        out[o + 6] = g1
        if n > 3:
            out[o + 7] = 1.0 / (n - 2) / (n - 3) * ((n * n - 1.0) * m4 / m2**2.0
                                                    - 3 * (n - 1) ** 2.0)
        else:
            out[o + 7] = m4 / m2**2.0 - 3.0

    for j in range(9):
        pos = (_PERCENTILES[j] / 100.0) * (n - 1)
        i0 = int(np.floor(pos))
        t = pos - i0
        i1 = i0 + 1 if i0 + 1 < n else n - 1
        out[o + 8 + j] = _lerp(x[i0], x[i1], t)


@njit(cache=True)
def mirage_stats_into(values: np.ndarray, out: np.ndarray) -> None:
    """Write MIRAGE's 17 statistics of the 1-D float64 ``values`` into ``out[:17]``."""
    n = values.shape[0]
    x = np.sort(values)
    dev = np.empty(n, dtype=np.float64)
    _stats_sorted(x, n, dev, out, 0)


@njit(cache=True)
def _sort_prefix(x: np.ndarray, n: int) -> None:
    # Most flows are short: insertion sort beats quicksort's set-up below ~32 items.
    if n > 32:
        x[:n].sort()
        return
    for i in range(1, n):
        v = x[i]
        j = i - 1
        while j >= 0 and x[j] > v:
            x[j + 1] = x[j]
            j -= 1
        x[j + 1] = v


@njit(cache=True)
def _merge(u: np.ndarray, nu: int, d: np.ndarray, nd: int, a: np.ndarray) -> int:
    # The biflow set is the union of the two per-direction sets: merging the sorted
    # halves is cheaper than sorting it again.
    i = 0
    j = 0
    k = 0
    while i < nu and j < nd:
        if u[i] <= d[j]:
            a[k] = u[i]
            i += 1
        else:
            a[k] = d[j]
            j += 1
        k += 1
    while i < nu:
        a[k] = u[i]
        i += 1
        k += 1
    while j < nd:
        a[k] = d[j]
        j += 1
        k += 1
    return k


@njit(cache=True)
def _feature_kernel(ts_ns: np.ndarray, dirs: np.ndarray, ip_len: np.ndarray,
                    offs: np.ndarray, out: np.ndarray) -> None:
    n_flows = offs.shape[0] - 1
    max_len = 0
    for f in range(n_flows):
        m = offs[f + 1] - offs[f]
        if m > max_len:
            max_len = m
    # Scratch reused by every flow: no allocation inside the loop.
    a = np.empty(max_len, dtype=np.float64)  # biflow values
    u = np.empty(max_len, dtype=np.float64)  # upstream values
    d = np.empty(max_len, dtype=np.float64)  # downstream values
    dev = np.empty(max_len, dtype=np.float64)
    for f in range(n_flows):
        s = offs[f]
        e = offs[f + 1]
        row = out[f]
        # packet_length: IP total length, all / up / down.
        nu = 0
        nd = 0
        for p in range(s, e):
            v = float(ip_len[p])
            if dirs[p] == 0:
                u[nu] = v
                nu += 1
            else:
                d[nd] = v
                nd += 1
        _sort_prefix(u, nu)
        _sort_prefix(d, nd)
        na = _merge(u, nu, d, nd, a)
        _stats_sorted(a, na, dev, row, 0)
        _stats_sorted(u, nu, dev, row, 17)
        _stats_sorted(d, nd, dev, row, 34)
        # iat: gaps between consecutive packets of the same direction, in seconds;
        # the biflow set is the union of both directions' gaps.
        nu = 0
        nd = 0
        last_u = np.int64(-1)
        last_d = np.int64(-1)
        seen_u = False
        seen_d = False
        for p in range(s, e):
            t = ts_ns[p]
            if dirs[p] == 0:
                if seen_u:
                    u[nu] = (t - last_u) / 1e9
                    nu += 1
                last_u = t
                seen_u = True
            else:
                if seen_d:
                    d[nd] = (t - last_d) / 1e9
                    nd += 1
                last_d = t
                seen_d = True
        _sort_prefix(u, nu)
        _sort_prefix(d, nd)
        na = _merge(u, nu, d, nd, a)
        _stats_sorted(a, na, dev, row, 51)
        _stats_sorted(u, nu, dev, row, 68)
        _stats_sorted(d, nd, dev, row, 85)


def flow_feature_matrix(ts_ns: np.ndarray, dir: np.ndarray, ip_len: np.ndarray,
                        pkt_offsets: np.ndarray) -> np.ndarray:
    """MIRAGE ``flow_features`` of every flow as an (F, 102) float64 matrix.

    Packets are grouped by flow (flow ``i`` is ``[pkt_offsets[i], pkt_offsets[i+1])``, in
    capture order); columns follow :func:`analysis.flowtable.stat_column`.
    """
    offs = np.ascontiguousarray(pkt_offsets, dtype=np.int64)
    n_flows = max(len(offs) - 1, 0)
    out = np.empty((n_flows, N_STATS), dtype=np.float64)
    if n_flows:
        _feature_kernel(np.ascontiguousarray(ts_ns, dtype=np.int64),
                        np.ascontiguousarray(dir, dtype=np.uint8),
                        np.ascontiguousarray(ip_len, dtype=np.int32), offs, out)
    return out


def mirage_stats(values: np.ndarray) -> np.ndarray:
    """The 17 statistics of ``values`` as a new array (convenience for callers and tests)."""
    out = np.empty(N_STAT, dtype=np.float64)
    mirage_stats_into(np.ascontiguousarray(values, dtype=np.float64), out)
    return out
