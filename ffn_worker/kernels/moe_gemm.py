"""The MoE layer's grouped GEMMs on Triton: (token, slot) pairs sorted by expert and cut into
row tiles per expert, then gate+up with SwiGLU fused, then down with the router weight and
scatter-add fused (the kernels are in moe_kernels.py; their launches and fused_moe_triton
here)."""

from __future__ import annotations

import torch
import triton
from torch import Tensor

from afd.quantization import BlockScales
from attn_worker.kernels.fp8_rows import quantize_rows
from ffn_worker.kernels.moe_align import ExpertTiles, align_by_expert
from ffn_worker.kernels.moe_config import GemmConfig, MoeConfig, default_config, tile_config
from ffn_worker.kernels.moe_kernels import down_kernel, gate_up_kernel

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
    gate_up_kernel[(tiles.tile_meta.shape[0] * num_pid_n,)](
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
    down_kernel[(tiles.tile_meta.shape[0] * num_pid_n,)](
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
# and a row's quantization then does not depend on how many tokens share the call (a switch
# by rows per expert made a micro-batch split differ from colocated by a rounding mode;
# NOTES-kernels versions 16-17; their scales are powers of two, version 19; what still
# differs across splits: NOTES-e2e, eighth session). Widened weights stay as an option
# (fp8_activations=False).


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
