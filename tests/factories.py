"""Test builders: a valid :class:`FlowTable` from plain per-flow packet lists.

Counters and MIRAGE statistics are computed here with slow, obviously-correct numpy
code (never with ``analysis.stats``), so tests that compare the two cross-check them.

    make_flowtable([{"packets": [{"ts": 0.0}, {"ts": 0.1, "dir": 1}]}])

Flow keys (defaults): ``src_ip`` "192.168.20.105", ``dst_ip`` "203.0.113.7",
``src_port`` 40000 + flow index, ``dst_port`` 443, ``proto`` 6, ``labels`` {},
``mss``/``ws`` (up, down) NaN, ``end_reason`` EOF.
``start`` epoch seconds of the flow (1_700_000_000 + flow index).
Packet keys (defaults): ``ts`` seconds after ``start`` (previous + 0.01), ``dir`` 0, ``payload``
bytes (none), ``payload_len`` len(payload) or 0, ``ip_hdr_len`` 20 (40 for IPv6),
``l4_hdr_len`` 20 TCP / 8 UDP, ``ip_len`` the sum of the three, ``flags`` ACK for
TCP and 0 for UDP, ``win`` 65535 for TCP and 0 for UDP.
"""

from __future__ import annotations

import ipaddress
import math
from typing import Any

import numpy as np

from analysis.flowtable import (
    ACK,
    FLOW_FIELDS,
    N_STATS,
    PACKET_FIELDS,
    CaptureStats,
    EndReason,
    FlowTable,
)

DEFAULT_SRC_IP = "192.168.20.105"
DEFAULT_DST_IP = "203.0.113.7"


def reference_stats(values: list[float] | np.ndarray) -> list[float]:
    """MIRAGE's 17 statistics by their textbook definitions (spec §2.3)."""
    x = np.asarray(values, dtype=np.float64)
    n = len(x)
    if n == 0:
        return [math.nan] * 17
    mean = float(np.mean(x))
    dev = x - mean
    m2 = float(np.mean(dev**2))
    m3 = float(np.mean(dev**3))
    m4 = float(np.mean(dev**4))
    med = float(np.median(x))
    mad = float(np.median(np.abs(x - med)))
    if m2 <= (np.finfo(np.float64).eps * mean) ** 2:  # scipy's "zero variance" test
        skew, kurt = 0.0, -3.0
    else:
        skew = m3 / m2**1.5
        if n > 2:
            skew *= math.sqrt(n * (n - 1)) / (n - 2)
        if n > 3:
            kurt = ((n * n - 1) * m4 / m2**2 - 3 * (n - 1) ** 2) / ((n - 2) * (n - 3))
        else:
            kurt = m4 / m2**2 - 3.0
    pct = [float(np.percentile(x, q)) for q in (10, 20, 30, 40, 50, 60, 70, 80, 90)]
    return [float(x.min()), float(x.max()), mean, math.sqrt(m2), m2, mad, skew, kurt, *pct]


def reference_flow_stats(ts_ns: list[int], dirs: list[int], ip_len: list[int]) -> list[float]:
    """The 102 flow features of one flow (packet_length then iat; biflow, up, down)."""
    up_len = [v for v, d in zip(ip_len, dirs, strict=True) if d == 0]
    down_len = [v for v, d in zip(ip_len, dirs, strict=True) if d == 1]
    up_t = [t for t, d in zip(ts_ns, dirs, strict=True) if d == 0]
    down_t = [t for t, d in zip(ts_ns, dirs, strict=True) if d == 1]
    up_iat = [(b - a) / 1e9 for a, b in zip(up_t, up_t[1:], strict=False)]
    down_iat = [(b - a) / 1e9 for a, b in zip(down_t, down_t[1:], strict=False)]
    out: list[float] = []
    for vals in (list(ip_len), up_len, down_len, up_iat + down_iat, up_iat, down_iat):
        out.extend(reference_stats(vals))
    return out


def _addr16(ip: str) -> tuple[int, bytes]:
    a = ipaddress.ip_address(ip)
    return a.version, a.packed.ljust(16, b"\0")


