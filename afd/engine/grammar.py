"""Structured outputs on the coordinator, with llguidance (Microsoft's grammar engine, also a
vLLM and SGLang backend): one matcher per constrained sequence. Before a step, each
constrained sequence that samples gets the bitmask of tokens its grammar allows next (sent in
its rank's StepPlan, applied by the rank's sampler); after the step its matcher consumes the
sampled token. The matchers live with the sequences here, so preemption and recompute, which
replay tokens the matcher already consumed, need nothing from them."""

from __future__ import annotations

import json
from pathlib import Path

import llguidance
import numpy as np
from llguidance.numpy import fill_next_token_bitmask_par

from afd.sampling_params import SamplingError, StructuredOutputs
from attn_worker.messages import TokenMask

# JSON without optional whitespace (`{"a":1}`): with it allowed, a weak or unsure model can
# spend its whole budget on blanks between tokens, vLLM's disable-any-whitespace case
_JSON_OPTIONS = {"whitespace_flexible": False}


def llguidance_grammar(spec: StructuredOutputs) -> str:
    """The request's constraint as an llguidance grammar (not yet checked)."""
    kind = spec.kind
    if kind in ("json", "json_object"):
        schema = spec.json if kind == "json" else '{"type": "object"}'
        try:
            return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=_JSON_OPTIONS)
        except (ValueError, TypeError) as e:
            raise ValueError(f"not a JSON schema: {e}") from None
    if kind == "regex":
        return llguidance.grammar_from("regex", spec.regex or "")
    if kind == "choice":
        return llguidance.grammar_from("choice", json.dumps(spec.choice))
    return llguidance.grammar_from("grammar", spec.grammar or "")  # Lark or GBNF


