"""MongoDB as an optional sink of the campus store (the original system's database).

The Parquet store stays the source of truth; the sink mirrors every committed row into
one collection with bulk, unordered, idempotent upserts keyed by ``flow_id`` (the
document ``_id``), so re-sending a part after a crash or a rerun never duplicates.
Needs ``pymongo`` and a reachable server (``mongodb://host:port/database``; the
database defaults to ``flowtruth``, the collection to ``flows``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from analysis.errors import BadInputError, OutputError

BATCH = 5000


class MongoSink:
    """Upserts store rows into ``database.collection``."""

    def __init__(self, url: str, collection: str = "flows", timeout_ms: int = 5000) -> None:
        if not url.startswith(("mongodb://", "mongodb+srv://")):
            raise BadInputError(f"not a MongoDB URL: {url.split('@')[-1]!r}",
                                "use mongodb://HOST:PORT/DATABASE")
        try:
            import pymongo
            from pymongo.errors import PyMongoError
        except ImportError:
            raise BadInputError("the MongoDB sink needs pymongo",
                                "pip install pymongo") from None
        self._errors = PyMongoError
        self.client: Any = None
        try:
            self.client = pymongo.MongoClient(url, serverSelectionTimeoutMS=timeout_ms)
            self.db = self.client.get_default_database(default="flowtruth")
            self.client.admin.command("ping")
        except PyMongoError as err:
            raise OutputError(f"cannot reach MongoDB at {url.split('@')[-1]}: {err}") from None
        self.collection = self.db[collection]
        self.written = 0

    def write_rows(self, rows: Iterable[dict[str, Any]]) -> int:
        """Upsert rows (dicts with ``flow_id``); returns how many were sent."""
        from pymongo import UpdateOne

        ops = []
        n = 0
        try:
            for row in rows:
                doc = dict(row)
                doc["_id"] = doc["flow_id"]
                ops.append(UpdateOne({"_id": doc["_id"]}, {"$set": doc}, upsert=True))
                if len(ops) >= BATCH:
                    self.collection.bulk_write(ops, ordered=False)
                    n += len(ops)
                    ops = []
            if ops:
                self.collection.bulk_write(ops, ordered=False)
                n += len(ops)
        except self._errors as err:
            raise OutputError(f"MongoDB write failed: {err}") from None
        self.written += n
        return n

    def write_parts(self, store: Any, rels: Iterable[str]) -> int:
        """Upsert the rows of store files (relative paths), with their date and hour."""
        import pyarrow.parquet as pq

        n = 0
        for rel in rels:
            parts = dict(p.split("=", 1) for p in rel.split("/")[:2] if "=" in p)
            pf = pq.ParquetFile(store.root / rel)
            for batch in pf.iter_batches(batch_size=BATCH):
                rows = batch.to_pylist()
                for r in rows:
                    r.update(parts)
                n += self.write_rows(rows)
        return n

    def close(self) -> None:
        self.client.close()
