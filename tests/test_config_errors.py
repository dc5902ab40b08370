"""Config and checkpoint errors name the culprit: the file, the field or the tensor."""

from __future__ import annotations

import json
import shutil

import pytest

from afd import LLM, SamplingParams
from afd.config import ConfigError, ModelConfig, RoleShape
from afd.models.loader import CheckpointError, checkpoint_files
from tests.conftest import copy_ckpt, edit_tensor, remove_tensor


def write_config(tmp_path, **changes):
    base = json.loads((tmp_path.parent / "base_config.json").read_text())
    base["text_config"].update(changes)
    for k, v in list(base["text_config"].items()):
        if v is None:
            del base["text_config"][k]
    (tmp_path / "config.json").write_text(json.dumps(base))
    return tmp_path


@pytest.fixture
def cfg_dir(tmp_path, tiny_ckpt):
    shutil.copy(tiny_ckpt / "config.json", tmp_path / "base_config.json")
    d = tmp_path / "ckpt"
    d.mkdir()
    return d


def test_text_config_nested_or_top_level(tiny_ckpt):
    nested = json.loads((tiny_ckpt / "config.json").read_text())
    flat = {**nested["text_config"], "max_position_embeddings": 99}
    flat.pop("max_position_embedding")
    a, b = ModelConfig.from_dict(nested), ModelConfig.from_dict(flat)
    assert a.hidden_size == b.hidden_size and b.max_position_embeddings == 99
    assert a.moe_layers == (1, 2, 3)
    assert ModelConfig.from_dict({**flat, "moe_layers_enum": None}).moe_layers == (1, 2, 3, 4)


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"hidden_size": None}, "'hidden_size'"),
        ({"num_attention_groups": 4}, "'num_attention_groups'"),
        ({"moe_layers_enum": "1,x"}, "'moe_layers_enum'"),
        ({"moe_layers_enum": "1,9"}, "'moe_layers_enum'"),
        ({"moe_top_k": 9}, "'moe_top_k'"),
        ({"head_dim": -1}, "'head_dim'"),
        ({"max_position_embedding": None}, "'max_position_embedding'"),
    ],
)
def test_bad_config_names_field_and_file(cfg_dir, change, needle):
    write_config(cfg_dir, **change)
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_pretrained(cfg_dir)
    assert needle in str(e.value) and "config.json" in str(e.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config.json"):
        ModelConfig.from_pretrained(tmp_path)


def test_role_shape_flag():
    assert RoleShape.parse("2x8").num_ranks == 16
    with pytest.raises(ConfigError, match="--ffn"):
        RoleShape.parse("2by8", "--ffn")


def test_missing_tensor_names_key(tiny_ckpt, tmp_path):
    ckpt = copy_ckpt(tiny_ckpt, tmp_path)
    remove_tensor(ckpt, "model.layers.2.moe.up_proj.weight")
    with pytest.raises(CheckpointError, match=r"missing tensor 'model\.layers\.2\.moe\.up_proj"):
        LLM(str(ckpt), dtype="float32", num_kv_blocks=8)


def test_wrong_shape_names_key_and_shapes(tiny_ckpt, tmp_path):
    ckpt = copy_ckpt(tiny_ckpt, tmp_path)
    key = "model.layers.0.self_attn.k_proj.weight"
    edit_tensor(ckpt, key, lambda t: t.update({key: t[key][:8].clone()}))
    with pytest.raises(CheckpointError) as e:
        LLM(str(ckpt), dtype="float32", num_kv_blocks=8)
    msg = str(e.value)
    assert key in msg and "[8, 64]" in msg and "[16, 64]" in msg


def test_index_naming_a_missing_shard(tiny_ckpt, tmp_path):
    ckpt = copy_ckpt(tiny_ckpt, tmp_path)
    (ckpt / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002"):
        LLM(str(ckpt), dtype="float32", num_kv_blocks=8)


def test_truncated_shard_names_the_file(tiny_ckpt, tmp_path):
    ckpt = copy_ckpt(tiny_ckpt, tmp_path)
    shard = ckpt / "model-00001-of-00002.safetensors"
    with open(shard, "r+b") as f:  # an interrupted copy
        f.truncate(shard.stat().st_size // 2)
    with pytest.raises(CheckpointError) as e:
        LLM(str(ckpt), dtype="float32", num_kv_blocks=8)
    assert str(e.value).startswith(f"{shard}: cannot read it as safetensors")


def test_key_missing_from_the_shard_its_index_names(tiny_ckpt, tmp_path):
    ckpt = copy_ckpt(tiny_ckpt, tmp_path)
    key = "model.layers.2.moe.up_proj.weight"
    edit_tensor(ckpt, key, lambda t: t.pop(key))  # the index still maps it there
    with pytest.raises(CheckpointError) as e:
        LLM(str(ckpt), dtype="float32", num_kv_blocks=8)
    assert f"has no tensor '{key}', though model.safetensors.index.json maps it" in str(e.value)
    assert "-of-00002.safetensors" in str(e.value)


def test_vision_tensors_are_skipped(tiny_ckpt, tmp_path):
    ckpt = copy_ckpt(tiny_ckpt, tmp_path)
    key = "model.norm.weight"
    edit_tensor(ckpt, key, lambda t: t.update({"vision_model.patch.weight": t[key].clone()}))
    assert "vision_model.patch.weight" not in checkpoint_files(ckpt)
    llm = LLM(str(ckpt), dtype="float32", num_kv_blocks=8)
    out = llm.generate({"prompt_token_ids": [5, 6, 7]}, SamplingParams(max_tokens=2))
    assert len(out[0].outputs[0].token_ids) == 2


def test_bad_dtype_flag(tiny_ckpt):
    with pytest.raises(ConfigError, match="--dtype"):
        LLM(str(tiny_ckpt), dtype="float8", num_kv_blocks=8)
