"""`flowtruth dataset|train|evaluate|predict|report` end to end on the nDPI captures."""

from __future__ import annotations

import csv
import json
import zlib
from pathlib import Path

import pytest

from controller.cli import main

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
PCAPS = DATA / "ndpi_pcaps"
pytestmark = pytest.mark.skipif(
    not (PCAPS / "flow_labels.csv").exists(), reason="shared data not found"
)
KEYS = ("accuracy", "macro_f1", "weighted_f1", "per_class", "confusion_matrix", "labels")


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as ei:
        main([str(a) for a in args])
    out = capsys.readouterr()
    return ei.value.code, out.out, out.err


def run_ok(capsys, *args) -> tuple[str, str]:
    """``flowtruth ARGS`` that must succeed: (stdout, stderr)."""
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    return out, err


def metrics_in(folder: Path) -> dict:
    return json.loads((folder / "metrics.json").read_text())


@pytest.fixture(scope="module")
def ndpi_mirage(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "ds"
    with pytest.raises(SystemExit) as ei:
        main(["dataset", "ndpi", str(out), "--pcaps", str(PCAPS)])
    assert ei.value.code == 0
    return out


@pytest.fixture(scope="module")
def genre_model(ndpi_mirage, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("model") / "m"
    with pytest.raises(SystemExit) as ei:
        main(
            [
                "train",
                str(ndpi_mirage),
                "--task",
                "genre",
                "--features",
                "stats,series",
                "--trees",
                "15",
                "--cv",
                "3",
                "-o",
                str(out),
            ]
        )
    assert ei.value.code == 0
    return out


def test_dataset_ndpi_writes_labelled_mirage_files(ndpi_mirage, capsys, tmp_path):
    files = list(ndpi_mirage.rglob("*.json"))
    assert len(files) >= 38
    rec = next(iter(json.loads(files[0].read_text()).values()))
    assert rec["flow_metadata"]["BF_label_source"] in ("csv", None)
    code, out, err = run_cli(["dataset", "card", ndpi_mirage, "-o", tmp_path / "card"], capsys)
    assert code == 0, err
    assert "766 flows in 38 sessions" in out and "WhatsApp 130" in out
    assert json.loads((tmp_path / "card" / "dataset_card.json").read_text())["flows"] == 766


def test_option_groups_reach_the_filter_and_the_config(ndpi_mirage, genre_model, capsys, tmp_path):
    """The filter and model options each command shares arrive at their builders, and a
    builder runs only where the command needs it."""
    out, _ = run_ok(capsys, "dataset", "card", ndpi_mirage, "--min-packets", "10", "--keep-dns")
    assert "403 flows in 36 sessions" in out and "min_packets 472" in out
    code, _, err = run_cli(["train", ndpi_mirage, "--trees", "0", "-o", tmp_path / "m"], capsys)
    assert code == 2 and "--trees and --packets must be positive" in err
    # testing a model builds no training configuration: --trees is not looked at
    run_ok(capsys, "evaluate", genre_model, ndpi_mirage, "--trees", "0", "-o", tmp_path / "ev")


def test_train_writes_model_metrics_and_report(genre_model):
    names = {p.name for p in genre_model.iterdir()}
    assert {
        "model.json",
        "model.skops",
        "metrics.json",
        "report.html",
        "dataset_card.json",
        "confusion_matrix.png",
        "roc_pr.png",
    } <= names
    assert "nDPI's opinion" in (genre_model / "report.html").read_text()
    m = json.loads((genre_model / "metrics.json").read_text())
    assert all(k in m for k in KEYS)
    assert m["labels"] == ["messaging", "other"] and m["protocol"] == "kfold"
    meta = json.loads((genre_model / "model.json").read_text())
    assert meta["task"] == "genre" and meta["features"]["sets"] == ["stats", "series"]
    assert meta["training_data"]["flows"] == 766


def test_evaluate_a_model_on_data(genre_model, ndpi_mirage, capsys, tmp_path):
    code, out, err = run_cli(["evaluate", genre_model, ndpi_mirage, "-o", tmp_path / "ev"], capsys)
    assert code == 0, err
    assert "optimistic" in err  # its own training data
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert all(k in m for k in KEYS) and m["protocol"] == "holdout"
    assert (tmp_path / "ev" / "report.html").is_file()


def test_evaluate_cross_device_on_two_device_folders(capsys, tmp_path):
    from analysis.ml.ndpi import build_ndpi_dataset

    build_ndpi_dataset(
        PCAPS,
        tmp_path / "two",
        "mirage2022",
        devices=lambda c: "PhoneA" if zlib.crc32(c.encode()) % 2 else "PhoneB",
    )
    folders = sorted(p.name for p in (tmp_path / "two").iterdir())
    assert len(folders) == 2 and folders[0].startswith("PhoneA_")
    cross_device = ("evaluate", "--protocol", "cross-device", tmp_path / "two")
    run_ok(capsys, *cross_device, "--task", "genre", "--trees", "10", "-o", tmp_path / "cd")
    m = metrics_in(tmp_path / "cd")
    assert m["protocol"] == "cross-device" and len(m["cross_matrix"]["names"]) == 2
    assert (tmp_path / "cd" / "cross_matrix.png").is_file()
    one_way = ("--train-on", folders[0], "--test-on", folders[1])
    run_ok(capsys, *cross_device, *one_way, "--trees", "5", "-o", tmp_path / "cd1")
    assert metrics_in(tmp_path / "cd1")["folds"][0]["test"] == [folders[1]]
    run_ok(capsys, *cross_device, "--train-on", "PhoneB", "--trees", "5", "-o", tmp_path / "cd2")
    fold = metrics_in(tmp_path / "cd2")["folds"][0]
    assert fold["train"] == [folders[1]] and fold["test"] == [folders[0]]


def test_evaluate_kfold_protocol(ndpi_mirage, capsys, tmp_path):
    kfold = ("evaluate", "--protocol", "kfold", ndpi_mirage, "--folds", "3", "--trees", "10")
    out, _ = run_ok(capsys, *kfold, "--model", "extratrees", "-o", tmp_path / "kf")
    m = metrics_in(tmp_path / "kf")
    assert m["model"] == "extratrees" and len(m["folds"]) == 3 and m["split_by"] == "session"
    assert "accuracy" in out and "top feature group" in out
    run_ok(capsys, *kfold, "--split-by", "flow", "--permutations", "0", "-o", tmp_path / "leaky")
    leaky = metrics_in(tmp_path / "leaky")
    assert leaky["split_by"] == "flow" and leaky["macro_f1"] > m["macro_f1"]
    assert "optimistic" in (tmp_path / "leaky" / "report.html").read_text()


@pytest.mark.parametrize("kind", ["pcap", "mirage", "parquet"])
def test_predict_on_a_pcap_a_mirage_file_and_a_flow_store(
    kind, genre_model, ndpi_mirage, capsys, tmp_path
):
    if kind == "pcap":
        src = PCAPS / "signal.pcap"
        n = 18
    elif kind == "mirage":
        src = next(ndpi_mirage.rglob("*_signal_*.json"))
        n = 18
    else:
        from analysis.ml.ndpi import build_ndpi_dataset

        src = tmp_path / "store"
        build_ndpi_dataset(PCAPS, src, "parquet", captures=["signal.pcap", "telegram.pcap"])
        n = None
    out = tmp_path / "pred.csv"
    code, so, err = run_cli(["predict", genre_model, src, "-o", out], capsys)
    assert code == 0, err
    rows = list(csv.DictReader(open(out)))
    if n is not None:
        assert len(rows) == n
    assert {"src_ip", "dst_port", "predicted", "confidence", "p_messaging", "p_other"} <= set(
        rows[0]
    )
    for r in rows:
        assert abs(float(r["p_messaging"]) + float(r["p_other"]) - 1) < 1e-6
    assert "flows predicted" in so


def test_report_rerenders_from_metrics(genre_model, capsys, tmp_path):
    code, out, err = run_cli(["report", genre_model / "metrics.json", "-o", tmp_path / "r"], capsys)
    assert code == 0, err
    assert (tmp_path / "r" / "report.html").read_text().count("data:image/png") >= 4


@pytest.mark.parametrize(
    "args, needle",
    [
        (["train", "/nonexistent/x.json", "-o", "{tmp}/m"], "no such file"),
        (["train", str(DATA / "mirage2019"), "-o", "{tmp}/m"], "only one class"),
        (["train", str(PCAPS / "signal.pcap"), "-o", "{tmp}/m"], "no labels"),
        (
            ["train", str(DATA / "mirage2019"), "--features", "sni", "-o", "{tmp}/m"],
            "unknown feature set",
        ),
        (
            ["evaluate", str(DATA / "mirage2019"), str(DATA / "mirage2019"), "-o", "{tmp}/e"],
            "not a model directory",
        ),
        (
            ["evaluate", "--protocol", "cross-device", str(DATA / "mirage2019"), "-o", "{tmp}/e"],
            "only one class",
        ),
        (["predict", "{tmp}", str(PCAPS / "signal.pcap"), "-o", "{tmp}/p.csv"], "no model.json"),
        (["report", "{tmp}", "-o", "{tmp}/r"], "no metrics.json"),
    ],
)
def test_known_failures_are_one_line_exit_2(args, needle, capsys, tmp_path):
    code, out, err = run_cli([a.replace("{tmp}", str(tmp_path)) for a in args], capsys)
    assert code == 2, err
    assert needle in err and "Traceback" not in err
    assert err.count("\n") == 1 and err.startswith("flowtruth: error:")


def test_predict_refuses_a_tampered_model(genre_model, capsys, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(genre_model, bad)
    blob = bad / "model.skops"
    blob.write_bytes(blob.read_bytes()[:-10] + b"0123456789")
    code, out, err = run_cli(
        ["predict", bad, PCAPS / "signal.pcap", "-o", tmp_path / "p.csv"], capsys
    )
    assert code == 2 and "sha256" in err and "Traceback" not in err
