"""Structured outputs and forced tool calls through a real afd-serve (API server, coordinator,
attention and FFN ranks) on the random test checkpoint, driven by the official openai SDK."""

from __future__ import annotations

import json

import openai
import pytest

pytestmark = pytest.mark.slow


def test_structured_outputs_over_http(client: openai.OpenAI) -> None:
    """response_format json_schema through the SDK (chat, n=2, and streamed), vLLM's
    guided_choice on completions: the served text satisfies the constraint."""
    schema = {
        "type": "object",
        "properties": {"city": {"enum": ["Paris", "Oslo"]}, "days": {"type": "integer"}},
        "required": ["city", "days"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "trip", "schema": schema, "strict": True}}
    chat = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Plan a trip"}],
        max_tokens=40,
        n=2,
        seed=1,
        response_format=fmt,
    )
    for choice in chat.choices:
        if choice.finish_reason == "stop":  # a long integer may run out of tokens
            value = json.loads(choice.message.content)
            assert value["city"] in ("Paris", "Oslo") and isinstance(value["days"], int)
        else:
            assert choice.message.content.startswith('{"city":"')
    streamed = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Plan a trip"}],
        max_tokens=40,
        temperature=0,
        response_format={"type": "json_object"},
        stream=True,
    )
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert text.startswith("{")
    picked = client.completions.create(
        model="tiny",
        prompt="Answer:",
        max_tokens=10,
        extra_body={"guided_choice": ["alpha", "beta"]},
    )
    assert picked.choices[0].text in ("alpha", "beta")
    assert picked.choices[0].finish_reason == "stop"


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"enum": ["Paris", "Oslo"]}, "unit": {"enum": ["C", "F"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": None}}


def test_forced_tool_calls(client: openai.OpenAI) -> None:
    """tool_choice named or "required" on a model with no tool-call parser: the calls come
    from structured outputs, valid against their schemas, streamed or not."""
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    named = {"type": "function", "function": {"name": "get_weather"}}
    out = client.chat.completions.create(
        model="tiny", messages=messages, tools=[WEATHER, TIME], tool_choice=named, max_tokens=30
    )
    choice = out.choices[0]  # a forced named function finishes "stop", as OpenAI's does
    assert choice.finish_reason == "stop" and choice.message.content is None
    (call,) = choice.message.tool_calls
    args = json.loads(call.function.arguments)
    assert call.function.name == "get_weather" and args["city"] in ("Paris", "Oslo")
    assert args["unit"] in ("C", "F")
    required = client.chat.completions.create(
        model="tiny", messages=messages, tools=[WEATHER, TIME], tool_choice="required",
        max_tokens=60, temperature=0,
    )  # fmt: skip
    choice = required.choices[0]
    if choice.finish_reason == "tool_calls":
        calls = choice.message.tool_calls
        assert calls and all(c.function.name in ("get_weather", "get_time") for c in calls)
        assert all(isinstance(json.loads(c.function.arguments), dict) for c in calls)
    else:  # 60 tokens may cut a long array: what came is returned as text
        assert choice.finish_reason == "length" and not choice.message.tool_calls
        assert choice.message.content.startswith('[{"name":"get_')
    stream = client.chat.completions.create(
        model="tiny", messages=messages, tools=[WEATHER], tool_choice=named, max_tokens=30,
        stream=True,
    )  # fmt: skip
    deltas = [d for c in stream if c.choices for d in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].function.name == "get_weather" and deltas[0].id
    streamed = json.loads("".join(d.function.arguments or "" for d in deltas))
    assert streamed["city"] in ("Paris", "Oslo")
