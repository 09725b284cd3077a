"""``metrics.json`` and a self-contained HTML report (PNG plots inlined) for an evaluation.

Everything the report shows comes from the metrics document, so
:func:`write_report` can re-render a report from a saved ``metrics.json`` alone.
"""

from __future__ import annotations

import base64
import html
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from analysis.errors import BadInputError, OutputError, SchemaError

REQUIRED_KEYS = ("accuracy", "macro_f1", "weighted_f1", "per_class", "confusion_matrix", "labels")


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _short(label: str, n: int = 28) -> str:
    return label if len(label) <= n else "…" + label[-(n - 1) :]


_MAC_FOLDER = re.compile(r"^(.+?)_((?:[0-9a-fA-F]{2}_){5}[0-9a-fA-F]{2})$")


def _short_group(name: str) -> str:
    """A ``<Model>_<mac>`` device folder as ``Model (…ee:ff)``; other names shortened."""
    m = _MAC_FOLDER.match(name)
    if m:
        octets = m.group(2).split("_")
        return f"{_short(m.group(1), 20)} (…{octets[-2]}:{octets[-1]})"
    return _short(name, 24)


def plot_confusion(m: dict[str, Any], path: Path) -> Path:
    """Row-normalised confusion matrix with counts in the cells."""
    plt = _plt()
    labels = [_short(x) for x in m["labels"]]
    cm = np.asarray(m["confusion_matrix"], dtype=float)
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    k = len(labels)
    side = max(4.5, 0.55 * k + 2.5)
    fig, ax = plt.subplots(figsize=(side + 1.2, side))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(k), labels, rotation=45, ha="right")
    ax.set_yticks(range(k), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if k <= 20:
        for i in range(k):
            for j in range(k):
                ax.text(
                    j,
                    i,
                    f"{int(cm[i, j])}",
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if norm[i, j] > 0.5 else "black",
                )
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    ax.set_title("Confusion matrix (counts; colour = row share)")
    return _save(fig, path)


def plot_per_class_f1(m: dict[str, Any], path: Path) -> Path:
    plt = _plt()
    items = sorted(m["per_class"].items(), key=lambda kv: kv[1]["f1"])
    names = [f"{_short(k)} (n={v['support']})" for k, v in items]
    fig, ax = plt.subplots(figsize=(7, max(2.5, 0.35 * len(items) + 1.2)))
    ax.barh(range(len(items)), [v["f1"] for _, v in items], color="#4472c4")
    ax.set_yticks(range(len(items)), names)
    ax.set_xlim(0, 1)
    ax.set_xlabel("F1 score")
    ax.set_title("Per-class F1")
    for i, (_, v) in enumerate(items):
        ax.text(min(v["f1"] + 0.01, 0.93), i, f"{v['f1']:.2f}", va="center", fontsize=8)
    return _save(fig, path)


def plot_importance(imp: dict[str, Any], path: Path) -> Path | None:
    """Grouped importance (direction x family) by impurity and by permutation."""
    kinds = [k for k in ("impurity", "permutation") if k in imp]
    if not kinds:
        return None
    plt = _plt()
    groups = sorted({g for k in kinds for g in imp[k]["group"]})
    ref = imp[kinds[-1]]["group"]
    groups.sort(key=lambda g: ref.get(g, 0.0))
    fig, axes = plt.subplots(
        1, len(kinds), figsize=(5.5 * len(kinds), max(3, 0.38 * len(groups) + 1.5)), squeeze=False
    )
    colours = {"upstream": "#c0504d", "downstream": "#4472c4", "biflow": "#7f7f7f"}
    for ax, kind in zip(axes[0], kinds, strict=True):
        vals = [imp[kind]["group"].get(g, 0.0) for g in groups]
        ax.barh(range(len(groups)), vals, color=[colours.get(g.split()[0], "#999") for g in groups])
        ax.set_yticks(range(len(groups)), groups if ax is axes[0][0] else [""] * len(groups))
        ax.set_xlabel(
            "sum of impurity importance" if kind == "impurity" else "drop in macro-F1 when shuffled"
        )
        ax.set_title(f"{kind} importance by direction and family", fontsize=10)
        ax.axvline(0, color="black", linewidth=0.6)
    return _save(fig, path)


def plot_distributions(dist: dict[str, Any], path: Path) -> Path | None:
    """Per-app box plots (5-95 % whiskers) of payload size and inter-arrival time."""
    if not dist or not dist.get("payload_bytes"):
        return None
    plt = _plt()
    apps = list(dist["payload_bytes"])
    fig, axes = plt.subplots(1, 2, figsize=(11, max(3, 0.4 * len(apps) + 1.5)))
    for ax, key, title, log in (
        (axes[0], "payload_bytes", "L4 payload per packet (bytes)", False),
        (axes[1], "iat_seconds", "inter-arrival time (s)", True),
    ):
        stats, names = [], []
        for a in apps:
            s = dist[key].get(a)
            if s:
                stats.append(
                    {
                        **{k: s[k] for k in ("whislo", "q1", "med", "q3", "whishi")},
                        "fliers": [],
                        "label": "",
                    }
                )
                names.append(f"{_short(a, 22)} (n={s['n']})")
        if stats:
            ax.bxp(stats, orientation="horizontal", showfliers=False)
            ax.set_yticks(range(1, len(names) + 1), names)
        if log:
            ax.set_xscale("log")
        ax.set_xlabel(title)
        ax.set_title(title.split(" (")[0] + " per app", fontsize=10)
    fig.suptitle(
        "First packets of each flow, per app (box: quartiles, whiskers: 5-95 %)", fontsize=10
    )
    return _save(fig, path)


def plot_cross_matrix(cross: dict[str, Any], path: Path) -> Path | None:
    if not cross:
        return None
    plt = _plt()
    names = [_short_group(n) for n in cross["names"]]
    mat = np.array([[np.nan if v is None else v for v in row] for row in cross["macro_f1"]])
    k = len(names)
    side = max(4, 0.8 * k + 2.5)
    fig, ax = plt.subplots(figsize=(side + 1.2, side))
    im = ax.imshow(mat, cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(k), names, rotation=45, ha="right")
    ax.set_yticks(range(k), names)
    ax.set_xlabel(f"test {cross['axis']}")
    ax.set_ylabel(f"train {cross['axis']}")
    for i in range(k):
        for j in range(k):
            txt = "n/a" if np.isnan(mat[i, j]) else f"{mat[i, j]:.2f}"
            ax.text(
                j,
                i,
                txt,
                ha="center",
                va="center",
                fontsize=9,
                color="black" if not np.isnan(mat[i, j]) and mat[i, j] > 0.6 else "white",
            )
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="macro-F1")
    ax.set_title(f"Cross-{cross['axis']} macro-F1")
    return _save(fig, path)


