"""A hostile phone against the controller: file names that climb out of the run
directory, symlinks leading out of the session's directory on the phone, names from
device strings, and escape sequences / rich markup in what the phone reports."""

from __future__ import annotations

import json
import os
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from controller import events as ev
from controller.safety import UnsafePath, markup, plain, safe_join, safe_name

# ----------------------------------------------------------------------------- helpers


def test_safe_join_refuses_every_way_out(tmp_path: Path) -> None:
    base = tmp_path / "run"
    base.mkdir()
    assert safe_join(base, "strace/strace.1.x.log") == base / "strace" / "strace.1.x.log"
    for bad in ("strace/strace.1.x/../../../../tmp/x.log", "/etc/passwd", "a/\x00b",
                "a//b", "./a", "a/", "x" * 300, ".."):
        with pytest.raises(UnsafePath):
            safe_join(base, bad)
    (base / "out").symlink_to(tmp_path)  # a link inside the base that leads out
    with pytest.raises(UnsafePath, match="outside"):
        safe_join(base, "out/x")


def test_safe_name_and_terminal_text() -> None:
    assert safe_name("../../tmp/x") == "tmp-x"
    assert safe_name("..") == "_" and safe_name("") == "_"
    assert safe_name("-rf") == "rf" and len(safe_name("a" * 999)) == 120
    assert safe_name("SM-G991B") == "SM-G991B"
    model = "\x1b]0;pwned\x07\x1b[2J[bold red]EVIL[/]\x9b1m"
    assert "\x1b" not in plain(model) and "\x07" not in plain(model) and "\x9b" not in plain(model)
    from rich.text import Text

    # as markup, the phone's brackets print as themselves and style nothing
    t = Text.from_markup(markup(model))
    assert t.plain == "]0;pwned[2J[bold red]EVIL[/]1m" and not t.spans


def test_session_key_sanitises_every_component() -> None:
    from controller.session import SessionSpec

    spec = SessionSpec(serial="../../x", app="../evil", activity="chat/../../../tmp/x",
                       device_name="\x1b[31m../phone")
    assert "/" not in spec.key and "\x1b" not in spec.key and not spec.key.startswith(".")
    assert spec.key == "31m..-phone_evil_chat-..-..-..-tmp-x_r1"
    plain_spec = SessionSpec(serial="127.0.0.1:5555", app="signal", activity="audio_call")
    assert plain_spec.key == "127.0.0.1-5555_signal_audio_call_r1"  # honest names unchanged


# ----------------------------------------------------------------------------- the lab

try:
    from tests.vlab_fixture import skip_reason, start_vlab
    SKIP = skip_reason()
except Exception as exc:  # pragma: no cover
    SKIP = f"virtual lab fixture unavailable: {exc}"


@pytest.fixture(scope="module")
def vlab() -> Iterator[Any]:
    if SKIP:
        pytest.skip(SKIP)
    lab = start_vlab(1, clock_offsets=(0.0,))
    try:
        yield lab
    finally:
        import shutil

        lab.close()
        shutil.rmtree(lab.tmp, ignore_errors=True)


class HostileLink:
    """The lab phone's real adb link, with an adbd that lies in the artifact listing: it
    adds a name climbing out of the run directory, with the real checksum of the file
    that name reaches on the phone."""

    def __init__(self, inner: Any, evil_sha: str) -> None:
        self.inner, self.serial, self.evil_sha = inner, inner.serial, evil_sha

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def shell(self, command: str, timeout: float = 30.0) -> Any:
        r = self.inner.shell(command, timeout=timeout)
        if 'sha256sum "$f"' in command:
            import dataclasses

            lie = (f"{self.evil_sha}  strace/strace.1.x/{'../' * 24}tmp/"
                   f"ft-evil-{os.getpid()}.log\n{self.evil_sha}  ../../escape.log\n")
            r = dataclasses.replace(r, stdout=r.stdout + lie)
        return r


