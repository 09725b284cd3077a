"""The session engine: the whole event sequence over a recording fake (success, a phone
vanishing mid-scenario), then real sessions in a minimal virtual lab (namespaces, an
emulated adbd process per phone, the real adb server, real strace launcher and netstat
poller, real tcpdump at the AP) down to labelled MIRAGE JSON; a cancelled session tears
down and keeps its artifacts; ``flowtruth label RUN_DIR`` labels a run again."""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import statistics
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
    lab_frida,
    run_session,
    split_pcap,
)
from tests import frida_helpers  # marks this run's frida helpers (see its docstring)

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


def test_frida_session_over_a_fake_phone_warns_when_it_traced_nothing(
        tmp_path: Path, frida_cleanup: None) -> None:
    """tracer frida: the endpoint is opened in Preflight and let go at the end; the
    launcher is not started (only the poller); an app frida never saw is a warning, and
    the session still completes on the poller's data."""
    pytest.importorskip("frida")
    from controller.device import local_frida

    opened: list[Any] = []

    def frida_device(link: Any) -> Any:
        ep = local_frida(0.5)
        ep.closer = lambda: opened.append("closed")
        opened.append(link.serial)
        return ep

    link = make_fake_phone().on(r"echo \$!", "4243\n")  # one phone-side job: the poller
    sink = ev.RecordingSink()
    env = Environment(runs_root=tmp_path / "runs", label=False, frida_device=frida_device)
    res = run_session(make_spec(tmp_path, tracer="frida"), link, env, sink)
    assert res.outcome == "completed", res.error
    assert opened == ["FAKE0001", "closed"]
    assert not any("strace_launcher.sh" in c and "setsid" in c for c in link.commands)
    assert any("netstat_poller.sh" in c and "setsid" in c for c in link.commands)
    warns = [e.text for e in sink.of(ev.LogRecorded) if e.level == "warning"]
    assert any("frida attached to no process of com.example.app" in w for w in warns)
    m = json.loads((res.run_dir / "manifest.json").read_text())
    assert m["frida"]["device"] == "local" and m["frida"]["clock_shift_s"] == 0.5
    assert m["traces"]["frida"] is None and m["frida"]["processes"] == []


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


def test_phone_frida_starts_the_server_forwards_and_lets_go_when_it_does_not_answer(
        tmp_path: Path) -> None:
    """The real-phone frida path over a recording fake: a missing server is a ConfigError
    with the fix; a server that never answers through the forward is a DeviceError, and
    the forward is removed and the server this call started is stopped."""
    pytest.importorskip("frida")
    from controller.device import phone_frida
    from controller.errors import ConfigError

    link = make_fake_phone()
    with pytest.raises(ConfigError, match="no executable frida-server at /x y/frida-server"):
        phone_frida(link, "/x y/frida-server")
    link = make_fake_phone().on(r"\[ -x .*echo present", "present\n").on(r"setsid .*frida",
                                                                       "31337\n")
    t0 = time.monotonic()
    with pytest.raises(DeviceError, match="does not answer through adb forward") as err:
        phone_frida(link, "/x y/frida-server", port=27042, timeout=1.0)
    assert time.monotonic() - t0 < 15
    assert "frida Python package" in (err.value.hint or "")
    start = next(c for c in link.commands if "setsid" in c)
    su, c, inner = shlex.split(start)
    assert (su, c) == ("su", "-c") and shlex.split(inner)[:2] == ["setsid", "/x y/frida-server"]
    assert ("forward", "tcp:27042") in link.calls
    assert ("forward_remove", f"tcp:{40000 + 27042 % 1000}") in link.calls
    assert any(c.startswith("su -c 'kill 31337") for c in link.commands)