def plot_binary(binary: dict[str, Any], path: Path) -> Path | None:
    if not binary or "roc" not in binary:
        return None
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4.2))
    roc, pr = binary["roc"], binary["pr"]
    a.plot(roc["fpr"], roc["tpr"], color="#c0504d")
    a.plot([0, 1], [0, 1], "--", color="grey", linewidth=0.8)
    a.set_xlabel("false positive rate")
    a.set_ylabel("true positive rate")
    a.set_title(f"ROC, positive = {binary['positive']} (AUC {roc['auc']:.3f})", fontsize=10)
    b.plot(pr["recall"], pr["precision"], color="#4472c4")
    base = binary["positives"] / max(1, binary["positives"] + binary["negatives"])
    b.axhline(base, linestyle="--", color="grey", linewidth=0.8)
    b.set_xlabel("recall")
    b.set_ylabel("precision")
    b.set_ylim(0, 1.02)
    b.set_title(f"Precision-recall (AP {pr['average_precision']:.3f})", fontsize=10)
    return _save(fig, path)


def _save(fig: Any, path: Path) -> Path:
    plt = _plt()
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=110)
    except OSError as err:
        raise OutputError(f"cannot write {path}: {err.strerror or err}") from err
    finally:
        plt.close(fig)
    return path


def finding_text(imp: dict[str, Any]) -> str:
    """One sentence per importance kind on whether upstream payload ranks first."""
    parts = []
    for kind in ("permutation", "impurity"):
        f = imp.get(kind, {}).get("finding")
        if not f:
            continue
        if f.get("top_group") is None:
            parts.append(f"By {kind} importance: {html.escape(f.get('note', 'no ranking'))}.")
            continue
        verdict = "confirms" if f["upstream_payload_first"] else "does not confirm"
        parts.append(
            f"By {kind} importance the top group is <b>{html.escape(f['top_group'])}"
            f"</b> (top direction {html.escape(f['top_direction'])}, top family "
            f"{html.escape(f['top_family'])}): this {verdict} that the upstream "
            "L4 payload matters most."
        )
    return " ".join(parts) or "No importance available for this model."


