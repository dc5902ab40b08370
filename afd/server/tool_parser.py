"""Tool-call parsers: find function calls in generated text (`--tool-call-parser`).

Like the reasoning parsers they read the cumulative content of a choice. A parser turns it
into a `ToolSnapshot` (content that is safe to show, and the calls seen so far, each with the
parameters that are complete); `ToolStream` diffs snapshots into OpenAI tool-call deltas:
id, type and name first, then argument fragments whose concatenation is the final JSON.
"""

from __future__ import annotations

import json
import math
import re
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from afd.server.protocol import ToolParam
from afd.server.protocol_responses import DeltaFunctionCall, DeltaToolCall, FunctionCall, ToolCall
from afd.server.reasoning_parser import held_prefix_len

TOOL_PARSERS: dict[str, type[ToolParser]] = {}


def register_tool_parser(name: str) -> Callable[[type[ToolParser]], type]:
    def wrap(cls: type[ToolParser]) -> type[ToolParser]:
        TOOL_PARSERS[name] = cls
        return cls

    return wrap


def create_tool_parser(name: str, tools: list[ToolParam] | None) -> ToolParser:
    if name not in TOOL_PARSERS:
        known = ", ".join(sorted(TOOL_PARSERS))
        raise ValueError(f"unknown tool-call parser {name!r}; choose one of: {known}")
    return TOOL_PARSERS[name](tools or [])


def new_tool_call_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


@dataclass
class PartialCall:
    name: str
    params: list[str] = field(default_factory=list)  # JSON `"key": value` fragments
    complete: bool = False

    @property
    def arguments(self) -> str:
        return "{" + ", ".join(self.params) + "}"


@dataclass
class ToolSnapshot:
    """Where the content lies in the text, and the calls seen so far."""

    prefix_end: int  # text[:prefix_end] is content, before any tool block
    calls: list[PartialCall]
    after_start: int | None = None  # text[after_start:] is content after a closed block

    def content(self, text: str) -> str:
        after = "" if self.after_start is None else text[self.after_start :]
        return text[: self.prefix_end] + after


def _schema_types(schema: dict[str, Any] | None) -> list[str]:
    if not schema:
        return []
    kind = schema.get("type")
    types = [kind] if isinstance(kind, str) else list(kind or [])
    for sub in schema.get("anyOf", []) + schema.get("oneOf", []):
        types += _schema_types(sub)
    return types


def _cast_one(text: str, kind: str) -> tuple[bool, Any]:
    try:
        if kind == "integer":
            value = float(text) if not re.fullmatch(r"[+-]?\d+", text) else int(text)
            return (value == int(value)), int(value)
        if kind == "number":
            value = int(text) if re.fullmatch(r"[+-]?\d+", text) else float(text)
            return math.isfinite(value), value
        if kind == "boolean":
            return text.lower() in ("true", "false"), text.lower() == "true"
        if kind == "null":
            return text.lower() in ("null", "none"), None
        if kind in ("object", "array"):
            value = json.loads(text)
            return isinstance(value, dict if kind == "object" else list), value
    except (ValueError, OverflowError):
        return False, None
    return kind == "string", text


def cast_param(raw: str, schema: dict[str, Any] | None) -> Any:
    """Cast a parameter's text to the first JSON-schema type it fits; else keep it a string."""
    text = raw.strip()
    for kind in _schema_types(schema):
        ok, value = _cast_one(text, kind)
        if ok:
            return value
    return text


