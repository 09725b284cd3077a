"""netstat polls, plain netstat, frida events, CSV labels and the uid map."""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from analysis.errors import ParseError, SchemaError
from analysis.traces.csvlabels import iter_csv_labels, iter_pcapdroid_csv, ndpi_flow_labels_to_csv
from analysis.traces.frida import iter_frida_events
from analysis.traces.model import ParseStats
from analysis.traces.netstat import (
    android_uid,
    hex_addr,
    iter_netstat_observations,
    iter_socket_tables,
)
from analysis.traces.uidmap import load_uid_map

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
POLLER = REPO / "device_scripts" / "netstat_poller.sh"


# ----------------------------------------------------------------------------- netstat

def test_proc_hex_addresses() -> None:
    assert hex_addr("0100007F") == "127.0.0.1"
    assert hex_addr("0500000A") == "10.0.0.5"
    assert hex_addr("00000000000000000000000001000000") == "::1"
    assert hex_addr("0000000000000000FFFF00000100007F") == "127.0.0.1"  # IPv4-mapped
    assert hex_addr("B80D0120000000000000000001000000") == "2001:db8::1"
    assert hex_addr("00000000") is None  # wildcard


def test_android_users() -> None:
    assert android_uid("u0_a123") == 10123
    assert android_uid("u10_a5") == 1010005
    assert android_uid("10123") == 10123
    assert android_uid("system") == 1000
    assert android_uid("somebody") is None


POLL_LOG = """\
=== 1732800000.100000 tcp
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0500000A:9C40 A55CDF4C:01BB 01 00000000:00000000 00:00000000 00000000 10123        0 4711 1 0000000000000000 20 4 30 10 -1
   1: 0500000A:9C41 A55CDF4C:01BB 06 00000000:00000000 03:00000F8E 00000000     0        0 0 3 0000000000000000
   2: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 99 1 0000000000000000 100 0 0 10 0
=== 1732800000.100300 udp6
  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
  5: 00000000000000000000000000000000:C350 00000000000000000000000000000000:0000 07 00000000:00000000 00:00000000 00000000 10456        0 5555 2 0000000000000000 0
=== 1732800000.200000 tcp
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0500000A:9C40 A55CDF4C:01BB 01 00000000:00000000 00:00000000 00000000 10123        0 4711 1 0000000000000000 20 4 30 10 -1
   2: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 99 1 0000000000000000 100 0 0 10 0
garbage in the middle
=== 1732800000.300000 tcp
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   2: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 99 1 0000000000000000 100 0 0 10 0
   3: 0500000A:9C40 A55CDF4C:01BB 01 00000000:00000000 00:00000000 00000000 10789        0 4800 1 0000000000000000 20 4 30 10 -1
=== 17328000
   4: 0500000A:9C4
"""


def test_poller_log_lifetimes_and_damage() -> None:
    stats = ParseStats()
    obs = list(iter_netstat_observations(POLL_LOG.splitlines(True), stats))
    by = {(o.sock, o.local_port): o for o in obs}
    a = by[(4711, 40000)]
    assert (a.proto, a.remote_ip, a.remote_port, a.uid) == (6, "76.223.92.165", 443, 10123)
    assert (a.ts, a.end_ts, a.kind, a.source) == (1732800000.1, 1732800000.2, "snapshot", "netstat")
    reuse = by[(4800, 40000)]  # the same port, another app, a later socket
    assert (reuse.uid, reuse.ts, reuse.end_ts) == (10789, 1732800000.3, None)
    listen = by[(99, 8080)]
    assert (listen.kind, listen.ts, listen.end_ts, listen.remote_port) == (
        "listen", 1732800000.1, 1732800000.3, None)
    udp = by[(5555, 50000)]
    assert (udp.proto, udp.local_ip, udp.uid) == (17, None, 10456)
    assert len(obs) == 4  # the TIME_WAIT row (inode 0) has no owner
    assert stats.skipped == {"garbage": 1, "bad block header": 1, "table row outside a block": 1}
    assert stats.other == {"rows without an owner (inode 0)": 1}


