"""Admission policies: how many tokens of a prefill chunk to admit this step.

Decodes always run (they come first). `TPOTAdmission` admits prefill work only while the
step-time model predicts the step stays within the TPOT target, and admits a new sequence
only while the rank's decode batch with it would still meet the target, so under overload
requests wait (TTFT grows) instead of every running request slowing down."""

from __future__ import annotations

from abc import ABC, abstractmethod

from afd.engine.sequence import Sequence
from afd.engine.step_time import StepShapeStats, StepTimeModel

MIN_PROGRESS_TOKENS = 16


class Admission(ABC):
    def begin_step(self, running: list[list[Sequence]]) -> None:
        """Called once per step before any admit() with each rank's running sequences."""
        self.running = running

    @abstractmethod
    def admit(
        self, shape: StepShapeStats, rank: int, seq: Sequence, num_tokens: int, new: bool
    ) -> int:
        """Tokens of `seq` to run on `rank` this step, at most num_tokens (0: not now)."""


class AdmitAll(Admission):
    """FCFS under the token budget and sequence cap only: blind to the TPOT target."""

    def admit(
        self, shape: StepShapeStats, rank: int, seq: Sequence, num_tokens: int, new: bool
    ) -> int:
        return num_tokens


class TPOTAdmission(Admission):
    def __init__(self, model: StepTimeModel, target_s: float, headroom: float = 0.9) -> None:
        self.model, self.target_s = model, target_s * headroom

    def begin_step(self, running: list[list[Sequence]]) -> None:
        super().begin_step(running)
        self._decode: StepShapeStats | None = None  # built on first need: most steps admit none

    @property
    def decode(self) -> StepShapeStats:
        """Each rank's decode step as it stands: one token per running sequence."""
        if self._decode is None:
            self._decode = StepShapeStats.empty(len(self.running))
            for rank, seqs in enumerate(self.running):
                self._decode.tokens[rank] = len(seqs)
                self._decode.work[rank] = sum(s.num_tokens for s in seqs)
        return self._decode

    def admit(
        self, shape: StepShapeStats, rank: int, seq: Sequence, num_tokens: int, new: bool
    ) -> int:
        chunk = self._largest_chunk(shape, rank, seq.num_computed_tokens, num_tokens)
        if sum(shape.tokens) == 0:
            # an empty step always makes progress, so a pessimistic model cannot stall the
            # engine (and it keeps calibrating)
            return max(chunk, min(num_tokens, MIN_PROGRESS_TOKENS))
        if new:
            if not self._decode_fits(rank, seq):
                return 0
            # later candidates this step see this one in the rank's decode batch
            self.decode.add(rank, 1, seq.num_tokens)
        return chunk

    def _decode_fits(self, rank: int, seq: Sequence) -> bool:
        return self.model.predict(self.decode, rank, 1, seq.num_tokens) <= self.target_s

    def _largest_chunk(self, shape: StepShapeStats, rank: int, start: int, limit: int) -> int:
        """Binary search: the predicted step time grows monotonically with the chunk. A rank
        also keeps to its fair share (the step as if every rank carried its load), so the
        first rank scheduled cannot spend the whole step's budget on its own prefill."""
        num_ranks, tokens, work = len(shape.tokens), shape.tokens[rank], shape.work[rank]

        def fits(n: int) -> bool:
            t, wk = tokens + n, work + n * (start + n)
            share = self.model.predict_uniform(t, wk, num_ranks)
            return max(share, self.model.predict(shape, rank, n, wk - work)) <= self.target_s

        lo, hi = 0, limit
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
        return lo
