"""Step3 default chat template output, HF template conventions, and template errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from afd.server.chat_template import (
    STEP3_CHAT_TEMPLATE,
    ChatTemplateError,
    load_chat_template,
    render_chat,
)

BOS = "<｜begin▁of▁sentence｜>"
GEN = "<|BOT|>assistant\n<think>\n"
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
TOOLS_TEXT = (
    "# Tools\n\nYou may call the following functions (one JSON description per line):\n"
    '{"name": "get_weather", "description": "Weather in a city", "parameters": '
    '{"type": "object", "properties": {"city": {"type": "string"}}}}\n'
    "\nTo call functions, reply with:\n<｜tool_calls_begin｜><｜tool_call_begin｜>function"
    '<｜tool_sep｜><steptml:invoke name="FUNCTION_NAME"><steptml:parameter name="PARAMETER_NAME">'
    "VALUE</steptml:parameter></steptml:invoke><｜tool_call_end｜><｜tool_calls_end｜><|EOT|>"
)


def step3(messages: list[dict[str, Any]], **kwargs: Any) -> str:
    return render_chat(STEP3_CHAT_TEMPLATE, messages, bos_token=BOS, **kwargs)


def call(name: str, arguments: Any) -> dict[str, Any]:
    return {"id": "c1", "type": "function", "function": {"name": name, "arguments": arguments}}


def test_system_and_user() -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    expected = f"{BOS}<|BOT|>system\nBe brief.<|EOT|><|BOT|>user\nHi<|EOT|>{GEN}"
    assert step3(messages) == expected


def test_multi_turn_without_generation_prompt() -> None:
    messages = [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "中文 😀"},
    ]
    expected = f"{BOS}<|BOT|>user\n2+2?<|EOT|><|BOT|>assistant\n4<|EOT|><|BOT|>user\n中文 😀<|EOT|>"
    assert step3(messages, add_generation_prompt=False) == expected


def test_tools_without_system_message() -> None:
    out = step3([{"role": "user", "content": "Paris?"}], tools=[WEATHER_TOOL])
    assert out == f"{BOS}<|BOT|>system\n{TOOLS_TEXT}<|BOT|>user\nParis?<|EOT|>{GEN}"


def test_tools_join_the_system_message() -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Paris?"}]
    out = step3(messages, tools=[WEATHER_TOOL])
    assert out == f"{BOS}<|BOT|>system\nBe brief.\n\n{TOOLS_TEXT}<|BOT|>user\nParis?<|EOT|>{GEN}"


def test_empty_tools_list_renders_no_tools() -> None:
    assert step3([{"role": "user", "content": "x"}], tools=[]) == (
        f"{BOS}<|BOT|>user\nx<|EOT|>{GEN}"
    )


def test_assistant_tool_calls_and_tool_result() -> None:
    messages = [
        {"role": "user", "content": "Weather?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                call("get_weather", json.dumps({"city": "Paris", "days": 3})),
                call("search", {"q": "café", "filters": ["a", 1], "exact": True}),
                call("now", "{}"),
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": '{"temp": 21}'},
    ]
    expected = (
        f"{BOS}<|BOT|>user\nWeather?<|EOT|><|BOT|>assistant\n<｜tool_calls_begin｜>"
        '<｜tool_call_begin｜>function<｜tool_sep｜><steptml:invoke name="get_weather">'
        '<steptml:parameter name="city">Paris</steptml:parameter>'
        '<steptml:parameter name="days">3</steptml:parameter></steptml:invoke><｜tool_call_end｜>'
        '<｜tool_call_begin｜>function<｜tool_sep｜><steptml:invoke name="search">'
        '<steptml:parameter name="q">café</steptml:parameter>'
        '<steptml:parameter name="filters">["a", 1]</steptml:parameter>'
        '<steptml:parameter name="exact">true</steptml:parameter></steptml:invoke>'
        "<｜tool_call_end｜>"
        '<｜tool_call_begin｜>function<｜tool_sep｜><steptml:invoke name="now"></steptml:invoke>'
        "<｜tool_call_end｜><｜tool_calls_end｜><|EOT|>"
        '<|BOT|>tool\n{"temp": 21}<|EOT|>'
        f"{GEN}"
    )
    assert step3(messages) == expected


def test_assistant_text_before_tool_call() -> None:
    messages = [{"role": "assistant", "content": "Let me check.", "tool_calls": [call("f", {})]}]
    expected = (
        f"{BOS}<|BOT|>assistant\nLet me check.<｜tool_calls_begin｜><｜tool_call_begin｜>function"
        '<｜tool_sep｜><steptml:invoke name="f"></steptml:invoke><｜tool_call_end｜>'
        "<｜tool_calls_end｜><|EOT|>"
    )
    assert step3(messages, add_generation_prompt=False) == expected


def test_part_list_content_is_joined() -> None:
    parts = [{"type": "text", "text": "first"}, {"type": "text", "text": "second"}]
    out = step3([{"role": "user", "content": parts}])
    assert out == f"{BOS}<|BOT|>user\nfirst\nsecond<|EOT|>{GEN}"


def test_hf_conventions_in_custom_template() -> None:
    template = (
        "{{ bos_token }}{% for m in messages %}{{ m.role }}:{{ m.content }}{{ eos_token }}"
        "{% endfor %}{% if enable_thinking is defined and not enable_thinking %}[no-think]"
        "{% endif %}{{ tools | tojson }}{% if add_generation_prompt %}>{% endif %}"
    )
    out = render_chat(
        template,
        [{"role": "user", "content": "é<b>"}],
        tools=[{"name": "f"}],
        bos_token="<s>",
        eos_token="</s>",
        chat_template_kwargs={"enable_thinking": False},
    )
    assert out == '<s>user:é<b></s>[no-think][{"name": "f"}]>'


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ([], "non-empty"),
        ([{"content": "x"}], r"messages\[0\] has no 'role'"),
        (["hello"], "must be an object"),
        ([{"role": "user", "content": 5}], "string or a list"),
        ([{"role": "user", "content": [{"type": "image_url"}]}], "image_url"),
        ([{"role": "assistant", "tool_calls": [call("f", "{bad")]}], "not valid JSON"),
        ([{"role": "assistant", "tool_calls": [call("f", "[1]")]}], "not an object"),
        ([{"role": "assistant", "tool_calls": [{"function": {}}]}], "function.name"),
    ],
)
def test_bad_messages(messages: list[Any], match: str) -> None:
    with pytest.raises(ChatTemplateError, match=match):
        step3(messages)


def test_template_errors() -> None:
    with pytest.raises(ChatTemplateError, match="syntax error"):
        render_chat("{% for %}", [{"role": "user", "content": "x"}])
    raising = "{{ raise_exception('only user turns, got ' + messages[0].role) }}"
    with pytest.raises(ChatTemplateError, match="only user turns, got system"):
        render_chat(raising, [{"role": "system", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="failed to render"):
        render_chat("{{ messages[0].content + 1 }}", [{"role": "user", "content": "x"}])


def test_sandbox_blocks_unsafe_access() -> None:
    with pytest.raises(ChatTemplateError):
        render_chat("{{ messages.__class__.__mro__ }}", [{"role": "user", "content": "x"}])


def test_load_chat_template_sources(tmp_path: Path) -> None:
    assert load_chat_template(tmp_path) == STEP3_CHAT_TEMPLATE
    assert load_chat_template(None) == STEP3_CHAT_TEMPLATE
    (tmp_path / "chat_template.jinja").write_text("jinja")
    assert load_chat_template(tmp_path) == "jinja"
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "json"}))
    assert load_chat_template(tmp_path) == "json"
    named = [{"name": "tool_use", "template": "t"}, {"name": "default", "template": "d"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": named}))
    assert load_chat_template(tmp_path) == "d"
    assert load_chat_template(tmp_path, override="{{ 1 }}") == "{{ 1 }}"
    assert load_chat_template(tmp_path, override=str(tmp_path / "chat_template.jinja")) == "jinja"
    with pytest.raises(ChatTemplateError, match="no_such.jinja not found"):
        load_chat_template(tmp_path, override=str(tmp_path / "no_such.jinja"))


def test_unreadable_template_config(tmp_path: Path) -> None:
    (tmp_path / "tokenizer_config.json").write_text("{oops")
    with pytest.raises(ChatTemplateError, match="tokenizer_config.json"):
        load_chat_template(tmp_path)
