"""The PR and fleet locks: a lease that renews, a loss that is never silent, a closed PR's
lock deleted."""

from __future__ import annotations

import threading
import time
import uuid

import httpx
import pytest
from prefect.client.orchestration import get_client
from prefect.exceptions import ObjectNotFound
from prefect.server.api.server import SERVER_API_VERSION
from prefect.settings import PREFECT_API_URL, temporary_settings

from local_stack.serve import serve_handler
from tasks.run.locks import HeldLock, LockTimeout, delete_lock, hold


def test_a_failed_renewal_marks_the_lock_lost_after_its_attempts() -> None:
    attempts: list[float] = []

    def renew() -> None:
        attempts.append(time.monotonic())
        raise RuntimeError("404 lease not found")

    lock = HeldLock("pr-preview:o:r:1", uuid.uuid4(), 60, renew)
    lock.start(interval=0.01)
    deadline = time.monotonic() + 10
    while lock.lost is None and time.monotonic() < deadline:
        time.sleep(0.01)
    lock.stop()
    assert lock.lost is not None and "404 lease not found" in lock.lost
    assert len(attempts) == 3


def test_renewals_that_succeed_keep_the_lock() -> None:
    renewed = threading.Event()
    count = {"n": 0}

    def renew() -> None:
        count["n"] += 1
        if count["n"] >= 3:
            renewed.set()

    lock = HeldLock("pr-preview:o:r:2", uuid.uuid4(), 60, renew)
    lock.start(interval=0.01)
    assert renewed.wait(5)
    lock.stop()
    assert lock.lost is None


@pytest.mark.usefixtures("prefect_server")
def test_a_lock_is_one_holder_at_a_time_and_times_out_for_the_second() -> None:
    name = f"pr-preview:test:{uuid.uuid4().hex[:8]}:1"
    with hold(name, lease_seconds=60) as first:
        assert first.lost is None
        with pytest.raises(LockTimeout), hold(name, lease_seconds=60, timeout_seconds=1):
            pass
    with hold(name, lease_seconds=60, timeout_seconds=5):  # released: free again
        pass
    with get_client(sync_client=True) as client:
        limit = client.read_global_concurrency_limit_by_name(name)
    assert limit.limit == 1 and limit.active_slots == 0


@pytest.mark.usefixtures("prefect_server")
def test_deleting_a_lock_removes_the_limit_and_a_later_hold_creates_it_again() -> None:
    name = f"pr-preview:test:{uuid.uuid4().hex[:8]}:2"
    with hold(name, lease_seconds=60):
        pass
    assert delete_lock(name) is True
    with get_client(sync_client=True) as client, pytest.raises(ObjectNotFound):
        client.read_global_concurrency_limit_by_name(name)
    assert delete_lock(name) is False
    with hold(name, lease_seconds=60, timeout_seconds=5):
        pass


def test_a_busy_server_is_asked_again_with_a_short_retry_after(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """SQLite's "database is locked" reaches the lock calls as 503: each one is asked again
    after the Retry-After the lock client gives it (not Prefect's 2 s, 4 s, … backoff), and
    past the Prefect client's own attempts for up to BUSY_PATIENCE_SECONDS."""
    seen: list[str] = []
    busy_answers = 8  # more than the Prefect client's own six attempts

    def server(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/csrf-token"):  # a server without CSRF protection
            return httpx.Response(404)
        if request.method == "GET":  # the client's version check
            return httpx.Response(200, json=SERVER_API_VERSION)
        seen.append(f"{request.method} {request.url.path}")
        if len(seen) <= busy_answers:
            return httpx.Response(503, json={"exception_message": "Service Unavailable"})
        return httpx.Response(204)

    waits: list[float] = []
    monkeypatch.setattr("prefect.client.base.time.sleep", waits.append)
    monkeypatch.setattr("tasks.run.locks.time.sleep", waits.append)
    with serve_handler(server) as url, temporary_settings({PREFECT_API_URL: f"{url}/api"}):
        assert delete_lock("pr-preview:o:r:9") is True
    assert seen == ["DELETE /api/v2/concurrency_limits/pr-preview:o:r:9"] * (busy_answers + 1)
    prefect_waits = [w for w in waits if w < 0.1]
    assert len(prefect_waits) >= busy_answers - 2, waits
    assert max(waits) < 2.0, waits
