"""A run's time budget: every flow gets one from its configured stage timeouts.

The budget is checked before each step and bounds the step's own task run (``timeout_seconds``),
so a run past its budget fails with ``RunTimedOut`` through its ordinary failure path —
diagnosis, short TTL, a truthful comment — which itself runs in ``grace``, outside the budget.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Iterator
from contextlib import contextmanager

from tasks.run.errors import PreviewError

_deadline: contextvars.ContextVar[tuple[float, float] | None] = contextvars.ContextVar(
    "pr_preview_deadline", default=None
)


class RunTimedOut(PreviewError, TimeoutError):
    """The run used up the time its configured stages allow."""


@contextmanager
def run_budget(seconds: float) -> Iterator[None]:
    """Steps in the block must start before ``seconds`` have passed and end by then."""
    token = _deadline.set((time.monotonic() + seconds, seconds))
    try:
        yield
    finally:
        _deadline.reset(token)


@contextmanager
def grace() -> Iterator[None]:
    """The failure path: diagnose, shorten the TTL and tell the PR, whatever the budget says."""
    token = _deadline.set(None)
    try:
        yield
    finally:
        _deadline.reset(token)


def remaining() -> float | None:
    """Seconds left in the run's budget, or None outside one."""
    found = _deadline.get()
    return None if found is None else found[0] - time.monotonic()


def check_budget(step_name: str) -> None:
    found = _deadline.get()
    if found is not None and time.monotonic() >= found[0]:
        raise RunTimedOut(
            f"the run used up its {found[1]:g} s budget at step {step_name}"
            " (the sum of its configured stage timeouts and lock waits)"
        )
