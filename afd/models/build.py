"""Builds each role's half of the model from a checkpoint: attention side or one FFN shard."""

from __future__ import annotations

from pathlib import Path

import torch

from afd.config import ConfigError, ModelConfig
from afd.models.loader import build_on_device, load_params
from afd.models.step3 import AttentionSide, FFNShard, FFNSide, fuse_attention_projections
from afd.quantization import check_quantization

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
    path: str | Path, cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str
) -> AttentionSide:
    side = build_on_device(lambda: AttentionSide(cfg), dtype, device)
    load_params(side, side.param_specs(), path, dtype, device)
    return fuse_attention_projections(side).eval()


def load_ffn_side(
    path: str | Path,
    cfg: ModelConfig,
    shard: FFNShard,
    dtype: torch.dtype,
    device: torch.device | str,
    quantization: str = "none",
) -> FFNSide:
    side = build_on_device(lambda: FFNSide(cfg, shard), dtype, device)
    load_params(side, side.param_specs(), path, dtype, device)
    if check_quantization(quantization) == "fp8":
        for layer in side.model.layers:
            layer.quantize_experts_fp8()
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()  # the 16-bit copies
    return side.eval()
