"""What a repository name, a pull request number and a commit sha may look like.

Every value from a webhook, a flow parameter or the command line is checked here before it
reaches a tag filter, a URL path, a shell or a file name: whole-string matches (``$`` would let a
trailing newline through), and no ``.`` or ``..`` segment.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

_SEGMENT = re.compile(r"[A-Za-z0-9_.-]{1,100}")
SHA_PATTERN = re.compile(r"[0-9a-f]{7,40}|[0-9a-f]{64}")
"""A SHA-1 commit id (abbreviated to at least 7, or whole), or a whole SHA-256 one."""
LOGIN_PATTERN = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,38})")
"""A person's GitHub login: letters, digits and hyphens, at most 39 (a bot's ``[bot]`` is not)."""


def is_repo(value: str) -> bool:
    """``owner/name`` with GitHub's characters, neither segment ``.`` or ``..``."""
    parts = value.split("/")
    return len(parts) == 2 and all(
        _SEGMENT.fullmatch(part) and part not in (".", "..") for part in parts
    )


def is_sha(value: str) -> bool:
    """7 to 40 lowercase hex digits (SHA-1), or 64 (a SHA-256 repository's commit)."""
    return SHA_PATTERN.fullmatch(value) is not None


def is_login(value: str) -> bool:
    """A person's GitHub login, safe in a URL path and an @-mention."""
    return isinstance(value, str) and LOGIN_PATTERN.fullmatch(value) is not None


def is_bot(login: str) -> bool:
    """An App's bot user (``<slug>[bot]``): GitHub gives no person brackets in a login."""
    return login.lower().endswith("[bot]")


def check_inputs(repo: str, pr_number: int, head_sha: str | None = None) -> None:
    """Refuse bad flow parameters before any AWS call, saying what was expected."""
    if not isinstance(repo, str) or not is_repo(repo):
        raise ValueError(f"repo must be 'owner/name', got {repo!r}")
    if isinstance(pr_number, bool) or not isinstance(pr_number, int) or pr_number < 1:
        raise ValueError(f"pr_number must be a positive integer, got {pr_number!r}")
    if head_sha is not None and (not isinstance(head_sha, str) or not is_sha(head_sha)):
        raise ValueError(f"head_sha must be 7-40 or 64 lowercase hex digits, got {head_sha!r}")


def is_repo_pattern(value: str) -> bool:
    """``owner/name`` or ``owner/*``."""
    owner, slash, name = value.partition("/")
    return bool(slash) and (is_repo(value) or (name == "*" and is_repo(f"{owner}/x")))


def repo_allowed(repo: str, patterns: Iterable[str]) -> bool:
    """Whether ``repo`` matches one of ``patterns``: case-insensitive, whole segments
    (``acme/*`` admits ``acme/shop``; ``acme/shop`` does not admit ``acme/shop-evil``)."""
    owner, _, name = repo.lower().partition("/")
    for pattern in patterns:
        want_owner, _, want_name = pattern.lower().partition("/")
        if want_owner == owner and want_name in ("*", name):
            return True
    return False


def label_names(pull: Mapping[str, Any]) -> list[str]:
    """The names of the labels a pull request (REST API or webhook form) carries."""
    labels = pull.get("labels")
    if not isinstance(labels, list):
        return []
    return [
        str(item["name"])
        for item in labels
        if isinstance(item, Mapping) and isinstance(item.get("name"), str)
    ]
