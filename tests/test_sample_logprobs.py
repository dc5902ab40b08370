"""Logprobs of generated tokens (SamplingParams.logprobs): vLLM's tables of Logprob entries,
with the token's rank over the whole vocabulary and its decoded text, against log_softmax of
an independent full forward over prompt and output; and the sampler's batched rows."""

from __future__ import annotations

import pytest
import torch

from afd import LLM, SamplingParams
from afd.outputs import Logprob
from attn_worker.messages import SamplingSpec
from attn_worker.sampler import SeqSamplingState, sample
from tests.conftest import PROMPTS
from tests.reference_step3 import ReferenceStep3
from tests.test_prompt_logprobs import TOL, check

PROMPT = PROMPTS[1]
TOP = 3


@pytest.fixture(scope="module")
def llm(tiny_ckpt) -> LLM:
    return LLM(str(tiny_ckpt), dtype="float32", num_kv_blocks=256, block_size=4)


@pytest.fixture(scope="module")
def ref(tiny_ckpt) -> ReferenceStep3:
    return ReferenceStep3(tiny_ckpt)


def test_greedy_tables_equal_the_reference(llm: LLM, ref: ReferenceStep3) -> None:
    params = SamplingParams(
        max_tokens=6, temperature=0.0, logprobs=TOP, prompt_logprobs=TOP, ignore_eos=True
    )
    (out,) = llm.generate({"prompt_token_ids": PROMPT}, params)
    c = out.outputs[0]
    assert len(c.logprobs) == len(c.token_ids) == 6
    full = PROMPT + c.token_ids
    # prompt and generated tables are one shape: checked together, position by position
    check(out.prompt_logprobs + c.logprobs, full, ref.all_logprobs(full))
    text = llm.tokenizer.decode
    for token, table in zip(c.token_ids, c.logprobs, strict=True):
        assert all(isinstance(e, Logprob) for e in table.values())
        assert table[token].rank == 1  # greedy takes the most likely token
        assert table[token].decoded_token == text([token], skip_special_tokens=False)
        assert len(table) == TOP  # the token is one of the top 3


def test_sampled_token_has_its_rank_in_the_raw_distribution(llm: LLM, ref: ReferenceStep3) -> None:
    """Drawn at a high temperature, some tokens are not the most likely; logprob and rank are
    of the raw distribution (before temperature and top-k), as vLLM returns them by default."""
    params = SamplingParams(
        max_tokens=8, temperature=3.0, top_k=50, seed=3, logprobs=0, ignore_eos=True
    )
    (out,) = llm.generate({"prompt_token_ids": PROMPT}, params)
    c = out.outputs[0]
    rows = ref.all_logprobs(PROMPT + c.token_ids)[len(PROMPT) - 1 : -1]  # [8, V]
    ranks = []
    for row, token, table in zip(rows, c.token_ids, c.logprobs, strict=True):
        assert list(table) == [token]  # logprobs=0: the token alone
        assert abs(table[token].logprob - row[token]) < TOL
        above = int((row > row[token] + TOL).sum())
        assert above + 1 <= table[token].rank <= int((row >= row[token] - TOL).sum())
        ranks.append(table[token].rank)
    assert max(ranks) > 1  # the draw left the argmax at least once


def test_no_logprobs_unless_asked(llm: LLM) -> None:
    (out,) = llm.generate({"prompt_token_ids": PROMPT}, SamplingParams(max_tokens=2))
    assert out.outputs[0].logprobs is None


def test_sampler_rows_ask_independently() -> None:
    """One batch with rows asking for no logprobs, for the token alone and for the top 4,
    greedy, drawn and penalised: each gets what it asked, ranks over the raw distribution."""
    logits = torch.randn(5, 40, generator=torch.Generator().manual_seed(0)) * 3  # [S, V]
    specs = [
        SamplingSpec(temperature=0.0, num_logprobs=4),
        SamplingSpec(temperature=0.0),
        SamplingSpec(temperature=2.0, seed=1, num_logprobs=0),
        SamplingSpec(temperature=0.0, presence_penalty=5.0, num_logprobs=2),
        SamplingSpec(temperature=1.5, top_k=10, seed=2, num_logprobs=4),
    ]
    states = {i: SeqSamplingState(spec) for i, spec in enumerate(specs)}
    out = sample(logits.clone(), list(range(5)), states)
    lp = logits.log_softmax(-1)
    assert out[1].logprobs is None
    for row in (0, 2, 3, 4):
        token, got = out[row].token_id, out[row].logprobs
        assert got.logprob == pytest.approx(lp[row, token].item(), abs=1e-6)
        assert got.rank == int((lp[row] >= lp[row, token]).sum())
        k = specs[row].num_logprobs
        assert got.top_ids == lp[row].topk(k).indices.tolist()
        assert got.top_logprobs == pytest.approx(lp[row].topk(k).values.tolist(), abs=1e-6)
    assert out[0].logprobs.rank == 1
