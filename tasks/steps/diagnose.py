"""Why a preview failed, in the words of the runbook's failure table (§7), from the evidence
§9 says to collect over SSM.

:func:`collect_evidence` runs one read-only command per section (compose state and logs,
docker's unit, the cloud-init log, the bootstrap marker, the app port, TCP to the database
host from ``app.env``, and §0's psycopg2 connect inside the app container).
:func:`diagnose_evidence` matches the text against :data:`SIGNATURES`, most upstream cause
first, and returns a :class:`Diagnosis`: cause, the evidence lines, the fix. Every line is
masked before it is kept: URL passwords, GitHub tokens, ``password=``-style values and any
value the caller names.
"""

from __future__ import annotations

import logging
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from botocore.exceptions import BotoCoreError, ClientError
from prefect.artifacts import create_markdown_artifact

from tasks.app.masking import mask_secrets
from tasks.app.secrets import read_secrets
from tasks.cloud.aws import AwsClients
from tasks.cloud.on_instance import (
    BOOTSTRAP_CHECK,
    CLOUD_INIT_LOG,
    FAILED_STAGE,
    TCP_CHECK_DIRECTIVE,
    compose_command,
    port_check,
    tcp_check,
)
from tasks.cloud.ssm import CommandTimeout, send_shell, wait_command
from tasks.config import PreviewConfig
from tasks.run.prefect_context import run_logger
from tasks.run.step import step

if TYPE_CHECKING:
    from mypy_boto3_ssm import SSMClient

logger = logging.getLogger(__name__)

EVIDENCE_LINES_PER_FINDING = 8
LOG_BYTES = 20000  # StandardOutputContent keeps 24,000 characters; keep the end of a log

# --- evidence ------------------------------------------------------------------------------

# Runbook §5's TCP check against the host:port of DATABASE_URL, read on the instance; only
# the host and port are printed. The last '@' ends the user info, as it does for libpq. The
# host and port are data from app.env: they reach bash's /dev/tcp as arguments, never as script.
DB_TCP_SCRIPT = (
    "url=$(sed -n '/^DATABASE_URL=/{s///p;q;}' {app_dir}/app.env 2>/dev/null) || url=''",
    'if [ -z "$url" ]; then',
    '  echo "DB TCP SKIPPED: no DATABASE_URL in app.env"',
    "else",
    "  hostport=$(printf '%s' \"$url\" | sed -E 's#^[^:]*://##; s#^.*@##; s#[/?].*$##')",
    "  host=${hostport%%:*}",
    "  port=5432",
    '  case "$hostport" in',
    "    *:*) port=${hostport##*:} ;;",
    "    *) ;;",
    "  esac",
    "  " + TCP_CHECK_DIRECTIVE,
    # A refusal (nothing listens) and a timeout (a security group drops the packets) have
    # different fixes: say which one it was.
    "  if err=$(" + tcp_check('"$host"', '"$port"') + " 2>&1); then",
    '    echo "DB TCP OK $host:$port"',
    "  elif [ $? = 124 ]; then",
    '    echo "DB TCP NG $host:$port (timed out)"',
    "  else",
    '    echo "DB TCP NG $host:$port (${err##*: })"',
    "  fi",
    "fi",
)


@dataclass(frozen=True)
class Section:
    name: str
    title: str
    commands: tuple[str, ...]


