"""``prefect server start`` for the local stack, with every SQLite write transaction begun
IMMEDIATE.

Prefect begins most SQLite transactions DEFERRED: one that reads, then writes, cannot
upgrade its lock once another connection has committed in between, and SQLite fails it at
once with "database is locked" — busy_timeout never applies. The API answers 503, and an
automation action (our webhook's run-deployment) that gets it is dropped: under a push
storm a delivery was accepted and started no run. Prefect itself begins IMMEDIATE where it
knows a read precedes a write (``with_for_update``); here every transaction does, so a
writer waits its turn (busy_timeout, 60 s) instead of failing. SQLite has one writer at a
time either way. A server on PostgreSQL needs none of this.

Run as ``python -m local_stack.sqlite_server server start …`` (the arguments of ``prefect``), or
as uvicorn's factory ``local_stack.sqlite_server:create_app``.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import asynccontextmanager
from typing import Any


def begin_every_transaction_immediate() -> None:
    from prefect.server.database.configurations import AioSqliteConfiguration

    deferred_or_immediate = AioSqliteConfiguration.begin_transaction

    @asynccontextmanager
    async def immediate(
        self: AioSqliteConfiguration, session: Any, with_for_update: bool = False
    ) -> AsyncGenerator[Any, None]:
        async with deferred_or_immediate(self, session, with_for_update=True) as transaction:
            yield transaction

    AioSqliteConfiguration.begin_transaction = immediate  # type: ignore[method-assign]


def create_app() -> Any:
    """Prefect's API app with every SQLite transaction begun IMMEDIATE: the uvicorn factory of
    the tests' session server (``prefect_test_harness`` starts Prefect's own otherwise)."""
    begin_every_transaction_immediate()
    from prefect.server.api.server import create_app as prefect_app

    return prefect_app()


def main() -> None:
    begin_every_transaction_immediate()
    from prefect.cli import app

    app()


if __name__ == "__main__":
    main()
