"""MIRAGE bi-flow JSON: export a FlowTable, read MIRAGE files back as a DataFrame.

The format is specified in ``shared/spec/mirage-format.md``; key names, key order and
serialisation are kept exactly as MIRAGE writes them, so tcbench's loaders read our
files unchanged. Two layouts: ``mirage2019`` (series of the first 32 packets) and
``mirage2022`` (whole-flow series, device/label-source/activity metadata).

Choices where MIRAGE is silent:

* Unlabelled flows get ``BF_label`` / ``BF_sublabel`` ``"unknown"`` (never an app
  package, so loaders count them as background) and ``BF_labeling_type`` /
  ``BF_label_source`` null. A missing ``BF_activity`` is ``"Unknown"``, MIRAGE's own
  token (tcbench treats it as background).
* Packet times come from nanosecond capture stamps, so ``iat`` is exact rather than
  MIRAGE's float-epoch differences.
* UDP packets have ``TCP_flags`` ``""`` and ``TCP_win_size`` 0. The undocumented 2022
  series ``is_clear``, ``heuristic`` and ``annotations`` are not written.
* Two flows of one capture can share a 5-tuple (port reuse). A MIRAGE file is keyed by
  the 5-tuple alone and tcbench splits the key into exactly five parts, so the k-th
  repeat of a key goes into a numbered sibling file ``<stem>_dup<k>.json`` next to
  the capture's file. Loaders that glob ``*.json`` read it as one more file with the
  same epoch and package tokens; :func:`read_mirage` maps it back to the same session.
"""

from __future__ import annotations

import gc
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from analysis.atomic import atomic_write
from analysis.errors import AnalysisError, BadInputError, ParseError, SchemaError, short
from analysis.flowtable import DIRECTIONS, METRICS, STAT_NAMES, FlowTable, tcp_flags_str

LAYOUTS = ("mirage2019", "mirage2022")
SERIES_2019_PACKETS = 32
UNLABELLED = "unknown"
UNKNOWN_ACTIVITY = "Unknown"

PACKET_DATA_2019 = ("src_port", "dst_port", "packet_dir", "L4_payload_bytes", "iat",
                    "TCP_win_size", "L4_raw_payload")
PACKET_DATA_2022 = ("timestamp", "src_port", "dst_port", "packet_dir", "IP_packet_bytes",
                    "IP_header_bytes", "L4_payload_bytes", "L4_header_bytes", "iat",
                    "TCP_win_size", "TCP_flags", "L4_raw_payload")
_COUNTERS = ("num_packets", "IP_packet_bytes", "L4_payload_bytes", "duration")
FLOW_METADATA_2019 = ("BF_label", "BF_labeling_type",
                      *(f"{p}_{c}" for p in ("BF", "UF", "DF") for c in _COUNTERS))
FLOW_METADATA_2022 = (
    "BF_device", "BF_label_source", "BF_label", "BF_sublabel", "BF_label_version_code",
    "BF_label_version_name", "BF_labeling_type",
    *(f"BF_{c}" for c in _COUNTERS),
    *(f"UF_{c}" for c in _COUNTERS), "UF_MSS", "UF_WS",
    *(f"DF_{c}" for c in _COUNTERS), "DF_MSS", "DF_WS",
    "BF_activity",
)
FILE_SUFFIX = {
    "mirage2019": "MIRAGE-2019_traffic_dataset_labeled_biflows",
    "mirage2022": "mirage2020dataset_labeled_biflows_all_packets_encryption_metadata",
}
KEY_PARTS = ("src_ip", "src_port", "dst_ip", "dst_port", "proto")
_DUP_RE = re.compile(r"_dup(\d+)$")
_PACKAGE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.]*$")
_FLAG_STRINGS = [tcp_flags_str(b) for b in range(256)]


# ---------------------------------------------------------------------------- export


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise BadInputError(f"unknown MIRAGE layout {layout!r}", hint=f"use one of {LAYOUTS}")


