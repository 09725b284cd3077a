"""``flowtruth ap up|down|status|check``: the access point from the command line."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

if TYPE_CHECKING:
    from ap_setup.config import ApConfig
    from ap_setup.lifecycle import ApStepFinished
    from ap_setup.supervise import SupervisorEvent

ConfigOpt = Annotated[
    Optional[Path],  # noqa: UP045 - typer needs Optional at runtime on 3.11
    typer.Option(
        "--config", "-c", help="AP config file (YAML or TOML); defaults apply without one."
    ),
]
InterfaceOpt = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option("--interface", "-i", help="AP interface; overrides the config file."),
]


def load(config: Path | None, interface: str | None = None) -> ApConfig:
    """The AP config from ``config`` (or the defaults), with CLI overrides applied."""
    from ap_setup.config import ApConfig, config_from_mapping, load_config

    cfg = load_config(config) if config else ApConfig()
    if interface:
        data = cfg.model_dump()
        data["interface"] = interface
        cfg = config_from_mapping(data, "--interface")
    return cfg


def _say(text: str, soft_wrap: bool = False) -> None:
    """One progress line on stderr; a closed terminal (``ap up --foreground`` after SIGHUP)
    must not stop the teardown, so write errors are dropped (rich exits on a broken pipe)."""
    from rich.console import Console

    with contextlib.suppress(OSError, ValueError, SystemExit):
        Console(stderr=True, highlight=False, soft_wrap=soft_wrap).print(text)


def _print_step(event: ApStepFinished) -> None:
    _say(f"[green]•[/] {event.step}: {event.detail}")


def _print_supervisor(event: SupervisorEvent) -> None:
    from ap_setup.supervise import DaemonGaveUp, DaemonRestarted, SupervisorStopped, describe

    colour = "green" if isinstance(event, DaemonRestarted | SupervisorStopped) else "yellow"
    colour = "red" if isinstance(event, DaemonGaveUp) else colour
    _say(f"[{colour}]•[/] supervisor: {describe(event)}", soft_wrap=True)


def up(
    config: ConfigOpt = None,
    interface: InterfaceOpt = None,
    capture: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option("--capture", help="Also start a packet capture into this directory."),
    ] = None,
    foreground: Annotated[
        bool,
        typer.Option(
            "--foreground",
            help="Stay in the foreground supervising the daemons; Ctrl-C takes the AP down.",
        ),
    ] = False,
    supervise: Annotated[
        Optional[bool],  # noqa: UP045
        typer.Option(
            "--supervise/--no-supervise",
            help="Restart hostapd/dnsmasq when they exit; overrides supervision.enabled.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Bring the access point up: radio, addressing, offloads off, NAT, hostapd, dnsmasq.

    Returns with the daemons running and a detached supervisor restarting them when they
    exit (unless supervision is off); with --foreground it stays and supervises itself.
    """
    from ap_setup.lifecycle import ap_up

    cfg = load(config, interface)
    wanted = cfg.supervision.enabled if supervise is None else supervise
    if foreground:
        _up_foreground(cfg, capture, wanted)
        return
    state = ap_up(cfg, sink=_print_step, capture_dir=capture,
                  supervise="process" if wanted else None)  # fmt: skip
    if state.ssid:
        typer.echo(f"SSID {state.ssid!r}  passphrase {state.passphrase}")
    typer.echo(f"AP up on {state.interface}; state in {cfg.state_path}")


