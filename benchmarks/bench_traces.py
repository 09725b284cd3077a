"""Speed of the socket-event parsers and the correlator.

Targets: parse >= 300,000 strace lines/s; correlate 100,000 flows against 1,000,000
socket events in <= 10 s. Run: ``.venv/bin/python benchmarks/bench_traces.py [--lines N]``.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis.correlate import FlowKeys, correlate  # noqa: E402
from analysis.traces.model import KIND_CODE, SOURCE_CODE, ObservationSet, ParseStats  # noqa: E402
from analysis.traces.strace import iter_socket_observations, iter_syscalls  # noqa: E402


def make_strace_lines(n: int, seed: int = 1) -> list[str]:
    """A launcher-shaped log (-f -ttt -yy) of n lines: TCP and UDP sockets over their life."""
    rng = random.Random(seed)
    out: list[str] = []
    t = 1732800000.0
    fd = 50
    while len(out) < n:
        tid = rng.choice((4242, 4243, 4250, 4251))
        fd = 50 + (fd - 49) % 200
        lport = rng.randrange(32768, 60999)
        rip = f"157.240.{rng.randrange(256)}.{rng.randrange(256)}"
        t += 0.0005
        if rng.random() < 0.7:
            ino = rng.randrange(10**6)
            dec = f"{fd}<TCP:[10.0.0.5:{lport}->{rip}:443]>"
            out.append(f"{tid}  {t:.6f} socket(AF_INET, SOCK_STREAM|SOCK_CLOEXEC, IPPROTO_IP) = {fd}<TCP:[{ino}]>")
            out.append(f"{tid}  {t:.6f} connect({fd}<TCP:[{ino}]>, {{sa_family=AF_INET, sin_port=htons(443), "
                       f"sin_addr=inet_addr(\"{rip}\")}}, 16) = -1 EINPROGRESS (Operation now in progress)")
            out.append(f"{tid}  {t:.6f} getsockopt({fd}<TCP:[{ino}]>, SOL_SOCKET, SO_ERROR, [0], [4]) = 0")
            for _ in range(rng.randrange(1, 6)):
                out.append(f"{tid}  {t:.6f} sendto({dec}, \"\\x17\\x03\\x03\\x00\"..., 517, MSG_NOSIGNAL, NULL, 0) = 517")
                out.append(f"{tid}  {t:.6f} recvfrom({dec},  <unfinished ...>")
                out.append(f"{tid}  {t:.6f} <... recvfrom resumed>\"\\x17\\x03\\x03\"..., 16384, 0, NULL, NULL) = 1200")
            out.append(f"{tid}  {t:.6f} close({dec}) = 0 <0.000030>")
        else:
            dec = f"{fd}<UDP:[0.0.0.0:{lport}]>"
            out.append(f"{tid}  {t:.6f} socket(AF_INET, SOCK_DGRAM|SOCK_CLOEXEC, IPPROTO_IP) = {fd}<UDP:[77]>")
            for _ in range(rng.randrange(1, 8)):
                out.append(f"{tid}  {t:.6f} sendto({dec}, \"\\x00\\x01\"..., 120, 0, {{sa_family=AF_INET, "
                           f"sin_port=htons(3478), sin_addr=inet_addr(\"{rip}\")}}, 16) = 120")
                out.append(f"{tid}  {t:.6f} recvfrom({dec}, \"\\x01\\x01\"..., 2048, 0, {{sa_family=AF_INET, "
                           f"sin_port=htons(3478), sin_addr=inet_addr(\"{rip}\")}}, [16]) = 96")
            out.append(f"{tid}  {t:.6f} close({dec}) = 0")
    return [line + "\n" for line in out[:n]]


def bench_parse(n_lines: int) -> None:
    lines = make_strace_lines(n_lines)
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "strace.4242.com.example.log"
        p.write_text("".join(lines))
        size = os.path.getsize(p)
        st = ParseStats()
        t0, c0 = time.perf_counter(), time.process_time()
        n = sum(1 for _ in iter_syscalls(p, stats=st))
        dt, ct = time.perf_counter() - t0, time.process_time() - c0
        print(f"iter_syscalls: {n_lines:,} lines ({size / 1e6:.0f} MB) in {dt:.2f} s = "
              f"{n_lines / dt:,.0f} lines/s wall, {n_lines / ct:,.0f} lines/s of CPU "
              f"({n:,} syscalls, {st.n_skipped} skipped; load {os.getloadavg()[0]:.1f})")
        st = ParseStats()
        t0, c0 = time.perf_counter(), time.process_time()
        n = sum(1 for _ in iter_socket_observations(p, stats=st))
        dt, ct = time.perf_counter() - t0, time.process_time() - c0
        print(f"iter_socket_observations: {n_lines / dt:,.0f} lines/s wall, "
              f"{n_lines / ct:,.0f} lines/s of CPU ({n:,} observations)")
        t0 = time.perf_counter()
        obs = ObservationSet.from_observations(iter_socket_observations(p))
        dt = time.perf_counter() - t0
        print(f"  ... packed into an ObservationSet: {n_lines / dt:,.0f} lines/s, "
              f"{sum(getattr(obs, c).nbytes for c in ObservationSet._COLS) / 1e6:.0f} MB of columns")


def make_correlation_case(n_flows: int, n_events: int, n_apps: int = 20, seed: int = 2
                          ) -> tuple[FlowKeys, ObservationSet, np.ndarray]:
    """Flows and the socket events that made them (plus port reuse by other apps)."""
    rng = np.random.default_rng(seed)
    t0 = 1732800000.0
    span = 3600.0
    proto = np.where(rng.random(n_flows) < 0.7, 6, 17)
    lport = rng.integers(32768, 61000, n_flows)
    rip_i = rng.integers(0, 5000, n_flows)
    ips = [f"31.13.{i // 256}.{i % 256}" for i in range(5000)]
    rport = np.where(proto == 6, 443, 3478)
    first = np.sort(rng.random(n_flows) * span) + t0
    dur = rng.exponential(5.0, n_flows)
    last = first + dur
    app = rng.integers(0, n_apps, n_flows)
    offset = 0.8  # phone ahead of the AP
    # events per flow: connect + sends spread over the flow + close
    per = max(2, n_events // n_flows)
    m = per * n_flows
    fi = np.repeat(np.arange(n_flows), per)
    k = np.tile(np.arange(per), n_flows)
    frac = k / (per - 1)
    ts = first[fi] + frac * dur[fi] + offset + rng.normal(0, 0.002, m)
    kind = np.where(k == 0, KIND_CODE["connect"], np.where(k == per - 1, KIND_CODE["close"],
                                                           KIND_CODE["send"]))
    strings = ips + [f"com.example.app{i}" for i in range(n_apps)]
    obs = ObservationSet(
        ts=ts, end_ts=np.full(m, np.nan), proto=proto[fi].astype(np.uint8),
        local_ip=np.full(m, -1, np.int32),
        local_port=np.where(k == 0, -1, lport[fi]).astype(np.int32),  # connect: port unknown
        remote_ip=rip_i[fi].astype(np.int32), remote_port=rport[fi].astype(np.int32),
        kind=kind.astype(np.uint8), source=np.full(m, SOURCE_CODE["strace"], np.uint8),
        pid=np.full(m, 100, np.int32), uid=np.full(m, -1, np.int32),
        process=(5000 + app[fi]).astype(np.int32), label=(5000 + app[fi]).astype(np.int32),
        sublabel=(5000 + app[fi]).astype(np.int32), labeling_type=np.full(m, -1, np.int32),
        sock=(fi + 1).astype(np.int64), strings=strings,
    )
    fk = FlowKeys(proto=proto, src_ip=np.full(n_flows, "10.0.0.5", dtype=object),
                  src_port=lport, dst_ip=np.array([ips[i] for i in rip_i], dtype=object),
                  dst_port=rport, first_ts=first, last_ts=last, has_syn=proto == 6,
                  syn_ts=first)
    truth = np.array([strings[5000 + a] for a in app], dtype=object)
    return fk, obs, truth


def bench_correlate(n_flows: int, n_events: int) -> None:
    fk, obs, truth = make_correlation_case(n_flows, n_events)
    t0, c0 = time.perf_counter(), time.process_time()
    res = correlate(fk, obs, clock_offset=0.0)
    dt, ct = time.perf_counter() - t0, time.process_time() - c0
    lab = res.labels["BF_label"]
    typ = res.labels["BF_labeling_type"]
    exact = typ == "exact"
    wrong = int((exact & (lab != truth)).sum())
    print(f"correlate: {n_flows:,} flows x {len(obs):,} events in {dt:.2f} s ({ct:.2f} s CPU); "
          f"exact {int(exact.sum()):,}, wrong {wrong}, ambiguous {res.report['ambiguous']:,}, "
          f"clock offset {res.clock_offset:.3f} s (residual p95 "
          f"{res.report['clock'].get('residual_p95', float('nan')):.4f} s)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lines", type=int, default=1_000_000)
    ap.add_argument("--flows", type=int, default=100_000)
    ap.add_argument("--events", type=int, default=1_000_000)
    a = ap.parse_args()
    bench_parse(a.lines)
    bench_correlate(a.flows, a.events)


if __name__ == "__main__":
    main()
