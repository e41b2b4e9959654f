"""pr_preview_bake: the AMI previews boot when ``ami_strategy`` is ``baked`` (issue 15).

Weekly from ``prefect.yaml``, and by hand
(``prefect deployment run pr-preview-bake/pr-preview-bake -p tag=latest``). The builder carries
our Purpose tag and a short ``shutdown-at``, and every path out of this flow terminates it.

1. the stock AMI                     2. launch the builder with the bake user data
3. wait until it has sealed itself and powered off
4. CreateImage, tagged as it is made 5. wait until the image is available
6. terminate the builder (on every path; a failed bake's image goes too)
7. deregister baked images beyond ``baked_images_kept``, with their snapshots   8. report
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.logging import get_run_logger
from prefect.runtime import flow_run

from tasks.app.secrets import read_secrets
from tasks.cloud.aws import build_clients
from tasks.config import RUN_MARGIN_SECONDS, PreviewConfig, RunOverrides, run_config
from tasks.run.budget import grace, run_budget
from tasks.steps.bake import (
    Builder,
    bake_image_ref,
    builder_ttl_hours,
    create_image,
    discard_image,
    image_name,
    launch_builder,
    prune_baked_images,
    stock_ami,
    wait_image,
    wait_sealed,
)
from tasks.steps.terminate import terminate_instance

if TYPE_CHECKING:
    from mypy_boto3_ec2 import EC2Client

ARTIFACT_KEY = "pr-preview-bake"


@dataclass
class BakeResult:
    image_id: str
    image_name: str
    source_ami: str
    image_ref: str
    builder_id: str
    seconds: float
    deregistered: list[str] = field(default_factory=list)
    deleted_snapshots: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        rows = [
            ("image", f"`{self.image_id}` ({self.image_name})"),
            ("from", f"`{self.source_ami}` + Docker, Compose, `{self.image_ref}`"),
            ("builder", f"`{self.builder_id}` (terminated)"),
            ("took", f"{self.seconds:.0f} s"),
            ("deregistered", ", ".join(f"`{i}`" for i in self.deregistered) or "—"),
            ("snapshots deleted", ", ".join(f"`{s}`" for s in self.deleted_snapshots) or "—"),
        ]
        lines = ["## Baked image", "", "| | |", "| --- | --- |"]
        return "\n".join(lines + [f"| {name} | {value} |" for name, value in rows])


@flow(name="pr-preview-bake", flow_run_name="bake-{tag}")
def pr_preview_bake(
    tag: str = "latest",
    repo: str | None = None,
    bake_timeout_seconds: float = 1800.0,
    image_timeout_seconds: float = 1800.0,
    config: RunOverrides | None = None,
) -> BakeResult:
    """Bake Docker, Compose and the layers of ``image:tag`` (the configured image, or
    ``ghcr.io/<repo>``) into a new AMI; keep the newest ``baked_images_kept``."""
    settings = run_config(config)
    image_ref = bake_image_ref(settings, repo, tag)
    clients = build_clients(settings)
    # Only to mask what a failed builder's log shows: the builder reads the token itself.
    secrets = read_secrets(clients.ssm, settings)
    logger = get_run_logger()
    started = time.monotonic()
    ttl_hours = builder_ttl_hours(settings, bake_timeout_seconds, image_timeout_seconds)
    budget = bake_timeout_seconds + image_timeout_seconds + RUN_MARGIN_SECONDS
    with run_budget(budget):
        # 1. The stock AMI, as a stock preview boots it.
        source_ami = stock_ami(clients.ec2, settings)
        # 2. The builder: short TTL, bake user data, stopped (not terminated) by its power-off.
        builder: Builder = launch_builder(
            clients.ec2,
            settings,
            source_ami,
            image_ref,
            ttl_hours,
            attempt_key=str(flow_run.get_id() or ""),
        )
        made: list[str] = []
        try:
            # 3. It installs, pulls, forgets the secrets, seals itself and powers off.
            wait_sealed(
                clients.ec2,
                clients.ssm,
                settings,
                builder.instance_id,
                bake_timeout_seconds,
                secrets=secrets.values,
            )
            # 4–5. The image of the stopped builder, tagged from the start; wait for it.
            now = datetime.now(UTC)
            made.append(create_image(clients.ec2, settings, builder, image_ref, now))
            wait_image(clients.ec2, settings, made[0], image_timeout_seconds)
        except BaseException:
            with grace():
                for image_id in made:
                    _discard_quietly(clients.ec2, settings, image_id)
                # 6. A failed bake leaves nothing running either.
                _terminate_quietly(clients.ec2, settings, builder.instance_id)
            raise
        # 6. Imaged: the builder has done its job.
        with grace():
            terminate_instance(clients.ec2, settings, builder.instance_id)
        result = BakeResult(
            image_id=made[0],
            image_name=image_name(now),
            source_ami=source_ami,
            image_ref=image_ref,
            builder_id=builder.instance_id,
            seconds=time.monotonic() - started,
        )
        # 7. Old images and their snapshots; the report says what was removed either way.
        try:
            pruned = prune_baked_images(clients.ec2, settings)
            result.deregistered, result.deleted_snapshots = pruned.images, pruned.snapshots
        finally:
            # 8. Report.
            create_markdown_artifact(markdown=result.markdown(), key=ARTIFACT_KEY)
    logger.info("baked %s from %s in %.0f s", result.image_id, source_ami, result.seconds)
    return result


def _terminate_quietly(ec2: EC2Client, settings: PreviewConfig, instance_id: str) -> None:
    """Terminate the builder after a failure; a failure here is logged, the first one raised."""
    try:
        terminate_instance(ec2, settings, instance_id)
    except Exception as exc:
        get_run_logger().error(
            "builder %s not terminated (%s): its shutdown-at tag and timer end it", instance_id, exc
        )


def _discard_quietly(ec2: EC2Client, settings: PreviewConfig, image_id: str) -> None:
    try:
        discard_image(ec2, settings, image_id)
    except Exception as exc:
        get_run_logger().error("image %s of the failed bake not removed: %s", image_id, exc)
