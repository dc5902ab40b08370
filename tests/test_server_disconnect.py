"""Clients that go away mid-request must make the server abort their engine requests."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import httpx
import pytest
from fake_engine import FakeEngine, running_server

from afd.server.api_server import ServerSettings, build_app

MSGS = [{"role": "user", "content": "hi"}]
LONG = {"max_tokens": 400, "ignore_eos": True}  # ~4 s at 10 ms per token unless aborted


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine(token_delay=0.01)


@pytest.fixture
def base_url(engine: FakeEngine) -> Iterator[str]:
    with running_server(build_app(engine, ServerSettings())) as url:
        yield url


def wait_for(predicate: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


async def read_then_leave(http: httpx.AsyncClient, path: str, body: dict, events: int) -> int:
    """Stream a request, read `events` SSE events, then drop the connection."""
    seen = 0
    async with http.stream("POST", path, json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                seen += 1
                if seen >= events:
                    break
    return seen


def test_many_stream_clients_disconnect(base_url: str, engine: FakeEngine) -> None:
    async def main() -> list[int]:
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(base_url=base_url, timeout=20, limits=limits) as http:
            chat = {"messages": MSGS, "stream": True, **LONG}
            comp = {"prompt": "hi", "stream": True, **LONG}
            jobs = [
                read_then_leave(http, "/v1/chat/completions", chat, 3)
                if i % 2
                else read_then_leave(http, "/v1/completions", comp, 3)
                for i in range(50)
            ]
            return await asyncio.gather(*jobs)

    start = time.monotonic()
    assert asyncio.run(main()) == [3] * 50
    wait_for(lambda: len(engine.aborted) == 50 and not engine.in_flight)
    assert time.monotonic() - start < 4.0  # nobody ran to completion
    assert len(set(engine.aborted)) == 50 and not engine.finished


def test_disconnect_before_first_token(base_url: str, engine: FakeEngine) -> None:
    engine.token_delay = 1.0  # a long "prefill": no byte is sent before the client leaves
    body = {"messages": MSGS, "stream": True, **LONG}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(base_url + "/v1/chat/completions", json=body, timeout=0.3)
    wait_for(lambda: len(engine.aborted) == 1, timeout=3)
    assert not engine.in_flight


def test_non_streaming_disconnect(base_url: str, engine: FakeEngine) -> None:
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(base_url + "/v1/completions", json={"prompt": ["a", "b"], **LONG}, timeout=0.3)
    wait_for(lambda: len(engine.aborted) == 2, timeout=3)  # one engine request per prompt
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(base_url + "/v1/chat/completions", json={"messages": MSGS, **LONG}, timeout=0.3)
    wait_for(lambda: len(engine.aborted) == 3, timeout=3)
    assert not engine.in_flight and not engine.finished


def test_finished_requests_are_not_aborted(base_url: str, engine: FakeEngine) -> None:
    r = httpx.post(base_url + "/v1/chat/completions", json={"messages": MSGS, "stream": True})
    assert r.text.endswith("data: [DONE]\n\n")
    assert len(engine.finished) == 1 and not engine.aborted
