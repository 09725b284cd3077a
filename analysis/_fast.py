"""ctypes bindings of the C fast path (``analysis/_fastpath.c``).

Every wrapper checks dtypes and contiguity of the numpy arrays it passes, so the C
side can trust its buffers.
"""

from __future__ import annotations

import ctypes
import importlib.util

import numpy as np

from .errors import AnalysisError

_spec = importlib.util.find_spec("analysis._fastpath")
if _spec is None or _spec.origin is None:
    raise AnalysisError(
        "flowtruth's compiled fast path (analysis._fastpath) is not built",
        "reinstall with a C compiler present: bash .ci/setup",
    )
_lib = ctypes.CDLL(_spec.origin)

_P = ctypes.c_void_p
_I = ctypes.c_int64

_lib.ft_walk_pcap.argtypes = [_P, _I, _I, ctypes.c_int, _I, _I, _I, _P, _P, _P, _P, _P]
_lib.ft_walk_pcap.restype = None
_lib.ft_decode.argtypes = [_P, _I, _P, _P, _P, _P, _P]
_lib.ft_decode.restype = None
_lib.ft_rebuild_hash.argtypes = [_I, _P, _P, _I]
_lib.ft_rebuild_hash.restype = None
_lib.ft_assign.argtypes = [_I, _P, _P, _P, _P, _P, _I, _P, _I, _I, _I, _I, *([_P] * 13)]
_lib.ft_assign.restype = None
_lib.ft_partition.argtypes = [_I, _P, _I, _P, _P, _P, _P, _I, _P]
_lib.ft_partition.restype = _I
_lib.ft_counters.argtypes = [_I, _P, _P, _P, _P, _P, _P, _P]
_lib.ft_counters.restype = None
_lib.ft_flow_keys.argtypes = [_I, _P, _P, _P, _P, _P, _P, _P, _P, _P]
_lib.ft_flow_keys.restype = None
_lib.ft_features.argtypes = [_I, _P, _P, _P, _P, _P]
_lib.ft_features.restype = ctypes.c_int
_lib.ft_stats.argtypes = [_I, _P, _P]
_lib.ft_stats.restype = ctypes.c_int


def _p(arr: np.ndarray, dtype) -> int:
    if arr.dtype != dtype or not arr.flags.c_contiguous:
        raise TypeError(f"fast path needs a contiguous {np.dtype(dtype)} array, got {arr.dtype}")
    return arr.ctypes.data


I64 = np.int64
U64 = np.uint64
U8 = np.uint8


def walk_pcap(buf: np.ndarray, start: int, end: int, swapped: bool, frac_ns: int, limit: int,
              rec_off, caplen, wirelen, ts_ns) -> tuple[int, int, int]:
    """Walk pcap records of ``buf[start:end]``: (records found, next position, bad length or -1)."""
    res = np.zeros(3, dtype=I64)
    cap = min(len(rec_off), len(caplen), len(wirelen), len(ts_ns))
    assert 0 <= start <= end <= len(buf)
    _lib.ft_walk_pcap(_p(buf, U8), start, end, int(swapped), frac_ns, limit, cap,
                      _p(rec_off, I64), _p(caplen, I64), _p(wirelen, I64), _p(ts_ns, I64),
                      _p(res, I64))
    return int(res[0]), int(res[1]), int(res[2])


def decode(buf: np.ndarray, rec_off, caplen, linktype, cols, addrs) -> None:
    """Decode the headers of each record into ``cols`` (n x 15) and ``addrs`` (n x 4)."""
    n = len(rec_off)
    assert len(caplen) == n and len(linktype) == n and cols.shape == (n, 15)
    assert addrs.shape == (n, 4)
    if n and int((rec_off + caplen).max()) > len(buf):
        raise ValueError("record extends past the buffer")
    _lib.ft_decode(_p(buf, U8), n, _p(rec_off, I64), _p(caplen, I64), _p(linktype, I64),
                   _p(cols, I64), _p(addrs, U64))


def rebuild_hash(ht, f_key, n_slots: int) -> None:
    _lib.ft_rebuild_hash(len(ht), _p(ht, I64), _p(f_key, U64), n_slots)