def evidence_sections(settings: PreviewConfig) -> list[Section]:
    """Runbook §9 (and §0, §5, §8): what to read on the instance when a preview fails."""
    app_dir = shlex.quote(settings.app_dir)
    compose = compose_command(settings.app_dir)
    service = shlex.quote(settings.app_service)
    sections = [
        Section("compose-ps", f"{compose} ps -a", (f"{compose} ps -a 2>&1 || true",)),
        Section(
            "compose-logs",
            f"{compose} logs --tail=200 {service}",
            (f"{compose} logs --no-color --tail=200 {service} 2>&1 | tail -c {LOG_BYTES} || true",),
        ),
        Section(
            "docker-service",
            "systemctl status docker",
            ("systemctl status docker --no-pager 2>&1 | head -n 30 || true",),
        ),
        Section("bootstrap-marker", "bootstrap marker", tuple(BOOTSTRAP_CHECK)),
        Section(
            "cloud-init-status",
            "cloud-init status --long",
            ("cloud-init status --long 2>&1 | head -n 20 || true",),
        ),
        Section(
            "cloud-init",
            f"tail {CLOUD_INIT_LOG}",
            (f"tail -n 150 {CLOUD_INIT_LOG} 2>&1 | tail -c {LOG_BYTES} || true",),
        ),
        Section(
            "cloud-init-errors",
            f"error lines of {CLOUD_INIT_LOG}",
            (
                "grep -n -i -E 'No match for argument|command not found|unauthorized|denied"
                "|manifest unknown|scripts-user|bootstrap failed|error|fail'"
                f" {CLOUD_INIT_LOG} 2>&1 | tail -n 40 || true",
            ),
        ),
        Section(
            "app-port",
            f"TCP 127.0.0.1:{settings.app_port}",
            tuple(port_check(settings.app_port)),
        ),
    ]
    if settings.database == "external":
        sections.append(
            Section(
                "db-tcp",
                "TCP to the database host in app.env",
                tuple(line.replace("{app_dir}", app_dir) for line in DB_TCP_SCRIPT),
            )
        )
    sections.append(
        Section(
            "db-connect",
            "psycopg2 connect inside the app container (runbook §0)",
            (
                f"timeout 30 {compose} exec -T {service} python - <<'PY' 2>&1 || true",
                "import os, psycopg2",
                'url = os.environ["DATABASE_URL"].replace("+asyncpg", "")',
                'psycopg2.connect(url, connect_timeout=5).close(); print("DB CONNECT OK")',
                "PY",
            ),
        )
    )
    return sections


def collect_evidence(
    ssm: SSMClient,
    settings: PreviewConfig,
    instance_id: str,
    *,
    timeout_seconds: float = 60.0,
    poll_seconds: float | None = None,
) -> dict[str, str]:
    """Each section's output (unmasked) by name. Sections are sent together and then awaited;
    one that cannot run says why in its text instead of raising — this runs while failing."""
    poll = min(settings.poll_seconds, 1.0) if poll_seconds is None else poll_seconds
    evidence: dict[str, str] = {}
    sent: list[tuple[Section, str]] = []
    for section in evidence_sections(settings):
        try:
            command_id = send_shell(
                ssm,
                instance_id,
                section.commands,
                timeout_seconds=timeout_seconds,
                comment=f"pr-preview diagnose: {section.name}",
            )
        except (ClientError, BotoCoreError) as exc:
            evidence[section.name] = f"(SSM could not run this: {exc})"
            continue
        sent.append((section, command_id))
    for section, command_id in sent:
        try:
            result = wait_command(
                ssm,
                command_id,
                instance_id,
                timeout_seconds=timeout_seconds,
                poll_seconds=poll,
            )
        except (ClientError, BotoCoreError, CommandTimeout) as exc:
            evidence[section.name] = f"(SSM could not run this: {exc})"
            continue
        evidence[section.name] = result.output
    return evidence


# --- signatures ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Signature:
    """One row of runbook §7 (or an extra we met since): how it shows, what it means, the fix."""

    key: str
    pattern: re.Pattern[str]
    cause: str
    fix: str
    sections: tuple[str, ...] = ()  # empty: every section


def _sig(key: str, pattern: str, cause: str, fix: str, *sections: str) -> Signature:
    return Signature(key, re.compile(pattern, re.IGNORECASE), cause, fix, sections)


