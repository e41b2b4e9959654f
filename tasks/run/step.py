"""One way to declare a step: ``@step`` over a plain function.

A step is a Prefect task named after its function (``wait_ready`` → task ``wait-ready``), never
cached, retried only on transient errors (``tasks.run.retry.is_transient``) — as often and as far
apart as the ``PreviewConfig`` among its arguments says, read at call time. So call sites read
``migrate(clients, settings, instance_id)`` and no decorator or call site repeats a retry count.

Outside a flow run (the operator CLI, a plain test) a step is the plain function under the same
retry policy, so ``pr-preview cleanup`` and the sweeper flow retry alike.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Generic, ParamSpec, TypeVar, overload

from prefect import Task, task
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext
from prefect.futures import PrefectFuture

from tasks.config import PreviewConfig
from tasks.run.budget import check_budget, remaining
from tasks.run.locks import check_locks
from tasks.run.retry import is_transient, retry_transient

P = ParamSpec("P")
R = TypeVar("R")


class Step(Generic[P, R]):
    """A plain function run as a Prefect task with the configured retry policy."""

    def __init__(self, fn: Callable[P, R], *, retry: bool, needs_lock: bool) -> None:
        self.fn = fn
        self.retry = retry
        self.needs_lock = needs_lock
        self.name = fn.__name__.replace("_", "-")
        self.__doc__ = fn.__doc__
        self.__name__ = fn.__name__
        self.__wrapped__ = fn
        self.task: Task[P, R] = task(
            name=self.name,
            cache_policy=NO_CACHE,
            retries=0,
            retry_condition_fn=retry_transient if retry else None,
        )(fn)

    def policy(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, float]:
        """(retries, delay in seconds) from the ``PreviewConfig`` argument; none without one."""
        if not self.retry:
            return 0, 0.0
        for value in (*args, *kwargs.values()):
            if isinstance(value, PreviewConfig):
                return value.task_retries, value.retry_delay_seconds
        return 0, 0.0

    def configured(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Task[P, R]:
        retries, delay = self.policy(args, kwargs)
        left = remaining()
        return self.task.with_options(
            retries=retries,
            retry_delay_seconds=delay,
            timeout_seconds=max(left, 1.0) if left is not None else None,
        )

    def _preconditions(self) -> None:
        check_budget(self.name)
        if self.needs_lock:
            check_locks()

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        self._preconditions()
        if FlowRunContext.get() is not None:
            try:
                return self.configured(args, kwargs)(*args, **kwargs)
            except TimeoutError as exc:
                left = remaining()
                if left is not None and left <= 0:  # the run's budget, not the step's own
                    check_budget(self.name)
                raise exc
        retries, delay = self.policy(args, kwargs)
        for attempt in range(retries + 1):
            try:
                return self.fn(*args, **kwargs)
            except Exception as exc:
                if attempt == retries or not is_transient(exc):
                    raise
                time.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    def submit(self, *args: P.args, **kwargs: P.kwargs) -> PrefectFuture[R]:
        """Run beside the flow (a thread of the task runner); needs a flow run."""
        self._preconditions()
        return self.configured(args, kwargs).submit(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<step {self.name}>"


@overload
def step(fn: Callable[P, R], /) -> Step[P, R]: ...


@overload
def step(
    *, retry: bool = True, needs_lock: bool = False
) -> Callable[[Callable[P, R]], Step[P, R]]: ...


def step(
    fn: Callable[P, R] | None = None, /, *, retry: bool = True, needs_lock: bool = False
) -> Step[P, R] | Callable[[Callable[P, R]], Step[P, R]]:
    """Declare a step. ``retry=False`` for a step whose client already retries by itself
    (GitHub, the registry's backoff): one retry layer per call. ``needs_lock=True`` for a step
    that changes the world: it refuses to start once a lock the run holds has been lost."""
    if fn is not None:
        return Step(fn, retry=retry, needs_lock=needs_lock)
    return lambda inner: Step(inner, retry=retry, needs_lock=needs_lock)
