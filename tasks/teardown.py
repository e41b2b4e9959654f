"""Teardown (runbook §2.8, §9): remove exactly one pull request's previews."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from tasks.config import PreviewConfig
from tasks.retry import retry_transient
from tasks.terminate import Terminated, terminate_outdated

if TYPE_CHECKING:
    from mypy_boto3_ec2 import EC2Client


def teardown_pr(ec2: EC2Client, config: PreviewConfig, repo: str, pr_number: int) -> Terminated:
    """Terminate every live instance tagged with this repo and PR; nothing else is touched."""
    return terminate_outdated(ec2, config, repo, pr_number, keep_sha=None)


@task(
    name="teardown",
    retries=3,
    retry_delay_seconds=2,
    retry_condition_fn=retry_transient,
    cache_policy=NO_CACHE,
)
def teardown(ec2: EC2Client, config: PreviewConfig, repo: str, pr_number: int) -> Terminated:
    result = teardown_pr(ec2, config, repo, pr_number)
    logger = get_run_logger()
    if result.instance_ids:
        logger.info("tore down %s for %s#%d", ", ".join(result.instance_ids), repo, pr_number)
    else:
        logger.info("no live preview for %s#%d", repo, pr_number)
    return result
