"""The node's registries: the datasets it offers and the training plans it may run.

Both live in the node's sqlite file (:mod:`fedsm.node.database`), so the operator's CLI and a
running node see the same records. A plan is identified by the sha256 of its exact bytes and
its source is kept, so an operator can read what was approved. Operators name plans by a
unique prefix of that digest (:meth:`ApprovalRegistry.resolve`) and see them listed by the
training-plan classes their source defines (:func:`plan_classes`: parsed, never imported).

A plan's source is stored only up to ``max_plan_bytes`` (:class:`PlanTooLarge` past it, and
nothing is stored), and at most ``max_pending_plans`` plans wait for a decision (a plan seen
past it is not recorded and stays ``unknown``): a researcher's requests can not grow the
node's registry without bound. A digest is stored once whatever the number of requests.
"""

from __future__ import annotations

import ast
import json
import logging
import re
import sqlite3
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedsm.digests import sha256_hex
from fedsm.errors import ConfigurationError
from fedsm.node.database import NodeDatabase, utc_now
from fedsm.node.errors import (
    AmbiguousPlanDigest,
    DatasetNotRegistered,
    NodeError,
    PlanNotRegistered,
)
from fedsm.node.settings import DEFAULT_MAX_PENDING_PLANS, DEFAULT_MAX_PLAN_BYTES

__all__ = [
    "DatasetRegistry",
    "PlanRecord",
    "PlanTooLarge",
    "ApprovalRegistry",
    "public_dataset",
    "plan_classes",
    "short_digests",
    "MIN_PREFIX",
]

#: The fewest hex digits of a digest prefix an operator may give.
MIN_PREFIX = 4
#: Digits of a digest shown in listings (more when two plans share them).
SHORT_DIGEST = 12
_PLAN_BASE = "TorchTrainingPlan"
_HEX_RE = re.compile(r"^[0-9a-f]{1,64}$")

_DATA_TYPES = ("csv", "tensors")

log = logging.getLogger(__name__)


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


def _check_no_conflict(
    name: str, tags: Sequence[str], other_id: str, other_name: str, other_tags: Sequence[str]
) -> None:
    """Refuse a dataset a search could not tell from one already registered: same name, or
    tags that are a subset or superset of another dataset's (a researcher's search would
    then match both, and a round trains one dataset per node)."""
    if name == other_name:
        raise ConfigurationError(f"a dataset named {name!r} is already registered ({other_id})")
    mine, theirs = set(tags), set(other_tags)
    if mine <= theirs or theirs <= mine:
        raise ConfigurationError(
            f"tags {sorted(mine)} conflict with those of dataset {other_id} ({other_name!r}: "
            f"{sorted(theirs)}): a search could match both; give this dataset a tag of its own"
        )


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
                for other_id, other_name, other_tags in conn.execute(
                    "SELECT dataset_id, name, tags FROM datasets"
                ):
                    _check_no_conflict(name, tags, other_id, other_name, json.loads(other_tags))
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


def _base_name(node: ast.expr) -> str | None:
    """``B`` for a base written ``B``, ``m.B`` or ``B[...]``; None for anything else."""
    if isinstance(node, ast.Subscript):
        node = node.value
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def plan_classes(source: bytes | str) -> list[str] | None:
    """Names of the classes ``source`` defines that subclass ``TorchTrainingPlan``, found by
    parsing it (never importing it: approving a plan must not run it). Subclasses of such a
    class defined in the same file count too. None if ``source`` is not valid Python."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError, UnicodeDecodeError):
        return None
    classes = [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)]
    plans: list[str] = []
    known = {_PLAN_BASE}
    changed = True
    while changed:  # a subclass may come before its base in the file
        changed = False
        for cls in classes:
            if cls.name in plans:
                continue
            if any(_base_name(b) in known for b in cls.bases):
                plans.append(cls.name)
                known.add(cls.name)
                changed = True
    order = {cls.name: cls.lineno for cls in classes}
    return sorted(plans, key=lambda name: order[name])


def short_digests(digests: Sequence[str], length: int = SHORT_DIGEST) -> dict[str, str]:
    """Each digest's first ``length`` digits, longer where two digests would share them."""
    unique = sorted(set(digests))
    while length < 64 and len({d[:length] for d in unique}) < len(unique):
        length += 1
    return {d: d[:length] for d in unique}


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

    @property
    def plan_classes(self) -> list[str] | None:
        """The ``TorchTrainingPlan`` subclasses the source defines (see :func:`plan_classes`)."""
        return plan_classes(self.source)

    def summary(self) -> dict[str, Any]:
        """The record without its source (for listings)."""
        return {
            "sha256": self.sha256,
            "status": self.status,
            "name": self.name,
            "plan_classes": self.plan_classes or [],
            "first_seen": self.first_seen,
            "decided_at": self.decided_at,
            "decided_by": self.decided_by,
            "notes": self.notes,
            "origin": self.origin,
            "size": len(self.source),
        }


class PlanTooLarge(NodeError):
    """A training plan's source is larger than the node stores (``max_plan_bytes``);
    nothing was stored. ``size`` and ``limit`` are in bytes."""

    def __init__(self, message: str, *, size: int, limit: int) -> None:
        super().__init__(message)
        self.size = size
        self.limit = limit


