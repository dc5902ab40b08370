"""Routing alignment for the MoE GEMMs: (token, slot) pairs grouped by the rank's local
expert and cut into row tiles per expert (the last one shorter), in three small Triton
kernels (count, plan, scatter) with no host sync, so the layer stays capturable in a CUDA
graph: the tile list has an upper-bound length and entries past the last tile name expert
num_experts."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor


@dataclass(frozen=True)
class ExpertTiles:
    """Pairs sorted by expert and the row tiles over them (built on the GPU, no host sync)."""

    sorted_ids: Tensor  # [P] int32 pair index t*k+j, grouped by local expert, others' last
    tile_meta: Tensor  # [max_tiles, 4] int32: expert, its first tile, first row, rows
    block_m: int


@triton.jit
def _bucket(ids_ptr, offs, num_pairs, expert_start, num_experts):
    # local expert of each pair; num_experts for other ranks' experts, +1 past the end
    in_range = offs < num_pairs
    local = tl.load(ids_ptr + offs, mask=in_range, other=0).to(tl.int32) - expert_start
    bucket = tl.where((local >= 0) & (local < num_experts), local, num_experts)
    return tl.where(in_range, bucket, num_experts + 1)


@triton.jit
def _count_kernel(
    ids_ptr, counts_ptr, num_pairs, expert_start, num_experts,
    BLOCK: tl.constexpr, NUM_BINS: tl.constexpr,
):  # fmt: skip
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    hist = tl.histogram(_bucket(ids_ptr, offs, num_pairs, expert_start, num_experts), NUM_BINS)
    bins = tl.arange(0, NUM_BINS)
    tl.atomic_add(counts_ptr + bins, hist, mask=bins <= num_experts, sem="relaxed")


@triton.jit
def _plan_kernel(
    counts_ptr, cursor_ptr, tile_meta_ptr, num_experts, max_tiles,
    BLOCK_M: tl.constexpr, NUM_BINS: tl.constexpr, TILE_BLOCK: tl.constexpr,
):  # fmt: skip
    # One program: each bucket's first row (other ranks' pairs last), and the tile list.
    bins = tl.arange(0, NUM_BINS)
    counts = tl.load(counts_ptr + bins, mask=bins <= num_experts, other=0)  # [NB]
    first_row = tl.cumsum(counts, 0) - counts
    tl.store(cursor_ptr + bins, first_row, mask=bins <= num_experts)
    tiles = tl.where(bins < num_experts, tl.cdiv(counts, BLOCK_M), 0)  # [NB]
    tile_end = tl.cumsum(tiles, 0)
    for t0 in range(0, max_tiles, TILE_BLOCK):
        tile = t0 + tl.arange(0, TILE_BLOCK)  # [TB]
        done = (tile_end[None, :] <= tile[:, None]) & (bins[None, :] < num_experts)
        expert = tl.sum(done.to(tl.int32), axis=1)  # [TB]
        pick = bins[None, :] == tl.minimum(expert, num_experts - 1)[:, None]  # [TB, NB]
        meta = tile_meta_ptr + tile * 4
        ok = tile < max_tiles
        tl.store(meta, expert, mask=ok)  # num_experts past the last tile
        tl.store(meta + 1, tl.sum(tl.where(pick, (tile_end - tiles)[None, :], 0), 1), mask=ok)
        tl.store(meta + 2, tl.sum(tl.where(pick, first_row[None, :], 0), 1), mask=ok)
        tl.store(meta + 3, tl.sum(tl.where(pick, counts[None, :], 0), 1), mask=ok)


@triton.jit
def _scatter_kernel(
    ids_ptr, cursor_ptr, sorted_ids_ptr, num_pairs, expert_start, num_experts,
    BLOCK: tl.constexpr,
):  # fmt: skip
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    bucket = _bucket(ids_ptr, offs, num_pairs, expert_start, num_experts)
    in_range = offs < num_pairs
    # rows within an expert land in atomic order: each row's result does not depend on it
    row = tl.atomic_add(cursor_ptr + bucket, 1, mask=in_range, sem="relaxed")
    tl.store(sorted_ids_ptr + row, offs, mask=in_range)


def align_by_expert(
    topk_ids: Tensor, expert_start: int, num_experts: int, block_m: int
) -> ExpertTiles:
    """Group (token, slot) pairs by local expert and cut each expert's rows into tiles of
    block_m rows (its last tile shorter). Three small kernels and no host sync: the tile list
    has an upper-bound length, and entries past the last tile name expert num_experts."""
    num_pairs = topk_ids.numel()
    ids = topk_ids.reshape(-1)  # [P]
    num_bins = triton.next_power_of_2(num_experts + 2)
    counts = torch.zeros(num_bins, dtype=torch.int32, device=ids.device)  # [NB]
    cursor = torch.empty_like(counts)
    # Σ ceil(n_e / BM) <= (P + E (BM - 1)) / BM, and each tile holds at least one pair
    max_tiles = max(1, min(num_pairs, (num_pairs + num_experts * (block_m - 1)) // block_m))
    tile_meta = torch.empty(max_tiles, 4, dtype=torch.int32, device=ids.device)
    sorted_ids = torch.empty(num_pairs, dtype=torch.int32, device=ids.device)  # [P]
    grid = (triton.cdiv(num_pairs, 1024),)
    _count_kernel[grid](ids, counts, num_pairs, expert_start, num_experts, 1024, num_bins)
    _plan_kernel[(1,)](
        counts, cursor, tile_meta, num_experts, max_tiles, block_m, num_bins, 4096 // num_bins
    )
    _scatter_kernel[grid](ids, cursor, sorted_ids, num_pairs, expert_start, num_experts, 1024)
    return ExpertTiles(sorted_ids, tile_meta, block_m)
