"""The app port's proxy (tasks/cloud/app_proxy.py), run here as the instance runs it: the
script it writes, under this machine's python3, between real sockets."""

from __future__ import annotations

import ast
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from tasks.app.user_data import compose_file
from tasks.cloud.app_proxy import PROXY_SOURCE, side_by_side, upstream_ports
from tasks.config import PreviewConfig
from tasks.steps.compose import ComposeRefused, check_compose, render_compose
from tests.test_instance_runtime import free_port


def serving(name: str) -> ThreadingHTTPServer:
    """An HTTP server on a free loopback port that answers every GET with ``name``."""

    class Answer(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keeps the connection open between requests

        def do_GET(self) -> None:
            body = name.encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Answer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture
def proxy(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """The proxy script on a free port, reading ``tmp_path/upstream``."""
    script, upstream, port = tmp_path / "app-proxy", tmp_path / "upstream", free_port()
    script.write_text(PROXY_SOURCE)
    process = subprocess.Popen([sys.executable, "-I", str(script), str(port), str(upstream)])
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert time.monotonic() < deadline and process.poll() is None, "proxy did not start"
            time.sleep(0.02)
    try:
        yield port, upstream
    finally:
        process.terminate()
        process.wait(10)


def point(upstream: Path, port: int) -> None:
    """As the deploy does: a new file renamed over the old."""
    new = upstream.with_suffix(".new")
    new.write_text(f"{port}\n")
    new.rename(upstream)


def test_each_new_connection_goes_where_the_file_says_and_an_open_one_stays(
    proxy: tuple[int, Path],
) -> None:
    port, upstream = proxy
    blue, green = serving("blue"), serving("green")
    url = f"http://127.0.0.1:{port}/"
    try:
        point(upstream, blue.server_address[1])
        with httpx.Client() as kept:  # one connection, kept alive across the switch
            assert kept.get(url).text == "blue"
            point(upstream, green.server_address[1])
            assert httpx.get(url).text == "green"  # a new connection reads the new file
            assert kept.get(url).text == "blue"  # the open one finishes where it began
        # Nothing behind the named port: the connection is closed, no answer, no hang. Closed
        # before the request arrived, the client reads an end (RemoteProtocolError); after, with
        # the request unread, the kernel resets it (ReadError): a race, and both are "no answer".
        closed = (httpx.RemoteProtocolError, httpx.ReadError)
        point(upstream, free_port())
        with pytest.raises(closed):
            httpx.get(url, timeout=5)
        upstream.write_text("not a port\n")
        with pytest.raises(closed):
            httpx.get(url, timeout=5)
    finally:
        blue.shutdown()
        green.shutdown()


def test_the_proxy_is_python_3_9() -> None:
    """Amazon Linux 2023's python3 is 3.9: nothing newer in its grammar."""
    ast.parse(PROXY_SOURCE, feature_version=(3, 9))


def test_the_upstream_ports_stay_ports_and_never_the_app_port() -> None:
    assert upstream_ports(8000) == (18000, 18001)
    assert upstream_ports(60000) == (49999, 50000)
    with pytest.raises(ValueError):
        upstream_ports(0)


def test_a_file_whose_app_cannot_run_twice_is_recreated_in_place() -> None:
    config = PreviewConfig()

    def rendered(text: str) -> str:
        return render_compose(config, check_compose(config, text, "f.yml"))

    plain = "services:\n  api:\n    image: x\n    ports: ['127.0.0.1:8000:8000']\n"
    assert side_by_side("api", rendered(plain)) is None
    assert side_by_side("api", compose_file(config)) is None
    assert side_by_side("api", None) is None
    named = plain + "    container_name: my-api\n"
    assert side_by_side("api", rendered(named)) == "service api sets container_name"
    metrics = plain.replace("]", ", '127.0.0.1:9100:9100']")
    assert side_by_side("api", rendered(metrics)) == "service api also publishes 9100"


def test_no_other_service_may_take_the_app_port_or_an_upstream_port() -> None:
    config = PreviewConfig()
    text = (
        "services:\n  api: {image: x, ports: ['127.0.0.1:8000:8000']}\n"
        "  admin: {image: y, ports: ['127.0.0.1:8000:80']}\n"
        "  worker: {image: z, ports: ['127.0.0.1:18001:80']}\n"
    )
    with pytest.raises(ComposeRefused) as refused:
        check_compose(config, text, "f.yml")
    message = str(refused.value)
    assert "service admin publishes 8000, the app port" in message
    assert "service worker publishes 18001: pr-preview keeps 18000 and 18001" in message
