"""What happened in each round of a run, read from its log records only.

Shared by ``fedsm replay LOG --round N`` (one round as text or JSON) and ``fedsm report``
(every round, plotted). Pure data: no files, no plotting.

Timing of a node's reply, in seconds:

- ``after_s``: from the ``RoundSent`` record to the ``ReplyReceived`` record (the researcher
  records a reply after downloading and checking its parameters);
- ``training``: the node's own ``timing["training"]`` (what :mod:`fedsm.node.round` reports);
- ``transfer``: the node's ``download`` + ``upload`` (plan, parameters in and out);
- ``waiting``: the rest of ``after_s``: messaging, queueing on the node, the researcher's
  download of the parameters. Never negative (clocks of two machines may disagree a little).

A validation-only round (``RoundSent.do_training`` False: the final validation when the
training args have ``test_on_global_updates``) has ``validation`` set: its replies are the
nodes' metrics of the parameters it sent, nothing is trained or aggregated, and the job
completes from it (``completed``). What the researcher changed before a round was sent
(``SettingsChanged``: nodes, training args, round limit; ``ParamsUploaded`` after round 1:
parameters replaced by ``update_parameters``) is listed with the round it applies to.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from fedsm.core import events as ev
from fedsm.log.read import Record

__all__ = [
    "NodeReply",
    "RoundFacts",
    "describe_changes",
    "format_round",
    "round_facts",
    "weighted_metrics",
]


@dataclass
class NodeReply:
    """One node's counted reply in a round."""

    node: str
    seq: int
    after_s: float
    sample_size: int
    weight: float | None
    metrics: dict[str, float]
    timing: dict[str, float]
    params_sha256: str

    @property
    def training_s(self) -> float:
        return float(self.timing.get("training", 0.0))

    @property
    def transfer_s(self) -> float:
        return float(self.timing.get("download", 0.0)) + float(self.timing.get("upload", 0.0))

    @property
    def waiting_s(self) -> float:
        return max(0.0, self.after_s - self.training_s - self.transfer_s)


