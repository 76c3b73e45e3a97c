"""``fedsm report``: the points plotted are read back from the written file and compared with
the log they came from (not just "a file exists")."""

from __future__ import annotations

import base64
import dataclasses
import json
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from fedsm.audit.report import ReportError, report_data, write_report
from fedsm.cli.demo.run import DemoConfig, run_demo
from fedsm.core import events as ev
from fedsm.log.read import scan
from fedsm.log.writer import EventLog

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
    with pytest.raises(ReportError, match=r"\.html or \.png"):
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
    assert bad.returncode == 2 and "as .html or .png" in bad.stderr
