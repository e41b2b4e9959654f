"""The local instance runtime: what an instance is when nothing on it is a double.

Each instance moto launches boots in its own namespaces on this machine: its user data runs in
real bash, SSM commands run in real bash, and terminating it ends every process it had. These
tests hold the runtime to what EC2 and SSM do, through boto3 against moto.
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from local_stack.instance.runtime import STDERR_LIMIT, STDOUT_LIMIT, InstanceRuntime
from local_stack.instance.sandbox import KernelFeatureMissing, check_kernel
from tasks.cloud.aws import AwsClients
from tests.support.moto_state import state_of as state

AMI = "ami-12c6146b"


def boot(aws: AwsClients, user_data: str = "#!/bin/bash\ntrue\n") -> str:
    reservation = aws.ec2.run_instances(ImageId=AMI, MinCount=1, MaxCount=1, UserData=user_data)
    instance_id: str = reservation["Instances"][0]["InstanceId"]
    return instance_id


def send(aws: AwsClients, instance_id: str, *commands: str, timeout: int = 60) -> str:
    """SendCommand once the agent takes it (InvalidInstanceId until it has registered)."""
    deadline = time.monotonic() + 20
    while True:
        try:
            sent = aws.ssm.send_command(
                InstanceIds=[instance_id],
                DocumentName="AWS-RunShellScript",
                Parameters={"commands": list(commands), "executionTimeout": [str(timeout)]},
            )
            command_id: str = sent["Command"]["CommandId"]
            return command_id
        except aws.ssm.exceptions.InvalidInstanceId:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def result(aws: AwsClients, instance_id: str, command_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while True:
        answer = aws.ssm.get_command_invocation(CommandId=command_id, InstanceId=instance_id)
        if answer["Status"] not in ("Pending", "InProgress") or time.monotonic() > deadline:
            return dict(answer)
        time.sleep(0.05)


def run(aws: AwsClients, instance_id: str, *commands: str) -> dict[str, Any]:
    return result(aws, instance_id, send(aws, instance_id, *commands))


def wait_for(predicate: Any, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def test_user_data_runs_as_root_in_bash_and_cloud_init_reports_it(
    aws: AwsClients, real_instances: InstanceRuntime
) -> None:
    instance_id = boot(
        aws,
        '#!/bin/bash\nset -euo pipefail\necho "booted as $(id -un) in $BASH_VERSION"\n'
        "mkdir -p /var/lib/pr-preview && hostname > /var/lib/pr-preview/host\n",
    )
    wait_for(
        lambda: (
            "status: done" in run(aws, instance_id, "cloud-init status")["StandardOutputContent"]
        )
    )
    log = run(aws, instance_id, "cat /var/log/cloud-init-output.log")["StandardOutputContent"]
    assert "booted as root in 5." in log
    assert "Cloud-init v. " in log and "finished at" in log
    private_ip = aws.ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0][
        "Instances"
    ][0]["PrivateIpAddress"]
    host = run(aws, instance_id, "cat /var/lib/pr-preview/host")["StandardOutputContent"]
    assert host.strip() == "ip-" + private_ip.replace(".", "-")
    # The instance's files are its own: the host has no such file.
    assert (
        not Path("/var/lib/pr-preview/host").exists()
        or Path("/var/lib/pr-preview/host").read_text() != host
    )


def test_a_failing_user_data_leaves_cloud_init_in_error_with_the_scripts_user_warning(
    aws: AwsClients, real_instances: InstanceRuntime
) -> None:
    instance_id = boot(aws, "#!/bin/bash\nset -e\necho step one\nfalse\necho never\n")
    wait_for(
        lambda: (
            "status: error" in run(aws, instance_id, "cloud-init status")["StandardOutputContent"]
        )
    )
    answer = run(aws, instance_id, "cloud-init status --long; echo exit=$?")
    assert "exit=1" in answer["StandardOutputContent"]
    assert "scripts_user" in answer["StandardOutputContent"]
    log = run(aws, instance_id, "cat /var/log/cloud-init-output.log")["StandardOutputContent"]
    assert "step one" in log and "never" not in log
    assert "Failed to run module scripts-user" in log


def test_the_host_is_read_only_and_the_scripts_paths_are_the_instances_own(
    aws: AwsClients, real_instances: InstanceRuntime
) -> None:
    instance_id = boot(aws)
    marker = f"/srv/app/{uuid.uuid4().hex}"
    answer = run(
        aws,
        instance_id,
        "touch /etc/pr-preview-probe 2>&1 || echo etc-refused",
        "touch /usr/share/pr-preview-probe 2>&1 || echo usr-refused",
        f"mkdir -p /srv/app && touch {marker} && echo srv-ok",
        "touch /var/log/x /var/lib/x /run/x && echo state-ok",
    )
    out = answer["StandardOutputContent"]
    assert "etc-refused" in out and "usr-refused" in out
    assert "Read-only file system" in out
    assert "srv-ok" in out and "state-ok" in out
    assert not Path(marker).exists()  # written inside the instance only


def test_the_hosts_docker_is_not_the_instances_until_dnf_installs_it(
    aws: AwsClients, real_instances: InstanceRuntime
) -> None:
    """A stock AL2023 image has no docker, whatever this machine has installed: the user data
    must not find the host's client and skip its install. After `dnf install docker` the real
    engine is there, and `systemctl` starts its daemon inside the instance."""
    instance_id = boot(aws)
    before = run(aws, instance_id, "command -v docker dockerd containerd runc || echo none")
    assert before["StandardOutputContent"] == "none\n", before
    after = run(
        aws,
        instance_id,
        "dnf -y install docker >/dev/null",
        "systemctl enable --now docker 2>/dev/null",
        "docker version --format '{{.Server.Version}}'",
        "systemctl is-active docker",
    )
    assert after["Status"] == "Success", after["StandardErrorContent"]
    version, state = after["StandardOutputContent"].split()
    assert version[:1].isdigit() and state == "active"


def test_each_instance_has_its_own_loopback_and_port_forwarding_reaches_it(
    aws: AwsClients, real_instances: InstanceRuntime, tmp_path: Path
) -> None:
    """Two instances serve on 127.0.0.1:8000 at once; a port-forwarding session reaches the
    one it names, as Session Manager does (the `aws ssm start-session` of `pr-preview tunnel`)."""
    first, second = boot(aws), boot(aws)
    for instance_id in (first, second):
        serve = (
            f"mkdir -p /srv/www && echo {instance_id} > /srv/www/index.html && cd /srv/www &&"
            " (setsid python3 -m http.server 8000 --bind 127.0.0.1 >/dev/null 2>&1 &)"
        )
        assert run(aws, instance_id, serve)["Status"] == "Success"
    for instance_id in (first, second):
        wait_for(
            lambda iid=instance_id: (
                "200"
                in run(aws, iid, "curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:8000/")[
                    "StandardOutputContent"
                ]
            )
        )
    with port_forwarding(real_instances, second) as url:
        assert httpx.get(url, timeout=5).text.strip() == second
    with port_forwarding(real_instances, first) as url:
        assert httpx.get(url, timeout=5).text.strip() == first


class port_forwarding:
    """``aws ssm start-session --document-name AWS-StartPortForwardingSession`` through the
    local stack's ``aws``; yields the local URL."""

    def __init__(self, runtime: InstanceRuntime, instance_id: str) -> None:
        self.runtime, self.instance_id = runtime, instance_id

    def __enter__(self) -> str:
        from local_stack.instance.sandbox import SHIMS

        port = free_port()
        self.process = subprocess.Popen(
            [
                str(SHIMS / "aws"),
                "ssm",
                "start-session",
                "--target",
                self.instance_id,
                "--document-name",
                "AWS-StartPortForwardingSession",
                "--parameters",
                f'{{"portNumber":["8000"],"localPortNumber":["{port}"]}}',
                "--region",
                "ap-northeast-1",
            ],
            env={**os.environ, "PR_PREVIEW_RUNTIME_ROOT": str(self.runtime.root)},
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        lines = [self.process.stdout.readline() for _ in range(4)]
        assert any(f"Port {port} opened for sessionId" in line for line in lines), lines
        return f"http://127.0.0.1:{port}/"

    def __exit__(self, *exc: object) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_ssm_reports_in_progress_then_the_real_exit_code_output_and_duration(
    aws: AwsClients, real_instances: InstanceRuntime
) -> None:
    instance_id = boot(aws)
    command_id = send(aws, instance_id, "sleep 1", "echo out; echo err >&2", "exit 3")
    first = aws.ssm.get_command_invocation(CommandId=command_id, InstanceId=instance_id)
    assert first["Status"] == "InProgress" and first["ResponseCode"] == -1
    done = result(aws, instance_id, command_id)
    assert (done["Status"], done["ResponseCode"]) == ("Failed", 3)
    assert done["StandardOutputContent"] == "out\n"
    assert done["StandardErrorContent"] == "err\n"
    seconds = float(done["ExecutionElapsedTime"].removeprefix("PT").removesuffix("S"))
    assert 1.0 <= seconds < 10


def test_ssm_output_is_cut_like_aws_and_a_command_past_its_timeout_is_timed_out(
    aws: AwsClients, real_instances: InstanceRuntime
) -> None:
    instance_id = boot(aws)
    long = run(
        aws,
        instance_id,
        "head -c 30000 /dev/zero | tr '\\0' o; head -c 9000 /dev/zero | tr '\\0' e >&2",
    )
    assert len(long["StandardOutputContent"]) == STDOUT_LIMIT
    assert len(long["StandardErrorContent"]) == STDERR_LIMIT
    command_id = send(aws, instance_id, "sleep 30", timeout=1)
    timed_out = result(aws, instance_id, command_id)
    assert timed_out["Status"] == "TimedOut"


_NAMESPACES: dict[str, str] = {}


def instance_processes(instance_id: str) -> list[int]:
    """Host PIDs of every process in the instance's PID namespace, and of its containers (each
    in a PID namespace of its own, under the cgroup parent the instance's dockerd is given).
    The namespace is found through the instance's init, which carries its id, and remembered,
    so this still answers once the instance is gone."""
    if instance_id not in _NAMESPACES:
        host = os.readlink("/proc/self/ns/pid")
        for pid in pids():
            try:
                namespace = os.readlink(f"/proc/{pid}/ns/pid")
            except OSError:
                continue
            tagged = f"PR_PREVIEW_INSTANCE_ID={instance_id}".encode()
            if namespace != host and tagged in read(pid, "environ").split(b"\0"):
                _NAMESPACES[instance_id] = namespace
                break
        else:
            return []
    namespace = _NAMESPACES[instance_id]
    containers = f"/pr-preview-{instance_id}/".encode()
    found = []
    for pid in pids():
        try:
            ours = os.readlink(f"/proc/{pid}/ns/pid") == namespace
            if ours or containers in read(pid, "cgroup"):
                found.append(pid)
        except OSError:
            continue
    return found


def pids() -> list[int]:
    return [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()]


def read(pid: int, name: str) -> bytes:
    try:
        return (Path("/proc") / str(pid) / name).read_bytes()
    except OSError:
        return b""


def test_terminating_an_instance_ends_every_process_it_had(
    aws: AwsClients, real_instances: InstanceRuntime
) -> None:
    instance_id = boot(aws)
    started = run(aws, instance_id, "(setsid sleep 300 >/dev/null 2>&1 &)", "echo started")
    assert started["StandardOutputContent"] == "started\n"
    wait_for(lambda: len(instance_processes(instance_id)) >= 2)
    aws.ec2.terminate_instances(InstanceIds=[instance_id])
    wait_for(lambda: not instance_processes(instance_id), timeout=10)
    with pytest.raises(aws.ssm.exceptions.InvalidInstanceId):
        aws.ssm.send_command(
            InstanceIds=[instance_id],
            DocumentName="AWS-RunShellScript",
            Parameters={"commands": ["true"]},
        )


def test_the_shutdown_timer_terminates_the_instance_in_moto(
    aws: AwsClients, real_instances: InstanceRuntime
) -> None:
    instance_id = boot(aws, "#!/bin/bash\nshutdown -h +30 'pr-preview TTL reached'\n")
    wait_for(
        lambda: (
            "status: done" in run(aws, instance_id, "cloud-init status")["StandardOutputContent"]
        )
    )
    assert state(aws, instance_id) == "running"  # +30 minutes is not now
    moved = run(aws, instance_id, "shutdown -h now")
    assert "Shutdown scheduled" in moved["StandardErrorContent"]
    wait_for(lambda: state(aws, instance_id) == "terminated", timeout=10)
    wait_for(lambda: not instance_processes(instance_id), timeout=10)


def test_the_aws_cli_on_the_instance_reads_parameter_store_for_real(
    aws: AwsClients, real_instances: InstanceRuntime
) -> None:
    aws.ssm.put_parameter(Name="/pr-preview/probe", Value="p@ss/w:rd", Type="SecureString")
    instance_id = boot(aws)
    read = (
        "aws ssm get-parameter --region ap-northeast-1 --with-decryption --name {}"
        " --query Parameter.Value --output text"
    )
    found = run(aws, instance_id, read.format("/pr-preview/probe"))
    assert found["StandardOutputContent"] == "p@ss/w:rd\n"
    missing = run(aws, instance_id, read.format("/pr-preview/absent"))
    assert missing["ResponseCode"] == 254
    assert (
        "(ParameterNotFound) when calling the GetParameter operation"
        in missing["StandardErrorContent"]
    )


def test_a_machine_without_namespaces_is_told_what_to_enable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "unshare").write_text(
        "#!/bin/sh\necho 'unshare: unshare failed: Operation not permitted' >&2\nexit 1\n"
    )
    (tmp_path / "unshare").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    with pytest.raises(KernelFeatureMissing, match=r"Operation not permitted.*Run as root"):
        check_kernel()
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(KernelFeatureMissing, match="apt-get install util-linux"):
        check_kernel()


