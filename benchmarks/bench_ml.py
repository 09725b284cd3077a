"""Speed of the classifier path: RF training, prediction, and loading MIRAGE files.

Targets (issue 8): train a Random Forest (200 trees) on 100,000 flows x MIRAGE features
in <= 60 s; predict >= 50,000 flows/s; load 1,000 MIRAGE JSON files in <= 30 s.

The 100,000 flows are real bi-flows of the nDPI captures (``shared/data/ndpi_pcaps``),
replicated and perturbed (each statistic times N(1, 0.05)); the 1,000 MIRAGE files are
those captures written again and again by our exporter under distinct names.

    .venv/bin/python benchmarks/bench_ml.py [--flows 100000] [--files 1000] [--layout mirage2019]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
PCAPS = REPO.parent / "shared" / "data" / "ndpi_pcaps"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--flows", type=int, default=100_000)
    ap.add_argument("--files", type=int, default=1_000)
    ap.add_argument("--trees", type=int, default=200)
    ap.add_argument("--layout", default="mirage2019", choices=("mirage2019", "mirage2022"))
    args = ap.parse_args()

    from analysis.assemble import read_flows
    from analysis.correlate import correlate, flowkeys_from_table
    from analysis.mirage import write_mirage_dir
    from analysis.ml.datasets import DatasetFilter, apply_filter, from_flowtable, load_dataset
    from analysis.ml.features import FeatureSpec, build_features
    from analysis.ml.models import fit_model, task_labels
    from analysis.ml.ndpi import _captures, session_token
    from analysis.traces.csvlabels import iter_csv_labels, ndpi_flow_labels_to_csv

    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory() as tmp:
        tmpd = Path(tmp)
        generic = tmpd / "labels.csv"
        ndpi_flow_labels_to_csv(PCAPS / "flow_labels.csv", generic)
        tables = []
        for name in _captures(PCAPS / "flow_labels.csv"):
            t = read_flows(PCAPS / name)
            if len(t):
                correlate(flowkeys_from_table(t), iter_csv_labels(generic, pcap=name)).apply(t)
                tables.append((name, t))
        frames = [from_flowtable(t, session_token(n)) for n, t in tables]
        import pandas as pd

        df = pd.concat(frames, ignore_index=True)
        df, _ = apply_filter(df, DatasetFilter())
        X0 = build_features(df, FeatureSpec(("stats",)))
        y0 = task_labels(df["app"], "app")
        rng = np.random.default_rng(0)
        idx = rng.integers(0, len(X0), args.flows)
        noise = rng.normal(1.0, 0.05, (args.flows, X0.shape[1])).astype(np.float32)
        X = X0[idx] * noise
        y = y0[idx]
        print(
            f"training data: {len(X):,} flows x {X.shape[1]} MIRAGE statistics "
            f"(from {len(X0)} real flows), {len(set(y))} classes"
        )

        t0, c0 = time.perf_counter(), time.process_time()
        model = fit_model(X, y, "rf", n_estimators=args.trees, n_jobs=-1)
        fit_s, cpu_s = time.perf_counter() - t0, time.process_time() - c0
        print(
            f"RF fit ({args.trees} trees, n_jobs=-1): {fit_s:.1f} s wall, {cpu_s:.1f} s CPU "
            f"(load average now {os.getloadavg()[0]:.1f})  (target <= 60 s)"
        )

        t0 = time.perf_counter()
        model.predict_proba(X)
        pred_s = time.perf_counter() - t0
        print(f"predict_proba: {len(X) / pred_s:,.0f} flows/s  (target >= 50,000)")

        out = tmpd / "mirage"
        n_files = 0
        k = 0
        while n_files < args.files:
            name, t = tables[k % len(tables)]
            epoch = 1_500_000_000 + k
            written = write_mirage_dir(
                t,
                out,
                session_token(name),
                f"Phone{k % 2}",
                f"02:00:00:00:00:0{k % 2}",
                epoch,
                args.layout,
            )
            n_files += len(written)
            k += 1
        size = sum(f.stat().st_size for f in out.rglob("*.json"))
        t0 = time.perf_counter()
        ds = load_dataset([out])
        load_s = time.perf_counter() - t0
        print(
            f"load {n_files:,} {args.layout} files ({size / 1e6:.0f} MB, {ds.raw_flows:,} "
            f"flows): {load_s:.1f} s  (target <= 30 s)"
        )


if __name__ == "__main__":
    main()
