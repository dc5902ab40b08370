"""A deterministic EngineClient for server tests, and a uvicorn server running in a thread.

FakeEngine "generates" a scripted reply per choice token by token, honouring n, max_tokens,
stop strings, stop_token_ids, ignore_eos, logprobs and prompt_logprobs the way the real engine
must, and counts requests in flight and aborted so tests can check that the server frees what
it started.
"""

from __future__ import annotations

import asyncio
import atexit
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache

import httpx
import uvicorn

from afd.detokenizer import IncrementalDetokenizer, find_stop, safe_emit_length
from afd.models.tiny_tokenizer import write_tiny_tokenizer
from afd.outputs import CompletionOutput, Logprob, RequestOutput
from afd.sampling_params import SamplingParams
from afd.tokenizer import Tokenizer

DEFAULT_REPLY = "Hello! This is choice {i}. The quick brown fox jumps over the lazy dog."
FILLER = " and more"  # generated after the reply when ignore_eos is set


@lru_cache(maxsize=1)
def tiny_tokenizer() -> Tokenizer:
    folder = tempfile.mkdtemp(prefix="afd-tiny-tok-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    write_tiny_tokenizer(folder)
    return Tokenizer.from_pretrained(folder)


class _Choice:
    def __init__(self, index: int, script: list[int], tok: Tokenizer, params: SamplingParams):
        self.out = CompletionOutput(
            index=index, logprobs=[] if params.logprobs is not None else None
        )
        self.script = script
        self.detok = IncrementalDetokenizer(tok, skip_special_tokens=params.skip_special_tokens)
        self.full_text = ""


class FakeEngine:
    def __init__(
        self,
        tokenizer: Tokenizer | None = None,
        reply: Callable[[list[int], int], str] | None = None,
        token_delay: float = 0.0,
        max_model_len: int = 512,
    ) -> None:
        self.tokenizer = tokenizer or tiny_tokenizer()
        self.vocab_size = self.tokenizer.vocab_size
        self.model_name = "tiny-step3"
        self.model_root = "/models/tiny-step3"
        self.max_model_len = max_model_len
        self.reply = reply or (lambda prompt_ids, i: DEFAULT_REPLY.format(i=i))
        self.token_delay = token_delay
        self.healthy = True
        self.fail_with: str | None = None  # make every request end with this engine error
        self.stall = False  # never produce output, like an engine that died silently
        # Break the stream contract like a naive engine: stream stop-string prefixes and
        # keep the detokenized EOS (with skip_special_tokens=False) in the text.
        self.leaky = False
        self.in_flight: set[str] = set()
        self.aborted: list[str] = []
        self.finished: list[str] = []
        self.started: list[str] = []
        # outputs sent before the prompt's logprobs arrive (the real engine sends them with
        # the first choice's first token; a choice served from the prefix cache can be faster)
        self.prompt_logprobs_after = 0
        self.last_params: SamplingParams | None = None
        self.last_prompt: list[int] = []

    def is_healthy(self) -> bool:
        return self.healthy

    async def abort(self, request_id: str) -> None:
        if request_id in self.in_flight:
            self.aborted.append(request_id)
            self.in_flight.discard(request_id)

    def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        assert request_id not in self.in_flight, f"duplicate request id {request_id}"
        self.in_flight.add(request_id)
        self.started.append(request_id)
        self.last_params, self.last_prompt = params, list(prompt_token_ids)
        return self._run(request_id, list(prompt_token_ids), params)

    async def _run(
        self, request_id: str, prompt: list[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        tok = self.tokenizer
        choices = [
            _Choice(i, tok.encode(self.reply(prompt, i)), tok, params) for i in range(params.n)
        ]
        step = 0
        tables = self._prompt_logprobs(prompt, params.prompt_logprobs)
        if self.stall:
            await asyncio.Event().wait()  # until cancelled
        while request_id in self.in_flight:
            await asyncio.sleep(self.token_delay)
            if request_id not in self.in_flight:
                return  # aborted while "computing"
            for c in choices:
                if c.out.finish_reason is None:
                    self._step(c, step, params)
            step += 1
            done = all(c.out.finish_reason is not None for c in choices)
            if done and self.fail_with:
                self.in_flight.discard(request_id)
                yield RequestOutput(request_id, None, prompt, [], True, error=self.fail_with)
                return
            if done:
                self.in_flight.discard(request_id)
                self.finished.append(request_id)
            outs = [_copy(c.out) for c in choices]
            late = step <= self.prompt_logprobs_after and not done
            yield RequestOutput(
                request_id, None, prompt, outs, done, prompt_logprobs=None if late else tables
            )

    def _step(self, c: _Choice, step: int, params: SamplingParams) -> None:
        eos = self.tokenizer.eos_token_id
        if step < len(c.script):
            token = c.script[step]
        elif params.ignore_eos:
            filler = self.tokenizer.encode(FILLER)
            token = filler[(step - len(c.script)) % len(filler)]
        else:
            token = eos
        c.out.token_ids.append(token)
        if c.out.logprobs is not None:
            c.out.logprobs.append(self._logprobs(token, params.logprobs or 0))
        if (token == eos and not params.ignore_eos) or token in params.stop_token_ids:
            if self.leaky or params.include_stop_str_in_output:
                c.full_text += c.detok.add(token)
            c.out.text = c.full_text + c.detok.flush()
            c.out.finish_reason = "stop"
            c.out.stop_reason = None if token == eos else token
            return
        c.full_text += c.detok.add(token)
        self._apply_stops(c, params)

    def _apply_stops(self, c: _Choice, params: SamplingParams) -> None:
        cut, hit = find_stop(c.full_text, params.stop, params.include_stop_str_in_output)
        if hit is not None:
            c.out.text, c.out.finish_reason, c.out.stop_reason = cut, "stop", hit
        elif params.max_tokens is not None and len(c.out.token_ids) >= params.max_tokens:
            c.out.text, c.out.finish_reason = c.full_text + c.detok.flush(), "length"
        else:
            held = len(c.full_text) if self.leaky else safe_emit_length(c.full_text, params.stop)
            c.out.text = c.full_text[:held]

    def _prompt_logprobs(
        self, prompt: list[int], k: int | None
    ) -> list[dict[int, Logprob] | None] | None:
        """Each prompt token is the most likely one (-0.5 - position / 100), its k - 1
        successors in the vocabulary the next most likely."""
        if k is None:
            return None
        vocab, text = self.tokenizer.vocab_size, self.tokenizer.decode
        tables: list[dict[int, Logprob] | None] = [None]
        for pos, token in enumerate(prompt[1:], 1):
            lp = -0.5 - pos / 100
            table = {token: Logprob(lp, 1, text([token], skip_special_tokens=False))}
            for j in range(1, k):
                other = (token + j) % vocab
                table[other] = Logprob(lp - j, j + 1, text([other], skip_special_tokens=False))
            tables.append(table)
        return tables

    def _logprobs(self, token: int, k: int) -> dict[int, Logprob]:
        """The sampled token is always the most likely here (-0.25), its successors in the
        vocabulary the next most likely; vLLM's table: its own entry, then the top k, of which
        it is the first (so k entries in all, one for k=0), as the engine's sampler gives."""
        vocab, text = self.tokenizer.vocab_size, self.tokenizer.decode
        table = {token: Logprob(-0.25, 1, text([token], skip_special_tokens=False))}
        for j in range(1, k):
            other = (token + j) % vocab
            table[other] = Logprob(-1.0 - j, j + 1, text([other], skip_special_tokens=False))
        return table


def _copy(out: CompletionOutput) -> CompletionOutput:
    logprobs = list(out.logprobs) if out.logprobs is not None else None
    return CompletionOutput(
        out.index, out.text, list(out.token_ids), logprobs, out.finish_reason, out.stop_reason
    )


@contextmanager
def running_server(app: object) -> Iterator[str]:
    """Serve `app` with uvicorn on a free 127.0.0.1 port in a thread; yield its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@contextmanager
def fake_http(engine: object) -> Iterator[httpx.Client]:
    """An httpx client of the API server over `engine`, served by running_server."""
    from afd.server.api_server import ServerSettings, build_app

    with running_server(build_app(engine, ServerSettings())) as url:
        with httpx.Client(base_url=url, timeout=30) as client:
            yield client
