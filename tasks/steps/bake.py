"""A baked AMI (issue 15): the stock AMI with Docker, Compose and the current image's layers on
it, so a preview boots without dnf, without the Compose download and with most layers in place.

The builder is an instance like a preview — our Purpose tag, a short ``shutdown-at``, IMDSv2 with
hop limit 1, the preview's instance profile — whose user data (``templates/bake_user_data.sh``)
installs Docker and Compose with the preview's own lines, logs in to the registry once with the
GHCR token from Parameter Store, pulls the current image, and forgets every secret. Once
cloud-init has finished it removes every per-instance trace (cloud-init's state and logs, the SSM
agent's registration, machine-id, SSH host keys, logs, history) and powers itself off: it runs
with ``InstanceInitiatedShutdownBehavior=stop``, so its disk stays, and only a stopped builder is
imaged — nothing runs on the disk after the cleanup. While it runs, an SSM check reads its failure
marker (in ``/run``, never imaged), so a broken bake fails in a minute rather than at the timeout.

Images carry our Purpose tag, ``pr-preview:source-ami``, ``created-at`` and a Name, on the image
and its snapshots from the moment they exist (TagSpecifications); only those are ever
deregistered, the ``baked_images_kept`` newest available ones stay.
"""

from __future__ import annotations

import hashlib
import logging
import re
import shlex
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from importlib.resources import files
from typing import TYPE_CHECKING, Any

from botocore.exceptions import ClientError, WaiterError
from tenacity import Retrying, retry_if_result, stop_after_delay

from tasks.app.masking import mask_secrets
from tasks.app.user_data import DOCKER_DAEMON_JSON, EPHEMERAL_DB_IMAGE, PLACEHOLDER
from tasks.cloud.aws import gave_up, wait_timed
from tasks.cloud.ecr import EcrRepository, ecr_login
from tasks.cloud.on_instance import timer_command, timer_minutes
from tasks.cloud.run_instances import baked_images, resolve_stock_ami, run_instances_params
from tasks.cloud.ssm import CommandTimeout, agent_not_registered, poll_wait, run_command
from tasks.cloud.tags import (
    TAG_CREATED_AT,
    TAG_NAME,
    TAG_PURPOSE,
    TAG_SHUTDOWN_AT,
    TAG_SOURCE_AMI,
    format_time,
)
from tasks.config import IMAGE_PATTERN, RUN_MARGIN_SECONDS, PreviewConfig
from tasks.inputs import is_repo
from tasks.run.errors import PreviewError
from tasks.run.prefect_context import run_logger
from tasks.run.retry import error_code
from tasks.run.step import step

if TYPE_CHECKING:
    from mypy_boto3_ec2 import EC2Client
    from mypy_boto3_ec2.type_defs import ImageTypeDef, TagSpecificationTypeDef, TagTypeDef
    from mypy_boto3_ssm import SSMClient

logger = logging.getLogger(__name__)

# /run is a tmpfs on AL2023: the bake's markers and the seal's log never reach the image.
BAKE_DIR = "/run/pr-preview-bake"
BAKE_FAILED = f"{BAKE_DIR}/failed"
SEAL_LOG = f"{BAKE_DIR}/seal.log"
PULL_DIR = "/var/tmp/pr-preview-bake"
BUILDER_NAME = "pr-preview-bake"
IMAGE_NAME_PREFIX = "pr-preview-baked-"
# A tag of docker's reference grammar.
TAG_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
# The preview's install steps in user_data.sh, from the first marker up to the second.
INSTALL_FROM, INSTALL_UNTIL = "\nstep=docker\n", "\nstep=secrets\n"
BAKE_CHECK_TIMEOUT_SECONDS = 30.0
GONE_IMAGE_CODES = frozenset({"InvalidAMIID.NotFound", "InvalidAMIID.Unavailable"})
GONE_SNAPSHOT_CODES = frozenset({"InvalidSnapshot.NotFound"})

# First stdout line: bake-failed | bake-pending; a failure adds the step and the evidence.
BAKE_CHECK = [
    f"if [ -f {BAKE_FAILED} ]; then",
    "  echo bake-failed",
    f"  marker=$(head -c 200 {BAKE_FAILED}) || marker='(marker unreadable)'",
    '  echo "bake failed at step: $marker"',
    "  tail -n 20 /var/log/cloud-init-output.log 2>/dev/null || true",
    f"  tail -n 20 {SEAL_LOG} 2>/dev/null || true",
    "else",
    "  echo bake-pending",
    "fi",
]


