"""The node's sqlite registries: datasets, training plans (approval) and the reply cache.

One database file per node (``node.sqlite`` in the node directory), in WAL mode so that the
operator's CLI can approve a plan while the node is running and reading it. Each registry
is a thin class over the shared connection; every statement runs under one lock (a node's
handlers run on several threads) and writes run in ``BEGIN IMMEDIATE`` transactions, with a
busy timeout so a concurrent writer in another process makes us wait instead of fail.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fedsm.errors import ConfigurationError
from fedsm.node.errors import DatasetNotRegistered, PlanNotRegistered

__all__ = [
    "DB_FILE",
    "PLAN_STATUSES",
    "NodeDatabase",
    "DatasetRegistry",
    "PlanRecord",
    "ApprovalRegistry",
    "ReplyCache",
    "utc_now",
]

DB_FILE = "node.sqlite"
PLAN_STATUSES = ("approved", "rejected", "pending")
_DATA_TYPES = ("csv", "tensors")

_SCHEMA = """
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
    status      TEXT NOT NULL CHECK (status IN ('approved', 'rejected', 'pending')),
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
"""


def utc_now() -> str:
    """The current time as an ISO-8601 UTC string (what the registries store)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class NodeDatabase:
    """The node's sqlite file, opened once and shared by the registries of one node.

    ``durable=False`` uses ``synchronous=NORMAL`` (safe against a crash of the process, not
    of the machine): the choice for simulated nodes, where thousands of fsyncs buy nothing.
    """

    def __init__(self, path: str | Path, *, durable: bool = True, busy_timeout_s: float = 10.0):
        self.path = Path(path)
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(
            str(self.path),
            timeout=busy_timeout_s,
            isolation_level=None,  # autocommit; transactions are explicit
            check_same_thread=False,  # guarded by self._lock
        )
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
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
    def write(self) -> Iterator[sqlite3.Connection]:
        """The connection inside a ``BEGIN IMMEDIATE`` transaction, committed on success."""
        with self._lock:
            self._check_open()
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def _check_open(self) -> None:
        if self._conn is None:
            raise ConfigurationError(f"the node database {self.path} is closed")

    def close(self) -> None:
        """Close the connection. Idempotent."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None  # type: ignore[assignment]


# --------------------------------------------------------------------------- datasets


_PUBLIC_DATASET_KEYS = (
    "dataset_id",
    "name",
    "tags",
    "data_type",
    "target",
    "shape",
    "dtypes",
    "columns",
    "sample_count",
    "description",
    "date_added",
)


def public_dataset(record: dict[str, Any]) -> dict[str, Any]:
    """What a researcher may see of a dataset record: everything but its path on disk."""
    return {k: record[k] for k in _PUBLIC_DATASET_KEYS}


class DatasetRegistry:
    """Datasets the node offers. A dataset matches a search when it carries all asked tags."""

    def __init__(self, db: NodeDatabase) -> None:
        self._db = db

    def add(
        self,
        *,
        name: str,
        tags: Sequence[str],
        data_type: str,
        path: str | Path,
        shape: Sequence[int],
        dtypes: Any,
        sample_count: int,
        target: str | None = None,
        description: str = "",
        dataset_id: str | None = None,
        columns: Sequence[str] = (),
    ) -> dict[str, Any]:
        """Register a dataset (metadata already computed) and return its record."""
        if data_type not in _DATA_TYPES:
            raise ConfigurationError(f"data type {data_type!r} is not one of {list(_DATA_TYPES)}")
        tags = [t.strip() for t in tags if t.strip()]
        if not tags:
            raise ConfigurationError("a dataset needs at least one tag (researchers search by tag)")
        if not name.strip():
            raise ConfigurationError("a dataset needs a name")
        record = {
            "dataset_id": dataset_id or "dataset-" + uuid.uuid4().hex[:16],
            "name": name,
            "tags": tags,
            "data_type": data_type,
            "path": str(Path(path).resolve()),
            "target": target,
            "shape": [int(n) for n in shape],
            "dtypes": dtypes,
            "columns": list(columns),
            "sample_count": int(sample_count),
            "description": description,
            "date_added": utc_now(),
        }
        try:
            with self._db.write() as conn:
                conn.execute(
                    "INSERT INTO datasets VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                    (
                        record["dataset_id"],
                        name,
                        json.dumps(tags),
                        data_type,
                        record["path"],
                        target,
                        json.dumps(record["shape"]),
                        json.dumps(dtypes),
                        record["sample_count"],
                        description,
                        record["date_added"],
                        json.dumps(record["columns"]),
                    ),
                )
        except sqlite3.IntegrityError:
            raise ConfigurationError(
                f"a dataset with id {record['dataset_id']!r} is already registered"
            ) from None
        return record

    @staticmethod
    def _row(row: tuple) -> dict[str, Any]:
        return {
            "dataset_id": row[0],
            "name": row[1],
            "tags": json.loads(row[2]),
            "data_type": row[3],
            "path": row[4],
            "target": row[5],
            "shape": json.loads(row[6]),
            "dtypes": json.loads(row[7]),
            "sample_count": row[8],
            "description": row[9],
            "date_added": row[10],
            "columns": json.loads(row[11]),
        }

    def list(self) -> list[dict[str, Any]]:
        """Every dataset record (with its path), oldest first."""
        with self._db.read() as conn:
            rows = conn.execute("SELECT * FROM datasets ORDER BY date_added, dataset_id").fetchall()
        return [self._row(r) for r in rows]

    def get(self, dataset_id: str) -> dict[str, Any]:
        """The record of ``dataset_id``; raises :class:`DatasetNotRegistered`."""
        with self._db.read() as conn:
            row = conn.execute(
                "SELECT * FROM datasets WHERE dataset_id = ?", (dataset_id,)
            ).fetchone()
        if row is None:
            raise DatasetNotRegistered(f"no dataset {dataset_id!r} on this node")
        return self._row(row)

    def search(self, tags: Sequence[str]) -> list[dict[str, Any]]:
        """Datasets carrying every tag in ``tags`` (all datasets for no tags)."""
        wanted = set(tags)
        return [r for r in self.list() if wanted <= set(r["tags"])]

    def remove(self, dataset_id: str) -> None:
        """Forget a dataset (its files are left alone); raises :class:`DatasetNotRegistered`."""
        with self._db.write() as conn:
            cur = conn.execute("DELETE FROM datasets WHERE dataset_id = ?", (dataset_id,))
        if cur.rowcount == 0:
            raise DatasetNotRegistered(f"no dataset {dataset_id!r} on this node")


# --------------------------------------------------------------------------- plans


@dataclass(frozen=True)
class PlanRecord:
    """One training plan known to the node, identified by the sha256 of its exact bytes."""

    sha256: str
    status: str
    name: str
    source: bytes
    first_seen: str
    decided_at: str | None
    decided_by: str | None
    notes: str
    origin: str

    def summary(self) -> dict[str, Any]:
        """The record without its source (for listings)."""
        return {
            "sha256": self.sha256,
            "status": self.status,
            "name": self.name,
            "first_seen": self.first_seen,
            "decided_at": self.decided_at,
            "decided_by": self.decided_by,
            "notes": self.notes,
            "origin": self.origin,
            "size": len(self.source),
        }


class ApprovalRegistry:
    """Which training plans may run on this node. Only the operator changes a decision."""

    def __init__(self, db: NodeDatabase) -> None:
        self._db = db

    def status(self, sha256: str) -> str:
        """``approved``, ``rejected``, ``pending`` or ``unknown``."""
        with self._db.read() as conn:
            row = conn.execute(
                "SELECT status FROM training_plans WHERE sha256 = ?", (sha256,)
            ).fetchone()
        return "unknown" if row is None else row[0]

    def status_of_source(self, source: bytes) -> str:
        """:meth:`status` of the plan whose exact bytes are ``source``."""
        return self.status(hashlib.sha256(source).hexdigest())

    def get(self, sha256: str) -> PlanRecord:
        """The record of a plan; raises :class:`PlanNotRegistered`."""
        with self._db.read() as conn:
            row = conn.execute(
                "SELECT * FROM training_plans WHERE sha256 = ?", (sha256,)
            ).fetchone()
        if row is None:
            raise PlanNotRegistered(f"no training plan with sha256 {sha256} on this node")
        return PlanRecord(*row[:3], bytes(row[3]), *row[4:])

    def list(self) -> list[PlanRecord]:
        """Every plan record, oldest first."""
        with self._db.read() as conn:
            rows = conn.execute(
                "SELECT * FROM training_plans ORDER BY first_seen, sha256"
            ).fetchall()
        return [PlanRecord(*r[:3], bytes(r[3]), *r[4:]) for r in rows]

    def record_pending(self, source: bytes, *, name: str, origin: str) -> str:
        """Record a plan seen in a request as pending unless already known; return its status."""
        digest = hashlib.sha256(source).hexdigest()
        with self._db.write() as conn:
            conn.execute(
                "INSERT OR IGNORE INTO training_plans "
                "(sha256, status, name, source, first_seen, origin) VALUES (?,?,?,?,?,?)",
                (digest, "pending", name, source, utc_now(), origin),
            )
            row = conn.execute(
                "SELECT status FROM training_plans WHERE sha256 = ?", (digest,)
            ).fetchone()
        return row[0]

    def decide(
        self,
        status: str,
        *,
        sha256: str | None = None,
        source: bytes | None = None,
        name: str | None = None,
        by: str,
        notes: str = "",
    ) -> PlanRecord:
        """Approve or reject (``status``) a plan given by its source bytes or a known sha256.

        A source not yet registered is added; a sha256 must already be known (the node
        cannot approve code it has never seen).
        """
        if status not in ("approved", "rejected"):
            raise ConfigurationError(f"a decision is 'approved' or 'rejected', not {status!r}")
        if (sha256 is None) == (source is None):
            raise ConfigurationError("give either the plan's file or its --sha256, not both")
        now = utc_now()
        with self._db.write() as conn:
            if source is not None:
                sha256 = hashlib.sha256(source).hexdigest()
                conn.execute(
                    "INSERT OR IGNORE INTO training_plans "
                    "(sha256, status, name, source, first_seen, origin) VALUES (?,?,?,?,?,?)",
                    (sha256, "pending", name or sha256[:12], source, now, "operator"),
                )
            cur = conn.execute(
                "UPDATE training_plans SET status = ?, decided_at = ?, decided_by = ?, "
                "notes = ?, name = COALESCE(?, name) WHERE sha256 = ?",
                (status, now, by, notes, name, sha256),
            )
            if cur.rowcount == 0:
                raise PlanNotRegistered(
                    f"no training plan with sha256 {sha256} on this node; approve it from its "
                    "file instead, or wait until a researcher's status request records it"
                )
        assert sha256 is not None
        return self.get(sha256)


# --------------------------------------------------------------------------- reply cache


class ReplyCache:
    """Encoded replies of answered train requests, keyed by request id (survives restarts).

    ``fingerprint`` identifies the request's content (without its deadline): a request id
    reused for a different request is detected instead of answered with a stale reply.
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
