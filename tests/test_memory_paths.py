"""The simulation's fast paths change nothing but time.

A simulated node trains in memory (the parameters reach it and leave it as bytes), its
repository keeps checked bytes in memory, plans are compiled once per digest, datasets are
loaded once per file, torch is seeded without its CUDA bookkeeping. Each is held here to
what it replaces: the same bytes and digests as the file path, a file changed on disk read
again, nothing shared between two loads that one of them could change.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from plans import plan_bytes, write_csv

from fedsm.digests import sha256_hex
from fedsm.node.executor import TrainingTask, run_task
from fedsm.repository import LocalRepository
from fedsm.repository.base import DigestMismatch, FileNotInRepository
from fedsm.training import datasets, runner
from fedsm.training.loader import PlanImportError, loaded_plan_class
from fedsm.training.params import (
    ParamsFileError,
    params_from_bytes,
    params_to_bytes,
    save_params,
)

# --------------------------------------------------------------------------- parameters


def test_params_bytes_are_the_bytes_of_the_file(tmp_path: Path) -> None:
    tensors = {"b": torch.arange(3.0), "a": torch.ones(2, 2)}
    digest = save_params(tmp_path / "p.safetensors", tensors, durable=False)
    data = params_to_bytes(tensors)
    assert data == (tmp_path / "p.safetensors").read_bytes()
    assert sha256_hex(data) == digest
    back = params_from_bytes(data, like=tensors)
    assert list(back) == ["a", "b"] and torch.equal(back["b"], tensors["b"])


@pytest.mark.parametrize("raw", [b"", b"\x80\x04\x95pickle", b"\x10\x00\x00\x00\x00\x00\x00\x00{"])
def test_params_from_bytes_refuses_what_is_not_safetensors(raw: bytes) -> None:
    with pytest.raises(ParamsFileError, match="not a safetensors|truncated|not valid"):
        params_from_bytes(raw, source="the reply")


def test_params_from_bytes_checks_the_model_shape() -> None:
    data = params_to_bytes({"w": torch.zeros(3)})
    with pytest.raises(ParamsFileError, match="shape"):
        params_from_bytes(data, like={"w": torch.zeros(4)})


# --------------------------------------------------------------------------- training


def _task(tmp: Path, *, in_memory: bool) -> TrainingTask:
    source = plan_bytes("linear_plan.py").decode()
    csv = write_csv(tmp / "data.csv")
    from fedsm.training.datasets import describe_csv

    meta = describe_csv(csv, "target")
    record = {"data_type": "csv", "path": str(csv), "target": "target", **meta}
    init = tmp / "init.safetensors"
    runner.initial_params(
        plan_source=source,
        plan_class="LinearPlan",
        model_args={"in_features": 3},
        training_args={},
        seed=3,
        out_path=init,
    )
    return TrainingTask(
        plan_source=source,
        plan_class="LinearPlan",
        model_args={"in_features": 3},
        training_args={"lr": 0.1, "epochs": 2, "batch_size": 8},
        params_path="" if in_memory else str(init),
        dataset=record,
        seed=11,
        out_path="" if in_memory else str(tmp / "out.safetensors"),
        params_bytes=init.read_bytes() if in_memory else None,
    )


def test_a_training_in_memory_gives_the_bytes_a_training_through_files_writes(
    tmp_path: Path,
) -> None:
    (tmp_path / "f").mkdir()
    (tmp_path / "m").mkdir()
    through_files = run_task(_task(tmp_path / "f", in_memory=False))
    in_memory = run_task(_task(tmp_path / "m", in_memory=True))
    written = (tmp_path / "f" / "out.safetensors").read_bytes()
    assert through_files.params_bytes is None
    assert in_memory.params_bytes == written
    assert in_memory.params_sha256 == through_files.params_sha256 == sha256_hex(written)
    assert in_memory.metrics == through_files.metrics
    assert not (tmp_path / "m" / "out.safetensors").exists()


def test_seeding_the_cpu_generator_draws_what_manual_seed_draws() -> None:
    runner._seed_torch(1234)
    ours = torch.rand(5)
    torch.manual_seed(1234)
    theirs = torch.rand(5)
    assert torch.equal(ours, theirs)


# --------------------------------------------------------------------------- plans


def test_a_plan_compiled_once_is_still_a_new_module_each_load() -> None:
    source = plan_bytes("linear_plan.py").decode() + "\nLinearPlan.counter = []\n"
    with loaded_plan_class(source, "LinearPlan") as first:
        first.counter.append(1)  # a class-level change a training could make
        first_module = first.__module__
    with loaded_plan_class(source, "LinearPlan") as second:
        assert second is not first and second.__module__ != first_module
        assert second.counter == []  # nothing of the first load is shared


def test_a_plan_that_does_not_compile_is_refused_every_time() -> None:
    for _ in range(2):
        with pytest.raises(PlanImportError, match="does not compile"):
            with loaded_plan_class("def broken(:\n", "Plan"):
                pass


# --------------------------------------------------------------------------- datasets


def _record(path: Path) -> dict:
    return {"data_type": "csv", "path": str(path), "target": "target"}


def test_each_load_of_a_dataset_gets_its_own_tensors(tmp_path: Path) -> None:
    csv = write_csv(tmp_path / "d.csv")
    first = datasets.load_dataset(_record(csv))
    before = first.data.clone()
    first.data.mul_(0.0)  # a plan normalising in place
    first.columns.append("extra")
    second = datasets.load_dataset(_record(csv))
    assert torch.equal(second.data, before)
    assert "extra" not in second.columns


def test_a_dataset_changed_on_disk_is_read_again(tmp_path: Path) -> None:
    csv = write_csv(tmp_path / "d.csv")
    first = datasets.load_dataset(_record(csv))
    lines = csv.read_text().splitlines()
    csv.write_text("\n".join(lines[:-1]) + "\n")  # one sample fewer
    st = csv.stat()
    os.utime(csv, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    second = datasets.load_dataset(_record(csv))
    assert len(second) == len(first) - 1
    with pytest.raises(datasets.DatasetError, match="registered with"):
        datasets.load_dataset({**_record(csv), "sample_count": len(first)})


def test_a_dataset_that_vanished_is_an_error_not_a_cached_copy(tmp_path: Path) -> None:
    csv = write_csv(tmp_path / "d.csv")
    datasets.load_dataset(_record(csv))
    csv.unlink()
    with pytest.raises(datasets.DatasetError):
        datasets.load_dataset(_record(csv))


# --------------------------------------------------------------------------- repository


def test_a_simulation_repository_serves_checked_bytes_without_reading_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = LocalRepository(tmp_path / "repo", durable=False)
    data = b"global parameters " * 500
    up = repo.upload_bytes(data)
    reads = []
    real_open = Path.open

    def counting_open(self, *args, **kwargs):
        reads.append(self)
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", counting_open)
    for _ in range(3):
        assert repo.read_bytes(up["file"], max_bytes=len(data)) == data
    assert reads == []  # kept in memory since the upload
    _, dest = repo.download_file(up["file"], tmp_path / "copy.bin")
    assert dest.read_bytes() == data


@pytest.mark.parametrize("how", ["replaced", "rewritten, another size", "rewritten, later"])
def test_a_stored_file_changed_on_disk_is_hashed_again_and_refused(
    tmp_path: Path, how: str
) -> None:
    repo = LocalRepository(tmp_path / "repo", durable=False)
    data = b"global parameters " * 500
    up = repo.upload_bytes(data)
    stored = repo.root / up["sha256"]
    assert repo.read_bytes(up["file"], max_bytes=len(data)) == data
    bad = bytearray(data)
    bad[100] ^= 1
    if how == "replaced":
        (tmp_path / "evil").write_bytes(bytes(bad))
        os.replace(tmp_path / "evil", stored)  # another inode
    elif how == "rewritten, another size":
        stored.write_bytes(bytes(bad) + b"!")
    else:
        stored.write_bytes(bytes(bad))
        st = stored.stat()
        os.utime(stored, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(DigestMismatch):
        repo.read_bytes(up["file"], max_bytes=len(data) * 2)
    with pytest.raises(DigestMismatch):
        repo.download_file(up["file"], tmp_path / "copy.bin")
    assert not (tmp_path / "copy.bin").exists()


def test_a_rewrite_the_cache_cannot_see_never_hands_out_other_bytes(tmp_path: Path) -> None:
    """Same inode, size and (coarse) modification time: the kept bytes may be served, but
    they are the bytes that hashed to the digest, never the file's new ones."""
    repo = LocalRepository(tmp_path / "repo", durable=False)
    data = b"global parameters " * 500
    up = repo.upload_bytes(data)
    stored = repo.root / up["sha256"]
    st = stored.stat()
    bad = bytearray(data)
    bad[7] ^= 1
    stored.write_bytes(bytes(bad))
    os.utime(stored, ns=(st.st_atime_ns, st.st_mtime_ns))
    try:
        got = repo.read_bytes(up["file"], max_bytes=len(data))
    except DigestMismatch:
        return
    assert got == data


