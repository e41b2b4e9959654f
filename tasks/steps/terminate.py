"""Terminate (runbook §2.4): the PR's previous instances, and room for a new one."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING

from tasks.cloud.instances import (
    Preview,
    Terminated,
    TerminateFailed,
    find_previews,
    terminate_in_batches,
    terminate_outdated,
    terminate_previews,
)
from tasks.config import PreviewConfig
from tasks.run.errors import PreviewError
from tasks.run.prefect_context import run_logger
from tasks.run.step import step

if TYPE_CHECKING:
    from mypy_boto3_ec2 import EC2Client


logger = logging.getLogger(__name__)


class NoRoom(PreviewError):
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
    ``pr-preview:keep=true`` are pinned by an operator: never evicted, not counted; an
    instance that serves no PR (a warm spare, a bake's builder) is not a preview and not
    counted either.
    """
    others = [
        preview
        for preview in previews
        if not preview.keep
        and preview.repo
        and preview.pr_number is not None
        and (preview.repo, preview.pr_number) != (repo, pr_number)
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
    settings: PreviewConfig,
    repo: str,
    pr_number: int,
    *,
    wait: bool = True,
    requested_at: datetime | None = None,
) -> Terminated:
    victims = capacity_victims(
        find_previews(ec2, settings.purpose_tag),
        repo,
        pr_number,
        settings.max_previews,
        requested_at,
    )
    return terminate_previews(
        ec2,
        victims,
        reason=f"evicted: max_previews={settings.max_previews}",
        timeout_seconds=settings.terminate_timeout_seconds,
        poll_seconds=settings.poll_seconds,
        wait=wait,
    )


def _log(result: Terminated) -> None:
    log = run_logger(logger)
    for instance_id in result.instance_ids:
        log.info("terminated %s (%s)", instance_id, result.reasons[instance_id])
    for instance_id in result.already_gone:
        log.info("%s was already gone", instance_id)


@step(needs_lock=True)
def terminate(
    ec2: EC2Client,
    settings: PreviewConfig,
    repo: str,
    pr_number: int,
    keep_sha: str | None,
    requested_at: datetime | None = None,
) -> Terminated:
    """Terminate this PR's instances at older shas, then evict for capacity (runbook §2.4).

    Unlike the runbook it does not wait for ``terminated``: ``TerminateInstances`` frees the
    slot at once, and waiting would put ~30 s of shutdown on the way to every new preview.
    """
    result = terminate_outdated(ec2, settings, repo, pr_number, keep_sha, wait=False)
    if keep_sha is not None:
        evicted = make_room(ec2, settings, repo, pr_number, wait=False, requested_at=requested_at)
        result.instance_ids += evicted.instance_ids
        result.already_gone += evicted.already_gone
        result.reasons.update(evicted.reasons)
    _log(result)
    return result


@step(needs_lock=True)
def terminate_instance(ec2: EC2Client, settings: PreviewConfig, instance_id: str) -> Terminated:
    """Terminate one instance by id, e.g. a failed preview that could not be put on a short TTL."""
    result = terminate_in_batches(ec2, [instance_id])
    if result.failed:
        raise TerminateFailed.of(
            f"could not terminate {instance_id}: {result.failed[instance_id]}",
            result,
            transient=result.only_transient_failures,
        )
    return Terminated(
        result.terminated, result.already_gone, dict.fromkeys(result.terminated, "failed")
    )
