"""Launch (runbook §2.4, §3): one tagged, TTL-bound instance per pull request and sha."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from tasks.app.user_data import LaunchSpec, preview_tags, render_user_data
from tasks.cloud.instances import find_previews
from tasks.cloud.run_instances import resolve_ami, run_instances_params
from tasks.cloud.tags import format_time
from tasks.config import PreviewConfig
from tasks.run.prefect_context import run_logger
from tasks.run.step import step

if TYPE_CHECKING:
    from mypy_boto3_ec2 import EC2Client

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LaunchResult:
    instance_id: str
    sha: str
    shutdown_at: datetime
    reused: bool
    ami_id: str
    launched_at: datetime | None = None  # EC2's LaunchTime: what the preview's cost runs from


def client_token(spec: LaunchSpec, attempt_key: str = "") -> str:
    """Idempotency token of one launch: the same repo/PR/sha within one run launches once.

    ``attempt_key`` (the flow-run id) keeps a later run for the same sha from being answered with
    an instance an earlier run already terminated.
    """
    digest = hashlib.sha256(f"{spec.repo}#{spec.pr_number}@{spec.sha}/{attempt_key}".encode())
    return f"pr-preview-{digest.hexdigest()[:48]}"


def launch_instance(
    ec2: EC2Client,
    settings: PreviewConfig,
    spec: LaunchSpec,
    *,
    ami_id: str | None = None,
    subnet_id: str | None = None,
    attempt_key: str = "",
    now: datetime | None = None,
) -> LaunchResult:
    """Launch the preview of ``spec``, or return the live instance that already serves it."""
    existing = find_previews(
        ec2,
        settings.purpose_tag,
        repo=spec.repo,
        pr_number=spec.pr_number,
        sha=spec.sha,
        states=("pending", "running"),
    )
    if existing:
        found = existing[-1]
        return LaunchResult(
            instance_id=found.instance_id,
            sha=spec.sha,
            shutdown_at=found.shutdown_at or datetime.now(UTC),
            reused=True,
            ami_id=ami_id or "",
            launched_at=found.launch_time,
        )
    now = (now or datetime.now(UTC)).replace(microsecond=0)
    image_id = ami_id or resolve_ami(ec2, settings)["ImageId"]
    # Provisional: the short TTL until the preview is ready (confirm_ttl), so a run that dies
    # half-way never leaves a long-lived instance behind.
    tags = preview_tags(settings, spec, now, settings.failure_ttl_hours)
    params = run_instances_params(
        settings,
        ami_id=image_id,
        subnet_id=subnet_id or settings.subnet_id,
        tags=tags,
        user_data=render_user_data(settings, spec),
        client_token=client_token(spec, attempt_key),
    )
    instance = ec2.run_instances(**params)["Instances"][0]
    return LaunchResult(
        instance_id=instance["InstanceId"],
        sha=spec.sha,
        shutdown_at=now + timedelta(hours=settings.failure_ttl_hours),
        reused=False,
        ami_id=image_id,
        launched_at=instance.get("LaunchTime"),
    )


@step(needs_lock=True)
def launch(
    ec2: EC2Client,
    settings: PreviewConfig,
    spec: LaunchSpec,
    ami_id: str | None = None,
    subnet_id: str | None = None,
    attempt_key: str = "",
) -> LaunchResult:
    result = launch_instance(
        ec2, settings, spec, ami_id=ami_id, subnet_id=subnet_id, attempt_key=attempt_key
    )
    verb = "reused" if result.reused else "launched"
    run_logger(logger).info(
        "%s %s for %s#%d at %s (shutdown-at %s)",
        verb,
        result.instance_id,
        spec.repo,
        spec.pr_number,
        spec.sha[:7],
        format_time(result.shutdown_at),
    )
    return result
