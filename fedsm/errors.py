"""The root of fedsm's exceptions.

Every error fedsm raises on purpose derives from :class:`FedsmError`, so experiment code can
catch "anything fedsm refused" in one clause, and the CLI can turn it into a one-line message
and an exit code. Each layer defines its own subclasses next to its code; this module holds
only the root and the few errors several layers share.
"""

from __future__ import annotations

__all__ = ["FedsmError", "ConfigurationError", "DeadlineExceeded"]


class FedsmError(Exception):
    """Base class of every error fedsm raises deliberately."""


class ConfigurationError(FedsmError, ValueError):
    """A setting, argument or file given by the user is invalid; the message says which and why."""


class DeadlineExceeded(FedsmError, TimeoutError):
    """A wait ran past its (configurable) deadline."""
