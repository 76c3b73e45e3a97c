"""Witness files: what one node saw of a researcher's job log, in a form an auditor can check.

Every request a researcher sends for a job carries the log's head as it stood (seq and chain
hash, see :mod:`fedsm.log`); each node records the heads it received, and the final one when
the job ends. A node operator exports them (``fedsm node witness export``) as a witness file;
``fedsm replay LOG --verify --witness FILE ...`` then checks that every witnessed head lies on
the log's chain at its seq and that the log reaches the highest one. The researcher holds the
log and can re-chain it; the heads sit with the hospitals, so a cut or a rewrite shows.

Pure core: the format only (canonical bytes, checksum, decoding). The file is canonical JSON
(keys sorted, no spaces, ASCII), self-describing (``format``), and carries the sha256 of its
body as ``checksum`` so an edited file is refused. A node may also sign the body with its
Ed25519 key (``public_key``, ``signature``); the signing and its check live with the node and
the audit, which have the cryptography package.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from fedsm.digests import is_sha256, sha256_hex
from fedsm.errors import FedsmError

__all__ = [
    "WITNESS_FORMAT",
    "WitnessError",
    "WitnessFile",
    "WitnessedHead",
    "decode_witness",
    "encode_witness",
    "signed_body",
]

WITNESS_FORMAT = "fedsm-witness/1"
#: A witness file holds at most this many heads (a job sends a few per round).
MAX_HEADS = 1_000_000


class WitnessError(FedsmError, ValueError):
    """A witness file that is not one, or was edited (its checksum or signature fails)."""


@dataclass(frozen=True, order=True)
class WitnessedHead:
    """One head a node received: the job log's record ``seq`` had chain hash ``hash``.

    ``received_at`` is the node's clock (seconds since the epoch); ``command`` the request
    that carried it (``training-plan-status``, ``train``, ``job-end``).
    """

    seq: int
    hash: str
    received_at: float
    command: str


@dataclass(frozen=True)
class WitnessFile:
    """The heads one node witnessed of one job, sorted by (seq, hash, received_at)."""

    node_id: str
    job_id: str
    researcher_id: str
    heads: tuple[WitnessedHead, ...]
    public_key: str | None = None
    signature: str | None = None

    @property
    def highest(self) -> WitnessedHead | None:
        """The head of highest seq (the last one the node saw)."""
        return max(self.heads, key=lambda h: (h.seq, h.received_at)) if self.heads else None


def _body(w: WitnessFile) -> dict[str, Any]:
    return {
        "format": WITNESS_FORMAT,
        "node_id": w.node_id,
        "job_id": w.job_id,
        "researcher_id": w.researcher_id,
        "heads": [
            {"seq": h.seq, "hash": h.hash, "received_at": h.received_at, "command": h.command}
            for h in sorted(w.heads)
        ],
        "public_key": w.public_key,
    }


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def signed_body(w: WitnessFile) -> bytes:
    """The bytes a node signs and the checksum covers: the canonical body (no checksum, no
    signature)."""
    return _canonical(_body(w))


def encode_witness(w: WitnessFile) -> bytes:
    """The witness file's bytes: canonical JSON with its checksum (and signature, if any)."""
    body = _body(w)
    data = _canonical(body)
    return _canonical({**body, "checksum": sha256_hex(data), "signature": w.signature}) + b"\n"


def _need(cond: bool, what: str) -> None:
    if not cond:
        raise WitnessError(what)


def decode_witness(data: bytes) -> WitnessFile:
    """Read a witness file; raise :class:`WitnessError` naming what is wrong (not JSON, not a
    witness, a field of the wrong type, a checksum that does not match the body)."""
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WitnessError(f"not a witness file (not JSON: {exc})") from None
    _need(type(doc) is dict, "not a witness file (not a JSON object)")
    _need(doc.get("format") == WITNESS_FORMAT, f"not a {WITNESS_FORMAT} file")
    keys = {"format", "node_id", "job_id", "researcher_id", "heads", "public_key"}
    _need(set(doc) == keys | {"checksum", "signature"}, f"fields must be {sorted(keys)}")
    for name in ("node_id", "job_id", "researcher_id"):
        _need(type(doc[name]) is str and doc[name] != "", f"{name} must be a non-empty string")
    _need(doc["public_key"] is None or type(doc["public_key"]) is str, "bad public_key")
    _need(doc["signature"] is None or type(doc["signature"]) is str, "bad signature")
    raw = doc["heads"]
    _need(type(raw) is list and len(raw) <= MAX_HEADS, "heads must be a list")
    heads = []
    for i, h in enumerate(raw):
        ok = (
            type(h) is dict
            and set(h) == {"seq", "hash", "received_at", "command"}
            and type(h["seq"]) is int
            and 0 <= h["seq"] < 2**63
            and is_sha256(h["hash"])
            and type(h["received_at"]) in (int, float)
            and math.isfinite(h["received_at"])
            and type(h["command"]) is str
        )
        _need(ok, f"head {i} is not {{seq, hash, received_at, command}}")
        heads.append(WitnessedHead(h["seq"], h["hash"], float(h["received_at"]), h["command"]))
    w = WitnessFile(
        node_id=doc["node_id"],
        job_id=doc["job_id"],
        researcher_id=doc["researcher_id"],
        heads=tuple(sorted(heads)),
        public_key=doc["public_key"],
        signature=doc["signature"],
    )
    expected = sha256_hex(signed_body(w))
    _need(
        doc["checksum"] == expected,
        f"the witness file of {w.node_id} was edited: its checksum {str(doc['checksum'])[:16]}... "
        f"does not match its content ({expected[:16]}...)",
    )
    return w
