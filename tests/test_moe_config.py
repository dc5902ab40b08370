"""The MoE's tile rules (ffn_worker/kernels/moe_config.py): what fused_moe runs at Step3's
widths fits in shared memory and in the weights' scale blocks."""

from __future__ import annotations

import pytest
import torch

from afd.quantization import BlockScales
from ffn_worker.kernels.moe_config import tile_config

# (name, x dtype, weights' scale block or None for 16-bit weights, fp8 activations): every
# way fused_moe can run Step3's experts
SERVED_MODES = [
    ("bf16", torch.bfloat16, None, False),
    ("fp32", torch.float32, None, False),
    ("fp8_per_channel", torch.bfloat16, (1, 7168), True),
    ("fp8_blocks", torch.bfloat16, (128, 128), True),
    ("fp8_blocks_widened", torch.bfloat16, (128, 128), False),
    ("fp8_per_channel_fp32_x", torch.float32, (1, 7168), True),
]


@pytest.mark.parametrize("tokens", [1, 8, 64, 256, 1024, 4096, 16384])
@pytest.mark.parametrize("mode", SERVED_MODES, ids=[m[0] for m in SERVED_MODES])
def test_served_tiles_fit_shared_memory_and_scale_blocks(tokens: int, mode: tuple) -> None:
    """The tiles fused_moe picks for Step3's layer (48 experts top-3, 7168 -> 5120) fit an
    H100's 227 KiB of shared memory (counted: a buffer of the A tile and the weight tiles
    per pipeline stage, plus a 16-bit copy of the weight tiles where fp8 weights are
    widened for 16-bit tensor cores), and each K tile sits in one scale block."""
    _, x_dtype, block, a8 = mode
    hidden, inter = 7168, 5120
    scales = None
    if block is not None:
        scales = tuple(
            BlockScales(torch.ones(48, n // block[0], k // block[1]), block)
            for n, k in ((inter, hidden), (inter, hidden), (hidden, inter))
        )
    cfg = tile_config(None, tokens * 3, 48, x_dtype, scales, a8)
    a_bytes = 1 if (block is not None and a8) else x_dtype.itemsize
    w_bytes = 2 if block is None else 1
    for gemm, weights in ((cfg.gate_up, 2), (cfg.down, 1)):
        stage = (
            cfg.block_m * gemm.block_k * a_bytes + weights * gemm.block_n * gemm.block_k * w_bytes
        )
        widened = weights * gemm.block_n * gemm.block_k * a_bytes if block and not a8 else 0
        assert stage * gemm.num_stages + widened <= 227 * 1024, (cfg, stage, gemm)
        assert gemm.block_n <= 256 and gemm.block_k <= 256  # TMA boxes
        if block is not None and block[1] < hidden:
            assert block[1] % gemm.block_k == 0
