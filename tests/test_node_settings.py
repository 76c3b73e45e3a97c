"""Node settings (node.toml + FEDSM_* overrides), registries, and simulated nodes."""

from __future__ import annotations

import pytest
from plans import Researcher, head, initial_params, plan_bytes, train_request, write_csv

from fedsm.core.messages import BROADCAST, PingRequest, SearchReply, SearchRequest, TrainReply
from fedsm.errors import ConfigurationError
from fedsm.node.database import DB_FILE, NodeDatabase
from fedsm.node.errors import NodeNotInitialised, PlanNotRegistered
from fedsm.node.registry import ApprovalRegistry, DatasetRegistry
from fedsm.node.settings import SETTINGS_FILE, NodeSettings, init_node_dir, load_settings
from fedsm.node.simulate import start_memory_nodes
from fedsm.repository import LocalRepository
from fedsm.transport import MemoryBroker


def test_settings_file_and_environment(tmp_path):
    init_node_dir(tmp_path, "node-s", training_time_limit_s=30)
    settings = load_settings(tmp_path, env={})
    assert (settings.node_id, settings.training_time_limit_s) == ("node-s", 30.0)
    assert settings.approval_required and not settings.allow_unapproved
    assert settings.enforce_approval

    env = {
        "FEDSM_NODE_ID": "node-env",
        "FEDSM_TRAINING_TIME_LIMIT_S": "5",
        "FEDSM_REPOSITORY_TOKEN": "tok",
    }
    overridden = load_settings(tmp_path, env=env)
    assert (overridden.node_id, overridden.training_time_limit_s) == ("node-env", 5.0)
    assert overridden.to_dict()["repository_token"] == "***"
    assert overridden.to_dict(show_secrets=True)["repository_token"] == "tok"

    # switching approval off takes both keys
    with pytest.raises(ConfigurationError, match="allow_unapproved"):
        load_settings(tmp_path, env={"FEDSM_APPROVAL_REQUIRED": "false"})
    off = load_settings(
        tmp_path, env={"FEDSM_APPROVAL_REQUIRED": "false", "FEDSM_ALLOW_UNAPPROVED": "yes"}
    )
    assert not off.enforce_approval


def test_secrets_from_files_and_the_environment(tmp_path):
    init_node_dir(tmp_path, "node-s", broker_password="pw-in-toml")
    assert load_settings(tmp_path, env={}).broker_password == "pw-in-toml"
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "pw").write_text("pw-from-file\n")
    (secrets / "token").write_text("tok-from-file")

    # the environment's secret (inline or as a file) replaces node.toml's
    env = {
        "FEDSM_BROKER_PASSWORD_FILE": str(secrets / "pw"),
        "FEDSM_REPOSITORY_TOKEN": "tok-from-env",
    }
    settings = load_settings(tmp_path, env=env)
    assert settings.broker_password == "pw-from-file"
    assert settings.broker_password_file == str(secrets / "pw")
    assert settings.repository_token == "tok-from-env"
    assert settings.to_dict()["broker_password"] == "***"
    assert settings.to_dict()["broker_password_file"] == str(secrets / "pw")

    # node.toml may name the file, relative to the node directory
    (tmp_path / SETTINGS_FILE).write_text(
        'node_id = "node-s"\nrepository_token_file = "secrets/token"\n'
    )
    settings = load_settings(tmp_path, env={})
    assert settings.repository_token == "tok-from-file"
    assert settings.repository_token_file == str(secrets / "token")

    (tmp_path / SETTINGS_FILE).write_text(
        'node_id = "node-s"\nrepository_token = "t"\nrepository_token_file = "secrets/token"\n'
    )
    with pytest.raises(ConfigurationError, match="both inline and as repository_token_file"):
        load_settings(tmp_path, env={})
    with pytest.raises(ConfigurationError, match="cannot read broker password from"):
        load_settings(tmp_path, env={"FEDSM_BROKER_PASSWORD_FILE": str(secrets / "none")})
    (secrets / "empty").write_text("\n")
    with pytest.raises(ConfigurationError, match="is empty"):
        load_settings(tmp_path, env={"FEDSM_REPOSITORY_TOKEN_FILE": str(secrets / "empty")})


def test_settings_toml_round_trips(tmp_path):
    from fedsm.node.settings import settings_toml, tomllib

    settings = NodeSettings(
        node_id="node-t",
        training_time_limit_s=float("inf"),
        broker_url='mqtt://b:1/\u00e9"\\\n\x7f\t',
        broker_password='p"w',
        broker_give_up_s=1.5,
    )
    text = settings_toml(settings, show_secrets=True)
    data = tomllib.loads(text)
    assert NodeSettings(**data) == settings
    masked = tomllib.loads(settings_toml(settings))
    assert masked["broker_password"] == "***"
    with pytest.raises(ConfigurationError, match="broker_give_up_s"):
        NodeSettings(node_id="n", broker_give_up_s=0)
    in_url = NodeSettings(node_id="n", broker_url="mqtts://hosp:s3cret@broker:8883")
    assert in_url.to_dict()["broker_url"] == "mqtts://hosp:***@broker:8883"
    assert "s3cret" in in_url.to_dict(show_secrets=True)["broker_url"]


