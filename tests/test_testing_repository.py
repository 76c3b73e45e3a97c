"""RepositoryContract catches a broken repository, and says which digest got which bytes.

``_ServesLatest`` is a LocalRepository that skips the digest check and hands out the most
recent upload whatever digest is asked for: its uploads, ``exists`` and URLs are right, so the
scenarios about those pass, and every scenario that downloads a file other than the latest one
must fail with a message naming the digest asked for and the bytes it was given.
"""

from __future__ import annotations

import hashlib
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedsm.repository import FileNotInRepository, LocalRepository, Repository, Uploaded
from fedsm.testing import RepositoryContract
from fedsm.testing.repository import RepositoryContract as DirectRepositoryContract


class _ServesLatest(LocalRepository):
    """Broken on purpose: download_file serves the latest upload, unchecked."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.latest: str | None = None

    def upload_file(self, path: str | Path) -> Uploaded:
        up = super().upload_file(path)
        self.latest = up["sha256"]
        return up

    def download_file(self, url: str, filename: str | Path) -> tuple[int, Path]:
        self.digest_of_url(url)  # URLs are still validated: only the content is wrong
        if self.latest is None:
            raise FileNotInRepository("nothing uploaded yet")
        dest = Path(filename)
        shutil.copyfile(self.root / self.latest, dest)
        return 200, dest


class _BrokenContract(RepositoryContract):
    # Not collected: the methods are run by hand below, each expected to pass or fail.
    def make_repository(self, tmp_path: Path) -> Repository:
        return _ServesLatest(tmp_path)

    def replace_stored_bytes(self, repository: Repository, digest: str, data: bytes) -> None:
        assert isinstance(repository, LocalRepository)
        (repository.root / digest).write_bytes(data)

    def stored_digests(self, repository: Repository) -> list[str]:
        assert isinstance(repository, LocalRepository)
        return sorted(p.name for p in repository.root.iterdir() if p.is_file())


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def contract() -> _BrokenContract:
    return _BrokenContract()


@pytest.fixture
def broken(tmp_path: Path) -> Iterator[Repository]:
    root = tmp_path / "repository"
    root.mkdir()
    yield _ServesLatest(root)


@pytest.fixture
def work(tmp_path: Path) -> Path:
    path = tmp_path / "work"
    path.mkdir()
    return path


def test_the_contract_is_public_and_not_collected_itself() -> None:
    assert RepositoryContract is DirectRepositoryContract
    assert RepositoryContract.__test__ is False
    assert _BrokenContract.__test__ is False


def test_without_the_tampering_hook_the_integrity_scenarios_skip(
    broken: Repository, work: Path
) -> None:
    class NoHook(RepositoryContract):
        def make_repository(self, tmp_path: Path) -> Repository:
            return LocalRepository(tmp_path)

    with pytest.raises(pytest.skip.Exception, match="replace_stored_bytes"):
        NoHook().test_tampered_stored_file_is_refused(broken, work, "truncated")


def test_wrong_bytes_for_a_digest_are_reported_with_both_digests(
    contract: _BrokenContract, broken: Repository, work: Path
) -> None:
    with pytest.raises(AssertionError) as caught:
        contract.test_download_gives_each_digest_its_own_bytes(broken, work)
    first, last = _sha(b"first file"), _sha(bytes(range(256)) * 40)
    message = str(caught.value)
    assert f"download of digest {first} gave 10240 bytes" in message
    assert "not the 10 bytes b'first file' (sha256" in message
    assert f"those are the bytes of {last}, another stored file" in message


def test_a_never_uploaded_digest_served_anyway_is_reported(
    contract: _BrokenContract, broken: Repository, work: Path
) -> None:
    with pytest.raises(AssertionError) as caught:
        contract.test_never_uploaded_digest_is_file_not_in_repository(broken, work)
    assert str(caught.value) == (
        f"download of digest {_sha(b'never uploaded')}, never uploaded, gave 25 bytes "
        f"b'some other file is stored' (sha256 {_sha(b'some other file is stored')[:16]}...) "
        "instead of raising FileNotInRepository"
    )


def test_the_first_of_two_uploads_of_same_content_served_wrong_is_reported(
    contract: _BrokenContract, broken: Repository, work: Path
) -> None:
    with pytest.raises(AssertionError) as caught:
        contract.test_same_content_uploaded_twice_is_stored_once(broken, work)
    assert str(caught.value).endswith(
        f"uploaded under it: those are the bytes of {_sha(b'other bytes')}, another stored file"
    )


@pytest.mark.parametrize("kind", ["flipped byte", "truncated", "another stored file"])
def test_tampered_bytes_handed_out_are_reported(
    contract: _BrokenContract, broken: Repository, work: Path, kind: str
) -> None:
    with pytest.raises(AssertionError) as caught:
        contract.test_tampered_stored_file_is_refused(broken, work, kind)
    digest = _sha(b"good parameters " * 1000)
    message = str(caught.value)
    assert message.startswith(
        f"download of digest {digest}, whose stored bytes were tampered with ({kind}: now "
    )
    assert message.endswith(
        "handed out 25 bytes b'the bytes of another file' "
        f"(sha256 {_sha(b'the bytes of another file')[:16]}...) instead of raising DigestMismatch"
    )


def test_hypothesis_shrinks_to_a_two_file_counterexample(
    contract: _BrokenContract, broken: Repository, work: Path
) -> None:
    with pytest.raises(AssertionError) as caught:
        contract.test_many_files_each_give_their_own_bytes(broken, work)
    message = str(caught.value)
    match = re.fullmatch(
        r"download of digest ([0-9a-f]{64}) gave (\d+ bytes? .*) \(sha256 [0-9a-f]{16}\.\.\.\), "
        r"not the (\d+ bytes? .*) \(sha256 [0-9a-f]{16}\.\.\.\) uploaded under it: "
        r"those are the bytes of ([0-9a-f]{64}), another stored file",
        message,
    )
    assert match, message
    assert match.group(1) != match.group(4)
    # The falsifying example hypothesis prints is the shrunk one: two tiny files.
    notes = "\n".join(getattr(caught.value, "__notes__", []))
    assert "contents=[b'', b'\\x00']" in notes, notes


@pytest.mark.parametrize(
    "scenario",
    [
        "test_upload_returns_file_sha256_and_size",
        "test_exists_is_false_before_and_true_after_upload",
        "test_url_for_and_digest_of_url_are_inverse",
        "test_urls_that_do_not_name_a_stored_digest_are_refused",
        "test_empty_file_round_trips",
        "test_any_bytes_round_trip",
    ],
)
def test_scenarios_the_broken_repository_honours_still_pass(
    contract: _BrokenContract, broken: Repository, work: Path, scenario: str
) -> None:
    # Its uploads, exists() and URLs are right, and a single file is always the latest one.
    getattr(contract, scenario)(broken, work)


def test_a_correct_local_repository_passes_the_scenarios_the_broken_one_fails(
    tmp_path: Path, work: Path
) -> None:
    contract = _BrokenContract()
    for i, name in enumerate(
        [
            "test_download_gives_each_digest_its_own_bytes",
            "test_never_uploaded_digest_is_file_not_in_repository",
            "test_many_files_each_give_their_own_bytes",
        ]
    ):
        getattr(contract, name)(LocalRepository(tmp_path / f"good-{i}"), work)
    contract.test_tampered_stored_file_is_refused(
        LocalRepository(tmp_path / "good-t"), work, "another stored file"
    )
