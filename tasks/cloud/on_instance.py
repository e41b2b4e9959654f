"""What the steps look for on the instance: the bootstrap marker files, the cloud-init log, the
port check, the app probe's command and answer, and the on-instance shutdown timer — shared by
launch, wait-ready, probe, update and diagnose so that the user data and every check agree."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from datetime import datetime

from tasks.cloud.tags import parse_time

STATE_DIR = "/var/lib/pr-preview"


BOOTSTRAP_DONE = f"{STATE_DIR}/bootstrap-done"


BOOTSTRAP_FAILED = f"{STATE_DIR}/bootstrap-failed"


# The user data's migrations on boot succeeded: a copy of the .env they migrated, so a later
# deploy (a push in place rewrites .env) is never taken for one the boot migrated.
MIGRATED = f"{STATE_DIR}/migrated"


CLOUD_INIT_LOG = "/var/log/cloud-init-output.log"


COMPOSE_FILE = "docker-compose.yml"


# The in-place deploy's one command (tasks/steps/update.py): its stages, in order, each
# reported on a line ``pr-preview-stage <name> <ok|skipped|failed> <seconds> [detail]``; a
# failure's message says ``stage <name> failed`` (what the diagnosis reads it by).
STAGE_PREFIX = "pr-preview-stage"
DEPLOY_STAGES = ("pull", "migrate", "swap", "probe", "switch", "ttl")
# Ends the detail of a swap or probe that failed while the running version was left serving.
KEPT_SERVING = "the previous version keeps serving"
FAILED_STAGE = re.compile(rf"\bstage ({'|'.join(DEPLOY_STAGES)}) failed\b")


# The image's alembic heads (space-separated, sorted), as its build labels it: a deploy whose
# database already stands at them starts no migration container (tasks/steps/update.py).
ALEMBIC_HEADS_LABEL = "org.pr-preview.alembic-heads"


def compose_command(app_dir: str) -> str:
    """``docker compose`` on the preview's project with every path explicit: the file, the
    env file its ``${APP_IMAGE}`` is read from, and the directory its relative paths resolve
    against. Nothing comes from the working directory, and the app dir holds what root runs:
    no container may mount it (tasks/app/compose_policy.py)."""
    directory = shlex.quote(app_dir)
    file, env = shlex.quote(f"{app_dir}/{COMPOSE_FILE}"), shlex.quote(f"{app_dir}/.env")
    return f"docker compose --project-directory {directory} -f {file} --env-file {env}"


def write_file(path: str, producer: str, *, literal: bool = False) -> str:
    """Shell lines putting ``producer``'s output in ``path`` through a new file (mktemp: never
    one that exists, so never a link) and a rename over ``path`` (which replaces a link instead
    of writing through it). Needs ``set -e`` around it; the new file is 0600. ``literal``: the
    producer prints single-quoted text with ``$`` in it on purpose (shellcheck is told)."""
    target = shlex.quote(path)
    lines = [f"tmp=$(mktemp {target}.XXXXXX)", f'{{ {producer}; }} > "$tmp"']
    if literal:
        lines.insert(1, "# shellcheck disable=SC2016")
    return "\n".join([*lines, f'mv -fT "$tmp" {target}'])


FAILED_PREFIX = "bootstrap failed at step: "


# First stdout line: bootstrap-done | bootstrap-failed | bootstrap-pending; a failure adds
# "bootstrap failed at step: <the marker's content>". cloud-init finished without any marker
# means the script never ran or died without its trap: waiting longer cannot help.
BOOTSTRAP_CHECK = [
    f"if [ -f {BOOTSTRAP_FAILED} ]; then",
    "  echo bootstrap-failed",
    f"  marker=$(head -c 2000 {BOOTSTRAP_FAILED}) || marker='(marker unreadable)'",
    f'  echo "{FAILED_PREFIX}$marker"',
    f"elif [ -f {BOOTSTRAP_DONE} ]; then",
    "  echo bootstrap-done",
    "else",
    "  # cloud-init status exits non-zero once cloud-init failed: its text is what counts.",
    "  cloud_init=$(cloud-init status 2>&1) || true",
    '  case "$cloud_init" in',
    "    *'status: done'* | *'status: error'*)",
    # The user data may have finished between the marker checks above and cloud-init's
    # answer: look once more before calling it a failure.
    f"      if [ -f {BOOTSTRAP_DONE} ]; then",
    "        echo bootstrap-done",
    f"      elif [ -f {BOOTSTRAP_FAILED} ]; then",
    "        echo bootstrap-pending  # the next check reads the failed step from the marker",
    "      else",
    "        echo bootstrap-failed",
    "        first_line=${cloud_init%%$'\\n'*}",
    f'        echo "{FAILED_PREFIX}cloud-init ($first_line, no pr-preview marker)"',
    "      fi",
    "      ;;",
    "    *)",
    "      echo bootstrap-pending",
    "      ;;",
    "  esac",
    "fi",
]


PORT_CHECK_TIMEOUT_SECONDS = 3


# Precedes each tcp_check: the single quotes are the point (shellcheck exempts `bash -c '...'`
# but not `timeout 3 bash -c '...'`).
TCP_CHECK_DIRECTIVE = "# shellcheck disable=SC2016 # $1 and $2 are the inner bash's arguments"


def tcp_check(host: str, port: str) -> str:
    """A command that exits 0 when ``host``:``port`` accepts a TCP connection (bash's
    ``/dev/tcp``, no nc needed). ``host`` and ``port`` are shell words — quoted values or
    ``"$var"`` — that reach the inner bash as arguments, never as part of its script.
    Put :data:`TCP_CHECK_DIRECTIVE` on the line before the command that holds it."""
    return (
        f"timeout {PORT_CHECK_TIMEOUT_SECONDS} bash -c 'echo > \"/dev/tcp/$1/$2\"'"
        f" tcp-check {host} {port}"
    )


def port_check(port: int, host: str = "127.0.0.1") -> list[str]:
    """Runbook §0's TCP check: exit 0 and ``APP PORT OPEN`` when the port accepts."""
    shown = shlex.quote(str(port))
    return [
        TCP_CHECK_DIRECTIVE,
        f"if {tcp_check(shlex.quote(host), shown)} 2>/dev/null; then",
        f"  echo APP PORT OPEN {shown}",
        "else",
        f"  echo APP PORT CLOSED {shown}",
        "  exit 1",
        "fi",
    ]


