"""The self-hosted path: a signed GitHub webhook receiver that emits Prefect events.

Open-source Prefect has no inbound webhook endpoint, so this small ASGI app takes GitHub's
deliveries, checks `X-Hub-Signature-256`, maps a handled `pull_request` delivery to the event
of `deployments.events` and posts it to `POST {PREFECT_API_URL}/events`. The event id is the
delivery GUID. Bad input gets a 4xx, never a 500. With a spool (the default of `pr-preview
receiver`) an accepted delivery is on disk before GitHub hears 2xx and reaches Prefect when
Prefect answers again; without one, a Prefect API that does not take the event gets a 502, so
GitHub shows the failure and it can be redelivered by hand. A repeat of a delivery (the same
signed body) is answered `duplicate` while it is recent and emitted again after that
(`deployments.spool`). Under uvicorn (`serve`) a client gets `header_timeout_seconds` for its
headers and `read_timeout_seconds` for its body, and requests past `max_connections` get 503.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import httpx
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from deployments.events import MalformedDelivery, event_from_delivery
from deployments.spool import Admission, Spool
from tasks.run.errors import PreviewError

Emit = Callable[[dict[str, Any]], Awaitable[None]]

GITHUB_MAX_BODY_BYTES = 25 * 1024 * 1024  # GitHub's own cap on a delivery
DEFAULT_MAX_BODY_BYTES = 1024 * 1024  # pull_request deliveries are tens of KB
DEFAULT_READ_TIMEOUT_SECONDS = 10.0  # GitHub itself gives up on a delivery after 10 s
DEFAULT_HEADER_TIMEOUT_SECONDS = 5.0  # headers + body: a request is answered within 15 s
DEFAULT_MAX_CONNECTIONS = 64
DEFAULT_REPEAT_AFTER_SECONDS = 60.0
CLOSE = {"Connection": "close"}  # the request was not read to its end: the connection is done
SECRET_ENV = "GITHUB_WEBHOOK_SECRET"
LOGGER_NAME = "pr_preview.receiver"


class EmitFailed(PreviewError):
    """The Prefect API did not take the event (answer 502 so GitHub can redeliver)."""


class _Reject(PreviewError):
    def __init__(self, status: int, outcome: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.outcome, self.detail = status, outcome, detail


def signature_header(secret: str, body: bytes) -> str:
    """The `X-Hub-Signature-256` value GitHub sends for this body: `sha256=<hex>`."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify_signature(secret: str, body: bytes, header: str | None) -> bool:
    """True when `header` is GitHub's HMAC-SHA256 of the raw body under `secret`.

    A missing header, another algorithm (`sha1=…`) or a bad digest are all False;
    the comparison is constant-time.
    """
    if not header:
        return False
    algorithm, sep, digest = header.partition("=")
    if algorithm.strip().lower() != "sha256" or not sep:
        return False
    expected = signature_header(secret, body).removeprefix("sha256=")
    return hmac.compare_digest(expected.encode(), digest.strip().lower().encode("utf-8", "replace"))


def resolve_secret(env: Mapping[str, str], block_name: str | None = None) -> str | None:
    """The webhook secret: `GITHUB_WEBHOOK_SECRET`, else the named Prefect Secret block, else None.

    Called once at start-up (never per delivery); the value is never logged.
    """
    value = env.get(SECRET_ENV)
    if value:
        return value
    if not block_name:
        return None
    from prefect.blocks.system import Secret

    try:
        block = Secret.load(block_name)
    except ValueError as exc:
        raise ValueError(
            f"Prefect Secret block {block_name!r} not found: create it or set {SECRET_ENV}"
        ) from exc
    if not isinstance(block, Secret):
        raise TypeError("resolve_secret is synchronous: call it outside the event loop")
    secret = block.get()
    if not isinstance(secret, str) or not secret:
        raise ValueError(f"Prefect Secret block {block_name!r} must hold a non-empty string")
    return secret


