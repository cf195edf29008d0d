"""The MQTT outbox on disk: an append-only SQLite journal (WAL mode) of QoS 1 events.

    journal = Journal(path)                  # creates the file; takes an exclusive lock
    for jid, topic, payload in journal.entries(): ...   # left over from an earlier run
    jid = journal.append(topic, payload)     # committed before it returns
    journal.remove_through(jid)              # PUBACKed: this entry and all before it
    journal.close()

One row per event, in publication order (`id` increases). A row is committed before
`append` returns, so an event the publisher accepted survives a SIGKILL of the daemon;
with `synchronous = NORMAL` (WAL) a commit is not fsynced, so an operating-system crash
or power loss may lose the last commits (a process crash does not).

One process at a time: the connection runs in `locking_mode = EXCLUSIVE` and takes the
write lock at open, so a second daemon pointed at the same file fails at start
(`ConfigError` naming `mqtt.journal`) instead of interleaving two outboxes.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from pathlib import Path

from streamd.errors import ConfigError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL
)
"""


class Journal:
    """See the module docstring. Not thread-safe: use it from the event loop only."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # autocommit (isolation_level None): every statement is its own transaction.
            self._db = sqlite3.connect(self.path, isolation_level=None, timeout=0.5)
            self._db.execute("PRAGMA locking_mode = EXCLUSIVE")
            mode = self._db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode != "wal":
                raise sqlite3.OperationalError(f"journal_mode is {mode}, not wal")
            self._db.execute("PRAGMA synchronous = NORMAL")
            # After a checkpoint the WAL is cut back to 1 MiB (it would keep its peak).
            self._db.execute("PRAGMA journal_size_limit = 1048576")
            self._db.execute(_SCHEMA)  # a write: takes (and keeps) the exclusive lock
        except sqlite3.Error as exc:
            raise ConfigError("mqtt.journal", f"cannot open {self.path}: {exc}") from exc
        except OSError as exc:
            raise ConfigError("mqtt.journal", f"cannot create {self.path.parent}: "
                                              f"{exc.strerror}") from exc

    def entries(self) -> list[tuple[int, str, bytes]]:
        """Every row, oldest first: (id, topic, payload)."""
        rows = self._db.execute("SELECT id, topic, payload FROM outbox ORDER BY id")
        return [(int(i), str(t), bytes(p)) for i, t, p in rows]

    def append(self, topic: str, payload: bytes) -> int:
        """Write one event (committed when this returns); its id."""
        cur = self._db.execute("INSERT INTO outbox (topic, payload) VALUES (?, ?)",
                               (topic, payload))
        assert cur.lastrowid is not None
        return int(cur.lastrowid)

    def remove_through(self, jid: int) -> None:
        """Delete the row `jid` and every older one (they were acknowledged)."""
        self._db.execute("DELETE FROM outbox WHERE id <= ?", (jid,))

    @property
    def size_bytes(self) -> int:
        """Bytes on disk: the database plus its write-ahead log."""
        total = 0
        for suffix in ("", "-wal"):
            with contextlib.suppress(OSError):
                total += os.stat(f"{self.path}{suffix}").st_size
        return total

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._db.close()
