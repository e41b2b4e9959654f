"""One run at a time per pull request, and one fleet change at a time.

Prefect's global concurrency limits are the lock (limit 1, created on first use). A holder's
slot is a lease of ``lock_lease_seconds``, renewed in the background a few times per lease: a
run killed outright blocks its PR only until the lease runs out and the server's repossessor
frees the slot (its loop interval adds to that; the local stack runs it every 5 s).

Losing a lease is never silent: the renewal thread marks the lock lost, and every step that
changes the world (``@step(needs_lock=True)``) refuses to start once a lock the run holds is
lost (``LockLost``) — so a run that may no longer own its PR stops before its next AWS change.
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import TypeVar
from uuid import UUID

import httpx
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.client.schemas.objects import ConcurrencyLeaseHolder
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from tenacity import Retrying, retry_if_exception, stop_after_delay, wait_exponential_jitter

from tasks.run.errors import PreviewError
from tasks.run.prefect_context import run_logger
from tasks.run.tls import prefect_tls_context

logger = logging.getLogger(__name__)

FLEET_LOCK = "pr-preview:fleet"
RENEWALS_PER_LEASE = 4
RENEWAL_ATTEMPTS = 3
LOCKED = 423
BUSY = 503
# How long one lock call waits out a busy server before it gives up.
BUSY_PATIENCE_SECONDS = 30.0
BUSY_RETRY_AFTER = "0.05"

T = TypeVar("T")


class LockLost(PreviewError):
    """A lock this run held is no longer its own; it stopped before changing anything more."""


class LockTimeout(PreviewError, TimeoutError):
    """The lock did not come free in time."""


def pr_lock_name(repo: str, pr_number: int) -> str:
    """The lock of one pull request.

    ``/`` is not allowed in a limit's name and ``#`` would end the URL path of a lookup by name.
    """
    return f"pr-preview:{repo.replace('/', ':')}:{pr_number}"


def _busy(exc: BaseException) -> bool:
    if isinstance(exc, httpx.HTTPStatusError):
        return exc.response.status_code == BUSY
    return isinstance(exc, httpx.TransportError)


def _ask_again_soon(response: httpx.Response) -> None:
    """httpx response hook: a 503 without Retry-After gets a short one."""
    if response.status_code == BUSY and "Retry-After" not in response.headers:
        response.headers["Retry-After"] = BUSY_RETRY_AFTER


def api_call(call: Callable[[SyncPrefectClient], T]) -> T:
    """One Prefect API call of the lock protocol; a busy server is asked again within
    a tenth of a second.

    On SQLite the server answers 503 whenever another connection commits between a lock
    call's read and its write ("database is locked": the limit's own events do it), and
    Prefect's client would wait 2 s, then 4 s, before asking again — on nearly every acquire
    and delete. Its client honours Retry-After, so the answer gets a short one; past the
    client's own attempts, a busy server is asked again for ``BUSY_PATIENCE_SECONDS``.
    """
    hooks = {"event_hooks": {"response": [_ask_again_soon]}, "verify": prefect_tls_context()}
    for attempt in Retrying(
        stop=stop_after_delay(BUSY_PATIENCE_SECONDS),
        wait=wait_exponential_jitter(initial=0.2, max=2.0, jitter=0.2),
        retry=retry_if_exception(_busy),
        reraise=True,
    ):
        with attempt, get_client(httpx_settings=hooks, sync_client=True) as client:
            return call(client)
    raise AssertionError("unreachable: tenacity reraises the last error")


def ensure_lock(name: str) -> None:
    try:
        api_call(lambda client: client.read_global_concurrency_limit_by_name(name))
        return
    except ObjectNotFound:
        pass
    with suppress(ObjectAlreadyExists):  # another run created it in between
        api_call(
            lambda client: client.create_global_concurrency_limit(
                GlobalConcurrencyLimitCreate(name=name, limit=1)
            )
        )


def delete_lock(name: str) -> bool:
    """Remove a lock nobody needs any more (a closed PR's); False when it was already gone."""
    try:
        api_call(lambda client: client.delete_global_concurrency_limit_by_name(name))
    except ObjectNotFound:
        return False
    return True


@dataclass
class HeldLock:
    """A lease on one lock, renewed by a background thread until released."""

    name: str
    lease_id: UUID
    lease_seconds: float
    renew: Callable[[], None]
    lost: str | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self, interval: float | None = None) -> None:
        every = interval if interval is not None else self.lease_seconds / RENEWALS_PER_LEASE
        context = contextvars.copy_context()
        self._thread = threading.Thread(
            target=context.run,
            args=(self._renew_until_stopped, every),
            name=f"lease-{self.name}",
            daemon=True,
        )
        self._thread.start()

    def _renew_until_stopped(self, every: float) -> None:
        while not self._stop.wait(every):
            for attempt in range(RENEWAL_ATTEMPTS):
                try:
                    self.renew()
                    break
                except Exception as exc:
                    if attempt == RENEWAL_ATTEMPTS - 1:
                        self.lost = f"its lease could not be renewed ({exc})"
                        run_logger(logger).error(
                            "lock %s lost: %s; no further change is made", self.name, self.lost
                        )
                        return
                    if self._stop.wait(min(every, 2.0**attempt)):
                        return

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


