"""The keep label and the expiry warning (README, "Keep and expiry warnings") on moto and the
fake GitHub: a pinned preview is neither swept nor warned and the sweeper keeps its expiry (tag
and timer) ahead; a preview about to expire is warned of once per expiry, and again after an
extend moves it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from flows.pin import pr_pin
from tasks.app.user_data import LaunchSpec
from tasks.cloud.aws import AwsClients
from tasks.cloud.instances import Preview, describe_preview
from tasks.cloud.tags import TAG_PINNED, TAG_SHUTDOWN_AT, TAG_WARNED_FOR, format_time, parse_time
from tasks.config import PreviewConfig
from tasks.github.client import GitHub
from tasks.github.pull_request import EXPIRY_MARKER, marker
from tasks.steps.command import extend_preview
from tasks.steps.launch import launch_instance
from tasks.steps.sweep import StickyExpiry, plan_sweep, renew_pinned, sweep, to_warn
from tests.fakes.github import FakeGitHub
from tests.support import REGION
from tests.support.moto_state import state_of
from tests.support.ssm import ScriptedInstances

REPO = "octo-org/app"
SHA = "1a2b3c4d5e6f7a8b9c0d1a2b3c4d5e6f7a8b9c0d"
STICKY = "### ✅ Preview ready\n\n| | |\n| --- | --- |\n| Instance | `i-0` |\n"


def launch(
    aws: AwsClients, config: PreviewConfig, pr: int, expires_in: timedelta, **tags: str
) -> str:
    """A preview as the flows leave it, expiring ``expires_in`` from now."""
    instance = launch_instance(aws.ec2, config, LaunchSpec(REPO, pr, SHA)).instance_id
    shutdown_at = format_time(datetime.now(UTC) + expires_in)
    extra = [{"Key": key, "Value": value} for key, value in tags.items()]
    aws.ec2.create_tags(
        Resources=[instance], Tags=[{"Key": TAG_SHUTDOWN_AT, "Value": shutdown_at}, *extra]
    )
    return instance


def preview_of(aws: AwsClients, instance_id: str) -> Preview:
    found = describe_preview(aws.ec2, instance_id)
    assert found is not None
    return found


def pull(number: int, *labels: str, state: str = "open", repo: str = REPO) -> dict[str, Any]:
    """A pull request as the REST API returns it, as far as the flows read it."""
    return {
        "number": number,
        "state": state,
        "head": {"sha": SHA, "ref": "feature", "repo": {"full_name": repo}},
        "base": {"repo": {"full_name": repo}},
        "labels": [{"name": name} for name in labels],
    }


def with_pull(fake: FakeGitHub, number: int, *labels: str) -> FakeGitHub:
    """The PR open on the fake GitHub, with the bot's sticky comment."""
    fake.add_pull(REPO, pull(number, *labels))
    fake.add_comment(REPO, number, f"{marker(REPO, number)}\n{STICKY}", fake.bot_login)
    return fake


def warnings(fake: FakeGitHub, number: int) -> list[str]:
    """The bot's comments on the PR besides the sticky one."""
    return [
        body
        for body in fake.comment_bodies(REPO, number)
        if not body.startswith(marker(REPO, number))
    ]


def sticky(fake: FakeGitHub, number: int) -> str:
    [body] = [b for b in fake.comment_bodies(REPO, number) if b.startswith(marker(REPO, number))]
    return body


def timeless(
    preview: Preview, now: datetime, shutdown_in: timedelta | None, **tags: str
) -> Preview:
    all_tags = {"Purpose": "pr-preview-singleton", "Repo": REPO, "PR": "7", **tags}
    if shutdown_in is not None:
        all_tags[TAG_SHUTDOWN_AT] = format_time(now + shutdown_in)
    return Preview(preview.instance_id, "running", now - timedelta(hours=1), all_tags)


# --- the decisions, pure


