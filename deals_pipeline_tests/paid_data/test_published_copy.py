"""Readers query the published copy while the pipeline runs (issue 13).

A separate OS process (a reseller's notebook) opens ``<db>.published.duckdb`` read-only and keeps it
open for a whole page run. The run completes (it never touches the reader's file); the reader's open
connection keeps its consistent copy, and on reopening it sees the rows of the new publish.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

from deals_pipeline import cli
from deals_pipeline.simulator import SimulatorConfig
from deals_pipeline.storage.publish import published_path

READER = (
    "import sys, duckdb\n"
    "path = sys.argv[1]\n"
    "con = duckdb.connect(path, read_only=True)\n"
    "def count():\n"
    "    return con.execute('SELECT count(*) FROM current_deals WHERE enriched_at IS NOT NULL').fetchone()[0]\n"
    "print(count(), flush=True)\n"
    "for line in sys.stdin:\n"
    "    cmd = line.strip()\n"
    "    if cmd == 'reopen':\n"
    "        con.close(); con = duckdb.connect(path, read_only=True)\n"
    "    print(count(), flush=True)\n"
)


class Reader:
    def __init__(self, path: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", READER, str(path)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.first = self._read()

    def _read(self) -> int:
        line = self.proc.stdout.readline()
        assert line.strip(), self.proc.stderr.read()
        return int(line)

    def ask(self, cmd: str) -> int:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


@pytest.fixture
def readers():
    opened: list[Reader] = []

    def open_reader(path: Path) -> Reader:
        reader = Reader(path)
        opened.append(reader)
        return reader

    yield open_reader
    for reader in opened:
        reader.close()


def test_reader_holds_the_published_copy_through_a_page_run(make_stack, readers, capsys) -> None:
    stack = make_stack(config=SimulatorConfig(refill_rate=500, seed=9, catalog_size=60))
    backfill = stack.backfill()
    snapshot = backfill.snapshot(0)
    assert backfill.run_chunk(snapshot, 0).status == "done"  # the first commit publishes
    path = published_path(stack.db_path)
    assert path.exists()

    reader = readers(path)
    first = reader.first  # deals enriched by the first chunk (stage-1 screening may drop some of its 4)
    assert first <= 4
    summary = backfill.run_page(0)  # every other chunk, with the reader holding the copy open
    assert summary.complete and summary.chunks_done == snapshot.chunk_count
    with stack.db.connect() as con:
        stored = con.execute("SELECT count(*) FROM deals WHERE viability = 'viable' AND enriched_at IS NOT NULL").fetchone()[0]
    assert stored > first
    assert reader.ask("count") == first  # its open connection still reads the copy it opened
    assert reader.ask("reopen") == stored  # the next publish has every row

    # The documented one-liners: the CLI and plain DuckDB, both read-only.
    assert cli.main(["query", "--db", str(stack.db_path),
                     "SELECT count(*) AS n FROM current_deals WHERE enriched_at IS NOT NULL"]) == 0
    assert str(stored) in capsys.readouterr().out
    con = duckdb.connect(str(path), read_only=True)
    try:
        row = con.execute(
            "SELECT price_now, avg_price_90d, drop_pct_90d, used_price, sales_rank, amazon_url, keepa_url "
            "FROM current_deals ORDER BY asin LIMIT 1").fetchone()
    finally:
        con.close()
    assert row[5].startswith("https://www.amazon.com/dp/") and row[6].startswith("https://keepa.com/#!product/1-")


def test_query_without_a_published_copy_says_so(tmp_path: Path, capsys) -> None:
    assert cli.main(["query", "--db", str(tmp_path / "none.duckdb"), "SELECT 1"]) == 2
    assert "nothing published yet" in capsys.readouterr().err
