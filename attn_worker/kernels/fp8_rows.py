"""Rows of activations to e4m3, one power-of-two fp32 scale per row, in one launch: what the
fp8 GEMMs (fp8_linear.py, ffn_worker/kernels/moe_gemm.py) take, where torch runs six kernels
for afd.quantization.quantize_fp8(power_of_two=True). Bit-equal to it on CUDA. The KV-cache
write (kv_write.py) quantizes its vectors with exact scales instead (quantize_fp8's default)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from afd.quantization import quantize_fp8

INV_FP8_MAX = tl.constexpr(1.0 / 448.0)  # e4m3's largest is 448
FP8_TINY = tl.constexpr(torch.finfo(torch.float32).tiny)  # an all-zero row stays zero


@triton.jit
def power_of_two_scale(scale):
    """afd.quantization.power_of_two_scales: the smallest power of two at or above `scale`."""
    bits = scale.to(tl.int32, bitcast=True)
    up = ((tl.minimum(bits, 0x7F000000) + 0x7FFFFF) & -0x800000).to(tl.float32, bitcast=True)
    return tl.where(bits < 0x7F000000, up, scale)


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, K, stride_x, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    amax = tl.zeros([BLOCK], tl.float32)
    for k in range(0, K, BLOCK):
        v = tl.load(x_ptr + row * stride_x + k + offs, mask=k + offs < K, other=0.0)
        amax = tl.maximum(amax, tl.abs(v.to(tl.float32)))
    # as torch on CUDA computes quantize_fp8: the max times 1/448 up to a power of two, an
    # IEEE division by it
    scale = power_of_two_scale(tl.max(amax, 0) * INV_FP8_MAX)
    for k in range(0, K, BLOCK):
        v = tl.load(x_ptr + row * stride_x + k + offs, mask=k + offs < K, other=0.0)
        quant = tl.math.div_rn(v.to(tl.float32), tl.maximum(scale, FP8_TINY))
        tl.store(q_ptr + row * K + k + offs, quant.to(tl.float8e4nv), mask=k + offs < K)
    tl.store(s_ptr + row, scale)


def quantize_rows_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """afd.quantization.quantize_fp8(power_of_two=True) over the rows of x [M, K] (unit
    stride along K) in one launch instead of torch's six: e4m3 rows and fp32 scales [M], the
    same values."""
    m, k = x.shape
    assert x.stride(1) == 1
    quant = torch.empty(m, k, device=x.device, dtype=torch.float8_e4m3fn)
    scale = torch.empty(m, device=x.device, dtype=torch.float32)
    if m:
        _quantize_rows_kernel[(m,)](x, quant, scale, k, x.stride(0), BLOCK=1024, num_warps=4)
    return quant, scale


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_rows_fp8 on CUDA; torch's quantize_fp8 elsewhere (Triton's CPU interpreter
    converts to e4m3 wrongly)."""
    if x.is_cuda and x.dim() == 2 and x.stride(1) == 1:
        return quantize_rows_fp8(x)
    return quantize_fp8(x, power_of_two=True)