def test_a_pinned_preview_is_kept_past_its_expiry_but_not_past_its_pull_request() -> None:
    now = datetime(2026, 11, 28, 12, tzinfo=UTC)
    base = Preview("i-0000000000000001", "running", now, {})
    pinned_past = timeless(base, now, timedelta(hours=-3), **{TAG_PINNED: "true"})
    unpinned_past = timeless(base, now, timedelta(hours=-3), **{TAG_PINNED: "false"})
    [kept, ended] = plan_sweep([pinned_past, unpinned_past], now, ttl_hours=24)
    assert (kept.action, ended.action) == ("keep", "terminate")
    assert "pinned by the keep label" in kept.reason
    [closed] = plan_sweep([pinned_past], now, ttl_hours=24, pr_states={(REPO, 7): "closed"})
    assert closed.action == "terminate"
    # No shutdown-at at all, far too old to judge: pinned still keeps it.
    untagged = Preview("i-0000000000000002", "running", now - timedelta(days=9), pinned_past.tags)
    untagged.tags.pop(TAG_SHUTDOWN_AT)
    assert plan_sweep([untagged], now, ttl_hours=24)[0].action == "keep"


def test_who_is_warned_is_decided_by_the_tags() -> None:
    now = datetime(2026, 11, 28, 12, tzinfo=UTC)
    base = Preview("i-0000000000000001", "running", now, {})
    soon = timedelta(minutes=40)
    cases = {
        "due": (timeless(base, now, soon), True),
        "warned of an earlier expiry": (
            timeless(base, now, soon, **{TAG_WARNED_FOR: format_time(now)}),
            True,
        ),
        "warned of this one": (
            timeless(base, now, soon, **{TAG_WARNED_FOR: format_time(now + soon)}),
            False,
        ),
        "a claim given back": (timeless(base, now, soon, **{TAG_WARNED_FOR: "-"}), True),
        "later than the lead": (timeless(base, now, timedelta(minutes=61)), False),
        "pinned": (timeless(base, now, soon, **{TAG_PINNED: "true"}), False),
        "kept by an operator": (timeless(base, now, soon, **{"pr-preview:keep": "true"}), False),
        "expired": (timeless(base, now, timedelta(minutes=-1)), False),
        "no shutdown-at": (timeless(base, now, None), False),
    }
    for what, (preview, warned) in cases.items():
        decisions = plan_sweep([preview], now, ttl_hours=24)
        assert bool(to_warn(decisions, now, 60)) is warned, what
        assert to_warn(decisions, now, 0) == [], what  # 0: no warnings at all
    # Two previews of one PR (a replacement under way): the newest is the one warned of.
    older = Preview("i-0000000000000003", "running", now - timedelta(hours=2), cases["due"][0].tags)
    [newest] = to_warn(plan_sweep([cases["due"][0], older], now, ttl_hours=24), now, 60)
    assert newest.instance_id == base.instance_id


# --- the sweeper on moto and the fake GitHub


def sweeper(fake: FakeGitHub, transport: httpx.MockTransport | None = None) -> StickyExpiry:
    client = GitHub("good-token", transport=transport or fake.transport)
    return StickyExpiry(client, REGION, 72)


