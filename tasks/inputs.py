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


PATH_GLOB_PATTERN = re.compile(r"[A-Za-z0-9_.*?/-]{1,200}")
"""A ``paths``/``paths_ignore`` pattern: letters, digits, ``_.-/`` and the wildcards ``*``,
``**`` and ``?``; no brackets, braces, ``!`` or backslash."""


def is_path_glob(value: str) -> bool:
    """A strict gitignore-style pattern: allowed characters, no empty, ``.`` or ``..`` segment
    (a trailing ``/`` for a directory is allowed), ``**`` only as a whole segment."""
    if not isinstance(value, str) or not PATH_GLOB_PATTERN.fullmatch(value):
        return False
    segments = value.strip("/").split("/") if value.strip("/") else []
    if not segments or value.startswith("//") or "//" in value:
        return False
    return all(part not in (".", "..") and ("**" not in part or part == "**") for part in segments)


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """gitignore's rules: a pattern with a ``/`` before its end is anchored at the repository's
    root, one without matches at any depth; ``*`` and ``?`` stay within a segment, ``**`` spans
    segments; a matched directory matches every file below it."""
    body = pattern.rstrip("/")
    anchored = "/" in body
    parts = []
    for index, segment in enumerate(body.lstrip("/").split("/")):
        if segment == "**":
            parts.append("(?:[^/]+/)*" if index < body.lstrip("/").count("/") else ".*")
            continue
        text = "".join(
            "[^/]*" if char == "*" else "[^/]" if char == "?" else re.escape(char)
            for char in segment
        )
        parts.append(text + "/")
    regex = "".join(parts)
    regex = regex[:-1] if regex.endswith("/") else regex
    prefix = "" if anchored else "(?:[^/]+/)*"
    # The pattern names the file itself or a directory above it.
    return re.compile(f"{prefix}{regex}(?:/.*)?")


def path_matches(path: str, patterns: Iterable[str]) -> bool:
    """Whether the repository path ``path`` matches one of the gitignore-style ``patterns``."""
    return any(_glob_regex(pattern).fullmatch(path) for pattern in patterns)
