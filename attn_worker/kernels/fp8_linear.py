"""y = x Wᵀ for a weight W [N, K] stored in e4m3 with fp32 block scales (`BlockScales`: a
block-FP8 checkpoint's 128 x 128, or one per output channel quantized at load), as one
Triton kernel. It serves the attention side's projections (q/k/v, wq, o_proj), which a decode
step streams once per layer: half the bytes of their 16-bit weights.

Served (`fp8_activations`, the default): x quantized per row to e4m3 with a power-of-two
scale (one launch, `fp8_rows.quantize_rows`) and the products on fp8 tensor cores, the row
scales applied after the sum, as vLLM's dynamic fp8 does. A row's result is the same bits
whichever rows share the call (batch invariance: a micro-batch split, or another attention:FFN
ratio, computes what the whole batch does): served tiles never split K, so every row sums
its K tiles in one order; the columns a program takes follow the row count, and on an H100
each output element came out the same bits at 16 to 128 columns a tile (tests check the
served tiles). A split K (an explicit config, or widened weights) sums the splits by fp32
atomics, in no fixed order. The alternative, the weight widened to x's dtype in registers
with x as it is, is 20-25 % faster at 1-16 rows but 40-70 % slower from 64
(bench/NOTES-kernels.md version 17); tests and benches pick it. The weight scales multiply
each K tile's sum when they change along K (BLOCK_K divides the scale block), else the whole
sum once."""

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
def _fp8_linear_kernel(
    x_ptr, xs_ptr, w_ptr, s_ptr, out_ptr, M, N, K, k_per_split, stride_xm, stride_wn,
    stride_om, stride_sn, SCALE_N, SCALE_K,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    K_BLOCKS: tl.constexpr, A8: tl.constexpr, ATOMIC: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    pid_n, pid_m, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N  # wrap: weight loads need no mask
    offs_k = tl.arange(0, BLOCK_K)
    k0 = pid_k * k_per_split
    k_end = tl.minimum(k0 + k_per_split, K)
    rows = offs_m < M
    a_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + (k0 + offs_k)[None, :]
    w_ptrs = w_ptr + offs_n[None, :].to(tl.int64) * stride_wn + (k0 + offs_k)[:, None]
    s_ptrs = s_ptr + (offs_n // SCALE_N) * stride_sn  # [BN]
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
    if A8:
        acc *= tl.load(xs_ptr + offs_m, mask=rows, other=0.0)[:, None]
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    out_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    mask = rows[:, None] & (offs_n < N)[None, :]
    if ATOMIC:
        tl.atomic_add(out_ptrs, acc, mask=mask, sem="relaxed")
    else:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def default_config(
    m: int, n: int, k: int, num_sms: int, scales: BlockScales, widened: bool = False
) -> LinearConfig:
    """The tile sweeps' rules (H100; bench/NOTES-kernels.md versions 17 and 19). fp8 x (served):
    no K split at any row count (batch invariance, above); one row tile (decode rows) takes 32
    columns a program, 6 stages on long K; more rows take 64 columns while the grid of 128
    would be short of one program an SM, else 128. Widened weights (few rows): 32 or 64
    columns a program, and K split until a program streams at most 64 KiB of weight (long
    serial K loops do not keep enough bytes in flight), unless the columns alone give two
    programs an SM. BLOCK_K divides the scale blocks along K."""
    if not widened:
        block_k = scales.k_tile(128)
        if m <= 64:
            return LinearConfig(64, 32, block_k, 4, 6 if k > 4096 else 4)
        full = triton.cdiv(n, 128) * triton.cdiv(m, 64) >= num_sms
        return LinearConfig(64, 128 if full else 64, block_k, 4, 4)
    cfg = LinearConfig(
        min(64, max(16, triton.next_power_of_2(m))), 32 if m <= 16 else 64, 128, 4, 4
    )
    block_k = scales.k_tile(cfg.block_k)
    tiles = triton.cdiv(n, cfg.block_n) * triton.cdiv(m, cfg.block_m)

    def split_more(splits: int) -> bool:
        if splits == 8 or k < 4 * 2 * splits * block_k:  # at least 4 K tiles a split
            return False
        return tiles < 2 * num_sms and cfg.block_n * k // splits > 64 * 1024

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
    if config is None:
        sms = num_sms(x.device) if x.is_cuda else 132
        config = default_config(m, n, k, sms, scales, not fp8_activations)
        if x.element_size() > 2:  # fp32 x: widened tiles of 4 bytes, fewer fit in shared memory
            config = replace(config, block_k=min(config.block_k, 64), num_stages=2)
    assert not k_blocks or cols % config.block_k == 0, "a K tile must sit in one scale block"
    a8 = fp8_activations
    x_in, x_scale = quantize_rows(x) if a8 else (x, x)  # one scale per row
    k_per_split = triton.cdiv(triton.cdiv(k, config.splits), config.block_k) * config.block_k
    splits = triton.cdiv(k, k_per_split)
    atomic = splits > 1
    out = torch.zeros if atomic else torch.empty
    y = out(m, n, device=x.device, dtype=torch.float32 if atomic else x.dtype)
    grid = (triton.cdiv(n, config.block_n), triton.cdiv(m, config.block_m), splits)
    _fp8_linear_kernel[grid](
        x_in, x_scale, weight, scales.scale, y, m, n, k, k_per_split, x_in.stride(0),
        weight.stride(0), y.stride(0), scales.scale.stride(0), rows, cols,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        K_BLOCKS=k_blocks, A8=a8, ATOMIC=atomic,
        # fp32 x (tests, the tiny model): full fp32 products, not TF32's 10-bit mantissas
        PRECISION="ieee" if x_in.dtype == torch.float32 else "tf32",
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    return y.to(x.dtype) if atomic else y
