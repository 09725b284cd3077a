"""The TUI driven with Pilot: a plan's events update the widgets, stop asks and tears
down, pause finishes the running session, failures show their fix, the UI stays live."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("textual")

from controller import events as ev  # noqa: E402
from controller.errors import DeviceError  # noqa: E402
from controller.tui.app import KEYS_HELP, FlowtruthApp, demo_ap_probe, make_app  # noqa: E402
from controller.tui.engine import DEMO_PLAN, DemoEngine, rehearsal_events  # noqa: E402
from controller.tui.messages import EngineEvent  # noqa: E402
from controller.tui.screens import ConfirmScreen, ErrorScreen, HelpScreen, ReportScreen  # noqa: E402
from controller.tui.state import RigState  # noqa: E402
from controller.tui.widgets import DevicesTable, PlanQueue, ResultsTable, SessionPanel  # noqa: E402

SIZE = (100, 30)


def pilot_test(fn: Callable[..., Any]) -> Callable[..., None]:
    """Run an async Pilot test on a fresh event loop (no asyncio plugin needed)."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(fn(*args, **kwargs))

    return run


def build(engine: Any = None, **kw: Any) -> FlowtruthApp:
    engine = engine or DemoEngine(tick=0.002, ticks_per_step=2)
    kw.setdefault("ap_probe", None)
    return make_app(engine=engine, plan=kw.pop("plan", DEMO_PLAN), **kw)


