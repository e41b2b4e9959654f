"""Diagnostics: runbook §7's failure signatures from realistic evidence, and secrets masked."""

from __future__ import annotations

import pytest

from tasks.app.masking import MASK, mask_secrets
from tasks.cloud.aws import AwsClients
from tasks.config import PreviewConfig
from tasks.steps.diagnose import (
    diagnose_evidence,
    diagnose_instance,
    evidence_sections,
    parameter_secrets,
)
from tests.support import CANARIES, CANARY_DATABASE_URL, CANARY_GHCR_TOKEN
from tests.support.ssm import (
    BOOTSTRAP_CHECK,
    PORT_CHECK,
    PORT_CLOSED,
    Reply,
    ScriptedInstances,
    bootstrap_failed,
    plain_instances,
)

SCRIPTS_USER_FAILED = (
    "2025-09-18 10:12:03,512 - cc_scripts_user.py[WARNING]: Failed to run module scripts-user"
    " (scripts in /var/lib/cloud/instance/scripts)\n"
    "2025-09-18 10:12:03,513 - util.py[WARNING]: Running module scripts-user (<module"
    " 'cloudinit.config.cc_scripts_user' from '/usr/lib/python3.9/site-packages/cloudinit/"
    "config/cc_scripts_user.py'>) failed\n"
)
# AL2023 has no docker-compose-plugin package (every boot prints the miss), then the release
# download fails and the user data stops at its compose step.
COMPOSE_PLUGIN_LOG = (
    "Last metadata expiration check: 0:00:02 ago on Thu Sep 18 10:12:01 2025.\n"
    "No match for argument: docker-compose-plugin\n"
    "Error: Unable to find a match: docker-compose-plugin\n"
    "curl: (6) Could not resolve host: github.com\n"
    "pr-preview bootstrap failed at step: compose (exit status 6)\n" + SCRIPTS_USER_FAILED
)
# The same miss on a boot that got Compose from the release and failed later, at `up`.
UP_FAILED_LOG = (
    "No match for argument: docker-compose-plugin\n"
    "Error: Unable to find a match: docker-compose-plugin\n"
    "Docker Compose version v2.40.3\n"
    "pr-preview bootstrap failed at step: up (exit status 1)\n" + SCRIPTS_USER_FAILED
)
DOCKER_MISSING_LOG = (
    "/var/lib/cloud/instance/scripts/part-001: line 14: docker: command not found\n"
    + SCRIPTS_USER_FAILED
)
GHCR_UNAUTHORIZED_LOG = (
    "Login Succeeded\n"
    " api Pulling \n"
    ' api Error Head "https://ghcr.io/v2/octo-org/app/manifests/0123abcd": unauthorized\n'
    'Error response from daemon: Head "https://ghcr.io/v2/octo-org/app/manifests/0123abcd":'
    " unauthorized\n"
    "pr-preview bootstrap failed at step: pull\n" + SCRIPTS_USER_FAILED
)
MANIFEST_UNKNOWN_LOG = (
    " api Pulling \n"
    "Error response from daemon: manifest for ghcr.io/octo-org/app:0123abcd not found:"
    " manifest unknown: manifest unknown\n"
)
DB_TIMEOUT_CONNECT = (
    "Traceback (most recent call last):\n"
    '  File "<stdin>", line 3, in <module>\n'
    'psycopg2.OperationalError: connection to server at "172.31.39.125", port 5432 failed:'
    " timeout expired\n"
)
PORT_ERROR_CONNECT = (
    "Traceback (most recent call last):\n"
    '  File "<stdin>", line 3, in <module>\n'
    'psycopg2.ProgrammingError: invalid dsn: invalid integer value "Canary" for connection'
    ' option "port"\n'
)
UNAUTHORIZED_OPERATION = (
    "An error occurred (UnauthorizedOperation) when calling the DescribeRouteTables operation:"
    " You are not authorized to perform this operation. User: arn:aws:sts::123456789012:"
    "assumed-role/github-oidc-pr-staging/prefect is not authorized to perform:"
    " ec2:DescribeRouteTables because no identity-based policy allows the ec2:DescribeRouteTables"
    " action"
)
EXITED_PS = (
    "NAME        IMAGE                           COMMAND                  SERVICE   CREATED"
    "         STATUS                     PORTS\n"
    'app-api-1   ghcr.io/octo-org/app:0123abcd   "uvicorn app.main:ap…"   api       2 minutes'
    " ago   Exited (1) 1 minute ago\n"
)

ONE_ACCOUNT_PER_MODULE = True  # see tests/conftest.py: aws, account, config


