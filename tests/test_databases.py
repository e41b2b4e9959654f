"""A database of each preview's own (``database: per-preview``): made on a real PostgreSQL
through the database host's SSM commands, kept across pushes, refused to other previews,
dropped with the preview and by the sweeper — and named failures that leave nothing behind."""

from __future__ import annotations

import os
import re
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

from flows.preview import pr_preview
from flows.sweeper import ttl_sweeper
from flows.teardown import pr_teardown
from local_stack.account import DemoAccount
from local_stack.db_host import DB_HOST_IP, DbHost
from local_stack.registry import FakeRegistry
from local_stack.scripted_instance import Reply, ScriptedInstances
from tasks.cloud.aws import AwsClients
from tasks.cloud.databases import (
    DatabaseHostUnreachable,
    TemplateBusy,
    TemplateMissing,
    database_name,
    password_of,
)
from tasks.config import ConfigError, PreviewConfig, load_config
from tasks.steps.database import (
    TAG_PREVIEW_INSTANCE,
    TAG_USED_AT,
    create_database,
    drop_database,
    sweep_databases,
)
from tests.support import CANARY_GHCR_TOKEN, REGION
from tests.support.iam_policy import Request, evaluate, load_policy
from tests.support.moto_state import user_data

REPO = "octo-org/app"
SHA1 = "1a2b3c4d5e6f7a8b9c0d1a2b3c4d5e6f7a8b9c0d"
SHA2 = "9f8e7d6c5b4a39281706f5e4d3c2b1a098765432"
INSTANCE_ROLE = Path(__file__).parents[1] / "deployments/iam/instance-role-policy.json"


@pytest.fixture
def per_preview(config: PreviewConfig, db_host: DbHost) -> PreviewConfig:
    config.db_instance_id = db_host.instance_id
    config.database = "per-preview"
    return config


def stored(aws: AwsClients, name: str) -> tuple[str, dict[str, str]]:
    """The preview's parameter as moto holds it: its value and tags."""
    parameter = f"/pr-preview/databases/{name}"
    value = aws.ssm.get_parameter(Name=parameter, WithDecryption=True)["Parameter"]["Value"]
    tags = aws.ssm.list_tags_for_resource(ResourceType="Parameter", ResourceId=parameter)
    return value, {tag["Key"]: tag["Value"] for tag in tags["TagList"]}


def parameters(aws: AwsClients) -> list[str]:
    found = aws.ssm.describe_parameters()["Parameters"]
    return sorted(p["Name"] for p in found if p["Name"].startswith("/pr-preview/databases/"))


def login(host: DbHost, url: str, database: str, sql: str = "select current_user") -> str:
    """``sql`` as the URL's role and password, over TCP, in ``database``: PostgreSQL decides."""
    role = re.match(r"[^:]+://([^:]+):", url)
    password = password_of(url, role.group(1) if role else "")
    assert role and password
    done = subprocess.run(
        [
            *(str(host.postgres.bin_dir / "psql"), "-X", "-qAt", "-h", host.postgres.host),
            *("-p", str(host.postgres.port), "-U", role.group(1), "-d", database, "-c", sql),
        ],
        env={**os.environ, "PGPASSWORD": password, "PGCONNECT_TIMEOUT": "5"},
        capture_output=True,
        text=True,
        check=False,
    )
    return (done.stdout + done.stderr).strip()


def test_names_are_strict_unique_and_fit_postgresql() -> None:
    names = {
        database_name(repo, number)
        for repo, number in [
            ("octo-org/app", 1),
            ("octo-org/app", 12),
            ("a-b/c", 1),
            ("a/b-c", 1),
            ("Octo-Org/My_App", 1),
            ("octo-org/my-app", 1),
            ("o" * 39 + "/" + "r" * 100, 99999),
        ]
    }
    assert len(names) == 7  # never two pull requests on one name
    for name in names:
        assert re.fullmatch(r"pr_[a-z0-9_]+_[0-9a-f]{8}_[0-9]+", name) and len(name) <= 63, name
    assert database_name("Octo-Org/App", 3) == database_name("octo-org/app", 3)  # as GitHub


