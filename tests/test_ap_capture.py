"""Capture argv, exit-report parsing, file ordering and the capture QA."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
from pathlib import Path

import dpkt
import pytest

from ap_setup.capture import (
    capture_argv,
    capture_files,
    capture_filter,
    parse_capture_stats,
    qa_capture,
)
from ap_setup.config import CaptureConfig

TCPDUMP_REPORT = """\
tcpdump: listening on wlan0, link-type EN10MB (Ethernet), snapshot length 262144 bytes
^C
1204 packets captured
1310 packets received by filter
7 packets dropped by kernel
2 packets dropped by interface
"""

DUMPCAP_REPORT = """\
Capturing on 'wlan0'
File: /tmp/x.pcap
Packets captured: 52
Packets received/dropped on interface 'wlan0': 52/3 (pcap:3/dumpcap:0/flushed:0/ps_ifdrop:0) (94.5%)
"""


def make_config(**over: object) -> CaptureConfig:
    return CaptureConfig.model_validate(over)


def test_tcpdump_argv_ring_by_size() -> None:
    argv = capture_argv(
        make_config(ring_file_mb=100, ring_files=20, snaplen=128), "wlan0", Path("/r")
    )
    assert argv[:7] == ["tcpdump", "-i", "wlan0", "-n", "-U", "-Z", "root"]
    assert argv[argv.index("-s") + 1] == "128"
    assert argv[argv.index("-w") + 1] == "/r/capture.pcap"
    assert argv[argv.index("-C") + 1] == "100" and argv[argv.index("-W") + 1] == "20"
    assert "--time-stamp-precision=nano" in argv and "--immediate-mode" in argv
    assert "-G" not in argv


def test_tcpdump_argv_time_rotation_uses_a_strftime_name_and_no_file_limit() -> None:
    argv = capture_argv(make_config(rotate_seconds=300, ring_files=5), "ftw0", Path("/r"))
    assert argv[argv.index("-w") + 1] == "/r/capture-%Y%m%d-%H%M%S.pcap"
    assert argv[argv.index("-G") + 1] == "300"
    assert "-W" not in argv  # with -G alone, -W would make tcpdump exit after N files


def test_filter_is_one_argv_element_per_device() -> None:
    cfg = make_config(macs=["AA:BB:CC:DD:EE:01"], ips=["192.168.50.11", "fe80::1"])
    bpf = capture_filter(cfg)
    assert bpf == "(ether host aa:bb:cc:dd:ee:01) or (host 192.168.50.11) or (host fe80::1)"
    assert capture_argv(cfg, "wlan0", Path("/r"))[-1] == bpf
    assert capture_filter(make_config()) is None


def test_dumpcap_argv() -> None:
    argv = capture_argv(
        make_config(tool="dumpcap", ring_file_mb=10, ring_files=3, rotate_seconds=60),
        "wlan0",
        Path("/r"),
    )
    assert argv[0] == "dumpcap" and "-P" in argv
    assert ["-b", "filesize:10000"] == argv[argv.index("-b") : argv.index("-b") + 2]
    assert "files:3" in argv and "duration:60" in argv


def test_parse_tcpdump_and_dumpcap_reports() -> None:
    assert parse_capture_stats(TCPDUMP_REPORT) == {
        "packets_captured": 1204,
        "packets_received_by_filter": 1310,
        "packets_dropped_by_kernel": 7,
        "packets_dropped_by_interface": 2,
    }
    assert parse_capture_stats(DUMPCAP_REPORT) == {
        "packets_captured": 52,
        "packets_received_by_filter": 52,
        "packets_dropped_by_kernel": 3,
    }
    assert parse_capture_stats("garbage\n") == {}


def eth_ipv4(total_length: int, payload: int = 20) -> bytes:
    """An Ethernet frame carrying an IPv4 header that claims ``total_length``."""
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total_length, 1, 0, 64, 6, 0,
                     bytes([192, 168, 50, 11]), bytes([1, 1, 1, 1]))  # fmt: skip
    return b"\x02" * 6 + b"\x04" * 6 + b"\x08\x00" + ip + b"\x00" * payload


def write_pcap(
    path: Path, frames: list[tuple[float, bytes]], nano: bool = False, snaplen: int = 65535
) -> Path:
    with open(path, "wb") as fh:
        w = dpkt.pcap.Writer(fh, snaplen=snaplen, nano=nano)
        for ts, frame in frames:
            w.writepkt(frame, ts=ts)
    return path


def test_qa_flags_frames_larger_than_the_mtu_even_when_truncated(tmp_path: Path) -> None:
    ok = write_pcap(tmp_path / "a.pcap", [(1.0, eth_ipv4(1500)), (1.1, eth_ipv4(60))])
    # A GRO super-frame, captured headers-only: the IP length field still tells its size.
    big = write_pcap(tmp_path / "b.pcap", [(2.0, eth_ipv4(9000, payload=40))], nano=True)
    qa = qa_capture(
        [ok, big], mtu=1500, stats={"packets_captured": 3, "packets_received_by_filter": 3}
    )
    assert (qa.files, qa.packets, qa.oversize_frames, qa.max_ip_length) == (2, 3, 1, 9000)
    assert not qa.ok and "offload" in qa.problems[0]
    assert qa.to_manifest()["oversize_frames"] == 1


def test_qa_reports_drops_and_unwritten_packets(tmp_path: Path) -> None:
    f = write_pcap(tmp_path / "a.pcap", [(1.0, eth_ipv4(100))])
    qa = qa_capture([f], stats=parse_capture_stats(TCPDUMP_REPORT))
    assert qa.drops == 7 + 2 + (1310 - 1204)
    assert any("dropped 9" in p for p in qa.problems)
    assert any("not written" in p for p in qa.problems)
    assert qa_capture([f], stats={"packets_captured": 1, "packets_received_by_filter": 1}).ok


def test_qa_reports_an_unreadable_file_instead_of_raising(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pcap"
    bad.write_bytes(b"not a capture at all")
    qa = qa_capture([bad])
    assert not qa.ok and "unreadable" in qa.problems[0]


def test_capture_files_are_ordered_by_first_packet(tmp_path: Path) -> None:
    # tcpdump -C names: capture.pcap, capture.pcap1, ... ; a ring (-W) wraps, so names lie.
    write_pcap(tmp_path / "capture.pcap0", [(30.0, eth_ipv4(60))])
    write_pcap(tmp_path / "capture.pcap1", [(10.0, eth_ipv4(60))], nano=True)
    write_pcap(tmp_path / "capture.pcap2", [(20.0, eth_ipv4(60))])
    write_pcap(tmp_path / "capture.pcap10", [])
    (tmp_path / "capture.log").write_text("")
    names = [p.name for p in capture_files(tmp_path)]
    assert names == ["capture.pcap1", "capture.pcap2", "capture.pcap0", "capture.pcap10"]


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("tcpdump") is None, reason="needs root and tcpdump"
)
def test_tcpdump_accepts_our_flags(tmp_path: Path) -> None:
    """tcpdump parses every flag we pass (reading an empty pcap instead of an interface)."""
    src = write_pcap(tmp_path / "in.pcap", [(1.0, eth_ipv4(60))])
    argv = capture_argv(
        make_config(ring_file_mb=1, ring_files=2, macs=["02:02:02:02:02:02"]), "lo", tmp_path
    )
    # Same options, but -r instead of -i and no live-only flags.
    live_only = {"--immediate-mode"}
    args = [a for a in argv[3:] if a not in live_only]
    args[args.index("-B") : args.index("-B") + 2] = []
    res = subprocess.run(
        ["tcpdump", "-r", str(src), *args], capture_output=True, text=True, timeout=10
    )
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "capture.pcap0").exists() or (tmp_path / "capture.pcap").exists()


def test_capture_without_the_program_is_a_capture_error(tmp_path: Path) -> None:
    from ap_setup.capture import Capture
    from ap_setup.runner import RecordingRunner
    from controller.errors import CaptureError

    with pytest.raises(CaptureError, match="tcpdump is not installed"):
        Capture(make_config(), "wlan0", tmp_path, RecordingRunner(missing={"tcpdump"})).start()


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("tcpdump") is None, reason="needs root and tcpdump"
)
def test_capture_on_a_missing_interface_names_the_cause(tmp_path: Path) -> None:
    from ap_setup.capture import Capture
    from ap_setup.runner import SubprocessRunner
    from controller.errors import CaptureError

    cap = Capture(make_config(), "ftnosuchif0", tmp_path, SubprocessRunner())
    with pytest.raises(CaptureError, match="ftnosuchif0") as info:
        cap.start()
    assert "No such device" in str(info.value) or "doesn't exist" in str(info.value)
    assert cap.stop() == {}
