"""``pr-preview setup --stack NAME``: from a deployed stack to a working installation.

    1. read the stack's outputs (deployments/aws/pr-preview.yaml);
    2. merge them into the Prefect Variable ``pr-preview-config`` — a field you set is kept;
    3. store the secrets it is given as SecureStrings with the stack's KMS key (files or stdin,
       never the command line); one that exists is kept unless ``--replace-secrets``;
    4. create the ``pr-preview`` work pool from the project's template;
    5. create the deployments of prefect.yaml (``prefect deploy --all``) if any is missing;
    6. run ``pr-preview doctor``.

Run twice, it changes nothing and says so; ``--dry-run`` says what it would do and does nothing.
Every check of the input happens before the first change.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deployments.cli.common import CliError, _one_line
from deployments.cli.stack import (
    KEY_OUTPUT,
    cloudformation,
    config_from_outputs,
    read_outputs,
    stack_region,
)

if TYPE_CHECKING:
    from mypy_boto3_ssm import SSMClient
    from mypy_boto3_ssm.type_defs import TagTypeDef

    from tasks.config import PreviewConfig

WORK_POOL = "pr-preview"
PROJECT_DIR = Path(__file__).resolve().parents[2]
PREFECT_YAML = PROJECT_DIR / "prefect.yaml"
STACK_TAG = "pr-preview:stack"  # on every parameter setup stored: teardown-all removes them
APP_KEY_PARAMETER = "/pr-preview-app/github-app-key"


# --- what changes: pure ---------------------------------------------------------------------


@dataclass(frozen=True)
class Change:
    """One line of the report: ``what`` is ``set``, ``same``, ``kept`` (or ``store``...)."""

    what: str
    subject: str
    detail: str = ""

    @property
    def changes(self) -> bool:
        return self.what in {"set", "store", "create", "deploy"}


def merge_config(
    current: dict[str, Any], wanted: dict[str, Any]
) -> tuple[dict[str, Any], list[Change]]:
    """``current`` with every field of ``wanted`` it lacks; a field it has is never replaced."""
    merged = dict(current)
    changes = []
    for field, value in wanted.items():
        if field not in current:
            merged[field] = value
            changes.append(Change("set", field, _shown(value)))
        elif current[field] == value:
            changes.append(Change("same", field))
        else:
            changes.append(
                Change(
                    "kept",
                    field,
                    f"yours: {_shown(current[field])}; setup's: {_shown(value)} (remove it from"
                    " the Variable to take setup's)",
                )
            )
    return merged, changes


def _shown(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def plan_secret(
    parameter: str, existing_key: str | None, key_arn: str, given: bool, replace: bool
) -> Change:
    """What to do with one secret: ``existing_key`` is the KMS key of the parameter there now
    (None: no parameter). The value there is never read: only the flows may decrypt it."""
    ours = existing_key is not None and existing_key in (key_arn, key_arn.rsplit("/", 1)[-1])
    if existing_key is None:
        if given:
            return Change("store", parameter, "SecureString with the stack's key")
        return Change("missing", parameter, "not stored: pass it to setup (see --help)")
    if given and replace:
        return Change("store", parameter, "replaced, SecureString with the stack's key")
    if ours:
        return Change(
            "same",
            parameter,
            "exists with the stack's key (--replace-secrets to store the one given)"
            if given
            else "exists with the stack's key",
        )
    return Change(
        "kept",
        parameter,
        f"exists with another key ({existing_key}): give it again with --replace-secrets to"
        " encrypt it with the stack's key",
    )


# --- reading the secrets --------------------------------------------------------------------


@dataclass(frozen=True)
class Secret:
    """A secret's value and where it came from; its ``repr`` shows no value."""

    source: str
    value: str

    def __repr__(self) -> str:
        return f"Secret(from {self.source}, {len(self.value)} characters)"


def read_secret(path: str, what: str, check: str) -> Secret:
    """``path``'s text (``-``: stdin), checked by ``check``: ``pem``, ``token`` or ``url``.
    Errors name the file and what is wrong, never the content."""
    if path == "-":
        text, source = sys.stdin.read(), "stdin"
    else:
        try:
            text, source = Path(path).read_text(), path
        except OSError as exc:
            # The path is not echoed: a value typed in its place may be the secret itself.
            raise CliError(f"{what}: cannot read the file given: {exc.strerror}") from None
    text = text.strip()
    problem = None
    if not text:
        problem = "it is empty"
    elif check == "pem" and not (
        text.startswith("-----BEGIN") and text.endswith("PRIVATE KEY-----")
    ):
        problem = "it is not a PEM private key (the .pem GitHub gives for the App)"
    elif check == "token" and (len(text.split()) != 1 or len(text) > 1024):
        problem = "it is not one token (one line, no spaces)"
    elif check == "url" and not text.startswith(
        ("postgresql://", "postgresql+asyncpg://", "postgres://")
    ):
        problem = "it is not a postgresql:// URL"
    if problem:
        raise CliError(f"{what} from {source}: {problem}")
    return Secret(source, text)


