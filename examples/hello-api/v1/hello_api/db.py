"""The database: an engine built from DATABASE_URL at startup, and the check /healthz runs."""

import asyncio
import os
from pathlib import Path

from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

APP_DIR = Path(__file__).resolve().parent.parent
CHECK_SECONDS = 5


def create_engine() -> AsyncEngine:
    """DATABASE_URL as given, password percent-encoded (runbook §5); missing, a KeyError."""
    url = os.environ["DATABASE_URL"]
    return create_async_engine(url, pool_pre_ping=True, connect_args={"timeout": CHECK_SECONDS})


def head_revision() -> str | None:
    """The newest migration this version ships: the database must be at it."""
    scripts = ScriptDirectory.from_config(Config(str(APP_DIR / "alembic.ini")))
    return scripts.get_current_head()


async def problem(engine: AsyncEngine, head: str | None) -> str | None:
    """Why the database cannot serve this version of the app; None when it can."""
    try:
        async with asyncio.timeout(CHECK_SECONDS), engine.connect() as connection:
            await connection.execute(text("SELECT 1"))
            current = await connection.run_sync(
                lambda sync: MigrationContext.configure(sync).get_current_heads()
            )
    except Exception as exc:
        return f"unreachable: {type(exc).__name__}: {exc}"
    if current != (head,):
        found = ", ".join(current) or "none"
        return f"at revision {found}, this app needs {head}: run alembic upgrade head"
    return None
