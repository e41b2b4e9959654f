"""What the steps look for on the instance: the bootstrap marker files, the cloud-init log, the
port check and the on-instance shutdown timer — shared by launch, wait-ready, update and
diagnose so that the user data and every check agree."""

from __future__ import annotations

STATE_DIR = "/var/lib/pr-preview"


BOOTSTRAP_DONE = f"{STATE_DIR}/bootstrap-done"


BOOTSTRAP_FAILED = f"{STATE_DIR}/bootstrap-failed"


CLOUD_INIT_LOG = "/var/log/cloud-init-output.log"


AGENT_PING = "echo pr-preview-agent-ok"


FAILED_PREFIX = "bootstrap failed at step: "


# First stdout line: bootstrap-done | bootstrap-failed | bootstrap-pending; a failure adds
# "bootstrap failed at step: <the marker's content>". cloud-init finished without any marker
# means the script never ran or died without its trap: waiting longer cannot help.
BOOTSTRAP_CHECK = [
    f"if [ -f {BOOTSTRAP_FAILED} ]; then",
    "  echo bootstrap-failed",
    f'  echo "{FAILED_PREFIX}$(head -c 2000 {BOOTSTRAP_FAILED})"',
    f"elif [ -f {BOOTSTRAP_DONE} ]; then",
    "  echo bootstrap-done",
    "elif cloud-init status 2>/dev/null | grep -Eq 'status: (done|error)'; then",
    "  echo bootstrap-failed",
    f'  echo "{FAILED_PREFIX}cloud-init ($(cloud-init status 2>&1 | head -n 1), no pr-preview'
    ' marker)"',
    "else",
    "  echo bootstrap-pending",
    "fi",
]


PORT_CHECK_TIMEOUT_SECONDS = 3


def port_check(port: int, host: str = "127.0.0.1") -> list[str]:
    """Runbook §0's TCP check: exit 0 and ``APP PORT OPEN`` when the port accepts."""
    return [
        f"if timeout {PORT_CHECK_TIMEOUT_SECONDS} bash -c 'echo > /dev/tcp/{host}/{port}'"
        " 2>/dev/null; then",
        f'  echo "APP PORT OPEN {port}"',
        "else",
        f'  echo "APP PORT CLOSED {port}"',
        "  exit 1",
        "fi",
    ]


def timer_minutes(hours: float) -> int:
    """The on-instance shutdown timer (``shutdown -h +N``) for a TTL of ``hours``."""
    return max(1, round(hours * 60))
