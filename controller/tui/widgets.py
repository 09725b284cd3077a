"""Widgets that render :class:`controller.tui.state.RigState`; they never do I/O."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from rich.text import Text
from textual.widgets import DataTable, RichLog, Sparkline, Static

from controller.safety import markup, plain
from controller.tui.state import ApRow, DeviceRow, RigState, SessionRow

STATUS_STYLE = {"queued": "dim", "running": "bold cyan", "ok": "green", "failed": "bold red",
                "cancelled": "yellow", "skipped": "dim"}
LEVEL_STYLE = {"info": "", "warning": "yellow", "error": "bold red"}


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{n} B"


def clock(seconds: float | None) -> str:
    if seconds is None:
        return "--:--"
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def short_package(package: str) -> str:
    """``org.thoughtcrime.securesms`` -> a name a technician recognises."""
    known = {"org.thoughtcrime.securesms": "Signal", "org.telegram.messenger": "Telegram",
             "com.whatsapp": "WhatsApp", "signal": "Signal", "telegram": "Telegram",
             "whatsapp": "WhatsApp"}
    return known.get(package, package.rsplit(".", 1)[-1] or package)


def share(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


class SyncedTable(DataTable[Text | str]):
    """A DataTable updated in place by row key, so the cursor stays where it is."""

    def sync(self, rows: Iterable[tuple[str, Sequence[Text | str]]]) -> None:
        keys = [str(c.value) for c in self.columns]
        seen: set[str] = set()
        for key, cells in rows:
            seen.add(key)
            # a str cell would be read as markup: a phone's "[bold red]" stays text
            cells = [markup(c) if isinstance(c, str) else c for c in cells]
            if key not in self.rows:
                self.add_row(*cells, key=key)
                continue
            for col, cell in zip(keys, cells, strict=False):
                if self.get_cell(key, col) != cell:
                    self.update_cell(key, col, cell, update_width=True)
        for key in [str(k.value) for k in self.rows if k.value not in seen]:
            self.remove_row(key)

    def selected_key(self) -> str | None:
        if not self.row_count:
            return None
        try:
            return self.coordinate_to_cell_key(self.cursor_coordinate).row_key.value
        except Exception:  # the cursor is off the table while rows change
            return None


class DevicesTable(SyncedTable):
    COLUMNS = ("model", "serial", "OS", "root", "ABI", "batt", "tracer", "clock")

    def on_mount(self) -> None:
        self.cursor_type = "row"
        for c in self.COLUMNS:
            self.add_column(c, key=c)

    def show(self, devices: Iterable[DeviceRow]) -> None:
        self.sync((d.serial, self.cells(d)) for d in devices)

    @staticmethod
    def cells(d: DeviceRow) -> list[Text | str]:
        model = Text(d.model, style="" if d.connected else "strike dim")
        root = (Text("?", style="dim") if d.rooted is None
                else Text("yes", style="green") if d.rooted else Text("NO", style="bold red"))
        off = "-" if d.clock_offset is None else f"{d.clock_offset:+.3f}s"
        tracer = Text(d.tracer, style="red" if d.tracer == "failed" else
                      "cyan" if d.tracer not in ("idle", "-") else "dim")
        batt = "-" if d.battery is None else f"{d.battery}%"
        if d.warnings:
            model.append(" !", style="bold yellow")
        return [model, d.serial, d.android, root, d.abi, batt, tracer, off]


class PlanQueue(SyncedTable):
    COLUMNS = ("session", "app", "device", "status", "progress", "step")

    def on_mount(self) -> None:
        self.cursor_type = "row"
        for c in self.COLUMNS:
            self.add_column(c, key=c)

    def show(self, sessions: Iterable[SessionRow]) -> None:
        self.sync((s.session_id, self.cells(s)) for s in sessions)

    @staticmethod
    def cells(s: SessionRow) -> list[Text | str]:
        filled = int(round(s.progress * 5))
        bar = Text("█" * filled, style="cyan") + Text("░" * (5 - filled), style="dim")
        bar.append(f" {100 * s.progress:3.0f}%")
        # A failed session keeps the step it failed in; the error is in the log and views.
        step = s.step if s.status in ("running", "failed", "cancelled") else ""
        return [s.session_id, short_package(s.package), s.serial,
                Text(s.status, style=STATUS_STYLE.get(s.status, "")), bar, step]


class ResultsTable(SyncedTable):
    COLUMNS = ("session", "app", "status", "flows", "labelled", "share", "ambig.", "unlab.")

    def on_mount(self) -> None:
        self.cursor_type = "row"
        for c in self.COLUMNS:
            self.add_column(c, key=c)

    def show(self, sessions: Iterable[SessionRow]) -> None:
        self.sync((s.session_id, self.cells(s)) for s in sessions)

    @staticmethod
    def cells(s: SessionRow) -> list[Text | str]:
        st = s.labelled_share
        share_text = Text("-" if st is None else f"{100 * st:.1f}%",
                          style="" if st is None else "green" if st >= 0.8 else "yellow")
        return [s.session_id, short_package(s.package),
                Text(s.status, style=STATUS_STYLE.get(s.status, "")),
                f"{s.flows:,}", f"{s.labelled:,}", share_text, f"{s.ambiguous:,}",
                f"{s.unlabelled:,}"]


class TopBar(Static):
    """One line: the plan, its state and counts, and the engine in use."""

    def show(self, state: RigState, engine: str) -> None:
        done, _failed, _skipped, total = state.plan_counts
        total = total or len(state.sessions)
        # Count from the rows: the engine counts a cancelled session as failed.
        failed = sum(1 for r in state.sessions.values() if r.status == "failed")
        cancelled = sum(1 for r in state.sessions.values() if r.status == "cancelled")
        style = {"running": "bold cyan", "pausing": "yellow", "stopping": "bold yellow",
                 "paused": "yellow", "stopped": "yellow", "finished": "green"}.get(
                     state.plan_state, "dim")
        t = Text.assemble(("flowtruth", "bold"), "  plan ", (state.plan_name or "-", "bold"),
                          "  ", (state.plan_state, style),
                          f"  {done}/{total} done")
        if failed:
            t.append(f", {failed} failed", style="red")
        if cancelled:
            t.append(f", {cancelled} cancelled", style="yellow")
        t.append(f"  engine: {engine}", style="dim")
        self.update(t)


class ApPanel(Static):
    """The access point: up/down, SSID, clients, capture size, packet rate, drops; below,
    what its supervisor did (daemons restarted, given up on) and the probe's detail."""

    def show(self, ap: ApRow, session: SessionRow | None) -> None:
        if ap.up is None:
            state = Text("AP: probing…", style="dim")
        elif ap.up:
            state = Text.assemble("AP ", ("up", "bold green"), f" {ap.interface}")
        else:
            state = Text.assemble("AP ", ("down", "bold yellow"), f" {ap.interface}")
        rate = session.packet_rate if session and session.status == "running" else 0.0
        rate_text = f"  {rate:,.0f} pkt/s" if session and session.rate else "  - pkt/s"
        drops = session.drops if session else 0
        size = ap.capture_bytes
        if session is not None and session.bytes and (size is None or session.bytes > size):
            size = session.bytes
        line = Text.assemble(
            state, "  SSID ", (ap.ssid or "-", "bold"), f"  clients {ap.clients}",
            f"  capture {human_bytes(size)}", rate_text,
            "  drops ", (str(drops), "bold red" if drops else "green"))
        if ap.restarts:
            line.append("\n" + ", ".join(f"{name} restarted {n}x" for name, n in ap.restarts),
                        style="yellow")
        if ap.supervisor is False and ap.up:
            line.append("\nsupervisor not running: exited daemons are not restarted",
                        style="yellow")
        for text in ap.gave_up:
            line.append(f"\n{text}", style="bold red")
        if ap.detail:
            line.append(f"\n{ap.detail}", style="dim")
        self.update(line)


