"""SQL over a campus store with DuckDB, and the hourly summary.

Views: ``flows`` (every part and boundary file; ``date`` and ``hour`` from the
partition directories) and, once a model has scored the store, ``predictions``
(``flow_id``, ``messaging_proba``, ``is_messaging``, ``predicted_app``, ``app_proba``,
``model``) and ``scored`` (flows joined with predictions).
"""

from __future__ import annotations

import os
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
    con = duckdb.connect()
    glob = store.data_glob().replace("'", "''")
    con.execute(f"CREATE VIEW flows AS SELECT * FROM read_parquet('{glob}', "
                "hive_partitioning=true, union_by_name=true)")
    pred = store.root / PREDICTIONS
    if any(pred.glob("model=*/date=*/hour=*/*.parquet")):
        pglob = str(pred / "model=*" / "date=*" / "hour=*" / "*.parquet").replace("'", "''")
        con.execute(f"CREATE VIEW predictions AS SELECT * FROM read_parquet('{pglob}', "
                    "hive_partitioning=true, union_by_name=true)")
        con.execute("CREATE VIEW scored AS SELECT f.*, p.model, p.messaging_proba, "
                    "p.is_messaging, p.predicted_app, p.app_proba FROM flows f "
                    "JOIN predictions p USING (flow_id)")
    return con


def query(store_dir: str | os.PathLike[str], sql: str) -> Any:
    """The result of ``sql`` over the store's views as a pyarrow Table."""
    import duckdb

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
