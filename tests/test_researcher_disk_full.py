"""The researcher's disk fills up (issue 15): at three points of a run (a log append, keeping
an aggregate in the job's files, an upload to the repository) the run stops with a typed,
one-line error, and once there is space again a resume ends with the digest of a run that
never met the fault."""

from __future__ import annotations

import errno
import sys

import pytest
from job_world import experiment, make_world, resume

import fedsm.log.writer as writer_module
import fedsm.repository.local as local_repository
import fedsm.researcher.setup as researcher_setup
from fedsm.errors import FedsmError

ROUNDS = 3


@pytest.fixture(scope="module")
def quiet_digest(tmp_path_factory) -> str:
    world = make_world(tmp_path_factory.mktemp("quiet"), 3)
    exp = experiment(world, world.root / "run", round_limit=ROUNDS)
    try:
        return exp.run()
    finally:
        exp.close()
        world.close()


@pytest.fixture()
def world(tmp_path):
    """A world of its own: a repository that holds nothing of another run's files."""
    w = make_world(tmp_path / "world", 3)
    yield w
    w.close()


def _full(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def _from_researcher() -> bool:
    frame = sys._getframe(1)
    while frame is not None:
        if "/fedsm/researcher/" in frame.f_code.co_filename:
            return True
        frame = frame.f_back
    return False


class FailOnce:
    """Wrap ``target.name`` so that the researcher's ``nth`` call raises ENOSPC (the disk is
    full then), and every other call works (space came back). A plain function wraps it, so
    a method stays a method."""

    def __init__(self, monkeypatch, target, name: str, nth: int) -> None:
        real = getattr(target, name)
        self.calls = 0
        self.fired = False

        def wrapper(*args, **kwargs):
            if _from_researcher():  # the nodes share this process: their disk is fine
                self.calls += 1
                if self.calls == nth:
                    self.fired = True
                    _full()
            return real(*args, **kwargs)

        monkeypatch.setattr(target, name, wrapper)


POINTS = {
    # the log's write of one record (durability "always": one write per append)
    "log append": (writer_module, "write_all", 9),
    # keeping a file by digest in the job's files (an aggregate)
    "job files": (researcher_setup.JobFiles, "store", 2),
    # the researcher's upload into the repository (the global parameters of a round)
    "repository upload": (local_repository.LocalRepository, "upload_file", 3),
}


@pytest.mark.parametrize("point", sorted(POINTS))
def test_a_full_disk_stops_the_run_cleanly_and_a_resume_ends_the_same(
    world, quiet_digest, tmp_path, monkeypatch, point
) -> None:
    target, name, nth = POINTS[point]
    run_dir = tmp_path / "run"
    with monkeypatch.context() as patch:
        fault = FailOnce(patch, target, name, nth)
        exp = experiment(world, run_dir, round_limit=ROUNDS)
        try:
            with pytest.raises(FedsmError) as caught:
                exp.run()
        finally:
            exp.close()
    assert fault.fired, f"the {point} fault was never reached"
    message = str(caught.value)
    assert "No space left on device" in message and "\n" not in message
    # Space is back: a new process resumes the job and ends where a quiet run ends.
    again = resume(world, run_dir)
    try:
        assert again.run() == quiet_digest
    finally:
        again.close()
