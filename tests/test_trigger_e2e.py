"""The self-hosted trigger path end to end, on a real local Prefect server.

signed GitHub delivery → receiver → Prefect event → deployment trigger → worker → flow run,
with moto (as a server) for AWS and a scripted instance answering over SSM.
"""

from __future__ import annotations

import time

import pytest

from deployments.local_stack import pull_request_payload, signed_delivery
from tests.fakes.installation import REPO, Installation

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("installation")]

SHAS = [f"{n:x}" * 40 for n in range(1, 6)]


def test_signed_delivery_starts_the_preview_with_the_event_parameters(
    installation: Installation,
) -> None:
    answer = installation.deliver("opened", 7, SHAS[0])
    assert answer.status_code == 200
    [run] = installation.stack.wait_for_runs("pr-preview/pr-preview", 1, timeout=120)
    assert run["state_type"] == "COMPLETED", run["state"]["message"]
    assert run["name"] == f"pr-7-{SHAS[0][:7]}"
    assert run["parameters"] == {
        "repo": REPO,
        "pr_number": 7,
        "head_sha": SHAS[0],
        "action": "opened",
        "head_repo": REPO,
    }
    [instance] = installation.live_for(7)
    assert {t["Key"]: t["Value"] for t in instance["Tags"]}["Sha"] == SHAS[0]

    closed = installation.deliver("closed", 7, SHAS[0], merged=True)
    assert closed.status_code == 200
    [teardown] = installation.stack.wait_for_runs("pr-teardown/pr-teardown", 1, timeout=120)
    assert teardown["state_type"] == "COMPLETED"
    assert teardown["parameters"] == {"repo": REPO, "pr_number": 7}
    assert installation.live_for(7) == []


def test_a_bad_signature_starts_nothing(installation: Installation) -> None:
    before = len(installation.stack.flow_runs("pr-preview/pr-preview"))
    payload = pull_request_payload("opened", REPO, 8, SHAS[1])
    forged = signed_delivery(installation.receiver, "not-the-secret", "pull_request", payload)
    assert forged.status_code == 401
    time.sleep(3)  # a trigger fires within ~0.2 s of an event
    assert len(installation.stack.flow_runs("pr-preview/pr-preview")) == before


def test_two_rapid_pushes_for_one_pr_do_not_overlap(installation: Installation) -> None:
    installation.wait_idle()
    before = len(installation.stack.flow_runs("pr-preview/pr-preview"))
    assert installation.deliver("synchronize", 9, SHAS[2]).status_code == 200
    assert installation.deliver("synchronize", 9, SHAS[3]).status_code == 200
    runs = installation.stack.wait_for_runs("pr-preview/pr-preview", before + 2, timeout=180)
    mine = [run for run in runs if run["parameters"].get("pr_number") == 9]
    assert [run["state_type"] for run in mine] == ["COMPLETED", "COMPLETED"], installation.outcomes(
        mine
    )
    (_, first_end), (second_start, _) = installation.lock_intervals([run["id"] for run in mine])
    assert first_end <= second_start, "two runs for one PR held its lock at the same time"
    assert len(installation.live_for(9)) == 1
