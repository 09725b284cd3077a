"""Crypto-PAn: the reference implementation's vectors, prefix preservation, consistency, keys."""

from __future__ import annotations

import ipaddress
import os
import stat
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from analysis.campus.anonymise import CryptoPAn, anonymise_table, generate_key, load_key
from analysis.errors import BadInputError
from tests.factories import make_flowtable

# The sample key of the Crypto-PAn reference distribution (sample.cpp) and pairs from its
# sample_trace_raw.dat / sample_trace_sanitized.dat, as other implementations test them.
REFERENCE_KEY = bytes([21, 34, 23, 141, 51, 164, 207, 128, 19, 10, 91, 22, 73, 144, 125, 16,
                       216, 152, 143, 131, 121, 121, 101, 39, 98, 87, 76, 45, 42, 132, 34, 2])
REFERENCE_V4 = [
    ("128.11.68.132", "135.242.180.132"), ("129.118.74.4", "134.136.186.123"),
    ("130.132.252.244", "133.68.164.234"), ("141.223.7.43", "141.167.8.160"),
    ("141.233.145.108", "141.129.237.235"), ("152.163.225.39", "151.140.114.167"),
    ("156.29.3.236", "147.225.12.42"), ("165.247.96.84", "162.9.99.234"),
    ("166.107.77.190", "160.132.178.185"), ("192.102.249.13", "252.138.62.131"),
    ("192.215.32.125", "252.43.47.189"), ("192.233.80.103", "252.25.108.8"),
    ("192.41.57.43", "252.222.221.184"), ("193.150.244.223", "253.169.52.216"),
    ("195.205.63.100", "255.186.223.5"), ("198.200.171.101", "249.199.68.213"),
    ("198.26.132.101", "249.36.123.202"), ("198.36.213.5", "249.7.21.132"),
    ("198.51.77.238", "249.18.186.254"), ("199.217.79.101", "248.38.184.213"),
    ("202.49.198.20", "245.206.7.234"), ("203.12.160.252", "244.248.163.4"),
    ("204.184.162.189", "243.192.77.90"), ("204.202.136.230", "243.178.4.198"),
    ("204.29.20.4", "243.33.20.123"), ("205.178.38.67", "242.108.198.51"),
    ("205.188.147.153", "242.96.16.101"), ("205.188.248.25", "242.96.88.27"),
    ("205.245.121.43", "242.21.121.163"), ("207.105.49.5", "241.118.205.138"),
    ("207.135.65.238", "241.202.129.222"), ("207.155.9.214", "241.220.250.22"),
    ("207.188.7.45", "241.255.249.220"), ("207.25.71.27", "241.33.119.156"),
    ("207.33.151.131", "241.1.233.131"), ("208.147.89.59", "227.237.98.191"),
    ("208.234.120.210", "227.154.67.17"), ("208.28.185.184", "227.39.94.90"),
    ("208.52.56.122", "227.8.63.165"), ("209.12.231.7", "226.243.167.8"),
    ("209.238.72.3", "226.6.119.243"), ("209.246.74.109", "226.22.124.76"),
    ("209.68.60.238", "226.184.220.233"), ("209.85.249.6", "226.170.70.6"),
    ("212.120.124.31", "228.135.163.231"), ("212.146.8.236", "228.19.4.234"),
    ("212.186.227.154", "228.59.98.98"), ("212.204.172.118", "228.71.195.169"),
    ("212.206.130.201", "228.69.242.193"), ("216.148.237.145", "235.84.194.111"),
    ("216.157.30.252", "235.89.31.26"), ("216.184.159.48", "235.96.225.78"),
    ("216.227.10.221", "235.28.253.36"), ("216.254.18.172", "235.7.16.162"),
    ("216.32.132.250", "235.192.139.38"), ("216.35.217.178", "235.195.157.81"),
    ("24.0.250.221", "100.15.198.226"), ("24.13.62.231", "100.2.192.247"),
    ("24.14.213.138", "100.1.42.141"), ("24.5.0.80", "100.9.15.210"),
    ("24.7.198.88", "100.10.6.25"), ("24.94.26.44", "100.88.228.35"),
    ("38.15.67.68", "64.3.66.187"), ("4.3.88.225", "124.60.155.63"),
    ("63.14.55.111", "95.9.215.7"), ("63.195.241.44", "95.179.238.44"),
    ("63.97.7.140", "95.97.9.123"), ("64.14.118.196", "0.255.183.58"),
    ("64.34.154.117", "0.221.154.117"), ("64.39.15.238", "0.219.7.41"),
    ("10.185.25.118", "117.161.29.118"),
]
# IPv6 over 128 bits as the Go (Yawning/cryptopan) and yacryptopan extensions compute it.
REFERENCE_V6 = [
    ("::1", "78ff:f001:9fc0:20df:8380:b1f1:704:ed"),
    ("::2", "78ff:f001:9fc0:20df:8380:b1f1:704:ef"),
    ("::ffff", "78ff:f001:9fc0:20df:8380:b1f1:704:f838"),
    ("2001:db8::1", "4401:2bc:603f:d91d:27f:ff8e:e6f1:dc1e"),
    ("2001:db8::2", "4401:2bc:603f:d91d:27f:ff8e:e6f1:dc1c"),
]


