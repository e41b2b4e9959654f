"""Change a running preview instead of replacing it: the in-place update on ``synchronize``
and the failure policy's short TTL.

An update costs seconds where a relaunch costs an EC2 boot: point ``APP_IMAGE`` in
``{app_dir}/.env`` at the new sha's image, by the digest the image check saw
(``image:sha@digest``), ``docker compose pull``, migrate, start the new version beside the
running one and switch the app port's proxy to it once it answers (tasks/cloud/app_proxy.py):
no request fails during a push. Once the new containers run, the instance's tags say so:
``Sha``, ``updated-at`` and a fresh ``shutdown-at`` (the on-instance shutdown timer is moved
with it). Relaunching is the flow's call when :func:`preview_health` says unhealthy or an
update step fails — not when the new version failed beside a running one that still serves
(:attr:`UpdateFailed.kept_serving`).
"""

from __future__ import annotations

import logging
import math
import shlex
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from botocore.exceptions import ClientError
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext
from prefect.futures import wait as wait_for_futures

from tasks.app.app_env import AppFiles, app_env_commands
from tasks.app.masking import mask_secrets
from tasks.app.migration_output import last_error, permanent_failures_ere
from tasks.cloud.app_proxy import (
    HOST_PORT_VARIABLE,
    UPSTREAM_FILE,
    side_by_side,
    upstream_ports,
    upstream_write,
)
from tasks.cloud.aws import AwsClients
from tasks.cloud.ecr import ecr_login, ecr_repository
from tasks.cloud.instances import describe_preview, find_previews
from tasks.cloud.on_instance import (
    ALEMBIC_HEADS_LABEL,
    APP_STATE_PREFIX,
    BOOTSTRAP_DONE,
    CURL_MAX_SECONDS,
    DEPLOY_STAGES,
    KEPT_SERVING,
    PATH_SAYS_NOTHING_CASE,
    STAGE_PREFIX,
    STATE_DIR,
    TCP_CHECK_DIRECTIVE,
    compose_command,
    container_run,
    tcp_check,
    timer_command,
    timer_minutes,
    write_file,
)
from tasks.cloud.ssm import CommandTimeout, agent_not_registered, run_command, send_shell
from tasks.cloud.tags import TAG_SHA, TAG_SHUTDOWN_AT, TAG_UPDATED_AT, format_time, parse_time
from tasks.config import PreviewConfig
from tasks.inputs import is_sha
from tasks.run.errors import PreviewError
from tasks.run.prefect_context import run_logger
from tasks.run.step import step

if TYPE_CHECKING:
    from mypy_boto3_ec2 import EC2Client
    from mypy_boto3_ssm import SSMClient

logger = logging.getLogger(__name__)

OUTPUT_TAIL = 4000
HEALTH_MARKER = "# pr-preview-health"


class UpdateFailed(PreviewError):
    """The in-place update did not complete; relaunch — unless :attr:`kept_serving`. ``output``
    is masked; ``stage`` names the deploy command's stage that failed (None: the command did
    not get that far), and ``stages`` are the ones it reported; ``previous_sha`` is the sha the
    instance ran before."""

    def __init__(
        self,
        message: str,
        output: str = "",
        *,
        stage: str | None = None,
        stages: tuple[Stage, ...] = (),
        previous_sha: str | None = None,
    ) -> None:
        self.output = output
        self.stage = stage
        self.stages = stages
        self.previous_sha = previous_sha
        super().__init__(message)

    @property
    def kept_serving(self) -> bool:
        """The new version failed beside the old one, which still serves, untouched: a relaunch
        would only trade a working preview for the same failure on a new instance."""
        return any(stage.failed and stage.detail.endswith(KEPT_SERVING) for stage in self.stages)


@dataclass(frozen=True)
class UpdateResult:
    instance_id: str
    previous_sha: str | None
    sha: str
    image: str
    shutdown_at: datetime
    updated_at: datetime
    seconds: float
    path: str = "in-place"
    launched_at: datetime | None = None  # the instance's EC2 launch: what its cost runs from
    stages: tuple[Stage, ...] = ()  # what the deploy command reported, stage by stage

    @property
    def timer_moved(self) -> bool:
        """The healthy probe moved the shutdown timer to the full TTL: only the tag is left."""
        return any(stage.name == "ttl" and stage.outcome == "ok" for stage in self.stages)

    @property
    def probe(self) -> str:
        """``<path> <status> <seconds>`` of the healthy answer, as the probe stage saw it."""
        return next((stage.detail for stage in self.stages if stage.name == "probe"), "")


@dataclass(frozen=True)
class Health:
    instance_id: str
    healthy: bool
    reason: str


@dataclass(frozen=True)
class TtlChange:
    instance_id: str
    before: datetime | None
    after: datetime
    changed: bool


