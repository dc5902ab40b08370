"""Paged MFA decode attention: all query heads share one KV head, so each KV block is read once
per sequence and the heads form the M side of the matrix products (flash-decoding split-K)."""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from attn_worker.kernels.decode_attention_ref import paged_decode_attention_ref
from attn_worker.kernels.decode_splits import (
    DEFAULT_BLOCK_N,
    FP8_PROGRAMS_PER_SM,
    choose_num_splits,
    num_sms,
)

_LOG2E = 1.4426950408889634


@triton.jit
def _attend_split(
    q, k_ptr, v_ptr, ks_ptr, vs_ptr, bt_row, start, end, qk_scale,
    stride_kblk, offs_d, mask_d,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr,
    D: tl.constexpr, IS_FP8: tl.constexpr,
):  # fmt: skip
    """Online softmax over tokens [start, end): unnormalised acc [BH, BD], max m and sum l [BH]
    (log2 domain). An empty range leaves m=-inf, l=0."""
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    offs_t = tl.arange(0, BLOCK_N)
    # A tile within one page has one page id and contiguous rows. Page ids are loaded one tile
    # ahead: the K/V addresses then depend on the previous iteration only, so the tile loads
    # pipeline (num_stages >= 3 keeps one tile in flight while the last one is multiplied).
    SCALAR: tl.constexpr = BLOCK_N <= PAGE
    if SCALAR:
        blk_next = tl.load(bt_row + start // PAGE, mask=start < end, other=0)
    else:
        blk_next = tl.load(bt_row + (start + offs_t) // PAGE, mask=start + offs_t < end, other=0)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + offs_t
        mask_n = offs_n < end
        blk = blk_next  # scalar, or [BN]
        if SCALAR:
            in_page = (n0 % PAGE) + offs_t  # [BN]
            nxt = n0 + BLOCK_N
        else:
            in_page = offs_n % PAGE  # [BN]
            nxt = offs_n + BLOCK_N
        rows = blk.to(tl.int64) * stride_kblk + in_page * D  # [BN]
        blk_next = tl.load(bt_row + nxt // PAGE, mask=nxt < end, other=0)
        kv_off = rows[:, None] + offs_d[None, :]  # [BN, BD]
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(k_ptr + kv_off, mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + kv_off, mask=kv_mask, other=0.0)
        if IS_FP8:
            # e4m3 values are exact in bf16/fp16; the per-token scales ride on the scores and
            # on P, so the tiles themselves never get multiplied.
            k = k.to(q.dtype)
            v = v.to(q.dtype)
            scale_at = blk.to(tl.int64) * PAGE + in_page  # [BN]: scales are [blocks, PAGE]
            k_scale = tl.load(ks_ptr + scale_at, mask=mask_n, other=0.0) * qk_scale  # [BN]
            v_scale = tl.load(vs_ptr + scale_at, mask=mask_n, other=0.0)  # [BN]
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
    return acc, m_i, l_i


@triton.jit
def _split_tokens(seq_len, num_splits, BLOCK_N: tl.constexpr):
    """Each sequence cuts its own length into `num_splits` whole tiles, so the launch needs no
    host-side maximum length (a captured graph has none)."""
    return tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N


@triton.jit
def _reduce_kernel(
    po_ptr, pm_ptr, pl_ptr, out_ptr, lens_ptr, num_splits, stride_ob, stride_oh,
    HQ: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_HR: tl.constexpr, BLOCK_N: tl.constexpr, GDC: tl.constexpr,
):  # fmt: skip
    """out[b, heads] = sum_s w_s o_s / sum_s w_s, w_s = l_s 2^(m_s - max m), over the sequence's
    non-empty splits, all loaded at once: this kernel is short and latency-bound."""
    b = tl.program_id(0)
    seq_len = tl.load(lens_ptr + b)  # an input of the decode kernel: readable before the wait
    live_splits = tl.cdiv(seq_len, _split_tokens(seq_len, num_splits, BLOCK_N))
    if GDC:  # launched before the decode kernel ended: wait for its partials
        tl.extra.cuda.gdc_wait()
    if live_splits > 1:  # one live split stored the output itself
        offs_s = tl.arange(0, BLOCK_S)
        offs_d = tl.arange(0, BLOCK_D)
        offs_h = tl.program_id(1) * BLOCK_HR + tl.arange(0, BLOCK_HR)
        mask_sh = (offs_s[:, None] < live_splits) & (offs_h[None, :] < HQ)  # [BS, BHR]
        row = (b * num_splits + offs_s[:, None]) * HQ + offs_h[None, :]  # [BS, BHR]
        m_s = tl.load(pm_ptr + row, mask=mask_sh, other=float("-inf"))
        l_s = tl.load(pl_ptr + row, mask=mask_sh, other=0.0)
        w = l_s * tl.exp2(m_s - tl.max(m_s, 0)[None, :])  # [BS, BHR]; masked splits weigh 0
        mask_shd = mask_sh[:, :, None] & (offs_d[None, None, :] < D)
        part = tl.load(
            po_ptr + row[:, :, None] * D + offs_d[None, None, :], mask=mask_shd, other=0.0
        )
        out = tl.sum(w[:, :, None] * part, 0) / tl.sum(w, 0)[:, None]  # [BHR, BD]
        out_ptrs = out_ptr + b * stride_ob + offs_h[:, None] * stride_oh + offs_d[None, :]
        mask = (offs_h[:, None] < HQ) & (offs_d[None, :] < D)
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _decode_kernel(
    q_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, bt_ptr, lens_ptr, po_ptr, pm_ptr, pl_ptr, out_ptr,
    qk_scale, stride_qb, stride_qh, stride_btb, stride_kblk, num_splits,
    stride_ob, stride_oh,
    HQ: tl.constexpr, D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, PAGE: tl.constexpr, IS_FP8: tl.constexpr, SPLIT: tl.constexpr,
    GDC: tl.constexpr,
):  # fmt: skip
    pid_s = tl.program_id(0)
    b = tl.program_id(1)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask_h = offs_h < HQ
    mask_d = offs_d < D
    seq_len = tl.load(lens_ptr + b)
    split_tokens = _split_tokens(seq_len, num_splits, BLOCK_N)
    start = pid_s * split_tokens
    end = tl.minimum(start + split_tokens, seq_len)
    q_ptrs = q_ptr + b * stride_qb + offs_h[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=mask_h[:, None] & mask_d[None, :], other=0.0)  # [BH, BD]
    acc, m_i, l_i = _attend_split(
        q, k_ptr, v_ptr, ks_ptr, vs_ptr, bt_ptr + b * stride_btb, start, end, qk_scale,
        stride_kblk, offs_d, mask_d, BLOCK_H, BLOCK_D, BLOCK_N, PAGE, D, IS_FP8,
    )  # fmt: skip
    if GDC:  # the reduce (programmatic dependent launch) may launch while results are stored
        tl.extra.cuda.gdc_launch_dependents()
    out_ptrs = out_ptr + b * stride_ob + offs_h[:, None] * stride_oh + offs_d[None, :]
    mask_hd = mask_h[:, None] & mask_d[None, :]
    if not SPLIT:  # one split per sequence: no partials, no reduce launch
        tl.store(out_ptrs, (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=mask_hd)
        return
    live_splits = tl.cdiv(seq_len, split_tokens)  # the rest of this sequence's splits are empty
    if live_splits == 1:  # a sequence shorter than one split stores directly
        if pid_s == 0:
            tl.store(out_ptrs, (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=mask_hd)
    elif start < seq_len:
        row = (b * num_splits + pid_s) * HQ + offs_h  # [BH]
        tl.store(pm_ptr + row, m_i, mask=mask_h)
        tl.store(pl_ptr + row, l_i, mask=mask_h)
        po_ptrs = po_ptr + row[:, None] * D + offs_d[None, :]
        tl.store(po_ptrs, acc / l_i[:, None], mask=mask_hd)  # normalised partial [BH, BD]


# device -> (partials [rows * D], m and l [2, rows]), rows = B * S * Hq, all fp32
_WORKSPACES: dict[torch.device, tuple[Tensor, Tensor]] = {}
# Outgrown workspaces stay allocated: CUDA graphs captured while they were current keep
# writing there on every replay, so their memory must never go to another tensor.
_RETIRED: list[tuple[Tensor, Tensor]] = []


def _workspace(device: torch.device, rows: int, head_dim: int) -> tuple[Tensor, Tensor]:
    """Partial buffers kept per device instead of allocated per call (so calls on one device
    must be ordered on one stream, as serving's are). Grown outside graph capture only: a
    capture that needs more gets its own buffers."""
    ws = _WORKSPACES.get(device)
    if ws is not None and ws[0].numel() >= rows * head_dim and ws[1].shape[1] >= rows:
        return ws
    if ws is not None:  # grow to the larger of old and new
        _RETIRED.append(ws)
        rows, head_dim = max(rows, ws[1].shape[1]), max(head_dim, ws[0].numel() // ws[1].shape[1])
    ws = (
        torch.empty(rows * head_dim, device=device, dtype=torch.float32),  # [B, S, Hq, D]
        torch.empty(2, rows, device=device, dtype=torch.float32),  # m, l [B, S, Hq]
    )
    if device.type != "cuda" or not torch.cuda.is_current_stream_capturing():
        _WORKSPACES[device] = ws
    return ws


@functools.cache
def _has_gdc(device: torch.device) -> bool:
    """Programmatic dependent launch (griddepcontrol) exists from Hopper (sm_90) on, and in
    Triton from 3.4 (older ones have no gdc_wait and no launch_pdl)."""
    hopper = device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9
    return hopper and hasattr(tl.extra.cuda, "gdc_wait")


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
    block_n: int = DEFAULT_BLOCK_N,
    num_warps: int = 4,
    num_stages: int | None = None,
    programs_per_sm: int | None = None,
    out: Tensor | None = None,
    pdl: bool = True,
) -> Tensor:
    """Triton path; see `paged_decode_attention`. `max_seq_len` avoids a device sync when the
    caller knows it; `num_splits`/`block_n`/warps/stages/`programs_per_sm` are tuning knobs for
    the benchmark; `out` [B, Hq, D] lets callers (and tests, with a poisoned buffer) own the
    output; `pdl` launches the split reduce by programmatic dependent launch (Hopper on; it
    then starts while the decode kernel stores). No host sync when `max_seq_len` is given:
    graph-capturable."""
    batch, num_heads, head_dim = q.shape  # [B, Hq, D]
    _, page, _ = k_cache.shape  # [num_blocks, page, D]
    assert page & (page - 1) == 0, "KV block_size must be a power of two"
    assert k_cache.stride(2) == 1 and k_cache.stride(1) == head_dim and q.stride(2) == 1
    is_fp8 = k_cache.dtype == torch.float8_e4m3fn
    assert not is_fp8 or (k_scale is not None and v_scale is not None), "fp8 KV needs scales"
    for s in (k_scale, v_scale):  # one per token vector, as the kernel indexes them
        assert s is None or (s.shape == k_cache.shape[:2] and s.is_contiguous()), s.shape
    block_h = max(16, triton.next_power_of_2(num_heads))  # tl.dot needs M >= 16
    block_d = max(16, triton.next_power_of_2(head_dim))
    # 4 stages of 16-bit tiles fill 164 KB of shared memory at D=256 (one program an SM); fp32
    # tiles take 2. fp8 runs two programs an SM: one converts its tiles while the other loads.
    num_stages = num_stages or (2 if is_fp8 or k_cache.element_size() > 2 else 4)
    programs_per_sm = programs_per_sm or (FP8_PROGRAMS_PER_SM if is_fp8 else 1)
    if num_splits is None or max_seq_len is not None:
        if max_seq_len is None:
            max_seq_len = int(seq_lens.max().item())  # a host sync: callers that capture pass it
        slots = programs_per_sm * num_sms(q.device)
        if num_splits is None:
            num_splits = choose_num_splits(batch, max_seq_len, block_n, slots)
        # no more splits than the longest sequence fills (each split >= one tile)
        split_tokens = triton.cdiv(triton.cdiv(max_seq_len, num_splits), block_n) * block_n
        num_splits = triton.cdiv(max_seq_len, split_tokens)
    out = torch.empty_like(q) if out is None else out  # [B, Hq, D]
    # one split stores straight to `out`; one row keeps the unused pointers valid
    rows = 1 if num_splits == 1 else batch * num_splits * num_heads
    part_o, part_ml = _workspace(q.device, rows, head_dim)
    gdc = pdl and _has_gdc(q.device)
    _decode_kernel[(num_splits, batch)](
        q, k_cache, v_cache, out if k_scale is None else k_scale,
        out if v_scale is None else v_scale, block_tables, seq_lens,
        part_o, part_ml[0], part_ml[1], out, scale * _LOG2E,
        q.stride(0), q.stride(1), block_tables.stride(0), k_cache.stride(0), num_splits,
        out.stride(0), out.stride(1),
        HQ=num_heads, D=head_dim, BLOCK_H=block_h, BLOCK_D=block_d, BLOCK_N=block_n,
        PAGE=page, IS_FP8=is_fp8, SPLIT=num_splits > 1, GDC=gdc,
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    if num_splits > 1:
        # A separate launch measured faster than merging in the last split to finish (an
        # atomic counter per sequence): one program merging all Hq heads runs its chunks one
        # after another, while here B x Hq/BLOCK_HR programs each merge one chunk at once.
        block_s = triton.next_power_of_2(num_splits)
        # about 8K fp32 partial values per program keeps the one-shot load in registers
        block_hr = min(16, triton.next_power_of_2(num_heads), max(1, 8192 // (block_s * block_d)))
        _reduce_kernel[(batch, triton.cdiv(num_heads, block_hr))](
            part_o, part_ml[0], part_ml[1], out, seq_lens, num_splits,
            out.stride(0), out.stride(1),
            HQ=num_heads, D=head_dim, BLOCK_D=block_d, BLOCK_S=block_s, BLOCK_HR=block_hr,
            BLOCK_N=block_n, GDC=gdc, num_warps=4, **({"launch_pdl": True} if gdc else {}),
        )  # fmt: skip
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
    num_splits: int | None = None,
) -> Tensor:
    """softmax(q kᵀ · scale) v over each sequence's paged KV, one KV head shared by all heads.

    q [B, Hq, D]; k_cache/v_cache [num_blocks, block_size, D] (bf16/fp16/fp32, or fp8 e4m3
    with k_scale/v_scale float32 [num_blocks, block_size], one per token vector: see
    attn_worker/kv_cache.py); block_tables int32 [B, max_blocks];
    seq_lens int32 [B], each >= 1. Returns [B, Hq, D] in q's dtype. Triton on CUDA,
    the torch reference elsewhere. Without `max_seq_len` the launch reads it from the device
    (a sync) unless `num_splits` is given (see `decode_splits.graph_num_splits`).
    """
    if q.is_cuda:
        return paged_decode_attention_triton(
            q, k_cache, v_cache, block_tables, seq_lens, scale, max_seq_len, k_scale, v_scale,
            num_splits,
        )  # fmt: skip
    return paged_decode_attention_ref(
        q, k_cache, v_cache, block_tables, seq_lens, scale, k_scale, v_scale
    )
