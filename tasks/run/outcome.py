"""Why a run rightly launched nothing: each ends Completed, its state named after the reason."""

from __future__ import annotations

from enum import StrEnum


class Outcome(StrEnum):
    """The value is what results and logs carry; ``state_name`` is what the Prefect UI shows."""

    CLOSED = "closed"
    REFUSED_FORK = "refused_fork"
    SUPERSEDED = "superseded"
    NO_ROOM = "no_room"
    NOT_ALLOWED = "not_allowed"
    STILL_OPEN = "still_open"
    NOT_LABELED = "not_labeled"  # trigger_mode label: the PR does not carry preview_label
    LABEL_IGNORED = "label_ignored"  # a label event that asks for nothing
    STILL_LABELED = "still_labeled"  # an unlabeled event, but GitHub says the label is there
    DRAFT = "draft"  # skip_drafts: the pull request is a draft
    NOT_DRAFT = "not_draft"  # a converted_to_draft event, but GitHub says it is ready
    DRAFT_IGNORED = "draft_ignored"  # converted_to_draft while drafts are previewed
    NO_MATCHING_PATHS = "no_matching_paths"  # paths/paths_ignore: no changed file asks for one
    NOT_PERMITTED = "not_permitted"  # a /preview command of someone without write access
    BAD_COMMAND = "bad_command"  # a /preview command outside the grammar
    BOT = "bot"  # a /preview command a bot wrote
    AWAITING_APPROVAL = "awaiting_approval"  # fork_previews approve: this commit is not approved
    NOTHING_TO_APPROVE = "nothing_to_approve"  # /preview approve where no approval is asked for
    NOT_THE_HEAD = "not_the_head"  # /preview approve of a commit the PR no longer points at

    @property
    def state_name(self) -> str:
        return self.value.replace("_", " ").title()

    @property
    def run_name_suffix(self) -> str | None:
        """What the run's name gains (``pr-7-1a2b3c4-not-labeled``) when a label decided that
        it does nothing: a push to an unlabelled PR is visible as such in the runs list."""
        if self in (Outcome.NOT_LABELED, Outcome.LABEL_IGNORED, Outcome.STILL_LABELED):
            return self.value.replace("_", "-")
        return None
