"""Fault injection for AWS calls, answered before moto sees the request.

An injected call has no effect in moto, as a refused or throttled call has none on AWS.

botocore copies ``botocore.handlers.BUILTIN_HANDLERS`` into every new session, which is how moto
itself intercepts requests; a ``before-send`` handler registered *first* answers before moto, so
the error goes through botocore's real parsing and the code under test sees a genuine
``ClientError``. This reaches clients that the flows build for themselves.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from botocore import handlers
from botocore.awsrequest import AWSResponse


class _Raw:
    def __init__(self, body: bytes) -> None:
        self._body = body

    def stream(self, **_: Any) -> Iterator[bytes]:
        yield self._body


@dataclass
class Fault:
    code: str
    status: int
    remaining: int | None  # None: every time


def error_body(service: str, code: str, message: str) -> tuple[bytes, dict[str, str]]:
    if service == "ec2":
        xml = (
            f"<Response><Errors><Error><Code>{code}</Code><Message>{message}</Message>"
            "</Error></Errors><RequestID>fault-injected</RequestID></Response>"
        )
        return xml.encode(), {"Content-Type": "text/xml"}
    if service in ("iam", "sts"):
        xml = (
            f"<ErrorResponse><Error><Type>Sender</Type><Code>{code}</Code>"
            f"<Message>{message}</Message></Error><RequestId>fault-injected</RequestId>"
            "</ErrorResponse>"
        )
        return xml.encode(), {"Content-Type": "text/xml"}
    body = json.dumps({"__type": code, "message": message}).encode()
    return body, {"Content-Type": "application/x-amz-json-1.1"}


class AwsFaults:
    """Rules ``service.Operation → error`` plus a count of every call that was attempted."""

    def __init__(self) -> None:
        self.faults: dict[str, Fault] = {}
        self.calls: Counter[str] = Counter()
        self.injected: Counter[str] = Counter()

    def fail(
        self, operation: str, code: str, *, status: int = 503, times: int | None = None
    ) -> None:
        """Answer ``operation`` (e.g. ``ec2.RunInstances``) with ``code``, ``times`` times."""
        self.faults[operation] = Fault(code, status, times)

    def clear(self) -> None:
        self.faults.clear()

    def __call__(self, request: Any, event_name: str, **_: Any) -> AWSResponse | None:
        _, service, operation = event_name.split(".", 2)
        key = f"{service}.{operation}"
        self.calls[key] += 1
        fault = self.faults.get(key)
        if fault is None or fault.remaining == 0:
            return None
        if fault.remaining is not None:
            fault.remaining -= 1
        self.injected[key] += 1
        body, headers = error_body(service, fault.code, f"injected {fault.code}")
        url = request.url
        # botocore runs every before-send handler: point the request nowhere so that moto's own
        # handler, which runs after this one, finds nothing to act on and the call changes nothing.
        request.url = "https://fault-injected.invalid/"
        return AWSResponse(url, fault.status, headers, _Raw(body))  # type: ignore[arg-type]


@contextmanager
def aws_faults() -> Iterator[AwsFaults]:
    """Install an ``AwsFaults`` in every boto3 session created inside the block."""
    faults = AwsFaults()
    spec = ("before-send", faults, handlers.REGISTER_FIRST)
    handlers.BUILTIN_HANDLERS.insert(0, spec)  # type: ignore[arg-type]
    try:
        yield faults
    finally:
        handlers.BUILTIN_HANDLERS.remove(spec)  # type: ignore[arg-type]


def attach(faults: AwsFaults, *clients: Any) -> None:
    """Put ``faults`` in front of clients that already exist (moto's handler included)."""
    for client in clients:
        client.meta.events.register_first("before-send", faults)
