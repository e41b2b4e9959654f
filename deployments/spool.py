"""Nothing lost at the door, nothing taken twice: the receiver's record of accepted deliveries.

GitHub does not redeliver a failed delivery by itself, so a receiver that answers 502 while
Prefect is down loses the push. With a spool file the receiver writes each accepted event to
SQLite (``synchronous=FULL``: on disk before GitHub hears 2xx) and posts pending events to
Prefect in arrival order — now, on the next delivery, every few seconds, and after a restart.
An event is marked posted only once Prefect took it; if the receiver dies in between, it is
posted again and Prefect drops the duplicate by its id: exactly once. Without a file the same
record lives in memory, only to recognise repeats.

A delivery is known by the SHA-256 of its signed body, not by ``X-GitHub-Delivery``: the
signature does not cover that header, so a body replayed under a new delivery id is still the
same delivery. A repeat of one still waiting, or posted less than ``repeat_after`` ago, is a
duplicate and is not emitted again. A later repeat — GitHub's *Redeliver*, pressed because the
preview never started — is emitted again under a new event id (Prefect would drop the old one);
the flows are idempotent under the PR's lock, so a repeat can only redo what is already done.
Posted rows are pruned after ``keep`` (a week, as long as Prefect keeps events by default):
a row pruned sooner would let a later repeat go out under the delivery id that Prefect still
holds, and Prefect would drop it.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

SCHEMA = """
CREATE TABLE IF NOT EXISTS deliveries (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id TEXT NOT NULL UNIQUE,
    event TEXT NOT NULL,
    accepted_at TEXT NOT NULL,
    posted_at TEXT
)
"""
INDEXES = (
    "CREATE INDEX IF NOT EXISTS deliveries_by_body ON deliveries (body_sha256, seq)",
    "CREATE INDEX IF NOT EXISTS deliveries_by_posted ON deliveries (posted_at)",
)
REPEAT_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://github.com/pr-preview/repeats")

Clock = Callable[[], datetime]


@dataclass(frozen=True)
class Spooled:
    seq: int
    event: dict[str, Any]


@dataclass(frozen=True)
class Admission:
    """What the spool made of one delivery.

    ``new``: first time seen; ``repeat``: seen before and re-queued under a new event id
    (``repeat_of`` the first one); ``duplicate``: seen before and not queued again
    (``pending`` when the earlier one still waits for Prefect)."""

    outcome: Literal["new", "repeat", "duplicate"]
    seq: int
    event: dict[str, Any]
    repeat_of: str | None = None
    pending: bool = False
    first_accepted_at: str | None = None


class Spool:
    """A SQLite record of events, each pending until it is marked posted; ``None``: in memory."""

    def __init__(
        self,
        path: Path | None,
        *,
        repeat_after: timedelta = timedelta(seconds=60),
        keep: timedelta = timedelta(days=7),
        clock: Clock | None = None,
    ) -> None:
        if not timedelta(0) <= repeat_after <= keep:
            raise ValueError("repeat_after must be between 0 and keep")
        self.path = path
        self.repeat_after, self.keep = repeat_after, keep
        self._clock = clock or (lambda: datetime.now(UTC))
        self._lock = threading.Lock()
        if path is not None:
            _private_file(path)  # before SQLite opens it: its -wal and -shm copy its mode
        self._db = sqlite3.connect(
            ":memory:" if path is None else path, check_same_thread=False, isolation_level=None
        )
        if path is not None:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(deliveries)")}
        if "body_sha256" not in columns:  # a spool written before deliveries were known by body
            self._db.execute("ALTER TABLE deliveries ADD COLUMN body_sha256 TEXT")
        for index in INDEXES:
            self._db.execute(index)
        if path is not None:
            for companion in _companions(path):
                if companion.exists():
                    companion.chmod(0o600)

    def admit(self, event: dict[str, Any], body_sha256: str) -> Admission:
        """Keep ``event`` (on disk when this returns) unless it repeats a delivery too recent."""
        now = self._clock()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                admission = self._admit(event, body_sha256, now)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        return admission

    def _admit(self, event: dict[str, Any], body_sha256: str, now: datetime) -> Admission:
        earlier = self._db.execute(
            "SELECT seq, event_id, accepted_at, posted_at FROM deliveries"
            " WHERE body_sha256 = ? ORDER BY seq DESC LIMIT 1",
            (body_sha256,),
        ).fetchone()
        repeat_of: str | None = None
        if earlier is not None:
            seq, event_id, _, posted_at = earlier
            first = self._first_accepted(body_sha256)
            if posted_at is None or now - datetime.fromisoformat(posted_at) < self.repeat_after:
                stored = dict(event, id=event_id)
                return Admission(
                    "duplicate", seq, stored, pending=posted_at is None, first_accepted_at=first
                )
            repeat_of = event_id
            event = dict(event, id=str(uuid.uuid5(REPEAT_NAMESPACE, f"{event_id}@{_stamp(now)}")))
        elif self._db.execute(
            "SELECT 1 FROM deliveries WHERE event_id = ?", (str(event["id"]),)
        ).fetchone():  # the same delivery id on another body: not a redelivery by GitHub
            event = dict(
                event, id=str(uuid.uuid5(REPEAT_NAMESPACE, f"{event['id']}/{body_sha256}"))
            )
        cursor = self._db.execute(
            "INSERT INTO deliveries (event_id, event, accepted_at, body_sha256)"
            " VALUES (?, ?, ?, ?)",
            (str(event["id"]), json.dumps(event), _stamp(now), body_sha256),
        )
        seq = int(cursor.lastrowid or 0)
        return Admission("repeat" if repeat_of else "new", seq, event, repeat_of=repeat_of)

    def _first_accepted(self, body_sha256: str) -> str | None:
        row = self._db.execute(
            "SELECT accepted_at FROM deliveries WHERE body_sha256 = ? ORDER BY seq LIMIT 1",
            (body_sha256,),
        ).fetchone()
        return str(row[0]) if row else None

    def pending(self, limit: int = 100) -> list[Spooled]:
        """Events not yet posted, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, event FROM deliveries WHERE posted_at IS NULL ORDER BY seq LIMIT ?",
                (limit,),
            ).fetchall()
        return [Spooled(int(seq), json.loads(text)) for seq, text in rows]

    def posted(self, event_id: str) -> bool:
        with self._lock:
            row = self._db.execute(
                "SELECT posted_at FROM deliveries WHERE event_id = ?", (event_id,)
            ).fetchone()
        return row is not None and row[0] is not None

    def mark_posted(self, seq: int) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE deliveries SET posted_at = ? WHERE seq = ?",
                (_stamp(self._clock()), seq),
            )

    def forget(self, seq: int) -> None:
        """Drop an event that never reached Prefect (answered 502): GitHub may send it again."""
        with self._lock:
            self._db.execute("DELETE FROM deliveries WHERE seq = ? AND posted_at IS NULL", (seq,))

    def prune(self) -> int:
        """Delete events posted more than ``keep`` ago; pending ones always stay."""
        cutoff = _stamp(self._clock() - self.keep)
        with self._lock:
            cursor = self._db.execute(
                "DELETE FROM deliveries WHERE posted_at IS NOT NULL AND posted_at < ?", (cutoff,)
            )
        return int(cursor.rowcount)

    def count(self) -> int:
        with self._lock:
            row = self._db.execute("SELECT count(*) FROM deliveries").fetchone()
        return int(row[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _stamp(moment: datetime) -> str:
    """A UTC time whose text sorts as the time does (SQLite compares the text)."""
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


def _companions(path: Path) -> list[Path]:
    return [path.with_name(path.name + suffix) for suffix in ("-wal", "-shm", "-journal")]


def _private_file(path: Path) -> None:
    """Create ``path`` readable by its owner only, in a directory made 0700 if we make it:
    the events name repositories and people."""
    missing = [parent for parent in (path.parent, *path.parent.parents) if not parent.exists()]
    for directory in reversed(missing):
        directory.mkdir(mode=0o700, exist_ok=True)
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
    path.chmod(0o600)
