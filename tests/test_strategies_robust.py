"""FedMedian and FedTrimmedMean: coordinate-wise, unweighted, on hand-computed numbers."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsm.strategies import FedMedian, FedTrimmedMean, StrategyError, resolve
from fedsm.strategies.base import AggregateContext, NodeUpdate, aggregate_files
from fedsm.training.params import save_params

X = {"w": torch.zeros(3), "n": torch.tensor(0), "flag": torch.tensor(False)}


def ctx(rows, weights=None):
    """Replies whose 'w' are ``rows`` (int buffer 'n' = row index + 1, flag = index even)."""
    weights = weights or [1] * len(rows)
    nodes = [f"node-{i}" for i in range(len(rows))]
    updates = tuple(
        NodeUpdate.of(
            node,
            {"w": torch.tensor(row), "n": torch.tensor(i + 1), "flag": torch.tensor(i % 2 == 0)},
            weight,
        )
        for i, (node, row, weight) in enumerate(zip(nodes, rows, weights, strict=True))
    )
    return AggregateContext(1, X, updates, tuple(nodes), None)


ODD = [[1.0, 5.0, -2.0], [0.0, 0.0, 10.0], [3.0, -1.0, 4.0]]
EVEN = [*ODD, [2.0, 7.0, 7.0]]


def test_median_odd_count_is_the_middle_value_whatever_the_weights():
    result = FedMedian().aggregate(ctx(ODD, weights=[1000, 1, 1]))
    # per coordinate sorted: [0, 1, 3], [-1, 0, 5], [-2, 4, 10]
    assert torch.equal(result.params["w"], torch.tensor([1.0, 0.0, 4.0]))
    assert int(result.params["n"]) == 2 and bool(result.params["flag"]) is True
    assert result.state is None


def test_median_even_count_is_the_mean_of_the_two_middle_values():
    result = FedMedian().aggregate(ctx(EVEN))
    # sorted: [0, 1, 2, 3], [-1, 0, 5, 7], [-2, 4, 7, 10]
    assert torch.equal(result.params["w"], torch.tensor([1.5, 2.5, 5.5]))
    # torch.median would return the lower middle value: not what FedMedian computes
    assert not torch.equal(torch.median(torch.tensor(EVEN), dim=0).values, result.params["w"])
    # int buffer 1, 2, 3, 4 -> 2.5 rounded half to even (as FedAvg's cast back) -> 2
    assert int(result.params["n"]) == 2
    # flags True, False, True, False -> 0.5 -> True (FedAvg's bool rule: >= 0.5)
    assert bool(result.params["flag"]) is True


def test_trimmed_mean_drops_floor_beta_n_from_each_end():
    rows = [[10.0, 1.0], [-100.0, 2.0], [1.0, 3.0], [2.0, 4.0], [3.0, 100.0]]
    x = {"w": torch.zeros(2), "n": torch.tensor(0), "flag": torch.tensor(False)}
    c = ctx(rows)
    c = AggregateContext(1, x, c.updates, c.all_nodes, None)
    # beta 0.2, n 5: drop 1 at each end. [-100, 1, 2, 3, 10] -> 2; [1, 2, 3, 4, 100] -> 3
    assert torch.equal(FedTrimmedMean(0.2).aggregate(c).params["w"], torch.tensor([2.0, 3.0]))
    # beta 0.1, n 5: floor(0.5) = 0, the plain mean: [-84 / 5, 110 / 5]
    torch.testing.assert_close(
        FedTrimmedMean(0.1).aggregate(c).params["w"], torch.tensor([-16.8, 22.0])
    )
    # beta 0.4, n 5: drop 2 at each end, the median
    assert torch.equal(FedTrimmedMean(0.4).aggregate(c).params["w"], torch.tensor([2.0, 3.0]))


def test_trimmed_mean_even_count():
    # beta 0.25, n 4: drop 1 each end: [0, 1, 2, 3] -> 1.5; [-1, 0, 5, 7] -> 2.5
    result = FedTrimmedMean(0.25).aggregate(ctx(EVEN, weights=[1, 1, 1, 500]))
    assert torch.equal(result.params["w"], torch.tensor([1.5, 2.5, 5.5]))


def test_signed_zeros_do_not_depend_on_who_sent_them():
    a = FedMedian().aggregate(ctx([[-0.0, 0.0, 0.0], [0.0, -0.0, 0.0], [0.0, 0.0, -0.0]]))
    b = FedMedian().aggregate(ctx([[0.0, -0.0, -0.0], [-0.0, 0.0, -0.0], [-0.0, -0.0, 0.0]]))
    assert a.params["w"].numpy().tobytes() == b.params["w"].numpy().tobytes()


@pytest.mark.parametrize("beta", [-0.1, 0.5, 0.75, float("nan"), "0.2", None])
def test_bad_beta_is_refused(beta):
    with pytest.raises(StrategyError, match="beta"):
        FedTrimmedMean(beta=beta)


def test_resolve_rebuilds_the_same_strategy():
    assert resolve("fedtrimmedmean", FedTrimmedMean(0.1).config()) == FedTrimmedMean(0.1)
    assert resolve("fedtrimmedmean", {}) == FedTrimmedMean(0.2)
    assert resolve("fedmedian", FedMedian().config()) == FedMedian()


@settings(max_examples=min(settings.default.max_examples, 30), deadline=None)
@given(
    st.integers(1, 7),
    st.integers(0, 2**31 - 1),
    st.randoms(use_true_random=False),
    st.sampled_from([FedMedian(), FedTrimmedMean(0.2), FedTrimmedMean(0.0), FedTrimmedMean(0.45)]),
)
def test_order_and_labels_never_change_the_bits(tmp_path_factory, n, seed, rnd, strategy):
    tmp = tmp_path_factory.mktemp("robust")
    gen = torch.Generator().manual_seed(seed)
    save_params(tmp / "x", {"w": torch.zeros(4, 3), "s": torch.tensor(0)})
    files = []
    for i in range(n):
        path = tmp / f"p{i}"
        w = torch.randn(4, 3, generator=gen)
        w[0, 0] = 0.0 if i % 2 else -0.0
        save_params(path, {"w": w, "s": torch.tensor(i)})
        files.append(path)
    nodes = [f"node-{i}" for i in range(n)]

    def run(pairs, tag):
        return aggregate_files(
            strategy,
            round=1,
            global_params_path=tmp / "x",
            replies=[(node, path, float(k + 1), {}) for k, (node, path) in enumerate(pairs)],
            all_nodes=nodes,
            state_path=None,
            out_path=tmp / tag,
            state_out_path=tmp / f"{tag}.state",
        )

    relabelled = list(nodes)
    rnd.shuffle(relabelled)
    shuffled = list(zip(relabelled, files, strict=True))
    rnd.shuffle(shuffled)
    assert run(list(zip(nodes, files, strict=True)), "a") == run(shuffled, "b")


def _trim_mean(column: list[float], beta: float) -> float:
    """scipy.stats.trim_mean's rule in plain Python (an independent reference): sort, cut
    int(beta * n) values at each end, average the rest."""
    values = sorted(column)
    cut = int(beta * len(values))
    kept = values[cut : len(values) - cut]
    return math.fsum(kept) / len(kept)


def test_trimmed_mean_agrees_with_a_plain_reference():
    gen = torch.Generator().manual_seed(3)
    rows = torch.randn(7, 5, generator=gen, dtype=torch.float64)
    x = {"w": torch.zeros(5, dtype=torch.float64)}
    updates = tuple(NodeUpdate.of(f"n{i}", {"w": rows[i]}, 1) for i in range(7))
    for beta in (0.0, 0.1, 0.2, 0.3, 0.45):
        got = FedTrimmedMean(beta).aggregate(AggregateContext(1, x, updates, (), None))
        want = torch.tensor(
            [_trim_mean(rows[:, j].tolist(), beta) for j in range(5)], dtype=torch.float64
        )
        torch.testing.assert_close(got.params["w"], want, rtol=1e-14, atol=1e-15)
