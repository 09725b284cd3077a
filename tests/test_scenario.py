"""Scenarios: the shipped files, the schema's errors, the runner over a recording fake, the
``flowtruth scenario`` command (the engine's screens, verified actions and the scenarios on a
phone behind a real adb server: tests/test_scenario_engine.py)."""

from __future__ import annotations

import base64
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from controller.device import RecordingDeviceLink, ShellResult
from controller.errors import ConfigError, DeviceError
from controller.lab import toolbox_runtime as rt
from controller.scenario import (
    ACTIVITIES,
    ScenarioCancelled,
    ScenarioFailed,
    ScenarioRunner,
    load_scenario,
    parse_screen,
    scenario_files,
    scenario_for,
)

REPO = Path(__file__).resolve().parents[1]


def make_screen(*nodes: dict[str, str]) -> str:
    """A uiautomator dump with these nodes stacked 100 px apart."""
    kids = [rt.make_node("android.widget.TextView", "x", (0, 100 * i, 200, 100 * i + 80),
                         index=i, clickable=True, **n) for i, n in enumerate(nodes)]
    return rt.make_hierarchy([rt.make_node("android.widget.FrameLayout", "x", (0, 0, 1080, 2400),
                                           children=kids)])


def write(tmp: Path, text: str) -> Path:
    p = tmp / "s.yaml"
    p.write_text(text)
    return p


BASE = "app: t\npackage: com.example.t\nactivity: com.example.t.Main\n"
GBOARD = "com.google.android.inputmethod.latin/com.android.inputmethod.latin.LatinIME"


def make_keyboard_phone() -> RecordingDeviceLink:
    """A fake phone with Gboard selected and ADBKeyBoard installed but not enabled."""
    selected = [GBOARD]

    def ime_set(cmd: str) -> str:
        selected[0] = shlex.split(cmd)[-1]
        return f"Input method {selected[0]} selected for user #0\n"

    return (RecordingDeviceLink()
            .on(r"^pm list packages com\.android\.adbkeyboard$",
                "package:com.android.adbkeyboard\n")
            .on(r"^ime list -a -s$", f"{GBOARD}\ncom.android.adbkeyboard/.AdbIME\n")
            .on(r"^ime list -s$", f"{GBOARD}\n")
            .on(r"^settings get secure default_input_method$", lambda _c: selected[0] + "\n")
            .on(r"^ime set ", ime_set)
            .on(r"^ime (en|dis)able ", lambda c: f"Input method {shlex.split(c)[-1]}: now "
                                                 f"{shlex.split(c)[1]}d for user #0\n")
            .on(r"^am broadcast ", "Broadcasting: Intent { act=ADB_INPUT_B64 flg=0x400000 "
                                   "(has extras) }\nBroadcast completed: result=0\n"))


# ----------------------------------------------------------------------------- files


def test_shipped_scenarios_cover_every_app_and_activity() -> None:
    for app, package in (("signal", "org.thoughtcrime.securesms"),
                         ("telegram", "org.telegram.messenger"), ("whatsapp", "com.whatsapp")):
        sc = scenario_for(app)
        assert sc.package == package
        assert set(ACTIVITIES) <= set(sc.activities)
        assert scenario_for(package).path == sc.path
        for role in ("solo", "caller", "callee"):
            assert set(sc.roles("chat")) == {"solo", "caller", "callee"}
            steps = sc.steps("chat", {"contact": "Bob", "message": "ciao", "reply": "ok"}, role=role)
            assert steps[0].kind == "goto" and steps[0].args.screen == "conversation"
            assert steps[0].params["contact"] == "Bob"
            texts = [s.args.text for s in steps if s.kind == "type"]
            assert texts[0] == ("ok" if role == "callee" else "ciao")
            assert "sent" in [s.kind for s in steps]
        for act in ("audio_call", "video_call"):
            assert "connected" in [s.kind for s in sc.steps(act, role="caller")]
            callee = [s.kind for s in sc.steps(act, role="callee")]
            assert "await" in callee and "connected" in callee and callee[-2] == "hangup"