async def until(pilot: Any, cond: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await pilot.pause(0.02)


def cell(table: Any, row: str, col: str) -> str:
    return str(table.get_cell(row, col))


def statuses(app: FlowtruthApp) -> dict[str, str]:
    return {k: s.status for k, s in app.state.sessions.items()}


# ---------------------------------------------------------------------------- the fold


def test_state_folds_a_rehearsal_plan() -> None:
    """The whole event sequence of a plan with one failure, folded without a terminal."""
    events = rehearsal_events(fail=frozenset({"s2-telegram"}))
    assert isinstance(events[0], ev.PlanStarted) and isinstance(events[-1], ev.PlanFinished)
    st = RigState(DEMO_PLAN, clock=lambda: events[-1].at)
    for e in events:
        st.apply(e)
    assert {k: s.status for k, s in st.sessions.items()} == {
        "s1-signal": "ok", "s2-telegram": "failed", "s3-whatsapp": "ok"}
    s1 = st.sessions["s1-signal"]
    assert s1.packets > 0 and s1.syscalls > 0 and s1.flows > 0 and s1.progress == 1.0
    assert s1.labelled_share and 0.8 < s1.labelled_share < 1.0
    assert set(s1.artifacts) == {"capture.pcap", "strace.log", "netstat.log", "manifest.json"}
    assert len(s1.rate) > 3
    assert "lost root" in st.sessions["s2-telegram"].hint
    assert st.devices["7c8a9b1d"].tracer == "idle" and st.devices["7c8a9b1d"].warnings
    assert st.devices["R5CR10ABCDE"].clock_offset == pytest.approx(2.375)
    assert st.plan_state == "finished" and st.plan_counts == (2, 1, 0, 3)


# ---------------------------------------------------------------------------- Pilot


@pilot_test
async def test_start_plan_updates_every_widget() -> None:
    app = build()
    async with app.run_test(size=SIZE) as pilot:
        queue = app.query_one(PlanQueue)
        assert [cell(queue, k, "status") for k in statuses(app)] == ["queued"] * 3
        await pilot.press("s")
        await until(pilot, lambda: app.busy is None and app.state.plan_state == "finished")
        assert [cell(queue, k, "status") for k in statuses(app)] == ["ok"] * 3
        devices = app.query_one(DevicesTable)
        assert devices.row_count == 2
        assert cell(devices, "R5CR10ABCDE", "clock") == "+2.375s"
        assert cell(devices, "R5CR10ABCDE", "root") == "yes"
        results = app.query_one(ResultsTable)
        assert results.row_count == 3
        assert cell(results, "s1-signal", "share").endswith("%")
        panel = str(app.query_one(SessionPanel).render())
        assert "s3-whatsapp" in panel and "Packets" in panel
        log = "\n".join(t for _, _, t in app.state.log)
        assert "plan finished: 3 ok, 0 failed" in log
        # every event the engine emitted reached the handler, in order
        assert isinstance(app.engine_events[0], ev.PlanStarted)
        assert isinstance(app.engine_events[-1], ev.PlanFinished)


@pilot_test
async def test_widgets_follow_a_running_session() -> None:
    app = build(DemoEngine(tick=0.1, ticks_per_step=3))
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("s", "2")
        await until(pilot, lambda: app.state.sessions["s1-signal"].scenario_index >= 2)
        queue = app.query_one(PlanQueue)
        assert cell(queue, "s1-signal", "status") == "running"
        assert cell(queue, "s1-signal", "step") == "RunScenario"
        panel = str(app.query_one(SessionPanel).render())
        assert "Scenario  2/6" in panel or "Scenario  3/6" in panel
        assert app.query_one("#tabs").active == "session"  # type: ignore[attr-defined]
        app.request_stop()
        await until(pilot, lambda: app.busy is None)


@pilot_test
async def test_stop_asks_then_tears_down() -> None:
    app = build(DemoEngine(tick=0.15, ticks_per_step=50))
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("s")
        await until(pilot, lambda: app.state.session is not None
                    and app.state.session.step == "RunScenario")
        await pilot.press("x")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        assert app.state.plan_state == "running"  # nothing happens before the answer
        await pilot.press("y")
        await until(pilot, lambda: app.busy is None, timeout=5)
        assert app.state.plan_state == "stopped"
        assert statuses(app) == {"s1-signal": "cancelled", "s2-telegram": "queued",
                                 "s3-whatsapp": "queued"}
        # teardown: tracer and capture stopped after the stop, then the plan ended cancelled
        names = [(type(e).__name__, getattr(e, "step", "")) for e in app.engine_events]
        cut = names.index(("LogRecorded", ""), len(names) - 8)
        assert ("StepStarted", "StopTracer") in names[cut:]
        assert ("StepStarted", "StopCapture") in names[cut:]
        last = app.engine_events[-1]
        assert isinstance(last, ev.PlanFinished) and last.cancelled
        assert app.state.devices["R5CR10ABCDE"].tracer == "idle"
        assert not [t for t in threading.enumerate() if "engine_worker" in t.name]


@pilot_test
async def test_stop_declined_keeps_the_plan_running() -> None:
    app = build(DemoEngine(tick=0.2, ticks_per_step=50))
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("s")
        await until(pilot, lambda: app.state.session is not None)
        await pilot.press("x")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("n")
        await pilot.pause(0.1)
        assert not app.cancel.is_set() and app.state.plan_state == "running"
        app.request_stop()
        await until(pilot, lambda: app.busy is None)


@pilot_test
async def test_pause_finishes_the_session_and_start_resumes() -> None:
    engine = DemoEngine(tick=0.1, ticks_per_step=1)
    app = build(engine)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("s")
        await until(pilot, lambda: app.state.session is not None)
        await pilot.press("p")
        assert app.state.plan_state == "pausing"
        engine.tick = 0.002
        await until(pilot, lambda: app.busy is None)
        assert app.state.plan_state == "paused"
        assert statuses(app) == {"s1-signal": "ok", "s2-telegram": "queued",
                                 "s3-whatsapp": "queued"}
        await pilot.press("s")
        await until(pilot, lambda: app.busy is None and app.state.plan_state == "finished")
        assert engine.runs[-1] == ["s2-telegram", "s3-whatsapp"]
        assert set(statuses(app).values()) == {"ok"}


@pilot_test
async def test_failed_session_notifies_its_fix_and_rerun_runs_only_it() -> None:
    engine = DemoEngine(tick=0.002, ticks_per_step=2, fail=frozenset({"s2-telegram"}))
    app = build(engine)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("s")
        await until(pilot, lambda: app.busy is None and app.state.plan_state == "finished")
        assert statuses(app)["s2-telegram"] == "failed"
        notes = [n.message for n in app._notifications]
        assert any("lost root" in m and "Fix:" in m for m in notes)
        log = "\n".join(t for _, _, t in app.state.log)
        assert "s2-telegram: StartTracer failed: attach failed" in log
        await pilot.press("R")
        await until(pilot, lambda: app.busy is None and statuses(app)["s2-telegram"] == "ok")
        assert engine.runs[-1] == ["s2-telegram"]


class RaisingEngine:
    """An engine whose plan fails before any session, as a vanished phone would."""

    name = "raising"

    def run_plan(self, plan: Any, sink: Any, cancel: Any, pause: Any, only: Any = None) -> None:
        sink(ev.PlanStarted("p", 1))
        raise DeviceError("R5CR10ABCDE: device offline", "replug the USB cable, then `adb devices`")

    def provision(self, sink: Any, cancel: Any) -> None:
        raise RuntimeError("boom")


@pilot_test
async def test_engine_errors_show_a_modal_with_the_fix_never_a_traceback() -> None:
    app = build(RaisingEngine())
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("s")
        await until(pilot, lambda: isinstance(app.screen, ErrorScreen))
        screen = app.screen
        assert isinstance(screen, ErrorScreen)
        assert screen.message == "R5CR10ABCDE: device offline"
        assert "replug" in screen.hint
        assert app.state.plan_state == "stopped" and app.busy is None
        await pilot.press("enter")
        await until(pilot, lambda: not isinstance(app.screen, ErrorScreen))
        await pilot.press("d")  # an unexpected exception is still a modal
        await until(pilot, lambda: isinstance(app.screen, ErrorScreen))
        assert "RuntimeError: boom" in app.screen.message  # type: ignore[attr-defined]
        assert "Traceback" not in app.screen.message  # type: ignore[attr-defined]


class BlockingEngine:
    """Blocks like a hung adb call until cancelled; the UI must stay live meanwhile."""

    name = "blocking"

    def run_plan(self, plan: Any, sink: Any, cancel: threading.Event, pause: Any,
                 only: Any = None) -> None:
        sink(ev.PlanStarted("p", 1))
        cancel.wait(20)
        sink(ev.PlanFinished(0, 0, 1, 1, cancelled=True))

    def provision(self, sink: Any, cancel: Any) -> None:
        pass


@pilot_test
async def test_ui_stays_responsive_while_the_engine_blocks() -> None:
    app = build(BlockingEngine())
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("s")
        await until(pilot, lambda: app.state.plan_state == "running")
        t0 = time.monotonic()
        await pilot.press("3")
        await pilot.press("2")
        assert app.query_one("#tabs").active == "session"  # type: ignore[attr-defined]
        assert time.monotonic() - t0 < 5.0  # the engine is blocked for 20 s
        await pilot.press("x")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("y")
        await until(pilot, lambda: app.busy is None, timeout=3)
        assert app.state.plan_state == "stopped"


@pilot_test
async def test_quit_while_running_asks_tears_down_and_exits() -> None:
    app = build(DemoEngine(tick=0.2, ticks_per_step=50))
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("s")
        await until(pilot, lambda: app.state.session is not None)
        await pilot.press("q")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("y")
        await until(pilot, lambda: not app.is_running, timeout=5)
    last = app.engine_events[-1]
    assert isinstance(last, ev.PlanFinished) and last.cancelled


@pilot_test
async def test_quit_when_idle_exits_at_once() -> None:
    app = build()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("q")
        await until(pilot, lambda: not app.is_running, timeout=3)


@pilot_test
async def test_question_mark_lists_every_key() -> None:
    app = build()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("question_mark")
        await until(pilot, lambda: isinstance(app.screen, HelpScreen))
        keys = {k for k, _ in KEYS_HELP}
        for b in app.BINDINGS:
            key = b.key if isinstance(b.key, str) else b[0]  # type: ignore[index]
            shown = {"question_mark": "?"}.get(key, key)
            assert shown in keys or any(shown in k.split() for k in keys), shown
        await pilot.press("escape")
        await until(pilot, lambda: not isinstance(app.screen, HelpScreen))


@pilot_test
async def test_command_palette_offers_the_actions() -> None:
    app = build()
    async with app.run_test(size=SIZE):
        titles = {c.title for c in app.get_system_commands(app.screen)}
        assert {"Start plan", "Pause plan", "Stop plan", "Provision devices",
                "Re-run failed session", "Relabel session", "Export session",
                "Open report"} <= titles


@pilot_test
async def test_provision_fills_the_devices_table() -> None:
    app = build()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("d")
        await until(pilot, lambda: app.busy is None and len(app.state.devices) == 2)
        assert app.query_one(DevicesTable).row_count == 2
        assert app.state.plan_state == "idle"


@pilot_test
async def test_ap_probe_runs_in_a_worker_and_fills_the_panel() -> None:
    app = build(ap_probe=demo_ap_probe, ap_interval=0.05)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.state.ap.up is True)
        assert "flowtruth-lab" in str(app.query_one("#ap").render())


