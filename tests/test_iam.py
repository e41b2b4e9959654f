"""The IAM policies of ``deployments/iam/`` allow exactly the AWS calls the code makes.

The security review's finding, held by tests rather than by reading:

- **the recording**: one run of each flow (the bake, with an older baked image to prune, first:
  the previews then boot from its image) and of the operator commands, inside ``aws_faults()``
  (which sees every boto3 session the code builds), records every ``service.Operation`` and,
  through a ``before-parameter-build`` handler installed the same way, every request's
  parameters. The orchestrator policy must allow each recorded action (plus what AWS checks
  implicitly: ``iam:PassRole`` and ``ec2:CreateTags`` for RunInstances with an instance profile
  and tags, ``kms:Decrypt`` for a SecureString read) and nothing else; the tags, parameters,
  groups and documents in the requests must be the ones the conditions and resources name.
  What the instances run (user data and the SSM commands) is held to the instance-role
  policy the same way;
- **the conditions**: CreateTags is never unconditioned, terminate and commands need the
  Purpose tag, db-sg changes only touch the db-sg placeholder, KMS only through SSM; the
  recorded launches and images are judged by an IAM evaluator (``tests/support/iam_policy``):
  every launch asks for token-only metadata at hop limit 1, only bake builders are imaged;
- **the tenancy**: the instance role, with every policy the READMEs tell people to attach (and
  with AWS's ``AmazonSSMManagedInstanceCore`` attached by mistake as well), can never read the
  GitHub App's key: an explicit Deny wins;
- **parliament**: no finding above LOW that ``deployments/iam/README.md`` does not explain.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import re
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore import handlers
from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

from deployments import cli
from flows.bake import pr_preview_bake
from flows.pin import pr_pin
from flows.preview import pr_preview
from flows.sleep import pr_sleep, pr_wake
from flows.spares import pr_spares
from flows.sweeper import ttl_sweeper
from flows.teardown import pr_teardown
from local_stack.account import DemoAccount
from local_stack.db_host import DbHost
from local_stack.registry import OCI_INDEX, FakeRegistry
from local_stack.scripted_instance import MIGRATE, Reply, ScriptedInstances
from tasks.app.user_data import LaunchSpec, preview_tags, render_spare_user_data, render_user_data
from tasks.cloud.aws import AwsClients, build_clients
from tasks.cloud.databases import database_name
from tasks.cloud.db_rules import db_rule_description
from tasks.cloud.dns import record_name
from tasks.cloud.ecr import ecr_repository
from tasks.cloud.run_instances import resolve_ami
from tasks.cloud.tags import (
    TAG_ACTIVE_AT,
    TAG_NAME,
    TAG_PINNED,
    TAG_PR,
    TAG_PURPOSE,
    TAG_RAN_SECONDS,
    TAG_SHUTDOWN_AT,
    TAG_SLEEP_STATE,
    TAG_SLEPT_AT,
    TAG_SLEPT_SECONDS,
    TAG_SPARE,
    TAG_WARNED_FOR,
    TAG_WOKE_AT,
    format_time,
)
from tasks.config import APP_KEY_PARAMETER_PREFIX, ECR_REGISTRY_PATTERN, ENV_PREFIX, PreviewConfig
from tasks.github.client import GitHub
from tasks.steps.bake import BUILDER_NAME, baked_image_tags, render_bake_user_data
from tasks.steps.check_image import check_image
from tasks.steps.command import extend_preview, pr_previews, start_preview, stop_preview
from tasks.steps.database import TAG_USED_AT, create_database
from tasks.steps.launch import launch_instance
from tasks.steps.spares import SPARE, spare_tags
from tasks.steps.sweep import StickyExpiry, sweep
from tasks.steps.update import deploy_commands
from tests.fakes.aws_faults import aws_faults
from tests.fakes.github import FakeGitHub
from tests.support import CANARY_GHCR_TOKEN, REGION
from tests.support.iam_policy import Policy, Request, Verdict, evaluate, load_policy
from tests.support.moto_state import instances, live, state_of, user_data
from tests.test_bake import CHECK, seals_after, seed_baked_image, snapshot_of, snapshot_tags_in_moto

IAM = Path(__file__).resolve().parents[1] / "deployments" / "iam"
ORCHESTRATOR = IAM / "orchestrator-policy.json"
INSTANCE_ROLE = IAM / "instance-role-policy.json"
INSTANCE_SSM_AGENT = IAM / "instance-ssm-agent-policy.json"
ECS_WORKER = IAM / "ecs-worker-policy.json"  # held to its calls by tests/test_ecs_pool.py
# AWS's managed policy, as AWS publishes it (tests/data/iam/README.md says where from).
MANAGED_SSM_CORE = Path(__file__).parent / "data" / "iam" / "AmazonSSMManagedInstanceCore.json"
ACCOUNT = "123456789012"
PURPOSE = PreviewConfig.model_fields["purpose_tag"].default
DB_SG_PLACEHOLDER = "arn:aws:ec2:*:*:security-group/DB_SECURITY_GROUP_ID"
DB_HOST_PLACEHOLDER = "arn:aws:ec2:*:*:instance/DB_INSTANCE_ID"
ECR_REPOSITORY = "ECR_REPOSITORY"  # the placeholder of the configured ECR repositories
ECR_PLACEHOLDER = f"arn:aws:ecr:*:*:repository/{ECR_REPOSITORY}"
ECR_IMAGE = "123456789012.dkr.ecr.ap-northeast-1.amazonaws.com/octo-org/app"
DNS_ZONE_ID = "DNS_ZONE_ID"  # the placeholder of the previews' private hosted zone
DNS_ZONE_PLACEHOLDER = f"arn:aws:route53:::hostedzone/{DNS_ZONE_ID}"
DNS_ZONE = "previews.internal."
PARAMETERS = "arn:aws:ssm:*:*:parameter/pr-preview/*"
APP_KEY = "arn:aws:ssm:*:*:parameter/pr-preview-app/*"
INSTANCE_ARN = "arn:aws:ec2:*:*:instance/*"
IMAGE_ARN = "arn:aws:ec2:*::image/*"
SNAPSHOT_ARN = "arn:aws:ec2:*::snapshot/*"

REPO = "octo-org/app"
SHA1 = "1a2b3c4d5e6f7a8b9c0d1a2b3c4d5e6f7a8b9c0d"
SHA2 = "9f8e7d6c5b4a39281706f5e4d3c2b1a098765432"

Statement = dict[str, Any]


# --- reading the policies -------------------------------------------------------------------


def load(path: Path) -> dict[str, Any]:
    policy: dict[str, Any] = json.loads(path.read_text())
    return policy


def as_list(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def statements(path: Path) -> list[Statement]:
    return list(load(path)["Statement"])


def allowing(path: Path, action: str) -> list[Statement]:
    """The statements of ``path`` that allow ``action`` (IAM compares actions case-blind)."""
    return [
        s
        for s in statements(path)
        if s["Effect"] == "Allow" and action.lower() in {a.lower() for a in as_list(s["Action"])}
    ]


def for_ecr(statement: Statement) -> bool:
    """A statement only an image in ECR needs: the recording's registry is not ECR."""
    return all(action.startswith("ecr:") for action in as_list(statement["Action"]))


def allowed_actions(path: Path, *, ecr: bool = False) -> set[str]:
    """The actions ``path`` allows, without (or with ``ecr``: only) the ECR statements."""
    return {
        a
        for s in statements(path)
        if s["Effect"] == "Allow" and for_ecr(s) == ecr
        for a in as_list(s["Action"])
    }


def allowing_create_tags(path: Path, create_action: str) -> list[Statement]:
    """The CreateTags statements of ``path`` for tags given with ``create_action``."""
    return [
        s
        for s in allowing(path, "ec2:CreateTags")
        if condition(s, "StringEquals", "ec2:CreateAction") == [create_action]
    ]


def tags_of(resource: dict[str, Any]) -> dict[str, str]:
    return {tag["Key"]: tag["Value"] for tag in resource.get("Tags", [])}


def condition(statement: Statement, operator: str, key: str) -> list[str] | None:
    """The values of ``operator`` → ``key`` in the statement's Condition, or None."""
    found = statement.get("Condition", {}).get(operator, {}).get(key)
    return None if found is None else as_list(found)


def covers(statement: Statement, arn: str) -> bool:
    """Whether one of the statement's Resource patterns matches ``arn`` (``*`` as IAM reads it)."""
    return any(fnmatch.fnmatchcase(arn, pattern) for pattern in as_list(statement["Resource"]))


# botocore's event names carry the service id; IAM's prefix differs for a few services.
IAM_PREFIXES = {"route-53": "route53"}


def iam_action(operation: str) -> str:
    """``ec2.RunInstances`` (a botocore event's service id and operation) → ``ec2:RunInstances``;
    ``route-53.GetHostedZone`` → ``route53:GetHostedZone``."""
    service, name = operation.split(".", 1)
    return f"{IAM_PREFIXES.get(service, service)}:{name}"


# --- what IAM decides, by the evaluator -----------------------------------------------------


def policies(*paths: Path) -> dict[str, Policy]:
    return {path.name: load_policy(path) for path in paths}


def without_denies(attached: dict[str, Policy]) -> dict[str, Policy]:
    """``attached`` without its explicit Denies: what a test shows they change."""
    return {
        name: {**policy, "Statement": [s for s in policy["Statement"] if s["Effect"] != "Deny"]}
        for name, policy in attached.items()
    }


