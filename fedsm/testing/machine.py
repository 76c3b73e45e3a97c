"""The stateful model of a federation: a researcher Job, scripted nodes, a bus, a clock.

:class:`JobProtocolMachine` is a hypothesis ``RuleBasedStateMachine``. Scripted nodes
(:class:`ScriptedNode`: test doubles on real bus endpoints, so every message is encoded,
validated and delivered like any other) answer train requests when the machine says so:
correctly, with an error, twice, a round late, for another job, or not at all; a node
outside the job answers requests it never got. The real Job collects, times rounds out and
aggregates, taking its steps from the round policy (:mod:`fedsm.core.policy`) on a clock the
machine moves; the researcher may be killed and restored mid-round (a restore re-sends the
round's requests, same ids, with a fresh deadline). The machine drives the Job through its
public API only.

After every step it checks that:

- a round is aggregated only from replies to its own requests: every reply the log counts
  is one a node of the job sent, for that round's request id, with those parameters;
- each (round, node) is counted at most once, and every aggregate has a quorum;
- every open round ends by its deadline: the round is never left open once the clock passed
  it, and moving the clock there closes it (``RoundTimedOut`` for the silent nodes);
- the log verifies (:func:`fedsm.log.verify` finds no error), replaying it gives the live
  state, and :meth:`Job.restore` of the log at this step gives the live state too.

To run it over your own transport or nodes, subclass and override :meth:`make_broker`,
:meth:`bus_factory`, :meth:`close_broker`, :meth:`node_factory`, :meth:`repository_factory`
or :meth:`settle`; ``faults`` (a :class:`~fedsm.transport.Faults`) makes the default memory
buses drop, duplicate... the messages they send. Then expose ``TestX = Sub.TestCase`` to
pytest. :meth:`JobProtocolMachine.hypothesis_settings` gives bounded settings (25 examples of
25 steps) under the loaded profile, unbounded under the profiles of ``unbounded_profiles``.
"""

from __future__ import annotations

import collections
import shutil
import tempfile
import zlib
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from fedsm.core import lifecycle, policy
from fedsm.core.events import (
    Aggregated,
    NodeFailed,
    ReplyReceived,
    RoundResent,
    RoundSent,
    RoundTimedOut,
)
from fedsm.core.messages import (
    ErrorReply,
    JobEndReply,
    JobEndRequest,
    Message,
    TrainingPlanStatusReply,
    TrainingPlanStatusRequest,
    TrainReply,
    TrainRequest,
)
from fedsm.log.read import scan, verify
from fedsm.repository import LocalRepository
from fedsm.researcher.errors import JobFailedError
from fedsm.researcher.job import Job
from fedsm.researcher.requests import FederatedDataSet, Requests
from fedsm.training.demo_plan import BreastCancerPlan
from fedsm.training.params import load_params, save_params
from fedsm.transport import Bus, Faults, MemoryBroker, MemoryBus

__all__ = ["JobProtocolMachine", "ScriptedNode"]


class ScriptedNode:
    """A node that approves every plan and acknowledges a job's end, keeps the train requests
    it receives (by round) and replies only when told to (:meth:`send`)."""

    def __init__(self, bus: Bus, node_id: str) -> None:
        self.node_id = node_id
        self.bus = bus
        self.requests: dict[int, TrainRequest] = {}
        self.sent: list[Message] = []
        self.bus.subscribe(self._on_message)

    def _on_message(self, message: Message) -> None:
        if isinstance(message, TrainRequest):
            self.requests[message.round] = message
        elif isinstance(message, TrainingPlanStatusRequest):
            self.send(
                TrainingPlanStatusReply(
                    request_id=message.request_id,
                    researcher_id=message.researcher_id,
                    node_id=self.node_id,
                    job_id=message.job_id,
                    training_plan_sha256=message.training_plan_sha256,
                    status="approved",
                    approval_required=True,
                )
            )
        elif isinstance(message, JobEndRequest):
            self.send(
                JobEndReply(
                    request_id=message.request_id,
                    researcher_id=message.researcher_id,
                    node_id=self.node_id,
                    job_id=message.job_id,
                    seq=message.log_head["seq"],
                )
            )

    def send(self, reply: Message) -> None:
        """Send ``reply`` (kept in :attr:`sent`, for the machine to replay it later)."""
        self.sent.append(reply)
        self.bus.reply(reply)

    def close(self) -> None:
        self.bus.close()


