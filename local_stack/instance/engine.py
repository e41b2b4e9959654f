"""The container engine of a local instance: ``docker`` for the forms the bootstrap speaks.

A preview instance runs its app with the docker CLI; a local instance has no daemon, so this
module is the CLI and the daemon in one, for exactly the forms the project's scripts use
(``tasks/templates/user_data.sh``, ``tasks/update.py``, ``tasks/migrate.py``,
``tasks/diagnose.py``)::

    docker version
    docker login <registry> -u <user> --password-stdin
    docker build -t <ref> <dir>
    docker compose version
    docker compose [-f <file>] pull [<service>...]
    docker compose [-f <file>] up -d [<service>...]
    docker compose [-f <file>] run --rm -T <service> <command>...
    docker compose [-f <file>] ps [-a]
    docker compose [-f <file>] logs [--no-color] [--tail N] [<service>...]
    docker compose [-f <file>] down [-v] [-t N]

Images are pulled for real, over the OCI distribution API (bearer-token challenge, index →
linux/amd64 manifest → config blob), but carry no filesystem: a container runs the source tree
the image config's ``dev.pr-preview.local.source`` label names (relative to the project dir), or
the directory ``docker build`` was given, as a real local process in the instance's own
namespaces. ``postgres:*`` is present locally and runs a real PostgreSQL (``local_stack.postgres``)
on 127.0.0.1:5432. Each detached container has a small supervisor (``__shim__``, as containerd
has its shim) that waits for the process and records its exit code, so ``ps`` can say
``Exited (1)``. Errors are docker's and compose's own words, with their exit codes; values from
the compose file or the environment never reach a shell.

Environment read:

- ``PR_PREVIEW_ENGINE_ROOT``: where images, containers, logs and volumes live
  (default ``/var/lib/docker``).
- ``DOCKER_CONFIG``: the client config dir holding ``config.json`` (``auths``, base64 as docker
  stores them) and ``cli-plugins/`` (default ``$HOME/.docker``); ``HOME`` for that default.
- ``PR_PREVIEW_PYTHON``: the interpreter of the project venv; its directory comes first on a
  container's ``PATH`` so ``uvicorn`` and ``alembic`` are found (default: this interpreter).
- ``PR_PREVIEW_PROJECT``: the project dir that source labels are relative to (default: the
  directory this package lives in).
- ``PR_PREVIEW_REGISTRY_MIRRORS``: ``host=url[,host=url…]``, where to reach a registry
  (``ghcr.io=http://127.0.0.1:5000``); a registry on 127.0.0.1/localhost is used directly over
  http, any other without a mirror over https.
- ``PR_PREVIEW_ENGINE_DELAYS``: JSON seconds per operation, slept on top of the real work to
  model a real host's latency: ``login``, ``pull`` (per image), ``build``, ``up`` (per container
  started), ``run``, ``down`` (default none).
- ``PR_PREVIEW_ENGINE_SOURCES``: more directories (``:``-separated) an image's source label may
  name, beside the project (a test's broken build of the app).
- ``PR_PREVIEW_ENGINE_NO_COMPOSE``: ``1`` makes the Compose plugin missing, as on a fresh AL2023
  host (so does a file ``$PR_PREVIEW_ENGINE_ROOT/no-compose-plugin``); an executable
  ``docker-compose`` in a CLI plugin dir (``$DOCKER_CONFIG/cli-plugins``,
  ``/usr/local/lib/docker/cli-plugins``, …) brings it back, as the real CLI finds plugins there.
- ``COMPOSE_PROJECT_NAME``: the compose project name, as compose reads it; and every variable,
  as compose does, for ``${VAR}`` interpolation of the compose file (over its ``.env``) and for
  ``environment`` entries without a value.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    import httpx

ENGINE_VERSION = "25.0.8"  # what AL2023's dnf installs
API_VERSION = "1.44"
COMPOSE_VERSION = "v2.24.6"  # PreviewConfig.compose_version's default
DEFAULT_ROOT = "/var/lib/docker"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
PROJECT_DIR = Path(__file__).resolve().parents[2]  # also where this package is imported from
PLUGIN_DIRS = (
    "/usr/local/lib/docker/cli-plugins",
    "/usr/local/libexec/docker/cli-plugins",
    "/usr/lib/docker/cli-plugins",
    "/usr/libexec/docker/cli-plugins",
)
NO_COMPOSE_MARKER = "no-compose-plugin"
DELAY_KEYS = frozenset({"login", "pull", "build", "up", "run", "down"})
STOP_TIMEOUT = 10.0  # docker's default grace before SIGKILL
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"
DOCKER_HUB_AUTH_KEY = "https://index.docker.io/v1/"
MANIFEST_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)
INDEX_TYPES = frozenset(MANIFEST_TYPES[0::2])
# errcode's default messages: a registry error without a message is printed with these.
ERROR_MESSAGES = {
    "UNAUTHORIZED": "authentication required",
    "DENIED": "requested access to the resource is denied",
    "MANIFEST_UNKNOWN": "manifest unknown",
    "NAME_UNKNOWN": "repository name not known to registry",
    "BLOB_UNKNOWN": "blob unknown to registry",
    "TOOMANYREQUESTS": "too many requests",
}
HTTP_REASONS = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    429: "Too Many Requests",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}
# The docker/distribution reference grammar, lower-case repository path components.
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_DOMAIN = r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9-]+)*|\[[0-9a-fA-F:]+\])"
REFERENCE = re.compile(
    rf"^(?:(?P<domain>{_DOMAIN}(?::[0-9]+)?)/)?(?P<path>{_COMPONENT}(?:/{_COMPONENT})*)"
    r"(?::(?P<tag>[\w][\w.-]{0,127}))?(?:@(?P<digest>sha256:[0-9a-f]{64}))?$"
)
NAME = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]*$")
SERVICE_NAME = re.compile(r"^[a-zA-Z0-9._-]+$")
ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")
_CHALLENGE_PARAM = re.compile(r'(\w+)="([^"]*)"')
_INTERPOLATION = re.compile(
    r"\$(?:(?P<escaped>\$)|(?P<named>[A-Za-z_][A-Za-z0-9_]*)"
    r"|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|(?P<invalid>))"
)


class EngineError(Exception):
    """Printed to stderr as it is; the CLI exits with ``exit_code``."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def daemon_error(message: str) -> EngineError:
    return EngineError(f"Error response from daemon: {message}")


# --- settings ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    root: Path
    docker_config: Path
    python: str
    project_dir: Path
    mirrors: Mapping[str, str]
    delays: Mapping[str, float]
    compose_disabled: bool
    environ: Mapping[str, str]
    source_roots: tuple[Path, ...] = ()

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Settings:
        """Read (and check) the engine's environment; a bad value names its variable."""
        home = environ.get("HOME") or "/root"
        return cls(
            root=Path(environ.get("PR_PREVIEW_ENGINE_ROOT") or DEFAULT_ROOT),
            docker_config=Path(environ.get("DOCKER_CONFIG") or Path(home) / ".docker"),
            python=environ.get("PR_PREVIEW_PYTHON") or sys.executable,
            project_dir=Path(environ.get("PR_PREVIEW_PROJECT") or PROJECT_DIR).resolve(),
            mirrors=parse_mirrors(environ.get("PR_PREVIEW_REGISTRY_MIRRORS", "")),
            delays=parse_delays(environ.get("PR_PREVIEW_ENGINE_DELAYS", "")),
            compose_disabled=environ.get("PR_PREVIEW_ENGINE_NO_COMPOSE", "") == "1",
            environ=dict(environ),
            source_roots=tuple(
                Path(part).resolve()
                for part in environ.get("PR_PREVIEW_ENGINE_SOURCES", "").split(":")
                if part.startswith("/")
            ),
        )

    def delay(self, operation: str) -> None:
        seconds = self.delays.get(operation, 0.0)
        if seconds > 0:
            time.sleep(seconds)


def parse_mirrors(text: str) -> dict[str, str]:
    mirrors: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        host, sep, url = item.partition("=")
        if not sep or not host or not re.match(r"^https?://[^/\s]+/?$", url):
            raise EngineError(
                f"PR_PREVIEW_REGISTRY_MIRRORS: {item!r} is not registry=http(s)://host:port"
            )
        mirrors[host.strip()] = url.rstrip("/")
    return mirrors


