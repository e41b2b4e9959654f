"""The app port's proxy on the instance: what lets a deploy swap versions with no failed request.

``127.0.0.1:<app_port>`` (where `pr-preview tunnel`, the probe and the idle sampler look) is held
by a small TCP proxy of pr-preview's own, a systemd unit the user data installs, never the PR's.
It forwards each new connection to the loopback port named in :data:`UPSTREAM_FILE`, read per
connection. The app's container publishes one of two upstream ports (``APP_HOST_PORT`` in the
app dir's ``.env``): a deploy starts the new version beside the old one on the other port,
probes it there, and only then renames a new upstream file into place; connections already
open finish on the old version, which stops after them (tasks/steps/update.py).

The proxy is Python's standard library alone (Amazon Linux 2023's python3 is 3.9), protocol
blind, and keeps no state but the open connections: a restart loses nothing the file does not
say again.
"""

from __future__ import annotations

import shlex

import yaml

from tasks.cloud.on_instance import STATE_DIR, SYSTEM_UNITS, strict_port

UPSTREAM_FILE = f"{STATE_DIR}/upstream"
PROXY_UNIT = "pr-preview-proxy"
PROXY_SCRIPT = "/usr/local/lib/pr-preview/app-proxy"
HOST_PORT_VARIABLE = "APP_HOST_PORT"  # in the app dir's .env: the port the app publishes
PROXIED_PORT = f"${{{HOST_PORT_VARIABLE}}}"  # how the app's compose file publishes it
UPSTREAM_OFFSET = 10_000  # the two upstream ports sit this far above the app port (or below)

# Python 3.9's standard library only; run as ``python3 -I <script> <listen port> <upstream file>``.
PROXY_SOURCE = '''\
"""pr-preview: 127.0.0.1:<port> forwarded to the port named in <file>, read per connection."""
import asyncio
import sys

LISTEN, UPSTREAM = int(sys.argv[1]), sys.argv[2]


def upstream():
    try:
        with open(UPSTREAM) as file:
            port = int(file.read(16).strip())
    except (OSError, ValueError):
        return None
    return port if 0 < port < 65536 else None


async def pipe(reader, writer):
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (OSError, RuntimeError):
        writer.close()


async def forward(reader, writer):
    try:
        port = upstream()
        if port is None:
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            return
        try:
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        finally:
            up_writer.close()
    finally:
        writer.close()


async def main():
    server = await asyncio.start_server(forward, "127.0.0.1", LISTEN, reuse_address=True)
    async with server:
        await server.serve_forever()


asyncio.run(main())
'''


def upstream_ports(app_port: int) -> tuple[int, int]:
    """The two loopback ports the app's versions take turns on: ``app_port`` + 10000 and
    + 10001, or - 10001 and - 10000 where that would pass 65535."""
    port = strict_port(app_port)
    first = port + UPSTREAM_OFFSET if port + UPSTREAM_OFFSET < 65535 else port - UPSTREAM_OFFSET - 1
    return first, first + 1


def proxy_unit(app_port: int) -> str:
    """The systemd unit: restarted whenever it stops, started at every boot (a woken preview's
    app port comes back with it), no privilege beyond binding the port."""
    argv = [PROXY_SCRIPT, str(strict_port(app_port)), UPSTREAM_FILE]
    return "\n".join(
        [
            "[Unit]",
            "Description=pr-preview app port (forwards to the version the last deploy switched to)",
            "After=network.target",
            "[Service]",
            f"ExecStart=/usr/bin/python3 -I {' '.join(argv)}",
            "Restart=always",
            "RestartSec=1",
            "DynamicUser=yes",
            "AmbientCapabilities=CAP_NET_BIND_SERVICE",
            "NoNewPrivileges=yes",
            "[Install]",
            "WantedBy=multi-user.target",
        ]
    )


def upstream_write(port: str) -> list[str]:
    """Shell lines (under ``set -e``) that point the proxy at ``port`` (a shell word: a quoted
    value or ``"$var"``): a new file renamed over the old, so a connection reads either."""
    target = shlex.quote(UPSTREAM_FILE)
    return [
        f"tmp=$(mktemp {target}.XXXXXX)",
        f"printf '%s\\n' {port} > \"$tmp\"",
        'chmod 644 "$tmp"',  # the unit's dynamic user reads it
        f'mv -fT "$tmp" {target}',
    ]


def proxy_install(app_port: int) -> str:
    """User-data lines (``put`` defined, ``set -e``) that install the proxy, point it at the
    first upstream port (the one ``.env`` names at boot) and start it (enabled: it starts again
    at every boot)."""
    q = shlex.quote
    first, _ = upstream_ports(app_port)
    unit_path = f"{SYSTEM_UNITS}/{PROXY_UNIT}.service"
    return "\n".join(
        [
            f"mkdir -p {q(PROXY_SCRIPT.rsplit('/', 1)[0])} {q(SYSTEM_UNITS)}",
            f"printf '%s' {q(PROXY_SOURCE)} | put {q(PROXY_SCRIPT)}",
            f"chmod 755 {q(PROXY_SCRIPT)}",
            f"printf '%s\\n' {q(proxy_unit(app_port))} | put {q(unit_path)}",
            f"chmod 644 {q(unit_path)}",
            *upstream_write(q(str(first))),
            "systemctl daemon-reload",
            f"systemctl enable --now {PROXY_UNIT}.service",
        ]
    )


def side_by_side(app_service: str, compose: str | None) -> str | None:
    """Why the app service of ``compose`` (the file the instance runs: the rendered JSON, or
    YAML; None: the generated file) cannot run twice at once, or None when it can. A fixed
    ``container_name`` cannot be taken twice, nor a host port other than the upstream one; a
    push then recreates the app in place, as before the proxy: a moment without an answer."""
    if compose is None:
        return None  # the generated file: the app publishes the upstream port alone
    document = yaml.safe_load(compose) or {}
    service = (document.get("services") or {}).get(app_service) or {}
    if service.get("container_name"):
        return f"service {app_service} sets container_name"
    published = [
        str(port.get("published")) if isinstance(port, dict) else str(port).split(":")[-2:][0]
        for port in service.get("ports") or []
    ]
    if others := [port for port in published if port != PROXIED_PORT]:
        return f"service {app_service} also publishes {', '.join(others)}"
    return None
