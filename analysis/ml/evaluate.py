"""Evaluation protocols, metrics and grouped feature importance.

Protocols:

* ``kfold``: stratified k-fold grouped by capture session (StratifiedGroupKFold): the
  flows of one session are never in both train and test;
* ``cross-device``: train on some devices, test on others; without ``train``/``test``
  every device is held out in turn (leave-one-device-out), and a device x device matrix
  (train on one, test on each; the diagonal is a session-grouped 2-fold within the
  device) shows how well a model carries over;
* ``cross-activity``: the same over the ``activity`` column.

Every protocol pools the held-out predictions of its folds into one set of metrics
(``accuracy``, ``macro_f1``, ``weighted_f1``, ``per_class``, ``confusion_matrix``,
``labels``), keeps per-fold metrics, and for a two-class task ROC and PR curves.

Importance is grouped by traffic direction (upstream/downstream/biflow), by feature
family and by both: impurity importance summed over a group, and permutation importance
of a group (the group's columns shuffled together; the drop in macro-F1 on held-out
flows). :func:`importance_finding` says which group ranks first, to confirm or refute
"the upstream L4 payload matters most" on each dataset.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from analysis.errors import BadInputError
from analysis.ml.datasets import Dataset
from analysis.ml.features import FeatureInfo, FeatureSpec, build_features, feature_infos
from analysis.ml.models import (
    DEFAULT_MESSAGING_APPS,
    MESSAGING,
    TrainedModel,
    fit_model,
    task_labels,
)

PROTOCOLS = ("kfold", "cross-device", "cross-activity")
_AXIS = {"cross-device": "device", "cross-activity": "activity"}
UPSTREAM_PAYLOAD_GROUPS = ("upstream packet_length", "upstream payload_series")
CURVE_POINTS = 200


@dataclass(frozen=True)
class FoldStarted:
    """A protocol began training one split (``index`` of ``total``)."""

    protocol: str
    index: int
    total: int
    description: str


@dataclass(frozen=True)
class FoldFinished:
    """A split was trained and tested; its held-out scores."""

    protocol: str
    index: int
    total: int
    description: str
    accuracy: float
    macro_f1: float


@dataclass(frozen=True)
class TrainConfig:
    """How each fold's model is trained."""

    task: str = "app"
    kind: str = "rf"
    features: FeatureSpec = FeatureSpec()
    n_estimators: int = 200
    seed: int = 0
    n_jobs: int = -1
    messaging_apps: tuple[str, ...] = DEFAULT_MESSAGING_APPS
    permutation_repeats: int = 3


# ------------------------------------------------------------------------- metrics


def compute_metrics(
    y_true: Sequence[str] | np.ndarray,
    y_pred: Sequence[str] | np.ndarray,
    labels: Sequence[str] | None = None,
    proba: np.ndarray | None = None,
    positive: str | None = None,
) -> dict[str, Any]:
    """Accuracy, macro/weighted F1, per-class precision/recall/F1, confusion matrix and,
    for two classes with probabilities, ROC and PR curves of ``positive``."""
    from sklearn.metrics import (
        accuracy_score,
        confusion_matrix,
        f1_score,
        precision_recall_fscore_support,
    )

    yt = np.asarray(y_true, dtype=object)
    yp = np.asarray(y_pred, dtype=object)
    labs = list(labels) if labels is not None else sorted(set(yt) | set(yp))
    if not len(yt):
        raise BadInputError("no flows to evaluate on")
    p, r, f, s = precision_recall_fscore_support(yt, yp, labels=labs, zero_division=0)
    out: dict[str, Any] = {
        "accuracy": float(accuracy_score(yt, yp)),
        "macro_f1": float(f1_score(yt, yp, labels=labs, average="macro", zero_division=0)),
        "weighted_f1": float(f1_score(yt, yp, labels=labs, average="weighted", zero_division=0)),
        "per_class": {
            str(lab): {
                "precision": float(p[i]),
                "recall": float(r[i]),
                "f1": float(f[i]),
                "support": int(s[i]),
            }
            for i, lab in enumerate(labs)
        },
        "confusion_matrix": confusion_matrix(yt, yp, labels=labs).astype(int).tolist(),
        "labels": [str(x) for x in labs],
        "flows": int(len(yt)),
    }
    if proba is not None and len(labs) == 2:
        pos = str(positive) if positive in labs else str(labs[1])
        out["binary"] = binary_curves(yt == pos, proba[:, labs.index(pos)], pos)
    elif proba is not None and len(labs) > 2:
        out["one_vs_rest_auc"] = _ovr_auc(yt, proba, labs)
    return out


