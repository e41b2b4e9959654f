"""Idle previews put to sleep by the sweeper (``idle_stop_minutes``), on moto with scripted
instances: which previews count as idle, the one read of every instance's activity, the PR's
comment, and what ``active-at`` keeps for ``pr-preview list``. The instance's own sampling (its
timer, ``ss`` and ``pgrep`` on a real host) is walked through in tests/test_sleep_real.py."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from unittest import mock

import pytest

from flows.sweeper import ttl_sweeper
from local_stack.scripted_instance import Reply, ScriptedInstances
from tasks.cloud.aws import AwsClients
from tasks.cloud.instances import Preview
from tasks.cloud.on_instance import Activity, activity_read, parse_activity, strict_port
from tasks.cloud.ssm import run_on_each
from tasks.cloud.tags import TAG_ACTIVE_AT, TAG_KEEP, TAG_UPDATED_AT, format_time
from tasks.config import PreviewConfig
from tasks.steps.sleep import ACTIVITY_COMMENT, plan_idle
from tests.fakes.github import FakeGitHub, served_github
from tests.support.moto_state import state_of, tags
from tests.test_sweeper import AMI, preview_tags

REPO = "octo-org/app"
NOW = datetime(2026, 12, 7, 10, 0, tzinfo=UTC)
ACTIVITY = r"LAST-ACTIVITY"


def preview(number: int, **tag_values: str) -> Preview:
    """A preview launched 3 h before NOW, last deployed 2 h before."""
    values = {TAG_UPDATED_AT: format_time(NOW - timedelta(hours=2)), **tag_values}
    return Preview(f"i-{number:017x}", "running", NOW - timedelta(hours=3), values)


def activity(sessions: int = 0, connections: int = 0, last: datetime | None = None) -> Reply:
    """What the activity read prints on an instance."""
    when = format_time(last) if last else "none"
    return Reply(stdout=f"ACTIVITY {sessions} {connections}\nLAST-ACTIVITY {when}\n")


def test_plan_idle_counts_from_the_latest_activity_deploy_or_wake_and_never_guesses() -> None:
    minutes = 30
    never_used = preview(1)
    used_long_ago = preview(2, **{TAG_ACTIVE_AT: format_time(NOW - timedelta(hours=1))})
    used_lately = preview(3)
    in_use = preview(4)
    deployed_lately = preview(5, **{TAG_UPDATED_AT: format_time(NOW - timedelta(minutes=10))})
    woken_lately = preview(6, **{"woke-at": format_time(NOW - timedelta(minutes=5))})
    unread = preview(7)
    read: dict[str, Activity | str] = {
        never_used.instance_id: Activity(0, 0, None),
        used_long_ago.instance_id: Activity(0, 0, NOW - timedelta(hours=1, minutes=5)),
        used_lately.instance_id: Activity(0, 0, NOW - timedelta(minutes=29)),
        in_use.instance_id: Activity(1, 0, NOW - timedelta(hours=5)),
        deployed_lately.instance_id: Activity(0, 0, None),
        woken_lately.instance_id: Activity(0, 0, None),
        unread.instance_id: "its SSM agent is not registered",
    }
    previews = [
        never_used,
        used_long_ago,
        used_lately,
        in_use,
        deployed_lately,
        woken_lately,
        unread,
    ]
    decisions = [(d.idle, d.reason) for d in plan_idle(previews, read, NOW, minutes)]
    assert decisions == [
        (True, "idle 2h00m, over 30 min"),  # since its last deploy
        (True, "idle 1h00m, over 30 min"),  # the tag is newer than what the instance had
        (False, "idle 29 min"),
        (False, "in use now (1 sessions, 0 connections)"),
        (False, "idle 10 min"),
        (False, "idle 5 min"),
        (False, "activity unknown: its SSM agent is not registered"),
    ]


def test_the_activity_read_is_parsed_strictly_and_the_port_is_an_integer() -> None:
    assert parse_activity("ACTIVITY 2 0\nLAST-ACTIVITY 2026-12-07T09:59:00Z\n") == Activity(
        2, 0, datetime(2026, 12, 7, 9, 59, tzinfo=UTC)
    )
    assert parse_activity("ACTIVITY 0 0\nLAST-ACTIVITY none\n") == Activity(0, 0, None)
    assert parse_activity("LAST-ACTIVITY 2026-12-07T09:59:00Z\n") is None
    assert parse_activity("ACTIVITY x 0\n") is None
    assert "( sport = :8000 )" in "\n".join(activity_read(8000))
    for bad in ("8000; reboot", True, 0, 70000, 80.0):
        with pytest.raises(ValueError, match="app port must be an integer"):
            strict_port(bad)


@pytest.fixture
def github(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeGitHub]:
    with served_github(monkeypatch) as fake:
        yield fake


def launched_ago(aws: AwsClients, ago: timedelta, **tag_values: str) -> str:
    """A preview whose LaunchTime (its run's start) and ``updated-at`` are ``ago`` back."""
    import moto.ec2.models.instances as moto_instances

    launched = datetime.now(UTC) - ago
    params: dict[str, Any] = {"ImageId": AMI, "MinCount": 1, "MaxCount": 1}
    values = {**tag_values, TAG_UPDATED_AT: format_time(launched)}
    params["TagSpecifications"] = [
        {"ResourceType": "instance", "Tags": [{"Key": k, "Value": v} for k, v in values.items()]}
    ]
    with mock.patch.object(moto_instances, "utcnow", lambda: launched.replace(tzinfo=None)):
        return str(aws.ec2.run_instances(**params)["Instances"][0]["InstanceId"])


@pytest.mark.usefixtures("prefect_server")
def test_the_sweeper_puts_an_idle_preview_to_sleep_tells_its_pr_and_leaves_the_others(
    aws: AwsClients,
    config: PreviewConfig,
    scripted_ssm: ScriptedInstances,
    github: FakeGitHub,
) -> None:
    config.idle_stop_minutes = 30
    for number in (21, 22, 23, 24):
        github.add_pull(REPO, {"number": number, "state": "open"})
    hours, ahead = timedelta(hours=1), datetime.now(UTC) + timedelta(hours=20)
    idle = launched_ago(aws, 2 * hours, **preview_tags(21, ahead))
    in_use = launched_ago(aws, 2 * hours, **preview_tags(22, ahead))
    kept = launched_ago(aws, 2 * hours, **preview_tags(23, ahead, **{TAG_KEEP: "true"}))
    away = launched_ago(aws, 2 * hours, **preview_tags(24, ahead))
    used = datetime.now(UTC) - 45 * timedelta(minutes=1)
    scripted_ssm.on(ACTIVITY, activity(last=used), instance_id=idle)
    scripted_ssm.on(ACTIVITY, activity(connections=1, last=used), instance_id=in_use)
    scripted_ssm.agent_offline(away)

    report = ttl_sweeper(config=config)

    assert report.slept_idle == [idle]
    assert report.idle[in_use] == "in use now (0 sessions, 1 connections)"
    assert report.idle[away] == "activity unknown: its SSM agent is not registered"
    assert kept not in report.idle  # tagged keep: never asked
    assert {i: state_of(aws, i) for i in (idle, in_use, kept, away)} == {
        idle: "stopped",
        in_use: "running",
        kept: "running",
        away: "running",
    }
    [found] = aws.ec2.describe_instances(InstanceIds=[idle])["Reservations"][0]["Instances"]
    asleep = tags(found)
    assert asleep["sleep-state"] == "idle"
    assert asleep[TAG_ACTIVE_AT] == format_time(used)  # what the instance recorded
    [found] = aws.ec2.describe_instances(InstanceIds=[in_use])["Reservations"][0]["Instances"]
    assert tags(found)[TAG_ACTIVE_AT] == format_time(used)  # as the instance recorded it
    # Each answering instance was read once; the one whose agent is away held nobody back.
    read = Counter(c.instance_id for c in scripted_ssm.calls if c.comment == ACTIVITY_COMMENT)
    assert read == {idle: 1, in_use: 1}
    [body] = github.comment_bodies(REPO, 21)
    assert "### 😴 Preview asleep" in body
    assert f"Sleeping since {asleep['slept-at']} (nobody used it)" in body
    assert "It wakes on a push, `pr-preview tunnel 21` or `/preview start`." in body
    assert github.comment_bodies(REPO, 22) == []


def test_one_send_command_reads_many_instances_and_an_agent_away_holds_back_only_itself(
    aws: AwsClients, scripted_ssm: ScriptedInstances
) -> None:
    ids = [launched_ago(aws, timedelta(0), **preview_tags(30 + n, None)) for n in range(5)]
    scripted_ssm.on(ACTIVITY, activity(sessions=1))
    sent: list[list[str]] = []  # the InstanceIds of each SendCommand request

    def record(params: dict[str, Any], **_: Any) -> None:
        sent.append(list(params["InstanceIds"]))

    aws.ssm.meta.events.register("provide-client-params.ssm.SendCommand", record)

    answers = run_on_each(aws.ssm, ids, ["echo LAST-ACTIVITY"], timeout_seconds=5, poll_seconds=0)

    assert {i: parse_activity(a.stdout) for i, a in answers.items() if not isinstance(a, str)} == {
        i: Activity(1, 0, None) for i in ids
    }
    assert sent == [ids]

    scripted_ssm.agent_offline(ids[3])
    again = run_on_each(aws.ssm, ids, ["echo LAST-ACTIVITY"], timeout_seconds=5, poll_seconds=0)

    assert again[ids[3]] == "its SSM agent is not registered"
    assert all(not isinstance(again[i], str) for i in ids if i != ids[3])
    # All five refused for the absent one; then halves, and halves of each half holding it.
    assert sent[1:] == [ids, ids[2:], ids[3:], ids[4:], ids[3:4], ids[2:3], ids[:2]]
