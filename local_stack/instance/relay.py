"""Byte relays across the wall of an instance's network namespace.

An instance has its own loopback; the host's services (moto, the registry, PostgreSQL) live on
the host's. A Unix socket in a directory both can see crosses that wall: inside, a TCP listener
on the address the instance dials (``127.0.0.1:<moto port>``, ``172.31.39.125:5432``) forwards
to ``<sockets>/out-<n>.sock``; on the host, a listener on that socket forwards to the real TCP
service. The way in (Session Manager's port forwarding) is one socket, ``<sockets>/in.sock``:
the first line a client sends names the instance port, the rest is the stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CHUNK = 65536


@dataclass(frozen=True)
class Bridge:
    """An address the instance dials, and the host service behind it."""

    inside_host: str
    inside_port: int
    host_host: str
    host_port: int

    @classmethod
    def parse(cls, text: str) -> Bridge:
        """``inside_host:port=host_host:port``."""
        inside, _, host = text.partition("=")
        inside_host, _, inside_port = inside.rpartition(":")
        host_host, _, host_port = host.rpartition(":")
        if not (inside_host and host_host and inside_port.isdigit() and host_port.isdigit()):
            raise ValueError(f"bridge {text!r}: expected inside_host:port=host_host:port")
        return cls(inside_host, int(inside_port), host_host, int(host_port))

    @property
    def inside(self) -> tuple[str, int]:
        return self.inside_host, self.inside_port

    def __str__(self) -> str:
        return f"{self.inside_host}:{self.inside_port}={self.host_host}:{self.host_port}"


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(Exception):
            if writer.can_write_eof():
                writer.write_eof()


async def splice(
    client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    connect: Callable[[], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]],
) -> None:
    """Connect onwards and copy both ways; a refused connection closes the client's."""
    reader, writer = client
    try:
        upstream_reader, upstream_writer = await connect()
    except OSError:
        writer.close()
        return
    try:
        await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))
    finally:
        for each in (writer, upstream_writer):
            each.close()


class RelayLoop:
    """An asyncio loop in a thread, holding any number of listeners."""

    def __init__(self, name: str = "relay") -> None:
        self.loop = asyncio.new_event_loop()
        self._servers: dict[str, asyncio.base_events.Server] = {}
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def _run(self, coroutine: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=10)

    def tcp_to_unix(self, key: str, host: str, port: int, socket_path: Path) -> None:
        """Listen on TCP ``host:port``; forward each connection to ``socket_path``."""

        async def start() -> asyncio.base_events.Server:
            async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
                await splice((r, w), lambda: asyncio.open_unix_connection(str(socket_path)))

            return await asyncio.start_server(handle, host, port, reuse_address=True)

        self._servers[key] = self._run(start())

    def unix_to_tcp(self, key: str, socket_path: Path, host: str, port: int) -> None:
        """Listen on ``socket_path``; forward each connection to TCP ``host:port``."""

        async def start() -> asyncio.base_events.Server:
            async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
                await splice((r, w), lambda: asyncio.open_connection(host, port))

            return await asyncio.start_unix_server(handle, str(socket_path))

        self._servers[key] = self._run(start())

    def port_chooser(self, key: str, socket_path: Path, host: str = "127.0.0.1") -> None:
        """Listen on ``socket_path``; the first line names the local port to connect to."""

        async def start() -> asyncio.base_events.Server:
            async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
                line = await r.readline()
                port = line.strip()
                if not port.isdigit() or not 0 < int(port) < 65536:
                    w.close()
                    return
                await splice((r, w), lambda: asyncio.open_connection(host, int(port)))

            return await asyncio.start_unix_server(handle, str(socket_path))

        self._servers[key] = self._run(start())

    def tcp_to_port_chooser(
        self, key: str, host: str, port: int, socket_path: Path, to: int
    ) -> int:
        """Listen on TCP ``host:port`` (0: any free port); each connection reaches port ``to``
        behind the :meth:`port_chooser` at ``socket_path``. Returns the port listened on."""

        async def start() -> asyncio.base_events.Server:
            async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
                reader, writer = await asyncio.open_unix_connection(str(socket_path))
                writer.write(f"{to}\n".encode())
                return reader, writer

            async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
                await splice((r, w), connect)

            return await asyncio.start_server(handle, host, port, reuse_address=True)

        server = self._run(start())
        self._servers[key] = server
        return int(server.sockets[0].getsockname()[1])

    def close(self, key: str) -> None:
        server = self._servers.pop(key, None)
        if server is not None:

            async def stop() -> None:
                server.close()

            with contextlib.suppress(Exception):
                self._run(stop())

    def stop(self) -> None:
        for key in list(self._servers):
            self.close(key)

        async def drain() -> None:
            """End the connections still open, so no task dies pending with the loop."""
            current = asyncio.current_task()
            tasks = [task for task in asyncio.all_tasks() if task is not current]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(Exception):
            self._run(drain())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
