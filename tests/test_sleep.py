"""Sleep and wake on moto with scripted instances: which previews sleep, what a stop and a start
leave in EC2's state and tags, the timer re-armed from ``shutdown-at``, the PR's lock honoured,
a stopped preview still bound by its TTL, and what it has cost."""

from __future__ import annotations

import re
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from flows.sleep import BEING_DEPLOYED, pr_sleep, pr_wake
from local_stack.scripted_instance import ScriptedInstances
from tasks.cloud.aws import AwsClients
from tasks.cloud.instances import Preview, describe_preview
from tasks.cloud.power import WakeFailed, wake_instance
from tasks.cloud.tags import TAG_KEEP, TAG_SPARE, format_time, parse_time
from tasks.config import PreviewConfig
from tasks.run.locks import hold, pr_lock_name
from tasks.steps.sleep import plan_sleep, sleep_instance
from tasks.steps.sweep import sweep
from tests.support.moto_state import state_of, tags
from tests.test_sweeper import preview_tags, run

REPO = "octo-org/app"
NOW = datetime(2026, 12, 7, 10, 0, tzinfo=UTC)


def preview(state: str = "running", **tag_values: str) -> Preview:
    return Preview("i-0123456789abcdef0", state, NOW - timedelta(hours=2), tag_values)


def described(aws: AwsClients, instance_id: str) -> dict[str, Any]:
    [reservation] = aws.ec2.describe_instances(InstanceIds=[instance_id])["Reservations"]
    return dict(reservation["Instances"][0])


def test_plan_sleep_lets_only_a_prs_running_preview_within_its_ttl_sleep() -> None:
    ahead = format_time(NOW + timedelta(hours=5))
    previews = [
        preview(**preview_tags(1, ahead)),
        preview(**preview_tags(2, ahead, **{TAG_KEEP: "true"})),
        preview(**{"Purpose": "pr-preview-singleton", TAG_SPARE: "true", "shutdown-at": ahead}),
        preview(**preview_tags(4, format_time(NOW - timedelta(minutes=1)))),
        preview("stopped", **preview_tags(5, ahead)),
    ]
    decisions = [(d.sleeps, d.reason) for d in plan_sleep(previews, NOW)]
    assert decisions == [
        (True, "asleep until woken"),
        (False, "tagged pr-preview:keep=true"),
        (False, "serves no pull request"),
        (False, "past its TTL: the sweeper ends it"),
        (False, "instance is stopped"),
    ]


def test_running_and_sleeping_seconds_add_up_across_stops() -> None:
    """What the cost rests on: seconds run before, plus the current run from the last wake
    (EC2 moves LaunchTime at a start, moto does not: the later of the two counts)."""
    woke = NOW - timedelta(minutes=30)
    awake = preview(
        **{"ran-seconds": "3600", "slept-seconds": "7200", "woke-at": format_time(woke)}
    )
    assert awake.ran_seconds(NOW) == 3600 + 1800
    assert awake.slept_seconds(NOW) == 7200
    asleep = preview(
        "stopped",
        **{"ran-seconds": "3600", "slept-seconds": "7200", "slept-at": format_time(woke)},
    )
    assert asleep.ran_seconds(NOW) == 3600
    assert asleep.slept_seconds(NOW) == 7200 + 1800
    assert preview(**{"ran-seconds": "junk"}).ran_seconds(NOW) == 7200  # from LaunchTime


def test_a_sleep_stops_and_tags_and_a_wake_starts_and_rearms_the_timer_from_shutdown_at(
    aws: AwsClients, config: PreviewConfig, scripted_ssm: ScriptedInstances
) -> None:
    shutdown_at = datetime.now(UTC) + timedelta(hours=3)
    [instance_id] = run(aws.ec2, **preview_tags(7, shutdown_at))
    slept = sleep_instance(aws, config, instance_id, "scheduled")
    assert slept is not None
    assert state_of(aws, instance_id) == "stopped"
    asleep = tags(described(aws, instance_id))
    assert asleep["sleep-state"] == "scheduled" and parse_time(asleep["slept-at"]) is not None
    assert int(asleep["ran-seconds"]) >= 0
    # A second sleep of a stopped preview changes nothing.
    assert sleep_instance(aws, config, instance_id, "scheduled") is None

    woke = wake_instance(aws, config, instance_id)
    assert state_of(aws, instance_id) == "running"
    after = tags(described(aws, instance_id))
    assert "sleep-state" not in after and parse_time(after["woke-at"]) is not None
    assert after["shutdown-at"] == format_time(shutdown_at)  # the TTL did not move
    [rearm] = scripted_ssm.commands(instance_id, r"shutdown -h")
    minutes = int(re.search(r"shutdown -h \+(\d+)", rearm).group(1))  # type: ignore[union-attr]
    assert minutes == woke.timer_minutes and 179 <= minutes <= 180


