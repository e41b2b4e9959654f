"""The db-sg rules pr-preview opened (runbook §2.5): read, told from a person's rules by their
description, revoked."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from botocore.exceptions import ClientError

from tasks.cloud.instances import Preview
from tasks.run.retry import error_code

if TYPE_CHECKING:
    from mypy_boto3_ec2 import EC2Client

logger = logging.getLogger(__name__)

DB_PORT = 5432
DB_RULE_MARKER = "pr-preview"
_RULE_GONE = ("InvalidPermission.NotFound", "InvalidSecurityGroupRuleId.NotFound")


def db_rule_description(instance_id: str) -> str:
    """The Description of the temporary db-sg ``/32`` rule opened for ``instance_id``."""
    return f"{DB_RULE_MARKER} {instance_id}"


@dataclass(frozen=True)
class DbRule:
    rule_id: str
    cidr: str
    description: str

    @property
    def instance_id(self) -> str | None:
        """The instance named in the rule's Description marker."""
        parts = self.description.split()
        if len(parts) == 2 and parts[0] == DB_RULE_MARKER:
            return parts[1]
        return None


def db_rules(ec2: EC2Client, group_id: str, *, port: int = DB_PORT) -> list[DbRule]:
    """db-sg's inbound IPv4 ``/32`` rules on ``port`` that carry our Description marker."""
    paginator = ec2.get_paginator("describe_security_group_rules")
    pages = paginator.paginate(Filters=[{"Name": "group-id", "Values": [group_id]}])
    found = []
    for page in pages:
        for rule in page["SecurityGroupRules"]:
            cidr = rule.get("CidrIpv4", "")
            description = rule.get("Description", "")
            if (
                not rule.get("IsEgress")
                and rule.get("IpProtocol") == "tcp"
                and rule.get("FromPort") == port
                and rule.get("ToPort") == port
                and cidr.endswith("/32")
                and description.split(" ")[0] == DB_RULE_MARKER
            ):
                found.append(DbRule(rule["SecurityGroupRuleId"], cidr, description))
    return found


def leftover_db_rules(rules: Iterable[DbRule], live: Iterable[Preview]) -> list[DbRule]:
    """Rules that belong to no live preview: neither its public IP nor its instance id."""
    live = list(live)
    cidrs = {f"{preview.public_ip}/32" for preview in live if preview.public_ip}
    ids = {preview.instance_id for preview in live}
    return [rule for rule in rules if rule.cidr not in cidrs and rule.instance_id not in ids]


def revoke_db_rules(ec2: EC2Client, group_id: str, rules: Sequence[DbRule]) -> list[DbRule]:
    """Revoke ``rules`` one by one; a rule already gone counts as revoked."""
    for rule in rules:
        try:
            ec2.revoke_security_group_ingress(GroupId=group_id, SecurityGroupRuleIds=[rule.rule_id])
        except ClientError as exc:
            if error_code(exc) not in _RULE_GONE:
                raise
    return list(rules)
