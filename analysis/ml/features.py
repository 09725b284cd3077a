"""Feature matrices from a dataset table, each feature tagged with a direction and a family.

Feature sets (selectable, combinable):

* ``stats``: MIRAGE ``flow_features``, 102 statistics of packet length and inter-arrival
  time over the bi-flow, upstream and downstream (families ``packet_length``, ``iat``);
* ``series``: the first N packets: L4 payload size, direction, inter-arrival time and the
  upstream and downstream L4 payload (families ``payload_series``, ``direction_series``,
  ``iat_series``);
* ``counters``: MIRAGE's BF/UF/DF packet, byte and payload counts and durations, and the
  transport protocol (family ``counters``);
* ``endpoints`` (only with ``with_endpoints``): server port and address octets, which let
  a classifier learn the labeller rather than the traffic (family ``endpoints``).

Missing values (a statistic of an empty direction, a packet beyond a short flow) are
:data:`MISSING` (-1), which trees separate from every real value.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from analysis.errors import BadInputError
from analysis.ml.datasets import COUNTER_COLUMNS, STAT_COLUMNS

FEATURE_SETS = ("stats", "series", "counters")
DEFAULT_SETS = ("stats",)
DEFAULT_SERIES_PACKETS = 20
MISSING = -1.0
DIRECTION_NAMES = ("upstream", "downstream", "biflow")
_DIR_OF = {
    "biflow": "biflow",
    "upstream_flow": "upstream",
    "downstream_flow": "downstream",
    "BF": "biflow",
    "UF": "upstream",
    "DF": "downstream",
}


@dataclass(frozen=True)
class FeatureSpec:
    """Which features a model uses: saved with the model so prediction rebuilds them."""

    sets: tuple[str, ...] = DEFAULT_SETS
    series_packets: int = DEFAULT_SERIES_PACKETS
    with_endpoints: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "sets": list(self.sets)}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> FeatureSpec:
        return FeatureSpec(tuple(d["sets"]), int(d["series_packets"]), bool(d["with_endpoints"]))


def parse_sets(text: str | Sequence[str] | None) -> tuple[str, ...]:
    """``"stats,series"`` (or a list) as a validated tuple of feature-set names."""
    if text is None:
        return DEFAULT_SETS
    items = [text] if isinstance(text, str) else list(text)
    names = [s.strip() for t in items for s in t.split(",") if s.strip()]
    if "all" in names:
        return FEATURE_SETS
    bad = [s for s in names if s not in FEATURE_SETS]
    if bad or not names:
        raise BadInputError(
            f"unknown feature set(s) {', '.join(bad) or '(none)'}",
            hint=f"choose from {', '.join(FEATURE_SETS)} or all",
        )
    return tuple(dict.fromkeys(names))


@dataclass(frozen=True)
class FeatureInfo:
    """A feature's name, traffic direction (upstream/downstream/biflow) and family."""

    name: str
    direction: str
    family: str


def feature_infos(spec: FeatureSpec) -> list[FeatureInfo]:
    """The features ``spec`` builds, in column order."""
    out: list[FeatureInfo] = []
    if "stats" in spec.sets:
        for c in STAT_COLUMNS:
            metric = "packet_length" if c.startswith("packet_length_") else "iat"
            rest = c[len(metric) + 1 :]
            d = next(
                k
                for k in ("biflow", "upstream_flow", "downstream_flow")
                if rest.startswith(k + "_")
            )
            out.append(FeatureInfo(c, _DIR_OF[d], metric))
    if "series" in spec.sets:
        for i in range(spec.series_packets):
            out.append(FeatureInfo(f"pkt{i}_payload", "biflow", "payload_series"))
            out.append(FeatureInfo(f"pkt{i}_dir", "biflow", "direction_series"))
            out.append(FeatureInfo(f"pkt{i}_iat", "biflow", "iat_series"))
            out.append(FeatureInfo(f"pkt{i}_up_payload", "upstream", "payload_series"))
            out.append(FeatureInfo(f"pkt{i}_down_payload", "downstream", "payload_series"))
    if "counters" in spec.sets:
        for c in COUNTER_COLUMNS:
            out.append(FeatureInfo(c, _DIR_OF[c[:2]], "counters"))
        out.append(FeatureInfo("proto", "biflow", "counters"))
    if spec.with_endpoints:
        out.append(FeatureInfo("dst_port", "biflow", "endpoints"))
        for k in range(4):
            out.append(FeatureInfo(f"dst_ip_octet{k}", "biflow", "endpoints"))
    if not out:
        raise BadInputError("no features selected")
    return out


def _padded(series: Sequence[np.ndarray], n: int) -> np.ndarray:
    """(F, n) matrix of the first n values of each series, MISSING beyond its end."""
    out = np.full((len(series), n), MISSING, dtype=np.float64)
    for i, s in enumerate(series):
        k = min(len(s), n)
        if k:
            out[i, :k] = s[:k]
    return out


def _octets(ips: Sequence[Any]) -> np.ndarray:
    import ipaddress

    out = np.full((len(ips), 4), MISSING)
    for i, ip in enumerate(ips):
        try:
            a = ipaddress.ip_address(str(ip))
        except ValueError:
            continue
        out[i] = list(a.packed[:4]) if a.version == 4 else list(a.packed[:4])
    return out


def build_features(df: Any, spec: FeatureSpec) -> np.ndarray:
    """The (F, n_features) float32 matrix of ``df`` for ``spec`` (columns as feature_infos)."""
    cols: list[np.ndarray] = []
    n = len(df)
    if "stats" in spec.sets:
        cols.append(df[list(STAT_COLUMNS)].to_numpy(dtype=np.float64))
    if "series" in spec.sets:
        k = spec.series_packets
        pay = _padded(df["pkt_payload"].tolist(), k)
        dirs = _padded(df["pkt_dir"].tolist(), k)
        iat = _padded(df["pkt_iat"].tolist(), k)
        present = dirs >= 0
        up = np.where(present, np.where(dirs == 0, pay, 0.0), MISSING)
        down = np.where(present, np.where(dirs == 1, pay, 0.0), MISSING)
        block = np.stack([pay, dirs, iat, up, down], axis=2).reshape(n, k * 5)
        cols.append(block)
    if "counters" in spec.sets:
        cols.append(df[list(COUNTER_COLUMNS)].to_numpy(dtype=np.float64))
        cols.append(df["proto"].to_numpy(dtype=np.float64).reshape(n, 1))
    if spec.with_endpoints:
        cols.append(df["dst_port"].to_numpy(dtype=np.float64).reshape(n, 1))
        cols.append(_octets(df["dst_ip"].tolist()))
    X = np.hstack(cols) if cols else np.zeros((n, 0))
    X = np.nan_to_num(X, nan=MISSING, posinf=1e30, neginf=-1e30)
    return np.clip(X, -3e38, 3e38).astype(np.float32)
