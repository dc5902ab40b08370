"""FP8 (e4m3) quantization shared by the KV cache and the FFN experts: one fp32 scale per
vector of the last dimension, its largest magnitude mapped to e4m3's 448. For weights
[.., N, K] that is one scale per output channel; for KV, one per token vector."""

from __future__ import annotations

import torch

from afd.config import ConfigError

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
# --quantization: "none", or "fp8": the routed experts' weights stored as e4m3 with a scale
# per output channel, quantized at load from the checkpoint's 16-bit weights. The MoE kernels
# widen them to the activations' dtype in registers, or, above FP8_ACTIVATION_ROWS rows per
# expert (ffn_worker/kernels/moe_gemm.py), quantize the activations per row as well
QUANTIZATIONS = ("none", "fp8")


def check_quantization(name: str | None) -> str:
    """The canonical name (None is "none"), or a ConfigError naming the flag."""
    name = name or "none"
    if name not in QUANTIZATIONS:
        raise ConfigError(f"--quantization {name!r}: expected one of {', '.join(QUANTIZATIONS)}")
    return name


def quantize_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> e4m3 values [..., D] and fp32 scales [...]: each vector's largest
    magnitude maps to 448 (an all-zero vector stays zero)."""
    x = x.float()
    scale = x.abs().amax(-1) / FP8_MAX
    quant = (x / scale.clamp(min=torch.finfo(torch.float32).tiny)[..., None]).to(FP8)
    return quant, scale


def quantize_fp8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_fp8 over [E, N, K] one leading index at a time, so the fp32 copy it makes
    is one expert's (150 MB at Step3's widths), not the whole tensor's."""
    quant = torch.empty(w.shape, dtype=FP8, device=w.device)
    scale = torch.empty(w.shape[:-1], dtype=torch.float32, device=w.device)
    for e in range(w.shape[0]):
        quant[e], scale[e] = quantize_fp8(w[e])
    return quant, scale
