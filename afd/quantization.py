"""FP8 (e4m3) quantization shared by the KV cache, the FFN experts and block-FP8 checkpoints.

A quantized weight [..., N, K] is its e4m3 values times one fp32 scale per block of
(rows, columns) (`BlockScales`). Quantizing at load (`quantize_fp8_rows`) takes one scale per
output channel, the block (1, K), its largest magnitude mapped to e4m3's 448; a block-FP8
checkpoint (Step3's published one, DeepSeek-V3's) brings 128 x 128 blocks. For the KV cache,
`quantize_fp8` takes one scale per token vector; for the activations of the fp8 GEMMs, one
power-of-two scale per row."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from afd.config import ConfigError, ModelConfig

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
# --quantization: "none" (16-bit experts: a block-FP8 checkpoint's are dequantized at load),
# or "fp8": the routed experts' weights stored as e4m3, as a block-FP8 checkpoint holds them
# or quantized at load from 16-bit ones with a scale per output channel; the MoE kernels
# quantize the activations per row too, so both products run on fp8 tensor cores
# (ffn_worker/kernels/moe_gemm.py). Unset: what the checkpoint holds (fp8 for a block-FP8
# checkpoint), as vLLM does. --fp8-attention keeps the attention projections in e4m3 too
# (off by default: without it a block-FP8 checkpoint's are dequantized at load).
QUANTIZATIONS = ("none", "fp8")


def check_quantization(name: str | None) -> str | None:
    """The name, None (follow the checkpoint) included, or a ConfigError naming the flag."""
    if name is not None and name not in QUANTIZATIONS:
        raise ConfigError(f"--quantization {name!r}: expected one of {', '.join(QUANTIZATIONS)}")
    return name


def resolve_quantization(name: str | None, cfg: ModelConfig) -> str:
    """--quantization as served: unset follows the checkpoint (fp8 if it is block-FP8)."""
    if check_quantization(name) is None:
        return "fp8" if cfg.fp8_weight_block is not None else "none"
    return name


@dataclass(frozen=True)
class BlockScales:
    """The fp32 scales of an e4m3 weight [..., N, K]: one per block of `block` = (rows,
    columns), shaped [..., ceil(N / rows), ceil(K / columns)]; each weight is its e4m3 value
    times its block's scale. One scale per output channel is the block (1, K)."""

    scale: torch.Tensor
    block: tuple[int, int]

    @staticmethod
    def shape_for(weight_shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, ...]:
        *lead, n, k = weight_shape
        return (*lead, math.ceil(n / block[0]), math.ceil(k / block[1]))

    def dequantize(self, w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """w's values in `dtype`, one leading index at a time (the fp32 copy it makes is one
        expert's at most)."""
        assert tuple(self.scale.shape) == self.shape_for(tuple(w.shape), self.block)
        (rows, cols), (n, k) = self.block, w.shape[-2:]
        out = torch.empty(w.shape, dtype=dtype, device=w.device)
        scales = self.scale.reshape(-1, *self.scale.shape[-2:]).float()
        for o, q, s in zip(out.view(-1, n, k), w.reshape(-1, n, k), scales, strict=True):
            s = s.repeat_interleave(rows, 0)[:n].repeat_interleave(cols, 1)[:, :k]
            o.copy_(q.float() * s)
        return out

    def k_tile(self, block_k: int) -> int:
        """The K tile a kernel scaling each tile's sum can use: block_k if one scale block
        along K spans the whole width, else the largest power of two at most block_k that
        divides the blocks' columns, at least 32 (Triton's smallest K for e4m3 operands)."""
        cols = self.block[1]
        if self.scale.shape[-1] == 1:
            return block_k
        tile = block_k
        while tile > 32 and cols % tile:
            tile //= 2
        if cols % tile:
            raise ValueError(f"fp8 scale blocks of {cols} columns: not a multiple of 32")
        return tile

    def to(self, device: torch.device | str) -> BlockScales:
        return BlockScales(self.scale.to(device), self.block)


def power_of_two_scales(scale: torch.Tensor) -> torch.Tensor:
    """The smallest power of two at or above each fp32 scale (0 stays 0, subnormals go to
    2^-126; from 2^127 on, and inf or NaN, as they are)."""
    bits = scale.float().contiguous().view(torch.int32)
    up = ((bits.clamp(max=0x7F000000) + 0x7FFFFF) & -0x800000).view(torch.float32)
    return torch.where(bits < 0x7F000000, up, scale.float())


def quantize_fp8(x: torch.Tensor, power_of_two: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> e4m3 values [..., D] and fp32 scales [...]: each vector's largest
    magnitude maps to 448 (an all-zero vector stays zero). `power_of_two`: the scale rounded
    up to a power of two, so the largest maps into (224, 448]; the fp8 GEMMs' activations
    take those (fp8_round_trip, attn_worker/kernels/fp8_rows.py). A last-bit change of a
    row's largest element (another batch split's sum order upstream) then leaves the scale,
    and every other element's rounding, as they were, except across a power of two; with an
    exact scale it re-rounds ~6 % of the row (tests/test_fp8_scales.py). The cost, e4m3 being
    floating point, is small: rms error 2.65 % against 2.60 % for Gaussian rows of 256 (2.6
    against 2.4 % at 32 elements, where the exact top matters more)."""
    x = x.float()
    scale = x.abs().amax(-1) / FP8_MAX
    if power_of_two:
        scale = power_of_two_scales(scale)
    quant = (x / scale.clamp(min=torch.finfo(torch.float32).tiny)[..., None]).to(FP8)
    return quant, scale


def fp8_round_trip(x: torch.Tensor) -> torch.Tensor:
    """x [..., D] through e4m3 with one power-of-two scale per vector, back in x's dtype:
    what the fp8 kernels' activations hold, for the paths that compute in 16 or 32 bits (the
    CPU)."""
    quant, scale = quantize_fp8(x, power_of_two=True)
    return (quant.float() * scale[..., None]).to(x.dtype)


def quantize_fp8_rows(w: torch.Tensor) -> tuple[torch.Tensor, BlockScales]:
    """w [N, K] or stacked [E, N, K] -> e4m3 values and one scale per output channel (the
    block (1, K)), stacked ones quantized one leading index at a time, so the fp32 copy it
    makes is one expert's (150 MB at Step3's widths), not the whole tensor's."""
    if w.dim() == 2:
        quant, scale = quantize_fp8(w)
        return quant, BlockScales(scale[:, None], (1, w.shape[-1]))
    quant = torch.empty(w.shape, dtype=FP8, device=w.device)
    scale = torch.empty(w.shape[:-1], dtype=torch.float32, device=w.device)
    for e in range(w.shape[0]):
        quant[e], scale[e] = quantize_fp8(w[e])
    return quant, BlockScales(scale[..., None], (1, w.shape[-1]))


def quantize_fp8_blocks(
    w: torch.Tensor, block: tuple[int, int]
) -> tuple[torch.Tensor, BlockScales]:
    """w [..., N, K] -> e4m3 values and one scale per block of (rows, columns), each block's
    largest magnitude mapped to 448: the layout of a block-FP8 checkpoint (DeepSeek-V3's and
    Step3's, 128 x 128)."""
    (rows, cols), (n, k) = block, w.shape[-2:]
    nb, kb = math.ceil(n / rows), math.ceil(k / cols)
    padded = torch.zeros(*w.shape[:-2], nb * rows, kb * cols, device=w.device)
    padded[..., :n, :k] = w.float()
    blocks = padded.unflatten(-1, (kb, cols)).unflatten(-3, (nb, rows))  # [..., nb, r, kb, c]
    scale = blocks.abs().amax(dim=(-3, -1)) / FP8_MAX  # [..., nb, kb]
    tiny = torch.finfo(torch.float32).tiny
    quant = (blocks / scale.clamp(min=tiny)[..., :, None, :, None]).to(FP8)
    quant = quant.flatten(-2).flatten(-3, -2)[..., :n, :k].contiguous()
    return quant, BlockScales(scale, block)