def check_health(
    ec2: EC2Client,
    ssm: SSMClient,
    settings: PreviewConfig,
    instance_id: str,
    *,
    timeout_seconds: float = 30.0,
) -> Health:
    """Is this preview worth updating in place? Running, bootstrapped, app port open.
    One SSM command; an instance that does not answer is unhealthy, not an error."""
    preview = describe_preview(ec2, instance_id)
    if preview is None:
        return Health(instance_id, False, "instance not found")
    if preview.state != "running":
        return Health(instance_id, False, f"instance is {preview.state}")
    commands = health_commands(settings)
    try:
        result = run_command(
            ssm,
            instance_id,
            commands,
            timeout_seconds=timeout_seconds,
            poll_seconds=min(settings.poll_seconds, 1.0),
            comment="pr-preview health",
        )
    except CommandTimeout:
        return Health(instance_id, False, "SSM command timed out")
    except ClientError as exc:
        if agent_not_registered(exc):
            return Health(instance_id, False, "SSM agent not reachable")
        raise
    if result.ok and "healthy" in result.stdout.split():
        return Health(instance_id, True, "healthy")
    reason = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else result.status
    return Health(instance_id, False, reason)


def health_commands(settings: PreviewConfig) -> list[str]:
    """Bootstrapped, the app port (its proxy) open and the app behind it too; ``healthy`` on the
    last line when all hold. An instance booted before the proxy is not: relaunched, it gets one
    (tasks/cloud/app_proxy.py), and every later push deploys with no failed request."""
    port = shlex.quote(str(settings.app_port))
    upstream = shlex.quote(UPSTREAM_FILE)
    return [
        HEALTH_MARKER,
        f"test -f {BOOTSTRAP_DONE} || {{ echo 'bootstrap not done'; exit 1; }}",
        f"test -f {upstream} || {{ echo 'no app proxy (booted by an older pr-preview)'; exit 1; }}",
        f"behind=$(head -c 16 {upstream}) || behind=''",
        "behind=${behind//[!0-9]/}",
        TCP_CHECK_DIRECTIVE,
        f"{tcp_check('127.0.0.1', port)} 2>/dev/null || {{ echo app port {port} closed; exit 1; }}",
        TCP_CHECK_DIRECTIVE,
        tcp_check("127.0.0.1", '"$behind"') + " 2>/dev/null"
        ' || { echo "nothing behind the app port\'s proxy on 127.0.0.1:$behind"; exit 1; }',
        "echo healthy",
    ]


DEPLOY_MARKER = "# pr-preview-deploy"
DEPLOY_SECTION = f"{DEPLOY_MARKER}: "  # heads each stage's part of the one command
STAGE_OUTPUT_TAIL = 6000  # a failed stage's output: under SSM's 24,000-character stdout cut
MIGRATE_LOG_TAIL = 1500  # alembic's own lines of a migration that ran
NEW_LOG_TAIL = 2500  # the log of a new version that never answered


@dataclass(frozen=True)
class Stage:
    """One line ``pr-preview-stage <name> <ok|skipped|failed> <seconds> [detail]`` of the
    deploy command."""

    name: str
    outcome: str
    seconds: float
    detail: str = ""

    @property
    def failed(self) -> bool:
        return self.outcome == "failed"


def parse_stages(stdout: str) -> list[Stage]:
    """The deploy command's stage lines, in order; any other line is ignored."""
    stages = []
    for line in stdout.splitlines():
        words = line.split(" ", 4)
        if len(words) < 4 or words[0] != STAGE_PREFIX or words[1] not in DEPLOY_STAGES:
            continue
        if words[2] not in ("ok", "skipped", "failed"):
            continue
        try:
            seconds = float(words[3])
        except ValueError:
            continue
        stages.append(Stage(words[1], words[2], seconds, words[4] if len(words) > 4 else ""))
    return stages


def present_ref(image_ref: str) -> str:
    """What ``docker image inspect`` finds a pulled ``image:tag@digest`` by: ``image@digest``
    (the tag is not part of what was pulled)."""
    named, at, digest = image_ref.partition("@")
    name, colon, tag = named.rpartition(":")
    if at and colon and "/" not in tag:
        return f"{name}@{digest}"
    return image_ref


def migration_skippable(settings: PreviewConfig) -> bool:
    """Whether the migration may be skipped when the database stands at the image's alembic
    heads: only for exactly ``alembic upgrade head``, which then has nothing to do."""
    return shlex.split(settings.migration_command) == ["alembic", "upgrade", "head"]