def prefect_auth_headers(env: Mapping[str, str]) -> dict[str, str]:
    """The credentials Prefect's own client sends: ``PREFECT_API_KEY`` as a Bearer token
    (Prefect Cloud), else ``PREFECT_API_AUTH_STRING`` as Basic auth (a self-hosted server
    started with ``PREFECT_SERVER_API_AUTH_STRING``)."""
    if env.get("PREFECT_API_KEY"):
        return {"Authorization": f"Bearer {env['PREFECT_API_KEY']}"}
    if env.get("PREFECT_API_AUTH_STRING"):
        encoded = base64.b64encode(env["PREFECT_API_AUTH_STRING"].encode()).decode()
        return {"Authorization": f"Basic {encoded}"}
    return {}


class PrefectEventsAPI:
    """Posts events to a Prefect server's `POST /events`; one client per app, made on first use."""

    def __init__(
        self,
        api_url: str,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        timeout_seconds: float = 5.0,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.url = api_url.rstrip("/") + "/events"
        self._headers = dict(headers or {})
        self._transport = transport
        self._timeout = timeout_seconds
        self._client: httpx.AsyncClient | None = None

    async def __call__(self, event: dict[str, Any]) -> None:
        if self._client is None:
            self._client = httpx.AsyncClient(
                transport=self._transport, timeout=self._timeout, headers=self._headers
            )
        try:
            response = await self._client.post(self.url, json=[event])
        except httpx.HTTPError as exc:
            raise EmitFailed(f"Prefect API unreachable: {type(exc).__name__}") from exc
        if not response.is_success:
            raise EmitFailed(f"Prefect API answered {response.status_code}")

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


@dataclass
class _DeliveryLog:
    """The fields of the one log line written per delivery."""

    delivery: str = "-"
    event: str = "-"
    action: str = "-"
    pr: str = "-"
    outcome: str = "-"
    status: int = 0
    detail: str = ""
    started: float = field(default_factory=time.perf_counter)

    def write(self, logger: logging.Logger) -> None:
        level = logging.WARNING if self.status >= 400 else logging.INFO
        logger.log(
            level,
            "delivery=%s event=%s action=%s pr=%s outcome=%s status=%d ms=%.1f%s",
            self.delivery,
            self.event,
            self.action,
            self.pr,
            self.outcome,
            self.status,
            (time.perf_counter() - self.started) * 1000,
            f" detail={self.detail!r}" if self.detail else "",
        )


def create_app(
    secret: str | None,
    emit: Emit | None = None,
    *,
    prefect_api_url: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    insecure_no_signature: bool = False,
    http_transport: httpx.AsyncBaseTransport | None = None,
    env: Mapping[str, str] | None = None,
    spool_path: Path | None = None,
    retry_seconds: float = 5.0,
    read_timeout_seconds: float = DEFAULT_READ_TIMEOUT_SECONDS,
    repeat_after_seconds: float = DEFAULT_REPEAT_AFTER_SECONDS,
    clock: Callable[[], datetime] | None = None,
) -> Starlette:
    """The receiver app: `POST /webhook` for GitHub, `GET /healthz` for probes.

    Events go to `emit` when given (tests, benchmarks), else to `{prefect_api_url}/events`
    through an httpx client on `http_transport`. Without a secret the app is refused unless
    `insecure_no_signature` says that unsigned deliveries are meant (a local demo).

    With `spool_path`, an accepted delivery is written to the spool (`deployments.spool`)
    before it is answered, and posted from there in arrival order, now or — while Prefect is
    down — every `retry_seconds` and after a restart: 200 when Prefect took it at once, 202
    when it waits in the spool. Without one, a Prefect that does not take the event is a 502.

    A delivery whose signed body was taken less than `repeat_after_seconds` ago (or still waits
    in the spool) is answered `duplicate` and not emitted; an older one is emitted again under a
    new event id, so that GitHub's Redeliver restarts what the first one did not. `clock` is the
    spool's clock (tests).
    """
    if not secret and not insecure_no_signature:
        raise ValueError(
            f"no webhook secret: set {SECRET_ENV} (or a Prefect Secret block), "
            "or pass --insecure-no-signature for a local demo"
        )
    if max_body_bytes <= 0:
        raise ValueError("max_body_bytes must be positive")
    events_api: PrefectEventsAPI | None = None
    if emit is None:
        if not prefect_api_url:
            raise ValueError("give either emit or prefect_api_url (e.g. http://127.0.0.1:4200/api)")
        events_api = PrefectEventsAPI(
            prefect_api_url,
            transport=http_transport,
            headers=prefect_auth_headers(os.environ if env is None else env),
        )
        emit = events_api
    logger = logging.getLogger(LOGGER_NAME)
    if not secret:
        logger.warning("receiver accepts UNSIGNED deliveries (--insecure-no-signature)")
    spool = Spool(spool_path, repeat_after=timedelta(seconds=repeat_after_seconds), clock=clock)
    deliver = _Courier(emit, spool, durable=spool_path is not None, logger=logger)

    async def webhook(request: Request) -> Response:
        log = _DeliveryLog(
            delivery=request.headers.get("x-github-delivery", "-"),
            event=request.headers.get("x-github-event", "-"),
        )
        try:
            try:
                async with asyncio.timeout(read_timeout_seconds):
                    raw = await _read_body(request, max_body_bytes)
            except TimeoutError as exc:  # a trickling client must not hold a worker
                detail = f"the body did not arrive within {read_timeout_seconds:g} s"
                raise _Reject(408, "too-slow", detail) from exc
            status, body = await _handle(request, raw, log, secret, deliver)
        except _Reject as reject:
            log.outcome, log.detail = reject.outcome, reject.detail
            log.status = reject.status
            log.write(logger)
            return JSONResponse(
                {"outcome": reject.outcome, "detail": reject.detail},
                status_code=reject.status,
                headers=CLOSE if reject.status in (408, 413) else None,
            )
        except Exception:
            log.outcome, log.status = "error", 500
            logger.exception("delivery=%s unexpected error", log.delivery)
            log.write(logger)
            return JSONResponse({"outcome": "error"}, status_code=500)
        log.status = status
        log.write(logger)
        return JSONResponse(body, status_code=status)

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        tending = asyncio.create_task(deliver.keep_tending(retry_seconds))
        try:
            yield
        finally:
            tending.cancel()
            with suppress(asyncio.CancelledError):
                await tending
            spool.close()
            if events_api is not None:
                await events_api.aclose()

    return Starlette(
        routes=[
            Route("/webhook", webhook, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
        ],
        lifespan=lifespan,
    )


@dataclass(frozen=True)
class _Delivered:
    outcome: str  # emitted, spooled or duplicate
    admission: Admission


class _Courier:
    """Takes each event to Prefect: straight through, or through the spool file when there is
    one; either way the spool recognises a repeat first."""

    def __init__(self, emit: Emit, spool: Spool, *, durable: bool, logger: logging.Logger) -> None:
        self.emit, self.spool, self.durable, self.logger = emit, spool, durable, logger
        self._draining = asyncio.Lock()

    async def __call__(self, event: dict[str, Any], body_sha256: str) -> _Delivered:
        try:
            admission = await asyncio.to_thread(self.spool.admit, event, body_sha256)
        except Exception as exc:
            raise _Reject(503, "spool-failed", f"could not keep the delivery: {exc}") from exc
        if admission.outcome == "duplicate":
            return _Delivered("duplicate", admission)
        if not self.durable:
            try:
                await self.emit(admission.event)
            except Exception as exc:
                await asyncio.to_thread(self.spool.forget, admission.seq)  # may come again
                raise _Reject(502, "emit-failed", str(exc) or type(exc).__name__) from exc
            await asyncio.to_thread(self.spool.mark_posted, admission.seq)
            return _Delivered("emitted", admission)
        await self.drain()
        posted = await asyncio.to_thread(self.spool.posted, str(admission.event["id"]))
        return _Delivered("emitted" if posted else "spooled", admission)

    async def drain(self) -> int:
        """Post pending events in arrival order; stop at the first that Prefect refuses."""
        posted = 0
        async with self._draining:
            while batch := await asyncio.to_thread(self.spool.pending):
                for item in batch:
                    try:
                        await self.emit(item.event)
                    except Exception as exc:
                        self.logger.warning(
                            "Prefect did not take spooled event %s (%s): kept for a retry",
                            item.event["id"],
                            exc,
                        )
                        return posted
                    await asyncio.to_thread(self.spool.mark_posted, item.seq)
                    posted += 1
        return posted

    async def keep_tending(self, every: float) -> None:
        """Post what waits in the spool file, and prune what is old, every ``every`` seconds."""
        while True:
            if self.durable:
                await self.drain()
            await asyncio.to_thread(self.spool.prune)
            await asyncio.sleep(every)


async def _handle(
    request: Request, raw: bytes, log: _DeliveryLog, secret: str | None, deliver: _Courier
) -> tuple[int, dict[str, Any]]:
    if secret and not verify_signature(secret, raw, request.headers.get("x-hub-signature-256")):
        raise _Reject(401, "bad-signature", "missing or invalid X-Hub-Signature-256")
    event_name = request.headers.get("x-github-event")
    if not event_name:
        raise _Reject(400, "malformed", "missing X-GitHub-Event")
    payload = _parse(raw, request.headers.get("content-type", ""))
    action = payload.get("action")
    log.action = action if isinstance(action, str) else "-"
    log.pr = _pr_label(payload)

    if event_name == "ping":
        log.outcome = "pong"
        return 200, {"outcome": "pong", "zen": payload.get("zen")}
    try:
        event = event_from_delivery(
            event_name, request.headers.get("x-github-delivery", ""), payload
        )
    except MalformedDelivery as exc:
        raise _Reject(400, "malformed", str(exc)) from exc
    if event is None:
        log.outcome = "ignored"
        return 202, {"outcome": "ignored"}
    delivered = await deliver(event, hashlib.sha256(raw).hexdigest())
    admission = delivered.admission
    log.outcome = delivered.outcome
    answer: dict[str, Any] = {
        "outcome": delivered.outcome,
        "event": event["event"],
        "id": admission.event["id"],
    }
    if admission.repeat_of:
        answer["repeat_of"] = admission.repeat_of
    if delivered.outcome == "duplicate":
        window = deliver.spool.repeat_after.total_seconds()
        answer["detail"] = (
            f"the same delivery was taken at {admission.first_accepted_at} and "
            + ("still waits for Prefect" if admission.pending else "reached Prefect")
            + f"; a repeat is emitted again once it is {window:g} s old"
        )
        return (202 if admission.pending else 200), answer
    return (200 if delivered.outcome == "emitted" else 202), answer


async def _read_body(request: Request, limit: int) -> bytes:
    """The raw body, refused past `limit` bytes whatever Content-Length claims."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise _Reject(400, "malformed", "invalid Content-Length") from None
        if size > limit:
            raise _Reject(413, "too-large", f"body over {limit} bytes")
    chunks: list[bytes] = []
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit:
                raise _Reject(413, "too-large", f"body over {limit} bytes")
            chunks.append(chunk)
    except ClientDisconnect:
        raise _Reject(400, "disconnected", "client went away mid-body") from None
    return b"".join(chunks)


def _parse(raw: bytes, content_type: str) -> dict[str, Any]:
    """The JSON object of a delivery, sent as application/json or as GitHub's form encoding."""
    try:
        if content_type.split(";")[0].strip().lower() == "application/x-www-form-urlencoded":
            form = parse_qs(raw.decode("utf-8"), strict_parsing=True)
            text: str | bytes = form["payload"][0]
        else:
            text = raw
        payload = json.loads(text)
    except (ValueError, KeyError, RecursionError):
        raise _Reject(400, "malformed", "body is not JSON") from None
    if not isinstance(payload, dict):
        raise _Reject(400, "malformed", "body is not a JSON object")
    return payload


def _pr_label(payload: dict[str, Any]) -> str:
    pr = payload.get("pull_request")
    repo = payload.get("repository")
    number = pr.get("number") if isinstance(pr, dict) else None
    name = repo.get("full_name") if isinstance(repo, dict) else None
    if number is None:
        return "-"
    return f"{name or '?'}#{number}"


def server_options(
    *,
    header_timeout_seconds: float = DEFAULT_HEADER_TIMEOUT_SECONDS,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
) -> dict[str, Any]:
    """uvicorn's settings for the receiver (`uvicorn.Config(app, **server_options())`).

    A connection gets `header_timeout_seconds` for each request's headers (the app bounds the
    body), and a request that arrives while `max_connections` connections are open is answered
    503 and closed at once rather than queued.
    """
    if header_timeout_seconds <= 0:
        raise ValueError("header_timeout_seconds must be positive")
    if max_connections < 2:
        raise ValueError("max_connections must be at least 2")
    return {
        "http": _header_deadline_protocol(header_timeout_seconds),
        "limit_concurrency": max_connections,
        "timeout_keep_alive": 5,
        "access_log": False,
    }


def _header_deadline_protocol(seconds: float) -> type[asyncio.Protocol]:
    """uvicorn's h11 protocol, but a connection whose request headers are not all in within
    `seconds` (of connecting, or of the previous response) is answered 408 and closed."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    logger = logging.getLogger(LOGGER_NAME)
    body = f"request headers did not arrive within {seconds:g} s".encode()
    timed_out = (
        b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
        + b"connection: close\r\ncontent-length: %d\r\n\r\n" % len(body)
        + body
    )

    class HeaderDeadlineProtocol(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            self._arm()  # before a pipelined request is read: its headers are on time
            super().on_response_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(seconds, self._headers_too_slow)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _headers_too_slow(self) -> None:
            self._deadline = None
            if self.transport.is_closing():
                return
            if self.cycle is not None and not self.cycle.response_complete:
                return  # the headers are in; the app bounds the body
            started = bool(self.conn.trailing_data[0]) or self.conn.their_state is not h11.IDLE
            if started:
                logger.info("connection from %s closed: %s", _peer(self.client), body.decode())
                self.transport.write(timed_out)
            self.transport.close()

    return HeaderDeadlineProtocol


def _peer(client: tuple[str, int] | None) -> str:
    return f"{client[0]}:{client[1]}" if client else "-"


def serve(
    host: str,
    port: int,
    *,
    secret: str | None,
    insecure_no_signature: bool = False,
    prefect_api_url: str | None = None,
    log_level: str = "info",
    spool_path: Path | None = None,
    header_timeout_seconds: float = DEFAULT_HEADER_TIMEOUT_SECONDS,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
) -> None:
    """Run the receiver with uvicorn until interrupted (`pr-preview receiver`).

    Without `prefect_api_url` the Prefect setting `PREFECT_API_URL` is used.
    """
    import uvicorn

    if not prefect_api_url:
        from prefect.settings import PREFECT_API_URL

        prefect_api_url = PREFECT_API_URL.value()
        if not prefect_api_url:
            raise ValueError("set PREFECT_API_URL (e.g. http://127.0.0.1:4200/api)")
    options = server_options(
        header_timeout_seconds=header_timeout_seconds, max_connections=max_connections
    )
    app = create_app(
        secret,
        prefect_api_url=prefect_api_url,
        insecure_no_signature=insecure_no_signature,
        spool_path=spool_path,
    )
    logger = logging.getLogger(LOGGER_NAME)
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(log_level.upper())
    uvicorn.run(app, host=host, port=port, log_level=log_level, **options)
