"""A database of each preview's own (``database: per-preview``, tasks/cloud/databases.py).

- ``create_database`` — before the launch, beside the image check: the preview's
  ``DATABASE_URL`` is stored first (a SecureString under ``/pr-preview/databases``, tagged
  with the pull request), then the database host makes sure of role and database: created
  from ``template_database`` or empty, or kept as it is for a push and a relaunch.
- ``hand_over_database`` — once the instance exists: the parameter is tagged with the
  instance's ARN, the one instance whose role may read it (deployments/iam/).
- ``drop_database`` — with the preview: database (its connections cut), role, parameter.
- ``sweep_databases`` — the sweeper's: every preview database whose preview is gone, unless a
  run used it within a run's budget (it may be about to launch).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from botocore.exceptions import ClientError

from tasks.cloud.aws import AwsClients
from tasks.cloud.databases import (
    CREATE_REFUSED,
    NO_POSTGRES,
    NO_TEMPLATE,
    RESULT_LINE,
    ROLE_REFUSED,
    TEMPLATE_BUSY,
    DatabaseFailed,
    DatabaseHostUnreachable,
    DropFailed,
    PreviewDatabase,
    TemplateBusy,
    TemplateMissing,
    database_name,
    database_url,
    db_host_address,
    drop_commands,
    ensure_commands,
    instance_arn,
    list_commands,
    new_password,
    parse_listing,
    password_of,
    refresh_template_commands,
    scram_verifier,
    template_check_commands,
    unexpected,
)
from tasks.cloud.ssm import CommandResult, CommandTimeout, agent_not_registered, run_command
from tasks.cloud.tags import TAG_PR, TAG_PURPOSE, TAG_REPO, format_time, parse_time
from tasks.config import DATABASE_PARAMETER_PATH, PreviewConfig
from tasks.run.prefect_context import run_logger
from tasks.run.step import step

if TYPE_CHECKING:
    from mypy_boto3_ssm import SSMClient

logger = logging.getLogger(__name__)

# The parameter's tags: the instance whose role may read it, and when a run last used it.
TAG_PREVIEW_INSTANCE = "pr-preview:instance"
TAG_USED_AT = "pr-preview:used-at"
ADMIN_COMMENT = "pr-preview database"
TEMPLATE_LINE = re.compile(r"^pr-preview-template: (?P<size>\d+)$", re.MULTILINE)


@step(needs_lock=True)
def create_database(
    clients: AwsClients, settings: PreviewConfig, repo: str, pr_number: int
) -> PreviewDatabase:
    """Make sure ``repo#pr_number`` has its database, role and stored ``DATABASE_URL``."""
    name = database_name(repo, pr_number)
    parameter = settings.database_parameter(name)
    stored = _stored_value(clients.ssm, parameter)
    password = password_of(stored, name) if stored is not None else None
    password = password or new_password()
    url = database_url(settings, db_host_address(clients.ec2, settings), name, password)
    # The parameter first: the sweeper finds a database by its parameter, so none exists
    # without one.
    if stored is None:
        clients.ssm.put_parameter(
            Name=parameter,
            Value=url,
            Type="SecureString",
            Description=f"DATABASE_URL of the preview of {repo}#{pr_number}",
            Tags=[
                {"Key": TAG_PURPOSE, "Value": settings.purpose_tag},
                {"Key": TAG_REPO, "Value": repo},
                {"Key": TAG_PR, "Value": str(pr_number)},
                {"Key": TAG_USED_AT, "Value": format_time(datetime.now(UTC))},
            ],
        )
    else:
        if stored != url:  # another host, or a value that was not ours: ours now
            clients.ssm.put_parameter(
                Name=parameter, Value=url, Type="SecureString", Overwrite=True
            )
        _tag(clients.ssm, parameter, {TAG_USED_AT: format_time(datetime.now(UTC))})
    commands = ensure_commands(
        name, scram_verifier(password), settings.template_database, settings.template_wait_seconds
    )
    try:
        result = _on_db_host(clients.ssm, settings, commands, what=f"creating database {name}")
        found = RESULT_LINE.search(result.stdout) if result.ok else None
        if found is None:
            raise _admin_failure(settings, name, result)
    except Exception as failure:
        if stored is None:  # a failure leaves nothing behind: no role, no parameter
            _undo(clients.ssm, settings, name, failure)
        raise
    database = PreviewDatabase(
        name=name,
        parameter=parameter,
        created=found["state"] == "created",
        from_template=found["source"] == "template",
        size_bytes=int(found["size"]),
    )
    verb = "created" if database.created else "kept"
    source = f" from {settings.template_database}" if database.from_template else ""
    run_logger(logger).info(
        "%s database %s%s (%s) for %s#%d", verb, name, source, database.size(), repo, pr_number
    )
    return database