def deploy_commands(
    settings: PreviewConfig,
    repo: str,
    image_ref: str,
    app: AppFiles | None = None,
    *,
    ready_ttl_minutes: int | None = None,
) -> list[str]:
    """The in-place deploy as one command, one stage after another, each printing its
    ``pr-preview-stage`` line (:func:`parse_stages`); the first stage that fails prints the tail
    of its output and stops the command (exit 1).

    - pull: rewrite APP_IMAGE (and, with ``app``, the app's settings, compose file and secrets:
      a change takes effect on this push), arm the short TTL's timer; skipped when the pinned
      digest is on the instance already, else pulled with the login the instance holds, and
      logged in again only when that is refused (:func:`pull_with_login`).
    - migrate: skipped when the image's alembic heads (its :data:`ALEMBIC_HEADS_LABEL`, read
      from the image's config with no container) equal the revision the database stands at
      (``alembic current`` in the running app container, started beside the pull); else
      ``migration_command`` in a one-off container, retried with backoff until
      ``migrate_timeout_seconds`` unless its output says waiting cannot help. Before the
      swap: a failed migration leaves the old version serving.
    - swap, probe, switch: the new version beside the old, probed on its own port, then the
      app port's proxy switched to it and the old one stopped (:func:`_swap_stages`).
    - ttl: with ``ready_ttl_minutes``, the healthy answer moves the timer to the full TTL.
    """
    q = shlex.quote
    app_dir = settings.app_dir
    by_digest = present_ref(image_ref)
    line = q(f"APP_IMAGE={image_ref}")
    compose = compose_command(app_dir)
    service = q(settings.app_service)
    poll = f"{max(0.05, min(settings.poll_seconds, 1.0)):.2f}"
    head = [
        f"{DEPLOY_MARKER} (pull, migrate, swap, probe, switch, ttl)",
        "set -uo pipefail",
        'export HOME="${HOME:-/root}"',
        f"cd {q(app_dir)} || exit 1",
        'log=$(mktemp) && kept=$(mktemp) && trap \'rm -f "$log" "$kept"\' EXIT',
        # The .env the running version was started from: put back when the new one fails.
        'cat .env >"$kept" 2>/dev/null || true',
        'restore_env() { local tmp; tmp=$(mktemp .env.XXXXXX) && cat "$kept" >"$tmp"'
        ' && mv -fT "$tmp" .env; }',
        'now() { echo "${EPOCHREALTIME/./}"; }  # microseconds',
        "stage() {  # name outcome started [detail]",
        "  local us=$(( $(now) - $3 ))",
        f'  printf \'{STAGE_PREFIX} %s %s %d.%03d%s\\n\' "$1" "$2" $((us / 1000000))'
        ' $(((us / 1000) % 1000)) "${4:+ $4}"',
        "}",
        "failed() { tail -c "
        + str(STAGE_OUTPUT_TAIL)
        + ' "$log"; echo; stage "$1" failed "$2" "$3";'
        " exit 1; }",
        # One deploy at a time, and not while the last switch still retires its old version
        # (the background job holds this lock until it is done).
        "started=$(now)",
        f"if ! {{ exec 9>>{DEPLOY_LOCK} && flock -w {LOCK_WAIT_SECONDS} 9; }}; then",
        '  : >"$log"',
        f'  failed pull "$started" "the deploy lock was not free within {LOCK_WAIT_SECONDS}s"',
        "fi",
    ]
    prepare = [
        "set -euo pipefail",
        write_file(
            f"{app_dir}/.env", f"grep -v '^APP_IMAGE=' .env 2>/dev/null || true; echo {line}"
        ),
        *(app_env_commands(settings, app) if app is not None else []),
        f"{timer_command(timer_minutes(settings.failure_ttl_hours))} || true",
    ]
    # Not `if ( ... )`: bash ignores set -e inside a subshell whose status a condition tests.
    pull = [
        f"{DEPLOY_SECTION}pull",
        "started=$(now)",
        "# shellcheck disable=SC2329 # fail and param are for the secrets read, when there are any",
        "(",
        *prepare,
        ') >"$log" 2>&1',
        'if [ "$?" -ne 0 ]; then failed pull "$started" "the app files were not written"; fi',
        f"if docker image inspect {q(by_digest)} >/dev/null 2>&1; then",
        '  stage pull skipped "$started" "image present"',
        "else",
        "  (",
        "  set -euo pipefail",
        f"  {pull_with_login(settings, repo, f'{compose} pull {service}')}",
        '  ) >"$log" 2>&1',
        '  if [ "$?" -ne 0 ]; then failed pull "$started" "the image was not pulled"; fi',
        '  stage pull ok "$started"',
        "fi",
    ]
    label = q(f'{{{{index .Config.Labels "{ALEMBIC_HEADS_LABEL}"}}}}')
    timeout = max(1, math.ceil(settings.migrate_timeout_seconds))
    backoff_max = f"{settings.poll_seconds * 6:.2f}"
    migration = container_run(app_dir, settings.app_service, settings.migration_command)
    migrate = [
        f"{DEPLOY_SECTION}migrate",
        "started=$(now)",
        "heads=''",
        "current=''",
    ]
    if migration_skippable(settings):
        migrate += [
            'wait "$current_pid" || true',
            f"heads=$(docker image inspect -f {label} {q(by_digest)} 2>/dev/null) || heads=''",
            'if [ -n "$heads" ]; then current=$(cat "$current_file"); fi',
        ]
        # The database's revision, read in the running app container while the pull runs
        # (nothing before the migrate stage changes the database).
        head += [
            'current_file=$(mktemp) && trap \'rm -f "$log" "$kept" "$current_file"\' EXIT',
            "{",
            f"  {compose} exec -T {service} alembic current 2>/dev/null"
            " | awk '/^[0-9A-Za-z_]+( |$)/ {print $1}' | LC_ALL=C sort | paste -sd ' ' -",
            '} >"$current_file" &',
            "current_pid=$!",
        ]
    migrate += [
        'if [ -n "$heads" ] && [ "$current" = "$heads" ]; then',
        '  stage migrate skipped "$started" "database at head $heads"',
        "else",
        f"  deadline=$(( $(now) + {timeout} * 1000000 ))",
        f"  delay={poll}",
        f'  until {migration} >"$log" 2>&1; do',
        f'    if grep -Eiq {q(permanent_failures_ere())} "$log"; then',
        '      failed migrate "$started" "retrying cannot fix it"',
        "    fi",
        '    if [ "${EPOCHREALTIME/./}" -ge "$deadline" ]; then',
        f'      failed migrate "$started" "did not succeed within {timeout}s"',
        "    fi",
        '    sleep "$delay"',
        f'    delay=$(awk -v d="$delay" \'BEGIN {{ d *= 2; print (d > {backoff_max} ?'
        f" {backoff_max} : d) }}')",
        "  done",
        f'  tail -c {MIGRATE_LOG_TAIL} "$log"; echo',
        '  stage migrate ok "$started"',
        "fi",
    ]
    swap, probe, switch = _swap_stages(settings, app, poll)
    ttl = [f"{DEPLOY_SECTION}ttl", "started=$(now)"]
    if ready_ttl_minutes is not None:
        ttl += [
            f'if {timer_command(ready_ttl_minutes)} >"$log" 2>&1; then',
            f'  stage ttl ok "$started" "shutdown timer +{int(ready_ttl_minutes)} min"',
            "else",
            '  tail -c 500 "$log"; echo',
            '  stage ttl failed "$started" "the shutdown timer did not move"',
            "fi",
        ]
    else:
        ttl.append('stage ttl skipped "$started" "left to the flow"')
    return [*head, *pull, *migrate, *swap, *probe, *switch, *ttl, "exit 0"]


