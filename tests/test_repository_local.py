"""LocalRepository (the embedded default) and open_repository: round trips, digest checks on
tampered files, atomic writes, and refusal of anything that is not one of its own URLs."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedsm.errors import ConfigurationError, FedsmError
from fedsm.repository import (
    DigestMismatch,
    FileNotInRepository,
    HttpRepository,
    InvalidDigest,
    InvalidRepositoryUrl,
    LocalRepository,
    _files,
    open_repository,
)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _stored_files(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_file())


def test_round_trip_returns_url_digest_size_and_identical_bytes(tmp_path: Path) -> None:
    data = os.urandom(300_000)
    repo = LocalRepository(tmp_path / "repo")
    up = repo.upload_file(_write(tmp_path / "plan.py", data))
    digest = hashlib.sha256(data).hexdigest()
    assert up == {"file": repo.url_for(digest), "sha256": digest, "size": len(data)}
    assert up["file"] == f"file://{(tmp_path / 'repo').resolve()}/{digest}"
    assert repo.exists(digest)
    status, path = repo.download_file(up["file"], tmp_path / "out" / "copy.bin")
    assert status == 200
    assert path == tmp_path / "out" / "copy.bin"
    assert path.read_bytes() == data


def test_same_content_is_stored_once(tmp_path: Path) -> None:
    repo = LocalRepository(tmp_path / "repo")
    first = repo.upload_file(_write(tmp_path / "a", b"same bytes"))
    second = repo.upload_file(_write(tmp_path / "b", b"same bytes"))
    other = repo.upload_file(_write(tmp_path / "c", b"other bytes"))
    assert first == second
    assert other["sha256"] != first["sha256"]
    assert _stored_files(repo.root) == sorted([first["sha256"], other["sha256"]])
    assert list((repo.root / ".tmp").iterdir()) == []


def test_empty_file_round_trips(tmp_path: Path) -> None:
    repo = LocalRepository(tmp_path / "repo")
    up = repo.upload_file(_write(tmp_path / "empty", b""))
    assert up["sha256"] == hashlib.sha256(b"").hexdigest() and up["size"] == 0
    _, path = repo.download_file(up["file"], tmp_path / "empty.out")
    assert path.read_bytes() == b""


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


def test_tampered_stored_file_is_refused_and_destination_untouched(tmp_path: Path) -> None:
    repo = LocalRepository(tmp_path / "repo")
    up = repo.upload_file(_write(tmp_path / "p", b"good parameters" * 1000))
    stored = repo.root / up["sha256"]
    raw = bytearray(stored.read_bytes())
    raw[100] ^= 0x01
    stored.write_bytes(bytes(raw))
    dest = _write(tmp_path / "dest.bin", b"previous content")
    with pytest.raises(DigestMismatch, match=up["sha256"]):
        repo.download_file(up["file"], dest)
    assert dest.read_bytes() == b"previous content"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".part-")] == []


def test_truncated_stored_file_is_refused(tmp_path: Path) -> None:
    repo = LocalRepository(tmp_path / "repo")
    up = repo.upload_file(_write(tmp_path / "p", os.urandom(5000)))
    stored = repo.root / up["sha256"]
    stored.write_bytes(stored.read_bytes()[:4000])
    with pytest.raises(DigestMismatch):
        repo.download_file(up["file"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


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


def test_missing_digest_is_file_not_in_repository(tmp_path: Path) -> None:
    repo = LocalRepository(tmp_path / "repo")
    digest = hashlib.sha256(b"never uploaded").hexdigest()
    assert not repo.exists(digest)
    with pytest.raises(FileNotInRepository, match=digest):
        repo.download_file(repo.url_for(digest), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _urls_not_of(repo: LocalRepository, tmp_path: Path, digest: str) -> list[str]:
    root_uri = repo.root.as_uri()
    elsewhere = LocalRepository(tmp_path / "elsewhere")
    return [
        f"{root_uri}/../{digest}",  # the parent directory
        f"{root_uri}/%2e%2e/{digest}",
        f"{root_uri}/sub/{digest}",
        f"{root_uri}/{digest.upper()}",
        f"{root_uri}/{digest[:-1]}",
        f"{root_uri}/../../etc/passwd",
        "file:///etc/passwd",
        f"file://otherhost{repo.root}/{digest}",
        f"{root_uri}/{digest}?x=1",
        elsewhere.url_for(digest),
        f"http://127.0.0.1:8844/files/{digest}",
        digest,
    ]


def test_urls_of_other_places_are_refused(tmp_path: Path) -> None:
    repo = LocalRepository(tmp_path / "repo")
    up = repo.upload_file(_write(tmp_path / "p", b"secret"))
    for url in _urls_not_of(repo, tmp_path, up["sha256"]):
        with pytest.raises(InvalidRepositoryUrl):
            repo.download_file(url, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_http_repository_refuses_local_urls(tmp_path: Path) -> None:
    local = LocalRepository(tmp_path / "repo")
    remote = HttpRepository("http://127.0.0.1:8844")
    url = local.url_for("a" * 64)
    with pytest.raises(InvalidRepositoryUrl, match="127.0.0.1:8844"):
        remote.download_file(url, tmp_path / "out")


@pytest.mark.parametrize(
    "bad", ["../etc/passwd", "%2e%2e", "A" * 64, "a" * 63, "a" * 65, "g" * 64, "", "a" * 63 + "/"]
)
def test_ids_that_are_not_digests_never_reach_the_file_system(tmp_path: Path, bad: str) -> None:
    repo = LocalRepository(tmp_path / "repo")
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


@given(st.binary(max_size=4096))
def test_any_content_round_trips(tmp_path_factory: pytest.TempPathFactory, data: bytes) -> None:
    base = tmp_path_factory.mktemp("rt")
    repo = LocalRepository(base / "repo")
    up = repo.upload_file(_write(base / "in", data))
    assert up["sha256"] == hashlib.sha256(data).hexdigest()
    _, path = repo.download_file(up["file"], base / "out")
    assert path.read_bytes() == data


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