def assign(ts, cols, addrs, frame, file_off, nets, idle, active, grace, ht, st, store,
           n_slots: int, n_store: int) -> tuple[int, int]:
    """Assign a batch's packets to flows (st: dict of the f_* state arrays)."""
    n = len(ts)
    assert store.shape[0] >= n_store + n and st["f_first"].shape[0] >= n_slots + n
    assert 2 * (n_slots + n) <= len(ht)
    res = np.array([n_slots, n_store], dtype=I64)
    _lib.ft_assign(n, _p(ts, I64), _p(cols, I64), _p(addrs, U64), _p(frame, I64),
                   _p(file_off, I64), len(nets), _p(nets, U64) if len(nets) else None,
                   idle, active, grace, len(ht), _p(ht, I64), _p(st["f_key"], U64),
                   _p(st["f_first"], I64), _p(st["f_last"], I64), _p(st["f_term"], I64),
                   _p(st["f_state"], I64), _p(st["f_src_a"], I64), _p(st["f_end"], I64),
                   _p(st["f_n"], I64), _p(st["f_mss"], I64), _p(st["f_ws"], I64),
                   _p(store, I64), _p(res, I64))
    return int(res[0]), int(res[1])


def partition(store, n_store: int, n_slots: int, done: np.ndarray, remap: np.ndarray,
              n_em: int) -> tuple[np.ndarray, np.ndarray]:
    """Split off the packets of done slots: (em as S_COLS x n_em, packets per done slot)."""
    counts = np.zeros(max(n_slots, 1), dtype=I64)
    start = np.zeros(max(n_slots, 1), dtype=I64)
    em = np.empty((store.shape[1], n_em), dtype=I64)
    done8 = np.ascontiguousarray(done, dtype=U8)
    got = _lib.ft_partition(n_store, _p(store, I64), n_slots, _p(done8, U8), _p(remap, I64),
                            _p(counts, I64), _p(start, I64), n_em, _p(em, I64))
    if got != n_em:
        raise AssertionError(f"partition: expected {n_em} packets, found {got}")
    return em, counts[:n_slots]


def counters(offs, dirs, ts, iplen, paylen) -> tuple[np.ndarray, np.ndarray]:
    F = len(offs) - 1
    oi = np.empty((F, 9), dtype=I64)
    ot = np.empty((F, 4), dtype=I64)
    _lib.ft_counters(F, _p(offs, I64), _p(dirs, I64), _p(ts, I64), _p(iplen, I64),
                     _p(paylen, I64), _p(oi, I64), _p(ot, I64))
    return oi, ot


def flow_keys(slots, f_key, f_src_a):
    F = len(slots)
    src = np.zeros((F, 16), dtype=U8)
    dst = np.zeros((F, 16), dtype=U8)
    sport, dport, proto, ver = (np.empty(F, dtype=I64) for _ in range(4))
    assert int(slots.max(initial=-1)) < len(f_key)
    _lib.ft_flow_keys(F, _p(slots, I64), _p(f_key, U64), _p(f_src_a, I64), _p(src, U8),
                      _p(dst, U8), _p(sport, I64), _p(dport, I64), _p(proto, I64), _p(ver, I64))
    return src, dst, sport, dport, proto, ver


def features(ts, dirs, iplen, offs) -> np.ndarray:
    """MIRAGE flow_features (F x 102) of packets grouped by ``offs``."""
    F = len(offs) - 1
    ts = np.ascontiguousarray(ts, dtype=I64)
    dirs = np.ascontiguousarray(dirs, dtype=I64)
    iplen = np.ascontiguousarray(iplen, dtype=I64)
    offs = np.ascontiguousarray(offs, dtype=I64)
    assert len(ts) == len(dirs) == len(iplen) and (F == 0 or offs[-1] <= len(ts))
    out = np.empty((F, 102), dtype=np.float64)
    if F and _lib.ft_features(F, _p(ts, I64), _p(dirs, I64), _p(iplen, I64), _p(offs, I64),
                              _p(out, np.float64)) != 0:
        raise MemoryError("no memory for the statistics scratch space")
    return out


def stats(values) -> np.ndarray:
    """MIRAGE's 17 statistics of one array."""
    v = np.ascontiguousarray(values, dtype=np.float64)
    out = np.empty(17, dtype=np.float64)
    if _lib.ft_stats(len(v), _p(v, np.float64), _p(out, np.float64)) != 0:
        raise MemoryError("no memory for the statistics scratch space")
    return out