def both_tracers_events(serial: str = "R5CR10ABCDE") -> list[ev.Event]:
    """A ``tracer: both`` session as the engine reports it: StartTracers, then per progress
    round frida's event (the app's main process) and strace's (its other processes)."""
    sid = f"{serial}_signal_chat_r1"
    out: list[ev.Event] = [
        ev.DeviceConnected(serial, "SM-G991B", "samsung", "14", "arm64-v8a", True),
        ev.SessionStarted(sid, serial, "org.thoughtcrime.securesms", "chat", "runs/x"),
        ev.StepStarted(sid, "StartTracers"), ev.StepFinished(sid, "StartTracers", True)]
    for n in range(1, 4):
        out += [ev.TracerProgressed(sid, "frida", (4242,), 10 * n),
                ev.TracerProgressed(sid, "strace", (4250, 4251), 100 * n)]
    return out


def test_tracer_column_shows_both_tracers_of_a_both_session() -> None:
    """With ``tracer: both`` the column names both tracers at every progress event instead
    of flipping between them; one tracer keeps its pid; StopTracers sets it idle."""
    events = both_tracers_events()
    sid = "R5CR10ABCDE_signal_chat_r1"
    st = RigState()
    seen = []
    for e in events:
        st.apply(e)
        seen.append(st.devices["R5CR10ABCDE"].tracer)
    assert seen[:5] == ["idle", "idle", "starting", "tracing", "frida 4242"]
    assert set(seen[5:]) == {"strace+frida 3 pids"}
    assert st.sessions[sid].syscalls == 30 + 300  # both tracers' lines, not the last one's
    st.apply(ev.StepStarted(sid, "StopTracers"))
    assert st.devices["R5CR10ABCDE"].tracer == "stopping"
    st.apply(ev.StepFinished(sid, "StopTracers", True))
    assert st.devices["R5CR10ABCDE"].tracer == "idle"
    # the next session (strace only) starts afresh
    st.apply(ev.SessionStarted("n2", "R5CR10ABCDE", "com.whatsapp", "chat", "runs/y"))
    st.apply(ev.TracerProgressed("n2", "strace", (77, 78), 5))
    assert st.devices["R5CR10ABCDE"].tracer == "strace 77+"
    assert st.sessions["n2"].syscalls == 5