def test_capture_counters_follow_rotated_and_reused_files(tmp_path: Path) -> None:
    """The live counters add up every rotated file, read only what is new, and count a
    ring buffer's reused file name again from its start; tcpdump's SIGUSR1 report parses."""
    import os
    import struct

    from ap_setup.capture import parse_capture_stats

    def write(path: Path, n: int, size: int = 100) -> None:
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
            for i in range(n):
                f.write(struct.pack("<IIII", 10 + i, 0, size, size) + b"\0" * size)
        os.replace(tmp, path)  # a new inode, as tcpdump's ring buffer reopening a name

    cap = TcpdumpCapture("br0", tmp_path)
    write(tmp_path / "batch.pcap", 3)
    assert cap.counters() == (3, 24 + 3 * 116)
    write(tmp_path / "batch.pcap1", 2)
    with open(tmp_path / "batch.pcap1", "ab") as f:  # a record still being written
        f.write(struct.pack("<IIII", 20, 0, 100, 100) + b"\0" * 10)
    assert cap.counters()[0] == 5
    assert cap.counters()[0] == 5  # nothing new: nothing counted twice
    write(tmp_path / "batch.pcap", 1)
    assert cap.counters()[0] == 6
    assert parse_capture_stats(
        "tcpdump: listening on br0\ntcpdump: 52 packets captured, 53 packets received by "
        "filter, 1 packet dropped by kernel\n") == {
        "packets_captured": 52, "packets_received_by_filter": 53,
        "packets_dropped_by_kernel": 1}


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


def _env(lab: VLab, name: str, **kw: Any) -> Environment:
    cap = TcpdumpCapture("br0", lab.tmp / f"cap-{name}", netns=lab.ap.name)
    kw.setdefault("frida_device", lab_frida(
        {p.address: p.ns.name for p in lab.phones},
        {p.address: p.config.clock_offset_s for p in lab.phones}))
    return Environment(runs_root=lab.tmp / f"runs-{name}", client=lab.client, capture=cap,
                       launcher_interval=0.2, **kw)


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
    assert m.outcome == "completed" and m.device.ip == ph.ip and m.device.model == "SM-S936B"
    assert m.apps[0].package == "org.thoughtcrime.securesms" and m.apps[0].uid == 10263
    raw = json.loads((res.run_dir / "manifest.json").read_text())
    assert abs(raw["clock"]["offset_s"] - 0.25) <= raw["clock"]["uncertainty_s"] + 0.05
    assert raw["tool_versions"].get("tcpdump") and raw["tool_versions"].get("strace")
    # a healthy phone: root's strace stays attached, every process of the app was traced
    assert raw["tracing_check"]["root_ptrace"] == "ok", raw["tracing_check"]
    assert raw["tracers"]["processes"] and raw["tracers"]["untraced"] == 0, raw["tracers"]
    assert {p["status"] for p in raw["tracers"]["processes"]} == {"attached"}
    assert raw["tracers"]["labels_from"] == "strace and netstat"
    # the session owned the capture: tcpdump's final counters and ap_setup's QA
    st = raw["capture"]["stats"]
    assert st["packets_captured"] > 0 and st["packets_dropped_by_kernel"] == 0
    qa = raw["capture"]["qa"]
    # drops: the kernel's, and what reached tcpdump's buffer but was not written by its stop
    unwritten = max(0, st["packets_received_by_filter"] - st["packets_captured"])
    assert qa["packets"] == caps[-1].packets and qa["drops_known"]
    assert qa["drops"] == unwritten == caps[-1].drops
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


# ----------------------------------------------------------------------------- frida tracer


@pytest.fixture(scope="module")
def frida_cleanup() -> Iterator[None]:
    """End the frida helpers this test run started (by pid) and remove what they unpacked
    (:mod:`tests.frida_helpers`)."""
    pytest.importorskip("frida")
    dirs0 = frida_helpers.frida_dirs()
    yield
    frida_helpers.cleanup(dirs0)


def _app_pids(ph: Any, name: str) -> list[int]:
    out = []
    for pid in ph.ns.pids():
        try:
            argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
        except OSError:
            continue
        if argv0 == name:
            out.append(pid)
    return out


def _agent_threads(pid: int) -> set[str]:
    names = set()
    for t in Path(f"/proc/{pid}/task").iterdir():
        try:
            names.add(Path(t, "comm").read_text().strip())
        except OSError:
            continue
    return {n for n in names if n.startswith(("gum-js", "gmain", "gdbus", "frida", "pool-"))}


