"""Two phones as a pair: the plan syntax (``pairs:``, ``peer:``, ``contact_name:``) and its
one-line errors, the sessions each side gets (role, peer, ``{contact}``), the barriers
that keep the two sides in lockstep (a failing or missing peer fails the other side with
the reason, never hangs it), and the role in MIRAGE 2022's ``BF_sublabel``."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import yaml

from controller.errors import ConfigError
from controller.pairing import PairSync, PeerFailed
from controller.plan import load_plan
from controller.scenario import ScenarioCancelled

LAB2 = ["lab:phone1", "lab:phone2"]


def write_plan(tmp: Path, **kw: object) -> Path:
    data = {"name": "t", "devices": LAB2, "apps": ["signal"],
            "activities": ["chat", "audio_call"], **kw}
    p = tmp / "plan.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_pairs_give_each_side_its_role_peer_and_the_peers_contact(tmp_path: Path) -> None:
    plan = load_plan(write_plan(tmp_path, pairs=[["phone1", "phone2"]],
                                params={"contact": "Nobody"}))
    specs = plan.session_specs(contact_names={"lab:phone1": "Alice", "lab:phone2": "Bob"})
    by = {s.key: s for s in specs}
    one, two = by["phone1_signal_audio_call_r1"], by["phone2_signal_audio_call_r1"]
    assert (one.role, one.peer, one.params["contact"]) == ("caller", "phone2", "Bob")
    assert (two.role, two.peer, two.params["contact"]) == ("callee", "phone1", "Alice")
    assert one.peer_key == two.key and two.peer_key == one.key
    assert one.pair_key == two.pair_key == "signal_audio_call_r1"
    # without the lab's owners, the plan's contact stays (a lab phone's default)
    assert plan.session_specs()[0].params["contact"] == "Nobody"
    # asking for one side of a pair runs both
    assert sorted(s.key for s in plan.only(["phone2_signal_chat_r1"]).session_specs()) == [
        "phone1_signal_chat_r1", "phone2_signal_chat_r1"]
    # unpaired: solo, as before
    solo = load_plan(write_plan(tmp_path)).session_specs()[0]
    assert (solo.role, solo.peer, solo.peer_key) == ("solo", None, None)


def test_peer_on_a_device_entry_is_symmetric_and_contact_name_wins(tmp_path: Path) -> None:
    devices = [{"serial": "R5CR10ABCDE", "name": "alice", "contact_name": "Alice Rossi"},
               {"serial": "192.168.77.12:5555", "name": "bob", "contact_name": "Bob",
                "peer": "alice"}]
    plan = load_plan(write_plan(tmp_path, devices=devices))
    by = {s.key: s for s in plan.session_specs()}
    assert (by["alice_signal_chat_r1"].role, by["alice_signal_chat_r1"].params["contact"]) == (
        "caller", "Bob")  # the one listed first calls
    assert (by["bob_signal_chat_r1"].role, by["bob_signal_chat_r1"].params["contact"]) == (
        "callee", "Alice Rossi")
    # the same pair said twice (pairs and peer) is one pair
    both = load_plan(write_plan(tmp_path, devices=devices, pairs=[["bob", "alice"]]))
    assert both.pair_roles() == {1: (0, "caller"), 0: (1, "callee")}
    # a lab phone's contact_name overrides its owner's name
    lab = load_plan(write_plan(tmp_path, devices=[{"serial": "lab:phone1"},
                                                  {"serial": "lab:phone2", "contact_name": "B."}],
                               pairs=[["lab:phone1", "lab:phone2"]]))
    s = lab.session_specs(contact_names={"lab:phone2": "Bob"})[0]
    assert s.params["contact"] == "B."


@pytest.mark.parametrize(("kw", "match"), [
    ({"pairs": [["phone1", "phone3"]]},
     r"plan\.yaml: field pairs\[0\]: 'phone3' is not a device of the plan "
     r"\(devices: phone1, phone2\)$"),
    ({"pairs": [["phone1", "lab:phone1"]]},
     r"field pairs\[0\]: \[phone1, lab:phone1\] pairs phone1 with itself$"),
    ({"devices": ["lab:phone1", "lab:phone2", "lab:phone3"],
      "pairs": [["phone1", "phone2"], ["phone3", "phone1"]]},
     r"field pairs\[1\]: phone1 is in two pairs \(pairs\[0\] and pairs\[1\]\); "
     r"a phone has one peer$"),
    ({"pairs": [["phone1"]]}, r"field pairs: pairs\[0\] names 1 device\(s\); a pair is two: "
                              r"\[caller, callee\]$"),
    ({"pairs": [["phone1", "phone2", "phone1"]]}, r"field pairs: pairs\[0\] names 3 device"),
    ({"pairs": "phone1"}, r"field pairs: "),
    ({"devices": [{"serial": "lab:phone1", "peer": "phone7"}, "lab:phone2"]},
     r"field devices\[0\]\.peer: 'phone7' is not a device of the plan"),
    ({"devices": [{"serial": "lab:phone1", "peer": "phone1"}, "lab:phone2"]},
     r"field devices\[0\]\.peer: phone1's peer is phone1 itself$"),
    ({"devices": ["lab:phone1", {"serial": "lab:phone2", "peer": "phone1"}, "lab:phone3"],
      "pairs": [["phone3", "phone2"]]},
     r"field devices\[1\]\.peer: phone2 is in two pairs \(pairs\[0\] and "
     r"devices\[1\]\.peer\); a phone has one peer$"),
    ({"devices": ["A1", "A2"], "pairs": [["A1", "A2"]]},
     r"field devices\[1\]\.contact_name: A2 is paired with A1 but has no contact_name: set "
     r"how A2 appears in A1's contacts$"),
    ({"devices": [{"serial": "A1", "contact_name": ""}, "A2"]},
     r"field devices\[0\]\..*contact_name: String should have at least 1 character"),
    ({"pair_timeout": 0}, r"field pair_timeout: "),
])
def test_pairing_errors_are_one_line_naming_the_file_and_field(tmp_path: Path, kw: dict,
                                                               match: str) -> None:
    p = write_plan(tmp_path, **kw)
    with pytest.raises(ConfigError, match=match) as ei:
        load_plan(p)
    assert str(p) in ei.value.message and "\n" not in ei.value.one_line()


def test_cli_run_exits_2_on_a_bad_pair(tmp_path: Path) -> None:
    import subprocess
    import sys

    p = write_plan(tmp_path, pairs=[["phone1", "phone9"]])
    r = subprocess.run([sys.executable, "-m", "controller.cli", "run", str(p)],
                       cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2, r.stdout + r.stderr
    out = (r.stdout + r.stderr).strip()
    assert "'phone9' is not a device of the plan" in out and "Traceback" not in out


# ------------------------------------------------------------------------------ barriers


def _side(sync: PairSync, side: str, key: str, stages: list[str], out: dict,
          delay: float = 0.0, cancel: threading.Event | None = None) -> threading.Thread:
    def run() -> None:
        link = sync.link(side, key)
        try:
            for st in stages:
                time.sleep(delay)
                link.meet(st, cancel)
                out.setdefault(side, []).append((st, time.monotonic()))
            link.leave("finished")
        except Exception as err:  # noqa: BLE001 - the test looks at it
            out[side + "_error"] = err
            link.leave(f"failed ({err})")

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_both_sides_pass_each_barrier_together() -> None:
    sync = PairSync(("phone1", "phone2"), timeout=10)
    out: dict = {}
    a = _side(sync, "phone1", "signal_chat_r1", ["start", "scenario", "done"], out)
    b = _side(sync, "phone2", "signal_chat_r1", ["start", "scenario", "done"], out, delay=0.3)
    a.join(10)
    b.join(10)
    assert [s for s, _t in out["phone1"]] == ["start", "scenario", "done"]
    for (s1, t1), (s2, t2) in zip(out["phone1"], out["phone2"], strict=True):
        assert s1 == s2 and abs(t1 - t2) < 0.25  # phone1 waited for the slower phone2


def test_a_failed_peer_fails_the_waiting_side_at_once_with_its_reason() -> None:
    sync = PairSync(("phone1", "phone2"), timeout=30)
    link2 = sync.link("phone2", "signal_audio_call_r1")  # fails in its preflight
    t0 = time.monotonic()
    threading.Timer(0.3, link2.leave, args=("failed (phone2: com.whatsapp is not "
                                            "installed)",)).start()
    with pytest.raises(PeerFailed, match=r"^peer phone2: its signal_audio_call_r1 session "
                       r"failed \(phone2: com\.whatsapp is not installed\) before the start "
                       r"barrier$"):
        sync.link("phone1", "signal_audio_call_r1").meet("start")
    assert time.monotonic() - t0 < 5


def test_a_peer_that_never_comes_times_out_and_cancel_ends_the_wait() -> None:
    sync = PairSync(("phone1", "phone2"), timeout=0.5)
    t0 = time.monotonic()
    with pytest.raises(PeerFailed, match=r"peer phone2 did not reach the scenario barrier of "
                       r"signal_chat_r1 within 0.5 s"):
        sync.link("phone1", "signal_chat_r1").meet("scenario")
    assert 0.4 < time.monotonic() - t0 < 3
    cancel = threading.Event()
    threading.Timer(0.2, cancel.set).start()
    with pytest.raises(ScenarioCancelled):
        PairSync(("a", "b"), timeout=60).link("a", "k").meet("start", cancel)
    # a peer that already passed the stage and left still counts as met
    sync = PairSync(("phone1", "phone2"), timeout=5)
    two = sync.link("phone2", "k")
    _side(sync, "phone2", "k", [], {})  # (a side with no stage just leaves)
    threading.Thread(target=two.meet, args=("done",), daemon=True).start()
    time.sleep(0.2)
    two.leave("finished")
    assert sync.link("phone1", "k").meet("done") < 1


# ------------------------------------------------------------------------- BF_sublabel


def test_role_goes_into_bf_sublabel_of_the_apps_flows_in_the_2022_layout(tmp_path: Path) -> None:
    import json

    import numpy as np

    from analysis.assemble import FlowOptions, read_flows
    from analysis.mirage import to_mirage_parts, write_mirage_dir
    from tests.pcapgen import Pkt, ether, make_tcp, write_pcap

    pcap = tmp_path / "c.pcap"
    pkts = []
    for i, sport in enumerate((40001, 40002, 40003)):
        pkts.append(Pkt(1.0 + i, ether(make_tcp("10.0.0.2", "1.2.3.4", sport, 443, 0x02))))
        pkts.append(Pkt(1.1 + i, ether(make_tcp("1.2.3.4", "10.0.0.2", 443, sport, 0x12))))
    write_pcap(pcap, pkts)
    table = read_flows([pcap], FlowOptions(device_nets=("10.0.0.2",)))
    pkg = "org.thoughtcrime.securesms"
    table.labels["BF_label"] = np.array([pkg, "com.google.android.gms", None], dtype=object)
    table.labels["BF_sublabel"] = np.array([f"{pkg}:remote", None, None], dtype=object)
    (part,) = to_mirage_parts(table, "mirage2022", role=(pkg, "callee"))
    meta = {k.split(",")[1]: v["flow_metadata"] for k, v in part.items()}
    assert meta["40001"]["BF_sublabel"] == f"{pkg}:remote:callee"
    assert meta["40002"]["BF_sublabel"] == "com.google.android.gms"  # another app: no role
    assert meta["40003"]["BF_sublabel"] == "unknown"
    # tcbench's package is still the part before the first ':'
    assert meta["40001"]["BF_sublabel"].lower().split(":")[0] == pkg

    def sublabels(role: str | None, layout: str = "mirage2022") -> dict[str, object]:
        out = tmp_path / f"out-{role}-{layout}"
        (f,) = write_mirage_dir(table, out, pkg, "SM-G991B", "02:00:00:00:00:01", 1, layout,
                                activity="audiocall", role=role)
        recs = json.loads(f.read_text())
        return {k.split(",")[1]: v["flow_metadata"] for k, v in recs.items()}

    caller = sublabels("caller")
    assert caller["40001"]["BF_sublabel"] == f"{pkg}:remote:caller"
    assert caller["40001"]["BF_activity"] == "audiocall"  # the activity stays where it was
    for role in ("solo", None):  # unpaired sessions: as before
        assert sublabels(role)["40001"]["BF_sublabel"] == f"{pkg}:remote"
    assert "BF_sublabel" not in sublabels("caller", "mirage2019")["40001"]


def test_resume_reruns_a_pair_unless_both_sides_completed(tmp_path: Path) -> None:
    import json

    from controller import events as ev
    from controller.errors import DeviceError
    from controller.plan import run_plan
    from controller.session import Environment

    plan = load_plan(write_plan(tmp_path, devices=[
        {"serial": "A1", "contact_name": "Alice"},
        {"serial": "A2", "peer": "A1", "contact_name": "Bob"}],
        apps=["signal"], activities=["chat"]))
    runs = tmp_path / "runs"

    def done(key: str) -> None:
        d = runs / f"20260101T000000Z_{key}"
        d.mkdir(parents=True)
        (d / "manifest.json").write_text(json.dumps({"session_id": key,
                                                     "outcome": "completed"}))

    def links(serial: str) -> object:
        raise DeviceError(f"{serial}: device offline")

    done("A1_signal_chat_r1")
    res = run_plan(plan, Environment(runs_root=runs), ev.null_sink, links=links, resume=True)
    assert res.skipped == []  # A2's session failed before: both run again, together
    assert sorted(r.session_id for r in res.results) == ["A1_signal_chat_r1",
                                                          "A2_signal_chat_r1"]
    done("A2_signal_chat_r1")
    res = run_plan(plan, Environment(runs_root=runs), ev.null_sink, links=links, resume=True)
    assert sorted(res.skipped) == ["A1_signal_chat_r1", "A2_signal_chat_r1"] and not res.results
