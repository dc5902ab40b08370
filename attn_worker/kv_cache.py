"""Paged KV cache of one attention rank: one K and one V vector of head_dim per token per layer,
in fixed-size blocks; a sequence's block table maps its positions to blocks. One extra block
past `num_blocks`, never handed out, takes the writes of padding rows (CUDA-graph replays)."""

from __future__ import annotations

import torch


class KVCache:
    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        shape = (num_layers, num_blocks + 1, block_size, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.block_size = block_size
        self.scratch_block = num_blocks  # the block padding rows read and write

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Stores k/v [T, D] at flat slots [T] (block * block_size + offset)."""
        d = k.shape[-1]
        self.k[layer].view(-1, d).index_copy_(0, slots, k)
        self.v[layer].view(-1, d).index_copy_(0, slots, v)

    def gather(
        self, layer: int, block_table: torch.Tensor, length: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V [length, D] of one sequence, in position order."""
        d = self.k.shape[-1]
        k = self.k[layer, block_table].view(-1, d)[:length]
        v = self.v[layer, block_table].view(-1, d)[:length]
        return k, v