def parse_delays(text: str) -> dict[str, float]:
    if not text.strip():
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise EngineError(f"PR_PREVIEW_ENGINE_DELAYS is not JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise EngineError('PR_PREVIEW_ENGINE_DELAYS must be an object like {"pull": 14.0}')
    delays: dict[str, float] = {}
    for key, seconds in value.items():
        if key not in DELAY_KEYS:
            raise EngineError(
                f"PR_PREVIEW_ENGINE_DELAYS: unknown operation {key!r};"
                f" known: {', '.join(sorted(DELAY_KEYS))}"
            )
        if isinstance(seconds, bool) or not isinstance(seconds, int | float) or seconds < 0:
            raise EngineError(f"PR_PREVIEW_ENGINE_DELAYS: {key} must be seconds >= 0")
        delays[key] = float(seconds)
    return delays


# --- image references --------------------------------------------------------------------------


@dataclass(frozen=True)
class Reference:
    """``ghcr.io/octo-org/app:sha`` as docker splits it."""

    registry: str
    path: str
    tag: str | None
    digest: str | None

    @classmethod
    def parse(cls, text: str) -> Reference:
        match = REFERENCE.match(text)
        if not match or len(text) > 255:
            raise EngineError(f"invalid reference format: {text!r}")
        domain, path = match["domain"], match["path"]
        if domain is None or not ("." in domain or ":" in domain or domain == "localhost"):
            # no registry: Docker Hub, where a one-part name is an official ("library") image
            path = f"{domain}/{path}" if domain else path
            domain, path = DOCKER_HUB, (path if "/" in path else f"library/{path}")
        if domain == "index.docker.io":
            domain = DOCKER_HUB
        tag = match["tag"] or (None if match["digest"] else "latest")
        return cls(domain, path, tag, match["digest"])

    @property
    def reference(self) -> str:
        """What to ask the registry for: the digest if pinned, else the tag."""
        return self.digest or self.tag or "latest"

    @property
    def familiar_name(self) -> str:
        if self.registry == DOCKER_HUB:
            return self.path.removeprefix("library/")
        return f"{self.registry}/{self.path}"

    def __str__(self) -> str:
        text = self.familiar_name
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text

    @property
    def host(self) -> str:
        if self.registry.startswith("["):
            return self.registry[1:].split("]", 1)[0]
        return self.registry.rsplit(":", 1)[0] if ":" in self.registry else self.registry


def registry_origin(registry: str) -> str:
    """The registry's URL as docker names it in messages: plain http only for loopback."""
    api = DOCKER_HUB_API if registry == DOCKER_HUB else registry
    host = Reference(registry, "x", None, None).host
    return f"{'http' if host in LOOPBACK_HOSTS else 'https'}://{api}"


# --- state on disk ----------------------------------------------------------------------------


def write_json(path: Path, value: Any, mode: int = 0o600) -> None:
    """Atomically, readable by root only: container state holds the service's env."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as out:
        json.dump(value, out, indent=2, sort_keys=True)
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


def now_iso() -> str:
    return datetime.now(UTC).isoformat()


@dataclass(frozen=True)
class Image:
    id: str  # sha256 of the config, as docker's image ID
    config: dict[str, Any]
    source: str | None = None  # an absolute dir for built images; else the label's
    builtin: str | None = None  # "postgres": runs local_stack.postgres

    @property
    def settings(self) -> dict[str, Any]:
        found = self.config.get("config") or {}
        return found if isinstance(found, dict) else {}


def builtin_image(ref: Reference) -> Image | None:
    """``postgres:*`` from Docker Hub: present locally, like a cached image on the AMI."""
    if ref.registry != DOCKER_HUB or ref.path != "library/postgres":
        return None
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Entrypoint": ["docker-entrypoint.sh"],
            "Cmd": ["postgres"],
            "Env": ["PGDATA=/var/lib/postgresql/data"],
            "ExposedPorts": {"5432/tcp": {}},
            "StopSignal": "SIGINT",
            "Volumes": {"/var/lib/postgresql/data": {}},
            "Labels": {"dev.pr-preview.local.builtin": "postgres"},
        },
    }
    return Image(id=config_id(config), config=config, builtin="postgres")


def config_id(config: Mapping[str, Any], salt: str = "") -> str:
    body = json.dumps(config, sort_keys=True, separators=(",", ":")) + salt
    return "sha256:" + hashlib.sha256(body.encode()).hexdigest()


class Store:
    """The engine root: ``images/``, ``containers/<name>/``, ``volumes/<name>/_data``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._depth = 0

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """One engine command at a time changes the store (re-entrant within a command)."""
        if self._depth:
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / "engine.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._depth = 1
            try:
                yield
            finally:
                self._depth = 0
                fcntl.flock(lock, fcntl.LOCK_UN)

    # images
    @property
    def repositories_file(self) -> Path:
        return self.root / "images" / "repositories.json"

    def image(self, ref: Reference) -> Image | None:
        builtin = builtin_image(ref)
        if builtin is not None:
            return builtin
        image_id = (read_json(self.repositories_file) or {}).get(str(ref))
        if not image_id:
            return None
        record = read_json(self.root / "images" / f"{image_id.removeprefix('sha256:')}.json")
        if record is None:
            return None
        return Image(id=image_id, config=record["config"], source=record.get("source"))

    def tag_image(self, ref: Reference, image: Image) -> None:
        record = {"config": image.config, "source": image.source, "created": now_iso()}
        write_json(self.root / "images" / f"{image.id.removeprefix('sha256:')}.json", record)
        repositories = read_json(self.repositories_file) or {}
        repositories[str(ref)] = image.id
        write_json(self.repositories_file, repositories)

    # containers
    def container_dir(self, name: str) -> Path:
        if not NAME.match(name):
            raise EngineError(f"invalid container name {name!r}")
        return self.root / "containers" / name

    def containers(self, project: str | None = None) -> list[Container]:
        found = []
        base = self.root / "containers"
        for path in sorted(base.iterdir()) if base.is_dir() else []:
            record = read_json(path / "state.json")
            if record is None:
                continue
            container = Container(path, record)
            if project is None or container.project == project:
                found.append(container)
        return found

    def volume_dir(self, name: str) -> Path:
        if not NAME.match(name):
            raise EngineError(f"invalid volume name {name!r}")
        return self.root / "volumes" / name / "_data"


# --- processes ---------------------------------------------------------------------------------


def process_start(pid: int) -> int | None:
    """The process's start time in clock ticks (``/proc/<pid>/stat`` field 22); None when it
    is gone or a zombie. With the pid, it names one process even after the pid is reused."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def alive(pid: int | None, start: int | None) -> bool:
    if not pid:
        return False
    found = process_start(pid)
    return found is not None and (start is None or found == start)


def wait_until(condition: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
    return True


def signal_number(name: str | None) -> int:
    if not name:
        return signal.SIGTERM
    name = name.upper()
    if name.isdigit():
        return int(name)
    found = getattr(signal, name if name.startswith("SIG") else f"SIG{name}", None)
    return int(found) if isinstance(found, int) else int(signal.SIGTERM)


@dataclass
class Container:
    """One container's record: ``state.json`` (the CLI's) and ``exit.json`` (the shim's)."""

    dir: Path
    record: dict[str, Any]

    @property
    def name(self) -> str:
        return str(self.record["name"])

    @property
    def project(self) -> str:
        return str(self.record.get("project", ""))

    @property
    def service(self) -> str:
        return str(self.record.get("service", ""))

    @property
    def log(self) -> Path:
        return self.dir / "container.log"

    def save(self) -> None:
        write_json(self.dir / "state.json", self.record)

    def exit(self) -> dict[str, Any] | None:
        found = read_json(self.dir / "exit.json")
        return found if isinstance(found, dict) else None

    @property
    def running(self) -> bool:
        return self.exit() is None and alive(self.record.get("pid"), self.record.get("pid_start"))

    def state(self) -> tuple[str, int | None, str | None]:
        """(``running`` | ``exited`` | ``created``, exit code, finished at)."""
        if not self.record.get("pid"):
            return "created", None, None
        if self.running:
            return "running", None, None
        if alive(self.record.get("shim_pid"), self.record.get("shim_start")):
            # the process just ended; its shim is writing the exit code
            wait_until(lambda: self.exit() is not None, 1.0)
        ended = self.exit()
        if ended is None:  # the shim died with it (killed): docker says 255
            return "exited", 255, None
        return "exited", int(ended["exit_code"]), ended.get("finished_at")

    def stop(self, timeout: float) -> None:
        """The image's stop signal, then SIGKILL to the process group after ``timeout``."""
        pid = self.record.get("pid")
        if self.running and pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal_number(self.record.get("stop_signal")))
            if not wait_until(lambda: not self.running, timeout):
                for kill in (os.killpg, os.kill):  # its process group, or it alone
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        kill(pid, signal.SIGKILL)
                wait_until(lambda: not self.running, 5.0)
        shim, shim_start = self.record.get("shim_pid"), self.record.get("shim_start")
        if not wait_until(lambda: not alive(shim, shim_start), 5.0) and shim:
            with contextlib.suppress(ProcessLookupError):
                os.kill(shim, signal.SIGKILL)
            wait_until(lambda: not alive(shim, shim_start), 2.0)
        if pid and self.exit() is None:
            write_json(self.dir / "exit.json", {"exit_code": 137, "finished_at": now_iso()})