@pytest.mark.parametrize(("body", "match"), [
    ("activities:\n  chat:\n    - jump: {}\n", r"activities\.chat\[0\]: unknown step 'jump'"),
    ("activities:\n  chat:\n    - tap: {text: a, colour: red}\n",
     r"activities\.chat\[0\]\.tap\.colour: Extra inputs"),
    ("activities:\n  chat:\n    - tap: {index: 1}\n", r"chat\[0\]\.tap: .*selector needs"),
    ("activities:\n  chat:\n    - wait: {seconds: soon}\n", r"chat\[0\]\.wait.*seconds"),
    ("activities:\n  chat:\n    - wait: {seconds: 1, dwell: [3, 1]}\n", r"dwell"),
    ("activities:\n  chat:\n    - type: {text: '{who}'}\n", r"parameter 'who' is not given"),
    ("activities:\n  chat:\n    - {tap: {text: a}, key: {key: HOME}}\n", r"exactly one key"),
    ("activities:\n  chat: []\n", r"activities\.chat: no steps"),
    ("activities: {}\n", None),
])
def test_schema_errors_name_the_file_and_field(tmp_path: Path, body: str, match: str | None) -> None:
    p = write(tmp_path, BASE + body)
    if match is None:  # an empty activity table is allowed (nothing to run)
        assert load_scenario(p).activities == {}
        return
    with pytest.raises(ConfigError, match=match) as ei:
        load_scenario(p)
    assert str(p) in ei.value.message


