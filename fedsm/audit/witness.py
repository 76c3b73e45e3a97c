"""The log against its writer: heads written down elsewhere, checked against the log's chain.

The hash chain of a job log (:mod:`fedsm.log`) catches damage, not the researcher who holds
the log: cutting the last rounds off, or rewriting a record and re-chaining every record
after it, gives a log that verifies. What the researcher can not re-chain is a head someone
else kept: every job-scoped request carries the log's head (``{"seq", "hash"}``), the nodes
keep the heads they received and export them as witness files (:mod:`fedsm.core.witness`,
``fedsm node witness export``). This module checks a log against them:

- :class:`WitnessAudit` (``fedsm replay LOG --verify --witness FILE ...``): each file must
  decode (an edited file fails its checksum), be of this log's job, and carry a valid Ed25519
  signature when it has one (``--witness-key NODE=HEX`` pins a node's key: the file must then
  be signed with that key). Then every witnessed head must lie on the log's chain at its seq
  (else the log was rewritten at or before that seq) and the log must reach the highest
  witnessed seq (else records were cut off).
- :func:`expected_head_check` (``--expect-head SEQ:HASH``): one head given by hand, e.g. one
  ``fedsm replay LOG`` printed earlier (``head: seq N hash H``) and published elsewhere.

Seq 0's hash is the log's genesis hash (the hash of its header), the head of an empty log.
Read-only like every audit tool: the log and the witness files are only read.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fedsm.audit.checks import AuditFinding
from fedsm.core import events as ev
from fedsm.core.witness import WitnessedHead, WitnessError, WitnessFile, decode_witness, signed_body
from fedsm.log.format import HEADER_SIZE, genesis_hash
from fedsm.log.read import Finding, LogError, scan

__all__ = [
    "WITNESS_CHECK",
    "Chain",
    "LoadedWitness",
    "WitnessAudit",
    "expected_head_check",
    "head_finding",
    "load_witness",
    "log_head",
    "parse_head",
    "parse_key",
    "read_chain",
    "verify_signature",
]

#: (name, what it proves, how to run it): listed as "not checked" without ``--witness``.
WITNESS_CHECK = (
    "witnesses",
    "the log's integrity against its writer",
    "give --witness FILE from each node",
)

_HEX64 = re.compile(r"[0-9a-fA-F]{64}")


def _time(ts: float) -> str:
    try:
        return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="seconds")
    except (OverflowError, OSError, ValueError):
        return repr(ts)


# --------------------------------------------------------------------------- the log's chain


@dataclass(frozen=True)
class Chain:
    """The chain hashes of a log's good records, by seq (``hashes[0]``: the genesis hash), with
    what the witness check needs of its ``JobCreated``."""

    path: Path
    hashes: list[bytes]
    offsets: list[int]
    size: int
    job_id: str | None
    researcher_id: str | None
    nodes: tuple[str, ...]
    #: The log ends with the job's end (completed, failed, cancelled): nodes were sent the
    #: final head (job-end), so a complete witness vouches for the last record.
    ended: bool = False

    @property
    def last_seq(self) -> int:
        return len(self.hashes) - 1

    @property
    def head(self) -> tuple[int, str]:
        """``(seq, hex chain hash)`` of the last good record (seq 0: the genesis hash)."""
        return self.last_seq, self.hashes[-1].hex()


def _genesis(path: Path) -> bytes:
    with open(path, "rb") as f:  # read-only, like scan
        return genesis_hash(f.read(HEADER_SIZE))


def read_chain(path: str | Path) -> Chain:
    """The chain of the log at ``path`` (its good records; a torn tail is left out, as a
    writer opening the log would drop it). Raises :class:`~fedsm.log.LogError` for a log that
    does not read."""
    path = Path(path)
    view = scan(path)
    genesis = _genesis(path)
    created: Any = None
    if view.records and isinstance(view.records[0].event, ev.JobCreated):
        created = view.records[0].event
    return Chain(
        path=path,
        hashes=[genesis, *(r.hash for r in view.records)],
        offsets=[0, *(r.offset for r in view.records)],
        size=path.stat().st_size,
        job_id=created.job_id if created else None,
        researcher_id=created.researcher_id if created else None,
        nodes=tuple(created.nodes) if created else (),
        ended=bool(view.records)
        and isinstance(view.records[-1].event, (ev.JobCompleted, ev.JobFailed, ev.JobCancelled)),
    )


def log_head(path: str | Path, records: Sequence[Any]) -> tuple[int, str]:
    """The head of the log at ``path`` whose good records are ``records``: ``(seq, hex)``."""
    if records:
        return records[-1].seq, records[-1].hash.hex()
    return 0, _genesis(Path(path)).hex()


def head_finding(chain: Chain, seq: int, digest: str) -> str | None:
    """``None`` if the log's record ``seq`` has chain hash ``digest``; else what the log has
    there: ``"seq S hash H"`` or ``"the log ends at seq L"``."""
    if seq > chain.last_seq:
        return f"the log ends at seq {chain.last_seq}"
    found = chain.hashes[seq].hex()
    return None if found == digest.lower() else f"seq {seq} hash {found}"


# --------------------------------------------------------------------------- arguments


def parse_head(text: str) -> tuple[int, str]:
    """``SEQ:HASH`` (``--expect-head``): a seq and a 64-hex chain hash."""
    seq, sep, digest = text.partition(":")
    if not sep or not seq.strip().isdigit() or not _HEX64.fullmatch(digest.strip()):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not SEQ:HASH (a seq and the 64-hex chain hash `fedsm replay` prints "
            "as 'head: seq N hash H')"
        )
    return int(seq), digest.strip().lower()


def parse_key(text: str) -> tuple[str, str]:
    """``NODE=HEXKEY`` (``--witness-key``): a node id and its raw Ed25519 public key in hex."""
    node, sep, key = text.partition("=")
    if not sep or not node or not _HEX64.fullmatch(key.strip()):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not NODE=HEXKEY (a node id and its 32-byte Ed25519 public key as hex)"
        )
    return node, key.strip().lower()


# --------------------------------------------------------------------------- --expect-head


def expected_head_check(seq: int, digest: str) -> Callable[[Path], list[Finding]]:
    """A check (``(path) -> findings``): the log has record ``seq`` with chain hash
    ``digest``."""

    def check_expected_head(path: Path) -> list[Finding]:
        try:
            chain = read_chain(path)
        except LogError as exc:
            return [
                AuditFinding(
                    0, seq, f"head: not checked, the log does not read ({exc})", True, "head"
                )
            ]
        found = head_finding(chain, seq, digest)
        if found is None:
            return []
        if seq > chain.last_seq:
            what = (
                f"head: the expected head is at seq {seq}, but the log ends at seq "
                f"{chain.last_seq}: records were cut off (or this is an older copy)"
            )
            offset = chain.size
        else:
            what = (
                f"head: the log's record seq {seq} is not the expected one: the log was "
                f"rewritten at or before seq {seq}"
            )
            offset = chain.offsets[seq]
        return [AuditFinding(offset, seq, what, True, "head", f"seq {seq} hash {digest}", found)]

    return check_expected_head


# --------------------------------------------------------------------------- witness files


@dataclass(frozen=True)
class LoadedWitness:
    """One ``--witness`` file: its content, or why it was refused (``refused``, with what was
    expected and found)."""

    path: Path
    witness: WitnessFile | None
    refused: str | None = None
    expected: str | None = None
    found: str | None = None

    @property
    def signed(self) -> bool:
        return self.witness is not None and self.witness.signature is not None


def verify_signature(w: WitnessFile, pinned: str | None) -> tuple[str, str, str] | None:
    """``None`` if ``w`` is acceptable as to its signature; else ``(why, expected, found)``.

    Unsigned files are accepted unless a key is pinned for the node; a signed one must name
    its public key (the pinned one, if any) and verify with it.
    """
    if w.signature is None:
        if pinned is not None:
            return (
                f"it is not signed, but --witness-key pins a key for {w.node_id}",
                f"a signature by {pinned}",
                "no signature",
            )
        return None
    if w.public_key is None:
        return ("it is signed but names no public key", "a public_key", "none")
    if pinned is not None and w.public_key.lower() != pinned:
        return (
            f"it is signed with another key than the one pinned for {w.node_id}",
            f"public key {pinned}",
            f"public key {w.public_key}",
        )
    try:
        key_bytes = bytes.fromhex(w.public_key)
        signature = bytes.fromhex(w.signature)
    except ValueError:
        return ("its public key or signature is not hex", "hex", "other text")
    if len(key_bytes) != 32 or len(signature) != 64:
        return (
            "its public key or signature has the wrong length for Ed25519",
            "a 32-byte key and a 64-byte signature",
            f"a {len(key_bytes)}-byte key and a {len(signature)}-byte signature",
        )
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    except ImportError:
        return (
            "its signature can't be checked: the cryptography package is not installed "
            "(pip install cryptography)",
            "a checked signature",
            "not checked",
        )
    try:
        Ed25519PublicKey.from_public_bytes(key_bytes).verify(signature, signed_body(w))
    except (InvalidSignature, ValueError):
        return (
            f"its signature does not verify with its public key {w.public_key[:16]}...: the "
            "file was not signed by that key as it stands",
            "a valid Ed25519 signature of the file's body",
            "an invalid signature",
        )
    return None


def load_witness(path: str | Path, pinned_keys: Mapping[str, str]) -> LoadedWitness:
    """Read and decode one witness file and check its signature (not yet against a log)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        return LoadedWitness(path, None, f"it can't be read ({exc.strerror or exc})")
    try:
        w = decode_witness(data)
    except WitnessError as exc:
        return LoadedWitness(path, None, str(exc))
    bad = verify_signature(w, pinned_keys.get(w.node_id))
    if bad is not None:
        return LoadedWitness(path, w, *bad)
    return LoadedWitness(path, w)


