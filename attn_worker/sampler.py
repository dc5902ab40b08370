"""Sampler of an attention rank: logit bias, penalties, temperature, top-k, min-p, top-p,
seeded draws, logprobs of sampled and of prompt tokens (of the raw distribution, as vLLM
returns them by default).

Every knob is a batched tensor op over the rows that need more than argmax; a row that does
not use a knob gets its neutral value. Seeded draws depend only on (seed, output index), so a
sequence samples the same tokens whatever its batch, micro-batch or rank, and after
preemption and recompute."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from afd.engine.messages import PromptLogprobs, SampledToken, TokenLogprobs
from attn_worker.messages import SamplingSpec


@dataclass
class SeqSamplingState:
    spec: SamplingSpec
    output_token_ids: list[int] = field(default_factory=list)
    prompt_ids: torch.Tensor | None = None  # spec.prompt_token_ids on the device, made once


def sample(
    logits: torch.Tensor,
    seq_ids: list[int],
    states: dict[int, SeqSamplingState],
    masks: dict[int, bytes] | None = None,
) -> list[SampledToken]:
    """logits [S, V] float32 (raw model output) -> one token per row.

    Plain greedy rows are argmax of the (masked) logits; the others go through `_pick`
    together.
    `masks` (structured outputs): seq id -> bitmask of the tokens it may sample; the others
    get -inf before any knob, while logprobs stay those of the raw distribution. Tokens reach
    the host in one transfer: a per-row loop would sync with the GPU once per sequence."""
    rows = [states[i] for i in seq_ids]
    raw = logits
    if masks:  # in place unless logprobs, which are of the raw distribution, are asked for
        keep_raw = any(state.spec.num_logprobs is not None for state in rows)
        logits = apply_token_masks(logits, seq_ids, masks, in_place=not keep_raw)
    tokens = torch.argmax(logits, dim=-1)  # [S]
    picked = [r for r, state in enumerate(rows) if not _plain_greedy(state.spec)]
    if picked:
        idx = torch.tensor(picked, device=logits.device)
        tokens[idx] = _pick(logits[idx], [rows[r] for r in picked])
    out = []
    for seq_id, state, token in zip(seq_ids, rows, tokens.tolist(), strict=True):
        state.output_token_ids.append(token)
        out.append(SampledToken(seq_id, token))
    _add_logprobs(out, raw, tokens, [state.spec for state in rows])
    return out


def apply_token_masks(
    logits: torch.Tensor, seq_ids: list[int], masks: dict[int, bytes], in_place: bool = False
) -> torch.Tensor:
    """logits [S, V] with each masked row's disallowed tokens at -inf (bit t of the
    little-endian bitmask set: token t allowed), in a copy unless `in_place`. Unpacked a byte
    at a time: one bool per token of each masked row on the device."""
    rows = [r for r, i in enumerate(seq_ids) if i in masks]
    if not rows:
        return logits
    packed = bytearray(b"".join(masks[seq_ids[r]] for r in rows))
    octets = torch.frombuffer(packed, dtype=torch.uint8).view(len(rows), -1)  # [M, 4 W]
    octets = octets.to(logits.device)
    bits = torch.arange(8, dtype=torch.uint8, device=logits.device)
    allowed = ((octets[:, :, None] >> bits) & 1).bool().flatten(1)  # [M, 32 W]
    vocab = logits.shape[1]
    if allowed.shape[1] < vocab:  # ids past the mask's width are never allowed
        allowed = torch.nn.functional.pad(allowed, (0, vocab - allowed.shape[1]))
    idx = torch.tensor(rows, device=logits.device)
    masked = logits[idx].masked_fill(~allowed[:, :vocab], float("-inf"))
    return logits.index_copy_(0, idx, masked) if in_place else logits.index_copy(0, idx, masked)


def score_prompt(
    logits: torch.Tensor, targets: list[int], num_top: int, out: PromptLogprobs
) -> None:
    """logits [R, V] (raw) at R prompt positions -> the logprob and rank of the prompt token
    that follows each (targets [R]) and the `num_top` most likely tokens, of the raw
    distribution as for sampled tokens; appended to `out`."""
    logprobs = torch.log_softmax(logits, dim=-1)  # [R, V]
    ids = torch.tensor(targets, device=logits.device)[:, None]  # [R, 1]
    chosen = logprobs.gather(1, ids)  # [R, 1]
    ranks = (logprobs >= chosen).sum(-1)  # [R]; vLLM's rank: 1 is the most likely
    values, top = torch.topk(logprobs, num_top, dim=-1)  # [R, k]; k = 0: empty rows
    # one device-to-host copy: float64 holds the fp32 logprobs and the integer ids and ranks
    # exactly
    cols = [chosen, ranks[:, None], values, top]
    for row in torch.cat([c.to(torch.float64) for c in cols], dim=1).tolist():  # [R, 2 + 2k]
        out.logprobs.append(row[0])
        out.ranks.append(int(row[1]))
        out.top_logprobs.append(row[2 : 2 + num_top])
        out.top_ids.append([int(t) for t in row[2 + num_top :]])


def _plain_greedy(spec: SamplingSpec) -> bool:
    return spec.temperature == 0.0 and not _penalised(spec) and not spec.logit_bias


def _penalised(spec: SamplingSpec) -> bool:
    return (
        spec.presence_penalty != 0.0
        or spec.frequency_penalty != 0.0
        or spec.repetition_penalty != 1.0
    )


def _add_logprobs(
    out: list[SampledToken], logits: torch.Tensor, tokens: torch.Tensor, specs: list[SamplingSpec]
) -> None:
    """The sampled token's logprob and rank and the top-k, of the raw distribution as vLLM
    returns them by default, for the rows that asked: computed for all rows at once, with one
    topk over the largest k, and brought to the host in two transfers."""
    if all(spec.num_logprobs is None for spec in specs):
        return
    k = max(spec.num_logprobs or 0 for spec in specs)
    logprobs = torch.log_softmax(logits, dim=-1)  # [S, V]
    chosen = logprobs.gather(1, tokens[:, None])  # [S, 1]
    ranks = (logprobs >= chosen).sum(-1, keepdim=True)  # [S, 1]; vLLM's rank: 1 is the top
    values, ids = torch.topk(logprobs, k, dim=-1)  # [S, k]; k = 0: empty rows
    floats = torch.cat([chosen, values], dim=1).tolist()  # [S, 1 + k]
    ints = torch.cat([ranks, ids], dim=1).tolist()  # [S, 1 + k]
    for token, spec, f, i in zip(out, specs, floats, ints, strict=True):
        if spec.num_logprobs is not None:
            n = spec.num_logprobs + 1
            token.logprobs = TokenLogprobs(f[0], i[0], i[1:n], f[1:n])


def _pick(logits: torch.Tensor, states: list[SeqSamplingState]) -> torch.Tensor:
    """logits [P, V] -> tokens [P]: bias and penalties for all rows, then argmax for greedy
    rows and a draw from the filtered distribution for the others."""
    specs = [state.spec for state in states]
    logits = _penalise(_bias(logits, specs), states)
    tokens = torch.argmax(logits, dim=-1)  # [P]
    drawn = [r for r, spec in enumerate(specs) if spec.temperature != 0.0]
    if drawn:
        idx = torch.tensor(drawn, device=logits.device)
        probs, fallback = sampling_probs(logits[idx], [specs[r] for r in drawn])
        tokens[idx] = _draw(probs, fallback, [states[r] for r in drawn])
    return tokens


TOP_P_CANDIDATES = 1024
TOP_P_ONE = 1.0 - 2.0**-25  # top_p values from here round to 1.0 in float32: no top-p


def _column(values: list[float], like: torch.Tensor) -> torch.Tensor:
    """One value per row as a [R, 1] column that broadcasts over the vocabulary."""
    return torch.tensor(values, dtype=like.dtype, device=like.device)[:, None]


def sampling_probs(
    logits: torch.Tensor, specs: list[SamplingSpec]
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [R, V] (temperature > 0) -> (probs [R, V], fallback [R]).

    probs: after temperature, top-k, min-p (relative to the most likely token, after
    temperature) and top-p. Filtered-out tokens get 0; the rest are not renormalised (draws do
    not need it). A row is a distribution exactly when its largest filtered logit is finite
    (top-k, min-p and top-p keep the top token). One that is not (a penalty or bias made a
    logit infinite, no token is allowed, a NaN) must not be drawn from: that raises and ends
    the rank. `fallback` holds such a row's most likely token, and -1 for the others."""
    logits = logits / _column([s.temperature for s in specs], logits)
    vocab = logits.shape[-1]
    k = [s.top_k if 0 < s.top_k < vocab else 0 for s in specs]  # 0: no top-k for this row
    if any(k):
        ks = torch.tensor(k, device=logits.device)[:, None]  # [R, 1]
        top = torch.topk(logits, max(k), dim=-1).values  # [R, max k]
        kth = top.gather(1, (ks - 1).clamp(min=0))
        kth = kth.masked_fill(ks == 0, float("-inf"))
        logits = logits.masked_fill(logits < kth, float("-inf"))
    best, most_likely = logits.max(dim=-1)  # NaN wins max, as +inf does
    fallback = most_likely.masked_fill(torch.isfinite(best), -1)
    probs = torch.softmax(logits, dim=-1)
    if any(s.min_p > 0.0 for s in specs):
        floor = _column([s.min_p for s in specs], probs) * probs.max(dim=-1, keepdim=True).values
        probs = probs.masked_fill(probs < floor, 0.0)
    cut = [r for r, s in enumerate(specs) if s.top_p < TOP_P_ONE]
    if len(cut) == len(specs):
        probs = _top_p(probs, [s.top_p for s in specs])
    elif cut:
        idx = torch.tensor(cut, device=probs.device)
        probs[idx] = _top_p(probs[idx], [specs[r].top_p for r in cut])
    return probs, fallback


