"""The correlator's rules: exact tuples, port reuse, ambiguity, clocks, DNS, fallbacks."""

from __future__ import annotations

import pytest

from analysis.correlate import FlowKeys, correlate, flowkeys_from_table
from analysis.errors import BadInputError
from analysis.traces.model import ObservationSet, SocketObservation

T0 = 1732800000.0
DEV = "10.0.0.5"


def make_obs(**kw) -> SocketObservation:
    """A socket observation with overridable defaults (an strace connect of app.a)."""
    d = dict(ts=T0, source="strace", proto=6, local_ip=DEV, local_port=40000,
             remote_ip="1.2.3.4", remote_port=443, kind="connect", label="app.a",
             sublabel="app.a", sock=None)
    d.update(kw)
    return SocketObservation(**d)


def make_socket(t_open: float, t_close: float, label: str, *, lport: int | None = 40000,
                sock: int, proto: int = 6, rip: str = "1.2.3.4", rport: int = 443,
                connect_knows_port: bool = False, source: str = "strace",
                sublabel: str | None = None) -> list[SocketObservation]:
    """connect (port unknown, as without -yy) ... send ... close, of one socket."""
    sub = sublabel or label
    return [
        make_obs(ts=t_open, local_port=lport if connect_knows_port else None, label=label,
                 sublabel=sub, sock=sock, proto=proto, remote_ip=rip, remote_port=rport,
                 source=source),
        make_obs(ts=(t_open + t_close) / 2, kind="send", local_port=lport, label=label,
                 sublabel=sub, sock=sock, proto=proto, remote_ip=rip, remote_port=rport,
                 source=source),
        make_obs(ts=t_close, kind="close", local_port=lport, label=label, sublabel=sub,
                 sock=sock, proto=proto, remote_ip=rip, remote_port=rport, source=source),
    ]


def make_flows(rows: list[dict]) -> FlowKeys:
    """FlowKeys from dicts (defaults: TCP 10.0.0.5:40000 -> 1.2.3.4:443 with a SYN)."""
    full = []
    for r in rows:
        d = dict(proto=6, src_ip=DEV, src_port=40000, dst_ip="1.2.3.4", dst_port=443,
                 first=T0, last=T0 + 1.0, syn=None)
        d.update(r)
        if d["syn"] is None:
            d["syn"] = d["proto"] == 6
        full.append(d)
    return FlowKeys(
        proto=[d["proto"] for d in full], src_ip=[d["src_ip"] for d in full],
        src_port=[d["src_port"] for d in full], dst_ip=[d["dst_ip"] for d in full],
        dst_port=[d["dst_port"] for d in full], first_ts=[d["first"] for d in full],
        last_ts=[d["last"] for d in full], has_syn=[d["syn"] for d in full],
        syn_ts=[d["first"] for d in full],
    )


def labels(res) -> list[tuple]:
    return list(zip(res.labels["BF_label"], res.labels["BF_labeling_type"], strict=True))


def test_exact_tuple_label_and_sublabel() -> None:
    obs = make_socket(T0, T0 + 0.9, "org.signal", sock=1, sublabel="org.signal:push")
    res = correlate(make_flows([{}]), obs, refine_clock=False)
    assert labels(res) == [("org.signal", "exact")]
    assert res.labels["BF_label_source"][0] == "strace"
    assert res.labels["BF_sublabel"][0] == "org.signal:push"
    assert res.report["exact_per_source"]["strace"] == 1


@pytest.mark.parametrize("phone_ahead", [0.0, 0.9, -0.9])
def test_port_reuse_by_two_apps_seconds_apart(phone_ahead: float) -> None:
    """The same local port and remote, app.a then app.b 3 s later; the phone clock is
    off by up to 0.9 s and nobody says so (no refinement): each flow still gets its app."""
    s = phone_ahead
    obs = (make_socket(T0 + s, T0 + 1.0 + s, "app.a", sock=1)
           + make_socket(T0 + 4.0 + s, T0 + 5.0 + s, "app.b", sock=2))
    flows = make_flows([{"first": T0, "last": T0 + 1.1}, {"first": T0 + 4.0, "last": T0 + 5.1}])
    res = correlate(flows, obs, refine_clock=False)
    assert labels(res) == [("app.a", "exact"), ("app.b", "exact")]


