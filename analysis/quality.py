"""The label-quality report of one labelling: how much of the capture got which label, how.

:func:`quality_report` builds a JSON-ready dict (``schema_version`` 1)::

    {"schema_version": 1,
     "capture": {"files": [...], "packets": P, "packets_in_flows": Q, "bytes": B,
                 "skipped": {reason: packets}},
     "totals": {"flows": F, "packets": Q, "bytes": IP bytes in flows},
     "by_type":   {"exact"|"ambiguous"|"unlabelled"|"resolver"|...: {flows, packets, bytes}},
     "by_source": {"strace"|"netstat"|"frida"|"csv"|"port"|...: {flows, packets, bytes}},
     "by_app":    {label: {flows, packets, bytes, by_type: {type: flows}}},
     "targets": {"packages": [...], "flows", "packets", "bytes"},
     "strace_netstat": {"both", "agree", "disagree"},
     "clock": {"given_offset", "offset_used", "refined", "pairs", "residual_median", ...},
     "inputs": {kind: {"files": [...], "lines", "parsed", "skipped": {reason: lines}}},
     "warnings": [...]}

``by_source`` counts flows that got a label (not ambiguous, not unlabelled) by the
source that gave it. :func:`quality_tables` renders the report as rich tables.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from analysis.flowtable import FlowTable

QUALITY_SCHEMA_VERSION = 1
UNLABELLED_TYPES = ("ambiguous", "unlabelled")
ALWAYS_TYPES = ("exact", "ambiguous", "unlabelled")  # in by_type even when none


def _sums(mask: np.ndarray, pk: np.ndarray, by: np.ndarray) -> dict[str, int]:
    return {"flows": int(mask.sum()), "packets": int(pk[mask].sum()), "bytes": int(by[mask].sum())}


def _grouped(keys: np.ndarray, pk: np.ndarray, by: np.ndarray) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    if not len(keys):
        return out
    text = np.array([str(k) for k in keys.tolist()], dtype=object)
    for k in sorted(set(text.tolist())):
        out[k] = _sums(text == k, pk, by)
    return out


def quality_report(
    table: FlowTable,
    correlation: Mapping[str, Any],
    *,
    targets: Sequence[str] = (),
    inputs: Mapping[str, Mapping[str, Any]] | None = None,
    capture_files: Sequence[str | os.PathLike[str]] = (),
    warnings: Sequence[str] = (),
) -> dict[str, Any]:
    """The report of a labelled table (see the module docstring); ``correlation`` is
    :attr:`analysis.correlate.CorrelationResult.report`."""
    n = len(table)
    pk = table.flows["bf_packets"].astype(np.int64)
    by = table.flows["bf_ip_bytes"].astype(np.int64)
    label = table.label_column("BF_label", "unknown")
    typ = table.label_column("BF_labeling_type", "unlabelled")
    src = table.label_column("BF_label_source")
    typ = np.array([t or "unlabelled" for t in typ.tolist()], dtype=object)
    named = ~np.isin(typ, UNLABELLED_TYPES) if n else np.zeros(0, dtype=bool)
    by_app: dict[str, dict[str, Any]] = {}
    for app, sums in _grouped(label, pk, by).items():
        m = np.array([str(x) == app for x in label.tolist()], dtype=bool)
        types, cnt = np.unique(typ[m].astype(str), return_counts=True)
        by_app[app] = {**sums, "by_type": dict(zip(types.tolist(), cnt.tolist(), strict=True))}
    tmask = (np.isin(label.astype(str), list(targets)) & named) if n and targets \
        else np.zeros(n, dtype=bool)
    cap = table.capture
    clock = dict(correlation.get("clock", {}))
    report: dict[str, Any] = {
        "schema_version": QUALITY_SCHEMA_VERSION,
        "capture": {"files": [os.fspath(p) for p in capture_files], "packets": cap.packets,
                    "packets_in_flows": table.n_packets, "bytes": cap.bytes,
                    "skipped": dict(cap.skipped)},
        "totals": _sums(np.ones(n, dtype=bool), pk, by),
        "by_type": {**{t: {"flows": 0, "packets": 0, "bytes": 0} for t in ALWAYS_TYPES},
                    **_grouped(typ, pk, by)},
        "by_source": _grouped(np.array([s or "none" for s in src[named].tolist()],
                                       dtype=object), pk[named], by[named]),
        "by_app": by_app,
        "targets": {"packages": list(targets), **_sums(tmask, pk, by)},
        "strace_netstat": dict(correlation.get("strace_netstat", {})),
        "clock": clock,
        "correlator": {k: correlation[k] for k in ("observations", "lifetimes", "stages",
                                                   "tightened", "remote_competing")
                       if k in correlation},
        "inputs": {k: dict(v) for k, v in (inputs or {}).items()},
        "warnings": list(warnings) + list(cap.warnings),
    }
    return report


def write_quality(report: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """The report as indented JSON, written atomically."""
    from analysis.atomic import atomic_write

    p = Path(path)
    atomic_write(p, (json.dumps(report, indent=2, sort_keys=False, default=str) + "\n")
                  .encode("utf-8"))
    return p


def _pct(part: int, whole: int) -> str:
    return f"{100.0 * part / whole:.1f} %" if whole else "-"


def quality_tables(report: Mapping[str, Any]) -> list[Any]:
    """rich renderables of the report: counts by labelling type, source and app, then
    strace-netstat agreement and the clock."""
    from rich.table import Table

    tot = report["totals"]
    out = []
    t = Table(title="Labels", title_justify="left")
    for col in ("", "flows", "%", "packets", "%", "bytes", "%"):
        t.add_column(col, justify="left" if not col else "right")

    def row(name: str, s: Mapping[str, int], style: str | None = None) -> None:
        t.add_row(name, f"{s['flows']:,}", _pct(s["flows"], tot["flows"]),
                  f"{s['packets']:,}", _pct(s["packets"], tot["packets"]),
                  f"{s['bytes']:,}", _pct(s["bytes"], tot["bytes"]), style=style)

    for name, s in report["by_type"].items():
        row(f"type {name}", s)
    for name, s in report["by_source"].items():
        row(f"source {name}", s, style="dim")
    if report["targets"]["packages"]:
        row("target app(s)", report["targets"], style="bold")
    row("all flows", tot, style="bold")
    out.append(t)

    a = Table(title="Apps", title_justify="left")
    for col in ("label", "flows", "packets", "bytes", "types"):
        a.add_column(col, justify="left" if col in ("label", "types") else "right")
    apps = sorted(report["by_app"].items(), key=lambda kv: -kv[1]["bytes"])
    for name, s in apps:
        types = ", ".join(f"{k} {v}" for k, v in s["by_type"].items())
        a.add_row(name, f"{s['flows']:,}", f"{s['packets']:,}", f"{s['bytes']:,}", types)
    out.append(a)

    sn = report.get("strace_netstat") or {}
    clock = report.get("clock") or {}
    c = Table(title="Checks", title_justify="left", show_header=False)
    c.add_column("what")
    c.add_column("value")
    if sn and ("netstat" in (report.get("inputs") or {}) or sn.get("both")):
        c.add_row("strace and netstat both saw", f"{sn.get('both', 0):,} flows: "
                  f"{sn.get('agree', 0):,} agree, {sn.get('disagree', 0):,} disagree")
    if clock:
        used = clock.get("offset_used", clock.get("given_offset", 0.0))
        text = f"offset {used:+.4f} s (given {clock.get('given_offset', 0.0):+.4f} s)"
        if clock.get("refined"):
            text += (f", refined from {clock.get('pairs', 0)} connect/SYN pairs, residual "
                     f"median {clock['residual_median'] * 1e3:.2f} ms, "
                     f"p95 {clock['residual_p95'] * 1e3:.2f} ms")
        elif clock.get("reason"):
            text += f", not refined ({clock['reason']})"
        c.add_row("clock", text)
    for kind, s in (report.get("inputs") or {}).items():
        skipped = s.get("skipped") or {}
        text = f"{s.get('parsed', 0):,} of {s.get('lines', 0):,} lines parsed"
        if skipped:
            text += ", skipped: " + ", ".join(f"{v:,} {k}" for k, v in sorted(skipped.items()))
        c.add_row(f"{kind} input", text)
    cap = report.get("capture") or {}
    if cap.get("skipped"):
        c.add_row("capture", f"{cap['packets']:,} packets, not in flows: " + ", ".join(
            f"{v:,} {k}" for k, v in sorted(cap["skipped"].items())))
    out.append(c)
    return out
