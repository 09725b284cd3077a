"""Rotated header captures to the campus flow store, in parallel worker processes.

One task is one input file: checksum, bi-flows with MIRAGE statistics (the analysis
core), addresses anonymised with Crypto-PAn, finished flows streamed into one Parquet
part per hour in a private staging directory. The coordinating process commits each
finished task (atomic renames, then a manifest row), so a crash loses nothing
committed and leaves no half partition; a rerun skips every file whose checksum the
manifest holds. Tasks run in a ``ProcessPoolExecutor`` or on a Dask cluster.

Flows cut by file rotation: a worker cannot see the neighbouring files, so it sets
aside the flows that may continue across a boundary of its file - those whose first
packet lies within ``idle_timeout`` of the file's first packet (and that do not open
with a TCP SYN), and those still open at the end of the file whose last packet lies
within ``idle_timeout`` of its last - as *pending pieces* with their packet series.
After the tasks, :func:`analysis.campus.join.join_sequences` walks each rotation
sequence (the files under one first-level directory of the input, or directly in it,
ordered by their first packet) and joins pieces with the same
5-tuple and a gap below ``idle_timeout``, recomputing their statistics exactly. With
joining off, those flows go straight to the parts, flagged ``cut_at_start`` /
``cut_at_end``.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from analysis.assemble import FlowOptions, iter_flow_chunks
from analysis.errors import BadInputError, FlowtruthError
from analysis.flowtable import ACK, SYN, CaptureStats, EndReason, FlowTable

from .anonymise import CryptoPAn, anonymise_table, load_key
from .join import bucket_of
from .parquet_out import PartWriter, flows_arrow, pending_arrow
from .store import PENDING, FileRecord, Store, file_id, partition_dir

HOUR_NS = 3_600_000_000_000
# x.pcap, x.pcapng, and the numbered names of tcpdump -C / dumpcap ring buffers (x.pcap3)
CAPTURE_NAME = re.compile(r"\.(pcap|pcapng|cap|dmp)\d*$", re.IGNORECASE)


# -- events (past tense; the CLI renders them) -----------------------------------------
@dataclass(frozen=True)
class IngestStarted:
    files: int
    bytes: int
    already: int  # files the manifest already holds (by path, size and mtime)


@dataclass(frozen=True)
class FileIngested:
    path: str
    bytes: int
    packets: int
    flows: int
    seconds: float
    worker_pid: int = 0
    worker_peak_rss_kb: int = 0  # the worker process's peak resident set so far
    cpu_seconds: float = 0.0  # CPU time the worker spent on this file


@dataclass(frozen=True)
class FileSkipped:
    path: str
    bytes: int
    reason: str


@dataclass(frozen=True)
class FileFailed:
    path: str
    bytes: int
    reason: str


@dataclass(frozen=True)
class BoundariesJoined:
    sequences: int
    pieces: int
    flows: int


@dataclass
class IngestSummary:
    """What an ingest run did."""

    files: int = 0
    ingested: int = 0
    skipped: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    packets: int = 0
    flows: int = 0
    bytes: int = 0
    seconds: float = 0.0
    joined_flows: int = 0
    warnings: list[str] = field(default_factory=list)

    def line(self) -> str:
        rate = self.packets / self.seconds if self.seconds > 0 else 0.0
        s = (f"{self.ingested} file(s) ingested, {self.skipped} skipped, "
             f"{len(self.failed)} failed: {self.packets:,} packets, {self.flows:,} flows "
             f"in {self.seconds:.1f} s ({rate:,.0f} packets/s)")
        if self.joined_flows:
            s += f", {self.joined_flows:,} boundary flows after joining"
        return s


# -- the worker side --------------------------------------------------------------------
@dataclass(frozen=True)
class IngestTask:
    """One input file for a worker (picklable; the key travels as a path, never as bytes)."""

    path: str
    store: str
    key_file: str
    sequence: str
    options: FlowOptions
    join: bool = True
    # checksums already in the store; small stores send them so a renamed copy is not
    # even parsed (the coordinator drops duplicates in any case)
    known_sha256: frozenset[str] = frozenset()


@dataclass
class FileResult:
    path: str
    status: str  # "ingested", "duplicate" or "failed"
    record: FileRecord | None
    staged: str | None
    skipped: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    sha256: str = ""
    reason: str = ""
    pid: int = 0
    peak_rss_kb: int = 0
    cpu_seconds: float = 0.0


_CPAN: dict[str, CryptoPAn] = {}  # per worker process: key file -> anonymiser (and its cache)


def _anonymiser(key_file: str) -> CryptoPAn:
    cpan = _CPAN.get(key_file)
    if cpan is None:
        cpan = CryptoPAn(load_key(key_file))
        _CPAN.clear()
        _CPAN[key_file] = cpan
    return cpan


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def _file_start(path: str) -> int | None:
    from analysis.pcap import iter_packet_batches

    for batch in iter_packet_batches(path, CaptureStats(), chunk_bytes=1 << 16):
        if len(batch):
            return int(batch.ts_ns.min())
    return None


def boundary_flags(table: FlowTable, file_start: int | None, file_end: int | None,
                   idle_ns: int, grace_ns: int = 2_000_000_000) -> tuple[np.ndarray, np.ndarray]:
    """Which flows may continue before the file's start and after its end."""
    fl = table.flows
    n = len(table)
    if n == 0 or file_start is None:
        return np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
    first_flags = table.packets["pkt_tcp_flags"][table.pkt_offsets[:-1]]
    opens = (fl["proto"] == 6) & ((first_flags & SYN) != 0) & ((first_flags & ACK) == 0)
    start = (fl["first_ts_ns"] < file_start + idle_ns) & ~opens
    end = fl["end_reason"] == EndReason.EOF
    if file_end is not None:
        end &= fl["last_ts_ns"] > file_end - idle_ns
        # closed by FIN/RST just before the end: trailing ACKs may be in the next file
        closed = (fl["end_reason"] == EndReason.FIN) | (fl["end_reason"] == EndReason.RST)
        end |= closed & (fl["last_ts_ns"] > file_end - grace_ns)
    return start, end


