"""The capture reader: formats, link types, headers, damage, chunking."""

from __future__ import annotations

import csv
import struct

import numpy as np
import pytest

from analysis import pcap as P
from analysis.assemble import FlowOptions, iter_flow_chunks, read_flows
from analysis.errors import ParseError
from analysis.flowtable import CaptureStats, FlowTable
from tests.pcapgen import (
    ACK,
    SYN,
    Iface,
    Pkt,
    ether,
    make_ip,
    make_tcp,
    make_udp,
    null_loop,
    sll,
    sll2,
    write_pcap,
    write_pcapng,
)


def _batch_cols(path):
    st = CaptureStats()
    batches = list(P.iter_packet_batches(path, st))
    cols = np.concatenate([b.cols for b in batches]) if batches else np.zeros((0, P.N_COLS))
    ts = np.concatenate([b.ts_ns for b in batches]) if batches else np.zeros(0)
    return cols, ts, st


@pytest.mark.parametrize("nano", [False, True])
@pytest.mark.parametrize("big", [False, True])
def test_pcap_precision_and_byte_order(tmp_path, nano, big):
    ip = make_tcp("10.0.0.1", "10.0.0.2", 1234, 80, SYN, mss=1460)
    frac = 123456789 if nano else 123456
    path = write_pcap(tmp_path / "a.pcap", [Pkt((1_700_000_000, frac), ether(ip))],
                      nano=nano, big_endian=big)
    cols, ts, st = _batch_cols(path)
    assert st.packets == 1
    expect = 1_700_000_000 * 10**9 + (frac if nano else frac * 1000)
    assert ts[0] == expect  # full resolution kept
    assert cols[0, P.C_STATUS] == 0 and cols[0, P.C_MSS] == 1460
    assert cols[0, P.C_SPORT] == 1234 and cols[0, P.C_DPORT] == 80


@pytest.mark.parametrize("frame_fn,linktype", [
    (ether, 1), (sll, 113), (sll2, 276), (lambda ip: ip, 101), (lambda ip: ip, 12),
    (lambda ip: null_loop(ip), 0), (lambda ip: null_loop(ip, True), 108),
])
@pytest.mark.parametrize("v6", [False, True])
def test_link_types(tmp_path, frame_fn, linktype, v6):
    a, b = ("2001:db8::1", "2001:db8::2") if v6 else ("10.0.0.1", "10.0.0.2")
    ip = make_udp(a, b, 5353, 53, b"hello")
    path = write_pcap(tmp_path / "l.pcap", [Pkt(1.0, frame_fn(ip))], linktype=linktype)
    t = read_flows(path)
    assert len(t) == 1 and t.src_ip(0) == a and t.dst_ip(0) == b
    assert t.flows["bf_payload_bytes"][0] == 5
    assert t.flows["bf_ip_bytes"][0] == len(ip)


def test_raw_ipv4_and_ipv6_linktypes(tmp_path):
    p4 = write_pcap(tmp_path / "4.pcap", [Pkt(1.0, make_udp("1.1.1.1", "2.2.2.2", 1, 2))],
                    linktype=228)
    p6 = write_pcap(tmp_path / "6.pcap", [Pkt(1.0, make_udp("::1", "::2", 1, 2))], linktype=229)
    assert len(read_flows(p4)) == 1 and len(read_flows(p6)) == 1


def test_vlan_and_qinq(tmp_path):
    ip = make_tcp("10.0.0.1", "10.0.0.2", 1, 2, ACK, b"abc")
    pkts = [Pkt(1.0, ether(ip, vlans=[10])), Pkt(2.0, ether(ip, vlans=[20, 30], qinq=True))]
    t = read_flows(write_pcap(tmp_path / "v.pcap", pkts))
    assert len(t) == 1 and t.flows["bf_packets"][0] == 2


def test_unsupported_link_type_and_non_ip_are_counted(tmp_path):
    arp = ether(b"\x00" * 28, ethertype=0x0806)
    path = write_pcap(tmp_path / "x.pcap", [Pkt(1.0, arp)])
    t = read_flows(path)
    assert len(t) == 0 and t.capture.skipped == {"not IP (ARP, LLDP, ...)": 1}
    path = write_pcap(tmp_path / "y.pcap", [Pkt(1.0, b"\x00" * 40)], linktype=147)
    t = read_flows(path)
    assert t.capture.skipped == {"unsupported link type 147": 1}


