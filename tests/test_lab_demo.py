"""A demo-sized session in the virtual lab, labelled by the real pipeline and scored on the truth.

This is what ``flowtruth demo`` does once the session engine drives it, done by hand
through the same real pieces: a private adb server, the emulated adbd, the phone's
netstat poller (``device_scripts/netstat_poller.sh``, pushed and started over adb), the
AP capture (``ap_setup.capture``), the three messengers driven with ``am``/``input``,
``analysis.label.label_capture`` on the capture and the pulled log, and
``controller.lab.truth.score`` against the apps' own socket truth.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest

from controller.lab.topology import Lab, skip_reason

REASON = skip_reason() or (None if shutil.which("adb") else "the Debian adb package is missing")
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")
REPO = Path(__file__).resolve().parents[1]
MESSENGERS = {
    "org.thoughtcrime.securesms": ".RoutingActivity",
    "com.whatsapp": ".home.ui.HomeActivity",
    "org.telegram.messenger": "org.telegram.ui.LaunchActivity",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def demo_lab() -> Iterator[tuple[Lab, object, Path]]:
    import adbutils

    d = Path(tempfile.mkdtemp(prefix="flowtruth-lab-demo-"))
    home = d / "home"
    home.mkdir()
    port = free_port()
    env = dict(os.environ, HOME=str(home), TMPDIR=str(home))
    subprocess.run(["adb", "-P", str(port), "start-server"], env=env, check=True,
                   capture_output=True, timeout=30)  # fmt: skip
    lab = None
    try:
        lab = Lab.up(phones=1, adb_port=port, workdir=d / "lab", state_dir=d / "state",
                     mgmt_base=220, phone_options={1: {"interruption_rate": 0}})  # fmt: skip
        device = adbutils.AdbClient(host="127.0.0.1", port=port).device(lab.phones[0].serial)
        yield lab, device, d
    finally:
        if lab is not None:
            lab.down()
        subprocess.run(["adb", "-P", str(port), "kill-server"], env=env, capture_output=True,
                       timeout=30)  # fmt: skip
        shutil.rmtree(d, ignore_errors=True)


def _tap(device, package: str, **want: str) -> None:  # type: ignore[no-untyped-def]
    names = {"resource_id": "resource-id", "content_desc": "content-desc"}
    deadline = time.monotonic() + 10
    while True:
        xml = device.shell("uiautomator dump /dev/tty").split("UI hierchary dumped")[0]
        for node in ET.fromstring(xml).iter("node"):
            if node.get("package") == package and all(
                (node.get(names.get(k, k), "") or "").startswith(v) for k, v in want.items()
            ):
                x1, y1, x2, y2 = map(int, re.findall(r"\d+", node.get("bounds", "")))
                device.shell(f"input tap {(x1 + x2) // 2} {(y1 + y2) // 2}")
                return
        if time.monotonic() > deadline:
            raise AssertionError(f"{want!r} not on {package}'s screen")
        time.sleep(0.2)


# Per app: open the chat with Alice (outside the lab), send a message and a photo, call her
# (nobody answers: ringing and signalling only), hang up.
STEPS = {
    "org.thoughtcrime.securesms": [
        {
            "resource_id": "org.thoughtcrime.securesms:id/conversation_list_item_name",
            "text": "Alice",
        },
        {"resource_id": "org.thoughtcrime.securesms:id/embedded_text_editor"},
        "hi",
        {"resource_id": "org.thoughtcrime.securesms:id/send_button"},
        {"resource_id": "org.thoughtcrime.securesms:id/attach_button"},
        {"resource_id": "org.thoughtcrime.securesms:id/attachment_keyboard_item_image"},
        {"resource_id": "org.thoughtcrime.securesms:id/send"},
        {"resource_id": "org.thoughtcrime.securesms:id/menu_call_secure"},
        1.5,
        {"content_desc": "End call"},
    ],
    "com.whatsapp": [
        {"resource_id": "com.whatsapp:id/conversations_row_contact_name", "text": "Alice"},
        {"resource_id": "com.whatsapp:id/entry"},
        "hi",
        {"resource_id": "com.whatsapp:id/send"},
        {"resource_id": "com.whatsapp:id/input_attach_button"},
        {"resource_id": "com.whatsapp:id/pickfiletype_gallery_holder"},
        {"class": "android.widget.ImageView", "text": ""},
        {"resource_id": "com.whatsapp:id/send_media_btn"},
        {"resource_id": "com.whatsapp:id/menuitem_voice_call"},
        1.5,
        {"content_desc": "Leave call"},
    ],
    "org.telegram.messenger": [
        {"text": "Alice, "},
        {"text": "Message"},
        "hi",
        {"content_desc": "Send"},
        {"content_desc": "Attach media"},
        {"text": "Photo"},
        {"content_desc": "Send"},
        {"content_desc": "Call"},
        1.5,
        {"text": "End Call"},
    ],
}


def test_demo_session_scored_against_the_truth(demo_lab) -> None:  # type: ignore[no-untyped-def]
    from analysis.label import label_capture
    from controller.lab.truth import read_labels_csv, read_truth, score, write_truth_csv

    lab, device, d = demo_lab
    phone = lab.phones[0]
    device.sync.push(str(REPO / "device_scripts" / "netstat_poller.sh"), "/data/local/tmp/np.sh")
    device.shell("setsid nohup sh /data/local/tmp/np.sh /data/local/tmp/netstat.log 0.05 "
                 ">/dev/null 2>&1 < /dev/null &")  # fmt: skip
    time.sleep(0.5)
    cap = lab.start_capture(d / "capture")
    t0 = time.time()
    try:
        for package, activity in MESSENGERS.items():
            device.shell(f"am start -W -n {package}/{activity}")
            time.sleep(1.0)
            for step in STEPS[package]:
                if isinstance(step, str):
                    device.shell(f"input text {step}")
                elif isinstance(step, float):
                    time.sleep(step)
                else:
                    _tap(device, package, **step)
            device.shell("input keyevent KEYCODE_HOME")
        time.sleep(1.0)
        for package in MESSENGERS:
            device.shell(f"am force-stop {package}")
        time.sleep(1.0)
    finally:
        device.shell("touch /data/local/tmp/netstat.log.stop")
        stats = cap.stop()
    t1 = time.time()
    time.sleep(0.5)
    device.sync.pull("/data/local/tmp/netstat.log", str(d / "netstat.log"))
    assert stats.get("packets_dropped_by_kernel", 0) == 0
    uid_map = {int(p.uid): (name,) for name, p in phone.config.packages.items()}
    out = d / "labelled"
    result = label_capture(
        cap.files(), netstat=d / "netstat.log", uid_map=uid_map, device_ips=[phone.ip],
        clock_offset=phone.config.clock_offset_s, targets=list(MESSENGERS), out_dir=out,
    )  # fmt: skip
    truth = [t for t in read_truth(lab.truth_path) if t.phone == phone.config.serial]
    write_truth_csv(truth, d / "truth.csv")
    assert (
        (d / "truth.csv")
        .read_text()
        .startswith("proto,local_ip,local_port,remote_ip,remote_port,app,time")
    )
    flows = read_labels_csv(out / "labels.csv")
    every = score(flows, truth, apps=list(MESSENGERS), window=(t0, t1))
    # the netstat poller samples every 50 ms plus the time a round takes (the lab's `date`
    # is a Python shim): sockets living a second or more are always seen
    scores = score(flows, truth, apps=list(MESSENGERS), window=(t0, t1), min_lifetime=1.0)
    report = {a: (s.precision, s.recall, s.labelled, s.truth) for a, s in scores.items()}
    print(
        "\n"
        + result.line()
        + "\n"
        + "\n".join(
            f"{a}: precision {s.precision}, recall {s.recall} of {s.truth} sockets living >= 1 s, "
            f"{every[a].recall} of all {every[a].truth}"
            for a, s in scores.items()
        )
    )
    for app, s in scores.items():
        assert s.truth >= 1, (app, report)  # the chat connection (Alice's call is not answered)
        assert s.precision is not None and s.precision >= 0.95, (app, report)
        assert s.recall == 1.0, (app, report)
        assert every[app].labelled == s.labelled and every[app].truth >= 2  # + the photo upload