@pytest.mark.parametrize(
    ("evidence", "error", "key", "line"),
    [
        (
            {"cloud-init": COMPOSE_PLUGIN_LOG},
            None,
            "compose-plugin-missing",
            "pr-preview bootstrap failed at step: compose (exit status 6)",
        ),
        (
            {"cloud-init": UP_FAILED_LOG},
            None,
            "userdata-failed",
            "pr-preview bootstrap failed at step: up (exit status 1)",
        ),
        (
            {"cloud-init": DOCKER_MISSING_LOG, "compose-ps": "sh: docker: command not found"},
            None,
            "docker-missing",
            "sh: docker: command not found",
        ),
        (
            {"cloud-init": GHCR_UNAUTHORIZED_LOG},
            None,
            "ghcr-unauthorized",
            'Error response from daemon: Head "https://ghcr.io/v2/octo-org/app/manifests/'
            '0123abcd": unauthorized',
        ),
        (
            {"cloud-init": "+ docker compose up -d\n" + SCRIPTS_USER_FAILED},
            None,
            "userdata-failed",
            "2025-09-18 10:12:03,512 - cc_scripts_user.py[WARNING]: Failed to run module"
            " scripts-user (scripts in /var/lib/cloud/instance/scripts)",
        ),
        (
            {"db-tcp": "DB TCP NG 172.31.39.125:5432", "db-connect": DB_TIMEOUT_CONNECT},
            None,
            "db-sg-missing-rule",
            "DB TCP NG 172.31.39.125:5432",
        ),
        (
            {"db-tcp": "DB TCP OK 172.31.39.125:5432", "db-connect": PORT_ERROR_CONNECT},
            None,
            "database-url-encoding",
            'psycopg2.ProgrammingError: invalid dsn: invalid integer value "****" for'
            ' connection option "port"',
        ),
        ({}, UNAUTHORIZED_OPERATION, "unauthorized-operation", UNAUTHORIZED_OPERATION),
        (
            {"cloud-init": MANIFEST_UNKNOWN_LOG},
            None,
            "image-missing",
            "Error response from daemon: manifest for ghcr.io/octo-org/app:0123abcd not found:"
            " manifest unknown: manifest unknown",
        ),
        (
            {"app-port": "APP PORT CLOSED 8000", "compose-ps": EXITED_PS},
            "wait-ready stage 'app-port' did not finish within 600s",
            "app-not-listening",
            "APP PORT CLOSED 8000",
        ),
        (
            {"docker-service": "● docker.service - Docker\n   Active: inactive (dead)"},
            None,
            "docker-stopped",
            "Active: inactive (dead)",
        ),
        (
            {
                "db-connect": 'psycopg2.OperationalError: connection to server at "172.31.39.125",'
                ' port 5432 failed: FATAL:  password authentication failed for user "app"'
            },
            None,
            "db-auth",
            'psycopg2.OperationalError: connection to server at "172.31.39.125", port 5432'
            ' failed: FATAL:  password authentication failed for user "app"',
        ),
    ],
)
def test_signature_is_diagnosed(
    evidence: dict[str, str], error: str | None, key: str, line: str
) -> None:
    diagnosis = diagnose_evidence(evidence, error=error)

    assert diagnosis.key == key
    assert line in diagnosis.evidence_lines
    assert diagnosis.fix and diagnosis.cause


def test_the_most_upstream_cause_comes_first_and_the_rest_are_kept() -> None:
    diagnosis = diagnose_evidence(
        {
            "cloud-init": COMPOSE_PLUGIN_LOG,
            "bootstrap-marker": "bootstrap-failed\nbootstrap failed at step: compose",
            "app-port": "APP PORT CLOSED 8000",
        }
    )

    assert diagnosis.key == "compose-plugin-missing"
    assert "Compose v2" in diagnosis.fix
    assert [finding.key for finding in diagnosis.also] == ["userdata-failed", "app-not-listening"]
    assert "bootstrap failed at step: compose" in diagnosis.also[0].evidence_lines


def test_no_signature_says_so_and_shows_the_last_lines() -> None:
    diagnosis = diagnose_evidence({"compose-logs": "INFO: Uvicorn running on http://0.0.0.0:8000"})

    assert diagnosis.key is None
    assert "No failure signature" in diagnosis.cause
    assert diagnosis.evidence_lines == ["INFO: Uvicorn running on http://0.0.0.0:8000"]


def test_secrets_are_masked_in_every_shape() -> None:
    text = "\n".join(
        [
            f"DATABASE_URL={CANARY_DATABASE_URL}",
            f"+ echo {CANARY_GHCR_TOKEN}",
            "github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyz0123456789",
            "dsn: host=172.31.39.125 port=5432 user=app password=Canary/DbPassw0rd dbname=app",
            "DATABASE_URL=not-a-url-Canary/DbPassw0rd",
            'invalid integer value "Canary" for connection option "port"',
            "export GHCR_TOKEN=ghp_shortbutsecret",
        ]
    )

    masked = mask_secrets(text)

    for canary in (*CANARIES, "github_pat_11ABC", "ghp_shortbutsecret", '"Canary"'):
        assert canary not in masked
    assert "postgresql+asyncpg://app:****@172.31.39.125:5432/app" in masked
    assert "host=172.31.39.125" in masked  # what is not secret stays readable


def test_explicit_secrets_are_masked_in_their_encoded_and_decoded_forms() -> None:
    text = "connecting with Canary/DbPassw0rd\nraw Canary%2FDbPassw0rd\nfragment DbPassw0rd"

    masked = mask_secrets(text, [CANARY_DATABASE_URL])

    assert "Canary" not in masked and "DbPassw0rd" not in masked
    assert masked.count(MASK) == 3


