"""FFNClient over the transport: sends a micro-batch's FFN input to every FFN rank and sums
the partial outputs that come back (in rank order, so the sum is deterministic).

Each reply's shape is the input's ([T, H], same dtype), so its receive is posted with the
send; on the nccl transport the whole step then queues without the host waiting on the
network, and `settle` at the end of the step is where a dead peer shows as a timeout."""

from __future__ import annotations

import time

import torch

from afd.envs import stage_delays_s
from attn_worker.ffn_client import FFNClient, PendingFFN, Routing
from transport.base import Handle, Transport, settle


class _Pending(PendingFFN):
    def __init__(self, recvs: list[Handle], timeout_s: float) -> None:
        self.recvs, self.timeout_s = recvs, timeout_s

    def wait(self) -> torch.Tensor:
        out = None
        for handle in self.recvs:
            (part,) = handle.wait(self.timeout_s)
            out = part if out is None else out + part
        return out


class RemoteFFN(FFNClient):
    def __init__(self, transport: Transport, ffn_ranks: list[str], timeout_s: float) -> None:
        self.transport, self.ffn_ranks, self.timeout_s = transport, ffn_ranks, timeout_s
        self.delay_s, _ = stage_delays_s()
        self._handles: list[Handle] = []  # this step's transfers, checked by settle()

    def submit(
        self, step: int, layer: int, micro_batch: int, x: torch.Tensor, routing: Routing
    ) -> PendingFFN:
        if self.delay_s:  # test hook: stands in for attention compute of this micro-batch
            time.sleep(self.delay_s * x.shape[0])
        tensors = [x] if routing is None else [x, *routing]
        key, like = (step, layer, micro_batch), [(tuple(x.shape), x.dtype)]
        sends = [self.transport.send(f, key, tensors) for f in self.ffn_ranks]
        recvs = [self.transport.recv(f, key, like) for f in self.ffn_ranks]
        self._handles += sends + recvs
        return _Pending(recvs, self.timeout_s)

    def settle(self) -> None:
        handles, self._handles = self._handles, []
        settle(handles, self.timeout_s)
