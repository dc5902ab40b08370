"""Paged MFA decode attention: all query heads share one KV head, so each KV block is read once
per sequence and the heads form the M side of the matrix products (flash-decoding split-K)."""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl
from torch import Tensor

_LOG2E = 1.4426950408889634


@triton.jit
def _split_kernel(
    q_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, bt_ptr, lens_ptr, po_ptr, pm_ptr, pl_ptr,
    out_ptr, qk_scale, split_tokens, stride_qb, stride_qh, stride_btb, stride_kblk, num_splits,
    stride_ob, stride_oh,
    HQ: tl.constexpr, D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, PAGE: tl.constexpr, IS_FP8: tl.constexpr, DIRECT: tl.constexpr,
):  # fmt: skip
    pid_s = tl.program_id(0)
    b = tl.program_id(1)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask_h = offs_h < HQ
    mask_d = offs_d < D
    seq_len = tl.load(lens_ptr + b)
    start = pid_s * split_tokens
    end = tl.minimum(start + split_tokens, seq_len)
    q_ptrs = q_ptr + b * stride_qb + offs_h[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=mask_h[:, None] & mask_d[None, :], other=0.0)  # [BH, BD]
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < end
        blk = tl.load(bt_ptr + b * stride_btb + offs_n // PAGE, mask=mask_n, other=0)  # [BN]
        rows = blk.to(tl.int64) * stride_kblk + (offs_n % PAGE) * D  # [BN] element offsets
        kv_off = rows[:, None] + offs_d[None, :]  # [BN, BD]
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(k_ptr + kv_off, mask=kv_mask, other=0.0)  # [BN, BD]
        v = tl.load(v_ptr + kv_off, mask=kv_mask, other=0.0)  # [BN, BD]
        if IS_FP8:
            # e4m3 values are exact in bf16/fp16; the per-block scales ride on the scores and
            # on P, so the tiles themselves never get multiplied.
            k = k.to(q.dtype)
            v = v.to(q.dtype)
            k_scale = tl.load(ks_ptr + blk, mask=mask_n, other=0.0) * qk_scale  # [BN]
            v_scale = tl.load(vs_ptr + blk, mask=mask_n, other=0.0)  # [BN]
            s = tl.dot(q, tl.trans(k)) * k_scale[None, :]  # [BH, BN]
        else:
            s = tl.dot(q, tl.trans(k)) * qk_scale  # [BH, BN]
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # [BH]
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])  # [BH, BN]
        l_i = l_i * alpha + tl.sum(p, 1)
        if IS_FP8:
            p = p * v_scale[None, :]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)  # [BH, BD]
        m_i = m_new
    if DIRECT:  # one split: no partials, no reduce launch
        out_ptrs = out_ptr + b * stride_ob + offs_h[:, None] * stride_oh + offs_d[None, :]
        out = acc / l_i[:, None]
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask_h[:, None] & mask_d[None, :])
        return
    # Unnormalised partials: an empty split (start >= seq_len) leaves m=-inf, l=0, acc=0,
    # which the reduce weights to zero.
    row = (b * num_splits + pid_s) * HQ + offs_h  # [BH]
    tl.store(pm_ptr + row, m_i, mask=mask_h)
    tl.store(pl_ptr + row, l_i, mask=mask_h)
    po_ptrs = po_ptr + row[:, None] * D + offs_d[None, :]
    tl.store(po_ptrs, acc, mask=mask_h[:, None] & mask_d[None, :])


