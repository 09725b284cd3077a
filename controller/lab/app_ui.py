"""The simulated messengers' user interface: screens built from the real apps' layouts.

Pure functions over a JSON-able *UI state* per app (kept by the app manager in
:mod:`controller.lab.apps` and saved in the phone's ``state.json`` under ``app_ui``):

- :func:`render` turns the state into the nodes ``uiautomator dump`` shows (the app's
  window and, on top of it, a dialog window when one is open);
- :func:`hit` says which action a tap at (x, y) triggers (only the dialog's buttons
  while a dialog is open: dialogs are modal);
- :data:`STRINGS` holds every text and content description per app and language
  (``en``, ``de``); ids do not change with the language.

The screens follow the real apps (``../shared/spec/app-ui.md``; Signal-Android's layouts,
puma's verified WhatsApp and Telegram selectors):

Signal: chat list rows with ``conversation_list_item_name``; the conversation's toolbar
``conversation_title_view`` is a container without text whose child ``title`` holds the
contact's name; ``menu_video_secure``/``menu_call_secure``; ``embedded_text_editor`` and
one send/attach toggle (``send_button`` only while text is typed, else ``attach_button``);
the attachment keyboard's media items have no content description, the media review
screen sends with ``send``; bubbles ``conversation_item_body`` with a
``footer_delivery_status`` image whose description is the delivery state; call screen
``call_screen_*`` (hang-up "End call", incoming answer/decline, status: ringing, then the
call's duration).

Telegram: no resource ids; chat rows are one node with the text ``"Name, last message"``;
the chat header is a FrameLayout described ``"Name\\nstatus"`` holding the name's
TextView; "Call" (ImageButton), "Attach media" (ImageView), "Send" (a View, only while
text is typed); the attach sheet's photo cells carry the *text* "Photo"; a video call
starts from the profile screen (tap the header, then "Video Call"); the call screen's
hang-up is a Button with the text "End Call", incoming calls show "Accept"/"Decline".

WhatsApp: ``conversations_row_contact_name`` rows; bottom tabs
``navigation_bar_item_small_label_view`` ("Chats", "Calls"...); calls from the Calls
tab: rows ``contact_name`` with ``voice_call``/``video_call`` buttons, followed by a
confirmation dialog (``android:id/button1``); conversation ``conversation_contact_name``,
``entry``, ``send`` (only while text is typed), ``input_attach_button``; attach sheet
``pickfiletype_gallery_holder`` -> gallery ``grid`` -> media preview ``send``; bubbles
``conversation_text_row`` with ``message_text`` and a ``status`` image described
"Sent"/"Delivered"/"Read"; call screen ``call_screen`` with ``title``, hang-up
``end_call_button``/``footer_end_call_btn`` described "Leave call", incoming
"Answer"/"Decline" Buttons.

Interruptions: a runtime permission prompt (``com.android.permissioncontroller:id/
permission_allow_button``/``permission_deny_button``) or the app's rating dialog
(``android:id/button1..3``) can cover any screen; while one is open no other tap works.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from controller.lab import toolbox_runtime as rt

SIGNAL, TELEGRAM, WHATSAPP = "org.thoughtcrime.securesms", "org.telegram.messenger", "com.whatsapp"
MESSENGERS = (SIGNAL, TELEGRAM, WHATSAPP)
PERMISSION_PACKAGE = "com.google.android.permissioncontroller"
PERMISSION_IDS = "com.android.permissioncontroller"
LANGUAGES = ("en", "de")

# Every text and content description the simulated apps show, per language.
STRINGS: dict[str, dict[str, dict[str, str]]] = {
    SIGNAL: {
        "en": {
            "app_title": "Signal",
            "new_chat": "New chat",
            "navigate_up": "Navigate up",
            "editor_hint": "Signal message",
            "send": "Send",
            "attach": "Add attachment",
            "voice_call": "Signal call",
            "video_call": "Signal video call",
            "gallery": "Gallery",
            "file": "File",
            "allow_access": "Allow access",
            "add_message": "Add a message",
            "media": "Photo",
            "pending": "Pending",
            "sent": "Sent",
            "delivered": "Delivered",
            "read": "Read",
            "end_call": "End call",
            "answer": "Answer",
            "decline": "Decline",
            "calling": "Calling…",
            "ringing": "Ringing…",
            "incoming_audio": "Signal voice call",
            "incoming_video": "Signal video call",
            "call_ended": "Call ended",
            "no_answer": "No answer",
            "declined": "Call declined",
            "busy": "User is busy",
            "rate_title": "Rate this app",
            "rate_message": "If you enjoy using this app, please take a moment to help us by "
            "rating it.",
            "rate_now": "Rate now!",
            "rate_no": "No thanks",
            "rate_later": "Later",
        },
        "de": {
            "app_title": "Signal",
            "new_chat": "Neuer Chat",
            "navigate_up": "Nach oben",
            "editor_hint": "Signal-Nachricht",
            "send": "Senden",
            "attach": "Anhang hinzufügen",
            "voice_call": "Signal-Anruf",
            "video_call": "Signal-Videoanruf",
            "gallery": "Galerie",
            "file": "Datei",
            "allow_access": "Zugriff erlauben",
            "add_message": "Nachricht hinzufügen",
            "media": "Foto",
            "pending": "Ausstehend",
            "sent": "Gesendet",
            "delivered": "Zugestellt",
            "read": "Gelesen",
            "end_call": "Anruf beenden",
            "answer": "Annehmen",
            "decline": "Ablehnen",
            "calling": "Anrufen …",
            "ringing": "Klingelt …",
            "incoming_audio": "Signal-Sprachanruf",
            "incoming_video": "Signal-Videoanruf",
            "call_ended": "Anruf beendet",
            "no_answer": "Keine Antwort",
            "declined": "Anruf abgelehnt",
            "busy": "Teilnehmer ist besetzt",
            "rate_title": "Diese App bewerten",
            "rate_message": "Falls dir diese App gefällt, nimm dir bitte einen Moment Zeit, "
            "um uns mit einer Bewertung zu unterstützen.",
            "rate_now": "Jetzt bewerten!",
            "rate_no": "Nein danke",
            "rate_later": "Später",
        },
    },
    TELEGRAM: {
        "en": {
            "app_title": "Telegram",
            "new_message": "New Message",
            "search": "Search",
            "nav_menu": "Open navigation menu",
            "emoji": "Emoji, stickers, and GIFs",
            "go_back": "Go back",
            "more": "More options",
            "online": "online",
            "no_messages": "joined Telegram",
            "editor_hint": "Message",
            "send": "Send",
            "record": "Record voice message",
            "attach": "Attach media",
            "voice_call": "Call",
            "video_call": "Video Call",
            "profile_call": "Call",
            "gallery": "Gallery",
            "file": "File",
            "location": "Location",
            "media": "Photo",
            "sent_date": "Sent {time}",
            "pending": "Sending",
            "sent": "Unread",
            "delivered": "Unread",
            "read": "Read",
            "call_title": "Telegram Call",
            "end_call": "End Call",
            "speaker": "Speaker",
            "mute": "Mute",
            "answer": "Accept",
            "decline": "Decline",
            "calling": "Requesting...",
            "ringing": "Ringing...",
            "incoming_audio": "Telegram Call",
            "incoming_video": "Telegram Video Call",
            "call_ended": "Call Ended",
            "no_answer": "Call Ended",
            "declined": "Line Busy",
            "busy": "Line Busy",
            "rate_title": "Rate Telegram",
            "rate_message": "Do you like Telegram? Please rate us.",
            "rate_now": "Rate",
            "rate_no": "No thanks",
            "rate_later": "Later",
        },
        "de": {
            "app_title": "Telegram",
            "new_message": "Neue Nachricht",
            "search": "Suche",
            "nav_menu": "Navigationsmenü öffnen",
            "emoji": "Emoji, Sticker und GIFs",
            "go_back": "Zurück",
            "more": "Weitere Optionen",
            "online": "online",
            "no_messages": "ist Telegram beigetreten",
            "editor_hint": "Nachricht",
            "send": "Senden",
            "record": "Sprachnachricht aufnehmen",
            "attach": "Medien anhängen",
            "voice_call": "Anrufen",
            "video_call": "Videoanruf",
            "profile_call": "Anrufen",
            "gallery": "Galerie",
            "file": "Datei",
            "location": "Standort",
            "media": "Foto",
            "sent_date": "Gesendet {time}",
            "pending": "Wird gesendet",
            "sent": "Ungelesen",
            "delivered": "Ungelesen",
            "read": "Gelesen",
            "call_title": "Telegram-Anruf",
            "end_call": "Auflegen",
            "speaker": "Lautsprecher",
            "mute": "Stummschalten",
            "answer": "Annehmen",
            "decline": "Ablehnen",
            "calling": "Anfrage...",
            "ringing": "Klingelt...",
            "incoming_audio": "Telegram-Anruf",
            "incoming_video": "Telegram-Videoanruf",
            "call_ended": "Anruf beendet",
            "no_answer": "Anruf beendet",
            "declined": "Besetzt",
            "busy": "Besetzt",
            "rate_title": "Telegram bewerten",
            "rate_message": "Gefällt dir Telegram? Bitte bewerte uns.",
            "rate_now": "Bewerten",
            "rate_no": "Nein danke",
            "rate_later": "Später",
        },
    },
    WHATSAPP: {
        "en": {
            "app_title": "WhatsApp",
            "tab_chats": "Chats",
            "tab_updates": "Updates",
            "tab_communities": "Communities",
            "tab_calls": "Calls",
            "new_call": "New call",
            "new_chat": "New chat",
            "search": "Search",
            "navigate_up": "Navigate up",
            "editor_hint": "Message",
            "send": "Send",
            "voice_note": "Voice message",
            "attach": "Attach",
            "voice_call": "Voice call",
            "video_call": "Video call",
            "gallery": "Gallery",
            "document": "Document",
            "caption": "Add a caption…",
            "media": "Photo",
            "pending": "Pending",
            "sent": "Sent",
            "delivered": "Delivered",
            "read": "Read",
            "confirm_audio": "Start voice call?",
            "confirm_video": "Start video call?",
            "confirm_call": "Call",
            "cancel": "Cancel",
            "end_call": "Leave call",
            "answer": "Answer",
            "decline": "Decline",
            "calling": "Calling",
            "ringing": "Ringing",
            "incoming_audio": "WhatsApp voice call",
            "incoming_video": "WhatsApp video call",
            "call_ended": "Call ended",
            "no_answer": "Not answered",
            "declined": "Declined",
            "busy": "On another call",
            "rate_title": "Rate WhatsApp",
            "rate_message": "Enjoying WhatsApp? Rate us on Google Play.",
            "rate_now": "Rate now",
            "rate_no": "No thanks",
            "rate_later": "Not now",
        },
        "de": {
            "app_title": "WhatsApp",
            "tab_chats": "Chats",
            "tab_updates": "Aktuelles",
            "tab_communities": "Communitys",
            "tab_calls": "Anrufe",
            "new_call": "Neuer Anruf",
            "new_chat": "Neuer Chat",
            "search": "Suchen",
            "navigate_up": "Nach oben",
            "editor_hint": "Nachricht",
            "send": "Senden",
            "voice_note": "Sprachnachricht",
            "attach": "Anhängen",
            "voice_call": "Sprachanruf",
            "video_call": "Videoanruf",
            "gallery": "Galerie",
            "document": "Dokument",
            "caption": "Bildunterschrift hinzufügen …",
            "media": "Foto",
            "pending": "Ausstehend",
            "sent": "Gesendet",
            "delivered": "Zugestellt",
            "read": "Gelesen",
            "confirm_audio": "Sprachanruf starten?",
            "confirm_video": "Videoanruf starten?",
            "confirm_call": "Anrufen",
            "cancel": "Abbrechen",
            "end_call": "Anruf verlassen",
            "answer": "Annehmen",
            "decline": "Ablehnen",
            "calling": "Anrufen",
            "ringing": "Klingelt",
            "incoming_audio": "WhatsApp-Sprachanruf",
            "incoming_video": "WhatsApp-Videoanruf",
            "call_ended": "Anruf beendet",
            "no_answer": "Nicht angenommen",
            "declined": "Abgelehnt",
            "busy": "In einem anderen Anruf",
            "rate_title": "WhatsApp bewerten",
            "rate_message": "Gefällt dir WhatsApp? Bewerte uns bei Google Play.",
            "rate_now": "Jetzt bewerten",
            "rate_no": "Nein danke",
            "rate_later": "Nicht jetzt",
        },
    },
}

# The runtime permission prompt (the permission controller's window, not the app's).
PERMISSION_STRINGS: dict[str, dict[str, str]] = {
    "en": {
        "notifications": "Allow {app} to send you notifications?",
        "microphone": "Allow {app} to record audio?",
        "photos": "Allow {app} to access photos and videos on this device?",
        "allow": "Allow",
        "foreground": "While using the app",
        "one_time": "Only this time",
        "deny": "Don’t allow",
    },
    "de": {
        "notifications": "{app} erlauben, dir Benachrichtigungen zu senden?",
        "microphone": "{app} erlauben, Audioaufnahmen zu machen?",
        "photos": "{app} Zugriff auf Fotos und Videos auf diesem Gerät erlauben?",
        "allow": "Zulassen",
        "foreground": "Während der App-Nutzung",
        "one_time": "Nur dieses Mal",
        "deny": "Nicht zulassen",
    },
}
# An app's "what's new" sheet (an AlertDialog acknowledged with button1).
WHATS_NEW_STRINGS: dict[str, dict[str, str]] = {
    "en": {"title": "What’s new", "message": "Calls and chats got faster.", "ok": "Got it"},
    "de": {"title": "Neuigkeiten", "message": "Anrufe und Chats sind schneller.",
           "ok": "Verstanden"},
}  # fmt: skip
INTERRUPTIONS = ("notifications", "microphone", "rating", "whats_new")
LABELS = {SIGNAL: "Signal", TELEGRAM: "Telegram", WHATSAPP: "WhatsApp"}

# Screens and where BACK leads from them ("" = out of the app, to the launcher).
HOME_SCREEN = "chat_list"
PARENT = {
    "chat_list": "",
    "calls_tab": "chat_list",
    "call_search": "calls_tab",
    "conversation": "chat_list",
    "attach": "conversation",
    "gallery": "attach",
    "media_review": "attach",
    "profile": "conversation",
}
ENDED_LINGER_S = 2.5
AUTOFOCUS = ("call_search",)  # screens that open with their text field focused


def language(locale: str | None) -> str:
    """The table language for an Android locale tag (``de-DE`` -> ``de``; unknown -> ``en``)."""
    lang = (locale or "en").replace("_", "-").split("-")[0].lower()
    return lang if lang in LANGUAGES else "en"


def strings(package: str, lang: str) -> dict[str, str]:
    return STRINGS[package][lang if lang in LANGUAGES else "en"]


def new_state() -> dict[str, Any]:
    """A freshly started app: its main screen, no call, no dialog."""
    return {"screen": HOME_SCREEN, "contact": None, "call": None, "dialog": None,
            "selected": False, "return_to": None}  # fmt: skip


def cold_start(ui: dict[str, Any], keep_call: bool = False) -> dict[str, Any]:
    """A (re)started process: the main screen; the app's data (conversations) is kept, and
    with ``keep_call`` an incoming call that started the process."""
    fresh = new_state()
    fresh["convs"] = ui.get("convs", {})
    fresh["call_log"] = ui.get("call_log", [])
    if "media_allowed" in ui:  # a permission outlives the process
        fresh["media_allowed"] = ui["media_allowed"]
    call = ui.get("call")
    if keep_call and call and call.get("state") == "incoming":
        fresh["call"] = {**call, "return_to": HOME_SCREEN}
    return fresh


def clock(t: float) -> str:
    """A call's duration as the apps show it (``00:07``, ``1:02:03``)."""
    s = max(0, int(t))
    h, rest = divmod(s, 3600)
    m, sec = divmod(rest, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m:02d}:{sec:02d}"


