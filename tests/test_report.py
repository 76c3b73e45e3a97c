"""``fedsm report``: the points plotted are read back from the written file and compared with
the log they came from (not just "a file exists")."""

from __future__ import annotations

import base64
import csv
import dataclasses
import json
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from fedsm.audit.report import (
    ReportError,
    build_figure,
    format_header,
    report_data,
    round_rows,
    write_report,
)
from fedsm.cli.demo.run import DemoConfig, run_demo
from fedsm.core import events as ev
from fedsm.log.read import scan
from fedsm.log.writer import EventLog
from fedsm.node.simulate import start_memory_nodes
from fedsm.repository import LocalRepository
from fedsm.researcher.experiment import Experiment
from fedsm.training.demo_plan import BreastCancerPlan
from fedsm.transport import MemoryBroker, MemoryBus

NODES, ROUNDS = 3, 3


@pytest.fixture(scope="module")
def demo_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("report") / "run"
    run_demo(run_dir, DemoConfig(nodes=NODES, rounds=ROUNDS), say=lambda _line: None)
    return run_dir / "researcher" / "job.log"


def _embedded(page: str) -> dict:
    match = re.search(r'<script type="application/json" id="fedsm-data">(.*?)</script>', page, re.S)
    assert match is not None
    return json.loads(match.group(1))