@pytest.mark.root
@pytest.mark.slow
@pytest.mark.parametrize("tracer", ["frida", "both"])
def test_e2e_frida_tracer_labels_the_app_and_records_its_log(
        vlab: VLab, frida_cleanup: None, tracer: str) -> None:
    """``tracer: frida`` (every process of the app) and ``both`` (frida on the main process,
    the strace launcher on a ``:remote`` process the test adds): labelled flows name the
    right app, never another, and the manifest records frida's log with its checksum."""
    from tests.vlab_fixture import AP_V4, APP, APP_PORTS, CLIENT_PY

    ph = vlab.phones[0]
    pkg = "org.thoughtcrime.securesms"
    remote = None
    if tracer == "both":
        uid = ph.config.packages[pkg].uid
        remote = ph.ns.popen([f"{pkg}:remote", "-I", "-S", "-c", APP, f"{pkg}:remote", AP_V4,
                              str(APP_PORTS[pkg])], executable=CLIENT_PY, uid=uid, gid=uid,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        (main_pid,) = _app_pids(ph, pkg)
        sink = ev.RecordingSink()
        spec = SessionSpec(serial=ph.address, app="signal", activity="chat", wait_scale=0.1,
                           device_name=ph.name, tracer=tracer)
        res = run_session(spec, _link(vlab), _env(vlab, f"frida-{tracer}"), sink)
        assert res.outcome == "completed", res.error
        assert _agent_threads(main_pid) == set()  # detached: the app runs on untraced
    finally:
        if remote is not None:
            remote.kill()
            remote.wait()
    raw = json.loads((res.run_dir / "manifest.json").read_text())
    assert raw["tracer"] == tracer and raw["traces"]["frida"] == "frida.jsonl"
    art = raw["artifacts"]["frida.jsonl"]
    assert hashlib.sha256((res.run_dir / "frida.jsonl").read_bytes()).hexdigest() == art["sha256"]
    assert raw["frida"]["device"].startswith("local (netns ") and raw["frida"]["errors"] == []
    assert raw["frida"]["role"] == ("main" if tracer == "both" else "all")
    assert raw["tool_versions"].get("frida")
    events = [json.loads(x) for x in (res.run_dir / "frida.jsonl").read_text().splitlines()]
    frida_pids = {e["pid"] for e in events}
    assert frida_pids == {main_pid}  # only this phone's app (the other phone has one too)
    assert any(e["event"] == "connect" and e["remote"] == {"ip": AP_V4, "port": APP_PORTS[pkg]}
               for e in events)
    # the agent's host-clock stamps were put on the phone's clock (the lab's 0.25 s offset):
    # a connect() is stamped 0.25 s after its SYN left the phone (AP clock = host clock)
    syns = subprocess.run(["tcpdump", "-tt", "-nr", str(res.run_dir / "capture.pcap"),
                           "tcp[tcpflags] == tcp-syn"], capture_output=True, text=True).stdout
    syn_at: dict[int, list[float]] = {}  # local port -> SYN times (ports get reused)
    for m in re.finditer(rf"^(\d+\.\d+) IP {re.escape(ph.ip)}\.(\d+) >", syns, re.M):
        syn_at.setdefault(int(m.group(2)), []).append(float(m.group(1)))
    lags = []
    for e in events:
        if e["event"] == "connect" and e["local"]:
            before = [t for t in syn_at.get(e["local"]["port"], []) if t <= e["ts"]]
            if before:
                lags.append(e["ts"] - max(before))
    # the median: one connect whose thread was descheduled between the agent's stamp and
    # the SYN (seen under heavy load) must not decide; unshifted stamps would give ~0
    assert len(lags) >= 3 and 0.2 < statistics.median(lags) < 0.35, lags
    strace_pids = {int(m.group(1)) for s in raw["traces"]["strace"]
                   if (m := re.search(r"strace\.(\d+)\.", s))}
    if tracer == "both":  # never both tracers on one pid
        assert remote is not None and strace_pids == {remote.pid}
        assert not strace_pids & frida_pids
    else:
        assert strace_pids == set()
    progress = [e for e in sink.of(ev.TracerProgressed) if e.tracer == "frida"]
    assert progress and progress[-1].pids == (main_pid,) and progress[-1].lines > 0
    q = json.loads(next((res.run_dir / "labels").rglob("quality.json")).read_text())
    assert q["by_source"].get("frida", {}).get("flows", 0) >= 3
    mirage = next((res.run_dir / "labels").rglob(f"*_{pkg}_*.json"))
    flows = json.loads(mirage.read_text())
    by_port = {port: p for p, port in APP_PORTS.items()}
    right = 0
    for key, v in flows.items():
        label = v["flow_metadata"]["BF_label"]
        truth = by_port.get(int(key.split(",")[3]))
        if truth is None or label in ("unknown",) or label.startswith("uid:"):
            continue
        assert label == truth, (key, label)  # precision: never a wrong app
        right += truth == pkg
    assert right >= 3


@pytest.mark.root
@pytest.mark.slow
def test_e2e_frida_on_a_phone_without_frida_server_fails_in_preflight(
        vlab: VLab, frida_cleanup: None) -> None:
    """Real-phone frida (frida-server via adb forward) through the real adb server: the lab
    phone has no frida-server, so the session fails before the capture, saying the fix."""
    ph = vlab.phones[0]
    sink = ev.RecordingSink()
    spec = SessionSpec(serial=ph.address, app="signal", activity="chat", wait_scale=0.1,
                       device_name=ph.name, tracer="frida")
    env = _env(vlab, "no-server", frida_device=None)
    res = run_session(spec, _link(vlab), env, sink)
    assert res.outcome == "failed"
    assert "no executable frida-server at /data/local/tmp/frida-server" in (res.error or "")
    assert "adb push" in (res.hint or "")
    k = kinds(sink)
    assert "StepFinished:Preflight:FAIL" in k and "StepStarted:StartCapture" not in k
    assert not env.capture.running


@pytest.mark.root
@pytest.mark.slow
def test_e2e_cancelled_frida_session_keeps_the_frida_log(vlab: VLab, frida_cleanup: None) -> None:
    """A session stopped mid-scenario still detaches frida, merges and records its log."""
    ph = vlab.phones[0]
    (main_pid,) = _app_pids(ph, "org.thoughtcrime.securesms")
    cancel = threading.Event()

    def watch(e: ev.Event) -> None:
        if isinstance(e, ev.ScenarioStepStarted) and e.index == 2:
            cancel.set()

    spec = SessionSpec(serial=ph.address, app="signal", activity="audio_call",
                       device_name=ph.name, params={"call_seconds": "30"}, tracer="frida")
    t0 = time.monotonic()
    res = run_session(spec, _link(vlab), _env(vlab, "frida-cancel"), watch, cancel)
    assert time.monotonic() - t0 < 30
    assert res.outcome == "stopped"
    m = json.loads((res.run_dir / "manifest.json").read_text())
    assert {s["step"]: s["ok"] for s in m["steps"]}["StopTracers"]
    assert m["traces"]["frida"] == "frida.jsonl" and "frida.jsonl" in m["artifacts"]
    assert (res.run_dir / "frida.jsonl").stat().st_size > 0
    assert _agent_threads(main_pid) == set()


# ----------------------------------------------------------------------------- capture (ap_setup)

BULK = r"""
import socket, sys, time
host, port, total = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
with socket.create_connection((host, port)) as s:
    sent = got = 0
    while sent < total:
        s.sendall(b"x" * 65536)
        sent += 65536
        while got < sent - 262144:
            got += len(s.recv(262144))
        time.sleep(0.01)
    s.shutdown(socket.SHUT_WR)
    while s.recv(262144):
        pass
"""


@pytest.mark.root
@pytest.mark.slow
def test_e2e_shared_capture_records_qa_drops_and_warns(vlab: VLab) -> None:
    """A capture the session shares (as a plan's): tcpdump's running counters at the
    session's start and end (SIGUSR1) and the QA of its packets land in the manifest; an
    MTU the lab's frames exceed is flagged and the session warns."""
    from ap_setup.config import CaptureConfig

    ph = vlab.phones[0]
    env = _env(vlab, "qa")
    env.capture = TcpdumpCapture("br0", vlab.tmp / "cap-qa", netns=vlab.ap.name, mtu=200,
                                 settings=CaptureConfig(snaplen=0))
    env.capture.start()
    try:
        sink = ev.RecordingSink()
        spec = SessionSpec(serial=ph.address, app="signal", activity="chat", wait_scale=0.1,
                           device_name=ph.name)
        res = run_session(spec, _link(vlab), env, sink)
        assert res.outcome == "completed", res.error
        assert env.capture.running  # not the session's to stop
    finally:
        final = env.capture.stop()
    raw = json.loads((res.run_dir / "manifest.json").read_text())
    cap = raw["capture"]
    start, end = cap["stats_at_start"], cap["stats"]
    assert 0 < start["packets_captured"] < end["packets_captured"] <= final["packets_captured"]
    assert end["packets_dropped_by_kernel"] == 0
    qa = cap["qa"]
    assert qa["mtu"] == 200 and qa["drops_known"] and qa["drops"] == 0
    assert qa["oversize_frames"] > 0 and qa["max_ip_length"] > 200
    assert any("larger than the MTU 200" in p for p in qa["problems"])
    warns = [e.text for e in sink.of(ev.LogRecorded) if e.level == "warning"]
    assert any("capture QA" in w and "MTU 200" in w for w in warns)


@pytest.mark.root
@pytest.mark.slow
def test_e2e_rotated_capture_is_split_from_every_file(vlab: VLab) -> None:
    """tcpdump rotating every 1 MB: the live counters follow the new files, and the
    session's capture.pcap holds the phone's packets of every rotated file."""
    from ap_setup.config import CaptureConfig
    from tests.vlab_fixture import AP_V4, APP_PORTS, CLIENT_PY

    ph = vlab.phones[0]
    env = _env(vlab, "ring")
    env.capture = TcpdumpCapture("br0", vlab.tmp / "cap-ring", netns=vlab.ap.name,
                                 settings=CaptureConfig(ring_file_mb=1))
    seen: list[ev.Event] = []
    bulk: list[subprocess.Popen[bytes]] = []

    def sink(e: ev.Event) -> None:
        seen.append(e)
        if isinstance(e, ev.ScenarioStepStarted) and e.index == 0:  # ~4 MB through the AP
            bulk.append(ph.ns.popen([str(CLIENT_PY), "-c", BULK, AP_V4,
                                     str(APP_PORTS["com.whatsapp"]), str(2 << 20)]))

    spec = SessionSpec(serial=ph.address, app="signal", activity="chat", wait_scale=0.1,
                       device_name=ph.name)
    try:
        res = run_session(spec, _link(vlab), env, sink)
    finally:
        for p in bulk:
            p.kill()
            p.wait()
    assert res.outcome == "completed", res.error
    raw = json.loads((res.run_dir / "manifest.json").read_text())
    files = env.capture.files()
    assert len(files) >= 3 and [Path(f).name for f in raw["capture"]["source"]] == \
        [f.name for f in files]
    assert files[0].name == "batch.pcap" and files[1].name == "batch.pcap1"
    # the split holds exactly the phone's packets of the window, from every file
    flt = raw["capture"]["filter"]
    want = 0
    for f in files:
        out = subprocess.run(["tcpdump", "-tt", "-nr", str(f), "host", ph.ip],
                             capture_output=True, text=True).stdout
        want += sum(1 for line in out.splitlines()
                    if flt["start"] <= float(line.split()[0]) <= flt["end"])
    assert raw["capture"]["packets"] == want > 1000
    per_file = [len(subprocess.run(["tcpdump", "-nr", str(f)], capture_output=True,
                                   text=True).stdout.splitlines()) for f in files]
    # live counters during the scenario went on past the first file; after the stop they
    # count every packet of every file
    live = [e.packets for e in seen if isinstance(e, ev.CaptureProgressed)][:-1]
    assert live == sorted(live) and live[-1] > per_file[0]
    assert env.capture.counters()[0] == sum(per_file)


@pytest.mark.root
@pytest.mark.slow
def test_e2e_adb_forward_reaches_a_port_on_the_phone(vlab: VLab) -> None:
    """What phone_frida reaches frida-server through: ``adb forward`` via the real adb
    server to a port on the phone (the lab's adbd connects from its own namespace, the
    host's here), and the forward's removal."""
    import socket

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]

    def echo() -> None:
        c, _ = srv.accept()
        with c:
            c.sendall(c.recv(100)[::-1])

    threading.Thread(target=echo, daemon=True).start()
    link = _link(vlab)
    local = link.forward(port)
    try:
        assert any(f.local == f"tcp:{local}" and f.remote == f"tcp:{port}"
                   for f in vlab.client.forward_list())
        with socket.create_connection(("127.0.0.1", local), timeout=10) as s:
            s.sendall(b"frida")
            assert s.recv(100) == b"adirf"
    finally:
        link.forward_remove(local)
        srv.close()
    assert not any(f.local == f"tcp:{local}" for f in vlab.client.forward_list())
    link.forward_remove(local)  # a missing forward is fine