def attached_to_the_instance_role() -> dict[str, Policy]:
    """Every policy the READMEs tell people to attach to the preview instance role, read from
    their words ("… role gets exactly `a.json` and `b.json`, nothing else"): both must say the
    same, and name nothing but the project's files."""
    named = []
    for readme in (IAM.parents[1] / "README.md", IAM / "README.md"):
        text = " ".join(readme.read_text().split())
        [listed] = re.findall(r"role gets exactly (.+?), nothing else", text)
        files = {name.removeprefix("deployments/iam/") for name in re.findall(r"`([^`]+)`", listed)}
        assert files and all((IAM / name).is_file() for name in files), (readme, listed)
        named.append(files)
    assert named[0] == named[1], named
    return policies(*(IAM / name for name in sorted(named[0])))


def arn_in(service: str, resource: str, *, account: str = ACCOUNT) -> str:
    """An ARN in the test's region and account (``account=""``: AWS's images and documents)."""
    return f"arn:aws:{service}:{REGION}:{account}:{resource}"


def request_tags(tags: dict[str, str]) -> dict[str, Any]:
    """The context of tags given with a request: ``aws:RequestTag/<key>`` and ``aws:TagKeys``."""
    context: dict[str, Any] = {f"aws:RequestTag/{key}": value for key, value in tags.items()}
    return {**context, "aws:TagKeys": sorted(tags)} if tags else context


def resource_tags(tags: dict[str, str]) -> dict[str, Any]:
    return {f"aws:ResourceTag/{key}": value for key, value in tags.items()}


def tags_given(params: dict[str, Any], resource_type: str) -> dict[str, str]:
    return {
        tag["Key"]: tag["Value"]
        for spec in params.get("TagSpecifications", [])
        if spec["ResourceType"] == resource_type
        for tag in spec["Tags"]
    }


def launch_requests(params: dict[str, Any]) -> list[Request]:
    """What IAM authorizes for one RunInstances request: the instance (its request tags and
    metadata options) and volume it creates, and the image, subnet, groups and ENI it uses."""
    options = params.get("MetadataOptions", {})
    metadata = {
        key: options[option]
        for key, option in (
            ("ec2:MetadataHttpTokens", "HttpTokens"),
            ("ec2:MetadataHttpPutResponseHopLimit", "HttpPutResponseHopLimit"),
        )
        if option in options
    }
    instance = {**request_tags(tags_given(params, "instance")), **metadata}
    made = [
        Request("ec2:RunInstances", arn_in("ec2", "instance/*"), instance),
        Request(
            "ec2:RunInstances",
            arn_in("ec2", "volume/*"),
            request_tags(tags_given(params, "volume")),
        ),
        Request("ec2:RunInstances", arn_in("ec2", f"image/{params['ImageId']}", account="")),
        Request("ec2:RunInstances", arn_in("ec2", "network-interface/*")),
    ]
    if params.get("SubnetId"):
        made.append(Request("ec2:RunInstances", arn_in("ec2", f"subnet/{params['SubnetId']}")))
    for group in params.get("SecurityGroupIds", []):
        made.append(Request("ec2:RunInstances", arn_in("ec2", f"security-group/{group}")))
    return made


def launch_path(params: dict[str, Any]) -> str:
    """Which launch a recorded RunInstances request is, by its tags."""
    tags = tags_given(params, "instance")
    if params.get("DryRun"):
        return "doctor's dry run"
    if tags.get(TAG_NAME) == BUILDER_NAME:
        return "bake builder"
    if tags.get(TAG_SPARE) == SPARE:
        return "warm spare"
    return "preview" if TAG_PR in tags else f"unknown: {tags}"


def image_requests(params: dict[str, Any], instance_tags: dict[str, str]) -> list[Request]:
    """What IAM authorizes for one CreateImage request: the instance imaged (its tags), and the
    image and snapshots made (their request tags)."""
    instance = arn_in("ec2", f"instance/{params['InstanceId']}")
    made = [Request("ec2:CreateImage", instance, resource_tags(instance_tags))]
    for kind in ("image", "snapshot"):
        context = request_tags(tags_given(params, kind))
        made.append(Request("ec2:CreateImage", arn_in("ec2", f"{kind}/*", account=""), context))
    return made


def parameter_reads(name: str) -> list[Request]:
    """Every way to read SecureString ``name``'s value: the reads of it or of its path, and the
    decryption Parameter Store asks KMS for on the reader's behalf."""
    parameter = arn_in("ssm", f"parameter{name}")
    reads = [
        Request(f"ssm:{action}", parameter)
        for action in ("GetParameter", "GetParameters", "GetParameterHistory")
    ]
    reads.append(
        Request("ssm:GetParametersByPath", arn_in("ssm", f"parameter{name.rsplit('/', 1)[0]}"))
    )
    return [*reads, decryption(parameter)]


def decryption(parameter: str) -> Request:
    context = {
        "kms:ViaService": f"ssm.{REGION}.amazonaws.com",
        "kms:EncryptionContext:PARAMETER_ARN": parameter,
    }
    return Request("kms:Decrypt", arn_in("kms", "key/0d1e2f3a-aws-ssm-default-key"), context)


# --- recording what the code asks of AWS ----------------------------------------------------


class Requests:
    """Every request the code's boto3 clients build: operation and parameters."""

    def __init__(self) -> None:
        self.made: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, params: dict[str, Any], model: Any, event_name: str, **_: Any) -> None:
        service = event_name.split(".")[1]
        self.made.append((f"{service}.{model.name}", copy.deepcopy(params)))

    def of(self, operation: str) -> list[dict[str, Any]]:
        return [params for name, params in self.made if name == operation]


@contextmanager
def recorded_requests() -> Iterator[Requests]:
    """Like ``aws_faults()``: a handler in every boto3 session created inside the block."""
    requests = Requests()
    spec = ("before-parameter-build", requests)
    handlers.BUILTIN_HANDLERS.append(spec)
    try:
        yield requests
    finally:
        handlers.BUILTIN_HANDLERS.remove(spec)


def implied_actions(requests: Requests) -> set[str]:
    """What AWS authorizes besides the operation itself, for the requests the code made."""
    implied = set()
    for params in requests.of("ec2.RunInstances"):
        if params.get("IamInstanceProfile"):
            implied.add("iam:PassRole")
        if params.get("TagSpecifications"):
            implied.add("ec2:CreateTags")
    if any(params.get("TagSpecifications") for params in requests.of("ec2.CreateImage")):
        implied.add("ec2:CreateTags")
    if any(params.get("WithDecryption") for params in requests.of("ssm.GetParameter")):
        implied.add("kms:Decrypt")  # a SecureString is decrypted with the caller's KMS rights
    if any(p.get("Type") == "SecureString" for p in requests.of("ssm.PutParameter")):
        implied.add("kms:Encrypt")  # ... and encrypted with them when it is stored
    return implied


# The AWS CLI's commands named otherwise than the action they are authorized as.
CLI_ACTIONS = {"ecr:GetLoginPassword": "ecr:GetAuthorizationToken"}
# What a docker pull from ECR is authorized as (the manifest, then each layer's download URL).
ECR_PULL_ACTIONS = {"ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer"}


def shell_actions(texts: list[str]) -> set[str]:
    """The IAM actions of the ``aws <service> <command>`` lines in what instances run, and of
    their docker pulls from ECR."""
    found = set()
    for text in texts:
        for service, command in re.findall(r"\baws\s+([a-z0-9]+)\s+([a-z][a-z0-9-]*)", text):
            action = f"{service}:{''.join(part.title() for part in command.split('-'))}"
            found.add(CLI_ACTIONS.get(action, action))
            if service == "ssm" and command == "get-parameter" and "--with-decryption" in text:
                found.add("kms:Decrypt")
        # `docker pull`, `docker compose ... pull`, or the user data's `compose pull` function.
        if ECR_REGISTRY_PATTERN.search(text) and re.search(r"\b(docker|compose)\b.*\bpull\b", text):
            found |= ECR_PULL_ACTIONS
    return found


class Recording:
    def __init__(self) -> None:
        self.phases: dict[str, Counter[str]] = {}
        self.requests = Requests()
        self.calls: Counter[str] = Counter()
        self.on_instances: list[str] = []
        self.pruned_images: set[str] = set()  # the older baked image the bake may remove
        self.pruned_snapshots: set[str] = set()
        self.builders: list[str] = []
        self.zone_id = ""  # the previews' private hosted zone

    @property
    def actions(self) -> set[str]:
        return {iam_action(call) for call in self.calls}


def cli_environment(account: DemoAccount, monkeypatch: pytest.MonkeyPatch, **extra: object) -> None:
    """The operator's PR_PREVIEW_* variables; no Prefect API, so no Prefect Variable."""
    values: dict[str, Any] = {**account.config_values(), "region": REGION, **extra}
    for name, value in values.items():
        text = ",".join(value) if isinstance(value, list) else str(value)
        monkeypatch.setenv(f"{ENV_PREFIX}{name.upper()}", text)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)


def seed_expired_preview_and_leftover_rule(aws: AwsClients, config: PreviewConfig) -> str:
    """With the fixture's clients (not recorded): what a crashed run leaves for the sweeper."""
    ami = resolve_ami(aws.ec2, config)["ImageId"]
    expired = launch_instance(aws.ec2, config, LaunchSpec(REPO, 50, SHA1), ami_id=ami)
    past = format_time(datetime.now(UTC) - timedelta(hours=1))
    aws.ec2.create_tags(
        Resources=[expired.instance_id], Tags=[{"Key": TAG_SHUTDOWN_AT, "Value": past}]
    )
    aws.ec2.authorize_security_group_ingress(
        GroupId=config.db_security_group_id or "",
        IpPermissions=[
            {
                "IpProtocol": "tcp",
                "FromPort": 5432,
                "ToPort": 5432,
                "IpRanges": [
                    {"CidrIp": "203.0.113.9/32", "Description": db_rule_description("i-0dead")}
                ],
            }
        ],
    )
    return expired.instance_id


