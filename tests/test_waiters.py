"""botocore waiters on our timing: the polls a timeout buys; a timeout told from a failure."""

from __future__ import annotations

from typing import Any

import pytest
from botocore.exceptions import WaiterError

from tasks.cloud.aws import gave_up, wait_timed


class RecordingWaiter:
    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def wait(self, **kwargs: Any) -> None:
        self.calls.append(kwargs)


@pytest.mark.parametrize(
    ("timeout", "poll", "within", "attempts"),
    [
        (10.0, 3.0, False, 5),  # the last poll may land past the timeout
        (10.0, 3.0, True, 4),  # the last poll stays inside it
        (9.0, 3.0, False, 4),
        (9.0, 3.0, True, 4),
        (5.0, 0.0, False, 1),
        (0.0, 1.0, True, 1),
    ],
)
def test_a_timeout_buys_polls_every_interval(
    timeout: float, poll: float, within: bool, attempts: int
) -> None:
    waiter = RecordingWaiter()
    wait_timed(
        waiter,  # type: ignore[arg-type]
        InstanceIds=["i-1"],
        timeout_seconds=timeout,
        poll_seconds=poll,
        within=within,
    )
    assert waiter.calls == [
        {"InstanceIds": ["i-1"], "WaiterConfig": {"Delay": poll, "MaxAttempts": attempts}}
    ]


def test_running_out_of_attempts_is_told_from_a_failure_state() -> None:
    out = WaiterError("ImageAvailable", "Max attempts exceeded", {})
    failed = WaiterError("ImageAvailable", "Waiter encountered a terminal failure state", {})
    assert gave_up(out)
    assert not gave_up(failed)