def test_bad_settings_are_refused_with_the_key_named(tmp_path):
    with pytest.raises(NodeNotInitialised, match="fedsm node init"):
        load_settings(tmp_path / "nowhere", env={})
    init_node_dir(tmp_path, "node-s")
    with pytest.raises(ConfigurationError, match="already holds a node"):
        init_node_dir(tmp_path, "node-t")
    (tmp_path / SETTINGS_FILE).write_text('node_id = "n"\ncolour = "blue"\n')
    with pytest.raises(ConfigurationError, match="colour"):
        load_settings(tmp_path, env={})
    (tmp_path / SETTINGS_FILE).write_text('node_id = "n"\ntraining_time_limit_s = -1\n')
    with pytest.raises(ConfigurationError, match="training_time_limit_s"):
        load_settings(tmp_path, env={})
    (tmp_path / SETTINGS_FILE).write_text('node_id = "bad id!"\n')
    with pytest.raises(ConfigurationError, match="node_id"):
        load_settings(tmp_path, env={})


def test_registries(tmp_path):
    db = NodeDatabase(tmp_path / DB_FILE)
    datasets, plans = DatasetRegistry(db), ApprovalRegistry(db)
    datasets.add(
        name="a",
        tags=["x", "y"],
        data_type="csv",
        path=tmp_path,
        shape=[3, 2],
        dtypes=["float64"] * 2,
        sample_count=3,
        dataset_id="ds-a",
    )
    datasets.add(
        name="b",
        tags=["y", "z"],
        data_type="tensors",
        path=tmp_path,
        shape=[4, 1, 2],
        dtypes=["float32"],
        sample_count=4,
        dataset_id="ds-b",
    )
    assert [d["dataset_id"] for d in datasets.search(["y"])] == ["ds-a", "ds-b"]
    assert [d["dataset_id"] for d in datasets.search(["x", "y"])] == ["ds-a"]
    assert datasets.search(["w"]) == []
    for name, tags, match in (
        ("a", ["q"], "named 'a' is already registered"),
        ("c", ["y"], "a search could match both"),  # a subset of both a's and b's tags
        ("c", ["x", "y", "q"], "a search could match both"),  # a superset of a's
    ):
        with pytest.raises(ConfigurationError, match=match):
            datasets.add(
                name=name,
                tags=tags,
                data_type="csv",
                path=tmp_path,
                shape=[1, 1],
                dtypes=[],
                sample_count=1,
            )
    with pytest.raises(ConfigurationError, match="already registered"):
        datasets.add(
            name="c",
            tags=["k"],
            data_type="csv",
            path=tmp_path,
            shape=[1, 1],
            dtypes=[],
            sample_count=1,
            dataset_id="ds-a",
        )
    with pytest.raises(ConfigurationError, match="data type"):
        datasets.add(
            name="c",
            tags=["k"],
            data_type="images",
            path=tmp_path,
            shape=[1],
            dtypes=[],
            sample_count=1,
        )

    source = b"print('plan')\n"
    assert plans.record_pending(source, name="p", origin="test") == "pending"
    record = plans.decide("approved", source=source, by="op", notes="reviewed")
    assert (record.status, record.decided_by, record.notes) == ("approved", "op", "reviewed")
    # a later status request does not downgrade a decision
    assert plans.record_pending(source, name="p", origin="test") == "approved"
    with pytest.raises(PlanNotRegistered):
        plans.decide("approved", sha256="f" * 64, by="op")
    db.close()


def test_simulated_nodes_train_and_reopen(tmp_path):
    broker = MemoryBroker()
    repo = LocalRepository(tmp_path / "repo")
    csvs = [write_csv(tmp_path / f"d{k}.csv", rows=16, seed=k) for k in range(3)]
    plan = plan_bytes("linear_plan.py")
    plan_file = tmp_path / "plan.py"
    plan_file.write_bytes(plan)
    nodes = start_memory_nodes(
        tmp_path / "nodes", broker, repo, csvs, tags=("bc",), approve=[plan_file]
    )
    researcher = Researcher(broker)
    try:
        assert [n.node_id for n in nodes] == ["node-1", "node-2", "node-3"]
        search = SearchRequest(**head(BROADCAST), tags=["bc"])
        researcher.bus.broadcast(search)
        found = {}
        for _ in nodes:
            reply = researcher.wait(search.request_id)
            assert isinstance(reply, SearchReply)
            found[reply.node_id] = reply.datasets[0]["dataset_id"]
        assert found == {f"node-{k}": f"dataset-node-{k}" for k in (1, 2, 3)}

        params = initial_params(repo, plan, "LinearPlan", tmp_path)
        requests = [
            train_request(n.node_id, found[n.node_id], repo, plan, "LinearPlan", params, tmp_path)
            for n in nodes
        ]
        for request in requests:  # all at once: they share the executor
            researcher.bus.send(request.node_id, request)
        replies = [researcher.wait(r.request_id) for r in requests]
        assert all(isinstance(r, TrainReply) for r in replies)
        assert len({r.params_sha256 for r in replies}) == 3  # different data, different models
    finally:
        for node in nodes:
            node.stop()

    # a resumed run re-opens the same nodes: datasets and reply caches are still there
    again = start_memory_nodes(
        tmp_path / "nodes", broker, repo, csvs, tags=("bc",), approve=[plan_file]
    )
    try:
        assert [len(n.datasets.list()) for n in again] == [1, 1, 1]
        researcher.bus.send("node-2", requests[1])
        assert researcher.wait(requests[1].request_id) == replies[1]
        assert again[1].trainings_run == 0
        ping = PingRequest(**head("node-3"))
        assert researcher.ask("node-3", ping).node_id == "node-3"
    finally:
        researcher.close()
        for node in again:
            node.stop()
