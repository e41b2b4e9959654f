"""A preview's user data and tags (runbook §3): the bootstrap script a preview or a warm spare
boots with, rendered from tasks/templates/user_data.sh."""

from __future__ import annotations

import logging
import math
import re
import shlex
from dataclasses import dataclass
from datetime import datetime, timedelta
from importlib.resources import files

from tasks.app.app_env import (
    DATABASE_ENV_FILE,
    PREVIEW_ENV_FILE,
    SECRETS_ENV_FILE,
    preview_env,
    read_preview_database_script,
    read_secrets_script,
    write_preview_env,
)
from tasks.cloud.app_proxy import HOST_PORT_VARIABLE, proxy_install, upstream_ports
from tasks.cloud.databases import database_name
from tasks.cloud.ecr import ecr_login, ecr_repository
from tasks.cloud.on_instance import (
    STATE_DIR,
    activity_timer,
    container_run,
    timer_command,
    timer_minutes,
)
from tasks.cloud.tags import (
    TAG_NAME,
    TAG_PR,
    TAG_PURPOSE,
    TAG_REPO,
    TAG_SHA,
    TAG_SHUTDOWN_AT,
    TAG_UPDATED_AT,
    format_time,
)
from tasks.config import IMAGE_PATTERN, PreviewConfig
from tasks.inputs import check_inputs, is_repo
from tasks.run.errors import PreviewError
from tasks.run.prefect_context import run_logger

logger = logging.getLogger(__name__)


# DATABASE_URL from Parameter Store: assigned on its own line, so a failed read stops the
# bootstrap at step "secrets" instead of booting the app with an empty URL.
EXTERNAL_DATABASE_ENV = """database_url=$(param {{parameter}}) || fail "cannot read DATABASE_URL"
[ -n "$database_url" ] || fail "the DATABASE_URL parameter is empty"
printf 'DATABASE_URL=%s\\n' "$database_url" | put "$APP_DIR/app.env"
unset database_url"""


# The ephemeral database of runbook §11: a postgres service beside the app, gone with the instance.
EPHEMERAL_DATABASE_ENV = """DB_PASSWORD=$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \\n')
printf 'POSTGRES_PASSWORD=%s\\n' "$DB_PASSWORD" | put "$APP_DIR/db.env"
printf 'DATABASE_URL=postgresql+asyncpg://app:%s@db:5432/app\\n' "$DB_PASSWORD" \\
  | put "$APP_DIR/app.env"
unset DB_PASSWORD
chmod 600 "$APP_DIR/db.env\""""


# The registry login and pull (runbook §3, §4). GHCR: the token from Parameter Store, read with
# the other secrets; an image that cannot be pulled is built from the GitHub tarball of its sha.
GHCR_TOKEN_READ = """\
GHCR_TOKEN=$(param {{ghcr_token_parameter}}) || fail "cannot read the GHCR token parameter"
[ -n "$GHCR_TOKEN" ] || fail "the GHCR token parameter is empty"
"""


GHCR_LOGIN_AND_PULL = """step=ghcr-login
printf '%s\\n' "$GHCR_TOKEN" | docker login {{registry}} -u {{registry_username}} --password-stdin

step=pull
cd "$APP_DIR"
if ! compose pull {{app_service}}; then
  # The image cannot be pulled: build it from the GitHub tarball of this sha (runbook §3) and
  # point APP_IMAGE at that build.
  step=tarball-build
  mkdir -p "$APP_DIR/build"
  # The header comes on stdin (-H @-): on curl's command line ps would show the token.
  curl -fsSL -H @- {{tarball_url}} \\
    <<<"Authorization: Bearer $GHCR_TOKEN" \\
    | tar -xz --strip-components=1 -C "$APP_DIR/build"
  docker build -t {{build_ref}} "$APP_DIR/build"
  printf '%s\\n' {{build_image_line}} {{host_port_line}} | put "$APP_DIR/.env"
fi
unset GHCR_TOKEN"""


