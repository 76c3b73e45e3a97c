"""The audit of a run: does its log agree with its repository and with itself?

``fedsm replay LOG --verify --repo DIR_OR_URL`` runs these checks after the log's own
(framing, hash chain, lifecycle; see :mod:`fedsm.audit.replay`):

- :func:`check_plan` (needs only the log): the training plan uploaded is the one the nodes
  were asked to approve, every node whose reply was counted reported it approved, and each
  reply records the digest of the plan the node says it imported and ran (``ReplyReceived``
  version 2; the researcher fails a node that names another plan). The lifecycle admits
  exactly one ``TrainingPlanUploaded`` per job and the Job sends that digest in every train
  request.
- :func:`check_validation` (needs only the log): a validation-only round (``RoundSent``
  with ``do_training`` False, the final validation) trains nothing, so every reply counted
  in it names exactly the parameters the round sent, and nothing aggregates it.
- :meth:`RepositoryAudit.check_artifacts`: every artifact the log names (plan source, initial
  parameters, parameters the researcher replaced between rounds, each node's parameters,
  each aggregate, the final parameters) is in the repository and hashes to the digest in
  the log. Replaced parameters are uploaded when a request first names them: ones
  superseded before any round sent them were never uploaded, and their absence is a note;
  different bytes under their digest are an error as for any artifact.
- :meth:`RepositoryAudit.check_aggregates`: every ``Aggregated`` is recomputed from the
  recorded replies (their parameter files, weighted by their sample sizes, in sorted node
  order) by the strategy the log names, from the round's global parameters and the
  strategy's recorded state, with the same ``aggregate_files`` call the Job makes; the
  result and the new state must be the recorded files bit for bit. A validation-only round
  has no aggregate to recompute. Rounds after a settings change are recomputed from the
  nodes they went to.

Artifacts are fetched *by digest* through the repository given (``url_for(digest)``), not by
the URL in the log: an auditor often has the repository directory while the log names a
server that is gone. A check returns findings (:class:`AuditFinding`: seq, what was expected,
what was found); a damaged log yields a note instead, since ``check_log`` reports the damage.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from fedsm.core import events as ev
from fedsm.core import lifecycle
from fedsm.core.jobstate import JobState, initial_state
from fedsm.errors import FedsmError
from fedsm.log.read import Finding, LogError, Record, scan
from fedsm.repository import (
    DigestMismatch,
    FileNotInRepository,
    Repository,
    RepositoryError,
    RepositoryUnreachable,
)
from fedsm.repository.errors import RepositoryUnauthorized

__all__ = [
    "REPOSITORY_CHECKS",
    "AuditFinding",
    "RepositoryAudit",
    "Unavailable",
    "artifacts_of",
    "check_plan",
    "check_validation",
]

#: The checks that need ``--repo``: (name, what it proves). Listed as "not checked" without it.
REPOSITORY_CHECKS: tuple[tuple[str, str], ...] = (
    ("artifacts", "every artifact the log names is in the repository and hashes to its digest"),
    ("recompute", "every Aggregated recomputed from the replies' files matches bit for bit"),
)


_HEX64 = re.compile(r"\b[0-9a-f]{64}\b")


class Unavailable(NamedTuple):
    """Why a file can't be had from the repository (``why``) and what is there (``found``)."""

    why: str
    found: str


@dataclass(frozen=True)
class AuditFinding(Finding):
    """A :class:`~fedsm.log.Finding` of an audit check: which check, what the log (or the
    recomputation) expected and what was found."""

    check: str = ""
    expected: str | None = None
    found: str | None = None


def _records(path: Path, check: str) -> tuple[list[Record], list[Finding]]:
    """The log's records, or a note that ``check`` was skipped because the log is damaged."""
    try:
        return scan(path).records, []
    except LogError as exc:
        note = AuditFinding(
            0, 0, f"{check}: not checked, the log does not read ({exc})", False, check
        )
        return [], [note]


# --------------------------------------------------------------------------- the plan