@pilot_test
async def test_devices_table_shows_strace_plus_frida() -> None:
    app = build()
    async with app.run_test(size=SIZE) as pilot:
        for e in both_tracers_events():
            app.post_message(EngineEvent(e))
        await until(pilot, lambda: len(app.engine_events) == len(both_tracers_events()))
        await pilot.pause()
        assert cell(app.query_one(DevicesTable), "R5CR10ABCDE", "tracer") == \
            "strace+frida 3 pids"


def write_ap_state(tmp: Path) -> Any:
    """An AP state file as ``ap up`` and its supervisor leave it: dnsmasq restarted twice
    (alive), hostapd given up on, the supervisor's process gone."""
    import subprocess
    import sys

    from ap_setup.config import ApConfig
    from ap_setup.state import (
        ApState,
        DaemonHealth,
        ProcessRecord,
        RestartRecord,
        SupervisorRecord,
    )
    from ap_setup.supervise import proc_starttime

    cfg = ApConfig(interface="wlan7", state_dir=tmp / "state", ssid="rig-ap")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    alive = os.getpid()
    rec = {"argv": ["x"], "log": str(tmp / "x.log")}
    state = ApState(
        status="up", interface="wlan7", work_dir=str(tmp / "work"), ssid="rig-ap",
        processes={
            "dnsmasq": ProcessRecord(name="dnsmasq", pid=alive, starttime=proc_starttime(alive),
                                     **rec),
            "hostapd": ProcessRecord(name="hostapd", pid=gone.pid, starttime=1, **rec)},
        supervisor=SupervisorRecord(kind="process", pid=gone.pid, starttime=1,
                                    log=str(tmp / "sup.log")),
        health={
            "dnsmasq": DaemonHealth(restarts=2, history=[RestartRecord(
                at="2026-11-29T01:00:00Z", reason="exited 1", old_pid=11, new_pid=alive)]),
            "hostapd": DaemonHealth(restarts=5, gave_up=(
                "hostapd keeps exiting: gave up after 5 restart(s) within 300 s "
                "(supervision.max_restarts 5); last: exited 1 (full log: /x/hostapd.log)"))})
    state.save(cfg.state_path)
    return cfg