def private_zone(aws: AwsClients) -> str:
    """With the fixture's session (not recorded): the previews' private hosted zone."""
    route53 = boto3.client("route53", region_name=REGION)
    vpc = aws.ec2.describe_vpcs()["Vpcs"][0]["VpcId"]
    created = route53.create_hosted_zone(
        Name=DNS_ZONE,
        CallerReference="pr-preview",
        HostedZoneConfig={"PrivateZone": True},
        VPC={"VPCRegion": REGION, "VPCId": vpc},
    )
    zone_id: str = created["HostedZone"]["Id"].rsplit("/", 1)[-1]
    return zone_id


def seed_leftover_name(zone_id: str, pr: int) -> str:
    """With the fixture's session (not recorded): the name of a preview a crash left."""
    name = record_name(REPO, pr, DNS_ZONE)
    boto3.client("route53", region_name=REGION).change_resource_record_sets(
        HostedZoneId=zone_id,
        ChangeBatch={
            "Changes": [
                {
                    "Action": "UPSERT",
                    "ResourceRecordSet": {
                        "Name": name,
                        "Type": "A",
                        "TTL": 60,
                        "ResourceRecords": [{"Value": "172.31.9.9"}],
                    },
                }
            ]
        },
    )
    return name.rstrip(".")


def record_changes(params: dict[str, Any]) -> Request:
    """What IAM authorizes for one ChangeResourceRecordSets request: the zone, and the names
    (normalized: lower case, no trailing dot), types and actions of its changes."""
    changes = params["ChangeBatch"]["Changes"]
    context = {
        "route53:ChangeResourceRecordSetsNormalizedRecordNames": [
            c["ResourceRecordSet"]["Name"].lower().rstrip(".") for c in changes
        ],
        "route53:ChangeResourceRecordSetsRecordTypes": [
            c["ResourceRecordSet"]["Type"] for c in changes
        ],
        "route53:ChangeResourceRecordSetsActions": [c["Action"] for c in changes],
    }
    zone = f"arn:aws:route53:::hostedzone/{params['HostedZoneId']}"
    return Request("route53:ChangeResourceRecordSets", zone, context)


def seed_orphan_database(aws: AwsClients, config: PreviewConfig) -> None:
    """With the fixture's clients (not recorded): a killed run's database, long unused."""
    made = create_database(aws, config, REPO, 47)
    aws.ssm.add_tags_to_resource(
        ResourceType="Parameter",
        ResourceId=made.parameter,
        Tags=[{"Key": TAG_USED_AT, "Value": "2026-01-01T00:00:00Z"}],
    )


def record(
    aws: AwsClients,
    account: DemoAccount,
    config: PreviewConfig,
    registry: FakeRegistry,
    scripted_ssm: ScriptedInstances,
    monkeypatch: pytest.MonkeyPatch,
    db_host: DbHost,
) -> Recording:
    """A preview's whole life, a failed run, the sweeper and the operator's commands."""
    config.image = f"{registry.host}/octo-org/app"
    config.db_sg_open_public_ip = True  # runbook §2.5's optional db-sg path, so its calls happen
    config.env_parameter_path = "/pr-preview/env"  # the app's secrets, read by the instances
    registry.users["octo-org"] = CANARY_GHCR_TOKEN
    for sha in (SHA1, SHA2):
        registry.push("octo-org/app", sha, private=True)
    scripted_ssm.healthy()
    scripted_ssm.on(r"DB TCP", Reply(stdout="DB TCP OK 172.31.39.125:5432\n"))
    scripted_ssm.on(r"psycopg2", Reply(stdout="DB CONNECT OK\n"))
    # Every preview named in a private hosted zone (dns_zone_id), so Route 53's calls happen.
    zone_id = private_zone(aws)
    config.dns_zone_id = zone_id
    cli_environment(
        account, monkeypatch, poll_seconds=0.01, db_sg_open_public_ip=True, dns_zone_id=zone_id
    )
    recording = Recording()
    recording.zone_id = zone_id
    # An image an earlier bake left, one more than baked_images_kept: the bake prunes it.
    config.baked_images_kept = 1
    with snapshot_tags_in_moto():
        older = seed_baked_image(aws, config, datetime.now(UTC) - timedelta(days=7))
    [image] = aws.ec2.describe_images(ImageIds=[older])["Images"]
    recording.pruned_images, recording.pruned_snapshots = {older}, {snapshot_of(dict(image))}
    scripted_ssm.respond(CHECK, seals_after(1))

    def baked() -> None:
        result = pr_preview_bake(config=config, bake_timeout_seconds=10, image_timeout_seconds=10)
        assert result.deregistered == [older]
        recording.builders.append(result.builder_id)
        config.ami_strategy = "baked"  # the previews below boot from the baked image

    def opened() -> None:
        result = pr_preview(REPO, 42, SHA1, action="opened", config=config)
        assert (result.status, result.path) == ("ready", "launched")

    def spares_made() -> None:
        config.warm_spares = 1
        assert len(pr_spares(config=config).launched) == 1
        scripted_ssm.on(r"echo spare-ready", Reply(stdout="spare-ready\n"))

    def spare_claimed() -> None:
        result = pr_preview(REPO, 45, SHA1, action="opened", config=config)
        assert (result.status, result.path) == ("ready", "spare")
        config.warm_spares = 0
        assert len(pr_spares(config=config).rotated) == 0  # claimed: no longer a spare
        assert pr_teardown(REPO, 45, config=config).terminated

    def pushed() -> None:
        result = pr_preview(REPO, 42, SHA2, action="synchronize", config=config)
        assert (result.status, result.path) == ("ready", "in-place")

    def asleep() -> None:
        assert pr_sleep(config=config).changed == [preview_of(42)]

    def awake() -> None:
        assert pr_wake(config=config).changed == [preview_of(42)]

    def preview_of(pr: int) -> str:
        [found] = [i for i in live(aws) if tags_of(i).get(TAG_PR) == str(pr)]
        return str(found["InstanceId"])

    def commanded() -> None:
        # /preview stop, start and extend: the command flow's own steps on PR 42's preview.
        clients = build_clients(config)  # as the command flow builds them: recorded
        [preview] = pr_previews(clients.ec2, config, REPO, 42)
        stop_preview(clients, config, preview)
        assert state_of(aws, preview.instance_id) == "stopped"
        start_preview(clients, config, preview)
        assert state_of(aws, preview.instance_id) == "running"
        assert extend_preview(clients, config, preview, 2.0) > datetime.now(UTC)

    def pinned() -> None:
        # The keep label put on and taken off PR 42 (no token: the events are taken as they are).
        assert pr_pin(REPO, 42, "labeled", "keep", config=config).instance_ids
        assert pr_pin(REPO, 42, "unlabeled", "keep", config=config).instance_ids

    def warned() -> None:
        # PR 42's preview expires within the hour: the sweeper warns its pull request.
        soon = format_time(datetime.now(UTC) + timedelta(minutes=30))
        aws.ec2.create_tags(
            Resources=[preview_of(42)], Tags=[{"Key": TAG_SHUTDOWN_AT, "Value": soon}]
        )
        fake = FakeGitHub()
        fake.add_pull(REPO, {"number": 42, "state": "open", "head": {"sha": SHA2}})
        github = StickyExpiry(GitHub("good-token", transport=fake.transport), REGION)
        clients = build_clients(config)  # as the sweeper flow builds them: recorded
        assert sweep(clients.ec2, config, github=github).warned == [preview_of(42)]
        assert len(fake.comment_bodies(REPO, 42)) == 2  # the sticky comment and the warning

    def closed() -> None:
        assert pr_teardown(REPO, 42, config=config).dns_name

    def own_database() -> None:
        # database: per-preview — made, handed to the instance, dropped; on from here on, so
        # the sweeper below drops a gone preview's database too.
        config.db_instance_id = db_host.instance_id
        config.database = "per-preview"
        result = pr_preview(REPO, 46, SHA1, action="opened", config=config)
        assert (result.status, result.path) == ("ready", "launched") and result.database
        assert pr_teardown(REPO, 46, config=config).database

    def failed() -> None:
        # The migration never finishes: the command is cancelled, the run diagnosed over SSM.
        scripted_ssm.on(MIGRATE, Reply(pending_reads=-1))
        timeout, config.migrate_timeout_seconds = config.migrate_timeout_seconds, 0.3
        try:
            assert pr_preview(REPO, 44, SHA1, config=config, return_state=True).is_failed()
        finally:
            config.migrate_timeout_seconds = timeout

    expired: list[str] = []
    leftover_names: list[str] = []

    def swept() -> None:
        # idle_stop_minutes: the sweeper reads each running preview's activity and keeps it.
        config.idle_stop_minutes = 30
        used = format_time(datetime.now(UTC) - timedelta(minutes=5))
        scripted_ssm.on(r"LAST-ACTIVITY", Reply(stdout=f"ACTIVITY 0 0\nLAST-ACTIVITY {used}\n"))
        report = ttl_sweeper(config=config)
        assert report.idle and not report.slept_idle
        config.idle_stop_minutes = None
        assert (report.terminated, len(report.revoked_rules)) == (expired, 1)
        assert report.dropped_databases == [database_name(REPO, 47)]
        assert report.removed_names == leftover_names

    def command(*argv: str, code: int = 0) -> Callable[[], None]:
        def run() -> None:
            assert cli.main(list(argv)) == code

        return run

    phases: list[tuple[str, Callable[[], None]]] = [
        ("bake", baked),
        ("preview opened", opened),
        ("push deployed in place", pushed),
        ("scheduled sleep", asleep),
        ("scheduled wake", awake),
        ("commands: stop, start, extend", commanded),
        ("keep label: pinned, unpinned", pinned),
        ("expiry warning", warned),
        ("teardown", closed),
        ("warm spare launched", spares_made),
        ("warm spare claimed", spare_claimed),
        ("a database of its own", own_database),
        ("failed and diagnosed", failed),
        ("ttl sweeper", swept),
        ("pr-preview list", command("list")),
        ("pr-preview tunnel --print", command("tunnel", "44", "--print")),
        ("pr-preview logs", command("logs", "44")),
        ("pr-preview doctor", command("doctor", "--pr", "44")),
        ("pr-preview cleanup", command("cleanup", "--pr", "44", "--yes")),
    ]
    # No heartbeat thread: joining it costs up to 1 s per run (as in test_fault_matrix).
    no_heartbeat = temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None})
    with (
        no_heartbeat,
        snapshot_tags_in_moto(),
        aws_faults() as faults,
        recorded_requests() as requests,
    ):
        for name, phase in phases:
            if name == "ttl sweeper":
                expired.append(seed_expired_preview_and_leftover_rule(aws, config))
                seed_orphan_database(aws, config)
                leftover_names.append(seed_leftover_name(zone_id, 50))
            before = Counter(faults.calls)
            phase()
            recording.phases[name] = faults.calls - before
    recording.requests, recording.calls = requests, faults.calls
    ours = [i for i in instances(aws) if i["InstanceId"] != db_host.instance_id]
    assert all(state_of(aws, i["InstanceId"]) == "terminated" for i in ours)
    recording.on_instances = [c.command for c in scripted_ssm.calls] + [
        user_data(aws, i["InstanceId"]) for i in instances(aws)
    ]
    return recording


