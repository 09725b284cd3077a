"""The session engine: the whole event sequence over a recording fake (success, a phone
vanishing mid-scenario), then real sessions in a minimal virtual lab (namespaces, an
emulated adbd process per phone, the real adb server, real strace launcher and netstat
poller, real tcpdump at the AP) down to labelled MIRAGE JSON; a cancelled session tears
down and keeps its artifacts; ``flowtruth label RUN_DIR`` labels a run again."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from controller import events as ev
from controller.device import RecordingDeviceLink
from controller.errors import DeviceError
from controller.scenario import load_scenario
from controller.session import (
    STEPS,
    Environment,
    SessionSpec,
    TcpdumpCapture,
    run_session,
    split_pcap,
)

REPO = Path(__file__).resolve().parents[1]

GETPROP = ("[ro.product.model]: [SM-G991B]\n[ro.product.manufacturer]: [samsung]\n"
           "[ro.build.version.release]: [14]\n[ro.build.version.sdk]: [34]\n"
           "[ro.product.cpu.abi]: [x86_64]\n")


def make_fake_phone() -> RecordingDeviceLink:
    """A fake rooted lab phone that answers everything a session asks."""
    link = RecordingDeviceLink(serial="FAKE0001")
    link.on(r"^getprop$", GETPROP).on(r"^getenforce$", "Enforcing\n")
    link.on(r"^dumpsys battery$", "  level: 80\n")
    link.on(r"^ip -o addr$", "2: wlan0    inet 192.168.77.11/24 scope global wlan0\n")
    link.on(r"^su -c id$", "uid=0(root) gid=0(root)\n")
    link.on(r"^pm list packages", "package:com.example.app versionCode:7 uid:10111\n")
    link.on(r"^dumpsys package com.example.app", "    versionName=1.2.3\n")
    link.on(r"^date \+%s\.%N$", lambda _c: f"{time.time() + 1.5:.9f}\n")
    link.on(r"echo \$!", "4242\n4243\n")
    link.on(r"^am start", "Status: ok\nTotalTime: 100\nComplete\n")
    return link


def make_spec(tmp: Path, **kw: Any) -> SessionSpec:
    sc_file = tmp / "app.yaml"
    sc_file.write_text("app: app\npackage: com.example.app\nactivity: com.example.app.Main\n"
                       "activities:\n  chat:\n    - launch: {}\n    - key: {key: HOME}\n"
                       "    - wait: {seconds: 0.01}\n")
    return SessionSpec(serial="FAKE0001", app="app", activity="chat",
                       scenario=load_scenario(sc_file), **kw)


def kinds(sink: ev.RecordingSink) -> list[str]:
    out = []
    for e in sink.events:
        name = type(e).__name__
        if isinstance(e, (ev.StepStarted, ev.StepFinished)):
            name += f":{e.step}" + ("" if not isinstance(e, ev.StepFinished) or e.ok else ":FAIL")
        out.append(name)
    return out


def test_engine_event_sequence_over_a_fake_phone(tmp_path: Path) -> None:
    link = make_fake_phone()
    sink = ev.RecordingSink()
    env = Environment(runs_root=tmp_path / "runs", label=False)
    res = run_session(make_spec(tmp_path), link, env, sink)
    assert res.outcome == "completed", res.error
    steps = [f"StepStarted:{s}" for s in STEPS]
    got = [k for k in kinds(sink) if k.startswith("StepStarted")]
    assert got == steps[:8] + ["StepStarted:CleanupPhone"] + steps[8:]
    k = kinds(sink)
    assert k[0] == "SessionStarted" and k[-1] == "SessionFinished"
    assert k.index("DeviceConnected") < k.index("ClockMeasured") < k.index(
        "StepFinished:Preflight")
    assert k.count("ScenarioStepStarted") == 3
    m = json.loads((res.run_dir / "manifest.json").read_text())
    assert m["outcome"] == "completed" and m["schema_version"] == 1
    assert m["apps"] == [{"package": "com.example.app", "uid": 10111, "version": "1.2.3",
                          "version_code": "7"}]
    assert m["device"]["ip"] == "192.168.77.11" and m["device"]["abi"] == "x86_64"
    assert m["clock"]["offset_s"] == pytest.approx(1.5, abs=0.2)
    assert [s["step"] for s in m["steps"]][:5] == list(STEPS[:5])
    # every value reaching the phone's shell is quoted
    start = next(c for c in link.commands if "strace_launcher.sh" in c and "setsid" in c)
    assert "com.example.app" in start and start.startswith("su -c '")
    assert res.session_id == "FAKE0001_app_chat_r1"


def test_a_phone_vanishing_mid_scenario_fails_the_session_and_keeps_what_it_has(
        tmp_path: Path) -> None:
    link = make_fake_phone()

    def vanish(_c: str) -> str:
        link.vanish_after = len(link.calls) - 1
        raise DeviceError("FAKE0001: device 'FAKE0001' not found")

    link.on(r"^input keyevent", vanish)
    sink = ev.RecordingSink()
    res = run_session(make_spec(tmp_path), link, Environment(runs_root=tmp_path / "runs"), sink)
    assert res.outcome == "failed"
    assert "FAKE0001" in (res.error or "")
    k = kinds(sink)
    assert k[-1] == "SessionFailed" and "DeviceLost" in k
    assert k.count("DeviceLost") == 1
    assert "StepFinished:RunScenario:FAIL" in k
    # teardown was attempted even though the phone was gone; no labelling
    assert "StepStarted:StopTracers" in k and "StepStarted:PullArtifacts" in k
    assert "StepStarted:Label" not in k
    m = json.loads((res.run_dir / "manifest.json").read_text())
    assert m["outcome"] == "failed" and "FAKE0001" in m["error"]["message"]
    assert (res.run_dir / "packages.txt").exists()  # collected before the failure
    assert {e["step"] for e in m["errors"]} >= {"StopTracers", "PullArtifacts"}


def test_bad_tracer_and_missing_app_fail_in_preflight(tmp_path: Path) -> None:
    sink = ev.RecordingSink()
    res = run_session(make_spec(tmp_path, tracer="dtrace"), make_fake_phone(),
                      Environment(runs_root=tmp_path / "r1"), sink)
    assert res.outcome == "failed" and "tracer" in (res.error or "")
    link = make_fake_phone().on(r"^pm list packages", "package:other uid:10001\n")
    res = run_session(make_spec(tmp_path), link, Environment(runs_root=tmp_path / "r2"), sink)
    assert res.outcome == "failed" and "com.example.app is not installed" in (res.error or "")


def test_split_pcap_keeps_the_phone_and_the_window(tmp_path: Path) -> None:
    import struct

    def pkt(src: str, dst: str) -> bytes:
        ip = bytes([0x45, 0, 0, 20, 0, 0, 0, 0, 64, 17, 0, 0]) + bytes(map(int, src.split("."))) \
            + bytes(map(int, dst.split(".")))
        return b"\x00" * 12 + b"\x08\x00" + ip

    src = tmp_path / "batch.pcap"
    with open(src, "wb") as f:
        f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
        for ts, a, b in ((10, "10.0.0.2", "1.1.1.1"), (11, "10.0.0.3", "1.1.1.1"),
                         (12, "1.1.1.1", "10.0.0.2"), (20, "10.0.0.2", "1.1.1.1")):
            d = pkt(a, b)
            f.write(struct.pack("<IIII", ts, 0, len(d), len(d)) + d)
        f.write(struct.pack("<IIII", 13, 0, 100, 100) + b"short")  # truncated tail
    assert split_pcap([src], tmp_path / "out.pcap", ["10.0.0.2"], 9.5, 15) == 2


# ----------------------------------------------------------------------------- virtual lab

try:
    from tests.vlab_fixture import VLab, skip_reason, start_vlab
    SKIP = skip_reason()
except Exception as exc:  # pragma: no cover - the lab's modules are missing
    SKIP = f"virtual lab fixture unavailable: {exc}"


@pytest.fixture(scope="module")
def vlab() -> Iterator[VLab]:
    if SKIP:
        pytest.skip(SKIP)
    lab = start_vlab(1, clock_offsets=(0.25,))
    try:
        yield lab
    finally:
        import shutil

        lab.close()
        shutil.rmtree(lab.tmp, ignore_errors=True)


def _env(lab: VLab, name: str) -> Environment:
    cap = TcpdumpCapture("br0", lab.tmp / f"cap-{name}", netns=lab.ap.name)
    return Environment(runs_root=lab.tmp / f"runs-{name}", client=lab.client, capture=cap,
                       launcher_interval=0.2)


def _link(lab: VLab) -> Any:
    from controller.device import AdbDeviceLink

    return AdbDeviceLink(lab.client, lab.phones[0].address)


@pytest.mark.root
@pytest.mark.slow
def test_e2e_session_in_the_virtual_lab_produces_labelled_mirage_json(vlab: VLab) -> None:
    ph = vlab.phones[0]
    sink = ev.RecordingSink()
    spec = SessionSpec(serial=ph.address, app="signal", activity="chat", wait_scale=0.1,
                       device_name=ph.name)
    env = _env(vlab, "ok")
    res = run_session(spec, _link(vlab), env, sink)
    assert res.outcome == "completed", res.error
    assert not env.capture.running  # the session started the capture, so it stopped it
    k = kinds(sink)
    assert [x for x in k if x.startswith("StepFinished")] == \
        [f"StepFinished:{s}" for s in STEPS[:8]] + ["StepFinished:CleanupPhone"] + \
        [f"StepFinished:{s}" for s in STEPS[8:]]
    assert "FlowsLabelled" in k and k[-1] == "SessionFinished"
    caps = sink.of(ev.CaptureProgressed)
    assert len(caps) >= 2 and caps[-1].packets > 0  # live counters, then the session's split
    assert [c.packets for c in caps[:-1]] == sorted(c.packets for c in caps[:-1])
    tracers = sink.of(ev.TracerProgressed)
    assert tracers and tracers[-1].pids and tracers[-1].lines > 0  # syscalls seen so far

    from analysis.runinfo import load_manifest

    m = load_manifest(res.run_dir)
    assert m.outcome == "completed" and m.device.ip == ph.ip and m.device.model == "SM-G991B"
    assert m.apps[0].package == "org.thoughtcrime.securesms" and m.apps[0].uid == 10263
    raw = json.loads((res.run_dir / "manifest.json").read_text())
    assert abs(raw["clock"]["offset_s"] - 0.25) <= raw["clock"]["uncertainty_s"] + 0.05
    assert raw["tool_versions"].get("tcpdump") and raw["tool_versions"].get("strace")
    for name, a in raw["artifacts"].items():  # every artifact's checksum holds
        assert hashlib.sha256((res.run_dir / name).read_bytes()).hexdigest() == a["sha256"]
    assert m.traces.strace and m.traces.netstat == "netstat.log"
    assert any(re.search(r"strace\.\d+\.org\.thoughtcrime\.securesms\.log$", s)
               for s in m.traces.strace)
    # the split holds only the phone's packets
    out = subprocess.run(["tcpdump", "-nr", str(res.run_dir / "capture.pcap"), "not", "host",
                          ph.ip], capture_output=True, text=True)
    assert out.stdout.strip() == ""
    mirage = list((res.run_dir / "labels").rglob("*_org.thoughtcrime.securesms_*.json"))
    assert len(mirage) == 1
    flows = json.loads(mirage[0].read_text())
    labels = [v["flow_metadata"]["BF_label"] for v in flows.values()]
    assert labels.count("org.thoughtcrime.securesms") >= 3
    # never an app the phone does not run; a socket netstat saw only by its uid keeps the
    # honest "uid:N" label (type unlabelled) when that uid is missing from packages.txt
    assert {x for x in labels if not x.startswith("uid:")} <= {
        "org.thoughtcrime.securesms", "org.telegram.messenger", "com.whatsapp", "unknown"}
    # label again later, from the run directory alone
    again = subprocess.run([sys.executable, "-m", "controller.cli", "label", str(res.run_dir),
                            "-o", str(vlab.tmp / "relabel"), "-q"], cwd=REPO,
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    redo = list((vlab.tmp / "relabel").rglob("*_org.thoughtcrime.securesms_*.json"))
    assert json.loads(redo[0].read_text()).keys() == flows.keys()


@pytest.mark.root
@pytest.mark.slow
def test_e2e_cancel_mid_scenario_tears_down_and_keeps_artifacts(vlab: VLab) -> None:
    ph = vlab.phones[0]
    cancel = threading.Event()
    sink = ev.RecordingSink()

    def watch(e: ev.Event) -> None:
        sink(e)
        if isinstance(e, ev.ScenarioStepStarted) and e.index == 2:
            cancel.set()

    spec = SessionSpec(serial=ph.address, app="telegram", activity="audio_call",
                       device_name=ph.name, params={"call_seconds": "30"})
    t0 = time.monotonic()
    res = run_session(spec, _link(vlab), _env(vlab, "cancel"), watch, cancel)
    assert time.monotonic() - t0 < 30
    assert res.outcome == "stopped"
    m = json.loads((res.run_dir / "manifest.json").read_text())
    assert m["outcome"] == "stopped"
    done = {s["step"]: s["ok"] for s in m["steps"]}
    assert done["StopTracers"] and done["StopCapture"] and done["PullArtifacts"]
    assert (res.run_dir / "capture.pcap").exists() and (res.run_dir / "netstat.log").exists()
    # nothing of the session is left running on the phone
    left = []
    for pid in ph.ns.pids():
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "strace" in cmd or "netstat_poller" in cmd:
            left.append(cmd)
    assert left == []