def run_task(task: IngestTask) -> FileResult:
    """Worker entry point: :func:`ingest_file` with known failures returned as results.

    (Our exceptions carry extra constructor arguments and do not survive pickling back
    from a worker process, so the worker sends their one-line text instead.)
    """
    try:
        return ingest_file(task)
    except FlowtruthError as err:
        return FileResult(task.path, "failed", None, None, reason=err.one_line())
    except OSError as err:
        return FileResult(task.path, "failed", None, None,
                          reason=f"{task.path}: {err.strerror or err}")


def ingest_file(task: IngestTask) -> FileResult:
    """Worker body: one capture file to staged, anonymised Parquet parts."""
    t0 = time.perf_counter()
    c0 = time.process_time()
    st = os.stat(task.path)
    sha = sha256_file(task.path)
    if sha in task.known_sha256:
        return FileResult(task.path, "duplicate", None, None, seconds=time.perf_counter() - t0,
                          sha256=sha)
    cpan = _anonymiser(task.key_file)
    store = Store(task.store, worker=True)
    fid = file_id(sha)
    staged = store.staging_dir(fid)
    staged.mkdir(parents=True, exist_ok=True)
    idle_ns = int(task.options.idle_timeout * 1e9)
    file_start = _file_start(task.path)
    stats = CaptureStats()
    parts = PartWriter(staged)
    pending_rel = f"{PENDING}/{fid}"
    n_flows = 0
    try:
        for chunk in iter_flow_chunks(task.path, task.options, stats):
            anonymise_table(chunk, cpan)
            cut_s, cut_e = boundary_flags(chunk, file_start, stats.last_ts_ns, idle_ns,
                                          int(task.options.tcp_grace * 1e9))
            n_flows += len(chunk)
            if task.join:
                pend = cut_s | cut_e
                if pend.any():
                    idx = np.flatnonzero(pend)
                    pieces = chunk.take(idx)
                    arrow_p = pending_arrow(pieces, sha, cut_s[idx], cut_e[idx])
                    buckets = bucket_of(pieces.flows)
                    for b in np.unique(buckets).tolist():
                        sel = buckets == b
                        parts.write(f"{pending_rel}/b{b:02d}.arrow",
                                    arrow_p if sel.all() else arrow_p.filter(sel))
                    keep = np.flatnonzero(~pend)
                    chunk = chunk.take(keep)
                    cut_s, cut_e = cut_s[keep], cut_e[keep]
                if not len(chunk):
                    continue
            arrow = flows_arrow(chunk, sha, cut_s, cut_e)
            hours = chunk.flows["first_ts_ns"] // HOUR_NS
            for h in np.unique(hours).tolist():
                rel = f"{partition_dir(h)}/part-{fid}.parquet"
                sel = hours == h
                parts.write(rel, arrow if sel.all() else arrow.filter(sel))
        rows = parts.close()
    except BaseException:
        parts.abort()
        raise
    record = FileRecord(
        sha256=sha, path=task.path, size=st.st_size, mtime_ns=st.st_mtime_ns,
        sequence=task.sequence, first_ts_ns=stats.first_ts_ns, last_ts_ns=stats.last_ts_ns,
        packets=stats.packets, flows=n_flows,
        parts=tuple(sorted(r for r in rows if not r.startswith(pending_rel + "/"))),
        pending=pending_rel if any(r.startswith(pending_rel + "/") for r in rows) else None,
        ingested_at=time.time())
    import resource

    return FileResult(task.path, "ingested", record, str(staged), dict(stats.skipped), list(stats.warnings),
                      time.perf_counter() - t0, sha, pid=os.getpid(),
                      peak_rss_kb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                      cpu_seconds=time.process_time() - c0)


