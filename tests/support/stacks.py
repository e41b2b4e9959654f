"""The project's CloudFormation stack (deployments/aws) created in moto, as `aws cloudformation
deploy` creates it."""

from __future__ import annotations

from typing import Any

from deployments.aws import render


def create_stack(cfn: Any, name: str, parameters: dict[str, str]) -> dict[str, str]:
    """Create stack ``name`` with ``parameters``; its outputs once it is CREATE_COMPLETE."""
    cfn.create_stack(
        StackName=name,
        TemplateBody=render(),
        Capabilities=["CAPABILITY_IAM"],
        Parameters=[{"ParameterKey": k, "ParameterValue": v} for k, v in parameters.items()],
    )
    [found] = cfn.describe_stacks(StackName=name)["Stacks"]
    assert found["StackStatus"] == "CREATE_COMPLETE", found.get("StackStatusReason")
    return {o["OutputKey"]: o["OutputValue"] for o in found.get("Outputs", [])}
