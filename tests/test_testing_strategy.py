"""fedsm.testing.StrategyContract catches strategies that break it, with a readable example.

A strategy weighting each reply by its position in the list it is given depends on the
order the replies arrive in; one weighting by position after sorting the node ids depends on
which node sent which file. Each must fail the property it breaks, and only that one, with
hypothesis' counterexample and a message naming the property.
"""

from __future__ import annotations

import hashlib
import itertools
from pathlib import Path

import pytest
from hypothesis import Phase, settings

from fedsm.strategies.fedavg import FedAvg
from fedsm.testing import StrategyContract


class ByArrivalPosition(FedAvg):
    """Broken: the n-th reply in the list it is given counts n times."""

    name = "by-arrival"

    def aggregate_files(self, items, out_path, *, like=None) -> str:
        weighted = [(n, p, w * (i + 1)) for i, (n, p, w) in enumerate(items)]
        return super().aggregate_files(weighted, out_path, like=like)


class BySortedPosition(FedAvg):
    """Broken, subtly: sorts first, then the n-th node id counts n times."""

    name = "by-sorted-position"

    def aggregate_files(self, items, out_path, *, like=None) -> str:
        ordered = sorted(items, key=lambda item: item[0])
        weighted = [(n, p, w * (i + 1)) for i, (n, p, w) in enumerate(ordered)]
        return super().aggregate_files(weighted, out_path, like=like)


class Counting(FedAvg):
    """Broken: every call scales the result a little more (memory kept outside state())."""

    name = "counting"

    def __init__(self) -> None:
        self.calls = 0

    def aggregate_files(self, items, out_path, *, like=None) -> str:
        self.calls += 1
        extra = [("~extra", items[0][1], float(self.calls))] if self.calls > 1 else []
        return super().aggregate_files([*items, *extra], out_path, like=like)


class PathDependent(FedAvg):
    """Broken: weights by the file's name (1 to 4 times, from a hash of the name: the same
    for the same example, so hypothesis sees a steady failure, never a flaky one)."""

    name = "paths"

    def aggregate_files(self, items, out_path, *, like=None) -> str:
        def factor(path) -> int:
            return 1 + hashlib.sha256(Path(path).name.encode()).digest()[0] % 4

        weighted = [(n, p, w * factor(p)) for n, p, w in items]
        return super().aggregate_files(weighted, out_path, like=like)


class FakeFedAvg(FedAvg):
    """Broken for the audit: named fedavg, yet not FedAvg's arithmetic."""

    def aggregate_files(self, items, out_path, *, like=None) -> str:
        return super().aggregate_files([(n, p, 1.0) for n, p, _ in items], out_path, like=like)


class ArgsWithClock(FedAvg):
    """Broken: a fresh nonce in every call."""

    name = "args"

    nonces = itertools.count()

    def create_aggregator_args(self, *, round_number, node_ids, **_):
        return {n: {"nonce": next(self.nonces)} for n in node_ids}, {}


def contract_for(cls: type) -> StrategyContract:
    class Contract(StrategyContract):
        max_examples = 50  # room to find the counterexample even under small profiles

        def make_strategy(self):
            return cls()

        def hypothesis_settings(self) -> settings:
            # Find and shrink, but skip the costly explain phase and keep these deliberate
            # failures out of the example database.
            phases = [p for p in super().hypothesis_settings().phases if p != Phase.explain]
            return settings(super().hypothesis_settings(), phases=phases, database=None)

    return Contract()


def failure(contract: StrategyContract, prop: str) -> str:
    with pytest.raises(AssertionError) as info:
        getattr(contract, prop)()
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert "Falsifying example" in notes or "Failing test case" in notes, notes
    return str(info.value) + "\n" + notes


def test_reply_order_dependence_fails_with_a_counterexample():
    contract = contract_for(ByArrivalPosition)
    text = failure(contract, "test_order_of_items_does_not_matter")
    assert "depends on the order of the replies" in text
    assert "(replies)" in text and "(order)" in text  # hypothesis' labelled draws


def test_sorted_position_passes_ordering_but_fails_relabelling():
    contract = contract_for(BySortedPosition)
    contract.test_order_of_items_does_not_matter()
    contract.test_same_inputs_give_the_same_bytes()
    text = failure(contract, "test_which_node_sent_which_file_does_not_matter")
    assert "depends on which node sent which reply" in text


def test_memory_outside_state_fails_determinism_and_restore():
    contract = contract_for(Counting)
    assert "aggregated twice" in failure(contract, "test_same_inputs_give_the_same_bytes")
    assert "restored job" in failure(contract, "test_restored_instance_gives_the_same_result")


def test_path_dependence_fails_the_audit_recomputation():
    contract = contract_for(PathDependent)
    assert "recomputed from the stored reply files" in failure(
        contract, "test_audit_recomputes_the_recorded_digest"
    )


def test_a_strategy_named_fedavg_must_be_fedavg():
    contract = contract_for(FakeFedAvg)
    contract.test_order_of_items_does_not_matter()
    assert "the audit recomputes" in failure(contract, "test_audit_recomputes_the_recorded_digest")


def test_aggregator_args_must_be_a_function_of_their_inputs():
    contract = contract_for(ArgsWithClock)
    assert "create_aggregator_args(round_number=" in failure(
        contract, "test_aggregator_args_are_a_function_of_their_inputs"
    )


def test_node_asymmetric_strategies_may_opt_out_of_relabelling():
    class Contract(StrategyContract):
        node_symmetric = False

        def make_strategy(self):
            return BySortedPosition()

    Contract().test_which_node_sent_which_file_does_not_matter()


def test_the_contract_is_not_collected_itself():
    assert StrategyContract.__test__ is False
    with pytest.raises(NotImplementedError):
        StrategyContract().make_strategy()
