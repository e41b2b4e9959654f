"""Previews as EC2 sees them: tags are the state (runbook §2.4, §9).

Shared by the steps, the sweeper and the operator commands: finding previews by tag with the
paginator, and terminating them in batches that tolerate what is already gone.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from botocore.exceptions import ClientError

from tasks.cloud.aws import wait_timed
from tasks.cloud.tags import (
    LIVE_STATES,
    TAG_ACTIVE_AT,
    TAG_KEEP,
    TAG_PINNED,
    TAG_PR,
    TAG_PURPOSE,
    TAG_RAN_SECONDS,
    TAG_REPO,
    TAG_SHA,
    TAG_SHUTDOWN_AT,
    TAG_SLEEP_STATE,
    TAG_SLEPT_AT,
    TAG_SLEPT_SECONDS,
    TAG_UPDATED_AT,
    TAG_WARNED_FOR,
    TAG_WOKE_AT,
    TERMINATE_BATCH,
    parse_time,
)
from tasks.config import PreviewConfig
from tasks.run.errors import PreviewError
from tasks.run.retry import Transient, is_transient

if TYPE_CHECKING:
    from mypy_boto3_ec2 import EC2Client

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Preview:
    """One preview instance, read from its tags."""

    instance_id: str
    state: str
    launch_time: datetime
    tags: dict[str, str] = field(default_factory=dict)
    public_ip: str | None = None
    private_ip: str | None = None

    @property
    def repo(self) -> str | None:
        return self.tags.get(TAG_REPO)

    @property
    def pr_number(self) -> int | None:
        value = self.tags.get(TAG_PR, "")
        return int(value) if value.isdigit() else None

    @property
    def sha(self) -> str | None:
        return self.tags.get(TAG_SHA)

    @property
    def shutdown_at(self) -> datetime | None:
        return parse_time(self.tags.get(TAG_SHUTDOWN_AT))

    @property
    def updated_at(self) -> datetime:
        """When the preview last got a new sha: the ``updated-at`` tag, else its launch."""
        return parse_time(self.tags.get(TAG_UPDATED_AT)) or self.launch_time

    @property
    def name(self) -> str:
        return f"{self.repo}#{self.pr_number} {self.instance_id}"

    @property
    def keep(self) -> bool:
        return self.tags.get(TAG_KEEP, "").lower() == "true"

    @property
    def pinned(self) -> bool:
        """The PR carries the keep label: the sweeper renews its expiry instead of ending it."""
        return self.tags.get(TAG_PINNED, "").lower() == "true"

    @property
    def warned_for(self) -> datetime | None:
        """The ``shutdown-at`` the PR was last warned of, or None."""
        return parse_time(self.tags.get(TAG_WARNED_FOR))

    @property
    def sleep_state(self) -> str | None:
        """Why pr-preview stopped it (``scheduled``, ``idle``, ``manual``), or None."""
        return self.tags.get(TAG_SLEEP_STATE) or None

    @property
    def slept_at(self) -> datetime | None:
        return parse_time(self.tags.get(TAG_SLEPT_AT))

    @property
    def running_since(self) -> datetime:
        """Start of its current run: the last wake (``woke-at``), else EC2's LaunchTime
        (which AWS moves at every start; the tag holds when it does not)."""
        woke = parse_time(self.tags.get(TAG_WOKE_AT))
        return max(woke, self.launch_time) if woke else self.launch_time

    @property
    def active_at(self) -> datetime | None:
        """The instance's last sampled activity, as the sweeper last read it."""
        return parse_time(self.tags.get(TAG_ACTIVE_AT))

    def idle_since(self, active_at: datetime | None = None) -> datetime:
        """Since when nobody used it: its last activity (``active_at``, just read, or the
        tag), its last deploy (``updated-at``) or the start of its current run, whichever is
        latest."""
        moments = [self.updated_at, self.running_since, active_at, self.active_at]
        return max(moment for moment in moments if moment is not None)

    def ran_seconds(self, now: datetime) -> float:
        """Seconds it has run, over all its runs: billed instance time."""
        before = _seconds_tag(self.tags.get(TAG_RAN_SECONDS))
        if self.state in ("pending", "running"):
            return before + max(0.0, (now - self.running_since).total_seconds())
        return before

    def slept_seconds(self, now: datetime) -> float:
        """Seconds it has been stopped, over all its sleeps: billed as its volume only."""
        before = _seconds_tag(self.tags.get(TAG_SLEPT_SECONDS))
        slept_at = self.slept_at
        if self.state in ("stopping", "stopped") and slept_at is not None:
            return before + max(0.0, (now - slept_at).total_seconds())
        return before

    @classmethod
    def from_instance(cls, instance: Any) -> Preview:
        launch = instance.get("LaunchTime") or datetime.now(UTC)
        if launch.tzinfo is None:
            launch = launch.replace(tzinfo=UTC)
        return cls(
            instance_id=instance["InstanceId"],
            state=instance["State"]["Name"],
            launch_time=launch,
            tags={tag["Key"]: tag["Value"] for tag in instance.get("Tags", [])},
            public_ip=instance.get("PublicIpAddress"),
            private_ip=instance.get("PrivateIpAddress"),
        )


