"""Routing alignment for the MoE GEMMs: (token, slot) pairs grouped by the rank's local
expert, in pair order within an expert, and cut into row tiles per expert (the last one
shorter), in three small Triton kernels (count, plan, scatter) with no host sync, so the
layer stays capturable in a CUDA graph: the tile list has an upper-bound length and entries
past the last tile name expert num_experts.

The order within an expert is fixed (not the order of atomics) because with e4m3 operands a
row's result depends on the tile it lands in: in atomic order the same inputs gave outputs up
to 2 % apart from run to run on an H100 when experts' last tiles ran short, and repeat in pair
order (likely because a short tile of fewer than 64 rows runs `mma.sync` and a full one
`wgmma`, which sum e4m3 products differently; NOTES-kernels version 20)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor


def pairs_per_program(num_pairs: int) -> int:
    """Pairs a program of the count and scatter kernels takes. The scatter sums the counts of
    all earlier programs' blocks, a cost that grows with the square of the programs, so blocks
    grow past 32K pairs. H100, top-3 of 48 experts (`moe_align_blocks_h100.json`), us, blocks of
    128 / 256 / atomic order: T = 64 tokens 10.7 / 14.7 / 8.2, 4096 17.5 / 21.2 / 17.2, 16384
    37.8 / 35.2 / 37.3, 65536 177 / 121 / 122. Past ~200K pairs a step (65K tokens) it grows
    faster than the atomic scatter did."""
    return 128 if num_pairs <= 32768 else 256


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
    ids_ptr, counts_ptr, block_counts_ptr, num_pairs, expert_start, num_experts,
    BLOCK: tl.constexpr, NUM_BINS: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    hist = tl.histogram(_bucket(ids_ptr, offs, num_pairs, expert_start, num_experts), NUM_BINS)
    bins = tl.arange(0, NUM_BINS)
    tl.store(block_counts_ptr + pid * NUM_BINS + bins, hist)  # for the scatter's row bases
    tl.atomic_add(counts_ptr + bins, hist, mask=bins <= num_experts, sem="relaxed")


@triton.jit
def _plan_kernel(
    counts_ptr, first_row_ptr, tile_meta_ptr, num_experts, max_tiles,
    BLOCK_M: tl.constexpr, NUM_BINS: tl.constexpr, TILE_BLOCK: tl.constexpr,
):  # fmt: skip
    # One program: each bucket's first row (other ranks' pairs last), and the tile list.
    bins = tl.arange(0, NUM_BINS)
    counts = tl.load(counts_ptr + bins, mask=bins <= num_experts, other=0)  # [NB]
    first_row = tl.cumsum(counts, 0) - counts
    tl.store(first_row_ptr + bins, first_row, mask=bins <= num_experts)
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
    ids_ptr, first_row_ptr, block_counts_ptr, sorted_ids_ptr, num_pairs, expert_start, num_experts,
    BLOCK: tl.constexpr, NUM_BINS: tl.constexpr, PREV: tl.constexpr,
):  # fmt: skip
    # A pair's row: its expert's first row, plus the expert's pairs in earlier blocks (their
    # counts), plus those before it in this block (a scan over the block's one-hot buckets).
    pid = tl.program_id(0)
    bins = tl.arange(0, NUM_BINS)
    base = tl.load(first_row_ptr + bins, mask=bins <= num_experts, other=0)  # [NB]
    for b0 in range(0, pid, PREV):
        prev = b0 + tl.arange(0, PREV)  # [PREV] earlier blocks
        counts = tl.load(
            block_counts_ptr + prev[:, None] * NUM_BINS + bins[None, :],
            mask=prev[:, None] < pid,
            other=0,
        )  # [PREV, NB]
        base += tl.sum(counts, 0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    bucket = _bucket(ids_ptr, offs, num_pairs, expert_start, num_experts)
    hit = (bucket[:, None] == bins[None, :]).to(tl.int32)  # [BLOCK, NB] one-hot
    before = tl.cumsum(hit, 0) - hit  # same-expert pairs before each, in this block
    row = tl.sum(hit * (base[None, :] + before), 1)  # [BLOCK]
    tl.store(sorted_ids_ptr + row, offs, mask=offs < num_pairs)


def align_by_expert(
    topk_ids: Tensor, expert_start: int, num_experts: int, block_m: int
) -> ExpertTiles:
    """Group (token, slot) pairs by local expert, in pair order, and cut each expert's rows
    into tiles of block_m rows (its last tile shorter). Three small kernels and no host
    sync: the tile list has an upper-bound length, and entries past the last tile name
    expert num_experts."""
    num_pairs = topk_ids.numel()
    ids = topk_ids.reshape(-1)  # [P]
    num_bins = triton.next_power_of_2(num_experts + 2)
    counts = torch.zeros(num_bins, dtype=torch.int32, device=ids.device)  # [NB]
    first_rows = torch.empty_like(counts)
    # Σ ceil(n_e / BM) <= (P + E (BM - 1)) / BM, and each tile holds at least one pair
    max_tiles = max(1, min(num_pairs, (num_pairs + num_experts * (block_m - 1)) // block_m))
    tile_meta = torch.empty(max_tiles, 4, dtype=torch.int32, device=ids.device)
    sorted_ids = torch.empty(num_pairs, dtype=torch.int32, device=ids.device)  # [P]
    block = pairs_per_program(num_pairs)
    grid = (triton.cdiv(num_pairs, block),)
    block_counts = torch.empty(grid[0], num_bins, dtype=torch.int32, device=ids.device)
    _count_kernel[grid](
        ids, counts, block_counts, num_pairs, expert_start, num_experts, block, num_bins
    )
    _plan_kernel[(1,)](
        counts, first_rows, tile_meta, num_experts, max_tiles, block_m, num_bins, 4096 // num_bins
    )
    _scatter_kernel[grid](
        ids, first_rows, block_counts, sorted_ids, num_pairs, expert_start, num_experts,
        block, num_bins, 32,
    )  # fmt: skip
    return ExpertTiles(sorted_ids, tile_meta, block_m)
