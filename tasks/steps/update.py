"""Change a running preview instead of replacing it: the in-place update on ``synchronize``
and the failure policy's short TTL.

An update costs seconds where a relaunch costs an EC2 boot: point ``APP_IMAGE`` in
``{app_dir}/.env`` at the new sha's image, by the digest the image check saw
(``image:sha@digest``), ``docker compose pull`` and ``up -d`` — then the flow
migrates and probes as after a launch. Once the new containers run, the instance's tags say so:
``Sha``, ``updated-at`` and a fresh ``shutdown-at`` (the on-instance shutdown timer is moved
with it). Relaunching is the flow's call when :func:`preview_health` says unhealthy or an
update step fails.
"""

from __future__ import annotations

import logging
import math
import shlex
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from botocore.exceptions import ClientError

from tasks.app.app_env import AppFiles, app_env_commands
from tasks.app.masking import mask_secrets
from tasks.cloud.aws import AwsClients
from tasks.cloud.ecr import ecr_login, ecr_repository
from tasks.cloud.instances import describe_preview, find_previews
from tasks.cloud.on_instance import (
    BOOTSTRAP_DONE,
    TCP_CHECK_DIRECTIVE,
    compose_command,
    tcp_check,
    timer_command,
    timer_minutes,
    write_file,
)
from tasks.cloud.ssm import CommandTimeout, agent_not_registered, run_command
from tasks.cloud.tags import TAG_SHA, TAG_SHUTDOWN_AT, TAG_UPDATED_AT, format_time, parse_time
from tasks.config import PreviewConfig
from tasks.inputs import is_sha
from tasks.run.errors import PreviewError
from tasks.run.prefect_context import run_logger
from tasks.run.step import step

if TYPE_CHECKING:
    from mypy_boto3_ec2 import EC2Client
    from mypy_boto3_ssm import SSMClient

logger = logging.getLogger(__name__)

OUTPUT_TAIL = 4000
HEALTH_MARKER = "# pr-preview-health"


class UpdateFailed(PreviewError):
    """The in-place update did not complete; relaunch. ``output`` is masked."""

    def __init__(self, message: str, output: str = "") -> None:
        self.output = output
        super().__init__(message)


@dataclass(frozen=True)
class UpdateResult:
    instance_id: str
    previous_sha: str | None
    sha: str
    image: str
    shutdown_at: datetime
    updated_at: datetime
    seconds: float
    path: str = "in-place"
    launched_at: datetime | None = None  # the instance's EC2 launch: what its cost runs from


@dataclass(frozen=True)
class Health:
    instance_id: str
    healthy: bool
    reason: str


@dataclass(frozen=True)
class TtlChange:
    instance_id: str
    before: datetime | None
    after: datetime
    changed: bool


def check_health(
    ec2: EC2Client,
    ssm: SSMClient,
    settings: PreviewConfig,
    instance_id: str,
    *,
    timeout_seconds: float = 30.0,
) -> Health:
    """Is this preview worth updating in place? Running, bootstrapped, app port open.
    One SSM command; an instance that does not answer is unhealthy, not an error."""
    preview = describe_preview(ec2, instance_id)
    if preview is None:
        return Health(instance_id, False, "instance not found")
    if preview.state != "running":
        return Health(instance_id, False, f"instance is {preview.state}")
    commands = health_commands(settings)
    try:
        result = run_command(
            ssm,
            instance_id,
            commands,
            timeout_seconds=timeout_seconds,
            poll_seconds=min(settings.poll_seconds, 1.0),
            comment="pr-preview health",
        )
    except CommandTimeout:
        return Health(instance_id, False, "SSM command timed out")
    except ClientError as exc:
        if agent_not_registered(exc):
            return Health(instance_id, False, "SSM agent not reachable")
        raise
    if result.ok and "healthy" in result.stdout.split():
        return Health(instance_id, True, "healthy")
    reason = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else result.status
    return Health(instance_id, False, reason)


def health_commands(settings: PreviewConfig) -> list[str]:
    """Bootstrapped and the app port open; ``healthy`` on the last line when both hold."""
    port = shlex.quote(str(settings.app_port))
    return [
        HEALTH_MARKER,
        f"test -f {BOOTSTRAP_DONE} || {{ echo 'bootstrap not done'; exit 1; }}",
        TCP_CHECK_DIRECTIVE,
        f"{tcp_check('127.0.0.1', port)} 2>/dev/null || {{ echo app port {port} closed; exit 1; }}",
        "echo healthy",
    ]


