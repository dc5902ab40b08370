"""This step's K and V vectors into their paged-cache slots in one launch: torch runs two
index_copy kernels (bf16), or ten kernels when fp8 quantizes them first. Same stored values as
attn_worker/kv_cache.py's torch path: a plain copy, or e4m3 with the vector's largest magnitude
mapped to 448 and that scale stored beside it."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from attn_worker.kernels.fp8_rows import FP8_TINY, INV_FP8_MAX


@triton.jit
def _store(x, cache_ptr, scale_ptr, slot, offs, D: tl.constexpr, FP8: tl.constexpr):
    if FP8:
        xf = x.to(tl.float32)
        # as torch on CUDA computes them: a tensor over a scalar times its reciprocal, a tensor
        # over a tensor an IEEE division (Triton's `/` is an approximate one)
        scale = tl.max(tl.abs(xf), 0) * INV_FP8_MAX
        quant = tl.math.div_rn(xf, tl.maximum(scale, FP8_TINY))
        tl.store(cache_ptr + slot * D + offs, quant.to(tl.float8e4nv))
        tl.store(scale_ptr + slot, scale)
    else:
        tl.store(cache_ptr + slot * D + offs, x)


@triton.jit
def _kv_write_kernel(
    k_ptr, v_ptr, slots_ptr, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, stride_k,
    stride_v, D: tl.constexpr, FP8: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0)
    slot = tl.load(slots_ptr + t).to(tl.int64)
    offs = tl.arange(0, D)  # D a power of two: no mask
    k = tl.load(k_ptr + t * stride_k + offs)
    v = tl.load(v_ptr + t * stride_v + offs)
    _store(k, k_cache_ptr, k_scale_ptr, slot, offs, D, FP8)
    _store(v, v_cache_ptr, v_scale_ptr, slot, offs, D, FP8)


def kv_write(
    k: Tensor,
    v: Tensor,
    slots: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    k_scale: Tensor | None = None,
    v_scale: Tensor | None = None,
) -> None:
    """k/v [T, D] (unit last stride) into one layer's k_cache/v_cache [blocks, block_size, D]
    at flat slots [T]; with fp8 caches also their scales [blocks, block_size]."""
    tokens, dim = k.shape
    fp8 = k_cache.dtype == torch.float8_e4m3fn
    assert dim & (dim - 1) == 0, "head_dim must be a power of two"
    assert k.stride(1) == v.stride(1) == 1 and k_cache.is_contiguous() and v_cache.is_contiguous()
    assert not fp8 or (k_scale is not None and v_scale is not None), "fp8 KV needs its scales"
    assert fp8 or k.dtype == k_cache.dtype == v.dtype, (k.dtype, k_cache.dtype)
    if tokens:
        _kv_write_kernel[(tokens,)](
            k, v, slots, k_cache, v_cache, k_cache if k_scale is None else k_scale,
            v_cache if v_scale is None else v_scale, k.stride(0), v.stride(0), D=dim, FP8=fp8,
            num_warps=1 if dim <= 256 else 4,
        )  # fmt: skip
