"""Secrets out of every text a person or a log will read: comments, diagnoses, CLI output.

Known secrets are replaced in every encoding they may appear in (as given, URL-encoded and
decoded, the password of a URL, the pieces a broken URL parse quotes back); anything that
looks like a URL password, a GitHub token or a ``password=`` value is masked too.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import quote, unquote

MASK = "****"

_MASKS: list[tuple[re.Pattern[str], str]] = [
    # scheme://user:password@host — the password of any URL, DATABASE_URL above all
    (
        re.compile(r"(\b[a-z][a-z0-9+.-]*://[^\s:/@'\"]*:)[^\s'\"]+(@)", re.IGNORECASE),
        rf"\1{MASK}\2",
    ),
    # GitHub tokens: classic, fine-grained, OAuth, app and refresh tokens
    (re.compile(r"\bgithub_pat_[A-Za-z0-9_]{20,}"), MASK),
    (re.compile(r"\bgh[pousr]_[A-Za-z0-9]{20,}"), MASK),
    # key=value / key: value for secret-ish keys (libpq DSNs, env files, JSON)
    (
        re.compile(
            r"(?i)(\b\w*(?:password|passwd|pwd|secret|token)\w*"
            r"[\"']?\s*[=:]\s*[\"']?)(?!\*{4})[^\s\"',;&]+"
        ),
        rf"\1{MASK}",
    ),
    # a whole DATABASE_URL value that is not a URL at all
    (re.compile(r"(DATABASE_URL=)(?![a-z][a-z0-9+.-]*://)\S+", re.IGNORECASE), rf"\1{MASK}"),
    # a broken URL parse quotes a piece of the password back (runbook §5)
    (
        re.compile(
            r"(invalid integer value\s*)([\"'“”„‘’]).*?([\"'“”‘’])(\s*for connection option)"
        ),
        rf"\1\2{MASK}\3\4",
    ),
    (re.compile(r"(Port could not be cast to integer value as\s*)(['\"]).*?\2"), rf"\1\2{MASK}\2"),
    (re.compile(r"(invalid literal for int\(\) with base 10:\s*)(['\"]).*?\2"), rf"\1\2{MASK}\2"),
]
_FRAGMENT_SPLIT = re.compile(r"[/?#@:]")
MIN_FRAGMENT = 6


def secret_variants(values: Iterable[str]) -> list[str]:
    """Each secret as given, URL-encoded and decoded, its password if it is a URL, and the
    longer pieces a broken URL parse would quote back; longest first."""
    found: set[str] = set()
    for value in values:
        if not value:
            continue
        # Of a URL only the password is secret: its host must stay readable in the evidence.
        match = re.match(r"[a-z][a-z0-9+.-]*://[^:/@]*:(.+)@[^@]*$", value, re.IGNORECASE)
        secret = match.group(1) if match else value
        candidates = {value, secret, quote(secret, safe=""), unquote(secret)}
        for candidate in [secret, unquote(secret)]:
            candidates |= {
                piece for piece in _FRAGMENT_SPLIT.split(candidate) if len(piece) >= MIN_FRAGMENT
            }
        found |= {candidate for candidate in candidates if len(candidate) >= 4}
    return sorted(found, key=len, reverse=True)


def mask_secrets(text: str, secrets: Iterable[str | None] = ()) -> str:
    """``text`` with every secret-looking value and every given secret replaced by ``****``."""
    for variant in secret_variants(secret for secret in secrets if secret):
        text = text.replace(variant, MASK)
    for pattern, replacement in _MASKS:
        text = pattern.sub(replacement, text)
    return text
