"""The keep label (``keep_label``): while a pull request carries it, its preview is pinned.

Pinned is a tag, ``pr-preview:pinned=true``: the sweeper never ends such a preview for its TTL
and keeps its expiry — the ``shutdown-at`` tag and the on-instance timer, moved together —
between half a TTL and a TTL ahead (``tasks.cloud.expiry.renewal``), so the timer agrees with
the tag and still ends the instance should the sweeper stop. Taking the label off writes
``false`` and restarts the TTL from that moment (never past ``max_ttl_hours``). A closed pull
request's preview goes as any other's.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from tasks.cloud.aws import AwsClients
from tasks.cloud.expiry import hours_from, pinned_hours, renewal, set_expiry
from tasks.cloud.instances import Preview, describe_preview
from tasks.cloud.tags import TAG_PINNED
from tasks.config import PreviewConfig
from tasks.github.client import GitHub
from tasks.inputs import label_names
from tasks.run.outcome import Outcome
from tasks.run.prefect_context import run_logger
from tasks.run.step import step

if TYPE_CHECKING:
    from mypy_boto3_ec2.type_defs import TagTypeDef

logger = logging.getLogger(__name__)

LABEL_ACTIONS = ("labeled", "unlabeled")


@dataclass(frozen=True)
class PinVerdict:
    """The verdict (None: go ahead) and a sentence for the log."""

    verdict: Outcome | None
    reason: str

    @property
    def ok(self) -> bool:
        return self.verdict is None


def carries(labels: list[str] | tuple[str, ...], label: str) -> bool:
    """GitHub label names are unique regardless of case."""
    return any(name.casefold() == label.casefold() for name in labels)


def check_keep_event(keep_label: str | None, action: str, label: str | None) -> PinVerdict:
    """Whether a label event is about the keep label, from the configuration and the event
    alone (before any client exists)."""
    if action not in LABEL_ACTIONS:
        return PinVerdict(Outcome.LABEL_IGNORED, f"{action} is not a label event")
    if keep_label is None:
        return PinVerdict(Outcome.LABEL_IGNORED, "keep_label is off: no label pins a preview")
    if not carries((label or "",), keep_label):
        return PinVerdict(
            Outcome.LABEL_IGNORED,
            f"the label {(label or '')[:50]!r} is not {keep_label!r}: nothing to pin",
        )
    done = "added to" if action == "labeled" else "removed from"
    return PinVerdict(None, f"the {keep_label!r} label was {done} the pull request")


def check_pull_labels(pull: Mapping[str, Any], keep_label: str, *, on: bool) -> PinVerdict:
    """The pull request as GitHub holds it now agrees with the event: open, and carrying the
    label (``on``) or not. A stale event — the label put back, or taken off again — and a
    closed pull request change nothing."""
    number = pull.get("number")
    if pull.get("state") != "open":
        return PinVerdict(Outcome.CLOSED, f"pull request #{number} is closed: nothing to pin")
    has = carries(tuple(label_names(pull)), keep_label)
    if on and not has:
        return PinVerdict(
            Outcome.NOT_LABELED,
            f"pull request #{number} no longer carries the {keep_label!r} label on GitHub: the"
            " labeled event is stale; nothing was pinned",
        )
    if not on and has:
        return PinVerdict(
            Outcome.STILL_LABELED,
            f"pull request #{number} carries the {keep_label!r} label on GitHub: the unlabeled"
            " event is stale; nothing was unpinned",
        )
    return PinVerdict(None, f"GitHub agrees: the {keep_label!r} label is {'on' if on else 'off'}")


@step(retry=False)
def confirm_keep_label(
    github: GitHub, repo: str, pr_number: int, keep_label: str, *, on: bool
) -> PinVerdict:
    """:func:`check_pull_labels` on the pull request as GitHub holds it now (the client
    retries by itself); without a token the event is taken as it is."""
    if not github.enabled:
        return PinVerdict(None, "no GitHub token: the label event is taken as it is")
    return check_pull_labels(github.get_pull(repo, pr_number), keep_label, on=on)


@step(needs_lock=True)
def pin_preview(clients: AwsClients, settings: PreviewConfig, preview: Preview) -> datetime | None:
    """Tag the preview pinned, its expiry renewed when less than half a TTL is left (the timer
    on a running instance first). Returns its ``shutdown-at``."""
    hours = pinned_hours(settings.ttl_hours, settings.max_ttl_hours)
    until = renewal(preview, datetime.now(UTC), hours)
    pinned: list[TagTypeDef] = [{"Key": TAG_PINNED, "Value": "true"}]
    if until is None:
        clients.ec2.create_tags(Resources=[preview.instance_id], Tags=pinned)
    else:
        set_expiry(
            clients.ec2, clients.ssm, preview, until, poll=settings.poll_seconds, tags=pinned
        )
    shutdown_at = until or preview.shutdown_at
    run_logger(logger).info("%s pinned, shutdown-at %s", preview.instance_id, shutdown_at)
    return shutdown_at


@step(needs_lock=True)
def unpin_preview(clients: AwsClients, settings: PreviewConfig, preview: Preview) -> datetime:
    """Tag the preview unpinned and restart its TTL from now (never past ``max_ttl_hours``):
    the timer on a running instance first, then ``shutdown-at``."""
    until = hours_from(datetime.now(UTC), pinned_hours(settings.ttl_hours, settings.max_ttl_hours))
    set_expiry(
        clients.ec2,
        clients.ssm,
        preview,
        until,
        poll=settings.poll_seconds,
        tags=[{"Key": TAG_PINNED, "Value": "false"}],
    )
    run_logger(logger).info("%s unpinned, shutdown-at %s", preview.instance_id, until)
    return until


@step(needs_lock=True)
def follow_label(
    clients: AwsClients, settings: PreviewConfig, instance_id: str, labels: list[str] | None
) -> bool | None:
    """A just-deployed preview pinned when its pull request carries the keep label (as the
    run's guard read them), unpinned when a pin outlived the label. The deploy has just set the
    full TTL, so unpinning only writes the tag. Returns whether it is pinned; None when the
    labels are unknown (no token and no event) or no label pins."""
    keep_label = settings.keep_label
    if keep_label is None or labels is None:
        return None
    preview = describe_preview(clients.ec2, instance_id)
    if preview is None:
        return None
    wanted = carries(tuple(labels), keep_label)
    if wanted:
        pin_preview.fn(clients, settings, preview)
    elif preview.pinned:
        clients.ec2.create_tags(
            Resources=[instance_id], Tags=[{"Key": TAG_PINNED, "Value": "false"}]
        )
        run_logger(logger).info("%s unpinned: the %r label is off", instance_id, keep_label)
    return wanted
