"""Block-FP8 checkpoints (Step3's and DeepSeek-V3's published layout): e4m3 weights with an
fp32 `weight_scale_inv` per block. Loaded as the dequantized model, the routed experts kept in
e4m3 by default, the same numbers disaggregated, and a bad checkpoint fails at start naming
the tensor or the config field."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from afd import LLM, SamplingParams
from afd.config import ConfigError, ModelConfig
from afd.models.build import load_attention_side, load_ffn_side
from afd.models.loader import CheckpointError
from afd.models.step3 import FFNShard
from tests.conftest import (
    FP8_ACTIVATION_TOLERANCE,
    PROMPTS,
    copy_ckpt,
    edit_tensor,
    remove_tensor,
)

GREEDY = SamplingParams(max_tokens=5, temperature=0.0, logprobs=1, ignore_eos=True)
KV = dict(num_kv_blocks=128, block_size=4)


def stored(ckpt) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint, as stored."""
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    out = {}
    for file in sorted(set(index["weight_map"].values())):
        with safe_open(str(ckpt / file), "pt") as f:
            out |= {k: f.get_tensor(k) for k in f.keys()}
    return out


def dequantized(values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The weight a block-FP8 tensor stands for, from the block shape the scales imply:
    each value times its block's scale (written independently of afd's own dequantize)."""
    n, k = values.shape[-2:]
    rows, cols = -(-n // scale.shape[-2]), -(-k // scale.shape[-1])
    full = torch.kron(scale.double(), torch.ones(rows, cols, dtype=torch.float64))
    return values.double() * full[..., :n, :k]


def test_config_gives_the_block(tiny_fp8_ckpt, tiny_ckpt) -> None:
    assert ModelConfig.from_pretrained(tiny_fp8_ckpt).fp8_weight_block == (32, 32)
    assert ModelConfig.from_pretrained(tiny_ckpt).fp8_weight_block is None


def test_weights_load_as_their_dequantized_values(tiny_fp8_ckpt) -> None:
    """With --quantization none (and the attention projections 16-bit, the default) every
    projection is the dequantized weight, including the slices of blocks a 2-way FFN split
    cuts (the shared expert's 16 of 32 rows)."""
    cfg = ModelConfig.from_pretrained(tiny_fp8_ckpt)
    tensors = stored(tiny_fp8_ckpt)
    attn = load_attention_side(tiny_fp8_ckpt, cfg, torch.float32, "cpu")
    shard = FFNShard(rank=1, num_ranks=2)
    ffn = load_ffn_side(tiny_fp8_ckpt, cfg, shard, torch.float32, "cpu", "none")
    p = "model.layers.1"
    got = {
        f"{p}.self_attn.o_proj.weight": attn.model.layers[1].self_attn.o_proj.weight,
        f"{p}.self_attn.k_proj.weight": attn.model.layers[1].self_attn.k_proj.weight,
        f"{p}.share_expert.gate_proj.weight": ffn.model.layers[1].share_expert.gate_proj.weight,
        f"{p}.share_expert.down_proj.weight": ffn.model.layers[1].share_expert.down_proj.weight,
        f"{p}.moe.up_proj.weight": ffn.model.layers[1].moe.up_proj,
        "model.layers.0.mlp.down_proj.weight": ffn.model.layers[0].mlp.down_proj.weight,
    }
    owned = {  # rank 1 of 2: the second half of the intermediate widths, experts 3..5
        f"{p}.share_expert.gate_proj.weight": (slice(16, 32),),
        f"{p}.share_expert.down_proj.weight": (slice(None), slice(16, 32)),
        f"{p}.moe.up_proj.weight": (slice(3, 6),),
        "model.layers.0.mlp.down_proj.weight": (slice(None), slice(48, 96)),
    }
    for key, param in got.items():
        assert tensors[key].dtype == torch.float8_e4m3fn, key
        want = dequantized(tensors[key], tensors[key + "_scale_inv"])[owned.get(key, ())]
        assert param.dtype == torch.float32 and param.shape == want.shape, key
        torch.testing.assert_close(param.double(), want, rtol=1e-6, atol=0, msg=key)
    # what the checkpoint left in 16 bits loads as it is
    gate = tensors[f"{p}.moe.gate.weight"]
    assert gate.dtype == torch.float32
    assert torch.equal(attn.model.layers[1].moe.gate.weight, gate)


def test_experts_stay_e4m3_as_stored_by_default(tiny_fp8_ckpt) -> None:
    """Unset --quantization follows the checkpoint: the routed experts keep the stored e4m3
    bytes and block scales (no second rounding), the shared expert is dequantized, and the
    layer stays near the dequantized one (the activations go through e4m3 as well).
    --fp8-attention keeps the attention projections' stored bytes too."""
    cfg = ModelConfig.from_pretrained(tiny_fp8_ckpt)
    tensors = stored(tiny_fp8_ckpt)
    shard = FFNShard(rank=1, num_ranks=2)
    fp8 = load_ffn_side(tiny_fp8_ckpt, cfg, shard, torch.float32, "cpu")
    plain = load_ffn_side(tiny_fp8_ckpt, cfg, shard, torch.float32, "cpu", "none")
    layer = fp8.model.layers[2]
    scales = layer.expert_scales
    assert scales is not None
    for name, s in zip(("gate_proj", "up_proj", "down_proj"), scales, strict=True):
        key = f"model.layers.2.moe.{name}.weight"
        w = getattr(layer.moe, name)
        assert w.dtype == torch.float8_e4m3fn and s.block == (32, 32)
        assert torch.equal(w.view(torch.uint8), tensors[key][3:6].view(torch.uint8))
        assert torch.equal(s.scale, tensors[key + "_scale_inv"][3:6])
    assert layer.share_expert.gate_proj.weight.dtype == torch.float32
    side = load_attention_side(tiny_fp8_ckpt, cfg, torch.float32, "cpu", fp8_projections=True)
    attn = side.model.layers[2]
    for name in ("q_proj", "k_proj", "v_proj", "wq", "o_proj"):  # with --fp8-attention
        key, proj = f"model.layers.2.self_attn.{name}.weight", getattr(attn.self_attn, name)
        assert torch.equal(proj.weight.view(torch.uint8), tensors[key].view(torch.uint8))
        assert torch.equal(proj.scales.scale, tensors[key + "_scale_inv"])
    # 32-row blocks straddle k_proj's 16 rows and v_proj's: q/k/v stay three GEMMs
    assert attn.self_attn.qkv_weight is None
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, cfg.hidden_size, generator=g)
    ids = torch.randint(0, cfg.moe_num_experts, (7, cfg.moe_top_k), dtype=torch.int32, generator=g)
    weights = torch.rand(7, cfg.moe_top_k, generator=g)
    with torch.no_grad():
        want, got = plain(2, x, ids, weights), fp8(2, x, ids, weights)
    err = float((got - want).norm() / want.norm())
    assert 1e-4 < err < 0.1


