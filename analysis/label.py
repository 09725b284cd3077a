"""The labelling pipeline: a capture and its socket traces to labelled outputs.

:func:`label_capture` reads the capture(s) into bi-flows, parses every trace given
(strace logs per package, the netstat poller's log, frida events, a label CSV, a uid
map), runs the correlator and writes into ``out_dir``:

* MIRAGE JSON with MIRAGE naming, ``<Model>_<mac>/<epoch>_<package>_<suffix>.json``
  (the package is the first target app);
* ``filtered.pcap``: only the packets of flows labelled with a target app;
* ``labelled.pcapng``: every packet, each with a ``flowtruth: app=... type=...``
  comment (see :mod:`analysis.pcapng_out`);
* ``labels.csv``: one row per labelled flow in the generic label CSV format
  (``proto,local_ip,local_port,remote_ip,remote_port,label,start,end,labeling_type``,
  then ``sublabel,source``), so the labels can be applied again with ``--labels-csv``;
  ambiguous and unlabelled flows have no row;
* ``quality.json``: the label-quality report (see :mod:`analysis.quality`).

:func:`label_run` does the same for a run directory, taking files, device, apps and
clock offset from its manifest (:mod:`analysis.runinfo`).

When the correlator could refine the clock from connect()/SYN pairs, the flows are
correlated a second time with that offset and a tolerance of three times the median
residual (at least 50 ms) instead of the loose first-pass one, on both sides of every
socket's lifetime; the report's ``clock.tolerance`` says which was used.

Damaged trace lines are counted and reported, never fatal; when no trace file gives a
single usable line, :class:`BadInputError` says what was skipped.
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
import ipaddress
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from analysis.assemble import FlowOptions, parse_device_nets, read_flows
from analysis.errors import BadInputError
from analysis.flowtable import FlowTable
from analysis.traces.model import ObservationSet, ParseStats

OUTPUT_FORMATS = ("mirage2019", "mirage2022")
LABELS_CSV_COLUMNS = ("proto", "local_ip", "local_port", "remote_ip", "remote_port", "label",
                      "start", "end", "labeling_type", "sublabel", "source")
NOT_A_LABEL = ("ambiguous", "unlabelled")
MIN_TOLERANCE = 0.05  # seconds: the least socket/flow time slack of the second pass
PathLike = str | os.PathLike[str]


@dataclass
class LabelResult:
    """A labelling's table, correlator result, quality report and files written."""

    table: FlowTable
    correlation: Any  # analysis.correlate.CorrelationResult
    quality: dict[str, Any]
    targets: list[str]
    outputs: dict[str, Any] = field(default_factory=dict)  # kind -> Path or [Path]
    inputs: dict[str, ParseStats] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    device_ips: list[str] = field(default_factory=list)

    def line(self) -> str:
        """One line for a user: flows, how they were labelled, the target's share."""
        q = self.quality
        n = q["totals"]["flows"]
        parts = [f"{n:,} bi-flows"]
        for t in ("exact", "background", "resolver", "ambiguous", "unlabelled"):
            k = q["by_type"].get(t, {}).get("flows", 0)
            if k:
                parts.append(f"{k:,} {t}")
        s = ", ".join(parts)
        if self.targets:
            tg = q["targets"]
            s += f"; {', '.join(self.targets)}: {tg['flows']:,} flows, {tg['packets']:,} packets"
        return s


# ----------------------------------------------------------------------------- inputs

