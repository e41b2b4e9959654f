"""AWS clients, built when a run needs them and passed down to the steps."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any

import boto3
from botocore.config import Config
from botocore.exceptions import WaiterError
from botocore.loaders import Loader, create_loader

from tasks.cloud.ecr import ecr_repository
from tasks.config import PreviewConfig

if TYPE_CHECKING:
    from botocore.waiter import Waiter
    from mypy_boto3_ec2 import EC2Client
    from mypy_boto3_ecr import ECRClient
    from mypy_boto3_iam import IAMClient
    from mypy_boto3_route53 import Route53Client
    from mypy_boto3_ssm import SSMClient

# Retries belong to the Prefect tasks (one retry layer per call), so botocore makes one attempt.
SINGLE_ATTEMPT = Config(retries={"total_max_attempts": 1, "mode": "standard"})


@cache
def service_models() -> Loader:
    """One loader of botocore's service models for every session of the process.

    Each new session otherwise parses EC2's multi-megabyte JSON model again: most of the CPU
    of building a run's clients. The models are read-only data, so sharing them is safe.
    """
    return create_loader()


@dataclass(frozen=True)
class AwsClients:
    ec2: EC2Client
    ssm: SSMClient
    iam: IAMClient
    ecr: ECRClient | None = None  # only when the configured image is in ECR, in its region
    route53: Route53Client | None = None  # only with dns_zone_id (previews' names in the VPC)


def build_clients(settings: PreviewConfig) -> AwsClients:
    """Clients from the AwsCredentials block named in the settings, else boto3's default chain.

    ``AWS_ENDPOINT_URL`` (a moto server, say) is honoured on both paths: boto3 reads it itself,
    and a block's own ``endpoint_url`` is passed explicitly because
    ``get_boto3_session().client()`` would drop it. An ECR client only for an image in ECR,
    in that registry's region; a Route 53 client only with ``dns_zone_id``. Fresh clients
    every time: prefect-aws's ``get_client()`` caches them across calls, and with them any
    event handlers.
    """
    session: boto3.session.Session
    params: dict[str, Any] = {}
    if settings.aws_credentials_block:
        from prefect_aws import AwsCredentials

        # _sync: a plain object even when called from inside a running event loop.
        credentials: Any = AwsCredentials.load(  # type: ignore[call-arg]
            settings.aws_credentials_block, _sync=True
        )
        session = credentials.get_boto3_session()
        params = credentials.aws_client_parameters.get_params_override()
    else:
        session = boto3.session.Session()
    session._session.register_component("data_loader", service_models())
    botocore_config = SINGLE_ATTEMPT
    if isinstance(params.get("config"), Config):
        botocore_config = params.pop("config").merge(SINGLE_ATTEMPT)
    region = session.region_name or settings.region
    if settings.region:
        region = settings.region

    def client(service: str, in_region: str = region) -> Any:
        return session.client(  # type: ignore[call-overload]
            service, region_name=in_region, config=botocore_config, **params
        )

    ecr = ecr_repository(settings)
    return AwsClients(
        ec2=client("ec2"),
        ssm=client("ssm"),
        iam=client("iam"),
        ecr=client("ecr", ecr.region) if ecr else None,
        route53=client("route53") if settings.dns_zone_id else None,
    )


def wait_timed(
    waiter: Waiter,
    *,
    timeout_seconds: float,
    poll_seconds: float,
    within: bool = False,
    **params: object,
) -> None:
    """Run a botocore waiter with our timing: a poll every ``poll_seconds`` (fractions too, for
    tests) until ``timeout_seconds``; with ``within`` the last poll stays inside the timeout,
    else it may land just past it. Its ``WaiterError`` surfaces; ``gave_up`` reads it."""
    delay = max(poll_seconds, 0.0)
    if delay:
        polls = timeout_seconds / delay
        attempts = max(1, (int(polls) if within else math.ceil(polls)) + 1)
    else:
        attempts = 1
    # botocore sleeps Delay as given; the stubs say int, tests need fractions of a second
    waiter.wait(**params, WaiterConfig={"Delay": delay, "MaxAttempts": attempts})


def gave_up(exc: WaiterError) -> bool:
    """The waiter ran out of attempts, rather than seeing the resource fail."""
    return "Max attempts exceeded" in str(exc.kwargs.get("reason", exc))