def test_port_reuse_closer_than_the_tolerance_needs_the_refined_clock() -> None:
    """Reuse 1.5 s apart with the phone 0.9 s ahead: without refinement the windows
    overlap and the second flow is ambiguous (never wrong); refined from the connect/SYN
    pairs, both are exact."""
    s = 0.9
    obs = []
    flows = []
    for k in range(4):  # a few more sockets so the clock has pairs to learn from
        base = T0 + 100 + 10 * k
        obs += make_socket(base + s, base + 0.5 + s, "app.c", sock=10 + k, lport=41000 + k,
                           connect_knows_port=True)
        flows.append({"first": base, "last": base + 0.6, "src_port": 41000 + k})
    obs += make_socket(T0 + s, T0 + 0.5 + s, "app.a", sock=1, connect_knows_port=True)
    obs += make_socket(T0 + 2.0 + s, T0 + 2.5 + s, "app.b", sock=2, connect_knows_port=True)
    flows += [{"first": T0, "last": T0 + 0.6}, {"first": T0 + 2.0, "last": T0 + 2.6}]
    fk = make_flows(flows)
    blind = correlate(fk, obs, refine_clock=False)
    assert labels(blind)[4] == ("app.a", "exact")
    assert labels(blind)[5] == ("unknown", "ambiguous")
    assert blind.labels["BF_candidates"][5] == "app.a|app.b"
    res = correlate(fk, obs)
    assert labels(res)[4:] == [("app.a", "exact"), ("app.b", "exact")]
    clock = res.report["clock"]
    assert clock["refined"] and clock["pairs"] == 6
    assert clock["offset"] == pytest.approx(0.9)
    assert clock["residual_max"] == pytest.approx(0.0, abs=1e-6)


def test_clock_offset_given_by_the_session() -> None:
    """The phone runs 30 s ahead: with the measured offset labels are right, without it
    nothing matches (and nothing is wrongly labelled)."""
    obs = make_socket(T0 + 30, T0 + 30.9, "app.a", sock=1)
    fk = make_flows([{}])
    assert labels(correlate(fk, obs, clock_offset=30.2, refine_clock=False)) == [("app.a", "exact")]
    assert labels(correlate(fk, obs, refine_clock=False)) == [("unknown", "unlabelled")]


def test_remote_endpoint_only() -> None:
    # Local port never seen (no -yy, no getsockname): remote endpoint + time.
    obs = [make_obs(local_port=None, label="app.a", sock=1)]
    fk = make_flows([{}, {"first": T0 + 30, "last": T0 + 31, "src_port": 40001}])
    res = correlate(fk, obs, refine_clock=False)
    assert labels(res) == [("app.a", "exact"), ("unknown", "unlabelled")]
    assert res.report["stages"]["remote_exact"] == 1


def test_remote_endpoint_two_apps_is_ambiguous() -> None:
    obs = [make_obs(local_port=None, label="app.a", sock=1, kind="send"),
           make_obs(ts=T0 + 0.3, local_port=None, label="app.b", sock=2, kind="send")]
    res = correlate(make_flows([{"syn": False}]), obs, refine_clock=False)
    assert labels(res) == [("unknown", "ambiguous")]
    assert res.labels["BF_candidates"][0] == "app.a|app.b"


def test_one_connect_two_syn_flows_is_ambiguous() -> None:
    """One traced connect() to an endpoint, two SYN flows to it at that moment: the
    other flow is someone untraced, and which one is which is unknown."""
    obs = [make_obs(local_port=None, label="app.a", sock=1)]
    fk = make_flows([{"src_port": 40000}, {"src_port": 40001, "first": T0 + 0.2}])
    res = correlate(fk, obs, refine_clock=False)
    assert labels(res) == [("unknown", "ambiguous"), ("unknown", "ambiguous")]
    assert res.report["remote_competing"] == 2
    # Two connects of the same app for two flows: both exact.
    obs.append(make_obs(ts=T0 + 0.2, local_port=None, label="app.a", sock=2))
    res = correlate(fk, obs, refine_clock=False)
    assert labels(res) == [("app.a", "exact"), ("app.a", "exact")]


