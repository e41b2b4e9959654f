"""Push storms through the real trigger path (issue 8): GitHub delivers faster than previews
boot, and the result must still be one preview per PR, at the newest sha, the newest PRs first.
"""

from __future__ import annotations

import itertools
import time

import pytest

from tests.fakes.installation import REPO, Installation
from tests.helpers import tags

pytestmark = [pytest.mark.storm, pytest.mark.xdist_group("installation")]


def test_twenty_pushes_in_ten_seconds_leave_one_preview_at_the_newest_sha(
    installation: Installation,
) -> None:
    installation.wait_idle()
    installation.configure(max_previews=1)
    pr, shas = 50, [f"{n:02x}" * 20 for n in range(1, 21)]
    before = len(installation.stack.flow_runs("pr-preview/pr-preview"))
    started = time.monotonic()
    for index, sha in enumerate(shas):
        answer = installation.deliver("opened" if index == 0 else "synchronize", pr, sha)
        assert answer.status_code == 200
        time.sleep(0.2)
    delivered_in = time.monotonic() - started

    runs = installation.stack.wait_for_runs("pr-preview/pr-preview", before + 20, timeout=400)
    mine = installation.runs_for("pr-preview/pr-preview", pr)
    assert len(mine) == 20
    by_sha = {run["parameters"]["head_sha"]: run for run in mine}
    newest = by_sha[shas[-1]]
    assert delivered_in < 10
    assert newest["state_name"] == "Completed", installation.outcomes(mine)
    # Every older run either ended superseded or finished before the next push was read.
    names = [by_sha[sha]["state_name"] for sha in shas[:-1]]
    assert set(names) <= {"Superseded", "Completed"}, installation.outcomes(mine)
    assert names.count("Superseded") >= 10, names

    intervals = installation.lock_intervals([run["id"] for run in mine])
    assert len(intervals) == 20
    for (_, end), (start, _) in itertools.pairwise(intervals):
        assert end <= start, "two runs for one PR held its lock at the same time"

    [instance] = installation.live_for(pr)
    assert tags(instance)["Sha"] == shas[-1]
    comments = installation.github.comments[(REPO, pr)]
    assert len(comments) == 1
    assert shas[-1] in comments[0]["body"] and "Preview" in comments[0]["body"]
    assert "failed" not in comments[0]["body"]
    assert len(runs) >= before + 20


def test_ten_prs_opened_at_once_keep_the_three_most_recent(installation: Installation) -> None:
    installation.wait_idle()
    installation.configure(max_previews=3)
    for instance in installation.aws.ec2.describe_instances()["Reservations"]:
        ids = [i["InstanceId"] for i in instance["Instances"] if i["State"]["Name"] == "running"]
        if ids:
            installation.aws.ec2.terminate_instances(InstanceIds=ids)
    prs = list(range(60, 70))
    before = len(installation.stack.flow_runs("pr-preview/pr-preview"))
    for pr in prs:
        assert installation.deliver("opened", pr, f"{pr:02d}" * 20).status_code == 200
        time.sleep(0.2)
    runs = installation.stack.wait_for_runs("pr-preview/pr-preview", before + 10, timeout=400)
    live_prs = sorted(int(tags(i)["PR"]) for pr in prs for i in installation.live_for(pr))
    assert live_prs == prs[-3:], installation.outcomes(runs[before:])