# Most upstream cause first: a missing docker also fails the user data and closes the port.
SIGNATURES: tuple[Signature, ...] = (
    _sig(
        "unauthorized-operation",
        r"UnauthorizedOperation|is not authorized to perform: (?:ec2|iam):",
        "The AWS role or instance profile lacks a permission (runbook §7: UnauthorizedOperation).",
        "Add the missing action to the role (ec2:Describe*, ec2:RunInstances, iam:PassRole on"
        " the instance profile, ...); see deployments/iam/ and rerun preflight.",
    ),
    _sig(
        "compose-plugin-missing",
        # Not dnf's "No match for argument: docker-compose-plugin": every AL2023 boot prints
        # it on the way to the release download.
        r"bootstrap failed at step: compose\b|'compose' is not a docker command"
        r"|unknown shorthand flag: 'f' in -f",
        "Docker Compose v2 is missing: AL2023 has no docker-compose-plugin package (runbook §7).",
        "Place the Compose v2 release binary in /usr/local/lib/docker/cli-plugins/docker-compose"
        " (runbook §3); the user data does this when `docker compose version` fails.",
    ),
    _sig(
        "docker-missing",
        r"docker: command not found|docker: not found|Unit docker\.service (?:could not be found"
        r"|not found)",
        "Docker is not installed (runbook §7: docker: command not found).",
        "`dnf -y install docker` then `systemctl enable --now docker`; check the docker step of"
        " the user data in /var/log/cloud-init-output.log.",
    ),
    _sig(
        "docker-stopped",
        r"Cannot connect to the Docker daemon|Active: (?:inactive|failed)",
        "The Docker service is not running.",
        "`systemctl enable --now docker`; `journalctl -u docker` says why it stopped.",
    ),
    _sig(
        "parameter-access-denied",
        r"AccessDeniedException.*GetParameter|not authorized to perform: ssm:GetParameter"
        r"|ParameterNotFound",
        "The instance could not read a Parameter Store value (GHCR token or DATABASE_URL).",
        "Check that the parameter exists and that the instance profile may ssm:GetParameter it"
        " (and kms:Decrypt for a customer key).",
    ),
    _sig(
        "ecr-login",
        r"no basic auth credentials|when calling the GetAuthorizationToken operation"
        r"|not authorized to perform: ecr:|Your authorization token has expired",
        "ECR refused the pull: the instance did not log in to ECR, or its role may not"
        " (ecr:GetAuthorizationToken, then ecr:BatchGetImage and ecr:GetDownloadUrlForLayer on"
        " the repository).",
        "Give the instance role deployments/iam/instance-role-policy.json with ECR_REPOSITORY"
        " replaced by the image's repository, and rerun; the instance logs in with"
        " `aws ecr get-login-password | docker login --password-stdin`.",
    ),
    _sig(
        "ghcr-unauthorized",
        r"\bunauthorized\b|denied: (?:denied|permission_denied|requested access)"
        r"|pull access denied",
        "GHCR refused the pull: `docker login ghcr.io` did not happen on the instance or the PAT"
        " lacks read:packages (runbook §4, §7).",
        "Store a PAT with read:packages in the GHCR token parameter and relaunch; the user data"
        " logs in with `docker login ghcr.io --password-stdin`.",
    ),
    _sig(
        "image-missing",
        r"manifest unknown|manifest for \S+ not found|not found: manifest",
        "The image tag does not exist on GHCR (the build has not pushed :<sha> yet, or failed).",
        "Wait for the image build to push ghcr.io/<owner>/<repo>:<sha>, then rerun the preview.",
    ),
    _sig(
        "database-url-encoding",
        r"invalid integer value .{0,200}for connection option .?port"
        r"|Port could not be cast to integer|invalid literal for int\(\) with base 10",
        "DATABASE_URL does not parse: a symbol in the password is not URL-encoded"
        " (runbook §5, §7).",
        "URL-encode the password (`/` → `%2F`, `@` → `%40`, `:` → `%3A`), update the DATABASE_URL"
        " parameter and rerun.",
    ),
    _sig(
        "db-sg-missing-rule",
        r"DB TCP NG \S+(?: \(timed out\))?$|timeout expired|Connection timed out.{0,80}5432"
        r"|5432.{0,80}timed out"
        r"|could not connect to server: Connection timed out",
        "The database does not answer on 5432 from the preview: db-sg lacks the api-sg rule"
        " (runbook §7: DB timeout).",
        "Allow api-sg on 5432 in db-sg: `aws ec2 authorize-security-group-ingress --group-id"
        " <db-sg> --protocol tcp --port 5432 --source-group <api-sg>` (runbook §5).",
    ),
    _sig(
        "db-refused",
        r"Connection refused.{0,120}5432|5432.{0,120}Connection refused"
        r"|DB TCP NG \S+ \(Connection refused\)",
        "The database host answers but nothing accepts on 5432 (PostgreSQL down or not listening"
        " on the private address).",
        "On db-server: `systemctl status postgresql`, `listen_addresses` and pg_hba.conf for the"
        " VPC range.",
    ),
    _sig(
        "db-auth",
        r"password authentication failed|no pg_hba\.conf entry",
        "PostgreSQL refused the credentials in DATABASE_URL.",
        "Check the user and password in the DATABASE_URL parameter against the database.",
    ),
    _sig(
        "seed-failed",
        r"seed command failed",
        "The seed command (seed_command) failed after the migrations ran.",
        "Read the seed's output in the run's log, fix the seed (or seed_command) and push: the"
        " next deploy seeds again, as this instance was never marked seeded.",
    ),
    _sig(
        "migration-failed",
        r"sqlalchemy\.exc\.(?:ProgrammingError|DataError|IntegrityError|NotSupportedError)"
        r"|alembic\.util\.exc\.CommandError|Can't locate revision",
        "A migration failed against the database: the database rejected a revision (or alembic"
        " could not find one).",
        "Read the error above, fix the revision in the PR and push; to see the whole traceback,"
        " run `docker compose run --rm -T api alembic upgrade head` on the instance over SSM.",
    ),
    _sig(
        "disk-full",
        r"no space left on device",
        "The instance's disk is full (images and layers).",
        "Use a larger root volume or prune images (`docker system prune -af`).",
    ),
    _sig(
        "userdata-failed",
        r"scripts-user.{0,80}fail|fail.{0,80}scripts-user|bootstrap failed at step|"
        r"bootstrap-failed at step",
        "The user data stopped part way (runbook §7: cloud-init scripts-user failed).",
        "Find the failed step in /var/log/cloud-init-output.log, reproduce it by hand over SSM,"
        " fix the user data and relaunch.",
    ),
    _sig(
        "app-not-listening",
        r"APP PORT CLOSED|Exited \((?:[1-9]\d*)\)|Restarting \(",
        "The app is not listening on its port: the container exited or is restarting.",
        "Read `docker compose logs api` (below) for the traceback; check the command and the"
        " port mapping 127.0.0.1:8000:8000.",
    ),
    _sig(
        "ssm-unreachable",
        r"SSM could not run this|InvalidInstanceId|not in a valid state",
        "The instance does not answer over SSM (agent not registered, no route to SSM, or the"
        " instance profile's role lacks the agent's permissions).",
        "Check that the instance profile's role has"
        " deployments/iam/instance-ssm-agent-policy.json, and the subnet's route to the SSM"
        " endpoints; the console output (`aws ec2 get-console-output`) shows the boot.",
    ),
)


