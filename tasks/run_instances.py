"""The RunInstances request of a preview and the AMI it boots: shared by the preflight's DryRun
and the real launch, so that what was checked is what is launched."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from botocore.exceptions import ClientError

from tasks.config import PreviewConfig
from tasks.retry import error_code

if TYPE_CHECKING:
    from mypy_boto3_ec2 import EC2Client
    from mypy_boto3_ec2.type_defs import ImageTypeDef


class AmiNotFound(Exception):
    """No AMI matches the configuration; the message says which and where."""


def resolve_ami(ec2: EC2Client, config: PreviewConfig) -> ImageTypeDef:
    """The configured AMI, or the newest available image whose name matches ``ami_name``."""
    if config.ami_id:
        try:
            images = ec2.describe_images(ImageIds=[config.ami_id])["Images"]
        except ClientError as exc:
            if error_code(exc).startswith("InvalidAMIID"):
                images = []
            else:
                raise
        if not images:
            raise AmiNotFound(f"AMI {config.ami_id} does not exist in {config.region}")
        return images[0]
    images = ec2.describe_images(
        Owners=config.ami_owners,
        Filters=[
            {"Name": "name", "Values": [config.ami_name]},
            {"Name": "state", "Values": ["available"]},
        ],
    )["Images"]
    if not images:
        raise AmiNotFound(
            f"no available AMI named {config.ami_name!r} owned by {','.join(config.ami_owners)}"
            f" in {config.region}"
        )
    return max(images, key=lambda image: (image.get("CreationDate", ""), image.get("Name", "")))


def run_instances_params(
    config: PreviewConfig,
    *,
    ami_id: str,
    subnet_id: str | None,
    tags: dict[str, str] | None = None,
    user_data: str = "#!/bin/bash\ntrue\n",
    client_token: str | None = None,
) -> dict[str, Any]:
    """The RunInstances request of a preview, shared by the DryRun and the real launch."""
    params: dict[str, Any] = {
        "ImageId": ami_id,
        "InstanceType": config.instance_type,
        "MinCount": 1,
        "MaxCount": 1,
        "UserData": user_data,
        "IamInstanceProfile": {"Name": config.instance_profile},
        # Hop limit 1: the PR's containers cannot reach the role's credentials through IMDS.
        "MetadataOptions": {
            "HttpTokens": "required",
            "HttpEndpoint": "enabled",
            "HttpPutResponseHopLimit": 1,
        },
        "InstanceInitiatedShutdownBehavior": "terminate",
    }
    if subnet_id:
        params["SubnetId"] = subnet_id
    if config.security_group_ids:
        params["SecurityGroupIds"] = list(config.security_group_ids)
    if tags:
        tag_list = [{"Key": key, "Value": value} for key, value in tags.items()]
        params["TagSpecifications"] = [
            {"ResourceType": "instance", "Tags": tag_list},
            {"ResourceType": "volume", "Tags": tag_list},
        ]
    if client_token:
        params["ClientToken"] = client_token
    return params
