"""Push storms through the real trigger path (issue 8): GitHub delivers faster than previews
boot, and the result must still be one preview per PR, at the newest sha, the newest PRs first.
"""

from __future__ import annotations

import itertools
import time
from typing import Any

import pytest

from local_stack.prefect_server import WORK_POOL
from tests.support.installation import REPO, Installation
from tests.support.moto_state import tags

# The installation the trigger and kill tests use: one server start per suite, not two. The
# storms are as large as a burst from one person gets; bench/ carries the load figures.
pytestmark = [pytest.mark.storm, pytest.mark.xdist_group("installation")]


def folded(run: dict[str, Any]) -> bool:
    """Cancelled before it started, or ended superseded before it took its PR's lock."""
    message = run["state"]["message"] or ""
    return run["state_name"] == "Superseded" and (
        run["state_type"] == "CANCELLED" or "before this run waited for the PR's lock" in message
    )


def test_eight_pushes_in_two_seconds_leave_one_preview_at_the_newest_sha(
    e2e: Installation,
) -> None:
    e2e.configure(max_previews=1)
    pr, shas = 50, [f"{n:02x}" * 20 for n in range(1, 9)]
    for index, sha in enumerate(shas):
        answer = e2e.deliver("opened" if index == 0 else "synchronize", pr, sha)
        assert answer.status_code == 200
        time.sleep(0.2)

    mine = e2e.wait_for_pr_runs("pr-preview/pr-preview", pr, len(shas), timeout=400)
    assert len(mine) == len(shas)
    by_sha = {run["parameters"]["head_sha"]: run for run in mine}
    newest = by_sha[shas[-1]]
    assert newest["state_name"] == "Completed", e2e.outcomes(mine)
    # A storm, not a queue: most pushes were overtaken before their run read the PR. Every
    # older run either ended superseded or finished before the next push was read.
    names = [by_sha[sha]["state_name"] for sha in shas[:-1]]
    assert set(names) <= {"Superseded", "Completed"}, e2e.outcomes(mine)
    assert names.count("Superseded") >= 3, names

    # Runs folded into a newer one (flows/coalesce.py) ended before the lock; the rest took it
    # one at a time.
    locked = [run for run in mine if not folded(run)]
    intervals = e2e.lock_intervals([run["id"] for run in locked])
    assert len(intervals) == len(locked)
    for (_, end), (start, _) in itertools.pairwise(intervals):
        assert end <= start, "two runs for one PR held its lock at the same time"

    [instance] = e2e.live_for(pr)
    assert tags(instance)["Sha"] == shas[-1]
    comments = e2e.github.comments[(REPO, pr)]
    assert len(comments) == 1
    assert shas[-1] in comments[0]["body"] and "Preview" in comments[0]["body"]
    assert "failed" not in comments[0]["body"]


def test_six_prs_opened_at_once_keep_the_three_most_recent(e2e: Installation) -> None:
    e2e.configure(max_previews=3)
    prs = list(range(60, 66))
    for pr in prs:
        assert e2e.deliver("opened", pr, f"{pr:02d}" * 20).status_code == 200
        time.sleep(0.2)
    # Four runs at a time, serialised on the fleet lock: the last may start minutes later.
    runs = [
        run
        for pr in prs
        for run in e2e.wait_for_pr_runs("pr-preview/pr-preview", pr, 1, timeout=400)
    ]
    live_prs = sorted(int(tags(i)["PR"]) for pr in prs for i in e2e.live_for(pr))
    assert live_prs == prs[-3:], e2e.outcomes(runs)


def test_a_backlog_of_pushes_folds_into_the_newest_without_starting_each(
    e2e: Installation,
) -> None:
    """Four pushes wait while the pool is paused; the pool then takes one run at a time. The
    first to start cancels the waiting runs of older pushes (and ends at once if it is one):
    two interpreters at most, not four, and the newest push deploys."""
    e2e.configure(max_previews=1)
    pr, shas = 52, [f"{n:02x}" * 20 for n in range(0x31, 0x35)]
    with e2e.stack.client() as http:
        pool = f"/work_pools/{WORK_POOL}"
        limit = http.get(pool).json()["concurrency_limit"]
        http.patch(pool, json={"is_paused": True, "concurrency_limit": 1}).raise_for_status()
        try:
            for index, sha in enumerate(shas):
                answer = e2e.deliver("opened" if index == 0 else "synchronize", pr, sha)
                assert answer.status_code == 200
            deadline = time.monotonic() + 60
            while len(e2e.runs_for("pr-preview/pr-preview", pr)) < len(shas):
                assert time.monotonic() < deadline, "the trigger made fewer runs than pushes"
                time.sleep(0.2)
            http.patch(pool, json={"is_paused": False}).raise_for_status()
            mine = e2e.wait_for_pr_runs("pr-preview/pr-preview", pr, len(shas), timeout=180)
        finally:
            http.patch(pool, json={"is_paused": False, "concurrency_limit": limit})

    by_sha = {run["parameters"]["head_sha"]: run for run in mine}
    head, others = by_sha[shas[-1]], [by_sha[sha] for sha in shas[:-1]]
    assert (head["state_type"], head["state_name"]) == ("COMPLETED", "Completed")
    assert all(run["state_name"] == "Superseded" for run in others), e2e.outcomes(mine)
    # The first run to start cancelled the waiting runs GitHub had left behind: the head's run
    # and at most one other ever started an interpreter.
    cancelled = [run for run in others if run["state_type"] == "CANCELLED"]
    assert len(cancelled) >= 2 and all(run["run_count"] == 0 for run in cancelled)
    assert sum(run["run_count"] for run in mine) <= 2, e2e.outcomes(mine)
    assert all(shas[-1][:12] in run["state"]["message"] for run in cancelled)
    [instance] = e2e.live_for(pr)
    assert tags(instance)["Sha"] == shas[-1]
    comments = e2e.github.comments[(REPO, pr)]
    assert len(comments) == 1 and shas[-1] in comments[0]["body"]
