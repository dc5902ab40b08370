"""The attention rank's sampler on its own: batched filtering equals a per-row reference,
batched draws follow the filtered distribution, seeded draws ignore their batch, and the
repetition penalty follows vLLM / HF (divide positive logits, multiply the others)."""

from __future__ import annotations

import random

import torch

from attn_worker.messages import SamplingSpec
from attn_worker.sampler import SeqSamplingState, sample, sampling_probs


def reference_probs(logits: torch.Tensor, spec: SamplingSpec) -> torch.Tensor:
    """One row, knob by knob, each only when it is on: the sampler before it was batched."""
    logits = logits / spec.temperature
    if 0 < spec.top_k < logits.shape[-1]:
        kth = torch.topk(logits, spec.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if spec.min_p > 0.0:
        probs = probs.masked_fill(probs < spec.min_p * probs.max(), 0.0)
    if spec.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = (sorted_p.cumsum(-1) - sorted_p) < spec.top_p
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p * keep)
    return probs


def random_specs(num: int, vocab: int, rng: random.Random) -> list[SamplingSpec]:
    return [
        SamplingSpec(
            temperature=rng.choice([0.3, 0.7, 1.0, 1.7]),
            top_k=rng.choice([-1, 0, 1, 2, 7, 50, vocab - 1, vocab, vocab + 5]),
            top_p=rng.choice([1.0, 1.0, 0.95, 0.6, 0.2, 0.01]),
            min_p=rng.choice([0.0, 0.0, 0.01, 0.1, 0.5]),
        )
        for _ in range(num)
    ]


def test_batched_filtering_matches_per_row_reference():
    rng, gen = random.Random(0), torch.Generator().manual_seed(0)
    # 5000 tokens: top-p looks among the top 1024 first; a wide nucleus sorts the whole rows
    for vocab, scale in ((1000, 1.0), (1000, 4.0), (37, 0.3), (5000, 12.0), (5000, 4.0)):
        logits = torch.randn(96, vocab, generator=gen) * scale  # [R, V]
        specs = random_specs(96, vocab, rng)
        batched, fallback = sampling_probs(logits, specs)
        assert fallback.tolist() == [-1] * 96  # every row is a distribution
        for row, spec in enumerate(specs):
            want = reference_probs(logits[row], spec)
            assert torch.equal(batched[row] > 0, want > 0), (vocab, row, spec)
            torch.testing.assert_close(batched[row], want, rtol=1e-5, atol=1e-7)
    # every knob at work somewhere, so the check above covers each
    assert {s.top_k for s in specs} & {1, 2, 7, 50}
    assert any(s.top_p < 1.0 for s in specs) and any(s.min_p > 0.0 for s in specs)


def test_top_p_among_the_top_candidates_matches_the_sorted_reference():
    """Narrow nuclei in a vocabulary wider than the 1024 candidates top-p looks at first (the
    test above, with wide ones, sorts the whole rows)."""
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(64, 5000, generator=gen) * 8.0
    specs = [SamplingSpec(temperature=0.7, top_p=p) for p in (0.5, 0.9, 0.95, 0.99) * 16]
    batched, _ = sampling_probs(logits, specs)
    widest = 0
    for row, spec in enumerate(specs):
        want = reference_probs(logits[row], spec)
        assert torch.equal(batched[row] > 0, want > 0), (row, spec)
        torch.testing.assert_close(batched[row], want, rtol=1e-5, atol=1e-7)
        widest = max(widest, int((want > 0).sum()))
    assert 1 < widest < 1024


def test_a_rows_nucleus_does_not_depend_on_its_batch():
    """A wide nucleus beside it (sorted whole) must not change a narrow row's kept tokens: with
    ties at the nucleus's edge (bf16-rounded logits tie often), a top-k and a sort keep
    different tied tokens, and a seeded row would then draw differently in another batch."""
    gen = torch.Generator().manual_seed(2)
    narrow = torch.full((8, 5000), -10.0)
    narrow[:, 100] = 5.0
    for row in narrow:  # 20 tokens tie, and the nucleus ends among them
        row[torch.randperm(5000, generator=gen)[:20]] = 3.0
    flat = torch.randn(1, 5000, generator=gen) * 0.1
    specs = [SamplingSpec(temperature=1.0, top_p=0.5)] * 9
    alone, _ = sampling_probs(narrow, specs[:8])
    beside, _ = sampling_probs(torch.cat([narrow, flat]), specs)
    assert torch.equal(alone, beside[:8])
    assert {int((row > 0).sum()) for row in alone} == {8}  # the top token and 7 of the tied
    assert int((beside[8] > 0).sum()) > 1024  # the flat row's nucleus is wider than that


def states(specs: list[SamplingSpec]) -> dict[int, SeqSamplingState]:
    return {i: SeqSamplingState(spec) for i, spec in enumerate(specs)}


def test_batched_draws_follow_the_filtered_distribution():
    torch.manual_seed(0)
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])
    spec = SamplingSpec(temperature=0.8, top_k=6, top_p=0.9, min_p=0.05)
    num = 40_000  # one batch of identical rows, drawn together
    out = sample(logits.expand(num, -1).clone(), list(range(num)), states([spec] * num))
    counts = torch.bincount(torch.tensor([t.token_id for t in out]), minlength=8)
    want = reference_probs(logits, spec)
    want = want / want.sum()
    assert torch.all(counts[want == 0] == 0)  # filtered-out tokens are never drawn
    # the standard error of each frequency is below 0.0025: 0.012 is about five of them
    assert torch.allclose(counts / num, want, atol=0.012), (counts / num, want)