class Grammars:
    """Compiles request grammars for one tokenizer and keeps the live sequences' matchers.
    Every failure a request can cause is a SamplingError (a 400, or that request's error)."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_token_ids: list[int]) -> None:
        """tokenizer_json: the HF tokenizer.json text; vocab_size: the logits' width (masks
        cover it; ids past the tokenizer's are never allowed). ValueError when the two
        disagree (a checkpoint whose config.json vocab is smaller than its tokenizer's)."""
        self.tokenizer = llguidance.LLTokenizer(
            _special_tokens_renamed(tokenizer_json),
            n_vocab=vocab_size,
            eos_token=eos_token_ids or None,
        )
        self.matchers: dict[int, llguidance.LLMatcher] = {}
        # sequences whose constraint waits for a marker: seq id -> (marker, last tokens seen)
        self.waiting: dict[int, tuple[list[int], list[int]]] = {}
        self.words = (vocab_size + 31) // 32  # int32 words of one mask
        self.executor = llguidance.LLExecutor()
        self._compiled: dict[tuple, str] = {}  # a request's constraint -> its checked grammar

    @classmethod
    def for_model(cls, folder: str | Path, vocab_size: int, eos_token_ids: list[int]) -> Grammars:
        path = Path(folder) / "tokenizer.json"
        if not path.is_file():
            raise ValueError(f"{path} not found")
        return cls(path.read_text(), vocab_size, eos_token_ids)

    def compile(self, spec: StructuredOutputs) -> str:
        key = _key(spec)
        grammar = self._compiled.get(key)
        if grammar is None:
            try:
                grammar = llguidance_grammar(spec)
            except ValueError as e:
                raise SamplingError(f"structured_outputs.{spec.kind} is invalid: {e}") from None
            error = llguidance.LLMatcher.validate_grammar(grammar, self.tokenizer)
            if error:
                raise SamplingError(f"structured_outputs.{spec.kind} is invalid: {error}")
            if len(self._compiled) >= _MAX_COMPILED:
                self._compiled.pop(next(iter(self._compiled)))  # the oldest
            self._compiled[key] = grammar
        return grammar

    def check(self, spec: StructuredOutputs) -> None:
        """SamplingError naming what is wrong with the request's constraint, if anything."""
        self.compile(spec)

    def start(self, seq_id: int, spec: StructuredOutputs, output_token_ids: list[int]) -> None:
        """A matcher for a sequence, past the tokens it already generated (a sequence that
        comes back after the ranks were restarted)."""
        matcher = llguidance.LLMatcher(self.tokenizer, self.compile(spec), log_level=0)
        constrained = list(output_token_ids)
        if spec.after:  # only what follows the marker is constrained
            end = _find(output_token_ids, spec.after)
            if end is None:
                tail = list(output_token_ids[len(output_token_ids) - len(spec.after) + 1 :])
                self.waiting[seq_id] = (list(spec.after), tail)
            constrained = [] if end is None else list(output_token_ids[end:])
        if constrained and not matcher.is_error():
            matcher.consume_tokens(constrained)
        if matcher.is_error():
            raise SamplingError(f"structured_outputs: {matcher.get_error()}")
        self.matchers[seq_id] = matcher

    def masks(self, seq_ids: list[int]) -> dict[int, TokenMask]:
        """Allowed-token bitmasks of the constrained sequences among `seq_ids`, computed on
        llguidance's thread pool (one mask takes ~0.1 ms at a 128K vocabulary)."""
        ids = [i for i in seq_ids if i in self.matchers and i not in self.waiting]
        if not ids:
            return {}
        bitmask = np.zeros((len(ids), self.words), dtype=np.int32)
        jobs = [(self.matchers[i], row) for row, i in enumerate(ids)]
        fill_next_token_bitmask_par(self.executor, jobs, bitmask)
        return {i: TokenMask(i, bitmask[row].tobytes()) for row, i in enumerate(ids)}

    def advance(self, seq_id: int, token: int) -> str | None:
        """The matcher consumes a sampled token: None while the grammar goes on, "stop" for
        the EOS that follows a complete grammar (the only token it then allows; it ends the
        sequence even under ignore_eos), or the error if the grammar rejected the token."""
        matcher = self.matchers.get(seq_id)
        if matcher is None:
            return None
        if seq_id in self.waiting:  # before the marker: free text
            marker, tail = self.waiting[seq_id]
            tail.append(token)
            del tail[: len(tail) - len(marker)]
            if tail == marker:
                del self.waiting[seq_id]
            return None
        complete = matcher.is_stopped()
        if not matcher.consume_token(token):
            return matcher.get_error() or "token rejected"
        return "stop" if complete else None

    def finish(self, seq_id: int) -> None:
        self.matchers.pop(seq_id, None)
        self.waiting.pop(seq_id, None)


def _special_tokens_renamed(tokenizer_json: str) -> str:
    """The tokenizer with its special tokens renamed to text no prompt holds, for llguidance.
    A constraint is on text, and llguidance (1.9) tokenizes the text a grammar forces with the
    tokenizer, which matches special tokens' names in text: for a regex `<\\|EOT\\|>` it
    allowed only the end-of-turn token itself, then refused it when it came back sampled (a
    special token's bytes are not its name), ending the request with no text. Renamed, the
    text comes in ordinary tokens, and special tokens stay out of strings and the EOS ids end
    a complete constraint, as before."""
    spec = json.loads(tokenizer_json)
    vocab = spec.get("model", {}).get("vocab")
    for token in spec.get("added_tokens", []):
        if not token.get("special"):
            continue
        name = f"\u2060afd-special-{token['id']}\u2060"  # word joiners around it
        if isinstance(vocab, dict) and token["content"] in vocab:  # BPE, WordPiece
            vocab[name] = vocab.pop(token["content"])
        elif (
            isinstance(vocab, list)
            and token["id"] < len(vocab)
            and vocab[token["id"]][0] == token["content"]
        ):
            vocab[token["id"]] = [name, *vocab[token["id"]][1:]]  # Unigram: [piece, score]
        token["content"] = name
    return json.dumps(spec)


def _find(tokens: list[int], marker: list[int]) -> int | None:
    """The position just past the first occurrence of `marker` in `tokens`, or None."""
    n = len(marker)
    return next((i + n for i in range(len(tokens) - n + 1) if tokens[i : i + n] == marker), None)


_MAX_COMPILED = 256


def _key(spec: StructuredOutputs) -> tuple:  # what the grammar depends on (not `after`)
    choice = tuple(spec.choice) if spec.choice is not None else None
    return (spec.json, spec.json_object, spec.regex, choice, spec.grammar)