class LogPane(RichLog):
    """The engine's log lines and the TUI's own notes, newest at the bottom; times in
    UTC, like the run directories' names."""

    def add(self, at: float, level: str, text: str) -> None:
        import time as _time

        stamp = _time.strftime("%H:%M:%S", _time.gmtime(at))
        self.write(Text.assemble((stamp + " ", "dim"),
                                 (plain(text), LEVEL_STYLE.get(level, ""))))


class SessionPanel(Static):
    """The current session: steps, times and live counters."""

    def show(self, state: RigState) -> None:
        s = state.session
        if s is None:
            self.update(Text("No session has started yet. Press s to start the plan.",
                             style="dim"))
            return
        head = Text.assemble(
            ("Session ", "bold"), (s.session_id, "bold"), "  ",
            (short_package(s.package), "bold"),
            f" ({s.package})" if "." in s.package else "", f" on {s.serial}  ",
            (s.status, STATUS_STYLE.get(s.status, "")))
        scen = (f"{s.scenario_index}/{s.scenario_total} {s.scenario_step}"
                if s.scenario_total else "-")
        rem = state.remaining(s)
        lines = [
            head,
            Text.assemble(("Step      ", "dim"), (s.step or "-", "cyan")),
            Text.assemble(("Scenario  ", "dim"), scen),
            Text.assemble(("Elapsed   ", "dim"), clock(state.elapsed(s)),
                          ("   Remaining ", "dim"),
                          clock(rem) if rem is not None else "estimating"),
            Text.assemble(("Packets   ", "dim"), f"{s.packets:,}", ("  bytes ", "dim"),
                          human_bytes(s.bytes), ("  drops ", "dim"),
                          (str(s.drops), "bold red" if s.drops else "")),
            Text.assemble(("Syscalls  ", "dim"), f"{s.syscalls:,}", ("  flows labelled ", "dim"),
                          f"{s.labelled:,}/{s.flows:,}", ("  share ", "dim"),
                          share(s.labelled, s.flows)),
            Text.assemble(("Pkt rate  ", "dim"), f"{s.packet_rate:,.0f} pkt/s"),
        ]
        if s.error:
            lines.append(Text.assemble(("Error     ", "dim"), (s.error, "bold red")))
            if s.hint:
                lines.append(Text.assemble(("Fix       ", "dim"), (s.hint, "yellow")))
        elif s.artifacts:
            arts = ", ".join(f"{k} {human_bytes(v)}" for k, v in s.artifacts.items())
            lines.append(Text.assemble(("Pulled    ", "dim"), arts))
        self.update(Text("\n").join(lines))


