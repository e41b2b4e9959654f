"""The CloudFormation stack (deployments/aws/pr-preview.yaml) holds the project's policies.

One source of truth: the template is written from deployments/iam/*.json by
``deployments.aws``; these tests fail when the file is stale, and read the template's policy
blocks back — intrinsic functions resolved for the stack's parameters — to find exactly the JSON
files with their placeholders filled (and an optional part's statements gone when unused). What
``tests/test_iam.py`` proves of the JSON files (the recorded calls, the conditions, the Deny)
therefore holds for the stack's roles.
"""

from __future__ import annotations

import ast
import copy
import json
import re
from typing import Any

import pytest
import yaml

from deployments import aws as stack
from tests.support.stacks import create_stack
from tests.test_iam import ECR_PLACEHOLDER, INSTANCE_ROLE, INSTANCE_SSM_AGENT, ORCHESTRATOR

DB_SG = "sg-0a1b2c3d4e5f60718"
DB_HOST = "i-0db0123456789abcd"  # the database host (database: per-preview)
ECR = "octo-org/app"
DNS_ZONE = "Z0123456789ABCDEFGHIJ"  # the previews' private hosted zone (dns_zone_id)
ROLE = "pr-preview-PreviewInstanceRole-ABC123"
PROFILE = "pr-preview-PreviewInstanceProfile-DEF456"
# WorkPool=ecs: the names CloudFormation gives the ECS part (Ref of each resource).
ECS_NAMES = {
    "EcsCluster": "pr-preview-EcsCluster-GHI789",
    "OrchestratorRole": "pr-preview-OrchestratorRole-JKL012",
    "EcsExecutionRole": "pr-preview-EcsExecutionRole-MNO345",
    "EcsLogGroup": "/pr-preview/pr-preview/flows",
    "EcsEventsQueueName": "prefect-ecs-tasks-events",
}
ECS_PLACEHOLDERS = {
    "ECS_CLUSTER": "EcsCluster",
    "ECS_TASK_ROLE": "OrchestratorRole",
    "ECS_EXECUTION_ROLE": "EcsExecutionRole",
    "ECS_LOG_GROUP": "EcsLogGroup",
    "ECS_EVENTS_QUEUE": "EcsEventsQueueName",
}
# What WorkPool=ecs adds, and nothing else does.
ECS_RESOURCES = {
    "EcsCluster": "AWS::ECS::Cluster",
    "EcsLogGroup": "AWS::Logs::LogGroup",
    "EcsExecutionRole": "AWS::IAM::Role",
    "EcsTaskSecurityGroup": "AWS::EC2::SecurityGroup",
    "FlowRepository": "AWS::ECR::Repository",
    "EcsWorkerPolicy": "AWS::IAM::ManagedPolicy",
}


def loaded() -> dict[str, Any]:
    found: dict[str, Any] = yaml.safe_load(stack.TEMPLATE.read_text())
    return found


def resolve(value: Any, refs: dict[str, Any], conditions: dict[str, bool]) -> Any:
    """``value`` with Ref, Fn::Sub, Fn::If and AWS::NoValue resolved as CloudFormation does."""
    if isinstance(value, list):
        items = [resolve(item, refs, conditions) for item in value]
        return [item for item in items if item is not NO_VALUE]
    if not isinstance(value, dict):
        return value
    if set(value) == {"Ref"}:
        return NO_VALUE if value["Ref"] == "AWS::NoValue" else refs[value["Ref"]]
    if set(value) == {"Fn::Sub"}:
        return re.sub(r"\$\{([^}]+)\}", lambda m: str(refs[m[1]]), value["Fn::Sub"])
    if set(value) == {"Fn::If"}:
        name, then, otherwise = value["Fn::If"]
        return resolve(then if conditions[name] else otherwise, refs, conditions)
    resolved = {key: resolve(item, refs, conditions) for key, item in value.items()}
    return {key: item for key, item in resolved.items() if item is not NO_VALUE}


NO_VALUE = object()


