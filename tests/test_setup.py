"""From an empty account to a preview: the stack deployed into moto's CloudFormation, then
``pr-preview setup`` against it and the test's Prefect server, then a preview opened, pushed and
closed with only the stack's resources, then ``pr-preview teardown-all`` and the stack deleted;
and ``pr-preview acceptance`` run against moto.

Every assertion reads real state: what moto holds (the stack's resources, the parameters and
their key, the instances), what the Prefect server holds (the Variable, the work pool, the
deployments) and what the commands print.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL
from prefect.variables import Variable

import flows.preview
from deployments import cli
from deployments.pools import PREFECT_YAML, process_base_job_template
from flows.preview import pr_preview
from flows.teardown import pr_teardown
from local_stack.registry import FakeRegistry
from local_stack.scripted_instance import ScriptedInstances
from tasks.cloud.aws import AwsClients
from tasks.config import VARIABLE_NAME
from tests.support import CANARIES, CANARY_DATABASE_URL, CANARY_GHCR_TOKEN
from tests.support.moto_state import instances, live, state_of, tags
from tests.support.stacks import create_stack

pytestmark = pytest.mark.usefixtures("prefect_server")

STACK = "pr-preview"
REPO = "octo-org/app"
SHA1 = "1a2b3c4d5e6f7a8b9c0d1a2b3c4d5e6f7a8b9c0d"
SHA2 = "9f8e7d6c5b4a39281706f5e4d3c2b1a098765432"
USERS_RULE = {"IpProtocol": "tcp", "FromPort": 5432, "ToPort": 5432, "CidrIp": "10.9.0.0/16"}


def deploy_stack(aws: AwsClients, **parameters: str) -> tuple[str, dict[str, str]]:
    """What `aws cloudformation deploy` does, into moto: the db-sg (with a rule of the user's
    own) exists before; returns the db-sg and the stack's outputs."""
    import boto3

    vpc = aws.ec2.describe_vpcs(Filters=[{"Name": "isDefault", "Values": ["true"]}])["Vpcs"][0]
    subnets = aws.ec2.describe_subnets(Filters=[{"Name": "vpc-id", "Values": [vpc["VpcId"]]}])
    db_sg = aws.ec2.create_security_group(
        GroupName="db-sg", Description="the team's database", VpcId=vpc["VpcId"]
    )["GroupId"]
    aws.ec2.authorize_security_group_ingress(
        GroupId=db_sg,
        IpPermissions=[
            {
                "IpProtocol": "tcp",
                "FromPort": 5432,
                "ToPort": 5432,
                "IpRanges": [{"CidrIp": USERS_RULE["CidrIp"]}],
            }
        ],
    )
    values = {
        "VpcId": vpc["VpcId"],
        "SubnetId": subnets["Subnets"][0]["SubnetId"],
        "DatabaseSecurityGroupId": db_sg,
        **parameters,
    }
    cfn = boto3.client("cloudformation", region_name=aws.ec2.meta.region_name)
    return db_sg, create_stack(cfn, STACK, values)


def users_variable(registry: FakeRegistry) -> dict[str, Any]:
    """What the user put in the Variable before setup: their image, and fast timings."""
    return {
        "image": f"{registry.host}/{REPO}",
        "poll_seconds": 0.01,
        "retry_delay_seconds": 0,
        "image_wait_seconds": 0,
        "ready_timeout_seconds": 30,
    }


def variable() -> dict[str, Any]:
    value = Variable.get(VARIABLE_NAME, default=None)
    assert isinstance(value, dict), value
    return value


def parameters(aws: AwsClients) -> dict[str, dict[str, Any]]:
    found = aws.ssm.describe_parameters()["Parameters"]
    return {p["Name"]: dict(p) for p in found}


def run(*argv: str) -> int:
    return cli.main(list(argv))


