"""``RepositoryContract``: the scenarios every :class:`~fedsm.repository.Repository` must pass.

fedsm runs this suite against :class:`~fedsm.repository.LocalRepository` and
:class:`~fedsm.repository.HttpRepository`; to check your own backend, subclass it in a test
module, set ``__test__ = True`` and give the factory::

    from fedsm.testing import RepositoryContract

    class TestMyRepository(RepositoryContract):
        __test__ = True

        def make_repository(self, tmp_path):
            self.root = tmp_path
            return MyRepository(tmp_path)

        # optional: lets the integrity scenarios tamper with what is stored
        def replace_stored_bytes(self, repository, digest, data):
            (self.root / digest).write_bytes(data)

pytest runs each scenario on a fresh instance, and the factory on that same instance, so
state kept on ``self`` by :meth:`~RepositoryContract.make_repository` is there for the hooks.

Hooks a subclass may give:

- :meth:`RepositoryContract.make_repository` (required): a fresh, empty repository in
  ``tmp_path`` (a directory that is the repository's alone). Return it, or ``yield`` it like a
  pytest fixture to clean up afterwards (stop a server, close a client).
- :meth:`RepositoryContract.replace_stored_bytes`: overwrite what the repository stores under
  a digest, as a bad disk or an intruder would. Without it the tampering scenarios are skipped.
- :meth:`RepositoryContract.stored_digests`: the digests actually stored, to check that the
  same content uploaded twice is stored once. Without it only the upload results are compared.
- :attr:`RepositoryContract.large_file_size`: the size of the large round trip (default just
  over 5 MiB, several 1 MiB chunks: lower it if your repository has a smaller size limit).

Every scenario fails with a message naming the digest and the bytes it gave, e.g. ``download
of digest 3f2a... gave 11 bytes b'second file' (sha256 9c0e...), not the 10 bytes b'first
file' uploaded under it: those are the bytes of 9c0e..., another stored file``. The contract
itself never sleeps or polls; give your factory's clients timeouts so that every wait is
bounded.
"""

from __future__ import annotations

import hashlib
import inspect
import random
import tempfile
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedsm.repository.base import (
    DigestMismatch,
    FileNotInRepository,
    FileTooLarge,
    Repository,
    RepositoryError,
)

__all__ = ["RepositoryContract"]

_NOT_DIGESTS = [
    "",
    "../etc/passwd",
    "%2e%2e",
    "A" * 64,
    "a" * 63,
    "a" * 65,
    "g" * 64,
    "a" * 63 + "/",
    "a" * 64 + "\n",
    " " + "a" * 63,
]

_TAMPERINGS = ["flipped byte", "truncated", "appended byte", "another stored file"]


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _show(data: bytes) -> str:
    """``11 bytes b'second file' (sha256 9c0e12...)``: bytes as a failure message shows them."""
    shown = repr(data[:32]) + ("..." if len(data) > 32 else "")
    unit = "byte" if len(data) == 1 else "bytes"
    return f"{len(data)} {unit} {shown} (sha256 {_sha(data)[:16]}...)"


def _new_dir(parent: Path, prefix: str) -> Path:
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=parent))


