"""Where state lives: the Dagster instance folder and the DuckDB file, resolved once for every entry point.

A path the user set (``DAGSTER_HOME``, ``DEALS_DB_PATH``, ``--db``) always wins; otherwise the defaults of
:mod:`deals_pipeline.config`, relative to the working directory. In real-API mode a database that does not
exist yet is never created implicitly (a typo in ``DEALS_DB_PATH`` must not start a fresh backfill that pays
for everything again): ``deals-pipeline init`` creates it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from deals_pipeline.config import DEFAULT_DAGSTER_HOME, DEFAULT_DB_PATH, ENV_DAGSTER_HOME, ENV_DB_PATH
from deals_pipeline.keepa.errors import ConfigError

#: The instance config committed with the project (telemetry off, keepa_api pool limit 1, run monitoring).
INSTANCE_TEMPLATE = Path(__file__).resolve().parents[1] / "dagster_home" / "dagster.yaml"
_FALLBACK_INSTANCE_YAML = """telemetry:
  enabled: false
concurrency:
  pools:
    default_limit: 1
run_monitoring:
  enabled: true
  free_slots_after_run_end_seconds: 10
"""


class MissingDatabase(ConfigError):
    """Real-API mode was pointed at a database file that does not exist (and creating one was not asked for)."""


def database_path(explicit: str | os.PathLike[str] | None = None) -> Path:
    """``explicit`` (a ``--db`` option), else ``DEALS_DB_PATH``, else ``data/deals.duckdb``; absolute."""
    raw = str(explicit) if explicit else (os.environ.get(ENV_DB_PATH, "").strip() or DEFAULT_DB_PATH)
    return Path(raw).expanduser().resolve()


def dagster_home(*, create: bool = True) -> Path:
    """``DAGSTER_HOME`` when set, else ``./dagster_home``; exported to this process so Dagster finds it.

    With ``create`` the folder and its ``dagster.yaml`` (the project's template) are made when missing.
    """
    raw = os.environ.get(ENV_DAGSTER_HOME, "").strip()
    home = Path(raw or DEFAULT_DAGSTER_HOME).expanduser().resolve()
    if create:
        try:
            home.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create {ENV_DAGSTER_HOME} folder {home}: {exc.strerror}") from None
        config = home / "dagster.yaml"
        if not config.exists():
            if INSTANCE_TEMPLATE.exists() and INSTANCE_TEMPLATE.resolve() != config.resolve():
                shutil.copy(INSTANCE_TEMPLATE, config)
            else:
                config.write_text(_FALLBACK_INSTANCE_YAML)
    os.environ[ENV_DAGSTER_HOME] = str(home)
    return home


def require_database(path: str | os.PathLike[str], mode: str) -> None:
    """Refuse a missing database in real-API mode (``mode == "keepa"``); simulator mode may create one."""
    if mode == "keepa" and not Path(path).expanduser().exists():
        raise MissingDatabase(
            f"no database at {Path(path).expanduser().resolve()}: in real-API mode it is never created implicitly "
            f"(a mistyped {ENV_DB_PATH} would pay for everything again). "
            f"Run `deals-pipeline init --db {path}` to start a new one, or fix {ENV_DB_PATH}."
        )
