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

    @property
    def state_name(self) -> str:
        return self.value.replace("_", " ").title()
