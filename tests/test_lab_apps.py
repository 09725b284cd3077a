"""The simulated messengers' screens and moves (controller.lab.app_ui), without a lab.

The screens must carry the real apps' ids and strings: every id and string of the
scenarios' table (controller/scenarios/selectors.yaml) shows up on some lab screen, in
English and German, and the screens have the real apps' structure.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from controller.lab import app_ui as ui

TABLE = Path(__file__).resolve().parents[1] / "controller" / "scenarios" / "selectors.yaml"
APPS = {"signal": ui.SIGNAL, "telegram": ui.TELEGRAM, "whatsapp": ui.WHATSAPP}
CONTACTS = ["Bob", "Zoe"]


def _view(
    package: str, lang: str = "en", typed: str = "", st: dict[str, Any] | None = None
) -> ui.View:
    v = ui.View(package, lang, list(CONTACTS), now=67.0)
    if typed and st is not None:  # focus the screen's first text field and type into it
        for node in ui.render(st, v)[0][0].walk():
            if "EditText" in node.cls:
                x1, y1, x2, y2 = node.bounds
                v.field = {"bounds": f"[{x1},{y1}][{x2},{y2}]", "text": typed}
                break
    return v


def nodes(st: dict[str, Any], package: str, lang: str = "en", typed: str = "") -> list[ET.Element]:
    xml = ui.document(ui.render(st, _view(package, lang, typed, st)))
    return list(ET.fromstring(xml.split("?>", 1)[1]).iter("node"))


def find(ns: list[ET.Element], **want: str) -> ET.Element | None:
    names = {"rid": "resource-id", "desc": "content-desc", "cls": "class"}
    for n in ns:
        if all(
            re.search(v[1:], n.get(names.get(k, k), ""))
            if v.startswith("~")
            else n.get(names.get(k, k)) == v
            for k, v in want.items()
        ):
            return n
    return None


def tap(st: dict[str, Any], package: str, typed: str = "", **want: str) -> list[tuple[str, ...]]:
    """Tap the node's centre: the move's effects (the state changes in place)."""
    v = _view(package, "en", typed, st)
    node = find(nodes(st, package, typed=typed), **want)
    assert node is not None, want
    x1, y1, x2, y2 = map(int, re.findall(r"-?\d+", node.get("bounds", "")))
    action, arg = ui.hit(ui.render(st, v), (x1 + x2) / 2, (y1 + y2) / 2)
    return ui.apply(st, package, action, arg, ui.typed_text(st, v))


def state(**kw: Any) -> dict[str, Any]:
    msgs = [{"id": str(i), "text": f"m{i}", "out": True, "status": s, "t": 0.0}
            for i, s in enumerate(("pending", "sent", "delivered", "read"))]  # fmt: skip
    msgs.append({"id": "in", "text": "hi", "out": False})
    st = ui.new_state()
    st.update(convs={"Bob": msgs}, call_log=["Bob"], **kw)
    return st


def every_screen(package: str, lang: str) -> list[ET.Element]:
    out: list[ET.Element] = []
    screens = ("chat_list", "conversation", "attach", "media_review", "gallery", "profile",
               "calls_tab", "call_search")  # fmt: skip
    for screen in screens:
        for extra in ({}, {"selected": True}, {"media_allowed": False}):
            st = state(screen=screen, contact="Bob", **extra)
            out += nodes(st, package, lang) + nodes(st, package, lang, typed="Bob")
    for call_state in ("calling", "ringing", "incoming", "connected", "ended"):
        for video in (False, True):
            call = {"state": call_state, "peer": "Bob", "video": video, "connected_at": 0.0,
                    "reason": "no_answer"}  # fmt: skip
            out += nodes(state(screen="conversation", contact="Bob", call=call), package, lang)
    dialogs: list[dict[str, Any]] = [{"kind": "rating"}, {"kind": "whats_new"}]
    dialogs += [
        {"kind": "permission", "what": w} for w in ("notifications", "microphone", "photos")
    ]
    if package == ui.WHATSAPP:
        dialogs += [
            {"kind": "call_confirm", "video": False},
            {"kind": "call_confirm", "video": True},
        ]
    for d in dialogs:
        out += nodes(state(dialog=d), package, lang)
    return out


def test_every_string_has_english_and_german() -> None:
    for package, table in ui.STRINGS.items():
        assert set(table["en"]) == set(table["de"]), package
    assert set(ui.PERMISSION_STRINGS["en"]) == set(ui.PERMISSION_STRINGS["de"])
    assert ui.language("de-DE") == "de" and ui.language("de_AT") == "de"
    assert ui.language("fr-FR") == "en" and ui.language(None) == "en"


def test_the_table_of_real_ids_and_strings_is_on_the_lab_screens() -> None:
    yaml = pytest.importorskip("yaml")
    if not TABLE.exists():
        pytest.skip(f"{TABLE} is not in this checkout")
    table = yaml.safe_load(TABLE.read_text(encoding="utf-8"))
    missing = []
    for app, spec in table["apps"].items():
        packages = [APPS[app]] if app in APPS else list(ui.MESSENGERS)
        for lang in table.get("locales", ["en", "de"]):
            shown = [n for p in packages for n in every_screen(p, lang)]
            ids = {n.get("resource-id") for n in shown}
            for name, entry in (spec.get("ids") or {}).items():
                if entry["id"] not in ids:
                    missing.append(f"{app} id {name} {entry['id']}")
            for name, entry in (spec.get("strings") or {}).items():
                want = str(entry[lang])
                texts = [t for n in shown for t in (n.get("text", ""), n.get("content-desc", ""))]
                if want.startswith("~"):
                    ok = any(re.search(want[1:], t) for t in texts)
                else:
                    ok = want in texts
                if not ok:
                    missing.append(f"{app} {lang} string {name} {want!r}")
    assert missing == []


def test_signal_title_container_and_send_attach_toggle() -> None:
    st = state(screen="conversation", contact="Bob")
    ns = nodes(st, ui.SIGNAL)
    title = find(ns, rid=f"{ui.SIGNAL}:id/conversation_title_view")
    assert title is not None and title.get("text") == ""
    assert [c.get("text") for c in title if c.get("resource-id") == f"{ui.SIGNAL}:id/title"] == [
        "Bob"
    ]
    assert find(ns, rid=f"{ui.SIGNAL}:id/attach_button") is not None
    assert find(ns, rid=f"{ui.SIGNAL}:id/send_button") is None
    typed = nodes(st, ui.SIGNAL, typed="hello")
    assert find(typed, rid=f"{ui.SIGNAL}:id/send_button", desc="Send") is not None
    assert find(typed, rid=f"{ui.SIGNAL}:id/attach_button") is None
    assert tap(st, ui.SIGNAL, typed="hello", rid=f"{ui.SIGNAL}:id/send_button") == [
        ("send_text", "hello")
    ]
    # delivery states as the bubbles' status images describe them
    descs = [
        n.get("content-desc")
        for n in ns
        if n.get("resource-id") == f"{ui.SIGNAL}:id/footer_delivery_status"
    ]
    assert descs == ["Pending", "Sent", "Delivered", "Read"]
    de = [n.get("content-desc") for n in nodes(st, ui.SIGNAL, "de")
          if n.get("resource-id") == f"{ui.SIGNAL}:id/footer_delivery_status"]  # fmt: skip
    assert de == ["Ausstehend", "Gesendet", "Zugestellt", "Gelesen"]


def test_signal_media_flow_attach_keyboard_then_review() -> None:
    st = state(screen="conversation", contact="Bob", media_allowed=False)
    tap(st, ui.SIGNAL, rid=f"{ui.SIGNAL}:id/attach_button")
    assert st["screen"] == "attach"
    tap(st, ui.SIGNAL, rid=f"{ui.SIGNAL}:id/attachment_keyboard_permission_button")
    assert st["dialog"] == {"kind": "permission", "what": "photos"}
    tap(st, ui.SIGNAL, rid="com.android.permissioncontroller:id/permission_allow_button")
    assert st["media_allowed"] is True and st["dialog"] is None
    item = find(nodes(st, ui.SIGNAL), rid=f"{ui.SIGNAL}:id/attachment_keyboard_item_image")
    assert item is not None and item.get("content-desc") == ""  # no content description
    tap(st, ui.SIGNAL, rid=f"{ui.SIGNAL}:id/attachment_keyboard_item_image")
    assert st["screen"] == "media_review"
    assert tap(st, ui.SIGNAL, rid=f"{ui.SIGNAL}:id/send") == [("send_media",)]
    assert st["screen"] == "conversation"


def test_telegram_rows_texts_profile_video_call_and_end_call_button() -> None:
    st = state()
    ns = nodes(st, ui.TELEGRAM)
    assert {n.get("resource-id") for n in ns} == {"", "android:id/content"}  # Telegram: no ids
    row = find(ns, text="~^Bob, ")
    assert row is not None and row.get("text") == "Bob, hi"
    assert find(ns, text="~^Zoe, ") is not None
    tap(st, ui.TELEGRAM, text="~^Bob, ")
    ns = nodes(st, ui.TELEGRAM)
    assert find(ns, desc="Bob\nonline") is not None and find(ns, desc="Send") is None
    assert find(nodes(st, ui.TELEGRAM, typed="x"), desc="Send", cls="android.view.View") is not None
    sent = find(ns, text="~^m1\n")
    assert sent is not None and re.fullmatch(r"m1\nSent \d\d:\d\d, Unread", sent.get("text", ""))
    tap(st, ui.TELEGRAM, desc="Bob\nonline")
    assert st["screen"] == "profile"
    assert tap(st, ui.TELEGRAM, text="Video Call") == [("call", "Bob", "video")]
    st["call"] = {"state": "connected", "peer": "Bob", "video": True, "connected_at": 60.0}
    ns = nodes(st, ui.TELEGRAM)
    assert find(ns, cls="android.widget.Button", text="End Call") is not None
    assert find(ns, desc="End call") is None
    assert find(ns, text="00:07") is not None  # the call's duration: connected
    status = find(ns, text="~Telegram Call$", cls="android.widget.LinearLayout")
    assert status is not None and status[0][0].get("text") == "00:07"
    st["call"]["state"] = "incoming"
    de = nodes(st, ui.TELEGRAM, "de")
    assert find(de, text="Annehmen") is not None and find(de, text="Ablehnen") is not None


def test_telegram_photo_cells_carry_text() -> None:
    st = state(screen="conversation", contact="Bob")
    tap(st, ui.TELEGRAM, desc="Attach media")
    ns = nodes(st, ui.TELEGRAM)
    cell = find(ns, text="Photo")
    assert cell is not None and cell.get("content-desc") == ""
    assert find(ns, desc="Send") is None
    tap(st, ui.TELEGRAM, text="Photo")
    assert tap(st, ui.TELEGRAM, desc="Send") == [("send_media",)]


def test_whatsapp_calls_tab_search_confirmation_and_leave_call() -> None:
    st = state()
    tap(st, ui.WHATSAPP, rid="com.whatsapp:id/navigation_bar_item_small_label_view", text="Calls")
    calls = find(nodes(st, ui.WHATSAPP), rid="com.whatsapp:id/navigation_bar_item_small_label_view",
                 text="Calls")  # fmt: skip
    assert calls is not None and calls.get("selected") == "true"
    tap(st, ui.WHATSAPP, desc="Search")
    assert st["screen"] == "call_search"
    ns = nodes(st, ui.WHATSAPP, typed="zo")
    assert find(ns, rid="com.whatsapp:id/chat_able_contacts_row_name", text="Zoe") is not None
    assert find(ns, rid="com.whatsapp:id/chat_able_contacts_row_name", text="Bob") is None
    assert tap(st, ui.WHATSAPP, typed="zo", rid="com.whatsapp:id/voice_call") == []
    assert st["dialog"]["kind"] == "call_confirm"
    ns = nodes(st, ui.WHATSAPP)
    assert find(ns, rid="android:id/message", text="Start voice call?") is not None
    assert tap(st, ui.WHATSAPP, rid="android:id/button1", text="Call") == [("call", "Zoe", "audio")]
    st["call"] = {"state": "ringing", "peer": "Zoe", "video": False}
    ns = nodes(st, ui.WHATSAPP)
    end = find(ns, rid="com.whatsapp:id/end_call_button")
    assert end is not None and end.get("content-desc") == "Leave call"
    assert find(ns, rid="com.whatsapp:id/call_status", text="Ringing") is not None
    st["call"] = {"state": "connected", "peer": "Zoe", "video": True, "connected_at": 0.0}
    assert find(nodes(st, ui.WHATSAPP, "de"), rid="com.whatsapp:id/footer_end_call_btn",
                desc="Anruf verlassen") is not None  # fmt: skip


def test_whatsapp_bubbles_and_composer() -> None:
    st = state(screen="conversation", contact="Bob")
    ns = nodes(st, ui.WHATSAPP)
    rows = [n for n in ns if n.get("resource-id") == "com.whatsapp:id/conversation_text_row"]
    assert [r[0].get("text") for r in rows] == ["m0", "m1", "m2", "m3", "hi"]
    assert [r[1].get("content-desc") for r in rows[:4]] == ["Pending", "Sent", "Delivered", "Read"]
    assert len(rows[4]) == 1  # an incoming message has no status
    assert find(ns, rid="com.whatsapp:id/send") is None
    assert find(nodes(st, ui.WHATSAPP, typed="x"), rid="com.whatsapp:id/send") is not None


def test_dialogs_are_modal_and_back_moves_back() -> None:
    st = state(screen="conversation", contact="Bob", dialog={"kind": "rating"})
    assert tap(st, ui.SIGNAL, rid=f"{ui.SIGNAL}:id/menu_call_secure") == []  # covered
    assert st["dialog"] is not None
    tap(st, ui.SIGNAL, rid="android:id/button2", text="No thanks")
    assert st["dialog"] is None
    assert tap(st, ui.SIGNAL, rid=f"{ui.SIGNAL}:id/menu_call_secure") == [("call", "Bob", "audio")]
    st["dialog"] = {"kind": "permission", "what": "notifications"}
    assert ui.back(st, ui.SIGNAL) and st["dialog"] is not None  # not cancelable
    st["dialog"] = None
    st["screen"] = "media_review"
    assert ui.back(st, ui.WHATSAPP) and st["screen"] == "gallery"
    assert ui.back(st, ui.WHATSAPP) and st["screen"] == "attach"
    assert ui.back(st, ui.WHATSAPP) and st["screen"] == "conversation"
    assert ui.back(st, ui.WHATSAPP) and st["screen"] == "chat_list" and st["contact"] is None
    assert not ui.back(st, ui.WHATSAPP)  # out of the app
    fresh = ui.cold_start({**st, "screen": "conversation", "media_allowed": True})
    assert fresh["screen"] == "chat_list" and fresh["convs"] == st["convs"]
    assert fresh["media_allowed"] is True


def test_call_screens_per_state() -> None:
    for call_state, status in (("calling", "Calling…"), ("ringing", "Ringing…"),
                               ("connected", "01:07"), ("ended", "No answer")):  # fmt: skip
        call = {"state": call_state, "peer": "Bob", "connected_at": 0.0, "reason": "no_answer"}
        ns = nodes(state(call=call), ui.SIGNAL)
        assert find(ns, rid=f"{ui.SIGNAL}:id/call_screen_status", text=status) is not None
        assert find(ns, rid=f"{ui.SIGNAL}:id/call_screen_recipient_name", text="Bob") is not None
    ns = nodes(state(call={"state": "incoming", "peer": "Bob"}), ui.SIGNAL, "de")
    assert find(ns, rid=f"{ui.SIGNAL}:id/call_screen_answer_call", desc="Annehmen") is not None
    assert find(ns, rid=f"{ui.SIGNAL}:id/call_screen_end_call") is None


def test_lab_up_locale_options_and_bad_input() -> None:
    import subprocess
    import sys

    from controller.commands.lab import phone_options
    from controller.errors import ConfigError

    assert phone_options(3, ["phone2=de-DE"], None) == {2: {"locale": "de-DE"}}
    assert phone_options(2, ["de-DE"], 0.0) == {
        1: {"interruption_rate": 0.0, "locale": "de-DE"},
        2: {"interruption_rate": 0.0, "locale": "de-DE"},
    }
    for bad in ("phone3=de-DE", "phone2=German", "tablet=de-DE"):
        with pytest.raises(ConfigError):
            phone_options(2, [bad], None)
    root = Path(__file__).resolve().parents[1]
    res = subprocess.run(
        [sys.executable, "-m", "controller.cli", "lab", "up", "-n", "2", "--locale", "phone7=de-DE"],
        capture_output=True, text=True, cwd=root, timeout=60,
    )  # fmt: skip
    assert res.returncode == 2
    assert (
        res.stderr.strip().splitlines()[-1].startswith("flowtruth: error: --locale 'phone7=de-DE'")
    )
    assert "Traceback" not in res.stderr
