"""A preview's own database on the database host (``database: per-preview``).

- **Names.** Database and role are both ``pr_<owner>_<repo>_<hash>_<n>``: lower case, every
  character outside ``[a-z0-9]`` made ``_``, cut to fit PostgreSQL's 63 bytes; eight hex digits
  of the repository's SHA-256 keep apart what that mapping would join (``a-b/c`` and ``a/b-c``,
  ``my-app`` and ``my_app``), so two pull requests never share a name.
- **The admin work** runs on the database host over SSM Run Command as its ``postgres`` user
  (``sudo -u postgres psql``: peer authentication, no admin password exists anywhere). Every
  name and value reaches SQL as a psql variable (``-v``, shell-quoted), quoted by psql itself
  — ``:"name"`` an identifier, ``:'value'`` a literal — and never spliced into SQL text.
- **The password** never reaches the host: it gets the SCRAM-SHA-256 verifier, which PostgreSQL
  stores as it is. The password itself lives only in the preview's SecureString (its
  ``DATABASE_URL``) and the orchestrator's memory.
- **Isolation.** The role may log in and owns its database; ``CONNECT`` and ``TEMPORARY`` on
  the database are revoked from ``PUBLIC`` and granted to that role alone, so another
  preview's role is refused at the door.
- **A clone** (``template_database``) waits a bounded time for the template's last connection
  to close, copies it with ``STRATEGY FILE_COPY`` and hands every schema, table, view and
  sequence to the preview's role, so its migrations can change them.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import shlex
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import quote, unquote, urlsplit

from tasks.config import PG_IDENTIFIER_PATTERN, PreviewConfig
from tasks.run.errors import PreviewError

if TYPE_CHECKING:
    from mypy_boto3_ec2 import EC2Client

DATABASE_PREFIX = "pr_"
MAX_IDENTIFIER = 63  # PostgreSQL's NAMEDATALEN - 1
SCRAM_ITERATIONS = 4096
PASSWORD_BYTES = 32
# What the admin script prints about the database it made sure of, one line.
RESULT_LINE = re.compile(
    r"^pr-preview-database: (?P<state>created|kept) (?P<source>template|empty) (?P<size>\d+)$",
    re.MULTILINE,
)
LISTED_LINE = re.compile(r"^(?P<name>pr_[a-z0-9_]{1,60})\|(?P<size>\d+)$", re.MULTILINE)

# Exit codes of the admin script, each a named failure.
NO_TEMPLATE = 64
TEMPLATE_BUSY = 65
CREATE_REFUSED = 66
ROLE_REFUSED = 67
NO_POSTGRES = 68


class DatabaseFailed(PreviewError):
    """The preview's database could not be made ready; nothing was launched."""


class DatabaseHostUnreachable(DatabaseFailed):
    """The database host does not answer SSM Run Command."""


class TemplateMissing(DatabaseFailed):
    """``template_database`` does not exist on the database host."""


class TemplateBusy(DatabaseFailed):
    """A connection to the template stayed open past ``template_wait_seconds``."""


class DropFailed(PreviewError):
    """A preview's database or role could not be dropped; the sweeper tries again."""


def database_name(repo: str, pr_number: int) -> str:
    """``pr_<owner>_<repo>_<n>``, unique per pull request and at most 63 bytes."""
    owner, _, name = repo.lower().partition("/")
    digest = hashlib.sha256(repo.lower().encode()).hexdigest()[:8]
    tail = f"_{digest}_{pr_number}"
    head = re.sub(r"[^a-z0-9]", "_", f"{DATABASE_PREFIX}{owner}_{name}")
    return head[: MAX_IDENTIFIER - len(tail)].rstrip("_") + tail


def new_password() -> str:
    return secrets.token_urlsafe(PASSWORD_BYTES)


def scram_verifier(password: str, *, salt: bytes | None = None) -> str:
    """What PostgreSQL stores for ``password`` under SCRAM-SHA-256 (RFC 7677, PostgreSQL's
    ``SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>``). Given to ``CREATE ROLE
    … PASSWORD``, it is stored as it is: the password never leaves the orchestrator."""
    salt = salt if salt is not None else secrets.token_bytes(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, SCRAM_ITERATIONS)
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", "sha256").digest()

    def b64(raw: bytes) -> str:
        return base64.b64encode(raw).decode()

    return f"SCRAM-SHA-256${SCRAM_ITERATIONS}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