def test_a_preview_database_is_made_kept_refused_to_others_and_dropped(
    aws: AwsClients, per_preview: PreviewConfig, db_host: DbHost, scripted_ssm: ScriptedInstances
) -> None:
    made = create_database(aws, per_preview, REPO, 7)
    assert (made.created, made.from_template) == (True, False)
    url, tags = stored(aws, made.name)
    assert (tags["Repo"], tags["PR"], tags["Purpose"]) == (REPO, "7", per_preview.purpose_tag)
    # The runbook's address of the host (its private IP in moto), the password URL-encoded.
    assert url.startswith(f"postgresql+asyncpg://{made.name}:") and f"@{DB_HOST_IP}:5432/" in url
    assert login(db_host, url, made.name) == made.name
    assert made.name in db_host.databases() and made.name in db_host.roles()

    # A push, a relaunch: the same database and password, its data kept.
    assert login(db_host, url, made.name, "create table kept (x int)") == ""
    again = create_database(aws, per_preview, REPO, 7)
    assert again.created is False and stored(aws, made.name)[0] == url
    assert login(db_host, url, made.name, "select count(*) from kept") == "0"

    # Another preview's role is refused at the door of this one's database.
    other = create_database(aws, per_preview, REPO, 8)
    other_url = stored(aws, other.name)[0]
    refused = login(db_host, other_url, made.name)
    assert "permission denied for database" in refused, refused

    # The password never reached the host: its commands hold the verifier only.
    sent = "\n".join(scripted_ssm.commands(db_host.instance_id))
    for secret in (password_of(url, made.name), password_of(other_url, other.name)):
        assert secret and secret not in sent
    assert "SCRAM-SHA-256$4096:" in sent

    assert drop_database(aws, per_preview, REPO, 7) == made.name
    assert made.name not in db_host.databases() and made.name not in db_host.roles()
    assert parameters(aws) == [f"/pr-preview/databases/{other.name}"]
    assert drop_database(aws, per_preview, REPO, 7) == made.name  # twice: nothing to do


def test_a_clone_of_the_template_is_the_previews_own(
    aws: AwsClients, per_preview: PreviewConfig, db_host: DbHost
) -> None:
    db_host.postgres.execute(
        "CREATE ROLE template_owner; CREATE DATABASE prod_copy OWNER template_owner;"
    )
    db_host.postgres.execute(
        "SET ROLE template_owner; CREATE TABLE items (id serial PRIMARY KEY, name text);"
        " INSERT INTO items (name) SELECT 'item ' || n FROM generate_series(1, 500) n;",
        database="prod_copy",
    )
    per_preview.template_database = "prod_copy"
    made = create_database(aws, per_preview, REPO, 9)
    assert (made.created, made.from_template) == (True, True)
    url = stored(aws, made.name)[0]
    # The production-like data, and a migration may change what the template's owner made.
    assert login(db_host, url, made.name, "select count(*) from items") == "500"
    assert login(db_host, url, made.name, "alter table items add column price int") == ""
    assert login(db_host, url, made.name, "select count(price) from items") == "0"
    assert login(db_host, url, made.name, "insert into items (name) values ('new')") == ""
    # The template itself is not the preview's to open.
    assert "permission denied" in login(db_host, url, "prod_copy")


def test_named_failures_leave_nothing_behind(
    aws: AwsClients, per_preview: PreviewConfig, db_host: DbHost, scripted_ssm: ScriptedInstances
) -> None:
    before = (db_host.databases(), db_host.roles())
    per_preview.template_database = "no_such_template"
    with pytest.raises(TemplateMissing, match="no_such_template does not exist"):
        create_database(aws, per_preview, REPO, 11)
    assert (db_host.databases(), db_host.roles()) == before and parameters(aws) == []

    # A connection to the template: the clone waits its bounded time, then says why.
    db_host.postgres.execute("CREATE DATABASE busy_template")
    holder = subprocess.Popen(
        [
            *(str(db_host.postgres.bin_dir / "psql"), "-X", "-h", db_host.postgres.host),
            *("-p", str(db_host.postgres.port), "-U", "postgres", "-d", "busy_template"),
            *("-c", "select pg_sleep(30)"),
        ],
        env={**os.environ, "PGPASSWORD": db_host.postgres.password},
    )
    try:
        deadline = time.monotonic() + 10
        while "busy_template" not in db_host.postgres.execute(
            "select datname from pg_stat_activity"
        ):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        per_preview.template_database = "busy_template"
        per_preview.template_wait_seconds = 1
        started = time.monotonic()
        with pytest.raises(TemplateBusy, match="kept a connection open for 1 s"):
            create_database(aws, per_preview, REPO, 12)
        assert time.monotonic() - started < 10
    finally:
        holder.kill()
        holder.wait()
    assert parameters(aws) == [] and database_name(REPO, 12) not in db_host.roles()

    # The host's agent is not registered: said so, before anything launches.
    per_preview.template_database = None
    scripted_ssm.agent_offline(db_host.instance_id)
    with pytest.raises(DatabaseHostUnreachable, match="not registered with SSM"):
        create_database(aws, per_preview, REPO, 13)
    assert parameters(aws) == []


