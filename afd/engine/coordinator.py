"""The coordinator process: `python -m afd.engine.coordinator SETTINGS_JSON IN OUT`. Owns the
engine core, takes requests from the API server over zmq and streams token updates back."""

from __future__ import annotations

import functools
import itertools
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import TypeVar

import zmq

from afd.config import ConfigError
from afd.engine.builder import EngineSettings, build_engine
from afd.engine.engine_core import EngineCore
from afd.engine.executor import ExecutorError
from afd.engine.messages import AbortRequest, AddRequest
from afd.engine.sequence import Sequence, request_sequences
from afd.engine.stats import engine_stats
from afd.sampling_params import SamplingError
from afd.server.messages import (
    EngineFailed,
    EngineReady,
    EngineRestarted,
    SeqUpdate,
    StepOutputs,
)
from transport.codec import decode, encode

IDLE_POLL_MS = 20
IDLE_CHECK_S = 0.5  # how often an idle coordinator checks that its ranks are alive
T = TypeVar("T")


class Coordinator:
    def __init__(
        self,
        engine: EngineCore,
        inbox: zmq.Socket,
        outbox: zmq.Socket,
        restart_with: EngineSettings | None = None,
    ) -> None:
        """restart_with: rebuild the engine from these settings when a rank fails."""
        self.engine, self.inbox, self.outbox = engine, inbox, outbox
        self.restart_with = restart_with
        self.by_request: dict[str, list[Sequence]] = {}
        self.sent: dict[int, int] = {}  # seq_id -> output tokens already streamed
        self.error: str | None = None
        self._ids = itertools.count(1)
        self.aborted_idle = False
        self.next_idle_check = 0.0

    def run(self, parent_pid: int) -> None:
        while os.getppid() == parent_pid:
            busy = self.engine.has_work() and self.error is None
            self._drain(0 if busy else IDLE_POLL_MS)
            if self.engine.has_work() and self.error is None:
                self._step()
            else:
                if self.aborted_idle:  # aborts freed KV with no step to report it
                    self._send([])  # fresh stats
                if self.error is None and time.monotonic() >= self.next_idle_check:
                    # no step is coming to notice a dead or silent rank: look now and then
                    self.next_idle_check = time.monotonic() + IDLE_CHECK_S
                    self._guarded(self.engine.executor.check)
            self.aborted_idle = False

    def _drain(self, timeout_ms: int) -> None:
        while self.inbox.poll(timeout_ms):
            timeout_ms = 0
            msg = decode(self.inbox.recv())
            if isinstance(msg, AddRequest):
                self._add(msg)
            elif isinstance(msg, AbortRequest):
                self._abort(msg)

    def _add(self, req: AddRequest) -> None:
        if self.error is not None:
            self._refuse(req, self.error)
            return
        seqs = request_sequences(req.request_id, req.prompt_token_ids, req.params, self._ids)
        try:
            for seq in seqs:
                seq.arrival_time = req.arrival_time or seq.arrival_time
                self.engine.add(seq)
        except SamplingError as e:  # a constraint the server let through: this request only
            self.engine.abort([s.seq_id for s in seqs])
            self._refuse(req, str(e))
            return
        self.by_request[req.request_id] = seqs

    def _refuse(self, req: AddRequest, why: str) -> None:
        self._send(
            [
                SeqUpdate(req.request_id, i, [], None, "error", None, why)
                for i in range(req.params.n)
            ]
        )

    def _abort(self, msg: AbortRequest) -> None:
        seqs = self.by_request.get(msg.request_id, [])
        chosen = [s for s in seqs if msg.indices is None or s.index in msg.indices]
        self.engine.abort([s.seq_id for s in chosen])
        self._forget([s for s in seqs if s.finished])
        self.aborted_idle = True

    def _guarded(self, work: Callable[[], T]) -> T | None:
        """work(); a failed rank fails the requests in flight, or restarts the ranks."""
        try:
            return work()
        except ExecutorError as e:
            if self.restart_with is None:
                self._fail_all(str(e))
            else:
                self._restart(str(e))
            return None

    def _step(self) -> None:
        changed = self._guarded(self.engine.step)
        if changed is None:
            return
        updates = [self._update(s) for s in changed]
        self._forget([s for s in changed if s.finished])
        self._send(updates)

    def _update(self, seq: Sequence) -> SeqUpdate:
        start = self.sent.get(seq.seq_id, 0)
        self.sent[seq.seq_id] = len(seq.output_token_ids)
        lps = seq.output_logprobs[start:] if seq.params.logprobs is not None else None
        update = SeqUpdate(
            seq.request_id,
            seq.index,
            seq.output_token_ids[start:],
            lps,
            seq.finish_reason,
            seq.stop_reason,
        )
        if start == 0 and seq.params.prompt_logprobs is not None and seq.has_prompt_logprobs:
            update.prompt_logprobs = seq.prompt_logprobs  # once: complete with the first token
        return update

    def _forget(self, finished: list[Sequence]) -> None:
        for seq in finished:
            self.sent.pop(seq.seq_id, None)
            seqs = self.by_request.get(seq.request_id)
            if seqs is not None and all(s.finished for s in seqs):
                del self.by_request[seq.request_id]

    def _fail_all(self, message: str) -> None:
        self.error = message
        updates = [
            SeqUpdate(s.request_id, s.index, [], None, "error", None, message)
            for seqs in self.by_request.values()
            for s in seqs
            if not s.finished
        ]
        self.by_request.clear()
        self.outbox.send(encode(StepOutputs(updates, None, message)))

    def _restart(self, message: str) -> None:
        """Requests that had started lost their KV with the ranks and fail; requests still
        waiting stay queued and compute on a new set of ranks."""
        waiting = {s.seq_id for s in self.engine.scheduler.waiting}
        kept = {
            rid: seqs
            for rid, seqs in self.by_request.items()
            if all(s.finished or s.seq_id in waiting for s in seqs)
        }
        self.by_request = {rid: seqs for rid, seqs in self.by_request.items() if rid not in kept}
        self._fail_all(message)
        self.engine.executor.shutdown()
        self.by_request = kept
        try:
            self.engine = build_engine(self.restart_with)
        except Exception as e:  # the engine stays down and says why
            self._fail_all(f"{message}; starting new ranks failed too: {e}")
            return
        for seq in (s for seqs in kept.values() for s in seqs if not s.finished):
            self.engine.add(seq)
        self.error = None
        self.outbox.send(encode(EngineRestarted(describe(self.restart_with, self.engine))))

    def _send(self, updates: list[SeqUpdate]) -> None:
        self.outbox.send(encode(StepOutputs(updates, engine_stats(self.engine))))


