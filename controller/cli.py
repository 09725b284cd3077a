"""The ``flowtruth`` command line: a thin typer front end over the core.

Each command lives in ``controller/commands/<name>.py`` with a ``register(app)``
function; heavy libraries are imported inside the command bodies so that start-up
stays fast. Known failures (:class:`analysis.errors.FlowtruthError`) become one line
on stderr and an exit status (2 bad input, 1 anything else), never a traceback.
"""

from __future__ import annotations

import importlib
import sys

import typer

from analysis.errors import FlowtruthError

COMMAND_MODULES = [
    "controller.commands.flows",
    "controller.commands.ap",
    "controller.commands.campus",
    "controller.commands.ml",
    "controller.commands.label",
    "controller.commands.lab",
    "controller.commands.tui",
    "controller.commands.run",
    "controller.commands.scenario",
    "controller.commands.devices",
    "controller.commands.demo",
]

app = typer.Typer(
    name="flowtruth",
    help="Ground-truth labelled datasets of mobile-app traffic, and classifiers that learn from them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

for _name in COMMAND_MODULES:
    importlib.import_module(_name).register(app)


def fail(err: FlowtruthError) -> int:
    """Print one line for a known failure and return its exit status."""
    from controller.safety import plain

    sys.stderr.write(f"flowtruth: error: {plain(err.one_line())}\n")
    return err.exit_code


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``flowtruth`` console script."""
    try:
        app(args=argv, standalone_mode=False)
    except FlowtruthError as err:
        sys.exit(fail(err))
    except KeyboardInterrupt:
        sys.stderr.write("flowtruth: interrupted\n")
        sys.exit(130)
    except OSError as err:  # disk full, permission denied, ... on a path we were given
        where = f"{err.filename}: " if getattr(err, "filename", None) else ""
        sys.stderr.write(f"flowtruth: error: {where}{err.strerror or err}\n")
        sys.exit(1)
    except SystemExit:
        raise
    except Exception as err:  # usage errors from typer's (bundled) click, and plain click's
        usage_types: list[type] = []
        abort_types: list[type] = [typer.Abort]
        try:
            from typer._click import exceptions as tce

            usage_types.append(tce.ClickException)
        except ImportError:  # older typer uses the installed click
            pass
        try:
            import click

            usage_types.append(click.exceptions.ClickException)
            abort_types.append(click.exceptions.Abort)
        except ImportError:
            pass
        if isinstance(err, tuple(usage_types)):
            err.show()  # type: ignore[attr-defined]
            code = getattr(err, "exit_code", 2)
            sys.exit(2 if code in (None, 1) else code)
        if isinstance(err, tuple(abort_types)):
            sys.stderr.write("flowtruth: aborted\n")
            sys.exit(1)
        raise
    sys.exit(0)


if __name__ == "__main__":
    main()
