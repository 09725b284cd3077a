"""Fuzzing every input kind: any bytes give a result or one FlowtruthError line, never a
traceback, a hang or a memory blow-up.

Each kind has a valid seed; an example mutates it (bytes flipped, cut, inserted) or plants a
hostile value in it (deep nesting, a 5,000-digit number, a 300 KB field, a value too large for
its type, a dict where a list belongs, a path outside). The loaders are the ones the CLI
calls. Run longer with ``FUZZ_EXAMPLES=2000 python -m pytest tests/test_fuzz_inputs.py``.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from analysis.errors import LINE_LIMIT, FlowtruthError
from tests.pcapgen import ACK, SYN, Iface, Pkt, ether, make_tcp, make_udp, write_pcap, write_pcapng

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "android_real"
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "40"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow, HealthCheck.data_too_large])
HANG_SECONDS = 20
RSS_LIMIT = 1 << 30

PLACEHOLDER = "\"@@FUZZ@@\""
HOSTILE_JSON = [
    "[" * 100_000 + "]" * 100_000,           # RecursionError in json
    "{\"a\":" * 50_000 + "1" + "}" * 50_000,
    "9" * 5_000,                             # over Python's int max str digits
    "1" + "0" * 30,                          # too large for int64
    "-1",
    "1e999",
    "NaN",
    "{}",
    "[]",
    "{\"x\": [1, 2]}",
    "\"" + "x" * 300_000 + "\"",
    "\"../../../../etc/shadow\"",
    "\"/etc/shadow\"",
    "\"\\u001b[31mred\\u0007\"",
    "null",
    "true",
    "[1e308, -1e308]",
    "{\"" + "k" * 100_000 + "\": 1}",
]
HOSTILE_TEXT = [
    "9" * 5_000,
    "99999999999999999999999",
    "-1",
    "4294967296",
    "x" * 300_000,
    "\x00\xff\x1b[31m",
    "\u202e",
    "'\"`$(reboot)`",
    ",,,,,,,,,,,,,,,,",
    "\"unterminated",
    "4294967296",
    "10000",
]


# ---------------------------------------------------------------------- seeds and loaders

def _pkts() -> list[Pkt]:
    return [Pkt(1.0, ether(make_tcp("10.0.0.1", "10.0.0.2", 40000, 443, SYN, mss=1460, ws=7))),
            Pkt(1.1, ether(make_tcp("10.0.0.2", "10.0.0.1", 443, 40000, SYN | ACK))),
            Pkt(1.2, ether(make_tcp("10.0.0.1", "10.0.0.2", 40000, 443, ACK, b"hello"))),
            Pkt(1.3, ether(make_udp("2001:db8::1", "2001:db8::2", 5000, 53, b"abc")))]


FRIDA_EVENTS = [
    {"ts": 10.0, "event": "connect", "pid": 7, "tid": 8, "fd": 84, "proto": "tcp", "family": 6,
     "local": None, "remote": {"ip": "::ffff:76.223.92.165", "port": 443}, "ret": -1,
     "errno": "EINPROGRESS", "process": "org.thoughtcrime.securesms"},
    {"ts": 10.1, "event": "sendto", "pid": 7, "tid": 9, "fd": 84, "proto": "tcp", "family": 6,
     "local": {"ip": "::ffff:10.0.0.5", "port": 40123}, "remote": None, "ret": 517},
    {"ts": 10.4, "event": "close", "pid": 7, "tid": 9, "fd": 84, "proto": "tcp", "family": 6,
     "local": None, "remote": None, "ret": 0},
]

MANIFEST = {
    "schema_version": 1,
    "device": {"serial": "X1", "model": "Pixel 7", "manufacturer": "Google",
               "mac": "38:a4:ed:18:cc:bf", "ip": "10.0.0.1"},
    "apps": [{"package": "org.thoughtcrime.securesms", "uid": 10123, "version": "1.0"}],
    "activity": "chat", "clock": {"offset_s": 0.0, "uncertainty_s": 0.002},
    "capture": {"files": ["capture.pcap"], "interface": "wlan1", "snaplen": 262144},
    "traces": {"strace": None, "netstat": None, "frida": None, "packages": None},
    "started_at": "2026-11-28T21:04:05Z", "outcome": "completed",
    "artifacts": [{"path": "capture.pcap", "sha256": "00"}],
}


class Kind:
    """One input kind: a file name, a seed (bytes) and the loader the CLI uses."""

    def __init__(self, name: str, filename: str, seed: Callable[[Path], bytes],
                 load: Callable[[Path], object], json_seed: object = None) -> None:
        self.name, self.filename, self.seed, self.load = name, filename, seed, load
        self.json_seed = json_seed


def _seed_pcap(tmp: Path) -> bytes:
    return write_pcap(tmp / "seed.pcap", _pkts()).read_bytes()


def _seed_pcapng(tmp: Path) -> bytes:
    return write_pcapng(tmp / "seed.pcapng", _pkts(), [Iface(1, tsresol=9)]).read_bytes()


def _load_capture(p: Path) -> None:
    from analysis.assemble import read_flows

    read_flows(p)


def _seed_strace(tmp: Path) -> bytes:
    return (REPO / "tests/data/strace/strace.4242.org.thoughtcrime.securesms.log").read_bytes()[:6000]


def _load_strace(p: Path) -> None:
    from analysis.traces import collect_observations

    collect_observations(strace=[p], date="2026-11-28")


def _seed_netstat(tmp: Path) -> bytes:
    f = SHARED / "proc_net_xcrash65.log"
    if f.is_file():
        return f.read_bytes()[:6000]
    return (b"Proto Recv-Q Send-Q Local Address           Foreign Address         State\n"
            b"tcp        0      0 10.0.0.5:40123          76.223.92.165:443       ESTABLISHED\n")


def _load_netstat(p: Path) -> None:
    from analysis.traces import collect_observations

    collect_observations(netstat=[p])


def _seed_frida(tmp: Path) -> bytes:
    return "".join(json.dumps(e) + "\n" for e in FRIDA_EVENTS).encode()


def _load_frida(p: Path) -> None:
    from analysis.traces import collect_observations

    collect_observations(frida=[p])


def _seed_csv(tmp: Path) -> bytes:
    return (b"proto,local_ip,local_port,remote_ip,remote_port,label,start,end\n"
            b"tcp,10.0.0.1,40000,10.0.0.2,443,org.thoughtcrime.securesms,1.0,2.0\n"
            b"udp,2001:db8::1,5000,2001:db8::2,53,dns,,\n")


def _load_csv(p: Path) -> None:
    from analysis.traces import collect_observations

    collect_observations(csv=[p])


def _seed_pcapdroid(tmp: Path) -> bytes:
    f = SHARED / "pcapdroid_csv_current_format.csv"
    if f.is_file():
        return f.read_bytes()[:6000]
    return (b"IPProto,SrcIP,SrcPort,DstIP,DstPort,UID,App,Proto,Status,Info,BytesSent,BytesRcvd,"
            b"PktsSent,PktsRcvd,FirstSeen,LastSeen\n6,10.0.0.1,40000,10.0.0.2,443,10123,Signal,"
            b"TLS,CLOSED,chat.signal.org,100,200,3,4,1700000000,1700000001\n")


def _load_pcapdroid(p: Path) -> None:
    from analysis.traces import collect_observations

    collect_observations(pcapdroid=[p])


def _seed_uidmap(tmp: Path) -> bytes:
    f = SHARED / "pm_list_U_oneplus.txt"
    if f.is_file():
        return f.read_bytes()[:4000]
    return b"package:org.thoughtcrime.securesms uid:10123\npackage:com.whatsapp uid:10124\n"


def _load_uidmap(p: Path) -> None:
    from analysis.traces.uidmap import load_uid_map

    load_uid_map(p)


def _seed_manifest(tmp: Path) -> bytes:
    return json.dumps(MANIFEST).encode()


def _load_manifest(p: Path) -> None:
    from analysis.runinfo import load_manifest

    load_manifest(p)


def _seed_mirage(tmp: Path) -> bytes:
    return (REPO / "tests/golden/mirage2019.json").read_bytes()


def _seed_mirage22(tmp: Path) -> bytes:
    return (REPO / "tests/golden/mirage2022.json").read_bytes()


def _load_dataset(p: Path) -> None:
    from analysis.ml.datasets import DatasetFilter, load_dataset

    load_dataset([p], DatasetFilter(drop_background=False, drop_dns=False)).card()


def _seed_parquet(tmp: Path) -> bytes:
    from analysis.assemble import read_flows
    from analysis.parquet_io import write_parquet

    t = read_flows(write_pcap(tmp / "pq.pcap", _pkts()))
    return write_parquet(t, tmp / "seed.parquet").read_bytes()


_MODEL_DIRS: dict[str, Path] = {}


def _model_dir(tmp: Path) -> Path:
    """A saved majority model (trained once per test session)."""
    if "m" not in _MODEL_DIRS:
        import numpy as np

        from analysis.ml.features import FeatureSpec
        from analysis.ml.models import fit_model, save_model

        spec = FeatureSpec(("counters",))
        X = np.ones((4, 9))
        m = fit_model(X, np.array(["a", "b", "a", "b"]), kind="majority", features=spec)
        _MODEL_DIRS["m"] = save_model(m, tmp / "model_seed")
    return _MODEL_DIRS["m"]


def _seed_model(tmp: Path) -> bytes:
    return (_model_dir(tmp) / "model.json").read_bytes()


def _load_model_json(p: Path) -> None:
    import shutil

    from analysis.ml.models import load_model

    d = p.parent / "model"
    d.mkdir(exist_ok=True)
    shutil.copy(_MODEL_DIRS["m"] / "model.skops", d / "model.skops")
    os.replace(p, d / "model.json")
    load_model(d)


def _seed_plan(tmp: Path) -> bytes:
    return yaml.safe_dump({"name": "t", "devices": ["A1", "A2"],
                           "apps": ["signal", "telegram", "whatsapp"],
                           "activities": ["chat", "idle"], "repetitions": 2,
                           "params": {"contact": "Bob"}}).encode()


def _load_plan(p: Path) -> None:
    from controller.plan import load_plan

    load_plan(p).session_specs()


def _seed_scenario(tmp: Path) -> bytes:
    return (REPO / "controller/scenarios/signal.yaml").read_bytes()


def _load_scenario(p: Path) -> None:
    from controller.scenario import load_scenario

    load_scenario(p)


KINDS = [
    Kind("pcap", "fuzz.pcap", _seed_pcap, _load_capture),
    Kind("pcapng", "fuzz.pcapng", _seed_pcapng, _load_capture),
    Kind("strace", "strace.4242.org.thoughtcrime.securesms.log", _seed_strace, _load_strace),
    Kind("netstat", "netstat.log", _seed_netstat, _load_netstat),
    Kind("frida", "frida.jsonl", _seed_frida, _load_frida, json_seed="lines"),
    Kind("csv", "labels.csv", _seed_csv, _load_csv),
    Kind("pcapdroid", "pcapdroid.csv", _seed_pcapdroid, _load_pcapdroid),
    Kind("uidmap", "packages.txt", _seed_uidmap, _load_uidmap),
    Kind("manifest", "manifest.json", _seed_manifest, _load_manifest, json_seed=True),
    Kind("mirage2019", "1539866692_com.x_MIRAGE-2019_traffic_dataset_labeled_biflows.json",
         _seed_mirage, _load_dataset, json_seed=True),
    Kind("mirage2022", "1539866692_com.x_mirage2020dataset_labeled_biflows_all_packets_"
         "encryption_metadata.json", _seed_mirage22, _load_dataset, json_seed=True),
    Kind("parquet", "fuzz.parquet", _seed_parquet, _load_dataset),
    Kind("model", "model.json", _seed_model, _load_model_json, json_seed=True),
    Kind("plan", "plan.yaml", _seed_plan, _load_plan),
    Kind("scenario", "signal.yaml", _seed_scenario, _load_scenario),
]


# ------------------------------------------------------------------------------ mutations

def _json_paths(obj: object, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in list(obj.items())[:40]:
            out += _json_paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:6]):
            out += _json_paths(v, (*prefix, i))
    return out


def _plant_json(seed: bytes, data: st.DataObject) -> bytes:
    """The seed JSON with one value (or one key) replaced by a hostile JSON text."""
    obj = json.loads(seed)
    paths = [p for p in _json_paths(obj) if p]
    path = data.draw(st.sampled_from(paths))
    hostile = data.draw(st.sampled_from(HOSTILE_JSON))
    parent = obj
    for k in path[:-1]:
        parent = parent[k]
    parent[path[-1]] = "@@FUZZ@@"
    return json.dumps(obj).replace(PLACEHOLDER, hostile, 1).encode()


def _plant_json_lines(seed: bytes, data: st.DataObject) -> bytes:
    lines = seed.decode().splitlines()
    i = data.draw(st.integers(0, len(lines) - 1))
    lines[i] = _plant_json(lines[i].encode(), data).decode()
    return ("\n".join(lines) + "\n").encode()


def _plant_text(seed: bytes, data: st.DataObject) -> bytes:
    """The seed text with one token (between separators) replaced by a hostile one."""
    import re

    text = seed.decode("utf-8", "replace")
    tokens = list(re.finditer(r"[^\s,:=(){}\[\]\"']+", text))
    if not tokens:
        return seed
    m = data.draw(st.sampled_from(tokens[:400]))
    hostile = data.draw(st.sampled_from(HOSTILE_TEXT))
    return (text[:m.start()] + hostile + text[m.end():]).encode("utf-8", "surrogateescape")


def _mutate_bytes(seed: bytes, data: st.DataObject) -> bytes:
    base = bytearray(seed)
    for _ in range(data.draw(st.integers(1, 6))):
        kind = data.draw(st.integers(0, 3))
        pos = data.draw(st.integers(0, max(len(base) - 1, 0)))
        if kind == 0 and base:
            base[pos] = data.draw(st.integers(0, 255))
        elif kind == 1:
            del base[pos:pos + data.draw(st.integers(1, 64))]
        elif kind == 2:
            base[pos:pos] = data.draw(st.binary(max_size=32))
        else:
            base[pos:pos] = data.draw(st.sampled_from(
                [b"\n", b"\x00", b"\xff\xff\xff\xff", b"-", b"99999999999999999999", b"{", b"["]))
    return bytes(base)


def _mutation(kind: Kind, seed: bytes, data: st.DataObject) -> bytes:
    how = data.draw(st.sampled_from(["bytes", "plant", "plant"]))
    if how == "bytes":
        return _mutate_bytes(seed, data)
    if kind.json_seed == "lines":
        return _plant_json_lines(seed, data)
    if kind.json_seed:
        return _plant_json(seed, data)
    if kind.name in ("pcap", "pcapng", "parquet"):
        return _mutate_bytes(seed, data)
    return _plant_text(seed, data)


# ---------------------------------------------------------------------------------- checks

class Hang(Exception):
    pass


def _alarm(signum, frame):  # noqa: ANN001
    raise Hang


def _address_space() -> int:
    """This process's current virtual size (bytes)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def check_input(kind: Kind, tmp: Path, content: bytes) -> None:
    """Load ``content`` as ``kind``: success or one FlowtruthError line, in bounded time."""
    case = tmp / f"case{os.getpid()}"
    import shutil

    shutil.rmtree(case, ignore_errors=True)
    case.mkdir()
    path = case / kind.filename
    path.write_bytes(content)
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(HANG_SECONDS)
    # a blow-up fails this example with MemoryError instead of taking the machine
    limits = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (_address_space() + RSS_LIMIT, limits[1]))
    try:
        kind.load(path)
    except MemoryError:
        raise AssertionError(f"{kind.name}: needs more than {RSS_LIMIT >> 20} MB more memory "
                             f"for input {content[:200]!r}") from None
    except FlowtruthError as err:
        line = err.one_line()
        assert "\n" not in line and len(line) <= LINE_LIMIT, (kind.name, line[:300])
    except Hang:
        pytest.fail(f"{kind.name}: no result within {HANG_SECONDS} s for {content[:200]!r}")
    except Exception as err:  # noqa: BLE001 - anything else is the bug this test looks for
        raise AssertionError(f"{kind.name}: {type(err).__name__}: {str(err)[:300]} "
                             f"for input {content[:200]!r}") from err
    finally:
        resource.setrlimit(resource.RLIMIT_AS, limits)
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert rss < RSS_LIMIT, f"{kind.name}: peak RSS {rss >> 20} MB"


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> dict[str, bytes]:
    tmp = tmp_path_factory.mktemp("seeds")
    return {k.name: k.seed(tmp) for k in KINDS}