def _up_foreground(cfg: ApConfig, capture: Path | None, supervise: bool) -> None:
    """``ap up --foreground``: up, supervise until a signal or give-up, then down."""
    import signal
    import threading

    from ap_setup.lifecycle import ap_down, ap_up
    from ap_setup.state import ApState
    from ap_setup.supervise import Supervisor
    from controller.errors import ApError

    stop = threading.Event()
    sup = (
        Supervisor(cfg.state_path, policy=cfg.supervision, sink=_print_supervisor,
                   kind="foreground")
        if supervise else None
    )  # fmt: skip

    def on_signal(_sig: int, _frame: object) -> None:
        stop.set()
        if sup is not None:
            sup.request_stop()

    # Installed before the bring-up: a signal at any point ends in a teardown, never in an
    # AP left up without its foreground process.
    previous = {sig: signal.signal(sig, on_signal)
                for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}  # fmt: skip
    try:
        state = ap_up(cfg, sink=_print_step, capture_dir=capture)
        with contextlib.suppress(OSError, ValueError):
            if state.ssid:
                typer.echo(f"SSID {state.ssid!r}  passphrase {state.passphrase}")
            typer.echo(f"AP up on {state.interface}; state in {cfg.state_path}; "
                       "in the foreground until Ctrl-C")  # fmt: skip
        if stop.is_set():
            pass
        elif sup is not None:
            try:
                sup.run()
            except ApError:
                ap_down(cfg.state_path, sink=_print_step)
                raise
        else:
            while not stop.wait(cfg.supervision.check_interval):
                current = ApState.load(cfg.state_path)
                if current is None or current.status != "up":
                    break
        current = ApState.load(cfg.state_path)
        if current is None or current.status != "up":
            with contextlib.suppress(OSError, ValueError):
                typer.echo("the AP was taken down by `flowtruth ap down`")
            return
        ap_down(cfg.state_path, sink=_print_step)
        with contextlib.suppress(OSError, ValueError):
            typer.echo(f"AP on {state.interface} is down")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if sup is not None and sup.gave_up and not stop.is_set():
        raise ApError(
            sup.gave_up[0], hint="the AP was taken down; fix the cause and start it again"
        )


def down(config: ConfigOpt = None, interface: InterfaceOpt = None) -> None:
    """Tear the access point down and restore what was there before (idempotent)."""
    from ap_setup.lifecycle import ap_down, daemon_launches, stop_leftovers

    cfg = load(config, interface)
    state = ap_down(cfg.state_path, sink=_print_step)
    if state is not None:
        typer.echo(f"AP on {state.interface} is down")
        return
    # No state file: still stop daemons running our config files (a killed `ap up`).
    stopped = stop_leftovers(daemon_launches(cfg), cfg.netns, _print_step)
    typer.echo(f"nothing was up; stopped {len(stopped)} leftover daemon(s)" if stopped
               else "nothing was up")  # fmt: skip


def status(config: ConfigOpt = None, interface: InterfaceOpt = None) -> None:
    """Show daemons, clients (MAC, IP, lease name) and capture state."""
    from rich.console import Console
    from rich.table import Table

    from ap_setup.lifecycle import ap_status

    cfg = load(config, interface)
    st = ap_status(cfg)
    console = Console(highlight=False, soft_wrap=True)
    if st.state is None:
        console.print(f"AP on {cfg.interface}: down (no state file at {cfg.state_path})")
        return
    console.print(f"AP on {st.state.interface}: {st.state.status}"
                  + (f" in namespace {st.state.netns}" if st.state.netns else ""))  # fmt: skip
    from ap_setup.supervise import log_tail

    sup = st.supervisor
    if sup is None:
        console.print("supervisor: none (daemons are not restarted when they exit)")
    elif st.supervisor_alive:
        console.print(f"supervisor: [green]running[/] ({sup.kind}, pid {sup.pid}, log {sup.log})")
    else:
        console.print(f"supervisor: [red]not running[/] ({sup.kind}, pid {sup.pid} is gone; "
                      f"log {sup.log})")  # fmt: skip
    daemons = Table("daemon", "pid", "alive", "restarts", "last restart", title="daemons")
    for name, alive in st.daemons.items():
        rec = st.state.processes[name]
        health = st.health.get(name)
        restarts = str(health.restarts) if health else ("0" if name != "capture" else "-")
        last = ""
        if health and health.history:
            h = health.history[-1]
            last = f"{h.at}: {'failed; ' if h.new_pid is None else ''}{h.reason}"
        daemons.add_row(name, str(rec.pid), "[green]yes[/]" if alive else "[red]no[/]",
                        restarts, last)  # fmt: skip
    console.print(daemons)
    for name, alive in st.daemons.items():
        health = st.health.get(name)
        if health and health.gave_up:
            console.print(f"  [red]{health.gave_up}[/]")
        elif not alive:
            rec = st.state.processes[name]
            console.print(
                f"  {name}: [red]not running[/] (last log lines: {log_tail(Path(rec.log))})"
            )
    for name, pids in st.leftovers.items():
        console.print(f"  [red]{name}: leftover process(es) {', '.join(map(str, pids))}[/] not "
                      "recorded as running (an interrupted `ap up`); `flowtruth ap down` "
                      "stops them")  # fmt: skip
    table = Table("MAC", "IP", "lease name", title="clients")
    for c in st.clients:
        table.add_row(c.mac, c.ip, c.name or "-")
    console.print(table)
    if st.state.capture_dir:
        total = sum(p.stat().st_size for p in st.capture_files if p.exists())
        running = st.daemons.get("capture", False)
        console.print(
            f"capture: {'running' if running else 'stopped'}, {len(st.capture_files)} files, "
            f"{total} bytes in {st.state.capture_dir}"
        )
    else:
        console.print("capture: none started with the AP")


