"""The run's view of the preview secrets: read from Parameter Store, used, masked everywhere.

Read by a plain function (never returned from a Prefect task, whose results may be persisted)
and held in an object whose repr shows nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from botocore.exceptions import BotoCoreError, ClientError
from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_fixed

from tasks.cloud.ecr import ecr_repository
from tasks.config import PreviewConfig
from tasks.run.retry import is_transient

if TYPE_CHECKING:
    from mypy_boto3_ssm import SSMClient


@dataclass(frozen=True)
class RunSecrets:
    ghcr_token: str | None = field(default=None, repr=False)
    database_url: str | None = field(default=None, repr=False)

    @property
    def values(self) -> list[str]:
        """Every value to mask in text the run publishes."""
        return [value for value in (self.ghcr_token, self.database_url) if value]


def read_secrets(ssm: SSMClient, settings: PreviewConfig) -> RunSecrets:
    """Best effort: a parameter that cannot be read is None (preflight reports why). An ECR
    image needs no GHCR token: the instance logs in with its role, so it is not read."""

    retrying = Retrying(
        retry=retry_if_exception(is_transient),
        stop=stop_after_attempt(settings.task_retries + 1),
        wait=wait_fixed(settings.retry_delay_seconds),
        reraise=True,
    )

    def read(name: str) -> str | None:
        try:
            return retrying(
                lambda: ssm.get_parameter(Name=name, WithDecryption=True)["Parameter"]["Value"]
            )
        except (ClientError, BotoCoreError, KeyError):
            return None

    in_ecr = ecr_repository(settings) is not None
    ghcr_token = None if in_ecr else read(settings.ghcr_token_parameter)
    return RunSecrets(ghcr_token, read(settings.database_url_parameter))
