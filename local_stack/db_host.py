"""The runbook's database host for ``database: per-preview``: an EC2 instance in moto, a real
PostgreSQL, and the host's shell behind SSM Run Command.

- **The instance**: ``db-server`` at the runbook's private address (172.31.39.125) in the
  account's subnet, in db-sg, without our Purpose tag (pr-preview never terminates it).
- **The server**: a real PostgreSQL (``local_stack.postgres``) on 127.0.0.1 for the apps
  (scram-sha-256, relayed into local instances at 172.31.39.125:5432), with an admin door: a
  Unix socket on which only the superuser logs in, by peer authentication, as the system user
  the server runs as.
- **Its shell**: a command sent to the instance runs in real bash with ``psql`` reaching the
  socket and the local ``sudo`` shim, so the flow's ``sudo -u postgres psql`` is PostgreSQL's
  own peer authentication at work. Two ways: on this machine, wired into moto's SSM through
  :class:`~local_stack.scripted_instance.ScriptedInstances` (``serve``, the tests); or as a
  real local instance whose user data (``user_data``) installs that ``psql`` (``make demo``).
"""

from __future__ import annotations

import ipaddress
import os
import pwd
import shlex
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from local_stack.instance.sandbox import SHIMS, SYSTEM_PATH
from local_stack.postgres import Postgres, bin_dir, postgres_server, server_user
from local_stack.scripted_instance import Call, Reply, ScriptedInstances

if TYPE_CHECKING:
    from mypy_boto3_ec2 import EC2Client

DB_HOST_IP = "172.31.39.125"
DB_HOST_NAME = "db-server"
COMMAND_TIMEOUT = 300
CLIENTS = ("psql", "pg_dump", "pg_restore")  # what a database host has of PostgreSQL's


@dataclass(frozen=True)
class DbHost:
    instance_id: str
    postgres: Postgres
    socket_dir: Path

    def env(self) -> dict[str, str]:
        """The environment a command on the host runs with (as the SSM agent's root shell)."""
        return {
            "PATH": f"{SHIMS}:{bin_dir()}:{SYSTEM_PATH}",
            "PGHOST": str(self.socket_dir),
            "PGPORT": str(self.postgres.port),
            # What psql assumes as the system user postgres: that role, its database.
            "PGUSER": "postgres",
            "PGDATABASE": "postgres",
            "PR_PREVIEW_POSTGRES_USER": server_user() or pwd.getpwuid(os.geteuid()).pw_name,
            "HOME": "/root",
            "LANG": "C.UTF-8",
        }

    def run(self, script: str) -> Reply:
        """``script`` in real bash on the host, as Run Command's AWS-RunShellScript runs it."""
        done = subprocess.run(
            ["bash", "-c", script],
            capture_output=True,
            text=True,
            env=self.env(),
            cwd="/",
            timeout=COMMAND_TIMEOUT,
            check=False,
        )
        return Reply(stdout=done.stdout, stderr=done.stderr, exit_code=done.returncode)

    def user_data(self) -> str:
        """The bootstrap of a real local instance that is this host: ``psql`` in
        /usr/local/bin speaking to the server's admin socket, and the system user that stands
        for ``postgres`` (the sudo shim reads it)."""
        user = self.env()["PR_PREVIEW_POSTGRES_USER"]
        variables = " ".join(
            f"{name}={shlex.quote(self.env()[name])}"
            for name in ("PGHOST", "PGPORT", "PGUSER", "PGDATABASE")
        )
        lines = [
            "#!/bin/bash",
            "# The local database host: PostgreSQL serves beside this instance",
            "# (local_stack/db_host.py); here are its clients and its admin door.",
            "set -euo pipefail",
            "mkdir -p /run/pr-preview-db-host",
            f"echo {shlex.quote(user)} > /run/pr-preview-db-host/postgres-user",
        ]
        for program in CLIENTS:
            lines += [
                f"cat > /usr/local/bin/{program} <<'CLIENT'",
                "#!/bin/bash",
                f"export {variables}",
                f'exec {shlex.quote(str(bin_dir() / program))} "$@"',
                "CLIENT",
                f"chmod 755 /usr/local/bin/{program}",
            ]
        return "\n".join([*lines, "echo 'database host ready'"])

    def serve(self, fake: ScriptedInstances) -> None:
        """Answer every command sent to this instance by running it."""

        def respond(call: Call) -> Reply:
            return self.run(call.command)

        fake.respond(r"(?s).", respond, instance_id=self.instance_id)

    def databases(self) -> list[str]:
        found = self.postgres.execute("SELECT datname FROM pg_database ORDER BY datname")
        return found.split()

    def roles(self) -> list[str]:
        return self.postgres.execute("SELECT rolname FROM pg_roles ORDER BY rolname").split()


def launch_db_host(ec2: EC2Client, security_group_id: str, user_data: str = "") -> str:
    """The database host's instance in moto: the runbook's address (in the default VPC's
    subnet that holds it), db-sg, no Purpose tag."""
    image = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    subnets = ec2.describe_subnets()["Subnets"]
    [subnet_id] = [
        s["SubnetId"]
        for s in subnets
        if ipaddress.ip_address(DB_HOST_IP) in ipaddress.ip_network(s["CidrBlock"])
    ]
    found = ec2.run_instances(
        ImageId=image,
        InstanceType="t3.medium",
        MinCount=1,
        MaxCount=1,
        SubnetId=subnet_id,
        PrivateIpAddress=DB_HOST_IP,
        SecurityGroupIds=[security_group_id],
        UserData=user_data,
        TagSpecifications=[
            {"ResourceType": "instance", "Tags": [{"Key": "Name", "Value": DB_HOST_NAME}]}
        ],
    )
    return found["Instances"][0]["InstanceId"]


@contextmanager
def db_host(home: Path, instance_id: str) -> Iterator[DbHost]:
    """A real PostgreSQL with its admin socket, for the database host ``instance_id``."""
    # A short path: a Unix socket's path is at most 107 bytes.
    socket_dir = Path(tempfile.mkdtemp(prefix="pr-preview-pg-"))
    os.chmod(socket_dir, 0o755)
    try:
        with postgres_server(home / "data", socket_dir=socket_dir) as server:
            yield DbHost(instance_id, server, socket_dir)
    finally:
        for leftover in socket_dir.iterdir():
            leftover.unlink(missing_ok=True)
        socket_dir.rmdir()
