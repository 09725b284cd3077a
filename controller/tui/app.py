"""The flowtruth TUI: dashboard, session view and results over the session engine.

Everything that blocks (the engine, adb, subprocesses, parsing, relabelling, export,
the AP probe) runs in ``@work(thread=True)`` workers that only post messages; the
handlers below own :class:`~controller.tui.state.RigState` and refresh widgets. Stop is
cooperative: the worker's cancel event goes into the engine, which tears down and
returns. Pause lets the running session finish and starts no next one.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from textual import on, work
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.css.query import NoMatches
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Static, TabbedContent, TabPane

from analysis.errors import FlowtruthError
from controller.events import Event
from controller.interrupt import Cancel
from controller.tui.engine import DemoEngine, EngineProtocol, PlanOutline, outline_of
from controller.tui.messages import (
    ActionDone,
    ActionFailed,
    ApProbed,
    ApSnapshot,
    EngineEvent,
    WorkFinished,
)
from controller.tui.screens import ConfirmScreen, ErrorScreen, HelpScreen, ReportScreen
from controller.tui.state import AP, DEVICES, LOG, PLAN, QUEUE, RESULTS, SESSION, RigState
from controller.tui.widgets import (
    ApPanel,
    AppsPanel,
    DevicesTable,
    LogPane,
    PlanQueue,
    RateSparkline,
    ResultsTable,
    SessionPanel,
    TopBar,
)

ApProbe = Callable[[], ApSnapshot]


def probe_ap(cfg: Any = None) -> ApSnapshot:
    """The AP's state as ``flowtruth ap status`` sees it (``cfg``: an
    :class:`ap_setup.config.ApConfig`, default config when None): daemons, clients,
    capture size, and what its supervisor did (restarts per daemon, give-ups)."""
    from ap_setup.config import ApConfig
    from ap_setup.lifecycle import ap_status

    cfg = cfg if cfg is not None else ApConfig()
    st = ap_status(cfg)
    if st.state is None:
        return ApSnapshot(False, cfg.interface, cfg.ssid, 0, None,
                          "no AP state: `flowtruth ap up` starts it")
    size = sum(p.stat().st_size for p in st.capture_files if p.exists()) if st.capture_files \
        else None
    dead = [name for name, alive in st.daemons.items() if not alive]
    detail = f"not running: {', '.join(dead)} (see `flowtruth ap status`)" if dead else ""
    restarts = tuple((name, h.restarts) for name, h in sorted(st.health.items())
                     if h.restarts and not h.gave_up)
    gave_up = tuple(h.gave_up for _, h in sorted(st.health.items()) if h.gave_up)
    supervisor = None if st.supervisor is None else st.supervisor_alive
    return ApSnapshot(st.up, st.state.interface, st.state.ssid or "-", len(st.clients), size,
                      detail, restarts, gave_up, supervisor)


def demo_ap_probe() -> ApSnapshot:
    """The rehearsal's access point: up, two clients, no real interface touched."""
    return ApSnapshot(True, "veth-demo", "flowtruth-lab", 2, None, "")


KEYS_HELP = (
    ("1 2 3", "Dashboard, Session, Results"),
    ("s", "start the plan (or resume after a pause)"),
    ("p", "pause: finish the running session, start no next one"),
    ("x", "stop now and tear down (asks first)"),
    ("d", "provision: find phones, check root, measure clocks"),
    ("R", "re-run the selected (or last) failed session"),
    ("l", "relabel the selected session"),
    ("e", "export it: MIRAGE JSON + Parquet"),
    ("o", "its report (label quality; HTML in a browser)"),
    ("tab", "move between tables"),
    ("ctrl+p", "command palette"),
    ("?", "this list"),
    ("q", "quit (asks first while a session runs)"),
)


