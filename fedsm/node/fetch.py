"""What serving a request fetches, checked: the plan, the parameters, the strategy's files.

Every byte a node takes from the repository passes here. A plan or a file is downloaded and
compared with the digest the request names before anything reads it (a repository's own
check counts when its URL names the same digest); parameters go to a training in memory
(:class:`~fedsm.node.executor.TrainingExecutor.in_memory`) or through a request's scratch
directory, made only when something needs a file. A failure of the node's own machine
(no space left, a read-only file system) raises
:class:`~fedsm.node.errors.NodeIOError`; the repository's refusals raise
:class:`~fedsm.node.errors.RequestFailed` with the code the researcher gets.
"""

from __future__ import annotations

import logging
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from fedsm.core.collect import digest_in_url
from fedsm.core.messages import TrainingPlanStatusRequest, TrainRequest
from fedsm.core.protocol_errors import ErrorNumber
from fedsm.digests import sha256_file, sha256_hex
from fedsm.node.errors import NodeIOError, RequestFailed
from fedsm.node.executor import TrainingExecutor, describe_io_fault, io_fault
from fedsm.node.registry import ApprovalRegistry, DatasetRegistry
from fedsm.node.settings import NodeSettings
from fedsm.repository.base import (
    DigestMismatch,
    FileNotInRepository,
    FileTooLarge,
    Repository,
    RepositoryError,
    RepositoryUnreachable,
)

__all__ = [
    "PLAN_CACHE_SIZE",
    "RoundContext",
    "Scratch",
    "aggregator_args",
    "fetch_plan",
    "node_io",
    "round_params",
]

log = logging.getLogger(__name__)

_T = TypeVar("_T")

#: How many checked plan sources a node keeps in memory, by digest.
PLAN_CACHE_SIZE = 8


@contextmanager
def node_io(what: str) -> Iterator[None]:
    """Turn a node-local I/O failure inside the block into :class:`NodeIOError` naming
    ``what`` (e.g. "could not write the parameters file"); other errors pass unchanged."""
    try:
        yield
    except RequestFailed:
        raise
    except Exception as exc:
        fault = io_fault(exc)
        if fault is None:
            raise
        raise NodeIOError(describe_io_fault(fault, what)) from exc


def _io(what: str, call: Callable[[], _T]) -> _T:
    with node_io(what):
        return call()


class RoundContext:
    """What serving a request needs from its node (kept apart so this module has no Node)."""

    def __init__(
        self,
        *,
        node_id: str,
        node_dir: Path,
        settings: NodeSettings,
        repository: Repository,
        executor: TrainingExecutor,
        datasets: DatasetRegistry,
        plans: ApprovalRegistry,
    ) -> None:
        self.node_id = node_id
        self.node_dir = node_dir
        self.settings = settings
        self.repository = repository
        self.executor = executor
        self.datasets = datasets
        self.plans = plans
        #: Plan sources this node downloaded and checked, by digest (the most recent few).
        self.plan_cache: dict[str, bytes] = {}

    def remember_plan(self, digest: str, source: bytes) -> None:
        """Keep a checked plan source by its digest (at most :data:`PLAN_CACHE_SIZE`)."""
        cache = self.plan_cache
        cache.pop(digest, None)
        cache[digest] = source
        while len(cache) > PLAN_CACHE_SIZE:
            cache.pop(next(iter(cache)))

    def scratch_dir(self, request_id: str) -> Path:
        """A fresh directory for one request's files (removed by the caller)."""
        path = self.node_dir / "work" / f"{request_id}-{uuid.uuid4().hex[:8]}"
        with node_io(f"could not make the scratch directory {path}"):
            path.mkdir(parents=True)
        return path


class Scratch:
    """One request's scratch directory, made on first use (a request whose files all
    travel in memory makes none) and removed by :meth:`remove`."""

    def __init__(self, ctx: RoundContext, request_id: str) -> None:
        self._ctx = ctx
        self._request_id = request_id
        self._dir: Path | None = None

    def path(self, name: str) -> Path:
        """``name`` inside the directory (made now if it is not yet)."""
        if self._dir is None:
            self._dir = self._ctx.scratch_dir(self._request_id)
        return self._dir / name

    def remove(self) -> None:
        """Remove the directory and what it holds, if it was made."""
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None


class _TooLargeInMemory(Exception):
    """The parameters are larger than the executor takes in memory."""


@contextmanager
def _repository_errors(url: str, what: str, mismatch: ErrorNumber) -> Iterator[None]:
    """Turn a repository's refusal to hand out ``url`` into the :class:`RequestFailed` the
    researcher gets (digest mismatch, unreachable, unknown file, bad URL)."""
    try:
        yield
    except DigestMismatch as exc:
        raise RequestFailed(
            mismatch, f"the {what} at {url} failed its digest check: {exc}"
        ) from None
    except RepositoryUnreachable as exc:
        raise RequestFailed(
            ErrorNumber.REPOSITORY_UNREACHABLE, f"could not download the {what}: {exc}"
        ) from None
    except FileNotInRepository as exc:
        raise RequestFailed(
            ErrorNumber.BAD_REQUEST, f"the {what} at {url} is not in the repository: {exc}"
        ) from None
    except (RepositoryError, ValueError) as exc:
        raise RequestFailed(ErrorNumber.BAD_REQUEST, f"bad {what} URL {url!r}: {exc}") from None


