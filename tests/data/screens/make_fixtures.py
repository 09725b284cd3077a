"""Writes the constructed screen dumps in this directory (``APP__SCREEN__LANG.xml``).

They are built from the selector table's ids and strings and the apps' layouts as
controller/scenarios/selectors.yaml describes them (Signal: the conversation's name in the
child ``title`` of ``conversation_title_view``; Telegram: text-only nodes, rows "Name, last
message"; WhatsApp: ids, "Leave call"). A real dump saved with
``flowtruth scenario probe DEVICE --app APP --save tests/data/screens/APP__SCREEN__LANG.xml``
is a valid fixture too: tests/test_scenario_engine.py recognises every file here.

Run: PYTHONPATH=. python tests/data/screens/make_fixtures.py
"""

from __future__ import annotations

from pathlib import Path

from controller.scenario import load_table
from tests.scenario_fakes import FakeWhatsApp, Node, concrete, render

HERE = Path(__file__).resolve().parent
SIG = "org.thoughtcrime.securesms"
TG = "org.telegram.messenger"


def strings(app: str, lang: str) -> dict[str, str]:
    t = load_table()
    return {k: concrete(v[lang]) for sec in ("system", app) for k, v in t.apps[sec].strings.items()}


def signal(lang: str) -> dict[str, list[Node]]:
    t = load_table()
    i = {**t.apps["system"].ids, **t.apps["signal"].ids}
    s = strings("signal", lang)

    def n(cls: str, rid: str = "", text: str = "", desc: str = "", kids=None) -> Node:
        return Node(cls, i[rid] if rid else "", text, desc, None, kids or [], SIG)

    title = n("android.widget.LinearLayout", "conversation_title_view", kids=[
        n("android.widget.TextView", "conversation_title", "Alice 🔇"),
        n("android.widget.TextView", text="Verified")])
    bubble = n("android.widget.FrameLayout", kids=[
        n("android.widget.TextView", "message_body", "hello from flowtruth abc123"),
        n("android.widget.LinearLayout", kids=[
            n("android.widget.TextView", text="Now"),
            n("android.widget.ImageView", "delivery_status", desc=s["status_sent_or_better"])])])
    editor = n("android.widget.EditText", "text_editor", desc="Message")
    conv = [n("android.widget.FrameLayout", kids=[title, bubble, editor,
                                                  n("android.widget.ImageButton", "attach_button")])]
    return {
        "chat_list": [n("android.widget.FrameLayout", kids=[
            n("android.widget.TextView", "chat_list_item_name", "Alice"),
            n("android.widget.TextView", "chat_list_item_name", "Bob"),
            n("android.widget.ImageButton", "chat_list_fab", desc="New chat")])],
        "conversation": conv,
        "media_picker": [n("android.widget.FrameLayout", kids=[
            title, editor, n("androidx.recyclerview.widget.RecyclerView", "media_keyboard_list",
                             kids=[n("android.widget.ImageView", "media_keyboard_item")])])],
        "media_review": [n("android.widget.FrameLayout", kids=[
            n("android.widget.ImageButton", "media_review_send")])],
        "outgoing_call": [n("android.widget.FrameLayout", "call_screen", kids=[
            n("android.widget.TextView", "call_recipient_name", "Alice"),
            n("android.widget.TextView", "call_status", "Ringing…"),
            n("android.widget.ImageView", "end_call", desc=s["end_call"])])],
        "in_call": [n("android.widget.FrameLayout", "call_screen", kids=[
            n("android.widget.TextView", "call_recipient_name", "Alice"),
            n("android.widget.TextView", "call_status", "0:07"),
            n("android.widget.ImageView", "end_call", desc=s["end_call"])])],
        "incoming_call": [n("android.widget.FrameLayout", "call_screen", kids=[
            n("android.widget.TextView", "call_recipient_name", "Alice"),
            n("android.widget.ImageView", "decline_call"),
            n("android.widget.ImageView", "answer_call"),
            n("android.widget.TextView", text=s["answer"])])],
    }


def telegram(lang: str) -> dict[str, list[Node]]:
    s = strings("telegram", lang)

    def n(cls: str, text: str = "", desc: str = "", kids=None) -> Node:
        return Node(cls, "", text, desc, None, kids or [], TG)

    back = n("android.widget.ImageView", desc=s["go_back"])
    header = n("android.widget.FrameLayout", desc="Alice\nlast seen recently",
               kids=[n("android.widget.TextView", "Alice")])
    return {
        "chat_list": [n("android.widget.FrameLayout", kids=[
            n("android.widget.ImageView", desc=s["nav_menu"]),
            n("android.widget.ImageButton", desc=s["search"]),
            n("android.view.ViewGroup", "Alice, hello from flowtruth abc123"),
            n("android.widget.FrameLayout", desc=s["new_message"])])],
        "conversation": [n("android.widget.FrameLayout", kids=[
            back, header, n("android.widget.ImageButton", desc=s["call"]),
            n("android.view.ViewGroup", "hello from flowtruth abc123\n"
              + ("Sent at 12:00, Unread" if lang == "en" else "Gesendet um 12:00, Ungelesen")),
            n("android.widget.EditText", "Message"),
            n("android.widget.ImageView", desc=s["attach_media"])])],
        "profile": [n("android.widget.FrameLayout", kids=[
            back, n("android.widget.TextView", "Alice"),
            n("android.widget.FrameLayout", s["video_call"])])],
        "media_picker": [n("android.widget.FrameLayout", kids=[
            n("android.widget.FrameLayout", s["photo"]), n("android.widget.FrameLayout", s["photo"]),
            n("android.widget.FrameLayout", kids=[n("android.widget.TextView", s["gallery"])])])],
        "media_review": [n("android.widget.FrameLayout", kids=[
            n("android.widget.FrameLayout", s["photo"]),
            n("android.widget.FrameLayout", kids=[n("android.widget.TextView", s["gallery"])]),
            n("android.view.View", desc=s["send"])])],
        "outgoing_call": [n("android.widget.FrameLayout", kids=[
            n("android.widget.TextView", "Alice"), n("android.widget.TextView", "Ringing…"),
            n("android.widget.Button", s["end_call"])])],
        "in_call": [n("android.widget.FrameLayout", kids=[
            n("android.widget.TextView", "Alice"), n("android.widget.TextView", "00:12"),
            n("android.widget.FrameLayout", desc=s["mute"]),
            n("android.widget.Button", s["end_call"])])],
        "incoming_call": [n("android.widget.FrameLayout", kids=[
            n("android.widget.TextView", "Alice"),
            n("android.widget.FrameLayout", desc=s["decline"]),
            n("android.widget.FrameLayout", desc=s["answer"])])],
    }


def whatsapp(lang: str) -> dict[str, list[Node]]:
    out = {}
    for screen, setup in {
        "chat_list": {}, "calls": {}, "conversation": {"chat": "Alice"},
        "media_picker": {}, "media_review": {}, "outgoing_call": {}, "in_call": {},
        "incoming_call": {},
    }.items():
        fake = FakeWhatsApp(locale=lang)
        fake.screen = screen
        fake.chat = setup.get("chat")
        if screen == "conversation":
            fake.messages = [{"text": "hello from flowtruth abc123", "out": True,
                              "state": fake.s("status_sent_or_better")}]
        out[screen] = fake.roots()
    return out


def main() -> None:
    for app, build in (("signal", signal), ("telegram", telegram), ("whatsapp", whatsapp)):
        for lang in ("en", "de"):
            for screen, roots in build(lang).items():
                xml, _ = render(roots)
                (HERE / f"{app}__{screen}__{lang}.xml").write_text(xml + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