def check(config: ConfigOpt = None, interface: InterfaceOpt = None) -> None:
    """Preflight: each missing or wrong thing on its own line with the fix; exit 1 if any."""
    from rich.console import Console

    from ap_setup.check import checks_passed, run_checks

    cfg = load(config, interface)
    results = run_checks(cfg)
    console = Console(highlight=False, soft_wrap=True)
    for r in results:
        if r.ok:
            console.print(f"[green]ok  [/] {r.name}: {r.message}")
        else:
            mark = "[red]FAIL[/]" if r.blocking else "[yellow]warn[/]"
            console.print(f"{mark} {r.name}: {r.message}\n       fix: {r.fix}")
    if not checks_passed(results):
        failed = sum(1 for r in results if not r.ok and r.blocking)
        console.print(f"{failed} problem(s) must be fixed before `flowtruth ap up`.")
        raise SystemExit(1)
    console.print("ready for `flowtruth ap up`.")


def qa(
    capture_dir: Annotated[Path, typer.Argument(help="Directory holding the capture files.")],
    mtu: Annotated[int, typer.Option(help="MTU of the AP link.")] = 1500,
) -> None:
    """Check a capture: frames larger than the MTU (offload leakage) and drops; exit 1 if any."""
    import json

    from ap_setup.capture import capture_files, qa_capture
    from controller.errors import CaptureError

    files = capture_files(capture_dir)
    if not files:
        raise CaptureError(f"{capture_dir}: no capture files (capture*.pcap*)")
    stats_path = capture_dir / "capture-stats.json"
    stats = json.loads(stats_path.read_text()) if stats_path.exists() else None
    result = qa_capture(files, mtu=mtu, stats=stats)
    typer.echo(
        f"{result.files} files, {result.packets} packets, largest IP packet "
        f"{result.max_ip_length} bytes, drops {result.drops if stats else 'unknown (no capture-stats.json)'}"
    )
    for problem in result.problems:
        typer.echo(f"problem: {problem}")
    if not result.ok:
        raise SystemExit(1)


def register(app: typer.Typer) -> None:
    """Add the ``ap`` command group."""
    ap = typer.Typer(
        help="The Wi-Fi access point the phones join, and its capture.", no_args_is_help=True
    )
    ap.command("up")(up)
    ap.command("down")(down)
    ap.command("status")(status)
    ap.command("check")(check)
    ap.command("qa")(qa)
    app.add_typer(ap, name="ap")


def standalone(command: str, argv: list[str]) -> None:
    """Entry of the ``ap_setup/ap-up`` and ``ap-down`` scripts: one command, same code path."""
    import sys

    import click

    from analysis.errors import FlowtruthError

    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command(command)({"up": up, "down": down, "status": status, "check": check}[command])

    try:
        code = app(args=list(argv), prog_name=f"ap-{command}", standalone_mode=False)
    except FlowtruthError as err:
        sys.stderr.write(f"ap-{command}: error: {err.one_line()}\n")
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    except click.exceptions.ClickException as err:
        err.show()
        sys.exit(2)
    sys.exit(code if isinstance(code, int) else 0)
