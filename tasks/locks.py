"""One run at a time per pull request, and one fleet change at a time.

Prefect's global concurrency limits are the lock: a limit that does not exist is silently
skipped by ``concurrency()``, so each lock is created on first use (limit 1) and acquired with
``strict=True``. Waiters are served as slots free up, so a later run goes after an earlier one.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, suppress

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from prefect.logging import get_run_logger

FLEET_LOCK = "pr-preview:fleet"


def pr_lock_name(repo: str, pr_number: int) -> str:
    """The lock of one pull request.

    ``/`` is not allowed in a limit's name and ``#`` would end the URL path of a lookup by name.
    """
    return f"pr-preview:{repo.replace('/', ':')}:{pr_number}"


def ensure_lock(name: str) -> None:
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
            return
        except ObjectNotFound:
            pass
        with suppress(ObjectAlreadyExists):  # another run created it in between
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))


@contextmanager
def hold(name: str, *, timeout_seconds: float | None = None) -> Iterator[None]:
    """Hold lock ``name`` for the block, creating it first if it is missing."""
    ensure_lock(name)
    logger = get_run_logger()
    with concurrency(
        name,
        occupy=1,
        timeout_seconds=timeout_seconds,
        strict=True,
        # A slow renewal on a busy server must not kill the run; the lease outlives it.
        raise_on_lease_renewal_failure=False,
    ):
        logger.info("lock %s acquired", name)
        try:
            yield
        finally:
            logger.info("lock %s released", name)
