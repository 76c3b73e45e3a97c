"""``fedsm report``: a run's training curves, metrics and round timing, from its log alone.

:func:`report_data` turns the log's records into plain per-round data (via
:mod:`fedsm.audit.roundfacts`); :func:`render_png` plots it with matplotlib (the Agg backend, no
display, no pyplot global state); :func:`write_report` writes one of: the PNG; a single HTML
file that embeds the PNG as base64 (it opens without a network) and the data as
``<script type="application/json" id="fedsm-data">`` so scripts and tests can read the
points back; or the per-round data as CSV or JSON, one row per round and node
(:func:`round_rows`). It writes only the file it is given: never next to the log it reads.

The figure opens with the run's configuration (plan class, nodes and their sample sizes,
rounds, ``min_nodes``, seed, training args), its final metrics and the exact audit command
(``fedsm replay LOG --verify --repo DIR``, the repository being the run directory's
``repository/`` when there is one). Then four panels: losses (training loss, validation loss);
accuracy and the other validation metrics (``val_*`` after local training, ``global_val_*``
of the global model before it); each node's round time split into training, transfer and
waiting (see :mod:`fedsm.audit.roundfacts`), a node that timed out drawn as a hatched bar up
to the round's deadline and a failed node as a hatched bar up to its error. With more than
:data:`BAND_ABOVE` nodes, a panel shows the spread across nodes (a band from the lowest to
the highest node, a dashed line at the median node) instead of one colour per node, and the
timing panel the median node's split with a whisker from the fastest to the slowest node.

A validation-only round (the final validation, when the training args have
``test_on_global_updates``: the nodes validate the last aggregate and train nothing) is
shaded, its points are stars and its weighted value a large black star labelled with its
value; the aggregated curves join training rounds only. What the researcher changed
between rounds (``SettingsChanged``: nodes, training args, round limit; parameters replaced
by ``update_parameters``) is a dotted purple line between the rounds, described in the top
panel.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import re
import shlex
import statistics
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedsm.audit.replay import resolve_log
from fedsm.audit.roundfacts import round_facts
from fedsm.core import events as ev
from fedsm.errors import FedsmError
from fedsm.log.read import Record, scan

__all__ = [
    "BAND_ABOVE",
    "ReportError",
    "audit_command",
    "build_figure",
    "format_header",
    "render_png",
    "report_data",
    "round_rows",
    "write_report",
]

#: Metric names plotted as validation metrics start with one of these.
VALIDATION_PREFIXES = ("val_", "global_val_")
#: With more nodes than this, the panels show the spread across nodes, not each node.
BAND_ABOVE = 12
#: What :func:`write_report` writes, by the output's suffix.
OUTPUT_SUFFIXES = (".html", ".htm", ".png", ".csv", ".json")
_TIMING_PARTS = (
    ("training_s", "training", "#4c72b0"),
    ("transfer_s", "transfer", "#dd8452"),
    ("waiting_s", "waiting", "#c8c8c8"),
)
_TIMED_OUT = {"color": "#f6c85f", "hatch": "///", "edgecolor": "#b07d00"}
_FAILED = {"color": "#f4a3a3", "hatch": "xx", "edgecolor": "#c03030"}
#: The timing columns of :func:`round_rows`, after the metrics.
TIMING_COLUMNS = ("after_s", "training_s", "transfer_s", "waiting_s", "deadline_s")


class ReportError(FedsmError):
    """A report that can't be written (e.g. an output suffix it doesn't know)."""


# --------------------------------------------------------------------------- data


def audit_command(log: str | Path) -> str:
    """``fedsm replay LOG --verify --repo DIR`` with this log's absolute path; ``DIR`` is the
    run directory's ``repository/`` when there is one (a demo run), else left as ``DIR``
    (the log names files by digest only: where they are is not in it)."""
    log = Path(log).absolute()
    run = log.parent.parent if log.parent.name == "researcher" else log.parent
    repository = run / "repository"
    repo = shlex.quote(str(repository)) if repository.is_dir() else "DIR"
    return f"fedsm replay {shlex.quote(str(log))} --verify --repo {repo}"


def _config(created: Any, rounds: Sequence[Any], changes: int) -> dict[str, Any]:
    """The run's configuration (from ``JobCreated``) and each node's sample sizes (from
    its replies: ``train`` in training rounds, ``validation`` in validation-only ones)."""
    nodes: list[str] = list(created.nodes) if created else []
    samples: dict[str, dict[str, int]] = {}
    for facts in rounds:
        for node in facts.asked:
            if node not in nodes:
                nodes.append(node)
        for node, reply in facts.replies.items():
            kind = "validation" if facts.validation else "train"
            samples.setdefault(node, {})[kind] = reply.sample_size
    trained = [f for f in rounds if not f.validation]
    return {
        "training_plan_class": created.training_plan_class if created else None,
        "seed": created.seed if created else None,
        "min_nodes": created.min_nodes if created else None,
        "round_limit": created.round_limit if created else None,
        "reply_deadline_s": created.reply_deadline_s if created else None,
        "aggregator": created.aggregator if created else None,
        "training_args": dict(created.training_args) if created else {},
        "model_args": dict(created.model_args) if created else {},
        "nodes": nodes,
        "samples": {node: samples[node] for node in nodes if node in samples},
        "rounds_sent": len(rounds),
        "rounds_trained": len(trained),
        "rounds_aggregated": sum(1 for f in trained if f.aggregate),
        "validation_rounds": [f.round for f in rounds if f.validation],
        "settings_changes": changes,
    }


def _final_metrics(rounds: Sequence[Any]) -> list[dict[str, Any]]:
    """The weighted metrics of the last training round with replies, and of the last
    validation-only round after it (the final validation)."""
    out: list[dict[str, Any]] = []
    trained = [f for f in rounds if not f.validation and f.replies]
    if trained:
        last = trained[-1]
        out.append({"round": last.round, "validation": False, **_weighted(last)})
    validated = [f for f in rounds if f.validation and f.replies]
    if validated and (not trained or validated[-1].round > trained[-1].round):
        last = validated[-1]
        out.append({"round": last.round, "validation": True, **_weighted(last)})
    return out


def _weighted(facts: Any) -> dict[str, Any]:
    return {"metrics": facts.aggregated_metrics(), "nodes": len(facts.replies)}


def report_data(records: Sequence[Record], *, log: str | Path | None = None) -> dict[str, Any]:
    """Everything the report shows, as JSON-ready data.

    ``config``: the run's configuration (see :func:`format_header`); ``final_metrics``: the
    weighted metrics of the last training round and of the final validation;
    ``audit_command``: :func:`audit_command` of ``log`` (None without it);
    ``points``: one ``{round, node, metric, value}`` per metric of each counted reply;
    ``aggregated``: ``{round, metric, value}``, sample-weighted over the round's replies;
    ``timing``: ``{round, node, training_s, transfer_s, waiting_s, after_s}`` per reply;
    ``failures`` / ``timeouts``: the nodes that failed or did not answer, per round (a
    timeout has the round's ``deadline_s``, counted from when the round was sent);
    ``validation_rounds``: the validation-only rounds (points, aggregated values and timing
    of those rounds have ``validation`` set);
    ``changes``: ``{seq, kind, after_round, text, ...}`` per settings change (``kind``
    ``settings``) or parameters replaced (``params``) before a round was sent;
    ``rounds``: the full :class:`~fedsm.audit.roundfacts.RoundFacts` of each round.
    """
    created: Any = next((r.event for r in records if isinstance(r.event, ev.JobCreated)), None)
    final = next((r.event for r in records if isinstance(r.event, ev.JobCompleted)), None)
    status = "completed" if final is not None else "unfinished"
    for r in records:
        if isinstance(r.event, (ev.JobFailed, ev.JobCancelled)):
            status = f"{type(r.event).__name__}: {r.event.reason}"
    round_limit = created.round_limit if created else None
    for r in records:
        if isinstance(r.event, ev.SettingsChanged) and "round_limit" in r.event.changes:
            round_limit = r.event.changes["round_limit"]
    rounds = round_facts(records)
    points, aggregated, timing, failures, timeouts = [], [], [], [], []
    changes: list[dict[str, Any]] = []
    for facts in rounds:
        validation = facts.validation
        changes.extend(facts.changes_before)
        for node in sorted(facts.replies):
            reply = facts.replies[node]
            for metric, value in sorted(reply.metrics.items()):
                points.append(
                    {
                        "round": facts.round,
                        "node": node,
                        "metric": metric,
                        "value": value,
                        "validation": validation,
                    }
                )
            timing.append(
                {
                    "round": facts.round,
                    "node": node,
                    "after_s": reply.after_s,
                    "training_s": reply.training_s,
                    "transfer_s": reply.transfer_s,
                    "waiting_s": reply.waiting_s,
                    "validation": validation,
                }
            )
        for metric, value in facts.aggregated_metrics().items():
            aggregated.append(
                {"round": facts.round, "metric": metric, "value": value, "validation": validation}
            )
        for failure in facts.failures:
            failures.append({"round": facts.round, **failure})
        if facts.timed_out:
            timeouts.append(
                {"round": facts.round, "deadline_s": facts.deadline_after_s, **facts.timed_out}
            )
    config = _config(created, rounds, sum(1 for c in changes if c["kind"] == "settings"))
    return {
        "job_id": created.job_id if created else None,
        "nodes": list(created.nodes) if created else [],
        "round_limit": round_limit,
        "status": status,
        "final_params_sha256": final.params_sha256 if final is not None else None,
        "config": config,
        "final_metrics": _final_metrics(rounds),
        "audit_command": audit_command(log) if log is not None else None,
        "points": points,
        "aggregated": aggregated,
        "timing": timing,
        "failures": failures,
        "timeouts": timeouts,
        "validation_rounds": [f.round for f in rounds if f.validation],
        "changes": changes,
        "rounds": [facts.to_dict() for facts in rounds],
    }


def round_rows(data: dict[str, Any]) -> tuple[list[str], list[dict[str, Any]]]:
    """The per-round data as ``(columns, rows)``: one row per round and node asked.

    Columns: ``round, node, kind`` (``train`` or ``validation``), ``status`` (``replied``,
    ``failed``, ``timed out`` or ``no answer`` in an unfinished round), ``samples``,
    ``weight`` (in the aggregate; empty when not aggregated), one column per metric,
    then :data:`TIMING_COLUMNS`: seconds from the round being sent to the reply (or the
    error, or the timeout), its training, transfer and waiting parts, and the round's
    deadline. A value that does not apply is ``None`` (empty in CSV).
    """
    metrics = sorted({p["metric"] for p in data["points"]})
    columns = ["round", "node", "kind", "status", "samples", "weight", *metrics, *TIMING_COLUMNS]
    rows: list[dict[str, Any]] = []
    for r in data["rounds"]:
        failed = {f["node"]: f for f in r["failures"]}
        missing = set(r["timed_out"]["missing"]) if r["timed_out"] else set()
        for node in r["asked"]:
            row: dict[str, Any] = dict.fromkeys(columns)
            row.update(
                round=r["round"],
                node=node,
                kind="validation" if r["validation"] else "train",
                deadline_s=r["deadline_after_s"],
            )
            reply = r["replies"].get(node)
            if reply is not None:
                row.update(status="replied", samples=reply["sample_size"], weight=reply["weight"])
                row.update({m: reply["metrics"].get(m) for m in metrics})
                row.update({k: reply[k] for k in TIMING_COLUMNS[:4]})
            elif node in failed:
                row.update(status="failed", after_s=failed[node]["after_s"])
            elif node in missing:
                row.update(status="timed out", after_s=r["timed_out"]["after_s"])
            else:
                row.update(status="no answer")
            rows.append(row)
    return columns, rows


# --------------------------------------------------------------------------- the header


def _args(args: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in args.items())


def _natural(name: str) -> list[Any]:
    """``node-2`` before ``node-10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _sizes(values: list[int]) -> str:
    if not values:
        return "-"
    low, high = min(values), max(values)
    if low == high:
        return f"{low} each"
    return f"{low} / {statistics.median(values):g} / {high} (min / median / max)"


def header_lines(data: dict[str, Any]) -> list[str]:
    """The report's header, one item per line (long ones are wrapped when drawn)."""
    c = data["config"]
    lines = [
        f"job {data['job_id']} ({data['status']}) - plan {c['training_plan_class']}, "
        f"seed {c['seed']}, aggregator {c['aggregator']}",
    ]
    nodes, samples = c["nodes"], c["samples"]
    if len(nodes) <= BAND_ABOVE:
        each = []
        for node in nodes:
            mine = samples.get(node, {})
            size = "/".join(str(mine[k]) for k in ("train", "validation") if k in mine)
            each.append(f"{node} ({size or 'no reply'})")
        lines.append(
            f"{len(nodes)} nodes, min_nodes {c['min_nodes']}; samples (train/validation): "
            + ", ".join(each)
        )
    else:
        train = [s["train"] for s in samples.values() if "train" in s]
        valid = [s["validation"] for s in samples.values() if "validation" in s]
        ordered = sorted(nodes, key=_natural)
        lines.append(
            f"{len(nodes)} nodes ({ordered[0]} ... {ordered[-1]}), min_nodes {c['min_nodes']}; "
            f"training samples per node {_sizes(train)}, {sum(train)} in all"
            + (f"; validation samples {_sizes(valid)}" if valid else "")
        )
    validation = c["validation_rounds"]
    lines.append(
        f"rounds: {c['rounds_trained']} trained ({c['rounds_aggregated']} aggregated) of "
        f"round_limit {data['round_limit']}"
        + (f", validation only: {', '.join(map(str, validation))}" if validation else "")
        + f"; reply deadline {c['reply_deadline_s']:g}s"
        + (f"; settings changed {c['settings_changes']}x" if c["settings_changes"] else "")
    )
    lines.append(f"training args: {_args(c['training_args'])}")
    if c["model_args"]:
        lines.append(f"model args: {_args(c['model_args'])}")
    for final in data["final_metrics"]:
        what = "final validation" if final["validation"] else "last training round"
        metrics = ", ".join(f"{k}={v:.4g}" for k, v in final["metrics"].items()) or "-"
        lines.append(f"{what} (round {final['round']}, {final['nodes']} nodes): {metrics}")
    if data["final_params_sha256"]:
        lines.append(f"final params sha256 {data['final_params_sha256']}")
    command = data.get("audit_command")
    if command:
        if command.endswith(" --repo DIR"):
            command += "   (DIR: the run's file repository; the log names files by digest only)"
        lines.append(f"audit: {command}")
    return lines


def format_header(data: dict[str, Any]) -> str:
    """:func:`header_lines` as text (what ``fedsm report LOG`` prints)."""
    return "\n".join(header_lines(data)) + "\n"


# --------------------------------------------------------------------------- plotting


def _short(name: str) -> str:
    return name.removeprefix("global_val_").removeprefix("val_").removeprefix("train_")


def _by_round(data: dict[str, Any], name: str, validation: bool) -> dict[int, list[float]]:
    out: dict[int, list[float]] = {}
    for p in data["points"]:
        if p["metric"] == name and bool(p.get("validation")) == validation:
            out.setdefault(p["round"], []).append(p["value"])
    return out


def _node_points(ax: Any, data: dict[str, Any], names: Sequence[str], nodes: list[str]) -> None:
    """One colour per node, one marker shape per metric."""
    for i, name in enumerate(names):
        shape = ["o", "s", "^", "D"][i % 4]
        for j, node in enumerate(nodes):
            mine = [p for p in data["points"] if p["node"] == node and p["metric"] == name]
            label = node if i == 0 else None  # colours are nodes; shapes and lines, metrics
            for validated in (False, True):
                xy = [
                    (p["round"], p["value"]) for p in mine if bool(p.get("validation")) is validated
                ]
                if not xy:
                    continue
                xs, ys = zip(*xy, strict=True)
                ax.plot(
                    xs,
                    ys,
                    marker="*" if validated else shape,
                    markersize=10 if validated else 6,
                    linestyle="none",
                    color=f"C{j % 10}",
                    alpha=0.8 if validated else 0.7,
                    label=label,
                )
                label = None


def _node_bands(ax: Any, data: dict[str, Any], names: Sequence[str]) -> None:
    """Per metric: a band from the lowest to the highest node, a dashed median line."""
    for i, name in enumerate(names):
        color = f"C{i % 10}"
        trained = _by_round(data, name, False)
        if trained:
            xs = sorted(trained)
            low = [min(trained[x]) for x in xs]
            mid = [statistics.median(trained[x]) for x in xs]
            high = [max(trained[x]) for x in xs]
            ax.fill_between(xs, low, high, color=color, alpha=0.18, linewidth=0)
            ax.vlines(xs, low, high, color=color, alpha=0.5, linewidth=4)
            ax.plot(
                xs,
                mid,
                color=color,
                linestyle="--",
                linewidth=1.2,
                marker="_",
                markersize=12,
                label=f"{name}: nodes min-max, median",
            )
        validated = _by_round(data, name, True)
        for x in sorted(validated):
            ax.vlines(x, min(validated[x]), max(validated[x]), color=color, alpha=0.5, linewidth=4)
            ax.plot(x, statistics.median(validated[x]), marker="*", color=color, markersize=10)
        if validated and not trained:
            ax.plot([], [], color=color, linewidth=4, alpha=0.5, label=f"{name}: nodes min-max")


def _metric_panel(
    ax: Any, data: dict[str, Any], names: Sequence[str], title: str, *, describe: bool = False
) -> None:
    nodes = data["config"]["nodes"] if "config" in data else data["nodes"]
    band = len(nodes) > BAND_ABOVE
    if not names:
        ax.text(
            0.5,
            0.5,
            "no such metrics in this run (training_args test_ratio = 0?)",
            ha="center",
            va="center",
            transform=ax.transAxes,
            color="#666666",
        )
    if band:
        _node_bands(ax, data, names)
    else:
        _node_points(ax, data, names, nodes)
    starred = False
    for i, name in enumerate(names):
        style = ["-", "--", ":", "-."][i % 4]
        shape = ["o", "s", "^", "D"][i % 4]
        many = len(names) > 1
        mine = [a for a in data["aggregated"] if a["metric"] == name]
        agg = [(a["round"], a["value"]) for a in mine if not a.get("validation")]
        if agg:
            xs, ys = zip(*agg, strict=True)
            ax.plot(
                xs,
                ys,
                color="black",
                linestyle=style,
                linewidth=2,
                marker=shape if many else None,
                markerfacecolor="none",
                label=f"aggregated {name}" if many else f"{name} aggregated (weighted)",
            )
        for a in (a for a in mine if a.get("validation")):
            ax.plot(
                a["round"],
                a["value"],
                marker="*",
                markersize=18,
                markeredgecolor="white",
                color="black",
                linestyle="none",
                label=None if starred else "validation round (weighted)",
            )
            ax.annotate(
                f"{_short(name)} {a['value']:.4g}" if many else f"{a['value']:.4g}",
                (a["round"], a["value"]),
                xytext=(10, -3),
                textcoords="offset points",
                fontsize=8,
                fontweight="bold",
            )
            starred = True
    _mark_problems(ax, data)
    _mark_rounds(ax, data, describe=describe)
    ax.set_title(title + (f" (spread across {len(nodes)} nodes)" if band else ""))
    _legend(ax)


def _legend(ax: Any) -> None:
    """The panel's legend, right of the plot (the panels keep one width)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))


def _mark_rounds(ax: Any, data: dict[str, Any], *, describe: bool = False) -> None:
    """Validation-only rounds shaded; a dotted line where the researcher changed settings
    or replaced the parameters (between the rounds), with what changed when ``describe``."""
    for i, rnd in enumerate(data.get("validation_rounds", ())):
        ax.axvspan(
            rnd - 0.45,
            rnd + 0.45,
            color="#8fbcd4",
            alpha=0.2,
            label="validation only (nothing trained)" if i == 0 else None,
        )
    by_gap: dict[int, list[str]] = {}
    for change in data.get("changes", ()):
        if change["kind"] == "params":
            text = f"params replaced ({change['sha256'][:12]})"
        else:
            text = change["text"]
        by_gap.setdefault(change["after_round"], []).append(text)
    transform = ax.get_xaxis_transform()
    for i, (after, texts) in enumerate(sorted(by_gap.items())):
        x = after + 0.5
        ax.axvline(
            x,
            color="purple",
            linestyle=":",
            linewidth=1.5,
            label="settings changed / params replaced" if i == 0 else None,
        )
        if describe:
            lines = [f"after round {after}:"]
            for text in texts:
                lines.extend(textwrap.wrap(text, 48, subsequent_indent="  "))
            ax.text(
                x + 0.03,
                0.97,
                "\n".join(lines),
                transform=transform,
                fontsize=7,
                color="purple",
                va="top",
                ha="left",
                bbox={"facecolor": "white", "alpha": 0.85, "edgecolor": "purple"},
            )


def _mark_problems(ax: Any, data: dict[str, Any]) -> None:
    """A red x per failed node and an orange band per timed-out round, at the panel's top."""
    transform = ax.get_xaxis_transform()  # x in data, y in axes fractions
    for i, failure in enumerate(data["failures"]):
        ax.plot(
            failure["round"],
            0.95,
            marker="x",
            color="red",
            markersize=9,
            transform=transform,
            linestyle="none",
            label="node failed" if i == 0 else None,
        )
    for i, timeout in enumerate(data["timeouts"]):
        ax.axvspan(
            timeout["round"] - 0.45,
            timeout["round"] + 0.45,
            color="orange",
            alpha=0.12,
            label="round timed out" if i == 0 else None,
        )


def _stack(ax: Any, xs: list[float], rows: list[dict[str, Any]], width: float) -> None:
    bottoms = [0.0] * len(rows)
    for key, label, color in _TIMING_PARTS:
        heights = [t[key] for t in rows]
        ax.bar(xs, heights, width, bottom=bottoms, color=color, label=label)
        bottoms = [b + h for b, h in zip(bottoms, heights, strict=True)]


def _nodes_in_order(data: dict[str, Any]) -> list[str]:
    nodes = list(data["config"]["nodes"]) if "config" in data else list(data["nodes"])
    for t in data["timing"]:
        if t["node"] not in nodes:
            nodes.append(t["node"])
    return nodes


def _timing_panel(ax: Any, data: dict[str, Any]) -> None:
    nodes = _nodes_in_order(data)
    band = len(nodes) > BAND_ABOVE
    # (x, height, width, style, label) of the bars of nodes that failed or timed out.
    problems: list[tuple[float, float, float, dict[str, str], str]] = []
    if band:
        width = 0.5
        title = (
            f"time per round, {len(nodes)} nodes: the median node's split (bars), "
            "fastest to slowest node (whisker)"
        )
        xs, rows, low, high = [], [], [], []
        for rnd in sorted({t["round"] for t in data["timing"]}):
            mine = sorted(
                (t for t in data["timing"] if t["round"] == rnd),
                key=lambda t: t["training_s"] + t["transfer_s"] + t["waiting_s"],
            )
            total = [t["training_s"] + t["transfer_s"] + t["waiting_s"] for t in mine]
            xs.append(rnd)
            rows.append(mine[(len(mine) - 1) // 2])
            low.append(total[0])
            high.append(total[-1])
        _stack(ax, xs, rows, width)
        if xs:
            mid = [sum(t[k] for k, _, _ in _TIMING_PARTS) for t in rows]
            ax.errorbar(
                xs,
                mid,
                yerr=[
                    [m - lo for m, lo in zip(mid, low, strict=True)],
                    [h - m for m, h in zip(mid, high, strict=True)],
                ],
                fmt="none",
                ecolor="black",
                capsize=6,
                label="fastest - slowest node",
            )
        failed: dict[int, list[float]] = {}
        for f in data["failures"]:
            failed.setdefault(f["round"], []).append(f["after_s"])
        for rnd, times in failed.items():  # one bar per round, to its last error
            problems.append((rnd - 0.32, max(times), 0.12, _FAILED, f"{len(times)} failed"))
        for t in data["timeouts"]:
            text = f"{len(t['missing'])} timed out"
            problems.append((t["round"] + 0.32, t["deadline_s"], 0.12, _TIMED_OUT, text))
    else:
        width = 0.8 / max(1, len(nodes))
        title = "time per node and round (bars: nodes in order " + ", ".join(nodes) + ")"

        def x_of(rnd: int, node: str) -> float:
            return rnd - 0.4 + width * (nodes.index(node) + 0.5)

        _stack(
            ax, [x_of(t["round"], t["node"]) for t in data["timing"]], data["timing"], width * 0.9
        )
        for f in data["failures"]:
            problems.append((x_of(f["round"], f["node"]), f["after_s"], width * 0.9, _FAILED, ""))
        for t in data["timeouts"]:
            for node in t["missing"]:
                x = x_of(t["round"], node)
                problems.append((x, t["deadline_s"], width * 0.9, _TIMED_OUT, ""))
    labelled: set[str] = set()
    for x, height, w, style, _text in problems:
        what = (
            "timed out: waited to the deadline"
            if style is _TIMED_OUT
            else "failed: until its error"
        )
        ax.bar(
            x,
            height,
            w,
            color=style["color"],
            hatch=style["hatch"],
            edgecolor=style["edgecolor"],
            linewidth=0.8,
            label=None if what in labelled else what,
        )
        labelled.add(what)
    clipped = _clip_deadlines(ax, data, problems)
    for x, height, _w, style, text in problems:
        if text and not (style is _TIMED_OUT and round(x) in clipped):
            ax.annotate(
                text,
                (x, height),
                xytext=(0, 2),
                textcoords="offset points",
                ha="center",
                va="bottom",
                fontsize=7,
                color=style["edgecolor"],
            )
    _mark_problems(ax, data)
    _mark_rounds(ax, data)
    ax.set_title(textwrap.shorten(title, 110, placeholder=" ...)"), fontsize="medium")
    ax.set_ylabel("seconds")
    _legend(ax)


def _clip_deadlines(ax: Any, data: dict[str, Any], problems: list[Any]) -> set[int]:
    """A deadline far above the replies' times would flatten every other bar: cut the axis
    above the replies and write each cut bar's height on it. Returns the rounds cut."""
    replies = [t["training_s"] + t["transfer_s"] + t["waiting_s"] for t in data["timing"]]
    replies += [p[1] for p in problems if p[3] is _FAILED]
    top = max(replies, default=0.0)
    tall = [p for p in problems if p[3] is _TIMED_OUT]
    if top <= 0 or not tall or max(p[1] for p in tall) <= 4 * top:
        return set()
    ax.set_ylim(0, top * 1.45)
    written: set[int] = set()
    for x, height, _w, _style, text in tall:
        rnd = round(x)
        if rnd in written or height <= top * 1.45:
            continue
        written.add(rnd)
        missing = next((len(t["missing"]) for t in data["timeouts"] if t["round"] == rnd), 0)
        label = text or f"{missing} timed out"
        ax.annotate(
            f"{label}:\nwaited to +{height:.4g}s \u2191",
            (x, top * 1.38),
            ha="center",
            va="top",
            fontsize=7,
            color="#8a5a00",
            bbox={"facecolor": "white", "alpha": 0.85, "edgecolor": _TIMED_OUT["edgecolor"]},
        )
    return written


def _header(ax: Any, data: dict[str, Any]) -> None:
    ax.axis("off")
    lines: list[str] = []
    for line in header_lines(data):
        if line.startswith("audit: "):
            lines.append("audit:")
            line = "  " + line.removeprefix("audit: ")
        lines.extend(
            textwrap.wrap(line, 128, subsequent_indent="    ", break_long_words=False) or [""]
        )
    ax.text(
        0.0,
        1.0,
        "\n".join(lines),
        transform=ax.transAxes,
        va="top",
        ha="left",
        family="monospace",
        fontsize=7.5,
        linespacing=1.35,
    )


def build_figure(data: dict[str, Any], *, dpi: int = 100) -> Any:
    """The report's matplotlib ``Figure`` (10 x 12 inches): the header, then the loss,
    accuracy and timing panels. Not drawn yet: :func:`render_png` draws it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    if "config" not in data:  # data from before the header existed
        data = {**data, "config": _config(None, [], 0)}
        data["config"]["nodes"] = list(data["nodes"])
    metrics = sorted({p["metric"] for p in data["points"]})
    validation = [m for m in metrics if m.startswith(VALIDATION_PREFIXES)]
    losses = [m for m in ("train_loss",) if m in metrics] + [m for m in validation if "loss" in m]
    others = [m for m in validation if "loss" not in m]
    fig = Figure(figsize=(10, 12), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    head, loss, acc, timing = fig.subplots(
        4, 1, gridspec_kw={"height_ratios": [0.17 * (len(header_lines(data)) + 2), 3, 2.6, 2.6]}
    )
    _header(head, data)
    _metric_panel(loss, data, losses, "loss (training, validation)", describe=True)
    accuracy = bool(others) and all("accuracy" in m for m in others)
    _metric_panel(
        acc,
        data,
        others,
        "validation accuracy" if accuracy else "validation metrics (other than loss)",
    )
    _timing_panel(timing, data)
    last = max((r["round"] for r in data["rounds"]), default=1)
    validating = set(data.get("validation_rounds", ()))

    def tick(x: float, _pos: Any) -> str:
        n = round(x)
        return f"{n}\nvalidation" if n in validating and abs(x - n) < 1e-9 else f"{n}"

    for ax in (loss, acc, timing):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.xaxis.set_major_formatter(FuncFormatter(tick))
        ax.set_xlim(0.5, last + 0.5)
    timing.set_xlabel("round")
    return fig


def render_png(data: dict[str, Any], *, dpi: int = 100) -> bytes:
    """The report's figure as PNG bytes (1000 x 1200 pixels at the default ``dpi``)."""
    buffer = io.BytesIO()
    build_figure(data, dpi=dpi).savefig(buffer, format="png")
    return buffer.getvalue()


# --------------------------------------------------------------------------- output


def _html(data: dict[str, Any], png: bytes, log: Path) -> str:
    rows = []
    for r in data["rounds"]:
        for change in r["changes_before"]:
            rows.append(
                '<tr class="change"><td colspan="8">'
                + html.escape(f"after round {change['after_round']}: {change['text']}")
                + f" (seq {change['seq']})</td></tr>"
            )
        agg = r["aggregate"]
        if r["validation"]:
            outcome = "validation only: " + r["params_sha256"][:16] + " validated"
        else:
            outcome = agg["params_sha256"][:16] if agg else "not aggregated"
        failed = ", ".join(f["node"] for f in r["failures"]) or "-"
        missing = ", ".join(r["timed_out"]["missing"]) if r["timed_out"] else "-"
        rows.append(
            "<tr>"
            + "".join(
                f"<td>{html.escape(str(c))}</td>"
                for c in (
                    r["round"],
                    "validation" if r["validation"] else "training",
                    len(r["asked"]),
                    len(r["replies"]),
                    failed,
                    missing,
                    " ".join(f"{k}={v:.4g}" for k, v in r["aggregated_metrics"].items()),
                    outcome,
                )
            )
            + "</tr>"
        )
    # "</" can't appear inside a <script> element; JSON allows "<\/" for it.
    blob = json.dumps(data, sort_keys=True).replace("</", "<\\/")
    title = html.escape(f"fedsm report: job {data['job_id']}")
    image = base64.b64encode(png).decode("ascii")
    header = html.escape(format_header(data))
    command = html.escape(data["audit_command"] or "fedsm replay LOG --verify --repo DIR")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:sans-serif;margin:2em}}td,th{{border:1px solid #ccc;padding:2px 6px}}
table{{border-collapse:collapse}}img{{max-width:100%}}tr.change td{{color:purple}}
pre{{white-space:pre-wrap}}</style></head>
<body><h1>{title}</h1>
<p>log <code>{html.escape(str(log))}</code>, status {html.escape(data["status"])},
final parameters <code>{html.escape(str(data["final_params_sha256"]))}</code>.
Check it with <code id="audit">{command}</code>.</p>
<pre id="header">{header}</pre>
<table><tr><th>round</th><th>kind</th><th>asked</th><th>replied</th><th>failed</th>
<th>timed out</th><th>sample-weighted metrics</th><th>aggregate</th></tr>
{chr(10).join(rows)}
</table>
<p><img alt="training curves and timing" src="data:image/png;base64,{image}"></p>
<script type="application/json" id="fedsm-data">{blob}</script>
</body></html>
"""


def _csv(data: dict[str, Any]) -> str:
    columns, rows = round_rows(data)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _json(data: dict[str, Any], log: Path) -> str:
    columns, rows = round_rows(data)
    out = {
        "log": str(log),
        "job_id": data["job_id"],
        "status": data["status"],
        "final_params_sha256": data["final_params_sha256"],
        "config": data["config"],
        "final_metrics": data["final_metrics"],
        "audit_command": data["audit_command"],
        "columns": columns,
        "rows": rows,
    }
    return json.dumps(out, indent=1) + "\n"


def load_data(log: str | Path) -> tuple[Path, dict[str, Any]]:
    """The log ``log`` names (a run directory names its log) and its :func:`report_data`.
    Read-only: the log may be live."""
    path = resolve_log(log)
    return path, report_data(scan(path).records, log=path)


def write_report(log: str | Path, out: str | Path) -> Path:
    """Write the report of the job log ``log`` (or a run directory) to ``out``: ``.html``,
    ``.png``, ``.csv`` or ``.json`` (the last two: :func:`round_rows`). Writes ``out`` and
    nothing else; refuses to overwrite the log."""
    out = Path(out)
    suffix = out.suffix.lower()
    if suffix not in OUTPUT_SUFFIXES:
        raise ReportError(
            f"{out}: the report is written as .html, .png, .csv or .json, not {suffix!r}"
        )
    if out.exists() and out.resolve() == resolve_log(log).resolve():
        raise ReportError(f"{out}: that is the log the report reads")
    path, data = load_data(log)
    out.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".png":
        out.write_bytes(render_png(data))
    elif suffix == ".csv":
        out.write_text(_csv(data), encoding="utf-8", newline="")
    elif suffix == ".json":
        out.write_text(_json(data, path), encoding="utf-8")
    else:
        out.write_text(_html(data, render_png(data), path), encoding="utf-8")
    return out
