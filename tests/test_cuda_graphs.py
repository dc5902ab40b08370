"""Decode steps through CUDA-graph static buffers: the same tokens and logprobs as eager, the
padding rows of a captured size confined to the cache's scratch block. Off a GPU the graph
runner calls the captured function instead of replaying it, so the buffer and padding logic
is checked on CPU; the real capture runs in the GPU test at the end."""

from __future__ import annotations

import pytest
import torch

from afd.config import ModelConfig
from afd.cuda_graphs import capture_sizes, size_for
from afd.engine.builder import table_width
from afd.models.build import load_attention_side, load_ffn_side
from afd.models.step3 import FFNShard
from attn_worker.decode_graphs import DecodeGraphs
from attn_worker.ffn_client import LocalFFN
from attn_worker.kv_cache import KVCache
from attn_worker.messages import NewSequence, SamplingSpec, ScheduledChunk, StepPlan
from attn_worker.model_runner import AttnRunner
from ffn_worker.graphs import FFNGraphs
from tests.conftest import PROMPTS

BLOCK, BLOCKS = 4, 64


def test_capture_sizes_and_lookup() -> None:
    assert capture_sizes(5) == [1, 2, 4, 5]
    assert capture_sizes(256)[-3:] == [128, 192, 256]
    sizes = capture_sizes(48)
    assert [size_for(sizes, n) for n in (1, 3, 4, 17, 48, 49)] == [1, 4, 4, 24, 48, None]
    with pytest.raises(ValueError, match=">= 1"):
        capture_sizes(0)


def _runner(ckpt, device: str, graphs: bool, max_batch: int = 8) -> AttnRunner:
    cfg = ModelConfig.from_pretrained(ckpt)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    attn = load_attention_side(ckpt, cfg, dtype, device)
    ffn = load_ffn_side(ckpt, cfg, FFNShard(), dtype, device)
    cache = KVCache(cfg.num_hidden_layers, BLOCKS, BLOCK, cfg.head_dim, dtype, device)
    if not graphs:
        return AttnRunner(attn, cache, LocalFFN(ffn))
    width = table_width(cfg.max_position_embeddings, BLOCK, BLOCKS)
    decode = DecodeGraphs(attn, cache, max_batch, width)
    return AttnRunner(attn, cache, LocalFFN(ffn, FFNGraphs(ffn, max_batch)), graphs=decode)


def _plans(prompts: list[list[int]], decode_steps: int, micro_batches: int):
    """A prefill step for every prompt, then decode steps spread over the micro-batches
    (uneven: the first gets all but one sequence, so its rows need padding)."""
    blocks = iter(range(BLOCKS))
    tables = {i: [] for i in range(len(prompts))}
    lengths = {i: len(p) for i, p in enumerate(prompts)}

    def grow(plan: StepPlan, seq: int, length: int) -> None:
        while len(tables[seq]) * BLOCK < length:
            tables[seq].append(next(blocks))
            plan.new_block_seq_ids.append(seq)
            plan.new_block_ids.append(tables[seq][-1])

    first = StepPlan(0, 1)
    for i, p in enumerate(prompts):
        first.new_seqs.append(NewSequence(i, SamplingSpec(temperature=0.0, num_logprobs=2)))
        first.chunks.append(ScheduledChunk(i, p, 0, True))
        grow(first, i, len(p))
    yield first
    for step in range(1, decode_steps + 1):
        plan = StepPlan(step, micro_batches)
        for i in range(len(prompts)):
            lengths[i] += 1
            grow(plan, i, lengths[i])
            plan.decode_seq_ids.append(i)
            plan.decode_micro_batches.append(0 if i < len(prompts) - 1 else micro_batches - 1)
        yield plan


def _generate(runner: AttnRunner, prompts, steps: int = 4, micro_batches: int = 2):
    out = []
    for plan in _plans(prompts, steps, micro_batches):
        result = runner.execute(plan)
        rows = [(s.seq_id, s.token_id, s.logprobs) for s in result.sampled]
        out.append([(i, t, lp.logprob, lp.top_ids, lp.top_logprobs) for i, t, lp in rows])
    return out


