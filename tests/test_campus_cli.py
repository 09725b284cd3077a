"""``flowtruth campus`` end to end: keygen, ingest, query, summary, predict, MongoDB, capture."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ap_setup.campus_capture import capture_argv

REPO = Path(__file__).resolve().parents[1]
FLOWTRUTH = str(Path(sys.executable).with_name("flowtruth"))
CAPTURES = [
    "telegram.pcap",
    "whatsapp_login_call.pcap",
    "whatsapp_login_chat.pcap",
    "signal.pcap",
    "wechat.pcap",
    "dropbox.pcap",
    "zoom.pcap",
    "youtube_quic.pcap",
    "tls-appdata.pcap",
    "discord.pcap",
]
APPS = {"telegram": "Telegram", "whatsapp": "WhatsApp", "signal": "Signal"}


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run([FLOWTRUTH, *args], capture_output=True, text=True, cwd=REPO, timeout=120)
    if check and res.returncode != 0:
        raise AssertionError(f"flowtruth {' '.join(args)} -> {res.returncode}\n{res.stderr}")
    return res


@pytest.fixture(scope="module")
def campus(shared_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("campus")
    caps = root / "caps"
    caps.mkdir()
    for name in CAPTURES:
        os.symlink(shared_data / "ndpi_pcaps" / name, caps / name)
    key = root / "campus.key"
    res = run("campus", "keygen", str(key))
    assert key.read_text().strip() not in res.stdout + res.stderr
    store = root / "store"
    # a real Dask scheduler and two worker processes on loopback, reached by address
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as cluster:
        res = run("campus", "ingest", str(caps), "--store", str(store), "--key", str(key),
                  "--scheduler", cluster.scheduler_address)
    assert f"{len(CAPTURES)} file(s) ingested" in res.stdout
    return root, caps, key, store


def test_query_and_summary_over_the_store(campus):
    _root, _caps, _key, store = campus
    res = run(
        "campus",
        "query",
        "SELECT count(*) AS n, count(DISTINCT flow_id) AS ids FROM flows",
        "--store",
        str(store),
        "--format",
        "json",
    )
    row = json.loads(res.stdout)
    assert row["n"] == row["ids"] > 50
    res = run("campus", "summary", "--store", str(store), "--format", "csv")
    lines = res.stdout.strip().splitlines()
    assert lines[0] == "date,hour,flows,packets,bytes,hosts,peers"
    assert sum(int(line.split(",")[2]) for line in lines[1:]) == row["n"]
    bad = run("campus", "query", "SELECT nope FROM flows", "--store", str(store), check=False)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr
    missing = run("campus", "summary", "--store", str(store / "nothing"), check=False)
    assert missing.returncode == 2 and "not a campus store" in missing.stderr


def train_store_model(store: Path, out: Path) -> None:
    """A small random forest trained on a store's own flows, labelled by source capture."""
    import pyarrow.parquet as pq

    from analysis.campus.predict import store_frame
    from analysis.ml.features import FeatureSpec, build_features
    from analysis.ml.models import fit_model, save_model

    with sqlite3.connect(store / "manifest.sqlite") as con:
        names = dict(con.execute("SELECT sha256, path FROM files").fetchall())
    arrow = pq.read_table(sorted(store.glob("date=*/hour=*/*.parquet")))
    label = []
    for sha in arrow.column("source_sha256").to_pylist():
        base = Path(names[sha]).name
        label.append(next((app for k, app in APPS.items() if base.startswith(k)), "other"))
    spec = FeatureSpec(("stats", "counters"))
    X = build_features(store_frame(arrow), spec)
    import numpy as np

    model = fit_model(
        X, np.array(label), kind="rf", task="app", features=spec, n_estimators=15, n_jobs=1
    )
    save_model(model, out)