_held: contextvars.ContextVar[tuple[HeldLock, ...]] = contextvars.ContextVar(
    "pr_preview_held_locks", default=()
)


def check_locks() -> None:
    """Raise ``LockLost`` when a lock this run holds has lost its lease."""
    for lock in _held.get():
        if lock.lost:
            raise LockLost(
                f"lock {lock.name} is no longer held: {lock.lost}. Another run may own it now,"
                " so this run stopped before its next change; what it launched keeps its short"
                " TTL"
            )


def _holder() -> ConcurrencyLeaseHolder | None:
    from prefect.runtime import flow_run

    run_id = flow_run.get_id()
    return ConcurrencyLeaseHolder(type="flow_run", id=UUID(run_id)) if run_id else None


def _acquire(name: str, lease_seconds: float, timeout_seconds: float | None) -> UUID:
    """Wait for the slot (423 Locked while another run holds it) and take its lease."""
    deadline = None if timeout_seconds is None else time.monotonic() + timeout_seconds
    holder = _holder()
    while True:
        try:
            response = api_call(
                lambda client: client.increment_concurrency_slots_with_lease(
                    names=[name],
                    slots=1,
                    mode="concurrency",
                    lease_duration=lease_seconds,
                    holder=holder,
                )
            )
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code != LOCKED:
                raise
            wait = float(exc.response.headers.get("Retry-After") or 1.0)
            if deadline is not None and time.monotonic() + wait > deadline:
                raise LockTimeout(f"lock {name} was not free within {timeout_seconds:g} s") from exc
            time.sleep(min(max(wait, 0.2), 2.0))
            continue
        body = response.json()
        if not body.get("limits"):  # deleted between ensure_lock and here (a teardown)
            ensure_lock(name)
            continue
        return UUID(str(body["lease_id"]))


def _renew(lease_id: UUID, lease_seconds: float) -> None:
    api_call(lambda client: client.renew_concurrency_lease(lease_id, lease_seconds))


def _release(lease_id: UUID) -> None:
    with suppress(ObjectNotFound):
        api_call(lambda client: client.release_concurrency_slots_with_lease(lease_id))


@contextmanager
def hold(
    name: str, *, lease_seconds: float = 60, timeout_seconds: float | None = None
) -> Iterator[HeldLock]:
    """Hold lock ``name`` for the block, creating it first if it is missing."""
    ensure_lock(name)
    lease_id = _acquire(name, lease_seconds, timeout_seconds)
    log = run_logger(logger)

    lock = HeldLock(name, lease_id, lease_seconds, lambda: _renew(lease_id, lease_seconds))
    lock.start()
    token = _held.set((*_held.get(), lock))
    log.info("lock %s acquired", name)
    try:
        yield lock
    finally:
        lock.stop()
        _held.reset(token)
        try:
            _release(lease_id)
        except Exception as exc:  # the lease expires by itself
            log.warning("lock %s not released (%s): it frees when its lease ends", name, exc)
        log.info("lock %s released", name)
