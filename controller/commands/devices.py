"""``flowtruth devices``: the phones the adb server sees, with root, apps, clock and warnings."""

from __future__ import annotations

from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    @app.command("devices")
    def devices(
        adb_port: Annotated[int, typer.Option("--adb-port", help="adb server port")] = 5037,
        connect_to: Annotated[list[str], typer.Option("--connect", help="HOST:PORT of a TCP phone to adb connect first (repeatable)")] = [],  # noqa: B006
        lab: Annotated[bool, typer.Option("--lab", help="the running virtual lab's adb server")] = False,
        clock: Annotated[bool, typer.Option("--clock/--no-clock", help="measure each phone's clock offset")] = True,
    ) -> None:
        """Discover phones (USB and TCP): model, Android, ABI, battery, SELinux, root, target apps, clock, preflight."""
        from rich.console import Console
        from rich.table import Table

        from controller.device import (
            AdbDeviceLink,
            adb_client,
            check_root,
            check_tracing,
            connect,
            list_serials,
            preflight,
            probe_clock,
            read_apps,
            read_facts,
        )
        from controller.errors import ControllerError, LabError
        from controller.scenario import APPS

        if lab:
            try:
                from controller.lab.topology import Lab
            except ImportError:
                raise LabError("--lab: the virtual lab is not installed") from None
            import os

            the_lab = Lab.load(os.environ.get("FLOWTRUTH_LAB_STATE_DIR") or None)
            if the_lab is None or the_lab.adb_port is None:
                raise LabError("--lab: no virtual lab is running", hint="flowtruth lab up")
            adb_port = int(the_lab.adb_port)
        client = adb_client(adb_port, start_server=adb_port == 5037)
        for addr in connect_to:
            connect(client, addr)
        console = Console()
        t = Table(title=f"adb server :{adb_port}")
        for c in ("serial", "state", "device", "android/abi", "battery", "selinux", "root",
                  "apps (uid, version)", "clock", "warnings"):
            t.add_column(c, overflow="fold")
        from controller.safety import markup

        def row(*cells: str) -> None:  # everything here is the phone's say: no markup, no ESC
            t.add_row(*(markup(c) for c in cells))

        found = list_serials(client)
        for serial, state in found:
            if state != "device":
                row(serial, state, *[""] * 8)
                continue
            link = AdbDeviceLink(client, serial)
            try:
                f = read_facts(link)
                root = check_root(link)
                apps = read_apps(link, APPS.values())
                clk = probe_clock(link) if clock else None
                warns = preflight(link, f)
                if root.rooted:  # SELinux, Yama, and whether root's strace stays attached
                    warns += check_tracing(link)[1]
            except ControllerError as err:
                row(serial, "error", err.one_line(), *[""] * 7)
                continue
            row(
                serial, state, f"{f.manufacturer} {f.model}", f"{f.android} / {f.abi}",
                f"{f.battery_level} %" if f.battery_level is not None else "?", f.selinux,
                (f"yes ({root.method}" + (f", Magisk {root.magisk})" if root.magisk else ")"))
                if root.rooted else "NO",
                "\n".join(f"{a.package} ({a.uid}, {a.version})" for a in apps.values()) or "none",
                f"{clk.offset_s:+.3f} s ±{clk.uncertainty_s:.3f}" if clk else "",
                "\n".join(f"{w.message} (fix: {w.fix})" if w.check in ("root_ptrace",
                          "ptrace_scope") else w.message for w in warns))
        console.print(t)
        if not found:
            console.print("no devices: plug a phone in (USB debugging on) or --connect HOST:PORT")
