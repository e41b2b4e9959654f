"""The repository's own compose file (``compose_path``): fetched at the PR's sha, checked
before anything is launched, and rewritten so that the app service runs the PR's image.

What a preview instance must never run, whoever wrote the file: a privileged container, the
host's network, PID or IPC namespace, a bind mount of the host outside the app dir, a port on
anything but 127.0.0.1 (nothing listens on the internet), or a ``build:`` (the image is CI's).
Each refusal names the service and the key, and says what to write instead.
"""

from __future__ import annotations

import posixpath
from collections.abc import Mapping
from typing import Any

import yaml

from tasks.app_env import PREVIEW_ENV_FILE, SECRETS_ENV_FILE
from tasks.config import SERVICE_PATTERN, PreviewConfig
from tasks.github import GitHub
from tasks.launch import EPHEMERAL_DB_IMAGE
from tasks.step import step

MAX_COMPOSE_BYTES = 8000  # it travels in the user data, which EC2 caps at 16 KB
EPHEMERAL_DB_SERVICE = "db"
LOOPBACK = "127.0.0.1"
HOST_NAMESPACES = ("network_mode", "pid", "ipc", "userns_mode", "uts", "cgroup")


class ComposeRefused(ValueError):
    """The repository's compose file cannot run as a preview; the message says why and how
    to fix it, and is what the PR comment shows."""

    @property
    def diagnosis(self) -> str:
        return str(self)


def check_compose(text: str, config: PreviewConfig, where: str) -> dict[str, Any]:
    """The parsed file when it may run as a preview; ``ComposeRefused`` naming the first
    problem otherwise. ``where`` (path@sha) is for the messages."""
    if len(text.encode()) > MAX_COMPOSE_BYTES:
        raise ComposeRefused(
            f"{where} is over {MAX_COMPOSE_BYTES} bytes: it travels in the instance's user data"
        )
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ComposeRefused(f"{where} does not parse as YAML: {exc}") from None
    if not isinstance(document, dict) or not isinstance(document.get("services"), dict):
        raise ComposeRefused(f"{where} has no services: mapping")
    for key in ("include", "extends"):
        if key in document:
            raise ComposeRefused(f"{where}: {key}: is not supported (only this file is fetched)")
    for key in ("secrets", "configs"):  # file: reads the host
        for entry in (document.get(key) or {}).values():
            path = str(entry.get("file", ".")) if isinstance(entry, dict) else "."
            if not _inside(path, config.app_dir):
                raise ComposeRefused(f"{where}: {key}: file {path!r} is outside the app dir")
    for volume in (document.get("volumes") or {}).values():
        if isinstance(volume, dict) and volume.get("driver_opts"):
            raise ComposeRefused(
                f"{where}: volumes: driver_opts is refused (it can bind any host path); use"
                " plain named volumes or ./relative bind mounts"
            )
    services: dict[str, Any] = document["services"]
    if config.app_service not in services:
        names = ", ".join(sorted(map(str, services))) or "none"
        raise ComposeRefused(
            f"{where} has no service {config.app_service!r} (app_service); it has: {names}"
        )
    if config.database == "ephemeral" and EPHEMERAL_DB_SERVICE in services:
        raise ComposeRefused(
            f"{where} has a service named {EPHEMERAL_DB_SERVICE!r}, which database: ephemeral"
            " adds itself; rename yours or use database: external"
        )
    for name, service in services.items():
        if not isinstance(name, str) or not SERVICE_PATTERN.fullmatch(name):
            raise ComposeRefused(f"{where}: {str(name)[:100]!r} is not a service name")
        if not isinstance(service, dict):
            raise ComposeRefused(f"{where}: service {name} is not a mapping")
        _check_service(name, service, config.app_dir, where)
    return document


def _check_service(name: str, service: Mapping[str, Any], app_dir: str, where: str) -> None:
    def refuse(why: str) -> ComposeRefused:
        return ComposeRefused(f"{where}: service {name}: {why}")

    if "build" in service:
        raise refuse(
            "build: is refused: previews run images CI built; give an image: instead"
            " (the app service gets the PR's image)"
        )
    if service.get("privileged") is True:
        raise refuse("privileged: true is refused: a preview container gets no host privileges")
    for key in HOST_NAMESPACES:
        if str(service.get(key, "")) == "host":
            raise refuse(f"{key}: host is refused: a preview shares no namespace with the host")
    for key in ("cap_add", "devices", "security_opt", "sysctls", "cgroup_parent"):
        if service.get(key):
            raise refuse(f"{key}: is refused: a preview container gets no host privileges")
    own = service.get("env_file") or []
    for entry in [own] if isinstance(own, (str, dict)) else own:
        path = str(entry.get("path", "")) if isinstance(entry, dict) else str(entry)
        if not _inside(path, app_dir):
            raise refuse(f"env_file {path!r} is outside the app dir {app_dir}")
    for port in service.get("ports") or []:
        ip = _host_ip(port)
        if ip != LOOPBACK:
            raise refuse(
                f"port {port!r} is published on {ip or 'every address'}: publish on 127.0.0.1"
                " only (e.g. '127.0.0.1:6379:6379'); previews are reached through SSM"
            )
    for volume in service.get("volumes") or []:
        source = _bind_source(volume)
        if source is not None and not _inside(source, app_dir):
            raise refuse(
                f"the bind mount of {source!r} is outside the app dir {app_dir}: mount"
                " ./relative paths or named volumes only"
            )


