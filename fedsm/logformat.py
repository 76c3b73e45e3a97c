"""The byte format of the event log: header, record frames, and finding the next frame.

Split from :mod:`fedsm.log` so the writer, the read-only scanner and the verifier share one
definition of what a valid frame is. See :mod:`fedsm.log` for the layout and the reasons.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from typing import Any

import msgpack

__all__ = [
    "FORMAT_VERSION",
    "HEADER_SIZE",
    "MAGIC",
    "MAX_RECORD_BYTES",
    "FrameError",
    "check_header",
    "encode_frame",
    "find_next_frame",
    "make_header",
    "read_frame",
]

MAGIC = b"FEDSMLOG"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<8sHH16s")
HEADER_SIZE = _HEADER.size + 4
#: Upper bound of one record's payload; events carry digests, never tensors.
MAX_RECORD_BYTES = 16 << 20
_FRAME = struct.Struct("<II")
_KEYS = ("seq", "type", "v", "ts", "prev", "data")
#: How every payload starts: a 6-entry fixmap whose first key is "seq". Used to find the next
#: frame after damage without trying every byte offset.
_PAYLOAD_START = b"\x86\xa3seq"


class FrameError(Exception):
    """Internal: the bytes at an offset are not a valid frame. ``frame_damaged`` is True when
    the frame is short or fails its checksum (what a torn write leaves), False when it is
    intact but wrong (a writer bug or tampering)."""

    def __init__(self, what: str, frame_damaged: bool) -> None:
        super().__init__(what)
        self.what = what
        self.frame_damaged = frame_damaged


def make_header(log_id: bytes) -> bytes:
    """The 32-byte header of a new log."""
    if type(log_id) is not bytes or len(log_id) != 16:
        raise ValueError("log_id must be 16 bytes")
    head = _HEADER.pack(MAGIC, FORMAT_VERSION, 0, log_id)
    return head + struct.pack("<I", zlib.crc32(head))


def check_header(data: bytes) -> bytes:
    """Return the log id of a valid header; raise :class:`FrameError` otherwise
    (``frame_damaged`` when the magic is right but the header fails its checksum)."""
    if len(data) < HEADER_SIZE:
        raise FrameError(
            f"file of {len(data)} bytes is shorter than a log header ({HEADER_SIZE})", False
        )
    magic, version, _reserved, log_id = _HEADER.unpack_from(data, 0)
    if magic != MAGIC:
        raise FrameError("not a fedsm event log (bad magic bytes)", False)
    (crc,) = struct.unpack_from("<I", data, _HEADER.size)
    if zlib.crc32(data[: _HEADER.size]) != crc:
        raise FrameError("header checksum mismatch", True)
    if version != FORMAT_VERSION:
        raise FrameError(
            f"log format version {version} is not supported (this fedsm reads "
            f"{FORMAT_VERSION}); upgrade fedsm",
            False,
        )
    return log_id


def genesis_hash(header: bytes) -> bytes:
    """``prev`` of seq 1: the hash of the header (so of the random log id)."""
    return hashlib.blake2b(header, digest_size=32).digest()


def encode_frame(payload: bytes) -> bytes:
    """``length | checksum | payload``."""
    length = struct.pack("<I", len(payload))
    return b"".join((length, struct.pack("<I", zlib.crc32(payload, zlib.crc32(length))), payload))


def read_frame(view: memoryview, offset: int) -> tuple[dict[str, Any], int, bytes]:
    """Parse the frame at ``offset``: ``(payload map, end offset, chain hash)``.

    Checks framing, checksum and the payload's shape (keys and their types); the event in
    ``data`` is not decoded here. Raises :class:`FrameError`.
    """
    size = len(view)
    if size - offset < 8:
        raise FrameError(f"{size - offset} bytes left, fewer than a record header", True)
    length, crc = _FRAME.unpack_from(view, offset)
    end = offset + 8 + length
    if length > MAX_RECORD_BYTES or end > size:
        raise FrameError(f"record length {length} runs past the end of the file", True)
    payload_view = view[offset + 8 : end]
    if zlib.crc32(payload_view, zlib.crc32(view[offset : offset + 4])) != crc:
        raise FrameError("checksum mismatch", True)
    try:
        payload = msgpack.unpackb(payload_view, raw=False)
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise FrameError(f"payload is not msgpack ({exc})", False) from None
    if (
        type(payload) is not dict
        or len(payload) != 6
        or type(payload.get("seq")) is not int
        or type(payload.get("type")) is not str
        or type(payload.get("v")) is not int
        or type(payload.get("ts")) is not float
        or type(payload.get("prev")) is not bytes
        or type(payload.get("data")) is not dict
    ):
        raise FrameError(f"payload is not a record map of {_KEYS}", False)
    return payload, end, hashlib.blake2b(view[offset:end], digest_size=32).digest()


def find_next_frame(view: memoryview, after: int) -> int | None:
    """Offset of the first valid frame that starts after ``after``, or None."""
    data = view.obj if isinstance(view.obj, bytes) else bytes(view)
    start = after + 9
    while True:
        hit = data.find(_PAYLOAD_START, start)
        if hit < 0:
            return None
        candidate = hit - 8
        try:
            read_frame(view, candidate)
        except FrameError:
            start = hit + 1
            continue
        return candidate
