"""`flowtruth flows` end to end: outputs, names, exit codes, damaged input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from controller.cli import main
from tests.pcapgen import ACK, PSH, Conv, write_pcap


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as ei:
        main([str(a) for a in args])
    out = capsys.readouterr()
    return ei.value.code, out.out, out.err


def test_json_file_output_and_summary(tmp_path, capsys, shared_data):
    out = tmp_path / "sig.json"
    code, so, se = run_cli(["flows", shared_data / "ndpi_pcaps" / "signal.pcap", "-o", out,
                            "--label", "org.thoughtcrime.securesms"], capsys)
    assert code == 0, se
    assert "637 packets, 18 bi-flows (636 packets), 1 skipped (not TCP or UDP: 1)" in so
    data = json.loads(out.read_text())
    assert len(data) == 18
    rec = next(iter(data.values()))
    assert list(rec) == ["packet_data", "flow_features", "flow_metadata"]
    assert rec["flow_metadata"]["BF_label"] == "org.thoughtcrime.securesms"


def test_directory_output_gets_mirage_names(tmp_path, capsys, shared_data):
    code, so, se = run_cli(["flows", shared_data / "ndpi_pcaps" / "whatsapp.pcap", "-o",
                            tmp_path / "out", "--label", "com.whatsapp", "--device-model",
                            "SM-G991B", "--device-mac", "aa:bb:cc:dd:ee:ff", "--format",
                            "mirage2022"], capsys)
    assert code == 0, se
    files = list((tmp_path / "out").glob("*/*.json"))
    assert len(files) == 1
    assert files[0].parent.name == "SM-G991B_aa_bb_cc_dd_ee_ff"
    assert files[0].name.split("_")[1] == "com.whatsapp"
    assert files[0].name.endswith("_mirage2020dataset_labeled_biflows_all_packets_encryption_metadata.json")


def test_parquet_output_has_schema_version(tmp_path, capsys, shared_data):
    from analysis.parquet_io import read_parquet

    out = tmp_path / "t.parquet"
    code, so, se = run_cli(["flows", shared_data / "ndpi_pcaps" / "telegram.pcap",
                            "--format", "parquet", "-o", out, "--device-ip", "192.168.0.0/16"],
                           capsys)
    assert code == 0, se
    df = read_parquet(out)
    assert len(df) > 10 and "pkt_ip_len" in df.columns
    import pyarrow.parquet as pq

    meta = pq.read_schema(out).metadata
    assert meta[b"schema_version"] == b"1" and b"capture_stats" in pq.ParquetFile(out).metadata.metadata


@pytest.mark.parametrize("args,needle", [
    (["--format", "parquet", "-o", "x.json"], "needs a .parquet"),
    (["--device-ip", "not-an-ip"], "--device-ip"),
    (["--idle-timeout", "0"], "must be positive"),
])
def test_bad_arguments_exit_2_with_one_line(tmp_path, capsys, shared_data, args, needle):
    args = [a if a != "x.json" else tmp_path / a for a in args]
    if "-o" not in args:
        args += ["-o", tmp_path / "o.json"]
    code, so, se = run_cli(["flows", shared_data / "ndpi_pcaps" / "signal.pcap", *args], capsys)
    assert code == 2 and needle in se and len(se.strip().splitlines()) == 1


def test_every_odd_capture_gives_flows_or_one_line_exit_2(tmp_path, capsys, shared_data):
    files = sorted(p for p in (shared_data / "odd_pcaps").iterdir()
                   if p.suffix in (".pcap", ".pcapng"))
    assert len(files) > 100
    failed = 0
    for f in files:
        code, so, se = run_cli(["flows", f, "-o", tmp_path / "o.json"], capsys)
        assert code in (0, 2), (f.name, se)
        assert "Traceback" not in se
        if code == 2:
            failed += 1
            lines = se.strip().splitlines()
            assert len(lines) == 1 and str(f) in lines[0] and "byte offset" in lines[0], se
        else:
            assert " bi-flows " in so
            for w in se.strip().splitlines():
                assert w.startswith("flowtruth: warning: ") and "byte offset" in w
    assert failed <= 5


def test_real_process_exit_status_and_no_traceback(tmp_path):
    bad = tmp_path / "bad.pcap"
    bad.write_bytes(b"this is not a capture at all")
    exe = [sys.executable, "-m", "controller.cli"]
    r = subprocess.run([*exe, "flows", str(bad), "-o", str(tmp_path / "o.json")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"{bad}: byte offset 0: not a pcap or pcapng file" in r.stderr
    c = Conv()
    c.handshake().tcp(0.1, True, PSH | ACK, b"x")
    good = write_pcap(tmp_path / "good.pcap", c.pkts)
    r = subprocess.run([*exe, "flows", str(good), "-o", str(tmp_path / "o.parquet"),
                        "--format", "parquet"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("4 packets, 1 bi-flows")


def test_unwritable_output_is_one_line(tmp_path, capsys, shared_data):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, so, se = run_cli(["flows", shared_data / "ndpi_pcaps" / "signal.pcap", "-o",
                            blocker / "sub" / "o.json"], capsys)
    assert code == 1 and "cannot write" in se and len(se.strip().splitlines()) == 1


def test_usage_errors_exit_2_without_traceback(tmp_path):
    exe = [sys.executable, "-m", "controller.cli"]
    for args in (["flows", "--format", "json", "x.pcap", "-o", "y.json"], ["nosuch"],
                 ["flows", "--no-such-option"]):
        r = subprocess.run([*exe, *args], capture_output=True, text=True, timeout=60)
        assert r.returncode == 2, (args, r.stderr)
        assert "Traceback" not in r.stderr and "Error" in r.stderr