@pytest.mark.skipif(not POLLER.exists() or shutil.which("sh") is None, reason="no poller script")
def test_real_poller_sees_a_real_socket(tmp_path: Path) -> None:
    out, stop = tmp_path / "netstat.log", tmp_path / "stop"
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    cli = socket.create_connection(srv.getsockname())
    conn, _ = srv.accept()
    rport = srv.getsockname()[1]
    proc = subprocess.Popen(["sh", str(POLLER), str(out), "0.05", "10000000", str(stop)],
                            stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.6)
        lport = cli.getsockname()[1]
        inode = os.fstat(cli.fileno()).st_ino
        stop.touch()
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for s in (cli, conn, srv):
            s.close()
    stats = ParseStats()
    obs = [o for o in iter_netstat_observations(out, stats) if o.sock == inode]
    assert stats.n_skipped == 0
    assert len(obs) == 1
    o = obs[0]
    assert (o.proto, o.local_ip, o.local_port, o.remote_ip, o.remote_port, o.uid) == (
        6, "127.0.0.1", lport, "127.0.0.1", rport, os.getuid())
    assert o.end_ts is not None and o.end_ts > o.ts  # seen in several snapshots


@pytest.mark.skipif(shutil.which("netstat") is None, reason="net-tools netstat not installed")
def test_real_netstat_tunape_output() -> None:
    srv = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    srv.bind(("::1", 0))
    try:
        port = srv.getsockname()[1]
        text = subprocess.run(["netstat", "-tunape"], capture_output=True, text=True,
                              timeout=20).stdout
    finally:
        srv.close()
    stats = ParseStats()
    rows = [r for r in iter_socket_tables(text.splitlines(True), stats, ts=1.0)
            if r.local_port == port]
    assert len(rows) == 1
    r = rows[0]
    assert (r.table, r.local_ip, r.uid, r.pid) == ("udp6", "::1", os.getuid(), os.getpid())
    assert r.inode and r.process and r.ts == 1.0
    assert stats.n_skipped == 0


def test_plain_toybox_netstat() -> None:
    text = """\
Active Internet connections (servers and established)
Proto Recv-Q Send-Q Local Address           Foreign Address         State       User     Inode      PID/Program Name
tcp        0      0 127.0.0.1:5037          0.0.0.0:*               LISTEN      shell    1234       890/adbd
tcp6       0      0 ::ffff:10.0.0.5:43210   ::ffff:157.240.1.1:443  ESTABLISHED u0_a123  45678      5678/com.whatsapp
tcp        0      0 10.0.0.5:43211          157.240.1.1:443         TIME_WAIT   root     0          -
udp        0      0 0.0.0.0:5353
udp        0      0 0.0.0.0:5353            0.0.0.0:*                           1000     910        910/mdnsd
"""
    stats = ParseStats()
    obs = list(iter_netstat_observations(text.splitlines(True), stats, ts=1732800000.0))
    t = {o.local_port: o for o in obs}
    wa = t[43210]
    assert (wa.proto, wa.local_ip, wa.remote_ip, wa.remote_port, wa.uid, wa.pid, wa.process) == (
        6, "10.0.0.5", "157.240.1.1", 443, 10123, 5678, "com.whatsapp")
    assert wa.label is None  # a command name is not a package
    assert (t[5037].kind, t[5037].uid) == ("listen", 2000)
    assert (t[5353].proto, t[5353].uid, t[5353].sock) == (17, 1000, 910)
    assert 43211 not in t  # TIME_WAIT: no owner
    assert stats.skipped == {"bad row": 1}


def test_netstat_missing_file_is_a_parse_error(tmp_path: Path) -> None:
    with pytest.raises(ParseError):
        list(iter_netstat_observations(tmp_path / "missing.log"))


# ----------------------------------------------------------------------------- frida

