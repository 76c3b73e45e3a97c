"""Names shared by the transports: roles, the MQTT topic layout, TLS options, broker URLs.

MQTT topic layout (``<p>`` is the topic prefix, ``fedsm`` by default)::

    <p>/req/<node_id>                    researcher -> one node (node reads only its own)
    <p>/broadcast                        researcher -> every node
    <p>/reply/<researcher_id>/<node_id>  node -> researcher (node writes only its own segment)
    <p>/status/<node_id>                 retained "online" / "offline"; last will "offline"

With per-node usernames equal to node ids, the mosquitto ACL line
``pattern write <p>/reply/+/%u`` lets the broker vouch for the sender of a reply; the
researcher still drops a reply whose ``node_id`` differs from the topic's node segment.
"""

from __future__ import annotations

import re
import ssl
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from fedsm.errors import ConfigurationError

__all__ = [
    "RESEARCHER",
    "NODE",
    "ROLES",
    "STATUS_ONLINE",
    "STATUS_OFFLINE",
    "Topics",
    "TlsOptions",
    "check_participant",
    "parse_broker_url",
]

RESEARCHER = "researcher"
NODE = "node"
ROLES = (RESEARCHER, NODE)
STATUS_ONLINE = b"online"
STATUS_OFFLINE = b"offline"

# Same syntax as fedsm.core.protocol ids: safe as one MQTT topic level (no "/", "+", "#").
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")
_PREFIX_RE = re.compile(r"^[A-Za-z0-9_.:-]+(/[A-Za-z0-9_.:-]+)*$")


def check_participant(participant_id: str, role: str) -> None:
    """Raise :class:`ConfigurationError` for an unknown role or an id that is not a protocol id."""
    if role not in ROLES:
        raise ConfigurationError(f"role must be one of {ROLES}, got {role!r}")
    if not isinstance(participant_id, str) or not _ID_RE.match(participant_id):
        raise ConfigurationError(
            f"{role} id {participant_id!r} is invalid: use 1-128 of [A-Za-z0-9_.:-], "
            "starting with a letter or digit"
        )


@dataclass(frozen=True)
class Topics:
    """The topic names under one prefix."""

    prefix: str = "fedsm"

    def __post_init__(self) -> None:
        if not _PREFIX_RE.match(self.prefix):
            raise ConfigurationError(
                f"topic prefix {self.prefix!r} is invalid: levels of [A-Za-z0-9_.:-] joined by '/'"
            )

    def request(self, node_id: str) -> str:
        return f"{self.prefix}/req/{node_id}"

    @property
    def broadcast(self) -> str:
        return f"{self.prefix}/broadcast"

    def reply(self, researcher_id: str, node_id: str) -> str:
        return f"{self.prefix}/reply/{researcher_id}/{node_id}"

    def replies_to(self, researcher_id: str) -> str:
        """Subscription filter for every reply addressed to ``researcher_id``."""
        return f"{self.prefix}/reply/{researcher_id}/+"

    def status(self, node_id: str) -> str:
        return f"{self.prefix}/status/{node_id}"

    @property
    def all_status(self) -> str:
        return f"{self.prefix}/status/+"

    def parse(self, topic: str) -> tuple[str, ...] | None:
        """Split a topic under this prefix into ``(kind, *ids)``; None if it is not one of ours."""
        head = self.prefix + "/"
        if not topic.startswith(head):
            return None
        parts = tuple(topic[len(head) :].split("/"))
        shapes = {"req": 2, "broadcast": 1, "reply": 3, "status": 2}
        if not parts or shapes.get(parts[0]) != len(parts):
            return None
        return parts


@dataclass(frozen=True)
class TlsOptions:
    """TLS for the MQTT connection. The broker's certificate is always verified.

    Parameters
    ----------
    ca_certs:
        CA bundle that signed the broker's certificate; None uses the system's CAs.
    certfile, keyfile:
        Client certificate and key, for brokers that require mutual TLS.
    """

    ca_certs: str | None = None
    certfile: str | None = None
    keyfile: str | None = None

    def apply(self, client: Any) -> None:
        """Configure a paho client (TLS 1.2 at least, hostname checked)."""
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.ca_certs)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.certfile:
            context.load_cert_chain(self.certfile, self.keyfile)
        client.tls_set_context(context)


def parse_broker_url(url: str) -> dict[str, Any]:
    """``mqtt://[user[:password]@]host[:port][?prefix=P]`` or ``mqtts://...`` -> MqttBus kwargs.

    ``mqtts`` turns TLS on (port 8883 by default) and accepts the query parameters
    ``ca_certs``, ``certfile`` and ``keyfile`` (file paths). User and password are
    percent-decoded. Returns a dict with ``host``, ``port``, ``username``, ``password``,
    ``tls`` and, if given, ``topic_prefix``.
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigurationError(f"broker URL {url!r} is invalid: {exc}") from None
    if parts.scheme not in ("mqtt", "mqtts"):
        raise ConfigurationError(f"broker URL {url!r} must start with mqtt:// or mqtts://")
    if not parts.hostname:
        raise ConfigurationError(f"broker URL {url!r} has no host")
    if parts.path not in ("", "/"):
        raise ConfigurationError(f"broker URL {url!r} must not have a path (use ?prefix=)")
    query = parse_qs(parts.query, keep_blank_values=True, strict_parsing=False)
    allowed = {"prefix"}
    if parts.scheme == "mqtts":
        allowed |= {"ca_certs", "certfile", "keyfile"}
    unknown = sorted(set(query) - allowed)
    if unknown:
        raise ConfigurationError(
            f"broker URL {url!r}: unknown parameter(s) {unknown}; allowed: {sorted(allowed)}"
        )
    single = {k: v[-1] for k, v in query.items()}
    tls = None
    if parts.scheme == "mqtts":
        tls = TlsOptions(
            ca_certs=single.get("ca_certs") or None,
            certfile=single.get("certfile") or None,
            keyfile=single.get("keyfile") or None,
        )
    out: dict[str, Any] = {
        "host": parts.hostname,
        "port": port if port is not None else (8883 if tls else 1883),
        "username": unquote(parts.username) if parts.username is not None else None,
        "password": unquote(parts.password) if parts.password is not None else None,
        "tls": tls,
    }
    if "prefix" in single:
        Topics(single["prefix"])  # validates
        out["topic_prefix"] = single["prefix"]
    return out
