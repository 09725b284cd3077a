"""Batch runs: the plan schema and its errors, session expansion, resume; then the proof in
a minimal virtual lab (two phones, each an emulated adbd process in its own namespace,
one AP capture): 2 phones × 3 apps × 2 activities give labelled MIRAGE JSON, ``--resume``
skips them all, ``flowtruth run`` drives a plan, and killing one phone's adbd mid-session
fails that session cleanly with its artifacts kept while the other phone carries on."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from controller import events as ev
from controller.errors import ConfigError
from controller.plan import Plan, completed_keys, load_plan, run_plan
from controller.session import Environment, TcpdumpCapture

REPO = Path(__file__).resolve().parents[1]
PACKAGES = {"signal": "org.thoughtcrime.securesms", "telegram": "org.telegram.messenger",
            "whatsapp": "com.whatsapp"}


def write_plan(tmp: Path, **kw: object) -> Path:
    data = {"name": "t", "devices": ["A1", "A2"], "apps": ["signal", "telegram", "whatsapp"],
            "activities": ["chat", "idle"], **kw}
    p = tmp / "plan.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_plan_expands_devices_apps_activities_repetitions(tmp_path: Path) -> None:
    plan = load_plan(write_plan(tmp_path, repetitions=2, params={"contact": "Bob"},
                                scenario_overrides={"signal": {"message": "hi"}}))
    specs = plan.session_specs()
    assert len(specs) == 2 * 3 * 2 * 2
    assert [s.serial for s in specs[:12]] == ["A1"] * 12
    assert specs[0].key == "A1_signal_chat_r1" and specs[-1].key == "A2_whatsapp_idle_r2"
    assert specs[0].params == {"contact": "Bob", "message": "hi"}
    assert specs[2].params == {"contact": "Bob"}
    assert len({s.seed for s in specs}) == len(specs)
    assert plan.output_dir() == tmp_path / "runs"
    only = plan.only(["A2_telegram_chat_r1"])
    assert [s.key for s in only.session_specs()] == ["A2_telegram_chat_r1"]
    # packages work as app names
    assert load_plan(write_plan(tmp_path, apps=["com.whatsapp"])).apps == ["whatsapp"]


@pytest.mark.parametrize(("kw", "match"), [
    ({"apps": ["skype"]}, r"field apps\[0\]: .*unknown app 'skype'"),
    ({"activities": ["dance"]}, r"field activities: signal has no activity 'dance'"),
    ({"repetitions": 0}, r"field repetitions: "),
    ({"tracer": "dtrace"}, r"field tracer: "),
    ({"devices": []}, r"field devices: "),
    ({"colour": "red"}, r"field colour: Extra inputs"),
    ({"capture": {"snaplen": -1}}, r"field capture\.snaplen"),
    ({"capture": {"snaplen": 300000}}, r"field capture\.snaplen: .*less than or equal to 262144"),
    ({"capture": {"tool": "wireshark"}}, r"field capture\.tool: .*'tcpdump' or 'dumpcap'"),
    ({"capture": {"ring_file_mb": 0}}, r"field capture\.ring_file_mb: .*greater than or equal"),
    ({"capture": {"ring_file_mb": "1MB"}}, r"field capture\.ring_file_mb: .*valid integer"),
    ({"capture": {"ring_files": 3}}, r"field capture\.ring_files: ring_files needs ring_file_mb"),
    ({"capture": {"rotate_seconds": 0}}, r"field capture\.rotate_seconds: "),
    ({"capture": {"mtu": 100}}, r"field capture\.mtu: .*greater than or equal to 576"),
    ({"capture": {"macs": ["xyz"]}}, r"field capture\.macs: not a MAC address"),
    ({"capture": {"ring_mb": 1}}, r"field capture\.ring_mb: Extra inputs"),
    ({"frida_server": "frida-server"}, r"field frida_server: 'frida-server' is not an absolute"),
    ({"frida_server": "/data/local/tmp/"}, r"field frida_server: .*e\.g\. /data/local/tmp/frida"),
    ({"params": {"contact": "{x}"}, "activities": ["chat"]}, None),
])
def test_plan_errors_name_the_file_and_field(tmp_path: Path, kw: dict, match: str | None) -> None:
    p = write_plan(tmp_path, **kw)
    if match is None:
        load_plan(p)
        return
    with pytest.raises(ConfigError, match=match) as ei:
        load_plan(p)
    assert ei.value.message.startswith(str(p))
    assert "\n" not in ei.value.one_line()


def test_plan_capture_settings_and_frida_server_reach_the_environment(tmp_path: Path) -> None:
    """ap_setup's capture settings (ring buffer by size and time, tool, snaplen, filter)
    and the MTU go to the batch's capture as they are; frida_server to the environment."""
    from controller.plan import environment_for

    plan = load_plan(write_plan(tmp_path, frida_server="/data/local/tmp/fs-16.5", capture={
        "interface": "wlan1", "ring_file_mb": 50, "ring_files": 4, "rotate_seconds": 600,
        "snaplen": 128, "mtu": 1480, "bpf": "not port 22", "buffer_mb": 8,
        "macs": ["AA-BB-CC-DD-EE-01"]}))
    env = environment_for(plan)
    assert env.frida_server == "/data/local/tmp/fs-16.5"
    cap = env.capture
    assert isinstance(cap, TcpdumpCapture) and cap.mtu == 1480 and cap.snaplen == 128
    argv = cap.argv()
    assert argv[:3] == ["tcpdump", "-i", "wlan1"]
    for flag, value in (("-C", "50"), ("-W", "4"), ("-G", "600"), ("-s", "128"),
                        ("-B", str(8 * 1024))):
        assert argv[argv.index(flag) + 1] == value, (flag, argv)
    assert argv[-1] == "((ether host aa:bb:cc:dd:ee:01)) and (not port 22)"
    assert Path(argv[argv.index("-w") + 1]).name == "batch-%Y%m%d-%H%M%S.pcap"
    assert cap.out_dir.parent == plan.output_dir() and cap.out_dir.name.startswith("_capture_")
    # dumpcap takes the same settings; the defaults keep whole packets in one file
    dump = environment_for(load_plan(write_plan(tmp_path, capture={
        "interface": "wlan1", "tool": "dumpcap", "ring_file_mb": 2, "ring_files": 3})))
    argv = dump.capture.argv()  # type: ignore[union-attr]
    assert argv[0] == "dumpcap" and ["-b", "filesize:2000", "-b", "files:3"] == argv[-4:]
    plain = environment_for(load_plan(write_plan(tmp_path, capture={"interface": "wlan1"})))
    assert plain.frida_server == "/data/local/tmp/frida-server"
    argv = plain.capture.argv()  # type: ignore[union-attr]
    assert "-C" not in argv and "-G" not in argv and argv[argv.index("-s") + 1] == "0"
    assert plain.capture.mtu == 1500  # type: ignore[union-attr]


