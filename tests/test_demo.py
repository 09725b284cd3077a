"""`flowtruth demo` end to end: the virtual lab, the session engine, labels scored on the truth."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from controller.lab.topology import skip_reason

REPO = Path(__file__).resolve().parents[1]


def _namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    return {line.split()[0] for line in out.stdout.splitlines() if line.strip()}


@pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")
def test_demo_labels_every_flow_right_and_leaves_nothing_behind(tmp_path):
    before = _namespaces()
    out = tmp_path / "demo"
    r = subprocess.run([sys.executable, "-m", "controller.cli", "demo", "--out", str(out), "-q"],
                       cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    score = json.loads((out / "score.json").read_text())
    assert not score["failed_sessions"]
    assert len(score["sessions"]) == 12
    # the two phones are a pair: every session verified, with its role and peer
    assert score["unverified_sessions"] == []
    assert sorted((v["session"].split("_")[0], v["role"], v["peer"]) for v in
                  score["verification"]) == sorted(
        [("phone1", "caller", "phone2")] * 6 + [("phone2", "callee", "phone1")] * 6)
    assert "every session verified (12), each with its role and peer" in r.stdout.replace(
        "\n", " ")
    for m in (out / "runs").glob("*_audio_call_r1/manifest.json"):
        sc = json.loads(m.read_text())["scenario"]
        assert sc["verified"] is True and sc["role"] in ("caller", "callee"), sc
    total = score["total"]
    assert total["labelled"] > 0 and total["precision"] == 1.0
    assert total["recall"] >= 0.99
    assert set(score["apps"]) == {"org.thoughtcrime.securesms", "org.telegram.messenger",
                                  "com.whatsapp"}
    truth = (out / "truth.csv").read_text().splitlines()
    assert truth[0].startswith("proto,local_ip,local_port,remote_ip,remote_port,app,time")
    assert list((out / "runs").rglob("*_MIRAGE-2019_traffic_dataset_labeled_biflows.json"))
    assert not {n for n in _namespaces() - before if n.startswith("ftl-")}
    # A background app's flow is named by the session's package list, never uid:N while
    # packages.txt names that uid (the engine writes `pm list packages -U --show-versioncode`).
    from analysis.traces.uidmap import load_uid_map

    named = 0
    for labels in (out / "runs").rglob("labels.csv"):
        known = load_uid_map(labels.parent.parent / "packages.txt")
        for line in labels.read_text().splitlines()[1:]:
            lab = line.split(",")[5]
            if lab.startswith("uid:"):
                assert int(lab[4:]) not in known, f"{labels}: {lab} although packages.txt names it"
            named += lab in {p for ps in known.values() for p in ps}
    assert named > 0
