"""Ctrl-C and SIGTERM against the real CLI in a subprocess, and every command's exit
status: `flowtruth run --lab` interrupted mid-session stops cleanly (manifests say
interrupted, capture.json written, nothing left running, exit 130/143 with one line),
a second Ctrl-C hurries the teardown; `campus ingest` with a failed file exits 1,
Ctrl-C in `flows` exits 130, bad input exits 2."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def _cli(*args: str, env: dict[str, str] | None = None, **kw: Any) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "controller.cli", *args], cwd=REPO,
                            env={**(env or os.environ), "PYTHONPATH": str(REPO)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL, start_new_session=True, **kw)


def _wait_for(cond: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _manifest(runs: Path) -> dict[str, Any] | None:
    for m in runs.glob("*/manifest.json"):
        try:
            return json.loads(m.read_text())
        except ValueError:
            return None
    return None


def _in_scenario(runs: Path) -> bool:
    m = _manifest(runs)
    return bool(m and any(s["step"] == "StartTracers" and s.get("ok") for s in m["steps"]))


def _leftovers(marks: list[str]) -> list[str]:
    """Processes whose command line names one of ``marks`` (the run's directories)."""
    left = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if any(m in cmd for m in marks):
            left.append(f"{pid}: {cmd[:200]}")
    return left


def _interrupt_run(pl: Any, tmp: Path, name: str, signals: list[tuple[int, bool]]
                   ) -> tuple[subprocess.CompletedProcess[str], float]:
    """Run a one-session plan (a 40 s call) with `run --lab`; once its tracers run, send
    ``signals`` (signal, to the whole process group like a terminal's Ctrl-C)."""
    runs = tmp / f"runs-{name}"
    plan = tmp / f"{name}.yaml"
    plan.write_text(yaml.safe_dump({
        "name": name, "devices": ["lab:phone1"], "apps": ["telegram"],
        "activities": ["audio_call"], "params": {"call_seconds": "40"},
        "output": str(runs)}))
    p = _cli("run", "--lab", str(plan), "-q", env=pl.env)
    try:
        _wait_for(lambda: _in_scenario(runs) or p.poll() is not None, 120, "the session")
        assert p.poll() is None, p.communicate()
        time.sleep(2.5)  # the launcher attaches strace, the call is under way
        t0 = time.monotonic()
        for sig, group in signals:
            (os.killpg if group else os.kill)(p.pid, sig)
            time.sleep(0.4)
        out, err = p.communicate(timeout=120)
        took = time.monotonic() - t0
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    return subprocess.CompletedProcess(p.args, p.returncode, out, err), took


def _check_stopped_cleanly(r: subprocess.CompletedProcess[str], runs: Path, why: str) -> None:
    assert "Traceback" not in r.stderr, r.stderr
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"flowtruth: interrupted by the user ({why})"), \
        r.stderr
    m = _manifest(runs)
    assert m is not None and m["outcome"] == "interrupted", m and (m["outcome"], m["error"])
    assert m["error"]["message"] == f"interrupted by the user ({why})"
    steps = {s["step"]: s["ok"] for s in m["steps"]}
    assert steps["StopTracers"] and steps["StopCapture"] and steps["PullArtifacts"], steps
    run_dir = next(runs.glob("*/manifest.json")).parent
    assert (run_dir / "capture.pcap").exists() and m["traces"]["strace"]
    rec = list(runs.glob("_capture_*/capture.json"))
    assert len(rec) == 1, list(runs.iterdir())
    doc = json.loads(rec[0].read_text())
    assert doc["cancelled"] and doc["interrupted"] == f"interrupted by the user ({why})"
    assert doc["sessions"][0]["outcome"] == "interrupted"
    # nothing of the run is left: tcpdump writing into its capture dir, the phone's
    # launcher, strace, netstat poller (their command lines name the session's dir)
    assert _leftovers([str(rec[0].parent), run_dir.name]) == []


