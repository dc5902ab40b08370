"""A fake executor whose step time is a known function of the step's shape, on a virtual clock:
lets scheduling policies be tested on the CPU in seconds, with no model."""

from __future__ import annotations

from afd.engine.executor import Executor
from afd.engine.messages import SampledToken, StepResult, TokenLogprobs
from attn_worker.messages import StepPlan


class VirtualClock:
    def __init__(self) -> None:
        self.t = 0.0

    def now(self) -> float:
        return self.t


def rank_seconds(tokens: int, work: int) -> float:
    """One attention rank's time: linears per token, attention per token x context."""
    return 1e-4 * tokens + 1e-7 * work


def step_seconds(per_rank: list[tuple[int, int]]) -> float:
    """Ranks in lockstep: the slowest rank, plus FFN work for every token, plus overhead."""
    total = sum(t for t, _ in per_rank)
    return 3e-3 + max(rank_seconds(t, w) for t, w in per_rank) + 1e-5 * total


class FakeExecutor(Executor):
    """Tracks each sequence's context like an attention rank would, samples a fixed token."""

    def __init__(self, num_ranks: int, clock: VirtualClock, token_id: int = 7) -> None:
        self.num_ranks, self.clock, self.token_id = num_ranks, clock, token_id
        self.context: dict[int, int] = {}
        self.shapes: list[list[tuple[int, int]]] = []  # (tokens, work) per rank, every step

    def execute(self, plans: list[StepPlan]) -> list[StepResult]:
        shape = [self._run(p) for p in plans]
        self.shapes.append(shape)
        self.clock.t += step_seconds(shape)
        return [StepResult(p.step, r, self._sampled(p)) for r, p in enumerate(plans)]

    def _run(self, plan: StepPlan) -> tuple[int, int]:
        for seq_id in plan.freed_seq_ids:
            self.context.pop(seq_id, None)
        tokens = work = 0
        for c in plan.chunks:
            n = len(c.token_ids)
            self.context[c.seq_id] = c.start_pos + n
            tokens, work = tokens + n, work + n * (c.start_pos + n)
        for seq_id in plan.decode_seq_ids:
            self.context[seq_id] += 1
            tokens, work = tokens + 1, work + self.context[seq_id]
        return tokens, work

    def _sampled(self, plan: StepPlan) -> list[SampledToken]:
        ids = [c.seq_id for c in plan.chunks if c.sample] + plan.decode_seq_ids
        return [SampledToken(i, self.token_id, TokenLogprobs(-1.0, 1)) for i in ids]

    def shutdown(self) -> None:
        self.context.clear()
