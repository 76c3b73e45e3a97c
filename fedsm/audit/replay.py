"""``fedsm replay``: a job's timeline, its state at any seq, and the log's verification.

The one implementation behind ``fedsm replay`` and ``tools/replay.py``:

- ``fedsm replay LOG``: one line per record: seq, time (UTC), state after, summary; then the
  log's head (``head: seq N hash H``, the chain hash of its last record), to write down or
  publish elsewhere. ``--expect-head SEQ:HASH`` checks such a head: the log must have record
  SEQ with chain hash HASH (exit 1 otherwise; also with ``--verify``).
- ``--at SEQ``: the job state after record SEQ.  ``--json``: the same as JSON.
- ``--round N``: one round: who was asked, who answered when, samples, weights, metrics,
  timing and the aggregate digest, or for a validation-only round each node's validation
  metrics of the parameters it was sent; settings changed and parameters replaced before
  the round (:mod:`fedsm.audit.roundfacts`).
- ``--verify``: framing, checksums, sequence, hash chain, event decoding, the lifecycle rules
  (no reply counted twice, no aggregate without quorum), the training plan
  (:func:`fedsm.audit.checks.check_plan`) and the validation-only rounds
  (:func:`fedsm.audit.checks.check_validation`); with ``--repo DIR_OR_URL`` also the
  artifacts and the recomputation of every aggregate
  (:class:`fedsm.audit.checks.RepositoryAudit`). Without ``--repo`` those two are listed
  as "not checked": they neither pass nor fail. With
  ``--witness FILE ...`` (the heads nodes kept, :mod:`fedsm.audit.witness`) also the log
  against its writer: every witnessed head lies on the chain and the log reaches the highest
  one, so a cut or a re-chained rewrite shows; without it that check is "not checked". Exit 0
  only if every check that ran holds, else 1 with one line per finding (seq, expected, found).

Audit tools never write to what they read: no lock file, no repair, no sidecar, no header;
they work on read-only media and on a log another process is writing. A torn tail is
reported, not an error, and not repaired (the job's writer moves it aside when it next opens
the log). ``LOG`` may also be a run directory (``job.log`` or ``researcher/job.log`` in it).

Verification is a list of checks, ``Check = (path) -> list[Finding]``; :data:`CHECKS` holds
the defaults and :func:`verify_all` takes more (an audit adds a repository check).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

from fedsm.audit.checks import (
    REPOSITORY_CHECKS,
    AuditFinding,
    RepositoryAudit,
    check_plan,
    check_validation,
)
from fedsm.audit.roundfacts import describe_changes
from fedsm.audit.witness import (
    WITNESS_CHECK,
    WitnessAudit,
    expected_head_check,
    head_finding,
    log_head,
    parse_head,
    parse_key,
    read_chain,
)
from fedsm.core import events as ev
from fedsm.core.jobstate import JobState, initial_state
from fedsm.core.lifecycle import IllegalTransition, apply
from fedsm.errors import FedsmError
from fedsm.log.read import Finding, LogError, Record, TornTail, scan, verify

__all__ = [
    "CHECKS",
    "Check",
    "ReplayError",
    "add_arguments",
    "check_lifecycle",
    "check_log",
    "fold",
    "load",
    "main",
    "run",
    "state_at",
    "summarize",
    "verify_all",
]

Check = Callable[[Path], list[Finding]]


class ReplayError(FedsmError):
    """A replay request that can't be answered (e.g. ``--at`` past the end of the log)."""


# --------------------------------------------------------------------------- summaries


def _short(digest: str) -> str:
    return digest[:12]


def _nodes(nodes: Iterable[str], limit: int = 6) -> str:
    nodes = list(nodes)
    shown = ",".join(nodes[:limit])
    return shown + (f",+{len(nodes) - limit}" if len(nodes) > limit else "")


def _settings_of(state: JobState | None) -> dict[str, Any] | None:
    """The settings in effect in ``state`` (what a ``SettingsChanged`` is compared with)."""
    if state is None or state.config is None:
        return None
    return {
        "nodes": list(state.nodes),
        "training_args": dict(state.training_args),
        "round_limit": state.round_limit,
    }