class BakeFailed(PreviewError):
    """The builder did not become an image; the message says where it stopped."""


class BakeTimeout(BakeFailed):
    """The builder did not power itself off within the bake's timeout."""


class PruneIncomplete(PreviewError):
    """Some old baked images or snapshots are still there; the next bake tries again."""


@dataclass(frozen=True)
class Builder:
    instance_id: str
    source_ami: str
    shutdown_at: datetime


@dataclass
class Pruned:
    images: list[str] = field(default_factory=list)
    snapshots: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


# --- what the builder runs ------------------------------------------------------------------


def bake_image_ref(settings: PreviewConfig, repo: str | None, tag: str) -> str:
    """``image:tag`` of the image to pre-pull: the configured ``image``, else ``ghcr.io/<repo>``
    of a served repository. Checked whole before it reaches the user data."""
    if not TAG_PATTERN.fullmatch(tag):
        raise ValueError(f"tag must be an image tag ([A-Za-z0-9_][A-Za-z0-9_.-]*), got {tag!r}")
    if repo is not None:
        if not is_repo(repo):
            raise ValueError(f"repo must be 'owner/name', got {repo!r}")
        if not settings.serves(repo):
            raise ValueError(settings.not_served(repo))
    elif settings.image is None:
        raise ValueError("set image in the configuration, or pass repo, to bake its layers")
    image = settings.image_for(repo or "")
    if not IMAGE_PATTERN.fullmatch(image):
        raise ValueError(f"{image!r} is not an image repository name")
    return f"{image}:{tag}"


def pull_compose_file(settings: PreviewConfig, image_ref: str) -> str:
    """A compose file naming what a preview will pull: its image, and its database's."""
    lines = ["services:", "  app:", f"    image: {image_ref}"]
    if settings.database == "ephemeral":
        lines += ["  db:", f"    image: {EPHEMERAL_DB_IMAGE}"]
    return "\n".join(lines)


# The builder's one login: GHCR's token from Parameter Store, forgotten at once; for an ECR
# image, the instance role's ECR password (tasks/cloud/ecr.py).
GHCR_LOGIN = """\
# Assigned on its own line: inside another command a failed read would go unnoticed.
GHCR_TOKEN=$(param {{ghcr_token_parameter}}) || fail "cannot read the GHCR token parameter"
[ -n "$GHCR_TOKEN" ] || fail "the GHCR token parameter is empty"

step=ghcr-login
printf '%s\\n' "$GHCR_TOKEN" | docker login {{registry}} -u {{registry_username}} --password-stdin
unset GHCR_TOKEN"""
ECR_LOGIN = """\
step=ecr-login
{{ecr_login}}"""


def preview_install_steps() -> str:
    """The preview's Docker and Compose steps, cut from ``user_data.sh``: a baked image has what
    a preview would install, installed the same way, and the preview's checks skip it."""
    template = files("tasks").joinpath("templates/user_data.sh").read_text()
    start = template.find(INSTALL_FROM)
    end = template.find(INSTALL_UNTIL, start + 1)
    if start < 0 or end < 0:
        raise RuntimeError(
            "user_data.sh no longer has the steps docker..secrets the bake installs from"
        )
    return template[start + 1 : end]


def render_bake_user_data(settings: PreviewConfig, image_ref: str, ttl_hours: float) -> str:
    """The builder's user data; it holds names, never secrets.

    Every value is shell-quoted where it is used (``image_ref`` and the config are validated as
    well), and placeholders are filled in one pass, so a value never introduces another.
    """
    q = shlex.quote
    registry, owner = image_ref.split("/", 2)[:2]
    ecr = EcrRepository.parse(image_ref.rsplit(":", 1)[0])
    values = {
        "bake_dir": q(BAKE_DIR),
        "app_dir": q(settings.app_dir),
        "pull_dir": q(PULL_DIR),
        "shutdown_timer": timer_command(timer_minutes(ttl_hours)),
        "compose_url": q(
            f"{settings.compose_release_url}/{settings.compose_version}/docker-compose-linux-"
        ),
        "region": q(settings.region),
        "container_address_pool": q(settings.container_address_pool),
        "docker_daemon_json": q(DOCKER_DAEMON_JSON),
        "ghcr_token_parameter": q(settings.ghcr_token_parameter),
        "registry": q(registry),
        "registry_username": q(settings.ghcr_username or owner),
        "pull_compose_file": q(pull_compose_file(settings, image_ref)),
        "ecr_login": ecr_login(ecr) if ecr else "",
    }
    template = files("tasks").joinpath("templates/bake_user_data.sh").read_text()
    template = template.replace("{{install_docker_and_compose}}\n", preview_install_steps())
    template = template.replace("{{registry_login}}", ECR_LOGIN if ecr else GHCR_LOGIN)
    return PLACEHOLDER.sub(lambda match: values[match.group(1)], template)


