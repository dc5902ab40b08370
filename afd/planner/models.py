"""Model shapes for the planner: presets or an HF config.json (Step3, DeepSeek-V3, Qwen3-MoE)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from afd.config import ConfigError, ModelConfig


@dataclass(frozen=True)
class ModelSpec:
    """Per-layer counts in parameters and cached elements; bytes come from hardware and dtype."""

    name: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    num_q_heads: int
    kv_elems: int  # cached KV elements per token per layer
    qk_dim: int  # per query head, as attended (MLA: absorbed latent + rope)
    v_dim: int
    attn_linear_params: int  # every projection around attention, per layer
    num_dense_layers: int
    dense_ffn_params: int  # per dense layer
    num_moe_layers: int
    num_experts: int
    top_k: int
    expert_params: int  # per routed expert
    shared_params: int  # all shared experts of one MoE layer

    @property
    def attn_flops_per_ctx_layer(self) -> int:
        return 2 * self.num_q_heads * (self.qk_dim + self.v_dim)

    @property
    def moe_active_params(self) -> int:
        return self.top_k * self.expert_params + self.shared_params

    @property
    def moe_layer_params(self) -> int:
        router = self.num_experts * self.hidden_size
        return self.num_experts * self.expert_params + self.shared_params + router

    @property
    def ffn_total_params(self) -> int:
        moe = self.num_moe_layers * self.moe_layer_params
        return self.num_dense_layers * self.dense_ffn_params + moe

    @property
    def embedding_params(self) -> int:
        """Embedding plus untied LM head; both live on the attention side."""
        return 2 * self.vocab_size * self.hidden_size


PRESET_CONFIGS: dict[str, dict[str, Any]] = {
    "step3": {
        "model_type": "step3_vl",
        "text_config": {
            "model_type": "step3_text",
            "hidden_size": 7168,
            "num_hidden_layers": 61,
            "num_attention_heads": 64,
            "num_attention_groups": 1,
            "head_dim": 256,
            "share_q_dim": 2048,
            "intermediate_size": 18432,
            "moe_num_experts": 48,
            "moe_top_k": 3,
            "moe_intermediate_size": 5120,
            "share_expert_dim": 5120,
            "moe_layers_enum": ",".join(str(i) for i in range(4, 60)),
            "vocab_size": 128815,
            "max_position_embedding": 65536,
        },
    },
    "deepseek-v3": {
        "model_type": "deepseek_v3",
        "hidden_size": 7168,
        "num_hidden_layers": 61,
        "num_attention_heads": 128,
        "q_lora_rank": 1536,
        "kv_lora_rank": 512,
        "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64,
        "v_head_dim": 128,
        "intermediate_size": 18432,
        "moe_intermediate_size": 2048,
        "n_routed_experts": 256,
        "num_experts_per_tok": 8,
        "n_shared_experts": 1,
        "first_k_dense_replace": 3,
        "moe_layer_freq": 1,
        "vocab_size": 129280,
    },
    "qwen3-235b-a22b": {
        "model_type": "qwen3_moe",
        "hidden_size": 4096,
        "num_hidden_layers": 94,
        "num_attention_heads": 64,
        "num_key_value_heads": 4,
        "head_dim": 128,
        "intermediate_size": 12288,
        "moe_intermediate_size": 1536,
        "num_experts": 128,
        "num_experts_per_tok": 8,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "vocab_size": 151936,
    },
}


def load_model(name_or_path: str) -> ModelSpec:
    """A preset name (case-insensitive) or a path to an HF checkpoint folder / config.json."""
    key = name_or_path.lower()
    if key in PRESET_CONFIGS:
        return spec_from_config(PRESET_CONFIGS[key], key)
    path = Path(name_or_path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise ConfigError(
            f"unknown model {name_or_path!r}: expected a preset ({', '.join(PRESET_CONFIGS)}) "
            f"or a path to an HF checkpoint folder or config.json"
        )
    try:
        raw = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{file}: not valid JSON ({e})") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{file}: expected a JSON object")
    return spec_from_config(raw, str(file))


def spec_from_config(raw: dict[str, Any], source: str) -> ModelSpec:
    text = raw.get("text_config") or {}
    model_type = str(raw.get("model_type") or text.get("model_type") or "")
    if model_type.startswith("step3") or "share_q_dim" in text or "share_q_dim" in raw:
        return _step3(raw, source)
    if model_type == "deepseek_v3":
        return _deepseek_v3(raw, source)
    if model_type == "qwen3_moe":
        return _qwen3_moe(raw, source)
    raise ConfigError(
        f"{source}: model_type {model_type!r} is not a supported family "
        f"(step3, deepseek_v3, qwen3_moe)"
    )


def _step3(raw: dict[str, Any], source: str) -> ModelSpec:
    cfg = ModelConfig.from_dict(raw, source)
    h, d, heads, groups = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, 1
    # q_proj (low rank), k_proj, v_proj, wq (up to all heads), o_proj
    linear = h * cfg.share_q_dim + 2 * h * d * groups + cfg.share_q_dim * heads * d
    linear += heads * d * h
    num_moe = len(cfg.moe_layers)
    return ModelSpec(
        name=_name(source, "step3"),
        num_layers=cfg.num_hidden_layers,
        hidden_size=h,
        vocab_size=cfg.vocab_size,
        num_q_heads=heads,
        kv_elems=groups * 2 * d,
        qk_dim=d,
        v_dim=d,
        attn_linear_params=linear,
        num_dense_layers=cfg.num_hidden_layers - num_moe,
        dense_ffn_params=3 * h * cfg.intermediate_size,
        num_moe_layers=num_moe,
        num_experts=cfg.moe_num_experts,
        top_k=cfg.moe_top_k,
        expert_params=3 * h * cfg.moe_intermediate_size,
        shared_params=3 * h * cfg.share_expert_dim,
    )


def _deepseek_v3(raw: dict[str, Any], source: str) -> ModelSpec:
    g = _Fields(raw, source)
    h, heads, layers = (
        g.num("hidden_size"),
        g.num("num_attention_heads"),
        g.num("num_hidden_layers"),
    )
    nope, v = g.num("qk_nope_head_dim"), g.num("v_head_dim")
    rope = g.num("qk_rope_head_dim", least=0)
    kv_lora, q_lora = g.num("kv_lora_rank"), g.optional("q_lora_rank")
    q = h * heads * (nope + rope) if q_lora is None else h * q_lora + q_lora * heads * (nope + rope)
    # kv_a (latent + rope key), kv_b (latent -> per-head key and value), o_proj
    linear = q + h * (kv_lora + rope) + kv_lora * heads * (nope + v) + heads * v * h
    first_dense, freq = g.num("first_k_dense_replace", 0, least=0), g.num("moe_layer_freq", 1)
    num_moe = sum(1 for i in range(layers) if i >= first_dense and i % freq == 0)
    expert = 3 * h * g.num("moe_intermediate_size")
    return ModelSpec(
        name=_name(source, "deepseek-v3"),
        num_layers=layers,
        hidden_size=h,
        vocab_size=g.num("vocab_size"),
        num_q_heads=heads,
        kv_elems=kv_lora + rope,
        qk_dim=kv_lora + rope,  # absorbed MLA: every head attends over the latent
        v_dim=kv_lora + rope,
        attn_linear_params=linear,
        num_dense_layers=layers - num_moe,
        dense_ffn_params=3 * h * g.num("intermediate_size", least=0),
        num_moe_layers=num_moe,
        num_experts=g.num("n_routed_experts"),
        top_k=g.top_k(g.num("n_routed_experts")),
        expert_params=expert,
        shared_params=g.num("n_shared_experts", 0, least=0) * expert,
    )


def _qwen3_moe(raw: dict[str, Any], source: str) -> ModelSpec:
    g = _Fields(raw, source)
    h, heads, layers = (
        g.num("hidden_size"),
        g.num("num_attention_heads"),
        g.num("num_hidden_layers"),
    )
    kv_heads, d = g.num("num_key_value_heads"), g.num("head_dim", h // heads)
    step = g.num("decoder_sparse_step", 1)
    dense_only = set(raw.get("mlp_only_layers") or [])
    num_moe = sum(1 for i in range(layers) if i not in dense_only and (i + 1) % step == 0)
    return ModelSpec(
        name=_name(source, "qwen3-moe"),
        num_layers=layers,
        hidden_size=h,
        vocab_size=g.num("vocab_size"),
        num_q_heads=heads,
        kv_elems=kv_heads * 2 * d,
        qk_dim=d,
        v_dim=d,
        attn_linear_params=h * heads * d + 2 * h * kv_heads * d + heads * d * h,
        num_dense_layers=layers - num_moe,
        dense_ffn_params=3 * h * g.num("intermediate_size", least=0),
        num_moe_layers=num_moe,
        num_experts=g.num("num_experts"),
        top_k=g.top_k(g.num("num_experts")),
        expert_params=3 * h * g.num("moe_intermediate_size"),
        shared_params=0,
    )


class _Fields:
    """Reads integer fields of one config, naming the file and field on error. Sizes and counts
    must be at least 1 (a 0 divides by zero further on); the fields that may be 0 say so."""

    def __init__(self, raw: dict[str, Any], source: str) -> None:
        self.raw, self.source = raw, source

    def num(self, name: str, default: int | None = None, least: int = 1) -> int:
        value = self.optional(name, least)
        if value is not None:
            return value
        if default is None:
            raise ConfigError(f"{self.source}: missing required field '{name}'")
        return default

    def optional(self, name: str, least: int = 1) -> int | None:
        value = self.raw.get(name)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < least
        ):
            raise ConfigError(
                f"{self.source}: field '{name}' must be an integer >= {least}, got {value!r}"
            )
        return value

    def top_k(self, experts: int) -> int:
        k = self.num("num_experts_per_tok")
        if k > experts:
            raise ConfigError(
                f"{self.source}: field 'num_experts_per_tok' is {k}, more than the {experts} "
                "experts"
            )
        return k


def _name(source: str, family: str) -> str:
    return source if source in PRESET_CONFIGS else f"{family}:{source}"
