"""The byte format of the event log: header, record frames, and finding the next frame.

Split from :mod:`fedsm.log.writer` so the writer, the read-only scanner and the verifier share one
definition of what a valid frame is. See :mod:`fedsm.log.writer` for the layout and the reasons.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from typing import Any

import msgpack

from fedsm.core.events import Event, encode_event

__all__ = [
    "FORMAT_VERSION",
    "FRAME",
    "HEADER_SIZE",
    "MAGIC",
    "MAX_RECORD_BYTES",
    "FrameEncoder",
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
#: ``length | checksum`` at the start of every record.
FRAME = struct.Struct("<II")
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


_U32 = struct.Struct("<I")
_F64_BE = struct.Struct(">d")
_PAYLOAD_SEQ = b"\x86\xa3seq"  # fixmap of 6, "seq"
_PAYLOAD_TS = b"\xa2ts\xcb"  # "ts", float 64
_PAYLOAD_PREV = b"\xa4prev\xc4\x20"  # "prev", bin 8 of 32 bytes
_PAYLOAD_DATA = b"\xa4data"


class FrameEncoder:
    """Builds record frames for one writer.

    The payload comes out byte for byte as ``msgpack.packb({seq, type, v, ts, prev, data},
    use_bin_type=True)`` would pack it, without building the map: the constant keys and each
    event class's ``type``/``v`` are packed once, so an append packs only the seq, the
    timestamp and the event's fields. Not thread-safe (the writer holds its lock).
    """

    def __init__(self) -> None:
        self._pack = msgpack.Packer(use_bin_type=True).pack
        self._heads: dict[type, bytes] = {}

    def frame(self, seq: int, event: Event, ts: float, prev: bytes) -> bytes:
        """``length | checksum | payload`` of the record. ``ts`` must be a float and
        ``prev`` 32 bytes (the caller checks); raises TypeError if ``event`` is no event."""
        head = self._heads.get(type(event))
        if head is None:
            head = self._head_of(event)
        if len(prev) != 32:
            raise ValueError("prev must be a 32-byte hash")
        pack = self._pack
        payload = b"".join(
            (
                _PAYLOAD_SEQ,
                pack(seq),
                head,
                _PAYLOAD_TS,
                _F64_BE.pack(ts),
                _PAYLOAD_PREV,
                prev,
                _PAYLOAD_DATA,
                pack(event.__dict__),  # the fields, in order: encode_event's "data"
            )
        )
        length = _U32.pack(len(payload))
        return b"".join((length, _U32.pack(zlib.crc32(payload, zlib.crc32(length))), payload))

    def _head_of(self, event: Event) -> bytes:
        encoded = encode_event(event)  # TypeError for anything that is not an event
        pack = self._pack
        head = pack("type") + pack(encoded["type"]) + pack("v") + pack(encoded["v"])
        self._heads[type(event)] = head
        return head


def read_frame(view: memoryview, offset: int) -> tuple[dict[str, Any], int, bytes]:
    """Parse the frame at ``offset``: ``(payload map, end offset, chain hash)``.

    Checks framing, checksum and the payload's shape (keys and their types); the event in
    ``data`` is not decoded here. Raises :class:`FrameError`.
    """
    size = len(view)
    if size - offset < 8:
        raise FrameError(f"{size - offset} bytes left, fewer than a record header", True)
    length, crc = FRAME.unpack_from(view, offset)
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
