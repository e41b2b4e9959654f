"""One way to declare a step: the retry policy comes from the configuration at call time."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from botocore.exceptions import ClientError
from prefect import flow

from tasks.config import PreviewConfig, load_config
from tasks.run.locks import HeldLock, LockLost, _held
from tasks.run.outcome import Outcome
from tasks.run.step import step


def throttled() -> ClientError:
    return ClientError(
        {"Error": {"Code": "RequestLimitExceeded", "Message": "slow down"}}, "RunInstances"
    )


def settings(retries: int) -> PreviewConfig:
    return load_config(
        {"task_retries": retries, "retry_delay_seconds": 0}, env={}, use_variable=False
    )


def flaky(failures: int, error: Exception) -> tuple[list[int], Any]:
    """A step that fails ``failures`` times with ``error``, then answers; counts its calls."""
    calls: list[int] = []

    @step
    def fetch(config: PreviewConfig, value: int) -> int:
        calls.append(value)
        if len(calls) <= failures:
            raise error
        return value * 2

    return calls, fetch


def test_a_step_is_a_task_named_in_kebab_case_without_cache() -> None:
    _, fetch = flaky(0, throttled())
    assert fetch.name == "fetch" and fetch.task.name == "fetch"

    @step
    def wait_ready(config: PreviewConfig) -> None: ...

    assert wait_ready.task.name == "wait-ready"
    assert wait_ready.task.cache_policy is not None
    assert type(wait_ready.task.cache_policy).__name__ == "_None"


@pytest.mark.parametrize("retries", [0, 1, 3])
def test_outside_a_flow_transient_errors_are_retried_as_often_as_configured(retries: int) -> None:
    calls, fetch = flaky(2, throttled())
    if retries >= 2:
        assert fetch(settings(retries), 21) == 42
        assert len(calls) == 3
    else:
        with pytest.raises(ClientError):
            fetch(settings(retries), 21)
        assert len(calls) == retries + 1


def test_a_permanent_error_is_never_retried() -> None:
    calls, fetch = flaky(5, ValueError("bad input"))
    with pytest.raises(ValueError):
        fetch(settings(3), 1)
    assert calls == [1]


def test_retry_false_leaves_retrying_to_the_client() -> None:
    calls: list[int] = []

    @step(retry=False)
    def comment(config: PreviewConfig) -> None:
        calls.append(1)
        raise throttled()

    with pytest.raises(ClientError):
        comment(settings(3))
    assert calls == [1]


@pytest.mark.usefixtures("prefect_server")
def test_in_a_flow_run_the_task_retries_with_the_configuration_of_that_call() -> None:
    calls, fetch = flaky(2, throttled())

    @flow
    def run(retries: int) -> int:
        return int(fetch(settings(retries), 5))

    assert run(2) == 10
    assert len(calls) == 3
    calls.clear()
    with pytest.raises(ClientError):
        run(1)  # the same step, another configuration: one retry only
    assert len(calls) == 2


def test_a_step_that_needs_the_lock_refuses_once_it_is_lost() -> None:
    calls: list[int] = []

    @step(needs_lock=True)
    def launch(config: PreviewConfig) -> None:
        calls.append(1)

    lock = HeldLock(
        "pr-preview:o:r:1",
        lease_id=uuid.uuid4(),
        lease_seconds=60,
        renew=lambda: None,
    )
    token = _held.set((lock,))
    try:
        launch(settings(0))
        lock.lost = "its lease could not be renewed (404)"
        with pytest.raises(LockLost, match="no longer held: its lease could not be renewed"):
            launch(settings(0))
    finally:
        _held.reset(token)
    assert calls == [1]


def test_outcomes_name_the_completed_state() -> None:
    assert [o.state_name for o in Outcome] == [
        "Closed",
        "Refused Fork",
        "Superseded",
        "No Room",
        "Not Allowed",
        "Still Open",
        "Not Labeled",
        "Label Ignored",
        "Still Labeled",
        "Draft",
        "Not Draft",
        "Draft Ignored",
        "No Matching Paths",
        "Not Permitted",
        "Bad Command",
        "Bot",
        "Awaiting Approval",
        "Nothing To Approve",
        "Not The Head",
    ]