def _table(rows: list[list[Any]], head: list[str]) -> str:
    th = "".join(f"<th>{html.escape(str(h))}</th>" for h in head)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows
    )
    return f"<table><tr>{th}</tr>{body}</table>"


def _held_out(fold: dict[str, Any]) -> str:
    """A fold's test side in a few words: session count and short names, or its groups."""
    if "test_sessions" not in fold:
        return ", ".join(_short_group(g) for g in fold.get("test", []))
    names = []
    for s in fold["test_sessions"]:
        stem = s.rsplit("/", 1)[-1]
        parts = stem.split("_")
        names.append(parts[1] if len(parts) > 2 and parts[0].isdigit() else stem)
    text = ", ".join(names)
    if len(text) > 90:
        text = text[:89] + "…"
    return f"{len(names)} sessions: {text}"


def check_metrics(m: Any, where: str = "metrics") -> dict[str, Any]:
    if not isinstance(m, dict) or any(k not in m for k in REQUIRED_KEYS):
        missing = [k for k in REQUIRED_KEYS if not isinstance(m, dict) or k not in m]
        raise SchemaError(f"{where}: not a flowtruth metrics document (missing {missing})")
    return m


def write_report(
    metrics: dict[str, Any],
    out_dir: str | os.PathLike[str],
    title: str = "flowtruth classifier report",
) -> Path:
    """Write ``metrics.json``, the PNG plots and ``report.html`` into ``out_dir``."""
    check_metrics(metrics)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out} exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str) + "\n")
    except OSError as err:
        raise OutputError(f"cannot write {out}/metrics.json: {err.strerror or err}") from err
    plots = [
        ("Confusion matrix", plot_confusion(metrics, out / "confusion_matrix.png")),
        ("Per-class F1", plot_per_class_f1(metrics, out / "per_class_f1.png")),
        (
            "Feature importance",
            plot_importance(metrics.get("importance", {}), out / "importance.png"),
        ),
        ("ROC and precision-recall", plot_binary(metrics.get("binary", {}), out / "roc_pr.png")),
        (
            "Cross matrix",
            plot_cross_matrix(metrics.get("cross_matrix", {}), out / "cross_matrix.png"),
        ),
        (
            "Per-app distributions",
            plot_distributions(metrics.get("distributions", {}), out / "distributions.png"),
        ),
    ]
    path = out / "report.html"
    try:
        path.write_text(render_html(metrics, [(t, p) for t, p in plots if p], title))
    except OSError as err:
        raise OutputError(f"cannot write {path}: {err.strerror or err}") from err
    return path


