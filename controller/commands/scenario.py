"""``flowtruth scenario check FILE...`` and ``flowtruth scenario list``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    sc = typer.Typer(help="Scripted app sessions (controller/scenarios/*.yaml).",
                     no_args_is_help=True)
    app.add_typer(sc, name="scenario")

    @sc.command("check")
    def check(files: Annotated[list[Path], typer.Argument(help="scenario files")]) -> None:
        """Validate scenario files; errors name the file and field (exit 2)."""
        from controller.scenario import load_scenario

        for f in files:
            s = load_scenario(f)
            acts = ", ".join(f"{a} ({len(st)} steps)" for a, st in s.activities.items())
            typer.echo(f"{f}: ok: {s.app} ({s.package}): {acts}")

    @sc.command("list")
    def list_() -> None:
        """The shipped scenarios and their activities."""
        from controller.scenario import SCENARIO_DIR, load_scenario

        for f in sorted(SCENARIO_DIR.glob("*.yaml")):
            s = load_scenario(f)
            typer.echo(f"{s.app:10} {s.package:30} {', '.join(s.activities)}")

    @sc.command("show")
    def show(app_name: Annotated[str, typer.Argument(metavar="APP")],
             activity: Annotated[str, typer.Argument()]) -> None:
        """The steps of one activity with the default parameters filled in."""
        from controller.scenario import scenario_for

        s = scenario_for(app_name)
        for i, st in enumerate(s.steps(activity), 1):
            typer.echo(f"{i:3}. {st.describe()}")