@dataclass(frozen=True)
class Finding:
    key: str
    cause: str
    fix: str
    evidence_lines: tuple[str, ...]


@dataclass(frozen=True)
class Diagnosis:
    """The first matching signature (cause, evidence lines, fix), the others that also
    matched, and the masked evidence they were read from."""

    cause: str
    evidence_lines: list[str]
    fix: str
    key: str | None = None
    also: list[Finding] = field(default_factory=list)
    evidence: dict[str, str] = field(default_factory=dict)
    instance_id: str | None = None
    stage: str | None = None  # the deploy command's stage that failed, when one did

    def summary(self) -> str:
        """One paragraph for a failure message or PR comment."""
        text = f"{self.cause} Fix: {self.fix}"
        if self.stage:
            text = f"The deploy failed at its {self.stage} stage. {text}"
        if self.evidence_lines:
            text += f" Evidence: `{self.evidence_lines[0]}`"
        return text

    def markdown(self) -> str:
        where = f" on `{self.instance_id}`" if self.instance_id else ""
        lines = [
            f"## Diagnosis{where}",
            "",
            *([f"**Failed stage:** `{self.stage}`", ""] if self.stage else []),
            f"**Cause:** {self.cause}",
            "",
            f"**Fix:** {self.fix}",
            "",
        ]
        if self.evidence_lines:
            lines += ["**Evidence:**", "", "```", *self.evidence_lines, "```", ""]
        if self.also:
            lines += ["**Also seen:**", ""]
            lines += [f"- `{item.key}`: {item.cause} Fix: {item.fix}" for item in self.also]
            lines.append("")
        if self.evidence:
            lines += ["<details><summary>Collected evidence (runbook §9)</summary>", ""]
            for name, text in self.evidence.items():
                lines += [f"### {name}", "", "```", text.rstrip() or "(no output)", "```", ""]
            lines += ["</details>", ""]
        return "\n".join(lines)


