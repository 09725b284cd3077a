"""Campus ingest on real captures: rotation joins, anonymity, resumability, Dask workers."""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from analysis.assemble import read_flows
from analysis.campus.anonymise import generate_key
from analysis.campus.ingest import FileSkipped, IngestTask, ingest, run_task
from analysis.campus.pcaptools import split_pcap
from analysis.errors import BadInputError
from analysis.flowtable import EndReason

REPO = Path(__file__).resolve().parents[1]
MIXED = ["telegram.pcap", "whatsapp_login_call.pcap", "signal.pcap", "wechat.pcap",
         "dropbox.pcap", "zoom.pcap", "youtube_quic.pcap", "tls-appdata.pcap"]
IGNORE = ["source_sha256", "cut_at_start", "cut_at_end", "pieces", "date", "hour"]


def rows(store: Path):
    import duckdb

    return duckdb.sql(
        f"SELECT * FROM read_parquet('{store}/date=*/hour=*/*.parquet', hive_partitioning=true,"
        " union_by_name=true) ORDER BY flow_id").df()


@pytest.fixture(scope="module")
def key(tmp_path_factory) -> Path:
    # A fixed key: with a random one, anonymising address a can (rarely) give another
    # address b of the same capture, which the "no clear address survives" check would
    # mistake for a leak. generate_key itself is tested in test_campus_anonymise.py.
    path = tmp_path_factory.mktemp("key") / "campus.key"
    path.write_text(bytes(range(7, 39)).hex() + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def mixed_dir(shared_data, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("mixed")
    for name in MIXED:
        os.symlink(shared_data / "ndpi_pcaps" / name, d / name)
    return d


def assert_same_flows(whole, rotated) -> None:
    assert len(whole) == len(rotated)
    assert list(whole.flow_id) == list(rotated.flow_id)
    for col in whole.columns:
        if col in IGNORE or col == "end_reason":
            continue
        a, b = whole[col].to_numpy(), rotated[col].to_numpy()
        if a.dtype.kind in "fiu":
            assert np.allclose(a.astype(float), b.astype(float), equal_nan=True), col
        else:
            assert list(a) == list(b), col
    # one capture's core flushes only every few batches, so it may call an expired flow EOF
    diff = whole.end_reason.to_numpy() != rotated.end_reason.to_numpy()
    assert set(whole.end_reason[diff]) <= {EndReason.EOF}
    assert set(rotated.end_reason[diff]) <= {EndReason.IDLE}


@pytest.mark.parametrize("name, pieces", [("telegram.pcap", 4), ("whatsapp_login_call.pcap", 5),
                                          ("wechat.pcap", 3)])
def test_flows_cut_by_rotation_are_joined_exactly(shared_data, tmp_path, key, name, pieces):
    src = shared_data / "ndpi_pcaps" / name
    (tmp_path / "whole").mkdir()
    os.symlink(src, tmp_path / "whole" / name)
    split_pcap(src, tmp_path / "rot", pieces, snaplen=128)  # header-only, rotated
    ingest(tmp_path / "whole", tmp_path / "a", key)
    ingest(tmp_path / "rot", tmp_path / "b", key, workers=2)
    whole, rotated = rows(tmp_path / "a"), rows(tmp_path / "b")
    assert_same_flows(whole, rotated)
    assert rotated.pieces.max() > 1  # some flows really were cut and joined


def test_without_joining_cut_flows_are_marked(shared_data, tmp_path, key):
    src = shared_data / "ndpi_pcaps" / "telegram.pcap"
    split_pcap(src, tmp_path / "rot", 3)
    summary = ingest(tmp_path / "rot", tmp_path / "s", key, join=False)
    df = rows(tmp_path / "s")
    assert summary.flows == len(df) > len(read_flows(src))
    assert df.cut_at_start.any() and df.cut_at_end.any()
    assert (df.pieces == 1).all()
    assert not list((tmp_path / "s").glob("_pending/*"))


def _clear_addresses(paths) -> tuple[set[str], set[bytes]]:
    text, packed = set(), set()
    for p in paths:
        t = read_flows(p)
        s, d = t.ip_strings()
        text |= set(s) | set(d)
    for a in text:
        ip = ipaddress.ip_address(a)
        packed.add(ip.packed.ljust(16, b"\0"))
    return text, packed


def test_no_clear_address_survives_anywhere_in_the_store(mixed_dir, tmp_path, key):
    import pyarrow as pa
    import pyarrow.parquet as pq

    store = tmp_path / "store"
    summary = ingest(mixed_dir, store, key, workers=2)
    assert summary.ingested == len(MIXED) and not summary.failed
    text, packed = _clear_addresses(sorted(mixed_dir.iterdir()))
    assert any(":" in a for a in text)  # IPv6 is covered too
    seen_strings: set[str] = set()
    seen_binary: set[bytes] = set()
    files = list(store.rglob("*.parquet")) + list(store.rglob("*.arrow"))
    assert any("_pending" in str(f) for f in files) and any("/hour=" in str(f) for f in files)
    for f in files:
        if f.suffix == ".arrow":
            with pa.memory_map(str(f)) as src:
                tbl = pa.ipc.open_file(src).read_all()
        else:
            tbl = pq.read_table(f)
        for col in tbl.columns:
            if pa.types.is_string(col.type):
                seen_strings |= {v for v in col.to_pylist() if v is not None}
            elif pa.types.is_fixed_size_binary(col.type):
                seen_binary |= set(col.to_pylist())
    assert seen_strings and seen_binary
    assert not seen_strings & text
    assert not seen_binary & packed
    anon = {s for s in seen_strings if s.count(".") == 3 or ":" in s}
    assert len(anon) >= len(text) * 0.9  # addresses were replaced, not dropped
    with sqlite3.connect(store / "manifest.sqlite") as con:
        dump = "\n".join(con.iterdump())
    key_hex = key.read_text().strip()
    assert key_hex not in dump and not any(a in dump for a in text if len(a) > 7)


def test_rerun_skips_files_by_checksum_and_keys_must_match(mixed_dir, tmp_path, key):
    store = tmp_path / "store"
    first = ingest(mixed_dir, store, key)
    before = rows(store)
    again = ingest(mixed_dir, store, key)
    assert again.ingested == 0 and again.skipped == len(MIXED)
    # the same bytes under another name are recognised by checksum
    other = tmp_path / "more"
    other.mkdir()
    (other / "copy.pcap").write_bytes((mixed_dir / "signal.pcap").read_bytes())
    events = []
    third = ingest(other, store, key, events=events.append)
    assert third.ingested == 0 and any(isinstance(e, FileSkipped) for e in events)
    after = rows(store)
    assert list(after.flow_id) == list(before.flow_id) and first.flows > 0
    assert after.flow_id.is_unique
    other_key = tmp_path / "other.key"
    generate_key(other_key)
    with pytest.raises(BadInputError, match="another key"):
        ingest(mixed_dir, store, other_key)


def test_uncommitted_work_is_cleaned_and_redone(mixed_dir, tmp_path, key):
    from analysis.assemble import FlowOptions
    from analysis.campus.store import Store

    store = tmp_path / "store"
    Store(store, create=True)
    # a worker finished a file but the coordinator died before committing it
    res = run_task(IngestTask(str((mixed_dir / "zoom.pcap").resolve()), str(store), str(key),
                              str(mixed_dir), FlowOptions()))
    assert res.status == "ingested" and Path(res.staged).is_dir()
    assert not list(store.glob("date=*"))  # nothing visible before the commit
    summary = ingest(mixed_dir, store, key)
    assert summary.ingested == len(MIXED)
    assert not any((store / "_staging").iterdir())
    clean = tmp_path / "clean"
    ingest(mixed_dir, clean, key)
    assert list(rows(store).flow_id) == list(rows(clean).flow_id)


def test_a_killed_ingest_loses_nothing_committed_and_the_rerun_completes(shared_data, tmp_path,
                                                                           key):
    src = tmp_path / "caps"
    src.mkdir()
    for p in sorted((shared_data / "ndpi_pcaps").glob("*.pcap*")):
        if not p.name.endswith(".out"):
            os.symlink(p, src / p.name)
    store = tmp_path / "store"
    flowtruth = str(Path(sys.executable).with_name("flowtruth"))
    proc = subprocess.Popen([flowtruth, "campus", "ingest", str(src), "--store", str(store),
                             "--key", str(key)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, cwd=REPO)
    committed = 0
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if (store / "manifest.sqlite").exists():
                try:
                    with sqlite3.connect(store / "manifest.sqlite", timeout=1) as con:
                        committed = con.execute("SELECT count(*) FROM files").fetchone()[0]
                except sqlite3.OperationalError:
                    committed = 0
                if committed >= 3:
                    break
            time.sleep(0.005)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert committed >= 3
    with sqlite3.connect(store / "manifest.sqlite") as con:
        parts = [p for (row,) in con.execute("SELECT parts FROM files") for p in json.loads(row)]
    assert all((store / p).is_file() for p in parts)  # every committed part is in place
    summary = ingest(src, store, key)
    assert summary.skipped >= committed
    clean = tmp_path / "clean"
    ingest(src, clean, key)
    killed, fresh = rows(store), rows(clean)
    assert killed.flow_id.is_unique
    assert list(killed.flow_id) == list(fresh.flow_id)
    assert killed.bf_packets.sum() == fresh.bf_packets.sum()


def test_a_dask_cluster_of_worker_processes_ingests_and_scores_like_one_process(
        mixed_dir, tmp_path, key):
    import pyarrow.parquet as pq
    from distributed import Client, LocalCluster

    from analysis.campus.predict import predict_store
    from tests.test_campus_cli import train_store_model

    ingest(mixed_dir, tmp_path / "local", key, workers=1)
    model = tmp_path / "model"
    train_store_model(tmp_path / "local", model)
    local_scores = predict_store(tmp_path / "local", model)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        summary = ingest(mixed_dir, tmp_path / "dask", key, client=client)
        scores = predict_store(tmp_path / "dask", model, client=client)
        pids = set(client.run(os.getpid).values())
    assert summary.ingested == len(MIXED) and len(pids) == 2 and os.getpid() not in pids
    a, b = rows(tmp_path / "dask"), rows(tmp_path / "local")
    assert list(a.flow_id) == list(b.flow_id)
    assert np.array_equal(a.bf_ip_bytes.to_numpy(), b.bf_ip_bytes.to_numpy())
    assert scores.flows == local_scores.flows == len(a) and not scores.failed

    def predictions(store):
        t = pq.read_table(sorted(store.glob("_predictions/model=*/date=*/hour=*/*.parquet")))
        return dict(zip(t.column("flow_id").to_pylist(), t.column("messaging_proba").to_pylist(),
                        strict=True))

    assert predictions(tmp_path / "dask") == predictions(tmp_path / "local")
    again = predict_store(tmp_path / "local", model)
    assert again.flows == 0 and again.skipped == local_scores.parts


def test_a_coordinator_that_died_before_joining_is_finished_by_the_next_run(mixed_dir, tmp_path,
                                                                             key):
    from analysis.assemble import FlowOptions
    from analysis.campus.ingest import find_captures
    from analysis.campus.store import Store

    store = Store(tmp_path / "store", create=True)
    ingest(mixed_dir, tmp_path / "store", key, workers=1)  # records the key
    # commit every file of a second sequence, as a coordinator does, then "die"
    rot = tmp_path / "rot"
    split_pcap(mixed_dir / "telegram.pcap", rot, 3)
    for p in find_captures(rot):
        res = run_task(IngestTask(str(p.resolve()), str(store.root), str(key),
                                  str(rot.resolve()), FlowOptions()))
        store.commit(res.record, Path(res.staged))
    assert store.unjoined() == {str(rot.resolve())}
    summary = ingest(rot, tmp_path / "store", key)
    assert summary.ingested == 0 and summary.joined_flows > 0 and not store.unjoined()
    clean = tmp_path / "clean"
    ingest(mixed_dir, clean, key)
    ingest(rot, clean, key)
    assert list(rows(tmp_path / "store").flow_id) == list(rows(clean).flow_id)


def test_each_first_level_directory_is_one_rotation_sequence(tmp_path):
    from analysis.campus.ingest import sequence_of

    root = tmp_path / "caps"
    for rel in ("ap1/2026/11/28/22/a.pcap", "ap1/2026/11/28/23/b.pcap", "ap2/c.pcap", "d.pcap"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"")
    r = root.resolve()
    assert sequence_of(root, root / "ap1/2026/11/28/22/a.pcap") == str(r / "ap1")
    assert sequence_of(root, root / "ap1/2026/11/28/23/b.pcap") == str(r / "ap1")
    assert sequence_of(root, root / "ap2/c.pcap") == str(r / "ap2")
    assert sequence_of(root, root / "d.pcap") == str(r)
    assert sequence_of(root / "d.pcap", root / "d.pcap") == str(r)
