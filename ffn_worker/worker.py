"""The FFN-rank process: `python -m ffn_worker.worker SPEC_JSON`. Loads its shard (experts by
EP, dense and shared FFN sliced by TP) and serves every (layer, micro-batch) of each step."""

from __future__ import annotations

import sys
import time

import torch

from afd.config import ModelConfig
from afd.engine.messages import FFNStepDone, WorkerError, WorkerReady
from afd.envs import stage_delays_s
from afd.launch.worker_spec import WorkerSpec, worker_loop
from afd.models.build import load_ffn_side, resolve_dtype
from afd.models.step3 import FFNShard, FFNSide
from ffn_worker.messages import StepShape
from transport.base import Transport, TransportTimeout


class FFNServer:
    """Stateless between steps: a step shape in, one partial output per attention rank out."""

    def __init__(
        self, side: FFNSide, transport: Transport, attn_ranks: list[str], timeout_s: float
    ) -> None:
        self.side, self.transport = side, transport
        self.attn_ranks, self.timeout_s = attn_ranks, timeout_s
        _, self.delay_s = stage_delays_s()
        self.compute_s = 0.0  # this step's FFN compute

    @torch.inference_mode()
    def serve_step(self, shape: StepShape) -> None:
        num_mb = max((len(t) for t in shape.tokens), default=0)
        for layer in range(self.side.cfg.num_hidden_layers):
            for k in range(num_mb):
                sources = [a for a, t in enumerate(shape.tokens) if t[k] > 0]
                if sources:
                    self._serve(shape.step, layer, k, sources)

    def _serve(self, step: int, layer: int, k: int, sources: list[int]) -> None:
        key = (step, layer, k)
        names = [self.attn_ranks[a] for a in sources]
        parts = [self.transport.recv(n, key).wait(self.timeout_s) for n in names]
        x = torch.cat([p[0] for p in parts])  # [T, H]
        routing = (
            (torch.cat([p[1] for p in parts]), torch.cat([p[2] for p in parts]))
            if len(parts[0]) == 3
            else (None, None)
        )
        if self.delay_s:  # test hook: stands in for FFN compute
            time.sleep(self.delay_s * x.shape[0])
        start = time.perf_counter()
        out = self.side(layer, x, *routing)  # [T, H] partial sum
        self.compute_s += time.perf_counter() - start
        rows = [p[0].shape[0] for p in parts]
        for name, piece in zip(names, out.split(rows), strict=True):
            self.transport.send(name, key, [piece.contiguous()])


def main(argv: list[str]) -> int:
    spec = WorkerSpec.from_json(argv[0])
    cfg = ModelConfig.from_pretrained(spec.model)
    dtype, device = resolve_dtype(spec.dtype, cfg), spec.torch_device()
    shard = FFNShard(spec.index, len(spec.ffn_ranks))
    with spec.session() as (channel, transport):
        side = load_ffn_side(spec.model, cfg, shard, dtype, device)
        server = FFNServer(side, transport, spec.attn_ranks, spec.recv_timeout_s)
        channel.send(WorkerReady(spec.name, transport.address()))

        def on_shape(shape: StepShape) -> WorkerError | FFNStepDone:
            try:
                server.serve_step(shape)
            except TransportTimeout as e:
                return WorkerError(spec.name, f"FFN rank {spec.name}: {e}")
            compute_s, server.compute_s = server.compute_s, 0.0
            return FFNStepDone(spec.name, shape.step, compute_s)

        worker_loop(spec, channel, transport, {StepShape: on_shape})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
