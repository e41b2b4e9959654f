"""The optional database path of runbook §2.5: the preview's public IP/32 on db-sg, 5432.

Off by default (``db_sg_open_public_ip``): the runbook recommends db-sg admitting api-sg
instead. When on, each rule is described ``pr-preview <instance-id>`` so teardown and the
sweeper can tell their own rules from rules a person added.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from botocore.exceptions import ClientError

from tasks.cloud.db_rules import DB_PORT, DbRule, db_rule_description, db_rules, revoke_db_rules
from tasks.config import PreviewConfig
from tasks.run.retry import error_code
from tasks.run.step import step

if TYPE_CHECKING:
    from mypy_boto3_ec2 import EC2Client

logger = logging.getLogger(__name__)


@step(needs_lock=True)
def open_db_access(ec2: EC2Client, settings: PreviewConfig, instance_id: str) -> str | None:
    """Admit the instance's public IP/32 on db-sg 5432; the CIDR, or None when off or no IP."""
    if not (settings.db_sg_open_public_ip and settings.db_security_group_id):
        return None
    reservation = ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0]
    public_ip = reservation["Instances"][0].get("PublicIpAddress")
    if not public_ip:
        logger.warning("%s has no public IP: db-sg not opened (runbook §2.5)", instance_id)
        return None
    cidr = f"{public_ip}/32"
    try:
        ec2.authorize_security_group_ingress(
            GroupId=settings.db_security_group_id,
            IpPermissions=[
                {
                    "IpProtocol": "tcp",
                    "FromPort": DB_PORT,
                    "ToPort": DB_PORT,
                    "IpRanges": [{"CidrIp": cidr, "Description": db_rule_description(instance_id)}],
                }
            ],
        )
    except ClientError as exc:
        if error_code(exc) != "InvalidPermission.Duplicate":
            raise
    return cidr


@step(needs_lock=True)
def close_db_access(
    ec2: EC2Client, settings: PreviewConfig, instance_ids: list[str]
) -> list[DbRule]:
    """Revoke the db-sg rules opened for ``instance_ids`` (teardown)."""
    if not (settings.db_sg_open_public_ip and settings.db_security_group_id):
        return []
    ids = set(instance_ids)
    mine = [
        rule for rule in db_rules(ec2, settings.db_security_group_id) if rule.instance_id in ids
    ]
    return revoke_db_rules(ec2, settings.db_security_group_id, mine)
