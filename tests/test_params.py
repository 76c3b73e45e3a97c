"""Params files: safetensors round trip, atomic write + hash, and refusal of anything else;
and the sha256 helpers of :mod:`fedsm.digests` they are hashed with."""

from __future__ import annotations

import hashlib
import pickle

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fedsm.core.fields import HEX64_RE, make_checkers
from fedsm.digests import is_sha256, sha256_file, sha256_hex
from fedsm.errors import FedsmError
from fedsm.training.params import ParamsFileError, load_params, save_params


def _params() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return {
        "layer.weight": torch.randn(4, 3, generator=gen),
        "layer.bias": torch.randn(4, generator=gen),
        "bn.num_batches_tracked": torch.tensor(7, dtype=torch.int64),
        "half": torch.randn(2, 2, generator=gen).to(torch.bfloat16),
        "double": torch.randn(5, generator=gen, dtype=torch.float64),
    }


def test_round_trip_preserves_names_shapes_dtypes_and_values(tmp_path):
    params = _params()
    path = tmp_path / "p.safetensors"
    sha = save_params(path, params)
    loaded = load_params(path, like=params)
    assert list(loaded) == sorted(params)
    for name, value in params.items():
        assert loaded[name].dtype == value.dtype
        assert torch.equal(loaded[name], value)
    assert sha == sha256_file(path) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_same_tensors_give_same_bytes_whatever_insertion_order(tmp_path):
    params = _params()
    reordered = dict(reversed(list(params.items())))
    sha_a = save_params(tmp_path / "a", params)
    sha_b = save_params(tmp_path / "b", reordered)
    assert sha_a == sha_b
    assert (tmp_path / "a").read_bytes() == (tmp_path / "b").read_bytes()


def test_views_and_shared_storage_are_saved_as_private_copies(tmp_path):
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    params = {"t": base.t(), "same": base, "row": base[1]}
    save_params(tmp_path / "v", params)
    loaded = load_params(tmp_path / "v")
    assert torch.equal(loaded["t"], base.t())
    assert torch.equal(loaded["row"], base[1])


def test_write_is_atomic_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "p.safetensors"
    save_params(path, {"a": torch.zeros(3)})
    save_params(path, {"a": torch.ones(3)})
    assert [p.name for p in tmp_path.iterdir()] == ["p.safetensors"]
    assert torch.equal(load_params(path)["a"], torch.ones(3))


def test_write_into_missing_directory_is_a_typed_error(tmp_path):
    with pytest.raises(ParamsFileError, match="cannot create"):
        save_params(tmp_path / "missing" / "p.safetensors", {"a": torch.zeros(1)})


def test_non_tensor_value_is_refused(tmp_path):
    with pytest.raises(ParamsFileError, match="not a tensor"):
        save_params(tmp_path / "p", {"a": [1.0, 2.0]})  # type: ignore[dict-item]


@pytest.mark.parametrize("how", ["pickle", "torch_save"])
def test_pickle_payload_is_refused_without_being_unpickled(tmp_path, how):
    marker = tmp_path / "executed"

    class Boom:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.safetensors"
    if how == "pickle":
        path.write_bytes(pickle.dumps({"w": Boom()}))
    else:
        torch.save({"w": torch.zeros(2)}, path)
    with pytest.raises(ParamsFileError) as info:
        load_params(path)
    assert isinstance(info.value, FedsmError) and isinstance(info.value, ValueError)
    assert not marker.exists()


def test_truncated_file_is_refused_at_every_cut(tmp_path):
    path = tmp_path / "p.safetensors"
    save_params(path, _params())
    data = path.read_bytes()
    cut_path = tmp_path / "cut.safetensors"
    for cut in list(range(0, 40)) + list(range(40, len(data), 7)):
        cut_path.write_bytes(data[:cut])
        with pytest.raises(ParamsFileError):
            load_params(cut_path)


@given(st.binary(max_size=200))
def test_random_bytes_never_load_as_params_or_crash(tmp_path_factory, blob):
    path = tmp_path_factory.mktemp("blob") / "x.safetensors"
    path.write_bytes(blob)
    with pytest.raises(ParamsFileError):
        load_params(path)


