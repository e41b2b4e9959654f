"""examples/hello-api, v1 and v2, run as a preview runs them: ``alembic upgrade head`` and
``uvicorn hello_api.main:app`` from the version's directory, against a real PostgreSQL, with a
DATABASE_URL whose password needs percent-encoding.

One PostgreSQL per module (and per test worker); each test gets a database of its own.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from local_stack.postgres import DatabaseUrl, Postgres, start_ephemeral
from local_stack.prefect_server import PROJECT_DIR
from local_stack.processes import die_with_parent, free_port, stop_process

pytestmark = pytest.mark.server

EXAMPLES = PROJECT_DIR / "examples" / "hello-api"
BIN = Path(sys.executable).parent
PASSWORD = "pa/ss@w:rd%demo"
SHA = "0123456789abcdef0123456789abcdef01234567"
APP_VARIABLES = ("DATABASE_URL", "GIT_SHA", "APP_VERSION")


@pytest.fixture
def database(postgres: Postgres) -> Iterator[DatabaseUrl]:
    name = f"hello_{uuid.uuid4().hex[:8]}"
    yield postgres.create_database(name, name, PASSWORD)
    postgres.drop_database(name)


def app_env(**values: str) -> dict[str, str]:
    """Our environment without the app's variables, plus ``values``; no bytecode written."""
    env = {name: value for name, value in os.environ.items() if name not in APP_VARIABLES}
    return {**env, "PYTHONDONTWRITEBYTECODE": "1", **values}


def alembic(app_dir: Path, url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "alembic"), *(args or ("upgrade", "head"))],
        cwd=app_dir,
        env=app_env(DATABASE_URL=url),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def migrate(version: str, url: str) -> None:
    done = alembic(EXAMPLES / version, url)
    assert done.returncode == 0, done.stderr


def tables(postgres: Postgres, database: str) -> set[str]:
    found = postgres.execute(
        "SELECT tablename FROM pg_tables WHERE schemaname = 'public'", database=database
    )
    return set(found.split())


def revision(postgres: Postgres, database: str) -> str:
    return postgres.execute("SELECT version_num FROM alembic_version", database=database).strip()


