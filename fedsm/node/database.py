"""The node's sqlite file: schema, WAL mode, locking, and the reply cache.

One database file per node (``node.sqlite`` in the node directory), in WAL mode so that the
operator's CLI can approve a plan while the node is running and reading it. All statements of
one node go through one connection under one lock (a node's handlers run on several threads);
writes run in ``BEGIN IMMEDIATE`` transactions with a busy timeout, so a concurrent writer in
another process makes us wait instead of fail.

The schema only grows by new tables (``CREATE TABLE IF NOT EXISTS``), so opening an older
file for writing migrates it; a read-only connection (``readonly=True``) changes nothing, and
its readers treat a table it lacks as empty (see :meth:`NodeDatabase.has_table`).

sqlite's faults of the machine, not of the code, leave this module as fedsm errors with one
clear line (:func:`registry_fault`): a lock another process holds past the busy timeout is
:class:`~fedsm.node.errors.RegistryBusy` (try again), a full disk, a read-only file system or
an I/O error is :class:`RegistryIOError`. Other sqlite errors (a constraint, a bug) pass
through unchanged.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from fedsm.core.eventschema import APPROVAL_STATUSES
from fedsm.errors import ConfigurationError
from fedsm.node.errors import RegistryBusy
from fedsm.node.settings import DEFAULT_BUSY_TIMEOUT_S, NodeDirIOError

__all__ = [
    "DB_FILE",
    "PLAN_STATUSES",
    "NodeDatabase",
    "RegistryIOError",
    "ReplyCache",
    "registry_fault",
    "utc_now",
]

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


class RegistryIOError(NodeDirIOError):
    """The node's registry file could not be read or written: the disk is full, the file
    system is read-only, or the disk failed (sqlite's ``SQLITE_FULL``, ``SQLITE_IOERR``,
    ``SQLITE_READONLY``, ``SQLITE_CANTOPEN``). Nothing of the failed write was stored."""


_BUSY = ("SQLITE_BUSY", "SQLITE_LOCKED")
_IO = ("SQLITE_FULL", "SQLITE_IOERR", "SQLITE_READONLY", "SQLITE_CANTOPEN")
# Python < 3.11 has no sqlite_errorname: sqlite's messages for the same codes.
_BUSY_TEXT = ("database is locked", "database table is locked", "database is busy")
_IO_TEXT = (
    "database or disk is full",
    "disk i/o error",
    "attempt to write a readonly database",
    "unable to open database file",
)
_IO_HINT = {
    "SQLITE_FULL": "no space left on the device?",
    "SQLITE_READONLY": "a read-only file system, or no permission to write?",
    "SQLITE_CANTOPEN": "a missing directory, or no permission?",
    "SQLITE_IOERR": "no space left, a file size limit, or a failing disk?",
}


def registry_fault(
    path: Path, exc: sqlite3.Error, busy_timeout_s: float | None = None
) -> RegistryBusy | RegistryIOError | None:
    """``exc`` as a one-line fedsm error if it is a fault of the machine (a lock held by
    another process, a full or read-only disk), else None (re-raise ``exc`` as it is)."""
    name = getattr(exc, "sqlite_errorname", None) or ""
    text = str(exc)
    if name.startswith(_BUSY) or (not name and text.lower().startswith(_BUSY_TEXT)):
        waited = "" if busy_timeout_s is None else f", gave up after {busy_timeout_s:g} s"
        return RegistryBusy(
            f"the node registry {path} is locked by another process (a running node's write, "
            f"or another operator command{waited}); try again in a moment"
        )
    if name.startswith(_IO) or (not name and text.lower().startswith(_IO_TEXT)):
        hint = next((h for code, h in _IO_HINT.items() if name.startswith(code)), "")
        hint = f"; {hint}" if hint else ""
        return RegistryIOError(f"could not read or write the node registry {path}: {text}{hint}")
    return None


def utc_now() -> str:
    """The current time as an ISO-8601 UTC string (what the registries store)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class NodeDatabase:
    """The node's sqlite file, opened once and shared by the registries of one node.

    ``durable=False`` uses ``synchronous=NORMAL`` (safe against a crash of the process, not
    of the machine): the choice for simulated nodes, where thousands of fsyncs buy nothing.

    ``readonly=True`` opens an existing file without the right to write it (the operator's
    read-only commands): no schema is created, :meth:`write` fails.

    A write waits up to ``busy_timeout_s`` for a lock another process holds, then raises
    :class:`~fedsm.node.errors.RegistryBusy`; a full or read-only disk raises
    :class:`RegistryIOError` (see :func:`registry_fault`), here and in :meth:`read`/:meth:`write`.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        durable: bool = True,
        busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S,
        readonly: bool = False,
    ):
        self.path = Path(path)
        self.durable = durable
        self.readonly = readonly
        self.busy_timeout_s = busy_timeout_s
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None
        try:
            self._open()
        except sqlite3.Error as exc:
            self.close()
            fault = self._fault(exc)
            if fault is None:
                raise
            raise fault from exc
        except BaseException:
            self.close()
            raise

    def _open(self) -> None:
        busy_timeout_s = self.busy_timeout_s
        if self.readonly:
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
        self._conn.execute(f"PRAGMA synchronous={'FULL' if self.durable else 'NORMAL'}")
        if not self.durable:
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
            conn = self._check_open()
            try:
                yield conn
            except sqlite3.Error as exc:
                fault = self._fault(exc)
                if fault is None:
                    raise
                raise fault from exc

    @contextmanager
    def write(self, *, sync: bool = True) -> Iterator[sqlite3.Connection]:
        """The connection inside a ``BEGIN IMMEDIATE`` transaction, committed on success.

        ``sync=False`` commits this one transaction without an fsync even on a durable
        database (``synchronous=NORMAL``): it survives a crash of the process at once, and a
        crash of the machine from the next synced commit on (in WAL mode that commit syncs
        every frame written before it).
        """
        with self._lock:
            conn = self._check_open()
            if self.readonly:
                raise ConfigurationError(f"the node database {self.path} is open read-only")
            relax = self.durable and not sync
            try:
                if relax:
                    conn.execute("PRAGMA synchronous=NORMAL")
                try:
                    conn.execute("BEGIN IMMEDIATE")  # waits up to busy_timeout_s for a lock
                    try:
                        yield conn
                        conn.execute("COMMIT")
                    except BaseException:
                        self._rollback(conn)
                        raise
                finally:
                    if relax:
                        conn.execute("PRAGMA synchronous=FULL")
            except sqlite3.Error as exc:
                fault = self._fault(exc)
                if fault is None:
                    raise
                raise fault from exc

    @staticmethod
    def _rollback(conn: sqlite3.Connection) -> None:
        """Undo the open transaction, if sqlite has not already (it rolls back by itself
        after a full disk or an I/O error); a failing rollback does not hide the cause."""
        if conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")

    def _fault(self, exc: sqlite3.Error) -> RegistryBusy | RegistryIOError | None:
        """``exc`` as a fedsm error when it is a fault of the machine, else None."""
        return registry_fault(self.path, exc, self.busy_timeout_s)

    def has_table(self, name: str) -> bool:
        """Whether the file has table ``name`` (a read-only view of an older file may not)."""
        with self.read() as conn:
            row = conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)
            ).fetchone()
        return row is not None

    def _check_open(self) -> sqlite3.Connection:
        if self._conn is None:
            raise ConfigurationError(f"the node database {self.path} is closed")
        return self._conn

    def close(self) -> None:
        """Close the connection. Idempotent."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


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
