"""Work pools beyond one host (issue 18): the ECS and Kubernetes variants of prefect.yaml
checked against the workers' own base job templates, and the flow image's Dockerfile."""

from __future__ import annotations

import json
import re
import shlex
import sys
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
import yaml
from prefect.client.schemas.objects import FlowRun
from prefect.utilities.templating import apply_values

from deployments.pools import (
    KINDS,
    PREFECT_YAML,
    default_base_job_template,
    problems,
    process_base_job_template,
    render,
    variant,
)

PROJECT = PREFECT_YAML.parent
ORCHESTRATOR_ROLE = "arn:aws:iam::123456789012:role/pr-preview-orchestrator"


def with_env(job_variables: dict[str, Any], values: dict[str, str]) -> dict[str, Any]:
    """The job variables as `prefect deploy` leaves them: each {{ $NAME }} from the environment."""
    text = json.dumps(job_variables)
    for name, value in values.items():
        text = text.replace("{{ $" + name + " }}", value)
    assert "{{ $" not in text, text
    loaded: dict[str, Any] = json.loads(text)
    return loaded


def job_configuration(kind: str, values: dict[str, Any]) -> dict[str, Any]:
    """The worker's job configuration for these job variables, rendered as the worker renders
    it (the variables' defaults, then ours) — short of the server's block and variable look-ups,
    which these variables do not use."""
    template = default_base_job_template(kind)
    variables = template["variables"]["properties"]
    defaults = {name: spec["default"] for name, spec in variables.items() if "default" in spec}
    rendered: dict[str, Any] = apply_values(template["job_configuration"], defaults | values)
    return rendered


@pytest.mark.parametrize("kind", KINDS)
def test_every_job_variable_is_one_the_workers_template_accepts(kind: str) -> None:
    template = default_base_job_template(kind)
    assert problems(kind, template) == []
    # The check sees mistakes: a misspelt variable and a value of the wrong type.
    job_variables = variant(kind)["work_pool"]["job_variables"]
    found = problems(kind, template, {**job_variables, "imagee": "x", "image": 42})
    assert len(found) == 2, found
    assert found[0].startswith("imagee: not a variable") and found[1].startswith("image: 42")


def test_ecs_variant_renders_a_task_on_the_orchestrator_role() -> None:
    from prefect_aws.workers.ecs_worker import ECSJobConfiguration

    values = with_env(
        variant("ecs")["work_pool"]["job_variables"],
        {
            "PR_PREVIEW_FLOW_IMAGE": "123456789012.dkr.ecr.ap-northeast-1.amazonaws.com/flows:1",
            "PR_PREVIEW_ECS_CLUSTER": "previews",
            "PR_PREVIEW_ORCHESTRATOR_ROLE_ARN": ORCHESTRATOR_ROLE,
            "PR_PREVIEW_ECS_EXECUTION_ROLE_ARN": "arn:aws:iam::123456789012:role/ecs-exec",
            "PR_PREVIEW_ECS_VPC_ID": "vpc-0a1b2c3d",
            "PR_PREVIEW_ECS_SUBNET_ID": "subnet-0312f79d1cf5c6bdc",
            "PR_PREVIEW_ECS_SECURITY_GROUP_ID": "sg-0600751c154b62e0c",
            "PR_PREVIEW_ECS_LOG_GROUP": "/pr-preview/pr-preview/flows",
        },
    )
    job = ECSJobConfiguration(**job_configuration("ecs", values))
    request = job.task_run_request
    assert request["overrides"]["taskRoleArn"] == ORCHESTRATOR_ROLE
    assert request["launchType"] == "FARGATE" and request["cluster"] == "previews"
    assert job.task_definition["containerDefinitions"][0]["image"].endswith("/flows:1")
    # No command of ours: the worker fills in its supervisor, which cancels a running run
    # (tests/test_ecs_pool.py), not the engine alone.
    assert job.command is None
    job.prepare_for_flow_run(FlowRun(flow_id=uuid4(), name="a-run"))
    assert job.command == "prefect flow-run execute"
    assert (job.task_definition["cpu"], job.task_definition["memory"]) == (512, 1024)
    # The worker wraps it in awsvpcConfiguration itself (tests/test_ecs_pool.py runs it).
    assert job.network_configuration == {
        "subnets": ["subnet-0312f79d1cf5c6bdc"],
        "securityGroups": ["sg-0600751c154b62e0c"],
        "assignPublicIp": "DISABLED",
    }
    assert job.vpc_id == "vpc-0a1b2c3d"
    assert job.execution_role_arn == "arn:aws:iam::123456789012:role/ecs-exec"
    # The stack's log group, which the execution role may write to; none created on the way.
    assert job.cloudwatch_logs_options == {
        "awslogs-group": "/pr-preview/pr-preview/flows",
        "awslogs-create-group": "false",
    }


