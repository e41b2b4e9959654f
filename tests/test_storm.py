"""Push storms through the real trigger path (issue 8): GitHub delivers faster than previews
boot, and the result must still be one preview per PR, at the newest sha, the newest PRs first.
"""

from __future__ import annotations

import itertools
import time

import pytest

from tests.support.installation import REPO, Installation
from tests.support.moto_state import tags

# The installation the trigger and kill tests use: one server start per suite, not two. The
# storms are as large as a burst from one person gets; bench/ carries the load figures.
pytestmark = [pytest.mark.storm, pytest.mark.xdist_group("installation")]


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

    intervals = e2e.lock_intervals([run["id"] for run in mine])
    assert len(intervals) == len(shas)
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