def test_diagnosis_masks_secrets_in_evidence_and_markdown() -> None:
    evidence = {
        "compose-logs": f"api-1  | settings: DATABASE_URL={CANARY_DATABASE_URL}\n"
        "api-1  | sqlalchemy.exc.OperationalError: timeout expired",
        "cloud-init": f"+ echo {CANARY_GHCR_TOKEN}\n+ docker login ghcr.io -u octo-org"
        ' --password-stdin\nError response from daemon: Get "https://ghcr.io/v2/": denied: denied',
    }

    diagnosis = diagnose_evidence(evidence, secrets=[CANARY_DATABASE_URL, CANARY_GHCR_TOKEN])
    rendered = diagnosis.markdown() + diagnosis.summary()

    for canary in CANARIES:
        assert canary not in rendered
    assert diagnosis.key == "ghcr-unauthorized"
    assert "db-sg-missing-rule" in [finding.key for finding in diagnosis.also]
    assert "## Diagnosis" in rendered and "**Fix:**" in rendered


def test_diagnose_collects_runbook_evidence_over_ssm(
    aws: AwsClients, config: PreviewConfig, scripted_ssm: ScriptedInstances
) -> None:
    (instance,) = plain_instances(aws.ec2)
    scripted_ssm.on(r"ps -a", Reply(stdout=EXITED_PS))
    scripted_ssm.on(
        r"logs --no-color --tail=200 api",
        Reply(stdout=f"api-1  | DATABASE_URL={CANARY_DATABASE_URL}\napi-1  | {DB_TIMEOUT_CONNECT}"),
    )
    scripted_ssm.on(r"systemctl status docker", Reply(stdout="   Active: active (running)"))
    scripted_ssm.on(BOOTSTRAP_CHECK, bootstrap_failed("up"))
    scripted_ssm.on(r"tail -n 150", Reply(stdout=f"+ echo {CANARY_GHCR_TOKEN}\n"))
    scripted_ssm.on(PORT_CHECK, PORT_CLOSED)
    scripted_ssm.on(r"DB TCP", Reply(stdout="DB TCP NG 172.31.39.125:5432\n"))
    scripted_ssm.on(r"psycopg2", Reply(stdout=DB_TIMEOUT_CONNECT))

    diagnosis = diagnose_instance(
        aws.ssm, config, instance, secrets=parameter_secrets(aws.ssm, config)
    )

    assert diagnosis.key == "db-sg-missing-rule"
    assert "DB TCP NG 172.31.39.125:5432" in diagnosis.evidence_lines
    assert set(diagnosis.evidence) == {section.name for section in evidence_sections(config)}
    assert {"compose-ps", "compose-logs", "docker-service", "db-tcp", "db-connect"} <= set(
        diagnosis.evidence
    )
    rendered = diagnosis.markdown()
    for canary in CANARIES:
        assert canary not in rendered
        assert all(canary not in command for command in scripted_ssm.commands(instance))
    assert "Exited (1)" in rendered


def test_instance_without_ssm_is_diagnosed_as_unreachable(
    aws: AwsClients, config: PreviewConfig, scripted_ssm: ScriptedInstances
) -> None:
    (instance,) = plain_instances(aws.ec2)
    scripted_ssm.agent_offline(instance)

    diagnosis = diagnose_instance(
        aws.ssm, config, instance, error="wait-ready stage 'ssm-agent' ..."
    )

    assert diagnosis.key == "ssm-unreachable"


def test_ephemeral_database_skips_the_db_host_check(config: PreviewConfig) -> None:
    ephemeral = config.model_copy(update={"database": "ephemeral"})

    names = [section.name for section in evidence_sections(ephemeral)]

    assert "db-tcp" not in names and "db-connect" in names


def test_db_tcp_check_gives_bash_the_host_and_port_as_arguments(config: PreviewConfig) -> None:
    (section,) = [s for s in evidence_sections(config) if s.name == "db-tcp"]
    script = "\n".join(section.commands)

    assert """bash -c 'echo > "/dev/tcp/$1/$2"' tcp-check "$host" "$port\"""" in script
    # No data is spliced into a script bash parses again.
    for section in evidence_sections(config):
        assert 'bash -c "' not in "\n".join(section.commands)


def test_a_failed_deploy_stage_is_named_in_the_diagnosis() -> None:
    error = (
        "deploy of 9f8e7d6c5b4a on i-1: stage migrate failed (retrying cannot fix it), exit 1:"
        ' sqlalchemy.exc.ProgrammingError: relation "no_such_table" does not exist'
    )
    diagnosis = diagnose_evidence({}, error=error)

    assert (diagnosis.stage, diagnosis.key) == ("migrate", "migration-failed")
    assert diagnosis.summary().startswith("The deploy failed at its migrate stage.")
    assert "**Failed stage:** `migrate`" in diagnosis.markdown()
    assert diagnose_evidence({}, error="an SSM command timed out").stage is None