def test_predict_scores_every_flow_and_reports_the_hourly_share(campus):
    root, _caps, _key, store = campus
    model = root / "model"
    train_store_model(store, model)
    plot = root / "share.png"
    res = run(
        "campus",
        "predict",
        str(model),
        "--store",
        str(store),
        "--plot",
        str(plot),
        "--format",
        "json",
        "--local-dask",
        "-j",
        "2",
    )
    hours = [json.loads(line) for line in res.stdout.strip().splitlines()]
    assert hours and all(0.0 <= h["messaging_flow_share"] <= 1.0 for h in hours)
    assert any(h["messaging_flow_share"] > 0 for h in hours)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    total = json.loads(
        run(
            "campus",
            "query",
            "SELECT count(*) AS n FROM flows",
            "--store",
            str(store),
            "--format",
            "json",
        ).stdout
    )["n"]
    scored = json.loads(
        run(
            "campus",
            "query",
            "SELECT count(*) AS n, count(DISTINCT flow_id) AS ids, "
            "min(messaging_proba) AS lo, max(messaging_proba) AS hi FROM scored",
            "--store",
            str(store),
            "--format",
            "json",
        ).stdout
    )
    assert scored["n"] == scored["ids"] == total
    assert 0.0 <= scored["lo"] <= scored["hi"] <= 1.0


def test_top_level_predict_scores_a_store_with_worker_processes(campus):
    """``flowtruth predict MODEL --store DIR`` (the issue's spelling): every flow scored
    once, the per-hour share printed and plotted; a second run scores nothing again."""
    root, _caps, _key, store = campus
    model = root / "model-top"
    train_store_model(store, model)
    res = run("predict", str(model), "--store", str(store), "-j", "2")
    assert "flows scored in" in res.stderr and "(0 already scored)" in res.stderr
    assert "messaging" in res.stdout and "hour" in res.stdout  # the per-hour table
    assert (store / "messaging_share.png").read_bytes()[:4] == b"\x89PNG"
    from analysis.campus.predict import model_id_of

    mid = model_id_of(str(model))
    counts = json.loads(
        run(
            "campus",
            "query",
            f"SELECT count(*) AS n, count(DISTINCT flow_id) AS ids FROM scored "
            f"WHERE model = '{mid}'",
            "--store",
            str(store),
            "--format",
            "json",
        ).stdout
    )
    total = json.loads(
        run("campus", "query", "SELECT count(*) AS n FROM flows", "--store", str(store),
            "--format", "json").stdout
    )["n"]
    assert counts["n"] == counts["ids"] == total
    again = run("predict", str(model), "--store", str(store))
    assert "0 flows scored in 0 file(s)" in again.stderr
    both = run("predict", str(model), str(store), "--store", str(store), check=False)
    assert both.returncode == 2 and both.stderr.count("\n") == 1 and "not both" in both.stderr
    none = run("predict", str(model), check=False)
    assert none.returncode == 2 and "--store DIR" in none.stderr and "Traceback" not in none.stderr


def test_a_bad_sink_or_scheduler_is_one_line(campus):
    _root, caps, key, store = campus
    res = run(
        "campus",
        "ingest",
        str(caps),
        "--store",
        str(store),
        "--key",
        str(key),
        "--sink",
        "http://example.invalid/",
        check=False,
    )
    assert res.returncode == 2 and "not a MongoDB URL" in res.stderr
    assert res.stderr.count("\n") == 1
    res = run(
        "campus",
        "ingest",
        str(caps),
        "--store",
        str(store),
        "--key",
        str(key),
        "--scheduler",
        "nonsense",
        check=False,
    )
    assert res.returncode == 2 and "scheduler" in res.stderr
    res = (
        run(
            "campus",
            "ingest",
            str(caps),
            "--store",
            str(store),
            check=False,
        )
        if "FLOWTRUTH_CAMPUS_KEY" not in os.environ
        else None
    )
    if res is not None and not (Path.home() / ".config/flowtruth/campus.key").exists():
        assert res.returncode == 2 and "no anonymisation key" in res.stderr


