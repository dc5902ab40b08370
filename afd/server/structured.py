"""A request's structured-outputs constraint, from OpenAI's `response_format` or vLLM's extras
(`structured_outputs`, `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar`),
checked here so that a bad schema or pattern is a 400 naming its field, not a failed request."""

from __future__ import annotations

from afd.engine.grammar import Grammars
from afd.sampling_params import (
    STRUCTURED_KINDS,
    SamplingError,
    SamplingParams,
    StructuredOutputs,
)
from afd.server.errors import BadRequestError
from afd.server.protocol import SamplingFields
from afd.tokenizer import Tokenizer


class StructuredRequests:
    def __init__(self, tokenizer: Tokenizer | None, vocab_size: int) -> None:
        """Builds the grammar compiler now: its token table takes ~1 s for a large vocabulary,
        which would otherwise stall the event loop on the first constrained request.
        `vocab_size` is the engine's logits width, as the engine builds its own grammars with,
        so that a tokenizer the engine refuses is refused here too (a 400, not a failed
        request)."""
        self._grammars: Grammars | None = None
        self._unavailable = "the model has no tokenizer"
        if tokenizer is not None:
            try:
                eos = sorted(tokenizer.eos_token_ids)
                self._grammars = Grammars(tokenizer.to_json(), vocab_size, eos)
            except (ValueError, RuntimeError) as e:  # llguidance's refusals
                self._unavailable = str(e)

    def parse(self, req: SamplingFields) -> StructuredOutputs | None:
        given = _given(req)
        if not given:
            return None
        if len(given) > 1:
            names = ", ".join(name for name, _ in given)
            raise BadRequestError(f"use one structured-output field, got {names}", given[1][0])
        field, make = given[0]
        try:
            spec = make()
            self.grammars().check(spec)
        except (SamplingError, TypeError, ValueError) as e:
            raise BadRequestError(f"{field}: {e}", field) from None
        return spec

    def forced(self, params: SamplingParams, schema: dict) -> StructuredOutputs:
        """The constraint of a forced tool call (tool_choice "required" or named)."""
        if params.structured_outputs is not None:
            raise BadRequestError(
                "tool_choice required or named cannot be combined with a structured-output field",
                "tool_choice",
            )
        spec = StructuredOutputs(json=schema)
        try:
            self.grammars().check(spec)
        except SamplingError as e:
            raise BadRequestError(f"tools: a parameters schema is invalid: {e}", "tools") from None
        return spec

    def grammars(self) -> Grammars:
        if self._grammars is None:
            raise SamplingError(f"structured outputs are unavailable: {self._unavailable}")
        return self._grammars


def _given(req: SamplingFields) -> list[tuple[str, object]]:
    """(field name, builder of its StructuredOutputs) for each constraint the request sets."""
    found: list[tuple[str, object]] = []
    fmt = req.response_format
    if fmt is not None and fmt.type == "json_object":
        found.append(("response_format", lambda: StructuredOutputs(json_object=True)))
    elif fmt is not None and fmt.type == "json_schema":

        def from_schema() -> StructuredOutputs:
            schema = fmt.json_schema.json_schema if fmt.json_schema is not None else None
            if schema is None:
                raise ValueError("json_schema.schema is required for type json_schema")
            return StructuredOutputs(json=schema)

        found.append(("response_format", from_schema))
    if req.structured_outputs is not None:
        so = req.structured_outputs
        kinds = (so.json_schema, so.json_object, so.regex, so.choice, so.grammar)
        fields = {k: v for k, v in zip(STRUCTURED_KINDS, kinds, strict=True) if v is not None}
        found.append(("structured_outputs", lambda: StructuredOutputs(**fields)))
    for field, kind in (
        ("guided_json", "json"),
        ("guided_regex", "regex"),
        ("guided_choice", "choice"),
        ("guided_grammar", "grammar"),
    ):
        value = getattr(req, field)
        if value is not None:
            found.append((field, lambda kind=kind, value=value: StructuredOutputs(**{kind: value})))
    return found
