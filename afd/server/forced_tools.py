"""tool_choice "required" or a named function, enforced by structured outputs as vLLM does:
the output is constrained to the calls' JSON and read back as tool calls, whatever the model's
own tool-call format, so no --tool-call-parser is needed. Named: the output is the function's
arguments object. Required: a non-empty array of {"name": ..., "parameters": {...}}."""

from __future__ import annotations

import json
from typing import Any

from afd.server.protocol import NamedToolChoice, ToolParam
from afd.server.tool_parser import PartialCall, ToolParser, ToolSnapshot


def _params_schema(tool: ToolParam) -> dict[str, Any]:
    return tool.function.parameters or {"type": "object"}


class ForcedToolParser(ToolParser):
    def __init__(self, tools: list[ToolParam], choice: NamedToolChoice | str) -> None:
        super().__init__(tools)
        self.named = choice.function.name if isinstance(choice, NamedToolChoice) else None
        if self.named is not None:
            self.schema = _params_schema(next(t for t in tools if t.function.name == self.named))
        else:
            options = [
                {
                    "type": "object",
                    "properties": {
                        "name": {"const": t.function.name},
                        "parameters": _params_schema(t),
                    },
                    "required": ["name", "parameters"],
                    "additionalProperties": False,
                }
                for t in tools
            ]
            self.schema = {"type": "array", "minItems": 1, "items": {"anyOf": options}}

    def snapshot(self, text: str, final: bool, start: int = 0) -> ToolSnapshot:
        """A named call shows at once and gets its arguments at the end; required calls show
        at the end. Output that is not the calls' JSON (cut short by max_tokens) stays text."""
        if not final:
            return ToolSnapshot(0, [PartialCall(self.named)] if self.named else [])
        try:
            value = json.loads(text)
        except ValueError:
            return ToolSnapshot(len(text), [])
        calls = (
            [(self.named, value)] if self.named else [(c["name"], c["parameters"]) for c in value]
        )
        return ToolSnapshot(0, [self._call(name, args) for name, args in calls])

    @staticmethod
    def _call(name: str, args: dict[str, Any]) -> PartialCall:
        params = [f"{json.dumps(k, ensure_ascii=False)}: {json.dumps(v, ensure_ascii=False)}"
                  for k, v in args.items()]  # fmt: skip
        return PartialCall(name, params, complete=True)