def test_a_download_is_a_copy_of_its_own_not_another_name_of_the_stored_file(
    tmp_path: Path,
) -> None:
    """The researcher's copy of a reply is its evidence: rewriting the repository's file in
    place (as a tamperer would) changes nothing of it."""
    repo = LocalRepository(tmp_path / "repo", durable=False)
    data = b"a node's parameters " * 300
    up = repo.upload_bytes(data)
    for name in ("kept.bin", "again.bin"):
        _, dest = repo.download_file(up["file"], tmp_path / name)
        assert dest.stat().st_ino != (repo.root / up["sha256"]).stat().st_ino
    (repo.root / up["sha256"]).write_bytes(b"tampered" * 10)
    assert (tmp_path / "kept.bin").read_bytes() == data


def test_a_removed_file_is_not_served_from_memory(tmp_path: Path) -> None:
    repo = LocalRepository(tmp_path / "repo", durable=False)
    up = repo.upload_bytes(b"abc")
    (repo.root / up["sha256"]).unlink()
    with pytest.raises(FileNotInRepository):
        repo.read_bytes(up["file"], max_bytes=10)


def test_the_kept_bytes_are_bounded(tmp_path: Path) -> None:
    repo = LocalRepository(tmp_path / "repo", durable=False)
    memo = repo._memo
    memo.max_bytes = memo.max_item_bytes = 10_000
    for i in range(30):
        repo.upload_bytes(bytes([i]) * 1000)
    assert memo.size <= 10_000
    durable = LocalRepository(tmp_path / "durable")
    durable.upload_bytes(b"x" * 1000)
    assert durable._memo.size == 0  # a durable repository keeps nothing in memory