def flow_keys(table: FlowTable) -> list[str]:
    """MIRAGE keys ``"src_ip,src_port,dst_ip,dst_port,proto"`` of every flow."""
    src, dst = table.ip_strings()
    return [f"{a},{b},{c},{d},{e}" for a, b, c, d, e in zip(
        src, table.flows["src_port"].tolist(), dst, table.flows["dst_port"].tolist(),
        table.flows["proto"].tolist(), strict=True)]


def duplicate_rank(keys: list[str], first_ts_ns: np.ndarray) -> np.ndarray:
    """For each flow, how many earlier flows (by first packet time) share its key."""
    rank = np.zeros(len(keys), dtype=np.int64)
    seen: dict[str, int] = {}
    for i in np.lexsort((np.arange(len(keys)), first_ts_ns)).tolist():
        k = keys[i]
        rank[i] = seen.get(k, 0)
        seen[k] = rank[i] + 1
    return rank


def _label(table: FlowTable, name: str, fallback: Any) -> list[Any]:
    col = table.labels.get(name)
    if col is None:
        return [fallback] * len(table)
    return [fallback if v is None else v for v in col.tolist()]


def _series_index(table: FlowTable, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Packet numbers written into the series (the first ``limit`` of each flow) and
    the offsets of each flow's slice in that selection."""
    offs = table.pkt_offsets.astype(np.int64)
    counts = np.diff(offs)
    if limit is not None:
        counts = np.minimum(counts, limit)
    sel_offs = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=sel_offs[1:])
    pidx = np.repeat(offs[:-1] - sel_offs[:-1], counts) + np.arange(sel_offs[-1])
    return pidx, sel_offs