def start_detached(settings: Settings, container: Container) -> None:
    """Start the container's process under its shim; raise docker's error if it cannot run."""
    (container.dir / "exit.json").unlink(missing_ok=True)
    with open(container.log, "ab") as log:  # where a shim that cannot start says why
        shim = subprocess.Popen(
            [settings.python, "-m", "local_stack.instance.engine", "__shim__", str(container.dir)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
            start_new_session=True,
            cwd="/",
            env={
                "PATH": DEFAULT_PATH,
                "PYTHONPATH": str(PROJECT_DIR),
                "PYTHONDONTWRITEBYTECODE": "1",
            },
        )
    assert shim.stdout is not None
    with shim.stdout:
        line = shim.stdout.readline()
    try:
        started = json.loads(line)
    except json.JSONDecodeError:
        shim.wait()
        raise daemon_error(
            f"failed to start the shim of {container.name}: see docker compose logs"
        ) from None
    if "error" in started:
        shim.wait()
        raise daemon_error(started["error"])
    container.record.update(
        pid=started["pid"],
        pid_start=started["start"],
        shim_pid=shim.pid,
        shim_start=process_start(shim.pid),
        started_at=started["started_at"],
    )
    container.save()


def exec_error(argv: Sequence[str], exc: OSError) -> str:
    """runc's words for a command that cannot be started."""
    reason = (
        "executable file not found in $PATH"
        if isinstance(exc, FileNotFoundError)
        else (exc.strerror or str(exc)).lower()
    )
    return (
        "failed to create task for container: failed to create shim task: OCI runtime create"
        " failed: runc create failed: unable to start container process: exec:"
        f' "{argv[0]}": {reason}: unknown'
    )


def run_shim(container_dir: Path) -> int:
    """``__shim__``: run the container's process, report its pid, record how it ended."""
    container = Container(container_dir, read_json(container_dir / "state.json"))
    spec = container.record
    out = sys.stdout
    with open(container.log, "ab") as log:
        try:
            child = subprocess.Popen(
                spec["argv"],
                cwd=spec["cwd"],
                env=spec["env"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                process_group=0,
            )
        except OSError as exc:
            write_json(container_dir / "exit.json", {"exit_code": 127, "finished_at": now_iso()})
            out.write(json.dumps({"error": exec_error(spec["argv"], exc)}) + "\n")
            out.flush()
            return 127
    # Signals are for the container (its own process group); the shim outlives it to record
    # how it ended.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    out.write(
        json.dumps({"pid": child.pid, "start": process_start(child.pid), "started_at": now_iso()})
        + "\n"
    )
    out.flush()
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)
    code = child.wait()
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(child.pid, signal.SIGKILL)  # the container's orphans go with it
    exit_code = code if code >= 0 else 128 - code
    write_json(container_dir / "exit.json", {"exit_code": exit_code, "finished_at": now_iso()})
    return 0


# --- registry client ---------------------------------------------------------------------------


def read_auths(settings: Settings) -> dict[str, Any]:
    config = read_json(settings.docker_config / "config.json") or {}
    auths = config.get("auths") if isinstance(config, dict) else None
    return auths if isinstance(auths, dict) else {}


def auth_key(registry: str) -> str:
    return DOCKER_HUB_AUTH_KEY if registry == DOCKER_HUB else registry


def stored_credentials(settings: Settings, registry: str) -> tuple[str, str] | None:
    auths = read_auths(settings)
    for key in (auth_key(registry), f"https://{registry}", f"http://{registry}"):
        entry = auths.get(key)
        if isinstance(entry, dict) and entry.get("auth"):
            try:
                user, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                continue
            return user, password
    return None


@dataclass(frozen=True)
class RegistryError:
    """A registry's error answer, as docker/distribution's errcode reads it."""

    code: str  # UNAUTHORIZED, DENIED, MANIFEST_UNKNOWN, …; "" when the body says none
    message: str  # the registry's, or errcode's default for the code
    text: str  # what docker prints: "unauthorized", "denied: <custom message>", …

    @classmethod
    def of(cls, response: httpx.Response) -> RegistryError:
        try:
            first = response.json()["errors"][0]
            code = str(first.get("code", "")).upper()
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            if response.status_code in (401, 403):
                code = "UNAUTHORIZED" if response.status_code == 401 else "DENIED"
                return cls(code, ERROR_MESSAGES[code], code.lower())
            reason = HTTP_REASONS.get(response.status_code, "")
            text = f"received unexpected HTTP status: {response.status_code} {reason}".strip()
            return cls("", "", text)
        default = ERROR_MESSAGES.get(code, code.lower().replace("_", " "))
        message = str(first.get("message") or default)
        text = code.lower().replace("_", " ")
        return cls(code, message, text if message == default else f"{text}: {message}")


def transport_error(exc: Exception, where: str) -> str:
    """Go's net/http words for a registry that cannot be reached."""
    name = type(exc).__name__.lower()
    if "timeout" in name:
        return "net/http: request canceled (Client.Timeout exceeded while awaiting headers)"
    if "connect" in name:
        return f"dial tcp {where}: connect: connection refused"
    return str(exc) or type(exc).__name__


class AuthFailed(Exception):
    """The token endpoint said no; the message is docker's text for it."""


class RegistrySession:
    """Talks to one registry for one repository, answering its auth challenges once."""

    def __init__(
        self,
        settings: Settings,
        registry: str,
        scope: str | None,
        credentials: tuple[str, str] | None,
    ) -> None:
        import httpx

        self.settings = settings
        self.registry = registry
        self.origin = registry_origin(registry)
        self.base = settings.mirrors.get(registry, self.origin)
        self.scope = scope
        self.credentials = credentials
        self.authorization: str | None = None
        self.client = httpx.Client(timeout=30, follow_redirects=True, trust_env=False)

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> RegistrySession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def display(self, path: str) -> str:
        return f"{self.origin}{path}"

    def _rewrite(self, url: str) -> str:
        """A realm on a mirrored registry's origin is asked at the mirror, never upstream."""
        for registry, mirror in self.settings.mirrors.items():
            origin = registry_origin(registry)
            for prefix in (origin, f"https://{registry}", f"http://{registry}"):
                if url == prefix or url.startswith(prefix + "/"):
                    return mirror + url[len(prefix) :]
        return url

    def request(self, method: str, path: str, accept: str | None = None) -> httpx.Response:
        """``method`` on ``path``, answering a 401 challenge once; transport errors and a
        refused token raise EngineError with docker's ``Get "<url>": …`` wording."""
        import httpx

        where = f'{method.capitalize()} "{self.display(path)}"'
        headers = {"Accept": accept} if accept else {}
        try:
            for attempt in (1, 2):
                if self.authorization:
                    headers["Authorization"] = self.authorization
                response = self.client.request(method, self.base + path, headers=headers)
                if response.status_code != 401 or attempt == 2 or self.authorization:
                    break
                self.authorization = self._answer(response)
                if self.authorization is None:
                    break
        except AuthFailed as exc:
            raise daemon_error(f"{where}: {exc}") from None
        except httpx.TransportError as exc:
            host = exc.request.url.netloc.decode()  # the mirror's, when there is one
            raise daemon_error(f"{where}: {transport_error(exc, host)}") from exc
        return response

    def _answer(self, response: httpx.Response) -> str | None:
        challenge = response.headers.get("WWW-Authenticate", "")
        scheme, _, rest = challenge.partition(" ")
        if scheme.lower() == "basic":  # Amazon ECR, for one
            if self.credentials is None:
                raise AuthFailed("no basic auth credentials")  # the docker client's words
            raw = ":".join(self.credentials).encode()
            return "Basic " + base64.b64encode(raw).decode()
        if scheme.lower() != "bearer":
            return None
        params = dict(_CHALLENGE_PARAM.findall(rest))
        realm = params.get("realm")
        if not realm:
            return None
        query = {}
        if params.get("service"):
            query["service"] = params["service"]
        scope = self.scope or params.get("scope")
        if scope:
            query["scope"] = scope
        auth = None
        if self.credentials is not None:
            query.update(account=self.credentials[0], client_id="docker", offline_token="true")
            auth = self.credentials
        token = self.client.get(self._rewrite(realm), params=query, auth=auth)
        if token.status_code != 200:
            raise AuthFailed(RegistryError.of(token).text)
        try:
            body = token.json()
            value = body.get("token") or body.get("access_token")
        except (ValueError, AttributeError):
            value = None
        if not value:
            raise AuthFailed("authorization server did not include a token in the response")
        return f"Bearer {value}"


def pull_error(response: httpx.Response, ref: Reference, session: RegistrySession) -> EngineError:
    """moby's translatePullError: ``manifest for … not found``, ``pull access denied …``."""
    error = RegistryError.of(response)
    if error.code == "MANIFEST_UNKNOWN":
        return daemon_error(f"manifest for {ref} not found: manifest unknown: {error.message}")
    if error.code == "DENIED":
        return daemon_error(
            f"pull access denied for {ref.familiar_name}, repository does not exist or may"
            f" require 'docker login': denied: {error.message}"
        )
    if error.code == "NAME_UNKNOWN":
        return daemon_error(
            f"repository {ref.familiar_name} not found: name unknown: {error.message}"
        )
    if response.status_code == 401:
        path = f"/v2/{ref.path}/manifests/{ref.reference}"
        return daemon_error(f'Head "{session.display(path)}": {error.text}')
    return daemon_error(error.text)


def platform_manifest(index: Mapping[str, Any], ref: Reference) -> str:
    """The digest of the linux/amd64 manifest an index names (attestations are unknown/unknown)."""
    for entry in index.get("manifests") or []:
        platform = entry.get("platform") or {}
        if platform.get("os") == "linux" and platform.get("architecture") == "amd64":
            return str(entry["digest"])
    raise daemon_error(
        f"no matching manifest for linux/amd64 in the manifest list entries of {ref}"
    )


