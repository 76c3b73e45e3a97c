"""The first hour of a researcher: a search waits for nodes to announce themselves (memory bus
and real MQTT), and the same experiment script run again on its run directory resumes its job
(or says exactly which settings differ)."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path

import pytest
from broker_fixture import mosquitto  # noqa: F401
from job_world import TRAINING_ARGS, World, make_world

from fedsm.data import breast_cancer_csv, partition_csv, split_holdout
from fedsm.node.node import Node
from fedsm.node.settings import init_node_dir
from fedsm.node.simulate import register_csv_dataset, shared_executor, start_memory_nodes
from fedsm.repository import LocalRepository
from fedsm.researcher.errors import JobError
from fedsm.researcher.experiment import Experiment
from fedsm.researcher.requests import Requests
from fedsm.transport import MemoryBroker, MemoryBus, MqttBus

TAGS = ["breast-cancer"]


def _shards(root: Path, k: int) -> list[Path]:
    train, _test = split_holdout(breast_cancer_csv(), root / "data", fraction=0.2, seed=0)
    return list(partition_csv(train, k, root / "data", seed=0))


class LateNodes:
    """Memory nodes started by a thread ``delay_s`` after :meth:`start` (the researcher is
    already searching by then)."""

    def __init__(
        self, root: Path, broker: MemoryBroker, k: int, delay_s: float, approve: tuple = ()
    ) -> None:
        self.root, self.broker, self.delay_s, self.approve = root, broker, delay_s, approve
        self.repository = LocalRepository(root / "repository")
        self.csvs = _shards(root, k)
        self.nodes: list[Node] = []
        self.online_at: float | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        time.sleep(self.delay_s)
        self.nodes = start_memory_nodes(
            self.root / "nodes", self.broker, self.repository, self.csvs, approve=self.approve
        )
        self.online_at = time.monotonic()

    def start(self) -> LateNodes:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._thread.join(30)
        for node in self.nodes:
            node.stop()


# --------------------------------------------------------------------------- memory bus


def test_search_finds_nodes_that_come_online_after_it_started(tmp_path: Path) -> None:
    broker = MemoryBroker()
    researcher = MemoryBus(broker, "researcher-late", role="researcher")
    late = LateNodes(tmp_path, broker, 2, delay_s=0.5)
    try:
        reqs = Requests(researcher, default_deadline_s=5.0)
        assert reqs.bus.online_nodes() == frozenset()  # what the old search stopped at
        late.start()
        start = time.monotonic()
        found = reqs.search(TAGS, discovery_s=2.0)
        elapsed = time.monotonic() - start
        assert found.node_ids() == ["node-1", "node-2"]
        assert 2.0 <= elapsed < 4.0  # no expectation given: the whole window, then done
        summary = reqs.last_search
        assert summary is not None and not summary.ended_early
        assert summary.found == ("node-1", "node-2") and summary.answered == summary.found
        assert "2 node(s) with a matching dataset (node-1, node-2)" in summary.line()
    finally:
        late.stop()
        researcher.close()
        broker.close()


def test_search_with_nodes_given_returns_as_soon_as_they_answered(tmp_path: Path) -> None:
    broker = MemoryBroker()
    researcher = MemoryBus(broker, "researcher-late", role="researcher")
    late = LateNodes(tmp_path, broker, 2, delay_s=0.3)
    try:
        reqs = Requests(researcher, default_deadline_s=5.0)
        late.start()
        start = time.monotonic()
        found = reqs.search(TAGS, nodes=["node-2", "node-1"], discovery_s=20.0)
        elapsed = time.monotonic() - start
        assert found.node_ids() == ["node-1", "node-2"]
        assert elapsed < 5.0, elapsed  # well before the 20 s window ends
        assert reqs.last_search is not None and reqs.last_search.ended_early
    finally:
        late.stop()
        researcher.close()
        broker.close()


def test_search_with_min_nodes_returns_once_enough_have_a_dataset(tmp_path: Path) -> None:
    broker = MemoryBroker()
    researcher = MemoryBus(broker, "researcher-late", role="researcher")
    late = LateNodes(tmp_path, broker, 3, delay_s=0.3)
    try:
        reqs = Requests(researcher, default_deadline_s=5.0)
        late.start()
        start = time.monotonic()
        found = reqs.search(TAGS, min_nodes=3, discovery_s=20.0)
        assert time.monotonic() - start < 5.0
        assert found.node_ids() == ["node-1", "node-2", "node-3"]
        # A node answering without a match does not count towards min_nodes: the window ends it.
        start = time.monotonic()
        assert len(reqs.search(["no-such-tag"], min_nodes=1, discovery_s=0.5)) == 0
        assert 0.5 <= time.monotonic() - start < 3.0
        with pytest.raises(ValueError, match="min_nodes"):
            reqs.search(TAGS, min_nodes=0)
        with pytest.raises(ValueError, match="discovery_s"):
            reqs.search(TAGS, discovery_s=float("inf"))
    finally:
        late.stop()
        researcher.close()
        broker.close()


def test_an_expected_node_that_never_comes_is_waited_for_the_window_only(tmp_path: Path) -> None:
    world = make_world(tmp_path, 1)
    try:
        reqs = Requests(world.researcher(), default_deadline_s=30.0)
        start = time.monotonic()
        found = reqs.search(TAGS, nodes=["node-1", "node-404"], discovery_s=1.0)
        assert 1.0 <= time.monotonic() - start < 4.0  # not the 30 s deadline: never online
        assert found.node_ids() == ["node-1"]
        assert reqs.last_search is not None and reqs.last_search.missing == ("node-404",)
        assert "no answer from ['node-404']" in reqs.last_search.line()
    finally:
        world.close()


def test_no_node_found_says_what_the_search_saw(tmp_path: Path) -> None:
    broker = MemoryBroker()
    researcher = MemoryBus(broker, "researcher-alone", role="researcher")
    try:
        start = time.monotonic()
        with pytest.raises(JobError) as info:
            Experiment(
                tags=TAGS,
                training_plan_class="BreastCancerPlan",
                training_plan_path=tmp_path / "plan.py",
                run_dir=tmp_path / "run",
                bus=researcher,
                repository=LocalRepository(tmp_path / "repository"),
                discovery_s=0.5,
                progress=False,
            )
        assert time.monotonic() - start < 3.0
        message = str(info.value)
        assert "no node has a dataset tagged ['breast-cancer']" in message
        assert "0 node(s) with a matching dataset; 0 answered, 0 online" in message
        assert "discovery window 0.5 s" in message and "discovery_s=" in message
        assert not (tmp_path / "run").exists()  # nothing written
    finally:
        researcher.close()
        broker.close()


def test_experiment_waits_for_late_nodes_and_says_how_many(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fedsm.training.demo_plan import BreastCancerPlan

    plan = tmp_path / "plan.py"
    BreastCancerPlan().save_code(plan)
    broker = MemoryBroker()
    researcher = MemoryBus(broker, "researcher-late", role="researcher")
    late = LateNodes(tmp_path, broker, 3, delay_s=0.3, approve=(plan,))
    try:
        late.start()
        start = time.monotonic()
        exp = Experiment(
            tags=TAGS,
            training_plan_class="BreastCancerPlan",
            training_plan_path=plan,
            training_args=TRAINING_ARGS,
            round_limit=1,
            min_nodes=2,
            run_dir=tmp_path / "run",
            bus=researcher,
            repository=late.repository,
            discovery_s=20.0,
            progress=False,
        )
        try:
            assert time.monotonic() - start < 10.0  # min_nodes found: the window ended early
            assert len(exp.job.nodes) >= 2
            err = capsys.readouterr().err
            assert "search ['breast-cancer']: " in err and "(ended early)" in err
            exp.run()
            assert exp.finished
        finally:
            exp.close()
    finally:
        late.stop()
        researcher.close()
        broker.close()


# --------------------------------------------------------------------------- real MQTT


def _mqtt_node(root: Path, port: int, prefix: str, node_id: str, csv: Path, repo) -> Node:
    node_dir = root / node_id
    settings = init_node_dir(node_dir, node_id)
    bus = MqttBus(node_id, "node", port=port, topic_prefix=prefix, connect_timeout_s=10)
    node = Node(
        node_dir,
        bus=bus,
        repository=repo,
        settings=settings,
        executor=shared_executor(),
        durable=False,
    )
    register_csv_dataset(node, csv, name=f"bc-{node_id}", tags=TAGS, target="target")
    return node.start()


@pytest.mark.mqtt
def test_mqtt_search_finds_nodes_running_before_and_connecting_after(
    tmp_path: Path,
    mosquitto,  # noqa: F811
) -> None:
    prefix = f"t{uuid.uuid4().hex[:10]}"
    repo = LocalRepository(tmp_path / "repository")
    csvs = _shards(tmp_path, 3)
    nodes: list[Node] = []
    opened: list[MqttBus] = []
    try:
        # node-a runs before the researcher connects: its retained "online" reaches the
        # researcher only after MqttBus(...) returns (the README script's 3-in-4 failure).
        nodes.append(
            _mqtt_node(tmp_path / "nodes", mosquitto.port, prefix, "node-a", csvs[0], repo)
        )

        def connect_later() -> None:
            time.sleep(0.5)
            for node_id, csv in (("node-b", csvs[1]), ("node-c", csvs[2])):
                nodes.append(
                    _mqtt_node(tmp_path / "nodes", mosquitto.port, prefix, node_id, csv, repo)
                )

        later = threading.Thread(target=connect_later, daemon=True)
        researcher = MqttBus(
            "researcher-disc", "researcher", port=mosquitto.port, topic_prefix=prefix
        )
        opened.append(researcher)
        later.start()
        reqs = Requests(researcher, default_deadline_s=10.0)
        start = time.monotonic()
        found = reqs.search(TAGS, nodes=["node-a", "node-b", "node-c"], discovery_s=30.0)
        elapsed = time.monotonic() - start
        later.join(30)
        assert found.node_ids() == ["node-a", "node-b", "node-c"]
        assert elapsed < 10.0, elapsed  # returned when they answered, not after 30 s
        assert reqs.last_search is not None and reqs.last_search.ended_early

        # A new researcher, no expectation: the window finds all three, then it ends.
        researcher2 = MqttBus(
            "researcher-disc2", "researcher", port=mosquitto.port, topic_prefix=prefix
        )
        opened.append(researcher2)
        reqs2 = Requests(researcher2, default_deadline_s=10.0)
        start = time.monotonic()
        found = reqs2.search(TAGS, discovery_s=1.5)
        assert found.node_ids() == ["node-a", "node-b", "node-c"]
        assert 1.5 <= time.monotonic() - start < 8.0
    finally:
        for bus in opened:
            bus.close()
        for node in nodes:
            node.stop()


# --------------------------------------------------------------------------- the same script again


def _script(world: World, root: Path, **changes) -> Experiment:
    """What the researcher's script does: the same arguments every time it is run."""
    settings = dict(
        tags=TAGS,
        training_plan_class="BreastCancerPlan",
        training_plan_path=world.plan,
        training_args=TRAINING_ARGS,
        model_args={},
        round_limit=2,
        min_nodes=2,
        run_dir=root,
        bus=world.researcher(),
        repository=world.repository,
        seed=7,
        progress=False,
        on_round=lambda summary: None,
    )
    settings.update(changes)
    return Experiment(**settings)


