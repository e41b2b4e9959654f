"""Work pools beyond one host: prefect.yaml for an ECS or a Kubernetes work pool.

``ecs.yaml`` and ``kubernetes.yaml`` beside this file hold what differs from the process pool
of prefect.yaml: the work pool with its ``job_variables`` and the ``pull`` step (the code is in
the flow image, Dockerfile). :func:`render` lays one over prefect.yaml, so every deployment and
trigger stays defined once; :func:`problems` checks its ``job_variables`` against the worker's
own default base job template — what ``prefect work-pool get-default-base-job-template --type``
prints.

    python -m deployments.pools ecs > prefect.ecs.yaml     # then prefect deploy --prefect-file
    python -m deployments.pools ecs --from-stack pr-preview  # the stack's values filled in
    python -m deployments.pools --check                      # both variants against the templates
    python -m deployments.pools --process-template > process-pool.json   # the process pool's

The process pool's base job template (:func:`process_base_job_template`) is the process
worker's own with one change: each run's command is ``<python> -m prefect.engine``. Left blank,
the worker starts a workspace supervisor interpreter that starts the engine as a second one;
naming the engine starts one interpreter per run (measured: ~1.2 s of CPU and ~0.8 s of start
latency less per run on 2 cores, bench/bench_trigger_latency.py). The ECS and Kubernetes variants
keep the workers' own command, that supervisor in the container: there it is what cancels a
running run, which the workers do not (bench/bench_ecs_command.py measures what it costs).
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import sys
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

KINDS = ("ecs", "kubernetes")
PREFECT_YAML = Path(__file__).resolve().parents[2] / "prefect.yaml"
# ``{{ $NAME }}`` of a variant → the output of the CloudFormation stack (deployments/aws,
# ``WorkPool=ecs``) that holds its value; the flow image's tag stays the deployer's.
STACK_OUTPUTS = {
    "ecs": {
        "PR_PREVIEW_ECS_CLUSTER": "EcsClusterArn",
        "PR_PREVIEW_ORCHESTRATOR_ROLE_ARN": "OrchestratorRoleArn",
        "PR_PREVIEW_ECS_EXECUTION_ROLE_ARN": "EcsExecutionRoleArn",
        "PR_PREVIEW_ECS_LOG_GROUP": "EcsLogGroupName",
        "PR_PREVIEW_ECS_VPC_ID": "EcsVpcId",
        "PR_PREVIEW_ECS_SUBNET_ID": "SubnetId",
        "PR_PREVIEW_ECS_SECURITY_GROUP_ID": "EcsSecurityGroupId",
    }
}


def variant(kind: str) -> dict[str, Any]:
    """The overlay for ``kind``: ``work_pool`` (name, queue, job_variables) and ``pull``."""
    if kind not in KINDS:
        raise ValueError(f"no work pool variant {kind!r}: choose one of {', '.join(KINDS)}")
    loaded: dict[str, Any] = yaml.safe_load(Path(__file__).with_name(f"{kind}.yaml").read_text())
    return loaded


def render(
    kind: str, prefect_yaml: Path = PREFECT_YAML, values: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """prefect.yaml with every deployment on ``kind``'s work pool and its pull step;
    ``values``: ``{{ $NAME }}`` placeholders filled in (see :func:`values_from_stack`)."""
    overlay = variant(kind)
    project: dict[str, Any] = yaml.safe_load(prefect_yaml.read_text())
    project["pull"] = copy.deepcopy(overlay["pull"])
    project.pop("definitions", None)  # anchors already expanded by the load
    work_pool = _filled(overlay["work_pool"], values or {})
    for deployment in project["deployments"]:
        deployment["work_pool"] = copy.deepcopy(work_pool)
    return project


def _filled(value: Any, values: Mapping[str, str]) -> Any:
    if isinstance(value, dict):
        return {key: _filled(item, values) for key, item in value.items()}
    if isinstance(value, list):
        return [_filled(item, values) for item in value]
    if isinstance(value, str) and (found := PLACEHOLDER.fullmatch(value)) and found[1] in values:
        return values[found[1]]
    return value


PLACEHOLDER = re.compile(r"\{\{ \$([A-Z0-9_]+) \}\}")


def values_from_stack(kind: str, stack: str, outputs: Mapping[str, str]) -> dict[str, str]:
    """The variant's placeholders that ``stack``'s outputs fill; every one must be there."""
    wanted = STACK_OUTPUTS.get(kind)
    if wanted is None:
        raise ValueError(f"the stack holds nothing of a {kind} work pool: only ecs")
    missing = sorted({output for output in wanted.values() if output not in outputs})
    if missing:
        raise ValueError(
            f"stack {stack} has no output {', '.join(missing)}: deploy it with"
            " WorkPool=ecs (deployments/aws/pr-preview.yaml)"
        )
    return {name: outputs[output] for name, output in wanted.items()}


def default_base_job_template(kind: str) -> dict[str, Any]:
    """The worker's own default base job template, obtained in this process.

    ECS: prefect-aws's ``ECSWorker``. Kubernetes: ``prefect-kubernetes``'s worker when it is
    installed, otherwise the copy of Prefect's collection registry that Prefect ships (what the
    server answers for ``--type kubernetes`` without network).
    """
    from prefect.workers.base import BaseWorker

    if kind == "ecs":
        from prefect_aws.workers.ecs_worker import ECSWorker

        return copy.deepcopy(ECSWorker.get_default_base_job_template())
    worker = BaseWorker.get_worker_class_from_type(kind)
    if worker is not None:
        return copy.deepcopy(worker.get_default_base_job_template())
    views = resources.files("prefect.server.api") / "collections_data" / "views"
    registry = json.loads((views / "aggregate-worker-metadata.json").read_text())
    for collection in registry.values():
        for found in collection.values():
            if found.get("type") == kind:
                return copy.deepcopy(found["default_base_job_configuration"])
    raise LookupError(f"no base job template for work pool type {kind!r}")


def process_base_job_template(python: str | None = None) -> dict[str, Any]:
    """The process worker's default base job template, each run's command the engine itself
    on ``python`` (default: this interpreter, the one the worker runs with)."""
    from prefect.workers.process import ProcessWorker

    template = copy.deepcopy(ProcessWorker.get_default_base_job_template())
    command = shlex.join([python or sys.executable, "-m", "prefect.engine"])
    template["variables"]["properties"]["command"]["default"] = command
    return template


def problems(
    kind: str,
    template: dict[str, Any] | None = None,
    job_variables: dict[str, Any] | None = None,
) -> list[str]:
    """What in ``kind``'s job_variables (or the ones given) the worker's base job template
    does not accept: a name it has no variable for, a value its schema refuses."""
    import jsonschema

    template = template or default_base_job_template(kind)
    schema = template["variables"]
    if job_variables is None:
        job_variables = variant(kind)["work_pool"]["job_variables"]
    found = [
        f"{name}: not a variable of the {kind} base job template"
        for name in job_variables
        if name not in schema.get("properties", {})
    ]
    validator = jsonschema.Draft202012Validator(schema)
    found += [
        f"{'.'.join(map(str, error.absolute_path)) or '(root)'}: {error.message}"
        for error in validator.iter_errors(job_variables)
    ]
    return found