def test_dns_from_the_system_resolver_and_from_the_app() -> None:
    obs = [make_obs(proto=17, kind="send", local_port=5353, remote_ip="8.8.8.8", remote_port=53,
                    label="app.a", sock=3)]
    fk = make_flows([
        {"proto": 17, "src_port": 5353, "dst_ip": "8.8.8.8", "dst_port": 53},  # the app's own
        {"proto": 17, "src_port": 6000, "dst_ip": "192.168.1.1", "dst_port": 53},  # netd
    ])
    res = correlate(fk, obs, refine_clock=False, dns_resolver_label="system:dns")
    assert labels(res) == [("app.a", "exact"), ("system:dns", "resolver")]
    assert res.report["resolver"] == 1
    # netd's query socket carries the asking app's uid: netstat alone cannot tell.
    ns = _netstat(10123, proto=17, local_port=6000, remote_ip="192.168.1.1", remote_port=53,
                  kind="snapshot")
    res = correlate(fk, obs + [ns], refine_clock=False, uid_map={10123: "app.a"},
                    dns_resolver_label="system:dns")
    assert labels(res) == [("app.a", "exact"), ("system:dns", "resolver")]
    assert res.labels["BF_candidates"][1] == "app.a"


def test_most_common_fallback_is_off_by_default() -> None:
    obs = make_socket(T0, T0 + 1, "app.a", sock=1)
    fk = make_flows([{}, {"src_port": 50000, "dst_ip": "9.9.9.9"}])
    assert labels(correlate(fk, obs, refine_clock=False))[1] == ("unknown", "unlabelled")
    res = correlate(fk, obs, refine_clock=False, most_common_fallback=True,
                    target_packages=("org.signal",))
    assert labels(res) == [("app.a", "exact"), ("org.signal", "most-common")]
    assert res.report["most_common"] == 1
    res = correlate(fk, obs, refine_clock=False, most_common_fallback=True)
    assert labels(res)[1] == ("app.a", "most-common")


def _netstat(uid: int | None, label: str | None = None, inode: int = 77, **kw) -> SocketObservation:
    d = dict(ts=T0 - 0.5, end_ts=T0 + 1.5, source="netstat", kind="snapshot", label=label,
             sublabel=None, uid=uid, sock=inode)
    d.update(kw)
    return make_obs(**d)


def test_uid_only_and_uid_map() -> None:
    fk = make_flows([{}])
    res = correlate(fk, [_netstat(10123)], refine_clock=False)
    assert labels(res) == [("uid:10123", "unlabelled")]
    assert res.labels["BF_label_source"][0] == "netstat"
    res = correlate(fk, [_netstat(10123)], refine_clock=False, uid_map={10123: ("com.whatsapp",)})
    assert labels(res) == [("com.whatsapp", "exact")]
    assert res.report["exact_per_source"]["netstat"] == 1
    # A shared uid names several packages: ambiguous, never one of them.
    res = correlate(fk, [_netstat(1001)], refine_clock=False,
                    uid_map={1001: ("com.android.phone", "com.android.providers.telephony")})
    assert labels(res) == [("unknown", "ambiguous")]
    assert res.labels["BF_candidates"][0] == "com.android.phone|com.android.providers.telephony"


def test_strace_and_netstat_agree_or_disagree() -> None:
    fk = make_flows([{}])
    strace = make_socket(T0, T0 + 1, "com.whatsapp", sock=1)
    res = correlate(fk, strace + [_netstat(10123)], refine_clock=False,
                    uid_map={10123: "com.whatsapp"})
    assert labels(res) == [("com.whatsapp", "exact")]
    assert res.labels["BF_label_source"][0] == "strace"  # the most trusted of those agreeing
    assert res.report["strace_netstat"] == {"both": 1, "agree": 1, "disagree": 0}
    res = correlate(fk, strace + [_netstat(10999)], refine_clock=False,
                    uid_map={10999: "org.telegram.messenger"})
    assert labels(res) == [("unknown", "ambiguous")]
    assert res.report["strace_netstat"]["disagree"] == 1
    # A uid nobody mapped does not contradict a package.
    res = correlate(fk, strace + [_netstat(10999)], refine_clock=False)
    assert labels(res) == [("com.whatsapp", "exact")]


def test_csv_labels_either_orientation_and_their_labeling_type() -> None:
    inf = float("inf")
    obs = [SocketObservation(-inf, "csv", 6, "1.2.3.4", 443, DEV, 40000, "snapshot",
                             label="Signal", end_ts=inf, labeling_type="ndpi")]
    res = correlate(make_flows([{}]), obs, refine_clock=False)
    assert labels(res) == [("Signal", "ndpi")]
    assert res.labels["BF_label_source"][0] == "csv"