def test_top_level_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="field package"):
        load_scenario(write(tmp_path, "app: t\npackage: 'not a package'\nactivity: A\nactivities: {}\n"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_scenario(write(tmp_path, "app: [\n"))
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_scenario(write(tmp_path, "- 1\n"))
    with pytest.raises(ConfigError, match="cannot read"):
        load_scenario(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="no activity 'dance'"):
        scenario_for("signal").steps("dance")


# ----------------------------------------------------------------------------- runner


def scenario(tmp: Path, steps: str, params: str = "") -> tuple:
    sc = load_scenario(write(tmp, BASE + params + "activities:\n  a:\n" + steps))
    return sc, sc.steps("a")


def test_tap_by_selector_retries_while_uiautomator_is_not_idle(tmp_path: Path) -> None:
    sc, steps = scenario(tmp_path, "    - tap: {resource_id: 'com.example.t:id/send'}\n"
                                   "    - tap: {content_desc: '~^Photo', index: 1}\n")
    screen = make_screen({"text": "Alice"}, {"resource_id": "com.example.t:id/send"},
                         {"content_desc": "Photo 1"}, {"content_desc": "Photo 2"})
    answers = iter(["ERROR: could not get idle state.", screen, screen])
    link = RecordingDeviceLink().on(r"^uiautomator dump", lambda _c: next(answers))
    ScenarioRunner(link, sc, retry_delay=0).run(steps)
    taps = [c for c in link.commands if c.startswith("input tap")]
    assert taps == ["input tap 100 140", "input tap 100 340"]
    assert sum(c.startswith("uiautomator") for c in link.commands) == 3


def test_missing_node_fails_optional_node_is_skipped(tmp_path: Path) -> None:
    sc, steps = scenario(tmp_path, "    - tap: {text: Bob, optional: true}\n"
                                   "    - tap: {text: Bob, retries: 2}\n")
    link = RecordingDeviceLink().on(r"^uiautomator dump", make_screen({"text": "Alice"}))
    r = ScenarioRunner(link, sc, retry_delay=0)
    with pytest.raises(ScenarioFailed, match="no node with text='Bob'"):
        r.run(steps)
    assert r.log[0]["detail"] == "not on screen; skipped"
    assert sum(c.startswith("uiautomator") for c in link.commands) == 1 + 3


def test_type_quotes_ascii_and_sends_non_ascii_through_adbkeyboard(tmp_path: Path) -> None:
    sc, steps = scenario(tmp_path, "    - type: {text: \"it's 100% ok; rm -rf /\", enter: true}\n"
                                   "    - type: {text: 'ciao, città 👋'}\n"
                                   "    - key: {key: HOME}\n    - key: {key: '4'}\n"
                                   "    - swipe: {x1: 1, y1: 2, x2: 3, y2: 4}\n"
                                   "    - launch: {}\n    - stop: {}\n")
    link = make_keyboard_phone().on(r"^am start", "Status: ok\nTotalTime: 321\nComplete\n")
    r = ScenarioRunner(link, sc)
    r.run(steps)
    cmds = link.commands
    assert cmds[0] == "input text " + shlex.quote("it's%s100%%sok;%srm%s-rf%s/")
    assert shlex.split(cmds[0])[2] == "it's%s100%%sok;%srm%s-rf%s/"
    assert cmds[1] == "input keyevent KEYCODE_ENTER"
    broadcasts = [c for c in cmds if c.startswith("am broadcast")]
    assert len(broadcasts) == 1
    assert broadcasts[0].startswith("am broadcast -a ADB_INPUT_B64 -p com.android.adbkeyboard "
                                    "--es msg ")
    assert base64.b64decode(shlex.split(broadcasts[0])[-1]).decode() == "ciao, città 👋"
    assert "ime set com.android.adbkeyboard/.AdbIME" in cmds
    assert cmds.index("ime set com.android.adbkeyboard/.AdbIME") < cmds.index(broadcasts[0])
    after = cmds[cmds.index(broadcasts[0]) + 1:]
    assert after[:2] == [f"ime set {GBOARD}", "ime disable com.android.adbkeyboard/.AdbIME"]
    assert after[2:5] == ["input keyevent KEYCODE_HOME", "input keyevent 4",
                          "input swipe 1 2 3 4 300"]
    assert after[5] == "am start -W -n com.example.t/com.example.t.Main"
    assert after[6] == "am force-stop com.example.t"
    assert [x["detail"] for x in r.log[:2]] == ["22 characters (input text)",
                                                "13 characters (ADBKeyBoard)"]


def test_type_without_adbkeyboard_is_one_clear_device_error(tmp_path: Path) -> None:
    sc, steps = scenario(tmp_path, "    - type: {text: 'grazie 🙏'}\n")
    link = RecordingDeviceLink(serial="R5CR10ABCDE").on(r"^pm list packages", "")
    with pytest.raises(DeviceError) as err:
        ScenarioRunner(link, sc).run(steps)
    assert err.value.one_line() == (
        "R5CR10ABCDE: cannot type non-ASCII or control characters: the ADBKeyBoard keyboard "
        "(com.android.adbkeyboard) is not installed (install ADBKeyboard.apk "
        "(https://github.com/senzhk/ADBKeyBoard, also on F-Droid): adb -s R5CR10ABCDE install "
        "ADBKeyboard.apk; or type printable ASCII only)")
    assert not any(c.startswith(("ime", "am broadcast")) for c in link.commands)


def test_type_text_with_an_unpaired_surrogate_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"chat\[0\]\.type: .*unpaired surrogate"):
        load_scenario(write(tmp_path, BASE + 'activities:\n  chat:\n    - type: {text: "a\\ud800"}\n'))


def test_a_failing_command_and_a_missing_app_are_scenario_failures(tmp_path: Path) -> None:
    sc, steps = scenario(tmp_path, "    - launch: {}\n")
    link = RecordingDeviceLink().on(r"^am start", "Error type 3\nError: Activity class "
                                                  "{com.example.t/.Main} does not exist.\n")
    with pytest.raises(ScenarioFailed, match="does not exist"):
        ScenarioRunner(link, sc).run(steps)
    sc, steps = scenario(tmp_path, "    - key: {key: BACK}\n")
    link = RecordingDeviceLink().on(r"^input", ShellResult("", 1, "", "Error: injection failed"))
    with pytest.raises(ScenarioFailed, match="injection failed"):
        ScenarioRunner(link, sc).run(steps)


def test_waits_use_a_seeded_dwell_and_cancel_interrupts_them(tmp_path: Path) -> None:
    sc, steps = scenario(tmp_path, "    - wait: {seconds: '{w}', dwell: [0, 0.05]}\n",
                         params="params: {w: '0.01'}\n")
    logs = []
    for _ in range(2):
        r = ScenarioRunner(RecordingDeviceLink(), sc, seed=7)
        r.run(steps)
        logs.append(r.log[0]["detail"])
    assert logs[0] == logs[1]
    sc, steps = scenario(tmp_path, "    - wait: {seconds: 30}\n    - key: {key: HOME}\n")
    cancel = threading.Event()
    link = RecordingDeviceLink()
    threading.Timer(0.2, cancel.set).start()
    t0 = time.monotonic()
    with pytest.raises(ScenarioCancelled):
        ScenarioRunner(link, sc, cancel=cancel).run(steps)
    assert time.monotonic() - t0 < 5
    assert link.commands == []


def test_assert_present_and_absent(tmp_path: Path) -> None:
    sc, steps = scenario(tmp_path, "    - assert: {text: Alice}\n"
                                   "    - assert: {text: Bob, absent: true}\n"
                                   "    - assert: {text: Alice, absent: true, retries: 1}\n")
    link = RecordingDeviceLink().on(r"^uiautomator dump", make_screen({"text": "Alice"}))
    with pytest.raises(ScenarioFailed, match="still on screen"):
        ScenarioRunner(link, sc, retry_delay=0).run(steps)
    assert parse_screen("garbage") == []


# ----------------------------------------------------------------------------- CLI


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "controller.cli", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def test_cli_scenario_check(tmp_path: Path) -> None:
    ok = _cli("scenario", "check", *map(str, scenario_files()))
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.count(": ok: ") == 3
    bad = write(tmp_path, BASE + "activities:\n  chat:\n    - tap: {txt: Alice}\n")
    r = _cli("scenario", "check", str(bad))
    assert r.returncode == 2
    assert r.stderr.strip() == (f"flowtruth: error: {bad}: field activities.chat[0].tap.txt: "
                                "Extra inputs are not permitted")
    assert "Traceback" not in r.stderr
