"""``flowtruth tui [--lab | --demo] [PLAN.yaml]``: the technician's console.

``--demo`` is a rehearsal mode: a built-in engine emits the events of a real plan with
delays and touches no phone. ``--lab`` runs the real session engine against the virtual
lab (``controller.lab.topology``), bringing it up if it is not up and taking it down on
exit when this command brought it up. Textual is imported inside the command body.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer


def load_plan(path: Path) -> Any:
    """The engine's pydantic plan from PLAN.yaml."""
    from controller.errors import ConfigError

    if not path.exists():
        raise ConfigError(f"{path}: no such plan file", "give the path of a PLAN.yaml")
    try:
        from controller import plan as plan_mod
    except ImportError as err:
        raise ConfigError(f"{path}: the session engine (controller.plan) is not installed",
                          "use `flowtruth tui --demo` to rehearse") from err
    for name in ("load_plan", "load"):
        fn = getattr(plan_mod, name, None)
        if callable(fn):
            return fn(path)
    return plan_mod.Plan.load(path)


def lab_engine(phones: int) -> tuple[Any, Any, bool]:
    """(engine, lab, brought_up): the real engine on the virtual lab."""
    from controller.errors import LabError

    try:
        from controller import session
        from controller.lab.topology import Lab
    except ImportError as err:
        raise LabError(f"the virtual lab or the session engine is missing ({err.name})",
                       "use `flowtruth tui --demo` to rehearse without phones") from err
    from controller.tui.engine import SessionEngine

    lab = Lab.load()
    brought_up = lab is None
    if lab is None:
        lab = Lab.up(phones=phones)
    # The engine's environment for the lab: the lab provides it, or the engine builds it.
    env = lab.environment() if hasattr(lab, "environment") else session.Environment.for_lab(lab)
    return SessionEngine(env=env, name=f"lab ({phones} phones)"), lab, brought_up


def register(app: typer.Typer) -> None:
    @app.command("tui")
    def tui(
        plan: Annotated[Path | None, typer.Argument(help="PLAN.yaml to run (the demo plan with --demo)")] = None,
        lab: Annotated[bool, typer.Option("--lab", help="run against the virtual lab: no phones needed")] = False,
        demo: Annotated[bool, typer.Option("--demo", help="rehearsal mode: a built-in engine plays a plan's events, touching nothing")] = False,
        phones: Annotated[int, typer.Option("--phones", min=1, max=8, help="virtual phones when --lab brings the lab up")] = 2,
        tick: Annotated[float, typer.Option("--demo-tick", min=0.0, help="seconds between rehearsal events")] = 0.25,
        fail: Annotated[list[str], typer.Option("--demo-fail", help="session id the rehearsal fails once (repeatable)")] = [],  # noqa: B006
    ) -> None:
        """The console: dashboard (AP, devices, plan queue, log), session view, results."""
        from controller.errors import ConfigError

        if lab and demo:
            raise ConfigError("give --lab or --demo, not both")
        the_lab = None
        brought_up = False
        if demo or (not lab and plan is None):
            from controller.tui.engine import DEMO_PLAN, DemoEngine

            engine: Any = DemoEngine(tick=tick, fail=frozenset(fail))
            the_plan: Any = load_plan(plan) if plan is not None else DEMO_PLAN
            from controller.tui.app import demo_ap_probe

            probe: Any = demo_ap_probe
        elif lab:
            the_plan = load_plan(plan) if plan is not None else None
            engine, the_lab, brought_up = lab_engine(phones)
            from controller.tui.app import probe_ap

            probe = getattr(the_lab, "ap_snapshot", None) or probe_ap
        else:
            raise ConfigError("a plan needs a rig: give --lab for the virtual lab",
                              "driving real phones from the TUI comes with the session engine")
        from controller.tui.app import make_app

        app = make_app(engine=engine, lab=the_lab, plan=the_plan, ap_probe=probe)
        try:
            app.run()
        finally:
            if brought_up and the_lab is not None:
                the_lab.down()
