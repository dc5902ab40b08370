"""How many splits a paged MFA decode launch cuts each sequence into (split-K over tokens), by
a model of waves and per-program bandwidth fitted to H100 sweeps, and the default tiles it
assumes. The kernels are in decode_attention.py."""

from __future__ import annotations

import functools

import torch
import triton

# Default tiles, the fastest measured at every benchmarked shape (H100, bench/results): 32
# tokens a tile, 4 warps, 4 stages (two tiles in flight), one 164 KB program per SM. fp8 KV:
# 2 stages, two programs per SM (1.5x faster than one: bench/NOTES-kernels.md, version 11).
DEFAULT_BLOCK_N = 32
FP8_PROGRAMS_PER_SM = 2


@functools.cache
def num_sms(device: torch.device) -> int:
    """The device's SM count; 4 off CUDA (the interpreter: a few splits still exercise the
    reduce)."""
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


# The split-count model's two measured constants (H100, bench/NOTES-kernels.md, version 10):
# one program streams up to ~1.9x its fair share (1/SMs) of memory bandwidth (64 programs
# reached 2.8 of 3.0 TB/s), and splitting costs about 9 tiles' time: the reduce launch, the
# partials, and more programs racing for bandwidth, whose slowest sets the end.
_PROGRAM_SPEEDUP = 1.9
_SPLIT_COST_TILES = 9.0


@functools.lru_cache(maxsize=4096)
def choose_num_splits(batch: int, max_seq_len: int, block_n: int, slots: int) -> int:
    """Splits per sequence with the least modelled time, in units of one tile streamed at a
    fair share of bandwidth. `slots` programs run at once; each wave of n programs, each
    with t tiles, takes t x max(1 / _PROGRAM_SPEEDUP, n / slots): a short wave is bound by
    what one program can stream, a full one by the memory. Splitting adds a fixed cost."""
    tiles = max(1, triton.cdiv(max_seq_len, block_n))
    best_cost, best = float("inf"), 1
    for splits in range(1, min(tiles, 64) + 1):
        per_split = triton.cdiv(tiles, splits)
        programs, cost = batch * triton.cdiv(tiles, per_split), 0.0
        while programs > 0:  # wave by wave
            wave = min(programs, slots)
            cost += per_split * max(1 / _PROGRAM_SPEEDUP, wave / slots)
            programs -= wave
        cost += _SPLIT_COST_TILES if splits > 1 else 0.0
        if cost < best_cost - 1e-9:
            best_cost, best = cost, splits
    return best


def graph_num_splits(batch: int, max_seq_len: int, fp8: bool = False) -> int:
    """The split count for a launch captured once and replayed at any lengths up to
    `max_seq_len`: the default tiles' choice for the longest case (shorter sequences cut
    themselves into as many, smaller, splits)."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    slots = num_sms(device) * (FP8_PROGRAMS_PER_SM if fp8 else 1)
    return choose_num_splits(batch, max_seq_len, DEFAULT_BLOCK_N, slots)
