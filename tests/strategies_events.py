"""Hypothesis strategies for every event type, and a builder of a legal job's events.

Importable from any test (``tests/`` is on ``sys.path``): ``from strategies_events import
any_event, events_of, job_run``.
"""

from __future__ import annotations

import hashlib
from typing import Any

from hypothesis import strategies as st

from fedsm.core import events as ev
from fedsm.core.eventschema import APPROVAL_STATUSES

texts = st.text(max_size=40)
ids = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_.", min_size=1, max_size=12)
sha256s = st.binary(min_size=32, max_size=32).map(bytes.hex)
ints = st.integers(min_value=-(2**63), max_value=2**63 - 1)
nonneg = st.integers(min_value=0, max_value=2**63 - 1)
floats = st.floats(allow_nan=False, allow_infinity=False)
id_tuples = st.lists(ids, max_size=6).map(tuple)
float_maps = st.dictionaries(texts, floats, max_size=4)
str_maps = st.dictionaries(ids, texts, max_size=4)
plain = st.recursive(
    st.none() | st.booleans() | ints | floats | texts,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
    max_leaves=8,
)
plain_maps = st.dictionaries(texts, plain, max_size=4)

_BUILDERS: dict[type[ev.Event], st.SearchStrategy[Any]] = {
    ev.JobCreated: st.builds(
        ev.JobCreated,
        job_id=ids,
        researcher_id=ids,
        training_plan_class=texts,
        training_args=plain_maps,
        model_args=plain_maps,
        seed=ints,
        nodes=id_tuples,
        datasets=str_maps,
        round_limit=nonneg,
        min_nodes=nonneg,
        reply_deadline_s=floats,
        aggregator=texts,
        aggregator_args=plain_maps,
        tags=id_tuples,
    ),
    ev.TrainingPlanUploaded: st.builds(ev.TrainingPlanUploaded, sha256=sha256s, class_name=texts),
    ev.ParamsUploaded: st.builds(ev.ParamsUploaded, round=nonneg, sha256=sha256s),
    ev.ApprovalChecked: st.builds(
        ev.ApprovalChecked,
        plan_sha256=sha256s,
        statuses=st.dictionaries(ids, st.sampled_from(sorted(APPROVAL_STATUSES)), max_size=4),
        approval_required=st.dictionaries(ids, st.booleans(), max_size=4),
    ),
    ev.RoundSent: st.builds(
        ev.RoundSent,
        round=nonneg,
        nodes=id_tuples,
        request_ids=str_maps,
        params_sha256=sha256s,
        deadline=floats,
        aggregator_args=st.dictionaries(ids, plain_maps, max_size=3),
        do_training=st.booleans(),
    ),
    ev.SettingsChanged: st.builds(
        ev.SettingsChanged,
        round=nonneg,
        changes=st.fixed_dictionaries(
            {},
            optional={
                "nodes": st.lists(ids, max_size=4),
                "training_args": plain_maps,
                "round_limit": nonneg,
            },
        ),
    ),
    ev.RoundResent: st.builds(ev.RoundResent, round=nonneg, nodes=id_tuples, deadline=floats),
    ev.ReplyReceived: st.builds(
        ev.ReplyReceived,
        round=nonneg,
        node_id=ids,
        request_id=ids,
        params_sha256=sha256s,
        sample_size=nonneg,
        metrics=float_maps,
        timing=float_maps,
        training_plan_sha256=st.none() | sha256s,
    ),
    ev.NodeFailed: st.builds(
        ev.NodeFailed, round=nonneg, node_id=ids, request_id=ids, code=ints, message=texts
    ),
    ev.RoundTimedOut: st.builds(ev.RoundTimedOut, round=nonneg, missing=id_tuples),
    ev.Aggregated: st.builds(
        ev.Aggregated,
        round=nonneg,
        params_sha256=sha256s,
        nodes=id_tuples,
        weights=float_maps,
        aggregator=texts,
    ),
    ev.JobCompleted: st.builds(ev.JobCompleted, round=nonneg, params_sha256=sha256s),
    ev.JobFailed: st.builds(ev.JobFailed, round=nonneg, reason=texts),
    ev.JobCancelled: st.builds(ev.JobCancelled, round=nonneg, reason=texts),
}
assert set(_BUILDERS) == set(ev.EVENT_TYPES.values()), "a strategy for every event type"


def events_of(cls: type[ev.Event]) -> st.SearchStrategy[Any]:
    """Arbitrary valid events of one type."""
    return _BUILDERS[cls]


#: Arbitrary valid events of any type.
any_event = st.one_of(*_BUILDERS.values())


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def job_run(
    rounds: int = 2, nodes: int = 3, *, min_nodes: int = 1, fail: tuple[str, ...] = ()
) -> list[ev.Event]:
    """The events of a legal job that runs ``rounds`` rounds over ``nodes`` nodes and
    completes; nodes named in ``fail`` fail every round instead of replying."""
    names = tuple(f"node-{i}" for i in range(nodes))
    out: list[ev.Event] = [
        ev.JobCreated(
            job_id="job-1",
            researcher_id="researcher-1",
            training_plan_class="MyPlan",
            training_args={"epochs": 1, "lr": 0.01},
            model_args={"hidden": [8, 4]},
            seed=42,
            nodes=names,
            datasets={n: f"ds-{n}" for n in names},
            round_limit=rounds,
            min_nodes=min_nodes,
            reply_deadline_s=60.0,
            aggregator="fedavg",
            aggregator_args={},
            tags=("t",),
        ),
        ev.TrainingPlanUploaded(sha256=digest("plan"), class_name="MyPlan"),
        ev.ParamsUploaded(round=0, sha256=digest("p0")),
        ev.ApprovalChecked(
            plan_sha256=digest("plan"),
            statuses={n: "approved" for n in names},
            approval_required={n: True for n in names},
        ),
    ]
    params = digest("p0")
    for r in range(1, rounds + 1):
        rids = {n: f"req-{r}-{n}" for n in names}
        out.append(
            ev.RoundSent(
                round=r,
                nodes=names,
                request_ids=rids,
                params_sha256=params,
                deadline=1000.0 + r,
                aggregator_args={},
            )
        )
        for n in names:
            if n in fail:
                out.append(
                    ev.NodeFailed(round=r, node_id=n, request_id=rids[n], code=500, message="x")
                )
            else:
                out.append(
                    ev.ReplyReceived(
                        round=r,
                        node_id=n,
                        request_id=rids[n],
                        params_sha256=digest(f"{r}/{n}"),
                        sample_size=100,
                        metrics={"loss": 0.5},
                        timing={"train_s": 1.0},
                        training_plan_sha256=digest("plan"),
                    )
                )
        params = digest(f"agg{r}")
        ok = tuple(sorted(n for n in names if n not in fail))
        out.append(
            ev.Aggregated(
                round=r,
                params_sha256=params,
                nodes=ok,
                weights={n: 100.0 for n in ok},
                aggregator="fedavg",
            )
        )
    out.append(ev.JobCompleted(round=rounds, params_sha256=params))
    return out