def test_uploads_and_reads_from_many_threads_agree(tmp_path: Path) -> None:
    repo = LocalRepository(tmp_path / "repo", durable=False)
    contents = [bytes([i]) * (100 + i) for i in range(40)]
    errors: list[BaseException] = []

    def work(offset: int) -> None:
        try:
            for k in range(len(contents)):
                data = contents[(k + offset) % len(contents)]
                up = repo.upload_bytes(data)
                assert repo.read_bytes(up["file"], max_bytes=10_000) == data
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert sorted(p.name for p in repo.root.iterdir() if p.is_file()) == sorted(
        sha256_hex(c) for c in contents
    )


# --------------------------------------------------------------------------- worker pool


def test_a_worker_pool_takes_and_gives_parameters_as_bytes(tmp_path: Path) -> None:
    from fedsm.node.pool_executor import PoolTrainingExecutor

    (tmp_path / "f").mkdir()
    (tmp_path / "m").mkdir()
    through_files = run_task(_task(tmp_path / "f", in_memory=False))
    with PoolTrainingExecutor(1, start_timeout_s=120) as pool:
        assert pool.in_memory and pool.max_bytes_in_memory
        pooled = pool.train(_task(tmp_path / "m", in_memory=True), time_limit_s=120)
    assert pooled.params_bytes == (tmp_path / "f" / "out.safetensors").read_bytes()
    assert pooled.params_sha256 == through_files.params_sha256
    assert pooled.metrics == through_files.metrics


