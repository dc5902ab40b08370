"""Sampler of an attention rank: logit bias, penalties, temperature, top-k, min-p, top-p,
seeded draws, logprobs (of the raw distribution, as vLLM returns them by default).

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
    """logits [S, V] float32 (raw model output) -> one token per row.

    Rows that need nothing but argmax (greedy, no penalties) are picked in one batched op and
    moved to the host together: a per-row loop would sync with the GPU once per sequence."""
    logprobs = torch.log_softmax(logits, dim=-1)  # logprobs of the raw distribution, as vLLM
    specs = [states[i].spec for i in seq_ids]
    tokens = torch.argmax(logits, dim=-1).tolist()  # [S]
    chosen = torch.gather(logprobs, 1, torch.tensor(tokens, device=logits.device)[:, None])
    values = chosen[:, 0].tolist()  # [S]
    out = []
    for row, (seq_id, spec) in enumerate(zip(seq_ids, specs, strict=True)):
        state = states[seq_id]
        if not _plain_greedy(spec):
            tokens[row] = _pick(logits[row], state)
            values[row] = float(logprobs[row, tokens[row]])
        state.output_token_ids.append(tokens[row])
        out.append(SampledToken(seq_id, tokens[row], values[row]))
    _add_top_logprobs(out, logprobs, specs)
    return out


def _plain_greedy(spec: SamplingSpec) -> bool:
    return (
        spec.temperature == 0.0
        and spec.presence_penalty == 0
        and spec.frequency_penalty == 0
        and not spec.logit_bias
    )


def _add_top_logprobs(
    out: list[SampledToken], logprobs: torch.Tensor, specs: list[SamplingSpec]
) -> None:
    """Top-k logprobs for the rows that asked, from one topk over the largest k."""
    k = max((s.num_logprobs or 0 for s in specs), default=0)
    if k == 0:
        return
    values, ids = torch.topk(logprobs, k, dim=-1)  # [S, k]
    values, ids = values.tolist(), ids.tolist()
    for row, (token, spec) in enumerate(zip(out, specs, strict=True)):
        if spec.num_logprobs:
            token.top_ids = ids[row][: spec.num_logprobs]
            token.top_logprobs = values[row][: spec.num_logprobs]


def _pick(logits: torch.Tensor, state: SeqSamplingState) -> int:
    spec = state.spec
    logits = _penalise(_bias(logits, spec), state)
    if spec.temperature == 0.0:
        return int(torch.argmax(logits))
    logits = logits / spec.temperature
    if spec.top_k > 0 and spec.top_k < logits.shape[-1]:
        kth = torch.topk(logits, spec.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if spec.min_p > 0.0:  # relative to the most likely token, after temperature
        probs = probs.masked_fill(probs < spec.min_p * probs.max(), 0.0)
    if spec.top_p < 1.0:
        probs = _top_p(probs, spec.top_p)
    gen = None
    if spec.seed is not None:
        gen = torch.Generator(device=probs.device)
        gen.manual_seed((spec.seed * 1_000_003 + len(state.output_token_ids)) % (2**63))
    return int(torch.multinomial(probs, 1, generator=gen))


def _bias(logits: torch.Tensor, spec: SamplingSpec) -> torch.Tensor:
    if not spec.logit_bias:
        return logits
    ids = torch.tensor(list(spec.logit_bias), dtype=torch.long, device=logits.device)
    bias = torch.tensor(list(spec.logit_bias.values()), dtype=logits.dtype, device=logits.device)
    return logits.index_add(0, ids, bias)


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
