"""The analysis core's entry points that front ends call: captures to flow files.

``export_flows`` streams one or more captures through bi-flow assembly and writes
MIRAGE JSON or Parquet, returning a :class:`FlowsSummary` the CLI prints as one line.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .assemble import FlowOptions, iter_flow_chunks, read_flows
from .atomic import atomic_output
from .errors import BadInputError
from .flowtable import CaptureStats, FlowTable

FORMATS = ("mirage2019", "mirage2022", "parquet")
# lz4 without dictionaries or column statistics: ~2.5x faster to write than pyarrow's
# defaults at a similar size (measured on the 1M-packet benchmark capture).
PARQUET_OPTIONS = {"compression": "lz4", "use_dictionary": False, "write_statistics": False}


@dataclass
class FlowsSummary:
    """What an export did: counts, skips, warnings and the files written."""

    packets: int = 0
    flows: int = 0
    packets_in_flows: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    outputs: list[Path] = field(default_factory=list)

    def line(self) -> str:
        skipped = sum(self.skipped.values())
        s = f"{self.packets:,} packets, {self.flows:,} bi-flows ({self.packets_in_flows:,} packets)"
        if skipped:
            reasons = ", ".join(f"{r}: {n:,}" for r, n in
                                sorted(self.skipped.items(), key=lambda kv: -kv[1]))
            s += f", {skipped:,} skipped ({reasons})"
        else:
            s += ", none skipped"
        return s


def label_all(table: FlowTable, package: str) -> None:
    """Give every flow the capture's app label, MIRAGE's per-capture ``most-common`` label."""
    n = len(table)
    table.labels["BF_label"] = np.full(n, package, dtype=object)
    table.labels["BF_sublabel"] = np.full(n, package, dtype=object)
    table.labels["BF_labeling_type"] = np.full(n, "most-common", dtype=object)
    table.labels["BF_label_source"] = np.full(n, "capture", dtype=object)


def _out_kind(out: Path, fmt: str) -> str:
    if out.suffix.lower() in (".json", ".parquet"):
        want = ".parquet" if fmt == "parquet" else ".json"
        if out.suffix.lower() != want:
            raise BadInputError(f"{out}: a {fmt} export needs a {want} file name or a directory")
        if out.is_dir():
            raise BadInputError(f"{out} is a directory; name a file or drop the suffix")
        return "file"
    if out.exists() and not out.is_dir():
        raise BadInputError(f"{out} exists and is not a directory",
                            "give a .json/.parquet file name or a directory")
    return "dir"


def export_flows(
    captures: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    fmt: str = "mirage2019",
    options: FlowOptions | None = None,
    label: str | None = None,
    device_model: str = "flowtruth",
    device_mac: str = "00:00:00:00:00:00",
    activity: str | None = None,
    progress: Callable[[int], None] | None = None,
) -> FlowsSummary:
    """Captures to MIRAGE JSON or Parquet at ``out`` (a file, or a directory with MIRAGE names)."""
    if fmt not in FORMATS:
        raise BadInputError(f"unknown format {fmt!r}", f"choose one of {', '.join(FORMATS)}")
    out = Path(out)
    kind = _out_kind(out, fmt)
    summary = FlowsSummary()
    stats = CaptureStats()
    if fmt == "parquet":
        target = out if kind == "file" else out / (Path(os.fspath(captures[0])).stem + ".parquet")
        n_flows, n_pk = _stream_parquet(captures, target, options, label, stats, progress)
        summary.flows, summary.packets_in_flows = n_flows, n_pk
        summary.outputs.append(target)
    else:
        from .mirage import to_mirage_parts, write_mirage, write_mirage_dir

        table = read_flows(captures, options, progress)
        stats = table.capture
        if label:
            label_all(table, label)
        summary.flows, summary.packets_in_flows = len(table), table.n_packets
        if kind == "file":
            parts = to_mirage_parts(table, fmt, payload=bool(options and options.payload),
                                    device=device_mac.lower(), activity=activity)
            for k, part in enumerate(parts):
                path = out if k == 0 else out.with_name(f"{out.stem}_dup{k}{out.suffix}")
                summary.outputs.append(write_mirage(part, path))
        else:
            epoch = (table.capture.first_ts_ns or 0) // 1_000_000_000
            summary.outputs.extend(write_mirage_dir(
                table, out, label or "unknown", device_model, device_mac, epoch, fmt,
                payload=bool(options and options.payload), activity=activity))
    summary.packets = stats.packets
    summary.skipped = dict(stats.skipped)
    summary.warnings = list(stats.warnings)
    return summary


def _stream_parquet(captures, target: Path, options, label, stats, progress) -> tuple[int, int]:
    """Write flows chunk by chunk as Parquet row groups, so memory stays bounded.

    A writer thread encodes and writes while the main thread reads the next chunk
    (the C fast path and pyarrow both release the GIL, so this uses both cores).
    """
    import json
    import queue
    import threading
    from dataclasses import asdict

    import pyarrow.parquet as pq

    from .parquet_io import to_arrow

    counts = [0, 0]
    chunks: queue.Queue[FlowTable | None] = queue.Queue(maxsize=2)
    state: dict[str, object] = {}

    def write_all(tmp: str) -> None:
        writer = None
        try:
            while (chunk := chunks.get()) is not None:
                if "error" in state:
                    continue  # drain, so the reader never blocks
                if label:
                    label_all(chunk, label)
                arrow = to_arrow(chunk)
                if writer is None:
                    writer = pq.ParquetWriter(tmp, arrow.schema, **PARQUET_OPTIONS)
                writer.write_table(arrow)
                counts[0] += len(chunk)
                counts[1] += chunk.n_packets
            if "error" not in state:
                if writer is None:  # no flows at all: still a valid, empty file
                    empty = FlowTable.empty()
                    if label:
                        label_all(empty, label)
                    arrow = to_arrow(empty)
                    writer = pq.ParquetWriter(tmp, arrow.schema, **PARQUET_OPTIONS)
                    writer.write_table(arrow)
                stats.packets_in_flows = counts[1]
                writer.add_key_value_metadata({"capture_stats": json.dumps(asdict(stats))})
        except BaseException as err:  # reported by the reading thread
            state["error"] = err
        finally:
            if writer is not None:
                writer.close()

    with atomic_output(target) as tmp:
        thread = threading.Thread(target=write_all, args=(tmp,), name="parquet-writer",
                                  daemon=True)
        thread.start()
        try:
            for chunk in iter_flow_chunks(captures, options, stats, progress=progress):
                chunks.put(chunk)
                if "error" in state:
                    break
        finally:
            chunks.put(None)
            thread.join()
        err = state.get("error")
        if isinstance(err, BaseException):
            raise err
    return counts[0], counts[1]
