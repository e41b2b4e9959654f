"""A preview's name in the VPC (runbook §11): the A record ``pr-<n>.<repo name>.<owner>.<zone>``
→ the preview's private IP, in the Route 53 private hosted zone ``dns_zone_id``.

Records are written with UPSERT (a relaunch points the name at the new instance) and deleted
with exactly what Route 53 holds (its DELETE matches name, type, TTL and values). Only A records
whose name has our shape are ever read for deletion: ``pr-<digits>.<label>.<label>.<zone>``; the
zone's other records are never changed.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Final

from botocore.exceptions import ClientError

from tasks.run.errors import PreviewError

if TYPE_CHECKING:
    from mypy_boto3_route53 import Route53Client
    from mypy_boto3_route53.type_defs import (
        ChangeTypeDef,
        ResourceRecordSetOutputTypeDef,
        ResourceRecordSetTypeDef,
    )

RECORD_TYPE: Final = "A"
RECORD_TTL_SECONDS = 60
NAME_PREFIX = "pr-"
LABEL_MAX = 63
CHANGES_PER_BATCH = 100  # well inside ChangeResourceRecordSets' 1,000 records per request
COMMENT = "pr-preview"
_NOT_A_LABEL = re.compile(r"[^a-z0-9-]+")


class NotAPrivateZone(PreviewError):
    """``dns_zone_id`` names a public zone: the previews' private IPs would be published."""


def dns_label(text: str) -> str:
    """``text`` as one DNS label: lower case, runs of anything but letters, digits and ``-``
    become one ``-``, no ``-`` at either end, at most 63 characters (``my.App_2`` →
    ``my-app-2``)."""
    label = _NOT_A_LABEL.sub("-", text.lower()).strip("-")[:LABEL_MAX].strip("-")
    if not label:
        raise ValueError(f"{text[:100]!r} leaves nothing for a DNS label")
    return label


def fqdn(name: str) -> str:
    """A name as Route 53 answers it: with its trailing dot."""
    return name if name.endswith(".") else f"{name}."


def record_name(repo: str, pr_number: int, zone: str) -> str:
    """``pr-42.hello-api.octo-org.previews.internal.`` for ``octo-org/hello-api`` #42 in zone
    ``previews.internal.``: the repository's name, then its owner, as DNS reads outward."""
    owner, _, name = repo.partition("/")
    return fqdn(f"{NAME_PREFIX}{int(pr_number)}.{dns_label(name)}.{dns_label(owner)}.{fqdn(zone)}")


def is_ours(name: str, zone: str) -> bool:
    """Whether ``name`` has the shape of a preview's name in ``zone``."""
    pattern = rf"{NAME_PREFIX}[0-9]+\.[a-z0-9-]+\.[a-z0-9-]+\.{re.escape(fqdn(zone))}"
    return re.fullmatch(pattern, fqdn(name).lower()) is not None


def zone_name(route53: Route53Client, zone_id: str) -> str:
    """The zone's name (``previews.internal.``); a public zone is refused."""
    zone = route53.get_hosted_zone(Id=zone_id)["HostedZone"]
    if not zone.get("Config", {}).get("PrivateZone", False):
        raise NotAPrivateZone(
            f"dns_zone_id {zone_id} is the public zone {zone['Name']}: a preview's name must"
            " stay inside the VPC. Give the id of a private hosted zone (runbook §11)"
        )
    return fqdn(zone["Name"])


def upsert_record(route53: Route53Client, zone_id: str, name: str, address: str) -> None:
    """``name`` → ``address`` (A, TTL 60), created or replaced."""
    record: ResourceRecordSetTypeDef = {
        "Name": fqdn(name),
        "Type": RECORD_TYPE,
        "TTL": RECORD_TTL_SECONDS,
        "ResourceRecords": [{"Value": address}],
    }
    change: ChangeTypeDef = {"Action": "UPSERT", "ResourceRecordSet": record}
    route53.change_resource_record_sets(
        HostedZoneId=zone_id, ChangeBatch={"Comment": COMMENT, "Changes": [change]}
    )


def find_record(
    route53: Route53Client, zone_id: str, name: str
) -> ResourceRecordSetOutputTypeDef | None:
    """The A record ``name`` as Route 53 holds it, or None."""
    found = route53.list_resource_record_sets(
        HostedZoneId=zone_id, StartRecordName=fqdn(name), StartRecordType=RECORD_TYPE, MaxItems="1"
    )["ResourceRecordSets"]
    if found and fqdn(found[0]["Name"]).lower() == fqdn(name).lower():
        return found[0] if found[0]["Type"] == RECORD_TYPE else None
    return None


def our_records(
    route53: Route53Client, zone_id: str, zone: str
) -> list[ResourceRecordSetOutputTypeDef]:
    """Every A record of the zone whose name has a preview's shape, across all pages."""
    paginator = route53.get_paginator("list_resource_record_sets")
    return [
        record
        for page in paginator.paginate(HostedZoneId=zone_id)
        for record in page["ResourceRecordSets"]
        if record["Type"] == RECORD_TYPE and is_ours(record["Name"], zone)
    ]


def delete_records(
    route53: Route53Client, zone_id: str, records: Sequence[ResourceRecordSetOutputTypeDef]
) -> list[str]:
    """Delete ``records`` exactly as listed, in batches; one already gone (Route 53's
    InvalidChangeBatch) is tried again alone, so the rest of its batch still goes. Returns the
    names deleted."""
    deleted: list[str] = []
    for start in range(0, len(records), CHANGES_PER_BATCH):
        batch = list(records[start : start + CHANGES_PER_BATCH])
        try:
            _delete(route53, zone_id, batch)
            deleted += [record["Name"] for record in batch]
        except ClientError as exc:
            if exc.response["Error"]["Code"] != "InvalidChangeBatch":
                raise
            for record in batch if len(batch) > 1 else ():
                try:
                    _delete(route53, zone_id, [record])
                    deleted.append(record["Name"])
                except ClientError as alone:
                    if alone.response["Error"]["Code"] != "InvalidChangeBatch":
                        raise
    return deleted


def _delete(
    route53: Route53Client, zone_id: str, records: Iterable[ResourceRecordSetOutputTypeDef]
) -> None:
    changes: list[ChangeTypeDef] = [
        {"Action": "DELETE", "ResourceRecordSet": record} for record in records
    ]
    route53.change_resource_record_sets(
        HostedZoneId=zone_id, ChangeBatch={"Comment": COMMENT, "Changes": changes}
    )