def phase_table(recording: Recording) -> str:
    return "\n".join(
        f"  {name}: {', '.join(sorted(calls))}" for name, calls in recording.phases.items()
    )


SPARE_CONDITION = f"aws:ResourceTag/{TAG_SPARE}"
SLEEP_TAGS = {
    TAG_SLEEP_STATE,
    TAG_SLEPT_AT,
    TAG_WOKE_AT,
    TAG_RAN_SECONDS,
    TAG_SLEPT_SECONDS,
    TAG_ACTIVE_AT,
}
# The keep label's pin and the expiry warning's claim, moved on our instances only.
EXPIRY_TAGS = {TAG_PINNED, TAG_WARNED_FOR}


# --- the tests ------------------------------------------------------------------------------


@pytest.mark.usefixtures("prefect_server")
def test_the_policies_allow_exactly_the_calls_the_code_makes(
    aws: AwsClients,
    account: DemoAccount,
    config: PreviewConfig,
    registry: FakeRegistry,
    scripted_ssm: ScriptedInstances,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    db_host: DbHost,
) -> None:
    recording = record(aws, account, config, registry, scripted_ssm, monkeypatch, db_host)
    capsys.readouterr()
    table = phase_table(recording)
    silent = [name for name, calls in recording.phases.items() if not calls]
    assert not silent, f"no AWS call recorded for {silent}: the recorder missed a client\n{table}"

    # Orchestrator: what was asked (and what AWS checks with it) is exactly what is allowed.
    requests = recording.requests
    needed = recording.actions | implied_actions(requests)
    allowed = allowed_actions(ORCHESTRATOR)
    refused, unused = needed - allowed, allowed - needed
    assert not refused, f"the code calls what the policy refuses; recorded:\n{table}"
    assert not unused, f"the policy allows what the code never calls; recorded:\n{table}"
    assert ("kms:Decrypt" in allowed) == ("ssm:GetParameter" in recording.actions)

    # ... and the requests fit the statements' conditions and resources.
    launch_keys = set(preview_tags(config, LaunchSpec(REPO, 1, SHA1), datetime.now(UTC), 1))
    launch_keys |= set(spare_tags(config, datetime.now(UTC)))
    [at_launch] = allowing_create_tags(ORCHESTRATOR, "RunInstances")
    on_our_instances = [
        s
        for s in allowing(ORCHESTRATOR, "ec2:CreateTags")
        if condition(s, "StringEquals", "aws:ResourceTag/Purpose")
    ]
    [later] = [s for s in on_our_instances if not condition(s, "StringEquals", SPARE_CONDITION)]
    [on_spares] = [s for s in on_our_instances if condition(s, "StringEquals", SPARE_CONDITION)]
    tagged_at_launch: set[str] = set()
    for params in requests.of("ec2.RunInstances"):
        for spec in params["TagSpecifications"]:
            tags = {tag["Key"]: tag["Value"] for tag in spec["Tags"]}
            assert tags["Purpose"] == PURPOSE
            assert covers(at_launch, f"arn:aws:ec2:{REGION}:123456789012:{spec['ResourceType']}/x")
            tagged_at_launch |= set(tags)
    assert (
        tagged_at_launch
        == launch_keys
        == set(condition(at_launch, "ForAllValues:StringEquals", "aws:TagKeys") or ())
    )
    # A claim re-tags a spare to its PR (only a spare: the condition names the marker); every
    # other change of tags moves a preview's sha and times.
    claims = [p for p in requests.of("ec2.CreateTags") if TAG_PR in {t["Key"] for t in p["Tags"]}]
    claimed = {tag["Key"] for params in claims for tag in params["Tags"]}
    moved = {
        tag["Key"]
        for params in requests.of("ec2.CreateTags")
        if params not in claims
        for tag in params["Tags"]
    }
    assert claims, f"no spare was claimed; recorded:\n{table}"
    assert moved == set(condition(later, "ForAllValues:StringEquals", "aws:TagKeys") or ())
    assert claimed == set(condition(on_spares, "ForAllValues:StringEquals", "aws:TagKeys") or ())
    assert condition(on_spares, "StringEquals", SPARE_CONDITION) == [SPARE]
    assert TAG_PURPOSE not in claimed  # a claim never changes whose instance it is

    db_sg = config.db_security_group_id
    for operation in ("ec2.AuthorizeSecurityGroupIngress", "ec2.RevokeSecurityGroupIngress"):
        assert {params["GroupId"] for params in requests.of(operation)} == {db_sg}
        [statement] = allowing(ORCHESTRATOR, iam_action(operation))
        assert as_list(statement["Resource"]) == [DB_SG_PLACEHOLDER]

    documents = {params["DocumentName"] for params in requests.of("ssm.SendCommand")}
    for document in documents:
        arn = f"arn:aws:ssm:{REGION}::document/{document}"
        assert any(covers(s, arn) for s in allowing(ORCHESTRATOR, "ssm:SendCommand")), arn
    for params in requests.of("ssm.GetParameter"):
        arn = f"arn:aws:ssm:{REGION}:123456789012:parameter{params['Name']}"
        assert any(covers(s, arn) for s in allowing(ORCHESTRATOR, "ssm:GetParameter")), arn
    # A preview's own database: its parameter written, tagged and deleted under one path only,
    # and the database host the one instance without our Purpose tag that gets commands.
    kept = "ssm.PutParameter", "ssm.AddTagsToResource", "ssm.DeleteParameter"
    for operation in (*kept, "ssm.ListTagsForResource"):
        assert requests.of(operation), f"no {operation}; recorded:\n{table}"
        for params in requests.of(operation):
            name = params.get("Name") or params["ResourceId"]
            arn = f"arn:aws:ssm:{REGION}:123456789012:parameter{name}"
            assert name.startswith("/pr-preview/databases/pr_"), params
            assert any(covers(s, arn) for s in allowing(ORCHESTRATOR, iam_action(operation)))
    unconditioned = [s for s in allowing(ORCHESTRATOR, "ssm:SendCommand") if not s.get("Condition")]
    assert sorted(r for s in unconditioned for r in as_list(s["Resource"])) == [
        DB_HOST_PLACEHOLDER,
        "arn:aws:ssm:*:*:document/AWS-RunShellScript",
    ]
    targets = {i for params in requests.of("ssm.SendCommand") for i in params["InstanceIds"]}
    ours = {i["InstanceId"] for i in instances(aws) if tags_of(i).get("Purpose") == PURPOSE}
    assert targets - ours == {db_host.instance_id}
    for params in requests.of("iam.GetInstanceProfile"):
        arn = f"arn:aws:iam::123456789012:instance-profile/{params['InstanceProfileName']}"
        assert any(covers(s, arn) for s in allowing(ORCHESTRATOR, "iam:GetInstanceProfile"))
    for params in requests.of("ec2.RunInstances"):
        role = f"arn:aws:iam::123456789012:role/{params['IamInstanceProfile']['Name']}"
        assert any(covers(s, role) for s in allowing(ORCHESTRATOR, "iam:PassRole")), role

    # Route 53: only the configured zone; each change judged with its names, types, actions.
    zone = recording.zone_id
    in_zone = policies(ORCHESTRATOR)
    for name, policy in in_zone.items():
        in_zone[name] = json.loads(json.dumps(policy).replace(DNS_ZONE_ID, zone))
    for operation in ("route-53.GetHostedZone", "route-53.ListResourceRecordSets"):
        assert requests.of(operation), f"no {operation}; recorded:\n{table}"
        for params in requests.of(operation):
            assert params.get("Id", params.get("HostedZoneId")) == zone
            arn = f"arn:aws:route53:::hostedzone/{zone}"
            assert evaluate(in_zone, Request(iam_action(operation), arn)).allowed, params
    changes = requests.of("route-53.ChangeResourceRecordSets")
    actions = {c["Action"] for params in changes for c in params["ChangeBatch"]["Changes"]}
    assert actions == {"UPSERT", "DELETE"}, f"recorded:\n{table}"
    for params in changes:
        assert evaluate(in_zone, record_changes(params)).allowed, params
    # ... and what the policy refuses: another record, another type, another zone, CREATE.
    [upsert, *_] = changes
    first = upsert["ChangeBatch"]["Changes"][0]
    for other in (
        {**first, "ResourceRecordSet": {**first["ResourceRecordSet"], "Name": f"db.{DNS_ZONE}"}},
        {**first, "ResourceRecordSet": {**first["ResourceRecordSet"], "Type": "TXT"}},
        {**first, "Action": "CREATE"},
    ):
        refused = {**upsert, "ChangeBatch": {"Changes": [first, other]}}
        assert not evaluate(in_zone, record_changes(refused)).allowed, other
    elsewhere = record_changes({**upsert, "HostedZoneId": "Z0THERZONE"})
    assert not evaluate(in_zone, elsewhere).allowed

    # Baked images: made only of our builders, tagged as they are made, removed only if ours.
    image_keys = set(baked_image_tags(config, "ami-0", "name", datetime.now(UTC)))
    [at_creation] = allowing_create_tags(ORCHESTRATOR, "CreateImage")
    assert set(condition(at_creation, "ForAllValues:StringEquals", "aws:TagKeys") or ()) == (
        image_keys
    )
    assert requests.of("ec2.CreateImage"), f"the bake made no image; recorded:\n{table}"
    for params in requests.of("ec2.CreateImage"):
        [builder] = [i for i in instances(aws) if i["InstanceId"] == params["InstanceId"]]
        assert params["InstanceId"] in recording.builders
        assert tags_of(builder)["Purpose"] == PURPOSE  # ImageOnlyOurInstances
        kinds = set()
        for spec in params["TagSpecifications"]:
            tags = {tag["Key"]: tag["Value"] for tag in spec["Tags"]}
            assert tags["Purpose"] == PURPOSE and set(tags) == image_keys
            assert covers(at_creation, f"arn:aws:ec2:{REGION}::{spec['ResourceType']}/x")
            kinds.add(spec["ResourceType"])
        # The snapshots too: DeleteSnapshot is allowed only on Purpose-tagged snapshots.
        assert kinds == {"image", "snapshot"}
    deregistered = {params["ImageId"] for params in requests.of("ec2.DeregisterImage")}
    deleted = {params["SnapshotId"] for params in requests.of("ec2.DeleteSnapshot")}
    assert (deregistered, deleted) == (recording.pruned_images, recording.pruned_snapshots)

    # What IAM decides on the recorded launches and images, conditions and all.
    orchestrator = policies(ORCHESTRATOR)
    launched = set()
    for params in requests.of("ec2.RunInstances"):
        launched.add(launch_path(params))
        for request in launch_requests(params):
            assert evaluate(orchestrator, request).allowed, request
        # Token-only metadata at hop limit 1, or no launch: containers never reach the role.
        for loosened in ({"HttpTokens": "optional"}, {"HttpPutResponseHopLimit": 2}):
            options = {**params["MetadataOptions"], **loosened}
            [instance, *_] = launch_requests({**params, "MetadataOptions": options})
            assert evaluate(orchestrator, instance).decision == "implicitly denied", loosened
        [instance, *_] = launch_requests(
            {k: v for k, v in params.items() if k != "MetadataOptions"}
        )
        assert not evaluate(orchestrator, instance).allowed
    every_path = {"bake builder", "warm spare", "preview", "doctor's dry run"}
    assert launched == every_path, f"{launched}; recorded:\n{table}"
    tags_now = {i["InstanceId"]: tags_of(i) for i in instances(aws)}
    for params in requests.of("ec2.CreateImage"):
        for request in image_requests(params, tags_now[params["InstanceId"]]):
            assert evaluate(orchestrator, request).allowed, request
    # Never an image of an instance that served a pull request (its disk holds the PR's code
    # and secrets), nor of a spare: only the bake's builders.
    served = [tags for tags in tags_now.values() if TAG_PR in tags]
    assert served, f"no preview to try imaging; recorded:\n{table}"
    for tags in [*served, spare_tags(config, datetime.now(UTC))]:
        [of_instance, *_] = image_requests({"InstanceId": "i-0123456789abcdef0"}, tags)
        assert evaluate(orchestrator, of_instance).decision == "implicitly denied", tags

    # Instance role: what the instances run (user data, SSM commands) as their profile.
    assert shell_actions(recording.on_instances) == allowed_actions(INSTANCE_ROLE)


