"""nccl transport: torch.distributed point-to-point (NCCL on GPUs, gloo on CPU for tests).

Rendezvous through the existing peer-table flow: `address()` is "HOST:PORT" with a port this
rank reserved; `connect(peers)` gets every other rank, sorts all names into ranks, and the
first name hosts the TCPStore on its advertised port (a free port picked at start, so a tiny
bind race is possible). All ranks form one world; connect() is called once with the full table.

Two process groups over the same world carry the two directions (messages from a lower to a
higher rank on one, higher to lower on the other): NCCL runs a communicator's sends and recvs
in order on one stream, so with both directions on one group an A->F send queued behind
attention work can wait on an F->A send that waits on it (deadlock once messages exceed NCCL's
buffers). Per direction, each stream only ever carries one side of each pair.

Wire: per message an int64 header tensor [HEADER_LEN] (step, layer, micro_batch, n, then per
tensor dtype code, ndim, dims), then each non-empty tensor. The receiver does not know shapes
in advance, so it polls the header (cudaEventQuery through Work.is_completed, no host sync on
compute streams), copies it to the host, then posts the payload irecvs.
"""

from __future__ import annotations

import socket
import threading
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from transport.base import (
    WIRE_DTYPES,
    Handle,
    Key,
    TakeRecv,
    Transport,
    TransportTimeout,
    register_transport,
)

HEADER_LEN = 64
_MAX_DIMS = 6
_DTYPES = WIRE_DTYPES
_CODES = {dt: i for i, dt in enumerate(_DTYPES)}


def encode_header(key: Key, tensors: list[torch.Tensor]) -> list[int]:
    vals = [*key, len(tensors)]
    for t in tensors:
        if t.dtype not in _CODES or t.dim() > _MAX_DIMS:
            raise ValueError(f"nccl transport cannot send {t.dtype} of {t.dim()} dims")
        vals += [_CODES[t.dtype], t.dim(), *t.shape]
    if len(vals) > HEADER_LEN:
        raise ValueError(f"nccl transport: {len(tensors)} tensors do not fit one header")
    return vals + [0] * (HEADER_LEN - len(vals))


def decode_header(vals: list[int]) -> tuple[Key, list[tuple[torch.dtype, list[int]]]]:
    key, n, pos, specs = (vals[0], vals[1], vals[2]), vals[3], 4, []
    for _ in range(n):
        ndim = vals[pos + 1]
        specs.append((_DTYPES[vals[pos]], vals[pos + 2 : pos + 2 + ndim]))
        pos += 2 + ndim
    return key, specs


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


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


def _poll(works: list[dist.Work], deadline: float | None) -> bool:
    """Spin until every work is complete; False once `deadline` (monotonic) passes."""
    while not all(w.is_completed() for w in works):
        if deadline is not None and time.monotonic() > deadline:
            return False
        time.sleep(0)
    return True


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