def _download(
    ctx: RoundContext,
    url: str,
    expected_sha256: str,
    dest: Path,
    *,
    what: str,
    mismatch: ErrorNumber,
) -> None:
    """Download ``url`` to ``dest`` and check it hashes to ``expected_sha256``."""
    with _repository_errors(url, what, mismatch):
        with node_io(f"could not write the downloaded {what} to {dest}"):
            ctx.repository.download_file(url, dest)
    if digest_in_url(url) == expected_sha256:
        # The repository checked the bytes against the digest its URL names (a promise of
        # every repository: fedsm.testing.RepositoryContract holds them to it): no second
        # hash of the same bytes.
        return
    actual = _io(f"could not read the downloaded {what} {dest}", lambda: sha256_file(dest))
    if actual != expected_sha256:
        raise RequestFailed(
            mismatch,
            f"the {what} downloaded from {url} hashes to {actual}, not to the "
            f"{expected_sha256} the request names; refusing it",
        )


def _read(
    ctx: RoundContext,
    url: str,
    expected_sha256: str,
    *,
    what: str,
    mismatch: ErrorNumber,
    max_bytes: int,
    too_large_ok: bool = False,
) -> bytes:
    """The bytes at ``url``, in memory, checked to hash to ``expected_sha256``. A file over
    ``max_bytes`` is the request's fault, or with ``too_large_ok`` raises
    :class:`_TooLargeInMemory` (the caller takes it through a file)."""
    with _repository_errors(url, what, mismatch):
        with node_io(f"could not read the {what}"):
            try:
                data = ctx.repository.read_bytes(url, max_bytes=max_bytes)
            except FileTooLarge:
                if too_large_ok:
                    raise _TooLargeInMemory from None
                raise
    if digest_in_url(url) != expected_sha256 and sha256_hex(data) != expected_sha256:
        raise RequestFailed(
            mismatch,
            f"the {what} downloaded from {url} does not hash to the {expected_sha256} the "
            "request names; refusing it",
        )
    return data


def fetch_plan(
    ctx: RoundContext, request: TrainingPlanStatusRequest | TrainRequest, dest: Path
) -> bytes:
    """The request's plan bytes, checked against its digest: downloaded to ``dest``, or the
    bytes this node already downloaded and checked under that digest (the same plan every
    round of a job: not fetched and hashed again each time)."""
    digest = request.training_plan_sha256
    cached = ctx.plan_cache.get(digest)
    if cached is not None:
        return cached
    _download(
        ctx,
        request.training_plan_url,
        digest,
        dest,
        what="training plan",
        mismatch=ErrorNumber.PLAN_DIGEST_MISMATCH,
    )
    size = _io(f"could not read the downloaded training plan {dest}", lambda: dest.stat().st_size)
    limit = ctx.settings.max_plan_bytes
    if size > limit:  # not read, not recorded, not imported: the request's fault
        raise RequestFailed(
            ErrorNumber.BAD_REQUEST,
            f"the training plan is {size} bytes, over this node's max_plan_bytes ({limit})",
        )
    source = _io(f"could not read the downloaded training plan {dest}", dest.read_bytes)
    if sha256_hex(source) != digest:  # read back what was checked: the bytes the node runs
        raise RequestFailed(
            ErrorNumber.PLAN_DIGEST_MISMATCH,
            f"the training plan read back from {dest} does not hash to {digest}",
        )
    ctx.remember_plan(digest, source)
    return source


def aggregator_args(
    ctx: RoundContext, request: TrainRequest, work: Scratch
) -> tuple[dict[str, Any], dict[str, str]]:
    """The strategy's args for this node: values as sent, and each file arg (``{"url",
    "sha256"}``) downloaded into ``work`` and checked against its digest before the plan
    sees it (it is loaded as safetensors, never unpickled)."""
    values: dict[str, Any] = {}
    files: dict[str, str] = {}
    for i, (name, value) in enumerate(sorted(request.aggregator_args.items())):
        if isinstance(value, dict) and set(value) == {"url", "sha256"}:
            dest = work.path(f"aggregator-{i}.safetensors")
            _download(
                ctx,
                str(value["url"]),
                str(value["sha256"]),
                dest,
                what=f"aggregator file {name!r}",
                mismatch=ErrorNumber.PARAMS_DIGEST_MISMATCH,
            )
            files[name] = str(dest)
        else:
            values[name] = value
    return values, files


def round_params(
    ctx: RoundContext, request: TrainRequest, work: Scratch
) -> tuple[str, bytes | None]:
    """The round's global parameters, checked against their digest: as bytes (``("",
    data)``) for an executor that takes them in memory and parameters within its limit, so
    that no file is written on the node's side of the round; else downloaded into the
    scratch directory (``(path, None)``)."""
    what, mismatch = "parameters file", ErrorNumber.PARAMS_DIGEST_MISMATCH
    if ctx.executor.in_memory:
        limit = ctx.executor.max_bytes_in_memory
        if limit is None:  # trains in this process, so torch is loaded here anyway
            from fedsm.training.params import MAX_PARAMS_BYTES

            max_bytes = MAX_PARAMS_BYTES
        else:  # a worker's limit (a node process never imports torch itself)
            max_bytes = limit
        try:
            data = _read(
                ctx,
                request.params_url,
                request.params_sha256,
                what=what,
                mismatch=mismatch,
                max_bytes=max_bytes,
                too_large_ok=limit is not None,
            )
        except _TooLargeInMemory:
            pass  # through a file, below
        else:
            return "", data
    path = work.path("params_in.safetensors")
    _download(ctx, request.params_url, request.params_sha256, path, what=what, mismatch=mismatch)
    return str(path), None
