"""Durable staging of paid responses, outside the database lock (plain Python, no DuckDB).

Every paid ``/product`` response is written here, fsynced, *before* any database work: the DuckDB
file may be held by another process (a reseller's notebook, a status call) exactly when a paid
answer arrives, and a response that only lived in memory would be paid for again by the rerun.

Layout: one directory per database (``<db file>.spool/``), one sub-directory per scope (a backfill
chunk, or the upserter), one JSON file per response. Files are append-only: written under a
temporary name, fsynced, renamed into place and the directory fsynced, never modified. The commit
that stores an entry's rows consumes it (the file is deleted after that transaction commits). A
rerun or the next run replays the unconsumed entries of its scope instead of paying again. Replay is
idempotent: rows are upserted by (asin, lastUpdate) and settling a settled reservation is a no-op,
so a crash between the commit and the delete costs nothing.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_SCOPE_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")


@dataclass(frozen=True)
class SpoolEntry:
    """One staged paid response: ``payload`` as written, ``path`` of its file."""

    path: Path
    scope: str
    payload: dict[str, Any]


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class PaidSpool:
    """Append-only, fsynced files holding paid responses until the commit that stores them."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)

    @classmethod
    def beside(cls, db_path: str | os.PathLike[str]) -> "PaidSpool":
        """The spool of the database file ``db_path``: ``<db file>.spool/`` in the same directory."""
        path = Path(db_path)
        return cls(path.parent / f"{path.name}.spool")

    def __repr__(self) -> str:
        return f"PaidSpool({str(self.directory)!r})"

    def _scope_dir(self, scope: str) -> Path:
        slug = _SCOPE_SAFE.sub("_", scope).strip("_")
        if not slug:
            raise ValueError(f"spool scope {scope!r} has no usable characters")
        return self.directory / slug

    def append(self, scope: str, payload: dict[str, Any]) -> SpoolEntry:
        """Write ``payload`` durably (fsync file and directory) and return its entry."""
        directory = self._scope_dir(scope)
        directory.mkdir(parents=True, exist_ok=True)
        name = f"{time.time_ns():020d}-{uuid.uuid4().hex[:12]}.json"
        final = directory / name
        tmp = directory / f".{name}.tmp"
        data = json.dumps({"scope": scope, **payload}, separators=(",", ":")).encode()
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
        _fsync_dir(directory)
        return SpoolEntry(final, scope, payload)

    def entries(self, scope: str) -> list[SpoolEntry]:
        """Unconsumed entries of ``scope``, oldest first (a damaged file is skipped with a warning)."""
        directory = self._scope_dir(scope)
        if not directory.is_dir():
            return []
        found: list[SpoolEntry] = []
        for path in sorted(directory.glob("*.json")):
            try:
                payload = json.loads(path.read_bytes())
            except FileNotFoundError:
                continue  # consumed by another process meanwhile
            except (OSError, ValueError) as exc:
                log.warning("spool entry %s is unreadable, skipped: %s", path.name, exc)
                continue
            payload.pop("scope", None)
            found.append(SpoolEntry(path, scope, payload))
        return found

    def scopes(self, prefix: str = "") -> list[str]:
        """Scopes (directory names) that hold entries and start with ``prefix``."""
        if not self.directory.is_dir():
            return []
        slug = _SCOPE_SAFE.sub("_", prefix)
        return sorted(p.name for p in self.directory.iterdir() if p.is_dir() and p.name.startswith(slug))

    def consume(self, entries: list[SpoolEntry]) -> None:
        """Delete entries whose rows are committed (missing files are fine: replay is idempotent)."""
        dirs: set[Path] = set()
        for entry in entries:
            try:
                entry.path.unlink()
            except FileNotFoundError:
                pass
            dirs.add(entry.path.parent)
        for directory in dirs:
            _fsync_dir(directory)
            try:
                directory.rmdir()  # only when empty
            except OSError:
                pass

    def pending_count(self) -> int:
        """Unconsumed entries across every scope (System Health, tests)."""
        if not self.directory.is_dir():
            return 0
        return sum(1 for _ in self.directory.glob("*/*.json"))


__all__ = ["PaidSpool", "SpoolEntry"]
