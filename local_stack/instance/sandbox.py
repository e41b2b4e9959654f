"""One local instance: a process tree in its own Linux namespaces, seen from the host.

``Sandbox.start`` lays out the instance's directories under ``root``, writes what
:mod:`local_stack.instance.init` needs, and starts it with ``unshare`` (mount, network, PID,
UTS, IPC). ``run`` executes a script inside with ``nsenter``, as the SSM agent does;
``kill`` ends PID 1 and with it every process of the instance.

Needs root (or a user namespace) and util-linux's ``unshare``/``nsenter`` plus iproute2's
``ip``: :func:`check_kernel` says what is missing instead of letting a boot fail obscurely.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from local_stack.instance.relay import Bridge
from local_stack.processes import die_with_parent, killed_with_parent

PROJECT_DIR = Path(__file__).resolve().parents[2]
SHIMS = Path(__file__).resolve().parent / "bin"
# Where the scripts write on an instance; everything else is the host, read-only.
WRITABLE = (
    "/var/lib",
    "/var/log",
    "/var/tmp",
    "/srv",
    "/run",
    "/root/.docker",
    "/etc/docker",
    "/etc/systemd/system",
    "/usr/local/bin",
    "/usr/local/lib",
)
# What `dnf install docker` brings: the host's Docker Engine (Debian's docker.io), hidden from
# the instance at its host paths (a stock AL2023 image has no docker) and offered in
# REPOSITORY instead, from where the dnf shim installs it.
DOCKER_PACKAGE = {
    "docker": ("docker",),
    "dockerd": ("dockerd",),
    "containerd": ("containerd",),
    "containerd-shim-runc-v2": ("containerd-shim-runc-v2",),
    "runc": ("runc",),
    "docker-proxy": ("docker-proxy",),
    "docker-init": ("docker-init", "tini-static"),
}
REPOSITORY = "/run/local-dnf-repository"
HOST_BIN_DIRS = ("/usr/sbin", "/usr/bin", "/sbin", "/bin")
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
NAMESPACES = ("--mount", "--net", "--pid", "--uts", "--ipc")


class KernelFeatureMissing(RuntimeError):
    """The host cannot run local instances; the message says what to enable."""


def check_kernel() -> None:
    """Fail loudly, naming the fix, when this machine cannot make instance namespaces."""
    for tool, package in (("unshare", "util-linux"), ("nsenter", "util-linux"), ("ip", "iproute2")):
        if shutil.which(tool) is None:
            raise KernelFeatureMissing(
                f"local instances need `{tool}` ({package}): apt-get install {package}"
            )
    probe = subprocess.run(
        ["unshare", *NAMESPACES, "--fork", "--mount-proc", "true"],
        capture_output=True,
        text=True,
        check=False,
    )
    if probe.returncode != 0:
        raise KernelFeatureMissing(
            "local instances need Linux namespaces (mount, net, pid, uts, ipc) and root:"
            f" `unshare {' '.join(NAMESPACES)} --fork --mount-proc true` failed with"
            f" {probe.stderr.strip() or probe.returncode}. Run as root (or in a container with"
            " CAP_SYS_ADMIN), or enable unprivileged user namespaces"
            " (sysctl kernel.unprivileged_userns_clone=1)."
        )


def docker_package() -> dict[str, str]:
    """The host's Docker Engine binaries, by the name they are installed under on an instance;
    fails naming the package when this machine has none."""
    found: dict[str, str] = {}
    for name, candidates in DOCKER_PACKAGE.items():
        for candidate in candidates:
            path = shutil.which(candidate, path=":".join(HOST_BIN_DIRS))
            if path is not None:
                found[name] = os.path.realpath(path)
                break
        else:
            raise KernelFeatureMissing(
                f"local instances run a real Docker Engine and need `{name}`:"
                " apt-get install docker.io"
            )
    return found


def host_docker_paths() -> dict[str, list[str]]:
    """Where the host's Docker Engine is reachable, by directory: names to hide from an
    instance (a binary, or a link to one), so that ``command -v docker`` finds nothing."""
    names = {c for candidates in DOCKER_PACKAGE.values() for c in candidates}
    names |= {"ctr", "containerd-shim", "containerd-shim-runc-v1", "tini"}  # the rest of them
    hidden: dict[str, list[str]] = {}
    for directory in HOST_BIN_DIRS:
        if Path(directory).is_symlink():  # /bin → usr/bin on a merged-/usr host
            continue
        found = sorted(n for n in names if os.path.lexists(Path(directory) / n))
        if found:
            hidden[directory] = found
    return hidden


def hostname_of(private_ip: str) -> str:
    return "ip-" + private_ip.replace(".", "-")


@dataclass(frozen=True)
class MetadataOptions:
    """What IMDS answers an instance with: RunInstances' MetadataOptions, its role, its place."""

    hop_limit: int = 1
    http_tokens: str = "required"
    role: str = ""
    region: str = "ap-northeast-1"
    access_key_id: str = ""
    secret_access_key: str = ""


