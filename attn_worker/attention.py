"""Attention over the paged KV cache for one micro-batch: sequences of different lengths, each
a prefill chunk or one decode token. Plain torch (CPU reference); GPU kernels plug in here."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from attn_worker.kernels.decode_attention import paged_decode_attention
from attn_worker.kv_cache import KVCache


@dataclass(frozen=True)
class SeqView:
    q_start: int  # first row of this sequence in the micro-batch
    q_len: int  # tokens computed this step
    ctx_len: int  # tokens in the cache once this step's are written
    block_table: torch.Tensor  # [num_blocks] int64


class DecodeAttention:
    """Decode attention over explicit tensors: every row one new token of its own sequence.
    `num_splits` fixed and no `max_seq_len` sizes each sequence's splits on the device, with
    no host value in the launch (what a captured CUDA graph needs)."""

    def __init__(
        self,
        cache: KVCache,
        block_tables: torch.Tensor,  # [B, max_blocks] int32
        seq_lens: torch.Tensor,  # [B] int32, this step's token included
        slots: torch.Tensor,  # [B] int64
        scale: float,
        max_seq_len: int | None = None,
        num_splits: int | None = None,
    ) -> None:
        self.cache, self.block_tables, self.seq_lens, self.slots = (
            cache,
            block_tables,
            seq_lens,
            slots,
        )
        self.scale, self.max_seq_len, self.num_splits = scale, max_seq_len, num_splits

    def at(self, layer: int):
        return lambda q, k, v: self.forward(layer, q, k, v)

    def forward(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        """q [B, Hq, D], k/v [B, 1, D] -> [B, Hq, D]; writes k/v into the cache first."""
        self.cache.write(layer, self.slots, k[:, 0], v[:, 0])
        k_scale, v_scale = self.cache.scales(layer)  # fp8 KV: one scale per token vector
        return paged_decode_attention(
            q,
            self.cache.k[layer],
            self.cache.v[layer],
            self.block_tables,
            self.seq_lens,
            self.scale,
            self.max_seq_len,
            k_scale,
            v_scale,
            num_splits=self.num_splits,
        )


class BatchAttention:
    """The attention function of one micro-batch; call `at(layer)` to get the per-layer fn.
    A decode-only micro-batch runs the paged decode kernel (Triton on GPU, its torch
    reference on CPU); anything with a prefill chunk runs per-sequence causal attention."""

    def __init__(
        self, cache: KVCache, seqs: list[SeqView], slots: torch.Tensor, scale: float
    ) -> None:
        self.cache, self.seqs, self.slots, self.scale = cache, seqs, slots, scale
        self.decode_only = all(s.q_len == 1 for s in seqs)
        if self.decode_only:
            self._decode_inputs()

    def _decode_inputs(self) -> None:
        device = self.slots.device
        width = max(len(s.block_table) for s in self.seqs)
        tables = torch.zeros(len(self.seqs), width, dtype=torch.int32, device=device)
        for i, s in enumerate(self.seqs):
            tables[i, : len(s.block_table)] = s.block_table
        self.block_tables = tables  # [B, max_blocks]
        self.seq_lens = torch.tensor(
            [s.ctx_len for s in self.seqs], dtype=torch.int32, device=device
        )
        max_len = max(s.ctx_len for s in self.seqs)
        self.decode = DecodeAttention(
            self.cache, tables, self.seq_lens, self.slots, self.scale, max_len
        )

    def at(self, layer: int):
        return lambda q, k, v: self.forward(layer, q, k, v)

    def forward(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        """q [T, Hq, D], k/v [T, 1, D] -> [T, Hq, D]; writes k/v into the cache first."""
        if self.decode_only:
            return self.decode.forward(layer, q, k, v)
        self.cache.write(layer, self.slots, k[:, 0], v[:, 0])
        out = torch.empty_like(q)
        for s in self.seqs:
            keys, values = self.cache.gather(layer, s.block_table, s.ctx_len)  # [L, D]
            rows = slice(s.q_start, s.q_start + s.q_len)
            out[rows] = attend(q[rows], keys, values, self.scale)  # the last q_len positions
        return out


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of n queries, the last n of L positions, over L keys of one shared KV
    head. Heads as the batch (K/V broadcast to them, no copy) with a lower-right causal bias
    runs FlashAttention on GPUs; an explicit [n, L] mask fell back to SDPA's math kernel,
    12-48x slower (bench/NOTES-kernels.md, version 12)."""
    n, heads, dim = q.shape
    length = k.shape[0]
    o = F.scaled_dot_product_attention(
        q.transpose(0, 1)[:, None],  # [Hq, 1, n, D]
        k[None, None].expand(heads, 1, length, dim),  # [Hq, 1, L, D], stride 0 over heads
        v[None, None].expand(heads, 1, length, dim),
        attn_mask=causal_lower_right(n, length) if n > 1 else None,
        scale=scale,
    )
    return o[:, 0].transpose(0, 1)  # [n, Hq, D]
