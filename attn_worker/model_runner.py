"""Runs one attention rank's step plan: applies the plan's diffs, builds the micro-batches and
drives the layer-by-layer pipeline (ARCHITECTURE.md §3), then samples."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from afd.engine.messages import PromptLogprobs, StepResult, StepTimings
from afd.engine.stage_clock import StageClock
from afd.models.step3 import AttentionSide
from attn_worker.attention import BatchAttention, SeqView
from attn_worker.decode_graphs import DecodeGraphs
from attn_worker.ffn_client import FFNClient, PendingFFN
from attn_worker.kv_cache import KVCache
from attn_worker.messages import ScheduledChunk, StepPlan
from attn_worker.sampler import SeqSamplingState, sample, score_prompt

# prompt rows scored per vocabulary projection: bounds the [rows, V] logits of a long chunk
PROMPT_LOGPROB_ROWS = 512


@dataclass
class _Seq:
    block_table: list[int]
    sampling: SeqSamplingState
    num_computed: int = 0  # tokens in this rank's KV cache


@dataclass
class MicroBatch:
    token_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    attention: BatchAttention
    sample_rows: list[int] = field(default_factory=list)  # rows whose next token is sampled
    sample_seq_ids: list[int] = field(default_factory=list)
    # chunks whose prompt is scored, with the row of their first token
    scored: list[tuple[ScheduledChunk, int]] = field(default_factory=list)


class AttnRunner:
    def __init__(
        self,
        side: AttentionSide,
        cache: KVCache,
        ffn: FFNClient,
        rank: int = 0,
        graphs: DecodeGraphs | None = None,
    ) -> None:
        """graphs: replay decode-only micro-batches' attention blocks (None: all eager)."""
        self.side, self.cache, self.ffn, self.rank = side, cache, ffn, rank
        self.graphs = graphs
        # profiling hook: called with the layer index just before each layer's first block is
        # queued, after that block's wait for the previous layer's FFN output
        self.on_layer: Callable[[int], None] | None = None
        self.device = cache.k.device
        self.seqs: dict[int, _Seq] = {}
        self.scale = side.cfg.head_dim**-0.5
        # device time of the attention blocks, and how long the stream stalled for FFN output
        self.attn_clock, self.wait_clock = StageClock(self.device), StageClock(self.device)

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> StepResult:
        start = time.perf_counter()
        self._apply_diffs(plan)
        work = self._work_items(plan)
        mbs = [
            self._micro_batch([c for c in work if c.micro_batch == k])
            for k in range(plan.num_micro_batches)
        ]
        hidden = self.forward(plan.step, mbs)
        attention_s, wait_s = self.take_stage_s()
        timings = StepTimings(attention=attention_s, ffn_wait=wait_s)
        t0 = time.perf_counter()
        sampled = []
        masks = {m.seq_id: m.bitmask for m in plan.token_masks}
        for mb, h in zip(mbs, hidden, strict=True):
            if mb is not None and mb.sample_rows:
                logits = self.side.logits(h[mb.sample_rows])
                states = {i: self.seqs[i].sampling for i in mb.sample_seq_ids}
                sampled += sample(logits, mb.sample_seq_ids, states, masks)
        prompt_logprobs = [
            self._score_prompt(chunk, h, row)
            for mb, h in zip(mbs, hidden, strict=True)
            if mb is not None
            for chunk, row in mb.scored
        ]
        timings.sampling = time.perf_counter() - t0
        timings.ffn = self.ffn.take_compute_s()
        timings.total = time.perf_counter() - start
        return StepResult(plan.step, self.rank, sampled, timings, prompt_logprobs)

    def _score_prompt(self, chunk: ScheduledChunk, h: torch.Tensor, row: int) -> PromptLogprobs:
        """Prompt logprobs of a chunk's rows, from its hidden states at `row` onwards: only
        these rows pay the vocabulary projection, a slice at a time."""
        targets = chunk.prompt_logprob_targets
        num_top = self.seqs[chunk.seq_id].sampling.spec.num_prompt_logprobs
        out = PromptLogprobs(chunk.seq_id, chunk.start_pos + 1)
        for i in range(0, len(targets), PROMPT_LOGPROB_ROWS):
            part = targets[i : i + PROMPT_LOGPROB_ROWS]
            logits = self.side.logits(h[row + i : row + i + len(part)])  # [R, V]
            score_prompt(logits, part, num_top, out)
        return out

    def _apply_diffs(self, plan: StepPlan) -> None:
        for seq_id in plan.freed_seq_ids:
            self.seqs.pop(seq_id, None)
        for new in plan.new_seqs:
            state = SeqSamplingState(new.sampling, list(new.output_token_ids))
            self.seqs[new.seq_id] = _Seq([], state)
        for seq_id, block in zip(plan.new_block_seq_ids, plan.new_block_ids, strict=True):
            self.seqs[seq_id].block_table.append(block)

    def _work_items(self, plan: StepPlan) -> list[ScheduledChunk]:
        """Prefill chunks as sent, plus each decode as a one-token chunk from the rank's own
        state (its last sampled token at its next position); advances num_computed."""
        items = list(plan.chunks)
        for chunk in plan.chunks:
            self.seqs[chunk.seq_id].num_computed = chunk.start_pos + len(chunk.token_ids)
        for seq_id, k in zip(plan.decode_seq_ids, plan.decode_micro_batches, strict=True):
            seq = self.seqs[seq_id]
            last = seq.sampling.output_token_ids[-1]
            items.append(ScheduledChunk(seq_id, [last], seq.num_computed, True, k))
            seq.num_computed += 1
        return items

    def _micro_batch(self, chunks: list[ScheduledChunk]) -> MicroBatch | None:
        if not chunks:
            return None
        tokens, positions, slots, views = [], [], [], []
        rows, seq_ids, scored = [], [], []
        bs = self.cache.block_size
        for c in chunks:
            table = self.seqs[c.seq_id].block_table
            pos = range(c.start_pos, c.start_pos + len(c.token_ids))
            views.append(
                SeqView(
                    len(tokens),
                    len(c.token_ids),
                    pos.stop,
                    torch.tensor(table[: -(-pos.stop // bs)], device=self.device),
                )
            )
            if c.prompt_logprob_targets:
                scored.append((c, len(tokens)))
            tokens += c.token_ids
            positions += pos
            slots += [table[p // bs] * bs + p % bs for p in pos]
            if c.sample:
                rows.append(len(tokens) - 1)
                seq_ids.append(c.seq_id)
        as_long = lambda xs: torch.tensor(xs, dtype=torch.long, device=self.device)  # noqa: E731
        attention = BatchAttention(self.cache, views, as_long(slots), self.scale)
        return MicroBatch(as_long(tokens), as_long(positions), attention, rows, seq_ids, scored)

    def take_stage_s(self) -> tuple[float, float]:
        """Seconds of attention blocks and of stalls for FFN output since the last call."""
        return self.attn_clock.take_s(), self.wait_clock.take_s()

    def forward(self, step: int, mbs: list[MicroBatch | None]) -> list[torch.Tensor | None]:
        """The final hidden states of each micro-batch after every layer, all transfers of
        the step complete (a peer that never answers raises TransportTimeout)."""
        hidden = self._pipeline(step, mbs)
        self.ffn.settle()
        return hidden

    def _pipeline(self, step: int, mbs: list[MicroBatch | None]) -> list[torch.Tensor | None]:
        """Attention of micro-batch k overlaps the FFN work and transfers of the others. On a
        GPU with the nccl transport nothing here waits on the host: the step is queued and
        the stream orders each block after the FFN output it adds."""
        side, graphs = self.side, self.graphs
        hidden = [None if mb is None else side.embed(mb.token_ids) for mb in mbs]
        replay = [
            None if mb is None or graphs is None else graphs.prepare(mb.positions, mb.attention)
            for mb in mbs
        ]
        rope = [
            None if mb is None or r is not None else side.rope.cos_sin(mb.positions)
            for mb, r in zip(mbs, replay, strict=True)
        ]
        pending: list[PendingFFN | None] = [None] * len(mbs)
        first = next((k for k, mb in enumerate(mbs) if mb is not None), None)
        for layer in range(side.cfg.num_hidden_layers):
            for k, mb in enumerate(mbs):
                if mb is None:
                    continue
                if pending[k] is not None:
                    hidden[k] = self._add_ffn(hidden[k], pending[k])
                if k == first and self.on_layer is not None:
                    self.on_layer(layer)  # after the wait: where this layer's work starts
                with self.attn_clock.span():
                    if replay[k] is not None:
                        hidden[k], x, routing = graphs.run(layer, hidden[k], replay[k])
                    else:
                        cos, sin = rope[k]
                        block = side.layer(layer)
                        hidden[k], x, routing = block(hidden[k], cos, sin, mb.attention.at(layer))
                pending[k] = self.ffn.submit(step, layer, k, x, routing)
        for k, p in enumerate(pending):
            if p is not None:
                hidden[k] = self._add_ffn(hidden[k], p)
        return hidden

    def _add_ffn(self, h: torch.Tensor, pending: PendingFFN) -> torch.Tensor:
        with self.wait_clock.span():
            out = pending.wait()
        return h + out
