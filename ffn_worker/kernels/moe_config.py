"""Tile configurations of the MoE grouped GEMMs (moe_gemm.py): the defaults by rows per expert,
their changes for fp32 activations, e4m3 operands and scales per block along K, and
`tile_config`, which picks the tiles a call runs."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from afd.quantization import BlockScales


@dataclass(frozen=True)
class GemmConfig:
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    tma: bool = False  # weight tiles through TMA descriptors instead of pointer loads
    # fp8 activations: products summed in fp32 every this many K (0: Triton's default); the
    # fp8 tensor cores keep a short running sum (DeepSeek-V3 promotes every 128)
    fp8_promote_k: int = 0


@dataclass(frozen=True)
class MoeConfig:
    block_m: int  # rows per tile; an expert's rows are cut into tiles of this many
    gate_up: GemmConfig
    down: GemmConfig
    small_m: int = 0  # an expert's last tile with at most this many rows runs this size


def default_config(num_pairs: int, num_experts: int) -> MoeConfig:
    """`num_experts`: the model's (rows per expert = num_pairs / num_experts, whichever
    experts a rank holds). Tiles by rows per expert: few rows stream weights
    (bandwidth-bound), many rows want big tiles for the tensor cores, and an expert's short
    last tile runs small. The fastest in `afd-bench kernels` on an H100
    (bench/results/kernels_moe_h100.json) at T = 64, 256, 1024, 4096 with 48 experts top-3."""
    rows = num_pairs / max(1, num_experts)
    if rows <= 8:
        return MoeConfig(16, GemmConfig(64, 256, 4, 3), GemmConfig(64, 256, 4, 3))
    if rows <= 24:
        return MoeConfig(32, GemmConfig(128, 128, 4, 3), GemmConfig(128, 128, 4, 3), 16)
    if rows <= 96:
        return MoeConfig(64, GemmConfig(64, 128, 4, 4), GemmConfig(256, 64, 8, 3), 16)
    return MoeConfig(128, GemmConfig(128, 64, 8, 4), GemmConfig(256, 64, 8, 4, tma=True), 32)


def fp32_input_tiles(cfg: MoeConfig) -> MoeConfig:
    """fp32 activations (tests, the tiny model, --dtype float32): 4-byte tiles, twice the
    16-bit ones' bytes (and fp8 weights widen to them), so shorter K steps and two stages
    make the 16-bit tiles' configs fit (rows <= 8 at 3 stages of K 256 asked for 288 KiB)."""
    fit = lambda g: replace(g, block_k=min(g.block_k, 64), num_stages=2)  # noqa: E731
    return replace(cfg, gate_up=fit(cfg.gate_up), down=fit(cfg.down))


def fp8_operand_tiles(cfg: MoeConfig) -> MoeConfig:
    """Both operands in e4m3 (fp8 activations): K tiles of at least 128, so that each K row
    of a tile is 128 bytes, as a 16-bit tile's 64 is. H100, per-channel scales: T=1024 2.29
    -> 2.09 ms, T=4096 3.94 -> 3.41; 128 x 128 blocks, whose scaled tile sums Triton waits
    for at every K step, so that half the steps halve the waits: T=1024 2.51 -> 2.20, T=4096
    7.9 -> 5.6 (bench/NOTES-kernels.md version 18)."""
    wide = lambda g: replace(g, block_k=max(g.block_k, 128))  # noqa: E731
    return replace(cfg, gate_up=wide(cfg.gate_up), down=wide(cfg.down))


def fit_scale_blocks(cfg: MoeConfig, scales: tuple[BlockScales, ...] | None) -> MoeConfig:
    """K tiles that each sit in one scale block along K, so that each tile's sum takes one
    scale. That sum is a second accumulator beside the running one: tiles of more than
    128 x 128 fp32 sums (gate and up count twice) are halved along N, or they spill
    registers (H100, T=4096: 14.1 ms against 4.9 with a scale per channel; version 17)."""
    if scales is None:
        return cfg

    def fit(g: GemmConfig, s: BlockScales, sums: int) -> GemmConfig:
        if s.scale.shape[-1] == 1:
            return g
        block_n = g.block_n
        while block_n > 32 and sums * cfg.block_m * block_n > 128 * 128:
            block_n //= 2
        return replace(g, block_k=s.k_tile(g.block_k), block_n=block_n)

    return replace(cfg, gate_up=fit(cfg.gate_up, scales[0], 2), down=fit(cfg.down, scales[2], 1))


def tile_config(
    config: MoeConfig | None,
    num_pairs: int,
    model_experts: int,
    x_dtype: torch.dtype,
    scales: tuple[BlockScales, ...] | None,
    fp8_activations: bool,
) -> MoeConfig:
    """The tiles fused_moe_triton runs: `config`, or the default by rows per expert with K
    tiles of 128 when both operands are e4m3 (a speed preference, so a given config stays as
    given); short K tiles for fp32 x and K tiles inside the scale blocks (both needed: to fit
    in shared memory, to be right)."""
    cfg = config or default_config(num_pairs, model_experts)
    if x_dtype == torch.float32:
        cfg = fp32_input_tiles(cfg)
    elif config is None and scales is not None and fp8_activations:
        cfg = fp8_operand_tiles(cfg)
    return fit_scale_blocks(cfg, scales)