@dataclass
class Sandbox:
    instance_id: str
    root: Path
    process: subprocess.Popen[bytes]
    bridges: list[Bridge] = field(default_factory=list)
    metadata: subprocess.Popen[bytes] | None = None

    @property
    def sockets(self) -> Path:
        """Where the relays' Unix sockets are: short, as a socket path may be 107 bytes at most
        (``root/sockets`` links to it)."""
        return (self.root / "sockets").resolve()

    @property
    def fs(self) -> Path:
        """The host directory behind the instance's writable paths: ``fs/var/log/...``."""
        return self.root / "fs"

    @classmethod
    def start(
        cls,
        instance_id: str,
        root: Path,
        *,
        user_data: str,
        private_ip: str,
        bridges: list[Bridge],
        env: dict[str, str],
        sockets: Path,
        boot_seconds: float = 0.0,
        log: Path | None = None,
        metadata: MetadataOptions | None = None,
        restart: bool = False,
        session_delay_seconds: float = 0.0,
    ) -> Sandbox:
        """Boot the instance; with ``restart``, boot it again from its disk (a stopped instance
        started): ``/run`` is empty as a tmpfs is, the user data does not run again, enabled
        units start, and Session Manager takes ``session_delay_seconds`` longer than Run
        Command to accept the instance (the agent's reconnection)."""
        if restart:
            shutil.rmtree(root / "fs" / "run", ignore_errors=True)
        for target in WRITABLE:
            (root / "fs" / target.lstrip("/")).mkdir(parents=True, exist_ok=True)
        sockets.mkdir(parents=True, exist_ok=True)
        link = root / "sockets"
        if not link.is_symlink():
            link.symlink_to(sockets, target_is_directory=True)
        hosts = root / "hosts"
        hosts.write_text(
            f"127.0.0.1 localhost\n::1 localhost\n{private_ip} {hostname_of(private_ip)}\n"
        )
        if not restart:
            (root / "user-data").write_text(user_data)
        addresses = sorted(
            {private_ip} | {b.inside_host for b in bridges if not b.inside_host.startswith("127.")}
        )
        config = {
            "instance_id": instance_id,
            "hostname": hostname_of(private_ip),
            "addresses": addresses,
            "keep_writable": ["/tmp", str(sockets)],
            "writable": {target: str(root / "fs" / target.lstrip("/")) for target in WRITABLE},
            "files": {"/etc/hosts": str(hosts)},
            "repository": {
                f"{REPOSITORY}/docker/{name}": path for name, path in docker_package().items()
            },
            "hide": host_docker_paths(),
            "whiteouts": str(root / "whiteouts"),
            "bridges": [str(b) for b in bridges],
            "sockets": str(sockets),
            "user_data_file": str(root / "user-data"),
            "boot_seconds": boot_seconds,
            "restart": restart,
            "session_delay_seconds": session_delay_seconds,
            "env": {
                "PATH": f"{SHIMS}:{SYSTEM_PATH}",
                "LANG": "C.UTF-8",
                "PR_PREVIEW_PYTHON": sys.executable,
                "PR_PREVIEW_PROJECT": str(PROJECT_DIR),
                "PR_PREVIEW_INSTANCE_ID": instance_id,
                **env,
            },
        }
        (root / "sandbox.json").write_text(json.dumps(config, indent=2))
        output = open(log or root / "init.log", "ab")  # noqa: SIM115  (held by the child)
        with output:
            process = subprocess.Popen(
                [
                    "unshare",
                    *NAMESPACES,
                    "--fork",
                    "--mount-proc",
                    "--propagation",
                    "private",
                    "--kill-child=SIGKILL",
                    sys.executable,
                    "-m",
                    "local_stack.instance.init",
                    str(root / "sandbox.json"),
                ],
                cwd=PROJECT_DIR,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=output,
                # Every process of the instance carries its id (how a host finds them all).
                env={
                    **os.environ,
                    "PYTHONDONTWRITEBYTECODE": "1",
                    "PR_PREVIEW_INSTANCE_ID": instance_id,
                },
                preexec_fn=killed_with_parent,
            )
            service = start_metadata_service(
                instance_id, root, process, private_ip, metadata or MetadataOptions(), output
            )
        return cls(instance_id, root, process, bridges, service)

    @property
    def config(self) -> dict[str, object]:
        loaded: dict[str, object] = json.loads((self.root / "sandbox.json").read_text())
        return loaded

    def init_pid(self) -> int | None:
        """PID 1 of the instance, as the host sees it (once the agent is ready)."""
        ready = self.sockets / "agent-ready"
        if not ready.exists() or self.process.poll() is not None:
            return None
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        try:
            pids = children.read_text().split()
        except OSError:
            return None
        return int(pids[0]) if pids else None

    def agent_ready(self) -> bool:
        return self.init_pid() is not None

    def wait_ready(self, timeout: float = 20.0) -> bool:
        deadline = time.monotonic() + timeout
        while not self.agent_ready():
            if self.process.poll() is not None or time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
        return True

    def run(
        self,
        script: Path,
        *,
        cwd: str,
        stdout: Path,
        stderr: Path,
    ) -> subprocess.Popen[bytes]:
        """Start ``bash <script>`` inside the instance as root; ``script`` is a path inside."""
        pid = self.init_pid()
        if pid is None:
            raise ProcessLookupError(f"{self.instance_id} is not running")
        env = {str(k): str(v) for k, v in dict(self.config["env"]).items()}  # type: ignore[call-overload]
        env.update({"HOME": "/root", "USER": "root", "LOGNAME": "root"})
        with stdout.open("wb") as out, stderr.open("wb") as err:
            return subprocess.Popen(
                [
                    "nsenter",
                    f"--target={pid}",
                    *NAMESPACES,
                    "/bin/bash",
                    "-c",
                    'cd "$1" && exec /bin/bash "$2"',
                    "ssm-agent",
                    cwd,
                    str(script),
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=env,
                start_new_session=True,
            )

    def inside(self, path: str) -> Path:
        """The host path of ``path`` on the instance, for the writable paths."""
        for target in sorted(WRITABLE, key=len, reverse=True):
            if path == target or path.startswith(target + "/"):
                return self.fs / target.lstrip("/") / path[len(target) :].lstrip("/")
        raise ValueError(f"{path} is not one of the instance's own paths")

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        """End the instance: PID 1 dies, and with it every process in its namespace (and the
        veth to its metadata service with the namespace)."""
        pid = self.init_pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)
        if self.metadata is not None:
            self.metadata.kill()
            self.metadata.wait(timeout=10)


