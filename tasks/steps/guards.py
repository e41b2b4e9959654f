"""What the preview must not run: closed PRs, unlabelled PRs in label mode, drafts, fork PRs
not allow-listed (or, with ``fork_previews: approve``, not approved for this commit), superseded
pushes, and PRs whose changed files ask for no preview.

Pure functions over the pull request as the REST API (or the webhook) returns it, so the flow
can decide before anything is launched and the tests can feed real payloads.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tasks.github.client import GitHub, GitHubError
from tasks.inputs import label_names, path_matches
from tasks.run.approvals import approved_sha
from tasks.run.outcome import Outcome
from tasks.run.step import step


@dataclass(frozen=True)
class GuardResult:
    """The verdict (None: go ahead) and a sentence for the log and the PR comment; ``labels``:
    the pull request's labels as the guard read them (None: not known)."""

    verdict: Outcome | None
    reason: str
    labels: tuple[str, ...] | None = None

    @property
    def ok(self) -> bool:
        return self.verdict is None


def _full_name(side: Mapping[str, Any] | None) -> str | None:
    repo = (side or {}).get("repo")
    if not isinstance(repo, Mapping):
        return None
    name = repo.get("full_name")
    return str(name) if name else None


LABEL_ACTIONS = frozenset({"labeled", "unlabeled"})


def same_label(one: str | None, other: str) -> bool:
    """GitHub label names are unique regardless of case."""
    return one is not None and one.casefold() == other.casefold()


def check_trigger(
    trigger_mode: str, preview_label: str, action: str, label: str | None
) -> GuardResult:
    """Whether a label event concerns previews at all, from the configuration and the event
    alone (before any client exists). Other actions pass: the PR's labels are the guard's."""
    if action not in LABEL_ACTIONS:
        return GuardResult(None, f"{action} is not a label event")
    if trigger_mode != "label":
        return GuardResult(
            Outcome.LABEL_IGNORED,
            f"trigger_mode is {trigger_mode}: labels neither start nor stop previews",
        )
    if not same_label(label, preview_label):
        return GuardResult(
            Outcome.LABEL_IGNORED,
            f"the label {(label or '')[:50]!r} is not {preview_label!r}: nothing to do",
        )
    done = "added to" if action == "labeled" else "removed from"
    return GuardResult(None, f"the {preview_label!r} label was {done} the pull request")


def _not_labeled(which: str, required_label: str) -> GuardResult:
    return GuardResult(
        Outcome.NOT_LABELED,
        f"{which} does not carry the {required_label!r} label (trigger_mode"
        " label): no preview is launched; add the label to get one",
    )


def _draft(which: str) -> GuardResult:
    return GuardResult(
        Outcome.DRAFT,
        f"{which} is a draft: no preview is launched (skip_drafts). Mark it ready for review,"
        " or comment `/preview redeploy`, to get one",
    )


def is_fork(pull: Mapping[str, Any]) -> bool:
    """Head repository differs from the base one; a deleted head repository counts as a fork."""
    head = _full_name(pull.get("head"))
    base = _full_name(pull.get("base"))
    return head is None or base is None or head.lower() != base.lower()


def fork_allowed(repo: str, head_repo: str | None, allowed_fork_repos: Iterable[str]) -> bool:
    """The fork itself, or the base repository (admitting every fork), is allow-listed."""
    allowed = {name.lower() for name in allowed_fork_repos}
    return repo.lower() in allowed or (head_repo is not None and head_repo.lower() in allowed)


def _awaiting_approval(which: str, head_repo: str, repo: str, sha: str) -> GuardResult:
    return GuardResult(
        Outcome.AWAITING_APPROVAL,
        f"{which} comes from the fork {head_repo}: its code runs in a preview only once"
        f" someone with write access to {repo} has read this commit and approves it by"
        f" commenting `/preview approve {sha}`. Each new push waits for its own approval"
        " (fork_previews: approve)",
    )


def _refused_fork(which: str, head_repo: str, repo: str) -> GuardResult:
    return GuardResult(
        Outcome.REFUSED_FORK,
        f"{which} comes from the fork {head_repo}; previews run code from forks only when"
        f" {head_repo} (or {repo}) is in allowed_fork_repos",
    )


