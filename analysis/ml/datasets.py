"""Labelled bi-flows from MIRAGE JSON, Parquet and captures as one pandas table.

Every loader returns the same columns (see :data:`META_COLUMNS`): the flow key,
``session`` (one capture), ``device``, ``app`` (the flow's label), ``target_app``
(the app the session exercised), ``activity``, ``labeling_type``, ``label_source``,
the MIRAGE counters (``BF_num_packets`` ... ``DF_duration``), the 102 MIRAGE
statistics (``packet_length_biflow_min`` ...), and the first :data:`SERIES_PACKETS`
packets as list columns ``pkt_payload`` (L4 payload bytes), ``pkt_dir`` (0 up, 1 down)
and ``pkt_iat`` (seconds since the previous packet of the flow).

``has_handshake`` is tcbench's test: a TCP flow starts SYN (up), SYN-ACK (down). The
2019 layout has no TCP flags; there it is approximated by three payload-less packets
up, down, up. UDP flows always pass.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from analysis.errors import BadInputError, OutputError, ParseError, SchemaError, short
from analysis.flowtable import DIRECTIONS, METRICS, STAT_NAMES, FlowTable

SERIES_PACKETS = 32  # MIRAGE-2019 keeps 32; longer series are cut to this
STAT_COLUMNS: tuple[str, ...] = tuple(
    f"{m}_{d}_{s}" for m in METRICS for d in DIRECTIONS for s in STAT_NAMES
)
COUNTER_COLUMNS: tuple[str, ...] = tuple(
    f"{p}_{c}"
    for p in ("BF", "UF", "DF")
    for c in ("num_packets", "IP_packet_bytes", "L4_payload_bytes", "duration")
)
META_COLUMNS: tuple[str, ...] = (
    "session",
    "device",
    "app",
    "target_app",
    "activity",
    "labeling_type",
    "label_source",
    "src_ip",
    "src_port",
    "dst_ip",
    "dst_port",
    "proto",
    "has_handshake",
    "source_file",
)
SERIES_COLUMNS: tuple[str, ...] = ("pkt_payload", "pkt_dir", "pkt_iat")
BACKGROUND_TYPES = ("ambiguous", "unlabelled", "resolver")
UNKNOWN_ACTIVITY = "Unknown"
_MAC_FOLDER = re.compile(r"^(.+?)((?:_[0-9a-fA-F]{2}){6})$")
_CAPTURE_SUFFIXES = (".pcap", ".pcapng", ".cap")
_MIRAGE_NAME = re.compile(r"^\d+_.+\.json$", re.IGNORECASE)


# ------------------------------------------------------------------------- filters


@dataclass(frozen=True)
class DatasetFilter:
    """Which flows a dataset keeps (tcbench-style curation, each step optional)."""

    labeling_types: tuple[str, ...] = ()  # keep only these (empty: any)
    min_packets: int = 0  # keep flows with at least this many packets
    drop_background: bool = True  # unlabelled, ambiguous, resolver, "unknown" flows
    background_is_other_apps: bool = False  # tcbench: a flow not of the session's app
    drop_dns: bool = True  # port 53 either side
    require_handshake: bool = False  # TCP flows must start SYN, SYN-ACK
    apps: tuple[str, ...] = ()  # keep only these labels (empty: any)


def is_background(df: Any, other_apps: bool = False) -> np.ndarray:
    """Flows without a usable app label (and, with ``other_apps``, flows of another app)."""
    app = df["app"].astype(object)
    lt = df["labeling_type"].astype(object)
    text = app.astype(str)
    bg = np.array(
        app.isna()
        | app.isin(["", "unknown", "background", "None"])
        | text.str.startswith("uid:")
        | text.str.startswith("android:")
        | lt.isin(BACKGROUND_TYPES),
        dtype=bool,
    )
    if other_apps:
        bg |= np.array(app != df["target_app"], dtype=bool)
    return bg


def apply_filter(df: Any, flt: DatasetFilter) -> tuple[Any, dict[str, int]]:
    """The rows of ``df`` that pass ``flt``, and how many each step dropped."""
    dropped: dict[str, int] = {}
    keep = np.ones(len(df), dtype=bool)

    def step(name: str, mask: np.ndarray) -> None:
        nonlocal keep
        dropped[name] = int((keep & ~mask).sum())
        keep &= mask

    if flt.drop_background:
        step("background", ~is_background(df, flt.background_is_other_apps))
    if flt.labeling_types:
        step("labeling_type", df["labeling_type"].isin(flt.labeling_types).to_numpy(bool))
    if flt.drop_dns:
        step("dns", ~((df["src_port"] == 53) | (df["dst_port"] == 53)).to_numpy(bool))
    if flt.require_handshake:
        step("no_handshake", df["has_handshake"].to_numpy(bool))
    if flt.min_packets > 0:
        step("min_packets", (df["BF_num_packets"] >= flt.min_packets).to_numpy(bool))
    if flt.apps:
        step("apps", df["app"].isin(flt.apps).to_numpy(bool))
    return df.loc[keep].reset_index(drop=True), dropped


# ------------------------------------------------------------------------- loading


def _series_cut(values: Any, n: int = SERIES_PACKETS) -> np.ndarray:
    return np.asarray(values if values is not None else [], dtype=np.float64)[:n]


def _handshake_flags(proto: int, dirs: Sequence[int], flags: Sequence[str]) -> bool:
    if proto != 6:
        return True
    if len(dirs) < 2 or len(flags) < 2:
        return False
    f0, f1 = str(flags[0]), str(flags[1])
    return dirs[0] == 0 and "S" in f0 and "A" not in f0 and dirs[1] == 1 and "S" in f1 and "A" in f1


def _handshake_sizes(proto: int, dirs: Sequence[int], payload: Sequence[float]) -> bool:
    if proto != 6:
        return True
    if len(dirs) < 3:
        return False
    return list(dirs[:3]) == [0, 1, 0] and not any(payload[:3])


def _device_name(folder: str, bf_device: Any) -> str:
    if _MAC_FOLDER.match(folder) or not isinstance(bf_device, str) or not bf_device:
        return folder
    return bf_device


def from_mirage_frame(raw: Any) -> Any:
    """The dataset table of a :func:`analysis.mirage.read_mirage` frame."""
    import pandas as pd

    n = len(raw)

    def col(name: str, default: Any = None) -> list[Any]:
        if name in raw.columns:
            return [None if v is pd.NA else v for v in raw[name].tolist()]
        return [default] * n

    label = col("flow_metadata_BF_label")
    sub = col("flow_metadata_BF_sublabel")
    app = [
        s.split(":")[0] if isinstance(s, str) and s else lab
        for s, lab in zip(sub, label, strict=True)
    ]
    bf_dev = col("flow_metadata_BF_device")
    out: dict[str, Any] = {
        # a file stem names a capture only within its device folder
        "session": [
            f"{d}/{s}"
            for d, s in zip(
                raw["device"].astype(str).tolist(), raw["session"].astype(str).tolist(), strict=True
            )
        ],
        "device": [_device_name(f, d) for f, d in zip(raw["device"].tolist(), bf_dev, strict=True)],
        "app": app,
        "target_app": raw["app"].astype(str).tolist(),
        "activity": [
            a if isinstance(a, str) and a else UNKNOWN_ACTIVITY
            for a in col("flow_metadata_BF_activity")
        ],
        "labeling_type": col("flow_metadata_BF_labeling_type"),
        "label_source": col("flow_metadata_BF_label_source"),
        "src_ip": raw["src_ip"].tolist(),
        "src_port": raw["src_port"].astype(np.int64),
        "dst_ip": raw["dst_ip"].tolist(),
        "dst_port": raw["dst_port"].astype(np.int64),
        "proto": raw["proto"].astype(np.int64),
    }
    dirs_full = col("packet_data_packet_dir", [])
    pay_full = col("packet_data_L4_payload_bytes", [])
    flags_full = col("packet_data_TCP_flags")
    protos = out["proto"].tolist()
    hs = []
    for p, d, pl, fl in zip(protos, dirs_full, pay_full, flags_full, strict=True):
        d = d or []
        hs.append(
            _handshake_flags(p, d, fl) if fl is not None else _handshake_sizes(p, d, pl or [])
        )
    out["has_handshake"] = hs
    out["source_file"] = raw["file"].astype(str).tolist()
    for c in COUNTER_COLUMNS:
        src = f"flow_metadata_{c}"
        if src not in raw.columns:
            raise SchemaError(
                f"MIRAGE data lacks {src}", hint="every MIRAGE layout has the BF/UF/DF counters"
            )
        out[c] = pd.to_numeric(raw[src], errors="coerce").astype(np.float64).to_numpy()
    for c in STAT_COLUMNS:
        src = f"flow_features_{c}"
        out[c] = (
            pd.to_numeric(raw[src], errors="coerce").astype(np.float64).to_numpy()
            if src in raw.columns
            else np.full(n, np.nan)
        )
    out["pkt_payload"] = [_series_cut(v) for v in pay_full]
    out["pkt_dir"] = [_series_cut(v) for v in dirs_full]
    out["pkt_iat"] = [_series_cut(v) for v in col("packet_data_iat", [])]
    return pd.DataFrame(out)


def from_flowtable(
    table: FlowTable, session: str, device: str = "unknown", source_file: str = ""
) -> Any:
    """The dataset table of a :class:`FlowTable` (labels taken from ``table.labels``)."""
    import pandas as pd

    from analysis.flowtable import ACK, SYN

    n = len(table)
    fl = table.flows
    pk = table.packets
    src, dst = table.ip_strings()
    offs = table.pkt_offsets.astype(np.int64)
    counts = np.minimum(np.diff(offs), SERIES_PACKETS)
    ts = pk["pkt_ts_ns"]
    gap = np.zeros(len(ts), dtype=np.float64)
    if len(ts) > 1:
        gap[1:] = np.diff(ts) / 1e9
    gap[offs[:-1][offs[:-1] < len(ts)]] = 0.0
    pay = pk["pkt_payload_len"].astype(np.float64)
    dirs = pk["pkt_dir"].astype(np.float64)
    series_p, series_d, series_i = [], [], []
    for s, c in zip(offs[:-1].tolist(), counts.tolist(), strict=True):
        series_p.append(pay[s : s + c])
        series_d.append(dirs[s : s + c])
        series_i.append(gap[s : s + c])
    proto = fl["proto"].astype(np.int64)
    hs = np.ones(n, dtype=bool)
    has2 = np.diff(offs) >= 2
    if n:
        p0 = np.minimum(offs[:-1], max(len(ts) - 1, 0))
        p1 = np.minimum(offs[:-1] + 1, max(len(ts) - 1, 0))
        f0 = pk["pkt_tcp_flags"][p0] if len(ts) else np.zeros(n, np.uint8)
        f1 = pk["pkt_tcp_flags"][p1] if len(ts) else np.zeros(n, np.uint8)
        d0 = pk["pkt_dir"][p0] if len(ts) else np.zeros(n, np.uint8)
        d1 = pk["pkt_dir"][p1] if len(ts) else np.zeros(n, np.uint8)
        ok = (
            has2
            & (d0 == 0)
            & ((f0 & SYN) != 0)
            & ((f0 & ACK) == 0)
            & (d1 == 1)
            & ((f1 & SYN) != 0)
            & ((f1 & ACK) != 0)
        )
        hs = np.where(proto == 6, ok, True)

    def lab(name: str, default: Any = None) -> list[Any]:
        return [default if v is None else v for v in table.label_column(name).tolist()]

    label = lab("BF_label")
    sub = lab("BF_sublabel")
    app = [
        s.split(":")[0] if isinstance(s, str) and s else a for s, a in zip(sub, label, strict=True)
    ]
    out: dict[str, Any] = {
        "session": [session] * n,
        "device": lab("BF_device", device),
        "app": app,
        "target_app": [session] * n,
        "activity": lab("BF_activity", UNKNOWN_ACTIVITY),
        "labeling_type": lab("BF_labeling_type"),
        "label_source": lab("BF_label_source"),
        "src_ip": src,
        "src_port": fl["src_port"].astype(np.int64),
        "dst_ip": dst,
        "dst_port": fl["dst_port"].astype(np.int64),
        "proto": proto,
        "has_handshake": hs,
        "source_file": [source_file] * n,
    }
    for p, pre in (("BF", "bf"), ("UF", "uf"), ("DF", "df")):
        out[f"{p}_num_packets"] = fl[f"{pre}_packets"].astype(np.float64)
        out[f"{p}_IP_packet_bytes"] = fl[f"{pre}_ip_bytes"].astype(np.float64)
        out[f"{p}_L4_payload_bytes"] = fl[f"{pre}_payload_bytes"].astype(np.float64)
    out["BF_duration"] = (fl["last_ts_ns"] - fl["first_ts_ns"]) / 1e9
    for p, pre in (("UF", "uf"), ("DF", "df")):
        d = (fl[f"{pre}_last_ts_ns"] - fl[f"{pre}_first_ts_ns"]) / 1e9
        out[f"{p}_duration"] = np.where(fl[f"{pre}_packets"] > 0, d, 0.0)
    stats = np.asarray(fl["stats"], dtype=np.float64).reshape(n, len(STAT_COLUMNS))
    for j, c in enumerate(STAT_COLUMNS):
        out[c] = stats[:, j]
    out["pkt_payload"] = series_p
    out["pkt_dir"] = series_d
    out["pkt_iat"] = series_i
    df = pd.DataFrame(out)
    return df[
        list(META_COLUMNS) + list(COUNTER_COLUMNS) + list(STAT_COLUMNS) + list(SERIES_COLUMNS)
    ]


def _parquet_frame(path: Path) -> Any:
    """A flowtruth Parquet file as a dataset table (session: the file's metadata or stem)."""
    import pyarrow.parquet as pq

    from analysis.flowtable import FLOW_FIELDS, PACKET_FIELDS
    from analysis.parquet_io import read_metadata, read_table

    meta = read_metadata(path)  # footer checked: columns, names, rows against size
    # the schema is checked before any data is read
    try:
        names = set(pq.read_schema(path).names)
    except Exception as err:  # checked footer, so rare: a schema pyarrow cannot map
        raise ParseError(path, None, f"unreadable schema ({short(str(err), 200)})") from None
    need = [k for k in FLOW_FIELDS if k not in ("src_addr", "dst_addr", "stats")]
    need += [*STAT_COLUMNS, *PACKET_FIELDS, "src_ip", "dst_ip"]
    missing = [k for k in need if k not in names]
    if missing:
        raise SchemaError(f"{short(path)}: no column {missing[0]!r} (not a flowtruth flow file)")
    tbl = read_table(path)
    n = tbl.num_rows
    try:
        flows: dict[str, np.ndarray] = {}
        for k, dt in FLOW_FIELDS.items():
            if k in ("src_addr", "dst_addr", "stats"):
                continue
            if k not in names:
                raise SchemaError(f"{path}: no column {k!r}")
            flows[k] = tbl.column(k).to_numpy().astype(dt)
        stats = (
            np.column_stack([tbl.column(c).to_numpy() for c in STAT_COLUMNS])
            if n
            else np.zeros((0, len(STAT_COLUMNS)))
        )
        flows["stats"] = stats.astype(np.float64)
        packets: dict[str, np.ndarray] = {}
        offsets = np.zeros(n + 1, dtype=np.int64)
        for k, dt in PACKET_FIELDS.items():
            colm = tbl.column(k).combine_chunks()
            packets[k] = colm.flatten().to_numpy().astype(dt)
            offsets = np.asarray(colm.offsets, dtype=np.int64)
        # Addresses stay text: from_flowtable only needs them as strings.
        table = FlowTable(flows, packets, offsets)
        for k in (
            "BF_label",
            "BF_sublabel",
            "BF_labeling_type",
            "BF_label_source",
            "BF_device",
            "BF_activity",
        ):
            if k in names:
                table.labels[k] = np.array(tbl.column(k).to_pylist(), dtype=object)
        src = tbl.column("src_ip").to_pylist()
        dst = tbl.column("dst_ip").to_pylist()
        table.ip_strings = lambda: (src, dst)  # type: ignore[method-assign]
    except (ValueError, TypeError, OverflowError, MemoryError, KeyError, AttributeError,
            NotImplementedError) as err:
        why = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise SchemaError(f"{short(path)}: a column has the wrong type or values "
                          f"({short(why)})") from None
    session = meta.get("session") or path.stem
    device = meta.get("device") or path.parent.name
    df = from_flowtable(table, session, device, str(path))
    if meta.get("target_app"):
        df["target_app"] = meta["target_app"]
    return df


def capture_frame(path: str | os.PathLike[str], options: Any = None) -> Any:
    """An unlabelled capture (pcap/pcapng) as a dataset table, for prediction."""
    from analysis.assemble import read_flows

    p = Path(path)
    table = read_flows(p, options)
    return from_flowtable(table, p.stem, "unknown", str(p))


def expand_inputs(paths: Iterable[str | os.PathLike[str]]) -> list[tuple[str, Path]]:
    """Each input as (kind, file): ``mirage``, ``parquet`` or ``capture``. Folders (a flow
    store, run directories) are searched recursively for MIRAGE-named JSON and Parquet, and
    only when they hold neither, for captures."""
    out: list[tuple[str, Path]] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
            # In a folder (a run directory, a flow store) only MIRAGE-named JSON counts:
            # manifests, quality reports and metrics sit beside the flows.
            kinds = [
                (_kind(f), f)
                for f in found
                if not f.name.lower().endswith(".json") or _MIRAGE_NAME.match(f.name)
            ]
            kinds = [(k, f) for k, f in kinds if k]
            if any(k != "capture" for k, _ in kinds):  # flows there: the raw captures not again
                kinds = [(k, f) for k, f in kinds if k != "capture"]
            if not kinds:
                raise BadInputError(f"no MIRAGE .json, .parquet or capture files under {p}")
            out.extend(kinds)  # type: ignore[arg-type]
        elif p.is_file():
            k = _kind(p)
            if not k:
                raise BadInputError(
                    f"{p}: not a MIRAGE .json, .parquet or pcap file",
                    hint="give MIRAGE JSON files or folders, Parquet or pcap",
                )
            out.append((k, p))
        else:
            raise BadInputError(f"no such file or directory: {p}")
    return out


def _kind(path: Path) -> str | None:
    s = path.name.lower()
    if s.endswith(".json") and s not in ("metrics.json", "model.json", "dataset_card.json"):
        return "mirage"
    if s.endswith(".parquet"):
        return "parquet"
    if s.endswith(_CAPTURE_SUFFIXES):
        return "capture"
    return None


def load_dataset(
    paths: Iterable[str | os.PathLike[str]],
    flt: DatasetFilter | None = None,
    allow_captures: bool = False,
) -> Dataset:
    """Load MIRAGE JSON (any layout), flowtruth Parquet (and, with ``allow_captures``,
    pcaps) into one table; ``flt`` (default: :class:`DatasetFilter`) curates it."""
    import pandas as pd

    from analysis.mirage import read_mirage

    inputs = expand_inputs(paths)
    frames = []
    mirage_files = [f for k, f in inputs if k == "mirage"]
    if mirage_files:
        frames.append(from_mirage_frame(read_mirage(mirage_files)))
    for k, f in inputs:
        if k == "parquet":
            frames.append(_parquet_frame(f))
        elif k == "capture":
            if not allow_captures:
                raise BadInputError(
                    f"{f}: a capture has no labels to learn from",
                    hint="label it first (flowtruth dataset / the session "
                    "pipeline) or use it with predict",
                )
            frames.append(capture_frame(f))
    frames = [f for f in frames if len(f)]
    if not frames:
        raise BadInputError("the inputs hold no bi-flows")
    df = frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True)
    n_raw = len(df)
    flt = flt if flt is not None else DatasetFilter()
    df, dropped = apply_filter(df, flt)
    return Dataset(df, [str(f) for _, f in inputs], n_raw, dropped, flt)


