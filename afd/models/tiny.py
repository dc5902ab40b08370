"""`afd make-tiny-model`: a small random Step3 checkpoint in the real HF layout (nested
text_config, sharded safetensors with an index, stacked experts, tokenizer, chat template)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from afd.config import ModelConfig
from afd.quantization import quantize_fp8_blocks

TINY_TEXT_CONFIG: dict = {
    "hidden_size": 64,
    "num_hidden_layers": 5,
    "num_attention_heads": 4,
    "num_attention_groups": 1,
    "head_dim": 16,
    "share_q_dim": 32,
    "intermediate_size": 96,
    "moe_num_experts": 6,
    "moe_top_k": 3,
    "moe_intermediate_size": 32,
    "share_expert_dim": 32,
    "moe_layers_enum": "1,2,3",
    "norm_expert_weight": False,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "max_position_embedding": 2048,
    "torch_dtype": "float32",
}


# the widths of the tiny model, for benches that shrink a Step3-shaped config to test it on CPU
TINY_DIMS: dict = {
    k: TINY_TEXT_CONFIG[k]
    for k in (
        "hidden_size",
        "head_dim",
        "num_attention_heads",
        "share_q_dim",
        "intermediate_size",
        "moe_num_experts",
        "moe_intermediate_size",
        "share_expert_dim",
    )
}


def make_tiny_model(
    out_dir: str | Path,
    seed: int = 0,
    with_tokenizer: bool = True,
    vocab_size: int = 512,
    fp8_block: tuple[int, int] | None = None,
    **overrides: object,
) -> Path:
    """Writes the checkpoint to out_dir and returns it. Deterministic for a given seed.
    `fp8_block` (rows, columns): a block-FP8 checkpoint instead, in the layout Step3's and
    DeepSeek-V3's published ones use: every projection's weight in e4m3 with an fp32
    `weight_scale_inv` per block, `quantization_config` in config.json."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    eos: list[int] = []
    if with_tokenizer:
        from afd.models.tiny_tokenizer import write_tiny_tokenizer
        from afd.tokenizer import Tokenizer

        vocab_size = write_tiny_tokenizer(out)
        eos = Tokenizer.from_pretrained(out).eos_token_ids
    text = {**TINY_TEXT_CONFIG, **overrides, "vocab_size": vocab_size}
    if eos:
        text["eos_token_id"] = eos[0]
    config = {
        "architectures": ["Step3VLForConditionalGeneration"],
        "model_type": "step3vl",
        "torch_dtype": text["torch_dtype"],
        "image_token_id": vocab_size - 1,
        "text_config": text,
    }
    if fp8_block is not None:
        config["quantization_config"] = {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            "weight_block_size": list(fp8_block),
        }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}, indent=2))
    cfg = ModelConfig.from_pretrained(out)
    weights = random_weights(cfg, seed)
    _write_weights(out, weights if fp8_block is None else quantize_blocks(weights, fp8_block))
    return out


def quantize_blocks(tensors: dict[str, torch.Tensor], block: tuple[int, int]) -> dict:
    """The projections' weights (`*_proj.weight`, `wq.weight`; not the embedding, the head,
    the norms or the router) as e4m3 values and `weight_scale_inv` block scales."""
    out: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        if key.endswith(("_proj.weight", ".wq.weight")):
            quant, scales = quantize_fp8_blocks(t, block)
            out[key], out[key + "_scale_inv"] = quant, scales.scale
        else:
            out[key] = t
    return out


def random_weights(cfg: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    """Weights scaled so activations stay O(1) and logits are peaked (clear greedy choices)."""
    g = torch.Generator().manual_seed(seed)
    h, d, hq = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads

    def w(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * (scale / math.sqrt(shape[-1]))

    def norm(dim: int) -> torch.Tensor:
        return 1.0 + 0.1 * torch.randn(dim, generator=g)

    t = {"model.embed_tokens.weight": torch.randn(cfg.vocab_size, h, generator=g)}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}"
        t |= {
            f"{p}.input_layernorm.weight": norm(h),
            f"{p}.post_attention_layernorm.weight": norm(h),
            f"{p}.self_attn.q_proj.weight": w(cfg.share_q_dim, h),
            f"{p}.self_attn.k_proj.weight": w(d, h, scale=2.0),
            f"{p}.self_attn.v_proj.weight": w(d, h),
            f"{p}.self_attn.inter_norm.weight": norm(cfg.share_q_dim),
            f"{p}.self_attn.wq.weight": w(hq * d, cfg.share_q_dim, scale=2.0),
            f"{p}.self_attn.o_proj.weight": w(h, hq * d),
        }
        t |= _ffn_weights(cfg, i, w)
    t["model.norm.weight"] = norm(h)
    t["lm_head.weight"] = w(cfg.vocab_size, h, scale=3.0)
    return {k: v.contiguous() for k, v in t.items()}


def _ffn_weights(cfg: ModelConfig, i: int, w) -> dict[str, torch.Tensor]:
    h, p = cfg.hidden_size, f"model.layers.{i}"
    if not cfg.is_moe_layer(i):
        inter = cfg.intermediate_size
        return {
            f"{p}.mlp.gate_proj.weight": w(inter, h),
            f"{p}.mlp.up_proj.weight": w(inter, h),
            f"{p}.mlp.down_proj.weight": w(h, inter),
        }
    e, inter, s = cfg.moe_num_experts, cfg.moe_intermediate_size, cfg.share_expert_dim
    return {
        f"{p}.moe.gate.weight": w(e, h, scale=3.0),
        f"{p}.moe.gate_proj.weight": w(e, inter, h),
        f"{p}.moe.up_proj.weight": w(e, inter, h),
        f"{p}.moe.down_proj.weight": w(e, h, inter),
        f"{p}.share_expert.gate_proj.weight": w(s, h),
        f"{p}.share_expert.up_proj.weight": w(s, h),
        f"{p}.share_expert.down_proj.weight": w(h, s),
    }


def _write_weights(out: Path, tensors: dict[str, torch.Tensor], num_shards: int = 2) -> None:
    """Splits the tensors over shards in key order and writes the HF index."""
    keys = sorted(tensors)
    per_shard = math.ceil(len(keys) / num_shards)
    weight_map: dict[str, str] = {}
    for s in range(num_shards):
        name = f"model-{s + 1:05d}-of-{num_shards:05d}.safetensors"
        part = {k: tensors[k] for k in keys[s * per_shard : (s + 1) * per_shard]}
        save_file(part, str(out / name), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(part, name)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
