"""``/preview`` commands end to end on the shared installation: a comment's delivery → receiver
→ Prefect event → pr-command run → the preview in moto and the pull request in the fake GitHub.

One test drives the commands in sequence on one pull request: each delivery costs a run; one
more has a fork's pull request wait for, and get, a writer's approval.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from local_stack.prefect_server import issue_comment_payload, signed_delivery
from tasks.cloud.tags import TAG_SHUTDOWN_AT, TAG_SLEEP_STATE, TAG_SLEPT_SECONDS, parse_time
from tasks.github.pull_request import marker
from tasks.run.approvals import approval_name
from tests.support.installation import REPO, SECRET, Installation
from tests.support.moto_state import live, tags

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("installation")]

COMMANDS = "pr-command/pr-command"
PR = 31
SHA = "c" * 40


def comment(
    e2e: Installation, body: str, login: str, *, bot: bool = False, pr: int = PR
) -> tuple[httpx.Response, int]:
    """What GitHub does when ``login`` comments ``body`` on the PR: the comment exists, a
    delivery is sent (its own comment id and time: every delivery's body differs)."""
    comment_id = e2e.github.add_comment(REPO, pr, body, user=login)
    payload = issue_comment_payload(REPO, pr, comment_id, body, login, bot=bot)
    return signed_delivery(e2e.receiver, SECRET, "issue_comment", payload), comment_id


def command(
    e2e: Installation, body: str, login: str, done: int, *, pr: int = PR
) -> tuple[dict[str, Any], int]:
    """Comment ``body`` as ``login`` and wait for the PR's ``done``-th command run."""
    answer, comment_id = comment(e2e, body, login, pr=pr)
    assert answer.status_code == 200, answer.text
    runs = e2e.wait_for_pr_runs(COMMANDS, pr, done, timeout=180)
    [run] = [r for r in runs if r["parameters"]["comment_id"] == comment_id]
    return run, comment_id


def sticky(e2e: Installation) -> str:
    [body] = [b for b in e2e.github.comment_bodies(REPO, PR) if b.startswith(marker(REPO, PR))]
    return body


def replies(e2e: Installation) -> list[str]:
    """What the bot wrote besides the sticky comment (and the command the test wrote as it)."""
    return [
        c["body"]
        for c in e2e.github.comments[(REPO.lower(), PR)]
        if c["user"]["login"] == e2e.github.bot_login
        and not c["body"].startswith(("<!--", "/preview"))
    ]


def ours(e2e: Installation) -> list[dict[str, Any]]:
    return [i for i in live(e2e.aws) if tags(i).get("PR") == str(PR)]


def test_writers_command_the_preview_and_nobody_else_does(e2e: Installation) -> None:
    e2e.github.add_collaborator(REPO, "wanda", "write")
    e2e.github.add_collaborator(REPO, "rhea", "read")
    assert e2e.deliver("opened", PR, SHA).status_code == 200
    [launched] = e2e.wait_for_pr_runs("pr-preview/pr-preview", PR, 1, timeout=180)
    assert launched["state_type"] == "COMPLETED", e2e.outcomes([launched])
    [instance] = ours(e2e)
    first = instance["InstanceId"]

    # A reader (whatever the comment's author_association says) changes nothing.
    run, comment_id = command(e2e, "/preview destroy", "rhea", 1)
    assert run["state_name"] == "Not Permitted", e2e.outcomes([run])
    assert [i["InstanceId"] for i in ours(e2e)] == [first]
    assert e2e.github.reactions(REPO, comment_id) == [("confused", e2e.github.bot_login)]
    [refusal] = replies(e2e)
    assert refusal.startswith("@rhea only people with write access to octo-org/hello-api")
    assert "`read`" in refusal

    # Bots, our own App among them, are not even emitted.
    for login, bot in (("renovate[bot]", True), ("dependabot", True), ("pr-preview[bot]", False)):
        ignored, _ = comment(e2e, "/preview destroy", login, bot=bot)
        assert (ignored.status_code, ignored.json()["outcome"]) == (202, "ignored")

    # A writer stops the preview; the comment is acknowledged and the sticky comment says so.
    run, comment_id = command(e2e, "/preview stop", "wanda", 2)
    assert run["state_type"] == "COMPLETED", e2e.outcomes([run])
    assert e2e.github.reactions(REPO, comment_id) == [("eyes", e2e.github.bot_login)]
    [stopped] = ours(e2e)
    assert (stopped["InstanceId"], stopped["State"]["Name"]) == (first, "stopped")
    assert tags(stopped)[TAG_SLEEP_STATE] == "manual"  # asleep: its stopped hours cost its disk
    assert "Preview stopped" in sticky(e2e) and "`/preview stop` by @wanda" in sticky(e2e)

    # … starts it again …
    run, _ = command(e2e, "/preview start", "wanda", 3)
    assert run["state_type"] == "COMPLETED", e2e.outcomes([run])
    [started] = ours(e2e)
    assert (started["InstanceId"], started["State"]["Name"]) == (first, "running")
    assert TAG_SLEEP_STATE not in tags(started) and TAG_SLEPT_SECONDS in tags(started)
    assert "Preview ready" in sticky(e2e) and "Started" in sticky(e2e)

    # … extends it: shutdown-at moves to 48 h from now (past the 24 h it had) …
    run, _ = command(e2e, "/preview extend 48h", "wanda", 4)
    assert run["state_type"] == "COMPLETED", e2e.outcomes([run])
    shutdown_at = parse_time(tags(ours(e2e)[0])[TAG_SHUTDOWN_AT])
    assert shutdown_at is not None
    expected = datetime.now(UTC) + timedelta(hours=48)
    assert abs(shutdown_at - expected) < timedelta(minutes=5)
    assert "Extended: `/preview extend 48h` by @wanda" in sticky(e2e)

    # … but not past max_ttl_hours, and an unknown command gets the list of commands.
    run, _ = command(e2e, "/preview extend 999h", "wanda", 5)
    assert run["state_name"] == "Bad Command", e2e.outcomes([run])
    assert parse_time(tags(ours(e2e)[0])[TAG_SHUTDOWN_AT]) == shutdown_at
    assert "at most 72 hours" in replies(e2e)[-1] and "`/preview redeploy`" in replies(e2e)[-1]
    run, _ = command(e2e, "/preview launch; rm -rf /", "wanda", 6)
    assert run["state_name"] == "Bad Command", e2e.outcomes([run])
    assert "`launch;` is not a command" in replies(e2e)[-1]

    # Redeploy: the PR's head launched afresh on a new instance.
    run, _ = command(e2e, "/preview redeploy", "wanda", 7)
    assert run["state_type"] == "COMPLETED", e2e.outcomes([run])
    [again] = ours(e2e)
    assert again["InstanceId"] != first and tags(again)["Sha"] == SHA
    assert "Preview ready" in sticky(e2e)

    # Destroy: nothing of the PR is left running.
    run, _ = command(e2e, "/preview destroy", "wanda", 8)
    assert run["state_type"] == "COMPLETED", e2e.outcomes([run])
    assert ours(e2e) == []
    assert "Destroyed: `/preview destroy` by @wanda" in sticky(e2e)
    assert len(replies(e2e)) == 3  # the refusal and the two lists of commands


def test_a_forks_pull_request_waits_until_a_writer_approves_its_commit(e2e: Installation) -> None:
    pr, fork = 32, "outsider/hello-api"
    e2e.configure(fork_previews="approve")
    e2e.github.add_collaborator(REPO, "wanda", "write")
    try:
        assert e2e.deliver("opened", pr, SHA, head_repo=fork).status_code == 200
        [waiting] = e2e.wait_for_pr_runs("pr-preview/pr-preview", pr, 1, timeout=180)
        assert waiting["state_name"] == "Awaiting Approval", e2e.outcomes([waiting])
        assert e2e.live_for(pr) == []
        assert f"`/preview approve {SHA}`" in e2e.github.comment_bodies(REPO, pr)[0]

        run, _ = command(e2e, f"/preview approve {SHA}", "wanda", 1, pr=pr)
        assert run["state_type"] == "COMPLETED", e2e.outcomes([run])
        [instance] = e2e.live_for(pr)
        assert tags(instance)["Sha"] == SHA
    finally:
        with e2e.stack.client() as http:
            http.delete(f"/variables/name/{approval_name(REPO, pr)}")