def _superseded(number: object, current: str, head_sha: str) -> GuardResult:
    return GuardResult(
        Outcome.SUPERSEDED,
        f"pull request #{number} now points at {current[:12]}, not {head_sha[:12]}; "
        "the run for the newer push takes over",
    )


def check_pull(
    pull: Mapping[str, Any],
    expected_repo: str,
    head_sha: str,
    allowed_fork_repos: Iterable[str] = (),
    required_label: str | None = None,
    skip_drafts: bool = False,
    fork_previews: str = "refuse",
    approved_sha: str | None = None,
) -> GuardResult:
    """Whether a run for ``head_sha`` of this PR may launch a preview.

    Checked in this order: closed (never launched), without ``required_label`` (label mode),
    a draft (with ``skip_drafts``), fork (refused unless the fork itself or the base
    repository is in ``allowed_fork_repos`` — listing the base repository admits every fork;
    with ``fork_previews: approve``, a newer push supersedes the run first, then it waits
    unless ``approved_sha`` is ``head_sha``), superseded (a newer push exists; its own run
    will do the work).
    """
    number = pull.get("number")
    base = _full_name(pull.get("base"))
    if base is not None and base.lower() != expected_repo.lower():
        raise ValueError(f"pull request #{number} belongs to {base}, not {expected_repo}")

    state = pull.get("state")
    if state != "open" or pull.get("merged"):
        what = "merged" if pull.get("merged") else (state or "in an unknown state")
        return GuardResult(
            Outcome.CLOSED, f"pull request #{number} is {what}; no preview is launched"
        )
    if required_label is not None and not any(
        same_label(name, required_label) for name in label_names(pull)
    ):
        return _not_labeled(f"pull request #{number}", required_label)
    if skip_drafts and pull.get("draft") is True:
        return _draft(f"pull request #{number}")

    current = str((pull.get("head") or {}).get("sha") or "")
    head = _full_name(pull.get("head"))
    if is_fork(pull) and not fork_allowed(expected_repo, head, allowed_fork_repos):
        if head is None:
            return GuardResult(
                Outcome.REFUSED_FORK,
                f"pull request #{number} comes from a fork that has been deleted; previews of "
                f"forks run only for repositories in allowed_fork_repos",
            )
        if fork_previews != "approve":
            return _refused_fork(f"pull request #{number}", head, expected_repo)
        if current and current != head_sha:  # never ask approval for a commit gone by
            return _superseded(number, current, head_sha)
        if approved_sha != head_sha:
            return _awaiting_approval(f"pull request #{number}", head, expected_repo, head_sha)

    if current and current != head_sha:
        return _superseded(number, current, head_sha)
    return GuardResult(None, f"pull request #{number} at {head_sha[:12]} may be previewed")


def check_event(
    repo: str,
    head_repo: str | None,
    allowed_fork_repos: Iterable[str] = (),
    required_label: str | None = None,
    labels: Sequence[str] | None = None,
    draft: bool = False,
    fork_previews: str = "refuse",
    approved: bool = False,
    head_sha: str = "",
) -> GuardResult:
    """The fork, label and draft guards from the webhook's own fields, for runs without a
    GitHub token. ``labels`` None (a run started by hand) is not checked: starting one asks for
    it. ``draft``: the event's PR is a draft and drafts are skipped. ``approved``: with
    ``fork_previews: approve``, ``head_sha`` is the commit approved."""
    labelled = labels is None or any(same_label(name, required_label or "") for name in labels)
    if required_label is not None and not labelled:
        return _not_labeled("the pull request", required_label)
    if draft:
        return _draft("the pull request")
    if head_repo and head_repo.lower() != repo.lower():
        if fork_allowed(repo, head_repo, allowed_fork_repos):
            return GuardResult(None, f"fork {head_repo} is allow-listed")
        if fork_previews != "approve":
            return _refused_fork("the pull request", head_repo, repo)
        if not approved:
            return _awaiting_approval("the pull request", head_repo, repo, head_sha)
        return GuardResult(None, f"{head_sha[:12]} of the fork {head_repo} is approved")
    return GuardResult(None, "no GitHub token: only the fork guard of the event was applied")


