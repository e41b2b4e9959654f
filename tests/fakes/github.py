"""The fake GitHub the tests drive (``local_stack.github``, which ``make demo`` serves too), and
its fixture helper."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest

from local_stack.github import (
    ALL_PERMISSIONS,
    APP_PERMISSIONS,
    FakeGitHub,
    app_key_pair,
)

__all__ = ["ALL_PERMISSIONS", "APP_PERMISSIONS", "FakeGitHub", "app_key_pair", "served_github"]


@contextlib.contextmanager
def served_github(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeGitHub]:
    """A FakeGitHub over HTTP where a run's ``github_from_config`` finds it: its URL as
    ``GITHUB_API_URL`` and a token it takes as ``GITHUB_TOKEN``."""
    from local_stack.serve import serve_handler

    fake = FakeGitHub()
    with serve_handler(fake.handle) as url:
        fake.base_url = url
        monkeypatch.setenv("GITHUB_API_URL", url)
        monkeypatch.setenv("GITHUB_TOKEN", "good-token")
        yield fake
