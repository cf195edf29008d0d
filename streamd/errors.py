"""Errors of the daemon, one base class whose `code` is the wire error code.

Foreign exceptions (JSON, soxr, numpy, model code) are converted to these where they
enter streamd, so the server can always answer with a contract code.
"""

from __future__ import annotations


class StreamdError(Exception):
    """Base class; `code` is one of the protocol's error codes."""

    code = "internal"


class BadRequest(StreamdError):
    """The client sent something the contract does not allow."""

    code = "bad_request"


class Unsupported(StreamdError):
    """Well-formed but not offered here (encoding, rate, pipeline)."""

    code = "unsupported"


class Unauthorized(StreamdError):
    code = "unauthorized"


class Overloaded(StreamdError):
    """A bounded resource (sessions, engine queue) is full."""

    code = "overloaded"


class InternalError(StreamdError):
    code = "internal"


class ConfigError(StreamdError, ValueError):
    """A bad configuration value; the message always names the key."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"config key {key!r}: {message}")
        self.key = key


ERROR_CODES = ("bad_request", "unsupported", "unauthorized", "overloaded", "internal")