def database_url(settings: PreviewConfig, host: str, name: str, password: str) -> str:
    """The preview's ``DATABASE_URL``: its role (named as the database), the password
    percent-encoded, the host previews reach."""
    user = f"{quote(name, safe='')}:{quote(password, safe='')}"
    return f"{settings.database_url_scheme}://{user}@{host}:{settings.db_port}/{name}"


def password_of(url: str, name: str) -> str | None:
    """The password of a stored ``DATABASE_URL`` when it is for ``name``'s role and database;
    None when the value is anything else (then a new password replaces it)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    if parts.username != name or parts.path != f"/{name}" or not parts.password:
        return None
    return unquote(parts.password)


@dataclass(frozen=True)
class PreviewDatabase:
    """The database of one pull request, as the admin script left it."""

    name: str
    parameter: str
    created: bool  # False: it was there already (a push, a relaunch) and is kept
    from_template: bool
    size_bytes: int

    @property
    def role(self) -> str:
        return self.name

    def size(self) -> str:
        return human_size(self.size_bytes)


def human_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def db_host_address(ec2: EC2Client, settings: PreviewConfig) -> str:
    """Where previews reach the database: ``db_host``, else the host's private IP."""
    if settings.db_host:
        return settings.db_host
    assert settings.db_instance_id is not None
    found = ec2.describe_instances(InstanceIds=[settings.db_instance_id])
    for reservation in found["Reservations"]:
        for instance in reservation["Instances"]:
            address = instance.get("PrivateIpAddress")
            if address:
                return address
    raise DatabaseHostUnreachable(
        f"the database host {settings.db_instance_id} has no private IP address: set db_host"
    )


# --- the admin scripts ----------------------------------------------------------------------
# Each is bash run by the SSM agent (as root) on the database host; psql reads the SQL from a
# quoted heredoc, so bash expands nothing in it.

_PSQL = 'psql_admin() { sudo -u postgres psql -X -qAt -v ON_ERROR_STOP=1 "$@"; }'
_PREAMBLE = [
    "set -uo pipefail",
    _PSQL,
    "command -v psql >/dev/null"
    f" || {{ echo 'no psql on the database host' >&2; exit {NO_POSTGRES}; }}",
]

_ROLE_SQL = """SELECT NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'role') AS new_role \\gset
\\if :new_role
CREATE ROLE :"role" LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION PASSWORD :'verifier';
\\else
ALTER ROLE :"role" LOGIN PASSWORD :'verifier';
\\endif"""

_EXISTS_SQL = "SELECT count(*) FROM pg_database WHERE datname = :'db';"
_TEMPLATE_SQL = "SELECT count(*) FROM pg_database WHERE datname = :'template';"
_TEMPLATE_BUSY_SQL = (
    "SELECT count(*) FROM pg_stat_activity WHERE datname = :'template' AND pid <> pg_backend_pid();"
)
_CREATE_EMPTY_SQL = 'CREATE DATABASE :"db" OWNER :"role";'
# The template is no preview's to open (PostgreSQL grants CONNECT to PUBLIC by default).
_CREATE_CLONE_SQL = """REVOKE CONNECT, TEMPORARY ON DATABASE :"template" FROM PUBLIC;
CREATE DATABASE :"db" OWNER :"role" TEMPLATE :"template" STRATEGY FILE_COPY;"""
# In the clone: what the template's owner owned is the preview role's (sequences that belong
# to a column follow their table).
_HAND_OVER_SQL = """SELECT format('ALTER SCHEMA %I OWNER TO %I', nspname, :'role') FROM pg_namespace
 WHERE nspname NOT LIKE 'pg\\_%' AND nspname <> 'information_schema' \\gexec
SELECT format('ALTER %s %I.%I OWNER TO %I',
  CASE c.relkind WHEN 'S' THEN 'SEQUENCE' WHEN 'v' THEN 'VIEW'
    WHEN 'm' THEN 'MATERIALIZED VIEW' WHEN 'f' THEN 'FOREIGN TABLE' ELSE 'TABLE' END,
  n.nspname, c.relname, :'role')
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f')
  AND n.nspname NOT LIKE 'pg\\_%' AND n.nspname <> 'information_schema'
  AND NOT (c.relkind = 'S' AND EXISTS (
    SELECT FROM pg_depend d WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid
      AND d.deptype IN ('a', 'i')))
\\gexec"""
_GRANT_SQL = """REVOKE ALL ON DATABASE :"db" FROM PUBLIC;
GRANT CONNECT, TEMPORARY ON DATABASE :"db" TO :"role";
SELECT pg_database_size(:'db');"""