class ApprovalRegistry:
    """Which training plans may run on this node. Only the operator changes a decision.

    ``max_plan_bytes`` caps the size of a source stored (:class:`PlanTooLarge` past it);
    ``max_pending_plans`` caps how many undecided plans :meth:`record_pending` keeps (the
    node's settings of the same names).
    """

    def __init__(
        self,
        db: NodeDatabase,
        *,
        max_plan_bytes: int = DEFAULT_MAX_PLAN_BYTES,
        max_pending_plans: int = DEFAULT_MAX_PENDING_PLANS,
    ) -> None:
        self._db = db
        self.max_plan_bytes = max_plan_bytes
        self.max_pending_plans = max_pending_plans

    def check_size(self, source: bytes) -> None:
        """Raise :class:`PlanTooLarge` if ``source`` is over ``max_plan_bytes``."""
        if len(source) > self.max_plan_bytes:
            raise PlanTooLarge(
                f"training plan {sha256_hex(source)} is {len(source)} bytes, over this "
                f"node's limit of {self.max_plan_bytes} bytes (max_plan_bytes); not stored",
                size=len(source),
                limit=self.max_plan_bytes,
            )

    def status(self, sha256: str) -> str:
        """``approved``, ``rejected``, ``pending`` or ``unknown``."""
        with self._db.read() as conn:
            row = conn.execute(
                "SELECT status FROM training_plans WHERE sha256 = ?", (sha256,)
            ).fetchone()
        return "unknown" if row is None else row[0]

    def status_of_source(self, source: bytes) -> str:
        """:meth:`status` of the plan whose exact bytes are ``source``."""
        return self.status(sha256_hex(source))

    def get(self, sha256: str) -> PlanRecord:
        """The record of a plan; raises :class:`PlanNotRegistered`."""
        with self._db.read() as conn:
            row = conn.execute(
                "SELECT * FROM training_plans WHERE sha256 = ?", (sha256,)
            ).fetchone()
        if row is None:
            raise PlanNotRegistered(f"no training plan with sha256 {sha256} on this node")
        return PlanRecord(*row[:3], bytes(row[3]), *row[4:])

    def resolve(self, prefix: str) -> str:
        """The full sha256 of the one plan whose digest starts with ``prefix``.

        Raises :class:`PlanNotRegistered` when none does and :class:`AmbiguousPlanDigest`
        when several do (or :class:`ConfigurationError` for a prefix that is not hex digits).
        """
        wanted = prefix.strip().lower()
        if not _HEX_RE.match(wanted):
            raise ConfigurationError(
                f"{prefix!r} is not a plan digest or digest prefix (hex digits, at most 64)"
            )
        if len(wanted) < MIN_PREFIX and len(wanted) != 64:
            raise ConfigurationError(
                f"digest prefix {prefix!r} is too short: give at least {MIN_PREFIX} digits"
            )
        with self._db.read() as conn:
            rows = conn.execute(
                "SELECT sha256 FROM training_plans WHERE substr(sha256, 1, ?) = ? "
                "ORDER BY sha256 LIMIT 3",
                (len(wanted), wanted),
            ).fetchall()
        if not rows:
            raise PlanNotRegistered(
                f"no training plan whose digest starts with {wanted} on this node"
            )
        if len(rows) > 1:
            shown = ", ".join(r[0][: len(wanted) + 4] + "..." for r in rows[:2])
            more = " and more" if len(rows) > 2 else ""
            raise AmbiguousPlanDigest(
                f"digest prefix {wanted} matches several plans ({shown}{more}); give more digits"
            )
        return rows[0][0]

    def list(self) -> list[PlanRecord]:
        """Every plan record, oldest first."""
        with self._db.read() as conn:
            rows = conn.execute(
                "SELECT * FROM training_plans ORDER BY first_seen, sha256"
            ).fetchall()
        return [PlanRecord(*r[:3], bytes(r[3]), *r[4:]) for r in rows]

    def record_pending(self, source: bytes, *, name: str, origin: str) -> str:
        """Record a plan seen in a request as pending unless already known; return its status.

        Raises :class:`PlanTooLarge` (nothing stored) for a source over ``max_plan_bytes``.
        With ``max_pending_plans`` plans already pending, a new plan is not recorded (a
        warning is logged) and its status stays ``unknown``.
        """
        self.check_size(source)
        digest = sha256_hex(source)
        with self._db.write() as conn:
            row = conn.execute(
                "SELECT status FROM training_plans WHERE sha256 = ?", (digest,)
            ).fetchone()
            if row is not None:
                return row[0]
            (pending,) = conn.execute(
                "SELECT COUNT(*) FROM training_plans WHERE status = 'pending'"
            ).fetchone()
            if pending >= self.max_pending_plans:
                log.warning(
                    "%d training plans await a decision (max_pending_plans): plan %s (%s) is "
                    "not recorded; approve or reject pending plans with fedsm node plan",
                    pending,
                    digest,
                    origin,
                )
                return "unknown"
            conn.execute(
                "INSERT INTO training_plans "
                "(sha256, status, name, source, first_seen, origin) VALUES (?,?,?,?,?,?)",
                (digest, "pending", name, source, utc_now(), origin),
            )
        return "pending"

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

        A source not yet registered is added (:class:`PlanTooLarge` over ``max_plan_bytes``);
        a sha256 must already be known (the node cannot approve code it has never seen).
        """
        if status not in ("approved", "rejected"):
            raise ConfigurationError(f"a decision is 'approved' or 'rejected', not {status!r}")
        if (sha256 is None) == (source is None):
            raise ConfigurationError("give either the plan's file or its --sha256, not both")
        if source is not None:
            self.check_size(source)
        now = utc_now()
        with self._db.write() as conn:
            if source is not None:
                sha256 = sha256_hex(source)
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