APP_STATE_PREFIX = "APP STATE "


def app_state_check(app_dir: str, service: str) -> list[str]:
    """``APP STATE <state> <exit code> <restarts>`` of the app's container as Docker reports it
    (running, restarting, exited, created, …; the last run's exit code, which a restarting
    container keeps; how often its restart policy restarted it), or ``APP STATE unknown``."""
    inspect = "'{{.State.Status}} {{.State.ExitCode}} {{.RestartCount}}'"
    return [
        f"id=$({compose_command(app_dir)} ps -a -q {shlex.quote(service)} 2>/dev/null) || id=''",
        "id=${id%%$'\\n'*}",
        f"state=$(docker inspect -f {inspect} \"$id\" 2>/dev/null) || state=''",
        f'echo "{APP_STATE_PREFIX}${{state:-unknown}}"',
    ]


def container_run(app_dir: str, service: str, command: str) -> str:
    """``command`` in a one-off container of ``service`` (same image, env files and network as
    the app). Its words are split as a shell would and each is quoted, so no shell — the
    instance's root shell or one in the container — interprets it (``;``, ``$(...)`` or ``&&``
    are plain arguments). A command that needs a shell says so: ``sh -c 'alembic upgrade head
    && python -m app.seed'``."""
    argv = " ".join(shlex.quote(word) for word in shlex.split(command))
    return f"{compose_command(app_dir)} run --rm -T {shlex.quote(service)} {argv}"


def container_script(app_dir: str, service: str, command: str, tail_bytes: int) -> list[str]:
    """:func:`container_run` from the app dir, keeping only the last ``tail_bytes`` of what it
    printed: SSM returns only the first 24,000 characters of stdout and 8,000 of stderr, and a
    traceback's last line is the one that says what failed. Exits with the command's status."""
    return [
        "set -eu",
        f"cd {shlex.quote(app_dir)}",
        "log=$(mktemp) && trap 'rm -f \"$log\"' EXIT",
        "status=0",
        f'{container_run(app_dir, service, command)} >"$log" 2>&1 || status=$?',
        f'tail -c {int(tail_bytes)} "$log"',
        'exit "$status"',
    ]


def timer_minutes(hours: float) -> int:
    """The on-instance shutdown timer (``shutdown -h +N``) for a TTL of ``hours``."""
    return max(1, round(hours * 60))


