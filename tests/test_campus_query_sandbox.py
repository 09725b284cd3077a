"""``flowtruth campus query`` is a sandbox: the store's views and nothing else on the machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "controller.cli", *args], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=180)


@pytest.fixture(scope="module")
def store(shared_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("sandbox")
    caps = root / "caps"
    caps.mkdir()
    os.symlink(shared_data / "ndpi_pcaps" / "telegram.pcap", caps / "telegram.pcap")
    key = root / "campus.key"
    assert cli("campus", "keygen", str(key), cwd=root).returncode == 0
    res = cli("campus", "ingest", str(caps), "--store", str(root / "store"), "--key", str(key),
              cwd=root)
    assert res.returncode == 0, res.stderr
    return root


def query(root: Path, sql: str) -> subprocess.CompletedProcess:
    return cli("campus", "query", sql, "--store", str(root / "store"), "--format", "json",
               cwd=root)


def refused(res: subprocess.CompletedProcess) -> bool:
    return (res.returncode == 2 and res.stderr.count("\n") == 1
            and "Traceback" not in res.stderr and res.stdout == "")


def test_reads_still_work(store):
    res = query(store, "SELECT count(*) AS n FROM flows")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["n"] > 0
    for sql in ("WITH t AS (SELECT * FROM flows) SELECT count(*) AS n FROM t",
                "DESCRIBE flows", "SHOW TABLES", "EXPLAIN SELECT * FROM flows",
                "FROM flows LIMIT 1", "SELECT 1 AS a; SELECT 2 AS a",
                "EXPLAIN (FORMAT json) SELECT count(*) FROM flows", "SUMMARIZE flows"):
        res = query(store, sql)
        assert res.returncode == 0, (sql, res.stderr)


@pytest.mark.parametrize("sql", [
    "SELECT * FROM read_text('campus.key')",
    "SELECT * FROM read_csv('/etc/passwd')",
    "SELECT * FROM read_blob('store/../campus.key')",
    "SELECT * FROM read_parquet('/etc/passwd')",
    "SELECT * FROM glob('/etc/*')",
])
def test_files_outside_the_store_cannot_be_read(store, sql):
    res = query(store, sql)
    assert refused(res), res
    assert (store / "campus.key").read_text().strip() not in res.stdout + res.stderr
    assert "root:" not in res.stdout + res.stderr


@pytest.mark.parametrize("sql", [
    "COPY (SELECT '10.0.0.1' AS src_ip) TO 'store/date=2020-01-01/hour=00/x.parquet'",
    "COPY flows TO 'out.csv'",
    "ATTACH 'evil.db' AS evil",
    "INSTALL httpfs",
    "LOAD httpfs",
    "SET enable_external_access = true",
    "SET allowed_directories = ['/']",
    "RESET lock_configuration",
    "PRAGMA enable_profiling",
    "CREATE TABLE t AS SELECT 1",
    "EXPLAIN ANALYZE COPY flows TO 'out.csv'",
    "EXPLAIN (ANALYZE) COPY flows TO 'out.csv'",
    "SELECT 1; COPY flows TO 'out2.csv'",
    "/* hidden */ EXPORT DATABASE 'exported'",
    "CALL pragma_version()",
])
def test_statements_that_write_or_reconfigure_are_refused(store, sql):
    before = sorted(p.relative_to(store) for p in store.rglob("*"))
    res = query(store, sql)
    assert refused(res), res
    assert "refused" in res.stderr or "not allowed" in res.stderr or "Permission" in res.stderr
    assert sorted(p.relative_to(store) for p in store.rglob("*")) == before


def test_the_sandbox_holds_in_the_library_too(store):
    from analysis.campus.query import connect
    from analysis.campus.query import query as lib_query
    from analysis.errors import BadInputError

    con = connect(store / "store")
    try:
        import duckdb

        with pytest.raises(duckdb.Error):
            con.execute("SET enable_external_access = true")
        assert con.execute("SELECT current_setting('enable_external_access')").fetchone()[0] is False
    finally:
        con.close()
    with pytest.raises(BadInputError):
        lib_query(store / "store", "INSTALL httpfs")