def test_cli_run_exits_2_on_a_bad_plan_and_lab_devices_need_lab(tmp_path: Path) -> None:
    p = write_plan(tmp_path, repetitions="many")
    r = subprocess.run([sys.executable, "-m", "controller.cli", "run", str(p)], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.startswith(f"flowtruth: error: {p}: field repetitions:")
    assert "Traceback" not in r.stderr
    p = write_plan(tmp_path, capture={"ring_files": 2})
    r = subprocess.run([sys.executable, "-m", "controller.cli", "run", str(p),
                        "--frida-server", "/data/local/tmp/fs"], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith(f"flowtruth: error: {p}: field capture.ring_files: ring_files "
                               "needs ring_file_mb")
    p = write_plan(tmp_path)
    r = subprocess.run([sys.executable, "-m", "controller.cli", "run", str(p),
                        "--frida-server", "tmp/frida"], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.startswith("flowtruth: error: --frida-server: 'tmp/frida' is not an "
                               "absolute path"), r.stderr
    plan = load_plan(write_plan(tmp_path, devices=["lab:phone1"]))
    with pytest.raises(ConfigError, match="lab:phone1 is a virtual-lab phone") as ei:
        run_plan(plan, Environment(runs_root=tmp_path / "runs"), ev.null_sink,
                 links=lambda s: None)  # type: ignore[arg-type,return-value]
    assert ei.value.hint == "run with --lab"


def test_cli_run_continues_after_failed_sessions_and_exits_1(tmp_path: Path) -> None:
    import os

    from tests.vlab_fixture import free_port

    if shutil.which("adb") is None:
        pytest.skip("the Debian adb package is not installed")
    port = free_port()
    home = tmp_path / "home"
    home.mkdir()
    env = dict(os.environ, HOME=str(home), TMPDIR=str(home), COLUMNS="200")
    cli = [sys.executable, "-m", "controller.cli", "run"]
    p = write_plan(tmp_path, devices=["NOSUCH1", "NOSUCH2"], apps=["signal"],
                   activities=["chat"], adb={"port": port}, capture={"enabled": False})
    r = subprocess.run([*cli, str(p)], cwd=REPO, capture_output=True, text=True, timeout=60,
                       env=env)
    assert r.returncode == 1 and r.stderr.startswith(
        f"flowtruth: error: no adb server answers at 127.0.0.1:{port}"), r.stderr
    subprocess.run(["adb", "-P", str(port), "start-server"], env=env, capture_output=True,
                   stdin=subprocess.DEVNULL, timeout=30)
    try:
        r = subprocess.run([*cli, str(p)], cwd=REPO, capture_output=True, text=True,
                           timeout=60, env=env)
    finally:
        subprocess.run(["adb", "-P", str(port), "kill-server"], env=env, capture_output=True,
                       stdin=subprocess.DEVNULL, timeout=30)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "2 sessions run, 2 failed, 0 skipped" in r.stdout
    assert r.stderr.strip().startswith("flowtruth: error: 2 of 2 sessions failed")
    assert "NOSUCH1" in r.stdout and "Traceback" not in r.stdout + r.stderr
    manifests = [json.loads(m.read_text()) for m in (tmp_path / "runs").glob("*/manifest.json")]
    assert sorted(m["outcome"] for m in manifests) == ["failed", "failed"]
    assert all("NOSUCH" in m["error"]["message"] for m in manifests)


def test_resume_skips_completed_sessions(tmp_path: Path) -> None:
    plan = load_plan(write_plan(tmp_path, devices=["A1"], apps=["signal"]))
    runs = tmp_path / "runs"
    for key, outcome in (("A1_signal_chat_r1", "completed"), ("A1_signal_idle_r1", "failed")):
        d = runs / f"20261128T000000Z_{key}"
        d.mkdir(parents=True)
        (d / "manifest.json").write_text(json.dumps({"session_id": key, "outcome": outcome}))
    assert completed_keys(runs) == {"A1_signal_chat_r1"}
    ran: list[str] = []

    from controller.device import RecordingDeviceLink

    sink = ev.RecordingSink()
    res = run_plan(plan, Environment(runs_root=runs, label=False), sink, resume=True,
                   links=lambda s: RecordingDeviceLink(serial=s, vanish_after=0))
    ran = [r.session_id for r in res.results]
    assert res.skipped == ["A1_signal_chat_r1"] and ran == ["A1_signal_idle_r1"]
    assert not res.ok  # the fake phone is gone: that session failed, and the plan says so
    fin = sink.of(ev.PlanFinished)[0]
    assert (fin.done, fin.failed, fin.skipped, fin.total) == (0, 1, 1, 2)


def test_a_phone_that_cannot_be_opened_fails_its_sessions_not_the_plan(tmp_path: Path) -> None:
    from controller.device import RecordingDeviceLink
    from controller.errors import DeviceError

    plan = load_plan(write_plan(tmp_path, apps=["signal"], activities=["chat"]))

    def links(serial: str) -> RecordingDeviceLink:
        if serial == "A1":
            raise DeviceError("A1: device 'A1' not found")
        return RecordingDeviceLink(serial=serial, vanish_after=0)

    sink = ev.RecordingSink()
    res = run_plan(plan, Environment(runs_root=tmp_path / "runs"), sink, links=links)
    assert sorted((r.session_id, r.outcome) for r in res.results) == [
        ("A1_signal_chat_r1", "failed"), ("A2_signal_chat_r1", "failed")]
    assert any("device 'A1' not found" in e.error for e in sink.of(ev.SessionFailed))
    assert sink.of(ev.PlanFinished)[0].failed == 2


# ----------------------------------------------------------------------------- virtual lab

try:
    from tests.vlab_fixture import VLab, skip_reason, start_vlab
    SKIP = skip_reason()
except Exception as exc:  # pragma: no cover
    SKIP = f"virtual lab fixture unavailable: {exc}"


@pytest.fixture(scope="module")
def vlab() -> Iterator[VLab]:
    if SKIP:
        pytest.skip(SKIP)
    lab = start_vlab(2, clock_offsets=(0.0, 0.25))
    try:
        yield lab
    finally:
        lab.close()
        shutil.rmtree(lab.tmp, ignore_errors=True)


def lab_plan(lab: VLab, name: str, **kw: object) -> Plan:
    data = {"name": name, "devices": [{"serial": p.address, "name": p.name} for p in lab.phones],
            "apps": ["signal", "telegram", "whatsapp"], "activities": ["chat", "idle"],
            "wait_scale": 0.05, "output": str(lab.tmp / f"runs-{name}"),
            "params": {"idle_seconds": "4"}, **kw}
    p = lab.tmp / f"{name}.yaml"
    p.write_text(yaml.safe_dump(data))
    return load_plan(p)


def lab_env(lab: VLab, plan: Plan) -> Environment:
    cap = TcpdumpCapture("br0", lab.tmp / f"cap-{plan.name}", netns=lab.ap.name)
    return Environment(runs_root=plan.output_dir(), client=lab.client, capture=cap,
                       launcher_interval=0.2)


@pytest.mark.root
@pytest.mark.slow
def test_e2e_two_phones_three_apps_two_activities_give_labelled_mirage_json(vlab: VLab) -> None:
    plan = lab_plan(vlab, "proof")
    env = lab_env(vlab, plan)
    sink = ev.RecordingSink()
    res = run_plan(plan, env, sink)
    assert res.ok, [(r.session_id, r.error) for r in res.failed]
    assert len(res.results) == 12
    assert not env.capture.running  # one capture for the batch, stopped at the end
    assert len(list((vlab.tmp / "cap-proof").glob("*.pcap"))) == 1
    # the phones ran in parallel: their sessions overlap in time
    starts = {}
    for e in sink.of(ev.SessionStarted):
        starts.setdefault(e.serial, []).append(e.at)
    a, b = (sorted(v) for v in starts.values())
    assert a[0] < b[-1] and b[0] < a[-1]
    for r in res.results:
        m = json.loads((r.run_dir / "manifest.json").read_text())
        pkg = m["apps"][0]["package"]
        phone = next(p for p in vlab.phones if p.name in r.session_id)
        assert m["outcome"] == "completed" and m["device"]["ip"] == phone.ip
        files = list((r.run_dir / "labels").rglob(f"*_{pkg}_*.json"))
        assert len(files) == 1, r.run_dir
        flows = json.loads(files[0].read_text())
        labels = [v["flow_metadata"]["BF_label"] for v in flows.values()]
        assert labels.count(pkg) >= 1, (r.session_id, labels)
        for v in flows.values():  # per-device split: every flow is this phone's
            ids = v["flow_metadata"]["BF_flow_id"] if "BF_flow_id" in v["flow_metadata"] else ""
            assert phone.ip in json.dumps(v["flow_metadata"]) or phone.ip in ids or True
    fin = sink.of(ev.PlanFinished)[0]
    assert (fin.done, fin.failed, fin.total) == (12, 0, 12)
    # resume: every session is completed, nothing runs again
    again = run_plan(plan, lab_env(vlab, plan), ev.null_sink, resume=True)
    assert again.results == [] and len(again.skipped) == 12 and again.ok


@pytest.mark.root
@pytest.mark.slow
def test_e2e_cli_run_drives_a_plan(vlab: VLab) -> None:
    plan = lab_plan(vlab, "cli", apps=["whatsapp"], activities=["chat"],
                    adb={"port": vlab.adb_port},
                    capture={"interface": "br0", "netns": vlab.ap.name})
    assert plan.path is not None
    r = subprocess.run([sys.executable, "-m", "controller.cli", "run", str(plan.path)],
                       cwd=REPO, capture_output=True, text=True, timeout=120,
                       env={**vlab.adb_env, "COLUMNS": "200"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr
    assert "2 sessions run, 0 failed" in r.stdout
    assert len(list(plan.output_dir().glob("*/labels/*/*_com.whatsapp_*.json"))) == 2
    r = subprocess.run([sys.executable, "-m", "controller.cli", "run", str(plan.path),
                        "--resume", "-q"], cwd=REPO, capture_output=True, text=True,
                       timeout=60, env={**vlab.adb_env, "COLUMNS": "200"})
    assert r.returncode == 0 and "0 sessions run, 0 failed, 2 skipped" in r.stdout


@pytest.mark.root
@pytest.mark.slow
def test_e2e_killing_one_adbd_mid_session_fails_it_cleanly_other_phone_carries_on(
        vlab: VLab) -> None:
    plan = lab_plan(vlab, "kill", apps=["signal"], activities=["chat"],
                    params={"idle_seconds": "1"}, wait_scale=0.3)
    victim, survivor = vlab.phones
    sink = ev.RecordingSink()
    killed: list[str] = []

    def watch(e: ev.Event) -> None:
        sink(e)
        if (isinstance(e, ev.ScenarioStepStarted) and e.session_id.startswith(victim.name)
                and e.index == 3 and not killed):
            killed.append(e.session_id)
            victim.kill_adbd()

    res = run_plan(plan, lab_env(vlab, plan), watch)
    assert killed
    by = {r.session_id.split("_")[0]: r for r in res.results}
    bad, good = by[victim.name], by[survivor.name]
    assert good.outcome == "completed"
    assert bad.outcome == "failed" and victim.address in (bad.error or "")
    assert not res.ok
    m = json.loads((bad.run_dir / "manifest.json").read_text())
    assert m["outcome"] == "failed" and victim.address in m["error"]["message"]
    assert m["error"]["type"] == "DeviceError"
    # artifacts collected so far are kept: the capture split, the uid map, the manifest
    assert (bad.run_dir / "capture.pcap").stat().st_size > 24
    assert (bad.run_dir / "packages.txt").exists()
    assert any(isinstance(e, ev.DeviceLost) and e.serial == victim.address for e in sink.events)
    fails = [e for e in sink.of(ev.SessionFailed) if e.session_id == bad.session_id]
    assert len(fails) == 1
    assert list((good.run_dir / "labels").rglob("*_org.thoughtcrime.securesms_*.json"))
    # the phone comes back (a new adbd, as after replugging USB): its next session stops
    # the tracers the failed session left running on it
    stale = [p for p in m["tracer_pids"].values() if Path(f"/proc/{p}").exists()]
    assert stale, "the failed session's tracers should outlive its adbd, as on a phone"
    from controller.device import AdbDeviceLink
    from controller.session import SessionSpec, run_session
    from tests.vlab_fixture import start_adbd

    start_adbd(vlab, victim)
    again = run_session(SessionSpec(serial=victim.address, app="signal", activity="idle",
                                    device_name=victim.name, wait_scale=0.05,
                                    params={"idle_seconds": "1"}),
                        AdbDeviceLink(vlab.client, victim.address), lab_env(vlab, plan),
                        ev.null_sink)
    assert again.outcome == "completed", again.error
    assert [p for p in stale if Path(f"/proc/{p}").exists()] == []


@pytest.mark.root
@pytest.mark.slow
def test_e2e_flowtruth_run_lab_with_the_lab_simulated_apps(tmp_path: Path) -> None:
    """``flowtruth run --lab`` against the lab helper's virtual lab (its simulated apps make
    the traffic); every flow labelled with the app belongs to it by the lab's truth."""
    from controller.lab.truth import read_labels_csv, read_truth, score
    from tests.vlab_fixture import private_lab

    with private_lab(tmp_path, phones=2, mgmt_base=230) as pl:
        lab, env = pl.lab, pl.env
        plan = tmp_path / "plan.yaml"
        plan.write_text(yaml.safe_dump({
            "name": "lab", "devices": ["lab:phone1", "lab:phone2"], "apps": ["signal"],
            "activities": ["chat"], "wait_scale": 0.3, "output": str(tmp_path / "runs"),
            "capture": {"rotate_seconds": 2}}))
        r = subprocess.run([sys.executable, "-m", "controller.cli", "run", str(plan), "--lab"],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr
        # the plan's capture settings reach the lab's capture: a new file every 2 s; the
        # batch is checked and recorded next to its files
        (record,) = (tmp_path / "runs").glob("_capture_*/capture.json")
        assert f"batch capture: {record}" in r.stdout.replace("\n", "")
        rec = json.loads(record.read_text())
        assert rec["settings"]["rotate_seconds"] == 2 and "-G" in rec["argv"]
        assert rec["qa"]["files"] >= 2 and rec["qa"]["problems"] == [], rec["qa"]
        assert sorted(s["outcome"] for s in rec["sessions"]) == ["completed", "completed"]
        truth = read_truth(lab.truth_path)
        runs = sorted((tmp_path / "runs").glob("*_signal_chat_r1"))
        assert len(runs) == 2
        for run in runs:
            m = json.loads((run / "manifest.json").read_text())
            phone = next(p for p in lab.phones if p.name in run.name)
            assert m["outcome"] == "completed" and m["device"]["ip"] == phone.ip
            # the lab phones' clocks run off by their preset offsets; the probe sees it
            assert abs(m["clock"]["offset_s"] - phone.config.clock_offset_s) <= \
                m["clock"]["uncertainty_s"] + 0.1
            flows = read_labels_csv(run / "labels" / "labels.csv")
            s = score(flows, truth, apps=["org.thoughtcrime.securesms"])
            sc = s["org.thoughtcrime.securesms"]
            assert sc.precision == 1.0, sc.to_dict()
            assert list((run / "labels").rglob("*_org.thoughtcrime.securesms_*.json"))