def test_running_the_same_script_again_resumes_its_job(tmp_path: Path) -> None:
    world = make_world(tmp_path / "world", 2)
    try:
        clean = _script(world, tmp_path / "clean")
        try:
            uninterrupted = clean.run()
        finally:
            clean.close()
            world.extra[-1].close()

        first = _script(world, tmp_path / "run")
        try:
            first.run(rounds=1)  # the script stopped after one round
            assert first.round_current == 1 and not first.finished
            job_id = first.job.id
        finally:
            first.close()
            world.extra[-1].close()

        start = time.monotonic()
        again = _script(world, tmp_path / "run")  # the default 5 s discovery would show
        try:
            assert time.monotonic() - start < 3.0  # no search: the job's nodes are recorded
            assert again.job.id == job_id and again.round_current == 1
            assert again.run() == uninterrupted
            assert again.finished and len(again.history()) == 2
        finally:
            again.close()
            world.extra[-1].close()

        done = _script(world, tmp_path / "run")  # a finished job: the same result again
        try:
            assert done.run() == uninterrupted
        finally:
            done.close()
    finally:
        world.close()


def test_the_same_script_with_changed_settings_names_each_difference(tmp_path: Path) -> None:
    world = make_world(tmp_path / "world", 2)
    run = tmp_path / "run"
    try:
        first = _script(world, run, round_limit=3)
        try:
            first.run(rounds=1)
        finally:
            first.close()
            world.extra[-1].close()
        log_before = (run / "job.log").read_bytes()
        other_plan = tmp_path / "other_plan.py"
        other_plan.write_text(world.plan.read_text() + "\n# edited\n")
        cases = {
            "round_limit (recorded 3, given 4)": dict(round_limit=4),
            "training_args['lr'] (recorded 0.5, given 0.1)": dict(
                round_limit=3, training_args=dict(TRAINING_ARGS, lr=0.1)
            ),
            "model_args['hidden'] (recorded '<unset>', given 8)": dict(
                round_limit=3, model_args={"hidden": 8}
            ),
            "seed (recorded 7, given 8)": dict(round_limit=3, seed=8),
            "tags (recorded ['breast-cancer'], given ['other'])": dict(
                round_limit=3, tags=["other"]
            ),
            "nodes (recorded ['node-1', 'node-2'], given ['node-1'])": dict(
                round_limit=3, nodes=["node-1"], min_nodes=1
            ),
            "min_nodes (recorded 2, given 1)": dict(round_limit=3, min_nodes=1),
            "reply_deadline_s (recorded 60.0, given 5.0)": dict(round_limit=3, reply_deadline_s=5),
            "training plan source sha256": dict(round_limit=3, training_plan_path=other_plan),
        }
        for expected, changes in cases.items():
            with pytest.raises(JobError) as info:
                _script(world, run, **changes)
            world.extra[-1].close()
            message = str(info.value)
            assert expected in message, message
            assert f"Experiment.resume({str(run)!r}, bus=..., repository=...)" in message
            assert "new run_dir" in message
        with pytest.raises(JobError) as info:
            _script(world, run, round_limit=1, seed=1)
        world.extra[-1].close()
        assert "round_limit (recorded 3, given 1); seed (recorded 7, given 1)" in str(info.value)
        assert (run / "job.log").read_bytes() == log_before  # nothing recorded or sent

        resumed = Experiment.resume(run, bus=world.researcher(), repository=world.repository)
        try:
            resumed.run(rounds=1)
            assert resumed.round_current == 2
        finally:
            resumed.close()
    finally:
        world.close()