@contextmanager
def running_app(version: str, log: Path, env: Mapping[str, str]) -> Iterator[httpx.Client]:
    """``uvicorn hello_api.main:app`` from the version's directory, once it answers HTTP."""
    port = free_port()
    with log.open("wb") as output:
        process = subprocess.Popen(
            [
                str(BIN / "uvicorn"),
                "hello_api.main:app",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            cwd=EXAMPLES / version,
            env=app_env(**env),
            stdout=output,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent,
        )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            deadline = time.monotonic() + 30
            while True:
                assert process.poll() is None, f"the app exited:\n{log.read_text()}"
                try:
                    http.get("/openapi.json")
                    break
                except httpx.TransportError:
                    assert time.monotonic() < deadline, (
                        f"the app never answered:\n{log.read_text()}"
                    )
                    time.sleep(0.1)
            yield http
    finally:
        stop_process(process)


def test_migrations_of_v1_then_v2_create_their_tables(
    postgres: Postgres, database: DatabaseUrl
) -> None:
    first = alembic(EXAMPLES / "v1", database.render())
    assert first.returncode == 0, first.stderr
    assert tables(postgres, database.database) == {"alembic_version", "notes"}
    assert revision(postgres, database.database) == "0001"

    second = alembic(EXAMPLES / "v2", database.render())
    assert second.returncode == 0, second.stderr
    assert "Running upgrade 0001 -> 0002" in second.stderr
    assert tables(postgres, database.database) == {"alembic_version", "notes", "visits"}
    assert revision(postgres, database.database) == "0002"


def test_v1_is_unhealthy_until_migrated_then_serves_its_page_and_docs(
    database: DatabaseUrl, tmp_path: Path
) -> None:
    env = {"DATABASE_URL": database.render(), "GIT_SHA": SHA}
    with running_app("v1", tmp_path / "app.log", env) as http:
        before = http.get("/healthz")
        assert before.status_code == 503
        assert before.json()["status"] == "unavailable"
        assert "at revision none, this app needs 0001" in before.json()["database"]

        migrate("v1", database.render())

        after = http.get("/healthz")
        assert (after.status_code, after.json()) == (200, {"status": "ok", "database": "ok"})
        page = http.get("/")
        assert page.status_code == 200
        assert "<h1>hello-api</h1>" in page.text
        assert f'<code id="sha">{SHA}</code>' in page.text
        assert '<b id="version">v1</b>' in page.text
        docs = http.get("/docs")
        assert docs.status_code == 200
        assert "swagger-ui" in docs.text
        assert http.get("/openapi.json").json()["info"]["title"] == "hello-api"


def test_v2_needs_its_own_migration_and_counts_visits(
    database: DatabaseUrl, tmp_path: Path
) -> None:
    migrate("v1", database.render())
    env = {"DATABASE_URL": database.render(), "APP_VERSION": "1.4.2"}
    with running_app("v2", tmp_path / "app.log", env) as http:
        before = http.get("/healthz")
        assert before.status_code == 503
        assert "at revision 0001, this app needs 0002" in before.json()["database"]

        migrate("v2", database.render())

        assert http.get("/healthz").status_code == 200
        first, second = http.get("/"), http.get("/")
        assert '<b id="version">v2</b>' in first.text
        assert '<code id="sha">1.4.2</code>' in first.text
        assert '<b id="visits">1</b>' in first.text
        assert '<b id="visits">2</b>' in second.text


def test_healthz_is_503_while_the_database_is_down_and_200_once_it_is_back(
    tmp_path: Path,
) -> None:
    data, port = tmp_path / "pgdata", free_port()
    database = start_ephemeral(data, port, "app", PASSWORD, "app")
    try:
        database.wait_ready()
        migrate("v1", database.url.render())
        with running_app(
            "v1", tmp_path / "app.log", {"DATABASE_URL": database.url.render()}
        ) as http:
            assert http.get("/healthz").status_code == 200

            database.stop()
            down = http.get("/healthz")
            assert down.status_code == 503
            assert down.json()["database"].startswith("unreachable: ")

            database = start_ephemeral(data, port, "app", PASSWORD, "app")
            database.wait_ready()
            assert http.get("/healthz").status_code == 200
    finally:
        database.stop()


def test_app_without_database_url_crashes_on_start_with_a_traceback() -> None:
    done = subprocess.run(
        [str(BIN / "uvicorn"), "hello_api.main:app", "--host", "127.0.0.1", "--port", "0"],
        cwd=EXAMPLES / "v1",
        env=app_env(GIT_SHA=SHA),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert done.returncode != 0
    assert "Traceback (most recent call last):" in done.stderr
    assert "KeyError: 'DATABASE_URL'" in done.stderr


def test_a_migration_that_fails_gives_alembic_error_and_leaves_no_revision(
    postgres: Postgres, database: DatabaseUrl
) -> None:
    postgres.execute("CREATE TABLE notes (id int)", database=database.database)

    done = alembic(EXAMPLES / "v1", database.render())

    assert done.returncode != 0
    assert "Running upgrade  -> 0001" in done.stderr
    assert 'relation "notes" already exists' in done.stderr
    assert "DuplicateTableError" in done.stderr
    assert tables(postgres, database.database) == {"notes"}


def test_a_broken_revision_fails_its_upgrade_and_the_database_stays_at_the_last_good_one(
    postgres: Postgres, database: DatabaseUrl, tmp_path: Path
) -> None:
    app_dir = shutil.copytree(EXAMPLES / "v2", tmp_path / "v2")
    revision_file = app_dir / "migrations" / "versions" / "0002_visits.py"
    good = revision_file.read_text()
    broken = 'op.execute("ALTER TABLE missing ADD COLUMN x int")\n\n\ndef downgrade'
    revision_file.write_text(good.replace("\n\n\ndef downgrade", "\n    " + broken))
    migrate("v1", database.render())

    done = alembic(app_dir, database.render())

    assert done.returncode != 0
    assert "Running upgrade 0001 -> 0002" in done.stderr
    assert 'relation "missing" does not exist' in done.stderr
    assert revision(postgres, database.database) == "0001"
    assert tables(postgres, database.database) == {"alembic_version", "notes"}


def test_migration_with_an_unencoded_password_fails_to_parse_the_url(
    database: DatabaseUrl,
) -> None:
    where = f"{database.host}:{database.port}/{database.database}"
    raw = f"postgresql+asyncpg://{database.role}:{PASSWORD}@{where}"

    done = alembic(EXAMPLES / "v1", raw)

    assert done.returncode != 0
    assert "ValueError: invalid literal for int() with base 10: 'rd%demo@127.0.0.1:" in done.stderr