def binary_curves(is_pos: np.ndarray, score: np.ndarray, positive: str) -> dict[str, Any]:
    """ROC and precision-recall curves (at most CURVE_POINTS points each) and their areas."""
    from sklearn.metrics import (
        average_precision_score,
        precision_recall_curve,
        roc_auc_score,
        roc_curve,
    )

    res: dict[str, Any] = {
        "positive": positive,
        "positives": int(is_pos.sum()),
        "negatives": int((~is_pos).sum()),
    }
    if is_pos.all() or not is_pos.any():
        res["note"] = "one class only in the test flows: no curves"
        return res
    fpr, tpr, _ = roc_curve(is_pos, score)
    prec, rec, _ = precision_recall_curve(is_pos, score)
    res["roc"] = {"fpr": _thin(fpr), "tpr": _thin(tpr), "auc": float(roc_auc_score(is_pos, score))}
    res["pr"] = {
        "precision": _thin(prec),
        "recall": _thin(rec),
        "average_precision": float(average_precision_score(is_pos, score)),
    }
    return res


def _thin(x: np.ndarray) -> list[float]:
    if len(x) > CURVE_POINTS:
        x = x[np.linspace(0, len(x) - 1, CURVE_POINTS).round().astype(int)]
    return [round(float(v), 6) for v in x]


def _ovr_auc(yt: np.ndarray, proba: np.ndarray, labs: list[str]) -> dict[str, float | None]:
    from sklearn.metrics import roc_auc_score

    out: dict[str, float | None] = {}
    for j, lab in enumerate(labs):
        pos = yt == lab
        out[lab] = None if pos.all() or not pos.any() else float(roc_auc_score(pos, proba[:, j]))
    return out


# ------------------------------------------------------------------------- importance


def feature_groups(infos: Sequence[FeatureInfo]) -> dict[str, dict[str, np.ndarray]]:
    """Column indices per direction, per family and per "direction family" pair."""
    out: dict[str, dict[str, list[int]]] = {"direction": {}, "family": {}, "group": {}}
    for j, fi in enumerate(infos):
        out["direction"].setdefault(fi.direction, []).append(j)
        out["family"].setdefault(fi.family, []).append(j)
        out["group"].setdefault(f"{fi.direction} {fi.family}", []).append(j)
    return {k: {g: np.asarray(v) for g, v in d.items()} for k, d in out.items()}


def impurity_importance(estimator: Any) -> np.ndarray | None:
    """Mean-decrease-in-impurity importances (averaged over a one-vs-rest's models)."""
    imp = getattr(estimator, "feature_importances_", None)
    if imp is not None:
        return np.asarray(imp, dtype=np.float64)
    subs = getattr(estimator, "estimators_", None)
    if subs is not None and all(hasattr(e, "feature_importances_") for e in subs):
        return np.mean([e.feature_importances_ for e in subs], axis=0)
    return None


def _grouped_sum(
    values: np.ndarray, groups: dict[str, dict[str, np.ndarray]]
) -> dict[str, dict[str, float]]:
    return {k: {g: float(values[idx].sum()) for g, idx in d.items()} for k, d in groups.items()}