@pytest.fixture(scope="module")
def ref() -> CryptoPAn:
    return CryptoPAn(REFERENCE_KEY)


def test_ipv4_matches_the_reference_implementation(ref):
    assert [ref.anonymise_text(a) for a, _ in REFERENCE_V4] == [b for _, b in REFERENCE_V4]


def test_ipv6_matches_the_common_extension(ref):
    assert [ref.anonymise_text(a) for a, _ in REFERENCE_V6] == [b for _, b in REFERENCE_V6]


def test_vectorised_slots_equal_one_at_a_time(ref):
    texts = [a for a, _ in REFERENCE_V4] + [a for a, _ in REFERENCE_V6]
    slots = np.zeros((len(texts), 16), dtype=np.uint8)
    vers = np.zeros(len(texts), dtype=np.uint8)
    for i, t in enumerate(texts):
        ip = ipaddress.ip_address(t)
        slots[i, :len(ip.packed)] = np.frombuffer(ip.packed, dtype=np.uint8)
        vers[i] = ip.version
    twice = np.concatenate([slots, slots])  # repeats go through the cache
    out = ref.anonymise_slots(twice, np.concatenate([vers, vers]))
    got = []
    for row, v in zip(out[:len(texts)], vers, strict=True):
        got.append(str(ipaddress.IPv4Address(row[:4].tobytes())) if v == 4
                   else str(ipaddress.IPv6Address(row.tobytes())))
    assert got == [b for _, b in REFERENCE_V4] + [b for _, b in REFERENCE_V6]
    assert np.array_equal(out[:len(texts)], out[len(texts):])
    assert not out[vers.tolist().index(4), 4:].any()  # IPv4 stays in the first 4 bytes


def _common_prefix(a: int, b: int, bits: int) -> int:
    x = a ^ b
    return bits - x.bit_length()


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1))
def test_ipv4_prefixes_are_preserved_exactly(a, b):
    cp = CryptoPAn(REFERENCE_KEY)
    x, y = cp.anonymise_v4(np.array([a, b], dtype=np.uint32)).tolist()
    assert _common_prefix(x, y, 32) == _common_prefix(a, b, 32)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**128 - 1), st.integers(0, 127))
def test_ipv6_prefixes_are_preserved_exactly(a, flip_bit):
    b = a ^ (1 << flip_bit)  # shares exactly 127 - flip_bit leading bits with a
    cp = CryptoPAn(REFERENCE_KEY)
    raw = np.frombuffer(a.to_bytes(16, "big") + b.to_bytes(16, "big"), dtype=np.uint8)
    out = cp.anonymise_v6(raw.reshape(2, 16))
    x, y = (int.from_bytes(r.tobytes(), "big") for r in out)
    assert _common_prefix(x, y, 128) == 127 - flip_bit


def test_the_same_key_gives_the_same_mapping_in_another_process(tmp_path):
    key = tmp_path / "k"
    generate_key(key)
    here = CryptoPAn(load_key(key)).anonymise_text("192.0.2.77")
    code = ("import sys; from analysis.campus.anonymise import CryptoPAn, load_key; "
            "print(CryptoPAn(load_key(sys.argv[1])).anonymise_text('192.0.2.77'))")
    out = subprocess.run([sys.executable, "-c", code, str(key)], capture_output=True,
                         text=True, check=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.stdout.strip() == here != "192.0.2.77"


def test_keygen_is_private_hex_never_overwrites_and_loads(tmp_path):
    key = tmp_path / "campus.key"
    generate_key(key)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert len(bytes.fromhex(key.read_text().strip())) == 32
    with pytest.raises(BadInputError, match="exists"):
        generate_key(key)
    raw = tmp_path / "raw.key"
    raw.write_bytes(REFERENCE_KEY)
    raw.chmod(0o600)
    assert load_key(raw) == REFERENCE_KEY
    bad = tmp_path / "bad.key"
    bad.write_text("not a key\n")
    with pytest.raises(BadInputError, match="not a Crypto-PAn key"):
        load_key(bad)
    with pytest.raises(BadInputError, match="no such key file"):
        load_key(tmp_path / "missing")


def test_a_key_never_shows_in_repr_or_pickles(ref):
    import pickle

    assert "21" not in repr(ref) and "hidden" in repr(ref)
    with pytest.raises(TypeError):
        pickle.dumps(ref)


def test_anonymise_table_replaces_both_ends(ref):
    table = make_flowtable([
        {"src_ip": "10.0.0.1", "dst_ip": "203.0.113.9"},
        {"src_ip": "2001:db8::1", "dst_ip": "2001:db8::2"},
    ])
    before = table.ip_strings()
    anonymise_table(table, ref)
    after = table.ip_strings()
    assert after[0] == [ref.anonymise_text(x) for x in before[0]]
    assert after[1] == [ref.anonymise_text(x) for x in before[1]]
    assert not set(after[0] + after[1]) & set(before[0] + before[1])