def summarize(event: ev.Event, before: JobState | None = None) -> str:
    """One line that says what ``event`` records; ``before``, the job state the event was
    applied to, lets it say more (what a settings change changed, that parameters were
    replaced, that the job completed from its final validation)."""
    e: Any = event
    if isinstance(e, ev.JobCreated):
        return (
            f"job {e.job_id} by {e.researcher_id}: {e.training_plan_class} on "
            f"{len(e.nodes)} nodes [{_nodes(e.nodes)}], {e.round_limit} rounds, "
            f"min {e.min_nodes}, seed {e.seed}"
        )
    if isinstance(e, ev.TrainingPlanUploaded):
        return f"plan {e.class_name} sha256 {_short(e.sha256)}"
    if isinstance(e, ev.ParamsUploaded):
        if e.round > 0 or (before is not None and before.params_sha256 is not None):
            return (
                f"params replaced after round {e.round} (update_parameters) sha256 "
                f"{_short(e.sha256)}: round {e.round + 1} sends them"
            )
        return f"params for round {e.round} uploaded sha256 {_short(e.sha256)}"
    if isinstance(e, ev.SettingsChanged):
        reopens = before is not None and before.status.value == "completed"
        text = describe_changes(e.changes, _settings_of(before), reopens=reopens)
        return f"settings changed after round {e.round}, from round {e.round + 1}: {text}"
    if isinstance(e, ev.ApprovalAsked):
        return f"plan {_short(e.plan_sha256)} approval asked of {len(e.nodes)} [{_nodes(e.nodes)}]"
    if isinstance(e, ev.ApprovalChecked):
        counts: dict[str, int] = {}
        for status in e.statuses.values():
            counts[status] = counts.get(status, 0) + 1
        text = " ".join(f"{k}={v}" for k, v in sorted(counts.items()))
        return f"plan {_short(e.plan_sha256)} approval: {text or 'no nodes'}"
    if isinstance(e, ev.RoundSent):
        return (
            f"round {e.round} {'sent' if e.do_training else 'sent to validate only'} to "
            f"{len(e.nodes)} [{_nodes(e.nodes)}] params {_short(e.params_sha256)}"
        )
    if isinstance(e, ev.RoundResent):
        return f"round {e.round} re-sent to [{_nodes(e.nodes)}]"
    if isinstance(e, ev.ReplyReceived):
        metrics = " ".join(f"{k}={v:.4g}" for k, v in sorted(e.metrics.items()))
        return (
            f"round {e.round} reply from {e.node_id}: {e.sample_size} samples "
            f"params {_short(e.params_sha256)} {metrics}".rstrip()
        )
    if isinstance(e, ev.NodeFailed):
        return f"round {e.round} {e.node_id} failed [{e.code}] {e.message}"
    if isinstance(e, ev.NodeRetrying):
        return f"round {e.round} {e.node_id} busy [{e.code}], asked again later: {e.message}"
    if isinstance(e, ev.RoundTimedOut):
        return f"round {e.round} timed out, missing [{_nodes(e.missing)}]"
    if isinstance(e, ev.Aggregated):
        return (
            f"round {e.round} aggregated ({e.aggregator}) from {len(e.nodes)} nodes "
            f"-> params {_short(e.params_sha256)}"
        )
    if isinstance(e, ev.JobCompleted):
        if before is not None and not before.round_do_training and before.round == e.round:
            return (
                f"completed after the final validation (round {e.round}), final params "
                f"{_short(e.params_sha256)}"
            )
        return f"completed after round {e.round}, final params {_short(e.params_sha256)}"
    if isinstance(e, ev.JobFailed):
        return f"failed in round {e.round}: {e.reason}"
    if isinstance(e, ev.JobCancelled):
        return f"cancelled in round {e.round}: {e.reason}"
    return type(event).__name__


def _time(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="milliseconds")


# --------------------------------------------------------------------------- loading


#: Where a run directory keeps its job log: a Job's run_dir, or the demo's run directory.
LOG_PLACES = ("job.log", "researcher/job.log")


def resolve_log(path: str | Path) -> Path:
    """The job log ``path`` names: the file itself, or the log of a run directory.

    Raises :class:`ReplayError` with one clear line for a directory without a log.
    """
    path = Path(path)
    if path.is_dir():
        for place in LOG_PLACES:
            if (path / place).is_file():
                return path / place
        raise ReplayError(f"{path} is a directory without a job log ({' or '.join(LOG_PLACES)})")
    return path


def load(path: str | Path) -> tuple[list[Record], TornTail | None, str]:
    """The log's good records, its torn tail (if any) and a note saying it was left alone.

    Read-only: nothing is locked, moved or written, whoever may be writing the log.
    """
    view = scan(resolve_log(path))
    note = ""
    if view.torn is not None:
        note = "reported, not repaired (the job's writer moves it aside when it next opens the log)"
    return view.records, view.torn, note