def main(argv: list[str]) -> int:
    server = os.getppid()  # now: if the server dies while we load, getppid() is 1 later
    # The server stops us with SIGUSR1, once it has drained: exit through `finally`, so the
    # ranks (and the Ray launcher's actors and placement groups) are shut down too. A SIGTERM
    # or Ctrl-C sent to the whole process group (systemd, a terminal) reaches the server as
    # well, which drains first: while it lives, we ignore them.
    signal.signal(signal.SIGUSR1, _exit)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, functools.partial(_exit_if_orphaned, server))
    settings = EngineSettings(**json.loads(argv[0]))
    ctx = zmq.Context()
    inbox, outbox = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    inbox.connect(argv[1])
    outbox.connect(argv[2])
    try:
        engine = build_engine(settings)
    except Exception as e:  # the server reports why and exits
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # its stop would cut our exit short
        expected = isinstance(e, STARTUP_ERRORS)  # their message says it all
        outbox.send(encode(EngineFailed(str(e) if expected else f"{type(e).__name__}: {e}")))
        inbox.close(0)
        outbox.close(linger=1000)
        ctx.term()
        if expected:
            return 1
        raise  # a defect: its traceback goes to the log
    restart_with = settings if settings.restart_on_failure else None
    coordinator = Coordinator(engine, inbox, outbox, restart_with)
    try:
        blocks = engine.scheduler.config.num_kv_blocks
        layout = describe(settings, engine)
        outbox.send(encode(EngineReady(blocks, engine.max_model_len, layout)))
        coordinator.run(server)
    finally:
        coordinator.engine.executor.shutdown()
        inbox.close(0)
        outbox.close(linger=1000)
        ctx.term()
    return 0


# Start-up failures whose one-line message is the whole story: a rank that failed or died
# while loading (ExecutorError, with the rank's own message), a bad checkpoint or setting
# (ConfigError, CheckpointError among them).
STARTUP_ERRORS = (ExecutorError, ConfigError)


def _exit(signum: int, frame: object) -> None:
    raise SystemExit(0)


def _exit_if_orphaned(server: int, signum: int, frame: object) -> None:
    if os.getppid() != server:
        raise SystemExit(0)


def describe(settings: EngineSettings, engine: EngineCore) -> str:
    cfg = engine.scheduler.config
    if settings.colocated:
        where = f"colocated on {settings.device}"
    else:
        where = (
            f"attention {settings.attn} + FFN {settings.ffn} on {settings.device}, "
            f"{cfg.num_micro_batches} micro-batches over {settings.transport}"
        )
    return f"{where}; {cfg.num_kv_blocks} KV blocks of {cfg.block_size} tokens per attention rank"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
