"""The coordinator's scheduler: decides each step, for every attention rank, which sequences
run, which prefill chunks are admitted, the micro-batch split and the KV blocks; emits one
StepPlan per rank carrying diffs (new sequences in full, running ones as deltas, freed ids)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from afd.engine.admission import Admission, AdmitAll
from afd.engine.block_manager import BlockManager, block_hashes
from afd.engine.micro_batches import split_micro_batches
from afd.engine.sequence import SeqStatus, Sequence
from afd.engine.step_plan import new_sequence, scheduled_chunks
from afd.engine.step_time import StepShapeStats
from attn_worker.messages import StepPlan


@dataclass(frozen=True)
class SchedulerConfig:
    num_ranks: int = 1
    num_kv_blocks: int = 1024  # per rank
    block_size: int = 16
    max_num_batched_tokens: int = 2048  # per rank per step
    max_num_seqs: int = 256  # per rank
    num_micro_batches: int = 1
    max_model_len: int = 4096
    enable_prefix_caching: bool = True


@dataclass
class SchedulerOutput:
    step: int
    plans: list[StepPlan]
    scheduled: dict[int, int] = field(default_factory=dict)  # seq_id -> chunk tokens
    decodes: list[Sequence] = field(default_factory=list)  # one token each
    shape: StepShapeStats | None = None


class Scheduler:
    def __init__(self, config: SchedulerConfig, admission: Admission | None = None) -> None:
        self.config = config
        self.admission = admission or AdmitAll()
        self.blocks = [
            BlockManager(config.num_kv_blocks, config.block_size, config.enable_prefix_caching)
            for _ in range(config.num_ranks)
        ]
        self.waiting: deque[Sequence] = deque()
        self.running: list[list[Sequence]] = [[] for _ in range(config.num_ranks)]
        self.to_free: list[list[int]] = [[] for _ in range(config.num_ranks)]
        # block-table growth not yet sent to each rank: parallel (seq id, block id) lists
        self.new_blocks: list[tuple[list[int], list[int]]] = [
            ([], []) for _ in range(config.num_ranks)
        ]
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
        cfg = self.config
        budget = [cfg.max_num_batched_tokens] * cfg.num_ranks
        out = SchedulerOutput(self.step_id, [], {}, [], StepShapeStats.empty(cfg.num_ranks))
        self.admission.begin_step(self.running)
        new_on_rank: list[list[Sequence]] = [[] for _ in range(cfg.num_ranks)]
        pending: list[list[Sequence]] = [[] for _ in range(cfg.num_ranks)]
        decodes = [self._schedule_decodes(r, budget, out, pending[r]) for r in range(cfg.num_ranks)]
        for d in decodes:
            out.decodes += d
        self._schedule_prefills(budget, out, pending)
        self._schedule_waiting(budget, out, new_on_rank)
        out.plans = [
            self._plan(r, out.scheduled, decodes[r], new_on_rank[r]) for r in range(cfg.num_ranks)
        ]
        return out

    def _schedule_decodes(
        self, rank: int, budget: list[int], out: SchedulerOutput, prefilling: list[Sequence]
    ) -> list[Sequence]:
        """Decodes first, oldest first: the hot loop, kept to a few operations a sequence.
        Sequences still in prefill are collected into `prefilling` for the next pass."""
        running, blocks, bs = self.running[rank], self.blocks[rank], self.config.block_size
        seq_ids, block_ids = self.new_blocks[rank]
        chosen, i, work = [], 0, 0
        while i < len(running) and len(chosen) < budget[rank]:
            seq = running[i]
            i += 1
            n = seq.num_tokens
            if n - seq.num_computed_tokens != 1 or not seq.output_token_ids:
                if n > seq.num_computed_tokens:  # its next token is a prompt token
                    prefilling.append(seq)
                continue
            if n > len(seq.block_ids) * bs:
                if not blocks.free:
                    # the newest sequence gives way (it is not chosen yet, or is this one):
                    # either way, look at index i - 1 again
                    self._preempt(running[-1])
                    i -= 1
                    continue
                (block,) = blocks.allocate(1)
                seq.block_ids.append(block)
                seq_ids.append(seq.seq_id)
                block_ids.append(block)
            chosen.append(seq)
            work += n
        budget[rank] -= len(chosen)
        out.shape.tokens[rank] += len(chosen)
        out.shape.work[rank] += work
        return chosen

    def _schedule_prefills(
        self, budget: list[int], out: SchedulerOutput, prefilling: list[list[Sequence]]
    ) -> None:
        """Prefill chunks of running sequences, within the budget and the TPOT target."""
        decoded = {s.seq_id for s in out.decodes}
        for rank, seqs in enumerate(prefilling):
            for seq in seqs:
                if seq.status is not SeqStatus.RUNNING:
                    continue  # preempted earlier in this pass
                n = min(seq.num_remaining_tokens, budget[rank])
                if n > 0:
                    n = self.admission.admit(out.shape, rank, seq, n, new=False)
                while n > 0 and not self._grow(seq, rank, n):
                    victim = self._victim(rank, decoded, out.scheduled)
                    self._preempt(victim)
                    if victim is seq:
                        n = 0
                if n > 0:
                    self._take(out, seq, rank, n, budget)

    def _victim(self, rank: int, decoded: set[int], scheduled: dict[int, int]) -> Sequence:
        """The newest sequence not already running this step (the caller itself at worst)."""
        return next(
            s
            for s in reversed(self.running[rank])
            if s.seq_id not in decoded and s.seq_id not in scheduled
        )

    def _schedule_waiting(
        self, budget: list[int], out: SchedulerOutput, new_on_rank: list[list[Sequence]]
    ) -> None:
        """FCFS: the head of the queue goes to the best rank that can take it now."""
        while self.waiting:
            seq = self.waiting[0]
            placed = next(
                (
                    r
                    for r in self._ranks_for(seq, budget, out.shape)
                    if self._try_admit(seq, r, budget, out)
                ),
                None,
            )
            if placed is None:
                return
            self.waiting.popleft()
            seq.status, seq.rank = SeqStatus.RUNNING, placed
            self.running[placed].append(seq)
            new_on_rank[placed].append(seq)

    def _try_admit(self, seq: Sequence, rank: int, budget: list[int], out: SchedulerOutput) -> bool:
        hits = self.blocks[rank].lookup(self._prompt_hashes(seq))
        seq.num_computed_tokens = seq.num_cached_tokens = len(hits) * self.config.block_size
        n = min(seq.num_remaining_tokens, budget[rank])
        n = self.admission.admit(out.shape, rank, seq, n, new=True)
        if n <= 0 or not self._grow(seq, rank, n, hits):
            seq.num_computed_tokens = seq.num_cached_tokens = 0
            return False
        self.blocks[rank].num_queries += seq.num_tokens
        self.blocks[rank].num_hits += seq.num_cached_tokens
        self._take(out, seq, rank, n, budget)
        return True

    def _take(
        self, out: SchedulerOutput, seq: Sequence, rank: int, n: int, budget: list[int]
    ) -> None:
        out.scheduled[seq.seq_id] = n
        out.shape.add(rank, n, seq.num_computed_tokens + n)
        budget[rank] -= n

    def _ranks_for(self, seq: Sequence, budget: list[int], shape: StepShapeStats) -> list[int]:
        """Ranks that could take `seq`, best first: longest cached prefix, then least work
        this step (every FFN rank waits for the slowest), then most free KV."""
        cfg = self.config
        candidates = [
            r
            for r in range(cfg.num_ranks)
            if budget[r] > 0 and len(self.running[r]) < cfg.max_num_seqs
        ]
        hashes = self._prompt_hashes(seq)
        hits = {r: len(self.blocks[r].lookup(hashes)) if hashes else 0 for r in candidates}
        return sorted(
            candidates,
            key=lambda r: (-hits[r], shape.tokens[r], -self.blocks[r].num_free_blocks, r),
        )

    def _prompt_hashes(self, seq: Sequence) -> list[int]:
        if not self.config.enable_prefix_caching or seq.needs_prompt_logprobs:
            return []  # a prompt to score runs in full: cached positions would go unscored
        # at least the last token is computed, so its logits exist to sample from
        full = (seq.num_tokens - 1) // self.config.block_size
        if len(seq.block_hashes) < full:
            seq.block_hashes = block_hashes(seq.all_token_ids, self.config.block_size, full)
        return seq.block_hashes[:full]

    def _grow(self, seq: Sequence, rank: int, n: int, cached: list[int] | None = None) -> bool:
        blocks, cached = self.blocks[rank], cached or []
        need = blocks.blocks_needed(seq.num_computed_tokens + n, len(seq.block_ids) + len(cached))
        # cached blocks nobody holds sit in the free pool: taking them shrinks it too
        taken_free = sum(1 for b in cached if blocks.ref_count[b] == 0)
        if not blocks.can_allocate(need + taken_free):
            return False
        blocks.acquire(cached)
        added = cached + blocks.allocate(need)
        seq.block_ids += added
        seq_ids, block_ids = self.new_blocks[rank]
        seq_ids += [seq.seq_id] * len(added)
        block_ids += added
        return True

    def computed(self, seq: Sequence) -> None:
        """After a step: make the sequence's newly full blocks findable by later prompts."""
        if not self.config.enable_prefix_caching or seq.rank is None:
            return
        bs = self.config.block_size
        full = min(seq.num_computed_tokens // bs, len(seq.block_ids))
        if seq.num_registered >= full:
            return
        if len(seq.block_hashes) < full:
            seq.block_hashes = block_hashes(seq.all_token_ids, bs, full)
        blocks = self.blocks[seq.rank]
        for b in range(seq.num_registered, full):
            blocks.register(seq.block_ids[b], seq.block_hashes[b])
        seq.num_registered = full

    def _preempt(self, seq: Sequence) -> None:
        """Frees the sequence's KV and queues it for recompute at the head of the line."""
        self._release(seq)
        self.running[seq.rank].remove(seq)
        seq.status, seq.rank, seq.num_computed_tokens = SeqStatus.WAITING, None, 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _release(self, seq: Sequence) -> None:
        self.blocks[seq.rank].free_blocks(seq.block_ids)
        self.to_free[seq.rank].append(seq.seq_id)
        seq.block_ids, seq.num_registered = [], 0

    def _plan(
        self, rank: int, scheduled: dict[int, int], decodes: list[Sequence], new: list[Sequence]
    ) -> StepPlan:
        chunks = scheduled_chunks(self.running[rank], scheduled)
        decode_mbs = split_micro_batches(chunks, decodes, self.config.num_micro_batches)
        freed, self.to_free[rank] = self.to_free[rank], []
        (seq_ids, block_ids), self.new_blocks[rank] = self.new_blocks[rank], ([], [])
        return StepPlan(
            self.step_id,
            self.config.num_micro_batches,
            [new_sequence(s) for s in new],
            chunks,
            [s.seq_id for s in decodes],
            decode_mbs,
            seq_ids,
            block_ids,
            freed,
        )