def filled(policy: dict[str, Any], *, db: bool, ecr: bool, dns: bool) -> dict[str, Any]:
    """A JSON policy as deployments/iam/README.md says to fill it by hand."""
    text = json.dumps(policy)
    text = text.replace("DB_SECURITY_GROUP_ID", DB_SG).replace("ECR_REPOSITORY", ECR)
    text = text.replace("DNS_ZONE_ID", DNS_ZONE)
    text = text.replace("DB_INSTANCE_ID", DB_HOST)
    text = text.replace("instance-profile/ec2-pr-preview-ssm", f"instance-profile/{PROFILE}")
    text = text.replace("role/ec2-pr-preview-ssm", f"role/{ROLE}")
    for placeholder, resource in ECS_PLACEHOLDERS.items():
        text = text.replace(placeholder, ECS_NAMES[resource])
    result: dict[str, Any] = json.loads(text)
    kept = []
    for statement in result["Statement"]:
        actions = (
            statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
        )
        if not ecr and all(action.startswith("ecr:") for action in actions):
            continue
        if not db and (DB_SG in json.dumps(statement) or DB_HOST in json.dumps(statement)):
            continue
        if not dns and DNS_ZONE in json.dumps(statement):
            continue
        kept.append(statement)
    return {**result, "Statement": kept}


def stack_refs(*, db: bool, ecr: bool, dns: bool = False) -> dict[str, Any]:
    return {
        "DatabaseSecurityGroupId": DB_SG if db else "",
        "DatabaseHostInstanceId": DB_HOST if db else "",
        "EcrRepository": ECR if ecr else "",
        "DnsZoneId": DNS_ZONE if dns else "",
        "PreviewInstanceRole": ROLE,
        "PreviewInstanceProfile": PROFILE,
        "FlowImageRepository": "pr-preview-flows",
        "AWS::Partition": "aws",
        "AWS::Region": "ap-northeast-1",
        "AWS::AccountId": "123456789012",
        **ECS_NAMES,
    }


def stack_policies(
    *, db: bool, ecr: bool, dns: bool = False, ecs: bool = False
) -> dict[str, dict[str, Any]]:
    """Every policy of the template (a role's by its name, a managed policy by its resource's),
    resolved for one choice of parameters."""
    template = loaded()
    refs = stack_refs(db=db, ecr=ecr, dns=dns)
    conditions = {
        "HasDatabase": db,
        "HasDatabaseHost": db,
        "UseEcr": ecr,
        "HasDnsZone": dns,
        "UseEcs": ecs,
    }
    found = {}
    for name, resource in template["Resources"].items():
        if not conditions.get(resource.get("Condition", ""), True):
            continue
        properties = resource.get("Properties", {})
        for policy in properties.get("Policies", []):
            found[policy["PolicyName"]] = resolve(policy["PolicyDocument"], refs, conditions)
        if resource["Type"] == "AWS::IAM::ManagedPolicy":
            found[name] = resolve(properties["PolicyDocument"], refs, conditions)
    return found


def test_the_template_is_the_one_the_json_policies_make() -> None:
    assert stack.TEMPLATE.read_text() == stack.render(), "python -m deployments.aws > " + str(
        stack.TEMPLATE
    )


@pytest.mark.parametrize("db", [True, False])
@pytest.mark.parametrize("ecr", [True, False])
@pytest.mark.parametrize("dns", [True, False])
def test_the_stacks_policies_are_the_json_files_with_their_placeholders_filled(
    db: bool, ecr: bool, dns: bool
) -> None:
    found = stack_policies(db=db, ecr=ecr, dns=dns)
    expected = {
        path.stem: filled(stack.load_policy(path), db=db, ecr=ecr, dns=dns)
        for path in (ORCHESTRATOR, INSTANCE_ROLE, INSTANCE_SSM_AGENT)
    }
    assert found == expected
    with_ecs = stack_policies(db=db, ecr=ecr, dns=dns, ecs=True)
    assert with_ecs.pop("EcsWorkerPolicy") == filled(
        stack.load_policy(stack.ECS_WORKER_POLICY), db=db, ecr=ecr, dns=dns
    )
    refs = stack_refs(db=db, ecr=ecr, dns=dns)
    assert with_ecs.pop("ecs-execution") == stack.execution_policy() | {
        "Statement": resolve(stack.execution_policy()["Statement"], refs, {})
    }
    assert with_ecs == expected  # the flows' own policies are the same on either pool
    text = json.dumps(found)
    assert "DB_SECURITY_GROUP_ID" not in text and "ECR_REPOSITORY" not in text
    assert "DB_INSTANCE_ID" not in text and "DNS_ZONE_ID" not in text
    assert "ec2-pr-preview-ssm" not in text
    assert (f"arn:aws:route53:::hostedzone/{DNS_ZONE}" in text) is dns
    assert (ECR_PLACEHOLDER.replace("ECR_REPOSITORY", ECR) in text) is ecr