# ------------------------------------------------------------------------- the card


@dataclass
class Dataset:
    """A loaded, curated dataset: the table plus where it came from and what was dropped."""

    frame: Any  # pandas DataFrame, columns as in the module docstring
    files: list[str] = field(default_factory=list)
    raw_flows: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    filter: DatasetFilter = field(default_factory=DatasetFilter)

    def __len__(self) -> int:
        return int(len(self.frame))

    def card(self) -> dict[str, Any]:
        """Counts per app, device, activity, labelling type and session, as plain data."""
        df = self.frame

        def counts(col: str) -> dict[str, int]:
            vc = df[col].astype(str).value_counts()
            return {str(k): int(v) for k, v in vc.items()}

        per_app_device: dict[str, dict[str, int]] = {}
        if len(df):
            for (a, d), v in df.groupby(["app", "device"], dropna=False).size().items():
                per_app_device.setdefault(str(a), {})[str(d)] = int(v)
        return {
            "flows": len(df),
            "raw_flows": self.raw_flows,
            "dropped": dict(self.dropped),
            "filter": asdict(self.filter),
            "files": len(self.files),
            "sessions": int(df["session"].nunique()) if len(df) else 0,
            "per_app": counts("app"),
            "per_device": counts("device"),
            "per_activity": counts("activity"),
            "per_labeling_type": counts("labeling_type"),
            "per_app_device": per_app_device,
            "fingerprint": fingerprint(df),
        }