def test_bad_database_settings_are_refused_at_load() -> None:
    with pytest.raises(ConfigError, match="needs db_instance_id"):
        load_config({"database": "per-preview"}, env={}, use_variable=False)
    with pytest.raises(ConfigError, match="template_database"):
        load_config(
            {"db_instance_id": "i-0123456789abcdef0", "template_database": "x" * 64},
            env={},
            use_variable=False,
        )
    with pytest.raises(ConfigError, match="env_parameter_path"):
        load_config(
            {"db_instance_id": "i-0123456789abcdef0", "env_parameter_path": "/pr-preview"},
            env={},
            use_variable=False,
        )
    # A database host makes per-preview the default; external stays a choice.
    host = {"db_instance_id": "i-0123456789abcdef0"}
    assert load_config(host, env={}, use_variable=False).database == "per-preview"
    chosen = load_config({**host, "database": "external"}, env={}, use_variable=False)
    assert chosen.database == "external"


def test_the_sweeper_drops_orphans_and_never_a_live_previews(
    aws: AwsClients, per_preview: PreviewConfig, db_host: DbHost
) -> None:
    live, orphan, fresh = (create_database(aws, per_preview, REPO, n) for n in (21, 22, 23))
    old = (datetime.now(UTC) - timedelta(hours=3)).strftime("%Y-%m-%dT%H:%M:%SZ")
    for made in (live, orphan):  # used long ago; the third is a run about to launch
        aws.ssm.add_tags_to_resource(
            ResourceType="Parameter",
            ResourceId=made.parameter,
            Tags=[{"Key": TAG_USED_AT, "Value": old}],
        )
    # A database whose parameter is gone already (a teardown cut off half way).
    db_host.postgres.execute(f'CREATE DATABASE "{database_name(REPO, 24)}"')
    dry = sweep_databases(aws, per_preview, [(REPO, 21)], dry_run=True)
    assert dry.dropped == sorted([orphan.name, database_name(REPO, 24)])
    assert orphan.name in db_host.databases()  # a dry run drops nothing

    swept = sweep_databases(aws, per_preview, [(REPO, 21)])
    assert swept.dropped == dry.dropped and not swept.failed
    assert set(swept.kept) == {live.name, fresh.name}
    left = db_host.databases()
    assert live.name in left and fresh.name in left
    assert orphan.name not in left and database_name(REPO, 24) not in left
    assert parameters(aws) == sorted([live.parameter, fresh.parameter])


