"""How a reviewer reaches a preview: SSM port forwarding (runbook §6.2)."""

from __future__ import annotations

import json
import shlex

PORT_FORWARDING_DOCUMENT = "AWS-StartPortForwardingSession"


def tunnel_argv(
    instance_id: str,
    region: str,
    *,
    app_port: int = 8000,
    local_port: int | None = None,
    profile: str | None = None,
) -> list[str]:
    """The ``aws ssm start-session`` command that forwards the app port to a local one."""
    parameters = json.dumps(
        {"portNumber": [str(app_port)], "localPortNumber": [str(local_port or app_port)]},
        separators=(",", ":"),
    )
    argv = [
        "aws",
        "ssm",
        "start-session",
        "--target",
        instance_id,
        "--document-name",
        PORT_FORWARDING_DOCUMENT,
        "--parameters",
        parameters,
        "--region",
        region,
    ]
    if profile:
        argv += ["--profile", profile]
    return argv


def tunnel_command(
    instance_id: str, region: str, app_port: int = 8000, *, profile: str | None = None
) -> str:
    """``tunnel_argv`` as one line a person can paste into a shell."""
    return shlex.join(tunnel_argv(instance_id, region, app_port=app_port, profile=profile))
