"""Disaggregated execution reproduces colocated generation, overlaps micro-batches, and fails
cleanly when a rank dies."""

from __future__ import annotations

import threading
import time

import pytest

from afd import LLM, SamplingParams, envs
from afd.engine.executor import ExecutorError
from tests.conftest import PROMPTS

pytestmark = pytest.mark.slow

CONFIGS = [
    ("1x1", "1x1", 1, "zmq"),
    ("1x1", "1x1", 3, "zmq"),
    ("2x1", "2x1", 3, "zmq"),
    ("1x1", "3x1", 2, "zmq"),
    ("3x1", "1x1", 4, "zmq"),
    # nccl matches messages by order (no header): several attention and FFN ranks, and
    # ranks left with empty micro-batches, over gloo on CPU
    ("2x1", "2x1", 3, "nccl"),
    ("3x1", "1x1", 4, "nccl"),
]
GREEDY = SamplingParams(max_tokens=5, temperature=0.0, logprobs=1, ignore_eos=True)
# one batch that leaves some ranks with fewer sequences than micro-batches, one that leaves
# every rank but one with nothing at all
BATCHES = [PROMPTS + [[7, 8, 9]], [PROMPTS[1]]]


def outputs(llm: LLM, prompts: list[list[int]]):
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY)
    return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in outs]


@pytest.fixture(scope="module")
def colocated(tiny_ckpt):
    llm = LLM(str(tiny_ckpt), dtype="float32", num_kv_blocks=128, block_size=4)
    return [outputs(llm, batch) for batch in BATCHES]


@pytest.mark.parametrize(("attn", "ffn", "m", "transport"), CONFIGS)
def test_disaggregated_equals_colocated(tiny_ckpt, colocated, attn, ffn, m, transport):
    with LLM(
        str(tiny_ckpt),
        dtype="float32",
        num_kv_blocks=128,
        block_size=4,
        colocated=False,
        attn=attn,
        ffn=ffn,
        micro_batches=m,
        transport=transport,
    ) as llm:
        got = [outputs(llm, batch) for batch in BATCHES]
    for want_batch, got_batch in zip(colocated, got, strict=True):
        for (want_ids, want_lps), (ids, lps) in zip(want_batch, got_batch, strict=True):
            assert ids == want_ids
            for want, have, tok in zip(want_lps, lps, ids, strict=True):
                assert abs(want[tok].logprob - have[tok].logprob) < 1e-4


def timed_generation(tiny_ckpt, m: int) -> float:
    with LLM(
        str(tiny_ckpt),
        dtype="float32",
        num_kv_blocks=128,
        block_size=4,
        colocated=False,
        micro_batches=m,
        max_num_batched_tokens=64,
    ) as llm:
        prompts = [{"prompt_token_ids": [i + 1, i + 2, i + 3]} for i in range(12)]
        params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
        start = time.perf_counter()
        llm.generate(prompts, params)
        return time.perf_counter() - start


def test_micro_batches_overlap_attention_and_ffn(tiny_ckpt, monkeypatch):
    # equal simulated compute on both stages: m=1 runs them one after the other, m=3 overlaps
    monkeypatch.setenv("AFD_TEST_STAGE_DELAY_MS", "1.0,1.0")
    serial, pipelined = timed_generation(tiny_ckpt, 1), timed_generation(tiny_ckpt, 3)
    assert pipelined / serial < 0.8, (serial, pipelined)


@pytest.mark.parametrize("victim", ["f1", "a0"])
def test_dead_rank_fails_generate_and_leaves_no_process(tiny_ckpt, monkeypatch, victim):
    monkeypatch.setenv("AFD_TEST_STAGE_DELAY_MS", "0.5,0.5")  # keep generation running a while
    llm = LLM(
        str(tiny_ckpt),
        dtype="float32",
        num_kv_blocks=256,
        block_size=4,
        colocated=False,
        attn="1x1",
        ffn="2x1",
        micro_batches=2,
    )
    procs = list(llm.engine.executor.procs.values())
    target = llm.engine.executor.procs[victim]
    killed_at: list[float] = []

    def kill_soon() -> None:
        time.sleep(1.5)
        killed_at.append(time.monotonic())
        target.kill()

    threading.Thread(target=kill_soon, daemon=True).start()
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    with pytest.raises(ExecutorError, match=f"rank {victim}"):
        llm.generate(prompts, SamplingParams(max_tokens=2000, temperature=0.0, ignore_eos=True))
    assert killed_at and time.monotonic() - killed_at[0] < 30
    assert all(p.poll() is not None for p in procs)
    with pytest.raises(ExecutorError):  # the engine stays failed rather than hanging
        llm.generate(prompts, GREEDY)


def test_idle_past_the_heartbeat_timeout_then_serve(tiny_ckpt, monkeypatch) -> None:
    """An idle coordinator reads no heartbeats; the first step after a long idle must not take
    the queued beats' age for silent ranks (it failed every first request after 10 s idle)."""
    monkeypatch.setattr(envs, "HEARTBEAT_TIMEOUT_S", 1.5)
    with LLM(
        str(tiny_ckpt), dtype="float32", num_kv_blocks=64, block_size=4, colocated=False
    ) as llm:
        first = outputs(llm, [PROMPTS[0]])
        time.sleep(4 * envs.HEARTBEAT_TIMEOUT_S)  # idle: ranks beat, nobody listens
        assert outputs(llm, [PROMPTS[0]]) == first
