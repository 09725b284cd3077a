"""``flowtruth run --lab --tracer frida`` against the lab helper's virtual lab: two phones
running the lab's simulated apps (threads, TLS, their own DNS) at once, frida attached to
each phone's app from the controller during an audio call (its UDP sockets are opened
after the attach; the chat connection before it); every flow labelled with the app belongs
to it by the lab's truth, and each phone's frida log holds only that phone's sockets."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PKG = "org.thoughtcrime.securesms"


@pytest.mark.root
@pytest.mark.slow
def test_e2e_flowtruth_run_lab_tracer_frida(tmp_path: Path) -> None:
    pytest.importorskip("frida")
    from controller.lab.truth import read_labels_csv, read_truth, score
    from tests import frida_helpers
    from tests.vlab_fixture import private_lab

    dirs0 = frida_helpers.frida_dirs()  # the CLI's frida helpers inherit this run's mark
    try:
        with private_lab(tmp_path, phones=2, mgmt_base=240) as pl:
            lab, env = pl.lab, pl.env
            plan = tmp_path / "plan.yaml"
            plan.write_text(yaml.safe_dump({
                "name": "lab-frida", "devices": ["lab:phone1", "lab:phone2"], "apps": ["signal"],
                "activities": ["audio_call"], "params": {"call_seconds": "4"}, "wait_scale": 0.3,
                "output": str(tmp_path / "runs")}))
            r = subprocess.run([sys.executable, "-m", "controller.cli", "run", str(plan), "--lab",
                                "--tracer", "frida", "-q"],
                               cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
            assert r.returncode == 0, r.stdout[-3000:] + r.stderr
            truth = read_truth(lab.truth_path)
            runs = sorted((tmp_path / "runs").glob("*_signal_audio_call_r1"))
            assert len(runs) == 2
            for run in runs:
                m = json.loads((run / "manifest.json").read_text())
                phone = next(p for p in lab.phones if p.name in run.name)
                assert m["outcome"] == "completed" and m["tracer"] == "frida"
                assert m["traces"]["frida"] == "frida.jsonl" and m["traces"]["strace"] == []
                assert m["frida"]["clock_shift_s"] == phone.config.clock_offset_s
                events = [json.loads(x) for x in (run / "frida.jsonl").read_text().splitlines()]
                assert {e["process"] for e in events} == {PKG}
                # this phone's app only: the other phone runs the same package
                mine = {phone.ip, *([phone.ip6] if phone.ip6 else [])}
                locals_ = {e["local"]["ip"] for e in events if e["local"] and e["local"]["ip"]}
                assert locals_ and locals_ <= mine | {"127.0.0.1", "::1"}, (locals_, mine)
                q = json.loads((run / "labels" / "quality.json").read_text())
                assert q["by_source"].get("frida", {}).get("flows", 0) >= 1, q["by_source"]
                flows = read_labels_csv(run / "labels" / "labels.csv")
                sc = score(flows, truth, apps=[PKG])[PKG]
                assert sc.precision == 1.0, sc.to_dict()
                assert sc.recalled >= 1, sc.to_dict()
    finally:
        frida_helpers.cleanup(dirs0)
