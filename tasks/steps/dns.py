"""A preview's name in the VPC (runbook §11, ``dns_zone_id``): published once the preview is
ready, removed with it, and swept once its instance is gone.

Without ``dns_zone_id`` every step here returns at once and calls nothing. The names and the
record changes are ``tasks.cloud.dns``'s; a step only finds the addresses and the previews.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from tasks.cloud.aws import AwsClients
from tasks.cloud.dns import (
    delete_records,
    find_record,
    fqdn,
    our_records,
    record_name,
    upsert_record,
    zone_name,
)
from tasks.cloud.instances import describe_preview, find_previews
from tasks.config import PreviewConfig
from tasks.run.errors import PreviewError
from tasks.run.prefect_context import run_logger
from tasks.run.step import step

if TYPE_CHECKING:
    from mypy_boto3_route53 import Route53Client
    from mypy_boto3_route53.type_defs import ResourceRecordSetOutputTypeDef

logger = logging.getLogger(__name__)


class NameNotPublished(PreviewError):
    """The preview has no private address to name."""


def _zone(clients: AwsClients, settings: PreviewConfig) -> tuple[Route53Client, str] | None:
    """The Route 53 client and the zone's id, or None without ``dns_zone_id``."""
    if not settings.dns_zone_id:
        return None
    if clients.route53 is None:
        raise ValueError("dns_zone_id is set but the clients have no Route 53 client")
    return clients.route53, settings.dns_zone_id


def shown(name: str) -> str:
    """A name as people type it: without the trailing dot."""
    return name.rstrip(".")


@step(needs_lock=True)
def publish_name(
    clients: AwsClients, settings: PreviewConfig, repo: str, pr_number: int, instance_id: str
) -> str | None:
    """``pr-<n>.<repo name>.<owner>.<zone>`` → the ready instance's private IP (UPSERT, TTL 60):
    a relaunch points the same name at the new instance. None without ``dns_zone_id``."""
    zone = _zone(clients, settings)
    if zone is None:
        return None
    route53, zone_id = zone
    preview = describe_preview(clients.ec2, instance_id)
    if preview is None or not preview.private_ip:
        raise NameNotPublished(f"{instance_id} has no private IP address to name")
    name = record_name(repo, pr_number, zone_name(route53, zone_id))
    upsert_record(route53, zone_id, name, preview.private_ip)
    run_logger(logger).info("%s → %s (%s)", shown(name), preview.private_ip, instance_id)
    return shown(name)


def _held(
    clients: AwsClients, settings: PreviewConfig, repo: str, pr_number: int
) -> tuple[Route53Client, str, ResourceRecordSetOutputTypeDef] | None:
    """The client, the zone's id and the PR's record as the zone holds it; None without
    ``dns_zone_id`` or without a record."""
    zone = _zone(clients, settings)
    if zone is None:
        return None
    route53, zone_id = zone
    name = record_name(repo, pr_number, zone_name(route53, zone_id))
    record = find_record(route53, zone_id, name)
    return None if record is None else (route53, zone_id, record)


@step
def preview_name(
    clients: AwsClients, settings: PreviewConfig, repo: str, pr_number: int
) -> str | None:
    """The PR's name when the zone holds its record; None without one or ``dns_zone_id``."""
    held = _held(clients, settings, repo, pr_number)
    return None if held is None else shown(held[2]["Name"])


@step(needs_lock=True)
def remove_name(
    clients: AwsClients, settings: PreviewConfig, repo: str, pr_number: int
) -> str | None:
    """Delete the PR's record, whatever address it holds; None when there was none."""
    held = _held(clients, settings, repo, pr_number)
    if held is None:
        return None
    route53, zone_id, record = held
    delete_records(route53, zone_id, [record])
    run_logger(logger).info("%s removed", shown(record["Name"]))
    return shown(record["Name"])


@step
def sweep_names(clients: AwsClients, settings: PreviewConfig, dry_run: bool = False) -> list[str]:
    """Delete the zone's preview names whose pull request has no live instance (pending,
    running, stopping, stopped: a stopped preview keeps its private IP). The records are read
    before the instances, so a name published meanwhile is never taken for a leftover."""
    zone = _zone(clients, settings)
    if zone is None:
        return []
    route53, zone_id = zone
    name_of_zone = zone_name(route53, zone_id)
    records = our_records(route53, zone_id, name_of_zone)
    if not records:
        return []
    live = {
        record_name(preview.repo, preview.pr_number, name_of_zone)
        for preview in find_previews(clients.ec2, settings.purpose_tag)
        if preview.repo and preview.pr_number is not None
    }
    stale = [record for record in records if fqdn(record["Name"]).lower() not in live]
    if dry_run:
        return [shown(record["Name"]) for record in stale]
    removed = [shown(name) for name in delete_records(route53, zone_id, stale)]
    for name in removed:
        run_logger(logger).info("%s removed: its preview is gone", name)
    return removed
