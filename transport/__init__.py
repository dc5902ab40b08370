"""Activation transport between attention and FFN ranks (interface + backends)."""

from transport.base import (
    Handle,
    Key,
    Transport,
    TransportTimeout,
    create_transport,
    known_kinds,
    register_transport,
)

__all__ = [
    "Handle",
    "Key",
    "Transport",
    "TransportTimeout",
    "create_transport",
    "known_kinds",
    "register_transport",
]