def test_html_report_has_one_point_per_round_per_node(demo_log: Path, tmp_path: Path) -> None:
    out = write_report(demo_log, tmp_path / "report.html")
    page = out.read_text(encoding="utf-8")
    data = _embedded(page)
    records = scan(demo_log).records
    replies = [r.event for r in records if isinstance(r.event, ev.ReplyReceived)]
    losses = [p for p in data["points"] if p["metric"] == "train_loss"]
    assert len(losses) == ROUNDS * NODES
    assert {(p["round"], p["node"]) for p in losses} == {
        (rnd, f"node-{n}") for rnd in range(1, ROUNDS + 1) for n in range(1, NODES + 1)
    }
    for reply in replies:
        if reply.round > ROUNDS:  # the final validation trains nothing: no training loss
            assert "train_loss" not in reply.metrics and "global_val_loss" in reply.metrics
            continue
        (point,) = [p for p in losses if (p["round"], p["node"]) == (reply.round, reply.node_id)]
        assert point["value"] == reply.metrics["train_loss"]
    # The aggregated curve is the sample-weighted mean of each round's replies.
    for rnd in range(1, ROUNDS + 1):
        mine = [r for r in replies if r.round == rnd]
        expected = sum(r.sample_size * r.metrics["train_loss"] for r in mine) / sum(
            r.sample_size for r in mine
        )
        (agg,) = [
            a for a in data["aggregated"] if a["round"] == rnd and a["metric"] == "train_loss"
        ]
        assert agg["value"] == pytest.approx(expected, rel=1e-12)
    # The demo's training args validate the final parameters in round ROUNDS + 1.
    assert data["validation_rounds"] == [ROUNDS + 1]
    assert len(data["timing"]) == (ROUNDS + 1) * NODES
    assert {t["round"] for t in data["timing"] if t["validation"]} == {ROUNDS + 1}
    for t in data["timing"]:
        parts = t["training_s"] + t["transfer_s"] + t["waiting_s"]
        assert t["training_s"] > 0 and parts >= t["after_s"] - 1e-9
    # Self-contained: the figure is inline PNG, nothing is fetched from a network.
    image = re.search(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert image is not None
    assert base64.b64decode(image.group(1)).startswith(b"\x89PNG\r\n\x1a\n")
    assert not re.search(r'(src|href)="(https?:)?//', page)
    final = [r.event for r in records if isinstance(r.event, ev.JobCompleted)][0]
    assert data["final_params_sha256"] == final.params_sha256 and data["status"] == "completed"
    # The log names artifacts by digest only, so neither does the report.
    assert "_url" not in json.dumps(data) and "file://" not in page


def test_png_report(demo_log: Path, tmp_path: Path) -> None:
    out = write_report(demo_log, tmp_path / "curves.png")
    head = out.read_bytes()[:24]
    assert head.startswith(b"\x89PNG\r\n\x1a\n") and head[12:16] == b"IHDR"
    width, height = struct.unpack(">II", head[16:24])
    assert (width, height) == (1000, 1200)
    with pytest.raises(ReportError, match=r"\.html, \.png, \.csv or \.json"):
        write_report(demo_log, tmp_path / "report.pdf")


def test_failures_timeouts_and_validation_metrics_are_reported(
    demo_log: Path, tmp_path: Path
) -> None:
    """Round 2: node-2 fails; round 3: node-3 never answers. Replies carry val_accuracy."""
    log = tmp_path / "job.log"
    shutil.copy(demo_log, log)
    items = [(r.ts, r.event) for r in scan(log).records]
    changed: list[tuple[float, ev.Event]] = []
    for ts, e in items:
        if isinstance(e, ev.ReplyReceived):
            if (e.round, e.node_id) == (2, "node-2"):
                e = ev.NodeFailed(
                    round=2,
                    node_id="node-2",
                    request_id=e.request_id,
                    code=500,
                    message="out of memory",
                )
            elif (e.round, e.node_id) == (3, "node-3"):
                continue
            else:
                e = dataclasses.replace(e, metrics={**e.metrics, "val_accuracy": 0.9})
        elif isinstance(e, ev.Aggregated) and e.round in (2, 3):
            kept = ("node-1", "node-3") if e.round == 2 else ("node-1", "node-2")
            if e.round == 3:
                changed.append((ts, ev.RoundTimedOut(round=3, missing=("node-3",))))
            e = dataclasses.replace(e, nodes=kept, weights={n: e.weights[n] for n in kept})
        changed.append((ts, e))
    log.unlink()
    with EventLog.open(log, durability="never") as out:
        for ts, e in changed:
            out.append(e, ts=ts)

    data = report_data(scan(log).records)
    assert [(f["round"], f["node"], f["code"]) for f in data["failures"]] == [(2, "node-2", 500)]
    assert [(t["round"], t["missing"]) for t in data["timeouts"]] == [(3, ["node-3"])]
    losses = [(p["round"], p["node"]) for p in data["points"] if p["metric"] == "train_loss"]
    assert len(losses) == ROUNDS * NODES - 2
    assert (2, "node-2") not in losses and (3, "node-3") not in losses
    vals = [p for p in data["points"] if p["metric"] == "val_accuracy"]
    assert len([p for p in vals if not p["validation"]]) == ROUNDS * NODES - 2
    assert {p["round"] for p in vals if p["validation"]} == {ROUNDS + 1}
    val_rounds = [
        (a["round"], a["validation"]) for a in data["aggregated"] if a["metric"] == "val_accuracy"
    ]
    assert val_rounds == [(1, False), (2, False), (3, False), (4, True)]
    page = write_report(log, tmp_path / "report.html").read_text(encoding="utf-8")
    assert _embedded(page)["failures"][0]["message"] == "out of memory"
    assert "<td>node-2</td>" in page and "<td>node-3</td>" in page


def test_the_command_line(demo_log: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.html"
    done = subprocess.run(
        [sys.executable, "-m", "fedsm", "report", str(demo_log), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"report={out}"
    assert len(_embedded(out.read_text(encoding="utf-8"))["points"]) >= ROUNDS * NODES
    bad = subprocess.run(
        [sys.executable, "-m", "fedsm", "report", str(demo_log), "--out", str(tmp_path / "r.x")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "as .html, .png, .csv or .json" in bad.stderr


# --------------------------------------------------------------------------- header, export


def _rewrite(src: Path, dst: Path, fail: set[tuple[int, str]], timeout: dict[int, list[str]]):
    """A copy of the log at ``src`` where the nodes in ``fail`` (round, node) failed and those
    in ``timeout`` (round: nodes) never answered, the round timing out."""
    out: list[tuple[float, ev.Event]] = []
    for r in scan(src).records:
        e = r.event
        if isinstance(e, ev.ReplyReceived):
            if (e.round, e.node_id) in fail:
                e = ev.NodeFailed(
                    round=e.round, node_id=e.node_id, request_id=e.request_id, code=500, message="x"
                )
            elif e.node_id in timeout.get(e.round, ()):
                continue
        elif isinstance(e, ev.Aggregated):
            gone = {n for rnd, n in fail if rnd == e.round} | set(timeout.get(e.round, ()))
            if e.round in timeout:
                out.append((r.ts, ev.RoundTimedOut(round=e.round, missing=tuple(timeout[e.round]))))
            kept = tuple(n for n in e.nodes if n not in gone)
            e = dataclasses.replace(e, nodes=kept, weights={n: e.weights[n] for n in kept})
        out.append((r.ts, e))
    with EventLog.open(dst, durability="never") as log:
        for ts, e in out:
            log.append(e, ts=ts)
    return dst


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")
    }


def _legend_labels(fig) -> list[str]:
    return [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]


def test_header_configuration_and_audit_command(demo_log: Path) -> None:
    run_dir = demo_log.parent.parent
    data = report_data(scan(demo_log).records, log=demo_log)
    assert data["audit_command"] == (
        f"fedsm replay {demo_log.absolute()} --verify --repo {(run_dir / 'repository').absolute()}"
    )
    created = next(r.event for r in scan(demo_log).records if isinstance(r.event, ev.JobCreated))
    config = data["config"]
    assert config["training_plan_class"] == created.training_plan_class == "BreastCancerPlan"
    assert (config["seed"], config["min_nodes"]) == (created.seed, created.min_nodes)
    assert config["training_args"] == created.training_args
    assert config["rounds_trained"] == ROUNDS and config["validation_rounds"] == [ROUNDS + 1]
    replies = [r.event for r in scan(demo_log).records if isinstance(r.event, ev.ReplyReceived)]
    for reply in replies:
        kind = "validation" if reply.round > ROUNDS else "train"
        assert config["samples"][reply.node_id][kind] == reply.sample_size
    text = format_header(data)
    assert f"{NODES} nodes, min_nodes {created.min_nodes}" in text
    assert f"seed {created.seed}" in text and data["audit_command"] in text
    (last, final) = data["final_metrics"]
    assert (last["round"], last["validation"], final["round"], final["validation"]) == (
        ROUNDS,
        False,
        ROUNDS + 1,
        True,
    )
    agg = {a["metric"]: a["value"] for a in data["aggregated"] if a["round"] == ROUNDS + 1}
    assert (
        final["metrics"] == agg and f"global_val_accuracy={agg['global_val_accuracy']:.4g}" in text
    )
    # A log elsewhere: the repository is not known, the command says DIR.
    elsewhere = report_data([], log=Path("/nowhere/job.log"))
    assert elsewhere["audit_command"] == "fedsm replay /nowhere/job.log --verify --repo DIR"
    # Few nodes: one legend entry per node, loss and accuracy on separate panels.
    fig = build_figure(data)
    labels = _legend_labels(fig)
    assert {f"node-{n}" for n in range(1, NODES + 1)} <= set(labels)
    titles = [ax.get_title() for ax in fig.axes]
    assert "loss (training, validation)" in titles and "validation accuracy" in titles


def test_csv_and_json_export_one_row_per_round_and_node(demo_log: Path, tmp_path: Path) -> None:
    log = _rewrite(demo_log, tmp_path / "job.log", {(2, "node-2")}, {3: ["node-3"]})
    csv_path = write_report(log, tmp_path / "out" / "rounds.csv")
    json_path = write_report(log, tmp_path / "out" / "rounds.json")
    with csv_path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    exported = json.loads(json_path.read_text(encoding="utf-8"))
    assert len(rows) == len(exported["rows"]) == (ROUNDS + 1) * NODES
    assert list(rows[0])[:6] == ["round", "node", "kind", "status", "samples", "weight"]
    assert list(rows[0])[-5:] == ["after_s", "training_s", "transfer_s", "waiting_s", "deadline_s"]
    assert exported["columns"] == list(rows[0])
    by_key = {(int(r["round"]), r["node"]): r for r in rows}
    by_key_json = {(r["round"], r["node"]): r for r in exported["rows"]}
    records = scan(log).records
    weights = {
        (r.event.round, n): w
        for r in records
        if isinstance(r.event, ev.Aggregated)
        for n, w in r.event.weights.items()
    }
    for record in records:
        e = record.event
        if not isinstance(e, ev.ReplyReceived):
            continue
        row, same = by_key[(e.round, e.node_id)], by_key_json[(e.round, e.node_id)]
        assert row["status"] == same["status"] == "replied"
        assert row["kind"] == ("validation" if e.round > ROUNDS else "train")
        assert int(row["samples"]) == same["samples"] == e.sample_size
        for metric, value in e.metrics.items():
            assert float(row[metric]) == same[metric] == value
        assert same["training_s"] == e.timing["training"]
        weight = weights.get((e.round, e.node_id))
        assert same["weight"] == weight and row["weight"] == ("" if weight is None else str(weight))
    assert by_key[(2, "node-2")]["status"] == "failed" and by_key[(2, "node-2")]["train_loss"] == ""
    timed_out = by_key_json[(3, "node-3")]
    assert timed_out["status"] == "timed out" and timed_out["samples"] is None
    assert timed_out["deadline_s"] == pytest.approx(60.0, abs=0.5)
    assert exported["config"]["training_plan_class"] == "BreastCancerPlan"
    # The timing panel draws the node that timed out as a hatched bar to the round's deadline.
    fig = build_figure(report_data(records, log=log))
    timing = fig.axes[3]
    hatched = [p for p in timing.patches if p.get_hatch() == "///"]
    assert [p.get_height() for p in hatched] == [timed_out["deadline_s"]]
    assert [p.get_height() for p in timing.patches if p.get_hatch() == "xx"] == [
        by_key_json[(2, "node-2")]["after_s"]
    ]
    assert timing.get_ylim()[1] < timed_out["deadline_s"]  # cut: the other bars stay readable
    assert any("waited to +60" in t.get_text() for t in timing.texts)


def test_the_report_writes_only_its_out(demo_log: Path, tmp_path: Path) -> None:
    run_dir = demo_log.parent.parent
    before = _tree(run_dir)
    done = subprocess.run(
        [sys.executable, "-m", "fedsm", "report", str(run_dir)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "--verify --repo" in done.stdout and "no file written" in done.stdout
    outs = [tmp_path / "r.png", tmp_path / "r.csv", tmp_path / "r.json"]
    args = [a for out in outs for a in ("--out", str(out))]
    done = subprocess.run(
        [sys.executable, "-m", "fedsm", "report", str(run_dir), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [f"report={out}" for out in outs]
    assert _tree(run_dir) == before and sorted(tmp_path.iterdir()) == sorted(outs)
    with pytest.raises(ReportError, match="the log the report reads"):
        write_report(tmp_path / "r.csv", tmp_path / "r.csv")  # not a log either way


# --------------------------------------------------------------------------- many nodes


MANY = 100


@pytest.fixture(scope="module")
def many_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real run: MANY in-memory nodes on the memory bus, 2 rounds (as tools/bench_scale.py)."""
    root = tmp_path_factory.mktemp("many")
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
    try:
        from bench_scale import write_shards
    finally:
        sys.path.pop(0)
    (root / "data").mkdir()
    shards = write_shards(root / "data", MANY, 12)
    plan = root / "plan.py"
    BreastCancerPlan().save_code(plan)
    broker = MemoryBroker()
    repo = LocalRepository(root / "repository")
    nodes = start_memory_nodes(root / "nodes", broker, repo, shards, approve=[plan])
    bus = MemoryBus(broker, "researcher-many", role="researcher")
    try:
        exp = Experiment(
            tags=["breast-cancer"],
            training_plan_class="BreastCancerPlan",
            training_plan_path=plan,
            training_args={
                "lr": 0.5,
                "epochs": 1,
                "batch_size": 32,
                "test_ratio": 0.25,
                "test_on_global_updates": True,
            },
            round_limit=2,
            run_dir=root / "run",
            bus=bus,
            repository=repo,
            progress=False,
            on_round=lambda s: None,
            search_deadline_s=60,
            discovery_s=0.0,  # the nodes are in this process, online already
            reply_deadline_s=600,
            durability="batch",
        )
        exp.run()
        exp.close()
    finally:
        bus.close()
        for node in nodes:
            node.stop()
        broker.close()
    return root / "run" / "job.log"


def test_many_nodes_are_drawn_as_a_band(many_log: Path, tmp_path: Path) -> None:
    data = report_data(scan(many_log).records, log=many_log)
    assert len(data["config"]["nodes"]) == MANY
    fig = build_figure(data)
    labels = _legend_labels(fig)
    assert not any(label.startswith("node-") for label in labels)
    assert "train_loss: nodes min-max, median" in labels
    assert "global_val_accuracy: nodes min-max, median" in labels
    assert sum("spread across 100 nodes" in ax.get_title() for ax in fig.axes) == 2
    assert "median node" in fig.axes[3].get_title()
    # The band spans the nodes' values: its vertical segment at round 1 is min..max.
    values = [p["value"] for p in data["points"] if p["round"] == 1 and p["metric"] == "train_loss"]
    segments = [
        seg
        for coll in fig.axes[1].collections
        if hasattr(coll, "get_segments")
        for seg in coll.get_segments()
        if len(seg) == 2 and seg[0][0] == 1
    ]
    assert any(
        sorted((seg[0][1], seg[1][1])) == pytest.approx([min(values), max(values)])
        for seg in segments
    )
    text = format_header(data)
    assert "100 nodes (node-1 ... node-100)" in text and "--repo DIR" in text
    columns, rows = round_rows(data)
    assert len(rows) == 3 * MANY and {r["status"] for r in rows} == {"replied"}
    png = write_report(many_log, tmp_path / "many.png").read_bytes()
    assert struct.unpack(">II", png[16:24]) == (1000, 1200)
    # Timed-out nodes in band mode: one hatched bar per round, to the deadline, with a count.
    missing = [f"node-{n}" for n in range(10, 17)]
    log = _rewrite(many_log, tmp_path / "job.log", {(1, "node-5"), (1, "node-6")}, {2: missing})
    fig = build_figure(report_data(scan(log).records, log=log))
    timing = fig.axes[3]
    assert [p.get_height() for p in timing.patches if p.get_hatch() == "///"] == [
        pytest.approx(600, abs=1)
    ]
    assert len([p for p in timing.patches if p.get_hatch() == "xx"]) == 1
    assert any(t.get_text().startswith("7 timed out") for t in timing.texts)
    assert any(t.get_text() == "2 failed" for t in timing.texts)
    write_report(log, tmp_path / "many-timeouts.png")
