"""Activation transport between attention and FFN ranks (interface + backends)."""

from transport.base import (
    Handle,
    Key,
    TensorSpec,
    Transport,
    TransportTimeout,
    create_transport,
    known_kinds,
    register_transport,
    settle,
)

__all__ = [
    "Handle",
    "Key",
    "TensorSpec",
    "Transport",
    "TransportTimeout",
    "create_transport",
    "known_kinds",
    "register_transport",
    "settle",
]
