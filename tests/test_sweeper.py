"""The TTL sweeper (issue 5) on moto: only the right instances end up terminated."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import pytest
from botocore.awsrequest import AWSResponse

from flows.sweeper import ttl_sweeper
from tasks.cloud.aws import AwsClients
from tasks.cloud.db_rules import DB_RULE_MARKER, db_rule_description
from tasks.cloud.instances import Preview
from tasks.cloud.tags import TAG_KEEP, format_time
from tasks.config import PreviewConfig
from tasks.github.client import GitHub
from tasks.steps.sweep import TERMINATED_EVENT, StickyExpiry, github_or_none, plan_sweep, sweep
from tests.fakes.github import FakeGitHub

AMI = "ami-0123456789abcdef0"
PURPOSE = "pr-preview-singleton"
REPO = "octo-org/app"
GONE = ("shutting-down", "terminated")


# --- arranging a fleet


@contextmanager
def launched_at(monkeypatch: pytest.MonkeyPatch, moment: datetime) -> Iterator[None]:
    """Instances run inside this block get ``moment`` as their LaunchTime in moto."""
    import moto.ec2.models.instances as moto_instances

    with monkeypatch.context() as patch:
        patch.setattr(moto_instances, "utcnow", lambda: moment.replace(tzinfo=None))
        yield


def run(ec2: Any, count: int = 1, **tags: str) -> list[str]:
    """``count`` instances with ``tags`` in one RunInstances call."""
    params: dict[str, Any] = {"ImageId": AMI, "MinCount": count, "MaxCount": count}
    if tags:
        params["TagSpecifications"] = [
            {"ResourceType": "instance", "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}
        ]
    return [instance["InstanceId"] for instance in ec2.run_instances(**params)["Instances"]]


def preview_tags(
    pr: int, shutdown_at: datetime | str | None, *, purpose: str = PURPOSE, **extra: str
) -> dict[str, str]:
    tags = {"Purpose": purpose, "Repo": REPO, "PR": str(pr), "Sha": f"{pr:04d}" + "a" * 36}
    if isinstance(shutdown_at, datetime):
        tags["shutdown-at"] = format_time(shutdown_at)
    elif shutdown_at is not None:
        tags["shutdown-at"] = shutdown_at
    return {**tags, **extra}


def states(ec2: Any, ids: list[str] | None = None) -> dict[str, str]:
    paginator = ec2.get_paginator("describe_instances")
    pages = paginator.paginate(InstanceIds=ids) if ids else paginator.paginate()
    return {
        instance["InstanceId"]: instance["State"]["Name"]
        for page in pages
        for reservation in page["Reservations"]
        for instance in reservation["Instances"]
    }


def live_ids(ec2: Any) -> list[str]:
    """Every instance, ours or not, in pending/running/stopping/stopped."""
    live = {"Name": "instance-state-name", "Values": ["pending", "running", "stopping", "stopped"]}
    pages = ec2.get_paginator("describe_instances").paginate(Filters=[live])
    return [i["InstanceId"] for page in pages for r in page["Reservations"] for i in r["Instances"]]


@dataclass
class FakePulls:
    """The sweeper's PullRequests protocol, recording every lookup and expiry mark."""

    pulls: dict[tuple[str, int], str]
    enabled: bool = True
    lookups: list[tuple[str, int]] = field(default_factory=list)
    expired: list[tuple[str, int, str | None, str]] = field(default_factory=list)

    def pull_state(self, repo: str, number: int) -> str | None:
        self.lookups.append((repo, number))
        return self.pulls.get((repo, number))

    def mark_expired(
        self, repo: str, number: int, *, reason: str, sha: str | None, instance_id: str
    ) -> None:
        self.expired.append((repo, number, sha, instance_id))


class CallCounter(dict[str, int]):
    """API calls per operation, counted by a botocore ``before-call`` handler."""

    def __init__(self, client: Any) -> None:
        super().__init__()
        client.meta.events.register_first("before-call.ec2", self._count)

    def _count(self, model: Any, **_: Any) -> None:
        self[model.name] = self.get(model.name, 0) + 1


@dataclass
class Events:
    sent: list[dict[str, Any]] = field(default_factory=list)

    def __call__(self, **event: Any) -> None:
        self.sent.append(event)


# --- the plan, pure


def preview(
    shutdown_at: str | None,
    *,
    age_hours: float = 1,
    now: datetime,
    pr: int = 1,
    tags: dict[str, str] | None = None,
) -> Preview:
    tags = tags or {}
    all_tags = {"Purpose": PURPOSE, "Repo": REPO, "PR": str(pr), **tags}
    if shutdown_at is not None:
        all_tags["shutdown-at"] = shutdown_at
    return Preview(
        instance_id=f"i-{len(tags)}{pr:08d}{int(age_hours):04d}",
        state="running",
        launch_time=now - timedelta(hours=age_hours),
        tags=all_tags,
    )


NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("shutdown_at", "age", "extra", "pr_state", "action", "reason"),
    [
        ("2026-11-28T11:00:00Z", 25, {}, None, "terminate", "shutdown-at passed 1h00m ago"),
        ("2026-11-28T12:00:00Z", 24, {}, None, "terminate", "shutdown-at passed"),
        ("2026-11-28T15:30:00Z", 1, {}, None, "keep", "shutdown-at in 3h30m"),
        ("2026-11-28T15:30:00Z", 1, {}, "closed", "terminate", "octo-org/app#1 is closed"),
        ("2026-11-28T15:30:00Z", 1, {}, "open", "keep", "shutdown-at in"),
        ("2026-11-28T11:00:00Z", 99, {TAG_KEEP: "true"}, "closed", "keep", "pr-preview:keep"),
        ("2026-11-28T11:00:00Z", 99, {TAG_KEEP: "TRUE"}, None, "keep", "pr-preview:keep"),
        ("2026-11-28T11:00:00Z", 99, {TAG_KEEP: "false"}, None, "terminate", "passed"),
        ("tomorrow", 49, {}, None, "terminate", "unparsable shutdown-at 'tomorrow'; launched 49h"),
        ("tomorrow", 47, {}, None, "keep", "unparsable shutdown-at 'tomorrow'; launched 47h"),
        (None, 49, {}, None, "terminate", "no shutdown-at tag; launched 49h00m ago, over"),
        (None, 2, {}, None, "keep", "no shutdown-at tag; launched 2h00m ago, under max age"),
        (None, 2, {}, "closed", "terminate", "is closed on GitHub"),
        ("2026-11-28T12:30:00+09:00", 1, {}, None, "terminate", "passed 8h30m ago"),
    ],
)
def test_plan_sweep_decides_by_tags_age_and_pr_state(
    shutdown_at: str | None,
    age: float,
    extra: dict[str, str],
    pr_state: str | None,
    action: str,
    reason: str,
) -> None:
    candidate = preview(shutdown_at, age_hours=age, now=NOW, tags=extra)
    states = {(REPO, 1): pr_state} if pr_state else {}

    [decision] = plan_sweep([candidate], NOW, ttl_hours=24, pr_states=states)

    assert (decision.action, decision.instance_id) == (action, candidate.instance_id)
    assert reason in decision.reason


def test_plan_sweep_max_age_defaults_to_twice_the_ttl_and_can_be_set() -> None:
    old = preview("garbage", age_hours=5, now=NOW)
    assert plan_sweep([old], NOW, ttl_hours=2)[0].action == "terminate"
    assert plan_sweep([old], NOW, ttl_hours=3)[0].action == "keep"
    assert plan_sweep([old], NOW, ttl_hours=3, max_age_hours=4)[0].action == "terminate"


# --- the sweep on moto


