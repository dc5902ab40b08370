"""The torch reference of paged MFA decode attention: the CPU path of `paged_decode_attention`
and the correctness reference of its Triton kernel."""

from __future__ import annotations

import math

import torch
from torch import Tensor


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
        if k_scale is not None and v_scale is not None:  # [num_blocks, page]: per token
            k = k * k_scale[blocks].to(acc_dtype)[:, :, None]
            v = v * v_scale[blocks].to(acc_dtype)[:, :, None]
        k = k.reshape(-1, k.shape[-1])[:seq_len]  # [L, D]
        v = v.reshape(-1, v.shape[-1])[:seq_len]  # [L, D]
        probs = torch.softmax(q[b].to(acc_dtype) @ k.T * scale, dim=-1)  # [Hq, L]
        out[b] = (probs @ v).to(q.dtype)
    return out