def start_metadata_service(
    instance_id: str,
    root: Path,
    instance: subprocess.Popen[bytes],
    private_ip: str,
    options: MetadataOptions,
    output: IO[bytes],
) -> subprocess.Popen[bytes]:
    """IMDS in a network namespace of its own, joined to the instance's by a veth pair: the
    instance reaches 169.254.169.254 over a link, as on EC2, and never serves it itself."""
    from local_stack.instance import imds

    config = {
        "instance_id": instance_id,
        "private_ip": private_ip,
        "ready_file": str(root / "imds-ready"),
        **{key: getattr(options, key) for key in MetadataOptions.__dataclass_fields__},
    }
    (root / "imds.json").write_text(json.dumps(config))
    service = subprocess.Popen(
        [
            "unshare",
            "--net",
            sys.executable,
            "-m",
            "local_stack.instance.imds",
            str(root / "imds.json"),
        ],
        cwd=PROJECT_DIR,
        stdin=subprocess.DEVNULL,
        stdout=output,
        stderr=output,
        preexec_fn=die_with_parent,
    )
    inside, outside = _own_netns(instance.pid), _own_netns(service.pid)
    suffix = instance_id.removeprefix("i-")[-10:]
    near, far = f"imi{suffix}", f"ims{suffix}"
    steps = [
        ["ip", "link", "add", near, "type", "veth", "peer", "name", far],
        ["ip", "link", "set", near, "netns", str(instance.pid)],
        ["ip", "link", "set", far, "netns", str(service.pid)],
        [*inside, "ip", "addr", "add", f"{imds.INSTANCE_SIDE}/{imds.PREFIX}", "dev", near],
        [*inside, "ip", "link", "set", near, "up"],
        [*outside, "ip", "link", "set", "lo", "up"],
        [*outside, "ip", "addr", "add", f"{imds.ADDRESS}/{imds.PREFIX}", "dev", far],
        [*outside, "ip", "link", "set", far, "up"],
        [*outside, "ip", "route", "add", "default", "via", imds.INSTANCE_SIDE],
    ]
    for step in steps:
        subprocess.run(step, check=True, capture_output=True)
    return service


def _own_netns(pid: int, timeout: float = 10.0) -> list[str]:
    """``nsenter`` into ``pid``'s network namespace, once ``unshare`` has made it."""
    host = os.readlink("/proc/self/ns/net")
    deadline = time.monotonic() + timeout
    while os.readlink(f"/proc/{pid}/ns/net") == host:
        if time.monotonic() > deadline:
            raise KernelFeatureMissing(f"process {pid} got no network namespace of its own")
        time.sleep(0.005)
    return ["nsenter", f"--net=/proc/{pid}/ns/net"]