def test_the_ecr_statements_allow_exactly_what_an_ecr_image_needs(aws: AwsClients) -> None:
    """An image in ECR: the check's calls (recorded as the main recording records them) are the
    orchestrator's ECR statement, what the instances run is the instance role's, and both are
    scoped to the repository the configuration names."""
    config = PreviewConfig(image=ECR_IMAGE, region=REGION, spare_base_tag="main", warm_spares=1)
    repository = ecr_repository(config, REPO)
    assert repository is not None
    aws_ecr = build_clients(config).ecr
    assert aws_ecr is not None
    aws_ecr.create_repository(repositoryName=repository.name)
    aws_ecr.put_image(
        repositoryName=repository.name,
        imageManifest=json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}),
        imageTag=SHA1,
    )
    with aws_faults() as faults, recorded_requests() as requests:
        ecr = build_clients(config).ecr
        check_image.fn(config, REPO, 42, SHA1, None, ecr=ecr)
    actions = {iam_action(call) for call in faults.calls}
    assert {a for a in actions if a.startswith("ecr:")} == allowed_actions(ORCHESTRATOR, ecr=True)
    [describe] = allowing(ORCHESTRATOR, "ecr:DescribeImages")
    for params in requests.of("ecr.DescribeImages"):
        arn = f"arn:aws:ecr:{ecr.meta.region_name}:{params['registryId']}:repository/"
        assert arn + params["repositoryName"] == repository.arn
        assert covers(configured(describe, repository.name), repository.arn)
        assert not covers(configured(describe, repository.name), arn + "octo-org/other")

    spec = LaunchSpec(REPO, 42, SHA1)
    on_instances = [
        render_user_data(config, spec),
        render_spare_user_data(config),
        "\n".join(deploy_commands(config, REPO, f"{ECR_IMAGE}:{SHA2}")),
        render_bake_user_data(config, f"{ECR_IMAGE}:main", 1),
    ]
    for text in on_instances:
        assert shell_actions([text]) >= {"ecr:GetAuthorizationToken", *ECR_PULL_ACTIONS}, text
        assert config.ghcr_token_parameter not in text  # no token parameter for ECR
    ecr_actions = {a for a in shell_actions(on_instances) if a.startswith("ecr:")}
    assert ecr_actions == allowed_actions(INSTANCE_ROLE, ecr=True)
    [pull] = allowing(INSTANCE_ROLE, "ecr:BatchGetImage")
    assert covers(configured(pull, repository.name), repository.arn)


def configured(statement: Statement, repository: str) -> Statement:
    """``statement`` with the ECR placeholder replaced as deployments/iam/README.md says."""
    resources = [r.replace(ECR_REPOSITORY, repository) for r in as_list(statement["Resource"])]
    return {**statement, "Resource": resources}


