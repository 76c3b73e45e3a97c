"""A reply the researcher can not use (wrong tensors, no samples) fails that node, never the
round: aggregation goes on with the others, and the failure is in the log with its reason."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from fedsm.core.messages import TrainReply
from fedsm.core.protocol_errors import ErrorNumber
from fedsm.log.read import scan
from fedsm.repository import LocalRepository
from fedsm.researcher.job import Job
from fedsm.researcher.requests import FederatedDataSet, Requests
from fedsm.strategies.fedavg import FedAvg
from fedsm.testing.machine import ScriptedNode
from fedsm.training.demo_plan import BreastCancerPlan
from fedsm.training.params import load_params, save_params
from fedsm.transport import MemoryBroker, MemoryBus

NODES = ("node-a", "node-b", "node-c")


def test_unusable_replies_fail_their_nodes_and_the_round_aggregates(tmp_path: Path) -> None:
    world = Scripted(tmp_path)
    job = world.job
    good = load_params(job.params_path(job.params_sha256))
    payloads = {
        "node-a": (good, 20),  # fine
        "node-b": ({k: torch.zeros(3) for k in good}, 20),  # wrong shapes
        "node-c": (good, 0),  # no samples
    }
    for node_id, (tensors, samples) in payloads.items():
        up = world.upload(tensors)
        world.reply(node_id, url=up["file"], sha256=up["sha256"], samples=samples)
    job.step(max_wait_s=1.0)
    job.aggregate()
    events = world.events()
    failed = {e.node_id: e for e in events if type(e).__name__ == "NodeFailed"}
    assert sorted(failed) == ["node-b", "node-c"]
    assert {e.code for e in failed.values()} == {int(ErrorNumber.PARAMS_INVALID)}
    assert "shape" in failed["node-b"].message and "0 training samples" in failed["node-c"].message
    aggregated = [e for e in events if type(e).__name__ == "Aggregated"]
    assert aggregated[0].nodes == ("node-a",)
    assert type(events[-1]).__name__ == "JobCompleted"
    world.close()


class ArgsFedAvg(FedAvg):
    """FedAvg that also hands each node a small arg and a per-node file (Scaffold-like)."""

    #: Set to compute other args than the first time (a strategy changed under a restore).
    other = False

    def node_args(self, ctx):
        import torch

        flag = float(type(self).other)
        return {
            node: {
                "server_lr": 0.5 + flag,
                "round": ctx.round,
                "correction": {"w": torch.tensor([float(i), float(ctx.round), flag])},
            }
            for i, node in enumerate(ctx.node_ids)
        }


def test_aggregator_args_reach_each_node_and_a_resend_repeats_them(tmp_path: Path) -> None:
    from fedsm.training.params import load_params

    ArgsFedAvg.other = False
    world = Scripted(tmp_path, aggregator=ArgsFedAvg())
    first = {n: node.requests[1] for n, node in world.nodes.items()}
    for i, (node_id, request) in enumerate(sorted(first.items())):
        args = request.aggregator_args
        assert args["server_lr"] == 0.5 and args["round"] == 1
        _, path = world.repo.download_file(args["correction"]["url"], tmp_path / f"{node_id}.st")
        assert load_params(path)["w"].tolist() == [float(i), 1.0, 0.0]  # each node its own file
    created = next(e for e in world.events() if type(e).__name__ == "JobCreated")
    assert created.aggregator.endswith(":ArgsFedAvg")  # a user's strategy: by import path
    # A restore mid-round (a new process: nothing published yet as far as it knows) re-sends
    # the very requests RoundSent recorded, args included, even if the strategy would now
    # compute other args.
    world.job.close()
    ArgsFedAvg.other = True
    for node in world.nodes.values():
        node.requests.clear()
    try:
        job = Job.restore(tmp_path / "run", reqs=Requests(world.researcher), repository=world.repo)
        assert type(job._aggregator).__name__ == "ArgsFedAvg"
        decision = job.step(max_wait_s=0.0)
    finally:
        ArgsFedAvg.other = False
    assert [type(e).__name__ for e in decision.events] == ["RoundResent"]
    for node_id, node in world.nodes.items():
        again = node.requests[1]
        assert again.request_id == first[node_id].request_id
        assert again.aggregator_args == first[node_id].aggregator_args
    job.close()
    world.close()


class Scripted:
    """A Job of 3 scripted nodes on a memory bus, approval recorded, round 1 sent."""

    def __init__(self, tmp_path: Path, aggregator: FedAvg | None = None) -> None:
        self.tmp = tmp_path
        self.broker = MemoryBroker()
        self.repo = LocalRepository(tmp_path / "repository")
        self.nodes = {  # they approve the plan and keep the train requests they get
            n: ScriptedNode(MemoryBus(self.broker, n, role="node"), n) for n in NODES
        }
        self.researcher = MemoryBus(self.broker, "researcher-bad", role="researcher")
        plan = tmp_path / "plan.py"
        BreastCancerPlan().save_code(plan)
        self.job = Job(
            reqs=Requests(self.researcher),
            training_plan_class="BreastCancerPlan",
            training_plan_path=plan,
            training_args={"lr": 0.1, "epochs": 1},
            data=FederatedDataSet({n: {"dataset_id": f"ds-{n}"} for n in NODES}),
            run_dir=tmp_path / "run",
            repository=self.repo,
            round_limit=1,
            min_nodes=1,
            reply_deadline_s=5,
            durability="never",
            aggregator=aggregator,
        )
        self.job.check_training_plan_is_approved_by_nodes(deadline_s=2.0)
        self.job.step(max_wait_s=0.0)  # round 1: recorded, then published; no wait

    def reply(self, node_id: str, *, url: str, sha256: str, samples: int) -> None:
        request = self.nodes[node_id].requests[1]
        self.nodes[node_id].send(
            TrainReply(
                request_id=request.request_id,
                researcher_id=request.researcher_id,
                node_id=node_id,
                job_id=request.job_id,
                round=1,
                dataset_id=request.dataset_id,
                training_plan_sha256=request.training_plan_sha256,
                params_url=url,
                params_sha256=sha256,
                sample_size=samples,
            )
        )

    def upload(self, tensors) -> dict:
        path = Path(tempfile.mkdtemp(dir=self.tmp)) / "p.safetensors"
        save_params(path, tensors)
        return self.repo.upload_file(path)

    def events(self) -> list:
        self.job.close()  # durability "never": complete on disk once closed
        return [r.event for r in scan(self.job.log_path).records]

    def close(self) -> None:
        for bus in [self.researcher, *(n.bus for n in self.nodes.values())]:
            bus.close()
        self.broker.close()


def test_a_reply_naming_one_file_by_another_digest_fails_and_deletes_nothing(
    tmp_path: Path,
) -> None:
    world = Scripted(tmp_path)
    job = world.job
    good = load_params(job.params_path(job.params_sha256))
    a = world.upload({k: v + 1 for k, v in good.items()})
    world.reply("node-a", url=a["file"], sha256=a["sha256"], samples=10)
    # node-b points at its own file but claims the digest of node-a's (already fetched)
    b = world.upload({k: v + 2 for k, v in good.items()})
    world.reply("node-b", url=b["file"], sha256=a["sha256"], samples=10)
    # node-c reuses node-a's file and digest with no samples: refused, and a's file stays
    world.reply("node-c", url=a["file"], sha256=a["sha256"], samples=0)
    job.step(max_wait_s=1.0)
    assert job.params_path(a["sha256"]).exists()
    job.aggregate()
    events = world.events()
    failed = {e.node_id: e.code for e in events if type(e).__name__ == "NodeFailed"}
    assert failed == {
        "node-b": int(ErrorNumber.PARAMS_DIGEST_MISMATCH),
        "node-c": int(ErrorNumber.PARAMS_INVALID),
    }
    assert [e.nodes for e in events if type(e).__name__ == "Aggregated"] == [("node-a",)]
    world.close()