def timer_command(minutes: int) -> str:
    """Move the on-instance shutdown timer (poweroff = terminate) to ``minutes`` from now."""
    return f"shutdown -h +{int(minutes)} 'pr-preview TTL reached'"


# The app probe (runbook §2.6): curl inside the instance; wait-ready asks it too, once the port
# opens, so a ready preview costs one round trip less.
CURL_MAX_SECONDS = 10
TIMER_MOVED = "pr-preview-timer-moved"


# The probe's answers that pass the question to the next of ``probe_paths``: a path the app
# does not serve. Any other answer, or none, ends the round (``ProbeAnswer.decisive``).
PATH_SAYS_NOTHING = (404, 405)
# The same as a shell ``case`` pattern over curl's ``%{http_code} %{time_total}``.
PATH_SAYS_NOTHING_CASE = "|".join(f"{code:03d}\\ *" for code in PATH_SAYS_NOTHING)


@dataclass(frozen=True)
class ProbeAnswer:
    path: str
    status_code: int  # 0: no HTTP answer (refused, timed out)
    latency_seconds: float | None
    error: str = ""
    timer_moved: bool = False  # the same command moved the shutdown timer (a healthy answer)

    @property
    def healthy(self) -> bool:
        return 200 <= self.status_code < 400

    @property
    def decisive(self) -> bool:
        """This answer ends the round: 2xx/3xx healthy; any other answer (a 503 of a health
        check whose database is away) or none (the port closed, or the app too busy to answer
        in time — every path is on the same port) not yet. Only a path the app does not have
        (404, 405) passes the question to the next path."""
        return self.status_code not in PATH_SAYS_NOTHING


@dataclass(frozen=True)
class ProbeResult:
    instance_id: str
    path: str
    status_code: int
    latency_seconds: float | None
    attempts: int
    answers: list[ProbeAnswer] = field(default_factory=list)
    timer_moved: bool = False


def probe_command(port: int, path: str, ready_ttl_minutes: int | None = None) -> list[str]:
    url = shlex.quote(f"http://127.0.0.1:{port}{path}")
    curl = (
        f"curl -sS -o /dev/null --max-time {CURL_MAX_SECONDS}"
        f" -w '%{{http_code}} %{{time_total}}' {url}"
    )
    if ready_ttl_minutes is None:
        return [curl]
    # curl's own exit status stays the command's; the timer moves on a 2xx/3xx answer only.
    return [
        f"answer=$({curl}) && status=0 || status=$?",
        'echo "$answer"',
        'case "$answer" in [23][0-9][0-9]\\ *)',
        f"  {timer_command(ready_ttl_minutes)} >/dev/null 2>&1 && echo {TIMER_MOVED} ;;",
        "esac",
        'exit "$status"',
    ]


def parse_answer(path: str, stdout: str, stderr: str) -> ProbeAnswer:
    """curl's ``-w '%{http_code} %{time_total}'``; anything else is no answer."""
    words = stdout.strip().split()
    error = stderr.strip().splitlines()[-1] if stderr.strip() else ""
    try:
        code = int(words[0])
        latency: float | None = float(words[1])
    except (IndexError, ValueError):
        return ProbeAnswer(path, 0, None, error or f"unexpected curl output {stdout.strip()!r}")
    moved = TIMER_MOVED in words[2:]
    return ProbeAnswer(path, code, latency if code else None, error, timer_moved=moved)


# Idle sampling (issue 31): a systemd timer on the instance samples, every minute, whether
# anyone uses the preview, and writes the time to LAST_ACTIVITY when someone does. The file is
# root's, in the state dir, which no container may mount (tasks/app/compose_policy.py allows
# bind mounts below the app dir only): a PR's code can neither forge nor erase it, and one
# instance's file says nothing about another's.
LAST_ACTIVITY = f"{STATE_DIR}/last-activity"
ACTIVITY_UNIT = "pr-preview-activity"
ACTIVITY_SCRIPT = "/usr/local/lib/pr-preview/sample-activity"
SYSTEM_UNITS = "/etc/systemd/system"
ACTIVITY_INTERVAL = "1min"
ACTIVITY_PREFIX = "ACTIVITY "