@step(needs_lock=True)
def hand_over_database(
    clients: AwsClients, settings: PreviewConfig, database: PreviewDatabase, instance_id: str
) -> str:
    """Let ``instance_id`` (alone) read the preview's ``DATABASE_URL``: its ARN on the
    parameter, which the instance role's policy matches against ``ec2:SourceInstanceARN``."""
    arn = instance_arn(clients.ec2, settings.region, instance_id)
    _tag(clients.ssm, database.parameter, {TAG_PREVIEW_INSTANCE: arn})
    return arn


@step(needs_lock=True)
def drop_database(clients: AwsClients, settings: PreviewConfig, repo: str, pr_number: int) -> str:
    """Drop the database and role of ``repo#pr_number`` and delete its parameter; nothing
    else is touched. Returns the database's name."""
    name = database_name(repo, pr_number)
    _drop(clients.ssm, settings, name)
    run_logger(logger).info("dropped database %s of %s#%d", name, repo, pr_number)
    return name


@dataclass
class DatabaseSweep:
    dropped: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


@step
def sweep_databases(
    clients: AwsClients,
    settings: PreviewConfig,
    live: list[tuple[str, int]],
    *,
    dry_run: bool = False,
    now: datetime | None = None,
) -> DatabaseSweep:
    """Drop every preview database whose preview is not in ``live`` (repo, PR) — the orphans
    of a killed run or of an instance its own timer ended — unless a run used it within a
    run's budget. Databases on the host and parameters are both looked at."""
    now = now or datetime.now(UTC)
    grace = timedelta(seconds=settings.preview_timeout_seconds())
    protected = {database_name(repo, number) for repo, number in live}
    parameters = _preview_parameters(clients.ssm, settings)
    for name, tags in parameters.items():
        used = parse_time(tags.get(TAG_USED_AT))
        if used is not None and now - used < grace:
            protected.add(name)
    on_host = preview_databases(clients, settings)
    sweep = DatabaseSweep()
    log = run_logger(logger)
    for name in sorted((set(parameters) | set(on_host)) - protected):
        if dry_run:
            log.info("would drop database %s: its preview is gone", name)
            sweep.dropped.append(name)
            continue
        try:
            _drop(clients.ssm, settings, name)
        except (DropFailed, ClientError, CommandTimeout) as exc:
            log.error("database %s not dropped: %s", name, exc)
            sweep.failed[name] = str(exc)
            continue
        log.info("dropped database %s: its preview is gone", name)
        sweep.dropped.append(name)
    sweep.kept = sorted(protected & (set(parameters) | set(on_host)))
    return sweep


@step(retry=False)
def refresh_template(
    clients: AwsClients,
    settings: PreviewConfig,
    *,
    source_database: str | None = None,
    dump_file: str | None = None,
) -> int:
    """Rebuild ``template_database`` from a database or a dump file on the host; the size."""
    template = settings.template_database
    if template is None:
        raise DatabaseFailed("set template_database first: the name the template gets")
    commands = refresh_template_commands(
        template, source_database=source_database, dump_file=dump_file
    )
    result = _on_db_host(clients.ssm, settings, commands, what=f"refreshing {template}")
    found = TEMPLATE_LINE.search(result.stdout) if result.ok else None
    if found is None:
        raise _admin_failure(settings, template, result)
    run_logger(logger).info("template %s refreshed (%s bytes)", template, found["size"])
    return int(found["size"])


def database_host_checks(
    clients: AwsClients, settings: PreviewConfig
) -> list[tuple[str, bool, str]]:
    """``pr-preview doctor``'s look at the database host: (check, passed, detail)."""
    checks: list[tuple[str, bool, str]] = []
    try:
        found = preview_databases(clients, settings)
    except DatabaseFailed as exc:
        return [("database host answers SSM and psql", False, str(exc))]
    checks.append(
        (
            "database host answers SSM and psql",
            True,
            f"{settings.db_instance_id}: {len(found)} preview database(s)",
        )
    )
    if settings.template_database:
        commands = template_check_commands(settings.template_database)
        result = _on_db_host(clients.ssm, settings, commands, what="looking for the template")
        checks.append(
            (
                "template database exists",
                result.ok,
                settings.template_database
                if result.ok
                else f"{settings.template_database} is missing: pr-preview refresh-template",
            )
        )
    return checks


def preview_databases(clients: AwsClients, settings: PreviewConfig) -> dict[str, int]:
    """Every preview database on the host, with its size in bytes."""
    commands = list_commands(settings.template_database)
    result = _on_db_host(clients.ssm, settings, commands, what="listing the preview databases")
    if not result.ok:
        raise _admin_failure(settings, "(list)", result)
    return parse_listing(result.stdout)