def describe_preview(ec2: EC2Client, instance_id: str) -> Preview | None:
    """The instance as a ``Preview``, or None when EC2 no longer knows it."""
    try:
        reservations = ec2.describe_instances(InstanceIds=[instance_id])["Reservations"]
    except ClientError as exc:
        if exc.response["Error"]["Code"] in (
            "InvalidInstanceID.NotFound",
            "InvalidInstanceID.Malformed",
        ):
            return None
        raise
    instances = [instance for r in reservations for instance in r["Instances"]]
    return Preview.from_instance(instances[0]) if instances else None


def _seconds_tag(value: str | None) -> float:
    """A seconds tag; missing or unparsable counts as none (logged by nobody: it only lowers a
    cost estimate, never a decision)."""
    try:
        return max(0.0, float(value or 0))
    except ValueError:
        return 0.0


def preview_filters(
    purpose: str,
    *,
    repo: str | None = None,
    pr_number: int | None = None,
    sha: str | None = None,
    states: Sequence[str] = LIVE_STATES,
) -> list[dict[str, Any]]:
    filters: list[dict[str, Any]] = [
        {"Name": f"tag:{TAG_PURPOSE}", "Values": [purpose]},
        {"Name": "instance-state-name", "Values": list(states)},
    ]
    if repo is not None:
        filters.append({"Name": f"tag:{TAG_REPO}", "Values": [repo]})
    if pr_number is not None:
        filters.append({"Name": f"tag:{TAG_PR}", "Values": [str(pr_number)]})
    if sha is not None:
        filters.append({"Name": f"tag:{TAG_SHA}", "Values": [sha]})
    return filters


def find_previews(
    ec2: EC2Client,
    purpose: str,
    *,
    repo: str | None = None,
    pr_number: int | None = None,
    sha: str | None = None,
    states: Sequence[str] = LIVE_STATES,
) -> list[Preview]:
    """Every instance with our Purpose tag (and the given Repo/PR/Sha), across all pages."""
    filters = preview_filters(purpose, repo=repo, pr_number=pr_number, sha=sha, states=states)
    paginator = ec2.get_paginator("describe_instances")
    found = [
        Preview.from_instance(instance)
        for page in paginator.paginate(Filters=filters)  # type: ignore[arg-type]
        for reservation in page["Reservations"]
        for instance in reservation["Instances"]
    ]
    return sorted(found, key=lambda preview: (preview.launch_time, preview.instance_id))


def batches(ids: Sequence[str], size: int = TERMINATE_BATCH) -> Iterator[list[str]]:
    for start in range(0, len(ids), size):
        yield list(ids[start : start + size])


@dataclass
class TerminateResult:
    terminated: list[str] = field(default_factory=list)
    already_gone: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    calls: int = 0
    retryable: list[str] = field(default_factory=list)  # failed with throttling or a 5xx

    @property
    def only_transient_failures(self) -> bool:
        return bool(self.failed) and set(self.failed) <= set(self.retryable)

    def merge(self, other: TerminateResult) -> None:
        self.terminated += other.terminated
        self.already_gone += other.already_gone
        self.failed.update(other.failed)
        self.calls += other.calls


def _existing(ec2: EC2Client, ids: list[str]) -> set[str]:
    paginator = ec2.get_paginator("describe_instances")
    pages = paginator.paginate(Filters=[{"Name": "instance-id", "Values": ids}])
    return {
        instance["InstanceId"]
        for page in pages
        for reservation in page["Reservations"]
        for instance in reservation["Instances"]
        if instance["State"]["Name"] not in ("terminated", "shutting-down")
    }


def terminate_batch(ec2: EC2Client, ids: list[str]) -> TerminateResult:
    """Terminate up to 1,000 instances; an id that no longer exists is not an error."""
    result = TerminateResult()
    if not ids:
        return result
    try:
        result.calls += 1
        ec2.terminate_instances(InstanceIds=ids)
        result.terminated = list(ids)
        return result
    except ClientError as exc:
        if exc.response["Error"]["Code"] not in (
            "InvalidInstanceID.NotFound",
            "InvalidInstanceID.Malformed",
        ):
            raise
    # One unknown id fails the whole call: keep the ones that still exist and try once more.
    alive = _existing(ec2, ids)
    result.already_gone = [iid for iid in ids if iid not in alive]
    remaining = [iid for iid in ids if iid in alive]
    if remaining:
        result.calls += 1
        ec2.terminate_instances(InstanceIds=remaining)
        result.terminated = remaining
    return result


