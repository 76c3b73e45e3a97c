"""A reply the researcher can not use (wrong tensors, no samples) fails that node, never the
round: aggregation goes on with the others, and the failure is in the log with its reason."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from test_protocol_stateful import NODES, ScriptedNode, lifecycle_approval

from fedsm.aggregation import FedAvg
from fedsm.job import Job
from fedsm.log import scan
from fedsm.protocol import ErrorNumber, TrainReply
from fedsm.repository import LocalRepository
from fedsm.requests import FederatedDataSet, Requests
from fedsm.training.demo_plan import BreastCancerPlan
from fedsm.training.params import load_params, save_params
from fedsm.transport import MemoryBroker, MemoryBus


def test_unusable_replies_fail_their_nodes_and_the_round_aggregates(tmp_path: Path) -> None:
    broker = MemoryBroker()
    repo = LocalRepository(tmp_path / "repository")
    nodes = {n: ScriptedNode(broker, n) for n in NODES}
    researcher = MemoryBus(broker, "researcher-bad", role="researcher")
    plan = tmp_path / "plan.py"
    BreastCancerPlan().save_code(plan)
    job = Job(
        reqs=Requests(researcher),
        training_plan_class="BreastCancerPlan",
        training_plan_path=plan,
        training_args={"lr": 0.1, "epochs": 1},
        data=FederatedDataSet({n: {"dataset_id": f"ds-{n}"} for n in NODES}),
        run_dir=tmp_path / "run",
        repository=repo,
        round_limit=1,
        min_nodes=1,
        reply_deadline_s=5,
        durability="never",
    )
    job._record(lifecycle_approval(job))
    job._driver.send_round(1)
    good = load_params(job.params_path(job.params_sha256))
    payloads = {
        "node-a": (good, 20),  # fine
        "node-b": ({k: torch.zeros(3) for k in good}, 20),  # wrong shapes
        "node-c": (good, 0),  # no samples
    }
    for node_id, (tensors, samples) in payloads.items():
        request = nodes[node_id].requests[1]
        path = Path(tempfile.mkdtemp(dir=tmp_path)) / "p.safetensors"
        save_params(path, tensors)
        up = repo.upload_file(path)
        nodes[node_id].send(
            TrainReply(
                request_id=request.request_id,
                researcher_id=request.researcher_id,
                node_id=node_id,
                job_id=request.job_id,
                round=1,
                dataset_id=request.dataset_id,
                training_plan_sha256=request.training_plan_sha256,
                params_url=up["file"],
                params_sha256=up["sha256"],
                sample_size=samples,
            )
        )
    job._driver.collect(timeout_s=1.0)
    job.aggregate()
    job.close()  # durability "never": complete on disk once closed
    events = [r.event for r in scan(job.log_path).records]
    failed = {e.node_id: e for e in events if type(e).__name__ == "NodeFailed"}
    assert sorted(failed) == ["node-b", "node-c"]
    assert {e.code for e in failed.values()} == {int(ErrorNumber.PARAMS_INVALID)}
    assert "shape" in failed["node-b"].message and "0 training samples" in failed["node-c"].message
    aggregated = [e for e in events if type(e).__name__ == "Aggregated"]
    assert aggregated[0].nodes == ("node-a",)
    assert type(events[-1]).__name__ == "JobCompleted"
    for bus in [researcher, *(n.bus for n in nodes.values())]:
        bus.close()
    broker.close()


class ArgsFedAvg(FedAvg):
    """FedAvg that also hands each node a small arg and a per-node file (Scaffold-like)."""

    def create_aggregator_args(
        self, *, round_number, node_ids, global_params_path=None, out_dir=None
    ):
        out_dir.mkdir(parents=True, exist_ok=True)
        small, files = {}, {}
        for node in node_ids:
            path = out_dir / f"correction-{node}-{round_number}.bin"
            path.write_bytes(f"{node}:{round_number}".encode())
            small[node] = {"server_lr": 0.5, "round": round_number}
            files[node] = {"correction": path}
        return small, files


def test_aggregator_args_reach_each_node_and_a_resend_repeats_them(tmp_path: Path) -> None:
    broker = MemoryBroker()
    repo = LocalRepository(tmp_path / "repository")
    nodes = {n: ScriptedNode(broker, n) for n in NODES}
    researcher = MemoryBus(broker, "researcher-args", role="researcher")
    plan = tmp_path / "plan.py"
    BreastCancerPlan().save_code(plan)
    job = Job(
        reqs=Requests(researcher),
        training_plan_class="BreastCancerPlan",
        training_plan_path=plan,
        training_args={"lr": 0.1, "epochs": 1},
        data=FederatedDataSet({n: {"dataset_id": f"ds-{n}"} for n in NODES}),
        run_dir=tmp_path / "run",
        repository=repo,
        round_limit=1,
        min_nodes=1,
        reply_deadline_s=5,
        durability="never",
        aggregator=ArgsFedAvg(),
    )
    job._record(lifecycle_approval(job))
    job._driver.send_round(1)
    first = {n: node.requests[1] for n, node in nodes.items()}
    for node_id, request in first.items():
        args = request.aggregator_args
        assert args["server_lr"] == 0.5 and args["round"] == 1
        _, path = repo.download_file(args["correction"]["url"], tmp_path / f"{node_id}.bin")
        assert path.read_bytes() == f"{node_id}:1".encode()  # each node its own file
    job._driver.send_round(1)  # as after a restore mid-round: re-sent, not new
    for node_id, node in nodes.items():
        again = node.requests[1]
        assert again.request_id == first[node_id].request_id
        assert again.aggregator_args == first[node_id].aggregator_args
    job.close()
    for bus in [researcher, *(n.bus for n in nodes.values())]:
        bus.close()
    broker.close()
