"""Reasoning and tool calls through the whole server (`--reasoning-parser step3
--enable-auto-tool-choice --tool-call-parser step3`), JSON and streaming."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import openai
import pytest
from fake_engine import FakeEngine, running_server

from afd.server.api_server import ServerSettings, build_app

MODEL = "tiny-step3"
MESSAGES = [{"role": "user", "content": "Weather in Paris?"}]
BEGIN, END = "<｜tool_calls_begin｜>", "<｜tool_calls_end｜>"
CALL = (
    '<｜tool_call_begin｜>function<｜tool_sep｜><steptml:invoke name="get_weather">'
    '<steptml:parameter name="city">Paris</steptml:parameter>'
    '<steptml:parameter name="days">3</steptml:parameter></steptml:invoke><｜tool_call_end｜>'
)
THINK = "The user wants weather. I should call the tool."
TOOL_REPLY = f"{THINK}</think>Checking.{BEGIN}{CALL}{END}"
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather forecast",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            },
        },
    }
]


@pytest.fixture(scope="module")
def engine() -> FakeEngine:
    return FakeEngine(reply=lambda prompt, i: TOOL_REPLY)


@pytest.fixture(scope="module")
def base_url(engine: FakeEngine) -> Iterator[str]:
    settings = ServerSettings(
        reasoning_parser="step3", tool_call_parser="step3", enable_auto_tool_choice=True
    )
    with running_server(build_app(engine, settings)) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url + "/v1", api_key="x", max_retries=0)


def test_tool_call_json(client: openai.OpenAI, engine: FakeEngine) -> None:
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Checking."
    assert choice.message.model_extra["reasoning"] == THINK
    assert choice.message.model_extra["reasoning_content"] == THINK
    (call,) = choice.message.tool_calls
    assert call.id.startswith("chatcmpl-tool-") and call.type == "function"
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "days": 3}
    assert engine.last_params.skip_special_tokens is False  # markers must reach the parser


def test_tool_call_stream(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, tools=TOOLS, stream=True
    )
    reasoning, content, calls, finishes = "", "", {}, []
    for chunk in stream:
        for ch in chunk.choices:
            delta = ch.delta
            reasoning += (delta.model_extra or {}).get("reasoning") or ""
            content += delta.content or ""
            for tc in delta.tool_calls or []:
                if tc.index not in calls:
                    assert tc.id and tc.type == "function" and tc.function.name == "get_weather"
                    calls[tc.index] = ""
                calls[tc.index] += tc.function.arguments or ""
            if ch.finish_reason:
                finishes.append(ch.finish_reason)
    assert reasoning == THINK and content == "Checking."
    assert {i: json.loads(a) for i, a in calls.items()} == {0: {"city": "Paris", "days": 3}}
    assert finishes == ["tool_calls"]


def test_reasoning_without_tools(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES)
    message = r.choices[0].message
    # no tools in the request: the markers stay in the answer text
    assert message.content == f"Checking.{BEGIN}{CALL}{END}"
    assert message.model_extra["reasoning"] == THINK and not message.tool_calls
    assert r.choices[0].finish_reason == "stop"


def test_tool_choice_none_skips_parsing(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, tools=TOOLS, tool_choice="none"
    )
    assert not r.choices[0].message.tool_calls and r.choices[0].finish_reason == "stop"


def test_include_reasoning_false(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, extra_body={"include_reasoning": False}
    )
    assert r.choices[0].message.model_extra.get("reasoning") is None
    stream = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, stream=True, extra_body={"include_reasoning": False}
    )
    extras = [c.choices[0].delta.model_extra for c in stream if c.choices]
    assert not any(e.get("reasoning") for e in extras)


def test_thinking_cut_by_max_tokens_is_all_reasoning(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3)
    message = r.choices[0].message
    assert message.content is None and THINK.startswith(message.model_extra["reasoning"])
    assert r.choices[0].finish_reason == "length"


def test_assistant_history_with_tool_calls(client: openai.OpenAI, base_url: str) -> None:
    history = MESSAGES + [
        {
            "role": "assistant",
            "content": None,
            "reasoning_content": "earlier thought",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 23C"},
    ]
    r = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS)
    assert r.choices[0].message.tool_calls
    tok = httpx.post(base_url + "/tokenize", json={"messages": history, "tools": TOOLS})
    assert tok.status_code == 200 and tok.json()["count"] > 20


class _DropsThinkMarkers:
    """A tokenizer whose `</think>` is a special token, dropped by skip_special_tokens."""

    def __init__(self, inner: object) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        text = self.inner.decode(ids, skip_special_tokens=skip_special_tokens)
        return text.replace("</think>", "") if skip_special_tokens else text


def test_special_think_marker_is_kept_for_the_parser() -> None:
    base = FakeEngine()
    engine = FakeEngine(tokenizer=_DropsThinkMarkers(base.tokenizer), reply=lambda p, i: TOOL_REPLY)
    with running_server(build_app(engine, ServerSettings(reasoning_parser="step3"))) as url:
        r = httpx.post(url + "/v1/chat/completions", json={"messages": MESSAGES}).json()
    assert r["choices"][0]["message"]["reasoning"] == THINK
    assert engine.last_params.skip_special_tokens is False


def test_structured_output_waits_for_the_end_of_reasoning(
    client: openai.OpenAI, engine: FakeEngine
) -> None:
    """The step3 template opens <think>: the constraint must start after </think>, or the JSON
    would land in the reasoning."""
    client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=8, response_format={"type": "json_object"}
    )
    assert engine.last_params is not None
    spec = engine.last_params.structured_outputs
    assert spec is not None and spec.json_object
    assert spec.after == engine.tokenizer.encode("</think>", add_special_tokens=False)