def pull_image(settings: Settings, store: Store, ref: Reference) -> Image:
    """Resolve ``ref`` like docker: HEAD the tag, GET the index, pick linux/amd64, GET its
    manifest and config blob; store the config under the reference."""
    builtin = builtin_image(ref)
    if builtin is not None:
        return builtin
    settings.delay("pull")
    credentials = stored_credentials(settings, ref.registry)
    scope = f"repository:{ref.path}:pull"
    manifests = f"/v2/{ref.path}/manifests/"
    accept = ", ".join(MANIFEST_TYPES)
    with RegistrySession(settings, ref.registry, scope, credentials) as session:
        head = session.request("HEAD", manifests + ref.reference, accept)
        digest = head.headers.get("Docker-Content-Digest") if head.is_success else None
        # a HEAD that fails has no body: the GET says why, as docker's client asks it
        response = session.request("GET", manifests + (digest or ref.reference), accept)
        try:
            for _ in range(2):  # an index names the platform's manifest
                if not response.is_success:
                    raise pull_error(response, ref, session)
                document = response.json()
                content_type = response.headers.get("Content-Type", "").split(";")[0].strip()
                if (document.get("mediaType") or content_type) not in INDEX_TYPES:
                    break
                response = session.request(
                    "GET", manifests + platform_manifest(document, ref), accept
                )
            config_digest = str(response.json()["config"]["digest"])
            blob = session.request("GET", f"/v2/{ref.path}/blobs/{config_digest}")
            if not blob.is_success:
                raise pull_error(blob, ref, session)
            if "sha256:" + hashlib.sha256(blob.content).hexdigest() != config_digest:
                raise daemon_error(f"digest mismatch for the config of {ref}: {config_digest}")
            config = json.loads(blob.content)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise daemon_error(f"unexpected manifest or config for {ref}: {exc!r}") from exc
    image = Image(id=config_digest, config=config)
    with store.locked():
        store.tag_image(ref, image)
    return image


# --- compose model -----------------------------------------------------------------------------


