"""Each attention block (norms, QKV, RoPE, KV write, MFA decode attention, output projection,
router) as CUDA graphs at captured batch sizes, for micro-batches in which every sequence
decodes one token. Graphs are per (layer, size); the inputs that change per step (positions,
KV slots, block tables, lengths) and per layer (the residual stream) are copied into static
buffers before each replay, and the outputs copied out after it (the next replay rewrites
them while the transport may still be sending the last ones).

Rows past the batch, up to the captured size, are padding: they decode one token of the
cache's scratch block, so they stay finite and never touch a real sequence's KV."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from afd.cuda_graphs import GraphRunner, capture_sizes, size_for
from afd.models.step3 import AttentionSide
from attn_worker.attention import BatchAttention, DecodeAttention
from attn_worker.ffn_client import Routing
from attn_worker.kernels.decode_splits import graph_num_splits
from attn_worker.kv_cache import KVCache


@dataclass
class GraphInputs:
    """One micro-batch's per-step inputs, padded to its captured size."""

    rows: int
    size: int
    positions: torch.Tensor  # [size] int64
    slots: torch.Tensor  # [size] int64
    block_tables: torch.Tensor  # [size, width] int32
    seq_lens: torch.Tensor  # [size] int32


class DecodeGraphs:
    def __init__(
        self, side: AttentionSide, cache: KVCache, max_batch: int, max_blocks: int
    ) -> None:
        """max_blocks: the widest block table (max model length / block size)."""
        cfg, param = side.cfg, next(side.parameters())
        self.side, self.cache, self.sizes = side, cache, capture_sizes(max_batch)
        self.scale = cfg.head_dim**-0.5
        n, hidden, top_k, dev = self.sizes[-1], cfg.hidden_size, cfg.moe_top_k, param.device
        scratch = cache.scratch_block
        self.scratch_slot = scratch * cache.block_size
        like = dict(device=dev, dtype=param.dtype)
        self.h = torch.zeros(n, hidden, **like)  # [N, H] residual stream in
        self.positions = torch.zeros(n, dtype=torch.long, device=dev)  # [N]
        self.slots = torch.full((n,), self.scratch_slot, dtype=torch.long, device=dev)  # [N]
        self.block_tables = torch.full((n, max_blocks), scratch, dtype=torch.int32, device=dev)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=dev)  # [N]
        self.h_out, self.x = torch.zeros(n, hidden, **like), torch.zeros(n, hidden, **like)
        self.ids = torch.zeros(n, top_k, dtype=torch.int32, device=dev)  # [N, k]
        self.weights = torch.zeros(n, top_k, **like)  # [N, k]
        self.routed = [cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers)]
        runner = GraphRunner(dev)
        self.replays = {
            (layer, size): runner.capture(partial(self._forward, layer, size))
            for size in reversed(self.sizes)
            for layer in range(cfg.num_hidden_layers)
        }

    def _forward(self, layer: int, size: int) -> None:
        cos, sin = self.side.rope.cos_sin(self.positions[:size])
        attention = DecodeAttention(
            self.cache,
            self.block_tables[:size],
            self.seq_lens[:size],
            self.slots[:size],
            self.scale,
            num_splits=graph_num_splits(
                size, self.cache.block_size * self.block_tables.shape[1], self.cache.fp8
            ),
        )
        h, x, routing = self.side.layer(layer)(self.h[:size], cos, sin, attention.at(layer))
        self.h_out[:size].copy_(h)
        self.x[:size].copy_(x)
        if routing is not None:
            self.ids[:size].copy_(routing[0])
            self.weights[:size].copy_(routing[1])

    def prepare(self, positions: torch.Tensor, attention: BatchAttention) -> GraphInputs | None:
        """The padded inputs of a micro-batch, once per step; None if it cannot replay (a
        prefill chunk in it, or more rows than the largest captured size)."""
        rows = positions.shape[0]
        size = size_for(self.sizes, rows)
        if not attention.decode_only or size is None:
            return None
        pad = size - rows
        tables = attention.block_tables  # [rows, width]
        if pad:
            fill = tables.new_full((pad, tables.shape[1]), self.cache.scratch_block)
            tables = torch.cat([tables, fill])
        return GraphInputs(
            rows,
            size,
            torch.cat([positions, positions.new_zeros(pad)]),
            torch.cat([attention.slots, attention.slots.new_full((pad,), self.scratch_slot)]),
            tables,
            torch.cat([attention.seq_lens, attention.seq_lens.new_ones(pad)]),
        )

    def run(
        self, layer: int, h: torch.Tensor, inputs: GraphInputs
    ) -> tuple[torch.Tensor, torch.Tensor, Routing]:
        """What `side.layer(layer)(h, ...)` returns for this micro-batch, by replay."""
        rows, size = inputs.rows, inputs.size
        width = inputs.block_tables.shape[1]
        self.h[:rows].copy_(h)
        self.positions[:size].copy_(inputs.positions)
        self.slots[:size].copy_(inputs.slots)
        self.block_tables[:size, :width].copy_(inputs.block_tables)
        self.seq_lens[:size].copy_(inputs.seq_lens)
        self.replays[(layer, size)]()
        routing = None
        if self.routed[layer]:
            routing = (self.ids[:rows].clone(), self.weights[:rows].clone())
        return self.h_out[:rows].clone(), self.x[:rows].clone(), routing
