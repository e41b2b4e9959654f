"""The shell the instance runs as root: the user data and every SSM script the steps send.

shellcheck reads all of them (``-o check-extra-masked-returns``: a failure hidden inside another
command is how an empty DATABASE_URL once booted), ``bash -n`` parses the user data, and the
scripts run here against stub commands — docker, aws, curl, shutdown, ... — in a PATH that holds
nothing else, to show that configuration and data reach commands as arguments, never as code.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import tasks.app.user_data
from tasks.app.app_env import AppFiles, app_env_commands, preview_env
from tasks.app.user_data import LaunchSpec, compose_file, render_spare_user_data, render_user_data
from tasks.cloud import app_proxy, on_instance
from tasks.cloud.on_instance import BOOTSTRAP_CHECK, app_state_check, port_check, probe_command
from tasks.config import PreviewConfig
from tasks.steps.bake import BAKE_CHECK, bake_image_ref, render_bake_user_data
from tasks.steps.diagnose import evidence_sections
from tasks.steps.migrate import migrate_commands, seed_commands
from tasks.steps.spares import spare_check
from tasks.steps.update import deploy_commands, health_commands, ttl_commands
from tasks.steps.wait_ready import ready_command

SPEC = LaunchSpec("octo-org/app", 42, "1a2b3c4d5e6f7a8b9c0d1a2b3c4d5e6f7a8b9c0d")
TOKEN = "ghp_SandboxToken0123456789abcdefABCDEF"
DATABASE_URL = "postgresql+asyncpg://app:pw@10.0.0.5:5432/app"
SHELLCHECK = Path(sys.executable).parent / "shellcheck"
# SC2312 (check-extra-masked-returns) is an info-level finding: -S warning would drop it.
SHELLCHECK_ARGS = ("-S", "info", "-o", "check-extra-masked-returns", "-f", "gcc")

# The real tools the scripts may use; everything else in the sandbox is a stub.
REAL_TOOLS = ("bash", "cat", "chmod", "head", "mkdir", "od", "rm", "sed", "seq", "timeout")
REAL_TOOLS += ("find", "mktemp", "mv", "sort", "tail", "touch", "tr", "uname")
REAL_TOOLS += ("cmp", "dirname", "flock")
HOST_PORT = "APP_HOST_PORT=18000\n"  # the first upstream port (tasks/cloud/app_proxy.py)
STUB_LOG = 'printf "%s\\n" "${0##*/} $*" >> "$SANDBOX/calls"\n'
STUBS = {
    "shutdown": STUB_LOG,
    "systemctl": STUB_LOG,
    "usermod": STUB_LOG,
    "dnf": STUB_LOG,
    "sleep": STUB_LOG,
    "cloud-init": STUB_LOG + "echo 'status: running'\n",
    # aws ssm get-parameter ... --name NAME: the file $SANDBOX/params/NAME, or ParameterNotFound
    # get-parameters-by-path --path PATH: the files under $SANDBOX/params/PATH, tab-separated
    "aws": STUB_LOG
    + 'if [ "$2" = get-parameters-by-path ]; then\n'
    + '  while [ $# -gt 0 ]; do [ "$1" = --path ] && path=$2; shift; done\n'
    + '  cd "$SANDBOX/params" && find ".$path" -type f | sort | sed "s/^[.]//" | tr "\\n" "\\t"\n'
    + "  echo; exit 0\n"
    + "fi\n"
    + 'while [ $# -gt 0 ]; do [ "$1" = --name ] && name=$2; shift; done\n'
    + 'if [ -f "$SANDBOX/params$name" ]; then cat "$SANDBOX/params$name"; exit 0; fi\n'
    + 'echo "An error occurred (ParameterNotFound) when calling GetParameter" >&2; exit 254\n',
    # docker compose's options (--project-directory, -f, --env-file) come before its command.
    "docker": STUB_LOG
    + 'case "$1 ${2:-}" in\n'
    + '  "login "*) cat > "$SANDBOX/login-stdin" ;;\n'
    + '  "compose "*) case " $* " in\n'
    + '    *" pull "*) exit "${PULL_EXIT:-0}" ;;\n'
    + '    *" run --rm "*) exit "${RUN_EXIT:-0}" ;;\n'
    + "    *) ;;\n"
    + "  esac ;;\n"
    + '  "build "*) exit "${BUILD_EXIT:-0}" ;;\n'
    + "esac\n",
    "curl": STUB_LOG + 'cat > "$SANDBOX/curl-stdin"\n',
    "tar": STUB_LOG + "cat > /dev/null\n",
}


class Sandbox:
    """A directory, a PATH of real tools and stubs, and what the stubs were called with."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.bin = root / "bin"
        self.bin.mkdir()
        for tool in REAL_TOOLS:
            found = shutil.which(tool)
            assert found, f"{tool} is needed to run the scripts"
            (self.bin / tool).symlink_to(found)
        # This interpreter, not a version manager's shim that needs a PATH of its own.
        (self.bin / "python3").symlink_to(sys.executable)
        for name, body in STUBS.items():
            stub = self.bin / name
            stub.write_text("#!/bin/bash\n" + body)
            stub.chmod(0o755)
        self.params(ghcr_token=TOKEN, database_url=DATABASE_URL)

    def params(self, *, ghcr_token: str | None, database_url: str | None) -> None:
        folder = self.root / "params" / "pr-preview"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for name, value in (("ghcr-token", ghcr_token), ("database-url", database_url)):
            if value is not None:
                (folder / name).write_text(value + "\n")

    def run(self, script: str, **env: str) -> subprocess.CompletedProcess[str]:
        path = self.root / "script.sh"
        path.write_text(script)
        return subprocess.run(
            [str(self.bin / "bash"), str(path)],
            cwd=self.root,
            env={"PATH": str(self.bin), "SANDBOX": str(self.root), "HOME": str(self.root), **env},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    @property
    def calls(self) -> str:
        log = self.root / "calls"
        return log.read_text() if log.exists() else ""

    def read(self, name: str) -> str:
        path = self.root / name
        return path.read_text() if path.exists() else ""


def compose_call(app: Path) -> str:
    """``docker compose`` as the scripts call it: every path of the project explicit."""
    return (
        f"docker compose --project-directory {app} -f {app}/docker-compose.yml"
        f" --env-file {app}/.env"
    )


@pytest.fixture
def sandbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Sandbox:
    monkeypatch.setattr(tasks.app.user_data, "STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setattr(
        tasks.app.user_data, "DOCKER_DAEMON_JSON", str(tmp_path / "docker" / "daemon.json")
    )
    # The activity timer's files (tasks/cloud/on_instance.py) go below the sandbox too.
    monkeypatch.setattr(on_instance, "ACTIVITY_SCRIPT", str(tmp_path / "lib" / "sample-activity"))
    monkeypatch.setattr(on_instance, "SYSTEM_UNITS", str(tmp_path / "units"))
    # And the app port's proxy (tasks/cloud/app_proxy.py).
    monkeypatch.setattr(app_proxy, "UPSTREAM_FILE", str(tmp_path / "state" / "upstream"))
    monkeypatch.setattr(app_proxy, "PROXY_SCRIPT", str(tmp_path / "lib" / "app-proxy"))
    monkeypatch.setattr(app_proxy, "SYSTEM_UNITS", str(tmp_path / "units"))
    return Sandbox(tmp_path)


def sandbox_config(sandbox: Sandbox, **values: object) -> PreviewConfig:
    return PreviewConfig.model_validate(
        {"image": "ghcr.io/octo-org/app", "app_dir": str(sandbox.root / "app"), **values}
    )


# --- every script, through shellcheck and bash -n --------------------------------------------


def configs() -> Iterator[tuple[str, PreviewConfig]]:
    for database in ("external", "ephemeral"):
        yield database, PreviewConfig(database=database, image="ghcr.io/octo-org/app")
    # Valid but not plain: values that need quoting where they are used.
    yield (
        "quoted",
        PreviewConfig(
            image="127.0.0.1:5000/octo-org/app",
            app_service="web.app_1",
            migration_command="sh -c 'alembic upgrade head && python -m app.seed'",
            probe_paths=["/health%20check", "/docs"],
            ghcr_username="octo-bot",
            env={"APP_URL": "https://pr-{pr_number}.example/{branch}?a='b'&c=$HOME"},
            env_parameter_path="/pr-preview/env",
            seed_command="python -m app.seed --users 'a b'",
            spare_base_tag="main",
        ),
    )


def ssm_scripts(config: PreviewConfig) -> dict[str, list[str]]:
    """Every script the steps send over SSM, by step and name."""
    scripts = {
        "bake-check": list(BAKE_CHECK),
        "wait-ready": ready_command(config),
        "wait-ready-probing": ready_command(config, 60 * 24),
        "bootstrap-check": list(BOOTSTRAP_CHECK),
        "app-port": port_check(config.app_port),
        "app-state": app_state_check(config.app_dir, config.app_service),
        "migrate": migrate_commands(config),
        **({"seed": seed_commands(config)} if config.seed_command else {}),
        "update-health": health_commands(config),
        "update-deploy": deploy_commands(
            config,
            SPEC.repo,
            f"{config.image_for(SPEC.repo)}:1a2b",
            AppFiles(
                preview_env(config, SPEC.repo, SPEC.pr_number, SPEC.sha, "feature/x"),
                compose_file(config),
            ),
        ),
        "confirm-ttl": ttl_commands(config),
        "activity-read": on_instance.activity_read(config.app_port),
        "spare-check": spare_check(30),
    }
    for index, path in enumerate(config.probe_paths):
        scripts[f"probe-{index}"] = probe_command(config.app_port, path)
        scripts[f"probe-ready-{index}"] = probe_command(config.app_port, path, 60 * 24)
    for section in evidence_sections(config):
        scripts[f"diagnose-{section.name}"] = list(section.commands)
    return scripts


def activity_sampler(user_data: str) -> str:
    """The sampler script the user data writes, read back from its ``printf``."""
    line = next(
        line
        for line in user_data.split("\nprintf '%s\\n' ")
        if line.startswith("'#!/bin/bash\n# pr-preview: is anyone")
    )
    [script] = shlex.split(line.split(" | put ")[0])
    return script


def all_scripts() -> dict[str, str]:
    found: dict[str, str] = {}
    for label, config in configs():
        found[f"user-data-{label}.sh"] = render_user_data(config, SPEC)
        found[f"user-data-spare-{label}.sh"] = render_spare_user_data(config)
        image_ref = bake_image_ref(config, None, "latest")
        found[f"bake-user-data-{label}.sh"] = render_bake_user_data(config, image_ref, 1.0)
        for name, commands in ssm_scripts(config).items():
            found[f"{name}-{label}.sh"] = "\n".join(commands) + "\n"
        # The activity sampler the user data installs, as its own file.
        found[f"sample-activity-{label}.sh"] = activity_sampler(render_user_data(config, SPEC))
    return {
        name: text if text.startswith("#!") else "#!/bin/bash\n" + text
        for name, text in found.items()
    }


def test_shellcheck_finds_nothing_in_any_script(tmp_path: Path) -> None:
    assert SHELLCHECK.exists(), f"no shellcheck next to {sys.executable}: pip install -e '.[dev]'"
    paths = []
    for name, text in all_scripts().items():
        path = tmp_path / name
        path.write_text(text)
        paths.append(name)
    found = subprocess.run(
        [str(SHELLCHECK), *SHELLCHECK_ARGS, *paths],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    print(found.stdout, found.stderr)
    assert (found.returncode, found.stdout, found.stderr) == (0, "", "")


@pytest.mark.parametrize("name", sorted(all_scripts()))
def test_every_script_parses(name: str, tmp_path: Path) -> None:
    path = tmp_path / name
    path.write_text(all_scripts()[name])
    parsed = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True, check=False)
    assert parsed.returncode == 0, parsed.stderr


# --- the user data, run --------------------------------------------------------------------


@pytest.mark.parametrize("database", ["external", "ephemeral"])
def test_user_data_boots_in_the_sandbox(sandbox: Sandbox, database: str) -> None:
    config = sandbox_config(sandbox, database=database)

    ran = sandbox.run(render_user_data(config, SPEC))

    assert ran.returncode == 0, ran.stderr
    assert (sandbox.root / "state" / "bootstrap-done").exists()
    app = sandbox.root / "app"
    assert (app / ".env").read_text() == f"APP_IMAGE=ghcr.io/octo-org/app:{SPEC.sha}\n{HOST_PORT}"
    compose = (app / "docker-compose.yml").read_text()
    assert compose.startswith("services:\n  api:\n    image: ${APP_IMAGE}\n")
    if database == "external":
        assert (app / "app.env").read_text() == f"DATABASE_URL={DATABASE_URL}\n"
    else:
        assert "@db:5432/app" in (app / "app.env").read_text()
    assert oct((app / "app.env").stat().st_mode & 0o777) == "0o600"
    assert sandbox.read("login-stdin") == TOKEN + "\n"
    up = f"{compose_call(app)} up -d"
    assert up in sandbox.calls
    assert TOKEN not in sandbox.calls  # on no command line
    # Migrated on boot, after up, and marked with the .env it migrated — except beside an
    # ephemeral database, still starting then: the flow's migrate step waits for it.
    migrated = sandbox.root / "state" / "migrated"
    ran_migrations = f"{compose_call(app)} run --rm -T api alembic upgrade head"
    if database == "external":
        assert sandbox.calls.index(up) < sandbox.calls.index(ran_migrations)
        assert migrated.read_text() == (app / ".env").read_text()
    else:
        assert ran_migrations not in sandbox.calls and not migrated.exists()


def test_docker_takes_its_networks_from_the_pool_and_keeps_what_an_ami_set(
    sandbox: Sandbox,
) -> None:
    """Compose networks never get the VPC's addresses: daemon.json names the configured pool,
    keeps a baked AMI's other settings, and a running Docker restarts only when it changed."""
    daemon = sandbox.root / "docker" / "daemon.json"
    daemon.parent.mkdir()
    daemon.write_text('{"log-driver": "journald"}\n')
    config = sandbox_config(sandbox, container_address_pool="10.250.0.0/16")

    assert sandbox.run(render_user_data(config, SPEC)).returncode == 0
    assert json.loads(daemon.read_text()) == {
        "log-driver": "journald",
        "default-address-pools": [{"base": "10.250.0.0/16", "size": 24}],
    }
    first = sandbox.calls
    assert "systemctl is-active --quiet docker" in first

    # The same pool again (a reboot of a baked AMI): nothing is written, nothing restarted.
    before = daemon.stat().st_mtime_ns
    assert sandbox.run(render_user_data(config, SPEC)).returncode == 0
    assert daemon.stat().st_mtime_ns == before
    assert sandbox.calls.count("systemctl is-active --quiet docker") == first.count(
        "systemctl is-active --quiet docker"
    )


def test_migrations_that_fail_on_boot_leave_them_to_the_flow(sandbox: Sandbox) -> None:
    """A failed migration on boot does not fail the bootstrap: no marker, so wait-ready tells
    the flow to migrate, and the flow's migrate step retries and diagnoses the failure."""
    ran = sandbox.run(render_user_data(sandbox_config(sandbox), SPEC), RUN_EXIT="3")

    assert ran.returncode == 0, ran.stderr
    assert (sandbox.root / "state" / "bootstrap-done").exists()
    assert not (sandbox.root / "state" / "migrated").exists()
    assert "the migrations on boot exited 3" in ran.stdout


@pytest.mark.parametrize(
    ("ghcr_token", "database_url"),
    [
        (TOKEN, None),  # ParameterNotFound
        (TOKEN, ""),
        (None, DATABASE_URL),
        ("", DATABASE_URL),
    ],
    ids=["database-url-missing", "database-url-empty", "token-missing", "token-empty"],
)
def test_a_failed_secret_read_fails_the_bootstrap_at_secrets(
    sandbox: Sandbox, ghcr_token: str | None, database_url: str | None
) -> None:
    sandbox.params(ghcr_token=ghcr_token, database_url=database_url)

    ran = sandbox.run(render_user_data(sandbox_config(sandbox), SPEC))

    assert ran.returncode != 0
    assert (sandbox.root / "state" / "bootstrap-failed").read_text() == "secrets\n"
    assert not (sandbox.root / "state" / "bootstrap-done").exists()
    assert "pr-preview bootstrap failed at step: secrets" in ran.stderr
    assert " up -d" not in sandbox.calls
    assert "docker login" not in sandbox.calls


def test_the_boot_pulls_the_checked_digest_and_a_fallback_build_runs_that_build(
    sandbox: Sandbox,
) -> None:
    digest = "sha256:" + "d1" * 32
    pinned = LaunchSpec(SPEC.repo, SPEC.pr_number, SPEC.sha, digest=digest)
    script = render_user_data(sandbox_config(sandbox), pinned)
    env = sandbox.root / "app" / ".env"

    pulled = sandbox.run(script)

    assert pulled.returncode == 0, pulled.stderr
    assert env.read_text() == f"APP_IMAGE=ghcr.io/octo-org/app:{SPEC.sha}@{digest}\n{HOST_PORT}"
    pull = f"{compose_call(sandbox.root / 'app')} pull api"
    assert pull in sandbox.calls and "docker build" not in sandbox.calls

    built = sandbox.run(script, PULL_EXIT="1")

    # No pull, so the sha's tarball is built, and compose runs that build: a tag of this
    # instance only, which a digest cannot name.
    assert built.returncode == 0, built.stderr
    assert f"docker build -t ghcr.io/octo-org/app:{SPEC.sha} " in sandbox.calls
    assert env.read_text() == f"APP_IMAGE=ghcr.io/octo-org/app:{SPEC.sha}\n{HOST_PORT}"


def test_a_failing_command_marks_its_step(sandbox: Sandbox) -> None:
    """The pull fails (so the tarball fallback runs) and then the build: the ERR trap marks
    the step it was at."""
    ran = sandbox.run(
        render_user_data(sandbox_config(sandbox), SPEC), PULL_EXIT="1", BUILD_EXIT="3"
    )

    assert ran.returncode != 0
    assert (sandbox.root / "state" / "bootstrap-failed").read_text() == "tarball-build\n"
    assert "pr-preview bootstrap failed at step: tarball-build (exit status 3)" in ran.stderr


def test_tarball_fallback_gives_curl_the_token_on_stdin(sandbox: Sandbox) -> None:
    ran = sandbox.run(render_user_data(sandbox_config(sandbox), SPEC), PULL_EXIT="1")

    assert ran.returncode == 0, ran.stderr
    (curl,) = [line for line in sandbox.calls.splitlines() if line.startswith("curl ")]
    assert curl == f"curl -fsSL -H @- https://api.github.com/repos/octo-org/app/tarball/{SPEC.sha}"
    assert sandbox.read("curl-stdin") == f"Authorization: Bearer {TOKEN}\n"
    assert TOKEN not in sandbox.calls  # what ps would have shown
    assert f"docker build -t ghcr.io/octo-org/app:{SPEC.sha}" in sandbox.calls


def test_user_data_quotes_values_even_past_validation(sandbox: Sandbox) -> None:
    """Validation refuses these at load; quoting at the point of use holds without it."""
    payload = "$(touch pwned)"
    config = PreviewConfig.model_construct(
        **{
            **sandbox_config(sandbox).model_dump(),
            "image": f"ghcr.io/octo-org/app{payload}`touch pwned`",
            "app_service": "api\nYAML\ntouch pwned\ncat <<'YAML'",
            "region": "ap-northeast-1;touch pwned",
            "ghcr_username": f"octo'{payload}'",
        }
    )

    ran = sandbox.run(render_user_data(config, SPEC), PULL_EXIT="1")

    assert not list(sandbox.root.rglob("pwned")), ran.stderr
    assert ran.returncode == 0, ran.stderr
    env = (sandbox.root / "app" / ".env").read_text()
    assert env == f"APP_IMAGE=ghcr.io/octo-org/app{payload}`touch pwned`:{SPEC.sha}\n{HOST_PORT}"
    assert f"-u octo'{payload}' --password-stdin" in sandbox.calls


def test_user_data_writes_the_apps_settings_and_secrets_without_showing_them(
    sandbox: Sandbox,
) -> None:
    secret = "s3cr3t 'quoted' $HOME value"
    (sandbox.root / "params" / "pr-preview" / "env" / "stripe").mkdir(parents=True)
    (sandbox.root / "params" / "pr-preview" / "env" / "API_KEY").write_text(secret + "\n")
    (sandbox.root / "params" / "pr-preview" / "env" / "stripe" / "STRIPE_KEY").write_text("sk\n")
    config = sandbox_config(
        sandbox,
        env={"APP_URL": "https://pr-{pr_number}.example/{branch}", "MODE": "$HOME {{x}}"},
        env_parameter_path="/pr-preview/env/",
    )
    spec = LaunchSpec(SPEC.repo, SPEC.pr_number, SPEC.sha, branch="feature/login")

    script = render_user_data(config, spec)
    ran = sandbox.run(script)

    assert ran.returncode == 0, ran.stderr
    app = sandbox.root / "app"
    assert (app / "preview.env").read_text() == (
        "APP_URL=https://pr-42.example/feature/login\nMODE=$HOME {x}\n"
        f"PR_NUMBER=42\nGIT_SHA={SPEC.sha}\nPR_BRANCH=feature/login\n"
    )
    assert (app / "secrets.env").read_text() == f"API_KEY={secret}\nSTRIPE_KEY=sk\n"
    assert oct((app / "secrets.env").stat().st_mode & 0o777) == "0o600"
    assert (
        "env_file: [secrets.env, preview.env, app.env]" in (app / "docker-compose.yml").read_text()
    )
    for where in (script, sandbox.calls, ran.stdout, ran.stderr):
        assert "s3cr3t" not in where


def test_a_push_rewrites_the_settings_and_reads_the_secrets_again(sandbox: Sandbox) -> None:
    """The in-place deploy's share (tasks/app/app_env.py): a changed setting and a rotated secret
    reach the env files on the next push, the secret on no command line."""
    folder = sandbox.root / "params" / "pr-preview" / "env"
    folder.mkdir(parents=True)
    (folder / "API_KEY").write_text("rotated-secret\n")
    config = sandbox_config(sandbox, env={"MODE": "second"}, env_parameter_path="/pr-preview/env")
    app = sandbox.root / "app"
    app.mkdir()
    (app / "secrets.env").write_text("API_KEY=old\n")
    env = preview_env(config, SPEC.repo, SPEC.pr_number, SPEC.sha, "feature/x")
    script = "\n".join(["set -euo pipefail", f"cd {app}", *app_env_commands(config, AppFiles(env))])

    ran = sandbox.run(script + "\n")

    assert ran.returncode == 0, ran.stderr
    assert (app / "secrets.env").read_text() == "API_KEY=rotated-secret\n"
    assert "MODE=second\n" in (app / "preview.env").read_text()
    assert "rotated-secret" not in script + sandbox.calls + ran.stdout + ran.stderr


@pytest.mark.parametrize(
    ("name", "value", "why"),
    [
        ("bad-name", "x", "parameter /pr-preview/env/bad-name: not a variable name"),
        ("MULTI", "one\ntwo", "parameter /pr-preview/env/MULTI holds a line break"),
    ],
)
def test_a_secret_that_cannot_be_a_variable_fails_the_bootstrap_at_secrets(
    sandbox: Sandbox, name: str, value: str, why: str
) -> None:
    (sandbox.root / "params" / "pr-preview" / "env").mkdir(parents=True)
    (sandbox.root / "params" / "pr-preview" / "env" / name).write_text(value + "\n")
    config = sandbox_config(sandbox, env_parameter_path="/pr-preview/env")

    ran = sandbox.run(render_user_data(config, SPEC))

    assert (sandbox.root / "state" / "bootstrap-failed").read_text() == "secrets\n"
    assert why in ran.stderr
    assert "two" not in ran.stderr


# --- SSM scripts, run ----------------------------------------------------------------------


def test_db_tcp_check_gives_host_and_port_to_bash_as_arguments(sandbox: Sandbox) -> None:
    """The host and port come from app.env on the instance: data, never script text."""
    config = sandbox_config(sandbox)
    app = sandbox.root / "app"
    app.mkdir()
    (app / "app.env").write_text(
        "DATABASE_URL=postgresql://app:pw@db$(touch${IFS}pwned):5432`touch${IFS}pwned2`/app\n"
    )
    (section,) = [s for s in evidence_sections(config) if s.name == "db-tcp"]

    ran = sandbox.run("\n".join(section.commands))

    assert not (sandbox.root / "pwned").exists()
    assert not (sandbox.root / "pwned2").exists()
    assert ran.stdout.startswith("DB TCP NG db$(touch${IFS}pwned):5432`touch${IFS}pwned2`")


def test_port_check_gives_host_and_port_to_bash_as_arguments(sandbox: Sandbox) -> None:
    ran = sandbox.run("\n".join(port_check(1, host="x$(touch${IFS}pwned)")))

    assert not (sandbox.root / "pwned").exists()
    assert (ran.returncode, ran.stdout) == (1, "APP PORT CLOSED 1\n")


def test_migration_command_reaches_the_container_as_arguments(sandbox: Sandbox) -> None:
    pwned = sandbox.root / "pwned"
    config = sandbox_config(
        sandbox, migration_command=f"alembic upgrade head; touch {pwned} $(touch {pwned})"
    )
    (sandbox.root / "app").mkdir()

    ran = sandbox.run("\n".join(migrate_commands(config)))

    assert ran.returncode == 0, ran.stderr
    assert not pwned.exists()
    assert sandbox.calls == (
        f"{compose_call(sandbox.root / 'app')} run --rm -T api alembic upgrade head;"
        f" touch {pwned} $(touch {pwned})\n"
    )


def test_the_files_root_runs_are_replaced_never_written_through_a_planted_link(
    sandbox: Sandbox,
) -> None:
    """Links where the compose and env files go (as a container that could write the app dir
    would plant them) are replaced by the new files, and what they point at is untouched; the
    app dir is root's alone."""
    app = sandbox.root / "app"
    app.mkdir()
    victim = sandbox.root / "victim"
    victim.write_text("host file\n")
    for name in ("docker-compose.yml", ".env", "app.env", "preview.env", "secrets.env"):
        (app / name).symlink_to(victim)

    ran = sandbox.run(render_user_data(sandbox_config(sandbox), SPEC))

    assert ran.returncode == 0, ran.stderr
    assert victim.read_text() == "host file\n"
    for name in ("docker-compose.yml", ".env", "app.env", "preview.env", "secrets.env"):
        assert not (app / name).is_symlink() and (app / name).is_file(), name
    assert (app / ".env").read_text() == f"APP_IMAGE=ghcr.io/octo-org/app:{SPEC.sha}\n{HOST_PORT}"
    assert oct(app.stat().st_mode & 0o777) == "0o700"
    assert not list(app.glob("*.??????"))  # no temporary file left behind


def test_an_in_place_deploy_replaces_a_planted_env_link_too(sandbox: Sandbox) -> None:
    config = sandbox_config(sandbox)
    app = sandbox.root / "app"
    app.mkdir()
    victim = sandbox.root / "victim"
    victim.write_text("APP_IMAGE=old\n")
    (app / ".env").symlink_to(victim)

    config.probe_timeout_seconds = 1  # nothing answers in this sandbox: the probe stage fails

    ran = sandbox.run("\n".join(deploy_commands(config, SPEC.repo, "ghcr.io/octo-org/app:new")))

    assert "pr-preview-stage pull " in ran.stdout and "pull failed" not in ran.stdout, ran.stdout
    assert victim.read_text() == "APP_IMAGE=old\n"
    assert (app / ".env").read_text() == "APP_IMAGE=ghcr.io/octo-org/app:new\n"
    assert not (app / ".env").is_symlink()