def test_frida_events() -> None:
    ev = [
        {"ts": 10.0, "event": "connect", "pid": 7, "tid": 8, "fd": 84, "proto": "tcp",
         "family": 6, "local": None, "remote": {"ip": "::ffff:76.223.92.165", "port": 443},
         "host": None, "ret": -1, "errno": "EINPROGRESS", "process": "org.thoughtcrime.securesms"},
        {"ts": 10.1, "event": "sendto", "pid": 7, "tid": 9, "fd": 84, "proto": "tcp",
         "family": 6, "local": {"ip": "::ffff:10.0.0.5", "port": 40123}, "remote": None,
         "host": None, "ret": 517},
        {"ts": 10.2, "event": "getaddrinfo", "pid": 7, "tid": 9, "host": "chat.signal.org"},
        {"ts": 10.3, "event": "recvfrom", "pid": 7, "tid": 9, "fd": 84, "proto": "tcp",
         "family": 6, "local": None, "remote": None, "ret": 100},
        {"ts": 10.4, "event": "close", "pid": 7, "tid": 9, "fd": 84, "proto": "tcp",
         "family": 6, "local": None, "remote": None, "ret": 0},
        {"ts": 10.5, "event": "connect", "pid": 7, "tid": 9, "fd": 84, "proto": "udp",
         "family": 4, "local": {"ip": "0.0.0.0", "port": 50000},
         "remote": {"ip": "8.8.8.8", "port": 53}, "ret": -1, "errno": "ENETUNREACH"},
    ]
    lines = [json.dumps(e) for e in ev] + ["{broken", "[1, 2]", '{"event": "connect"}', ""]
    stats = ParseStats()
    obs = list(iter_frida_events(lines, stats, process="fallback.pkg"))
    assert [(o.kind, o.proto, o.local_ip, o.local_port, o.remote_ip, o.remote_port) for o in obs] == [
        ("connect", 6, None, None, "76.223.92.165", 443),
        ("send", 6, "10.0.0.5", 40123, None, None),
        ("recv", 6, "10.0.0.5", 40123, None, None),  # the local port is remembered
        ("close", 6, "10.0.0.5", 40123, None, None),
    ]
    assert len({o.sock for o in obs}) == 1
    assert {o.label for o in obs} == {"org.thoughtcrime.securesms"}
    assert all(o.source == "frida" for o in obs)
    assert stats.skipped == {"not JSON": 1, "not a JSON object": 1, "missing ts or proto": 1}
    assert stats.other == {"name lookups": 1, "failed connects": 1}


# ----------------------------------------------------------------------------- CSV

def test_generic_csv(tmp_path: Path) -> None:
    p = tmp_path / "labels.csv"
    p.write_text(
        "proto,local_ip,local_port,remote_ip,remote_port,label,start,end,labeling_type\n"
        "tcp,10.0.0.5,40000,1.2.3.4,443,org.signal,100.5,200,\n"
        "17,::ffff:10.0.0.5,5000,8.8.8.8,53,com.whatsapp,,,manual\n"
        "icmp,10.0.0.5,,1.2.3.4,,x,,,\n"
        "tcp,10.0.0.5,notaport,1.2.3.4,443,x,,,\n"
        "tcp,10.0.0.5,1,1.2.3.4,443,,,,\n"
    )
    stats = ParseStats()
    obs = list(iter_csv_labels(p, stats))
    assert [(o.proto, o.local_ip, o.local_port, o.remote_ip, o.remote_port, o.label, o.ts,
             o.end_ts, o.labeling_type) for o in obs] == [
        (6, "10.0.0.5", 40000, "1.2.3.4", 443, "org.signal", 100.5, 200.0, None),
        (17, "10.0.0.5", 5000, "8.8.8.8", 53, "com.whatsapp", -math.inf, math.inf, "manual"),
    ]
    assert stats.skipped == {"protocol not TCP/UDP": 1, "bad row": 1, "no label": 1}
    bad = tmp_path / "bad.csv"
    bad.write_text("proto,src,dst\n")
    with pytest.raises(SchemaError) as e:
        list(iter_csv_labels(bad))
    assert "local_ip" in str(e.value)


