"""Fuzzing the capture reader: any bytes give flows or a ParseError, never a crash.

Run longer with ``FUZZ_EXAMPLES=20000 .venv/bin/python -m pytest tests/test_pcap_fuzz.py``.
"""

from __future__ import annotations

import os
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from analysis.assemble import read_flows
from analysis.errors import ParseError
from tests.pcapgen import ACK, SYN, Iface, Pkt, ether, make_tcp, make_udp, write_pcap, write_pcapng

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


def _seed_files(tmp):
    pkts = [Pkt(1.0, ether(make_tcp("10.0.0.1", "10.0.0.2", 1, 443, SYN, mss=1460, ws=7))),
            Pkt(1.1, ether(make_tcp("10.0.0.2", "10.0.0.1", 443, 1, SYN | ACK))),
            Pkt(1.2, ether(make_udp("2001:db8::1", "2001:db8::2", 5, 53, b"abc")))]
    a = write_pcap(tmp / "seed.pcap", pkts).read_bytes()
    b = write_pcapng(tmp / "seed.pcapng", pkts, [Iface(1, tsresol=9)]).read_bytes()
    return a, b


def _check(tmp, data: bytes) -> None:
    path = tmp / "fuzz.bin"
    path.write_bytes(data)
    try:
        t = read_flows(path)
    except ParseError as err:
        assert str(path) in str(err)
        return
    assert t.n_packets <= t.capture.packets


@FUZZ
@given(data=st.data())
def test_mutated_captures_never_crash(tmp_path, data):
    seeds = _seed_files(tmp_path)
    base = bytearray(data.draw(st.sampled_from(seeds)))
    for _ in range(data.draw(st.integers(1, 8))):
        kind = data.draw(st.integers(0, 3))
        pos = data.draw(st.integers(0, len(base) - 1)) if base else 0
        if kind == 0 and base:
            base[pos] = data.draw(st.integers(0, 255))
        elif kind == 1:
            del base[pos:pos + data.draw(st.integers(1, 16))]
        elif kind == 2:
            base[pos:pos] = data.draw(st.binary(max_size=16))
        elif base and pos + 4 <= len(base):
            base[pos:pos + 4] = struct.pack("<I", data.draw(st.sampled_from(
                [0, 1, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, 262145])))
    _check(tmp_path, bytes(base))


@FUZZ
@given(header=st.sampled_from([b"\xd4\xc3\xb2\xa1", b"\xa1\xb2\xc3\xd4", b"\x4d\x3c\xb2\xa1",
                               b"\x0a\x0d\x0d\x0a"]), body=st.binary(max_size=512))
def test_random_bodies_never_crash(tmp_path, header, body):
    _check(tmp_path, header + body)