def test_the_warning_comes_once_per_expiry_and_again_after_an_extend(
    aws: AwsClients, config: PreviewConfig, scripted_ssm: ScriptedInstances
) -> None:
    fake = with_pull(FakeGitHub(), 7)
    instance = launch(aws, config, 7, timedelta(minutes=40))
    expires = preview_of(aws, instance).shutdown_at
    assert expires is not None

    first = sweep(aws.ec2, config, github=sweeper(fake))

    assert first.warned == [instance] and first.terminated == []
    [warning] = warnings(fake, 7)
    assert warning.startswith(f"⏰ This preview expires at {format_time(expires)}, in 4")
    assert "comment `/preview extend 8h` or run `pr-preview extend 7 8h`" in warning
    assert "(at most 72 hours from now)" in warning
    body = sticky(fake, 7)
    assert body.count(EXPIRY_MARKER) == 1 and f"> {warning}" in body
    assert body.index("### ✅ Preview ready") < body.index(EXPIRY_MARKER) < body.index("| | |")
    assert preview_of(aws, instance).tags[TAG_WARNED_FOR] == format_time(expires)

    # A second sweep in the same window, and one a restart later: nothing more.
    posts = len(fake.sent("POST", "/comments"))
    assert sweep(aws.ec2, config, github=sweeper(fake)).warned == []
    assert sweep(aws.ec2, config, github=sweeper(fake)).warned == []
    assert warnings(fake, 7) == [warning] and len(fake.sent("POST", "/comments")) == posts

    # Extended by 30 minutes with 40 left: an extend never shortens, nothing moves.
    extend_preview(aws, config, preview_of(aws, instance), 0.5)
    assert preview_of(aws, instance).shutdown_at == expires
    # By 50 minutes: a new expiry inside the hour, a new warning (one of each).
    extend_preview(aws, config, preview_of(aws, instance), 50 / 60)
    extended = preview_of(aws, instance).shutdown_at
    assert extended is not None and extended > expires
    assert scripted_ssm.count(r"shutdown -h \+50 ", instance) == 1  # the timer moved too
    assert sweep(aws.ec2, config, github=sweeper(fake)).warned == [instance]
    assert sweep(aws.ec2, config, github=sweeper(fake)).warned == []
    assert len(warnings(fake, 7)) == 2 and format_time(extended) in warnings(fake, 7)[1]
    body = sticky(fake, 7)
    assert body.count(EXPIRY_MARKER) == 1 and format_time(extended) in body
    assert format_time(expires) not in body

    # Extended by 8 hours: beyond the lead, nobody is warned.
    extend_preview(aws, config, preview_of(aws, instance), 8)
    assert sweep(aws.ec2, config, github=sweeper(fake)).warned == []
    assert len(warnings(fake, 7)) == 2


def test_a_warning_github_refuses_is_posted_by_the_next_sweep(
    aws: AwsClients, config: PreviewConfig
) -> None:
    fake = with_pull(FakeGitHub(), 7)
    instance = launch(aws, config, 7, timedelta(minutes=20))
    refused = httpx.Response(403, json={"message": "Resource not accessible by integration"})
    no_posts = httpx.MockTransport(
        lambda request: (
            refused
            if request.method == "POST" and request.url.path.endswith("/issues/7/comments")
            else fake.handle(request)
        )
    )

    assert sweep(aws.ec2, config, github=sweeper(fake, no_posts)).warned == []
    assert warnings(fake, 7) == []
    assert preview_of(aws, instance).tags[TAG_WARNED_FOR] == "-"  # the claim given back

    assert sweep(aws.ec2, config, github=sweeper(fake)).warned == [instance]
    assert len(warnings(fake, 7)) == 1 and sticky(fake, 7).count(EXPIRY_MARKER) == 1


