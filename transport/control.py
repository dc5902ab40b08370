"""Control plane between the coordinator and the workers: zmq ROUTER (coordinator) / DEALER
(worker) sockets carrying codec messages, worker heartbeats, and the messages every worker
takes (peer table, shutdown)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import zmq

from transport.codec import decode, encode, message


@message
@dataclass
class PeerTable:
    """Every rank's transport address, sent once all ranks are ready."""

    peers: dict[str, str]


@message
@dataclass
class Shutdown:
    reason: str = ""


@message
@dataclass
class Beat:
    rank_name: str
    time: float


class WorkerChannel:
    """A worker's link to the coordinator, plus a heartbeat thread on a socket of its own."""

    def __init__(self, address: str, rank_name: str, heartbeat_s: float) -> None:
        self.ctx = zmq.Context()
        self.sock = self._dealer(address, rank_name)
        self.rank_name, self.address = rank_name, address
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, args=(heartbeat_s,), daemon=True)
        self._beat.start()

    def _dealer(self, address: str, identity: str) -> zmq.Socket:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, identity.encode())
        sock.setsockopt(zmq.LINGER, 2000)  # a final WorkerError must still get out
        sock.connect(address)
        return sock

    def send(self, msg: object) -> None:
        self.sock.send(encode(msg))

    def recv(self, timeout_s: float) -> object | None:
        if self.sock.poll(int(timeout_s * 1000)) == 0:
            return None
        return decode(self.sock.recv())

    def _heartbeat(self, interval_s: float) -> None:
        sock = self._dealer(self.address, f"{self.rank_name}.hb")
        try:
            while not self._stop.wait(interval_s):
                sock.send(encode(Beat(self.rank_name, time.time())))
        finally:
            sock.close(0)

    def close(self) -> None:
        self._stop.set()
        self._beat.join(timeout=2)
        self.sock.close()
        self.ctx.term()
