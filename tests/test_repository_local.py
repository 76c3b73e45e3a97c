"""LocalRepository (the embedded default) and open_repository.

The scenarios every repository must pass (round trips, idempotent uploads, tampered files
refused, URLs and ids that are not digests refused, any bytes) run from
:class:`fedsm.testing.RepositoryContract`; this module adds what is particular to a directory:
the ``file://`` URL form, download_dir, atomic writes, roots with odd characters, and URLs of
other directories or hosts."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedsm.errors import ConfigurationError, FedsmError
from fedsm.repository import (
    HttpRepository,
    InvalidDigest,
    InvalidRepositoryUrl,
    LocalRepository,
    Repository,
    _files,
    open_repository,
)
from fedsm.testing import RepositoryContract


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _stored_files(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_file())


class TestLocalRepositoryContract(RepositoryContract):
    """The shared repository scenarios, on a LocalRepository."""

    __test__ = True

    def make_repository(self, tmp_path: Path) -> LocalRepository:
        return LocalRepository(tmp_path)

    def replace_stored_bytes(self, repository: Repository, digest: str, data: bytes) -> None:
        assert isinstance(repository, LocalRepository)
        (repository.root / digest).write_bytes(data)

    def stored_digests(self, repository: Repository) -> list[str]:
        assert isinstance(repository, LocalRepository)
        return _stored_files(repository.root)


def test_url_is_the_file_uri_of_the_stored_file(tmp_path: Path) -> None:
    data = b"plan bytes"
    repo = LocalRepository(tmp_path / "repo")
    up = repo.upload_file(_write(tmp_path / "plan.py", data))
    digest = hashlib.sha256(data).hexdigest()
    assert up["file"] == f"file://{(tmp_path / 'repo').resolve()}/{digest}"
    assert (repo.root / digest).read_bytes() == data
    repo.upload_file(_write(tmp_path / "again.py", data))
    assert _stored_files(repo.root) == [digest]
    assert list((repo.root / ".tmp").iterdir()) == []  # no temporary left behind


def test_relative_download_names_go_to_download_dir(tmp_path: Path) -> None:
    repo = LocalRepository(tmp_path / "repo", download_dir=tmp_path / "downloads")
    up = repo.upload_file(_write(tmp_path / "p", b"params"))
    status, path = repo.download_file(up["file"], "node_params_1.pt")
    assert (status, path) == (200, tmp_path / "downloads" / "node_params_1.pt")
    assert path.read_bytes() == b"params"


def test_root_with_spaces_and_percent_signs_round_trips(tmp_path: Path) -> None:
    repo = LocalRepository(tmp_path / "my repo %41 #1")
    up = repo.upload_file(_write(tmp_path / "f", b"x" * 10))
    assert " " not in up["file"]  # percent-encoded, so the URL is one token
    _, path = repo.download_file(up["file"], tmp_path / "f.out")
    assert path.read_bytes() == b"x" * 10
    # The same directory opened from the URL's own root finds the file.
    again = open_repository(up["file"].rsplit("/", 1)[0])
    assert isinstance(again, LocalRepository) and again.root == repo.root
    assert again.exists(up["sha256"])


def test_failed_write_leaves_nothing_under_a_final_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = LocalRepository(tmp_path / "repo")
    real_fsync = os.fsync

    def failing_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device (simulated)")

    monkeypatch.setattr(_files.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="simulated"):
        repo.upload_file(_write(tmp_path / "p", b"never stored"))
    monkeypatch.setattr(_files.os, "fsync", real_fsync)
    assert _stored_files(repo.root) == []
    assert list((repo.root / ".tmp").iterdir()) == []
    assert not repo.exists(hashlib.sha256(b"never stored").hexdigest())


def test_unreadable_source_propagates_and_stores_nothing(tmp_path: Path) -> None:
    repo = LocalRepository(tmp_path / "repo")
    with pytest.raises(FileNotFoundError):
        repo.upload_file(tmp_path / "does-not-exist")
    assert _stored_files(repo.root) == [] and list((repo.root / ".tmp").iterdir()) == []


def test_urls_of_other_directories_and_hosts_are_refused(tmp_path: Path) -> None:
    repo = LocalRepository(tmp_path / "repo")
    up = repo.upload_file(_write(tmp_path / "p", b"secret"))
    digest = up["sha256"]
    elsewhere = LocalRepository(tmp_path / "elsewhere")
    _write(elsewhere.root / digest, b"secret")  # even holding the same bytes
    for url in (
        elsewhere.url_for(digest),
        f"file://otherhost{repo.root}/{digest}",
        f"file://localhost{repo.root}/../repo-sibling/{digest}",
        f"http://127.0.0.1:8844/files/{digest}",
    ):
        with pytest.raises(InvalidRepositoryUrl):
            repo.download_file(url, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # file://localhost/<root>/<digest> is the same file as file:///<root>/<digest>.
    assert repo.digest_of_url(f"file://localhost{repo.root}/{digest}") == digest


def test_http_repository_refuses_local_urls(tmp_path: Path) -> None:
    local = LocalRepository(tmp_path / "repo")
    remote = HttpRepository("http://127.0.0.1:8844")
    url = local.url_for("a" * 64)
    with pytest.raises(InvalidRepositoryUrl, match="127.0.0.1:8844"):
        remote.download_file(url, tmp_path / "out")


def test_ids_that_are_not_digests_raise_invalid_digest(tmp_path: Path) -> None:
    repo = LocalRepository(tmp_path / "repo")
    for bad in ("../etc/passwd", "A" * 64, ""):
        with pytest.raises(InvalidDigest):
            repo.exists(bad)
        with pytest.raises(InvalidDigest):
            repo.url_for(bad)
    assert issubclass(InvalidDigest, FedsmError) and issubclass(InvalidDigest, ValueError)


@given(st.text(max_size=80))
def test_check_digest_accepts_exactly_lowercase_sha256_hex(text: str) -> None:
    canonical = len(text) == 64 and all(c in "0123456789abcdef" for c in text)
    if canonical:
        assert _files.check_digest(text) == text
    else:
        with pytest.raises(InvalidDigest):
            _files.check_digest(text)


def test_open_repository_picks_the_backend(tmp_path: Path) -> None:
    plain = open_repository(str(tmp_path / "plain"))
    assert isinstance(plain, LocalRepository) and plain.root == (tmp_path / "plain").resolve()
    from_uri = open_repository((tmp_path / "uri").as_uri())
    assert isinstance(from_uri, LocalRepository) and from_uri.root == (tmp_path / "uri").resolve()
    http = open_repository("http://127.0.0.1:9/", token="t")
    assert isinstance(http, HttpRepository)
    assert http.base_url == "http://127.0.0.1:9" and http.token == "t"
    assert isinstance(open_repository("https://repo.example.org/fedsm"), HttpRepository)
    for bad in ("ftp://host/dir", "s3://bucket/x", "file://otherhost/dir"):
        with pytest.raises(ConfigurationError):
            open_repository(bad)
