"""Bi-flow assembly: orientation, timeouts, TCP termination, statistics."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from analysis import _fast
from analysis.assemble import FlowOptions, read_flows
from analysis.flowtable import EndReason, stat_column
from tests.pcapgen import ACK, FIN, PSH, RST, SYN, Conv, Pkt, ether, make_udp, write_pcap


def _flows(tmp_path, pkts, **opt):
    path = write_pcap(tmp_path / "c.pcap", sorted(pkts, key=lambda p: p.ts))
    return read_flows(path, FlowOptions(**opt))


def test_syn_sender_is_source_even_when_capture_starts_with_synack(tmp_path):
    c = Conv()
    c.tcp(0.0, False, SYN | ACK).tcp(0.01, True, ACK).tcp(0.02, True, PSH | ACK, b"hi")
    t = _flows(tmp_path, c.pkts)
    assert t.src_ip(0) == c.client and t.flows["src_port"][0] == c.cport
    assert t.packets["pkt_dir"].tolist() == [1, 0, 0]


def test_device_ip_wins_over_first_sender(tmp_path):
    c = Conv(client="192.168.7.20", server="8.8.8.8", cport=5353, sport=53)
    c.udp(0.0, False).udp(0.1, True)  # the server speaks first
    t = _flows(tmp_path, c.pkts)
    assert t.src_ip(0) == "8.8.8.8"  # first sender
    t = _flows(tmp_path, c.pkts, device_nets=("192.168.7.0/24",))
    assert t.src_ip(0) == "192.168.7.20"
    assert t.flows["uf_packets"][0] == 1 and t.flows["df_packets"][0] == 1


def test_idle_timeout_splits_and_records_reason(tmp_path):
    c = Conv()
    c.udp(0, True).udp(1, False).udp(200, True).udp(201, False)
    t = _flows(tmp_path, c.pkts, idle_timeout=120)
    assert t.flows["bf_packets"].tolist() == [2, 2]
    assert t.flows["end_reason"].tolist() == [EndReason.IDLE, EndReason.EOF]
    t = _flows(tmp_path, c.pkts, idle_timeout=300)
    assert t.flows["bf_packets"].tolist() == [4]


def test_active_timeout_splits_and_keeps_orientation(tmp_path):
    c = Conv()
    c.handshake()
    for k in range(1, 40):
        c.tcp(k * 10.0, k % 2 == 0, PSH | ACK, b"x")
    t = _flows(tmp_path, c.pkts, active_timeout=100)
    assert len(t) >= 3
    assert set(t.flows["end_reason"][:-1].tolist()) == {EndReason.ACTIVE}
    assert all(t.src_ip(i) == c.client for i in range(len(t)))


def test_fin_both_ways_then_new_syn_is_a_new_flow_on_the_same_5tuple(tmp_path):
    c = Conv()
    c.handshake(0).tcp(0.1, True, PSH | ACK, b"req").tcp(0.2, False, PSH | ACK, b"resp")
    c.tcp(0.3, True, FIN | ACK).tcp(0.31, False, FIN | ACK).tcp(0.32, True, ACK)  # trailing ACK
    c.handshake(5.0).tcp(5.1, True, PSH | ACK, b"again")
    t = _flows(tmp_path, c.pkts)
    assert t.flows["bf_packets"].tolist() == [8, 4]
    assert t.flows["end_reason"].tolist() == [EndReason.FIN, EndReason.EOF]
    assert t.src_ip(1) == c.client and t.flows["src_port"][1] == c.cport


def test_rst_ends_flow_and_late_packet_starts_another(tmp_path):
    c = Conv()
    c.handshake(0).tcp(0.1, False, RST | ACK).tcp(10.0, True, PSH | ACK, b"late")
    t = _flows(tmp_path, c.pkts, tcp_grace=2.0)
    assert t.flows["bf_packets"].tolist() == [4, 1]
    assert t.flows["end_reason"][0] == EndReason.RST


def test_new_syn_on_established_flow_without_fin_starts_new_flow(tmp_path):
    c = Conv()
    c.handshake(0).tcp(0.1, True, PSH | ACK, b"a")
    c.tcp(30.0, True, SYN, mss=1460)  # port reused by a new connection, old one never closed
    c.tcp(30.01, False, SYN | ACK)
    t = _flows(tmp_path, c.pkts)
    assert t.flows["bf_packets"].tolist() == [4, 2]
    assert t.flows["end_reason"][0] == EndReason.NEW_SYN


def test_syn_retransmissions_stay_in_one_flow(tmp_path):
    c = Conv()
    c.tcp(0, True, SYN).tcp(1, True, SYN).tcp(3, True, SYN).tcp(3.01, False, SYN | ACK)
    t = _flows(tmp_path, c.pkts)
    assert t.flows["bf_packets"].tolist() == [4]


def test_counters_and_durations(tmp_path):
    c = Conv()
    c.handshake(0).tcp(0.5, True, PSH | ACK, b"x" * 100).tcp(0.7, False, PSH | ACK, b"y" * 300)
    t = _flows(tmp_path, c.pkts)
    f = t.flows
    assert f["bf_packets"][0] == 5 and f["uf_packets"][0] == 3 and f["df_packets"][0] == 2
    assert f["uf_payload_bytes"][0] == 100 and f["df_payload_bytes"][0] == 300
    assert f["bf_ip_bytes"][0] == int(t.packets["pkt_ip_len"].sum())
    assert (f["last_ts_ns"][0] - f["first_ts_ns"][0]) == 700_000_000


def test_statistics_match_reference_on_real_captures(shared_data):
    """The C statistics equal the numba reference kernel and MIRAGE's identities."""
    from analysis.stats import flow_feature_matrix

    for name in ("whatsapp.pcap", "signal.pcap", "telegram.pcap", "zoom.pcap"):
        t = read_flows(shared_data / "ndpi_pcaps" / name)
        ref = flow_feature_matrix(t.packets["pkt_ts_ns"], t.packets["pkt_dir"],
                                  t.packets["pkt_ip_len"], t.pkt_offsets)
        np.testing.assert_allclose(t.flows["stats"], ref, rtol=1e-12, atol=1e-12)
        mean = t.flows["stats"][:, stat_column("packet_length", "biflow", "mean")]
        np.testing.assert_allclose(mean * t.flows["bf_packets"], t.flows["bf_ip_bytes"])


