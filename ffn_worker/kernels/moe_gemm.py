"""Triton grouped GEMMs for the MoE layer: (token, slot) pairs sorted by expert and cut into row
tiles per expert, then gate+up with SwiGLU fused, then down with the router weight and
scatter-add fused."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from afd.quantization import BlockScales
from attn_worker.kernels.fp8_rows import quantize_rows
from ffn_worker.kernels.moe_align import ExpertTiles, align_by_expert
from ffn_worker.kernels.moe_config import GemmConfig, MoeConfig, default_config, tile_config

__all__ = [
    "ExpertTiles",
    "GemmConfig",
    "MoeConfig",
    "align_by_expert",
    "default_config",
    "fused_moe_triton",
    "tile_config",
]

try:  # TMA descriptors for the weight tiles (Triton >= 3.4)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton: pointer loads only
    TensorDescriptor = None


@triton.jit
def _program_tile(tile_meta_ptr, num_experts, num_pid_n, BLOCK_M: tl.constexpr):
    # Programs run expert by expert with the expert's row tiles fastest, so all tiles of one
    # expert use a weight tile at about the same time: HBM serves it once, L2 the others.
    pid = tl.program_id(0)
    meta = tile_meta_ptr + (pid // num_pid_n) * 4
    expert = tl.load(meta)
    first_tile = tl.load(meta + 1)
    first_row = tl.load(meta + 2)
    num_rows = tl.load(meta + 3)
    num_tiles = tl.maximum(tl.cdiv(num_rows, BLOCK_M), 1)
    local = pid - first_tile * num_pid_n
    m = local % num_tiles
    rows = tl.minimum(num_rows - m * BLOCK_M, BLOCK_M)
    return expert, first_row + m * BLOCK_M, rows, local // num_tiles


@triton.jit
def _gate_up_tile(
    x_ptr, xs_ptr, wg, wu, sg_ptr, su_ptr, act_ptr, sorted_ids_ptr, expert, row0, rows, pid_n,
    N, K, stride_xt, stride_we, stride_wn, stride_act, stride_se, stride_sn, SCALE_N, SCALE_K,
    TOPK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr, TMA: tl.constexpr, W8: tl.constexpr, K_BLOCKS: tl.constexpr,
    A8: tl.constexpr, PROMOTE_K: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    offs_m = tl.arange(0, BLOCK_M)
    valid = offs_m < rows
    pair = tl.load(sorted_ids_ptr + row0 + offs_m, mask=valid, other=0)  # [BM]
    token = pair // TOPK  # rows past the tile's end read token 0 and are never stored
    n0 = pid_n * BLOCK_N
    offs_n = (n0 + tl.arange(0, BLOCK_N)) % N  # wrap: loads need no mask
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + token[:, None].to(tl.int64) * stride_xt + offs_k[None, :]  # [BM, BK]
    if not TMA:
        w_off = expert.to(tl.int64) * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None]
    if W8:  # fp8 weights: a scale per block of SCALE_N x SCALE_K, [E, N / SCALE_N, K / SCALE_K]
        s_off = expert.to(tl.int64) * stride_se + (offs_n // SCALE_N) * stride_sn  # [BN]
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        if EVEN_K:
            a = tl.load(a_ptrs)
        else:
            a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
        if TMA:  # [BN, BK] boxes of the [E*N, K] view; out-of-range columns read 0
            g = wg.load([expert * N + n0, k * BLOCK_K]).T
            u = wu.load([expert * N + n0, k * BLOCK_K]).T
        elif EVEN_K:
            g = tl.load(wg + w_off)
            u = tl.load(wu + w_off)
        else:
            g = tl.load(wg + w_off, mask=offs_k[:, None] < k_left, other=0.0)
            u = tl.load(wu + w_off, mask=offs_k[:, None] < k_left, other=0.0)
        if W8 and not A8:  # e4m3 values are exact in 16 bits; the scales come after the sum
            g = g.to(a.dtype)
            u = u.to(a.dtype)
        if K_BLOCKS:  # scales change along K: each tile's sum scaled (BLOCK_K divides SCALE_K)
            k_block = (k * BLOCK_K) // SCALE_K
            scale_g = tl.load(sg_ptr + s_off + k_block)[None, :]
            scale_u = tl.load(su_ptr + s_off + k_block)[None, :]
            acc_g += tl.dot(a, g, input_precision=PRECISION) * scale_g
            acc_u += tl.dot(a, u, input_precision=PRECISION) * scale_u
        elif A8 and PROMOTE_K > 0:  # fp32 sums every PROMOTE_K products (fp8 MMAs sum short)
            acc_g = tl.dot(a, g, acc_g, max_num_imprecise_acc=PROMOTE_K)
            acc_u = tl.dot(a, u, acc_u, max_num_imprecise_acc=PROMOTE_K)
        else:
            acc_g = tl.dot(a, g, acc_g, input_precision=PRECISION)
            acc_u = tl.dot(a, u, acc_u, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        if not TMA:
            w_off += BLOCK_K
    if W8 and not K_BLOCKS:  # one scale per output channel (or per row block): after the sum
        acc_g *= tl.load(sg_ptr + s_off)[None, :]
        acc_u *= tl.load(su_ptr + s_off)[None, :]
    if A8:  # and one per token row of x
        x_scale = tl.load(xs_ptr + token, mask=valid, other=0.0)[:, None]
        acc_g *= x_scale
        acc_u *= x_scale
    act = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u  # silu(gate) * up, fp32
    offs_n = n0 + tl.arange(0, BLOCK_N)
    act_ptrs = act_ptr + (row0 + offs_m)[:, None].to(tl.int64) * stride_act + offs_n[None, :]
    tl.store(act_ptrs, act.to(act_ptr.dtype.element_ty), mask=valid[:, None] & (offs_n < N))


@triton.jit
def _gate_up_kernel(
    x_ptr, xs_ptr, wg, wu, sg_ptr, su_ptr, act_ptr, sorted_ids_ptr, tile_meta_ptr, num_experts,
    num_pid_n, N, K, stride_xt, stride_we, stride_wn, stride_act, stride_se, stride_sn, SCALE_N,
    SCALE_K,
    TOPK: tl.constexpr, BLOCK_M: tl.constexpr, SMALL_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, TMA: tl.constexpr, W8: tl.constexpr,
    K_BLOCKS: tl.constexpr, A8: tl.constexpr, PROMOTE_K: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    expert, row0, rows, pid_n = _program_tile(tile_meta_ptr, num_experts, num_pid_n, BLOCK_M)
    if expert >= num_experts:  # past the last tile of the upper-bound grid
        return
    # An expert's last tile with at most SMALL_M rows runs at that size: less padding.
    if SMALL_M == 0:
        _gate_up_tile(
            x_ptr, xs_ptr, wg, wu, sg_ptr, su_ptr, act_ptr, sorted_ids_ptr, expert, row0, rows,
            pid_n, N, K, stride_xt, stride_we, stride_wn, stride_act, stride_se, stride_sn,
            SCALE_N, SCALE_K, TOPK, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, TMA, W8, K_BLOCKS, A8,
            PROMOTE_K, PRECISION,
        )  # fmt: skip
    elif rows <= SMALL_M:
        _gate_up_tile(
            x_ptr, xs_ptr, wg, wu, sg_ptr, su_ptr, act_ptr, sorted_ids_ptr, expert, row0, rows,
            pid_n, N, K, stride_xt, stride_we, stride_wn, stride_act, stride_se, stride_sn,
            SCALE_N, SCALE_K, TOPK, SMALL_M, BLOCK_N, BLOCK_K, EVEN_K, TMA, W8, K_BLOCKS, A8,
            PROMOTE_K, PRECISION,
        )  # fmt: skip
    else:
        _gate_up_tile(
            x_ptr, xs_ptr, wg, wu, sg_ptr, su_ptr, act_ptr, sorted_ids_ptr, expert, row0, rows,
            pid_n, N, K, stride_xt, stride_we, stride_wn, stride_act, stride_se, stride_sn,
            SCALE_N, SCALE_K, TOPK, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, TMA, W8, K_BLOCKS, A8,
            PROMOTE_K, PRECISION,
        )  # fmt: skip


@triton.jit
def _down_tile(
    act_ptr, as_ptr, wd, sd_ptr, out_ptr, sorted_ids_ptr, topk_w_ptr, expert, row0, rows, pid_n,
    N, K, stride_act, stride_we, stride_wn, stride_ot, stride_se, stride_sn, SCALE_N, SCALE_K,
    TOPK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr, TMA: tl.constexpr, W8: tl.constexpr, K_BLOCKS: tl.constexpr,
    A8: tl.constexpr, PROMOTE_K: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    offs_m = tl.arange(0, BLOCK_M)
    valid = offs_m < rows
    pair = tl.load(sorted_ids_ptr + row0 + offs_m, mask=valid, other=0)  # [BM]
    n0 = pid_n * BLOCK_N
    offs_n = (n0 + tl.arange(0, BLOCK_N)) % N
    offs_k = tl.arange(0, BLOCK_K)
    # act rows are in sorted order; rows past the tile's end are masked (they may be past P)
    a_ptrs = act_ptr + (row0 + offs_m)[:, None].to(tl.int64) * stride_act + offs_k[None, :]
    if not TMA:
        w_off = expert.to(tl.int64) * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None]
    if W8:
        s_off = expert.to(tl.int64) * stride_se + (offs_n // SCALE_N) * stride_sn  # [BN]
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        if EVEN_K:
            a = tl.load(a_ptrs, mask=valid[:, None], other=0.0)
        else:
            a = tl.load(a_ptrs, mask=valid[:, None] & (offs_k[None, :] < k_left), other=0.0)
        if TMA:
            w = wd.load([expert * N + n0, k * BLOCK_K]).T
        elif EVEN_K:
            w = tl.load(wd + w_off)
        else:
            w = tl.load(wd + w_off, mask=offs_k[:, None] < k_left, other=0.0)
        if W8 and not A8:
            w = w.to(a.dtype)
        if K_BLOCKS:
            scale = tl.load(sd_ptr + s_off + (k * BLOCK_K) // SCALE_K)[None, :]
            acc += tl.dot(a, w, input_precision=PRECISION) * scale
        elif A8 and PROMOTE_K > 0:
            acc = tl.dot(a, w, acc, max_num_imprecise_acc=PROMOTE_K)
        else:
            acc = tl.dot(a, w, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        if not TMA:
            w_off += BLOCK_K
    router_w = tl.load(topk_w_ptr + pair, mask=valid, other=0.0).to(tl.float32)  # [BM]
    acc = acc * router_w[:, None]
    if W8 and not K_BLOCKS:
        acc *= tl.load(sd_ptr + s_off)[None, :]
    if A8:  # act rows' scales, in sorted order
        acc *= tl.load(as_ptr + row0 + offs_m, mask=valid, other=0.0)[:, None]
    offs_n = n0 + tl.arange(0, BLOCK_N)
    out_ptrs = out_ptr + (pair // TOPK)[:, None].to(tl.int64) * stride_ot + offs_n[None, :]
    # A token's k experts land in different programs: fp32 atomics sum them.
    tl.atomic_add(out_ptrs, acc, mask=valid[:, None] & (offs_n[None, :] < N), sem="relaxed")


@triton.jit
def _down_kernel(
    act_ptr, as_ptr, wd, sd_ptr, out_ptr, sorted_ids_ptr, tile_meta_ptr, topk_w_ptr,
    num_experts, num_pid_n, N, K, stride_act, stride_we, stride_wn, stride_ot, stride_se,
    stride_sn, SCALE_N, SCALE_K,
    TOPK: tl.constexpr, BLOCK_M: tl.constexpr, SMALL_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, TMA: tl.constexpr, W8: tl.constexpr,
    K_BLOCKS: tl.constexpr, A8: tl.constexpr, PROMOTE_K: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    expert, row0, rows, pid_n = _program_tile(tile_meta_ptr, num_experts, num_pid_n, BLOCK_M)
    if expert >= num_experts:
        return
    if SMALL_M == 0:
        _down_tile(
            act_ptr, as_ptr, wd, sd_ptr, out_ptr, sorted_ids_ptr, topk_w_ptr, expert, row0, rows,
            pid_n, N, K, stride_act, stride_we, stride_wn, stride_ot, stride_se, stride_sn,
            SCALE_N, SCALE_K, TOPK, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, TMA, W8, K_BLOCKS, A8,
            PROMOTE_K, PRECISION,
        )  # fmt: skip
    elif rows <= SMALL_M:
        _down_tile(
            act_ptr, as_ptr, wd, sd_ptr, out_ptr, sorted_ids_ptr, topk_w_ptr, expert, row0, rows,
            pid_n, N, K, stride_act, stride_we, stride_wn, stride_ot, stride_se, stride_sn,
            SCALE_N, SCALE_K, TOPK, SMALL_M, BLOCK_N, BLOCK_K, EVEN_K, TMA, W8, K_BLOCKS, A8,
            PROMOTE_K, PRECISION,
        )  # fmt: skip
    else:
        _down_tile(
            act_ptr, as_ptr, wd, sd_ptr, out_ptr, sorted_ids_ptr, topk_w_ptr, expert, row0, rows,
            pid_n, N, K, stride_act, stride_we, stride_wn, stride_ot, stride_se, stride_sn,
            SCALE_N, SCALE_K, TOPK, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, TMA, W8, K_BLOCKS, A8,
            PROMOTE_K, PRECISION,
        )  # fmt: skip


def _scale_args(
    w: Tensor, scales: tuple[BlockScales, ...] | None, count: int, cfg: GemmConfig
) -> tuple[tuple[Tensor, ...], dict[str, object]]:
    """The kernels' scale pointers and arguments for weights [E, N, K]: fp8 weights' block
    scales, fp32 [E, N / rows, K / columns] each, all of one block; for 16-bit weights the
    weight stands in (never read)."""
    fp8 = w.dtype == torch.float8_e4m3fn
    assert fp8 == (scales is not None), "fp8 expert weights need their scales, others none"
    if scales is None:
        off = dict(stride_se=0, stride_sn=0, SCALE_N=1, SCALE_K=1, W8=False, K_BLOCKS=False)
        return (w,) * count, off
    (rows, cols), first = scales[0].block, scales[0].scale
    for s in scales:
        assert s.block == (rows, cols) and s.scale.dtype == torch.float32
        assert s.scale.is_contiguous() and s.scale.shape == first.shape
        assert tuple(s.scale.shape) == BlockScales.shape_for(tuple(w.shape), s.block)
    k_blocks = first.shape[-1] > 1
    assert not k_blocks or cols % cfg.block_k == 0, "a K tile must sit in one scale block"
    kwargs = dict(
        stride_se=first.stride(0),
        stride_sn=first.stride(1),
        SCALE_N=rows,
        SCALE_K=cols,
        W8=True,
        K_BLOCKS=k_blocks,
    )
    return tuple(s.scale for s in scales), kwargs


def _precision(a: Tensor) -> str:
    """fp32 activations (tests, the tiny model) multiply in IEEE fp32, not TF32's 10-bit
    mantissa, so that the GPU computes what the CPU reference does; 16- and 8-bit operands
    ignore it."""
    return "ieee" if a.dtype == torch.float32 else "tf32"


def _weight_arg(w: Tensor, cfg: GemmConfig) -> Tensor | object:
    """The weight as the kernels take it: a TMA descriptor over its [E*N, K] view, or itself."""
    if not cfg.tma:
        return w
    assert TensorDescriptor is not None, "GemmConfig.tma needs Triton >= 3.4"
    return TensorDescriptor.from_tensor(w.view(-1, w.shape[2]), [cfg.block_n, cfg.block_k])


def moe_gate_up(
    x: Tensor, w_gate: Tensor, w_up: Tensor, tiles: ExpertTiles, topk: int, cfg: GemmConfig,
    small_m: int = 0, scales: tuple[BlockScales, BlockScales] | None = None,
    x_scale: Tensor | None = None, out_dtype: torch.dtype | None = None,
) -> Tensor:  # fmt: skip
    """act[p] = silu(x_t W_gate_eᵀ) * (x_t W_up_eᵀ) for each sorted row p = (t, e); [P, I].
    fp8 weights come with `scales` (per output channel, or per block). fp8 x (then the
    products run on fp8 tensor cores) comes with `x_scale`, fp32 [T], and `out_dtype`."""
    hidden = x.shape[1]  # [T, H]
    num_experts, inter, _ = w_gate.shape  # [E, I, H]
    assert x.stride(1) == 1 and w_gate.is_contiguous() and w_up.is_contiguous()
    assert (x_scale is None) == (x.dtype != torch.float8_e4m3fn) and (x_scale is None or scales)
    dtype = out_dtype or x.dtype
    act = torch.empty(tiles.sorted_ids.numel(), inter, device=x.device, dtype=dtype)  # [P, I]
    num_pid_n = triton.cdiv(inter, cfg.block_n)
    (sg, su), scale_args = _scale_args(w_gate, scales, 2, cfg)
    _gate_up_kernel[(tiles.tile_meta.shape[0] * num_pid_n,)](
        x, x if x_scale is None else x_scale, _weight_arg(w_gate, cfg), _weight_arg(w_up, cfg),
        sg, su, act, tiles.sorted_ids,
        tiles.tile_meta, num_experts, num_pid_n, inter, hidden, x.stride(0), w_gate.stride(0),
        w_gate.stride(1), act.stride(0), TOPK=topk, BLOCK_M=tiles.block_m, SMALL_M=small_m,
        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, EVEN_K=hidden % cfg.block_k == 0, TMA=cfg.tma,
        A8=x_scale is not None, PRECISION=_precision(x), **scale_args,
        PROMOTE_K=cfg.fp8_promote_k, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return act


def moe_down(
    act: Tensor, w_down: Tensor, tiles: ExpertTiles, topk_weights: Tensor, cfg: GemmConfig,
    small_m: int = 0, scale: BlockScales | None = None, act_scale: Tensor | None = None,
) -> Tensor:  # fmt: skip
    """out[t] = Σ_j w[t, j] · act[p(t, j)] W_down_eᵀ over local pairs, fp32 [T, H]. fp8
    weights come with `scale`; fp8 act with `act_scale`, fp32 [P]."""
    num_tokens, topk = topk_weights.shape  # [T, k]
    num_experts, hidden, inter = w_down.shape  # [E, H, I]
    assert w_down.is_contiguous() and act.stride(1) == 1
    out = torch.zeros(num_tokens, hidden, device=act.device, dtype=torch.float32)  # [T, H]
    weights = topk_weights.contiguous().view(-1)  # [T*k], indexed by pair
    num_pid_n = triton.cdiv(hidden, cfg.block_n)
    (sd,), scale_args = _scale_args(w_down, None if scale is None else (scale,), 1, cfg)
    _down_kernel[(tiles.tile_meta.shape[0] * num_pid_n,)](
        act, act if act_scale is None else act_scale, _weight_arg(w_down, cfg), sd, out,
        tiles.sorted_ids, tiles.tile_meta, weights,
        num_experts, num_pid_n, hidden, inter, act.stride(0), w_down.stride(0),
        w_down.stride(1), out.stride(0), TOPK=topk, BLOCK_M=tiles.block_m, SMALL_M=small_m,
        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, EVEN_K=inter % cfg.block_k == 0, TMA=cfg.tma,
        A8=act_scale is not None, PRECISION=_precision(act), **scale_args,
        PROMOTE_K=cfg.fp8_promote_k, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return out


# fp8 experts take fp8 activations (x and the SwiGLU output per row) at every token count:
# at few rows per expert it costs what widening the weights does (H100, 48 experts: T=64
# 1.82 / 1.80 ms, T=256 2.00 / 2.00), at many it is 1.8x faster (T=1024 2.55 against 4.56),
# and a row's numbers then do not depend on how many tokens share the call, so micro-batch
# splits compute what colocated does (a switch by rows per expert broke that; NOTES-kernels
# versions 16-17). Widened weights stay as an option (fp8_activations=False).


def fused_moe_triton(
    x: Tensor,
    w_gate: Tensor,
    w_up: Tensor,
    w_down: Tensor,
    topk_ids: Tensor,
    topk_weights: Tensor,
    expert_start: int,
    config: MoeConfig | None = None,
    scales: tuple[BlockScales, BlockScales, BlockScales] | None = None,
    fp8_activations: bool = True,
    model_experts: int | None = None,
) -> Tensor:
    """Triton path of `fused_moe` (same contract). With fp8 weights, `fp8_activations`
    quantizes x and the SwiGLU output per row (dynamic scales) so that both products run on
    fp8 tensor cores (twice bf16's rate); False widens the weights in registers instead.
    Tiles follow rows per expert of the model (`model_experts`, default this rank's), since
    topk_ids holds every rank's pairs."""
    num_experts = w_gate.shape[0]
    topk = topk_ids.shape[1]
    experts = model_experts or num_experts
    cfg = tile_config(config, topk_ids.numel(), experts, x.dtype, scales, fp8_activations)
    tiles = align_by_expert(topk_ids, expert_start, num_experts, cfg.block_m)
    gu_scales, d_scale = (None, None) if scales is None else (scales[:2], scales[2])
    if scales is not None and fp8_activations:  # both products on fp8 tensor cores
        x8, x_scale = quantize_rows(x)  # one scale per token row
        act = moe_gate_up(
            x8, w_gate, w_up, tiles, topk, cfg.gate_up, cfg.small_m, gu_scales, x_scale, x.dtype
        )  # [P, I]
        act8, act_scale = quantize_rows(act)  # and per act row
        out = moe_down(
            act8, w_down, tiles, topk_weights, cfg.down, cfg.small_m, d_scale, act_scale
        )  # [T, H]
        return out.to(x.dtype)
    act = moe_gate_up(x, w_gate, w_up, tiles, topk, cfg.gate_up, cfg.small_m, gu_scales)  # [P, I]
    out = moe_down(act, w_down, tiles, topk_weights, cfg.down, cfg.small_m, d_scale)  # [T, H]
    return out.to(x.dtype)