DRAIN_SECONDS = 5  # how long the old version's open connections may take to end before it stops
STOP_SECONDS = 10  # then its graceful stop (SIGTERM: the app finishes what it serves), SIGKILL
DEPLOY_LOCK = ".deploy.lock"  # in the app dir: held by a deploy, then by its switch's retirement
LOCK_WAIT_SECONDS = 60  # a retirement takes DRAIN_SECONDS + STOP_SECONDS + compose up at most
SWITCH_LOG = ".switch.log"  # in the app dir: what the last switch's retirement did


def _swap_stages(
    settings: PreviewConfig, app: AppFiles | None, poll: str
) -> tuple[list[str], list[str], list[str]]:
    """The swap, probe and switch stages of :func:`deploy_commands` (tasks/cloud/app_proxy.py).

    - swap: the new version starts beside the one serving, on the other upstream port
      (``APP_HOST_PORT`` in ``.env``; ``--no-recreate --scale <app>=2``: the serving container
      and every other service are left as they are); an app container serving nothing (a
      crashed version, a leftover of an interrupted deploy) is removed first. Where the app
      service cannot run twice (:func:`side_by_side`), it is recreated in place, as before.
    - probe: each of ``probe_paths`` on the new version's own port until one answers 2xx/3xx,
      every ``poll`` s up to ``probe_timeout_seconds``. When none did: its state and the tail of
      its log, then it is removed and ``.env`` put back — the previous version, untouched,
      keeps serving, and the stage's detail says so (:data:`KEPT_SERVING`).
    - switch: the proxy's upstream file renamed onto the new port (each new connection reads
      it): the new version serves from here, and the command ends. The old version is retired
      in the background, holding the deploy lock (:data:`DEPLOY_LOCK`, which the next deploy
      waits for): its connections get up to :data:`DRAIN_SECONDS` to end, then it stops
      gracefully and goes, and ``compose up -d`` brings the other services to the new file;
      what it did is in :data:`SWITCH_LOG`, and an app container it failed to remove is the
      next deploy's leftover (removed by its swap).
    """
    q = shlex.quote
    compose = compose_command(settings.app_dir)
    service = q(settings.app_service)
    first, second = (q(str(port)) for port in upstream_ports(settings.app_port))
    upstream = q(UPSTREAM_FILE)
    recreate = side_by_side(settings.app_service, app.compose if app is not None else None)
    set_port = write_file(
        ".env",
        f"grep -v '^{HOST_PORT_VARIABLE}=' .env || true; echo \"{HOST_PORT_VARIABLE}=$next\"",
    )
    swap = [
        f"{DEPLOY_SECTION}swap",
        "started=$(now)",
        f"if [ ! -f {upstream} ]; then",
        '  : >"$log"',
        '  failed swap "$started" "no app proxy on this instance (booted by an older pr-preview)"',
        "fi",
        f"serving=$(head -c 16 {upstream}) || serving=''",
        "serving=${serving//[!0-9]/}",
        "old=''",
        f"for id in $({compose} ps -a -q {service} 2>/dev/null); do",
        r'  if [ -n "$serving" ] && docker port "$id" 2>/dev/null | grep -q ":$serving\$"; then',
        '    old="${old:+$old }$id"',
        "  else",
        '    docker rm -f "$id" >/dev/null 2>&1 || true',
        "  fi",
        "done",
    ]
    if recreate is None:
        swap += [
            f'if [ "$serving" = {first} ]; then next={second}; else next={first}; fi',
            "(",
            "set -euo pipefail",
            set_port,
            'count=$(wc -w <<<"$old")',
            f'{compose} up -d --no-recreate --scale "{settings.app_service}=$((count + 1))"',
            ') >"$log" 2>&1',
            "status=$?",
            "new=''",
            f"for id in $({compose} ps -a -q {service} 2>/dev/null); do",
            '  case " $old " in *" $id "*) ;; *) new="${new:+$new }$id" ;; esac',
            "done",
            'if [ "$status" -ne 0 ] || [ -z "$new" ]; then',
            '  if [ -n "$old" ]; then',
            "    # shellcheck disable=SC2086 # one word per container",
            "    docker rm -f $new >/dev/null 2>&1 || true",
            "    restore_env",
            f'    failed swap "$started" "compose up failed; {KEPT_SERVING}"',
            "  fi",
            '  failed swap "$started" "compose up failed"',
            "fi",
            'stage swap ok "$started" "started beside the previous version on 127.0.0.1:$next"',
        ]
    else:
        swap += [
            f"next=${{serving:-{first}}}",
            "(",
            "set -euo pipefail",
            set_port,
            f"{compose} up -d",
            ') >"$log" 2>&1',
            'if [ "$?" -ne 0 ]; then failed swap "$started" "compose up failed"; fi',
            'old=""',
            f"new=$({compose} ps -q {service} 2>/dev/null | head -n 1)",
            f'stage swap ok "$started" "recreated in place: {recreate}, so no two can run at once"',
        ]
    probe_timeout = max(1, math.ceil(settings.probe_timeout_seconds))
    probe = [
        f"{DEPLOY_SECTION}probe",
        "started=$(now)",
        f"deadline=$(( started + {probe_timeout} * 1000000 ))",
        "healthy=''",
        "seen=''",
        'while [ -z "$healthy" ]; do',
    ]
    # The paths in order; one the app answers about its health (ProbeAnswer.decisive) ends
    # the round: a 503 of /healthz is "not yet", whatever /docs would say.
    probe += [
        f"  for path in {' '.join(q(path) for path in settings.probe_paths)}; do",
        f"    answer=$(curl -sS -o /dev/null --max-time {CURL_MAX_SECONDS}"
        " -w '%{http_code} %{time_total}' \"http://127.0.0.1:$next$path\" 2>/dev/null) || true",
        '    seen="$path ${answer:-000}"',
        '    case "$answer" in',
        "      [23][0-9][0-9]\\ *) healthy=$seen; break ;;",
        f"      {PATH_SAYS_NOTHING_CASE}) ;;",
        "      *) break ;;",
        "    esac",
        "  done",
    ]
    inspect = "'{{.State.Status}} {{.State.ExitCode}} {{.RestartCount}}'"
    probe += [
        '  if [ -n "$healthy" ] || [ "${EPOCHREALTIME/./}" -ge "$deadline" ]; then break; fi',
        f"  sleep {poll}",
        "done",
        'if [ -n "$healthy" ]; then',
        '  stage probe ok "$started" "$healthy"',
        "else",
        "  # shellcheck disable=SC2086 # one word per container",
        f'  state=$(docker inspect -f {inspect} $new 2>/dev/null | head -n 1) || state=""',
        f'  echo "{APP_STATE_PREFIX}${{state:-unknown}}"',
        "  # shellcheck disable=SC2086",
        f"  docker logs --tail 30 $new 2>&1 | tail -c {NEW_LOG_TAIL}",
        f'  why="no path answered within {probe_timeout}s on 127.0.0.1:$next; last: $seen"',
        '  if [ -n "$old" ]; then',
        "    # shellcheck disable=SC2086",
        "    docker rm -f $new >/dev/null 2>&1 || true",
        "    restore_env",
        f'    why="$why; {KEPT_SERVING}"',
        "  fi",
        '  stage probe failed "$started" "$why"',
        "  exit 1",
        "fi",
    ]
    point = "; ".join(upstream_write('"$next"'))
    switch = [
        f"{DEPLOY_SECTION}switch",
        "started=$(now)",
        'if [ "$next" != "$serving" ]; then',
        f'  if ! ( set -euo pipefail; {point} ) >"$log" 2>&1; then',
        '    failed switch "$started" "the proxy\'s upstream file was not written"',
        "  fi",
        "fi",
        "(",
        "  retiring=$(now)",
        '  if [ -n "$old" ]; then',
        f"    drain=$(( $(now) + {DRAIN_SECONDS} * 1000000 ))",
        '    while [ "${EPOCHREALTIME/./}" -lt "$drain" ]; do',
        '      open=$(ss -Htn state established "( dport = :$serving )" 2>/dev/null) || open=""',
        '      if [ -z "$open" ]; then break; fi',
        f"      sleep {poll}",
        "    done",
        "    # shellcheck disable=SC2086 # one word per container",
        f"    docker stop -t {STOP_SECONDS} $old && docker rm $old"
        ' || echo "the previous version did not stop"',
        "  fi",
        f'  {compose} up -d || echo "compose up failed for the other services"',
        '  stage retire ok "$retiring"',
        f") </dev/null >{q(SWITCH_LOG)} 2>&1 &",
        f'stage switch ok "$started" "127.0.0.1:{settings.app_port} forwards to 127.0.0.1:$next'
        '${old:+; the previous version stops once its connections end}"',
    ]
    return swap, probe, switch


