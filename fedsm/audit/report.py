"""``fedsm report``: a run's training curves, metrics and round timing, from its log alone.

:func:`report_data` turns the log's records into plain per-round data (via
:mod:`fedsm.audit.roundfacts`); :func:`render_png` plots it with matplotlib (the Agg backend, no
display, no pyplot global state); :func:`write_report` writes either the PNG or a single
HTML file that embeds the PNG as base64 (it opens without a network) and the data as
``<script type="application/json" id="fedsm-data">`` so scripts and tests can read the
points back.

The figure has three panels: training loss per node and the sample-weighted aggregate;
validation metrics (``val_*`` after local training, ``global_val_*`` of the global model
before it) the same way; and each node's round time split into training, transfer and
waiting (see :mod:`fedsm.audit.roundfacts`). Failed nodes and timed-out rounds are marked.

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
import html
import io
import json
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedsm.audit.replay import resolve_log
from fedsm.audit.roundfacts import round_facts
from fedsm.core import events as ev
from fedsm.errors import FedsmError
from fedsm.log.read import Record, scan

__all__ = ["ReportError", "render_png", "report_data", "write_report"]

#: Metric names plotted in the validation panel start with one of these.
VALIDATION_PREFIXES = ("val_", "global_val_")
_TIMING_PARTS = (
    ("training_s", "training", "#4c72b0"),
    ("transfer_s", "transfer", "#dd8452"),
    ("waiting_s", "waiting", "#c8c8c8"),
)


class ReportError(FedsmError):
    """A report that can't be written (e.g. an output suffix other than .html or .png)."""


