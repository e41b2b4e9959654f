"""Run the database migrations in a one-off container of the app image (runbook §2.4, §3).

``docker compose run --rm`` of the app service gives the container the same image
(``APP_IMAGE`` in ``.env``), the same ``env_file`` (``app.env``, the DATABASE_URL the instance
read from Parameter Store) and the same network as the app. The database may not accept
connections yet, so a failure is retried with jittered exponential backoff until
``migrate_timeout_seconds``; a failure that no wait can fix (the URL does not parse, the image
lacks alembic) stops at once.
"""

from __future__ import annotations

import logging
import shlex
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_result,
    stop_after_delay,
    wait_random_exponential,
)

from tasks.app.masking import mask_secrets
from tasks.app.migration_output import PERMANENT_FAILURES, last_error
from tasks.cloud.aws import AwsClients
from tasks.cloud.on_instance import STATE_DIR, container_script
from tasks.cloud.ssm import CommandResult, CommandTimeout, run_command
from tasks.config import PreviewConfig
from tasks.run.errors import PreviewError
from tasks.run.prefect_context import run_logger
from tasks.run.step import step

if TYPE_CHECKING:
    from mypy_boto3_ssm import SSMClient

logger = logging.getLogger(__name__)

OUTPUT_TAIL = 4000
SEED_LOG_TAIL = 2000
SEEDED = f"{STATE_DIR}/seeded"
SEEDED_BEFORE = "pr-preview: seeded by an earlier deploy"  # what seed_commands says on a skip
MIGRATE_OUTPUT_BYTES = 20000  # under SSM's 24,000-character cut of stdout


class MigrationFailed(PreviewError):
    """The migrations did not run; ``output`` is the tail of what the last attempt printed."""

    def __init__(self, message: str, *, attempts: int, output: str) -> None:
        self.attempts = attempts
        self.output = output
        super().__init__(message)


@dataclass(frozen=True)
class MigrateResult:
    instance_id: str
    attempts: int
    seconds: float
    output: str


def migrate_commands(settings: PreviewConfig, command: str | None = None) -> list[str]:
    """``migration_command`` (or ``command``) in a one-off container of the app service; its
    words reach the container as arguments (:func:`tasks.cloud.on_instance.container_run`). The
    user data's migrations on boot run the same container (tasks/steps/launch.py)."""
    return container_script(
        settings.app_dir,
        settings.app_service,
        command or settings.migration_command,
        MIGRATE_OUTPUT_BYTES,
    )


def seed_commands(settings: PreviewConfig) -> list[str]:
    """``seed_command`` in the app service, like a migration, once per instance: a marker in
    the state dir says it succeeded (a relaunched preview, with its fresh database, seeds
    again); ``seed_on_every_deploy`` seeds after every deploy."""
    assert settings.seed_command is not None
    marker = shlex.quote(SEEDED)
    skip = f"if [ -f {marker} ]; then echo {shlex.quote(SEEDED_BEFORE)}; exit 0; fi"
    once = [] if settings.seed_on_every_deploy else [skip]
    run = migrate_commands(settings, settings.seed_command)
    return [*run[:2], *once, *run[2:-1], f'if [ "$status" = 0 ]; then touch {marker}; fi', run[-1]]