@dataclass
class RoundFacts:
    """One round: who was asked, who answered when, what was aggregated."""

    round: int
    sent_seq: int
    sent_ts: float
    asked: list[str]
    request_ids: dict[str, str]
    params_sha256: str
    deadline_after_s: float
    resent: list[dict[str, Any]] = field(default_factory=list)
    replies: dict[str, NodeReply] = field(default_factory=dict)
    failures: list[dict[str, Any]] = field(default_factory=list)
    #: Transient errors (``NodeRetrying``): the node stayed pending and was asked again.
    retries: list[dict[str, Any]] = field(default_factory=list)
    timed_out: dict[str, Any] | None = None
    aggregate: dict[str, Any] | None = None
    validation: bool = False
    completed: dict[str, Any] | None = None
    changes_before: list[dict[str, Any]] = field(default_factory=list)

    def aggregated_metrics(self) -> dict[str, float]:
        """The replies' metrics averaged with their sample sizes as weights."""
        return weighted_metrics(self.replies.values())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, with per-node timing split and the weighted metrics."""
        data = asdict(self)
        for node, reply in self.replies.items():
            data["replies"][node].update(
                training_s=reply.training_s,
                transfer_s=reply.transfer_s,
                waiting_s=reply.waiting_s,
            )
        data["aggregated_metrics"] = self.aggregated_metrics()
        return data


def weighted_metrics(replies: Iterable[NodeReply]) -> dict[str, float]:
    """Per metric, the sample-size-weighted mean over the replies that report it."""
    sums: dict[str, float] = {}
    totals: dict[str, float] = {}
    for reply in replies:
        for name, value in reply.metrics.items():
            sums[name] = sums.get(name, 0.0) + reply.sample_size * value
            totals[name] = totals.get(name, 0.0) + reply.sample_size
    return {name: sums[name] / totals[name] for name in sorted(sums) if totals[name] > 0}


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    text = repr(value) if not isinstance(value, str) else value
    return text if len(text) <= 40 else text[:37] + "..."


def _node_list(nodes: Iterable[str]) -> str:
    return "[" + ",".join(nodes) + "]"


def describe_changes(
    changes: Mapping[str, Any],
    previous: Mapping[str, Any] | None = None,
    *,
    reopens: bool = False,
) -> str:
    """What a ``SettingsChanged`` changed, in one line; with ``previous`` (the settings in
    effect before it: ``nodes``, ``training_args``, ``round_limit``) as a difference.
    ``reopens``: the job was completed and a higher round limit reopens it."""
    before = previous or {}
    parts: list[str] = []
    if "nodes" in changes:
        nodes = list(changes["nodes"])
        text = f"nodes {_node_list(nodes)}"
        if "nodes" in before:
            old = list(before["nodes"])
            removed = [n for n in old if n not in nodes]
            added = [n for n in nodes if n not in old]
            diff = [f"removed {','.join(removed)}"] if removed else []
            diff += [f"added {','.join(added)}"] if added else []
            text = f"nodes {_node_list(old)} -> {_node_list(nodes)}" + (
                f" ({'; '.join(diff)})" if diff else " (the same)"
            )
        parts.append(text)
    if "training_args" in changes:
        args = dict(changes["training_args"])
        if "training_args" in before:
            old = dict(before["training_args"])
            diffs = []
            for key in sorted(set(old) | set(args)):
                if key not in args:
                    diffs.append(f"{key} {_value(old[key])} -> (unset)")
                elif key not in old:
                    diffs.append(f"{key} (unset) -> {_value(args[key])}")
                elif old[key] != args[key]:
                    diffs.append(f"{key} {_value(old[key])} -> {_value(args[key])}")
            parts.append("training_args " + (", ".join(diffs) or "the same"))
        else:
            shown = ", ".join(f"{k}={_value(v)}" for k, v in sorted(args.items()))
            parts.append(f"training_args {{{shown}}}")
    if "round_limit" in changes:
        limit = changes["round_limit"]
        text = (
            f"round_limit {before['round_limit']} -> {limit}"
            if "round_limit" in before
            else f"round_limit {limit}"
        )
        parts.append(text + (" (reopens the completed job)" if reopens else ""))
    for key in sorted(set(changes) - {"nodes", "training_args", "round_limit"}):
        parts.append(f"{key} {_value(changes[key])}")
    return "; ".join(parts) or "nothing"


def round_facts(records: Iterable[Record]) -> list[RoundFacts]:
    """Every round sent in ``records``, in order (a later duplicate reply is not counted)."""
    rounds: dict[int, RoundFacts] = {}
    settings: dict[str, Any] = {}
    pending: list[dict[str, Any]] = []  # changes recorded since the last round was sent
    initial_params = True
    completed = False
    for r in records:
        e: Any = r.event
        if isinstance(e, ev.JobCreated):
            settings = {
                "nodes": list(e.nodes),
                "training_args": dict(e.training_args),
                "round_limit": e.round_limit,
            }
            continue
        if isinstance(e, ev.SettingsChanged):
            reopens = completed and "round_limit" in e.changes
            pending.append(
                {
                    "seq": r.seq,
                    "kind": "settings",
                    "after_round": e.round,
                    "changes": dict(e.changes),
                    "text": describe_changes(e.changes, settings, reopens=reopens),
                }
            )
            settings = {**settings, **e.changes}
            completed = False
            continue
        if isinstance(e, ev.ParamsUploaded):
            if not initial_params:
                pending.append(
                    {
                        "seq": r.seq,
                        "kind": "params",
                        "after_round": e.round,
                        "sha256": e.sha256,
                        "text": f"parameters replaced by the researcher: {e.sha256}",
                    }
                )
            initial_params = False
            continue
        if isinstance(e, ev.RoundSent):
            rounds[e.round] = RoundFacts(
                e.round,
                r.seq,
                r.ts,
                list(e.nodes),
                dict(e.request_ids),
                e.params_sha256,
                e.deadline - r.ts,
                validation=not e.do_training,
                changes_before=pending,
            )
            pending = []
            continue
        facts = rounds.get(getattr(e, "round", -1))
        if facts is None:
            continue
        after = r.ts - facts.sent_ts
        if isinstance(e, ev.JobCompleted):
            completed = True
            facts.completed = {"seq": r.seq, "after_s": after, "params_sha256": e.params_sha256}
        elif isinstance(e, ev.RoundResent):
            facts.resent.append({"seq": r.seq, "after_s": after, "nodes": list(e.nodes)})
        elif isinstance(e, ev.ReplyReceived) and e.node_id not in facts.replies:
            facts.replies[e.node_id] = NodeReply(
                e.node_id,
                r.seq,
                after,
                e.sample_size,
                None,
                dict(e.metrics),
                dict(e.timing),
                e.params_sha256,
            )
        elif isinstance(e, ev.NodeFailed):
            facts.failures.append(
                {
                    "node": e.node_id,
                    "seq": r.seq,
                    "after_s": after,
                    "code": e.code,
                    "message": e.message,
                }
            )
        elif isinstance(e, ev.NodeRetrying):
            facts.retries.append(
                {
                    "node": e.node_id,
                    "seq": r.seq,
                    "after_s": after,
                    "code": e.code,
                    "message": e.message,
                    "retry_after_s": e.retry_at - facts.sent_ts,
                }
            )
        elif isinstance(e, ev.RoundTimedOut):
            facts.timed_out = {"seq": r.seq, "after_s": after, "missing": list(e.missing)}
        elif isinstance(e, ev.Aggregated):
            for node, weight in e.weights.items():
                if node in facts.replies:
                    facts.replies[node].weight = weight
            facts.aggregate = {
                "seq": r.seq,
                "after_s": after,
                "params_sha256": e.params_sha256,
                "nodes": list(e.nodes),
                "weights": dict(e.weights),
                "aggregator": e.aggregator,
            }
    return [rounds[n] for n in sorted(rounds)]


def _plus(seconds: float) -> str:
    return f"+{seconds:.3f}s"


def format_round(facts: RoundFacts) -> str:
    """``fedsm replay --round N`` as text."""
    lines = [f"  before it: {c['text']} (seq {c['seq']})" for c in facts.changes_before]
    if facts.validation:
        lines.insert(
            0,
            f"round {facts.round}: validation only, sent at seq {facts.sent_seq} to "
            f"{len(facts.asked)} nodes to validate params {facts.params_sha256} (nothing "
            f"trained), deadline +{facts.deadline_after_s:.1f}s",
        )
    else:
        lines.insert(
            0,
            f"round {facts.round}: sent at seq {facts.sent_seq} to {len(facts.asked)} nodes "
            f"with params {facts.params_sha256}, deadline +{facts.deadline_after_s:.1f}s",
        )
    for item in facts.retries:
        lines.append(
            f"  {item['node']} busy at +{item['after_s']:.3f}s (seq {item['seq']}) "
            f"[{item['code']}] {item['message']}; asked again from "
            f"+{item['retry_after_s']:.3f}s"
        )
    for item in facts.resent:
        lines.append(f"  re-sent at +{item['after_s']:.3f}s (seq {item['seq']}) to {item['nodes']}")
    lines.append(
        f"  {'node':<16} {'seq':>5} {'answered':>10} {'samples':>8} {'weight':>8} "
        f"{'train':>8} {'transfer':>8} {'waiting':>8}  metrics"
    )
    failed = {f["node"]: f for f in facts.failures}
    missing = set(facts.timed_out["missing"]) if facts.timed_out else set()
    for node in facts.asked:
        reply = facts.replies.get(node)
        if reply is not None:
            weight = "-" if reply.weight is None else f"{reply.weight:g}"
            metrics = " ".join(f"{k}={v:.4g}" for k, v in sorted(reply.metrics.items()))
            lines.append(
                f"  {node:<16} {reply.seq:>5} {_plus(reply.after_s):>10} "
                f"{reply.sample_size:>8} {weight:>8} {reply.training_s:>8.3f} "
                f"{reply.transfer_s:>8.3f} {reply.waiting_s:>8.3f}  {metrics}"
            )
        elif node in failed:
            f = failed[node]
            lines.append(
                f"  {node:<16} {f['seq']:>5} {_plus(f['after_s']):>10}  "
                f"FAILED [{f['code']}] {f['message']}"
            )
        elif node in missing:
            lines.append(f"  {node:<16} {'-':>5} {'-':>10}  no answer (timed out)")
        else:
            lines.append(f"  {node:<16} {'-':>5} {'-':>10}  no answer yet")
    if facts.timed_out:
        t = facts.timed_out
        lines.append(
            f"  timed out at {_plus(t['after_s'])} (seq {t['seq']}), missing {t['missing']}"
        )
    aggregated = facts.aggregated_metrics()
    if aggregated:
        text = " ".join(f"{k}={v:.4g}" for k, v in aggregated.items())
        what = "validation metrics" if facts.validation else "metrics"
        lines.append(f"  sample-weighted {what}: {text}")
    if facts.validation:
        others = sorted(
            n for n, reply in facts.replies.items() if reply.params_sha256 != facts.params_sha256
        )
        lines.append(
            f"  validated, not aggregated: {len(facts.replies)} nodes validated params "
            f"{facts.params_sha256}"
            + (f"; but {others} answered with other params" if others else "")
        )
    elif facts.aggregate:
        a = facts.aggregate
        lines.append(
            f"  aggregated ({a['aggregator']}) at +{a['after_s']:.3f}s (seq {a['seq']}) "
            f"from {a['nodes']} -> params {a['params_sha256']}"
        )
    else:
        lines.append("  not aggregated")
    if facts.completed:
        c = facts.completed
        lines.append(
            f"  job completed at +{c['after_s']:.3f}s (seq {c['seq']}) with final params "
            f"{c['params_sha256']}"
        )
    return "\n".join(lines) + "\n"