@pytest.mark.root
@pytest.mark.slow
def test_ctrl_c_and_sigterm_stop_a_lab_run_cleanly(tmp_path: Path) -> None:
    from tests.vlab_fixture import private_lab

    with private_lab(tmp_path, phones=1, mgmt_base=226) as pl:
        # one Ctrl-C (SIGINT to the process group, as a terminal sends it)
        r, took_one = _interrupt_run(pl, tmp_path, "int", [(signal.SIGINT, True)])
        assert r.returncode == 130, r.stderr
        _check_stopped_cleanly(r, tmp_path / "runs-int", "Ctrl-C")
        assert took_one < 40  # the 40 s call was cut short
        # two: the teardown skips its waits, still stops and records everything
        r, took_two = _interrupt_run(pl, tmp_path, "int2", [(signal.SIGINT, True)] * 2)
        assert r.returncode == 130, r.stderr
        _check_stopped_cleanly(r, tmp_path / "runs-int2", "Ctrl-C")
        assert "interrupted again" in r.stdout
        # SIGTERM to the process (a service manager)
        r, _ = _interrupt_run(pl, tmp_path, "term", [(signal.SIGTERM, False)])
        assert r.returncode == 143, r.stderr
        _check_stopped_cleanly(r, tmp_path / "runs-term", "SIGTERM")


# ----------------------------------------------------------------------------- exit status


