"""The lab's truth file, its scoring, and the lab commands that need no namespaces."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from controller.lab.truth import LabelledFlow, read_truth, score, truth_csv_text

SIGNAL, WA = "org.thoughtcrime.securesms", "com.whatsapp"


def make_event(event: str, t: float, lport: int, app: str = SIGNAL, pid: int = 100,
               proto: str = "tcp", rip: str = "76.223.92.165", rport: int = 443) -> str:  # fmt: skip
    return json.dumps({"event": event, "time": t, "proto": proto, "local_ip": "192.168.77.11",
                       "local_port": lport, "remote_ip": rip, "remote_port": rport, "app": app,
                       "uid": 10263, "pid": pid, "phone": "R5CR10ABCDE", "host": "h",
                       "role": "chat"})  # fmt: skip


def make_flow(lport: int, label: str, start: float, end: float, **kw: Any) -> LabelledFlow:
    base = dict(proto="tcp", local_ip="192.168.77.11", local_port=lport,
                remote_ip="76.223.92.165", remote_port=443, label=label, start=start, end=end)  # fmt: skip
    base.update(kw)
    return LabelledFlow(**base)  # type: ignore[arg-type]


@pytest.fixture
def truth_file(tmp_path: Path) -> Path:
    lines = [
        make_event("open", 100.0, 40000),
        make_event("open", 101.0, 40001, app=WA, pid=200, rip="157.240.0.53"),
        "not json",
        make_event("close", 105.0, 40000),
        # the same 5-tuple reused later by another process
        make_event("open", 200.0, 40000, app=WA, pid=300),
        make_event("close", 201.0, 40000, app=WA, pid=300),
        make_event("open", 150.0, 50000, proto="udp", rip="3.121.83.105", rport=3478),
    ]
    p = tmp_path / "truth.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return p


def test_read_truth_pairs_open_and_close(truth_file: Path) -> None:
    truth = read_truth(truth_file)
    assert [(t.app, t.local_port, t.start, t.end) for t in truth] == [
        (SIGNAL, 40000, 100.0, 105.0),
        (WA, 40001, 101.0, None),
        (WA, 40000, 200.0, 201.0),
        (SIGNAL, 50000, 150.0, None),
    ]
    csv = truth_csv_text(truth).splitlines()
    assert csv[0].startswith("proto,local_ip,local_port,remote_ip,remote_port,app,time")
    assert csv[1].startswith(
        "tcp,192.168.77.11,40000,76.223.92.165,443,org.thoughtcrime.securesms,100.0"
    )


def test_score_precision_and_recall(truth_file: Path) -> None:
    truth = read_truth(truth_file)
    flows = [
        make_flow(40000, SIGNAL, 100.1, 104.0),  # right
        make_flow(40000, SIGNAL, 200.1, 200.9),  # port reuse: that one was WhatsApp's
        # the reverse direction of WhatsApp's chat flow, right
        make_flow(
            443,
            WA,
            101.0,
            110.0,
            local_ip="157.240.0.53",
            remote_ip="192.168.77.11",
            remote_port=40001,
        ),  # fmt: skip
        make_flow(9999, WA, 101.0, 102.0),  # no such socket: wrong
    ]
    s = score(flows, truth)
    assert (s[SIGNAL].labelled, s[SIGNAL].correct, s[SIGNAL].precision) == (2, 1, 0.5)
    assert (s[WA].labelled, s[WA].correct) == (2, 1)
    # recall: Signal's UDP socket was never labelled; WhatsApp's reused port neither
    assert (s[SIGNAL].truth, s[SIGNAL].recalled) == (2, 1)
    assert (s[WA].truth, s[WA].recalled) == (2, 1)
    only = score(flows, truth, apps=[SIGNAL], window=(0, 160))
    assert list(only) == [SIGNAL] and only[SIGNAL].truth == 2


def test_score_min_lifetime_leaves_short_sockets_out(truth_file: Path) -> None:
    s = score([make_flow(40000, SIGNAL, 100.1, 104.0)], read_truth(truth_file), min_lifetime=2.0)
    assert (s[SIGNAL].truth, s[SIGNAL].recalled) == (2, 1)  # the open UDP socket counts


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    from controller.cli import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
    out = capsys.readouterr()
    return int(exc.value.code or 0), out.out, out.err


def test_lab_up_without_root_is_one_line(monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:  # fmt: skip
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    code, _out, err = run_cli(["lab", "up", "--state-dir", str(tmp_path)], capsys)
    assert code == 1
    assert err.count("\n") <= 2 and "needs root" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_lab_status_and_truth_without_a_lab(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, out, _err = run_cli(["lab", "status", "--state-dir", str(tmp_path)], capsys)
    assert code == 0 and "no lab is up" in out
    code, _out, err = run_cli(["lab", "truth", "--state-dir", str(tmp_path)], capsys)
    assert code == 1 and "no lab is up" in err and "Traceback" not in err


def test_lab_score_command(
    truth_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    labels = tmp_path / "labels.csv"
    labels.write_text(
        "proto,local_ip,local_port,remote_ip,remote_port,label,start,end,labeling_type,sublabel,source\n"
        f"tcp,192.168.77.11,40000,76.223.92.165,443,{SIGNAL},100.1,104.0,exact,,netstat\n"
    )
    code, out, _err = run_cli(["lab", "score", str(labels), "--truth", str(truth_file)], capsys)
    assert code == 0
    assert f"{SIGNAL}: precision 100.0% (1/1), recall 50.0% (1/2)" in out