class _BoundedTestCase:
    """``Machine.TestCase`` (hypothesis makes a new unittest class at each access), with
    :meth:`JobProtocolMachine.hypothesis_settings` read when it is accessed: after the test
    run loaded its profile."""

    def __get__(self, obj: object, owner: type[JobProtocolMachine]) -> Any:
        case = RuleBasedStateMachine.__dict__["TestCase"].__get__(obj, owner)
        case.settings = owner.hypothesis_settings()
        return case


class JobProtocolMachine(RuleBasedStateMachine):
    """The researcher/node protocol as a hypothesis state machine (see the module)."""

    #: The job's nodes, its number of rounds, quorum and reply window (job clock seconds).
    node_ids: tuple[str, ...] = ("node-a", "node-b", "node-c")
    rounds: int = 3
    min_nodes: int = 2
    deadline_s: float = 30.0
    #: Real seconds the approval check waits for the nodes' answers (retried until every
    #: node answered, which a lossy bus needs).
    approval_deadline_s: float = 5.0
    #: Faults of every bus :meth:`bus_factory` makes (None: a perfect bus).
    faults: Faults | None = None
    #: Check every restore at every step (copy the run, restore it): the costliest invariant.
    check_restore_every_step: bool = True
    #: Bounds for everyday runs, and the profiles that lift them.
    max_examples: int = 25
    stateful_step_count: int = 25
    unbounded_profiles: tuple[str, ...] = ("deep",)

    TestCase = _BoundedTestCase()  # type: ignore[assignment]

    # ------------------------------------------------------------------ what a subclass swaps

    def make_broker(self) -> Any:
        """Whatever the buses connect through (default: a :class:`MemoryBroker`)."""
        return MemoryBroker()

    def bus_factory(self, participant_id: str, role: str) -> Bus:
        """A connected bus for ``participant_id`` (role ``"researcher"`` or ``"node"``)."""
        faults = None
        if self.faults is not None:  # each bus its own seeded choices
            seed = self.faults.seed ^ zlib.crc32(participant_id.encode())
            faults = Faults(
                drop=self.faults.drop,
                duplicate=self.faults.duplicate,
                reorder_window=self.faults.reorder_window,
                delay_s=self.faults.delay_s,
                seed=seed,
            )
        return MemoryBus(self.broker, participant_id, role=role, faults=faults)

    def close_broker(self) -> None:
        close = getattr(self.broker, "close", None)
        if close is not None:
            close()

    def node_factory(self, node_id: str) -> ScriptedNode:
        """A scripted node (anything with ``node_id``, ``requests``, ``sent``, ``send``,
        ``bus`` and ``close`` will do)."""
        return ScriptedNode(self.bus_factory(node_id, "node"), node_id)

    def repository_factory(self, root: Path) -> Any:
        return LocalRepository(root)

    def settle(self) -> None:
        """Return once every message sent so far is delivered (or lost). The memory bus
        delivers in the sender's thread; held (reordered, delayed) messages are released."""
        flush = getattr(self.broker, "flush", None)
        if flush is not None:
            flush()

    @property
    def reliable(self) -> bool:
        """Whether every message sent arrives: the strictest checks then apply."""
        return self.faults is None or not self.faults.active

    @classmethod
    def hypothesis_settings(cls) -> settings:
        parent = settings.default
        bounded = settings.get_current_profile_name() not in cls.unbounded_profiles
        return settings(
            parent,
            max_examples=min(parent.max_examples, cls.max_examples)
            if bounded
            else parent.max_examples,
            stateful_step_count=min(parent.stateful_step_count, cls.stateful_step_count)
            if bounded
            else parent.stateful_step_count,
            deadline=None,
            suppress_health_check=[*parent.suppress_health_check, HealthCheck.too_slow],
        )

    # ------------------------------------------------------------------ set-up, teardown

    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="fedsm-machine-"))
        self.broker = self.make_broker()
        self.repo = self.repository_factory(self.tmp / "repository")
        self.nodes = {n: self.node_factory(n) for n in self.node_ids}
        self.stranger = self.node_factory("node-z")  # not part of the job
        self.researcher = self.bus_factory("researcher-sm", "researcher")
        plan = self.tmp / "plan.py"
        BreastCancerPlan().save_code(plan)
        data = FederatedDataSet({n: {"dataset_id": f"ds-{n}"} for n in self.node_ids})
        self.now = 1_000.0  # the job's clock: rounds end when the machine moves it
        self.job = Job(
            reqs=Requests(self.researcher),
            training_plan_class="BreastCancerPlan",
            training_plan_path=plan,
            training_args={"lr": 0.1, "epochs": 1},
            data=data,
            run_dir=self.tmp / "run",
            repository=self.repo,
            round_limit=self.rounds,
            min_nodes=self.min_nodes,
            reply_deadline_s=self.deadline_s,
            durability="always",
            clock=self._clock,
        )
        for _ in range(20):  # a lossy bus may lose an answer: ask again (allowed before round 1)
            statuses = self.job.check_training_plan_is_approved_by_nodes(
                deadline_s=self.approval_deadline_s
            )
            self.settle()
            if all(s == "approved" for s in statuses.values()):
                break
        assert self.job.state.status == "approval_checked"
        assert not self.job.state.approval_refusals(), statuses
        self.failed = False
        self.acted_in_round = 0  # collect only once nodes had their say in this round
        self.counter = 0
        self.restarts = 0

    def teardown(self) -> None:
        try:
            # Every round ends: whatever the nodes did, a round still open is closed by its
            # deadline (RoundTimedOut) and then aggregated, or the job fails below quorum.
            if self._open_round():
                self._end_round()
                assert self.job.state.status in ("aggregated", "completed", "failed")
            event(f"ended {self.job.state.status} in round {self.job.state.round}")
            if self.restarts:
                event("restarted mid-round")
        finally:
            self.job.close()
            self.researcher.close()
            for node in [*self.nodes.values(), self.stranger]:
                node.close()
            self.close_broker()
            shutil.rmtree(self.tmp, ignore_errors=True)

    # ---------------------------------------------------------------- helpers

    def _events(self) -> list[Any]:
        return [r.event for r in scan(self.job.log_path).records]

    def _params_reply(self, node: Any, request: TrainRequest, job_id: str) -> TrainReply:
        self.counter += 1
        params = load_params(self.job.params_path(request.params_sha256))
        params = {k: v + 0.01 * self.counter for k, v in params.items()}
        path = self.tmp / f"reply-{self.counter}.safetensors"
        save_params(path, params)
        up = self.repo.upload_file(path)
        return TrainReply(
            request_id=request.request_id,
            researcher_id=request.researcher_id,
            node_id=node.node_id,
            job_id=job_id,
            round=request.round,
            dataset_id=request.dataset_id,
            training_plan_sha256=request.training_plan_sha256,
            params_url=up["file"],
            params_sha256=up["sha256"],
            sample_size=10 + self.counter,
            metrics={"train_loss": 1.0},
            timing={},
        )

    def _clock(self) -> float:
        return self.now

    def _open_round(self) -> bool:
        return self.job.state.status.in_round

    def _restore(self, reqs: Requests) -> Job:
        return Job.restore(
            self.tmp / "run",
            reqs=reqs,
            repository=self.repo,
            durability="always",
            clock=self._clock,
        )

    def _end_round(self) -> None:
        """The round's deadline passes: take what arrived, time out the silent nodes, then
        aggregate (or fail below quorum)."""
        self.settle()
        if self.job.state.pending_nodes():
            self.job.step(max_wait_s=0.0)  # take what arrived before the deadline
        self._pass_deadline()
        try:
            self.job.aggregate()
        except JobFailedError:
            self.failed = True

    def _pass_deadline(self) -> None:
        """Move the clock to the round's deadline: one step closes the round."""
        state = self.job.state
        self.now = max(self.now, state.round_deadline)
        if state.pending_nodes():
            decision = self.job.step(max_wait_s=0.0)
            assert decision.events[-1:] == (
                RoundTimedOut(round=state.round, missing=self.job.state.unanswered_nodes()),
            ), decision
        assert not self.job.state.pending_nodes()
        assert self.job.state.round_complete()

    # ---------------------------------------------------------------- rules

    def _can_send_round(self) -> bool:
        state = self.job.state
        return not self.failed and state.status.between_rounds and state.round < self.rounds

    @precondition(lambda self: self._can_send_round())
    @rule()
    def send_round(self) -> None:
        round_number = self.job.state.round + 1
        decided = self.job.step(max_wait_s=0.0)  # decide, record, publish; take no reply yet
        assert decided == policy.Decision(commands=(policy.StartRound(round_number),))
        self.settle()
        state = self.job.state
        assert state.round == round_number and state.round_deadline == self.now + self.deadline_s
        for node in self.node_ids:  # published after it was recorded, exactly as recorded
            request = self.nodes[node].requests.get(round_number)
            if request is None:
                assert not self.reliable, f"{node} did not get its request of round {round_number}"
                continue
            assert request.request_id == state.request_ids[node]
            assert request.params_sha256 == state.params_sha256

    @precondition(lambda self: self._open_round() and bool(self.job.state.pending_nodes()))
    @rule(later=st.sampled_from([0.0, 1 / 3]))
    def researcher_restarts(self, later: float) -> None:
        """The researcher process is killed and replaced mid-round: the restored Job re-sends
        the pending nodes' requests, same ids, and gives them a fresh window."""
        before = self.job.state
        reqs = self.job.requests
        self.job.close()
        self.now += later * self.deadline_s
        self.job = self._restore(reqs)
        self.restarts += 1
        assert self.job.state == before
        pending = before.pending_nodes()
        decision = self.job.step(max_wait_s=0.0)  # the restored job's first step
        self.settle()
        deadline = self.now + self.deadline_s
        assert decision.events == (
            RoundResent(round=before.round, nodes=pending, deadline=deadline),
        )
        state = self.job.state
        assert state.round_deadline == deadline and state.request_ids == before.request_ids
        for node in pending:  # the very request the node may already have answered
            request = self.nodes[node].requests.get(before.round)
            if request is None or request.round != before.round:
                assert not self.reliable, f"{node} did not get the re-sent request"
                continue
            assert request.request_id == before.request_ids[node]
            assert request.params_sha256 == before.params_sha256

    @precondition(lambda self: self._open_round())
    @rule(data=st.data(), error=st.booleans())
    def node_answers(self, data: st.DataObject, error: bool) -> None:
        self._answer(data.draw(st.sampled_from(self.node_ids), label="node"), error)

    def _answer(self, node: str, error: bool) -> None:
        scripted = self.nodes[node]
        request = scripted.requests.get(self.job.state.round)
        if request is None:
            return
        if error:
            scripted.send(
                ErrorReply(
                    request_id=request.request_id,
                    researcher_id=request.researcher_id,
                    node_id=node,
                    code=500,
                    message="boom",
                    job_id=request.job_id,
                    round=request.round,
                )
            )
        else:
            scripted.send(self._params_reply(scripted, request, request.job_id))

    @precondition(lambda self: self._open_round())
    @rule(data=st.data())
    def every_node_acts(self, data: st.DataObject) -> None:
        """Each node of the round answers, fails or stays silent (biased towards progress)."""
        choices = data.draw(
            st.lists(
                st.sampled_from(["ok", "ok", "ok", "error", "silent"]),
                min_size=len(self.node_ids),
                max_size=len(self.node_ids),
            ),
            label="choices",
        )
        for node, choice in zip(self.node_ids, choices, strict=True):
            if choice != "silent":
                self._answer(node, choice == "error")
        self.acted_in_round = self.job.state.round

    @precondition(lambda self: any(n.sent for n in self.nodes.values()))
    @rule(data=st.data())
    def replay_an_old_reply(self, data: st.DataObject) -> None:
        """A duplicate (same round) or a late reply (an earlier round)."""
        node = data.draw(st.sampled_from(self.node_ids), label="node")
        sent = self.nodes[node].sent
        if sent:
            self.nodes[node].bus.reply(data.draw(st.sampled_from(sent), label="reply"))

    @precondition(lambda self: self._open_round())
    @rule(data=st.data())
    def reply_for_another_job(self, data: st.DataObject) -> None:
        node = self.nodes[data.draw(st.sampled_from(self.node_ids), label="node")]
        request = node.requests.get(self.job.state.round)
        if request is not None:
            node.bus.reply(self._params_reply(node, request, "job-other"))

    @rule(data=st.data())
    def stranger_replies(self, data: st.DataObject) -> None:
        """A node outside the job answers a request it never got: always possible."""
        self.stranger.send(
            ErrorReply(
                request_id="train-forged",
                researcher_id="researcher-sm",
                node_id=self.stranger.node_id,
                code=500,
                message="?",
                job_id=self.job.state.job_id,
                round=data.draw(st.integers(0, self.rounds + 1), label="round"),
            )
        )

    @precondition(lambda self: self._open_round() and bool(self.job.state.pending_nodes()))
    @rule()
    def collect_a_while(self) -> None:
        """Take the replies that arrived; the round stays open (its deadline is not reached)."""
        self.settle()
        state = self.job.state
        decision = self.job.step(max_wait_s=0.01)
        assert not decision.events  # no timeout: a shortened wait never closes the round
        assert self.job.state.status.in_round and self.job.state.round == state.round

    @precondition(lambda self: self._open_round() and bool(self.job.state.pending_nodes()))
    @rule(data=st.data())
    def time_passes(self, data: st.DataObject) -> None:
        """The clock moves; a round whose deadline it reaches is closed by the next step
        (once the nodes had their say: earlier, most runs would end in a failed round)."""
        fractions = [0.25, 0.5]
        if self.acted_in_round == self.job.state.round:
            fractions += [1.0, 1.5]
        self.settle()
        self.now += data.draw(st.sampled_from(fractions), label="fraction") * self.deadline_s
        if self.now >= self.job.state.round_deadline:
            self._pass_deadline()

    @precondition(lambda self: self._can_send_round())
    @rule()
    def a_round_goes_well(self) -> None:
        """A whole round in one step: sent, answered by every node that got its request,
        aggregated (so that runs reach the later rounds and the job's end often)."""
        self.send_round()
        for node in self.node_ids:
            self._answer(node, error=False)
        self.acted_in_round = self.job.state.round
        self._end_round()

    @precondition(lambda self: self._open_round() and self.acted_in_round == self.job.state.round)
    @rule()
    def collect_and_maybe_time_out(self) -> None:
        self._end_round()

    # ---------------------------------------------------------------- invariants

    @invariant()
    def log_verifies_and_replays_to_the_live_state(self) -> None:
        errors = [f for f in verify(self.job.log_path) if f.error]
        assert not errors, errors
        assert lifecycle.replay(self._events()) == self.job.state

    @invariant()
    def restore_gives_the_live_state(self) -> None:
        """A researcher restored at this step (from a copy of its run) is where we are."""
        if not self.check_restore_every_step:
            return
        copy = self.tmp / "restore-check"
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(self.tmp / "run", copy)
        restored = Job.restore(
            copy,
            reqs=self.job.requests,
            repository=self.repo,
            durability="never",
            clock=self._clock,
        )
        try:
            assert restored.state == self.job.state
            assert restored.last_seq == self.job.last_seq
        finally:
            restored.close()
            shutil.rmtree(copy, ignore_errors=True)

    @invariant()
    def nothing_counted_twice(self) -> None:
        counted = collections.Counter(
            (e.round, e.node_id)
            for e in self._events()
            if isinstance(e, (ReplyReceived, NodeFailed))
        )
        assert all(c == 1 for c in counted.values()), counted
        for agg in self.job.state.aggregates.values():
            assert len(agg.nodes) >= self.min_nodes  # quorum

    @invariant()
    def aggregated_only_from_its_own_requests(self) -> None:
        """Every counted reply answers its round's request and was sent by that node, for
        this job, with those parameters; an aggregate counts only its round's replies."""
        request_ids: dict[int, dict[str, str]] = {}
        counted: dict[tuple[int, str], ReplyReceived] = {}
        for e in self._events():
            if isinstance(e, RoundSent):
                request_ids[e.round] = dict(e.request_ids)
            elif isinstance(e, ReplyReceived):
                assert e.request_id == request_ids[e.round][e.node_id], e
                sent = [
                    m
                    for m in self.nodes[e.node_id].sent
                    if isinstance(m, TrainReply)
                    and m.request_id == e.request_id
                    and m.round == e.round
                    and m.job_id == self.job.state.job_id
                    and m.params_sha256 == e.params_sha256
                ]
                assert sent, f"{e.node_id} never sent the reply counted in round {e.round}: {e}"
                counted[(e.round, e.node_id)] = e
            elif isinstance(e, Aggregated):
                for node in e.nodes:
                    reply = counted.get((e.round, node))
                    assert reply is not None, f"round {e.round} aggregated {node} without a reply"
                    assert e.weights[node] == float(reply.sample_size)

    @invariant()
    def no_open_round_outlives_its_deadline(self) -> None:
        state = self.job.state
        if state.status.in_round and state.pending_nodes():
            assert self.now < state.round_deadline, (
                f"round {state.round} still waits for {list(state.pending_nodes())} at "
                f"{self.now}, past its deadline {state.round_deadline}"
            )