@pytest.mark.slow
def test_fp8_checkpoint_serves_the_same_tokens_disaggregated(tiny_fp8_ckpt) -> None:
    """Colocated, and 1 attention + 2 FFN ranks with 2 micro-batches (each FFN rank keeps its
    experts' e4m3 blocks, the attention rank its projections'): the same greedy tokens and
    logprobs, with --fp8-attention and without."""
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    runs = {}
    for name, kw in (
        ("colocated", dict(fp8_attention=True)),
        ("disaggregated", dict(colocated=False, ffn="2x1", micro_batches=2, fp8_attention=True)),
        ("default", {}),
        ("default_disaggregated", dict(colocated=False, ffn="2x1", micro_batches=2)),
    ):
        with LLM(str(tiny_fp8_ckpt), dtype="float32", **KV, **kw) as llm:
            runs[name] = [o.outputs[0] for o in llm.generate(prompts, GREEDY)]
    for want, got in (("colocated", "disaggregated"), ("default", "default_disaggregated")):
        for w, g in zip(runs[want], runs[got], strict=True):
            assert g.token_ids == w.token_ids, got
            for a, b, t in zip(w.logprobs, g.logprobs, w.token_ids, strict=True):
                assert abs(a[t].logprob - b[t].logprob) < FP8_ACTIVATION_TOLERANCE, got
    # the attention rank did take --fp8-attention: the same layout without it (which it would
    # then be) moves the numbers
    moved = [
        abs(a[t].logprob - b[t].logprob)
        for w, g in zip(runs["default_disaggregated"], runs["disaggregated"], strict=True)
        for a, b, t in zip(w.logprobs, g.logprobs, w.token_ids, strict=False)
        if t in b
    ]
    differ = any(
        w.token_ids != g.token_ids
        for w, g in zip(runs["default_disaggregated"], runs["disaggregated"], strict=True)
    )
    assert differ or max(moved) > 1e-3


def test_missing_scale_names_the_tensor(tiny_fp8_ckpt, tmp_path) -> None:
    ckpt = copy_ckpt(tiny_fp8_ckpt, tmp_path)
    remove_tensor(ckpt, "model.layers.1.self_attn.o_proj.weight_scale_inv")
    with pytest.raises(CheckpointError, match=r"'model\.layers\.1\.self_attn\.o_proj\.weight'"):
        LLM(str(ckpt), dtype="float32", num_kv_blocks=8)