def test_ipv4_mapped_and_local_address_mismatch() -> None:
    obs = make_socket(T0, T0 + 1, "app.a", sock=1, rip="1.2.3.4")
    other_device = make_flows([{"src_ip": "10.0.0.99"}])
    assert labels(correlate(other_device, obs, refine_clock=False)) == [("unknown", "unlabelled")]
    mapped = make_flows([{"dst_ip": "::ffff:1.2.3.4"}])
    assert labels(correlate(mapped, obs, refine_clock=False)) == [("app.a", "exact")]


def test_observation_set_round_trip_and_concat() -> None:
    obs = make_socket(T0, T0 + 1, "app.a", sock=1) + [_netstat(10123)]
    s = ObservationSet.from_observations(obs)
    assert s.to_observations() == obs
    both = ObservationSet.concat([s, ObservationSet.from_observations(
        make_socket(T0, T0 + 1, "app.b", sock=2))])
    assert len(both) == 7 and both.to_observations()[:4] == obs
    assert both.to_observations()[4].label == "app.b"
    assert len(ObservationSet.from_observations([])) == 0


def test_empty_inputs_and_bad_flowkeys() -> None:
    res = correlate(make_flows([{}]), [], refine_clock=True)
    assert labels(res) == [("unknown", "unlabelled")]
    res = correlate(make_flows([{}]), [make_obs(label=None, sublabel=None)], refine_clock=False)
    assert labels(res) == [("unknown", "unlabelled")]  # a socket of nobody labels nothing
    assert res.report["observations_without_owner"] == 1
    res = correlate(make_flows([]), make_socket(T0, T0 + 1, "a", sock=1))
    assert len(res) == 0
    with pytest.raises(BadInputError):
        FlowKeys(proto=[6], src_ip=[DEV], src_port=[1, 2], dst_ip=["x"], dst_port=[1],
                 first_ts=[0.0], last_ts=[1.0])


def test_flowkeys_from_flowtable() -> None:
    from tests.factories import make_flowtable

    table = make_flowtable([
        {"proto": 6, "src_ip": DEV, "dst_ip": "1.2.3.4", "src_port": 40000, "dst_port": 443,
         "start": T0, "packets": [{"dir": 0, "flags": 0x02}, {"dir": 1, "flags": 0x12}]},
        {"proto": 17, "src_ip": "2001:db8::5", "dst_ip": "2001:db8::1", "src_port": 5000,
         "dst_port": 53, "start": T0 + 1, "packets": [{"dir": 0}]},
        {"proto": 6, "src_ip": DEV, "dst_ip": "1.2.3.9", "src_port": 8080, "dst_port": 50000,
         "start": T0 + 2, "packets": [{"dir": 1, "flags": 0x02}, {"dir": 0, "flags": 0x12}]},
    ])
    fk = flowkeys_from_table(table)
    assert list(fk.src_ip) == [DEV, "2001:db8::5", DEV]
    assert list(fk.dst_port) == [443, 53, 50000]
    assert list(fk.has_syn) == [True, False, False]  # the third: the device accepted
    assert fk.first_ts[0] == pytest.approx(T0)
    res = correlate(fk, make_socket(T0, T0 + 0.5, "app.a", sock=1), refine_clock=False)
    res.apply(table)
    assert list(table.labels["BF_label"]) == ["app.a", "android:dns-resolver", "unknown"]
    assert list(table.labels["BF_labeling_type"]) == ["exact", "resolver", "unlabelled"]


SHARED = __import__("pathlib").Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.mark.skipif(not (SHARED / "ndpi_pcaps" / "flow_labels.csv").exists(),
                    reason="no shared data")