def test_a_pinned_preview_is_neither_swept_nor_warned_and_its_expiry_is_kept_ahead(
    aws: AwsClients, config: PreviewConfig, scripted_ssm: ScriptedInstances
) -> None:
    fake = with_pull(FakeGitHub(), 7, "keep")
    fake.add_pull(REPO, pull(8, "keep"))
    fake.add_pull(REPO, pull(9, "keep", state="closed"))
    pinned = {TAG_PINNED: "true"}
    soon = launch(aws, config, 7, timedelta(minutes=20), **pinned)
    asleep = launch(aws, config, 8, timedelta(hours=-2), **pinned)
    aws.ec2.stop_instances(InstanceIds=[asleep])
    ahead = launch(aws, config, 10, timedelta(hours=20), **pinned)
    closed = launch(aws, config, 9, timedelta(hours=5), **pinned)
    now = datetime.now(UTC)

    report = sweep(aws.ec2, config, github=sweeper(fake), now=now)

    assert report.terminated == [closed] and report.warned == []
    assert warnings(fake, 7) == []
    assert {state_of(aws, i) for i in (soon, ahead)} == {"running"}
    assert state_of(aws, asleep) == "stopped"

    renewals = renew_pinned(aws, config, report.live, now)

    assert sorted(renewals.renewed) == sorted([soon, asleep]) and renewals.failed == {}
    for instance in (soon, asleep):
        moved = parse_time(preview_of(aws, instance).tags[TAG_SHUTDOWN_AT])
        assert moved is not None and abs(moved - (now + timedelta(hours=24))) < timedelta(seconds=5)
    # The running one's timer moved with its tag; the stopped one has none until it wakes.
    assert scripted_ssm.count(r"shutdown -h \+14[34][0-9] ", soon) == 1
    assert scripted_ssm.count(r"shutdown -h", asleep) == 0
    # Renewed already: the next sweep's renewal leaves them (and the one 20 h ahead) alone.
    again = sweep(aws.ec2, config, github=sweeper(fake), now=now)
    assert renew_pinned(aws, config, again.live, now).renewed == []


# --- the keep label's flow, on a Prefect server


@pytest.mark.usefixtures("prefect_server")
def test_the_keep_label_pins_the_preview_and_taking_it_off_restarts_the_ttl(
    aws: AwsClients,
    config: PreviewConfig,
    scripted_ssm: ScriptedInstances,
    github_api: FakeGitHub,
) -> None:
    github = github_api
    config.ttl_hours = 2  # the renewal's span: the TTL, here two hours
    with_pull(github, 7, "Keep")  # GitHub's label names are unique regardless of case
    instance = launch(aws, config, 7, timedelta(minutes=20))

    # Another label changes nothing and asks GitHub nothing.
    state = pr_pin(REPO, 7, "labeled", "bug", config=config, return_state=True)
    assert state.name == "Label Ignored" and github.requests == []

    # The keep label: pinned, and its expiry (20 minutes away) renewed, the timer first.
    done = pr_pin(REPO, 7, "labeled", "keep", config=config)
    after = preview_of(aws, instance)
    assert after.pinned and done.instance_ids == [instance]
    renewed = after.shutdown_at
    assert renewed is not None and renewed == done.shutdown_at
    assert abs(renewed - (datetime.now(UTC) + timedelta(hours=2))) < timedelta(minutes=1)
    assert scripted_ssm.count(r"shutdown -h \+1[12][0-9] ", instance) == 1
    body = sticky(github, 7)
    assert "📌 Pinned by the `keep` label" in body
    assert "never while the `keep` label is on" in body

    # A stale unlabeled event (the label is still on GitHub) changes nothing.
    state = pr_pin(REPO, 7, "unlabeled", "keep", config=config, return_state=True)
    assert state.name == "Still Labeled" and preview_of(aws, instance).pinned

    # The label comes off: unpinned, the TTL restarted from now (the timer first).
    github.pulls[(REPO, 7)]["labels"] = []
    aws.ec2.create_tags(
        Resources=[instance],
        Tags=[
            {"Key": TAG_SHUTDOWN_AT, "Value": format_time(datetime.now(UTC) + timedelta(hours=1))}
        ],
    )
    done = pr_pin(REPO, 7, "unlabeled", "keep", config=config)
    after = preview_of(aws, instance)
    assert not after.pinned and after.tags[TAG_PINNED] == "false"
    assert after.shutdown_at is not None and after.shutdown_at == done.shutdown_at
    assert abs(after.shutdown_at - (datetime.now(UTC) + timedelta(hours=2))) < timedelta(minutes=1)
    assert scripted_ssm.count(r"shutdown -h \+1[12][0-9] ", instance) == 2
    body = sticky(github, 7)
    assert "The `keep` label was removed" in body and format_time(after.shutdown_at) in body