# -- the coordinator --------------------------------------------------------------------
def find_captures(root: str | os.PathLike[str], min_age: float = 0.0) -> list[Path]:
    """Capture files under ``root`` (rotated names like ``x.pcap3`` included), sorted by name."""
    root = Path(root)
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise BadInputError(f"no such directory: {root}")
    now = time.time()
    out = []
    for p in sorted(root.rglob("*")):
        if p.name.startswith(".") or not p.is_file():
            continue
        if not CAPTURE_NAME.search(p.name):
            continue
        if min_age and now - p.stat().st_mtime < min_age:
            continue  # still being written by the capture
        out.append(p)
    return out


def sequence_of(root: str | os.PathLike[str], path: Path) -> str:
    """The rotation sequence of a capture: the first-level directory under ``root`` that
    holds it (one per monitoring point; n2disk's nested date/hour directories below it
    stay one sequence), or ``root`` itself for files directly in it."""
    base = Path(root).resolve()
    p = path.resolve()
    if base.is_file():
        return str(base.parent)
    try:
        rel = p.relative_to(base)
    except ValueError:
        return str(p.parent)
    return str(base / rel.parts[0]) if len(rel.parts) > 1 else str(base)


def key_fingerprint(key: bytes) -> str:
    """A fingerprint that tells keys apart without revealing them."""
    return hashlib.sha256(b"flowtruth campus key fingerprint\0" + key).hexdigest()[:16]


def _check_key(store: Store, key_file: str) -> None:
    fp = key_fingerprint(load_key(key_file))
    have = store.get_meta("key_fingerprint")
    if have is None:
        store.set_meta("key_fingerprint", fp)
    elif have != fp:
        raise BadInputError(f"{store.root} was anonymised with another key",
                            "the same key must be used for every file of a store")


class Runner:
    """Runs tasks in this process, a local process pool or on a Dask cluster.

    ``run(fn, items)`` yields ``fn(item)`` as each finishes. The local pool forks from
    this process after the heavy imports are done, so workers start at once.
    """

    def __init__(self, workers: int = 1, client: Any = None) -> None:
        self.client = client
        self.pool = None
        if client is None and workers > 1:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            _warm_imports()
            self.pool = ProcessPoolExecutor(max_workers=workers,
                                            mp_context=multiprocessing.get_context("fork"))
            # fork every worker now, before a front end starts threads (progress bars)
            list(self.pool.map(abs, range(workers)))

    def run(self, fn: Callable, items: list) -> Iterator:
        if self.client is not None:
            from distributed import as_completed

            futures = self.client.map(fn, items, pure=False)
            try:
                for fut in as_completed(futures):
                    yield fut.result()
            except BaseException:
                self.client.cancel(futures)
                raise
        elif self.pool is not None:
            from concurrent.futures import as_completed as done

            futs = [self.pool.submit(fn, item) for item in items]
            try:
                for fut in done(futs):
                    yield fut.result()
            except BaseException:
                for f in futs:
                    f.cancel()
                raise
        else:
            for item in items:
                yield fn(item)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)
            self.pool = None