def _host_ip(port: object) -> str | None:
    """The address a port is published on (None: all of them); one not published is fine."""
    if isinstance(port, dict):
        if port.get("published") in (None, ""):
            return LOOPBACK
        return str(port.get("host_ip") or "") or None
    text = str(port)
    if text.startswith("["):  # [::1]:8000:8000
        return text[1 : text.index("]")] if "]" in text else None
    parts = text.split(":")
    # "8000" (a random host port) and "8000:8000" publish on every address.
    return parts[0] or None if len(parts) == 3 else None


def _bind_source(volume: object) -> str | None:
    """The host path of a bind mount; None for a named volume or an anonymous one."""
    if isinstance(volume, dict):
        if volume.get("type") != "bind":
            return None
        return str(volume.get("source") or "")
    source, sep, _ = str(volume).partition(":")
    if not sep:
        return None  # an anonymous volume: a path inside the container only
    return source if source.startswith(("/", ".", "~", "$")) else None


def _inside(source: str, app_dir: str) -> bool:
    if source.startswith(("~", "$")):
        return False
    path = posixpath.normpath(posixpath.join(app_dir, source))
    return path == app_dir or path.startswith(app_dir.rstrip("/") + "/")


def render_compose(document: Mapping[str, Any], config: PreviewConfig) -> str:
    """The checked file as the instance runs it: the app service on the PR's image with our
    env files (after its own), and with ``database: ephemeral`` our db service beside theirs."""
    rendered = dict(document)
    services = {name: dict(service) for name, service in document["services"].items()}
    app = services[config.app_service]
    app["image"] = "${APP_IMAGE}"
    own = app.get("env_file") or []
    own = [own] if isinstance(own, (str, dict)) else list(own)
    app["env_file"] = [*own, SECRETS_ENV_FILE, PREVIEW_ENV_FILE, "app.env"]
    if config.database == "ephemeral":
        depends = app.get("depends_on") or []
        if isinstance(depends, list):
            app["depends_on"] = [*depends, EPHEMERAL_DB_SERVICE]
        else:
            app["depends_on"] = {**depends, EPHEMERAL_DB_SERVICE: {"condition": "service_started"}}
        services[EPHEMERAL_DB_SERVICE] = {
            "image": EPHEMERAL_DB_IMAGE,
            "env_file": ["db.env"],
            "environment": {"POSTGRES_USER": "app", "POSTGRES_DB": "app"},
            "volumes": ["pgdata:/var/lib/postgresql/data"],
            "restart": "unless-stopped",
        }
        rendered["volumes"] = {**(document.get("volumes") or {}), "pgdata": {}}
    rendered["services"] = services
    return yaml.safe_dump(rendered, sort_keys=False)


def service_names(config: PreviewConfig, compose: str | None) -> tuple[str, ...]:
    """The services a preview runs: the checked file's, or the generated file's."""
    if compose is not None:
        return tuple(yaml.safe_load(compose)["services"])
    db = (EPHEMERAL_DB_SERVICE,) if config.database == "ephemeral" else ()
    return (config.app_service, *db)


def compose_for(github: GitHub, config: PreviewConfig, repo: str, sha: str) -> str:
    """Fetch ``compose_path`` at ``sha``, check it and render it for the instance."""
    assert config.compose_path is not None
    where = f"{config.compose_path}@{sha[:12]}"
    if not github.enabled:
        raise ComposeRefused(
            f"compose_path is set but no GitHub token or App is configured to fetch {where}"
        )
    text = github.get_file(repo, config.compose_path, sha)
    return render_compose(check_compose(text, config, where), config)


@step(retry=False)
def fetch_compose(github: GitHub, config: PreviewConfig, repo: str, sha: str) -> str:
    """Prefect wrapper: the repository's compose file, checked, before anything launches."""
    return compose_for(github, config, repo, sha)