def _top_p(probs: torch.Tensor, top_p: list[float]) -> torch.Tensor:
    """Keeps, in each row, the most likely tokens until their sum reaches p (every p < 1).

    Sorting the whole vocabulary took 4.3 ms for 256 rows of Step3's 128,815 tokens on an
    H100. A row's nucleus nearly always lies among its top TOP_P_CANDIDATES tokens, where a
    top-k finds it; only the rows whose nucleus is wider are sorted whole. Which rows those
    are reaches the host (one sync a call), and each row's path depends on that row alone,
    so a seeded row keeps its tokens whatever its batch."""
    p = _column(top_p, probs)  # [R, 1]
    sorted_p, order = torch.topk(probs, min(TOP_P_CANDIDATES, probs.shape[-1]), dim=-1)
    out = _nucleus(probs, sorted_p, order, p)
    if sorted_p.shape[-1] < probs.shape[-1]:
        mass = sorted_p.sum(-1, keepdim=True)
        # covered: the candidates reach p, or nothing is left past them (min-p zeroed the
        # rest), or the row is no distribution (sampling_probs' fallback replaces it)
        covered = (mass >= p) | (sorted_p[:, -1:] == 0) | ~torch.isfinite(mass)
        wide = (~covered[:, 0]).nonzero()[:, 0].tolist()
        if wide:
            idx = torch.tensor(wide, device=probs.device)
            rows = probs[idx]
            out[idx] = _nucleus(rows, *torch.sort(rows, dim=-1, descending=True), p[idx])
    return out


