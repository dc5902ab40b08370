"""Local launcher: starts the attention and FFN ranks as OS processes on this machine, wires
their transports together, and drives them in lockstep steps (the disaggregated executor)."""

from __future__ import annotations

import atexit
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import replace

import torch
import zmq

from afd import envs
from afd.config import ConfigError, ModelConfig, RoleShape
from afd.engine.builder import EngineSettings, default_num_blocks, model_len, parse_roles
from afd.engine.executor import Executor, ExecutorError
from afd.engine.messages import FFNStepDone, StepResult, WorkerError, WorkerReady
from afd.launch.rank_process import RankProcess, Spawner, local_spawner
from afd.launch.worker_spec import WorkerSpec
from afd.models.build import resolve_dtype
from attn_worker.messages import StepPlan
from ffn_worker.messages import StepShape
from transport.codec import decode, encode
from transport.control import PeerTable, Shutdown


class DisaggregatedExecutor(Executor):
    def __init__(
        self, attn: list[str], ffn: list[str], host: str = "127.0.0.1", stop_timeout_s: float = 5.0
    ) -> None:
        """host: the address ranks reach the coordinator at (a node IP for multi-node);
        stop_timeout_s: how long ranks may take to exit on shutdown before they are killed."""
        self.attn, self.ffn, self.num_ranks = attn, ffn, len(attn)
        self.stop_timeout_s = stop_timeout_s
        self.ctx = zmq.Context()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        bind = "0.0.0.0" if host != "127.0.0.1" else host
        port = self.router.bind_to_random_port(f"tcp://{bind}")
        self.address = f"tcp://{host}:{port}"
        self.procs: dict[str, RankProcess] = {}
        self.last_beat: dict[str, float] = {}
        self.failed: str | None = None
        self.ffn_compute_s: dict[int, float] = {}  # step -> slowest FFN rank's compute
        self.last_ffn_s = 0.0
        # launcher cleanup after the ranks stop (the Ray launcher frees its placement groups)
        self.on_shutdown: Callable[[], None] | None = None
        atexit.register(self.shutdown)

    # -- start -------------------------------------------------------------------------------
    def start(self, specs: list[WorkerSpec], spawn: Spawner) -> list[WorkerReady]:
        for spec in specs:
            self.procs[spec.name] = spawn(spec)
        ready: dict[str, WorkerReady] = {}
        self._collect(ready, WorkerReady, len(specs), envs.STARTUP_TIMEOUT_S, "start")
        peers = {name: r.transport_address for name, r in ready.items()}
        for name in self.procs:
            self._send(name, PeerTable(peers))
        return list(ready.values())

    # -- steps -------------------------------------------------------------------------------
    def execute(self, plans: list[StepPlan]) -> list[StepResult]:
        if self.failed:
            raise ExecutorError(self.failed)
        tokens = [plan.tokens_per_micro_batch() for plan in plans]
        if any(map(any, tokens)):
            for name in self.ffn:
                self._send(name, StepShape(plans[0].step, tokens))
        for name, plan in zip(self.attn, plans, strict=True):
            self._send(name, plan)
        results: dict[str, StepResult] = {}
        self._collect(
            results, StepResult, len(self.attn), envs.STEP_TIMEOUT_S, f"step {plans[0].step}"
        )
        self._attach_ffn_time(plans[0].step, results.values())
        return [results[name] for name in self.attn]

    def _attach_ffn_time(self, step: int, results: Iterable[StepResult]) -> None:
        """The slowest FFN rank's compute for this step; its report may trail the attention
        ranks' results by a moment, so the last known value stands in until it arrives."""
        self.last_ffn_s = self.ffn_compute_s.pop(step, self.last_ffn_s)
        for old in [s for s in self.ffn_compute_s if s < step]:
            del self.ffn_compute_s[old]
        for result in results:
            result.timings.ffn = self.last_ffn_s

    def _send(self, name: str, msg: object) -> None:
        self.router.send_multipart([name.encode(), encode(msg)])

    def _collect(self, into: dict, kind: type, count: int, timeout_s: float, what: str) -> None:
        """Gathers `count` messages of `kind`; fails fast on a dead, silent or failing rank.
        Liveness is checked every 0.1 s even while messages keep arriving: with many ranks
        the heartbeats alone would otherwise keep the poll from ever timing out."""
        deadline = time.monotonic() + timeout_s
        next_check = 0.0
        # First what queued up while no step ran: an idle coordinator reads no heartbeats, so
        # the last one it handled can be minutes old for a rank that beat all along.
        self._drain(into, kind)
        while len(into) < count:
            if self.router.poll(100):
                self._drain(into, kind)
            now = time.monotonic()
            if now >= next_check:
                next_check = now + 0.1
                self._check_alive(what)
            if now > deadline:
                missing = sorted(set(self.procs) - set(into))
                self._fail(f"{what}: ranks {missing} did not answer within {timeout_s:.0f}s")

    def check(self) -> None:
        if self.failed:
            raise ExecutorError(self.failed)
        self._drain({}, WorkerReady)  # heartbeats (and a WorkerError) that came in meanwhile
        self._check_alive("idle")

    def _drain(self, into: dict, kind: type) -> None:
        while self.router.poll(0):
            self._handle(into, kind)

    def _handle(self, into: dict, kind: type) -> None:
        ident, data = self.router.recv_multipart()
        name = ident.decode().removesuffix(".hb")
        self.last_beat[name] = time.monotonic()
        msg = decode(data)
        if isinstance(msg, WorkerError):
            self._fail(msg.message)
        if isinstance(msg, FFNStepDone):
            self.ffn_compute_s[msg.step] = max(msg.compute_s, self.ffn_compute_s.get(msg.step, 0.0))
        if isinstance(msg, kind):
            into[name] = msg

    def _check_alive(self, what: str) -> None:
        now = time.monotonic()
        for name, proc in self.procs.items():
            code = proc.poll()
            if code is not None:
                self._fail(f"{what}: rank {name} ({proc.where}) exited with code {code}")
            # a rank is held to heartbeats once it has sent one (imports may take a while)
            if now - self.last_beat.get(name, now) > envs.HEARTBEAT_TIMEOUT_S:
                self._fail(
                    f"{what}: rank {name} ({proc.where}) stopped answering: no "
                    f"heartbeat for {envs.HEARTBEAT_TIMEOUT_S:.0f}s"
                )

    def _fail(self, message: str) -> None:
        self.failed = message
        self.shutdown()
        raise ExecutorError(message)

    # -- stop --------------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Asks every rank to stop, kills all that are left after stop_timeout_s at once, and
        waits for them at most as long again; idempotent."""
        if not self.procs:
            return
        for name, proc in self.procs.items():
            if proc.poll() is None:
                self._send(name, Shutdown("coordinator shutting down"))
        deadline = time.monotonic() + self.stop_timeout_s
        left = [p for p in self.procs.values() if not p.wait(max(0.0, deadline - time.monotonic()))]
        for proc in left:
            proc.kill()
        deadline = time.monotonic() + self.stop_timeout_s
        for proc in left:
            proc.wait(max(0.0, deadline - time.monotonic()))
        self.procs.clear()
        if self.on_shutdown is not None:
            self.on_shutdown()
        self.router.close(0)
        self.ctx.term()
        atexit.unregister(self.shutdown)


def rank_names(settings: EngineSettings) -> tuple[list[str], list[str]]:
    attn_shape, ffn_shape = parse_roles(settings)
    return (
        [f"a{i}" for i in range(attn_shape.num_ranks)],
        [f"f{i}" for i in range(ffn_shape.num_ranks)],
    )


def worker_specs(
    settings: EngineSettings, cfg: ModelConfig, coordinator: str, parent_pid: int, threads: int
) -> list[WorkerSpec]:
    """One spec per rank; KV blocks are sized here on CPU and by each rank on a GPU."""
    attn, ffn = rank_names(settings)
    dtype = resolve_dtype(settings.dtype, cfg)
    blocks = 0
    if settings.device != "cuda":
        blocks = default_num_blocks(settings, cfg, dtype, torch.device("cpu"))
    return [
        WorkerSpec(
            name=name,
            index=i,
            model=settings.model,
            dtype=settings.dtype,
            device=settings.device,
            attn_ranks=attn,
            ffn_ranks=ffn,
            coordinator=coordinator,
            transport=settings.transport,
            num_kv_blocks=blocks,
            block_size=settings.block_size,
            kv_cache_dtype=settings.kv_cache_dtype,
            quantization=settings.quantization,
            fp8_attention=settings.fp8_attention,
            recv_timeout_s=envs.RECV_TIMEOUT_S,
            heartbeat_s=envs.HEARTBEAT_INTERVAL_S,
            parent_pid=parent_pid,
            num_threads=threads,
            cuda_graph_max_batch=settings.graph_max_batch(),
            max_model_len=model_len(settings, cfg),
        )
        for names in (attn, ffn)
        for i, name in enumerate(names)
    ]


def start_executor(
    executor: DisaggregatedExecutor, specs: list[WorkerSpec], spawn: Spawner
) -> tuple[DisaggregatedExecutor, int]:
    """Starts every rank; returns the executor and the KV blocks per attention rank."""
    try:
        ready = executor.start(specs, spawn)
    except BaseException:
        executor.shutdown()
        raise
    return executor, min(r.num_kv_blocks for r in ready if r.rank_name in executor.attn)


def build_disaggregated(
    settings: EngineSettings, cfg: ModelConfig
) -> tuple[DisaggregatedExecutor, int]:
    """Local launcher: every rank an OS process on this machine."""
    attn, ffn = rank_names(settings)
    attn_shape, ffn_shape = parse_roles(settings)
    gpus = _assign_gpus(settings.device, attn + ffn, attn_shape, ffn_shape)
    executor = DisaggregatedExecutor(attn, ffn)
    threads = max(1, (os.cpu_count() or 1) // (len(attn) + len(ffn)))
    specs = worker_specs(settings, cfg, executor.address, os.getpid(), threads)
    # each rank sees every GPU and picks its own by index: NCCL P2P/NVLink between processes
    # needs the peer GPU visible (narrowing CUDA_VISIBLE_DEVICES would hide it)
    specs = [replace(s, device=f"cuda:{gpus[s.name]}") if gpus else s for s in specs]
    return start_executor(executor, specs, local_spawner({}))


def _assign_gpus(device: str, names: list[str], attn: RoleShape, ffn: RoleShape) -> dict[str, int]:
    if device != "cuda":
        return {}
    have = torch.cuda.device_count()
    if have < len(names):
        raise ConfigError(
            f"--attn {attn} --ffn {ffn} needs {len(names)} GPUs; this machine has {have}"
        )
    return {name: i for i, name in enumerate(names)}