# --- helpers ---------------------------------------------------------------------------------


def _stored_value(ssm: SSMClient, parameter: str) -> str | None:
    try:
        found = ssm.get_parameter(Name=parameter, WithDecryption=True)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") == "ParameterNotFound":
            return None
        raise
    return found["Parameter"].get("Value")


def _tag(ssm: SSMClient, parameter: str, tags: dict[str, str]) -> None:
    ssm.add_tags_to_resource(
        ResourceType="Parameter",
        ResourceId=parameter,
        Tags=[{"Key": key, "Value": value} for key, value in tags.items()],
    )


def _drop(ssm: SSMClient, settings: PreviewConfig, name: str) -> None:
    """Database and role first, the parameter last: a failure in between leaves the
    parameter, by which the next sweep finds the rest."""
    result = _on_db_host(ssm, settings, drop_commands(name), what=f"dropping database {name}")
    if not result.ok:
        raise DropFailed(
            f"dropping database {name} failed on {settings.db_instance_id}:"
            f" {unexpected(result.stderr)}"
        )
    try:
        ssm.delete_parameter(Name=settings.database_parameter(name))
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") != "ParameterNotFound":
            raise


def _undo(ssm: SSMClient, settings: PreviewConfig, name: str, failure: Exception) -> None:
    """What a failed creation made goes again: role and database when the host answers, the
    parameter in any case."""
    if not isinstance(failure, DatabaseHostUnreachable | CommandTimeout):
        try:
            _drop(ssm, settings, name)
            return
        except (DropFailed, ClientError, CommandTimeout) as exc:
            run_logger(logger).warning("database %s not dropped after a failure: %s", name, exc)
    ssm.delete_parameter(Name=settings.database_parameter(name))


def _preview_parameters(ssm: SSMClient, settings: PreviewConfig) -> dict[str, dict[str, str]]:
    """The preview databases' parameters (by database name) with their tags."""
    found: dict[str, dict[str, str]] = {}
    paginator = ssm.get_paginator("describe_parameters")
    filters: Any = [{"Key": "Path", "Option": "OneLevel", "Values": [DATABASE_PARAMETER_PATH]}]
    for page in paginator.paginate(ParameterFilters=filters):
        for parameter in page.get("Parameters", []):
            name = parameter["Name"]
            tags = ssm.list_tags_for_resource(ResourceType="Parameter", ResourceId=name)
            found[name.rsplit("/", 1)[-1]] = {
                tag["Key"]: tag["Value"] for tag in tags.get("TagList", [])
            }
    return found


def _on_db_host(
    ssm: SSMClient, settings: PreviewConfig, commands: list[str], *, what: str
) -> CommandResult:
    """``commands`` on the database host; a host that is not on SSM is a named failure."""
    host = settings.db_instance_id
    if host is None:
        raise DatabaseFailed("database: per-preview needs db_instance_id")
    try:
        return run_command(
            ssm,
            host,
            commands,
            timeout_seconds=settings.migrate_timeout_seconds + settings.template_wait_seconds,
            poll_seconds=settings.poll_seconds,
            comment=ADMIN_COMMENT,
            not_found_grace_seconds=0,
        )
    except ClientError as exc:
        if agent_not_registered(exc):
            raise DatabaseHostUnreachable(
                f"{what}: the database host {host} is not registered with SSM — check that it"
                " runs, that its SSM agent is up and that its instance profile lets the agent"
                " register (pr-preview doctor checks it)"
            ) from None
        raise


def _admin_failure(settings: PreviewConfig, name: str, result: CommandResult) -> DatabaseFailed:
    detail = unexpected(result.stderr)
    host = settings.db_instance_id
    if result.exit_code == NO_TEMPLATE:
        return TemplateMissing(
            f"the template database {settings.template_database} does not exist on {host}:"
            " create it (pr-preview refresh-template) or unset template_database"
        )
    if result.exit_code == TEMPLATE_BUSY:
        return TemplateBusy(
            f"the template database {settings.template_database} on {host} kept a connection"
            f" open for {settings.template_wait_seconds:g} s ({detail}): PostgreSQL clones"
            " only a template nobody is connected to; close it, or set ALLOW_CONNECTIONS false"
            " on the template (pr-preview refresh-template does)"
        )
    if result.exit_code == NO_POSTGRES:
        return DatabaseFailed(f"{host} has no psql: is it the database host? ({detail})")
    what = {ROLE_REFUSED: "the role", CREATE_REFUSED: "the database"}.get(
        result.exit_code, "the database"
    )
    return DatabaseFailed(
        f"PostgreSQL on {host} refused {what} {name} (exit {result.exit_code}): {detail}"
    )