def check_plan(path: Path) -> list[Finding]:
    """The plan digest approved is the plan uploaded; counted replies come from approving nodes.

    A reply from a node that reported the plan anything but ``approved`` while it requires
    approval is an error; one from a node that runs unapproved plans on purpose (approval
    off) is a note, so the auditor sees it without the run failing the audit.
    """
    records, notes = _records(Path(path), "plan")
    if notes:
        return notes
    findings: list[Finding] = []
    plan: str | None = None
    approval: tuple[int, ev.ApprovalChecked] | None = None
    for r in records:
        e: Any = r.event
        if isinstance(e, ev.TrainingPlanUploaded):
            plan = e.sha256
        elif isinstance(e, ev.ApprovalChecked):
            approval = (r.seq, e)
            if e.plan_sha256 != plan:
                findings.append(
                    AuditFinding(
                        r.offset,
                        r.seq,
                        "plan: the nodes were asked to approve another plan than the one uploaded",
                        True,
                        "plan",
                        plan,
                        e.plan_sha256,
                    )
                )
        elif isinstance(e, ev.ReplyReceived):
            if approval is None:
                findings.append(
                    AuditFinding(
                        r.offset,
                        r.seq,
                        f"plan: reply of {e.node_id} in round {e.round} before any approval check",
                        True,
                        "plan",
                        "an ApprovalChecked before the first round",
                        "none",
                    )
                )
                continue
            if e.training_plan_sha256 is None:
                findings.append(
                    AuditFinding(
                        r.offset,
                        r.seq,
                        f"plan: the reply of {e.node_id} in round {e.round} does not say which "
                        "plan the node ran (a version-1 record)",
                        False,
                        "plan",
                        plan,
                        "not recorded",
                    )
                )
            elif e.training_plan_sha256 != plan:
                findings.append(
                    AuditFinding(
                        r.offset,
                        r.seq,
                        f"plan: {e.node_id} reports it ran another plan in round {e.round}",
                        True,
                        "plan",
                        plan,
                        e.training_plan_sha256,
                    )
                )
            seq, checked = approval
            status = checked.statuses.get(e.node_id, "no-reply")
            if status == "approved":
                continue
            required = checked.approval_required.get(e.node_id, True)
            findings.append(
                AuditFinding(
                    r.offset,
                    r.seq,
                    f"plan: {e.node_id} contributed to round {e.round} but reported plan "
                    f"{checked.plan_sha256[:12]} {status!r} at seq {seq}"
                    + ("" if required else " (its approval is off: it runs unapproved plans)"),
                    required,
                    "plan",
                    "approved",
                    status,
                )
            )
    return findings


# --------------------------------------------------------------------------- validation rounds


def check_validation(path: Path) -> list[Finding]:
    """A validation-only round's replies name the parameters it sent; nothing aggregates it.

    The researcher fails a node that answers a validation round with other parameters, so a
    counted reply that does (the node trained, or the record was changed) is an error, as is
    an ``Aggregated`` for such a round (also the lifecycle's finding).
    """
    records, notes = _records(Path(path), "validation")
    if notes:
        return notes
    findings: list[Finding] = []
    validating: dict[int, tuple[int, str]] = {}  # round -> (seq of RoundSent, params sent)
    for r in records:
        e: Any = r.event
        if isinstance(e, ev.RoundSent):
            if not e.do_training:
                validating[e.round] = (r.seq, e.params_sha256)
        elif isinstance(e, ev.ReplyReceived) and e.round in validating:
            seq, sent = validating[e.round]
            if e.params_sha256 != sent:
                findings.append(
                    AuditFinding(
                        r.offset,
                        r.seq,
                        f"validation: {e.node_id} answered validation-only round {e.round} "
                        f"(sent at seq {seq}) with other parameters than it was sent: it was "
                        "to validate them and train nothing",
                        True,
                        "validation",
                        sent,
                        e.params_sha256,
                    )
                )
        elif isinstance(e, ev.Aggregated) and e.round in validating:
            findings.append(
                AuditFinding(
                    r.offset,
                    r.seq,
                    f"validation: round {e.round} only validated, yet it is aggregated",
                    True,
                    "validation",
                    "no Aggregated",
                    e.params_sha256,
                )
            )
    return findings


# --------------------------------------------------------------------------- the repository


def artifacts_of(event: ev.Event) -> list[tuple[str, str]]:
    """``(what, sha256)`` of each repository file ``event`` names."""
    e: Any = event
    if isinstance(e, ev.TrainingPlanUploaded):
        return [(f"training plan {e.class_name} source", e.sha256)]
    if isinstance(e, ev.ParamsUploaded):
        if e.round > 0:
            return [(f"parameters replaced after round {e.round} (update_parameters)", e.sha256)]
        return [(f"parameters of round {e.round} (initial)", e.sha256)]
    if isinstance(e, ev.ReplyReceived):
        return [(f"parameters {e.node_id} sent in round {e.round}", e.params_sha256)]
    if isinstance(e, ev.Aggregated):
        out = [(f"aggregate of round {e.round}", e.params_sha256)]
        if e.state_sha256 is not None:
            out.append((f"strategy state after round {e.round}", e.state_sha256))
        return out
    if isinstance(e, ev.RoundSent):
        return [
            (f"aggregator arg {name!r} sent to {node} in round {e.round}", v["sha256"])
            for node, args in sorted(e.aggregator_args.items())
            for name, v in sorted(dict(args).items())
            if isinstance(v, dict) and set(v) == {"sha256"} and isinstance(v["sha256"], str)
        ]
    if isinstance(e, ev.JobCompleted):
        return [("final parameters", e.params_sha256)]
    return []


