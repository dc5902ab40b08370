"""Sampler of an attention rank: penalties, temperature, top-k, top-p, seeded draws, logprobs.

Seeded draws depend only on (seed, output index), so a sequence samples the same tokens
whatever its batch, micro-batch or rank, and after preemption and recompute."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from afd.engine.messages import SampledToken
from attn_worker.messages import SamplingSpec


@dataclass
class SeqSamplingState:
    spec: SamplingSpec
    output_token_ids: list[int] = field(default_factory=list)


def sample(
    logits: torch.Tensor, seq_ids: list[int], states: dict[int, SeqSamplingState]
) -> list[SampledToken]:
    """logits [S, V] float32 (raw model output) -> one token per row."""
    logprobs = torch.log_softmax(logits, dim=-1)  # logprobs of the raw distribution, as vLLM
    out = []
    for row, seq_id in enumerate(seq_ids):
        state = states[seq_id]
        token = _pick(logits[row], state)
        state.output_token_ids.append(token)
        out.append(_with_logprobs(seq_id, token, logprobs[row], state.spec.num_logprobs))
    return out


def _pick(logits: torch.Tensor, state: SeqSamplingState) -> int:
    spec = state.spec
    logits = _penalise(logits, state)
    if spec.temperature == 0.0:
        return int(torch.argmax(logits))
    logits = logits / spec.temperature
    if spec.top_k > 0 and spec.top_k < logits.shape[-1]:
        kth = torch.topk(logits, spec.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if spec.top_p < 1.0:
        probs = _top_p(probs, spec.top_p)
    gen = None
    if spec.seed is not None:
        gen = torch.Generator(device=probs.device)
        gen.manual_seed((spec.seed * 1_000_003 + len(state.output_token_ids)) % (2**63))
    return int(torch.multinomial(probs, 1, generator=gen))


def _penalise(logits: torch.Tensor, state: SeqSamplingState) -> torch.Tensor:
    spec = state.spec
    if not state.output_token_ids or (spec.presence_penalty == 0 and spec.frequency_penalty == 0):
        return logits
    ids = torch.tensor(state.output_token_ids, device=logits.device)
    counts = torch.bincount(ids, minlength=logits.shape[-1]).to(logits.dtype)
    return logits - spec.frequency_penalty * counts - spec.presence_penalty * (counts > 0)


def _top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    sorted_p, order = torch.sort(probs, descending=True)
    keep = (sorted_p.cumsum(-1) - sorted_p) < top_p  # always keeps the most likely token
    sorted_p = sorted_p * keep
    return torch.zeros_like(probs).scatter_(0, order, sorted_p)


def _with_logprobs(seq_id: int, token: int, logprobs: torch.Tensor, k: int | None) -> SampledToken:
    result = SampledToken(seq_id, token, float(logprobs[token]))
    if k:
        values, ids = torch.topk(logprobs, k)
        result.top_ids, result.top_logprobs = ids.tolist(), values.tolist()
    return result