UNKNOWN_CAUSE = "No failure signature of runbook §7 matched."
UNKNOWN_FIX = (
    "Read the collected evidence below; run the runbook §0 checks by hand over SSM"
    " (`aws ssm start-session --target <instance>`)."
)


def diagnose_evidence(
    evidence: Mapping[str, str],
    *,
    error: BaseException | str | None = None,
    secrets: Sequence[str] = (),
    instance_id: str | None = None,
) -> Diagnosis:
    """Match masked ``evidence`` (section name → text) and the failing step's ``error``
    against :data:`SIGNATURES`."""
    masked = {name: mask_secrets(text, secrets) for name, text in evidence.items()}
    sources = dict(masked)
    stage = FAILED_STAGE.search(str(error or ""))
    if error is not None:
        sources = {"error": mask_secrets(str(error), secrets), **sources}
    findings: list[Finding] = []
    for signature in SIGNATURES:
        lines: list[str] = []
        for name, text in sources.items():
            if signature.sections and name not in signature.sections:
                continue
            for line in text.splitlines():
                if signature.pattern.search(line) and line.strip() not in lines:
                    lines.append(line.strip())
        if lines:
            findings.append(
                Finding(
                    signature.key,
                    signature.cause,
                    signature.fix,
                    tuple(lines[:EVIDENCE_LINES_PER_FINDING]),
                )
            )
    if not findings:
        tail = [
            line.strip()
            for text in sources.values()
            for line in text.splitlines()[-3:]
            if line.strip()
        ]
        return Diagnosis(
            cause=UNKNOWN_CAUSE,
            evidence_lines=tail[:EVIDENCE_LINES_PER_FINDING],
            fix=UNKNOWN_FIX,
            evidence=masked,
            instance_id=instance_id,
            stage=stage.group(1) if stage else None,
        )
    first, *rest = findings
    return Diagnosis(
        cause=first.cause,
        evidence_lines=list(first.evidence_lines),
        fix=first.fix,
        key=first.key,
        also=rest,
        evidence=masked,
        instance_id=instance_id,
        stage=stage.group(1) if stage else None,
    )


def diagnose_instance(
    ssm: SSMClient,
    settings: PreviewConfig,
    instance_id: str,
    *,
    error: BaseException | str | None = None,
    secrets: Sequence[str] = (),
    timeout_seconds: float = 60.0,
) -> Diagnosis:
    """Collect the §9 evidence on ``instance_id`` and diagnose it."""
    evidence = collect_evidence(ssm, settings, instance_id, timeout_seconds=timeout_seconds)
    return diagnose_evidence(evidence, error=error, secrets=secrets, instance_id=instance_id)


def parameter_secrets(ssm: SSMClient, settings: PreviewConfig) -> list[str]:
    """The GHCR token and DATABASE_URL as Parameter Store holds them, so that exactly these
    values are masked too. Best effort: a parameter that cannot be read is skipped."""
    return read_secrets(ssm, settings).values


@step
def diagnose(
    clients: AwsClients,
    settings: PreviewConfig,
    instance_id: str,
    error: str | None = None,
    artifact_key: str | None = None,
) -> Diagnosis:
    """Prefect wrapper: publishes the diagnosis as a markdown artifact and returns it."""
    secrets = parameter_secrets(clients.ssm, settings)
    diagnosis = diagnose_instance(clients.ssm, settings, instance_id, error=error, secrets=secrets)
    create_markdown_artifact(
        markdown=diagnosis.markdown(),
        key=artifact_key,
        description=f"pr-preview diagnosis of {instance_id}",
    )
    run_logger(logger).warning("diagnosis of %s: %s", instance_id, diagnosis.key or "unknown")
    return diagnosis
