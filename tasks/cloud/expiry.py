"""A preview's expiry, moved as one: the on-instance shutdown timer and the ``shutdown-at`` tag.

``/preview extend``, ``pr-preview extend``, the keep label and the sweeper's renewal of a pinned
preview all move it here, so the timer on a running instance never disagrees with the tag the
sweeper reads. The timer goes first: a tag moved past a timer that did not move would promise a
life the instance does not have. A stopped instance has no timer (it lives in memory); its wake
re-arms one from the tag.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from tasks.cloud.on_instance import timer_command, timer_minutes
from tasks.cloud.ssm import run_command
from tasks.cloud.tags import TAG_SHUTDOWN_AT, format_time
from tasks.run.errors import PreviewError

if TYPE_CHECKING:
    from mypy_boto3_ec2 import EC2Client
    from mypy_boto3_ec2.type_defs import TagTypeDef
    from mypy_boto3_ssm import SSMClient

    from tasks.cloud.instances import Preview

TIMER_TIMEOUT_SECONDS = 60.0
TIMER_COMMENT = "pr-preview move the shutdown timer"


class TimerNotMoved(PreviewError):
    """The on-instance shutdown timer did not take the new expiry: nothing was changed."""


def hours_from(now: datetime, hours: float) -> datetime:
    """``hours`` after ``now``, to the second as ``shutdown-at`` holds it."""
    return (now + timedelta(hours=hours)).replace(microsecond=0)


def move_timer(ssm: SSMClient, instance_id: str, shutdown_at: datetime, poll: float) -> None:
    """The on-instance timer to ``shutdown_at`` (at least a minute from now)."""
    minutes = timer_minutes(max((shutdown_at - datetime.now(UTC)).total_seconds(), 60) / 3600)
    result = run_command(
        ssm,
        instance_id,
        [timer_command(minutes)],
        timeout_seconds=TIMER_TIMEOUT_SECONDS,
        poll_seconds=min(poll, 1.0),
        comment=TIMER_COMMENT,
    )
    if not result.ok:
        raise TimerNotMoved(f"the shutdown timer of {instance_id} did not move: {result.output}")


def set_expiry(
    ec2: EC2Client,
    ssm: SSMClient,
    preview: Preview,
    shutdown_at: datetime,
    *,
    poll: float,
    tags: list[TagTypeDef] | None = None,
) -> None:
    """``shutdown_at`` on the running instance's timer, then in its tag (with ``tags``, which
    change in the same call)."""
    if preview.state == "running":
        move_timer(ssm, preview.instance_id, shutdown_at, poll)
    changed: list[TagTypeDef] = [{"Key": TAG_SHUTDOWN_AT, "Value": format_time(shutdown_at)}]
    ec2.create_tags(Resources=[preview.instance_id], Tags=changed + list(tags or []))


def pinned_hours(ttl_hours: float, max_ttl_hours: float) -> float:
    """How far ahead a pinned preview's expiry is kept, and where an unpinned one's TTL
    restarts: the TTL, never past ``max_ttl_hours``."""
    return min(ttl_hours, max_ttl_hours)


def renewal(preview: Preview, now: datetime, hours: float) -> datetime | None:
    """A pinned preview's next ``shutdown-at`` — ``hours`` from ``now`` — once less than half
    of that is left (or the tag is missing or unparsable); None while enough is left. Every
    sweep (15 minutes) looks, so the timer never comes near firing while the sweeper runs; if
    the sweeper stops, the timer still ends the preview."""
    shutdown_at = preview.shutdown_at
    if shutdown_at is not None and shutdown_at - now >= timedelta(hours=hours / 2):
        return None
    return hours_from(now, hours)
