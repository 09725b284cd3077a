"""A fake WhatsApp phone for the scenario engine's tests: screens built from the selector
table's ids and strings (in the phone's language), a screen graph that follows the real app's
sequence (Calls tab search, call confirmation, media review), message states that advance
(Pending, Sent, Delivered), calls that a peer answers (or not), and interruptions (permission,
battery optimisation, rating dialogs) that cover the app until dismissed.

It answers the shell commands the runner sends (``uiautomator dump``, ``input tap``, ``input
keyevent``, ``input text``, ``am start``, ``am force-stop``, ``getprop``, ``dumpsys package``)
through :class:`controller.device.RecordingDeviceLink`, which records them.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from typing import Any

from controller.device import RecordingDeviceLink
from controller.lab import toolbox_runtime as rt
from controller.scenario import load_table

WA = "com.whatsapp"
PERMS = "com.google.android.permissioncontroller"


def concrete(value: str) -> str:
    """A text a table string matches: the first alternative of a ``~^(A|B)$`` regex."""
    if not value.startswith("~"):
        return value
    m = re.fullmatch(r"~\^?\(?([^|)$]+).*", value)
    return (m.group(1) if m else value[1:]).replace("\\", "")


@dataclass
class Node:
    cls: str
    rid: str = ""
    text: str = ""
    desc: str = ""
    act: Any = None
    kids: list[Node] = field(default_factory=list)
    pkg: str = WA


def render(roots: list[Node]) -> tuple[str, dict[tuple[int, int], Any]]:
    """The dump of a node tree (every node on its own 100 px band) and center -> action."""
    actions: dict[tuple[int, int], Any] = {}
    counter = [0]

    def one(n: Node, index: int) -> str:
        i = counter[0]
        counter[0] += 1
        b = (0, 100 * i, 1080, 100 * i + 80)
        if n.act is not None:
            actions[(540, 100 * i + 40)] = n.act
        kids = [one(k, j) for j, k in enumerate(n.kids)]
        return rt.make_node(n.cls, n.pkg, b, text=n.text, resource_id=n.rid,
                            content_desc=n.desc, clickable=n.act is not None, index=index,
                            children=kids)

    return rt.make_hierarchy([one(r, j) for j, r in enumerate(roots)]), actions


class FakeWhatsApp:
    """The fake phone; ``link`` is its :class:`RecordingDeviceLink`."""

    def __init__(self, locale: str = "en-US", contact: str = "Alice", *,
                 start: str = "home", peer_answers_after: int | None = 2,
                 peer_hangs_up: bool = False, incoming_after: int | None = None,
                 never_sent: bool = False, interruptions: list[str] | None = None,
                 confirm_call: bool = True, reply: str | None = None, version: str = "2.26.2.70",
                 serial: str = "FAKEWA01") -> None:
        t = load_table()
        self.lang = locale.split("-")[0]
        self.ids = {**t.apps["system"].ids, **t.apps["whatsapp"].ids}
        self.strs = {k: concrete(v[self.lang] if self.lang in v else v["en"])
                     for sec in ("system", "whatsapp") for k, v in t.apps[sec].strings.items()}
        self.contact = contact
        self.screen = start
        self.chat: str | None = None
        self.attach_open = False
        self.search_text = ""
        self.row_picked = False
        self.typed = ""
        self.messages: list[dict[str, Any]] = []
        self.peer_answers_after = peer_answers_after
        self.peer_hangs_up = peer_hangs_up
        self.incoming_after = incoming_after
        self.never_sent = never_sent
        self.interruptions = list(interruptions or [])
        self.confirm_call = confirm_call
        self.reply = reply
        self.dialog: str | None = None
        self.call_dumps = 0
        self.dumps = 0
        self.taps: list[str] = []
        self.link = RecordingDeviceLink(serial=serial)
        self.link.on(r"^uiautomator dump", lambda _c: self.dump())
        self.link.on(r"^input tap ", self._tap)
        self.link.on(r"^input keyevent", self._key)
        self.link.on(r"^input text ", self._text)
        self.link.on(r"^am start", self._start)
        self.link.on(r"^am force-stop", self._stop)
        self.link.on(r"getprop persist\.sys\.locale", locale + "\n")
        self.link.on(r"^dumpsys package com\.whatsapp", f"    versionName={version}\n")

    # -- helpers ----------------------------------------------------------------------------
    def i(self, name: str) -> str:
        return self.ids[name]

    def s(self, name: str) -> str:
        return self.strs[name]

    # -- screens ----------------------------------------------------------------------------
    def roots(self) -> list[Node]:
        if self.dialog:
            return self._dialog()
        sc = self.screen
        if sc == "home":
            return [Node("android.widget.FrameLayout", pkg="com.android.launcher3",
                         kids=[Node("android.widget.TextView", text="WhatsApp",
                                    pkg="com.android.launcher3")])]
        nav = [Node("android.widget.TextView", self.i("nav_label"), self.s("chats_tab"),
                    act=("screen", "chat_list")),
               Node("android.widget.TextView", self.i("nav_label"), self.s("calls_tab"),
                    act=("screen", "calls"))]
        if sc == "chat_list":
            rows = [Node("android.widget.TextView", self.i("chat_row_name"), name,
                         act=("chat", name)) for name in ("Bob", self.contact)]
            return [Node("android.widget.FrameLayout", kids=[
                Node("android.widget.ImageView", self.i("toolbar_logo")),
                *rows, Node("android.widget.ImageButton", self.i("fab"), desc="New chat"),
                *nav])]
        if sc == "calls":
            kids = [Node("android.view.ViewGroup", self.i("toolbar"), kids=[
                Node("android.widget.TextView", text=self.s("calls_tab"))]),
                Node("android.widget.EditText", self.i("calls_search_field"),
                     text=self.search_text, act=("noop",))]
            if self.search_text and self.contact.startswith(self.search_text):
                kids.append(Node("android.widget.TextView", self.i("calls_contact_row"),
                                 self.contact, act=("pick_row",)))
            if self.row_picked:
                kids.append(Node("android.widget.ImageButton", self.i("voice_call"),
                                 desc=self.s("voice_call"), act=("call", "voice")))
            return [Node("android.widget.FrameLayout", kids=kids + nav)]
        if sc == "conversation":
            rows = []
            for m in self.messages:
                kids = [Node("android.widget.TextView", self.i("message_text"), m["text"])]
                if m["out"]:
                    kids.append(Node("android.widget.ImageView", self.i("message_status"),
                                     desc=m["state"]))
                rows.append(Node("android.widget.FrameLayout", self.i("message_row"), kids=[
                    Node("android.widget.LinearLayout", kids=kids)]))
            extra = [Node("android.widget.Button", self.i("attach_gallery"),
                          act=("screen", "media_picker"))] if self.attach_open else []
            return [Node("android.widget.LinearLayout", self.i("conversation_root"), kids=[
                Node("android.widget.TextView", self.i("conversation_contact_name"),
                     self.chat or ""),
                *rows,
                Node("android.widget.EditText", self.i("entry"), self.typed, act=("noop",)),
                Node("android.widget.ImageButton", self.i("attach"), act=("attach",)),
                Node("android.widget.ImageButton", self.i("send"), act=("send",)),
                *extra])]
        if sc == "media_picker":
            return [Node("androidx.recyclerview.widget.RecyclerView", self.i("gallery_grid"),
                         kids=[Node("android.widget.ImageView", act=("screen", "media_review"))
                               for _ in range(3)])]
        if sc == "media_review":
            return [Node("android.widget.FrameLayout", kids=[
                Node("android.widget.ImageButton", self.i("send_media"), act=("send_media",))])]
        if sc in ("outgoing_call", "in_call"):
            status = "0:05" if sc == "in_call" else "Calling…"
            return [Node("android.widget.RelativeLayout", self.i("call_screen"), kids=[
                Node("android.widget.TextView", self.i("call_title"), self.contact),
                Node("android.widget.TextView", text=status),
                Node("android.widget.Button", self.i("footer_end_call"),
                     desc=self.s("leave_call"), act=("hangup",))])]
        if sc == "incoming_call":
            return [Node("android.widget.FrameLayout", kids=[
                Node("android.widget.TextView", text=self.contact),
                Node("android.widget.Button", desc=self.s("answer"), act=("answer",)),
                Node("android.widget.Button", self.i("decline_incoming"),
                     desc=self.s("decline"), act=("screen", "chat_list"))])]
        raise AssertionError(sc)

    def _dialog(self) -> list[Node]:
        d = self.dialog
        if d == "permission":
            return [Node("android.widget.LinearLayout", pkg=PERMS, kids=[
                Node("android.widget.TextView", text="Allow WhatsApp to record audio?", pkg=PERMS),
                Node("android.widget.Button", self.i("permission_allow_foreground"),
                     "While using the app", act=("dismiss",), pkg=PERMS),
                Node("android.widget.Button", self.i("permission_deny"), "Don't allow",
                     act=("dismiss",), pkg=PERMS)])]
        if d == "battery":
            s = "com.android.settings"
            return [Node("android.widget.FrameLayout", pkg=s, kids=[
                Node("android.widget.TextView", self.i("dialog_message"),
                     "Let app always run in background?", pkg=s),
                Node("android.widget.Button", self.i("dialog_positive"), "Allow",
                     act=("dismiss",), pkg=s)])]
        if d == "rating":
            return [Node("android.widget.FrameLayout", kids=[
                Node("android.widget.TextView", text="Enjoying WhatsApp?"),
                Node("android.widget.Button", text=self.s("not_now"), act=("dismiss",))])]
        if d == "confirm":
            return [Node("android.widget.FrameLayout", kids=[
                Node("android.widget.TextView", self.i("dialog_message"),
                     f"Start a voice call with {self.contact}?"),
                Node("android.widget.Button", self.i("dialog_negative"), "Cancel",
                     act=("screen", "calls")),
                Node("android.widget.Button", self.i("dialog_positive"),
                     self.s("call_confirm"), act=("dial",))])]
        raise AssertionError(d)

    def dump(self) -> str:
        self.dumps += 1
        if self.dialog is None and self.interruptions and self.screen != "home" \
                and self.dumps % 3 == 0:
            self.dialog = self.interruptions.pop(0)
        if self.dialog is None:
            self._advance()
        xml, self._actions = render(self.roots())
        return xml

    def _advance(self) -> None:
        for m in self.messages:  # one state further per look
            if m["out"] and not self.never_sent:
                m["state"] = {"Pending": self.s("status_sent_or_better"),
                              }.get(m["state"], m["state"])
        if self.screen in ("outgoing_call", "in_call"):
            self.call_dumps += 1
            if self.screen == "outgoing_call" and self.peer_answers_after is not None \
                    and self.call_dumps > self.peer_answers_after:
                self.screen = "in_call"
            elif self.screen == "in_call" and self.peer_hangs_up and self.call_dumps > 6:
                self.screen = "chat_list"
        if self.incoming_after is not None and self.screen == "chat_list":
            self.incoming_after -= 1
            if self.incoming_after < 0:
                self.incoming_after = None
                self.screen = "incoming_call"
        if self.reply and self.screen == "conversation" and \
                any(m["out"] for m in self.messages) and \
                not any(m["text"] == self.reply for m in self.messages):
            self.messages.append({"text": self.reply, "out": False})

    # -- input ------------------------------------------------------------------------------
    def _tap(self, cmd: str) -> str:
        x, y = (int(v) for v in cmd.split()[2:4])
        act = getattr(self, "_actions", {}).get((x, y))
        self.taps.append(str(act))
        if act is None:
            return ""
        kind, *arg = act
        if kind == "dismiss":
            self.dialog = None
        elif kind == "screen":
            self.dialog = None
            self.screen = arg[0]
            self.attach_open = False
        elif kind == "chat":
            self.screen, self.chat = "conversation", arg[0]
        elif kind == "pick_row":
            self.row_picked = True
        elif kind == "call":
            if self.confirm_call:
                self.dialog = "confirm"
            else:
                self._dial()
        elif kind == "dial":
            self.dialog = None
            self._dial()
        elif kind == "send" and self.typed:
            self.messages.append({"text": self.typed, "out": True, "state": "Pending"})
            self.typed = ""
        elif kind == "attach":
            self.attach_open = True
        elif kind == "send_media":
            self.screen = "conversation"
            self.messages.append({"text": "", "out": True, "state": "Pending"})
        elif kind == "hangup":
            self.screen = "calls" if self.chat is None else "conversation"
        elif kind == "answer":
            self.screen, self.call_dumps, self.peer_answers_after = "outgoing_call", 0, 0
        return ""

    def _dial(self) -> None:
        self.screen, self.call_dumps, self.row_picked, self.search_text = \
            "outgoing_call", 0, False, ""

    def _key(self, cmd: str) -> str:
        key = cmd.split()[-1]
        if key == "KEYCODE_BACK":
            if self.dialog:
                self.dialog = None
            elif self.screen in ("media_picker", "media_review"):
                self.screen = "conversation"
            elif self.screen == "conversation":
                self.screen, self.chat = "chat_list", None
            elif self.screen in ("chat_list", "calls"):
                self.screen = "home"
        elif key == "KEYCODE_HOME":
            self.screen = "home"
        return ""

    def _text(self, cmd: str) -> str:
        value = shlex.split(cmd)[2].replace("%s", " ")
        if self.screen == "calls":
            self.search_text += value
        else:
            self.typed += value
        return ""

    def _start(self, cmd: str) -> str:
        if self.screen == "home":
            self.screen = "chat_list"
        return "Status: ok\nTotalTime: 100\nComplete\n"

    def _stop(self, _cmd: str) -> str:
        self.screen, self.chat, self.dialog = "home", None, None
        return ""
