"""Offline generation API mirroring vLLM's `LLM`: colocated or disaggregated, same outputs."""

from __future__ import annotations

import itertools
from dataclasses import fields
from pathlib import Path
from typing import Any

from afd.config import ModelConfig
from afd.engine.builder import EngineSettings, build_engine
from afd.engine.output_processor import OutputProcessor
from afd.engine.sequence import request_sequences
from afd.outputs import RequestOutput
from afd.sampling_params import SamplingError, SamplingParams
from afd.tokenizer import Tokenizer

PromptType = str | dict[str, Any]


class LLM:
    def __init__(self, model: str, **kwargs: Any) -> None:
        known = {f.name for f in fields(EngineSettings)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"LLM() got unknown arguments {unknown}; known: {sorted(known)}")
        self.settings = EngineSettings(model=str(model), **kwargs)
        has_tokenizer = (Path(model) / "tokenizer.json").exists()
        self.tokenizer = Tokenizer.from_pretrained(model) if has_tokenizer else None
        self.engine = build_engine(self.settings)
        self.max_model_len = self.engine.max_model_len
        self.vocab_size = ModelConfig.from_pretrained(model).vocab_size
        self._ids = itertools.count()

    def generate(
        self,
        prompts: PromptType | list[PromptType],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """One output per prompt, in order; `sampling_params` is one for all prompts or one
        per prompt (as in vLLM)."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        if isinstance(sampling_params, list):
            if len(sampling_params) != len(prompts):
                raise ValueError(
                    f"{len(sampling_params)} sampling params for {len(prompts)} prompts"
                )
            per_prompt = sampling_params
        else:
            per_prompt = [sampling_params or SamplingParams()] * len(prompts)
        processor = OutputProcessor(self.tokenizer)
        final: dict[str, RequestOutput] = {}
        try:  # a prompt refused on adding takes the ones added before it out again
            order = [self._add(processor, p, s) for p, s in zip(prompts, per_prompt, strict=True)]
            while self.engine.has_work():
                outputs, to_abort = processor.process(self.engine.step())
                self.engine.abort(to_abort, "stop")
                final.update({o.request_id: o for o in outputs if o.finished})
        except BaseException:
            self.engine.abort(list(self.engine.seqs))
            raise
        return [final[r] for r in order]

    def chat(
        self,
        messages: list[dict[str, Any]],
        sampling_params: SamplingParams | None = None,
        **template_kwargs: Any,
    ) -> list[RequestOutput]:
        text = self._need_tokenizer().apply_chat_template(messages, **template_kwargs)
        return self.generate(text, sampling_params)

    def shutdown(self) -> None:
        self.engine.executor.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def _add(self, processor: OutputProcessor, prompt: PromptType, params: SamplingParams) -> str:
        text, ids = self._tokens(prompt)
        if not ids:
            raise ValueError("prompt is empty: give at least one token")
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"prompt has {len(ids)} tokens; this model's maximum context "
                f"length is {self.max_model_len} tokens"
            )
        bad = [t for t in params.logit_bias if t >= self.vocab_size]
        if bad:
            raise SamplingError(
                f"logit_bias token id {bad[0]} is out of range [0, {self.vocab_size})"
            )
        request_id = str(next(self._ids))
        seqs = request_sequences(request_id, ids, params, self._ids)
        processor.add(request_id, text, ids, params, seqs)
        for seq in seqs:
            self.engine.add(seq)
        return request_id

    def _tokens(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), [int(t) for t in prompt["prompt_token_ids"]]
            prompt = prompt["prompt"]
        return prompt, self._need_tokenizer().encode(prompt)

    def _need_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise ValueError(
                f"{self.settings.model} has no tokenizer.json: pass "
                "{'prompt_token_ids': [...]} prompts instead of text"
            )
        return self.tokenizer
