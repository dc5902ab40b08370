"""The coordinator's step loop: step() = schedule -> execute -> update. The only owner of
request state; works in token ids (text, stop strings and detokenizing live in the
OutputProcessor on the client side)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from afd.engine.executor import Executor
from afd.engine.grammar import Grammars
from afd.engine.messages import PromptLogprobs, SampledToken, StepResult
from afd.engine.scheduler import Scheduler, SchedulerOutput
from afd.engine.sequence import SeqStatus, Sequence
from afd.engine.step_time import StepTimeModel
from afd.sampling_params import SamplingError

log = logging.getLogger(__name__)


class EngineCore:
    def __init__(
        self,
        scheduler: Scheduler,
        executor: Executor,
        eos_token_ids: tuple[int, ...],
        max_model_len: int,
        step_model: StepTimeModel | None = None,
        clock: Callable[[], float] = time.monotonic,
        grammars: Grammars | str | None = None,
    ) -> None:
        """grammars: the structured-outputs matcher store, or why there is none (requests
        with structured_outputs then fail with that reason)."""
        self.scheduler, self.executor = scheduler, executor
        self._grammars = grammars if isinstance(grammars, Grammars) else None
        self._no_grammars = grammars if isinstance(grammars, str) else "no tokenizer"
        self.eos_token_ids, self.max_model_len = set(eos_token_ids), max_model_len
        self.seqs: dict[int, Sequence] = {}
        self.last_output: SchedulerOutput | None = None
        self.last_results: list[StepResult] = []
        self.last_schedule_s = 0.0
        self.last_predicted_s = 0.0
        self.step_model = step_model or StepTimeModel()
        self.clock = clock  # tests drive a virtual clock

    def add(self, seq: Sequence) -> None:
        """Queues a sequence; SamplingError if its structured_outputs cannot be enforced."""
        spec = seq.params.structured_outputs
        if spec is not None:
            if self._grammars is None:
                raise SamplingError(f"structured outputs are unavailable: {self._no_grammars}")
            self._grammars.start(seq.seq_id, spec, seq.output_token_ids)
        self.seqs[seq.seq_id] = seq
        self.scheduler.add(seq)

    def abort(self, seq_ids: list[int], reason: str = "abort") -> list[Sequence]:
        aborted = []
        for seq_id in seq_ids:
            seq = self.seqs.pop(seq_id, None)
            if seq is not None and not seq.finished:
                self.scheduler.finish(seq, reason)
                aborted.append(seq)
            if self._grammars is not None:
                self._grammars.finish(seq_id)
        return aborted

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def step(self) -> list[Sequence]:
        """Runs one step; returns the sequences that got a token or finished."""
        start = time.perf_counter()
        out = self.scheduler.schedule()
        self.last_output, self.last_schedule_s = out, time.perf_counter() - start
        if not out.scheduled and not out.decodes and not any(p.freed_seq_ids for p in out.plans):
            return []
        self.last_predicted_s = self.step_model.predict(out.shape)
        if self._grammars is not None and self._grammars.matchers:
            ids = [plan.sampling_seq_ids() for plan in out.plans]
            masks = self._grammars.masks([i for rank in ids for i in rank])  # one batch
            for plan, rank in zip(out.plans, ids, strict=True):
                plan.token_masks = [masks[i] for i in rank if i in masks]
        t0 = self.clock()
        self.last_results = self.executor.execute(out.plans)
        self.step_model.observe(out.shape, self.clock() - t0)
        return self.update(out, self.last_results)

    def update(self, out: SchedulerOutput, results: list[StepResult]) -> list[Sequence]:
        for seq_id, n in out.scheduled.items():
            seq = self.seqs[seq_id]
            seq.num_computed_tokens += n
            self.scheduler.computed(seq)
        bs = self.scheduler.config.block_size
        for seq in out.decodes:
            seq.num_computed_tokens += 1
            if seq.num_computed_tokens % bs == 0:  # a block just filled
                self.scheduler.computed(seq)
        now = self.clock()
        changed = []
        for result in results:
            for chunk in result.prompt_logprobs:  # before the first token, which may finish it
                seq = self.seqs.get(chunk.seq_id)
                if seq is not None and seq.status is SeqStatus.RUNNING:
                    _add_prompt_logprobs(seq, chunk)
            for token in result.sampled:
                seq = self.seqs.get(token.seq_id)
                if seq is None or seq.status is not SeqStatus.RUNNING:
                    continue
                self._append(seq, token, now)
                changed.append(seq)
        for seq in changed:
            if seq.finished:
                self.seqs.pop(seq.seq_id, None)
                if self._grammars is not None:
                    self._grammars.finish(seq.seq_id)
        return changed

    def _append(self, seq: Sequence, token: SampledToken, now: float) -> None:
        seq.output_token_ids.append(token.token_id)
        if seq.params.logprobs is not None:
            assert token.logprobs is not None, f"seq {seq.seq_id} asked for logprobs, got none"
            seq.output_logprobs.append(token.logprobs)
        seq.first_token_time = seq.first_token_time or now
        seq.last_token_time = now
        reason = self._stop_reason(seq, token.token_id)
        grammar = (
            None if self._grammars is None else self._grammars.advance(seq.seq_id, token.token_id)
        )
        if reason is None and grammar == "stop":  # the EOS after a complete grammar
            reason = ("stop", None)
        elif grammar not in (None, "stop"):  # the grammar refused a token its mask allowed
            log.error("seq %d: structured output rejected token %d: %s", seq.seq_id,
                      token.token_id, grammar)  # fmt: skip
            reason = ("abort", None)
        if reason is not None:
            self.scheduler.finish(seq, *reason)

    def _stop_reason(self, seq: Sequence, token: int) -> tuple[str, int | None] | None:
        p = seq.params
        if token in p.stop_token_ids:
            return "stop", token
        if token in self.eos_token_ids and not p.ignore_eos:
            return "stop", None
        max_out = p.max_tokens if p.max_tokens is not None else self.max_model_len
        if len(seq.output_token_ids) >= max_out or seq.num_tokens >= self.max_model_len:
            return "length", None
        return None


def _add_prompt_logprobs(seq: Sequence, chunk: PromptLogprobs) -> None:
    """Chunks arrive in prompt order; one from position 1 starts over (a recompute after a
    preemption in the middle of the prefill)."""
    if chunk.start == 1:
        seq.prompt_logprobs = []
    assert chunk.start == 1 + sum(len(c) for c in seq.prompt_logprobs), "prompt logprobs gap"
    seq.prompt_logprobs.append(chunk)
