"""Scoring every flow of a campus store with a trained classifier.

A model is anything with ``features`` (an :class:`analysis.ml.features.FeatureSpec`),
``labels``, ``task`` (``app``, ``genre`` or ``ovr``), ``messaging_apps`` and
``predict_proba(X) -> (F, len(labels))`` - what :func:`analysis.ml.models.load_model`
returns for a ``flowtruth train`` directory. Each store file is scored on its own (in
parallel workers or on a Dask cluster) and its predictions are written beside the
store as a column set keyed by ``flow_id``:
``_predictions/model=<id>/date=.../hour=.../<same file name>`` with
``messaging_proba`` (probability that the flow is encrypted-messaging traffic),
``is_messaging``, ``predicted_app`` and ``app_proba``. A file whose predictions are
newer than it is not scored again.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from analysis.errors import BadInputError, FlowtruthError

from .parquet_out import write_atomic
from .store import PREDICTIONS, Store

MESSAGING = "messaging"


@dataclass(frozen=True)
class PartScored:
    path: str
    flows: int
    seconds: float


@dataclass
class PredictSummary:
    model_id: str
    parts: int = 0
    skipped: int = 0
    flows: int = 0
    seconds: float = 0.0
    failed: list[tuple[str, str]] = field(default_factory=list)

    def line(self) -> str:
        return (f"{self.flows:,} flows scored in {self.parts} file(s) "
                f"({self.skipped} already scored) with model {self.model_id} "
                f"in {self.seconds:.1f} s")


def store_frame(arrow: Any) -> Any:
    """The dataset columns a classifier's features read, from store rows (pandas)."""
    import pandas as pd

    from analysis.ml.datasets import STAT_COLUMNS

    def col(name: str) -> np.ndarray:
        return arrow.column(name).to_numpy()

    out: dict[str, Any] = {}
    for p, pre in (("BF", "bf"), ("UF", "uf"), ("DF", "df")):
        out[f"{p}_num_packets"] = col(f"{pre}_packets").astype(np.float64)
        out[f"{p}_IP_packet_bytes"] = col(f"{pre}_ip_bytes").astype(np.float64)
        out[f"{p}_L4_payload_bytes"] = col(f"{pre}_payload_bytes").astype(np.float64)
    out["BF_duration"] = (col("last_ts_ns") - col("first_ts_ns")) / 1e9
    for p, pre in (("UF", "uf"), ("DF", "df")):
        d = (col(f"{pre}_last_ts_ns") - col(f"{pre}_first_ts_ns")) / 1e9
        out[f"{p}_duration"] = np.where(col(f"{pre}_packets") > 0, d, 0.0)
    for c in STAT_COLUMNS:
        out[c] = col(c)
    out["proto"] = col("proto").astype(np.int64)
    out["dst_port"] = col("dst_port").astype(np.int64)
    out["dst_ip"] = arrow.column("dst_ip").to_pylist()
    return pd.DataFrame(out)


def _needed_columns() -> list[str]:
    from analysis.ml.datasets import STAT_COLUMNS

    base = ["flow_id", "proto", "dst_port", "dst_ip", "first_ts_ns", "last_ts_ns"]
    for pre in ("bf", "uf", "df"):
        base += [f"{pre}_packets", f"{pre}_ip_bytes", f"{pre}_payload_bytes"]
    for pre in ("uf", "df"):
        base += [f"{pre}_first_ts_ns", f"{pre}_last_ts_ns"]
    return base + list(STAT_COLUMNS)