def test_bad_input_exits_2_with_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "plan.yaml"
    bad.write_text("devices: []\n")
    r = subprocess.run([sys.executable, "-m", "controller.cli", "run", str(bad)], cwd=REPO,
                       capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = subprocess.run([sys.executable, "-m", "controller.cli", "flows", "--no-such-option"],
                       cwd=REPO, capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 2


def test_ctrl_c_in_flows_exits_130_with_one_line(tmp_path: Path) -> None:
    """A big pcap keeps `flowtruth flows` busy; Ctrl-C (to the group) mid-way."""
    import struct

    from tests.pcapgen import ether, make_udp

    big = tmp_path / "big.pcap"  # 600,000 packets of 30,000 flows: ~10 s of work
    frames = [ether(make_udp("10.0.0.2", f"10.1.{k >> 8}.{k & 255}", 10000 + k, 443,
                             b"x" * 40)) for k in range(30000)]
    hdr = struct.Struct("<IIII")
    parts = [struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 262144, 1)]
    for i in range(600000):
        f = frames[i % len(frames)]
        parts += [hdr.pack(1_700_000_000 + i // 1000, (i % 1000) * 1000, len(f), len(f)), f]
    big.write_bytes(b"".join(parts))
    for sig, code, line in ((signal.SIGINT, 130, "flowtruth: interrupted (Ctrl-C)"),
                            (signal.SIGTERM, 143, "flowtruth: terminated (SIGTERM)")):
        out = tmp_path / f"flows-{code}.csv"
        p = _cli("flows", str(big), "-o", str(out))
        time.sleep(2.5)
        assert p.poll() is None, p.communicate()
        os.killpg(p.pid, sig)
        _o, err = p.communicate(timeout=60)
        assert p.returncode == code, err
        assert err.strip().splitlines() == [line], err


def test_campus_ingest_with_a_failed_file_exits_1(tmp_path: Path, shared_data: Path) -> None:
    caps = tmp_path / "caps"
    caps.mkdir()
    (caps / "good.pcap").symlink_to(shared_data / "ndpi_pcaps" / "signal.pcap")
    (caps / "broken.pcap").write_bytes(b"\xd4\xc3\xb2\xa1" + b"\x00" * 9)  # cut in its header
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    key = tmp_path / "campus.key"
    subprocess.run([sys.executable, "-m", "controller.cli", "campus", "keygen", str(key)],
                   cwd=REPO, env=env, check=True, capture_output=True, timeout=60)
    r = subprocess.run([sys.executable, "-m", "controller.cli", "campus", "ingest", str(caps),
                        "--store", str(tmp_path / "store"), "--key", str(key)], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=300)
    assert "1 failed" in r.stdout, r.stdout + r.stderr
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr


# ----------------------------------------------------------------------------- the console


def test_tui_interrupt_stops_the_plan_then_exits_130() -> None:
    """Pilot: the console's Ctrl-C/SIGTERM handler (what the event loop calls) stops the
    running plan, waits for its teardown, and exits 130; a second one hurries it."""
    import asyncio

    pytest.importorskip("textual")
    from controller import events as ev
    from controller.tui.app import make_app
    from controller.tui.engine import DEMO_PLAN, DemoEngine

    async def go() -> None:
        app = make_app(engine=DemoEngine(tick=0.15, ticks_per_step=50), plan=DEMO_PLAN,
                       ap_probe=None)
        async with app.run_test(size=(100, 30)) as pilot:
            await pilot.press("s")
            for _ in range(300):
                if app.state.session is not None and app.state.session.step == "RunScenario":
                    break
                await pilot.pause(0.02)
            app.interrupt(signal.SIGINT)
            assert app.cancel.is_set() and app.cancel.reason == "interrupted by the user (Ctrl-C)"
            app.interrupt(signal.SIGINT)
            assert app.cancel.hard.is_set()
            for _ in range(300):
                if app.busy is None:
                    break
                await pilot.pause(0.02)
            await pilot.pause(0.2)
        assert app.return_code == 130
        last = [e for e in app.engine_events if isinstance(e, ev.PlanFinished)]
        assert last and last[-1].cancelled  # torn down before it exited
        assert any("interrupted by the user (Ctrl-C): stopping" in t for _a, _l, t in app.state.log)

    asyncio.run(go())


@pytest.mark.skipif(__import__("shutil").which("tmux") is None, reason="needs tmux")
def test_flowtruth_tui_in_a_terminal_exits_143_on_sigterm(tmp_path: Path) -> None:
    """The real `flowtruth tui --demo` in tmux: SIGTERM mid-plan -> one line, exit 143."""
    from tests.test_tui_tmux import Terminal

    cmd = (f"PYTHONPATH={REPO} {sys.executable} -m controller.cli tui --demo "
           "--demo-tick 0.3")
    term = Terminal(cmd, tmp_path)
    try:
        term.wait_for("Plan queue", timeout=60)
        term.keys("s")
        term.wait_for("RunScenario", timeout=30)
        shell = int(term.tmux("display", "-p", "-t", term.name, "#{pane_pid}").strip())
        kids = _wait_for(lambda: Path(f"/proc/{shell}/task/{shell}/children").read_text().split(),
                         10, "the TUI process")
        os.kill(int(kids[0]), signal.SIGTERM)
        assert term.wait_exit(60) == 143
        # what the terminal shows once the console has left (history, wrapped lines joined)
        screen = term.tmux("capture-pane", "-p", "-J", "-S", "-200", "-t", term.name)
        lines = [x for x in screen.splitlines() if x.startswith("flowtruth:")]
        assert "Traceback" not in screen and len(lines) == 1, screen
        assert lines[0].startswith("flowtruth: interrupted by the user (SIGTERM): the "
                                   "console stopped the plan"), screen
    finally:
        term.kill()


@pytest.mark.root
@pytest.mark.slow
def test_ctrl_c_during_demo_stops_cleanly_and_takes_the_lab_down(tmp_path: Path) -> None:
    from controller.lab.topology import skip_reason

    if skip_reason():
        pytest.skip(skip_reason())
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home), "TMPDIR": str(home),
           "FLOWTRUTH_LAB_STATE_DIR": str(tmp_path / "state")}
    out = tmp_path / "demo"
    p = _cli("demo", "--out", str(out), "--phones", "1", "-q", env=env)
    try:
        _wait_for(lambda: _in_scenario(out / "runs") or p.poll() is not None, 240,
                  "the first session")
        assert p.poll() is None, p.communicate()
        time.sleep(2.5)
        os.killpg(p.pid, signal.SIGINT)
        so, se = p.communicate(timeout=180)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    r = subprocess.CompletedProcess(p.args, p.returncode, so, se)
    assert r.returncode == 130, r.stderr
    _check_stopped_cleanly(r, out / "runs", "Ctrl-C")
    assert "taking the virtual lab down" in r.stdout
    from controller.lab.topology import Lab

    assert Lab.load(str(tmp_path / "state")) is None  # the lab is down