@pytest.mark.skipif(
    not os.environ.get("FLOWTRUTH_MONGO_URL"),
    reason="FLOWTRUTH_MONGO_URL does not point at a MongoDB server",
)
def test_mongodb_sink_upserts_idempotently(campus, tmp_path):
    import pymongo

    _root, caps, key, _store = campus
    url = os.environ["FLOWTRUTH_MONGO_URL"].rstrip("/")
    db = f"flowtruth_test_{os.getpid()}"
    client = pymongo.MongoClient(url, serverSelectionTimeoutMS=5000)
    try:
        store = tmp_path / "store"
        run(
            "campus",
            "ingest",
            str(caps),
            "--store",
            str(store),
            "--key",
            str(key),
            "--sink",
            f"{url}/{db}",
        )
        coll = client[db]["flows"]
        n = coll.count_documents({})
        flows = json.loads(
            run(
                "campus",
                "query",
                "SELECT count(*) AS n FROM flows",
                "--store",
                str(store),
                "--format",
                "json",
            ).stdout
        )["n"]
        assert n == flows
        shutil.rmtree(store)  # re-ingesting everything re-sends every row
        run(
            "campus",
            "ingest",
            str(caps),
            "--store",
            str(store),
            "--key",
            str(key),
            "--sink",
            f"{url}/{db}",
        )
        assert coll.count_documents({}) == n
        doc = coll.find_one()
        assert doc["_id"] == doc["flow_id"] and "date" in doc and "hour" in doc
    finally:
        client.drop_database(db)
        client.close()


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("tcpdump") is None, reason="needs root and tcpdump"
)
def test_a_rotated_header_only_tcpdump_capture_on_loopback_is_ingested(tmp_path):
    caps = tmp_path / "caps"
    caps.mkdir()
    argv = capture_argv("tcpdump", "lo", caps, rotate_seconds=1, bpf="udp port 47999",
                        user="root")  # keep root: tcpdump opens every rotated file itself
    assert "-s" in argv and argv[argv.index("-s") + 1] == "128"
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        time.sleep(1.0)  # tcpdump is listening
        rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        rx.bind(("127.0.0.1", 47999))
        tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        tx.bind(("127.0.0.1", 0))
        end = time.monotonic() + 3.2
        sent = 0
        while time.monotonic() < end:
            tx.sendto(b"x" * 600, ("127.0.0.1", 47999))
            sent += 1
            time.sleep(0.02)
        tx.close()
        rx.close()
        time.sleep(0.3)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=10)
    files = sorted(caps.iterdir())
    assert len(files) >= 2, proc.stderr.read().decode() if proc.stderr else ""
    key = tmp_path / "k"
    run("campus", "keygen", str(key))
    store = tmp_path / "store"
    run("campus", "ingest", str(caps), "--store", str(store), "--key", str(key))
    row = json.loads(
        run(
            "campus",
            "query",
            "SELECT count(*) AS n, max(pieces) AS pieces, sum(bf_packets)::BIGINT AS pk, "
            "max(packet_length_biflow_max) AS maxlen, min(src_ip) AS src "
            "FROM flows WHERE dst_port = 47999",
            "--store",
            str(store),
            "--format",
            "json",
        ).stdout
    )
    assert row["n"] == 1  # one flow, joined across every rotated file
    from analysis.assemble import read_flows

    captured = 0
    for f in files:
        t = read_flows(f)
        captured += int(t.flows["bf_packets"][t.flows["dst_port"] == 47999].sum())
    assert 2 <= row["pieces"] <= len(files) and row["pk"] == captured > 0.8 * sent
    assert row["maxlen"] == 628  # IP length from the header, though only 128 bytes were kept
    assert row["src"] != "127.0.0.1"


def test_an_unreachable_mongodb_is_a_known_error():
    from analysis.campus.mongo import MongoSink
    from analysis.errors import OutputError

    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(OutputError, match="cannot reach MongoDB"):
        MongoSink(f"mongodb://127.0.0.1:{port}/flowtruth", timeout_ms=300)