# --- the builder ----------------------------------------------------------------------------


def builder_ttl_hours(settings: PreviewConfig, bake_seconds: float, image_seconds: float) -> float:
    """The builder's shutdown-at: the short TTL, or the bake's own timeouts if they are longer,
    so neither the sweeper nor the on-instance timer takes it before its image is made."""
    return max(
        settings.failure_ttl_hours, (bake_seconds + image_seconds + RUN_MARGIN_SECONDS) / 3600
    )


def builder_tags(settings: PreviewConfig, now: datetime, ttl_hours: float) -> dict[str, str]:
    return {
        TAG_PURPOSE: settings.purpose_tag,
        TAG_SHUTDOWN_AT: format_time(now + timedelta(hours=ttl_hours)),
        TAG_NAME: BUILDER_NAME,
    }


def launch_builder_instance(
    ec2: EC2Client,
    settings: PreviewConfig,
    *,
    source_ami: str,
    image_ref: str,
    ttl_hours: float,
    attempt_key: str = "",
    now: datetime | None = None,
) -> Builder:
    """Launch the builder from ``source_ami`` with the bake user data; the preview's request,
    but a power-off stops it (the disk to image stays) instead of terminating it."""
    now = (now or datetime.now(UTC)).replace(microsecond=0)
    digest = hashlib.sha256(f"bake/{attempt_key}".encode()).hexdigest()[:48]
    params = run_instances_params(
        settings,
        ami_id=source_ami,
        subnet_id=settings.subnet_id,
        tags=builder_tags(settings, now, ttl_hours),
        user_data=render_bake_user_data(settings, image_ref, ttl_hours),
        client_token=f"pr-preview-bake-{digest}",
    )
    params["InstanceInitiatedShutdownBehavior"] = "stop"
    instance = ec2.run_instances(**params)["Instances"][0]
    return Builder(instance["InstanceId"], source_ami, now + timedelta(hours=ttl_hours))


def instance_state(ec2: EC2Client, instance_id: str) -> str:
    reservations = ec2.describe_instances(InstanceIds=[instance_id])["Reservations"]
    instances = [i for r in reservations for i in r["Instances"]]
    return str(instances[0]["State"]["Name"]) if instances else "terminated"


def read_bake_failure(ssm: SSMClient, settings: PreviewConfig, instance_id: str) -> str | None:
    """What the builder's failure marker says, or None while it has none (or does not answer:
    its agent has not registered yet, or the seal has stopped it)."""
    try:
        result = run_command(
            ssm,
            instance_id,
            BAKE_CHECK,
            timeout_seconds=BAKE_CHECK_TIMEOUT_SECONDS,
            poll_seconds=min(settings.poll_seconds, 0.5),
            comment="pr-preview bake: check",
        )
    except ClientError as exc:
        if agent_not_registered(exc):
            return None
        raise
    except CommandTimeout:
        return None
    first, _, rest = result.stdout.partition("\n")
    if first.strip() != "bake-failed":
        return None
    return rest.strip() or "bake failed (no step recorded)"


def wait_until_sealed(
    ec2: EC2Client,
    ssm: SSMClient,
    settings: PreviewConfig,
    instance_id: str,
    *,
    timeout_seconds: float,
    secrets: Iterable[str | None] = (),
) -> int:
    """Poll until the builder has sealed itself and powered off (``stopped``); returns the
    number of polls. ``BakeFailed`` when its marker says it failed or it is being terminated,
    ``BakeTimeout`` when it is still running at the deadline."""
    polls = 0
    last = "pending"
    masked = list(secrets)

    def sealed() -> bool:
        nonlocal polls, last
        polls += 1
        last = instance_state(ec2, instance_id)
        if last == "stopped":
            return True
        if last in ("shutting-down", "terminated"):
            raise BakeFailed(
                f"the builder {instance_id} is {last} before it was imaged (its TTL, the"
                " sweeper or an eviction ended it)"
            )
        if last == "running":
            failure = read_bake_failure(ssm, settings, instance_id)
            if failure is not None:
                raise BakeFailed(mask_secrets(failure, masked))
        return False

    def give_up(_: object) -> bool:
        raise BakeTimeout(
            f"the builder {instance_id} did not seal itself and power off within"
            f" {timeout_seconds:g}s (it is {last}); its log is /var/log/cloud-init-output.log"
        )

    Retrying(
        stop=stop_after_delay(timeout_seconds),
        wait=poll_wait(settings.poll_seconds, timeout_seconds),
        retry=retry_if_result(lambda done: not done),
        retry_error_callback=give_up,
    )(sealed)
    return polls