@pytest.fixture
def prefect_api(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The test server's URL in the environment, as an operator's shell has it; no Variable
    before, and none after: the server is the session's, and every other flow test's runs
    would read a Variable left there."""
    url = PREFECT_API_URL.value()
    monkeypatch.setenv("PREFECT_API_URL", url)
    Variable.unset(VARIABLE_NAME)
    try:
        yield str(url)
    finally:
        Variable.unset(VARIABLE_NAME)


@pytest.fixture
def healthy_world(registry: FakeRegistry, scripted_ssm: ScriptedInstances) -> None:
    registry.users["octo-org"] = CANARY_GHCR_TOKEN
    for sha in (SHA1, SHA2):
        registry.push(REPO, sha, private=True)
    scripted_ssm.healthy()


@pytest.mark.usefixtures("healthy_world")
def test_an_empty_account_gets_a_preview_from_the_stack_and_setup_and_gives_it_all_back(
    aws: AwsClients,
    registry: FakeRegistry,
    prefect_api: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    db_sg, outputs = deploy_stack(aws, Image="ghcr.io/octo-org/app")
    Variable.set(VARIABLE_NAME, users_variable(registry))  # type: ignore[arg-type]
    token_file = tmp_path / "ghcr-token"
    token_file.write_text(CANARY_GHCR_TOKEN + "\n")
    monkeypatch.setattr("sys.stdin", io.StringIO(CANARY_DATABASE_URL))

    # 1. setup: the Variable merged, the secrets stored with the stack's key, Prefect deployed.
    setup = ["setup", "--stack", STACK, "--allow", "octo-org/*"]
    secrets = ["--ghcr-token-file", str(token_file), "--database-url-file", "-"]
    assert run(*setup, *secrets) == 0
    first = capsys.readouterr()
    assert "All checks passed." in first.out, first
    config = variable()
    assert {k: config[k] for k in ("subnet_id", "security_group_ids", "instance_profile")} == {
        "subnet_id": outputs["SubnetId"],
        "security_group_ids": [outputs["PreviewSecurityGroupId"]],
        "instance_profile": outputs["InstanceProfileName"],
    }
    assert config["db_security_group_id"] == db_sg
    assert config["allowed_repos"] == ["octo-org/*"]
    assert config["image"] == f"{registry.host}/{REPO}"  # the user's, not the stack's
    assert re.search(r"kept +image +yours: ", first.out), first.out
    stored = parameters(aws)
    for name, secret in (
        ("/pr-preview/ghcr-token", CANARY_GHCR_TOKEN),
        ("/pr-preview/database-url", CANARY_DATABASE_URL),
    ):
        assert stored[name]["Type"] == "SecureString"
        assert stored[name]["KeyId"] == outputs["AppSecretsKeyArn"]
        value = aws.ssm.get_parameter(Name=name, WithDecryption=True)["Parameter"]["Value"]
        assert value == secret
    with get_client(sync_client=True) as client:
        pool = client.read_work_pool("pr-preview")
        deployed = {d.name: d.entrypoint for d in client.read_deployments()}
    assert pool.base_job_template == process_base_job_template()
    project = {
        d["name"]: d["entrypoint"] for d in yaml.safe_load(PREFECT_YAML.read_text())["deployments"]
    }
    # The server is the test session's: other tests' deployments may be there too.
    assert {name: deployed.get(name) for name in project} == project

    # 2. Again: nothing changes, and it says so.
    versions = {name: p["Version"] for name, p in parameters(aws).items()}
    assert run(*setup, *secrets[:2]) == 0
    second = capsys.readouterr()
    assert "Nothing changed: already set up." in second.out, second
    assert variable() == config
    assert {name: p["Version"] for name, p in parameters(aws).items()} == versions
    for text in (first.out, first.err, second.out, second.err):
        assert not [canary for canary in CANARIES if canary in text]

    # 3. A preview opens, is pushed and closes, configured by the Variable alone.
    opened = pr_preview(REPO, 42, SHA1, action="opened")
    assert (opened.status, opened.path) == ("ready", "launched"), opened.reason
    [instance] = live(aws)
    assert instance["SubnetId"] == outputs["SubnetId"]
    assert [g["GroupId"] for g in instance["SecurityGroups"]] == [outputs["PreviewSecurityGroupId"]]
    profile = instance["IamInstanceProfile"]["Arn"]
    assert profile.endswith(f"instance-profile/{outputs['InstanceProfileName']}")
    pushed = pr_preview(REPO, 42, SHA2, action="synchronize")
    assert (pushed.path, pushed.instance_id) == ("in-place", opened.instance_id)
    assert tags(live(aws)[0])["Sha"] == SHA2
    assert pr_teardown(REPO, 42).terminated == [opened.instance_id]

    # 4. teardown-all, then the stack deletes: what it made is gone, the user's db-sg stays.
    spare = pr_preview(REPO, 43, SHA1, action="opened").instance_id
    assert run("teardown-all", "--stack", STACK, "--yes", "--delete-stack") == 0
    capsys.readouterr()
    assert state_of(aws, spare or "") == "terminated"
    assert [i for i in instances(aws) if i["State"]["Name"] != "terminated"] == []
    assert set(parameters(aws)) == set()
    import boto3

    cfn = boto3.client("cloudformation", region_name=aws.ec2.meta.region_name)
    assert [
        s for s in cfn.list_stacks()["StackSummaries"] if s["StackStatus"] != "DELETE_COMPLETE"
    ] == []
    groups = {g["GroupId"]: g for g in aws.ec2.describe_security_groups()["SecurityGroups"]}
    assert outputs["PreviewSecurityGroupId"] not in groups
    assert db_sg in groups
    cidrs = [r["CidrIp"] for p in groups[db_sg]["IpPermissions"] for r in p["IpRanges"]]
    assert cidrs == [USERS_RULE["CidrIp"]]  # the user's rule, untouched
    assert aws.iam.list_roles()["Roles"] == []
    assert aws.iam.list_instance_profiles()["InstanceProfiles"] == []
    # moto 5 does not delete an AWS::EC2::SecurityGroupIngress with its stack (it has no delete
    # handler for it); AWS CloudFormation revokes the rule. What moto leaves names only the
    # deleted group.
    left = [
        pair["GroupId"]
        for p in groups[db_sg]["IpPermissions"]
        for pair in p.get("UserIdGroupPairs", [])
    ]
    assert left in ([], [outputs["PreviewSecurityGroupId"]])


def test_setup_refuses_a_missing_stack_and_a_secret_on_the_command_line_and_changes_nothing(
    aws: AwsClients,
    prefect_api: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert run("setup", "--stack", "no-such-stack") == 2
    assert "no stack no-such-stack in ap-northeast-1: deploy" in capsys.readouterr().err
    assert run("setup", "--stack", "bad;name") == 2
    assert "is not a stack name" in capsys.readouterr().err
    assert run("setup", "--stack", STACK, "--ghcr-token", CANARY_GHCR_TOKEN) == 2
    refused = capsys.readouterr().err
    assert "unrecognized arguments: --ghcr-token" in refused and CANARY_GHCR_TOKEN not in refused
    assert run("setup", "--stack", STACK, "--ghcr-token-file", CANARY_GHCR_TOKEN) == 2
    refused = capsys.readouterr().err
    assert "cannot read the file given" in refused and CANARY_GHCR_TOKEN not in refused
    not_a_key = tmp_path / "key.pem"
    not_a_key.write_text(CANARY_GHCR_TOKEN)
    _, outputs = deploy_stack(aws)
    assert run("setup", "--stack", STACK, "--github-app-key", str(not_a_key)) == 2
    err = capsys.readouterr().err
    assert "is not a PEM private key" in err and CANARY_GHCR_TOKEN not in err
    # The dry run says what it would do, and nothing happens.
    assert run("setup", "--stack", STACK, "--dry-run") == 0
    out = capsys.readouterr().out
    assert re.search(rf"would set +subnet_id +{outputs['SubnetId']}\n", out), out
    assert "Dry run:" in out and "nothing was changed" in out
    assert Variable.get(VARIABLE_NAME, default=None) is None
    assert parameters(aws) == {}


@pytest.mark.usefixtures("healthy_world")
def test_acceptance_times_prices_and_cleans_up_even_when_interrupted(
    aws: AwsClients,
    registry: FakeRegistry,
    prefect_api: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, outputs = deploy_stack(aws)
    from deployments.cli.stack import config_from_outputs

    Variable.set(  # type: ignore[arg-type]
        VARIABLE_NAME,
        {
            **config_from_outputs(STACK, outputs),
            **users_variable(registry),
            "allowed_repos": [REPO],
        },
    )
    for name, value in (
        ("/pr-preview/ghcr-token", CANARY_GHCR_TOKEN),
        ("/pr-preview/database-url", CANARY_DATABASE_URL),
    ):
        aws.ssm.put_parameter(Name=name, Value=value, Type="SecureString")
    argv = ["acceptance", "--stack", STACK, "--repo", REPO, "--pr", "7"]
    argv += ["--sha", SHA1, "--second-sha", SHA2]

    assert run(*argv) == 2  # no confirmation: nothing launched
    assert "--spend-money" in capsys.readouterr().err and instances(aws) == []

    assert run(*argv, "--spend-money") == 0
    out = capsys.readouterr().out
    steps = {
        line.split()[0]: line.split()[1:]
        for line in out.splitlines()
        if line[:5] in ("open ", "push ", "close")
    }
    assert set(steps) == {"open", "push", "close"}
    assert all(float(words[0]) >= 0 for words in steps.values())
    assert steps["push"][1] == "in-place"
    assert "1 instance(s) of t3.small: $" in out and "Acceptance passed." in out
    assert live(aws) == []

    # Ctrl+C during the push: what was launched is terminated all the same.
    real = flows.preview.pr_preview

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("action") == "synchronize":
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(flows.preview, "pr_preview", interrupted)
    assert run(*argv[:6], "8", *argv[7:], "--spend-money") == 130
    out = capsys.readouterr().out
    assert "Interrupted: everything it launched is terminated." in out
    assert "cleaned up: terminated i-" in out
    assert live(aws) == []
    assert [tags(i)["PR"] for i in instances(aws)].count("8") == 1


def test_acceptance_refuses_without_credentials(
    aws: AwsClients,
    prefect_api: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    argv = ["acceptance", "--stack", STACK, "--repo", REPO, "--pr", "7", "--sha", SHA1]
    assert run(*argv, "--second-sha", SHA2, "--spend-money") == 2
    err = capsys.readouterr().err
    assert "no usable AWS credentials" in err and json.dumps(err)
    assert instances(aws) == []
