"""The one root of pr-preview's own errors: what went wrong, and what the PR comment says.

Every error a step raises on purpose derives from :class:`PreviewError`. Its ``diagnosis`` is
the sentence a person acts on (cause and fix, in the runbook's words); it defaults to the
message. Errors of the libraries underneath (botocore, httpx) are translated into one of these
where the step knows what they mean, and left alone where it does not.
"""

from __future__ import annotations


class PreviewError(Exception):
    """An error of pr-preview's own, with the diagnosis a person acts on."""

    def __init__(self, message: str = "", *, diagnosis: str | None = None) -> None:
        super().__init__(message)
        self._diagnosis = diagnosis

    @property
    def diagnosis(self) -> str:
        return self._diagnosis if self._diagnosis is not None else str(self)