def check_approval(
    pull: Mapping[str, Any],
    repo: str,
    sha: str,
    allowed_fork_repos: Iterable[str],
    fork_previews: str,
) -> GuardResult:
    """Whether ``/preview approve <sha>`` approves anything: an open fork's PR not
    allow-listed, with ``fork_previews: approve``, whose head is ``sha`` now. GitHub's head,
    not the comment's, is what gets approved: a commit pushed after the comment never is."""
    number = pull.get("number")
    head = _full_name(pull.get("head"))
    current = str((pull.get("head") or {}).get("sha") or "")
    if pull.get("state") != "open":
        return GuardResult(
            Outcome.NOTHING_TO_APPROVE, f"pull request #{number} is not open: nothing to approve"
        )
    if not is_fork(pull) or fork_allowed(repo, head, allowed_fork_repos):
        return GuardResult(
            Outcome.NOTHING_TO_APPROVE,
            f"pull request #{number} needs no approval: its previews run without one",
        )
    if head is None:
        return GuardResult(
            Outcome.NOTHING_TO_APPROVE,
            f"pull request #{number} comes from a fork that has been deleted: nothing to approve",
        )
    if fork_previews != "approve":
        return GuardResult(
            Outcome.NOTHING_TO_APPROVE,
            f"previews of forks are refused here (fork_previews: {fork_previews}, and {head} is"
            " not in allowed_fork_repos): an approval would change nothing",
        )
    if current != sha:
        return GuardResult(
            Outcome.NOT_THE_HEAD,
            f"{sha[:12]} is not the head of pull request #{number} any more (it is"
            f" {current[:12]} now): nothing was approved. Read the new commit; to preview it,"
            f" comment `/preview approve {current}`",
        )
    return GuardResult(None, f"{sha[:12]} of the fork {head} may be approved")


@step(retry=False)
def guard(
    github: GitHub,
    repo: str,
    pr_number: int,
    head_sha: str,
    head_repo: str | None = None,
    allowed_fork_repos: Iterable[str] = (),
    required_label: str | None = None,
    event_labels: Sequence[str] | None = None,
    skip_drafts: bool = False,
    event_draft: bool = False,
    fork_previews: str = "refuse",
) -> GuardResult:
    """Read the pull request as it is now and decide whether this run may launch.

    ``required_label`` (label mode) and ``skip_drafts`` are checked on the PR as GitHub holds
    it now — an event's may be stale — and on ``event_labels``/``event_draft`` only without a
    token. With ``fork_previews: approve``, a fork's approval is read only for a fork."""
    if not github.enabled:
        draft = skip_drafts and event_draft
        approved = False
        if fork_previews == "approve" and head_repo and head_repo.lower() != repo.lower():
            approved = approved_sha(repo, pr_number) == head_sha
        verdict = check_event(
            repo,
            head_repo,
            allowed_fork_repos,
            required_label,
            event_labels,
            draft,
            fork_previews,
            approved,
            head_sha,
        )
        labels = None if event_labels is None else tuple(event_labels)
        return dataclasses.replace(verdict, labels=labels)
    pull = github.get_pull(repo, pr_number)
    approval = None
    if fork_previews == "approve" and is_fork(pull):
        approval = approved_sha(repo, pr_number)
    verdict = check_pull(
        pull,
        repo,
        head_sha,
        allowed_fork_repos,
        required_label,
        skip_drafts,
        fork_previews,
        approval,
    )
    return dataclasses.replace(verdict, labels=tuple(label_names(pull)))


def check_changed_files(
    pr_number: int,
    files: Sequence[str],
    changed_files: int | None,
    paths: Sequence[str],
    paths_ignore: Sequence[str],
) -> GuardResult:
    """Whether the pull request's changed ``files`` ask for a preview under ``paths`` and
    ``paths_ignore``. A list shorter than GitHub's ``changed_files`` count (its files API stops
    at 3,000) launches: an unseen file may match. The reason names counts and patterns only,
    never a file name."""
    wanted = [name for name in files if not paths or path_matches(name, paths)]
    kept = [name for name in wanted if not path_matches(name, paths_ignore)]
    if kept:
        return GuardResult(None, f"{len(kept)} of {len(files)} changed files ask for a preview")
    if changed_files is not None and changed_files > len(files):
        return GuardResult(
            None, f"GitHub listed {len(files)} of {changed_files} changed files: launching"
        )
    rules = []
    if paths:
        rules.append("paths: " + ", ".join(f"`{p}`" for p in paths))
    if paths_ignore:
        rules.append("paths_ignore: " + ", ".join(f"`{p}`" for p in paths_ignore))
    return GuardResult(
        Outcome.NO_MATCHING_PATHS,
        f"None of the {len(files)} files pull request #{pr_number} changes asks for a preview"
        f" ({'; '.join(rules)}): no preview is launched. Comment `/preview redeploy` to get"
        " one anyway.",
    )