def _nucleus(
    probs: torch.Tensor, sorted_p: torch.Tensor, order: torch.Tensor, p: torch.Tensor
) -> torch.Tensor:
    """probs with only the nucleus kept, from its most likely tokens in descending order."""
    keep = (sorted_p.cumsum(-1) - sorted_p) < p  # tokens past these have more than p above
    keep[:, 0] = True  # the most likely token, also where p rounds to 0 in float32
    return torch.zeros_like(probs).scatter_(-1, order, sorted_p * keep)


def _draw(
    probs: torch.Tensor, fallback: torch.Tensor, states: list[SeqSamplingState]
) -> torch.Tensor:
    """probs [R, V] -> tokens [R]: the rows race exponentials (argmax of p / E with E ~ Exp(1)
    picks token i with probability p_i), together and without a host sync. A seeded row's E
    comes from its own generator, so its draw depends only on (seed, output index). Rows with
    a fallback (sampling_probs) take it: they have no distribution to draw from."""
    exp = torch.empty_like(probs).exponential_()
    for r, state in enumerate(states):
        if state.spec.seed is not None:
            gen = torch.Generator(device=probs.device)
            gen.manual_seed((state.spec.seed * 1_000_003 + len(state.output_token_ids)) % (2**63))
            exp[r].exponential_(generator=gen)
    race = probs / exp.clamp_(min=torch.finfo(exp.dtype).tiny)  # a 0 draw is no NaN
    return torch.where(fallback >= 0, fallback, torch.argmax(race, dim=-1))