class FlowtruthApp(App[None]):
    """The technician's console; build it with :func:`make_app`."""

    TITLE = "flowtruth"
    CSS = """
    #topbar { height: 1; padding: 0 1; background: $boost; }
    TabbedContent { height: 1fr; }
    TabPane { padding: 0; }
    .panel { border: round $primary 60%; border-title-color: $text; padding: 0 1;
             border-subtitle-color: $text-muted; }
    DataTable.panel { padding: 0; }
    #ap { height: auto; }
    #devices { height: auto; max-height: 9; }
    #queue { height: auto; max-height: 12; }
    #log { height: 1fr; min-height: 3; overflow-y: auto; }
    #session-panel { height: auto; }
    #rate { height: 1fr; min-height: 4; max-height: 16; }
    #results { height: auto; max-height: 14; }
    #apps { height: 1fr; min-height: 5; }
    #results-keys { height: 1; color: $text-muted; padding: 0 1; }
    DataTable { height: auto; max-height: 100%; }
    """
    BINDINGS = [
        Binding("1", "tab('dashboard')", "Dashboard", show=False),
        Binding("2", "tab('session')", "Session", show=False),
        Binding("3", "tab('results')", "Results", show=False),
        Binding("s", "start", "Start"),
        Binding("p", "pause", "Pause"),
        Binding("x", "stop", "Stop"),
        Binding("d", "provision", "Provision"),
        Binding("R", "rerun", "Re-run"),
        Binding("l", "relabel", "Relabel", show=False),
        Binding("e", "export", "Export", show=False),
        Binding("o", "report", "Report", show=False),
        Binding("question_mark", "keys", "Keys"),
        Binding("q", "quit", "Quit"),
    ]

    def __init__(self, engine: EngineProtocol, plan: Any = None, lab: Any = None,
                 ap_probe: ApProbe | None = probe_ap, clock: Callable[[], float] = time.time,
                 ap_interval: float = 2.0, hang_up_signals: bool = False) -> None:
        super().__init__()
        self.engine = engine
        self.plan = plan
        self.lab = lab
        self.ap_probe = ap_probe
        self.ap_interval = ap_interval
        self.hang_up_signals = hang_up_signals
        self.outline: PlanOutline = outline_of(plan)
        self.state = RigState(self.outline, clock=clock)
        self.cancel: threading.Event = Cancel()
        self.pause = threading.Event()
        self.interrupt_code = 0  # 130/143 once Ctrl-C or SIGTERM asked the console to stop
        self.busy: str | None = None  # "plan" | "provision" while the engine worker runs
        self.engine_idle = threading.Event()  # cleared while the engine worker runs
        self.engine_idle.set()
        self.quit_when_idle = False
        self.log_stale = False  # log lines arrived while the dashboard was hidden
        self.engine_events: list[Event] = []  # every event handled, for tests and replay

    # ------------------------------------------------------------------ layout
    def compose(self) -> ComposeResult:
        yield TopBar(id="topbar")
        with TabbedContent(id="tabs", initial="dashboard"):
            with TabPane("Dashboard [1]", id="dashboard"):
                yield ApPanel(id="ap", classes="panel")
                yield DevicesTable(id="devices", classes="panel")
                yield PlanQueue(id="queue", classes="panel")
                yield LogPane(id="log", classes="panel", max_lines=1000, wrap=True, min_width=20)
            with TabPane("Session [2]", id="session"):
                yield SessionPanel(id="session-panel", classes="panel")
                yield RateSparkline([], id="rate", classes="panel")
            with TabPane("Results [3]", id="results-tab"):
                yield ResultsTable(id="results", classes="panel")
                yield AppsPanel(id="apps", classes="panel")
                yield Static("l relabel   e export MIRAGE+Parquet   o report   R re-run",
                             id="results-keys")
        yield Footer()

    def on_mount(self) -> None:
        if self.hang_up_signals:
            # The terminal closing (SIGHUP) or a SIGTERM stops the engine cooperatively and
            # exits, so the caller's teardown (the lab) still runs. Through the event loop,
            # never a bare signal handler that could interrupt Textual mid-write.
            loop = asyncio.get_running_loop()
            loop.add_signal_handler(signal.SIGHUP, self.hang_up)
            loop.add_signal_handler(signal.SIGTERM, self.interrupt, signal.SIGTERM)
            loop.add_signal_handler(signal.SIGINT, self.interrupt, signal.SIGINT)
        titles = {"ap": "Access point", "devices": "Devices", "queue": "Plan queue",
                  "log": "Log (UTC)", "session-panel": "Current session",
                  "rate": "Packet rate (pkt/s)", "results": "Label quality per session",
                  "apps": "Flows per app"}
        for wid, title in titles.items():
            self.query_one(f"#{wid}").border_title = title
        self.refresh_parts({DEVICES, QUEUE, SESSION, RESULTS, AP, PLAN})
        if self.outline.source:
            self.log_note("info", f"plan {self.outline.name} from {self.outline.source}; "
                                  "press s to start")
        if self.ap_probe is not None:
            self.probe_ap_worker()
            self.set_interval(self.ap_interval, self.probe_ap_worker)
        self.set_interval(1.0, self.tick)

    def on_unmount(self) -> None:
        # However the app ends, a running engine is told to stop and tear down.
        self.cancel.set()
        if self.hang_up_signals:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)

    def interrupt(self, signum: int) -> None:
        """Ctrl-C (SIGINT from outside the raw terminal) or SIGTERM: stop the running
        plan cleanly (its manifests say interrupted), then exit 130/143; a second one
        makes the teardown skip its waits. Idle: exit at once."""
        self.interrupt_code = 128 + int(signum)
        cancel = self.cancel
        if isinstance(cancel, Cancel):
            n = cancel.interrupt(signum)
        else:
            cancel.set()
            n = 1
        if not self.busy:
            self.exit(return_code=self.interrupt_code)
            return
        self.quit_when_idle = True
        if n == 1:
            if self.state.running:
                self.state.plan_state = "stopping"
                self.refresh_parts({PLAN})
            self.log_note("warning", f"{getattr(cancel, 'reason', 'interrupted')}: stopping, "
                                     "tearing down (again to skip the waiting)")
        else:
            self.log_note("warning", "interrupted again: teardown skips its waits")

    def terminate(self) -> None:
        """SIGTERM: stop the engine and exit without asking; teardown follows."""
        self.cancel.set()
        self.exit()

    def hang_up(self) -> None:
        """SIGHUP, the terminal is gone: Textual cannot shut down by writing to it, so
        stop the engine, wait for its teardown, take the lab down and leave at once."""
        self.cancel.set()
        self.engine_idle.wait(120)
        down = getattr(self.lab, "down", None)
        try:
            if callable(down):
                down()
        finally:
            os._exit(128 + signal.SIGHUP)

    def tick(self) -> None:
        if self.state.running:
            self.refresh_parts({SESSION})

    def log_note(self, level: str, text: str) -> None:
        at = self.state.clock()
        self.state.log.append((at, level, text))
        self.write_log([(at, level, text)])

    def write_log(self, lines: list[tuple[float, str, str]]) -> None:
        """Write to the log pane; while it is hidden, rewrite it when shown instead (a
        hidden RichLog wraps lines at the wrong width)."""
        try:
            shown = self.current_tab() == "dashboard"
        except NoMatches:
            return
        if not shown:
            self.log_stale = True
            return
        for pane in self.query(LogPane):
            for at, level, text in lines:
                pane.add(at, level, text)

    # ------------------------------------------------------------------ rendering
    def refresh_parts(self, parts: set[str]) -> None:
        try:
            self._refresh_parts(parts)
        except NoMatches:  # a message that arrives while the app shuts down
            pass

    def _refresh_parts(self, parts: set[str]) -> None:
        st = self.state
        if PLAN in parts or QUEUE in parts:
            self.query_one(TopBar).show(st, self.engine.name)
        if DEVICES in parts:
            table = self.query_one(DevicesTable)
            table.show(st.devices.values())
            table.border_subtitle = "" if st.devices else "no phones yet: d provisions"
        if QUEUE in parts:
            self.query_one(PlanQueue).show(st.sessions.values())
        if SESSION in parts:
            self.query_one(SessionPanel).show(st)
            self.query_one(RateSparkline).show(st.session)
        if AP in parts or SESSION in parts:
            self.query_one(ApPanel).show(st.ap, st.session)
        if RESULTS in parts:
            self.query_one(ResultsTable).show(
                s for s in st.sessions.values() if s.status != "queued")
            self.query_one(AppsPanel).show(self.selected_session("results"))

    def notify(self, message: str, *, title: str = "", severity: Any = "information",
               timeout: float | None = None, markup: bool = False) -> None:
        """Textual's notify, for text that may come from a phone or a file: control
        characters removed, and no markup unless asked for (``markup=True``)."""
        from controller.safety import plain

        super().notify(plain(message) if not markup else message, title=plain(title),
                       severity=severity, timeout=timeout, markup=markup)

    # ------------------------------------------------------------------ handlers
    @on(EngineEvent)
    def handle_engine_event(self, message: EngineEvent) -> None:
        from controller.safety import clean_event

        # a phone's answers (model, serial, errors) never carry control characters here
        message.event = clean_event(message.event)
        self.engine_events.append(message.event)
        log_from = len(self.state.log)
        parts = self.state.apply(message.event)
        if LOG in parts:
            self.write_log(self.state.log[log_from:])
        self.refresh_parts(parts)
        from controller import events as ev

        e = message.event
        if isinstance(e, (ev.SessionFailed, ev.PreflightWarned, ev.DeviceLost)):
            # One engine toast at a time, so toasts never pile over the tables; the log
            # keeps every message.
            self.clear_notifications()
        if isinstance(e, ev.SessionFailed) and "cancel" not in e.error:
            self.notify(f"{e.error}\nFix: {e.hint}" if e.hint else e.error,
                        title=f"{e.session_id} failed", severity="error", timeout=8)
        elif isinstance(e, ev.PreflightWarned):
            self.notify(f"{e.message}\nFix: {e.fix}", title=f"{e.serial}: {e.check}",
                        severity="warning", timeout=8)
        elif isinstance(e, ev.DeviceLost):
            self.notify(e.reason, title=f"{e.serial} lost", severity="error", timeout=10)
        elif isinstance(e, ev.PlanFinished):
            if e.cancelled:
                self.notify("Stopped; teardown complete.", title="plan stopped",
                            severity="warning")
            elif self.state.plan_state == "paused":
                self.notify("Paused: press s to run the remaining sessions.", title="plan paused")
            else:
                self.notify(f"{e.done} ok, {e.failed} failed.", title="plan finished",
                            severity="error" if e.failed else "information")

    @on(WorkFinished)
    def handle_work_finished(self, message: WorkFinished) -> None:
        self.busy = None
        if message.kind == "provision":
            n = sum(1 for d in self.state.devices.values() if d.connected)
            self.log_note("info", f"provisioned {n} phone(s)")
        if self.state.running:  # the engine returned without PlanFinished (it raised)
            self.state.plan_state = "stopped"
            for row in self.state.sessions.values():
                if row.status == "running":
                    row.status = "failed"
            self.refresh_parts({PLAN, QUEUE, SESSION, RESULTS})
        if self.quit_when_idle:
            self.exit(return_code=self.interrupt_code)

    @on(ActionFailed)
    def handle_action_failed(self, message: ActionFailed) -> None:
        self.log_note("error", f"{message.action}: {message.message}"
                               + (f" (fix: {message.hint})" if message.hint else ""))
        self.push_screen(ErrorScreen(f"{message.action} failed", message.message, message.hint))

    @on(ActionDone)
    def handle_action_done(self, message: ActionDone) -> None:
        self.log_note("info", f"{message.action}: {message.text}")
        row = self.state.sessions.get(message.session_id or "")
        if message.action == "report":
            title, renderables, html = message.data
            self.push_screen(ReportScreen(title, renderables))
            if html is not None:
                self.open_url(html.resolve().as_uri())
            return
        if row is not None and isinstance(message.data, dict):
            q = message.data
            row.by_app = {k: dict(v) for k, v in q.get("by_app", {}).items()}
            named = sum(v.get("flows", 0) for k, v in q.get("by_type", {}).items()
                        if k not in ("ambiguous", "unlabelled"))
            row.flows = q.get("totals", {}).get("flows", row.flows)
            row.labelled = named
            row.ambiguous = q.get("by_type", {}).get("ambiguous", {}).get("flows", 0)
            row.unlabelled = q.get("by_type", {}).get("unlabelled", {}).get("flows", 0)
            self.refresh_parts({RESULTS, SESSION})
        self.notify(message.text, title=message.action)

    @on(ApProbed)
    def handle_ap_probed(self, message: ApProbed) -> None:
        snap, ap = message.snapshot, self.state.ap
        ap.up, ap.interface, ap.ssid = snap.up, snap.interface, snap.ssid
        ap.clients, ap.capture_bytes, ap.detail = snap.clients, snap.capture_bytes, snap.detail
        ap.restarts, ap.gave_up, ap.supervisor = snap.restarts, snap.gave_up, snap.supervisor
        self.refresh_parts({AP})

    @on(TabbedContent.TabActivated)
    def tab_shown(self, event: TabbedContent.TabActivated) -> None:
        # Lines written while the dashboard was hidden must not leave the log scrolled up.
        if event.pane.id == "dashboard" and self.log_stale:
            self.log_stale = False
            self.call_after_refresh(self.rewrite_log)

    def rewrite_log(self) -> None:
        for pane in self.query(LogPane):
            pane.clear()
            for at, level, text in self.state.log[-1000:]:
                pane.add(at, level, text)

    @on(DataTable.RowHighlighted, "#results")
    def results_row(self, _: DataTable.RowHighlighted) -> None:
        for panel in self.query(AppsPanel):
            panel.show(self.selected_session("results"))

    # ------------------------------------------------------------------ workers
    def sink(self, event: Event) -> None:
        """The engine's sink: runs in the worker thread; posting is thread-safe."""
        self.post_message(EngineEvent(event))

    @work(thread=True, exclusive=True, group="engine", exit_on_error=False)
    def engine_worker(self, kind: str, call: Callable[[], None]) -> None:
        try:
            call()
        except FlowtruthError as err:
            self.post_message(ActionFailed(kind, err.message, err.hint or ""))
        except Exception as err:  # an engine bug must not take the console down
            self.post_message(ActionFailed(
                kind, f"{type(err).__name__}: {err}",
                "this is a flowtruth bug: note the log lines and report it"))
        finally:
            self.engine_idle.set()
            self.post_message(WorkFinished(kind))

    @work(thread=True, group="tasks", exit_on_error=False)
    def task_worker(self, kind: str, call: Callable[[], ActionDone]) -> None:
        try:
            self.post_message(call())
        except FlowtruthError as err:
            self.post_message(ActionFailed(kind, err.message, err.hint or ""))
        except OSError as err:
            where = f"{err.filename}: " if getattr(err, "filename", None) else ""
            self.post_message(ActionFailed(kind, f"{where}{err.strerror or err}",
                                           "check the path and its permissions"))
        except Exception as err:
            self.post_message(ActionFailed(
                kind, f"{type(err).__name__}: {err}",
                "this is a flowtruth bug: note the log lines and report it"))

    @work(thread=True, exclusive=True, group="ap", exit_on_error=False)
    def probe_ap_worker(self) -> None:
        if self.ap_probe is None:
            return
        try:
            snap = self.ap_probe()
        except FlowtruthError as err:
            snap = ApSnapshot(False, detail=err.one_line())
        except Exception as err:
            snap = ApSnapshot(False, detail=f"AP probe failed: {err}")
        self.post_message(ApProbed(snap))

    # ------------------------------------------------------------------ actions
    def selected_session(self, table: str | None = None) -> Any:
        """The session under the cursor of the results (or queue) table."""
        ids = [table] if table else (["results", "queue"] if self.current_tab() == "results-tab"
                                     else ["queue", "results"])
        for wid in ids:
            key = self.query_one(f"#{wid}", DataTable).selected_key()  # type: ignore[attr-defined]
            if key and key in self.state.sessions:
                return self.state.sessions[key]
        return None

    def current_tab(self) -> str:
        return self.query_one(TabbedContent).active

    def action_tab(self, tab: str) -> None:
        self.query_one(TabbedContent).active = "results-tab" if tab == "results" else tab

    def _run_engine(self, kind: str, only: list[str] | None = None) -> None:
        self.cancel = Cancel()
        self.pause = threading.Event()
        cancel, pause, engine, plan = self.cancel, self.pause, self.engine, self.plan
        self.busy = kind
        self.engine_idle.clear()
        if kind == "plan":
            self.state.plan_state = "running"
            self.refresh_parts({PLAN})
            self.engine_worker(kind, lambda: engine.run_plan(plan, self.sink, cancel, pause,
                                                             only=only))
        else:
            self.engine_worker(kind, lambda: engine.provision(self.sink, cancel))

    def action_start(self) -> None:
        if self.busy:
            self.notify("The plan is already running." if self.busy == "plan"
                        else "Provisioning is running; start when it is done.",
                        severity="warning")
            return
        todo = [s.session_id for s in self.state.sessions.values() if s.status == "queued"]
        if self.state.plan_state in ("idle",) or not self.state.sessions:
            self._run_engine("plan")
        elif todo:
            self._run_engine("plan", only=todo)
        else:
            self.notify("Nothing left to run; R re-runs a failed session.", severity="warning")
            return

    def action_pause(self) -> None:
        if self.busy != "plan" or self.state.plan_state != "running":
            self.notify("No plan is running.", severity="warning")
            return
        self.pause.set()
        self.state.plan_state = "pausing"
        self.refresh_parts({PLAN})
        self.notify("Pausing: the running session finishes, no next one starts.",
                    title="pause")

    def action_stop(self) -> None:
        if not self.busy:
            self.notify("Nothing is running.", severity="warning")
            return

        def answered(yes: bool | None) -> None:
            if yes:
                self.request_stop()

        self.push_screen(ConfirmScreen(
            "Stop the plan?",
            "The running session is cancelled: tracers and the capture are stopped and "
            "what was pulled is kept. The session can be re-run later (R).",
            yes="Stop"), answered)

    def request_stop(self) -> None:
        """Cancel cooperatively; the engine tears down and the worker returns."""
        self.cancel.set()
        if self.state.running:
            self.state.plan_state = "stopping"
            self.refresh_parts({PLAN})
        self.log_note("warning", "stop requested: tearing down")
        self.notify("Stopping: tearing down…", title="stop", severity="warning")

    def action_provision(self) -> None:
        if self.busy:
            self.notify("Wait until the plan stops before provisioning.", severity="warning")
            return
        self.log_note("info", "provisioning devices")
        self._run_engine("provision")

    def action_rerun(self) -> None:
        if self.busy:
            self.notify("Wait until the plan stops before re-running a session.",
                        severity="warning")
            return
        row = self.selected_session()
        if row is None or row.status not in ("failed", "cancelled"):
            failed = self.state.failed_sessions()
            row = failed[-1] if failed else None
        if row is None:
            self.notify("No failed session to re-run.", severity="warning")
            return
        self.log_note("info", f"re-running {row.session_id}")
        self._run_engine("plan", only=[row.session_id])

    def _run_dir(self, action: str) -> tuple[Any, Path] | None:
        row = self.selected_session()
        if row is None or not row.run_dir:
            self.notify("Select a session that has run (Results, 3).", severity="warning",
                        title=action)
            return None
        return row, Path(row.run_dir)

    def action_relabel(self) -> None:
        got = self._run_dir("relabel")
        if got is None:
            return
        row, run_dir = got
        sid = row.session_id

        def call() -> ActionDone:
            from analysis.label import label_run

            result = label_run(run_dir)
            return ActionDone("relabel", result.line(), sid, result.quality)

        self.log_note("info", f"relabelling {run_dir}")
        self.task_worker("relabel", call)

    def action_export(self) -> None:
        got = self._run_dir("export")
        if got is None:
            return
        row, run_dir = got
        sid = row.session_id

        def call() -> ActionDone:
            from analysis.label import label_run
            from analysis.parquet_io import write_parquet

            result = label_run(run_dir)  # writes MIRAGE JSON into RUN_DIR/labels
            out = run_dir / "labels" / "flows.parquet"
            write_parquet(result.table, out)
            n = len(result.outputs.get("mirage", []))
            return ActionDone("export", f"{n} MIRAGE JSON file(s) and {out}", sid,
                              result.quality)

        self.log_note("info", f"exporting {run_dir}")
        self.task_worker("export", call)

    def action_report(self) -> None:
        got = self._run_dir("report")
        if got is None:
            return
        row, run_dir = got
        sid = row.session_id

        def call() -> ActionDone:
            from analysis.errors import BadInputError
            from analysis.quality import quality_tables

            path = run_dir / "labels" / "quality.json"
            if not path.exists():
                raise BadInputError(f"{path}: no label-quality report yet",
                                    "relabel the session first (l)")
            quality = json.loads(path.read_text())
            # An analysis report (`flowtruth report`) next to the run opens in the browser.
            html = next((p for p in (run_dir / "report.html", run_dir / "report" / "index.html")
                         if p.exists()), None)
            return ActionDone("report", f"opened {html or path}", sid,
                              (f"{sid}: {path}", quality_tables(quality), html))

        self.task_worker("report", call)

    def action_keys(self) -> None:
        if isinstance(self.screen, HelpScreen):
            return
        self.push_screen(HelpScreen(KEYS_HELP))

    async def action_quit(self) -> None:
        if not self.busy:
            self.exit()
            return

        def answered(yes: bool | None) -> None:
            if yes:
                self.quit_when_idle = True
                self.request_stop()

        self.push_screen(ConfirmScreen(
            "Quit flowtruth?",
            "A session is running. Quitting stops it and tears down first "
            "(tracers, capture), then exits.", yes="Stop and quit"), answered)

    # ------------------------------------------------------------------ palette
    def get_system_commands(self, screen: Screen[Any]) -> Iterator[SystemCommand]:
        yield from super().get_system_commands(screen)
        for title, help_text, action in (
            ("Start plan", "Run the plan's queued sessions", self.action_start),
            ("Pause plan", "Finish the running session, start no next one", self.action_pause),
            ("Stop plan", "Cancel and tear down (asks first)", self.action_stop),
            ("Provision devices", "Find phones, check root, measure clocks",
             self.action_provision),
            ("Re-run failed session", "Run the selected or last failed session again",
             self.action_rerun),
            ("Relabel session", "Label the selected session's run directory again",
             self.action_relabel),
            ("Export session", "Write MIRAGE JSON and Parquet for the selected session",
             self.action_export),
            ("Open report", "The selected session's label-quality report",
             self.action_report),
            ("Show keys", "Every key of the console", self.action_keys),
        ):
            yield SystemCommand(title, help_text, action)


def make_app(engine: EngineProtocol | None = None, lab: Any = None, plan: Any = None,
             **options: Any) -> FlowtruthApp:
    """Build the TUI; without an engine it rehearses with :class:`DemoEngine`."""
    if engine is None:
        from controller.tui.engine import DEMO_PLAN

        engine = DemoEngine()
        plan = plan if plan is not None else DEMO_PLAN
    return FlowtruthApp(engine=engine, plan=plan, lab=lab, **options)