def test_pcapdroid_csv(tmp_path: Path) -> None:
    p = tmp_path / "connections.csv"
    p.write_text(
        "IPProto,SrcIP,SrcPort,DstIP,DstPort,UID,App,Proto,Status,Info,BytesSent,BytesRcvd,"
        "PktsSent,PktsRcvd,FirstSeen,LastSeen\n"
        "6,10.215.173.1,41234,157.240.1.1,443,10123,WhatsApp,TLS,Closed,g.whatsapp.net,"
        "1000,2000,10,12,1732800000123,1732800005456\n"
        "17,10.215.173.1,5000,8.8.8.8,53,10456,,DNS,Closed,example.org,50,90,1,1,"
        "1732800001000,1732800001100\n"
        "6,short,row\n"
    )
    stats = ParseStats()
    obs = list(iter_pcapdroid_csv(p, stats))
    assert [(o.source, o.proto, o.local_port, o.remote_ip, o.uid, o.process, o.ts, o.end_ts)
            for o in obs] == [
        ("pcapdroid", 6, 41234, "157.240.1.1", 10123, "WhatsApp", 1732800000.123, 1732800005.456),
        ("pcapdroid", 17, 5000, "8.8.8.8", 10456, None, 1732800001.0, 1732800001.1),
    ]
    assert stats.skipped == {"short row": 1}


@pytest.mark.skipif(not (SHARED / "ndpi_pcaps" / "flow_labels.csv").exists(), reason="no shared data")
def test_ndpi_flow_labels_convert(tmp_path: Path) -> None:
    out = tmp_path / "ndpi_labels.csv"
    stats = ParseStats()
    n = ndpi_flow_labels_to_csv(SHARED / "ndpi_pcaps" / "flow_labels.csv", out, stats)
    assert n == stats.parsed > 100
    signal = list(iter_csv_labels(out, pcap="signal.pcap"))
    assert signal and {o.labeling_type for o in signal} == {"ndpi"}
    assert "Signal" in {o.label for o in signal}
    everything = list(iter_csv_labels(out))
    assert len(everything) == n > len(signal)


# ----------------------------------------------------------------------------- uid map

def test_uid_map() -> None:
    text = """\
package:com.whatsapp uid:10123
package:/data/app/~~x==/org.thoughtcrime.securesms-1/base.apk=org.thoughtcrime.securesms uid:10124
package:com.android.phone uid:1001
package:com.android.providers.telephony uid:1001
package:org.telegram.messenger uid:10125,1010125
Error: something
"""
    stats = ParseStats()
    m = load_uid_map(text.splitlines(), stats)
    assert m[10123] == ("com.whatsapp",)
    assert m[10124] == ("org.thoughtcrime.securesms",)
    assert m[1001] == ("com.android.phone", "com.android.providers.telephony")
    assert m[10125] == m[1010125] == ("org.telegram.messenger",)
    assert stats.skipped == {"not a package line": 1}


# ----------------------------------------------------------------------------- fuzz

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as hs  # noqa: E402

NETSTAT_PARTS = hs.sampled_from([
    "=== ", "1732800000.5 ", "tcp", "udp6", "\n", "  sl  local_address", "   0: ",
    "0100007F:1F90 ", "00000000000000000000000001000000:0050 ", "0A ", "01 ", "10123 ",
    "4711 ", "zz ", "Proto Recv-Q", "tcp6 0 0 ", "::ffff:1.2.3.4:443 ", "u0_a12 ", "-",
    "5/x", ":::*", "*:*", " ",
])


@settings(max_examples=300, deadline=None)
@given(hs.lists(hs.one_of(hs.text(max_size=30), hs.lists(NETSTAT_PARTS, max_size=16).map("".join)),
                max_size=10))
def test_fuzz_netstat_never_raises(lines: list[str]) -> None:
    stats = ParseStats()
    for _ in iter_netstat_observations(lines, stats, ts=1.0):
        pass


@settings(max_examples=300, deadline=None)
@given(hs.lists(hs.one_of(
    hs.text(max_size=30),
    hs.dictionaries(hs.sampled_from(["ts", "event", "pid", "fd", "proto", "local", "remote",
                                     "ret", "errno", "process"]),
                    hs.one_of(hs.none(), hs.integers(-5, 70000), hs.floats(), hs.text(max_size=8),
                              hs.sampled_from(["tcp", "udp", "connect", "close", "sendto"]),
                              hs.fixed_dictionaries({"ip": hs.text(max_size=12),
                                                     "port": hs.integers(-1, 70000)})),
                    max_size=10).map(json.dumps)), max_size=10))
def test_fuzz_frida_never_raises(lines: list[str]) -> None:
    stats = ParseStats()
    for _ in iter_frida_events(lines, stats):
        pass
