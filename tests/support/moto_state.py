"""Small readers of moto's state shared by the tests."""

from __future__ import annotations

import base64
from typing import Any

from tasks.cloud.aws import AwsClients

LIVE_STATES = ("pending", "running", "stopping", "stopped")


def instances(aws: AwsClients, *, states: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
    """Every instance moto holds (all pages), optionally only those in ``states``."""
    found = [
        instance
        for page in aws.ec2.get_paginator("describe_instances").paginate()
        for reservation in page["Reservations"]
        for instance in reservation["Instances"]
    ]
    if states is not None:
        found = [i for i in found if i["State"]["Name"] in states]
    return found


def live(aws: AwsClients) -> list[dict[str, Any]]:
    return instances(aws, states=LIVE_STATES)


def tags(instance: dict[str, Any]) -> dict[str, str]:
    return {tag["Key"]: tag["Value"] for tag in instance.get("Tags", [])}


def user_data(aws: AwsClients, instance_id: str) -> str:
    attribute = aws.ec2.describe_instance_attribute(InstanceId=instance_id, Attribute="userData")
    return base64.b64decode(attribute["UserData"]["Value"]).decode()


def state_of(aws: AwsClients, instance_id: str) -> str:
    reservation = aws.ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0]
    return str(reservation["Instances"][0]["State"]["Name"])


def ssm_commands(aws: AwsClients, instance_id: str) -> list[str]:
    """The scripts moto holds as sent to ``instance_id`` over SSM, oldest first."""
    commands = aws.ssm.list_commands(InstanceId=instance_id)["Commands"]
    ordered = sorted(commands, key=lambda command: command["RequestedDateTime"])
    return ["\n".join(command["Parameters"]["commands"]) for command in ordered]
