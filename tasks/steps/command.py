"""What a ``/preview`` command does: who may give one, its acknowledgement, and the changes to
the PR's preview that only a command makes (stop, start, extend, a fork's commit approved).

Who may command is asked of GitHub afresh each time (the collaborator permission API: write or
admin); a comment's ``author_association`` says how someone is related to the repository, not
what they may do in it now. The commands that launch or end a preview (redeploy, destroy) are
the preview and teardown steps, composed by ``flows/command.py``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from tasks.cloud.aws import AwsClients
from tasks.cloud.expiry import hours_from, set_expiry
from tasks.cloud.instances import Preview, find_previews, stop_instance
from tasks.cloud.power import sleep_tags, wake_instance
from tasks.cloud.tags import TAG_SHUTDOWN_AT, format_time
from tasks.config import PreviewConfig
from tasks.github.client import WRITE_PERMISSIONS, GitHub, GitHubError, Reaction
from tasks.run.approvals import record_approval
from tasks.run.prefect_context import run_logger
from tasks.run.step import step

if TYPE_CHECKING:
    from mypy_boto3_ec2 import EC2Client

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Authorization:
    login: str
    permission: str  # admin, write, read or none, as GitHub says it now

    @property
    def ok(self) -> bool:
        return self.permission in WRITE_PERMISSIONS


@step(retry=False)
def authorize(github: GitHub, repo: str, login: str) -> Authorization:
    """``login``'s permission on ``repo``, asked now; the client retries by itself."""
    found = Authorization(login, github.collaborator_permission(repo, login))
    run_logger(logger).info("@%s has %s permission on %s", login, found.permission, repo)
    return found


@step(retry=False)
def acknowledge(github: GitHub, repo: str, comment_id: int, reaction: Reaction) -> bool:
    """React to the command's comment; a reaction GitHub refuses is logged, never fatal."""
    try:
        github.create_reaction(repo, comment_id, reaction)
    except GitHubError as exc:
        run_logger(logger).warning("no reaction on comment %d: %s", comment_id, exc)
        return False
    return True


@step(retry=False)
def reply(github: GitHub, repo: str, pr_number: int, body: str) -> None:
    """A comment of its own for the commenter (the sticky comment stays the preview's)."""
    github.create_issue_comment(repo, pr_number, body)


@step(retry=False)
def approve_commit(repo: str, pr_number: int, sha: str, login: str) -> None:
    """Record that ``login`` (write access, asked of GitHub just now) approved ``sha``, the
    fork's head: its preview may run, and no other commit's (``tasks/run/approvals.py``)."""
    record_approval(repo, pr_number, sha, login)


@step
def pr_previews(
    ec2: EC2Client, settings: PreviewConfig, repo: str, pr_number: int
) -> list[Preview]:
    """The PR's live previews (pending, running, stopping, stopped), oldest first."""
    return find_previews(ec2, settings.purpose_tag, repo=repo, pr_number=pr_number)


@step(needs_lock=True)
def stop_preview(clients: AwsClients, settings: PreviewConfig, preview: Preview) -> None:
    """Put the preview to sleep by hand (``sleep-state=manual``: its stopped hours cost only
    its disk, and no schedule wakes it); its shutdown-at stays, so the sweeper ends it on time."""
    clients.ec2.create_tags(
        Resources=[preview.instance_id], Tags=sleep_tags(preview, "manual", datetime.now(UTC))
    )
    stop_instance(
        clients.ec2,
        preview.instance_id,
        timeout_seconds=settings.terminate_timeout_seconds,
        poll=settings.poll_seconds,
    )
    run_logger(logger).info("%s stopped", preview.instance_id)


@step(needs_lock=True)
def start_preview(clients: AwsClients, settings: PreviewConfig, preview: Preview) -> None:
    """Start a stopped preview as any wake does (its sleep accounted for, ``sleep-state``
    gone, the shutdown timer re-armed from shutdown-at once its agent answers); a preview whose
    shutdown-at has passed or cannot be read gets the short TTL first."""
    now = datetime.now(UTC)
    if preview.shutdown_at is None or preview.shutdown_at <= now:
        clients.ec2.create_tags(
            Resources=[preview.instance_id],
            Tags=[
                {
                    "Key": TAG_SHUTDOWN_AT,
                    "Value": format_time(hours_from(now, settings.failure_ttl_hours)),
                }
            ],
        )
    woke = wake_instance(clients, settings, preview.instance_id)
    run_logger(logger).info(
        "%s started in %.1f s, shutdown timer %d min",
        preview.instance_id,
        woke.seconds,
        woke.timer_minutes,
    )


def extended_until(
    settings: PreviewConfig, hours: float, now: datetime, current: datetime | None = None
) -> datetime:
    """``hours`` from ``now``, never past ``max_ttl_hours`` from now — and never before the
    ``current`` expiry: an extend does not shorten a preview's life."""
    wanted = hours_from(now, min(hours, settings.max_ttl_hours))
    return max(wanted, current) if current is not None else wanted


@step(needs_lock=True)
def extend_preview(
    clients: AwsClients, settings: PreviewConfig, preview: Preview, hours: float
) -> datetime:
    """Move the preview's expiry to ``hours`` from now (at most ``max_ttl_hours``; an expiry
    already later stays): the timer on a running instance first, then ``shutdown-at``; a
    stopped one gets its timer on start."""
    shutdown_at = extended_until(settings, hours, datetime.now(UTC), preview.shutdown_at)
    set_expiry(clients.ec2, clients.ssm, preview, shutdown_at, poll=settings.poll_seconds)
    run_logger(logger).info("%s shutdown-at %s", preview.instance_id, format_time(shutdown_at))
    return shutdown_at
