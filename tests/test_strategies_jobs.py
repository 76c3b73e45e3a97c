"""Every strategy through a real job: run, audit (``fedsm replay --verify --repo``
recomputes every round with the strategy the log names), and a run stopped after round 1 and
resumed by a new process (its strategy state fetched back by digest) ends with the digest of
the uninterrupted run. Also: bad strategy input, and a user's strategy the audit can not
import."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from job_world import experiment, make_world, resume, run_events

from fedsm.strategies import (
    FedAvg,
    MissingReplyData,
    StrategyError,
    UnknownStrategy,
    registered,
)
from fedsm.strategies.base import AggregateContext, AggregateResult, NodeUpdate

NAMES = sorted(registered())
ROUNDS = 3


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    w = make_world(tmp_path_factory.mktemp("strategies"), 3)
    yield w
    w.close()


def _verify(log: Path, repo: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fedsm", "replay", str(log), "--verify", "--repo", str(repo)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


@pytest.mark.parametrize("name", NAMES)
def test_each_strategy_runs_audits_and_resumes_to_the_same_digest(world, tmp_path, name) -> None:
    whole = experiment(world, tmp_path / "whole", aggregator=name, round_limit=ROUNDS)
    try:
        digest = whole.run()
    finally:
        whole.close()
    events = run_events(tmp_path / "whole")
    created = events[0]
    assert created.aggregator == name
    aggregated = [e for e in events if type(e).__name__ == "Aggregated"]
    assert [e.aggregator for e in aggregated] == [name] * ROUNDS
    stateful = {"scaffold", "fedadam", "fedyogi", "fedadagrad"}
    assert all((e.state_sha256 is not None) == (name in stateful) for e in aggregated)
    done = _verify(tmp_path / "whole" / "job.log", world.repository.root)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"recomputed with {name}" in done.stdout

    # Stopped after round 1; a new process resumes it with no strategy file on this machine.
    part = experiment(world, tmp_path / "part", aggregator=name, round_limit=ROUNDS)
    try:
        part.run(rounds=1)
    finally:
        part.close()
    shutil.rmtree(tmp_path / "part" / "files" / "aggregator", ignore_errors=True)
    again = resume(world, tmp_path / "part")
    try:
        assert again.run() == digest
    finally:
        again.close()


def test_fedprox_with_mu_zero_trains_as_fedavg_bit_for_bit(world, tmp_path) -> None:
    from fedsm.strategies import FedProx

    runs = {}
    for label, strategy in (("avg", FedAvg()), ("prox0", FedProx(mu=0.0))):
        exp = experiment(world, tmp_path / label, aggregator=strategy, round_limit=2)
        try:
            runs[label] = exp.run()
        finally:
            exp.close()
    assert runs["avg"] == runs["prox0"]


def test_bad_strategy_input_is_a_typed_error_and_writes_nothing(world, tmp_path) -> None:
    from fedsm.strategies import FedProx, FedTrimmedMean

    with pytest.raises(StrategyError, match="mu"):
        FedProx(mu=-0.1)
    for beta in (-0.1, 0.5, 0.7):
        with pytest.raises(StrategyError, match="beta"):
            FedTrimmedMean(beta=beta)
    with pytest.raises(UnknownStrategy, match="fedfancy"):
        experiment(world, tmp_path / "unknown", aggregator="fedfancy")
    assert not (tmp_path / "unknown" / "job.log").exists()
    with pytest.raises(StrategyError, match="Strategy"):
        experiment(world, tmp_path / "wrong", aggregator=42)


def test_a_reply_without_what_scaffold_needs_fails_that_node(world) -> None:
    from fedsm.strategies import Scaffold

    update = NodeUpdate.of("node-1", {"w": torch.zeros(2)}, 10.0, {"lr": 0.1})
    with pytest.raises(MissingReplyData, match="num_updates"):
        Scaffold().check_update(update)


class HalfStep(FedAvg):
    """A user's strategy in experiment code: half-way from the old to the FedAvg params."""

    name = ""  # not registered: recorded by import path

    def aggregate(self, ctx: AggregateContext) -> AggregateResult:
        mean = super().aggregate(ctx).params
        return AggregateResult(
            {k: (ctx.global_params[k] + mean[k]) / 2 for k in sorted(ctx.global_params)}
        )


def test_a_users_strategy_is_recorded_by_import_path_and_audited_where_importable(
    world, tmp_path
) -> None:
    exp = experiment(world, tmp_path / "mine", aggregator=HalfStep(), round_limit=2)
    try:
        exp.run()
    finally:
        exp.close()
    created = run_events(tmp_path / "mine")[0]
    assert created.aggregator == "test_strategies_jobs:HalfStep"
    log = tmp_path / "mine" / "job.log"
    here = str(Path(__file__).parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([here, os.environ.get("PYTHONPATH", "")]))
    ok = _verify(log, world.repository.root, env)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    lost = _verify(log, world.repository.root, {k: v for k, v in env.items() if k != "PYTHONPATH"})
    assert lost.returncode == 1
    assert "test_strategies_jobs:HalfStep" in lost.stdout and "can not import" in lost.stdout


def test_a_tampered_strategy_state_is_an_audit_error(world, tmp_path) -> None:
    exp = experiment(world, tmp_path / "run", aggregator="scaffold", round_limit=2)
    try:
        exp.run()
    finally:
        exp.close()
    states = [
        e.state_sha256 for e in run_events(tmp_path / "run") if type(e).__name__ == "Aggregated"
    ]
    repo = tmp_path / "repo-copy"
    shutil.copytree(world.repository.root, repo)
    stored = repo / states[0]
    data = bytearray(stored.read_bytes())
    data[-1] ^= 1
    stored.chmod(0o644)
    stored.write_bytes(bytes(data))
    found = _verify(tmp_path / "run" / "job.log", repo)
    assert found.returncode == 1
    assert "strategy state after round 1: the stored bytes hash to another digest" in found.stdout
    assert "recompute: round 2 (scaffold)" in found.stdout
