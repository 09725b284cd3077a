"""The scenario engine: every selector against the selector table (not the lab), the screen
recogniser on saved dumps, the runner over a fake WhatsApp phone (goto from anywhere,
interruptions, verified messages and calls, roles, German), the locale and version checks,
hostile scenario files, and ``flowtruth scenario probe|try`` through a real adb server."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from controller.errors import ConfigError
from controller.lab import toolbox_runtime as rt
from controller.scenario import (
    LAST_SCREEN_FILE,
    Resolver,
    ScenarioFailed,
    ScenarioRunner,
    check_locale,
    check_version,
    load_scenario,
    load_table,
    parse_screen,
    recognise,
    scenario_files,
    scenario_for,
    scenario_selectors,
)
from tests.scenario_fakes import FakeWhatsApp

REPO = Path(__file__).resolve().parents[1]
SCREENS = REPO / "tests" / "data" / "screens"
FAST = 0.001  # wait_scale: holds and dwells in milliseconds


def run(fake: FakeWhatsApp, activity: str, role: str = "solo", tmp: Path | None = None,
        **params: str) -> ScenarioRunner:
    sc = scenario_for("whatsapp")
    steps = sc.steps(activity, {"contact": "Alice", "token": "t0k", **params}, role=role)
    r = ScenarioRunner(fake.link, sc, role=role, peer="phone2" if role != "solo" else None,
                       wait_scale=FAST, retry_delay=0, poll_s=0, run_dir=tmp)
    r.run(steps)
    return r


# ----------------------------------------------------------------------------- the table


def test_every_selector_of_every_scenario_is_in_the_table() -> None:
    t = load_table()
    assert set(t.locales) >= {"en", "de"}
    all_ids = t.all_ids()
    files = scenario_files()
    assert {f.stem for f in files} == {"signal", "telegram", "whatsapp"}
    for f in files:
        sc = load_scenario(f)
        sec = t.apps[sc.table_app]
        assert sec.package == sc.package, f
        assert re.fullmatch(r"\d+(\.\d+)*", sec.verified_version), f
        checked = 0
        for where, sel in scenario_selectors(sc):
            for kind, name in sel.names():
                checked += 1
                if kind == "id":
                    rid = t.id(sc.table_app, name)
                    assert rid, f"{f.name}: {where}: id {name!r} not in the table"
                    assert rid.split(":id/")[0] in (sc.package, "android",
                                                    "com.android.permissioncontroller"), rid
                elif kind == "resource_id":
                    assert name in all_ids, f"{f.name}: {where}: {name} not in the table"
                else:
                    for loc in t.locales:
                        assert t.string(sc.table_app, name, loc), \
                            f"{f.name}: {where}: string {name!r} has no {loc} text"
            for field in ("text", "content_desc", "text_starts", "desc_starts"):
                v = getattr(sel, field)  # literal texts would be English-only: none allowed
                assert v is None or v.startswith(("@", "{", "~^\\d")) or v in (
                    "android.widget.Button",), f"{f.name}: {where}: literal text {v!r}"
        assert checked > 40, f
    raw = (REPO / "controller/scenarios/selectors.yaml").read_text(encoding="utf-8")
    for name in ("signal", "telegram", "whatsapp", "system"):
        assert f"\n  {name}:\n" in raw


def test_signal_scenario_follows_the_real_layouts() -> None:
    sc = scenario_for("signal")
    conv = sc.screens["conversation"]
    assert conv.context is not None
    assert conv.context.id == "conversation_title" and conv.context.inside == "conversation_title_view"
    assert conv.context.text_starts == "{contact}"  # muted/verified chats append a span
    assert load_table().id("signal", "conversation_title") == "org.thoughtcrime.securesms:id/title"
    media = [s.describe() for s in sc.steps("media")]
    assert "tap id='media_review_send'" in media
    wa = scenario_for("whatsapp")
    assert [s.args.screen for s in wa.steps("audio_call", role="caller") if s.kind == "goto"] == ["calls"]
    tg = scenario_for("telegram")
    assert [s.args.screen for s in tg.steps("video_call", role="caller")
            if s.kind == "goto"] == ["conversation", "profile"]
    assert tg.verify.hangup is not None and tg.verify.hangup.class_name == "android.widget.Button"


@pytest.mark.parametrize("path", sorted(SCREENS.glob("*.xml")), ids=lambda p: p.stem)
def test_saved_dumps_are_recognised(path: Path) -> None:
    app, screen, lang = path.stem.split("__")
    sc = scenario_for(app)
    nodes = parse_screen(path.read_text(encoding="utf-8"))
    assert nodes, path
    assert recognise(sc, nodes, Resolver(load_table(), app, lang), {"contact": "Alice"}) == screen


def test_context_tells_the_right_chat_from_another() -> None:
    sc = scenario_for("signal")
    nodes = parse_screen((SCREENS / "signal__conversation__en.xml").read_text())
    res = Resolver(load_table(), "signal", "en")
    ctx = sc.screens["conversation"].context
    assert ctx is not None
    from controller.scenario import fill_selector

    assert res.find(nodes, fill_selector(ctx, {"contact": "Alice"})) is not None
    assert res.find(nodes, fill_selector(ctx, {"contact": "Bob"})) is None


# ----------------------------------------------------------------------------- runner


def test_chat_from_a_stopped_app_is_verified_sent(tmp_path: Path) -> None:
    fake = FakeWhatsApp()
    r = run(fake, "chat", tmp=tmp_path)
    rep = r.report()
    assert rep["verified"] is True, rep
    assert rep["role"] == "solo" and rep["peer"] is None
    assert rep["app_version"] == "2.26.2.70" and rep["locale"] == "en-US"
    assert [s["ok"] for s in rep["steps"]] == [True] * len(rep["steps"])
    sent = [s for s in rep["steps"] if s["step"].startswith("sent")]
    assert len(sent) == 2 and all("status" in s["matched"] for s in sent)
    assert sent[0]["screen"] == "conversation"
    assert [m["text"] for m in fake.messages] == ["hello from flowtruth t0k",
                                                  "hello from flowtruth t0k (2)"]
    assert any(c.startswith("am start -W -n com.whatsapp/") for c in fake.link.commands)
    assert not (tmp_path / LAST_SCREEN_FILE).exists()


def test_goto_gets_there_from_another_chat_and_an_open_picker() -> None:
    fake = FakeWhatsApp(start="media_picker")
    fake.chat = "Bob"
    r = run(fake, "chat")
    assert r.report()["verified"]
    assert fake.chat == "Alice"
    way = r.log[0]["detail"]
    assert "back" in way and "chat_list->conversation" in way


def test_interruptions_are_dismissed_on_the_way_and_mid_session() -> None:
    fake = FakeWhatsApp(interruptions=["permission", "rating", "battery"])
    r = run(fake, "chat")
    rep = r.report()
    assert rep["verified"] is True
    assert sorted(rep["interruptions"]) == ["battery optimisation prompt", "not-now dialog",
                                            "permission prompt"]
    assert not fake.interruptions and fake.dialog is None


def test_a_message_that_never_leaves_fails_with_the_reason_and_the_last_screen(
        tmp_path: Path) -> None:
    fake = FakeWhatsApp(never_sent=True)
    sc = scenario_for("whatsapp")
    steps = sc.steps("chat", {"token": "x1"})
    r = ScenarioRunner(fake.link, sc, wait_scale=FAST, retry_delay=0, poll_s=0.01,
                       run_dir=tmp_path)
    r.run(steps[:4])  # goto, tap, type, send
    from controller.scenario import Sent, Step

    with pytest.raises(ScenarioFailed, match=r"'hello from flowtruth x1' did not reach the sent "
                                             r"state within 0.2 s \(screen: conversation\)"):
        r.run([Step("sent", Sent(text="hello from flowtruth x1", timeout=0.2))])
    rep = r.report()
    assert rep["verified"] is False and "did not reach the sent state" in rep["reason"]
    saved = (tmp_path / LAST_SCREEN_FILE).read_text()
    assert "hello from flowtruth x1" in saved and "Pending" in saved
    assert rep["steps"][-1]["ok"] is False


def test_german_phone_uses_the_german_strings() -> None:
    fake = FakeWhatsApp(locale="de-DE", interruptions=["rating"])
    r = run(fake, "audio_call", role="caller")
    rep = r.report()
    assert rep["verified"] is True and rep["locale"] == "de-DE"
    assert fake.strs["call_confirm"] == "ANRUFEN" and "call confirmation" in rep["interruptions"]
    assert "not-now dialog" in rep["interruptions"]


def test_caller_call_is_verified_connected_and_hung_up() -> None:
    fake = FakeWhatsApp()
    r = run(fake, "audio_call", role="caller")
    rep = r.report()
    assert rep["verified"] is True and rep["role"] == "caller" and rep["peer"] == "phone2"
    conn = next(s for s in rep["steps"] if s["step"] == "connected")
    assert conn["screen"] == "in_call" and "0:05" in conn["matched"]
    assert any(s["step"] == "hangup" and s["ok"] for s in rep["steps"])
    assert fake.screen == "calls"
    assert "call confirmation" in rep["interruptions"]


def test_unanswered_call_fails_verification_and_keeps_the_screen(tmp_path: Path) -> None:
    fake = FakeWhatsApp(peer_answers_after=None)
    sc = scenario_for("whatsapp")
    steps = sc.steps("audio_call", {"answer_timeout": "0.3"}, role="caller")
    r = ScenarioRunner(fake.link, sc, role="caller", peer="phone2", wait_scale=FAST,
                       retry_delay=0, poll_s=0.01, run_dir=tmp_path)
    with pytest.raises(ScenarioFailed, match=r"the call was not connected within 0.3 s \(last "
                                             r"screen: outgoing_call\); did phone2 answer\?"):
        r.run(steps)
    rep = r.report()
    assert rep["verified"] is False and "did phone2 answer?" in rep["reason"]
    assert "Calling…" in (tmp_path / LAST_SCREEN_FILE).read_text()


def test_solo_call_is_placed_and_says_nobody_answered() -> None:
    fake = FakeWhatsApp(peer_answers_after=None)
    r = run(fake, "audio_call")
    rep = r.report()
    assert rep["verified"] is True
    assert "solo call: placed and ringing, not answered (no peer)" in rep["notes"]


def test_callee_answers_the_incoming_call_and_finds_it_ended_by_the_peer() -> None:
    fake = FakeWhatsApp(incoming_after=2, peer_hangs_up=True)
    sc = scenario_for("whatsapp")
    steps = sc.steps("audio_call", {"call_seconds": "0"}, role="callee")
    r = ScenarioRunner(fake.link, sc, role="callee", peer="phone1", retry_delay=0, poll_s=0)
    r.run(steps[:4])  # goto chat_list, await incoming, answer, connected
    for _ in range(8):  # the hold: the peer hangs up first
        fake.dump()
    r.run(steps[4:])
    rep = r.report()
    assert rep["verified"] is True, rep
    assert [s["step"] for s in rep["steps"]][:4] == ["goto chat_list", "await incoming_call (90s)",
                                                     "tap content_desc='@answer', "
                                                     "class_name='android.widget.Button'",
                                                     "connected"]
    assert "the call had already ended (by the peer)" in rep["notes"]


def test_callee_without_a_call_fails_naming_the_peer() -> None:
    fake = FakeWhatsApp()
    sc = scenario_for("whatsapp")
    steps = sc.steps("audio_call", {"answer_timeout": "0.2"}, role="callee")
    r = ScenarioRunner(fake.link, sc, role="callee", peer="phone1", retry_delay=0, poll_s=0.01)
    with pytest.raises(ScenarioFailed, match=r"incoming_call screen did not come within 0.2 s "
                                             r"\(last screen: chat_list\); did phone1 call\?"):
        r.run(steps)


def test_chat_both_ways() -> None:
    caller = FakeWhatsApp(reply="hello back from flowtruth t0k")
    assert run(caller, "chat", role="caller").report()["verified"]
    callee = FakeWhatsApp()
    callee.messages = [{"text": "hello from flowtruth t0k", "out": False}]
    r = run(callee, "chat", role="callee")
    assert r.report()["verified"]
    assert callee.messages[-1]["text"] == "hello back from flowtruth t0k"


def test_media_goes_through_the_picker_and_review() -> None:
    fake = FakeWhatsApp()
    r = run(fake, "media")
    assert r.report()["verified"]
    assert fake.messages and fake.messages[-1]["text"] == ""
    assert "('screen', 'media_review')" in fake.taps and "('send_media',)" in fake.taps


def test_cannot_reach_a_screen_is_one_clear_failure(tmp_path: Path) -> None:
    fake = FakeWhatsApp()
    fake.contact = "Zed"  # the chat is not in the list
    sc = scenario_for("whatsapp")
    r = ScenarioRunner(fake.link, sc, wait_scale=FAST, retry_delay=0, poll_s=0, run_dir=tmp_path)
    with pytest.raises(ScenarioFailed, match=r"cannot reach the conversation screen \(last "
                                             r"screen: chat_list"):
        r.run(sc.steps("chat", {"contact": "Carol"}))
    assert (tmp_path / LAST_SCREEN_FILE).exists()


# ----------------------------------------------------------------------------- preflight


def test_check_locale_and_version() -> None:
    assert check_locale("de-DE", "signal") is None
    assert check_locale("en-GB", "com.whatsapp") is None
    assert check_locale("", "telegram") is None  # unset: Android's default English
    msg = check_locale("fr-FR", "telegram")
    assert msg is not None and "\n" not in msg
    assert "'fr-FR'" in msg and "add 'fr' texts to" in msg and "selectors.yaml" in msg
    assert check_locale("fr-FR", "com.example.app") is None  # not in the table: no texts used
    assert check_version("2.26.2.70", "whatsapp") is None
    w = check_version("2.25.1.3", "whatsapp")
    assert w is not None and "verified on 2.26" in w
    assert check_version(None, "whatsapp") is None


def test_runner_refuses_a_language_the_table_lacks() -> None:
    fake = FakeWhatsApp(locale="fr-FR")
    with pytest.raises(ScenarioFailed, match="add 'fr' texts"):
        run(fake, "chat")


# ----------------------------------------------------------------------------- hostile files

BASE = "app: t\npackage: com.example.t\nactivity: com.example.t.Main\n"


@pytest.mark.parametrize(("body", "match"), [
    ("activities:\n  chat:\n    - type: {text: '{a.b}'}\n", r"bad placeholder '\{a\.b\}'"),
    ("activities:\n  chat:\n    - type: {text: '{0}'}\n", r"bad placeholder"),
    ("activities:\n  chat:\n    - type: {text: '{a!r:>99999999}'}\n", r"bad placeholder"),
    ("activities:\n  chat:\n    - type: {text: 'x}'}\n", r"single '\}'"),
    ("activities:\n  chat:\n    - tap: {text: '~a(b'}\n", r"not a valid regular expression"),
    ("activities:\n  chat/../../../tmp/x:\n    - key: {key: HOME}\n", r"activity name"),
    ("activities:\n  Chat:\n    - key: {key: HOME}\n", r"activity name"),
    ("params: {a.b: x}\nactivities:\n  chat:\n    - key: {key: HOME}\n", r"parameter name"),
    ("activities:\n  chat:\n    - tap: {id: no_such_thing}\n",
     r"id 'no_such_thing' is not in the selector table"),
    ("activities:\n  chat:\n    - tap: {text: '@no_such_text'}\n",
     r"string 'no_such_text' is not in the selector table"),
    ("activities:\n  chat:\n    - goto: nowhere\n", r"no screen 'nowhere'"),
    ("activities:\n  chat:\n    boss: [{key: {key: HOME}}]\n", r"not a role"),
])
def test_hostile_scenarios_are_one_line_config_errors(tmp_path: Path, body: str, match: str) -> None:
    p = tmp_path / "s.yaml"
    p.write_text(BASE + body)
    with pytest.raises(ConfigError, match=match) as ei:
        load_scenario(p)
    assert "\n" not in ei.value.one_line()


def test_params_given_at_run_time_cannot_inject_placeholders(tmp_path: Path) -> None:
    sc = scenario_for("whatsapp")
    with pytest.raises(ConfigError, match="parameter name"):
        sc.steps("chat", {"a.b": "x"})
    steps = sc.steps("chat", {"contact": "{token}", "message": "{0} {a.b}"})
    assert steps[2].args.text == "{0} {a.b}"  # values are not templates


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "controller.cli", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def test_cli_check_rejects_hostile_files_without_a_traceback(tmp_path: Path) -> None:
    p = tmp_path / "s.yaml"
    p.write_text(BASE + "activities:\n  chat:\n    - type: {text: '{a.b}'}\n")
    r = _cli("scenario", "check", str(p))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "bad placeholder" in r.stderr and len(r.stderr.strip().splitlines()) <= 2


def test_cli_probe_names_the_screen_of_a_saved_dump(tmp_path: Path) -> None:
    r = _cli("scenario", "probe", "saved", "--dump", str(SCREENS / "signal__conversation__de.xml"),
             "--locale", "de-DE")
    assert r.returncode == 0, r.stderr
    assert "screen: conversation (signal)" in r.stdout
    assert "screens.conversation.anchors[0]: id='conversation_title_view'" in r.stdout
    assert "verify.sent: content_desc='@status_sent_or_better', id='delivery_status' -> " \
           "footer_delivery_status desc='Gesendet'" in r.stdout


# ----------------------------------------------------------------------------- through adb


@pytest.fixture(scope="module")
def adb_phone() -> Iterator[tuple]:
    """An emulated phone (the lab's adbd speaking the real ADB protocol) behind a real adb
    server, showing a WhatsApp conversation with a sent message and the peer's reply."""
    adb = shutil.which("adb")
    if adb is None:
        pytest.skip("the Debian adb package is not installed")
    from controller.lab.adbd import EmulatedAdbd
    from controller.lab.toolbox import xiaomi_poco_x3_pro

    with tempfile.TemporaryDirectory(prefix="flowtruth-sctest-") as d:
        home = Path(d) / "home"
        home.mkdir()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = dict(os.environ, HOME=str(home), ANDROID_USER_HOME=str(home / ".android"),
                   TMPDIR=str(home))
        run_ = lambda *a: subprocess.run([adb, "-P", str(port), *a], env=env, timeout=30,  # noqa: E731
                                         capture_output=True, text=True, stdin=subprocess.DEVNULL)
        assert run_("start-server").returncode == 0
        adbd = EmulatedAdbd(xiaomi_poco_x3_pro(), "127.0.0.1", 0, Path(d) / "phone").start()
        try:
            fake = FakeWhatsApp()
            fake.screen, fake.chat = "conversation", "Alice"
            fake.messages = [
                {"text": "hello from flowtruth e2e", "out": True, "state": "Delivered"},
                {"text": "hello back from flowtruth e2e", "out": False}]
            from tests.scenario_fakes import render

            xml, _ = render(fake.roots())
            rt.update_state(adbd.state_dir, lambda s: s.__setitem__("screens", {"com.whatsapp": xml}))
            r = run_("connect", adbd.address)
            assert "connected" in r.stdout, r
            yield adbd, port, env
        finally:
            run_("disconnect", adbd.address)
            adbd.stop()
            run_("kill-server")


def test_cli_probe_and_try_through_the_real_adb_server(adb_phone, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    adbd, port, env = adb_phone
    rt.update_state(adbd.state_dir, lambda s: s.__setitem__(
        "foreground", {"package": "com.whatsapp", "activity": "com.whatsapp.Conversation"}))
    save = tmp_path / "probe.xml"
    r = _cli("scenario", "probe", adbd.address, "--app", "whatsapp", "--save", str(save),
             "--adb-port", str(port), env=env)
    assert r.returncode == 0, r.stderr
    assert "screen: conversation (whatsapp)" in r.stdout
    assert "com.whatsapp:id/entry" in r.stdout
    nodes = parse_screen(save.read_text())  # the saved dump is a fixture the recogniser reads
    assert recognise(scenario_for("whatsapp"), nodes, Resolver(load_table(), "whatsapp", "en"),
                     {"contact": "Alice"}) == "conversation"
    r = _cli("scenario", "try", adbd.address, "whatsapp", "chat", "--role", "caller",
             "-p", "token=e2e", "--peer", "phone2", "--wait-scale", "0.01",
             "--adb-port", str(port), env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "  5/7 sent 'hello from flowtruth e2e'" in r.stdout
    assert "-> status desc='Delivered'" in r.stdout
    assert "-> message_text text='hello back from flowtruth e2e'" in r.stdout
    assert r.stdout.strip().endswith("verified")
    rep = json.loads(r.stdout.strip().splitlines()[-2])
    assert rep["verified"] is True and rep["role"] == "caller" and rep["peer"] == "phone2"
    events = [json.loads(x) for x in (adbd.state_dir / rt.INPUT_LOG).read_text().splitlines()]
    assert ("text", ["hello from flowtruth e2e"]) in [(e.get("kind"), e.get("args"))
                                                        for e in events]
    # a step that cannot be verified: exit 1, one line, the last screen kept
    r = _cli("scenario", "try", adbd.address, "whatsapp", "chat", "--role", "callee",
             "-p", "token=other", "-p", "reply_timeout=0.5", "--peer", "phone1",
             "--run-dir", str(tmp_path / "run"), "--adb-port", str(port), env=env)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().endswith("no message 'hello from flowtruth other' from phone1 "
                                     "within 0.5 s (screen: conversation)")
    assert "message_text" in (tmp_path / "run" / LAST_SCREEN_FILE).read_text()
    # a screen the app cannot leave: goto gives up after relaunching, in one line
    r = _cli("scenario", "try", adbd.address, "whatsapp", "idle", "--wait-scale", "0.01",
             "--adb-port", str(port), env=env)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "cannot reach the chat_list screen (last screen: conversation; tried:" in r.stderr
    assert "relaunch" in r.stderr


# ----------------------------------------------------------------------------- sessions


def session_phone(fake: FakeWhatsApp) -> FakeWhatsApp:
    """The fake WhatsApp answering everything else a session asks (root, packages, clock)."""
    from tests.test_session import make_fake_phone

    base = make_fake_phone()
    fake.link.on(r"^pm list packages", "package:com.whatsapp versionCode:2262070 uid:10123\n")
    fake.link.responses.extend((p, r) for p, r in base.responses
                               if not p.startswith(("^am start", "^pm list")))
    return fake


def session(tmp_path: Path, fake: FakeWhatsApp, **params: str) -> tuple[Any, dict[str, Any]]:
    from controller import events as ev
    from controller.session import Environment, SessionSpec, run_session

    spec = SessionSpec(serial=fake.link.serial, app="whatsapp", activity="chat",
                       params={"token": "s1", **params}, wait_scale=FAST,
                       scenario=scenario_for("whatsapp"))
    res = run_session(spec, session_phone(fake).link, Environment(runs_root=tmp_path, label=False),
                      ev.RecordingSink())
    return res, json.loads((res.run_dir / "manifest.json").read_text())


def test_session_manifest_records_the_verified_scenario(tmp_path: Path) -> None:
    res, m = session(tmp_path, FakeWhatsApp(interruptions=["permission"]))
    assert res.outcome == "completed", res.error
    sc = m["scenario"]
    assert sc["verified"] is True and sc["role"] == "solo" and sc["peer"] is None
    assert sc["app_version"] == "2.26.2.70" and sc["locale"] == "en-US"
    assert [s["n"] for s in sc["steps"]] == list(range(1, 11))
    assert sc["steps"][4] == {"n": 5, "step": "sent 'hello from flowtruth s1'",
                              "screen": "conversation", "matched": sc["steps"][4]["matched"],
                              "ok": True}
    assert sc["interruptions"] == ["permission prompt"] and sc["log"]


def test_session_with_an_unverified_message_fails_and_keeps_the_screen(tmp_path: Path) -> None:
    res, m = session(tmp_path, FakeWhatsApp(never_sent=True), sent_timeout="0.5")
    assert res.outcome == "failed"
    assert "did not reach the sent state within 0.5 s" in (res.error or "")
    assert m["scenario"]["verified"] is False
    assert "did not reach the sent state" in m["scenario"]["reason"]
    assert (res.run_dir / LAST_SCREEN_FILE).exists()


def test_session_preflight_refuses_a_language_the_table_lacks(tmp_path: Path) -> None:
    res, m = session(tmp_path, FakeWhatsApp(locale="pt-BR"))
    assert res.outcome == "failed"
    assert "the phone's language is 'pt-BR'" in (res.error or "")
    assert "add 'pt' texts to" in (res.error or "")
    assert "\n" not in (res.error or "")


def test_session_preflight_warns_about_another_app_version(tmp_path: Path) -> None:
    res, m = session(tmp_path, FakeWhatsApp(version="2.25.9.1"))
    assert res.outcome == "completed", res.error
    w = [p for p in m["preflight"] if p["check"] == "app_version"]
    assert w and "verified on 2.26" in w[0]["message"]


def test_goto_leaves_the_wrong_chat_on_the_way_to_a_screen_below_it() -> None:
    fake = FakeWhatsApp(start="media_picker")
    fake.chat = "Bob"  # a picker opened in Bob's chat must not send Alice's photo to Bob
    r = run(fake, "media")
    assert r.report()["verified"]
    assert fake.chat == "Alice" and fake.messages[-1]["text"] == ""
