"""Per-flow predictions of a saved model on captures, MIRAGE files, Parquet or a flow store."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from analysis.errors import BadInputError, OutputError

KEEP_COLUMNS = (
    "session",
    "src_ip",
    "src_port",
    "dst_ip",
    "dst_port",
    "proto",
    "app",
    "labeling_type",
    "source_file",
)
OUT_SUFFIXES = (".csv", ".parquet", ".json")


def predict_frame(model: Any, df: Any) -> Any:
    """``df``'s key columns plus ``predicted``, ``confidence`` and ``p_<label>`` columns."""
    import pandas as pd

    from analysis.ml.features import build_features

    X = build_features(df, model.features)
    proba = model.predict_proba(X) if len(df) else np.zeros((0, len(model.labels)))
    out = df[list(KEEP_COLUMNS)].rename(columns={"app": "label"}).copy()
    best = np.argmax(proba, axis=1) if len(df) else np.zeros(0, dtype=int)
    out["predicted"] = np.asarray(model.labels, dtype=object)[best]
    out["confidence"] = proba.max(axis=1) if len(df) else np.zeros(0)
    probs = pd.DataFrame(proba, columns=[f"p_{lab}" for lab in model.labels], index=out.index)
    return pd.concat([out, probs], axis=1)


def predict_inputs(
    model_dir: str | os.PathLike[str], inputs: Sequence[str | os.PathLike[str]]
) -> tuple[Any, dict[str, int]]:
    """Load the model and every flow of ``inputs`` (unfiltered); predictions and counts."""
    from analysis.ml.datasets import DatasetFilter, load_dataset
    from analysis.ml.models import load_model

    model = load_model(model_dir)
    ds = load_dataset(
        inputs, DatasetFilter(drop_background=False, drop_dns=False), allow_captures=True
    )
    frame = predict_frame(model, ds.frame)
    counts = frame["predicted"].value_counts()
    return frame, {str(k): int(v) for k, v in counts.items()}


def write_predictions(frame: Any, out: str | os.PathLike[str]) -> Path:
    """Write predictions as CSV, Parquet or JSON records (chosen by the suffix)."""
    p = Path(out)
    suffix = p.suffix.lower()
    if suffix not in OUT_SUFFIXES:
        raise BadInputError(
            f"{p}: unknown predictions format", hint=f"name a {', '.join(OUT_SUFFIXES)} file"
        )
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        if suffix == ".csv":
            frame.to_csv(p, index=False)
        elif suffix == ".parquet":
            frame.to_parquet(p, index=False)
        else:
            frame.to_json(p, orient="records", indent=1)
    except OSError as err:
        raise OutputError(f"cannot write {p}: {err.strerror or err}") from err
    return p