@pytest.mark.parametrize(
    "reply",
    [
        {"params_bytes": b"not what was trained"},
        {"params_bytes": "a string"},
    ],
)
def test_a_worker_reply_whose_bytes_do_not_match_its_digest_is_garbage(reply: dict) -> None:
    from fedsm.node import process_executor

    body = {
        "kind": "ok",
        "params_sha256": sha256_hex(b"trained"),
        "sample_size": 3,
        "metrics": {},
        **reply,
    }
    with pytest.raises(process_executor._Garbage):
        process_executor._outcome_from(body)
    body["params_bytes"] = b"trained"
    assert process_executor._outcome_from(body).params_bytes == b"trained"


def test_a_node_process_reads_parameters_for_its_worker_without_importing_torch(
    tmp_path: Path,
) -> None:
    """A real node trains in a worker process: it hands the parameters over as bytes, and
    neither that nor its checks load torch into the node's own process."""
    script = f"""
import sys
from pathlib import Path
from fedsm.core.messages import TrainRequest
from fedsm.node.fetch import RoundContext, Scratch, round_params
from fedsm.node.process_executor import ProcessTrainingExecutor
from fedsm.repository import LocalRepository
repo = LocalRepository(Path({str(tmp_path)!r}) / "repo")
up = repo.upload_bytes(b"parameters" * 100)
ctx = RoundContext(node_id="node-1", node_dir=Path({str(tmp_path)!r}), settings=None,
                   repository=repo, executor=ProcessTrainingExecutor(), datasets=None,
                   plans=None)
class R:
    params_url = up["file"]
    params_sha256 = up["sha256"]
    request_id = "r1"
path, data = round_params(ctx, R, Scratch(ctx, "r1"))
assert path == "" and data == b"parameters" * 100, (path, data)
print("torch" in sys.modules)
"""
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_parameters_too_large_for_a_worker_pipe_are_refused_before_any_worker_starts(
    tmp_path: Path,
) -> None:
    from fedsm.node.errors import TrainingFailed
    from fedsm.node.process_executor import ProcessTrainingExecutor
    from fedsm.node.worker_main import MAX_PARAMS_IN_FRAME

    task = _task(tmp_path, in_memory=True)
    big = TrainingTask(**{**task.__dict__, "params_bytes": b"\0" * (MAX_PARAMS_IN_FRAME + 1)})
    executor = ProcessTrainingExecutor()
    try:
        with pytest.raises(TrainingFailed, match="pass them as a file"):
            executor.train(big, time_limit_s=60)
        assert executor.restarts == 0 and executor._worker is None  # nothing crashed
    finally:
        executor.close()


def test_a_kept_file_over_the_limit_is_too_large_not_served(tmp_path: Path) -> None:
    from fedsm.repository.base import FileTooLarge

    repo = LocalRepository(tmp_path / "repo", durable=False)
    up = repo.upload_bytes(b"x" * 1000)  # kept in memory
    with pytest.raises(FileTooLarge):
        repo.read_bytes(up["file"], max_bytes=999)


def test_bytes_a_downloader_copied_are_not_kept_again(tmp_path: Path) -> None:
    """The researcher copies each reply's parameters into its run directory once: the
    repository lets go of them then, so a long run's memory stays flat."""
    repo = LocalRepository(tmp_path / "repo", durable=False)
    for i in range(20):
        up = repo.upload_bytes(bytes([i]) * 5000)
        repo.download_file(up["file"], tmp_path / "copy.bin")
        assert (tmp_path / "copy.bin").read_bytes() == bytes([i]) * 5000
    assert repo._memo.size == 0
    up = repo.upload_bytes(b"g" * 5000)  # read by many (the round's global parameters)
    for _ in range(3):
        assert repo.read_bytes(up["file"], max_bytes=5000) == b"g" * 5000
    assert repo._memo.size == 5000