# ECR (tasks/cloud/ecr.py): the instance role logs in, so there is no token to read or forget, and
# no tarball build (it would need the GHCR token): an image that cannot be pulled fails here.
ECR_LOGIN_AND_PULL = """step=ecr-login
{{ecr_login}}

step=pull
cd "$APP_DIR"
compose pull {{app_service}}"""


# Docker's own settings on the instance: the user data sets its address pools there.
DOCKER_DAEMON_JSON = "/etc/docker/daemon.json"
PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")


# The ephemeral database's image (runbook §11).
EPHEMERAL_DB_IMAGE = "postgres:16-alpine"


@dataclass(frozen=True)
class LaunchSpec:
    repo: str
    pr_number: int
    sha: str
    requested_at: datetime | None = None  # when the event arrived: the preview's recency
    branch: str = ""  # the PR's head branch: PR_BRANCH and {branch} in the app's env
    compose: str | None = None  # the repository's compose file, checked (tasks/steps/compose.py)
    # The manifest digest the image check saw: APP_IMAGE names it, so the instance pulls what
    # was checked. None only where no check ran (a launch by hand): the tag is pulled then.
    digest: str | None = None

    @property
    def name(self) -> str:
        return f"pr-{self.pr_number}-preview"


def preview_tags(
    settings: PreviewConfig, spec: LaunchSpec, now: datetime, ttl_hours: float
) -> dict[str, str]:
    return {
        TAG_PURPOSE: settings.purpose_tag,
        TAG_REPO: spec.repo,
        TAG_PR: str(spec.pr_number),
        TAG_SHA: spec.sha,
        TAG_SHUTDOWN_AT: format_time(now + timedelta(hours=ttl_hours)),
        # To the millisecond: it orders previews requested within the same second.
        TAG_UPDATED_AT: format_time(spec.requested_at or now, precise=True),
        TAG_NAME: spec.name,
    }


def compose_file(settings: PreviewConfig) -> str:
    """The compose file of the instance; the app publishes on loopback only (runbook §1), on the
    upstream port ``.env`` names, behind the app port's proxy (tasks/cloud/app_proxy.py)."""
    port = settings.app_port
    service = [
        "services:",
        f"  {settings.app_service}:",
        "    image: ${APP_IMAGE}",
        # Later files win: our DATABASE_URL and PR_* over the secrets and settings.
        f"    env_file: [{SECRETS_ENV_FILE}, {PREVIEW_ENV_FILE}, app.env]",
        f'    ports: ["127.0.0.1:${{{HOST_PORT_VARIABLE}}}:{port}"]',
        "    restart: unless-stopped",
    ]
    if settings.database == "ephemeral":
        service += ["    depends_on: [db]"]
        service += [
            "  db:",
            f"    image: {EPHEMERAL_DB_IMAGE}",
            "    env_file: [db.env]",
            "    environment: {POSTGRES_USER: app, POSTGRES_DB: app}",
            "    volumes: [pgdata:/var/lib/postgresql/data]",
            "    restart: unless-stopped",
            "volumes:",
            "  pgdata: {}",
        ]
    return "\n".join(service)


# Issue 15 F2: the migrations run once on boot, after `up`, while the SSM agent registers; the
# marker is a copy of the .env they migrated (tasks/steps/wait_ready.py compares it). A failure does
# not fail the bootstrap: the flow's migrate step runs them again, with its retries, and its
# failure is diagnosed as any migration's. The output stays out of the cloud-init log, which
# the diagnosis reads: a transient refusal here must not read as the cause of a later failure.
MIGRATE_ON_BOOT = """
step=migrate
if timeout {{timeout}} {{run}} > "$STATE_DIR/migrate-on-boot.log" 2>&1; then
  cat "$APP_DIR/.env" > "$STATE_DIR/migrated"
  echo "pr-preview: migrated on boot"
else
  echo "pr-preview: the migrations on boot exited $?: the flow's migrate step runs them"
fi
"""


