"""Past one machine (issue 18): the Prefect server on PostgreSQL, two process workers on one
pool, and the PR lock, the capacity rule and the superseded guard still holding across them —
through the real trigger path (signed deliveries → receiver → events → triggers → runs).
"""

from __future__ import annotations

import itertools
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.installation import Installation, running_installation
from tests.support.moto_state import tags

pytestmark = [
    pytest.mark.server,
    pytest.mark.storm,
    pytest.mark.xdist_group("installation-postgres"),
]

PREVIEW = "pr-preview/pr-preview"


@pytest.fixture(scope="module")
def on_postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installation]:
    # Two runs at a time each (the pool's four): neither worker can take every run alone.
    with running_installation(
        tmp_path_factory.mktemp("postgres-installation"), db="postgres", workers=2, worker_limit=2
    ) as found:
        yield found


def submitted_by(home: Path, run_ids: list[str]) -> dict[str, set[str]]:
    """Which worker's log names each run as one it submitted."""
    logs = {path.name: path.read_text(errors="replace") for path in home.glob("worker-*.log")}
    return {
        name: {run_id for run_id in run_ids if re.search(rf"ubmitting flow run '{run_id}'", log)}
        for name, log in logs.items()
    }


def test_two_workers_on_postgres_keep_one_preview_per_pr_at_its_newest_sha(
    on_postgres: Installation,
) -> None:
    stack, database = on_postgres.stack, on_postgres.stack.database
    assert database is not None
    assert int(database.postgres.execute("SHOW server_version_num")) >= 140009
    assert "pg_trgm" in database.postgres.execute(
        "SELECT extname FROM pg_extension", database="prefect"
    )

    on_postgres.configure(max_previews=2)
    shas = {pr: [f"{pr:02d}{n:02d}" * 10 for n in range(2)] for pr in (90, 91)}
    for n, pr in itertools.product(range(2), (90, 91)):
        answer = on_postgres.deliver("opened" if n == 0 else "synchronize", pr, shas[pr][n])
        assert answer.status_code == 200, answer.text
        time.sleep(0.3)
    # The third PR: beyond max_previews, the least recently updated preview (90's) goes.
    assert on_postgres.deliver("opened", 92, "92" * 20).status_code == 200

    runs = {
        pr: on_postgres.wait_for_pr_runs(PREVIEW, pr, count, timeout=240)
        for pr, count in ((90, 2), (91, 2), (92, 1))
    }
    every = [run for mine in runs.values() for run in mine]
    assert len(every) == 5
    assert not [r for r in every if r["state_type"] in ("CRASHED", "FAILED")], on_postgres.outcomes(
        every
    )
    for pr in (90, 91):
        by_sha = {run["parameters"]["head_sha"]: run for run in runs[pr]}
        assert by_sha[shas[pr][-1]]["state_name"] == "Completed", on_postgres.outcomes(runs[pr])
        older = {by_sha[sha]["state_name"] for sha in shas[pr][:-1]}
        assert older <= {"Superseded", "Completed"}, on_postgres.outcomes(runs[pr])
        intervals = on_postgres.lock_intervals([run["id"] for run in runs[pr]])
        assert len(intervals) == 2
        for (_, end), (start, _) in itertools.pairwise(intervals):
            assert end <= start, f"two runs for PR {pr} held its lock at the same time"

    live = {pr: on_postgres.live_for(pr) for pr in (90, 91, 92)}
    assert {pr: len(found) for pr, found in live.items()} == {90: 0, 91: 1, 92: 1}, (
        on_postgres.outcomes(every)
    )
    assert tags(live[91][0])["Sha"] == shas[91][-1]
    assert tags(live[92][0])["Sha"] == "92" * 20

    # Both workers took runs, and the runs are rows in PostgreSQL, not in a SQLite file.
    took = submitted_by(stack.home, [run["id"] for run in every])
    assert len(took) == 2 and all(took.values()), took
    assert set().union(*took.values()) == {run["id"] for run in every}
    assert database.count("flow_run") >= 5
    assert not (stack.home / "prefect.db").exists()

    password = database.connection_url.split("@")[0].rsplit(":", 1)[1]
    for log in stack.home.rglob("*.log"):
        assert password not in log.read_text(errors="replace"), f"{log} shows the password"
