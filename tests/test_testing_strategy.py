"""fedsm.testing.StrategyContract catches strategies that break it, with a readable example.

Each broken strategy below must fail the property it breaks, with hypothesis'
counterexample and a message naming the property. (Under the Strategy interface the order
replies arrive in can not reach a strategy at all: ``aggregate_files`` sorts them and the
strategy sees ``ctx.updates`` by node id. The kit still checks it, as a guard on the
plumbing; there is no broken strategy to show for it.)
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch
from hypothesis import Phase, settings

from fedsm.strategies.base import AggregateContext, AggregateResult, NodeUpdate
from fedsm.strategies.fedavg import FedAvg, FedAvgAccumulator
from fedsm.testing import StrategyContract


class BySortedPosition(FedAvg):
    """Broken, subtly: the n-th node id (sorted) counts n times."""

    name = "by-sorted-position"

    def aggregate(self, ctx: AggregateContext) -> AggregateResult:
        acc = FedAvgAccumulator()
        for i, update in enumerate(ctx.updates):
            acc.add(update.node_id, update.params(), update.weight * (i + 1))
        return AggregateResult(acc.result())


class Counting(FedAvg):
    """Broken: every call scales the result a little more (memory kept outside the state)."""

    name = "counting"

    def __init__(self) -> None:
        self.calls = 0

    def aggregate(self, ctx: AggregateContext) -> AggregateResult:
        self.calls += 1
        updates = list(ctx.updates)
        if self.calls > 1:
            first = updates[0]
            updates.append(NodeUpdate("~extra", float(self.calls), {}, first.params))
        acc = FedAvgAccumulator()
        for update in updates:
            acc.add(update.node_id, update.params(), update.weight)
        return AggregateResult(acc.result())


class Forgetful(FedAvg):
    """Broken: its hyper-parameter is not in config(), so a restore builds another one."""

    name = "forgetful"

    def __init__(self, scale: float = 1.0) -> None:
        self.scale = scale

    def aggregate(self, ctx: AggregateContext) -> AggregateResult:
        params = super().aggregate(ctx).params
        return AggregateResult({k: v * self.scale for k, v in params.items()})


class DictOrder(FedAvg):
    """Broken: reads its state by the dict's order (the first entry), which a state file
    does not keep (names come back sorted)."""

    name = "dict-order"

    def aggregate(self, ctx: AggregateContext) -> AggregateResult:
        params = super().aggregate(ctx).params
        if ctx.state is not None:
            shift = next(iter(ctx.state.values())).sum()
            params = {k: v + shift.to(v.dtype) for k, v in params.items()}
        bias = params["bias"].detach().double()
        return AggregateResult(params, {"z-last": bias, "a-first": torch.zeros_like(bias)})


class FakeFedAvg(FedAvg):
    """Broken for the audit: named fedavg, yet not FedAvg's arithmetic."""

    def aggregate(self, ctx: AggregateContext) -> AggregateResult:
        acc = FedAvgAccumulator()
        for update in ctx.updates:
            acc.add(update.node_id, update.params(), 1.0)
        return AggregateResult(acc.result())


class ArgsWithClock(FedAvg):
    """Broken: a fresh nonce in every call."""

    name = "args"

    nonces = itertools.count()

    def node_args(self, ctx: Any) -> dict[str, dict[str, Any]]:
        return {n: {"nonce": next(self.nonces)} for n in ctx.node_ids}


class ArgsNotPlain(FedAvg):
    """Broken: a message value that is neither JSON-like nor a mapping of tensors."""

    name = "args-not-plain"

    def node_args(self, ctx: Any) -> dict[str, dict[str, Any]]:
        return {n: {"when": object()} for n in ctx.node_ids}


def contract_for(factory: Any) -> StrategyContract:
    class Contract(StrategyContract):
        max_examples = 50  # room to find the counterexample even under small profiles

        def make_strategy(self):
            return factory()

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


def test_sorted_position_passes_ordering_but_fails_relabelling():
    contract = contract_for(BySortedPosition)
    contract.test_order_of_replies_does_not_matter()
    contract.test_same_inputs_give_the_same_bytes()
    text = failure(contract, "test_which_node_sent_which_reply_does_not_matter")
    assert "depends on which node sent which reply" in text
    assert "(replies)" in text and "(relabelling)" in text  # hypothesis' labelled draws


def test_memory_outside_state_fails_determinism_and_restore():
    contract = contract_for(Counting)
    assert "aggregated twice" in failure(contract, "test_same_inputs_give_the_same_bytes")
    assert "restored job" in failure(contract, "test_restored_instance_gives_the_same_result")


def test_a_state_read_by_dict_order_fails_restore():
    contract = contract_for(DictOrder)
    contract.test_same_inputs_give_the_same_bytes()
    contract.test_audit_recomputes_the_recorded_digest()  # files both times: consistent
    text = failure(contract, "test_restored_instance_gives_the_same_result")
    assert "outside its state, or lose it in the file" in text


def test_a_configuration_that_does_not_rebuild_the_strategy_fails_restore():
    contract = contract_for(lambda: Forgetful(scale=3.0))
    assert "restored job" in failure(contract, "test_restored_instance_gives_the_same_result")


def test_a_strategy_named_fedavg_must_be_fedavg():
    contract = contract_for(FakeFedAvg)
    contract.test_order_of_replies_does_not_matter()
    assert "the audit recomputes" in failure(contract, "test_audit_recomputes_the_recorded_digest")


def test_node_args_must_be_a_function_of_their_inputs():
    contract = contract_for(ArgsWithClock)
    assert "node_args(round=" in failure(contract, "test_node_args_are_a_function_of_their_inputs")


def test_node_args_message_values_must_be_json_like():
    contract = contract_for(ArgsNotPlain)
    assert "neither JSON-like" in failure(contract, "test_node_args_are_a_function_of_their_inputs")


def test_node_asymmetric_strategies_skip_relabelling():
    class Asymmetric(BySortedPosition):
        name = "asymmetric"
        node_symmetric = False

    contract_for(Asymmetric).test_which_node_sent_which_reply_does_not_matter()


def test_the_contract_is_not_collected_itself():
    assert StrategyContract.__test__ is False
    with pytest.raises(NotImplementedError):
        StrategyContract().make_strategy()
