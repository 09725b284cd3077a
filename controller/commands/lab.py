"""``flowtruth lab up|status|down|truth|score``: the virtual lab from the command line."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

StateDirOpt = Annotated[
    Optional[Path],  # noqa: UP045 - typer needs Optional at runtime on 3.11
    typer.Option("--state-dir", help="Where lab.json lives (default /run/flowtruth)."),
]


def _print_step(step: str, detail: str) -> None:
    from rich.console import Console

    Console(stderr=True, highlight=False).print(f"[green]•[/] {step}: {detail}")


def _running(state_dir: Path | None):  # type: ignore[no-untyped-def]
    from controller.errors import LabError
    from controller.lab.topology import Lab

    lab = Lab.load(state_dir)
    if lab is None:
        raise LabError("no lab is up", hint="`flowtruth lab up` starts one")
    return lab


def up(
    phones: Annotated[int, typer.Option("--phones", "-n", help="Number of phones (1-9).")] = 2,
    adb_port: Annotated[
        int, typer.Option("--adb-port", help="adb server port the phones are attached to.")
    ] = 5037,
    no_adb: Annotated[
        bool, typer.Option("--no-adb", help="Do not `adb connect` the phones.")
    ] = False,
    capture: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option("--capture", help="Also capture on the AP into this directory."),
    ] = None,
    state_dir: StateDirOpt = None,
    phone_set: Annotated[
        list[str],
        typer.Option("--phone", help="N:FIELD=VALUE sets a field of phone N, e.g. a failure "
                     "mode seen on real phones: 1:strace_fault=selinux (or ptrace), "
                     "2:crlf_output=true, 1:hostile_process=long (or newline). Repeatable."),
    ] = [],  # noqa: B006
    locale: Annotated[
        Optional[list[str]],  # noqa: UP045
        typer.Option(
            "--locale",
            help="The phones' language: LOCALE (every phone) or "
            "phoneN=LOCALE, e.g. phone2=de-DE (repeatable).",
        ),
    ] = None,
    interruptions: Annotated[
        Optional[float],  # noqa: UP045
        typer.Option(
            "--interruptions",
            min=0.0,
            max=1.0,
            help="Chance per action of a "
            "permission prompt or rating dialog in the apps (default 0.03; 0: never).",
        ),
    ] = None,
    ring_timeout: Annotated[
        float, typer.Option("--ring-timeout", min=1.0, help="Seconds an unanswered call rings.")
    ] = 45.0,
) -> None:
    """Bring the virtual lab up: internet, access point and phones in network namespaces."""
    import time

    from controller.errors import ConfigError
    from controller.lab.topology import Lab

    updates: dict[int, dict[str, str]] = {}
    for item in phone_set:
        n, _, rest = item.partition(":")
        field, eq, value = rest.partition("=")
        if not (n.isdigit() and 1 <= int(n) <= phones and field and eq):
            raise ConfigError(f"--phone {item!r}: expected N:FIELD=VALUE with N from 1 to "
                              f"{phones}", hint="e.g. --phone 1:strace_fault=selinux")
        updates.setdefault(int(n), {})[field] = value
    started = time.monotonic()
    lab = Lab.up(phones=phones, adb_port=None if no_adb else adb_port, state_dir=state_dir,
                 capture_dir=capture, sink=_print_step, phone_updates=updates,
                 phone_options=phone_options(phones, locale or [], interruptions),
                 ring_timeout_s=ring_timeout)  # fmt: skip
    for p in lab.phones:
        typer.echo(f"{p.name}: {p.config.model} {p.serial} ip {p.ip} ({p.netns}); "
                   f"owner {p.owner}, {p.config.locale}")  # fmt: skip
    typer.echo(f"lab {lab.lab_id} up in {time.monotonic() - started:.1f} s; "
               f"capture interface {lab.ap.interface} in {lab.ap.netns}; truth {lab.truth_path}")  # fmt: skip


def phone_options(
    phones: int, locales: list[str], interruptions: float | None
) -> dict[int, dict[str, object]]:
    """``Lab.up``'s phone_options from ``--locale`` values and ``--interruptions``."""
    import re

    from controller.errors import ConfigError

    out: dict[int, dict[str, object]] = {}
    for i in range(1, phones + 1):
        if interruptions is not None:
            out.setdefault(i, {})["interruption_rate"] = interruptions
    for value in locales:
        name, _, loc = value.rpartition("=")
        if not re.fullmatch(r"[a-z]{2,3}(-[A-Za-z0-9]{2,8})*", loc):
            raise ConfigError(f"--locale {value!r}: not a locale like de-DE")
        if not name:
            targets = list(range(1, phones + 1))
        elif (m := re.fullmatch(r"phone([1-9])", name)) and int(m.group(1)) <= phones:
            targets = [int(m.group(1))]
        else:
            raise ConfigError(f"--locale {value!r}: no {name} in a lab of {phones} phones",
                              hint="e.g. --locale phone2=de-DE")  # fmt: skip
        for i in targets:
            out.setdefault(i, {})["locale"] = loc
    return out