def test_ipv4_options_and_fragments(tmp_path):
    first = make_udp("10.0.0.1", "10.0.0.2", 7, 9, b"x" * 40, more_fragments=True,
                     ipv4_options=b"\x94\x04\x00\x00")
    later = make_ip("10.0.0.1", "10.0.0.2", 17, b"y" * 40, frag_offset=48)
    icmp = make_ip("10.0.0.1", "10.0.0.2", 1, b"\x08\x00" + b"\x00" * 6)
    t = read_flows(write_pcap(tmp_path / "f.pcap", [Pkt(1.0, ether(first)),
                                                     Pkt(1.1, ether(later)),
                                                     Pkt(1.2, ether(icmp))]))
    assert len(t) == 1  # the first fragment carries the ports
    assert t.packets["pkt_ip_hdr_len"][0] == 24
    assert t.capture.skipped == {"IP fragment after the first": 1, "not TCP or UDP": 1}


def test_ipv6_extension_headers(tmp_path):
    ip = make_tcp("2001:db8::1", "2001:db8::2", 1000, 443, SYN,
                  ipv6_ext=[(0, b"\x00" * 6), (60, b"\x00" * 14)])
    frag_later = make_ip("2001:db8::1", "2001:db8::2", 17, b"z" * 16,
                         ipv6_ext=[(44, struct.pack("!H", 8 << 3))])
    t = read_flows(write_pcap(tmp_path / "e.pcap", [Pkt(1.0, ether(ip)),
                                                     Pkt(1.1, ether(frag_later))]))
    assert len(t) == 1
    assert t.packets["pkt_ip_hdr_len"][0] == 40 + 8 + 16
    assert t.flows["dst_port"][0] == 443
    assert t.capture.skipped == {"IP fragment after the first": 1}


def test_tcp_flags_window_mss_ws(tmp_path):
    pkts = [Pkt(1.0, ether(make_tcp("10.0.0.1", "10.0.0.2", 5, 6, SYN, win=29200, mss=1460,
                                    ws=7))),
            Pkt(1.1, ether(make_tcp("10.0.0.2", "10.0.0.1", 6, 5, SYN | ACK, win=65160,
                                    mss=1380, ws=9)))]
    t = read_flows(write_pcap(tmp_path / "t.pcap", pkts))
    assert t.flows["uf_mss"][0] == 1460 and t.flows["df_mss"][0] == 1380
    assert t.flows["uf_ws"][0] == 7 and t.flows["df_ws"][0] == 9
    assert t.packets["pkt_tcp_win"].tolist() == [29200, 65160]
    assert t.packets["pkt_tcp_flags"].tolist() == [SYN, SYN | ACK]


def test_pcapng_interfaces_tsresol_and_unknown_blocks(tmp_path):
    ifaces = [Iface(1, tsresol=9), Iface(113, tsresol=6), Iface(101, tsresol=0x80 | 20,
                                                                tsoffset=1_000)]
    a = make_udp("10.0.0.1", "10.0.0.2", 1, 2, b"a")
    pkts = [Pkt((1_700_000_000, 987654321), ether(a), iface=0),
            Pkt((1_700_000_001, 5), sll(a), iface=1),
            Pkt(1_700_000_002.5, a, iface=2)]
    path = write_pcapng(tmp_path / "n.pcapng", pkts, ifaces,
                        extra_blocks=[(0x0BADC0DE, b"custom"), (4, b"\x00" * 8)])
    cols, ts, st = _batch_cols(path)
    assert st.packets == 3 and (cols[:, P.C_STATUS] == 0).all()
    assert ts[0] == 1_700_000_000_987_654_321
    assert ts[1] == 1_700_000_001_000_005_000
    assert abs(ts[2] - 1_700_000_002_500_000_000) < 1000
    assert st.linktypes == {1: 1, 113: 1, 101: 1}


def test_pcapng_big_endian_and_simple_packet_blocks(tmp_path):
    a = make_tcp("10.0.0.1", "10.0.0.2", 1, 2, ACK, b"xyz")
    path = write_pcapng(tmp_path / "b.pcapng", [Pkt(1.0, ether(a))] * 3, big_endian=True)
    assert read_flows(path).flows["bf_packets"].tolist() == [3]
    path = write_pcapng(tmp_path / "s.pcapng", [Pkt(1.0, ether(a))] * 2, simple=True)
    assert read_flows(path).flows["bf_packets"].tolist() == [2]


def test_truncated_last_record_gives_flows_and_warning(tmp_path):
    pkts = [Pkt(1.0 + i, ether(make_udp("10.0.0.1", "10.0.0.2", 1, 2, b"q" * 20)))
            for i in range(5)]
    path = write_pcap(tmp_path / "t.pcap", pkts, truncate_last=10)
    t = read_flows(path)
    assert t.flows["bf_packets"].tolist() == [4]
    assert any("last record truncated" in w and "byte offset" in w for w in t.capture.warnings)


