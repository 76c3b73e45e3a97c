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
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from fedsm.core import events as ev
from fedsm.log.read import Record

__all__ = ["NodeReply", "RoundFacts", "format_round", "round_facts", "weighted_metrics"]


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
    timed_out: dict[str, Any] | None = None
    aggregate: dict[str, Any] | None = None

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


def round_facts(records: Iterable[Record]) -> list[RoundFacts]:
    """Every round sent in ``records``, in order (a later duplicate reply is not counted)."""
    rounds: dict[int, RoundFacts] = {}
    for r in records:
        e: Any = r.event
        if isinstance(e, ev.RoundSent):
            rounds[e.round] = RoundFacts(
                e.round,
                r.seq,
                r.ts,
                list(e.nodes),
                dict(e.request_ids),
                e.params_sha256,
                e.deadline - r.ts,
            )
            continue
        facts = rounds.get(getattr(e, "round", -1))
        if facts is None or isinstance(e, ev.JobCompleted):
            continue
        after = r.ts - facts.sent_ts
        if isinstance(e, ev.RoundResent):
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
    lines = [
        f"round {facts.round}: sent at seq {facts.sent_seq} to {len(facts.asked)} nodes "
        f"with params {facts.params_sha256}, deadline +{facts.deadline_after_s:.1f}s",
    ]
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
        lines.append(f"  sample-weighted metrics: {text}")
    if facts.aggregate:
        a = facts.aggregate
        lines.append(
            f"  aggregated ({a['aggregator']}) at +{a['after_s']:.3f}s (seq {a['seq']}) "
            f"from {a['nodes']} -> params {a['params_sha256']}"
        )
    else:
        lines.append("  not aggregated")
    return "\n".join(lines) + "\n"
