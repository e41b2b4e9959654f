"""Preflight (runbook §2.3): prove the account can host a preview before anything is launched.

Every check is recorded as pass, warn or fail with a detail a person can act on; a refused
permission names the action that was refused (runbook §7, ``UnauthorizedOperation``).
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, ParamSpec, TypeVar
from urllib.parse import unquote

from botocore.exceptions import ClientError
from prefect.artifacts import create_markdown_artifact

from tasks.cloud.aws import AwsClients
from tasks.cloud.ecr import ecr_repository
from tasks.cloud.run_instances import AmiNotFound, resolve_ami, run_instances_params
from tasks.config import PreviewConfig
from tasks.run.errors import PreviewError
from tasks.run.prefect_context import run_logger
from tasks.run.retry import ACCESS_DENIED_CODES, error_code, is_transient
from tasks.run.step import step

if TYPE_CHECKING:
    from mypy_boto3_ec2 import EC2Client
    from mypy_boto3_iam import IAMClient
    from mypy_boto3_ssm import SSMClient

logger = logging.getLogger(__name__)

Status = Literal["pass", "warn", "fail"]
T = TypeVar("T")
P = ParamSpec("P")

POSTGRES_SCHEMES = (
    "postgres",
    "postgresql",
    "postgresql+asyncpg",
    "postgresql+psycopg2",
    "postgresql+psycopg",
)


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str


@dataclass
class PreflightReport:
    checks: list[Check] = field(default_factory=list)
    ami_id: str | None = None
    subnet_id: str | None = None
    vpc_id: str | None = None

    @property
    def passed(self) -> bool:
        return all(check.status != "fail" for check in self.checks)

    @property
    def failures(self) -> list[Check]:
        return [check for check in self.checks if check.status == "fail"]

    def add(self, name: str, status: Status, detail: str) -> None:
        self.checks.append(Check(name, status, detail))

    def markdown(self) -> str:
        icon = {"pass": "✅", "warn": "⚠️", "fail": "❌"}
        verdict = "passed" if self.passed else "failed: nothing was launched"
        lines = [
            f"## Preflight {verdict}",
            "",
            "| check | result | detail |",
            "| --- | --- | --- |",
        ]
        lines += [
            f"| {c.name} | {icon[c.status]} {c.status} | {c.detail.replace('|', '/')} |"
            for c in self.checks
        ]
        return "\n".join(lines)


class PreflightFailed(PreviewError):
    """The account cannot host a preview; the message lists every failed check."""

    def __init__(self, report: PreflightReport) -> None:
        self.report = report
        reasons = "; ".join(f"{c.name}: {c.detail}" for c in report.failures)
        super().__init__(f"preflight failed — {reasons}")


class _CheckFailed(PreviewError):
    pass


def _aws(action: str, call: Callable[[], T]) -> T:
    """Run one AWS call for a check; a refusal becomes a failed check naming ``action``."""
    try:
        return call()
    except ClientError as exc:
        if is_transient(exc):
            raise
        code = error_code(exc)
        if code in ACCESS_DENIED_CODES:
            raise _CheckFailed(
                f"{code}: the role may not call {action} — grant it (runbook §7)"
            ) from exc
        raise


def parse_database_url(value: str) -> tuple[str, int]:
    """Host and port of a PostgreSQL URL, or ValueError saying what to fix — never the value.

    Unencoded ``/ ? # @ :`` in the password are the runbook's ``invalid integer value … "port"``
    trap (§5): they make the URL split in the wrong place.
    """
    scheme, sep, rest = value.partition("://")
    if not sep:
        raise ValueError("it has no scheme:// prefix")
    if scheme.lower() not in POSTGRES_SCHEMES:
        raise ValueError(f"scheme {scheme!r} is not a PostgreSQL scheme")
    authority = rest.split("/", 1)[0].split("?", 1)[0].split("#", 1)[0]
    if authority.count("@") > 1:
        raise ValueError("the password holds an unencoded '@' — URL-encode it (@ → %40)")
    userinfo, _, hostport = authority.rpartition("@")
    if userinfo and ":" not in userinfo:
        raise ValueError("user without password — expected user:password@host")
    host, colon, port_text = hostport.rpartition(":") if ":" in hostport else (hostport, "", "")
    if not host:
        raise ValueError(
            "no host after '@' — an unencoded '/', '?' or '#' in the password cuts the URL short;"
            " URL-encode the password (/ → %2F)"
        )
    if colon and not port_text.isdigit():
        raise ValueError(
            "the port is not an integer — URL-encode the password (/ → %2F, : → %3A), runbook §5"
        )
    port = int(port_text) if port_text else 5432
    if not 0 < port < 65536:
        raise ValueError("the port is out of range")
    password = userinfo.split(":", 1)[1] if userinfo else ""
    if unquote(password) != password and "%" not in password:
        raise ValueError("the password is not URL-encoded")
    return host, port


def run_preflight(clients: AwsClients, settings: PreviewConfig) -> PreflightReport:
    """Every check of runbook §2.3 plus the database path, in order; never raises for a failed
    check. The AMI and subnet checks record what they found on the report for the later ones."""
    report = PreflightReport()
    ec2, ssm = clients.ec2, clients.ssm
    _check(report, "ami", _ami, ec2, settings, report)
    _check(report, "subnet", _subnet, ec2, settings, report)
    _check(report, "security groups", _security_groups, ec2, settings, report.vpc_id)
    _check(report, "instance profile", _instance_profile, clients.iam, settings)
    _check(
        report, "run-instances dry run", _dry_run, ec2, settings, report.ami_id, report.subnet_id
    )
    if settings.db_security_group_id:
        _check(report, "db-sg ingress", _db_security_group, ec2, settings)
    ecr = ecr_repository(settings)
    if ecr is None:
        _check(
            report, "ghcr token parameter", _parameter_exists, ssm, settings.ghcr_token_parameter
        )
    else:
        report.add("registry", "pass", f"{ecr.host} is ECR: the instance role logs in, no token")
    if settings.database == "external":
        _check(report, "database url", _database_url, ssm, settings)
    return report


def _check(
    report: PreflightReport,
    name: str,
    check: Callable[P, tuple[Status, str]],
    /,
    *args: P.args,
    **kwargs: P.kwargs,
) -> None:
    """Record ``check``'s verdict under ``name``; a check that raises what it found failed."""
    try:
        status, detail = check(*args, **kwargs)
    except (_CheckFailed, AmiNotFound) as exc:
        status, detail = "fail", str(exc)
    report.add(name, status, detail)