@pytest.mark.usefixtures("prefect_server")
def test_two_previews_have_their_own_databases_and_only_their_instance_reads_the_url(
    aws: AwsClients,
    account: DemoAccount,
    per_preview: PreviewConfig,
    db_host: DbHost,
    registry: FakeRegistry,
    scripted_ssm: ScriptedInstances,
) -> None:
    per_preview.image = f"{registry.host}/octo-org/app"
    per_preview.max_previews = 3
    registry.users["octo-org"] = CANARY_GHCR_TOKEN
    for sha in (SHA1, SHA2):
        registry.push("octo-org/app", sha, private=True)
    scripted_ssm.healthy()
    with temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        first = pr_preview(REPO, 31, SHA1, action="opened", config=per_preview)
        second = pr_preview(REPO, 32, SHA2, action="opened", config=per_preview)
        pushed = pr_preview(REPO, 31, SHA2, action="synchronize", config=per_preview)
    assert (first.status, second.status, pushed.path) == ("ready", "ready", "in-place")
    a, b = database_name(REPO, 31), database_name(REPO, 32)
    assert first.database.startswith(f"`{a}` (") and "database" in first.markdown()
    url_a, tags_a = stored(aws, a)
    url_b, tags_b = stored(aws, b)
    # Each instance boots with its own preview's parameter, never the shared one.
    assert f"/pr-preview/databases/{a}" in user_data(aws, first.instance_id or "")
    assert per_preview.database_url_parameter not in user_data(aws, first.instance_id or "")
    # The parameters name their instances; IAM lets each instance read its own only.
    owner = aws.ec2.describe_instances(InstanceIds=[first.instance_id or ""])["Reservations"]
    arn_a = f"arn:aws:ec2:{REGION}:{owner[0]['OwnerId']}:instance/{first.instance_id}"
    assert tags_a[TAG_PREVIEW_INSTANCE] == arn_a
    assert tags_b[TAG_PREVIEW_INSTANCE].endswith(f"/{second.instance_id}")
    role = {"instance-role": load_policy(Path(INSTANCE_ROLE))}

    def read(parameter: str, tags: dict[str, str], by: str) -> str:
        context = {f"aws:ResourceTag/{k}": v for k, v in tags.items()}
        context["ec2:SourceInstanceARN"] = by
        resource = f"arn:aws:ssm:{REGION}:123456789012:parameter/pr-preview/databases/{parameter}"
        return evaluate(role, Request("ssm:GetParameter", resource, context)).decision

    assert read(a, tags_a, arn_a) == "allowed"
    assert read(b, tags_b, arn_a) == "explicitly denied"
    path = f"arn:aws:ssm:{REGION}:123456789012:parameter/pr-preview/databases"
    by_path = Request("ssm:GetParametersByPath", path, {"ec2:SourceInstanceARN": arn_a})
    assert evaluate(role, by_path).decision == "explicitly denied"
    # And PostgreSQL refuses A's role in B's database.
    assert "permission denied for database" in login(db_host, url_a, b)
    assert login(db_host, url_b, b) == b

    # Closing A leaves no database, role or parameter of A; B is untouched.
    with temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        closed = pr_teardown(REPO, 31, config=per_preview)
        assert closed.database == a
        # The image of a third PR is not there: its fresh database goes again, nothing launched.
        failed = pr_preview(REPO, 33, "0" * 40, config=per_preview, return_state=True)
    assert failed.is_failed()
    left = db_host.databases()
    assert a not in left and a not in db_host.roles() and b in left
    assert database_name(REPO, 33) not in left
    assert parameters(aws) == [f"/pr-preview/databases/{b}"]

    # B's instance is gone (its own timer, a killed run): the next sweep drops its database.
    aws.ec2.terminate_instances(InstanceIds=[second.instance_id or ""])
    aws.ssm.add_tags_to_resource(
        ResourceType="Parameter",
        ResourceId=f"/pr-preview/databases/{b}",
        Tags=[{"Key": TAG_USED_AT, "Value": "2026-01-01T00:00:00Z"}],
    )
    with temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        report = ttl_sweeper(config=per_preview)
    assert report.dropped_databases == [b]
    assert b not in db_host.databases() and parameters(aws) == []


