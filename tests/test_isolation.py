"""A preview is a tenant: what its containers can and cannot reach, shown on a real Docker Engine.

Every instance here boots for real (``real_instances``): real dockerd, containerd and runc in the
instance's namespaces, and the instance metadata service one veth hop away, replying to a token
request with the launch's hop limit as the IP TTL. Nothing is asserted about a mock: each claim
is what a process inside a container really got.
"""

from __future__ import annotations

import json
import shlex
from typing import Any

import pytest

from local_stack.images import ImageBuilder
from local_stack.instance.runtime import InstanceRuntime
from tasks.aws import AwsClients
from tasks.config import PreviewConfig
from tasks.run_instances import resolve_ami, run_instances_params
from tests.test_instance_runtime import run

# What a process asks IMDS for, with Python's standard library only (the base image's).
IMDS_PROBE = """
import json, urllib.request, urllib.error
base = "http://169.254.169.254/latest"
out = {}
put = urllib.request.Request(base + "/api/token", method="PUT",
                             headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"})
try:
    out["token"] = len(urllib.request.urlopen(put, timeout=3).read())
except Exception as exc:
    out["token"] = type(exc).__name__
try:
    urllib.request.urlopen(base + "/meta-data/instance-id", timeout=3)
    out["get_without_token"] = 200
except urllib.error.HTTPError as exc:
    out["get_without_token"] = exc.code
except Exception as exc:
    out["get_without_token"] = type(exc).__name__
print(json.dumps(out))
"""


def docker_ready_user_data() -> str:
    """Docker as the preview's user data installs it, and the base image loaded into it."""
    base = ImageBuilder().base().path
    return "\n".join(
        [
            "#!/bin/bash",
            "set -euo pipefail",
            "dnf -y install docker",
            "systemctl enable --now docker",
            f"docker import {shlex.quote(str(base))} probe:1",
            "docker network create previews",
            "touch /run/docker-ready",
        ]
    )


def launch(aws: AwsClients, config: PreviewConfig, hop_limit: int | None = None) -> str:
    """RunInstances as a preview's launch sends it; ``hop_limit`` overrides its metadata hop
    limit (the AMI default of 2 that the launch exists to avoid)."""
    params = run_instances_params(
        config,
        ami_id=resolve_ami(aws.ec2, config)["ImageId"],
        subnet_id=config.subnet_id,
        user_data=docker_ready_user_data(),
    )
    if hop_limit is not None:
        params["MetadataOptions"] = {
            **params["MetadataOptions"],
            "HttpPutResponseHopLimit": hop_limit,
        }
    instance_id: str = aws.ec2.run_instances(**params)["Instances"][0]["InstanceId"]
    return instance_id


def imds_views(aws: AwsClients, instance_id: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """What the instance itself and a container on a bridge network get from IMDS."""
    probe = shlex.quote(IMDS_PROBE)
    answer = run(
        aws,
        instance_id,
        "for _ in $(seq 600); do [ -e /run/docker-ready ] && break; sleep 0.1; done",
        f"python3 -c {probe}",
        f"docker run --rm --network previews probe:1 python3 -c {probe}",
    )
    assert answer["Status"] == "Success", answer["StandardErrorContent"]
    host, container = answer["StandardOutputContent"].strip().splitlines()[-2:]
    return json.loads(host), json.loads(container)


@pytest.mark.usefixtures("real_instances")
def test_a_container_gets_no_imds_token_while_its_instance_does(
    aws: AwsClients, config: PreviewConfig, real_instances: InstanceRuntime
) -> None:
    """The launch's hop limit of 1, enforced by the kernel: the token reply reaches the
    instance and dies on the hop to the container. The container does reach IMDS (a GET
    without a token is answered 401), and on an instance launched with a hop limit of 2 the
    same container gets a token: it is the TTL, not the routing, that keeps the role out."""
    preview = launch(aws, config)
    host, container = imds_views(aws, preview)
    assert isinstance(host["token"], int) and host["token"] > 20, host
    assert host["get_without_token"] == 401  # HttpTokens=required
    assert container["token"] in ("TimeoutError", "URLError"), container
    assert container["get_without_token"] == 401, container

    loose = launch(aws, config, hop_limit=2)
    _, container = imds_views(aws, loose)
    assert isinstance(container["token"], int) and container["token"] > 20, container
