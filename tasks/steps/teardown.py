"""Teardown (runbook §2.8, §9): remove exactly one pull request's previews."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from tasks.cloud.instances import Terminated, terminate_outdated
from tasks.config import PreviewConfig
from tasks.run.prefect_context import run_logger
from tasks.run.step import step

module_logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from mypy_boto3_ec2 import EC2Client


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
