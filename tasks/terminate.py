"""Terminate (runbook §2.4): the PR's previous instances, and room for a new one."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from tasks.config import PreviewConfig
from tasks.instances import (
    Preview,
    TerminateResult,
    find_previews,
    terminate_in_batches,
    wait_terminated,
)
from tasks.retry import retry_transient

if TYPE_CHECKING:
    from mypy_boto3_ec2 import EC2Client


@dataclass
class Terminated:
    """What a terminate step removed, and why."""

    instance_ids: list[str] = field(default_factory=list)
    already_gone: list[str] = field(default_factory=list)
    reasons: dict[str, str] = field(default_factory=dict)


class TerminateFailed(RuntimeError):
    """Some instances are still there; ``transient`` when only throttling/5xx stopped them."""

    def __init__(
        self, message: str, result: TerminateResult | None = None, *, transient: bool = False
    ) -> None:
        super().__init__(message)
        self.result = result
        self.transient = transient


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
        raise TerminateFailed(
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
    config: PreviewConfig,
    repo: str,
    pr_number: int,
    keep_sha: str | None,
    *,
    wait: bool = True,
) -> Terminated:
    """The PR's live instances at any other sha than ``keep_sha`` (all of them when None)."""
    stale = [
        preview
        for preview in find_previews(ec2, config.purpose_tag, repo=repo, pr_number=pr_number)
        if keep_sha is None or preview.sha != keep_sha
    ]
    return terminate_previews(
        ec2,
        stale,
        reason=f"replaced by {keep_sha[:7]}" if keep_sha else "pull request closed",
        timeout_seconds=config.terminate_timeout_seconds,
        poll_seconds=config.poll_seconds,
        wait=wait,
    )


class NoRoom(RuntimeError):
    """Every live preview is newer than this request: it is the one that does not fit."""


def capacity_victims(
    previews: Sequence[Preview],
    repo: str,
    pr_number: int,
    max_previews: int,
    requested_at: datetime | None = None,
) -> list[Preview]:
    """The least recently updated other previews to remove so one more fits in ``max_previews``.

    Recency is ``updated-at``: when the event behind a preview was received. A request older
    than every preview it would evict gets ``NoRoom`` instead, so when runs finish out of
    order the most recent requests are the ones that stay. Previews tagged
    ``pr-preview:keep=true`` are pinned by an operator: never evicted, not counted.
    """
    others = [
        preview
        for preview in previews
        if not preview.keep and (preview.repo, preview.pr_number) != (repo, pr_number)
    ]
    excess = len(others) - (max_previews - 1)
    if excess <= 0:
        return []
    victims = sorted(others, key=lambda preview: (preview.updated_at, preview.instance_id))[:excess]
    if requested_at is not None and all(v.updated_at > requested_at for v in victims):
        raise NoRoom(
            f"max_previews={max_previews} and every live preview is more recent than this"
            f" request ({', '.join(v.name for v in victims)})"
        )
    return victims


def make_room(
    ec2: EC2Client,
    config: PreviewConfig,
    repo: str,
    pr_number: int,
    *,
    wait: bool = True,
    requested_at: datetime | None = None,
) -> Terminated:
    victims = capacity_victims(
        find_previews(ec2, config.purpose_tag),
        repo,
        pr_number,
        config.max_previews,
        requested_at,
    )
    return terminate_previews(
        ec2,
        victims,
        reason=f"evicted: max_previews={config.max_previews}",
        timeout_seconds=config.terminate_timeout_seconds,
        poll_seconds=config.poll_seconds,
        wait=wait,
    )


def _log(result: Terminated) -> None:
    logger = get_run_logger()
    for instance_id in result.instance_ids:
        logger.info("terminated %s (%s)", instance_id, result.reasons[instance_id])
    for instance_id in result.already_gone:
        logger.info("%s was already gone", instance_id)


@task(
    name="terminate",
    retries=3,
    retry_delay_seconds=2,
    retry_condition_fn=retry_transient,
    cache_policy=NO_CACHE,
)
def terminate(
    ec2: EC2Client,
    config: PreviewConfig,
    repo: str,
    pr_number: int,
    keep_sha: str | None,
    requested_at: datetime | None = None,
) -> Terminated:
    """Terminate this PR's instances at older shas, then evict for capacity (runbook §2.4).

    Unlike the runbook it does not wait for ``terminated``: ``TerminateInstances`` frees the
    slot at once, and waiting would put ~30 s of shutdown on the way to every new preview.
    """
    result = terminate_outdated(ec2, config, repo, pr_number, keep_sha, wait=False)
    if keep_sha is not None:
        evicted = make_room(ec2, config, repo, pr_number, wait=False, requested_at=requested_at)
        result.instance_ids += evicted.instance_ids
        result.already_gone += evicted.already_gone
        result.reasons.update(evicted.reasons)
    _log(result)
    return result


@task(
    name="terminate-instance",
    retries=3,
    retry_delay_seconds=2,
    retry_condition_fn=retry_transient,
    cache_policy=NO_CACHE,
)
def terminate_instance(ec2: EC2Client, config: PreviewConfig, instance_id: str) -> Terminated:
    """Terminate one instance by id, e.g. a failed preview that could not be put on a short TTL."""
    result = terminate_in_batches(ec2, [instance_id])
    if result.failed:
        raise TerminateFailed(
            f"could not terminate {instance_id}: {result.failed[instance_id]}",
            result,
            transient=result.only_transient_failures,
        )
    return Terminated(
        result.terminated, result.already_gone, dict.fromkeys(result.terminated, "failed")
    )
