"""zmq transport: each rank binds one PULL socket and holds one PUSH socket per peer.

Wire format, one zmq multipart message per send:
  part 0: msgpack [source_name, step, layer, micro_batch, [[dtype_name, shape], ...]]
  part i: the raw bytes of tensor i-1 (C order), zero-copy for large tensors.
"""

from __future__ import annotations

import ctypes
import math
import os
import tempfile
import time
import uuid
from collections.abc import Sequence

import msgpack
import numpy as np
import torch
import zmq

from transport.base import (
    Handle,
    Key,
    TakeRecv,
    TensorSpec,
    Transport,
    register_transport,
)

# Tensor dtypes the wire format carries, by name.
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
DTYPES: dict[str, torch.dtype] = {str(dt).removeprefix("torch."): dt for dt in WIRE_DTYPES}
_DTYPE_NAMES: dict[torch.dtype, str] = {dt: name for name, dt in DTYPES.items()}

# Below this many bytes a frame is copied: zero-copy costs a tracker and a free callback
# (several µs) and small received frames point into libzmq's shared receive buffer.
ZERO_COPY_MIN = 64 * 1024


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt() parameters


def tune_malloc() -> None:
    """Make glibc keep freed message buffers instead of returning them to the OS.

    By default each received multi-MB message is malloc'ed by libzmq and, with a few messages
    in flight, freeing them trims the heap, so every message pays ~450 page faults again. On a
    16-core host this halved the pipelined round trip (3 in flight: 1464 -> 676 µs per 1.8 MB
    message). Process-wide and glibc-only; a no-op elsewhere."""
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
        libc.mallopt(_M_TRIM_THRESHOLD, 256 << 20)
    except (OSError, AttributeError):
        pass


def _numpy(t: torch.Tensor) -> np.ndarray:
    """A numpy view of a contiguous CPU tensor's memory; bf16 (no numpy dtype) as int16."""
    return (t.view(torch.int16) if t.dtype is torch.bfloat16 else t).numpy()


def _raw(t: torch.Tensor) -> np.ndarray:
    """The tensor's bytes as a C-contiguous buffer that zmq can send."""
    if t.requires_grad:
        t = t.detach()
    if not t.is_cpu:
        t = t.cpu()  # zmq carries host memory; this is a synchronous device->host copy
    if not t.is_contiguous():
        t = t.contiguous()
    return _numpy(t)


def _check_size(got: int, expected: int, dtype_name: str, shape: list[int]) -> None:
    if got != expected:
        raise RuntimeError(f"zmq frame of {got} bytes for a {dtype_name}{shape} tensor")


def _dtype_name(t: torch.Tensor) -> str:
    name = _DTYPE_NAMES.get(t.dtype)
    if name is None:
        raise ValueError(f"zmq transport cannot send {t.dtype}; supported: {', '.join(DTYPES)}")
    return name


class _SendHandle(Handle):
    __slots__ = ("_tracker",)
    what = "send"

    def __init__(self, tracker: zmq.MessageTracker | None, peer: str, key: Key) -> None:
        super().__init__(peer, key)
        self._tracker = tracker

    def done(self) -> bool:
        return self._tracker is None or self._tracker.done

    def wait(self, timeout: float | None = None) -> list[torch.Tensor]:
        if self._tracker is not None:
            try:
                self._tracker.wait(-1 if timeout is None else timeout)
            except zmq.NotDone:
                raise self.timed_out(timeout) from None
        return []


