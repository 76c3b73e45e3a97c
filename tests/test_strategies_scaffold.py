"""Scaffold against Karimireddy et al. 2020 (option II) as Fed-BioMed's researcher-side
Scaffold computes it, on hand-computed numbers: two rounds chained through the state (once
in memory, once through files), a node that does not reply, and bad replies."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsm.strategies import (
    AggregationError,
    MissingReplyData,
    Scaffold,
    StrategyError,
    resolve,
)
from fedsm.strategies.base import (
    AggregateContext,
    NodeArgsContext,
    NodeUpdate,
    aggregate_files,
)
from fedsm.training.params import load_params, save_params

F64 = torch.float64
NODES = ("a", "b", "c")  # N = 3; c does not reply in round 1

# Round 1: x = [1, 2]
X1 = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(4)}
ROUND_1 = (
    # K * lr = 2 * 0.5 = 1
    NodeUpdate.of(
        "a", {"w": torch.tensor([2.0, 0.0]), "n": torch.tensor(6)}, 1, {"num_updates": 2, "lr": 0.5}
    ),
    # K * lr = 4 * 0.25 = 1
    NodeUpdate.of(
        "b",
        {"w": torch.tensor([3.0, 4.0]), "n": torch.tensor(10)},
        3,
        {"num_updates": 4, "lr": 0.25},
    ),
)
# Round 2: x = round 1's result [1.75, 2]; a and c reply, b does not.
ROUND_2 = (
    # K * lr = 1 * 0.5
    NodeUpdate.of(
        "a",
        {"w": torch.tensor([1.25, 3.0]), "n": torch.tensor(4)},
        1,
        {"num_updates": 1, "lr": 0.5},
    ),
    # K * lr = 2 * 0.25
    NodeUpdate.of(
        "c",
        {"w": torch.tensor([2.75, 2.0]), "n": torch.tensor(8)},
        1,
        {"num_updates": 2, "lr": 0.25},
    ),
)


def t64(values):
    return torch.tensor(values, dtype=F64)


def test_round_one_from_zero_control_variates():
    result = Scaffold(server_lr=0.5).aggregate(AggregateContext(1, X1, ROUND_1, NODES, None))
    # x + 0.5 * unweighted mean([1, -2], [2, 2]) = [1, 2] + 0.5 * [1.5, 0]
    assert torch.equal(result.params["w"], torch.tensor([1.75, 2.0]))
    # integer buffer: FedAvg (1 * 6 + 3 * 10) / 4
    assert int(result.params["n"]) == 9
    # c_i = 0 - 0 + (x - y_i) / (K_i lr_i); c = (c_a + c_b + 0) / 3
    assert set(result.state) == {"c/w", "ci/a/w", "ci/b/w"}
    assert torch.equal(result.state["ci/a/w"], t64([-1.0, 2.0]))
    assert torch.equal(result.state["ci/b/w"], t64([-2.0, -2.0]))
    assert torch.equal(result.state["c/w"], t64([-1.0, 0.0]))


def _round_two_checks(result):
    # x + 0.5 * mean([-0.5, 1], [1, 0]) = [1.75, 2] + 0.5 * [0.25, 0.5]
    assert torch.equal(result.params["w"], torch.tensor([1.875, 2.25]))
    assert int(result.params["n"]) == 6  # (4 + 8) / 2
    # a: c_a - c + (x - y_a) / 0.5 = [-1, 2] - [-1, 0] + [1, -2] = [1, 0]
    assert torch.equal(result.state["ci/a/w"], t64([1.0, 0.0]))
    # b did not reply: keeps [-2, -2]
    assert torch.equal(result.state["ci/b/w"], t64([-2.0, -2.0]))
    # c (first reply): 0 - [-1, 0] + [-1, 0] / 0.5 = [-1, 0]
    assert torch.equal(result.state["ci/c/w"], t64([-1.0, 0.0]))
    # c = ([1, 0] + [-2, -2] + [-1, 0]) / 3
    assert torch.equal(result.state["c/w"], t64([-2.0 / 3.0, -2.0 / 3.0]))


def test_two_rounds_chained_through_the_state():
    strategy = Scaffold(server_lr=0.5)
    first = strategy.aggregate(AggregateContext(1, X1, ROUND_1, NODES, None))
    second = strategy.aggregate(AggregateContext(2, first.params, ROUND_2, NODES, first.state))
    _round_two_checks(second)


def test_two_rounds_chained_through_files(tmp_path):
    def round_(number, global_params, updates, state_path):
        global_path = tmp_path / f"global-{number}"
        save_params(global_path, global_params)
        replies = []
        for update in reversed(updates):  # arrival order: not sorted
            path = tmp_path / f"{number}-{update.node_id}"
            save_params(path, update.params())
            replies.append((update.node_id, path, update.weight, update.extras))
        out, state_out = tmp_path / f"out-{number}", tmp_path / f"state-{number}"
        _, state_digest = aggregate_files(
            resolve("scaffold", {"server_lr": 0.5}),
            round=number,
            global_params_path=global_path,
            replies=replies,
            all_nodes=list(reversed(NODES)),
            state_path=state_path,
            out_path=out,
            state_out_path=state_out,
        )
        assert state_digest is not None
        return load_params(out), state_out

    params, state_path = round_(1, X1, ROUND_1, None)
    params, state_path = round_(2, params, ROUND_2, state_path)
    _round_two_checks(type("R", (), {"params": params, "state": load_params(state_path)}))


def test_node_args_send_c_minus_c_i_as_tensors():
    strategy = Scaffold(server_lr=0.5)
    before = strategy.node_args(NodeArgsContext(1, ("a", "c"), NODES, X1, None))
    assert set(before) == {"a", "c"}
    for node in before:
        correction = before[node]["aggregator_correction"]
        assert set(correction) == {"w"}  # float parameters only
        assert correction["w"].dtype == torch.float32
        assert torch.equal(correction["w"], torch.zeros(2))
    first = strategy.aggregate(AggregateContext(1, X1, ROUND_1, NODES, None))
    args = strategy.node_args(NodeArgsContext(2, NODES, NODES, first.params, first.state))
    # c = [-1, 0]; c_a = [-1, 2], c_b = [-2, -2], c_c = 0
    assert torch.equal(args["a"]["aggregator_correction"]["w"], torch.tensor([0.0, -2.0]))
    assert torch.equal(args["b"]["aggregator_correction"]["w"], torch.tensor([1.0, 2.0]))
    assert torch.equal(args["c"]["aggregator_correction"]["w"], torch.tensor([-1.0, 0.0]))


@pytest.mark.parametrize(
    "extras",
    [
        {"lr": 0.1},
        {"num_updates": 3},
        {"num_updates": float("nan"), "lr": 0.1},
        {"num_updates": 0, "lr": 0.1},
        {"num_updates": 1.5, "lr": 0.1},
        {"num_updates": 3, "lr": 0.0},
        {"num_updates": 3, "lr": -0.1},
    ],
)
def test_a_reply_without_valid_num_updates_and_lr_fails_its_node(extras):
    update = NodeUpdate.of("a", {"w": torch.zeros(2)}, 1, extras)
    with pytest.raises(MissingReplyData, match="a"):
        Scaffold().check_update(update)
    x = {"w": torch.zeros(2)}
    with pytest.raises(MissingReplyData):
        Scaffold().aggregate(AggregateContext(1, x, (update,), ("a",), None))


def test_scaffold_declares_what_it_needs():
    assert Scaffold.required_extras == ("num_updates", "lr")
    assert Scaffold.node_symmetric is False


@pytest.mark.parametrize("server_lr", [0, 0.0, -1.0, float("inf"), float("nan"), "1", None])
def test_bad_server_lr_is_refused(server_lr):
    with pytest.raises(StrategyError, match="server_lr"):
        Scaffold(server_lr=server_lr)


def test_resolve_rebuilds_the_same_strategy():
    assert resolve("scaffold", Scaffold(0.3).config()) == Scaffold(0.3)
    assert resolve("scaffold", {}) == Scaffold(1.0)


def test_node_ids_with_a_slash_are_refused():
    x = {"w": torch.zeros(2)}
    with pytest.raises(StrategyError, match="'/'"):
        Scaffold().node_args(NodeArgsContext(1, ("site/1",), ("site/1",), x, None))
    update = NodeUpdate.of("site/1", {"w": torch.ones(2)}, 1, {"num_updates": 1, "lr": 1})
    with pytest.raises(StrategyError, match="'/'"):
        Scaffold().aggregate(AggregateContext(1, x, (update,), ("site/1",), None))


def test_a_reply_from_outside_the_job_is_refused():
    update = NodeUpdate.of("z", {"w": torch.ones(2)}, 1, {"num_updates": 1, "lr": 1})
    with pytest.raises(AggregationError, match="not a node of the job"):
        Scaffold().aggregate(AggregateContext(1, {"w": torch.zeros(2)}, (update,), ("a",), None))


def test_a_state_that_does_not_fit_is_refused():
    x = {"w": torch.zeros(2)}
    update = NodeUpdate.of("a", {"w": torch.ones(2)}, 1, {"num_updates": 1, "lr": 1})
    for state, match in (
        ({"c/w": torch.zeros(3)}, "shape"),
        ({"c/v": torch.zeros(2)}, "no floating-point parameter"),
        ({"q/w": torch.zeros(2)}, "unknown key"),
        ({"ci/a/w": torch.zeros(2)}, "lacks c"),
    ):
        with pytest.raises(StrategyError, match=match):
            Scaffold().aggregate(AggregateContext(1, x, (update,), ("a",), state))


NODE_IDS = ("h1", "h2", "h3", "h4", "h5")


@st.composite
def rounds(draw):
    nodes = draw(st.lists(st.sampled_from(NODE_IDS), min_size=1, max_size=5, unique=True))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    updates = []
    for node in sorted(nodes):
        extras = {
            "num_updates": float(draw(st.integers(1, 50))),
            "lr": draw(st.floats(1e-4, 1.0)),
        }
        params = {"w": torch.randn(4, 3, generator=gen), "b": torch.randn(3, generator=gen)}
        updates.append(NodeUpdate.of(node, params, draw(st.integers(0, 100)), extras))
    return updates, draw(st.randoms(use_true_random=False))


@settings(max_examples=min(settings.default.max_examples, 30), deadline=None)
@given(rounds(), rounds())
def test_the_order_of_replies_never_changes_the_bits(tmp_path_factory, earlier, now):
    """Random (non-dyadic) float32 values: summation order would show in the bits."""
    tmp = tmp_path_factory.mktemp("order")
    gen = torch.Generator().manual_seed(7)
    x = {"w": torch.randn(4, 3, generator=gen), "b": torch.randn(3, generator=gen)}
    save_params(tmp / "x", x)

    def run(updates, rnd: random.Random | None, state_path, tag):
        replies = []
        for update in updates:
            path = tmp / f"{tag}-{update.node_id}"
            save_params(path, update.params())
            replies.append((update.node_id, path, update.weight, update.extras))
        nodes = list(NODE_IDS)
        if rnd is not None:
            rnd.shuffle(replies)
            rnd.shuffle(nodes)
        return aggregate_files(
            Scaffold(server_lr=0.7),
            round=1,
            global_params_path=tmp / "x",
            replies=replies,
            all_nodes=nodes,
            state_path=state_path,
            out_path=tmp / f"{tag}.out",
            state_out_path=tmp / f"{tag}.state",
        )

    run(earlier[0], None, None, "r1")
    assert run(now[0], None, tmp / "r1.state", "sorted") == run(
        now[0], now[1], tmp / "r1.state", "shuffled"
    )