def test_the_conditions_hold_structurally() -> None:
    for path in (ORCHESTRATOR, INSTANCE_ROLE, INSTANCE_SSM_AGENT):
        for statement in statements(path):
            assert statement.get("Sid"), statement
            assert not {"NotAction", "NotResource", "Principal"} & set(statement), statement
            if statement["Effect"] == "Deny":  # the App's key, another preview's database URL
                text = json.dumps(statement)
                assert path == INSTANCE_ROLE, statement
                assert "pr-preview-app" in text or "pr-preview/databases" in text, statement
                continue
            assert statement["Effect"] == "Allow", statement
            assert not [a for a in as_list(statement["Action"]) if "*" in a], statement
        for statement in allowing(path, "kms:Decrypt"):
            [via] = (
                condition(statement, "StringLike", "kms:ViaService")
                or condition(statement, "StringEquals", "kms:ViaService")
                or [""]
            )
            assert re.fullmatch(r"ssm\.(\*|[a-z0-9-]+)\.amazonaws\.com", via), statement

    spec = LaunchSpec(REPO, 1, SHA1)
    launch_keys = set(
        preview_tags(PreviewConfig.model_validate({"region": REGION}), spec, datetime.now(UTC), 1)
    ) | set(spare_tags(PreviewConfig(), datetime.now(UTC)))
    image_keys = set(baked_image_tags(PreviewConfig(), "ami-0", "name", datetime.now(UTC)))
    create_tags = allowing(ORCHESTRATOR, "ec2:CreateTags")
    assert len(create_tags) == 4
    for statement in create_tags:
        assert statement.get("Condition"), statement
        keys = set(condition(statement, "ForAllValues:StringEquals", "aws:TagKeys") or ())
        assert condition(statement, "Null", "aws:TagKeys") == ["false"], statement
        if condition(statement, "StringEquals", "ec2:CreateAction") == ["CreateImage"]:
            assert keys == image_keys, statement  # only on what CreateImage makes
            assert as_list(statement["Resource"]) == [IMAGE_ARN, SNAPSHOT_ARN], statement
            continue
        assert keys and keys <= launch_keys | SLEEP_TAGS | EXPIRY_TAGS, statement
        if condition(statement, "StringEquals", "ec2:CreateAction") == ["RunInstances"]:
            assert keys <= launch_keys, statement
            continue
        assert condition(statement, "StringEquals", "aws:ResourceTag/Purpose") == [PURPOSE]
        assert as_list(statement["Resource"]) == [INSTANCE_ARN]
        if condition(statement, "StringEquals", SPARE_CONDITION) == [SPARE]:
            # Only an unclaimed spare gets a PR; whose instance it is never moves.
            assert keys == launch_keys - {TAG_PURPOSE}, statement
            continue
        # Purpose, Repo, PR never move; a sleep and a wake move only their own tags.
        assert keys == {"Sha", "updated-at", "shutdown-at", *SLEEP_TAGS, *EXPIRY_TAGS}

    for statement in allowing(ORCHESTRATOR, "ec2:RunInstances"):
        launched = [r for r in as_list(statement["Resource"]) if r == "*" or "instance/" in r]
        launched += [r for r in as_list(statement["Resource"]) if "volume/" in r]
        if launched:
            assert condition(statement, "StringEquals", "aws:RequestTag/Purpose") == [PURPOSE]
        if [r for r in launched if r == "*" or "instance/" in r]:
            # Token-only metadata, hop limit 1: a container cannot reach the role (docs/design.md).
            assert condition(statement, "StringEquals", "ec2:MetadataHttpTokens") == ["required"]
            hops = condition(
                statement, "NumericLessThanEquals", "ec2:MetadataHttpPutResponseHopLimit"
            )
            assert hops == ["1"], statement

    on_our_instances = ("ec2:StopInstances", "ec2:StartInstances", "ec2:DeleteTags")
    for action in ("ec2:TerminateInstances", "ssm:SendCommand", *on_our_instances):
        for statement in allowing(ORCHESTRATOR, action):
            resources = as_list(statement["Resource"])
            if resources == ["arn:aws:ssm:*:*:document/AWS-RunShellScript"]:
                continue  # SendCommand's document: the instance is the other resource it needs
            if resources == [DB_HOST_PLACEHOLDER] and action == "ssm:SendCommand":
                continue  # the database host, by its id (database: per-preview)
            assert resources == [INSTANCE_ARN], statement
            assert condition(statement, "StringEquals", "aws:ResourceTag/Purpose") == [PURPOSE]
    [untag] = allowing(ORCHESTRATOR, "ec2:DeleteTags")
    assert condition(untag, "ForAllValues:StringEquals", "aws:TagKeys") == [TAG_SLEEP_STATE]
    assert condition(untag, "Null", "aws:TagKeys") == ["false"]

    for action in ("ec2:AuthorizeSecurityGroupIngress", "ec2:RevokeSecurityGroupIngress"):
        [statement] = allowing(ORCHESTRATOR, action)
        assert as_list(statement["Resource"]) == [DB_SG_PLACEHOLDER]

    # CreateImage: of our instances only, making only Purpose-tagged images and snapshots.
    by_resource = {
        tuple(as_list(s["Resource"])): s for s in allowing(ORCHESTRATOR, "ec2:CreateImage")
    }
    assert set(by_resource) == {(INSTANCE_ARN,), (IMAGE_ARN, SNAPSHOT_ARN)}
    of_instance, made = by_resource[(INSTANCE_ARN,)], by_resource[(IMAGE_ARN, SNAPSHOT_ARN)]
    assert condition(of_instance, "StringEquals", "aws:ResourceTag/Purpose") == [PURPOSE]
    # Only the bake's builder: never an instance that serves (or served) a pull request.
    assert condition(of_instance, "StringEquals", f"aws:ResourceTag/{TAG_NAME}") == [BUILDER_NAME]
    for key in (TAG_PR, "Repo"):
        assert condition(of_instance, "Null", f"aws:ResourceTag/{key}") == ["true"], key
    assert condition(made, "StringEquals", "aws:RequestTag/Purpose") == [PURPOSE]
    for action, arn in (("ec2:DeregisterImage", IMAGE_ARN), ("ec2:DeleteSnapshot", SNAPSHOT_ARN)):
        [statement] = allowing(ORCHESTRATOR, action)
        assert as_list(statement["Resource"]) == [arn], statement
        assert condition(statement, "StringEquals", "aws:ResourceTag/Purpose") == [PURPOSE]

    # ECR: the check and the pull only on the configured repositories; the login on "*", the
    # only resource AWS accepts for it, in a statement of its own.
    [describe] = allowing(ORCHESTRATOR, "ecr:DescribeImages")
    assert as_list(describe["Action"]) == ["ecr:DescribeImages"]
    assert as_list(describe["Resource"]) == [ECR_PLACEHOLDER]
    [pull] = allowing(INSTANCE_ROLE, "ecr:BatchGetImage")
    assert set(as_list(pull["Action"])) == ECR_PULL_ACTIONS
    assert as_list(pull["Resource"]) == [ECR_PLACEHOLDER]
    [login] = allowing(INSTANCE_ROLE, "ecr:GetAuthorizationToken")
    assert as_list(login["Action"]) == ["ecr:GetAuthorizationToken"]
    assert as_list(login["Resource"]) == ["*"]
    assert allowed_actions(ORCHESTRATOR, ecr=True) == {"ecr:DescribeImages"}
    assert allowed_actions(INSTANCE_ROLE, ecr=True) == {
        "ecr:GetAuthorizationToken",
        *ECR_PULL_ACTIONS,
    }

    [pass_role] = allowing(ORCHESTRATOR, "iam:PassRole")
    assert condition(pass_role, "StringEquals", "iam:PassedToService") == ["ec2.amazonaws.com"]
    assert "*" not in as_list(pass_role["Resource"])

    # Parameters: the preview secrets for both; the GitHub App's key for the flows alone.
    for path, readable in ((ORCHESTRATOR, [APP_KEY, PARAMETERS]), (INSTANCE_ROLE, [PARAMETERS])):
        reads = allowing(path, "ssm:GetParameter")
        assert sorted(r for s in reads for r in as_list(s["Resource"])) == readable, path
        for statement in allowing(path, "ssm:GetParameters"):
            assert as_list(statement["Resource"]) == [PARAMETERS], statement
    assert APP_KEY.endswith(f":parameter{APP_KEY_PARAMETER_PREFIX}*")
    # The instance role lists the app's secrets too (env_parameter_path), under /pr-preview/ only.
    [by_path] = allowing(INSTANCE_ROLE, "ssm:GetParametersByPath")
    assert as_list(by_path["Resource"]) == [PARAMETERS]
    assert allowed_actions(INSTANCE_ROLE) == {
        "ssm:GetParameter",
        "ssm:GetParametersByPath",
        "kms:Decrypt",
    }

    # Route 53: the one zone dns_zone_id names, read; and in it only A records named pr-*,
    # created or replaced (UPSERT) and deleted.
    route53 = {a for a in allowed_actions(ORCHESTRATOR) if a.startswith("route53:")}
    assert route53 == {
        "route53:GetHostedZone",
        "route53:ListResourceRecordSets",
        "route53:ChangeResourceRecordSets",
    }
    for action in route53:
        [statement] = allowing(ORCHESTRATOR, action)
        assert as_list(statement["Resource"]) == [DNS_ZONE_PLACEHOLDER], statement
    [change] = allowing(ORCHESTRATOR, "route53:ChangeResourceRecordSets")
    assert as_list(change["Action"]) == ["route53:ChangeResourceRecordSets"]
    names = "route53:ChangeResourceRecordSetsNormalizedRecordNames"
    assert condition(change, "ForAllValues:StringLike", names) == ["pr-*"]
    assert condition(change, "Null", names) == ["false"]
    assert condition(
        change, "ForAllValues:StringEquals", "route53:ChangeResourceRecordSetsRecordTypes"
    ) == ["A"]
    assert condition(
        change, "ForAllValues:StringEquals", "route53:ChangeResourceRecordSetsActions"
    ) == ["UPSERT", "DELETE"]


# --- tenancy: the GitHub App's key stays out of every instance's reach -----------------------

APP_KEY_PARAMETER = f"{APP_KEY_PARAMETER_PREFIX}github-app-key"
AWS_DOCUMENT = arn_in("ssm", "document/AWS-RunShellScript", account="")
# Where the SSM agent's actions with resource-level permissions act: its documents, its
# instance and its associations.
AGENT_RESOURCES = {
    "ssm:DescribeDocument": [AWS_DOCUMENT],
    "ssm:GetDocument": [AWS_DOCUMENT],
    "ssm:UpdateAssociationStatus": [AWS_DOCUMENT, arn_in("ec2", "instance/i-0123456789abcdef0")],
    "ssm:UpdateInstanceAssociationStatus": [
        arn_in("ssm", "association/0a1b2c3d-4e5f-6a7b-8c9d-0e1f2a3b4c5d"),
        arn_in("ec2", "instance/i-0123456789abcdef0"),
    ],
}


