"""FFNClient over the transport: sends a micro-batch's FFN input to every FFN rank and sums
the partial outputs that come back (in rank order, so the sum is deterministic)."""

from __future__ import annotations

import time

import torch

from afd.envs import stage_delays_s
from attn_worker.ffn_client import FFNClient, PendingFFN, Routing
from transport.base import Handle, Transport


class _Pending(PendingFFN):
    def __init__(self, sends: list[Handle], recvs: list[Handle], timeout_s: float) -> None:
        self.sends, self.recvs, self.timeout_s = sends, recvs, timeout_s

    def wait(self) -> torch.Tensor:
        out = None
        for handle in self.recvs:
            (part,) = handle.wait(self.timeout_s)
            out = part if out is None else out + part
        for handle in self.sends:
            handle.wait(self.timeout_s)
        return out


class RemoteFFN(FFNClient):
    def __init__(self, transport: Transport, ffn_ranks: list[str], timeout_s: float) -> None:
        self.transport, self.ffn_ranks, self.timeout_s = transport, ffn_ranks, timeout_s
        self.delay_s, _ = stage_delays_s()

    def submit(
        self, step: int, layer: int, micro_batch: int, x: torch.Tensor, routing: Routing
    ) -> PendingFFN:
        if self.delay_s:  # test hook: stands in for attention compute of this micro-batch
            time.sleep(self.delay_s * x.shape[0])
        tensors = [x] if routing is None else [x, *routing]
        key = (step, layer, micro_batch)
        sends = [self.transport.send(f, key, tensors) for f in self.ffn_ranks]
        recvs = [self.transport.recv(f, key) for f in self.ffn_ranks]
        return _Pending(sends, recvs, self.timeout_s)
