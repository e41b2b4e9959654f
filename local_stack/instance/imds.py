"""The instance metadata service of one local instance, one hop away as on EC2.

On EC2, 169.254.169.254 is not a socket on the instance: it answers from outside it, and the
reply to ``PUT /latest/api/token`` leaves with the launch's ``HttpPutResponseHopLimit`` as its IP
TTL. The instance receives it; a container behind the instance's Docker bridge would need the
instance to forward it once more, and the kernel drops a packet whose TTL would reach 0. That is
the whole defence of the instance role against a container, so it is modelled as the kernel
enforces it, not asserted: this server runs in a network namespace of its own beside the
instance (``Sandbox`` joins the two with a veth pair), and sets the token reply's TTL.

Served (IMDSv2 as EC2 answers it; ``HttpTokens=optional`` also takes a GET without a token):

- ``PUT /latest/api/token`` with ``X-aws-ec2-metadata-token-ttl-seconds`` (1–21600);
- ``GET /latest/meta-data/instance-id``, ``local-ipv4``, ``placement/region``,
  ``iam/security-credentials/`` (the role name) and ``iam/security-credentials/<role>`` (the
  instance role's credentials: what the local stack hands its instances).

Run as ``python -m local_stack.instance.imds <config.json>`` inside that namespace.
"""

from __future__ import annotations

import json
import secrets
import socket
import sys
import time
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

ADDRESS = "169.254.169.254"
# The link between an instance and its metadata service: a /30 of link-local addresses.
INSTANCE_SIDE = "169.254.169.253"
PREFIX = 30
MAX_TOKEN_TTL = 21600


class Metadata(BaseHTTPRequestHandler):
    server: MetadataServer
    protocol_version = "HTTP/1.1"
    server_version = "EC2ws"

    def log_message(self, format: str, *args: Any) -> None:
        return

    def _answer(self, status: int, body: str = "", content_type: str = "text/plain") -> None:
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_PUT(self) -> None:
        if self.path != "/latest/api/token":
            self._answer(404, "Not Found")
            return
        ttl = self.headers.get("X-aws-ec2-metadata-token-ttl-seconds", "")
        if not ttl.isdigit() or not 1 <= int(ttl) <= MAX_TOKEN_TTL:
            self._answer(400, "Bad Request")
            return
        token = secrets.token_urlsafe(40)
        self.server.tokens[token] = time.monotonic() + int(ttl)
        # The hop limit: every packet of this reply leaves with it as its TTL.
        self.connection.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, self.server.hop_limit)
        self._answer(200, token)

    def do_GET(self) -> None:
        token = self.headers.get("X-aws-ec2-metadata-token")
        if token is not None:
            if self.server.tokens.get(token, 0) < time.monotonic():
                self._answer(401, "Unauthorized")
                return
        elif self.server.http_tokens == "required":
            self._answer(401, "Unauthorized")
            return
        found = self.server.lookup(self.path)
        if found is None:
            self._answer(404, "Not Found")
        else:
            self._answer(200, *found)


class MetadataServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__((ADDRESS, 80), Metadata)
        self.config = config
        self.hop_limit = int(config["hop_limit"])
        self.http_tokens = str(config["http_tokens"])
        self.tokens: dict[str, float] = {}

    def lookup(self, path: str) -> tuple[str, str] | None:
        role = self.config.get("role") or ""
        base = "/latest/meta-data/"
        values = {
            "instance-id": self.config["instance_id"],
            "local-ipv4": self.config["private_ip"],
            "placement/region": self.config["region"],
        }
        if role:
            values["iam/security-credentials/"] = role
        if not path.startswith(base):
            return None
        key = path[len(base) :]
        if key in values:
            return values[key], "text/plain"
        if role and key == f"iam/security-credentials/{role}":
            now = datetime.now(UTC)
            credentials = {
                "Code": "Success",
                "LastUpdated": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
                "Type": "AWS-HMAC",
                "AccessKeyId": self.config["access_key_id"],
                "SecretAccessKey": self.config["secret_access_key"],
                "Token": "",
                "Expiration": (now + timedelta(hours=6)).strftime("%Y-%m-%dT%H:%M:%SZ"),
            }
            return json.dumps(credentials), "application/json"
        return None


def main(argv: list[str]) -> int:
    config = json.loads(Path(argv[0]).read_text())
    ready = Path(config["ready_file"])
    deadline = time.monotonic() + 30
    while True:  # the address appears once the host has moved our end of the veth in
        try:
            server = MetadataServer(config)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)
    ready.write_text("ready")
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