def migrate_on_boot(settings: PreviewConfig) -> str:
    """The user data's migrations on boot, or nothing where one attempt right after ``up``
    could not reach the database: with ``db_sg_open_public_ip`` db-sg admits the instance only
    once the flow opened it, and an ephemeral database is itself still starting then."""
    if settings.db_sg_open_public_ip or settings.database == "ephemeral":
        return ""
    values = {
        "timeout": str(max(1, math.ceil(settings.migrate_timeout_seconds))),
        "run": container_run(settings.app_dir, settings.app_service, settings.migration_command),
    }
    return PLACEHOLDER.sub(lambda match: values[match.group(1)], MIGRATE_ON_BOOT)


SPARE_STOP = """
# A warm spare stops here, bootstrapped and serving nothing: the PR that claims it logs in,
# pulls and starts its image the way a push deploys in place.
{{base_layers}}touch "$STATE_DIR/bootstrap-done"
echo "pr-preview spare ready"
exit 0"""


BASE_LAYERS = """step=base-layers
# The served image's base layers (spare_base_tag): a claim then pulls only its PR's own layers.
# Best effort: a spare without them is still a spare.
if {{login}} && docker pull {{base_ref}}; then
  echo "base layers of" {{base_ref}} "pulled"
else
  echo "base layers of" {{base_ref}} "not pulled: a claim pulls the whole image" >&2
fi
unset GHCR_TOKEN
"""


def spare_base_layers(settings: PreviewConfig) -> str:
    """The spare's step pulling ``image:spare_base_tag``: of the configured image, else of the
    one served repository named exactly; empty without a tag or a single image to name."""
    if not settings.spare_base_tag:
        return ""
    named = [repo for repo in settings.allowed_repos if is_repo(repo)]
    repo = "" if settings.image else named[0] if len(named) == 1 else None
    if repo is None or not IMAGE_PATTERN.fullmatch(image := settings.image_for(repo)):
        run_logger(logger).warning(
            "spare_base_tag %s: no single image to pull (image unset, allowed_repos %s);"
            " spares hold no base layers and a claim pulls the whole image — set `image`, or"
            " name one repository in allowed_repos",
            settings.spare_base_tag,
            ", ".join(settings.allowed_repos) or "empty",
        )
        return ""
    q = shlex.quote
    ecr = ecr_repository(settings, repo)
    registry = q(image.split("/", 1)[0])
    ghcr_login = (
        f"printf '%s\\n' \"$GHCR_TOKEN\" | docker login {registry}"
        f" -u {q(settings.registry_username(repo))} \\\n    --password-stdin"
    )
    values = {
        "base_ref": q(f"{image}:{settings.spare_base_tag}"),
        "login": ecr_login(ecr) if ecr else ghcr_login,
    }
    return PLACEHOLDER.sub(lambda match: values[match.group(1)], BASE_LAYERS)


USER_DATA_LIMIT = 16_384  # EC2's cap on user data, counted before its base64 encoding


class UserDataTooLarge(PreviewError):
    """The bootstrap script would not fit in EC2's user data: refused before RunInstances,
    which would refuse it with a message naming no cause."""


def render_user_data(settings: PreviewConfig, spec: LaunchSpec) -> str:
    """The bootstrap script of runbook §3 for this preview; it holds names, never secrets.

    Every value is shell-quoted where it is used (the config is validated at load as well),
    and placeholders are filled in one pass, so a value never introduces another placeholder.
    """
    check_inputs(spec.repo, spec.pr_number, spec.sha)
    image = settings.image_for(spec.repo)
    built = f"{image}:{spec.sha}"
    pulled = (
        built if spec.digest is None else settings.pinned_image(spec.repo, spec.sha, spec.digest)
    )
    q = shlex.quote
    return _render(
        settings,
        # A comment line: check_inputs above admits no character that could end it.
        what=f"{spec.repo}#{spec.pr_number} at {spec.sha}",
        app_image_line=q(f"APP_IMAGE={pulled}"),
        build_ref=q(built),
        build_image_line=q(f"APP_IMAGE={built}"),
        tarball_url=q(f"https://api.github.com/repos/{spec.repo}/tarball/{spec.sha}"),
        registry=q(image.split("/", 1)[0]),
        registry_username=q(settings.registry_username(spec.repo)),
        spare_stop="",
        preview_env=write_preview_env(
            settings.app_dir,
            preview_env(settings, spec.repo, spec.pr_number, spec.sha, spec.branch),
        ),
        compose_file=q(spec.compose or compose_file(settings)),
        migrate_on_boot=migrate_on_boot(settings),
        database_env=database_env(settings, spec),
    )


