"""``flowtruth tui [--lab | --demo] [PLAN.yaml]``: the technician's console.

``--demo`` is a rehearsal mode: a built-in engine emits the events of a real plan with
delays and touches no phone. ``--lab`` runs the real session engine against the virtual
lab (``controller.lab.topology``): the running lab, or one brought up (in a worker, on
the first start or provision) and taken down on exit. Without PLAN.yaml ``--lab`` runs
each lab phone's chat in Signal, Telegram and WhatsApp. Textual is imported inside the
command body.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer


def load_plan(path: Path) -> Any:
    """The engine's pydantic plan from PLAN.yaml (errors name the file and field)."""
    from controller.errors import ConfigError
    from controller.plan import load_plan as _load

    if not path.exists():
        raise ConfigError(f"{path}: no such plan file", "give the path of a PLAN.yaml")
    return _load(path)


def lab_plan(phones: int) -> Any:
    """The plan ``--lab`` runs without a PLAN.yaml: each lab phone chats in each app."""
    from controller.plan import Plan

    return Plan(name="lab-messengers", devices=[f"lab:phone{i}" for i in range(1, phones + 1)],
                apps=["signal", "telegram", "whatsapp"], activities=["chat"], wait_scale=0.2,
                output="runs")


class LabHolder:
    """The lab the TUI uses: loaded or brought up in the engine's worker, downed on exit
    only if this command brought it up."""

    def __init__(self, phones: int, plan: Any, state_dir: Path | None = None,
                 adb_port: int = 5037, mgmt_base: int = 0) -> None:
        self.phones, self.plan = phones, plan
        self.state_dir, self.adb_port, self.mgmt_base = state_dir, adb_port, mgmt_base
        self.lab: Any = None
        self.env: Any = None
        self.brought_up = False
        self.adb_started = False

    def environment(self, sink: Any) -> Any:
        from controller import events as ev
        from controller.errors import LabError
        from controller.plan import lab_environment_for

        try:
            from controller.lab.topology import Lab
        except ImportError as err:
            raise LabError("the virtual lab (controller.lab.topology) is not installed",
                           "use `flowtruth tui --demo` to rehearse without phones") from err
        lab = Lab.load(self.state_dir)
        if lab is not None and lab.state.status != "up":
            raise LabError(f"the virtual lab {lab.lab_id} is half up or half down",
                           "`flowtruth lab down`, then start again")
        if lab is None:
            sink(ev.LogRecorded("info", f"bringing the virtual lab up ({self.phones} phones)"))
            self.adb_started = not _listening(self.adb_port)
            lab = Lab.up(phones=self.phones, adb_port=self.adb_port, state_dir=self.state_dir,
                         mgmt_base=self.mgmt_base, sink=lambda step, detail: sink(
                             ev.LogRecorded("info", f"lab {step}: {detail}")))
            self.brought_up = True
        else:
            sink(ev.LogRecorded("info", f"using the running virtual lab {lab.lab_id}"))
        self.lab = lab
        self.env = lab_environment_for(self.plan, lab)
        return self.env

    def ap_snapshot(self) -> Any:
        """The lab AP for the dashboard (down until the lab is up)."""
        from controller.tui.messages import ApSnapshot

        if self.lab is None:
            return ApSnapshot(False, "", "", 0, None, "the lab comes up with the first action "
                                                      "(s or d)")
        st = self.lab.status()
        size = None
        capture = getattr(self.env, "capture", None)
        path = getattr(capture, "path", None)
        if path is not None and Path(path).exists():
            size = Path(path).stat().st_size
        ap = st.get("ap") or {}
        return ApSnapshot(st.get("status") == "up", str(ap.get("interface", "")),
                          "lab (veth)", len(st.get("phones", [])), size,
                          f"lab {st.get('lab_id')}, namespace {ap.get('netns', '-')}")

    def down(self) -> None:
        """Take down what this command brought up: the lab, and the adb server it started."""
        if self.brought_up and self.lab is not None:
            import contextlib
            import sys

            with contextlib.suppress(OSError):  # the terminal may be gone (SIGHUP)
                sys.stderr.write(f"flowtruth: taking the virtual lab {self.lab.lab_id} down\n")
            self.lab.down()
            self.brought_up = False
            if self.adb_started:
                import subprocess

                subprocess.run(["adb", "-P", str(self.adb_port), "kill-server"],
                               capture_output=True, timeout=20, check=False)


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def register(app: typer.Typer) -> None:
    @app.command("tui")
    def tui(
        plan: Annotated[Path | None, typer.Argument(help="PLAN.yaml to run (the demo plan with --demo)")] = None,
        lab: Annotated[bool, typer.Option("--lab", help="run against the virtual lab: no phones needed")] = False,
        demo: Annotated[bool, typer.Option("--demo", help="rehearsal mode: a built-in engine plays a plan's events, touching nothing")] = False,
        phones: Annotated[int, typer.Option("--phones", min=1, max=8, help="virtual phones when --lab brings the lab up")] = 2,
        tick: Annotated[float, typer.Option("--demo-tick", min=0.0, help="seconds between rehearsal events")] = 0.25,
        fail: Annotated[list[str], typer.Option("--demo-fail", help="session id the rehearsal fails once (repeatable)")] = [],  # noqa: B006
        state_dir: Annotated[Path | None, typer.Option("--state-dir", help="the lab's state directory (as `flowtruth lab --state-dir`)")] = None,
        adb_port: Annotated[int, typer.Option("--adb-port", help="adb server port of a lab --lab brings up")] = 5037,
        mgmt_base: Annotated[int, typer.Option("--mgmt-base", hidden=True, help="management subnet offset of a lab --lab brings up")] = 0,
    ) -> None:
        """The console: dashboard (AP, devices, plan queue, log), session view, results."""
        from controller.errors import ConfigError

        if lab and demo:
            raise ConfigError("give --lab or --demo, not both")
        holder: LabHolder | None = None
        if demo or (not lab and plan is None):
            from controller.tui.app import demo_ap_probe
            from controller.tui.engine import DEMO_PLAN, DemoEngine

            engine: Any = DemoEngine(tick=tick, fail=frozenset(fail))
            the_plan: Any = load_plan(plan) if plan is not None else DEMO_PLAN
            probe: Any = demo_ap_probe
        elif lab:
            from controller.tui.engine import SessionEngine

            the_plan = load_plan(plan) if plan is not None else lab_plan(phones)
            holder = LabHolder(phones, the_plan, state_dir, adb_port, mgmt_base)
            engine = SessionEngine(env_factory=holder.environment, name="virtual lab")
            probe = holder.ap_snapshot
        else:  # real phones on this workstation's adb server and AP
            from controller.tui.app import probe_ap
            from controller.tui.engine import SessionEngine

            assert plan is not None
            the_plan = load_plan(plan)

            def rig_environment(_sink: Any) -> Any:
                from controller.device import adb_client
                from controller.plan import environment_for

                client = adb_client(the_plan.adb.port, the_plan.adb.host)
                return environment_for(the_plan, client=client)

            engine = SessionEngine(env_factory=rig_environment, name="rig")
            probe = probe_ap
        from controller.tui.app import make_app

        app = make_app(engine=engine, lab=holder, plan=the_plan, ap_probe=probe,
                       hang_up_signals=True)
        try:
            app.run()
        finally:
            if holder is not None:
                holder.down()
        if app.interrupt_code:  # Ctrl-C or SIGTERM: the plan was stopped and torn down
            from controller.interrupt import Interrupted

            why = getattr(app.cancel, "reason", None) or "interrupted"
            raise Interrupted(f"{why}: the console stopped the plan and tore down",
                              hint="the run directories' manifests say interrupted",
                              exit_code=app.interrupt_code)
