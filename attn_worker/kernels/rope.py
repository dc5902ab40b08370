"""Fused rotate-half RoPE on the query and key heads of a batch: one launch for both, instead
of the six elementwise kernels torch runs per tensor (bench/NOTES-kernels.md, version 14).
Same numerics as afd.models.layers.Rope.apply: fp32 math, rounded to the input dtype."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _rotate(
    x_ptr, o_ptr, t, stride_t, stride_h, stride_ot, stride_oh, c_lo, c_hi, s_lo, s_hi, offs,
    mask_d, HEADS: tl.constexpr, BLOCK_H: tl.constexpr, HALF: tl.constexpr,
):  # fmt: skip
    offs_h = tl.arange(0, BLOCK_H)
    mask = (offs_h[:, None] < HEADS) & mask_d[None, :]
    row = x_ptr + t * stride_t + offs_h[:, None] * stride_h + offs[None, :]  # [BH, BD]
    lo = tl.load(row, mask=mask, other=0.0).to(tl.float32)
    hi = tl.load(row + HALF, mask=mask, other=0.0).to(tl.float32)
    out = o_ptr + t * stride_ot + offs_h[:, None] * stride_oh + offs[None, :]
    dtype = o_ptr.dtype.element_ty
    tl.store(out, (lo * c_lo[None, :] - hi * s_lo[None, :]).to(dtype), mask=mask)
    tl.store(out + HALF, (hi * c_hi[None, :] + lo * s_hi[None, :]).to(dtype), mask=mask)


@triton.jit
def _rope_kernel(
    q_ptr, k_ptr, cos_ptr, sin_ptr, qo_ptr, ko_ptr, stride_qt, stride_qh, stride_kt, stride_kh,
    stride_ct, stride_st, stride_qot, stride_qoh, stride_kot, stride_koh,
    HQ: tl.constexpr, HK: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
    HALF: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0)
    offs = tl.arange(0, BLOCK_D)
    mask_d = offs < HALF
    c_lo = tl.load(cos_ptr + t * stride_ct + offs, mask=mask_d, other=0.0)
    c_hi = tl.load(cos_ptr + t * stride_ct + HALF + offs, mask=mask_d, other=0.0)
    s_lo = tl.load(sin_ptr + t * stride_st + offs, mask=mask_d, other=0.0)
    s_hi = tl.load(sin_ptr + t * stride_st + HALF + offs, mask=mask_d, other=0.0)
    _rotate(q_ptr, qo_ptr, t, stride_qt, stride_qh, stride_qot, stride_qoh, c_lo, c_hi, s_lo,
            s_hi, offs, mask_d, HQ, BLOCK_HQ, HALF)  # fmt: skip
    _rotate(k_ptr, ko_ptr, t, stride_kt, stride_kh, stride_kot, stride_koh, c_lo, c_hi, s_lo,
            s_hi, offs, mask_d, HK, BLOCK_HK, HALF)  # fmt: skip


def rope_qk(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """q [T, Hq, D], k [T, Hk, D] (unit last stride), cos/sin fp32 [T, D] -> rotated copies."""
    tokens, num_q, dim = q.shape
    assert k.shape[0] == tokens and k.shape[2] == dim and dim % 2 == 0
    assert q.stride(2) == 1 and k.stride(2) == 1 and cos.stride(1) == 1 and sin.stride(1) == 1
    assert cos.dtype == sin.dtype == torch.float32 and cos.shape == (tokens, dim) == sin.shape
    q_out, k_out = torch.empty_like(q), torch.empty_like(k)
    num_k, half = k.shape[1], dim // 2
    if tokens:
        _rope_kernel[(tokens,)](
            q, k, cos, sin, q_out, k_out, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            cos.stride(0), sin.stride(0), q_out.stride(0), q_out.stride(1), k_out.stride(0),
            k_out.stride(1), HQ=num_q, HK=num_k, BLOCK_HQ=triton.next_power_of_2(num_q),
            BLOCK_HK=triton.next_power_of_2(num_k), HALF=half,
            BLOCK_D=triton.next_power_of_2(half), num_warps=4,
        )  # fmt: skip
    return q_out, k_out
