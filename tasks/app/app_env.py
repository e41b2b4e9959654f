"""The app's per-preview environment: settings from the configuration and secrets from
Parameter Store.

Two env files beside ``app.env`` (DATABASE_URL), both read by the app service:

- ``preview.env``: ``PR_NUMBER``, ``GIT_SHA``, ``PR_BRANCH`` and the configured ``env`` map with
  its placeholders filled in. Not secret: it is written by the user data and by every in-place
  deploy, so a changed setting takes effect on the next push.
- ``secrets.env``: every parameter under ``env_parameter_path``, named after its last path
  segment. The instance reads them with its own role at boot and on every push; no value
  passes through the orchestrator, the user data, an SSM command's text or its output.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass

from tasks.cloud.on_instance import COMPOSE_FILE, write_file
from tasks.config import PreviewConfig

PREVIEW_ENV_FILE = "preview.env"
DATABASE_ENV_FILE = "app.env"
SECRETS_ENV_FILE = "secrets.env"
# Git allows more in a branch name; what is outside this reaches the app as an empty PR_BRANCH.
BRANCH_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/+@-]{0,254}")

# Every parameter under the path, one by one: a name (Parameter Store names have no spaces)
# becomes a variable named after its last segment; a value goes from the CLI straight into the
# file, never onto a command line or into the output. ``fail`` is the caller's.
READ_SECRETS = """names=$(aws ssm get-parameters-by-path --region {region} --path {path} \\
  --recursive --query 'Parameters[].Name' --output text) \\
  || fail "cannot list the parameters under "{path}
secrets=$(mktemp {file}.XXXXXX)  # a new 0600 file, renamed over {file} once complete
for name in $names; do  # word splitting on purpose: names hold no whitespace
  [ "$name" = None ] && continue
  key=${{name##*/}}
  [[ $key =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || fail "parameter $name: not a variable name"
  value=$(param "$name") || fail "cannot read parameter $name"
  case $value in *$'\\n'*) fail "parameter $name holds a line break";; esac
  printf '%s=%s\\n' "$key" "$value" >> "$secrets"
done
mv -fT "$secrets" {file}
unset value secrets"""


# A per-preview database's DATABASE_URL (database: per-preview) into app.env, through a new
# file. The flow tags the parameter with this instance's ARN right after the launch or the
# claim, and only then may the instance's role read it: a first refusal is waited out.
# Needs ``param`` and ``fail`` and ``set -e`` around it.
READ_PREVIEW_DATABASE = """for _ in 1 2 3 4 5 6 7 8 9 10; do
  database_url=$(param {parameter}) && [ -n "$database_url" ] && break
  database_url=""
  sleep 3
done
[ -n "$database_url" ] || fail "cannot read this preview's DATABASE_URL ("{parameter}")"
case $database_url in *$'\\n'*) fail "this preview's DATABASE_URL holds a line break";; esac
{write}
unset database_url"""


def read_preview_database_script(app_dir: str, parameter: str) -> str:
    """Shell writing ``app.env`` from the preview's own ``DATABASE_URL`` parameter."""
    write = write_file(
        f"{app_dir}/{DATABASE_ENV_FILE}", "printf 'DATABASE_URL=%s\\n' \"$database_url\""
    )
    return READ_PREVIEW_DATABASE.format(parameter=shlex.quote(parameter), write=write)


def branch_or_empty(branch: str | None) -> str:
    return branch if branch and BRANCH_PATTERN.fullmatch(branch) else ""


def preview_env(
    settings: PreviewConfig, repo: str, pr_number: int, sha: str, branch: str | None
) -> dict[str, str]:
    """The non-secret variables of this preview: ours win over the configured ones."""
    fields = {
        "pr_number": str(pr_number),
        "sha": sha,
        "repo": repo,
        "branch": branch_or_empty(branch),
    }
    values = {name: template.format(**fields) for name, template in settings.env.items()}
    return {
        **values,
        "PR_NUMBER": fields["pr_number"],
        "GIT_SHA": sha,
        "PR_BRANCH": fields["branch"],
    }


def write_preview_env(app_dir: str, values: Mapping[str, str]) -> str:
    """Shell writing ``preview.env`` in the app dir (through a new file), every line quoted."""
    lines = " ".join(shlex.quote(f"{name}={value}") for name, value in values.items())
    # The values are literal text: a $ in one is meant as it is.
    return write_file(f"{app_dir}/{PREVIEW_ENV_FILE}", f"printf '%s\\n' {lines}", literal=True)


def read_secrets_script(settings: PreviewConfig) -> str:
    """Shell writing ``secrets.env`` in the app dir (empty without a path) through a new file;
    needs the ``param`` and ``fail`` functions of the script around it."""
    target = f"{settings.app_dir}/{SECRETS_ENV_FILE}"
    if settings.env_parameter_path is None:
        return write_file(target, ":")
    return READ_SECRETS.format(
        region=shlex.quote(settings.region),
        path=shlex.quote(settings.env_parameter_path),
        file=shlex.quote(target),
    )


@dataclass(frozen=True)
class AppFiles:
    """What an in-place deploy rewrites in the app dir besides the image: the settings and,
    with ``compose_path``, the repository's compose file at the new sha (checked)."""

    env: Mapping[str, str]
    compose: str | None = None
    # database: per-preview — the parameter of the preview's own DATABASE_URL, re-read on
    # every deploy (a claimed spare gets its database this way)
    database_parameter: str | None = None


def app_env_commands(settings: PreviewConfig, app: AppFiles) -> list[str]:
    """An in-place deploy's share, in the app dir: the compose file, the settings, then the
    secrets re-read."""
    region = shlex.quote(settings.region)
    compose = []
    if app.compose is not None:  # ${APP_IMAGE} in it is compose's to expand, from .env
        compose = [
            write_file(
                f"{settings.app_dir}/{COMPOSE_FILE}",
                f"printf '%s\\n' {shlex.quote(app.compose)}",
                literal=True,
            ),
        ]
    return [
        *compose,
        'fail() { echo "$1" >&2; exit 1; }',
        f"param() {{ aws ssm get-parameter --region {region} --with-decryption"
        ' --name "$1" --query Parameter.Value --output text; }',
        "umask 077",
        write_preview_env(settings.app_dir, app.env),
        read_secrets_script(settings),
        *(
            [read_preview_database_script(settings.app_dir, app.database_parameter)]
            if app.database_parameter
            else []
        ),
    ]
