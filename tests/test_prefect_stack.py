"""The local stack's Prefect server: it starts even when its free port is taken first."""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import local_stack.prefect_server as prefect_server
from local_stack.processes import free_port, listens_on

pytestmark = pytest.mark.server


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port another process holds, as one did when test workers started servers at once."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        yield int(held.getsockname()[1])


def test_a_server_whose_port_was_taken_starts_on_another(
    tmp_path: Path, taken_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    ports = iter([taken_port])
    monkeypatch.setattr(prefect_server, "free_port", lambda: next(ports, None) or free_port())

    with prefect_server.prefect_stack(tmp_path / "prefect") as stack:
        assert f":{taken_port}/" not in stack.api_url
        assert httpx.get(f"{stack.api_url}/health", timeout=10).status_code == 200
        log = (tmp_path / "prefect" / "server.log").read_text()
        # The first server did meet the taken port, and said so.
        assert f"Port {taken_port} is already in use" in log


def test_listens_on_tells_the_owner_of_a_port_from_another_process(taken_port: int) -> None:
    """What the server's start waits for before its first health check: its own socket, read
    from /proc, so a port another process took is never sent a request."""
    assert listens_on(os.getpid(), taken_port)
    other = subprocess.Popen(["sleep", "30"])
    try:
        assert not listens_on(other.pid, taken_port)
    finally:
        other.kill()
        other.wait()
    assert not listens_on(os.getpid(), free_port())


@pytest.mark.usefixtures("prefect_server")
def test_the_tests_session_server_begins_every_sqlite_transaction_immediate() -> None:
    """The flows the tests run in process talk to a server on local_stack.sqlite_server's
    factory, as the local stack's servers run on its ``main``."""
    from prefect.server.api.server import SubprocessASGIServer

    process = SubprocessASGIServer._instances[None].server_process
    assert process is not None and process.poll() is None
    argv = Path(f"/proc/{process.pid}/cmdline").read_bytes().split(b"\0")
    assert b"local_stack.sqlite_server:create_app" in argv
