"""The plan's capture settings reach ap_setup's capture, and the batch capture is checked
and recorded: a plan with a 1 MB ring buffer run in the lab helper's virtual lab (through
``lab_environment_for``, as ``flowtruth run --lab``) writes several capture files, the
session's split is cut from all of them, and ``capture.json`` next to them records the
counters, the QA of every file and their checksums; a flagged batch QA is a warning."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from controller import events as ev
from controller.plan import (
    PlanResult,
    lab_environment_for,
    load_plan,
    record_batch_capture,
    run_plan,
)
from controller.session import SessionResult, TcpdumpCapture

BLAST_PACKETS, BLAST_PAYLOAD = 2600, 1000  # 2.7 MB on the wire: at least three 1 MB files

BLAST = r'''
import socket, sys, time
host, n, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range(n):
    s.sendto(i.to_bytes(4, "big") * (size // 4), (host, 9))
    if i % 100 == 99:
        time.sleep(0.01)
'''


@pytest.mark.root
@pytest.mark.slow
def test_e2e_ring_buffer_plan_in_the_lab_splits_from_every_file_and_records_the_batch(
        tmp_path: Path) -> None:
    from tests.vlab_fixture import private_lab

    with private_lab(tmp_path, phones=1, mgmt_base=235) as pl:
        lab = pl.lab
        (tmp_path / "plan.yaml").write_text(yaml.safe_dump({
            "name": "ring", "devices": ["lab:phone1"], "apps": ["signal"],
            "activities": ["chat"], "wait_scale": 0.2, "output": str(tmp_path / "runs"),
            "capture": {"ring_file_mb": 1, "snaplen": 0, "mtu": 1500}}))
        plan = load_plan(tmp_path / "plan.yaml")
        environment = lab_environment_for(plan, lab)
        cap = environment.capture
        assert isinstance(cap, TcpdumpCapture)
        assert "-C" in cap.argv() and cap.argv()[cap.argv().index("-C") + 1] == "1"
        phone = lab.phones[0]
        sink = ev.RecordingSink()

        def blast_once(e: ev.Event) -> None:
            sink(e)
            # the phone uploads 2.7 MB inside the session's window (the engine waits)
            if isinstance(e, ev.ScenarioStepStarted) and e.index == 1:
                subprocess.run(["ip", "netns", "exec", phone.netns, sys.executable, "-c", BLAST,
                                lab.ap.address, str(BLAST_PACKETS), str(BLAST_PAYLOAD)],
                               check=True, timeout=30)

        res = run_plan(plan, environment, blast_once)
        assert res.ok, [(r.session_id, r.error) for r in res.failed]
        (run,) = res.results
        m = json.loads((run.run_dir / "manifest.json").read_text())
        files = sorted(cap.files())
        assert len(files) >= 3, files
        # the session's split comes from every file the ring buffer wrote
        assert len(m["capture"]["source"]) >= 3
        assert m["capture"]["packets"] >= BLAST_PACKETS
        # the batch record, next to the capture files
        assert res.capture_record == cap.out_dir / "capture.json"
        rec = json.loads(res.capture_record.read_text())
        assert rec["schema_version"] == 1 and rec["plan"] == "ring"
        assert rec["settings"]["ring_file_mb"] == 1 and rec["argv"] == cap.argv()
        assert [f["name"] for f in rec["files"]] == [f.name for f in cap.files()]
        for f in rec["files"]:
            digest = hashlib.sha256((cap.out_dir / f["name"]).read_bytes()).hexdigest()
            assert f["sha256"] == digest
        qa = rec["qa"]
        assert qa["files"] == len(files) and qa["packets"] >= m["capture"]["packets"]
        assert qa["packets"] == rec["stats"]["packets_captured"]  # nothing overwritten
        assert qa["problems"] == [] and qa["overwritten"] == 0 and qa["mtu"] == 1500
        assert rec["sessions"] == [{"session_id": run.session_id, "outcome": "completed",
                                    "run_dir": str(run.run_dir)}]
        logs = [e for e in sink.of(ev.LogRecorded) if "batch capture QA" in e.text]
        assert [e.level for e in logs] == ["info"], logs


def test_a_flagged_batch_capture_is_recorded_and_warned(tmp_path: Path) -> None:
    """Frames over the MTU, drops, and a ring buffer that overwrote packets (the program
    wrote more than its files hold) each flag the batch; the record is still written."""
    from tests.pcapgen import Pkt, ether, make_udp, write_pcap

    plan = load_plan(write_plan(tmp_path))
    cap = TcpdumpCapture("wlan1", tmp_path / "_capture_x", mtu=1400)
    cap.out_dir.mkdir()
    phone, ap = "192.168.50.11", "192.168.50.1"
    for i in range(2):
        write_pcap(cap.out_dir / f"batch.pcap{i}",
                   [Pkt(1_764_370_000.0 + i + k / 10,
                        ether(make_udp(phone, ap, 40000, 9, b"x" * (1000 + 500 * k))))
                    for k in range(3)])
    stats = {"packets_captured": 9, "packets_received_by_filter": 9,
             "packets_dropped_by_kernel": 2}
    sink = ev.RecordingSink()
    result = PlanResult(results=[SessionResult("A1_signal_chat_r1", tmp_path / "r1",
                                               "completed")])
    path = record_batch_capture(plan, cap, stats, result, sink, 1_764_370_000.0)
    assert path == cap.out_dir / "capture.json"
    rec = json.loads(path.read_text())
    qa = rec["qa"]
    assert (qa["files"], qa["packets"], qa["oversize_frames"], qa["drops"]) == (2, 6, 4, 2)
    assert qa["overwritten"] == 3
    assert len(qa["problems"]) == 3 and "larger than the MTU 1400" in qa["problems"][0]
    assert "overwrote the oldest 3" in qa["problems"][2]
    assert not list(cap.out_dir.glob(".*.part"))  # written through a temporary file
    checking, warning = sink.of(ev.LogRecorded)
    assert checking.level == "info" and "checking the batch capture: 2 file(s)" in checking.text
    assert warning.level == "warning" and warning.text.startswith("batch capture QA: ")
    assert str(path) in warning.text
    # a record that cannot be written is an error event, never an exception
    cap2 = TcpdumpCapture("wlan1", tmp_path / "plan.yaml" / "sub", mtu=1400)
    assert record_batch_capture(plan, cap2, {}, result, sink, 0.0) is None
    assert sink.of(ev.LogRecorded)[-1].level == "error"


def write_plan(tmp: Path) -> Path:
    p = tmp / "plan.yaml"
    p.write_text(yaml.safe_dump({"name": "t", "devices": ["A1"], "apps": ["signal"],
                                 "activities": ["chat"]}))
    return p