EARLY_PULL_MARKER = "# pr-preview-early-pull"
EARLY_PULL_LOG = f"{STATE_DIR}/early-pull.log"


def early_pull_commands(settings: PreviewConfig, repo: str, image_ref: str) -> list[str]:
    """Pull ``image_ref`` (the pinned digest; :func:`pull_with_login`) in the background,
    detached from the command, which returns at once: the deploy command then finds the image
    present (or joins the pull still running — Docker downloads a layer once). Nothing when it
    is present."""
    q = shlex.quote
    script = "\n".join(
        [
            "set -euo pipefail",
            'export HOME="${HOME:-/root}"',
            pull_with_login(settings, repo, f"docker pull {q(image_ref)}"),
        ]
    )
    return [
        EARLY_PULL_MARKER,
        f"if docker image inspect {q(present_ref(image_ref))} >/dev/null 2>&1; then",
        "  echo present",
        "  exit 0",
        "fi",
        f"mkdir -p {q(STATE_DIR)}",
        f"setsid nohup bash -c {q(script)} </dev/null >{q(EARLY_PULL_LOG)} 2>&1 &",
        "echo started",
    ]


def pull_with_login(settings: PreviewConfig, repo: str, pull: str) -> str:
    """One line: ``pull`` with the login the instance holds (its boot's, or the last push's),
    and only when that is refused, a new login and the pull again — the token may have rotated,
    an ECR password lasts 12 hours. A login is two AWS CLI starts and ``docker login``: seconds
    on every push, for a refusal that is rare."""
    return f"{pull} || {{ {registry_login(settings, repo)} && {pull}; }}"