def card_text(card: dict[str, Any]) -> str:
    """The dataset card as a few readable lines (what the CLI prints)."""
    lines = [
        f"{card['flows']:,} flows in {card['sessions']} sessions from {card['files']} "
        f"files ({card['raw_flows']:,} before filtering"
        + (
            ": dropped " + ", ".join(f"{k} {v:,}" for k, v in card["dropped"].items() if v)
            if any(card["dropped"].values())
            else ""
        )
        + ")"
    ]
    for title, key in (
        ("app", "per_app"),
        ("device", "per_device"),
        ("activity", "per_activity"),
        ("labelling", "per_labeling_type"),
    ):
        items = ", ".join(f"{k} {v:,}" for k, v in card[key].items())
        lines.append(f"  {title:<10} {items}")
    return "\n".join(lines)


def write_card(card: dict[str, Any], out_dir: str | os.PathLike[str]) -> Path:
    """Save the card as ``dataset_card.json`` (and ``dataset_card.txt``) in ``out_dir``."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "dataset_card.txt").write_text(card_text(card) + "\n")
        path = out / "dataset_card.json"
        path.write_text(json.dumps(card, indent=2, default=str) + "\n")
    except OSError as err:
        raise OutputError(f"cannot write the dataset card to {out}: {err.strerror or err}") from err
    return path


def fingerprint(df: Any) -> str:
    """sha256 over the flow keys, sessions and labels: identifies the training data."""
    import hashlib

    h = hashlib.sha256()
    for col in ("session", "src_ip", "src_port", "dst_ip", "dst_port", "proto", "app"):
        if col in df.columns:
            h.update("\x1f".join(map(str, df[col].tolist())).encode())
            h.update(b"\x1e")
    return h.hexdigest()


def assign_devices(df: Any, mapping: dict[str, str]) -> Any:
    """A copy of ``df`` whose ``device`` is ``mapping[session]`` (unmapped sessions keep theirs)."""
    out = df.copy()
    out["device"] = [mapping.get(s, d) for s, d in zip(df["session"], df["device"], strict=True)]
    return out