def status(
    state_dir: StateDirOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the status as JSON.")] = False,
) -> None:
    """Namespaces, daemons, phones with their adb state and running apps, capture."""
    import json

    from controller.lab.topology import Lab, stale_lab_ids

    lab = Lab.load(state_dir)
    if lab is None:
        stale = stale_lab_ids()
        if as_json:
            typer.echo(json.dumps({"up": False, "stale": stale}))
        else:
            typer.echo("no lab is up" + (f"; stale leftovers of lab(s) {', '.join(stale)} "
                                         "(`flowtruth lab down` removes them)" if stale else ""))  # fmt: skip
        return
    st = lab.status()
    if as_json:
        typer.echo(json.dumps(st, indent=2))
        return
    typer.echo(f"lab {st['lab_id']}: {st['status']}, workdir {st['workdir']}")
    for ns, present in st["namespaces"].items():
        typer.echo(f"  namespace {ns}: {'present' if present else 'MISSING'}")
    for name, alive in st["processes"].items():
        typer.echo(f"  {name}: {'running' if alive else 'NOT RUNNING'}")
    for p in st["phones"]:
        apps = ", ".join(f"{k} ({v})" for k, v in p["running"].items()) or "none"
        typer.echo(f"  {p['name']} {p['model']} {p['serial']} adb={p['adb']} ip {p['ip']}; "
                   f"apps started: {apps}; foreground: {p['foreground'] or '-'}")  # fmt: skip
    cap = st["capture"]
    typer.echo("  capture: " + (f"{'running' if cap['running'] else 'stopped'} in {cap['dir']}"
                                if cap else f"none (run tcpdump -i {st['ap']['interface']} "
                                f"in {st['ap']['netns']})"))  # fmt: skip


def down(state_dir: StateDirOpt = None) -> None:
    """Tear the lab down, and any stale lab a killed run left behind (idempotent)."""
    import time

    from controller.lab.topology import Lab

    started = time.monotonic()
    ids = Lab.down_all(state_dir, sink=_print_step)
    if ids:
        typer.echo(f"lab(s) {', '.join(ids)} down in {time.monotonic() - started:.1f} s")
    else:
        typer.echo("nothing was up")


def truth(
    out: Annotated[Path, typer.Option("--out", "-o", help="Write truth.csv here.")] = Path(
        "truth.csv"
    ),
    state_dir: StateDirOpt = None,
) -> None:
    """Export the running lab's ground truth (every simulated-app socket) as CSV."""
    from controller.lab.truth import read_truth, write_truth_csv

    lab = _running(state_dir)
    rows = read_truth(lab.truth_path)
    write_truth_csv(rows, out)
    typer.echo(f"{len(rows)} sockets -> {out}")


def score(
    labels: Annotated[Path, typer.Argument(help="labels.csv written by `flowtruth label`.")],
    truth_file: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option("--truth", help="Truth file (default: the running lab's)."),
    ] = None,
    app: Annotated[
        Optional[list[str]],  # noqa: UP045
        typer.Option("--app", help="Score these apps only (repeatable)."),
    ] = None,
    state_dir: StateDirOpt = None,
) -> None:
    """Precision and recall per app of a labelling against the lab's truth."""
    from controller.lab.truth import read_labels_csv, read_truth, score

    path = truth_file or _running(state_dir).truth_path
    result = score(read_labels_csv(labels), read_truth(path), apps=app or None)

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.1f}%"

    for s in result.values():
        typer.echo(f"{s.app}: precision {pct(s.precision)} ({s.correct}/{s.labelled}), "
                   f"recall {pct(s.recall)} ({s.recalled}/{s.truth})")  # fmt: skip


def register(app: typer.Typer) -> None:
    """Add the ``lab`` command group."""
    lab = typer.Typer(help="The virtual lab: phones, AP and internet in namespaces.",
                      no_args_is_help=True)  # fmt: skip
    lab.command("up")(up)
    lab.command("status")(status)
    lab.command("down")(down)
    lab.command("truth")(truth)
    lab.command("score")(score)
    app.add_typer(lab, name="lab")