def strict_port(port: object) -> int:
    """``port`` if it is a TCP port number (an int, not a bool, in 1..65535); it reaches a
    shell script and an ``ss`` filter, so nothing else passes."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ValueError(f"app port must be an integer in 1..65535, got {port!r}")
    return port


def activity_sample(port: int) -> list[str]:
    """Shell lines that sample activity now and print ``ACTIVITY <sessions> <connections>``:
    Session Manager's session workers (port forwarding and shells: one process per session) in
    the host's PID namespace — a container's processes live in another, whatever they are
    called — and TCP connections established to the app port in the host's network namespace
    (where Session Manager's port forwarding lands; containers have their own). When either is
    non-zero the time is written to :data:`LAST_ACTIVITY`."""
    filter_ = f"( sport = :{strict_port(port)} )"
    return [
        "sessions=$(pgrep -c --ns 1 --nslist pid -x ssm-session-worker) || sessions=0",
        f"established=$(ss -Htn state established {shlex.quote(filter_)}) || established=''",
        'connections=$(grep -c . <<<"$established") || connections=0',
        'if [ "$sessions" -gt 0 ] || [ "$connections" -gt 0 ]; then',
        *(
            "  " + line
            for line in write_file(LAST_ACTIVITY, "date -u +%Y-%m-%dT%H:%M:%SZ").splitlines()
        ),
        "fi",
        f'echo "{ACTIVITY_PREFIX}$sessions $connections"',
    ]


def activity_read(port: int) -> list[str]:
    """The sweeper's command: a sample now, then the last activity the timer recorded
    (``LAST-ACTIVITY <time>``, or ``none``)."""
    return [
        "set -eu",
        *activity_sample(port),
        f"last=$(head -c 40 {LAST_ACTIVITY} 2>/dev/null) || last=none",
        'echo "LAST-ACTIVITY ${last:-none}"',
    ]


def activity_timer(port: int) -> str:
    """User-data lines that install the sampler, its service and its minute timer, and start
    the timer (enabled: it starts again at every boot, after a stop and start too)."""
    q, script_path = shlex.quote, ACTIVITY_SCRIPT
    service_path, timer_path = (
        f"{SYSTEM_UNITS}/{ACTIVITY_UNIT}.{kind}" for kind in ("service", "timer")
    )
    head = ["#!/bin/bash", "# pr-preview: is anyone using this preview?", "set -eu"]
    script = "\n".join([*head, *activity_sample(port)])
    service = "\n".join(
        [
            "[Unit]",
            "Description=pr-preview activity sample (SSM sessions, connections to the app)",
            "[Service]",
            "Type=oneshot",
            f"ExecStart={script_path}",
        ]
    )
    timer = "\n".join(
        [
            "[Unit]",
            "Description=pr-preview activity sample every minute",
            "[Timer]",
            f"OnBootSec={ACTIVITY_INTERVAL}",
            f"OnUnitActiveSec={ACTIVITY_INTERVAL}",
            "AccuracySec=10s",
            "[Install]",
            "WantedBy=timers.target",
        ]
    )
    return "\n".join(
        [
            f"mkdir -p {q(script_path.rsplit('/', 1)[0])} {q(SYSTEM_UNITS)}",
            "# shellcheck disable=SC2016 # the sampler's $variables are its own to expand",
            f"printf '%s\\n' {q(script)} | put {q(script_path)}",
            f"chmod 755 {q(script_path)}",
            f"printf '%s\\n' {q(service)} | put {q(service_path)}",
            f"printf '%s\\n' {q(timer)} | put {q(timer_path)}",
            f"chmod 644 {q(service_path)} {q(timer_path)}",
            "systemctl daemon-reload",
            f"systemctl enable --now {ACTIVITY_UNIT}.timer",
        ]
    )


@dataclass(frozen=True)
class Activity:
    """What one instance said of its use: sessions and connections now, and the last time
    its timer saw any (None: never, or not readable)."""

    sessions: int
    connections: int
    last: datetime | None

    @property
    def active_now(self) -> bool:
        return self.sessions > 0 or self.connections > 0


def parse_activity(stdout: str) -> Activity | None:
    """The answer of :func:`activity_read`, or None when it is not one (never guessed)."""
    sessions = connections = None
    last: datetime | None = None
    for line in stdout.splitlines():
        words = line.split()
        if (
            line.startswith(ACTIVITY_PREFIX)
            and len(words) == 3
            and all(w.isdigit() for w in words[1:])
        ):
            sessions, connections = int(words[1]), int(words[2])
        elif words[:1] == ["LAST-ACTIVITY"] and len(words) == 2 and words[1] != "none":
            last = parse_time(words[1])
    if sessions is None or connections is None:
        return None
    return Activity(sessions, connections, last)
