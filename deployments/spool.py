"""Nothing lost at the door: the receiver's durable spool of accepted deliveries.

GitHub does not redeliver a failed delivery by itself, so a receiver that answers 502 while
Prefect is down loses the push. With a spool the receiver writes each accepted event to a
SQLite file (``synchronous=FULL``: on disk before GitHub hears 2xx) and posts pending events to
Prefect in arrival order — now, on the next delivery, every few seconds, and after a restart.
An event is marked posted only once Prefect took it; if the receiver dies in between, it is
posted again and Prefect drops the duplicate by its id (the delivery GUID): exactly once.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS deliveries (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id TEXT NOT NULL UNIQUE,
    event TEXT NOT NULL,
    accepted_at TEXT NOT NULL,
    posted_at TEXT
)
"""


@dataclass(frozen=True)
class Spooled:
    seq: int
    event: dict[str, Any]


class Spool:
    """A SQLite file of events, each pending until it is marked posted."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(SCHEMA)
        path.chmod(0o600)  # events name repositories and people: not for every local user

    def put(self, event: dict[str, Any]) -> bool:
        """Keep ``event`` (on disk when this returns); False when its id was already here."""
        with self._lock:
            cursor = self._db.execute(
                "INSERT OR IGNORE INTO deliveries (event_id, event, accepted_at) VALUES (?, ?, ?)",
                (str(event["id"]), json.dumps(event), datetime.now(UTC).isoformat()),
            )
            return cursor.rowcount == 1

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
                (datetime.now(UTC).isoformat(), seq),
            )

    def close(self) -> None:
        with self._lock:
            self._db.close()
