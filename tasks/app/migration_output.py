"""What a migration's output says: whether waiting could fix the failure, and the line a person
reads first — shared by the migrate step and the in-place deploy's one command."""

from __future__ import annotations

import re

from tasks.app.masking import mask_secrets

# Output that says waiting will not help: stop retrying and let the diagnosis speak.
PERMANENT_FAILURES = re.compile(
    r"invalid integer value .* for connection option \"port\""
    r"|Port could not be cast to integer"
    r"|password authentication failed"
    r"|No such service"
    r"|no configuration file provided"
    r"|executable file not found"
    r"|No module named '?alembic"
    r"|alembic\.util\.exc\.CommandError"
    r"|Can't locate revision"
    # SQLAlchemy's own parse of a DATABASE_URL whose password is not URL-encoded
    r"|invalid literal for int\(\) with base 10"
    # the database rejected a revision's SQL: the same revision fails the same way again
    r"|sqlalchemy\.exc\.(?:ProgrammingError|DataError|IntegrityError|NotSupportedError)",
    re.IGNORECASE,
)


def permanent_failures_ere() -> str:
    """:data:`PERMANENT_FAILURES` as a POSIX extended regex, for ``grep -Ei`` on the instance."""
    return PERMANENT_FAILURES.pattern.replace("(?:", "(").replace('\\"', '"')


def last_error(output: str) -> str:
    """The line a person reads first in a failed migration's output: the exception at the end
    of a traceback, else the last line; masked, as it goes into messages and comments."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"^[\w.]+(?:Error|Exception|Exit)\b.*:", line)]
    return mask_secrets((errors or lines or [""])[-1])[:500]