_DROP_SQL = """DROP DATABASE IF EXISTS :"db" WITH (FORCE);
DROP ROLE IF EXISTS :"role";"""

_LIST_SQL = """SELECT datname || '|' || pg_database_size(datname) FROM pg_database
 WHERE datname LIKE 'pr\\_%' AND NOT datistemplate AND datname IS DISTINCT FROM :'template'
 ORDER BY datname;"""


def _psql(
    sql: str, variables: dict[str, str], *, then: str = "", database: str | None = None
) -> str:
    """One psql call on the host: ``variables`` as ``-v`` (shell-quoted), ``sql`` on stdin
    (a quoted heredoc); ``then`` follows the call on its line (``|| exit 66``)."""
    options = " ".join(f"-v {shlex.quote(f'{name}={value}')}" for name, value in variables.items())
    target = f" -d {shlex.quote(database)}" if database else ""
    return f"psql_admin {options}{target} <<'PR_PREVIEW_SQL' {then}\n{sql}\nPR_PREVIEW_SQL"


def _capture(variable: str, sql: str, variables: dict[str, str], *, then: str = "") -> str:
    """``variable=$(psql …)`` with the heredoc inside the substitution."""
    return f"{variable}=$({_psql(sql, variables)}\n){then}"


def ensure_commands(
    name: str, verifier: str, template: str | None, wait_seconds: float
) -> list[str]:
    """Bash making sure ``name`` (database and role) exists with ``verifier`` as the role's
    password: created from ``template`` or empty when missing, kept when there. Prints one
    :data:`RESULT_LINE`; exits with one of the codes above on a named failure."""
    names = {"db": name, "role": name}
    role = {"role": name, "verifier": verifier}
    template_vars = {"template": template or ""}
    refused = f"|| exit {CREATE_REFUSED}"
    lines = [
        *_PREAMBLE,
        _capture("exists", _EXISTS_SQL, names, then=f" {refused}"),
        'if [ "$exists" = 1 ]; then state=kept; else state=created; fi',
    ]
    if template:  # before anything is created: a missing template leaves nothing behind
        lines += [
            "source_kind=template",
            'if [ "$state" = created ]; then',
            _capture("found", _TEMPLATE_SQL, template_vars, then=f" {refused}"),
            f"[ \"$found\" = 1 ] || {{ echo 'the template database does not exist' >&2;"
            f" exit {NO_TEMPLATE}; }}",
            "fi",
        ]
    else:
        lines.append("source_kind=empty")
    lines.append(_psql(_ROLE_SQL, role, then=f"|| exit {ROLE_REFUSED}"))
    if template:
        wait = max(int(wait_seconds), 0)
        lines += [
            'if [ "$state" = created ]; then',
            f"deadline=$((SECONDS + {wait}))",
            "while true; do",
            _capture("busy", _TEMPLATE_BUSY_SQL, template_vars, then=f" {refused}"),
            '[ "$busy" = 0 ] && break',
            'if [ "$SECONDS" -ge "$deadline" ]; then',
            f'  echo "the template has $busy open connection(s)" >&2; exit {TEMPLATE_BUSY}',
            "fi",
            "sleep 1",
            "done",
            _psql(_CREATE_CLONE_SQL, {**names, **template_vars}, then=refused),
            _psql(_HAND_OVER_SQL, role, then=f">/dev/null {refused}", database=name),
            "fi",
        ]
    else:
        lines += [
            'if [ "$state" = created ]; then',
            _psql(_CREATE_EMPTY_SQL, names, then=refused),
            "fi",
        ]
    lines += [
        _capture("size", _GRANT_SQL, names, then=f" {refused}"),
        'echo "pr-preview-database: $state $source_kind $size"',
    ]
    return lines


def drop_commands(name: str) -> list[str]:
    """Bash dropping database and role ``name`` (its connections cut first), if they exist."""
    return [
        *_PREAMBLE,
        _psql(_DROP_SQL, {"db": name, "role": name}, then="|| exit 1"),
        "echo dropped",
    ]


