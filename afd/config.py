"""Typed configuration: the model (parsed from an HF config.json) and the deployment shape."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A user-supplied config (file or flag) is missing something or is inconsistent."""


@dataclass(frozen=True)
class ModelConfig:
    """Step3 text-model configuration (STEP3.md). Field names follow the HF config."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_attention_groups: int
    head_dim: int
    share_q_dim: int
    intermediate_size: int
    moe_num_experts: int
    moe_top_k: int
    moe_intermediate_size: int
    share_expert_dim: int
    moe_layers: tuple[int, ...]
    norm_expert_weight: bool
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    torch_dtype: str = "bfloat16"
    eos_token_ids: tuple[int, ...] = ()
    # a block-FP8 checkpoint (quantization_config): e4m3 weights with an fp32 scale per block
    # of (rows, columns), read from the tensor beside each weight (afd/models/loader.py)
    fp8_weight_block: tuple[int, int] | None = None
    source: str = "<memory>"

    def is_moe_layer(self, layer: int) -> bool:
        return layer in self._moe_set

    @property
    def _moe_set(self) -> frozenset[int]:
        return frozenset(self.moe_layers)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "<memory>") -> ModelConfig:
        return _parse(raw, source)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        file = path / "config.json" if path.is_dir() else path
        if not file.exists():
            raise ConfigError(f"{file}: no config.json found (expected an HF checkpoint folder)")
        try:
            raw = json.loads(file.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{file}: not valid JSON ({e})") from e
        return _parse(raw, str(file))


_REQUIRED_INT = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "head_dim",
    "share_q_dim",
    "intermediate_size",
    "moe_num_experts",
    "moe_top_k",
    "moe_intermediate_size",
    "share_expert_dim",
    "vocab_size",
)


def _parse(raw: dict[str, Any], source: str) -> ModelConfig:
    text = dict(raw.get("text_config") or {})
    for k, v in raw.items():  # top-level fields fill what text_config lacks
        if k != "text_config":
            text.setdefault(k, v)

    def need(name: str) -> Any:
        if name not in text or text[name] is None:
            raise ConfigError(f"{source}: missing required field '{name}'")
        return text[name]

    ints = {}
    for name in _REQUIRED_INT:
        value = need(name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"{source}: field '{name}' must be a positive integer, got {value!r}")
        ints[name] = value
    groups = text.get("num_attention_groups", 1)
    if groups != 1:
        raise ConfigError(
            f"{source}: field 'num_attention_groups' is {groups}; Step3 MFA needs exactly 1 KV head"
        )
    if ints["moe_top_k"] > ints["moe_num_experts"]:
        raise ConfigError(
            f"{source}: field 'moe_top_k' ({ints['moe_top_k']}) exceeds "
            f"'moe_num_experts' ({ints['moe_num_experts']})"
        )
    n_layers = ints["num_hidden_layers"]
    moe_layers = _parse_moe_layers(text.get("moe_layers_enum"), n_layers, source)
    max_pos = text.get("max_position_embedding", text.get("max_position_embeddings"))
    if max_pos is None:
        raise ConfigError(f"{source}: missing required field 'max_position_embedding'")
    eos = text.get("eos_token_id", raw.get("eos_token_id"))
    eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if isinstance(eos, int) else ())
    return ModelConfig(
        **ints,
        num_attention_groups=1,
        moe_layers=moe_layers,
        norm_expert_weight=bool(text.get("norm_expert_weight", False)),
        rms_norm_eps=float(text.get("rms_norm_eps", 1e-5)),
        rope_theta=float(text.get("rope_theta", 500000.0)),
        max_position_embeddings=int(max_pos),
        torch_dtype=str(text.get("torch_dtype") or "bfloat16"),
        eos_token_ids=eos_ids,
        fp8_weight_block=_parse_quantization(text.get("quantization_config"), source),
        source=source,
    )


def _parse_quantization(value: Any, source: str) -> tuple[int, int] | None:
    """quantization_config as Hugging Face writes a block-FP8 checkpoint (DeepSeek-V3's and
    Step3's layout): quant_method fp8, fmt e4m3, weight_block_size [rows, columns]. Returns the
    block, or None for a 16-bit checkpoint."""
    if value is None:
        return None
    where = f"{source}: quantization_config"
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be an object, got {value!r}")
    method = value.get("quant_method")
    if method != "fp8":
        raise ConfigError(
            f"{where}.quant_method is {method!r}; afd reads block-FP8 checkpoints ('fp8') only"
        )
    if value.get("fmt", "e4m3") != "e4m3":
        raise ConfigError(f"{where}.fmt is {value['fmt']!r}; only e4m3 is supported")
    block = value.get("weight_block_size")
    if (
        not isinstance(block, list)
        or len(block) != 2
        or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)
    ):
        raise ConfigError(
            f"{where}.weight_block_size must be two positive integers [rows, columns], got "
            f"{block!r} (per-tensor FP8 checkpoints are not supported)"
        )
    if block[1] % 32:  # a kernel's K tile must sit in one block: e4m3 tiles take K >= 32
        raise ConfigError(f"{where}.weight_block_size: {block[1]} columns is not a multiple of 32")
    return (block[0], block[1])


def _parse_moe_layers(value: Any, n_layers: int, source: str) -> tuple[int, ...]:
    if value is None:
        return tuple(range(1, n_layers))
    try:
        if isinstance(value, str):
            layers = tuple(int(x) for x in value.split(",") if x.strip())
        else:
            layers = tuple(int(x) for x in value)
    except (TypeError, ValueError) as e:
        raise ConfigError(
            f"{source}: field 'moe_layers_enum' must be a comma-separated string of layer "
            f"indices, got {value!r}"
        ) from e
    bad = [i for i in layers if not 0 <= i < n_layers]
    if bad:
        raise ConfigError(
            f"{source}: field 'moe_layers_enum' names layers {bad} outside 0..{n_layers - 1}"
        )
    return layers


@dataclass(frozen=True)
class RoleShape:
    """`NxG`: N instances of G devices each (N*G ranks of one role)."""

    num_instances: int
    devices_per_instance: int

    @property
    def num_ranks(self) -> int:
        return self.num_instances * self.devices_per_instance

    @classmethod
    def parse(cls, text: str, flag: str = "--attn") -> RoleShape:
        parts = str(text).lower().split("x")
        if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ConfigError(
                f"{flag}: expected NxG with positive integers (e.g. 2x8), got {text!r}"
            )
        return cls(int(parts[0]), int(parts[1]))

    def __str__(self) -> str:
        return f"{self.num_instances}x{self.devices_per_instance}"