# --------------------------------------------------------------------------- nodes


@dataclass
class Node:
    """One view of a simulated screen; ``action`` is what a tap on it does."""

    cls: str
    bounds: tuple[int, int, int, int]
    rid: str = ""  # "send" -> "<package>:id/send"; ids with ':' are used as they are
    text: str = ""
    desc: str = ""
    action: str = ""
    arg: str = ""
    children: list[Node] = field(default_factory=list)
    package: str = ""
    checked: bool = False
    clickable: bool | None = None
    selected: bool = False

    def walk(self) -> list[Node]:
        out = [self]
        for c in self.children:
            out.extend(c.walk())
        return out


def _xml(node: Node, package: str, index: int = 0) -> str:
    pkg = node.package or package
    rid = node.rid if (":" in node.rid or not node.rid) else f"{pkg}:id/{node.rid}"
    if node.rid and ":" not in node.rid and pkg == PERMISSION_PACKAGE:
        rid = f"{PERMISSION_IDS}:id/{node.rid}"
    clickable = bool(node.action) if node.clickable is None else node.clickable
    xml = rt.make_node(
        node.cls, pkg, node.bounds, text=node.text, resource_id=rid, content_desc=node.desc,
        clickable=clickable, index=index,
        children=[_xml(c, pkg, i) for i, c in enumerate(node.children)],
    )  # fmt: skip
    if node.checked:
        xml = xml.replace('checked="false"', 'checked="true"', 1).replace(
            'checkable="false"', 'checkable="true"', 1
        )
    if node.selected:
        xml = xml.replace('selected="false"', 'selected="true"', 1)
    return xml


