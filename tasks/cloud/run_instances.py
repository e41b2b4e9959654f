"""The RunInstances request of a preview and the AMI it boots: shared by the preflight's DryRun
and the real launch, so that what was checked is what is launched.

The AMI follows ``ami_strategy``: ``stock`` boots ``ami_id`` or the newest ``ami_name``;
``baked`` boots the newest image the ``pr-preview-bake`` flow made (tasks/steps/bake.py), and
the stock AMI, with a warning, while there is none.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from botocore.exceptions import ClientError

from tasks.cloud.tags import TAG_CREATED_AT, TAG_PURPOSE, parse_time
from tasks.config import PreviewConfig
from tasks.run.errors import PreviewError
from tasks.run.prefect_context import run_logger
from tasks.run.retry import error_code

if TYPE_CHECKING:
    from mypy_boto3_ec2 import EC2Client
    from mypy_boto3_ec2.type_defs import ImageTypeDef

logger = logging.getLogger(__name__)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class AmiNotFound(PreviewError):
    """No AMI matches the configuration; the message says which and where."""


def resolve_ami(ec2: EC2Client, settings: PreviewConfig) -> ImageTypeDef:
    """The AMI a preview boots: the newest baked image when ``ami_strategy`` is ``baked`` and
    one exists, otherwise the stock AMI (``resolve_stock_ami``)."""
    if settings.ami_strategy == "baked":
        baked = newest_baked_image(ec2, settings)
        if baked is not None:
            return baked
        run_logger(logger).warning(
            "ami_strategy is baked but this account has no available image tagged %s=%s in %s:"
            " booting the stock AMI (Docker and Compose are installed at boot). Run the"
            " pr-preview-bake deployment to make one.",
            TAG_PURPOSE,
            settings.purpose_tag,
            settings.region,
        )
    return resolve_stock_ami(ec2, settings)


def baked_images(
    ec2: EC2Client, settings: PreviewConfig, states: Sequence[str] = ("available",)
) -> list[ImageTypeDef]:
    """This account's images with our Purpose tag in ``states``, oldest first (``by_age``)."""
    images = ec2.describe_images(
        Owners=["self"],
        Filters=[
            {"Name": f"tag:{TAG_PURPOSE}", "Values": [settings.purpose_tag]},
            {"Name": "state", "Values": list(states)},
        ],
    )["Images"]
    return sorted(images, key=by_age)


def by_age(image: ImageTypeDef) -> tuple[str, datetime, str]:
    """Oldest first: EC2's CreationDate (to the second), then our ``created-at`` tag (to the
    millisecond) for images made within one second, then the id."""
    tags = {tag["Key"]: tag["Value"] for tag in image.get("Tags", [])}
    created = parse_time(tags.get(TAG_CREATED_AT)) or _EPOCH
    return image.get("CreationDate", ""), created, image["ImageId"]


def newest_baked_image(ec2: EC2Client, settings: PreviewConfig) -> ImageTypeDef | None:
    """The newest available baked image, or None."""
    found = baked_images(ec2, settings)
    return found[-1] if found else None


def resolve_stock_ami(ec2: EC2Client, settings: PreviewConfig) -> ImageTypeDef:
    """The configured AMI, or the newest available image whose name matches ``ami_name``."""
    if settings.ami_id:
        try:
            images = ec2.describe_images(ImageIds=[settings.ami_id])["Images"]
        except ClientError as exc:
            if error_code(exc).startswith("InvalidAMIID"):
                images = []
            else:
                raise
        if not images:
            raise AmiNotFound(f"AMI {settings.ami_id} does not exist in {settings.region}")
        return images[0]
    images = ec2.describe_images(
        Owners=settings.ami_owners,
        Filters=[
            {"Name": "name", "Values": [settings.ami_name]},
            {"Name": "state", "Values": ["available"]},
        ],
    )["Images"]
    if not images:
        raise AmiNotFound(
            f"no available AMI named {settings.ami_name!r} owned by {','.join(settings.ami_owners)}"
            f" in {settings.region}"
        )
    return max(images, key=lambda image: (image.get("CreationDate", ""), image.get("Name", "")))


def run_instances_params(
    settings: PreviewConfig,
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
        "InstanceType": settings.instance_type,
        "MinCount": 1,
        "MaxCount": 1,
        "UserData": user_data,
        "IamInstanceProfile": {"Name": settings.instance_profile},
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
    if settings.security_group_ids:
        params["SecurityGroupIds"] = list(settings.security_group_ids)
    if tags:
        tag_list = [{"Key": key, "Value": value} for key, value in tags.items()]
        params["TagSpecifications"] = [
            {"ResourceType": "instance", "Tags": tag_list},
            {"ResourceType": "volume", "Tags": tag_list},
        ]
    if client_token:
        params["ClientToken"] = client_token
    return params