@triton.jit
def _reduce_kernel(
    po_ptr, pm_ptr, pl_ptr, out_ptr, num_splits, stride_ob, stride_oh,
    HQ: tl.constexpr, D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
):  # fmt: skip
    # All splits in one load each (no loop): this kernel is short and latency-bound.
    b = tl.program_id(0)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    mask_sh = (offs_s[:, None] < num_splits) & (offs_h[None, :] < HQ)  # [BS, BH]
    row = (b * num_splits + offs_s[:, None]) * HQ + offs_h[None, :]  # [BS, BH]
    m_s = tl.load(pm_ptr + row, mask=mask_sh, other=float("-inf"))  # [BS, BH]
    l_s = tl.load(pl_ptr + row, mask=mask_sh, other=0.0)  # [BS, BH]
    w = tl.exp2(m_s - tl.max(m_s, 0)[None, :])  # [BS, BH]; empty splits weigh 0
    l_sum = tl.sum(w * l_s, 0)  # [BH]
    mask_shd = mask_sh[:, :, None] & (offs_d[None, None, :] < D)
    part = tl.load(po_ptr + row[:, :, None] * D + offs_d[None, None, :], mask=mask_shd, other=0.0)
    out = tl.sum(w[:, :, None] * part, 0) / l_sum[:, None]  # [BH, BD]
    out_ptrs = out_ptr + b * stride_ob + offs_h[:, None] * stride_oh + offs_d[None, :]
    mask = (offs_h[:, None] < HQ) & (offs_d[None, :] < D)
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask)


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a few splits still exercise the reduce
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.lru_cache(maxsize=4096)
def choose_num_splits(batch: int, max_seq_len: int, block_n: int, slots: int) -> int:
    """Splits per sequence minimising waves x (tiles per split + fixed cost), `slots` being
    the programs the GPU runs at once. Too few programs idle SMs, one program past a full wave
    costs a whole wave, and each split pays a fixed cost (q load, pipeline fill, a [Hq, D]
    fp32 partial written and read back) of about two KV tiles."""
    tiles = max(1, triton.cdiv(max_seq_len, block_n))
    best_cost, best = float("inf"), 1
    for splits in range(1, min(tiles, 64) + 1):
        waves = triton.cdiv(batch * splits, slots)
        cost = waves * (triton.cdiv(tiles, splits) + (2 if splits > 1 else 1))
        if cost < best_cost:
            best_cost, best = cost, splits
    return best