def render_html(m: dict[str, Any], plots: list[tuple[str, Path]], title: str) -> str:
    """The report page, with every plot inlined as a data: URI."""
    esc = html.escape
    head = (
        f"<p>Task <b>{esc(str(m.get('task', '?')))}</b>, model <b>{esc(str(m.get('model', '?')))}"
        f"</b>, protocol <b>{esc(str(m.get('protocol', '?')))}</b> (split by "
        f"{esc(str(m.get('split_by', '?')))}), "
        f"{m.get('flows', 0):,} test flows.</p>"
    )
    if m.get("warning"):
        head += f"<p class=warn>{esc(m['warning'])}</p>"
    if m.get("split_by") == "flow":
        head += (
            "<p class=warn>Split by flow: flows of one capture are in both train and test, "
            "so these scores are optimistic; compare with the split by session.</p>"
        )
    if "ndpi" in m.get("dataset", {}).get("per_labeling_type", {}):
        head += (
            "<p class=warn>Labels of type <code>ndpi</code> are nDPI's per-flow verdicts: "
            "nDPI's opinion (e.g. Telegram recognised by IP address), not ground truth."
            "</p>"
        )
    summary = _table(
        [
            [f"{m['accuracy']:.3f}", f"{m['macro_f1']:.3f}", f"{m['weighted_f1']:.3f}"]
            + ([f"{m['binary']['roc']['auc']:.3f}"] if "roc" in m.get("binary", {}) else [])
        ],
        ["accuracy", "macro F1", "weighted F1"]
        + (["ROC AUC"] if "roc" in m.get("binary", {}) else []),
    )
    per_class = _table(
        [
            [k, f"{v['precision']:.3f}", f"{v['recall']:.3f}", f"{v['f1']:.3f}", v["support"]]
            for k, v in m["per_class"].items()
        ],
        ["class", "precision", "recall", "F1", "support"],
    )
    folds = ""
    if m.get("folds"):
        rows = [
            [
                _held_out(f),
                f["train_flows"],
                f["test_flows"],
                f"{f['accuracy']:.3f}",
                f"{f['macro_f1']:.3f}",
            ]
            for f in m["folds"]
        ]
        folds = "<h2>Folds</h2>" + _table(
            rows, ["held out", "train flows", "test flows", "accuracy", "macro F1"]
        )
    card = m.get("dataset", {})
    card_html = ""
    if card:
        rows = [
            [k, ", ".join(f"{a} {n:,}" for a, n in card.get(k, {}).items())]
            for k in ("per_app", "per_device", "per_activity", "per_labeling_type")
        ]
        card_html = (
            f"<h2>Dataset</h2><p>{card.get('flows', 0):,} flows in "
            f"{card.get('sessions', 0)} sessions ({card.get('raw_flows', 0):,} before "
            f"filtering; dropped {esc(json.dumps(card.get('dropped', {})))}).</p>"
            + _table(rows, ["", "counts"])
        )
    imgs = ""
    for t, p in plots:
        data = base64.b64encode(p.read_bytes()).decode("ascii")
        imgs += f"<h2>{esc(t)}</h2><img alt='{esc(t)}' src='data:image/png;base64,{data}'>"
    finding = f"<h2>Which features matter</h2><p>{finding_text(m.get('importance', {}))}</p>"
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;"
        "padding:3px 8px;text-align:left}img{max-width:100%}.warn{color:#a00}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title>"
        f"<style>{style}</style></head><body><h1>{esc(title)}</h1>{head}{summary}"
        f"<h2>Per class</h2>{per_class}{finding}{folds}{card_html}{imgs}</body></html>\n"
    )


def load_metrics(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A saved ``metrics.json`` (or the one in a report directory), checked."""
    p = Path(path)
    if p.is_dir():
        p = p / "metrics.json"
    if not p.is_file():
        raise BadInputError(
            f"no metrics.json at {path}",
            hint="give a report directory written by train or evaluate",
        )
    try:
        m = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise SchemaError(f"{p}: unreadable metrics ({err})") from err
    return check_metrics(m, str(p))