class RateSparkline(Sparkline):
    """Packet rate of the current session, one bar per capture update."""

    def show(self, session: SessionRow | None) -> None:
        self.data = list(session.rate) if session and session.rate else []


class AppsPanel(Static):
    """Flows per app of the selected session (from its quality report, if read)."""

    def show(self, s: SessionRow | None) -> None:
        if s is None:
            self.update(Text("Select a session above.", style="dim"))
            return
        t = Text.assemble(("Flows per app", "bold"), f" — {s.session_id}", "\n")
        if s.by_app:
            items = sorted(s.by_app.items(), key=lambda kv: -kv[1].get("flows", 0))
            for app, sums in items[:8]:
                t.append(f"  {short_package(app):<22.22} {sums.get('flows', 0):>7,} flows "
                         f"{sums.get('packets', 0):>9,} pkts\n")
        elif s.flows:
            t.append(f"  {short_package(s.package):<22.22} {s.labelled:>7,} flows\n")
            t.append(f"  {'ambiguous':<22} {s.ambiguous:>7,} flows\n", style="yellow")
            t.append(f"  {'unlabelled':<22} {s.unlabelled:>7,} flows\n", style="dim")
        else:
            t.append("  no flows labelled yet\n", style="dim")
        if s.run_dir:
            t.append(f"run dir: {s.run_dir}", style="dim")
        self.update(t)
