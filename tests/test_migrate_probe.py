"""migrate and probe over SSM against a scripted instance."""

from __future__ import annotations

import pytest

from tasks.cloud.aws import AwsClients
from tasks.cloud.on_instance import probe_command
from tasks.config import PreviewConfig
from tasks.steps.migrate import MigrationFailed, migrate_commands, run_migrations
from tasks.steps.probe import ProbeFailed, probe_app
from tests.support.ssm import MIGRATE, PROBE, Reply, ScriptedInstances, probe_answer

DB_NOT_READY = Reply(
    stderr=(
        "sqlalchemy.exc.OperationalError: (psycopg2.OperationalError) connection to server at"
        ' "172.31.39.125", port 5432 failed: Connection refused\n'
        "\tIs the server running on that host and accepting TCP/IP connections?\n"
    ),
    exit_code=1,
)
MIGRATED = Reply(
    stdout="INFO  [alembic.runtime.migration] Running upgrade  -> 1a2b3c, create users\n"
)

COMPOSE = (
    "docker compose --project-directory /srv/app -f /srv/app/docker-compose.yml"
    " --env-file /srv/app/.env"
)
ONE_ACCOUNT_PER_MODULE = True  # see tests/conftest.py: aws, account, config


def test_migrate_fails_twice_then_passes(
    aws: AwsClients, config: PreviewConfig, scripted_ssm: ScriptedInstances, instance: str
):
    scripted_ssm.on(MIGRATE, DB_NOT_READY, DB_NOT_READY, MIGRATED)

    result = run_migrations(aws.ssm, config, instance)

    assert result.attempts == 3
    assert "Running upgrade" in result.output
    (command,) = set(scripted_ssm.commands(instance, MIGRATE))
    assert f"{COMPOSE} run --rm -T api alembic upgrade head" in command


def test_migrate_gives_up_at_its_timeout(
    aws: AwsClients, config: PreviewConfig, scripted_ssm: ScriptedInstances, instance: str
):
    scripted_ssm.on(MIGRATE, DB_NOT_READY)

    with pytest.raises(MigrationFailed) as raised:
        run_migrations(aws.ssm, config, instance, timeout_seconds=0.2)

    assert raised.value.attempts >= 2
    assert "Connection refused" in raised.value.output


def test_migrate_stops_at_once_when_waiting_cannot_help(
    aws: AwsClients, config: PreviewConfig, scripted_ssm: ScriptedInstances, instance: str
):
    scripted_ssm.on(
        MIGRATE,
        Reply(
            stderr='psycopg2.ProgrammingError: invalid integer value "****" for connection'
            ' option "port"\n',
            exit_code=1,
        ),
    )

    with pytest.raises(MigrationFailed) as raised:
        run_migrations(aws.ssm, config, instance)

    assert raised.value.attempts == 1


def test_probe_falls_back_from_healthz_to_docs(
    aws: AwsClients, config: PreviewConfig, scripted_ssm: ScriptedInstances, instance: str
):
    scripted_ssm.on(PROBE + "healthz", probe_answer(404, 0.002))
    scripted_ssm.on(PROBE + "docs", probe_answer(200, 0.031))

    result = probe_app(aws.ssm, config, instance)

    assert (result.path, result.status_code, result.latency_seconds) == ("/docs", 200, 0.031)
    assert [(answer.path, answer.status_code) for answer in result.answers] == [
        ("/healthz", 404),
        ("/docs", 200),
    ]
    assert result.attempts == 1


def test_a_health_check_that_says_unavailable_is_not_overruled_by_docs(
    aws: AwsClients, config: PreviewConfig, scripted_ssm: ScriptedInstances, instance: str
):
    """/healthz answering 503 (its database away) is the app's word: not ready, however well
    /docs answers; once /healthz says 200, it is."""
    scripted_ssm.on(PROBE + "healthz", probe_answer(503), probe_answer(503), probe_answer(200))
    scripted_ssm.on(PROBE + "docs", probe_answer(200))

    result = probe_app(aws.ssm, config, instance)

    assert (result.path, result.status_code, result.attempts) == ("/healthz", 200, 3)
    assert [answer.path for answer in result.answers] == ["/healthz"] * 3
    assert scripted_ssm.count(PROBE + "docs", instance) == 0


def test_probe_uses_healthz_when_it_answers(
    aws: AwsClients, config: PreviewConfig, scripted_ssm: ScriptedInstances, instance: str
):
    result = probe_app(aws.ssm, config, instance)

    assert (result.path, result.status_code) == ("/healthz", 200)
    assert scripted_ssm.count(PROBE + "docs", instance) == 0
    (command,) = scripted_ssm.commands(instance, PROBE)
    assert "http://127.0.0.1:8000/healthz" in command


def test_probe_retries_until_the_app_answers(
    aws: AwsClients, config: PreviewConfig, scripted_ssm: ScriptedInstances, instance: str
):
    scripted_ssm.on(PROBE + "healthz", probe_answer(0), probe_answer(0), probe_answer(200))
    scripted_ssm.on(PROBE + "docs", probe_answer(0))

    result = probe_app(aws.ssm, config, instance)

    assert result.attempts == 3
    assert result.answers[0].error.startswith("curl: (7)")
    assert result.answers[0].latency_seconds is None


def test_probe_fails_at_its_deadline_with_every_answer(
    aws: AwsClients, config: PreviewConfig, scripted_ssm: ScriptedInstances, instance: str
):
    scripted_ssm.on(PROBE + "healthz", probe_answer(404))
    scripted_ssm.on(PROBE + "docs", probe_answer(502))

    with pytest.raises(ProbeFailed) as raised:
        probe_app(aws.ssm, config, instance, timeout_seconds=0.1)

    assert {answer.status_code for answer in raised.value.answers} == {404, 502}
    assert "/docs → 502" in str(raised.value)


def test_migration_command_is_quoted_word_by_word(config: PreviewConfig) -> None:
    """A command by design, but the container's: no shell on the instance interprets it."""
    risky = config.model_copy(update={"migration_command": "alembic upgrade head; reboot $(id)"})

    [command] = [line for line in migrate_commands(risky) if " run --rm " in line]

    assert command.endswith(
        " run --rm -T api alembic upgrade 'head;' reboot '$(id)' >\"$log\" 2>&1 || status=$?"
    )


def test_probe_url_is_one_quoted_word() -> None:
    (command,) = probe_command(8000, "/health'$(id)'")

    assert command.endswith(""" 'http://127.0.0.1:8000/health'"'"'$(id)'"'"''""")