@register_transport("zmq")
class ZmqTransport(Transport):
    """Options: protocol "tcp" (default) or "ipc"; host to bind/advertise for tcp; ipc_dir;
    linger_ms, how long close() lets unsent messages drain; malloc_tuning, see tune_malloc.

    wait() sleeps in zmq_poll rather than busy-polling: spinning 50 µs per wait did not
    shorten a tiny round trip measurably on a 16-core host (libzmq's I/O-thread hops
    dominate) and slowed everything on a 2-core one."""

    def __init__(
        self,
        name: str,
        protocol: str = "tcp",
        host: str = "127.0.0.1",
        ipc_dir: str | None = None,
        linger_ms: int = 1000,
        malloc_tuning: bool = True,
    ) -> None:
        if protocol not in ("tcp", "ipc"):
            raise ValueError(f"zmq transport protocol must be 'tcp' or 'ipc', got {protocol!r}")
        if malloc_tuning:
            tune_malloc()
        self.name = name
        self._linger_ms = linger_ms
        self._ctx = zmq.Context(io_threads=1)
        self._pull = self._ctx.socket(zmq.PULL)
        self._pull.setsockopt(zmq.RCVHWM, 0)  # unbounded: a full queue must never stall a layer
        self._poller = zmq.Poller()
        self._poller.register(self._pull, zmq.POLLIN)
        self._push: dict[str, zmq.Socket] = {}
        self._peer_addresses: dict[str, str] = {}
        # (source, key) -> tensors that arrived before anyone asked for them
        self._arrived: dict[tuple[str, Key], list[torch.Tensor]] = {}
        self._ipc_path: str | None = None
        self._address = self._bind(protocol, host, ipc_dir)

    def _bind(self, protocol: str, host: str, ipc_dir: str | None) -> str:
        if protocol == "tcp":
            port = self._pull.bind_to_random_port(f"tcp://{host}")
            return f"tcp://{host}:{port}"
        # Unix socket paths are limited to ~107 bytes, so keep the name short.
        directory = ipc_dir or tempfile.gettempdir()
        self._ipc_path = os.path.join(directory, f"afd-{self.name}-{uuid.uuid4().hex[:12]}.ipc")
        address = f"ipc://{self._ipc_path}"
        self._pull.bind(address)
        return address

    def address(self) -> str:
        return self._address

    def connect(self, peers: dict[str, str]) -> None:
        for peer, address in peers.items():
            known = self._peer_addresses.get(peer)
            if known == address:
                continue
            if known is not None:
                raise ValueError(f"{self.name}: peer {peer!r} is already at {known}, not {address}")
            sock = self._ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.SNDHWM, 0)  # send() must not block on a slow peer
            sock.setsockopt(zmq.LINGER, self._linger_ms)
            sock.connect(address)
            self._push[peer] = sock
            self._peer_addresses[peer] = address

    def send(self, peer: str, key: Key, tensors: list[torch.Tensor]) -> Handle:
        sock = self._push.get(peer)
        if sock is None:
            raise ValueError(f"{self.name}: no connection to peer {peer!r}; call connect() first")
        specs = [[_dtype_name(t), list(t.shape)] for t in tensors]
        header = msgpack.packb([self.name, key[0], key[1], key[2], specs])
        if not tensors:
            sock.send(header)
            return _SendHandle(None, peer, key)
        sock.send(header, zmq.SNDMORE)
        trackers = []
        last = len(tensors) - 1
        for i, t in enumerate(tensors):
            raw = _raw(t)
            flags = zmq.SNDMORE if i < last else 0
            if raw.nbytes >= ZERO_COPY_MIN:
                trackers.append(sock.send(raw, flags, copy=False, track=True))
            else:
                sock.send(raw, flags)
        if not trackers:
            return _SendHandle(None, peer, key)
        tracker = trackers[0] if len(trackers) == 1 else zmq.MessageTracker(*trackers)
        return _SendHandle(tracker, peer, key)

    def recv(self, peer: str, key: Key, like: Sequence[TensorSpec] | None = None) -> Handle:
        return TakeRecv(self._take, peer, key, like)

    def _take(self, peer: str, key: Key, timeout: float | None) -> list[torch.Tensor] | None:
        """The tensors `peer` sent under `key`, reading the socket until they arrive;
        None if `timeout` seconds pass first."""
        wanted = (peer, key)
        deadline = None
        while True:
            got = self._arrived.pop(wanted, None)
            if got is not None:
                return got
            if self._read_one():
                continue
            if timeout is not None and deadline is None:
                deadline = time.monotonic() + timeout
            wait_ms = None if deadline is None else math.ceil((deadline - time.monotonic()) * 1e3)
            if wait_ms is not None and wait_ms <= 0:
                return None
            self._poller.poll(wait_ms)

    def _read_one(self) -> bool:
        """Move one queued message into the arrival buffer; False if none is queued."""
        try:
            header = self._pull.recv(zmq.NOBLOCK)
        except zmq.Again:
            return False
        try:
            source, step, layer, micro_batch, specs = msgpack.unpackb(header)
            tensors = [self._read_tensor(dtype_name, shape) for dtype_name, shape in specs]
        except Exception:
            # Skip the rest of this message so that the next read starts at a header.
            while self._pull.getsockopt(zmq.RCVMORE):
                self._pull.recv()
            raise
        slot = (source, (step, layer, micro_batch))
        if slot in self._arrived:
            raise RuntimeError(f"{self.name}: peer {source!r} sent key {slot[1]} twice")
        self._arrived[slot] = tensors
        return True

    def _read_tensor(self, dtype_name: str, shape: list[int]) -> torch.Tensor:
        """Read the next frame of the current message as a tensor the caller owns."""
        dtype = DTYPES.get(dtype_name)
        if dtype is None:
            raise RuntimeError(f"{self.name}: received unknown dtype {dtype_name!r}")
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes >= ZERO_COPY_MIN:
            # Zero-copy: the tensor keeps the zmq frame (a private allocation) alive.
            frame = self._pull.recv(copy=False)
            _check_size(len(frame), nbytes, dtype_name, shape)
            t = torch.frombuffer(frame.buffer, dtype=dtype)
            if t.data_ptr() % dtype.itemsize == 0:
                return t.view(shape)
            return t.clone().view(shape)
        out = torch.empty(shape, dtype=dtype)
        if nbytes == 0:
            _check_size(len(self._pull.recv()), 0, dtype_name, shape)
        else:
            got = self._pull.recv_into(_numpy(out))
            _check_size(got, nbytes, dtype_name, shape)
        return out

    def close(self) -> None:
        if self._ctx.closed:
            return
        for sock in self._push.values():
            sock.close()
        self._push.clear()
        self._pull.close(linger=0)
        self._ctx.term()
        if self._ipc_path is not None and os.path.exists(self._ipc_path):
            os.unlink(self._ipc_path)
        self._ipc_path = None
