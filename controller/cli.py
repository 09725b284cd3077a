"""The ``flowtruth`` command line: a thin typer front end over the core.

Each command lives in ``controller/commands/<name>.py`` with a ``register(app)``
function; heavy libraries are imported inside the command bodies so that start-up
stays fast. Known failures (:class:`analysis.errors.FlowtruthError`) become one line
on stderr and an exit status, never a traceback; every command exits with one of
:data:`EXIT_STATUS` (0 done, 1 partly failed or internal error, 2 bad input, 130
interrupted by Ctrl-C, 143 by SIGTERM).
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

    kind = "" if err.exit_code in (130, 143) else "error: "  # an interrupt is no error
    sys.stderr.write(f"flowtruth: {kind}{plain(err.one_line())}\n")
    return err.exit_code


EXIT_STATUS = {
    0: "done",
    1: "partly failed (some sessions, files or steps failed; the rest is done) or an "
       "internal error",
    2: "bad input (arguments, plan, scenario or data file); nothing was done",
    130: "interrupted by Ctrl-C (SIGINT); what was started was stopped and recorded",
    143: "terminated by SIGTERM; what was started was stopped and recorded",
}
"""Every command's exit status (the README's table)."""

_SIGNALLED: list[int] = []


def _on_sigterm(signum: int, _frame: object) -> None:
    """SIGTERM unwinds like Ctrl-C (``finally`` blocks and teardown run); exit 143.
    Commands with their own stop logic (run, demo, tui) install their own handler."""
    _SIGNALLED.append(signum)
    raise KeyboardInterrupt


def _interrupted() -> None:
    import signal

    if _SIGNALLED and _SIGNALLED[0] == signal.SIGTERM:
        sys.stderr.write("flowtruth: terminated (SIGTERM)\n")
        sys.exit(143)
    sys.stderr.write("flowtruth: interrupted (Ctrl-C)\n")
    sys.exit(130)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``flowtruth`` console script; exits with :data:`EXIT_STATUS`."""
    import signal

    try:
        signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread (embedded): leave signals alone
        pass
    try:
        rv = app(args=argv, standalone_mode=False)
    except FlowtruthError as err:
        sys.exit(fail(err))
    except KeyboardInterrupt:
        _interrupted()
    except OSError as err:  # disk full, permission denied, ... on a path we were given
        from analysis.errors import short

        where = f"{short(err.filename)}: " if getattr(err, "filename", None) else ""
        sys.stderr.write(f"flowtruth: error: {where}{short(err.strerror or err, 300)}\n")
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
        import os

        if os.environ.get("FLOWTRUTH_DEBUG"):
            raise
        from controller.safety import plain

        sys.stderr.write(f"flowtruth: internal error: {type(err).__name__}: "
                         f"{plain(err)[:300]} (a bug: rerun with FLOWTRUTH_DEBUG=1 for the "
                         "traceback and report it)\n")
        sys.exit(1)
    # typer returns a command's typer.Exit code, and 130 for a KeyboardInterrupt it caught
    code = rv if isinstance(rv, int) and not isinstance(rv, bool) else 0
    if code == 130:
        _interrupted()
    sys.exit(code)


if __name__ == "__main__":
    main()
