"""Test side of the scripted instance: its rules and replies, and bare instances to run on."""

from __future__ import annotations

from typing import Any

from local_stack.scripted_instance import *  # noqa: F403


def plain_instances(ec2: Any, count: int = 1) -> list[str]:
    """``count`` bare instances of an AMI moto ships (a name filter keeps the lookup fast)."""
    images = ec2.describe_images(
        Owners=["amazon"], Filters=[{"Name": "name", "Values": ["al2023-ami-2023*-x86_64"]}]
    )["Images"]
    reservation = ec2.run_instances(ImageId=images[0]["ImageId"], MinCount=count, MaxCount=count)
    return [instance["InstanceId"] for instance in reservation["Instances"]]
