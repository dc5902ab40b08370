"""Prompt logprobs (SamplingParams.prompt_logprobs) against log_softmax of an independent full
forward over the prompt: in one prefill chunk, over several, past the prefix cache, under
preemption, with n > 1 and disaggregated; and which chunks the scheduler asks to score."""

from __future__ import annotations

import pytest
import torch

from afd import LLM, SamplingParams
from afd.engine import engine_core
from afd.engine.messages import PromptLogprobs
from afd.engine.scheduler import Scheduler, SchedulerConfig
from afd.engine.sequence import request_sequences
from afd.sampling_params import SamplingError
from attn_worker.messages import StepPlan
from attn_worker.sampler import score_prompt
from tests.conftest import PROMPTS
from tests.reference_step3 import ReferenceStep3

PROMPT = PROMPTS[3]  # 40 tokens
TOP = 3
TOL = 1e-4


def params(**kw: object) -> SamplingParams:
    return SamplingParams(**{"max_tokens": 2, "temperature": 0.0, "prompt_logprobs": TOP, **kw})


@pytest.fixture(scope="module")
def reference(tiny_ckpt) -> torch.Tensor:
    return ReferenceStep3(tiny_ckpt).all_logprobs(PROMPT)  # [T, V] float64


@pytest.fixture(scope="module")
def llm(tiny_ckpt) -> LLM:
    return LLM(str(tiny_ckpt), dtype="float32", num_kv_blocks=256, block_size=4)


def check(tables: list, prompt: list[int], ref: torch.Tensor, top: int = TOP) -> None:
    """tables[j] scores prompt[j] with the distribution after prompt[:j] (ref[j - 1])."""
    assert len(tables) == len(prompt) and tables[0] is None
    for j in range(1, len(prompt)):
        row, token, table = ref[j - 1], prompt[j], tables[j]
        assert next(iter(table)) == token  # the prompt token first, as vLLM
        assert abs(table[token].logprob - row[token]) < TOL
        # its rank over the whole vocabulary (a float32 near-tie may move it by one)
        above = int((row > row[token] + TOL).sum())
        assert above + 1 <= table[token].rank <= int((row >= row[token] - TOL).sum())
        want = row.topk(top).values
        ranked = sorted((e.rank, e.logprob) for i, e in table.items() if i != token)
        ranked += [(table[token].rank, table[token].logprob)] if table[token].rank <= top else []
        assert sorted(r for r, _ in ranked) == list(range(1, top + 1))
        for i, entry in table.items():
            assert abs(entry.logprob - row[i]) < TOL
            if entry.rank <= top:
                assert abs(entry.logprob - want[entry.rank - 1]) < TOL


def record_plans(llm: LLM) -> list[StepPlan]:
    plans: list[StepPlan] = []
    execute = llm.engine.executor.execute

    def recording(step_plans: list[StepPlan]):
        plans.extend(step_plans)
        return execute(step_plans)

    llm.engine.executor.execute = recording
    return plans


def test_range_is_checked() -> None:
    for bad in (-1, 21):
        with pytest.raises(SamplingError, match="prompt_logprobs must be in"):
            SamplingParams(prompt_logprobs=bad)
    assert SamplingParams(prompt_logprobs=0).prompt_logprobs == 0
    assert SamplingParams(prompt_logprobs=20).prompt_logprobs == 20


def test_score_prompt_rows() -> None:
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(0))
    targets = [3, 9, 0, 49, 9]
    out = PromptLogprobs(seq_id=1, start=4)
    score_prompt(logits[:2], targets[:2], 4, out)  # in two slices, as a long chunk is
    score_prompt(logits[2:], targets[2:], 4, out)
    lp = logits.log_softmax(-1)
    assert out.logprobs == pytest.approx([lp[r, t].item() for r, t in enumerate(targets)])
    assert out.ranks == [int((lp[r] >= lp[r, t]).sum()) for r, t in enumerate(targets)]
    assert out.top_ids == lp.topk(4).indices.tolist()
    assert torch.allclose(torch.tensor(out.top_logprobs), lp.topk(4).values)
    none = PromptLogprobs(seq_id=1, start=1)
    score_prompt(logits, targets, 0, none)
    assert none.top_ids == [[]] * 5 and len(none) == 5


def test_one_chunk_equals_the_reference(llm: LLM, reference: torch.Tensor) -> None:
    plans = record_plans(llm)
    (out,) = llm.generate({"prompt_token_ids": PROMPT}, params())
    check(out.prompt_logprobs, PROMPT, reference)
    scored = [c for p in plans for c in p.chunks if c.prompt_logprob_targets]
    assert len(scored) == 1 and scored[0].prompt_logprob_targets == PROMPT[1:]
    decoded = llm.tokenizer.decode([PROMPT[5]], skip_special_tokens=False)
    assert out.prompt_logprobs[5][PROMPT[5]].decoded_token == decoded
    (plain,) = llm.generate({"prompt_token_ids": PROMPT}, params(prompt_logprobs=None))
    assert plain.prompt_logprobs is None


