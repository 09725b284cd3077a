"""Lab phones whose strace fails as on real phones (a real seccomp filter on everything su
runs gives strace the kernel's own errors): the session completes, its manifest names every
untraced process and why, a warning says so, and its labels come from the netstat poller."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from controller import events as ev

SIGNAL = "org.thoughtcrime.securesms"


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