def test_kubernetes_variant_renders_a_job_under_the_orchestrator_service_account() -> None:
    values = with_env(
        variant("kubernetes")["work_pool"]["job_variables"],
        {"PR_PREVIEW_FLOW_IMAGE": "ghcr.io/octo-org/pr-preview-flows:1"},
    )
    manifest = job_configuration("kubernetes", values)["job_manifest"]
    pod = manifest["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert manifest["metadata"]["namespace"] == "pr-preview"
    assert pod["serviceAccountName"] == "pr-preview-orchestrator"
    assert container["image"] == "ghcr.io/octo-org/pr-preview-flows:1"
    # No command of ours: the worker fills in its supervisor, which cancels a running run.
    assert "command" not in variant("kubernetes")["work_pool"]["job_variables"]
    assert container["resources"] == {
        "limits": {"cpu": "1", "memory": "1Gi"},
        "requests": {"cpu": "250m", "memory": "512Mi"},
    }
    assert manifest["spec"]["ttlSecondsAfterFinished"] == 3600


@pytest.mark.parametrize("kind", KINDS)
def test_a_rendered_variant_keeps_every_deployment_and_trigger_of_prefect_yaml(kind: str) -> None:
    original = yaml.safe_load(PREFECT_YAML.read_text())
    rendered = render(kind)
    names = [deployment["name"] for deployment in rendered["deployments"]]
    assert names == [deployment["name"] for deployment in original["deployments"]]
    for mine, theirs in zip(rendered["deployments"], original["deployments"], strict=True):
        assert mine["work_pool"]["name"] == variant(kind)["work_pool"]["name"]
        assert mine.get("triggers") == theirs.get("triggers")
        assert mine["entrypoint"] == theirs["entrypoint"]
        assert (PROJECT / mine["entrypoint"].split(":")[0]).is_file()
    [step] = rendered["pull"]
    assert step["prefect.deployments.steps.set_working_directory"]["directory"] == workdir()


def dockerfile() -> list[tuple[str, str]]:
    """The Dockerfile's instructions (continuation lines joined), comments left out."""
    text = (PROJECT / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1])
        for line in lines
        if line and not line.startswith("#")
    ]


def workdir() -> str:
    return [arg for op, arg in dockerfile() if op == "WORKDIR"][-1]


def test_the_flow_image_runs_this_code_on_this_prefect_as_a_user() -> None:
    from importlib.metadata import version

    instructions = dockerfile()
    base = next(arg for op, arg in instructions if op == "FROM")
    assert base == f"prefecthq/prefect:{version('prefect')}-python3.11", base
    copied = " ".join(arg for op, arg in instructions if op == "COPY")
    for needed in ("pyproject.toml", "flows", "tasks", "deployments", "prefect.yaml"):
        assert re.search(rf"(^|\s){re.escape(needed)}(\s|/|$)", copied), needed
    runs = " ".join(arg for op, arg in instructions if op == "RUN")
    assert "pip install" in runs and "--no-cache-dir" in runs and " -e " not in runs
    user = [arg for op, arg in instructions if op == "USER"]
    assert user and user[-1] not in ("root", "0")
    # Nothing secret is baked in: the flows read their secrets at run time.
    for op, arg in instructions:
        if op in ("ENV", "ARG"):
            assert not re.search(r"TOKEN|PASSWORD|SECRET|KEY", arg, re.IGNORECASE), arg
    ignored = (PROJECT / ".dockerignore").read_text().split()
    assert {".venv", ".git", "build", "tests"} <= set(ignored)