def _ami(ec2: EC2Client, settings: PreviewConfig, report: PreflightReport) -> tuple[Status, str]:
    """The AMI resolves (its id goes on the report even if its architecture is wrong) and runs on
    the instance type."""
    image = _aws("ec2:DescribeImages", lambda: resolve_ami(ec2, settings))
    report.ami_id = image["ImageId"]
    types = _aws(
        "ec2:DescribeInstanceTypes",
        lambda: ec2.describe_instance_types(InstanceTypes=[settings.instance_type])[  # type: ignore[list-item]
            "InstanceTypes"
        ],
    )
    supported = types[0]["ProcessorInfo"]["SupportedArchitectures"] if types else []
    arch = image.get("Architecture", "?")
    if arch not in supported:
        raise _CheckFailed(
            f"{image['ImageId']} is {arch} but {settings.instance_type} runs"
            f" {', '.join(supported) or 'nothing known'}"
        )
    return "pass", f"{image['ImageId']} ({image.get('Name', '?')}, {arch})"


def _subnet(ec2: EC2Client, settings: PreviewConfig, report: PreflightReport) -> tuple[Status, str]:
    """The configured subnet exists, or the region has a default one; it and its VPC go on the
    report."""
    if settings.subnet_id:
        try:
            subnets = _aws(
                "ec2:DescribeSubnets",
                lambda: ec2.describe_subnets(SubnetIds=[settings.subnet_id or ""])["Subnets"],
            )
        except ClientError as exc:
            if error_code(exc) == "InvalidSubnetID.NotFound":
                raise _CheckFailed(f"subnet {settings.subnet_id} does not exist") from exc
            raise
    else:
        subnets = _aws(
            "ec2:DescribeSubnets",
            lambda: ec2.describe_subnets(Filters=[{"Name": "default-for-az", "Values": ["true"]}])[
                "Subnets"
            ],
        )
        if not subnets:
            raise _CheckFailed("subnet_id is not set and the region has no default subnet")
    chosen = sorted(subnets, key=lambda s: s["AvailabilityZone"])[0]
    report.subnet_id, report.vpc_id = chosen["SubnetId"], chosen["VpcId"]
    if clash := pool_clash(settings, chosen.get("CidrBlock", ""), f"subnet {chosen['SubnetId']}"):
        raise _CheckFailed(clash)
    if settings.db_host and (clash := pool_clash(settings, settings.db_host, "db_host")):
        raise _CheckFailed(clash)
    origin = "" if settings.subnet_id else "default subnet, "
    return (
        "pass",
        f"{chosen['SubnetId']} ({origin}{chosen['VpcId']}, {chosen['AvailabilityZone']})",
    )