def _close(a, b, tol: float) -> None:
    """Per sequence, as vLLM's logprob checks: while both runs pick the same tokens, their
    logprobs agree within `tol`. Where they first pick different tokens, each pick must be in
    the other run's top-k (a near-tie that low-precision rounding may flip); the sequences
    then continue from different tokens, so the comparison of that sequence ends there."""
    per_seq: dict[int, list[tuple]] = {}
    for step_a, step_b in zip(a, b, strict=True):
        assert [s[0] for s in step_a] == [s[0] for s in step_b]
        for sa, sb in zip(step_a, step_b, strict=True):
            per_seq.setdefault(sa[0], []).append((sa, sb))
    for pairs in per_seq.values():
        for (_, ta, la, ia, _), (_, tb, lb, ib, _) in pairs:
            if ta != tb:
                assert ta in ib and tb in ia, (ta, ia, tb, ib)
                break
            assert abs(la - lb) < tol


def test_static_buffers_match_eager_and_pad_into_scratch(tiny_ckpt) -> None:
    prompts = PROMPTS[:3]  # decodes: 2 rows (size 2) and 1 row; then 3 rows pad to 4 below
    eager, graphs = _runner(tiny_ckpt, "cpu", False), _runner(tiny_ckpt, "cpu", True)
    _close(_generate(eager, prompts), _generate(graphs, prompts), 1e-5)
    prompts = PROMPTS[:4]  # 3 rows in the first micro-batch: one padding row
    eager, graphs = _runner(tiny_ckpt, "cpu", False), _runner(tiny_ckpt, "cpu", True)
    for runner in (eager, graphs):  # a sentinel in the scratch block
        runner.cache.k[:, BLOCKS] = 7.0
    _close(_generate(eager, prompts), _generate(graphs, prompts), 1e-5)
    # the padding row wrote the scratch block and nothing else (a padded batch may round its
    # projections differently in the last bits, hence close rather than equal)
    real = slice(0, BLOCKS)
    torch.testing.assert_close(eager.cache.k[:, real], graphs.cache.k[:, real], rtol=0, atol=1e-5)
    torch.testing.assert_close(eager.cache.v[:, real], graphs.cache.v[:, real], rtol=0, atol=1e-5)
    assert (graphs.cache.k[:, BLOCKS, 0] != 7.0).all()  # every layer's padding row wrote it
    assert (eager.cache.k[:, BLOCKS] == 7.0).all()


def _count_replays(runner: AttnRunner) -> dict[str, dict[int, int]]:
    """Counts replays per captured size, attention and FFN side."""
    counts: dict[str, dict[int, int]] = {"attention": {}, "ffn": {}}
    for side, graphs in (("attention", runner.graphs), ("ffn", runner.ffn.graphs)):
        for key, replay in graphs.replays.items():

            def counted(replay=replay, size=key[1], tally=counts[side]) -> None:
                tally[size] = tally.get(size, 0) + 1
                replay()

            graphs.replays[key] = counted
    return counts


def test_replays_cover_decodes_up_to_the_largest_size(tiny_ckpt) -> None:
    prompts = PROMPTS[:4]  # decode micro-batches of 3 rows (size 4) and 1 row (size 1)
    eager, graphs = _runner(tiny_ckpt, "cpu", False), _runner(tiny_ckpt, "cpu", True)
    counts = _count_replays(graphs)
    _close(_generate(eager, prompts), _generate(graphs, prompts), 1e-5)
    layers, steps = graphs.side.cfg.num_hidden_layers, 4
    assert counts["attention"] == {4: layers * steps, 1: layers * steps}
    assert counts["ffn"] == {4: layers * steps, 1: layers * steps}  # prefill rows: eager


def test_batches_past_the_largest_size_run_eagerly(tiny_ckpt) -> None:
    prompts = PROMPTS[:4]  # 3 decode rows in one micro-batch: past a largest size of 2
    eager, graphs = _runner(tiny_ckpt, "cpu", False), _runner(tiny_ckpt, "cpu", True, 2)
    counts = _count_replays(graphs)
    _close(_generate(eager, prompts), _generate(graphs, prompts), 1e-5)
    layers, steps = graphs.side.cfg.num_hidden_layers, 4
    assert counts["attention"] == {1: layers * steps}  # only the 1-row micro-batch replays
    assert counts["ffn"] == {1: layers * steps}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture needs a GPU")
def test_captured_graphs_match_eager_on_gpu(tiny_ckpt) -> None:
    prompts = PROMPTS[:4]
    eager, graphs = _runner(tiny_ckpt, "cuda", False), _runner(tiny_ckpt, "cuda", True)
    _close(_generate(eager, prompts, steps=6), _generate(graphs, prompts, steps=6), 5e-2)
