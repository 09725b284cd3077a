"""Two lab phones: the simulated messengers' real screens, chats and calls between the phones.

Driven only through what a technician has: ``adb shell`` on each phone (``am start``,
``input tap``/``text``/``keyevent``, ``uiautomator dump``), with the apps' socket truth
to check that call media flows only after the callee answers.  Phone 2 runs in German.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from controller.lab.topology import Lab, skip_reason
from controller.lab.truth import read_truth
from tests.vlab_fixture import free_port

REASON = skip_reason() or (None if shutil.which("adb") else "the Debian adb package is missing")
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")
SIGNAL, TELEGRAM, WHATSAPP = "org.thoughtcrime.securesms", "org.telegram.messenger", "com.whatsapp"
ACTIVITY = {SIGNAL: ".RoutingActivity", WHATSAPP: ".home.ui.HomeActivity",
            TELEGRAM: "org.telegram.ui.LaunchActivity"}  # fmt: skip
RING_S = 6.0
INTERRUPTED: list[Phone] = []  # phone 3: a dialog after every action
CLI_ENV: dict[str, str] = {}
NAMES = {"resource_id": "resource-id", "content_desc": "content-desc", "cls": "class"}


class Phone:
    def __init__(self, device: Any, lab_phone: Any) -> None:
        self.device = device
        self.lab = lab_phone

    def sh(self, cmd: str) -> str:
        return str(self.device.shell(cmd))

    def dump(self) -> ET.Element:
        xml = self.sh("uiautomator dump /dev/tty").split("UI hierchary dumped")[0]
        return ET.fromstring(xml[xml.find("<?xml") :].split("?>", 1)[1])

    def find(self, root: ET.Element | None = None, /, **want: str) -> ET.Element | None:
        root = root if root is not None else self.dump()
        for node in root.iter("node"):
            if all(_attr_match(node.get(NAMES.get(k, k), ""), v) for k, v in want.items()):
                return node
        return None

    def wait_for(self, timeout: float = 10.0, **want: str) -> ET.Element:
        deadline = time.monotonic() + timeout
        while True:
            node = self.find(**want)
            if node is not None:
                return node
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{self.lab.name}: no node {want} in\n{self.sh('uiautomator dump /dev/tty')}"
                )
            time.sleep(0.15)

    def tap(self, timeout: float = 10.0, **want: str) -> None:
        node = self.wait_for(timeout, **want)
        x1, y1, x2, y2 = map(int, re.findall(r"-?\d+", node.get("bounds", "")))
        self.sh(f"input tap {(x1 + x2) // 2} {(y1 + y2) // 2}")

    def launch(self, package: str) -> None:
        self.sh(f"am start -W -n {package}/{ACTIVITY[package]}")


def _attr_match(have: str, want: str) -> bool:
    if want.startswith("~"):
        return re.search(want[1:], have) is not None
    return have == want


def calls(lab: Lab, phone: Any, since: float) -> list[Any]:
    return [t for t in read_truth(lab.truth_path)
            if t.phone == phone.config.serial and t.role.startswith("call") and t.start >= since]  # fmt: skip


def eventually(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def two_phones() -> Iterator[tuple[Lab, Phone, Phone]]:
    import adbutils

    d = Path(tempfile.mkdtemp(prefix="flowtruth-lab-apps-"))
    home = d / "home"
    home.mkdir()
    port = free_port()
    env = dict(os.environ, HOME=str(home), TMPDIR=str(home))
    subprocess.run(["adb", "-P", str(port), "start-server"], env=env, check=True,
                   capture_output=True, timeout=30)  # fmt: skip
    lab = None
    try:
        lab = Lab.up(
            phones=3, adb_port=port, workdir=d / "lab", state_dir=d / "state", mgmt_base=200,
            ring_timeout_s=RING_S,
            phone_options={1: {"interruption_rate": 0},
                           2: {"interruption_rate": 0, "locale": "de-DE"},
                           3: {"interruption_rate": 1.0}},
        )  # fmt: skip
        client = adbutils.AdbClient(host="127.0.0.1", port=port)
        p1, p2, p3 = (Phone(client.device(p.serial), p) for p in lab.phones)
        INTERRUPTED.append(p3)
        CLI_ENV.update(env, FLOWTRUTH_LAB_STATE_DIR=str(d / "state"), ADB_PORT=str(port))
        yield lab, p1, p2
    finally:
        if lab is not None:
            lab.down()
        subprocess.run(["adb", "-P", str(port), "kill-server"], env=env, capture_output=True,
                       timeout=30)  # fmt: skip
        shutil.rmtree(d, ignore_errors=True)


def test_owners_contacts_and_locale(two_phones) -> None:  # type: ignore[no-untyped-def]
    lab, p1, p2 = two_phones
    assert (p1.lab.owner, p2.lab.owner) == ("Bob", "Carol")
    assert p1.lab.contacts == ["Carol", "Dave", "Alice"]  # Alice: not a lab phone
    assert p2.lab.contacts == ["Bob", "Dave", "Alice"]
    assert type(p2.lab).from_json(p2.lab.to_json()).owner == "Carol"
    assert p2.sh("getprop persist.sys.locale").strip() == "de-DE"
    assert p1.sh("getprop persist.sys.locale").strip() == "en-US"
    assert p2.sh("getprop ro.flowtruth.lab.owner").strip() == "Carol"


def test_signal_chat_between_phones_goes_delivered(two_phones) -> None:  # type: ignore[no-untyped-def]
    lab, p1, p2 = two_phones
    p1.launch(SIGNAL)
    p1.tap(resource_id=f"{SIGNAL}:id/conversation_list_item_name", text="Carol")
    title = p1.wait_for(resource_id=f"{SIGNAL}:id/conversation_title_view")
    assert title.get("text") == ""  # a container: the name is in its child
    assert [
        c.get("text") for c in title.iter("node") if c.get("resource-id", "").endswith(":id/title")
    ] == ["Carol"]
    root = p1.dump()
    assert p1.find(root, resource_id=f"{SIGNAL}:id/attach_button") is not None
    assert p1.find(root, resource_id=f"{SIGNAL}:id/send_button") is None  # one toggle
    p1.tap(resource_id=f"{SIGNAL}:id/embedded_text_editor")
    p1.sh("input text 'hello%sBob'")
    p1.tap(resource_id=f"{SIGNAL}:id/send_button")
    p1.wait_for(resource_id=f"{SIGNAL}:id/conversation_item_body", text="hello Bob")
    p1.wait_for(
        resource_id=f"{SIGNAL}:id/footer_delivery_status", content_desc="~^(Delivered|Read)$"
    )
    assert p1.find(resource_id=f"{SIGNAL}:id/attach_button") is not None  # the editor emptied
    # phone 2 (German) has the message from Bob; opening the chat marks it read
    p2.launch(SIGNAL)
    p2.tap(resource_id=f"{SIGNAL}:id/conversation_list_item_name", text="Bob")
    p2.wait_for(resource_id=f"{SIGNAL}:id/conversation_item_body", text="hello Bob")
    assert (
        p2.find(resource_id=f"{SIGNAL}:id/attach_button", content_desc="Anhang hinzufügen")
        is not None
    )
    p1.wait_for(resource_id=f"{SIGNAL}:id/footer_delivery_status", content_desc="Read")


def test_call_rings_the_peer_and_media_flows_only_after_answer(two_phones) -> None:  # type: ignore[no-untyped-def]
    lab, p1, p2 = two_phones
    p2.sh("input keyevent HOME")
    p1.launch(SIGNAL)  # still in the conversation with Carol (the app keeps its screen)
    t0 = time.time()
    p1.tap(resource_id=f"{SIGNAL}:id/menu_call_secure")
    p1.wait_for(resource_id=f"{SIGNAL}:id/call_screen_status", text="~^(Calling|Ringing)")
    # the callee's phone shows the incoming call (in German) and no call media flows
    p2.wait_for(resource_id=f"{SIGNAL}:id/call_screen_answer_call", content_desc="Annehmen")
    p1.wait_for(resource_id=f"{SIGNAL}:id/call_screen_status", text="Ringing…")
    time.sleep(1.5)
    assert calls(lab, p1.lab, t0) == [] and calls(lab, p2.lab, t0) == []
    p2.tap(resource_id=f"{SIGNAL}:id/call_screen_answer_call")
    p1.wait_for(resource_id=f"{SIGNAL}:id/call_screen_status", text=r"~^\d+:\d\d$")
    p2.wait_for(resource_id=f"{SIGNAL}:id/call_screen_status", text=r"~^\d+:\d\d$")
    p2.wait_for(resource_id=f"{SIGNAL}:id/call_screen_end_call", content_desc="Anruf beenden")
    eventually(lambda: bool(calls(lab, p1.lab, t0)) and bool(calls(lab, p2.lab, t0)))
    time.sleep(1.0)
    p2.tap(resource_id=f"{SIGNAL}:id/call_screen_end_call")  # hang-up on one side ends both
    p1.wait_for(resource_id=f"{SIGNAL}:id/call_screen_status", text="Call ended")
    eventually(
        lambda: all(t.end is not None for t in calls(lab, p1.lab, t0) + calls(lab, p2.lab, t0))
    )
    p1.wait_for(resource_id=f"{SIGNAL}:id/conversation_title_view", timeout=8)


def test_unanswered_call_rings_out_without_media(two_phones) -> None:  # type: ignore[no-untyped-def]
    lab, p1, p2 = two_phones
    p1.launch(WHATSAPP)
    p1.tap(resource_id="com.whatsapp:id/navigation_bar_item_small_label_view", text="Calls")
    p1.tap(content_desc="Search")
    p1.wait_for(resource_id="com.whatsapp:id/search_view_edit_text", focused="true")
    p1.sh("input text Alice")  # the search field has the focus
    p1.wait_for(resource_id="com.whatsapp:id/chat_able_contacts_row_name", text="Alice")
    assert p1.find(resource_id="com.whatsapp:id/chat_able_contacts_row_name", text="Carol") is None
    t0 = time.time()
    p1.tap(resource_id="com.whatsapp:id/voice_call")
    p1.tap(resource_id="android:id/button1", text="Call")  # the confirmation dialog
    p1.wait_for(resource_id="com.whatsapp:id/end_call_button", content_desc="Leave call")
    p1.wait_for(resource_id="com.whatsapp:id/call_status", text="Ringing")
    p1.wait_for(resource_id="com.whatsapp:id/call_status", text="Not answered", timeout=RING_S + 5)
    assert calls(lab, p1.lab, t0) == []  # no call media: only the set-up's STUN checks
    ice = [t for t in read_truth(lab.truth_path) if t.phone == p1.lab.config.serial
           and t.role == "ice" and t.start >= t0]  # fmt: skip
    assert len(ice) == 1 and ice[0].app == WHATSAPP and ice[0].proto == "udp"
    eventually(lambda: all(t.end is not None for t in read_truth(lab.truth_path)
                           if t.role == "ice" and t.start >= t0))  # fmt: skip
    p1.wait_for(resource_id="com.whatsapp:id/search_view_edit_text", timeout=8)


def test_telegram_video_call_from_profile_and_decline(two_phones) -> None:  # type: ignore[no-untyped-def]
    lab, p1, p2 = two_phones
    p1.launch(TELEGRAM)
    t0 = time.time()
    p1.tap(text="~^Carol, ")  # the chat row: "Name, last message"
    p1.tap(content_desc="~^Carol\n")  # the header opens the profile
    p1.tap(text="Video Call")
    p1.wait_for(text="End Call", cls="android.widget.Button")
    p2.wait_for(text="Telegram-Videoanruf")  # the German incoming call screen
    p2.tap(text="Ablehnen")
    p1.wait_for(text="Line Busy")
    assert calls(lab, p1.lab, t0) == [] and calls(lab, p2.lab, t0) == []


def test_state_kept_back_and_relaunch(two_phones) -> None:  # type: ignore[no-untyped-def]
    lab, p1, p2 = two_phones
    p1.launch(TELEGRAM)
    p1.wait_for(text="Video Call")  # back on the profile screen the call started from
    p1.sh("input keyevent BACK")
    p1.wait_for(content_desc="Attach media")  # BACK: the conversation
    p1.sh("input keyevent BACK")
    p1.wait_for(content_desc="New Message")  # the chat list
    p1.tap(text="~^Carol, ")
    p1.wait_for(content_desc="Attach media")
    p1.sh("input keyevent HOME")
    p1.launch(TELEGRAM)
    p1.wait_for(content_desc="Attach media")  # a warm start returns to the last screen
    p1.sh(f"am force-stop {TELEGRAM}")
    p1.launch(TELEGRAM)
    p1.wait_for(content_desc="New Message")  # a cold start shows the main screen


def test_interruptions_block_taps_until_dismissed(two_phones) -> None:  # type: ignore[no-untyped-def]
    _lab, _p1, _p2 = two_phones
    p3 = INTERRUPTED[0]
    assert "versionName=12.0.1" in p3.sh(f"dumpsys package {TELEGRAM}")
    p3.launch(SIGNAL)
    row = dict(resource_id=f"{SIGNAL}:id/conversation_list_item_name", text="Alice")
    dialog = (
        "~^(com.android.permissioncontroller:id/permission_allow(_foreground_only)?_button"
        "|android:id/button1)$"
    )
    p3.wait_for(resource_id=dialog)
    p3.tap(**row)  # behind the dialog: nothing happens
    time.sleep(0.5)
    assert p3.find(resource_id=f"{SIGNAL}:id/conversation_title_view") is None
    root = p3.dump()
    assert p3.find(root, **row) is not None  # still on the chat list, under the dialog
    p3.tap(resource_id=dialog)  # dismiss it (Allow, Got it, Rate now)
    eventually(lambda: p3.find(resource_id=dialog) is None, timeout=5)
    p3.tap(**row)
    p3.wait_for(resource_id=f"{SIGNAL}:id/conversation_title_view")
    p3.wait_for(resource_id=dialog)  # the next one, after the move


def test_scenario_completes_through_the_interruptions(two_phones) -> None:  # type: ignore[no-untyped-def]
    """The shipped scenario on the phone where every action is followed by a dialog."""
    import json
    import sys

    repo = Path(__file__).resolve().parents[1]
    res = subprocess.run(
        [sys.executable, "-m", "controller.cli", "scenario", "try", "lab:phone3", "whatsapp",
         "chat", "--adb-port", CLI_ENV["ADB_PORT"]],
        cwd=repo, env=CLI_ENV, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    report = json.loads(next(x for x in res.stdout.splitlines() if x.startswith("{")))
    assert report["verified"] is True and report["interruptions"], report