def test_the_app_key_stays_unreadable_with_every_policy_attached_even_the_managed_one() -> None:
    """The instance role runs code any PR author writes: with every policy the READMEs attach,
    and with AWS's AmazonSSMManagedInstanceCore attached by mistake, nothing reads the App's
    key: the explicit Deny wins over the managed policy's ``ssm:GetParameter`` on ``*``."""
    attached = attached_to_the_instance_role()
    assert set(attached) == {INSTANCE_ROLE.name, INSTANCE_SSM_AGENT.name}
    managed = {"AmazonSSMManagedInstanceCore": load_policy(MANAGED_SSM_CORE)}
    for request in parameter_reads(APP_KEY_PARAMETER):
        for held in (attached, {**attached, **managed}):
            assert evaluate(held, request).decision == "explicitly denied", (request, held.keys())

    # The Deny is what keeps it: without it the managed policy reads the key, and the instance
    # role's own KMS statement (like the aws/ssm key's policy) decrypts it through SSM.
    [read, *_, decrypt] = parameter_reads(APP_KEY_PARAMETER)
    hole = {**without_denies(attached), **managed}
    assert evaluate(hole, read) == Verdict("allowed", ("AmazonSSMManagedInstanceCore#0",))
    assert evaluate(hole, decrypt).allowed
    assert evaluate(without_denies(attached), read).decision == "implicitly denied"

    # The instance still reads its own parameters; the flows still read the App's key.
    database_url = arn_in("ssm", "parameter/pr-preview/database-url")
    for request in (
        Request("ssm:GetParameter", database_url),
        Request("ssm:GetParametersByPath", arn_in("ssm", "parameter/pr-preview/env")),
        decryption(database_url),
    ):
        assert evaluate(attached, request).allowed, request
        assert evaluate({**attached, **managed}, request).allowed, request
    for request in (read, decrypt):
        assert evaluate(policies(ORCHESTRATOR), request).allowed, request


def test_the_agent_policy_is_the_managed_one_without_its_parameter_reads() -> None:
    """The SSM agent keeps everything AmazonSSMManagedInstanceCore gives it (Run Command,
    Session Manager, associations, inventory) but ``ssm:GetParameter(s)`` on ``*``."""
    managed = load_policy(MANAGED_SSM_CORE)
    granted = {a for s in managed["Statement"] for a in as_list(s["Action"])}
    reads = {"ssm:GetParameter", "ssm:GetParameters"}
    assert (
        reads <= granted and {"ssm:UpdateInstanceInformation", "ec2messages:GetMessages"} <= granted
    )
    assert allowed_actions(INSTANCE_SSM_AGENT) == granted - reads
    attached = attached_to_the_instance_role()
    for action in sorted(granted - reads):
        for resource in AGENT_RESOURCES.get(action, ["*"]):
            assert evaluate(attached, Request(action, resource)).allowed, (action, resource)
            assert evaluate({"managed": managed}, Request(action, resource)).allowed
    for action in sorted(reads):
        request = Request(action, arn_in("ssm", "parameter/anything"))
        assert not evaluate(policies(INSTANCE_SSM_AGENT), request).allowed, action


def test_the_codes_fixes_send_people_to_the_projects_policies() -> None:
    """Where the doctor, the preflight and a diagnosis tell someone what the instance role
    needs, they name the project's policies, never the managed one."""
    from tasks.steps.diagnose import SIGNATURES

    [unreachable] = [s for s in SIGNATURES if s.key == "ssm-unreachable"]
    assert INSTANCE_SSM_AGENT.name in unreachable.fix
    root = IAM.parents[1]
    sources = [*root.glob("tasks/**/*.py"), *root.glob("deployments/**/*.py")]
    for path in (root / "tasks/steps/preflight.py", root / "deployments/cli/common.py"):
        assert INSTANCE_SSM_AGENT.name in path.read_text(), path
    assert [p for p in sources if "AmazonSSMManagedInstanceCore" in p.read_text()] == []


# --- the evaluator itself -------------------------------------------------------------------


def statement(effect: str = "Allow", **fields: Any) -> dict[str, Any]:
    return {"Effect": effect, "Action": "s3:GetObject", "Resource": "*", **fields}


def one(*held: dict[str, Any]) -> dict[str, Policy]:
    return {"p": {"Version": "2012-10-17", "Statement": list(held)}}


def test_the_evaluator_lets_an_explicit_deny_win_and_denies_what_nothing_allows() -> None:
    get = Request("s3:GetObject", "arn:aws:s3:::bucket/secret/key")
    allow_all = statement(Action="s3:*", Sid="All")
    deny = statement("Deny", Action="s3:Get*", Resource="arn:aws:s3:::bucket/secret/*", Sid="No")
    assert evaluate(one(allow_all), get) == Verdict("allowed", ("p:All",))
    assert evaluate(one(allow_all, deny), get) == Verdict("explicitly denied", ("p:No",))
    split = {"allows": one(allow_all)["p"], "denies": one(deny)["p"]}
    assert evaluate(split, get) == Verdict("explicitly denied", ("denies:No",))
    public = Request("s3:GetObject", "arn:aws:s3:::bucket/public/key")
    assert evaluate(one(allow_all, deny), public).allowed
    assert evaluate(one(deny), public) == Verdict("implicitly denied")
    assert evaluate(one(statement(Action="s3:PutObject")), get) == Verdict("implicitly denied")


def test_the_evaluator_matches_actions_case_blind_and_resources_by_iam_wildcards() -> None:
    resource = "arn:aws:ssm:ap-northeast-1:123456789012:parameter/pr-preview-app/key"
    read = Request("SSM:getparameter", resource)
    for pattern, hit in (
        (resource, True),
        ("arn:aws:ssm:*:*:parameter/pr-preview-app/*", True),
        ("arn:aws:ssm:*:*:parameter/pr-preview/*", False),  # a path segment, not a prefix
        ("arn:aws:ssm:*:*:parameter/*", True),  # IAM's "*" crosses "/" and ":"
        ("arn:aws:ssm:?p-*:*:parameter/pr-preview-app/ke?", True),
        ("arn:aws:ssm:*:*:parameter/PR-PREVIEW-APP/*", False),  # resources are case-sensitive
        ("arn:aws:ssm:*:*:parameter/pr-preview-app", False),
    ):
        held = one(statement(Action="ssm:GetParameter", Resource=pattern))
        assert evaluate(held, read).allowed is hit, pattern
    by_path = Request("ssm:GetParametersByPath", resource)
    assert evaluate(one(statement(Action="ssm:GetParameter*")), by_path).allowed
    assert not evaluate(one(statement(Action="ssm:GetParameter")), by_path).allowed
    no_reads = one({"Effect": "Allow", "NotAction": "ssm:Get*", "NotResource": resource})
    assert not evaluate(no_reads, read).allowed
    assert evaluate(no_reads, Request("ssm:PutParameter", f"{resource}2")).allowed
    assert not evaluate(no_reads, Request("ssm:PutParameter", resource)).allowed
    with pytest.raises(ValueError, match="exactly one of Action and NotAction"):
        evaluate(one({"Effect": "Allow", "Resource": "*"}), read)


def judged(condition: dict[str, Any], context: dict[str, Any]) -> bool:
    """Whether a statement with ``condition`` allows a request with ``context``."""
    return evaluate(
        one(statement(Condition=condition)), Request("s3:GetObject", "x", context)
    ).allowed


def test_the_evaluator_judges_conditions_as_iam_does() -> None:
    launch = {
        "StringEquals": {
            "ec2:MetadataHttpTokens": "required",
            "aws:RequestTag/Purpose": ["a", "b"],
        },
        "NumericLessThanEquals": {"ec2:MetadataHttpPutResponseHopLimit": "1"},
    }
    good = {
        "ec2:MetadataHttpTokens": "required",
        "aws:RequestTag/Purpose": "b",  # one of the key's values is enough
        "EC2:metadatahttpputresponsehoplimit": 1,  # keys are case-blind, numbers compare
    }
    assert judged(launch, good)
    for changed in (
        {"ec2:MetadataHttpTokens": "optional"},
        {"ec2:MetadataHttpTokens": "Required"},  # values are case-sensitive
        {"aws:RequestTag/Purpose": "c"},
        {"EC2:metadatahttpputresponsehoplimit": 2},
    ):
        assert not judged(launch, {**good, **changed}), changed
    for missing in good:  # a key the request lacks fails the condition
        assert not judged(launch, {k: v for k, v in good.items() if k != missing}), missing

    # Negated operators, IfExists, ForAllValues hold when the key is missing; Null tests it.
    assert judged({"StringNotEquals": {"aws:ResourceTag/PR": "1"}}, {})
    assert not judged(
        {"StringNotEquals": {"aws:ResourceTag/PR": ["1", "2"]}}, {"aws:ResourceTag/PR": "2"}
    )
    assert judged({"StringNotLike": {"aws:ResourceTag/PR": "1*"}}, {"aws:ResourceTag/PR": "2"})
    assert judged({"StringEqualsIfExists": {"aws:ResourceTag/PR": "1"}}, {})
    assert not judged(
        {"StringEqualsIfExists": {"aws:ResourceTag/PR": "1"}}, {"aws:ResourceTag/PR": "2"}
    )
    absent = {"Null": {"aws:ResourceTag/PR": "true", "aws:ResourceTag/Repo": "true"}}
    assert judged(absent, {}) and not judged(absent, {"aws:ResourceTag/PR": "7"})
    assert judged({"Null": {"aws:TagKeys": "false"}}, {"aws:TagKeys": ["Sha"]})
    assert not judged({"Null": {"aws:TagKeys": "false"}}, {})

    keys = {"ForAllValues:StringEquals": {"aws:TagKeys": ["Sha", "updated-at"]}}
    assert judged(keys, {"aws:TagKeys": ["Sha"]})
    assert not judged(keys, {"aws:TagKeys": ["Sha", "Purpose"]})
    assert judged(keys, {})  # why our CreateTags statements add Null aws:TagKeys false
    assert judged(
        {"ForAnyValue:StringEquals": {"aws:TagKeys": "PR"}}, {"aws:TagKeys": ["Sha", "PR"]}
    )
    assert not judged({"ForAnyValue:StringEquals": {"aws:TagKeys": "PR"}}, {})

    context = {"kms:EncryptionContext:PARAMETER_ARN": "arn:aws:ssm:r:1:parameter/pr-preview-app/k"}
    assert judged(
        {"StringLike": {"kms:EncryptionContext:PARAMETER_ARN": "*:parameter/pr-preview-app/*"}},
        context,
    )
    assert judged({"Bool": {"aws:SecureTransport": "true"}}, {"aws:SecureTransport": True})
    assert judged(
        {"ArnLike": {"aws:SourceArn": "arn:aws:ec2:*:*:instance/*"}},
        {"aws:SourceArn": "arn:aws:ec2:r:1:instance/i-1"},
    )
    with pytest.raises(ValueError, match="does not know the condition operator DateLessThan"):
        judged({"DateLessThan": {"aws:CurrentTime": "2030-01-01T00:00:00Z"}}, {})
    with pytest.raises(ValueError, match="has many values"):
        judged({"StringEquals": {"aws:TagKeys": "PR"}}, {"aws:TagKeys": ["PR"]})


