"""Plan sources and helpers for the node tests (``from plans import ...`` in tests/test_node_*).

The plans are plain source files; a node receives them as bytes, so tests read them with
:func:`plan_bytes`, optionally substituting a marker path to make a unique plan.
"""

from __future__ import annotations

import hashlib
import queue
import random
import time
import uuid
from pathlib import Path
from typing import Any

from fedsm.core.messages import Reply, Request, TrainRequest
from fedsm.repository import LocalRepository
from fedsm.transport import MemoryBroker, MemoryBus

PLANS_DIR = Path(__file__).parent
RESEARCHER = "researcher-test"
MODEL_ARGS = {"in_features": 3}
TRAINING_ARGS = {"lr": 0.1, "epochs": 1, "batch_size": 8}


def plan_bytes(name: str, marker: Path | None = None) -> bytes:
    """The bytes of ``tests/plans/<name>``, with ``MARKER_PATH`` replaced by ``marker``."""
    data = (PLANS_DIR / name).read_bytes()
    if marker is not None:
        data = data.replace(b"MARKER_PATH", str(marker).encode())
    return data


def write_plan(directory: Path, name: str, marker: Path | None = None) -> Path:
    """Write a plan's bytes to ``directory/name`` and return the path."""
    path = Path(directory) / name
    path.write_bytes(plan_bytes(name, marker))
    return path


def write_csv(path: Path, rows: int = 24, seed: int = 0) -> Path:
    """A small binary-classification CSV with three features and a ``target`` column."""
    rng = random.Random(seed)
    lines = ["a,b,c,target"]
    for _ in range(rows):
        x = [rng.uniform(-1, 1) for _ in range(3)]
        lines.append(",".join(f"{v:.6f}" for v in x) + f",{int(x[0] + x[1] > 0)}")
    path.write_text("\n".join(lines) + "\n")
    return path


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Researcher:
    """A researcher's end of a memory bus that collects replies in a queue."""

    def __init__(self, broker: MemoryBroker, researcher_id: str = RESEARCHER) -> None:
        self.bus = MemoryBus(broker, researcher_id, role="researcher")
        self.replies: queue.Queue[Reply] = queue.Queue()
        self._stash: list[Reply] = []
        self.bus.subscribe(self.replies.put)

    def ask(self, node_id: str, request: Request, timeout_s: float = 60.0) -> Reply:
        """Send ``request`` and return the first reply to it (raise after ``timeout_s``)."""
        self.bus.send(node_id, request)
        return self.wait(request.request_id, timeout_s)

    def wait(self, request_id: str, timeout_s: float = 60.0) -> Reply:
        """The next reply to ``request_id``; replies to other requests are kept for later."""
        for index, reply in enumerate(self._stash):
            if reply.request_id == request_id:
                return self._stash.pop(index)
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no reply to {request_id} within {timeout_s} s")
            try:
                reply = self.replies.get(timeout=left)
            except queue.Empty:
                continue
            if reply.request_id == request_id:
                return reply
            self._stash.append(reply)

    def close(self) -> None:
        self.bus.close()


def head(node_id: str, **extra: Any) -> dict[str, Any]:
    """Common request fields: a fresh request id, the researcher, the node, a deadline."""
    fields = {
        "request_id": "req-" + uuid.uuid4().hex[:12],
        "researcher_id": RESEARCHER,
        "node_id": node_id,
        "deadline": time.time() + 600,
    }
    fields.update(extra)
    return fields


def initial_params(repository: LocalRepository, plan: bytes, plan_class: str, tmp: Path) -> dict:
    """Make the plan's initial parameters with the real runner and upload them."""
    from fedsm.training.runner import initial_params as make

    out = tmp / f"init-{uuid.uuid4().hex[:8]}.safetensors"
    make(
        plan_source=plan.decode(),
        plan_class=plan_class,
        model_args=MODEL_ARGS,
        training_args=TRAINING_ARGS,
        seed=1,
        out_path=out,
    )
    return dict(repository.upload_file(out))


def train_request(
    node_id: str,
    dataset_id: str,
    repository: LocalRepository,
    plan: bytes,
    plan_class: str,
    params: dict,
    tmp: Path,
    **extra: Any,
) -> TrainRequest:
    """A train request for ``plan`` (uploaded here) starting from ``params``."""
    plan_file = tmp / f"plan-{sha256(plan)[:12]}.py"
    plan_file.write_bytes(plan)
    uploaded = repository.upload_file(plan_file)
    fields = dict(
        job_id="job-test",
        round=0,
        dataset_id=dataset_id,
        training_plan_url=uploaded["file"],
        training_plan_sha256=uploaded["sha256"],
        training_plan_class=plan_class,
        params_url=params["file"],
        params_sha256=params["sha256"],
        training_args=TRAINING_ARGS,
        model_args=MODEL_ARGS,
        seed=42,
    )
    fields = {**head(node_id), **fields, **extra}
    return TrainRequest(**fields)