def test_the_pools_module_prints_a_prefect_yaml_and_checks_both(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from deployments.pools.__main__ import main

    assert main(["--check"]) == 0
    assert capsys.readouterr().out.splitlines() == ["ecs: ok", "kubernetes: ok"]
    assert main(["ecs"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed == render("ecs")


def test_the_ecs_variant_takes_its_values_from_the_stack_deployed_with_work_pool_ecs(
    aws: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from deployments.pools.__main__ import main
    from tests.test_setup import deploy_stack

    region = aws.ec2.meta.region_name
    monkeypatch.setenv("AWS_DEFAULT_REGION", region)
    _, outputs = deploy_stack(aws, WorkPool="ecs")
    assert main(["ecs", "--from-stack", "pr-preview"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert {d["work_pool"]["name"] for d in printed["deployments"]} == {"pr-preview-ecs"}
    job_variables = printed["deployments"][0]["work_pool"]["job_variables"]
    assert with_env(job_variables, {"PR_PREVIEW_FLOW_IMAGE": "flows:1"}) == with_env(
        variant("ecs")["work_pool"]["job_variables"],
        {
            "PR_PREVIEW_FLOW_IMAGE": "flows:1",
            "PR_PREVIEW_ECS_CLUSTER": outputs["EcsClusterArn"],
            "PR_PREVIEW_ORCHESTRATOR_ROLE_ARN": outputs["OrchestratorRoleArn"],
            "PR_PREVIEW_ECS_EXECUTION_ROLE_ARN": outputs["EcsExecutionRoleArn"],
            "PR_PREVIEW_ECS_LOG_GROUP": outputs["EcsLogGroupName"],
            "PR_PREVIEW_ECS_VPC_ID": outputs["EcsVpcId"],
            "PR_PREVIEW_ECS_SUBNET_ID": outputs["SubnetId"],
            "PR_PREVIEW_ECS_SECURITY_GROUP_ID": outputs["EcsSecurityGroupId"],
        },
    )
    assert job_variables["image"] == "{{ $PR_PREVIEW_FLOW_IMAGE }}"  # the deployer's tag
    # A stack without the ECS part, or a Kubernetes pool, says what to do instead.
    assert main(["kubernetes", "--from-stack", "pr-preview"]) == 2
    assert "only ecs" in capsys.readouterr().err
    import boto3

    boto3.client("cloudformation", region_name=region).update_stack(
        StackName="pr-preview",
        UsePreviousTemplate=True,
        Capabilities=["CAPABILITY_IAM"],
        Parameters=[
            {"ParameterKey": key, "UsePreviousValue": True}
            for key in ("VpcId", "SubnetId", "DatabaseSecurityGroupId")
        ],
    )
    assert main(["ecs", "--from-stack", "pr-preview"]) == 2
    err = capsys.readouterr().err
    assert "has no output EcsClusterArn" in err and "WorkPool=ecs" in err, err
    assert main(["ecs", "--from-stack", "no-such-stack"]) == 2
    assert "no stack no-such-stack" in capsys.readouterr().err


def test_the_process_pool_starts_the_engine_on_the_workers_interpreter(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from prefect.workers.process import ProcessWorker

    from deployments.pools.__main__ import main

    stock = ProcessWorker.get_default_base_job_template()
    assert stock["variables"]["properties"]["command"]["default"] is None  # a supervisor's
    assert main(["--process-template"]) == 0
    printed = json.loads(capsys.readouterr().out)
    command = printed["variables"]["properties"]["command"]["default"]
    assert shlex.split(command) == [sys.executable, "-m", "prefect.engine"]
    # Only the command differs from the worker's own template, and it passes its schema.
    printed["variables"]["properties"]["command"]["default"] = None
    assert printed == stock
    assert problems("process", stock, {"command": command}) == []
    # A path with a space stays one argument.
    spaced = process_base_job_template("/opt/my venv/bin/python")
    assert shlex.split(spaced["variables"]["properties"]["command"]["default"])[0] == (
        "/opt/my venv/bin/python"
    )


def test_the_flow_image_built_here_is_the_dockerfiles(tmp_path: Path) -> None:
    """`make image` builds the Dockerfile's image without Docker Hub: the same code in the same
    working directory, the same user, this venv's Prefect and prefect-aws."""
    import tarfile
    from importlib.metadata import version

    from local_stack.images import (
        FLOW_SOURCES,
        FLOW_USER,
        SITE_PACKAGES,
        ImageBuilder,
        _flow_requirements,
    )

    pins = _flow_requirements()
    assert f"prefect=={version('prefect')}" in pins
    assert f"prefect-aws=={version('prefect-aws')}" in pins
    assert not [pin for pin in pins if pin.startswith(("pytest", "moto", "pr-preview"))], pins
    copied = " ".join(arg for op, arg in dockerfile() if op == "COPY").split()
    assert set(FLOW_SOURCES) == {name.rstrip("/") for name in copied if not name.startswith(".")}
    assert [arg for op, arg in dockerfile() if op == "USER"][-1] == FLOW_USER
    layer = ImageBuilder(tmp_path)._flow_code_layer(PROJECT)
    with tarfile.open(layer.path) as tar:
        names = set(tar.getnames())
        pth = tar.extractfile(f"{SITE_PACKAGES}/pr_preview.pth")
        assert pth is not None and pth.read().decode().strip() == workdir()
    prefix = workdir().lstrip("/")
    assert f"{prefix}/flows/preview.py" in names and f"{prefix}/prefect.yaml" in names
    assert not [name for name in names if "__pycache__" in name or "/tests/" in name]