class RepositoryAudit:
    """The repository checks of one audit, sharing one scratch directory of fetched files.

    ``scratch`` (default: a new temporary directory, removed on close) holds the fetched
    files; ``close_repository`` closes the repository's connections on close too.
    Use as a context manager::

        with RepositoryAudit(open_repository(DIR)) as audit:
            findings = verify_all(log, (*CHECKS, *audit.checks))
    """

    def __init__(
        self,
        repository: Repository,
        scratch: Path | None = None,
        *,
        close_repository: bool = False,
    ) -> None:
        self.repository = repository
        self._close_repository = close_repository
        self._own_scratch = scratch is None
        self._scratch = scratch or Path(tempfile.mkdtemp(prefix="fedsm-audit-"))
        self._fetched: dict[str, Path | Unavailable] = {}
        self._access: str | None = None  # "" once the repository answered; else why not

    @property
    def checks(self) -> tuple[Any, ...]:
        """The checks, in :data:`REPOSITORY_CHECKS` order, as ``(path) -> findings``."""
        return (self.check_artifacts, self.check_aggregates)

    def close(self) -> None:
        """Remove the fetched files (and close the repository if asked to)."""
        if self._own_scratch:
            shutil.rmtree(self._scratch, ignore_errors=True)
        close = getattr(self.repository, "close", None)
        if self._close_repository and close is not None:
            close()

    def __enter__(self) -> RepositoryAudit:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def fetch(self, digest: str) -> Path | Unavailable:
        """The local copy of the file with ``digest`` (checked), or why it can't be had."""
        cached = self._fetched.get(digest)
        if cached is not None:
            return cached
        dest = self._scratch / digest
        result: Path | Unavailable
        try:
            self.repository.download_file(self.repository.url_for(digest), dest)
            result = dest
        except DigestMismatch as exc:
            # The backends name the digest the stored bytes have; show it when they do.
            others = [h for h in _HEX64.findall(str(exc)) if h != digest]
            found = f"a file with sha256 {others[0]}" if others else f"other bytes ({exc})"
            result = Unavailable("the stored bytes hash to another digest", found)
        except FileNotInRepository:
            result = Unavailable(f"not in the repository {self.repository!r}", "no such file")
        except RepositoryError as exc:
            result = Unavailable(f"unreadable from {self.repository!r}", str(exc))
        self._fetched[digest] = result
        return result

    def _refused(self, check: str) -> list[Finding]:
        """One finding if the repository can not be used at all (down, wrong token), rather
        than one per artifact; empty when it answers."""
        if self._access is None:
            try:
                self.repository.exists("0" * 64)
                self._access = ""
            except (RepositoryUnauthorized, RepositoryUnreachable) as exc:
                self._access = str(exc)
        if not self._access:
            return []
        return [
            AuditFinding(
                0,
                0,
                f"{check}: the repository refused or did not answer",
                True,
                check,
                f"access to {self.repository!r}",
                self._access,
            )
        ]

    def check_artifacts(self, path: Path) -> list[Finding]:
        """Every artifact the log names is in the repository and hashes to its digest."""
        refused = self._refused("artifacts")
        if refused:
            return refused
        records, notes = _records(Path(path), "artifacts")
        findings: list[Finding] = list(notes)
        # Parameters a request or the job's end named: these were uploaded.
        named = {
            r.event.params_sha256
            for r in records
            if isinstance(r.event, (ev.RoundSent, ev.JobCompleted))
        }
        for r in records:
            for what, digest in artifacts_of(r.event):
                got = self.fetch(digest)
                if not isinstance(got, Unavailable):
                    continue
                if (
                    isinstance(r.event, ev.ParamsUploaded)
                    and digest not in named
                    and got.found == "no such file"
                ):
                    findings.append(
                        AuditFinding(
                            r.offset,
                            r.seq,
                            f"artifacts: {what}: not in the repository, and no round sent "
                            "them (replaced again first, or the run stopped before): they "
                            "are uploaded only when a request names them",
                            False,
                            "artifacts",
                            f"a file with sha256 {digest}",
                            got.found,
                        )
                    )
                    continue
                findings.append(
                    AuditFinding(
                        r.offset,
                        r.seq,
                        f"artifacts: {what}: {got.why}",
                        True,
                        "artifacts",
                        f"a file with sha256 {digest}",
                        got.found,
                    )
                )
        return findings

    def check_aggregates(self, path: Path) -> list[Finding]:
        """Every ``Aggregated`` recomputed from its round's replies matches bit for bit: the
        strategy the log names (with its recorded settings), the round's global parameters,
        the strategy's state after the previous round and the replies' files, all fetched by
        digest, through the one :func:`~fedsm.strategies.base.aggregate_files` the Job runs.
        The new state must be the recorded one too, so the chain of states is proven round
        by round."""
        refused = self._refused("recompute")
        if refused:
            return refused
        records, notes = _records(Path(path), "recompute")
        findings: list[Finding] = list(notes)
        state = initial_state()
        strategy: Any = None
        for r in records:
            e: Any = r.event
            if isinstance(e, ev.Aggregated) and state.round_do_training:
                if strategy is None:
                    strategy = self._strategy(r, state, findings)
                if strategy is not False:
                    findings.extend(self._recompute(r, e, state, strategy))
            try:
                state = lifecycle.apply(state, e)
            except FedsmError:  # the lifecycle check reports it; recomputing stops here
                findings.append(
                    AuditFinding(
                        r.offset,
                        r.seq,
                        "recompute: stopped at an event the lifecycle refuses",
                        False,
                        "recompute",
                    )
                )
                break
        return findings

    def _strategy(self, r: Record, state: JobState, findings: list[Finding]) -> Any:
        """The strategy the log's opening names, or False (and a finding) if it can't be
        built here (unknown, or user code this Python can not import)."""
        config = state.config
        assert config is not None
        from fedsm.strategies.base import StrategyError, resolve  # torch: only when needed

        try:
            return resolve(config.aggregator, config.aggregator_args)
        except StrategyError as exc:
            findings.append(
                AuditFinding(
                    r.offset,
                    r.seq,
                    f"recompute: can't recompute any round: {exc}",
                    True,
                    "recompute",
                    f"strategy {config.aggregator}",
                    "not available here",
                )
            )
            return False

    def _recompute(
        self, r: Record, e: ev.Aggregated, state: JobState, strategy: Any
    ) -> Iterator[Finding]:
        name = state.config.aggregator if state.config is not None else "?"

        def finding(what: str, expected: str, found: str) -> AuditFinding:
            return AuditFinding(
                r.offset,
                r.seq,
                f"recompute: round {e.round} ({name}): {what}",
                True,
                "recompute",
                expected,
                found,
            )

        if e.aggregator != name:
            yield finding("aggregated by another strategy than the job's", name, e.aggregator)
            return
        replies = state.round_replies
        if tuple(sorted(replies)) != tuple(e.nodes):
            yield finding(
                "the nodes aggregated are not the nodes that replied",
                repr(sorted(replies)),
                repr(list(e.nodes)),
            )
            return
        needed = {"global parameters": state.params_sha256}
        if state.strategy_state_sha256 is not None:
            needed["the strategy's state of the previous round"] = state.strategy_state_sha256
        for node in e.nodes:
            reply = replies[node]
            weight = float(reply.sample_size)
            if e.weights.get(node) != weight:
                yield finding(
                    f"weight of {node} is not its sample size",
                    repr(weight),
                    repr(e.weights.get(node)),
                )
            needed[f"the parameters of {node}"] = reply.params_sha256
        got: dict[str, Path] = {}
        for what, digest in needed.items():
            assert digest is not None
            fetched = self.fetch(digest)
            if isinstance(fetched, Unavailable):
                yield finding(
                    f"can't recompute: {what}: {fetched.why}",
                    f"a file with sha256 {digest}",
                    fetched.found,
                )
                return
            got[what] = fetched
        items = [
            (n, got[f"the parameters of {n}"], float(replies[n].sample_size), replies[n].extras)
            for n in e.nodes
        ]
        from fedsm.strategies.base import aggregate_files  # torch: only when an audit recomputes

        out = self._scratch / f"recomputed-round-{e.round}.safetensors"
        state_out = self._scratch / f"recomputed-state-{e.round}.safetensors"
        try:
            digest, state_digest = aggregate_files(
                strategy,
                round=e.round,
                global_params_path=got["global parameters"],
                replies=items,
                all_nodes=state.strategy_nodes,
                state_path=got.get("the strategy's state of the previous round"),
                out_path=out,
                state_out_path=state_out,
            )
        except FedsmError as exc:
            yield finding(f"can't recompute: {exc}", e.params_sha256, "an error")
            return
        finally:
            out.unlink(missing_ok=True)
            state_out.unlink(missing_ok=True)
        if digest != e.params_sha256:
            yield finding(
                f"the recorded aggregate does not follow from the replies of "
                f"{list(e.nodes)}: {name} of their files gives another file",
                e.params_sha256,
                digest,
            )
        if state_digest != e.state_sha256:
            yield finding(
                "the recorded strategy state does not follow from the previous one and the replies",
                str(e.state_sha256),
                str(state_digest),
            )