class _SendHandle(Handle):
    __slots__ = ("_works", "_peer", "_key")

    def __init__(self, works: list[dist.Work], peer: str, key: Key) -> None:
        self._works, self._peer, self._key = works, peer, key

    def done(self) -> bool:
        return all(w.is_completed() for w in self._works)

    def wait(self, timeout: float | None = None) -> list[torch.Tensor]:
        if not _poll(self._works, _deadline(timeout)):
            raise TransportTimeout(self._peer, self._key, timeout, "send")
        return []


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
            self._side = torch.cuda.Stream(self.device)
        else:
            self.device = torch.device("cpu")
        self._address = f"{host}:{_free_port(host)}"
        self._ranks: dict[str, int] = {}
        self._groups: tuple[dist.ProcessGroup, dist.ProcessGroup] | None = None
        self._header_work: dict[str, tuple[dist.Work, torch.Tensor]] = {}
        # (source, key) -> (payload works, tensors) whose header has been read
        self._arrived: dict[tuple[str, Key], tuple[list[dist.Work], list[torch.Tensor]]] = {}
        self._inflight: list[tuple[list[dist.Work], list[torch.Tensor]]] = []

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
        host, port = (self._address if lead == self.name else peers[lead]).rsplit(":", 1)
        timeout = timedelta(seconds=self._timeout_s)
        store = dist.TCPStore(host, int(port), len(names), rank == 0, timeout=timeout)
        kwargs = {"device_id": self.device} if self.backend == "nccl" else {}
        dist.init_process_group(
            self.backend, store=store, rank=rank, world_size=len(names), timeout=timeout, **kwargs
        )
        self._groups = (dist.new_group(backend=self.backend), dist.new_group(backend=self.backend))
        self._warm_up(names)

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

    def send(self, peer: str, key: Key, tensors: list[torch.Tensor]) -> Handle:
        dst, group = self._rank(peer), self._group(self.name, peer)
        tensors = [t.detach().contiguous() for t in tensors]
        header = torch.tensor(encode_header(key, tensors))  # [HEADER_LEN]
        if self.backend == "nccl":
            # pinned + non_blocking: a pageable copy would sync the current stream, making the
            # host wait for the attention work queued ahead of this send
            header = header.pin_memory().to(self.device, non_blocking=True)
        works = [dist.isend(header, dst=dst, group=group)]
        works += [dist.isend(t, dst=dst, group=group) for t in tensors if t.numel()]
        works = [self._track(w) for w in works]
        # keep the tensors alive until sent even if the caller drops the handle (gloo needs it;
        # NCCL's own record_stream covers the GPU allocator)
        self._inflight = [f for f in self._inflight if not all(w.is_completed() for w in f[0])]
        self._inflight.append((works, [header, *tensors]))
        return _SendHandle(works, peer, key)

    def recv(self, peer: str, key: Key) -> Handle:
        self._rank(peer)
        return TakeRecv(self._take, peer, key)

    def _take(self, peer: str, key: Key, timeout: float | None) -> list[torch.Tensor] | None:
        """Read headers from `peer` in send order, posting each payload, until `key` arrives."""
        deadline = _deadline(timeout)
        while (peer, key) not in self._arrived:
            if not self._read_header(peer, deadline):
                return None
        works, tensors = self._arrived[(peer, key)]
        if self.backend == "gloo" and not _poll(works, deadline):  # NCCL: the stream waits
            return None  # payload still in flight; try again on the next call
        del self._arrived[(peer, key)]
        for w in works:
            w.wait()  # NCCL: the current stream waits for the payload, the host does not
        return tensors

    def _read_header(self, peer: str, deadline: float | None) -> bool:
        src, group = self._rank(peer), self._group(peer, self.name)
        if peer not in self._header_work:
            buf = torch.empty(HEADER_LEN, dtype=torch.int64, device=self.device)  # [HEADER_LEN]
            self._header_work[peer] = (self._track(dist.irecv(buf, src=src, group=group)), buf)
        work, buf = self._header_work[peer]
        if not _poll([work], deadline):
            return False
        del self._header_work[peer]
        got, specs = decode_header(self._to_host(work, buf))
        tensors = [torch.empty(shape, dtype=dt, device=self.device) for dt, shape in specs]
        works = [self._track(dist.irecv(t, src=src, group=group)) for t in tensors if t.numel()]
        if (peer, got) in self._arrived:
            raise RuntimeError(f"{self.name}: peer {peer!r} sent key {got} twice")
        self._arrived[(peer, got)] = (works, tensors)
        return True

    def _track(self, work: dist.Work) -> dist.Work:
        return _GlooWork(work) if self.backend == "gloo" else work

    def _to_host(self, work: dist.Work, buf: torch.Tensor) -> list[int]:
        """The header's values; on GPU through a side stream so that the host waits for this
        header only, not for compute queued on the current stream."""
        if self.backend == "gloo":
            work.wait()
            return buf.tolist()
        with torch.cuda.stream(self._side):
            work.wait()
            return buf.cpu().tolist()

    def close(self) -> None:
        if self._groups is not None and dist.is_initialized():
            self._groups = None
            dist.destroy_process_group()