def run_migrations(
    ssm: SSMClient,
    settings: PreviewConfig,
    instance_id: str,
    *,
    timeout_seconds: float | None = None,
    backoff_max_seconds: float | None = None,
) -> MigrateResult:
    """Run ``settings.migration_command`` until it succeeds, at most ``migrate_timeout_seconds``.

    Backoff starts at ``poll_seconds`` and grows to ``backoff_max_seconds`` (default: six
    polls), jittered, so a database that is still starting is not hammered.
    """
    timeout = settings.migrate_timeout_seconds if timeout_seconds is None else timeout_seconds
    backoff_max = backoff_max_seconds or settings.poll_seconds * 6
    commands = migrate_commands(settings)
    started = time.monotonic()
    attempts = 0
    last_output = ""

    def attempt() -> CommandResult | None:
        nonlocal attempts, last_output
        attempts += 1
        remaining = max(0.0, timeout - (time.monotonic() - started))
        try:
            result = run_command(
                ssm,
                instance_id,
                commands,
                timeout_seconds=remaining,
                poll_seconds=min(settings.poll_seconds, 1.0),
                comment="pr-preview migrate",
            )
        except CommandTimeout as exc:
            last_output = str(exc)
            return None
        last_output = result.output[-OUTPUT_TAIL:]
        if not result.ok and PERMANENT_FAILURES.search(result.output):
            raise MigrationFailed(
                f"migration failed on {instance_id} (exit {result.exit_code}); retrying cannot"
                f" fix it: {last_error(result.output)}",
                attempts=attempts,
                output=last_output,
            )
        return result

    def give_up(state: RetryCallState) -> CommandResult:
        raise MigrationFailed(
            f"migration did not succeed on {instance_id} within {timeout:g}s ({attempts} attempts)"
            + (f": {last_error(last_output)}" if last_output.strip() else ""),
            attempts=attempts,
            output=last_output,
        )

    result = Retrying(
        stop=stop_after_delay(timeout),
        wait=wait_random_exponential(multiplier=settings.poll_seconds, max=backoff_max),
        retry=retry_if_result(lambda result: result is None or not result.ok),
        retry_error_callback=give_up,
    )(attempt)
    assert result is not None
    return MigrateResult(instance_id, attempts, time.monotonic() - started, last_output)


class SeedFailed(PreviewError):
    """The seed command failed; ``output`` is the tail of what it printed (masked)."""

    def __init__(self, message: str, *, output: str) -> None:
        self.output = output
        super().__init__(message)


@dataclass(frozen=True)
class SeedResult:
    instance_id: str
    ran: bool  # False: seeded before, by an earlier deploy on this instance
    output: str


def run_seed(ssm: SSMClient, settings: PreviewConfig, instance_id: str) -> SeedResult:
    """One run of ``seed_command`` (a seed is not retried: it may have half-written data)."""
    try:
        result = run_command(
            ssm,
            instance_id,
            seed_commands(settings),
            timeout_seconds=settings.migrate_timeout_seconds,
            poll_seconds=min(settings.poll_seconds, 1.0),
            comment="pr-preview seed",
        )
    except CommandTimeout as exc:
        raise SeedFailed(f"seed command failed on {instance_id}: {exc}", output="") from exc
    output = mask_secrets(result.output[-OUTPUT_TAIL:])
    if result.ok and result.stdout.strip() == SEEDED_BEFORE:
        return SeedResult(instance_id, False, output)
    if not result.ok:
        raise SeedFailed(
            f"seed command failed on {instance_id} (exit {result.exit_code}):"
            f" {last_error(result.output)}",
            output=output,
        )
    return SeedResult(instance_id, True, output)


@step(needs_lock=True)
def seed(clients: AwsClients, settings: PreviewConfig, instance_id: str) -> SeedResult:
    """Prefect wrapper: the output's tail goes to the run's log, failed or not."""
    log = run_logger(logger)
    try:
        result = run_seed(clients.ssm, settings, instance_id)
    except SeedFailed as exc:
        log.error("seed output (tail):\n%s", exc.output[-SEED_LOG_TAIL:] or "(none)")
        raise
    if result.ran:
        log.info("seeded %s; output (tail):\n%s", instance_id, result.output[-SEED_LOG_TAIL:])
    else:
        log.info("%s was seeded by an earlier deploy: not seeding again", instance_id)
    return result


@step(needs_lock=True)
def migrate(clients: AwsClients, settings: PreviewConfig, instance_id: str) -> MigrateResult:
    """Prefect wrapper; ``MigrationFailed`` is final (the backoff already waited)."""
    result = run_migrations(clients.ssm, settings, instance_id)
    run_logger(logger).info(
        "migrations ran on %s after %d attempt(s) in %.1fs",
        instance_id,
        result.attempts,
        result.seconds,
    )
    return result