def document(windows: list[tuple[Node, str]]) -> str:
    """The ``uiautomator dump`` document of the windows (bottom first)."""
    return rt.make_hierarchy([_xml(n, pkg) for n, pkg in windows])


def hit(windows: list[tuple[Node, str]], x: float, y: float) -> tuple[str, str]:
    """(action, arg) of the topmost clickable node at (x, y) of the top window."""
    if not windows:
        return "", ""
    top = windows[-1][0]
    found = ("", "")
    for node in top.walk():
        x1, y1, x2, y2 = node.bounds
        if node.action and x1 <= x < x2 and y1 <= y < y2:
            found = (node.action, node.arg)
    return found


# --------------------------------------------------------------------------- rendering


@dataclass
class View:
    """What a render needs besides the app's state."""

    package: str
    lang: str
    contacts: list[str]
    width: int = 1080
    height: int = 2400
    now: float = 0.0
    field: dict[str, Any] | None = None  # the focused text field (toolbox state text_fields)

    @property
    def s(self) -> dict[str, str]:
        return strings(self.package, self.lang)

    def typed(self, bounds: tuple[int, int, int, int]) -> str:
        """The text typed into the EditText at ``bounds`` ('' unless it is the focused one)."""
        x1, y1, x2, y2 = bounds
        f = self.field or {}
        return str(f.get("text") or "") if f.get("bounds") == f"[{x1},{y1}][{x2},{y2}]" else ""


def typed_text(ui: dict[str, Any], v: View) -> str:
    """What is typed into the current screen's text field (composer or search)."""
    for root, _pkg in render(ui, v)[:1]:
        for node in root.walk():
            if "EditText" in node.cls and v.typed(node.bounds):
                return v.typed(node.bounds)
    return ""


def _frame(v: View, children: list[Node], rid: str = "android:id/content") -> Node:
    w, h = v.width, v.height
    content = Node("android.widget.FrameLayout", (0, 96, w, h), rid, children=children)
    return Node("android.widget.FrameLayout", (0, 0, w, h), children=[content])