def deploy_commands(
    settings: PreviewConfig, repo: str, image_ref: str, app: AppFiles | None = None
) -> list[str]:
    """Rewrite APP_IMAGE, log in to the registry again (the token may have rotated, an ECR
    password lasts 12 hours: :func:`registry_login`), pull, recreate, move the timer.
    With ``app`` also rewrite the app's settings (and compose file) and re-read its secrets on
    the instance (tasks/app/app_env.py): a change takes effect on this push."""
    app_dir = shlex.quote(settings.app_dir)
    line = shlex.quote(f"APP_IMAGE={image_ref}")
    ttl_minutes = timer_minutes(settings.failure_ttl_hours)  # provisional until confirm_ttl
    return [
        "set -euo pipefail",
        'export HOME="${HOME:-/root}"',
        f"cd {app_dir}",
        write_file(
            f"{settings.app_dir}/.env",
            f"grep -v '^APP_IMAGE=' .env 2>/dev/null || true; echo {line}",
        ),
        *(app_env_commands(settings, app) if app is not None else []),
        registry_login(settings, repo),
        f"{compose_command(settings.app_dir)} pull {shlex.quote(settings.app_service)}",
        f"{compose_command(settings.app_dir)} up -d",
        f"{timer_command(ttl_minutes)} || true",
        f"echo updated to {shlex.quote(image_ref)}",
    ]


def registry_login(settings: PreviewConfig, repo: str) -> str:
    """One line: the login of a push, the token going from Parameter Store straight into
    ``docker login`` — or, for an ECR image, the instance role's ECR password
    (tasks/cloud/ecr.py)."""
    ecr = ecr_repository(settings, repo)
    if ecr is not None:
        return ecr_login(ecr)
    q = shlex.quote
    return (
        f"aws ssm get-parameter --region {q(settings.region)} --with-decryption"
        f" --name {q(settings.ghcr_token_parameter)} --query Parameter.Value"
        f" --output text | docker login {q(settings.image_for(repo).split('/', 1)[0])}"
        f" -u {q(settings.registry_username(repo))} --password-stdin"
    )


def move_tags(
    ec2: EC2Client, instance_id: str, *, sha: str, ttl_hours: float, now: datetime
) -> tuple[datetime, datetime]:
    """``Sha`` → ``sha``, ``updated-at`` → now, ``shutdown-at`` → now + ``ttl_hours``."""
    shutdown_at = now + timedelta(hours=ttl_hours)
    ec2.create_tags(
        Resources=[instance_id],
        Tags=[
            {"Key": TAG_SHA, "Value": sha},
            {"Key": TAG_UPDATED_AT, "Value": format_time(now)},
            {"Key": TAG_SHUTDOWN_AT, "Value": format_time(shutdown_at)},
        ],
    )
    return shutdown_at, now


def deploy_in_place(
    ec2: EC2Client,
    ssm: SSMClient,
    settings: PreviewConfig,
    instance_id: str,
    *,
    repo: str,
    sha: str,
    digest: str,
    now: datetime | None = None,
    timeout_seconds: float | None = None,
    app: AppFiles | None = None,
) -> UpdateResult:
    """Deploy ``sha`` on the running preview ``instance_id`` and move its tags. ``digest`` is the
    manifest the image check saw: the instance pulls that, whatever the tag says by then.

    ``timeout_seconds`` bounds login, pull and recreate (default ``ready_timeout_seconds``).
    ``UpdateFailed`` when the instance is gone or not running or a step fails: relaunch then.
    """
    if not is_sha(sha):
        raise ValueError(f"{sha!r} is not a git sha")
    image_ref = settings.pinned_image(repo, sha, digest)
    started = time.monotonic()
    preview = describe_preview(ec2, instance_id)
    if preview is None or preview.state != "running":
        state = preview.state if preview else "gone"
        raise UpdateFailed(f"{instance_id} is {state}: cannot update in place")
    timeout = settings.ready_timeout_seconds if timeout_seconds is None else timeout_seconds
    try:
        result = run_command(
            ssm,
            instance_id,
            deploy_commands(settings, repo, image_ref, app),
            timeout_seconds=timeout,
            poll_seconds=min(settings.poll_seconds, 1.0),
            comment=f"pr-preview update to {sha[:12]}",
        )
    except CommandTimeout as exc:
        raise UpdateFailed(
            f"update of {instance_id} timed out after {math.ceil(timeout)}s"
        ) from exc
    if not result.ok:
        raise UpdateFailed(
            f"update of {instance_id} to {sha[:12]} failed (exit {result.exit_code})",
            mask_secrets(result.output[-OUTPUT_TAIL:]),
        )
    shutdown_at, updated_at = move_tags(
        ec2,
        instance_id,
        sha=sha,
        ttl_hours=settings.failure_ttl_hours,
        now=now or datetime.now(UTC),
    )
    return UpdateResult(
        instance_id=instance_id,
        previous_sha=preview.sha,
        sha=sha,
        image=image_ref,
        shutdown_at=shutdown_at,
        updated_at=updated_at,
        seconds=time.monotonic() - started,
        launched_at=preview.launch_time,
    )