def given_secrets(args: argparse.Namespace) -> dict[str, Secret]:
    """The secrets passed, by configuration field of their parameter."""
    sources = [
        ("github_app_private_key_parameter", args.github_app_key, "the GitHub App key", "pem"),
        ("ghcr_token_parameter", args.ghcr_token_file, "the GHCR token", "token"),
        ("database_url_parameter", args.database_url_file, "the DATABASE_URL", "url"),
    ]
    if [path for _, path, _, _ in sources if path == "-"][1:]:
        raise CliError("only one secret can come from stdin (-): give the others as files")
    return {
        field: read_secret(path, what, check)
        for field, path, what, check in sources
        if path is not None
    }


def parameter_key(ssm: SSMClient, name: str) -> str | None:
    """The KMS key of parameter ``name``, or None when there is none (its value unread)."""
    found = ssm.describe_parameters(
        ParameterFilters=[{"Key": "Name", "Option": "Equals", "Values": [name]}]
    )["Parameters"]
    if not found:
        return None
    return found[0].get("KeyId", "")


def store_secret(ssm: SSMClient, name: str, secret: Secret, key_arn: str, stack: str) -> None:
    tag: TagTypeDef = {"Key": STACK_TAG, "Value": stack}
    if parameter_key(ssm, name) is None:
        ssm.put_parameter(
            Name=name, Value=secret.value, Type="SecureString", KeyId=key_arn, Tags=[tag]
        )
        return
    ssm.put_parameter(
        Name=name, Value=secret.value, Type="SecureString", KeyId=key_arn, Overwrite=True
    )
    ssm.add_tags_to_resource(ResourceType="Parameter", ResourceId=name, Tags=[tag])


# --- Prefect --------------------------------------------------------------------------------


def prefect_api_url() -> str:
    url = os.environ.get("PREFECT_API_URL", "")
    if not url:
        raise CliError(
            "setup writes the Variable, the work pool and the deployments to a Prefect server:"
            " set PREFECT_API_URL (e.g. http://127.0.0.1:4200/api, or your Prefect Cloud"
            " workspace's with PREFECT_API_KEY)"
        )
    return url


def read_variable() -> dict[str, Any]:
    from tasks.config import config_from_variable

    return config_from_variable()


def write_variable(value: dict[str, Any]) -> None:
    from prefect.variables import Variable

    from tasks.config import VARIABLE_NAME

    Variable.set(VARIABLE_NAME, value, overwrite=True)


def plan_work_pool(template: dict[str, Any]) -> Change:
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            pool = client.read_work_pool(WORK_POOL)
        except ObjectNotFound:
            return Change("create", f"work pool {WORK_POOL}", "process, the project's template")
    if pool.base_job_template == template:
        return Change("same", f"work pool {WORK_POOL}")
    return Change(
        "kept",
        f"work pool {WORK_POOL}",
        f"its template differs from the project's: python -m deployments.pools"
        f" --process-template > pool.json; prefect work-pool update {WORK_POOL}"
        " --base-job-template pool.json",
    )


def create_work_pool(template: dict[str, Any]) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    with get_client(sync_client=True) as client:
        client.create_work_pool(
            WorkPoolCreate(name=WORK_POOL, type="process", base_job_template=template)
        )


def project_deployments() -> dict[str, str]:
    """prefect.yaml's deployments: name → entrypoint."""
    import yaml

    if not PREFECT_YAML.is_file():
        raise CliError(f"no {PREFECT_YAML}: run setup from the project's checkout")
    project = yaml.safe_load(PREFECT_YAML.read_text())
    return {d["name"]: d["entrypoint"] for d in project["deployments"]}


def plan_deployments(redeploy: bool) -> Change:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    wanted = project_deployments()
    with get_client(sync_client=True) as client:
        found = client.read_deployments(
            deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=list(wanted)))
        )
    present = {
        d.name
        for d in found
        if wanted.get(d.name) == d.entrypoint and d.work_pool_name == WORK_POOL
    }
    missing = sorted(set(wanted) - present)
    if missing or redeploy:
        why = f"missing: {', '.join(missing)}" if missing else "--redeploy"
        return Change("deploy", "deployments", f"prefect deploy --all ({why})")
    return Change(
        "same",
        "deployments",
        f"all {len(wanted)} of prefect.yaml present (--redeploy to apply it again)",
    )