def test_wrong_shape_is_refused(tmp_path):
    params = _params()
    path = tmp_path / "p"
    save_params(path, {**params, "layer.weight": torch.zeros(3, 4)})
    with pytest.raises(ParamsFileError, match=r"layer.weight.*shape \[3, 4\].*\[4, 3\]"):
        load_params(path, like=params)


def test_wrong_dtype_is_refused(tmp_path):
    params = _params()
    path = tmp_path / "p"
    save_params(path, {**params, "layer.bias": params["layer.bias"].double()})
    with pytest.raises(ParamsFileError, match=r"layer.bias.*dtype torch.float64"):
        load_params(path, like=params)


def test_missing_and_unexpected_names_are_refused(tmp_path):
    params = _params()
    renamed = dict(params)
    renamed["extra"] = renamed.pop("layer.bias")
    save_params(tmp_path / "p", renamed)
    with pytest.raises(ParamsFileError, match=r"missing \['layer.bias'\].*unexpected \['extra'\]"):
        load_params(tmp_path / "p", like=params)


def test_oversized_file_is_refused_before_reading(tmp_path):
    save_params(tmp_path / "p", {"a": torch.zeros(1000)})
    with pytest.raises(ParamsFileError, match="over the limit"):
        load_params(tmp_path / "p", max_bytes=100)


def test_missing_file_is_a_typed_error(tmp_path):
    with pytest.raises(ParamsFileError, match="cannot read"):
        load_params(tmp_path / "nope")
    with pytest.raises(FileNotFoundError):
        sha256_file(tmp_path / "nope")


def test_repeated_saves_are_byte_identical(tmp_path):
    # Guards the header: safetensors stores metadata in a hash map whose order can vary.
    params = _params()
    digests = {save_params(tmp_path / f"p{i}", params) for i in range(30)}
    assert len(digests) == 1


# --------------------------------------------------------------------------- fedsm.digests


@given(st.binary(max_size=300), st.integers(min_value=1, max_value=64))
def test_sha256_file_reads_in_chunks_and_agrees_with_sha256_hex(
    tmp_path_factory: pytest.TempPathFactory, data: bytes, chunk_size: int
) -> None:
    path = tmp_path_factory.mktemp("digest") / "f"
    path.write_bytes(data)
    expected = hashlib.sha256(data).hexdigest()
    assert sha256_file(path, chunk_size=chunk_size) == sha256_file(str(path)) == expected
    assert sha256_hex(data) == sha256_hex(bytearray(data)) == sha256_hex(memoryview(data))
    assert sha256_hex(data) == expected


@given(st.text(max_size=40))
def test_sha256_hex_of_text_hashes_its_utf8_bytes(text: str) -> None:
    assert sha256_hex(text) == hashlib.sha256(text.encode("utf-8")).hexdigest()
    assert is_sha256(sha256_hex(text))


class _Str(str):
    pass


_WIRE_CHECK = make_checkers(
    lambda message, field: ValueError(message), max_str=99, max_text=99, max_items=9, max_depth=2
)["sha256"]


def _wire_accepts(value: object) -> bool:
    try:
        _WIRE_CHECK("f", value)
    except ValueError:
        return False
    return True


_HEX = "0123456789abcdef"


@given(
    st.one_of(
        st.text(max_size=70),
        st.text(alphabet=_HEX, min_size=63, max_size=65),
        st.text(alphabet=_HEX + "ABCDEF\n ", min_size=64, max_size=65),
    )
)
def test_is_sha256_agrees_with_the_wire_codecs(text: str) -> None:
    assert is_sha256(text) == _wire_accepts(text) == (HEX64_RE.fullmatch(text) is not None)


def test_is_sha256_takes_the_whole_string_only() -> None:
    digest = sha256_hex(b"x")
    assert is_sha256(digest)
    for bad in (digest + "\n", "\n" + digest, digest.upper(), digest[:-1], digest + "0", " " * 64):
        assert not is_sha256(bad) and not _wire_accepts(bad)
    for not_text in (None, 0, digest.encode(), _Str(digest)):
        assert not is_sha256(not_text) and not _wire_accepts(not_text)