def test_mixed_fleet_only_the_right_instances_go(
    aws: AwsClients, config: PreviewConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    ec2 = aws.ec2
    now = datetime.now(UTC)
    past, future = now - timedelta(hours=1), now + timedelta(hours=5)
    # 101 expired in 101 reservations: moto pages DescribeInstances at 100 reservations. The
    # bulk carries only the two tags the sweep needs (moto's cost grows with tags × instances).
    # Batches of 100 here; of AWS's 1,000 in test_terminate (the same call, 1,200 instances).
    expired = []
    for _ in range(101):
        expired += run(ec2, 1, **{"Purpose": PURPOSE, "shutdown-at": format_time(past)})
    expired += run(ec2, 1, **preview_tags(2, past))
    fresh = run(ec2, 1, **preview_tags(3, future))
    keep = run(ec2, 1, **preview_tags(4, past, **{TAG_KEEP: "true"}))
    keep_closed = run(ec2, 1, **preview_tags(9, future, **{TAG_KEEP: "true"}))
    foreign = run(ec2, 2) + run(ec2, 1, **{"shutdown-at": format_time(past), "PR": "5"})
    other_purpose = run(ec2, 1, **preview_tags(6, past, purpose="someone-else"))
    young_unparsable = run(ec2, 1, **preview_tags(10, "soon"))
    with launched_at(monkeypatch, now - timedelta(hours=72)):
        old_unparsable = run(ec2, 1, **preview_tags(11, "next tuesday"))
        old_untagged = run(ec2, 1, **preview_tags(12, None))
    closed = run(ec2, 2, **preview_tags(7, future))
    still_open = run(ec2, 1, **preview_tags(8, future))
    github = FakePulls({(REPO, 7): "closed", (REPO, 8): "open", (REPO, 9): "closed"})
    events = Events()
    calls = CallCounter(ec2)

    report = sweep(ec2, config, github=github, emit=events, now=now, batch_size=100)

    assert calls["DescribeInstances"] == 2  # 113 reservations: two pages
    assert calls["TerminateInstances"] == 2  # 107 ids: ⌈107/100⌉ batches

    gone = expired + old_unparsable + old_untagged + closed
    stay = fresh + keep + keep_closed + foreign + other_purpose + young_unparsable + still_open
    assert set(live_ids(ec2)) == set(stay)  # everything else is shutting-down or terminated
    assert set(states(ec2, gone[-10:]).values()) <= set(GONE)
    assert sorted(report.terminated) == sorted(gone)
    assert report.terminate_calls == 2
    assert report.counts()["seen"] == len(gone) + 1 + 2 + 1 + 1  # fresh, keep×2, young, open
    # One lookup per PR, only for PRs the tags alone would keep; none for keep-tagged ones.
    assert sorted(github.lookups) == [(REPO, 3), (REPO, 7), (REPO, 8), (REPO, 10)]
    reasons = {d.instance_id: d.reason for d in report.decisions}
    assert "unparsable shutdown-at 'next tuesday'" in reasons[old_unparsable[0]]
    assert "no shutdown-at tag" in reasons[old_untagged[0]]
    assert "closed on GitHub" in reasons[closed[0]]
    assert "unparsable shutdown-at 'soon'" in reasons[young_unparsable[0]]
    # Events: one per terminated instance, related to its PR.
    assert len(events.sent) == len(gone)
    by_id = {e["resource"]["prefect.resource.id"]: e for e in events.sent}
    event = by_id[f"pr-preview.instance.{closed[0]}"]
    assert event["event"] == TERMINATED_EVENT
    [related] = event["related"]
    assert related["prefect.resource.id"] == f"github.pr.{REPO}/7"
    assert related["prefect.resource.role"] == "pull-request"
    assert event["payload"]["pr_number"] == 7 and "closed on GitHub" in event["payload"]["reason"]
    # The sticky comment of every PR left without a preview says "expired"; PR 8 keeps its own.
    assert sorted((repo, n) for repo, n, _, _ in github.expired) == [
        (REPO, 2),
        (REPO, 7),
        (REPO, 11),
        (REPO, 12),
    ]


def test_dry_run_changes_nothing(aws: AwsClients, config: PreviewConfig) -> None:
    ec2 = aws.ec2
    now = datetime.now(UTC)
    expired = run(ec2, 3, **preview_tags(1, now - timedelta(minutes=1)))
    fresh = run(ec2, 1, **preview_tags(2, now + timedelta(hours=1)))
    closed = run(ec2, 1, **preview_tags(3, now + timedelta(hours=1)))
    db_sg = config.db_security_group_id
    assert db_sg
    leftover = _authorize(ec2, db_sg, "203.0.113.9/32", db_rule_description("i-0dead"))
    config = config.model_copy(update={"db_sg_open_public_ip": True})
    github, events = FakePulls({(REPO, 3): "closed"}), Events()
    before = states(ec2)

    report = sweep(ec2, config, dry_run=True, github=github, emit=events, now=now)

    assert states(ec2) == before
    assert set(before.values()) == {"running"}
    assert sorted(report.to_terminate) == sorted(expired + closed)
    assert report.terminated == [] and report.terminate_calls == 0
    assert [rule.rule_id for rule in report.revoked_rules] == [leftover]
    assert leftover in _rule_ids(ec2, db_sg)
    assert events.sent == [] and github.expired == []
    outcomes = {row["instance"]: row["outcome"] for row in report.table()}
    assert outcomes[expired[0]] == "would terminate (dry run)"
    assert outcomes[fresh[0]] == "kept"


def internal_error_once() -> Any:
    """A ``before-call`` handler: the first call answers 500 InternalError and never reaches
    moto. (A ``before-send`` handler's answer wins too, but botocore still calls moto's own
    before-send handler, so the instances would be terminated behind the error.)"""
    calls = {"n": 0}

    def handler(**kwargs: Any) -> tuple[AWSResponse, dict[str, Any]] | None:
        calls["n"] += 1
        if calls["n"] > 1:
            return None
        error = {"Code": "InternalError", "Message": "injected"}
        metadata = {"HTTPStatusCode": 500, "HTTPHeaders": {}}
        response = AWSResponse("https://ec2.amazonaws.com/", 500, cast(Any, {}), None)
        return response, {"Error": error, "ResponseMetadata": metadata}

    return handler


def test_a_failed_terminate_batch_does_not_stop_the_others(
    aws: AwsClients, config: PreviewConfig
) -> None:
    ec2 = aws.ec2
    now = datetime.now(UTC)
    ids = run(ec2, 5, **preview_tags(1, now - timedelta(hours=1)))
    ec2.meta.events.register_first("before-call.ec2.TerminateInstances", internal_error_once())
    config.task_retries = 0  # the batch stays failed: no step retry behind it

    report = sweep(ec2, config, now=now, batch_size=2)

    first_batch = [d.instance_id for d in report.decisions][:2]
    after = states(ec2, ids)
    assert sorted(report.failed) == sorted(first_batch)
    assert "InternalError" in report.failed[first_batch[0]]
    assert {after[iid] for iid in first_batch} == {"running"}
    assert {after[iid] for iid in ids if iid not in first_batch} <= set(GONE)
    assert report.terminate_calls == 3
    assert report.outcome(report.decisions[0]).startswith("failed:")


def test_outside_a_flow_run_the_sweep_retries_a_throttled_batch_as_configured(
    aws: AwsClients, config: PreviewConfig
) -> None:
    """``pr-preview cleanup`` runs the sweep with no flow run: its steps retry all the same."""
    ec2 = aws.ec2
    now = datetime.now(UTC)
    ids = run(ec2, 5, **preview_tags(1, now - timedelta(hours=1)))
    ec2.meta.events.register_first("before-call.ec2.TerminateInstances", internal_error_once())
    config.task_retries = 1

    report = sweep(ec2, config, now=now, batch_size=2)

    assert report.failed == {}
    assert set(states(ec2, ids).values()) <= set(GONE)


def test_instances_already_gone_are_tolerated(aws: AwsClients, config: PreviewConfig) -> None:
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.ec2.models import ec2_backends

    ec2 = aws.ec2
    now = datetime.now(UTC)
    ids = run(ec2, 3, **preview_tags(1, now - timedelta(hours=1)))
    vanished = ids[1]

    def vanish_once(**kwargs: Any) -> None:
        """Between the listing and the terminate, AWS forgets one instance (long terminated)."""
        for reservation in ec2_backends[DEFAULT_ACCOUNT_ID][config.region].reservations.values():
            reservation.instances = [i for i in reservation.instances if i.id != vanished]
        ec2.meta.events.unregister("before-call.ec2.TerminateInstances", vanish_once)

    ec2.meta.events.register_first("before-call.ec2.TerminateInstances", vanish_once)

    report = sweep(ec2, config, now=now)

    assert report.already_gone == [vanished]
    assert sorted(report.terminated) == sorted(set(ids) - {vanished})
    assert set(states(ec2, report.terminated).values()) <= set(GONE)
    assert report.failed == {}
    assert report.outcome(next(d for d in report.decisions if d.instance_id == vanished)) == (
        "already gone"
    )


def _authorize(ec2: Any, group_id: str, cidr: str, description: str | None) -> str:
    ip_range: dict[str, str] = {"CidrIp": cidr}
    if description:
        ip_range["Description"] = description
    answer = ec2.authorize_security_group_ingress(
        GroupId=group_id,
        IpPermissions=[
            {"IpProtocol": "tcp", "FromPort": 5432, "ToPort": 5432, "IpRanges": [ip_range]}
        ],
    )
    return str(answer["SecurityGroupRules"][0]["SecurityGroupRuleId"])


def _rule_ids(ec2: Any, group_id: str) -> set[str]:
    rules = ec2.describe_security_group_rules(Filters=[{"Name": "group-id", "Values": [group_id]}])
    return {rule["SecurityGroupRuleId"] for rule in rules["SecurityGroupRules"]}


def test_leftover_db_sg_rules_are_revoked(aws: AwsClients, config: PreviewConfig) -> None:
    ec2 = aws.ec2
    now = datetime.now(UTC)
    db_sg = config.db_security_group_id
    assert db_sg
    [live] = run(ec2, 1, **preview_tags(1, now + timedelta(hours=3)))
    [expired] = run(ec2, 1, **preview_tags(2, now - timedelta(hours=3)))
    ips = {
        i["InstanceId"]: i["PublicIpAddress"]
        for r in ec2.describe_instances(InstanceIds=[live, expired])["Reservations"]
        for i in r["Instances"]
    }
    live_rule = _authorize(ec2, db_sg, f"{ips[live]}/32", db_rule_description(live))
    live_by_id = _authorize(ec2, db_sg, "192.0.2.44/32", db_rule_description(live))
    expired_rule = _authorize(ec2, db_sg, f"{ips[expired]}/32", db_rule_description(expired))
    dead_rule = _authorize(ec2, db_sg, "203.0.113.9/32", f"{DB_RULE_MARKER} i-0dead")
    human_rule = _authorize(ec2, db_sg, "198.51.100.7/32", "alice at home")
    before = _rule_ids(ec2, db_sg)

    unchanged = sweep(ec2, config, now=now)  # db_sg_open_public_ip is off: no rule is touched
    assert unchanged.revoked_rules == [] and _rule_ids(ec2, db_sg) == before

    [another] = run(ec2, 1, **preview_tags(3, now - timedelta(hours=3)))
    config = config.model_copy(update={"db_sg_open_public_ip": True})
    report = sweep(ec2, config, now=now)

    assert states(ec2, [another])[another] in GONE
    assert {rule.rule_id for rule in report.revoked_rules} == {expired_rule, dead_rule}
    after = _rule_ids(ec2, db_sg)
    assert {live_rule, live_by_id, human_rule} <= after
    assert not {expired_rule, dead_rule} & after
    assert len(after) == len(before) - 2  # the api-sg reference and egress rule stay too


def test_sticky_comment_marked_expired_through_the_real_client(
    aws: AwsClients, config: PreviewConfig
) -> None:
    ec2 = aws.ec2
    now = datetime.now(UTC)
    fake = FakeGitHub()
    fake.add_pull(REPO, {"number": 7, "state": "closed", "head": {"sha": "a" * 40}})
    fake.add_pull(REPO, {"number": 8, "state": "open", "head": {"sha": "b" * 40}})
    fake.add_comment(
        REPO, 7, "<!-- pr-preview:octo-org/app#7 -->\n### ✅ Preview ready", fake.bot_login
    )
    [closed] = run(ec2, 1, **preview_tags(7, now + timedelta(hours=3)))
    [still_open] = run(ec2, 1, **preview_tags(8, now + timedelta(hours=3)))
    client = GitHub("good-token", transport=fake.transport)
    deployment = client.create_deployment(REPO, "a" * 40, "pr-7")
    client.create_deployment_status(REPO, deployment["id"], "success")
    github = StickyExpiry(client, config.region)

    report = sweep(ec2, config, github=github, now=now)

    assert report.terminated == [closed]
    assert states(ec2, [still_open])[still_open] == "running"
    [body] = fake.comment_bodies(REPO, 7)
    assert "Preview expired" in body and closed in body and "closed on GitHub" in body
    assert len(fake.sent("GET", "/pulls/7")) == 1 and len(fake.sent("GET", "/pulls/8")) == 1
    assert fake.comment_bodies(REPO, 8) == []
    # The PR page no longer shows an active deployment of a preview that is gone.
    assert [s["state"] for s in fake.statuses[deployment["id"]]] == ["success", "inactive"]


def test_without_a_token_the_sweep_goes_by_tags(
    config: PreviewConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("GITHUB_TOKEN", raising=False)
    assert github_or_none(config) is None


@pytest.mark.e2e
def test_flow_runs_and_publishes_the_table(
    prefect_server: None,
    aws: AwsClients,
    config: PreviewConfig,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from prefect.artifacts import Artifact

    monkeypatch.delenv("GITHUB_TOKEN", raising=False)
    ec2 = aws.ec2
    now = datetime.now(UTC)
    [expired] = run(ec2, 1, **preview_tags(1, now - timedelta(hours=1)))
    [fresh] = run(ec2, 1, **preview_tags(2, now + timedelta(hours=1)))

    report = ttl_sweeper(config=config)

    assert report.terminated == [expired]
    after = states(ec2, [expired, fresh])
    assert after[expired] in GONE and after[fresh] == "running"
    artifact = cast(Any, Artifact.get("ttl-sweep"))
    assert artifact is not None and artifact.type == "table"
    rows = {row["instance"]: row for row in _table_rows(artifact.data)}
    assert rows[expired]["decision"] == "terminate" and rows[expired]["outcome"] == "terminated"
    assert rows[expired]["PR"] == f"{REPO}#1" and rows[expired]["sha"].startswith("0001")
    assert rows[fresh]["decision"] == "keep"
    assert set(rows[fresh]) >= {"instance", "PR", "sha", "age", "shutdown-at", "reason"}


def _table_rows(data: Any) -> list[dict[str, Any]]:
    import json

    return list(json.loads(data) if isinstance(data, str) else data)
