"""The transport's generic verbs against an in-memory GitHub: pages, writes, retries."""

from __future__ import annotations

import httpx
import pytest

from tasks.github.http import GitHubHTTP
from tasks.github.sansio import GitHubError, GitHubPermissionError, GitHubUnavailable

BASE = "https://api.github.com"
TOKEN = "ghp_transport_secret"


def http(transport: httpx.MockTransport, sleeps: list[float] | None = None) -> GitHubHTTP:
    return GitHubHTTP(
        TOKEN, BASE, transport=transport, sleep=(sleeps if sleeps is not None else []).append
    )


def test_paginate_follows_next_links_with_the_query_only_once() -> None:
    seen: list[httpx.URL] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request.url)
        page = int(request.url.params.get("page", "1"))
        links = {"Link": f'<{BASE}/items?page={page + 1}>; rel="next"'} if page < 3 else {}
        return httpx.Response(200, json=[{"n": page}], headers=links)

    items = list(http(httpx.MockTransport(answer)).paginate("/items", params={"state": "all"}))
    assert [item["n"] for item in items] == [1, 2, 3]
    assert seen[0].params["per_page"] == "100" and seen[0].params["state"] == "all"
    assert [url.params.get("page") for url in seen[1:]] == ["2", "3"]


def test_paginate_never_takes_the_token_to_another_host() -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        assert request.url.host == "api.github.com"
        return httpx.Response(200, json=[], headers={"Link": '<https://evil.test/x>; rel="next"'})

    with pytest.raises(GitHubError, match="another host"):
        list(http(httpx.MockTransport(answer)).paginate("/items"))


def test_a_refused_delete_names_the_permission_and_not_the_token() -> None:
    sent: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(403, json={"message": f"token {TOKEN} may not"})

    with pytest.raises(GitHubPermissionError) as raised:
        http(httpx.MockTransport(answer)).delete("/repos/o/r/x", permission="contents: write")
    assert [request.method for request in sent] == ["DELETE"]
    assert sent[0].headers["Authorization"] == f"Bearer {TOKEN}"
    assert "contents: write" in str(raised.value) and TOKEN not in str(raised.value)


def test_a_dropped_connection_is_retried_then_given_up_without_the_token() -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError(f"refused while sending {TOKEN}")

    sleeps: list[float] = []
    with pytest.raises(GitHubUnavailable) as raised:
        http(httpx.MockTransport(answer), sleeps).post("/repos/o/r/x", {"a": 1})
    assert len(sleeps) == 3 and TOKEN not in str(raised.value)
