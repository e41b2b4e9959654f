"""The sticky comment: what it says, that it is edited in place, and what it never says."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tasks.app.cost import HOURLY_PRICES, preview_cost
from tasks.app.user_data import LaunchSpec
from tasks.cloud.aws import AwsClients
from tasks.cloud.tags import TAG_SHUTDOWN_AT, format_time, parse_time
from tasks.config import PreviewConfig
from tasks.github.client import GitHub
from tasks.github.pull_request import (
    CommentResult,
    CommentState,
    PreviewState,
    flow_run_url,
    marker,
    render_comment,
    upsert_comment,
)
from tasks.steps.launch import launch_instance
from tasks.steps.report import PullRequestReport, post_comment
from tests.fakes.github import FakeGitHub
from tests.support import CANARIES, CANARY_DATABASE_URL, CANARY_DB_PASSWORD, CANARY_GHCR_TOKEN

REPO = "octo-org/app"
SHA = "9f8e7d6c5b4a39281706f5e4d3c2b1a098765432"
INSTANCE = "i-0abc1234def567890"
TUNNEL = (
    "aws ssm start-session --target i-0abc1234def567890 "
    "--document-name AWS-StartPortForwardingSession "
    """--parameters '{"portNumber":["8000"],"localPortNumber":["8000"]}' """
    "--region ap-northeast-1"
)


def status(state: PreviewState, **kw: Any) -> CommentState:
    values: dict[str, Any] = {
        "state": state,
        "repo": REPO,
        "pr_number": 42,
        "sha": SHA,
        "instance_id": INSTANCE,
        "region": "ap-northeast-1",
        "expires_at": datetime(2026, 11, 29, 15, 0, tzinfo=UTC),
        "flow_run_url": flow_run_url("https://prefect.example.com/", "0a1b-run"),
        **kw,
    }
    return CommentState(**values)


@pytest.fixture
def fake() -> FakeGitHub:
    fake = FakeGitHub()
    fake.add_pull(REPO, {"number": 42, "state": "open"})
    return fake


def github(fake: FakeGitHub, token: str | None = "good-token") -> GitHub:
    return GitHub(token, transport=fake.transport, sleep=lambda s: None)


def test_ready_comment_shows_everything_needed_to_open_the_preview() -> None:
    body = render_comment(status(PreviewState.READY))
    assert body.startswith("<!-- pr-preview:octo-org/app#42 -->\n")
    assert "✅" in body
    assert f"`{SHA}`" in body and f"`{INSTANCE}`" in body and "`ap-northeast-1`" in body
    assert "2026-11-29T15:00:00Z" in body
    assert TUNNEL in body
    assert "http://127.0.0.1:8000/docs" in body
    assert "[Prefect flow run](https://prefect.example.com/runs/flow-run/0a1b-run)" in body


def test_every_state_has_its_headline() -> None:
    expected = {
        PreviewState.LAUNCHING: "⏳",
        PreviewState.READY: "✅",
        PreviewState.UPDATED: "🔁",
        PreviewState.FAILED: "❌",
        PreviewState.TORN_DOWN: "🧹",
        PreviewState.EXPIRED: "⌛",
        PreviewState.REFUSED: "🚫",
    }
    for state, emoji in expected.items():
        body = render_comment(status(state))
        assert body.splitlines()[1].startswith(f"### {emoji}")
    torn_down = render_comment(status(PreviewState.TORN_DOWN))
    assert "start-session" not in torn_down and "Expires" not in torn_down


def test_refused_fork_says_why_and_offers_no_tunnel() -> None:
    reason = "pull request #42 comes from the fork mallory/app"
    body = render_comment(CommentState(PreviewState.REFUSED, REPO, 42, sha=SHA, detail=reason))
    assert reason in body and "start-session" not in body


def test_failed_comment_carries_the_diagnosis_without_secrets() -> None:
    diagnosis = (
        "docker login ghcr.io failed: unauthorized\n"
        f"GHCR_TOKEN={CANARY_GHCR_TOKEN}\n"
        f"DATABASE_URL={CANARY_DATABASE_URL}\n"
        "password authentication failed for Canary/DbPassw0rd\n"
        "``` a fence inside the log\n"
    )
    body = render_comment(
        status(PreviewState.FAILED, diagnosis=diagnosis),
        secrets=[CANARY_GHCR_TOKEN, CANARY_DB_PASSWORD],
    )
    assert "❌" in body and "docker login ghcr.io failed: unauthorized" in body
    assert "postgresql+asyncpg://app:****@172.31.39.125:5432/app" in body
    assert "````" in body  # the fence outgrows the backticks inside
    for canary in CANARIES:
        assert canary not in body


def test_url_passwords_and_github_tokens_are_masked_even_when_not_passed() -> None:
    body = render_comment(
        status(PreviewState.FAILED, diagnosis=f"{CANARY_DATABASE_URL} {CANARY_GHCR_TOKEN}")
    )
    for canary in CANARIES:
        assert canary not in body


def test_comment_is_created_once_then_edited(fake: FakeGitHub) -> None:
    client = github(fake)
    first = upsert_comment(client, REPO, 42, render_comment(status(PreviewState.LAUNCHING)))
    ready = render_comment(status(PreviewState.READY))
    second = upsert_comment(client, REPO, 42, ready)
    updated = render_comment(status(PreviewState.UPDATED, sha="1" * 40))
    third = upsert_comment(client, REPO, 42, updated)

    assert (first.action, second.action, third.action) == ("created", "updated", "updated")
    assert first.comment_id == second.comment_id == third.comment_id
    assert fake.comment_bodies(REPO, 42) == [updated]
    assert len(fake.sent("POST")) == 1
    patches = fake.sent("PATCH")
    assert [p.body for p in patches] == [{"body": ready}, {"body": updated}]
    assert all(p.path.endswith(f"/issues/comments/{first.comment_id}") for p in patches)


def test_our_comment_is_found_beyond_the_first_hundred(fake: FakeGitHub) -> None:
    for i in range(230):
        fake.add_comment(REPO, 42, f"review chatter {i}")
    fake.add_comment(REPO, 42, "<!-- pr-preview:octo-org/app#4 --> another PR's comment")
    ours = fake.add_comment(REPO, 42, f"{marker(REPO, 42)}\nold body", user="pr-preview[bot]")
    for i in range(20):
        fake.add_comment(REPO, 42, f"more chatter {i}")

    body = render_comment(status(PreviewState.READY))
    result = upsert_comment(github(fake), REPO, 42, body)

    assert result.action == "updated" and result.comment_id == ours
    assert fake.sent("POST") == []
    assert [r.params.get("page") for r in fake.sent("GET", "/comments")] == [None, "2", "3"]
    assert len(fake.comment_bodies(REPO, 42)) == 252
    assert fake.comment_bodies(REPO, 42)[231] == body


def test_without_a_token_upsert_skips_and_sends_nothing(fake: FakeGitHub) -> None:
    result = upsert_comment(github(fake, None), REPO, 42, "hello")
    assert result.action == "skipped" and result.body.startswith(marker(REPO, 42))
    assert fake.requests == []


def test_post_comment_with_a_token_posts_masked_body(fake: FakeGitHub) -> None:
    result = post_comment.fn(
        github(fake),
        status(PreviewState.FAILED, diagnosis=f"token {CANARY_GHCR_TOKEN}"),
        secrets=[CANARY_GHCR_TOKEN],
    )
    assert result.action == "created"
    [posted] = fake.comment_bodies(REPO, 42)
    assert posted == result.body and CANARY_GHCR_TOKEN not in posted


def _in_a_flow(client: GitHub, state: CommentState, secrets: list[str]) -> CommentResult:
    """Run the task the way the preview flow does."""
    from prefect import flow

    @flow(name="comment-test")
    def comment_flow() -> CommentResult:
        return post_comment(client, state, secrets=secrets)

    return comment_flow()


def _artifact_markdown(key: str) -> str:
    from prefect.artifacts import Artifact

    artifact: Any = Artifact.get(key)
    assert artifact is not None
    return str(artifact.data)


def test_no_token_publishes_an_artifact(prefect_server: None, fake: FakeGitHub) -> None:
    state = status(PreviewState.READY, pr_number=7)
    result = _in_a_flow(github(fake, None), state, [CANARY_GHCR_TOKEN])
    assert result.action == "skipped"
    assert fake.requests == []
    markdown = _artifact_markdown("pr-7-comment")
    assert markdown == result.body == render_comment(state)
    assert "<!-- pr-preview:octo-org/app#7 -->" in markdown and TUNNEL in markdown


def test_token_without_permission_falls_back_to_the_artifact(
    prefect_server: None, fake: FakeGitHub
) -> None:
    fake.tokens["read-only"] = frozenset({"pull_requests:read"})
    state = status(PreviewState.TORN_DOWN, pr_number=42)
    result = _in_a_flow(github(fake, "read-only"), state, [])
    assert result.action == "skipped"
    assert fake.comment_bodies(REPO, 42) == []
    assert "🧹" in _artifact_markdown("pr-42-comment")


# --- cost -----------------------------------------------------------------------------------

LAUNCHED = datetime(2026, 11, 28, 15, 0, tzinfo=UTC)


def test_ready_comment_shows_cost_so_far_and_at_expiry() -> None:
    cost = preview_cost(
        PreviewConfig(),
        LAUNCHED,
        expires_at=LAUNCHED + timedelta(hours=24),
        now=LAUNCHED + timedelta(hours=2, minutes=30),
    )
    body = render_comment(status(PreviewState.READY, cost=cost))
    line = "Cost so far $0.07 · at expiry $0.65 (t3.small at $0.0272/h)"
    assert (
        f"| Expires at | 2026-11-29T15:00:00Z (the instance terminates itself) |\n\n{line}\n"
        in body
    )


def test_cost_is_told_only_while_the_preview_serves() -> None:
    cost = preview_cost(PreviewConfig(), LAUNCHED, None, LAUNCHED + timedelta(hours=1))
    updated = render_comment(status(PreviewState.UPDATED, cost=cost))
    assert "\nCost so far $0.03 (t3.small at $0.0272/h)\n" in updated
    for state in (PreviewState.LAUNCHING, PreviewState.FAILED, PreviewState.TORN_DOWN):
        assert "Cost" not in render_comment(status(state, cost=cost))


def test_unknown_price_points_at_price_per_hour() -> None:
    config = PreviewConfig(region="eu-west-1", instance_type="t3.nano")
    cost = preview_cost(config, LAUNCHED, LAUNCHED + timedelta(hours=24), LAUNCHED)
    body = render_comment(status(PreviewState.READY, cost=cost))
    assert "\nCost unknown (no price for t3.nano in eu-west-1; set price_per_hour)\n" in body
    assert "$" not in body


@contextmanager
def moto_clock(monkeypatch: pytest.MonkeyPatch, moment: datetime) -> Iterator[None]:
    """Instances run inside this block get ``moment`` as their LaunchTime in moto."""
    import moto.ec2.models.instances as moto_instances

    with monkeypatch.context() as patch:
        patch.setattr(moto_instances, "utcnow", lambda: moment.replace(tzinfo=None))
        yield


def launched_preview(
    aws: AwsClients, config: PreviewConfig, shutdown_at: datetime
) -> dict[str, Any]:
    """A preview on moto, confirmed until ``shutdown_at``: what moto holds of it."""
    images = aws.ec2.describe_images(
        Owners=["amazon"], Filters=[{"Name": "name", "Values": ["al2023-ami-2023*-x86_64"]}]
    )["Images"]
    spec = LaunchSpec(REPO, 42, SHA)
    result = launch_instance(aws.ec2, config, spec, ami_id=images[0]["ImageId"])
    aws.ec2.create_tags(
        Resources=[result.instance_id],
        Tags=[{"Key": TAG_SHUTDOWN_AT, "Value": format_time(shutdown_at)}],
    )
    [reservation] = aws.ec2.describe_instances(InstanceIds=[result.instance_id])["Reservations"]
    instance: dict[str, Any] = reservation["Instances"][0]
    return instance


@pytest.mark.parametrize("state", [PreviewState.READY, PreviewState.UPDATED])
def test_tell_prices_the_instance_from_its_launch_time_on_moto(
    state: PreviewState,
    aws: AwsClients,
    config: PreviewConfig,
    fake: FakeGitHub,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    with moto_clock(monkeypatch, now - timedelta(hours=3)):
        instance = launched_preview(aws, config, now + timedelta(hours=21))
    launched = instance["LaunchTime"]
    shutdown_at = parse_time({t["Key"]: t["Value"] for t in instance["Tags"]}[TAG_SHUTDOWN_AT])
    assert shutdown_at is not None
    price = HOURLY_PRICES[(config.region, instance["InstanceType"])]
    so_far = (now - launched).total_seconds() / 3600 * price
    at_expiry = (shutdown_at - launched).total_seconds() / 3600 * price
    assert (round(so_far, 2), round(at_expiry, 2)) == (0.08, 0.65)  # 3 h and 24 h of t3.small

    report = PullRequestReport(github(fake), config, REPO, 42, SHA, None, clock=lambda: now)
    body = report.tell(
        state, instance_id=instance["InstanceId"], expires_at=shutdown_at, launched_at=launched
    )

    line = (
        f"Cost so far ${so_far:.2f} · at expiry ${at_expiry:.2f}"
        f" ({instance['InstanceType']} at ${price:.4f}/h)"
    )
    assert f"\n{line}\n" in body
    assert fake.comment_bodies(REPO, 42) == [body]


def test_tell_says_the_price_is_unknown_for_a_type_missing_from_the_table(
    aws: AwsClients, config: PreviewConfig, fake: FakeGitHub
) -> None:
    unpriced = config.model_copy(update={"instance_type": "c7i.large"})
    now = datetime.now(UTC)
    instance = launched_preview(aws, unpriced, now + timedelta(hours=24))
    assert instance["InstanceType"] == "c7i.large"

    report = PullRequestReport(github(fake), unpriced, REPO, 42, SHA, run_url=None)
    body = report.tell(
        PreviewState.READY,
        instance_id=instance["InstanceId"],
        expires_at=now + timedelta(hours=24),
        launched_at=instance["LaunchTime"],
    )

    assert f"Cost unknown (no price for c7i.large in {config.region}; set price_per_hour)" in body
    assert fake.comment_bodies(REPO, 42) == [body]
