"""nccl transport: torch.distributed point-to-point (NCCL on GPUs, gloo on CPU for tests).

Rendezvous through the existing peer-table flow: every rank starts a TCPStore on a port the OS
picks (port 0) and advertises it as `address()` "HOST:PORT"; `connect(peers)` gets every other
rank, sorts all names into ranks, the first name keeps its store as the world's and the others
drop theirs and join it. The port stays bound from the constructor on, so no other process can
take it before the rendezvous (picking a free port by binding and closing a socket could).
All ranks form one world; connect() is called once with the full table.

Two process groups over the same world carry the two directions (messages from a lower to a
higher rank on one, higher to lower on the other): NCCL runs a communicator's sends and recvs
in order on one stream, so with both directions on one group an A->F send queued behind
attention work can wait on an F->A send that waits on it (deadlock once messages exceed NCCL's
buffers). Per direction, each stream only ever carries one side of each pair.

Wire: no header. The receiver knows each message's shapes from the step shape (`like`) and
posts its irecvs at once, on a side stream that carries no compute, so the transfer starts as
soon as the peer sends and the host never waits for the network. NCCL matches messages
between a pair by order, so both sides post one peer's messages in increasing key order;
the transport checks that and raises on a key that goes backwards.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from datetime import timedelta

import torch
import torch.distributed as dist

from transport.base import (
    Handle,
    Key,
    TensorSpec,
    Transport,
    register_transport,
    settle,
)


class _GlooWork:
    """gloo's Work.is_completed() stays False until someone wait()s, and wait(timeout) breaks
    the pair on timeout; so a daemon thread waits and the flag is what gets polled."""

    __slots__ = ("_work", "_done")

    def __init__(self, work: dist.Work) -> None:
        self._work, self._done = work, threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        try:
            self._work.wait()
        except RuntimeError:
            return  # the group was destroyed under a recv nobody will claim
        self._done.set()

    def is_completed(self) -> bool:
        return self._done.is_set()

    def wait(self) -> bool:
        return self._done.wait()


class _SendHandle(Handle):
    __slots__ = ("_works",)
    what = "send"

    def __init__(self, works: list, peer: str, key: Key) -> None:
        super().__init__(peer, key)
        self._works = works

    def done(self) -> bool:
        return all(w.is_completed() for w in self._works)

    def wait(self, timeout: float | None = None) -> list[torch.Tensor]:
        settle([self], timeout)
        return []


class _RecvHandle(Handle):
    """Buffers posted at recv() time. NCCL: wait() orders the current stream after the
    transfer (and marks the buffers as used there for the caching allocator); gloo: the host
    waits, up to the timeout."""

    __slots__ = ("_works", "_tensors", "_stream_ordered")

    def __init__(
        self, works: list, tensors: list[torch.Tensor], peer: str, key: Key, stream_ordered: bool
    ) -> None:
        super().__init__(peer, key)
        self._works, self._tensors, self._stream_ordered = works, tensors, stream_ordered

    def done(self) -> bool:
        return all(w.is_completed() for w in self._works)

    def wait(self, timeout: float | None = None) -> list[torch.Tensor]:
        if not self._stream_ordered:
            settle([self], timeout)
            return self._tensors
        stream = torch.cuda.current_stream(self._tensors[0].device) if self._tensors else None
        for w in self._works:
            w.wait()  # the current stream waits for the transfer; the host does not
        for t in self._tensors:
            if t.numel():
                t.record_stream(stream)
        return self._tensors


@register_transport("nccl")
class NcclTransport(Transport):
    """Options: device (default the current CUDA device, else cpu); backend "nccl" or "gloo"
    (CPU tensors), default by the device's type; host to advertise; timeout_s: rendezvous."""

    def __init__(
        self,
        name: str,
        backend: str | None = None,
        host: str = "127.0.0.1",
        device: str | None = None,
        timeout_s: float = 120.0,
    ) -> None:
        if device is None:
            device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
        backend = backend or ("nccl" if torch.device(device).type == "cuda" else "gloo")
        if backend not in ("nccl", "gloo"):
            raise ValueError(f"nccl transport backend must be 'nccl' or 'gloo', got {backend!r}")
        if backend == "nccl" and not torch.cuda.is_available():
            raise RuntimeError("nccl transport needs CUDA; use backend='gloo' on CPU")
        self.name, self.backend, self._timeout_s = name, backend, timeout_s
        if backend == "nccl":
            self.device = torch.device(device)
            torch.cuda.set_device(self.device)
            self._recv_stream = torch.cuda.Stream(self.device)
        else:
            self.device = torch.device("cpu")
        # the OS picks the port and it stays bound: no other process can take it before connect
        self._store: dist.TCPStore | None = dist.TCPStore(
            host, 0, None, True, timeout=timedelta(seconds=timeout_s), wait_for_workers=False
        )
        self._address = f"{host}:{self._store.port}"
        self._ranks: dict[str, int] = {}
        self._groups: tuple[dist.ProcessGroup, dist.ProcessGroup] | None = None
        # last key posted per (peer, "send" | "recv"): NCCL matches by order, so keys only grow
        self._last_key: dict[tuple[str, str], Key] = {}
        self._inflight: list[tuple[list, list[torch.Tensor]]] = []

    def address(self) -> str:
        return self._address

    def connect(self, peers: dict[str, str]) -> None:
        names = sorted({*peers, self.name})
        if self._groups is not None:
            if set(names) != set(self._ranks):
                raise ValueError(f"{self.name}: nccl transport world is fixed at {self._ranks}")
            return
        self._ranks = {n: i for i, n in enumerate(names)}
        rank, lead = self._ranks[self.name], names[0]
        timeout = timedelta(seconds=self._timeout_s)
        store = self._world_store(lead, peers, timeout)
        kwargs = {"device_id": self.device} if self.backend == "nccl" else {}
        dist.init_process_group(
            self.backend, store=store, rank=rank, world_size=len(names), timeout=timeout, **kwargs
        )
        self._groups = (dist.new_group(backend=self.backend), dist.new_group(backend=self.backend))
        self._warm_up(names)

    def _world_store(self, lead: str, peers: dict[str, str], timeout: timedelta) -> dist.Store:
        """The lead's store serves the world; every other rank frees its port and joins it."""
        own, self._store = self._store, None
        assert own is not None, "connect() after close()"
        if lead == self.name:
            return own
        del own
        host, port = peers[lead].rsplit(":", 1)
        return dist.TCPStore(host, int(port), None, False, timeout=timeout)

    def _warm_up(self, names: list[str]) -> None:
        """Exchange one tensor per pair and direction in one global order (deadlock-free), so
        lazily built communicators exist before the first step and a dead peer fails here."""
        one = torch.ones(1, device=self.device)  # [1]
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                for src, dst in ((a, b), (b, a)):
                    group = self._group(src, dst)
                    if src == self.name:
                        dist.send(one, dst=self._ranks[dst], group=group)
                    elif dst == self.name:
                        dist.recv(one, src=self._ranks[src], group=group)
        if self.backend == "nccl":
            torch.cuda.synchronize(self.device)

    def _group(self, source: str, dest: str) -> dist.ProcessGroup:
        assert self._groups is not None, "call connect() first"
        return self._groups[0 if self._ranks[source] < self._ranks[dest] else 1]

    def _rank(self, peer: str) -> int:
        rank = self._ranks.get(peer)
        if rank is None:
            raise ValueError(f"{self.name}: no connection to peer {peer!r}; call connect() first")
        return rank

    def _in_order(self, peer: str, what: str, key: Key) -> None:
        last = self._last_key.get((peer, what))
        if last is not None and key <= last:
            raise ValueError(
                f"{self.name}: nccl transport {what} of key {key} to/from {peer!r} after "
                f"{last}; messages to and from one peer must be posted in increasing key order"
            )
        self._last_key[(peer, what)] = key

    def send(self, peer: str, key: Key, tensors: list[torch.Tensor]) -> Handle:
        dst, group = self._rank(peer), self._group(self.name, peer)
        self._in_order(peer, "send", key)
        tensors = [t.detach().contiguous() for t in tensors]
        works = [self._track(dist.isend(t, dst=dst, group=group)) for t in tensors if t.numel()]
        # keep the tensors alive until sent even if the caller drops the handle
        self._inflight = [f for f in self._inflight if not all(w.is_completed() for w in f[0])]
        self._inflight.append((works, tensors))
        return _SendHandle(works, peer, key)

    def recv(self, peer: str, key: Key, like: Sequence[TensorSpec] | None = None) -> Handle:
        if like is None:
            raise ValueError(
                f"{self.name}: the nccl transport receives into buffers posted in advance; "
                f"pass like=[(shape, dtype), ...] for the message {key} from {peer!r}"
            )
        src, group = self._rank(peer), self._group(peer, self.name)
        self._in_order(peer, "recv", key)
        if self.backend == "gloo":
            tensors = [torch.empty(shape, dtype=dt) for shape, dt in like]
            works = [self._track(dist.irecv(t, src=src, group=group)) for t in tensors if t.numel()]
            return _RecvHandle(works, tensors, peer, key, stream_ordered=False)
        # a side stream: NCCL's stream then waits for nothing queued on the compute stream
        with torch.cuda.stream(self._recv_stream):
            tensors = [torch.empty(shape, dtype=dt, device=self.device) for shape, dt in like]
            works = [dist.irecv(t, src=src, group=group) for t in tensors if t.numel()]
        return _RecvHandle(works, tensors, peer, key, stream_ordered=True)

    def _track(self, work: dist.Work) -> dist.Work | _GlooWork:
        return _GlooWork(work) if self.backend == "gloo" else work

    def close(self) -> None:
        self._store = None
        if self._groups is not None and dist.is_initialized():
            self._groups = None
            dist.destroy_process_group()