@pytest.mark.root
@pytest.mark.slow
def test_hostile_phone_cannot_write_outside_the_run_dir(vlab: Any, tmp_path: Path) -> None:
    import hashlib

    from controller.device import AdbDeviceLink, root_shell
    from controller.session import Environment, SessionSpec, TcpdumpCapture, run_session

    ph = vlab.phones[0]
    evil = Path(f"/tmp/ft-evil-{os.getpid()}.log")
    evil.unlink(missing_ok=True)
    payload = b"owned\n"
    link = HostileLink(AdbDeviceLink(vlab.client, ph.address),
                       hashlib.sha256(payload).hexdigest())
    secret = tmp_path / "phone-secret.txt"  # a file outside the session's dir on the phone
    secret.write_text("not yours\n")
    records = ev.RecordingSink()
    session_dir: list[str] = []

    def sink(e: ev.Event) -> None:
        records(e)
        if isinstance(e, ev.SessionStarted):
            session_dir.append(f"/data/local/tmp/flowtruth/{Path(e.run_dir).name}")
        if isinstance(e, ev.StepStarted) and e.step == "StopCapture":
            # the phone plants a symlink among the names the controller asks for
            d = shlex.quote(session_dir[0])
            root_shell(link.inner, f"ln -s {shlex.quote(str(secret))} "
                                   f"{d}/strace/strace.999.evil.log; "
                                   f"mkdir -p {d}/strace/strace.1.x")

    cap = TcpdumpCapture("br0", vlab.tmp / "cap-hostile", netns=vlab.ap.name)
    env = Environment(runs_root=tmp_path / "runs", client=vlab.client, capture=cap,
                      launcher_interval=0.2, label=False)
    spec = SessionSpec(serial=ph.address, app="signal", activity="chat", wait_scale=0.1,
                       device_name=ph.name)
    res = run_session(spec, link, env, sink)
    try:
        assert not evil.exists(), "a phone's file landed outside the run directory"
        m = json.loads((res.run_dir / "manifest.json").read_text())
        refused = {r["name"]: r["reason"] for r in m["pull"]["refused"]}
        assert any("strace.1.x/../" in n for n in refused), refused
        assert "../../escape.log" in refused
        assert "strace/strace.999.evil.log" in refused  # the link out, seen on the phone
        assert "symbolic link" in refused["strace/strace.999.evil.log"]
        assert "strace/strace.999.evil.log" not in m["artifacts"]
        # the session says why, and everything it did pull is inside its run directory
        warns = [e.text for e in records.of(ev.LogRecorded) if e.level == "warning"]
        assert any("refused 3 file(s)" in w for w in warns), warns
        root = res.run_dir.resolve()
        for name in m["artifacts"]:
            assert (res.run_dir / name).resolve().is_relative_to(root)
        assert m["traces"]["strace"], "the honest strace logs are still pulled"
        pull = next(s for s in m["steps"] if s["step"] == "PullArtifacts")
        assert pull["ok"] and "refused 3" in pull["detail"]
    finally:
        evil.unlink(missing_ok=True)


EVIL_MODEL = "\x1b]0;pwned\x07\x1b[2J[bold red]EVIL[/]\x1b[0m"


@pytest.mark.root
@pytest.mark.slow
def test_devices_prints_a_hostile_model_as_inert_text(vlab: Any) -> None:
    """`flowtruth devices` (the CLI in a subprocess) against a lab phone whose
    ro.product.model holds an OSC title, a clear-screen and rich markup."""
    import subprocess
    import sys

    from tests.vlab_fixture import start_adbd

    ph = vlab.phones[0]
    ph.kill_adbd()
    vlab.adb("disconnect", ph.address)
    ph.config = ph.config.model_copy(update={"model": EVIL_MODEL,
                                             "manufacturer": "[link=file:///etc]acme"})
    start_adbd(vlab, ph)
    r = subprocess.run([sys.executable, "-m", "controller.cli", "devices", "--adb-port",
                        str(vlab.adb_port), "--no-clock"],
                       env={**vlab.adb_env, "COLUMNS": "400", "FORCE_COLOR": "1",
                            "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
                       capture_output=True, timeout=120, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr.decode()
    out = r.stdout.decode()
    # rich's own styling is there (FORCE_COLOR), but none of the phone's bytes: no OSC
    # title, no clear-screen, and its markup printed as text, not applied
    assert "\x1b]0;" not in out and "\x1b[2J" not in out and "\x07" not in out
    assert "[bold red]EVIL[/]" in out and "[link=file:///etc]acme" in out
    assert "pwned" in out  # the text stays visible, only the control bytes are gone


def test_tui_shows_a_hostile_model_as_inert_text() -> None:
    """The TUI (Pilot): a phone's model and warning with ESC sequences and markup."""
    import asyncio

    pytest.importorskip("textual")
    from rich.text import Text

    from controller.tui.app import make_app
    from controller.tui.engine import DEMO_PLAN, DemoEngine
    from controller.tui.messages import EngineEvent
    from controller.tui.widgets import DevicesTable

    async def go() -> None:
        app = make_app(engine=DemoEngine(tick=0.002, ticks_per_step=2), plan=DEMO_PLAN,
                       ap_probe=None)
        async with app.run_test(size=(120, 30)) as pilot:
            serial = "EVIL[b]\x1b[31m01"
            app.post_message(EngineEvent(ev.DeviceConnected(
                serial, EVIL_MODEL, "[i]acme", "14", "arm64-v8a", True)))
            app.post_message(EngineEvent(ev.PreflightWarned(
                serial, "battery", "low [blink]battery\x1b[5m", "charge it")))
            for _ in range(100):
                if len(app.engine_events) == 2:
                    break
                await pilot.pause(0.02)
            await pilot.pause()
            table = app.query_one(DevicesTable)
            key = plain(serial)
            model = table.get_cell(key, "model")
            assert isinstance(model, Text) and "\x1b" not in model.plain
            assert model.plain.startswith("]0;pwned[2J[bold red]EVIL[/][0m")
            assert all(sp.style == "bold yellow" for sp in model.spans)  # only our " !"
            ser = Text.from_markup(table.get_cell(key, "serial"))  # how the table renders it
            assert ser.plain == "EVIL[b][31m01" and not ser.spans
            # the log and the toast show the same text, markup and ESC inert
            assert all("\x1b" not in line[2] for line in app.state.log)
            toast = list(app._notifications)[-1]
            assert toast.message == "low [blink]battery[5m\nFix: charge it"
            assert not toast.markup and "\x1b" not in toast.title

    asyncio.run(go())