def _tampered(kind: str, data: bytes, other: bytes) -> bytes:
    if kind == "flipped byte":
        return bytes([data[0] ^ 0x01]) + data[1:]
    if kind == "truncated":
        return data[: len(data) // 2]
    if kind == "appended byte":
        return data + b"\x00"
    assert kind == "another stored file"
    return other


class RepositoryContract:
    """Scenarios every repository must pass (a pytest test-case base class).

    Subclass it, set ``__test__ = True`` and implement :meth:`make_repository`; see the
    module documentation for the optional hooks.
    """

    __test__ = False

    #: The size of the large-file round trip: several 1 MiB chunks and an odd tail.
    large_file_size: int = 5 * 2**20 + 7
    #: The largest content the ``binary()`` round trip generates.
    max_example_bytes: int = 4096
    #: Errors that count as refusing a URL or id that is not a digest of this repository.
    refusal_errors: tuple[type[BaseException], ...] = (RepositoryError, ValueError)
    #: Examples per property at most (each is several uploads over the network for a remote
    #: repository), except under a profile listed in ``unbounded_profiles``.
    max_examples: int = 20
    unbounded_profiles: tuple[str, ...] = ("deep",)

    def _bounded(self) -> settings:
        """The loaded profile's settings with ``max_examples`` capped (see the attribute)."""
        parent = settings.default
        bounded = settings.get_current_profile_name() not in self.unbounded_profiles
        return settings(
            parent,
            max_examples=min(parent.max_examples, self.max_examples)
            if bounded
            else parent.max_examples,
            deadline=None,
            suppress_health_check=[*parent.suppress_health_check, HealthCheck.too_slow],
        )

    # -- hooks ----------------------------------------------------------------------------

    def make_repository(self, tmp_path: Path) -> Repository | Iterator[Repository]:
        """A fresh, empty repository in ``tmp_path``; return it, or yield it to clean up."""
        raise NotImplementedError(
            f"{type(self).__name__} must implement make_repository(self, tmp_path)"
        )

    def replace_stored_bytes(self, repository: Repository, digest: str, data: bytes) -> None:
        """Overwrite the bytes stored under ``digest`` with ``data`` (simulated tampering)."""
        pytest.skip(
            f"{type(self).__name__} has no replace_stored_bytes(repository, digest, data) "
            "hook: the tampering scenarios need one"
        )

    def stored_digests(self, repository: Repository) -> Collection[str] | None:
        """The digests the repository stores, or None if they cannot be listed."""
        return None

    # -- fixtures -------------------------------------------------------------------------

    @pytest.fixture
    def repository(self, tmp_path: Path) -> Iterator[Repository]:
        """The repository under test, from :meth:`make_repository`."""
        root = tmp_path / "repository"
        root.mkdir()
        made: Any = self.make_repository(root)
        if not inspect.isgenerator(made):
            yield made
            return
        repo = next(made)
        try:
            yield repo
        finally:
            for _ in made:  # run the factory's clean-up
                raise RuntimeError("make_repository must yield exactly one repository")

    @pytest.fixture
    def work(self, tmp_path: Path) -> Path:
        """A directory for source files and download destinations, outside the repository."""
        path = tmp_path / "work"
        path.mkdir()
        return path

    # -- helpers --------------------------------------------------------------------------

    def _upload(self, repository: Repository, work: Path, data: bytes) -> dict[str, Any]:
        source = _new_dir(work, "src-") / "content.bin"
        source.write_bytes(data)
        return dict(repository.upload_file(source))

    def _download(
        self,
        repository: Repository,
        work: Path,
        url: str,
        expected: bytes,
        stored: dict[str, bytes] | None = None,
    ) -> None:
        """Download ``url`` and assert it gives ``expected``, saying what it gave instead."""
        digest = _sha(expected)
        dest = _new_dir(work, "dl-") / "downloaded.bin"
        try:
            result = repository.download_file(url, dest)
        except RepositoryError as exc:
            raise AssertionError(
                f"download of digest {digest} ({url}) raised {exc!r}, but the {_show(expected)} "
                "uploaded under it are stored untouched"
            ) from exc
        assert tuple(result) == (200, dest), (
            f"download_file({url!r}, {str(dest)!r}) returned {result!r}, not (200, {dest!r})"
        )
        got = dest.read_bytes()
        if got != expected:
            message = (
                f"download of digest {digest} gave {_show(got)}, not the {_show(expected)} "
                "uploaded under it"
            )
            others = {d for d, b in (stored or {}).items() if b == got and d != digest}
            if others:
                message += f": those are the bytes of {sorted(others)[0]}, another stored file"
            raise AssertionError(message)

    def _check_upload(self, repository: Repository, up: dict[str, Any], data: bytes) -> None:
        digest = _sha(data)
        assert set(up) == {"file", "sha256", "size"}, (
            f"upload of {_show(data)} returned keys {sorted(up)}, not ['file', 'sha256', 'size']"
        )
        assert up["sha256"] == digest, (
            f"upload of {_show(data)} returned sha256 {up['sha256']!r}, not {digest}"
        )
        assert up["size"] == len(data), (
            f"upload of {_show(data)} returned size {up['size']!r}, not {len(data)}"
        )
        assert up["file"] == repository.url_for(digest), (
            f"upload of {digest} returned file {up['file']!r}, but url_for({digest}) is "
            f"{repository.url_for(digest)!r}"
        )

    def _round_trip(self, repository: Repository, work: Path, data: bytes) -> None:
        up = self._upload(repository, work, data)
        self._check_upload(repository, up, data)
        self._download(repository, work, up["file"], data)

    # -- scenarios ------------------------------------------------------------------------

    def test_upload_returns_file_sha256_and_size(self, repository: Repository, work: Path) -> None:
        data = b"training plan v1\n" * 100
        up = self._upload(repository, work, data)
        self._check_upload(repository, up, data)
        assert repository.digest_of_url(up["file"]) == _sha(data)

    def test_download_gives_each_digest_its_own_bytes(
        self, repository: Repository, work: Path
    ) -> None:
        contents = [b"first file", b"second file", bytes(range(256)) * 40]
        stored = {}
        urls = {}
        for data in contents:
            up = self._upload(repository, work, data)
            stored[up["sha256"]] = data
            urls[up["sha256"]] = up["file"]
        for digest, data in stored.items():
            self._download(repository, work, urls[digest], data, stored)

    def test_same_content_uploaded_twice_is_stored_once(
        self, repository: Repository, work: Path
    ) -> None:
        data = b"same bytes, two source files"
        first = self._upload(repository, work, data)
        second = self._upload(repository, work, data)
        assert second == first, f"uploading {_show(data)} twice returned {first!r}, then {second!r}"
        other = self._upload(repository, work, b"other bytes")
        assert other["sha256"] != first["sha256"]
        listed = self.stored_digests(repository)
        if listed is not None:
            digests = sorted(listed)
            assert digests == sorted([first["sha256"], other["sha256"]]), (
                f"after uploading 2 distinct contents (one of them twice) the repository "
                f"stores {digests}"
            )
        stored = {first["sha256"]: data, other["sha256"]: b"other bytes"}
        self._download(repository, work, first["file"], data, stored)

    def test_exists_is_false_before_and_true_after_upload(
        self, repository: Repository, work: Path
    ) -> None:
        data = b"exists?"
        digest = _sha(data)
        assert repository.exists(digest) is False, f"exists({digest}) before any upload"
        self._upload(repository, work, data)
        assert repository.exists(digest) is True, f"exists({digest}) after its upload"
        other = _sha(b"never uploaded")
        assert repository.exists(other) is False, f"exists({other}), never uploaded"

    def test_url_for_and_digest_of_url_are_inverse(
        self, repository: Repository, work: Path
    ) -> None:
        up = self._upload(repository, work, b"addressed by content")
        assert repository.url_for(up["sha256"]) == up["file"]
        digests = [up["sha256"], _sha(b"never uploaded"), "0" * 64, "f" * 64]
        urls = [repository.url_for(d) for d in digests]
        for digest, url in zip(digests, urls, strict=True):
            assert isinstance(url, str), f"url_for({digest}) returned {url!r}"
            back = repository.digest_of_url(url)
            assert back == digest, f"digest_of_url(url_for({digest})) is {back!r}"
        assert len(set(urls)) == len(urls), f"distinct digests share a URL: {urls}"

    def test_never_uploaded_digest_is_file_not_in_repository(
        self, repository: Repository, work: Path
    ) -> None:
        self._upload(repository, work, b"some other file is stored")
        digest = _sha(b"never uploaded")
        dest = _new_dir(work, "dl-") / "missing.bin"
        try:
            repository.download_file(repository.url_for(digest), dest)
        except FileNotInRepository:
            pass
        else:
            got = dest.read_bytes() if dest.exists() else None
            raise AssertionError(
                f"download of digest {digest}, never uploaded, gave "
                f"{_show(got) if got is not None else 'no error and no file'} instead of "
                "raising FileNotInRepository"
            )
        assert not dest.exists(), f"a failed download of {digest} created {dest}"
        assert list(dest.parent.iterdir()) == [], (
            f"a failed download of {digest} left {sorted(p.name for p in dest.parent.iterdir())}"
        )

    @pytest.mark.parametrize("kind", _TAMPERINGS)
    def test_tampered_stored_file_is_refused(
        self, repository: Repository, work: Path, kind: str
    ) -> None:
        data = b"good parameters " * 1000
        other = b"the bytes of another file"
        up = self._upload(repository, work, data)
        self._upload(repository, work, other)
        digest = up["sha256"]
        bad = _tampered(kind, data, other)
        self.replace_stored_bytes(repository, digest, bad)
        dest = _new_dir(work, "dl-") / "params.bin"
        dest.write_bytes(b"previous content")
        try:
            repository.download_file(up["file"], dest)
        except DigestMismatch:
            pass
        else:
            raise AssertionError(
                f"download of digest {digest}, whose stored bytes were tampered with ({kind}: "
                f"now {_show(bad)}), handed out {_show(dest.read_bytes())} instead of raising "
                "DigestMismatch"
            )
        assert dest.read_bytes() == b"previous content", (
            f"a refused download of {digest} overwrote the destination with "
            f"{_show(dest.read_bytes())}"
        )
        left = sorted(p.name for p in dest.parent.iterdir())
        assert left == [dest.name], f"a refused download of {digest} left {left}"

    def test_urls_that_do_not_name_a_stored_digest_are_refused(
        self, repository: Repository, work: Path
    ) -> None:
        up = self._upload(repository, work, b"secret")
        digest, url = up["sha256"], up["file"]
        bad_urls = [
            "",
            digest,
            "file:///etc/passwd",
            f"http://repository.invalid/files/{digest}",
            f"{url}?x=1",
            f"{url}#x",
        ]
        if url.endswith(digest):
            prefix = url[: -len(digest)]
            bad_urls += [
                prefix + digest.upper(),
                prefix + digest[:-1],
                prefix + digest + "0",
                prefix + "../" + digest,
                prefix + "%2e%2e/" + digest,
                prefix + "..%2f" + digest,
                prefix + "sub/" + digest,
                prefix + "../../etc/passwd",
                prefix + "%2e%2e%2f%2e%2e%2fetc%2fpasswd",
                prefix,
            ]
        dest_dir = _new_dir(work, "dl-")
        for bad in bad_urls:
            dest = dest_dir / "out.bin"
            try:
                got = repository.digest_of_url(bad)
            except self.refusal_errors:
                pass
            else:
                raise AssertionError(f"digest_of_url({bad!r}) accepted it as {got!r}")
            try:
                repository.download_file(bad, dest)
            except self.refusal_errors:
                pass
            else:
                raise AssertionError(
                    f"download_file({bad!r}) was not refused: it gave "
                    f"{_show(dest.read_bytes()) if dest.exists() else 'no error and no file'}"
                )
            assert list(dest_dir.iterdir()) == [], f"download_file({bad!r}) left a file"

    @pytest.mark.parametrize("bad", _NOT_DIGESTS)
    def test_ids_that_are_not_digests_are_refused(self, repository: Repository, bad: str) -> None:
        for name, call in (("exists", repository.exists), ("url_for", repository.url_for)):
            try:
                got = call(bad)
            except self.refusal_errors:
                continue
            raise AssertionError(f"{name}({bad!r}) returned {got!r} instead of raising")

    def test_empty_file_round_trips(self, repository: Repository, work: Path) -> None:
        self._round_trip(repository, work, b"")

    def test_large_file_round_trips(self, repository: Repository, work: Path) -> None:
        size = self.large_file_size
        rng = random.Random(size)
        source = _new_dir(work, "src-") / "large.bin"
        digest = hashlib.sha256()
        with open(source, "wb") as f:
            left = size
            while left:
                block = rng.randbytes(min(left, 1 << 20))
                f.write(block)
                digest.update(block)
                left -= len(block)
        up = dict(repository.upload_file(source))
        assert (up["sha256"], up["size"]) == (digest.hexdigest(), size), (
            f"upload of a {size}-byte file with sha256 {digest.hexdigest()} returned {up!r}"
        )
        dest = _new_dir(work, "dl-") / "large.bin"
        assert tuple(repository.download_file(up["file"], dest)) == (200, dest)
        back = hashlib.sha256()
        with open(dest, "rb") as f:
            while block := f.read(1 << 20):
                back.update(block)
        got_size = dest.stat().st_size
        assert (back.hexdigest(), got_size) == (digest.hexdigest(), size), (
            f"download of digest {up['sha256']} gave {got_size} bytes with sha256 "
            f"{back.hexdigest()}, not the {size} bytes uploaded"
        )

    def test_bytes_round_trip_as_files_do(self, repository: Repository, work: Path) -> None:
        """``upload_bytes`` stores what ``upload_file`` would, ``read_bytes`` gives back what
        ``download_file`` would, and a file over ``max_bytes`` is refused."""
        for data in (b"", b"parameters " * 300):
            up = dict(repository.upload_bytes(data))
            self._check_upload(repository, up, data)
            self._download(repository, work, up["file"], data)
            got = repository.read_bytes(up["file"], max_bytes=len(data))
            assert got == data, (
                f"read_bytes of digest {up['sha256']} gave {_show(got)}, not {_show(data)}"
            )
        for up in (
            self._upload(repository, work, b"x" * 100),
            dict(repository.upload_bytes(b"y" * 100)),  # a repository may keep these at hand
        ):
            repository.read_bytes(up["file"], max_bytes=100)
            try:
                got = repository.read_bytes(up["file"], max_bytes=99)
            except FileTooLarge:
                continue
            raise AssertionError(
                f"read_bytes(max_bytes=99) of a 100-byte file gave {_show(got)} instead of "
                "raising FileTooLarge"
            )

    @pytest.mark.parametrize("kind", _TAMPERINGS)
    def test_tampered_stored_file_is_refused_by_read_bytes(
        self, repository: Repository, work: Path, kind: str
    ) -> None:
        data = b"good parameters " * 1000
        up = self._upload(repository, work, data)
        bad = _tampered(kind, data, b"the bytes of another file")
        self.replace_stored_bytes(repository, up["sha256"], bad)
        try:
            got = repository.read_bytes(up["file"], max_bytes=len(data) * 2)
        except DigestMismatch:
            return
        raise AssertionError(
            f"read_bytes of digest {up['sha256']}, whose stored bytes were tampered with "
            f"({kind}: now {_show(bad)}), gave {_show(got)} instead of raising DigestMismatch"
        )

    def test_any_bytes_round_trip(self, repository: Repository, work: Path) -> None:
        # Settings are built when the test runs, so the loaded hypothesis profile applies.
        @self._bounded()
        @given(data=st.binary(max_size=self.max_example_bytes))
        def round_trip(data: bytes) -> None:
            self._round_trip(repository, work, data)

        round_trip()

    def test_many_files_each_give_their_own_bytes(self, repository: Repository, work: Path) -> None:
        @self._bounded()
        @given(contents=st.lists(st.binary(max_size=64), min_size=1, max_size=6, unique=True))
        def many(contents: list[bytes]) -> None:
            stored: dict[str, bytes] = {}
            urls: dict[str, str] = {}
            for data in contents:
                up = self._upload(repository, work, data)
                self._check_upload(repository, up, data)
                stored[up["sha256"]] = data
                urls[up["sha256"]] = up["file"]
            for digest, data in stored.items():
                assert repository.exists(digest), f"exists({digest}) after its upload"
                self._download(repository, work, urls[digest], data, stored)

        many()