def _last(ui: dict[str, Any], contact: str) -> dict[str, Any] | None:
    msgs = ui.get("convs", {}).get(contact) or []
    return msgs[-1] if msgs else None


def _msg_text(m: dict[str, Any], v: View) -> str:
    return str(m.get("text") or "") if not m.get("media") else v.s["media"]


def render(ui: dict[str, Any], v: View) -> list[tuple[Node, str]]:
    """The windows of the app's current screen, bottom first: (root node, package)."""
    screen = ui.get("screen", HOME_SCREEN)
    if ui.get("call"):
        screen = "call"
    fn = {SIGNAL: _signal, TELEGRAM: _telegram, WHATSAPP: _whatsapp}[v.package]
    windows = [(_frame(v, fn(ui, v, screen)), v.package)]
    dialog = ui.get("dialog")
    if dialog:
        windows.append(_dialog(dialog, v))
    return windows


def _dialog(dialog: dict[str, Any], v: View) -> tuple[Node, str]:
    w, h = v.width, v.height
    kind = dialog.get("kind")
    top, bottom = h // 2 - 330, h // 2 + 330
    if kind == "permission":
        p = PERMISSION_STRINGS[v.lang if v.lang in PERMISSION_STRINGS else "en"]
        what = str(dialog.get("what") or "notifications")
        buttons = (
            [("permission_allow_foreground_only_button", p["foreground"], "allow"),
             ("permission_allow_one_time_button", p["one_time"], "allow"),
             ("permission_deny_button", p["deny"], "deny")]
            if what == "microphone" else
            [("permission_allow_button", p["allow"], "allow"),
             ("permission_deny_button", p["deny"], "deny")]
        )  # fmt: skip
        kids = [Node("android.widget.TextView", (90, top + 60, w - 90, top + 260),
                     "permission_message", text=p[what].format(app=LABELS[v.package]))]  # fmt: skip
        for i, (rid, label, arg) in enumerate(buttons):
            y = top + 300 + i * 130
            kids.append(Node("android.widget.Button", (90, y, w - 90, y + 120), rid, text=label,
                             action="dialog", arg=arg))  # fmt: skip
        panel = Node("android.widget.LinearLayout", (60, top, w - 60, bottom), "grant_dialog",
                     children=kids)  # fmt: skip
        root = Node("android.widget.FrameLayout", (0, 0, w, h), children=[panel])
        return root, PERMISSION_PACKAGE
    s = v.s
    message = s.get("rate_message", "")
    if kind == "call_confirm":
        title = s["confirm_video"] if dialog.get("video") else s["confirm_audio"]
        buttons = [("android:id/button2", s["cancel"], "cancel"),
                   ("android:id/button1", s["confirm_call"], "confirm_call")]  # fmt: skip
    elif kind == "whats_new":
        news = WHATS_NEW_STRINGS[v.lang if v.lang in WHATS_NEW_STRINGS else "en"]
        title, message = news["title"], news["message"]
        buttons = [("android:id/button1", news["ok"], "dialog")]
    else:  # rating
        title = s["rate_title"]
        buttons = [("android:id/button3", s["rate_later"], "dialog"),
                   ("android:id/button2", s["rate_no"], "dialog"),
                   ("android:id/button1", s["rate_now"], "dialog")]  # fmt: skip
    kids = [Node("android.widget.TextView", (110, top + 50, w - 110, top + 150),
                 "android:id/alertTitle" if kind != "call_confirm" else "android:id/message",
                 text=title)]  # fmt: skip
    if kind != "call_confirm":
        kids.append(Node("android.widget.TextView", (110, top + 170, w - 110, top + 400),
                         "android:id/message", text=message))  # fmt: skip
    bw = (w - 200) // len(buttons)
    row = [
        Node("android.widget.Button", (100 + i * bw, bottom - 150, 100 + (i + 1) * bw, bottom - 40),
             rid, text=text, action=action, arg=rid.rsplit("/", 1)[-1])
        for i, (rid, text, action) in enumerate(buttons)
    ]  # fmt: skip
    kids.append(Node("android.widget.LinearLayout", (100, bottom - 150, w - 100, bottom - 40),
                     "android:id/buttonPanel", children=row))  # fmt: skip
    panel = Node("android.widget.FrameLayout", (60, top, w - 60, bottom), "android:id/parentPanel",
                 children=kids)  # fmt: skip
    return Node("android.widget.FrameLayout", (0, 0, w, h), children=[panel]), v.package


def _rows(v: View, top: int, height: int = 190) -> list[tuple[str, tuple[int, int, int, int]]]:
    return [(c, (0, top + i * height, v.width, top + (i + 1) * height))
            for i, c in enumerate(v.contacts)]  # fmt: skip


def _status_key(m: dict[str, Any]) -> str:
    return str(m.get("status") or "pending")