def test_wrong_scale_shape_names_the_scale(tiny_fp8_ckpt, tmp_path) -> None:
    ckpt = copy_ckpt(tiny_fp8_ckpt, tmp_path)
    key = "model.layers.2.moe.down_proj.weight_scale_inv"
    edit_tensor(ckpt, key, lambda t: t.update({key: t[key][:, :1].clone()}))
    with pytest.raises(CheckpointError) as e:
        LLM(str(ckpt), dtype="float32", num_kv_blocks=8)
    assert key in str(e.value) and "[6, 1, 1]" in str(e.value) and "[6, 2, 1]" in str(e.value)


def test_other_8_bit_formats_fail_naming_the_tensor(tiny_fp8_ckpt, tmp_path) -> None:
    """An e5m2 weight (or int8) cast as numbers would load wrong: it fails instead."""
    ckpt = copy_ckpt(tiny_fp8_ckpt, tmp_path)
    key = "model.layers.3.moe.gate_proj.weight"
    edit_tensor(ckpt, key, lambda t: t.update({key: t[key].to(torch.float8_e5m2)}))
    with pytest.raises(
        CheckpointError, match=r"'model\.layers\.3\.moe\.gate_proj\.weight'.*F8_E5M2"
    ):
        LLM(str(ckpt), dtype="float32", num_kv_blocks=8)


def test_experts_left_16_bit_take_the_stored_blocks(tiny_fp8_ckpt, tmp_path) -> None:
    """A checkpoint with one expert tensor in 16 bits: it is quantized in the others' blocks,
    so gate and up (and down) share one layout for the kernels."""
    ckpt = copy_ckpt(tiny_fp8_ckpt, tmp_path)
    key = "model.layers.2.moe.up_proj.weight"
    tensors = stored(ckpt)
    plain = dequantized(tensors[key], tensors[key + "_scale_inv"]).float()
    edit_tensor(ckpt, key, lambda t: t.update({key: plain}))
    cfg = ModelConfig.from_pretrained(ckpt)
    layer = load_ffn_side(ckpt, cfg, FFNShard(), torch.float32, "cpu").model.layers[2]
    scales = layer.expert_scales
    assert scales is not None and all(s.block == (32, 32) for s in scales)
    assert layer.moe.up_proj.dtype == torch.float8_e4m3fn


def test_e4m3_tensor_without_quantization_config(tiny_fp8_ckpt, tmp_path) -> None:
    ckpt = copy_ckpt(tiny_fp8_ckpt, tmp_path)
    config = json.loads((ckpt / "config.json").read_text())
    del config["quantization_config"]
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="float8_e4m3fn.*quantization_config"):
        LLM(str(ckpt), dtype="float32", num_kv_blocks=8)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"quant_method": "awq"}, "quant_method"),
        ({"fmt": "e5m2"}, "fmt"),
        ({"weight_block_size": None}, "weight_block_size"),
        ({"weight_block_size": [128]}, "weight_block_size"),
        ({"weight_block_size": [128, 48]}, "weight_block_size"),
    ],
)
def test_bad_quantization_config_names_the_field(tiny_fp8_ckpt, tmp_path, change, field) -> None:
    ckpt = copy_ckpt(tiny_fp8_ckpt, tmp_path)
    config = json.loads((ckpt / "config.json").read_text())
    config["quantization_config"].update(change)
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=rf"config\.json: quantization_config\.{field}"):
        LLM(str(ckpt), dtype="float32", num_kv_blocks=8)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_block_fp8_experts_in_graphs_and_eager(tiny_fp8_ckpt) -> None:
    """On a GPU the Triton kernels read the e4m3 blocks (experts, and with --fp8-attention
    the attention projections) and scale each K tile's sum: decode steps replaying CUDA
    graphs give what eager steps give, near the CPU's logprobs (which dequantize instead)."""
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    runs = {}
    for name, extra in (("cpu", {}), ("graphs", {"device": "cuda"}),
                        ("eager", {"device": "cuda", "cuda_graph_max_batch": 0})):  # fmt: skip
        with LLM(str(tiny_fp8_ckpt), dtype="float32", fp8_attention=True, **KV, **extra) as llm:
            runs[name] = [o.outputs[0] for o in llm.generate(prompts, GREEDY)]
    for g, e, c in zip(runs["graphs"], runs["eager"], runs["cpu"], strict=True):
        assert g.token_ids == e.token_ids
        first = g.token_ids[0]
        assert abs(g.logprobs[0][first].logprob - e.logprobs[0][first].logprob) < 1e-3
        # fp8 tensor cores keep short running sums: 0.20 seen on an H100 (NOTES-kernels
        # version 17, when the MoE kernels still multiplied fp32 activations in TF32)
        assert abs(g.logprobs[0][first].logprob - c.logprobs[0][first].logprob) < 0.3