@pytest.mark.root
@pytest.mark.slow
def test_e2e_phone_lost_mid_frida_session_keeps_the_frida_log(
        vlab: VLab, frida_cleanup: None) -> None:
    """The phone's adbd dies mid-scenario (a pulled cable): the session fails without
    hanging, frida still detaches and its log is merged and recorded with its checksum.
    (Last in the module: it restarts the phone's adbd at a new address.)"""
    from tests.vlab_fixture import start_adbd

    ph = vlab.phones[0]
    serial = ph.address
    (main_pid,) = _app_pids(ph, "org.thoughtcrime.securesms")
    killed: list[int] = []

    def watch(e: ev.Event) -> None:
        if isinstance(e, ev.ScenarioStepStarted) and e.index == 3 and not killed:
            killed.append(e.index)
            ph.kill_adbd()

    spec = SessionSpec(serial=ph.address, app="signal", activity="chat", wait_scale=0.3,
                       device_name=ph.name, tracer="frida")
    t0 = time.monotonic()
    try:
        res = run_session(spec, _link(vlab), _env(vlab, "frida-lost"), watch)
    finally:
        start_adbd(vlab, ph)
    assert killed and time.monotonic() - t0 < 90
    assert res.outcome == "failed" and serial in (res.error or "")
    m = json.loads((res.run_dir / "manifest.json").read_text())
    assert m["error"]["type"] == "DeviceError"
    steps = {s["step"]: s["ok"] for s in m["steps"]}
    assert steps["StopTracers"] is False and steps["StopCapture"] is True
    assert m["traces"]["frida"] == "frida.jsonl"
    assert hashlib.sha256((res.run_dir / "frida.jsonl").read_bytes()).hexdigest() == \
        m["artifacts"]["frida.jsonl"]["sha256"]
    assert "stop_error" not in m["frida"]
    assert _agent_threads(main_pid) == set()


