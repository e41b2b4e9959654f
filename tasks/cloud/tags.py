"""The tags that are a preview's state (runbook §2.4, docs/design.md) and how times are written."""

from __future__ import annotations

from datetime import UTC, datetime

TAG_PURPOSE = "Purpose"
TAG_REPO = "Repo"
TAG_PR = "PR"
TAG_SHA = "Sha"
TAG_SHUTDOWN_AT = "shutdown-at"
TAG_UPDATED_AT = "updated-at"
TAG_NAME = "Name"
TAG_KEEP = "pr-preview:keep"
# The keep label is on the PR (``keep_label``): the sweeper keeps its expiry ahead, never ends it.
TAG_PINNED = "pr-preview:pinned"
# The shutdown-at the PR was warned of (``expiry_warning_minutes``): one warning per expiry.
TAG_WARNED_FOR = "pr-preview:warned-for"
# A warm spare: running and bootstrapped, serving no PR (no Repo/PR/Sha until claimed).
TAG_SPARE = "pr-preview:spare"
SPARE = "true"  # its value on an unclaimed spare; "claimed" once a PR took it over
# A baked image: the stock AMI it was built from and when.
TAG_SOURCE_AMI = "pr-preview:source-ami"
TAG_CREATED_AT = "created-at"
# Asleep: stopped by pr-preview, and why (scheduled, idle, manual); the wake clears it.
TAG_SLEEP_STATE = "sleep-state"
TAG_SLEPT_AT = "slept-at"
TAG_WOKE_AT = "woke-at"
# What a preview's cost rests on across stops: running seconds before the current run, and
# stopped seconds of the sleeps it woke from (EC2's LaunchTime restarts at every start).
TAG_RAN_SECONDS = "ran-seconds"
TAG_SLEPT_SECONDS = "slept-seconds"
SLEEP_REASONS = ("scheduled", "idle", "manual")
# The instance's last sampled activity (an SSM session, a connection to the app port), as the
# sweeper last read it from the instance (tasks/cloud/on_instance.py): what idle time runs from.
TAG_ACTIVE_AT = "active-at"

LIVE_STATES = ("pending", "running", "stopping", "stopped")
TERMINATE_BATCH = 1000  # the most instance ids one TerminateInstances call accepts on AWS


def format_time(moment: datetime, *, precise: bool = False) -> str:
    """UTC ISO-8601, to the second as ``shutdown-at`` holds it, or to the millisecond."""
    moment = moment.astimezone(UTC)
    if precise:
        return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return moment.replace(microsecond=0).isoformat().replace("+00:00", "Z")


def parse_time(value: str | None) -> datetime | None:
    """A tag's timestamp, or None when it is missing or unparsable (never guessed)."""
    if not value:
        return None
    try:
        moment = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
