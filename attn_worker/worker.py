"""The attention-rank process: `python -m attn_worker.worker SPEC_JSON`. Loads the attention
side, owns its KV cache, runs step plans through the micro-batch pipeline, returns tokens."""

from __future__ import annotations

import sys

from afd.config import ModelConfig
from afd.engine.builder import blocks_in_memory, table_width
from afd.engine.messages import StepResult, WorkerError, WorkerReady
from afd.launch.worker_spec import WorkerSpec, worker_loop
from afd.models.build import load_attention_side, resolve_dtype
from attn_worker.decode_graphs import DecodeGraphs
from attn_worker.kv_cache import KVCache
from attn_worker.messages import StepPlan
from attn_worker.model_runner import AttnRunner
from attn_worker.remote_ffn import RemoteFFN
from transport.base import TransportTimeout


def main(argv: list[str]) -> int:
    spec = WorkerSpec.from_json(argv[0])
    cfg = ModelConfig.from_pretrained(spec.model)
    dtype, device = resolve_dtype(spec.dtype, cfg), spec.torch_device()
    with spec.session() as (channel, transport):
        side = load_attention_side(spec.model, cfg, dtype, device, spec.fp8_attention)
        blocks = spec.num_kv_blocks or blocks_in_memory(
            cfg, spec.block_size, dtype, device, spec.kv_cache_dtype
        )
        cache = KVCache.for_model(cfg, blocks, spec.block_size, dtype, device, spec.kv_cache_dtype)
        graphs = None
        if spec.cuda_graph_max_batch and device.type == "cuda":
            max_len = spec.max_model_len or cfg.max_position_embeddings
            width = table_width(max_len, spec.block_size, blocks)
            graphs = DecodeGraphs(side, cache, spec.cuda_graph_max_batch, width)
        ffn = RemoteFFN(transport, spec.ffn_ranks, spec.recv_timeout_s)
        runner = AttnRunner(side, cache, ffn, spec.index, graphs)
        channel.send(WorkerReady(spec.name, transport.address(), blocks))

        def on_plan(plan: StepPlan) -> StepResult | WorkerError:
            try:
                return runner.execute(plan)
            except TransportTimeout as e:
                return WorkerError(spec.name, f"attention rank {spec.name}: {e}")

        worker_loop(spec, channel, transport, {StepPlan: on_plan})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
