"""``flowtruth label`` on made-up captures and logs: outputs, rotation, pcapng input, run
manifests, and bad input (garbage, truncated and interleaved logs) reported in one line
with counts, never a traceback."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from analysis.errors import BadInputError, ParseError, SchemaError
from analysis.flowtable import ACK, FIN, PSH
from analysis.runinfo import load_manifest
from tests.pcapgen import Conv, Pkt, ether, write_pcap, write_pcapng

REPO = Path(__file__).resolve().parents[1]
T0 = 1_700_000_000.0
PHONE = "10.0.0.5"
ALPHA, BETA = "org.example.alpha", "org.example.beta"


def make_capture(tmp: Path) -> tuple[list[Pkt], dict[str, str]]:
    """Packets of four flows (alpha TCP and UDP, beta TCP, one nobody traced) and an ARP."""
    pkts: list[Pkt] = []
    owners = {}
    for k, (owner, server, cport, sport) in enumerate(
            [(ALPHA, "203.0.113.5", 40001, 443), (BETA, "198.51.100.7", 40003, 443),
             (None, "198.51.100.8", 40004, 80)]):
        c = Conv(client=PHONE, server=server, cport=cport, sport=sport, t0=T0 + k * 0.5)
        c.handshake().tcp(0.05, True, PSH | ACK, b"hello").tcp(0.06, False, PSH | ACK, b"hi")
        c.tcp(0.1, True, FIN | ACK).tcp(0.11, False, FIN | ACK).tcp(0.12, True, ACK)
        pkts += c.pkts
        owners[f"tcp {cport}"] = owner or "unknown"
    u = Conv(client=PHONE, server="203.0.113.6", cport=40002, sport=3478, t0=T0 + 0.2)
    u.udp(0.0, True).udp(0.01, False).udp(0.02, True)
    pkts += u.pkts
    owners["udp 40002"] = ALPHA
    arp = ether(b"\x00\x01\x08\x00\x06\x04\x00\x01" + b"\x00" * 20, ethertype=0x0806)
    pkts.append(Pkt(T0 + 0.3, arp))
    pkts.sort(key=lambda p: p.ts if isinstance(p.ts, float) else p.ts[0])
    return pkts, owners


def strace_alpha() -> str:
    return (
        f"4242  {T0 - 0.01:.6f} socket(AF_INET, SOCK_STREAM, IPPROTO_TCP) = 5<TCP:[1001]>\n"
        f"4242  {T0 - 0.005:.6f} connect(5<TCP:[1001]>, {{sa_family=AF_INET, sin_port=htons(443), "
        f"sin_addr=inet_addr(\"203.0.113.5\")}}, 16 <unfinished ...>\n"
        f"4243  {T0 + 0.19:.6f} socket(AF_INET, SOCK_DGRAM, IPPROTO_IP <unfinished ...>\n"
        f"4242  {T0:.6f} <... connect resumed>) = -1 EINPROGRESS (Operation now in progress)\n"
        f"4243  {T0 + 0.195:.6f} <... socket resumed>) = 6<UDP:[1002]>\n"
        f"4242  {T0 + 0.05:.6f} sendto(5<TCP:[{PHONE}:40001->203.0.113.5:443]>, \"hello\", 5, "
        f"MSG_NOSIGNAL, NULL, 0) = 5\n"
        f"4243  {T0 + 0.2:.6f} sendto(6<UDP:[{PHONE}:40002]>, \"x\", 1, 0, {{sa_family=AF_INET, "
        f"sin_port=htons(3478), sin_addr=inet_addr(\"203.0.113.6\")}}, 16) = 1\n"
        f"4242  {T0 + 0.1:.6f} close(5<TCP:[{PHONE}:40001->203.0.113.5:443]>) = 0\n"
        f"4243  {T0 + 0.25:.6f} close(6<UDP:[{PHONE}:40002]>) = 0\n"
    )


def strace_beta() -> str:
    return (
        f"5151  {T0 + 0.49:.6f} socket(AF_INET, SOCK_STREAM, IPPROTO_TCP) = 7<TCP:[2001]>\n"
        f"5151  {T0 + 0.5:.6f} connect(7<TCP:[2001]>, {{sa_family=AF_INET, sin_port=htons(443), "
        f"sin_addr=inet_addr(\"198.51.100.7\")}}, 16) = -1 EINPROGRESS (Operation now in progress)\n"
        f"5151  {T0 + 0.55:.6f} sendto(7<TCP:[{PHONE}:40003->198.51.100.7:443]>, \"hello\", 5, 0, "
        f"NULL, 0) = 5\n"
        f"5151  {T0 + 0.6:.6f} close(7<TCP:[{PHONE}:40003->198.51.100.7:443]>) = 0\n"
    )


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "controller.cli", "label", *map(str, args)],
                          capture_output=True, text=True, cwd=REPO, timeout=120)


@pytest.fixture
def case(tmp_path: Path) -> dict[str, Path]:
    pkts, _ = make_capture(tmp_path)
    pcap = write_pcap(tmp_path / "cap.pcap", pkts)
    logs = tmp_path / "logs"
    logs.mkdir()
    a = logs / f"strace.4242.{ALPHA}.log"
    a.write_text(strace_alpha())
    b = logs / f"strace.5151.{BETA}:push.log"
    b.write_text(strace_beta())
    return {"tmp": tmp_path, "pcap": pcap, "alpha": a, "beta": b, "logs": logs}


def test_cli_offline_writes_all_outputs_with_labels(case: dict[str, Path]) -> None:
    out = case["tmp"] / "out"
    p = cli("--pcap", case["pcap"], "--strace", f"{ALPHA}={case['alpha']}",
            "--strace", f"{BETA}={case['beta']}", "--device-ip", PHONE, "--out", out,
            "--device-model", "Pixel 7", "--device-mac", "38:a4:ed:18:cc:bf")
    assert p.returncode == 0, p.stderr
    assert p.stderr == ""
    assert "4 bi-flows" in p.stdout and "3 exact" in p.stdout and "1 unlabelled" in p.stdout
    assert "strace and netstat" not in p.stdout  # no netstat given
    q = json.loads((out / "quality.json").read_text())
    assert q["by_type"]["ambiguous"] == {"flows": 0, "packets": 0, "bytes": 0}
    assert q["by_source"] == {"strace": {"flows": 3, "packets": 19, "bytes": 773}}
    assert q["by_app"][ALPHA]["flows"] == 2 and q["by_app"][BETA]["flows"] == 1
    assert q["by_app"][BETA]["by_type"] == {"exact": 1}
    assert q["targets"]["packages"] == [ALPHA, BETA] and q["targets"]["flows"] == 3
    mir = list((out / "Pixel7_38_a4_ed_18_cc_bf").glob(f"*_{ALPHA}_*.json"))
    assert len(mir) == 1
    recs = json.loads(mir[0].read_text())
    assert Counter(r["flow_metadata"]["BF_label"] for r in recs.values()) == {
        ALPHA: 2, BETA: 1, "unknown": 1}
    rows = (out / "labels.csv").read_text().splitlines()
    assert rows[0].startswith("proto,local_ip,local_port,remote_ip,remote_port,label,start,end,"
                              "labeling_type")
    assert len(rows) == 1 + 3
    assert any(f"{BETA},".replace(",", "") in r and f"{BETA}:push" in r for r in rows[1:])
    if shutil.which("tshark"):
        comments = subprocess.run(
            ["tshark", "-r", str(out / "labelled.pcapng"), "-T", "fields", "-e", "frame.comment"],
            capture_output=True, text=True, check=True).stdout.splitlines()
        apps = Counter(c.split("app=")[1].split()[0] if "app=" in c else c for c in comments)
        assert apps == {ALPHA: 8 + 3, BETA: 8, "unknown": 8, "flowtruth: no flow": 1}
        assert f"flowtruth: app={ALPHA} type=exact source=strace flow=0" in comments
        n = subprocess.run(["tshark", "-r", str(out / "filtered.pcap"), "-T", "fields", "-e",
                            "frame.number"], capture_output=True, text=True, check=True)
        assert len(n.stdout.splitlines()) == 8 + 3 + 8


def test_rotated_pcapng_input_gives_one_output_of_each(case: dict[str, Path]) -> None:
    """Two capture files (rotation), pcapng with nanosecond stamps: records are found by
    record number and time, the outputs hold every packet once."""
    from analysis.label import label_capture
    from analysis.pcapng_out import iter_raw_records
    from tests.pcapgen import Iface

    pkts, _ = make_capture(case["tmp"])
    f1 = write_pcapng(case["tmp"] / "c1.pcapng", pkts[:10], (Iface(tsresol=9),))
    f2 = write_pcapng(case["tmp"] / "c2.pcapng", pkts[10:], (Iface(tsresol=9),))
    out = case["tmp"] / "rot"
    # The alpha log is named twice (in its directory and on its own): read once.
    res = label_capture([f1, f2], strace={"": [case["logs"]], ALPHA: [case["alpha"]]},
                        out_dir=out, targets=[ALPHA, BETA])
    assert res.quality["inputs"]["strace"]["files"] == [str(case["alpha"]), str(case["beta"])]
    assert res.targets == [ALPHA, BETA]
    labels = Counter(res.table.label_column("BF_label").tolist())
    assert labels == {ALPHA: 2, BETA: 1, "unknown": 1}
    lab = list(iter_raw_records(out / "labelled.pcapng"))
    assert [r.data for r in lab] == [p.data for p in pkts]
    filt = list(iter_raw_records(out / "filtered.pcap"))
    assert len(filt) == 8 + 3 + 8
    assert all(r.linktype == 1 for r in filt)


def test_run_dir_manifest_is_read_and_checked(case: dict[str, Path]) -> None:
    run = case["tmp"] / "runs" / "20261128T210405Z_pixel7_org.example.alpha"
    (run / "strace").mkdir(parents=True)
    shutil.copy(case["pcap"], run / "capture.pcap")
    shutil.copy(case["alpha"], run / "strace" / case["alpha"].name)
    (run / "packages.txt").write_text(f"package:{ALPHA} uid:10123\npackage:{BETA} uid:10124\n")
    manifest = {
        "schema_version": 1,
        "device": {"serial": "X1", "model": "Pixel 7", "manufacturer": "Google",
                   "mac": "38:a4:ed:18:cc:bf", "ip": PHONE},
        "apps": [{"package": ALPHA, "uid": 10123, "version": "1.0"}],
        "activity": "chat", "clock": {"offset_s": 0.0, "uncertainty_s": 0.002},
        "capture": {"files": ["capture.pcap"], "interface": "wlan1", "snaplen": 262144},
        "traces": {"strace": ["strace"], "netstat": None, "frida": None,
                   "packages": "packages.txt"},
        "started_at": "2026-11-28T21:04:05Z", "outcome": "completed",
        "artifacts": [{"path": "capture.pcap", "sha256": "00"}],
    }
    (run / "manifest.json").write_text(json.dumps(manifest))
    m = load_manifest(run)
    assert m.packages == [ALPHA] and m.clock.offset_s == 0.0 and m.device.model == "Pixel 7"
    p = cli(run, "-q")
    assert p.returncode == 0, p.stderr
    q = json.loads((run / "labels" / "quality.json").read_text())
    assert q["by_app"][ALPHA]["flows"] == 2 and q["targets"]["flows"] == 2
    assert list((run / "labels" / "Pixel7_38_a4_ed_18_cc_bf").glob(f"*_{ALPHA}_*.json"))
    # Damaged manifests: one line naming the file and the field, exit 2.
    for bad, want in [
        ("{not json", "manifest.json: line 1 column 2: not JSON"),
        (json.dumps({**manifest, "schema_version": 9}), "field schema_version"),
        (json.dumps({**manifest, "capture": {"files": []}}), "field capture.files"),
        (json.dumps({**manifest, "apps": [{"uid": 1}]}), "field apps[0].package"),
        (json.dumps({**manifest, "clock": {"offset_s": "soon"}}), "field clock.offset_s"),
        (json.dumps({k: v for k, v in manifest.items() if k != "schema_version"}),
         "field schema_version is missing"),
        (json.dumps({**manifest, "traces": {**manifest["traces"], "netstat": "gone.log"}}),
         "field traces.netstat names gone.log, which does not exist"),
    ]:
        (run / "manifest.json").write_text(bad)
        p = cli(run)
        assert p.returncode == 2, (bad, p.stderr)
        assert want in p.stderr and str(run) in p.stderr, p.stderr
        assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr
    with pytest.raises(SchemaError):
        (run / "manifest.json").write_text("[1, 2]")
        load_manifest(run / "manifest.json")
    with pytest.raises(BadInputError):
        load_manifest(case["tmp"] / "nowhere")


def test_garbage_logs_only_exit_2_with_counts(case: dict[str, Path]) -> None:
    junk = case["tmp"] / "junk.log"
    junk.write_bytes(b"\x00\xff garbage line\nthis is not strace\n" + bytes(range(256)) * 4 + b"\n")
    ns = case["tmp"] / "netstat.log"
    ns.write_text("hello\nworld\n")
    fr = case["tmp"] / "frida.jsonl"
    fr.write_text("{not json\n[1,2]\n")
    p = cli("--pcap", case["pcap"], "--strace", f"{ALPHA}={junk}", "--netstat", ns,
            "--frida", fr, "--out", case["tmp"] / "o")
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr
    err = [ln for ln in p.stderr.splitlines() if ln.startswith("flowtruth: error:")]
    assert len(err) == 1
    assert "nothing usable to label with" in err[0]
    assert "strace (1 file(s)):" in err[0] and "0 parsed" in err[0] and "skipped" in err[0]
    assert not (case["tmp"] / "o").exists()


def test_truncated_and_interleaved_logs_are_counted_and_still_label(case: dict[str, Path]) -> None:
    text = strace_alpha()
    # Interleaved: another writer's half lines and junk between the calls; truncated: the
    # last line cut in the middle.
    lines = text.splitlines(True)
    mixed = (lines[:3] + ["4243  garbage from another writer <unfin\n", "@@@ ((((\n"]
             + lines[3:] + ["4242  1700000001.000000 sendto(5<TCP:[10.0.0.5:40001->"])
    bad = case["tmp"] / f"strace.4242.{ALPHA}.log"
    bad.write_text("".join(mixed))
    out = case["tmp"] / "o2"
    p = cli("--pcap", case["pcap"], "--strace", f"{ALPHA}={bad}", "--out", out, "-q")
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr
    warn = [ln for ln in p.stderr.splitlines() if ln.startswith("flowtruth: warning:")]
    assert warn and str(bad) in warn[0] and "skipped" in warn[0]
    q = json.loads((out / "quality.json").read_text())
    assert q["inputs"]["strace"]["skipped"]
    assert sum(q["inputs"]["strace"]["skipped"].values()) >= 3
    assert q["by_app"][ALPHA]["flows"] == 2


@pytest.mark.parametrize("argv, want", [
    ([], "nothing to label"),
    (["--pcap", "{pcap}"], "--out DIR is needed"),
    (["--pcap", "{tmp}/none.pcap", "--strace", "a.b={alpha}", "--out", "{tmp}/o"],
     "none.pcap: no such file"),
    (["--pcap", "{pcap}", "--strace", "not a package={alpha}", "--out", "{tmp}/o"],
     "is not a package name"),
    (["--pcap", "{pcap}", "--strace", "a.b={tmp}/missing.log", "--out", "{tmp}/o"],
     "missing.log: no such file"),
    (["--pcap", "{alpha}", "--strace", "a.b={alpha}", "--out", "{tmp}/o"],
     "not a pcap or pcapng file"),
    (["--pcap", "{pcap}", "--out", "{tmp}/o"], "nothing usable to label with: no trace given"),
    (["--pcap", "{pcap}", "--strace", "a.b={tmp}", "--out", "{tmp}/o"],
     "no strace.<pid>.<procname>.log files"),
    (["--pcap", "{pcap}", "--strace", "a.b={alpha}", "--device-ip", "phone", "--out", "{tmp}/o"],
     "device address"),
    (["--pcap", "{pcap}", "--strace", "a.b={alpha}", "--format", "json", "--out", "{tmp}/o"],
     "json"),
    (["{tmp}", "--pcap", "{pcap}"], "either RUN_DIR or --pcap"),
])
def test_bad_arguments_one_line_exit_2(case: dict[str, Path], argv: list[str], want: str) -> None:
    fill = {k: str(v) for k, v in case.items()}
    p = cli(*[a.format(**fill) for a in argv])
    assert p.returncode == 2, (argv, p.stdout, p.stderr)
    assert want in p.stderr, p.stderr
    assert "Traceback" not in p.stderr


def test_library_errors_are_typed(case: dict[str, Path]) -> None:
    from analysis.label import label_capture

    with pytest.raises(ParseError):
        label_capture(case["alpha"], strace={ALPHA: [case["alpha"]]})
    with pytest.raises(BadInputError, match="unknown format"):
        label_capture(case["pcap"], strace={ALPHA: [case["alpha"]]}, fmt="csv")


def test_frida_events_label_a_flow_strace_did_not_see(case: dict[str, Path]) -> None:
    """The frida agent's JSON lines are a source like the others (``--frida``)."""
    fr = case["tmp"] / "frida.jsonl"
    ev = {"ts": T0 + 1.0, "event": "connect", "pid": 77, "tid": 77, "fd": 9, "proto": "tcp",
          "family": 4, "local": {"ip": PHONE, "port": 40004},
          "remote": {"ip": "198.51.100.8", "port": 80}, "ret": -1, "errno": "EINPROGRESS",
          "process": "org.example.gamma"}
    close = {**ev, "ts": T0 + 1.2, "event": "close", "ret": 0}
    fr.write_text(json.dumps(ev) + "\n" + json.dumps(close) + "\n" + "{broken\n")
    out = case["tmp"] / "o"
    p = cli("--pcap", case["pcap"], "--strace", f"{ALPHA}={case['alpha']}", "--frida", fr,
            "--out", out, "-q")
    assert p.returncode == 0, p.stderr
    assert "1 not JSON" in p.stderr  # the damaged line is counted and named
    q = json.loads((out / "quality.json").read_text())
    assert q["by_app"]["org.example.gamma"]["flows"] == 1
    assert q["by_source"]["frida"]["flows"] == 1
    assert q["inputs"]["frida"]["skipped"] == {"not JSON": 1}