def deploy_all(api_url: str) -> None:
    """``prefect --no-prompt deploy --all`` from the project, as the README's step does."""
    argv = [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all"]
    env = {**os.environ, "PREFECT_API_URL": api_url, "PWD": str(PROJECT_DIR)}
    done = subprocess.run(
        argv, cwd=PROJECT_DIR, env=env, capture_output=True, text=True, timeout=900, check=False
    )
    if done.returncode != 0:
        tail = _one_line((done.stderr or done.stdout)[-600:])
        raise CliError(f"prefect deploy --all failed ({done.returncode}): {tail}")


# --- the command ----------------------------------------------------------------------------


def wanted_config(args: argparse.Namespace, outputs: dict[str, str]) -> dict[str, Any]:
    values = config_from_outputs(args.stack, outputs)
    if args.allow:
        values["allowed_repos"] = list(args.allow)
    if args.github_app_id is not None:
        values["github_app_id"] = args.github_app_id
    if args.github_app_key is not None:
        values["github_app_private_key_parameter"] = APP_KEY_PARAMETER
    return values


def _report(title: str, changes: list[Change], dry_run: bool) -> None:
    print(title)
    for change in changes:
        what = f"would {change.what}" if dry_run and change.changes else change.what
        detail = f"  {change.detail}" if change.detail else ""
        print(f"  {what:<14} {change.subject}{detail}")


def cmd_setup(args: argparse.Namespace) -> int:
    from deployments.cli.doctor import cmd_doctor
    from deployments.pools import process_base_job_template
    from tasks.cloud.ecr import ecr_repository
    from tasks.config import VARIABLE_NAME, ConfigError, load_config

    api_url = prefect_api_url()
    region = stack_region(args.region)
    secrets = given_secrets(args)  # every file read and checked before anything changes

    # 1-2. The stack's outputs, merged into the Variable.
    outputs = read_outputs(cloudformation(region), args.stack)
    wanted = wanted_config(args, outputs)  # every output it needs, or an error
    key_arn = outputs[KEY_OUTPUT]
    current = read_variable()
    merged, config_changes = merge_config(current, wanted)
    try:
        settings: PreviewConfig = load_config(merged, env={}, use_variable=False)
    except ConfigError as exc:
        raise CliError(f"the Variable would not load, nothing changed: {exc}") from None

    # 3. The secrets, by the parameter names the merged configuration uses.
    import boto3

    ssm = boto3.session.Session().client("ssm", region_name=settings.region)
    names = {
        "github_app_private_key_parameter": settings.github_app_private_key_parameter
        or APP_KEY_PARAMETER,
        "ghcr_token_parameter": settings.ghcr_token_parameter,
        "database_url_parameter": settings.database_url_parameter,
    }
    # The App's key only with an App; the registry token not for an image in ECR.
    optional = {"github_app_private_key_parameter"}
    if ecr_repository(settings) is not None:
        optional.add("ghcr_token_parameter")
    secret_changes = [
        plan_secret(
            name,
            parameter_key(ssm, name),
            key_arn,
            field in secrets,
            args.replace_secrets,
        )
        for field, name in names.items()
        if field in secrets or field not in optional
    ]

    # 4-5. The work pool and the deployments.
    template = process_base_job_template()
    pool_change = plan_work_pool(template)
    deploy_change = plan_deployments(args.redeploy)

    dry = args.dry_run
    print(f"Stack {args.stack} in {region}: {len(outputs)} outputs")
    _report(f"Prefect Variable {VARIABLE_NAME}:", config_changes, dry)
    _report("Secrets (SecureString, KMS key from the stack):", secret_changes, dry)
    _report("Prefect:", [pool_change, deploy_change], dry)
    changed = [
        c for c in [*config_changes, *secret_changes, pool_change, deploy_change] if c.changes
    ]
    if dry:
        print(
            f"\nDry run: {len(changed)} change(s) would be made; nothing was changed."
            if changed
            else "\nDry run: nothing to change."
        )
        return 0

    if any(c.changes for c in config_changes):
        write_variable(merged)
    by_name = {names[field]: secret for field, secret in secrets.items()}
    for change in secret_changes:
        if change.what == "store":
            store_secret(ssm, change.subject, by_name[change.subject], key_arn, args.stack)
    if pool_change.changes:
        create_work_pool(template)
    if deploy_change.changes:
        print("Running prefect deploy --all ...", flush=True)
        deploy_all(api_url)
    print(f"\n{len(changed)} change(s) made." if changed else "\nNothing changed: already set up.")

    # 6. The doctor, on what was just written.
    print()
    doctor = argparse.Namespace(region=settings.region, pr=None, repo=None)
    return cmd_doctor(doctor)