def _bubbles(ui: dict[str, Any], v: View, top: int, bottom: int) -> list[tuple[dict[str, Any],
                                                                             tuple[int, int, int, int]]]:  # fmt: skip
    msgs = (ui.get("convs", {}).get(ui.get("contact") or "") or [])[-8:]
    out = []
    y = bottom - 20
    for m in reversed(msgs):
        h = 150
        x1, x2 = (v.width // 3, v.width - 30) if m.get("out") else (30, v.width * 2 // 3)
        out.append((m, (x1, y - h, x2, y)))
        y -= h + 20
        if y - h < top:
            break
    return list(reversed(out))


def _call_screen(ui: dict[str, Any], v: View, ids: dict[str, str]) -> list[Node]:
    """The call screen of every app (ids and widget classes per app in ``ids``)."""
    s, w, h = v.s, v.width, v.height
    call = ui["call"]
    state = call.get("state")
    if state == "connected":
        since = call.get("connected_at")
        status = clock(v.now - float(v.now if since is None else since))
    elif state == "incoming":
        status = s["incoming_video"] if call.get("video") else s["incoming_audio"]
    elif state == "ended":
        status = s.get(call.get("reason") or "call_ended", s["call_ended"])
    else:
        status = s["ringing"] if state == "ringing" else s["calling"]
    name = str(call.get("peer") or "")
    kids = [
        Node("android.widget.TextView", (80, 300, w - 80, 420), ids.get("name", ""), text=name),
        Node("android.widget.TextView", (80, 430, w - 80, 500), ids.get("status", ""), text=status),
    ]
    if v.package == TELEGRAM:
        # puma: LinearLayout[ends-with(@text, "Telegram Call")]/FrameLayout/TextView = status
        inner = Node("android.widget.FrameLayout", (80, 430, w - 80, 500), children=[kids[1]])
        kids = [kids[0], Node("android.widget.LinearLayout", (80, 300, w - 80, 520),
                              text=f"{s['call_title']}", children=[inner])]  # fmt: skip
    if state == "incoming":
        cls = "android.widget.Button" if v.package != SIGNAL else "android.widget.ImageView"
        as_text = v.package == TELEGRAM  # Telegram's buttons carry text, the others a description
        answer = Node(cls, (w - 330, h - 420, w - 110, h - 200), ids.get("answer", ""),
                      action="answer")  # fmt: skip
        decline = Node(cls, (110, h - 420, 330, h - 200), ids.get("decline", ""), action="decline")
        for node, label in ((answer, s["answer"]), (decline, s["decline"])):
            if as_text:
                node.text = label
            else:
                node.desc = label
        kids += [answer, decline]
        if v.package == SIGNAL:  # the labels under the buttons
            kids += [
                Node("android.widget.TextView", (w - 330, h - 190, w - 110, h - 130),
                     "call_screen_answer_call_label", text=s["answer"]),
                Node("android.widget.TextView", (110, h - 190, 330, h - 130),
                     "call_screen_decline_call_label", text=s["decline"]),
            ]  # fmt: skip
    elif state != "ended":
        if v.package == TELEGRAM:
            kids += [
                Node("android.widget.FrameLayout", (110, h - 420, 330, h - 200), desc=s["speaker"],
                     action="noop"),
                Node("android.widget.FrameLayout", (w - 330, h - 420, w - 110, h - 200),
                     desc=s["mute"], action="noop"),
                Node("android.widget.Button", (w // 2 - 110, h - 420, w // 2 + 110, h - 200),
                     text=s["end_call"], action="hangup"),
            ]  # fmt: skip
        elif v.package == WHATSAPP:
            kids.append(Node("android.widget.LinearLayout", (0, h - 460, w, h - 160),
                             "call_controls", children=[
                                 Node("android.widget.ImageButton",
                                      (w // 2 - 110, h - 420, w // 2 + 110, h - 200),
                                      "footer_end_call_btn" if call.get("video") else "end_call_button",
                                      desc=s["end_call"], action="hangup")]))  # fmt: skip
        else:
            kids.append(Node("android.widget.ImageView",
                             (w // 2 - 110, h - 420, w // 2 + 110, h - 200), "call_screen_end_call",
                             desc=s["end_call"], action="hangup"))  # fmt: skip
    cls = "android.widget.RelativeLayout" if v.package == WHATSAPP else "android.widget.FrameLayout"
    return [Node(cls, (0, 96, w, h), ids.get("root", ""), children=kids)]


def _signal(ui: dict[str, Any], v: View, screen: str) -> list[Node]:
    s, w, h = v.s, v.width, v.height
    if screen == "call":
        return _call_screen(ui, v, {
            "root": "call_screen", "name": "call_screen_recipient_name",
            "status": "call_screen_status", "answer": "call_screen_answer_call",
            "decline": "call_screen_decline_call"})  # fmt: skip
    if screen == "chat_list":
        rows = []
        for name, b in _rows(v, 330):
            last = _last(ui, name)
            rows.append(Node("android.view.ViewGroup", b, "conversation_list_item_view",
                             action="open", arg=name, children=[
                                 Node("android.widget.TextView", (200, b[1] + 30, w - 200, b[1] + 95),
                                      "conversation_list_item_name", text=name),
                                 Node("android.widget.TextView", (200, b[1] + 100, w - 200, b[1] + 160),
                                      "conversation_list_item_summary",
                                      text=_msg_text(last, v) if last else ""),
                             ]))  # fmt: skip
        return [
            Node("android.view.ViewGroup", (0, 96, w, 300), "toolbar", children=[
                Node("android.widget.TextView", (200, 140, w - 300, 250), "toolbar_title",
                     text=s["app_title"])]),
            Node("androidx.recyclerview.widget.RecyclerView", (0, 330, w, h - 200), "list",
                 children=rows),
            Node("android.widget.ImageButton", (w - 230, h - 380, w - 60, h - 210), "fab",
                 desc=s["new_chat"], action="noop"),
        ]  # fmt: skip
    contact = str(ui.get("contact") or "")
    toolbar = Node("android.view.ViewGroup", (0, 96, w, 300), "toolbar", children=[
        Node("android.widget.ImageButton", (0, 110, 140, 280), desc=s["navigate_up"], action="back"),
        Node("android.widget.LinearLayout", (150, 110, w - 330, 280), "conversation_title_view",
             action="noop", children=[
                 Node("android.widget.TextView", (280, 130, w - 330, 200), "title", text=contact)]),
        Node("android.widget.TextView", (w - 320, 110, w - 180, 280), "menu_video_secure",
             desc=s["video_call"], action="call", arg="video"),
        Node("android.widget.TextView", (w - 170, 110, w - 30, 280), "menu_call_secure",
             desc=s["voice_call"], action="call", arg="audio"),
    ])  # fmt: skip
    if screen == "media_review":
        return [
            Node("android.widget.ImageView", (0, 96, w, h - 400), "image", action="noop"),
            Node("android.widget.EditText", (40, h - 330, w - 250, h - 200), "add_a_message_entry",
                 text=s["add_message"], action="noop"),
            Node("android.widget.ImageView", (w - 220, h - 340, w - 40, h - 180), "send",
                 desc=s["send"], action="send_media"),
        ]  # fmt: skip
    bottom = h - 230 if screen != "attach" else h - 1030
    items: list[Node] = [toolbar]
    bubbles = []
    for m, b in _bubbles(ui, v, 320, bottom - 20):
        kids = [Node("android.widget.TextView", (b[0] + 30, b[1] + 20, b[2] - 30, b[3] - 60),
                     "conversation_item_body", text=_msg_text(m, v))]  # fmt: skip
        if m.get("out"):
            kids.append(Node("android.widget.ImageView", (b[2] - 90, b[3] - 55, b[2] - 30, b[3] - 10),
                             "footer_delivery_status", desc=s[_status_key(m)]))  # fmt: skip
        bubbles.append(Node("android.widget.LinearLayout", b, "conversation_item", children=kids))
    items.append(Node("androidx.recyclerview.widget.RecyclerView", (0, 320, w, bottom - 20),
                      "conversation_item_recycler", children=bubbles))  # fmt: skip
    panel = [Node("android.widget.EditText", (40, bottom + 30, w - 200, bottom + 200),
                  "embedded_text_editor", text=s["editor_hint"], action="focus")]  # fmt: skip
    if v.typed(panel[0].bounds):
        panel.append(Node("android.widget.ImageButton", (w - 180, bottom + 30, w - 30, bottom + 200),
                          "send_button", desc=s["send"], action="send_text"))  # fmt: skip
    else:
        panel.append(Node("android.widget.ImageButton", (w - 180, bottom + 30, w - 30, bottom + 200),
                          "attach_button", desc=s["attach"], action="attach"))  # fmt: skip
    items.append(Node("android.widget.LinearLayout", (0, bottom, w, bottom + 230),
                      "input_panel", children=panel))  # fmt: skip
    if screen == "attach":
        media = [Node("android.widget.FrameLayout", (20 + i * 265, h - 780, 265 + i * 265, h - 520),
                      "attachment_keyboard_item_image", action="media_item") for i in range(4)]  # fmt: skip
        if ui.get("media_allowed") is False:  # photos not allowed yet: "Allow access" instead
            media = [Node("android.widget.Button", (200, h - 740, w - 200, h - 560),
                          "attachment_keyboard_permission_button", text=s["allow_access"],
                          action="ask_media")]  # fmt: skip
        buttons = [Node("android.widget.TextView", (20 + i * 265, h - 480, 265 + i * 265, h - 330),
                        "attachment_keyboard_button", text=t, action="noop")
                   for i, t in enumerate((s["gallery"], s["file"]))]  # fmt: skip
        items.append(Node("android.widget.LinearLayout", (0, h - 800, w, h), "attachment_keyboard",
                          children=[Node("androidx.recyclerview.widget.RecyclerView",
                                         (0, h - 800, w, h - 500),
                                         "attachment_keyboard_media_list", children=media),
                                    *buttons]))  # fmt: skip
    return items


def _telegram(ui: dict[str, Any], v: View, screen: str) -> list[Node]:
    s, w, h = v.s, v.width, v.height
    if screen == "call":
        return _call_screen(ui, v, {})
    contact = str(ui.get("contact") or "")
    if screen == "chat_list":
        rows = []
        for name, b in _rows(v, 330):
            last = _last(ui, name)
            summary = _msg_text(last, v) if last else s["no_messages"]
            rows.append(Node("android.view.ViewGroup", b, text=f"{name}, {summary}", action="open",
                             arg=name))  # fmt: skip
        return [
            Node("android.widget.FrameLayout", (0, 96, w, 300), children=[
                Node("android.widget.ImageView", (0, 110, 140, 280), desc=s["nav_menu"],
                     action="noop"),
                Node("android.widget.TextView", (200, 140, w - 300, 250), text=s["app_title"]),
                Node("android.widget.ImageButton", (w - 170, 110, w - 30, 280), desc=s["search"],
                     action="noop")]),
            Node("androidx.recyclerview.widget.RecyclerView", (0, 330, w, h - 200), children=rows),
            Node("android.widget.FrameLayout", (w - 230, h - 380, w - 60, h - 210),
                 desc=s["new_message"], action="noop"),
        ]  # fmt: skip
    header = [
        Node("android.widget.ImageView", (0, 110, 140, 280), desc=s["go_back"], action="back"),
        Node("android.widget.FrameLayout", (150, 110, w - 330, 280),
             desc=f"{contact}\n{s['online']}", action="profile", children=[
                 Node("android.widget.TextView", (280, 130, w - 330, 200), text=contact),
                 Node("android.widget.TextView", (280, 200, w - 330, 260), text=s["online"])]),
    ]  # fmt: skip
    if screen == "profile":
        return [
            Node("android.widget.FrameLayout", (0, 96, w, 300), children=header[:1]),
            Node("android.widget.TextView", (80, 330, w - 80, 430), text=contact),
            Node("android.widget.TextView", (80, 440, w - 80, 500), text=s["online"]),
            Node("android.widget.FrameLayout", (80, 560, w // 2 - 20, 700), action="call",
                 arg="audio", children=[
                     Node("android.widget.TextView", (100, 600, w // 2 - 40, 680),
                          text=s["profile_call"])]),
            Node("android.widget.FrameLayout", (w // 2 + 20, 560, w - 80, 700), action="call",
                 arg="video", children=[
                     Node("android.widget.TextView", (w // 2 + 40, 600, w - 100, 680),
                          text=s["video_call"])]),
        ]  # fmt: skip
    header += [
        Node("android.widget.ImageButton", (w - 320, 110, w - 180, 280), desc=s["voice_call"],
             action="call", arg="audio"),
        Node("android.widget.ImageButton", (w - 170, 110, w - 30, 280), desc=s["more"],
             action="noop"),
    ]  # fmt: skip
    bottom = h - 230 if screen != "attach" else h - 1030
    cells = []
    for m, b in _bubbles(ui, v, 320, bottom - 20):
        text = _msg_text(m, v)
        if m.get("out"):
            stamp = time.strftime("%H:%M", time.localtime(float(m.get("t") or v.now)))
            text = f"{text}\n{s['sent_date'].format(time=stamp)}, {s[_status_key(m)]}"
        cells.append(Node("android.view.ViewGroup", b, text=text))
    items = [
        Node("android.widget.FrameLayout", (0, 96, w, 300), children=header),
        Node("androidx.recyclerview.widget.RecyclerView", (0, 320, w, bottom - 20), children=cells),
        Node("android.widget.ImageView", (20, bottom + 30, 150, bottom + 200), desc=s["emoji"],
             action="noop"),
        Node("android.widget.ImageView", (w - 340, bottom + 30, w - 200, bottom + 200),
             desc=s["attach"], action="attach"),
        Node("android.widget.EditText", (160, bottom + 30, w - 350, bottom + 200),
             text=s["editor_hint"], action="focus"),
    ]  # fmt: skip
    if v.typed(items[-1].bounds):
        items.append(Node("android.view.View", (w - 180, bottom + 30, w - 30, bottom + 200),
                          desc=s["send"], action="send_text"))  # fmt: skip
    else:
        items.append(Node("android.widget.FrameLayout", (w - 180, bottom + 30, w - 30, bottom + 200),
                          desc=s["record"], action="noop"))  # fmt: skip
    if screen == "attach":
        cells = [Node("android.widget.FrameLayout", (20 + i * 265, h - 980, 265 + i * 265, h - 720),
                      text=s["media"], action="media_item", checked=bool(ui.get("selected")) and i == 0)
                 for i in range(4)]  # fmt: skip
        buttons = [Node("android.widget.FrameLayout", (20 + i * 265, h - 420, 265 + i * 265, h - 250),
                        action="noop", children=[Node("android.widget.TextView",
                                                      (40 + i * 265, h - 340, 245 + i * 265, h - 270),
                                                      text=t)])
                   for i, t in enumerate((s["gallery"], s["file"], s["location"]))]  # fmt: skip
        sheet = [Node("androidx.recyclerview.widget.RecyclerView", (0, h - 1000, w, h - 700),
                      children=cells), *buttons]  # fmt: skip
        if ui.get("selected"):
            sheet.append(Node("android.view.View", (w - 220, h - 650, w - 40, h - 470),
                              desc=s["send"], action="send_media"))  # fmt: skip
        items.append(Node("android.widget.FrameLayout", (0, h - 1000, w, h), children=sheet))
    return items


def _whatsapp(ui: dict[str, Any], v: View, screen: str) -> list[Node]:
    s, w, h = v.s, v.width, v.height
    if screen == "call":
        return _call_screen(ui, v, {"root": "call_screen", "name": "title",
                                    "status": "call_status",
                                    "answer": "accept_incoming_call_view",
                                    "decline": "decline_incoming_call_view"})  # fmt: skip
    if screen == "call_search":
        field_b = (160, 130, w - 40, 250)
        query = v.typed(field_b).strip().lower()
        rows: list[Node] = []
        for name, b in _rows(v, 330):
            if query and query not in name.lower():
                continue
            y1 = 330 + len(rows) * 190
            b = (0, y1, w, y1 + 190)
            rows.append(Node("android.widget.LinearLayout", b, "contact_row", action="noop",
                             selected=ui.get("picked") == name, children=[
                Node("android.widget.TextView", (200, y1 + 30, w - 400, y1 + 95),
                     "chat_able_contacts_row_name", text=name),
                Node("android.widget.ImageButton", (w - 340, y1 + 20, w - 200, y1 + 170),
                     "voice_call", desc=s["voice_call"], action="call_from_tab",
                     arg=f"audio:{name}"),
                Node("android.widget.ImageButton", (w - 180, y1 + 20, w - 40, y1 + 170),
                     "video_call", desc=s["video_call"], action="call_from_tab",
                     arg=f"video:{name}"),
            ]))  # fmt: skip
        return [
            Node("android.view.ViewGroup", (0, 96, w, 300), "toolbar", children=[
                Node("android.widget.ImageButton", (0, 110, 140, 280), desc=s["navigate_up"],
                     action="back"),
                Node("android.widget.EditText", field_b, "search_view_edit_text",
                     text=s["search"] + "…", action="focus")]),
            Node("androidx.recyclerview.widget.RecyclerView", (0, 330, w, h), "list",
                 children=rows),
        ]  # fmt: skip
    if screen in ("chat_list", "calls_tab"):
        tabs = []
        current = "calls" if screen == "calls_tab" else "chats"
        for i, (key, target) in enumerate(
            (
                ("tab_chats", "chats"),
                ("tab_updates", ""),
                ("tab_communities", ""),
                ("tab_calls", "calls"),
            )
        ):
            x1, x2 = i * w // 4, (i + 1) * w // 4
            tabs.append(Node("android.widget.FrameLayout", (x1, h - 200, x2, h), desc=s[key],
                             action="tab" if target else "noop", arg=target,
                             selected=target == current, children=[
                                 Node("android.widget.TextView", (x1 + 20, h - 90, x2 - 20, h - 30),
                                      "navigation_bar_item_small_label_view", text=s[key],
                                      selected=target == current)]))  # fmt: skip
        toolbar_kids = [Node("android.widget.ImageView", (40, 140, 400, 250), "toolbar_logo")]
        if screen == "calls_tab":
            toolbar_kids = [
                Node("android.widget.TextView", (40, 140, 400, 250), text=s["tab_calls"]),
                Node("android.widget.ImageButton", (w - 170, 110, w - 30, 280), desc=s["search"],
                     action="search"),
            ]  # fmt: skip
        rows = []
        for name, b in _rows(v, 330):
            if screen == "chat_list":
                last = _last(ui, name)
                rows.append(Node("android.widget.LinearLayout", b, "contact_row_container",
                                 action="open", arg=name, children=[
                                     Node("android.widget.TextView", (200, b[1] + 30, w - 250, b[1] + 95),
                                          "conversations_row_contact_name", text=name),
                                     Node("android.widget.TextView", (200, b[1] + 100, w - 250, b[1] + 160),
                                          "single_msg_tv", text=_msg_text(last, v) if last else ""),
                                 ]))  # fmt: skip
            elif name in ui.get("call_log", []):
                rows.append(Node("android.widget.LinearLayout", b, "call_row", action="noop",
                                 children=[Node("android.widget.TextView",
                                                (200, b[1] + 30, w - 250, b[1] + 95),
                                                "contact_name", text=name)]))  # fmt: skip
        fab = (Node("android.widget.ImageButton", (w - 230, h - 420, w - 60, h - 250), "fab",
                    desc=s["new_call"], action="search") if screen == "calls_tab" else
               Node("android.widget.ImageButton", (w - 230, h - 420, w - 60, h - 250), "fab",
                    desc=s["new_chat"], action="noop"))  # fmt: skip
        return [
            Node("android.widget.FrameLayout", (0, 96, w, h), "root_view", children=[
                Node("android.view.ViewGroup", (0, 96, w, 300), "toolbar", children=toolbar_kids),
                Node("androidx.recyclerview.widget.RecyclerView", (0, 330, w, h - 220),
                     "list" if screen == "chat_list" else "calls_list", children=rows),
                fab,
                Node("android.widget.LinearLayout", (0, h - 200, w, h), "bottom_nav",
                     children=tabs),
            ]),
        ]  # fmt: skip
    contact = str(ui.get("contact") or "")
    if screen == "media_review":
        return [
            Node("android.widget.ImageView", (0, 96, w, h - 400), "media_preview", action="noop"),
            Node("android.widget.EditText", (40, h - 330, w - 250, h - 200), "caption",
                 text=s["caption"], action="noop"),
            Node("android.widget.ImageButton", (w - 220, h - 340, w - 40, h - 180),
                 "send_media_btn", desc=s["send"], action="send_media"),
        ]  # fmt: skip
    if screen == "gallery":
        thumbs = [Node("android.widget.ImageView", (20 + i * 265, 400, 265 + i * 265, 660),
                       action="media_item") for i in range(4)]  # fmt: skip
        return [
            Node("android.view.ViewGroup", (0, 96, w, 300), "toolbar", children=[
                Node("android.widget.ImageButton", (0, 110, 140, 280), desc=s["navigate_up"],
                     action="back"),
                Node("android.widget.TextView", (160, 140, w - 100, 250), text=s["gallery"])]),
            Node("androidx.recyclerview.widget.RecyclerView", (0, 380, w, h), "grid",
                 children=thumbs),
        ]  # fmt: skip
    toolbar = Node("android.view.ViewGroup", (0, 96, w, 300), "toolbar", children=[
        Node("android.widget.ImageButton", (0, 110, 140, 280), desc=s["navigate_up"], action="back"),
        Node("android.widget.TextView", (160, 130, w - 330, 200), "conversation_contact_name",
             text=contact),
        Node("android.widget.TextView", (w - 320, 110, w - 180, 280), "menuitem_video_call",
             desc=s["video_call"], action="call", arg="video"),
        Node("android.widget.TextView", (w - 170, 110, w - 30, 280), "menuitem_voice_call",
             desc=s["voice_call"], action="call", arg="audio"),
    ])  # fmt: skip
    bottom = h - 230 if screen != "attach" else h - 830
    entry = Node(
        "android.widget.EditText",
        (40, bottom + 30, w - 380, bottom + 200),
        "entry",
        text=s["editor_hint"],
        action="focus",
    )
    typed = v.typed(entry.bounds)
    rows = []
    for m, b in _bubbles(ui, v, 320, bottom - 20):
        kids = [Node("android.widget.TextView", (b[0] + 30, b[1] + 20, b[2] - 30, b[3] - 60),
                     "message_text", text=_msg_text(m, v))]  # fmt: skip
        if m.get("out"):
            kids.append(Node("android.widget.ImageView", (b[2] - 90, b[3] - 55, b[2] - 30, b[3] - 10),
                             "status", desc=s[_status_key(m)]))  # fmt: skip
        rows.append(Node("android.widget.FrameLayout", b, "conversation_text_row", children=kids))
    items = [
        Node("android.widget.LinearLayout", (0, 96, w, h), "conversation_root_layout", children=[
            toolbar,
            Node("android.widget.ListView", (0, 320, w, bottom - 20), "list", children=rows),
            entry,
            Node("android.widget.ImageButton", (w - 370, bottom + 30, w - 210, bottom + 200),
                 "input_attach_button", desc=s["attach"], action="attach"),
            Node("android.widget.ImageButton", (w - 190, bottom + 30, w - 30, bottom + 200),
                 "send" if typed else "voice_note_btn",
                 desc=s["send"] if typed else s["voice_note"],
                 action="send_text" if typed else "noop"),
        ]),
    ]  # fmt: skip
    if screen == "attach":
        holders = [Node("android.widget.Button", (40 + i * 340, h - 560, 340 + i * 340, h - 300), rid,
                        action=act, children=[Node("android.widget.TextView",
                                                   (60 + i * 340, h - 360, 320 + i * 340, h - 310),
                                                   text=t)])
                   for i, (rid, t, act) in enumerate((
                       ("pickfiletype_document_holder", s["document"], "noop"),
                       ("pickfiletype_gallery_holder", s["gallery"], "gallery")))]  # fmt: skip
        items.append(Node("android.widget.LinearLayout", (0, h - 800, w, h), "attach_sheet",
                          children=holders))  # fmt: skip
    return items


# --------------------------------------------------------------------------- moves


def apply(
    ui: dict[str, Any], package: str, action: str, arg: str, text: str
) -> list[tuple[str, ...]]:
    """Change ``ui`` for a tap's ``action``; the effects the app manager must carry out.

    Effects: ``("send_text", text)``, ``("send_media",)``, ``("call", contact, "audio"|"video")``,
    ``("hangup",)``, ``("answer",)``, ``("decline",)``, ``("dialog", button)``.
    """
    screen = ui.get("screen", HOME_SCREEN)
    dialog = ui.get("dialog")
    if dialog:
        if action == "confirm_call":
            ui["dialog"] = None
            return [("call", str(dialog.get("contact") or ""),
                     "video" if dialog.get("video") else "audio")]  # fmt: skip
        if action in ("cancel", "dialog"):
            ui["dialog"] = None
            if dialog.get("what") == "photos" and arg == "allow":
                ui["media_allowed"] = True
            return [("dialog", arg)]
        return []
    call = ui.get("call")
    if call:
        if action == "hangup" and call.get("state") != "ended":
            return [("hangup",)]
        if action == "answer" and call.get("state") == "incoming":
            return [("answer",)]
        if action == "decline" and call.get("state") == "incoming":
            return [("decline",)]
        return []
    if action == "open":
        ui.update(screen="conversation", contact=arg, selected=False)
    elif action == "search" and screen == "calls_tab":
        ui["screen"] = "call_search"
    elif action == "tab":
        ui["screen"] = "calls_tab" if arg == "calls" else "chat_list"
    elif action == "back":
        back(ui, package)
    elif action == "profile" and screen == "conversation":
        ui["screen"] = "profile"
    elif action == "attach" and screen == "conversation":
        ui.update(screen="attach", selected=False)
    elif action == "ask_media":
        ui["dialog"] = {"kind": "permission", "what": "photos"}
    elif action == "gallery" and screen == "attach":
        ui["screen"] = "gallery"
    elif action == "media_item":
        if package == TELEGRAM:
            ui["selected"] = not ui.get("selected")
        else:
            ui["screen"] = "media_review"
    elif action == "send_media":
        ui.update(screen="conversation", selected=False)
        return [("send_media",)]
    elif action == "send_text" and text:
        return [("send_text", text)]
    elif action == "call":
        contact = str(ui.get("contact") or "")
        return [("call", contact, arg or "audio")]
    elif action == "call_from_tab":
        kind, _, contact = arg.partition(":")
        ui["picked"] = contact
        ui["dialog"] = {"kind": "call_confirm", "contact": contact, "video": kind == "video"}
    return []


def back(ui: dict[str, Any], package: str = "") -> bool:
    """BACK: the screen's parent; False when BACK leaves the app (the launcher shows)."""
    if ui.get("dialog"):
        kind = ui["dialog"].get("kind")
        if kind != "permission":  # the permission prompt ignores BACK (not cancelable)
            ui["dialog"] = None
        return True
    if ui.get("call"):
        return True  # the call screen stays (the real apps move it to picture-in-picture)
    parent = PARENT.get(ui.get("screen", HOME_SCREEN), "")
    if not parent:
        return False
    if ui.get("screen") == "media_review" and package == WHATSAPP:
        parent = "gallery"
    ui["screen"] = parent
    if parent == "chat_list":
        ui["contact"] = None
    return True
