"""Warm spares: running, bootstrapped instances that serve no pull request until one claims it.

A spare boots the preview's own user data up to the app — Docker, Compose, the env files and
the compose file — and stops there: no image, no login. It carries our Purpose tag, the spare
marker and its own ``shutdown-at`` (``spare_ttl_hours``), so the sweeper's TTL rule bounds its
cost like any preview's; it has no Repo or PR tag, so it never counts against
``max_previews``.

A new PR claims one under the fleet lock: the oldest spare of the current instance type and
AMI whose bootstrap is done and whose Docker answers is re-tagged to the PR on the short TTL,
and the flow then deploys on it as a push deploys in place (login, pull, up, migrate, probe).
A spare that failed its bootstrap or whose Docker does not answer is terminated, never
claimed. The flow asks for a replacement without waiting for it: ``pr-preview.spare.claimed``
starts the ``pr-spares`` deployment, which also rotates spares of an AMI or type that is no
longer current.

Spares follow the sleep schedule (flows/sleep.py): stopped at night, started in the morning.
A claim at night starts a stopped spare before it checks it; a stopped spare counts as one of
``warm_spares``, so nothing launches a running replacement for it.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from botocore.exceptions import ClientError

from tasks.app.user_data import LaunchSpec, preview_tags, render_spare_user_data
from tasks.cloud.app_proxy import UPSTREAM_FILE
from tasks.cloud.aws import AwsClients
from tasks.cloud.instances import terminate_in_batches
from tasks.cloud.on_instance import BOOTSTRAP_DONE, BOOTSTRAP_FAILED
from tasks.cloud.power import wake_instance
from tasks.cloud.run_instances import AmiNotFound, resolve_ami, run_instances_params
from tasks.cloud.ssm import CommandTimeout, agent_not_registered, run_command
from tasks.cloud.tags import (
    SPARE,
    TAG_NAME,
    TAG_PURPOSE,
    TAG_SHA,
    TAG_SHUTDOWN_AT,
    TAG_SPARE,
    TAG_UPDATED_AT,
    format_time,
    parse_time,
)
from tasks.config import PreviewConfig
from tasks.run.errors import PreviewError
from tasks.run.prefect_context import run_logger
from tasks.run.step import step

if TYPE_CHECKING:
    from mypy_boto3_ec2 import EC2Client
    from mypy_boto3_ssm import SSMClient

logger = logging.getLogger(__name__)

CLAIMED = "claimed"  # its value once a PR took the instance over
SPARE_NAME = "pr-preview-spare"
# A spare this close to its shutdown-at is not claimed: the claim would race the sweeper.
CLAIM_MARGIN = timedelta(minutes=10)

# Exit codes of the spare check: 0 ready, BOOTING not yet, anything else broken.
BOOTING = 3
# A spare just woken from its sleep: Docker starts with the instance, beside the SSM agent.
WOKEN_DOCKER_WAIT_SECONDS = 30


def spare_check(docker_wait_seconds: int = 0) -> list[str]:
    """The spare's readiness check; ``docker_wait_seconds``: how long Docker may take to
    answer (a spare that just started)."""
    return [
        f"if [ -f {BOOTSTRAP_FAILED} ]; then echo 'bootstrap failed'; exit 2; fi",
        f"if [ ! -f {BOOTSTRAP_DONE} ]; then echo 'bootstrap not done yet'; exit {BOOTING}; fi",
        f"for _ in $(seq 1 {int(docker_wait_seconds)}); do",
        "  docker version >/dev/null 2>&1 && break",
        "  sleep 1",
        "done",
        "if ! docker version >/dev/null 2>&1; then echo 'docker does not answer'; exit 1; fi",
        "if ! docker compose version >/dev/null 2>&1; then echo 'docker compose missing'; exit 1;"
        " fi",
        # A spare booted before the app port's proxy cannot take a push with no failed request.
        f"if [ ! -f {UPSTREAM_FILE} ]; then echo 'no app proxy (booted by an older pr-preview)';"
        " exit 1; fi",
        "echo spare-ready",
    ]


@dataclass(frozen=True)
class Spare:
    instance_id: str
    state: str
    launch_time: datetime
    image_id: str
    instance_type: str
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def shutdown_at(self) -> datetime | None:
        return parse_time(self.tags.get(TAG_SHUTDOWN_AT))

    @classmethod
    def from_instance(cls, instance: Any) -> Spare:
        launch = instance.get("LaunchTime") or datetime.now(UTC)
        return cls(
            instance_id=instance["InstanceId"],
            state=instance["State"]["Name"],
            launch_time=launch if launch.tzinfo else launch.replace(tzinfo=UTC),
            image_id=instance.get("ImageId", ""),
            instance_type=instance.get("InstanceType", ""),
            tags={tag["Key"]: tag["Value"] for tag in instance.get("Tags", [])},
        )

    def current(self, settings: PreviewConfig, ami_id: str) -> bool:
        """Built from the AMI and type a launch would use now."""
        return self.image_id == ami_id and self.instance_type == settings.instance_type


def spare_tags(settings: PreviewConfig, now: datetime) -> dict[str, str]:
    return {
        TAG_PURPOSE: settings.purpose_tag,
        TAG_SPARE: SPARE,
        TAG_SHUTDOWN_AT: format_time(now + timedelta(hours=settings.spare_ttl_hours)),
        TAG_UPDATED_AT: format_time(now, precise=True),
        TAG_NAME: SPARE_NAME,
    }


def find_spares(
    ec2: EC2Client, settings: PreviewConfig, *, states: tuple[str, ...] = ("pending", "running")
) -> list[Spare]:
    """Our unclaimed spares in ``states``, oldest first."""
    filters: list[Any] = [
        {"Name": f"tag:{TAG_PURPOSE}", "Values": [settings.purpose_tag]},
        {"Name": f"tag:{TAG_SPARE}", "Values": [SPARE]},
        {"Name": "instance-state-name", "Values": list(states)},
    ]
    found = [
        Spare.from_instance(instance)
        for page in ec2.get_paginator("describe_instances").paginate(Filters=filters)
        for reservation in page["Reservations"]
        for instance in reservation["Instances"]
    ]
    return sorted(found, key=lambda spare: (spare.launch_time, spare.instance_id))


def launch_spare(
    ec2: EC2Client,
    settings: PreviewConfig,
    *,
    ami_id: str,
    subnet_id: str | None,
    now: datetime | None = None,
) -> str:
    """One spare: the preview's user data up to the app, on the spare's own TTL."""
    now = (now or datetime.now(UTC)).replace(microsecond=0)
    params = run_instances_params(
        settings,
        ami_id=ami_id,
        subnet_id=subnet_id,
        tags=spare_tags(settings, now),
        user_data=render_spare_user_data(settings),
        client_token=f"pr-preview-spare-{uuid.uuid4().hex}",
    )
    return ec2.run_instances(**params)["Instances"][0]["InstanceId"]


@dataclass(frozen=True)
class SpareCheck:
    ready: bool
    booting: bool
    reason: str


def check_spare(
    ssm: SSMClient,
    settings: PreviewConfig,
    instance_id: str,
    *,
    timeout_seconds: float = 30.0,
    docker_wait_seconds: int = 0,
) -> SpareCheck:
    """Is the spare bootstrapped with a Docker that answers? One SSM command."""
    try:
        result = run_command(
            ssm,
            instance_id,
            spare_check(docker_wait_seconds),
            timeout_seconds=timeout_seconds + docker_wait_seconds,
            poll_seconds=min(settings.poll_seconds, 0.5),
            comment="pr-preview spare check",
        )
    except ClientError as exc:
        if not agent_not_registered(exc):
            raise
        return SpareCheck(False, True, "its SSM agent has not registered yet")
    except CommandTimeout:
        return SpareCheck(False, False, "the SSM agent did not answer")
    reason = (result.stdout.strip().splitlines() or [f"exit {result.exit_code}"])[-1]
    return SpareCheck(result.ok, result.exit_code == BOOTING, reason)


@dataclass
class Claim:
    instance_id: str | None = None
    shutdown_at: datetime | None = None
    terminated: dict[str, str] = field(default_factory=dict)  # broken spare → why
    skipped: dict[str, str] = field(default_factory=dict)  # spare still booting → why
    woken: list[str] = field(default_factory=list)  # asleep spares started on the way


def claim_spare(
    ec2: EC2Client,
    ssm: SSMClient,
    settings: PreviewConfig,
    spec: LaunchSpec,
    *,
    ami_id: str,
    now: datetime | None = None,
    wake: Callable[[str], object] | None = None,
) -> Claim:
    """Take the oldest ready spare of the current type and AMI for ``spec`` (hold the fleet
    lock: a spare is claimed once). Broken spares met on the way are terminated.

    Running spares first; then, when nothing runs (the night: the sleep schedule stopped
    them), a stopped one is started with ``wake`` (start, its agent, its shutdown timer) and
    checked like any other. Without ``wake`` a stopped spare is never claimed."""
    now = (now or datetime.now(UTC)).replace(microsecond=0)
    claim = Claim()
    found = find_spares(ec2, settings, states=("running", "stopped"))
    for spare in sorted(found, key=lambda spare: spare.state != "running"):
        if not spare.current(settings, ami_id):
            continue  # pr-spares rotates it
        if spare.shutdown_at is None or spare.shutdown_at <= now + CLAIM_MARGIN:
            continue  # the sweeper's
        docker_wait = 0
        if spare.state == "stopped":
            if wake is None:
                claim.skipped[spare.instance_id] = "asleep, and this claim cannot wake it"
                continue
            try:
                wake(spare.instance_id)
            except PreviewError as exc:
                claim.skipped[spare.instance_id] = f"asleep, and did not wake: {exc}"
                continue
            claim.woken.append(spare.instance_id)
            docker_wait = WOKEN_DOCKER_WAIT_SECONDS
        checked = check_spare(ssm, settings, spare.instance_id, docker_wait_seconds=docker_wait)
        if checked.booting:
            claim.skipped[spare.instance_id] = checked.reason
            continue
        if not checked.ready:
            # A failed terminate leaves it to its spare TTL; it is not claimed either way.
            terminate_in_batches(ec2, [spare.instance_id])
            claim.terminated[spare.instance_id] = checked.reason
            continue
        # The PR's tags on the short TTL; no Sha until the deploy moves it, so a run that
        # dies here leaves an instance a later run replaces, never one it takes as ready.
        tags = {
            **preview_tags(settings, spec, now, settings.failure_ttl_hours),
            TAG_SHA: "",
            TAG_SPARE: CLAIMED,
        }
        del tags[TAG_PURPOSE]  # ours already: a claim never changes whose instance it is
        ec2.create_tags(
            Resources=[spare.instance_id],
            Tags=[{"Key": key, "Value": value} for key, value in tags.items()],
        )
        claim.instance_id = spare.instance_id
        claim.shutdown_at = now + timedelta(hours=settings.failure_ttl_hours)
        return claim
    return claim


@step(needs_lock=True)
def claim(
    clients: AwsClients, settings: PreviewConfig, spec: LaunchSpec, ami_id: str | None
) -> Claim:
    """Prefect wrapper of :func:`claim_spare`; a claim that finds nothing returns empty.
    Without ``ami_id``, spares are matched against the AMI a launch would resolve; with none
    to resolve, nothing matches (preflight then says why no launch can happen either)."""
    try:
        image = ami_id or resolve_ami(clients.ec2, settings)["ImageId"]
    except AmiNotFound as exc:
        run_logger(logger).warning("no spare claimed: %s", exc)
        return Claim()
    found = claim_spare(
        clients.ec2,
        clients.ssm,
        settings,
        spec,
        ami_id=image,
        wake=lambda instance_id: wake_instance(clients, settings, instance_id),
    )
    log = run_logger(logger)
    for instance_id in found.woken:
        log.info("spare %s was asleep: started for the claim", instance_id)
    for instance_id, reason in found.terminated.items():
        log.warning("spare %s terminated, not claimed: %s", instance_id, reason)
    for instance_id, reason in found.skipped.items():
        log.info("spare %s skipped: %s", instance_id, reason)
    if found.instance_id:
        log.info("claimed spare %s for %s#%d", found.instance_id, spec.repo, spec.pr_number)
    else:
        log.info("no ready spare: launching")
    return found


@dataclass
class Replenished:
    launched: list[str] = field(default_factory=list)
    rotated: dict[str, str] = field(default_factory=dict)  # instance → why
    kept: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        return _replenished_markdown(self)


def replenish_spares(
    ec2: EC2Client,
    settings: PreviewConfig,
    *,
    ami_id: str,
    subnet_id: str | None,
    now: datetime | None = None,
) -> Replenished:
    """Bring the spares to ``warm_spares``: rotate those of another AMI or type and those
    near their shutdown-at, launch what is missing, terminate what is beyond the count."""
    now = now or datetime.now(UTC)
    result = Replenished()
    current: list[Spare] = []
    # Spares asleep for the night count: the wake schedule starts them in the morning.
    for spare in find_spares(ec2, settings, states=("pending", "running", "stopping", "stopped")):
        if not spare.current(settings, ami_id):
            result.rotated[spare.instance_id] = (
                f"built from {spare.image_id} ({spare.instance_type}); current is"
                f" {ami_id} ({settings.instance_type})"
            )
        elif spare.shutdown_at is None or spare.shutdown_at <= now + CLAIM_MARGIN:
            result.rotated[spare.instance_id] = "at the end of its spare TTL"
        else:
            current.append(spare)
    # Newest kept: the oldest go first when there are too many.
    excess = max(0, len(current) - settings.warm_spares)
    for spare in current[:excess]:
        result.rotated[spare.instance_id] = f"beyond warm_spares={settings.warm_spares}"
    result.kept = [spare.instance_id for spare in current[excess:]]
    if result.rotated:
        ended = terminate_in_batches(ec2, list(result.rotated))
        if ended.failed:
            raise RuntimeError(f"could not rotate spares: {ended.failed}")
    for _ in range(settings.warm_spares - len(result.kept)):
        result.launched.append(
            launch_spare(ec2, settings, ami_id=ami_id, subnet_id=subnet_id, now=now)
        )
    return result


def _replenished_markdown(result: Replenished) -> str:
    rows = [
        *(f"| `{iid}` | launched | |" for iid in result.launched),
        *(f"| `{iid}` | rotated | {why} |" for iid, why in result.rotated.items()),
        *(f"| `{iid}` | kept | |" for iid in result.kept),
    ]
    return "\n".join(
        ["## Warm spares", "", "| instance | | why |", "| --- | --- | --- |", *rows]
        if rows
        else ["## Warm spares", "", "none wanted, none running"]
    )


@step(needs_lock=True)
def replenish(
    clients: AwsClients, settings: PreviewConfig, ami_id: str, subnet_id: str | None
) -> Replenished:
    """Prefect wrapper of :func:`replenish_spares`."""
    result = replenish_spares(clients.ec2, settings, ami_id=ami_id, subnet_id=subnet_id)
    run_logger(logger).info(
        "spares: %d launched, %d rotated, %d kept (warm_spares=%d)",
        len(result.launched),
        len(result.rotated),
        len(result.kept),
        settings.warm_spares,
    )
    return result