def _described(h: WitnessedHead) -> str:
    return f"seq {h.seq} hash {h.hash} (received {_time(h.received_at)}, {h.command})"


class WitnessAudit:
    """The witness check of one audit: the given files, loaded once; :meth:`check` is a check
    (``(path) -> findings``) for :func:`fedsm.audit.replay.verify_all`."""

    def __init__(
        self, files: Sequence[str | Path], pinned_keys: Mapping[str, str] | None = None
    ) -> None:
        self.pinned_keys = {n: k.lower() for n, k in (pinned_keys or {}).items()}
        self.loaded = [load_witness(f, self.pinned_keys) for f in files]
        self.highest: int | None = None  # the highest seq an accepted file witnessed

    @property
    def checks(self) -> tuple[Callable[[Path], list[Finding]], ...]:
        return (self.check,)

    def check(self, path: Path) -> list[Finding]:
        """Every file accepted, of this log's job; every witnessed head on the log's chain."""
        try:
            chain = read_chain(path)
        except LogError as exc:
            return [
                AuditFinding(
                    0,
                    0,
                    f"witnesses: not checked, the log does not read ({exc})",
                    False,
                    "witnesses",
                )
            ]
        findings: list[Finding] = []
        accepted: list[LoadedWitness] = []
        for i, item in enumerate(self.loaded):
            w = item.witness
            if item.refused is None and w is not None and chain.job_id not in (None, w.job_id):
                item = self.loaded[i] = LoadedWitness(
                    item.path,
                    w,
                    f"it is of job {w.job_id}, this log is of job {chain.job_id}",
                    f"job {chain.job_id}",
                    f"job {w.job_id}",
                )
            refused, expected, found = item.refused, item.expected, item.found
            if refused is not None or w is None:
                findings.append(
                    AuditFinding(
                        0,
                        0,
                        f"witness {item.path} refused: {refused}",
                        True,
                        "witnesses",
                        expected,
                        found,
                    )
                )
                continue
            accepted.append(item)
            findings.extend(self._heads(chain, item, w))
        seen = {item.witness.node_id for item in accepted if item.witness is not None}
        for node in sorted(set(self.pinned_keys) - seen):
            findings.append(
                AuditFinding(
                    0,
                    0,
                    f"witnesses: a key is pinned for {node}, but no witness file of "
                    f"{node} was accepted: the auditor expects {node}'s witness, and whoever "
                    "handed the files over left it out",
                    True,
                    "witnesses",
                )
            )
        for node in [n for n in chain.nodes if n not in seen and n not in self.pinned_keys]:
            findings.append(
                AuditFinding(
                    0,
                    0,
                    f"witnesses: no witness file of {node}, one of the job's nodes, was given "
                    "or accepted",
                    False,
                    "witnesses",
                )
            )
        heads = [h for item in accepted if item.witness for h in item.witness.heads]
        self.highest = max((h.seq for h in heads), default=None)
        if self.highest is not None and self.highest < chain.last_seq:
            # A job that ended sent its final head to every node (job-end): witnesses that
            # stop before it are old exports, and the records after them are the researcher's
            # word alone. Mid-run, the last records naturally come after the last request.
            findings.append(
                AuditFinding(
                    chain.offsets[self.highest + 1],
                    self.highest + 1,
                    f"witnesses: records seq {self.highest + 1}..{chain.last_seq} come after "
                    f"the highest head any witness saw (seq {self.highest}): no node vouches "
                    "for them"
                    + (
                        "; the job ended, so the nodes were sent its final head: ask them for "
                        "fresh exports"
                        if chain.ended
                        else ""
                    ),
                    chain.ended,
                    "witnesses",
                )
            )
        unpinned = sorted(
            item.witness.node_id
            for item in accepted
            if item.witness is not None and item.witness.node_id not in self.pinned_keys
        )
        if unpinned:
            findings.append(
                AuditFinding(
                    0,
                    0,
                    f"witnesses: no key pinned for {unpinned}: their files prove only what "
                    "whoever handed them over wrote (pin each node's published key with "
                    "--witness-key NODE=HEX)",
                    False,
                    "witnesses",
                )
            )
        return findings

    def _heads(self, chain: Chain, item: LoadedWitness, w: WitnessFile) -> list[Finding]:
        who = f"witness of {w.node_id} ({item.path})"
        notes: list[Finding] = []
        if chain.researcher_id is not None and w.researcher_id != chain.researcher_id:
            notes.append(
                AuditFinding(
                    0,
                    0,
                    f"{who}: names researcher {w.researcher_id}, the log's job was "
                    f"created by {chain.researcher_id}",
                    True,
                    "witnesses",
                    chain.researcher_id,
                    w.researcher_id,
                )
            )
        if chain.nodes and w.node_id not in chain.nodes:
            notes.append(
                AuditFinding(
                    0,
                    0,
                    f"{who}: {w.node_id} is not one of the job's nodes",
                    True,
                    "witnesses",
                )
            )
        if not w.heads:
            notes.append(AuditFinding(0, 0, f"{who}: holds no heads", False, "witnesses"))
            return notes
        on_chain = [h for h in w.heads if h.seq <= chain.last_seq]
        beyond = [h for h in w.heads if h.seq > chain.last_seq]
        # The lowest witnessed head the log disagrees with: the rewrite is at or before it,
        # after the last head below it that agrees.
        differ = [h for h in on_chain if head_finding(chain, h.seq, h.hash) is not None]
        if differ:
            first = differ[0]
            agree = [
                h.seq
                for h in on_chain
                if h.seq < first.seq and head_finding(chain, h.seq, h.hash) is None
            ]
            span = f"after seq {max(agree)} (witnessed and on the chain) and " if agree else ""
            more = len({h.seq for h in differ}) - 1
            notes.append(
                AuditFinding(
                    chain.offsets[first.seq],
                    first.seq,
                    f"{who}: the log's record seq {first.seq} is not the one {w.node_id} "
                    f"witnessed: the log was rewritten {span}at or before seq {first.seq}"
                    + (f" ({more} later witnessed seq(s) differ too)" if more else ""),
                    True,
                    "witnesses",
                    _described(first),
                    f"seq {first.seq} hash {chain.hashes[first.seq].hex()}",
                )
            )
        if beyond:
            top = max(beyond, key=lambda h: (h.seq, h.received_at))
            more = len({h.seq for h in beyond}) - 1
            notes.append(
                AuditFinding(
                    chain.size,
                    top.seq,
                    f"{who}: {w.node_id} witnessed seq {top.seq}, but the log ends at seq "
                    f"{chain.last_seq}: records were cut off (or this is an older copy of the log)"
                    + (f" ({more} other witnessed seq(s) past the end)" if more else ""),
                    True,
                    "witnesses",
                    _described(top),
                    f"the log ends at seq {chain.last_seq}",
                )
            )
        return notes

    def summary(self) -> str:
        """One line for the OK verdict: how many files, signed, up to which seq."""
        accepted = [i for i in self.loaded if i.refused is None and i.witness is not None]
        nodes = sorted({i.witness.node_id for i in accepted if i.witness is not None})
        signed = sum(1 for i in accepted if i.signed)
        pinned = sum(1 for n in nodes if n in self.pinned_keys)
        upto = f" up to seq {self.highest}" if self.highest is not None else ""
        return (
            f"witnessed by {len(nodes)} node(s) [{','.join(nodes)}]{upto} "
            f"({signed} of {len(accepted)} file(s) signed, {pinned} by a pinned key)"
        )

    def to_dicts(self) -> list[dict[str, Any]]:
        """The files, for ``--json``: file, node, signed, refused, heads, highest seq."""
        rows = []
        for item in self.loaded:
            w = item.witness
            rows.append(
                {
                    "file": str(item.path),
                    "node_id": w.node_id if w else None,
                    "signed": item.signed,
                    "refused": item.refused,
                    "heads": len(w.heads) if w else 0,
                    "highest_seq": w.highest.seq if w and w.highest else None,
                }
            )
        return rows