def _warm_imports() -> None:
    """Import what every task needs before forking workers (pyarrow pulls in pandas)."""
    import pyarrow as pa
    import pyarrow.parquet  # noqa: F401
    from cryptography.hazmat.primitives.ciphers import Cipher  # noqa: F401

    pa.array(np.zeros(1))


def ingest(
    pcap_dir: str | os.PathLike[str],
    store_dir: str | os.PathLike[str],
    key_file: str | os.PathLike[str],
    *,
    workers: int = 1,
    options: FlowOptions | None = None,
    join: bool = True,
    client: Any = None,
    sink: Any = None,
    min_age: float = 0.0,
    events: Callable[[object], None] | None = None,
) -> IngestSummary:
    """Ingest every capture under ``pcap_dir`` into the store (see the module docstring).

    ``client`` is a ``distributed.Client``; without it tasks run in ``workers`` local
    processes. ``sink`` (e.g. :class:`analysis.campus.mongo.MongoSink`) also receives
    every committed row.
    """
    emit = events or (lambda _e: None)
    t0 = time.perf_counter()
    options = options or FlowOptions()
    if options.payload:
        raise BadInputError("campus ingest never keeps payload bytes")
    key_file = os.path.abspath(os.fspath(key_file))
    store = Store(store_dir, create=True)
    _check_key(store, key_file)
    store.clean_staging()
    files = find_captures(pcap_dir, min_age)
    records = store.records()
    by_path = {(r.path, r.size, r.mtime_ns) for r in records}
    known = frozenset(r.sha256 for r in records)
    tasks = []
    already = 0
    for p in files:
        st = p.stat()
        ap = str(p.resolve())
        if (ap, st.st_size, st.st_mtime_ns) in by_path:
            already += 1
            continue
        tasks.append(IngestTask(ap, str(store.root.resolve()), key_file,
                                sequence_of(pcap_dir, p), options, join,
                                known if len(known) <= 2000 else frozenset()))
    sizes = {t.path: os.path.getsize(t.path) for t in tasks}
    # largest first: the last task to finish is a small one, so workers end together
    tasks.sort(key=lambda t: -sizes[t.path])
    runner = Runner(workers if tasks else 1, client)
    try:
        return _ingest(store, tasks, sizes, len(files), already, known, runner, join, sink,
                       options, emit, t0)
    finally:
        runner.close()


def _ingest(store: Store, tasks: list[IngestTask], sizes: dict[str, int], n_files: int,
            already: int, known: frozenset[str], runner: Runner, join: bool, sink: Any,
            options: FlowOptions, emit: Callable[[object], None], t0: float) -> IngestSummary:
    summary = IngestSummary(files=n_files)
    emit(IngestStarted(n_files, sum(sizes.values()), already))
    summary.skipped = already
    seen_sha: set[str] = set(known)
    by_path = {t.path: t for t in tasks}
    for res in runner.run(run_task, tasks):
        task = by_path[res.path]
        size = sizes[task.path]
        if res.status == "failed":
            summary.failed.append((task.path, res.reason))
            emit(FileFailed(task.path, size, res.reason))
            continue
        if res.status == "duplicate" or res.sha256 in seen_sha:
            summary.skipped += 1
            if res.staged:
                import shutil

                shutil.rmtree(res.staged, ignore_errors=True)
            emit(FileSkipped(task.path, size, "same checksum as a file already ingested"))
            continue
        rec = res.record
        assert rec is not None and res.staged is not None
        store.commit(rec, Path(res.staged))
        seen_sha.add(rec.sha256)
        if sink is not None:
            sink.write_parts(store, rec.parts)
        summary.ingested += 1
        summary.packets += rec.packets
        summary.flows += rec.flows
        summary.bytes += size
        summary.warnings.extend(f"{task.path}: {w}" for w in res.warnings)
        emit(FileIngested(task.path, size, rec.packets, rec.flows, res.seconds, res.pid,
                          res.peak_rss_kb, res.cpu_seconds))
    touched = store.unjoined() if join else set()  # this run's and any a crash left
    if touched:
        from .join import join_sequences

        pieces, flows, written = join_sequences(store, touched, options.idle_timeout,
                                                runner.run)
        store.mark_joined(touched)
        summary.joined_flows = flows
        if sink is not None:
            sink.write_parts(store, written)
        emit(BoundariesJoined(len(touched), pieces, flows))
    summary.seconds = time.perf_counter() - t0
    return summary