def test_a_wake_waits_for_the_agent_to_register(
    aws: AwsClients, config: PreviewConfig, scripted_ssm: ScriptedInstances
) -> None:
    [instance_id] = run(aws.ec2, **preview_tags(8, datetime.now(UTC) + timedelta(hours=1)))
    sleep_instance(aws, config, instance_id, "idle")
    refusals = iter(range(3))
    scripted_ssm.agent_offline(instance_id, until=lambda: next(refusals, None) is None)
    woke = wake_instance(aws, config, instance_id)
    assert woke.was == "stopped" and state_of(aws, instance_id) == "running"
    assert len(scripted_ssm.commands(instance_id, r"shutdown -h")) == 1  # the one accepted


def test_a_wake_gives_up_at_its_deadline_when_the_agent_never_answers(
    aws: AwsClients, config: PreviewConfig, scripted_ssm: ScriptedInstances
) -> None:
    [instance_id] = run(aws.ec2, **preview_tags(9, datetime.now(UTC) + timedelta(hours=1)))
    sleep_instance(aws, config, instance_id, "idle")
    scripted_ssm.agent_offline(instance_id)
    config.wake_timeout_seconds = 0.3
    with pytest.raises(WakeFailed, match=r"SSM agent did not take a command within 0\.3 s"):
        wake_instance(aws, config, instance_id)


def test_a_preview_past_its_ttl_is_never_woken_and_the_sweeper_terminates_it_stopped(
    aws: AwsClients, config: PreviewConfig, scripted_ssm: ScriptedInstances
) -> None:
    [instance_id] = run(aws.ec2, **preview_tags(10, datetime.now(UTC) + timedelta(hours=1)))
    sleep_instance(aws, config, instance_id, "scheduled")
    past = format_time(datetime.now(UTC) - timedelta(minutes=5))
    aws.ec2.create_tags(Resources=[instance_id], Tags=[{"Key": "shutdown-at", "Value": past}])
    with pytest.raises(WakeFailed, match="past its shutdown-at"):
        wake_instance(aws, config, instance_id)
    assert state_of(aws, instance_id) == "stopped"
    report = sweep(aws.ec2, config)
    assert report.terminated == [instance_id]
    assert state_of(aws, instance_id) == "terminated"


@pytest.mark.usefixtures("prefect_server")
def test_the_schedule_sleeps_what_may_sleep_leaves_a_deploying_pr_awake_and_wakes_it_healthy(
    aws: AwsClients, config: PreviewConfig, scripted_ssm: ScriptedInstances
) -> None:
    scripted_ssm.healthy()
    ahead = datetime.now(UTC) + timedelta(hours=6)
    [idle] = run(aws.ec2, **preview_tags(11, ahead))
    [kept] = run(aws.ec2, **preview_tags(12, ahead, **{TAG_KEEP: "true"}))
    [deploying] = run(aws.ec2, **preview_tags(13, ahead))
    config.sleep_lock_wait_seconds = 0.5
    # A run deploying PR 13 holds its lock for the whole sleep.
    held, release = threading.Event(), threading.Event()

    def deploy() -> None:
        with hold(pr_lock_name(REPO, 13), lease_seconds=60):
            held.set()
            release.wait(60)

    runner = threading.Thread(target=deploy)
    runner.start()
    try:
        assert held.wait(30)
        report = pr_sleep(config=config)
    finally:
        release.set()
        runner.join(30)
    assert report.changed == [idle]
    outcome = {row["instance"]: row["outcome"] for row in report.rows}
    assert outcome[deploying] == BEING_DEPLOYED
    assert outcome[kept] == "tagged pr-preview:keep=true"
    assert {i: state_of(aws, i) for i in (idle, kept, deploying)} == {
        idle: "stopped",
        kept: "running",
        deploying: "running",
    }
    woke = pr_wake(config=config)
    assert woke.changed == [idle] and not woke.failed
    assert state_of(aws, idle) == "running"
    assert "sleep-state" not in tags(described(aws, idle))
    # Healthy again: the wake probed the app after re-arming the timer, and migrated nothing.
    assert scripted_ssm.count(r"curl", idle) >= 1
    assert scripted_ssm.count(r"alembic|migrat", idle) == 0
    woken = describe_preview(aws.ec2, idle)
    assert woken is not None and woken.sleep_state is None
