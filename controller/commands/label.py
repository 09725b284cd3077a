"""``flowtruth label``: label a run directory, or a capture and its traces offline."""

from __future__ import annotations

import re
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

_PACKAGE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.]*(:[A-Za-z0-9_.\-]+)?$")


class LabelFormat(StrEnum):
    mirage2019 = "mirage2019"
    mirage2022 = "mirage2022"


def parse_strace_args(values: list[str]) -> dict[str, list[Path]]:
    """``PACKAGE=FILE`` (or a launcher directory) pairs; a bare path names its process by
    the launcher's file names."""
    from analysis.errors import BadInputError

    out: dict[str, list[Path]] = {}
    for v in values:
        pkg, sep, path = v.partition("=")
        if not sep:
            pkg, path = "", v
        elif not _PACKAGE.match(pkg):
            raise BadInputError(f"--strace {v}: {pkg!r} is not a package name",
                                "write --strace PACKAGE=FILE, e.g. org.thoughtcrime.securesms=strace.log")
        if not path:
            raise BadInputError(f"--strace {v}: no file after '='")
        out.setdefault(pkg, []).append(Path(path))
    return out


def register(app: typer.Typer) -> None:
    @app.command("label")
    def label(
        run_dir: Annotated[Path | None, typer.Argument(help="run directory made by the session engine (its manifest names the files)")] = None,
        pcap: Annotated[list[Path], typer.Option("--pcap", help="capture file (repeat for rotated files, in order); the offline form")] = [],  # noqa: B006
        strace: Annotated[list[str], typer.Option("--strace", help="PACKAGE=FILE: an strace log, or a directory of launcher logs (repeatable)")] = [],  # noqa: B006
        netstat: Annotated[Path | None, typer.Option("--netstat", help="the netstat poller's log")] = None,
        frida: Annotated[Path | None, typer.Option("--frida", help="the frida agent's JSON lines")] = None,
        labels_csv: Annotated[Path | None, typer.Option("--labels-csv", help="labels in the generic CSV format")] = None,
        pcapdroid: Annotated[Path | None, typer.Option("--pcapdroid", help="PCAPdroid's connections CSV export (v1.6 or v1.7+ layout)")] = None,
        uid_map: Annotated[Path | None, typer.Option("--uid-map", help="output of `pm list packages -U` (with or without --show-versioncode), e.g. a run's packages.txt")] = None,
        device_ip: Annotated[list[str], typer.Option("--device-ip", help="the phone's address (repeatable); default: from the manifest or the traces")] = [],  # noqa: B006
        fmt: Annotated[str, typer.Option("--format", help="MIRAGE layout: mirage2019 or mirage2022")] = "mirage2019",
        out: Annotated[Path | None, typer.Option("-o", "--out", help="output directory (default RUN_DIR/labels)")] = None,
        clock_offset: Annotated[float | None, typer.Option("--clock-offset", help="phone minus AP clock, seconds (default: the manifest's, or 0)")] = None,
        target: Annotated[list[str], typer.Option("--target", help="target app(s) for filtered.pcap (default: the --strace packages)")] = [],  # noqa: B006
        device_model: Annotated[str | None, typer.Option(help="device model for MIRAGE folder names")] = None,
        device_mac: Annotated[str | None, typer.Option(help="device MAC for MIRAGE folder names")] = None,
        activity: Annotated[str | None, typer.Option(help="BF_activity (mirage2022)")] = None,
        date: Annotated[str | None, typer.Option(help="the day of -tt strace logs, YYYY-MM-DD (UTC)")] = None,
        idle_timeout: Annotated[float, typer.Option(help="seconds without a packet that end a flow")] = 120.0,
        quiet: Annotated[bool, typer.Option("-q", "--quiet", help="no tables, only the summary line")] = False,
    ) -> None:
        """Label every bi-flow with the app that owns it; write MIRAGE JSON, filtered.pcap,
        labelled.pcapng, labels.csv and quality.json."""
        from analysis.assemble import FlowOptions
        from analysis.errors import BadInputError
        from analysis.label import label_capture, label_run

        if fmt not in {f.value for f in LabelFormat}:
            raise BadInputError(f"--format {fmt}: not a MIRAGE layout",
                                "choose mirage2019 or mirage2022")
        if idle_timeout <= 0:
            raise BadInputError("--idle-timeout must be positive")
        opts = FlowOptions(idle_timeout=idle_timeout)
        if run_dir is not None:
            if pcap or strace or netstat or frida or labels_csv or pcapdroid or uid_map:
                raise BadInputError("give either RUN_DIR or --pcap with traces, not both",
                                    "a run directory's manifest names its files")
            result = label_run(run_dir, out_dir=out, fmt=fmt, device_ips=device_ip,
                               clock_offset=clock_offset, flow_options=opts)
        else:
            if not pcap:
                raise BadInputError("nothing to label",
                                    "give RUN_DIR, or --pcap FILE with --strace PACKAGE=FILE ... --out DIR")
            if out is None:
                raise BadInputError("--out DIR is needed with --pcap")
            result = label_capture(
                pcap, strace=parse_strace_args(strace), netstat=netstat, frida=frida,
                labels_csv=labels_csv, pcapdroid=pcapdroid, uid_map=uid_map, device_ips=device_ip,
                clock_offset=clock_offset or 0.0, targets=target or None, fmt=fmt,
                out_dir=out, device_model=device_model, device_mac=device_mac,
                activity=activity, date=date, flow_options=opts)
        for w in result.warnings:
            sys.stderr.write(f"flowtruth: warning: {w}\n")
        if not quiet:
            from rich.console import Console

            from analysis.quality import quality_tables

            console = Console(markup=False)  # app names come from the phone's packages.txt
            for t in quality_tables(result.quality):
                console.print(t)
        where = result.outputs.get("quality")
        where_dir = where.parent if where is not None else "-"
        sys.stdout.write(f"{result.line()} -> {where_dir}\n")
