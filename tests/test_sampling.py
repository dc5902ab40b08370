"""Sampling through the offline API: seeded draws repeat whatever the batch or KV pressure,
top-k 1 is greedy, penalties and temperature change what is drawn; repetition_penalty through
the server too."""

from __future__ import annotations

import httpx
import pytest
from fake_engine import FakeEngine, running_server

from afd import LLM, SamplingParams
from afd.sampling_params import SamplingError
from afd.server.api_server import ServerSettings, build_app
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


def greedy(rep: float, max_tokens: int = 16) -> SamplingParams:
    return SamplingParams(
        max_tokens=max_tokens, temperature=0.0, repetition_penalty=rep, ignore_eos=True
    )


def test_repetition_penalty_changes_greedy_output(llm):
    def repeats(outs: list[list[int]]) -> int:
        return sum(len(t) - len(set(t)) for t in outs)

    plain, penalised = tokens(llm, PROMPTS, greedy(1.0)), tokens(llm, PROMPTS, greedy(2.0))
    assert repeats(plain) > 0  # the tiny model repeats itself, so there is something to stop
    assert repeats(penalised) < repeats(plain) and penalised != plain


def test_repetition_penalty_counts_prompt_tokens_like_output_tokens(llm):
    """Moving the first 8 output tokens into the prompt leaves the penalised set, and so the
    greedy continuation, unchanged; without the prompt's tokens it would differ."""
    out = tokens(llm, [PROMPTS[0]], greedy(2.0))[0]
    moved = tokens(llm, [PROMPTS[0] + out[:8]], greedy(2.0, max_tokens=8))[0]
    assert moved == out[8:]
    assert tokens(llm, [PROMPTS[0] + out[:8]], greedy(1.0, max_tokens=8))[0] != out[8:]
    for bad in (0.0, -1.0):
        with pytest.raises(SamplingError, match="repetition_penalty"):
            SamplingParams(repetition_penalty=bad)


def test_non_finite_values_are_rejected_and_tiny_temperatures_raised():
    for name in ("temperature", "repetition_penalty"):
        with pytest.raises(SamplingError, match=f"{name} must be .* finite"):
            SamplingParams(**{name: float("inf")})
    assert SamplingParams(temperature=1e-45).temperature == 1e-2  # vLLM's floor
    assert SamplingParams(temperature=0.0).greedy


def test_values_that_underflow_on_the_rank_do_not_end_the_engine(llm):
    """top_p 1e-320 is 0 in float32 and a repetition penalty of 1e-50 divides by 0: such
    seeded requests once made torch.multinomial raise on the attention rank, which took the
    engine down for every request. Now top_p keeps the most likely token (so this is greedy),
    and the engine goes on serving."""
    greedy_tokens = tokens(llm, PROMPTS, greedy(1.0, max_tokens=6))
    tiny_p = SamplingParams(max_tokens=6, temperature=1.0, top_p=1e-320, seed=1, ignore_eos=True)
    assert tokens(llm, PROMPTS, tiny_p) == greedy_tokens
    rep = SamplingParams(max_tokens=6, repetition_penalty=1e-50, seed=2, ignore_eos=True)
    assert all(len(t) == 6 for t in tokens(llm, PROMPTS, rep))
    assert tokens(llm, PROMPTS, greedy(1.0, max_tokens=6)) == greedy_tokens


def test_server_accepts_repetition_penalty_and_rejects_non_positive():
    engine = FakeEngine()
    chat = {"model": "tiny-step3", "messages": [{"role": "user", "content": "hi"}]}
    comp = {"model": "tiny-step3", "prompt": "hello"}
    with running_server(build_app(engine, ServerSettings())) as url:
        with httpx.Client(base_url=url, timeout=10) as http:
            for path, body in (("/v1/chat/completions", chat), ("/v1/completions", comp)):
                r = http.post(path, json={**body, "repetition_penalty": 1.3})
                assert r.status_code == 200, r.text
                assert engine.last_params.repetition_penalty == 1.3
                for bad in (0, -0.5):
                    r = http.post(path, json={**body, "repetition_penalty": bad})
                    assert r.status_code == 400, r.text
                    error = r.json()["error"]
                    assert error["param"] == "repetition_penalty" and error["code"] == 400
                    assert "repetition_penalty must be positive" in error["message"]