def test_refresh_template_swaps_in_a_copy_no_one_can_open(
    aws: AwsClients,
    per_preview: PreviewConfig,
    db_host: DbHost,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    db_host.postgres.execute("CREATE DATABASE prod")
    db_host.postgres.execute(
        "CREATE TABLE people (id int PRIMARY KEY, email text);"
        " INSERT INTO people SELECT n, 'masked-' || n || '@example.invalid'"
        " FROM generate_series(1, 100) n;",
        database="prod",
    )
    per_preview.template_database = "prod_template"
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    from deployments import cli

    # doctor: the host answers, the template is missing and says how to make it.
    assert cli.main(["doctor"]) != 0
    said = capsys.readouterr().out
    assert "database host answers SSM and psql" in said
    assert "prod_template is missing: pr-preview refresh-template" in said

    assert cli.main(["refresh-template", "--from-database", "prod"]) == 0
    assert "Template prod_template" in capsys.readouterr().out
    allowed = db_host.postgres.execute(
        "SELECT datallowconn FROM pg_database WHERE datname = 'prod_template'"
    )
    assert allowed.strip() == "f"  # a clone never waits for a connection to it
    made = create_database(aws, per_preview, REPO, 41)
    url = stored(aws, made.name)[0]
    assert login(db_host, url, made.name, "select count(*) from people") == "100"
    assert login(db_host, url, made.name, "alter table people add column age int") == ""

    # Refreshed again from a changed source: new clones see it, the preview keeps its own.
    db_host.postgres.execute("DELETE FROM people WHERE id > 10", database="prod")
    assert cli.main(["refresh-template", "--from-database", "prod"]) == 0
    later = create_database(aws, per_preview, REPO, 42)
    assert (
        login(db_host, stored(aws, later.name)[0], later.name, "select count(*) from people")
        == "10"
    )
    assert login(db_host, url, made.name, "select count(*) from people") == "100"
    capsys.readouterr()
    assert cli.main(["doctor"]) in (0, 1)  # the account's preflight is moto's business
    assert re.search(r"ok\s+template database exists\s+prod_template", capsys.readouterr().out)
    # A name that is not a PostgreSQL name never reaches the host.
    assert cli.main(["refresh-template", "--from-database", "prod; drop database prod"]) == 2
    assert "a PostgreSQL name" in capsys.readouterr().err and "prod" in db_host.databases()
    # Nor below the command line: a connection string is no database name to pg_dump.
    from tasks.cloud.databases import refresh_template_commands

    with pytest.raises(ValueError, match="not a PostgreSQL name"):
        refresh_template_commands("prod_template", source_database="host=evil dbname=x")


@pytest.mark.usefixtures("prefect_server")
def test_a_claimed_spare_reads_the_database_of_the_pr_that_claimed_it(
    aws: AwsClients,
    per_preview: PreviewConfig,
    db_host: DbHost,
    registry: FakeRegistry,
    scripted_ssm: ScriptedInstances,
) -> None:
    """A spare boots with no database (it serves no PR yet); the claim hands it the PR's
    parameter, and the deploy on it writes app.env from that parameter."""
    from tasks.cloud.run_instances import resolve_ami
    from tasks.steps.spares import replenish_spares
    from tests.support.moto_state import ssm_commands

    per_preview.image = f"{registry.host}/octo-org/app"
    registry.users["octo-org"] = CANARY_GHCR_TOKEN
    registry.push("octo-org/app", SHA1, private=True)
    scripted_ssm.healthy()
    scripted_ssm.on(r"echo spare-ready", Reply(stdout="spare-ready\n"))
    per_preview.warm_spares = 1
    ami = str(resolve_ami(aws.ec2, per_preview)["ImageId"])
    [spare] = replenish_spares(
        aws.ec2, per_preview, ami_id=ami, subnet_id=per_preview.subnet_id
    ).launched
    assert "/pr-preview/databases/" not in user_data(aws, spare)

    with temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        claimed = pr_preview(REPO, 51, SHA1, action="opened", config=per_preview)

    assert (claimed.path, claimed.instance_id) == ("spare", spare)
    name = database_name(REPO, 51)
    assert stored(aws, name)[1][TAG_PREVIEW_INSTANCE].endswith(f"/{spare}")
    [deploy] = [text for text in ssm_commands(aws, spare) if "APP_IMAGE=" in text]
    assert f"param /pr-preview/databases/{name}" in deploy and "app.env" in deploy
    assert name in db_host.databases()


def test_the_instance_roles_deny_covers_the_path_the_code_writes() -> None:
    """The Deny that keeps each preview's URL to its own instance names the path the flow
    writes the parameters under, and the path itself (GetParametersByPath)."""
    from tasks.config import DATABASE_PARAMETER_PATH

    policy = load_policy(INSTANCE_ROLE)
    [deny] = [s for s in policy["Statement"] if "databases" in str(s.get("Resource"))]
    assert deny["Effect"] == "Deny" and deny["Action"] == "ssm:GetParameter*"
    assert sorted(deny["Resource"]) == [
        f"arn:aws:ssm:*:*:parameter{DATABASE_PARAMETER_PATH}",
        f"arn:aws:ssm:*:*:parameter{DATABASE_PARAMETER_PATH}/*",
    ]
    settings = PreviewConfig.model_validate({"db_instance_id": "i-0123456789abcdef0"})
    assert settings.database_parameter("pr_x_1").startswith(DATABASE_PARAMETER_PATH + "/")


@pytest.mark.usefixtures("prefect_server")
def test_a_sweep_with_the_database_host_away_still_reports_and_fails(
    aws: AwsClients, per_preview: PreviewConfig, db_host: DbHost, scripted_ssm: ScriptedInstances
) -> None:
    scripted_ssm.agent_offline(db_host.instance_id)
    with temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        state = ttl_sweeper(config=per_preview, return_state=True)
    assert state.is_failed()
    assert "1 databases not dropped" in (state.message or "")
