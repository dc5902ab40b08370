"""Fused RMSNorm (and residual add + RMSNorm) for the attention side: one launch instead of the
seven elementwise kernels torch runs per norm, which at decode batch sizes cost more than
their bytes (bench/NOTES-kernels.md, version 14). Same numerics as afd.models.layers.RMSNorm:
fp32 statistics, the normalised row rounded to the input dtype, then times the weight."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _rms_norm_kernel(
    x_ptr, delta_ptr, w_ptr, out_ptr, sum_ptr, stride_x, stride_d, stride_o, stride_s, n, eps,
    BLOCK: tl.constexpr, ADD: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if ADD:  # the residual stream h + delta, rounded to its dtype as torch's add does
        delta = tl.load(delta_ptr + row * stride_d + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + delta.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(sum_ptr + row * stride_s + offs, x, mask=mask)
    xf = x.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / n + eps)
    y = (xf * inv).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, (y * w).to(out_ptr.dtype.element_ty), mask=mask)


def _launch(x: Tensor, delta: Tensor | None, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    assert x.dim() == 2 and x.stride(1) == 1 and weight.is_contiguous(), (x.shape, x.stride())
    assert x.dtype == weight.dtype, "the torch path promotes mixed dtypes: use it for those"
    rows, n = x.shape
    out = torch.empty_like(x)
    total = torch.empty_like(x) if delta is not None else out  # h + delta (unused otherwise)
    if delta is not None:
        assert delta.shape == x.shape and delta.stride(1) == 1
    block = triton.next_power_of_2(n)
    if rows:
        _rms_norm_kernel[(rows,)](
            x, x if delta is None else delta, weight, out, total, x.stride(0),
            0 if delta is None else delta.stride(0), out.stride(0), total.stride(0), n, eps,
            BLOCK=block, ADD=delta is not None, num_warps=min(16, max(1, block // 512)),
        )  # fmt: skip
    return total, out


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x [T, N], weight [N], one dtype -> RMSNorm(x) [T, N]."""
    return _launch(x, None, weight, eps)[1]


def add_rms_norm(h: Tensor, delta: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(h + delta, RMSNorm(h + delta)) in one pass: a residual add and the next norm."""
    return _launch(h, delta, weight, eps)