@pytest.mark.parametrize("kind", KINDS, ids=[k.name for k in KINDS])
def test_seed_loads(kind, seeds, tmp_path):
    """The unmutated seed is a valid input of its kind."""
    check_input(kind, tmp_path, seeds[kind.name])


@pytest.mark.parametrize("kind", KINDS, ids=[k.name for k in KINDS])
def test_mutated_inputs_never_crash(kind, seeds, tmp_path):
    @FUZZ
    @given(data=st.data())
    def run(data):
        check_input(kind, tmp_path, _mutation(kind, seeds[kind.name], data))

    run()


@pytest.mark.parametrize("kind", [k for k in KINDS if k.json_seed],
                         ids=[k.name for k in KINDS if k.json_seed])
@pytest.mark.parametrize("hostile", range(len(HOSTILE_JSON)))
def test_every_hostile_json_value_at_the_top(kind, hostile, seeds, tmp_path):
    """Each hostile value as the whole document and as every top-level field's value."""
    if kind.json_seed == "lines":
        check_input(kind, tmp_path, HOSTILE_JSON[hostile].encode() + b"\n")
        return
    check_input(kind, tmp_path, HOSTILE_JSON[hostile].encode())
    obj = json.loads(seeds[kind.name])
    for key in list(obj)[:8]:
        doc = dict(obj)
        doc[key] = "@@FUZZ@@"
        check_input(kind, tmp_path, json.dumps(doc).replace(PLACEHOLDER, HOSTILE_JSON[hostile])
                    .encode())


def test_model_file_outside_the_model_dir_is_refused(seeds, tmp_path):
    """model.json naming /etc/shadow (or ../x, or a symlink) is refused before it is read."""
    from analysis.errors import SchemaError
    from analysis.ml.models import load_model

    secret = tmp_path / "secret"
    secret.write_bytes(b"root:$6$secret")
    meta = json.loads(seeds["model"])
    for name in (str(secret), "../secret", "/etc/shadow", "sub/../../secret"):
        d = tmp_path / f"m{abs(hash(name))}"
        d.mkdir()
        (d / "model.json").write_text(json.dumps({**meta, "file": name}))
        with pytest.raises(SchemaError, match="inside the model directory"):
            load_model(d)
    d = tmp_path / "mlink"
    d.mkdir()
    (d / "model.skops").symlink_to(secret)
    (d / "model.json").write_text(json.dumps(meta))
    with pytest.raises(SchemaError, match="not a link"):
        load_model(d)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