def messaging_scores(model: Any, proba: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(messaging probability, predicted app or label, its probability) per flow."""
    labels = [str(x) for x in model.labels]
    best = np.argmax(proba, axis=1) if proba.shape[1] else np.zeros(len(proba), dtype=int)
    app = np.asarray(labels, dtype=object)[best] if labels else np.full(len(proba), None)
    app_p = proba[np.arange(len(proba)), best] if proba.shape[1] else np.zeros(len(proba))
    if model.task == "genre":
        msg = proba[:, labels.index(MESSAGING)] if MESSAGING in labels else np.zeros(len(proba))
    else:
        cols = [j for j, lab in enumerate(labels) if lab in set(model.messaging_apps)]
        if not cols:
            msg = np.zeros(len(proba))
        elif model.task == "ovr":
            msg = proba[:, cols].max(axis=1)
        else:
            msg = proba[:, cols].sum(axis=1)
    return np.clip(msg, 0.0, 1.0), app, app_p


def check_model(model: Any) -> None:
    if "series" in model.features.sets:
        raise BadInputError("this model needs packet series, which the campus store does not keep",
                            "train one on flow statistics: flowtruth train --features stats,counters")


_MODELS: dict[str, Any] = {}


def _load(model_dir: str) -> Any:
    m = _MODELS.get(model_dir)
    if m is None:
        from analysis.ml.models import load_model

        m = load_model(model_dir)
        check_model(m)
        _MODELS.clear()
        _MODELS[model_dir] = m
    return m


def score_file(src: str, dest: str, model: Any) -> int:
    """Predictions of one store file written to ``dest``; returns the number of flows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if isinstance(model, str):
        model = _load(model)
    arrow = pq.read_table(src, columns=_needed_columns())
    n = arrow.num_rows
    if n:
        from analysis.ml.features import build_features

        X = build_features(store_frame(arrow), model.features)
        proba = np.asarray(model.predict_proba(X), dtype=np.float64)
    else:
        proba = np.zeros((0, len(model.labels)))
    msg, app, app_p = messaging_scores(model, proba)
    out = pa.table({
        "flow_id": arrow.column("flow_id"),
        "messaging_proba": pa.array(msg.astype(np.float32)),
        "is_messaging": pa.array(msg >= 0.5),
        "predicted_app": pa.array([None if a is None else str(a) for a in app.tolist()],
                                  type=pa.string()),
        "app_proba": pa.array(np.asarray(app_p, dtype=np.float32)),
    })
    write_atomic(out, dest)
    return n


def _score_task(args: tuple[str, str, str]) -> tuple[str, int, float, str]:
    src, dest, model_dir = args
    t0 = time.perf_counter()
    try:
        return src, score_file(src, dest, model_dir), time.perf_counter() - t0, ""
    except FlowtruthError as err:
        return src, 0, 0.0, err.one_line()


def model_id_of(model_dir: str | os.PathLike[str]) -> str:
    from analysis.ml.models import read_model_metadata

    meta = read_model_metadata(model_dir)
    return str(meta.get("sha256", ""))[:12] or Path(model_dir).name


def predict_store(
    store_dir: str | os.PathLike[str],
    model_dir: str | os.PathLike[str],
    *,
    workers: int = 1,
    client: Any = None,
    events: Callable[[object], None] | None = None,
) -> PredictSummary:
    """Score every store file not yet scored by this model (see the module docstring)."""
    emit = events or (lambda _e: None)
    t0 = time.perf_counter()
    store = Store(store_dir)
    model_dir = os.path.abspath(os.fspath(model_dir))
    mid = model_id_of(model_dir)
    model = _load(model_dir)  # fail early, in this process, on a bad or unsuitable model
    out_root = store.root / PREDICTIONS / f"model={mid}"
    tasks = []
    summary = PredictSummary(mid)
    live = set()
    for part in sorted(store.root.glob("date=*/hour=*/*.parquet")):
        rel = part.relative_to(store.root)
        dest = out_root / rel
        live.add(dest)
        if dest.exists() and dest.stat().st_mtime_ns >= part.stat().st_mtime_ns:
            summary.skipped += 1
            continue
        tasks.append((str(part), str(dest), model_dir))
    for old in out_root.glob("date=*/hour=*/*.parquet"):
        if old not in live:
            old.unlink(missing_ok=True)  # its flows file was replaced or removed
    from .ingest import Runner

    runner = Runner(workers if len(tasks) > 1 else 1, client)
    try:
        if runner.pool is None and client is None:
            results: Iterable[tuple[str, int, float, str]] = (
                _score_task_local(t, model) for t in tasks)
        else:
            results = runner.run(_score_task, tasks)
        for src, n, secs, err in results:
            if err:
                summary.failed.append((src, err))
                continue
            summary.parts += 1
            summary.flows += n
            emit(PartScored(src, n, secs))
    finally:
        runner.close()
    summary.seconds = time.perf_counter() - t0
    return summary


def _score_task_local(t: tuple[str, str, str], model: Any) -> tuple[str, int, float, str]:
    t0 = time.perf_counter()
    try:
        return t[0], score_file(t[0], t[1], model), time.perf_counter() - t0, ""
    except FlowtruthError as err:
        return t[0], 0, 0.0, err.one_line()


HOURLY_SQL = """
SELECT f.date, f.hour, p.model, count(*) AS flows,
       avg(CASE WHEN p.is_messaging THEN 1.0 ELSE 0.0 END) AS messaging_flow_share,
       sum(CASE WHEN p.is_messaging THEN f.bf_ip_bytes ELSE 0 END) / sum(f.bf_ip_bytes)::DOUBLE
           AS messaging_byte_share
FROM flows f JOIN predictions p USING (flow_id)
WHERE p.model = '{model}'
GROUP BY f.date, f.hour, p.model ORDER BY f.date, f.hour
"""


def hourly_share(store_dir: str | os.PathLike[str], model_id: str) -> Any:
    """Share of messaging flows and bytes per hour under one model (pyarrow Table)."""
    from .query import query

    return query(store_dir, HOURLY_SQL.format(model=model_id.replace("'", "''")))


def plot_hourly(table: Any, out: str | os.PathLike[str]) -> Path:
    """A PNG of the hourly messaging shares."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    rows = table.to_pylist()
    x = [f"{r['date']} {int(r['hour']):02d}h" for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(x) + 2), 4))
    ax.plot(range(len(x)), [r["messaging_flow_share"] for r in rows], marker="o",
            label="flows")
    ax.plot(range(len(x)), [r["messaging_byte_share"] or 0.0 for r in rows], marker="s",
            label="bytes")
    ax.set_xticks(range(len(x)))
    ax.set_xticklabels(x, rotation=60, ha="right", fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_ylabel("encrypted-messaging share")
    ax.set_title("Encrypted-messaging traffic per hour")
    ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