def _records(table: FlowTable, layout: str, payload: bool, device: str | None,
             activity: str | None, role: tuple[str, str] | None = None
             ) -> list[dict[str, Any]]:
    """The MIRAGE record of every flow, in table order."""
    _check_layout(layout)
    n = len(table)
    fl = table.flows
    pk = table.packets
    limit = SERIES_2019_PACKETS if layout == "mirage2019" else None
    pidx, soffs = _series_index(table, limit)
    flow_of = np.repeat(np.arange(n), np.diff(soffs))
    dirs = pk["pkt_dir"][pidx]
    sport = fl["src_port"][flow_of]
    dport = fl["dst_port"][flow_of]
    ts = pk["pkt_ts_ns"]
    # Gap to the previous packet of the flow, either direction; element 0 is set to
    # the int 0 below, as MIRAGE writes it.
    gap = np.zeros(len(ts), dtype=np.float64)
    if len(ts) > 1:
        gap[1:] = np.diff(ts) / 1e9
    iat = gap[pidx].tolist()
    starts = soffs[:-1].tolist()
    for s, e in zip(starts, soffs[1:].tolist(), strict=True):
        if e > s:
            iat[s] = 0

    cols: dict[str, list[Any]] = {
        "src_port": np.where(dirs == 0, sport, dport).tolist(),
        "dst_port": np.where(dirs == 0, dport, sport).tolist(),
        "packet_dir": dirs.tolist(),
        "L4_payload_bytes": pk["pkt_payload_len"][pidx].tolist(),
        "iat": iat,
        "TCP_win_size": pk["pkt_tcp_win"][pidx].tolist(),
    }
    if layout == "mirage2022":
        cols["timestamp"] = (ts[pidx] / 1e9).tolist()
        cols["IP_packet_bytes"] = pk["pkt_ip_len"][pidx].tolist()
        cols["IP_header_bytes"] = pk["pkt_ip_hdr_len"][pidx].tolist()
        cols["L4_header_bytes"] = pk["pkt_l4_hdr_len"][pidx].tolist()
        cols["TCP_flags"] = [_FLAG_STRINGS[b] for b in pk["pkt_tcp_flags"][pidx].tolist()]
    if payload and table.payload is not None and table.payload_offsets is not None:
        buf = table.payload
        po = table.payload_offsets
        lo = po[pidx].tolist()
        hi = po[pidx + 1].tolist()
        cols["L4_raw_payload"] = [list(buf[a:b]) for a, b in zip(lo, hi, strict=True)]
    else:
        cols["L4_raw_payload"] = [[] for _ in range(len(pidx))]
    pd_fields = PACKET_DATA_2019 if layout == "mirage2019" else PACKET_DATA_2022
    series = [cols[f] for f in pd_fields]

    stats = fl["stats"].tolist()
    meta: dict[str, list[Any]] = {}
    for p, pre in (("BF", "bf"), ("UF", "uf"), ("DF", "df")):
        meta[f"{p}_num_packets"] = fl[f"{pre}_packets"].tolist()
        meta[f"{p}_IP_packet_bytes"] = fl[f"{pre}_ip_bytes"].tolist()
        meta[f"{p}_L4_payload_bytes"] = fl[f"{pre}_payload_bytes"].tolist()
    meta["BF_duration"] = ((fl["last_ts_ns"] - fl["first_ts_ns"]) / 1e9).tolist()
    for p, pre in (("UF", "uf"), ("DF", "df")):
        dur = ((fl[f"{pre}_last_ts_ns"] - fl[f"{pre}_first_ts_ns"]) / 1e9).tolist()
        # MIRAGE writes the int 0 for a direction without packets.
        meta[f"{p}_duration"] = [d if c else 0 for d, c in
                                 zip(dur, meta[f"{p}_num_packets"], strict=True)]
    meta["BF_label"] = _label(table, "BF_label", UNLABELLED)
    meta["BF_labeling_type"] = _label(table, "BF_labeling_type", None)
    if layout == "mirage2022":
        meta["BF_device"] = _label(table, "BF_device", device)
        meta["BF_label_source"] = _label(table, "BF_label_source", None)
        sub = table.labels.get("BF_sublabel")
        meta["BF_sublabel"] = (list(meta["BF_label"]) if sub is None else
                               [b if s is None else s for s, b in
                                zip(sub.tolist(), meta["BF_label"], strict=True)])
        if role is not None:  # the session's role on its app's flows: "<sublabel>:<role>"
            pkg, r = role
            meta["BF_sublabel"] = [f"{s}:{r}" if b == pkg else s for s, b in
                                   zip(meta["BF_sublabel"], meta["BF_label"], strict=True)]
        meta["BF_label_version_code"] = [None] * n
        meta["BF_label_version_name"] = [None] * n
        for p, pre in (("UF", "uf"), ("DF", "df")):
            meta[f"{p}_MSS"] = fl[f"{pre}_mss"].tolist()
            meta[f"{p}_WS"] = fl[f"{pre}_ws"].tolist()
        meta["BF_activity"] = _label(table, "BF_activity", activity or UNKNOWN_ACTIVITY)
    md_fields = FLOW_METADATA_2019 if layout == "mirage2019" else FLOW_METADATA_2022
    meta_cols = [meta[f] for f in md_fields]

    out: list[dict[str, Any]] = []
    for i in range(n):
        s, e = soffs[i], soffs[i + 1]
        row = stats[i]
        features = {
            m: {d: dict(zip(STAT_NAMES, row[(mi * 3 + di) * 17:(mi * 3 + di + 1) * 17],
                            strict=True))
                for di, d in enumerate(DIRECTIONS)}
            for mi, m in enumerate(METRICS)
        }
        out.append({
            "packet_data": {f: c[s:e] for f, c in zip(pd_fields, series, strict=True)},
            "flow_features": features,
            "flow_metadata": {f: c[i] for f, c in zip(md_fields, meta_cols, strict=True)},
        })
    return out


def to_mirage_parts(table: FlowTable, layout: str = "mirage2019", payload: bool = False,
                    device: str | None = None, activity: str | None = None,
                    role: tuple[str, str] | None = None) -> list[dict[str, Any]]:
    """MIRAGE objects for one capture: part 0 holds every flow's first occurrence of a
    key, part k the k-th repeat of a 5-tuple (see the module docstring). ``role``
    (package, role) appends ``:<role>`` to ``BF_sublabel`` (2022 layout) of the flows
    labelled with that package (see :func:`write_mirage_dir`)."""
    keys = flow_keys(table)
    rank = duplicate_rank(keys, table.flows["first_ts_ns"]).tolist()
    # Millions of small lists and dicts, none of them cyclic: the cyclic collector
    # would rescan them again and again (it more than doubles the time).
    enabled = gc.isenabled()
    gc.disable()
    try:
        recs = _records(table, layout, payload, device, activity, role)
    finally:
        if enabled:
            gc.enable()
    parts: list[dict[str, Any]] = [{}]
    for key, k, rec in zip(keys, rank, recs, strict=True):
        while len(parts) <= k:
            parts.append({})
        parts[k][key] = rec
    return parts


