"""The node's witness of researchers' job logs: the heads it received, kept, exported, signed.

Every job-scoped request (plan status, train, job-end) carries the researcher's log head; the
node records ``(job, researcher, seq, hash)`` with its own clock and the command as soon as
the request is decoded, before serving it, so a request that then fails still leaves its
head. The same head delivered twice is kept once (the first ``received_at``); two hashes for
one seq are both kept: that is the evidence of a rewritten log.

The operator exports one job's heads as a :class:`~fedsm.core.witness.WitnessFile` signed
with the node's Ed25519 key (``witness_key.pem`` in the node directory, mode 0600, made at
first need): ``fedsm node witness export``.
"""

from __future__ import annotations

import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedsm.core.witness import WitnessedHead, WitnessFile, signed_body
from fedsm.errors import ConfigurationError
from fedsm.node.database import NodeDatabase
from fedsm.node.errors import NodeError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

__all__ = [
    "KEY_FILE",
    "JobWitness",
    "JobNotWitnessed",
    "WitnessStore",
    "load_or_create_key",
    "public_key_hex",
    "registry_error",
    "sign",
]

#: The node's signing key, PKCS#8 PEM, in the node directory.
KEY_FILE = "witness_key.pem"
_TABLE = "witnessed_heads"


class JobNotWitnessed(NodeError, KeyError):
    """The node holds no head of this job (it never received a request of it)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class JobWitness:
    """What the node saw of one job from one researcher (a line of ``witness list``)."""

    job_id: str
    researcher_id: str
    heads: int
    highest_seq: int
    last_received_at: float


class WitnessStore:
    """The heads a node received, in its sqlite registry (table ``witnessed_heads``)."""

    def __init__(self, db: NodeDatabase) -> None:
        self._db = db

    def record(
        self,
        job_id: str,
        researcher_id: str,
        head: dict[str, Any],
        command: str,
        *,
        received_at: float | None = None,
        sync: bool = True,
    ) -> bool:
        """Keep one received head; return False if this very head was already kept.

        ``sync=False``: no fsync for this write (see :meth:`NodeDatabase.write`); the next
        synced write of the registry makes it durable against a crash of the machine.
        """
        at = time.time() if received_at is None else float(received_at)
        with self._db.write(sync=sync) as conn:
            cur = conn.execute(
                f"INSERT OR IGNORE INTO {_TABLE} VALUES (?,?,?,?,?,?)",
                (job_id, researcher_id, int(head["seq"]), str(head["hash"]), at, command),
            )
        return cur.rowcount == 1

    def _ready(self) -> bool:
        # A read-only view of a registry made before witnessing has no table: no heads.
        return not self._db.readonly or self._db.has_table(_TABLE)

    def jobs(self) -> list[JobWitness]:
        """One summary per (job, researcher), the most recently heard first."""
        if not self._ready():
            return []
        with self._db.read() as conn:
            rows = conn.execute(
                f"SELECT job_id, researcher_id, COUNT(*), MAX(seq), MAX(received_at) "
                f"FROM {_TABLE} GROUP BY job_id, researcher_id "
                "ORDER BY MAX(received_at) DESC, job_id, researcher_id"
            ).fetchall()
        return [JobWitness(*row) for row in rows]

    def heads(self, job_id: str, researcher_id: str | None = None) -> list[WitnessedHead]:
        """The heads kept of ``job_id`` (from ``researcher_id``, or any), sorted."""
        if not self._ready():
            return []
        sql = f"SELECT seq, hash, received_at, command FROM {_TABLE} WHERE job_id = ?"
        params: tuple[str, ...] = (job_id,)
        if researcher_id is not None:
            sql += " AND researcher_id = ?"
            params += (researcher_id,)
        with self._db.read() as conn:
            rows = conn.execute(sql, params).fetchall()
        return sorted(WitnessedHead(*row) for row in rows)

    def witness_file(
        self, node_id: str, job_id: str, researcher_id: str | None = None
    ) -> WitnessFile:
        """The (unsigned) witness file of ``job_id``. Raises :class:`JobNotWitnessed`, and
        :class:`~fedsm.errors.ConfigurationError` if several researchers sent heads for this
        job id and ``researcher_id`` does not say whose to export."""
        researchers = sorted(
            j.researcher_id
            for j in self.jobs()
            if j.job_id == job_id and researcher_id in (None, j.researcher_id)
        )
        if not researchers:
            whom = f" from researcher {researcher_id}" if researcher_id is not None else ""
            raise JobNotWitnessed(f"node {node_id} never received a head of job {job_id}{whom}")
        if len(researchers) > 1:
            raise ConfigurationError(
                f"node {node_id} received heads of job {job_id} from several researchers "
                f"({', '.join(researchers)}): say whose with --researcher"
            )
        (researcher,) = researchers
        return WitnessFile(
            node_id=node_id,
            job_id=job_id,
            researcher_id=researcher,
            heads=tuple(self.heads(job_id, researcher)),
        )


# --------------------------------------------------------------------------- signing


def load_or_create_key(node_dir: str | Path) -> Ed25519PrivateKey:
    """The node's Ed25519 key from ``node_dir/witness_key.pem``, made (mode 0600) if absent.

    Two processes making it at once end with one key: the file appears whole (a private
    temporary file hard-linked into place) and the loser reads the winner's.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    path = Path(node_dir) / KEY_FILE
    if not path.exists():
        if not Path(node_dir).is_dir():
            raise ConfigurationError(f"node directory {node_dir} does not exist")
        pem = Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        tmp = path.with_name(f".{KEY_FILE}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(pem)
                out.flush()
                os.fsync(out.fileno())
            try:
                os.link(tmp, path)  # never replaces a key another process just made
            except FileExistsError:
                pass
        finally:
            tmp.unlink(missing_ok=True)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigurationError(f"{path} is not a readable private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigurationError(f"{path} holds a {type(key).__name__}, not an Ed25519 key")
    return key


def public_key_hex(key: Ed25519PrivateKey) -> str:
    """The raw 32-byte public key of ``key``, in hex (what witness files carry)."""
    from cryptography.hazmat.primitives import serialization

    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return raw.hex()


def sign(w: WitnessFile, key: Ed25519PrivateKey) -> WitnessFile:
    """``w`` carrying ``key``'s public key and its signature of :func:`signed_body` (hex)."""
    from dataclasses import replace

    keyed = replace(w, public_key=public_key_hex(key), signature=None)
    return replace(keyed, signature=key.sign(signed_body(keyed)).hex())


def registry_error(path: Path, exc: sqlite3.Error) -> ConfigurationError:
    """A clear one-line error for a registry that could not be used (locked, damaged)."""
    if "locked" in str(exc) or "busy" in str(exc):
        return ConfigurationError(
            f"the node registry {path} is locked by another process (a node in exclusive "
            "mode, or a long write); try again in a moment"
        )
    return ConfigurationError(f"could not use the node registry {path}: {exc}")
