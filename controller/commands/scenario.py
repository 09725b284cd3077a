"""``flowtruth scenario check|list|show|probe|try``: scenario files and the tools a technician
uses on a phone (or a virtual-lab phone ``lab:phoneN``)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any

import typer

_CTRL = re.compile(r"[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def clean(s: str, limit: int = 200) -> str:
    """A device or file string safe to print: control characters escaped, length capped."""
    s = _CTRL.sub(lambda m: f"\\x{ord(m.group()):02x}", s)
    return s if len(s) <= limit else s[:limit] + f"… ({len(s)} chars)"


def device_link(device: str, adb_port: int = 5037) -> Any:
    """A :class:`DeviceLink` to an adb serial, ``HOST:PORT``, or ``lab:NAME`` (the running
    virtual lab's phone, found as ``flowtruth run --lab`` finds it)."""
    import os

    from controller.device import AdbDeviceLink, adb_client, connect, list_serials
    from controller.errors import ConfigError, DeviceError, LabError

    if device.startswith("lab:"):
        try:
            from controller.lab.topology import Lab
        except ImportError:
            raise LabError(f"{device}: the virtual lab is not installed") from None
        lab = Lab.load(os.environ.get("FLOWTRUTH_LAB_STATE_DIR") or None)
        if lab is None or lab.adb_port is None:
            raise LabError(f"{device}: no virtual lab is running", hint="flowtruth lab up")
        name = device.removeprefix("lab:")
        phone = next((p for p in lab.phones if name in (p.name, p.config.serial)), None)
        if phone is None:
            raise ConfigError(f"{device}: the lab has no such phone",
                              hint="has: " + ", ".join(f"lab:{p.name}" for p in lab.phones))
        client = adb_client(int(lab.adb_port))
        serial = phone.serial
    else:
        client = adb_client(adb_port, start_server=adb_port == 5037)
        serial = device
        if re.fullmatch(r"[\w.-]+:\d+", device) and (device, "device") not in list_serials(client):
            connect(client, device)
    states = dict(list_serials(client))
    if states.get(serial) != "device":
        raise DeviceError(f"{clean(device)}: not connected ({states.get(serial, 'not found')})",
                          hint="adb devices")
    return AdbDeviceLink(client, serial)


def register(app: typer.Typer) -> None:
    sc = typer.Typer(help="Scripted app sessions (controller/scenarios/*.yaml).",
                     no_args_is_help=True)
    app.add_typer(sc, name="scenario")

    @sc.command("check")
    def check(files: Annotated[list[Path], typer.Argument(help="scenario files")]) -> None:
        """Validate scenario files (and their names in the selector table); errors name the
        file and field (exit 2)."""
        from controller.scenario import load_scenario

        for f in files:
            s = load_scenario(f)
            acts = ", ".join(f"{a} ({len(next(iter(r.values())))} steps)"
                             for a, r in s.activities.items())
            typer.echo(f"{clean(str(f))}: ok: {s.app} ({s.package}): {acts}")

    @sc.command("list")
    def list_() -> None:
        """The shipped scenarios and their activities."""
        from controller.scenario import load_scenario, scenario_files

        for f in scenario_files():
            s = load_scenario(f)
            typer.echo(f"{s.app:10} {s.package:30} {', '.join(s.activities)}")

    @sc.command("show")
    def show(app_name: Annotated[str, typer.Argument(metavar="APP")],
             activity: Annotated[str, typer.Argument()],
             role: Annotated[str, typer.Option(help="solo, caller or callee")] = "solo") -> None:
        """The steps of one activity with the default parameters filled in."""
        from controller.scenario import scenario_for

        s = scenario_for(app_name)
        for i, st in enumerate(s.steps(activity, role=role), 1):
            typer.echo(f"{i:3}. {clean(st.describe())}")

    @sc.command("probe")
    def probe(
        device: Annotated[str, typer.Argument(help="adb serial, HOST:PORT or lab:NAME")],
        app_name: Annotated[str | None, typer.Option("--app", help="signal, telegram, whatsapp (default: the app on screen)")] = None,
        save: Annotated[Path | None, typer.Option("--save", help="write the dump here (a test fixture)")] = None,
        dump_file: Annotated[Path | None, typer.Option("--dump", help="read this saved dump instead of the phone (DEVICE is then only a label)")] = None,
        locale: Annotated[str | None, typer.Option(help="the language of the texts (default: the phone's)")] = None,
        adb_port: Annotated[int, typer.Option("--adb-port", help="adb server port")] = 5037,
    ) -> None:
        """Dump the current screen: which screen of the app it is, its nodes (id, text,
        description, bounds) and which of the scenario's selectors match now."""
        from controller.errors import ConfigError, ControllerError
        from controller.scenario import (
            APPS,
            Resolver,
            fill_selector,
            language,
            load_table,
            parse_screen,
            read_locale,
            recognise,
            scenario_for,
            scenario_selectors,
        )

        link = None
        if dump_file is not None:
            try:
                xml = dump_file.read_text(encoding="utf-8", errors="replace")
            except OSError as err:
                raise ConfigError(f"{clean(str(dump_file))}: cannot read: {err.strerror}") from None
        else:
            link = device_link(device, adb_port)
            xml = ""
            for _ in range(5):
                xml = link.shell("uiautomator dump /sdcard/window_dump.xml >/dev/null 2>&1; "
                                 "cat /sdcard/window_dump.xml", timeout=30).stdout
                if "<hierarchy" in xml:
                    break
        nodes = parse_screen(xml)
        if "<hierarchy" not in xml or not nodes:
            raise ConfigError(f"{clean(device)}: no screen dump (uiautomator could not get an "
                              "idle state, or the file is not a dump)", hint="try again")
        if save is not None:
            save.write_text(xml, encoding="utf-8")
        if app_name is None:
            pkgs = [n.package for n in nodes if n.package]
            known = [p for p in pkgs if p in APPS.values()]
            app_name = max(set(known), key=known.count) if known else None
        if locale is None:
            locale = read_locale(link) if link is not None else "en"
        typer.echo(f"{clean(device)}: {len(nodes)} nodes; locale {clean(locale or '?')}")
        sc = scenario_for(app_name) if app_name else None
        res = None
        if sc is not None:
            table = load_table()
            lang = language(locale)
            if lang not in table.locales:
                typer.echo(f"the selector table has no {lang!r} texts: matching with 'en'")
                locale = "en"
            res = Resolver(table, sc.table_app, locale)
            name = recognise(sc, nodes, res)
            typer.echo(f"screen: {name or 'unknown'} ({sc.app})")
        else:
            typer.echo("screen: unknown (no Signal/Telegram/WhatsApp node on screen; use --app)")
        typer.echo("nodes:")
        for i, n in enumerate(nodes):
            if not (n.text or n.resource_id or n.content_desc or n.clickable):
                continue
            typer.echo(f"  [{i:3}] {clean(n.resource_id) or '-'}  {clean(n.cls.split('.')[-1])}"
                       f"  text={clean(n.text)!r}  desc={clean(n.content_desc)!r}  {list(n.bounds)}")
        if sc is not None and res is not None:
            typer.echo("selectors matching now:")
            hits = 0
            values = sc.values()
            for where, sel in scenario_selectors(sc):
                try:
                    found = res.find_all(nodes, fill_selector(sel, values))
                except ControllerError:  # a placeholder without a value: skip
                    continue
                if found:
                    hits += 1
                    typer.echo(f"  {where}: {clean(sel.describe())} -> "
                               f"{clean(nodes[found[0]].describe())}"
                               + (f" (+{len(found) - 1} more)" if len(found) > 1 else ""))
            if not hits:
                typer.echo("  none")

    @sc.command("try")
    def try_(
        device: Annotated[str, typer.Argument(help="adb serial, HOST:PORT or lab:NAME")],
        app_name: Annotated[str, typer.Argument(metavar="APP")],
        activity: Annotated[str, typer.Argument()],
        role: Annotated[str, typer.Option(help="solo, caller or callee")] = "solo",
        peer: Annotated[str | None, typer.Option(help="the other phone (caller/callee)")] = None,
        param: Annotated[list[str], typer.Option("--param", "-p", help="NAME=VALUE (repeatable)")] = [],  # noqa: B006
        wait_scale: Annotated[float, typer.Option(help="scale every wait (0.1: ten times faster)")] = 1.0,
        run_dir: Annotated[Path | None, typer.Option(help="where the last screen goes when a step fails")] = None,
        adb_port: Annotated[int, typer.Option("--adb-port", help="adb server port")] = 5037,
    ) -> None:
        """Run one activity on a phone without capture or tracing, printing each step and
        what it matched."""
        import json

        from controller.errors import ConfigError
        from controller.scenario import ScenarioFailed, ScenarioRunner, scenario_for

        params = {}
        for p in param:
            k, sep, v = p.partition("=")
            if not sep:
                raise ConfigError(f"--param {clean(p)!r}: use NAME=VALUE")
            params[k] = v
        s = scenario_for(app_name)
        steps = s.steps(activity, params, role=role)
        link = device_link(device, adb_port)
        runner = ScenarioRunner(link, s, role=role, peer=peer, wait_scale=wait_scale,
                                run_dir=run_dir,
                                on_event=lambda m: typer.echo(f"      ({clean(m)})"))
        printed = [0]

        def flush() -> None:
            for e in runner.steps_report[printed[0]:]:
                if e["ok"]:
                    typer.echo(f"      -> {clean(str(e['matched']))} [screen: {e['screen'] or '?'}]")
                    printed[0] += 1

        def on_step(i: int, n: int, text: str) -> None:
            flush()
            typer.echo(f"{i + 1:3}/{n} {clean(text)}")

        runner.on_step = on_step
        try:
            runner.run(steps)
        except ScenarioFailed:
            flush()
            rep = runner.report()
            typer.echo(f"not verified: {clean(rep.get('reason', ''), 400)}")
            raise
        finally:
            rep = runner.report()
        flush()
        typer.echo(json.dumps({k: v for k, v in rep.items() if k != "steps"}, ensure_ascii=False))
        typer.echo("verified" if rep["verified"] else "not verified")
