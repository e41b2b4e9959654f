"""The CloudFormation stack (deployments/aws/pr-preview.yaml) holds the project's policies.

One source of truth: the template is written from deployments/iam/*.json by
``deployments.aws``; these tests fail when the file is stale, and read the template's policy
blocks back — intrinsic functions resolved for the stack's parameters — to find exactly the JSON
files with their placeholders filled (and an optional part's statements gone when unused). What
``tests/test_iam.py`` proves of the JSON files (the recorded calls, the conditions, the Deny)
therefore holds for the stack's roles.
"""

from __future__ import annotations

import copy
import json
import re
from typing import Any

import pytest
import yaml

from deployments import aws as stack
from tests.test_iam import ECR_PLACEHOLDER, INSTANCE_ROLE, INSTANCE_SSM_AGENT, ORCHESTRATOR

DB_SG = "sg-0a1b2c3d4e5f60718"
DB_HOST = "i-0db0123456789abcd"  # the database host (database: per-preview)
ECR = "octo-org/app"
DNS_ZONE = "Z0123456789ABCDEFGHIJ"  # the previews' private hosted zone (dns_zone_id)
ROLE = "pr-preview-PreviewInstanceRole-ABC123"
PROFILE = "pr-preview-PreviewInstanceProfile-DEF456"


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


def stack_policies(*, db: bool, ecr: bool, dns: bool) -> dict[str, dict[str, Any]]:
    """Every role policy of the template, by name, resolved for one choice of parameters."""
    template = loaded()
    refs = {
        "DatabaseSecurityGroupId": DB_SG if db else "",
        "DatabaseHostInstanceId": DB_HOST if db else "",
        "EcrRepository": ECR if ecr else "",
        "DnsZoneId": DNS_ZONE if dns else "",
        "PreviewInstanceRole": ROLE,
        "PreviewInstanceProfile": PROFILE,
    }
    conditions = {"HasDatabase": db, "HasDatabaseHost": db, "UseEcr": ecr, "HasDnsZone": dns}
    found = {}
    for resource in template["Resources"].values():
        for policy in resource.get("Properties", {}).get("Policies", []):
            found[policy["PolicyName"]] = resolve(policy["PolicyDocument"], refs, conditions)
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
