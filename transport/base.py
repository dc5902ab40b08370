"""The activation-transport interface both workers use, plus the backend registry and factory."""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable

import torch

Key = tuple[int, int, int]  # (step, layer, micro_batch)

# Tensor dtypes every backend carries; the order is part of the nccl header (dtype codes).
WIRE_DTYPES: tuple[torch.dtype, ...] = (
    torch.float32,
    torch.bfloat16,
    torch.float16,
    torch.float64,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
)


class TransportTimeout(TimeoutError):
    """A wait() ran out of time; the message names the peer and the key it waited for."""

    def __init__(self, peer: str, key: Key, timeout: float | None, what: str = "recv") -> None:
        self.peer = peer
        self.key = key
        direction = "to" if what == "send" else "from"
        super().__init__(
            f"{what} {direction} peer {peer!r} for key (step, layer, micro_batch)={key} "
            f"did not complete within {timeout}s"
        )


class Handle(ABC):
    """A pending send or recv. Send handles return [] from wait()."""

    @abstractmethod
    def wait(self, timeout: float | None = None) -> list[torch.Tensor]:
        """Block until complete (None: forever); raise TransportTimeout after `timeout` s."""

    @abstractmethod
    def done(self) -> bool:
        """True once wait() would return without blocking."""


Take = Callable[[str, Key, "float | None"], "list[torch.Tensor] | None"]


class TakeRecv(Handle):
    """A recv handle over a backend's `take(peer, key, timeout)`, which returns the tensors
    once that message is there and None when the timeout passes first."""

    __slots__ = ("_take", "_peer", "_key", "_result")

    def __init__(self, take: Take, peer: str, key: Key) -> None:
        self._take, self._peer, self._key = take, peer, key
        self._result: list[torch.Tensor] | None = None

    def done(self) -> bool:
        if self._result is None:
            self._result = self._take(self._peer, self._key, 0.0)
        return self._result is not None

    def wait(self, timeout: float | None = None) -> list[torch.Tensor]:
        if self._result is None:
            self._result = self._take(self._peer, self._key, timeout)
            if self._result is None:
                raise TransportTimeout(self._peer, self._key, timeout)
        return self._result


class Transport(ABC):
    """Point-to-point, keyed, non-blocking exchange of tensor lists between named ranks."""

    name: str  # this rank's name, e.g. "a0", "f1"

    @abstractmethod
    def address(self) -> str:
        """The endpoint peers connect to (goes into the peer table)."""

    @abstractmethod
    def connect(self, peers: dict[str, str]) -> None:
        """Connect to peers (name -> address); may be called again with more peers."""

    @abstractmethod
    def send(self, peer: str, key: Key, tensors: list[torch.Tensor]) -> Handle:
        """Start sending; do not modify `tensors` until the handle is done."""

    @abstractmethod
    def recv(self, peer: str, key: Key) -> Handle:
        """Start receiving the message `peer` sent under `key`; wait() returns its tensors."""

    @abstractmethod
    def close(self) -> None:
        """Release sockets and files; the transport is unusable afterwards."""


TransportFactory = Callable[..., Transport]

_REGISTRY: dict[str, TransportFactory] = {}
# Built-in backends are imported on first use so that e.g. `import transport` never pulls
# in backend-specific dependencies. A new backend adds a line here or calls register_transport.
_BUILTIN_MODULES: dict[str, str] = {
    "zmq": "transport.zmq_backend",
    "nccl": "transport.nccl_backend",
}


def register_transport(kind: str) -> Callable[[TransportFactory], TransportFactory]:
    """Class/function decorator: make `create_transport(kind, ...)` build this backend."""

    def wrap(factory: TransportFactory) -> TransportFactory:
        existing = _REGISTRY.get(kind)
        if existing is not None and existing.__qualname__ != factory.__qualname__:
            raise ValueError(f"transport kind {kind!r} is already registered by {existing}")
        _REGISTRY[kind] = factory
        return factory

    return wrap


def known_kinds() -> list[str]:
    return sorted(set(_REGISTRY) | set(_BUILTIN_MODULES))


def create_transport(kind: str, name: str, **options: object) -> Transport:
    """Build the transport backend `kind` for the rank called `name`."""
    if kind not in _REGISTRY and kind in _BUILTIN_MODULES:
        importlib.import_module(_BUILTIN_MODULES[kind])
    factory = _REGISTRY.get(kind)
    if factory is None:
        raise ValueError(
            f"unknown transport kind {kind!r}; known kinds: {', '.join(known_kinds())}"
        )
    return factory(name, **options)
