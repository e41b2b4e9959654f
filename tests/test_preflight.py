from __future__ import annotations

import ipaddress

import pytest

from local_stack.account import DemoAccount
from tasks.cloud.aws import AwsClients
from tasks.config import PreviewConfig
from tasks.steps.preflight import parse_database_url, run_preflight
from tests.fakes.aws_faults import AwsFaults, attach
from tests.support import CANARIES


def statuses(report: object) -> dict[str, str]:
    return {check.name: check.status for check in report.checks}  # type: ignore[attr-defined]


def detail(report: object, name: str) -> str:
    return next(c.detail for c in report.checks if c.name == name)  # type: ignore[attr-defined]


def test_good_account_passes_and_resolves_the_newest_al2023(
    aws: AwsClients, config: PreviewConfig
) -> None:
    report = run_preflight(aws, config)
    assert report.passed, report.markdown()
    assert set(statuses(report).values()) == {"pass"}
    image = aws.ec2.describe_images(ImageIds=[report.ami_id or ""])["Images"][0]
    assert image["Name"].startswith("al2023-ami-2023") and image["Architecture"] == "x86_64"
    assert report.subnet_id == config.subnet_id


def test_missing_ami_fails_naming_it(
    aws: AwsClients, config: PreviewConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MOTO_ENABLE_AMI_VALIDATION", "true")
    config.ami_id = "ami-0123456789abcdef0"
    report = run_preflight(aws, config)
    assert not report.passed
    assert statuses(report)["ami"] == "fail"
    assert "ami-0123456789abcdef0 does not exist" in detail(report, "ami")


def test_no_ami_matching_the_name_pattern_fails(aws: AwsClients, config: PreviewConfig) -> None:
    config.ami_name = "no-such-image-*"
    report = run_preflight(aws, config)
    assert "no available AMI named 'no-such-image-*'" in detail(report, "ami")


def test_arm_ami_on_x86_instance_type_fails(aws: AwsClients, config: PreviewConfig) -> None:
    config.ami_name = "al2023-ami-2023.*-arm64"
    report = run_preflight(aws, config)
    assert statuses(report)["ami"] == "fail"
    assert "arm64 but t3.small runs x86_64" in detail(report, "ami")


def test_security_group_in_another_vpc_fails(aws: AwsClients, config: PreviewConfig) -> None:
    vpc = aws.ec2.create_vpc(CidrBlock="10.9.0.0/16")["Vpc"]["VpcId"]
    stray = aws.ec2.create_security_group(GroupName="stray", Description="x", VpcId=vpc)["GroupId"]
    config.security_group_ids = [*config.security_group_ids, stray]
    report = run_preflight(aws, config)
    assert statuses(report)["security groups"] == "fail"
    assert f"{stray} are not in the subnet's VPC" in detail(report, "security groups")


def test_missing_subnet_and_group_fail(aws: AwsClients, config: PreviewConfig) -> None:
    config.subnet_id = "subnet-0000000000000000a"
    config.security_group_ids = ["sg-0000000000000000a"]
    report = run_preflight(aws, config)
    assert "subnet-0000000000000000a does not exist" in detail(report, "subnet")
    assert statuses(report)["security groups"] == "fail"


def test_a_container_pool_over_the_subnet_or_the_database_fails_naming_both(
    aws: AwsClients, config: PreviewConfig
) -> None:
    """Docker's default pools reach 172.31.0.0/16, the default VPC the runbook's db-server
    (172.31.39.125) lives in: a pool there would route the database into a container."""
    subnet = aws.ec2.describe_subnets(SubnetIds=[config.subnet_id or ""])["Subnets"][0]
    config.container_address_pool = subnet["CidrBlock"].rsplit(".", 2)[0] + ".0.0/16"
    report = run_preflight(aws, config)
    assert statuses(report)["subnet"] == "fail"
    assert f"overlaps subnet {config.subnet_id} ({subnet['CidrBlock']})" in detail(report, "subnet")

    url = aws.ssm.get_parameter(Name=config.database_url_parameter, WithDecryption=True)
    host, _ = parse_database_url(url["Parameter"]["Value"])
    config.container_address_pool = host.rsplit(".", 1)[0] + ".0/24"
    assert not ipaddress.ip_network(config.container_address_pool).overlaps(
        ipaddress.ip_network(subnet["CidrBlock"])
    ), "the account's database host should be outside the previews' subnet"
    report = run_preflight(aws, config)
    assert statuses(report)["subnet"] == "pass"
    assert statuses(report)["database url"] == "fail"
    assert f"overlaps the database host ({host})" in detail(report, "database url")
    assert "set container_address_pool to a private range outside the VPC" in detail(
        report, "database url"
    )

    config.container_address_pool = "10.250.0.0/16"  # outside both: passes
    assert run_preflight(aws, config).passed


def test_missing_instance_profile_fails(aws: AwsClients, config: PreviewConfig) -> None:
    config.instance_profile = "no-such-profile"
    report = run_preflight(aws, config)
    assert "instance profile no-such-profile does not exist" in detail(report, "instance profile")
    assert not report.passed


def test_dry_run_refused_names_the_refused_action(aws: AwsClients, config: PreviewConfig) -> None:
    faults = AwsFaults()
    faults.fail("ec2.RunInstances", "UnauthorizedOperation", status=403)
    attach(faults, aws.ec2)
    report = run_preflight(aws, config)
    assert statuses(report)["run-instances dry run"] == "fail"
    text = detail(report, "run-instances dry run")
    assert "UnauthorizedOperation" in text and "ec2:RunInstances refused" in text
    assert "iam:PassRole" in text


def test_describe_refused_is_reported_not_raised(aws: AwsClients, config: PreviewConfig) -> None:
    faults = AwsFaults()
    faults.fail("ec2.DescribeSubnets", "UnauthorizedOperation", status=403)
    attach(faults, aws.ec2)
    report = run_preflight(aws, config)
    assert "may not call ec2:DescribeSubnets" in detail(report, "subnet")


def test_db_sg_without_the_api_sg_rule_fails(
    aws: AwsClients, account: DemoAccount, config: PreviewConfig
) -> None:
    aws.ec2.revoke_security_group_ingress(
        GroupId=account.db_sg_id,
        IpPermissions=[
            {
                "IpProtocol": "tcp",
                "FromPort": 5432,
                "ToPort": 5432,
                "UserIdGroupPairs": [{"GroupId": account.api_sg_id}],
            }
        ],
    )
    report = run_preflight(aws, config)
    assert statuses(report)["db-sg ingress"] == "fail"
    assert "time out on the DB" in detail(report, "db-sg ingress")


def test_db_sg_open_to_the_world_is_a_security_finding(
    aws: AwsClients, account: DemoAccount, config: PreviewConfig
) -> None:
    aws.ec2.authorize_security_group_ingress(
        GroupId=account.db_sg_id,
        IpPermissions=[
            {
                "IpProtocol": "tcp",
                "FromPort": 5432,
                "ToPort": 5432,
                "IpRanges": [{"CidrIp": "0.0.0.0/0"}],
            }
        ],
    )
    report = run_preflight(aws, config)
    assert statuses(report)["db-sg ingress"] == "warn"
    assert "security finding" in detail(report, "db-sg ingress")
    assert report.passed


def test_unencoded_database_password_fails_without_printing_it(
    aws: AwsClients, config: PreviewConfig
) -> None:
    secret = "s3cr/et#pw"
    aws.ssm.put_parameter(
        Name=config.database_url_parameter,
        Value=f"postgresql+asyncpg://app:{secret}@172.31.39.125:5432/app",
        Type="SecureString",
        Overwrite=True,
    )
    report = run_preflight(aws, config)
    assert statuses(report)["database url"] == "fail"
    assert "URL-encode the password" in detail(report, "database url")
    assert secret not in report.markdown() and "s3cr" not in report.markdown()


def test_report_never_holds_a_secret(aws: AwsClients, config: PreviewConfig) -> None:
    markdown = run_preflight(aws, config).markdown()
    assert not [canary for canary in CANARIES if canary in markdown]


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql+asyncpg://u:pa%2Fss@172.31.39.125:5432/db", ("172.31.39.125", 5432)),
        ("postgresql://u:p@db.internal/db", ("db.internal", 5432)),
        ("postgres://u:p@[::1]:6543/db", ("[::1]", 6543)),
    ],
)
def test_database_url_parses(url: str, expected: tuple[str, int]) -> None:
    assert parse_database_url(url) == expected


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("postgresql+asyncpg://u:pa/ss@h:5432/db", "URL-encode"),
        ("postgresql://u:pa?ss@h:5432/db", "port is not an integer"),
        ("postgresql://u:p@ss@h:5432/db", "'@'"),
        ("mysql://u:p@h:3306/db", "not a PostgreSQL scheme"),
        ("172.31.39.125:5432", "scheme"),
        ("postgresql://u:p#w@h:5432/db", "URL-encode"),
    ],
)
def test_database_url_problems_are_named(url: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason) as caught:
        parse_database_url(url)
    assert "pa/ss" not in str(caught.value) and "p@ss" not in str(caught.value)
