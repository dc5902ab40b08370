"""Messages to an attention rank: the coordinator's step plan (diffs, not the world)."""

from __future__ import annotations

from dataclasses import dataclass, field

from transport.codec import message


@message
@dataclass
class SamplingSpec:
    """What the sampler needs of a request's SamplingParams."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    num_logprobs: int | None = None
    min_p: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    repetition_penalty: float = 1.0
    # the prompt's distinct token ids, only with a repetition penalty; sent once per sequence
    # (NewSequence), the output tokens are tracked on the rank as they are sampled
    prompt_token_ids: list[int] = field(default_factory=list)
    num_prompt_logprobs: int = 0  # top alternatives per scored prompt token


@message
@dataclass
class NewSequence:
    """Sent once when a sequence lands on a rank (or comes back after preemption)."""

    seq_id: int
    sampling: SamplingSpec
    output_token_ids: list[int] = field(default_factory=list)  # for penalties after recompute


@message
@dataclass
class ScheduledChunk:
    """Prompt tokens of one sequence to run this step (a prefill chunk or a recompute)."""

    seq_id: int
    token_ids: list[int]
    start_pos: int  # tokens of this sequence already in the KV cache
    sample: bool  # the chunk ends at the sequence's last token: sample the next one
    micro_batch: int = 0
    # prompt logprobs: row i of the chunk scores prompt token start_pos + 1 + i, whose id is
    # entry i (the last one may be the next chunk's first token); empty: none asked
    prompt_logprob_targets: list[int] = field(default_factory=list)


@message
@dataclass
class TokenMask:
    """The tokens a constrained sequence may sample this step (structured outputs): bit t of
    little-endian 32-bit word t // 32 is set when token t is allowed."""

    seq_id: int
    bitmask: bytes


@message
@dataclass
class StepPlan:
    """One attention rank's step, as diffs against what the rank already knows. Decodes are
    columnar: each continues from its last sampled token at its next position."""

    step: int
    num_micro_batches: int
    new_seqs: list[NewSequence] = field(default_factory=list)
    chunks: list[ScheduledChunk] = field(default_factory=list)
    decode_seq_ids: list[int] = field(default_factory=list)
    decode_micro_batches: list[int] = field(default_factory=list)
    new_block_seq_ids: list[int] = field(default_factory=list)  # block-table growth, as
    new_block_ids: list[int] = field(default_factory=list)  # parallel (seq, block) lists
    freed_seq_ids: list[int] = field(default_factory=list)  # finished or preempted
    token_masks: list[TokenMask] = field(default_factory=list)  # constrained samplers only

    def sampling_seq_ids(self) -> list[int]:
        """The sequences that sample a token this step: decodes and last prompt chunks."""
        return self.decode_seq_ids + [c.seq_id for c in self.chunks if c.sample]

    def tokens_per_micro_batch(self) -> list[int]:
        counts = [0] * self.num_micro_batches
        for chunk in self.chunks:
            counts[chunk.micro_batch] += len(chunk.token_ids)
        for k in self.decode_micro_batches:
            counts[k] += 1
        return counts