def test_seeded_rows_ignore_their_batch():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 50, generator=gen)
    seeded = SamplingSpec(temperature=1.0, top_p=0.9, seed=1234)
    others = [
        SamplingSpec(temperature=0.0),
        SamplingSpec(temperature=1.3, top_k=3),
        SamplingSpec(temperature=0.5, min_p=0.2, frequency_penalty=1.0),
        SamplingSpec(temperature=1.0, seed=99),
        SamplingSpec(temperature=0.7, logit_bias={3: 5.0}),
    ]
    alone = [sample(logits[:1], [0], states([seeded]))[0].token_id for _ in range(3)]
    mixed = sample(logits, list(range(6)), states([seeded, *others]))[0].token_id
    assert alone == [alone[0]] * 3 and mixed == alone[0]
    # the draw depends on the output index too: the next token of the same sequence differs
    state = SeqSamplingState(seeded)
    drawn = [sample(logits[1:2], [0], {0: state})[0].token_id for _ in range(12)]
    assert len(set(drawn)) > 1 and state.output_token_ids == drawn


def test_seeded_draws_follow_the_distribution():
    """Seeded rows race exponentials from their own generators: over many seeds, each token
    comes up as often as its probability says."""
    logits = torch.tensor([[1.0, 2.0, 0.0, 1.5]])
    want = torch.softmax(logits[0], -1)
    draws = 4000
    specs = [SamplingSpec(temperature=1.0, seed=seed) for seed in range(draws)]
    picked = sample(logits.expand(draws, 4), list(range(draws)), states(specs))
    freq = torch.bincount(torch.tensor([t.token_id for t in picked]), minlength=4) / draws
    torch.testing.assert_close(freq, want, atol=0.03, rtol=0)


def greedy(logits: list[float], spec: SamplingSpec, outputs: list[int] = ()) -> int:
    state = SeqSamplingState(spec, list(outputs))
    return sample(torch.tensor([logits]), [0], {0: state})[0].token_id


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    rep = lambda p, prompt: SamplingSpec(  # noqa: E731
        temperature=0.0, repetition_penalty=p, prompt_token_ids=prompt
    )
    assert greedy([3.0, 2.0, 0.0], rep(1.0, [0])) == 0  # 1.0 is off
    assert greedy([3.0, 2.0, 0.0], rep(2.0, [0])) == 1  # 3 / 2 < 2
    assert greedy([3.0, 2.0, 0.0], rep(1.4, [0])) == 0  # 3 / 1.4 > 2
    assert greedy([-1.0, -1.5, -9.0], rep(2.0, [0])) == 1  # -1 * 2 < -1.5
    assert greedy([-1.0, -1.5, -9.0], rep(1.2, [0])) == 0  # -1 * 1.2 > -1.5
    assert greedy([2.0, 3.0, 0.0], rep(0.5, [0])) == 0  # below 1 favours seen tokens
    # output tokens count as seen, prompt or not
    assert greedy([3.0, 2.0, 0.0], rep(2.0, []), outputs=[0]) == 1
    assert greedy([3.0, 2.0, 0.0], rep(2.0, [2]), outputs=[2]) == 0


def test_repetition_penalty_applies_per_row_in_a_mixed_batch():
    logits = torch.tensor([[3.0, 2.0, 0.0]] * 4)
    specs = [
        SamplingSpec(temperature=0.0, repetition_penalty=2.0, prompt_token_ids=[0]),
        SamplingSpec(temperature=0.0),
        SamplingSpec(temperature=0.0, repetition_penalty=2.0, prompt_token_ids=[1]),
        SamplingSpec(temperature=1.0, top_k=1, repetition_penalty=2.0, prompt_token_ids=[0]),
    ]
    picked = [t.token_id for t in sample(logits, [0, 1, 2, 3], states(specs))]
    assert picked == [1, 0, 0, 1]


def test_degenerate_rows_draw_their_most_likely_token_instead_of_raising():
    """Values that pass validation but underflow float32 once on the rank (top_p 1e-320 is 0
    there, a repetition penalty of 1e-50 divides by 0) left rows with no distribution, and
    torch.multinomial raised for seeded rows, which ended the rank and the engine with it.
    Such rows now take their most likely token, seeded or not; the other rows still draw."""
    logits = torch.tensor([[0.5, 2.0, 1.0, -1.0]] * 5)
    specs = [
        SamplingSpec(temperature=1.0, top_p=1e-320, seed=1),  # float32 p = 0: keeps the top
        SamplingSpec(temperature=1.0, top_p=1e-320),
        SamplingSpec(temperature=1.0, repetition_penalty=1e-50, prompt_token_ids=[2], seed=7),
        SamplingSpec(temperature=1.0, top_k=2, logit_bias={3: float("inf")}, seed=3),
        SamplingSpec(temperature=1.0, seed=5),
    ]
    for _ in range(20):
        picked = [t.token_id for t in sample(logits, [0, 1, 2, 3, 4], states(specs))]
        # +inf logits (1.0 / 0; an infinite bias, which the server rejects) win the argmax
        assert picked[:4] == [1, 1, 2, 3]
        assert 0 <= picked[4] < 4
    probs, fallback = sampling_probs(logits[:2], specs[:2])  # one token left, but valid
    assert torch.equal(probs, torch.tensor([[0.0, 1.0, 0.0, 0.0]] * 2) * probs.max())
    assert fallback.tolist() == [-1, -1]
    inf, nan = float("inf"), float("nan")
    bad = torch.tensor([[0.5, inf, 1.0, -1.0], [-inf] * 4, [0.5, nan, 1.0, 3.0]])
    _, fallback = sampling_probs(bad, [SamplingSpec(temperature=1.0)] * 3)
    assert fallback.tolist() == [1, 0, 1]
