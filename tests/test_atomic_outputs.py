"""Output sets and temp files survive kill -9: ``flowtruth label`` leaves the complete old or
the complete new set, ``flowtruth flows`` leaves a temp file that the next run removes."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from analysis.atomic import SET_MANIFEST, atomic_dir, atomic_output, clean_stale
from analysis.errors import OutputError
from tests.pcapgen import Conv, write_pcap
from tests.test_label_cli import ALPHA, PHONE, T0, make_capture, strace_alpha

REPO = Path(__file__).resolve().parents[1]


def snapshot(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------- the library


def test_atomic_dir_swaps_a_whole_set(tmp_path):
    out = tmp_path / "labels"
    with atomic_dir(out) as d:
        (d / "a.txt").write_text("1")
        (d / "sub").mkdir()
        (d / "sub" / "b.txt").write_text("1")
    assert snapshot(out).keys() == {"a.txt", "sub/b.txt", SET_MANIFEST}
    with atomic_dir(out) as d:
        (d / "c.txt").write_text("2")
    # the old set's files are gone, the new set is there, no temp directory is left
    assert snapshot(out).keys() == {"c.txt", SET_MANIFEST}
    assert json.loads((out / SET_MANIFEST).read_text())["files"] == ["c.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels"]


def test_a_failed_set_leaves_the_old_one(tmp_path):
    out = tmp_path / "labels"
    with atomic_dir(out) as d:
        (d / "a.txt").write_text("old")
    before = snapshot(out)
    with pytest.raises(RuntimeError), atomic_dir(out) as d:
        (d / "a.txt").write_text("new, half written")
        raise RuntimeError("writer died")
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError), atomic_dir(tmp_path / "file"):
        pass


def test_files_others_put_in_the_directory_stay(tmp_path):
    out = tmp_path / "work"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with atomic_dir(out) as d:
        (d / "a.txt").write_text("1")
    with atomic_dir(out) as d:
        (d / "b.txt").write_text("2")
    assert snapshot(out).keys() == {"notes.txt", "b.txt", SET_MANIFEST}
    assert (out / "notes.txt").read_text() == "mine"


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_temps_of_dead_writers_are_removed(tmp_path):
    from analysis.atomic import _HOST

    dead = _dead_pid()
    stale = tmp_path / f".out.parquet.{dead}.{_HOST}abcd.tmp"
    stale.write_bytes(b"x" * 1000)
    live = tmp_path / f".out.parquet.{os.getppid()}.{_HOST}abcd.tmp"  # pytest's parent: alive
    live.write_bytes(b"y")
    other_host = tmp_path / f".out.parquet.{dead}.{'0000' if _HOST != '0000' else '1111'}abcd.tmp"
    other_host.write_bytes(b"z")
    with atomic_output(tmp_path / "out.parquet") as tmp:
        Path(tmp).write_bytes(b"data")
    assert not stale.exists() and live.exists() and other_host.exists()
    assert (tmp_path / "out.parquet").read_bytes() == b"data"


def test_a_swap_cut_between_its_renames_is_finished(tmp_path):
    """Without an atomic exchange a crash between the two renames leaves no target:
    the next writer puts the complete new set (or else the old one) back."""
    from analysis.atomic import _HOST

    dead = _dead_pid()
    new = tmp_path / f".labels.{dead}.{_HOST}0001.new"
    new.mkdir()
    (new / "a.txt").write_text("new")
    (new / SET_MANIFEST).write_text(json.dumps({"files": ["a.txt"]}))
    old = tmp_path / f".labels.{dead}.{_HOST}0002.old"
    old.mkdir()
    (old / "a.txt").write_text("old")
    assert clean_stale(tmp_path) == 1
    assert (tmp_path / "labels" / "a.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels"]


# ------------------------------------------------------------------ the CLI, killed


def _big_capture(tmp: Path, flows: int = 4000) -> Path:
    pkts, _ = make_capture(tmp)
    for k in range(flows):
        c = Conv(client=PHONE, server=f"198.18.{k // 250}.{k % 250 + 1}", cport=20000 + k,
                 sport=443, t0=T0 + 1 + k * 0.001)
        c.handshake().tcp(0.01, True, 0x18, b"x" * 200).tcp(0.02, False, 0x18, b"y" * 900)
        pkts += c.pkts
    pkts.sort(key=lambda p: p.ts if isinstance(p.ts, float) else p.ts[0])
    return write_pcap(tmp / "big.pcap", pkts)


def _label_argv(pcap: Path, strace: Path, out: Path, fmt: str) -> list[str]:
    return [sys.executable, "-m", "controller.cli", "label", "--pcap", str(pcap), "--strace",
            f"{ALPHA}={strace}", "--device-ip", PHONE, "--out", str(out), "--format", fmt, "-q"]


def _run_and_kill(argv: list[str], appears: Callable[[], bool], delay: float) -> bool:
    """Start ``argv``; once ``appears()`` holds, wait ``delay`` and SIGKILL it. Returns
    whether it was killed (False: it finished first)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    t0 = time.monotonic()
    while proc.poll() is None and not appears():
        if time.monotonic() - t0 > 120:
            proc.kill()
            raise AssertionError("the writer never started writing")
        time.sleep(0.005)
    time.sleep(delay)
    killed = proc.poll() is None
    if killed:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return killed



def test_label_killed_mid_write_leaves_the_old_or_the_new_set(tmp_path):
    pcap = _big_capture(tmp_path)
    strace = tmp_path / f"strace.4242.{ALPHA}.log"
    strace.write_text(strace_alpha())
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    ref = tmp_path / "ref"
    subprocess.run(_label_argv(pcap, strace, ref, "mirage2022"), cwd=REPO, env=env,
                   check=True, capture_output=True, timeout=300)
    new_names = set(snapshot(ref))
    out = tmp_path / "out"
    subprocess.run(_label_argv(pcap, strace, out, "mirage2019"), cwd=REPO, env=env,
                   check=True, capture_output=True, timeout=300)
    old = snapshot(out)
    assert old.keys() != new_names

    def writing() -> bool:
        return any(p.name.startswith(".out.") for p in tmp_path.iterdir())

    kills = 0
    for delay in (0.0, 0.05, 0.3, 1.0):
        kills += _run_and_kill(_label_argv(pcap, strace, out, "mirage2022"), writing, delay)
        now = snapshot(out)
        if now == old:
            continue
        # else it must be the complete new set: same names as the reference, same packets
        assert set(now) == new_names, sorted(set(now) ^ new_names)
        for name in ("filtered.pcap", "labelled.pcapng", "labels.csv"):
            assert now[name] == snapshot(ref)[name]
        old = now
    assert kills >= 2
    # the next run removes what the killed writers left beside the target
    subprocess.run(_label_argv(pcap, strace, out, "mirage2019"), cwd=REPO, env=env,
                   check=True, capture_output=True, timeout=300)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_flows_killed_mid_write_leaves_a_temp_the_next_run_removes(tmp_path):
    pcap = _big_capture(tmp_path, flows=6000)
    out = tmp_path / "flows.parquet"
    argv = [sys.executable, "-m", "controller.cli", "flows", str(pcap), "-o", str(out),
            "--format", "parquet"]

    def temps() -> list[Path]:
        return [p for p in tmp_path.iterdir() if p.name.startswith(".flows.parquet.")]

    killed = _run_and_kill(argv, lambda: bool(temps()), 0.0)
    if killed:
        assert temps(), "a killed writer leaves its temp file"
        assert not out.exists()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert out.is_file() and temps() == []
