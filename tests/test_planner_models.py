"""afd-plan model shapes: per-token figures derived by hand for each preset and HF config."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from afd.config import ConfigError
from afd.planner.cli import main
from afd.planner.cost import token_cost
from afd.planner.models import PRESET_CONFIGS, load_model


def test_step3_by_hand() -> None:
    s = load_model("step3")
    # MFA: 1 KV head x (256 key + 256 value) elements, 1 byte each at 8-bit KV = 512 B
    assert s.kv_elems == 1 * (256 + 256) == 512
    assert s.attn_flops_per_ctx_layer == 2 * 64 * (256 + 256) == 65_536
    # q_proj 7168->2048, k_proj and v_proj 7168->256, wq 2048->64*256, o_proj 64*256->7168
    linear = 7168 * 2048 + 2 * 7168 * 256 + 2048 * 64 * 256 + 64 * 256 * 7168
    assert s.attn_linear_params == linear == 169_345_024  # "169.3M per layer" (STEP3.md)
    assert (s.num_dense_layers, s.num_moe_layers) == (5, 56)  # layers 0-3 and 60 are dense
    tc = token_cost(s, 4096)
    assert tc.kv_bytes == 512 * 61 * 4096  # 31,232 B per context token (STEP3.md)
    assert tc.attn_flops == 65_536 * 61 * 4096
    assert tc.linear_flops == 2 * linear * 61
    dense = 2 * 3 * 7168 * 18432  # SwiGLU: gate, up, down
    moe = 2 * (3 + 1) * 3 * 7168 * 5120  # top-3 routed + 1 shared, 5120 each
    assert tc.ffn_flops == 5 * dense + 56 * moe


def test_deepseek_v3_by_hand() -> None:
    s = load_model("deepseek-v3")
    assert s.kv_elems == 512 + 64  # MLA latent + rope key
    # absorbed MLA: each of 128 heads attends over the 576-wide latent for qk and for v
    assert s.attn_flops_per_ctx_layer == 2 * 128 * (576 + 576)
    q = 7168 * 1536 + 1536 * 128 * (128 + 64)
    kv = 7168 * (512 + 64) + 512 * 128 * (128 + 128)
    o = 128 * 128 * 7168
    assert s.attn_linear_params == q + kv + o == 187_105_280
    tc = token_cost(s, 4096)
    assert tc.kv_bytes == 576 * 61 * 4096
    assert tc.linear_flops == 2 * (q + kv + o) * 61
    dense = 2 * 3 * 7168 * 18432
    moe = 2 * (8 + 1) * 3 * 7168 * 2048  # top-8 routed + 1 shared of 2048
    assert tc.ffn_flops == 3 * dense + 58 * moe


def test_qwen3_235b_by_hand() -> None:
    s = load_model("qwen3-235b-a22b")
    assert s.kv_elems == 4 * (128 + 128)  # 4 KV heads = 1024 B per token per layer at 8-bit
    assert s.attn_flops_per_ctx_layer == 2 * 64 * (128 + 128)
    linear = 4096 * 64 * 128 + 2 * 4096 * 4 * 128 + 64 * 128 * 4096
    assert s.attn_linear_params == linear
    tc = token_cost(s, 8192)
    assert tc.kv_bytes == 1024 * 94 * 8192
    assert tc.attn_flops == 2 * 64 * 256 * 94 * 8192
    assert tc.ffn_flops == 94 * 2 * 8 * 3 * 4096 * 1536  # no shared expert, no dense layer


def _write(tmp_path: Path, raw: dict, folder: bool = False) -> str:
    target = tmp_path / "ckpt" if folder else tmp_path
    target.mkdir(exist_ok=True)
    (target / "config.json").write_text(json.dumps(raw))
    return str(target if folder else target / "config.json")


@pytest.mark.parametrize("name", list(PRESET_CONFIGS))
@pytest.mark.parametrize("folder", [False, True])
def test_hf_config_gives_the_preset(tmp_path: Path, name: str, folder: bool) -> None:
    raw = copy.deepcopy(PRESET_CONFIGS[name])
    raw["architectures"] = ["SomethingForCausalLM"]  # unrelated fields are ignored
    from_file = load_model(_write(tmp_path, raw, folder))
    preset = load_model(name)
    assert from_file.name != preset.name
    assert {**vars(from_file), "name": ""} == {**vars(preset), "name": ""}


def test_step3_fields_at_top_level_and_default_moe_layers(tmp_path: Path) -> None:
    raw = dict(PRESET_CONFIGS["step3"]["text_config"])
    del raw["moe_layers_enum"]  # absent: every layer but 0 is MoE (STEP3.md)
    s = load_model(_write(tmp_path, raw))
    assert (s.num_dense_layers, s.num_moe_layers) == (1, 60)


def test_qwen3_dense_layers_and_sparse_step(tmp_path: Path) -> None:
    raw = dict(PRESET_CONFIGS["qwen3-235b-a22b"], num_hidden_layers=8, mlp_only_layers=[1])
    raw["decoder_sparse_step"] = 2  # MoE where (i + 1) % 2 == 0: layers 1, 3, 5, 7; 1 is dense
    s = load_model(_write(tmp_path, raw))
    assert (s.num_moe_layers, s.num_dense_layers) == (3, 5)
    assert s.dense_ffn_params == 3 * 4096 * 12288


def test_deepseek_without_q_lora(tmp_path: Path) -> None:
    raw = dict(PRESET_CONFIGS["deepseek-v3"], q_lora_rank=None)
    s = load_model(_write(tmp_path, raw))
    q = 7168 * 128 * (128 + 64)  # direct q_proj
    assert s.attn_linear_params == q + 7168 * 576 + 512 * 128 * 256 + 128 * 128 * 7168


def test_unknown_model_and_bad_configs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(ConfigError, match="unknown model 'llama-9'"):
        load_model("llama-9")
    path = _write(tmp_path, {"model_type": "llama", "hidden_size": 4096})
    with pytest.raises(ConfigError, match="'llama' is not a supported family"):
        load_model(path)
    raw = dict(PRESET_CONFIGS["deepseek-v3"])
    del raw["kv_lora_rank"]
    path = _write(tmp_path, raw)
    assert main(["cost", "--model", path, "--context", "4096"]) == 2
    err = capsys.readouterr().err
    assert "config.json" in err and "'kv_lora_rank'" in err and "Traceback" not in err
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_model(str(tmp_path))


@pytest.mark.parametrize(
    ("preset", "field", "value", "message"),
    [
        ("deepseek-v3", "n_routed_experts", 0, "'n_routed_experts' must be an integer >= 1"),
        ("deepseek-v3", "num_hidden_layers", 0, "'num_hidden_layers' must be an integer >= 1"),
        ("qwen3-235b-a22b", "num_experts", 0, "'num_experts' must be an integer >= 1"),
        ("qwen3-235b-a22b", "decoder_sparse_step", 0, "'decoder_sparse_step' must be an"),
        ("qwen3-235b-a22b", "num_experts_per_tok", 200, "more than the 128 experts"),
    ],
)
def test_counts_that_would_divide_by_zero_name_their_field(
    tmp_path: Path, capsys: pytest.CaptureFixture, preset: str, field: str, value: int, message: str
) -> None:
    path = _write(tmp_path, {**PRESET_CONFIGS[preset], field: value})
    argv = ["deploy", "--model", path, "--context", "4096", "--tpot-ms", "50"]
    assert main([*argv, "--attn", "1x8", "--ffn", "1x8"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