def terminate_in_batches(
    ec2: EC2Client, ids: Iterable[str], *, batch_size: int = TERMINATE_BATCH
) -> TerminateResult:
    """Terminate ``ids`` in batches; a failed batch is recorded and the others still run."""
    unique = list(dict.fromkeys(ids))
    total = TerminateResult()
    for batch in batches(unique, batch_size):
        try:
            total.merge(terminate_batch(ec2, batch))
        except ClientError as exc:
            logger.error("terminating %d instances failed: %s", len(batch), exc)
            total.failed.update(dict.fromkeys(batch, str(exc)))
            if is_transient(exc):
                total.retryable += batch
            total.calls += 1
    return total


def wait_terminated(
    ec2: EC2Client, ids: Sequence[str], *, timeout_seconds: float, poll_seconds: float
) -> None:
    """Block until every id is ``terminated`` (botocore's waiter, our own timing)."""
    waiter = ec2.get_waiter("instance_terminated")
    attempts = max(1, math.ceil(timeout_seconds / poll_seconds))
    for batch in batches(list(ids)):
        waiter.wait(
            InstanceIds=batch,
            WaiterConfig={"Delay": max(1, math.ceil(poll_seconds)), "MaxAttempts": attempts},
        )


@dataclass
class Terminated:
    """What a terminate step removed, and why."""

    instance_ids: list[str] = field(default_factory=list)
    already_gone: list[str] = field(default_factory=list)
    reasons: dict[str, str] = field(default_factory=dict)


class TerminateFailed(PreviewError):
    """Some instances are still there; ``TerminateThrottled`` when only throttling or 5xx
    answers stopped them (worth another attempt)."""

    def __init__(self, message: str, result: TerminateResult | None = None) -> None:
        super().__init__(message)
        self.result = result

    @staticmethod
    def of(message: str, result: TerminateResult, *, transient: bool) -> TerminateFailed:
        return (TerminateThrottled if transient else TerminateFailed)(message, result)


class TerminateThrottled(TerminateFailed, Transient):
    """Only throttling or 5xx answers stopped the termination."""


def terminate_previews(
    ec2: EC2Client,
    previews: Sequence[Preview],
    *,
    reason: str,
    timeout_seconds: float,
    poll_seconds: float,
    wait: bool = True,
) -> Terminated:
    """Terminate ``previews`` in batches and, with ``wait``, until they are ``terminated``.

    Not waiting is safe for capacity: a ``shutting-down`` instance no longer counts as live.
    """
    ids = [preview.instance_id for preview in previews]
    result = terminate_in_batches(ec2, ids)
    if result.failed:
        first = next(iter(result.failed.values()))
        raise TerminateFailed.of(
            f"could not terminate {', '.join(result.failed)}: {first}",
            result,
            transient=result.only_transient_failures,
        )
    if result.terminated and wait:
        wait_terminated(
            ec2, result.terminated, timeout_seconds=timeout_seconds, poll_seconds=poll_seconds
        )
    return Terminated(
        instance_ids=result.terminated,
        already_gone=result.already_gone,
        reasons=dict.fromkeys(result.terminated, reason),
    )


def terminate_outdated(
    ec2: EC2Client,
    settings: PreviewConfig,
    repo: str,
    pr_number: int,
    keep_sha: str | None,
    *,
    wait: bool = True,
) -> Terminated:
    """The PR's live instances at any other sha than ``keep_sha`` (all of them when None)."""
    stale = [
        preview
        for preview in find_previews(ec2, settings.purpose_tag, repo=repo, pr_number=pr_number)
        if keep_sha is None or preview.sha != keep_sha
    ]
    return terminate_previews(
        ec2,
        stale,
        reason=f"replaced by {keep_sha[:7]}" if keep_sha else "pull request closed",
        timeout_seconds=settings.terminate_timeout_seconds,
        poll_seconds=settings.poll_seconds,
        wait=wait,
    )


def stop_instance(ec2: EC2Client, instance_id: str, *, timeout_seconds: float, poll: float) -> None:
    """Stop one preview (``/preview stop``) and wait until EC2 says stopped; its disk, tags and
    shutdown-at stay, so the sweeper still ends it on time."""
    ec2.stop_instances(InstanceIds=[instance_id])
    waiter = ec2.get_waiter("instance_stopped")
    wait_timed(
        waiter, timeout_seconds=timeout_seconds, poll_seconds=poll, InstanceIds=[instance_id]
    )


def start_instance(
    ec2: EC2Client, instance_id: str, *, timeout_seconds: float, poll: float
) -> None:
    """Start one stopped preview (``/preview start``) and wait until EC2 says running."""
    ec2.start_instances(InstanceIds=[instance_id])
    waiter = ec2.get_waiter("instance_running")
    wait_timed(
        waiter, timeout_seconds=timeout_seconds, poll_seconds=poll, InstanceIds=[instance_id]
    )
