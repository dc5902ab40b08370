"""Sampling through the offline API: seeded draws repeat whatever the batch or KV pressure,
top-k 1 is greedy, penalties and temperature change what is drawn."""

from __future__ import annotations

import pytest

from afd import LLM, SamplingParams
from afd.sampling_params import SamplingError
from tests.conftest import PROMPTS


@pytest.fixture(scope="module")
def llm(tiny_ckpt):
    return LLM(str(tiny_ckpt), dtype="float32", block_size=4, num_kv_blocks=256)


def tokens(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    return [o.outputs[0].token_ids for o in outs]


def test_seeded_sampling_repeats_across_batches_and_pressure(llm, tiny_ckpt):
    params = SamplingParams(max_tokens=8, temperature=1.0, top_p=0.9, seed=7, ignore_eos=True)
    alone = tokens(llm, [PROMPTS[1]], params)[0]
    batched = tokens(llm, PROMPTS, params)[1]
    tight = LLM(
        str(tiny_ckpt), dtype="float32", block_size=4, num_kv_blocks=16, max_num_batched_tokens=6
    )
    pressured = tokens(tight, PROMPTS, params)[1]
    assert alone == batched == pressured
    other = tokens(
        llm, [PROMPTS[1]], SamplingParams(max_tokens=8, temperature=1.0, seed=8, ignore_eos=True)
    )[0]
    assert other != alone


def test_top_k_one_is_greedy_and_n_choices_differ(llm):
    greedy = tokens(llm, PROMPTS, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
    top1 = tokens(
        llm, PROMPTS, SamplingParams(max_tokens=6, temperature=1.5, top_k=1, ignore_eos=True)
    )
    assert top1 == greedy
    out = llm.generate(
        {"prompt_token_ids": PROMPTS[0]},
        SamplingParams(n=3, max_tokens=8, temperature=1.0, seed=1, ignore_eos=True),
    )[0]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1


def test_logit_bias_forces_a_token_and_min_p_near_one_is_greedy(llm):
    forced = tokens(
        llm,
        PROMPTS,
        SamplingParams(max_tokens=4, temperature=0.0, logit_bias={7: 100.0}, ignore_eos=True),
    )
    assert forced == [[7] * 4] * len(PROMPTS)
    greedy = tokens(llm, PROMPTS, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
    near_greedy = SamplingParams(max_tokens=6, temperature=1.0, min_p=0.999, ignore_eos=True)
    assert tokens(llm, PROMPTS, near_greedy) == greedy
    with pytest.raises(SamplingError, match="logit_bias"):
        llm.generate({"prompt_token_ids": [1]}, SamplingParams(logit_bias={10**9: 1.0}))


def test_frequency_penalty_discourages_repeats(llm):
    def repeats(params: SamplingParams) -> int:
        return sum(len(t) - len(set(t)) for t in tokens(llm, PROMPTS, params))

    plain = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    penalised = SamplingParams(
        max_tokens=24, temperature=0.0, frequency_penalty=2.0, presence_penalty=2.0, ignore_eos=True
    )
    assert repeats(penalised) < repeats(plain)