# --- the image ------------------------------------------------------------------------------


def image_name(now: datetime) -> str:
    """Unique per bake (AMI names are unique per account and region), in AMI name characters."""
    return IMAGE_NAME_PREFIX + now.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")


def baked_image_tags(
    settings: PreviewConfig, source_ami: str, name: str, now: datetime
) -> dict[str, str]:
    return {
        TAG_PURPOSE: settings.purpose_tag,
        TAG_NAME: name,
        TAG_SOURCE_AMI: source_ami,
        TAG_CREATED_AT: format_time(now, precise=True),
    }


def create_baked_image(
    ec2: EC2Client,
    settings: PreviewConfig,
    builder: Builder,
    *,
    image_ref: str,
    now: datetime,
) -> str:
    """CreateImage of the stopped builder, the image and its snapshots tagged as they are made.

    The name comes from ``now``, fixed by the caller: a retry after a call that did reach EC2
    finds the image by its name instead of making a second one.
    """
    name = image_name(now)
    tags: list[TagTypeDef] = [
        {"Key": key, "Value": value}
        for key, value in baked_image_tags(settings, builder.source_ami, name, now).items()
    ]
    specifications: list[TagSpecificationTypeDef] = [
        {"ResourceType": "image", "Tags": tags},
        {"ResourceType": "snapshot", "Tags": tags},
    ]
    try:
        made = ec2.create_image(
            InstanceId=builder.instance_id,
            Name=name,
            Description=f"pr-preview: {builder.source_ami} with Docker, Compose, {image_ref}",
            TagSpecifications=specifications,
        )
    except ClientError as exc:
        if error_code(exc) != "InvalidAMIName.Duplicate":
            raise
        found = ec2.describe_images(Owners=["self"], Filters=[{"Name": "name", "Values": [name]}])
        if not found["Images"]:
            raise
        return found["Images"][0]["ImageId"]
    return made["ImageId"]


def wait_image_available(
    ec2: EC2Client, image_id: str, *, timeout_seconds: float, poll_seconds: float
) -> None:
    """botocore's ``image_available`` waiter with our timing; ``BakeFailed`` when EC2 says the
    image failed, ``BakeTimeout`` when it is still pending at the deadline."""
    try:
        wait_timed(
            ec2.get_waiter("image_available"),
            ImageIds=[image_id],
            timeout_seconds=timeout_seconds,
            poll_seconds=poll_seconds,
            within=True,
        )
    except WaiterError as exc:
        if gave_up(exc):
            raise BakeTimeout(
                f"image {image_id} was not available within {timeout_seconds:g}s"
            ) from None
        raise BakeFailed(f"image {image_id} failed: {_state_reason(exc.last_response)}") from None


def _state_reason(response: Any) -> str:
    try:
        image = response["Images"][0]
        reason = image.get("StateReason", {})
        return str(
            reason.get("Message") or reason.get("Code") or f"{image['State']}, EC2 gave no reason"
        )
    except (KeyError, IndexError, TypeError):
        return "EC2 gave no reason"


# --- old images -----------------------------------------------------------------------------


def plan_prune(images: Sequence[ImageTypeDef], keep: int) -> list[ImageTypeDef]:
    """The baked images to remove, from images oldest first: every one but the ``keep`` newest
    available ones (a failed image is removed whatever its age; a pending one is never passed
    in)."""
    available = [image for image in images if image.get("State") == "available"]
    kept = {image["ImageId"] for image in available[-keep:]} if keep > 0 else set()
    return [image for image in images if image["ImageId"] not in kept]


def snapshot_ids(image: ImageTypeDef) -> list[str]:
    return [
        mapping["Ebs"]["SnapshotId"]
        for mapping in image.get("BlockDeviceMappings", [])
        if mapping.get("Ebs", {}).get("SnapshotId")
    ]


