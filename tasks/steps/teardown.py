"""Teardown (runbook §2.8, §9): remove exactly one pull request's previews, after the app's
own ``teardown_command`` had its say."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tasks.app.masking import mask_secrets
from tasks.cloud.aws import AwsClients
from tasks.cloud.instances import Terminated, find_previews, terminate_outdated
from tasks.cloud.on_instance import container_script
from tasks.cloud.ssm import run_command
from tasks.config import PreviewConfig
from tasks.run.prefect_context import run_logger
from tasks.run.step import step

module_logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from mypy_boto3_ec2 import EC2Client

OUTPUT_TAIL = 2000  # of what the teardown command printed, for the run's log


@dataclass(frozen=True)
class TeardownCommandResult:
    instance_id: str
    ok: bool
    summary: str  # "exit 0", "exit 3", "timed out after 120s", ...: for the log, masked


def teardown_command_script(settings: PreviewConfig) -> list[str]:
    """``teardown_command`` in a one-off container of the app service (its words reach it as
    arguments: :func:`tasks.cloud.on_instance.container_run`); only the tail of its output."""
    assert settings.teardown_command is not None
    return container_script(
        settings.app_dir, settings.app_service, settings.teardown_command, OUTPUT_TAIL
    )


@step(retry=False, needs_lock=True)
def run_teardown_command(
    clients: AwsClients, settings: PreviewConfig, repo: str, pr_number: int
) -> list[TeardownCommandResult]:
    """``teardown_command`` on each of the PR's running previews, one after the other, each at
    most ``teardown_command_timeout_seconds``. Whatever happens — a non-zero exit, a timeout,
    SSM refusing — is logged and the teardown goes on: the instance is going either way. A
    stopped preview cannot run it and is skipped."""
    logger = run_logger(module_logger)
    if not settings.teardown_command:
        return []
    results = []
    for preview in find_previews(clients.ec2, settings.purpose_tag, repo=repo, pr_number=pr_number):
        if preview.state != "running":
            logger.info("%s is %s: no teardown command", preview.instance_id, preview.state)
            continue
        try:
            ran = run_command(
                clients.ssm,
                preview.instance_id,
                teardown_command_script(settings),
                timeout_seconds=settings.teardown_command_timeout_seconds,
                poll_seconds=min(settings.poll_seconds, 1.0),
                comment="pr-preview teardown command",
            )
        except Exception as exc:  # never blocks the teardown; said in the log
            summary = mask_secrets(f"{type(exc).__name__}: {exc}")[:500]
            logger.warning(
                "teardown command on %s did not finish (%s); terminating anyway",
                preview.instance_id,
                summary,
            )
            results.append(TeardownCommandResult(preview.instance_id, False, summary))
            continue
        output = mask_secrets(ran.output[-OUTPUT_TAIL:]) or "(none)"
        summary = f"exit {ran.exit_code}"
        if ran.ok:
            logger.info("teardown command on %s: %s; output:\n%s", ran.instance_id, summary, output)
        else:
            logger.warning(
                "teardown command on %s failed (%s); terminating anyway; output:\n%s",
                ran.instance_id,
                summary,
                output,
            )
        results.append(TeardownCommandResult(ran.instance_id, ran.ok, summary))
    return results


@step(needs_lock=True)
def teardown(ec2: EC2Client, settings: PreviewConfig, repo: str, pr_number: int) -> Terminated:
    """Terminate every live instance tagged with this repo and PR; nothing else is touched."""
    result = terminate_outdated(ec2, settings, repo, pr_number, keep_sha=None)
    logger = run_logger(module_logger)
    if result.instance_ids:
        logger.info("tore down %s for %s#%d", ", ".join(result.instance_ids), repo, pr_number)
    else:
        logger.info("no live preview for %s#%d", repo, pr_number)
    return result