def registry_login(settings: PreviewConfig, repo: str) -> str:
    """One line: the login of a push, the token going from Parameter Store straight into
    ``docker login`` — or, for an ECR image, the instance role's ECR password
    (tasks/cloud/ecr.py)."""
    ecr = ecr_repository(settings, repo)
    if ecr is not None:
        return ecr_login(ecr)
    q = shlex.quote
    return (
        f"aws ssm get-parameter --region {q(settings.region)} --with-decryption"
        f" --name {q(settings.ghcr_token_parameter)} --query Parameter.Value"
        f" --output text | docker login {q(settings.image_for(repo).split('/', 1)[0])}"
        f" -u {q(settings.registry_username(repo))} --password-stdin"
    )


def move_tags(
    ec2: EC2Client, instance_id: str, *, sha: str, ttl_hours: float, now: datetime
) -> tuple[datetime, datetime]:
    """``Sha`` → ``sha``, ``updated-at`` → now, ``shutdown-at`` → now + ``ttl_hours``."""
    shutdown_at = now + timedelta(hours=ttl_hours)
    ec2.create_tags(
        Resources=[instance_id],
        Tags=[
            {"Key": TAG_SHA, "Value": sha},
            {"Key": TAG_UPDATED_AT, "Value": format_time(now)},
            {"Key": TAG_SHUTDOWN_AT, "Value": format_time(shutdown_at)},
        ],
    )
    return shutdown_at, now


