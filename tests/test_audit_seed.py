"""The audit of runs that use the seed's API: the final validation-only round, settings
changed between rounds (a completed job reopened), parameters replaced between rounds.

Real runs: the demo (its training args set ``test_on_global_updates``, so round
``rounds + 1`` validates the final parameters) and an Experiment on real nodes of a memory
bus (tests/job_world.py) driven as a researcher's script would drive it.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import shutil
import struct
from pathlib import Path

import pytest
from job_world import TRAINING_ARGS, experiment, make_world

from fedsm.audit.checks import RepositoryAudit, check_validation
from fedsm.audit.replay import CHECKS, add_arguments, run, verify_all
from fedsm.audit.report import report_data, write_report
from fedsm.audit.roundfacts import round_facts
from fedsm.cli.demo.run import DemoConfig, run_demo
from fedsm.core import events as ev
from fedsm.log.read import scan
from fedsm.log.writer import EventLog
from fedsm.repository import LocalRepository
from fedsm.training.params import load_params

NODES, ROUNDS = 3, 2
SEED_ARGS = {**TRAINING_ARGS, "test_ratio": 0.2, "test_on_global_updates": True}


def _replay(*argv: str) -> tuple[int, str]:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    out = io.StringIO()
    code = run(parser.parse_args(list(argv)), out=out, err=io.StringIO())
    return code, out.getvalue()


def _records(log: Path) -> list:
    return scan(log).records


def _rewrite(src: Path, dest: Path, change) -> Path:
    """A copy of the log at ``src`` with each event passed through ``change(event)`` (which
    returns a list of events), written with a fresh, sound hash chain."""
    items = [(r.ts, e) for r in _records(src) for e in change(r.event)]
    dest.parent.mkdir(parents=True, exist_ok=True)
    with EventLog.open(dest, durability="never") as out:
        for ts, e in items:
            out.append(e, ts=ts)
    return dest


# --------------------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("audit-seed-demo") / "run"
    run_demo(run_dir, DemoConfig(nodes=NODES, rounds=ROUNDS), say=lambda _line: None)
    return run_dir


@pytest.fixture(scope="module")
def seed_run(tmp_path_factory: pytest.TempPathFactory):
    """Round 1, its validation (round 2), completed; reopened up to round 3 with the
    parameters replaced (halved), node-3 dropped and a lower lr: round 3, its validation
    (round 4), completed; then one more round by ``run(1, increase=True)``: round 5, its
    validation (round 6)."""
    root = tmp_path_factory.mktemp("audit-seed-job")
    world = make_world(root, 3)
    exp = experiment(world, root / "run", training_args=SEED_ARGS, round_limit=1, seed=3)
    try:
        job = exp.job
        exp.run()
        assert exp.finished
        job.change_settings(round_limit=3)  # reopens the completed job
        params = load_params(job.params_path(job.params_sha256))
        _path, _url = job.update_parameters(params={k: v * 0.5 for k, v in params.items()})
        job.nodes = ["node-1", "node-2"]
        job.training_args = {**SEED_ARGS, "lr": 0.1}
        exp.run()
        exp.run(1, increase=True)
        if not exp.finished:  # run(n) may stop after the validation's replies
            exp.run()
        assert job.state.status == "completed"
        assert job.state.validation_rounds == (2, 4, 6)
    finally:
        exp.close()
        world.close()
    return root / "run", root / "repository"


# --------------------------------------------------------------------------- the final validation


def test_a_run_with_a_final_validation_verifies(demo_run: Path) -> None:
    log, repo = demo_run / "researcher" / "job.log", demo_run / "repository"
    code, text = _replay(str(log), "--verify", "--repo", str(repo))
    assert code == 0, text
    assert "validation rounds and the repository's artifacts and aggregates" in text
    records = _records(log)
    (sent,) = [
        r.event for r in records if isinstance(r.event, ev.RoundSent) and not r.event.do_training
    ]
    assert sent.round == ROUNDS + 1
    replies = [r.event for r in records if isinstance(r.event, ev.ReplyReceived)]
    assert {r.params_sha256 for r in replies if r.round == sent.round} == {sent.params_sha256}
    assert not any(
        isinstance(r.event, ev.Aggregated) and r.event.round == sent.round for r in records
    )
    assert check_validation(log) == []
    with RepositoryAudit(LocalRepository(repo)) as audit:
        assert audit.check_artifacts(log) == [] and audit.check_aggregates(log) == []


def test_replay_round_of_the_validation_shows_each_nodes_metrics(demo_run: Path) -> None:
    log = demo_run / "researcher" / "job.log"
    records = _records(log)
    replies = [
        r.event
        for r in records
        if isinstance(r.event, ev.ReplyReceived) and r.event.round == ROUNDS + 1
    ]
    completed = [r for r in records if isinstance(r.event, ev.JobCompleted)][0]
    code, text = _replay(str(log), "--round", str(ROUNDS + 1))
    assert code == 0
    assert f"round {ROUNDS + 1}: validation only" in text and "nothing trained" in text
    assert "validated, not aggregated" in text and "  not aggregated" not in text
    assert "job completed at" in text and f"(seq {completed.seq})" in text
    for reply in replies:
        (line,) = [x for x in text.splitlines() if x.startswith(f"  {reply.node_id} ")]
        for name, value in reply.metrics.items():
            assert name.startswith("global_val_") and f"{name}={value:.4g}" in line
    assert "sample-weighted validation metrics: global_val_accuracy=" in text
    code, text = _replay(str(log), "--round", str(ROUNDS + 1), "--json")
    data = json.loads(text)
    assert data["validation"] is True and data["aggregate"] is None
    assert data["completed"]["seq"] == completed.seq
    assert {n: r["metrics"] for n, r in data["replies"].items()} == {
        r.node_id: dict(r.metrics) for r in replies
    }
    # A training round says it trained.
    code, text = _replay(str(log), "--round", str(ROUNDS))
    assert "validation only" not in text and "aggregated (fedavg)" in text
    assert json.loads(_replay(str(log), "--round", "1", "--json")[1])["validation"] is False
    # The timeline says which round only validated and that the job completed from it.
    code, text = _replay(str(log))
    assert f"round {ROUNDS + 1} sent to validate only" in text
    assert f"completed after the final validation (round {ROUNDS + 1})" in text


def test_a_validation_reply_naming_other_params_is_a_finding(
    demo_run: Path, tmp_path: Path
) -> None:
    """A node that trained in the validation round (its reply names new parameters)."""
    log = demo_run / "researcher" / "job.log"
    trained = next(
        r.event
        for r in _records(log)
        if isinstance(r.event, ev.ReplyReceived) and r.event.round == 1
    )

    def change(e):
        if isinstance(e, ev.ReplyReceived) and (e.round, e.node_id) == (ROUNDS + 1, "node-2"):
            return [dataclasses.replace(e, params_sha256=trained.params_sha256)]
        return [e]

    bad = _rewrite(log, tmp_path / "job.log", change)
    findings = [f for f in verify_all(bad, CHECKS) if f.error]
    assert [f.check for f in findings] == ["validation"], findings
    (finding,) = findings
    assert "node-2" in finding.what and f"round {ROUNDS + 1}" in finding.what
    assert finding.found == trained.params_sha256
    code, text = _replay(str(bad), "--round", str(ROUNDS + 1))
    assert "['node-2'] answered with other params" in text


# --------------------------------------------------------------------------- settings, params


def test_a_reopened_run_with_changed_settings_and_params_verifies(seed_run) -> None:
    log, repo = seed_run[0] / "job.log", seed_run[1]
    code, text = _replay(str(log), "--verify", "--repo", str(repo))
    assert code == 0, text
    records = _records(log)
    replaced = [
        r.event for r in records if isinstance(r.event, ev.ParamsUploaded) and r.event.round > 0
    ]
    assert [p.round for p in replaced] == [2]
    (round3,) = [
        r.event for r in records if isinstance(r.event, ev.RoundSent) and r.event.round == 3
    ]
    assert round3.params_sha256 == replaced[0].sha256 and round3.nodes == ("node-1", "node-2")
    with RepositoryAudit(LocalRepository(repo)) as audit:
        assert audit.check_artifacts(log) == [] and audit.check_aggregates(log) == []
        assert replaced[0].sha256 in audit._fetched


def test_the_timeline_says_what_changed(seed_run) -> None:
    log = seed_run[0] / "job.log"
    code, text = _replay(str(log))
    assert code == 0
    assert (
        "settings changed after round 2, from round 3: round_limit 1 -> 3 "
        "(reopens the completed job)"
    ) in text
    assert (
        "settings changed after round 2, from round 3: nodes [node-1,node-2,node-3] -> "
        "[node-1,node-2] (removed node-3)"
    ) in text
    assert "settings changed after round 2, from round 3: training_args lr 0.5 -> 0.1" in text
    assert "params replaced after round 2 (update_parameters) sha256" in text
    assert "settings changed after round 4, from round 5: round_limit 3 -> 5" in text
    assert "SettingsChanged" not in text
    rows = json.loads(_replay(str(log), "--json")[1])
    changed = [r for r in rows if r["event"]["type"] == "SettingsChanged"]
    assert len(changed) == 4 and all(r["summary"].startswith("settings changed") for r in changed)


def test_state_at_a_seq_has_the_new_fields(seed_run) -> None:
    log = seed_run[0] / "job.log"
    records = _records(log)
    round3 = next(r for r in records if isinstance(r.event, ev.RoundSent) and r.event.round == 3)
    seq = round3.seq - 1  # every change recorded, round 3 not sent yet
    state = json.loads(_replay(str(log), "--at", str(seq), "--json")[1])
    assert state["status"] == "aggregated" and state["round"] == 2
    assert state["round_do_training"] is False and state["validation_rounds"] == [2]
    assert state["settings_changed"]["nodes"] == ["node-1", "node-2"]
    assert state["settings_changed"]["round_limit"] == 3
    assert state["settings_changed"]["training_args"]["lr"] == 0.1
    assert state["effective_settings"]["nodes"] == ["node-1", "node-2"]
    assert state["effective_settings"]["round_limit"] == 3
    assert state["params_sha256"] == round3.event.params_sha256
    code, text = _replay(str(log), "--at", str(seq))
    assert "round kind     validates only" in text and "validation     rounds [2]" in text
    assert "removed node-3" in text and "lr 0.5 -> 0.1" in text
    code, text = _replay(str(log), "--round", "3")
    assert "before it: parameters replaced by the researcher" in text
    assert "before it: nodes [node-1,node-2,node-3] -> [node-1,node-2]" in text


def test_a_tampered_replaced_params_file_is_a_finding(seed_run, tmp_path: Path) -> None:
    log, repo = seed_run[0] / "job.log", seed_run[1]
    replaced = next(
        r for r in _records(log) if isinstance(r.event, ev.ParamsUploaded) and r.event.round > 0
    )
    copy = tmp_path / "repository"
    shutil.copytree(repo, copy)
    target = copy / replaced.event.sha256
    assert target.is_file()
    data = bytearray(target.read_bytes())
    data[-1] ^= 0x01
    target.write_bytes(bytes(data))
    code, text = _replay(str(log), "--verify", "--repo", str(copy))
    assert code == 1
    assert f"seq {replaced.seq}: artifacts: parameters replaced after round 2" in text
    with RepositoryAudit(LocalRepository(copy)) as audit:
        findings = audit.check_artifacts(log)
    assert findings and all(f.error for f in findings)
    assert findings[0].seq == replaced.seq and findings[0].expected.endswith(replaced.event.sha256)


def test_a_round_not_sending_the_replaced_params_is_a_lifecycle_finding(
    seed_run, tmp_path: Path
) -> None:
    log = seed_run[0] / "job.log"
    records = _records(log)
    old = next(
        r.event for r in records if isinstance(r.event, ev.Aggregated) and r.event.round == 1
    )

    def change(e):
        if isinstance(e, ev.RoundSent) and e.round == 3:
            return [dataclasses.replace(e, params_sha256=old.params_sha256)]
        return [e]

    bad = _rewrite(log, tmp_path / "job.log", change)
    findings = [f for f in verify_all(bad, CHECKS) if f.error]
    assert findings and "lifecycle" in findings[0].what and "sent params" in findings[0].what


def test_params_replaced_again_before_any_round_sent_them_are_a_note(
    seed_run, tmp_path: Path
) -> None:
    """Replaced parameters are uploaded when a request names them: ones replaced again first
    were never uploaded, which is not an error; other bytes under a named digest would be."""
    log, repo = seed_run[0] / "job.log", seed_run[1]
    never = "ab" * 32

    def change(e):
        if isinstance(e, ev.ParamsUploaded) and e.round == 2:
            return [ev.ParamsUploaded(round=2, sha256=never), e]
        return [e]

    moved = _rewrite(log, tmp_path / "job.log", change)
    code, text = _replay(str(moved), "--verify", "--repo", str(repo))
    assert code == 0, text
    assert "note: offset" in text and "no round sent them" in text and never in text


def test_the_report_marks_validations_and_changes(seed_run, tmp_path: Path) -> None:
    log = seed_run[0] / "job.log"
    records = _records(log)
    data = report_data(records)
    assert data["validation_rounds"] == [2, 4, 6] and data["round_limit"] == 5
    assert data["status"] == "completed"
    kinds = [(c["after_round"], c["kind"]) for c in data["changes"]]
    assert kinds == [
        (2, "settings"),
        (2, "params"),
        (2, "settings"),
        (2, "settings"),
        (4, "settings"),
    ]
    assert "removed node-3" in data["changes"][2]["text"]
    # Each validation round's weighted metric is the replies' sample-weighted mean.
    for rnd in (2, 4, 6):
        replies = [
            r.event
            for r in records
            if isinstance(r.event, ev.ReplyReceived) and r.event.round == rnd
        ]
        expected = sum(r.sample_size * r.metrics["global_val_accuracy"] for r in replies) / sum(
            r.sample_size for r in replies
        )
        (agg,) = [
            a
            for a in data["aggregated"]
            if a["round"] == rnd and a["metric"] == "global_val_accuracy"
        ]
        assert agg["validation"] is True and agg["value"] == pytest.approx(expected, rel=1e-12)
        points = [p for p in data["points"] if p["round"] == rnd]
        assert points and all(p["validation"] for p in points)
        assert {p["node"] for p in points} == {r.node_id for r in replies}
    assert not any(p["validation"] for p in data["points"] if p["round"] in (1, 3, 5))
    assert {p["node"] for p in data["points"] if p["round"] >= 3} == {"node-1", "node-2"}
    png = write_report(log, tmp_path / "seed.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and struct.unpack(">II", png[16:24]) == (1000, 1200)
    page = write_report(log, tmp_path / "seed.html").read_text(encoding="utf-8")
    assert page.count("<td>validation</td>") == 3 and "reopens the completed job" in page
    facts = {f.round: f for f in round_facts(records)}
    assert [f.round for f in facts.values() if f.validation] == [2, 4, 6]
    assert facts[6].completed is not None and facts[2].completed is not None


def test_the_demo_report_has_the_final_validation(demo_run: Path, tmp_path: Path) -> None:
    data = report_data(_records(demo_run / "researcher" / "job.log"))
    assert data["validation_rounds"] == [ROUNDS + 1] and data["changes"] == []
    final = [a for a in data["aggregated"] if a["validation"]]
    assert {a["round"] for a in final} == {ROUNDS + 1}
    assert {a["metric"] for a in final} == {"global_val_accuracy", "global_val_loss"}
    out = write_report(demo_run, tmp_path / "demo.png")
    assert out.read_bytes().startswith(b"\x89PNG")
