"""A real Docker Engine on the host's network, for the ECS data plane's containers.

Debian's ``dockerd`` in a mount namespace of its own (its overlay mounts stay out of the host's
table), with its own data root, exec root and socket under ``root``, no iptables and no default
bridge. Its containers run with ``--network host``: the stand-in for a task's ENI in the VPC,
from which the Prefect server and AWS (moto) on 127.0.0.1 are reachable. Registries on
127.0.0.1 are insecure (plain HTTP) to dockerd by default, so the local registry needs no flag.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from local_stack.processes import die_with_parent, stop_process


class DockerEngineUnavailable(RuntimeError):
    """dockerd cannot run here; the message says what to install or enable."""


@dataclass(frozen=True)
class DockerEngine:
    socket: Path

    @property
    def env(self) -> dict[str, str]:
        """What the ``docker`` CLI needs to talk to this engine."""
        return {"DOCKER_HOST": f"unix://{self.socket}"}

    def docker(self, *args: str, timeout: float = 120, check: bool = True) -> str:
        """Run ``docker ARGS`` against this engine; its stdout."""
        done = subprocess.run(
            ["docker", "--host", f"unix://{self.socket}", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and done.returncode != 0:
            raise RuntimeError(f"docker {args[0]} failed: {done.stderr.strip()[-2000:]}")
        return done.stdout


@contextmanager
def docker_engine(root: Path, timeout: float = 60) -> Iterator[DockerEngine]:
    """dockerd under ``root`` until the block ends."""
    for tool, package in (
        ("dockerd", "docker.io"),
        ("docker", "docker.io"),
        ("unshare", "util-linux"),
    ):
        if shutil.which(tool) is None:
            raise DockerEngineUnavailable(f"{tool} is missing: as root, apt-get install {package}")
    root.mkdir(parents=True, exist_ok=True)
    socket = root / "docker.sock"
    argv = [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "dockerd",
        f"--data-root={root / 'data'}",
        f"--exec-root={root / 'exec'}",
        f"--pidfile={root / 'docker.pid'}",
        f"--host=unix://{socket}",
        "--storage-driver=overlay2",
        "--iptables=false",
        "--ip6tables=false",
        "--bridge=none",
        "--log-level=warn",
    ]
    log = root / "dockerd.log"
    with log.open("ab") as output:
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=output,
            preexec_fn=die_with_parent,
        )
    engine = DockerEngine(socket)
    try:
        deadline = time.monotonic() + timeout
        while engine.docker("version", check=False, timeout=10) == "" or not socket.exists():
            if process.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text(errors="replace")[-1500:]
                raise DockerEngineUnavailable(f"dockerd did not start: {tail}")
            time.sleep(0.1)
        yield engine
    finally:
        stop_process(process, timeout=20)