def test_a_statement_added_to_a_json_file_reaches_the_stack(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    """The mechanism, not today's files: another statement (a per-preview database's, say) is in
    the rendered template, with its placeholder filled, and the committed file is then stale."""
    policy = stack.load_policy(ORCHESTRATOR)
    added = copy.deepcopy(policy)
    added["Statement"].append(
        {
            "Sid": "CreatePreviewDatabasesRule",
            "Effect": "Allow",
            "Action": "ec2:ModifySecurityGroupRules",
            "Resource": "arn:aws:ec2:*:*:security-group/DB_SECURITY_GROUP_ID",
        }
    )
    changed = tmp_path / ORCHESTRATOR.name
    changed.write_text(json.dumps(added))
    monkeypatch.setattr(stack, "ORCHESTRATOR_POLICY", changed)
    rendered = yaml.safe_load(stack.render())
    statements = rendered["Resources"]["OrchestratorRole"]["Properties"]["Policies"][0][
        "PolicyDocument"
    ]["Statement"]
    assert statements[-1] == {
        "Fn::If": [
            "HasDatabase",
            {
                **added["Statement"][-1],
                "Resource": {
                    "Fn::Sub": "arn:aws:ec2:*:*:security-group/${DatabaseSecurityGroupId}"
                },
            },
            {"Ref": "AWS::NoValue"},
        ]
    }
    assert not stack.is_current()


def test_no_secret_is_a_parameter_and_the_key_decrypts_the_app_key_for_the_orchestrator_only() -> (
    None
):
    template = loaded()
    for name, parameter in template["Parameters"].items():
        assert not re.search(r"token|secret|password|private|pem", name, re.I), name
        assert "NoEcho" not in parameter, name
    statements = template["Resources"]["AppSecretsKey"]["Properties"]["KeyPolicy"]["Statement"]
    decrypting = [s for s in statements if "kms:Decrypt" in json.dumps(s["Action"])]
    by_prefix = {
        s["Condition"]["StringLike"]["kms:EncryptionContext:PARAMETER_ARN"]["Fn::Sub"].rsplit(
            "parameter", 1
        )[1]: s["Principal"]["AWS"]
        for s in decrypting
    }
    assert by_prefix == {
        "/pr-preview-app/*": [{"Fn::GetAtt": ["OrchestratorRole", "Arn"]}],
        "/pr-preview/*": [
            {"Fn::GetAtt": ["OrchestratorRole", "Arn"]},
            {"Fn::GetAtt": ["PreviewInstanceRole", "Arn"]},
        ],
    }
    for statement in decrypting:
        assert statement["Condition"]["StringEquals"]["kms:ViaService"] == {
            "Fn::Sub": "ssm.${AWS::Region}.amazonaws.com"
        }
    account = [
        s
        for s in statements
        if s["Principal"]["AWS"] == {"Fn::Sub": "arn:${AWS::Partition}:iam::${AWS::AccountId}:root"}
    ]
    assert account and not [s for s in account if "Decrypt" in json.dumps(s["Action"])]
    # No broad managed policy on either role: only the project's policies.
    for resource in template["Resources"].values():
        assert "ManagedPolicyArns" not in resource.get("Properties", {}), resource


def test_the_ecs_work_pool_is_in_the_stack_only_with_work_pool_ecs() -> None:
    template = loaded()
    assert template["Parameters"]["WorkPool"]["Default"] == "process"
    assert template["Conditions"]["UseEcs"] == {"Fn::Equals": [{"Ref": "WorkPool"}, "ecs"]}
    resources = template["Resources"]
    assert {
        name: r["Type"] for name, r in resources.items() if r.get("Condition") == "UseEcs"
    } == ECS_RESOURCES
    outputs = template["Outputs"]
    ecs_outputs = {name for name, o in outputs.items() if o.get("Condition") == "UseEcs"}
    assert {name for name in outputs if name.startswith(("Ecs", "Flow"))} == ecs_outputs
    # Nothing else names the ECS part, but the orchestrator's trust, under the same condition.
    for name, resource in resources.items():
        if name not in ECS_RESOURCES and name != "OrchestratorRole":
            assert not re.search(r"Ecs|Flow", json.dumps(resource)), name
    trust = resources["OrchestratorRole"]["Properties"]["AssumeRolePolicyDocument"]
    refs = stack_refs(db=False, ecr=False) | {"OrchestratorTrustedPrincipal": ""}

    def principals(ecs: bool) -> list[Any]:
        found = resolve(trust, refs, {"UseEcs": ecs, "HasTrustedPrincipal": False})
        return [(s["Principal"], s.get("Condition")) for s in found["Statement"]]

    account = {"AWS": "arn:aws:iam::123456789012:root"}
    assert principals(False) == [(account, None)]
    assert principals(True) == [
        (account, None),
        (
            {"Service": "ecs-tasks.amazonaws.com"},
            {"StringEquals": {"aws:SourceAccount": "123456789012"}},
        ),
    ]


def test_cloudformation_creates_the_ecs_part_with_work_pool_ecs_and_nothing_without(
    aws: Any,
) -> None:
    """Both stacks into moto's CloudFormation: what each made, read back from moto."""
    import boto3

    region = aws.ec2.meta.region_name
    cfn = boto3.client("cloudformation", region_name=region)
    ecs, logs = boto3.client("ecs", region_name=region), boto3.client("logs", region_name=region)
    vpc = aws.ec2.describe_vpcs(Filters=[{"Name": "isDefault", "Values": ["true"]}])["Vpcs"][0]
    subnet = aws.ec2.describe_subnets(Filters=[{"Name": "vpc-id", "Values": [vpc["VpcId"]]}])[
        "Subnets"
    ][0]["SubnetId"]

    def create(name: str, **parameters: str) -> dict[str, str]:
        return create_stack(cfn, name, {"VpcId": vpc["VpcId"], "SubnetId": subnet, **parameters})

    process = create("on-process")
    assert not [key for key in process if key.startswith(("Ecs", "Flow"))]
    assert ecs.list_clusters()["clusterArns"] == []
    assert logs.describe_log_groups()["logGroups"] == []
    assert aws.iam.list_policies(Scope="Local")["Policies"] == []
    assert {r["RoleName"].split("-")[2] for r in aws.iam.list_roles()["Roles"]} == {
        "PreviewInstanceRole",
        "OrchestratorRole",
    }

    out = create("on-ecs", WorkPool="ecs")
    [cluster] = ecs.describe_clusters(clusters=[out["EcsClusterArn"]])["clusters"]
    assert cluster["status"] == "ACTIVE"
    [group] = logs.describe_log_groups(logGroupNamePrefix=out["EcsLogGroupName"])["logGroups"]
    assert (group["logGroupName"], group["retentionInDays"]) == ("/pr-preview/on-ecs/flows", 14)
    [sg] = aws.ec2.describe_security_groups(GroupIds=[out["EcsSecurityGroupId"]])["SecurityGroups"]
    assert (sg["VpcId"], sg["IpPermissions"]) == (vpc["VpcId"], [])
    assert out["EcsVpcId"] == vpc["VpcId"] and out["SubnetId"] == subnet
    names = {
        "EcsCluster": out["EcsClusterArn"].rsplit("/", 1)[1],
        "OrchestratorRole": out["OrchestratorRoleArn"].rsplit("/", 1)[1],
        "EcsExecutionRole": out["EcsExecutionRoleArn"].rsplit("/", 1)[1],
        "EcsLogGroup": out["EcsLogGroupName"],
        "EcsEventsQueueName": out["EcsEventsQueueName"],
    }
    # The worker's managed policy: the JSON file, for exactly this stack's cluster, roles,
    # log group and queue.
    policy = aws.iam.get_policy(PolicyArn=out["EcsWorkerPolicyArn"])["Policy"]
    document = aws.iam.get_policy_version(
        PolicyArn=policy["Arn"], VersionId=policy["DefaultVersionId"]
    )["PolicyVersion"]["Document"]
    text = json.dumps(stack.load_policy(stack.ECS_WORKER_POLICY))
    for placeholder, resource in ECS_PLACEHOLDERS.items():
        text = text.replace(placeholder, names[resource])
    assert document == json.loads(text)
    # The task role is the orchestrator role, which ECS tasks may now assume; the execution
    # role pulls the flow image and writes to this log group only.
    orchestrator = aws.iam.get_role(RoleName=names["OrchestratorRole"])["Role"]
    assert {"Service": "ecs-tasks.amazonaws.com"} in [
        s["Principal"] for s in orchestrator["AssumeRolePolicyDocument"]["Statement"]
    ]
    execution = aws.iam.get_role_policy(
        RoleName=names["EcsExecutionRole"], PolicyName="ecs-execution"
    )["PolicyDocument"]
    if isinstance(execution, str):  # moto's CloudFormation stores the dict's repr
        execution = ast.literal_eval(execution)
    resources = {s["Sid"]: s["Resource"] for s in execution["Statement"]}
    account = "123456789012"
    assert resources == {
        "LogInToEcr": "*",
        "PullTheFlowImage": f"arn:aws:ecr:{region}:{account}:repository/pr-preview-flows",
        "WriteTheFlowRunsLogStreams": (
            f"arn:aws:logs:{region}:{account}:log-group:/pr-preview/on-ecs/flows:log-stream:*"
        ),
    }
    assert out["FlowImageRepositoryUri"].endswith("/pr-preview-flows")