def render_spare_user_data(settings: PreviewConfig) -> str:
    """The same bootstrap up to the app, for a warm spare: no repository, no image, no login.
    The script ends where the spare stops."""
    q = shlex.quote
    stop = SPARE_STOP.replace("{{base_layers}}", spare_base_layers(settings))
    script = _render(
        settings,
        what="warm spare",
        app_image_line=q("APP_IMAGE="),
        build_ref="",
        build_image_line="",
        tarball_url="",
        registry="",
        registry_username="",
        spare_stop=stop,
        # The PR that claims the spare writes it.
        preview_env=f': | put "$APP_DIR/{PREVIEW_ENV_FILE}"',
        migrate_on_boot="",  # past the spare's stop: its PR's deploy migrates
        database_env=database_env(settings, None),
    )
    return script[: script.index(stop) + len(stop)] + "\n"


def database_env(settings: PreviewConfig, spec: LaunchSpec | None) -> str:
    """The user data's share of DATABASE_URL: the shared parameter, the preview's own (a
    spare's is written by the deploy of the PR that claims it), or the ephemeral database."""
    if settings.database == "external":
        return EXTERNAL_DATABASE_ENV.replace(
            "{{parameter}}", shlex.quote(settings.database_url_parameter)
        )
    if settings.database == "per-preview":
        if spec is None:
            return f': | put "$APP_DIR/{DATABASE_ENV_FILE}"'
        parameter = settings.database_parameter(database_name(spec.repo, spec.pr_number))
        return read_preview_database_script(settings.app_dir, parameter)
    return EPHEMERAL_DATABASE_ENV


def _render(settings: PreviewConfig, **values: str) -> str:
    q = shlex.quote
    values.update(
        state_dir=q(STATE_DIR),
        app_dir=q(settings.app_dir),
        app_service=q(settings.app_service),
        shutdown_timer=timer_command(
            timer_minutes(
                settings.spare_ttl_hours if values["spare_stop"] else settings.failure_ttl_hours
            )
        ),
        compose_url=q(
            f"{settings.compose_release_url}/{settings.compose_version}/docker-compose-linux-"
        ),
        activity_timer=activity_timer(settings.app_port),
        app_proxy=proxy_install(settings.app_port),
        host_port_line=q(f"{HOST_PORT_VARIABLE}={upstream_ports(settings.app_port)[0]}"),
        region=q(settings.region),
        container_address_pool=q(settings.container_address_pool),
        docker_daemon_json=q(DOCKER_DAEMON_JSON),
        ghcr_token_parameter=q(settings.ghcr_token_parameter),
        read_secrets=read_secrets_script(settings),
    )
    values.setdefault("compose_file", q(compose_file(settings)))
    ecr = ecr_repository(settings)
    values["ecr_login"] = ecr_login(ecr) if ecr else ""
    template = files("tasks").joinpath("templates/user_data.sh").read_text()
    # The registry's fixed text first, then every value in one pass.
    template = template.replace("{{registry_token}}", "" if ecr else GHCR_TOKEN_READ)
    template = template.replace(
        "{{login_and_pull}}", ECR_LOGIN_AND_PULL if ecr else GHCR_LOGIN_AND_PULL
    )
    script = PLACEHOLDER.sub(lambda match: values[match.group(1)], template)
    size = len(script.encode())
    if size > USER_DATA_LIMIT:
        raise UserDataTooLarge(
            f"the bootstrap script is {size} bytes, over the {USER_DATA_LIMIT} EC2 accepts as"
            " user data; what makes it grow is yours to shorten: the compose file"
            " (compose_path) and the app's `env`"
        )
    return script
