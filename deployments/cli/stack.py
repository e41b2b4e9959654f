"""The deployed CloudFormation stack (deployments/aws/pr-preview.yaml) as the commands read it:
its outputs, and the configuration fields they fill."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from deployments.cli.common import CliError

if TYPE_CHECKING:
    from mypy_boto3_cloudformation import CloudFormationClient

STACK_NAME = re.compile(r"[A-Za-z][A-Za-z0-9-]{0,127}")
# Output → configuration field; ``security_group_ids`` is a list of the one group.
REQUIRED_OUTPUTS = {
    "Region": "region",
    "SubnetId": "subnet_id",
    "PreviewSecurityGroupId": "security_group_ids",
    "InstanceProfileName": "instance_profile",
}
OPTIONAL_OUTPUTS = {
    "DatabaseSecurityGroupId": "db_security_group_id",
    "DatabaseHostInstanceId": "db_instance_id",
    "Image": "image",
    "DnsZoneId": "dns_zone_id",
}
KEY_OUTPUT = "AppSecretsKeyArn"
READY = {"CREATE_COMPLETE", "UPDATE_COMPLETE", "UPDATE_ROLLBACK_COMPLETE", "IMPORT_COMPLETE"}


def stack_name(text: str) -> str:
    """``--stack``: CloudFormation's own pattern, so a name never carries anything else."""
    import argparse

    if not STACK_NAME.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a stack name (a letter, then letters, digits and -; 128 at most)"
        )
    return text


def stack_region(region: str | None) -> str:
    """``--region``, else the AWS environment's; the stack's region is the previews'."""
    import boto3

    found = region or boto3.session.Session().region_name or os.environ.get("AWS_REGION")
    if not found:
        raise CliError("no AWS region: pass --region (the stack's region) or set AWS_REGION")
    return found


def cloudformation(region: str) -> CloudFormationClient:
    import boto3

    return boto3.session.Session().client("cloudformation", region_name=region)


def read_outputs(cfn: CloudFormationClient, name: str) -> dict[str, str]:
    """The stack's outputs; a missing or unfinished stack is an error saying what to do."""
    from botocore.exceptions import ClientError

    try:
        [found] = cfn.describe_stacks(StackName=name)["Stacks"]
    except ClientError as exc:
        if "does not exist" in str(exc):
            region = cfn.meta.region_name
            raise CliError(
                f"no stack {name} in {region}: deploy deployments/aws/pr-preview.yaml first"
                f" (aws cloudformation deploy --stack-name {name} ...), or pass --region"
            ) from exc
        raise
    status = found["StackStatus"]
    if status not in READY:
        raise CliError(
            f"stack {name} is {status}, not deployed: wait for it, or fix it in the"
            " CloudFormation console and deploy again"
        )
    return {
        o["OutputKey"]: o["OutputValue"] for o in found.get("Outputs", []) if "OutputValue" in o
    }


def config_from_outputs(name: str, outputs: Mapping[str, str]) -> dict[str, Any]:
    """The configuration fields the stack decides."""
    missing = sorted(set(REQUIRED_OUTPUTS) - set(outputs)) + (
        [KEY_OUTPUT] if KEY_OUTPUT not in outputs else []
    )
    if missing:
        raise CliError(
            f"stack {name} has no output {', '.join(missing)}: is it deployed from"
            " deployments/aws/pr-preview.yaml? Update it with that template"
        )
    values: dict[str, Any] = {}
    for output, field in {**REQUIRED_OUTPUTS, **OPTIONAL_OUTPUTS}.items():
        if output in outputs:
            value = outputs[output]
            values[field] = [value] if field == "security_group_ids" else value
    return values
