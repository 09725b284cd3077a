"""Snapshots of the TUI's main screens at 80x24 (and one large terminal).

The app is fed a recorded rehearsal (fixed times, fixed run directories) and a fixed
clock, so each screen renders the same every time. Update with
``pytest tests/test_tui_snapshots.py --snapshot-update`` and look at the SVGs in
``tests/__snapshots__/test_tui_snapshots/`` before committing them.
"""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("textual")
pytest.importorskip("pytest_textual_snapshot")

from textual.pilot import Pilot  # noqa: E402

from controller import events as ev  # noqa: E402
from controller.tui.app import FlowtruthApp, demo_ap_probe, make_app  # noqa: E402
from controller.tui.engine import DEMO_PLAN, DemoEngine, rehearsal_events  # noqa: E402
from controller.tui.messages import ActionFailed, ApProbed, EngineEvent  # noqa: E402

SMALL = (80, 24)
LARGE = (160, 48)
EVENTS = rehearsal_events(fail=frozenset({"s2-telegram"}))


def upto(pred: Any) -> list[ev.Event]:
    """The rehearsal's events up to and including the first one matching ``pred``."""
    for i, e in enumerate(EVENTS):
        if pred(e):
            return EVENTS[: i + 1]
    raise AssertionError("no such event")


MID_S1 = upto(lambda e: isinstance(e, ev.CaptureProgressed) and e.session_id == "s1-signal"
              and e.packets > 1000)


def app_with(events: list[ev.Event]) -> tuple[FlowtruthApp, Any]:
    now = [EVENTS[0].at - 5]
    app = make_app(engine=DemoEngine(), plan=DEMO_PLAN, ap_probe=None, clock=lambda: now[0])

    async def replay(pilot: Pilot[None]) -> None:
        now[0] = events[-1].at if events else now[0]
        app.post_message(ApProbed(demo_ap_probe()))
        for e in events:
            app.post_message(EngineEvent(e))
        await pilot.pause()
        app.clear_notifications()
        await pilot.pause()

    return app, replay


def test_dashboard_idle(snap_compare: Any) -> None:
    app, replay = app_with([])
    assert snap_compare(app, terminal_size=SMALL, run_before=replay)


def test_dashboard_running(snap_compare: Any) -> None:
    app, replay = app_with(MID_S1)
    assert snap_compare(app, terminal_size=SMALL, run_before=replay)


def test_session_view_running(snap_compare: Any) -> None:
    app, replay = app_with(MID_S1)

    async def run_before(pilot: Pilot[None]) -> None:
        await replay(pilot)
        await pilot.press("2")

    assert snap_compare(app, terminal_size=SMALL, run_before=run_before)


def test_results_after_the_plan(snap_compare: Any) -> None:
    app, replay = app_with(EVENTS)

    async def run_before(pilot: Pilot[None]) -> None:
        await replay(pilot)
        await pilot.press("3")

    assert snap_compare(app, terminal_size=SMALL, run_before=run_before)


def test_dashboard_after_the_plan_large(snap_compare: Any) -> None:
    app, replay = app_with(EVENTS)
    assert snap_compare(app, terminal_size=LARGE, run_before=replay)


def test_keys(snap_compare: Any) -> None:
    app, replay = app_with([])
    assert snap_compare(app, terminal_size=SMALL, press=["question_mark"], run_before=replay)


def test_stop_confirmation(snap_compare: Any) -> None:
    app, replay = app_with(MID_S1)

    async def run_before(pilot: Pilot[None]) -> None:
        await replay(pilot)
        app.busy = "plan"  # as while the engine worker runs
        await pilot.press("x")

    assert snap_compare(app, terminal_size=SMALL, run_before=run_before)


def test_error_modal_with_its_fix(snap_compare: Any) -> None:
    app, replay = app_with([])

    async def run_before(pilot: Pilot[None]) -> None:
        await replay(pilot)
        app.post_message(ActionFailed("plan", "R5CR10ABCDE: device offline",
                                      "replug the USB cable, then `adb devices`"))
        await pilot.pause()

    assert snap_compare(app, terminal_size=SMALL, run_before=run_before)


def test_dashboard_ap_supervision_and_both_tracers(snap_compare: Any) -> None:
    """The AP panel with a daemon restarted and one given up on; a phone traced by strace
    and frida at once (``tracer: both``)."""
    from controller.tui.messages import ApSnapshot

    sid = "s1-signal"
    t0 = EVENTS[0].at
    events: list[ev.Event] = [
        ev.DeviceConnected("R5CR10ABCDE", "SM-G991B", "samsung", "14", "arm64-v8a", True,
                           at=t0),
        ev.SessionStarted(sid, "R5CR10ABCDE", "org.thoughtcrime.securesms", "chat",
                          "runs/20261128T220000Z_R5CR10ABCDE_signal_chat_r1", at=t0 + 1),
        ev.StepStarted(sid, "StartTracers", at=t0 + 2),
        ev.StepFinished(sid, "StartTracers", True, at=t0 + 3),
        ev.StepStarted(sid, "RunScenario", at=t0 + 3.5),
        ev.TracerProgressed(sid, "frida", (4242,), 12, at=t0 + 4),
        ev.TracerProgressed(sid, "strace", (4250, 4251), 340, at=t0 + 5)]
    app = make_app(engine=DemoEngine(), plan=DEMO_PLAN, ap_probe=None, clock=lambda: t0 + 6)

    async def run_before(pilot: Pilot[None]) -> None:
        app.post_message(ApProbed(ApSnapshot(
            True, "wlan1", "flowtruth", 2, 48_000_000, "", (("dnsmasq", 2),),
            ("hostapd keeps exiting: gave up after 5 restart(s) within 300 s "
             "(supervision.max_restarts 5); last: exited 1",), True)))
        for e in events:
            app.post_message(EngineEvent(e))
        await pilot.pause()
        app.clear_notifications()
        await pilot.pause()

    assert snap_compare(app, terminal_size=SMALL, run_before=run_before)