# --- parliament -----------------------------------------------------------------------------

# Every parliament finding above LOW that is expected, keyed "file ISSUE where" (where: the
# statement's Sid, or the actions of a whole-policy finding), with the reason it stays. The
# same lines are in deployments/iam/README.md.
ACCEPTED_FINDINGS = {
    "orchestrator-policy.json PRIVILEGE_ESCALATION ec2:runinstances+iam:passrole": (
        "launching previews with their instance profile is the job; PassRole is limited to the"
        " ec2-pr-preview-ssm role and to ec2.amazonaws.com, and that role reads only"
        " /pr-preview/* parameters."
    ),
    "orchestrator-policy.json PERMISSIONS_MANAGEMENT_ACTIONS iam:passrole": (
        "the same iam:PassRole, on one role, to EC2 only."
    ),
    "orchestrator-policy.json RESOURCE_MISMATCH LaunchOnlyPurposeTaggedInstancesWithHopLimitOne": (
        "RunInstances is split on purpose: aws:RequestTag/Purpose and the metadata conditions"
        " (ec2:MetadataHttpTokens, ec2:MetadataHttpPutResponseHopLimit) apply to the instance it"
        " creates, not to the volume, image, subnet, ENI and security groups (the next"
        " statements); parliament checks each statement alone."
    ),
    "orchestrator-policy.json RESOURCE_MISMATCH LaunchOnlyPurposeTaggedVolumes": (
        "the volume's part of that split: aws:RequestTag/Purpose applies to it, the metadata"
        " keys do not (a volume has none, and a condition on a missing key refuses)."
    ),
    "orchestrator-policy.json RESOURCE_MISMATCH LaunchFromImagesSubnetsAndSecurityGroups": (
        "the other part of that split: the instance and the volume are in the tag-conditioned"
        " statements."
    ),
    "orchestrator-policy.json RESOURCE_MISMATCH ImageOnlyOurBakeBuilders": (
        "CreateImage is split like RunInstances: the builder's tags (aws:ResourceTag/Purpose,"
        " Name, no Repo or PR) are conditions on the instance imaged, not on the image and"
        " snapshots it makes (the next statement)."
    ),
    "orchestrator-policy.json RESOURCE_MISMATCH CreateOnlyPurposeTaggedImagesAndSnapshots": (
        "the other half of that split: aws:RequestTag/Purpose applies to the image and snapshots"
        " made; the instance is in ImageOnlyOurBakeBuilders."
    ),
    "orchestrator-policy.json RESOURCE_MISMATCH TerminateAndCommandOnlyOurInstances": (
        "SendCommand is split the same way: the Purpose tag condition applies to the instance;"
        " the AWS-RunShellScript document has no tags and is allowed in its own statement."
    ),
    "orchestrator-policy.json RESOURCE_MISMATCH CommandTheDatabaseHost": (
        "the database host's share of that split: commands to the one instance"
        " db_instance_id names (DB_INSTANCE_ID), with the document allowed in its own statement."
    ),
    "ecs-worker-policy.json PERMISSIONS_MANAGEMENT_ACTIONS iam:passrole": (
        "the ECS worker hands each task its two roles; PassRole is limited to the stack's task"
        " role (the orchestrator role) and execution role, and to ecs-tasks.amazonaws.com."
    ),
    "instance-role-policy.json CREDENTIALS_EXPOSURE ecr:getauthorizationtoken": (
        "the instance logs in to ECR with it (`aws ecr get-login-password`, piped into `docker"
        " login`); the password it returns pulls only what the role may pull (BatchGetImage and"
        " GetDownloadUrlForLayer on the configured repositories), and AWS gives the action no"
        " resource-level permission."
    ),
}
ABOVE_LOW = {"MEDIUM", "HIGH", "CRITICAL"}


def finding_key(path: Path, finding: Any) -> str:
    """``file ISSUE where``: the Sid of the statement at the finding's line, else its actions."""
    location = finding.location or {}
    where = "+".join(sorted(location.get("actions", [])))
    if location.get("line"):
        following = path.read_text().splitlines()[location["line"] - 1 :]
        where = next(m[1] for text in following if (m := re.search(r'"Sid": "(\w+)"', text)))
    return f"{path.name} {finding.issue} {where}".rstrip()


def parliament_findings(path: Path) -> list[Any]:
    import parliament
    from parliament import analyze_policy_string, enhance_finding, override_config

    # The community auditors (privilege escalation, permissions management) as the CLI's
    # --include-community-auditors loads them: their severities are in this override file.
    override_config(
        str(Path(parliament.__file__).parent / "community_auditors" / "config_override.yaml")
    )
    policy = analyze_policy_string(path.read_text(), include_community_auditors=True)
    return [enhance_finding(finding) for finding in policy.findings]


def test_parliament_leaves_only_explained_findings() -> None:
    found = {}
    for path in (ORCHESTRATOR, INSTANCE_ROLE, INSTANCE_SSM_AGENT, ECS_WORKER):
        for finding in parliament_findings(path):
            assert finding.issue != "RESOURCE_STAR", finding  # "*" only where AWS has no ARN
            if finding.severity in ABOVE_LOW:
                found[finding_key(path, finding)] = finding
    unexplained = {key: f"{f.severity} {f.detail} {f.location}" for key, f in found.items()}
    for key in ACCEPTED_FINDINGS:
        unexplained.pop(key, None)
    assert not unexplained, "explain (ACCEPTED_FINDINGS and deployments/iam/README.md) or fix"
    assert not set(ACCEPTED_FINDINGS) - set(found), "accepted findings parliament no longer has"

    readme = (IAM / "README.md").read_text()
    for key, reason in ACCEPTED_FINDINGS.items():
        assert f"- `{key}`: {reason}" in " ".join(readme.split()), key


def test_the_readmes_say_what_the_files_hold() -> None:
    """The README's security wording names the placeholder, keys and conditions the files use."""
    [db_sg] = allowing(ORCHESTRATOR, "ec2:AuthorizeSecurityGroupIngress")
    keys: dict[str, list[str]] = {}
    for statement in allowing(ORCHESTRATOR, "ec2:CreateTags"):
        when = {"RunInstances": "at launch", "CreateImage": "at image creation"}.get(
            (condition(statement, "StringEquals", "ec2:CreateAction") or ["later"])[0], "later"
        )
        if condition(statement, "StringEquals", SPARE_CONDITION):
            when = "on a spare"
        keys[when] = condition(statement, "ForAllValues:StringEquals", "aws:TagKeys") or []
    [via] = {
        value
        for path in (ORCHESTRATOR, INSTANCE_ROLE)
        for statement in allowing(path, "kms:Decrypt")
        for value in condition(statement, "StringLike", "kms:ViaService") or ()
    }
    *first, last = keys["later"]
    for readme in (IAM.parents[1] / "README.md", IAM / "README.md"):
        text = " ".join(readme.read_text().split())
        assert f"`{as_list(db_sg['Resource'])[0]}`" in text, readme
        assert f"`{ECR_PLACEHOLDER}`" in text and "`ECR_REPOSITORY`" in text, readme
        assert "`db_security_group_id`" in text and f"Purpose={PURPOSE}" in text, readme
        assert f"`{via}`" in text, readme
        assert ", ".join(f"`{key}`" for key in keys["at launch"]) in text, readme
        assert ", ".join(f"`{key}`" for key in first) + f" and `{last}`" in text, readme
        *claimed, marker = keys["on a spare"]
        assert ", ".join(f"`{key}`" for key in claimed) + f" and `{marker}`" in text, readme
    # The baked images' part of the policy is explained in the IAM README.
    text = " ".join((IAM / "README.md").read_text().split())
    *first, last = keys["at image creation"]
    assert ", ".join(f"`{key}`" for key in first) + f" and `{last}`" in text
    assert "`pr-preview-bake`" in text
