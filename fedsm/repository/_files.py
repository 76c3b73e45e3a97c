"""Digest checks and crash-safe hashed writes shared by every repository backend.

Everything that lands on disk in fedsm's repositories goes through :class:`HashedTempFile`:
bytes are written to a temporary file *in the destination's directory* while being hashed
and counted, and only a file whose digest (and size) is right is fsynced and renamed into
place. A crash, a cut-short stream or a tampered byte therefore never leaves a partial or
wrong file under a final name; at worst a temporary file is left behind.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
from pathlib import Path
from types import TracebackType

from fedsm.digests import is_sha256, sha256_file
from fedsm.repository.base import DigestMismatch, FileTooLarge
from fedsm.repository.errors import InvalidDigest

__all__ = [
    "CHUNK_SIZE",
    "HashedTempFile",
    "check_digest",
    "commit_temp",
    "copy_and_hash",
    "fsync_dir",
    "resolve_destination",
    "write_file",
    "write_temp",
]

#: Bytes read or written per step when streaming: big enough for throughput, small enough
#: that memory use stays constant whatever the file size.
CHUNK_SIZE = 1 << 20


def check_digest(text: str) -> str:
    """Return ``text`` if it is a canonical sha256 hex digest, else raise :class:`InvalidDigest`.

    Only this form is ever turned into a file name, so no caller-supplied string can name
    a path outside a repository (no ``..``, no separators, no case aliasing).
    """
    if not is_sha256(text):
        raise InvalidDigest(
            f"{text!r} is not a sha256 digest: expected exactly 64 lowercase hex characters"
        )
    return text


def fsync_dir(directory: Path) -> None:
    """fsync a directory so a rename inside it survives a power cut (no-op where unsupported)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms that cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some file systems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def _temp_name(directory: Path) -> Path:
    return directory / f".part-{secrets.token_hex(8)}.tmp"


def copy_and_hash(source: Path, directory: Path) -> tuple[Path, str, int]:
    """Copy ``source`` to a new temporary file in ``directory``; return it with its digest and size.

    The copy is made by :func:`shutil.copyfile` (in the kernel where the OS offers it, several
    times faster than writing from Python) and *the copy* is then hashed, so the digest
    describes exactly the bytes that will be renamed into place even if ``source`` changes
    meanwhile. The caller commits the file with :func:`commit_temp` or removes it.
    """
    directory.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(directory)
    try:
        shutil.copyfile(source, tmp)
        digest = sha256_file(tmp, chunk_size=CHUNK_SIZE)
        size = tmp.stat().st_size  # the copy is ours alone: nothing changes it meanwhile
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp, digest, size


def write_temp(directory: Path, data: bytes) -> Path:
    """Write ``data`` to a new temporary file in ``directory`` (made if missing); the caller
    commits it with :func:`commit_temp` or removes it."""
    tmp = _temp_name(directory)
    try:
        try:
            fh = open(tmp, "xb")  # noqa: SIM115 - closed below
        except FileNotFoundError:
            directory.mkdir(parents=True, exist_ok=True)
            fh = open(tmp, "xb")  # noqa: SIM115
        with fh:
            fh.write(data)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def write_file(destination: Path, data: bytes, *, sync: bool = True) -> None:
    """Write ``data`` to ``destination`` atomically (temporary file, then rename)."""
    tmp = write_temp(destination.parent, data)
    try:
        commit_temp(tmp, destination, sync=sync)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def commit_temp(tmp: Path, destination: Path, *, sync: bool = True) -> None:
    """fsync ``tmp``, atomically rename it to ``destination`` and fsync the directory.

    ``sync=False`` renames without the two fsyncs: still atomic (a killed process leaves the
    old name or the whole new file: written bytes belong to the kernel, not the process),
    but a crash of the machine may leave the name with lost bytes, which the next download's
    digest check refuses. For simulations (``LocalRepository(durable=False)``) only.
    """
    if sync:
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    os.replace(tmp, destination)
    if sync:
        fsync_dir(destination.parent)


def resolve_destination(filename: str | Path, download_dir: Path | None) -> Path:
    """Where a download named ``filename`` goes: relative names land in ``download_dir``.

    Without a ``download_dir``, relative names are relative to the current directory. The
    parent directory is created if missing.
    """
    dest = Path(filename).expanduser()
    if not dest.is_absolute() and download_dir is not None:
        dest = download_dir / dest
    dest = dest.absolute()
    dest.parent.mkdir(parents=True, exist_ok=True)
    return dest


class HashedTempFile:
    """A temporary file that hashes what is written to it and is renamed into place only if right.

    Parameters
    ----------
    directory
        Where the temporary file is created. It must be on the same file system as the
        final destination, so the final :func:`os.replace` is atomic.
    max_size
        Refuse (raise :class:`FileTooLarge`) as soon as more than this many bytes are written.

    Use as a context manager: leaving the block without :meth:`commit` removes the file.
    """

    def __init__(self, directory: Path, *, max_size: int | None = None) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        # Not tempfile.mkstemp: its 0600 mode would make stored files unreadable to the other
        # users of a shared repository; 0644 filtered by the umask is what a plain copy gives.
        self.path = _temp_name(directory)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        self._file = os.fdopen(fd, "wb")
        self._hash = hashlib.sha256()
        self._max_size = max_size
        self.size = 0
        self._done = False

    def write(self, chunk: bytes) -> None:
        """Append ``chunk``, updating the running digest and size."""
        self.size += len(chunk)
        if self._max_size is not None and self.size > self._max_size:
            raise FileTooLarge(
                f"more than {self._max_size} bytes received: over the repository's size limit"
            )
        self._hash.update(chunk)
        self._file.write(chunk)

    @property
    def hexdigest(self) -> str:
        """The sha256 of everything written so far."""
        return self._hash.hexdigest()

    def verify(self, expected_digest: str, expected_size: int | None = None) -> None:
        """Raise :class:`DigestMismatch` unless the bytes written hash to ``expected_digest``."""
        if expected_size is not None and self.size != expected_size:
            raise DigestMismatch(
                f"got {self.size} bytes where {expected_size} were expected "
                f"(a cut-short or padded transfer of {expected_digest})"
            )
        actual = self.hexdigest
        if actual != expected_digest:
            raise DigestMismatch(
                f"bytes hash to {actual}, not to {expected_digest} as their name says "
                "(corrupted, tampered with, or changed while being copied)"
            )

    def commit(self, destination: Path) -> None:
        """fsync the bytes, atomically rename them to ``destination`` and fsync its directory.

        If ``destination`` exists it is replaced: with content addressing it holds the same
        bytes, so two writers racing on one digest both succeed and leave one file.
        """
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.path, destination)
        self._done = True
        fsync_dir(destination.parent)

    def discard(self) -> None:
        """Close and remove the temporary file (idempotent)."""
        if self._done:
            return
        self._done = True
        self._file.close()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    def __enter__(self) -> HashedTempFile:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.discard()