class ToolParser(ABC):
    def __init__(self, tools: list[ToolParam]) -> None:
        self.schemas = {t.function.name: (t.function.parameters or {}) for t in tools}

    @abstractmethod
    def snapshot(self, text: str, final: bool, start: int = 0) -> ToolSnapshot:
        """Content and calls visible in cumulative `text` (no block begins before `start`);
        when not `final`, text that may still become a marker is held back."""

    def param_fragment(self, tool: str, key: str, raw: str) -> str:
        props = self.schemas.get(tool, {}).get("properties") or {}
        value = cast_param(raw, props.get(key))
        return f"{json.dumps(key, ensure_ascii=False)}: {json.dumps(value, ensure_ascii=False)}"

    def extract(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """Non-streaming: (content or None, tool calls)."""
        snap = self.snapshot(text, final=True)
        calls = [
            ToolCall(
                id=new_tool_call_id(), function=FunctionCall(name=c.name, arguments=c.arguments)
            )
            for c in snap.calls
        ]
        content = snap.content(text)
        content = content if content.strip() or not calls else ""
        return content or None, calls


@register_tool_parser("step3")
class Step3ToolParser(ToolParser):
    """Step3's markers (the bar is U+FF5C):
    <｜tool_calls_begin｜><｜tool_call_begin｜>function<｜tool_sep｜><steptml:invoke name="N">
    <steptml:parameter name="K">V</steptml:parameter>...</steptml:invoke><｜tool_call_end｜>
    ...<｜tool_calls_end｜>"""

    calls_begin = "<\uff5ctool_calls_begin\uff5c>"
    calls_end = "<\uff5ctool_calls_end\uff5c>"
    call_begin = "<\uff5ctool_call_begin\uff5c>"
    call_end = "<\uff5ctool_call_end\uff5c>"
    invoke_re = re.compile(r'<steptml:invoke name="([^"]+)">')
    param_re = re.compile(r'<steptml:parameter name="([^"]+)">(.*?)</steptml:parameter>', re.S)

    def snapshot(self, text: str, final: bool, start: int = 0) -> ToolSnapshot:
        begin = text.find(self.calls_begin, start)
        if begin < 0:
            held = 0 if final else held_prefix_len(text, self.calls_begin)
            return ToolSnapshot(len(text) - held, [])
        body_start = begin + len(self.calls_begin)
        end = text.find(self.calls_end, body_start)
        body = text[body_start:] if end < 0 else text[body_start:end]
        after = None if end < 0 else end + len(self.calls_end)
        calls = [self._parse_call(part) for part in body.split(self.call_begin)[1:]]
        calls = [c for c in calls if c is not None]
        if final:
            # A call cut off by the end of the output is closed with the parameters it
            # completed, so streaming and non-streaming agree.
            for call in calls:
                call.complete = True
        return ToolSnapshot(begin, calls, after)

    def _parse_call(self, part: str) -> PartialCall | None:
        stop = part.find(self.call_end)
        segment = part if stop < 0 else part[:stop]
        match = self.invoke_re.search(segment)
        if match is None:
            return None
        name = match.group(1)
        params = [
            self.param_fragment(name, m.group(1), m.group(2))
            for m in self.param_re.finditer(segment, match.end())
        ]
        return PartialCall(name, params, complete=stop >= 0)


@dataclass
class _CallState:
    id: str
    num_params: int = 0  # argument fragments already sent
    closed: bool = False


class ToolStream:
    """Per-choice streaming state: cumulative content in, content + tool-call deltas out.
    Before a tool block, work per update is proportional to the new text."""

    def __init__(self, parser: ToolParser) -> None:
        self.parser = parser
        self.num_content = 0
        self.calls: list[_CallState] = []
        self.search_from = 0  # no tool block begins before this position
        self.closed: ToolSnapshot | None = None  # the block ended: its calls are final

    @property
    def called(self) -> bool:
        return bool(self.calls)

    def update(self, text: str, final: bool) -> tuple[str, list[DeltaToolCall]]:
        snap = self.closed or self.parser.snapshot(text, final, self.search_from)
        self.search_from = snap.prefix_end
        if snap.after_start is not None:
            self.closed = snap
        if final:
            for call in snap.calls:
                call.complete = True
        deltas = [self._call_delta(i, call) for i, call in enumerate(snap.calls)]
        return self._content_delta(text, snap), [d for d in deltas if d is not None]

    def _content_delta(self, text: str, snap: ToolSnapshot) -> str:
        delta = text[self.num_content : snap.prefix_end]
        total = snap.prefix_end
        if snap.after_start is not None:
            sent_after = max(0, self.num_content - snap.prefix_end)
            delta += text[snap.after_start + sent_after :]
            total += len(text) - snap.after_start
        self.num_content = max(self.num_content, total)
        return delta

    def _call_delta(self, index: int, call: PartialCall) -> DeltaToolCall | None:
        if index == len(self.calls):
            self.calls.append(_CallState(id=new_tool_call_id()))
            header = DeltaFunctionCall(name=call.name, arguments="")
            delta = DeltaToolCall(index=index, id=self.calls[index].id, type="function")
            delta.function = header
        else:
            delta = None
        state = self.calls[index]
        args = "".join(
            ("{" if j == 0 else ", ") + call.params[j]
            for j in range(state.num_params, len(call.params))
        )
        state.num_params = len(call.params)
        if call.complete and not state.closed:
            args += "}" if call.params else "{}"
            state.closed = True
        if args and delta is None:
            return DeltaToolCall(index=index, function=DeltaFunctionCall(arguments=args))
        if args:
            delta.function.arguments = args
        return delta
