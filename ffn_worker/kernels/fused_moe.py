"""MoE over the experts one FFN rank owns: a plain-torch reference (the CPU path), a
`torch._grouped_mm` path and the Triton grouped GEMM, with a dispatcher between the last two."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from afd.quantization import BlockScales, fp8_round_trip
from ffn_worker.kernels.moe_gemm import fused_moe_triton

# From `afd-bench kernels` (bench/results/kernels_moe_h100.json): the path that measured
# fastest, by token count T (first entry whose bound T fits; None = no bound). On an H100 the
# Triton path beat torch._grouped_mm at every T measured (64, 256, 1024, 4096).
_PATH_BY_TOKENS: list[tuple[int | None, str]] = [(None, "triton")]


def count_per_bucket(bucket: Tensor, num_buckets: int) -> Tensor:
    """Like torch.bincount, which syncs with the host on CUDA (sizing its output), so CUDA
    graph capture fails; scatter_add into a fixed size does not."""
    counts = torch.zeros(num_buckets, dtype=torch.long, device=bucket.device)
    return counts.scatter_add_(0, bucket, torch.ones_like(bucket))


def _local_pairs(topk_ids: Tensor, expert_start: int, num_experts: int) -> tuple[Tensor, Tensor]:
    local = topk_ids.flatten().long() - expert_start  # [T*k]
    valid = (local >= 0) & (local < num_experts)
    return torch.where(valid, local, num_experts), valid


def fused_moe_ref(
    x: Tensor,
    w_gate: Tensor,
    w_up: Tensor,
    w_down: Tensor,
    topk_ids: Tensor,
    topk_weights: Tensor,
    expert_start: int,
    fp8_activations: bool = False,
) -> Tensor:
    """Per-expert loop as plain model code writes it: expert GEMMs in the input dtype, the
    weighted sum over a token's experts in fp32 (fp64 for fp64 inputs). `fp8_activations`:
    x and each SwiGLU row rounded through e4m3 first, as the Triton path's fp8 experts take
    them."""
    num_experts = w_gate.shape[0]
    topk = topk_ids.shape[1]
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    out = torch.zeros(x.shape, dtype=acc_dtype, device=x.device)  # [T, H]
    bucket, _ = _local_pairs(topk_ids, expert_start, num_experts)
    flat_w = topk_weights.flatten()  # [T*k]
    for e in range(num_experts):
        pairs = torch.nonzero(bucket == e).flatten()  # [n_e]
        if pairs.numel() == 0:
            continue
        tokens = pairs // topk
        xe = x[tokens]  # [n_e, H]
        if fp8_activations:
            xe = fp8_round_trip(xe)
        h = F.silu(xe @ w_gate[e].T) * (xe @ w_up[e].T)  # [n_e, I]
        if fp8_activations:
            h = fp8_round_trip(h)
        y = (h @ w_down[e].T).to(acc_dtype)  # [n_e, H]
        out.index_add_(0, tokens, y * flat_w[pairs].to(acc_dtype)[:, None])
    return out.to(x.dtype)


def has_grouped_mm() -> bool:
    return hasattr(torch, "_grouped_mm")


def fused_moe_grouped_mm(
    x: Tensor,
    w_gate: Tensor,
    w_up: Tensor,
    w_down: Tensor,
    topk_ids: Tensor,
    topk_weights: Tensor,
    expert_start: int,
) -> Tensor:
    """torch._grouped_mm over pairs sorted by expert; no host sync (non-local pairs sort last,
    past the final offset, and are masked out of the sum)."""
    num_experts = w_gate.shape[0]
    topk = topk_ids.shape[1]
    bucket, valid = _local_pairs(topk_ids, expert_start, num_experts)
    order = torch.argsort(bucket, stable=True)  # [T*k]
    counts = count_per_bucket(bucket, num_experts + 1)[:num_experts]  # [E]
    offs = torch.cumsum(counts, 0).to(torch.int32)  # [E] group ends
    tokens = order // topk  # [T*k]
    xs = x[tokens]  # [T*k, H]
    gate = torch._grouped_mm(xs, w_gate.transpose(1, 2), offs=offs)  # [T*k, I]
    up = torch._grouped_mm(xs, w_up.transpose(1, 2), offs=offs)  # [T*k, I]
    y = torch._grouped_mm(F.silu(gate) * up, w_down.transpose(1, 2), offs=offs)  # [T*k, H]
    weight = topk_weights.flatten()[order].float()  # [T*k]
    # Rows past the last offset are not computed (may hold anything): where, not multiply.
    contrib = torch.where(valid[order][:, None], y.float() * weight[:, None], 0.0)  # [T*k, H]
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)  # [T, H]
    return out.index_add_(0, tokens, contrib).to(x.dtype)


def pick_path(num_tokens: int) -> str:
    for bound, path in _PATH_BY_TOKENS:
        if bound is None or num_tokens <= bound:
            return path
    return "triton"


def fused_moe(
    x: Tensor,
    w_gate: Tensor,
    w_up: Tensor,
    w_down: Tensor,
    topk_ids: Tensor,
    topk_weights: Tensor,
    expert_start: int,
    scales: tuple[BlockScales, BlockScales, BlockScales] | None = None,
    model_experts: int | None = None,
) -> Tensor:
    """Σ over (t, j) with expert_start <= topk_ids[t, j] < expert_start + E_local of
    topk_weights[t, j] · down_e(silu(gate_e(x_t)) * up_e(x_t)); other experts add 0.

    x [T, H]; w_gate/w_up [E_local, I, H]; w_down [E_local, H, I]; topk_ids [T, k] holds
    GLOBAL expert ids; topk_weights [T, k]. Returns [T, H] in x's dtype. fp8 (e4m3) weights
    come with `scales` (gate, up, down: one fp32 scale per output channel, or per block as a
    block-FP8 checkpoint stores them): the Triton path reads them as they are and takes the
    activations in e4m3 per row; the CPU path dequantizes the weights and rounds the
    activations the same way, so both compute the same numbers. `model_experts`:
    the model's expert count, by which the Triton path picks tiles (default E_local).
    """
    if x.is_cuda and pick_path(x.shape[0]) == "triton":
        return fused_moe_triton(
            x,
            w_gate,
            w_up,
            w_down,
            topk_ids,
            topk_weights,
            expert_start,
            scales=scales,
            model_experts=model_experts,
        )
    if scales is not None:
        weights = (w_gate, w_up, w_down)
        w_gate, w_up, w_down = (
            s.dequantize(w, x.dtype) for w, s in zip(weights, scales, strict=True)
        )
    args = (x, w_gate, w_up, w_down, topk_ids, topk_weights, expert_start)
    if not x.is_cuda:
        return fused_moe_ref(*args, fp8_activations=scales is not None)
    return fused_moe_grouped_mm(*args) if has_grouped_mm() else fused_moe_triton(*args)
