"""The API server's EngineClient: starts the coordinator process, sends it tokenized requests
over zmq and turns its token updates into cumulative RequestOutputs (detokenized, stop strings
applied) for each waiting request."""

from __future__ import annotations

import asyncio
import itertools
import json
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict

import zmq
import zmq.asyncio

from afd.config import ModelConfig
from afd.engine.builder import EngineSettings
from afd.engine.messages import AbortRequest, AddRequest
from afd.engine.output_processor import OutputProcessor
from afd.engine.sequence import SeqStatus, Sequence, request_sequences
from afd.outputs import RequestOutput
from afd.sampling_params import SamplingParams
from afd.server.engine_client import EngineError
from afd.server.messages import (
    EngineFailed,
    EngineReady,
    EngineRestarted,
    EngineStats,
    SeqUpdate,
    StepOutputs,
)
from afd.tokenizer import Tokenizer
from transport.codec import decode, encode


class EngineStartError(RuntimeError):
    """The engine did not start; the message says why (a rank's error, a bad checkpoint)."""


class CoordinatorClient:
    def __init__(
        self,
        settings: EngineSettings,
        tokenizer: Tokenizer,
        model_name: str,
        on_stats: Callable[[EngineStats], None] | None = None,
    ) -> None:
        self.settings, self.tokenizer = settings, tokenizer
        # the engine builds its grammars at this width, so the server checks requests at it
        self.vocab_size = ModelConfig.from_pretrained(settings.model).vocab_size
        self.model_name, self.model_root = model_name, settings.model
        self.on_stats = on_stats
        self.max_model_len = 0
        self.layout = ""
        self.error: str | None = None
        self.processor = OutputProcessor(tokenizer)
        self.seqs: dict[tuple[str, int], Sequence] = {}
        self.queues: dict[str, asyncio.Queue[RequestOutput]] = {}
        self.proc: subprocess.Popen | None = None
        self._ids = itertools.count(1)

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self, timeout_s: float = 600.0) -> EngineReady:
        self.ctx = zmq.asyncio.Context()
        self.outbox, self.inbox = self.ctx.socket(zmq.PUSH), self.ctx.socket(zmq.PULL)
        out_port = self.outbox.bind_to_random_port("tcp://127.0.0.1")
        in_port = self.inbox.bind_to_random_port("tcp://127.0.0.1")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "afd.engine.coordinator",
                json.dumps(asdict(self.settings)),
                f"tcp://127.0.0.1:{out_port}",
                f"tcp://127.0.0.1:{in_port}",
            ]
        )
        ready = await self._wait_ready(timeout_s)
        self.max_model_len, self.layout = ready.max_model_len, ready.layout
        self._reader = asyncio.create_task(self._read_loop())
        return ready

    async def _wait_ready(self, timeout_s: float) -> EngineReady:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if await self.inbox.poll(200):
                msg = decode(await self.inbox.recv())
                if isinstance(msg, EngineReady):
                    return msg
                if isinstance(msg, EngineFailed):
                    raise EngineStartError(msg.message)
            if self.proc.poll() is not None:
                raise EngineStartError(
                    f"the coordinator exited with code {self.proc.returncode} "
                    "while starting; see its error above"
                )
        raise EngineStartError(f"the coordinator did not start within {timeout_s:.0f}s")

    async def shutdown(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGUSR1)  # the coordinator's stop (it ignores SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        if hasattr(self, "_reader"):
            self._reader.cancel()
        self.ctx.destroy(linger=0)

    async def abort_all(self, message: str = "the server is shutting down") -> None:
        """Ends every in-flight request with `message` and turns unhealthy (shutdown deadline)."""
        updates = [
            SeqUpdate(rid, i, [], None, "error", None, message)
            for (rid, i), seq in self.seqs.items()
            if not seq.finished
        ]
        await self._apply(StepOutputs(updates, None, message))

    def is_healthy(self) -> bool:
        return self.error is None and self.proc is not None and self.proc.poll() is None

    # -- requests ----------------------------------------------------------------------------
    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        if not self.is_healthy():
            raise EngineError(f"the engine is down: {self.error or 'coordinator exited'}")
        # Queues and sequences are keyed by it: EngineStreams makes every id unique.
        assert request_id not in self.queues, f"engine request id {request_id} is in use"
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self.queues[request_id] = queue
        seqs = request_sequences(request_id, prompt_token_ids, params, self._ids)
        for seq in seqs:
            self.seqs[(request_id, seq.index)] = seq
        self.processor.add(request_id, None, prompt_token_ids, params, seqs)
        await self.outbox.send(
            encode(AddRequest(request_id, list(prompt_token_ids), params, time.monotonic()))
        )
        finished = False
        try:
            while not finished:
                out = await queue.get()
                if out.error:
                    raise EngineError(out.error)
                finished = out.finished
                yield out
        finally:
            self._drop(request_id, params.n)
            if not finished:
                await self.abort(request_id)

    async def abort(self, request_id: str) -> None:
        self.processor.fail(request_id, "abort")
        await self._tell(AbortRequest(request_id))

    async def _tell(self, msg: object) -> None:
        """Sends to the coordinator unless it is gone: a PUSH to no peer would block forever."""
        if not self.is_healthy():
            return
        try:
            await self.outbox.send(encode(msg), flags=zmq.NOBLOCK)
        except zmq.Again:
            self._fail_waiting("the coordinator is not taking messages")

    def _drop(self, request_id: str, n: int) -> None:
        self.queues.pop(request_id, None)
        for i in range(n):
            self.seqs.pop((request_id, i), None)

    def _fail_waiting(self, message: str) -> None:
        """The coordinator is gone: every waiting request fails now instead of hanging."""
        self.error = message
        for request_id, queue in self.queues.items():
            queue.put_nowait(_error_output(request_id, message))

    async def _read_loop(self) -> None:
        while True:
            if not await self.inbox.poll(500):
                if self.proc is not None and self.proc.poll() is not None and not self.error:
                    self._fail_waiting(f"the coordinator exited with code {self.proc.returncode}")
                continue
            msg = decode(await self.inbox.recv())
            if isinstance(msg, StepOutputs):
                await self._apply(msg)
            elif isinstance(msg, EngineRestarted):  # --restart-on-failure: healthy again
                self.error, self.layout = None, msg.layout
                print(f"afd-serve: ranks restarted: {msg.layout}", flush=True)

    async def _apply(self, msg: StepOutputs) -> None:
        if msg.engine_error:
            self.error = msg.engine_error
        if msg.stats is not None and self.on_stats is not None:
            self.on_stats(msg.stats)
        changed, errors = [], {}
        for u in msg.updates:
            seq = self.seqs.get((u.request_id, u.index))
            if seq is None:
                continue
            _apply_update(seq, u)
            changed.append(seq)
            if u.error:
                errors[u.request_id] = u.error
        outputs, stop_hits = self.processor.process(changed)
        for out in outputs:
            out.error = errors.get(out.request_id)
            if out.request_id in self.queues:
                self.queues[out.request_id].put_nowait(out)
        for seq_id in stop_hits:  # a stop string ended these choices: free their KV now
            seq = next((s for s in changed if s.seq_id == seq_id), None)
            if seq is not None:
                await self._tell(AbortRequest(seq.request_id, [seq.index]))


def _error_output(request_id: str, message: str) -> RequestOutput:
    return RequestOutput(request_id, None, [], [], finished=True, error=message)


def _apply_update(seq: Sequence, u: SeqUpdate) -> None:
    seq.output_token_ids.extend(u.token_ids)
    if u.logprobs:
        seq.output_logprobs.extend(u.logprobs)
    if u.prompt_logprobs is not None:
        seq.prompt_logprobs = u.prompt_logprobs
    if u.finish_reason is not None:
        seq.status, seq.finish_reason, seq.stop_reason = (
            SeqStatus.FINISHED,
            u.finish_reason,
            u.stop_reason,
        )
