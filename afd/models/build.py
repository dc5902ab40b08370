"""Builds each role's half of the model from a checkpoint: attention side or one FFN shard."""

from __future__ import annotations

from pathlib import Path

import torch

from afd.config import ConfigError, ModelConfig
from afd.models.loader import build_on_device, load_params
from afd.models.step3 import (
    AttentionSide,
    FFNLayer,
    FFNShard,
    FFNSide,
    fuse_attention_projections,
)
from afd.quantization import resolve_quantization

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype, cfg: ModelConfig) -> torch.dtype:
    """`auto` follows the checkpoint's torch_dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = cfg.torch_dtype if dtype == "auto" else dtype
    if name not in DTYPES:
        raise ConfigError(
            f"--dtype: unsupported dtype {name!r}; use one of {sorted(DTYPES)} or auto"
        )
    return DTYPES[name]


def load_attention_side(
    path: str | Path,
    cfg: ModelConfig,
    dtype: torch.dtype,
    device: torch.device | str,
    fp8_projections: bool = False,
) -> AttentionSide:
    """The attention side. `fp8_projections` (--fp8-attention) keeps the attention
    projections in e4m3: a block-FP8 checkpoint's as stored, 16-bit ones quantized here with
    a scale per output channel. Otherwise they are 16-bit (a block-FP8 checkpoint's
    dequantized): on an H100 the e4m3 GEMMs are faster only up to ~128 rows."""
    side = build_on_device(lambda: AttentionSide(cfg), dtype, device)
    fp8 = fp8_projections
    keep = side.projection_names() if fp8 else ()
    specs = side.param_specs()
    stored = load_params(side, specs, path, dtype, device, cfg.fp8_weight_block, keep)
    if fp8:
        side.quantize_projections_fp8(stored)
    return fuse_attention_projections(side).eval()


def load_ffn_side(
    path: str | Path,
    cfg: ModelConfig,
    shard: FFNShard,
    dtype: torch.dtype,
    device: torch.device | str,
    quantization: str | None = None,
) -> FFNSide:
    """One FFN rank's share. `quantization` (--quantization; unset follows the checkpoint):
    "fp8" keeps the routed experts in e4m3, a block-FP8 checkpoint's as stored; "none"
    loads 16-bit experts (a block-FP8 checkpoint's dequantized). The shared expert and dense
    layers are always 16-bit."""
    block = cfg.fp8_weight_block
    if resolve_quantization(quantization, cfg) != "fp8":
        side = build_on_device(lambda: FFNSide(cfg, shard), dtype, device)
        load_params(side, side.param_specs(), path, dtype, device, block)
        return side.eval()
    # fp8: layer by layer, each quantized before the next loads, so the device never holds
    # more than one layer's 16-bit experts (the whole shard in 16 bits may not fit)
    with torch.device("meta"):
        side = FFNSide(cfg, shard).to(dtype)
    specs = side.param_specs()
    for i, layer in enumerate(side.model.layers):
        layer.to_empty(device=device)
        prefix = f"model.layers.{i}."
        mine = {name: spec for name, spec in specs.items() if name.startswith(prefix)}
        experts = {f"{prefix}moe.{name}": name for name in FFNLayer.EXPERTS}
        kept = load_params(side, mine, path, dtype, device, block, keep_fp8=experts)
        layer.quantize_experts_fp8({experts[name]: scales for name, scales in kept.items()})
    return side.eval()