def test_probe_ap_reports_restarts_and_give_ups(tmp_path: Path) -> None:
    from controller.tui.app import probe_ap

    snap = probe_ap(write_ap_state(tmp_path))
    assert snap.up and snap.interface == "wlan7" and snap.ssid == "rig-ap"
    assert snap.restarts == (("dnsmasq", 2),)
    assert len(snap.gave_up) == 1 and snap.gave_up[0].startswith("hostapd keeps exiting")
    assert snap.supervisor is False
    assert snap.detail.startswith("not running: hostapd")


@pilot_test
async def test_ap_panel_shows_supervised_restarts_and_give_ups(tmp_path: Path) -> None:
    from controller.tui.app import probe_ap

    cfg = write_ap_state(tmp_path)
    app = build(ap_probe=lambda: probe_ap(cfg), ap_interval=0.05)
    async with app.run_test(size=(140, 30)) as pilot:
        await until(pilot, lambda: app.state.ap.up is True)
        await pilot.pause()
        text = str(app.query_one("#ap").render())
        lines = text.splitlines()
        assert lines[0].startswith("AP up wlan7  SSID rig-ap")
        assert lines[1] == "dnsmasq restarted 2x"
        assert lines[2] == "supervisor not running: exited daemons are not restarted"
        assert lines[3].startswith("hostapd keeps exiting: gave up after 5 restart(s)")
        assert "not running: hostapd" in lines[-1]


# ---------------------------------------------------------------------------- results


def make_run_dir(tmp: Path) -> Path:
    """A run directory as the engine writes it: capture, strace logs, manifest."""
    from tests.pcapgen import write_pcap
    from tests.test_label_cli import ALPHA, BETA, PHONE, make_capture, strace_alpha

    run = tmp / "runs" / "20261128T210405Z_pixel7_org.example.alpha"
    (run / "strace").mkdir(parents=True)
    pkts, _ = make_capture(tmp)
    write_pcap(run / "capture.pcap", pkts)
    (run / "strace" / f"strace.4242.{ALPHA}.log").write_text(strace_alpha())
    (run / "packages.txt").write_text(f"package:{ALPHA} uid:10123\npackage:{BETA} uid:10124\n")
    manifest = {
        "schema_version": 1,
        "device": {"serial": "X1", "model": "Pixel 7", "manufacturer": "Google",
                   "mac": "38:a4:ed:18:cc:bf", "ip": PHONE},
        "apps": [{"package": ALPHA, "uid": 10123, "version": "1.0"}],
        "activity": "chat", "clock": {"offset_s": 0.0, "uncertainty_s": 0.002},
        "capture": {"files": ["capture.pcap"], "interface": "wlan1", "snaplen": 262144},
        "traces": {"strace": ["strace"], "netstat": None, "frida": None,
                   "packages": "packages.txt"},
        "started_at": "2026-11-28T21:04:05Z", "outcome": "completed",
        "artifacts": [{"path": "capture.pcap", "sha256": "00"}],
    }
    (run / "manifest.json").write_text(json.dumps(manifest))
    return run


@pilot_test
async def test_relabel_export_and_report_of_a_real_run_dir(tmp_path: Path) -> None:
    run = make_run_dir(tmp_path)
    app = build()
    async with app.run_test(size=SIZE) as pilot:
        for e in (ev.SessionStarted("s1-signal", "X1", "org.example.alpha", "chat", str(run)),
                  ev.FlowsLabelled("s1-signal", 1, 1, 0, 0),
                  ev.SessionFinished("s1-signal", str(run), "ok")):
            app.post_message(EngineEvent(e))
        await pilot.press("3")
        await until(pilot, lambda: app.query_one(ResultsTable).row_count == 1)
        await pilot.press("l")
        await until(pilot, lambda: bool(app.state.sessions["s1-signal"].by_app), timeout=30)
        row = app.state.sessions["s1-signal"]
        assert row.by_app["org.example.alpha"]["flows"] == 2 and row.flows == 4
        assert cell(app.query_one(ResultsTable), "s1-signal", "flows") == "4"
        assert "org.example.alpha" in str(app.query_one("#apps").render()) or \
            "alpha" in str(app.query_one("#apps").render())
        await pilot.press("e")
        await until(pilot, lambda: (run / "labels" / "flows.parquet").exists(), timeout=30)
        assert list((run / "labels").glob("Pixel7_*/*.json"))
        await pilot.press("o")
        await until(pilot, lambda: isinstance(app.screen, ReportScreen), timeout=10)
        await pilot.press("escape")


