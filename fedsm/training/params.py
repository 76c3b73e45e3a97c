"""Parameter files: safetensors, written atomically, hashed while written, checked when read.

Parameters rest in the repository and travel between researcher and nodes, so a params file
is untrusted input: it is parsed with safetensors (a header of names/dtypes/shapes and raw
bytes, nothing executable), never with pickle or ``torch.load``. When the caller knows what
the model expects (``like``), names, shapes and dtypes must match exactly.

Writes go to a temporary file in the destination directory, are fsync'ed, then renamed over
the destination, so a crash never leaves a half-written file under the final name. The
sha256 returned is computed over the exact bytes written (:func:`fedsm.digests.sha256_hex`).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fedsm.digests import sha256_hex
from fedsm.errors import FedsmError

__all__ = [
    "MAX_PARAMS_BYTES",
    "ParamsFileError",
    "load_params",
    "params_from_bytes",
    "params_to_bytes",
    "save_params",
]

MAX_PARAMS_BYTES = 2 * 1024**3
"""Largest params file ``load_params`` reads by default (2 GiB)."""

# One key only: safetensors keeps metadata in a Rust HashMap, whose iteration order (and so
# the header bytes) varies between calls when there are several keys.
_METADATA = {"format": "pt"}


class ParamsFileError(FedsmError, ValueError):
    """A params file cannot be written, is not valid safetensors, or does not fit the model."""


def _canonical(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if not isinstance(tensors, Mapping):
        raise ParamsFileError(f"params must be a mapping of name -> tensor, got {type(tensors)}")
    out: dict[str, torch.Tensor] = {}
    for name in sorted(tensors):
        value = tensors[name]
        if not isinstance(name, str) or not name:
            raise ParamsFileError(f"parameter names must be non-empty strings, got {name!r}")
        if not isinstance(value, torch.Tensor):
            raise ParamsFileError(f"parameter {name!r} is a {type(value).__name__}, not a tensor")
        # A private contiguous CPU copy: safetensors refuses shared storage (tied weights,
        # views), and the bytes written must not depend on how the model laid them out.
        out[name] = value.detach().to("cpu").contiguous().clone()
    return out


def params_to_bytes(tensors: Mapping[str, torch.Tensor], *, what: str = "parameters") -> bytes:
    """The safetensors bytes of ``tensors``: what :func:`save_params` writes, in memory.

    The same tensors always give the same bytes (names sorted, fixed metadata).

    Raises
    ------
    ParamsFileError
        A value is not a tensor (the message says which).
    """
    try:
        return st_save(_canonical(tensors), metadata=_METADATA)
    except (SafetensorError, ValueError, TypeError, RuntimeError) as exc:
        raise ParamsFileError(f"cannot serialise {what}: {exc}") from exc


def save_params(
    path: str | Path, tensors: Mapping[str, torch.Tensor], *, durable: bool = True
) -> str:
    """Write ``tensors`` to ``path`` as safetensors, atomically; return the file's sha256 (hex).

    The same tensors always give the same bytes (names sorted, fixed metadata).
    ``durable=False`` skips the fsyncs (the rename stays atomic): for a scratch file that
    something else makes durable, such as a node's output, which its upload stores durably.

    Raises
    ------
    ParamsFileError
        A value is not a tensor, or the file cannot be written (the message says why).
    """
    path = Path(path)
    payload = params_to_bytes(tensors, what=f"parameters for {str(path)!r}")
    directory = path.parent if str(path.parent) else Path(".")
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise ParamsFileError(f"cannot create a file in {str(directory)!r}: {exc}") from exc
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except OSError as exc:
        try:
            os.unlink(tmp_name)
        except OSError:
            pass
        raise ParamsFileError(f"cannot write params file {str(path)!r}: {exc}") from exc
    if durable:
        _fsync_directory(directory)
    return sha256_hex(payload)


def _fsync_directory(directory: Path) -> None:
    """Make the rename durable; best effort where directories cannot be opened (Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_params(
    path: str | Path,
    like: Mapping[str, torch.Tensor] | None = None,
    *,
    max_bytes: int = MAX_PARAMS_BYTES,
) -> dict[str, torch.Tensor]:
    """Read a safetensors params file; with ``like``, check names, shapes and dtypes.

    Parameters
    ----------
    path
        The file (possibly received from the network: it is never unpickled).
    like
        The tensors the caller expects (typically the model's ``state_dict()``).
    max_bytes
        Refuse larger files before reading them.

    Returns
    -------
    dict[str, torch.Tensor]
        Name -> CPU tensor, in sorted name order.

    Raises
    ------
    ParamsFileError
        Missing/oversized/truncated file, anything that is not safetensors (e.g. a pickle),
        or a mismatch with ``like`` (the message names the offending parameters).
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise ParamsFileError(
                f"params file {str(path)!r} is {size} bytes, over the limit of {max_bytes}"
            )
        raw = path.read_bytes()
    except OSError as exc:
        raise ParamsFileError(f"cannot read params file {str(path)!r}: {exc}") from exc
    return params_from_bytes(raw, like, source=f"params file {str(path)!r}")


def params_from_bytes(
    raw: bytes,
    like: Mapping[str, torch.Tensor] | None = None,
    *,
    source: str = "parameters",
) -> dict[str, torch.Tensor]:
    """Parse safetensors bytes as :func:`load_params` parses a file (never unpickled); with
    ``like``, check names, shapes and dtypes. ``source`` names the bytes in errors.

    Raises
    ------
    ParamsFileError
        Truncated bytes, anything that is not safetensors, or a mismatch with ``like``.
    """
    if len(raw) < 8:
        raise ParamsFileError(f"{source} is truncated ({len(raw)} bytes)")
    header_len = int.from_bytes(raw[:8], "little")
    if header_len > len(raw) - 8 or raw[8:9] != b"{":
        raise ParamsFileError(
            f"{source} is not a safetensors file (bad header: truncated, or "
            "another format such as a pickle); refusing to parse it"
        )
    try:
        tensors = st_load(raw)
    except (SafetensorError, ValueError, RuntimeError, OverflowError) as exc:
        raise ParamsFileError(f"{source} is not valid safetensors: {exc}") from exc
    result = {name: tensors[name] for name in sorted(tensors)}
    if like is not None:
        check_like(result, like, source=source)
    return result


def check_like(
    tensors: Mapping[str, torch.Tensor], like: Mapping[str, torch.Tensor], *, source: str
) -> None:
    """Raise :class:`ParamsFileError` unless ``tensors`` has ``like``'s names, shapes, dtypes."""
    missing = sorted(set(like) - set(tensors))
    extra = sorted(set(tensors) - set(like))
    if missing or extra:
        raise ParamsFileError(
            f"{source}: parameter names do not match the model (missing {missing}, "
            f"unexpected {extra})"
        )
    for name in sorted(like):
        got, want = tensors[name], like[name]
        if tuple(got.shape) != tuple(want.shape):
            raise ParamsFileError(
                f"{source}: parameter {name!r} has shape {list(got.shape)}, the model expects "
                f"{list(want.shape)}"
            )
        if got.dtype != want.dtype:
            raise ParamsFileError(
                f"{source}: parameter {name!r} has dtype {got.dtype}, the model expects "
                f"{want.dtype}"
            )