def pool_clash(settings: PreviewConfig, address: str, what: str) -> str | None:
    """Why ``container_address_pool`` cannot be used beside ``address`` (an IP address or a
    network; a host name is not judged), or None: a container network cut from the pool over
    it would route that address into the container instead of the VPC."""
    pool = ipaddress.IPv4Network(settings.container_address_pool)
    try:
        network = ipaddress.ip_network(address, strict=False)
    except ValueError:
        return None
    if network.version != 4 or not network.overlaps(pool):
        return None
    return (
        f"container_address_pool {pool} overlaps {what} ({address}): Docker on the instance"
        " would route it to a container network — set container_address_pool to a private range"
        " outside the VPC"
    )


def _security_groups(
    ec2: EC2Client, settings: PreviewConfig, vpc_id: str | None
) -> tuple[Status, str]:
    """The configured security groups exist and are in the subnet's VPC (``vpc_id``, if known)."""
    if not settings.security_group_ids:
        return "warn", "none set: the VPC's default security group will be used"
    try:
        groups = _aws(
            "ec2:DescribeSecurityGroups",
            lambda: ec2.describe_security_groups(GroupIds=settings.security_group_ids)[
                "SecurityGroups"
            ],
        )
    except ClientError as exc:
        if error_code(exc) == "InvalidGroup.NotFound":
            raise _CheckFailed(
                f"security group not found: {exc.response['Error']['Message']}"
            ) from exc
        raise
    found = {group["GroupId"]: group for group in groups}
    missing = [gid for gid in settings.security_group_ids if gid not in found]
    if missing:
        raise _CheckFailed(f"security group(s) {', '.join(missing)} do not exist")
    foreign = [gid for gid, g in found.items() if vpc_id and g["VpcId"] != vpc_id]
    if foreign:
        raise _CheckFailed(
            f"security group(s) {', '.join(foreign)} are not in the subnet's VPC {vpc_id}"
        )
    return "pass", ", ".join(f"{gid} ({g.get('GroupName', '?')})" for gid, g in found.items())


def _instance_profile(iam: IAMClient, settings: PreviewConfig) -> tuple[Status, str]:
    """The instance profile exists and holds a role."""
    try:
        profile = _aws(
            "iam:GetInstanceProfile",
            lambda: iam.get_instance_profile(InstanceProfileName=settings.instance_profile),
        )["InstanceProfile"]
    except ClientError as exc:
        if error_code(exc) == "NoSuchEntity":
            raise _CheckFailed(
                f"instance profile {settings.instance_profile} does not exist — create it, its"
                " role with deployments/iam/instance-role-policy.json and"
                " instance-ssm-agent-policy.json (see deployments/iam/README.md)"
            ) from exc
        raise
    roles = ", ".join(role["RoleName"] for role in profile.get("Roles", [])) or "no role!"
    status: Status = "pass" if profile.get("Roles") else "fail"
    return status, f"{settings.instance_profile} (role: {roles})"


def _dry_run(
    ec2: EC2Client, settings: PreviewConfig, ami_id: str | None, subnet_id: str | None
) -> tuple[Status, str]:
    """The real launch request, on the AMI and subnet found by the checks before, as a DryRun."""
    if not ami_id:
        raise _CheckFailed("skipped: no AMI")
    params = run_instances_params(
        settings,
        ami_id=ami_id,
        subnet_id=subnet_id,
        tags={"Purpose": settings.purpose_tag},
    )
    try:
        ec2.run_instances(DryRun=True, **params)
    except ClientError as exc:
        code = error_code(exc)
        if code == "DryRunOperation":
            return (
                "pass",
                "DryRunOperation: ec2:RunInstances, ec2:CreateTags and iam:PassRole allowed",
            )
        if code in ACCESS_DENIED_CODES:
            raise _CheckFailed(
                f"{code}: ec2:RunInstances refused (it needs ec2:RunInstances, ec2:CreateTags"
                f" and iam:PassRole on {settings.instance_profile}) — runbook §7"
            ) from exc
        if is_transient(exc):
            raise
        raise _CheckFailed(f"{code}: {exc.response['Error'].get('Message', '')}") from exc
    raise _CheckFailed("the DryRun launch did not answer DryRunOperation")