@pilot_test
async def test_relabel_of_a_missing_run_dir_shows_the_fix(tmp_path: Path) -> None:
    app = build()
    async with app.run_test(size=SIZE) as pilot:
        gone = tmp_path / "runs" / "gone"
        app.post_message(EngineEvent(
            ev.SessionFailed("s1-signal", str(gone), "cancelled by the technician")))
        await pilot.press("3")
        await until(pilot, lambda: app.query_one(ResultsTable).row_count == 1)
        await pilot.press("l")
        await until(pilot, lambda: isinstance(app.screen, ErrorScreen), timeout=10)
        assert str(gone) in app.screen.message  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------- command


def test_tui_command_rejects_lab_with_demo() -> None:
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "controller.cli", "tui", "--lab", "--demo"],
                       capture_output=True, text=True, timeout=60,
                       cwd=Path(__file__).resolve().parents[1])
    assert p.returncode == 2
    assert p.stderr.strip() == "flowtruth: error: give --lab or --demo, not both"


def test_tui_command_names_a_missing_plan(tmp_path: Path) -> None:
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "controller.cli", "tui", "--demo",
                        str(tmp_path / "PLAN.yaml")], capture_output=True, text=True,
                       timeout=60, cwd=Path(__file__).resolve().parents[1])
    assert p.returncode == 2 and "PLAN.yaml: no such plan file" in p.stderr
    assert "Traceback" not in p.stderr



# ---------------------------------------------------------------------------- real-engine adapter


class FakeSpec:
    def __init__(self, serial: str, key: str) -> None:
        self.serial, self.key = serial, key


class FakePlan:
    """The two methods of controller.plan.Plan the adapter uses."""

    name = "fake"

    def __init__(self, keys: list[tuple[str, str]], only: list[str] | None = None) -> None:
        self.keys, self.only_keys = keys, only

    def session_specs(self, serials: dict[str, str] | None = None) -> list[FakeSpec]:
        return [FakeSpec(s, k) for s, k in self.keys
                if self.only_keys is None or k in self.only_keys]

    def only(self, keys: list[str]) -> FakePlan:
        return FakePlan(self.keys, list(keys))


def test_session_engine_runs_rounds_and_pause_lets_the_round_finish(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """One session per phone per round; the inner plans' Plan* events are folded into one
    plan; pause set during a round stops before the next; only= restricts the keys."""
    from controller import session
    from controller.tui.engine import SessionEngine

    calls: list[list[str]] = []
    pause = threading.Event()

    def fake_run_plan(plan: Any, env: Any, sink: Any, cancel: Any, resume: bool = False) -> None:
        keys = [s.key for s in plan.session_specs()]
        calls.append(keys)
        sink(ev.PlanStarted("inner", len(keys)))
        for k in keys:
            sink(ev.SessionStarted(k, "x", "signal", "chat", f"runs/{k}"))
            if len(calls) == 1:
                pause.set()  # the technician presses p while the first round runs
            sink(ev.SessionFinished(k, f"runs/{k}", "ok") if k != "b1"
                 else ev.SessionFailed(k, f"runs/{k}", "boom"))
        sink(ev.PlanFinished(len(keys), 0, 0, len(keys)))

    monkeypatch.setattr(session, "run_plan", fake_run_plan)
    plan = FakePlan([("A", "a1"), ("A", "a2"), ("B", "b1"), ("B", "b2"), ("A", "a3")])
    rec = ev.RecordingSink()
    engine = SessionEngine(env=type("Env", (), {"serials": {}, "capture": None})())
    engine.run_plan(plan, rec, threading.Event(), pause)
    assert calls == [["a1", "b1"]]
    kinds = [type(e).__name__ for e in rec.events]
    assert kinds.count("PlanStarted") == 1 and kinds.count("PlanFinished") == 1
    assert rec.events[0] == ev.PlanStarted("fake", 5, at=rec.events[0].at)
    fin = rec.events[-1]
    assert isinstance(fin, ev.PlanFinished)
    assert (fin.done, fin.failed, fin.skipped, fin.cancelled) == (1, 1, 3, False)
    # resume the rest without a pause: rounds a2+b2, then a3
    calls.clear()
    engine.run_plan(plan, rec, threading.Event(), threading.Event(), only=["a2", "b2", "a3"])
    assert calls == [["a2", "b2"], ["a3"]]
