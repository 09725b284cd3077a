"""Classifiers, tasks, and models saved with their metadata and reloaded safely.

Models: Random Forest (default), ExtraTrees, HistGradientBoosting, k-NN and a majority
baseline. Tasks: ``app`` (multi-class), ``genre`` (encrypted messaging app vs the rest)
and ``ovr`` (one binary classifier per app, scikit-learn's OneVsRestClassifier).

Saving: a model directory holds ``model.skops`` (skops format: no pickle, only types
on skops' trusted list or :data:`TRUSTED_TYPES` are rebuilt) and ``model.json`` (format version, task, labels,
feature spec, training-data fingerprint, library versions, sha256 of the skops file).
:func:`load_model` refuses a directory whose hash, format version or scikit-learn
version does not match, and a file that would need an untrusted type, naming which.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from analysis.errors import BadInputError, OutputError, SchemaError, short
from analysis.ml.features import FeatureSpec

MODEL_KINDS = ("rf", "extratrees", "hgb", "knn", "majority")
TASKS = ("app", "genre", "ovr")
MODEL_FORMAT = "1"
MAX_MODEL_JSON = 16 << 20
"""Largest ``model.json`` read (a real one is a few kilobytes)."""
# Each Random Forest tree is grown on a bootstrap sample of at most this many flows:
# identical to the textbook forest below it, and it keeps 200 trees on 100,000 flows
# within a minute on two cores (benchmarks/bench_ml.py).
RF_MAX_SAMPLES = 20_000
MESSAGING = "messaging"
OTHER = "other"
# Encrypted messaging apps: family names (nDPI's app_family) and Android packages.
# scikit-learn types our estimators contain that skops does not trust by default; any
# other type in a model file is refused.
TRUSTED_TYPES = (
    "sklearn.tree._tree.Tree",
    "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",
    "sklearn.metrics._dist_metrics.EuclideanDistance64",
    "sklearn.neighbors._kd_tree.KDTree",
    "sklearn.neighbors._ball_tree.BallTree",
)
DEFAULT_MESSAGING_APPS = (
    "Signal",
    "Telegram",
    "WhatsApp",
    "org.thoughtcrime.securesms",
    "org.telegram.messenger",
    "org.telegram.messenger.web",
    "com.whatsapp",
    "com.whatsapp.w4b",
)


def make_estimator(
    kind: str = "rf", n_estimators: int = 200, seed: int = 0, n_jobs: int = -1, task: str = "app"
) -> Any:
    """A fresh scikit-learn estimator of ``kind`` (see :data:`MODEL_KINDS`)."""
    from sklearn.dummy import DummyClassifier
    from sklearn.ensemble import (
        ExtraTreesClassifier,
        HistGradientBoostingClassifier,
        RandomForestClassifier,
    )
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if kind == "rf":
        est: Any = RandomForestClassifier(
            n_estimators=n_estimators, n_jobs=n_jobs, random_state=seed
        )
    elif kind == "extratrees":
        est = ExtraTreesClassifier(n_estimators=n_estimators, n_jobs=n_jobs, random_state=seed)
    elif kind == "hgb":
        est = HistGradientBoostingClassifier(max_iter=max(n_estimators, 10), random_state=seed)
    elif kind == "knn":
        est = make_pipeline(StandardScaler(), KNeighborsClassifier(n_neighbors=5))
    elif kind == "majority":
        est = DummyClassifier(strategy="most_frequent")
    else:
        raise BadInputError(f"unknown model {kind!r}", hint=f"choose from {', '.join(MODEL_KINDS)}")
    if task == "ovr":
        from sklearn.multiclass import OneVsRestClassifier

        est = OneVsRestClassifier(est)
    return est


def task_labels(
    apps: Any, task: str, messaging_apps: tuple[str, ...] = DEFAULT_MESSAGING_APPS
) -> np.ndarray:
    """The target of each flow: its app (``app``, ``ovr``) or messaging/other (``genre``)."""
    if task not in TASKS:
        raise BadInputError(f"unknown task {task!r}", hint=f"choose from {', '.join(TASKS)}")
    arr = np.asarray([str(a) for a in apps], dtype=object)
    if task != "genre":
        return arr
    wanted = {a.lower() for a in messaging_apps}
    return np.where([a.lower() in wanted for a in arr], MESSAGING, OTHER).astype(object)


def library_versions() -> dict[str, str]:
    import sklearn
    import skops

    return {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "scikit-learn": sklearn.__version__,
        "skops": skops.__version__,
    }


@dataclass
class TrainedModel:
    """A fitted estimator and everything needed to use it again."""

    estimator: Any
    kind: str
    task: str
    labels: list[str]
    features: FeatureSpec
    feature_names: list[str]
    messaging_apps: tuple[str, ...] = DEFAULT_MESSAGING_APPS
    fingerprint: str = ""
    train_flows: int = 0
    dataset_card: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=library_versions)
    created: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """(F, len(labels)) class probabilities, columns in :attr:`labels` order."""
        return np.asarray(self.estimator.predict_proba(X), dtype=np.float64)

    def predict(self, X: np.ndarray) -> np.ndarray:
        proba = self.predict_proba(X)
        return np.asarray(self.labels, dtype=object)[np.argmax(proba, axis=1)]

    def metadata(self) -> dict[str, Any]:
        return {
            "format_version": MODEL_FORMAT,
            "kind": self.kind,
            "task": self.task,
            "labels": self.labels,
            "features": self.features.to_dict(),
            "feature_names": self.feature_names,
            "messaging_apps": list(self.messaging_apps),
            "training_data": {
                "fingerprint": self.fingerprint,
                "flows": self.train_flows,
                "card": self.dataset_card,
            },
            "versions": self.versions,
            "created": self.created,
        }


def fit_model(
    X: np.ndarray,
    y: np.ndarray,
    kind: str = "rf",
    task: str = "app",
    features: FeatureSpec | None = None,
    feature_names: list[str] | None = None,
    n_estimators: int = 200,
    seed: int = 0,
    n_jobs: int = -1,
    messaging_apps: tuple[str, ...] = DEFAULT_MESSAGING_APPS,
) -> TrainedModel:
    """Fit ``kind`` on (X, y); needs at least two classes."""
    classes = sorted(set(y.tolist()))
    if len(classes) < 2:
        raise BadInputError(
            f"only one class ({classes[0] if classes else 'none'}) to learn",
            hint="a classifier needs flows of at least two classes",
        )
    est = make_estimator(kind, n_estimators, seed, n_jobs, task)
    if kind == "rf" and len(y) > RF_MAX_SAMPLES:
        key = "estimator__max_samples" if task == "ovr" else "max_samples"
        est.set_params(**{key: RF_MAX_SAMPLES})
    est.fit(X, y)
    labels = [str(c) for c in est.classes_]
    return TrainedModel(
        est,
        kind,
        task,
        labels,
        features or FeatureSpec(),
        feature_names or [],
        messaging_apps,
        train_flows=len(y),
    )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_model(model: TrainedModel, out_dir: str | os.PathLike[str]) -> Path:
    """Write ``model.skops`` and ``model.json`` into ``out_dir``; returns the directory."""
    import skops.io as sio

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out} exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        blob = out / "model.skops"
        tmp = out / ".model.skops.tmp"
        sio.dump(model.estimator, tmp)
        os.replace(tmp, blob)
        meta = model.metadata()
        meta["file"] = blob.name
        meta["sha256"] = _sha256(blob)
        (out / "model.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
    except OSError as err:
        raise OutputError(f"cannot write the model to {out}: {err.strerror or err}") from err
    return out


def read_model_metadata(model_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """``model.json`` of a model directory, format version checked."""
    d = Path(model_dir)
    path = d / "model.json"
    if not path.is_file():
        raise BadInputError(
            f"{d} is not a flowtruth model directory (no model.json)",
            hint="give the -o directory of flowtruth train",
        )
    try:
        if path.stat().st_size > MAX_MODEL_JSON:
            raise SchemaError(f"{short(path)}: larger than {MAX_MODEL_JSON >> 20} MB "
                              "(not a flowtruth model.json)")
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as err:  # JSONDecodeError, bad UTF-8, digits
        why = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise SchemaError(f"{short(path)}: unreadable model metadata ({short(why)})") from None
    if not isinstance(meta, dict) or meta.get("format_version") != MODEL_FORMAT:
        got = meta.get("format_version") if isinstance(meta, dict) else None
        raise SchemaError(
            f"{path}: model format {got!r}, this flowtruth reads {MODEL_FORMAT!r}",
            hint="retrain the model with this version",
        )
    return meta


def load_model(model_dir: str | os.PathLike[str]) -> TrainedModel:
    """Reload a saved model, refusing one whose file or library versions do not match."""
    import skops.io as sio

    d = Path(model_dir)
    meta = read_model_metadata(d)
    blob = model_file(d, meta)
    digest = _sha256(blob)
    if digest != meta.get("sha256"):
        raise SchemaError(
            f"{blob}: sha256 {digest[:12]}… does not match model.json "
            f"({str(meta.get('sha256'))[:12]}…); refusing to load",
            hint="the model file was changed after training",
        )
    now = library_versions()
    saved = meta.get("versions", {})
    if not isinstance(saved, dict):
        raise SchemaError(f"{short(d / 'model.json')}: versions is not an object")
    for lib in ("scikit-learn",):
        if _minor(saved.get(lib)) != _minor(now[lib]):
            raise SchemaError(
                f"{d}: trained with {lib} {saved.get(lib)}, this is {now[lib]}",
                hint="retrain the model with the installed version",
            )
    try:
        untrusted = sio.get_untrusted_types(file=blob)
    except Exception as err:  # noqa: BLE001 - any failure to parse is a damaged file
        raise SchemaError(f"{blob}: not a readable skops file ({err})") from err
    untrusted = [t for t in untrusted if t not in TRUSTED_TYPES]
    if untrusted:
        raise SchemaError(f"{blob}: needs untrusted types {', '.join(untrusted)}; refusing to load")
    try:
        spec = FeatureSpec.from_dict(meta["features"])
        if not 0 <= spec.series_packets <= 10_000:  # features are built per packet position
            raise ValueError(f"features.series_packets {spec.series_packets} out of range")
        td = meta.get("training_data", {})
        fields = (
            meta["kind"],
            meta["task"],
            [str(x) for x in meta["labels"]],
            spec,
            [str(x) for x in meta.get("feature_names", [])],
            tuple(meta.get("messaging_apps", DEFAULT_MESSAGING_APPS)),
            str(td.get("fingerprint", "")),
            int(td.get("flows", 0)),
            dict(td.get("card", {})),
            dict(saved),
            str(meta.get("created", "")),
        )
    except KeyError as err:
        raise SchemaError(f"{short(d / 'model.json')}: no {short(err.args[0], 60)!r} field",
                          hint="retrain the model with this version") from None
    except (TypeError, ValueError, AttributeError, OverflowError) as err:
        raise SchemaError(f"{short(d / 'model.json')}: a field has the wrong type "
                          f"({short(str(err), 120)})") from None
    try:
        est = sio.load(blob, trusted=list(TRUSTED_TYPES))
    except Exception as err:  # noqa: BLE001 - a damaged file that passed the type check
        raise SchemaError(f"{short(blob)}: not a readable skops file "
                          f"({short(str(err), 120)})") from None
    return TrainedModel(est, *fields)


def model_file(d: Path, meta: dict[str, Any]) -> Path:
    """The model file named by ``model.json``: a plain file inside the model directory
    (a ``file`` pointing elsewhere, through ``..``, an absolute path or a symlink, is refused
    before it is opened)."""
    name = meta.get("file", "model.skops")
    if (not isinstance(name, str) or not name or len(name) > 255 or "/" in name
            or "\\" in name or "\0" in name or name in (".", "..")):
        raise SchemaError(f"{short(d / 'model.json')}: model file {short(repr(name), 80)} is not "
                          "a file name inside the model directory")
    blob = d / name
    try:
        inside = not blob.is_symlink() and blob.resolve().parent == d.resolve()
    except (OSError, RuntimeError) as err:
        raise SchemaError(f"{short(blob)}: cannot check the model file ({err})") from None
    if not inside:
        raise SchemaError(f"{short(blob)}: the model file must be a plain file inside the model "
                          "directory, not a link")
    if not blob.is_file():
        raise BadInputError(f"{short(d)}: model file {short(name)} is missing")
    return blob


def _minor(version: object) -> str | None:
    if not isinstance(version, str):  # a damaged model.json; never equal to a real version
        return None if version is None else f"<{type(version).__name__}>"
    return None if not version else ".".join(version.split(".")[:2])
