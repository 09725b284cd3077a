"""``flowtruth campus``: anonymised campus header captures to a flow store, SQL, scoring."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

DEFAULT_KEY = Path("~/.config/flowtruth/campus.key")


def _key_path(key: Path | None) -> Path:
    from analysis.errors import BadInputError

    if key is not None:
        return key
    env = os.environ.get("FLOWTRUTH_CAMPUS_KEY")
    path = Path(env) if env else DEFAULT_KEY.expanduser()
    if not path.is_file():
        raise BadInputError("no anonymisation key",
                            f"give --key FILE, set FLOWTRUTH_CAMPUS_KEY, or create {path} "
                            "with: flowtruth campus keygen FILE")
    return path


@contextmanager
def _dask_client(scheduler: str | None, local_dask: bool, workers: int):
    """A distributed Client for --scheduler or --local-dask (None otherwise)."""
    if not scheduler and not local_dask:
        yield None
        return
    from analysis.errors import BadInputError

    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise BadInputError("--scheduler/--local-dask need dask[distributed]") from None
    if scheduler:
        if not scheduler.startswith(("tcp://", "tls://", "ucx://", "inproc://")):
            raise BadInputError(f"not a Dask scheduler address: {scheduler}",
                                "e.g. tcp://10.0.0.5:8786")
        try:
            client = Client(scheduler, timeout="10s")
        except (OSError, TimeoutError) as err:
            raise BadInputError(f"cannot reach the Dask scheduler {scheduler}: {err}") from None
        try:
            yield client
        finally:
            client.close()
        return
    with LocalCluster(n_workers=max(workers, 1), threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        yield client


def predict_store_command(model: Path, store: Path, *, workers: int = 1,
                          scheduler: str | None = None, local_dask: bool = False,
                          plot: Path | None = None, fmt: str = "table") -> None:
    """Score a flow store, print the messaging share per hour and draw it (shared by
    ``flowtruth predict MODEL --store DIR`` and ``flowtruth campus predict``)."""
    from analysis.campus.predict import hourly_share, plot_hourly, predict_store
    from analysis.errors import BadInputError

    if fmt not in ("table", "csv", "json"):
        raise BadInputError(f"unknown --format {fmt!r}", "choose table, csv or json")
    with _dask_client(scheduler, local_dask, workers) as client:
        res = predict_store(store, model, workers=workers, client=client)
    for _src, err in res.failed:
        sys.stderr.write(f"flowtruth: warning: {err}\n")
    sys.stderr.write(res.line() + "\n")
    table = hourly_share(store, res.model_id)
    _print_table(table, fmt)
    out = plot_hourly(table, plot or store / "messaging_share.png")
    sys.stderr.write(f"plot: {out}\n")
    if res.failed:
        raise typer.Exit(1)


class _Progress:
    """Renders ingest events: a rich bar over bytes (rate, ETA) on a terminal."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar: Any = None
        self.task: Any = None

    def __call__(self, ev: object) -> None:
        from analysis.campus import ingest as I

        if isinstance(ev, I.IngestStarted):
            if ev.already:
                sys.stderr.write(f"{ev.already} file(s) already in the store\n")
            if self.enabled and ev.files:
                from controller.commands._progress import byte_progress

                self.bar = byte_progress()
                self.bar.start()
                self.task = self.bar.add_task("ingesting", total=ev.bytes)
        elif isinstance(ev, (I.FileIngested, I.FileSkipped, I.FileFailed)):
            if self.bar is not None:
                self.bar.advance(self.task, ev.bytes)
            if isinstance(ev, I.FileFailed):
                self._print(f"flowtruth: warning: {ev.reason}\n")
            elif isinstance(ev, I.FileSkipped):
                self._print(f"skipped {ev.path}: {ev.reason}\n")

    def _print(self, text: str) -> None:
        if self.bar is not None:
            self.bar.console.print(text.rstrip("\n"), markup=False, highlight=False)
        else:
            sys.stderr.write(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _print_table(table, fmt: str) -> None:
    if fmt == "csv":
        import csv

        w = csv.writer(sys.stdout)
        w.writerow(table.column_names)
        for row in table.to_pylist():
            w.writerow([row[c] for c in table.column_names])
    elif fmt == "json":
        import json

        for row in table.to_pylist():
            sys.stdout.write(json.dumps(row, default=str) + "\n")
    else:
        from rich.console import Console
        from rich.table import Table

        from controller.safety import markup

        t = Table(*(markup(c) for c in table.column_names))
        for row in table.to_pylist():  # a shared store's text: no markup, no ESC
            t.add_row(*["" if v is None else markup(v) for v in row.values()])
        Console().print(t)


def register(app: typer.Typer) -> None:
    campus = typer.Typer(help="Anonymised campus Wi-Fi headers: ingest, query, score.",
                         no_args_is_help=True)
    app.add_typer(campus, name="campus")

    @campus.command("keygen")
    def keygen(file: Annotated[Path, typer.Argument(help="key file to create (mode 0600)")]) -> None:
        """Create a random 32-byte Crypto-PAn key (never overwrites, never prints it)."""
        from analysis.campus.anonymise import generate_key

        generate_key(file)
        sys.stdout.write(f"new key in {file} (keep it secret: it undoes the anonymisation)\n")

    @campus.command("ingest")
    def ingest(
        pcap_dir: Annotated[Path, typer.Argument(help="directory of rotated header captures (or one file)")],
        store: Annotated[Path, typer.Option("--store", help="flow store directory")],
        key: Annotated[Path | None, typer.Option("--key", help="Crypto-PAn key file (default $FLOWTRUTH_CAMPUS_KEY or ~/.config/flowtruth/campus.key)")] = None,
        workers: Annotated[int, typer.Option("--workers", "-j", help="worker processes")] = 1,
        scheduler: Annotated[str | None, typer.Option("--scheduler", help="Dask scheduler, e.g. tcp://HOST:8786")] = None,
        local_dask: Annotated[bool, typer.Option("--local-dask", help="start a local Dask cluster of --workers processes")] = False,
        join: Annotated[bool, typer.Option("--join/--no-join", help="join flows cut by file rotation (else only flag them)")] = True,
        sink: Annotated[str | None, typer.Option("--sink", help="also upsert into MongoDB (mongodb://HOST:PORT/DB)")] = None,
        campus_net: Annotated[list[str], typer.Option("--campus-net", help="campus address or CIDR (repeatable); that side becomes the flow source")] = [],  # noqa: B006
        idle_timeout: Annotated[float, typer.Option(help="seconds without a packet that end a flow")] = 120.0,
        active_timeout: Annotated[float, typer.Option(help="longest flow duration in seconds")] = 1800.0,
        min_age: Annotated[float, typer.Option(help="skip files modified less than this many seconds ago (still being written)")] = 0.0,
    ) -> None:
        """Ingest rotated pcaps: anonymised bi-flows with MIRAGE statistics, by date and hour."""
        from analysis.assemble import FlowOptions, parse_device_nets
        from analysis.campus.ingest import ingest as run_ingest
        from analysis.errors import BadInputError

        if workers < 1:
            raise BadInputError("--workers must be at least 1")
        if idle_timeout <= 0 or active_timeout <= 0:
            raise BadInputError("--idle-timeout and --active-timeout must be positive")
        try:
            parse_device_nets(campus_net)
        except ValueError as err:
            raise BadInputError(f"--campus-net: {err}") from None
        opts = FlowOptions(idle_timeout=idle_timeout, active_timeout=active_timeout,
                           device_nets=tuple(campus_net))
        key_file = _key_path(key)
        mongo = None
        if sink:
            from analysis.campus.mongo import MongoSink

            mongo = MongoSink(sink)
        progress = _Progress(sys.stderr.isatty())
        try:
            with _dask_client(scheduler, local_dask, workers) as client:
                summary = run_ingest(pcap_dir, store, key_file, workers=workers, options=opts,
                                     join=join, client=client, sink=mongo, min_age=min_age,
                                     events=progress)
        finally:
            progress.close()
            if mongo is not None:
                mongo.close()
        for w in summary.warnings[:20]:
            sys.stderr.write(f"flowtruth: warning: {w}\n")
        sys.stdout.write(summary.line() + f" -> {store}\n")
        if summary.failed:
            raise typer.Exit(1)

    @campus.command("query")
    def query(
        sql: Annotated[str, typer.Argument(help="SQL over the views flows, predictions, scored")],
        store: Annotated[Path, typer.Option("--store", help="flow store directory")],
        fmt: Annotated[str, typer.Option("--format", help="table, csv or json (one object a line)")] = "table",
    ) -> None:
        """Run DuckDB SQL over the store."""
        from analysis.campus.query import query as run_query
        from analysis.errors import BadInputError

        if fmt not in ("table", "csv", "json"):
            raise BadInputError(f"unknown --format {fmt!r}", "choose table, csv or json")
        _print_table(run_query(store, sql), fmt)

    @campus.command("summary")
    def summary(
        store: Annotated[Path, typer.Option("--store", help="flow store directory")],
        fmt: Annotated[str, typer.Option("--format", help="table, csv or json")] = "table",
    ) -> None:
        """Flows, packets, bytes and hosts per hour."""
        from analysis.campus.query import summary as run_summary

        _print_table(run_summary(store), fmt)

    @campus.command("predict")
    def predict(
        model: Annotated[Path, typer.Argument(help="model directory written by flowtruth train")],
        store: Annotated[Path, typer.Option("--store", help="flow store directory")],
        workers: Annotated[int, typer.Option("--workers", "-j", help="worker processes")] = 1,
        scheduler: Annotated[str | None, typer.Option("--scheduler", help="Dask scheduler, e.g. tcp://HOST:8786")] = None,
        local_dask: Annotated[bool, typer.Option("--local-dask", help="start a local Dask cluster of --workers processes")] = False,
        plot: Annotated[Path | None, typer.Option("--plot", help="PNG of the messaging share per hour (default STORE/messaging_share.png)")] = None,
        fmt: Annotated[str, typer.Option("--format", help="table, csv or json")] = "table",
    ) -> None:
        """Score every stored flow and report the encrypted-messaging share per hour."""
        predict_store_command(model, store, workers=workers, scheduler=scheduler,
                              local_dask=local_dask, plot=plot, fmt=fmt)

    @campus.command("capture-command")
    def capture_command(
        iface: Annotated[str, typer.Argument(help="monitoring interface")],
        out_dir: Annotated[Path, typer.Option("--dir", help="directory for the rotated files")],
        tool: Annotated[str, typer.Option(help="tcpdump or dumpcap")] = "tcpdump",
        snaplen: Annotated[int, typer.Option(help="bytes kept per packet (L2-L4 headers)")] = 128,
        rotate_seconds: Annotated[int, typer.Option(help="start a new file every N seconds")] = 3600,
    ) -> None:
        """Print the header-only capture command for a monitoring host (see ap_setup.campus_capture)."""
        import shlex

        from ap_setup.campus_capture import capture_argv

        sys.stdout.write(shlex.join(capture_argv(tool, iface, out_dir, snaplen=snaplen,
                                                 rotate_seconds=rotate_seconds)) + "\n")