def _bias(logits: torch.Tensor, specs: list[SamplingSpec]) -> torch.Tensor:
    rows, ids, bias = [], [], []
    for r, spec in enumerate(specs):
        rows += [r] * len(spec.logit_bias)
        ids += spec.logit_bias.keys()
        bias += spec.logit_bias.values()
    if not rows:
        return logits
    index = torch.tensor(rows, device=logits.device), torch.tensor(ids, device=logits.device)
    values = torch.tensor(bias, dtype=logits.dtype, device=logits.device)
    return logits.index_put(index, values, accumulate=True)


def _penalise(logits: torch.Tensor, states: list[SeqSamplingState]) -> torch.Tensor:
    """Repetition penalty over prompt and output tokens (vLLM / HF: positive logits divided
    by it, the others multiplied), then frequency and presence penalties over output tokens."""
    specs = [state.spec for state in states]
    if not any(_penalised(spec) for spec in specs):
        return logits
    counts = _output_counts(logits, states)  # [P, V]
    if any(spec.repetition_penalty != 1.0 for spec in specs):
        rep = _column([spec.repetition_penalty for spec in specs], logits)
        seen = (counts > 0) | _prompt_mask(logits, states)
        logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
    frequency = _column([spec.frequency_penalty for spec in specs], logits)
    presence = _column([spec.presence_penalty for spec in specs], logits)
    return logits - frequency * counts - presence * (counts > 0)


def _output_counts(logits: torch.Tensor, states: list[SeqSamplingState]) -> torch.Tensor:
    """[P, V] how often each token was generated, for the rows with a penalty (0 elsewhere)."""
    rows, ids = [], []
    for r, state in enumerate(states):
        if _penalised(state.spec):
            rows += [r] * len(state.output_token_ids)
            ids += state.output_token_ids
    counts = torch.zeros_like(logits)
    if rows:
        index = torch.tensor(rows, device=logits.device), torch.tensor(ids, device=logits.device)
        counts.index_put_(
            index, torch.ones(len(rows), dtype=logits.dtype, device=logits.device), accumulate=True
        )
    return counts


def _prompt_mask(logits: torch.Tensor, states: list[SeqSamplingState]) -> torch.Tensor:
    """[P, V] bool: the token appears in the row's prompt (rows with a repetition penalty)."""
    mask = torch.zeros_like(logits, dtype=torch.bool)
    rows, ids = [], []
    for r, state in enumerate(states):
        if state.spec.repetition_penalty != 1.0 and state.spec.prompt_token_ids:
            if state.prompt_ids is None:
                state.prompt_ids = torch.tensor(state.spec.prompt_token_ids, device=logits.device)
            rows.append(torch.full_like(state.prompt_ids, r))
            ids.append(state.prompt_ids)
    if rows:
        mask[torch.cat(rows), torch.cat(ids)] = True
    return mask
