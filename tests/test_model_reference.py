"""Colocated generation against an independent float64 implementation of STEP3.md."""

from __future__ import annotations

import json

import pytest
import torch

from afd import LLM, SamplingParams
from tests.conftest import PROMPTS
from tests.reference_step3 import ReferenceStep3

MAX_TOKENS = 6


@pytest.fixture(scope="module")
def reference(tiny_ckpt):
    ref = ReferenceStep3(tiny_ckpt)
    return [ref.greedy(p, MAX_TOKENS) for p in PROMPTS]


@pytest.fixture(scope="module")
def llm(tiny_ckpt):
    return LLM(str(tiny_ckpt), dtype="float32", num_kv_blocks=128, block_size=4)


def greedy(max_tokens: int = MAX_TOKENS) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=1, ignore_eos=True)


def run(llm: LLM, prompts: list[list[int]]):
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy())
    tokens = [o.outputs[0].token_ids for o in outs]
    lps = [
        [lp[t].logprob for lp, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids, strict=True)]
        for o in outs
    ]
    return tokens, lps


def test_checkpoint_has_the_real_layout(tiny_ckpt):
    cfg = json.loads((tiny_ckpt / "config.json").read_text())
    text = cfg["text_config"]
    index = json.loads((tiny_ckpt / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 2
    moe = [int(x) for x in text["moe_layers_enum"].split(",")]
    dense = [i for i in range(text["num_hidden_layers"]) if i not in moe]
    assert len(moe) >= 2 and len(dense) >= 2
    assert text["moe_top_k"] == 3 and text["moe_num_experts"] >= 6
    assert "model.layers.1.moe.gate_proj.weight" in index["weight_map"]


def test_colocated_matches_float64_reference(llm, reference):
    tokens, lps = run(llm, PROMPTS)
    for (ref_tokens, ref_lps), got, got_lps in zip(reference, tokens, lps, strict=True):
        assert got == ref_tokens
        assert torch.allclose(
            torch.tensor(got_lps, dtype=torch.float64),
            torch.tensor(ref_lps, dtype=torch.float64),
            atol=1e-4,
            rtol=0,
        )


def test_batch_invariance(llm):
    batched, batched_lps = run(llm, PROMPTS)
    for i, prompt in enumerate(PROMPTS):
        alone, alone_lps = run(llm, [prompt])
        assert alone[0] == batched[i]
        assert max(abs(a - b) for a, b in zip(alone_lps[0], batched_lps[i], strict=True)) < 1e-4


def test_chunked_prefill_leaves_results_unchanged(tiny_ckpt, reference):
    small = LLM(
        str(tiny_ckpt), dtype="float32", num_kv_blocks=128, block_size=4, max_num_batched_tokens=7
    )  # below the longest prompt (40 tokens)
    tokens, _ = run(small, PROMPTS)
    assert tokens == [r[0] for r in reference]


def test_tiny_kv_pool_completes_every_request(tiny_ckpt, reference):
    # 40-token prompt + 6 new = 12 blocks of 4; 14 blocks cannot hold all four sequences
    tight = LLM(str(tiny_ckpt), dtype="float32", num_kv_blocks=14, block_size=4)
    tokens, _ = run(tight, PROMPTS)
    assert tokens == [r[0] for r in reference]
    assert tight.engine.scheduler.blocks[0].num_free_blocks == 14
    needed = sum(-(-(len(p) + MAX_TOKENS) // 4) for p in PROMPTS)
    assert needed > 14  # the pool really cannot hold every sequence at once


def test_bfloat16_within_bf16_tolerance(tiny_ckpt, llm):
    bf16 = LLM(str(tiny_ckpt), dtype="bfloat16", num_kv_blocks=128, block_size=4)
    prompt = [{"prompt_token_ids": PROMPTS[1]}]
    params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=5)
    lp32 = llm.generate(prompt, params)[0].outputs[0].logprobs[0]
    lp16 = bf16.generate(prompt, params)[0].outputs[0].logprobs[0]
    shared = set(lp32) & set(lp16)
    assert len(shared) >= 3
    assert max(abs(lp32[t].logprob - lp16[t].logprob) for t in shared) < 0.15


def test_fused_projections_hold_the_checkpoint_weights_once(tiny_ckpt):
    """q_proj, k_proj and v_proj run as one GEMM over slices of one tensor: the parameters keep
    their checkpoint names and values, no copy is left beside it, and the block's output is
    the three-GEMM one."""
    from safetensors import safe_open

    from afd.config import ModelConfig
    from afd.models.build import load_attention_side
    from afd.models.layers import Rope

    cfg = ModelConfig.from_pretrained(tiny_ckpt)
    side = load_attention_side(tiny_ckpt, cfg, torch.float32, "cpu")
    attn = side.layer(1).self_attn
    fused = attn.qkv_weight
    assert fused is not None and fused.shape == (cfg.share_q_dim + 2 * cfg.head_dim, 64)
    index = json.loads((tiny_ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    for name in ("q_proj", "k_proj", "v_proj"):
        key = f"model.layers.1.self_attn.{name}.weight"
        with safe_open(str(tiny_ckpt / index[key]), framework="pt") as f:
            assert torch.equal(getattr(attn, name).weight, f.get_tensor(key))
        assert getattr(attn, name).weight.untyped_storage().data_ptr() == fused.data_ptr()
    x = torch.randn(5, cfg.hidden_size)
    cos, sin = Rope(cfg.head_dim, cfg.rope_theta).cos_sin(torch.arange(5))
    seen = []  # the attention function gets q, k, v: return q and keep k, v
    keep = lambda q, k, v: seen.append((k, v)) or q  # noqa: E731
    with torch.no_grad():
        out = attn(x, cos, sin, keep)
        attn.qkv_weight = None
        try:
            ref = attn(x, cos, sin, keep)
        finally:
            attn.qkv_weight = fused
    assert torch.allclose(out, ref, atol=1e-6)
    for a, b in zip(*seen, strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    # moved (the slices become separate tensors): the three GEMMs, on the moved weights
    with torch.no_grad():
        moved = attn.to(torch.float64)(x.double(), cos.double(), sin.double(), keep)
    assert torch.allclose(moved.float(), ref, atol=1e-5)
