"""A preview's expiry moved on a real local instance (local_stack/instance: real bash, the real
SSM agent path, its ``shutdown`` honoured): ``/preview extend`` (``pr-preview extend`` runs the
same step), the keep label and its removal move the instance's own shutdown timer with the
``shutdown-at`` tag the sweeper reads."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from local_stack.instance.runtime import InstanceRuntime
from tasks.cloud.aws import AwsClients
from tasks.cloud.instances import Preview, describe_preview
from tasks.cloud.tags import TAG_SHUTDOWN_AT, format_time
from tasks.config import PreviewConfig
from tasks.steps.command import extend_preview
from tasks.steps.pin import pin_preview, unpin_preview
from tests.test_instance_runtime import AMI, run, wait_for

TIMER = "/run/pr-preview/shutdown-at"


def booted_preview(aws: AwsClients, config: PreviewConfig) -> str:
    """A preview's instance, its tag and timer an hour ahead, as a launch leaves them."""
    in_an_hour = format_time(datetime.now(UTC) + timedelta(hours=1))
    tags = {"Purpose": config.purpose_tag, "Repo": "octo-org/app", "PR": "7"}
    reservation = aws.ec2.run_instances(
        ImageId=AMI,
        MinCount=1,
        MaxCount=1,
        UserData="#!/bin/bash\nshutdown -h +60 'pr-preview TTL reached'\n",
        TagSpecifications=[
            {
                "ResourceType": "instance",
                "Tags": [
                    *({"Key": k, "Value": v} for k, v in tags.items()),
                    {"Key": TAG_SHUTDOWN_AT, "Value": in_an_hour},
                ],
            }
        ],
    )
    instance_id: str = reservation["Instances"][0]["InstanceId"]
    wait_for(  # its agent answers, and its user data has set the timer
        lambda: (
            "status: done" in run(aws, instance_id, "cloud-init status")["StandardOutputContent"]
        )
    )
    return instance_id


def now_and_then(aws: AwsClients, runtime: InstanceRuntime, instance_id: str) -> Preview:
    """The preview as EC2 holds it, after checking that the instance's own timer is due when
    its ``shutdown-at`` says (to the minute: ``shutdown -h +N`` counts whole minutes)."""
    preview = describe_preview(aws.ec2, instance_id)
    assert preview is not None and preview.shutdown_at is not None
    due = float(runtime.sandboxes[instance_id].inside(TIMER).read_text())
    assert abs(due - preview.shutdown_at.timestamp()) <= 60, (due, preview.shutdown_at)
    return preview


def test_extend_and_the_keep_label_move_the_instances_own_timer_with_the_tag(
    aws: AwsClients, config: PreviewConfig, real_instances: InstanceRuntime
) -> None:
    instance_id = booted_preview(aws, config)
    start = now_and_then(aws, real_instances, instance_id)

    # /preview extend 8h: 8 hours from now, tag and timer.
    extended = extend_preview(aws, config, start, 8)
    after = now_and_then(aws, real_instances, instance_id)
    assert after.shutdown_at == extended
    assert abs(extended - (datetime.now(UTC) + timedelta(hours=8))) < timedelta(minutes=1)

    # The keep label: 8 hours left is less than half the 24-hour TTL, so it is renewed.
    pin_preview(aws, config, after)
    pinned = now_and_then(aws, real_instances, instance_id)
    assert pinned.pinned and pinned.shutdown_at is not None
    assert abs(pinned.shutdown_at - (datetime.now(UTC) + timedelta(hours=24))) < timedelta(
        minutes=1
    )

    # The label comes off: the TTL (here 2 hours) restarts from now, timer first.
    config.ttl_hours = 2
    unpinned_until = unpin_preview(aws, config, pinned)
    unpinned = now_and_then(aws, real_instances, instance_id)
    assert not unpinned.pinned and unpinned.shutdown_at == unpinned_until
    assert abs(unpinned_until - (datetime.now(UTC) + timedelta(hours=2))) < timedelta(minutes=1)
