"""Which failures are worth another attempt, as one predicate for every Prefect task."""

from __future__ import annotations

from typing import Any

from botocore.exceptions import ClientError, ConnectionError, ReadTimeoutError

from tasks.run.errors import PreviewError

TRANSIENT_AWS_CODES = frozenset(
    {
        "RequestLimitExceeded",
        "Throttling",
        "ThrottlingException",
        "TooManyRequestsException",
        "InsufficientInstanceCapacity",
        "InternalError",
        "InternalFailure",
        "ServiceUnavailable",
        "Unavailable",
    }
)


class Transient(PreviewError):
    """An error worth another attempt (a 5xx, a dropped connection, throttling): the one mark
    that ``is_transient`` reads on our own exceptions."""


def is_transient(exc: BaseException | None) -> bool:
    """True for throttling, capacity and 5xx answers and dropped connections; never otherwise."""
    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return code in TRANSIENT_AWS_CODES or (
            500 <= int(status or 0) < 600 and code != "DryRunOperation"
        )
    if isinstance(exc, ConnectionError | ReadTimeoutError):
        return True
    return isinstance(exc, Transient)


def exception_of(state: Any) -> BaseException | None:
    """The exception a failed Prefect state carries, if it carries one."""
    data = getattr(state, "data", None)
    if isinstance(data, BaseException):
        return data
    try:
        result = state.result(raise_on_failure=False)
    except Exception as exc:  # a result that cannot be read is the exception itself
        return exc
    return result if isinstance(result, BaseException) else None


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """``retry_condition_fn`` for every step: retry transient failures only."""
    return is_transient(exception_of(state))


# AWS's answers to a call the credentials are not allowed to make (runbook §7).
ACCESS_DENIED_CODES = ("UnauthorizedOperation", "AccessDenied", "AccessDeniedException")


def error_code(exc: BaseException) -> str:
    if isinstance(exc, ClientError):
        return str(exc.response.get("Error", {}).get("Code", ""))
    return ""