@step(retry=False)
def check_paths(
    github: GitHub,
    repo: str,
    pr_number: int,
    paths: Sequence[str],
    paths_ignore: Sequence[str],
) -> GuardResult:
    """Read the pull request's changed files (every page) and judge them by ``paths`` and
    ``paths_ignore``. Without a token, or with neither set, every pull request asks."""
    if not (paths or paths_ignore):
        return GuardResult(None, "no path filters")
    if not github.enabled:
        return GuardResult(None, "no GitHub token: the changed files are unknown; launching")
    files = github.list_pull_files(repo, pr_number)
    names = [str(item["filename"]) for item in files if isinstance(item.get("filename"), str)]
    count = github.get_pull(repo, pr_number).get("changed_files")
    total = count if isinstance(count, int) and not isinstance(count, bool) else None
    return check_changed_files(pr_number, names, total, paths, paths_ignore)


@step(retry=False)
def confirm_draft(github: GitHub, repo: str, pr_number: int) -> GuardResult:
    """Before a teardown for ``converted_to_draft``: is the pull request still a draft? A stale
    event (it was marked ready again) must not take a live preview down."""
    if not github.enabled:
        return GuardResult(None, "no GitHub token: the converted_to_draft event is taken as it is")
    try:
        pull = github.get_pull(repo, pr_number)
    except GitHubError as exc:
        return GuardResult(
            None, f"GitHub could not confirm the PR is a draft ({exc}); tearing down"
        )
    if pull.get("state") == "open" and pull.get("draft") is not True:
        return GuardResult(
            Outcome.NOT_DRAFT,
            f"pull request #{pr_number} is ready for review on GitHub: the converted_to_draft"
            " event is stale; nothing was torn down",
        )
    return GuardResult(None, f"pull request #{pr_number} is a draft")


@step(retry=False)
def confirm_closed(github: GitHub, repo: str, pr_number: int) -> GuardResult:
    """Before a teardown: is the pull request really closed? A ``closed`` event for an open PR
    is stale or forged, and must not take a live preview down. Without a token the event is
    all there is to go by."""
    if not github.enabled:
        return GuardResult(None, "no GitHub token: the closed event is taken as it is")
    try:
        state = github.pull_state(repo, pr_number)
    except GitHubError as exc:  # after the client's retries: the event goes, as without a token
        return GuardResult(None, f"GitHub could not confirm the PR is closed ({exc}); tearing down")
    if state == "open":
        return GuardResult(
            Outcome.STILL_OPEN,
            f"pull request #{pr_number} is open on GitHub: the closed event is stale or forged;"
            " nothing was torn down",
        )
    return GuardResult(None, f"pull request #{pr_number} is closed")


@step(retry=False)
def confirm_unlabeled(github: GitHub, repo: str, pr_number: int, label: str) -> GuardResult:
    """Before a teardown for a removed label: does the PR really no longer carry it? A stale
    ``unlabeled`` event (the label was put back) must not take a live preview down."""
    if not github.enabled:
        return GuardResult(None, "no GitHub token: the unlabeled event is taken as it is")
    try:
        pull = github.get_pull(repo, pr_number)
    except GitHubError as exc:
        return GuardResult(None, f"GitHub could not confirm the label is off ({exc}); tearing down")
    if pull.get("state") == "open" and any(same_label(n, label) for n in label_names(pull)):
        return GuardResult(
            Outcome.STILL_LABELED,
            f"pull request #{pr_number} carries the {label!r} label on GitHub: the unlabeled"
            " event is stale; nothing was torn down",
        )
    return GuardResult(None, f"the {label!r} label is off pull request #{pr_number}")
