"""Client-side output processing: turns the coordinator's token updates into cumulative
RequestOutputs (incremental detokenizing, stop strings). A stop-string hit finishes the choice
and asks the caller to abort its sequence in the engine."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

from afd.detokenizer import IncrementalDetokenizer, find_stop, safe_emit_length
from afd.engine.messages import TokenLogprobs
from afd.engine.sequence import Sequence
from afd.outputs import CompletionOutput, Logprob, RequestOutput
from afd.sampling_params import SamplingParams
from afd.tokenizer import Tokenizer


@dataclass
class _Choice:
    seq: Sequence
    detok: IncrementalDetokenizer | None
    text: str = ""
    num_seen: int = 0  # output tokens already detokenized
    logprobs: list[dict[int, Logprob]] = field(default_factory=list)  # of those tokens, if asked
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class _Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    choices: list[_Choice] = field(default_factory=list)
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None  # made once, when complete


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer | None) -> None:
        self.tokenizer = tokenizer
        self.requests: dict[str, _Request] = {}
        self.by_seq: dict[int, tuple[_Request, _Choice]] = {}
        self.token_text = lru_cache(maxsize=1 << 16)(self._decode_token)

    def add(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        params: SamplingParams,
        seqs: list[Sequence],
    ) -> None:
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; use stop_token_ids instead")
        req = _Request(request_id, prompt, prompt_token_ids, params)
        for seq in seqs:
            detok = None
            if self.tokenizer is not None:
                detok = IncrementalDetokenizer(
                    self.tokenizer, prompt_token_ids, params.skip_special_tokens
                )
            choice = _Choice(seq, detok)
            req.choices.append(choice)
            self.by_seq[seq.seq_id] = (req, choice)
        self.requests[request_id] = req

    def process(self, changed: list[Sequence]) -> tuple[list[RequestOutput], list[int]]:
        """Returns the updated requests' outputs and the seq ids to abort (stop strings)."""
        touched: dict[str, _Request] = {}
        to_abort: list[int] = []
        for seq in changed:
            entry = self.by_seq.get(seq.seq_id)
            if entry is None:
                continue
            req, choice = entry
            if self._advance(req.params, choice):
                to_abort.append(seq.seq_id)
            touched[req.request_id] = req
        return [self._output(r) for r in touched.values()], to_abort

    def fail(self, request_id: str, reason: str) -> RequestOutput | None:
        """Finishes every open choice of a request with `reason` (abort or error)."""
        req = self.requests.get(request_id)
        if req is None:
            return None
        for choice in req.choices:
            choice.finish_reason = choice.finish_reason or reason
        return self._output(req)

    def _advance(self, params: SamplingParams, choice: _Choice) -> bool:
        """Detokenizes new tokens; True when a stop string just finished the choice."""
        if choice.finish_reason is not None:
            return False
        seq = choice.seq
        new = seq.output_token_ids[choice.num_seen :]
        if params.logprobs is not None:
            records = seq.output_logprobs[choice.num_seen : len(seq.output_token_ids)]
            choice.logprobs += [self._table(t, r) for t, r in zip(new, records, strict=True)]
        choice.num_seen = len(seq.output_token_ids)
        keep_stop = params.include_stop_str_in_output
        if seq.finished and seq.finish_reason == "stop" and new and not keep_stop:
            new = new[:-1]  # the EOS or stop token ends the text; vLLM keeps it only if asked
        if choice.detok is not None:
            before = len(choice.text)
            choice.text += choice.detok.add_many(new)
            if seq.finished:
                choice.text += choice.detok.flush()
            if params.stop:
                longest = max(len(s) for s in params.stop)
                text, hit = find_stop(
                    choice.text,
                    params.stop,
                    params.include_stop_str_in_output,
                    before - longest + 1,
                )
                if hit is not None:
                    choice.text, choice.finish_reason, choice.stop_reason = text, "stop", hit
                    return not seq.finished
        if seq.finished:
            choice.finish_reason, choice.stop_reason = seq.finish_reason, seq.stop_reason
        return False

    def _output(self, req: _Request) -> RequestOutput:
        outs = [
            CompletionOutput(
                index=c.seq.index,
                text=_visible(c, req.params),
                token_ids=c.seq.output_token_ids[: c.num_seen],
                logprobs=list(c.logprobs) if req.params.logprobs is not None else None,
                finish_reason=c.finish_reason,
                stop_reason=c.stop_reason,
            )
            for c in req.choices
        ]
        finished = all(o.finish_reason is not None for o in outs)
        if finished:
            self.requests.pop(req.request_id, None)
            for c in req.choices:
                self.by_seq.pop(c.seq.seq_id, None)
        out = RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, outs, finished)
        out.prompt_logprobs = self._prompt_logprobs(req)
        return out

    def _prompt_logprobs(self, req: _Request) -> list[dict[int, Logprob] | None] | None:
        """vLLM's tables, from the first choice's chunks once they cover the prompt."""
        if req.prompt_logprobs is not None or req.params.prompt_logprobs is None:
            return req.prompt_logprobs
        seq = next(c.seq for c in req.choices if c.seq.index == 0)
        if not seq.has_prompt_logprobs:
            return None
        tables: list[dict[int, Logprob] | None] = [None]
        for chunk in seq.prompt_logprobs:
            tokens = seq.prompt_token_ids[chunk.start : chunk.start + len(chunk)]
            for i, token in enumerate(tokens):
                record = TokenLogprobs(
                    chunk.logprobs[i], chunk.ranks[i], chunk.top_ids[i], chunk.top_logprobs[i]
                )
                tables.append(self._table(token, record))
        req.prompt_logprobs = tables
        return tables

    def _table(self, token: int, record: TokenLogprobs) -> dict[int, Logprob]:
        """vLLM's table of one position: the token's own entry first, then the alternatives
        (ranks 1, 2, ... in order) that are not the token."""
        table = {token: Logprob(record.logprob, record.rank, self.token_text(token))}
        top = zip(record.top_ids, record.top_logprobs, strict=True)
        for rank, (other, value) in enumerate(top, 1):
            if other not in table:
                table[other] = Logprob(value, rank, self.token_text(other))
        return table

    def _decode_token(self, token: int) -> str | None:
        if self.tokenizer is None:
            return None
        return self.tokenizer.decode([token], skip_special_tokens=False)


def _visible(choice: _Choice, params: SamplingParams) -> str:
    """While a choice runs, hold back a tail that may be the start of a stop string, so a
    stream never shows text that a later stop cuts off."""
    if choice.finish_reason is not None or not params.stop:
        return choice.text
    return choice.text[: safe_emit_length(choice.text, params.stop)]
