"""Receiver throughput: signed GitHub deliveries/s and p50/p99 latency, beside a bare endpoint.

Three servers, each uvicorn on 127.0.0.1 in its own process, measured one after the other in
the same run with the same body (GitHub's documented `pull_request.opened`, ~28 KB):

  bare      a Starlette endpoint that reads the body and answers 200 — the floor
  receiver  create_app(...) with emit stubbed to a no-op: signature, JSON, mapping, log line
  +sink     create_app(...) posting each event to a fake Prefect `POST /api/events` (204)

The load generator is a minimal keep-alive HTTP/1.1 client on raw asyncio streams so that it
costs less than the servers it measures. Usage: python bench/bench_receiver.py [-n 3000] [-c 8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import multiprocessing
import os
import socket
import statistics
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PAYLOAD = ROOT / "tests" / "data" / "github-payloads" / "pull_request.opened.json"
SECRET = "bench-secret"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _bare_app() -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    async def webhook(request: Request) -> Response:
        await request.body()
        return JSONResponse({"outcome": "ok"})

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    return Starlette(
        routes=[Route("/webhook", webhook, methods=["POST"]), Route("/healthz", healthz)]
    )


def _sink_app() -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    async def events(request: Request) -> Response:
        await request.body()
        return Response(status_code=204)

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    return Starlette(
        routes=[Route("/api/events", events, methods=["POST"]), Route("/healthz", healthz)]
    )


def _receiver_app(sink_url: str | None) -> Any:
    from deployments.receiver import LOGGER_NAME, create_app

    # The one line per delivery is formatted and written, as in production, to /dev/null.
    logger = logging.getLogger(LOGGER_NAME)
    logger.addHandler(logging.StreamHandler(open(os.devnull, "w")))  # noqa: SIM115
    logger.setLevel(logging.INFO)
    logger.propagate = False
    if sink_url:
        return create_app(SECRET, prefect_api_url=sink_url)

    async def emit(event: dict[str, Any]) -> None:
        return None

    return create_app(SECRET, emit)


def _serve(kind: str, port: int, sink_url: str | None) -> None:
    import uvicorn

    app = (
        _receiver_app(sink_url)
        if kind == "receiver"
        else {"bare": _bare_app, "sink": _sink_app}[kind]()
    )
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


@dataclass
class Server:
    process: multiprocessing.process.BaseProcess
    port: int

    def stop(self) -> None:
        self.process.terminate()
        self.process.join(5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


def start(kind: str, sink_url: str | None = None) -> Server:
    port = _free_port()
    process = multiprocessing.get_context("spawn").Process(
        target=_serve, args=(kind, port, sink_url), daemon=True
    )
    process.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2) as sock:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                if sock.recv(64).startswith(b"HTTP/1.1 200"):
                    return Server(process, port)
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise RuntimeError(f"{kind} server did not start on port {port}")


def requests(body: bytes, count: int) -> list[bytes]:
    """Signed deliveries as GitHub sends them, each its own body and delivery GUID (the
    receiver answers a repeated body `duplicate` without emitting it)."""
    from deployments.receiver import signature_header

    payload = json.loads(body)
    batch = []
    for seq in range(count):
        one = json.dumps(payload | {"bench_seq": seq}).encode()
        head = (
            "POST /webhook HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: GitHub-Hookshot/bench\r\n"
            "Content-Type: application/json\r\nX-GitHub-Event: pull_request\r\n"
            f"X-Hub-Signature-256: {signature_header(SECRET, one)}\r\n"
            f"Content-Length: {len(one)}\r\nX-GitHub-Delivery: {uuid.uuid4()}\r\n\r\n"
        )
        batch.append(head.encode() + one)
    return batch


async def _worker(
    port: int, queue: list[bytes], latencies: list[float], statuses: dict[int, int]
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while queue:
            request = queue.pop()
            started = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if length:
                await reader.readexactly(length)
            latencies.append(time.perf_counter() - started)
            status = int(head.split(b" ", 2)[1])
            statuses[status] = statuses.get(status, 0) + 1
    finally:
        writer.close()


async def load(port: int, batch: list[bytes], concurrency: int) -> tuple[float, list[float], dict]:
    queue = list(batch)
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    started = time.perf_counter()
    await asyncio.gather(*(_worker(port, queue, latencies, statuses) for _ in range(concurrency)))
    return time.perf_counter() - started, latencies, statuses


@dataclass
class Figures:
    name: str
    rate: float
    p50_ms: float
    p99_ms: float
    statuses: dict[int, int]


def measure(name: str, port: int, body: bytes, count: int, concurrency: int) -> Figures:
    asyncio.run(load(port, requests(body, min(300, count)), concurrency))  # warm up
    elapsed, latencies, statuses = asyncio.run(load(port, requests(body, count), concurrency))
    cuts = statistics.quantiles(latencies, n=100)
    return Figures(name, count / elapsed, cuts[49] * 1000, cuts[98] * 1000, statuses)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--requests", type=int, default=3000)
    parser.add_argument("-c", "--concurrency", type=int, default=8)
    args = parser.parse_args()
    body = PAYLOAD.read_bytes()

    sink = start("sink")
    results: list[Figures] = []
    try:
        for name, kind, sink_url in [
            ("bare endpoint", "bare", None),
            ("receiver, emit no-op", "receiver", None),
            ("receiver → events sink", "receiver", f"http://127.0.0.1:{sink.port}/api"),
        ]:
            server = start(kind, sink_url)
            try:
                results.append(measure(name, server.port, body, args.requests, args.concurrency))
            finally:
                server.stop()
    finally:
        sink.stop()

    bare = results[0]
    print(
        f"receiver benchmark: {args.requests} signed pull_request.opened deliveries "
        f"({len(body)} B), concurrency {args.concurrency}, uvicorn on 127.0.0.1, "
        f"{os.cpu_count()} CPUs"
    )
    print(f"{'server':<24} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'vs bare':>8}  statuses")
    for figures in results:
        print(
            f"{figures.name:<24} {figures.rate:>8.0f} {figures.p50_ms:>8.2f} "
            f"{figures.p99_ms:>8.2f} {figures.rate / bare.rate:>8.2f}  {figures.statuses}"
        )
    print(
        "The +sink row adds one httpx POST per delivery to a second uvicorn process; "
        "all three processes share the CPUs with the load generator."
    )
    for figures in results:
        if set(figures.statuses) != {200}:
            raise SystemExit(f"{figures.name}: unexpected statuses {figures.statuses}")


if __name__ == "__main__":
    main()
