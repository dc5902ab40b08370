"""The activation-transport interface both workers use, plus the backend registry and factory."""

from __future__ import annotations

import importlib
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

import torch

Key = tuple[int, int, int]  # (step, layer, micro_batch)
# What a receiver expects of one tensor: its shape and dtype. Both sides know the shapes of a
# message from the step shape, so the receiver posts its buffers before the data arrives.
TensorSpec = tuple[tuple[int, ...], torch.dtype]


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
    """A pending send or recv of the message `key` to or from `peer`. Send handles return []
    from wait().

    Host backends (zmq, gloo) block in wait() until the message is there. Stream-ordered
    backends (nccl on GPUs) return from wait() at once: the tensors are ready for work queued
    after it on the current CUDA stream, and the host never waits for the network. done() is
    the same host-side test for both; `settle` bounds a batch of handles in time."""

    __slots__ = ("peer", "key")
    what = "recv"  # or "send", for error messages

    def __init__(self, peer: str, key: Key) -> None:
        self.peer, self.key = peer, key

    @abstractmethod
    def wait(self, timeout: float | None = None) -> list[torch.Tensor]:
        """The received tensors (host backends: block until then, None: forever, and raise
        TransportTimeout after `timeout` s; stream-ordered backends: no host wait)."""

    @abstractmethod
    def done(self) -> bool:
        """True once the transfer has completed (never blocks)."""

    def timed_out(self, timeout: float | None) -> TransportTimeout:
        return TransportTimeout(self.peer, self.key, timeout, self.what)


def settle(handles: Sequence[Handle], timeout: float | None) -> None:
    """Block until every handle is done; TransportTimeout naming the first one still pending
    once `timeout` seconds have passed (None: wait forever)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    for handle in handles:
        while not handle.done():
            if deadline is not None and time.monotonic() > deadline:
                raise handle.timed_out(timeout)
            time.sleep(0)


def check_like(peer: str, key: Key, tensors: list[torch.Tensor], like: Sequence[TensorSpec]):
    """Raise ValueError unless the received tensors have the expected shapes and dtypes."""
    got = [(tuple(t.shape), t.dtype) for t in tensors]
    want = [(tuple(shape), dtype) for shape, dtype in like]
    if got != want:
        raise ValueError(f"message {key} from {peer!r} carries {got}, the receiver expected {want}")


Take = Callable[[str, Key, "float | None"], "list[torch.Tensor] | None"]


class TakeRecv(Handle):
    """A recv handle over a backend's `take(peer, key, timeout)`, which returns the tensors
    once that message is there and None when the timeout passes first; checked against the
    receiver's `like` when one was given."""

    __slots__ = ("_take", "_like", "_result")

    def __init__(self, take: Take, peer: str, key: Key, like: Sequence[TensorSpec] | None):
        super().__init__(peer, key)
        self._take, self._like = take, like
        self._result: list[torch.Tensor] | None = None

    def done(self) -> bool:
        if self._result is None:
            self._keep(self._take(self.peer, self.key, 0.0))
        return self._result is not None

    def wait(self, timeout: float | None = None) -> list[torch.Tensor]:
        if self._result is None:
            self._keep(self._take(self.peer, self.key, timeout))
            if self._result is None:
                raise self.timed_out(timeout)
        return self._result

    def _keep(self, tensors: list[torch.Tensor] | None) -> None:
        if tensors is not None and self._like is not None:
            check_like(self.peer, self.key, tensors, self._like)
        self._result = tensors


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
        """Start sending; do not modify `tensors` until the handle is done. Messages to one
        peer go in increasing key order."""

    @abstractmethod
    def recv(self, peer: str, key: Key, like: Sequence[TensorSpec] | None = None) -> Handle:
        """Start receiving the message `peer` sent under `key`; wait() returns its tensors.
        `like` gives each tensor's shape and dtype: backends that receive into buffers posted
        in advance (nccl) need it and match messages by order, so recvs from one peer are
        posted in the order that peer sent; the others check it on arrival."""

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
