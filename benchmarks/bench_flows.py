#!/usr/bin/env python3
"""Side-by-side benchmark: `flowtruth flows` against NFStream on the 1M-packet capture.

Both run as whole processes (start-up and imports count, as a user feels them):
  flowtruth flows bench_1m.pcap --format parquet -o OUT
  python -c 'for f in NFStreamer(source, n_dissections=0, statistical_analysis=True,
                                 splt_analysis=20): pass'
Wall time and peak RSS (per process, from wait4) are the median of --repeat runs.

    .venv/bin/python benchmarks/bench_flows.py [--pcap PATH] [--repeat 3]

The capture is built once with ../shared/tools/make_bench_pcap.py (needs dpkt).
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
SHARED = REPO.parent / "shared"
DEFAULT_PCAP = REPO / "benchmarks" / "data" / "bench_1m.pcap"

NFSTREAM = """
import sys
from nfstream import NFStreamer
n = 0
for f in NFStreamer(source=sys.argv[1], n_dissections=0, statistical_analysis=True,
                    splt_analysis=20):
    n += 1
print(n)
"""

DPKT = """
import sys, dpkt
n = 0
with open(sys.argv[1], 'rb') as fh:
    for ts, buf in dpkt.pcap.Reader(fh):
        eth = dpkt.ethernet.Ethernet(buf)
        n += 1
print(n)
"""


def run(argv: list[str]) -> tuple[float, int, str]:
    t0 = time.perf_counter()
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    out = p.stdout.read() if p.stdout else ""
    err = p.stderr.read() if p.stderr else ""
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise SystemExit(f"{argv[0]} failed ({p.returncode}): {err.strip()[-500:]}")
    return wall, ru.ru_maxrss, out.strip()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pcap", type=Path, default=DEFAULT_PCAP)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--packets", type=int, default=1_000_000)
    ap.add_argument("--no-dpkt", action="store_true")
    args = ap.parse_args()
    if not args.pcap.exists():
        args.pcap.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, str(SHARED / "tools" / "make_bench_pcap.py"),
                        str(SHARED / "data" / "ndpi_pcaps"), str(args.pcap)], check=True)
    flowtruth = str(Path(sys.executable).with_name("flowtruth"))
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "flows.parquet")
        tools = {
            "flowtruth flows --format parquet": [flowtruth, "flows", str(args.pcap), "--format",
                                                 "parquet", "-o", out],
            "NFStream 6.6 (statistical_analysis, splt 20)": [sys.executable, "-c", NFSTREAM,
                                                             str(args.pcap)],
        }
        if not args.no_dpkt:
            tools["dpkt pcap.Reader + Ethernet parse (no flows)"] = [sys.executable, "-c", DPKT,
                                                                     str(args.pcap)]
        run(tools["flowtruth flows --format parquet"])  # warm the page cache
        results = {}
        for name, argv in tools.items():
            runs = [run(argv) for _ in range(args.repeat)]
            wall = statistics.median(r[0] for r in runs)
            rss = statistics.median(r[1] for r in runs)
            results[name] = (wall, rss, runs[-1][2])
    ft_wall, ft_rss, ft_out = results["flowtruth flows --format parquet"]
    nf_wall, nf_rss, _ = results["NFStream 6.6 (statistical_analysis, splt 20)"]
    print(f"capture: {args.pcap} ({os.path.getsize(args.pcap) / 1e6:.0f} MB, "
          f"{args.packets:,} packets); median of {args.repeat} runs on {os.cpu_count()} cores")
    print(f"flowtruth: {ft_out}")
    print("| tool | wall s | packets/s | peak RSS MB |")
    print("|---|---|---|---|")
    for name, (wall, rss, _) in results.items():
        print(f"| {name} | {wall:.2f} | {args.packets / wall:,.0f} | {rss / 1024:.0f} |")
    print(f"speed-up over NFStream: {nf_wall / ft_wall:.1f}x; "
          f"peak RSS ratio flowtruth/NFStream: {ft_rss / nf_rss:.2f}")


if __name__ == "__main__":
    main()
