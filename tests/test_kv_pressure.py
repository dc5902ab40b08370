"""Greedy outputs do not change under KV pressure (chunking, waiting, preemption) or when
prompts hit the prefix cache."""

from __future__ import annotations

import random

import pytest

from afd import LLM, SamplingParams

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=0)


def prompts(num: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    shared = [rng.randrange(10, 900) for _ in range(21)]  # 5 full blocks of 4 + 1
    out = []
    for i in range(num):
        tail = [rng.randrange(10, 900) for _ in range(rng.randint(1, 12))]
        out.append({"prompt_token_ids": (shared if i % 2 else shared[:9]) + tail})
    return out


def run(llm: LLM, batch: list[dict]) -> list[tuple[list[int], list[float]]]:
    outs = llm.generate(batch, GREEDY)
    return [
        (
            o.outputs[0].token_ids,
            [
                lp[t].logprob
                for lp, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids, strict=True)
            ],
        )
        for o in outs
    ]


def same(a, b) -> None:
    for (ids_a, lps_a), (ids_b, lps_b) in zip(a, b, strict=True):
        assert ids_a == ids_b
        assert max(abs(x - y) for x, y in zip(lps_a, lps_b, strict=True)) < 1e-4


@pytest.fixture(scope="module")
def unpressured(tiny_ckpt):
    llm = LLM(
        str(tiny_ckpt),
        dtype="float32",
        block_size=4,
        num_kv_blocks=2048,
        enable_prefix_caching=False,
    )
    return run(llm, prompts(24))


def test_tiny_pool_and_budget_force_preemption_without_changing_outputs(tiny_ckpt, unpressured):
    llm = LLM(
        str(tiny_ckpt),
        dtype="float32",
        block_size=4,
        num_kv_blocks=24,
        max_num_batched_tokens=10,
        enable_prefix_caching=False,
    )
    same(run(llm, prompts(24)), unpressured)
    assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.scheduler.blocks[0].num_free_blocks == 24


def test_prefix_cache_hits_give_identical_outputs(tiny_ckpt, unpressured):
    llm = LLM(str(tiny_ckpt), dtype="float32", block_size=4, num_kv_blocks=2048)
    first = run(llm, prompts(24))
    second = run(llm, prompts(24))  # every full prompt block is cached now
    blocks = llm.engine.scheduler.blocks[0]
    assert blocks.num_hits >= 0.2 * blocks.num_queries
    same(first, unpressured)
    same(second, unpressured)


def test_prefix_cache_under_pressure(tiny_ckpt, unpressured):
    llm = LLM(
        str(tiny_ckpt), dtype="float32", block_size=4, num_kv_blocks=30, max_num_batched_tokens=12
    )
    same(run(llm, prompts(24)), unpressured)
    same(run(llm, prompts(24)), unpressured)
    assert llm.engine.scheduler.blocks[0].num_hits > 0