def ttl_commands(settings: PreviewConfig) -> list[str]:
    """The full TTL of a ready preview, on the instance."""
    return [timer_command(timer_minutes(settings.ttl_hours))]


def confirm_full_ttl(
    ec2: EC2Client,
    ssm: SSMClient,
    settings: PreviewConfig,
    instance_id: str,
    *,
    now: datetime | None = None,
    timer_moved: bool = False,
) -> datetime:
    """A ready preview gets its full TTL: the on-instance timer first, then ``shutdown-at``.

    Until then it runs on the short TTL it was launched or updated with, so a run that dies
    between launch and ready leaves nothing the sweeper keeps for long. ``timer_moved``: the
    probe's healthy answer already moved the timer (``tasks.steps.probe``); only the tag is left.
    """
    if not timer_moved:
        result = run_command(
            ssm,
            instance_id,
            ttl_commands(settings),
            timeout_seconds=60,
            poll_seconds=min(settings.poll_seconds, 1.0),
            comment="pr-preview confirm TTL",
        )
        if not result.ok:
            raise UpdateFailed(f"could not move the shutdown timer of {instance_id}", result.output)
    shutdown_at = ((now or datetime.now(UTC)) + timedelta(hours=settings.ttl_hours)).replace(
        microsecond=0
    )
    ec2.create_tags(
        Resources=[instance_id], Tags=[{"Key": TAG_SHUTDOWN_AT, "Value": format_time(shutdown_at)}]
    )
    return shutdown_at


@step(needs_lock=True)
def confirm_ttl(
    clients: AwsClients, settings: PreviewConfig, instance_id: str, timer_moved: bool = False
) -> datetime:
    shutdown_at = confirm_full_ttl(
        clients.ec2, clients.ssm, settings, instance_id, timer_moved=timer_moved
    )
    run_logger(logger).info("%s is ready: shutdown-at %s", instance_id, format_time(shutdown_at))
    return shutdown_at


def set_short_ttl(
    ec2: EC2Client, instance_id: str, hours: float, *, now: datetime | None = None
) -> TtlChange:
    """The failure policy: ``shutdown-at`` becomes now + ``hours`` unless it is already sooner.
    An unparsable tag is replaced (the short TTL is the safe value)."""
    now = now or datetime.now(UTC)
    target = (now + timedelta(hours=hours)).replace(microsecond=0)
    preview = describe_preview(ec2, instance_id)
    before = preview.shutdown_at if preview else None
    if before is not None and before <= target:
        return TtlChange(instance_id, before, before, False)
    ec2.create_tags(
        Resources=[instance_id], Tags=[{"Key": TAG_SHUTDOWN_AT, "Value": format_time(target)}]
    )
    return TtlChange(instance_id, before, parse_time(format_time(target)) or target, True)


@step
def preview_health(clients: AwsClients, settings: PreviewConfig, instance_id: str) -> Health:
    health = check_health(clients.ec2, clients.ssm, settings, instance_id)
    run_logger(logger).info("%s: %s", instance_id, health.reason)
    return health


@step
def in_place_candidate(
    ec2: EC2Client, settings: PreviewConfig, repo: str, pr_number: int, sha: str
) -> str | None:
    """The PR's one running instance at another sha, which a push may update in place."""
    running = [
        preview
        for preview in find_previews(
            ec2, settings.purpose_tag, repo=repo, pr_number=pr_number, states=("running",)
        )
        if preview.sha != sha
    ]
    return running[0].instance_id if len(running) == 1 else None


@step(needs_lock=True)
def update_in_place(
    clients: AwsClients,
    settings: PreviewConfig,
    instance_id: str,
    repo: str,
    sha: str,
    digest: str,
    app: AppFiles | None = None,
) -> UpdateResult:
    """Prefect wrapper; ``UpdateFailed`` is final for this path (the flow relaunches)."""
    result = deploy_in_place(
        clients.ec2, clients.ssm, settings, instance_id, repo=repo, sha=sha, digest=digest, app=app
    )
    run_logger(logger).info(
        "%s updated in place %s → %s in %.1fs (shutdown-at %s)",
        instance_id,
        (result.previous_sha or "?")[:7],
        sha[:7],
        result.seconds,
        format_time(result.shutdown_at),
    )
    return result


@step
def shorten_ttl(clients: AwsClients, settings: PreviewConfig, instance_id: str) -> TtlChange:
    change = set_short_ttl(clients.ec2, instance_id, settings.failure_ttl_hours)
    run_logger(logger).info(
        "%s shutdown-at %s%s",
        instance_id,
        format_time(change.after),
        "" if change.changed else " (already sooner)",
    )
    return change