def paged_decode_attention_triton(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    block_tables: Tensor,
    seq_lens: Tensor,
    scale: float,
    max_seq_len: int | None = None,
    k_scale: Tensor | None = None,
    v_scale: Tensor | None = None,
    num_splits: int | None = None,
    block_n: int = 32,
    num_warps: int = 4,
    num_stages: int = 3,
    programs_per_sm: int = 2,
    out: Tensor | None = None,
) -> Tensor:
    """Triton path; see `paged_decode_attention`. `max_seq_len` avoids a device sync when the
    caller knows it; `num_splits`/`block_n`/warps/stages are tuning knobs for the benchmark;
    `out` [B, Hq, D] lets callers (and tests, with a poisoned buffer) own the output."""
    batch, num_heads, head_dim = q.shape  # [B, Hq, D]
    _, page, _ = k_cache.shape  # [num_blocks, page, D]
    assert page & (page - 1) == 0, "KV block_size must be a power of two"
    assert k_cache.stride(2) == 1 and k_cache.stride(1) == head_dim and q.stride(2) == 1
    is_fp8 = k_cache.dtype == torch.float8_e4m3fn
    assert not is_fp8 or (k_scale is not None and v_scale is not None), "fp8 KV needs scales"
    if max_seq_len is None:
        max_seq_len = int(seq_lens.max().item())
    block_h = max(16, triton.next_power_of_2(num_heads))  # tl.dot needs M >= 16
    block_d = max(16, triton.next_power_of_2(head_dim))
    if num_splits is None:
        slots = programs_per_sm * _num_sms(q.device)
        num_splits = choose_num_splits(batch, max_seq_len, block_n, slots)
    split_tokens = triton.cdiv(triton.cdiv(max_seq_len, num_splits), block_n) * block_n
    num_splits = triton.cdiv(max_seq_len, split_tokens)
    out = torch.empty_like(q) if out is None else out  # [B, Hq, D]
    f32 = dict(device=q.device, dtype=torch.float32)
    # one split stores straight to `out`; one element keeps the unused pointers non-null
    parts = 1 if num_splits == 1 else batch * num_splits * num_heads
    part_out = torch.empty(parts * head_dim, **f32)  # [B, S, Hq, D]
    part_m = torch.empty(parts, **f32)  # [B, S, Hq]
    part_l = torch.empty(parts, **f32)  # [B, S, Hq]
    dummy = out  # scale pointers are unused unless fp8
    _split_kernel[(num_splits, batch)](
        q, k_cache, v_cache, dummy if k_scale is None else k_scale,
        dummy if v_scale is None else v_scale, block_tables, seq_lens,
        part_out, part_m, part_l, out, scale * _LOG2E, split_tokens,
        q.stride(0), q.stride(1), block_tables.stride(0), k_cache.stride(0), num_splits,
        out.stride(0), out.stride(1),
        HQ=num_heads, D=head_dim, BLOCK_H=block_h, BLOCK_D=block_d, BLOCK_N=block_n,
        PAGE=page, IS_FP8=is_fp8, DIRECT=num_splits == 1,
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    if num_splits > 1:
        block_s = triton.next_power_of_2(num_splits)
        # about 8K fp32 partial values per program keeps the one-shot load in registers
        block_hr = min(16, triton.next_power_of_2(num_heads), max(1, 8192 // (block_s * block_d)))
        _reduce_kernel[(batch, triton.cdiv(num_heads, block_hr))](
            part_out, part_m, part_l, out, num_splits, out.stride(0), out.stride(1),
            HQ=num_heads, D=head_dim, BLOCK_H=block_hr, BLOCK_D=block_d, BLOCK_S=block_s,
            num_warps=4,
        )  # fmt: skip
    return out


def paged_decode_attention_ref(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    block_tables: Tensor,
    seq_lens: Tensor,
    scale: float,
    k_scale: Tensor | None = None,
    v_scale: Tensor | None = None,
) -> Tensor:
    """Plain torch, one sequence at a time, fp32 math (fp64 for fp64 inputs): the CPU path and
    the correctness reference."""
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    page = k_cache.shape[1]
    out = torch.empty_like(q)  # [B, Hq, D]
    for b in range(q.shape[0]):
        seq_len = int(seq_lens[b])
        blocks = block_tables[b, : math.ceil(seq_len / page)].long()  # [nb]
        k = k_cache[blocks].to(acc_dtype)  # [nb, page, D]
        v = v_cache[blocks].to(acc_dtype)  # [nb, page, D]
        if k_scale is not None and v_scale is not None:
            k = k * k_scale[blocks].to(acc_dtype)[:, None, None]
            v = v * v_scale[blocks].to(acc_dtype)[:, None, None]
        k = k.reshape(-1, k.shape[-1])[:seq_len]  # [L, D]
        v = v.reshape(-1, v.shape[-1])[:seq_len]  # [L, D]
        probs = torch.softmax(q[b].to(acc_dtype) @ k.T * scale, dim=-1)  # [Hq, L]
        out[b] = (probs @ v).to(q.dtype)
    return out


def paged_decode_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    block_tables: Tensor,
    seq_lens: Tensor,
    scale: float,
    max_seq_len: int | None = None,
    k_scale: Tensor | None = None,
    v_scale: Tensor | None = None,
) -> Tensor:
    """softmax(q kᵀ · scale) v over each sequence's paged KV, one KV head shared by all heads.

    q [B, Hq, D]; k_cache/v_cache [num_blocks, block_size, D] (bf16/fp16/fp32, or fp8 e4m3
    with k_scale/v_scale float32 [num_blocks]); block_tables int32 [B, max_blocks];
    seq_lens int32 [B], each >= 1. Returns [B, Hq, D] in q's dtype. Triton on CUDA,
    the torch reference elsewhere.
    """
    if q.is_cuda:
        return paged_decode_attention_triton(
            q, k_cache, v_cache, block_tables, seq_lens, scale, max_seq_len, k_scale, v_scale
        )
    return paged_decode_attention_ref(
        q, k_cache, v_cache, block_tables, seq_lens, scale, k_scale, v_scale
    )
