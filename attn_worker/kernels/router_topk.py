"""The MoE router's softmax and top-k in one launch. torch runs them as five kernels at decode
batch sizes (the fp32 cast, softmax, a top-k gather and a bitonic sort, and the casts of ids
and weights): ~19 µs a layer on an H100 for 32 rows of 48 logits (bench/NOTES-kernels.md,
version 15). Same numbers as afd.models.step3.Router's torch path: fp32 softmax, the k
largest probabilities in descending order (the lower expert id first on a tie), optionally
renormalised over the k, then rounded to the output dtype."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _pick(p, offs_e, BLOCK_E: tl.constexpr):
    """The largest of each row of p [BT, BE] and its column (the lowest among equals)."""
    best = tl.max(p, 1)  # [BT]
    idx = tl.min(tl.where(p == best[:, None], offs_e[None, :], BLOCK_E), 1)  # [BT]
    return best, idx


@triton.jit
def _router_topk_kernel(
    logits_ptr, ids_ptr, w_ptr, rows, stride_l, num_experts,
    K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, RENORMALISE: tl.constexpr,
):  # fmt: skip
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_e = tl.arange(0, BLOCK_E)
    mask_t = offs_t < rows
    mask = mask_t[:, None] & (offs_e[None, :] < num_experts)
    ptrs = logits_ptr + offs_t[:, None] * stride_l + offs_e[None, :]
    x = tl.load(ptrs, mask=mask, other=float("-inf")).to(tl.float32)  # [BT, BE]
    x = tl.where(mask_t[:, None], x, 0.0)  # rows past the end: finite, never stored
    e = tl.exp(x - tl.max(x, 1)[:, None])
    p = e / tl.sum(e, 1)[:, None]  # [BT, BE]; padding columns are 0
    p = tl.where(mask, p, -1.0)  # below every probability: never picked
    denom = tl.full([BLOCK_T], 1.0, tl.float32)
    if RENORMALISE:  # first pass: the sum of the k picked
        rest, denom = p, tl.zeros([BLOCK_T], tl.float32)
        for _ in tl.static_range(K):
            best, idx = _pick(rest, offs_e, BLOCK_E)
            denom += best
            rest = tl.where(offs_e[None, :] == idx[:, None], -1.0, rest)
    for i in tl.static_range(K):
        best, idx = _pick(p, offs_e, BLOCK_E)
        tl.store(ids_ptr + offs_t * K + i, idx, mask=mask_t)
        tl.store(w_ptr + offs_t * K + i, (best / denom).to(w_ptr.dtype.element_ty), mask=mask_t)
        p = tl.where(offs_e[None, :] == idx[:, None], -1.0, p)


def router_topk(
    logits: Tensor, top_k: int, renormalise: bool, out_dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """logits [T, E] (any float dtype, unit last stride) -> expert ids int32 [T, k] and
    weights [T, k] in `out_dtype`: softmax probabilities, renormalised over the k if asked."""
    rows, num_experts = logits.shape
    assert logits.stride(1) == 1 and 0 < top_k <= num_experts, (logits.stride(), top_k)
    ids = torch.empty(rows, top_k, dtype=torch.int32, device=logits.device)
    weights = torch.empty(rows, top_k, dtype=out_dtype, device=logits.device)
    block_e = triton.next_power_of_2(num_experts)
    block_t = max(1, min(16, 4096 // block_e))  # ~4K logits a program
    if rows:
        _router_topk_kernel[(triton.cdiv(rows, block_t),)](
            logits, ids, weights, rows, logits.stride(0), num_experts,
            K=top_k, BLOCK_T=block_t, BLOCK_E=block_e, RENORMALISE=renormalise, num_warps=4,
        )  # fmt: skip
    return ids, weights
