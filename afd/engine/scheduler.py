"""The coordinator's scheduler: decides each step, for every attention rank, which sequences
run, which prefill chunks are admitted, the micro-batch split and the KV blocks; emits one
StepPlan per rank carrying diffs (new sequences in full, running ones as deltas, freed ids)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from afd.engine.admission import Admission, AdmitAll
from afd.engine.block_manager import BlockManager
from afd.engine.micro_batches import split_micro_batches
from afd.engine.sequence import SeqStatus, Sequence
from attn_worker.messages import NewSequence, SamplingSpec, ScheduledChunk, StepPlan


@dataclass(frozen=True)
class SchedulerConfig:
    num_ranks: int = 1
    num_kv_blocks: int = 1024  # per rank
    block_size: int = 16
    max_num_batched_tokens: int = 2048  # per rank per step
    max_num_seqs: int = 256  # per rank
    num_micro_batches: int = 1
    max_model_len: int = 4096


@dataclass
class SchedulerOutput:
    step: int
    plans: list[StepPlan]
    scheduled: dict[int, int] = field(default_factory=dict)  # seq_id -> tokens this step
    num_preempted: int = 0


class Scheduler:
    def __init__(self, config: SchedulerConfig, admission: Admission | None = None) -> None:
        self.config = config
        self.admission = admission or AdmitAll()
        self.blocks = [
            BlockManager(config.num_kv_blocks, config.block_size) for _ in range(config.num_ranks)
        ]
        self.waiting: deque[Sequence] = deque()
        self.running: list[list[Sequence]] = [[] for _ in range(config.num_ranks)]
        self.to_free: list[list[int]] = [[] for _ in range(config.num_ranks)]
        self.step_id = 0
        self.num_preemptions = 0  # since start, for metrics

    # -- queue -------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def finish(self, seq: Sequence, reason: str, stop_reason: int | str | None = None) -> None:
        """Marks a sequence finished (or aborted) and releases its blocks."""
        if seq.status is SeqStatus.RUNNING:
            self._release(seq)
            self.running[seq.rank].remove(seq)
        elif seq.status is SeqStatus.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        seq.status, seq.finish_reason, seq.stop_reason = SeqStatus.FINISHED, reason, stop_reason

    @property
    def num_running(self) -> int:
        return sum(len(r) for r in self.running)

    def has_work(self) -> bool:
        return bool(self.waiting) or self.num_running > 0

    # -- one step ----------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        self.step_id += 1
        budget = [self.config.max_num_batched_tokens] * self.config.num_ranks
        scheduled: dict[int, int] = {}
        new_on_rank: list[list[Sequence]] = [[] for _ in range(self.config.num_ranks)]
        preempted = self._schedule_running(budget, scheduled)
        self._schedule_waiting(budget, scheduled, new_on_rank)
        plans = [self._plan(r, scheduled, new_on_rank[r]) for r in range(self.config.num_ranks)]
        return SchedulerOutput(self.step_id, plans, scheduled, preempted)

    def _schedule_running(self, budget: list[int], scheduled: dict[int, int]) -> int:
        """Decodes and unfinished prefills of running sequences first, oldest first."""
        num_preempted = 0
        for rank, running in enumerate(self.running):
            i = 0
            while i < len(running):
                seq = running[i]
                n = min(seq.num_remaining_tokens, budget[rank])
                if n <= 0:
                    i += 1
                    continue
                if not self._grow(seq, n):
                    victim = running[-1]  # newest arrival gives way
                    self._preempt(victim)
                    num_preempted += 1
                    if victim is seq:
                        break
                    continue
                scheduled[seq.seq_id], budget[rank] = n, budget[rank] - n
                i += 1
        return num_preempted

    def _schedule_waiting(
        self, budget: list[int], scheduled: dict[int, int], new_on_rank: list[list[Sequence]]
    ) -> None:
        while self.waiting:
            seq = self.waiting[0]
            rank = self._place(seq, budget)
            if rank is None:
                return
            n = min(seq.num_remaining_tokens, budget[rank])
            n = self.admission.admit(rank, seq, n, self.running[rank], scheduled)
            if n <= 0 or not self._grow_on(seq, rank, n):
                return
            self.waiting.popleft()
            seq.status, seq.rank = SeqStatus.RUNNING, rank
            self.running[rank].append(seq)
            new_on_rank[rank].append(seq)
            scheduled[seq.seq_id], budget[rank] = n, budget[rank] - n

    def _place(self, seq: Sequence, budget: list[int]) -> int | None:
        """The rank with the most free KV, then the least work; None when none can take it."""
        cfg = self.config
        candidates = [
            r
            for r in range(cfg.num_ranks)
            if budget[r] > 0 and len(self.running[r]) < cfg.max_num_seqs
        ]
        if not candidates:
            return None
        return max(candidates, key=lambda r: (self.blocks[r].num_free_blocks, budget[r], -r))

    def _grow(self, seq: Sequence, n: int) -> bool:
        return self._grow_on(seq, seq.rank, n)

    def _grow_on(self, seq: Sequence, rank: int, n: int) -> bool:
        blocks = self.blocks[rank]
        need = blocks.blocks_needed(seq.num_computed_tokens + n, len(seq.block_ids))
        if not blocks.can_allocate(need):
            return False
        seq.block_ids += blocks.allocate(need)
        return True

    def _preempt(self, seq: Sequence) -> None:
        """Frees the sequence's KV and queues it for recompute at the head of the line."""
        self._release(seq)
        self.running[seq.rank].remove(seq)
        seq.status, seq.rank, seq.num_computed_tokens = SeqStatus.WAITING, None, 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _release(self, seq: Sequence) -> None:
        self.blocks[seq.rank].free(seq.block_ids)
        if seq.num_blocks_sent or seq.num_computed_tokens:
            self.to_free[seq.rank].append(seq.seq_id)
        seq.block_ids, seq.num_blocks_sent = [], 0

    def _plan(self, rank: int, scheduled: dict[int, int], new: list[Sequence]) -> StepPlan:
        chunks = []
        for seq in self.running[rank]:
            n = scheduled.get(seq.seq_id, 0)
            if n == 0:
                continue
            start = seq.num_computed_tokens
            chunks.append(
                ScheduledChunk(
                    seq.seq_id,
                    seq.token_ids(start, start + n),
                    start,
                    seq.block_ids[seq.num_blocks_sent :],
                    start + n == seq.num_tokens,
                )
            )
            seq.num_blocks_sent = len(seq.block_ids)
        split_micro_batches(chunks, self.config.num_micro_batches)
        freed, self.to_free[rank] = self.to_free[rank], []
        return StepPlan(
            self.step_id,
            self.config.num_micro_batches,
            [_new_sequence(s) for s in new],
            chunks,
            freed,
        )


def _new_sequence(seq: Sequence) -> NewSequence:
    p = seq.params
    spec = SamplingSpec(
        p.temperature,
        p.top_p,
        p.top_k,
        seq.seed,
        p.presence_penalty,
        p.frequency_penalty,
        p.logprobs,
    )
    return NewSequence(seq.seq_id, spec, list(seq.output_token_ids))
