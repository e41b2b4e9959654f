"""The commands a pull request's writers give in a comment (``/preview extend 8h``), and the one
strict parser a comment's text reaches.

A fixed grammar, no I/O: ``/preview`` alone, or ``/preview <verb>`` with ``extend`` taking one
duration (``8h``, ``90m``) bounded by ``max_ttl_hours`` and ``approve`` the commit's whole sha
(an abbreviation is cheap to collide with). Anything else is a ``BadCommand`` whose
message lists the commands. The webhook mapping keeps only a comment's first line
(``command_line``); nothing of it goes further than ``parse_command``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from tasks.run.errors import PreviewError

PREFIX = "/preview"
MAX_COMMAND_CHARS = 200
"""Longer first lines are cut and marked with ``…``, which no command contains."""
_PRINTABLE = re.compile(r"[\x20-\x7e]*")
_DURATION = re.compile(r"([1-9][0-9]{0,3})([hm])")
_WHOLE_SHA = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")


class Verb(StrEnum):
    STATUS = "status"
    REDEPLOY = "redeploy"
    STOP = "stop"
    START = "start"
    EXTEND = "extend"
    DESTROY = "destroy"
    APPROVE = "approve"


USAGE: tuple[tuple[str, str], ...] = (
    ("/preview", "say how the preview is (the sticky comment is brought up to date)"),
    ("/preview redeploy", "launch the pull request's head afresh (drafts and path filters too)"),
    ("/preview stop", "stop the instance; it keeps its disk and its expiry"),
    ("/preview start", "start a stopped preview again"),
    ("/preview extend 8h", "move the expiry to that long from now (`90m` works too)"),
    ("/preview destroy", "terminate the preview now"),
    ("/preview approve <sha>", "preview this commit of a fork, read and approved by you"),
)


def usage() -> str:
    """The commands as a Markdown table, for a reply."""
    rows = [f"| `{text}` | {what} |" for text, what in USAGE]
    return "\n".join(["| command | what it does |", "| --- | --- |", *rows])


class BadCommand(PreviewError):
    """A ``/preview`` comment outside the grammar: the message says what was wrong."""


@dataclass(frozen=True)
class Command:
    verb: Verb
    hours: float | None = None  # extend: how long from now
    sha: str | None = None  # approve: the commit approved

    def text(self) -> str:
        """The command as written in canonical form (``/preview extend 8h``)."""
        if self.verb is Verb.STATUS:
            return PREFIX
        if self.sha is not None:
            return f"{PREFIX} {self.verb} {self.sha}"
        if self.hours is None:
            return f"{PREFIX} {self.verb}"
        minutes = round(self.hours * 60)
        return f"{PREFIX} {self.verb} " + (
            f"{minutes // 60}h" if minutes % 60 == 0 else f"{minutes}m"
        )


def command_line(body: str) -> str | None:
    """The comment's first line when it is a ``/preview`` command (cut at
    ``MAX_COMMAND_CHARS``, marked ``…``), else None: other comments are no concern of ours."""
    lines = body.strip().splitlines()
    line = lines[0].strip() if lines else ""
    words = line.split()
    if not words or words[0] != PREFIX:
        return None
    return line if len(line) <= MAX_COMMAND_CHARS else line[:MAX_COMMAND_CHARS] + "…"


def parse_command(text: str, max_ttl_hours: float) -> Command:
    """The command ``text`` gives, or ``BadCommand`` saying why it gives none."""
    if len(text) > MAX_COMMAND_CHARS or not _PRINTABLE.fullmatch(text):
        raise BadCommand("a command is one short line of plain ASCII")
    words = text.split()
    if not words or words[0] != PREFIX:
        raise BadCommand(f"a command starts with `{PREFIX}`")
    if len(words) == 1:
        return Command(Verb.STATUS)
    verbs = {verb.value for verb in Verb} - {Verb.STATUS.value}
    if words[1] not in verbs:
        raise BadCommand(f"`{words[1][:40]}` is not a command")
    verb = Verb(words[1])
    arguments = words[2:]
    if verb is Verb.APPROVE:
        if len(arguments) != 1 or not _WHOLE_SHA.fullmatch(arguments[0]):
            raise BadCommand(
                f"`{PREFIX} approve` takes the whole sha of the commit approved (40 hex digits,"
                " as the pull request's preview comment gives it)"
            )
        return Command(verb, sha=arguments[0])
    if verb is not Verb.EXTEND:
        if arguments:
            raise BadCommand(f"`{PREFIX} {verb}` takes no argument")
        return Command(verb)
    if len(arguments) != 1:
        raise BadCommand(f"`{PREFIX} extend` takes one duration, like `8h` or `90m`")
    found = _DURATION.fullmatch(arguments[0])
    if found is None:
        raise BadCommand(
            f"`{arguments[0][:40]}` is not a duration: a whole number of hours or minutes,"
            " like `8h` or `90m`"
        )
    hours = int(found.group(1)) / (1 if found.group(2) == "h" else 60)
    if hours > max_ttl_hours:
        raise BadCommand(
            f"a preview may be extended by at most {max_ttl_hours:g} hours from now (max_ttl_hours)"
        )
    return Command(verb, hours)