def deploy_in_place(
    ec2: EC2Client,
    ssm: SSMClient,
    settings: PreviewConfig,
    instance_id: str,
    *,
    repo: str,
    sha: str,
    digest: str,
    now: datetime | None = None,
    timeout_seconds: float | None = None,
    app: AppFiles | None = None,
    ready_ttl_minutes: int | None = None,
) -> UpdateResult:
    """Deploy ``sha`` on the running preview ``instance_id`` with one SSM command (pull,
    migrate, swap, probe, TTL: :func:`deploy_commands`) and move its tags. ``digest`` is the
    manifest the image check saw: the instance pulls that, whatever the tag says by then.

    ``timeout_seconds`` bounds the command (default: the ready, migrate and probe timeouts
    together). ``UpdateFailed`` (naming the stage) when the instance is gone or not running or
    a stage fails: relaunch then. ``ready_ttl_minutes``: the healthy probe moves the shutdown
    timer to it (the flow then only tags the full TTL).
    """
    if not is_sha(sha):
        raise ValueError(f"{sha!r} is not a git sha")
    image_ref = settings.pinned_image(repo, sha, digest)
    started = time.monotonic()
    preview = describe_preview(ec2, instance_id)
    if preview is None or preview.state != "running":
        state = preview.state if preview else "gone"
        raise UpdateFailed(f"{instance_id} is {state}: cannot update in place")
    timeout = timeout_seconds
    if timeout is None:
        timeout = (
            settings.ready_timeout_seconds
            + settings.migrate_timeout_seconds
            + settings.probe_timeout_seconds
        )
    commands = deploy_commands(settings, repo, image_ref, app, ready_ttl_minutes=ready_ttl_minutes)
    try:
        result = run_command(
            ssm,
            instance_id,
            commands,
            timeout_seconds=timeout,
            poll_seconds=min(settings.poll_seconds, 1.0),
            comment=f"pr-preview deploy {sha[:12]}",
        )
    except CommandTimeout as exc:
        raise UpdateFailed(
            f"update of {instance_id} timed out after {math.ceil(timeout)}s"
        ) from exc
    stages = tuple(parse_stages(result.stdout))
    failed = next((stage for stage in stages if stage.failed), None)
    if failed is not None or not result.ok:
        output = mask_secrets(result.output[-OUTPUT_TAIL:])
        where = f"stage {failed.name} failed ({failed.detail})" if failed else "failed"
        raise UpdateFailed(
            f"deploy of {sha[:12]} on {instance_id}: {where}, exit {result.exit_code}:"
            f" {last_error(result.output)}",
            output,
            stage=failed.name if failed else None,
            stages=stages,
            previous_sha=preview.sha,
        )
    shutdown_at, updated_at = move_tags(
        ec2,
        instance_id,
        sha=sha,
        ttl_hours=settings.failure_ttl_hours,
        now=now or datetime.now(UTC),
    )
    return UpdateResult(
        instance_id=instance_id,
        previous_sha=preview.sha,
        sha=sha,
        image=image_ref,
        shutdown_at=shutdown_at,
        updated_at=updated_at,
        seconds=time.monotonic() - started,
        launched_at=preview.launch_time,
        stages=stages,
    )


def ttl_commands(settings: PreviewConfig) -> list[str]:
    """The full TTL of a ready preview, on the instance."""
    return [timer_command(timer_minutes(settings.ttl_hours))]


def confirm_full_ttl(
    ec2: EC2Client,
    ssm: SSMClient,
    settings: PreviewConfig,
    instance_id: str,
    *,
    now: datetime | None = None,
    timer_moved: bool = False,
) -> datetime:
    """A ready preview gets its full TTL: the on-instance timer first, then ``shutdown-at``.

    Until then it runs on the short TTL it was launched or updated with, so a run that dies
    between launch and ready leaves nothing the sweeper keeps for long. ``timer_moved``: the
    probe's healthy answer already moved the timer (``tasks.steps.probe``); only the tag is left.
    """
    if not timer_moved:
        result = run_command(
            ssm,
            instance_id,
            ttl_commands(settings),
            timeout_seconds=60,
            poll_seconds=min(settings.poll_seconds, 1.0),
            comment="pr-preview confirm TTL",
        )
        if not result.ok:
            raise UpdateFailed(f"could not move the shutdown timer of {instance_id}", result.output)
    shutdown_at = ((now or datetime.now(UTC)) + timedelta(hours=settings.ttl_hours)).replace(
        microsecond=0
    )
    ec2.create_tags(
        Resources=[instance_id], Tags=[{"Key": TAG_SHUTDOWN_AT, "Value": format_time(shutdown_at)}]
    )
    return shutdown_at


@step(needs_lock=True)
def confirm_ttl(
    clients: AwsClients, settings: PreviewConfig, instance_id: str, timer_moved: bool = False
) -> datetime:
    shutdown_at = confirm_full_ttl(
        clients.ec2, clients.ssm, settings, instance_id, timer_moved=timer_moved
    )
    run_logger(logger).info("%s is ready: shutdown-at %s", instance_id, format_time(shutdown_at))
    return shutdown_at


