"""FedAvg: canonical order (bit-identical under permutation), numpy reference, streaming, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fedsm.digests import sha256_file as file_sha256
from fedsm.strategies.base import AggregateContext, NodeArgsContext, NodeUpdate, aggregate_files
from fedsm.strategies.fedavg import AggregationError, FedAvg, FedAvgAccumulator, fedavg
from fedsm.testing.strategy import StrategyContract
from fedsm.training.params import ParamsFileError, load_params, save_params


def _update(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(5, 3, generator=gen) * 10,
        "b": torch.randn(5, generator=gen),
        "steps": torch.tensor(seed * 3 + 1, dtype=torch.int64),
    }


@st.composite
def update_sets(draw):
    k = draw(st.integers(min_value=1, max_value=6))
    ids = draw(
        st.lists(
            st.text("abcdefgh0123", min_size=1, max_size=6), min_size=k, max_size=k, unique=True
        )
    )
    weights = draw(st.lists(st.integers(min_value=1, max_value=10_000), min_size=k, max_size=k))
    seeds = draw(st.lists(st.integers(min_value=0, max_value=10_000), min_size=k, max_size=k))
    return [
        (node, _update(seed), float(w)) for node, seed, w in zip(ids, seeds, weights, strict=True)
    ]


@given(update_sets(), st.randoms(use_true_random=False))
def test_permuting_replies_gives_identical_bytes(tmp_path_factory, updates, rnd):
    tmp = tmp_path_factory.mktemp("perm")
    items = []
    for node, params, weight in updates:
        path = tmp / f"node-{node}.safetensors"
        save_params(path, params)
        items.append((node, path, weight))
    shuffled = list(items)
    rnd.shuffle(shuffled)
    sha_a = FedAvg().aggregate_files(items, tmp / "out-a.agg")
    sha_b = FedAvg().aggregate_files(shuffled, tmp / "out-b.agg")
    assert sha_a == sha_b == file_sha256(tmp / "out-b.agg")
    assert (tmp / "out-a.agg").read_bytes() == (tmp / "out-b.agg").read_bytes()
    # the in-memory form agrees bit for bit with the streamed files
    in_memory = fedavg(reversed(updates))
    on_disk = load_params(tmp / "out-a.agg")
    for name in in_memory:
        assert torch.equal(in_memory[name], on_disk[name])


@given(update_sets())
def test_weighted_mean_matches_float64_numpy_reference(updates):
    result = fedavg(updates)
    weights = np.array([w for _, _, w in updates], dtype=np.float64)
    for name in ("w", "b"):
        stack = np.stack([p[name].numpy().astype(np.float64) for _, p, _ in updates])
        expected = np.average(stack, axis=0, weights=weights)
        assert result[name].dtype == torch.float32
        np.testing.assert_allclose(result[name].numpy(), expected, rtol=1e-6, atol=1e-6)
    steps = np.array([float(p["steps"]) for _, p, _ in updates])
    assert result["steps"].dtype == torch.int64
    assert int(result["steps"]) == int(np.round(np.average(steps, weights=weights)))


@given(update_sets())
def test_streaming_accumulator_equals_one_shot(updates):
    acc = FedAvgAccumulator()
    for node, params, weight in sorted(updates, key=lambda u: u[0]):
        acc.add(node, params, weight)
    streamed = acc.result()
    one_shot = fedavg(updates)
    assert acc.count == len(updates)
    assert acc.total_weight == sum(w for _, _, w in sorted(updates, key=lambda u: u[0]))
    assert set(streamed) == set(one_shot)
    for name in one_shot:
        assert torch.equal(streamed[name], one_shot[name])


def test_single_update_is_returned_unchanged():
    params = _update(1)
    result = fedavg([("n1", params, 42)])
    for name in params:
        assert torch.equal(result[name], params[name])


def test_zero_weight_node_does_not_count():
    a, b = _update(1), _update(2)
    result = fedavg([("a", a, 0), ("b", b, 5)])
    assert torch.equal(result["w"], b["w"])


def test_empty_set_is_refused(tmp_path):
    with pytest.raises(AggregationError, match="empty"):
        fedavg([])
    with pytest.raises(AggregationError, match="empty"):
        FedAvg().aggregate_files([], tmp_path / "out")
    with pytest.raises(AggregationError, match="empty"):
        FedAvgAccumulator().result()


def test_all_zero_weights_are_refused():
    with pytest.raises(AggregationError, match="weight 0"):
        fedavg([("a", _update(1), 0), ("b", _update(2), 0.0)])


@pytest.mark.parametrize("weight", [-1, float("nan"), float("inf"), "3", True])
def test_bad_weights_are_refused(weight):
    with pytest.raises(AggregationError, match="weight"):
        fedavg([("a", _update(1), weight)])


def test_mismatched_shapes_are_refused():
    bad = _update(2)
    bad["w"] = torch.zeros(3, 5)
    with pytest.raises(AggregationError, match=r"'w'.*shape"):
        fedavg([("a", _update(1), 1), ("b", bad, 1)])


def test_mismatched_dtypes_and_names_are_refused():
    bad = _update(2)
    bad["b"] = bad["b"].double()
    with pytest.raises(AggregationError, match="dtype"):
        fedavg([("a", _update(1), 1), ("b", bad, 1)])
    renamed = _update(2)
    renamed["bias"] = renamed.pop("b")
    with pytest.raises(AggregationError, match="names"):
        fedavg([("a", _update(1), 1), ("b", renamed, 1)])


def test_duplicate_node_ids_are_refused(tmp_path):
    with pytest.raises(AggregationError, match="duplicate"):
        fedavg([("a", _update(1), 1), ("a", _update(2), 1)])
    save_params(tmp_path / "p", _update(1))
    with pytest.raises(AggregationError, match="duplicate"):
        FedAvg().aggregate_files(
            [("a", tmp_path / "p", 1), ("a", tmp_path / "p", 2)], tmp_path / "o"
        )


def test_accumulator_refuses_out_of_order_ids_and_stays_unchanged():
    acc = FedAvgAccumulator()
    acc.add("b", _update(1), 2)
    with pytest.raises(AggregationError, match="increasing node-id order"):
        acc.add("a", _update(2), 3)
    with pytest.raises(AggregationError, match="increasing node-id order"):
        acc.add("b", _update(2), 3)
    assert acc.count == 1 and acc.total_weight == 2.0
    assert torch.equal(acc.result()["w"], _update(1)["w"])


def test_aggregate_files_checks_against_like_and_refuses_bad_files(tmp_path):
    save_params(tmp_path / "a", _update(1))
    (tmp_path / "b").write_bytes(b"\x80\x04not a params file")
    with pytest.raises(ParamsFileError):
        FedAvg().aggregate_files(
            [("a", tmp_path / "a", 1), ("b", tmp_path / "b", 1)], tmp_path / "o"
        )
    like = _update(1)
    like["w"] = torch.zeros(2, 2)
    with pytest.raises(ParamsFileError, match="shape"):
        FedAvg().aggregate_files([("a", tmp_path / "a", 1)], tmp_path / "o", like=like)
    assert not (tmp_path / "o").exists()


def test_fedavg_needs_no_node_args_and_has_no_state():
    agg = FedAvg()
    assert agg.name == "fedavg" and agg.config() == {}
    params = _update(1)
    ctx = NodeArgsContext(
        round=1, node_ids=("a", "b"), all_nodes=("a", "b"), global_params=params, state=None
    )
    assert agg.node_args(ctx) == {}
    result = agg.aggregate(
        AggregateContext(
            round=1,
            global_params=params,
            updates=(NodeUpdate.of("a", _update(2), 1), NodeUpdate.of("b", _update(3), 2)),
            all_nodes=("a", "b"),
            state=None,
        )
    )
    assert result.state is None
    expected = fedavg([("a", _update(2), 1), ("b", _update(3), 2)])
    assert all(torch.equal(result.params[name], expected[name]) for name in expected)


def test_aggregate_files_of_the_interface_agrees_with_the_convenience(tmp_path):
    """FedAvg().aggregate_files (a convenience) and base.aggregate_files (what the Job and
    the audit run) write the same bytes."""
    save_params(tmp_path / "global", _update(0))
    items = []
    for node, seed, weight in (("b", 2, 3.0), ("a", 1, 5.0), ("c", 3, 1.0)):
        save_params(tmp_path / node, _update(seed))
        items.append((node, tmp_path / node, weight))
    convenience = FedAvg().aggregate_files(items, tmp_path / "one")
    digest, state_digest = aggregate_files(
        FedAvg(),
        round=1,
        global_params_path=tmp_path / "global",
        replies=[(n, p, w, {}) for n, p, w in items],
        all_nodes=["a", "b", "c"],
        state_path=None,
        out_path=tmp_path / "two",
        state_out_path=tmp_path / "two.state",
    )
    assert digest == convenience and state_digest is None
    assert not (tmp_path / "two.state").exists()


class TestFedAvgContract(StrategyContract):
    """FedAvg keeps the contract of every strategy (fedsm.testing.StrategyContract)."""

    __test__ = True

    def make_strategy(self) -> FedAvg:
        return FedAvg()
