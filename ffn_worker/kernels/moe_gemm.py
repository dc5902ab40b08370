"""Triton grouped GEMMs for the MoE layer: (token, slot) pairs sorted by expert and padded to
BLOCK_M, then gate+up with SwiGLU fused, then down with the router weight and scatter-add fused."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor


@dataclass(frozen=True)
class GemmConfig:
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class MoeConfig:
    block_m: int  # rows per tile; each expert's rows are padded to a multiple of it
    gate_up: GemmConfig
    down: GemmConfig
    group_m: int = 8


def default_config(num_pairs: int, num_experts: int) -> MoeConfig:
    """Tiles by rows per expert: few rows stream weights (bandwidth-bound), many rows want big
    tiles for the tensor cores. The fastest of the sweep in `afd-bench kernels` on an H100
    (bench/results/kernels_h100.json) at T = 64, 256, 1024, 4096 with 48 experts top-3."""
    rows = num_pairs / max(1, num_experts)
    if rows <= 8:
        return MoeConfig(16, GemmConfig(64, 256, 4, 3), GemmConfig(64, 256, 4, 3))
    if rows <= 24:
        return MoeConfig(32, GemmConfig(128, 128, 4, 3), GemmConfig(128, 128, 4, 3))
    if rows <= 96:
        return MoeConfig(64, GemmConfig(64, 128, 4, 4), GemmConfig(256, 64, 8, 3))
    return MoeConfig(128, GemmConfig(128, 64, 8, 3), GemmConfig(256, 64, 8, 4))


@triton.jit
def _tile_ids(num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    # Grouped order: programs that run together share weight tiles (pid_n) and token rows.
    pid = tl.program_id(0)
    in_group = GROUP_M * num_pid_n
    first_m = (pid // in_group) * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_size
    pid_n = (pid % in_group) // group_size
    return pid_m, pid_n


@triton.jit
def _gate_up_kernel(
    x_ptr, wg_ptr, wu_ptr, act_ptr, sorted_ids_ptr, block_expert_ptr,
    num_pairs, num_experts, num_pid_m, N, K, stride_xt, stride_we, stride_wn, stride_act,
    TOPK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, EVEN_K: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n = _tile_ids(num_pid_m, tl.cdiv(N, BLOCK_N), GROUP_M)
    expert = tl.load(block_expert_ptr + pid_m)
    if expert >= num_experts:  # padding blocks of the upper-bound grid
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_ids_ptr + offs_m)  # [BM]
    valid = pair < num_pairs
    token = tl.where(valid, pair // TOPK, 0)  # padding rows read token 0, never stored
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N  # wrap: loads need no mask
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + token[:, None].to(tl.int64) * stride_xt + offs_k[None, :]  # [BM, BK]
    w_off = expert.to(tl.int64) * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None]
    g_ptrs = wg_ptr + w_off  # [BK, BN]
    u_ptrs = wu_ptr + w_off  # [BK, BN]
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            g = tl.load(g_ptrs)
            u = tl.load(u_ptrs)
        else:
            k_left = K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
            g = tl.load(g_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
            u = tl.load(u_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        acc_g = tl.dot(a, g, acc_g)
        acc_u = tl.dot(a, u, acc_u)
        a_ptrs += BLOCK_K
        g_ptrs += BLOCK_K
        u_ptrs += BLOCK_K
    act = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u  # silu(gate) * up, fp32
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    act_ptrs = act_ptr + offs_m[:, None].to(tl.int64) * stride_act + offs_n[None, :]
    mask = valid[:, None] & (offs_n[None, :] < N)
    tl.store(act_ptrs, act.to(act_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _down_kernel(
    act_ptr, wd_ptr, out_ptr, sorted_ids_ptr, block_expert_ptr, topk_w_ptr,
    num_pairs, num_experts, num_pid_m, N, K, stride_act, stride_we, stride_wn, stride_ot,
    TOPK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, EVEN_K: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n = _tile_ids(num_pid_m, tl.cdiv(N, BLOCK_N), GROUP_M)
    expert = tl.load(block_expert_ptr + pid_m)
    if expert >= num_experts:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_ids_ptr + offs_m)  # [BM]
    valid = pair < num_pairs
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    offs_k = tl.arange(0, BLOCK_K)
    # act rows are already in sorted order; padding rows hold garbage that stays in its row.
    a_ptrs = act_ptr + offs_m[:, None].to(tl.int64) * stride_act + offs_k[None, :]  # [BM, BK]
    w_ptrs = wd_ptr + expert.to(tl.int64) * stride_we + offs_n[None, :] * stride_wn
    w_ptrs += offs_k[:, None]  # [BK, BN]
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            w = tl.load(w_ptrs)
        else:
            k_left = K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
            w = tl.load(w_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        acc = tl.dot(a, w, acc)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    router_w = tl.load(topk_w_ptr + pair, mask=valid, other=0.0).to(tl.float32)  # [BM]
    acc = acc * router_w[:, None]
    token = tl.where(valid, pair // TOPK, 0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    out_ptrs = out_ptr + token[:, None].to(tl.int64) * stride_ot + offs_n[None, :]
    # A token's k experts land in different programs: fp32 atomics sum them.
    tl.atomic_add(out_ptrs, acc, mask=valid[:, None] & (offs_n[None, :] < N), sem="relaxed")


def count_per_bucket(bucket: Tensor, num_buckets: int) -> Tensor:
    """Like torch.bincount, which syncs with the host on CUDA (sizing its output), so CUDA
    graph capture fails; scatter_add into a fixed size does not."""
    counts = torch.zeros(num_buckets, dtype=torch.long, device=bucket.device)
    return counts.scatter_add_(0, bucket, torch.ones_like(bucket))


def align_by_expert(
    topk_ids: Tensor, expert_start: int, num_experts: int, block_m: int
) -> tuple[Tensor, Tensor]:
    """Sort (token, slot) pairs by local expert, each expert's run padded to block_m, with no
    host sync (the grid is an upper bound). Returns sorted_ids [P] (pair index t*k+j, or
    T*k for padding) and block_expert [P / block_m] (num_experts marks unused blocks)."""
    num_pairs = topk_ids.numel()
    device = topk_ids.device
    local = topk_ids.flatten().long() - expert_start  # [T*k]
    valid = (local >= 0) & (local < num_experts)
    bucket = torch.where(valid, local, num_experts)  # non-local pairs go last
    counts = count_per_bucket(bucket, num_experts + 1)  # [E+1]
    padded = (counts[:num_experts] + block_m - 1) // block_m * block_m  # [E]
    pad_end = torch.cumsum(padded, 0)  # [E]
    max_len = triton.cdiv(num_pairs + num_experts * (block_m - 1), block_m) * block_m
    # non-local pairs (bucket E) are written past the end; tensor ops only, no host scalars,
    # so that CUDA graphs can capture this
    pad_start = torch.cat([pad_end - padded, pad_end.new_full((1,), max_len)])  # [E+1]
    order = torch.argsort(bucket, stable=True)  # [T*k]
    sorted_bucket = bucket[order]
    count_start = torch.cumsum(counts, 0) - counts  # [E+1]
    rank = torch.arange(num_pairs, device=device) - count_start[sorted_bucket]
    dest = pad_start[sorted_bucket] + rank  # [T*k]
    sorted_ids = torch.full((max_len + num_pairs,), num_pairs, dtype=torch.int32, device=device)
    sorted_ids[dest] = order.to(torch.int32)
    block_starts = torch.arange(0, max_len, block_m, device=device)  # [P / BM]
    block_expert = torch.searchsorted(pad_end, block_starts, right=True)
    return sorted_ids[:max_len], block_expert.to(torch.int32)


def moe_gate_up(
    x: Tensor, w_gate: Tensor, w_up: Tensor, sorted_ids: Tensor, block_expert: Tensor,
    topk: int, block_m: int, cfg: GemmConfig, group_m: int = 8,
) -> Tensor:  # fmt: skip
    """act[p] = silu(x_t W_gate_eᵀ) * (x_t W_up_eᵀ) for each sorted row p = (t, e); [P, I]."""
    hidden = x.shape[1]  # [T, H]
    num_experts, inter, _ = w_gate.shape  # [E, I, H]
    assert x.stride(1) == 1 and w_gate.is_contiguous() and w_up.is_contiguous()
    num_pid_m = block_expert.numel()
    act = torch.empty(sorted_ids.numel(), inter, device=x.device, dtype=x.dtype)  # [P, I]
    _gate_up_kernel[(num_pid_m * triton.cdiv(inter, cfg.block_n),)](
        x, w_gate, w_up, act, sorted_ids, block_expert, x.shape[0] * topk, num_experts,
        num_pid_m, inter, hidden, x.stride(0), w_gate.stride(0), w_gate.stride(1), act.stride(0),
        TOPK=topk, BLOCK_M=block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        GROUP_M=group_m, EVEN_K=hidden % cfg.block_k == 0,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return act


def moe_down(
    act: Tensor, w_down: Tensor, sorted_ids: Tensor, block_expert: Tensor, topk_weights: Tensor,
    block_m: int, cfg: GemmConfig, group_m: int = 8,
) -> Tensor:  # fmt: skip
    """out[t] = Σ_j w[t, j] · act[p(t, j)] W_down_eᵀ over local pairs, fp32 [T, H]."""
    num_tokens, topk = topk_weights.shape  # [T, k]
    num_experts, hidden, inter = w_down.shape  # [E, H, I]
    assert w_down.is_contiguous() and act.stride(1) == 1
    num_pid_m = block_expert.numel()
    out = torch.zeros(num_tokens, hidden, device=act.device, dtype=torch.float32)  # [T, H]
    weights = topk_weights.contiguous().view(-1)  # [T*k], indexed by pair
    _down_kernel[(num_pid_m * triton.cdiv(hidden, cfg.block_n),)](
        act, w_down, out, sorted_ids, block_expert, weights, num_tokens * topk, num_experts,
        num_pid_m, hidden, inter, act.stride(0), w_down.stride(0), w_down.stride(1),
        out.stride(0), TOPK=topk, BLOCK_M=block_m, BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k, GROUP_M=group_m, EVEN_K=inter % cfg.block_k == 0,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return out


def fused_moe_triton(
    x: Tensor,
    w_gate: Tensor,
    w_up: Tensor,
    w_down: Tensor,
    topk_ids: Tensor,
    topk_weights: Tensor,
    expert_start: int,
    config: MoeConfig | None = None,
) -> Tensor:
    """Triton path of `fused_moe` (same contract)."""
    num_experts = w_gate.shape[0]
    topk = topk_ids.shape[1]
    cfg = config or default_config(topk_ids.numel(), num_experts)
    sorted_ids, block_expert = align_by_expert(topk_ids, expert_start, num_experts, cfg.block_m)
    act = moe_gate_up(
        x, w_gate, w_up, sorted_ids, block_expert, topk, cfg.block_m, cfg.gate_up, cfg.group_m
    )  # [P, I]
    out = moe_down(
        act, w_down, sorted_ids, block_expert, topk_weights, cfg.block_m, cfg.down, cfg.group_m
    )  # [T, H] fp32
    return out.to(x.dtype)
