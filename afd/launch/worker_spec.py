"""What a worker process is told at start (a JSON argument, never pickle), its session (control
channel + transport) and its message loop, shared by attention and FFN ranks."""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch

from afd.config import ConfigError
from afd.engine.messages import WorkerError
from transport.base import Transport, create_transport
from transport.control import PeerTable, Shutdown, WorkerChannel

IDLE_POLL_S = 0.5


@dataclass(frozen=True)
class WorkerSpec:
    name: str  # "a0".. or "f0"..
    index: int  # rank index within its role
    model: str
    dtype: str
    device: str  # "cpu", "cuda" (= cuda:0 of what the launcher made visible) or "cuda:N"
    attn_ranks: list[str]
    ffn_ranks: list[str]
    coordinator: str
    transport: str = "zmq"
    num_kv_blocks: int = 0
    block_size: int = 16
    kv_cache_dtype: str = "auto"  # "fp8": e4m3 with a scale per token vector
    quantization: str | None = None  # --quantization (afd/quantization.py); None: the checkpoint's
    fp8_attention: bool = False  # --fp8-attention: attention projections in e4m3
    recv_timeout_s: float = 20.0
    heartbeat_s: float = 0.5
    parent_pid: int = 0
    num_threads: int = 1
    cuda_graph_max_batch: int = 0  # decode rows per attention rank captured as graphs; 0: eager
    max_model_len: int = 0  # longest sequence (0: the model's); sizes the decode graphs

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> WorkerSpec:
        return cls(**json.loads(text))

    def torch_device(self) -> torch.device:
        return torch.device("cuda:0" if self.device == "cuda" else self.device)

    @contextmanager
    def session(self) -> Iterator[tuple[WorkerChannel, Transport]]:
        torch.set_num_threads(self.num_threads)
        if self.parent_pid:  # a local rank process (Ray's actors have their own signals)
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, self._on_group_signal)
        if self.torch_device().type == "cuda":
            torch.cuda.set_device(self.torch_device())  # the nccl transport uses this device
        channel = WorkerChannel(self.coordinator, self.name, self.heartbeat_s)
        # the nccl transport must know the rank's device: on a CUDA host a CPU rank uses gloo
        nccl = self.transport.startswith("nccl")  # nccl, or nccl-node (Ray across nodes)
        options = {"device": str(self.torch_device())} if nccl else {}
        transport = create_transport(self.transport, self.name, **options)
        try:
            yield channel, transport
        except ConfigError as exc:  # a bad checkpoint or setting: its message says it all
            channel.send(WorkerError(self.name, f"rank {self.name}: {exc}"[:1000]))
            print(f"afd rank {self.name}: error: {exc}", file=sys.stderr, flush=True)
            raise SystemExit(1) from None
        except Exception as exc:
            # the traceback goes to this rank's stderr (the server's log) as the exception
            # leaves; requests fail with one line, which reaches clients
            channel.send(WorkerError(self.name, f"rank {self.name} failed: {exc!r}"[:500]))
            raise
        finally:
            transport.close()
            channel.close()

    def _on_group_signal(self, signum: int, frame: object) -> None:
        """A SIGTERM or Ctrl-C sent to the whole process group (systemd, a terminal) reaches
        the ranks too. The coordinator stops them (Shutdown, then SIGKILL) once the server has
        drained, so they ignore it while it lives, and exit if it is gone."""
        if os.getppid() != self.parent_pid:
            raise SystemExit(0)


Handler = Callable[[object], object | None]


def worker_loop(
    spec: WorkerSpec, channel: WorkerChannel, transport: Transport, handlers: dict[type, Handler]
) -> None:
    """Serves control messages until Shutdown, or until the coordinator process is gone."""
    while True:
        msg = channel.recv(IDLE_POLL_S)
        if msg is None:
            if spec.parent_pid and os.getppid() != spec.parent_pid:
                return  # orphaned: the coordinator died without saying goodbye
            continue
        if isinstance(msg, Shutdown):
            return
        if isinstance(msg, PeerTable):
            transport.connect({k: v for k, v in msg.peers.items() if k != spec.name})
            continue
        reply = handlers[type(msg)](msg)
        if reply is not None:
            channel.send(reply)
            if isinstance(reply, WorkerError):
                return
