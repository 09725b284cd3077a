"""``flowtruth run PLAN.yaml [--lab] [--resume]``: a batch of sessions with live progress.

``--tracer strace|frida|both|none`` overrides the plan's ``tracer``: ``frida`` traces
the app's processes with the frida agent (frida-server on the phone, at the plan's
``frida_server`` or ``--frida-server``, reached through ``adb forward``; in the lab
frida's local device), ``both`` frida on the app's main process and strace on its other
processes, never both on one pid. ``--interface``/``--netns`` override the plan's
``capture.interface``/``capture.netns``; the plan's other capture settings (tool,
snaplen, ring buffer, mtu) apply as they are.

With ``--lab`` the running virtual lab (``controller.lab.topology.Lab.load()``; its state
directory from ``FLOWTRUTH_LAB_STATE_DIR`` when set) gives the adb server, the phones
(plan devices ``lab:phone1`` ...) and the AP capture (ap_setup's capture on its bridge,
inside the AP namespace, with the plan's capture settings).

The batch capture's check and record (``<output>/_capture_<stamp>/capture.json``) is named
after the summary; a flagged check is one of the warnings printed there.

Progress bars (the plan and each phone, with ETA) and a live status table (one row per
phone: session, step, scenario step, last event) over the engine's events; a summary at
the end; exit 1 when a session failed, 2 for a bad plan. The first Ctrl-C or SIGTERM
stops the plan cleanly (sessions torn down, manifests ``interrupted``, the batch capture
recorded) and exits 130/143 with one line; a second one skips the teardown's waits.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Annotated, Any

import typer


class RichSink:
    """Renders engine events as rich progress bars and a live status table."""

    def __init__(self, console: Any, total: int = 0) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.console = console
        self.lock = threading.Lock()
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TimeElapsedColumn(),
                                 TextColumn("ETA"), TimeRemainingColumn(), console=console)
        self.plan_task = self.progress.add_task("plan", total=total or None)
        self.device_tasks: dict[str, Any] = {}
        self.rows: dict[str, dict[str, str]] = {}
        self.session_serial: dict[str, str] = {}
        self.finished: list[Any] = []
        self.warnings: list[str] = []

    def _row(self, serial: str) -> dict[str, str]:
        return self.rows.setdefault(serial, {"session": "", "step": "", "scenario": "",
                                             "last": "", "state": "idle"})

    def __call__(self, e: Any) -> None:
        from controller import events as ev
        from controller.safety import clean_event

        e = clean_event(e)  # a phone's strings: no control characters from here on
        with self.lock:
            if isinstance(e, ev.PlanStarted):
                self.progress.update(self.plan_task, total=e.sessions,
                                     description=f"plan {e.plan}")
            elif isinstance(e, ev.PlanProgressed):
                self.progress.update(self.plan_task, completed=e.done + e.failed + e.skipped)
            elif isinstance(e, ev.SessionStarted):
                self.session_serial[e.session_id] = e.serial
                r = self._row(e.serial)
                r.update(session=e.session_id, step="", scenario="", state="running")
                if e.serial not in self.device_tasks:
                    self.device_tasks[e.serial] = self.progress.add_task(
                        f"  {e.serial}", total=len(_STEPS))
                self.progress.update(self.device_tasks[e.serial], completed=0)
            elif isinstance(e, ev.StepStarted):
                serial = self.session_serial.get(e.session_id, "?")
                self._row(serial)["step"] = e.step
            elif isinstance(e, ev.StepFinished):
                serial = self.session_serial.get(e.session_id, "?")
                task = self.device_tasks.get(serial)
                if task is not None and e.step in _STEPS:
                    self.progress.update(task, completed=_STEPS.index(e.step) + 1)
                if not e.ok:
                    self._row(serial)["last"] = f"{e.step} failed: {e.detail}"[:80]
            elif isinstance(e, ev.ScenarioStepStarted):
                serial = self.session_serial.get(e.session_id, "?")
                self._row(serial)["scenario"] = f"{e.index + 1}/{e.total} {e.description}"[:60]
            elif isinstance(e, ev.PreflightWarned):
                self.warnings.append(f"{e.serial}: {e.message} ({e.fix})")
            elif isinstance(e, ev.FlowsLabelled):
                serial = self.session_serial.get(e.session_id, "?")
                self._row(serial)["last"] = (f"{e.flows} flows, {e.labelled} labelled, "
                                             f"{e.ambiguous} ambiguous")
            elif isinstance(e, ev.SessionFinished):
                serial = self.session_serial.get(e.session_id, "?")
                self._row(serial).update(state="done", scenario="")
                self.finished.append(e)
            elif isinstance(e, ev.SessionFailed):
                serial = self.session_serial.get(e.session_id, "?")
                self._row(serial).update(state="FAILED", last=e.error[:80], scenario="")
                self.finished.append(e)
            elif isinstance(e, ev.DeviceLost):
                self._row(e.serial).update(state="LOST", last=e.reason[:80])
            elif isinstance(e, ev.LogRecorded) and e.level != "info":
                self.warnings.append(e.text)

    def render(self) -> Any:
        from rich.console import Group
        from rich.table import Table

        with self.lock:
            t = Table(expand=True)
            for c in ("device", "state", "session", "step", "scenario step", "last"):
                t.add_column(c, overflow="fold")
            from controller.safety import markup

            for serial, r in sorted(self.rows.items()):
                t.add_row(*(markup(c) for c in (serial, r["state"], r["session"], r["step"],
                                                r["scenario"], r["last"])))
            return Group(self.progress, t)


_STEPS = ("Preflight", "StartCapture", "PushScripts", "StartTracers", "RunScenario",
          "StopTracers", "StopCapture", "PullArtifacts", "Label", "Export")


def drive(work: Any, sink: RichSink, console: Any, quiet: bool = False,
          cancel: Any = None) -> Any:
    """Run ``work(cancel)`` in a thread under a live display of ``sink``. The first
    Ctrl-C or SIGTERM cancels cooperatively (the engine tears down, the manifests say
    ``interrupted``) and waits; a second one makes the teardown skip its waits
    (:mod:`controller.interrupt`). Returns what ``work`` returned; ``cancel`` tells
    whether and why it was interrupted (``cancel.reason``, ``cancel.exit_code``)."""
    from rich.live import Live

    from controller.interrupt import Cancel, interrupts

    cancel = cancel if cancel is not None else Cancel()
    box: dict[str, Any] = {}
    told = [0]

    def target() -> None:
        try:
            box["result"] = work(cancel)
        except BaseException as err:  # re-raised in the calling thread
            box["error"] = err

    def tell() -> None:  # from the main loop, never from the signal handler
        n = 2 if cancel.hard.is_set() else 1 if cancel.is_set() and cancel.reason else 0
        if n > told[0]:
            told[0] = n
            console.print(f"{cancel.reason}: stopping, tearing down the running sessions "
                          "(again to skip the waiting) ..." if n == 1 else
                          "interrupted again: teardown skips its waits, still stopping "
                          "what was started ...", highlight=False, markup=False)

    t = threading.Thread(target=target, name="plan", daemon=True)
    with interrupts(cancel):
        if quiet:
            t.start()
            while t.is_alive():
                t.join(0.2)
                tell()
        else:
            with Live(sink.render(), console=console, refresh_per_second=4,
                      transient=False) as live:
                t.start()
                while t.is_alive():
                    t.join(0.25)
                    tell()
                    live.update(sink.render())
    if "error" in box:
        raise box["error"]
    return box["result"]


def interrupted_error(cancel: Any, res: Any) -> Any:
    """The one line (and exit status 130/143) of a plan the user interrupted."""
    from controller.interrupt import Interrupted

    done = sum(1 for r in res.results if r.ok)
    where = f"; batch capture recorded in {res.capture_record}" if res.capture_record else ""
    return Interrupted(f"{cancel.reason}: {done} session(s) completed, "
                       f"{len(res.results) - done} stopped and torn down{where}",
                       hint="their manifests say interrupted; rerun with --resume",
                       exit_code=cancel.exit_code)


def _lab_environment(plan: Any) -> Any:
    from controller.errors import LabError

    try:
        from controller.lab.topology import Lab
    except ImportError:
        raise LabError("--lab: the virtual lab (controller.lab.topology) is not installed",
                       hint="run without --lab against real phones") from None
    import os

    # FLOWTRUTH_LAB_STATE_DIR: a lab brought up with its own state directory (tests)
    lab = Lab.load(os.environ.get("FLOWTRUTH_LAB_STATE_DIR") or None)
    if lab is None:
        raise LabError("--lab: no virtual lab is running", hint="flowtruth lab up")
    from controller.plan import lab_environment_for

    return lab_environment_for(plan, lab)


def register(app: typer.Typer) -> None:
    @app.command("run")
    def run(
        plan_file: Annotated[Path, typer.Argument(metavar="PLAN.yaml", help="the plan: devices × apps × activities × repetitions")],
        lab: Annotated[bool, typer.Option("--lab", help="use the running virtual lab (its phones, adb server and AP)")] = False,
        resume: Annotated[bool, typer.Option("--resume", help="skip sessions whose run directory is already completed")] = False,
        interface: Annotated[str | None, typer.Option("--interface", help="AP interface to capture on (overrides the plan)")] = None,
        netns: Annotated[str | None, typer.Option("--netns", help="network namespace of the AP interface")] = None,
        adb_port: Annotated[int | None, typer.Option("--adb-port", help="adb server port (overrides the plan)")] = None,
        quiet: Annotated[bool, typer.Option("-q", "--quiet", help="no live display, one line per session")] = False,
        tracer: Annotated[str | None, typer.Option("--tracer", help="strace | frida | both | none (overrides the plan's tracer)")] = None,
        frida_server: Annotated[str | None, typer.Option("--frida-server", help="frida-server's path on the phones (overrides the plan's frida_server)")] = None,
    ) -> None:
        """Run a batch of sessions: phones in parallel over one AP capture."""
        from rich.console import Console
        from rich.table import Table

        from controller import events as ev
        from controller.device import adb_client, connect, list_serials
        from controller.plan import environment_for, load_plan, run_plan

        plan = load_plan(plan_file)
        if tracer is not None:
            from controller.errors import ConfigError
            from controller.session import TRACERS

            if tracer not in TRACERS:
                raise ConfigError(f"--tracer must be one of {', '.join(TRACERS)}, not {tracer!r}")
            plan = plan.model_copy(update={"tracer": tracer})
        if frida_server is not None:
            from controller.errors import ConfigError
            from controller.plan import frida_server_path

            try:
                frida_server_path(frida_server)
            except ValueError as err:
                raise ConfigError(f"--frida-server: {err}") from None
            plan = plan.model_copy(update={"frida_server": frida_server})
        if lab:
            env = _lab_environment(plan)
        else:
            port = adb_port or plan.adb.port
            client = adb_client(port, plan.adb.host, start_server=port == 5037)
            tcp = [d.serial for d in plan.device_entries
                   if ":" in d.serial and not d.serial.startswith("lab:")]
            if tcp:  # TCP phones are attached with adb connect; USB ones are just there
                known = {s for s, _ in list_serials(client)}
                for serial in tcp:
                    if serial not in known:
                        connect(client, serial)
            env = environment_for(plan, client=client, interface=interface, netns=netns)
        from controller.safety import markup, plain

        console = Console(stderr=False)
        sink = RichSink(console)

        def out(e: ev.Event) -> None:
            sink(e)
            if quiet and isinstance(e, (ev.SessionFinished, ev.SessionFailed)):
                line = (f"ok      {e.session_id}  {e.run_dir}" if isinstance(e, ev.SessionFinished)
                        else f"FAILED  {e.session_id}  {e.error}")
                console.print(plain(line), highlight=False, markup=False)

        from controller.interrupt import Cancel

        t0 = time.monotonic()
        cancel = Cancel()
        res = drive(lambda cancel: run_plan(plan, env, out, cancel, resume=resume), sink,
                    console, quiet, cancel)
        console.print()
        summary = Table(title=f"{markup(plan.name)}: {len(res.results)} sessions run, "
                              f"{len(res.failed)} failed, {len(res.skipped)} skipped "
                              f"({time.monotonic() - t0:.0f} s)")
        for c in ("session", "outcome", "run dir / reason"):
            summary.add_column(c, overflow="fold")
        for r in res.results:
            summary.add_row(markup(r.session_id), r.outcome,
                            markup(str(r.run_dir) if r.ok else f"{r.run_dir}\n{r.error}"))
        for k in res.skipped:
            summary.add_row(markup(k), "skipped", "completed before (--resume)")
        console.print(summary)
        if res.capture_record is not None:
            console.print(plain(f"batch capture: {res.capture_record}"), highlight=False,
                          markup=False)
        for w in sink.warnings:
            console.print(plain(f"warning: {w}"), highlight=False, markup=False)
        if cancel.reason:
            raise interrupted_error(cancel, res)
        if res.failed or res.cancelled:
            from controller.errors import ControllerError

            raise ControllerError(
                f"{len(res.failed)} of {len(res.results)} sessions failed"
                + (" (stopped)" if res.cancelled else ""),
                hint="their run directories keep the artifacts and say why; rerun with --resume")
