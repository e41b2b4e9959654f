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
    assert teardown["parameters"] == {"repo": REPO, "pr_number": 7}
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
