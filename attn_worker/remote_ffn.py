"""FFNClient over the transport: sends a micro-batch's FFN input to every FFN rank and sums
the partial outputs that come back (in rank order, so the sum is deterministic).

Each reply's shape is the input's ([T, H], same dtype), so its receive is posted with the
send; on the nccl transport the step queues without the host waiting on the network. The
host runs at most two layers ahead of the transfers: before it queues layer l it settles
layer l-2's. A healthy pipeline has finished those already; a dead peer shows there as a
TransportTimeout, instead of the host blocking in a full CUDA launch queue, where no
timeout of ours would ever run."""

from __future__ import annotations

import time

import torch

from afd.envs import RUN_AHEAD_LAYERS, stage_delays_s
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
        self._handles: dict[int, list[Handle]] = {}  # layer -> this step's transfers

    def submit(
        self, step: int, layer: int, micro_batch: int, x: torch.Tensor, routing: Routing
    ) -> PendingFFN:
        if self.delay_s:  # test hook: stands in for attention compute of this micro-batch
            time.sleep(self.delay_s * x.shape[0])
        tensors = [x] if routing is None else [x, *routing]
        if layer not in self._handles:  # a new layer: bound how far the host runs ahead
            self._settle_through(layer - RUN_AHEAD_LAYERS)
        key, like = (step, layer, micro_batch), [(tuple(x.shape), x.dtype)]
        sends = [self.transport.send(f, key, tensors) for f in self.ffn_ranks]
        recvs = [self.transport.recv(f, key, like) for f in self.ffn_ranks]
        self._handles.setdefault(layer, []).extend(sends + recvs)
        return _Pending(recvs, self.timeout_s)

    def settle(self) -> None:
        self._settle_through(None)

    def _settle_through(self, last_layer: int | None) -> None:
        """Settle the transfers of layers <= last_layer (None: all of them)."""
        for layer in sorted(self._handles):
            if last_layer is not None and layer > last_layer:
                break
            settle(self._handles.pop(layer), self.timeout_s)
