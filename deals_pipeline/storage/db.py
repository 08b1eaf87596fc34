"""Short-lived DuckDB connections with bounded retry on the cross-process file lock.

While one process holds the file read-write, every other open of it fails ("Could not set lock on
file"), read-only included. So every unit of work opens, commits and closes; a busy file is retried
with exponential backoff and jitter for ``busy_timeout_s`` (wall seconds: contention is real time),
then :class:`DatabaseBusy` is raised. No connection is ever held across an API call.
"""

from __future__ import annotations

import logging
import os
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import duckdb
from tenacity import Retrying, retry_if_exception, stop_after_delay, wait_random_exponential

from deals_pipeline.keepa.errors import ConfigError
from deals_pipeline.storage.schema import MIGRATIONS, SCHEMA_VERSION

log = logging.getLogger(__name__)

DB_PATH_ENV = "DEALS_DB_PATH"
DEFAULT_DB_PATH = "data/deals.duckdb"
DEMO_DB_PATH = "data/demo/deals_demo.duckdb"


class DatabaseBusy(RuntimeError):
    """Another process kept the DuckDB file locked for longer than the busy timeout."""


class DataModeMismatch(ConfigError):
    """The database holds data of another mode (simulator vs real Keepa) than this process uses."""


def _is_lock_error(exc: BaseException) -> bool:
    return isinstance(exc, duckdb.IOException) and "lock" in str(exc).lower()


class Database:
    """A DuckDB file, opened per unit of work.

    Args:
        path: the database file; its folder is created. ``:memory:`` is not supported (the point is
            sharing state across processes).
        busy_timeout_s: how long to retry a file locked by another process.
        data_mode: ``"simulator"`` or ``"keepa"``. The first open records it; a later open in the
            other mode raises :class:`DataModeMismatch`, so demo data can never be mistaken for real data.
    """

    _migrated: set[str] = set()
    _migrate_lock = threading.Lock()

    def __init__(self, path: str | os.PathLike[str], *, busy_timeout_s: float = 60.0, data_mode: str | None = None) -> None:
        self.path = Path(path).expanduser().resolve()
        if data_mode not in (None, "simulator", "keepa"):
            raise ConfigError(f"data_mode must be 'simulator' or 'keepa', got {data_mode!r}")
        self.busy_timeout_s = busy_timeout_s
        self.data_mode = data_mode
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create the database folder {self.path.parent}: {exc.strerror}") from None
        if not os.access(self.path.parent, os.W_OK):
            raise ConfigError(f"the database folder {self.path.parent} is not writable (set {DB_PATH_ENV})")

    def __repr__(self) -> str:
        return f"Database({str(self.path)!r})"

    def _open(self) -> duckdb.DuckDBPyConnection:
        for attempt in Retrying(
            retry=retry_if_exception(_is_lock_error),
            wait=wait_random_exponential(multiplier=0.02, max=1.0),
            stop=stop_after_delay(self.busy_timeout_s),
            reraise=True,
        ):
            with attempt:
                # One thread: the pipeline's statements are small, and each extra worker thread adds
                # ~15 ms to every open, which short-lived connections pay on every unit of work.
                con = duckdb.connect(str(self.path), config={"threads": 1})
                con.execute("SET TimeZone = 'UTC'")
                return con
        raise AssertionError("unreachable")  # pragma: no cover

    @contextmanager
    def connect(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A migrated connection, closed on exit. Raises DatabaseBusy when the file stays locked."""
        try:
            con = self._open()
        except duckdb.IOException as exc:
            if _is_lock_error(exc):
                raise DatabaseBusy(
                    f"{self.path} stayed locked by another process for {self.busy_timeout_s:.0f}s"
                ) from None
            raise
        try:
            self._ensure_migrated(con)
            yield con
        finally:
            con.close()

    @contextmanager
    def transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A connection inside BEGIN ... COMMIT; rolled back on any exception."""
        with self.connect() as con:
            con.execute("BEGIN TRANSACTION")
            try:
                yield con
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")

    def _ensure_migrated(self, con: duckdb.DuckDBPyConnection) -> None:
        key = f"{self.path}|{self.data_mode}"
        if key in Database._migrated:
            return
        with Database._migrate_lock:
            con.execute("CREATE TABLE IF NOT EXISTS meta (key VARCHAR PRIMARY KEY, value VARCHAR NOT NULL)")
            row = con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            current = int(row[0]) if row else 0
            if current > SCHEMA_VERSION:
                raise ConfigError(
                    f"{self.path} has schema v{current}, newer than this code (v{SCHEMA_VERSION}); upgrade the code"
                )
            for version in range(current + 1, SCHEMA_VERSION + 1):
                con.execute("BEGIN TRANSACTION")
                try:
                    con.execute(MIGRATIONS[version - 1])
                    con.execute(
                        "INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", [str(version)]
                    )
                    con.execute("COMMIT")
                except BaseException:
                    con.execute("ROLLBACK")
                    raise
                log.info("migrated %s to schema v%d", self.path.name, version)
            if self.data_mode is not None:
                mode = con.execute("SELECT value FROM meta WHERE key = 'data_mode'").fetchone()
                if mode is None:
                    con.execute("INSERT OR REPLACE INTO meta VALUES ('data_mode', ?)", [self.data_mode])
                elif mode[0] != self.data_mode:
                    raise DataModeMismatch(
                        f"{self.path} holds {mode[0]} data; refusing to use it in {self.data_mode} mode. "
                        f"Point {DB_PATH_ENV} at another file."
                    )
            Database._migrated.add(key)