def make_flowtable(flows: list[dict[str, Any]], *, payload: bool | None = None) -> FlowTable:
    """A FlowTable of ``flows`` (see module docstring), counters and stats filled in.

    Raw payloads are kept when ``payload`` is True, or (by default) when any packet
    gives ``payload`` bytes.
    """
    if payload is None:
        payload = any("payload" in p for f in flows for p in f.get("packets", []))
    fcols: dict[str, list[Any]] = {name: [] for name in FLOW_FIELDS}
    pcols: dict[str, list[Any]] = {name: [] for name in PACKET_FIELDS}
    offsets = [0]
    payload_parts: list[bytes] = []
    label_names: list[str] = []
    for f in flows:
        for name in f.get("labels", {}):
            if name not in label_names:
                label_names.append(name)
    labels: dict[str, list[Any]] = {name: [] for name in label_names}
    frame = 0
    cap = CaptureStats()
    for i, f in enumerate(flows):
        proto = int(f.get("proto", 6))
        version, src = _addr16(f.get("src_ip", DEFAULT_SRC_IP))
        version2, dst = _addr16(f.get("dst_ip", DEFAULT_DST_IP))
        assert version == version2, "src and dst must be the same IP version"
        pkts = f.get("packets") or [{}]
        ts_ns: list[int] = []
        dirs: list[int] = []
        ip_lens: list[int] = []
        pay_lens: list[int] = []
        start = f.get("start", 1_700_000_000 + i)
        start_ns = start * 10**9 if isinstance(start, int) else round(start * 1e9)
        last_ns = start_ns
        for j, p in enumerate(pkts):
            # Times are kept in integer ns from the flow start, so 0.01 s is exactly 10 ms.
            if "ts" in p:
                ns = start_ns + round(float(p["ts"]) * 1e9)
            else:
                ns = last_ns if j == 0 else last_ns + 10_000_000
            last_ns = ns
            raw = bytes(p.get("payload", b""))
            plen = int(p.get("payload_len", len(raw)))
            ip_hdr = int(p.get("ip_hdr_len", 20 if version == 4 else 40))
            l4_hdr = int(p.get("l4_hdr_len", 20 if proto == 6 else 8))
            ts_ns.append(ns)
            dirs.append(int(p.get("dir", 0)))
            ip_lens.append(int(p.get("ip_len", ip_hdr + l4_hdr + plen)))
            pay_lens.append(plen)
            pcols["pkt_ts_ns"].append(ts_ns[-1])
            pcols["pkt_dir"].append(dirs[-1])
            pcols["pkt_ip_len"].append(ip_lens[-1])
            pcols["pkt_ip_hdr_len"].append(ip_hdr)
            pcols["pkt_l4_hdr_len"].append(l4_hdr)
            pcols["pkt_payload_len"].append(plen)
            pcols["pkt_tcp_flags"].append(int(p.get("flags", ACK if proto == 6 else 0)))
            pcols["pkt_tcp_win"].append(int(p.get("win", 65535 if proto == 6 else 0)))
            pcols["pkt_frame"].append(frame)
            payload_parts.append(raw)
            frame += 1
        offsets.append(offsets[-1] + len(pkts))
        up = [k for k, d in enumerate(dirs) if d == 0]
        down = [k for k, d in enumerate(dirs) if d == 1]
        fcols["ip_version"].append(version)
        fcols["src_addr"].append(np.frombuffer(src, dtype=np.uint8))
        fcols["dst_addr"].append(np.frombuffer(dst, dtype=np.uint8))
        fcols["src_port"].append(int(f.get("src_port", 40000 + i)))
        fcols["dst_port"].append(int(f.get("dst_port", 443)))
        fcols["proto"].append(proto)
        fcols["first_ts_ns"].append(min(ts_ns))
        fcols["last_ts_ns"].append(max(ts_ns))
        fcols["end_reason"].append(int(f.get("end_reason", EndReason.EOF)))
        for prefix, idx in (("bf", list(range(len(dirs)))), ("uf", up), ("df", down)):
            fcols[f"{prefix}_packets"].append(len(idx))
            fcols[f"{prefix}_ip_bytes"].append(sum(ip_lens[k] for k in idx))
            fcols[f"{prefix}_payload_bytes"].append(sum(pay_lens[k] for k in idx))
        for prefix, idx in (("uf", up), ("df", down)):
            fcols[f"{prefix}_first_ts_ns"].append(ts_ns[idx[0]] if idx else -1)
            fcols[f"{prefix}_last_ts_ns"].append(ts_ns[idx[-1]] if idx else -1)
        mss = f.get("mss", (math.nan, math.nan))
        ws = f.get("ws", (math.nan, math.nan))
        fcols["uf_mss"].append(float(mss[0]))
        fcols["df_mss"].append(float(mss[1]))
        fcols["uf_ws"].append(float(ws[0]))
        fcols["df_ws"].append(float(ws[1]))
        fcols["stats"].append(reference_flow_stats(ts_ns, dirs, ip_lens))
        for name in label_names:
            labels[name].append(f.get("labels", {}).get(name))
        cap.packets += len(pkts)
        cap.packets_in_flows += len(pkts)
        cap.bytes += sum(ip_lens)
        first, last = min(ts_ns), max(ts_ns)
        cap.first_ts_ns = first if cap.first_ts_ns is None else min(cap.first_ts_ns, first)
        cap.last_ts_ns = last if cap.last_ts_ns is None else max(cap.last_ts_ns, last)

    table = FlowTable.empty()
    for name, dt in FLOW_FIELDS.items():
        if not flows:
            continue
        if isinstance(dt, tuple):
            table.flows[name] = np.array(fcols[name], dtype=dt[0]).reshape(len(flows), dt[1])
        else:
            table.flows[name] = np.array(fcols[name], dtype=dt)
    for name, dt in PACKET_FIELDS.items():
        table.packets[name] = np.array(pcols[name], dtype=dt)
    table.pkt_offsets = np.array(offsets, dtype=np.int64)
    assert table.flows["stats"].shape == (len(flows), N_STATS)
    if payload:
        table.payload = b"".join(payload_parts)
        table.payload_offsets = np.zeros(len(payload_parts) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in payload_parts], out=table.payload_offsets[1:])
    for name, vals in labels.items():
        col = np.empty(len(flows), dtype=object)
        col[:] = vals
        table.labels[name] = col
    table.capture = cap
    table.source = "factory"
    return table