def list_commands(template: str | None) -> list[str]:
    """Bash listing every preview database with its size: ``name|bytes`` lines."""
    return [*_PREAMBLE, _psql(_LIST_SQL, {"template": template or ""})]


def template_check_commands(template: str) -> list[str]:
    """Bash exiting 0 when ``template`` exists, :data:`NO_TEMPLATE` otherwise."""
    return [
        *_PREAMBLE,
        _capture("found", _TEMPLATE_SQL, {"template": template}, then=f" || exit {CREATE_REFUSED}"),
        f'[ "$found" = 1 ] || exit {NO_TEMPLATE}',
        "echo template-present",
    ]


# A new template, built beside the old one and swapped in: from a source database on the host
# (pg_dump, so the source may stay in use) or from a custom-format dump file on the host. The
# template takes no connections: a clone never waits for one, and no preview role opens it.
_SWAP_SQL = """SELECT EXISTS (SELECT FROM pg_database WHERE datname = :'template') AS had \\gset
\\if :had
ALTER DATABASE :"template" WITH ALLOW_CONNECTIONS false;
DROP DATABASE :"template" WITH (FORCE);
\\endif
ALTER DATABASE :"next" RENAME TO :"template";
ALTER DATABASE :"template" WITH ALLOW_CONNECTIONS false;
REVOKE ALL ON DATABASE :"template" FROM PUBLIC;
SELECT pg_database_size(:'template');"""
_NEXT_SQL = """DROP DATABASE IF EXISTS :"next" WITH (FORCE);
CREATE DATABASE :"next";"""
DUMP_PATH_PATTERN = re.compile(r"(?:/[A-Za-z0-9_.-]+)+")


def refresh_template_commands(
    template: str, *, source_database: str | None = None, dump_file: str | None = None
) -> list[str]:
    """Bash rebuilding ``template`` from ``source_database`` or ``dump_file`` (a path on the
    host, custom format) into ``<template>_next``, then swapping it in; prints the new size."""
    if (source_database is None) == (dump_file is None):
        raise ValueError("give exactly one of source_database and dump_file")
    # A name, never a connection string: pg_dump -d reads "host=… dbname=…" as one.
    for name in (template, source_database):
        if name is not None and not PG_IDENTIFIER_PATTERN.fullmatch(name):
            raise ValueError(f"{name[:100]!r} is not a PostgreSQL name (lower case, digits, _)")
    if dump_file is not None and (
        not DUMP_PATH_PATTERN.fullmatch(dump_file) or "/../" in f"{dump_file}/"
    ):
        raise ValueError(f"{dump_file[:100]!r} is not an absolute path of plain segments")
    following = f"{template}_next"[:MAX_IDENTIFIER]
    names = {"next": following, "template": template}
    q = shlex.quote
    if source_database is not None:
        load = (
            f"sudo -u postgres pg_dump -Fc --no-owner --no-acl -d {q(source_database)}"
            f" | sudo -u postgres pg_restore --no-owner --no-acl -d {q(following)}"
        )
    else:
        load = (
            f"sudo -u postgres pg_restore --no-owner --no-acl -d {q(following)}"
            f" {q(dump_file or '')}"
        )
    return [
        *_PREAMBLE,
        _psql(_NEXT_SQL, {"next": following}, then=f"|| exit {CREATE_REFUSED}"),
        f"{load} || {{ echo 'loading the template failed' >&2; exit {CREATE_REFUSED}; }}",
        _capture("size", _SWAP_SQL, names, then=f" || exit {CREATE_REFUSED}"),
        'echo "pr-preview-template: $size"',
    ]


def parse_listing(stdout: str) -> dict[str, int]:
    return {found["name"]: int(found["size"]) for found in LISTED_LINE.finditer(stdout)}


def instance_arn(ec2: EC2Client, region: str, instance_id: str) -> str:
    """``arn:aws:ec2:<region>:<account>:instance/<id>``, what IAM's ``ec2:SourceInstanceARN``
    holds for a request signed with that instance's role."""
    found = ec2.describe_instances(InstanceIds=[instance_id])
    owner = found["Reservations"][0]["OwnerId"]
    return f"arn:aws:ec2:{region}:{owner}:instance/{instance_id}"


def unexpected(stderr: str, limit: int = 400) -> str:
    """The last lines of psql's complaint, for a diagnosis (it holds names, not secrets)."""
    text = stderr.strip()
    return text[-limit:] if text else "(no output)"
