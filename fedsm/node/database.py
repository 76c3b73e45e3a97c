"""The node's sqlite file: schema, WAL mode, locking, and the reply cache.

One database file per node (``node.sqlite`` in the node directory), in WAL mode so that the
operator's CLI can approve a plan while the node is running and reading it. All statements of
one node go through one connection under one lock (a node's handlers run on several threads);
writes run in ``BEGIN IMMEDIATE`` transactions with a busy timeout, so a concurrent writer in
another process makes us wait instead of fail.

The schema only grows by new tables (``CREATE TABLE IF NOT EXISTS``), so opening an older
file for writing migrates it; a read-only connection (``readonly=True``) changes nothing, and
its readers treat a table it lacks as empty (see :meth:`NodeDatabase.has_table`).
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from fedsm.core.eventschema import APPROVAL_STATUSES
from fedsm.errors import ConfigurationError

__all__ = ["DB_FILE", "PLAN_STATUSES", "NodeDatabase", "ReplyCache", "utc_now"]

DB_FILE = "node.sqlite"

#: The statuses a plan record has: the approval statuses (defined once, in the core) but
#: ``unknown`` (the node's answer for a plan it has no record of) and ``no-reply`` (the
#: researcher's, for a node that did not answer).
PLAN_STATUSES: tuple[str, ...] = tuple(sorted(APPROVAL_STATUSES - {"unknown", "no-reply"}))
_PLAN_STATUS_SQL = ", ".join(f"'{status}'" for status in PLAN_STATUSES)

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS datasets (
    dataset_id   TEXT PRIMARY KEY,
    name         TEXT NOT NULL,
    tags         TEXT NOT NULL,
    data_type    TEXT NOT NULL,
    path         TEXT NOT NULL,
    target       TEXT,
    shape        TEXT NOT NULL,
    dtypes       TEXT NOT NULL,
    sample_count INTEGER NOT NULL,
    description  TEXT NOT NULL,
    date_added   TEXT NOT NULL,
    columns      TEXT NOT NULL DEFAULT '[]'
);
CREATE TABLE IF NOT EXISTS training_plans (
    sha256      TEXT PRIMARY KEY,
    status      TEXT NOT NULL CHECK (status IN ({_PLAN_STATUS_SQL})),
    name        TEXT NOT NULL,
    source      BLOB NOT NULL,
    first_seen  TEXT NOT NULL,
    decided_at  TEXT,
    decided_by  TEXT,
    notes       TEXT NOT NULL DEFAULT '',
    origin      TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS reply_cache (
    request_id  TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    reply       BLOB NOT NULL,
    created_at  TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS witnessed_heads (
    job_id        TEXT NOT NULL,
    researcher_id TEXT NOT NULL,
    seq           INTEGER NOT NULL,
    hash          TEXT NOT NULL,
    received_at   REAL NOT NULL,
    command       TEXT NOT NULL,
    PRIMARY KEY (job_id, researcher_id, seq, hash)
) WITHOUT ROWID;
"""


def utc_now() -> str:
    """The current time as an ISO-8601 UTC string (what the registries store)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class NodeDatabase:
    """The node's sqlite file, opened once and shared by the registries of one node.

    ``durable=False`` uses ``synchronous=NORMAL`` (safe against a crash of the process, not
    of the machine): the choice for simulated nodes, where thousands of fsyncs buy nothing.

    ``readonly=True`` opens an existing file without the right to write it (the operator's
    read-only commands): no schema is created, :meth:`write` fails.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        durable: bool = True,
        busy_timeout_s: float = 10.0,
        readonly: bool = False,
    ):
        self.path = Path(path)
        self.durable = durable
        self.readonly = readonly
        self._lock = threading.RLock()
        if readonly:
            if not self.path.is_file():
                raise ConfigurationError(f"the node database {self.path} does not exist")
            self._conn = sqlite3.connect(
                f"{self.path.resolve().as_uri()}?mode=ro",
                uri=True,
                timeout=busy_timeout_s,
                isolation_level=None,
                check_same_thread=False,
            )
            return
        self._conn = sqlite3.connect(
            str(self.path),
            timeout=busy_timeout_s,
            isolation_level=None,  # autocommit; transactions are explicit
            check_same_thread=False,  # guarded by self._lock
        )
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
        if not durable:
            # Simulated nodes come by the thousand: cap each connection's page cache at
            # 256 KiB (the default lets it grow to 2 MB as the reply cache grows).
            self._conn.execute("PRAGMA cache_size=-256")
        with self.write() as conn:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)

    @contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """The connection, for reading, under the lock."""
        with self._lock:
            self._check_open()
            yield self._conn

    @contextmanager
    def write(self, *, sync: bool = True) -> Iterator[sqlite3.Connection]:
        """The connection inside a ``BEGIN IMMEDIATE`` transaction, committed on success.

        ``sync=False`` commits this one transaction without an fsync even on a durable
        database (``synchronous=NORMAL``): it survives a crash of the process at once, and a
        crash of the machine from the next synced commit on (in WAL mode that commit syncs
        every frame written before it).
        """
        with self._lock:
            self._check_open()
            if self.readonly:
                raise ConfigurationError(f"the node database {self.path} is open read-only")
            relax = self.durable and not sync
            if relax:
                self._conn.execute("PRAGMA synchronous=NORMAL")
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    yield self._conn
                except BaseException:
                    self._conn.execute("ROLLBACK")
                    raise
                self._conn.execute("COMMIT")
            finally:
                if relax:
                    self._conn.execute("PRAGMA synchronous=FULL")

    def has_table(self, name: str) -> bool:
        """Whether the file has table ``name`` (a read-only view of an older file may not)."""
        with self.read() as conn:
            row = conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)
            ).fetchone()
        return row is not None

    def _check_open(self) -> None:
        if self._conn is None:
            raise ConfigurationError(f"the node database {self.path} is closed")

    def close(self) -> None:
        """Close the connection. Idempotent."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None  # type: ignore[assignment]


# --------------------------------------------------------------------------- reply cache


class ReplyCache:
    """Encoded replies of answered train requests, keyed by request id (survives restarts).

    ``fingerprint`` identifies the request's content (without its deadline and URLs): a
    request id reused for a different request is detected instead of answered with a stale
    reply.
    """

    def __init__(self, db: NodeDatabase) -> None:
        self._db = db

    def get(self, request_id: str) -> tuple[str, bytes] | None:
        """``(fingerprint, encoded reply)`` stored for ``request_id``, or None."""
        with self._db.read() as conn:
            row = conn.execute(
                "SELECT fingerprint, reply FROM reply_cache WHERE request_id = ?", (request_id,)
            ).fetchone()
        return None if row is None else (row[0], bytes(row[1]))

    def put(self, request_id: str, fingerprint: str, reply: bytes) -> None:
        """Store a reply; the first one stored for an id stays."""
        with self._db.write() as conn:
            conn.execute(
                "INSERT OR IGNORE INTO reply_cache VALUES (?,?,?,?)",
                (request_id, fingerprint, reply, utc_now()),
            )

    def __len__(self) -> int:
        with self._db.read() as conn:
            return conn.execute("SELECT COUNT(*) FROM reply_cache").fetchone()[0]
