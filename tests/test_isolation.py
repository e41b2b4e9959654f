"""A preview is a tenant: what its containers can and cannot reach, shown on a real Docker Engine.

Every instance here boots for real (``real_instances``): real dockerd, containerd and runc in the
instance's namespaces, and the instance metadata service one veth hop away, replying to a token
request with the launch's hop limit as the IP TTL. Nothing is asserted about a mock: each claim
is what a process inside a container really got.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import pytest

from local_stack.images import ImageBuilder
from local_stack.instance.runtime import InstanceRuntime
from tasks.cloud.aws import AwsClients
from tasks.cloud.run_instances import resolve_ami, run_instances_params
from tasks.config import PreviewConfig
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


def docker_ready_user_data(config: PreviewConfig) -> str:
    """Docker and Compose as the preview's user data installs them, and the base image."""
    base = ImageBuilder().base().path
    plugin = "/usr/local/lib/docker/cli-plugins/docker-compose"
    url = f"{config.compose_release_url}/{config.compose_version}/docker-compose-linux-x86_64"
    return "\n".join(
        [
            "#!/bin/bash",
            "set -euo pipefail",
            "dnf -y install docker",
            "systemctl enable --now docker",
            f"mkdir -p {shlex.quote(plugin.rsplit('/', 1)[0])}",
            f"curl -fsSL -o {plugin} {shlex.quote(url)} && chmod +x {plugin}",
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
        user_data=docker_ready_user_data(config),
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


# --- the benign corpus, started for real and probed from inside each container -------------

CORPUS = Path(__file__).parent / "data" / "compose" / "benign"
CANARY = "/var/lib/pr-preview-canary"  # an instance file no container mounts

# What a container can see of its instance. Standard library only; the image is the base.
ESCAPE_PROBE = """
import json, os, socket, stat, sys, urllib.request
instance_ip, canary = sys.argv[1], sys.argv[2]
out = {}
commands = []
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        commands.append(open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\\0", b" ").decode())
    except OSError:
        pass
out["instance_processes"] = [c for c in commands if "local_stack.instance" in c or "dockerd" in c
                             or "containerd" in c]
addresses = open("/proc/net/fib_trie").read()
out["instance_network"] = [n for n in os.listdir("/sys/class/net") if n.startswith("imi")]
if instance_ip in addresses:
    out["instance_network"].append(instance_ip)
out["instance_files"] = [p for p in (canary, "/srv/app/app.env", "/run/local-dnf-repository",
                                      "/var/lib/docker", "/etc/docker")
                         if os.path.exists(p)]
sockets = []
for line in open("/proc/self/mountinfo"):
    point = line.split()[4]
    try:
        if stat.S_ISSOCK(os.stat(point).st_mode):
            sockets.append(point)
    except OSError:
        pass
sockets += [p for p in ("/var/run/docker.sock", "/run/docker.sock",
                        "/run/containerd/containerd.sock") if os.path.exists(p)]
out["sockets"] = sockets
put = urllib.request.Request("http://169.254.169.254/latest/api/token", method="PUT",
                             headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"})
try:
    urllib.request.urlopen(put, timeout=2).read()
    out["imds_token"] = True
except Exception:
    out["imds_token"] = False
out["uid"] = os.getuid()
print("PROBE " + json.dumps(out))
"""


def probe_document(rendered: str, project: str) -> dict[str, Any]:
    """The rendered file as the instance runs it, with only what the probe needs changed:
    every image is the probe's (its own image's programs would not be there), each container
    idles instead of running its command, healthchecks (of programs not in the probe image)
    are off, so ``depends_on`` waits for a start, a user named in the file (the probe image has
    no such account) is nobody, and names carry the probe's project (several run at once).
    Privileges, namespaces, mounts, networks and security options are the rendered file's."""
    document: dict[str, Any] = json.loads(rendered)
    name = document.pop("name")
    for kind in ("networks", "volumes"):
        for entry in (document.get(kind) or {}).values():
            if isinstance(entry, dict) and str(entry.get("name", "")).startswith(f"{name}_"):
                entry["name"] = project + entry["name"][len(name) :]
    for service in document["services"].values():
        user = str(service.get("user", "0")).split(":")[0]
        if not user.isdigit():
            service["user"] = "65534:65534"
        service["image"] = "probe:1"
        service["entrypoint"] = ["sleep", "3600"]
        service["command"] = None
        service["healthcheck"] = {"disable": True}
        service.pop("ports", None)  # several projects run at once; each publishes 127.0.0.1
        for name, dependency in (service.get("depends_on") or {}).items():
            service["depends_on"][name] = {**dependency, "condition": "service_started"}
    return document


def test_every_accepted_compose_file_runs_on_real_containers_that_cannot_reach_the_instance(
    aws: AwsClients, config: PreviewConfig, real_instances: InstanceRuntime
) -> None:
    """The benign corpus through the product's check and render, then started on the real
    engine of one preview instance (launched as a preview is: hop limit 1), and each container
    asked what it can see: no process of the instance (its init, dockerd), none of its network
    interfaces or addresses, none of its files outside the container's mounts, no Docker or
    containerd socket, and no IMDS token."""
    from tasks.steps.compose import check_compose, render_compose

    checked = config.model_copy(update={"compose_path": "deploy/preview.compose.yml"})
    files = sorted(CORPUS.glob("*.yml"))
    assert len(files) >= 10
    instance_id = launch(aws, config)
    [reservation] = aws.ec2.describe_instances(InstanceIds=[instance_id])["Reservations"]
    private_ip = reservation["Instances"][0]["PrivateIpAddress"]
    script = [
        "set -euo pipefail",
        "for _ in $(seq 600); do [ -e /run/docker-ready ] && break; sleep 0.1; done",
        f"head -c 32 /dev/urandom | od -An -tx1 > {CANARY}",
        f"printf '%s' {shlex.quote(ESCAPE_PROBE)} > /var/tmp/escape-probe.py",
        "mkdir -p /var/tmp/probes",
    ]
    expected: dict[str, list[str]] = {}
    for index, path in enumerate(files):
        rendered = render_compose(checked, check_compose(checked, path.read_text(), path.name))
        project = f"probe{index}"
        document = probe_document(rendered, project)
        directory = f"/srv/{project}"
        expected[project] = sorted(document["services"])
        env_files = {f for s in document["services"].values() for f in s.get("env_file", [])}
        compose = ["docker", "compose", "-p", project, "--project-directory", directory]
        compose += ["-f", f"{directory}/docker-compose.json"]
        script += [
            f"mkdir -p {directory}",
            f"printf '%s' {shlex.quote(json.dumps(document))} > {directory}/docker-compose.json",
            *[f"touch {directory}/{shlex.quote(name)}" for name in sorted(env_files)],
            f"{shlex.join(compose)} up -d --quiet-pull >/dev/null 2>&1"
            f" || {{ echo 'UP FAILED {project}'; {shlex.join(compose)} up -d 2>&1 | tail -5; }}",
        ]
        for service in expected[project]:
            probe = [*compose, "exec", "-T", service, "python3", "-", private_ip, CANARY]
            script.append(
                f"( {shlex.join(probe)} < /var/tmp/escape-probe.py"
                f" > /var/tmp/probes/{project}.{service} 2>&1 ) &"
            )
    # Every probe waits out its IMDS token request (2 s, the reply dropped on its hop): all of
    # them at once, while the next projects start, not one project's after another's.
    script += [
        "wait",
        "for found in /var/tmp/probes/*; do",
        '  printf "%s " "${found##*/}"; tail -n 1 "$found"',
        "done",
    ]
    answer = run_long(aws, instance_id, script)
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for line in answer.splitlines():
        words = line.split(" ", 2)
        if len(words) == 3 and words[1] == "PROBE":
            project, _, service = words[0].partition(".")
            found[(project, service)] = json.loads(words[2])
    assert "UP FAILED" not in answer, answer[-3000:]
    wanted = {(project, service) for project, names in expected.items() for service in names}
    assert set(found) == wanted, answer[-3000:]
    for (project, service), seen in found.items():
        where = f"{files[int(project[5:])].name} {service}"
        assert seen["instance_processes"] == [], where
        assert seen["instance_network"] == [], where
        assert seen["instance_files"] == [], where
        assert seen["sockets"] == [], where
        assert seen["imds_token"] is False, where


def run_long(aws: AwsClients, instance_id: str, script: list[str]) -> str:
    from tasks.cloud.ssm import run_command

    result = run_command(
        aws.ssm, instance_id, script, timeout_seconds=600, poll_seconds=0.5, comment="probe"
    )
    assert result.ok, result.output[-3000:]
    return result.stdout