def test_ap_daemon_restarts_during_a_session_go_into_its_manifest(tmp_path: Path) -> None:
    """The real supervisor restarts a killed AP daemon (``sleep`` standing in for
    dnsmasq) in the middle of a session; the session's manifest and events say so."""
    import os
    import signal

    from ap_setup.state import ApState
    from ap_setup.supervise import Supervisor, stop_daemon
    from tests.test_ap_supervise import FAST, make_state, wait_for

    state_path = make_state(tmp_path / "ap")
    sup = Supervisor(state_path, policy=FAST).start()
    sink = ev.RecordingSink()

    def hook(e: ev.Event) -> None:
        sink(e)
        if isinstance(e, ev.ScenarioStepStarted) and e.index == 1:
            st = ApState.load(state_path)
            assert st is not None
            old = st.processes["dnsmasq"].pid
            os.kill(old, signal.SIGKILL)

            def restarted() -> bool:
                s = ApState.load(state_path)
                return s is not None and s.processes["dnsmasq"].pid != old
            wait_for(restarted, what="the supervisor's restart")

    try:
        env = Environment(runs_root=tmp_path / "runs", label=False, ap_state=state_path)
        res = run_session(make_spec(tmp_path), make_fake_phone(), env, hook)
    finally:
        sup.stop()
        st = ApState.load(state_path)
        if st is not None:
            for rec in st.processes.values():
                stop_daemon(rec, timeout=1)
    assert res.outcome == "completed", res.error
    m = json.loads((res.run_dir / "manifest.json").read_text())
    (restart,) = m["ap"]["restarts"]
    assert restart["daemon"] == "dnsmasq" and restart["reason"].startswith("killed by SIGKILL")
    assert m["ap"]["gave_up"] == {} and m["ap"]["state"] == str(state_path)
    warnings = [e.text for e in sink.of(ev.LogRecorded) if e.level == "warning"]
    assert any("AP dnsmasq was restarted during the session" in w for w in warnings)
    # a session without an AP state file, or before any restart, records nothing of it
    res2 = run_session(make_spec(tmp_path), make_fake_phone(),
                       Environment(runs_root=tmp_path / "runs2", label=False,
                                   ap_state=tmp_path / "none.json"), ev.null_sink)
    assert "ap" not in json.loads((res2.run_dir / "manifest.json").read_text())
