"""y = x Wᵀ for a weight W [N, K] stored in e4m3 with fp32 block scales (`BlockScales`: a
block-FP8 checkpoint's 128 x 128, or one per output channel quantized at load), as one
Triton kernel. It serves the attention side's projections (q/k/v, wq, o_proj), which a decode
step streams once per layer: half the bytes of their 16-bit weights.

Served (`fp8_activations`, the default): x quantized per row to e4m3 with a power-of-two
scale (one launch, `fp8_rows.quantize_rows`) and the products on fp8 tensor cores, the row
scales applied after the sum, as vLLM's dynamic fp8 does. A row's result is the same bits
whichever rows share the call (batch invariance: a micro-batch split, or another attention:FFN
ratio, computes what the whole batch does): the tiles and the K split depend on the weight's
shape only, never on the row count, and the splits always add up in one order. A grid short
of the SMs spreads them over programs (o_proj at N=7168 has 56 tiles of 128 for 132 SMs),
whose fp32 partials a second launch sums in split order; a full grid sums them inside each
program in the same order. The alternative, the weight widened to x's dtype in registers
with x as it is, is 20-25 % faster at 1-16 rows but 40-70 % slower from 64
(bench/NOTES-kernels.md version 17); tests and benches pick it, and its tiles follow the row
count. The weight scales multiply each K tile's sum when they change along K (BLOCK_K
divides the scale block), else each split's sum once."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from afd.quantization import BlockScales
from attn_worker.kernels.decode_splits import num_sms
from attn_worker.kernels.fp8_rows import quantize_rows


@dataclass(frozen=True)
class LinearConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    splits: int = 1  # K split across programs (summed by fp32 atomics)


@triton.jit
def _split_sum(
    x_ptr, w_ptr, s_ptrs, offs_m, offs_n, rows, k0, k_end, stride_xm, stride_wn, SCALE_K,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    K_BLOCKS: tl.constexpr, A8: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """x[rows, k0:k_end] times the weight tile's columns, in fp32, with the weight scales."""
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + (k0 + offs_k)[None, :]
    w_ptrs = w_ptr + offs_n[None, :].to(tl.int64) * stride_wn + (k0 + offs_k)[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k in range(k0, k_end, BLOCK_K):
        in_k = k + offs_k < k_end
        a = tl.load(a_ptrs, mask=rows[:, None] & in_k[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=in_k[:, None], other=0.0)
        if not A8:  # e4m3 values are exact in 16 bits
            w = w.to(a.dtype)
        if K_BLOCKS:  # the scale of this K tile's block, per output column
            part = tl.dot(a, w, input_precision=PRECISION)
            acc += part * tl.load(s_ptrs + k // SCALE_K)[None, :]
        else:
            acc = tl.dot(a, w, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if not K_BLOCKS:
        acc *= tl.load(s_ptrs)[None, :]
    return acc


@triton.jit
def _fp8_linear_kernel(
    x_ptr, xs_ptr, w_ptr, s_ptr, out_ptr, M, N, K, k_per_split, splits_per_program,
    stride_xm, stride_wn, stride_om, stride_sn, SCALE_N, SCALE_K,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    K_BLOCKS: tl.constexpr, A8: tl.constexpr, PARTIALS: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Program (n, m, p) sums K splits p * splits_per_program onwards, each split's fp32 sum
    scaled on its own and added in split order; PARTIALS: it stores that sum as partial p
    ([programs along K, M, N] fp32, summed in order by _sum_partials_kernel), else the
    output. So a row's result never depends on how the splits were spread over programs."""
    pid_n, pid_m, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N  # wrap: weight loads need no mask
    rows = offs_m < M
    s_ptrs = s_ptr + (offs_n // SCALE_N) * stride_sn  # [BN]
    if A8:
        x_scale = tl.load(xs_ptr + offs_m, mask=rows, other=0.0)
    total = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for split in range(pid_k * splits_per_program, (pid_k + 1) * splits_per_program):
        k0 = split * k_per_split
        acc = _split_sum(
            x_ptr, w_ptr, s_ptrs, offs_m, offs_n, rows, k0, tl.minimum(k0 + k_per_split, K),
            stride_xm, stride_wn, SCALE_K, BLOCK_M, BLOCK_N, BLOCK_K, K_BLOCKS, A8, PRECISION,
        )  # fmt: skip
        if A8:
            acc *= x_scale[:, None]
        total += acc
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = rows[:, None] & (offs_n < N)[None, :]
    if PARTIALS:
        out_ptr += pid_k.to(tl.int64) * M * N
    out_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    tl.store(out_ptrs, total.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _sum_partials_kernel(part_ptr, out_ptr, numel, parts, BLOCK: tl.constexpr):
    """out = ((0 + p0) + p1) + ... in fp32, then out's dtype: the order a single program's
    splits are added in."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    total = tl.zeros([BLOCK], tl.float32)
    for p in range(parts):
        total += tl.load(part_ptr + p * numel + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, total.to(out_ptr.dtype.element_ty), mask=mask)


def default_config(
    m: int, n: int, k: int, num_sms: int, scales: BlockScales, widened: bool = False
) -> LinearConfig:
    """The tile sweep's rules (`python -m afd.bench.kernels_linear`, H100, o_proj / wq /
    q-k-v at M = 1..2048; bench/NOTES-kernels.md version 17). Widened weights (few rows): 32
    or 64 columns a program, and K split until a program streams at most 64 KiB of weight
    (long serial K loops do not keep enough bytes in flight), unless the columns alone give
    two programs an SM. fp8 x: 64 x 128 tiles (64 x 64 under 4096 columns), K split while
    the grid is short of one program an SM. BLOCK_K divides the scale blocks along K."""
    if widened:
        block_m = min(64, max(16, triton.next_power_of_2(m)))
        cfg = LinearConfig(block_m, 32 if m <= 16 else 64, 128, 4, 4)
    else:
        cfg = LinearConfig(64, 128 if n >= 4096 else 64, 128, 4, 4)
    block_k = scales.k_tile(cfg.block_k)
    col_tiles = triton.cdiv(n, cfg.block_n)

    def split_more(splits: int) -> bool:
        if splits == 8 or k < 4 * 2 * splits * block_k:  # at least 4 K tiles a split
            return False
        if widened:
            tiles = col_tiles * triton.cdiv(m, cfg.block_m)
            return tiles < 2 * num_sms and cfg.block_n * k // splits > 64 * 1024
        # by the columns alone, so that a row's K split is the same at every row count
        return col_tiles * splits < num_sms

    splits = 1
    while split_more(splits):
        splits *= 2
    return LinearConfig(cfg.block_m, cfg.block_n, block_k, cfg.num_warps, cfg.num_stages, splits)


def fp8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    scales: BlockScales,
    config: LinearConfig | None = None,
    fp8_activations: bool = True,
) -> torch.Tensor:
    """x [M, K] (16- or 32-bit, unit stride along K) times weight [N, K] (e4m3)ᵀ -> [M, N]
    in x's dtype. `fp8_activations` False: the weight widened instead, x as it is."""
    m, k = x.shape
    n = weight.shape[0]
    assert weight.dtype == torch.float8_e4m3fn and weight.is_contiguous() and x.stride(1) == 1
    assert tuple(scales.scale.shape) == BlockScales.shape_for((n, k), scales.block)
    assert scales.scale.dtype == torch.float32 and scales.scale.is_contiguous()
    rows, cols = scales.block
    k_blocks = scales.scale.shape[-1] > 1
    if m == 0:
        return x.new_empty(0, n)
    sms = num_sms(x.device) if x.is_cuda else 132
    if config is None:
        config = default_config(m, n, k, sms, scales, not fp8_activations)
        if x.element_size() > 2:  # fp32 x: widened tiles of 4 bytes, fewer fit in shared memory
            config = replace(config, block_k=min(config.block_k, 64), num_stages=2)
    assert not k_blocks or cols % config.block_k == 0, "a K tile must sit in one scale block"
    a8 = fp8_activations
    x_in, x_scale = quantize_rows(x) if a8 else (x, x)  # one scale per row
    k_per_split = triton.cdiv(triton.cdiv(k, config.splits), config.block_k) * config.block_k
    splits = triton.cdiv(k, k_per_split)
    tiles = (triton.cdiv(n, config.block_n), triton.cdiv(m, config.block_m))
    # a grid short of the SMs spreads the splits over programs (fp32 partials, then a sum in
    # split order); a full one sums them in each program in the same order
    spread = splits > 1 and tiles[0] * tiles[1] < sms
    if spread:
        y = torch.empty(splits, m, n, device=x.device, dtype=torch.float32)
    else:
        y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    _fp8_linear_kernel[(*tiles, splits if spread else 1)](
        x_in, x_scale, weight, scales.scale, y, m, n, k, k_per_split, 1 if spread else splits,
        x_in.stride(0), weight.stride(0), n, scales.scale.stride(0), rows, cols,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        K_BLOCKS=k_blocks, A8=a8, PARTIALS=spread,
        # fp32 x (tests, the tiny model): full fp32 products, not TF32's 10-bit mantissas
        PRECISION="ieee" if x_in.dtype == torch.float32 else "tf32",
        num_warps=config.num_warps, num_stages=config.num_stages,
        enable_fp_fusion=False,  # a fused multiply-add would round one spread differently
    )  # fmt: skip
    if not spread:
        return y
    out = torch.empty(m, n, device=x.device, dtype=x.dtype)
    block = 1024
    _sum_partials_kernel[(triton.cdiv(m * n, block),)](y, out, m * n, splits, BLOCK=block)
    return out
