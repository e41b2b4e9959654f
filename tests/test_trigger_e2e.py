"""The self-hosted trigger path end to end, on a real local Prefect server.

signed GitHub delivery → receiver → Prefect event → deployment trigger → worker → flow run,
with moto (as a server) for AWS and a scripted instance answering over SSM.
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta

import pytest

from local_stack.prefect_server import pull_request_payload, signed_delivery
from tests.support.installation import REPO, Installation
from tests.support.moto_state import tags

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("installation")]

SHAS = [f"{n:x}" * 40 for n in range(1, 6)]


def test_signed_delivery_starts_the_preview_with_the_event_parameters(
    e2e: Installation,
) -> None:
    answer = e2e.deliver("opened", 7, SHAS[0])
    assert answer.status_code == 200
    [run] = e2e.wait_for_pr_runs("pr-preview/pr-preview", 7, 1, timeout=120)
    assert run["state_type"] == "COMPLETED", run["state"]["message"]
    assert run["name"] == f"pr-7-{SHAS[0][:7]}"
    requested_at = run["parameters"].pop("requested_at")
    assert run["parameters"] == {
        "repo": REPO,
        "pr_number": 7,
        "head_sha": SHAS[0],
        "action": "opened",
        "head_repo": REPO,
        "label": None,
        "labels": [],
        "branch": "feature",
        "draft": False,
    }
    # When the server received the event: before the run was even created.
    received = datetime.fromisoformat(requested_at.replace(" ", "T"))
    assert received <= datetime.fromisoformat(run["created"]) <= received + timedelta(seconds=60)
    [instance] = e2e.live_for(7)
    assert {t["Key"]: t["Value"] for t in instance["Tags"]}["Sha"] == SHAS[0]

    closed = e2e.deliver("closed", 7, SHAS[0], merged=True)
    assert closed.status_code == 200
    [teardown] = e2e.wait_for_pr_runs("pr-teardown/pr-teardown", 7, 1, timeout=120)
    assert teardown["state_type"] == "COMPLETED"
    assert teardown["parameters"] == {
        "repo": REPO,
        "pr_number": 7,
        "action": "closed",
        "label": None,
    }
    assert e2e.live_for(7) == []


def test_a_bad_signature_starts_nothing(e2e: Installation) -> None:
    payload = pull_request_payload("opened", REPO, 8, SHAS[1])
    forged = signed_delivery(e2e.receiver, "not-the-secret", "pull_request", payload)
    assert forged.status_code == 401
    time.sleep(3)  # a trigger fires within ~0.2 s of an event
    assert e2e.runs_for("pr-preview/pr-preview", 8) == []


def test_two_rapid_pushes_for_one_pr_do_not_overlap(e2e: Installation) -> None:
    assert e2e.deliver("synchronize", 9, SHAS[2]).status_code == 200
    assert e2e.deliver("synchronize", 9, SHAS[3]).status_code == 200
    mine = e2e.wait_for_pr_runs("pr-preview/pr-preview", 9, 2, timeout=180)
    assert [run["state_type"] for run in mine] == ["COMPLETED", "COMPLETED"], e2e.outcomes(mine)
    (_, first_end), (second_start, _) = e2e.lock_intervals([run["id"] for run in mine])
    assert first_end <= second_start, "two runs for one PR held its lock at the same time"
    assert len(e2e.live_for(9)) == 1


def test_label_mode_previews_a_pull_request_only_while_it_carries_the_label(
    e2e: Installation,
) -> None:
    e2e.configure(trigger_mode="label")
    pr, first, second, third = 11, "6" * 40, "7" * 40, "8" * 40
    previews = "pr-preview/pr-preview"

    # Another label asks for nothing; ours launches. (Sent together: the first takes no lock.)
    e2e.deliver("labeled", pr, first, labels=("bug",), label="bug")
    e2e.deliver("labeled", pr, first, labels=("bug", "preview"), label="preview")
    runs = {run["name"]: run for run in e2e.wait_for_pr_runs(previews, pr, 2)}
    ignored, launched = runs[f"pr-{pr}-{first[:7]}-label-ignored"], runs[f"pr-{pr}-{first[:7]}"]
    assert ignored["state_name"] == "Label Ignored"
    assert launched["state_type"] == "COMPLETED", e2e.outcomes([launched])
    [instance] = e2e.live_for(pr)
    assert tags(instance)["Sha"] == first

    # A push to the labelled PR is deployed in place.
    e2e.deliver("synchronize", pr, second, labels=("bug", "preview"))
    updated = e2e.wait_for_pr_runs(previews, pr, 3)[-1]
    assert updated["state_type"] == "COMPLETED", e2e.outcomes([updated])
    [same] = e2e.live_for(pr)
    assert (same["InstanceId"], tags(same)["Sha"]) == (instance["InstanceId"], second)

    # Removing the label tears the preview down (the comment says why); a push to the
    # unlabelled PR launches nothing and says so in its run's name.
    e2e.deliver("unlabeled", pr, second, labels=("bug",), label="preview")
    e2e.deliver("synchronize", pr, third, labels=("bug",))
    [teardown] = e2e.wait_for_pr_runs("pr-teardown/pr-teardown", pr, 1)
    assert teardown["state_type"] == "COMPLETED", e2e.outcomes([teardown])
    assert e2e.live_for(pr) == []
    [comment] = e2e.github.comment_bodies(REPO, pr)
    assert "Preview torn down" in comment and "`preview` label was removed" in comment
    skipped = e2e.wait_for_pr_runs(previews, pr, 4)[-1]
    assert (skipped["state_name"], skipped["name"]) == (
        "Not Labeled",
        f"pr-{pr}-{third[:7]}-not-labeled",
    )
    assert e2e.live_for(pr) == []
