"""What a real local instance dials: the runbook's db-server and the app's images.

The db-server is a real PostgreSQL (``local_stack.postgres``) with the app's role and database;
instances reach it at the runbook's private address, ``172.31.39.125:5432``, relayed to the
host port it really listens on. The app's images are versions of the sample app
(``examples/hello-api/v1``, ``v2``), built here (``local_stack.images``) and pushed to the local
registry with the commit they were built from in their environment, as a ``docker build
--build-arg GIT_SHA=...`` would leave it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from local_stack.images import ImageBuilder, push_image
from local_stack.instance.relay import Bridge
from local_stack.instance.runtime import InstanceRuntime
from local_stack.postgres import Postgres, postgres_server
from local_stack.registry import FakeRegistry

DB_SERVER_IP = "172.31.39.125"
DB_PORT = 5432
SAMPLE_APP = "examples/hello-api"
PROJECT_DIR = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class DbServer:
    postgres: Postgres
    database_url: str  # as an instance uses it: the runbook's address, password URL-encoded

    @property
    def bridge(self) -> tuple[str, str]:
        """(what the instance dials, where that is on the host)."""
        return f"{DB_SERVER_IP}:{DB_PORT}", f"{self.postgres.host}:{self.postgres.port}"


@contextmanager
def db_server(home: Path, *, role: str, password: str, database: str) -> Iterator[DbServer]:
    """A real PostgreSQL with ``role`` (LOGIN, ``password``) owning ``database``."""
    with postgres_server(home) as postgres:
        url = postgres.create_database(database, role, password)
        yield DbServer(postgres, url.render(host=DB_SERVER_IP, port=DB_PORT))


def world_runtime(
    root: Path,
    moto: tuple[str, int],
    database: DbServer,
    registry_host: str,
    *,
    env: dict[str, str] | None = None,
    boot_seconds: float = 0.0,
) -> InstanceRuntime:
    """Instances (under ``root``) that reach the moto server at ``moto`` (the AWS CLI on them
    reads its Parameter Store), the db-server and the registry, as the benches run them."""
    host, port = moto
    return InstanceRuntime(
        root,
        bridges=[
            Bridge(host, port, host, port),
            Bridge.parse("=".join(database.bridge)),
            Bridge.parse(f"{registry_host}={registry_host}"),
        ],
        env={
            "AWS_ENDPOINT_URL": f"http://{host}:{port}",
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            **(env or {}),
        },
        boot_seconds=boot_seconds,
    )


def push_sample_app(
    registry: FakeRegistry, name: str, sha: str, version: str, *, private: bool = False
) -> str:
    """Publish ``name:sha`` as version ``version`` (``v1``, ``v2``) of the sample app."""
    return push_app_source(
        registry, name, sha, PROJECT_DIR / SAMPLE_APP / version, private=private, version=version
    )


def push_app_source(
    registry: FakeRegistry,
    name: str,
    tag: str,
    source: Path,
    *,
    private: bool = False,
    version: str | None = None,
) -> str:
    """Build ``source`` (a tree like the sample app's) into an image and push it as
    ``name:tag``; returns the index digest."""
    env = [f"GIT_SHA={tag}", *([f"APP_VERSION={version}"] if version else [])]
    image = ImageBuilder().app(source, env=env)
    return push_image(registry, name, tag, image, private=private)


def push_database_image(registry: FakeRegistry) -> str:
    """``postgres:16-alpine`` (``database: ephemeral``), where a Docker Hub mirror serves it."""
    return push_image(registry, "library/postgres", "16-alpine", ImageBuilder().postgres_image())
