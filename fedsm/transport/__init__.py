"""Transports: how protocol messages move between a researcher and its nodes.

* :class:`MemoryBus` on a :class:`MemoryBroker`: in one process, the embedded default, with
  seeded :class:`Faults` for tests.
* :class:`MqttBus`: MQTT v5 over a real broker (mosquitto); :func:`parse_broker_url` turns
  ``mqtt://user:pass@host:port`` / ``mqtts://...`` into its keyword arguments.

Both implement :class:`Bus` (see :mod:`fedsm.transport.base` for the delivery semantics).
"""

from fedsm.transport.base import Bus, BusClosed, Handler, TransportError
from fedsm.transport.faults import Faults
from fedsm.transport.memory import MemoryBroker, MemoryBus
from fedsm.transport.mosquitto import MosquittoNotFound, MosquittoProcess, start_mosquitto
from fedsm.transport.mqtt import MqttBus
from fedsm.transport.mqtt_session import DuplicateClientId
from fedsm.transport.topics import TlsOptions, Topics, parse_broker_url

__all__ = [
    "Bus",
    "BusClosed",
    "DuplicateClientId",
    "Faults",
    "Handler",
    "MemoryBroker",
    "MemoryBus",
    "MosquittoNotFound",
    "MosquittoProcess",
    "MqttBus",
    "TlsOptions",
    "Topics",
    "TransportError",
    "parse_broker_url",
    "start_mosquitto",
]