def interpolate(text: str, variables: Mapping[str, str], where: str) -> str:
    """Compose's ``$VAR``, ``${VAR}``, ``${VAR:-default}``, ``${VAR:?error}``, ``$$``."""

    def replace(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        if match["invalid"] is not None and match["named"] is None and match["braced"] is None:
            raise EngineError(f"invalid interpolation format for {where}: {text!r}")
        name = match["named"] or match["braced"]
        value = variables.get(name)
        op, arg = match["op"], match["arg"] or ""
        if op in (":-", "-"):
            return value if value or (op == "-" and value is not None) else arg
        if op in (":?", "?"):
            if value or (op == "?" and value is not None):
                return value or ""
            raise EngineError(f"required variable {name} is missing a value: {arg}")
        if op in (":+", "+"):
            return arg if value or (op == "+" and value is not None) else ""
        return value or ""

    return _INTERPOLATION.sub(replace, text)


def interpolate_tree(value: Any, variables: Mapping[str, str], where: str) -> Any:
    if isinstance(value, str):
        return interpolate(value, variables, where)
    if isinstance(value, list):
        return [interpolate_tree(v, variables, where) for v in value]
    if isinstance(value, dict):
        return {k: interpolate_tree(v, variables, f"{where}.{k}") for k, v in value.items()}
    return value


def parse_dotenv(path: Path) -> dict[str, str]:
    """Compose's ``.env``: ``KEY=VALUE``, optional ``export``, quotes stripped, # comments."""
    values: dict[str, str] = {}
    if not path.is_file():
        return values
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        line = line.removeprefix("export ").strip()
        key, sep, value = line.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not ENV_KEY.match(key):
            raise EngineError(f"failed to read {path}: line {number}: unexpected character")
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        elif " #" in value:
            value = value.split(" #", 1)[0].rstrip()
        values[key] = value
    return values


def parse_env_file(path: Path, environ: Mapping[str, str]) -> dict[str, str]:
    """docker's ``--env-file``: ``KEY=VALUE`` taken literally; a bare ``KEY`` is inherited."""
    values: dict[str, str] = {}
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise EngineError(
            f"env file {path} not found: stat {path}: no such file or directory"
        ) from None
    for raw in text.splitlines():
        line = raw.lstrip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not key or any(c.isspace() for c in key):
            raise EngineError(f"variable '{key}' contains whitespaces")
        if sep:
            values[key] = value
        elif key in environ:
            values[key] = environ[key]
    return values


@dataclass(frozen=True)
class Port:
    host_ip: str
    host_port: str
    container_port: str
    protocol: str = "tcp"

    @classmethod
    def parse(cls, spec: Any) -> Port:
        text = str(spec)
        text, _, protocol = text.partition("/")
        parts = text.rsplit(":", 2)
        if len(parts) == 3:
            return cls(parts[0], parts[1], parts[2], protocol or "tcp")
        if len(parts) == 2:
            return cls("0.0.0.0", parts[0], parts[1], protocol or "tcp")
        return cls("0.0.0.0", parts[0], parts[0], protocol or "tcp")

    def __str__(self) -> str:
        return f"{self.host_ip}:{self.host_port}->{self.container_port}/{self.protocol}"


@dataclass
class Service:
    name: str
    image: Reference
    command: list[str] | None
    entrypoint: list[str] | None
    env_files: list[Path]
    environment: dict[str, str | None]
    ports: list[Port]
    depends_on: list[str]
    volumes: list[tuple[str, str]]  # (named volume or host path, container path)
    restart: str | None


@dataclass
class Project:
    name: str
    dir: Path
    file: Path
    services: dict[str, Service]
    volumes: list[str]
    environ: Mapping[str, str] = field(default_factory=dict)

    def ordered(self, selected: Sequence[str] = ()) -> list[Service]:
        """``selected`` (all when empty) with their dependencies, dependencies first."""
        for name in selected:
            if name not in self.services:
                raise EngineError(f"no such service: {name}")
        order: list[str] = []
        visiting: set[str] = set()

        def visit(name: str) -> None:
            if name in order:
                return
            if name in visiting:
                raise EngineError(f"dependency cycle detected involving service {name}")
            visiting.add(name)
            for dependency in self.services[name].depends_on:
                if dependency not in self.services:
                    raise EngineError(
                        f"service {name!r} depends on undefined service {dependency!r}"
                    )
                visit(dependency)
            order.append(name)

        for name in selected or list(self.services):
            visit(name)
        return [self.services[name] for name in order]

    def container_name(self, service: str) -> str:
        return f"{self.name}-{service}-1"


def project_name(raw: str) -> str:
    """Compose's normalisation: lower case, only ``[a-z0-9_-]``, starting alphanumeric."""
    name = re.sub(r"[^a-z0-9_-]", "", raw.lower())
    if not name or not name[0].isalnum():
        raise EngineError(
            f"project name {raw!r} must contain only lowercase letters, digits, dashes and"
            " underscores, and start with a letter or digit"
        )
    return name


def command_list(value: Any, where: str) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return shlex.split(value)
    if isinstance(value, list) and all(isinstance(v, str | int | float) for v in value):
        return [str(v) for v in value]
    raise EngineError(f"{where} must be a string or a list of strings")


def load_project(
    file: str | None, name: str | None, cwd: Path, environ: Mapping[str, str]
) -> Project:
    import yaml

    path = Path(file) if file else cwd / "docker-compose.yml"
    if not path.is_absolute():
        path = cwd / path
    if not file and not path.exists() and (cwd / "compose.yaml").exists():
        path = cwd / "compose.yaml"
    if not path.is_file():
        raise EngineError(
            f"open {path}: no such file or directory"
            if file
            else "no configuration file provided: not found"
        )
    directory = path.parent.resolve()
    variables = {**parse_dotenv(directory / ".env"), **environ}
    try:
        document = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise EngineError(f"yaml: {exc}") from exc
    if not isinstance(document, dict) or not isinstance(document.get("services"), dict):
        raise EngineError(f"{path}: services must be a mapping")
    document = interpolate_tree(document, variables, "")
    raw_name = name or environ.get("COMPOSE_PROJECT_NAME") or document.get("name")
    services: dict[str, Service] = {}
    for service_name, spec in document["services"].items():
        service_name = str(service_name)
        if not SERVICE_NAME.match(service_name):
            raise EngineError(f"service name {service_name!r} must match [a-zA-Z0-9._-]+")
        spec = spec or {}
        where = f"services.{service_name}"
        if not isinstance(spec, dict) or not spec.get("image"):
            raise EngineError(f"{where}: an image is required (build: is not supported here)")
        env_files = spec.get("env_file") or []
        env_files = [env_files] if isinstance(env_files, str | dict) else env_files
        environment = spec.get("environment") or {}
        if isinstance(environment, list):
            pairs = (str(item).partition("=") for item in environment)
            environment = {k: (v if sep else None) for k, sep, v in pairs}
        depends_on = spec.get("depends_on") or []
        volumes = []
        for entry in spec.get("volumes") or []:
            source, _, target = str(entry).partition(":")
            volumes.append((source, target.split(":", 1)[0]))
        services[service_name] = Service(
            name=service_name,
            image=Reference.parse(str(spec["image"])),
            command=command_list(spec.get("command"), f"{where}.command"),
            entrypoint=command_list(spec.get("entrypoint"), f"{where}.entrypoint"),
            env_files=[
                directory / (f["path"] if isinstance(f, dict) else str(f)) for f in env_files
            ],
            environment={
                str(k): (None if v is None else str(v)) for k, v in dict(environment).items()
            },
            ports=[Port.parse(p) for p in spec.get("ports") or []],
            depends_on=[str(d) for d in depends_on],
            volumes=volumes,
            restart=spec.get("restart"),
        )
    return Project(
        name=project_name(str(raw_name or directory.name)),
        dir=directory,
        file=path,
        services=services,
        volumes=[str(v) for v in document.get("volumes") or {}],
        environ=environ,
    )


# --- running a service -------------------------------------------------------------------------


@dataclass(frozen=True)
class Launch:
    """What a service's container runs: argv, cwd, env; and what describes it."""

    argv: list[str]
    cwd: str
    env: dict[str, str]
    stop_signal: str
    mounts: dict[str, str]
    command: list[str]  # what the image says it runs, for ps: argv may be our stand-in

    def config_hash(self, service: Service, image: Image) -> str:
        """What ``up`` compares to decide on recreating, as compose's config-hash label."""
        spec = {
            "argv": self.argv,
            "cwd": self.cwd,
            "env": {k: v for k, v in self.env.items() if k != "HOSTNAME"},
            "image": str(service.image),
            "image_id": image.id,
            "ports": [str(p) for p in service.ports],
            "mounts": self.mounts,
        }
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def image_source(settings: Settings, image: Image, ref: Reference) -> Path:
    """The directory an image runs: built from, or named by its label inside the project."""
    from local_stack.registry import SOURCE_LABEL  # not at import: httpx would slow every shim

    if image.source:
        return Path(image.source)
    labels = image.settings.get("Labels") or {}
    relative = labels.get(SOURCE_LABEL)
    if not relative:
        raise daemon_error(
            f"image {ref} has no {SOURCE_LABEL} label: this engine runs an image's source tree"
            " from the project, and this image names none"
        )
    source = (settings.project_dir / relative).resolve()
    roots = (settings.project_dir, *settings.source_roots)
    if not any(source.is_relative_to(root) for root in roots) or not source.is_dir():
        raise daemon_error(
            f"image {ref}: {SOURCE_LABEL}={relative!r} is not a directory inside"
            f" {' or '.join(str(root) for root in roots)}"
        )
    return source


def launch_for(
    settings: Settings,
    store: Store,
    project: Project,
    service: Service,
    image: Image,
    command: Sequence[str] | None = None,
    hostname: str = "",
) -> Launch:
    config = image.settings
    env: dict[str, str] = {}
    for item in config.get("Env") or []:
        key, _, text = str(item).partition("=")
        env[key] = text
    for env_file in service.env_files:
        env.update(parse_env_file(env_file, project.environ))
    for key, value in service.environment.items():
        if value is not None:
            env[key] = value
        elif key in project.environ:
            env[key] = project.environ[key]
    python_dir = os.path.dirname(settings.python)
    search = env.get("PATH") or DEFAULT_PATH
    env["PATH"] = search if search.startswith(python_dir + ":") else f"{python_dir}:{search}"
    env.setdefault("HOME", "/root")
    env["HOSTNAME"] = hostname
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    mounts = {}
    for source, target in service.volumes:
        if NAME.match(source) and source in project.volumes:
            mounts[target] = str(store.volume_dir(f"{project.name}_{source}"))
        elif source.startswith(("/", ".")):
            mounts[target] = str((project.dir / source).resolve())
    stop_signal = str(config.get("StopSignal") or "SIGTERM")
    if image.builtin == "postgres":
        pgdata = env.get("PGDATA", "/var/lib/postgresql/data")
        if pgdata not in mounts:  # the image's VOLUME: an anonymous one per container
            mounts[pgdata] = str(store.volume_dir(f"{project.name}_{service.name}_pgdata"))
        env["PGDATA"] = mounts[pgdata]
        argv = [settings.python, "-m", "local_stack.instance.engine", "__postgres__"]
        env["PYTHONPATH"] = str(PROJECT_DIR)
        shown = [str(a) for a in (config.get("Entrypoint") or []) + (config.get("Cmd") or [])]
        return Launch(argv, "/", env, stop_signal, mounts, shown)
    entrypoint = service.entrypoint
    if entrypoint is None:
        entrypoint = [str(a) for a in config.get("Entrypoint") or []]
    if command is None:
        command = service.command
    if command is None:
        command = [str(a) for a in config.get("Cmd") or []] if service.entrypoint is None else []
    argv = [*entrypoint, *command]
    if not argv:
        raise daemon_error("no command specified")
    cwd = image_source(settings, image, service.image)
    return Launch(argv, str(cwd), env, stop_signal, mounts, argv)


def ensure_image(settings: Settings, store: Store, service: Service, progress: IO[str]) -> Image:
    image = store.image(service.image)
    if image is not None:
        return image
    progress.write(f" {service.name} Pulling \n")
    progress.flush()
    try:
        image = pull_image(settings, store, service.image)
    except EngineError as exc:
        progress.write(
            f" {service.name} Error {str(exc).removeprefix('Error response from daemon: ')}\n"
        )
        raise
    progress.write(f" {service.name} Pulled \n")
    return image


def create_container(
    store: Store, project: Project, service: Service, image: Image, launch: Launch
) -> Container:
    name = project.container_name(service.name)
    directory = store.container_dir(name)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    for target in launch.mounts.values():
        Path(target).mkdir(parents=True, exist_ok=True)
    container_id = hashlib.sha256(os.urandom(32)).hexdigest()
    launch.env["HOSTNAME"] = container_id[:12]
    container = Container(
        directory,
        {
            "id": container_id,
            "name": name,
            "project": project.name,
            "service": service.name,
            "image": str(service.image),
            "image_id": image.id,
            "argv": launch.argv,
            "command": launch.command,
            "cwd": launch.cwd,
            "env": launch.env,
            "ports": [str(p) for p in service.ports],
            "mounts": launch.mounts,
            "restart": service.restart,
            "stop_signal": launch.stop_signal,
            "config_hash": launch.config_hash(service, image),
            "created": now_iso(),
            "pid": None,
        },
    )
    container.log.touch(mode=0o600)
    container.save()
    return container


def remove_container(container: Container) -> None:
    for path in sorted(container.dir.iterdir()) if container.dir.is_dir() else []:
        path.unlink()
    with contextlib.suppress(OSError):
        container.dir.rmdir()


# --- docker commands ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Flag:
    key: str
    takes_value: bool = False


def parse_flags(
    args: Sequence[str],
    flags: Mapping[str, Flag],
    command: str,
    *,
    interspersed: bool = True,
    usage_exit: int = 125,
) -> tuple[dict[str, Any], list[str]]:
    """cobra's flag parsing for the flags given: ``--tail=200``, ``--tail 200``, ``-dT``;
    without ``interspersed``, the first positional argument ends the flags."""
    values: dict[str, Any] = {}
    positional: list[str] = []
    items = list(args)
    index = 0

    def take(flag: Flag, spelled: str, inline: str | None) -> None:
        nonlocal index
        if flag.takes_value:
            if inline is None:
                if index >= len(items):
                    raise EngineError(
                        f"flag needs an argument: {spelled}\nSee '{command} --help'.", usage_exit
                    )
                inline = items[index]
                index += 1
            values.setdefault(flag.key, []).append(inline)
        else:
            values[flag.key] = True

    while index < len(items):
        arg = items[index]
        index += 1
        if arg == "--":
            positional.extend(items[index:])
            break
        if arg.startswith("--") and len(arg) > 2:
            spelled, sep, inline = arg.partition("=")
            if spelled not in flags:
                raise EngineError(f"unknown flag: {spelled}\nSee '{command} --help'.", usage_exit)
            take(flags[spelled], spelled, inline if sep else None)
        elif arg.startswith("-") and len(arg) > 1:
            letters = arg[1:]
            while letters:
                spelled = f"-{letters[0]}"
                if spelled not in flags:
                    raise EngineError(
                        f"unknown shorthand flag: '{letters[0]}' in -{arg[1:]}\n"
                        f"See '{command} --help'.",
                        usage_exit,
                    )
                flag = flags[spelled]
                rest = letters[1:]
                if flag.takes_value and rest:
                    take(flag, spelled, rest.removeprefix("="))
                    break
                take(flag, spelled, None)
                letters = rest
        else:
            positional.append(arg)
            if not interspersed:
                positional.extend(items[index:])
                break
    return values, positional


def stop_timeout(values: Mapping[str, Any]) -> float:
    """``-t/--timeout``: seconds from the stop signal to SIGKILL (docker's default 10)."""
    text = (values.get("timeout") or [str(STOP_TIMEOUT)])[-1]
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1
    if seconds < 0:
        raise EngineError(f'invalid argument "{text}" for "-t, --timeout" flag', 1)
    return seconds


def cmd_version(settings: Settings, args: Sequence[str]) -> int:
    parse_flags(args, {}, "docker version")
    print(
        f"""Client:
 Version:           {ENGINE_VERSION}
 API version:       {API_VERSION}
 Go version:        go1.22.7
 Git commit:        local
 Built:             -
 OS/Arch:           linux/amd64
 Context:           default

Server:
 Engine:
  Version:          {ENGINE_VERSION}
  API version:      {API_VERSION} (minimum version 1.24)
  Go version:       go1.22.7
  Git commit:       local (pr-preview local engine: containers are local processes)
  Built:            -
  OS/Arch:          linux/amd64
  Experimental:     false"""
    )
    return 0


def cmd_login(settings: Settings, args: Sequence[str], stdin: IO[str]) -> int:
    flags = {
        "-u": Flag("username", True),
        "--username": Flag("username", True),
        "-p": Flag("password", True),
        "--password": Flag("password", True),
        "--password-stdin": Flag("password_stdin"),
    }
    values, positional = parse_flags(args, flags, "docker login")
    if len(positional) > 1:
        raise EngineError(
            "\"docker login\" requires at most 1 argument.\nSee 'docker login --help'.", 1
        )
    username = (values.get("username") or [""])[-1]
    password = (values.get("password") or [None])[-1]
    if values.get("password_stdin"):
        if password is not None:
            raise EngineError("--password and --password-stdin are mutually exclusive")
        if not username:
            raise EngineError("Must provide --username with --password-stdin")
        password = stdin.read().removesuffix("\n").removesuffix("\r")
    elif password is not None:
        print(
            "WARNING! Using --password via the CLI is insecure. Use --password-stdin.",
            file=sys.stderr,
        )
    if not username or not password:
        raise EngineError("Error: Cannot perform an interactive login from a non TTY device")
    server = positional[0] if positional else DOCKER_HUB
    server = re.sub(r"^https?://", "", server).rstrip("/")
    if server in ("index.docker.io/v1", "index.docker.io", "registry-1.docker.io"):
        server = DOCKER_HUB
    settings.delay("login")
    with RegistrySession(settings, server, None, (username, password)) as session:
        response = session.request("GET", "/v2/")
        if not response.is_success:
            raise daemon_error(
                f'Get "{session.display("/v2/")}": {RegistryError.of(response).text}'
            )
    path = settings.docker_config / "config.json"
    config = read_json(path) or {}
    config.setdefault("auths", {})[auth_key(server)] = {
        "auth": base64.b64encode(f"{username}:{password}".encode()).decode()
    }
    settings.docker_config.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".config.json.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(json.dumps(config, indent="\t") + "\n")
    os.replace(tmp, path)
    print(
        f"WARNING! Your password will be stored unencrypted in {path}.\n"
        "Configure a credential helper to remove this warning. See\n"
        "https://docs.docker.com/engine/reference/commandline/login/#credential-stores\n",
        file=sys.stderr,
    )
    print("Login Succeeded")
    return 0


def parse_dockerfile(path: Path) -> tuple[dict[str, Any], list[str]]:
    """The config a Dockerfile declares (CMD, ENTRYPOINT, ENV, WORKDIR, LABEL, EXPOSE), and
    its instructions, for the build's steps."""
    config: dict[str, Any] = {"Env": [], "Labels": {}}
    steps: list[str] = []
    logical = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not logical and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            logical += line[:-1] + " "
            continue
        logical += line
        steps.append(logical)
        logical = ""
    for step in steps:
        instruction, _, rest = step.partition(" ")
        instruction, rest = instruction.upper(), rest.strip()
        if instruction in ("CMD", "ENTRYPOINT"):
            try:
                parsed = json.loads(rest)
                argv = [str(a) for a in parsed] if isinstance(parsed, list) else None
            except json.JSONDecodeError:
                argv = None
            config["Cmd" if instruction == "CMD" else "Entrypoint"] = argv or [
                "/bin/sh",
                "-c",
                rest,
            ]
        elif instruction == "ENV":
            if "=" in rest.split(" ", 1)[0]:
                for pair in shlex.split(rest):
                    config["Env"].append(pair)
            else:
                key, _, value = rest.partition(" ")
                config["Env"].append(f"{key}={value.strip()}")
        elif instruction == "WORKDIR":
            config["WorkingDir"] = rest
        elif instruction == "LABEL":
            for pair in shlex.split(rest):
                key, _, value = pair.partition("=")
                config["Labels"][key] = value
        elif instruction == "EXPOSE":
            config.setdefault("ExposedPorts", {}).update(
                {p if "/" in p else f"{p}/tcp": {} for p in rest.split()}
            )
    return config, steps


def tree_digest(directory: Path) -> tuple[str, int]:
    """What the build context holds: a digest of its files (paths and bytes) and its size."""
    digest = hashlib.sha256()
    size = 0
    for path in sorted(directory.rglob("*")):
        relative = path.relative_to(directory)
        if {".git", "__pycache__", ".venv"} & set(relative.parts) or not path.is_file():
            continue
        data = path.read_bytes()
        size += len(data)
        digest.update(str(relative).encode() + b"\0" + data + b"\0")
    return digest.hexdigest(), size


def cmd_build(settings: Settings, store: Store, args: Sequence[str]) -> int:
    flags = {
        "-t": Flag("tag", True),
        "--tag": Flag("tag", True),
        "-f": Flag("file", True),
        "--file": Flag("file", True),
        "-q": Flag("quiet"),
        "--quiet": Flag("quiet"),
    }
    from local_stack.registry import sample_app_command

    values, positional = parse_flags(args, flags, "docker build")
    if len(positional) != 1:
        raise EngineError(
            "\"docker build\" requires exactly 1 argument.\nSee 'docker build --help'.", 1
        )
    context = Path(positional[0]).resolve()
    if not context.is_dir():
        raise EngineError(f'unable to prepare context: path "{positional[0]}" not found')
    tags = [Reference.parse(t) for t in values.get("tag") or []]
    dockerfile = Path((values.get("file") or [str(context / "Dockerfile")])[-1])
    settings.delay("build")
    print(
        "DEPRECATED: The legacy builder is deprecated and will be removed in a future release.\n"
        "            Install the buildx component to build images with BuildKit:\n"
        "            https://docs.docker.com/go/buildx/\n",
        file=sys.stderr,
    )
    if dockerfile.is_file():
        settings_part, steps = parse_dockerfile(dockerfile)
    else:
        settings_part, steps = {"Env": [], "Labels": {}}, []
    settings_part.setdefault("Cmd", sample_app_command())
    settings_part.setdefault("WorkingDir", "/app")
    config = {"architecture": "amd64", "os": "linux", "config": settings_part}
    content, size = tree_digest(context)
    image = Image(id=config_id(config, f"{context}\0{content}"), config=config, source=str(context))
    quiet = values.get("quiet")
    if not quiet:
        print(f"Sending build context to Docker daemon  {size / 1000:.2f}kB")
        for number, step in enumerate(steps, 1):
            print(f"Step {number}/{len(steps)} : {step}")
        print(f"Successfully built {image.id.removeprefix('sha256:')[:12]}")
    with store.locked():
        for ref in tags:
            store.tag_image(ref, image)
            if not quiet:
                print(f"Successfully tagged {ref}")
    if quiet:
        print(image.id)
    return 0


# --- docker compose ----------------------------------------------------------------------------


def compose_installed(settings: Settings) -> bool:
    for directory in (str(settings.docker_config / "cli-plugins"), *PLUGIN_DIRS):
        plugin = Path(directory) / "docker-compose"
        if plugin.is_file() and os.access(plugin, os.X_OK):
            return True
    return not (settings.compose_disabled or (settings.root / NO_COMPOSE_MARKER).exists())


COMPOSE_FLAGS = {
    "-f": Flag("file", True),
    "--file": Flag("file", True),
    "-p": Flag("project", True),
    "--project-name": Flag("project", True),
}


def cmd_compose(settings: Settings, store: Store, args: Sequence[str]) -> int:
    if not compose_installed(settings):
        if args and args[0].startswith("-"):  # the bare CLI meets compose's flags
            flag = args[0].split("=", 1)[0]
            if flag.startswith("--"):
                raise EngineError(f"unknown flag: {flag}\nSee 'docker --help'.", 125)
            raise EngineError(
                f"unknown shorthand flag: '{flag[1]}' in {flag}\nSee 'docker --help'.", 125
            )
        raise EngineError("docker: 'compose' is not a docker command.\nSee 'docker --help'", 1)
    values, rest = parse_flags(
        args, COMPOSE_FLAGS, "docker compose", interspersed=False, usage_exit=1
    )
    if not rest:
        raise EngineError("Usage:  docker compose [OPTIONS] COMMAND", 1)
    sub, sub_args = rest[0], rest[1:]
    if sub == "version":
        flags = {
            "--short": Flag("short"),
            "-f": Flag("format", True),
            "--format": Flag("format", True),
        }
        parsed, _ = parse_flags(sub_args, flags, "docker compose version", usage_exit=1)
        print(
            COMPOSE_VERSION.lstrip("v")
            if parsed.get("short")
            else f"Docker Compose version {COMPOSE_VERSION}"
        )
        return 0
    commands: dict[str, Callable[..., int]] = {
        "pull": compose_pull,
        "up": compose_up,
        "run": compose_run,
        "exec": compose_exec,
        "ps": compose_ps,
        "logs": compose_logs,
        "down": compose_down,
    }
    if sub not in commands:
        raise EngineError(f'unknown docker command: "compose {sub}"', 1)
    project = load_project(
        (values.get("file") or [None])[-1],
        (values.get("project") or [None])[-1],
        Path.cwd(),
        settings.environ,
    )
    return commands[sub](settings, store, project, sub_args)


def compose_pull(settings: Settings, store: Store, project: Project, args: Sequence[str]) -> int:
    flags = {"-q": Flag("quiet"), "--quiet": Flag("quiet")}
    _, selected = parse_flags(args, flags, "docker compose pull", usage_exit=1)
    for name in selected:
        if name not in project.services:
            raise EngineError(f"no such service: {name}")
    for service in [project.services[s] for s in selected] or list(project.services.values()):
        sys.stderr.write(f" {service.name} Pulling \n")
        sys.stderr.flush()
        try:
            pull_image(settings, store, service.image)
        except EngineError as exc:
            detail = str(exc).removeprefix("Error response from daemon: ")
            sys.stderr.write(f" {service.name} Error {detail}\n")
            raise
        sys.stderr.write(f" {service.name} Pulled \n")
    return 0


def compose_up(settings: Settings, store: Store, project: Project, args: Sequence[str]) -> int:
    flags = {
        "-d": Flag("detach"),
        "--detach": Flag("detach"),
        "--force-recreate": Flag("force"),
        "--no-recreate": Flag("no_recreate"),
        "-t": Flag("timeout", True),
        "--timeout": Flag("timeout", True),
    }
    values, selected = parse_flags(args, flags, "docker compose up", usage_exit=1)
    if not values.get("detach"):
        raise EngineError(
            "this engine runs `docker compose up` detached only: add -d, then read"
            " `docker compose logs`",
            1,
        )
    timeout = stop_timeout(values)
    err = sys.stderr
    with store.locked():
        for volume in project.volumes:
            volume_dir = store.volume_dir(f"{project.name}_{volume}")
            if not volume_dir.is_dir():
                err.write(f' Volume "{project.name}_{volume}"  Creating\n')
                volume_dir.mkdir(parents=True)
                err.write(f' Volume "{project.name}_{volume}"  Created\n')
        for service in project.ordered(selected):
            up_service(settings, store, project, service, values, timeout, err)
    return 0


def up_service(
    settings: Settings,
    store: Store,
    project: Project,
    service: Service,
    values: Mapping[str, Any],
    timeout: float,
    err: IO[str],
) -> Container:
    image = ensure_image(settings, store, service, err)
    launch = launch_for(settings, store, project, service, image)
    name = project.container_name(service.name)
    existing = next((c for c in store.containers(project.name) if c.name == name), None)
    wanted = launch.config_hash(service, image)
    if existing is not None:
        same = existing.record.get("config_hash") == wanted
        if (same and not values.get("force")) or values.get("no_recreate"):
            if existing.running:
                err.write(f" Container {name}  Running\n")
                return existing
            err.write(f" Container {name}  Starting\n")
            settings.delay("up")
            start_detached(settings, existing)
            err.write(f" Container {name}  Started\n")
            return existing
        err.write(f" Container {name}  Recreate\n")
        existing.stop(timeout)
        remove_container(existing)
        container = create_container(store, project, service, image, launch)
        err.write(f" Container {name}  Recreated\n")
    else:
        err.write(f" Container {name}  Creating\n")
        container = create_container(store, project, service, image, launch)
        err.write(f" Container {name}  Created\n")
    err.write(f" Container {name}  Starting\n")
    err.flush()
    settings.delay("up")
    start_detached(settings, container)
    err.write(f" Container {name}  Started\n")
    err.flush()
    return container


def compose_run(settings: Settings, store: Store, project: Project, args: Sequence[str]) -> int:
    """The command in the foreground with the service's image, env and source dir, after
    starting its dependencies; its output and exit code are ours. A one-off container is
    never kept, as with ``--rm`` (the only form the scripts use)."""
    flags = {
        "--rm": Flag("rm"),
        "-T": Flag("no_tty"),
        "--no-TTY": Flag("no_tty"),
        "--no-deps": Flag("no_deps"),
        "-e": Flag("env", True),
        "--env": Flag("env", True),
        "-d": Flag("detach"),
    }
    values, rest = parse_flags(args, flags, "docker compose run", interspersed=False, usage_exit=1)
    if values.get("detach"):
        raise EngineError("this engine runs `docker compose run` in the foreground only", 1)
    if not rest:
        raise EngineError(
            '"docker compose run" requires at least 1 argument.\n'
            "See 'docker compose run --help'.",
            1,
        )
    service = project.services.get(rest[0])
    if service is None:
        raise EngineError(f"no such service: {rest[0]}")
    err = sys.stderr
    if not values.get("no_deps"):
        with store.locked():
            for dependency in project.ordered([service.name])[:-1]:
                up_service(settings, store, project, dependency, {}, STOP_TIMEOUT, err)
    for pair in values.get("env") or []:
        key, sep, value = pair.partition("=")
        service.environment[key] = value if sep else None
    image = ensure_image(settings, store, service, err)
    launch = launch_for(settings, store, project, service, image, rest[1:] or None)
    launch.env["HOSTNAME"] = hashlib.sha256(os.urandom(16)).hexdigest()[:12]
    settings.delay("run")
    try:
        child = subprocess.Popen(launch.argv, cwd=launch.cwd, env=launch.env)
    except OSError as exc:
        raise daemon_error(exec_error(launch.argv, exc)) from None

    def forward(signum: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            child.send_signal(signum)

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, forward)
    code = child.wait()
    return code if code >= 0 else 128 - code


def compose_exec(settings: Settings, store: Store, project: Project, args: Sequence[str]) -> int:
    """A command beside the service's running process (same env and source dir), in the
    foreground, stdin passed through (``exec -T api python - <<'PY'``); needs it running."""
    flags = {"-T": Flag("no_tty"), "--no-TTY": Flag("no_tty"), "-e": Flag("env", True)}
    values, rest = parse_flags(args, flags, "docker compose exec", interspersed=False, usage_exit=1)
    if len(rest) < 2:
        raise EngineError(
            '"docker compose exec" requires at least 2 arguments.\n'
            "See 'docker compose exec --help'.",
            1,
        )
    service = project.services.get(rest[0])
    if service is None:
        raise EngineError(f"no such service: {rest[0]}")
    running = [c for c in store.containers(project.name) if c.service == service.name and c.running]
    if not running:
        raise EngineError(f'service "{service.name}" is not running', 1)
    for pair in values.get("env") or []:
        key, sep, value = pair.partition("=")
        service.environment[key] = value if sep else None
    image = ensure_image(settings, store, service, sys.stderr)
    launch = launch_for(settings, store, project, service, image, rest[1:])
    try:
        return subprocess.run(launch.argv, cwd=launch.cwd, env=launch.env, check=False).returncode
    except OSError as exc:
        raise daemon_error(exec_error(launch.argv, exc)) from None


def human_duration(seconds: float) -> str:
    """go-units' HumanDuration, as ``docker ps`` prints ages."""
    whole = int(seconds)
    if whole < 1:
        return "Less than a second"
    if whole == 1:
        return "1 second"
    if whole < 60:
        return f"{whole} seconds"
    minutes = whole // 60
    if minutes == 1:
        return "About a minute"
    if minutes < 60:
        return f"{minutes} minutes"
    hours = int(seconds / 3600 + 0.5)
    if hours == 1:
        return "About an hour"
    if hours < 48:
        return f"{hours} hours"
    if hours < 24 * 7 * 2:
        return f"{hours // 24} days"
    if hours < 24 * 30 * 2:
        return f"{hours // 24 // 7} weeks"
    if hours < 24 * 365 * 2:
        return f"{hours // 24 // 30} months"
    return f"{int(seconds / 3600) // 24 // 365} years"


def since(iso: str | None) -> float:
    if not iso:
        return 0.0
    return (datetime.now(UTC) - datetime.fromisoformat(iso)).total_seconds()


def table(rows: Sequence[Sequence[str]]) -> str:
    """Go's tabwriter as docker uses it: columns padded by three spaces."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [cell.ljust(widths[i] + 3) for i, cell in enumerate(row[:-1])]
        lines.append(("".join(cells) + row[-1]).rstrip())
    return "\n".join(lines)


def compose_ps(settings: Settings, store: Store, project: Project, args: Sequence[str]) -> int:
    flags = {
        "-a": Flag("all"),
        "--all": Flag("all"),
        "-q": Flag("quiet"),
        "--quiet": Flag("quiet"),
        "--format": Flag("format", True),
    }
    values, selected = parse_flags(args, flags, "docker compose ps", usage_exit=1)
    template = (values.get("format") or [None])[-1]
    rows = [["NAME", "IMAGE", "COMMAND", "SERVICE", "CREATED", "STATUS", "PORTS"]]
    for container in store.containers(project.name):
        if selected and container.service not in selected:
            continue
        state, code, finished = container.state()
        if state != "running" and not values.get("all"):
            continue
        if values.get("quiet"):
            print(container.record["id"])
            continue
        command = " ".join(container.record.get("command") or [])
        if len(command) > 20:
            command = command[:19] + "…"
        if state == "running":
            status = f"Up {human_duration(since(container.record.get('started_at')))}"
            ports = ", ".join(container.record.get("ports") or [])
        elif state == "created":
            status, ports = "Created", ""
        else:
            status = f"Exited ({code}) {human_duration(since(finished))} ago"
            ports = ""
        if template is not None:
            summary = {
                "ID": container.record["id"],
                "Name": container.name,
                "Image": str(container.record.get("image", "")),
                "Service": container.service,
                "State": state,
                "Status": status,
                "ExitCode": code or 0,
                "Publishers": ports,
            }
            print(render_format(template, summary))
            continue
        rows.append(
            [
                container.name,
                str(container.record.get("image", "")),
                f'"{command}"',
                container.service,
                f"{human_duration(since(container.record.get('created')))} ago",
                status,
                ports,
            ]
        )
    if not values.get("quiet") and template is None:
        print(table(rows))
    return 0


def render_format(template: str, summary: Mapping[str, Any]) -> str:
    """``--format``: ``json`` (one object per line, compose v2.21+) or a Go template made of
    ``{{.Field}}`` references and plain text; any other template is refused as compose would
    fail to parse it."""
    if template == "json":
        return json.dumps(dict(summary), separators=(",", ":"))

    def field(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in summary:
            raise EngineError(
                f'template: :1:2: executing "" at <.{name}>: can\'t evaluate field {name}', 1
            )
        return str(summary[name])

    if re.sub(r"\{\{\s*\.(\w+)\s*\}\}", "", template).count("{{"):
        raise EngineError(f"template: :1: unsupported template {template!r}", 1)
    return re.sub(r"\{\{\s*\.(\w+)\s*\}\}", field, template)


def compose_logs(settings: Settings, store: Store, project: Project, args: Sequence[str]) -> int:
    flags = {
        "--no-color": Flag("no_color"),
        "-n": Flag("tail", True),
        "--tail": Flag("tail", True),
        "-t": Flag("timestamps"),
        "--timestamps": Flag("timestamps"),
        "--no-log-prefix": Flag("no_prefix"),
    }
    values, selected = parse_flags(args, flags, "docker compose logs", usage_exit=1)
    for name in selected:
        if name not in project.services:
            raise EngineError(f"no such service: {name}")
    tail_text = (values.get("tail") or ["all"])[-1]
    if tail_text != "all" and not tail_text.lstrip("-").isdigit():
        raise EngineError(f'invalid argument "{tail_text}" for "-n, --tail" flag', 1)
    tail = None if tail_text == "all" or int(tail_text) < 0 else int(tail_text)
    containers = [
        c for c in store.containers(project.name) if not selected or c.service in selected
    ]
    width = max((len(c.name) for c in containers), default=0)
    out = sys.stdout
    for container in containers:
        try:
            lines = container.log.read_bytes().decode("utf-8", "replace").splitlines()
        except FileNotFoundError:
            lines = []
        if tail is not None:
            lines = lines[-tail:] if tail else []
        prefix = "" if values.get("no_prefix") else f"{container.name.ljust(width)}  | "
        for line in lines:
            out.write(f"{prefix}{line}\n")
    out.flush()
    return 0


def compose_down(settings: Settings, store: Store, project: Project, args: Sequence[str]) -> int:
    flags = {
        "-v": Flag("volumes"),
        "--volumes": Flag("volumes"),
        "-t": Flag("timeout", True),
        "--timeout": Flag("timeout", True),
        "--remove-orphans": Flag("orphans"),
    }
    values, _ = parse_flags(args, flags, "docker compose down", usage_exit=1)
    timeout = stop_timeout(values)
    order = [s.name for s in project.ordered()]
    err = sys.stderr
    settings.delay("down")
    with store.locked():
        containers = store.containers(project.name)
        containers.sort(
            key=lambda c: -order.index(c.service) if c.service in order else -len(order) - 1
        )
        for container in containers:
            if container.running:
                err.write(f" Container {container.name}  Stopping\n")
                err.flush()
                container.stop(timeout)
                err.write(f" Container {container.name}  Stopped\n")
            else:
                container.stop(0)
            err.write(f" Container {container.name}  Removing\n")
            remove_container(container)
            err.write(f" Container {container.name}  Removed\n")
        if values.get("volumes"):
            for volume in project.volumes:
                volume_root = store.volume_dir(f"{project.name}_{volume}").parent
                if volume_root.is_dir():
                    err.write(f" Volume {project.name}_{volume}  Removing\n")
                    import shutil

                    shutil.rmtree(volume_root)
                    err.write(f" Volume {project.name}_{volume}  Removed\n")
    return 0


# --- the ephemeral database --------------------------------------------------------------------


def run_postgres() -> int:
    """``__postgres__``: the postgres image's entrypoint, on ``local_stack.postgres``.

    Like the image: a new cluster in ``PGDATA`` (the volume's directory) for ``POSTGRES_USER``
    with ``POSTGRES_PASSWORD`` and database ``POSTGRES_DB`` on first start, served as it is
    after; on 127.0.0.1, port ``PGPORT`` (5432). The server's log is copied to this process's
    output (the container log); SIGINT (the image's stop signal) or SIGTERM stops it.
    """
    from local_stack import postgres

    env = os.environ
    data_dir = Path(env["PGDATA"])
    user = env.get("POSTGRES_USER") or "postgres"
    password = env.get("POSTGRES_PASSWORD", "")
    if not password and not (data_dir / "PG_VERSION").exists():
        print(
            "Error: Database is uninitialized and superuser password is not specified.\n"
            "       You must specify POSTGRES_PASSWORD to a non-empty value for the\n"
            "       superuser.",
            flush=True,
        )
        return 1
    stopping: list[int] = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda number, _frame: stopping.append(number))
    port = int(env.get("PGPORT") or 5432)
    server = postgres.start_ephemeral(
        data_dir, port, user, password, env.get("POSTGRES_DB") or user
    )
    position = 0

    def copy_log() -> None:
        nonlocal position
        with contextlib.suppress(FileNotFoundError), open(server.log, "rb") as log:
            log.seek(position)
            chunk = log.read()
            position += len(chunk)
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()

    try:
        server.wait_ready(60)
        while not stopping and server.process.poll() is None:
            copy_log()
            time.sleep(0.2)
    finally:
        server.stop()
        copy_log()
    code = server.process.returncode
    return 0 if stopping else (code if code and code > 0 else 1)


# --- entry point -------------------------------------------------------------------------------


def fail(message: str, code: int) -> NoReturn:
    print(message, file=sys.stderr)
    raise SystemExit(code)


def cmd_pull(settings: Settings, store: Store, args: Sequence[str]) -> int:
    """``docker pull [-q] NAME[:TAG]``: the same registry exchange as ``compose pull``."""
    flags = {"-q": Flag("quiet"), "--quiet": Flag("quiet")}
    values, rest = parse_flags(args, flags, "docker pull", usage_exit=1)
    if len(rest) != 1:
        raise EngineError(
            "\"docker pull\" requires exactly 1 argument.\nSee 'docker pull --help'.", 1
        )
    ref = Reference.parse(rest[0])
    pull_image(settings, store, ref)
    if not values.get("quiet"):
        sys.stdout.write(f"Status: Downloaded newer image for {rest[0]}\n")
    sys.stdout.write(f"{rest[0]}\n")
    return 0


def main(argv: Sequence[str] | None = None, stdin: IO[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["__shim__"] and len(args) == 2:
        return run_shim(Path(args[1]))
    if args[:1] == ["__postgres__"]:
        return run_postgres()
    try:
        settings = Settings.from_env(os.environ)
        store = Store(settings.root)
        if not args:
            raise EngineError("Usage:  docker [OPTIONS] COMMAND\n\nRun 'docker --help'", 1)
        command, rest = args[0], args[1:]
        if command == "version":
            return cmd_version(settings, rest)
        if command == "login":
            return cmd_login(settings, rest, stdin or sys.stdin)
        if command == "build":
            return cmd_build(settings, store, rest)
        if command == "pull":
            return cmd_pull(settings, store, rest)
        if command == "compose":
            return cmd_compose(settings, store, rest)
        if command.startswith("-"):
            flag = command.split("=", 1)[0]
            if flag.startswith("--"):
                raise EngineError(f"unknown flag: {flag}\nSee 'docker --help'.", 125)
            raise EngineError(
                f"unknown shorthand flag: '{flag[1]}' in {flag}\nSee 'docker --help'.", 125
            )
        raise EngineError(f"docker: '{command}' is not a docker command.\nSee 'docker --help'", 1)
    except EngineError as exc:
        fail(str(exc), exc.exit_code)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