def test_lying_length_field_does_not_allocate(tmp_path):
    pkts = [Pkt(1.0, ether(make_udp("10.0.0.1", "10.0.0.2", 1, 2)))]
    path = write_pcap(tmp_path / "l.pcap", pkts)
    data = bytearray(path.read_bytes())
    data += struct.pack("<IIII", 2, 0, 0x7FFFFFF0, 0x7FFFFFF0) + b"\x00" * 32
    path.write_bytes(bytes(data))
    t = read_flows(path)
    assert t.flows["bf_packets"].tolist() == [1]
    assert any("exceeds" in w for w in t.capture.warnings)


@pytest.mark.parametrize("content,where", [
    (b"", 0), (b"hello world, not a capture", 0),
    (struct.pack("<IHHiIII", 0xA1B2C3D4, 1, 0, 0, 0, 65535, 1), 4),
    (b"\xd4\xc3\xb2\xa1\x02\x00", 0),
])
def test_not_a_capture_raises_parse_error_with_offset(tmp_path, content, where):
    path = tmp_path / "bad.pcap"
    path.write_bytes(content)
    with pytest.raises(ParseError) as ei:
        read_flows(path)
    assert ei.value.path == str(path) and ei.value.where == where
    assert str(path) in str(ei.value) and "byte offset" in str(ei.value)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ParseError, match="no such file"):
        read_flows(tmp_path / "nope.pcap")
    with pytest.raises(ParseError, match="directory"):
        read_flows(tmp_path)


def test_chunk_size_does_not_change_flows(shared_data):
    """Streaming in tiny chunks with frequent flushes gives exactly the same flows."""
    path = shared_data / "ndpi_pcaps" / "telegram.pcap"
    big = read_flows(path)
    small_chunks = list(iter_flow_chunks(path, FlowOptions(flush_every=1), CaptureStats()))
    # re-read with a 64 KiB chunk size through the reader directly
    st = CaptureStats()
    tiny = []
    from analysis.assemble import FlowAssembler

    asm = FlowAssembler(FlowOptions(flush_every=1))
    for batch in P.iter_packet_batches(path, st, chunk_bytes=1 << 16):
        tiny.extend(asm.feed(batch))
    tiny.extend(asm.flush(final=True))
    for chunks in (small_chunks, tiny):
        t = FlowTable.concat(chunks)
        order = np.lexsort((t.packets["pkt_frame"][t.pkt_offsets[:-1]], t.flows["first_ts_ns"]))
        t = t.take(order)
        assert len(t) == len(big)
        for k in ("bf_packets", "bf_ip_bytes", "src_port", "dst_port", "end_reason"):
            np.testing.assert_array_equal(t.flows[k], big.flows[k])
        np.testing.assert_array_equal(t.flows["stats"], big.flows["stats"])
        np.testing.assert_array_equal(t.packets["pkt_frame"], big.packets["pkt_frame"])


@pytest.mark.parametrize("fmt", ["pcap", "pcapng"])
def test_a_record_larger_than_the_chunk_reads_as_with_a_large_chunk(tmp_path, fmt):
    """The buffer grows for a record that does not fit a chunk (the smallest, 64 KiB)."""
    small = [Pkt(1.0 + i, ether(make_udp("10.0.0.1", "10.0.0.2", 1, 2, b"s" * 40)))
             for i in range(4)]
    big = Pkt(1.5, ether(make_udp("10.0.0.1", "10.0.0.3", 3, 4, b"B" * 65500)))
    write = write_pcap if fmt == "pcap" else write_pcapng
    path = write(tmp_path / f"big.{fmt}", [small[0], big, *small[1:]])
    assert path.stat().st_size > 1 << 16

    def read(chunk_bytes):
        st = CaptureStats()
        batches = list(P.iter_packet_batches(path, st, chunk_bytes=chunk_bytes))
        return st, [np.concatenate([getattr(b, f) for b in batches])
                    for f in ("ts_ns", "frame", "wirelen", "cols", "file_off")]

    (st_small, small_cols), (st_big, big_cols) = read(1 << 16), read(P.CHUNK_BYTES)
    assert st_small.packets == st_big.packets == 5 and not st_small.warnings
    for a, b in zip(small_cols, big_cols, strict=True):
        np.testing.assert_array_equal(a, b)


def test_every_ndpi_capture_reads_and_counts_match_manifest(shared_data):
    rows = list(csv.DictReader(open(shared_data / "ndpi_pcaps" / "manifest.csv")))
    for row in rows:
        t = read_flows(shared_data / "ndpi_pcaps" / row["file"])
        assert t.capture.packets == int(row["packets"]), row["file"]
        assert len(t) > 0 and not t.capture.warnings, row["file"]
        assert t.capture.packets == t.n_packets + sum(t.capture.skipped.values())