def test_single_array_stats_against_numpy():
    rng = np.random.default_rng(1)
    for n in (0, 1, 2, 3, 4, 7, 50, 1000):
        x = rng.integers(40, 1500, n).astype(float)
        s = _fast.stats(x)
        if n == 0:
            assert np.isnan(s).all()
            continue
        assert s[0] == x.min() and s[1] == x.max()
        np.testing.assert_allclose(s[2:5], [x.mean(), x.std(), x.var()], rtol=1e-12)
        np.testing.assert_allclose(s[5], np.median(np.abs(x - np.median(x))))
        np.testing.assert_allclose(s[8:], np.percentile(x, np.arange(10, 100, 10)), rtol=1e-12)


def test_agrees_with_nfstream_where_flow_definitions_agree(shared_data):
    """Per-flow packet and IP-byte counts equal NFStream's on the nDPI captures."""
    nfstream = pytest.importorskip("nfstream")
    total = agree = 0
    for path in sorted((shared_data / "ndpi_pcaps").glob("*.pcap*")):
        if path.suffix == ".out":
            continue
        t = read_flows(path)
        src, dst = t.ip_strings()
        ours = collections.defaultdict(list)
        for i in range(len(t)):
            key = (frozenset([(src[i], int(t.flows["src_port"][i])),
                              (dst[i], int(t.flows["dst_port"][i]))]), int(t.flows["proto"][i]))
            ours[key].append((int(t.flows["bf_packets"][i]), int(t.flows["bf_ip_bytes"][i])))
        theirs = collections.defaultdict(list)
        for fl in nfstream.NFStreamer(source=str(path), n_dissections=0, accounting_mode=1,
                                      idle_timeout=120, active_timeout=1800):
            if fl.protocol in (6, 17):
                key = (frozenset([(fl.src_ip, fl.src_port), (fl.dst_ip, fl.dst_port)]),
                       fl.protocol)
                theirs[key].append((fl.bidirectional_packets, fl.bidirectional_bytes))
        for key in ours.keys() & theirs.keys():
            if len(ours[key]) == 1 and len(theirs[key]) == 1:
                total += 1
                if ours[key] == theirs[key]:
                    agree += 1
                else:
                    # NFStream drops frames beyond its 1536-byte snapshot (GRO super-frames)
                    assert path.name == "line.pcap", (path.name, key, ours[key], theirs[key])
    assert total > 800 and agree >= total - 1


def test_same_5tuple_twice_survives_mirage_export(tmp_path):
    from analysis.mirage import to_mirage_parts

    c = Conv()
    c.handshake(0).tcp(0.1, True, FIN | ACK).tcp(0.2, False, FIN | ACK).tcp(0.21, True, ACK)
    c.handshake(10.0).tcp(10.1, True, PSH | ACK, b"second")
    t = _flows(tmp_path, c.pkts)
    assert len(t) == 2
    parts = to_mirage_parts(t)
    assert sum(len(p) for p in parts) == 2


def test_udp_flow_without_ports_collision(tmp_path):
    pkts = [Pkt(1.0, ether(make_udp("10.0.0.1", "10.0.0.2", 1000, 53, b"q"))),
            Pkt(1.1, ether(make_udp("10.0.0.1", "10.0.0.2", 1001, 53, b"q")))]
    t = _flows(tmp_path, pkts)
    assert sorted(t.flows["src_port"].tolist()) == [1000, 1001]


def test_address_text_is_what_ipaddress_writes():
    """The inet_ntop fast path gives exactly ipaddress's text (mapped/compatible forms too)."""
    import ipaddress

    from hypothesis import given, settings
    from hypothesis import strategies as st

    from analysis.flowtable import addr_to_str

    prefixes = st.sampled_from([b"", bytes(10) + b"\xff\xff", bytes(12), bytes(15), b"\xfe\x80"])

    @settings(max_examples=2000, deadline=None)
    @given(prefixes, st.binary(min_size=16, max_size=16))
    def check(prefix: bytes, raw: bytes) -> None:
        b = (prefix + raw)[:16]
        assert addr_to_str(b, 6) == str(ipaddress.IPv6Address(b))
        assert addr_to_str(b, 4) == str(ipaddress.IPv4Address(b[:4]))

    check()
