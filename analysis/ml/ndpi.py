"""A labelled dataset from nDPI's regression captures and its ``flow_labels.csv``.

Each capture is one session; its bi-flows are labelled by nDPI's per-flow verdicts
through the generic CSV label source and the correlator (``BF_label_source`` ``csv``,
``BF_labeling_type`` ``ndpi``). The classes are nDPI's ``app_family``: Signal,
Telegram, WhatsApp or other. These labels are nDPI's opinion, not ground truth.
"""

from __future__ import annotations

import csv
import os
import re
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from analysis.errors import BadInputError, SchemaError

FORMATS = ("mirage2022", "parquet")


@dataclass
class NdpiDatasetSummary:
    """What :func:`build_ndpi_dataset` wrote: per-capture flow and label counts."""

    captures: int = 0
    flows: int = 0
    labelled: int = 0
    per_family: dict[str, int] = field(default_factory=dict)
    outputs: list[Path] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # capture -> why

    def line(self) -> str:
        fam = ", ".join(f"{k}: {v}" for k, v in sorted(self.per_family.items()))
        return (
            f"{self.captures} captures, {self.flows:,} bi-flows, {self.labelled:,} labelled "
            f"by nDPI ({fam})"
        )


def session_token(capture: str) -> str:
    """A capture file name as a MIRAGE package token (letters, digits and dots)."""
    stem = Path(capture).name.split(".")[0]
    return re.sub(r"[^A-Za-z0-9]+", ".", stem).strip(".") or "capture"


def _captures(flow_labels: Path) -> list[str]:
    with open(flow_labels, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if "pcap" not in (reader.fieldnames or []):
            raise SchemaError(f"{flow_labels}: no pcap column")
        seen: dict[str, None] = {}
        for row in reader:
            seen.setdefault(row["pcap"], None)
    return list(seen)


def build_ndpi_dataset(
    pcap_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    fmt: str = "mirage2022",
    devices: Callable[[str], str] | None = None,
    captures: Sequence[str] | None = None,
) -> NdpiDatasetSummary:
    """Label every capture named in ``<pcap_dir>/flow_labels.csv`` and write it to ``out_dir``.

    ``fmt`` ``mirage2022`` writes ``<out>/<device folder>/<epoch>_<capture>_...json``;
    ``parquet`` writes ``<out>/<capture>.parquet``. ``devices(capture)`` names a device
    model per capture (default ``nDPI``), e.g. to form pseudo-devices for testing the
    cross-device protocol.
    """
    from analysis.assemble import read_flows
    from analysis.correlate import correlate, flowkeys_from_table
    from analysis.mirage import write_mirage_dir
    from analysis.parquet_io import write_parquet
    from analysis.traces.csvlabels import iter_csv_labels, ndpi_flow_labels_to_csv

    if fmt not in FORMATS:
        raise BadInputError(f"unknown dataset format {fmt!r}", f"use one of {', '.join(FORMATS)}")
    pcap_dir = Path(pcap_dir)
    labels_csv = pcap_dir / "flow_labels.csv"
    if not labels_csv.is_file():
        raise BadInputError(
            f"no flow_labels.csv in {pcap_dir}",
            "point at nDPI's captures with their flow_labels.csv",
        )
    out = Path(out_dir)
    summary = NdpiDatasetSummary()
    names = list(captures) if captures is not None else _captures(labels_csv)
    with tempfile.TemporaryDirectory() as tmp:
        generic = Path(tmp) / "labels.csv"
        ndpi_flow_labels_to_csv(labels_csv, generic)
        for name in names:
            path = pcap_dir / name
            if not path.is_file():
                summary.skipped[name] = "capture missing"
                continue
            table = read_flows(path)
            if not len(table):
                summary.skipped[name] = "no TCP/UDP bi-flows"
                continue
            res = correlate(flowkeys_from_table(table), iter_csv_labels(generic, pcap=name))
            res.apply(table)
            model = devices(name) if devices else "nDPI"
            summary.captures += 1
            summary.flows += len(table)
            for lab, lt in zip(
                table.labels["BF_label"].tolist(),
                table.labels["BF_labeling_type"].tolist(),
                strict=True,
            ):
                if lt == "ndpi":
                    summary.labelled += 1
                    summary.per_family[lab] = summary.per_family.get(lab, 0) + 1
            token = session_token(name)
            if fmt == "parquet":
                summary.outputs.append(
                    write_parquet(
                        table,
                        out / f"{token}.parquet",
                        {"session": token, "device": model, "capture": name},
                    )
                )
            else:
                epoch = (table.capture.first_ts_ns or 0) // 1_000_000_000
                summary.outputs.extend(
                    write_mirage_dir(
                        table, out, token, model, _pseudo_mac(model), epoch, "mirage2022"
                    )
                )
    if not summary.captures:
        raise BadInputError(f"no capture of {labels_csv} could be read")
    return summary


def _pseudo_mac(model: str) -> str:
    """A stable locally administered MAC for a device name (MIRAGE folder names need one)."""
    import hashlib

    h = hashlib.sha256(model.encode()).digest()
    return ":".join(f"{b:02x}" for b in (0x02, *h[:5]))