def to_mirage(table: FlowTable, layout: str = "mirage2019", payload: bool = False,
              device: str | None = None, activity: str | None = None) -> dict[str, Any]:
    """The MIRAGE object (key -> record) of one capture's flows.

    ``device`` (MAC) and ``activity`` fill ``BF_device`` / ``BF_activity`` (2022 layout)
    where the flow has no such label; raw payloads are written only with ``payload``.
    Raises AnalysisError when two flows share a 5-tuple: use :func:`to_mirage_parts`.
    """
    parts = to_mirage_parts(table, layout, payload, device, activity)
    if len(parts) > 1:
        raise AnalysisError(
            f"{sum(len(p) for p in parts[1:])} flows repeat the 5-tuple of an earlier flow; "
            "one MIRAGE object cannot hold them",
            hint="use to_mirage_parts() or write_mirage_dir(), which write numbered siblings")
    return parts[0]


def write_mirage(obj: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write a MIRAGE object exactly as MIRAGE does (``json.dump`` defaults), atomically."""
    path = Path(path)
    text = json.dumps(obj)  # the C encoder; json.dump() would use the slow Python one
    atomic_write(path, text.encode("ascii"))
    return path


def _mac_octets(device_mac: str) -> list[str]:
    mac = re.sub(r"[^0-9A-Fa-f]", "", device_mac).lower()
    if len(mac) != 12:
        raise BadInputError(f"{device_mac!r} is not a MAC address", hint="e.g. 38:a4:ed:18:cc:bf")
    return [mac[i:i + 2] for i in range(0, 12, 2)]


def device_folder(device_model: str, device_mac: str) -> str:
    """MIRAGE's device folder name, ``<Model>_<mac with underscores>`` (e.g. ``Mi5_38_a4_ed_18_cc_bf``)."""
    model = re.sub(r"[^A-Za-z0-9.\-]", "", device_model)
    if not model:
        raise BadInputError(f"cannot name a MIRAGE device folder from model {device_model!r}",
                            hint="give a model name with letters or digits")
    return "_".join([model, *_mac_octets(device_mac)])


def mirage_file_name(capture_epoch: int, package: str, layout: str = "mirage2019",
                     dup: int = 0) -> str:
    """``<epoch>_<package>_<MIRAGE suffix>.json`` (with ``_dup<k>`` for the k-th repeat file)."""
    _check_layout(layout)
    if not _PACKAGE_RE.match(package) or "None" in package:
        # MIRAGE loaders take the package as the 2nd "_"-separated token of the name.
        raise BadInputError(f"package name {package!r} cannot appear in a MIRAGE file name",
                            hint="MIRAGE names need letters, digits and dots only")
    stem = f"{int(capture_epoch)}_{package}_{FILE_SUFFIX[layout]}"
    return f"{stem}_dup{dup}.json" if dup else f"{stem}.json"


def write_mirage_dir(table: FlowTable, out_dir: str | os.PathLike[str], package: str,
                     device_model: str, device_mac: str, capture_epoch: int,
                     layout: str = "mirage2019", payload: bool = False,
                     activity: str | None = None, role: str | None = None) -> list[Path]:
    """Write one capture as ``<out_dir>/<Model>_<mac>/<epoch>_<package>_...json``.

    Returns the files written: the capture's file, then any ``_dup<k>`` siblings.
    ``BF_device`` (2022 layout) defaults to ``device_mac`` written ``aa:bb:cc:dd:ee:ff``.
    ``role`` (a paired session's ``caller``/``callee``; ``solo`` or None: nothing) goes
    into ``BF_sublabel`` of the flows labelled ``package`` as its last ``:`` part,
    ``<package>[:<process>]:<role>``: tcbench still takes the package as the part before
    the first ``:``, and ``BF_activity`` keeps the activity.
    """
    folder = Path(out_dir) / device_folder(device_model, device_mac)
    names = [mirage_file_name(capture_epoch, package, layout)]  # validates first
    parts = to_mirage_parts(table, layout, payload, device=":".join(_mac_octets(device_mac)),
                            activity=activity,
                            role=(package, role) if role and role != "solo" else None)
    written = []
    for k, part in enumerate(parts):
        name = names[0] if k == 0 else mirage_file_name(capture_epoch, package, layout, k)
        written.append(write_mirage(part, folder / name))
    return written


# ---------------------------------------------------------------------------- import


MAX_NAME = 128
"""Longest flattened field name read (MIRAGE's longest is under 60 characters)."""
MAX_DEPTH = 4
"""Deepest nesting of objects in a bi-flow record (MIRAGE: flow_features/metric/direction)."""
MAX_FIELDS = 512
"""Most fields in one bi-flow record, and distinct columns over all files (MIRAGE: ~150)."""
MAX_PORT = 65535
MAX_PROTO = 255
_SCALARS = (str, int, float, bool, type(None))
_NUMERIC_SERIES = {f"packet_data_{k}" for k in (*PACKET_DATA_2022, *PACKET_DATA_2019)
                   if k not in ("TCP_flags", "L4_raw_payload")}


def _flatten(prefix: str, value: Any, out: dict[str, Any], path: Path, key: str,
             depth: int = 0) -> None:
    """Flatten one record section into ``out``, within the name, depth and field limits."""
    if isinstance(value, dict) and prefix.startswith("packet_data_"):
        _check_series(prefix, value, path, key)
    if isinstance(value, dict):
        if depth >= MAX_DEPTH:
            raise SchemaError(f"{short(path)}: flow {short(key, 80)}: {short(prefix, 80)} nests "
                              f"deeper than {MAX_DEPTH} objects (not a MIRAGE record)")
        for k, v in value.items():
            name = f"{prefix}_{k}"
            if len(name) > MAX_NAME:
                raise SchemaError(f"{short(path)}: flow {short(key, 80)}: field name "
                                  f"{short(name, 80)} is longer than {MAX_NAME} characters "
                                  "(not a MIRAGE field)")
            _flatten(name, v, out, path, key, depth + 1)
        return
    if len(out) >= MAX_FIELDS:
        raise SchemaError(f"{short(path)}: flow {short(key, 80)} has more than {MAX_FIELDS} "
                          "fields (not a MIRAGE record)")
    if prefix.startswith("packet_data_"):
        _check_series(prefix, value, path, key)
    elif not isinstance(value, _SCALARS) or (isinstance(value, int) and abs(value) >= 1 << 63):
        raise SchemaError(f"{short(path)}: flow {short(key, 80)}: {short(prefix, 80)} is not a "
                          "number, text or null")
    out[prefix] = value


def _check_series(name: str, value: Any, path: Path, key: str) -> None:
    """A ``packet_data`` series is a list; the known numeric series hold numbers only."""
    if value is None:
        return
    if not isinstance(value, list):
        raise SchemaError(f"{short(path)}: flow {short(key, 80)}: {short(name, 80)} is not a "
                          f"list (a {type(value).__name__})")
    if name not in _NUMERIC_SERIES:
        return
    for v in value:
        if not isinstance(v, (int, float, type(None))) or (
                isinstance(v, int) and abs(v) >= 1 << 63):
            raise SchemaError(f"{short(path)}: flow {short(key, 80)}: {short(name, 80)} holds "
                              "a value that is not a number")


def _app_token(stem: str) -> str:
    parts = stem.split("_")
    if len(parts) < 2:
        return ""
    # MIRAGE-AppAct-2024 puts the device MAC (with ':') before the package.
    if ":" in parts[1] and len(parts) > 2:
        return parts[2]
    return parts[1]


def _load(path: Path) -> dict[str, Any]:
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ParseError(path, err.start, "not UTF-8 text") from err
    except OSError as err:
        raise BadInputError(f"cannot read {path}: {err.strerror or err}") from err
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        raise ParseError(path, f"line {err.lineno} column {err.colno}", err.msg) from None
    except RecursionError:
        raise ParseError(path, None, "JSON nested too deeply (not a MIRAGE file)") from None
    except ValueError as err:  # e.g. an integer of more digits than Python converts
        raise ParseError(path, None, f"bad JSON value: {str(err).splitlines()[0]}") from None
    finally:
        del text
    if not isinstance(obj, dict):
        raise SchemaError(f"{path}: not a MIRAGE file (the top level is not an object)")
    return obj


def _file_rows(path: Path) -> list[dict[str, Any]]:
    obj = _load(path)
    stem = path.stem
    session = _DUP_RE.sub("", stem)
    rows = []
    for key, rec in obj.items():
        parts = key.split(",") if len(key) <= 200 else []
        try:
            if len(parts) != 5 or any(len(p) > 45 for p in parts):
                raise ValueError
            row: dict[str, Any] = {"src_ip": parts[0], "src_port": int(parts[1]),
                                   "dst_ip": parts[2], "dst_port": int(parts[3]),
                                   "proto": int(parts[4])}
            if not (0 <= row["src_port"] <= MAX_PORT and 0 <= row["dst_port"] <= MAX_PORT
                    and 0 <= row["proto"] <= MAX_PROTO):
                raise ValueError
        except ValueError:
            raise ParseError(path, f"flow key {short(repr(key), 80)}",
                             "not <src_ip>,<src_port>,<dst_ip>,<dst_port>,<proto> "
                             "(ports 0-65535, protocol 0-255)") from None
        if not isinstance(rec, dict) or not all(
                isinstance(rec.get(s), dict) for s in ("packet_data", "flow_metadata")):
            raise SchemaError(f"{short(path)}: flow {short(repr(key), 80)} is not a MIRAGE "
                              "bi-flow record (needs packet_data and flow_metadata objects)")
        for section, value in rec.items():
            if len(section) > MAX_NAME:
                raise SchemaError(f"{short(path)}: flow {short(repr(key), 80)}: section name "
                                  f"longer than {MAX_NAME} characters (not a MIRAGE record)")
            _flatten(section, value, row, path, key)
        row["session"] = session
        row["device"] = path.parent.name
        row["app"] = _app_token(stem)
        row["file"] = str(path)
        rows.append(row)
    return rows


def _column(values: list[Any]) -> Any:
    import pandas as pd

    # Exact Python types decide the dtype, so that re-export writes the same tokens:
    # a column mixing 0 and 0.5 stays object, except the durations (see dataframe_to_mirage).
    kinds = {type(v) for v in values}
    if kinds == {float}:
        return np.array(values, dtype=np.float64)
    if kinds == {int}:
        return np.array(values, dtype=np.int64)
    return pd.Series(values, dtype=object)


def read_mirage(path: str | os.PathLike[str] | Iterable[str | os.PathLike[str]]) -> Any:
    """Read MIRAGE JSON (one file, a directory tree of them, or a list of files) into a
    pandas DataFrame with one row per bi-flow.

    Columns: ``src_ip``, ``src_port``, ``dst_ip``, ``dst_port``, ``proto``; every record
    field flattened with ``_`` in MIRAGE's spelling (``packet_data_iat`` as lists,
    ``flow_features_packet_length_biflow_min``, ``flow_metadata_BF_label``); then
    ``session`` (file stem, ``_dup<k>`` removed), ``device`` (parent folder), ``app``
    (package token of the file name) and ``file``. A field absent from a file (mixed
    layouts) is ``pd.NA``.
    """
    import pandas as pd

    if isinstance(path, (str, os.PathLike)):
        p = Path(path)
        if p.is_dir():
            # hidden files are not flows: temp files, an output set's .flowtruth-set.json
            files = sorted(f for f in p.rglob("*.json")
                           if f.is_file() and not f.name.startswith("."))
            if not files:
                raise BadInputError(f"no MIRAGE .json files under {p}")
        elif p.exists():
            files = [p]
        else:
            raise BadInputError(f"no such file or directory: {p}")
    else:
        files = [Path(f) for f in path]
    rows: list[dict[str, Any]] = []
    enabled = gc.isenabled()
    gc.disable()  # many small acyclic containers (see to_mirage_parts)
    try:
        for f in files:
            rows.extend(_file_rows(f))
    finally:
        if enabled:
            gc.enable()
    columns: dict[str, None] = {}
    for r in rows:
        for k in r:
            columns.setdefault(k, None)
        if len(columns) > MAX_FIELDS:
            raise SchemaError(f"{short(r['file'])}: the MIRAGE files together have more than "
                              f"{MAX_FIELDS} distinct fields (not MIRAGE records)")
    if not rows:  # files without bi-flows: the key columns, no rows
        columns = dict.fromkeys((*KEY_PARTS, "session", "device", "app", "file"))
    names = list(columns)
    if any(len(r) != len(names) for r in rows):
        rows = [{k: r.get(k, pd.NA) for k in names} for r in rows]
    data = {name: _column([r[name] for r in rows]) for name in names}
    df = pd.DataFrame(data, columns=names)
    return df


def _split_feature(name: str) -> tuple[str, str, str]:
    rest = name[len("flow_features_"):]
    for m in METRICS:
        if rest.startswith(m + "_"):
            rest2 = rest[len(m) + 1:]
            for d in DIRECTIONS:
                if rest2.startswith(d + "_"):
                    return m, d, rest2[len(d) + 1:]
    raise SchemaError(f"column {name!r} is not a MIRAGE flow feature",
                      hint="flow_features_<packet_length|iat>_<direction>_<stat>")


def _plain(v: Any) -> Any:
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    return v


def dataframe_to_mirage(df: Any) -> dict[str, Any]:
    """The MIRAGE object of the rows of ``df`` (as :func:`read_mirage` returns them).

    Field order follows the column order; ``pd.NA`` cells are left out; a duration of a
    direction with no packets becomes the int 0, as MIRAGE writes it.
    """
    import pandas as pd

    missing = [c for c in KEY_PARTS if c not in df.columns]
    if missing:
        raise SchemaError(f"cannot build MIRAGE keys: missing columns {missing}")
    keys = [f"{a},{b},{c},{d},{e}" for a, b, c, d, e in
            zip(*(df[c].tolist() for c in KEY_PARTS), strict=True)]
    if len(set(keys)) != len(keys):
        raise SchemaError("rows repeat a 5-tuple; one MIRAGE object cannot hold them",
                          hint="convert each session/file separately")
    fields: list[tuple[str, tuple[str, ...], list[Any]]] = []
    for col in df.columns:
        if col.startswith("packet_data_"):
            path: tuple[str, ...] = ("packet_data", col[len("packet_data_"):])
        elif col.startswith("flow_features_"):
            path = ("flow_features", *_split_feature(col))
        elif col.startswith("flow_metadata_"):
            path = ("flow_metadata", col[len("flow_metadata_"):])
        else:
            continue
        values = df[col].tolist()
        name = path[-1]
        if path[0] == "flow_metadata" and name[:3] in ("BF_", "UF_", "DF_") \
                and name.endswith("_duration") and f"flow_metadata_{name[:3]}num_packets" in df:
            counts = df[f"flow_metadata_{name[:3]}num_packets"].tolist()
            values = [0 if c == 0 and v == 0 else v for v, c in zip(values, counts, strict=True)]
        fields.append((path[0], path[1:], values))
    out: dict[str, Any] = {}
    for i, key in enumerate(keys):
        rec: dict[str, Any] = {}
        for section, sub, values in fields:
            v = values[i]
            if v is pd.NA:
                continue
            node = rec.setdefault(section, {})
            for part in sub[:-1]:
                node = node.setdefault(part, {})
            node[sub[-1]] = _plain(v)
        out[key] = rec
    return out
