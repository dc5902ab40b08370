"""The FFN-rank process: `python -m ffn_worker.worker SPEC_JSON`. Loads its shard (experts by
EP, dense and shared FFN sliced by TP) and serves every (layer, micro-batch) of each step."""

from __future__ import annotations

import sys
import time

import torch

from afd.config import ModelConfig
from afd.engine.messages import FFNStepDone, WorkerError, WorkerReady
from afd.engine.stage_clock import StageClock
from afd.envs import RUN_AHEAD_LAYERS, stage_delays_s
from afd.launch.worker_spec import WorkerSpec, worker_loop
from afd.models.build import load_ffn_side, resolve_dtype
from afd.models.step3 import FFNShard, FFNSide
from ffn_worker.graphs import FFNGraphs
from ffn_worker.messages import StepShape
from transport.base import Handle, TensorSpec, Transport, TransportTimeout, settle


class FFNServer:
    """Stateless between steps: a step shape in, one partial output per attention rank out.

    The step shape gives every message's shapes, so each receive is posted before its data
    arrives; on the nccl transport the step is queued without the host waiting on the
    network, at most two layers ahead of the finished transfers (as on the attention side,
    attn_worker/remote_ffn.py): that settle is where a dead attention rank shows as a
    timeout."""

    def __init__(
        self,
        side: FFNSide,
        transport: Transport,
        attn_ranks: list[str],
        timeout_s: float,
        graphs: FFNGraphs | None = None,
    ) -> None:
        """graphs: replay layers at captured token counts (None: all eager)."""
        self.side, self.transport, self.graphs = side, transport, graphs
        self.attn_ranks, self.timeout_s = attn_ranks, timeout_s
        _, self.delay_s = stage_delays_s()
        cfg = side.cfg
        self.dtype = next(side.parameters()).dtype
        self.routed = [cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers)]
        self.clock = StageClock(next(side.parameters()).device)  # FFN compute

    @torch.inference_mode()
    def serve_step(self, shape: StepShape) -> None:
        num_mb = max((len(t) for t in shape.tokens), default=0)
        sends: list[list[Handle]] = []  # per layer
        for layer in range(self.side.cfg.num_hidden_layers):
            if layer >= RUN_AHEAD_LAYERS:  # at most two layers queued ahead of the transfers
                settle(sends[layer - RUN_AHEAD_LAYERS], self.timeout_s)
            sends.append([])
            for k in range(num_mb):
                rows = {a: t[k] for a, t in enumerate(shape.tokens) if k < len(t) and t[k] > 0}
                if rows:
                    sends[layer] += self._serve(shape.step, layer, k, rows)
        for handles in sends[-RUN_AHEAD_LAYERS:]:
            settle(handles, self.timeout_s)

    def _compute(self, layer: int, parts: list[list[torch.Tensor]]) -> torch.Tensor:
        """The partial FFN output for the sources' rows, in source order: a graph replay when
        one is captured for that many rows, else eagerly."""
        xs = [p[0] for p in parts]
        ids = [p[1] for p in parts] if self.routed[layer] else None
        weights = [p[2] for p in parts] if self.routed[layer] else None
        if self.graphs is not None:
            out = self.graphs.run(layer, xs, ids, weights)
            if out is not None:
                return out
        if ids is None:
            return self.side(layer, torch.cat(xs), None, None)
        return self.side(layer, torch.cat(xs), torch.cat(ids), torch.cat(weights))

    def take_compute_s(self) -> float:
        """Device seconds of FFN compute since the last call."""
        return self.clock.take_s()

    def _like(self, layer: int, rows: int) -> list[TensorSpec]:
        """The message an attention rank sends: x [T, H] (+ expert ids, weights [T, k])."""
        cfg = self.side.cfg
        like = [((rows, cfg.hidden_size), self.dtype)]
        if self.routed[layer]:
            top_k = cfg.moe_top_k
            like += [((rows, top_k), torch.int32), ((rows, top_k), self.dtype)]
        return like

    def _serve(self, step: int, layer: int, k: int, rows: dict[int, int]) -> list[Handle]:
        key = (step, layer, k)
        names = [self.attn_ranks[a] for a in rows]
        recvs = [
            self.transport.recv(n, key, self._like(layer, r))
            for n, r in zip(names, rows.values(), strict=True)
        ]
        parts = [h.wait(self.timeout_s) for h in recvs]
        if self.delay_s:  # test hook: stands in for FFN compute
            time.sleep(self.delay_s * sum(rows.values()))
        with self.clock.span():
            out = self._compute(layer, parts)  # [T, H] partial sum
        pieces = out.split(list(rows.values()))
        return [
            self.transport.send(name, key, [piece.contiguous()])
            for name, piece in zip(names, pieces, strict=True)
        ]


def main(argv: list[str]) -> int:
    spec = WorkerSpec.from_json(argv[0])
    cfg = ModelConfig.from_pretrained(spec.model)
    dtype, device = resolve_dtype(spec.dtype, cfg), spec.torch_device()
    shard = FFNShard(spec.index, len(spec.ffn_ranks))
    with spec.session() as (channel, transport):
        side = load_ffn_side(spec.model, cfg, shard, dtype, device, spec.quantization)
        graphs = None
        if spec.cuda_graph_max_batch and device.type == "cuda":
            # a micro-batch gathers the rows of every attention rank
            graphs = FFNGraphs(side, spec.cuda_graph_max_batch * len(spec.attn_ranks))
        server = FFNServer(side, transport, spec.attn_ranks, spec.recv_timeout_s, graphs)
        channel.send(WorkerReady(spec.name, transport.address()))

        def on_shape(shape: StepShape) -> WorkerError | FFNStepDone:
            try:
                server.serve_step(shape)
            except TransportTimeout as e:
                return WorkerError(spec.name, f"FFN rank {spec.name}: {e}")
            return FFNStepDone(spec.name, shape.step, server.take_compute_s())

        worker_loop(spec, channel, transport, {StepShape: on_shape})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