TICK_USER_DATA = """#!/bin/bash
set -euo pipefail
printf '#!/bin/bash\\ndate +%%s.%%N >> /var/lib/tick.log\\n' > /usr/local/bin/tick
chmod 755 /usr/local/bin/tick
printf '[Service]\\nType=oneshot\\nExecStart=/usr/local/bin/tick\\n' \\
  > /etc/systemd/system/tick.service
printf '[Timer]\\nOnBootSec=1min\\nOnUnitActiveSec=1min\\n[Install]\\nWantedBy=timers.target\\n' \\
  > /etc/systemd/system/tick.timer
systemctl daemon-reload
systemctl enable --now tick.timer
"""


def test_an_enabled_timer_runs_its_service_and_starts_again_after_a_stop_and_start(
    aws: AwsClients, real_instances: InstanceRuntime
) -> None:
    """What the activity timer of the user data rests on (tasks/cloud/on_instance.py); the
    local stack shortens its minute to a fifth of a second."""
    real_instances.apply({"env": {"PR_PREVIEW_TIMER_SECONDS": "0.2"}})
    instance_id = boot(aws, TICK_USER_DATA)

    def ticks() -> int:
        found = run(aws, instance_id, "cat /var/lib/tick.log 2>/dev/null || true")
        return len(found["StandardOutputContent"].split())

    wait_for(lambda: ticks() >= 2)
    active = run(aws, instance_id, "systemctl is-active tick.timer")
    assert (active["ResponseCode"], active["StandardOutputContent"]) == (0, "active\n")
    assert run(aws, instance_id, "systemctl is-active nothing.timer")["ResponseCode"] == 4

    aws.ec2.stop_instances(InstanceIds=[instance_id])
    wait_for(lambda: state(aws, instance_id) == "stopped")
    aws.ec2.start_instances(InstanceIds=[instance_id])
    kept = ticks()  # the log the disk kept; it grows again: the timer started with the instance
    wait_for(lambda: ticks() >= kept + 2)
