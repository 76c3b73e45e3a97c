"""A hypothesis state machine of the researcher/node protocol over the memory bus.

Scripted nodes (test doubles on real MemoryBus endpoints, so every message is encoded,
validated and delivered like any other) answer train requests when the machine says so:
correctly, with an error, twice, a round late, for another job, or not at all. The real Job
collects, times rounds out and aggregates, taking its steps from the round policy
(:mod:`fedsm.core.policy`) on a clock the machine moves; the researcher may also be restarted
mid-round (a restore re-sends the round's requests, same ids, with a fresh deadline). After
every step: replaying the written log gives the live state, and no (round, node) is ever
counted twice.
"""

from __future__ import annotations

import collections
import shutil
import tempfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from fedsm.core import lifecycle, policy
from fedsm.core.events import RoundResent, RoundTimedOut
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
from fedsm.log.read import scan
from fedsm.repository import LocalRepository
from fedsm.researcher.errors import JobFailedError
from fedsm.researcher.job import Job
from fedsm.researcher.requests import FederatedDataSet, Requests
from fedsm.training.demo_plan import BreastCancerPlan
from fedsm.training.params import load_params, save_params
from fedsm.transport import MemoryBroker, MemoryBus

NODES = ("node-a", "node-b", "node-c")
ROUNDS = 3
DEADLINE_S = 30.0


class ScriptedNode:
    """Keeps the train requests it receives; replies only when told to."""

    def __init__(self, broker: MemoryBroker, node_id: str) -> None:
        self.node_id = node_id
        self.bus = MemoryBus(broker, node_id, role="node")
        self.requests: dict[int, TrainRequest] = {}
        self.sent: list[Message] = []
        self.bus.subscribe(self._on_message)

    def _on_message(self, message: Message) -> None:
        if isinstance(message, TrainRequest):
            self.requests[message.round] = message
        elif isinstance(message, TrainingPlanStatusRequest):  # every scripted node approved
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
        self.sent.append(reply)
        self.bus.reply(reply)


class ProtocolMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="fedsm-stateful-"))
        self.broker = MemoryBroker()
        self.repo = LocalRepository(self.tmp / "repository")
        self.nodes = {n: ScriptedNode(self.broker, n) for n in NODES}
        self.stranger = ScriptedNode(self.broker, "node-z")  # not part of the job
        self.researcher = MemoryBus(self.broker, "researcher-sm", role="researcher")
        plan = self.tmp / "plan.py"
        BreastCancerPlan().save_code(plan)
        data = FederatedDataSet({n: {"dataset_id": f"ds-{n}"} for n in NODES})
        self.now = 1_000.0  # the job's clock: rounds end when the machine moves it
        self.job = Job(
            reqs=Requests(self.researcher),
            training_plan_class="BreastCancerPlan",
            training_plan_path=plan,
            training_args={"lr": 0.1, "epochs": 1},
            data=data,
            run_dir=self.tmp / "run",
            repository=self.repo,
            round_limit=ROUNDS,
            min_nodes=2,
            reply_deadline_s=DEADLINE_S,
            durability="always",
            clock=self._clock,
        )
        self.job.check_training_plan_is_approved_by_nodes(deadline_s=5.0)
        assert self.job.state.status == "approval_checked"
        self.failed = False
        self.acted_in_round = 0  # collect only once nodes had their say in this round
        self.counter = 0
        self.restarts = 0

    def teardown(self) -> None:
        # Every round ends: whatever the nodes did, a round still open is closed by its
        # deadline (RoundTimedOut) and then aggregated or the job fails below quorum.
        if self._open_round():
            self._end_round()
            assert self.job.state.status in ("aggregated", "completed", "failed")
        event(f"ended {self.job.state.status} in round {self.job.state.round}")
        if self.restarts:
            event("restarted mid-round")
        self.job.close()
        self.researcher.close()
        for node in [*self.nodes.values(), self.stranger]:
            node.bus.close()
        self.broker.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    # ---------------------------------------------------------------- helpers

    def _params_reply(self, node: ScriptedNode, request: TrainRequest, job_id: str) -> TrainReply:
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

    def _end_round(self) -> None:
        """The round's deadline passes: take what arrived, time out the silent nodes, then
        aggregate (or fail below quorum)."""
        if self.job.state.pending_nodes():
            self.job.step(max_wait_s=0.0)  # take what arrived before the deadline
        state = self.job.state
        self.now = max(self.now, state.round_deadline)
        if state.pending_nodes():
            decision = self.job.step(max_wait_s=0.0)
            assert decision.events == (
                RoundTimedOut(round=state.round, missing=state.unanswered_nodes()),
            )
        assert not self.job.state.pending_nodes()
        assert self.job.state.round_complete()
        try:
            self.job.aggregate()
        except JobFailedError:
            self.failed = True

    # ---------------------------------------------------------------- rules

    @precondition(
        lambda self: (
            not self.failed
            and self.job.state.status.between_rounds
            and self.job.state.round < ROUNDS
        )
    )
    @rule()
    def send_round(self) -> None:
        round_number = self.job.state.round + 1
        decided = self.job.step(max_wait_s=0.0)  # decide, record, publish; take no reply yet
        assert decided == policy.Decision(commands=(policy.StartRound(round_number),))
        state = self.job.state
        assert state.round == round_number and state.round_deadline == self.now + DEADLINE_S
        for node in NODES:  # published after it was recorded, exactly as recorded
            request = self.nodes[node].requests[round_number]
            assert request.request_id == state.request_ids[node]
            assert request.params_sha256 == state.params_sha256

    @precondition(lambda self: self._open_round() and bool(self.job.state.pending_nodes()))
    @rule(later=st.sampled_from([0.0, 10.0]))
    def researcher_restarts(self, later: float) -> None:
        """The researcher process is replaced mid-round: the restored Job re-sends the pending
        nodes' requests, same ids, and gives them a fresh window."""
        before = self.job.state
        reqs = self.job.requests
        self.job.close()
        self.now += later
        self.job = Job.restore(
            self.tmp / "run",
            reqs=reqs,
            repository=self.repo,
            durability="always",
            clock=self._clock,
        )
        self.restarts += 1
        assert self.job.state == before
        pending = before.pending_nodes()
        decision = self.job.step(max_wait_s=0.0)  # the restored job's first step
        deadline = self.now + DEADLINE_S
        assert decision.events == (
            RoundResent(round=before.round, nodes=pending, deadline=deadline),
        )
        state = self.job.state
        assert state.round_deadline == deadline and state.request_ids == before.request_ids
        for node in pending:  # the very request the node may already have answered
            request = self.nodes[node].requests[before.round]
            assert request.request_id == before.request_ids[node]
            assert request.params_sha256 == before.params_sha256

    @precondition(lambda self: self._open_round())
    @rule(node=st.sampled_from(NODES), error=st.booleans())
    def node_answers(self, node: str, error: bool) -> None:
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
    @rule(
        choices=st.lists(
            st.sampled_from(["ok", "ok", "ok", "error", "silent"]),
            min_size=len(NODES),
            max_size=len(NODES),
        )
    )
    def every_node_acts(self, choices: list[str]) -> None:
        """Each node of the round answers, fails or stays silent (biases towards progress)."""
        for node, choice in zip(NODES, choices, strict=True):
            if choice != "silent":
                self.node_answers(node, choice == "error")
        self.acted_in_round = self.job.state.round

    @precondition(lambda self: any(n.sent for n in self.nodes.values()))
    @rule(node=st.sampled_from(NODES), data=st.data())
    def replay_an_old_reply(self, node: str, data) -> None:
        """A duplicate (same round) or a late reply (an earlier round)."""
        sent = self.nodes[node].sent
        if sent:
            self.nodes[node].bus.reply(data.draw(st.sampled_from(sent)))

    @precondition(lambda self: self._open_round())
    @rule(node=st.sampled_from(NODES))
    def reply_for_another_job(self, node: str) -> None:
        request = self.nodes[node].requests.get(self.job.state.round)
        if request is not None:
            self.nodes[node].bus.reply(self._params_reply(self.nodes[node], request, "job-other"))

    @rule(round_=st.integers(0, ROUNDS + 1))
    def stranger_replies(self, round_: int) -> None:
        """A node outside the job answers a request it never got: always possible."""
        self.stranger.send(
            ErrorReply(
                request_id="train-forged",
                researcher_id="researcher-sm",
                node_id="node-z",
                code=500,
                message="?",
                job_id=self.job.state.job_id,
                round=round_,
            )
        )

    @precondition(lambda self: self._open_round() and bool(self.job.state.pending_nodes()))
    @rule()
    def collect_a_while(self) -> None:
        """Take the replies that arrived; the round stays open (its deadline is not reached)."""
        state = self.job.state
        decision = self.job.step(max_wait_s=0.01)
        assert not decision.events  # no timeout: a shortened wait never closes the round
        assert self.job.state.status.in_round and self.job.state.round == state.round

    @precondition(lambda self: self._open_round() and self.acted_in_round == self.job.state.round)
    @rule()
    def collect_and_maybe_time_out(self) -> None:
        self._end_round()

    # ---------------------------------------------------------------- invariants

    @invariant()
    def replay_equals_live(self) -> None:
        events = [r.event for r in scan(self.job.log_path).records]
        assert lifecycle.replay(events) == self.job.state

    @invariant()
    def nothing_counted_twice(self) -> None:
        events = [r.event for r in scan(self.job.log_path).records]
        counted = collections.Counter(
            (e.round, e.node_id)
            for e in events
            if type(e).__name__ in ("ReplyReceived", "NodeFailed")
        )
        assert all(c == 1 for c in counted.values())
        for agg in self.job.state.aggregates.values():
            assert len(agg.nodes) >= 2  # quorum


ProtocolMachine.TestCase.settings = settings(
    max_examples=25,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestProtocol = ProtocolMachine.TestCase

_ = torch  # params are torch tensors
