"""A fake executor whose step time is a known function of the step's shape, on a virtual clock:
lets scheduling policies be tested on the CPU in seconds, with no model."""

from __future__ import annotations

from afd.engine.executor import Executor
from afd.engine.messages import SampledToken, StepResult
from attn_worker.messages import StepPlan


class VirtualClock:
    def __init__(self) -> None:
        self.t = 0.0

    def now(self) -> float:
        return self.t


def step_seconds(plans: list[StepPlan]) -> float:
    """Ranks in lockstep: the slowest rank's attention plus FFN work for every token."""
    per_rank, total = [], 0
    for plan in plans:
        tokens = sum(len(c.token_ids) for c in plan.chunks)
        work = sum(len(c.token_ids) * (c.start_pos + len(c.token_ids)) for c in plan.chunks)
        per_rank.append(1e-4 * tokens + 1e-7 * work)
        total += tokens
    return 3e-3 + max(per_rank) + 1e-5 * total


class FakeExecutor(Executor):
    def __init__(self, num_ranks: int, clock: VirtualClock, token_id: int = 7) -> None:
        self.num_ranks, self.clock, self.token_id = num_ranks, clock, token_id

    def execute(self, plans: list[StepPlan]) -> list[StepResult]:
        self.clock.t += step_seconds(plans)
        return [
            StepResult(
                p.step,
                r,
                [SampledToken(c.seq_id, self.token_id, -1.0) for c in p.chunks if c.sample],
            )
            for r, p in enumerate(plans)
        ]

    def shutdown(self) -> None:
        self.clock = None
