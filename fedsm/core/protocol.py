"""Researcher <-> node messages: a closed schema, validation, and the msgpack codec.

Pure core: no sockets, files or clocks. Times (``deadline``) and ids are passed in.

Every message is a frozen dataclass. On the wire it is one msgpack map holding
``protocol_version``, ``command`` and the message's fields. :func:`decode` looks the command
up in a closed table (no class is ever resolved from a name), checks every field's name, type
and size, and raises :class:`MessageDecodeError` naming the field for anything else. Garbage
never gets further than that.

Requests travel researcher -> node and carry ``deadline`` (seconds since the epoch) after
which the researcher no longer waits for the answer. Replies carry the request's
``request_id``; the node's id in a reply is the sender, which transports check against the
topic the message came in on.
"""

from __future__ import annotations

import dataclasses

import msgpack

from fedsm.core.fields import short as _short
from fedsm.core.messages import (
    MAX_ITEMS,
    MAX_TEXT,
    MESSAGE_TYPES,
    Message,
)
from fedsm.core.protocol_errors import (
    MessageDecodeError,
    MessageTooLarge,
)

__all__ = ["PROTOCOL_VERSION", "MAX_MESSAGE_BYTES", "encode", "decode"]

PROTOCOL_VERSION = "1"
#: Upper bound of an encoded message. Model files go through the repository, never here.
MAX_MESSAGE_BYTES = 256 * 1024

_FIELDS = {
    command: {f.name: f for f in dataclasses.fields(cls)} for command, cls in MESSAGE_TYPES.items()
}


# --------------------------------------------------------------------------- codec


def encode(message: Message, *, max_bytes: int = MAX_MESSAGE_BYTES) -> bytes:
    """Serialise ``message``; raise :class:`MessageTooLarge` past ``max_bytes``."""
    if type(message) not in MESSAGE_TYPES.values():
        raise TypeError(f"not a protocol message: {type(message).__name__}")
    body = {"protocol_version": PROTOCOL_VERSION, "command": message.command}
    body.update(message.to_dict())
    data = msgpack.packb(body, use_bin_type=True)
    if len(data) > max_bytes:
        raise MessageTooLarge(
            f"{message.command} message is {len(data)} bytes, over the limit of {max_bytes}; "
            "send big things through the file repository"
        )
    return data


def decode(data: bytes, *, max_bytes: int = MAX_MESSAGE_BYTES) -> Message:
    """Parse and validate one message. Anything invalid raises :class:`MessageDecodeError`."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise MessageDecodeError(f"expected bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise MessageDecodeError(f"message of {len(data)} bytes is over the limit of {max_bytes}")
    try:
        body = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            max_str_len=MAX_TEXT,
            max_bin_len=0,
            max_array_len=MAX_ITEMS,
            max_map_len=MAX_ITEMS,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise MessageDecodeError(f"not a msgpack message: {exc}") from None
    if not isinstance(body, dict):
        raise MessageDecodeError(f"expected a map, got {type(body).__name__}")
    version = body.pop("protocol_version", None)
    if version != PROTOCOL_VERSION:
        raise MessageDecodeError(
            f"protocol version {_short(version)} is not supported (this side speaks "
            f"{PROTOCOL_VERSION!r})",
            "protocol_version",
        )
    command = body.pop("command", None)
    cls = MESSAGE_TYPES.get(command) if isinstance(command, str) else None
    if cls is None:
        raise MessageDecodeError(f"unknown command {_short(command)}", "command")
    fields = _FIELDS[command]
    unknown = sorted(str(k) for k in body if k not in fields)
    if unknown:
        raise MessageDecodeError(f"unknown field(s) for {command}: {unknown}", unknown[0])
    for name, f in fields.items():
        has_default = not (
            f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        )
        if name not in body and not has_default:
            raise MessageDecodeError(f"missing in {command} message", name)
    try:
        return cls(**body)
    except MessageDecodeError:
        raise
    except (TypeError, ValueError) as exc:  # pragma: no cover - defensive
        raise MessageDecodeError(str(exc)) from None