def fold(
    records: Iterable[Record], state: JobState | None = None
) -> Iterator[tuple[Record, JobState]]:
    """Each record with the job state after it. Raises :class:`IllegalTransition` (naming
    the seq) at the first record the lifecycle refuses."""
    current = initial_state() if state is None else state
    for record in records:
        try:
            current = apply(current, record.event)
        except IllegalTransition as exc:
            raise ReplayError(f"seq {record.seq} (offset {record.offset}): {exc}") from None
        yield record, current


def _fold_with_before(records: Iterable[Record]) -> Iterator[tuple[Record, JobState, JobState]]:
    """Each record with the job state after it and the state it was applied to."""
    before = initial_state()
    for record, after in fold(records):
        yield record, after, before
        before = after


def state_at(records: Sequence[Record], seq: int) -> JobState:
    """The job state after record ``seq`` (0: before any record)."""
    last = records[-1].seq if records else 0
    if not 0 <= seq <= last:
        raise ReplayError(f"seq {seq} is not in the log, which ends at seq {last}")
    state = initial_state()
    for record, state in fold(r for r in records if r.seq <= seq):  # noqa: B007
        pass
    return state


# --------------------------------------------------------------------------- checks


def check_log(path: Path) -> list[Finding]:
    """Framing, checksums, sequence, hash chain and event decoding (:func:`fedsm.log.verify`)."""
    return verify(path)


def check_lifecycle(path: Path) -> list[Finding]:
    """Every event is allowed by the lifecycle where it stands. Skipped (no finding) when
    the log itself is damaged: :func:`check_log` reports that."""
    try:
        records = scan(path).records
    except LogError:
        return []
    state = initial_state()
    for record in records:
        try:
            state = apply(state, record.event)
        except IllegalTransition as exc:
            return [Finding(record.offset, record.seq, f"lifecycle: {exc}")]
    return []


#: The checks of ``--verify`` that need only the log, in order.
CHECKS: tuple[Check, ...] = (check_log, check_lifecycle, check_plan, check_validation)


def verify_all(path: str | Path, checks: Iterable[Check] = CHECKS) -> list[Finding]:
    """Run ``checks`` on the log at ``path``; every finding, in check order."""
    findings: list[Finding] = []
    log_path = resolve_log(path)
    for check in checks:
        findings.extend(check(log_path))
    return findings