@pytest.mark.parametrize("capture", ["signal.pcap", "telegram.pcap", "stun_wa_call.pcapng"])
def test_ndpi_labels_on_real_captures(tmp_path, capture: str) -> None:
    """nDPI's verdicts, through the generic CSV, label every flow of the real capture,
    each with the verdict nDPI gave that 5-tuple."""
    import csv

    from analysis.assemble import read_flows
    from analysis.traces.csvlabels import iter_csv_labels, ndpi_flow_labels_to_csv
    from analysis.traces.model import norm_ip

    src = SHARED / "ndpi_pcaps" / "flow_labels.csv"
    out = tmp_path / "labels.csv"
    ndpi_flow_labels_to_csv(src, out)
    verdict: dict[tuple, set[str]] = {}
    with open(src, newline="") as fh:
        for r in csv.DictReader(fh):
            if r["pcap"] != capture or r["l4"] not in ("TCP", "UDP"):
                continue
            a = (norm_ip(r["src_ip"]), int(r["src_port"]))
            b = (norm_ip(r["dst_ip"]), int(r["dst_port"]))
            for key in ((r["l4"], *a, *b), (r["l4"], *b, *a)):
                verdict.setdefault(key, set()).add(r["app_family"])
    table = read_flows(SHARED / "ndpi_pcaps" / capture)
    fk = flowkeys_from_table(table)
    res = correlate(fk, iter_csv_labels(out, pcap=capture))
    assert len(fk) > 0
    for i in range(len(fk)):
        key = ({6: "TCP", 17: "UDP"}[int(fk.proto[i])], norm_ip(fk.src_ip[i]),
               int(fk.src_port[i]), norm_ip(fk.dst_ip[i]), int(fk.dst_port[i]))
        want = verdict.get(key)
        got = (res.labels["BF_label"][i], res.labels["BF_labeling_type"][i])
        if want is None:
            assert got[1] in ("unlabelled", "resolver")
        elif len(want) == 1:
            assert got == (next(iter(want)), "ndpi")
        else:
            assert got[1] == "ambiguous"
    assert res.report["exact_per_source"]["csv"] == 0  # ndpi verdicts are not "exact"
    assert res.report["labelled_per_source"]["csv"] == sum(
        1 for t in res.labels["BF_labeling_type"] if t == "ndpi")


def test_netstat_port_reuse_and_collect_observations(tmp_path) -> None:
    from analysis.traces import collect_observations

    log = tmp_path / "netstat.log"
    hdr = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
    row = ("   0: 0500000A:9C40 A55CDF4C:01BB 01 00000000:00000000 00:00000000 00000000 {uid} "
           "0 {inode} 1 0000000000000000 20 4 30 10 -1\n")
    text = ""
    for k in range(10):  # 10 polls, 0.5 s apart: app 10123 for 2 s, then 10456 reuses the port
        text += f"=== {T0 + 0.5 * k:.6f} tcp\n" + hdr
        if k < 4:
            text += row.format(uid=10123, inode=4711)
        elif k >= 6:
            text += row.format(uid=10456, inode=4800)
    log.write_text(text)
    strace = tmp_path / "strace.1.org.example.log"
    strace.write_text("garbage\n")
    obs, stats = collect_observations(netstat=[log], strace=[strace])
    assert stats["netstat"].n_skipped == 0 and stats["strace"].skipped == {"garbage": 1}
    fk = make_flows([
        {"dst_ip": "76.223.92.165", "first": T0 + 0.2, "last": T0 + 1.4},
        {"dst_ip": "76.223.92.165", "first": T0 + 3.1, "last": T0 + 4.6},
    ])
    res = correlate(fk, obs, refine_clock=False,
                    uid_map={10123: "com.whatsapp", 10456: "org.telegram.messenger"})
    assert labels(res) == [("com.whatsapp", "exact"), ("org.telegram.messenger", "exact")]
    assert list(res.labels["BF_label_source"]) == ["netstat", "netstat"]


def test_untraced_reuse_right_after_a_close_is_not_the_traced_app() -> None:
    """app.a closes its socket; 0.4 s later something untraced uses the same port to the
    same server. Within the loose tolerance, but the refined clock says the socket was
    already closed: the second flow stays unlabelled."""
    obs, flows = [], []
    for k in range(4):  # pairs for the clock
        base = T0 + 100 + 10 * k
        obs += make_socket(base + 0.3, base + 0.8, "app.c", sock=10 + k, lport=41000 + k,
                           connect_knows_port=True)
        flows.append({"first": base, "last": base + 0.6, "src_port": 41000 + k})
    obs += make_socket(T0 + 0.3, T0 + 1.3, "app.a", sock=1, connect_knows_port=True)
    flows += [{"first": T0, "last": T0 + 1.0}, {"first": T0 + 1.4, "last": T0 + 2.0}]
    res = correlate(make_flows(flows), obs, clock_offset=0.0)
    assert res.report["clock"]["offset"] == pytest.approx(0.3)
    assert labels(res)[4:] == [("app.a", "exact"), ("unknown", "unlabelled")]
