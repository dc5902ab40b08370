"""The wire form of what the scheduler chose for one rank: each scheduled prefill chunk and
each sequence new to the rank, as its StepPlan carries them."""

from __future__ import annotations

from afd.engine.sequence import Sequence
from attn_worker.messages import NewSequence, SamplingSpec, ScheduledChunk


def scheduled_chunks(running: list[Sequence], scheduled: dict[int, int]) -> list[ScheduledChunk]:
    """The chunk of every running sequence with tokens scheduled (seq_id -> n), in order."""
    chunks = []
    for seq in running:
        n = scheduled.get(seq.seq_id, 0)
        if n:
            start = seq.num_computed_tokens
            chunk = ScheduledChunk(
                seq.seq_id, seq.token_ids(start, start + n), start, start + n == seq.num_tokens
            )
            if seq.needs_prompt_logprobs:  # rows score the next tokens, to the prompt's last
                chunk.prompt_logprob_targets = seq.prompt_token_ids[start + 1 : start + n + 1]
            chunks.append(chunk)
    return chunks


def new_sequence(seq: Sequence) -> NewSequence:
    """The sequence as a rank first sees it, or sees it again after preemption."""
    p = seq.params
    spec = SamplingSpec(
        p.temperature,
        p.top_p,
        p.top_k,
        seq.seed,
        p.presence_penalty,
        p.frequency_penalty,
        p.logprobs,
        p.min_p,
        dict(p.logit_bias),
        p.repetition_penalty,
        sorted(set(seq.prompt_token_ids)) if p.repetition_penalty != 1.0 else [],
        p.prompt_logprobs or 0,
    )
    return NewSequence(seq.seq_id, spec, list(seq.output_token_ids))
