"""Server options: CLI flags -> ServerSettings, chat-template override, echo, in-band errors."""

from __future__ import annotations

import argparse
import json
import threading

import httpx
import pytest
from fake_engine import DEFAULT_REPLY, FakeEngine, running_server

from afd.server.api_server import ServerSettings, add_server_args, build_app, settings_from_args
from afd.server.engine_stream import EngineStreams

MSGS = [{"role": "user", "content": "hi"}]


def test_settings_from_args() -> None:
    parser = argparse.ArgumentParser()
    add_server_args(parser)
    args = parser.parse_args(
        "--served-model-name a b --api-key k --reasoning-parser step3 --tool-call-parser step3 "
        "--enable-auto-tool-choice --max-logprobs 5 --no-reasoning-content".split()
    )
    s = settings_from_args(args)
    assert s.served_model_names == ("a", "b") and s.api_key == "k"
    assert (s.reasoning_parser, s.tool_call_parser, s.enable_auto_tool_choice) == (
        "step3",
        "step3",
        True,
    )
    assert s.max_logprobs == 5 and not s.emit_reasoning_content
    with pytest.raises(SystemExit):
        parser.parse_args(["--reasoning-parser", "nope"])


def test_settings_validation() -> None:
    with pytest.raises(ValueError, match="requires --tool-call-parser"):
        ServerSettings(enable_auto_tool_choice=True)


def test_chat_template_override_and_echo() -> None:
    engine = FakeEngine()
    template = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}[assistant] "
    app = build_app(engine, ServerSettings(chat_template=template))
    with running_server(app) as url:
        r = httpx.post(url + "/v1/chat/completions", json={"messages": MSGS, "max_tokens": 2})
        assert r.status_code == 200, r.text
        prompt = engine.tokenizer.decode(engine.last_prompt, skip_special_tokens=False)
        assert prompt == "[user] hi\n[assistant] "
        msgs = MSGS + [{"role": "assistant", "content": "Hello"}]
        body = {"messages": msgs, "echo": True, "max_tokens": 3,
                "add_generation_prompt": False, "continue_final_message": True}  # fmt: skip
        r = httpx.post(url + "/v1/chat/completions", json=body)
        assert r.json()["choices"][0]["message"]["content"].startswith("Hello")


def sse_events(text: str) -> list[str]:
    return [line[6:] for line in text.split("\n\n") if line.startswith("data: ")]


def test_in_band_stream_error_for_completions() -> None:
    engine = FakeEngine()
    engine.fail_with = "boom"
    with running_server(build_app(engine, ServerSettings())) as url:
        r = httpx.post(url + "/v1/completions", json={"prompt": "x", "stream": True})
        events = sse_events(r.text)
        assert r.status_code == 200 and events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert "boom" in error["message"] and error["code"] == 500


def test_tokenize_token_strs() -> None:
    engine = FakeEngine()
    with running_server(build_app(engine, ServerSettings())) as url:
        body = {"prompt": "hello world", "add_special_tokens": False, "return_token_strs": True}
        r = httpx.post(url + "/tokenize", json=body).json()
        assert "".join(r["token_strs"]) == "hello world"


def test_force_include_usage() -> None:
    engine = FakeEngine()
    app = build_app(engine, ServerSettings(enable_force_include_usage=True))
    with running_server(app) as url:
        body = {"messages": MSGS, "stream": True, "max_tokens": 2}
        events = sse_events(httpx.post(url + "/v1/chat/completions", json=body).text)
        usage = json.loads(events[-2])
        assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 2


def test_requests_fail_when_the_engine_dies(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(EngineStreams, "health_poll_s", 0.05)
    engine = FakeEngine()
    engine.stall = True  # requests wait forever...
    with running_server(build_app(engine, ServerSettings())) as url:
        threading.Timer(0.3, lambda: setattr(engine, "healthy", False)).start()  # ...it dies
        r = httpx.post(url + "/v1/chat/completions", json={"messages": MSGS}, timeout=5)
        assert r.status_code == 500 and "not healthy" in r.json()["error"]["message"]
        body = {"prompt": "x", "stream": True}
        events = sse_events(httpx.post(url + "/v1/completions", json=body, timeout=5).text)
        assert "not healthy" in json.loads(events[-2])["error"]["message"]
        assert len(engine.aborted) == 2 and not engine.in_flight


def test_server_holds_back_what_a_leaky_engine_streams() -> None:
    engine = FakeEngine()
    engine.leaky = True
    reply = DEFAULT_REPLY.format(i=0)
    with running_server(build_app(engine, ServerSettings())) as url:
        body = {"messages": MSGS, "stop": ["brown fox"], "stream": True}
        events = sse_events(httpx.post(url + "/v1/chat/completions", json=body).text)
        chunks = [json.loads(e) for e in events[:-1]]
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
        assert text == reply.split("brown fox")[0]  # "brown" was streamed by the engine
        body = {"messages": MSGS, "skip_special_tokens": False}
        r = httpx.post(url + "/v1/chat/completions", json=body).json()
        assert r["choices"][0]["message"]["content"] == reply  # no trailing <|EOT|>