# --------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``replay`` arguments (shared by ``fedsm replay`` and ``tools/replay.py``)."""
    parser.add_argument(
        "log", type=Path, help="the job's event log (RUN_DIR/job.log) or its run directory"
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--at", type=int, metavar="SEQ", help="print the job state after SEQ")
    mode.add_argument("--round", type=int, metavar="N", help="print round N in detail")
    mode.add_argument(
        "--verify",
        action="store_true",
        help="audit the log (framing, hash chain, lifecycle, plan; with --repo also the "
        "artifacts and every aggregate recomputed); exit 1 on any finding",
    )
    parser.add_argument(
        "--repo",
        metavar="URL_OR_DIR",
        help="with --verify: the run's repository (a directory or http(s) URL); artifacts "
        "are looked up by digest, whatever URLs the log recorded",
    )
    parser.add_argument("--token", help="bearer token of an http(s) --repo")
    parser.add_argument(
        "--witness",
        action="append",
        type=Path,
        default=[],
        metavar="FILE",
        help="with --verify: a node's witness file (fedsm node witness export); every head it "
        "holds must lie on the log's chain and the log must reach the highest (repeatable)",
    )
    parser.add_argument(
        "--witness-key",
        action="append",
        type=parse_key,
        default=[],
        metavar="NODE=HEXKEY",
        help="with --witness: pin NODE's Ed25519 public key (hex); its witness file must be "
        "signed with it (repeatable)",
    )
    parser.add_argument(
        "--expect-head",
        type=parse_head,
        metavar="SEQ:HASH",
        help="check a head written down earlier: the log must have record SEQ with chain "
        "hash HASH (exit 1 otherwise)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")


def run(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Carry out parsed ``replay`` arguments; return the exit code."""
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    args.log = resolve_log(args.log)
    witnesses = list(getattr(args, "witness", None) or [])
    keys = list(getattr(args, "witness_key", None) or [])
    expect = getattr(args, "expect_head", None)
    if keys and not witnesses:
        raise ReplayError("--witness-key is only used with --witness FILE")
    pinned: dict[str, str] = {}
    for node, key in keys:
        if pinned.get(node, key) != key:
            raise ReplayError(f"--witness-key pins two keys for {node}")
        pinned[node] = key
    if args.verify:
        return _run_verify(
            args.log,
            args.json,
            out,
            getattr(args, "repo", None),
            getattr(args, "token", None),
            witnesses=witnesses,
            pinned_keys=pinned,
            expect_head=expect,
        )
    if getattr(args, "repo", None):
        raise ReplayError("--repo is only used with --verify")
    if witnesses:
        raise ReplayError("--witness is only used with --verify")
    if expect is not None and (args.at is not None or getattr(args, "round", None) is not None):
        raise ReplayError("--expect-head is used with the timeline or --verify, not --at/--round")
    records, torn, note = load(args.log)
    if torn is not None:
        print(
            f"fedsm replay: torn tail at offset {torn.offset} ({torn.length} bytes, "
            f"{torn.reason}) after seq {torn.last_good_seq}; {note}",
            file=err,
        )
    if args.at is not None:
        state = state_at(records, args.at)
        if args.json:
            doc = {"seq": args.at, **state.to_dict()}
            settings = _settings_of(state)
            if settings is not None:  # in effect for the next round (JobCreated's, as changed)
                doc["effective_settings"] = settings
            json.dump(doc, out, indent=2, sort_keys=False)
            out.write("\n")
        else:
            _print_state(args.at, state, out)
        return 0
    if getattr(args, "round", None) is not None:
        return _print_round(records, args.round, args.json, out)
    head = log_head(args.log, records)
    expected = _expected_head(args.log, expect) if expect is not None else None
    if args.json:
        rows = [
            {
                "seq": r.seq,
                "ts": r.ts,
                "time": _time(r.ts),
                "status": s.status,
                "summary": summarize(r.event, before),
                "event": ev.encode_event(r.event),
                "hash": r.hash.hex(),  # the chain hash: the last row's is the log's head
            }
            for r, s, before in _fold_with_before(records)
        ]
        json.dump(rows, out, indent=1)  # the same list as ever; each row now has its hash
        out.write("\n")
        if expected is not None and not expected["ok"]:
            print(
                f"fedsm replay: expected head seq {expect[0]} hash {expect[1]}: "  # type: ignore[index]
                f"{expected['what']}",
                file=err,
            )
            return 1
        return 0
    for record, state, before in _fold_with_before(records):
        out.write(
            f"{record.seq:>6}  {_time(record.ts)}  {state.status:<16}  "
            f"{summarize(record.event, before)}\n"
        )
    out.write(f"head: seq {head[0]} hash {head[1]}\n")
    if expected is None:
        return 0
    if expected["ok"]:
        out.write(f"expected head seq {expect[0]} hash {expect[1]}: on this log's chain\n")
        return 0
    out.write(f"ERROR: expected head seq {expect[0]} hash {expect[1]}: {expected['what']}\n")
    return 1


def _expected_head(path: Path, expect: tuple[int, str]) -> dict[str, Any]:
    """``--expect-head`` in the timeline: ``{seq, hash, ok, found, what}``."""
    seq, digest = expect
    found = head_finding(read_chain(path), seq, digest)
    what = ""
    if found is not None and found.startswith("the log ends"):
        what = f"{found}: records were cut off (or this is an older copy)"
    elif found is not None:
        what = f"the log has {found}: it was rewritten at or before seq {seq}"
    return {"seq": seq, "hash": digest, "ok": found is None, "found": found, "what": what}


def _run_verify(
    path: Path,
    as_json: bool,
    out: TextIO,
    repo: str | None = None,
    token: str | None = None,
    *,
    witnesses: Sequence[Path] = (),
    pinned_keys: dict[str, str] | None = None,
    expect_head: tuple[int, str] | None = None,
) -> int:
    not_checked: list[tuple[str, str, str]] = []
    checks: list[Check] = list(CHECKS)
    if expect_head is not None:
        checks.append(expected_head_check(*expect_head))
    witness_audit: WitnessAudit | None = None
    if witnesses:
        witness_audit = WitnessAudit(witnesses, pinned_keys)
        checks.extend(witness_audit.checks)
    else:
        not_checked.append(WITNESS_CHECK)
    if repo is None:
        findings = verify_all(path, checks)
        not_checked[:0] = [(n, w, "give --repo URL_OR_DIR") for n, w in REPOSITORY_CHECKS]
    else:
        from fedsm.repository import open_repository

        with RepositoryAudit(open_repository(repo, token), close_repository=True) as audit:
            findings = verify_all(path, (*checks, *audit.checks))
    errors = [f for f in findings if f.error]
    strategy: str | None = None
    try:
        view = scan(path)
        head: tuple[int, str] | None = log_head(path, view.records)
        opening = view.records[0].event if view.records else None
        if isinstance(opening, ev.JobCreated):
            strategy = opening.aggregator
    except LogError:  # the findings say why
        head = None
    if as_json:
        doc: dict[str, Any] = {
            "ok": not errors,
            "repository": repo,
            "strategy": strategy,
            "head": None if head is None else {"seq": head[0], "hash": head[1]},
            "findings": [_finding_dict(f) for f in findings],
            "not_checked": [{"check": n, "what": w} for n, w, _hint in not_checked],
        }
        if witness_audit is not None:
            doc["witnesses"] = witness_audit.to_dicts()
        json.dump(doc, out, indent=2)
        out.write("\n")
        return 1 if errors else 0
    for f in findings:
        label = "ERROR" if f.error else "note"
        out.write(f"{label}: offset {f.offset} seq {f.seq}: {f.what}\n")
        if isinstance(f, AuditFinding) and (f.expected is not None or f.found is not None):
            out.write(f"    expected: {f.expected}\n    found:    {f.found}\n")
    for name, what, hint in not_checked:
        out.write(f"not checked: {name}: {what} ({hint})\n")
    if head is not None:
        out.write(f"head: seq {head[0]} hash {head[1]}\n")
    if errors:
        out.write(f"{path}: {len(errors)} finding(s); the log does not verify\n")
    else:
        scope = (
            f"and the repository's artifacts and aggregates (recomputed with {strategy})"
            if repo
            else "(log only)"
        )
        extra = ""
        if expect_head is not None:
            extra += f"; the expected head seq {expect_head[0]} is on its chain"
        if witness_audit is not None:
            extra += f"; {witness_audit.summary()}"
        last = head[0] if head is not None else -1
        out.write(
            f"{path}: OK, {last} records: checksums, hash chain, lifecycle, plan, validation "
            f"rounds {scope}{extra}\n"
        )
    return 1 if errors else 0


def _finding_dict(f: Finding) -> dict[str, Any]:
    row: dict[str, Any] = {"offset": f.offset, "seq": f.seq, "what": f.what, "error": f.error}
    if isinstance(f, AuditFinding):
        row.update(check=f.check, expected=f.expected, found=f.found)
    return row


def _print_round(records: Sequence[Record], number: int, as_json: bool, out: TextIO) -> int:
    from fedsm.audit.roundfacts import format_round, round_facts

    rounds = {facts.round: facts for facts in round_facts(records)}
    if number not in rounds:
        sent = sorted(rounds) or "none"
        raise ReplayError(f"round {number} was not sent in this log (rounds sent: {sent})")
    if as_json:
        json.dump(rounds[number].to_dict(), out, indent=2)
        out.write("\n")
    else:
        out.write(format_round(rounds[number]))
    return 0


def _print_state(seq: int, state: JobState, out: TextIO) -> None:
    out.write(f"state after seq {seq}\n")
    out.write(f"  status         {state.status}\n")
    out.write(f"  job            {state.job_id} (researcher {state.researcher_id})\n")
    out.write(f"  plan           {state.plan_sha256}\n")
    out.write(f"  params         {state.params_sha256}\n")
    out.write(f"  round          {state.round} of {state.round_limit if state.config else '-'}\n")
    if state.config is not None:
        kind = "trains" if state.round_do_training else "validates only"
        out.write(f"  round kind     {kind}\n")
        out.write(f"  validation     rounds {list(state.validation_rounds)}\n")
        if state.overrides:
            config = state.config
            created = {
                "nodes": list(config.nodes),
                "training_args": dict(config.training_args),
                "round_limit": config.round_limit,
            }
            changed = describe_changes(dict(state.overrides), created)
            out.write(f"  changed        since created: {changed}\n")
        out.write(f"  next nodes     {list(state.nodes)}\n")
    out.write(f"  round nodes    {list(state.round_nodes)}\n")
    out.write(f"  replied        {sorted(state.round_replies)}\n")
    out.write(f"  failed         {sorted(state.round_failures)}\n")
    out.write(f"  pending        {list(state.pending_nodes())}\n")
    out.write(f"  timed out      {dict(state.timed_out)}\n")
    out.write(f"  aggregated     {sorted(state.aggregates)}\n")


def main(argv: Sequence[str] | None = None) -> int:
    """``tools/replay.py``: the same as ``fedsm replay``."""
    parser = argparse.ArgumentParser(prog="replay", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except FedsmError as exc:
        print(f"replay: error: {exc}", file=sys.stderr)
        return 2
