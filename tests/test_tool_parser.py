"""Step3 tool-call parser: schema casting, whole-text extraction, streaming at every split."""

from __future__ import annotations

import json
import random

import pytest

from afd.server.protocol import ToolParam
from afd.server.protocol_responses import DeltaToolCall
from afd.server.tool_parser import (
    TOOL_PARSERS,
    ToolParser,
    ToolStream,
    cast_param,
    create_tool_parser,
)

# Step3's real markers; the bars are U+FF5C FULLWIDTH VERTICAL LINE.
BEGIN, END = "<｜tool_calls_begin｜>", "<｜tool_calls_end｜>"
CALL, CALL_END, SEP = "<｜tool_call_begin｜>", "<｜tool_call_end｜>", "<｜tool_sep｜>"
assert "\uff5c" in BEGIN

TOOLS = [
    ToolParam.model_validate(
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {
                    "type": "object",
                    "properties": {
                        "city": {"type": "string"},
                        "days": {"type": "integer"},
                        "metric": {"type": "boolean"},
                        "lat": {"type": "number"},
                        "opts": {"type": "object"},
                        "tags": {"type": "array"},
                        "note": {"type": ["null", "string"]},
                    },
                },
            },
        }
    ),
    ToolParam.model_validate({"type": "function", "function": {"name": "now"}}),
]


def call(name: str, **params: str) -> str:
    body = "".join(
        f'<steptml:parameter name="{k}">{v}</steptml:parameter>' for k, v in params.items()
    )
    return f'{CALL}function{SEP}<steptml:invoke name="{name}">{body}</steptml:invoke>{CALL_END}'


WEATHER = call("get_weather", city="Paris", days="3", metric="true", lat="48.85")
RICH = call("get_weather", opts='{"a": [1, 2]}', tags='["x", "y"]', note="null", city=" a<b ")
TEXTS = {
    "single": f"{BEGIN}{WEATHER}{END}",
    "content_around": f"Let me check.\n{BEGIN}{WEATHER}{call('now')}{END} Done.",
    "rich": f"{BEGIN}\n{RICH}\n{END}",
    "no_tools": "Just an answer with a < sign and <｜tool but no block.",
}
EXPECTED_WEATHER = {"city": "Paris", "days": 3, "metric": True, "lat": 48.85}


@pytest.fixture
def parser() -> ToolParser:
    return create_tool_parser("step3", TOOLS)


def test_registry() -> None:
    assert "step3" in TOOL_PARSERS
    with pytest.raises(ValueError, match="unknown tool-call parser"):
        create_tool_parser("nope", [])


@pytest.mark.parametrize(
    "raw,schema,value",
    [
        ("3", {"type": "integer"}, 3),
        ("3.0", {"type": "integer"}, 3),
        ("3.5", {"type": "integer"}, "3.5"),  # not an integer: stays text
        ("2.5", {"type": "number"}, 2.5),
        ("7", {"type": "number"}, 7),
        ("nan", {"type": "number"}, "nan"),
        ("True", {"type": "boolean"}, True),
        ("false", {"type": "boolean"}, False),
        ("yes", {"type": "boolean"}, "yes"),
        ('{"k": 1}', {"type": "object"}, {"k": 1}),
        ("[1, 2]", {"type": "array"}, [1, 2]),
        ("[1, 2]", {"type": "object"}, "[1, 2]"),
        (" padded ", {"type": "string"}, "padded"),
        ("42", {"type": "string"}, "42"),
        ("42", None, "42"),  # unknown parameter: text
        ("null", {"type": ["null", "string"]}, None),
        ("5", {"anyOf": [{"type": "integer"}, {"type": "string"}]}, 5),
    ],
)
def test_cast_param(raw: str, schema: dict | None, value: object) -> None:
    assert cast_param(raw, schema) == value


def test_extract_single(parser: ToolParser) -> None:
    content, calls = parser.extract(TEXTS["single"])
    assert content is None
    assert [c.function.name for c in calls] == ["get_weather"]
    assert json.loads(calls[0].function.arguments) == EXPECTED_WEATHER
    assert calls[0].id.startswith("chatcmpl-tool-") and calls[0].type == "function"


def test_extract_content_and_two_calls(parser: ToolParser) -> None:
    content, calls = parser.extract(TEXTS["content_around"])
    assert content == "Let me check.\n Done."
    assert [c.function.name for c in calls] == ["get_weather", "now"]
    assert json.loads(calls[1].function.arguments) == {}
    assert len({c.id for c in calls}) == 2