def permutation_importance_grouped(
    model: TrainedModel,
    X: np.ndarray,
    y: np.ndarray,
    groups: dict[str, dict[str, np.ndarray]],
    repeats: int = 3,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Drop in macro-F1 when a group's columns are shuffled together (mean over repeats)."""
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(seed)
    labs = model.labels
    base = f1_score(y, model.predict(X), labels=labs, average="macro", zero_division=0)
    out: dict[str, dict[str, float]] = {}
    for kind, d in groups.items():
        out[kind] = {}
        for g, idx in d.items():
            drops = []
            for _ in range(repeats):
                Xp = X.copy()
                perm = rng.permutation(len(X))
                Xp[:, idx] = X[perm][:, idx]
                score = f1_score(
                    y, model.predict(Xp), labels=labs, average="macro", zero_division=0
                )
                drops.append(base - score)
            out[kind][g] = float(np.mean(drops))
    return out


def importance_finding(imp: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Which direction and which "direction family" group rank first."""

    def first(d: dict[str, float]) -> str:
        return max(d, key=lambda g: d[g])

    ranked = sorted(imp["group"], key=lambda g: imp["group"][g], reverse=True)
    if not ranked or imp["group"][ranked[0]] <= 0:
        return {
            "top_direction": None,
            "top_family": None,
            "top_group": None,
            "group_ranking": [],
            "upstream_payload_first": False,
            "note": "no feature group changes this model's predictions",
        }
    top = ranked[0]
    return {
        "top_direction": first(imp["direction"]),
        "top_family": first(imp["family"]),
        "top_group": top,
        "group_ranking": ranked,
        "upstream_payload_first": top in UPSTREAM_PAYLOAD_GROUPS,
    }


def _top_features(
    values: np.ndarray, infos: Sequence[FeatureInfo], k: int = 15
) -> list[dict[str, Any]]:
    order = np.argsort(values)[::-1][:k]
    return [
        {
            "name": infos[j].name,
            "direction": infos[j].direction,
            "family": infos[j].family,
            "importance": float(values[j]),
        }
        for j in order
    ]


# ------------------------------------------------------------------------- splits


def session_folds(
    y: np.ndarray, sessions: np.ndarray, k: int, seed: int = 0
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified k-fold grouped by session (k is lowered to the number of sessions)."""
    from sklearn.model_selection import StratifiedGroupKFold

    n_sessions = len(set(sessions.tolist()))
    if n_sessions < 2:
        raise BadInputError(
            f"{n_sessions} capture session: splitting by session needs two",
            hint="add captures or use another protocol",
        )
    k = max(2, min(k, n_sessions))
    cv = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    return [(tr, te) for tr, te in cv.split(np.zeros(len(y)), y, sessions)]


# ------------------------------------------------------------------------- protocols


@dataclass
class Evaluation:
    """An evaluation: the metrics document (what metrics.json holds) and its inputs."""

    metrics: dict[str, Any]


class _Pool:
    """Held-out predictions of several folds, with probabilities over all labels."""

    def __init__(self, labels: list[str]) -> None:
        self.labels = labels
        self.y: list[np.ndarray] = []
        self.pred: list[np.ndarray] = []
        self.proba: list[np.ndarray] = []

    def add(self, model: TrainedModel, X: np.ndarray, y: np.ndarray) -> np.ndarray:
        p = model.predict_proba(X)
        full = np.zeros((len(X), len(self.labels)))
        for j, lab in enumerate(model.labels):
            full[:, self.labels.index(lab)] = p[:, j]
        pred = np.asarray(model.labels, dtype=object)[np.argmax(p, axis=1)]
        self.y.append(y)
        self.pred.append(pred)
        self.proba.append(full)
        return pred

    def metrics(self, positive: str | None) -> dict[str, Any]:
        y = np.concatenate(self.y)
        return compute_metrics(
            y, np.concatenate(self.pred), self.labels, np.vstack(self.proba), positive
        )


class _ImportanceSum:
    def __init__(self, infos: list[FeatureInfo]) -> None:
        self.infos = infos
        self.groups = feature_groups(infos)
        self.impurity = np.zeros(len(infos))
        self.n_imp = 0
        self.perm: list[tuple[int, dict[str, dict[str, float]]]] = []

    def add(self, model: TrainedModel, X: np.ndarray, y: np.ndarray, cfg: TrainConfig) -> None:
        imp = impurity_importance(model.estimator)
        if imp is not None:
            self.impurity += imp
            self.n_imp += 1
        if cfg.permutation_repeats > 0 and len(X):
            self.perm.append(
                (
                    len(X),
                    permutation_importance_grouped(
                        model, X, y, self.groups, cfg.permutation_repeats, cfg.seed
                    ),
                )
            )

    def result(self) -> dict[str, Any]:
        out: dict[str, Any] = {"features": len(self.infos)}
        if self.n_imp:
            imp = self.impurity / self.n_imp
            grouped = _grouped_sum(imp, self.groups)
            out["impurity"] = {
                **grouped,
                "top_features": _top_features(imp, self.infos),
                "finding": importance_finding(grouped),
            }
        if self.perm:
            w = np.array([n for n, _ in self.perm], dtype=np.float64)
            avg = {
                k: {
                    g: float(np.average([p[k][g] for _, p in self.perm], weights=w))
                    for g in self.perm[0][1][k]
                }
                for k in self.perm[0][1]
            }
            out["permutation"] = {
                **avg,
                "finding": importance_finding(avg),
                "score": "drop in macro-F1",
            }
        return out


def _positive(cfg_task: str, labels: list[str]) -> str | None:
    if cfg_task == "genre":
        return MESSAGING
    return labels[1] if len(labels) == 2 else None


def _fit(X: np.ndarray, y: np.ndarray, cfg: TrainConfig, infos: list[FeatureInfo]) -> TrainedModel:
    return fit_model(
        X,
        y,
        cfg.kind,
        cfg.task,
        cfg.features,
        [f.name for f in infos],
        cfg.n_estimators,
        cfg.seed,
        cfg.n_jobs,
        cfg.messaging_apps,
    )


def run_protocol(
    dataset: Dataset,
    protocol: str = "kfold",
    cfg: TrainConfig | None = None,
    folds: int = 5,
    train: Sequence[str] = (),
    test: Sequence[str] = (),
    sink: Callable[[object], None] | None = None,
    split_by: str = "session",
) -> Evaluation:
    """Train and test ``cfg``'s model under ``protocol`` (see the module docstring).

    ``split_by="flow"`` makes the k-fold ignore sessions (flows of one capture on both
    sides): leaky, only to show how much session splits matter.
    """
    cfg = cfg or TrainConfig()
    if protocol not in PROTOCOLS:
        raise BadInputError(
            f"unknown protocol {protocol!r}", hint=f"choose from {', '.join(PROTOCOLS)}"
        )
    df = dataset.frame
    if not len(df):
        raise BadInputError("the dataset is empty after filtering")
    infos = feature_infos(cfg.features)
    X = build_features(df, cfg.features)
    y = task_labels(df["app"], cfg.task, cfg.messaging_apps)
    labels = sorted(set(y.tolist()))
    if len(labels) < 2:
        raise BadInputError(
            f"only one class ({labels[0]}) in the dataset",
            hint="a classifier needs flows of at least two classes",
        )
    emit = sink or (lambda _e: None)
    pool = _Pool(labels)
    imps = _ImportanceSum(infos)
    fold_docs: list[dict[str, Any]] = []
    cross: dict[str, Any] | None = None
    if protocol == "kfold":
        sessions = df["session"].astype(str).to_numpy()
        if split_by == "flow":
            from sklearn.model_selection import StratifiedKFold

            cv = StratifiedKFold(n_splits=max(2, folds), shuffle=True, random_state=cfg.seed)
            splits = list(cv.split(X, y))
        elif split_by == "session":
            splits = session_folds(y, sessions, folds, cfg.seed)
        else:
            raise BadInputError(f"unknown split {split_by!r}", hint="session or flow")
        for i, (tr, te) in enumerate(splits):
            what = f"fold {i + 1}: {len(tr):,} train, {len(te):,} test flows"
            emit(FoldStarted(protocol, i, len(splits), what))
            doc = _run_fold(
                X,
                y,
                tr,
                te,
                cfg,
                infos,
                pool,
                imps,
                labels,
                {"fold": i, "test_sessions": sorted(set(sessions[te].tolist()))},
            )
            fold_docs.append(doc)
            emit(FoldFinished(protocol, i, len(splits), what, doc["accuracy"], doc["macro_f1"]))
    else:
        axis = _AXIS[protocol]
        values = df[axis].astype(str).to_numpy()
        names = sorted(set(values.tolist()))
        if train or test:
            train, test = _resolve(train, names, axis), _resolve(test, names, axis)
            tr_names = list(train) or [n for n in names if n not in set(test)]
            te_names = list(test) or [n for n in names if n not in set(train)]
            if set(tr_names) & set(te_names):
                raise BadInputError(
                    f"{axis} {', '.join(set(tr_names) & set(te_names))} is in both train and test"
                )
            plan = [(tr_names, te_names)]
        else:
            if len(names) < 2:
                raise BadInputError(
                    f"one {axis} only ({names[0]}): {protocol} needs two",
                    hint=f"load data of two or more {axis}s",
                )
            plan = [([n for n in names if n != held], [held]) for held in names]
        for i, (tr_names, te_names) in enumerate(plan):
            tr = np.flatnonzero(np.isin(values, tr_names))
            te = np.flatnonzero(np.isin(values, te_names))
            what = f"train on {', '.join(tr_names)}, test on {', '.join(te_names)}"
            emit(FoldStarted(protocol, i, len(plan), what))
            doc = _run_fold(
                X, y, tr, te, cfg, infos, pool, imps, labels, {"train": tr_names, "test": te_names}
            )
            fold_docs.append(doc)
            emit(FoldFinished(protocol, i, len(plan), what, doc["accuracy"], doc["macro_f1"]))
        cross = _cross_matrix(
            X, y, values, names, df["session"].astype(str).to_numpy(), cfg, infos, axis, emit
        )
    metrics = pool.metrics(_positive(cfg.task, labels))
    metrics.update(
        {
            "task": cfg.task,
            "model": cfg.kind,
            "protocol": protocol,
            "split_by": split_by if protocol == "kfold" else _AXIS[protocol],
            "features": cfg.features.to_dict(),
            "n_estimators": cfg.n_estimators,
            "folds": fold_docs,
            "importance": imps.result(),
            "dataset": dataset.card(),
        }
    )
    if cfg.task == "genre":
        metrics["messaging_apps"] = list(cfg.messaging_apps)
    if cross is not None:
        metrics["cross_matrix"] = cross
    metrics["distributions"] = distributions(df)
    return Evaluation(metrics)


def _resolve(given: Sequence[str], names: list[str], axis: str) -> list[str]:
    """Names as given, or a device model standing for its ``<Model>_<mac>`` folder(s)."""
    out: list[str] = []
    for g in given:
        hits = [g] if g in names else [n for n in names if n.startswith(g + "_")]
        if not hits:
            raise BadInputError(
                f"no flows of {axis} {g}", hint=f"the dataset has {', '.join(names)}"
            )
        out.extend(h for h in hits if h not in out)
    return out


def _run_fold(X, y, tr, te, cfg, infos, pool, imps, labels, doc) -> dict[str, Any]:
    if len(set(y[tr].tolist())) < 2:
        raise BadInputError(
            f"a training split ({doc}) holds one class only",
            hint="use fewer folds or more sessions",
        )
    model = _fit(X[tr], y[tr], cfg, infos)
    pred = pool.add(model, X[te], y[te])
    imps.add(model, X[te], y[te], cfg)
    m = compute_metrics(y[te], pred, labels)
    return {
        **doc,
        "train_flows": int(len(tr)),
        "test_flows": int(len(te)),
        "accuracy": m["accuracy"],
        "macro_f1": m["macro_f1"],
        "weighted_f1": m["weighted_f1"],
    }


def _cross_matrix(X, y, values, names, sessions, cfg, infos, axis, emit) -> dict[str, Any]:
    """Train on each group alone, test on every group (diagonal: 2-fold by session)."""
    from sklearn.metrics import accuracy_score, f1_score

    k = len(names)
    acc = np.full((k, k), np.nan)
    mf1 = np.full((k, k), np.nan)
    labels = sorted(set(y.tolist()))
    for a, na in enumerate(names):
        ia = np.flatnonzero(values == na)
        if len(set(y[ia].tolist())) < 2:
            continue
        emit(FoldStarted("cross-matrix", a, k, f"train on {na} alone, test on each {axis}"))
        model = _fit(X[ia], y[ia], cfg, infos)
        for b, nb in enumerate(names):
            if a == b:
                s = sessions[ia]
                if len(set(s.tolist())) < 2:
                    continue
                yt_all, yp_all = [], []
                for tr, te in session_folds(y[ia], s, 2, cfg.seed):
                    if len(set(y[ia][tr].tolist())) < 2:
                        continue
                    m2 = _fit(X[ia][tr], y[ia][tr], cfg, infos)
                    yt_all.append(y[ia][te])
                    yp_all.append(m2.predict(X[ia][te]))
                if not yt_all:
                    continue
                yt, yp = np.concatenate(yt_all), np.concatenate(yp_all)
            else:
                ib = np.flatnonzero(values == nb)
                yt, yp = y[ib], model.predict(X[ib])
            acc[a, b] = accuracy_score(yt, yp)
            mf1[a, b] = f1_score(yt, yp, labels=labels, average="macro", zero_division=0)

    def clean(m: np.ndarray) -> list[list[float | None]]:
        return [[None if np.isnan(v) else float(v) for v in row] for row in m]

    return {
        "axis": axis,
        "names": names,
        "accuracy": clean(acc),
        "macro_f1": clean(mf1),
        "diagonal": "session-grouped 2-fold within the group",
    }


def evaluate_model(
    model: TrainedModel, dataset: Dataset, permutation_repeats: int = 3
) -> Evaluation:
    """Test a trained model on a dataset (labels mapped to the model's task)."""
    df = dataset.frame
    if not len(df):
        raise BadInputError("the dataset is empty after filtering")
    infos = feature_infos(model.features)
    X = build_features(df, model.features)
    y = task_labels(df["app"], model.task, model.messaging_apps)
    labels = sorted(set(model.labels) | set(y.tolist()))
    pool = _Pool(labels)
    pool.add(model, X, y)
    imps = _ImportanceSum(infos)
    imps.add(model, X, y, TrainConfig(permutation_repeats=permutation_repeats))
    metrics = pool.metrics(_positive(model.task, labels))
    unseen = sorted(set(y.tolist()) - set(model.labels))
    metrics.update(
        {
            "task": model.task,
            "model": model.kind,
            "protocol": "holdout",
            "features": model.features.to_dict(),
            "importance": imps.result(),
            "dataset": dataset.card(),
            "trained_on": model.fingerprint,
            "labels_unknown_to_model": unseen,
            "distributions": distributions(df),
        }
    )
    if dataset.card()["fingerprint"] == model.fingerprint:
        metrics["warning"] = "evaluated on its own training data: scores are optimistic"
    return Evaluation(metrics)


# ------------------------------------------------------------------------- distributions


def distributions(df: Any, max_apps: int = 12) -> dict[str, Any]:
    """Per-app box-plot statistics of packet payload size and inter-arrival time (first
    packets of each flow; payload-carrying packets only; IAT > 0), for the report."""
    out: dict[str, Any] = {"payload_bytes": {}, "iat_seconds": {}}
    apps = df["app"].astype(str).value_counts().index.tolist()[:max_apps]
    for app in apps:
        sub = df[df["app"].astype(str) == app]
        sizes = np.concatenate(
            [np.zeros(0)] + [np.asarray(s, dtype=np.float64) for s in sub["pkt_payload"]]
        )
        iats = np.concatenate(
            [np.zeros(0)] + [np.asarray(s, dtype=np.float64)[1:] for s in sub["pkt_iat"]]
        )
        out["payload_bytes"][app] = _box(sizes[sizes > 0])
        out["iat_seconds"][app] = _box(iats[iats > 0])
    return out


def _box(x: np.ndarray) -> dict[str, float] | None:
    if not len(x):
        return None
    q = np.percentile(x, [5, 25, 50, 75, 95])
    return {
        "whislo": float(q[0]),
        "q1": float(q[1]),
        "med": float(q[2]),
        "q3": float(q[3]),
        "whishi": float(q[4]),
        "n": int(len(x)),
    }
