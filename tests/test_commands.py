"""The strict parser of ``/preview`` commands and the GitHub calls a command makes (against the
fake GitHub: collaborator permissions and reactions as GitHub answers them)."""

from __future__ import annotations

import pytest

from tasks.github.client import GitHub, GitHubPermissionError
from tasks.github.commands import BadCommand, Command, Verb, command_line, parse_command, usage
from tests.fakes.github import FakeGitHub

REPO = "octo-org/app"


@pytest.mark.parametrize(
    ("text", "command"),
    [
        ("/preview", Command(Verb.STATUS)),
        ("/preview redeploy", Command(Verb.REDEPLOY)),
        ("/preview stop", Command(Verb.STOP)),
        ("/preview   start ", Command(Verb.START)),
        ("/preview destroy", Command(Verb.DESTROY)),
        (f"/preview approve {'ab12' * 10}", Command(Verb.APPROVE, sha="ab12" * 10)),
        (f"/preview approve {'cd' * 32}", Command(Verb.APPROVE, sha="cd" * 32)),  # SHA-256
        ("/preview extend 8h", Command(Verb.EXTEND, 8.0)),
        ("/preview extend 90m", Command(Verb.EXTEND, 1.5)),
        ("/preview extend 72h", Command(Verb.EXTEND, 72.0)),
    ],
)
def test_the_grammar_gives_each_command(text: str, command: Command) -> None:
    assert parse_command(text, max_ttl_hours=72) == command


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("/preview launch", "`launch` is not a command"),
        ("/preview Stop", "`Stop` is not a command"),
        ("/preview stop now", "takes no argument"),
        ("/preview extend", "takes one duration"),
        ("/preview extend 8h 2h", "takes one duration"),
        ("/preview extend 8", "is not a duration"),
        ("/preview extend 0h", "is not a duration"),
        ("/preview extend -8h", "is not a duration"),
        ("/preview extend 1.5h", "is not a duration"),
        ("/preview extend 8h;reboot", "is not a duration"),
        ("/preview extend $(id)h", "is not a duration"),
        ("/preview approve", "takes the whole sha"),
        ("/preview approve 1a2b3c4", "takes the whole sha"),  # cheap to collide with
        (f"/preview approve {'AB12' * 10}", "takes the whole sha"),
        (f"/preview approve {'ab12' * 10} {'ab12' * 10}", "takes the whole sha"),
        (f"/preview approve {'ab12' * 10};id", "takes the whole sha"),
        ("/preview extend 73h", "at most 72 hours"),
        ("/preview extend 4321m", "at most 72 hours"),
        ("/preview stop" + " " * 200 + "…", "one short line"),
        ("/preview stop\x00", "one short line"),
        ("/preview st\u00f6p", "one short line"),
        ("/previewstop", "starts with `/preview`"),
    ],
)
def test_anything_else_is_a_bad_command_saying_why(text: str, why: str) -> None:
    with pytest.raises(BadCommand) as caught:
        parse_command(text, max_ttl_hours=72)
    assert why in str(caught.value)


def test_the_canonical_text_parses_back_to_the_same_command() -> None:
    approve = Command(Verb.APPROVE, sha="0f" * 20)
    for command in (Command(Verb.STATUS), Command(Verb.STOP), Command(Verb.EXTEND, 1.5), approve):
        assert parse_command(command.text(), max_ttl_hours=72) == command
    assert Command(Verb.EXTEND, 8.0).text() == "/preview extend 8h"


def test_only_a_first_line_that_starts_with_the_command_word_is_a_command() -> None:
    assert command_line("/preview stop\r\nthanks") == "/preview stop"
    assert command_line("\n  /preview \n") == "/preview"
    assert command_line("please /preview stop") is None
    assert command_line("/previews") is None
    assert command_line("") is None


def test_the_usage_lists_every_verb() -> None:
    text = usage()
    for verb in Verb:
        assert f"`/preview{'' if verb is Verb.STATUS else ' ' + verb}" in text


def _client(fake: FakeGitHub) -> GitHub:
    return GitHub("good-token", base_url=fake.base_url, transport=fake.transport)


def test_collaborator_permissions_are_read_as_github_answers_them() -> None:
    fake = FakeGitHub()
    fake.add_pull(REPO, {"number": 1, "state": "open"})
    for login, role in (("ada", "admin"), ("mo", "maintain"), ("wu", "write"), ("tri", "triage")):
        fake.add_collaborator(REPO, login, role)
    fake.add_collaborator(REPO, "rhea", "read")
    github = _client(fake)

    seen = {
        login: github.collaborator_permission(REPO, login)
        for login in ("ada", "mo", "wu", "tri", "rhea", "stranger")
    }

    assert seen == {
        "ada": "admin",
        "mo": "write",
        "wu": "write",
        "tri": "read",
        "rhea": "read",
        "stranger": "none",
    }
    asked = fake.sent("GET", "/collaborators/")
    assert [r.status for r in asked] == [200, 200, 200, 200, 200, 404]
    assert asked[-1].path == f"/repos/{REPO}/collaborators/stranger/permission"


def test_a_login_that_is_no_login_never_reaches_a_url() -> None:
    fake = FakeGitHub()
    github = _client(fake)
    for login in ("../../admin", "a/b", "pr-preview[bot]", "", "-x"):
        with pytest.raises(ValueError):
            github.collaborator_permission(REPO, login)
    assert fake.requests == []


def test_a_reaction_is_made_once_and_an_unknown_comment_is_not_found() -> None:
    fake = FakeGitHub()
    fake.add_pull(REPO, {"number": 1, "state": "open"})
    comment = fake.add_comment(REPO, 1, "/preview stop", user="ada")
    github = _client(fake)

    github.create_reaction(REPO, comment, "eyes")
    github.create_reaction(REPO, comment, "eyes")

    assert fake.reactions(REPO, comment) == [("eyes", "pr-preview[bot]")]
    assert [r.status for r in fake.sent("POST", "/reactions")] == [201, 200]
    # A write GitHub answers 404 is read as the token's want of access (tasks/github/sansio.py):
    # GitHub gives the same 404 for a comment that is gone and for one the token cannot see.
    with pytest.raises(GitHubPermissionError, match="404"):
        github.create_reaction(REPO, 999_999, "eyes")
