"""Classifiers, safe saving and loading, protocols, metrics, importance and reports on
the nDPI captures labelled from flow_labels.csv."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import pytest

from analysis.errors import BadInputError, SchemaError

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
PCAPS = DATA / "ndpi_pcaps"
pytestmark = pytest.mark.skipif(
    not (PCAPS / "flow_labels.csv").exists(), reason="shared data not found"
)
TREES = 15


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from analysis.ml.datasets import load_dataset
    from analysis.ml.ndpi import build_ndpi_dataset

    out = tmp_path_factory.mktemp("ndpi") / "pq"
    build_ndpi_dataset(PCAPS, out, "parquet")
    return load_dataset([out])


@pytest.fixture(scope="module")
def xy(dataset):
    from analysis.ml.features import FeatureSpec, build_features
    from analysis.ml.models import task_labels

    spec = FeatureSpec(("stats", "series", "counters"), 10)
    return build_features(dataset.frame, spec), task_labels(dataset.frame["app"], "app"), spec


def pseudo_devices(df) -> dict[str, str]:
    """Captures split deterministically over two pseudo-phones (no two-phone lab data yet)."""
    return {
        s: ("PhoneA" if zlib.crc32(s.encode()) % 2 else "PhoneB")
        for s in sorted(set(df["session"]))
    }


@pytest.mark.parametrize("kind", ["rf", "extratrees", "hgb", "knn", "majority"])
def test_every_model_fits_saves_and_reloads_to_the_same_predictions(kind, xy, tmp_path):
    from analysis.ml.features import feature_infos
    from analysis.ml.models import fit_model, load_model, save_model

    X, y, spec = xy
    m = fit_model(
        X, y, kind, "app", spec, [f.name for f in feature_infos(spec)], n_estimators=TREES
    )
    assert m.labels == ["Signal", "Telegram", "WhatsApp", "other"]
    save_model(m, tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "model.json").read_text())
    assert meta["features"] == spec.to_dict() and meta["labels"] == m.labels
    assert set(meta["versions"]) >= {"scikit-learn", "numpy", "skops", "python"}
    assert len(meta["sha256"]) == 64
    back = load_model(tmp_path / "m")
    np.testing.assert_allclose(back.predict_proba(X), m.predict_proba(X))
    assert back.features == spec and back.kind == kind
    if kind == "majority":
        assert (m.predict(X) == "other").all()
    else:
        assert (m.predict(X) == y).mean() > 0.9  # training flows


def test_ovr_task_is_one_binary_model_per_app(xy, tmp_path):
    from analysis.ml.models import fit_model, load_model, save_model

    X, y, spec = xy
    m = fit_model(X, y, "rf", "ovr", spec, n_estimators=TREES)
    assert len(m.estimator.estimators_) == 4
    save_model(m, tmp_path / "ovr")
    assert load_model(tmp_path / "ovr").labels == m.labels


def test_loading_refuses_a_changed_file_another_sklearn_or_format(xy, tmp_path):
    from analysis.ml.models import fit_model, load_model, save_model

    X, y, spec = xy
    d = save_model(fit_model(X, y, "rf", features=spec, n_estimators=3), tmp_path / "m")
    blob = d / "model.skops"
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    with pytest.raises(SchemaError, match="sha256"):
        load_model(d)
    d2 = save_model(fit_model(X, y, "rf", features=spec, n_estimators=3), tmp_path / "m2")
    meta = json.loads((d2 / "model.json").read_text())
    meta["versions"]["scikit-learn"] = "0.24.2"
    (d2 / "model.json").write_text(json.dumps(meta))
    with pytest.raises(SchemaError, match="scikit-learn 0.24.2"):
        load_model(d2)
    meta["format_version"] = "99"
    (d2 / "model.json").write_text(json.dumps(meta))
    with pytest.raises(SchemaError, match="format"):
        load_model(d2)
    with pytest.raises(BadInputError, match="model.json"):
        load_model(tmp_path)


def test_loading_refuses_a_file_with_an_untrusted_type(xy, tmp_path):
    """A skops file whose hash matches but that needs a type outside the allow-list."""
    import hashlib
    import os

    import skops.io as sio
    from sklearn.preprocessing import FunctionTransformer

    from analysis.ml.models import fit_model, load_model, save_model

    X, y, spec = xy
    d = save_model(fit_model(X, y, "majority", features=spec), tmp_path / "m")
    sio.dump(FunctionTransformer(os.system), d / "model.skops")  # a function reference
    meta = json.loads((d / "model.json").read_text())
    meta["sha256"] = hashlib.sha256((d / "model.skops").read_bytes()).hexdigest()
    (d / "model.json").write_text(json.dumps(meta))
    with pytest.raises(SchemaError, match="untrusted types posix.system"):
        load_model(d)


def test_genre_task_labels_messaging_apps():
    from analysis.ml.models import task_labels

    got = task_labels(
        ["Signal", "other", "com.whatsapp", "org.telegram.messenger", "viber"], "genre"
    )
    assert got.tolist() == ["messaging", "other", "messaging", "messaging", "other"]
    got = task_labels(["viber"], "genre", ("Signal", "viber"))
    assert got.tolist() == ["messaging"]
    with pytest.raises(BadInputError, match="task"):
        task_labels(["a"], "nope")


def test_one_class_cannot_be_learned(xy):
    from analysis.ml.models import fit_model

    X, y, _ = xy
    with pytest.raises(BadInputError, match="only one class"):
        fit_model(X[y == "other"], y[y == "other"])


def test_kfold_keeps_sessions_apart_and_pools_every_flow(dataset):
    from analysis.ml.evaluate import TrainConfig, run_protocol, session_folds
    from analysis.ml.models import task_labels

    df = dataset.frame
    y = task_labels(df["app"], "app")
    sessions = df["session"].to_numpy()
    folds = session_folds(y, sessions, 5)
    seen = np.zeros(len(df), dtype=int)
    for tr, te in folds:
        assert not set(sessions[tr]) & set(sessions[te])
        seen[te] += 1
    assert (seen == 1).all()
    events: list[object] = []
    m = run_protocol(
        dataset,
        "kfold",
        TrainConfig(n_estimators=TREES, permutation_repeats=1),
        folds=4,
        sink=events.append,
    ).metrics
    assert [type(e).__name__ for e in events] == ["FoldStarted", "FoldFinished"] * 4
    assert [e.macro_f1 for e in events[1::2]] == [f["macro_f1"] for f in m["folds"]]
    for k in ("accuracy", "macro_f1", "weighted_f1", "per_class", "confusion_matrix", "labels"):
        assert k in m
    assert np.asarray(m["confusion_matrix"]).sum() == len(df) == m["flows"]
    assert m["labels"] == ["Signal", "Telegram", "WhatsApp", "other"]
    assert len(m["folds"]) == 4
    tested = [s for f in m["folds"] for s in f["test_sessions"]]
    assert sorted(tested) == sorted(set(df["session"]))
    assert 0 <= m["macro_f1"] <= m["accuracy"] <= 1
    assert set(m["one_vs_rest_auc"]) == set(m["labels"])


def test_majority_baseline_scores_the_majority_share(dataset):
    from analysis.ml.evaluate import TrainConfig, run_protocol

    m = run_protocol(
        dataset, "kfold", TrainConfig(kind="majority", permutation_repeats=1), folds=3
    ).metrics
    share = (dataset.frame["app"] == "other").mean()
    assert m["accuracy"] == pytest.approx(share)
    assert m["per_class"]["WhatsApp"]["recall"] == 0
    assert m["importance"]["permutation"]["finding"]["top_group"] is None


def test_genre_task_has_roc_and_pr_curves(dataset):
    from sklearn.metrics import roc_auc_score

    from analysis.ml.evaluate import TrainConfig, binary_curves, run_protocol

    m = run_protocol(
        dataset,
        "kfold",
        TrainConfig(task="genre", n_estimators=TREES, permutation_repeats=0),
        folds=3,
    ).metrics
    assert m["labels"] == ["messaging", "other"]
    b = m["binary"]
    assert b["positive"] == "messaging"
    assert b["positives"] == int(
        dataset.frame["app"].isin(["Signal", "Telegram", "WhatsApp"]).sum()
    )
    assert 0 <= b["roc"]["auc"] <= 1 and len(b["roc"]["fpr"]) <= 200
    rng = np.random.default_rng(1)
    pos = rng.random(500) < 0.3
    score = pos + rng.normal(0, 1, 500)
    assert binary_curves(pos, score, "x")["roc"]["auc"] == pytest.approx(roc_auc_score(pos, score))


def test_importance_is_grouped_by_direction_and_family(dataset):
    from analysis.ml.evaluate import TrainConfig, run_protocol
    from analysis.ml.features import FeatureSpec

    cfg = TrainConfig(
        n_estimators=TREES,
        features=FeatureSpec(("stats", "series", "counters"), 8),
        permutation_repeats=2,
    )
    imp = run_protocol(dataset, "kfold", cfg, folds=3).metrics["importance"]
    impurity = imp["impurity"]
    assert sum(impurity["direction"].values()) == pytest.approx(1.0)
    assert sum(impurity["family"].values()) == pytest.approx(1.0)
    assert sum(impurity["group"].values()) == pytest.approx(1.0)
    assert set(impurity["direction"]) == {"upstream", "downstream", "biflow"}
    assert "upstream packet_length" in impurity["group"]
    for kind in ("impurity", "permutation"):
        f = imp[kind]["finding"]
        assert f["top_group"] == f["group_ranking"][0]
        assert f["upstream_payload_first"] == (
            f["top_group"] in ("upstream packet_length", "upstream payload_series")
        )
    assert imp["permutation"]["score"] == "drop in macro-F1"


def test_cross_device_on_two_pseudo_phones(dataset):
    from analysis.ml.datasets import Dataset, assign_devices
    from analysis.ml.evaluate import TrainConfig, run_protocol

    df = assign_devices(dataset.frame, pseudo_devices(dataset.frame))
    ds = Dataset(df)
    m = run_protocol(
        ds, "cross-device", TrainConfig(task="genre", n_estimators=TREES, permutation_repeats=0)
    ).metrics
    assert [f["test"] for f in m["folds"]] == [["PhoneA"], ["PhoneB"]]
    assert [f["train"] for f in m["folds"]] == [["PhoneB"], ["PhoneA"]]
    assert m["flows"] == len(df)
    cm = m["cross_matrix"]
    assert cm["axis"] == "device" and cm["names"] == ["PhoneA", "PhoneB"]
    assert np.array(cm["macro_f1"], dtype=float).shape == (2, 2)
    one = run_protocol(
        ds,
        "cross-device",
        TrainConfig(n_estimators=TREES, permutation_repeats=0),
        train=["PhoneA"],
        test=["PhoneB"],
    ).metrics
    assert one["flows"] == int((df["device"] == "PhoneB").sum())
    with pytest.raises(BadInputError, match="no flows of device"):
        run_protocol(ds, "cross-device", TrainConfig(n_estimators=2), train=["PhoneC"])
    with pytest.raises(BadInputError, match="one device only"):
        run_protocol(dataset, "cross-device", TrainConfig(n_estimators=2))


def test_cross_activity_uses_the_activity_column(dataset):
    from analysis.ml.datasets import Dataset
    from analysis.ml.evaluate import TrainConfig, run_protocol

    df = dataset.frame.copy()
    acts = {
        s: ("call" if "call" in s or "stun" in s or "video" in s else "chat")
        for s in set(df["session"])
    }
    df["activity"] = df["session"].map(acts)
    m = run_protocol(
        Dataset(df),
        "cross-activity",
        TrainConfig(task="genre", n_estimators=TREES, permutation_repeats=0),
    ).metrics
    assert m["cross_matrix"]["names"] == ["call", "chat"]
    assert m["protocol"] == "cross-activity"


def test_evaluating_a_model_on_its_training_data_warns(dataset, tmp_path):
    from analysis.ml.evaluate import evaluate_model
    from analysis.ml.features import FeatureSpec, build_features
    from analysis.ml.models import fit_model, task_labels

    spec = FeatureSpec()
    X = build_features(dataset.frame, spec)
    m = fit_model(
        X,
        task_labels(dataset.frame["app"], "genre"),
        task="genre",
        features=spec,
        n_estimators=TREES,
    )
    m.fingerprint = dataset.card()["fingerprint"]
    ev = evaluate_model(m, dataset, permutation_repeats=1).metrics
    assert "optimistic" in ev["warning"]
    assert ev["protocol"] == "holdout" and ev["labels"] == ["messaging", "other"]


def test_report_has_metrics_json_pngs_and_self_contained_html(dataset, tmp_path):
    from analysis.ml.datasets import Dataset, assign_devices
    from analysis.ml.evaluate import TrainConfig, run_protocol
    from analysis.ml.report import load_metrics, write_report

    ds = Dataset(assign_devices(dataset.frame, pseudo_devices(dataset.frame)))
    m = run_protocol(
        ds, "cross-device", TrainConfig(task="genre", n_estimators=TREES, permutation_repeats=1)
    ).metrics
    html_path = write_report(m, tmp_path / "r")
    names = {p.name for p in (tmp_path / "r").iterdir()}
    assert {
        "metrics.json",
        "report.html",
        "confusion_matrix.png",
        "per_class_f1.png",
        "importance.png",
        "roc_pr.png",
        "cross_matrix.png",
        "distributions.png",
    } <= names
    html = html_path.read_text()
    assert html.count("data:image/png;base64,") == 6
    assert "http://" not in html and "https://" not in html
    assert "upstream L4 payload matters most" in html
    back = load_metrics(tmp_path / "r")
    assert back["macro_f1"] == m["macro_f1"]
    write_report(back, tmp_path / "again")  # re-rendered from metrics.json alone
    assert (tmp_path / "again" / "report.html").read_text().count("data:image/png") == 6
    with pytest.raises(SchemaError):
        write_report({"accuracy": 1}, tmp_path / "x")


def test_predictions_have_probabilities_per_label(dataset, xy):
    from analysis.ml.datasets import capture_frame
    from analysis.ml.models import fit_model
    from analysis.ml.predict import predict_frame

    X, y, spec = xy
    m = fit_model(X, y, features=spec, n_estimators=TREES)
    out = predict_frame(m, capture_frame(PCAPS / "whatsapp.pcap"))
    assert len(out) > 50
    probs = out[[f"p_{lab}" for lab in m.labels]].to_numpy()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)
    assert (out["confidence"] == probs.max(axis=1)).all()
    assert set(out["predicted"]) <= set(m.labels)