def _db_security_group(ec2: EC2Client, settings: PreviewConfig) -> tuple[Status, str]:
    """db-sg admits the preview's security groups on 5432, and not the whole internet."""
    group_id = settings.db_security_group_id or ""
    try:
        group = _aws(
            "ec2:DescribeSecurityGroups",
            lambda: ec2.describe_security_groups(GroupIds=[group_id])["SecurityGroups"][0],
        )
    except ClientError as exc:
        if error_code(exc) == "InvalidGroup.NotFound":
            raise _CheckFailed(f"db security group {group_id} does not exist") from exc
        raise
    admits_api, open_to_world = False, False
    for rule in group.get("IpPermissions", []):
        protocol = rule.get("IpProtocol")
        covers = protocol == "-1" or (
            protocol == "tcp" and rule.get("FromPort", 0) <= 5432 <= rule.get("ToPort", 0)
        )
        if not covers:
            continue
        sources = {pair.get("GroupId") for pair in rule.get("UserIdGroupPairs", [])}
        admits_api = admits_api or bool(sources & set(settings.security_group_ids))
        open_to_world = (
            open_to_world
            or any(r.get("CidrIp") == "0.0.0.0/0" for r in rule.get("IpRanges", []))
            or any(r.get("CidrIpv6") == "::/0" for r in rule.get("Ipv6Ranges", []))
        )
    if not admits_api:
        raise _CheckFailed(
            f"{group_id} does not admit {', '.join(settings.security_group_ids) or 'the preview'}"
            " on 5432: the app will time out on the DB — add an inbound rule referencing api-sg"
            " (runbook §5, §7)"
        )
    if open_to_world:
        return (
            "warn",
            f"security finding: {group_id} admits 0.0.0.0/0 on 5432 — remove it (runbook §1)",
        )
    return "pass", f"{group_id} admits {', '.join(settings.security_group_ids)} on 5432"


def _parameter_exists(ssm: SSMClient, name: str) -> tuple[Status, str]:
    """Parameter Store holds ``name``."""
    found = _aws(
        "ssm:DescribeParameters",
        lambda: ssm.describe_parameters(ParameterFilters=[{"Key": "Name", "Values": [name]}])[
            "Parameters"
        ],
    )
    if not found:
        raise _CheckFailed(f"Parameter Store has no {name} — put it as a SecureString")
    return "pass", f"{name} ({found[0].get('Type', '?')})"


def _database_url(ssm: SSMClient, settings: PreviewConfig) -> tuple[Status, str]:
    """The DATABASE_URL parameter exists and parses (its value is never reported)."""
    name = settings.database_url_parameter
    try:
        value = _aws(
            "ssm:GetParameter",
            lambda: ssm.get_parameter(Name=name, WithDecryption=True)["Parameter"]["Value"],
        )
    except ClientError as exc:
        if error_code(exc) == "ParameterNotFound":
            raise _CheckFailed(
                f"Parameter Store has no {name} — put the DATABASE_URL there"
            ) from exc
        raise
    try:
        host, port = parse_database_url(value)
    except ValueError as exc:
        raise _CheckFailed(f"the DATABASE_URL in {name} does not parse: {exc}") from None
    if clash := pool_clash(settings, host, "the database host"):
        raise _CheckFailed(clash)
    return "pass", f"{name} parses (host {host}, port {port})"


@step
def preflight(
    clients: AwsClients, settings: PreviewConfig, key: str | None = None
) -> PreflightReport:
    """Run every check, publish the report as a markdown artifact, raise if any check failed."""
    report = run_preflight(clients, settings)
    create_markdown_artifact(
        markdown=report.markdown(), key=key, description="pr-preview preflight report"
    )
    log = run_logger(logger)
    for item in report.checks:
        log.info("preflight %-22s %s  %s", item.name, item.status, item.detail)
    if not report.passed:
        raise PreflightFailed(report)
    return report