@pytest.mark.parametrize("fmt", ["pcap", "pcapng"])
def test_writers_give_the_same_bytes_whatever_the_batch_size(
        case: dict[str, Path], fmt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Batches of a few records (and records larger than a batch) change nothing."""
    import analysis.pcapng_out as po
    from analysis.label import label_capture, target_mask

    pkts, _ = make_capture(case["tmp"])
    if fmt == "pcap":
        files = [write_pcap(case["tmp"] / "a.pcap", pkts[:13]),
                 write_pcap(case["tmp"] / "b.pcap", pkts[13:])]
    else:
        files = [write_pcapng(case["tmp"] / "a.pcapng", pkts[:13]),
                 write_pcapng(case["tmp"] / "b.pcapng", pkts[13:])]
    res = label_capture(files, strace={"": [case["logs"]]})
    keep = target_mask(res.table, res.targets)
    outs = {}
    default = po.CHUNK
    for chunk in (default, 100):
        monkeypatch.setattr(po, "CHUNK", chunk)
        d = case["tmp"] / f"w{chunk}"
        po.write_labelled_pcapng(files, res.table, d / "l.pcapng")
        st = po.write_filtered_pcap(files, res.table, keep, d / "f.pcap")
        assert st.written == 8 + 3 + 8
        outs[chunk] = ((d / "l.pcapng").read_bytes(), (d / "f.pcap").read_bytes())
    assert len(outs) == 2 and outs[default] == outs[100]
    assert [r.data for r in po.iter_raw_records(d / "l.pcapng")] == [p.data for p in pkts]
    assert not list(d.glob(".*.tmp"))  # no temp file left beside the outputs
