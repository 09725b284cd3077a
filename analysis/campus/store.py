"""The campus flow store: a Parquet dataset partitioned by date and hour, plus a manifest.

Layout of a store directory::

    manifest.sqlite                          one row per ingested input file
    date=YYYY-MM-DD/hour=HH/part-<id>.parquet  the finished flows of one input file
    date=YYYY-MM-DD/hour=HH/bnd-<seq>-bNN.parquet  boundary flows of one rotation sequence,
                                             joined across file boundaries
    _pending/<id>/bNN.arrow                  boundary pieces with their packet series
                                             (Arrow IPC), in 8 buckets by 5-tuple hash
    _staging/                                work in progress; cleared by every run

Every file appears by an atomic rename, so a reader never sees half a part file, and a
crash leaves only ``_staging`` junk. The manifest row of an input file is written after
all of its parts are in place; a file without a row is ingested again, and its parts
(named after the file's checksum) are replaced, never duplicated.

Rows: the flow key (``src_ip`` ... ``ip_version``, addresses anonymised), every scalar
flow field of the core (``first_ts_ns`` ... ``df_ws``), the 102 MIRAGE statistics,
``flow_id`` (a stable hex id of the anonymised key and start time), ``source_sha256``,
``cut_at_start``/``cut_at_end`` (the flow may continue before/after what the store has)
and ``pieces`` (how many file pieces were joined into it). ``date`` and ``hour`` come
from the directory names (UTC hour of the flow's first packet).
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

from analysis.errors import BadInputError, OutputError

from .parquet_out import flat_name

STORE_VERSION = "1"
MANIFEST = "manifest.sqlite"
STAGING = "_staging"
PENDING = "_pending"
PREDICTIONS = "_predictions"


@dataclass(frozen=True)
class FileRecord:
    """What the manifest knows about one ingested input file."""

    sha256: str
    path: str
    size: int
    mtime_ns: int
    sequence: str
    first_ts_ns: int | None
    last_ts_ns: int | None
    packets: int
    flows: int
    parts: tuple[str, ...]
    pending: str | None
    ingested_at: float


def file_id(sha256: str) -> str:
    """Short id of an input file in part names (64 bits of its checksum)."""
    return sha256[:16]


def partition_dir(hour_index: int) -> str:
    """``date=YYYY-MM-DD/hour=HH`` of an hour counted since the epoch (UTC)."""
    t = time.gmtime(hour_index * 3600)
    return f"date={t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}/hour={t.tm_hour:02d}"


class Store:
    """A store directory: manifest access, staging, commits."""

    def __init__(self, root: str | os.PathLike[str], create: bool = False,
                 worker: bool = False) -> None:
        """``worker``: a task in a worker process, which never opens the manifest (only the
        coordinating process writes it, so the store can sit on a shared file system)."""
        self.root = Path(root)
        if worker:
            return
        if self.root.exists() and not self.root.is_dir():
            raise BadInputError(f"{self.root} is not a directory")
        if not create and not (self.root / MANIFEST).is_file():
            raise BadInputError(f"{self.root} is not a campus store (no {MANIFEST})",
                                "create one with: flowtruth campus ingest PCAP_DIR --store DIR")
        if create:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise OutputError(f"cannot create {self.root}: {err.strerror or err}") from err
        self._init_manifest()

    # -- manifest ---------------------------------------------------------------------
    def _db(self) -> sqlite3.Connection:
        con = sqlite3.connect(self.root / MANIFEST, timeout=30)
        con.execute("PRAGMA journal_mode=WAL")
        # WAL + NORMAL: a crashed process loses nothing committed; a power cut may lose
        # the last rows, whose files are then ingested again (parts are replaced, not added)
        con.execute("PRAGMA synchronous=NORMAL")
        return con

    def _init_manifest(self) -> None:
        with closing(self._db()) as con, con:
            con.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
            con.execute(
                "CREATE TABLE IF NOT EXISTS files (sha256 TEXT PRIMARY KEY, path TEXT, "
                "size INTEGER, mtime_ns INTEGER, sequence TEXT, first_ts_ns INTEGER, "
                "last_ts_ns INTEGER, packets INTEGER, flows INTEGER, parts TEXT, "
                "pending TEXT, ingested_at REAL)")
            con.execute("CREATE TABLE IF NOT EXISTS unjoined (sequence TEXT PRIMARY KEY)")
            con.execute("INSERT OR IGNORE INTO meta VALUES ('store_version', ?)",
                        (STORE_VERSION,))
            row = con.execute("SELECT value FROM meta WHERE key='store_version'").fetchone()
        if row[0] != STORE_VERSION:
            raise BadInputError(f"{self.root}: store version {row[0]!r} is not {STORE_VERSION!r}")

    def get_meta(self, key: str) -> str | None:
        with closing(self._db()) as con:
            row = con.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return None if row is None else row[0]

    def set_meta(self, key: str, value: str) -> None:
        with closing(self._db()) as con, con:
            con.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def records(self) -> list[FileRecord]:
        with closing(self._db()) as con:
            rows = con.execute("SELECT sha256, path, size, mtime_ns, sequence, first_ts_ns, "
                               "last_ts_ns, packets, flows, parts, pending, ingested_at "
                               "FROM files").fetchall()
        return [FileRecord(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8],
                           tuple(json.loads(r[9])), r[10], r[11]) for r in rows]

    def unjoined(self) -> set[str]:
        """Sequences with files committed since their boundary flows were last joined."""
        with closing(self._db()) as con:
            return {r[0] for r in con.execute("SELECT sequence FROM unjoined")}

    def mark_joined(self, sequences: set[str]) -> None:
        with closing(self._db()) as con, con:
            con.executemany("DELETE FROM unjoined WHERE sequence=?", [(q,) for q in sequences])

    # -- staging and commits ----------------------------------------------------------
    def staging_dir(self, fid: str) -> Path:
        import secrets

        return self.root / STAGING / f"{fid}-{os.getpid()}-{secrets.token_hex(4)}"

    def clean_staging(self) -> int:
        """Remove what interrupted runs left in ``_staging`` (call with no ingest running)."""
        st = self.root / STAGING
        n = 0
        if st.is_dir():
            for child in st.iterdir():
                shutil.rmtree(child, ignore_errors=True)
                n += 1
        for tmp in self.root.glob("date=*/hour=*/.*.tmp"):
            tmp.unlink(missing_ok=True)
            n += 1
        return n

    def commit(self, rec: FileRecord, staged: Path) -> None:
        """Move a file's staged parts into place, then record it in the manifest."""
        fid = file_id(rec.sha256)
        for old in self.root.glob(f"date=*/hour=*/part-{fid}.parquet"):
            if str(old.relative_to(self.root)) not in rec.parts:
                old.unlink(missing_ok=True)
        try:
            for rel in rec.parts:
                dest = self.root / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(staged / flat_name(rel), dest)
            if rec.pending:
                dest = self.root / rec.pending
                if dest.exists():  # left by a run that died before its manifest row
                    shutil.rmtree(dest)
                dest.mkdir(parents=True)
                for f in staged.glob(flat_name(rec.pending) + "~*"):
                    os.replace(f, dest / f.name.rsplit("~", 1)[1])
        except OSError as err:
            raise OutputError(f"cannot commit into {self.root}: {err.strerror or err}") from err
        with closing(self._db()) as con, con:
            con.execute("INSERT OR REPLACE INTO files VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                        (rec.sha256, rec.path, rec.size, rec.mtime_ns, rec.sequence,
                         rec.first_ts_ns, rec.last_ts_ns, rec.packets, rec.flows,
                         json.dumps(list(rec.parts)), rec.pending, rec.ingested_at))
            # the sequence's boundary flows must be joined again (survives a crash)
            con.execute("INSERT OR IGNORE INTO unjoined VALUES (?)", (rec.sequence,))
        shutil.rmtree(staged, ignore_errors=True)

    def data_glob(self) -> str:
        return str(self.root / "date=*" / "hour=*" / "*.parquet")

    def has_data(self) -> bool:
        return any(self.root.glob("date=*/hour=*/*.parquet"))
