"""The researcher's requests over the memory bus, against real nodes."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from job_world import SilentNode, make_world

from fedsm.node.simulate import register_csv_dataset
from fedsm.researcher.requests import FederatedDataSet, FederatedDataSetError, Requests


def test_search_returns_when_every_online_node_answered(tmp_path: Path) -> None:
    world = make_world(tmp_path, 3)
    try:
        reqs = Requests(world.researcher(), default_deadline_s=30.0, default_discovery_s=0.0)
        start = time.monotonic()
        found = reqs.search(["breast-cancer"])  # no discovery window: the nodes online now
        assert time.monotonic() - start < 10.0  # did not sit out the 30 s deadline
        assert found.node_ids() == ["node-1", "node-2", "node-3"]
        assert all("path" not in entry for entry in found.data().values())  # never sent
        assert len(reqs.search(["no-such-tag"])) == 0  # empty answers, not silence
        assert sorted(reqs.ping_nodes()) == ["node-1", "node-2", "node-3"]
        listed = reqs.list(["node-2"])
        assert list(listed) == ["node-2"] and listed["node-2"][0]["dataset_id"]
        # With a discovery window, min_nodes (or nodes) that answered end it early.
        start = time.monotonic()
        assert len(reqs.search(["breast-cancer"], discovery_s=30.0, min_nodes=3)) == 3
        assert len(reqs.search(["breast-cancer"], ["node-1"], discovery_s=30.0)) == 1
        assert sorted(reqs.ping_nodes(["node-1", "node-3"], discovery_s=30.0)) == [
            "node-1",
            "node-3",
        ]
        assert time.monotonic() - start < 10.0
    finally:
        world.close()


def test_discovery_waits_for_a_node_online_later_and_every_wait_is_bounded(
    tmp_path: Path,
) -> None:
    world = make_world(tmp_path, 1)
    try:
        reqs = Requests(world.researcher(), default_deadline_s=0.5)
        late: list[SilentNode] = []

        def come_online() -> None:
            time.sleep(0.3)
            late.append(SilentNode(world, "node-9", world.nodes[0].datasets.list()[0]))

        thread = threading.Thread(target=come_online, daemon=True)
        thread.start()
        start = time.monotonic()
        found = reqs.search(["breast-cancer"], discovery_s=1.0)  # node-9 was sent it directly
        thread.join(10)
        assert found.node_ids() == ["node-1", "node-9"]
        assert 1.0 <= time.monotonic() - start < 3.0
        # node-9 never pongs: awaited deadline_s from when it was asked, then the wait ends.
        start = time.monotonic()
        assert list(reqs.ping_nodes(discovery_s=0.2)) == ["node-1"]
        assert 0.5 <= time.monotonic() - start < 3.0
    finally:
        world.close()


def test_search_waits_for_a_slow_node_until_the_deadline_only(tmp_path: Path) -> None:
    world = make_world(tmp_path, 1)
    try:
        SilentNode(world, "node-9", world.nodes[0].datasets.list()[0])
        reqs = Requests(world.researcher(), default_deadline_s=0.5, default_discovery_s=0.0)
        assert "node-9" in reqs.bus.online_nodes()
        found = reqs.ping_nodes()  # the silent node never pongs: the deadline ends the wait
        assert list(found) == ["node-1"]
        assert reqs.offline_nodes(["node-1", "node-9", "node-404"]) == ["node-404"]
    finally:
        world.close()


def test_a_node_with_two_matching_datasets_is_left_out_not_fatal(tmp_path: Path) -> None:
    world = make_world(tmp_path, 2)
    try:
        node = world.nodes[0]
        csv = world.csvs[0]
        register_csv_dataset(node, csv, name="a", tags=["shared", "a"], target="target")
        register_csv_dataset(node, csv, name="b", tags=["shared", "b"], target="target")
        reqs = Requests(world.researcher(), default_deadline_s=5.0, default_discovery_s=0.0)
        assert reqs.search(["shared"]).node_ids() == []  # ambiguous on node-1: left out
        assert reqs.search(["shared", "a"]).node_ids() == ["node-1"]
        assert reqs.search(["breast-cancer"]).node_ids() == ["node-1", "node-2"]
    finally:
        world.close()


def test_shapes_and_sample_sizes_need_a_shape() -> None:
    fds = FederatedDataSet(
        {"b": {"dataset_id": "db", "shape": [7, 3]}, "a": [{"dataset_id": "da", "shape": (5,)}]}
    )
    assert fds.sample_sizes() == [5, 7]  # in node_ids() order, as the seed's list
    assert fds.shapes() == {"a": 5, "b": 7}
    for shape in (None, [], ["5"], [True], [-1]):
        ids_only = FederatedDataSet({"a": {"dataset_id": "da", "shape": shape}})
        with pytest.raises(FederatedDataSetError, match="node a: dataset metadata has no usable"):
            ids_only.sample_sizes()
        with pytest.raises(FederatedDataSetError):
            ids_only.shapes()
