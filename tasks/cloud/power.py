"""A preview asleep and awake: EC2 StopInstances/StartInstances and the tags that carry a
preview's TTL and cost across a stop.

A stopped instance keeps its volume (the app's containers, images and data) and its tags; its
``shutdown-at`` still binds (the sweeper terminates a stopped preview past it). What a stop
loses is the on-instance shutdown timer: it lives in memory, so a wake re-arms it from the tag.
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import TYPE_CHECKING

from tasks.cloud.instances import Preview
from tasks.cloud.on_instance import timer_minutes
from tasks.cloud.tags import (
    SLEEP_REASONS,
    TAG_RAN_SECONDS,
    TAG_SLEEP_STATE,
    TAG_SLEPT_AT,
    TAG_SLEPT_SECONDS,
    TAG_WOKE_AT,
    format_time,
)

if TYPE_CHECKING:
    from mypy_boto3_ec2 import EC2Client
    from mypy_boto3_ec2.type_defs import TagTypeDef


def sleep_tags(preview: Preview, reason: str, now: datetime) -> list[TagTypeDef]:
    """The tags of ``preview`` stopped at ``now``: why, since when, and its running seconds so
    far (its cost while asleep is its volume only)."""
    if reason not in SLEEP_REASONS:
        raise ValueError(f"sleep reason {reason!r} is not one of {', '.join(SLEEP_REASONS)}")
    return [
        {"Key": TAG_SLEEP_STATE, "Value": reason},
        {"Key": TAG_SLEPT_AT, "Value": format_time(now)},
        {"Key": TAG_RAN_SECONDS, "Value": str(round(preview.ran_seconds(now)))},
    ]


def wake_tags(preview: Preview, now: datetime) -> list[TagTypeDef]:
    """The tags of ``preview`` started at ``now``: its sleep added to its slept seconds, and
    the start of its new run. ``sleep-state`` goes (:func:`woken`)."""
    return [
        {"Key": TAG_SLEPT_SECONDS, "Value": str(round(preview.slept_seconds(now)))},
        {"Key": TAG_WOKE_AT, "Value": format_time(now)},
    ]


def stop_preview(ec2: EC2Client, preview: Preview, reason: str, now: datetime) -> None:
    """Tag, then stop: a stop that fails leaves a running preview tagged asleep, which the
    next wake starts (a no-op), never a stopped one that no wake would find."""
    ec2.create_tags(Resources=[preview.instance_id], Tags=sleep_tags(preview, reason, now))
    ec2.stop_instances(InstanceIds=[preview.instance_id])


def start_preview(ec2: EC2Client, preview: Preview) -> None:
    ec2.start_instances(InstanceIds=[preview.instance_id])


def woken(ec2: EC2Client, preview: Preview, now: datetime) -> None:
    """The preview runs again: its sleep is accounted for and ``sleep-state`` removed."""
    ec2.create_tags(Resources=[preview.instance_id], Tags=wake_tags(preview, now))
    ec2.delete_tags(Resources=[preview.instance_id], Tags=[{"Key": TAG_SLEEP_STATE}])


def minutes_left(preview: Preview, now: datetime) -> int | None:
    """The shutdown timer to re-arm: whole minutes until ``shutdown-at`` (rounded up, at least
    one), or None when the tag is missing, unparsable or already past."""
    shutdown_at = preview.shutdown_at
    if shutdown_at is None or shutdown_at <= now:
        return None
    return max(1, timer_minutes(math.ceil((shutdown_at - now).total_seconds() / 60) / 60))
