"""Lab phones whose strace fails as on real phones (a real seccomp filter on everything su
runs gives strace the kernel's own errors): the session completes, its manifest names every
untraced process and why, a warning says so, and its labels come from the netstat poller."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from controller import events as ev

SIGNAL = "org.thoughtcrime.securesms"
REPO = Path(__file__).resolve().parents[1]


@pytest.mark.root
@pytest.mark.slow
def test_sessions_on_phones_whose_strace_is_denied_label_from_netstat(tmp_path: Path) -> None:
    from controller.device import AdbDeviceLink
    from controller.lab.truth import read_labels_csv, read_truth, score
    from controller.session import Environment, SessionSpec, run_session
    from tests.vlab_fixture import private_lab

    faults = {1: {"strace_fault": "selinux"}, 2: {"strace_fault": "ptrace"}}
    expect = {1: ("selinux", "wait4(__WALL): Permission denied"),
              2: ("ptrace", "Operation not permitted")}
    with private_lab(tmp_path, phones=2, mgmt_base=225, phone_updates=faults) as pl:
        lab = pl.lab
        env = Environment.for_lab(lab, tmp_path / "runs", launcher_interval=0.2)
        truth_path = lab.truth_path
        for phone in lab.phones:
            cause, words = expect[phone.index]
            sink = ev.RecordingSink()
            spec = SessionSpec(serial=phone.serial, app="signal", activity="chat",
                               wait_scale=0.3, device_name=phone.name)
            res = run_session(spec, AdbDeviceLink(env.client, phone.serial), env, sink)
            assert res.outcome == "completed", res.error
            m = json.loads((res.run_dir / "manifest.json").read_text())
            # the phone's address at the AP, not its mobile data's (rmnet_data0 comes first)
            assert m["device"]["ip"] == phone.ip
            # found by the authority: the AP's DHCP lease for the phone's Wi-Fi MAC
            assert (m["device"]["ip_source"], m["device"]["mac"]) == ("dhcp-lease", phone.mac)
            assert "10.200." not in " ".join(m["capture"]["filter"]["addresses"])
            procs = m["tracers"]["processes"]
            assert procs and m["tracers"]["untraced"] == len(procs), procs
            for p in procs:
                assert (p["status"], p["cause"], p["name"]) == ("denied", cause, SIGNAL), p
                assert words in p["reason"], p
            assert m["tracers"]["labels_from"].startswith("netstat")
            own = "".join(f.read_text() for f in (res.run_dir / "strace").glob("strace.*.err"))
            assert words in own, own
            warned = [e.text for e in sink.of(ev.LogRecorded) if e.level == "warning"]
            assert any("labels come from the netstat poller" in w and cause in w
                       for w in warned), warned
            # labels from netstat alone, and right by the lab's truth
            q = json.loads((res.run_dir / "labels" / "quality.json").read_text())
            assert q["by_source"].get("netstat", {}).get("flows", 0) >= 1, q["by_source"]
            assert not q["by_source"].get("strace", {}).get("flows"), q["by_source"]
            flows = read_labels_csv(res.run_dir / "labels" / "labels.csv")
            sc = score(flows, read_truth(truth_path), apps=[SIGNAL])[SIGNAL]
            assert sc.precision == 1.0 and sc.recalled >= 1, sc.to_dict()
            # the check after PushScripts saw it coming, and said what to do
            tc = m["tracing_check"]
            assert (tc["selinux"], tc["root_ptrace"], tc["cause"]) == ("Enforcing", "failed",
                                                                       cause), tc
            assert tc["ptrace_scope"] in (0, 1, 2, None)
            pre = {w["check"]: w for w in m["preflight"]}
            assert words in pre["root_ptrace"]["message"] and pre["root_ptrace"]["fix"]
            assert any(e.check == "root_ptrace" for e in sink.of(ev.PreflightWarned))
        # `flowtruth devices` checks the same before any session (strace stays on the phone)
        r = subprocess.run([sys.executable, "-m", "controller.cli", "devices", "--lab",
                            "--no-clock"], cwd=REPO, env=pl.env, capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        text = " ".join(r.stdout.split())
        assert text.count("root cannot trace apps") == 2, r.stdout
        assert "setenforce 0" in text, r.stdout