def delete_baked_image(ec2: EC2Client, image: ImageTypeDef, pruned: Pruned) -> None:
    """Deregister ``image`` and delete its snapshots (a snapshot is in use until then); what is
    already gone counts as done, what fails goes to ``pruned.failed``."""
    image_id = image["ImageId"]
    try:
        ec2.deregister_image(ImageId=image_id)
    except ClientError as exc:
        if error_code(exc) not in GONE_IMAGE_CODES:
            pruned.failed[image_id] = f"{error_code(exc)}: {exc}"
            return
    pruned.images.append(image_id)
    for snapshot_id in snapshot_ids(image):
        try:
            ec2.delete_snapshot(SnapshotId=snapshot_id)
        except ClientError as exc:
            if error_code(exc) not in GONE_SNAPSHOT_CODES:
                pruned.failed[snapshot_id] = f"{error_code(exc)}: {exc}"
                continue
        pruned.snapshots.append(snapshot_id)


def prune_images(ec2: EC2Client, settings: PreviewConfig) -> Pruned:
    """Deregister the baked images beyond the newest ``baked_images_kept``, with snapshots."""
    pruned = Pruned()
    images = baked_images(ec2, settings, states=("available", "failed"))
    for image in plan_prune(images, settings.baked_images_kept):
        delete_baked_image(ec2, image, pruned)
    return pruned


# --- the steps ------------------------------------------------------------------------------


@step
def stock_ami(ec2: EC2Client, settings: PreviewConfig) -> str:
    """The AMI a stock preview boots: what the builder starts from."""
    return str(resolve_stock_ami(ec2, settings)["ImageId"])


@step
def launch_builder(
    ec2: EC2Client,
    settings: PreviewConfig,
    source_ami: str,
    image_ref: str,
    ttl_hours: float,
    attempt_key: str = "",
) -> Builder:
    builder = launch_builder_instance(
        ec2,
        settings,
        source_ami=source_ami,
        image_ref=image_ref,
        ttl_hours=ttl_hours,
        attempt_key=attempt_key,
    )
    run_logger(logger).info(
        "launched builder %s from %s for %s (shutdown-at %s)",
        builder.instance_id,
        source_ami,
        image_ref,
        format_time(builder.shutdown_at),
    )
    return builder


@step
def wait_sealed(
    ec2: EC2Client,
    ssm: SSMClient,
    settings: PreviewConfig,
    instance_id: str,
    timeout_seconds: float,
    secrets: Sequence[str] = (),
) -> int:
    """Prefect wrapper: ``BakeFailed`` is not retried (it is the builder's answer)."""
    polls = wait_until_sealed(
        ec2, ssm, settings, instance_id, timeout_seconds=timeout_seconds, secrets=secrets
    )
    run_logger(logger).info("builder %s sealed and stopped (%d polls)", instance_id, polls)
    return polls


@step
def create_image(
    ec2: EC2Client, settings: PreviewConfig, builder: Builder, image_ref: str, now: datetime
) -> str:
    image_id = create_baked_image(ec2, settings, builder, image_ref=image_ref, now=now)
    run_logger(logger).info(
        "creating %s (%s) from %s", image_id, image_name(now), builder.instance_id
    )
    return image_id


@step
def wait_image(
    ec2: EC2Client, settings: PreviewConfig, image_id: str, timeout_seconds: float
) -> None:
    wait_image_available(
        ec2, image_id, timeout_seconds=timeout_seconds, poll_seconds=settings.poll_seconds
    )


@step
def prune_baked_images(ec2: EC2Client, settings: PreviewConfig) -> Pruned:
    pruned = prune_images(ec2, settings)
    log = run_logger(logger)
    for image_id in pruned.images:
        log.info("deregistered %s (beyond baked_images_kept)", image_id)
    for snapshot_id in pruned.snapshots:
        log.info("deleted snapshot %s", snapshot_id)
    if pruned.failed:
        raise PruneIncomplete(
            "not removed (the next bake tries again): "
            + "; ".join(f"{key}: {why}" for key, why in pruned.failed.items())
        )
    return pruned


@step
def discard_image(ec2: EC2Client, settings: PreviewConfig, image_id: str) -> Pruned:
    """A bake that failed after CreateImage: its image and snapshots must not stay behind."""
    pruned = Pruned()
    images = ec2.describe_images(ImageIds=[image_id])["Images"]
    for image in images:
        delete_baked_image(ec2, image, pruned)
    if pruned.failed:
        raise PruneIncomplete(f"the failed bake's image {image_id} stays: {pruned.failed}")
    return pruned