def test_several_chunks_equal_the_reference(tiny_ckpt, reference: torch.Tensor) -> None:
    small = LLM(
        str(tiny_ckpt), dtype="float32", num_kv_blocks=256, block_size=4, max_num_batched_tokens=7
    )
    plans = record_plans(small)
    (out,) = small.generate({"prompt_token_ids": PROMPT}, params(prompt_logprobs=0))
    check(out.prompt_logprobs, PROMPT, reference, top=0)
    scored = [c for p in plans for c in p.chunks if c.prompt_logprob_targets]
    assert len(scored) == 6  # 40 tokens, 7 a step
    for c in scored:  # each chunk's last row scores the next chunk's first token
        assert c.prompt_logprob_targets == PROMPT[c.start_pos + 1 : c.start_pos + 8]


def test_cached_prompt_is_scored_in_full(llm: LLM, reference: torch.Tensor) -> None:
    llm.generate({"prompt_token_ids": PROMPT}, params(prompt_logprobs=None))  # caches it
    (out,) = llm.generate({"prompt_token_ids": PROMPT}, params())
    check(out.prompt_logprobs, PROMPT, reference)


def test_n_choices_share_one_scoring(llm: LLM, reference: torch.Tensor) -> None:
    plans = record_plans(llm)
    (out,) = llm.generate({"prompt_token_ids": PROMPT}, params(n=3, temperature=1.0, seed=7))
    assert len(out.outputs) == 3
    check(out.prompt_logprobs, PROMPT, reference)
    assert sum(1 for p in plans for c in p.chunks if c.prompt_logprob_targets) == 1


def test_preemption_leaves_prompt_logprobs_unchanged(tiny_ckpt, llm: LLM, monkeypatch) -> None:
    prompts = [{"prompt_token_ids": [(7 * i + j) % 900 + 10 for j in range(14)]} for i in range(8)]
    want = llm.generate(prompts, params(max_tokens=6, ignore_eos=True))
    restarts = []  # prompts preempted in the middle of their prefill, scored again from 1
    add = engine_core._add_prompt_logprobs

    def counting(seq, chunk) -> None:
        restarts.append(chunk.start == 1 and bool(seq.prompt_logprobs))
        add(seq, chunk)

    monkeypatch.setattr(engine_core, "_add_prompt_logprobs", counting)
    tight = LLM(
        str(tiny_ckpt),
        dtype="float32",
        block_size=4,
        num_kv_blocks=12,
        max_num_batched_tokens=6,
        enable_prefix_caching=False,
    )
    got = tight.generate(prompts, params(max_tokens=6, ignore_eos=True))
    assert any(restarts)
    for w, g in zip(want, got, strict=True):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
        for tw, tg in zip(w.prompt_logprobs[1:], g.prompt_logprobs[1:], strict=True):
            assert tw.keys() == tg.keys()
            assert all(abs(tw[i].logprob - tg[i].logprob) < TOL for i in tw)


def test_single_token_prompt_has_only_none(llm: LLM) -> None:
    (out,) = llm.generate({"prompt_token_ids": [600]}, params())
    assert out.prompt_logprobs == [None] and len(out.outputs[0].token_ids) == 2


def test_only_asking_sequences_are_scored_and_skip_the_cache() -> None:
    sched = Scheduler(SchedulerConfig(num_kv_blocks=64, block_size=4))
    ids = iter(range(100))
    prompt = list(range(10, 30))
    (first,) = request_sequences("a", prompt, params(prompt_logprobs=None), ids)
    sched.add(first)
    sched.schedule()
    first.num_computed_tokens = len(prompt)
    sched.computed(first)  # its blocks are in the prefix cache now
    asking = request_sequences("b", prompt, params(n=2), ids)
    (plain,) = request_sequences("c", prompt, params(prompt_logprobs=None), ids)
    for seq in [*asking, plain]:
        sched.add(seq)
    (plan,) = sched.schedule().plans
    chunks = {c.seq_id: c for c in plan.chunks}
    assert chunks[asking[0].seq_id].start_pos == 0  # scored from the start, not the cache
    assert chunks[asking[0].seq_id].prompt_logprob_targets == prompt[1:]
    assert chunks[asking[1].seq_id].start_pos > 0  # the second choice does not score
    assert not chunks[asking[1].seq_id].prompt_logprob_targets
    assert chunks[plain.seq_id].start_pos > 0 and not chunks[plain.seq_id].prompt_logprob_targets
    new = {s.seq_id: s.sampling.num_prompt_logprobs for s in plan.new_seqs}
    assert new[asking[0].seq_id] == TOP and new[plain.seq_id] == 0


@pytest.mark.slow
def test_disaggregated_equals_the_reference(tiny_ckpt, reference: torch.Tensor) -> None:
    with LLM(
        str(tiny_ckpt),
        dtype="float32",
        num_kv_blocks=256,
        block_size=4,
        colocated=False,
        attn="1x1",
        ffn="1x1",
        micro_batches=2,
        max_num_batched_tokens=16,
    ) as llm:
        (out,) = llm.generate({"prompt_token_ids": PROMPT}, params())
    check(out.prompt_logprobs, PROMPT, reference)
