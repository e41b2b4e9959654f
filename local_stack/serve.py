"""Serve an ``httpx`` handler on 127.0.0.1, so code that speaks real HTTP can meet a fake.

The demo's registry and the tests' fake GitHub are plain ``httpx.Request → httpx.Response``
functions; this puts one behind a real socket (uvicorn in a thread), which is what flows see
when they run in another thread or process.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

import httpx

Handler = Callable[[httpx.Request], httpx.Response]
HOP_BY_HOP = {"content-encoding", "content-length", "transfer-encoding", "connection"}


def asgi_app(handler: Handler) -> Callable[..., Any]:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        host, port = scope["server"]
        query = scope.get("query_string", b"").decode()
        url = f"http://{host}:{port}{scope['path']}" + (f"?{query}" if query else "")
        headers = [(k.decode(), v.decode()) for k, v in scope["headers"]]
        try:
            response = handler(httpx.Request(scope["method"], url, headers=headers, content=body))
            content = response.read()
        except httpx.HTTPError as exc:
            response, content = httpx.Response(502), str(exc).encode()
        out = [
            (k.encode(), v.encode())
            for k, v in response.headers.items()
            if k.lower() not in HOP_BY_HOP
        ]
        out.append((b"content-length", str(len(content)).encode()))
        await send({"type": "http.response.start", "status": response.status_code, "headers": out})
        await send({"type": "http.response.body", "body": content})

    return app


@contextmanager
def serve_handler(handler: Handler, host: str = "127.0.0.1") -> Iterator[str]:
    """Run ``handler`` as an HTTP server until the block ends; yields its base URL."""
    with serve_asgi(asgi_app(handler), host=host, lifespan="off") as url:
        yield url


@contextmanager
def serve_asgi(
    app: Any,
    host: str = "127.0.0.1",
    lifespan: Literal["auto", "on", "off"] = "auto",
    **options: Any,
) -> Iterator[str]:
    """Run an ASGI ``app`` with uvicorn in a thread until the block ends; yields its base URL.

    ``options`` go to ``uvicorn.Config`` (the receiver's ``server_options()``)."""
    import uvicorn

    config = uvicorn.Config(
        app, host=host, port=0, log_level="warning", lifespan=lifespan, **options
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="local-asgi", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("local HTTP server did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=5)