def test_extract_rich_types(parser: ToolParser) -> None:
    _, calls = parser.extract(TEXTS["rich"])
    args = json.loads(calls[0].function.arguments)
    assert args == {"opts": {"a": [1, 2]}, "tags": ["x", "y"], "note": None, "city": "a<b"}


def test_extract_without_block_is_content(parser: ToolParser) -> None:
    assert parser.extract(TEXTS["no_tools"]) == (TEXTS["no_tools"], [])


def test_extract_truncated_call_keeps_complete_params(parser: ToolParser) -> None:
    text = f'{BEGIN}{CALL}function{SEP}<steptml:invoke name="get_weather">'
    text += '<steptml:parameter name="city">Oslo</steptml:parameter><steptml:parameter name="da'
    _, calls = parser.extract(text)
    assert json.loads(calls[0].function.arguments) == {"city": "Oslo"}


def test_extract_call_without_name_is_dropped(parser: ToolParser) -> None:
    content, calls = parser.extract(f"hi{BEGIN}{CALL}function{SEP}garbage{CALL_END}{END}")
    assert (content, calls) == ("hi", [])


def run_stream(parser: ToolParser, chunks: list[str]) -> tuple[str, list[DeltaToolCall]]:
    s = ToolStream(parser)
    text, content, deltas = "", "", []
    for i, chunk in enumerate(chunks):
        text += chunk
        c, d = s.update(text, final=i == len(chunks) - 1)
        content += c
        deltas += d
    return content, deltas


def assemble(deltas: list[DeltaToolCall]) -> list[dict]:
    """What an OpenAI client accumulates; checks the header-first delta convention."""
    calls: list[dict] = []
    for d in deltas:
        if d.index == len(calls):
            assert d.id and d.type == "function" and d.function and d.function.name
            calls.append({"id": d.id, "name": d.function.name, "arguments": ""})
        else:
            assert d.id is None and d.function is not None and d.function.name is None
        calls[d.index]["arguments"] += d.function.arguments or ""
    return calls


def check_stream(parser: ToolParser, text: str, chunks: list[str]) -> None:
    want_content, want_calls = parser.extract(text)
    content, deltas = run_stream(parser, chunks)
    assert (content or None) == want_content
    got = assemble(deltas)
    assert [(c["name"], c["arguments"]) for c in got] == [
        (c.function.name, c.function.arguments) for c in want_calls
    ]


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_stream_split_at_every_position(parser: ToolParser, name: str) -> None:
    text = TEXTS[name]
    for i in range(len(text) + 1):
        check_stream(parser, text, [text[:i], text[i:]])


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_stream_char_by_char(parser: ToolParser, name: str) -> None:
    text = TEXTS[name]
    check_stream(parser, text, list(text))


def test_stream_random_splits(parser: ToolParser) -> None:
    rng = random.Random(0)
    text = TEXTS["content_around"] + " " + TEXTS["rich"]
    for _ in range(300):
        cuts = sorted(rng.sample(range(1, len(text)), rng.randint(2, 12)))
        chunks = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        check_stream(parser, text, chunks)


def test_stream_emits_name_before_arguments_finish(parser: ToolParser) -> None:
    head = f'{BEGIN}{CALL}function{SEP}<steptml:invoke name="get_weather">'
    first = head + '<steptml:parameter name="city">Paris</steptml:parameter>'
    s = ToolStream(parser)
    assert s.update(head, final=False)[1][0].function.name == "get_weather"
    (delta,) = s.update(first, final=False)[1]
    assert delta.function.arguments == '{"city": "Paris"'
    (delta,) = s.update(first + f"</steptml:invoke>{CALL_END}", final=False)[1]
    assert delta.function.arguments == "}"


def test_stream_holds_partial_begin_marker(parser: ToolParser) -> None:
    s = ToolStream(parser)
    assert s.update("Sure <｜tool_ca", final=False) == ("Sure ", [])
    assert s.update("Sure <｜tool_ca", final=True) == ("<｜tool_ca", [])


def test_stream_searches_only_new_text(parser: ToolParser) -> None:
    starts: list[tuple[int, int]] = []
    snapshot = parser.snapshot

    def spy(text: str, final: bool, start: int = 0):  # noqa: ANN202
        starts.append((len(text), start))
        return snapshot(text, final, start)

    parser.snapshot = spy  # type: ignore[method-assign]
    text = "word " * 200 + TEXTS["single"] + " and after " * 50
    s = ToolStream(parser)
    for i in range(1, len(text) + 1):
        s.update(text[:i], final=False)
    before = [(n, st) for n, st in starts if n <= 1000]
    assert all(n - st <= len(BEGIN) for n, st in before)
    assert max(n for n, _ in starts) < len(text) - 100  # parsing stops once the block closed
