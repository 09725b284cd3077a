#!/usr/bin/env python3
"""Campus ingest throughput: packets/s per worker with 1 and 2 workers, peak RSS per worker.

Input: a header-only (snap length 128), rotated version of the 1M-packet benchmark
capture, built once into benchmarks/data/campus_bench_<N>/ (N rotated files). Each run
ingests every file into a fresh store (checksums, flows with MIRAGE statistics,
Crypto-PAn, Parquet parts, the commit and the rotation join all count) and reports

  wall time, packets/s in total and per worker, each worker's peak RSS (ru_maxrss,
  reported by the worker itself), and the file tasks' packets per CPU-second (robust to
  other load on the machine; the wall-clock figures are not).

Memory bounded regardless of file size: the same capture rotated into 2 and into 8
files gives each worker 4x more packets per file; peak RSS should not grow with it.

    .venv/bin/python benchmarks/bench_campus.py [--pcap PATH] [--pieces 8] [--repeat 5]

Wall times are the best of --repeat runs; on a machine shared with other work, run it
under ``nice -n -20`` (as root) so that the other load does not decide the figures.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared"
DEFAULT_PCAP = REPO / "benchmarks" / "data" / "bench_1m.pcap"


def rotated(src: Path, pieces: int) -> Path:
    from analysis.campus.pcaptools import split_pcap

    out = src.parent / f"campus_bench_{pieces}"
    if not (out / "done").exists():
        split_pcap(src, out, pieces, basename="campus", snaplen=128)
        (out / "done").write_text("")
    return out


def run(caps: Path, workers: int, key: Path) -> dict:
    from analysis.campus.ingest import FileIngested, ingest

    rss: dict[int, int] = {}
    cpu = [0.0]

    def events(ev: object) -> None:
        if isinstance(ev, FileIngested):
            rss[ev.worker_pid] = max(rss.get(ev.worker_pid, 0), ev.worker_peak_rss_kb)
            cpu[0] += ev.cpu_seconds

    with tempfile.TemporaryDirectory(dir=REPO / "benchmarks" / "data") as tmp:
        t0 = time.perf_counter()
        c0 = os.times()
        s = ingest(caps, Path(tmp) / "store", key, workers=workers, events=events)
        wall = time.perf_counter() - t0
        c1 = os.times()
        total_cpu = (c1.user - c0.user + c1.system - c0.system + c1.children_user
                     - c0.children_user + c1.children_system - c0.children_system)
    return {"wall": wall, "packets": s.packets, "flows": s.flows, "rss_mb": max(rss.values()) / 1024,
            "joined": s.joined_flows, "cpu": cpu[0], "total_cpu": total_cpu}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pcap", type=Path, default=DEFAULT_PCAP)
    ap.add_argument("--pieces", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    if not args.pcap.exists():
        args.pcap.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, str(SHARED / "tools" / "make_bench_pcap.py"),
                        str(SHARED / "data" / "ndpi_pcaps"), str(args.pcap)], check=True)
    from analysis.campus.anonymise import generate_key
    from analysis.campus.ingest import _warm_imports

    _warm_imports()  # imports are start-up, not ingest

    with tempfile.TemporaryDirectory() as kd:
        key = Path(kd) / "campus.key"
        generate_key(key)
        caps = rotated(args.pcap, args.pieces)
        results = {}
        for workers in (1, 2):
            runs = [run(caps, workers, key) for _ in range(args.repeat)]
            wall = min(r["wall"] for r in runs)  # best of N: other load only adds time
            r = runs[0]
            pps = r["packets"] / wall
            results[workers] = pps
            print(f"{workers} worker(s), {args.pieces} files: {r['packets']:,} packets, "
                  f"{r['flows']:,} flows ({r['joined']:,} boundary flows after joining) in "
                  f"{wall:.2f} s = {pps:,.0f} packets/s, {pps / workers:,.0f} per worker; "
                  f"peak RSS per worker {max(x['rss_mb'] for x in runs):.0f} MB; "
                  f"file tasks {r['packets'] / statistics.median(x['cpu'] for x in runs):,.0f} "
                  f"packets per CPU-second; whole run (all processes) "
                  f"{r['packets'] / statistics.median(x['total_cpu'] for x in runs):,.0f} "
                  f"packets per CPU-second")
        print(f"speed-up with 2 workers: {results[2] / results[1]:.2f}x "
              f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")
        big = rotated(args.pcap, 2)
        r = run(big, 2, key)
        print(f"memory check, 2 files of {r['packets'] // 2:,} packets: peak RSS per worker "
              f"{r['rss_mb']:.0f} MB")


if __name__ == "__main__":
    main()
