"""The PR and fleet locks: a lease that renews, a loss that is never silent, a closed PR's
lock deleted."""

from __future__ import annotations

import threading
import time
import uuid

import pytest
from prefect.client.orchestration import get_client
from prefect.exceptions import ObjectNotFound

from tasks.locks import HeldLock, LockTimeout, delete_lock, hold


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
