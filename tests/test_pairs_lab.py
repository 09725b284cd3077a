"""Paired phones in the real virtual lab (``controller.lab.topology.Lab``, a private adb
server): ``flowtruth run --lab`` with ``pairs: [[phone1, phone2]]`` and an audio call:
phone1 calls phone2's owner, phone2's session answers; both sessions are verified, each
with its role and peer, both phones' traffic is labelled and the role is in MIRAGE 2022's
``BF_sublabel``. A caller whose peer does not answer (no session runs on phone2) fails
verification with the reason and keeps its capture and traces; a peer that cannot even
start fails the other side at once, naming it."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from controller import events as ev

REPO = Path(__file__).resolve().parents[1]
SIGNAL = "org.thoughtcrime.securesms"

pytestmark = [pytest.mark.root, pytest.mark.slow]


@pytest.fixture(scope="module")
def pl(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from tests.vlab_fixture import private_lab

    with private_lab(tmp_path_factory.mktemp("pairs-lab"), phones=2, mgmt_base=225) as lab:
        yield lab


def _manifest(run: Path) -> dict[str, Any]:
    return json.loads((run / "manifest.json").read_text())


def test_a_pair_places_and_answers_an_audio_call_both_verified(pl: Any, tmp_path: Path) -> None:
    from controller.lab.truth import read_labels_csv, read_truth, score

    lab = pl.lab
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump({
        "name": "pair", "devices": ["lab:phone1", "lab:phone2"], "pairs": [["phone1", "phone2"]],
        "apps": ["signal"], "activities": ["audio_call"], "wait_scale": 0.2,
        "params": {"call_seconds": "10"}, "output": str(tmp_path / "runs"),
        "label": {"format": "mirage2022"}}))
    r = subprocess.run([sys.executable, "-m", "controller.cli", "run", str(plan), "--lab"],
                       cwd=REPO, env=pl.env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    runs = {p.name.split("_", 1)[1]: p for p in (tmp_path / "runs").glob("*_signal_audio_call_r1")}
    assert set(runs) == {"phone1_signal_audio_call_r1", "phone2_signal_audio_call_r1"}
    owners = {p.name: p.owner for p in lab.phones}
    truth = read_truth(lab.truth_path)
    for me, peer, role in (("phone1", "phone2", "caller"), ("phone2", "phone1", "callee")):
        run = runs[f"{me}_signal_audio_call_r1"]
        m = _manifest(run)
        sc = m["scenario"]
        assert m["outcome"] == "completed", m["error"]
        assert (sc["verified"], sc["role"], sc["peer"]) == (True, role, peer), sc
        assert sc["app_version"] and sc["steps"]
        assert m["params"]["contact"] == owners[peer]  # the peer's owner, a contact here
        # both phones' traffic is captured and labelled, the role in BF_sublabel
        flows = read_labels_csv(run / "labels" / "labels.csv")
        assert flows and score(flows, truth, apps=[SIGNAL])[SIGNAL].precision == 1.0
        (mirage,) = list((run / "labels").rglob(f"*_{SIGNAL}_*.json"))
        meta = [v["flow_metadata"] for v in json.loads(mirage.read_text()).values()]
        mine = [x for x in meta if x["BF_label"] == SIGNAL]
        assert mine and all(x["BF_sublabel"].endswith(f":{role}") for x in mine)
        assert {x["BF_activity"] for x in meta} == {"audio_call"}
        # the sides met before the session, the scenario, the first action and the end
        assert set(sc["pair"]) == {"start_wait_s", "scenario_wait_s", "ready_wait_s",
                                   "done_wait_s"}, sc["pair"]
    # lockstep: both scenarios started together
    w = [_manifest(runs[f"{p}_signal_audio_call_r1"])["scenario"]["log"][0]["at"]
         for p in ("phone1", "phone2")]
    assert abs(w[0] - w[1]) < 3


def test_a_call_nobody_answers_fails_verification_and_keeps_the_artifacts(
        pl: Any, tmp_path: Path) -> None:
    from controller.device import AdbDeviceLink
    from controller.session import Environment, SessionSpec, run_session

    lab = pl.lab
    env = Environment.for_lab(lab, runs_root=tmp_path / "runs")
    phone1, phone2 = lab.phones
    spec = SessionSpec(serial=phone1.serial, app="signal", activity="audio_call",
                       device_name="phone1", role="caller", peer="phone2", wait_scale=0.2,
                       params={"contact": phone2.owner, "call_seconds": "10",
                               "answer_timeout": "15"})
    # the callee's session is not running: nobody answers phone1's call
    res = run_session(spec, AdbDeviceLink(env.client, phone1.serial), env, ev.null_sink)
    assert res.outcome == "failed"
    m = _manifest(res.run_dir)
    sc = m["scenario"]
    assert sc["verified"] is False and sc["role"] == "caller" and sc["peer"] == "phone2"
    assert sc["reason"] and sc["reason"] in m["error"]["message"], (sc, m["error"])
    assert "\n" not in m["error"]["message"]
    # the capture and the traces are kept, and the last screen's dump
    assert (res.run_dir / "capture.pcap").stat().st_size > 24
    assert m["traces"]["strace"] and all((res.run_dir / f).exists()
                                         for f in m["traces"]["strace"])
    assert m["artifacts"]["capture.pcap"]["sha256"]
    assert list(res.run_dir.glob("*.xml")), sorted(p.name for p in res.run_dir.iterdir())


def test_a_peer_that_cannot_start_fails_the_other_side_at_once(pl: Any, tmp_path: Path) -> None:
    import time

    from controller.device import AdbDeviceLink
    from controller.errors import DeviceError
    from controller.plan import Plan, run_plan
    from controller.session import Environment

    lab = pl.lab
    env = Environment.for_lab(lab, runs_root=tmp_path / "runs")
    phone2 = lab.phones[1].serial

    def links(serial: str) -> AdbDeviceLink:
        if serial == phone2:
            raise DeviceError(f"{serial}: device offline", hint="reconnect it")
        return AdbDeviceLink(env.client, serial)

    plan = Plan(name="p", devices=["lab:phone1", "lab:phone2"], pairs=[["phone1", "phone2"]],
                apps=["signal"], activities=["chat"], wait_scale=0.2, pair_timeout=120,
                output=str(tmp_path / "runs"))
    t0 = time.monotonic()
    res = run_plan(plan, env, ev.null_sink, links=links, serials=env.serials)
    assert time.monotonic() - t0 < 60  # not the pair timeout
    by = {r.session_id: r for r in res.results}
    one = by["phone1_signal_chat_r1"]
    assert one.outcome == "failed"
    assert one.error.startswith("peer phone2: its signal_chat_r1 session failed ("), one.error
    assert "device offline" in one.error
    m = _manifest(one.run_dir)
    assert (m["scenario"]["verified"], m["scenario"]["role"]) == (False, "caller")