def report_data(records: Sequence[Record]) -> dict[str, Any]:
    """Everything the report shows, as JSON-ready data.

    ``points``: one ``{round, node, metric, value}`` per metric of each counted reply;
    ``aggregated``: ``{round, metric, value}``, sample-weighted over the round's replies;
    ``timing``: ``{round, node, training_s, transfer_s, waiting_s, after_s}`` per reply;
    ``failures`` / ``timeouts``: the nodes that failed or did not answer, per round;
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
            timeouts.append({"round": facts.round, **facts.timed_out})
    return {
        "job_id": created.job_id if created else None,
        "nodes": list(created.nodes) if created else [],
        "round_limit": round_limit,
        "status": status,
        "final_params_sha256": final.params_sha256 if final is not None else None,
        "points": points,
        "aggregated": aggregated,
        "timing": timing,
        "failures": failures,
        "timeouts": timeouts,
        "validation_rounds": [f.round for f in rounds if f.validation],
        "changes": changes,
        "rounds": [facts.to_dict() for facts in rounds],
    }


# --------------------------------------------------------------------------- plotting


def _metric_panel(
    ax: Any, data: dict[str, Any], names: Sequence[str], title: str, *, describe: bool = False
) -> None:
    nodes = data["nodes"]
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
    starred = False
    for i, name in enumerate(names):
        style = ["-", "--", ":", "-."][i % 4]
        shape = ["o", "s", "^", "D"][i % 4]
        for j, node in enumerate(nodes):
            mine = [p for p in data["points"] if p["node"] == node and p["metric"] == name]
            label = node if i == 0 else None  # colours are nodes; shapes and lines, metrics
            trained = [(p["round"], p["value"]) for p in mine if not p.get("validation")]
            validated = [(p["round"], p["value"]) for p in mine if p.get("validation")]
            if trained:
                xs, ys = zip(*trained, strict=True)
                ax.plot(
                    xs,
                    ys,
                    marker=shape,
                    linestyle="none",
                    color=f"C{j % 10}",
                    alpha=0.7,
                    label=label,
                )
                label = None
            if validated:
                xs, ys = zip(*validated, strict=True)
                ax.plot(
                    xs,
                    ys,
                    marker="*",
                    markersize=10,
                    linestyle="none",
                    color=f"C{j % 10}",
                    alpha=0.8,
                    label=label,
                )
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
                marker=shape if len(names) > 1 else None,
                markerfacecolor="none",
                label=f"aggregated {name}" if len(names) > 1 else "aggregated (weighted)",
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
            short = name.removeprefix("global_val_")
            ax.annotate(
                f"{short} {a['value']:.4g}" if len(names) > 1 else f"{a['value']:.4g}",
                (a["round"], a["value"]),
                xytext=(10, -3),
                textcoords="offset points",
                fontsize=8,
                fontweight="bold",
            )
            starred = True
    _mark_problems(ax, data)
    _mark_rounds(ax, data, describe=describe)
    ax.set_title(title)
    ax.set_xlabel("round")
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
            timeout["round"] - 0.4,
            timeout["round"] + 0.4,
            color="orange",
            alpha=0.15,
            label="round timed out" if i == 0 else None,
        )


def _timing_panel(ax: Any, data: dict[str, Any]) -> None:
    nodes = data["nodes"] or sorted({t["node"] for t in data["timing"]})
    width = 0.8 / max(1, len(nodes))
    for key, label, color in _TIMING_PARTS:
        xs, heights, bottoms = [], [], []
        for t in data["timing"]:
            index = nodes.index(t["node"]) if t["node"] in nodes else 0
            xs.append(t["round"] - 0.4 + width * (index + 0.5))
            before = [k for k, _, _ in _TIMING_PARTS[: [p[0] for p in _TIMING_PARTS].index(key)]]
            bottoms.append(sum(t[k] for k in before))
            heights.append(t[key])
        ax.bar(xs, heights, width * 0.9, bottom=bottoms, color=color, label=label)
    _mark_problems(ax, data)
    _mark_rounds(ax, data)
    ax.set_title("time per node and round (bars: nodes in order " + ", ".join(nodes) + ")")
    ax.set_xlabel("round")
    ax.set_ylabel("seconds")
    _legend(ax)


def render_png(data: dict[str, Any], *, dpi: int = 100) -> bytes:
    """The report's figure as PNG bytes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    metrics = sorted({p["metric"] for p in data["points"]})
    validation = [m for m in metrics if m.startswith(VALIDATION_PREFIXES)]
    fig = Figure(figsize=(10, 12), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    loss, val, timing = fig.subplots(3, 1)
    _metric_panel(
        loss,
        data,
        [m for m in ("train_loss",) if m in metrics],
        "training loss",
        describe=True,
    )
    _metric_panel(val, data, validation, "validation metrics")
    _timing_panel(timing, data)
    last = max((r["round"] for r in data["rounds"]), default=1)
    validating = set(data.get("validation_rounds", ()))

    def tick(x: float, _pos: Any) -> str:
        n = round(x)
        return f"{n}\nvalidation" if n in validating and abs(x - n) < 1e-9 else f"{n}"

    for ax in (loss, val, timing):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.xaxis.set_major_formatter(FuncFormatter(tick))
        ax.set_xlim(0.5, last + 0.5)
    fig.suptitle(f"job {data['job_id']} ({data['status']})")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
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
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:sans-serif;margin:2em}}td,th{{border:1px solid #ccc;padding:2px 6px}}
table{{border-collapse:collapse}}img{{max-width:100%}}tr.change td{{color:purple}}</style></head>
<body><h1>{title}</h1>
<p>log <code>{html.escape(str(log))}</code>, status {html.escape(data["status"])},
final parameters <code>{html.escape(str(data["final_params_sha256"]))}</code>.
Check it with <code>fedsm replay LOG --verify --repo DIR</code>.</p>
<table><tr><th>round</th><th>kind</th><th>asked</th><th>replied</th><th>failed</th>
<th>timed out</th><th>sample-weighted metrics</th><th>aggregate</th></tr>
{chr(10).join(rows)}
</table>
<p><img alt="training curves and timing" src="data:image/png;base64,{image}"></p>
<script type="application/json" id="fedsm-data">{blob}</script>
</body></html>
"""


def write_report(log: str | Path, out: str | Path) -> Path:
    """Write the report of the job log ``log`` to ``out`` (``.html`` or ``.png``)."""
    log, out = Path(log), Path(out)
    suffix = out.suffix.lower()
    if suffix not in (".html", ".htm", ".png"):
        raise ReportError(f"{out}: the report is written as .html or .png, not {suffix!r}")
    log = resolve_log(log)  # a run directory names its log
    data = report_data(scan(log).records)
    png = render_png(data)
    out.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".png":
        out.write_bytes(png)
    else:
        out.write_text(_html(data, png, log), encoding="utf-8")
    return out
