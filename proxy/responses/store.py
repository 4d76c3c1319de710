"""Stored responses, in an embedded SQLite database: what ``GET /v1/responses/{id}``, its ``input_items`` and
``previous_response_id`` read back.

Each row keeps the response as it was answered, the input items of its request, and its conversation: every
item before it (what its ``previous_response_id`` chain held), its input and its output, without instructions
(OpenAI does not carry those over). Continuing a conversation reads one row, and a chain whose early responses
have expired or were deleted still continues.

A response belongs to the API key that created it (its digest; "" on a server without keys): every read and
delete is by id and owner, so another key's id is not found. Rows are bounded by age and by count, the oldest
going first; both are checked on every write, and an expired row is not read back even before it is pruned.

One connection serves the whole process (``:memory:`` is one database per connection), behind a lock; callers
run these methods on a worker thread. The database is opened on first use, so a server that never sees a
Responses request writes no file.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from proxy.errors import APIError

logger = logging.getLogger(__name__)

MEMORY = ":memory:"
DATABASE_NAME = "responses.sqlite3"

SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    created_at REAL NOT NULL,
    response BLOB NOT NULL,
    input_items BLOB NOT NULL,
    conversation BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS responses_by_age ON responses (created_at);
"""


@dataclass(frozen=True)
class StoredResponse:
    """One row: the response's JSON object, its input items and its whole conversation (item dicts)."""

    id: str
    owner: str
    created_at: float
    response: dict[str, Any]
    input_items: list[dict[str, Any]]
    conversation: list[dict[str, Any]]


class ResponseStore:
    def __init__(self, data_dir: str, max_age: float, max_count: int) -> None:
        """``data_dir``: the folder of the database file, or ``:memory:``; ``max_age`` in seconds and
        ``max_count`` rows, 0 for no bound."""
        self.location = data_dir if data_dir == MEMORY else str(Path(data_dir).expanduser() / DATABASE_NAME)
        self.max_age = max_age
        self.max_count = max_count
        self._lock = threading.Lock()
        self._connection: sqlite3.Connection | None = None

    @contextlib.contextmanager
    def _database(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            if self._connection is None:
                self._connection = self._open()
            try:
                with self._connection:  # one transaction: committed, or rolled back on an error
                    yield self._connection
            except sqlite3.Error as exc:
                raise self._unavailable(exc) from exc

    def _open(self) -> sqlite3.Connection:
        try:
            if self.location != MEMORY:
                Path(self.location).parent.mkdir(parents=True, exist_ok=True)
            connection = sqlite3.connect(self.location, check_same_thread=False, timeout=10, isolation_level=None)
            connection.execute("PRAGMA journal_mode=WAL")  # readers never wait for a writer, across processes too
            connection.execute("PRAGMA synchronous=NORMAL")
            connection.executescript(SCHEMA)
            connection.isolation_level = "DEFERRED"  # from here on, ``with connection`` is a transaction
        except (OSError, sqlite3.Error) as exc:
            raise self._unavailable(exc) from exc
        logger.info("stored responses are kept in %s", self.location)
        return connection

    def _unavailable(self, exc: Exception) -> APIError:
        logger.error("the response store %s failed: %s", self.location, exc)
        return APIError(
            500,
            f"The response store ({self.location}) cannot be used: {exc}; set --data-dir to a writable folder, "
            "or send store: false",
            code="response_store_unavailable",
        )

    def close(self) -> None:
        with self._lock:
            if self._connection is not None:
                self._connection.close()
                self._connection = None

    # --- rows ----------------------------------------------------------------------------------------------

    def save(self, stored: StoredResponse) -> None:
        encode = msgspec.json.encode
        with self._database() as db:
            db.execute(
                "INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?, ?, ?)",
                (
                    stored.id,
                    stored.owner,
                    stored.created_at,
                    encode(stored.response),
                    encode(stored.input_items),
                    encode(stored.conversation),
                ),
            )
            self._prune(db)

    def get(self, response_id: str, owner: str) -> StoredResponse | None:
        with self._database() as db:
            row = db.execute(
                "SELECT id, owner, created_at, response, input_items, conversation FROM responses "
                "WHERE id = ? AND owner = ? AND created_at >= ?",
                (response_id, owner, self._oldest_kept()),
            ).fetchone()
        if row is None:
            return None
        decode = msgspec.json.decode
        return StoredResponse(row[0], row[1], row[2], decode(row[3]), decode(row[4]), decode(row[5]))

    def delete(self, response_id: str, owner: str) -> bool:
        with self._database() as db:
            deleted = db.execute("DELETE FROM responses WHERE id = ? AND owner = ?", (response_id, owner)).rowcount
        return bool(deleted)

    def count(self) -> int:
        with self._database() as db:
            return int(db.execute("SELECT count(*) FROM responses").fetchone()[0])

    def _oldest_kept(self) -> float:
        return time.time() - self.max_age if self.max_age else 0.0

    def _prune(self, db: sqlite3.Connection) -> None:
        if self.max_age:
            db.execute("DELETE FROM responses WHERE created_at < ?", (self._oldest_kept(),))
        if self.max_count:
            db.execute(
                "DELETE FROM responses WHERE id IN "
                "(SELECT id FROM responses ORDER BY created_at DESC, rowid DESC LIMIT -1 OFFSET ?)",
                (self.max_count,),
            )
