"""fedsm.testing.strategies: valid values round-trip, near-valid ones are refused naming the
field, fault schedules are bounded and seeded."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import fedsm.testing.strategies as strategies
from fedsm.core import events as ev
from fedsm.core.eventschema import EventDecodeError
from fedsm.core.messages import MESSAGE_TYPES, Message
from fedsm.core.protocol import decode, encode
from fedsm.core.protocol_errors import MessageDecodeError
from fedsm.testing.strategies import (
    INVALID_VALUES,
    any_event,
    any_message,
    events_of,
    fault_schedules,
    job_run,
    messages_of,
    names_field,
    near_valid_events,
    near_valid_messages,
)
from fedsm.transport.faults import Faults


def test_everything_public_is_in_all() -> None:
    """Every public name the module defines (not imports) is exported, and nothing else."""
    tree = ast.parse(Path(strategies.__file__).read_text())
    defined: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, ast.Assign):
            defined |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            defined.add(node.target.id)
    public = {name for name in defined if not name.startswith("_")}
    assert public == set(strategies.__all__)


@given(any_event)
def test_any_event_round_trips(event: ev.Event) -> None:
    encoded = ev.encode_event(event)
    assert ev.decode_event(encoded["type"], encoded["v"], encoded["data"]) == event


_EVENT_CLASSES = sorted(ev.EVENT_TYPES.values(), key=lambda c: c.type_name)
_MESSAGE_CLASSES = sorted(MESSAGE_TYPES.values(), key=lambda c: c.command)


@given(st.sampled_from(_EVENT_CLASSES).flatmap(lambda c: st.tuples(st.just(c), events_of(c))))
def test_events_of_gives_that_type(case: tuple[type[ev.Event], ev.Event]) -> None:
    cls, event = case
    assert type(event) is cls


@given(any_message)
def test_any_message_round_trips(message: Message) -> None:
    assert decode(encode(message)) == message


@given(st.sampled_from(_MESSAGE_CLASSES).flatmap(lambda c: st.tuples(st.just(c), messages_of(c))))
def test_messages_of_gives_that_type(case: tuple[type[Message], Message]) -> None:
    cls, message = case
    assert type(message) is cls


def test_unknown_classes_are_refused() -> None:
    with pytest.raises(ValueError):
        events_of(ev.Event)
    with pytest.raises(ValueError):
        messages_of(Message)


def test_every_kind_of_both_codecs_has_invalid_values() -> None:
    kinds = {f.metadata["kind"] for cls in MESSAGE_TYPES.values() for f in dataclasses.fields(cls)}
    kinds |= {
        f.metadata["kind"] for cls in ev.EVENT_TYPES.values() for f in dataclasses.fields(cls)
    }
    assert kinds <= set(INVALID_VALUES)
    assert all(INVALID_VALUES[kind] for kind in kinds)


@given(near_valid_messages())
def test_every_near_valid_message_is_refused_naming_its_field(case: tuple[bytes, str]) -> None:
    data, field = case
    with pytest.raises(MessageDecodeError) as info:
        decode(data)
    assert names_field(info.value.field, field), (field, str(info.value))


@given(near_valid_events())
def test_every_near_valid_event_is_refused_naming_its_field(case: tuple) -> None:
    type_name, version, data, field = case
    with pytest.raises(EventDecodeError) as info:
        ev.decode_event(type_name, version, data)
    assert names_field(info.value.field, field), (field, str(info.value))


def test_names_field() -> None:
    assert names_field("metrics", "metrics")
    assert names_field("metrics.loss", "metrics")
    assert names_field("nodes[2]", "nodes")
    assert not names_field("round_limit", "round")
    assert not names_field(None, "round")


@given(fault_schedules(), st.data())
def test_fault_schedules_are_bounded_faults(faults: Faults, data: st.DataObject) -> None:
    assert isinstance(faults, Faults)
    assert 0.0 <= faults.drop <= 0.3 and 0.0 <= faults.duplicate <= 0.5
    assert 0 <= faults.reorder_window <= 6 and 0.0 <= faults.delay_s <= 0.02
    tight = data.draw(
        fault_schedules(max_drop=0.0, max_duplicate=0.1, max_reorder_window=2, max_delay_s=0.0)
    )
    assert tight.drop == 0.0 and tight.duplicate <= 0.1 and tight.reorder_window <= 2
    assert tight.delay_s == 0.0


def test_fault_schedules_refuse_impossible_bounds() -> None:
    with pytest.raises(ValueError):
        fault_schedules(max_drop=1.5)
    with pytest.raises(ValueError):
        fault_schedules(max_delay_s=-1.0)


def test_fault_schedules_reach_every_fault_and_none() -> None:
    seen: list[Faults] = []

    @given(fault_schedules())
    def collect(faults: Faults) -> None:
        seen.append(faults)

    collect()
    assert any(not f.active for f in seen)
    assert any(f.drop for f in seen) and any(f.duplicate for f in seen)
    assert any(f.reorder_window > 1 for f in seen) and any(f.delay_s for f in seen)
    assert len({f.seed for f in seen}) > 1


def test_job_run_is_a_legal_job() -> None:
    events = job_run(rounds=2, nodes=2, fail=("node-1",))
    assert isinstance(events[0], ev.JobCreated) and isinstance(events[-1], ev.JobCompleted)
    failed = [e for e in events if isinstance(e, ev.NodeFailed)]
    assert [e.node_id for e in failed] == ["node-1", "node-1"]
    assert job_run(rounds=2, nodes=2, fail=("node-1",)) == events