def _exists(path: PathLike, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise BadInputError(f"{p}: no such file", f"the {what} named on the command line")
    return p


def strace_files(strace: Mapping[str, Iterable[PathLike]] | Iterable[PathLike]
                 ) -> list[tuple[Path, str | None]]:
    """(log, process name) pairs: a directory gives its launcher logs, each named by its
    file name; a file given for a package gets that package (a launcher name of the same
    package keeps its ``pkg:service`` process)."""
    from analysis.traces.strace import process_from_filename

    items: list[tuple[str | None, PathLike]] = []
    if isinstance(strace, Mapping):
        for pkg, paths in strace.items():
            if isinstance(paths, (str, os.PathLike)):
                paths = [paths]
            items.extend((pkg or None, p) for p in paths)
    else:
        items.extend((None, p) for p in strace)
    out: list[tuple[Path, str | None]] = []
    for pkg, p in items:
        p = _exists(p, "strace log")
        if p.is_dir():
            logs = sorted(q for q in p.iterdir()
                          if q.is_file() and process_from_filename(q) is not None)
            if not logs:
                raise BadInputError(f"{p}: no strace.<pid>.<procname>.log files in this directory",
                                    "give the launcher's output directory or a log file")
            for q in logs:
                got = process_from_filename(q)
                out.append((q, got[1] if got else pkg))
            continue
        got = process_from_filename(p)
        proc = pkg
        if got is not None and (pkg is None or got[1].split(":", 1)[0] == pkg):
            proc = got[1]
        out.append((p, proc))
    # A log named twice (on its own and in its directory) is read once, as first named.
    seen: set[Path] = set()
    unique = []
    for p, proc in out:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            unique.append((p, proc))
    return unique


def _stats_dict(st: ParseStats, files: list[str]) -> dict[str, Any]:
    return {"files": files, "lines": st.lines, "parsed": st.parsed,
            "skipped": dict(st.skipped), "other": dict(st.other)}


def _parse_one(kind: str, path: Path, it_fn: Callable[..., Iterable[Any]],
               stats: dict[str, ParseStats], warnings: list[str]) -> ObservationSet:
    st = ParseStats()
    obs = ObservationSet.from_source(path, it_fn(stats=st), st)
    if st.lines and not st.parsed:
        warnings.append(f"{path}: nothing usable in {kind} input ({st.summary()})")
    elif st.n_skipped:
        warnings.append(f"{path}: {st.summary()}")
    elif not st.lines:
        warnings.append(f"{path}: empty {kind} input")
    warnings.extend(st.warnings)
    stats.setdefault(kind, ParseStats()).merge(replace(st, warnings=[]))
    return obs


def collect(
    *,
    strace: Sequence[tuple[Path, str | None]] = (),
    netstat: Sequence[PathLike] = (),
    frida: Sequence[PathLike] = (),
    labels_csv: Sequence[PathLike] = (),
    pcapdroid: Sequence[PathLike] = (),
    date: str | _dt.date | None = None,
    utc_offset: float = 0.0,
) -> tuple[ObservationSet, dict[str, ParseStats], dict[str, list[str]], list[str]]:
    """Every trace parsed: observations, stats per kind of source, files per kind, warnings."""
    from analysis.traces.csvlabels import iter_csv_labels, iter_pcapdroid_csv
    from analysis.traces.frida import iter_frida_events
    from analysis.traces.netstat import iter_netstat_observations
    from analysis.traces.strace import iter_socket_observations

    stats: dict[str, ParseStats] = {}
    files: dict[str, list[str]] = {}
    warnings: list[str] = []
    sets = []
    for p, proc in strace:
        files.setdefault("strace", []).append(str(p))
        sets.append(_parse_one("strace", p, partial(
            iter_socket_observations, p, process=proc, date=date, utc_offset=utc_offset),
            stats, warnings))
    parsers: tuple[tuple[str, Sequence[PathLike], Callable[..., Iterable[Any]]], ...] = (
        ("netstat", netstat, iter_netstat_observations), ("frida", frida, iter_frida_events),
        ("csv", labels_csv, iter_csv_labels), ("pcapdroid", pcapdroid, iter_pcapdroid_csv))
    for kind, paths, fn in parsers:
        for name in paths:
            q = _exists(name, f"{kind} file")
            files.setdefault(kind, []).append(str(q))
            sets.append(_parse_one(kind, q, partial(fn, q), stats, warnings))
    return ObservationSet.concat(sets), stats, files, warnings


def _nothing_usable(stats: dict[str, ParseStats], files: dict[str, list[str]]) -> str | None:
    if not files:
        return "no trace given"
    if any(st.parsed for st in stats.values()):
        return None
    return "; ".join(f"{k} ({len(files.get(k, []))} file(s)): {st.summary()}"
                     for k, st in stats.items())


def infer_device_ips(obs: ObservationSet) -> list[str]:
    """The phone's own addresses as its traces name them (local side, not loopback)."""
    if not len(obs):
        return []
    out = set()
    for code in np.unique(obs.local_ip[obs.local_ip >= 0]).tolist():
        text = obs.strings[code]
        try:
            a = ipaddress.ip_address(text)
        except ValueError:
            continue
        if not (a.is_loopback or a.is_unspecified or a.is_multicast or a.is_link_local):
            out.add(str(a))
    return sorted(out)


# ----------------------------------------------------------------------------- outputs

def labels_csv_text(table: FlowTable) -> str:
    """``labels.csv``: one row per flow that got a label (see the module docstring)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(LABELS_CSV_COLUMNS)
    src, dst = table.ip_strings()
    fl = table.flows
    lab = table.label_column("BF_label", "unknown").tolist()
    typ = table.label_column("BF_labeling_type", "unlabelled").tolist()
    sub = table.label_column("BF_sublabel").tolist()
    source = table.label_column("BF_label_source").tolist()
    proto = fl["proto"].tolist()
    sport, dport = fl["src_port"].tolist(), fl["dst_port"].tolist()
    first, last = fl["first_ts_ns"].tolist(), fl["last_ts_ns"].tolist()
    for i in range(len(table)):
        if typ[i] in NOT_A_LABEL or not lab[i] or lab[i] == "unknown":
            continue
        w.writerow(["tcp" if proto[i] == 6 else "udp", src[i], sport[i], dst[i], dport[i],
                    lab[i], f"{first[i] / 1e9:.6f}", f"{last[i] / 1e9:.6f}", typ[i],
                    sub[i] or "", source[i] or ""])
    return buf.getvalue()


def target_mask(table: FlowTable, targets: Sequence[str]) -> np.ndarray:
    """Flows labelled with one of ``targets`` (not ambiguous, not unlabelled)."""
    n = len(table)
    if not n or not targets:
        return np.zeros(n, dtype=bool)
    lab = table.label_column("BF_label", "unknown").astype(str)
    typ = table.label_column("BF_labeling_type", "unlabelled")
    return np.isin(lab, list(targets)) & ~np.isin(typ.astype(str), NOT_A_LABEL)


# ----------------------------------------------------------------------------- pipeline

def label_capture(
    pcap_files: Sequence[PathLike] | PathLike,
    *,
    strace: Mapping[str, Iterable[PathLike]] | Iterable[PathLike] = (),
    netstat: PathLike | Sequence[PathLike] | None = None,
    frida: PathLike | Sequence[PathLike] | None = None,
    labels_csv: PathLike | Sequence[PathLike] | None = None,
    pcapdroid: PathLike | Sequence[PathLike] | None = None,
    uid_map: PathLike | Mapping[int, Any] | None = None,
    device_ips: Sequence[str] = (),
    clock_offset: float = 0.0,
    targets: Sequence[str] | None = None,
    fmt: str = "mirage2019",
    out_dir: PathLike | None = None,
    device_model: str | None = None,
    device_mac: str | None = None,
    activity: str | None = None,
    role: str | None = None,
    date: str | _dt.date | None = None,
    flow_options: FlowOptions | None = None,
    tolerance: float = 1.0,
) -> LabelResult:
    """Label every bi-flow of the capture(s) from the traces; write the outputs into
    ``out_dir`` when given (see the module docstring).

    ``strace`` maps a package to its log files or launcher directories; ``targets``
    (default: those packages) are the apps whose flows ``filtered.pcap`` keeps.
    ``clock_offset`` is phone minus AP seconds. ``role`` (a paired session's
    ``caller``/``callee``) goes into ``BF_sublabel`` of the MIRAGE 2022 layout.
    """
    from analysis.correlate import correlate, flowkeys_from_table
    from analysis.quality import quality_report

    if fmt not in OUTPUT_FORMATS:
        raise BadInputError(f"unknown format {fmt!r}", f"choose one of {', '.join(OUTPUT_FORMATS)}")
    pcaps = [pcap_files] if isinstance(pcap_files, (str, os.PathLike)) else list(pcap_files)
    if not pcaps:
        raise BadInputError("no capture given", "give --pcap FILE")
    pcaps = [_exists(p, "capture") for p in pcaps]

    def many(x: PathLike | Sequence[PathLike] | None) -> list[PathLike]:
        if x is None:
            return []
        return [x] if isinstance(x, (str, os.PathLike)) else list(x)

    s_files = strace_files(strace)
    if targets is None:
        targets = [k for k in strace.keys() if k] if isinstance(strace, Mapping) else []
        if not targets:
            targets = sorted({(proc or "").split(":", 1)[0] for _, proc in s_files} - {""})
    targets = [t for t in targets if t]
    obs, stats, files, warnings = collect(strace=s_files, netstat=many(netstat),
                                          frida=many(frida), labels_csv=many(labels_csv),
                                          pcapdroid=many(pcapdroid), date=date)
    why = _nothing_usable(stats, files)
    if why is not None:
        raise BadInputError(f"nothing usable to label with: {why}",
                            "give strace logs, a netstat log, frida events, a label CSV or a "
                            "PCAPdroid export")
    if not len(obs):
        warnings.append("the traces hold no socket events: every flow stays unlabelled")

    umap: dict[int, Any] = {}
    if isinstance(uid_map, Mapping):
        umap.update(uid_map)
    elif uid_map is not None:
        from analysis.traces.uidmap import load_uid_map

        ust = ParseStats()
        umap.update(load_uid_map(_exists(uid_map, "uid map"), ust))
        stats["packages"] = ust
        files["packages"] = [str(uid_map)]
        if ust.lines and not ust.parsed:
            warnings.append(f"{uid_map}: no package lines ({ust.summary()})")

    ips = list(device_ips) or infer_device_ips(obs)
    try:
        parse_device_nets(ips)
    except ValueError as err:
        raise BadInputError(f"device address: {err}", "e.g. --device-ip 192.168.77.10") from None
    opts = replace(flow_options or FlowOptions(), device_nets=tuple(ips))
    table = read_flows(pcaps, opts)

    fk = flowkeys_from_table(table)
    res = correlate(fk, obs, clock_offset=clock_offset, target_packages=targets,
                    uid_map=umap or None, tolerance=tolerance)
    clock = res.report.get("clock", {})
    if clock.get("refined"):
        # Second pass with the refined clock and a tolerance from its spread on both
        # sides of a socket's life: the correlator widens the start side by the full
        # tolerance, so a socket opened (say) 0.5 s after another app's flow on the same
        # port ended would still claim that flow.
        tight = max(MIN_TOLERANCE, 3.0 * float(clock["residual_median"]))
        if tight < tolerance:
            res = correlate(fk, obs, clock_offset=res.clock_offset, refine_clock=False,
                            target_packages=targets, uid_map=umap or None, tolerance=tight)
            res.report["clock"] = {**clock, "tolerance": tight, "second_pass": True}
    res.apply(table)
    inputs = {k: _stats_dict(st, files.get(k, [])) for k, st in stats.items()}
    quality = quality_report(table, res.report, targets=targets, inputs=inputs,
                             capture_files=pcaps, warnings=warnings)
    quality["device_ips"] = ips
    result = LabelResult(table, res, quality, list(targets), inputs=stats, warnings=warnings,
                         device_ips=ips)
    if out_dir is not None:
        write_outputs(result, pcaps, out_dir, fmt=fmt, device_model=device_model,
                      device_mac=device_mac, activity=activity, role=role)
    return result


def write_outputs(result: LabelResult, pcaps: Sequence[PathLike], out_dir: PathLike, *,
                  fmt: str = "mirage2019", device_model: str | None = None,
                  device_mac: str | None = None, activity: str | None = None,
                  role: str | None = None) -> None:
    """MIRAGE JSON, filtered.pcap, labelled.pcapng, labels.csv and quality.json, written
    as one set: into a directory beside ``out_dir`` that then takes its place atomically
    (:func:`analysis.atomic.atomic_dir`), so ``out_dir`` holds the complete old set or the
    complete new one, whatever interrupts the writing."""
    from analysis.atomic import atomic_dir, atomic_write
    from analysis.mirage import write_mirage_dir
    from analysis.pcapng_out import write_filtered_pcap, write_labelled_pcapng
    from analysis.quality import write_quality

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise BadInputError(f"{out} exists and is not a directory", "give a directory for --out")
    table = result.table
    package = result.targets[0] if result.targets else "unknown"
    epoch = (table.capture.first_ts_ns or 0) // 1_000_000_000
    with atomic_dir(out) as tmp:
        mirage = write_mirage_dir(
            table, tmp, package, device_model or "flowtruth",
            device_mac or "00:00:00:00:00:00", epoch, fmt, activity=activity, role=role)
        result.outputs["mirage"] = [out / p.relative_to(tmp) for p in mirage]
        keep = target_mask(table, result.targets)
        fst = write_filtered_pcap(pcaps, table, keep, tmp / "filtered.pcap")
        result.outputs["filtered"] = out / "filtered.pcap"
        lst = write_labelled_pcapng(pcaps, table, tmp / "labelled.pcapng")
        result.outputs["labelled"] = out / "labelled.pcapng"
        atomic_write(tmp / "labels.csv", labels_csv_text(table).encode("utf-8"))
        result.outputs["labels_csv"] = out / "labels.csv"
        result.quality["outputs"] = {
            "mirage": [str(p) for p in result.outputs["mirage"]],
            "filtered_pcap": {"path": str(out / "filtered.pcap"), "packets": fst.written,
                              "skipped": fst.skipped},
            "labelled_pcapng": {"path": str(out / "labelled.pcapng"), "packets": lst.written},
            "labels_csv": str(out / "labels.csv"),
        }
        write_quality(result.quality, tmp / "quality.json")
        result.outputs["quality"] = out / "quality.json"


def label_run(
    run_dir: PathLike,
    *,
    out_dir: PathLike | None = None,
    fmt: str = "mirage2019",
    device_ips: Sequence[str] = (),
    clock_offset: float | None = None,
    flow_options: FlowOptions | None = None,
    write: bool = True,
) -> LabelResult:
    """Label a run directory made by the session engine, from its manifest; outputs go
    to ``out_dir`` (default ``RUN_DIR/labels``)."""
    from analysis.runinfo import load_manifest

    m = load_manifest(run_dir)
    mpath = (m.run_dir or Path(run_dir)) / "manifest.json"

    def need(name: str, field_name: str) -> Path:
        p = m.path(name)
        if not p.exists():
            raise BadInputError(f"{mpath}: field {field_name} names {name}, which does not exist",
                                "was the run pulled completely?")
        return p

    pcaps = [need(f, f"capture.files[{i}]") for i, f in enumerate(m.capture.files)]
    s_paths = [need(f, f"traces.strace[{i}]") for i, f in enumerate(m.traces.strace)]
    target = m.packages[0] if m.packages else None
    # Launcher logs name their process; other logs (and directories' unnamed files)
    # belong to the run's app.
    from analysis.traces.strace import process_from_filename

    strace: dict[str, list[PathLike]] = {}
    for p in s_paths:
        named = p.is_dir() or process_from_filename(p) is not None
        strace.setdefault("" if named else (target or ""), []).append(p)
    umap: dict[int, Any] = {}
    # The phone's package list (``pm list packages -U --show-versioncode``, written by the
    # session engine): names the uid of every app, background apps included. A manifest
    # that does not name it still finds RUN_DIR/packages.txt.
    pk_path = (need(m.traces.packages, "traces.packages") if m.traces.packages
               else (m.run_dir or Path(run_dir)) / "packages.txt")
    pk_stats = ParseStats()
    if pk_path.is_file():
        from analysis.traces.uidmap import load_uid_map

        umap.update(load_uid_map(pk_path, pk_stats))
    for uid, pk in m.uid_map().items():
        umap.setdefault(uid, pk)
    ips = list(device_ips) or ([m.device.ip] if m.device.ip else [])
    started = m.started_at
    result = label_capture(
        pcaps,
        strace=strace,
        netstat=need(m.traces.netstat, "traces.netstat") if m.traces.netstat else None,
        frida=need(m.traces.frida, "traces.frida") if m.traces.frida else None,
        uid_map=umap or None,
        device_ips=ips,
        clock_offset=m.clock.offset_s if clock_offset is None else clock_offset,
        targets=m.packages,
        fmt=fmt,
        out_dir=(Path(out_dir) if out_dir is not None else (m.run_dir or Path(run_dir)) / "labels")
        if write else None,
        device_model=m.device.model,
        device_mac=m.device.mac,
        activity=m.activity,
        role=m.scenario.role if m.scenario is not None else None,
        date=started.astimezone(_dt.UTC).date() if started is not None else None,
        flow_options=flow_options,
    )
    if pk_stats.lines and not pk_stats.parsed:
        result.warnings.append(f"{pk_path}: no package lines, background apps stay uid:N "
                               f"({pk_stats.summary()})")
    return result
