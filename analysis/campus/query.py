"""SQL over a campus store with DuckDB, and the hourly summary.

Views: ``flows`` (every part and boundary file; ``date`` and ``hour`` from the
partition directories) and, once a model has scored the store, ``predictions``
(``flow_id``, ``messaging_proba``, ``is_messaging``, ``predicted_app``, ``app_proba``,
``model``) and ``scored`` (flows joined with predictions).

The connection is a sandbox: a query sees only the store's Parquet files (DuckDB's
``allowed_directories`` holds the store alone and ``enable_external_access`` is off), cannot
install or load extensions, cannot change a setting (``lock_configuration``), and only
read statements (``SELECT``, ``WITH``, ``FROM``, ``DESCRIBE``, ``SHOW``, ``SUMMARIZE``,
``EXPLAIN`` of those) run; ``COPY``, ``ATTACH``, ``INSTALL``, ``SET``, ``CREATE`` ... are
refused before anything executes.
"""

from __future__ import annotations

import os
import re
from typing import Any

from analysis.errors import BadInputError

from .store import PREDICTIONS, Store


def connect(store_dir: str | os.PathLike[str]) -> Any:
    """An in-memory DuckDB connection with the store's views."""
    import duckdb

    store = Store(store_dir)
    if not store.has_data():
        raise BadInputError(f"{store.root} holds no flows yet",
                            "ingest captures first: flowtruth campus ingest PCAP_DIR --store DIR")
    con = duckdb.connect(":memory:")
    # only the store's files are readable, nothing else on the machine or the network;
    # allowed_directories must be set once the database runs, and before the lock
    con.execute("SET allowed_directories = ?", [[str(store.root.resolve()) + os.sep]])
    for setting in ("enable_external_access = false", "autoinstall_known_extensions = false",
                    "autoload_known_extensions = false", "allow_community_extensions = false",
                    "lock_configuration = true"):
        con.execute(f"SET {setting}")
    glob = str(store.root.resolve() / "date=*" / "hour=*" / "*.parquet")
    glob = glob.replace("'", "''")
    con.execute(f"CREATE VIEW flows AS SELECT * FROM read_parquet('{glob}', "
                "hive_partitioning=true, union_by_name=true)")
    pred = store.root.resolve() / PREDICTIONS
    if any(pred.glob("model=*/date=*/hour=*/*.parquet")):
        pglob = str(pred / "model=*" / "date=*" / "hour=*" / "*.parquet").replace("'", "''")
        con.execute(f"CREATE VIEW predictions AS SELECT * FROM read_parquet('{pglob}', "
                    "hive_partitioning=true, union_by_name=true)")
        con.execute("CREATE VIEW scored AS SELECT f.*, p.model, p.messaging_proba, "
                    "p.is_messaging, p.predicted_app, p.app_proba FROM flows f "
                    "JOIN predictions p USING (flow_id)")
    return con


_EXPLAIN = re.compile(r"\s*explain\s+(?:analy[sz]e\s+)?(?:\([^()]*\)\s*)?(.*)\Z",
                      re.IGNORECASE | re.DOTALL)
_COMMENT = re.compile(r"\A(?:\s+|--[^\n]*(?:\n|\Z)|/\*.*?\*/)*", re.DOTALL)


def check_read_only(sql: str) -> None:
    """Raise :class:`BadInputError` unless every statement of ``sql`` only reads.

    Parsed by DuckDB itself (``extract_statements``), so a write hidden behind comments,
    a second statement or ``EXPLAIN ANALYZE`` (which executes) is seen.
    """
    import duckdb

    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as err:
        raise BadInputError(f"query failed: {str(err).splitlines()[0]}",
                            "views: flows, predictions, scored") from None
    if not statements:
        raise BadInputError("query is empty", "e.g. SELECT count(*) FROM flows")
    for st in statements:
        kind = st.type
        if kind == duckdb.StatementType.EXPLAIN:
            m = _EXPLAIN.match(_COMMENT.sub("", st.query, count=1))
            try:
                inner = duckdb.extract_statements(m.group(1)) if m else []
            except duckdb.Error:
                inner = []
            if inner and all(i.type == duckdb.StatementType.SELECT for i in inner):
                continue
        elif kind == duckdb.StatementType.SELECT:
            continue
        what = ("EXPLAIN of anything but a read" if kind == duckdb.StatementType.EXPLAIN
                else f"{kind.name} statements")
        raise BadInputError(f"query refused: {what} not allowed",
                            "campus query only reads: SELECT, WITH, DESCRIBE, SHOW, SUMMARIZE, "
                            "EXPLAIN over the views flows, predictions, scored")


def query(store_dir: str | os.PathLike[str], sql: str) -> Any:
    """The result of ``sql`` (read statements only) over the store's views, a pyarrow Table."""
    import duckdb

    check_read_only(sql)
    con = connect(store_dir)
    try:
        rel = con.sql(sql)
        if rel is None:  # a statement without a result
            import pyarrow as pa

            return pa.table({})
        fetch = getattr(rel, "to_arrow_table", None) or rel.arrow
        return fetch()
    except duckdb.Error as err:
        raise BadInputError(f"query failed: {str(err).splitlines()[0]}",
                            "views: flows, predictions, scored") from None
    finally:
        con.close()


SUMMARY_SQL = """
SELECT date, hour, count(*) AS flows, sum(bf_packets) AS packets,
       sum(bf_ip_bytes) AS bytes, count(DISTINCT src_ip) AS hosts,
       count(DISTINCT dst_ip) AS peers
FROM flows GROUP BY date, hour ORDER BY date, hour
"""


def summary(store_dir: str | os.PathLike[str]) -> Any:
    """Flows, packets, bytes, hosts (distinct sources) and peers per hour."""
    return query(store_dir, SUMMARY_SQL)