def set_short_ttl(
    ec2: EC2Client, instance_id: str, hours: float, *, now: datetime | None = None
) -> TtlChange:
    """The failure policy: ``shutdown-at`` becomes now + ``hours`` unless it is already sooner.
    An unparsable tag is replaced (the short TTL is the safe value)."""
    now = now or datetime.now(UTC)
    target = (now + timedelta(hours=hours)).replace(microsecond=0)
    preview = describe_preview(ec2, instance_id)
    before = preview.shutdown_at if preview else None
    if before is not None and before <= target:
        return TtlChange(instance_id, before, before, False)
    ec2.create_tags(
        Resources=[instance_id], Tags=[{"Key": TAG_SHUTDOWN_AT, "Value": format_time(target)}]
    )
    return TtlChange(instance_id, before, parse_time(format_time(target)) or target, True)


@step
def preview_health(clients: AwsClients, settings: PreviewConfig, instance_id: str) -> Health:
    health = check_health(clients.ec2, clients.ssm, settings, instance_id)
    run_logger(logger).info("%s: %s", instance_id, health.reason)
    return health


@step
def in_place_candidate(
    ec2: EC2Client, settings: PreviewConfig, repo: str, pr_number: int, sha: str
) -> str | None:
    """The PR's one running instance at another sha, which a push may update in place."""
    running = [
        preview
        for preview in find_previews(
            ec2, settings.purpose_tag, repo=repo, pr_number=pr_number, states=("running",)
        )
        if preview.sha != sha
    ]
    return running[0].instance_id if len(running) == 1 else None


@step(needs_lock=True)
def update_in_place(
    clients: AwsClients,
    settings: PreviewConfig,
    instance_id: str,
    repo: str,
    sha: str,
    digest: str,
    app: AppFiles | None = None,
    ready_ttl_minutes: int | None = None,
) -> UpdateResult:
    """Prefect wrapper; ``UpdateFailed`` is final for this path (the flow relaunches)."""
    result = deploy_in_place(
        clients.ec2,
        clients.ssm,
        settings,
        instance_id,
        repo=repo,
        sha=sha,
        digest=digest,
        app=app,
        ready_ttl_minutes=ready_ttl_minutes,
    )
    run_logger(logger).info(
        "%s updated in place %s → %s in %.1fs (%s; shutdown-at %s)",
        instance_id,
        (result.previous_sha or "?")[:7],
        sha[:7],
        result.seconds,
        ", ".join(f"{stage.name} {stage.outcome} {stage.seconds:.2f}s" for stage in result.stages),
        format_time(result.shutdown_at),
    )
    return result


class StageFailed(PreviewError):
    """A stage of the deploy command failed (what the stage's own task run ends with)."""


@task(name="deploy-stage", task_run_name="deploy-{stage.name}", cache_policy=NO_CACHE)
def deploy_stage(stage: Stage) -> Stage:
    """One stage of the deploy command as its own task run: it reports what the command's
    output said (the work happened on the instance, in the one command)."""
    run_logger(logger).info(
        "%s %s in %.2fs%s",
        stage.name,
        stage.outcome,
        stage.seconds,
        f": {stage.detail}" if stage.detail else "",
    )
    if stage.failed:
        raise StageFailed(f"stage {stage.name} failed: {stage.detail}")
    return stage


def show_stages(stages: tuple[Stage, ...], *, wait: bool = False) -> None:
    """Each reported stage as a task run of the flow run (Failed for the stage that failed),
    submitted side by side: the flow goes on while they are recorded (the flow run ends only
    once they have), unless ``wait``. Outside a flow run, only the log."""
    if FlowRunContext.get() is None:
        for stage in stages:
            logger.info("%s %s in %.2fs %s", stage.name, stage.outcome, stage.seconds, stage.detail)
        return
    futures = [deploy_stage.submit(stage) for stage in stages]
    if wait:
        wait_for_futures(futures)


@step
def start_pull(
    clients: AwsClients,
    settings: PreviewConfig,
    instance_id: str,
    repo: str,
    sha: str,
    digest: str,
) -> str | None:
    """As soon as the image check found the digest: the PR's running preview starts pulling it
    while the flow does its other work (the health check, the lock); not waited for. Returns
    the command id; None when the instance cannot take the command (the deploy pulls then)."""
    image_ref = settings.pinned_image(repo, sha, digest)
    try:
        command_id = send_shell(
            clients.ssm,
            instance_id,
            early_pull_commands(settings, repo, image_ref),
            timeout_seconds=60,
            comment=f"pr-preview early pull {sha[:12]}",
        )
    except ClientError as exc:
        if agent_not_registered(exc):
            return None
        raise
    run_logger(logger).info("%s started pulling %s", instance_id, image_ref)
    return command_id


@step
def shorten_ttl(clients: AwsClients, settings: PreviewConfig, instance_id: str) -> TtlChange:
    change = set_short_ttl(clients.ec2, instance_id, settings.failure_ttl_hours)
    run_logger(logger).info(
        "%s shutdown-at %s%s",
        instance_id,
        format_time(change.after),
        "" if change.changed else " (already sooner)",
    )
    return change
